//! LLaVA-family model code on candle, numerically matching transformers, batched for the engine.
//!
//! The engine thread owns one [`LlavaModel`] (immutable) and one [`KvCache`], and calls
//! [`LlavaModel::forward`] once per step with every running sequence: prefill chunks and decode
//! tokens are flattened into one (T, D) activation so each projection runs once per step;
//! rotary, attention and the cache are per sequence. Images go through
//! [`LlavaModel::encode_images`] first; their rows ride along in [`SeqInput::image_embeds`].
//!
//! Supported: `model_type: "llava"` with a CLIP or SigLIP vision tower and a Llama, Qwen2 or
//! Mistral decoder, in both the transformers 5.x and the 4.x hub tensor layouts.
//!
//! Files: `config` / `text_config` / `rope` / `json` (parsing), `weights` (files and layouts),
//! `vision`, `decoder`, `attention`, `norm`, `activation`, `linear`, `small_m` (layers), `kv_cache`, `batch` (step
//! input), `llava` (the model), `error`.

mod activation;
mod attention;
mod batch;
pub mod bf16x3;
mod block_pool;
mod blocks;
mod config;
mod decode_attention;
mod decoder;
pub mod embed;
pub mod encoder_attention;
mod error;
mod family;
mod fast_exp;
pub mod huge_pages;
pub mod idefics3;
mod image_key;
mod json;
mod kv_cache;
mod linear;
mod llava;
pub mod many_rows;
mod norm;
mod par;
mod prefill_attention;
mod q8;
pub mod qwen2vl;
mod rope;
mod rope_store;
pub mod small_m;
mod splice;
mod text_config;
mod vision;
mod weights;

pub use activation::Activation;
pub use batch::SeqInput;
pub use block_pool::BlockHash;
pub use blocks::OutOfBlocks;
pub use config::{FeatureSelect, LlavaConfig, VisionConfig, VisionKind};
pub use error::ModelError;
pub use family::{ChatCache, ChatModel, ImageInput, StepInput, CHAT_MODEL_TYPES};
pub use image_key::{ImageKey, KeyedImage};
pub use kv_cache::{KvCache, KvCacheConfig, KvShape};
pub use linear::QuantReport;
pub use llava::LlavaModel;
pub use rope::{RopeConfig, RopeScaling};
pub use text_config::{TextConfig, TextKind};
pub use weights::safetensors_files;

/// Test helper: a tensor's values as f32 bit patterns, for tests that demand the same bits.
#[cfg(test)]
pub(crate) fn f32_bits(t: &candle_core::Tensor) -> candle_core::Result<Vec<u32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}
