//! `LlavaModel`: vision tower + projector + decoder, loaded from a Hugging Face directory.
//! Images are encoded on their own (`encode_images`); their rows are spliced into the token
//! embeddings where the image token stands when a step runs (`forward`).

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};

use super::activation::Activation;
use super::batch::{Limits, SeqInput};
use super::config::{FeatureSelect, LlavaConfig};
use super::decoder::TextModel;
use super::kv_cache::{KvCache, KvCacheConfig};
use super::linear::QuantReport;
use super::splice::Spliced;
use super::vision::VisionTower;
use super::weights::{self, Layout};
use super::ModelError;

/// `multi_modal_projector`: linear_1 -> act -> linear_2.
#[derive(Debug)]
struct Projector {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl Projector {
    fn load(cfg: &LlavaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let input = cfg.vision.hidden_size * cfg.vision_feature_layers.len();
        let out = cfg.text.hidden_size;
        Ok(Self {
            linear_1: linear_b(input, out, cfg.projector_bias, vb.pp("linear_1"))?,
            act: cfg.projector_act,
            linear_2: linear_b(out, out, cfg.projector_bias, vb.pp("linear_2"))?,
        })
    }

    /// (N, rows, vision_hidden * layers) -> (N, rows, text_hidden)
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&self.act.apply(&self.linear_1.forward(xs)?)?)
    }
}

/// A LLaVA-family vision-language model; immutable once loaded, the KV cache is external.
#[derive(Debug)]
pub struct LlavaModel {
    config: LlavaConfig,
    vision: VisionTower,
    projector: Projector,
    text: TextModel,
    dtype: DType,
    device: Device,
}

impl LlavaModel {
    /// Loads `config.json` + `*.safetensors` (single `model.safetensors`, or sharded via
    /// `model.safetensors.index.json`) from a local HF directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = LlavaConfig::from_file(&dir.join("config.json"))?;
        let files = weights::safetensors_files(dir)?;
        let vb = weights::open(&files, dtype, device)?;
        let layout = Layout::detect(&vb)?;
        let lm_head = match (layout.lm_head, config.tie_word_embeddings) {
            (_, true) => None,
            (Some(head), false) => Some(head),
            (None, false) => return Err(ModelError::Weights(
                "no lm_head.weight (nor language_model.lm_head.weight) and embeddings are not tied"
                    .into(),
            )),
        };
        let weights_err = |part: &'static str| {
            move |e: candle_core::Error| ModelError::Weights(format!("{part}: {e}"))
        };
        let vision =
            VisionTower::load(&config.vision, &config.vision_feature_layers, layout.vision)
                .map_err(weights_err("vision tower"))?;
        let projector =
            Projector::load(&config, layout.projector).map_err(weights_err("projector"))?;
        let text = TextModel::load(&config.text, layout.text, lm_head)
            .map_err(weights_err("language model"))?;
        Ok(Self {
            config,
            vision,
            projector,
            text,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    pub fn image_token_id(&self) -> u32 {
        self.config.image_token_id
    }

    /// Feature rows per image after the select strategy (= image tokens per image).
    pub fn tokens_per_image(&self) -> usize {
        self.config.tokens_per_image()
    }

    /// Vision tower input height = width.
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

    /// Longest sequence (prompt + generated) the decoder was configured for
    /// (`max_position_embeddings`); positions past it are not refused here.
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

    /// pixel_values (N, C, H, W) f32 -> (N, tokens_per_image, text_hidden) in the model dtype.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor, ModelError> {
        let v = &self.config.vision;
        let want = [v.num_channels, v.image_size, v.image_size];
        match pixel_values.dims() {
            [n, rest @ ..] if *n > 0 && rest == want => {}
            dims => {
                return Err(ModelError::Pixels(format!(
                    "expected (N, {}, {}, {}), got {dims:?}",
                    want[0], want[1], want[2]
                )))
            }
        }
        let pixels = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let states = self.vision.hidden_states(&pixels)?;
        let states = match self.config.feature_select {
            FeatureSelect::Full => states,
            // Drop the first row (CLIP's class token): (N, S, D) -> (N, S - 1, D)
            FeatureSelect::DropFirst => states
                .iter()
                .map(|s| s.narrow(1, 1, s.dim(1)? - 1))
                .collect::<candle_core::Result<_>>()?,
        };
        // (N, rows, vision_hidden * layers)
        let features = Tensor::cat(&states, 2)?;
        Ok(self.projector.forward(&features)?)
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
