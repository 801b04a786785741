//! [`Idefics3ImageProcessor`]: `Idefics3ImageProcessor` / `SmolVLMImageProcessor` of
//! transformers 5 (PIL backend), and the prompt layout of `Idefics3Processor`.
//!
//! Steps, all resizes on uint8 with the configured filter (Lanczos by default):
//! 1. resize so the longest edge is `size.longest_edge` (the other side truncated, then bumped to
//!    even; both capped at 4096);
//! 2. with `do_image_splitting`: resize both sides up to multiples of `max_image_size.longest_edge`
//!    (M), cut into M x M tiles row-major, and append the global image (the step-2 image resized
//!    to M x M); an image that is already M x M is kept alone with `rows = cols = 0`.
//!    Without splitting: resize to M x M, `rows = cols = 0`;
//! 3. rescale and normalize each frame (mean = std = 0.5 by default);
//! 4. pad every frame to the largest frame (bottom/right zeros, mask 0 there). All frames are
//!    M x M in every configuration, so in practice the mask is all ones.

use candle_core::{Device, Tensor};
use image::{imageops, DynamicImage, RgbImage};
use serde_json::{Map, Value};

use super::{
    err, get, get_bool, parse_object, parse_resample, parse_rescale_normalize, positive,
    processor_type, RescaleNormalize,
};
use crate::preprocess::resample::{resize_rgb8, Resample};
use crate::preprocess::rgb::as_rgb8_like_pil;
use crate::preprocess::PreprocessError;

const IMAGENET_STANDARD: [f64; 3] = [0.5, 0.5, 0.5];
/// transformers' `MAX_IMAGE_SIZE`: no side exceeds this after step 1.
const MAX_IMAGE_SIZE: u32 = 4096;

/// One preprocessed image.
#[derive(Debug)]
pub struct Idefics3Image {
    /// `(n_tiles, 3, H, W)` f32: tiles row-major, then the global image (or one frame).
    pub pixel_values: Tensor,
    /// `(n_tiles, H, W)` u8: 1 for real pixels, 0 for padding.
    pub pixel_attention_mask: Tensor,
    /// Tile rows; 0 when the image was not split.
    pub rows: usize,
    /// Tile columns; 0 when the image was not split.
    pub cols: usize,
}

/// Step 1's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    LongestEdge(u32),
    Exact { height: u32, width: u32 },
}

/// A parsed, validated `Idefics3ImageProcessor` / `SmolVLMImageProcessor` config.
#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3ImageProcessor {
    /// `None` when `do_resize` is false.
    size: Option<Size>,
    resample: Resample,
    /// `max_image_size.longest_edge`: the tile side.
    tile: u32,
    split: bool,
    float: RescaleNormalize,
}

/// The strings `Idefics3Processor` puts around image tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idefics3ImageTokens {
    /// `<fake_token_around_image>`.
    pub fake_token_around_image: String,
    /// `<image>`, repeated `image_seq_len` times per tile.
    pub image_token: String,
    /// `<global-img>`.
    pub global_image_token: String,
}

impl Default for Idefics3ImageTokens {
    fn default() -> Self {
        Self {
            fake_token_around_image: "<fake_token_around_image>".into(),
            image_token: "<image>".into(),
            global_image_token: "<global-img>".into(),
        }
    }
}

/// The text that replaces one `<image>` in the prompt, exactly as `Idefics3Processor` (and
/// SmolVLM's `get_image_prompt_string`) builds it; `rows == cols == 0` is the unsplit form.
pub fn image_prompt_string(
    rows: usize,
    cols: usize,
    image_seq_len: usize,
    tokens: &Idefics3ImageTokens,
) -> String {
    let image = tokens.image_token.repeat(image_seq_len);
    let global = format!(
        "{fake}{global}{image}{fake}",
        fake = tokens.fake_token_around_image,
        global = tokens.global_image_token
    );
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut text = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            text.push_str(&tokens.fake_token_around_image);
            text.push_str(&format!("<row_{r}_col_{c}>"));
            text.push_str(&image);
        }
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&global);
    text
}

