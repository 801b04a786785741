//! Finding and opening a checkpoint's safetensors, and telling the two tensor layouts apart.
//!
//! transformers 5.x writes `vision_tower.X` (and may write `language_model.X`, `lm_head.weight`);
//! 4.x-era hub checkpoints use `vision_tower.vision_model.X`, `language_model.model.X` and
//! `language_model.lm_head.weight`. Each part's prefix is detected from the tensor names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::ModelError;

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The safetensors files of `dir`: the shards listed by `model.safetensors.index.json` when
/// present, else `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join(INDEX);
    if !index.exists() {
        let single = dir.join(SINGLE);
        return match single.exists() {
            true => Ok(vec![single]),
            false => Err(ModelError::MissingFile(single)),
        };
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::config(&index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::config(&index, "no weight_map object"))?;
    let shards: BTreeSet<&str> = map
        .values()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ModelError::config(&index, format!("bad shard name {v}")))
        })
        .collect::<Result<_, _>>()?;
    shards
        .into_iter()
        .map(|shard| {
            let path = dir.join(shard);
            match path.is_file() {
                true => Ok(path),
                false => Err(ModelError::MissingShard {
                    index: index.clone(),
                    shard: shard.to_string(),
                }),
            }
        })
        .collect()
}

/// Memory-maps `files` as one tensor namespace; tensors convert to `dtype` when fetched.
pub fn open(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    // SAFETY: the mapped files must not be modified while the model is loading; we only read
    // them, and tensors are copied out of the mapping when fetched.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) };
    vb.map_err(|e| ModelError::Weights(format!("cannot open safetensors: {e}")))
}

/// Where each part of the model lives in the checkpoint.
pub struct Layout {
    /// Vision encoder root (holds `embeddings.*`, `encoder.layers.*`).
    pub vision: VarBuilder<'static>,
    /// `multi_modal_projector`.
    pub projector: VarBuilder<'static>,
    /// Decoder body (holds `embed_tokens`, `layers.*`, `norm`).
    pub text: VarBuilder<'static>,
    /// The output projection's `weight`, or `None` when only tied embeddings can serve.
    pub lm_head: Option<VarBuilder<'static>>,
}

impl Layout {
    /// Detects the prefixes of both layouts (and of a `model.`-prefixed state dict).
    pub fn detect(vb: &VarBuilder<'static>) -> Result<Self, ModelError> {
        let vision = find(
            vb,
            &[
                "vision_tower.vision_model",
                "vision_tower",
                "model.vision_tower.vision_model",
                "model.vision_tower",
            ],
            "embeddings.patch_embedding.weight",
        )?;
        let projector = find(
            vb,
            &["multi_modal_projector", "model.multi_modal_projector"],
            "linear_1.weight",
        )?;
        let text = find(
            vb,
            &[
                "language_model.model",
                "language_model",
                "model.language_model",
            ],
            "embed_tokens.weight",
        )?;
        let lm_head = ["language_model.lm_head", "lm_head"]
            .iter()
            .map(|p| vb.pp(p))
            .find(|v| v.contains_tensor("weight"));
        Ok(Self {
            vision,
            projector,
            text,
            lm_head,
        })
    }
}

/// Finds the first prefix under which `probe` exists.
pub(crate) fn find(
    vb: &VarBuilder<'static>,
    prefixes: &[&str],
    probe: &str,
) -> Result<VarBuilder<'static>, ModelError> {
    prefixes
        .iter()
        .map(|p| vb.pp(p))
        .find(|v| v.contains_tensor(probe))
        .ok_or_else(|| {
            let tried: Vec<String> = prefixes.iter().map(|p| format!("{p}.{probe}")).collect();
            ModelError::Weights(format!("no tensor named any of {}", tried.join(", ")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mmserve-weights-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn missing_files_are_named() {
        let dir = temp_dir("missing");
        let err = safetensors_files(&dir).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("model.safetensors")));
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#;
        std::fs::write(dir.join(INDEX), index).expect("write index");
        let err = safetensors_files(&dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("model.safetensors.index.json references missing shard model-00001-of-00002.safetensors"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
