//! The CPU product `x @ W^T + b` for many rows (prefill, the vision encoders): the output
//! columns split in one part per thread of candle's pool, each part one single-threaded `gemm`
//! call that adds its product onto the bias already in the output.
//!
//! Candle runs such a product as one `gemm` call on rayon's threads and adds the bias after.
//! `gemm` packs part of its operands on the calling thread while the others wait, and candle's
//! own pool (which runs everything else) spins beside rayon's threads on two cores. Split by
//! columns, each thread packs what it reads in parallel, and the bias costs no pass of its own.
//! On SigLIP's projections for a 1024-patch tile this measured 1.0 to 1.5x candle's rate
//! (`examples/encoder_layer.rs`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::par::operand;

/// A projection's weight as this path reads it.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// (n, k), as checkpoints store it.
    Rows(&'a Tensor),
    /// (k, n): the transpose, stored so by the encoders at load. `gemm` runs `x @ W^T` with
    /// the weight as its left operand (it transposes a row-major product), which it packs
    /// before use: from (n, k) one element at a time, which the one-image profile showed at
    /// 12% of the samples; from (k, n) in whole vectors.
    Columns(&'a Tensor),
}

impl Weight<'_> {
    /// (n, k) of the product `x @ W^T`.
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Rows(w) => w.dims2(),
            Self::Columns(w) => w.dims2().map(|(k, n)| (n, k)),
        }
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Self::Rows(w) | Self::Columns(w) => w,
        }
    }
}

/// `x` (m, k) @ W^T + `bias` (n,) -> (m, n) f32, when this path applies: CPU, f32, the weight
/// and `bias` contiguous, `group` dividing m. `None` otherwise (the caller uses candle's
/// matmul). Each `group` rows (a sequence of a batch) are one product, as candle's batched
/// matmul makes them: `gemm` picks its kernels by row count, so a sequence's bits stay the
/// same alone or batched.
pub fn matmul_t(
    x: &Tensor,
    w: Weight<'_>,
    bias: Option<&Tensor>,
    group: usize,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Ok((n, k)) = w.dims() else {
        return Ok(None);
    };
    let n = Some(n);
    let applies = f32_cpu(x)
        && f32_cpu(w.tensor())
        && w.tensor().is_contiguous()
        && x.rank() == 2
        && x.dim(1)? == k
        && group > 0
        && x.dim(0)?.is_multiple_of(group)
        && bias.is_none_or(|b| {
            f32_cpu(b) && b.is_contiguous() && b.dims().first().copied() == n && b.rank() == 1
        });
    if !applies {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let op = ManyRows {
        group,
        columns: matches!(w, Weight::Columns(_)),
    };
    match bias {
        Some(b) => x.apply_op3_no_bwd(w.tensor(), b, &op),
        None => x.apply_op2_no_bwd(w.tensor(), &op),
    }
    .map(Some)
}

struct ManyRows {
    /// Rows per product.
    group: usize,
    /// The weight is (k, n) ([`Weight::Columns`]), else (n, k).
    columns: bool,
}

impl CustomOp2 for ManyRows {
    fn name(&self) -> &'static str {
        "many-rows-matmul-t"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ws, wl), None)
    }
}

impl CustomOp3 for ManyRows {
    fn name(&self) -> &'static str {
        "many-rows-matmul-t-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ws, wl), Some(operand(bs, bl)?))
    }
}

impl ManyRows {
    /// The product of the input and weight storages, plus `bias`.
    fn run(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let w = (operand(ws, wl)?, self.columns);
        product(operand(xs, xl)?, xl, w, bias, self.group)
    }
}

