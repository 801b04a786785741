//! The encoders' unmasked self-attention on the CPU in one pass per block of queries: scores,
//! softmax and the weighted sum of values computed while the block's scores are in cache.
//!
//! Through candle, one 1024-patch SigLIP tile's attention wrote each head's (1024, 1024) scores
//! to memory three times (the product, the softmax, the second product's input) and its first
//! product, with an inner dimension of only 64, ran at half the rate of the encoder's other
//! matmuls (`examples/encoder_layer.rs`): about 40% of an encoder layer's time for 18% of its
//! arithmetic. Here each work item is 24 queries of one head: their scores against every key
//! (a register-blocked product over the keys, transposed once per call into panels of 64
//! keys, 6 queries x 64 keys at a time), each row's exponentials (in place of its scores; the
//! row's max in 4 independent chains), then the exponentials times the value rows (6 queries x
//! 64 value dimensions at a time), each output row times 1 / its sum as it is stored, straight
//! into the (N, S, heads x head_dim) output. Normalising the S exponentials of a row first took
//! a pass of its own; dividing the head_dim outputs costs nothing beside the store. With the
//! 4-chain max, one tile's attention (12 heads, 2 threads, fastest of 40 calls, 4 alternating
//! runs on a noisy machine) went from 16.1-21.8 ms to 14.9-21.8 ms, medians 18.2-29.0 to
//! 15.4-26.7 ms. Every score is summed in head-dimension order and every output in key order,
//! wherever the item falls, so the result does not depend on the threads. AVX-512 only;
//! elsewhere, or with a mask, the caller keeps candle's path.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::fast_exp;
use super::par::operand;

/// Queries per work item, 4 register blocks: their scores (24 x S f32, 96 KiB for S = 1024)
/// stay in L2.
const QUERIES: usize = 4 * simd::ROWS;

/// `softmax(q k^T) v` for `q`, `k`, `v` (N, heads, S, head_dim), `q` already scaled, no mask:
/// (N, S, heads x head_dim) f32. `None` where this kernel does not apply (not the CPU, not f32,
/// no AVX-512).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    let applies = q.device().is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && q.dims() == k.dims()
        && q.dims() == v.dims()
        && avx512();
    if !applies {
        return Ok(None);
    }
    let (n, heads, s, hd) = q.dims4()?;
    let op = Fused { n, heads, s, hd };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
        .map(Some)
}

fn avx512() -> bool {
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
}

thread_local! {
    /// One item's scores (then their exponentials), reused across items and calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "encoder-attention"
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
        let Fused { n, heads, s, hd } = *self;
        let len = n * heads * s * hd;
        if [q.len(), k.len(), v.len()] != [len; 3] || !avx512() {
            candle_core::bail!(
                "encoder attention: operands do not match ({n}, {heads}, {s}, {hd})"
            );
        }
        let kt = transposed_panels(k, s, hd);
        let panels = s.div_ceil(simd::COLS);
        let mut out = vec![0f32; len];
        let shared = super::par::Disjoint::new(&mut out);
        let blocks = s.div_ceil(QUERIES);
        super::par::for_each_index(n * heads * blocks, |item| {
            let (nh, first) = (item / blocks, item % blocks * QUERIES);
            let (b, h) = (nh / heads, nh % heads);
            let rows = QUERIES.min(s - first);
            let head = nh * s * hd;
            let mut inv = [0f32; QUERIES];
            SCRATCH.with_borrow_mut(|scores| {
                scores.resize(QUERIES * s, 0.0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was checked above; the operands hold (N, heads, S, hd)
                // each; output rows b*S + first.. of head h are this item's alone, and `out`
                // outlives `for_each_index`.
                unsafe {
                    // (rows, S) scores: the item's queries times the keys transposed.
                    simd::product(&simd::Product {
                        a: q[head + first * hd..].as_ptr(),
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
                        b: v[head..].as_ptr(),
                        ldb: hd,
                        panel: simd::COLS,
                        rows,
                        depth: s,
                        cols: hd,
                        out: shared.ptr().add(((b * s + first) * heads + h) * hd),
                        ldo: heads * hd,
                        scale: inv.as_ptr(),
                    });
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (b, h, rows, head, scores, &mut inv);
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((n, s, heads * hd))))
    }
}

/// Each head's keys `k` (heads, S, hd) transposed into panels of [`simd::COLS`] keys: (heads,
/// panels, hd, COLS), the keys past S zero. The score product then reads each depth step's
/// 64 keys from one contiguous line of 256 bytes; from a plain (hd, S) transpose those lines
/// lay S x 4 bytes apart, 4 KiB for S = 1024, all in the same few L1 sets, and the product ran
/// at half its rate.
fn transposed_panels(k: &[f32], s: usize, hd: usize) -> Vec<f32> {
    let cols = simd::COLS;
    let panels = s.div_ceil(cols);
    let per_head = panels * hd * cols;
    let mut kt = vec![0f32; k.len() / (s * hd).max(1) * per_head];
    super::par::for_each_chunk_mut(&mut kt, per_head, |h, out| {
        let keys = &k[h * s * hd..(h + 1) * s * hd];
        for (j, key) in keys.chunks_exact(hd).enumerate() {
            let (p, c) = (j / cols, j % cols);
            for (t, &x) in key.iter().enumerate() {
                out[(p * hd + t) * cols + c] = x;
            }
        }
    });
    kt
}

#[cfg(target_arch = "x86_64")]
mod simd;

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
            let q = (Tensor::randn(0f32, 1.0, (n, heads, s, hd), &dev)? * scale)?;
            let k = Tensor::randn(0f32, 1.0, (n, heads, s, hd), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n, heads, s, hd), &dev)?;
            let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            // (N, heads, S, hd) -> (N, S, heads x hd)
            let want = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, s, heads * hd))?;
            let got = attention(&q, &k, &v)?.expect("applies");
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "({n}, {heads}, {s}, {hd}): {diff}");
        }
        Ok(())
    }

    #[test]
    fn declines_other_dtypes() -> Result<()> {
        let t = Tensor::zeros((1, 1, 4, 8), DType::F16, &Device::Cpu)?;
        assert!(attention(&t, &t, &t)?.is_none());
        Ok(())
    }
}
