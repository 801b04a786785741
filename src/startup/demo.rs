//! The demo models compiled into the binary: the tiny LLaVA and CLIP trained on procedural scenes
//! by `scripts/demo/train.py` (weights in `models/demo/`), served when no model is configured.
//!
//! The loaders read Hugging Face directories, so on first use the embedded files are written to a
//! directory under the system's temporary folder, named by a hash of their contents (a new build
//! with other weights gets a new directory; a second start reuses the first one's files).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::ModelConfig;

/// The name clients send to reach the demo chat model.
pub const CHAT_NAME: &str = "mmserve-demo";
/// The name clients send to reach the demo embedding model.
pub const EMBEDDING_NAME: &str = "mmserve-demo-clip";

macro_rules! embed_dir {
    ($dir:literal: $($file:literal),+ $(,)?) => {
        &[$(($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo/", $dir, "/", $file)))),+]
    };
}

type Files = &'static [(&'static str, &'static [u8])];

const LLAVA: Files = embed_dir!("llava":
    "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
    "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
);
const CLIP: Files = embed_dir!("clip":
    "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json",
);

/// The demo models' configs, their files written out first where they are not already.
pub fn models() -> Result<Vec<ModelConfig>> {
    let root = std::env::temp_dir().join(format!("mmserve-demo-{:016x}", content_hash()));
    let mut out = Vec::new();
    for (dir, files, name) in [("llava", LLAVA, CHAT_NAME), ("clip", CLIP, EMBEDDING_NAME)] {
        let path = root.join(dir);
        write_once(&path, files)
            .with_context(|| format!("writing the demo model to {}", path.display()))?;
        let mut m = ModelConfig::new(path);
        m.name = name.to_string();
        out.push(m);
    }
    Ok(out)
}

fn content_hash() -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, bytes) in LLAVA.iter().chain(CLIP) {
        name.hash(&mut h);
        bytes.hash(&mut h);
    }
    h.finish()
}

/// Writes `files` into `dir` unless every one is already there with the right size. Files go to a
/// private folder first and are renamed into place, so concurrent starts never see half a file.
fn write_once(dir: &Path, files: Files) -> std::io::Result<()> {
    let complete = files.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    });
    if complete {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let staging: PathBuf = dir.with_extension(format!("partial-{}", std::process::id()));
    std::fs::create_dir_all(&staging)?;
    for (name, bytes) in files {
        std::fs::write(staging.join(name), bytes)?;
        std::fs::rename(staging.join(name), dir.join(name))?;
    }
    std::fs::remove_dir(&staging)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_files_once_and_repairs_a_truncated_one() {
        let dir = std::env::temp_dir().join(format!("mmserve-demo-test-{}", std::process::id()));
        write_once(&dir, CLIP).unwrap();
        let weights = dir.join("model.safetensors");
        let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
        write_once(&dir, CLIP).unwrap();
        assert_eq!(
            std::fs::metadata(&weights).unwrap().modified().unwrap(),
            written
        );
        std::fs::write(&weights, b"truncated").unwrap();
        write_once(&dir, CLIP).unwrap();
        assert_eq!(std::fs::read(&weights).unwrap(), CLIP[1].1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
