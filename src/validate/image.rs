//! Images in requests: `data:image/...;base64,` URLs checked against the
//! [`ImageLimits`] (encoded size before base64 decoding, declared size before
//! pixel decoding), decoded, and preprocessed into the model's `pixel_values`
//! (this runs on a blocking thread). Each refusal has its own error `code`.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use candle_core::Tensor;

use super::ValidationError;
use image::DynamicImage;

use crate::openai::excerpt;
use crate::preprocess::{decode_image, ImageLimits, ImageProcessor, PreprocessError};

/// Base64 as browsers and SDKs write it, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Image media types accepted in `data:` URLs.
const IMAGE_TYPES: [&str; 5] = ["png", "jpeg", "jpg", "webp", "gif"];

fn refuse(param: &str, code: &'static str, message: String) -> ValidationError {
    ValidationError::Invalid {
        message,
        param: Some(param.to_string()),
        code,
    }
}

/// Decodes a `data:image/...;base64,` URL and preprocesses the image: (3, H, W).
pub fn load_image(
    url: &str,
    processor: &ImageProcessor,
    limits: &ImageLimits,
    param: &str,
) -> Result<Tensor, ValidationError> {
    let img = decode_data_url(url, limits, param)?;
    processor
        .preprocess(&img)
        .map_err(|e| preprocess_error(e, param))
}

/// A decoding or preprocessing failure: the client's image (400, with a code
/// per reason) or our fault (500).
pub fn preprocess_error(e: PreprocessError, param: &str) -> ValidationError {
    let code = match &e {
        PreprocessError::InvalidImage(_) => "invalid_image",
        PreprocessError::UnsupportedFormat(_) => "unsupported_image_format",
        PreprocessError::ImageTooLarge(_) => "image_too_large",
        PreprocessError::ImageTooSmall(_) => "image_too_small",
        PreprocessError::AspectRatio(_) => "image_aspect_ratio",
        PreprocessError::Config(_) | PreprocessError::Tensor(_) => {
            return ValidationError::Internal(format!("image preprocessing failed: {e}"))
        }
    };
    refuse(param, code, e.to_string())
}

/// The image bytes of a `data:image/...;base64,` URL, size-checked before
/// base64 decoding.
fn data_url_bytes(
    url: &str,
    limits: &ImageLimits,
    param: &str,
) -> Result<Vec<u8>, ValidationError> {
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some("http" | "https")) {
            return Err(refuse(
                param,
                "remote_image_url",
                "remote image URLs are not fetched; send the image inline as a \
                 `data:image/...;base64,` URL"
                    .into(),
            ));
        }
        return Err(refuse(
            param,
            "invalid_image_url",
            "an image URL must be a `data:image/{png,jpeg,webp,gif};base64,...` URL".into(),
        ));
    };
    let (meta, data) = rest.split_once(',').ok_or_else(|| {
        refuse(
            param,
            "invalid_image_url",
            "malformed data URL: no `,`".into(),
        )
    })?;
    let media = meta.strip_suffix(";base64").ok_or_else(|| {
        refuse(
            param,
            "invalid_image_url",
            "the data URL must be base64-encoded (`;base64,`)".into(),
        )
    })?;
    let subtype = media.strip_prefix("image/").unwrap_or("");
    if !IMAGE_TYPES.contains(&subtype) {
        return Err(refuse(
            param,
            "unsupported_image_format",
            format!(
                "unsupported media type `{}`: use image/png, image/jpeg, image/webp or image/gif",
                excerpt(media)
            ),
        ));
    }
    let data = data.trim();
    // Every 4 base64 characters hold 3 bytes, less at most 2 of padding.
    let at_least = (data.len() / 4 * 3).saturating_sub(2);
    limits
        .check_bytes(at_least)
        .map_err(|e| preprocess_error(e, param))?;
    BASE64.decode(data).map_err(|e| {
        refuse(
            param,
            "invalid_image",
            format!("invalid base64 image data: {e}"),
        )
    })
}

/// Decodes a `data:image/...;base64,` URL into an image within `limits`.
pub fn decode_data_url(
    url: &str,
    limits: &ImageLimits,
    param: &str,
) -> Result<DynamicImage, ValidationError> {
    let bytes = data_url_bytes(url, limits, param)?;
    decode_image(&bytes, limits).map_err(|e| preprocess_error(e, param))
}
