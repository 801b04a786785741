//! The register-blocked product of the fused encoder attention (`super`), in AVX-512: both of
//! its products (scores = q · keys transposed, context = probabilities · values) are a few rows
//! of A times B, computed 4 rows x 4 vectors of 16 columns at a time (16 accumulators), with
//! masks where a row of B ends.

use std::arch::x86_64::*;

/// Rows of A per register block.
const ROWS: usize = 4;
/// Vectors of B's columns per register block.
const VECS: usize = 4;
const LANES: usize = 16;

/// The operands of `out = A · B`: A (rows, depth) with row stride `lda`, B (depth, cols) with
/// row stride `ldb`, out (rows, cols) with row stride `ldo`.
pub(super) struct Product {
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub rows: usize,
    pub depth: usize,
    pub cols: usize,
    pub out: *mut f32,
    pub ldo: usize,
}

/// `out[r * ldo + c] = sum_t a[r * lda + t] * b[t * ldb + c]`, each sum in `t` order.
///
/// SAFETY: needs AVX-512F; the three buffers hold what the strides and sizes reach, and the
/// output places written are the caller's alone.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn product(p: &Product) {
    let mut r = 0;
    while r < p.rows {
        let (a, out) = (p.a.add(r * p.lda), p.out.add(r * p.ldo));
        match p.rows - r {
            1 => rows::<1>(p, a, out),
            2 => rows::<2>(p, a, out),
            3 => rows::<3>(p, a, out),
            _ => rows::<ROWS>(p, a, out),
        }
        r += ROWS;
    }
}

/// Rows `0..R` of A from `a` into `out`, 64 columns at a time.
#[inline(always)]
unsafe fn rows<const R: usize>(p: &Product, a: *const f32, out: *mut f32) {
    for c0 in (0..p.cols).step_by(VECS * LANES) {
        let masks = masks(p.cols - c0);
        let mut acc = [[_mm512_setzero_ps(); VECS]; R];
        for t in 0..p.depth {
            let row = p.b.add(t * p.ldb + c0);
            // Masked-off lanes are neither read nor written (nor is their address used).
            let b: [__m512; VECS] = std::array::from_fn(|c| {
                _mm512_maskz_loadu_ps(masks[c], row.wrapping_add(c * LANES))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = _mm512_set1_ps(*a.add(r * p.lda + t));
                for c in 0..VECS {
                    acc[c] = _mm512_fmadd_ps(at, b[c], acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..VECS {
                let at = out.wrapping_add(r * p.ldo + c0 + c * LANES);
                _mm512_mask_storeu_ps(at, masks[c], acc[c]);
            }
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
