//! The chat model families behind one interface that the engine drives:
//! load by `config.json`'s `model_type`, encode a step's images, run a batched
//! step against the family's cache. Adding a family adds a variant here.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::idefics3::Idefics3Model;
use super::json;
use super::qwen2vl::{Qwen2VlCache, Qwen2VlInput, Qwen2VlModel, RopeState};
use super::{BlockHash, KvCache, KvCacheConfig, LlavaModel, ModelError, QuantReport, SeqInput};

/// One preprocessed image in the shape its family's vision tower takes.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A fixed-size image, (3, H, W) f32 (LLaVA's CLIP/SigLIP towers).
    Pixels(Tensor),
    /// Qwen2-VL patch rows, (t*h*w, C*T*P*P) f32, and the patch grid [t, h, w].
    Patches { patches: Tensor, grid: [usize; 3] },
    /// Idefics3 tiles, (n, 3, H, W) f32, with their pixel mask (n, H, W) u8.
    Tiles { pixels: Tensor, mask: Tensor },
}

impl ImageInput {
    /// The patch grid, for families whose positions depend on it.
    pub fn grid(&self) -> Option<[usize; 3]> {
        match self {
            ImageInput::Pixels(_) | ImageInput::Tiles { .. } => None,
            ImageInput::Patches { grid, .. } => Some(*grid),
        }
    }
}

/// One sequence's new tokens for a step (see [`SeqInput`]), plus the patch
/// grids of all its prompt's images (Qwen2-VL's M-RoPE needs them at prefill).
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub seq_id: u64,
    pub tokens: &'a [u32],
    pub start_pos: usize,
    /// (n_image_tokens, hidden): rows for the image tokens in `tokens`, in order.
    pub image_embeds: Option<&'a Tensor>,
    pub image_grids: &'a [[usize; 3]],
}

/// A loaded chat model.
#[derive(Debug)]
pub enum ChatModel {
    Llava(Box<LlavaModel>),
    Qwen2Vl(Box<Qwen2VlModel>),
    Idefics3(Box<Idefics3Model>),
}

/// The KV cache of a family, owned by the engine.
#[derive(Debug)]
pub enum ChatCache {
    Kv(KvCache),
    /// KV entries plus each sequence's M-RoPE state.
    Qwen(Qwen2VlCache),
}

impl ChatCache {
    /// Frees a sequence's entries (finished, failed or cancelled).
    pub fn remove(&mut self, seq_id: u64) {
        match self {
            ChatCache::Kv(c) => c.remove(seq_id),
            ChatCache::Qwen(c) => c.remove(seq_id),
        }
    }

    /// The paged keys and values (block counts, sizes).
    pub fn kv(&self) -> &KvCache {
        match self {
            ChatCache::Kv(c) => c,
            ChatCache::Qwen(c) => c.kv(),
        }
    }

    /// Registers `seq_id`'s committed full blocks under their `hashes` (prefix caching).
    pub fn register(&mut self, seq_id: u64, hashes: &[BlockHash]) {
        match self {
            ChatCache::Kv(c) => c.register(seq_id, hashes),
            ChatCache::Qwen(c) => c.kv.register(seq_id, hashes),
        }
    }
}

/// Model types this module loads as chat models.
pub const CHAT_MODEL_TYPES: [&str; 4] = ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3"];

