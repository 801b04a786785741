//! The fused prefill attention against the general path's candle ops, and its results across
//! chunkings.

use candle_core::{Device, IndexOp};

use super::*;
use crate::model::attention::{causal_mask, softmax_f32};

/// A pool of `slots` random rows (slots, kv_heads, hd) for keys and for values.
fn pools(slots: usize, kv_heads: usize, hd: usize) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    Ok((
        Tensor::randn(0f32, 1.0, (slots, kv_heads, hd), &dev)?,
        Tensor::randn(0f32, 1.0, (slots, kv_heads, hd), &dev)?,
    ))
}

/// The general path's arithmetic, head by head: the keys and values gathered from the pool,
/// `(q k^T) * scale`, the causal mask, softmax and the values, as (t, heads x hd).
fn reference(
    q: &Tensor,
    (k_pool, v_pool): (&Tensor, &Tensor),
    slots: &[u32],
    at: Causal,
    scale: f32,
) -> Result<Tensor> {
    let (t, heads, hd) = q.dims3()?;
    let kv_heads = k_pool.dim(1)?;
    let ids = Tensor::new(slots, &Device::Cpu)?;
    let (keys, values) = (k_pool.index_select(&ids, 0)?, v_pool.index_select(&ids, 0)?);
    let mask = causal_mask(t, at.start, at.first, at.window, &Device::Cpu)?;
    let mut outs = Vec::with_capacity(heads);
    for h in 0..heads {
        let g = h / (heads / kv_heads);
        let qh = q.i((.., h, ..))?.contiguous()?;
        let kh = keys.i((.., g, ..))?.contiguous()?;
        let vh = values.i((.., g, ..))?.contiguous()?;
        let scores = (qh.matmul(&kh.t()?)? * f64::from(scale))?;
        outs.push(softmax_f32(&scores, mask.as_ref())?.matmul(&vh)?);
    }
    Tensor::stack(&outs, 1)?.reshape((t, heads * hd))
}

/// Slots `0..n` of the pool in a scrambled order (the block table's order is the positions',
/// not the pool's).
fn scrambled(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % n as u32).collect()
}

/// Against the general path's candle ops: both sum the same f32 products in other orders
/// (hd terms per score, up to ~100 per output) and `exp` differs by up to 4e-7 relative
/// (src/model/fast_exp.rs); with unit-normal inputs the outputs, averages of unit values,
/// agree to a few 1e-6. 1e-5 leaves room for that and still catches a wrong key, row, head or
/// mask (differences of order 0.1).
#[test]
fn matches_the_general_path() -> Result<()> {
    if !avx512() {
        eprintln!("skipped: no AVX-512 on this CPU (the decoder keeps the general path)");
        return Ok(());
    }
    // (heads, kv_heads, hd, queries, start, window): grouped heads, a head width off 16 and
    // over 64, one query and several item blocks, a cached prefix, sliding windows.
    for (heads, kv_heads, hd, t, start, window) in [
        (4usize, 2usize, 64usize, 30usize, 0usize, None::<usize>),
        (3, 3, 72, 7, 40, None),
        (2, 1, 20, 1, 9, None),
        (4, 1, 64, 50, 70, Some(33)),
        (2, 2, 64, 65, 0, Some(7)),
    ] {
        let first = window.map_or(0, |w: usize| (start + 1).saturating_sub(w));
        let n = start + t - first;
        let (k_pool, v_pool) = pools(n + 5, kv_heads, hd)?;
        let slots = scrambled(n);
        let q = Tensor::randn(0f32, 1.0, (t, heads, hd), &Device::Cpu)?;
        let at = Causal {
            start,
            first,
            window,
        };
        let scale = (hd as f32).powf(-0.5);
        let got = attend(&q, (&k_pool, &v_pool), &slots, at, scale)?.expect("applies");
        let want = reference(&q, (&k_pool, &v_pool), &slots, at, scale)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff < 1e-5,
            "{heads}/{kv_heads} heads of {hd}, {t} at {start}: {diff}"
        );
    }
    Ok(())
}

/// A prompt prefilled whole, or in chunks of 5 or 24 queries (each chunk over the keys of its
/// own and the earlier positions), gives every query the same bits.
#[test]
fn chunks_do_not_change_the_bits() -> Result<()> {
    if !avx512() {
        eprintln!("skipped: no AVX-512 on this CPU");
        return Ok(());
    }
    let (heads, kv_heads, hd, t) = (3, 1, 64, 61);
    let (k_pool, v_pool) = pools(t, kv_heads, hd)?;
    let slots = scrambled(t);
    let q = Tensor::randn(0f32, 1.0, (t, heads, hd), &Device::Cpu)?;
    for window in [None, Some(20)] {
        let mut rows = Vec::new();
        for chunk in [t, 5, 24] {
            let mut parts = Vec::new();
            for start in (0..t).step_by(chunk) {
                let len = chunk.min(t - start);
                let first = window.map_or(0, |w: usize| (start + 1).saturating_sub(w));
                let at = Causal {
                    start,
                    first,
                    window,
                };
                let part = attend(
                    &q.narrow(0, start, len)?,
                    (&k_pool, &v_pool),
                    &slots[first..start + len],
                    at,
                    0.125,
                )?
                .expect("applies");
                parts.push(part);
            }
            rows.push(Tensor::cat(&parts, 0)?.to_vec2::<f32>()?);
        }
        let bits =
            |r: &Vec<Vec<f32>>| -> Vec<u32> { r.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(
            bits(&rows[0]),
            bits(&rows[1]),
            "window {window:?}: chunks of 5"
        );
        assert_eq!(
            bits(&rows[0]),
            bits(&rows[2]),
            "window {window:?}: chunks of 24"
        );
    }
    Ok(())
}

#[test]
fn declines_other_dtypes_and_checks_its_geometry() -> Result<()> {
    let dev = Device::Cpu;
    let half = Tensor::zeros((2, 2, 8), DType::F16, &dev)?;
    let at = Causal {
        start: 0,
        first: 0,
        window: None,
    };
    assert!(attend(&half, (&half, &half), &[0, 1], at, 1.0)?.is_none());
    if avx512() {
        let (k_pool, v_pool) = pools(4, 1, 8)?;
        let q = Tensor::zeros((2, 2, 8), DType::F32, &dev)?;
        // Two queries at 0 need two keys, not three.
        assert!(attend(&q, (&k_pool, &v_pool), &[0, 1, 2], at, 1.0).is_err());
        // A slot outside the pool.
        assert!(attend(&q, (&k_pool, &v_pool), &[0, 9], at, 1.0).is_err());
    }
    Ok(())
}
