//! The decode attention's per-key arithmetic in AVX-512 registers, for head widths that are a
//! multiple of 16: every query head's score against one cached key row, and every head's
//! running value sum from one cached value row.
//!
//! The portable loops (`dot`) kept 16 running sums in an array and added them up one lane at a
//! time: `perf annotate` put most of a piece's time in that scalar chain (9 heads × ~135 keys
//! a layer at batch 1). Here each head's products go into one register by fused multiply-adds
//! and are added up by a shuffle tree.

use std::arch::x86_64::{
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_reduce_add_ps, _mm512_set1_ps,
    _mm512_storeu_ps,
};

use crate::model::small_m::Weight;

/// `scores[h * n] = (qs[h] · key[h / n_rep]) * scale` for every head `h` of `qs` (heads, hd);
/// `key` is one pool row (kv_heads, hd).
///
/// SAFETY: the CPU must have AVX-512F; `hd` a nonzero multiple of 16; `qs.len()` a multiple of
/// `hd`; `key` at least `qs.len() / hd / n_rep * hd` long (rounded up); `scores` longer than
/// `(heads - 1) * n`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores<W: Weight>(
    qs: &[f32],
    key: &[W],
    (hd, n_rep, scale): (usize, usize, f32),
    scores: &mut [f32],
    n: usize,
) {
    for h in 0..qs.len() / hd {
        let q = qs.as_ptr().add(h * hd);
        let k = key.as_ptr().add(h / n_rep * hd);
        let mut acc = _mm512_mul_ps(_mm512_loadu_ps(q), W::load16(k));
        for c in (16..hd).step_by(16) {
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(c)), W::load16(k.add(c)), acc);
        }
        *scores.get_unchecked_mut(h * n) = _mm512_reduce_add_ps(acc) * scale;
    }
}

/// `sums[h] += weights[h * n] * value[h / n_rep]` for every head `h` of `sums` (heads, hd);
/// `value` is one pool row (kv_heads, hd).
///
/// SAFETY: as [`scores`], with `sums` for `qs` and `weights` for `scores`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn add_values<W: Weight>(
    weights: &[f32],
    n: usize,
    value: &[W],
    (hd, n_rep): (usize, usize),
    sums: &mut [f32],
) {
    for h in 0..sums.len() / hd {
        let e = _mm512_set1_ps(*weights.get_unchecked(h * n));
        let v = value.as_ptr().add(h / n_rep * hd);
        let o = sums.as_mut_ptr().add(h * hd);
        for c in (0..hd).step_by(16) {
            let sum = _mm512_fmadd_ps(e, W::load16(v.add(c)), _mm512_loadu_ps(o.add(c)));
            _mm512_storeu_ps(o.add(c), sum);
        }
    }
}
