//! The Qwen2-VL / Qwen2.5-VL vision tower for one image: patch embedding (the Conv3d as a
//! matmul over the flattened patch), 2D rotary on (h, w) patch coordinates, the blocks with
//! per-frame (or per-window, Qwen2.5-VL) bidirectional attention, and the patch merger.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::rotary_emb::rope_thd;
use candle_nn::{layer_norm, linear, linear_b, LayerNorm, Linear, VarBuilder};

use super::config::{Qwen2VlKind, Qwen2VlVisionConfig};
use super::window::{patch_positions, WindowPlan};
use crate::model::activation::Activation;
use crate::model::attention::softmax_f32;
use crate::model::norm::RmsNorm;

/// transformers hard-codes this epsilon for every vision norm of both generations.
const NORM_EPS: f64 = 1e-6;

/// LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL).
#[derive(Debug)]
enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(kind: Qwen2VlKind, size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            Qwen2VlKind::Qwen2Vl => Self::Layer(layer_norm(size, NORM_EPS, vb)?),
            Qwen2VlKind::Qwen25Vl => Self::Rms(RmsNorm::load(size, NORM_EPS, vb)?),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Layer(n) => n.forward(xs),
            Self::Rms(n) => n.forward(xs),
        }
    }
}

/// fc1 -> act -> fc2 (Qwen2-VL) or down(act(gate) * up) with biases (Qwen2.5-VL).
#[derive(Debug)]
enum Mlp {
    Plain(Linear, Linear, Activation),
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
}

impl Mlp {
    fn load(cfg: &Qwen2VlVisionConfig, kind: Qwen2VlKind, vb: VarBuilder) -> Result<Self> {
        let (d, i, act) = (cfg.embed_dim, cfg.intermediate_size, cfg.hidden_act);
        Ok(match kind {
            Qwen2VlKind::Qwen2Vl => Self::Plain(
                linear(d, i, vb.pp("fc1"))?,
                linear(i, d, vb.pp("fc2"))?,
                act,
            ),
            Qwen2VlKind::Qwen25Vl => Self::Gated {
                gate: linear_b(d, i, true, vb.pp("gate_proj"))?,
                up: linear_b(d, i, true, vb.pp("up_proj"))?,
                down: linear_b(i, d, true, vb.pp("down_proj"))?,
                act,
            },
        })
    }

    /// (N, D) -> (N, D)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(fc1, fc2, act) => fc2.forward(&act.apply(&fc1.forward(xs)?)?),
            Self::Gated {
                gate,
                up,
                down,
                act,
            } => down.forward(&(act.apply(&gate.forward(xs)?)? * up.forward(xs)?)?),
        }
    }
}

#[derive(Debug)]
struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    norm2: Norm,
    mlp: Mlp,
    heads: usize,
}

impl Block {
    fn load(cfg: &Qwen2VlVisionConfig, kind: Qwen2VlKind, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            norm1: Norm::load(kind, d, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: linear(d, d, vb.pp("attn.proj"))?,
            norm2: Norm::load(kind, d, vb.pp("norm2"))?,
            mlp: Mlp::load(cfg, kind, vb.pp("mlp"))?,
            heads: cfg.num_heads,
        })
    }

    /// (N, D) -> (N, D); attention only within each `[start, end)` of `segments`.
    fn forward(
        &self,
        xs: &Tensor,
        rope: (&Tensor, &Tensor),
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let h = self.attention(&self.norm1.forward(xs)?, rope, segments)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.norm2.forward(&xs)?)?;
        xs + h
    }

    fn attention(
        &self,
        xs: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (n, d) = xs.dims2()?;
        let hd = d / self.heads;
        // (N, 3D) -> (N, 3, heads, hd)
        let qkv = self.qkv.forward(xs)?.reshape((n, 3, self.heads, hd))?;
        // Rotary in f32 like transformers' apply_rotary_pos_emb_vision: (N, heads, hd)
        let rotate = |x: Tensor| -> Result<Tensor> {
            let x32 = x.to_dtype(DType::F32)?.unsqueeze(0)?.contiguous()?;
            rope_thd(&x32, cos, sin)?.squeeze(0)?.to_dtype(xs.dtype())
        };
        let q = rotate(qkv.narrow(1, 0, 1)?.squeeze(1)?)?;
        let k = rotate(qkv.narrow(1, 1, 1)?.squeeze(1)?)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let scale = (hd as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, end) in segments {
            // (len, heads, hd) -> (heads, len, hd)
            let part = |x: &Tensor| {
                x.narrow(0, start, end - start)?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q, k, v) = (part(&q)?, part(&k)?, part(&v)?);
            // (heads, len, len)
            let probs = softmax_f32(&(q.matmul(&k.t()?)? * scale)?, None)?;
            // (heads, len, hd) -> (len, heads * hd)
            outs.push(
                probs
                    .matmul(&v)?
                    .transpose(0, 1)?
                    .reshape((end - start, d))?,
            );
        }
        self.proj.forward(&Tensor::cat(&outs, 0)?)
    }
}

