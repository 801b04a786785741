//! The command line: help text with every flag's environment variable and default, and
//! start-up errors that name what is wrong, in one `error: ...` line on stderr.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs mmserve to completion; a run that would serve forever is killed after
/// a minute and fails the test.
fn run(args: &[&str]) -> std::process::Output {
    let mut child = common::binary::command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mmserve");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mmserve {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Whether mmserve succeeded, and its stdout and stderr together.
fn mmserve(args: &[&str]) -> (bool, String) {
    let out = run(args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_bad_config_file_is_named() {
    let dir = std::env::temp_dir().join(format!("mmserve-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, "[server]\nport = \"eighty\"\n").unwrap();
    let (ok, text) = mmserve(&["serve", "--config", f.to_str().unwrap(), "--model", "x"]);
    assert!(!ok);
    assert!(text.contains("bad.toml"), "{text}");
}

#[test]
fn a_missing_file_in_the_model_directory_is_named() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llava-clip-llama");
    // The image-processor settings may also live in processor_config.json (transformers 5):
    // only when both are gone is something missing.
    for (missing, also_gone) in [
        ("tokenizer.json", ""),
        ("preprocessor_config.json", "processor_config.json"),
        ("model.safetensors", ""),
    ] {
        let dir =
            std::env::temp_dir().join(format!("mmserve-missing-{}-{missing}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != missing && entry.file_name() != also_gone {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        let (ok, text) = mmserve(&["serve", "--model", dir.to_str().unwrap(), "--port", "0"]);
        assert!(!ok);
        assert!(text.contains(missing), "{missing} not named in:\n{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The one `error: ...` line mmserve prints on stderr before it exits non-zero.
fn one_line_error(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mmserve {args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line on stderr:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

/// The help text's flag entries: each from its `-`/`--` line to the next.
fn flag_entries(help: &str) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in help.lines() {
        if line.trim_start().starts_with('-') {
            entries.push(line.trim().to_string());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    entries
}

#[test]
fn help_gives_every_flag_its_env_var_and_default() {
    let (ok, text) = mmserve(&["serve", "--help"]);
    assert!(ok, "{text}");
    let entries = flag_entries(&text);
    let serve_flags: Vec<&String> = entries
        .iter()
        .filter(|e| !e.starts_with("-h, --help"))
        .collect();
    assert!(serve_flags.len() >= 10, "{text}");
    for entry in serve_flags {
        assert!(entry.contains("[env: MMSERVE_"), "no env var: {entry}");
        assert!(entry.contains("[default: "), "no default: {entry}");
    }
    let port = entries.iter().find(|e| e.starts_with("--port")).unwrap();
    assert!(
        port.contains("[default: 8000") && port.contains("[env: MMSERVE_PORT"),
        "{port}"
    );
    let (ok, text) = mmserve(&["--help"]);
    assert!(ok && text.contains("serve --help"), "{text}");
}

#[test]
fn a_missing_model_directory_is_one_line() {
    let line = one_line_error(&["serve", "--model", "/nonexistent/model-dir", "--port", "0"]);
    assert!(
        line.contains("/nonexistent/model-dir") && line.contains("does not exist"),
        "{line}"
    );
}

#[test]
fn a_port_in_use_is_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let model = common::model_dir("llava-clip-llama");
    let args = [
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--port",
        &port,
    ];
    let line = one_line_error(&args);
    assert!(
        line.contains(&format!("127.0.0.1:{port}")) && line.contains("already in use"),
        "{line}"
    );
}

#[test]
fn an_unsupported_architecture_is_one_line() {
    let dir = std::env::temp_dir().join(format!("mmserve-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba"}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let line = one_line_error(&["serve", "--model", dir.to_str().unwrap(), "--port", "0"]);
    for part in ["unsupported", "mamba", "MambaForCausalLM", "llava"] {
        assert!(line.contains(part), "{part} not in: {line}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dtype_and_quantize_values_are_checked() {
    let model = common::model_dir("llava-clip-llama");
    let model = model.to_str().unwrap();
    let (ok, text) = mmserve(&["serve", "--model", model, "--port", "0", "--dtype", "bf16"]);
    assert!(!ok);
    assert!(text.contains("bf16") && text.contains("f16"), "{text}");
    let (ok, text) = mmserve(&["serve", "--model", model, "--quantize", "q5"]);
    assert!(!ok);
    assert!(text.contains("q8_0") && text.contains("q4k"), "{text}");
}

#[test]
fn a_device_this_build_cannot_use_is_one_line() {
    let model = common::model_dir("llava-clip-llama");
    let model = model.to_str().unwrap();
    let serve = |devices: &str| {
        one_line_error(&[
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--devices",
            devices,
        ])
    };
    let line = serve("cpu,tpu:0");
    assert!(
        line.contains("`tpu:0`") && line.contains("cuda:N"),
        "{line}"
    );
    if !cfg!(feature = "cuda") {
        let line = serve("cuda:0");
        assert!(
            line.contains("cuda:0") && line.contains("build-cuda.sh"),
            "{line}"
        );
    }
}
