//! The command line: help text, and start-up errors that name what is wrong.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs mmserve to completion; a run that would serve forever is killed after
/// a minute and fails the test.
fn mmserve(args: &[&str]) -> (bool, String) {
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
    let out = child.wait_with_output().expect("output");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn help_explains_every_flag() {
    let (ok, text) = mmserve(&["serve", "--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--config",
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--dtype",
        "--max-num-seqs",
        "--max-batched-tokens",
        "--api-key",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let (ok, text) = mmserve(&["--help"]);
    assert!(ok && text.contains("serve"), "{text}");
}

#[test]
fn a_missing_model_directory_is_named() {
    let (ok, text) = mmserve(&["serve", "--model", "/nonexistent/model-dir", "--port", "0"]);
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/model-dir/config.json"),
        "{text}"
    );
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