/// `merger`: norm, then an MLP over the merge² neighbouring patches concatenated.
#[derive(Debug)]
struct Merger {
    norm: Norm,
    fc1: Linear,
    fc2: Linear,
    width: usize,
}

impl Merger {
    fn load(cfg: &Qwen2VlVisionConfig, kind: Qwen2VlKind, vb: VarBuilder) -> Result<Self> {
        let width = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            norm: Norm::load(kind, cfg.embed_dim, vb.pp("ln_q"))?,
            fc1: linear(width, width, vb.pp("mlp.0"))?,
            fc2: linear(width, cfg.out_dim, vb.pp("mlp.2"))?,
            width,
        })
    }

    /// (N, D) -> (N / merge², out)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.norm.forward(xs)?;
        let rows = xs.dim(0)? * xs.dim(1)? / self.width;
        let xs = xs.reshape((rows, self.width))?;
        // nn.GELU(): the exact erf form.
        self.fc2.forward(&self.fc1.forward(&xs)?.gelu_erf()?)
    }
}

/// The vision tower of either generation.
#[derive(Debug)]
pub struct VisionTower {
    cfg: Qwen2VlVisionConfig,
    kind: Qwen2VlKind,
    /// The Conv3d kernel as a matrix: (D, C * T * P * P).
    patch_weight: Tensor,
    /// (1, head_dim / 4) f32
    inv_freq: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
}

impl VisionTower {
    /// `vb` holds `patch_embed`, `blocks.*`, `merger`.
    pub fn load(cfg: &Qwen2VlVisionConfig, kind: Qwen2VlKind, vb: VarBuilder) -> Result<Self> {
        let (d, c, t, p) = (
            cfg.embed_dim,
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
        );
        let patch_weight = vb
            .get((d, c, t, p, p), "patch_embed.proj.weight")?
            .reshape((d, cfg.patch_dim()))?;
        // transformers' axial rope: dim = head_dim / 2, inv_freq over arange(0, dim, 2) / dim.
        let dim = cfg.head_dim() / 2;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        let n_inv = inv.len();
        let blocks = (0..cfg.depth)
            .map(|i| Block::load(cfg, kind, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            kind,
            patch_weight,
            inv_freq: Tensor::from_vec(inv, (1, n_inv), vb.device())?,
            blocks,
            merger: Merger::load(cfg, kind, vb.pp("merger"))?,
        })
    }

    /// One image's patch rows (t·h·w, C·T·P·P) with grid `[t, h, w]` -> (t·h·w / merge², out).
    pub fn forward(&self, patches: &Tensor, grid: [usize; 3]) -> Result<Tensor> {
        let merge = self.cfg.spatial_merge_size;
        // (N, C*T*P*P) x (C*T*P*P, D) -> (N, D)
        let xs = patches.matmul(&self.patch_weight.t()?)?;
        let (cos, sin) = self.rotary(&patch_positions(grid, merge))?;
        let [t, h, w] = grid;
        let frames: Vec<(usize, usize)> = (0..t).map(|i| (i * h * w, (i + 1) * h * w)).collect();
        let plan = match (self.kind, self.cfg.window_size) {
            (Qwen2VlKind::Qwen25Vl, Some(size)) => Some(WindowPlan::new(
                grid,
                merge,
                size / merge / self.cfg.patch_size,
            )),
            _ => None,
        };
        let (mut xs, cos, sin) = match &plan {
            Some(p) => {
                let order = Tensor::new(p.token_order.as_slice(), xs.device())?;
                (
                    xs.index_select(&order, 0)?,
                    cos.index_select(&order, 0)?,
                    sin.index_select(&order, 0)?,
                )
            }
            None => (xs, cos, sin),
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = match &plan {
                Some(p) if !self.cfg.fullatt_block_indexes.contains(&i) => &p.windows,
                _ => &frames,
            };
            xs = block.forward(&xs, (&cos, &sin), segments)?;
        }
        let merged = self.merger.forward(&xs)?;
        match &plan {
            Some(p) => merged.index_select(&Tensor::new(p.restore.as_slice(), xs.device())?, 0),
            None => Ok(merged),
        }
    }

    /// cos and sin (N, head_dim / 2) f32 for (h, w) patch coordinates: the first half of the
    /// frequencies from h, the second from w (transformers' `recomposition_frequencies`).
    fn rotary(&self, positions: &[[usize; 2]]) -> Result<(Tensor, Tensor)> {
        let n = positions.len();
        let axis = |a: usize| -> Result<Tensor> {
            let pos: Vec<f32> = positions.iter().map(|p| p[a] as f32).collect();
            // (N, 1) * (1, head_dim / 4) -> (N, head_dim / 4)
            Tensor::from_vec(pos, (n, 1), self.inv_freq.device())?.broadcast_mul(&self.inv_freq)
        };
        let freqs = Tensor::cat(&[axis(0)?, axis(1)?], D::Minus1)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}
