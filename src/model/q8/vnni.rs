//! The Q8_0 panel product (`super`) in AVX-512 VNNI: one panel of 16 weight rows against the
//! input rows, up to 4 input rows per pass over the panel (each line loaded once per pass), the
//! lines of a panel further on asked for on the way.

use std::arch::x86_64::*;

use half::f16;

use super::{Line, Rows, BLOCK, GROUPS};

/// Input rows per pass over a panel.
const ROWS: usize = 4;

/// Panels ahead whose lines a pass asks for (into L2) as it reads its own. A thread reads its
/// panels as one sequential stream; on this machine one stream reads slower than several (the
/// f32 kernel found the same, `small_m.rs`). Batch-1 q8_0 TPOT in the server, 4 alternations:
/// 7.1-8.8 ms with 3 panels ahead against 7.8-11.8 ms without; 1, 2 and 4 panels ahead were in
/// between.
const AHEAD: usize = 3;

/// Writes input row `i` · the panel's weight row `r` to `out[i * ldo + r]` for `i < m`, `r < valid`.
///
/// SAFETY: needs AVX-512F/BW and VNNI; `lines` and `scales` are one panel's over `k` inputs;
/// `out[i * ldo + r]` for those `i`, `r` is valid and no one else's.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel(
    lines: &[Line],
    scales: &[f16],
    rows: &Rows,
    m: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    valid: usize,
) {
    let p = Panel {
        lines: lines.as_ptr().cast(),
        scales: scales.as_ptr().cast(),
        blocks: k / BLOCK,
        mask: ((1u32 << valid) - 1) as u16,
    };
    let mut i = 0;
    while i < m {
        // SAFETY: rows i..i + R exist; the rest as the caller promised.
        unsafe {
            match m - i {
                1 => pass::<1>(&p, rows, i, k, out, ldo),
                2 => pass::<2>(&p, rows, i, k, out, ldo),
                3 => pass::<3>(&p, rows, i, k, out, ldo),
                _ => pass::<ROWS>(&p, rows, i, k, out, ldo),
            }
        }
        i += ROWS;
    }
}

/// One panel's pointers.
struct Panel {
    lines: *const __m512i,
    scales: *const __m256i,
    blocks: usize,
    /// The output lanes that are real rows.
    mask: u16,
}

/// Input rows `i..i + R` against the panel, block by block: two 32-bit sums per input row (even
/// and odd lines, for two dependency chains), scaled into f32 lanes.
#[inline(always)]
unsafe fn pass<const R: usize>(
    p: &Panel,
    rows: &Rows,
    i: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    let blocks = p.blocks;
    let q: [*const i8; R] = std::array::from_fn(|r| rows.q[(i + r) * k..].as_ptr());
    let d: [&[f32]; R] = std::array::from_fn(|r| &rows.d[(i + r) * blocks..][..blocks]);
    let start: [&[i32]; R] = std::array::from_fn(|r| &rows.start[(i + r) * blocks..][..blocks]);
    let mut acc = [_mm512_setzero_ps(); R];
    // The same block AHEAD panels on: a second stream of reads ahead of the one this pass
    // makes (past the matrix's end the prefetch is dropped; no fault, nothing read).
    let ahead = AHEAD * blocks * GROUPS;
    for b in 0..blocks {
        let far = p.lines.wrapping_add(b * GROUPS + ahead).cast::<i8>();
        for g in 0..GROUPS {
            _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(g * 64));
        }
        let mut even: [__m512i; R] = std::array::from_fn(|r| _mm512_set1_epi32(start[r][b]));
        let mut odd = [_mm512_setzero_si512(); R];
        let line = p.lines.add(b * GROUPS);
        for g in (0..GROUPS).step_by(2) {
            let (w0, w1) = (
                _mm512_load_si512(line.add(g)),
                _mm512_load_si512(line.add(g + 1)),
            );
            for r in 0..R {
                // 4 input values, broadcast to every row's lane.
                let at = q[r].add(b * BLOCK + g * 4).cast::<i32>();
                let x0 = _mm512_set1_epi32(at.read_unaligned());
                let x1 = _mm512_set1_epi32(at.add(1).read_unaligned());
                even[r] = _mm512_dpbusd_epi32(even[r], w0, x0);
                odd[r] = _mm512_dpbusd_epi32(odd[r], w1, x1);
            }
        }
        // (16,) each row's scale for block b.
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p.scales.add(b)));
        for r in 0..R {
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r]));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[r][b]));
            acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
        }
    }
    for (r, acc) in acc.into_iter().enumerate() {
        _mm512_mask_storeu_ps(out.add((i + r) * ldo), p.mask, acc);
    }
}
