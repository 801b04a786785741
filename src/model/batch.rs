//! One engine step's input (`SeqInput`) and its validated, flattened plan: where each sequence's
//! tokens sit in the (T, D) activations, their positions, and which rows come from images.

use std::collections::HashSet;

use candle_core::Tensor;

use super::attention::Span;
use super::kv_cache::KvCache;
use super::ModelError;

/// New tokens of one sequence for this step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub seq_id: u64,
    /// Tokens appended this step (a prefill chunk or one decode token); non-empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; must equal the cache's length for `seq_id`.
    pub start_pos: usize,
    /// (n_image_tokens, text_hidden): one row per image token in `tokens`, in order. `None`:
    /// image tokens embed as ordinary tokens (transformers without `pixel_values`).
    pub image_embeds: Option<&'a Tensor>,
}

/// What the model needs to know about its vocabulary to check a step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub num_layers: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub image_token_id: u32,
}

/// A checked step, flattened.
#[derive(Debug)]
pub(crate) struct StepPlan<'a> {
    pub spans: Vec<Span>,
    /// Every token of the step, sequence after sequence: (T,).
    pub ids: Vec<u32>,
    /// Position of each token: (T,).
    pub positions: Vec<usize>,
    /// Image rows in order of appearance, each (n_i, D).
    pub images: Vec<&'a Tensor>,
    /// For each token, its row in `[text embeddings (T rows); image rows]`; `None` without images.
    pub gather: Option<Vec<u32>>,
}

