//! The language model (Llama / Qwen2 / Mistral decoder) over one flattened step: every token of
//! every sequence goes through each layer's matmuls together; only each sequence's last token
//! reaches the final norm and `lm_head`.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::activation::Activation;
use super::attention::{SelfAttention, Span};
use super::huge_pages::HugeArena;
use super::kv_cache::{KvCache, KvCacheConfig, KvShape};
use super::linear::{Linear, QuantReport};
use super::norm::RmsNorm;
use super::rope::Rotary;
use super::text_config::TextConfig;

#[derive(Debug)]
struct Mlp {
    /// gate_proj and up_proj stacked: (T, D) -> (T, 2I), gate first.
    gate_up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let parts = [(i, "gate_proj"), (i, "up_proj")];
        Ok(Self {
            gate_up: Linear::load_stacked(d, &parts, b, vb.clone())?,
            down: Linear::load(i, d, b, vb.pp("down_proj"))?,
            act: cfg.hidden_act,
        })
    }

    /// (T, D) -> (T, D)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // (T, 2I) -> (T, I)
        let h = super::activation::gated(self.act, &self.gate_up.forward(xs)?)?;
        self.down.forward(&h)
    }

    fn quantize(
        &mut self,
        dtype: GgmlDType,
        report: &mut QuantReport,
        arena: &mut HugeArena,
    ) -> Result<()> {
        for l in [&mut self.gate_up, &mut self.down] {
            l.quantize(dtype, report, arena)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: SelfAttention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(cfg: &TextConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_norm: RmsNorm::load(d, eps, vb.pp("input_layernorm"))?,
            attn: SelfAttention::load(cfg, layer, vb.pp("self_attn"))?,
            post_norm: RmsNorm::load(d, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(cfg, vb.pp("mlp"))?,
        })
    }

    /// Moves the layer's projection weights into `arena`, in the order a step reads them.
    fn pack(&mut self, arena: &mut HugeArena) -> Result<()> {
        self.attn.pack(arena)?;
        self.mlp.gate_up.pack(arena)?;
        self.mlp.down.pack(arena)
    }
}

/// Decoder body plus output head.
#[derive(Debug)]
pub struct TextModel {
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
}

impl TextModel {
    /// `body` holds `embed_tokens`, `layers.*`, `norm`; `lm_head` holds `weight`, or is `None`
    /// when the head is tied to the embeddings.
    pub fn load(cfg: &TextConfig, body: VarBuilder, lm_head: Option<VarBuilder>) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        // Each layer's weights move into the arena as it loads (one layer's copy at a time).
        let mut arena = HugeArena::default();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let mut layer = DecoderLayer::load(cfg, i, body.pp(format!("layers.{i}")))?;
                layer.pack(&mut arena)?;
                Ok(layer)
            })
            .collect::<Result<_>>()?;
        let embed_weight = body.get((v, d), "embed_tokens.weight")?;
        // The head is read whole every step; the embeddings a row a token.
        let (embed_weight, head_weight) = match lm_head {
            Some(vb) => (embed_weight, arena.put(&vb.get((v, d), "weight")?)?),
            None => {
                let tied = arena.put(&embed_weight)?;
                (tied.clone(), tied)
            }
        };
        Ok(Self {
            embed: Embedding::new(embed_weight, d),
            layers,
            norm: RmsNorm::load(d, cfg.rms_norm_eps, body.pp("norm"))?,
            lm_head: Linear::from_weight(head_weight),
            rotary: Rotary::new(&cfg.rope, cfg.head_dim, body.device())?,
        })
    }

    /// Quantizes every layer's attention and MLP projections in place, and for Q8_0 the
    /// `lm_head` too (as llama.cpp's Q8_0 files do: a fifth of a small model's bytes are the
    /// head's; the K-quants' coarser rounding would land on the logits unscaled, so they leave
    /// it). The embeddings and norms stay as loaded.
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<QuantReport> {
        let (mut report, mut arena) = (QuantReport::default(), HugeArena::default());
        for layer in &mut self.layers {
            layer.attn.quantize(dtype, &mut report, &mut arena)?;
            layer.mlp.quantize(dtype, &mut report, &mut arena)?;
        }
        if dtype == GgmlDType::Q8_0 {
            self.lm_head.quantize(dtype, &mut report, &mut arena)?;
        }
        Ok(report)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The shape of this decoder's keys and values.
    pub fn kv_shape(&self) -> KvShape {
        let (kv_heads, head_dim) = self.layers.first().map_or((0, 0), |l| l.attn.kv_dims());
        let weight = self.embed.embeddings();
        KvShape {
            num_layers: self.layers.len(),
            kv_heads,
            head_dim,
            dtype: weight.dtype(),
            device: weight.device().clone(),
        }
    }

    /// An empty paged cache for this decoder, as big as `cfg` allows.
    pub fn new_cache(&self, cfg: &KvCacheConfig) -> Result<KvCache> {
        KvCache::new(&self.kv_shape(), cfg)
    }

    /// Token embeddings: ids (T,) u32 -> (T, D).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// Runs the flattened step `xs` (T, D) whose rows belong to `spans` at `positions` (T,),
    /// and returns the logits of each span's last token: (spans, vocab) f32.
    pub fn forward(
        &self,
        xs: &Tensor,
        positions: &[usize],
        spans: &[Span],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(positions, xs.dtype())?;
        self.forward_rotated(xs, (&cos, &sin), spans, cache)
    }

    /// Like [`Self::forward`] with each token's rotary `cos`/`sin` given directly, each
    /// (T, head_dim / 2) in the activation dtype (multimodal rotary, e.g. Qwen2-VL's M-RoPE).
    pub(crate) fn forward_rotated(
        &self,
        xs: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        spans: &[Span],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h =
                layer
                    .attn
                    .forward(&layer.input_norm.forward(&xs)?, (cos, sin), spans, i, cache)?;
            xs = (xs + h)?;
            let h = layer.mlp.forward(&layer.post_norm.forward(&xs)?)?;
            xs = (xs + h)?;
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let last = Tensor::new(last.as_slice(), xs.device())?;
        // (spans, D) -> (spans, vocab)
        let hidden = self.norm.forward(&xs.index_select(&last, 0)?)?;
        self.lm_head.forward(&hidden)?.to_dtype(DType::F32)
    }
}
