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
use crate::model::KeyedImage;
use crate::openai::request::ChatCompletionRequest;
use crate::preprocess::ImageLimits;
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
    pub max_top_logprobs: usize,
    /// What each image may be.
    pub image: ImageLimits,
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
    /// Bytes of the tokenizer's longest token (see [`check_text_fits`]).
    pub max_token_bytes: usize,
    pub limits: ValidationLimits,
    /// Sampling defaults from the model's generation config.
    pub sampling_defaults: params::SamplingDefaults,
}

/// A request the engine can run: one entry in `choices` per `n`.
pub struct ValidChatRequest {
    pub prompt_ids: Vec<u32>,
    /// Prepared images in prompt order, keyed.
    pub images: Vec<KeyedImage>,
    /// Where each image's rows start in `prompt_ids` (prefix caching).
    pub image_starts: Vec<usize>,
    /// Sampling per choice (they differ only by seed).
    pub choices: Vec<SamplingParams>,
    pub max_tokens: usize,
    /// Tokens generated before EOS or a stop string may end a choice.
    pub min_tokens: usize,
    /// Generate past EOS, to `max_tokens`.
    pub ignore_eos: bool,
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
        let sampling =
            params::sampling(req, &self.sampling_defaults, self.limits.max_top_logprobs)?;
        let n = params::n(req, self.limits.max_n)?;
        let stop = params::stop(req)?;
        let text_bytes = messages::text_bytes(&req.messages);
        check_text_fits(text_bytes, self.max_token_bytes, self.max_context)
            .map_err(ValidationError::ContextLength)?;
        let conv = messages::convert(&req.messages, &self.image_token, &self.vision, &self.limits)?;
        let prompt_ids = self.prompt_ids(&conv.messages, &conv.images)?;
        let max_tokens = params::max_tokens(
            req,
            prompt_ids.len(),
            self.max_context,
            self.limits.default_max_tokens,
        )?;
        let min_tokens = params::min_tokens(req, max_tokens)?;
        let choices = params::seeds(req.seed, n)
            .into_iter()
            .map(|seed| SamplingParams {
                seed,
                ..sampling.clone()
            })
            .collect();
        let image_starts = vision::image_starts(&prompt_ids, self.image_token_id, &conv.images);
        Ok(ValidChatRequest {
            prompt_ids,
            image_starts,
            images: conv.images.into_iter().map(|p| p.input).collect(),
            choices,
            max_tokens,
            min_tokens,
            ignore_eos: req.ignore_eos.unwrap_or(false),
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
        images: &[vision::Prepared],
    ) -> Result<Vec<u32>, ValidationError> {
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
        let text = expand_placeholders(&text, &self.image_token, images)?;
        let has_bos = self
            .bos_token
            .as_deref()
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let enc = self
            .tokenizer
            .encode(text, !has_bos)
            .map_err(|e| ValidationError::Internal(format!("tokenizer failed: {e}")))?;
        let ids = enc.get_ids();
        let placed = ids.iter().filter(|&&id| id == self.image_token_id).count();
        let wanted: usize = images.iter().map(|p| p.tokens).sum();
        if placed != wanted {
            return Err(ValidationError::Internal(format!(
                "the expanded prompt holds {placed} image tokens where the images need {wanted}"
            )));
        }
        Ok(ids.to_vec())
    }
}

/// Refuses text that cannot fit a context of `context` tokens however it
/// tokenizes, before the expensive work (decoding images, tokenizing): no
/// token covers more than `max_token_bytes` bytes. (A tokenizer whose
/// normalizer deletes characters could fit more; not for megabytes of text.)
pub fn check_text_fits(
    text_bytes: usize,
    max_token_bytes: usize,
    context: usize,
) -> Result<(), String> {
    let at_least = text_bytes.div_ceil(max_token_bytes.max(1));
    if at_least > context {
        return Err(format!(
            "This model's maximum context length is {context} tokens. However, the text holds \
             {text_bytes} bytes, at least {at_least} tokens. Please reduce the length of the \
             input."
        ));
    }
    Ok(())
}

/// Replaces the i-th image placeholder the template wrote with image i's
/// expansion, as transformers' processors do before tokenizing. (Users cannot
/// type the placeholder: `messages` refused it.)
pub fn expand_placeholders(
    text: &str,
    placeholder: &str,
    images: &[vision::Prepared],
) -> Result<String, ValidationError> {
    let pieces: Vec<&str> = text.split(placeholder).collect();
    let placed = pieces.len() - 1;
    if placed != images.len() {
        return Err(ValidationError::Invalid {
            message: format!(
                "the model's chat template placed {placed} of the request's {} images",
                images.len()
            ),
            param: Some("messages".into()),
            code: "invalid_prompt",
        });
    }
    let mut out = String::with_capacity(text.len());
    for (piece, image) in pieces.iter().zip(images) {
        out.push_str(piece);
        match &image.layout {
            Some(layout) => out.push_str(layout),
            None => out.push_str(&placeholder.repeat(image.tokens)),
        }
    }
    out.push_str(pieces.last().copied().unwrap_or(""));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::vision::Prepared;
    use super::{check_text_fits, expand_placeholders};
    use crate::model::{ImageInput, KeyedImage};

    fn image(tokens: usize, layout: Option<&str>) -> Prepared {
        let t = candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu);
        Prepared {
            input: KeyedImage::new(ImageInput::Pixels(t.unwrap())).unwrap(),
            tokens,
            layout: layout.map(str::to_string),
        }
    }

    #[test]
    fn each_placeholder_becomes_its_image_expansion() {
        let imgs = [image(3, None), image(2, Some("<a><i><i><b>"))];
        let out = expand_placeholders("x<i>y<i>z", "<i>", &imgs).unwrap();
        assert_eq!(out, "x<i><i><i>y<a><i><i><b>z");
        assert_eq!(expand_placeholders("plain", "<i>", &[]).unwrap(), "plain");
    }

    #[test]
    fn text_longer_than_the_context_can_hold_is_refused_from_its_length() {
        assert!(check_text_fits(400, 4, 100).is_ok());
        assert!(check_text_fits(401, 4, 100).is_err());
        assert!(check_text_fits(5, 0, 100).is_ok(), "no division by zero");
    }

    #[test]
    fn a_template_that_drops_an_image_is_refused() {
        assert!(expand_placeholders("x", "<i>", &[image(1, None)]).is_err());
    }

    #[test]
    fn images_start_at_their_first_placeholder() {
        const IMG: u32 = 9;
        let images = [image(2, None), image(1, None)];
        let starts = super::vision::image_starts(&[5, IMG, 6, IMG, 7, IMG], IMG, &images);
        assert_eq!(starts, vec![1, 5]);
    }
}
