//! Helpers for tests that watch requests while they run: an SSE stream read
//! event by event, `/health` and its per-model engine figures.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The test-hook header (honoured with `[debug] test_hooks = true`).
pub const HOOK: &str = "x-mmserve-test-hook";

/// A long text-only request: `ignore_eos` keeps it generating to `max_tokens`.
pub fn long_request(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
           "ignore_eos": true,
           "messages": [{"role": "user", "content": "tell me a story"}]})
}

/// POSTs a chat request with extra headers.
pub async fn post(base: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = super::client()
        .post(format!("{base}/v1/chat/completions"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("request")
}

/// An SSE response read one `data:` event at a time.
pub struct OpenStream {
    resp: reqwest::Response,
    buf: String,
    /// Every event read so far.
    seen: Vec<Value>,
}

impl OpenStream {
    /// Opens a streaming request; the answer must be 200.
    pub async fn open(base: &str, body: &Value, headers: &[(&str, &str)]) -> Self {
        let resp = post(base, body, headers).await;
        assert_eq!(resp.status().as_u16(), 200);
        OpenStream {
            resp,
            buf: String::new(),
            seen: Vec::new(),
        }
    }

    /// The next event (`[DONE]` as the string "[DONE]"), None at the end.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..i + 2).collect();
                let data = event.trim().strip_prefix("data: ").expect("data event");
                let value = if data == "[DONE]" {
                    Value::String("[DONE]".into())
                } else {
                    serde_json::from_str(data).expect("event json")
                };
                self.seen.push(value.clone());
                return Some(value);
            }
            let chunk = self.resp.chunk().await.expect("read")?;
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    /// Reads until the first generated text: the request is then running.
    pub async fn until_text(&mut self) {
        while let Some(e) = self.next().await {
            if e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                return;
            }
        }
        panic!("the stream ended before any text");
    }

    /// Every event of the stream, from the first, once it has ended.
    pub async fn all(mut self) -> Vec<Value> {
        while self.next().await.is_some() {}
        self.seen
    }
}

/// A stream's events end with a `finish_reason` chunk and `[DONE]`; returns
/// the finish reason.
pub fn finish_reason(events: &[Value]) -> String {
    assert_eq!(events.last(), Some(&json!("[DONE]")), "{events:?}");
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "{events:?}"
    );
    events
        .iter()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str())
        .expect("a finish_reason chunk")
        .to_string()
}

/// `GET /health`: status and body.
pub async fn health(base: &str) -> (u16, Value) {
    let resp = super::client()
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("health json"))
}

/// One model's engine figures from `/health`.
pub async fn stats(base: &str, model: &str) -> Value {
    let (status, body) = health(base).await;
    assert_eq!(status, 200, "{body}");
    body["models"][model].clone()
}

/// Polls `/health` until `model`'s figures satisfy `ok` (a minute at most).
pub async fn wait_for_stats(base: &str, model: &str, ok: impl Fn(&Value) -> bool) -> Value {
    poll(|| stats(base, model), ok).await
}

/// Reads `read` every 20 ms until its value satisfies `ok`; fails after a minute.
pub async fn poll<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    mut read: impl FnMut() -> F,
    ok: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = read().await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never settled: {v:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when nothing waits or runs and the KV cache is empty.
pub fn idle(s: &Value) -> bool {
    s["waiting"] == 0 && s["running"] == 0 && s["kv_cache_bytes"] == 0
}
