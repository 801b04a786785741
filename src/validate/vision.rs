//! How a chat model's family wants its images: the preprocessed input for the
//! vision tower and how many placeholder tokens each image stands for.

use image::DynamicImage;

use super::image::preprocess_error;
use super::ValidationError;
use crate::model::{ImageInput, KeyedImage};
use crate::preprocess::{
    image_prompt_string, Idefics3ImageProcessor, Idefics3ImageTokens, ImageProcessor,
    Qwen2VlImageProcessor,
};

/// A family's image preparation.
pub enum VisionPrep {
    /// Fixed-size CLIP/SigLIP preprocessing (LLaVA): every image becomes the
    /// same number of feature rows.
    Fixed {
        processor: ImageProcessor,
        tokens_per_image: usize,
    },
    /// Qwen2-VL's dynamic resolution: each image its own patch grid.
    Qwen2Vl(Qwen2VlImageProcessor),
    /// Idefics3/SmolVLM: tiles plus a global image, each `image_seq_len`
    /// tokens, laid out with row/column marker tokens.
    Idefics3 {
        processor: Idefics3ImageProcessor,
        image_seq_len: usize,
        tokens: Idefics3ImageTokens,
    },
}

/// Where each image's rows start in `prompt` (the position of its first placeholder token), the
/// `i`-th image taking `images[i].tokens` placeholders after those of the images before it.
pub fn image_starts(prompt: &[u32], image_token: u32, images: &[Prepared]) -> Vec<usize> {
    let placeholders: Vec<usize> = prompt
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t == image_token)
        .map(|(p, _)| p)
        .collect();
    images
        .iter()
        .scan(0, |before, image| {
            let start = placeholders.get(*before).copied();
            *before += image.tokens;
            start
        })
        .collect()
}

/// One prepared image.
pub struct Prepared {
    /// The vision tower's input, keyed for the encoder-output cache.
    pub input: KeyedImage,
    /// Copies of the placeholder token this image takes in the prompt.
    pub tokens: usize,
    /// The text that replaces the placeholder, when it is more than `tokens`
    /// copies of it (Idefics3's tile layout).
    pub layout: Option<String>,
}

impl VisionPrep {
    pub fn prepare(&self, img: &DynamicImage, param: &str) -> Result<Prepared, ValidationError> {
        match self {
            VisionPrep::Fixed {
                processor,
                tokens_per_image,
            } => {
                let pixels = processor
                    .preprocess(img)
                    .map_err(|e| preprocess_error(e, param))?;
                Ok(Prepared {
                    input: keyed(ImageInput::Pixels(pixels))?,
                    tokens: *tokens_per_image,
                    layout: None,
                })
            }
            VisionPrep::Qwen2Vl(processor) => {
                let img = processor
                    .preprocess(img)
                    .map_err(|e| preprocess_error(e, param))?;
                Ok(Prepared {
                    tokens: processor.num_image_tokens(img.grid_thw),
                    input: keyed(ImageInput::Patches {
                        patches: img.patches,
                        grid: img.grid_thw,
                    })?,
                    layout: None,
                })
            }
            VisionPrep::Idefics3 {
                processor,
                image_seq_len,
                tokens,
            } => {
                let img = processor
                    .preprocess(img)
                    .map_err(|e| preprocess_error(e, param))?;
                let frames = img.pixel_values.dim(0).map_err(|e| {
                    ValidationError::Internal(format!("image preprocessing failed: {e}"))
                })?;
                Ok(Prepared {
                    tokens: frames * image_seq_len,
                    layout: Some(image_prompt_string(
                        img.rows,
                        img.cols,
                        *image_seq_len,
                        tokens,
                    )),
                    input: keyed(ImageInput::Tiles {
                        pixels: img.pixel_values,
                        mask: img.pixel_attention_mask,
                    })?,
                })
            }
        }
    }
}

/// Keys a prepared input (hashes its values, here on the blocking thread).
fn keyed(input: ImageInput) -> Result<KeyedImage, ValidationError> {
    KeyedImage::new(input)
        .map_err(|e| ValidationError::Internal(format!("cannot key the image: {e}")))
}
