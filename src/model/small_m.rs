//! The CPU product `x @ W^T` for the few rows of a decoding step (`m <= SMALL_M`), with f32 or
//! f16 weights (f16 ones widened to f32 in registers; sums in f32 either way).
//!
//! The profile of batch-1 decoding (bench/README.md) showed candle's matmul spending the step in
//! the `gemm` crate's matrix-vector path, which runs on the calling thread only: one of the two
//! cores read the weights while the other slept. For 2 to 16 rows the `gemm` crate reaches about
//! the same 9 GB/s. Here the weight rows are split across candle's CPU thread pool (`par`), and
//! each weight row is read once from memory while every input row's dot product with it is
//! accumulated, 4 weight rows x 4 input rows at a time (16 independent FMA chains in
//! registers). AVX-512 or AVX2 is picked at run time; other CPUs get plain dot products.
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

/// How many register blocks of weight rows ahead the kernel prefetches.
const AHEAD: usize = 1;

/// From this many input rows on the kernel starts its main loop where the weight loads are
/// aligned (below, memory is the limit and the rotations this takes cost more than split
/// loads).
const ALIGN_FROM_M: usize = 4;

/// From this many input rows on the kernel prefetches (below, the hardware's prefetcher keeps
/// up: the block's one pass is short).
const FETCH_FROM_M: usize = 2;

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
mod simd {
    use std::arch::x86_64::*;

    use super::{Weight, AHEAD, ALIGN_FROM_M, FETCH_FROM_M, WR, XR};

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
        /// Lanes `lo..hi` from `p`, the others zero (and not read).
        unsafe fn load_lanes(p: *const f32, lo: usize, hi: usize) -> Self;
        /// Lane `q` of the result is lane `(q - by) mod LANES` of `self`.
        unsafe fn rotate(self, by: usize) -> Self;

        /// The lane sum of each of `R` vectors.
        #[inline(always)]
        unsafe fn sums<const R: usize>(vs: &[Self; R]) -> [f32; R] {
            std::array::from_fn(|r| vs[r].sum())
        }
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
        #[inline(always)]
        unsafe fn load_lanes(p: *const f32, lo: usize, hi: usize) -> Self {
            let mask = ((1u32 << hi) - 1) & !((1u32 << lo) - 1);
            _mm512_maskz_loadu_ps(mask as __mmask16, p)
        }
        #[inline(always)]
        unsafe fn rotate(self, by: usize) -> Self {
            let idx: [i32; 16] = std::array::from_fn(|q| ((q + 16 - by) % 16) as i32);
            _mm512_permutexvar_ps(_mm512_loadu_si512(idx.as_ptr().cast()), self)
        }

