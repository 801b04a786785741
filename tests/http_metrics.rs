//! `GET /metrics` through real HTTP: after a few chat and embedding requests
//! the counters moved by exactly what the responses report and the histograms
//! have observations; a client that leaves moves the cancellation counter. The
//! registry is process-wide, so this binary runs one test against one server.

mod common;

use common::live::{idle, long_request, wait_for_stats, OpenStream};
use common::scrape::{moved, sample, scrape};
use serde_json::{json, Value};

const MODEL: &str = "llava-clip-llama";
const EMBED: &str = "clip-tiny";

fn request(content: Value, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

#[tokio::test]
async fn counters_and_histograms_move_with_requests() {
    let base = common::start(common::config(&[MODEL, EMBED]));
    let before = scrape(&base).await;

    let with_image = json!([
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": common::data_url("cat.jpg")}},
    ]);
    let mut usages = Vec::new();
    for body in [
        request(json!("Hello there"), 5, false),
        request(with_image, 4, false),
    ] {
        let (status, v) = common::chat(&base, &body).await;
        assert_eq!(status, 200, "{v}");
        usages.push(v["usage"].clone());
    }
    let events = common::chat_stream(&base, &request(json!("Say more"), 6, true)).await;
    let usage = events
        .iter()
        .find(|e| e["usage"].is_object())
        .expect("usage chunk");
    usages.push(usage["usage"].clone());
    let (status, _) = common::get(&base, "/v1/no-such-route").await;
    assert_eq!(status, 404);
    let embedded = common::client()
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"model": EMBED, "input": ["a red square", "two blue circles"]}))
        .send()
        .await
        .expect("embeddings");
    assert_eq!(embedded.status().as_u16(), 200);
    let embedded: Value = embedded.json().await.expect("embeddings JSON");
    let embed_tokens = embedded["usage"]["prompt_tokens"].as_f64().unwrap();

    let after = scrape(&base).await;
    let m = [("model_name", MODEL)];
    let total = |key: &str| -> f64 { usages.iter().map(|u| u[key].as_f64().unwrap()).sum() };
    let chat_200 = [("endpoint", "/v1/chat/completions"), ("status", "200")];
    assert_eq!(
        moved(&before, &after, "mmserve:http_requests_total", &chat_200),
        3.0
    );
    let other_404 = [("endpoint", "other"), ("status", "404")];
    assert_eq!(
        moved(&before, &after, "mmserve:http_requests_total", &other_404),
        1.0
    );
    assert!(total("prompt_tokens") > 0.0 && total("completion_tokens") > 0.0);
    assert_eq!(
        moved(&before, &after, "mmserve:prompt_tokens_total", &m),
        total("prompt_tokens")
    );
    assert_eq!(
        moved(&before, &after, "mmserve:generation_tokens_total", &m),
        total("completion_tokens")
    );
    assert_eq!(
        moved(&before, &after, "mmserve:image_inputs_total", &m),
        1.0
    );
    let e = [("model_name", EMBED)];
    assert!(embed_tokens > 0.0);
    assert_eq!(
        moved(&before, &after, "mmserve:prompt_tokens_total", &e),
        embed_tokens
    );
    for h in [
        "mmserve:time_to_first_token_seconds",
        "mmserve:e2e_request_latency_seconds",
        "mmserve:request_queue_time_seconds",
    ] {
        let count = format!("{h}_count");
        assert_eq!(moved(&before, &after, &count, &m), 3.0, "{h}");
        assert!(moved(&before, &after, &format!("{h}_sum"), &m) > 0.0, "{h}");
    }
    let vision = "mmserve:vision_encoder_time_seconds_count";
    assert_eq!(moved(&before, &after, vision, &m), 1.0);
    let misses = "mmserve:image_cache_misses_total";
    assert_eq!(moved(&before, &after, misses, &m), 1.0);
    let steps = moved(&before, &after, "mmserve:batch_size_count", &m);
    // At least one step per generated token, since requests ran one by one.
    assert!(steps >= total("completion_tokens"), "{steps} steps");
    let multi = usages
        .iter()
        .filter(|u| u["completion_tokens"].as_u64() > Some(1));
    let tpot = "mmserve:time_per_output_token_seconds_count";
    assert_eq!(moved(&before, &after, tpot, &m), multi.count() as f64);
    for gauge in [
        "mmserve:num_requests_running",
        "mmserve:num_requests_waiting",
    ] {
        assert!(
            after.contains(&format!("{gauge}{{model_name=\"{MODEL}\"}} 0")),
            "{gauge}"
        );
    }
    let blocks = sample(&after, "mmserve:kv_cache_blocks_total", &m);
    assert!(blocks > 0.0, "{blocks} KV blocks");
    assert_eq!(sample(&after, "mmserve:kv_cache_blocks_used", &m), 0.0);

    // Cancellations and preemptions are counters; a client that leaves counts once.
    for family in [
        "mmserve:num_requests_cancelled_total",
        "mmserve:num_preemptions_total",
    ] {
        assert!(
            after.contains(&format!("# TYPE {family} counter")),
            "{family}"
        );
    }
    // 400 tokens: longer than it takes to drop the stream, within the model's 512 positions.
    let mut stream = OpenStream::open(&base, &long_request(MODEL, 400, true), &[]).await;
    stream.until_text().await;
    drop(stream);
    wait_for_stats(&base, MODEL, |s| idle(s) && s["cancelled"] == 1).await;
    let end = scrape(&base).await;
    let cancelled = "mmserve:num_requests_cancelled_total";
    assert_eq!(moved(&after, &end, cancelled, &m), 1.0);
}
