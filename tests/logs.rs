//! The real binary's JSON logs: the weights' size and load time at start-up; a
//! request's log line carries its request id (the client's `x-request-id`, or a
//! new one returned in that header) and never the prompt's text.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use serde_json::{json, Value};

const MODEL: &str = "llava-clip-llama";
const SECRET: &str = "zebra-umbrella-secret-prompt";

/// mmserve with `--log-format json` on a free port: the process, its URL and
/// its parsed stdout lines.
fn start() -> (Child, String, Receiver<Value>) {
    let mut child = common::binary::command()
        .args(["serve", "--port", "0", "--log-format", "json", "--model"])
        .arg(common::model_dir(MODEL))
        .env_remove("RUST_LOG")
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run mmserve");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    let addr = wait_for(&rx, |l| l["fields"]["addr"].is_string())["fields"]["addr"]
        .as_str()
        .unwrap()
        .to_string();
    (child, format!("http://{addr}"), rx)
}

/// The first log line that satisfies `ok` (a minute at most).
fn wait_for(rx: &Receiver<Value>, mut ok: impl FnMut(&Value) -> bool) -> Value {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no such log line");
        if ok(&line) {
            return line;
        }
    }
}

async fn chat(base: &str, id: Option<&str>) -> reqwest::Response {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": SECRET}],
        "max_tokens": 3,
    });
    let mut req = common::client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body);
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    req.send().await.expect("chat")
}

#[tokio::test]
async fn a_request_is_logged_with_its_id_and_without_its_prompt() {
    let (mut child, base, rx) = start();
    // Start-up progress: the weights' size before they load, the time after.
    let loading = wait_for(&rx, |l| l["fields"]["message"] == "loading weights");
    let weights = common::model_dir(MODEL).join("model.safetensors");
    let bytes = std::fs::metadata(weights).unwrap().len();
    assert_eq!(loading["fields"]["bytes"], bytes, "{loading}");
    assert_eq!(loading["fields"]["files"], 1, "{loading}");
    let loaded = wait_for(&rx, |l| l["fields"]["message"] == "weights loaded");
    assert!(loaded["fields"]["elapsed_ms"].is_u64(), "{loaded}");
    wait_for(&rx, |l| l["fields"]["message"] == "model loaded");

    let resp = chat(&base, Some("req-abc-123")).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-abc-123");
    let resp = chat(&base, None).await;
    assert_eq!(resp.status().as_u16(), 200);
    let fresh = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(fresh.len(), 32, "{fresh}");

    let mut seen = Vec::new();
    for id in ["req-abc-123", fresh.as_str()] {
        let line = wait_for(&rx, |l| {
            seen.push(l.to_string());
            l["span"]["request_id"] == id
        });
        assert_eq!(line["fields"]["status"], 200, "{line}");
        assert_eq!(line["span"]["endpoint"], "/v1/chat/completions", "{line}");
    }
    child.kill().unwrap();
    let _ = child.wait();
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(l.to_string());
    }
    assert!(seen.iter().all(|l| !l.contains(SECRET)), "{seen:?}");
}
