//! The encoders' f32 product `x @ W^T + b` on AMX tiles, each f32 operand taken as the sum of
//! two bf16 numbers (hi + lo) and the product as lo·hi + hi·lo + hi·hi, summed in f32: what
//! PyTorch's `set_float32_matmul_precision("high")` and JAX's `bfloat16_3x` call bf16x3. Run
//! for the vision towers when a model asks for it (`vision_matmul_precision = "high"`).
//!
//! Precision: hi is x rounded to bf16 (|x - hi| <= 2^-9 |x|), lo the remainder rounded again,
//! so hi + lo is x within 2^-18 of |x|, and the dropped lo·lo term is under 2^-18 of |x·w|.
//! Each product term is thus within about 3 * 2^-18 (1.1e-5) of |x·w|, against 2^-24 (6e-8)
//! for an f32 `gemm`; the unit test below bounds it and measured at most 2.4e-6 of the
//! magnitudes' sum.
//!
//! Layout and speed: the weight is packed once as 1 KiB B tiles (pairs of k for 16 columns),
//! the input per call as 1 KiB A tiles; a 32 x 32 output block takes 10 tile loads and 12
//! `tdpbf16ps` per 32 k. The tile loads bound it (~600 raw GFLOP/s a thread with the operands
//! in L1, against ~1 TFLOP/s for the products alone), which still puts SigLIP's products at 1.5
//! to 2x `gemm`'s f32 rate here (`examples/encoder_layer.rs`).
//!
//! A row's output depends only on that row (each block of 32 rows is summed alike), so an
//! input's bits are the same alone or in a batch. Where AMX is missing the caller keeps f32.

#[cfg(target_arch = "x86_64")]
mod tiles;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::par::operand;

/// Whether this machine runs the product (x86-64 with AMX-BF16, allowed by the kernel).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return tiles::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// `x` as hi + lo, both bf16 (rounded to nearest, ties to even), as their bits.
fn split(x: f32) -> (u16, u16) {
    let hi = half::bf16::from_f32(x);
    (
        hi.to_bits(),
        half::bf16::from_f32(x - hi.to_f32()).to_bits(),
    )
}

/// `xs` (up to 32 values) split into the first places of `hi` and `lo` (32 each), the rest
/// zero; 16 lanes at a time when `simd` (AVX-512 is present: the caller asked once).
fn split_into(xs: &[f32], hi: &mut [u16], lo: &mut [u16], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if xs.len() == 32 && simd {
        // SAFETY: AVX-512F is present; the three slices hold 32 values.
        unsafe { simd_split32(xs, hi, lo) };
        return;
    }
    hi.fill(0);
    lo.fill(0);
    for ((v, h), l) in xs.iter().zip(hi).zip(lo) {
        (*h, *l) = split(*v);
    }
}

/// [`split`] of 32 values, lane for lane the same bits (for every value but NaN, which
/// stays a NaN).
///
/// SAFETY: AVX-512F is present; each slice holds 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn simd_split32(xs: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    use std::arch::x86_64::*;
    // The bits of each lane rounded to bf16 (ties to even), still in the top half.
    let round = |b: __m512i| {
        let odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        let up = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
        _mm512_and_si512(_mm512_add_epi32(b, up), _mm512_set1_epi32(-65536))
    };
    for half in 0..2 {
        let x = _mm512_loadu_ps(xs.as_ptr().add(16 * half));
        let h = round(_mm512_castps_si512(x));
        let rest = _mm512_sub_ps(x, _mm512_castsi512_ps(h));
        let l = round(_mm512_castps_si512(rest));
        let store = |dst: *mut u16, v: __m512i| {
            _mm256_storeu_si256(dst.cast(), _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)))
        };
        store(hi.as_mut_ptr().add(16 * half), h);
        store(lo.as_mut_ptr().add(16 * half), l);
    }
}

