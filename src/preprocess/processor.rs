//! [`ImageProcessor::preprocess`]: the transformers 5 PIL-backend pipeline
//! (`PilBackend._preprocess`) on one image.
//!
//! Order and dtypes, as transformers does them: RGB conversion; resize on uint8 (Pillow);
//! center crop on uint8, zero-padding when the image is smaller than the crop; rescale as
//! `(u8 as f64 * rescale_factor) as f32`; normalize in f32 as `(x - mean) / std`.
//! The output is a `(3, H, W)` f32 tensor on the CPU.

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

use super::config::{rescale_normalize, ImageProcessor, ResizeTo};
use super::resample::{resize_rgb8_window, Window};
use super::rgb::as_rgb8_like_pil;
use super::PreprocessError;

/// Longest intermediate (pre-crop) side we accept. Shortest-edge resizing of an extreme aspect
/// ratio (1 x 10^6 px) asks for a huge intermediate image; only the cropped window is computed,
/// but the nearest-neighbour coordinate walk is linear in this length.
const MAX_RESIZED_SIDE: u64 = 1 << 28;

/// `get_resize_output_image_size(..., default_to_square=False)`: the short side becomes `size`,
/// the long side `int(size * long / short)` (truncated). Returns `(width, height)`.
fn shortest_edge_size(width: u32, height: u32, size: u32) -> Result<(u32, u32), PreprocessError> {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // size * long is exact in u64; the f64 division rounds correctly, as Python's int / int does.
    let new_long = (u64::from(size) * u64::from(long)) as f64 / f64::from(short);
    let new_long = new_long as u64;
    if new_long > MAX_RESIZED_SIDE {
        return Err(PreprocessError::ImageTooLarge(format!(
            "a {width}x{height} image would be resized to a side of {new_long} pixels"
        )));
    }
    let new_long = new_long as u32;
    Ok(if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    })
}

/// One axis of transformers' `center_crop`: returns `(source start, destination start, length)`.
/// A larger image is cropped at `(size - crop) // 2`; a smaller one is placed at
/// `ceil((crop - size) / 2)` inside a zero canvas.
fn crop_axis(size: u32, crop: u32) -> (u32, u32, u32) {
    if size >= crop {
        ((size - crop) / 2, 0, crop)
    } else {
        (0, (crop - size).div_ceil(2), size)
    }
}

