//! Request validation: turns an untrusted OpenAI request into a
//! [`ValidChatRequest`] the engine can trust — messages checked, images decoded
//! and preprocessed, the prompt rendered with the model's template, tokenized,
//! image placeholders expanded, and every parameter range-checked.

pub mod embed;
mod image;
mod messages;
pub mod params;
pub mod vision;

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::engine::sampling::SamplingParams;
use crate::model::ImageInput;
use crate::openai::request::ChatCompletionRequest;
use crate::prompt::ChatTemplate;

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The client sent something we refuse (HTTP 400).
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// Prompt plus completion would not fit the context (HTTP 400).
    #[error("{0}")]
    ContextLength(String),
    /// Our own fault: tokenizer or template broke (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl ValidationError {
    pub fn invalid(param: &str, message: String) -> Self {
        ValidationError::Invalid {
            message,
            param: Some(param.to_string()),
            code: "invalid_value",
        }
    }
}

/// Limits that validation enforces.
#[derive(Debug, Clone)]
pub struct ValidationLimits {
    pub max_images_per_request: usize,
    pub max_n: usize,
    /// Completion length when the request gives none (capped by the context).
    pub default_max_tokens: usize,
}

/// Everything validation needs to know about the model; shared, immutable.
pub struct Validator {
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// How this model's family prepares images.
    pub vision: vision::VisionPrep,
    /// The placeholder string the template writes for an image, e.g. `<image>`.
    pub image_token: String,
    pub image_token_id: u32,
    /// The tokenizer's BOS string: when the rendered prompt starts with it the
    /// tokenizer adds no special tokens of its own, else it does (the rule of
    /// transformers' `ProcessorMixin.apply_chat_template`).
    pub bos_token: Option<String>,
    /// Context length in tokens.
    pub max_context: usize,
    pub limits: ValidationLimits,
    /// Sampling defaults from the model's generation config.
    pub sampling_defaults: params::SamplingDefaults,
}

/// A request the engine can run: one entry in `choices` per `n`.
pub struct ValidChatRequest {
    pub prompt_ids: Vec<u32>,
    /// Prepared images in prompt order.
    pub images: Vec<ImageInput>,
    /// Sampling per choice (they differ only by seed).
    pub choices: Vec<SamplingParams>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl Validator {
    /// Validates a chat request. Decodes images: call it off the async runtime.
    pub fn validate_chat(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<ValidChatRequest, ValidationError> {
        let sampling = params::sampling(req, &self.sampling_defaults)?;
        let n = params::n(req, self.limits.max_n)?;
        let stop = params::stop(req)?;
        let conv = messages::convert(
            &req.messages,
            &self.image_token,
            &self.vision,
            self.limits.max_images_per_request,
        )?;
        let counts: Vec<usize> = conv.images.iter().map(|p| p.tokens).collect();
        let prompt_ids = self.prompt_ids(&conv.messages, &counts)?;
        let max_tokens = params::max_tokens(
            req,
            prompt_ids.len(),
            self.max_context,
            self.limits.default_max_tokens,
        )?;
        let choices = params::seeds(req.seed, n)
            .into_iter()
            .map(|seed| SamplingParams {
                seed,
                ..sampling.clone()
            })
            .collect();
        Ok(ValidChatRequest {
            prompt_ids,
            images: conv.images.into_iter().map(|p| p.input).collect(),
            choices,
            max_tokens,
            stop,
            stream: req.stream.unwrap_or(false),
            include_usage: req
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }

    /// Renders, tokenizes and expands each image placeholder.
    fn prompt_ids(
        &self,
        messages: &[crate::prompt::PromptMessage],
        image_tokens: &[usize],
    ) -> Result<Vec<u32>, ValidationError> {
        let num_images = image_tokens.len();
        let text = self
            .template
            .render(messages, true, &self.image_token)
            // The template compiled at start-up, so a failure now comes from
            // this request's messages (`raise_exception`, or a shape the
            // template cannot handle): the client's to fix, as vLLM answers.
            .map_err(|e| ValidationError::Invalid {
                message: format!("the model's chat template rejected the messages: {e}"),
                param: Some("messages".into()),
                code: "invalid_prompt",
            })?;
        let has_bos = self
            .bos_token
            .as_deref()
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let enc = self
            .tokenizer
            .encode(text, !has_bos)
            .map_err(|e| ValidationError::Internal(format!("tokenizer failed: {e}")))?;
        let placed = enc
            .get_ids()
            .iter()
            .filter(|&&id| id == self.image_token_id)
            .count();
        if placed != num_images {
            return Err(ValidationError::Invalid {
                message: format!(
                    "the model's chat template placed {placed} of the request's {num_images} images"
                ),
                param: Some("messages".into()),
                code: "invalid_prompt",
            });
        }
        Ok(expand_images(
            enc.get_ids(),
            self.image_token_id,
            image_tokens,
        ))
    }
}

/// Repeats the i-th image placeholder id to the number of feature rows image i
/// stands for (the caller checked there is one count per placeholder).
pub fn expand_images(ids: &[u32], image_id: u32, counts: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut counts = counts.iter();
    for &id in ids {
        if id == image_id {
            let n = counts.next().copied().unwrap_or(1);
            out.extend(std::iter::repeat_n(image_id, n));
        } else {
            out.push(id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::expand_images;

    #[test]
    fn each_placeholder_becomes_its_feature_rows() {
        assert_eq!(
            expand_images(&[1, 9, 2, 9], 9, &[3, 2]),
            [1, 9, 9, 9, 2, 9, 9]
        );
        assert_eq!(expand_images(&[1, 2], 9, &[]), [1, 2]);
    }
}
