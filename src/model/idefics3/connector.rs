//! `model.connector`: pixel shuffle (space-to-depth by `scale_factor`) then the bias-free
//! `modality_projection.proj` into the text hidden size.

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

/// transformers' `Idefics3Connector.pixel_shuffle`: (N, S, D) with S = side^2 ->
/// (N, S / s^2, D * s^2). Each output row holds an s x s block of patches, laid out in the
/// order of the reference's view/permute sequence.
pub(crate) fn pixel_shuffle(xs: &Tensor, s: usize) -> Result<Tensor> {
    let (n, seq, d) = xs.dims3()?;
    let side = (seq as f64).sqrt().round() as usize;
    if side * side != seq || !side.is_multiple_of(s) {
        candle_core::bail!("pixel shuffle: {seq} rows are not a square grid divisible by {s}");
    }
    // (N, h, w, D) -> (N, h, w/s, D*s) -> (N, w/s, h, D*s)
    let xs = xs.reshape((n, side, side / s, d * s))?.transpose(1, 2)?;
    // -> (N, w/s, h/s, D*s*s) -> (N, h/s, w/s, D*s*s)
    let xs = xs
        .contiguous()?
        .reshape((n, side / s, side / s, d * s * s))?
        .transpose(1, 2)?;
    xs.contiguous()?.reshape((n, seq / (s * s), d * s * s))
}

#[derive(Debug)]
pub(crate) struct Connector {
    scale: usize,
    proj: Linear,
}

impl Connector {
    pub fn load(
        vision_hidden: usize,
        text_hidden: usize,
        scale: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let input = vision_hidden * scale * scale;
        Ok(Self {
            scale,
            proj: linear_no_bias(input, text_hidden, vb.pp("modality_projection.proj"))?,
        })
    }

    /// (N, S, vision_hidden) -> (N, S / scale^2, text_hidden)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj.forward(&pixel_shuffle(xs, self.scale)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A 4x4 grid of 1-wide features valued by their patch index, s = 2. Hand-derived from the
    /// reference's view/permute chain: output row (i, j) concatenates, for each of the 2 rows
    /// r of its block, the 2 patches of that row: [p(2i, 2j), p(2i, 2j+1), p(2i+1, 2j),
    /// p(2i+1, 2j+1)].
    #[test]
    fn pixel_shuffle_groups_two_by_two_blocks() -> Result<()> {
        let xs = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 16, 1))?;
        let out = pixel_shuffle(&xs, 2)?.squeeze(0)?.to_vec2::<f32>()?;
        let want: Vec<Vec<f32>> = vec![
            vec![0.0, 1.0, 4.0, 5.0],
            vec![2.0, 3.0, 6.0, 7.0],
            vec![8.0, 9.0, 12.0, 13.0],
            vec![10.0, 11.0, 14.0, 15.0],
        ];
        assert_eq!(out, want);
        assert!(pixel_shuffle(
            &Tensor::zeros((1, 12, 1), candle_core::DType::F32, &Device::Cpu)?,
            2
        )
        .is_err());
        Ok(())
    }
}
