//! Chat prompts: renders a model's Hugging Face chat template exactly as transformers'
//! `apply_chat_template` does, on minijinja.
//!
//! This file owns the public API: messages, the content format, `ChatTemplate` and `TemplateError`.
//! The template variables are assembled in `context`; the Jinja environment that imitates
//! transformers' lives in `environment` (Python formatting in `pyfmt`/`pyjson`, dates in
//! `strftime`); `scan` lexes template source for the `{% generation %}` rewrite and for vLLM's
//! content-format detection (`detect`, over the expressions of `expr`); `load` finds a template in a
//! model directory.

mod context;
mod detect;
mod environment;
mod expr;
mod load;
mod pyfmt;
mod pyjson;
mod scan;
mod strftime;

#[cfg(test)]
mod reference_tests;

use std::path::{Path, PathBuf};

pub use detect::detect_content_format;

/// One piece of a message's content, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    Text(String),
    /// An image; the template (or the placeholder) marks where its tokens go.
    Image,
}

/// A chat message as the template sees it: a role and its content parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl PromptMessage {
    /// A message whose content is a single text part (what a plain-string `content` becomes).
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: vec![ContentPart::Text(text.into())],
        }
    }
}

/// What a template expects `message.content` to be (vLLM's `--chat-template-content-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// A list of `{"type": "text", "text": ..}` / `{"type": "image"}` dicts (vLLM's "openai").
    Parts,
    /// One string: text parts joined with "\n", images written as a placeholder.
    String,
}

impl std::str::FromStr for ContentFormat {
    type Err = String;

    /// Accepts vLLM's names ("string", "openai") and "parts".
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "string" => Ok(Self::String),
            "openai" | "parts" => Ok(Self::Parts),
            other => Err(format!("unknown chat template content format {other:?} (expected \"string\" or \"openai\")")),
        }
    }
}

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A template file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A template or tokenizer file is malformed.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// The model directory has no chat template at all.
    #[error(
        "no chat template in {}: looked for chat_template.jinja, chat_template.json and a \"chat_template\" entry in tokenizer_config.json",
        dir.display()
    )]
    Missing { dir: PathBuf },
    /// The template is not valid Jinja (a start-up problem, not the client's).
    #[error("chat template does not compile: {0}")]
    Syntax(minijinja::Error),
    /// The template called `raise_exception(message)`: it rejects the client's conversation.
    #[error("{0}")]
    Raised(String),
    /// Any other failure while rendering (a template that cannot handle this input, or a bug in it).
    #[error("chat template failed to render: {0}")]
    Render(minijinja::Error),
}

impl TemplateError {
    /// True when the template itself rejected the request (`raise_exception`): answer with a 400.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Raised(_))
    }
}

