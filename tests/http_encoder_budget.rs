//! The encoder budget (`[engine] max_encoder_tokens`) through real HTTP, for every chat family.
//! On the CPU its automatic value lets one request's images through the vision encoder per
//! step: a burst of image requests is encoded one request at a time (the vision-encoder
//! histogram counts one run per request, however the requests arrived), and every answer is the
//! one the request gets with a budget that batches them. The choices of one request share
//! their image: `n = 2` is still one encoder run.

mod common;

use common::scrape::{moved, scrape};
use futures::future::join_all;
use serde_json::{json, Value};

const ENCODES: &str = "mmserve:vision_encoder_time_seconds_count";
/// Distinct images, so that the image cache cannot answer one request from another.
const IMAGES: [&str; 3] = ["cat_landscape.png", "bike_portrait.png", "cat.jpg"];

/// Every chat fixture with the prefix cache off (its hits would skip the encoder) and the
/// encoder budget `max_encoder_tokens` (0: automatic).
fn server(max_encoder_tokens: usize) -> String {
    let mut cfg = common::config(&common::CHAT_MODELS);
    cfg.engine.enable_prefix_caching = false;
    cfg.engine.max_encoder_tokens = max_encoder_tokens;
    common::start(cfg)
}

fn ask(model: &str, image: &str, n: u32) -> Value {
    json!({
        "model": model, "temperature": 0, "max_tokens": 6, "n": n,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in the picture?"},
            {"type": "image_url", "image_url": {"url": common::data_url(image)}},
        ]}],
    })
}

/// Sends every image's request at once; returns each answer's choice texts, in order.
async fn burst(base: &str, model: &str) -> Vec<Vec<String>> {
    let bodies: Vec<Value> = IMAGES.iter().map(|i| ask(model, i, 1)).collect();
    let answers = join_all(bodies.iter().map(|b| common::chat(base, b))).await;
    answers
        .into_iter()
        .map(|(status, v)| {
            assert_eq!(status, 200, "{model}: {v}");
            texts(&v)
        })
        .collect()
}

fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            c["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn image_requests_are_encoded_one_request_a_step_on_the_cpu() {
    let batching = server(1 << 20);
    let one_at_a_time = server(0);
    for model in common::CHAT_MODELS {
        let m = [("model_name", model)];
        let want = burst(&batching, model).await;

        let before = scrape(&one_at_a_time).await;
        let got = burst(&one_at_a_time, model).await;
        assert_eq!(got, want, "{model}: the budget changed an answer");
        let runs = moved(&before, &scrape(&one_at_a_time).await, ENCODES, &m);
        assert_eq!(
            runs,
            IMAGES.len() as f64,
            "{model}: one encoder run per request"
        );

        // Two choices of a request with a new image: one run, both admitted together.
        let before = scrape(&one_at_a_time).await;
        let (status, v) = common::chat(&one_at_a_time, &ask(model, "bike.jpg", 2)).await;
        assert_eq!(status, 200, "{model}: {v}");
        let both = texts(&v);
        assert_eq!(both[0], both[1], "{model}: greedy choices differ");
        let runs = moved(&before, &scrape(&one_at_a_time).await, ENCODES, &m);
        assert_eq!(runs, 1.0, "{model}: the choices share one encoder run");
    }
}