/// A weight (n, k) packed for the tiles: k padded to a multiple of 32, n to a multiple of 32,
/// hi and lo each as panels of 16 columns, a panel one 1 KiB tile per block of 32 k: within a
/// tile, row p holds k = 2p and 2p + 1 of each of the 16 columns side by side (AMX's pairs).
#[derive(Debug)]
pub struct Packed {
    n: usize,
    k: usize,
    hi: Vec<u16>,
    lo: Vec<u16>,
}

/// bf16 values in one tile.
const TILE: usize = 512;

impl Packed {
    /// Packs `w` (n, k), row-major f32, as checkpoints store it.
    pub fn new(w: &[f32], n: usize, k: usize) -> Result<Self> {
        Self::pack(w, n, k, |col, kk| col * k + kk)
    }

    /// Packs `w` stored transposed, (k, n) row-major.
    pub fn from_columns(w: &[f32], k: usize, n: usize) -> Result<Self> {
        Self::pack(w, n, k, |col, kk| kk * n + col)
    }

    /// Packs the (n, k) weight whose element (col, kk) is `w[at(col, kk)]`.
    fn pack(w: &[f32], n: usize, k: usize, at: impl Fn(usize, usize) -> usize) -> Result<Self> {
        if w.len() != n * k {
            candle_core::bail!("bf16x3: weight of {} values is not ({n}, {k})", w.len());
        }
        let (panels, blocks) = (n.div_ceil(32) * 2, k.div_ceil(32));
        let mut hi = vec![0u16; panels * blocks * TILE];
        let mut lo = vec![0u16; panels * blocks * TILE];
        for col in 0..n {
            let (panel, c) = (col / 16, col % 16);
            for kk in 0..k {
                let (kb, p, e) = (kk / 32, kk % 32 / 2, kk % 2);
                let to = (panel * blocks + kb) * TILE + p * 32 + c * 2 + e;
                (hi[to], lo[to]) = split(w[at(col, kk)]);
            }
        }
        Ok(Self { n, k, hi, lo })
    }

    fn k_blocks(&self) -> usize {
        self.k.div_ceil(32)
    }
}

/// `x` (m, k) as hi and lo in tiles: for each 16 rows (m rounded up to 32), a run of one
/// 1 KiB tile per block of 32 k (16 rows of 32 values), the padding zero.
fn split_rows(x: &[f32], m: usize, k: usize) -> (Vec<u16>, Vec<u16>) {
    let (tiles, blocks) = (m.div_ceil(32) * 2, k.div_ceil(32));
    let len = tiles * blocks * TILE;
    let (mut hi, mut lo) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let (h, l) = (hi.as_mut_ptr() as usize, lo.as_mut_ptr() as usize);
    let simd = super::encoder_attention::avx512();
    super::par::for_each_index(tiles, |tile| {
        // SAFETY: this tile's run is this item's alone; both buffers hold `len` places and
        // outlive the call.
        let run = |b: usize| unsafe {
            std::slice::from_raw_parts_mut((b as *mut u16).add(tile * blocks * TILE), blocks * TILE)
        };
        let (hs, ls) = (run(h), run(l));
        for i in 0..16 {
            let r = tile * 16 + i;
            let xs = x.get(r * k..(r + 1) * k).unwrap_or(&[]);
            for kb in 0..blocks {
                let at = kb * TILE + i * 32;
                let part = xs.get(kb * 32..xs.len().min(kb * 32 + 32)).unwrap_or(&[]);
                split_into(part, &mut hs[at..at + 32], &mut ls[at..at + 32], simd);
            }
        }
    });
    // SAFETY: the items wrote every place of every tile run (the padding as zeros).
    unsafe {
        hi.set_len(len);
        lo.set_len(len);
    }
    (hi, lo)
}

/// Columns (a multiple of 32) and blocks of 32 rows per work item: the item's weight columns
/// (128 x k x 4 bytes, 384 KiB for k = 768) and rows (256 x k x 4) stay in L2 while it runs.
const ITEM_COLUMNS: usize = 128;
const ITEM_ROW_BLOCKS: usize = 8;

