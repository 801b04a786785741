//! The Idefics3 vision transformer: SigLIP layers over variable-size tiles with a patch mask
//! (NaViT-style). Patches holding no real pixel are hidden as attention keys, and each real
//! patch takes the position embedding of its bucketized fractional coordinate, as
//! transformers' `Idefics3VisionEmbeddings` computes it; the output goes through
//! `post_layernorm`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::model::vision::EncoderLayer;
use crate::model::VisionConfig;

/// Which patches of one tile hold real pixels: row-major (rows, cols).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PatchMask {
    pub rows: usize,
    pub cols: usize,
    /// rows * cols flags.
    pub real: Vec<bool>,
}

/// `torch.arange(1/n, 1.0, 1/n)` in f32 exactly as torch's CPU kernel fills it: the length is
/// the double quotient's ceiling; runs of 16 elements come from two 8-lane vector fills (lane
/// `k` = f32(f64(f32(start + step * base)) + step * k)), the tail from the scalar loop
/// (f32(start + step * i)). Checked bit for bit against torch 2.x for n = 2..=199.
fn boundaries(n: usize) -> Vec<f32> {
    const LANES: usize = 8;
    let step = 1.0 / n as f64;
    let len = ((1.0 - step) / step).ceil().max(0.0) as usize;
    let vectorized = len / (2 * LANES) * (2 * LANES);
    let lane = |i: usize| {
        let base = (step + step * (i - i % LANES) as f64) as f32;
        (f64::from(base) + step * (i % LANES) as f64) as f32
    };
    (0..len)
        .map(|i| match i < vectorized {
            true => lane(i),
            false => (step + step * i as f64) as f32,
        })
        .collect()
}

/// Bucket of each of `count` grid indices when `real` of them span [0, 1): f32 arithmetic as
/// torch does (`1.0 / n` as an f32 reciprocal, `i * step`, clamp to `1 - 1e-6`), then
/// `bucketize(..., right=True)` = how many boundaries are <= the coordinate.
fn buckets(count: usize, real: usize, bounds: &[f32]) -> Vec<usize> {
    let step = 1.0f32 / real as f32;
    let top = (1.0f64 - 1e-6) as f32;
    (0..count)
        .map(|i| {
            let coord = (i as f32 * step).min(top);
            bounds.iter().take_while(|&&b| b <= coord).count()
        })
        .collect()
}

/// Position ids (rows * cols,) of one tile on a `per_side`-square position table: real patches
/// by their bucketized coordinates, padded patches 0. The real extent is counted down the
/// first column and along the first row, as transformers does.
pub(crate) fn position_ids(mask: &PatchMask, per_side: usize) -> Vec<u32> {
    let at = |r: usize, c: usize| mask.real[r * mask.cols + c];
    let real_rows = (0..mask.rows).filter(|&r| at(r, 0)).count();
    let real_cols = (0..mask.cols).filter(|&c| at(0, c)).count();
    let bounds = boundaries(per_side);
    let bh = buckets(mask.rows, real_rows, &bounds);
    let bw = buckets(mask.cols, real_cols, &bounds);
    (0..mask.rows)
        .flat_map(|r| (0..mask.cols).map(move |c| (r, c)))
        .map(|(r, c)| match at(r, c) {
            true => (bh[r] * per_side + bw[c]) as u32,
            false => 0,
        })
        .collect()
}

/// `model.vision_model`: embeddings, encoder, post_layernorm.
#[derive(Debug)]
pub(crate) struct Idefics3Vision {
    patch: usize,
    /// Patches per side of the position table (image_size / patch).
    per_side: usize,
    /// Patch embedding as a matrix: (D, C * patch * patch).
    patch_weight: Tensor,
    /// (D,)
    patch_bias: Tensor,
    /// (per_side^2, D)
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
}

impl Idefics3Vision {
    /// Runs the encoder layers' projections as the bf16x3 product where the machine has it:
    /// how many do.
    pub fn use_bf16x3(&mut self) -> Result<usize> {
        self.layers.iter_mut().map(EncoderLayer::use_bf16x3).sum()
    }

    pub fn load(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let per_side = cfg.grid();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch: p,
            per_side,
            patch_weight: emb
                .get((d, c, p, p), "patch_embedding.weight")?
                .reshape((d, c * p * p))?,
            patch_bias: emb.get(d, "patch_embedding.bias")?,
            position_embedding: emb.get((per_side * per_side, d), "position_embedding.weight")?,
            layers,
            post_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// Tiles (N, C, H, W) in the model dtype with one mask per tile -> (N, S, D),
    /// S = (H / patch) * (W / patch).
    pub fn forward(&self, pixels: &Tensor, masks: &[PatchMask]) -> Result<Tensor> {
        let xs = self.embed(pixels, masks)?;
        let key_mask = key_mask(masks, pixels.device())?;
        let mut xs = xs;
        for layer in &self.layers {
            xs = layer.forward(&xs, key_mask.as_ref())?;
        }
        self.post_norm.forward(&xs)
    }

    /// Patch + position embeddings: (N, C, H, W) -> (N, S, D).
    fn embed(&self, pixels: &Tensor, masks: &[PatchMask]) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // The stride-p conv as one matmul: (N, C, gh, p, gw, p) -> (N * gh * gw, C * p * p).
        let patches = pixels
            .reshape((n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n * gh * gw, c * p * p))?;
        let xs = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let ids: Vec<u32> = masks
            .iter()
            .flat_map(|m| position_ids(m, self.per_side))
            .collect();
        let ids = Tensor::new(ids.as_slice(), pixels.device())?;
        // (N * S, D) -> (N, S, D)
        let pos = self.position_embedding.index_select(&ids, 0)?;
        let d = pos.dim(1)?;
        (xs + pos)?.reshape((n, gh * gw, d))
    }
}