        /// Four vectors at once by a shuffle tree (14 instructions instead of 4 x 8).
        #[inline(always)]
        unsafe fn sums<const R: usize>(vs: &[Self; R]) -> [f32; R] {
            if R != 4 {
                return std::array::from_fn(|r| vs[r].sum());
            }
            // Halves of pairs: lanes 0-1 hold v0's 8 partial sums, lanes 2-3 v1's.
            let pair = |a: __m512, b: __m512| {
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(a, b),
                    _mm512_shuffle_f32x4::<0xEE>(a, b),
                )
            };
            let (p01, p23) = (pair(vs[0], vs[1]), pair(vs[2], vs[3]));
            // 128-bit lane r holds 4 partial sums of vs[r].
            let q = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(p01, p23),
                _mm512_shuffle_f32x4::<0xDD>(p01, p23),
            );
            // Within each lane: every element becomes the lane's sum.
            let q = _mm512_add_ps(q, _mm512_permute_ps::<0b10_11_00_01>(q));
            let q = _mm512_add_ps(q, _mm512_permute_ps::<0b01_00_11_10>(q));
            let firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_permutexvar_ps(firsts, q));
            std::array::from_fn(|r| lanes[r])
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
        #[inline(always)]
        unsafe fn load_lanes(p: *const f32, lo: usize, hi: usize) -> Self {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let from = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo as i32 - 1));
            let below = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), lane);
            _mm256_maskload_ps(p, _mm256_and_si256(from, below))
        }
        #[inline(always)]
        unsafe fn rotate(self, by: usize) -> Self {
            let idx: [i32; 8] = std::array::from_fn(|q| ((q + 8 - by) % 8) as i32);
            _mm256_permutevar8x32_ps(self, _mm256_loadu_si256(idx.as_ptr().cast()))
        }
    }

    /// SAFETY: the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_avx512<W: Weight>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        if m == 1 {
            return one_row_avx512(x, w, k, out, ldo);
        }
        rows::<__m512, W>(x, w, m, k, out, ldo)
    }

    /// [`rows_avx512`] for one input row, compiled on its own: with `m` known, the blocks for
    /// more rows drop out and the pointers of the one left stay in registers (batch-1 decoding
    /// is bound by memory, and spills slowed it by 8%).
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn one_row_avx512<W: Weight>(x: &[f32], w: &[W], k: usize, out: *mut f32, ldo: usize) {
        rows::<__m512, W>(x, w, 1, k, out, ldo)
    }

    /// SAFETY: the CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<W: Weight>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        rows::<__m256, W>(x, w, m, k, out, ldo)
    }

    /// `w` holds `w.len() / k` weight rows; `out[c * ldo + r]` gets input row `c` · weight
    /// row `r`. SAFETY: as `super::rows_of`.
    #[inline(always)]
    unsafe fn rows<V: Vector + Load<W>, W: Weight>(
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let rows = w.len() / k;
        assert!(x.len() >= m * k, "operand sizes");
        if k < V::LANES {
            return super::rows_scalar(x, w, m, k, out, ldo);
        }
        let (x, w) = (x.as_ptr(), w.as_ptr());
        // Each pass over a block of weight rows asks for its share of the block `AHEAD` blocks
        // on, so that reading memory overlaps all of the block's passes.
        let share = if m >= FETCH_FROM_M {
            WR.div_ceil(m.div_ceil(XR))
        } else {
            0
        };
        let mut j = 0;
        while j < rows {
            let wr = WR.min(rows - j);
            let mut i = 0;
            while i < m {
                let xr = XR.min(m - i);
                let (wp, xp) = (w.add(j * k), x.add(i * k));
                let first = (i / XR * share).min(WR);
                // Prefetches past the end of `w` are harmless: they never fault.
                let fetch = (
                    wp.wrapping_add((AHEAD * WR + first) * k),
                    share.min(WR - first),
                );
                let o = out.add(i * ldo + j);
                // Where the main loop starts (see `block`); for one row, where memory is the
                // limit, the rotations cost more than split loads.
                let head = if m >= ALIGN_FROM_M {
                    super::aligned_from(wp, V::LANES)
                } else {
                    0
                };
                match wr {
                    4 => by_inputs::<V, W, 4>(xp, wp, fetch, head, k, xr, o, ldo),
                    3 => by_inputs::<V, W, 3>(xp, wp, fetch, head, k, xr, o, ldo),
                    2 => by_inputs::<V, W, 2>(xp, wp, fetch, head, k, xr, o, ldo),
                    _ => by_inputs::<V, W, 1>(xp, wp, fetch, head, k, xr, o, ldo),
                }
                i += xr;
            }
            j += wr;
        }
    }

    /// [`block`] for `xr` (1 to 4) input rows.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn by_inputs<V: Vector + Load<W>, W: Weight, const R: usize>(
        x: *const f32,
        w: *const W,
        fetch: (*const W, usize),
        head: usize,
        k: usize,
        xr: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        match xr {
            4 => block::<V, W, R, 4>(x, w, fetch, head, k, out, ldo),
            3 => block::<V, W, R, 3>(x, w, fetch, head, k, out, ldo),
            2 => block::<V, W, R, 2>(x, w, fetch, head, k, out, ldo),
            _ => block::<V, W, R, 1>(x, w, fetch, head, k, out, ldo),
        }
    }

    /// One step of [`block`] at element `at`: whole weight vectors against the input rows'
    /// lanes `lo..hi` (with `PARTIAL`; the other lanes count as zero).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn step<
        V: Vector + Load<W>,
        W: Weight,
        const R: usize,
        const C: usize,
        const PARTIAL: bool,
    >(
        acc: &mut [[V; R]; C],
        x: *const f32,
        w: *const W,
        k: usize,
        at: usize,
        lo: usize,
        hi: usize,
    ) {
        let wv: [V; R] = std::array::from_fn(|r| V::load_w(w.add(r * k + at)));
        for (c, row) in acc.iter_mut().enumerate() {
            let p = x.add(c * k + at);
            let xv = if PARTIAL {
                V::load_lanes(p, lo, hi)
            } else {
                V::load(p)
            };
            for (a, wr) in row.iter_mut().zip(&wv) {
                *a = V::fma(xv, *wr, *a);
            }
        }
    }

    /// Every sum's lanes rotated: lane `q` takes lane `(q - by) mod LANES`.
    #[inline(always)]
    unsafe fn rotate_all<V: Vector, const R: usize, const C: usize>(
        acc: &mut [[V; R]; C],
        by: usize,
    ) {
        for a in acc.iter_mut().flatten() {
            *a = a.rotate(by);
        }
    }

    /// `R` weight rows at `w` (stride `k`) against `C` input rows at `x` (stride `k`), into
    /// `out[c * ldo + r]`; prefetches `fetch.1` rows (stride `k`) at `fetch.0` on the way.
    /// Caller: `R` rows of `w` and `C` rows of `x` are in bounds, and so are those outputs.
    #[inline(always)]
    unsafe fn block<V: Vector + Load<W>, W: Weight, const R: usize, const C: usize>(
        x: *const f32,
        w: *const W,
        (ahead, fetch_rows): (*const W, usize),
        head: usize,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // acc[c][r]: input row c against weight row r.
        let mut acc = [[V::zero(); R]; C];
        let lanes = V::LANES;
        // Element `e` is summed in lane `e mod lanes` ("the rows' frame"), whatever the
        // buffer's address, so the result is too (two servers agree to the bit). The main
        // loop starts at element `head`, where the weight loads are aligned: its lane `l`
        // reads element `at + l`, so the sums are rotated into that frame for the loop and
        // back after it. The elements before it are one step over lanes `0..head`; those after
        // it one step over the last `lanes` elements (in bounds: k >= lanes), in that step's
        // frame. Rotations move lanes exactly, and each lane adds its elements in the same
        // order in every case.
        if head > 0 {
            step::<V, W, R, C, true>(&mut acc, x, w, k, 0, 0, head);
            rotate_all(&mut acc, lanes - head);
        }
        let mut at = head;
        while at + lanes <= k {
            for r in 0..fetch_rows {
                let p = ahead.wrapping_add(r * k + at) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(p);
            }
            step::<V, W, R, C, false>(&mut acc, x, w, k, at, 0, lanes);
            at += lanes;
        }
        if head > 0 {
            rotate_all(&mut acc, head);
        }
        if at < k {
            let shift = k % lanes;
            if shift != 0 {
                rotate_all(&mut acc, lanes - shift);
            }
            step::<V, W, R, C, true>(&mut acc, x, w, k, k - lanes, lanes - (k - at), lanes);
            if shift != 0 {
                rotate_all(&mut acc, shift);
            }
        }
        for (c, row) in acc.iter().enumerate() {
            for (r, s) in V::sums(row).into_iter().enumerate() {
                *out.add(c * ldo + r) = s;
            }
        }
    }
}

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
                    let y = matmul_t(&x, w)?.expect("applies").to_dtype(DType::F32)?;
                    Ok(y.flatten_all()?
                        .to_vec1::<f32>()?
                        .iter()
                        .map(|v| v.to_bits())
                        .collect())
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
