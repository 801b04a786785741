//! `Qwen2VlModel`: vision tower + Qwen2 decoder with M-RoPE, loaded from a Hugging Face
//! directory. Images are encoded one at a time (`encode_image`); their rows are spliced in where
//! the image token stands when a step runs (`forward`), and each sequence's tokens take their
//! three M-RoPE positions from its image grids.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::cache::Qwen2VlCache;
use super::config::Qwen2VlConfig;
use super::mrope::{MropeRotary, RopeState};
use super::vision::VisionTower;
use crate::model::batch::{Limits, SeqInput, StepPlan};
use crate::model::decoder::TextModel;
use crate::model::weights::{self, find};
use crate::model::{KvCacheConfig, ModelError, QuantReport};

/// New tokens of one sequence for this step.
#[derive(Debug, Clone, Copy)]
pub struct Qwen2VlInput<'a> {
    pub seq_id: u64,
    /// Tokens appended this step (a prefill chunk or one decode token); non-empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence; must equal the cache's length for `seq_id`.
    pub start_pos: usize,
    /// (n_image_tokens, text_hidden): one row per image token in `tokens`, in order. `None`:
    /// image tokens embed as ordinary tokens.
    pub image_embeds: Option<&'a Tensor>,
    /// Grids `[t, h, w]` of every image whose tokens appear in the sequence's prompt, in order,
    /// passed with every prefill chunk (the model remembers how many it has placed); may be
    /// empty for decode steps.
    pub image_grids: &'a [[usize; 3]],
}

/// A Qwen2-VL or Qwen2.5-VL model; immutable once loaded, the cache is external.
#[derive(Debug)]
pub struct Qwen2VlModel {
    config: Qwen2VlConfig,
    vision: VisionTower,
    text: TextModel,
    rotary: MropeRotary,
    dtype: DType,
    device: Device,
}

