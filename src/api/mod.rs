//! The HTTP surface: routes, shared state, and the handlers that speak the
//! OpenAI protocol. Handlers validate on a blocking thread, submit to the
//! engine, and turn engine events into JSON or SSE.

mod chat;
mod embeddings;
pub mod error;
mod guard;
mod json;
pub mod lifecycle;
mod observe;
mod playground;
pub mod probes;
mod stream;
pub mod warmup;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::config::{ModelKind, ServerConfig};
use crate::engine::embed::EmbedHandle;
use crate::engine::{EnginePool, EngineStats};
use crate::metrics::ModelMetrics;
use crate::openai::excerpt;
use crate::openai::response::{DeviceLoad, ModelCard, ModelList};
use crate::text::TokenTable;
use crate::validate::embed::EmbedValidator;
use crate::validate::Validator;
use error::ApiError;
use lifecycle::Lifecycle;

/// A loaded chat model, ready to serve.
pub struct ChatServing {
    pub validator: Arc<Validator>,
    /// Its engines, one per device.
    pub engine: EnginePool,
    /// Token bytes and strings for logprobs.
    pub tokens: Arc<TokenTable>,
    /// Deadline of every request (queue and generation), if any.
    pub request_timeout: Option<Duration>,
    /// Whether the `x-mmserve-test-hook` header is honoured (tests only).
    pub test_hooks: bool,
    /// Where its requests' timings and token counts go.
    pub metrics: ModelMetrics,
}

/// A loaded embedding model, ready to serve.
pub struct EmbedServing {
    pub validator: Arc<EmbedValidator>,
    pub engine: EmbedHandle,
    /// Where its requests' prompt tokens are counted.
    pub metrics: ModelMetrics,
    /// The device its engine runs on.
    pub device: String,
}

/// A model once loaded.
pub enum Served {
    Chat(ChatServing),
    Embed(EmbedServing),
}

impl Served {
    fn max_model_len(&self) -> usize {
        match self {
            Served::Chat(c) => c.validator.max_context,
            Served::Embed(e) => e.validator.max_text_len,
        }
    }

    /// False once its engine thread has ended.
    fn is_alive(&self) -> bool {
        match self {
            Served::Chat(c) => c.engine.is_alive(),
            Served::Embed(e) => e.engine.is_alive(),
        }
    }

    /// Each engine's device and load (one engine for an embedding model).
    pub fn devices_stats(&self) -> Vec<(String, EngineStats)> {
        match self {
            Served::Chat(c) => c.engine.per_device(),
            Served::Embed(e) => vec![(e.device.clone(), e.engine.stats())],
        }
    }

    /// [`Self::devices_stats`] as `/v1/models` shows them.
    fn devices(&self) -> Vec<DeviceLoad> {
        self.devices_stats()
            .into_iter()
            .map(|(device, s)| DeviceLoad {
                device,
                waiting: s.waiting,
                running: s.running,
                kv_blocks_used: s.kv_blocks_used,
                kv_blocks_total: s.kv_blocks_total,
            })
            .collect()
    }

    /// The engine's load, read without waiting for its thread.
    pub fn stats(&self) -> EngineStats {
        match self {
            Served::Chat(c) => c.engine.stats(),
            Served::Embed(e) => e.engine.stats(),
        }
    }
}

/// One configured model: known by name and kind from start-up, served once loaded.
pub struct ModelSlot {
    pub name: String,
    pub kind: ModelKind,
    /// Set once the model has loaded; until then its requests get 503.
    pub served: OnceLock<Served>,
    /// Set once its warm-up request has finished; `/ready` waits for it.
    warm: AtomicBool,
}

impl ModelSlot {
    fn is_warm(&self) -> bool {
        self.warm.load(Ordering::SeqCst)
    }
}

/// State shared by all handlers.
pub struct AppState {
    pub models: Vec<ModelSlot>,
    /// Unix time the server started, reported as the models' `created`.
    pub created: u64,
    /// Request size limits.
    pub server: ServerConfig,
    /// Draining and the requests in flight.
    pub lifecycle: Arc<Lifecycle>,
}

