//! The decoder's projections (q/k/v/o, gate/up/down, lm_head): dense, or quantized in place
//! after loading (`--quantize`) to a GGML block type run by candle's CPU kernels, or, for Q8_0
//! on CPUs with AVX-512 VNNI, by this crate's kernel (`q8`, 2x faster here).
//!
//! A quantized matrix keeps its input dimension in blocks (32 values for Q8_0, 256 for the
//! K-quants); a matrix whose input dimension is not a multiple of the block stays dense. Candle
//! repacks a quantized matrix for its x86 kernels on first use; [`Linear::quantize`] runs one
//! tiny product right away so that cost is paid at load, not by the first request.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::huge_pages::HugeArena;
use super::q8::Q8Matrix;

/// A projection `x @ W^T + b`, W (out, in).
#[derive(Debug)]
pub enum Linear {
    Dense(candle_nn::Linear),
    /// Weights in a GGML block type, bias in f32; the product runs in f32 (the kernels'
    /// dtype), converted from and back to the activations' dtype.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
    /// Q8_0 weights run by this crate's AVX-512 VNNI kernel (`q8`), bias in f32, the product
    /// in f32 as above.
    Q8 {
        weight: Q8Matrix,
        bias: Option<Tensor>,
    },
}

/// How many projections a quantization pass changed and how many it left dense.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantReport {
    pub quantized: usize,
    /// Input dimension not a multiple of the type's block size.
    pub kept_dense: usize,
    /// Bytes of the projections' weights before and after.
    pub bytes_before: usize,
    pub bytes_after: usize,
}

impl Linear {
    /// Loads `weight` (out, in) and, when `bias`, `bias` (out,) under `vb`.
    pub fn load(input: usize, output: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        candle_nn::linear_b(input, output, bias, vb).map(Self::Dense)
    }

    /// Several projections of the same input as one: the weights `names` (out_i, in) under
    /// `vb` (with their biases when `bias`) stacked into (sum out_i, in), so a step runs one
    /// product instead of several (one hand-off to the thread pool and one read of the input
    /// each, where a decoding step has 30 layers of them). In the decode kernels (small-m,
    /// q8) every output is its own weight row's dot product, so their outputs keep their bits;
    /// `gemm` (prefill) may block the sums differently for the wider product.
    pub fn load_stacked(
        input: usize,
        parts: &[(usize, &str)],
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for &(output, name) in parts {
            let l = candle_nn::linear_b(input, output, bias, vb.pp(name))?;
            weights.push(l.weight().clone());
            biases.extend(l.bias().cloned());
        }
        let weight = Tensor::cat(&weights, 0)?;
        // Every part has a bias when `bias`, none otherwise.
        let bias = (!biases.is_empty())
            .then(|| Tensor::cat(&biases, 0))
            .transpose()?;
        Ok(Self::Dense(candle_nn::Linear::new(weight, bias)))
    }

    /// Wraps a weight (out, in) held elsewhere (e.g. a head tied to the embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }

    /// Moves a dense weight into `arena` (huge pages, read faster when decoding streams it);
    /// a quantized one stays where it is.
    pub fn pack(&mut self, arena: &mut HugeArena) -> Result<()> {
        if let Self::Dense(l) = self {
            *l = candle_nn::Linear::new(arena.put(l.weight())?, l.bias().cloned());
        }
        Ok(())
    }

    /// Quantizes a dense projection to `dtype` in place (and repacks it for the CPU kernels),
    /// or leaves it dense when its input dimension does not fit the blocks; counts either.
    /// Q8_0 weights on the CPUs of this crate's kernel go into `arena`.
    pub fn quantize(
        &mut self,
        dtype: GgmlDType,
        report: &mut QuantReport,
        arena: &mut HugeArena,
    ) -> Result<()> {
        let Self::Dense(dense) = self else {
            return Ok(());
        };
        let weight = dense.weight();
        let (_, input) = weight.dims2()?;
        let bytes = weight.elem_count() * weight.dtype().size_in_bytes();
        report.bytes_before += bytes;
        if !input.is_multiple_of(dtype.block_size()) {
            report.kept_dense += 1;
            report.bytes_after += bytes;
            return Ok(());
        }
        let bias = dense.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        if dtype == GgmlDType::Q8_0 && weight.device().is_cpu() && Q8Matrix::supported() {
            let weight = Q8Matrix::quantize(weight, arena)?;
            report.bytes_after += weight.bytes();
            report.quantized += 1;
            *self = Self::Q8 { weight, bias };
            return Ok(());
        }
        let q = QTensor::quantize(weight, dtype)?;
        report.bytes_after += q.storage_size_in_bytes();
        let quantized = Self::Quantized {
            weight: QMatMul::QTensor(Arc::new(q)),
            bias,
        };
        // Two rows: every kernel choice (some are m > 1 only) repacks now.
        let probe = Tensor::zeros((2, input), weight.dtype(), weight.device())?;
        quantized.forward(&probe)?;
        *self = quantized;
        report.quantized += 1;
        Ok(())
    }
}

