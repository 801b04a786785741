//! Q8_0 projections (`--quantize q8_0`) on CPUs with AVX-512 VNNI: the weights rounded as GGML's
//! Q8_0 does (blocks of 32 along the input, one f16 scale each, 8-bit values), laid out for
//! `vpdpbusd`, and their product with f32 input rows.
//!
//! Candle's Q8_0 kernels (AVX2) reach 1.46x the f32 decode speed here, against ~3.7x that the
//! bytes allow: they make one dot product per (input row, weight row) pair, reading every
//! weight row once per input row, and keep a repacked copy beside the original. Here the
//! weights are stored once, in panels of 16 rows: for each block of 32 inputs, 8 lines of 64
//! bytes, line g holding inputs 4g..4g+4 of all 16 rows. One `vpdpbusd` multiplies a line by 4
//! input values broadcast, adding 4 products into each row's 32-bit lane, so a block is 8
//! instructions for 16 rows and every weight byte is read from memory once per step, whatever
//! the number of input rows. `vpdpbusd` takes unsigned bytes times signed ones: the weights are
//! stored plus 128 and each block's sum starts at -128 x the sum of its 8-bit inputs.
//!
//! The inputs are rounded to 8 bits per block of 32 like candle's (and llama.cpp's) Q8_0
//! product does. Integer sums are exact; each block's sum is scaled and added in f32, lane by
//! lane in block order, so the result does not depend on the number of input rows, the threads
//! or the CPU (the test's scalar reference gives the same bits).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;

use super::huge_pages::HugeArena;

/// Inputs per block (one scale each).
pub const BLOCK: usize = 32;
/// Weight rows per panel: one 32-bit lane of a 512-bit register each.
const PANEL: usize = 16;
/// 4-byte groups per block: one line each.
const GROUPS: usize = BLOCK / 4;

/// One 64-byte line: 4 consecutive weights of each of a panel's 16 rows, plus 128.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

// SAFETY: 64 bytes, aligned to 64, no padding; every bit pattern is a valid `[u8; 64]`.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Line {}

/// A weight matrix W (n, k) in Q8_0, in panels (see the module header).
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// (panels, k / BLOCK, GROUPS) lines, as (64 x lines,) bytes in huge pages (`huge_pages`).
    lines: Tensor,
    /// (panels, k / BLOCK, PANEL): each block's scale per row; 0 for padding rows.
    scales: Vec<f16>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({}, {})", self.n, self.k)
    }
}

impl Q8Matrix {
    /// Whether this CPU runs the product (AVX-512 with VNNI).
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Rounds `w` (n, k), k a multiple of [`BLOCK`], to Q8_0, its lines kept in `arena`.
    pub fn quantize(w: &Tensor, arena: &mut HugeArena) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !k.is_multiple_of(BLOCK) {
            candle_core::bail!("q8_0: input dimension {k} is not a multiple of {BLOCK}");
        }
        let values = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = k / BLOCK;
        let panels = n.div_ceil(PANEL);
        // 128 is a stored 0: padding rows add nothing (and their scale is 0 too).
        let mut lines = vec![Line([128; 64]); panels * blocks * GROUPS];
        let mut scales = vec![f16::ZERO; panels * blocks * PANEL];
        for (r, row) in values.chunks_exact(k).enumerate() {
            let (panel, lane) = (r / PANEL, r % PANEL);
            for (b, xs) in row.chunks_exact(BLOCK).enumerate() {
                let (d, q) = round_block(xs);
                let at = panel * blocks + b;
                scales[at * PANEL + lane] = d;
                for (j, v) in q.into_iter().enumerate() {
                    lines[at * GROUPS + j / 4].0[lane * 4 + j % 4] = (v as u8) ^ 0x80;
                }
            }
        }
        let bytes: &[u8] = bytemuck::cast_slice(&lines);
        let bytes = Tensor::from_slice(bytes, bytes.len(), w.device())?;
        Ok(Self {
            n,
            k,
            lines: arena.put(&bytes)?,
            scales,
        })
    }

    /// Bytes held (padding rows included).
    pub fn bytes(&self) -> usize {
        self.lines.elem_count() + self.scales.len() * 2
    }

    /// `x` (m, k) f32 on the CPU -> `x @ W^T` (m, n) f32. Needs [`Self::supported`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Product(self))
    }

    /// Calls `f` with every line: the bytes' storage stays locked for reading meanwhile.
    fn with_lines<R>(&self, f: impl FnOnce(&[Line]) -> Result<R>) -> Result<R> {
        let (storage, layout) = self.lines.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("q8_0 weights off the CPU")
        };
        // The arena starts every tensor on a 64-byte line.
        let lines = bytemuck::try_cast_slice(super::par::operand::<u8>(cpu, layout)?)
            .map_err(|e| candle_core::Error::Msg(format!("q8_0 weights: {e}")))?;
        f(lines)
    }

    /// The lines (of `all`, this matrix's) and scales of panel `p`.
    fn panel<'a>(&'a self, all: &'a [Line], p: usize) -> (&'a [Line], &'a [f16]) {
        let blocks = self.k / BLOCK;
        let lines = &all[p * blocks * GROUPS..(p + 1) * blocks * GROUPS];
        let scales = &self.scales[p * blocks * PANEL..(p + 1) * blocks * PANEL];
        (lines, scales)
    }
}

