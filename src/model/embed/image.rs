//! The image side of CLIP / SigLIP: the shared ViT [`VisionTower`] run to its last layer, then
//! `post_layernorm` and the family's pooling — CLIP's class token, or SigLIP's multihead
//! attention pooling head (`head.*`) — giving the pooled (pre-projection) image feature.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use super::super::activation::Activation;
use super::super::attention::softmax_f32;
use super::super::config::{VisionConfig, VisionKind};
use super::super::vision::VisionTower;

/// SigLIP's `SiglipMultiheadAttentionPoolingHead`: one learned query (`probe`) attends over
/// every patch through `nn.MultiheadAttention`, then a pre-norm MLP block.
#[derive(Debug)]
struct AttentionPool {
    /// The probe after the query projection: (1, 1, D).
    query: Tensor,
    /// Key and value projections, cut from `in_proj_weight` / `in_proj_bias`.
    k: Linear,
    v: Linear,
    out: Linear,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    heads: usize,
    head_dim: usize,
}

impl AttentionPool {
    /// `vb` points at `vision_model.head`.
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("attention");
        // (3D, D) / (3D,): rows are the q, k, v projections in that order.
        let w = attn.get((3 * d, d), "in_proj_weight")?.chunk(3, 0)?;
        let b = attn.get(3 * d, "in_proj_bias")?.chunk(3, 0)?;
        let probe = vb.get((1, 1, d), "probe")?;
        // (1, 1, D) @ (D, D) + (D,) — the query never depends on the image.
        let query = probe.broadcast_matmul(&w[0].t()?)?.broadcast_add(&b[0])?;
        Ok(Self {
            query,
            k: Linear::new(w[1].clone(), Some(b[1].clone())),
            v: Linear::new(w[2].clone(), Some(b[2].clone())),
            out: linear(d, d, attn.pp("out_proj"))?,
            norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// (N, S, D) -> (N, D)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, s, d) = xs.dims3()?;
        // (N, S, D) -> (N, heads, S, head_dim)
        let project = |proj: &Linear| {
            proj.forward(xs)?
                .reshape((n, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = project(&self.k)?;
        let v = project(&self.v)?;
        // (1, 1, D) -> (N, heads, 1, head_dim)
        let q = self
            .query
            .reshape((1, self.heads, 1, self.head_dim))?
            .broadcast_as((n, self.heads, 1, self.head_dim))?
            .contiguous()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        // (N, heads, 1, S)
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = softmax_f32(&scores, None)?;
        // (N, heads, 1, head_dim) -> (N, D)
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, d))?;
        let pooled = self.out.forward(&ctx)?;
        let h = self
            .act
            .apply(&self.fc1.forward(&self.norm.forward(&pooled)?)?)?;
        pooled + self.fc2.forward(&h)?
    }
}

/// `vision_model` up to the pooled output (`pooler_output` in transformers).
#[derive(Debug)]
pub struct ImageTower {
    tower: VisionTower,
    post_norm: LayerNorm,
    /// SigLIP only; CLIP pools the class token.
    head: Option<AttentionPool>,
}

impl ImageTower {
    /// `vb` points at `vision_model`.
    pub fn load(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let last = cfg.num_hidden_layers as i64;
        Ok(Self {
            tower: VisionTower::load(cfg, &[last], vb.clone())?,
            post_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            head: match cfg.kind {
                VisionKind::Clip => None,
                VisionKind::Siglip => Some(AttentionPool::load(cfg, vb.pp("head"))?),
            },
        })
    }

    /// Pixels (N, C, H, W) in the model dtype -> pooled features (N, D).
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let last = self.tower.hidden_states(pixels)?.pop().ok_or_else(|| {
            candle_core::Error::Msg("vision tower returned no hidden state".into())
        })?;
        match &self.head {
            // CLIP: post_layernorm(last[:, 0]).
            None => self
                .post_norm
                .forward(&last.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?),
            // SigLIP: head(post_layernorm(last)).
            Some(head) => head.forward(&self.post_norm.forward(&last)?),
        }
    }
}
