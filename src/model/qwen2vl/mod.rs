//! Qwen2-VL and Qwen2.5-VL (`model_type` `qwen2_vl`, `qwen2_5_vl`) on candle, numerically
//! matching transformers 5.24, batched for the engine like [`crate::model::LlavaModel`].
//!
//! The engine owns one [`Qwen2VlModel`] and one [`Qwen2VlCache`]. Each image goes through
//! [`Qwen2VlModel::encode_image`] with its processor patch rows and grid; a step
//! ([`Qwen2VlModel::forward`]) flattens every sequence's new tokens, splices image rows in at the
//! image tokens, and rotates each token by its three M-RoPE positions (see [`mrope`]).
//!
//! Files: `config` (both config shapes), `window` (patch order and Qwen2.5-VL windows),
//! `vision` (the tower), `mrope` (positions and rotary), `cache`, `model`.

mod cache;
mod config;
mod model;
pub mod mrope;
mod vision;
mod window;

pub use cache::Qwen2VlCache;
pub use config::{Qwen2VlConfig, Qwen2VlKind, Qwen2VlVisionConfig};
pub use model::{Qwen2VlInput, Qwen2VlModel};
pub use mrope::RopeState;