impl Module for Linear {
    /// (..., in) -> (..., out), in the input's dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => dense_forward(l, xs),
            Self::Quantized { weight, bias } => {
                let ys = weight.forward(&xs.to_dtype(DType::F32)?.contiguous()?)?;
                add_bias(ys, bias.as_ref())?.to_dtype(xs.dtype())
            }
            Self::Q8 { weight, bias } => {
                let Some((&input, lead)) = xs.dims().split_last() else {
                    candle_core::bail!("q8_0 projection of a scalar")
                };
                let ys = weight.forward(&xs.to_dtype(DType::F32)?.reshape(((), input))?)?;
                unflatten(add_bias(ys, bias.as_ref())?, lead)?.to_dtype(xs.dtype())
            }
        }
    }
}

/// A dense projection of the encoders (vision towers; CLIP and SigLIP text towers): whatever
/// the number of rows, one kernel (the many-rows one on the CPU in f32, else candle's), so an
/// input's output has the same bits alone or batched with others (the decoder's [`Linear`]
/// picks its kernel by row count). On the CPU in f32 the weight is kept transposed, (in,
/// out), the layout `gemm` packs fastest (`many_rows::Weight::Columns`).
#[derive(Debug)]
pub struct EncoderLinear {
    /// (out, in), or (in, out) when `columns`.
    weight: Tensor,
    columns: bool,
    bias: Option<Tensor>,
    /// The weight packed for the bf16x3 product (`use_bf16x3`); `weight` is then empty.
    packed: Option<super::bf16x3::Packed>,
}

impl EncoderLinear {
    /// Loads `weight` (out, in) and `bias` (out,) under `vb`.
    pub fn load(input: usize, output: usize, vb: VarBuilder) -> Result<Self> {
        let l = candle_nn::linear(input, output, vb)?;
        Self::new(l.weight().clone(), l.bias().cloned())
    }

    /// From `weight` (out, in) and `bias` (out,).
    fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let columns = weight.device().is_cpu() && weight.dtype() == DType::F32;
        let weight = match columns {
            true => weight.t()?.contiguous()?,
            false => weight,
        };
        Ok(Self {
            weight,
            columns,
            bias,
            packed: None,
        })
    }

    /// Runs this projection as the bf16x3 product (`bf16x3`) from now on, when it is f32 on
    /// the CPU and the machine has AMX: returns whether it does. The f32 weight is dropped.
    pub fn use_bf16x3(&mut self) -> Result<bool> {
        if !self.columns || self.packed.is_some() || !super::bf16x3::available() {
            return Ok(self.packed.is_some());
        }
        let (k, n) = self.weight.dims2()?;
        let w: Vec<f32> = self.weight.flatten_all()?.to_vec1()?;
        self.packed = Some(super::bf16x3::Packed::from_columns(&w, k, n)?);
        self.weight = Tensor::zeros(0, DType::F32, self.weight.device())?;
        Ok(true)
    }

    /// Loads the projections `parts` ((out, name) under `vb`, each with a bias) as one, their
    /// outputs side by side in `parts`' order: (..., input) -> (..., sum of outs).
    pub fn load_stacked(input: usize, parts: &[(usize, &str)], vb: &VarBuilder) -> Result<Self> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for &(output, name) in parts {
            let l = candle_nn::linear(input, output, vb.pp(name))?;
            weights.push(l.weight().clone());
            biases.extend(l.bias().cloned());
        }
        Self::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?))
    }
}

impl Module for EncoderLinear {
    /// (..., in) -> (..., out).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Some((&input, lead)) = xs.dims().split_last() else {
            candle_core::bail!("encoder projection of a scalar")
        };
        let x = xs.reshape(((), input))?;
        if let Some(p) = &self.packed {
            let ys = super::bf16x3::matmul_t(&x.to_dtype(DType::F32)?, p, self.bias.as_ref())?;
            return unflatten(ys, lead)?.to_dtype(xs.dtype());
        }
        let (w, bias) = (&self.weight, self.bias.as_ref());
        let weight = match self.columns {
            true => super::many_rows::Weight::Columns(w),
            false => super::many_rows::Weight::Rows(w),
        };
        if let Some(ys) = super::many_rows::matmul_t(&x, weight, bias, sequence_len(lead))? {
            return unflatten(ys, lead);
        }
        let wt = match self.columns {
            true => w.clone(),
            false => w.t()?,
        };
        unflatten(add_bias(x.matmul(&wt)?, bias)?, lead)
    }
}

