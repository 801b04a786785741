//! The register blocks of the small-m product (`super`), for AVX-512 and AVX2: the same
//! generic code at two vector widths, each entry point compiled with its target features.

use std::arch::x86_64::*;

use super::{Weight, AHEAD, ALIGN_FROM_M, WR, XR};

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
    let share = WR.div_ceil(m.div_ceil(XR));
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
unsafe fn rotate_all<V: Vector, const R: usize, const C: usize>(acc: &mut [[V; R]; C], by: usize) {
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
