//! Byte-for-byte comparison with transformers: real chat templates under tests/fixtures/prompt/models
//! and small feature templates, rendered by transformers' own `render_jinja_template` into
//! tests/fixtures/prompt/expected.json (by scripts/make_prompt_reference.py, with the content formats
//! vLLM's detection picks and the output of Python's strftime).

use std::path::PathBuf;

use serde::Deserialize;

use super::strftime::strftime;
use super::{
    detect_content_format, ChatTemplate, ContentFormat, ContentPart, PromptMessage, TemplateError,
};

#[derive(Deserialize)]
struct Reference {
    models: Vec<ModelReference>,
    features: Vec<FeatureCase>,
    detection: Vec<DetectionCase>,
    strftime: Vec<StrftimeCase>,
}

#[derive(Deserialize)]
struct ModelReference {
    dir: String,
    content_format: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    cases: Vec<ModelCase>,
}

#[derive(Deserialize)]
struct ModelCase {
    name: String,
    messages: Vec<FixtureMessage>,
    add_generation_prompt: bool,
    image_placeholder: String,
    kwargs: serde_json::Map<String, serde_json::Value>,
    #[serde(flatten)]
    expected: Expected,
}

#[derive(Deserialize)]
struct FixtureMessage {
    role: String,
    content: Vec<FixturePart>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum FixturePart {
    Text { text: String },
    Image,
}

/// What transformers did: rendered `output`, raised via `raise_exception`, or failed otherwise.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
enum Expected {
    Output(String),
    Raised(String),
    /// The Python exception text is not compared: minijinja words its errors differently.
    RenderError(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct FeatureCase {
    name: String,
    template: String,
    kwargs: serde_json::Map<String, serde_json::Value>,
    #[serde(flatten)]
    expected: Expected,
}

#[derive(Deserialize)]
struct DetectionCase {
    name: String,
    template: String,
    content_format: String,
}

#[derive(Deserialize)]
struct StrftimeCase {
    unix_seconds: i64,
    format: String,
    output: String,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prompt")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("expected.json"))
        .expect("expected.json is readable");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn format_name(format: ContentFormat) -> &'static str {
    match format {
        ContentFormat::Parts => "parts",
        ContentFormat::String => "string",
    }
}

fn messages(fixture: &[FixtureMessage]) -> Vec<PromptMessage> {
    fixture
        .iter()
        .map(|m| PromptMessage {
            role: m.role.clone(),
            content: m
                .content
                .iter()
                .map(|p| match p {
                    FixturePart::Text { text } => ContentPart::Text(text.clone()),
                    FixturePart::Image => ContentPart::Image,
                })
                .collect(),
        })
        .collect()
}

/// Compares a render with what transformers did; returns a description of the mismatch, if any.
fn check(
    label: &str,
    actual: Result<String, TemplateError>,
    expected: &Expected,
) -> Option<String> {
    match (&actual, expected) {
        (Ok(out), Expected::Output(want)) if out == want => None,
        (Err(TemplateError::Raised(msg)), Expected::Raised(want)) if msg == want => None,
        (Err(TemplateError::Render(_)), Expected::RenderError(_)) => None,
        _ => Some(format!(
            "{label}:\n  expected {expected:?}\n  got      {actual:?}"
        )),
    }
}

#[test]
fn real_templates_render_like_transformers() {
    let mut failures = Vec::new();
    let models = reference().models;
    assert!(models.len() >= 4, "at least four real templates");
    for model in &models {
        let template = ChatTemplate::from_model_dir(&fixtures().join("models").join(&model.dir))
            .unwrap_or_else(|e| panic!("{}: {e}", model.dir));
        assert_eq!(
            format_name(template.content_format()),
            model.content_format,
            "{} content format",
            model.dir
        );
        assert_eq!(
            template.bos_token(),
            model.bos_token.as_deref(),
            "{} bos",
            model.dir
        );
        assert_eq!(
            template.eos_token(),
            model.eos_token.as_deref(),
            "{} eos",
            model.dir
        );
        for case in &model.cases {
            let actual = template.render_with_kwargs(
                &messages(&case.messages),
                case.add_generation_prompt,
                &case.image_placeholder,
                &case.kwargs,
            );
            failures.extend(check(
                &format!("{} / {}", model.dir, case.name),
                actual,
                &case.expected,
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn engine_features_behave_like_transformers() {
    let mut failures = Vec::new();
    for case in reference().features {
        let actual = ChatTemplate::new(&case.template, None, None)
            .and_then(|t| t.render_with_kwargs(&[], false, "", &case.kwargs));
        failures.extend(check(&case.name, actual, &case.expected));
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn content_format_detection_matches_vllm() {
    let mismatches: Vec<String> = reference()
        .detection
        .iter()
        .filter(|case| format_name(detect_content_format(&case.template)) != case.content_format)
        .map(|case| format!("{}: expected {}", case.name, case.content_format))
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[test]
fn strftime_matches_python() {
    let mismatches: Vec<String> = reference()
        .strftime
        .iter()
        .filter(|case| strftime(&case.format, case.unix_seconds) != case.output)
        .map(|case| {
            let got = strftime(&case.format, case.unix_seconds);
            format!(
                "{} {:?}: expected {:?}, got {got:?}",
                case.unix_seconds, case.format, case.output
            )
        })
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[test]
fn mistral_rejects_non_alternating_roles_as_a_client_error() {
    let template =
        ChatTemplate::from_model_dir(&fixtures().join("models/mistral-7b-instruct-v0.3")).unwrap();
    let err = template
        .render(
            &[
                PromptMessage::text("user", "a"),
                PromptMessage::text("user", "b"),
            ],
            true,
            "",
        )
        .unwrap_err();
    assert!(err.is_client_error());
    assert!(err.to_string().contains("roles must alternate"), "{err}");
}

#[test]
fn missing_template_names_the_files_looked_for() {
    let dir = fixtures().join("models/does-not-exist");
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err();
    assert!(matches!(err, TemplateError::Missing { .. }));
    let text = err.to_string();
    assert!(
        text.contains("chat_template.json") && text.contains("tokenizer_config.json"),
        "{text}"
    );
}
