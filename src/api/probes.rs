//! The orchestrator's probes. `/health` is liveness: 200 while the process and
//! every started engine thread run (loading and draining included), 503 once an
//! engine thread has died. `/ready` is readiness: 200 once every model has
//! loaded and finished its warm-up, 503 before that and while draining. Both
//! read shared flags only; neither waits for an engine thread.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::{AppState, ModelSlot};

/// Where a model stands in its start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Its weights are loading; requests for it get 503.
    Loading,
    /// Loaded and serving; its warm-up request is running.
    WarmingUp,
    /// Warmed up.
    Ready,
    /// Its engine thread has ended: it cannot serve again.
    Stopped,
}

impl ModelState {
    fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::WarmingUp => "warming_up",
            ModelState::Ready => "ready",
            ModelState::Stopped => "stopped",
        }
    }
}

impl ModelSlot {
    /// Where this model stands now.
    pub fn state(&self) -> ModelState {
        match self.served.get() {
            None => ModelState::Loading,
            Some(s) if !s.is_alive() => ModelState::Stopped,
            Some(_) if self.is_warm() => ModelState::Ready,
            Some(_) => ModelState::WarmingUp,
        }
    }
}

/// `GET /health`: each model's state and, once loaded, its engine's load; 503
/// only when an engine thread has died.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let mut models = Map::new();
    let mut dead = false;
    for m in &state.models {
        let s = m.state();
        dead |= s == ModelState::Stopped;
        let mut entry = json!({"state": s.as_str()});
        if let Some(served) = m.served.get() {
            let l = served.stats();
            entry = json!({
                "state": s.as_str(),
                "waiting": l.waiting,
                "running": l.running,
                "kv_cache_bytes": l.kv_cache_bytes,
                "kv_blocks_used": l.kv_blocks_used,
                "kv_blocks_total": l.kv_blocks_total,
                "kv_blocks_cached": l.kv_blocks_cached,
                "cancelled": l.cancelled,
                "preempted": l.preempted,
            });
        }
        models.insert(m.name.clone(), entry);
    }
    let (code, status) = if dead {
        (StatusCode::SERVICE_UNAVAILABLE, "engine_stopped")
    } else {
        (StatusCode::OK, "ok")
    };
    (code, Json(json!({"status": status, "models": models}))).into_response()
}

/// `GET /ready`: 200 when every model is warmed up and the server is not
/// draining; else 503 with `status` `not_ready` or `draining` and each model's state.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let models: Map<String, Value> = state
        .models
        .iter()
        .map(|m| (m.name.clone(), m.state().as_str().into()))
        .collect();
    let all_ready = state.models.iter().all(|m| m.state() == ModelState::Ready);
    let (code, status) = if state.lifecycle.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if all_ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (code, Json(json!({"status": status, "models": models}))).into_response()
}
