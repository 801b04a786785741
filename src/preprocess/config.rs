//! `preprocessor_config.json` → a validated [`ImageProcessor`].
//!
//! Supports the CLIP and SigLIP image processors as written by transformers 4.x and 5.x
//! (`CLIPImageProcessor`, `SiglipImageProcessor`, their `*Fast` / `*Pil` names, and the old
//! `"feature_extractor_type": "CLIPFeatureExtractor"`). Keys absent or `null` take the class
//! defaults of transformers 5; unknown keys are ignored. Size semantics follow `get_size_dict`:
//! a bare int `size` means `{"shortest_edge": n}` (both classes set `default_to_square = False`,
//! overridable by a `default_to_square` key), a bare int `crop_size` means a square, and a
//! two-element list means `[height, width]`. Anything whose output size would depend on the input
//! image (shortest-edge resize without center crop), and features these processors never use
//! (`do_pad`, `longest_edge`, `max_height`), are rejected as config errors at startup.

use serde_json::{Map, Value};

use super::resample::Resample;
use super::PreprocessError;

const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];
/// Largest accepted `size` / `crop_size` side: far above any ViT input, small enough that a bad
/// config cannot ask for gigabytes per image.
const MAX_SIDE: u64 = 16384;

/// The two supported algorithms; they differ only in their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Clip,
    Siglip,
}

/// How the image is resized before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResizeTo {
    /// Shorter side to this length, the other side scaled and truncated (torchvision semantics).
    ShortestEdge(u32),
    /// Exactly this size, ignoring the aspect ratio.
    Exact { height: u32, width: u32 },
}

/// Per-channel mean and std in f32, as numpy casts them before `(x - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Normalize {
    pub(super) mean: [f32; 3],
    pub(super) std: [f32; 3],
}

/// A parsed, validated image processor: everything `preprocess` needs, nothing optional left.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// `None` when `do_resize` is false.
    pub(super) resize: Option<ResizeTo>,
    pub(super) resample: Resample,
    /// `(height, width)`; `None` when `do_center_crop` is false.
    pub(super) center_crop: Option<(u32, u32)>,
    /// `rescale_factor`; `None` when `do_rescale` is false.
    pub(super) rescale: Option<f64>,
    /// `None` when `do_normalize` is false.
    pub(super) normalize: Option<Normalize>,
    /// `do_convert_rgb`; informational, since the model needs RGB either way.
    pub(super) convert_rgb: bool,
}

fn err(msg: impl Into<String>) -> PreprocessError {
    PreprocessError::Config(msg.into())
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

fn get_f64(v: &Value, key: &str) -> Result<f64, PreprocessError> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| err(format!("`{key}` must be a finite number, got {v}")))
}

fn side(v: &Value, key: &str) -> Result<u32, PreprocessError> {
    match v.as_u64() {
        Some(n) if (1..=MAX_SIDE).contains(&n) => Ok(n as u32),
        _ => Err(err(format!(
            "`{key}` sizes must be integers in 1..={MAX_SIDE}, got {v}"
        ))),
    }
}

/// `get_size_dict` for the key sets these processors can produce.
fn parse_size(v: &Value, key: &str, default_to_square: bool) -> Result<ResizeTo, PreprocessError> {
    match v {
        Value::Number(_) if default_to_square => {
            let n = side(v, key)?;
            Ok(ResizeTo::Exact {
                height: n,
                width: n,
            })
        }
        Value::Number(_) => Ok(ResizeTo::ShortestEdge(side(v, key)?)),
        Value::Array(hw) if hw.len() == 2 => Ok(ResizeTo::Exact {
            height: side(&hw[0], key)?,
            width: side(&hw[1], key)?,
        }),
        Value::Object(map) => {
            let mut keys: Vec<&str> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k.as_str())
                .collect();
            keys.sort_unstable();
            match keys.as_slice() {
                ["height", "width"] => Ok(ResizeTo::Exact {
                    height: side(&map["height"], key)?,
                    width: side(&map["width"], key)?,
                }),
                ["shortest_edge"] => Ok(ResizeTo::ShortestEdge(side(&map["shortest_edge"], key)?)),
                other => Err(err(format!(
                    "`{key}` with keys {other:?} is not supported (expected height+width or shortest_edge)"
                ))),
            }
        }
        other => Err(err(format!(
            "`{key}` must be an int, [height, width] or a dict, got {other}"
        ))),
    }
}

