//! The real binary's end of life: SIGTERM during ten streams lets them finish
//! while new requests get 503, then exits 0; a dead engine thread makes the
//! process exit non-zero so an orchestrator restarts it.
#![cfg(unix)]

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::live::{finish_reason, health, long_request, post, OpenStream, HOOK};

const MODEL: &str = "qwen2-vl-tiny";

/// mmserve on a free port with test hooks, once healthy.
async fn start() -> common::binary::Served {
    let dir = std::env::temp_dir().join(format!("mmserve-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("{:?}.toml", std::thread::current().id()));
    let toml = "[server]\ndrain_timeout_secs = 120\n[debug]\ntest_hooks = true\n";
    std::fs::write(&config, toml).unwrap();
    let model = common::model_dir(MODEL);
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ];
    common::binary::start(&args, Duration::from_secs(60)).await
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
    signal(&served.child, "-TERM");
    // Draining: /health and new requests answer 503.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = health(&base).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "server_shutting_down", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never started draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