impl ImageProcessor {
    /// `pixel_values` for one image: a `(3, H, W)` f32 tensor with `(H, W) = output_size()`.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Tensor, PreprocessError> {
        if img.width() == 0 || img.height() == 0 {
            return Err(PreprocessError::InvalidImage(
                "image has zero width or height".into(),
            ));
        }
        let rgb = as_rgb8_like_pil(img);
        let canvas = self.resize_and_crop(&rgb)?;
        let (h, w) = (canvas.height() as usize, canvas.width() as usize);
        let data = rescale_normalize(&canvas, self.rescale, self.normalize.as_ref());
        // (3, H, W): channel-major, as transformers' channels-first numpy array.
        Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
    }

    /// Size of the image after the resize step, `(width, height)`.
    fn resized_size(&self, rgb: &RgbImage) -> Result<(u32, u32), PreprocessError> {
        match self.resize {
            None => Ok(rgb.dimensions()),
            Some(ResizeTo::Exact { height, width }) => Ok((width, height)),
            Some(ResizeTo::ShortestEdge(s)) => shortest_edge_size(rgb.width(), rgb.height(), s),
        }
    }

    /// Resize then center crop, computing only the part of the resized image the crop keeps.
    fn resize_and_crop(&self, rgb: &RgbImage) -> Result<RgbImage, PreprocessError> {
        let (rw, rh) = self.resized_size(rgb)?;
        let (ch, cw) = self.center_crop.unwrap_or((rh, rw));
        let (sx, dx, lw) = crop_axis(rw, cw);
        let (sy, dy, lh) = crop_axis(rh, ch);
        let window = Window {
            x: sx,
            y: sy,
            width: lw,
            height: lh,
        };
        let kept = if self.resize.is_some() {
            resize_rgb8_window(rgb, (rw, rh), window, self.resample)
        } else {
            image::imageops::crop_imm(rgb, sx, sy, lw, lh).to_image()
        };
        if (dx, dy, lw, lh) == (0, 0, cw, ch) {
            return Ok(kept);
        }
        let mut canvas = RgbImage::new(cw, ch);
        image::imageops::replace(&mut canvas, &kept, i64::from(dx), i64::from(dy));
        Ok(canvas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(size: u32, crop: u32) -> ImageProcessor {
        ImageProcessor::from_json_str(&format!(
            r#"{{"image_processor_type": "CLIPImageProcessor", "size": {{"shortest_edge": {size}}},
                "crop_size": {{"height": {crop}, "width": {crop}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn shortest_edge_truncates() {
        // int(48 * 800 / 556) = int(69.06...) = 69; int(224 * 500 / 333) = int(336.33) = 336.
        assert_eq!(shortest_edge_size(800, 556, 48).unwrap(), (69, 48));
        assert_eq!(shortest_edge_size(333, 500, 224).unwrap(), (224, 336));
        assert_eq!(shortest_edge_size(10, 10, 7).unwrap(), (7, 7));
        assert!(shortest_edge_size(1, u32::MAX, 16384).is_err());
    }

    #[test]
    fn crop_axis_matches_transformers_offsets() {
        assert_eq!(crop_axis(69, 48), (10, 0, 48)); // (69 - 48) // 2
        assert_eq!(crop_axis(48, 48), (0, 0, 48));
        assert_eq!(crop_axis(5, 8), (0, 2, 5)); // ceil(3 / 2)
        assert_eq!(crop_axis(6, 8), (0, 1, 6));
    }

    #[test]
    fn small_image_without_resize_is_zero_padded() {
        let p = ImageProcessor::from_json_str(
            r#"{"image_processor_type": "CLIPImageProcessor", "do_resize": false,
                "crop_size": 4, "do_normalize": false}"#,
        )
        .unwrap();
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 3, image::Rgb([255, 255, 255])));
        let t = p.preprocess(&img).unwrap();
        assert_eq!(t.dims(), &[3, 4, 4]);
        let v: Vec<Vec<f32>> = t.get(0).unwrap().to_vec2().unwrap();
        // Rows 1..4 hold the image (offset ceil(1/2) = 1), columns 1..3 (offset ceil(2/2) = 1).
        let expect = [
            [0., 0., 0., 0.],
            [0., 1., 1., 0.],
            [0., 1., 1., 0.],
            [0., 1., 1., 0.],
        ];
        assert_eq!(v, expect.map(|r| r.to_vec()).to_vec());
    }

    #[test]
    fn degenerate_images_never_panic() {
        let p = clip(48, 48);
        for (w, h) in [(1, 1), (1, 500), (500, 1), (2, 3)] {
            let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3])));
            assert_eq!(p.preprocess(&img).unwrap().dims(), &[3, 48, 48]);
        }
        let empty = DynamicImage::ImageRgb8(RgbImage::new(0, 4));
        assert!(p.preprocess(&empty).unwrap_err().is_client_error());
    }

    #[test]
    fn normalization_uses_f32_like_numpy() {
        let p = clip(2, 2);
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 2, image::Rgb([0, 128, 255])));
        let v: Vec<f32> = p
            .preprocess(&img)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The OpenAI CLIP defaults, cast to f32 as numpy does; rescale multiplies by 1/255.
        let mean = [0.48145466f64, 0.4578275, 0.40821073];
        let std = [0.26862954f64, 0.26130258, 0.27577711];
        let want = |v: u8, c: usize| {
            ((f64::from(v) * (1.0 / 255.0)) as f32 - mean[c] as f32) / std[c] as f32
        };
        assert_eq!(v[0], want(0, 0));
        assert_eq!(v[4], want(128, 1));
        assert_eq!(v[8], want(255, 2));
    }
}