/// `x` (m, k) times the weight `w`, (k, n) when `columns` else (n, k).
fn product(
    x: &[f32],
    xl: &Layout,
    (w, columns): (&[f32], bool),
    bias: Option<&[f32]>,
    group: usize,
) -> Result<(CpuStorage, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let n = w.len() / k.max(1);
    if x.len() != m * k
        || w.len() != n * k
        || bias.is_some_and(|b| b.len() != n)
        || group == 0
        || !m.is_multiple_of(group)
    {
        candle_core::bail!("many-rows matmul: operands do not match ({m}, {k}) x ({n}, {k})");
    }
    // Each item writes its own block's starting values (the bias, or zeros) before adding its
    // product onto them, so the (m, n) output is filled in parallel: filled here first, it
    // was a serial pass (12 MiB for SigLIP's fc1) while the other thread waited.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // Split by output columns too (each thread packs what it reads), not by rows: a part is
    // then the product one call would make for its columns.
    let parts = (candle_core::utils::barrier_pool().n_workers() + 1).clamp(1, n.max(1));
    let dst = super::par::Disjoint::uninit(&mut out.spare_capacity_mut()[..m * n]);
    super::par::for_each_index(m / group * parts, |item| {
        let (g, part) = (item / parts, item % parts);
        let (first, end) = (part * n / parts, (part + 1) * n / parts);
        let row = g * group;
        // W^T's columns first..end, (k, end - first): from (n, k) its rows first..end with
        // strides (1, k), from (k, n) at `first` with strides (n, 1).
        let (rhs, rhs_cs, rhs_rs) = match columns {
            false => (w[first * k..].as_ptr(), k as isize, 1),
            true => (w[first..].as_ptr(), 1, n as isize),
        };
        if !columns && group < TRANSPOSED_BELOW {
            // SAFETY: as below.
            return unsafe {
                transposed(
                    x.as_ptr().add(row * k),
                    (rhs, k),
                    group,
                    dst.ptr().add(row * n + first),
                    (end - first, n),
                    bias.map(|b| &b[first..end]),
                )
            };
        }
        for r in row..row + group {
            // SAFETY: as below; these are the item's own places.
            unsafe {
                let at = dst.ptr().add(r * n + first);
                match bias {
                    Some(b) => {
                        std::ptr::copy_nonoverlapping(b[first..end].as_ptr(), at, end - first)
                    }
                    None => std::ptr::write_bytes(at, 0, end - first),
                }
            }
        }
        // SAFETY: rows row..row + group, columns first..end of the (m, n) output are this
        // item's alone and lie in it; x holds (m, k) and w n x k values, read as above;
        // `out` outlives `for_each_index`.
        unsafe {
            gemm_once(
                (group, end - first, k),
                (dst.ptr().add(row * n + first), 1, n as isize),
                true,
                (x.as_ptr().add(row * k), 1, k as isize),
                (rhs, rhs_cs, rhs_rs),
            )
        };
    });
    // SAFETY: the items' blocks cover every row (m / group groups of `group`) and every column
    // (the parts split 0..n), and each wrote all of its places above.
    unsafe { out.set_len(m * n) };
    Ok((CpuStorage::F32(out), Shape::from((m, n))))
}

/// Up to this many rows per product, a weight stored (n, k) goes through [`transposed`]
/// (`examples/encoder_layer.rs`, decoder MLP up 576 -> 1536: at 30 rows 0.30 ms against 0.8,
/// at 100 the same, at 1000 rows 8 ms against 6.6).
const TRANSPOSED_BELOW: usize = 128;

