//! Images in requests: `data:image/...;base64,` URLs decoded and preprocessed
//! into the model's `pixel_values` (this runs on a blocking thread).

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use candle_core::Tensor;

use super::ValidationError;
use image::DynamicImage;

use crate::preprocess::{decode_image, ImageProcessor, PreprocessError};

/// Base64 as browsers and SDKs write it, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Image media types accepted in `data:` URLs.
const IMAGE_TYPES: [&str; 5] = ["png", "jpeg", "jpg", "webp", "gif"];

fn bad_image(param: &str, message: String) -> ValidationError {
    ValidationError::Invalid {
        message,
        param: Some(param.to_string()),
        code: "invalid_image",
    }
}

/// Decodes a `data:image/...;base64,` URL and preprocesses the image: (3, H, W).
pub fn load_image(
    url: &str,
    processor: &ImageProcessor,
    param: &str,
) -> Result<Tensor, ValidationError> {
    let img = decode_data_url(url, param)?;
    processor
        .preprocess(&img)
        .map_err(|e| preprocess_error(e, param))
}

/// A preprocessing failure: the client's image (400) or our fault (500).
pub fn preprocess_error(e: PreprocessError, param: &str) -> ValidationError {
    if e.is_client_error() {
        bad_image(param, format!("invalid image: {e}"))
    } else {
        ValidationError::Internal(format!("image preprocessing failed: {e}"))
    }
}

/// Decodes a `data:image/...;base64,` URL into an image.
pub fn decode_data_url(url: &str, param: &str) -> Result<DynamicImage, ValidationError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ValidationError::Invalid {
            message: "only `data:image/...;base64,` image URLs are supported; remote URLs are \
                      not fetched"
                .into(),
            param: Some(param.to_string()),
            code: "invalid_image_url",
        });
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| bad_image(param, "malformed data URL: no `,`".into()))?;
    let media = meta
        .strip_suffix(";base64")
        .ok_or_else(|| bad_image(param, "the data URL must be base64-encoded".into()))?;
    let subtype = media.strip_prefix("image/").unwrap_or("");
    if !IMAGE_TYPES.contains(&subtype) {
        return Err(bad_image(
            param,
            format!("unsupported image type `{media}`: use png, jpeg, webp or gif"),
        ));
    }
    let bytes = BASE64
        .decode(data.trim())
        .map_err(|e| bad_image(param, format!("invalid base64 image data: {e}")))?;
    decode_image(&bytes).map_err(|e| bad_image(param, format!("invalid image: {e}")))
}
