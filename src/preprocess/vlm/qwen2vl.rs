//! [`Qwen2VlImageProcessor`]: `Qwen2VLImageProcessor` of transformers 5 (PIL backend), used by
//! Qwen2-VL and Qwen2.5-VL.
//!
//! The image is resized by [`smart_resize`] to sides that are multiples of
//! `patch_size * merge_size` with a pixel count in `[min_pixels, max_pixels]`, rescaled and
//! normalized, then cut into `patch_size` squares. Each patch is repeated `temporal_patch_size`
//! times (a still image is a video of identical frames) and flattened to one row of
//! `C * T * P * P` values; rows are ordered merge window by merge window, so the
//! `merge_size x merge_size` patches that the model merges into one token are consecutive.
//!
//! Config keys: `size: {shortest_edge, longest_edge}` (pixel counts: min and max), overridden by
//! top-level `min_pixels` / `max_pixels` as in the Qwen2-VL hub configs; `size: {min_pixels,
//! max_pixels}` is accepted as an alias (transformers 4 read it; transformers 5 rejects it at
//! preprocessing time).

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde_json::{Map, Value};

use super::{
    err, get, get_bool, get_positive, parse_object, parse_resample, parse_rescale_normalize,
    positive, processor_type, RescaleNormalize,
};
use crate::preprocess::resample::{resize_rgb8, Resample};
use crate::preprocess::rgb::as_rgb8_like_pil;
use crate::preprocess::PreprocessError;

const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// Class defaults of `size`: 56 * 56 and 28 * 28 * 1280 pixels.
const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
/// `smart_resize` rejects images more elongated than this.
const MAX_ASPECT_RATIO: f64 = 200.0;

/// One preprocessed image.
#[derive(Debug)]
pub struct Qwen2VlImage {
    /// `(grid_t * grid_h * grid_w, C * T * P * P)` f32, rows in merge-window order.
    pub patches: Tensor,
    /// `[grid_t, grid_h, grid_w]` in patches (`grid_t` is 1 for an image).
    pub grid_thw: [usize; 3],
}

/// A parsed, validated `Qwen2VLImageProcessor` config.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2VlImageProcessor {
    /// `do_resize`; without it the image sides must already be multiples of the factor.
    resize: bool,
    resample: Resample,
    min_pixels: u64,
    max_pixels: u64,
    patch_size: usize,
    temporal_patch_size: usize,
    merge_size: usize,
    float: RescaleNormalize,
}

