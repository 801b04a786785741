//! RMS normalisation in transformers' order (Llama/Qwen2/Mistral `RMSNorm`): statistics in f32,
//! the normalised value cast back to the model dtype, then scaled by the weight in that dtype.

use candle_core::{DType, Result, Tensor, D};
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
        let x32 = xs.to_dtype(DType::F32)?;
        let inv_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&inv_rms)?
            .to_dtype(xs.dtype())?
            .broadcast_mul(&self.weight)
    }
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
}
