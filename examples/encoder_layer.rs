//! Times the pieces of one SigLIP encoder layer on a 1024-patch tile (SmolVLM's 512 px) as
//! candle runs them: the projections and the attention's products and softmax, with GFLOP/s.
//! It showed the attention's first product (inner dimension 64) at half the projections' rate,
//! the reason for `src/model/encoder_attention.rs`.
//!
//!   RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 cargo run --release --example encoder_layer

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor};
use mmserve::model::many_rows::{matmul_t, Weight};

/// Runs `f` once to warm up, then 5 times; prints the mean time and the rate for `flop`.
fn time(name: &str, flop: f64, mut f: impl FnMut() -> Result<Tensor>) -> Result<()> {
    f()?;
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        f()?;
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0 / runs as f64;
    println!("{name:34} {ms:8.2} ms {:7.1} GFLOP/s", flop / ms / 1e6);
    Ok(())
}

fn linear(input: usize, output: usize, dev: &Device) -> Result<candle_nn::Linear> {
    let w = Tensor::randn(0f32, 0.02, (output, input), dev)?;
    Ok(candle_nn::Linear::new(
        w,
        Some(Tensor::zeros(output, DType::F32, dev)?),
    ))
}

fn main() -> Result<()> {
    // As the server does (large temporaries from the heap, not fresh pages).
    mmserve::engine::memory::keep_large_allocations();
    let dev = Device::Cpu;
    // SigLIP-B/16 at 512 px: 1024 patches, width 768, MLP 3072, 12 heads of 64.
    let (s, d, f, heads, hd) = (1024usize, 768usize, 3072usize, 12usize, 64usize);
    let x = Tensor::randn(0f32, 1.0, (1, s, d), &dev)?;
    let h = Tensor::randn(0f32, 1.0, (1, s, f), &dev)?;
    let (proj, fc1, fc2) = (
        linear(d, d, &dev)?,
        linear(d, f, &dev)?,
        linear(f, d, &dev)?,
    );
    let linear_flop = |i: usize, o: usize| 2.0 * (s * i * o) as f64;
    let many = |l: &candle_nn::Linear, x: &Tensor| -> Result<Tensor> {
        let x = x.squeeze(0)?;
        matmul_t(&x, Weight::Rows(l.weight()), l.bias(), s)?
            .ok_or_else(|| candle_core::Error::Msg("many-rows path does not apply".into()))
    };
    for (name, l, input, i, o) in [
        ("projection d -> d (x4 per layer)", &proj, &x, d, d),
        ("fc1 d -> 4d", &fc1, &x, d, f),
        ("fc2 4d -> d", &fc2, &h, f, d),
    ] {
        time(name, linear_flop(i, o), || l.forward(input))?;
        time("  the same, many-rows path", linear_flop(i, o), || {
            many(l, input)
        })?;
        let wt = l.weight().t()?.contiguous()?;
        time(
            "  the same, weight stored transposed",
            linear_flop(i, o),
            || {
                let x = input.squeeze(0)?;
                matmul_t(&x, Weight::Columns(&wt), l.bias(), s)?
                    .ok_or_else(|| candle_core::Error::Msg("many-rows path does not apply".into()))
            },
        )?;
        if mmserve::model::bf16x3::available() {
            let w: Vec<f32> = l.weight().flatten_all()?.to_vec1()?;
            let packed = mmserve::model::bf16x3::Packed::new(&w, o, i)?;
            time("  the same, bf16x3 on AMX tiles", linear_flop(i, o), || {
                mmserve::model::bf16x3::matmul_t(&input.squeeze(0)?, &packed, l.bias())
            })?;
        }
    }
    // (1, heads, S, hd) each; heads taken 4 at a time as src/model/vision.rs does.
    let qkv = || Tensor::randn(0f32, 1.0, (1, heads, s, hd), &dev);
    let (q, k, v) = (qkv()?, qkv()?, qkv()?);
    let per = 4;
    let product_flop = 2.0 * (heads * s * s * hd) as f64;
    let part = |t: &Tensor, first: usize| t.narrow(1, first, per)?.contiguous();
    time("attention: q k^T", product_flop, || {
        let mut last = None;
        for first in (0..heads).step_by(per) {
            last = Some(part(&q, first)?.matmul(&part(&k, first)?.t()?)?);
        }
        last.ok_or_else(|| candle_core::Error::Msg("no heads".into()))
    })?;
    let p = candle_nn::ops::softmax_last_dim(
        &q.narrow(1, 0, per)?.matmul(&k.narrow(1, 0, per)?.t()?)?,
    )?;
    time(
        "attention: p v (4 heads)",
        product_flop * per as f64 / heads as f64,
        || p.matmul(&part(&v, 0)?),
    )?;
    // Scores, softmax and values in one pass (src/model/encoder_attention.rs), all heads,
    // from the projections' (1, S, heads x hd) layout.
    let tokens = |t: &Tensor| t.transpose(1, 2)?.reshape((1, s, heads * hd));
    // The stacked projection's (1, S, 3 x heads x hd).
    let qkv = Tensor::cat(&[tokens(&q)?, tokens(&k)?, tokens(&v)?], 2)?;
    let scale = (hd as f32).powf(-0.5);
    time(
        "attention, fused (both products)",
        2.0 * product_flop,
        || {
            mmserve::model::encoder_attention::attention(&qkv, heads, scale)?
                .ok_or_else(|| candle_core::Error::Msg("fused attention does not apply".into()))
        },
    )?;
    Ok(())
}