/// Additive key mask (N, 1, 1, S) f32: 0 for real patches, -inf for padding; `None` when no
/// patch is padded (transformers then skips the mask too).
fn key_mask(masks: &[PatchMask], device: &Device) -> Result<Option<Tensor>> {
    if masks.iter().all(|m| m.real.iter().all(|&r| r)) {
        return Ok(None);
    }
    let s = masks.first().map_or(0, |m| m.real.len());
    let values: Vec<f32> = masks
        .iter()
        .flat_map(|m| m.real.iter())
        .map(|&r| if r { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    Tensor::from_vec(values, (masks.len(), 1, 1, s), device)?
        .to_dtype(DType::F32)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(rows: usize, cols: usize, real_rows: usize, real_cols: usize) -> PatchMask {
        PatchMask {
            rows,
            cols,
            real: (0..rows * cols)
                .map(|i| i / cols < real_rows && i % cols < real_cols)
                .collect(),
        }
    }

    /// Hand-computed: on a 4-per-side table the boundaries are 0.25, 0.5, 0.75.
    #[test]
    fn full_tile_positions_are_the_identity() {
        assert_eq!(boundaries(4), vec![0.25, 0.5, 0.75]);
        let ids = position_ids(&mask(4, 4, 4, 4), 4);
        assert_eq!(ids, (0..16).collect::<Vec<u32>>());
    }

    /// A 2x3-patch image padded to 4x4: rows step 1/2 -> buckets 0, 2; cols step 1/3 ->
    /// coords 0, 1/3, 2/3 -> buckets 0, 1, 2. Padded patches take id 0.
    #[test]
    fn padded_tile_positions_stretch_over_the_table() {
        let ids = position_ids(&mask(4, 4, 2, 3), 4);
        #[rustfmt::skip]
        let want = vec![
            0, 1, 2, 0,
            8, 9, 10, 0,
            0, 0, 0, 0,
            0, 0, 0, 0,
        ];
        assert_eq!(ids, want);
    }

    /// Lengths of `torch.arange(1/n, 1.0, 1/n)` for n = 2..=64 and the f32 bits of n = 26, 27
    /// and 14 (Idefics3-8B's 364/14 = 26 per side), printed by torch 2.x on CPU: coordinates
    /// land exactly on these boundaries, so every bit matters.
    #[test]
    fn boundaries_follow_torch_bit_for_bit() {
        let lens: Vec<usize> = (2..=64).map(|n| boundaries(n).len()).collect();
        #[rustfmt::skip]
        let want = vec![
            1, 3, 3, 4, 6, 7, 7, 8, 9, 10, 11, 12, 14, 14, 15, 16, 17, 19, 19, 20, 21, 22, 24,
            24, 25, 27, 28, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
            45, 46, 47, 48, 49, 50, 51, 52, 54, 54, 55, 56, 57, 58, 59, 60, 61, 63, 63,
        ];
        assert_eq!(lens, want);
        let bits = |n: usize| {
            boundaries(n)
                .iter()
                .map(|b| b.to_bits())
                .collect::<Vec<u32>>()
        };
        #[rustfmt::skip]
        let b26 = vec![
            1025346009, 1033734617, 1038896837, 1042123225, 1044704335, 1047285445, 1049221278,
            1050511833, 1051802388, 1053092943, 1054383498, 1055674053, 1056964608, 1057609886,
            1058255163, 1058900441, 1059545718, 1060190996, 1060836273, 1061481551, 1062126828,
            1062772106, 1063417383, 1064062661, 1064707938,
        ];
        assert_eq!(bits(26), b26);
        #[rustfmt::skip]
        let b27 = vec![
            1024963622, 1033352230, 1038323257, 1041740838, 1044226351, 1046711865, 1048886689,
            1050129446, 1051372203, 1052614960, 1053857716, 1055100473, 1056343230, 1057275297,
            1057896676, 1058518054, 1059139432, 1059760811, 1060382189, 1061003567, 1061624946,
            1062246324, 1062867703, 1063489081, 1064110459, 1064731838, 1065353216,
        ];
        assert_eq!(bits(27), b27);
        #[rustfmt::skip]
        let b14 = vec![
            1032997157, 1041385765, 1046179255, 1049774373, 1052171118, 1054567863, 1056964608,
            1058162981, 1059361353, 1060559726, 1061758098, 1062956471, 1064154843, 1065353216,
        ];
        assert_eq!(bits(14), b14);
    }
}
