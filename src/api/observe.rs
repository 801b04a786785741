//! What the HTTP layer records for operators: `GET /metrics`, the count of
//! answered requests by route and status, a request id and log span per
//! request, and the timings and token counts of each chat request
//! ([`ChatTimer`]). Nothing here logs a request's body.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::AppState;
use crate::metrics::{metrics, observe, ModelMetrics};
use crate::openai::response::Usage;

/// `GET /metrics`: the Prometheus text exposition format, load gauges read
/// from each loaded engine now.
pub async fn render(State(state): State<Arc<AppState>>) -> Response {
    let m = metrics();
    for slot in &state.models {
        if let Some(served) = slot.served.get() {
            m.set_load(&slot.name, &served.stats());
            for d in served.devices_stats() {
                m.set_device_load(&slot.name, &d.0, &d.1);
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// The header that carries a request's id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The client's request id if it is short printable ASCII, else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_string)
}

/// Runs every request in a span carrying its request id, logs its outcome,
/// returns the id in `x-request-id`, and counts the request by its route
/// (`other` for unknown paths, so that clients cannot grow the label set)
/// and status.
pub async fn per_request(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let id = request_id(&req);
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), endpoint);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_millis() as u64,
            "answered"
        )
    });
    metrics().request(&endpoint, status);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// Times one chat request from its arrival: first token, per-choice time
/// per output token, end to end; counts its tokens when it finishes.
pub struct ChatTimer {
    metrics: ModelMetrics,
    arrived: Instant,
    /// When each choice produced its first token.
    first: Vec<Option<Instant>>,
}

impl ChatTimer {
    pub fn new(metrics: ModelMetrics, arrived: Instant, choices: usize) -> Self {
        ChatTimer {
            metrics,
            arrived,
            first: vec![None; choices],
        }
    }

    /// Choice `i` produced a token.
    pub fn token(&mut self, i: usize) {
        let any_before = self.first.iter().any(Option::is_some);
        if let Some(first @ None) = self.first.get_mut(i) {
            let now = Instant::now();
            *first = Some(now);
            if !any_before {
                observe(&self.metrics.ttft, now - self.arrived);
            }
        }
    }

    /// Choice `i` finished after `completion_tokens` tokens.
    pub fn finished(&self, i: usize, completion_tokens: usize) {
        if let (Some(Some(first)), Some(gaps)) =
            (self.first.get(i), completion_tokens.checked_sub(1))
        {
            if gaps > 0 {
                let per = first.elapsed().as_secs_f64() / gaps as f64;
                self.metrics.tpot.observe(per);
            }
        }
    }

    /// Every choice finished with `usage`.
    pub fn done(&self, usage: &Usage) {
        observe(&self.metrics.e2e, self.arrived.elapsed());
        self.metrics
            .prompt_tokens
            .inc_by(usage.prompt_tokens as u64);
        self.metrics
            .generation_tokens
            .inc_by(usage.completion_tokens as u64);
    }
}
