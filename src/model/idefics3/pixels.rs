//! Checking `pixel_values` / `pixel_attention_mask`, dropping all-zero padding tiles (as
//! transformers' `real_images_inds`) and reducing the pixel mask to one flag per patch.

use candle_core::{DType, Tensor};

use super::vision::PatchMask;
use crate::model::ModelError;

/// What the tower accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub channels: usize,
    pub patch: usize,
    /// H and W must be multiples of this (patch * scale_factor).
    pub multiple: usize,
}

/// The real tiles of a batch and their patch masks.
#[derive(Debug)]
pub(crate) struct Tiles {
    /// (n_real, C, H, W) f32
    pub pixels: Tensor,
    pub masks: Vec<PatchMask>,
}

fn check_shapes(pixels: &Tensor, mask: &Tensor, g: Geometry) -> Result<(usize, usize), ModelError> {
    let (n, h, w) = match pixels.dims() {
        &[n, c, h, w] if n > 0 && c == g.channels => (n, h, w),
        dims => {
            return Err(ModelError::Pixels(format!(
                "expected (n_tiles, {}, H, W), got {dims:?}",
                g.channels
            )))
        }
    };
    if h != w || h == 0 || !h.is_multiple_of(g.multiple) {
        return Err(ModelError::Pixels(format!(
            "tiles must be square with sides a multiple of {}, got {h}x{w}",
            g.multiple
        )));
    }
    if mask.dims() != [n, h, w] {
        return Err(ModelError::Pixels(format!(
            "pixel_attention_mask must be {:?}, got {:?}",
            [n, h, w],
            mask.dims()
        )));
    }
    Ok((n, h))
}

/// Keeps the tiles with any nonzero pixel (`None` when there is none) and computes each kept
/// tile's patch mask: a patch is real when any of its mask pixels is nonzero.
pub(crate) fn real_tiles(
    pixels: &Tensor,
    mask: &Tensor,
    g: Geometry,
) -> Result<Option<Tiles>, ModelError> {
    let (n, side) = check_shapes(pixels, mask, g)?;
    let pixels = pixels.to_dtype(DType::F32)?;
    // (n,) 1 where any value differs from 0.0 (NaN counts as real, -0.0 as zero, as in torch).
    let real: Vec<u8> = pixels.flatten_from(1)?.ne(0f32)?.max(1)?.to_vec1()?;
    let keep: Vec<u32> = (0..n as u32).filter(|&i| real[i as usize] != 0).collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let keep_t = Tensor::new(keep.as_slice(), pixels.device())?;
    let (p, grid) = (g.patch, side / g.patch);
    // (n, H, W) -> (n, grid, p, grid, p) -> (n, grid, grid): any real pixel in the patch.
    let zero = Tensor::zeros((), mask.dtype(), mask.device())?;
    let patch_real: Vec<Vec<Vec<u8>>> = mask
        .index_select(&keep_t, 0)?
        .broadcast_ne(&zero)?
        .reshape((keep.len(), grid, p, grid, p))?
        .max(4)?
        .max(2)?
        .to_vec3()?;
    let masks = patch_real
        .into_iter()
        .enumerate()
        .map(|(i, rows)| {
            let real: Vec<bool> = rows.into_iter().flatten().map(|v| v != 0).collect();
            match real.first() {
                Some(true) => Ok(PatchMask {
                    rows: grid,
                    cols: grid,
                    real,
                }),
                _ => Err(ModelError::Pixels(format!(
                    "tile {} has pixels but its mask hides the top-left patch",
                    keep[i]
                ))),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(Tiles {
        pixels: pixels.index_select(&keep_t, 0)?,
        masks,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const G: Geometry = Geometry {
        channels: 1,
        patch: 2,
        multiple: 4,
    };

    #[test]
    fn drops_zero_tiles_and_reduces_the_mask() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        // Tile 0: real; tile 1: all zeros (padding tile); tile 2: real.
        let px = Tensor::from_vec(
            (0..48)
                .map(|i| if (16..32).contains(&i) { 0.0 } else { 1.0 })
                .collect::<Vec<f32>>(),
            (3, 1, 4, 4),
            &dev,
        )?;
        // Tile 0 fully real; tile 2 real only in its top-left 3x1 pixels.
        let mut m = vec![1u8; 48];
        for (i, v) in m[32..].iter_mut().enumerate() {
            *v = u8::from(i / 4 < 3 && i % 4 < 1);
        }
        let mask = Tensor::from_vec(m, (3, 4, 4), &dev)?;
        let tiles = real_tiles(&px, &mask, G)?.ok_or(ModelError::Pixels("none".into()))?;
        assert_eq!(tiles.pixels.dims(), &[2, 1, 4, 4]);
        assert_eq!(tiles.masks[0].real, vec![true; 4]);
        assert_eq!(tiles.masks[1].real, vec![true, false, true, false]);
        let zeros = Tensor::zeros((1, 1, 4, 4), DType::F32, &dev)?;
        let m1 = Tensor::ones((1, 4, 4), DType::U8, &dev)?;
        assert!(real_tiles(&zeros, &m1, G)?.is_none());
        Ok(())
    }

    #[test]
    fn bad_shapes_are_named() {
        let dev = Device::Cpu;
        let err = |px: (usize, usize, usize, usize), m: (usize, usize, usize)| {
            let px = Tensor::ones(px, DType::F32, &dev).ok()?;
            let m = Tensor::ones(m, DType::U8, &dev).ok()?;
            real_tiles(&px, &m, G).err().map(|e| e.to_string())
        };
        assert!(err((1, 1, 6, 6), (1, 6, 6)).is_some_and(|e| e.contains("multiple of 4")));
        assert!(err((1, 1, 4, 4), (1, 4, 8)).is_some_and(|e| e.contains("pixel_attention_mask")));
        assert!(err((1, 3, 4, 4), (1, 4, 4)).is_some_and(|e| e.contains("(n_tiles, 1, H, W)")));
    }
}
