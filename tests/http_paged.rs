//! The paged KV cache and the chunking scheduler through real HTTP, for every
//! chat family, on a server squeezed on purpose: blocks of 4 positions, a step
//! budget of 24 tokens (every prompt is prefilled in chunks beside the others'
//! decodes, and most chunks cut an image's rows), and a pool of 256 positions,
//! too small for two long sequences at once (the newer is preempted and
//! recomputed). Outputs must not change, and the pool must be empty afterwards.

mod common;

use common::live::{finish_reason, idle, long_request, stats, wait_for_stats, OpenStream};
use common::{chat, content, expected_text, greedy, streamed_text};
use mmserve::config::Config;
use serde_json::Value;

const MODELS: [&str; 5] = common::CHAT_MODELS;

/// Bytes one position takes in every chat fixture: 2 layers x (k, v) x 2 kv heads x 16 x 4.
const TOKEN_BYTES: usize = 2 * 2 * 2 * 16 * 4;
const POOL_TOKENS: usize = 256;

fn squeezed() -> Config {
    let mut cfg = common::config(&MODELS);
    cfg.engine.block_size = 4;
    cfg.engine.max_batched_tokens = 24;
    cfg.engine.kv_cache_bytes = POOL_TOKENS * TOKEN_BYTES;
    cfg
}

/// After the load: nothing runs and every block is back in the pool (once the
/// engine has published the step that ended the last sequence: a client can
/// read its last event before that).
async fn assert_pool_empty(base: &str, model: &str) -> Value {
    let s = wait_for_stats(base, model, idle).await;
    assert_eq!(s["kv_blocks_total"], POOL_TOKENS / 4, "{model}: {s}");
    assert_eq!(
        (
            &s["kv_blocks_used"],
            &s["kv_cache_bytes"],
            &s["running"],
            &s["waiting"]
        ),
        (
            &Value::from(0),
            &Value::from(0),
            &Value::from(0),
            &Value::from(0)
        ),
        "{model}: {s}"
    );
    s
}

#[tokio::test]
async fn chunked_prefill_keeps_the_reference_outputs() {
    // Its own server: the pool figures are checked between loads.
    let base = &common::start(squeezed());
    for model in MODELS {
        let cases = common::served_cases(model);
        let reqs: Vec<Value> = cases
            .iter()
            .map(|c| greedy(model, common::messages(c), 20))
            .collect();
        // All at once: prompts are admitted as blocks free up and prefilled 24
        // tokens a step beside the decodes.
        let answers = futures::future::join_all(reqs.iter().map(|r| chat(base, r))).await;
        for (case, (status, body)) in cases.iter().zip(answers) {
            let name = case["name"].as_str().unwrap_or("?");
            assert_eq!(status, 200, "{model}/{name}: {body}");
            let (text, n, reason) = expected_text(model, case);
            assert_eq!(content(&body), text, "{model}/{name}");
            assert_eq!(body["choices"][0]["finish_reason"], reason);
            assert_eq!(body["usage"]["completion_tokens"], n, "{model}/{name}");
        }
        assert_pool_empty(base, model).await;
    }
}

#[tokio::test]
async fn a_preempted_stream_carries_on_unchanged() {
    // Its own server: the pool figures are checked between loads.
    let base = &common::start(squeezed());
    // Each alone fits the pool (a short prompt plus 200 tokens); two together
    // do not, so the newer is preempted once both have grown.
    let body = |stream| long_request("MODEL", 200, stream);
    for model in MODELS {
        let mut req = body(false);
        req["model"] = model.into();
        let alone = common::live::post(base, &req, &[]).await;
        let alone: Value = alone.json().await.expect("json");
        let want = content(&alone);
        let before = stats(base, model).await["preempted"].as_u64().unwrap_or(0);

        req["stream"] = true.into();
        let mut first = OpenStream::open(base, &req, &[]).await;
        first.until_text().await;
        let second = OpenStream::open(base, &req, &[]).await;
        let (a, b) = futures::future::join(first.all(), second.all()).await;
        for events in [&a, &b] {
            assert_eq!(finish_reason(events), "length", "{model}");
            assert_eq!(streamed_text(events, 0), want, "{model}");
        }
        let s = assert_pool_empty(base, model).await;
        let after = s["preempted"].as_u64().unwrap_or(0);
        assert!(after > before, "{model}: nothing was preempted: {s}");
    }
}

#[tokio::test]
async fn the_context_is_limited_to_what_the_pool_holds() {
    let base = &common::start(squeezed());
    let (status, models) = common::get(base, "/v1/models").await;
    assert_eq!(status, 200);
    for m in models["data"].as_array().expect("models") {
        assert_eq!(m["max_model_len"], POOL_TOKENS, "{m}");
    }
    let mut req = long_request(MODELS[0], POOL_TOKENS as u32, false);
    req["max_tokens"] = POOL_TOKENS.into();
    let (status, body) = chat(base, &req).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
}
