//! Image processors of vision-language models whose output size depends on the input image:
//! Qwen2-VL / Qwen2.5-VL (`qwen2vl`: dynamic resolution, flattened patches) and Idefics3 /
//! SmolVLM (`idefics3`: image splitting into tiles plus a global image).
//!
//! Like the CLIP/SigLIP processor they reproduce transformers 5's PIL backend
//! (`Qwen2VLImageProcessorPil`, `Idefics3ImageProcessorPil`, `SmolVLMImageProcessorPil`): RGB
//! conversion and resizing on uint8 with Pillow's algorithms, then `(u8 as f64 * rescale) as f32`
//! and `(x - mean) / std` in f32. This module holds what both share: JSON helpers and the
//! rescale/normalize step.

mod idefics3;
mod qwen2vl;

#[cfg(test)]
mod reference_tests;

pub use idefics3::{
    image_prompt_string, Idefics3Image, Idefics3ImageProcessor, Idefics3ImageTokens,
};
pub use qwen2vl::{smart_resize, Qwen2VlImage, Qwen2VlImageProcessor};

use image::RgbImage;
use serde_json::{Map, Value};

use super::config::{rescale_normalize, Normalize};
use super::resample::Resample;
use super::PreprocessError;

/// Largest side or pixel count a config may ask for: far above any model's input, small enough
/// that a bad config cannot ask for gigabytes per image.
const MAX_CONFIG_VALUE: u64 = 1 << 28;

fn err(msg: impl Into<String>) -> PreprocessError {
    PreprocessError::Config(msg.into())
}

/// The config file as a JSON object; errors name the file.
fn parse_object(json: &str) -> Result<Map<String, Value>, PreprocessError> {
    match serde_json::from_str(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(err("the config must be a JSON object")),
        Err(e) => Err(err(format!("not valid JSON: {e}"))),
    }
}

/// A key's value, with JSON `null` treated as absent (transformers then uses the class default).
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn get_bool(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, PreprocessError> {
    match get(obj, key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| err(format!("`{key}` must be a boolean, got {v}"))),
    }
}

/// A positive integer no larger than [`MAX_CONFIG_VALUE`].
fn positive(v: &Value, key: &str) -> Result<u64, PreprocessError> {
    match v.as_u64() {
        Some(n) if (1..=MAX_CONFIG_VALUE).contains(&n) => Ok(n),
        _ => Err(err(format!(
            "`{key}` must be an integer in 1..={MAX_CONFIG_VALUE}, got {v}"
        ))),
    }
}

fn get_positive(obj: &Map<String, Value>, key: &str, default: u64) -> Result<u64, PreprocessError> {
    get(obj, key).map_or(Ok(default), |v| positive(v, key))
}

/// `image_processor_type` with a `Fast` / `Pil` suffix removed.
fn processor_type(obj: &Map<String, Value>) -> Result<&str, PreprocessError> {
    let name = get(obj, "image_processor_type")
        .and_then(Value::as_str)
        .ok_or_else(|| err("`image_processor_type` must be set to a string"))?;
    Ok(name
        .strip_suffix("Fast")
        .or_else(|| name.strip_suffix("Pil"))
        .unwrap_or(name))
}

/// `resample` as a PIL filter code, with the class default.
fn parse_resample(
    obj: &Map<String, Value>,
    default: Resample,
) -> Result<Resample, PreprocessError> {
    match get(obj, "resample") {
        None => Ok(default),
        Some(v) => v.as_u64().and_then(Resample::from_pil_code).ok_or_else(|| {
            err(format!(
                "`resample` must be a PIL filter code 0..=5, got {v}"
            ))
        }),
    }
}

fn channels(
    obj: &Map<String, Value>,
    key: &str,
    default: [f64; 3],
) -> Result<[f32; 3], PreprocessError> {
    let num = |v: &Value| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| err(format!("`{key}` must hold finite numbers, got {v}")))
    };
    let values = match get(obj, key) {
        None => default,
        Some(Value::Array(items)) if items.len() == 3 => {
            [num(&items[0])?, num(&items[1])?, num(&items[2])?]
        }
        Some(v @ Value::Number(_)) => [num(v)?; 3],
        Some(v) => {
            return Err(err(format!(
                "`{key}` must be a number or 3 numbers, got {v}"
            )))
        }
    };
    // numpy builds the mean/std arrays in the image dtype, float32.
    Ok(values.map(|x| x as f32))
}

/// `do_rescale` + `rescale_factor` and `do_normalize` + `image_mean` / `image_std`.
fn parse_rescale_normalize(
    obj: &Map<String, Value>,
    mean: [f64; 3],
    std: [f64; 3],
) -> Result<RescaleNormalize, PreprocessError> {
    let rescale = if get_bool(obj, "do_rescale", true)? {
        let factor = match get(obj, "rescale_factor") {
            None => 1.0 / 255.0,
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err(format!("`rescale_factor` must be a finite number, got {v}")))?,
        };
        Some(factor)
    } else {
        None
    };
    let normalize = if get_bool(obj, "do_normalize", true)? {
        let std = channels(obj, "image_std", std)?;
        if std.contains(&0.0) {
            return Err(err("`image_std` must not contain zero"));
        }
        Some(Normalize {
            mean: channels(obj, "image_mean", mean)?,
            std,
        })
    } else {
        None
    };
    Ok(RescaleNormalize { rescale, normalize })
}

/// The float part of the pipeline, after all uint8 work.
#[derive(Clone, Debug, PartialEq)]
struct RescaleNormalize {
    /// `rescale_factor`; `None` when `do_rescale` is false.
    rescale: Option<f64>,
    /// `None` when `do_normalize` is false.
    normalize: Option<Normalize>,
}

impl RescaleNormalize {
    /// uint8 HWC → f32 CHW, `(3, H, W)` flattened, as numpy computes it.
    fn apply(&self, img: &RgbImage) -> Vec<f32> {
        rescale_normalize(img, self.rescale, self.normalize.as_ref())
    }
}
