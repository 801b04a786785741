//! Image preprocessing: uploaded bytes → `pixel_values`, exactly as the Hugging Face image
//! processor of the model computes them with its PIL backend.
//!
//! The pipeline is `decode_image` (format sniffing, first frame, EXIF orientation), then
//! [`ImageProcessor::preprocess`]: RGB conversion (alpha composited on white, as transformers 5's
//! `convert_to_rgb`), Pillow-exact resize, center crop (zero padding when too small), rescale and
//! normalize. Sub-modules:
//! - `limits`: what an upload may be (bytes, declared size, aspect ratio), checked before decoding.
//! - `decode`: bytes → `DynamicImage`.
//! - `rgb`: `DynamicImage` → 8-bit RGB the way `PIL.Image.convert` / `alpha_composite` do it.
//! - `resample`: Pillow's `Image.resize` (ImagingResample / nearest affine), bit-exact on uint8.
//! - `config`: parsing and validating `preprocessor_config.json`; `source`: finding it.
//! - `processor`: the pipeline itself.
//! - `vlm`: the dynamic-resolution processors of Qwen2-VL and Idefics3 / SmolVLM.

mod config;
mod decode;
mod jpeg;
mod limits;
mod processor;
mod resample;
mod rgb;
mod source;
mod vlm;

#[cfg(test)]
mod reference_tests;

pub use config::ImageProcessor;
pub use decode::decode_image;
pub use limits::ImageLimits;
pub use resample::{resize_rgb8, resize_rgb8_window, Resample, Window};
pub use rgb::to_rgb8_like_pil;
pub use source::read_image_processor;
pub use vlm::{
    image_prompt_string, smart_resize, Idefics3Image, Idefics3ImageProcessor, Idefics3ImageTokens,
    Qwen2VlImage, Qwen2VlImageProcessor,
};

/// Everything that can go wrong between uploaded bytes and `pixel_values`.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The bytes claim a supported format but cannot be decoded (truncated, corrupt, empty).
    #[error("invalid image data: {0}")]
    InvalidImage(String),
    /// The bytes are not PNG, JPEG, WebP or GIF.
    #[error("unsupported image format: {0}; supported formats are png, jpeg, webp and gif")]
    UnsupportedFormat(String),
    /// The image is valid but larger than accepted (bytes, declared size, decoder memory).
    #[error("image too large: {0}")]
    ImageTooLarge(String),
    /// The image is smaller than accepted.
    #[error("image too small: {0}")]
    ImageTooSmall(String),
    /// One side is too many times the other.
    #[error("image aspect ratio too extreme: {0}")]
    AspectRatio(String),
    /// The `preprocessor_config.json` is unreadable, malformed or asks for something unsupported.
    #[error("invalid image processor config: {0}")]
    Config(String),
    /// Building the output tensor failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl PreprocessError {
    /// True when the request's image is at fault (map to HTTP 400); false for server-side errors.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidImage(_)
                | Self::UnsupportedFormat(_)
                | Self::ImageTooLarge(_)
                | Self::ImageTooSmall(_)
                | Self::AspectRatio(_)
        )
    }
}