/// `x @ W^T + b` with the small-m kernel when a step has few rows (decoding), split by rows
/// across the pool when it has many (f32 on the CPU), else candle's.
fn dense_forward(l: &candle_nn::Linear, xs: &Tensor) -> Result<Tensor> {
    let Some((&input, lead)) = xs.dims().split_last() else {
        return l.forward(xs);
    };
    let rows = lead.iter().product::<usize>();
    let x = xs.reshape((rows, input))?;
    if let Some(ys) = super::small_m::matmul_t(&x, l.weight())? {
        return unflatten(add_bias(ys, l.bias())?, lead);
    }
    let weight = super::many_rows::Weight::Rows(l.weight());
    if let Some(ys) = super::many_rows::matmul_t(&x, weight, l.bias(), sequence_len(lead))? {
        return unflatten(ys, lead);
    }
    l.forward(xs)
}

/// The rows of one sequence in an input whose leading dimensions are `lead` (..., S): its
/// last one (1 for a vector).
fn sequence_len(lead: &[usize]) -> usize {
    lead.last().copied().unwrap_or(1)
}

/// `ys` (rows, out) + `bias` (out,) when there is one.
fn add_bias(ys: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => ys.broadcast_add(b),
        None => Ok(ys),
    }
}

/// (rows, out) -> (...lead, out), rows being the product of `lead`.
fn unflatten(ys: Tensor, lead: &[usize]) -> Result<Tensor> {
    let mut shape = lead.to_vec();
    shape.push(ys.dim(1)?);
    ys.reshape(shape)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// ||a - b|| / ||b||.
    fn relative_error(a: &Tensor, b: &Tensor) -> Result<f32> {
        let norm = |t: &Tensor| t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>();
        Ok(norm(&(a - b)?)? / norm(b)?)
    }

    /// Candle's kernels, or (Q8_0 on CPUs with AVX-512 VNNI) this crate's.
    fn is_quantized(l: &Linear) -> bool {
        matches!(l, Linear::Quantized { .. } | Linear::Q8 { .. })
    }

    /// Random normal W (out, in), bias and x (m, in): the quantized product stays within the
    /// type's rounding of the dense one. Both sides are rounded (candle quantizes the
    /// activations to 8 bits per block too), so the bounds are about twice what weight-only
    /// rounding gives: Q8_0 keeps 8 bits per 32 values (measured 0.009 on a decoder-sized
    /// matrix, shared/notes/candle-cpu.md), Q6K 6 bits (0.020), Q4K 4 bits (0.077).
    #[test]
    fn quantized_matches_dense_within_the_type_error() -> Result<()> {
        let dev = Device::Cpu;
        let (out, input, m) = (64, 512, 5);
        let w = Tensor::randn(0f32, 1.0, (out, input), &dev)?;
        let b = Tensor::randn(0f32, 1.0, out, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, input), &dev)?;
        let dense = Linear::Dense(candle_nn::Linear::new(w.clone(), Some(b.clone())));
        let want = dense.forward(&x)?;
        for (dtype, bound) in [
            (GgmlDType::Q8_0, 0.02),
            (GgmlDType::Q6K, 0.04),
            (GgmlDType::Q4K, 0.15),
        ] {
            let mut q = Linear::Dense(candle_nn::Linear::new(w.clone(), Some(b.clone())));
            let mut report = QuantReport::default();
            q.quantize(dtype, &mut report, &mut HugeArena::default())?;
            assert!(is_quantized(&q), "{dtype:?}");
            assert_eq!(report.quantized, 1);
            assert!(report.bytes_after * 3 < report.bytes_before, "{report:?}");
            let got = q.forward(&x)?;
            assert_eq!(got.dims(), [m, out]);
            let err = relative_error(&got, &want)?;
            assert!(err < bound, "{dtype:?}: relative error {err}");
            assert!(err > 0.0, "{dtype:?}: the product was not quantized");
            // Leading dimensions pass through.
            let batched = q.forward(&x.unsqueeze(0)?)?;
            assert_eq!(batched.dims(), [1, m, out]);
            assert_eq!(relative_error(&batched.squeeze(0)?, &got)?, 0.0);
            // f16 activations go through the f32 kernels and come back in f16.
            let half = q.forward(&x.to_dtype(DType::F16)?)?;
            assert_eq!(half.dtype(), DType::F16);
            let err = relative_error(&half.to_dtype(DType::F32)?, &want)?;
            assert!(err < bound, "{dtype:?} f16: relative error {err}");
        }
        Ok(())
    }

    #[test]
    fn inputs_off_the_block_size_stay_dense() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (8, 96), &Device::Cpu)?;
        let (mut report, mut arena) = (QuantReport::default(), HugeArena::default());
        let mut l = Linear::from_weight(w.clone());
        l.quantize(GgmlDType::Q4K, &mut report, &mut arena)?; // 96 is not a multiple of 256
        assert!(matches!(l, Linear::Dense(_)));
        l.quantize(GgmlDType::Q8_0, &mut report, &mut arena)?; // but it is of 32
        assert!(is_quantized(&l));
        l.quantize(GgmlDType::Q8_0, &mut report, &mut arena)?; // already quantized: left alone
        assert_eq!((report.quantized, report.kept_dense), (1, 1), "{report:?}");
        Ok(())
    }
}
