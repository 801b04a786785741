//! Attention of decoding sequences (one new query each) straight from the paged KV pool, on
//! the CPU.
//!
//! The general path (`attention.rs`) gathers each sequence's keys and values out of the pool
//! into new tensors, then runs two matmuls and a softmax, per sequence and layer. At 16 text
//! streams the profile (bench/README.md) showed that gather (one `index_select` copy of every
//! cached key and value, every layer, every step) at 7% of the samples and the small matmuls
//! and their spinning waits at another 10%, all on the engine thread alone. Here one call per
//! layer covers every decoding sequence: each (sequence, kv head) pair is a work item on
//! candle's thread pool that reads its keys where the block table says they are, scores the
//! query heads sharing that kv head against each key read once, takes the softmax (the same
//! row softmax as the general path) and sums the values.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

use super::attention::softmax_row;
use super::small_m::Weight;

/// One decoding sequence of the step.
pub(crate) struct Query<'a> {
    /// Its row of the step's queries.
    pub row: usize,
    /// Pool slots of the keys it attends to, in position order (the new one last).
    pub slots: &'a [u32],
}

/// `q` (T, heads, head_dim), rotated; `k_pool`, `v_pool` (slots, kv_heads, head_dim), holding
/// this step's keys already -> (queries.len(), heads * head_dim) in `q`'s dtype. `None` where
/// this path does not apply (not on the CPU, or dtypes other than f32/f16); the caller then
/// takes the general path.
pub(crate) fn attend(
    q: &Tensor,
    (k_pool, v_pool): (&Tensor, &Tensor),
    queries: &[Query<'_>],
    scale: f64,
) -> Result<Option<Tensor>> {
    let applies = q.device().is_cpu()
        && matches!(k_pool.dtype(), DType::F32 | DType::F16)
        && v_pool.dtype() == k_pool.dtype()
        && k_pool.is_contiguous()
        && v_pool.is_contiguous();
    if !applies || queries.is_empty() {
        return Ok(None);
    }
    let (_, heads, hd) = q.dims3()?;
    let kv_heads = k_pool.dim(1)?;
    if kv_heads == 0 || heads % kv_heads != 0 || k_pool.dim(2)? != hd {
        candle_core::bail!("decode attention: {heads} heads over {kv_heads} kv heads");
    }
    let op = DecodeAttention {
        queries,
        heads,
        kv_heads,
        hd,
        scale: scale as f32,
    };
    let out = q
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op3_no_bwd(k_pool, v_pool, &op)?;
    out.to_dtype(q.dtype()).map(Some)
}

struct DecodeAttention<'a> {
    queries: &'a [Query<'a>],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
}

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = super::par::operand::<f32>(qs, ql)?;
        let out = match (ks, vs) {
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.run(
                q,
                super::par::operand::<f16>(ks, kl)?,
                super::par::operand::<f16>(vs, vl)?,
            )?,
            _ => self.run(
                q,
                super::par::operand::<f32>(ks, kl)?,
                super::par::operand::<f32>(vs, vl)?,
            )?,
        };
        let shape = Shape::from((self.queries.len(), self.heads * self.hd));
        Ok((CpuStorage::F32(out), shape))
    }
}

