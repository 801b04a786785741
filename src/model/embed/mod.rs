//! Contrastive dual encoders — CLIP and SigLIP — turning texts and images into L2-normalised
//! embeddings that match transformers 5's `get_text_features` / `get_image_features`.
//!
//! [`EmbeddingModel`] is immutable once loaded; each call embeds a whole batch. The image side
//! reuses the LLaVA [`VisionTower`](super::vision::VisionTower); the text side is `text`.
//! Checkpoint layout: `text_model.*`, `vision_model.*`, and CLIP's `text_projection` /
//! `visual_projection` — the same names in transformers 5 saves and in the hub checkpoints
//! (openai/clip-vit-*, google/siglip-*).
//!
//! Files: `config` (parsing), `text` (text tower and pooling), `image` (vision pooling).

mod config;
mod image;
mod text;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, linear_no_bias, Linear};

use super::weights;
use super::ModelError;
pub use config::{EmbedConfig, TextPool, TextTowerConfig};
use image::ImageTower;
use text::TextTower;

/// Which contrastive family a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingKind {
    /// `model_type: "clip"`.
    Clip,
    /// `model_type: "siglip"`.
    Siglip,
}

/// How texts must be tokenized before [`EmbeddingModel::embed_texts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPadding {
    /// CLIP: no padding (each text as the tokenizer gives it, with BOS and EOS, truncated to
    /// [`EmbeddingModel::max_text_len`]); batches of mixed lengths are handled internally.
    None,
    /// SigLIP: every text padded to `length` tokens with `pad_id` (`padding="max_length"`, as the
    /// model was trained; no attention mask). Shorter inputs are padded here the same way.
    MaxLength { length: usize, pad_id: u32 },
}

/// A loaded CLIP or SigLIP model, both towers.
#[derive(Debug)]
pub struct EmbeddingModel {
    config: EmbedConfig,
    text: TextTower,
    /// CLIP's `text_projection` (no bias) or SigLIP's `text_model.head`.
    text_head: Linear,
    image: ImageTower,
    /// CLIP's `visual_projection` (no bias); SigLIP's pooled output is the embedding.
    visual_projection: Option<Linear>,
    dtype: DType,
    device: Device,
}

