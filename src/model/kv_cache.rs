//! `KvCache`: the paged keys and values of every running sequence.
//!
//! One pool per decoder layer, `(num_blocks * block_size, kv_heads, head_dim)` for keys and the
//! same for values, sized once from a byte budget ([`KvCacheConfig`]); each sequence owns whole
//! blocks of it through its block table (`blocks`), so sequences of any length share the pool
//! without copying on growth and without padding to the longest. A step reserves its blocks
//! ([`KvCache::reserve`]), writes its new keys into their slots, reads each sequence's keys back
//! in position order, and commits only once the whole step succeeded (else rolls back), so a
//! failed step leaves every sequence as it was.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use super::attention::Span;
use super::block_pool::BlockHash;
use super::blocks::{BlockTables, OutOfBlocks};

/// How big the pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Positions per block.
    pub block_size: usize,
    /// Bytes the pool (keys and values of every layer) may take.
    pub max_bytes: usize,
    /// Positions worth holding at most (e.g. seats × context); caps the pool below the budget.
    pub max_tokens: usize,
}

impl KvCacheConfig {
    /// A pool of `max_bytes` in blocks of `block_size`, not capped by a token count.
    pub fn with_bytes(block_size: usize, max_bytes: usize) -> Self {
        Self {
            block_size,
            max_bytes,
            max_tokens: usize::MAX,
        }
    }
}

/// The shape of a decoder's keys and values.
#[derive(Debug, Clone)]
pub struct KvShape {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub device: Device,
}

