//! Finds a chat template and its special tokens in a Hugging Face model directory, in transformers'
//! order: `chat_template.jinja`, then `chat_template.json` (`{"chat_template": ...}`), then the
//! `chat_template` entry of `tokenizer_config.json` (a string, or a list of `{name, template}` of which
//! "default" is used). `bos_token`/`eos_token` come from tokenizer_config.json, as strings or as
//! AddedToken dicts (`{"content": ...}`).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::TemplateError;

/// What a model directory provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelTemplate {
    pub template: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

pub(crate) fn load_model_dir(dir: &Path) -> Result<ModelTemplate, TemplateError> {
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        Some(read_json(&config_path)?)
    } else {
        None
    };

    let jinja_path = dir.join("chat_template.jinja");
    let json_path = dir.join("chat_template.json");
    let template = if jinja_path.is_file() {
        read_text(&jinja_path)?
    } else if json_path.is_file() {
        template_from_chat_template_json(&json_path)?
    } else {
        match &config {
            Some(config) => template_from_config(config, &config_path)?,
            None => None,
        }
        .ok_or_else(|| TemplateError::Missing {
            dir: dir.to_path_buf(),
        })?
    };

    let (bos_token, eos_token) = match &config {
        Some(config) => (
            token(config, "bos_token", &config_path)?,
            token(config, "eos_token", &config_path)?,
        ),
        None => (None, None),
    };
    Ok(ModelTemplate {
        template,
        bos_token,
        eos_token,
    })
}

fn read_text(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Json, TemplateError> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|err| bad_file(path, format!("not valid JSON: {err}")))
}

fn bad_file(path: &Path, reason: impl Into<String>) -> TemplateError {
    TemplateError::BadFile {
        path: PathBuf::from(path),
        reason: reason.into(),
    }
}

fn template_from_chat_template_json(path: &Path) -> Result<String, TemplateError> {
    match read_json(path)?.get("chat_template") {
        Some(Json::String(template)) => Ok(template.clone()),
        _ => Err(bad_file(
            path,
            "expected an object with a string \"chat_template\"",
        )),
    }
}

/// tokenizer_config.json's `chat_template`: absent, a string, or named templates.
fn template_from_config(config: &Json, path: &Path) -> Result<Option<String>, TemplateError> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(template)) => Ok(Some(template.clone())),
        Some(Json::Array(named)) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|entry| entry.get("template").and_then(Json::as_str))
            .map(|template| Some(template.to_string()))
            .ok_or_else(|| {
                bad_file(
                    path,
                    "\"chat_template\" lists named templates but none named \"default\"",
                )
            }),
        Some(_) => Err(bad_file(
            path,
            "\"chat_template\" must be a string or a list of {name, template}",
        )),
    }
}

/// A special token: a string, an AddedToken dict, or absent/null.
fn token(config: &Json, key: &str, path: &Path) -> Result<Option<String>, TemplateError> {
    match config.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(text)) => Ok(Some(text.clone())),
        Some(Json::Object(added)) => match added.get("content") {
            Some(Json::String(text)) => Ok(Some(text.clone())),
            _ => Err(bad_file(
                path,
                format!("\"{key}\" has no string \"content\""),
            )),
        },
        Some(_) => Err(bad_file(
            path,
            format!("\"{key}\" must be a string or an AddedToken object"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch model directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str, files: &[(&str, &str)]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("mmserve-prompt-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in files {
                std::fs::write(dir.join(file), text).unwrap();
            }
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn jinja_file_wins_over_json_and_config() {
        let dir = Dir::new(
            "order",
            &[
                ("chat_template.jinja", "from jinja"),
                ("chat_template.json", r#"{"chat_template": "from json"}"#),
                (
                    "tokenizer_config.json",
                    r#"{"chat_template": "from config", "bos_token": "<s>"}"#,
                ),
            ],
        );
        let found = load_model_dir(&dir.0).unwrap();
        assert_eq!(
            (found.template.as_str(), found.bos_token.as_deref()),
            ("from jinja", Some("<s>"))
        );
        std::fs::remove_file(dir.0.join("chat_template.jinja")).unwrap();
        assert_eq!(load_model_dir(&dir.0).unwrap().template, "from json");
        std::fs::remove_file(dir.0.join("chat_template.json")).unwrap();
        assert_eq!(load_model_dir(&dir.0).unwrap().template, "from config");
    }

    #[test]
    fn named_templates_use_default_and_added_tokens_their_content() {
        let config = r#"{"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}],
                         "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": null}"#;
        let dir = Dir::new("named", &[("tokenizer_config.json", config)]);
        let found = load_model_dir(&dir.0).unwrap();
        assert_eq!(
            found,
            ModelTemplate {
                template: "d".into(),
                bos_token: Some("<s>".into()),
                eos_token: None
            }
        );
    }

    #[test]
    fn errors_name_the_directory_or_the_bad_file() {
        let dir = Dir::new(
            "missing",
            &[("tokenizer_config.json", r#"{"bos_token": "<s>"}"#)],
        );
        let err = load_model_dir(&dir.0).unwrap_err().to_string();
        assert!(
            err.contains("chat_template.jinja") && err.contains(&dir.0.display().to_string()),
            "{err}"
        );

        let dir = Dir::new(
            "nodefault",
            &[(
                "tokenizer_config.json",
                r#"{"chat_template": [{"name": "x", "template": "t"}]}"#,
            )],
        );
        let err = load_model_dir(&dir.0).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("default"),
            "{err}"
        );

        let dir = Dir::new("badjson", &[("chat_template.json", "{nope")]);
        let err = load_model_dir(&dir.0).unwrap_err().to_string();
        assert!(
            err.contains("chat_template.json") && err.contains("not valid JSON"),
            "{err}"
        );

        let dir = Dir::new(
            "badtoken",
            &[
                ("chat_template.jinja", "x"),
                ("tokenizer_config.json", r#"{"eos_token": 3}"#),
            ],
        );
        let err = load_model_dir(&dir.0).unwrap_err().to_string();
        assert!(err.contains("eos_token"), "{err}");
    }
}
