//! `ModelError`: everything that can go wrong loading a checkpoint or running a step.
//!
//! Load-time errors name the file (or config key) at fault; step-time input errors name the
//! sequence, so the engine can fail just that request.

use std::path::PathBuf;

/// Errors from loading or running a [`super::LlavaModel`].
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A required file is not in the model directory.
    #[error("missing file {0}")]
    MissingFile(PathBuf),
    /// The shard index names a file that is not there.
    #[error("{index} references missing shard {shard}")]
    MissingShard { index: PathBuf, shard: String },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `config.json` (or the shard index) is malformed or has a bad value.
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    /// The checkpoint describes an architecture this crate does not implement.
    #[error("unsupported architecture: {what} {name:?}")]
    Unsupported { what: &'static str, name: String },
    /// The safetensors files do not hold the tensors the config asks for.
    #[error("weights: {0}")]
    Weights(String),
    /// A step's input is inconsistent (wrong position, image rows, token ids, ...).
    #[error("sequence {seq_id}: {message}")]
    Input { seq_id: u64, message: String },
    /// The batch as a whole is malformed (empty, duplicate ids, wrong cache).
    #[error("invalid batch: {0}")]
    Batch(String),
    /// The image tensor has the wrong shape.
    #[error("pixel_values: {0}")]
    Pixels(String),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn config(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            file: file.into(),
            message: message.into(),
        }
    }

    pub(crate) fn input(seq_id: u64, message: impl Into<String>) -> Self {
        Self::Input {
            seq_id,
            message: message.into(),
        }
    }
}
