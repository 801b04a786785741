//! Turns OpenAI chat messages into template messages, decoding and
//! preprocessing each image on the way (this runs on a blocking thread).

use super::image::decode_data_url;
use super::vision::{Prepared, VisionPrep};
use super::ValidationError;
use crate::openai::request::{ChatMessage, ContentPart, MessageContent};
use crate::prompt::{ContentPart as Part, PromptMessage};

/// What the prompt needs from the request's messages.
pub struct Converted {
    pub messages: Vec<PromptMessage>,
    /// Prepared images in prompt order.
    pub images: Vec<Prepared>,
}

/// Checks roles, refuses text that spells the image placeholder, and decodes
/// every image.
pub fn convert(
    messages: &[ChatMessage],
    image_token: &str,
    vision: &VisionPrep,
    max_images: usize,
) -> Result<Converted, ValidationError> {
    if messages.is_empty() {
        return Err(ValidationError::invalid(
            "messages",
            "`messages` must contain at least one message".into(),
        ));
    }
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
            Some(MessageContent::Parts(parts)) => {
                let mut v = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    // Refuse the image before decoding it.
                    let is_image = matches!(part, ContentPart::ImageUrl { .. });
                    if is_image && out.images.len() >= max_images {
                        return Err(ValidationError::Invalid {
                            message: format!("at most {max_images} images are allowed per request"),
                            param: Some(format!("messages[{i}].content[{j}]")),
                            code: "too_many_images",
                        });
                    }
                    let part = convert_part(part, i, j, image_token, vision, &mut out.images)?;
                    v.push(part);
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

fn role(role: &str, i: usize) -> Result<String, ValidationError> {
    match role {
        "system" | "user" | "assistant" => Ok(role.to_string()),
        // OpenAI's newer name for the system role.
        "developer" => Ok("system".to_string()),
        other => Err(ValidationError::invalid(
            &format!("messages[{i}].role"),
            format!("unsupported role `{other}`: use system, developer, user or assistant"),
        )),
    }
}

fn convert_part(
    part: &ContentPart,
    i: usize,
    j: usize,
    image_token: &str,
    vision: &VisionPrep,
    images: &mut Vec<Prepared>,
) -> Result<Part, ValidationError> {
    match part {
        ContentPart::Text { text } => {
            check_text(
                text,
                image_token,
                format!("messages[{i}].content[{j}].text"),
            )?;
            Ok(Part::Text(text.clone()))
        }
        ContentPart::ImageUrl { image_url } => {
            let param = format!("messages[{i}].content[{j}].image_url");
            let img = decode_data_url(&image_url.url, &param)?;
            images.push(vision.prepare(&img, &param)?);
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
