//! The vision tower: CLIP or SigLIP ViT encoder, run only as deep as the selected hidden states.
//!
//! Hidden states are indexed like transformers' `hidden_states` tuple: index 0 is the embedding
//! output (after `pre_layrnorm` for CLIP), index i the output of encoder layer i. The final
//! `post_layernorm` and SigLIP's pooling head are not part of any hidden state and are not loaded.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::activation::Activation;
use super::attention::softmax_f32;
use super::config::{VisionConfig, VisionKind};
use super::linear::EncoderLinear as Linear;

/// Most bytes of attention scores computed at once (heads are taken in groups under it).
const SCORES_BYTES: usize = 16 << 20;

#[derive(Debug)]
struct VisionAttention {
    /// q_proj, k_proj and v_proj stacked: (N, S, D) -> (N, S, 3 D).
    qkv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn load(shape: &EncoderShape, vb: VarBuilder) -> Result<Self> {
        let d = shape.hidden;
        Ok(Self {
            qkv: Linear::load_stacked(d, &[(d, "q_proj"), (d, "k_proj"), (d, "v_proj")], &vb)?,
            out: Linear::load(d, d, vb.pp("out_proj"))?,
            heads: shape.heads,
            head_dim: shape.head_dim,
        })
    }

    /// Bidirectional self-attention: (N, S, D) -> (N, S, D). `mask`, when given, is added to
    /// the f32 scores (broadcast to (N, heads, S, S); `-inf` hides a key).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (n, s, d) = xs.dims3()?;
        // (N, S, D) -> (N, heads, S, head_dim)
        let split = |t: Tensor| {
            t.reshape((n, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        // Scaling the queries rather than the (S x S) scores: S / head_dim times less work,
        // the same product up to one rounding.
        let scale = (self.head_dim as f64).powf(-0.5);
        // (N, S, 3 D)
        let qkv = self.qkv.forward(xs)?;
        if mask.is_none() {
            let fused = super::encoder_attention::attention(&qkv, self.heads, scale as f32);
            if let Some(ctx) = fused? {
                return self.out.forward(&ctx);
            }
        }
        let part = |i: usize| qkv.narrow(2, i * d, d);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let (q, k, v) = (split((q * scale)?)?, split(k)?, split(v)?);
        // A few heads at a time keep the (N, heads, S, S) scores small: 48 MiB for one
        // 1024-patch tile with 12 heads would be mapped fresh (and page-faulted) by every layer.
        let per = (SCORES_BYTES / (n * s * s * 4).max(1)).clamp(1, self.heads);
        let mut ctx = Vec::with_capacity(self.heads.div_ceil(per));
        for first in (0..self.heads).step_by(per) {
            let len = per.min(self.heads - first);
            let part = |t: &Tensor| t.narrow(1, first, len)?.contiguous();
            // (N, len, S, S)
            let scores = part(&q)?.matmul(&part(&k)?.t()?)?;
            let probs = softmax_f32(&scores, mask)?;
            ctx.push(probs.matmul(&part(&v)?)?);
        }
        // (N, heads, S, head_dim) -> (N, S, D)
        let ctx = Tensor::cat(&ctx, 1)?.transpose(1, 2)?.reshape((n, s, d))?;
        self.out.forward(&ctx)
    }
}

/// The sizes of a pre-norm transformer encoder layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderShape {
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub eps: f64,
    pub act: Activation,
}

impl EncoderShape {
    fn of(cfg: &VisionConfig) -> Self {
        EncoderShape {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            intermediate: cfg.intermediate_size,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        }
    }
}

/// One pre-norm encoder layer: the ViT towers (CLIP / SigLIP / Idefics3) and the
/// CLIP / SigLIP text towers share it.
#[derive(Debug)]
pub(crate) struct EncoderLayer {
    norm1: LayerNorm,
    attn: VisionAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_shaped(&EncoderShape::of(cfg), vb)
    }

    pub(crate) fn load_shaped(shape: &EncoderShape, vb: VarBuilder) -> Result<Self> {
        let (d, eps, inner) = (shape.hidden, shape.eps, shape.intermediate);
        Ok(Self {
            norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            attn: VisionAttention::load(shape, vb.pp("self_attn"))?,
            norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
            fc1: Linear::load(d, inner, vb.pp("mlp.fc1"))?,
            fc2: Linear::load(inner, d, vb.pp("mlp.fc2"))?,
            act: shape.act,
        })
    }