impl KvShape {
    /// Bytes one position takes over all layers, keys and values.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * 2 * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

/// One layer's pools.
#[derive(Debug)]
struct LayerPool {
    /// (slots, kv_heads, head_dim)
    k: Tensor,
    /// (slots, kv_heads, head_dim)
    v: Tensor,
}

/// Paged key/value storage for batched decoding.
#[derive(Debug)]
pub struct KvCache {
    tables: BlockTables,
    layers: Vec<LayerPool>,
    /// Per sequence of the step being run: the pool slot of each of its positions, (len + t,)
    /// u32, so every layer reads its keys with one gather.
    slots: HashMap<u64, Tensor>,
    /// The same slots on the host, for the CPU's decode attention to read the pool directly.
    slot_ids: HashMap<u64, Vec<u32>>,
    block_bytes: usize,
}

impl KvCache {
    /// A pool for `shape` as big as `cfg` allows, all of it allocated and (on the CPU) written
    /// now. Fails when not one block fits.
    pub fn new(shape: &KvShape, cfg: &KvCacheConfig) -> Result<Self> {
        let bs = cfg.block_size.max(1);
        let block_bytes = shape.bytes_per_token() * bs;
        let num_blocks = (cfg.max_bytes / block_bytes.max(1)).min(cfg.max_tokens.div_ceil(bs));
        if num_blocks == 0 {
            candle_core::bail!(
                "a KV cache of {} bytes holds no block of {bs} positions ({block_bytes} bytes)",
                cfg.max_bytes
            );
        }
        let pool = || {
            let dims = (num_blocks * bs, shape.kv_heads, shape.head_dim);
            let t = Tensor::zeros(dims, shape.dtype, &shape.device)?;
            // On the CPU fresh zeroed pages are only mapped when first written: writing them
            // now takes the whole budget at start (as vLLM and llama.cpp do), so the memory
            // stays flat under load and a budget the machine cannot hold stops the server here.
            if t.device().is_cpu() {
                t.zero_set()?;
            }
            Ok::<_, candle_core::Error>(t)
        };
        let layers = (0..shape.num_layers)
            .map(|_| {
                Ok(LayerPool {
                    k: pool()?,
                    v: pool()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            tables: BlockTables::new(bs, num_blocks),
            layers,
            slots: HashMap::new(),
            slot_ids: HashMap::new(),
            block_bytes,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn block_size(&self) -> usize {
        self.tables.block_size()
    }

    pub fn num_blocks(&self) -> usize {
        self.tables.num_blocks()
    }

    pub fn free_blocks(&self) -> usize {
        self.tables.free_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.tables.used_blocks()
    }

    /// Free blocks that still hold a cached prefix block (prefix caching).
    pub fn cached_blocks(&self) -> usize {
        self.tables.cached_blocks()
    }

    /// Leading cached blocks of a sequence with full-block `hashes`, and how many of them are
    /// cached-free (see [`BlockTables::cached_prefix`]).
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> (usize, usize) {
        self.tables.cached_prefix(hashes)
    }

    /// Starts new sequence `seq_id` from the cached blocks of its leading `hashes`; returns the
    /// positions they hold (the sequence's cached length).
    pub fn attach(&mut self, seq_id: u64, hashes: &[BlockHash]) -> usize {
        self.tables.attach(seq_id, hashes)
    }

    /// Registers `seq_id`'s committed full blocks under their `hashes` for later sequences.
    pub fn register(&mut self, seq_id: u64, hashes: &[BlockHash]) {
        self.tables.register(seq_id, hashes);
    }

    /// Blocks that removing `seq_id` would free (those no other sequence shares).
    pub fn sole_blocks(&self, seq_id: u64) -> usize {
        self.tables.sole_blocks(seq_id)
    }

    /// Positions the whole pool holds: the longest sequence it can ever take.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size()
    }

    /// Positions cached for `seq_id` (0 for an unknown sequence): the next `start_pos`.
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.tables.seq_len(seq_id)
    }

    pub fn contains(&self, seq_id: u64) -> bool {
        self.tables.contains(seq_id)
    }

    /// Frees a sequence's blocks (nothing happens for an unknown sequence).
    pub fn remove(&mut self, seq_id: u64) {
        self.tables.remove(seq_id);
        self.slots.remove(&seq_id);
        self.slot_ids.remove(&seq_id);
    }

    pub fn num_seqs(&self) -> usize {
        self.tables.num_seqs()
    }

    /// Bytes of the blocks in use.
    pub fn bytes(&self) -> usize {
        self.used_blocks() * self.block_bytes
    }

    /// Reserves blocks for every span's new positions (all or none) and prepares their slots.
    pub(crate) fn reserve(&mut self, spans: &[Span]) -> std::result::Result<(), OutOfBlocks> {
        let new: Vec<(u64, usize)> = spans.iter().map(|s| (s.seq_id, s.len)).collect();
        self.tables.reserve(&new)?;
        for s in spans {
            let ids = self.tables.slots(s.seq_id, 0, s.start_pos + s.len);
            let n = ids.len();
            let device = self
                .layers
                .first()
                .map_or(Device::Cpu, |l| l.k.device().clone());
            // Cannot fail for a u32 vector of its own length on the pool's device.
            if let Ok(t) = Tensor::new(ids.as_slice(), &device) {
                self.slots.insert(s.seq_id, t);
            }
            debug_assert_eq!(ids.len(), n);
            self.slot_ids.insert(s.seq_id, ids);
        }
        Ok(())
    }

    /// Advances `seq_id`'s committed length by `tokens` after a successful step.
    pub(crate) fn commit(&mut self, seq_id: u64, tokens: usize) {
        self.tables.commit(seq_id, tokens);
    }

    /// Undoes the reservations of a failed step.
    pub(crate) fn rollback(&mut self, spans: &[Span]) {
        for s in spans {
            self.tables.rollback(s.seq_id);
            if !self.tables.contains(s.seq_id) {
                self.slots.remove(&s.seq_id);
                self.slot_ids.remove(&s.seq_id);
            }
        }
    }

    /// Writes `k`, `v` (each `(t, kv_heads, head_dim)`, contiguous) at positions `start..start + t`
    /// of `seq_id` in `layer`; the positions must be reserved.
    pub(crate) fn write(
        &self,
        seq_id: u64,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let pool = self.layer(layer)?;
        let t = k.dim(0)?;
        let runs = self.tables.runs(seq_id, start, start + t);
        if runs.iter().map(|r| r.2).sum::<usize>() != t {
            candle_core::bail!(
                "sequence {seq_id}: positions {start}..{} not reserved",
                start + t
            );
        }
        for (pos, slot, len) in runs {
            // Rows of a contiguous (t, kv_heads, head_dim) tensor stay contiguous.
            pool.k.slice_set(&k.narrow(0, pos - start, len)?, 0, slot)?;
            pool.v.slice_set(&v.narrow(0, pos - start, len)?, 0, slot)?;
        }
        Ok(())
    }

    /// Keys and values of positions `first..first + n` of `seq_id` in `layer`, in position
    /// order, each `(n, kv_heads, head_dim)`; the positions must be reserved this step.
    pub(crate) fn read(
        &self,
        seq_id: u64,
        layer: usize,
        first: usize,
        n: usize,
    ) -> Result<(Tensor, Tensor)> {
        let pool = self.layer(layer)?;
        let slots = self.slots.get(&seq_id).ok_or_else(|| {
            candle_core::Error::Msg(format!("sequence {seq_id} has no reserved step"))
        })?;
        let slots = slots.narrow(0, first, n)?;
        Ok((
            pool.k.index_select(&slots, 0)?,
            pool.v.index_select(&slots, 0)?,
        ))
    }

    /// Pool slots of positions `first..first + n` of `seq_id`, in position order; the
    /// positions must be reserved this step.
    pub(crate) fn slot_ids(&self, seq_id: u64, first: usize, n: usize) -> Result<&[u32]> {
        self.slot_ids
            .get(&seq_id)
            .and_then(|ids| ids.get(first..first + n))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("sequence {seq_id}: positions not reserved"))
            })
    }

