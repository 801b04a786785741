//! The decoder's causal self-attention of a prefilling sequence on the CPU, straight from the
//! paged KV pool, in one pass per block of queries: scores, softmax and the weighted sum of
//! values computed while the block's scores are in cache, as `encoder_attention.rs` does for
//! the encoders.
//!
//! The general path (`attention.rs`) gathers the sequence's keys and values out of the pool
//! and runs two matmuls and a masked softmax through candle: for a prompt of ~1,300 tokens
//! that was four fresh (9, 1300, 1300) f32 buffers of 61 MB a layer (the scores, scaled,
//! masked and softmaxed), page-faulted anew each time (a quarter of that prefill's samples),
//! and the keys a query may not see were multiplied and exponentiated all the same.
//!
//! Each work item is 24 queries of one head against the keys its last query may see (a
//! grouped-query head reads its kv head's keys): the scores (6 queries x 64 keys at a time,
//! `encoder_attention::simd`), each row's hidden keys set to -inf (after its position, or
//! before its sliding window), each row's exponentials (exactly 0 where hidden) and 1 / their
//! sum, then the exponentials times the value rows, each output row over its sum as it is
//! stored into the (T, heads x head_dim) output.
//!
//! A query's result does not depend on how the prompt was cut into chunks or which rows share
//! its item: each score is summed in head-dimension order, the row's keys start at a multiple
//! of 64 and run to a multiple of 16 (zero-padded) so that every key adds into the same lane of
//! the exponentials' sum, and the hidden keys' exponentials are exact zeros, which change no
//! sum. AVX-512 and f32 only; elsewhere the caller keeps the general path.
//!
//! The first question on bench/loadgen.py's ~1,300-token system prompt (`max_tokens` 1, the
//! random SmolVLM-256M, 2 threads, 2 alternating runs): TTFT 4.82-5.02 s before, 1.57-1.68 s
//! after; the 105-token text prompt's 0.19-0.20 s, 0.15-0.18 s.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::encoder_attention::{avx512, simd};
use super::fast_exp;
use super::par::{for_each_chunk_mut, for_each_index, operand};

/// Queries per work item, 4 register blocks: their scores (24 x keys f32, 125 KiB for 1,300
/// keys) stay in L2.
const QUERIES: usize = 4 * simd::ROWS;

/// Lanes of the exponentials' sum (`fast_exp::exp_sum_avx512`): rows of scores are padded to
/// a multiple of it, so that it never takes its tail path.
const LANES: usize = 16;

/// Where a prefilling sequence's queries and keys lie.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Causal {
    /// Position of the first query.
    pub start: usize,
    /// Position of the first key (of `slots[0]`).
    pub first: usize,
    /// The layer's sliding window, if any: a query sees the last `window` positions.
    pub window: Option<usize>,
}

impl Causal {
    /// The keys query `i` (0-based in the chunk) sees, as indices into the slots.
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let end = self.start + i + 1;
        let from = self.window.map_or(0, |w| end.saturating_sub(w));
        from.saturating_sub(self.first)..end - self.first
    }
}

/// `softmax(scale q k^T + causal mask) v` per head for `q` (t, heads, head_dim), rotated, at
/// positions `at.start..`, over the keys and values at pool `slots` (positions `at.first..`,
/// the chunk's own last) of `k_pool`, `v_pool` (slots, kv_heads, head_dim): (t, heads x
/// head_dim) f32. `None` where this kernel does not apply (not the CPU, not f32, no AVX-512).
pub(crate) fn attend(
    q: &Tensor,
    (k_pool, v_pool): (&Tensor, &Tensor),
    slots: &[u32],
    at: Causal,
    scale: f32,
) -> Result<Option<Tensor>> {
    let applies = q.device().is_cpu()
        && [q, k_pool, v_pool].iter().all(|t| t.dtype() == DType::F32)
        && k_pool.is_contiguous()
        && v_pool.is_contiguous()
        && avx512();
    if !applies {
        return Ok(None);
    }
    let (t, heads, hd) = q.dims3()?;
    let (_, kv_heads, k_hd) = k_pool.dims3()?;
    if kv_heads == 0
        || heads % kv_heads != 0
        || k_hd != hd
        || v_pool.dims() != k_pool.dims()
        || at.first > at.start
        || slots.len() != at.start + t - at.first
    {
        candle_core::bail!(
            "prefill attention: {heads} heads of {hd} over {kv_heads} of {k_hd}, \
             {t} queries at {} and {} keys at {}",
            at.start,
            slots.len(),
            at.first
        );
    }
    let op = Prefill {
        slots,
        heads,
        kv_heads,
        hd,
        at,
        scale,
    };
    q.contiguous()?
        .apply_op3_no_bwd(k_pool, v_pool, &op)
        .map(Some)
}

