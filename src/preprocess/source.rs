//! Where a checkpoint keeps its image-processor settings.
//!
//! Hub checkpoints have `preprocessor_config.json`. A directory saved by transformers 5 from a
//! processor (`LlavaProcessor.save_pretrained`) has none: the settings are the `image_processor`
//! entry of `processor_config.json`. transformers reads either, and so do we.

use std::path::Path;

use serde_json::Value;

use super::PreprocessError;

fn err(msg: impl Into<String>) -> PreprocessError {
    PreprocessError::Config(msg.into())
}

/// Finds the image-processor settings of the checkpoint in `dir` and hands their JSON text to
/// `parse` (one of the processors' `from_json_str`); errors name the file they came from.
pub fn read_image_processor<T>(
    dir: &Path,
    parse: impl FnOnce(&str) -> Result<T, PreprocessError>,
) -> Result<T, PreprocessError> {
    let (label, text) = settings(dir)?;
    parse(&text).map_err(|e| match e {
        PreprocessError::Config(msg) => err(format!("{label}: {msg}")),
        other => other,
    })
}

/// `(where they came from, their JSON text)`.
fn settings(dir: &Path) -> Result<(String, String), PreprocessError> {
    let direct = dir.join("preprocessor_config.json");
    if direct.is_file() {
        let text = std::fs::read_to_string(&direct)
            .map_err(|e| err(format!("cannot read {}: {e}", direct.display())))?;
        return Ok((direct.display().to_string(), text));
    }
    let nested = dir.join("processor_config.json");
    let missing = || {
        err(format!(
            "cannot find the image processor's settings: no {} and no `image_processor` in {}",
            direct.display(),
            nested.display()
        ))
    };
    let text = std::fs::read_to_string(&nested).map_err(|_| missing())?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| err(format!("{}: not valid JSON: {e}", nested.display())))?;
    let entry = value.get("image_processor").ok_or_else(missing)?;
    Ok((
        format!("{}: image_processor", nested.display()),
        entry.to_string(),
    ))
}