/// `_resize_output_size_rescale_to_max_len` then `_resize_output_size_scale_below_upper_bound`:
/// `(height, width)` with Python's float steps.
fn longest_edge_size(height: u32, width: u32, max_len: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let (mut h, mut w) = if width >= height {
        let h = (f64::from(max_len) / aspect) as u32;
        (h + h % 2, max_len)
    } else {
        let w = (f64::from(max_len) * aspect) as u32;
        (max_len, w + w % 2)
    };
    (h, w) = (h.max(1), w.max(1));
    let aspect = f64::from(w) / f64::from(h);
    if w >= h && w > MAX_IMAGE_SIZE {
        (h, w) = ((f64::from(MAX_IMAGE_SIZE) / aspect) as u32, MAX_IMAGE_SIZE);
    } else if h > w && h > MAX_IMAGE_SIZE {
        (h, w) = (MAX_IMAGE_SIZE, (f64::from(MAX_IMAGE_SIZE) * aspect) as u32);
    }
    (h.max(1), w.max(1))
}

/// `resize_for_vision_encoder`: `(height, width)` rounded up to multiples of `tile`, the second
/// side derived from the aspect ratio first.
fn vision_encoder_size(height: u32, width: u32, tile: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let up = |x: u32| x.div_ceil(tile) * tile;
    if width >= height {
        let w = up(width);
        (up((f64::from(w) / aspect) as u32), w)
    } else {
        let h = up(height);
        (h, up((f64::from(h) * aspect) as u32))
    }
}

fn parse_size(v: &Value, key: &str) -> Result<Size, PreprocessError> {
    let side = |k: &str| -> Result<Option<u32>, PreprocessError> {
        match v.get(k).filter(|x| !x.is_null()) {
            None => Ok(None),
            Some(x) => match positive(x, key)? {
                n if n <= u64::from(MAX_IMAGE_SIZE) => Ok(Some(n as u32)),
                n => Err(err(format!("`{key}.{k}` {n} exceeds {MAX_IMAGE_SIZE}"))),
            },
        }
    };
    match (side("longest_edge")?, side("height")?, side("width")?) {
        (Some(n), _, _) => Ok(Size::LongestEdge(n)),
        (None, Some(height), Some(width)) => Ok(Size::Exact { height, width }),
        _ => Err(err(format!(
            "`{key}` must be a dict with `longest_edge` or `height` and `width`, got {v}"
        ))),
    }
}

impl Idefics3ImageProcessor {
    /// Parses and validates the text of a `preprocessor_config.json`.
    pub fn from_json_str(json: &str) -> Result<Self, PreprocessError> {
        Self::from_map(&parse_object(json)?)
    }

    fn from_map(obj: &Map<String, Value>) -> Result<Self, PreprocessError> {
        let name = processor_type(obj)?;
        if name != "Idefics3ImageProcessor" && name != "SmolVLMImageProcessor" {
            return Err(err(format!(
                "image_processor_type `{name}` is not Idefics3ImageProcessor or SmolVLMImageProcessor"
            )));
        }
        let size = if get_bool(obj, "do_resize", true)? {
            Some(
                get(obj, "size")
                    .map_or(Ok(Size::LongestEdge(4 * 364)), |v| parse_size(v, "size"))?,
            )
        } else {
            None
        };
        let tile = match get(obj, "max_image_size") {
            None => 364,
            Some(v) => match parse_size(v, "max_image_size")? {
                Size::LongestEdge(n) => n,
                Size::Exact { .. } => return Err(err("`max_image_size` must give `longest_edge`")),
            },
        };
        Ok(Self {
            size,
            resample: parse_resample(obj, Resample::Lanczos)?,
            tile,
            split: get_bool(obj, "do_image_splitting", true)?,
            float: parse_rescale_normalize(obj, IMAGENET_STANDARD, IMAGENET_STANDARD)?,
        })
    }

    /// `max_image_size.longest_edge`: the side of every tile.
    pub fn tile_size(&self) -> usize {
        self.tile as usize
    }

    /// Pillow resize, or Pillow's copy when the size does not change.
    fn resize(&self, img: RgbImage, height: u32, width: u32) -> RgbImage {
        if img.dimensions() == (width, height) {
            img
        } else {
            resize_rgb8(&img, width, height, self.resample)
        }
    }