impl DecodeAttention<'_> {
    /// Every (query, kv head) pair, spread over the thread pool.
    fn run<W: Weight>(&self, q: &[f32], k: &[W], v: &[W]) -> Result<Vec<f32>> {
        let (hd, kvh) = (self.hd, self.kv_heads);
        let n_rep = self.heads / kvh;
        let slots = k.len() / (kvh * hd);
        for query in self.queries {
            let in_pool = query.slots.iter().all(|&s| (s as usize) < slots);
            if query.slots.is_empty() || !in_pool || (query.row + 1) * self.heads * hd > q.len() {
                candle_core::bail!("decode attention: a query or slot out of range");
            }
        }
        let mut out = vec![0f32; self.queries.len() * self.heads * hd];
        // Item i: query i / kvh, kv head i % kvh; it owns that query's n_rep heads' outputs.
        super::par::for_each_chunk_mut(&mut out, n_rep * hd, |i, piece| {
            let (query, g) = (&self.queries[i / kvh], i % kvh);
            let first_head = query.row * self.heads + g * n_rep;
            let qs = &q[first_head * hd..(first_head + n_rep) * hd];
            let item = Item {
                qs,
                slots: query.slots,
                g,
                k,
                v,
            };
            self.one_fastest(item, piece);
        });
        Ok(out)
    }

    /// [`Self::one`] compiled for AVX-512 where the CPU has it (the loops vectorise 16 wide
    /// instead of the baseline's 4).
    fn one_fastest<W: Weight>(&self, item: Item<'_, W>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above.
            return unsafe { self.one_avx512(item, out) };
        }
        self.one(item, out)
    }

    /// SAFETY: the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn one_avx512<W: Weight>(&self, item: Item<'_, W>, out: &mut [f32]) {
        self.one(item, out)
    }

    /// One item into `out` (n_rep, hd).
    #[inline(always)]
    fn one<W: Weight>(&self, item: Item<'_, W>, out: &mut [f32]) {
        let Item { qs, slots, g, k, v } = item;
        let (hd, kvh, n) = (self.hd, self.kv_heads, slots.len());
        // In bounds: `run` checked every slot against the pool.
        fn row<W>(pool: &[W], at: usize, hd: usize) -> &[W] {
            &pool[at..at + hd]
        }
        let at = |slot: u32| (slot as usize * kvh + g) * hd;
        // (n_rep, n): scores, then probabilities.
        let mut scores = vec![0f32; qs.len() / hd * n];
        for (j, &slot) in slots.iter().enumerate() {
            // The value rows too: the second loop then finds them in cache.
            let next = slots.get(j + AHEAD).map(|&s| at(s));
            prefetch(k, next, hd);
            prefetch(v, next, hd);
            let key = row(k, at(slot), hd);
            for (r, qh) in qs.chunks_exact(hd).enumerate() {
                scores[r * n + j] = dot(qh, key) * self.scale;
            }
        }
        let mut probs = vec![0f32; scores.len()];
        for (s, p) in scores.chunks_exact(n).zip(probs.chunks_exact_mut(n)) {
            softmax_row(s, p);
        }
        out.fill(0.0);
        for (j, &slot) in slots.iter().enumerate() {
            let value = row(v, at(slot), hd);
            for (r, o) in out.chunks_exact_mut(hd).enumerate() {
                let p = probs[r * n + j];
                for (o, x) in o.iter_mut().zip(value) {
                    *o += p * x.widen();
                }
            }
        }
    }
}

/// How many keys ahead the scoring loop asks for the key and value rows it and the loop after
/// it will read: the slots of a block are in order, but the hardware's prefetcher does not
/// follow the jumps between blocks, nor start early enough on rows this short. Batch-1 decode
/// at ~135 keys (SmolVLM-256M, timers around this op in the server, alternating runs): 1.35-1.78
/// ms a step (5 runs) with values fetched here 8 keys ahead, against 2.13-2.15 ms (2) with keys
/// and values each fetched 4 ahead in their own loop.
const AHEAD: usize = 8;

/// Asks for `pool[at..at + hd]` to be brought into cache (nothing for `None` or off the
/// CPUs without the instruction).
#[inline(always)]
fn prefetch<W>(pool: &[W], at: Option<usize>, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(at) = at {
        let bytes = hd * std::mem::size_of::<W>();
        let start = pool.as_ptr().wrapping_add(at).cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.wrapping_add(line),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (pool, at, hd);
}

/// One work item: the query heads `qs` (n_rep, hd) of kv head `g` against the keys and values
/// at `slots` of the pools `k`, `v` (slots, kv_heads, hd).
#[derive(Clone, Copy)]
struct Item<'a, W> {
    qs: &'a [f32],
    slots: &'a [u32],
    g: usize,
    k: &'a [W],
    v: &'a [W],
}