    /// Runs the layer's projections as the bf16x3 product where the machine has it
    /// (`EncoderLinear::use_bf16x3`): how many do.
    pub(crate) fn use_bf16x3(&mut self) -> Result<usize> {
        let mut n = 0;
        for l in [
            &mut self.attn.qkv,
            &mut self.attn.out,
            &mut self.fc1,
            &mut self.fc2,
        ] {
            n += usize::from(l.use_bf16x3()?);
        }
        Ok(n)
    }

    /// (N, S, D) -> (N, S, D); `mask` as in [`VisionAttention::forward`].
    pub(crate) fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, mask)?)?;
        let h = self
            .act
            .apply_owned(self.fc1.forward(&self.norm2.forward(&xs)?)?)?;
        xs + self.fc2.forward(&h)?
    }
}

/// A ViT encoder truncated after the deepest selected hidden state.
#[derive(Debug)]
pub struct VisionTower {
    patch: usize,
    /// Patch embedding as a matrix: (D, C * patch * patch).
    patch_weight: Tensor,
    /// (D,) — SigLIP only.
    patch_bias: Option<Tensor>,
    /// (D,) — CLIP only.
    class_embedding: Option<Tensor>,
    /// (S, D)
    position_embedding: Tensor,
    /// CLIP's `pre_layrnorm`.
    pre_norm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    /// Selected hidden-state indices, resolved to 0..=num_hidden_layers.
    selected: Vec<usize>,
}

impl VisionTower {
    /// Runs the encoder layers' projections as the bf16x3 product where the machine has it:
    /// how many do.
    pub fn use_bf16x3(&mut self) -> Result<usize> {
        self.layers.iter_mut().map(EncoderLayer::use_bf16x3).sum()
    }

    /// `feature_layers` as in `vision_feature_layer` (negative counts from the end).
    pub fn load(cfg: &VisionConfig, feature_layers: &[i64], vb: VarBuilder) -> Result<Self> {
        let total = cfg.num_hidden_layers as i64 + 1;
        let selected: Vec<usize> = feature_layers
            .iter()
            .map(|&l| (if l < 0 { l + total } else { l }) as usize)
            .collect();
        let depth = selected.iter().copied().max().unwrap_or(0);
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_weight = emb
            .get((d, c, p, p), "patch_embedding.weight")?
            .reshape((d, c * p * p))?;
        let (patch_bias, class_embedding, pre_norm) = match cfg.kind {
            VisionKind::Siglip => (Some(emb.get(d, "patch_embedding.bias")?), None, None),
            VisionKind::Clip => (
                None,
                Some(emb.get(d, "class_embedding")?),
                Some(layer_norm(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?),
            ),
        };
        let layers = (0..depth)
            .map(|i| EncoderLayer::load(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch: p,
            patch_weight,
            patch_bias,
            class_embedding,
            position_embedding: emb.get((cfg.seq_len(), d), "position_embedding.weight")?,
            pre_norm,
            layers,
            selected,
        })
    }

    /// Patch + position embeddings: pixels (N, C, H, W) in the model dtype -> (N, S, D).
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // The stride-p conv as one matmul: (N, C, gh, p, gw, p) -> (N * gh * gw, C * p * p).
        let patches = pixels
            .reshape((n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n * gh * gw, c * p * p))?;
        let mut xs = patches.matmul(&self.patch_weight.t()?)?;
        if let Some(b) = &self.patch_bias {
            xs = xs.broadcast_add(b)?;
        }
        let d = xs.dim(1)?;
        let mut xs = xs.reshape((n, gh * gw, d))?;
        if let Some(cls) = &self.class_embedding {
            let cls = cls.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
            xs = Tensor::cat(&[&cls, &xs], 1)?;
        }
        let xs = xs.broadcast_add(&self.position_embedding)?;
        match &self.pre_norm {
            Some(norm) => norm.forward(&xs),
            None => Ok(xs),
        }
    }

    /// The selected hidden states, in `vision_feature_layer` order, each (N, S, D).
    pub fn hidden_states(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let mut kept: Vec<Option<Tensor>> = vec![None; self.selected.len()];
        let mut keep = |index: usize, xs: &Tensor| {
            for (slot, _) in kept
                .iter_mut()
                .zip(&self.selected)
                .filter(|(_, &s)| s == index)
            {
                *slot = Some(xs.clone());
            }
        };
        let mut xs = self.embed(pixels)?;
        keep(0, &xs);
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, None)?;
            keep(i + 1, &xs);
        }
        kept.into_iter()
            .map(|t| {
                t.ok_or_else(|| candle_core::Error::Msg("vision feature layer out of range".into()))
            })
            .collect()
    }
}
