//! How a chat model's family wants its images: the preprocessed input for the
//! vision tower and how many placeholder tokens each image stands for.

use image::DynamicImage;

use super::image::preprocess_error;
use super::ValidationError;
use crate::model::ImageInput;
use crate::preprocess::{ImageProcessor, Qwen2VlImageProcessor};

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
}

/// One prepared image.
pub struct Prepared {
    pub input: ImageInput,
    /// Copies of the placeholder token this image takes in the prompt.
    pub tokens: usize,
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
                    input: ImageInput::Pixels(pixels),
                    tokens: *tokens_per_image,
                })
            }
            VisionPrep::Qwen2Vl(processor) => {
                let img = processor
                    .preprocess(img)
                    .map_err(|e| preprocess_error(e, param))?;
                Ok(Prepared {
                    tokens: processor.num_image_tokens(img.grid_thw),
                    input: ImageInput::Patches {
                        patches: img.patches,
                        grid: img.grid_thw,
                    },
                })
            }
        }
    }
}