struct Prefill<'a> {
    slots: &'a [u32],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    at: Causal,
    scale: f32,
}

thread_local! {
    /// One item's scores (then their exponentials) and its scaled queries, reused across
    /// items and calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

impl CustomOp3 for Prefill<'_> {
    fn name(&self) -> &'static str {
        "paged-prefill-attention"
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
        let (q, k, v) = (operand(qs, ql)?, operand(ks, kl)?, operand(vs, vl)?);
        let (heads, hd) = (self.heads, self.hd);
        let t = q.len() / (heads * hd).max(1);
        let pool_slots = k.len() / (self.kv_heads * hd);
        let in_pool = self.slots.iter().all(|&s| (s as usize) < pool_slots);
        if q.len() != t * heads * hd || v.len() != k.len() || !in_pool || !avx512() {
            candle_core::bail!("prefill attention: a query or slot out of range");
        }
        let kt = key_panels(k, self.slots, self.lead(), self.kv_heads, hd);
        let vh = value_rows(v, self.slots, self.lead(), self.kv_heads, hd);
        let mut out = vec![0f32; t * heads * hd];
        let shared = super::par::Disjoint::new(&mut out);
        let blocks = t.div_ceil(QUERIES);
        for_each_index(heads * blocks, |item| {
            let (h, first) = (item / blocks, item % blocks * QUERIES);
            let rows = QUERIES.min(t - first);
            // SAFETY: AVX-512F was checked above; rows first..first + rows of head h of the
            // output are this item's alone, and `out` outlives `for_each_index`.
            unsafe { self.item(q, (&kt, &vh), (h, first, rows), shared.ptr()) };
        });
        Ok((CpuStorage::F32(out), Shape::from((t, heads * hd))))
    }
}

impl Prefill<'_> {
    /// Zero keys before the first in the packed keys and values, so that position p is at
    /// place `p % 64` of a panel: each key's score then lands in the same lane of the
    /// exponentials' sum whatever the chunk's first key (a sliding window's moves with it).
    fn lead(&self) -> usize {
        self.at.first % simd::COLS
    }

    /// The places in the packed keys of the keys query `i` sees.
    fn seen(&self, i: usize) -> std::ops::Range<usize> {
        let r = self.at.visible(i);
        r.start + self.lead()..r.end + self.lead()
    }

    /// Queries `first..first + rows` of head `h`: their scores against the keys the last one
    /// sees, softmax, times the values, into rows `first..` of `out` (T, heads x hd).
    ///
    /// SAFETY: needs AVX-512F; `kt` and `vh` as [`key_panels`] and [`value_rows`] make them
    /// from this op's slots; `out` holds (T, heads x hd), and the item's places in it are its
    /// own.
    unsafe fn item(
        &self,
        q: &[f32],
        (kt, vh): (&[f32], &[f32]),
        (h, first, rows): (usize, usize, usize),
        out: *mut f32,
    ) {
        let (heads, hd, cols) = (self.heads, self.hd, simd::COLS);
        let g = h / (heads / self.kv_heads);
        let padded = (self.lead() + self.slots.len()).div_ceil(cols) * cols;
        // Places k0..k0 + width: from the panel of the first query's first key to the last
        // query's last, padded (their scores come from zero keys and are hidden below).
        let k0 = self.seen(first).start / cols * cols;
        let width = (self.seen(first + rows - 1).end - k0).next_multiple_of(LANES);
        let mut inv = [0f32; QUERIES];
        SCRATCH.with_borrow_mut(|(scores, queries)| {
            if scores.len() < rows * width {
                scores.resize(rows * width, 0.0);
            }
            // (rows, hd): the item's queries, scaled.
            queries.clear();
            for r in first..first + rows {
                let at = (r * heads + h) * hd;
                queries.extend(q[at..at + hd].iter().map(|&x| x * self.scale));
            }
            // (rows, width) scores: the queries times the keys, panels k0 / 64 on.
            simd::product(&simd::Product {
                a: queries.as_ptr(),
                lda: hd,
                b: kt[(g * padded + k0) * hd..].as_ptr(),
                ldb: cols,
                panel: hd * cols,
                rows,
                depth: hd,
                cols: width,
                out: scores.as_mut_ptr(),
                ldo: width,
                scale: std::ptr::null(),
            });
            for (r, inv) in inv.iter_mut().enumerate().take(rows) {
                let row = &mut scores[r * width..(r + 1) * width];
                let seen = self.seen(first + r);
                row[..seen.start - k0].fill(f32::NEG_INFINITY);
                row[seen.end - k0..].fill(f32::NEG_INFINITY);
                let max = fast_exp::max_avx512(row);
                let p = row.as_mut_ptr();
                *inv = 1.0 / fast_exp::exp_sum_avx512(p, p, width, max);
            }
            // (rows, hd): the exponentials times the value rows k0.., each row over its sum.
            simd::product(&simd::Product {
                a: scores.as_ptr(),
                lda: width,
                b: vh[(g * padded + k0) * hd..].as_ptr(),
                ldb: hd,
                panel: cols,
                rows,
                depth: width,
                cols: hd,
                out: out.add((first * heads + h) * hd),
                ldo: heads * hd,
                scale: inv.as_ptr(),
            });
        });
    }
}

