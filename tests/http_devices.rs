//! The engine pool through HTTP: chat models on two CPU engines (`engine.devices = ["cpu",
//! "cpu"]`, as `--devices cuda:0,cuda:1` is on two GPUs). A request goes to the least-loaded
//! engine, every engine gives the reference outputs, and `/v1/models` and `/metrics` show each
//! engine's load.

mod common;

use common::live::{long_request, poll, OpenStream, HOOK};
use common::{chat, content, expected_text, greedy};
use mmserve::config::Config;
use serde_json::Value;

const MODELS: [&str; 2] = ["llava-clip-llama", "qwen2-vl-tiny"];

fn two_engines() -> Config {
    let mut cfg = common::config(&MODELS);
    cfg.engine.devices = vec!["cpu".into(), "cpu".into()];
    cfg.debug.test_hooks = true;
    cfg
}

/// `model`'s engines as `/v1/models` lists them.
async fn engines(base: &str, model: &str) -> Vec<Value> {
    let (status, list) = common::get(base, "/v1/models").await;
    assert_eq!(status, 200, "{list}");
    let card = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == model))
        .unwrap_or_else(|| panic!("{model} not in {list}"));
    card["devices"].as_array().cloned().unwrap_or_default()
}

/// Polls `/v1/models` until `model`'s engines satisfy `ok` (a minute at most).
async fn wait_for(base: &str, model: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    poll(|| engines(base, model), |e| ok(e)).await
}

/// Each forward of a request with this hook sleeps 20 ms: 400 tokens keep it running for
/// about 8 s whatever the machine, long enough to watch.
const SLOW: &[(&str, &str)] = &[(HOOK, "slow-forward")];

fn held(model: &str) -> Value {
    long_request(model, 400, true)
}

fn running(e: &[Value]) -> Vec<u64> {
    e.iter()
        .map(|d| d["running"].as_u64().unwrap_or(99))
        .collect()
}

#[tokio::test]
async fn requests_spread_over_the_engines_and_keep_the_reference_outputs() {
    let base = &common::start(two_engines());
    for model in MODELS {
        let e = engines(base, model).await;
        let names: Vec<&str> = e.iter().filter_map(|d| d["device"].as_str()).collect();
        assert_eq!(names, ["cpu", "cpu#1"], "{model}");

        // The first request takes the first (idle) engine...
        let mut first = OpenStream::open(base, &held(model), SLOW).await;
        first.until_text().await;
        wait_for(base, model, |e| running(e) == [1, 0]).await;
        // ...so these go to the second, and must be exact there too.
        for case in common::served_cases(model) {
            let name = case["name"].as_str().unwrap_or("?");
            let (status, body) = chat(base, &greedy(model, common::messages(&case), 20)).await;
            assert_eq!(status, 200, "{model}/{name}: {body}");
            let (text, n, _) = expected_text(model, &case);
            assert_eq!(content(&body), text, "{model}/{name}");
            assert_eq!(body["usage"]["completion_tokens"], n, "{model}/{name}");
        }
        // A second long request joins the idle engine, not the busy one.
        let mut second = OpenStream::open(base, &held(model), SLOW).await;
        second.until_text().await;
        wait_for(base, model, |e| running(e) == [1, 1]).await;

        let metrics = common::client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let line = format!(
            "mmserve:engine_num_requests{{device=\"cpu#1\",model_name=\"{model}\",state=\"running\"}} 1"
        );
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");

        // Gone clients free both engines.
        drop((first, second));
        wait_for(base, model, |e| {
            e.iter()
                .all(|d| d["running"] == 0 && d["waiting"] == 0 && d["kv_blocks_used"] == 0)
        })
        .await;
    }
}
