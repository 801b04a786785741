//! The CPU product `x @ W^T` for the few rows of a decoding step (`m <= SMALL_M`), with f32 or
//! f16 weights (f16 ones widened to f32 in registers; sums in f32 either way).
//!
//! The profile of batch-1 decoding (bench/README.md) showed candle's matmul spending the step in
//! the `gemm` crate's matrix-vector path, which runs on the calling thread only: one of the two
//! cores read the weights while the other slept. For 2 to 16 rows the `gemm` crate reaches about
//! the same 9 GB/s. Here the weight rows are split across candle's CPU thread pool (`par`), and
//! each weight row is read once from memory while every input row's dot product with it is
//! accumulated, 4 weight
//! rows x 4 input rows at a time (16 independent FMA chains in registers). AVX-512 or AVX2 is
//! picked at run time; other CPUs get plain dot products.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::f16;

/// Up to this many input rows the kernel beats `gemm` (measured by `examples/candle_probe.rs`).
pub const SMALL_M: usize = 16;

/// Input rows and weight rows of one register block.
const XR: usize = 4;
const WR: usize = 4;

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
                widened = contiguous::<f16>(xs, xl)?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                &widened[..]
            }
            _ => contiguous::<f32>(xs, xl)?,
        };
        let out = match ws {
            CpuStorage::F16(_) => product(x, contiguous::<f16>(ws, wl)?, m, n, k),
            _ => product(x, contiguous::<f32>(ws, wl)?, m, n, k),
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("small-m matmul: operand not contiguous")
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// A weight element the kernel reads: f32, or f16 widened to f32 (also a register's worth).
trait Weight: Copy + Sync {
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
    // (n, m): each item owns a contiguous run of output rows.
    let mut out_t = vec![0f32; n * m];
    super::par::for_each_chunk_mut(&mut out_t, ITEM_ROWS * m, |item, out| {
        let first = item * ITEM_ROWS;
        let rows = out.len() / m;
        rows_of(x, &w[first * k..(first + rows) * k], m, k, out);
    });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// Dispatches to the widest instruction set this CPU has.
fn rows_of<W: Weight>(x: &[f32], w: &[W], m: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above.
            return unsafe { simd::rows_avx512(x, w, m, k, out) };
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: as above.
            return unsafe { simd::rows_avx2(x, w, m, k, out) };
        }
    }
    rows_scalar(x, w, m, k, out)
}

/// Without SIMD: one dot product at a time.
fn rows_scalar<W: Weight>(x: &[f32], w: &[W], m: usize, k: usize, out: &mut [f32]) {
    for (wrow, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (xrow, v) in x.chunks_exact(k).zip(o.iter_mut()) {
            *v = xrow.iter().zip(wrow).map(|(a, b)| a * b.widen()).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Weight, WR, XR};

    /// Loads `LANES` weights of type `W` as f32 lanes.
    pub(super) trait Load<W> {
        unsafe fn load_w(p: *const W) -> Self;
    }

    impl<W: Weight> Load<W> for __m512 {
        #[inline(always)]
        unsafe fn load_w(p: *const W) -> Self {
            W::load16(p)
        }
    }

    impl<W: Weight> Load<W> for __m256 {
        #[inline(always)]
        unsafe fn load_w(p: *const W) -> Self {
            W::load8(p)
        }
    }

    /// The few vector operations the blocks need, at one register width.
    trait Vector: Copy {
        const LANES: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn fma(a: Self, b: Self, acc: Self) -> Self;
        unsafe fn sum(self) -> f32;
    }

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
            _mm512_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
            _mm256_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), self);
            lanes.iter().sum()
        }
    }

    /// SAFETY: the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_avx512<W: Weight>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        rows::<__m512, W>(x, w, m, k, out)
    }

    /// SAFETY: the CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<W: Weight>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        rows::<__m256, W>(x, w, m, k, out)
    }

    /// `w` holds `out.len() / m` weight rows of `k`; `out` (rows, m) gets every dot product.
    #[inline(always)]
    unsafe fn rows<V: Vector + Load<W>, W: Weight>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        let rows = out.len() / m;
        assert!(x.len() >= m * k && w.len() >= rows * k, "operand sizes");
        let (x, w) = (x.as_ptr(), w.as_ptr());
        let mut j = 0;
        while j < rows {
            let wr = WR.min(rows - j);
            let mut i = 0;
            while i < m {
                let xr = XR.min(m - i);
                let (wp, xp) = (w.add(j * k), x.add(i * k));
                let o = &mut out[j * m + i..];
                match wr {
                    4 => by_inputs::<V, W, 4>(xp, wp, m, k, xr, o),
                    3 => by_inputs::<V, W, 3>(xp, wp, m, k, xr, o),
                    2 => by_inputs::<V, W, 2>(xp, wp, m, k, xr, o),
                    _ => by_inputs::<V, W, 1>(xp, wp, m, k, xr, o),
                }
                i += xr;
            }
            j += wr;
        }
    }

    /// [`block`] for `xr` (1 to 4) input rows.
    #[inline(always)]
    unsafe fn by_inputs<V: Vector + Load<W>, W: Weight, const R: usize>(
        x: *const f32,
        w: *const W,
        m: usize,
        k: usize,
        xr: usize,
        out: &mut [f32],
    ) {
        match xr {
            4 => block::<V, W, R, 4>(x, w, m, k, out),
            3 => block::<V, W, R, 3>(x, w, m, k, out),
            2 => block::<V, W, R, 2>(x, w, m, k, out),
            _ => block::<V, W, R, 1>(x, w, m, k, out),
        }
    }

    /// `R` weight rows at `w` (stride `k`) against `C` input rows at `x` (stride `k`), into
    /// `out[r * m + c]`. Caller: `R` rows of `w` and `C` rows of `x` are in bounds.
    #[inline(always)]
    unsafe fn block<V: Vector + Load<W>, W: Weight, const R: usize, const C: usize>(
        x: *const f32,
        w: *const W,
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        // acc[c][r]: input row c against weight row r.
        let mut acc = [[V::zero(); R]; C];
        let whole = k / V::LANES * V::LANES;
        let mut at = 0;
        while at < whole {
            let wv: [V; R] = std::array::from_fn(|r| V::load_w(w.add(r * k + at)));
            for (c, row) in acc.iter_mut().enumerate() {
                let xv = V::load(x.add(c * k + at));
                for (a, wr) in row.iter_mut().zip(&wv) {
                    *a = V::fma(xv, *wr, *a);
                }
            }
            at += V::LANES;
        }
        for (c, row) in acc.iter().enumerate() {
            for (r, a) in row.iter().enumerate() {
                let tail: f32 = (whole..k)
                    .map(|t| *x.add(c * k + t) * (*w.add(r * k + t)).widen())
                    .sum();
                out[r * m + c] = a.sum() + tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Against candle's matmul for every row count the kernel takes and odd sizes (blocks
    /// cut short, a k tail off the lanes). Both sum the same products in f32 in another order:
    /// the difference is rounding, about sqrt(k) ulps of the largest partial sum, far below
    /// 1e-4 for k <= 100 and unit normals.
    #[test]
    fn matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k) in [(37, 45), (64, 96), (3, 16), (130, 7)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            for m in 1..=SMALL_M {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let want = x.matmul(&w.t()?)?;
                let got = matmul_t(&x, &w)?.expect("applies");
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "n {n} k {k} m {m}: {diff}");
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
        for (n, k) in [(37, 45), (64, 96)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(DType::F16)?;
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
