//! The HTTP surface: routes, shared state, and the handlers that speak the
//! OpenAI protocol. Handlers validate on a blocking thread, submit to the
//! engine, and turn engine events into JSON or SSE.

mod chat;
pub mod error;
mod json;
mod stream;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::engine::EngineHandle;
use crate::openai::response::{ModelCard, ModelList};
use crate::text::TokenTable;
use crate::validate::Validator;
use error::ApiError;

/// A loaded model, ready to serve.
pub struct Serving {
    pub validator: Arc<Validator>,
    pub engine: EngineHandle,
    /// Token bytes and strings for logprobs.
    pub tokens: Arc<TokenTable>,
}

/// State shared by all handlers.
pub struct AppState {
    /// The name clients put in `model`.
    pub model_name: String,
    /// Set once the model has loaded; until then requests get 503.
    pub serving: OnceLock<Serving>,
    /// Unix time the server started, reported as the model's `created`.
    pub created: u64,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl AppState {
    pub fn new(model_name: String, max_body_bytes: usize) -> Self {
        AppState {
            model_name,
            serving: OnceLock::new(),
            created: unix_now(),
            max_body_bytes,
        }
    }

    fn serving(&self) -> Result<&Serving, ApiError> {
        self.serving
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading".into()))
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name {
            return Ok(());
        }
        Err(ApiError::not_found(
            "model_not_found",
            format!(
                "The model `{model}` does not exist. Available models: {}",
                self.model_name
            ),
        )
        .with_param(Some("model".into())))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The application's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let serving = state.serving()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "mmserve",
            max_model_len: serving.validator.max_context,
        }],
    }))
}

/// 200 when the engine thread answers; 503 while loading or once it died.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let Some(serving) = state.serving.get() else {
        return ApiError::unavailable("the model is still loading".into()).into_response();
    };
    let ping = tokio::time::timeout(Duration::from_secs(10), serving.engine.ping());
    match ping.await {
        Ok(true) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        _ => ApiError::unavailable("the engine is not answering".into()).into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "method not allowed on this route".into(),
    )
}