/// `image_mean` / `image_std`: one number for all channels or exactly three.
fn parse_channels(
    obj: &Map<String, Value>,
    key: &str,
    default: [f64; 3],
) -> Result<[f32; 3], PreprocessError> {
    let values = match get(obj, key) {
        None => default,
        Some(Value::Array(items)) if items.len() == 3 => [
            get_f64(&items[0], key)?,
            get_f64(&items[1], key)?,
            get_f64(&items[2], key)?,
        ],
        Some(v @ Value::Number(_)) => [get_f64(v, key)?; 3],
        Some(v) => {
            return Err(err(format!(
                "`{key}` must be a number or 3 numbers, got {v}"
            )))
        }
    };
    // numpy builds the mean/std arrays in the image dtype, float32.
    Ok(values.map(|x| x as f32))
}

fn kind_of(obj: &Map<String, Value>) -> Result<Kind, PreprocessError> {
    if let Some(v) = get(obj, "image_processor_type") {
        let name = v
            .as_str()
            .ok_or_else(|| err("`image_processor_type` must be a string"))?;
        let base = name
            .strip_suffix("Fast")
            .or_else(|| name.strip_suffix("Pil"))
            .unwrap_or(name);
        return match base {
            "CLIPImageProcessor" => Ok(Kind::Clip),
            "SiglipImageProcessor" => Ok(Kind::Siglip),
            _ => Err(err(format!(
                "image_processor_type `{name}` is not supported (supported: CLIPImageProcessor, SiglipImageProcessor)"
            ))),
        };
    }
    match get(obj, "feature_extractor_type").and_then(Value::as_str) {
        Some("CLIPFeatureExtractor") => Ok(Kind::Clip),
        Some(other) => Err(err(format!(
            "feature_extractor_type `{other}` is not supported"
        ))),
        None => Err(err(
            "neither `image_processor_type` nor `feature_extractor_type` is set",
        )),
    }
}

/// `do_resize` + `size` (+ `default_to_square` for a bare int), with the class defaults.
fn parse_resize(obj: &Map<String, Value>, kind: Kind) -> Result<Option<ResizeTo>, PreprocessError> {
    if !get_bool(obj, "do_resize", true)? {
        return Ok(None);
    }
    let default_to_square = get_bool(obj, "default_to_square", false)?;
    Ok(Some(match get(obj, "size") {
        Some(v) => parse_size(v, "size", default_to_square)?,
        None if kind == Kind::Clip => ResizeTo::ShortestEdge(224),
        None => ResizeTo::Exact {
            height: 224,
            width: 224,
        },
    }))
}

/// `do_center_crop` + `crop_size` as `(height, width)`; CLIP crops to 224 by default, SigLIP
/// does not crop.
fn parse_center_crop(
    obj: &Map<String, Value>,
    kind: Kind,
) -> Result<Option<(u32, u32)>, PreprocessError> {
    if !get_bool(obj, "do_center_crop", kind == Kind::Clip)? {
        return Ok(None);
    }
    let crop = match get(obj, "crop_size") {
        Some(v) => parse_size(v, "crop_size", true)?,
        None if kind == Kind::Clip => ResizeTo::Exact {
            height: 224,
            width: 224,
        },
        None => return Err(err("`do_center_crop` is true but `crop_size` is not set")),
    };
    match crop {
        ResizeTo::Exact { height, width } => Ok(Some((height, width))),
        ResizeTo::ShortestEdge(_) => Err(err("`crop_size` must give height and width")),
    }
}