impl ChatModel {
    /// Loads the family `config.json` names.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        match model_type(&path)?.as_str() {
            "llava" => Ok(ChatModel::Llava(Box::new(LlavaModel::load(
                dir, dtype, device,
            )?))),
            "qwen2_vl" | "qwen2_5_vl" => Ok(ChatModel::Qwen2Vl(Box::new(Qwen2VlModel::load(
                dir, dtype, device,
            )?))),
            "idefics3" => Ok(ChatModel::Idefics3(Box::new(Idefics3Model::load(
                dir, dtype, device,
            )?))),
            other => Err(ModelError::Unsupported {
                what: "model_type",
                name: format!("{other} (in {})", path.display()),
            }),
        }
    }

    /// Quantizes the decoder's projections to `dtype` in place, repacked for the CPU kernels;
    /// the vision tower stays as loaded.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<QuantReport, ModelError> {
        match self {
            ChatModel::Llava(m) => m.quantize(dtype),
            ChatModel::Qwen2Vl(m) => m.quantize(dtype),
            ChatModel::Idefics3(m) => m.quantize(dtype),
        }
    }

    /// Runs the vision tower's projections as the bf16x3 product (`model::bf16x3`) where the
    /// machine has it: how many do. Qwen2-VL's tower keeps f32 products.
    pub fn use_bf16x3(&mut self) -> Result<usize, ModelError> {
        match self {
            ChatModel::Llava(m) => m.use_bf16x3(),
            ChatModel::Qwen2Vl(_) => Ok(0),
            ChatModel::Idefics3(m) => m.use_bf16x3(),
        }
    }

    pub fn image_token_id(&self) -> u32 {
        match self {
            ChatModel::Llava(m) => m.image_token_id(),
            ChatModel::Qwen2Vl(m) => m.image_token_id(),
            ChatModel::Idefics3(m) => m.image_token_id(),
        }
    }

    pub fn max_context(&self) -> usize {
        match self {
            ChatModel::Llava(m) => m.max_context(),
            ChatModel::Qwen2Vl(m) => m.max_context(),
            ChatModel::Idefics3(m) => m.max_context(),
        }
    }

    /// An empty paged cache for this model, as big as `cfg` allows.
    pub fn new_cache(&self, cfg: &KvCacheConfig) -> Result<ChatCache, ModelError> {
        Ok(match self {
            ChatModel::Llava(m) => ChatCache::Kv(m.new_cache(cfg)?),
            ChatModel::Qwen2Vl(m) => ChatCache::Qwen(m.new_cache(cfg)?),
            ChatModel::Idefics3(m) => ChatCache::Kv(m.new_cache(cfg)?),
        })
    }

    /// Starts new sequence `seq_id` (whose known tokens are `tokens`) from the cached blocks of
    /// its leading block `hashes`; returns the positions they hold. Qwen2-VL's M-RoPE scan is
    /// run over those positions (`grids`: its images' patch grids), so the tokens after them
    /// are placed as without the cache; should that fail, nothing is reused.
    pub fn attach_prefix(
        &self,
        cache: &mut ChatCache,
        seq_id: u64,
        hashes: &[BlockHash],
        tokens: &[u32],
        grids: &[[usize; 3]],
    ) -> usize {
        match (self, cache) {
            (ChatModel::Qwen2Vl(m), ChatCache::Qwen(c)) => {
                let hit = c.kv.attach(seq_id, hashes);
                if hit == 0 {
                    return 0;
                }
                let mut state = RopeState::default();
                match tokens
                    .get(..hit)
                    .map(|p| m.rope_positions(&mut state, p, grids))
                {
                    Some(Ok(_)) => {
                        c.rope.insert(seq_id, state);
                        hit
                    }
                    _ => {
                        c.remove(seq_id);
                        0
                    }
                }
            }
            (_, ChatCache::Kv(c)) => c.attach(seq_id, hashes),
            (_, ChatCache::Qwen(c)) => c.kv.attach(seq_id, hashes),
        }
    }

    /// Encodes a step's images; returns each image's rows, (tokens_i, hidden).
    pub fn encode_images(&self, images: &[&ImageInput]) -> Result<Vec<Tensor>, ModelError> {
        let wrong = || ModelError::Pixels("image prepared for another model family".into());
        match self {
            ChatModel::Llava(m) => {
                let pixels = images
                    .iter()
                    .map(|i| match i {
                        ImageInput::Pixels(t) => Ok(t),
                        _ => Err(wrong()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // All together: (N, 3, H, W) -> (N, tokens_per_image, hidden)
                let feats = m.encode_images(&Tensor::stack(&pixels, 0)?)?;
                (0..pixels.len())
                    .map(|i| Ok(feats.get(i)?))
                    .collect::<Result<_, ModelError>>()
            }
            // Each image has its own grid: one vision pass per image.
            ChatModel::Qwen2Vl(m) => images
                .iter()
                .map(|i| match i {
                    ImageInput::Patches { patches, grid } => m.encode_image(patches, *grid),
                    _ => Err(wrong()),
                })
                .collect(),
            // Tiles of one image share a pass; images keep their own row blocks.
            ChatModel::Idefics3(m) => images
                .iter()
                .map(|i| match i {
                    ImageInput::Tiles { pixels, mask } => m.encode_images(pixels, mask),
                    _ => Err(wrong()),
                })
                .collect(),
        }
    }

    /// One batched step; (batch.len(), vocab) f32 logits of each sequence's last token.
    pub fn forward(
        &self,
        batch: &[StepInput<'_>],
        cache: &mut ChatCache,
    ) -> Result<Tensor, ModelError> {
        let plain = || -> Vec<SeqInput<'_>> {
            batch
                .iter()
                .map(|s| SeqInput {
                    seq_id: s.seq_id,
                    tokens: s.tokens,
                    start_pos: s.start_pos,
                    image_embeds: s.image_embeds,
                })
                .collect()
        };
        match (self, cache) {
            (ChatModel::Llava(m), ChatCache::Kv(c)) => m.forward(&plain(), c),
            (ChatModel::Idefics3(m), ChatCache::Kv(c)) => m.forward(&plain(), c),
            (ChatModel::Qwen2Vl(m), ChatCache::Qwen(c)) => {
                let seqs: Vec<Qwen2VlInput<'_>> = batch
                    .iter()
                    .map(|s| Qwen2VlInput {
                        seq_id: s.seq_id,
                        tokens: s.tokens,
                        start_pos: s.start_pos,
                        image_embeds: s.image_embeds,
                        image_grids: s.image_grids,
                    })
                    .collect();
                m.forward(&seqs, c)
            }
            _ => Err(ModelError::Batch(
                "the cache belongs to another model".into(),
            )),
        }
    }
}

/// `model_type` of a `config.json`.
fn model_type(path: &Path) -> Result<String, ModelError> {
    let map = json::parse_object(path, &json::read_file(path)?)?;
    Ok(map
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string())
}