/// `x` (m, k) @ W^T + `bias` -> (m, n) row-major.
///
/// SAFETY: [`available`] returned true.
#[cfg(target_arch = "x86_64")]
unsafe fn product(x: &[f32], m: usize, w: &Packed, bias: Option<&[f32]>) -> Vec<f32> {
    let (n, k, kb) = (w.n, w.k, w.k_blocks());
    let (a_hi, a_lo) = split_rows(x, m, k);
    // The bias padded to whole blocks of 32 columns, which start the sums.
    let bias: Option<Vec<f32>> = bias.map(|b| {
        let mut v = b.to_vec();
        v.resize(n.div_ceil(32) * 32, 0.0);
        v
    });
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let dst = super::par::Disjoint::uninit(&mut out.spare_capacity_mut()[..m * n]);
    let (chunks, row_blocks) = (n.div_ceil(ITEM_COLUMNS), m.div_ceil(32));
    let groups = row_blocks.div_ceil(ITEM_ROW_BLOCKS);
    let run = kb * TILE;
    super::par::for_each_index(groups * chunks, |item| {
        let (group, chunk) = (item / chunks, item % chunks);
        tiles::configure_thread();
        let mut sums = Block([0.0; 1024]);
        let first = group * ITEM_ROW_BLOCKS;
        for rb in first..(first + ITEM_ROW_BLOCKS).min(row_blocks) {
            for c0 in (chunk * ITEM_COLUMNS..((chunk + 1) * ITEM_COLUMNS).min(n)).step_by(32) {
                let operands = tiles::Operands {
                    a_hi: a_hi.as_ptr().add(rb * 2 * run),
                    a_lo: a_lo.as_ptr().add(rb * 2 * run),
                    a_next: run * 2,
                    b_hi: w.hi.as_ptr().add(c0 / 16 * run),
                    b_lo: w.lo.as_ptr().add(c0 / 16 * run),
                    b_next: run * 2,
                };
                tiles::start_sums(bias.as_ref().map(|b| b.as_ptr().add(c0)));
                tiles::add_products(&operands, kb);
                let (rows, cols) = ((m - rb * 32).min(32), (n - c0).min(32));
                let at = dst.ptr().add(rb * 32 * n + c0);
                if rows == 32 && cols == 32 {
                    tiles::store_sums(at, n * 4);
                    continue;
                }
                tiles::store_sums(sums.0.as_mut_ptr(), 32 * 4);
                for i in 0..rows {
                    std::ptr::copy_nonoverlapping(sums.0[i * 32..].as_ptr(), at.add(i * n), cols);
                }
            }
        }
    });
    // SAFETY: the items cover every block of 32 rows and every column chunk, and each wrote
    // all of its valid places above.
    out.set_len(m * n);
    out
}

#[repr(C, align(64))]
struct Block([f32; 1024]);

