//! This machine's limits for `bench/`, measured in the same session as the load: memory
//! bandwidth (a parallel read-sum of 1 GiB in 4 KiB and in 2 MiB pages, in 2 MiB pages as one
//! prefetched stream and as the decode kernel reads it, and a parallel copy, on plain
//! threads), candle's `Linear` speed in f32 and f16 at decode shapes (small m: bound by
//! reading the weights) and prefill shapes (large m: bound by compute), and mmserve's own
//! small-m kernel at the decode shapes it takes (`dtype` "f32 small-m"). Prints one JSON
//! object on stdout, a table on stderr.
//!
//! ```text
//! cargo run --release --example candle_probe [-- --quick]
//! ```
//! Threads: `RAYON_NUM_THREADS` (candle's gemm pool; also used here for the bandwidth threads),
//! else every core.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use mmserve::model::{huge_pages, small_m};

/// Bytes of each bandwidth buffer.
const BANDWIDTH_BYTES: usize = 1 << 30;

/// A `Linear` shape: `x (m, k) @ W^T`, `W (n, k)`.
struct Shape {
    what: &'static str,
    m: usize,
    k: usize,
    n: usize,
}

const SHAPES: &[Shape] = &[
    Shape {
        what: "256M MLP up, decode",
        m: 1,
        k: 576,
        n: 1536,
    },
    Shape {
        what: "256M MLP up, decode",
        m: 4,
        k: 576,
        n: 1536,
    },
    Shape {
        what: "256M MLP up, decode",
        m: 16,
        k: 576,
        n: 1536,
    },
    Shape {
        what: "256M lm_head, decode",
        m: 1,
        k: 576,
        n: 49280,
    },
    Shape {
        what: "256M lm_head, decode",
        m: 16,
        k: 576,
        n: 49280,
    },
    Shape {
        what: "decoder MLP (notes)",
        m: 1,
        k: 2048,
        n: 8192,
    },
    Shape {
        what: "decoder MLP (notes)",
        m: 8,
        k: 2048,
        n: 8192,
    },
    Shape {
        what: "256M MLP up, prefill",
        m: 512,
        k: 576,
        n: 1536,
    },
    Shape {
        what: "SigLIP MLP, one 512px tile",
        m: 1024,
        k: 768,
        n: 3072,
    },
    Shape {
        what: "square",
        m: 1024,
        k: 1024,
        n: 1024,
    },
];

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Shortest of `reps` timed runs of `f`, in seconds, after one untimed run.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Sum with 64 independent lanes, so the loop vectorises and is bound by memory; compiled for
/// AVX-512 where the CPU has it (as the decode kernel in `src/model/small_m.rs` is), so that
/// the figure is the machine's read ceiling, not that of SSE2 code.
fn lane_sum(xs: &[f32]) -> f32 {
    lane_sum_best::<false, false>(xs)
}

/// [`lane_sum`] asking for the data 768 bytes ahead, every 4th cache line: one long stream a
/// core may read faster so than by the hardware's prefetchers alone (the small-m kernel read
/// one input row's weights so until 2026-11-28).
fn lane_sum_fetching(xs: &[f32]) -> f32 {
    lane_sum_best::<true, false>(xs)
}

/// The sum read as the small-m kernel reads a weight matrix for one input row
/// (`src/model/small_m.rs`): rows of SmolLM2's hidden size, 4 at a time side by side, each
/// step asking for the same place in the next 4 rows (into L2).
fn lane_sum_blocks(xs: &[f32]) -> f32 {
    lane_sum_best::<false, true>(xs)
}

fn lane_sum_best<const FETCH: bool, const BLOCKS: bool>(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected just above.
        return unsafe { lane_sum_avx512::<FETCH, BLOCKS>(xs) };
    }
    sum_plain::<FETCH, BLOCKS>(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lane_sum_avx512<const FETCH: bool, const BLOCKS: bool>(xs: &[f32]) -> f32 {
    sum_plain::<FETCH, BLOCKS>(xs)
}

#[inline(always)]
fn sum_plain<const FETCH: bool, const BLOCKS: bool>(xs: &[f32]) -> f32 {
    if BLOCKS {
        block_sum_plain(xs)
    } else {
        lane_sum_plain::<FETCH>(xs)
    }
}

/// Elements per row in [`block_sum_plain`]: SmolLM2-135M's hidden size, most of its
/// projections' `k`.
const ROW: usize = 576;

#[inline(always)]
fn block_sum_plain(xs: &[f32]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    let blocks = xs.chunks_exact(4 * ROW);
    let tail: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for at in (0..ROW).step_by(16) {
            #[cfg(target_arch = "x86_64")]
            for r in 0..4 {
                let next = block.as_ptr().wrapping_add((4 + r) * ROW + at).cast::<i8>();
                // SAFETY: only a hint: prefetches never fault, past the end or not.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(next)
                };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let lanes = &block[r * ROW + at..r * ROW + at + 16];
                for (a, x) in a.iter_mut().zip(lanes) {
                    *a += x;
                }
            }
        }
    }
    acc.iter().flatten().sum::<f32>() + tail
}

