//! The identity of one image as its vision tower sees it: a SHA-256 over
//! exactly what the encoder reads — the preprocessed tensors (dtype, shape and
//! every value) and, for Qwen2-VL, the patch grid. Whatever preprocessing did
//! (processor config, target size, tiling, grid) shows in those, so two images
//! with one key give the same encoder output on one model, and the same pixels
//! sent at another size, in another format or resampled differently get
//! another key only when they preprocess differently. Computed where the
//! pixels are produced (validation, on a blocking thread), so the engine
//! thread only compares keys.

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use super::ImageInput;

/// SHA-256 of an [`ImageInput`]; the key of the encoder-output cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageKey([u8; 32]);

impl ImageKey {
    /// The digest itself (the prefix cache hashes it into its block hashes).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Hashes what the vision tower reads of `input`.
    pub fn of(input: &ImageInput) -> candle_core::Result<Self> {
        let mut h = Sha256::new();
        match input {
            ImageInput::Pixels(t) => {
                h.update(b"pixels");
                hash_tensor(&mut h, t)?;
            }
            ImageInput::Patches { patches, grid } => {
                h.update(b"patches");
                for d in grid {
                    h.update((*d as u64).to_le_bytes());
                }
                hash_tensor(&mut h, patches)?;
            }
            ImageInput::Tiles { pixels, mask } => {
                h.update(b"tiles");
                hash_tensor(&mut h, pixels)?;
                hash_tensor(&mut h, mask)?;
            }
        }
        Ok(ImageKey(h.finalize().into()))
    }
}

/// A preprocessed image with its key.
#[derive(Debug, Clone)]
pub struct KeyedImage {
    pub input: ImageInput,
    pub key: ImageKey,
}

impl KeyedImage {
    /// Keys `input` (hashes every value it holds: call it off the engine thread).
    pub fn new(input: ImageInput) -> candle_core::Result<Self> {
        let key = ImageKey::of(&input)?;
        Ok(KeyedImage { input, key })
    }
}

/// Feeds a tensor's dtype, shape and values (native byte order) to `h`.
fn hash_tensor(h: &mut Sha256, t: &Tensor) -> candle_core::Result<()> {
    h.update(t.dtype().as_str().as_bytes());
    h.update((t.rank() as u64).to_le_bytes());
    for d in t.dims() {
        h.update((*d as u64).to_le_bytes());
    }
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::F32 => h.update(bytemuck::cast_slice(&flat.to_vec1::<f32>()?)),
        DType::U8 => h.update(flat.to_vec1::<u8>()?),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "cannot key an image tensor of dtype {other:?}"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn pixels(v: &[f32], shape: (usize, usize, usize)) -> ImageInput {
        ImageInput::Pixels(Tensor::from_slice(v, shape, &Device::Cpu).unwrap())
    }

    #[test]
    fn equal_inputs_share_a_key_and_any_difference_changes_it() {
        let a = ImageKey::of(&pixels(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], (3, 1, 2))).unwrap();
        let same = ImageKey::of(&pixels(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], (3, 1, 2))).unwrap();
        let value = ImageKey::of(&pixels(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.5], (3, 1, 2))).unwrap();
        let shape = ImageKey::of(&pixels(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], (3, 2, 1))).unwrap();
        assert_eq!(a, same);
        assert_ne!(a, value);
        assert_ne!(a, shape);
    }

    #[test]
    fn the_grid_and_the_mask_are_part_of_the_key() {
        let t = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
        let grid = |g| ImageInput::Patches {
            patches: t.clone(),
            grid: g,
        };
        assert_ne!(
            ImageKey::of(&grid([1, 2, 2])).unwrap(),
            ImageKey::of(&grid([1, 1, 4])).unwrap()
        );
        let px = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let tiles = |m: &[u8]| ImageInput::Tiles {
            pixels: px.clone(),
            mask: Tensor::from_slice(m, (1, 2, 2), &Device::Cpu).unwrap(),
        };
        assert_ne!(
            ImageKey::of(&tiles(&[1, 1, 1, 1])).unwrap(),
            ImageKey::of(&tiles(&[1, 1, 1, 0])).unwrap()
        );
    }
}
