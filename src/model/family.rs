//! The chat model families behind one interface that the engine drives:
//! load by `config.json`'s `model_type`, encode a step's images, run a batched
//! step against the family's cache. Adding a family adds a variant here.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{KvCache, LlavaModel, ModelError, SeqInput};

/// One preprocessed image in the shape its family's vision tower takes.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A fixed-size image, (3, H, W) f32 (LLaVA's CLIP/SigLIP towers).
    Pixels(Tensor),
}

/// A loaded chat model.
#[derive(Debug)]
pub enum ChatModel {
    Llava(LlavaModel),
}

/// The KV cache of a family, owned by the engine.
#[derive(Debug)]
pub enum ChatCache {
    Kv(KvCache),
}

impl ChatCache {
    /// Frees a sequence's entries (finished, failed or cancelled).
    pub fn remove(&mut self, seq_id: u64) {
        match self {
            ChatCache::Kv(c) => c.remove(seq_id),
        }
    }
}

/// Model types this module loads as chat models.
pub const CHAT_MODEL_TYPES: [&str; 1] = ["llava"];

impl ChatModel {
    /// Loads the family `config.json` names.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        match model_type(&path)?.as_str() {
            "llava" => Ok(ChatModel::Llava(LlavaModel::load(dir, dtype, device)?)),
            other => Err(ModelError::Unsupported {
                what: "model_type",
                name: format!("{other} (in {})", path.display()),
            }),
        }
    }

    pub fn image_token_id(&self) -> u32 {
        match self {
            ChatModel::Llava(m) => m.image_token_id(),
        }
    }

    pub fn max_context(&self) -> usize {
        match self {
            ChatModel::Llava(m) => m.max_context(),
        }
    }

    pub fn new_cache(&self) -> ChatCache {
        match self {
            ChatModel::Llava(m) => ChatCache::Kv(m.new_cache()),
        }
    }

    /// Encodes a step's images together; returns each image's rows, (tokens_i, hidden).
    pub fn encode_images(&self, images: &[&ImageInput]) -> Result<Vec<Tensor>, ModelError> {
        match self {
            ChatModel::Llava(m) => {
                let pixels: Vec<&Tensor> = images
                    .iter()
                    .map(|i| match i {
                        ImageInput::Pixels(t) => t,
                    })
                    .collect();
                // (N, 3, H, W) -> (N, tokens_per_image, hidden)
                let feats = m.encode_images(&Tensor::stack(&pixels, 0)?)?;
                (0..pixels.len())
                    .map(|i| Ok(feats.get(i)?))
                    .collect::<Result<_, ModelError>>()
            }
        }
    }

    /// One batched step; (batch.len(), vocab) f32 logits of each sequence's last token.
    pub fn forward(
        &self,
        batch: &[SeqInput<'_>],
        cache: &mut ChatCache,
    ) -> Result<Tensor, ModelError> {
        match (self, cache) {
            (ChatModel::Llava(m), ChatCache::Kv(c)) => m.forward(batch, c),
        }
    }
}

/// `model_type` of a `config.json`.
fn model_type(path: &Path) -> Result<String, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
        _ => ModelError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        file: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })?;
    Ok(v["model_type"].as_str().unwrap_or("").to_string())
}
