//! Idefics3 / SmolVLM (`model_type: "idefics3"`): a SigLIP tower over masked image tiles, a
//! pixel-shuffle connector, and a Llama decoder, numerically as transformers 5.24's
//! `Idefics3ForConditionalGeneration`.
//!
//! Images are encoded on their own ([`Idefics3Model::encode_images`], one row block of
//! `tokens_per_tile` rows per real tile); the rows are spliced where the image token stands by
//! the same batched step as LLaVA ([`Idefics3Model::forward`] with [`SeqInput`]).
//!
//! Files: `config` (parsing), `vision` (masked tower, position bucketing), `connector`
//! (pixel shuffle + projection), `pixels` (tile/mask checks), this file (the model).

mod config;
mod connector;
mod pixels;
mod vision;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::batch::{Limits, SeqInput};
use super::decoder::TextModel;
use super::kv_cache::{KvCache, KvCacheConfig};
use super::linear::QuantReport;
use super::splice::Spliced;
use super::weights;
use super::ModelError;
use connector::Connector;
use vision::Idefics3Vision;

pub use config::Idefics3Config;

/// An Idefics3-family vision-language model; immutable once loaded, the KV cache is external.
#[derive(Debug)]
pub struct Idefics3Model {
    config: Idefics3Config,
    vision: Idefics3Vision,
    connector: Connector,
    text: TextModel,
    dtype: DType,
    device: Device,
}

/// Where each part lives: `model.vision_model` / `model.connector` / `model.text_model` /
/// `lm_head` (hub and 5.x saves of `Idefics3ForConditionalGeneration` alike; transformers
/// has no key conversion for idefics3), or the same without `model.` (a bare `Idefics3Model`).
struct Parts {
    vision: VarBuilder<'static>,
    connector: VarBuilder<'static>,
    text: VarBuilder<'static>,
    lm_head: Option<VarBuilder<'static>>,
}

fn find(
    vb: &VarBuilder<'static>,
    part: &str,
    probe: &str,
) -> Result<VarBuilder<'static>, ModelError> {
    let prefixes = [format!("model.{part}"), part.to_string()];
    prefixes
        .iter()
        .map(|p| vb.pp(p))
        .find(|v| v.contains_tensor(probe))
        .ok_or_else(|| {
            let tried: Vec<String> = prefixes.iter().map(|p| format!("{p}.{probe}")).collect();
            ModelError::Weights(format!("no tensor named any of {}", tried.join(", ")))
        })
}

impl Parts {
    fn detect(vb: &VarBuilder<'static>) -> Result<Self, ModelError> {
        Ok(Self {
            vision: find(vb, "vision_model", "embeddings.patch_embedding.weight")?,
            connector: find(vb, "connector", "modality_projection.proj.weight")?,
            text: find(vb, "text_model", "embed_tokens.weight")?,
            lm_head: Some(vb.pp("lm_head")).filter(|v| v.contains_tensor("weight")),
        })
    }
}