#[inline(always)]
fn lane_sum_plain<const FETCH: bool>(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let chunks = xs.chunks_exact(64);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        #[cfg(target_arch = "x86_64")]
        if FETCH {
            let ahead = c.as_ptr().cast::<i8>().wrapping_add(768);
            // SAFETY: only a hint: prefetches never fault, past the end or not.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead) };
        }
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Read GB/s of a parallel `sum` over `src`, split across `threads`.
fn read_gbs(src: &[f32], threads: usize, reps: usize, sum: fn(&[f32]) -> f32) -> f64 {
    let part = src.len().div_ceil(threads);
    let secs = best_of(reps, || {
        std::thread::scope(|s| {
            for c in src.chunks(part) {
                s.spawn(move || black_box(sum(c)));
            }
        })
    });
    size_of_val(src) as f64 / 1e9 / secs
}

/// Bandwidth figures (GB/s), the buffers in the machine's normal 4 KiB pages and, where the
/// kernel grants them, in 2 MiB huge pages, as mmserve keeps the decoder's weights
/// (`src/model/huge_pages.rs`).
struct Bandwidth {
    read_4k: f64,
    read_huge: f64,
    /// 2 MiB pages, one stream prefetched 768 bytes ahead.
    read_huge_fetching: f64,
    /// 2 MiB pages, read 4 rows at a time as the decode kernel reads weights.
    read_huge_blocks: f64,
    /// Read plus write bytes, as STREAM counts them (4 KiB pages).
    copy: f64,
}

fn bandwidth(threads: usize, reps: usize) -> Bandwidth {
    let n = BANDWIDTH_BYTES / 4;
    let src = vec![1f32; n];
    let mut huge: Vec<f32> = Vec::with_capacity(n);
    huge_pages::advise(huge.spare_capacity_mut());
    huge.resize(n, 1.0);
    let mut dst = vec![0f32; n];
    let part = n.div_ceil(threads);
    let copy = best_of(reps, || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(part).zip(src.chunks(part)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        })
    });
    black_box(&dst);
    Bandwidth {
        read_4k: read_gbs(&src, threads, reps, lane_sum),
        read_huge: read_gbs(&huge, threads, reps, lane_sum),
        read_huge_fetching: read_gbs(&huge, threads, reps, lane_sum_fetching),
        read_huge_blocks: read_gbs(&huge, threads, reps, lane_sum_blocks),
        copy: 2.0 * BANDWIDTH_BYTES as f64 / 1e9 / copy,
    }
}

/// Seconds per `Linear` forward of `shape` in `dtype`.
fn linear_secs(shape: &Shape, dtype: DType, reps: usize) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (shape.n, shape.k), &dev)?.to_dtype(dtype)?;
    let x = Tensor::randn(0f32, 1.0, (shape.m, shape.k), &dev)?.to_dtype(dtype)?;
    let lin = Linear::new(w, None);
    let mut err = None;
    let secs = best_of(reps, || {
        if let Err(e) = lin.forward(&x) {
            err = Some(e);
        }
    });
    err.map_or(Ok(secs), Err)
}

/// Seconds per product of `shape` by mmserve's small-m kernel (f32), when it takes the shape.
fn kernel_secs(shape: &Shape, reps: usize) -> candle_core::Result<Option<f64>> {
    if shape.m > small_m::SMALL_M {
        return Ok(None);
    }
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (shape.n, shape.k), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (shape.m, shape.k), &dev)?;
    let mut err = None;
    let secs = best_of(reps, || {
        if let Err(e) = small_m::matmul_t(&x, &w) {
            err = Some(e);
        }
    });
    err.map_or(Ok(Some(secs)), Err)
}

fn main() -> candle_core::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 2 } else { 7 };
    let threads = threads();
    let bw = bandwidth(threads, reps);
    // The ceiling a decoding step can reach: the fastest of the four ways to read.
    let read = [bw.read_huge, bw.read_huge_fetching, bw.read_huge_blocks]
        .into_iter()
        .fold(bw.read_4k, f64::max);
    eprintln!(
        "threads {threads}: read {:.1} GB/s (4 KiB pages) {:.1} GB/s (2 MiB pages) {:.1} GB/s \
         (2 MiB pages, prefetching) {:.1} GB/s (2 MiB pages, 4 rows at a time), copy {:.1} GB/s \
         (read + write)",
        bw.read_4k, bw.read_huge, bw.read_huge_fetching, bw.read_huge_blocks, bw.copy
    );
    let mut rows = Vec::new();
    for shape in SHAPES {
        let kernel = kernel_secs(shape, reps)?.map(|s| (s, "f32 small-m", 4.0));
        let candle = [(DType::F32, "f32", 4.0), (DType::F16, "f16", 2.0)]
            .into_iter()
            .map(|(dtype, name, bytes)| Ok((linear_secs(shape, dtype, reps)?, name, bytes)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (secs, name, bytes) in candle.into_iter().chain(kernel) {
            let (m, k, n) = (shape.m as f64, shape.k as f64, shape.n as f64);
            let gflops = 2.0 * m * k * n / secs / 1e9;
            let weight_gbs = n * k * bytes / secs / 1e9;
            eprintln!(
                "{:<28} m={:<5} k={:<5} n={:<6} {name}: {:>8.3} ms {gflops:>7.1} GFLOP/s {weight_gbs:>6.1} GB/s of weights",
                shape.what, shape.m, shape.k, shape.n, secs * 1e3
            );
            rows.push(serde_json::json!({
                "what": shape.what, "m": shape.m, "k": shape.k, "n": shape.n, "dtype": name,
                "ms": secs * 1e3, "gflops": gflops, "weight_gbs": weight_gbs,
            }));
        }
    }
    let out = serde_json::json!({
        "threads": threads,
        "read_gbs": read,
        "read_4k_gbs": bw.read_4k,
        "read_huge_gbs": bw.read_huge,
        "read_huge_fetching_gbs": bw.read_huge_fetching,
        "read_huge_blocks_gbs": bw.read_huge_blocks,
        "copy_gbs": bw.copy,
        "matmul": rows,
    });
    println!("{out}");
    Ok(())
}
