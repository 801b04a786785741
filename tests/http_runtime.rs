//! Runtime robustness through real HTTP: the bounded queue (429 with
//! `Retry-After`), deadlines, cancellation of clients that go away, and fault
//! isolation (a failing request fails alone; a dead engine turns `/health` 503).
//! Long requests set `ignore_eos` so they run to `max_tokens`.

mod common;

use std::time::{Duration, Instant};

use common::live::{
    finish_reason, health, idle, long_request, post, stats, wait_for_stats, OpenStream, HOOK,
};
use mmserve::config::Config;
use serde_json::{json, Value};

const MODEL: &str = "qwen2-vl-tiny";

/// A server with test hooks on, `seats` sequences per step and `queue` waiting places.
fn hooked(seats: usize, queue: usize) -> Config {
    let mut cfg = common::config(&[MODEL]);
    cfg.engine.max_num_seqs = seats;
    cfg.engine.max_waiting = queue;
    cfg.debug.test_hooks = true;
    cfg
}

async fn error_of(resp: reqwest::Response, status: u16, code: &str) -> reqwest::header::HeaderMap {
    assert_eq!(resp.status().as_u16(), status);
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.expect("error json");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    headers
}

#[tokio::test]
async fn a_full_queue_is_429_and_clients_that_leave_free_their_places() {
    let base = common::start(hooked(1, 1));
    let mut running = OpenStream::open(&base, &long_request(MODEL, 4000, true), &[]).await;
    running.until_text().await;
    let waiting = OpenStream::open(&base, &long_request(MODEL, 8, true), &[]).await;
    let s = stats(&base, MODEL).await;
    assert_eq!(
        (s["running"].clone(), s["waiting"].clone()),
        (json!(1), json!(1))
    );

    let resp = post(&base, &long_request(MODEL, 8, false), &[]).await;
    let headers = error_of(resp, 429, "queue_full").await;
    assert_eq!(headers["retry-after"], "1");

    // One client generating and one waiting hang up: both sequences go, with
    // their KV memory.
    drop(running);
    drop(waiting);
    let s = wait_for_stats(&base, MODEL, |s| idle(s) && s["cancelled"] == 2).await;
    assert_eq!(s["cancelled"], 2, "{s}");
    let (status, body) = common::chat(&base, &long_request(MODEL, 8, false)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_non_streaming_client_that_leaves_is_cancelled() {
    let base = common::start(hooked(16, 16));
    let url = base.clone();
    let request =
        tokio::spawn(async move { post(&url, &long_request(MODEL, 4000, false), &[]).await });
    wait_for_stats(&base, MODEL, |s| s["running"] == 1).await;
    request.abort();
    let s = wait_for_stats(&base, MODEL, |s| idle(s) && s["cancelled"] == 1).await;
    assert_eq!(s["cancelled"], 1, "{s}");
}

#[tokio::test]
async fn deadlines_end_requests_with_a_clear_answer() {
    let base = common::start(hooked(1, 4));
    // Still waiting at its deadline: 503 queue_timeout.
    let mut running = OpenStream::open(&base, &long_request(MODEL, 4000, true), &[]).await;
    running.until_text().await;
    let resp = post(
        &base,
        &long_request(MODEL, 8, false),
        &[("x-request-timeout", "0.2")],
    )
    .await;
    let headers = error_of(resp, 503, "queue_timeout").await;
    assert_eq!(headers["retry-after"], "1");
    drop(running);
    wait_for_stats(&base, MODEL, idle).await;

    // Generating at its deadline: the text so far, finish_reason "length".
    let resp = post(
        &base,
        &long_request(MODEL, 4000, false),
        &[("x-request-timeout", "0.5")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    let n = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 4000, "{n} tokens");
    assert!(!common::content(&body).is_empty());

    let resp = post(
        &base,
        &long_request(MODEL, 8, false),
        &[("x-request-timeout", "soon")],
    )
    .await;
    error_of(resp, 400, "invalid_request_timeout").await;
}

fn story(prompt: &str, stream: bool) -> Value {
    json!({"model": MODEL, "max_tokens": 1500, "temperature": 0, "stream": stream,
           "ignore_eos": true, "messages": [{"role": "user", "content": prompt}]})
}

#[tokio::test]
async fn a_failing_request_fails_alone_and_the_engine_keeps_serving() {
    let base = common::start(hooked(16, 16));
    let prompts = ["tell me a story", "hello", "x"];
    let mut alone = Vec::new();
    for p in prompts {
        let resp = post(&base, &story(p, false), &[]).await;
        let body: Value = resp.json().await.unwrap();
        alone.push(common::content(&body));
    }
    let mut streams = Vec::new();
    for p in prompts {
        let mut s = OpenStream::open(&base, &story(p, true), &[]).await;
        s.until_text().await;
        streams.push(s);
    }
    // Joining the running batch: a panic in the forward is a 500 for it alone.
    let resp = post(&base, &story("boom", false), &[(HOOK, "panic-forward")]).await;
    error_of(resp, 500, "internal_error").await;
    // An error after the stream started: an error event, then [DONE].
    let events = OpenStream::open(&base, &story("boom", true), &[(HOOK, "fail-forward")])
        .await
        .all()
        .await;
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(
        events[n - 2]["error"]["code"],
        "internal_error",
        "{events:?}"
    );
    assert_eq!(events[n - 1], "[DONE]");
    // A panic while preparing a request is a 500 too.
    let resp = post(&base, &story("boom", false), &[(HOOK, "panic-validation")]).await;
    error_of(resp, 500, "internal_error").await;

    // The batch the faults joined went on, token for token as alone.
    for (s, want) in streams.into_iter().zip(alone) {
        let events = s.all().await;
        assert_eq!(finish_reason(&events), "length");
        let text = common::streamed_text(&events, 0);
        assert_eq!(text, want);
    }
    let (status, body) = common::chat(&base, &long_request(MODEL, 8, false)).await;
    assert_eq!(status, 200, "{body}");
    wait_for_stats(&base, MODEL, idle).await;
}

#[tokio::test]
async fn a_dead_engine_turns_health_503() {
    let base = common::start(hooked(16, 16));
    assert_eq!(health(&base).await.0, 200);
    let resp = post(
        &base,
        &long_request(MODEL, 8, false),
        &[(HOOK, "kill-engine")],
    )
    .await;
    error_of(resp, 503, "service_unavailable").await;
    // The thread's end is seen once it has unwound, just after its channels closed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = health(&base).await;
        if status == 503 {
            assert_eq!(body["status"], "engine_stopped", "{body}");
            assert_eq!(body["models"][MODEL]["state"], "stopped", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = post(&base, &long_request(MODEL, 8, false), &[]).await;
    error_of(resp, 503, "service_unavailable").await;
}

#[tokio::test]
async fn test_hooks_are_ignored_unless_configured() {
    let base = common::start(common::config(&[MODEL]));
    let resp = post(
        &base,
        &long_request(MODEL, 4, false),
        &[(HOOK, "kill-engine")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(health(&base).await.0, 200);
}
