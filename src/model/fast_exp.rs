//! `exp` over a slice, 16 lanes at a time with AVX-512 where the CPU has it, and the
//! attention's row softmax built on it.
//!
//! The image profile (bench/README.md) had libm's scalar `expf` at 16% of a SigLIP layer: the
//! attention softmax and the tanh-GELU call it once per element. Here e^x = 2^n e^r with
//! n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its Taylor polynomial to r^6 (truncation
//! below 2e-7 relative, about an ulp), and 2^n applied by `vscalefps`, which also underflows
//! to 0 and overflows to infinity as `expf` does. NaN stays NaN, -inf gives 0.

/// `xs[i] = exp(xs[i])`.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected just above.
        unsafe { exp_avx512(xs) };
        return;
    }
    for x in xs.iter_mut() {
        *x = x.exp();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        let x = _mm512_loadu_ps(c.as_ptr());
        _mm512_storeu_ps(c.as_mut_ptr(), exp16(x));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mask = ((1u32 << rest.len()) - 1) as __mmask16;
        let x = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, exp16(x));
    }
}

/// `super::attention::softmax_row` in AVX-512 registers: [`max_avx512`], then
/// [`exp_sum_avx512`], then the scaling. The sums are the portable version's (lane `l` adds
/// the elements `l` mod 16 of the whole chunks in order, the lanes then added 0 to 15, the
/// tail's sum last), so both give the same bits. Elements of the row the profile saw at 6 ms
/// of a 1024-patch SigLIP layer's 18 ms of attention when written as plain loops (the max a
/// scalar chain, the rest 4 lanes wide).
///
/// SAFETY: the CPU must have AVX-512F; `out` is at least as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_avx512(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let out = &mut out[..n];
    let sum = exp_sum_avx512(x.as_ptr(), out.as_mut_ptr(), n, max_avx512(x));
    let inv = _mm512_set1_ps(1.0 / sum);
    for at in (0..n).step_by(16) {
        let mask = lanes_from(n - at);
        let p = out.as_mut_ptr().add(at);
        _mm512_mask_storeu_ps(p, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p), inv));
    }
}

/// The largest element of `x` (NaNs skipped, as by `f32::max`; -inf when empty), in 4
/// independent chains of `vmaxps`: one chain waited on each comparison's latency. The max is
/// exact, so the order of the comparisons does not change it.
///
/// SAFETY: the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn max_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (n, p) = (x.len(), x.as_ptr());
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    // vmaxps returns its second operand where one is NaN, so NaNs are skipped.
    let mut m = [ninf; 4];
    let mut at = 0;
    while at + 64 <= n {
        for (i, m) in m.iter_mut().enumerate() {
            *m = _mm512_max_ps(_mm512_loadu_ps(p.add(at + 16 * i)), *m);
        }
        at += 64;
    }
    while at < n {
        let v = _mm512_mask_loadu_ps(ninf, lanes_from(n - at), p.add(at));
        m[0] = _mm512_max_ps(v, m[0]);
        at += 16;
    }
    _mm512_reduce_max_ps(_mm512_max_ps(
        _mm512_max_ps(m[0], m[1]),
        _mm512_max_ps(m[2], m[3]),
    ))
}

/// `out[i] = exp(x[i] - max)` for `i < n`, and their sum: lane `l` adds the elements `l` mod
/// 16 of the whole chunks in order, the lanes are then added 0 to 15, the tail's elements
/// last. `x` and `out` may be the same buffer.
///
/// SAFETY: the CPU must have AVX-512F; both pointers reach `n` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_sum_avx512(x: *const f32, out: *mut f32, n: usize, max: f32) -> f32 {
    use std::arch::x86_64::*;
    let whole = n / 16 * 16;
    let max = _mm512_set1_ps(max);
    let mut lanes = _mm512_setzero_ps();
    for at in (0..whole).step_by(16) {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x.add(at)), max));
        _mm512_storeu_ps(out.add(at), e);
        lanes = _mm512_add_ps(lanes, e);
    }
    let mut sums = [0f32; 16];
    _mm512_storeu_ps(sums.as_mut_ptr(), lanes);
    let mut sum = sums.iter().sum::<f32>();
    if whole < n {
        let mask = lanes_from(n - whole);
        let rest = _mm512_maskz_loadu_ps(mask, x.add(whole));
        _mm512_mask_storeu_ps(out.add(whole), mask, exp16(_mm512_sub_ps(rest, max)));
        let tail: f32 = std::slice::from_raw_parts(out.add(whole), n - whole)
            .iter()
            .sum();
        sum += tail;
    }
    sum
}

/// A mask of the first `left.min(16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_from(left: usize) -> u16 {
    ((1u32 << left.min(16)) - 1) as u16
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // At or below -104 the result is 0 (a masked score's -inf too): those lanes are computed
    // from 0 and zeroed at the end. Computed from -104, `scalef` underflowed to that 0, and
    // every such lane cost a microcode assist: the softmax of a causal prefill, half of it
    // masked, ran at about 5 ns an element. Above 89 the result is infinity (scalef
    // saturates); clamping keeps n in range. NaN passes through (the comparison is false for
    // it, and max/min return their second operand when one is NaN).
    let zero = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, _mm512_set1_ps(-104.0));
    let x = _mm512_mask_mov_ps(x, zero, _mm512_setzero_ps());
    let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // r = x - n ln 2, with ln 2 in two parts so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_maskz_mov_ps(!zero, _mm512_scalef_ps(p, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against libm's `expf` over the whole range softmax and the activations use (and past
    /// both ends), every length of tail: within 4e-7 relative (a few ulps: the polynomial's
    /// truncation plus the rounding of r and of the Horner steps), and the same at the
    /// special values.
    #[test]
    fn matches_expf() {
        let xs: Vec<f32> = (0..20_011).map(|i| -110.0 + i as f32 * 0.01).collect();
        for len in [xs.len(), 15, 1] {
            let mut got = xs[..len].to_vec();
            exp_in_place(&mut got);
            for (x, g) in xs.iter().zip(&got) {
                let want = x.exp();
                let rel = ((g - want) / want.max(f32::MIN_POSITIVE)).abs();
                let close = *g == want || rel < 4e-7 || (g - want).abs() < 1e-44;
                assert!(close, "exp({x}) = {g}, want {want}");
            }
        }
        let mut special = [
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            0.0,
            200.0,
            -200.0,
        ];
        exp_in_place(&mut special);
        // At and below -104 exactly 0 (libm's expf rounds these to 0 too), without computing.
        let mut low = [-104.0f32, -104.001, -150.0, -1e30];
        exp_in_place(&mut low);
        assert_eq!(low.map(f32::to_bits), [0; 4]);
        assert_eq!(special[0], 0.0);
        assert_eq!(special[1], f32::INFINITY);
        assert!(special[2].is_nan());
        assert_eq!(
            (special[3], special[4], special[5]),
            (1.0, f32::INFINITY, 0.0)
        );
    }
}
