//! Turns OpenAI chat messages into template messages, decoding and
//! preprocessing each image on the way (this runs on a blocking thread).

use super::image::decode_data_url;
use super::vision::{Prepared, VisionPrep};
use super::{ValidationError, ValidationLimits};
use crate::openai::excerpt;
use crate::openai::request::{ChatMessage, ContentPart, MessageContent};
use crate::prompt::{ContentPart as Part, PromptMessage};

/// What the prompt needs from the request's messages.
pub struct Converted {
    pub messages: Vec<PromptMessage>,
    /// Prepared images in prompt order.
    pub images: Vec<Prepared>,
}

/// Checks roles, refuses text that spells the image placeholder, counts the
/// images, and only then decodes every image.
pub fn convert(
    messages: &[ChatMessage],
    image_token: &str,
    vision: &VisionPrep,
    limits: &ValidationLimits,
) -> Result<Converted, ValidationError> {
    if messages.is_empty() {
        return Err(ValidationError::invalid(
            "messages",
            "`messages` must contain at least one message".into(),
        ));
    }
    count_images(messages, limits.max_images_per_request)?;
    let mut out = Converted {
        messages: Vec::with_capacity(messages.len()),
        images: Vec::new(),
    };
    for (i, msg) in messages.iter().enumerate() {
        let role = role(&msg.role, i)?;
        let parts = match &msg.content {
            None => Vec::new(),
            Some(MessageContent::Text(t)) => {
                check_text(t, image_token, format!("messages[{i}].content"))?;
                vec![Part::Text(t.clone())]
            }
            Some(MessageContent::Parts(parts)) if parts.is_empty() => {
                return Err(ValidationError::invalid(
                    &format!("messages[{i}].content"),
                    "a content list must hold at least one part".into(),
                ))
            }
            Some(MessageContent::Parts(parts)) => {
                let mut v = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let ctx = PartContext {
                        i,
                        j,
                        image_token,
                        vision,
                        limits,
                    };
                    v.push(convert_part(part, &ctx, &mut out.images)?);
                }
                v
            }
        };
        out.messages.push(PromptMessage {
            role,
            content: parts,
        });
    }
    Ok(out)
}

/// Bytes of text in the messages.
pub fn text_bytes(messages: &[ChatMessage]) -> usize {
    let part = |p: &ContentPart| match p {
        ContentPart::Text { text } => text.len(),
        ContentPart::ImageUrl { .. } => 0,
    };
    messages
        .iter()
        .map(|m| match &m.content {
            None => 0,
            Some(MessageContent::Text(t)) => t.len(),
            Some(MessageContent::Parts(parts)) => parts.iter().map(part).sum(),
        })
        .sum()
}

/// Refuses a request with too many images before any is decoded, naming the
/// first one past the limit.
fn count_images(messages: &[ChatMessage], max_images: usize) -> Result<(), ValidationError> {
    let mut seen = 0;
    for (i, msg) in messages.iter().enumerate() {
        let Some(MessageContent::Parts(parts)) = &msg.content else {
            continue;
        };
        for (j, part) in parts.iter().enumerate() {
            if matches!(part, ContentPart::ImageUrl { .. }) {
                seen += 1;
                if seen > max_images {
                    return Err(ValidationError::Invalid {
                        message: format!("at most {max_images} images are allowed per request"),
                        param: Some(format!("messages[{i}].content[{j}]")),
                        code: "too_many_images",
                    });
                }
            }
        }
    }
    Ok(())
}

fn role(role: &str, i: usize) -> Result<String, ValidationError> {
    match role {
        "system" | "user" | "assistant" => Ok(role.to_string()),
        // OpenAI's newer name for the system role.
        "developer" => Ok("system".to_string()),
        other => Err(ValidationError::invalid(
            &format!("messages[{i}].role"),
            format!(
                "unsupported role `{}`: use system, developer, user or assistant",
                excerpt(other)
            ),
        )),
    }
}

/// Where a content part sits and what converting it needs.
struct PartContext<'a> {
    /// Message and part index.
    i: usize,
    j: usize,
    image_token: &'a str,
    vision: &'a VisionPrep,
    limits: &'a ValidationLimits,
}

fn convert_part(
    part: &ContentPart,
    ctx: &PartContext,
    images: &mut Vec<Prepared>,
) -> Result<Part, ValidationError> {
    let (i, j) = (ctx.i, ctx.j);
    match part {
        ContentPart::Text { text } => {
            check_text(
                text,
                ctx.image_token,
                format!("messages[{i}].content[{j}].text"),
            )?;
            Ok(Part::Text(text.clone()))
        }
        ContentPart::ImageUrl { image_url } => {
            let param = format!("messages[{i}].content[{j}].image_url");
            let img = decode_data_url(&image_url.url, &ctx.limits.image, &param)?;
            images.push(ctx.vision.prepare(&img, &param)?);
            Ok(Part::Image)
        }
    }
}

/// A user who types the placeholder must not be able to forge an image slot.
fn check_text(text: &str, image_token: &str, param: String) -> Result<(), ValidationError> {
    if !image_token.is_empty() && text.contains(image_token) {
        return Err(ValidationError::Invalid {
            message: format!(
                "text must not contain the image placeholder `{image_token}`; send images as \
                 `image_url` content parts"
            ),
            param: Some(param),
            code: "invalid_prompt",
        });
    }
    Ok(())
}