/// `a · b` in 16 running sums (short rounding chains; the loop vectorises).
#[inline(always)]
fn dot<W: Weight>(a: &[f32], b: &[W]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.widen())
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((l, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y.widen();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::attention::Span;
    use crate::model::kv_cache::{KvCache, KvCacheConfig, KvShape};

    const HEADS: usize = 6;
    const KV_HEADS: usize = 2;
    /// Not a multiple of the dot product's 16 lanes: its tail runs too.
    const HD: usize = 20;

    fn span(seq_id: u64, offset: usize, start_pos: usize, len: usize) -> Span {
        Span {
            seq_id,
            offset,
            len,
            start_pos,
        }
    }

    /// Writes random keys and values for `spans` (reserving them first).
    fn fill(cache: &mut KvCache, spans: &[Span]) -> Result<()> {
        cache
            .reserve(spans)
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        for s in spans {
            let kv = || Tensor::randn(0f32, 1.0, (s.len, KV_HEADS, HD), &Device::Cpu);
            let dtype = cache.pools(0)?.0.dtype();
            cache.write(
                s.seq_id,
                0,
                s.start_pos,
                &kv()?.to_dtype(dtype)?,
                &kv()?.to_dtype(dtype)?,
            )?;
        }
        Ok(())
    }

    /// softmax(q k^T * scale) v for query head `h` of `q` (heads, hd) over `keys`, `values`
    /// (n, kv_heads, hd), by candle's ops, in f32.
    fn reference(q: &Tensor, keys: &Tensor, values: &Tensor, scale: f64) -> Result<Tensor> {
        let heads = (0..HEADS)
            .map(|h| {
                let g = h / (HEADS / KV_HEADS);
                let pick = |t: &Tensor| t.to_dtype(DType::F32)?.narrow(1, g, 1)?.squeeze(1);
                let scores = (q.narrow(0, h, 1)?.matmul(&pick(keys)?.t()?)? * scale)?;
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(&pick(values)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&heads, 1)
    }

    /// Two decoding sequences (8 and 3 keys; the first also seen through a window that
    /// starts at position 3) against candle's matmuls and softmax over the keys that
    /// `KvCache::read` gathers, with f32 and with f16 pools. Both sum the same f32 products in
    /// another order (at most 20 terms of magnitude ~1): 1e-5 is a hundred ulps of margin.
    #[test]
    fn matches_gathered_attention() -> Result<()> {
        for dtype in [DType::F32, DType::F16] {
            let shape = KvShape {
                num_layers: 1,
                kv_heads: KV_HEADS,
                head_dim: HD,
                dtype,
                device: Device::Cpu,
            };
            let mut cache = KvCache::new(&shape, &KvCacheConfig::with_bytes(4, 1 << 20))?;
            fill(&mut cache, &[span(1, 0, 0, 7), span(2, 7, 0, 2)])?;
            cache.commit(1, 7);
            cache.commit(2, 2);
            let step = [span(1, 0, 7, 1), span(2, 1, 2, 1)];
            fill(&mut cache, &step)?;
            let q = Tensor::randn(0f32, 1.0, (2, HEADS, HD), &Device::Cpu)?;
            let scale = (HD as f64).powf(-0.5);
            for (s, first) in [(&step[0], 0), (&step[0], 3), (&step[1], 0)] {
                let n = s.start_pos + 1 - first;
                let queries = [Query {
                    row: s.offset,
                    slots: cache.slot_ids(s.seq_id, first, n)?,
                }];
                let got = attend(&q, cache.pools(0)?, &queries, scale)?.expect("applies");
                let (keys, values) = cache.read(s.seq_id, 0, first, n)?;
                let want = reference(&q.get(s.offset)?, &keys, &values, scale)?;
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-5,
                    "{dtype:?} seq {} from {first}: {diff}",
                    s.seq_id
                );
            }
        }
        Ok(())
    }
}