/// Each kv head's keys at `slots` of the pool `k` (slots, kv_heads, hd), after `lead` zero
/// keys, transposed into panels of [`simd::COLS`] keys: (kv_heads, panels, hd, COLS), zero
/// past the last key.
fn key_panels(k: &[f32], slots: &[u32], lead: usize, kv_heads: usize, hd: usize) -> Vec<f32> {
    let cols = simd::COLS;
    let panels = (lead + slots.len()).div_ceil(cols);
    let mut kt = vec![0f32; kv_heads * panels * hd * cols];
    // One piece per (kv head, panel).
    for_each_chunk_mut(&mut kt, hd * cols, |i, out| {
        let (g, p) = (i / panels, i % panels);
        for (c, at) in panel_rows(slots, lead, p, (kv_heads, g, hd)) {
            for (d, &x) in k[at..at + hd].iter().enumerate() {
                out[d * cols + c] = x;
            }
        }
    });
    kt
}

/// Each kv head's values at `slots` of the pool `v` (slots, kv_heads, hd), after `lead` zero
/// rows, head-major: (kv_heads, panels x COLS, hd), zero rows past the last value.
fn value_rows(v: &[f32], slots: &[u32], lead: usize, kv_heads: usize, hd: usize) -> Vec<f32> {
    let cols = simd::COLS;
    let panels = (lead + slots.len()).div_ceil(cols);
    let mut vh = vec![0f32; kv_heads * panels * cols * hd];
    for_each_chunk_mut(&mut vh, cols * hd, |i, out| {
        let (g, p) = (i / panels, i % panels);
        for (r, at) in panel_rows(slots, lead, p, (kv_heads, g, hd)) {
            out[r * hd..(r + 1) * hd].copy_from_slice(&v[at..at + hd]);
        }
    });
    vh
}

/// The keys of panel `p` (places `p x COLS..`, the first `lead` of them empty): each one's
/// place in the panel and where kv head `g`'s row of it starts in the pool.
fn panel_rows(
    slots: &[u32],
    lead: usize,
    p: usize,
    (kv_heads, g, hd): (usize, usize, usize),
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let cols = simd::COLS;
    let places = (p * cols).max(lead)..((p + 1) * cols).min(lead + slots.len());
    places.map(move |place| {
        let slot = slots[place - lead] as usize;
        (place - p * cols, (slot * kv_heads + g) * hd)
    })
}

#[cfg(test)]
mod tests;
