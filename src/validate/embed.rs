//! Validation of `/v1/embeddings` requests: every input becomes token ids
//! (tokenized, length-checked and padded as the model expects) or
//! preprocessed pixels, in input order.

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::image::load_image;
use super::ValidationError;
use crate::engine::embed::EmbedInput;
use crate::model::embed::TextPadding;
use crate::openai::embeddings::{EmbeddingItem, EmbeddingRequest};
use crate::openai::excerpt;
use crate::openai::request::ContentPart;
use crate::preprocess::{ImageLimits, ImageProcessor};

/// How vectors are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    /// Little-endian f32 bytes, base64-encoded.
    Base64,
}

/// What validation knows about an embedding model; shared, immutable.
pub struct EmbedValidator {
    pub tokenizer: Arc<Tokenizer>,
    pub processor: ImageProcessor,
    /// Longest text in tokens, special tokens included.
    pub max_text_len: usize,
    /// Bytes of the tokenizer's longest token (see [`super::check_text_fits`]).
    pub max_token_bytes: usize,
    pub padding: TextPadding,
    /// Vector size; the only `dimensions` accepted.
    pub dim: usize,
    /// Most inputs in one request.
    pub max_inputs: usize,
    /// What each image may be.
    pub image_limits: ImageLimits,
}

pub struct ValidEmbedRequest {
    pub inputs: Vec<EmbedInput>,
    pub encoding: Encoding,
    /// Text tokens, padding excluded (images count none).
    pub prompt_tokens: usize,
}

impl EmbedValidator {
    /// Validates an embeddings request. Decodes images: call it off the async runtime.
    pub fn validate(&self, req: EmbeddingRequest) -> Result<ValidEmbedRequest, ValidationError> {
        let encoding = match req.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => {
                return Err(ValidationError::invalid(
                    "encoding_format",
                    format!(
                        "`encoding_format` must be `float` or `base64`, got `{}`",
                        excerpt(other)
                    ),
                ))
            }
        };
        if let Some(d) = req.dimensions {
            if d as usize != self.dim {
                return Err(ValidationError::invalid(
                    "dimensions",
                    format!(
                        "this model's embeddings have {} dimensions and it was not trained for \
                         shortened ones; `dimensions` must be {} or absent",
                        self.dim, self.dim
                    ),
                ));
            }
        }
        let items = req.input.into_items();
        if items.is_empty() || items.len() > self.max_inputs {
            return Err(ValidationError::invalid(
                "input",
                format!(
                    "`input` must hold 1 to {} items, got {}",
                    self.max_inputs,
                    items.len()
                ),
            ));
        }
        let mut inputs = Vec::with_capacity(items.len());
        let mut prompt_tokens = 0;
        for (i, item) in items.into_iter().enumerate() {
            let input = self.input(item, i)?;
            if let EmbedInput::Text(ids) = &input {
                prompt_tokens += ids.len();
            }
            inputs.push(self.pad(input));
        }
        Ok(ValidEmbedRequest {
            inputs,
            encoding,
            prompt_tokens,
        })
    }

    fn input(&self, item: EmbeddingItem, i: usize) -> Result<EmbedInput, ValidationError> {
        let param = format!("input[{i}]");
        match item {
            EmbeddingItem::Text(t) | EmbeddingItem::Part(ContentPart::Text { text: t }) => {
                self.tokenize(&t, &param)
            }
            EmbeddingItem::Ids(ids) => self.check_ids(ids, &param),
            EmbeddingItem::Part(ContentPart::ImageUrl { image_url }) => {
                let param = format!("{param}.image_url");
                load_image(&image_url.url, &self.processor, &self.image_limits, &param)
                    .map(EmbedInput::Image)
            }
        }
    }

    fn tokenize(&self, text: &str, param: &str) -> Result<EmbedInput, ValidationError> {
        super::check_text_fits(text.len(), self.max_token_bytes, self.max_text_len).map_err(
            |message| ValidationError::Invalid {
                message,
                param: Some(param.to_string()),
                code: "context_length_exceeded",
            },
        )?;
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ValidationError::Internal(format!("tokenizer failed: {e}")))?;
        self.check_ids(enc.get_ids().to_vec(), param)
    }

    fn check_ids(&self, ids: Vec<u32>, param: &str) -> Result<EmbedInput, ValidationError> {
        if ids.is_empty() {
            return Err(ValidationError::invalid(
                param,
                "an input must not be empty".into(),
            ));
        }
        if ids.len() > self.max_text_len {
            return Err(ValidationError::Invalid {
                message: format!(
                    "This model's maximum context length is {} tokens, but {param} has {} tokens",
                    self.max_text_len,
                    ids.len()
                ),
                param: Some(param.to_string()),
                code: "context_length_exceeded",
            });
        }
        let vocab = self.tokenizer.get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(ValidationError::invalid(
                param,
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        Ok(EmbedInput::Text(ids))
    }

    /// SigLIP-style models were trained on texts padded to a fixed length.
    fn pad(&self, input: EmbedInput) -> EmbedInput {
        match (input, self.padding) {
            (EmbedInput::Text(mut ids), TextPadding::MaxLength { length, pad_id }) => {
                ids.resize(length.max(ids.len()), pad_id);
                EmbedInput::Text(ids)
            }
            (input, _) => input,
        }
    }
}
