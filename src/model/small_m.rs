//! The CPU product `x @ W^T` for the few rows of a decoding step (`m <= SMALL_M`), with f32 or
//! f16 weights (f16 ones widened to f32 in registers; sums in f32 either way).
//!
//! The profile of batch-1 decoding (bench/README.md) showed candle's matmul spending the step in
//! the `gemm` crate's matrix-vector path, which runs on the calling thread only: one of the two
//! cores read the weights while the other slept. For 2 to 16 rows the `gemm` crate reaches about
//! the same 9 GB/s. Here the weight rows are split across candle's CPU thread pool (`par`), and
//! each weight row is read once from memory while every input row's dot product with it is
//! accumulated, 4 weight rows x 4 input rows at a time (16 independent FMA chains in
//! registers; for one input row, 4 weight rows at a time). AVX-512 or AVX2 is picked at run
//! time; other CPUs get plain dot products.
//!
//! For 16 rows (`examples/decode_step.rs`) three more things counted: the input rows are copied
//! so that their loads are aligned wherever the weights' are (a load split across two cache
//! lines costs two, and candle's buffers are only 16-byte aligned), with one masked step before
//! and after the aligned loop; each pass over a block of weight rows prefetches part of the
//! next block, so reading memory overlaps the block's 4 passes; and four sums are reduced at
//! once by a shuffle tree, written straight into the (m, n) result.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::f16;

/// Up to this many input rows the kernel beats `gemm` (measured by `examples/candle_probe.rs`).
pub const SMALL_M: usize = 16;

/// Input rows and weight rows of one register block.
const XR: usize = 4;
const WR: usize = 4;

/// How many register blocks of weight rows ahead the kernel prefetches (every row count, one
/// included). For one input row this replaced reading the weight rows one at a time as a
/// single stream prefetched 768 bytes ahead, tuned in an earlier session. On the machine of
/// 2026-11-28 (`examples/decode_step`, `MS=1,4,...`, 2 MiB pages) that path took 21-25 ms a
/// step against 17.7-20.1 for four rows. Blocks of 4 weight rows with this prefetch,
/// alternating runs: 14.4-21.2 ms against 23.6-28.7; the server's batch-1 TPOT 19.5-25.9 ms
/// against 29.4-40.4. Prefetching each row's own stream ahead as well made no further
/// difference.
const AHEAD: usize = 1;

/// From this many input rows on the kernel starts its main loop where the weight loads are
/// aligned (below, memory is the limit and the rotations this takes cost more than split
/// loads).
const ALIGN_FROM_M: usize = 4;

/// `x` (m, k) @ `w` (n, k)^T -> (m, n) in `x`'s dtype, when this kernel applies: both f32 or
/// both f16, on the CPU, `w` contiguous, `1 <= m <= SMALL_M`. `None` otherwise (the caller
/// uses candle's matmul).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let applies = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F16)
        && w.dtype() == x.dtype()
        && x.rank() == 2
        && w.rank() == 2
        && (1..=SMALL_M).contains(&x.dim(0)?)
        && x.dim(1)? == w.dim(1)?
        && w.is_contiguous();
    if !applies {
        return Ok(None);
    }
    // (m, n) f32
    let ys = x.contiguous()?.apply_op2_no_bwd(w, &SmallM)?;
    ys.to_dtype(x.dtype()).map(Some)
}

struct SmallM;

impl CustomOp2 for SmallM {
    fn name(&self) -> &'static str {
        "small-m-matmul-t"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, _) = wl.shape().dims2()?;
        // The few input rows in f32 (converted once when f16).
        let widened: Vec<f32>;
        let x = match xs {
            CpuStorage::F16(_) => {
                widened = super::par::operand::<f16>(xs, xl)?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                &widened[..]
            }
            _ => super::par::operand::<f32>(xs, xl)?,
        };
        let out = match ws {
            CpuStorage::F16(_) => product(x, super::par::operand::<f16>(ws, wl)?, m, n, k),
            _ => product(x, super::par::operand::<f32>(ws, wl)?, m, n, k),
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// A weight element the kernel reads: f32, or f16 widened to f32 (also a register's worth).
pub(crate) trait Weight: Copy + Sync {
    fn widen(self) -> f32;
    /// 16 weights at `p` as f32 lanes (needs AVX-512F).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 weights at `p` as f32 lanes (needs AVX and F16C).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Weight for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// Output rows (weight rows) per work item: a multiple of the register block, and enough
/// reading (16 x k weights) that taking an item costs little beside it.
const ITEM_ROWS: usize = 16;

/// `x` (m, k), `w` (n, k), row-major -> (m, n) row-major.
fn product<W: Weight>(x: &[f32], w: &[W], m: usize, n: usize, k: usize) -> Vec<f32> {
    // The input rows copied where their loads in the kernel's main loop (which starts where
    // the weights' loads are aligned) are aligned too: a load split across two cache lines
    // costs two.
    let mut scratch = vec![0f32; m * k + 16];
    let start = scratch.as_ptr() as usize / 4 + aligned_from(w.as_ptr(), 16);
    let off = (16 - start % 16) % 16;
    scratch[off..off + m * k].copy_from_slice(&x[..m * k]);
    let x = &scratch[off..off + m * k];
    let mut out = vec![0f32; m * n];
    let shared = super::par::Disjoint::new(&mut out);
    // Each item owns output columns `first..first + rows` of every row.
    super::par::for_each_index(n.div_ceil(ITEM_ROWS), |item| {
        let first = item * ITEM_ROWS;
        let rows = ITEM_ROWS.min(n - first);
        let w = &w[first * k..(first + rows) * k];
        // SAFETY: columns `first..first + rows` of the (m, n) buffer are this item's alone,
        // and `out` outlives `for_each_index`.
        unsafe { rows_of(x, w, m, k, shared.ptr().add(first), n) };
    });
    out
}

/// How many elements of `T` from `p` the first one aligned to a vector of `lanes` of them is.
fn aligned_from<T>(p: *const T, lanes: usize) -> usize {
    let bytes = lanes * std::mem::size_of::<T>();
    (bytes - p as usize % bytes) % bytes / std::mem::size_of::<T>()
}

/// `w` holds `rows` weight rows of `k`; writes `x` row `c` · `w` row `r` to `out[c * ldo + r]`.
///
/// SAFETY: `out[c * ldo + r]` for `c < m`, `r < w.len() / k` is valid and no one else's.
unsafe fn rows_of<W: Weight>(x: &[f32], w: &[W], m: usize, k: usize, out: *mut f32, ldo: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above; `out` as the caller promised.
            return unsafe { simd::rows_avx512(x, w, m, k, out, ldo) };
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: as above.
            return unsafe { simd::rows_avx2(x, w, m, k, out, ldo) };
        }
    }
    rows_scalar(x, w, m, k, out, ldo)
}

