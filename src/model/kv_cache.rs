//! `KvCache`: the keys and values of every running sequence, per decoder layer.
//!
//! The engine owns one cache and passes it to each `LlavaModel::forward`. Each (sequence, layer)
//! holds a `(kv_heads, capacity, head_dim)` buffer that grows in blocks of [`GROWTH_TOKENS`];
//! new keys are written after the committed length, and the length only advances once a whole
//! step succeeded, so a failed step leaves every sequence as it was.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

/// Buffers grow to the next multiple of this many positions (bounds the copying on growth to
/// 1/64 of the per-token attention reads, and the slack to 63 positions per sequence).
pub const GROWTH_TOKENS: usize = 64;

/// One layer's keys and values for one sequence.
#[derive(Debug)]
struct LayerKv {
    /// (kv_heads, capacity, head_dim)
    k: Tensor,
    /// (kv_heads, capacity, head_dim)
    v: Tensor,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims().get(1).copied().unwrap_or(0)
    }
}

#[derive(Debug)]
struct SeqKv {
    /// Committed positions (the sequence's length as the model has seen it).
    len: usize,
    layers: Vec<Option<LayerKv>>,
}

/// Per-sequence, per-layer key/value storage for batched decoding.
#[derive(Debug)]
pub struct KvCache {
    num_layers: usize,
    seqs: HashMap<u64, SeqKv>,
}

impl KvCache {
    /// An empty cache for a decoder of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            num_layers,
            seqs: HashMap::new(),
        }
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Positions cached for `seq_id` (0 for an unknown sequence): the next `start_pos`.
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, |s| s.len)
    }

    pub fn contains(&self, seq_id: u64) -> bool {
        self.seqs.contains_key(&seq_id)
    }

    /// Drops a sequence's keys and values (nothing happens for an unknown sequence).
    pub fn remove(&mut self, seq_id: u64) {
        self.seqs.remove(&seq_id);
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Bytes held by all key/value buffers (capacity, not just committed positions).
    pub fn bytes(&self) -> usize {
        let tensor_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.seqs
            .values()
            .flat_map(|s| s.layers.iter().flatten())
            .map(|l| tensor_bytes(&l.k) + tensor_bytes(&l.v))
            .sum()
    }

    /// Writes `k`, `v` (each `(kv_heads, t, head_dim)`) after the committed length of `seq_id`
    /// in `layer`, and returns all keys and values up to them: `(kv_heads, len + t, head_dim)`.
    /// The length itself only advances with [`Self::commit`].
    pub(crate) fn append(
        &mut self,
        seq_id: u64,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let num_layers = self.num_layers;
        let seq = self.seqs.entry(seq_id).or_insert_with(|| SeqKv {
            len: 0,
            layers: (0..num_layers).map(|_| None).collect(),
        });
        let len = seq.len;
        let slot = seq
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))?;
        let total = len + k.dim(1)?;
        let kv = match slot.take() {
            Some(kv) if kv.capacity() >= total => slot.insert(kv),
            old => match grow(old.as_ref(), k, len, total) {
                Ok(grown) => slot.insert(grown),
                Err(e) => {
                    *slot = old;
                    return Err(e);
                }
            },
        };
        kv.k.slice_set(k, 1, len)?;
        kv.v.slice_set(v, 1, len)?;
        Ok((kv.k.narrow(1, 0, total)?, kv.v.narrow(1, 0, total)?))
    }

    /// Advances `seq_id`'s committed length by `tokens` after a successful step.
    pub(crate) fn commit(&mut self, seq_id: u64, tokens: usize) {
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.len += tokens;
        }
    }
}

/// A buffer with room for `total` positions holding the first `len` positions of `old`.
fn grow(old: Option<&LayerKv>, like: &Tensor, len: usize, total: usize) -> Result<LayerKv> {
    let capacity = total.div_ceil(GROWTH_TOKENS) * GROWTH_TOKENS;
    let (heads, _, head_dim) = like.dims3()?;
    let widen = |old: Option<&Tensor>| -> Result<Tensor> {
        let fresh = |n: usize| Tensor::zeros((heads, n, head_dim), like.dtype(), like.device());
        match old {
            Some(t) if len > 0 => Tensor::cat(&[&t.narrow(1, 0, len)?, &fresh(capacity - len)?], 1),
            _ => fresh(capacity),
        }
    };
    Ok(LayerKv {
        k: widen(old.map(|o| &o.k))?,
        v: widen(old.map(|o| &o.v))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn kv(t: usize, value: f32) -> Result<Tensor> {
        Tensor::full(value, (2, t, 4), &Device::Cpu)
    }

    #[test]
    fn appends_grows_and_commits() -> Result<()> {
        let mut cache = KvCache::new(2);
        let (k, _) = cache.append(7, 0, &kv(3, 1.0)?, &kv(3, 1.0)?)?;
        assert_eq!(k.dims(), &[2, 3, 4]);
        assert_eq!(cache.seq_len(7), 0, "not committed yet");
        cache.append(7, 1, &kv(3, 1.0)?, &kv(3, 1.0)?)?;
        cache.commit(7, 3);
        assert_eq!(cache.seq_len(7), 3);
        // Grow past one block: old values survive the copy.
        let (k, v) = cache.append(7, 0, &kv(GROWTH_TOKENS, 2.0)?, &kv(GROWTH_TOKENS, 2.0)?)?;
        assert_eq!(k.dims(), &[2, 3 + GROWTH_TOKENS, 4]);
        let first: Vec<f32> = k.narrow(1, 0, 3)?.flatten_all()?.to_vec1()?;
        assert!(first.iter().all(|&x| x == 1.0));
        assert_eq!(
            v.narrow(1, 3, 1)?.flatten_all()?.to_vec1::<f32>()?,
            vec![2.0; 8]
        );
        // Layer 0 holds two blocks, layer 1 one block; 4-byte f32, k and v.
        let block = 2 * GROWTH_TOKENS * 4 * DType::F32.size_in_bytes() * 2;
        assert_eq!(cache.bytes(), 3 * block);
        cache.remove(7);
        cache.remove(7);
        assert!(!cache.contains(7));
        assert_eq!((cache.num_seqs(), cache.bytes()), (0, 0));
        Ok(())
    }

    #[test]
    fn uncommitted_writes_are_overwritten() -> Result<()> {
        let mut cache = KvCache::new(1);
        cache.append(1, 0, &kv(2, 5.0)?, &kv(2, 5.0)?)?;
        // The step failed before commit: the retry writes at the same place.
        let (k, _) = cache.append(1, 0, &kv(1, 3.0)?, &kv(1, 3.0)?)?;
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, vec![3.0; 8]);
        Ok(())
    }
}
