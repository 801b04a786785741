//! mmserve: an OpenAI-compatible inference server for vision-language models.
//!
//! Data flows one way: `api` (HTTP) → `validate` (trusted request types) → `engine`
//! (one thread that owns the model, its KV cache and the scheduler) → `model`.
//! Results come back on a per-request channel. Nothing below `api` imports it.

pub mod api;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod preprocess;
pub mod prompt;
pub mod startup;
pub mod text;
pub mod validate;
