//! What the HTTP layer records for operators: `GET /metrics`, the count of
//! answered requests by route and status, and the timings and token counts
//! of each chat request ([`ChatTimer`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

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

/// Counts every answered request by its route (`other` for unknown paths,
/// so that clients cannot grow the label set) and status.
pub async fn count_requests(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let resp = next.run(req).await;
    metrics().request(&endpoint, resp.status().as_u16());
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