/// A compiled chat template with the special tokens it may reference.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The environment holding the compiled template, configured like transformers'.
    env: minijinja::Environment<'static>,
    /// The template text as given, before the `{% generation %}` rewrite.
    source: String,
    /// How message content is handed to the template; detected like vLLM, can be overridden.
    content_format: ContentFormat,
    /// `bos_token` template variable; undefined in the template when `None`, as in transformers.
    bos_token: Option<String>,
    /// `eos_token` template variable; undefined in the template when `None`.
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` become template variables.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let env = environment::build(scan::rewrite_generation_tags(source))
            .map_err(TemplateError::Syntax)?;
        Ok(Self {
            env,
            source: source.to_string(),
            content_format: detect_content_format(source),
            bos_token,
            eos_token,
        })
    }

    /// Finds the template in a Hugging Face model directory the way transformers does:
    /// `chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of `{name, template}` of which "default" is used). The special tokens come
    /// from tokenizer_config.json (a string or an AddedToken dict).
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let found = load::load_model_dir(dir)?;
        Self::new(&found.template, found.bos_token, found.eos_token)
    }

    /// Replaces the detected content format (vLLM's `--chat-template-content-format string|openai`).
    pub fn with_content_format(mut self, content_format: ContentFormat) -> Self {
        self.content_format = content_format;
        self
    }

    pub fn content_format(&self) -> ContentFormat {
        self.content_format
    }

    /// The template text as loaded.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders the prompt. With `ContentFormat::Parts` each message's content is a list of
    /// `{"type": "text", "text": ..}` / `{"type": "image"}` dicts (the HF processor shape); with
    /// `ContentFormat::String` its parts are joined with "\n", images written as `image_placeholder`.
    pub fn render(
        &self,
        messages: &[PromptMessage],
        add_generation_prompt: bool,
        image_placeholder: &str,
    ) -> Result<String, TemplateError> {
        self.render_with_kwargs(
            messages,
            add_generation_prompt,
            image_placeholder,
            &serde_json::Map::new(),
        )
    }

    /// Like `render`, with extra template variables (vLLM's `chat_template_kwargs`: `tools`,
    /// `date_string`, `enable_thinking`, ...). They override `bos_token`, `eos_token`, `tools` and
    /// `documents`, but never `messages` or `add_generation_prompt`. Objects keep serde_json's key order.
    pub fn render_with_kwargs(
        &self,
        messages: &[PromptMessage],
        add_generation_prompt: bool,
        image_placeholder: &str,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let context = context::build(
            [
                ("bos_token", &self.bos_token),
                ("eos_token", &self.eos_token),
            ],
            kwargs,
            messages,
            self.content_format,
            image_placeholder,
            add_generation_prompt,
        );
        let template = self
            .env
            .get_template(environment::TEMPLATE_NAME)
            .map_err(TemplateError::Syntax)?;
        template
            .render(context)
            .map_err(|err| match environment::raised_message(&err) {
                Some(message) => TemplateError::Raised(message),
                None => TemplateError::Render(err),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(parts: Vec<ContentPart>) -> PromptMessage {
        PromptMessage {
            role: "user".into(),
            content: parts,
        }
    }

    #[test]
    fn parts_format_passes_processor_dicts() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% for c in m.content %}{{ c }};{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.content_format(), ContentFormat::Parts);
        let out = t
            .render(
                &[user(vec![
                    ContentPart::Text("hi".into()),
                    ContentPart::Image,
                ])],
                false,
                "<img>",
            )
            .unwrap();
        assert_eq!(out, "{'type': 'text', 'text': 'hi'};{'type': 'image'};");
    }

    #[test]
    fn string_format_joins_parts_in_order() {
        let t = ChatTemplate::new(
            "{% for m in messages %}[{{ m.content }}]{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.content_format(), ContentFormat::String);
        let parts = vec![
            ContentPart::Text("a".into()),
            ContentPart::Image,
            ContentPart::Text("b".into()),
        ];
        assert_eq!(
            t.render(&[user(parts)], false, "<img>").unwrap(),
            "[a\n<img>\nb]"
        );
    }

    #[test]
    fn plain_text_message_works_with_both_formats() {
        let msg = [PromptMessage::text("user", "hello")];
        let parts = ChatTemplate::new(
            "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endif %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(parts.content_format(), ContentFormat::Parts);
        assert_eq!(parts.render(&msg, false, "").unwrap(), "hello");
        let string = parts.clone().with_content_format(ContentFormat::String);
        assert_eq!(string.render(&msg, false, "").unwrap(), "hello");
    }

    #[test]
    fn special_tokens_and_kwargs() {
        let src = "{{ bos_token }}|{{ eos_token is defined }}|{{ tools }}|{{ date_string }}|{{ messages|length }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("date_string".into(), "today".into());
        kwargs.insert("tools".into(), serde_json::json!([1]));
        kwargs.insert("messages".into(), serde_json::json!("ignored"));
        assert_eq!(
            t.render_with_kwargs(&[], false, "", &kwargs).unwrap(),
            "<s>|False|[1]|today|0"
        );
    }

    #[test]
    fn raise_exception_is_a_client_error_with_the_template_message() {
        let t = ChatTemplate::new(
            "{% if messages|length > 1 %}{{ raise_exception('only one, please') }}{% endif %}",
            None,
            None,
        )
        .unwrap();
        let two = [
            PromptMessage::text("user", "a"),
            PromptMessage::text("user", "b"),
        ];
        let err = t.render(&two, true, "").unwrap_err();
        assert!(err.is_client_error());
        assert_eq!(err.to_string(), "only one, please");
    }

    #[test]
    fn other_failures_are_not_client_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", None, None),
            Err(TemplateError::Syntax(_))
        ));
        let t = ChatTemplate::new("{{ nothing.attr }}", None, None).unwrap();
        let err = t.render(&[], false, "").unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)) && !err.is_client_error());
    }

    #[test]
    fn templates_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<TemplateError>();
    }

    #[test]
    fn content_format_names() {
        assert_eq!("openai".parse::<ContentFormat>(), Ok(ContentFormat::Parts));
        assert_eq!("string".parse::<ContentFormat>(), Ok(ContentFormat::String));
        assert!("auto".parse::<ContentFormat>().is_err());
    }
}
