//! The two register-blocked products of the fused encoder attention (`super`), in AVX-512:
//! 4 query rows x 4 vectors of 16 lanes (16 accumulators), masked where a row ends.

use std::arch::x86_64::*;

/// Query rows per register block.
const ROWS: usize = 4;
/// Vectors per row in a register block.
const VECS: usize = 4;
const LANES: usize = 16;

/// `scores[r * s + j] = q[r] · key j` for `r < rows`, `j < s`, from `q` (rows, hd) and `kt`
/// (hd, s), the keys transposed.
///
/// SAFETY: needs AVX-512F; `q` holds `rows * hd` values, `kt` `hd * s`, `scores` `rows * s`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores(
    q: &[f32],
    kt: &[f32],
    rows: usize,
    s: usize,
    hd: usize,
    scores: &mut [f32],
) {
    let (q, kt, out) = (q.as_ptr(), kt.as_ptr(), scores.as_mut_ptr());
    let mut r = 0;
    while r < rows {
        let (q, out) = (q.add(r * hd), out.add(r * s));
        match rows - r {
            1 => score_rows::<1>(q, kt, s, hd, out),
            2 => score_rows::<2>(q, kt, s, hd, out),
            3 => score_rows::<3>(q, kt, s, hd, out),
            _ => score_rows::<ROWS>(q, kt, s, hd, out),
        }
        r += ROWS;
    }
}

/// Rows `0..R` of [`scores`], 64 keys at a time.
#[inline(always)]
unsafe fn score_rows<const R: usize>(
    q: *const f32,
    kt: *const f32,
    s: usize,
    hd: usize,
    out: *mut f32,
) {
    for j in (0..s).step_by(VECS * LANES) {
        let masks = masks(s - j);
        let mut acc = [[_mm512_setzero_ps(); VECS]; R];
        for d in 0..hd {
            let keys = kt.add(d * s + j);
            let k: [__m512; VECS] = std::array::from_fn(|c| {
                _mm512_maskz_loadu_ps(masks[c], keys.wrapping_add(c * LANES))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let qd = _mm512_set1_ps(*q.add(r * hd + d));
                for c in 0..VECS {
                    acc[c] = _mm512_fmadd_ps(qd, k[c], acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..VECS {
                // Masked-off lanes are not written (nor is their address dereferenced).
                let at = out.wrapping_add(r * s + j + c * LANES);
                _mm512_mask_storeu_ps(at, masks[c], acc[c]);
            }
        }
    }
}

/// `out[r * ldo + e] = sum_j p[r * s + j] * v[j * hd + e]` for `r < rows`, `e < hd`, from `p`
/// (rows, s) and `v` (s, hd).
///
/// SAFETY: needs AVX-512F; `p` holds `rows * s` values, `v` `s * hd`; `out[r * ldo + e]` is
/// valid and no one else's for those `r`, `e`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn context(
    p: &[f32],
    v: &[f32],
    rows: usize,
    s: usize,
    hd: usize,
    out: *mut f32,
    ldo: usize,
) {
    let (p, v) = (p.as_ptr(), v.as_ptr());
    let mut r = 0;
    while r < rows {
        let (p, out) = (p.add(r * s), out.add(r * ldo));
        match rows - r {
            1 => context_rows::<1>(p, v, s, hd, out, ldo),
            2 => context_rows::<2>(p, v, s, hd, out, ldo),
            3 => context_rows::<3>(p, v, s, hd, out, ldo),
            _ => context_rows::<ROWS>(p, v, s, hd, out, ldo),
        }
        r += ROWS;
    }
}

/// Rows `0..R` of [`context`], 64 value dimensions at a time.
#[inline(always)]
unsafe fn context_rows<const R: usize>(
    p: *const f32,
    v: *const f32,
    s: usize,
    hd: usize,
    out: *mut f32,
    ldo: usize,
) {
    for e in (0..hd).step_by(VECS * LANES) {
        let masks = masks(hd - e);
        let mut acc = [[_mm512_setzero_ps(); VECS]; R];
        for j in 0..s {
            let values = v.add(j * hd + e);
            let val: [__m512; VECS] = std::array::from_fn(|c| {
                _mm512_maskz_loadu_ps(masks[c], values.wrapping_add(c * LANES))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(*p.add(r * s + j));
                for c in 0..VECS {
                    acc[c] = _mm512_fmadd_ps(pj, val[c], acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..VECS {
                let at = out.wrapping_add(r * ldo + e + c * LANES);
                _mm512_mask_storeu_ps(at, masks[c], acc[c]);
            }
        }
    }
}

/// The lanes of each of the block's vectors that lie before the end, `left` values on.
#[inline(always)]
fn masks(left: usize) -> [u16; VECS] {
    std::array::from_fn(|c| {
        let n = left.saturating_sub(c * LANES).min(LANES);
        ((1u32 << n) - 1) as u16
    })
}