/// Python's `round` on a non-negative float: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// transformers' `smart_resize`: `(height, width)` divisible by `factor`, with about the input's
/// aspect ratio and a pixel count in `[min_pixels, max_pixels]` (rounding can leave it slightly
/// outside). Float steps are done in f64 in Python's order, so borderline cases round the same.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), PreprocessError> {
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    if height == 0 || width == 0 || h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return Err(PreprocessError::AspectRatio(format!(
            "a {width}x{height} image has an aspect ratio above {MAX_ASPECT_RATIO}"
        )));
    }
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    // Python compares ints here; the products are exact in f64 (< 2^53).
    let area = (u64::from(height) * u64::from(width)) as f64;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    let limit = f64::from(u32::MAX);
    if h_bar < 1.0 || w_bar < 1.0 || h_bar > limit || w_bar > limit {
        return Err(PreprocessError::InvalidImage(format!(
            "a {width}x{height} image cannot be resized to a {h_bar}x{w_bar} grid"
        )));
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// `(min_pixels, max_pixels)`: `size` first, then the top-level keys override it.
fn parse_pixels(obj: &Map<String, Value>) -> Result<(u64, u64), PreprocessError> {
    let (mut min, mut max) = (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS);
    match get(obj, "size") {
        None => {}
        Some(Value::Object(size)) => {
            for (key, value) in size.iter().filter(|(_, v)| !v.is_null()) {
                match key.as_str() {
                    "shortest_edge" | "min_pixels" => min = positive(value, "size.shortest_edge")?,
                    "longest_edge" | "max_pixels" => max = positive(value, "size.longest_edge")?,
                    other => return Err(err(format!("`size.{other}` is not supported"))),
                }
            }
        }
        Some(v) => return Err(err(format!("`size` must be a dict, got {v}"))),
    }
    min = get_positive(obj, "min_pixels", min)?;
    max = get_positive(obj, "max_pixels", max)?;
    if min > max {
        return Err(err(format!("min_pixels {min} exceeds max_pixels {max}")));
    }
    Ok((min, max))
}

impl Qwen2VlImageProcessor {
    /// Parses and validates the text of a `preprocessor_config.json`.
    pub fn from_json_str(json: &str) -> Result<Self, PreprocessError> {
        Self::from_map(&parse_object(json)?)
    }

    fn from_map(obj: &Map<String, Value>) -> Result<Self, PreprocessError> {
        let name = processor_type(obj)?;
        if name != "Qwen2VLImageProcessor" {
            return Err(err(format!(
                "image_processor_type `{name}` is not Qwen2VLImageProcessor"
            )));
        }
        let (min_pixels, max_pixels) = parse_pixels(obj)?;
        let small = |key: &str, default: u64| -> Result<usize, PreprocessError> {
            match get_positive(obj, key, default)? {
                n if n <= 1024 => Ok(n as usize),
                n => Err(err(format!("`{key}` {n} is implausibly large"))),
            }
        };
        Ok(Self {
            resize: get_bool(obj, "do_resize", true)?,
            resample: parse_resample(obj, Resample::Bicubic)?,
            min_pixels,
            max_pixels,
            patch_size: small("patch_size", 14)?,
            temporal_patch_size: small("temporal_patch_size", 2)?,
            merge_size: small("merge_size", 2)?,
            float: parse_rescale_normalize(obj, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)?,
        })
    }

    /// `patch_size * merge_size`: every resized side is a multiple of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// `merge_size`: patches merged per side into one LLM token.
    pub fn merge_size(&self) -> usize {
        self.merge_size
    }

    /// Number of image placeholder tokens the model consumes for a grid: `t * h * w / merge²`.
    pub fn num_image_tokens(&self, grid: [usize; 3]) -> usize {
        grid[0] * grid[1] * grid[2] / (self.merge_size * self.merge_size)
    }

    /// The `[1, grid_h, grid_w]` an image of this size will get, without processing it.
    pub fn grid_for(&self, width: u32, height: u32) -> Result<[usize; 3], PreprocessError> {
        let (h, w) = if self.resize {
            let f = self.factor() as u32;
            smart_resize(height, width, f, self.min_pixels, self.max_pixels)?
        } else {
            self.check_unresized(width, height)?;
            (height, width)
        };
        Ok([
            1,
            h as usize / self.patch_size,
            w as usize / self.patch_size,
        ])
    }

    fn check_unresized(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        let f = self.factor() as u32;
        if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            return Err(PreprocessError::InvalidImage(format!(
                "without do_resize the image sides must be multiples of {f}, got {width}x{height}"
            )));
        }
        Ok(())
    }

    /// Patches and grid for one image.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Qwen2VlImage, PreprocessError> {
        let rgb = as_rgb8_like_pil(img);
        let [_, gh, gw] = self.grid_for(rgb.width(), rgb.height())?;
        let (w, h) = ((gw * self.patch_size) as u32, (gh * self.patch_size) as u32);
        let chw = if (w, h) == rgb.dimensions() {
            // Pillow returns a copy when the size is unchanged; so does resize_rgb8.
            self.float.apply(&rgb)
        } else {
            self.float.apply(&resize_rgb8(&rgb, w, h, self.resample))
        };
        let rows = gh * gw;
        let data = self.patchify(&chw, gh, gw);
        let cols = data.len() / rows;
        Ok(Qwen2VlImage {
            // (grid_h * grid_w, C * T * P * P)
            patches: Tensor::from_vec(data, (rows, cols), &Device::Cpu)?,
            grid_thw: [1, gh, gw],
        })
    }

    /// `(3, gh*P, gw*P)` CHW → rows `(gh/m, gw/m, m, m)` of `(C, T, P, P)`, as transformers'
    /// reshape to `(C, gh/m, m, P, gw/m, m, P)`, transpose `(1, 4, 2, 5, 0, 3, 6)` and broadcast
    /// over the temporal axis.
    fn patchify(&self, chw: &[f32], gh: usize, gw: usize) -> Vec<f32> {
        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let width = gw * p;
        let plane = gh * p * width;
        let mut out = Vec::with_capacity(chw.len() * t);
        for (bh, bw) in (0..gh / m).flat_map(|bh| (0..gw / m).map(move |bw| (bh, bw))) {
            for (mh, mw) in (0..m).flat_map(|mh| (0..m).map(move |mw| (mh, mw))) {
                let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                for c in 0..3 {
                    for _ in 0..t {
                        for y in y0..y0 + p {
                            let start = c * plane + y * width + x0;
                            out.extend_from_slice(&chw[start..start + p]);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_python() {
        // Values computed with transformers' smart_resize (factor 28).
        assert_eq!(smart_resize(512, 512, 28, 3136, 50176).unwrap(), (224, 224));
        assert_eq!(smart_resize(14, 20, 28, 3136, 12544).unwrap(), (56, 84));
        // 70 / 28 = 2.5 rounds to 2 and 98 / 28 = 3.5 to 4 (half to even).
        assert_eq!(smart_resize(70, 98, 28, 3136, 12544).unwrap(), (56, 112));
        assert!(smart_resize(1, 201, 28, 3136, 12544).is_err());
        assert!(smart_resize(0, 5, 28, 3136, 12544).is_err());
    }

    #[test]
    fn patchify_orders_merge_windows_then_channels_time_rows() {
        let p = Qwen2VlImageProcessor::from_json_str(
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 1,
                "merge_size": 2, "temporal_patch_size": 2}"#,
        )
        .unwrap();
        // A 3x2x4 CHW image whose value encodes (c, y, x) as c*100 + y*10 + x.
        let chw: Vec<f32> = (0..3)
            .flat_map(|c| {
                (0..2).flat_map(move |y| (0..4).map(move |x| (c * 100 + y * 10 + x) as f32))
            })
            .collect();
        let out = p.patchify(&chw, 2, 4);
        assert_eq!(out.len(), 8 * 6);
        // Row 0: window (0,0), patch (0,0); row 1: patch (0,1); row 2: patch (1,0); row 4: window (0,1).
        assert_eq!(&out[0..6], &[0., 0., 100., 100., 200., 200.]);
        assert_eq!(&out[6..12], &[1., 1., 101., 101., 201., 201.]);
        assert_eq!(&out[12..18], &[10., 10., 110., 110., 210., 210.]);
        assert_eq!(&out[24..30], &[2., 2., 102., 102., 202., 202.]);
    }

    #[test]
    fn config_keys_and_tokens() {
        let p = Qwen2VlImageProcessor::from_json_str(
            r#"{"image_processor_type": "Qwen2VLImageProcessorFast",
                "size": {"shortest_edge": 100, "longest_edge": 1000}, "max_pixels": 2000}"#,
        )
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (100, 2000));
        assert_eq!(p.num_image_tokens([1, 16, 16]), 64);
        let bad = r#"{"image_processor_type": "CLIPImageProcessor"}"#;
        assert!(Qwen2VlImageProcessor::from_json_str(bad).is_err());
        let inverted = r#"{"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 9, "max_pixels": 4}"#;
        assert!(Qwen2VlImageProcessor::from_json_str(inverted).is_err());
    }
}