/// `x` (m, k) @ W^T + `bias` (n,) with `w` packed: the caller checked [`available`].
pub fn matmul_t(x: &Tensor, w: &Packed, bias: Option<&Tensor>) -> Result<Tensor> {
    let op = Op(w);
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op2_no_bwd(&b.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

struct Op<'a>(&'a Packed);

impl Op<'_> {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let x: &[f32] = operand(xs, xl)?;
        let w = self.0;
        if k != w.k || bias.is_some_and(|b| b.len() != w.n) || !available() {
            candle_core::bail!("bf16x3: ({m}, {k}) x ({}, {}) does not apply", w.n, w.k);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` returned true.
        let out = unsafe { product(x, m, w, bias) };
        #[cfg(not(target_arch = "x86_64"))]
        let out = Vec::new();
        Ok((CpuStorage::F32(out), Shape::from((m, w.n))))
    }
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "bf16x3-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

impl CustomOp2 for Op<'_> {
    fn name(&self) -> &'static str {
        "bf16x3-matmul-t-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, Some(operand(bs, bl)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Deterministic values in [-1, 1) (a small LCG: no test depends on a seed's luck).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn tensor(v: &[f32], dims: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, dims, &Device::Cpu).unwrap()
    }

    /// Against the product in f64, for shapes on and off the tiles' multiples of 32, with and
    /// without bias. The bound: hi is x rounded to bf16 (|x - hi| <= 2^-9 |x|) and lo the
    /// remainder rounded again (|x - hi - lo| <= 2^-18 |x|); the products of bf16 pairs are
    /// exact in f32, so each term misses lo·lo' and the two remainders, at most 3 * 2^-18 of
    /// |x w| (and a hair: 3.1 below); the f32 sums of 3 k terms and the bias add at most
    /// (3k + 1) * 2^-24 of the sum of magnitudes.
    #[test]
    fn matches_the_f64_product_within_the_split_error() {
        if !available() {
            eprintln!("no AMX-BF16 here: the bf16x3 product is not run");
            return;
        }
        for (m, k, n, with_bias) in [(70, 100, 50, true), (32, 64, 32, false), (1, 768, 40, true)] {
            let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            let packed = Packed::new(&w, n, k).unwrap();
            let bias = with_bias.then(|| Tensor::from_slice(&b, n, &Device::Cpu).unwrap());
            let got: Vec<f32> = matmul_t(&tensor(&x, (m, k)), &packed, bias.as_ref())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let rel = 3.1 * 2f64.powi(-18) + (3 * k + 1) as f64 * 2f64.powi(-24);
            let mut worst = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let (xs, ws) = (&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                    let start = if with_bias { b[j] as f64 } else { 0.0 };
                    let exact: f64 = start
                        + xs.iter()
                            .zip(ws)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>();
                    let scale: f64 = start.abs()
                        + xs.iter()
                            .zip(ws)
                            .map(|(a, c)| (a * c).abs() as f64)
                            .sum::<f64>();
                    let err = (got[i * n + j] as f64 - exact).abs();
                    assert!(
                        err <= rel * scale,
                        "({m},{k},{n}) [{i},{j}]: {err} > {}",
                        rel * scale
                    );
                    worst = worst.max(err / scale);
                }
            }
            eprintln!("({m}, {k}, {n}): worst error {worst:.2e} of the magnitudes' sum");
        }
    }

    /// A row's output has the same bits alone as in a batch of 70, and the transposed packing
    /// gives the same product.
    #[test]
    fn a_row_has_the_same_bits_alone_or_in_a_batch() {
        if !available() {
            eprintln!("no AMX-BF16 here: the bf16x3 product is not run");
            return;
        }
        let (m, k, n) = (70, 96, 48);
        let (x, w, b) = (values(m * k, 4), values(n * k, 5), values(n, 6));
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let (packed, columns) = (
            Packed::new(&w, n, k).unwrap(),
            Packed::from_columns(&wt, k, n).unwrap(),
        );
        let bias = Tensor::from_slice(&b, n, &Device::Cpu).unwrap();
        let all = matmul_t(&tensor(&x, (m, k)), &packed, Some(&bias)).unwrap();
        let same = matmul_t(&tensor(&x, (m, k)), &columns, Some(&bias)).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&all), bits(&same));
        for i in [0, 31, 32, 69] {
            let one = matmul_t(
                &tensor(&x[i * k..(i + 1) * k], (1, k)),
                &packed,
                Some(&bias),
            )
            .unwrap();
            assert_eq!(bits(&one), bits(&all.narrow(0, i, 1).unwrap()), "row {i}");
        }
    }

    /// The AVX-512 split gives the scalar one's bits, ties and signs included.
    #[test]
    fn vector_split_has_the_scalar_bits() {
        let mut xs = values(32, 7);
        xs[0] = f32::from_bits(0x3f80_8000); // a tie, rounds to even (down)
        xs[1] = f32::from_bits(0x3f81_8000); // a tie, rounds to even (up)
        xs[2] = -0.0;
        xs[3] = 1e-30;
        let (mut hi, mut lo) = ([0u16; 32], [0u16; 32]);
        split_into(
            &xs,
            &mut hi,
            &mut lo,
            crate::model::encoder_attention::avx512(),
        );
        for (i, v) in xs.iter().enumerate() {
            assert_eq!((hi[i], lo[i]), split(*v), "value {i}: {v}");
        }
        assert_eq!((hi[0], hi[1]), (0x3f80, 0x3f82));
    }
}
