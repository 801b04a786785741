//! The text tower of CLIP / SigLIP: token + position embeddings, pre-norm encoder layers
//! (causal for CLIP, bidirectional for SigLIP), `final_layer_norm`, and the pooled row.
//!
//! Texts of different lengths run as one right-padded batch. That is exact only under a causal
//! mask (padding comes after every real token, so no real row ever sees it), which is why
//! bidirectional (SigLIP) batches must arrive at one common length.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

use super::super::attention::causal_mask;
use super::super::vision::{EncoderLayer, EncoderShape};
use super::config::{TextPool, TextTowerConfig};

/// `text_model`: everything up to the pooled (pre-projection) text feature.
#[derive(Debug)]
pub struct TextTower {
    token_embedding: Embedding,
    /// (max_position_embeddings, D)
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    pool: TextPool,
    causal: bool,
}

impl TextTower {
    /// `vb` points at `text_model`.
    pub fn load(cfg: &TextTowerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let shape = EncoderShape {
            hidden: d,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            intermediate: cfg.intermediate_size,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load_shaped(&shape, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, d),
                "position_embedding.weight",
            )?,
            layers,
            final_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            pool: cfg.pool,
            causal: cfg.causal,
        })
    }

    /// Pooled features of each text: (N, D) in the model dtype. Texts may differ in length
    /// only when the tower is causal; each must be non-empty and fit the position table
    /// (the caller checks).
    pub fn pooled(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        if !self.causal && ids.iter().any(|t| t.len() != longest) {
            candle_core::bail!("bidirectional text batches must share one length");
        }
        // Right-pad with id 0: under the causal mask no real position attends to it.
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|t| t.iter().copied().chain(std::iter::repeat(0)).take(longest))
            .collect();
        let input = Tensor::from_vec(flat, (ids.len(), longest), device)?;
        let hidden = self.last_hidden(&input)?;
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, t)| (i * longest + pool_position(self.pool, t)) as u32)
            .collect();
        let rows = Tensor::new(rows, device)?;
        let d = hidden.dim(2)?;
        // (N * L, D) -> (N, D)
        hidden
            .reshape((ids.len() * longest, d))?
            .index_select(&rows, 0)
    }

    /// Token ids (N, L) u32 -> `final_layer_norm` output (N, L, D).
    fn last_hidden(&self, input: &Tensor) -> Result<Tensor> {
        let l = input.dim(1)?;
        let positions = self.position_embedding.narrow(0, 0, l)?;
        let mut xs = self
            .token_embedding
            .forward(input)?
            .broadcast_add(&positions)?;
        let mask = match self.causal {
            true => causal_mask(l, 0, 0, None, input.device())?,
            false => None,
        };
        for layer in &self.layers {
            xs = layer.forward(&xs, mask.as_ref())?;
        }
        self.final_norm.forward(&xs)
    }
}

/// The row of one (unpadded) text that transformers pools.
pub fn pool_position(pool: TextPool, ids: &[u32]) -> usize {
    match pool {
        // torch.argmax returns the first maximal index; `max_by_key` the last, hence `rev`.
        TextPool::ArgmaxId => ids
            .iter()
            .enumerate()
            .rev()
            .max_by_key(|(_, &id)| id)
            .map_or(0, |(i, _)| i),
        TextPool::FirstOf(eos) => ids.iter().position(|&id| id == eos).unwrap_or(0),
        TextPool::Last => ids.len().saturating_sub(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_positions_follow_transformers() {
        let ids = [49406, 320, 49407, 49407, 49407];
        assert_eq!(pool_position(TextPool::ArgmaxId, &ids), 2);
        assert_eq!(pool_position(TextPool::FirstOf(49407), &ids), 2);
        assert_eq!(pool_position(TextPool::FirstOf(7), &ids), 0);
        assert_eq!(pool_position(TextPool::Last, &ids), 4);
        assert_eq!(pool_position(TextPool::ArgmaxId, &[5, 1, 5]), 0);
    }
}
