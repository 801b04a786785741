//! Automatic prefix caching through real HTTP, for every chat family, in blocks of 4 positions:
//! a request sharing a prefix with an earlier one (a long system prompt; the same image)
//! answers exactly as a server without the cache and as the recorded references, the hit
//! counter moves by the tokens reused, a repeated image skips the vision encoder, and a pool
//! too small to keep everything evicts the oldest prefix and still answers right. Afterwards no
//! block is in use. The metrics registry is process-wide, so this binary runs one test.

mod common;

use common::live::wait_for_stats;
use common::scrape::{moved, scrape};
use common::{chat, content, expected_text, greedy};
use mmserve::config::Config;
use serde_json::{json, Value};

const MODELS: [&str; 5] = common::CHAT_MODELS;
const BLOCK: u64 = 4;
/// Bytes one position takes in every chat fixture: 2 layers x (k, v) x 2 kv heads x 16 x 4.
const TOKEN_BYTES: usize = 2 * 2 * 2 * 16 * 4;

const SYSTEM: &str = "You are a careful assistant for a small bicycle shop. Answer in one short \
    sentence, name the part you mean, never invent prices, and ask which frame size the \
    customer rides when the question depends on it.";

fn config(caching: bool, pool_tokens: usize) -> Config {
    let mut cfg = common::config(&MODELS);
    cfg.engine.block_size = BLOCK as usize;
    cfg.engine.kv_cache_bytes = pool_tokens * TOKEN_BYTES;
    cfg.engine.enable_prefix_caching = caching;
    cfg
}

/// The servers of the test: with the cache, without it (the reference), and with the cache in
/// a pool of 64 blocks.
struct Servers {
    cached: String,
    plain: String,
    tiny: String,
}

/// Text and prompt tokens of a greedy answer.
async fn answer(base: &str, body: &Value) -> (String, u64) {
    let (status, v) = chat(base, body).await;
    assert_eq!(status, 200, "{v}");
    (
        content(&v),
        v["usage"]["prompt_tokens"].as_u64().expect("usage"),
    )
}

/// Sends `body` to the cached server: its text, prompt tokens, and how far the prefix-cache
/// queries, hits and vision-encoder passes moved for `model`.
async fn measured(base: &str, model: &str, body: &Value) -> (String, u64, [f64; 3]) {
    let before = scrape(base).await;
    let (text, prompt) = answer(base, body).await;
    let after = scrape(base).await;
    let m = [("model_name", model)];
    let delta = |name: &str| moved(&before, &after, name, &m);
    let moves = [
        delta("mmserve:prefix_cache_queries_total"),
        delta("mmserve:prefix_cache_hits_total"),
        delta("mmserve:vision_encoder_time_seconds_count"),
    ];
    (text, prompt, moves)
}

/// Tokens a repeated prompt of `prompt` tokens reuses: its full blocks, short of the last token.
fn full_hit(prompt: u64) -> f64 {
    ((prompt - 1) / BLOCK * BLOCK) as f64
}

fn with_system(model: &str, question: &str) -> Value {
    let messages = json!([{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": question}]);
    greedy(model, messages, 8)
}

fn with_image(model: &str, question: &str) -> Value {
    let messages = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": common::data_url("cat.jpg")}},
        {"type": "text", "text": question},
    ]}]);
    greedy(model, messages, 8)
}

/// A second question under the same system prompt reuses it.
async fn system_prompt(s: &Servers, model: &str) {
    let first = with_system(model, "Which tyre fits a city bike?");
    let second = with_system(model, "Do you sell bells?");
    let (text, _, _) = measured(&s.cached, model, &first).await;
    assert_eq!(text, answer(&s.plain, &first).await.0, "{model}");
    let (text, prompt, [queries, hits, _]) = measured(&s.cached, model, &second).await;
    assert_eq!(text, answer(&s.plain, &second).await.0, "{model}");
    assert_eq!(queries, prompt as f64, "{model}");
    // The system prompt and the template around it, not the new question.
    assert!(
        hits >= prompt as f64 / 2.0 && hits < full_hit(prompt),
        "{model}: {hits}/{prompt}"
    );
    assert_eq!(hits % BLOCK as f64, 0.0, "{model}");
}

/// The same image: a repeated request skips the encoder; another question about it reuses
/// the image's blocks.
async fn image(s: &Servers, model: &str) {
    let case = common::served_cases(model)
        .into_iter()
        .find(|c| c["messages"].to_string().contains("image_url"))
        .expect("an image case");
    let body = greedy(model, common::messages(&case), 20);
    let (want, _, _) = expected_text(model, &case);
    let (text, _, [.., encoded]) = measured(&s.cached, model, &body).await;
    assert_eq!((text.as_str(), encoded), (want.as_str(), 1.0), "{model}");
    let (text, prompt, [_, hits, encoded]) = measured(&s.cached, model, &body).await;
    assert_eq!(text, want, "{model}: repeated");
    assert_eq!(
        (hits, encoded),
        (full_hit(prompt), 0.0),
        "{model}: repeated"
    );

    let first = with_image(model, "What animal is this?");
    let second = with_image(model, "What colour is it?");
    measured(&s.cached, model, &first).await;
    let (text, prompt, [_, hits, _]) = measured(&s.cached, model, &second).await;
    assert_eq!(text, answer(&s.plain, &second).await.0, "{model}");
    assert!(
        hits > 0.0 && hits < full_hit(prompt),
        "{model}: {hits}/{prompt}"
    );
}

/// In a 64-block pool, six other prompts evict the first one's blocks (the oldest released);
/// it is then recomputed, with the same answer.
async fn eviction(s: &Servers, model: &str) {
    let ask = |i: usize| {
        let topic = format!("Story {i}: ") + &"a long winding road past the mill ".repeat(6);
        greedy(model, json!([{"role": "user", "content": topic}]), 4)
    };
    let (first, prompt, _) = measured(&s.tiny, model, &ask(0)).await;
    for i in 1..=6 {
        let (text, _, _) = measured(&s.tiny, model, &ask(i)).await;
        assert_eq!(text, answer(&s.plain, &ask(i)).await.0, "{model}: {i}");
    }
    let (again, _, [_, hits, _]) = measured(&s.tiny, model, &ask(0)).await;
    assert_eq!(again, first, "{model}");
    assert!(hits < full_hit(prompt), "{model}: nothing was evicted");
}

/// Nothing runs and no block is held once the engine has finished its step (the answer reaches
/// the client from inside the step that frees its blocks, so `/health` may lag it by a moment);
/// some blocks stay cached.
async fn assert_released(base: &str, model: &str) {
    let s = wait_for_stats(base, model, |s| {
        (&s["kv_blocks_used"], &s["kv_cache_bytes"], &s["running"])
            == (&Value::from(0), &Value::from(0), &Value::from(0))
    })
    .await;
    assert!(s["kv_blocks_cached"].as_u64() > Some(0), "{model}: {s}");
}

#[tokio::test]
async fn shared_prefixes_are_reused_and_answers_do_not_change() {
    let s = Servers {
        cached: common::start(config(true, 1 << 14)),
        plain: common::start(config(false, 1 << 14)),
        tiny: common::start(config(true, 64 * BLOCK as usize)),
    };
    for model in MODELS {
        system_prompt(&s, model).await;
        image(&s, model).await;
        eviction(&s, model).await;
        assert_released(&s.cached, model).await;
        assert_released(&s.tiny, model).await;
    }
}
