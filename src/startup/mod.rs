//! Start-up: turns the configured model directories into running engines.
//! The only library module allowed `anyhow`: failures here stop the process
//! with a message that names the file at fault.

mod chat;
pub mod demo;
mod device;
mod embed;
mod progress;

use std::path::Path;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::api::Served;
use crate::config::{Config, KindSetting, ModelConfig, ModelKind};
use crate::model::CHAT_MODEL_TYPES;

/// What a model directory serves: from the configured kind, else from
/// `config.json`'s `model_type`.
pub fn model_kind(m: &ModelConfig) -> Result<ModelKind> {
    if !m.path.is_dir() {
        bail!("the model directory {} does not exist", m.path.display());
    }
    let path = m.path.join("config.json");
    let Some(json) = read_json(&path)? else {
        bail!(
            "{} is not a Hugging Face model directory: {} is missing",
            m.path.display(),
            path.display()
        );
    };
    let model_type = json["model_type"].as_str().unwrap_or("");
    let architectures = match &json["architectures"] {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let detected = if CHAT_MODEL_TYPES.contains(&model_type) {
        Some(ModelKind::Chat)
    } else if ["clip", "siglip"].contains(&model_type) {
        Some(ModelKind::Embedding)
    } else {
        None
    };
    match (m.kind, detected) {
        (KindSetting::Auto, Some(kind)) => Ok(kind),
        (KindSetting::Auto, None) => bail!(
            "unsupported model_type '{model_type}' (architectures: {}) in {}: mmserve serves {} \
             (chat), clip and siglip (embedding)",
            architectures.join(", "),
            path.display(),
            CHAT_MODEL_TYPES.join(", ")
        ),
        (KindSetting::Chat, Some(ModelKind::Chat)) => Ok(ModelKind::Chat),
        (KindSetting::Embedding, Some(ModelKind::Embedding)) => Ok(ModelKind::Embedding),
        (set, _) => bail!(
            "{} is configured as kind {set:?} but its model_type is `{model_type}`",
            m.path.display()
        ),
    }
}

/// Loads one model of a known kind and starts its engine threads (one per device).
pub fn load(
    cfg: &Config,
    m: &ModelConfig,
    kind: ModelKind,
) -> Result<(Served, Vec<JoinHandle<()>>)> {
    let progress = progress::start(&m.served_name(), &m.path);
    let loaded = match kind {
        ModelKind::Chat => {
            let (s, j) = chat::load(cfg, m)?;
            (Served::Chat(s), j)
        }
        ModelKind::Embedding => {
            let (s, j) = embed::load(cfg, m)?;
            (Served::Embed(s), j)
        }
    };
    progress.done();
    Ok(loaded)
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
    Ok(Some(v))
}