impl Qwen2VlModel {
    /// Loads `config.json` + safetensors from a local HF directory, in the transformers 5.x
    /// layout (`model.visual.*`, `model.language_model.*`, `lm_head.weight`) or the 4.x hub
    /// layout (`visual.*`, `model.*`, `lm_head.weight`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
        let files = weights::safetensors_files(dir)?;
        let vb = weights::open(&files, dtype, device)?;
        let vision_vb = find(&vb, &["model.visual", "visual"], "patch_embed.proj.weight")?;
        let text_vb = find(
            &vb,
            &["model.language_model", "model"],
            "embed_tokens.weight",
        )?;
        let head = vb.pp("lm_head");
        let lm_head = match (head.contains_tensor("weight"), config.tie_word_embeddings) {
            (_, true) => None,
            (true, false) => Some(head),
            (false, false) => {
                return Err(ModelError::Weights(
                    "no lm_head.weight and embeddings are not tied".into(),
                ))
            }
        };
        let err = |part: &'static str| {
            move |e: candle_core::Error| ModelError::Weights(format!("{part}: {e}"))
        };
        let vision = VisionTower::load(&config.vision, config.kind, vision_vb)
            .map_err(err("vision tower"))?;
        let text =
            TextModel::load(&config.text, text_vb, lm_head).map_err(err("language model"))?;
        let inv_freq = config.text.rope.inv_freq(config.text.head_dim);
        let rotary = MropeRotary::new(inv_freq, config.mrope_section, device)?;
        if config.vision.out_dim != config.text.hidden_size {
            return Err(ModelError::config(
                dir.join("config.json"),
                "vision_config output width must equal the text hidden_size",
            ));
        }
        Ok(Self {
            config,
            vision,
            text,
            rotary,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Qwen2VlConfig {
        &self.config
    }

    pub fn image_token_id(&self) -> u32 {
        self.config.image_token_id
    }

    pub fn spatial_merge_size(&self) -> usize {
        self.config.vision.spatial_merge_size
    }

    /// Quantizes the decoder's projections in place (see [`crate::model::QuantReport`]);
    /// the vision tower and projector stay as loaded.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<QuantReport, ModelError> {
        Ok(self.text.quantize(dtype)?)
    }

    /// Longest sequence the decoder was configured for (`max_position_embeddings`).
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
    pub fn new_cache(&self, cfg: &KvCacheConfig) -> Result<Qwen2VlCache, ModelError> {
        Ok(Qwen2VlCache::new(self.text.new_cache(cfg)?))
    }

    /// One image: `patches` (t·h·w, C·T·P·P), the processor's `pixel_values` rows for it, with
    /// `grid_thw` [t, h, w] -> (t·h·w / merge², text_hidden) in the model dtype.
    pub fn encode_image(
        &self,
        patches: &Tensor,
        grid_thw: [usize; 3],
    ) -> Result<Tensor, ModelError> {
        let v = &self.config.vision;
        let [t, h, w] = grid_thw;
        let m = v.spatial_merge_size;
        if t == 0 || h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
            return Err(ModelError::Pixels(format!(
                "grid {grid_thw:?} must be positive with h and w multiples of {m}"
            )));
        }
        let want = (t * h * w, v.patch_dim());
        if patches.dims() != [want.0, want.1] {
            return Err(ModelError::Pixels(format!(
                "expected ({}, {}) patch rows for grid {grid_thw:?}, got {:?}",
                want.0,
                want.1,
                patches.dims()
            )));
        }
        let patches = patches.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.vision.forward(&patches, grid_thw)?)
    }

    /// M-RoPE positions `[t, h, w]` of `tokens` for a sequence starting from `state` (a fresh
    /// sequence: `RopeState::default()`); what the model uses for a prefill.
    pub fn rope_positions(
        &self,
        state: &mut RopeState,
        tokens: &[u32],
        grids: &[[usize; 3]],
    ) -> Result<Vec<[usize; 3]>, String> {
        state
            .place(
                tokens,
                self.config.image_token_id,
                grids,
                self.spatial_merge_size(),
            )
            .map_err(|e| e.0)
    }

    /// One engine step over all `batch` sequences (prefills and decodes mixed). Returns the
    /// logits of each sequence's last token: (batch.len(), vocab) f32. On error nothing is
    /// committed.
    pub fn forward(
        &self,
        batch: &[Qwen2VlInput<'_>],
        cache: &mut Qwen2VlCache,
    ) -> Result<Tensor, ModelError> {
        let seqs: Vec<SeqInput<'_>> = batch
            .iter()
            .map(|s| SeqInput {
                seq_id: s.seq_id,
                tokens: s.tokens,
                start_pos: s.start_pos,
                image_embeds: s.image_embeds,
            })
            .collect();
        let limits = Limits {
            num_layers: self.text.num_layers(),
            vocab_size: self.config.text.vocab_size,
            hidden_size: self.config.text.hidden_size,
            image_token_id: self.config.image_token_id,
        };
        let plan = StepPlan::new(&seqs, &cache.kv, limits)?;
        let mut positions = Vec::with_capacity(plan.ids.len());
        let mut states = Vec::with_capacity(batch.len());
        for s in batch {
            let mut state = cache.rope_state(s.seq_id);
            let pos = self
                .rope_positions(&mut state, s.tokens, s.image_grids)
                .map_err(|m| ModelError::input(s.seq_id, m))?;
            positions.extend(pos);
            states.push((s.seq_id, state));
        }
        cache
            .kv
            .reserve(&plan.spans)
            .map_err(|e| ModelError::Batch(e.to_string()))?;
        let result = self.run(&plan, &positions, cache);
        match result {
            Ok(logits) => {
                for span in &plan.spans {
                    cache.kv.commit(span.seq_id, span.len);
                }
                cache.rope.extend(states);
                Ok(logits)
            }
            Err(e) => {
                cache.kv.rollback(&plan.spans);
                Err(e.into())
            }
        }
    }

    fn run(
        &self,
        plan: &StepPlan<'_>,
        positions: &[[usize; 3]],
        cache: &mut Qwen2VlCache,
    ) -> candle_core::Result<Tensor> {
        let xs = self.input_embeddings(plan)?;
        let (cos, sin) = self.rotary.cos_sin(positions, xs.dtype())?;
        self.text
            .forward_rotated(&xs, (&cos, &sin), &plan.spans, &mut cache.kv)
    }

    /// Token embeddings with image rows spliced in: (T, text_hidden).
    fn input_embeddings(&self, plan: &StepPlan<'_>) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(plan.ids.as_slice(), &self.device)?;
        let text = self.text.embed(&ids)?;
        let Some(gather) = &plan.gather else {
            return Ok(text);
        };
        let mut rows = vec![text];
        for img in &plan.images {
            rows.push(img.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        // (T + image rows, D) -> (T, D)
        let gather = Tensor::new(gather.as_slice(), &self.device)?;
        Tensor::cat(&rows, 0)?.index_select(&gather, 0)
    }
}