impl<'a> StepPlan<'a> {
    /// Validates `batch` against `cache` and `limits` without touching either.
    pub fn new(
        batch: &[SeqInput<'a>],
        cache: &KvCache,
        limits: Limits,
    ) -> Result<Self, ModelError> {
        if batch.is_empty() {
            return Err(ModelError::Batch("empty batch".into()));
        }
        if cache.num_layers() != limits.num_layers {
            return Err(ModelError::Batch(format!(
                "cache has {} layers, model {}",
                cache.num_layers(),
                limits.num_layers
            )));
        }
        let mut seen = HashSet::new();
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut plan = StepPlan {
            spans: Vec::with_capacity(batch.len()),
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            images: Vec::new(),
            gather: None,
        };
        let mut gather = Vec::with_capacity(total);
        let mut image_rows = 0usize;
        for seq in batch {
            if !seen.insert(seq.seq_id) {
                return Err(ModelError::Batch(format!(
                    "sequence {} appears twice",
                    seq.seq_id
                )));
            }
            let n_images = check_seq(seq, cache, limits)?;
            let offset = plan.ids.len();
            for (i, &tok) in seq.tokens.iter().enumerate() {
                if n_images > 0 && tok == limits.image_token_id {
                    gather.push((total + image_rows) as u32);
                    image_rows += 1;
                } else {
                    gather.push((offset + i) as u32);
                }
            }
            if let Some(rows) = seq.image_embeds.filter(|_| n_images > 0) {
                plan.images.push(rows);
            }
            plan.ids.extend_from_slice(seq.tokens);
            plan.positions
                .extend(seq.start_pos..seq.start_pos + seq.tokens.len());
            plan.spans.push(Span {
                seq_id: seq.seq_id,
                offset,
                len: seq.tokens.len(),
                start_pos: seq.start_pos,
            });
        }
        plan.gather = (image_rows > 0).then_some(gather);
        Ok(plan)
    }
}

/// Checks one sequence; returns how many of its tokens take image rows.
fn check_seq(seq: &SeqInput<'_>, cache: &KvCache, limits: Limits) -> Result<usize, ModelError> {
    let err = |m: String| ModelError::input(seq.seq_id, m);
    if seq.tokens.is_empty() {
        return Err(err("no tokens".into()));
    }
    let cached = cache.seq_len(seq.seq_id);
    if seq.start_pos != cached {
        return Err(err(format!(
            "start_pos {} but {cached} positions cached",
            seq.start_pos
        )));
    }
    if let Some(&bad) = seq
        .tokens
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(err(format!(
            "token id {bad} outside the vocabulary ({})",
            limits.vocab_size
        )));
    }
    // Without rows, image tokens embed as ordinary tokens, as in transformers when no
    // pixel_values are given (e.g. a generated image token fed back while decoding).
    let Some(rows) = seq.image_embeds else {
        return Ok(0);
    };
    let n_rows = match rows.dims() {
        &[n, d] if d == limits.hidden_size => n,
        dims => {
            return Err(err(format!(
                "image_embeds must be (rows, {}), got {dims:?}",
                limits.hidden_size
            )))
        }
    };
    let n_tokens = seq
        .tokens
        .iter()
        .filter(|&&t| t == limits.image_token_id)
        .count();
    if n_tokens != n_rows {
        return Err(err(format!(
            "{n_tokens} image tokens but {n_rows} image embedding rows"
        )));
    }
    Ok(n_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn cache() -> candle_core::Result<KvCache> {
        let shape = crate::model::KvShape {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
            device: Device::Cpu,
        };
        KvCache::new(&shape, &crate::model::KvCacheConfig::with_bytes(4, 1 << 12))
    }

    const LIMITS: Limits = Limits {
        num_layers: 1,
        vocab_size: 10,
        hidden_size: 4,
        image_token_id: 9,
    };

    #[test]
    fn flattens_and_gathers_image_rows() -> Result<(), ModelError> {
        let img = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let cache = cache()?;
        let batch = [
            SeqInput {
                seq_id: 1,
                tokens: &[1, 2],
                start_pos: 0,
                image_embeds: None,
            },
            SeqInput {
                seq_id: 2,
                tokens: &[3, 9, 9, 4],
                start_pos: 0,
                image_embeds: Some(&img),
            },
        ];
        let plan = StepPlan::new(&batch, &cache, LIMITS)?;
        assert_eq!(plan.positions, vec![0, 1, 0, 1, 2, 3]);
        assert_eq!(
            plan.spans[1],
            Span {
                seq_id: 2,
                offset: 2,
                len: 4,
                start_pos: 0
            }
        );
        // Text rows keep their index; image tokens point past the 6 text rows.
        assert_eq!(plan.gather, Some(vec![0, 1, 2, 6, 7, 5]));
        Ok(())
    }

    #[test]
    fn rejects_inconsistent_input() -> Result<(), ModelError> {
        let img = Tensor::zeros((1, 4), DType::F32, &Device::Cpu)?;
        let cache = cache()?;
        let one = |seq: SeqInput<'_>| {
            StepPlan::new(&[seq], &cache, LIMITS)
                .err()
                .map(|e| e.to_string())
        };
        let base = SeqInput {
            seq_id: 5,
            tokens: &[9, 9],
            start_pos: 0,
            image_embeds: Some(&img),
        };
        assert_eq!(
            one(base).as_deref(),
            Some("sequence 5: 2 image tokens but 1 image embedding rows")
        );
        let no_rows = SeqInput {
            image_embeds: None,
            ..base
        };
        assert_eq!(
            one(no_rows),
            None,
            "image tokens without rows are plain tokens"
        );
        let late = SeqInput {
            tokens: &[1],
            start_pos: 3,
            image_embeds: None,
            ..base
        };
        assert_eq!(
            one(late).as_deref(),
            Some("sequence 5: start_pos 3 but 0 positions cached")
        );
        let oov = SeqInput {
            tokens: &[10],
            image_embeds: None,
            ..base
        };
        assert!(one(oov).is_some_and(|e| e.contains("outside the vocabulary")));
        let ok = SeqInput {
            tokens: &[1],
            image_embeds: None,
            ..base
        };
        assert!(StepPlan::new(&[ok], &cache, LIMITS).is_ok());
        let dup = [ok, ok];
        assert!(StepPlan::new(&dup, &cache, LIMITS).is_err());
        assert!(StepPlan::new(&[], &cache, LIMITS).is_err());
        Ok(())
    }
}
