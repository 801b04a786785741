//! The variables a chat template sees, assembled as transformers' `apply_chat_template` passes them:
//! the special tokens, `tools=None`, `documents=None`, extra keyword arguments, `messages` and
//! `add_generation_prompt`.

use minijinja::Value;

use super::{ContentFormat, ContentPart, PromptMessage};

/// The template context. Later entries win, so `messages` and `add_generation_prompt` override
/// anything in `kwargs`, and `kwargs` override the special tokens, `tools` and `documents`.
/// Special tokens that are `None` stay undefined in the template, as in transformers.
pub(crate) fn build(
    special_tokens: [(&str, &Option<String>); 2],
    kwargs: &serde_json::Map<String, serde_json::Value>,
    messages: &[PromptMessage],
    format: ContentFormat,
    image_placeholder: &str,
    add_generation_prompt: bool,
) -> Value {
    let mut context: Vec<(String, Value)> = Vec::new();
    for (name, token) in special_tokens {
        if let Some(token) = token {
            context.push((name.to_string(), Value::from(token.as_str())));
        }
    }
    context.push(("tools".to_string(), Value::from(())));
    context.push(("documents".to_string(), Value::from(())));
    context.extend(
        kwargs
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(minijinja::value::Serde(v)))),
    );
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| message_value(m, format, image_placeholder))
        .collect();
    context.push(("messages".to_string(), Value::from(messages)));
    context.push((
        "add_generation_prompt".to_string(),
        Value::from(add_generation_prompt),
    ));
    Value::from_pairs(context)
}

/// `{"role": .., "content": ..}` with content shaped for the template's format.
fn message_value(message: &PromptMessage, format: ContentFormat, image_placeholder: &str) -> Value {
    let content = match format {
        ContentFormat::Parts => message
            .content
            .iter()
            .map(part_value)
            .collect::<Vec<_>>()
            .into(),
        ContentFormat::String => {
            let pieces: Vec<&str> = message
                .content
                .iter()
                .map(|part| match part {
                    ContentPart::Text(text) => text.as_str(),
                    ContentPart::Image => image_placeholder,
                })
                .collect();
            Value::from(pieces.join("\n"))
        }
    };
    Value::from_pairs([
        ("role", Value::from(message.role.as_str())),
        ("content", content),
    ])
}

fn text_value(text: &str) -> Value {
    Value::from(text)
}

/// One HF processor content dict; key order matches transformers' (`type` first).
fn part_value(part: &ContentPart) -> Value {
    match part {
        ContentPart::Text(text) => {
            Value::from_pairs([("type", text_value("text")), ("text", text_value(text))])
        }
        ContentPart::Image => Value::from_pairs([("type", text_value("image"))]),
    }
}