/// The product of `rows` input rows at `x` (stride k) with the weight rows at `w` (`cols` of
/// them, stride k), plus `bias` (`cols` values) if any, written to the `rows` x `cols` block at
/// `out` (row stride `ldo`, uninitialised before), computed
/// as its transpose: `gemm` then broadcasts the weights straight from their rows and packs
/// only the few input rows, where the row-major product has it pack the weight one element
/// at a time (the transposed copy its kernel wants), a pass that costs as much as a product
/// of 30 rows.
///
/// SAFETY: `x` holds `rows` x k values, `w` `cols` x k, and the output block is the caller's.
unsafe fn transposed(
    x: *const f32,
    (w, k): (*const f32, usize),
    rows: usize,
    out: *mut f32,
    (cols, ldo): (usize, usize),
    bias: Option<&[f32]>,
) {
    // (cols, rows), column-major: element (i, j) at j * rows + i. Left uninitialised, as
    // `gemm` without `read_dst` writes every place: a text prefill's `memset` samples went
    // from 3.6% to 2.5% without the zero fill.
    let mut t: Vec<f32> = Vec::with_capacity(rows * cols);
    gemm_once(
        (rows, cols, k),
        (t.as_mut_ptr(), rows as isize, 1),
        false,
        (x, 1, k as isize),
        (w, k as isize, 1),
    );
    // SAFETY: the product wrote all rows x cols places (`read_dst` false: none was read).
    t.set_len(rows * cols);
    // Written in strips of 16 columns: a strip reads its 16 columns of `t` as 16 sequential
    // streams and writes one line of each output row. Walking `t` with a stride of `rows` per
    // output row instead took 6.9% of a text prefill's samples. The bias is added here, not
    // filled in first (a pass over the output, and `memset` without one).
    for j0 in (0..cols).step_by(16) {
        let strip = &t[j0 * rows..(j0 + 16).min(cols) * rows];
        for i in 0..rows {
            let o = out.add(i * ldo + j0);
            for (j, col) in strip.chunks_exact(rows).enumerate() {
                let start = bias.map_or(0.0, |b| b[j0 + j]);
                o.add(j).write(start + col[i]);
            }
        }
    }
}

/// `dst` (m, n) = `lhs` (m, k) · `rhs` (k, n), plus what `dst` holds when `read_dst`: one
/// single-threaded `gemm` call, each operand a pointer with its column and row strides.
///
/// SAFETY: the operands hold what their sizes and strides reach; `dst` is the caller's.
unsafe fn gemm_once(
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs, dst_rs): (*mut f32, isize, isize),
    read_dst: bool,
    (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Against candle's matmul plus bias, with column counts that split unevenly and a k off the
    /// SIMD width, products of fewer and of more rows than [`TRANSPOSED_BELOW`]. Both sum the
    /// same f32 products over k in possibly other blockings: rounding of order sqrt(k) ulps of
    /// sums of magnitude ~sqrt(k), far below 1e-4 for k <= 300.
    #[test]
    fn matches_candle_matmul_and_bias() -> Result<()> {
        let dev = Device::Cpu;
        for (m, n, k) in [
            (17, 37, 45),
            (100, 64, 96),
            (33, 130, 300),
            (1, 5, 7),
            (150, 40, 70),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let plain = x.matmul(&w.t()?)?;
            for (bias, want) in [(None, plain.clone()), (Some(&b), plain.broadcast_add(&b)?)] {
                // One product, or one per row (sequences of 1); the weight as stored or
                // transposed.
                let wt = w.t()?.contiguous()?;
                let weights = [Weight::Rows(&w), Weight::Columns(&wt)];
                for (group, w) in [m, 1].into_iter().flat_map(|g| weights.map(|w| (g, w))) {
                    let got = matmul_t(&x, w, bias, group)?.expect("applies");
                    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let (with, cols) = (bias.is_some(), matches!(w, Weight::Columns(_)));
                    assert!(
                        diff < 1e-4,
                        "({m}, {n}, {k}) bias {with} group {group} columns {cols}: {diff}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn declines_what_it_does_not_cover() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((8, 4), DType::F32, &dev)?;
        let half = Tensor::zeros((20, 4), DType::F16, &dev)?;
        assert!(matmul_t(&half, Weight::Rows(&w), None, 20)?.is_none());
        let strided = Tensor::zeros((4, 8), DType::F32, &dev)?.t()?;
        let x = Tensor::zeros((20, 4), DType::F32, &dev)?;
        assert!(matmul_t(&x, Weight::Rows(&strided), None, 20)?.is_none());
        assert!(
            matmul_t(&x, Weight::Rows(&w), None, 3)?.is_none(),
            "3 does not divide 20"
        );
        let wrong_bias = Tensor::zeros(3, DType::F32, &dev)?;
        assert!(matmul_t(&x, Weight::Rows(&w), Some(&wrong_bias), 20)?.is_none());
        Ok(())
    }
}
