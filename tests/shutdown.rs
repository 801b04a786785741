//! The real binary's life as an orchestrator sees it: `/ready` is 503 until the
//! start-up warm-up is done (held here by a gate file), which does not count as
//! a request in the metrics; a failed warm-up exits non-zero; SIGTERM during
//! ten streams lets them finish while `/ready` and new requests get 503 and
//! `/health` stays 200, then exits 0; a dead engine thread makes the process
//! exit non-zero so an orchestrator restarts it.
#![cfg(unix)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::live::{finish_reason, health, long_request, post, OpenStream, HOOK};

const MODEL: &str = "qwen2-vl-tiny";

/// The arguments to serve MODEL with test hooks and `debug` added to the `[debug]` section.
fn args(debug: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("mmserve-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("{:?}.toml", std::thread::current().id()));
    let toml = format!("[server]\ndrain_timeout_secs = 120\n[debug]\ntest_hooks = true\n{debug}");
    std::fs::write(&config, toml).unwrap();
    let model = common::model_dir(MODEL);
    [
        "--config",
        config.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]
    .map(str::to_string)
    .to_vec()
}

/// mmserve on a free port with test hooks, once ready.
async fn start() -> common::binary::Served {
    let args = args("");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::binary::start(&args, Duration::from_secs(60)).await
}

/// `GET /ready`: status and body.
async fn ready(base: &str) -> (u16, serde_json::Value) {
    let resp = common::client().get(format!("{base}/ready")).send().await;
    let resp = resp.expect("ready");
    (
        resp.status().as_u16(),
        resp.json().await.expect("ready json"),
    )
}

/// Waits for the process to exit (a minute at most) and returns its code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mmserve did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

#[tokio::test]
async fn sigterm_drains_ten_streams_then_exits_0() {
    let mut served = start().await;
    let base = served.base.clone();
    let mut streams = Vec::new();
    for _ in 0..10 {
        let body = long_request(MODEL, 1500, true);
        let mut s = OpenStream::open(&base, &body, &[]).await;
        s.until_text().await;
        streams.push(s);
    }
    assert_eq!(ready(&base).await.0, 200);
    signal(&served.child, "-TERM");
    // Draining: /ready and new requests answer 503; the process is alive: /health is 200.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = ready(&base).await;
        if status == 503 {
            assert_eq!(body["status"], "draining", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never started draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(health(&base).await.0, 200);
    let resp = post(&base, &long_request(MODEL, 4, false), &[]).await;
    assert_eq!(resp.status().as_u16(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "server_shutting_down", "{body}");
    // The ten streams run to the end, well-formed.
    for s in streams {
        let events = s.all().await;
        assert_eq!(finish_reason(&events), "length");
    }
    assert_eq!(exit_code(&mut served.child), Some(0));
}

#[tokio::test]
async fn a_dead_engine_makes_the_process_exit_non_zero() {
    let mut served = start().await;
    let base = served.base.clone();
    let resp = post(
        &base,
        &long_request(MODEL, 4, false),
        &[(HOOK, "kill-engine")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 503);
    let code = exit_code(&mut served.child);
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
}

#[tokio::test]
async fn ready_waits_for_the_warm_up_which_is_not_counted_as_a_request() {
    let gate = std::env::temp_dir().join(format!("mmserve-gate-{}", std::process::id()));
    let _ = std::fs::remove_file(&gate);
    let args = args(&format!("warmup_gate = {:?}\n", gate.to_str().unwrap()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut served = common::binary::spawn(&args);
    let base = served.base.clone();
    common::binary::wait_until(&mut served, "/health", Duration::from_secs(60)).await;
    // Loaded, its warm-up held at the gate: alive, not ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = ready(&base).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["status"], "not_ready", "{body}");
        if body["models"][MODEL] == "warming_up" {
            break;
        }
        assert_eq!(body["models"][MODEL], "loading", "{body}");
        assert!(Instant::now() < deadline, "never loaded: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&base).await.0, 200);
    std::fs::write(&gate, "").unwrap();
    common::binary::wait_until(&mut served, "/ready", Duration::from_secs(60)).await;
    let (_, body) = ready(&base).await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["models"][MODEL], "ready", "{body}");
    // The warm-up generated a token, but no request was answered or counted.
    let metrics = common::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("/v1/chat/completions"), "{metrics}");
    for family in [
        "mmserve:prompt_tokens_total",
        "mmserve:generation_tokens_total",
        "mmserve:image_inputs_total",
        "mmserve:time_to_first_token_seconds_count",
    ] {
        for line in metrics.lines().filter(|l| l.starts_with(family)) {
            assert!(line.ends_with(" 0"), "the warm-up counted: {line}");
        }
    }
    let _ = std::fs::remove_file(&gate);
}

#[test]
fn a_failed_warm_up_exits_non_zero_and_says_why() {
    let args = args("warmup_hook = \"fail-forward\"\n");
    let out = common::binary::command()
        .arg("serve")
        .args(&args)
        .args(["--port", &common::binary::free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run mmserve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("the warm-up of `{MODEL}` failed")),
        "{stderr}"
    );
}
