//! Server configuration: the commented defaults in `config/mmserve.toml`
//! (compiled in), an optional user file over them, then command-line flags.
//! Parsed once into these structs; nothing downstream re-checks them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The defaults, documented in place.
pub const DEFAULT_CONFIG: &str = include_str!("../config/mmserve.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub engine: EngineConfig,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub name: String,
    pub dtype: Dtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub default_max_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_images_per_request: usize,
    pub max_n: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// The defaults, overlaid with `file` when given.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut base: toml::Table = parse(DEFAULT_CONFIG, "defaults")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let user: toml::Table = parse(&text, &path.display().to_string())?;
            merge(&mut base, user);
        }
        let origin = file.map_or("defaults".to_string(), |p| p.display().to_string());
        let cfg: Config = toml::Value::Table(base)
            .try_into()
            .map_err(|source| ConfigError::Parse { origin, source })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Ranges that would make the server useless.
    pub fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("engine.max_num_seqs", self.engine.max_num_seqs),
            ("engine.max_batched_tokens", self.engine.max_batched_tokens),
            ("engine.default_max_tokens", self.engine.default_max_tokens),
            ("limits.max_n", self.limits.max_n),
            ("server.max_body_bytes", self.server.max_body_bytes),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The name clients use: the configured one, else the directory's name.
    pub fn served_name(&self) -> String {
        if !self.model.name.is_empty() {
            return self.model.name.clone();
        }
        self.model
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mmserve".to_string())
    }
}

fn parse(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse().map_err(|source| ConfigError::Parse {
        origin: origin.to_string(),
        source,
    })
}

/// Overlays `over` onto `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_check() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.server.port, 8000);
        assert_eq!(cfg.model.dtype, Dtype::F32);
    }

    #[test]
    fn a_user_file_overrides_only_what_it_names() {
        let dir = std::env::temp_dir().join(format!("mmserve-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[server]\nport = 9000\n[engine]\nmax_num_seqs = 2\n").unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert_eq!(cfg.server.port, 9000);
        assert_eq!(cfg.server.host, "127.0.0.1");
        assert_eq!(cfg.engine.max_num_seqs, 2);
        std::fs::write(&f, "[server]\nprot = 9000\n").unwrap();
        assert!(Config::load(Some(&f)).is_err(), "unknown keys are refused");
        std::fs::write(&f, "[engine]\nmax_num_seqs = 0\n").unwrap();
        assert!(Config::load(Some(&f)).is_err());
    }

    #[test]
    fn served_name_defaults_to_the_directory() {
        let mut cfg = Config::load(None).unwrap();
        cfg.model.path = PathBuf::from("/models/llava-1.5-7b-hf");
        assert_eq!(cfg.served_name(), "llava-1.5-7b-hf");
        cfg.model.name = "llava".into();
        assert_eq!(cfg.served_name(), "llava");
    }
}