impl AppState {
    pub fn new(models: Vec<(String, ModelKind)>, server: &ServerConfig) -> Self {
        AppState {
            models: models
                .into_iter()
                .map(|(name, kind)| ModelSlot {
                    name,
                    kind,
                    served: OnceLock::new(),
                    warm: AtomicBool::new(false),
                })
                .collect(),
            created: unix_now(),
            server: server.clone(),
            lifecycle: Arc::default(),
        }
    }

    /// Makes a loaded model servable; false if `name` is unknown or already set.
    pub fn install(&self, name: &str, served: Served) -> bool {
        self.models
            .iter()
            .find(|m| m.name == name)
            .is_some_and(|m| m.served.set(served).is_ok())
    }

    /// Marks a loaded model as warmed up (see [`warmup`]).
    fn mark_warm(&self, name: &str) {
        if let Some(m) = self.models.iter().find(|m| m.name == name) {
            m.warm.store(true, Ordering::SeqCst);
        }
    }

    /// The model a request names, of the kind its endpoint serves.
    fn served(&self, name: &str, kind: ModelKind) -> Result<&Served, ApiError> {
        let Some(slot) = self.models.iter().find(|m| m.name == name) else {
            let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            return Err(ApiError::not_found(
                "model_not_found",
                format!(
                    "The model `{}` does not exist. Available models: {}",
                    excerpt(name),
                    names.join(", ")
                ),
            )
            .with_param(Some("model".into())));
        };
        if slot.kind != kind {
            let what = match slot.kind {
                ModelKind::Chat => "a chat model: use /v1/chat/completions",
                ModelKind::Embedding => "an embedding model: use /v1/embeddings",
            };
            return Err(ApiError::bad_request(
                "wrong_model_kind",
                format!("The model `{name}` is {what}"),
            )
            .with_param(Some("model".into())));
        }
        slot.served
            .get()
            .ok_or_else(|| ApiError::unavailable(format!("the model `{name}` is still loading")))
    }

    fn chat(&self, name: &str) -> Result<&ChatServing, ApiError> {
        match self.served(name, ModelKind::Chat)? {
            Served::Chat(c) => Ok(c),
            Served::Embed(_) => Err(ApiError::internal("model kind mismatch".into())),
        }
    }

    fn embed(&self, name: &str) -> Result<&EmbedServing, ApiError> {
        match self.served(name, ModelKind::Embedding)? {
            Served::Embed(e) => Ok(e),
            Served::Chat(_) => Err(ApiError::internal("model kind mismatch".into())),
        }
    }
}

/// Runs validation (which decodes images) off the async runtime.
async fn off_runtime<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("validation task failed: {e}")))?
        .map_err(Into::into)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The application's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.server.max_body_bytes;
    let headers = middleware::from_fn_with_state(Arc::clone(&state), guard::header_limits);
    let keys = middleware::from_fn_with_state(Arc::clone(&state), guard::api_key);
    let cors = cors(&state.server.cors_allow_origins);
    let app = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(observe::render))
        .merge(playground::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(keys)
        .layer(headers)
        .layer(middleware::from_fn(observe::per_request))
        .with_state(state);
    // Outermost, so that preflights (which carry no key) are answered.
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// CORS for the configured origins; none when the list is empty.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            // `Authorization` cannot be allowed by a wildcard: echo what is asked.
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(Duration::from_secs(3600)),
    )
}

/// Every configured model, loaded or not; `max_model_len` once loaded.
async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .models
            .iter()
            .map(|m| ModelCard {
                id: m.name.clone(),
                object: "model",
                created: state.created,
                owned_by: "mmserve",
                max_model_len: m.served.get().map(Served::max_model_len),
                kind: match m.kind {
                    ModelKind::Chat => "chat",
                    ModelKind::Embedding => "embedding",
                },
                devices: m.served.get().map(Served::devices).unwrap_or_default(),
            })
            .collect(),
    })
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
