//! Attention of decoding sequences (one new query each) straight from the paged KV pool, on
//! the CPU.
//!
//! The general path (`attention.rs`) gathers each sequence's keys and values out of the pool
//! into new tensors, then runs two matmuls and a softmax, per sequence and layer. At 16 text
//! streams the profile (bench/README.md) showed that gather (one `index_select` copy of every
//! cached key and value, every layer, every step) at 7% of the samples and the small matmuls
//! and their spinning waits at another 10%, all on the engine thread alone. Here one call per
//! layer covers every decoding sequence. A sequence's keys are cut into pieces of [`CHUNK`]
//! positions; each (sequence, piece) is a work item on candle's thread pool that reads its
//! keys and values where the block table says they are, whole pool rows (every kv head) at a
//! time, and scores every query head against them, keeping per head the piece's largest score,
//! the sum of `exp(score - largest)` and the `exp`-weighted sum of the values. The pieces of a
//! sequence are then merged (flash-decoding's split-K), in piece order, so a sequence's result
//! depends on its own keys only, never on its batch neighbours.
//!
//! Items were (sequence, kv head) before, each reading its head's 256 bytes from rows 768 bytes
//! apart: at batch 1, 3 items for 2 threads. Whole rows are contiguous within a block, which
//! the hardware prefetchers can follow (the weights' stream evicts the pool from cache every
//! step). One call at 135 keys, 9 heads of 64, one thread: 45 → 22 µs with the pool in cache,
//! 97 → 65 µs with it in memory, with the per-key arithmetic of `avx512` (bench/README.md,
//! seventh pass).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

use super::small_m::Weight;