/// GGML's Q8_0 rounding of one block: scale d = max |x| / 127 (kept in f16), q = round(x / d)
/// with 1 / d taken from the f32 d, as candle's `BlockQ8_0::from_float`.
fn round_block(xs: &[f32]) -> (f16, [i8; BLOCK]) {
    let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, x) in q.iter_mut().zip(xs) {
        *q = round_to_i8(x * inv);
    }
    (f16::from_f32(d), q)
}

/// `v.round() as i8` (half away from zero, saturating, NaN to 0) without `roundf`: on a
/// plain x86-64 target `f32::round` is a call into libm, once per input value of every
/// product, on the engine thread's serial share of a step. The truncation is exact and so is
/// `v - trunc(v)` (|v| <= 256 after the clamp, which NaN passes through), so the comparison
/// decides as `round`.
#[inline(always)]
fn round_to_i8(v: f32) -> i8 {
    let v = v.clamp(-256.0, 256.0);
    let t = v as i32;
    let frac = v - t as f32;
    let r = t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5);
    r.clamp(i8::MIN.into(), i8::MAX.into()) as i8
}

/// Input rows rounded to Q8_0 blocks, as the kernel reads them.
struct Rows {
    /// (m, k) 8-bit values.
    q: Vec<i8>,
    /// (m, k / BLOCK) scales (f16 values, widened).
    d: Vec<f32>,
    /// (m, k / BLOCK): -128 x the block's sum of `q`, where its 32-bit sums start.
    start: Vec<i32>,
}

impl Rows {
    fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut rows = Self {
            q: Vec::with_capacity(x.len()),
            d: Vec::with_capacity(blocks),
            start: Vec::with_capacity(blocks),
        };
        for xs in x.chunks_exact(BLOCK) {
            let (d, q) = round_block(xs);
            rows.q.extend_from_slice(&q);
            rows.d.push(d.to_f32());
            rows.start
                .push(-128 * q.iter().map(|&v| v as i32).sum::<i32>());
        }
        rows
    }
}

struct Product<'a>(&'a Q8Matrix);

impl CustomOp1 for Product<'_> {
    fn name(&self) -> &'static str {
        "q8_0-matmul-t"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.0;
        let (m, k) = xl.shape().dims2()?;
        if k != w.k || !Q8Matrix::supported() {
            candle_core::bail!("q8_0 product: input (.., {k}) for weights {w:?} on this CPU");
        }
        let rows = Rows::new(super::par::operand::<f32>(xs, xl)?);
        let mut out = vec![0f32; m * w.n];
        let shared = super::par::Disjoint::new(&mut out);
        w.with_lines(|all| {
            super::par::for_each_index(w.n.div_ceil(PANEL), |p| {
                let (lines, scales) = w.panel(all, p);
                let valid = PANEL.min(w.n - p * PANEL);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU's features were checked above; columns p*PANEL..+valid of every
                // output row are this call's alone, and `out` outlives `for_each_index`.
                unsafe {
                    vnni::panel(
                        lines,
                        scales,
                        &rows,
                        m,
                        k,
                        shared.ptr().add(p * PANEL),
                        w.n,
                        valid,
                    )
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (lines, scales, valid, &rows);
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((m, w.n))))
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(test)]
mod tests;