/// `do_normalize` + `image_mean` / `image_std`, defaulting to the class constants.
fn parse_normalize(
    obj: &Map<String, Value>,
    kind: Kind,
) -> Result<Option<Normalize>, PreprocessError> {
    if !get_bool(obj, "do_normalize", true)? {
        return Ok(None);
    }
    let (mean, std) = match kind {
        Kind::Clip => (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        Kind::Siglip => (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    };
    let mean = parse_channels(obj, "image_mean", mean)?;
    let std = parse_channels(obj, "image_std", std)?;
    if std.contains(&0.0) {
        return Err(err("`image_std` must not contain zero"));
    }
    Ok(Some(Normalize { mean, std }))
}

impl ImageProcessor {
    /// Parses and validates the text of a `preprocessor_config.json`.
    pub fn from_json_str(json: &str) -> Result<Self, PreprocessError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err("the config must be a JSON object"))?;
        Self::from_map(obj)
    }

    fn from_map(obj: &Map<String, Value>) -> Result<Self, PreprocessError> {
        let kind = kind_of(obj)?;
        if get_bool(obj, "do_pad", false)? {
            return Err(err("`do_pad` is not supported for CLIP/SigLIP processors"));
        }
        let resample = match get(obj, "resample") {
            None => Resample::Bicubic,
            Some(v) => v
                .as_u64()
                .and_then(Resample::from_pil_code)
                .ok_or_else(|| {
                    err(format!(
                        "`resample` must be a PIL filter code 0..=5, got {v}"
                    ))
                })?,
        };
        let rescale = if get_bool(obj, "do_rescale", true)? {
            Some(
                get(obj, "rescale_factor")
                    .map_or(Ok(1.0 / 255.0), |v| get_f64(v, "rescale_factor"))?,
            )
        } else {
            None
        };
        let processor = Self {
            resize: parse_resize(obj, kind)?,
            resample,
            center_crop: parse_center_crop(obj, kind)?,
            rescale,
            normalize: parse_normalize(obj, kind)?,
            convert_rgb: get_bool(obj, "do_convert_rgb", true)?,
        };
        processor.fixed_output_size().ok_or_else(|| {
            err("the output size would depend on the input image: use do_center_crop or a size with height and width")
        })?;
        Ok(processor)
    }

    /// `(height, width)` of the output when it does not depend on the input image.
    fn fixed_output_size(&self) -> Option<(u32, u32)> {
        match (self.center_crop, self.resize) {
            (Some(hw), _) => Some(hw),
            (None, Some(ResizeTo::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// `(height, width)` of `pixel_values` for every input image.
    pub fn output_size(&self) -> (usize, usize) {
        // Construction guarantees a fixed size; (0, 0) is unreachable.
        let (h, w) = self.fixed_output_size().unwrap_or((0, 0));
        (h as usize, w as usize)
    }

    /// Whether `do_convert_rgb` was set. Non-RGB inputs are converted regardless (the model needs
    /// three channels; transformers would fail on them when this is false).
    pub fn converts_rgb(&self) -> bool {
        self.convert_rgb
    }
}

#[cfg(test)]
mod tests;

/// uint8 HWC → f32 CHW, `(3, H, W)` flattened, as numpy computes it: rescale as
/// `(u8 as f64 * factor) as f32`, then normalize in f32 as `(x - mean) / std`.
pub(super) fn rescale_normalize(
    img: &image::RgbImage,
    rescale: Option<f64>,
    normalize: Option<&Normalize>,
) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let v = px.0[c];
            let mut x = match rescale {
                Some(factor) => (f64::from(v) * factor) as f32,
                None => f32::from(v),
            };
            if let Some(n) = normalize {
                x = (x - n.mean[c]) / n.std[c];
            }
            out[c * plane + i] = x;
        }
    }
    out
}
