//! The encoders' unmasked self-attention on the CPU in one pass per block of queries: scores,
//! softmax and the weighted sum of values computed while the block's scores are in cache.
//!
//! Through candle, one 1024-patch SigLIP tile's attention wrote each head's (1024, 1024) scores to
//! memory three times (the product, the softmax, the second product's input) and its first product,
//! with an inner dimension of only 64, ran at half the rate of the encoder's other matmuls
//! (`examples/encoder_layer.rs`): about 40% of an encoder layer's time for 18% of its arithmetic.
//!
//! The operand is the stacked q/k/v projection's (N, S, 3 x heads x head_dim) output: the keys
//! are packed into panels and the values copied head-major once per call, in parallel, and each
//! item scales its own queries as it copies them. (One stacked projection instead of three: the
//! input is packed once and the pool meets once.) (Before, candle's serial copies split all three into (N, heads, S,
//! head_dim) and scaled the queries in a pass of their own while the other thread waited; the
//! server's encoder time for 6 tiles, 3 alternating runs on a noisy machine: 7.8-8.9 s before,
//! 7.0-8.7 s after.)
//!
//! Each work item is 24 queries of one head: their scores against every key (a register-blocked
//! product over the keys, transposed once per call into panels of 64 keys, 6 queries x 64 keys at a
//! time), each row's exponentials (in place of its scores; the row's max in 4 independent chains),
//! then the exponentials times the value rows (6 queries x 64 value dimensions at a time), each
//! output row times 1 / its sum as it is stored, straight into the (N, S, heads x head_dim) output.
//! Normalising the S exponentials of a row first took a pass of its own; scaling the head_dim
//! outputs costs nothing beside the store. With the 4-chain max, one tile's attention (12 heads, 2
//! threads, fastest of 40 calls, 4 alternating runs on a noisy machine) went from 16.1-21.8 ms to
//! 14.9-21.8 ms, medians 18.2-29.0 to 15.4-26.7 ms.
//!
//! Every score is summed in head-dimension order and every output in key order, wherever the item
//! falls, so the result does not depend on the threads. AVX-512 only; elsewhere, or with a mask,
//! the caller keeps candle's path.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::fast_exp;
use super::par::operand;

/// Queries per work item, 4 register blocks: their scores (24 x S f32, 96 KiB for S = 1024)
/// stay in L2.
const QUERIES: usize = 4 * simd::ROWS;

