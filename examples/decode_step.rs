//! Times one decoding step's linear layers through mmserve's small-m kernel: the projections of
//! SmolLM2-135M (SmolVLM-256M's decoder, 30 layers) and its lm_head, each layer with weights of
//! its own (about 500 MB, so they stream from memory as in a real step), for 1, 4 and 16 rows.
//!
//!   RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 cargo run --release --example decode_step
//!
//! `HUGE=1` times the weights in 2 MiB pages (mmserve's layout), `CACHED=1` in cache; `MS=1,4,1`
//! the row counts to time, in that order.

use std::time::Instant;

use candle_core::{Device, Tensor};
use mmserve::model::huge_pages::HugeArena;
use mmserve::model::small_m;

/// (n, k) of one decoder layer's projections: q, k, v, o, gate, up, down.
const LAYER: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut weights: Vec<Tensor> = Vec::new();
    // With CACHED=1 every layer shares one layer's weights (and the lm_head is left out): the
    // kernel's rate with the weights in cache.
    let cached = std::env::var("CACHED").is_ok_and(|v| v == "1");
    for l in 0..30 {
        for (n, k) in LAYER {
            weights.push(if cached && l > 0 {
                weights[weights.len() - LAYER.len()].clone()
            } else {
                Tensor::randn(0f32, 0.02, (n, k), &dev)?
            });
        }
    }
    if !cached {
        weights.push(Tensor::randn(0f32, 0.02, (49280, 576), &dev)?);
    }
    // With HUGE=1 the weights are copied into 2 MiB pages, as mmserve keeps them.
    if std::env::var("HUGE").is_ok_and(|v| v == "1") {
        let mut arena = HugeArena::default();
        weights = weights
            .iter()
            .map(|w| arena.put(w))
            .collect::<Result<_, _>>()?;
    }
    let bytes: usize = weights.iter().map(|w| w.elem_count() * 4).sum();
    // `MS=1,4,1,4` times those row counts, in that order (alternating for a side-by-side).
    let ms: Vec<usize> = match std::env::var("MS") {
        Ok(v) => v.split(',').filter_map(|m| m.trim().parse().ok()).collect(),
        Err(_) => vec![1, 2, 4, 8, 16],
    };
    for m in ms {
        let xs576 = Tensor::randn(0f32, 1.0, (m, 576), &dev)?;
        let xs1536 = Tensor::randn(0f32, 1.0, (m, 1536), &dev)?;
        let flops: usize = weights.iter().map(|w| 2 * m * w.elem_count()).sum();
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let t = Instant::now();
            for w in &weights {
                let x = if w.dim(1)? == 576 { &xs576 } else { &xs1536 };
                small_m::matmul_t(x, w)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "m={m:2}: {:6.2} ms/step  {:5.1} GB/s of weights  {:5.1} GFLOP/s",
            best * 1e3,
            bytes as f64 / best / 1e9,
            flops as f64 / best / 1e9
        );
    }
    if cached {
        // Each shape on its own at m = 16, weights in cache.
        let m = 16;
        for (n, k) in LAYER {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let mut best = f64::INFINITY;
            for _ in 0..200 {
                let t = Instant::now();
                small_m::matmul_t(&x, &w)?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            let flops = 2 * m * n * k;
            println!(
                "  {m}x{k} @ {n}x{k}: {:7.1} us  {:5.1} GFLOP/s",
                best * 1e6,
                flops as f64 / best / 1e9
            );
        }
    }
    Ok(())
}
