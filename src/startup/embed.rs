//! Loading a contrastive embedding model (CLIP, SigLIP) directory into a
//! running embedding engine and a validator.

use std::sync::Arc;
use std::thread::JoinHandle;

use super::device;
use anyhow::{Context, Result};
use tokenizers::Tokenizer;

use crate::api::EmbedServing;
use crate::config::{Config, ModelConfig};
use crate::engine::embed::EmbedHandle;
use crate::metrics::metrics;
use crate::model::embed::EmbeddingModel;
use crate::preprocess::{read_image_processor, ImageProcessor};
use crate::text::TokenTable;
use crate::validate::embed::EmbedValidator;

pub fn load(cfg: &Config, m: &ModelConfig) -> Result<(EmbedServing, Vec<JoinHandle<()>>)> {
    let dir = m.path.as_path();
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
    let processor = read_image_processor(dir, ImageProcessor::from_json_str)?;
    if m.vision_matmul_precision != crate::config::MatmulPrecision::Highest {
        tracing::warn!(model = %m.served_name(), "vision_matmul_precision applies to chat models only: this embedding model computes in f32");
    }
    if let Some(q) = m.quantize {
        tracing::warn!(model = %m.served_name(), quantize = ?q, "quantization applies to chat models only: this embedding model stays as loaded");
    }
    // Embedding models are small: one engine, on the first configured device.
    let dev = device::open_all(&cfg.engine.devices)?.swap_remove(0);
    let dtype = device::compute_dtype(m.dtype, &dev.device);
    let model = EmbeddingModel::load(dir, dtype, &dev.device)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    let max_token_bytes = TokenTable::new(&tokenizer).longest_token_bytes();
    let validator = EmbedValidator {
        tokenizer: Arc::new(tokenizer),
        processor,
        max_text_len: model.max_text_len(),
        max_token_bytes,
        padding: model.text_padding(),
        dim: model.dim(),
        max_inputs: cfg.limits.max_embedding_inputs,
        image_limits: cfg.limits.image(),
    };
    let (engine, join) = EmbedHandle::spawn(
        model,
        cfg.engine.max_embedding_batch,
        cfg.engine.max_waiting,
    )
    .context("cannot start the embedding engine thread")?;
    let serving = EmbedServing {
        validator: Arc::new(validator),
        engine,
        metrics: metrics().model(&m.served_name()),
        device: dev.name,
    };
    Ok((serving, vec![join]))
}