impl EmbeddingModel {
    /// Loads `config.json` (`model_type` `"clip"` or `"siglip"`) and the safetensors (single
    /// or sharded) from a local Hugging Face directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = EmbedConfig::from_file(&dir.join("config.json"))?;
        let files = weights::safetensors_files(dir)?;
        let vb = weights::open(&files, dtype, device)?;
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let err = |part: &'static str| {
            let names = names.join(", ");
            move |e: candle_core::Error| ModelError::Weights(format!("{names}: {part}: {e}"))
        };
        let (t, v) = (&config.text, &config.vision);
        let text = TextTower::load(t, vb.pp("text_model")).map_err(err("text tower"))?;
        let image = ImageTower::load(v, vb.pp("vision_model")).map_err(err("vision tower"))?;
        let (text_head, visual_projection) = match config.kind {
            EmbeddingKind::Clip => {
                let dim = config.projection_dim;
                let text_head = linear_no_bias(t.hidden_size, dim, vb.pp("text_projection"))
                    .map_err(err("text_projection"))?;
                let visual = linear_no_bias(v.hidden_size, dim, vb.pp("visual_projection"))
                    .map_err(err("visual_projection"))?;
                (text_head, Some(visual))
            }
            EmbeddingKind::Siglip => {
                let head = linear(t.hidden_size, t.projection_size, vb.pp("text_model.head"))
                    .map_err(err("text head"))?;
                (head, None)
            }
        };
        Ok(Self {
            config,
            text,
            text_head,
            image,
            visual_projection,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &EmbedConfig {
        &self.config
    }

    pub fn kind(&self) -> EmbeddingKind {
        self.config.kind
    }

    /// Embedding size: `projection_dim` for CLIP, the vision hidden size for SigLIP.
    pub fn dim(&self) -> usize {
        self.config.dim()
    }

    /// Longest text in tokens (`text_config.max_position_embeddings`).
    pub fn max_text_len(&self) -> usize {
        self.config.text.max_position_embeddings
    }

    /// Input image height = width in pixels.
    pub fn image_size(&self) -> usize {
        self.config.vision.image_size
    }

    pub fn text_padding(&self) -> TextPadding {
        match self.config.kind {
            EmbeddingKind::Clip => TextPadding::None,
            EmbeddingKind::Siglip => TextPadding::MaxLength {
                length: self.max_text_len(),
                pad_id: self.config.text.pad_token_id,
            },
        }
    }

    /// `ids`: one Vec per text (tokenized and truncated by the caller, see
    /// [`Self::text_padding`]). Returns (N, dim) f32 embeddings, L2-normalised.
    pub fn embed_texts(&self, ids: &[Vec<u32>]) -> Result<Tensor, ModelError> {
        normalize(&self.text_features(ids)?)
    }

    /// `pixel_values` (N, 3, H, W) f32 -> (N, dim) f32, L2-normalised.
    pub fn embed_images(&self, pixel_values: &Tensor) -> Result<Tensor, ModelError> {
        normalize(&self.image_features(pixel_values)?)
    }

    /// Unnormalised text embeddings (transformers' `get_text_features(...).pooler_output`):
    /// (N, dim) f32. Text `i`'s input errors are reported as sequence `i`.
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor, ModelError> {
        if ids.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        for (i, text) in ids.iter().enumerate() {
            self.check_text(i, text)?;
        }
        let pooled = match self.text_padding() {
            TextPadding::None => self.text.pooled(ids, &self.device)?,
            TextPadding::MaxLength { length, pad_id } => {
                let padded: Vec<Vec<u32>> = ids
                    .iter()
                    .map(|t| {
                        let pad = std::iter::repeat_n(pad_id, length - t.len());
                        t.iter().copied().chain(pad).collect()
                    })
                    .collect();
                self.text.pooled(&padded, &self.device)?
            }
        };
        // (N, D_text) -> (N, dim)
        Ok(self.text_head.forward(&pooled)?.to_dtype(DType::F32)?)
    }

    /// Unnormalised image embeddings (transformers' `get_image_features(...).pooler_output`):
    /// pixels (N, C, H, W) -> (N, dim) f32.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor, ModelError> {
        let v = &self.config.vision;
        let dims = pixel_values.dims();
        let (c, size) = (v.num_channels, v.image_size);
        if dims.len() != 4 || dims[1] != c || dims[2] != size || dims[3] != size {
            return Err(ModelError::Pixels(format!(
                "expected shape (N, {c}, {size}, {size}), got {dims:?}"
            )));
        }
        if dims[0] == 0 {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        let pixels = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let pooled = self.image.pooled(&pixels)?;
        let projected = match &self.visual_projection {
            Some(proj) => proj.forward(&pooled)?,
            None => pooled,
        };
        Ok(projected.to_dtype(DType::F32)?)
    }

    fn check_text(&self, index: usize, ids: &[u32]) -> Result<(), ModelError> {
        let fail = |msg: String| Err(ModelError::input(index as u64, msg));
        let (max, vocab) = (self.max_text_len(), self.config.text.vocab_size);
        if ids.is_empty() {
            return fail("empty text (no token ids)".into());
        }
        if ids.len() > max {
            return fail(format!(
                "{} tokens, more than the model's {max} text positions",
                ids.len()
            ));
        }
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => fail(format!("token id {id} outside the vocabulary of {vocab}")),
            None => Ok(()),
        }
    }
}

/// Rows divided by their L2 norm, as transformers' `_get_vector_norm` (no epsilon).
fn normalize(xs: &Tensor) -> Result<Tensor, ModelError> {
    // (N, dim) / (N, 1)
    let norm = xs.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(xs.broadcast_div(&norm)?)
}