#[cfg(target_arch = "x86_64")]
mod avx512;

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
    /// Every (query, piece of its keys), spread over the thread pool, then merged per query.
    fn run<W: Weight>(&self, q: &[f32], k: &[W], v: &[W]) -> Result<Vec<f32>> {
        let (hd, heads) = (self.hd, self.heads);
        let slots = k.len() / (self.kv_heads * hd);
        for query in self.queries {
            let in_pool = query.slots.iter().all(|&s| (s as usize) < slots);
            if query.slots.is_empty() || !in_pool || (query.row + 1) * heads * hd > q.len() {
                candle_core::bail!("decode attention: a query or slot out of range");
            }
        }
        // (query, first key of the piece)
        let items: Vec<(usize, usize)> = self
            .queries
            .iter()
            .enumerate()
            .flat_map(|(i, query)| (0..query.slots.len()).step_by(CHUNK).map(move |f| (i, f)))
            .collect();
        // Per item, per head: the largest score, the sum of exp(score - largest), then the
        // exp-weighted sum of the values (heads, hd).
        let part = heads * (hd + 2);
        let mut partial = vec![0f32; items.len() * part];
        super::par::for_each_chunk_mut(&mut partial, part, |i, piece| {
            let (qi, first) = items[i];
            let query = &self.queries[qi];
            let end = (first + CHUNK).min(query.slots.len());
            let item = Item {
                qs: &q[query.row * heads * hd..(query.row + 1) * heads * hd],
                slots: &query.slots[first..end],
                k,
                v,
            };
            self.piece_fastest(item, piece);
        });
        let mut out = vec![0f32; self.queries.len() * heads * hd];
        let mut next = 0;
        for (query, o) in self.queries.iter().zip(out.chunks_exact_mut(heads * hd)) {
            let pieces = query.slots.len().div_ceil(CHUNK);
            self.merge(&partial[next * part..(next + pieces) * part], o);
            next += pieces;
        }
        Ok(out)
    }

    /// One query's pieces (each `heads * (hd + 2)`, as [`Self::piece`] writes them), in key
    /// order, into its output (heads, hd): each head's value sums rescaled to the largest
    /// score over all pieces, added in piece order, over the rescaled sums of `exp`.
    fn merge(&self, pieces: &[f32], out: &mut [f32]) {
        let (heads, hd) = (self.heads, self.hd);
        let part = heads * (hd + 2);
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let largest = pieces
                .chunks_exact(part)
                .map(|p| p[h])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            o.fill(0.0);
            for p in pieces.chunks_exact(part) {
                let w = (p[h] - largest).exp();
                total += w * p[heads + h];
                let sums = &p[2 * heads + h * hd..2 * heads + (h + 1) * hd];
                for (o, s) in o.iter_mut().zip(sums) {
                    *o += w * s;
                }
            }
            let inv = 1.0 / total;
            for o in o.iter_mut() {
                *o *= inv;
            }
        }
    }

    /// [`Self::piece`] with the AVX-512 per-key arithmetic where the CPU has it and the head
    /// width allows it (a multiple of 16), else the portable loops.
    fn piece_fastest<W: Weight>(&self, item: Item<'_, W>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && self.hd.is_multiple_of(16) {
            // SAFETY: the feature was detected and the width checked just above.
            return unsafe { self.piece_avx512(item, out) };
        }
        self.piece(item, out, false)
    }

    /// SAFETY: the CPU must have AVX-512F, and `self.hd` be a multiple of 16.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn piece_avx512<W: Weight>(&self, item: Item<'_, W>, out: &mut [f32]) {
        self.piece(item, out, true)
    }

    /// One piece of a query's keys into `out`: per head the largest score, then per head the
    /// sum of exp(score - largest), then the exp-weighted value sums (heads, hd).
    /// `simd`: AVX-512 is there and `hd` a multiple of 16 (see [`avx512`]).
    #[inline(always)]
    fn piece<W: Weight>(&self, item: Item<'_, W>, out: &mut [f32], simd: bool) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        let Item { qs, slots, k, v } = item;
        let (hd, heads, n) = (self.hd, self.heads, slots.len());
        let n_rep = heads / self.kv_heads;
        let width = self.kv_heads * hd;
        // In bounds: `run` checked every slot against the pool.
        fn row<W>(pool: &[W], slot: u32, width: usize) -> &[W] {
            let at = slot as usize * width;
            &pool[at..at + width]
        }
        // (heads, n): scores, then exp(score - largest).
        let mut p = vec![0f32; heads * n];
        for (j, &slot) in slots.iter().enumerate() {
            // The value rows too: the second loop then finds them in cache.
            let ahead = slots.get(j + AHEAD).map(|&s| s as usize * width);
            prefetch(k, ahead, width);
            prefetch(v, ahead, width);
            let key = row(k, slot, width);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd` says the CPU has AVX-512F and hd is a multiple of 16; qs is
                // (heads, hd), a key row (kv_heads, hd), p (heads, n) with j < n.
                unsafe { avx512::scores(qs, key, (hd, n_rep, self.scale), &mut p[j..], n) };
                continue;
            }
            for (h, qh) in qs.chunks_exact(hd).enumerate() {
                let g = h / n_rep;
                p[h * n + j] = dot(qh, &key[g * hd..(g + 1) * hd]) * self.scale;
            }
        }
        let (stats, sums) = out.split_at_mut(2 * heads);
        for (h, e) in p.chunks_exact_mut(n).enumerate() {
            let largest = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in e.iter_mut() {
                *x -= largest;
            }
            super::fast_exp::exp_in_place(e);
            stats[h] = largest;
            stats[heads + h] = e.iter().sum();
        }
        sums.fill(0.0);
        for (j, &slot) in slots.iter().enumerate() {
            let value = row(v, slot, width);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: as for the scores; sums is (heads, hd).
                unsafe { avx512::add_values(&p[j..], n, value, (hd, n_rep), sums) };
                continue;
            }
            for (h, o) in sums.chunks_exact_mut(hd).enumerate() {
                let (g, e) = (h / n_rep, p[h * n + j]);
                for (o, x) in o.iter_mut().zip(&value[g * hd..(g + 1) * hd]) {
                    *o += e * x.widen();
                }
            }
        }
    }
}

/// Keys per work item. Pieces of 32 cut SmolVLM-256M's ~135 keys at batch 1 into 5 items for
/// the 2 threads (3 kv heads made 3 before), and at 16 streams make ~80.
const CHUNK: usize = 32;

/// How many keys ahead the scoring loop asks for the key and value rows it and the loop after
/// it will read: the slots of a block are in order, but the hardware's prefetcher does not
/// follow the jumps between blocks, nor start early enough on rows this short. Batch-1 decode
/// at ~135 keys (SmolVLM-256M, timers around this op in the server, one run each, 2026-11-28):
/// 37-40 µs a layer 4 or 8 keys ahead, 44-47 µs with none, 2 or 16 ahead.
const AHEAD: usize = 8;

/// Asks for `pool[at..at + len]` to be brought into cache (nothing for `None` or off the
/// CPUs without the instruction).
#[inline(always)]
fn prefetch<W>(pool: &[W], at: Option<usize>, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(at) = at {
        let bytes = len * std::mem::size_of::<W>();
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
    let _ = (pool, at, len);
}

/// One work item: every query head `qs` (heads, hd) against the keys and values at `slots`
/// of the pools `k`, `v` (slots, kv_heads, hd).
#[derive(Clone, Copy)]
struct Item<'a, W> {
    qs: &'a [f32],
    slots: &'a [u32],
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
    use crate::model::f32_bits;
    use crate::model::kv_cache::{KvCache, KvCacheConfig, KvShape};

    const HEADS: usize = 6;
    const KV_HEADS: usize = 2;
    /// Head widths: not a multiple of 16 (the portable loops, with the dot product's tail),
    /// and SmolVLM's 64 (the AVX-512 path where the CPU has it).
    const HDS: [usize; 2] = [20, 64];

    fn span(seq_id: u64, offset: usize, start_pos: usize, len: usize) -> Span {
        Span {
            seq_id,
            offset,
            len,
            start_pos,
        }
    }

    /// Writes random keys and values for `spans` (reserving them first).
    fn fill(cache: &mut KvCache, spans: &[Span], hd: usize) -> Result<()> {
        cache
            .reserve(spans)
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        for s in spans {
            let kv = || Tensor::randn(0f32, 1.0, (s.len, KV_HEADS, hd), &Device::Cpu);
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

    /// Three decoding sequences (8, 3 and 101 keys; the first also seen through a window that
    /// starts at position 3, the last from position 37: one piece, and 4 and 2 merged pieces)
    /// against candle's matmuls and softmax over the keys that `KvCache::read` gathers, with f32
    /// and with f16 pools, at both head widths. Both sum the same f32 products in another
    /// order, and the pieces are rescaled by exp(largest - overall largest) before adding: a
    /// few ulps of terms of magnitude ~1, over at most 101 keys; 1e-5 is tens of ulps of
    /// margin. Then all three in one call: each row the bits it had alone.
    #[test]
    fn matches_gathered_attention() -> Result<()> {
        for (hd, dtype) in HDS
            .into_iter()
            .flat_map(|hd| [(hd, DType::F32), (hd, DType::F16)])
        {
            let shape = KvShape {
                num_layers: 1,
                kv_heads: KV_HEADS,
                head_dim: hd,
                dtype,
                device: Device::Cpu,
            };
            let mut cache = KvCache::new(&shape, &KvCacheConfig::with_bytes(4, 1 << 20))?;
            let cached = [span(1, 0, 0, 7), span(2, 7, 0, 2), span(3, 9, 0, 100)];
            fill(&mut cache, &cached, hd)?;
            cache.commit(1, 7);
            cache.commit(2, 2);
            cache.commit(3, 100);
            let step = [span(1, 0, 7, 1), span(2, 1, 2, 1), span(3, 2, 100, 1)];
            fill(&mut cache, &step, hd)?;
            let q = Tensor::randn(0f32, 1.0, (3, HEADS, hd), &Device::Cpu)?;
            let scale = (hd as f64).powf(-0.5);
            let query = |s: &Span, first: usize| -> Result<Query<'_>> {
                let n = s.start_pos + 1 - first;
                Ok(Query {
                    row: s.offset,
                    slots: cache.slot_ids(s.seq_id, first, n)?,
                })
            };
            let cases = [
                (&step[0], 0),
                (&step[0], 3),
                (&step[1], 0),
                (&step[2], 0),
                (&step[2], 37),
            ];
            for (s, first) in cases {
                let queries = [query(s, first)?];
                let got = attend(&q, cache.pools(0)?, &queries, scale)?.expect("applies");
                let (keys, values) = cache.read(s.seq_id, 0, first, queries[0].slots.len())?;
                let want = reference(&q.get(s.offset)?, &keys, &values, scale)?;
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let seq = s.seq_id;
                assert!(
                    diff < 1e-5,
                    "hd {hd} {dtype:?} seq {seq} from {first}: {diff}"
                );
            }
            let all = step
                .iter()
                .map(|s| query(s, 0))
                .collect::<Result<Vec<_>>>()?;
            let together = attend(&q, cache.pools(0)?, &all, scale)?.expect("applies");
            for (i, one) in all.into_iter().enumerate() {
                let alone = attend(&q, cache.pools(0)?, &[one], scale)?.expect("applies");
                assert_eq!(
                    f32_bits(&together.get(i)?)?,
                    f32_bits(&alone)?,
                    "hd {hd} {dtype:?} row {i}"
                );
            }
        }
        Ok(())
    }
}