    /// The uint8 frames (tiles row-major, then global) and `(rows, cols)`.
    fn frames(&self, img: RgbImage) -> (Vec<RgbImage>, usize, usize) {
        let img = match self.size {
            None => img,
            Some(Size::Exact { height, width }) => self.resize(img, height, width),
            Some(Size::LongestEdge(n)) => {
                let (h, w) = longest_edge_size(img.height(), img.width(), n);
                self.resize(img, h, w)
            }
        };
        let m = self.tile;
        if !self.split {
            return (vec![self.resize(img, m, m)], 0, 0);
        }
        let (h, w) = vision_encoder_size(img.height(), img.width(), m);
        let img = self.resize(img, h, w);
        if h <= m && w <= m {
            return (vec![img], 0, 0);
        }
        // (h - m) // m + 1 == h // m as h is a multiple of m.
        let (rows, cols) = (h / m, w / m);
        let mut frames = Vec::with_capacity((rows * cols + 1) as usize);
        for r in 0..rows {
            for c in 0..cols {
                frames.push(imageops::crop_imm(&img, c * m, r * m, m, m).to_image());
            }
        }
        frames.push(self.resize(img, m, m));
        (frames, rows as usize, cols as usize)
    }

    /// Tiles, mask and grid for one image.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Idefics3Image, PreprocessError> {
        if img.width() == 0 || img.height() == 0 {
            return Err(PreprocessError::InvalidImage(
                "image has zero width or height".into(),
            ));
        }
        let (frames, rows, cols) = self.frames(as_rgb8_like_pil(img).into_owned());
        let ph = frames.iter().map(|f| f.height()).max().unwrap_or(0) as usize;
        let pw = frames.iter().map(|f| f.width()).max().unwrap_or(0) as usize;
        let n = frames.len();
        let mut pixels = vec![0f32; n * 3 * ph * pw];
        let mut mask = vec![0u8; n * ph * pw];
        for (i, frame) in frames.iter().enumerate() {
            let (fh, fw) = (frame.height() as usize, frame.width() as usize);
            let chw = self.float.apply(frame);
            for c in 0..3 {
                for y in 0..fh {
                    let dst = ((i * 3 + c) * ph + y) * pw;
                    let src = (c * fh + y) * fw;
                    pixels[dst..dst + fw].copy_from_slice(&chw[src..src + fw]);
                }
            }
            for y in 0..fh {
                let dst = (i * ph + y) * pw;
                mask[dst..dst + fw].fill(1);
            }
        }
        Ok(Idefics3Image {
            pixel_values: Tensor::from_vec(pixels, (n, 3, ph, pw), &Device::Cpu)?,
            pixel_attention_mask: Tensor::from_vec(mask, (n, ph, pw), &Device::Cpu)?,
            rows,
            cols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers_rounding() {
        // 800x556 → width 128, height int(128 / (800/556)) = 88 (even).
        assert_eq!(longest_edge_size(556, 800, 128), (88, 128));
        // 20x14 → int(128 / (20/14)) = 89, bumped to even 90.
        assert_eq!(longest_edge_size(14, 20, 128), (90, 128));
        // Portrait 45x80 → width int(128 * 0.5625) = 72.
        assert_eq!(longest_edge_size(80, 45, 128), (128, 72));
        assert_eq!(longest_edge_size(10, 10, 5000), (4096, 4096));
        assert_eq!(vision_encoder_size(90, 128, 32), (96, 128));
        assert_eq!(vision_encoder_size(128, 72, 64), (128, 128));
    }

    #[test]
    fn prompt_string_layouts() {
        let t = Idefics3ImageTokens {
            fake_token_around_image: "<F>".into(),
            image_token: "<I>".into(),
            global_image_token: "<G>".into(),
        };
        assert_eq!(image_prompt_string(0, 0, 2, &t), "<F><G><I><I><F>");
        assert_eq!(
            image_prompt_string(2, 1, 1, &t),
            "<F><row_1_col_1><I>\n<F><row_2_col_1><I>\n\n<F><G><I><F>"
        );
    }

    #[test]
    fn config_validation() {
        let ok = r#"{"image_processor_type": "SmolVLMImageProcessorFast"}"#;
        let p = Idefics3ImageProcessor::from_json_str(ok).unwrap();
        assert_eq!((p.tile_size(), p.resample), (364, Resample::Lanczos));
        for bad in [
            r#"{"image_processor_type": "Qwen2VLImageProcessor"}"#,
            r#"{"image_processor_type": "Idefics3ImageProcessor", "size": {"shortest_edge": 3}}"#,
            r#"{"image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"longest_edge": 0}}"#,
        ] {
            assert!(Idefics3ImageProcessor::from_json_str(bad).is_err(), "{bad}");
        }
    }
}