/// Without SIMD: one dot product at a time. SAFETY: as [`rows_of`].
unsafe fn rows_scalar<W: Weight>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    for (r, wrow) in w.chunks_exact(k).enumerate() {
        for (c, xrow) in x.chunks_exact(k).take(m).enumerate() {
            *out.add(c * ldo + r) = xrow.iter().zip(wrow).map(|(a, b)| a * b.widen()).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Against candle's matmul for every row count the kernel takes and odd sizes (blocks
    /// cut short, a k tail off the lanes, rows of changing alignment), with the weights
    /// starting at several offsets into their buffer (so the masked first step before the
    /// aligned loop runs with every length). Both sum the same products in f32 in another
    /// order: the difference is rounding, about sqrt(k) ulps of the largest partial sum, far
    /// below 1e-4 for k <= 100 and unit normals.
    #[test]
    fn matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k) in [(37, 45), (64, 96), (3, 16), (130, 7), (9, 50)] {
            let buffer = Tensor::randn(0f32, 1.0, (n + 15, k), &dev)?;
            for offset in [0, 1, 2, 7, 15] {
                let w = buffer.narrow(0, offset, n)?;
                for m in 1..=SMALL_M {
                    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                    let want = x.matmul(&w.t()?)?;
                    let got = matmul_t(&x, &w)?.expect("applies");
                    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-4, "n {n} k {k} offset {offset} m {m}: {diff}");
                }
            }
        }
        Ok(())
    }

    /// f16 weights and inputs against candle's f16 matmul: both widen the same f16 values and
    /// sum in f32 (candle's `gemm` too), then round to f16, so they differ by the f16 rounding
    /// of the result: 2^-10 relative, 0.02 absolute on sums of magnitude up to ~20.
    #[test]
    fn f16_matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k, offset) in [(37, 45, 0), (64, 96, 0), (37, 45, 1), (20, 50, 3)] {
            let buffer = Tensor::randn(0f32, 1.0, (n + offset, k), &dev)?;
            let w = buffer.to_dtype(DType::F16)?.narrow(0, offset, n)?;
            for m in [1, 4, 7, SMALL_M] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::F16)?;
                let want = x.matmul(&w.t()?)?.to_dtype(DType::F32)?;
                let got = matmul_t(&x, &w)?.expect("applies");
                assert_eq!(got.dtype(), DType::F16);
                let diff = (got.to_dtype(DType::F32)? - want)?.abs()?.max_all()?;
                let diff = diff.to_scalar::<f32>()?;
                assert!(diff < 0.02, "n {n} k {k} m {m}: {diff}");
            }
        }
        Ok(())
    }

    /// The same weights at other addresses (so the aligned loop starts elsewhere in the row)
    /// give the same bits: two servers, or two loads of one model, agree exactly.
    #[test]
    fn result_does_not_depend_on_the_weights_address() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, n, k) in [
            (DType::F32, 9, 45),
            (DType::F32, 5, 600),
            (DType::F16, 9, 50),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
            for m in [1, 3, SMALL_M] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
                let bits = |w: &Tensor| -> Result<Vec<u32>> {
                    crate::model::f32_bits(&matmul_t(&x, w)?.expect("applies"))
                };
                let want = bits(&w)?;
                for offset in 1..=4 {
                    let pad = Tensor::zeros((offset, k), dtype, &dev)?;
                    let moved = Tensor::cat(&[&pad, &w], 0)?.narrow(0, offset, n)?;
                    assert_eq!(bits(&moved)?, want, "{dtype:?} k {k} m {m} offset {offset}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn declines_what_it_does_not_cover() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((8, 4), DType::F32, &dev)?;
        let many = Tensor::zeros((SMALL_M + 1, 4), DType::F32, &dev)?;
        assert!(matmul_t(&many, &w)?.is_none());
        let half = Tensor::zeros((1, 4), DType::F16, &dev)?;
        assert!(matmul_t(&half, &w)?.is_none(), "mixed dtypes");
        let bf = Tensor::zeros((1, 4), DType::BF16, &dev)?;
        assert!(matmul_t(&bf, &w.to_dtype(DType::BF16)?)?.is_none());
        let strided = Tensor::zeros((4, 8), DType::F32, &dev)?.t()?;
        assert!(matmul_t(&Tensor::zeros((1, 4), DType::F32, &dev)?, &strided)?.is_none());
        Ok(())
    }
}
