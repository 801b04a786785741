//! The register-blocked product of the fused attentions (the encoders' `super`, the decoder's
//! `prefill_attention.rs`), in AVX-512: both of their products (scores = q · keys transposed,
//! context = probabilities · values) are a few rows of A times B, computed 6 rows x 4 vectors
//! of 16 columns at a time (24 accumulators: per depth step 4 loads of B and 6 broadcasts of A
//! feed 24 FMAs, so the FMA units, not the loads, set the pace), with masks where a row of B
//! ends.

use std::arch::x86_64::*;

/// Rows of A per register block.
pub(crate) const ROWS: usize = 6;
/// Vectors of B's columns per register block.
const VECS: usize = 4;
const LANES: usize = 16;
/// B's columns per register block.
pub(crate) const COLS: usize = VECS * LANES;

/// The operands of `out = A · B`: A (rows, depth) with row stride `lda`; B (depth, cols) in
/// panels of [`COLS`] columns, `panel` apart, each panel's rows `ldb` apart; out (rows, cols)
/// with row stride `ldo`. A row-major B is one with `panel = COLS`. With `scale` not null,
/// row `r` of the result is multiplied by `scale[r]` as it is stored.
pub(crate) struct Product {
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub panel: usize,
    pub rows: usize,
    pub depth: usize,
    pub cols: usize,
    pub out: *mut f32,
    pub ldo: usize,
    pub scale: *const f32,
}

/// `out[r * ldo + c] = sum_t a[r * lda + t] * b[t * ldb + c]`, each sum in `t` order. One
/// panel of B at a time, and within it [`DEPTH`] rows of B at a time against every block of
/// A's rows, so that those rows of B are read from L1 by every block: the running sums go
/// to `out` between the pieces and come back from it unchanged, so the order of the additions
/// is the same as in one pass.
///
/// SAFETY: needs AVX-512F; the three buffers hold what the strides and sizes reach, and the
/// output places written are the caller's alone.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn product(p: &Product) {
    for c0 in (0..p.cols).step_by(COLS) {
        for t0 in (0..p.depth).step_by(DEPTH) {
            let ts = t0..p.depth.min(t0 + DEPTH);
            let mut r = 0;
            while r < p.rows {
                let (a, out) = (p.a.add(r * p.lda), p.out.add(r * p.ldo));
                // Row r's scale, when this piece ends the sums.
                let scale = match p.scale.is_null() || ts.end < p.depth {
                    true => std::ptr::null(),
                    false => p.scale.add(r),
                };
                let at = (c0, ts.clone(), scale);
                match p.rows - r {
                    1 => block::<1>(p, a, at, out),
                    2 => block::<2>(p, a, at, out),
                    3 => block::<3>(p, a, at, out),
                    4 => block::<4>(p, a, at, out),
                    5 => block::<5>(p, a, at, out),
                    _ => block::<ROWS>(p, a, at, out),
                }
                r += ROWS;
            }
        }
    }
}

/// Rows of B a piece of [`product`] covers: 16 KiB of a 64-column panel.
const DEPTH: usize = 64;

/// Rows `0..R` of A from `a` times rows `ts` of the panel of B at column `c0`, added to the
/// sums in `out` (which start at zero when `ts` starts at 0), each row times `scale[r]` when
/// `scale` is not null.
#[inline(always)]
unsafe fn block<const R: usize>(
    p: &Product,
    a: *const f32,
    (c0, ts, scale): (usize, std::ops::Range<usize>, *const f32),
    out: *mut f32,
) {
    let masks = masks(p.cols - c0);
    let panel = p.b.add(c0 / COLS * p.panel);
    let mut acc = [[_mm512_setzero_ps(); VECS]; R];
    if ts.start > 0 {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (c, acc) in acc.iter_mut().enumerate() {
                let at = out.wrapping_add(r * p.ldo + c0 + c * LANES);
                *acc = _mm512_maskz_loadu_ps(masks[c], at);
            }
        }
    }
    for t in ts {
        let row = panel.add(t * p.ldb);
        // Masked-off lanes are neither read nor written (nor is their address used).
        let b: [__m512; VECS] =
            std::array::from_fn(|c| _mm512_maskz_loadu_ps(masks[c], row.wrapping_add(c * LANES)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let at = _mm512_set1_ps(*a.add(r * p.lda + t));
            for c in 0..VECS {
                acc[c] = _mm512_fmadd_ps(at, b[c], acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let by = match scale.is_null() {
            true => None,
            false => Some(_mm512_set1_ps(*scale.add(r))),
        };
        for c in 0..VECS {
            let at = out.wrapping_add(r * p.ldo + c0 + c * LANES);
            let sums = by.map_or(acc[c], |by| _mm512_mul_ps(acc[c], by));
            _mm512_mask_storeu_ps(at, masks[c], sums);
        }
    }
}

/// The lanes of each of the block's vectors that lie before the end, `left` columns on.
#[inline(always)]
fn masks(left: usize) -> [u16; VECS] {
    std::array::from_fn(|c| {
        let n = left.saturating_sub(c * LANES).min(LANES);
        ((1u32 << n) - 1) as u16
    })
}