impl Idefics3Model {
    /// Loads `config.json` + `*.safetensors` (single or sharded) from a local HF directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = Idefics3Config::from_file(&dir.join("config.json"))?;
        let files = weights::safetensors_files(dir)?;
        let vb = weights::open(&files, dtype, device)?;
        let parts = Parts::detect(&vb)?;
        let lm_head = match (parts.lm_head, config.tie_word_embeddings) {
            (_, true) => None,
            (Some(head), false) => Some(head),
            (None, false) => {
                return Err(ModelError::Weights(
                    "no lm_head.weight and embeddings are not tied".into(),
                ))
            }
        };
        let weights_err = |part: &'static str| {
            move |e: candle_core::Error| ModelError::Weights(format!("{part}: {e}"))
        };
        let vision = Idefics3Vision::load(&config.vision, parts.vision)
            .map_err(weights_err("vision model"))?;
        let connector = Connector::load(
            config.vision.hidden_size,
            config.text.hidden_size,
            config.scale_factor,
            parts.connector,
        )
        .map_err(weights_err("connector"))?;
        let text = TextModel::load(&config.text, parts.text, lm_head)
            .map_err(weights_err("text model"))?;
        Ok(Self {
            config,
            vision,
            connector,
            text,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Idefics3Config {
        &self.config
    }

    pub fn image_token_id(&self) -> u32 {
        self.config.image_token_id
    }

    /// Image-token rows per full-size tile: (image_size / patch)^2 / scale_factor^2.
    pub fn tokens_per_tile(&self) -> usize {
        self.config.tokens_per_tile()
    }

    /// Tile height = width the tower was trained at (`vision_config.image_size`).
    pub fn image_size(&self) -> usize {
        self.config.vision.image_size
    }

    /// Quantizes the decoder's projections in place (see [`crate::model::QuantReport`]);
    /// the vision tower and projector stay as loaded.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<QuantReport, ModelError> {
        Ok(self.text.quantize(dtype)?)
    }

    /// Runs the vision tower's projections as the bf16x3 product (`model::bf16x3`) where the
    /// machine has it: how many do.
    pub fn use_bf16x3(&mut self) -> Result<usize, ModelError> {
        Ok(self.vision.use_bf16x3()?)
    }

    /// `max_position_embeddings` of the decoder; positions past it are not refused here.
    pub fn max_context(&self) -> usize {
        self.config.text.max_position_embeddings
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty paged cache for this model's decoder, as big as `cfg` allows.
    pub fn new_cache(&self, cfg: &KvCacheConfig) -> Result<KvCache, ModelError> {
        Ok(self.text.new_cache(cfg)?)
    }

    /// Tiles of one or more images -> image rows (n_real_tiles * rows_per_tile, text_hidden)
    /// in the model dtype, tile after tile.
    ///
    /// `pixel_values` (n_tiles, C, H, W) f32; `pixel_attention_mask` (n_tiles, H, W), any
    /// dtype, nonzero = real pixel. As transformers: tiles whose pixels are all exactly 0.0 are
    /// padding and dropped (they get no rows); a patch is real when any of its pixels is; the
    /// tower hides padded patches as keys and places real ones by bucketized coordinates.
    /// H = W must be a multiple of patch * scale_factor; rows_per_tile = (H / patch /
    /// scale_factor)^2, which is `tokens_per_tile` for full-size tiles.
    pub fn encode_images(
        &self,
        pixel_values: &Tensor,
        pixel_attention_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let v = &self.config.vision;
        let geometry = pixels::Geometry {
            channels: v.num_channels,
            patch: v.patch_size,
            multiple: v.patch_size * self.config.scale_factor,
        };
        let tiles = pixels::real_tiles(pixel_values, pixel_attention_mask, geometry)?;
        let d = self.config.text.hidden_size;
        let Some(tiles) = tiles else {
            return Ok(Tensor::zeros((0, d), self.dtype, &self.device)?);
        };
        let px = tiles.pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        // (N, S, vision_hidden) -> (N, S / s^2, text_hidden)
        let states = self.vision.forward(&px, &tiles.masks)?;
        let rows = self.connector.forward(&states)?;
        let (n, r, _) = rows.dims3()?;
        Ok(rows.reshape((n * r, d))?)
    }

    /// One engine step over all `batch` sequences (prefills and decodes mixed); see
    /// [`SeqInput`]. Returns the logits of each sequence's last token: (batch.len(), vocab) f32.
    /// On error nothing is committed: every sequence's cached length stays as it was.
    pub fn forward(
        &self,
        batch: &[SeqInput<'_>],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        Spliced {
            text: &self.text,
            limits: Limits {
                num_layers: self.text.num_layers(),
                vocab_size: self.config.text.vocab_size,
                hidden_size: self.config.text.hidden_size,
                image_token_id: self.config.image_token_id,
            },
            dtype: self.dtype,
            device: &self.device,
        }
        .step(batch, cache)
    }
}
