//! RMS normalisation in transformers' order (Llama/Qwen2/Mistral `RMSNorm`): statistics in f32,
//! the normalised value cast back to the model dtype, then scaled by the weight in that dtype.
//! On the CPU in f32 it is one op (seven candle ops before, twice a layer on the engine
//! thread's share of every decoding step).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (hidden,)
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// `xs`: (..., hidden) -> same shape and dtype.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if f32_cpu(xs) && f32_cpu(&self.weight) && self.weight.is_contiguous() {
            return xs
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &RowNorm(self.eps as f32));
        }
        let x32 = xs.to_dtype(DType::F32)?;
        let inv_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&inv_rms)?
            .to_dtype(xs.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// Values per work item of the parallel map (whole rows).
const ITEM_VALUES: usize = 16 << 10;

/// [`RmsNorm`] on the CPU in f32, each row on its own: `x / sqrt(mean(x^2) + eps) * w`.
struct RowNorm(f32);

impl CustomOp2 for RowNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            super::par::operand::<f32>(xs, xl)?,
            super::par::operand::<f32>(ws, wl)?,
        );
        let d = w.len().max(1);
        if x.len() % d != 0 {
            candle_core::bail!(
                "rms norm: rows of {} for a weight of {d}",
                xl.dims().last().copied().unwrap_or(0)
            )
        }
        let rows = (ITEM_VALUES / d).max(1);
        let mut out = vec![0f32; x.len()];
        super::par::for_each_chunk_mut(&mut out, rows * d, |item, piece| {
            for (r, o) in piece.chunks_mut(d).enumerate() {
                let x = &x[(item * rows + r) * d..][..d];
                let inv = 1.0 / (sum_of_squares(x) / d as f32 + self.0).sqrt();
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * inv * w;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `sum(x^2)` in 16 partial sums (they vectorise), then added up.
fn sum_of_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the formula evaluated by hand; 1e-6 absolute covers f32 rounding.
    #[test]
    fn normalises_rows() -> Result<()> {
        let norm = RmsNorm {
            weight: Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?,
            eps: 0.0,
        };
        let got = norm.forward(&Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu)?)?;
        // rms = sqrt((9 + 16) / 2) = 3.5355339
        let want = [3.0 / 3.535_534, 2.0 * 4.0 / 3.535_534];
        for (g, w) in got.flatten_all()?.to_vec1::<f32>()?.iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
        Ok(())
    }

    /// The fused CPU op against candle's ops in transformers' order (the f16 path's), for one
    /// row, rows spanning work items and a width off the 16 lanes. Only the sum of squares is
    /// added in another order: a few ulps of the mean, so 1e-5 relative (inputs of unit size).
    #[test]
    fn fused_matches_the_op_by_op_form() -> Result<()> {
        for (t, d) in [(1, 576), (70, 960), (3, 37)] {
            let norm = RmsNorm {
                weight: Tensor::randn(0f32, 1.0, d, &Device::Cpu)?,
                eps: 1e-5,
            };
            let x = Tensor::randn(0f32, 1.0, (t, d), &Device::Cpu)?;
            let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + norm.eps)?
                .sqrt()?
                .recip()?;
            let want = x.broadcast_mul(&inv)?.broadcast_mul(&norm.weight)?;
            let got = norm.forward(&x)?;
            let err = ((got - &want)?.abs()? / (want.abs()? + 1e-3)?)?.max_all()?;
            assert!(err.to_scalar::<f32>()? < 1e-5, "t {t} d {d}");
        }
        Ok(())
    }
}