/// `softmax(scale q k^T) v` per head for `qkv` (N, S, 3 x heads x head_dim): the q, k and v
/// projections side by side in each row, each with its heads side by side, no mask: (N, S,
/// heads x head_dim) f32. The queries are scaled as they are read (`q * scale` in f32: the
/// bits candle's `(q * scale)` gives, up to the sign of a zero), so neither the scaling nor a
/// (N, heads, S, head_dim) copy of each operand takes a pass of its own. `None` where this
/// kernel does not apply (not the CPU, not f32, no AVX-512).
pub fn attention(qkv: &Tensor, heads: usize, scale: f32) -> Result<Option<Tensor>> {
    let applies = qkv.device().is_cpu()
        && qkv.dtype() == DType::F32
        && qkv.rank() == 3
        && heads > 0
        && qkv.dim(2)? % (3 * heads) == 0
        && avx512();
    if !applies {
        return Ok(None);
    }
    let (n, s, width) = qkv.dims3()?;
    let op = Fused {
        n,
        heads,
        s,
        hd: width / 3 / heads,
        scale,
    };
    qkv.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

struct Fused {
    n: usize,
    heads: usize,
    s: usize,
    hd: usize,
    scale: f32,
}

thread_local! {
    /// One item's scores (then their exponentials) and its scaled queries, reused across
    /// items and calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        "encoder-attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = operand(qkv, layout)?;
        let Fused {
            n,
            heads,
            s,
            hd,
            scale,
        } = *self;
        // Row stride of the stacked operand; k and v start d and 2 d into each row.
        let (d, ld) = (heads * hd, 3 * heads * hd);
        let len = n * heads * s * hd;
        if qkv.len() != 3 * len || !avx512() {
            candle_core::bail!(
                "encoder attention: operand does not match ({n}, {s}, 3 x {heads} x {hd})"
            );
        }
        let (q, k, v) = (qkv, &qkv[d..], &qkv[2 * d..]);
        let kt = transposed_panels(k, ld, (n, heads, s, hd));
        let vh = head_major(v, ld, (n, heads, s, hd));
        let panels = s.div_ceil(simd::COLS);
        // Every place is written below (each item's rows of its head, all hd columns), so the
        // output is not zero-filled first (a serial pass on the engine thread).
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let shared = super::par::Disjoint::uninit(&mut out.spare_capacity_mut()[..len]);
        let blocks = s.div_ceil(QUERIES);
        super::par::for_each_index(n * heads * blocks, |item| {
            let (nh, first) = (item / blocks, item % blocks * QUERIES);
            let (b, h) = (nh / heads, nh % heads);
            let rows = QUERIES.min(s - first);
            // Where head h of sequence b's first query starts in the stacked operand.
            let head = b * s * ld + h * hd;
            let mut inv = [0f32; QUERIES];
            SCRATCH.with_borrow_mut(|(scores, queries)| {
                scores.resize(QUERIES * s, 0.0);
                // (rows, hd): the item's queries, scaled.
                queries.clear();
                for r in first..first + rows {
                    let at = head + r * ld;
                    queries.extend(q[at..at + hd].iter().map(|&x: &f32| x * scale));
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was checked above; the operand holds (N, S, 3 x heads x
                // hd); output rows b*S + first.. of head h are this item's alone, and `out`
                // outlives `for_each_index`.
                unsafe {
                    // (rows, S) scores: the item's queries times the keys transposed.
                    simd::product(&simd::Product {
                        a: queries.as_ptr(),
                        lda: hd,
                        b: kt[nh * panels * hd * simd::COLS..].as_ptr(),
                        ldb: simd::COLS,
                        panel: hd * simd::COLS,
                        rows,
                        depth: hd,
                        cols: s,
                        out: scores.as_mut_ptr(),
                        ldo: s,
                        scale: std::ptr::null(),
                    });
                    // Each row's exponentials in place of its scores, and 1 / their sum.
                    for (r, inv) in inv.iter_mut().enumerate().take(rows) {
                        let row = &mut scores[r * s..(r + 1) * s];
                        let max = fast_exp::max_avx512(row);
                        let p = row.as_mut_ptr();
                        *inv = 1.0 / fast_exp::exp_sum_avx512(p, p, s, max);
                    }
                    // (rows, hd) context: the exponentials times the values, each row over
                    // its sum, into the (N, S, heads x hd) output.
                    simd::product(&simd::Product {
                        a: scores.as_ptr(),
                        lda: s,
                        b: vh[nh * s * hd..].as_ptr(),
                        ldb: hd,
                        panel: simd::COLS,
                        rows,
                        depth: s,
                        cols: hd,
                        out: shared.ptr().add(((b * s + first) * heads + h) * hd),
                        ldo: d,
                        scale: inv.as_ptr(),
                    });
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (b, h, rows, head, scores, queries, &mut inv);
            });
        });
        // SAFETY: every item wrote its rows of its head, which together are all `len` places.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, s, heads * hd))))
    }
}

/// Each head's keys `k` (rows of (N, S) `ld` apart, heads x hd of them used) transposed into
/// panels of [`simd::COLS`] keys: (N x heads, panels, hd, COLS), the keys past S zero. The
/// score product then reads each depth step's 64 keys from one contiguous line of 256 bytes;
/// from a plain (hd, S) transpose those lines lay S x 4 bytes apart, 4 KiB for S = 1024, all in
/// the same few L1 sets, and the product ran at half its rate.
fn transposed_panels(
    k: &[f32],
    ld: usize,
    (n, heads, s, hd): (usize, usize, usize, usize),
) -> Vec<f32> {
    let cols = simd::COLS;
    let panels = s.div_ceil(cols);
    let per_head = panels * hd * cols;
    let mut kt = vec![0f32; n * heads * per_head];
    super::par::for_each_chunk_mut(&mut kt, per_head, |nh, out| {
        let (b, h) = (nh / heads, nh % heads);
        for j in 0..s {
            let at = (b * s + j) * ld + h * hd;
            let (p, c) = (j / cols, j % cols);
            for (t, &x) in k[at..at + hd].iter().enumerate() {
                out[(p * hd + t) * cols + c] = x;
            }
        }
    });
    kt
}

/// The values `v` (rows of (N, S) `ld` apart, heads x hd of them used) as (N x heads, S, hd),
/// in parallel. Read in place, a head's value rows lay `ld` x 4 bytes apart (9 KiB for
/// SigLIP-B), and the 64 rows a piece of the value product reuses fell into a few of L1's sets.
fn head_major(v: &[f32], ld: usize, (n, heads, s, hd): (usize, usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; n * heads * s * hd];
    super::par::for_each_chunk_mut(&mut out, s * hd, |nh, out| {
        let (b, h) = (nh / heads, nh % heads);
        for (j, row) in out.chunks_exact_mut(hd).enumerate() {
            let at = (b * s + j) * ld + h * hd;
            row.copy_from_slice(&v[at..at + hd]);
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Against candle's matmul, softmax and matmul over the same (scaled) q, k, v: both sum
    /// the same f32 products in other orders (64 or 72 terms per score, S per output), and
    /// `exp` differs by up to 4e-7 relative (src/model/fast_exp.rs); with unit-normal inputs
    /// the outputs, averages of unit values, agree to a few 1e-6. 1e-5 leaves room for that
    /// and still catches a wrong key, row or head (differences of order 0.1).
    #[test]
    fn matches_candles_matmul_softmax_matmul() -> Result<()> {
        if !avx512() {
            eprintln!("skipped: no AVX-512 on this CPU (the encoders keep candle's path)");
            return Ok(());
        }
        let dev = Device::Cpu;
        // S off the 16-query blocks and 64-key vectors; head widths off 16 and over 64.
        for (n, heads, s, hd) in [
            (2, 3, 37, 64),
            (1, 2, 100, 72),
            (1, 1, 16, 20),
            (1, 4, 64, 64),
        ] {
            let scale = (hd as f64).powf(-0.5);
            // The projections' (N, S, heads x hd) outputs.
            let [q, k, v] = [0; 3].map(|_| Tensor::randn(0f32, 1.0, (n, s, heads * hd), &dev));
            let (q, k, v) = (q?, k?, v?);
            // (N, S, heads x hd) -> (N, heads, S, hd), as candle's path splits them.
            let split = |t: &Tensor| -> Result<Tensor> {
                t.reshape((n, s, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let scores = split(&(&q * scale)?)?.matmul(&split(&k)?.t()?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            // (N, heads, S, hd) -> (N, S, heads x hd)
            let want = probs
                .matmul(&split(&v)?)?
                .transpose(1, 2)?
                .reshape((n, s, heads * hd))?;
            let qkv = Tensor::cat(&[&q, &k, &v], 2)?;
            let got = attention(&qkv, heads, scale as f32)?.expect("applies");
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "({n}, {heads}, {s}, {hd}): {diff}");
        }
        Ok(())
    }

    #[test]
    fn declines_other_dtypes() -> Result<()> {
        let t = Tensor::zeros((1, 4, 24), DType::F16, &Device::Cpu)?;
        assert!(attention(&t, 2, 1.0)?.is_none());
        Ok(())
    }
}