    /// `layer`'s key and value pools, each (slots, kv_heads, head_dim).
    pub(crate) fn pools(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let pool = self.layer(layer)?;
        Ok((&pool.k, &pool.v))
    }

    fn layer(&self, layer: usize) -> Result<&LayerPool> {
        self.layers
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(num_layers: usize) -> KvShape {
        KvShape {
            num_layers,
            kv_heads: 2,
            head_dim: 4,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    /// `t` positions of keys whose every value is its position.
    fn kv(start: usize, t: usize) -> Result<Tensor> {
        let v: Vec<f32> = (start..start + t)
            .flat_map(|p| std::iter::repeat_n(p as f32, 8))
            .collect();
        Tensor::from_vec(v, (t, 2, 4), &Device::Cpu)
    }

    fn span(seq_id: u64, start_pos: usize, len: usize) -> Span {
        Span {
            seq_id,
            offset: 0,
            len,
            start_pos,
        }
    }

    fn positions(t: &Tensor) -> Result<Vec<f32>> {
        t.narrow(1, 0, 1)?.narrow(2, 0, 1)?.flatten_all()?.to_vec1()
    }

    #[test]
    fn sized_by_the_budget() -> Result<()> {
        // 2 layers x k,v x 2 heads x 4 dims x 4 bytes = 128 bytes a position.
        let cache = KvCache::new(&shape(2), &KvCacheConfig::with_bytes(4, 128 * 4 * 10 + 5))?;
        assert_eq!((cache.num_blocks(), cache.capacity_tokens()), (10, 40));
        let capped = KvCacheConfig {
            max_tokens: 9,
            ..KvCacheConfig::with_bytes(4, 1 << 20)
        };
        assert_eq!(KvCache::new(&shape(2), &capped)?.num_blocks(), 3);
        assert!(KvCache::new(&shape(2), &KvCacheConfig::with_bytes(4, 100)).is_err());
        Ok(())
    }

    #[test]
    fn writes_and_reads_across_blocks() -> Result<()> {
        let mut cache = KvCache::new(&shape(1), &KvCacheConfig::with_bytes(2, 64 * 2 * 8))?;
        // Sequence 1 takes 3 positions (blocks 0, 1), sequence 2 one (block 2).
        let (a, b) = (span(1, 0, 3), span(2, 0, 1));
        cache.reserve(&[a, b]).expect("room");
        cache.write(1, 0, 0, &kv(0, 3)?, &kv(0, 3)?)?;
        cache.write(2, 0, 0, &kv(100, 1)?, &kv(100, 1)?)?;
        cache.commit(1, 3);
        cache.commit(2, 1);
        // Sequence 1 grows into a fresh block after sequence 2's.
        cache.reserve(&[span(1, 3, 2)]).expect("room");
        cache.write(1, 0, 3, &kv(3, 2)?, &kv(3, 2)?)?;
        let (k, v) = cache.read(1, 0, 0, 5)?;
        assert_eq!(positions(&k)?, vec![0., 1., 2., 3., 4.]);
        assert_eq!(positions(&v)?, vec![0., 1., 2., 3., 4.]);
        assert_eq!(positions(&cache.read(1, 0, 2, 2)?.0)?, vec![2., 3.]);
        cache.commit(1, 2);
        assert_eq!(cache.bytes(), 4 * 2 * 64);
        cache.remove(1);
        cache.remove(2);
        assert_eq!(
            (cache.num_seqs(), cache.bytes(), cache.free_blocks()),
            (0, 0, 8)
        );
        Ok(())
    }

    #[test]
    fn a_failed_step_is_rolled_back() -> Result<()> {
        let mut cache = KvCache::new(&shape(1), &KvCacheConfig::with_bytes(2, 64 * 2 * 3))?;
        cache.reserve(&[span(1, 0, 2)]).expect("room");
        cache.write(1, 0, 0, &kv(0, 2)?, &kv(0, 2)?)?;
        cache.commit(1, 2);
        cache
            .reserve(&[span(1, 2, 1), span(2, 0, 2)])
            .expect("room");
        cache.rollback(&[span(1, 2, 1), span(2, 0, 2)]);
        assert_eq!((cache.seq_len(1), cache.used_blocks()), (2, 1));
        assert!(!cache.contains(2));
        assert!(cache.reserve(&[span(2, 0, 6)]).is_err(), "3 blocks, 2 free");
        assert!(cache.write(2, 0, 0, &kv(0, 1)?, &kv(0, 1)?).is_err());
        Ok(())
    }
}
