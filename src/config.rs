//! Server configuration: the commented defaults in `config/mmserve.toml`
//! (compiled in), an optional user file over them, then command-line flags.
//! Parsed once into these structs; nothing downstream re-checks them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::preprocess::ImageLimits;

/// The defaults, documented in place.
pub const DEFAULT_CONFIG: &str = include_str!("../config/mmserve.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub models: Vec<ModelConfig>,
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub limits: LimitsConfig,
    pub debug: DebugConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    /// Most request headers, and their total bytes (names and values).
    pub max_header_count: usize,
    pub max_header_bytes: usize,
    /// Keys accepted as `Authorization: Bearer KEY`; empty: no key needed.
    /// `Config::load` adds those of `api_keys_file`, `main` those of the
    /// `--api-key` flag / `MMSERVE_API_KEYS`.
    pub api_keys: Vec<String>,
    /// A file of keys, one per line (`#` starts a comment); empty: none.
    pub api_keys_file: PathBuf,
    /// Origins a browser may call the API from (CORS); empty: CORS off; `*`: any.
    pub cors_allow_origins: Vec<String>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub drain_timeout_secs: u64,
    /// How log lines are written to stdout.
    pub log_format: LogFormat,
}

/// Log lines as human-readable text or as one JSON object per line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl ServerConfig {
    /// Adds the keys of `api_keys_file`, if one is set.
    fn read_api_keys_file(&mut self) -> Result<(), ConfigError> {
        if self.api_keys_file.as_os_str().is_empty() {
            return Ok(());
        }
        let path = &self.api_keys_file;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let keys = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|k| !k.is_empty())
            .map(str::to_string);
        self.api_keys.extend(keys);
        Ok(())
    }
}

/// One served model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A local Hugging Face model directory.
    pub path: PathBuf,
    /// The name clients send in `model`; empty: the directory's name.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub kind: KindSetting,
    #[serde(default)]
    pub dtype: Dtype,
    /// Quantize the decoder's projections at load; `None`: keep `dtype`.
    #[serde(default)]
    pub quantize: Option<Quantize>,
    /// How a chat model's vision tower runs its f32 products on the CPU.
    #[serde(default)]
    pub vision_matmul_precision: MatmulPrecision,
}

impl ModelConfig {
    pub fn new(path: PathBuf) -> Self {
        ModelConfig {
            path,
            name: String::new(),
            kind: KindSetting::Auto,
            dtype: Dtype::Auto,
            quantize: None,
            vision_matmul_precision: MatmulPrecision::Highest,
        }
    }

    /// The name clients use: the configured one, else the directory's name.
    pub fn served_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mmserve".to_string())
    }
}

/// What a model serves: chat completions or embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// `kind` in the config: a fixed kind, or read from the model's config.json.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindSetting {
    #[default]
    Auto,
    Chat,
    Embedding,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    // f32 on the CPU (it has no fast bf16 matmul), bf16 on a GPU. (A plain comment: a doc
    // comment would make clap list every value in `--help` on lines of their own.)
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// The dtype on the CPU (where `auto` is f32).
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::Auto | Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// A GGML block type for the decoder's projections (`--quantize`): bits per weight
/// 8.5 (Q8_0, blocks of 32 inputs), 4.5 (Q4K) and 6.56 (Q6K, blocks of 256 inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum Quantize {
    #[serde(rename = "q8_0")]
    #[value(name = "q8_0")]
    Q8_0,
    #[serde(rename = "q4k")]
    #[value(name = "q4k")]
    Q4K,
    #[serde(rename = "q6k")]
    #[value(name = "q6k")]
    Q6K,
}

impl Quantize {
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4K => GgmlDType::Q4K,
            Quantize::Q6K => GgmlDType::Q6K,
        }
    }
}

/// f32 products of the vision tower, named as PyTorch's `set_float32_matmul_precision`:
/// `highest` in f32; `high` as bf16x3 on AMX tiles where the CPU has them (each operand the sum
/// of two bf16, about 16 significant bits: ~1e-5 relative error per product, 2x faster here),
/// else in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    #[default]
    Highest,
    High,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    /// Most image tokens whose vision encoder runs in one step; 0: automatic (by device).
    pub max_encoder_tokens: usize,
    /// Bytes of the paged KV cache of each chat model.
    pub kv_cache_bytes: usize,
    /// Bytes of vision-encoder output each chat model keeps by image hash;
    /// 0: no image cache.
    pub image_cache_bytes: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Keep finished sequences' full KV blocks for later requests with the same prefix.
    pub enable_prefix_caching: bool,
    pub default_max_tokens: usize,
    pub max_embedding_batch: usize,
    /// Most sequences waiting for a seat per engine; beyond it, 429.
    pub max_waiting: usize,
    /// Deadline of a request (queue and generation), in seconds; 0: none.
    pub request_timeout_secs: u64,
    /// Where each chat model runs: one engine (thread, model copy, KV cache) per entry.
    pub devices: Vec<String>,
    /// On a GPU, the share of the memory free after loading the weights its KV cache takes.
    pub gpu_memory_utilization: f64,
}

impl EngineConfig {
    /// The configured request deadline, if any.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        (self.request_timeout_secs > 0)
            .then(|| std::time::Duration::from_secs(self.request_timeout_secs))
    }
}

/// Switches for tests; all off by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// Honour the `x-mmserve-test-hook` request header (fault injection).
    pub test_hooks: bool,
    /// With `test_hooks`: hold each model's warm-up until this file exists
    /// (empty: do not wait), so that tests can see `/ready` before it.
    pub warmup_gate: String,
    /// With `test_hooks`: the test hook the chat warm-up requests carry
    /// (empty: none), e.g. `fail-forward` to make the warm-up fail.
    pub warmup_hook: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_images_per_request: usize,
    pub max_n: usize,
    pub max_top_logprobs: usize,
    pub max_embedding_inputs: usize,
    pub max_image_bytes: usize,
    pub max_image_width: u32,
    pub max_image_height: u32,
    pub max_image_pixels: u64,
    pub min_image_side: u32,
    pub max_image_aspect_ratio: u32,
}

impl LimitsConfig {
    /// What one uploaded image may be.
    pub fn image(&self) -> ImageLimits {
        ImageLimits {
            max_bytes: self.max_image_bytes,
            max_width: self.max_image_width,
            max_height: self.max_image_height,
            max_pixels: self.max_image_pixels,
            min_side: self.min_image_side,
            max_aspect_ratio: self.max_image_aspect_ratio,
        }
    }
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
        let mut cfg: Config = toml::Value::Table(base)
            .try_into()
            .map_err(|source| ConfigError::Parse { origin, source })?;
        cfg.server.read_api_keys_file()?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Ranges that would make the server useless.
    pub fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("engine.max_num_seqs", self.engine.max_num_seqs),
            ("engine.max_batched_tokens", self.engine.max_batched_tokens),
            ("engine.kv_cache_bytes", self.engine.kv_cache_bytes),
            ("engine.block_size", self.engine.block_size),
            ("engine.default_max_tokens", self.engine.default_max_tokens),
            (
                "engine.max_embedding_batch",
                self.engine.max_embedding_batch,
            ),
            ("limits.max_n", self.limits.max_n),
            (
                "limits.max_embedding_inputs",
                self.limits.max_embedding_inputs,
            ),
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.max_header_count", self.server.max_header_count),
            ("server.max_header_bytes", self.server.max_header_bytes),
            ("limits.max_image_bytes", self.limits.max_image_bytes),
            (
                "limits.max_image_width",
                self.limits.max_image_width as usize,
            ),
            (
                "limits.max_image_height",
                self.limits.max_image_height as usize,
            ),
            (
                "limits.max_image_pixels",
                self.limits.max_image_pixels as usize,
            ),
            ("limits.min_image_side", self.limits.min_image_side as usize),
            (
                "limits.max_image_aspect_ratio",
                self.limits.max_image_aspect_ratio as usize,
            ),
            ("engine.max_waiting", self.engine.max_waiting),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        for (key, v) in [
            ("debug.warmup_gate", &self.debug.warmup_gate),
            ("debug.warmup_hook", &self.debug.warmup_hook),
        ] {
            if !v.is_empty() && !self.debug.test_hooks {
                return Err(ConfigError::Invalid(format!(
                    "{key} needs debug.test_hooks = true"
                )));
            }
        }
        if self.engine.max_batched_tokens < self.engine.max_num_seqs {
            // Else the newest running sequences would get no token while older ones run.
            return Err(ConfigError::Invalid(format!(
                "engine.max_batched_tokens ({}) must be at least engine.max_num_seqs ({})",
                self.engine.max_batched_tokens, self.engine.max_num_seqs
            )));
        }
        if self.engine.devices.is_empty() {
            return Err(ConfigError::Invalid(
                "engine.devices must name at least one device (\"cpu\" or \"cuda:N\")".into(),
            ));
        }
        let share = self.engine.gpu_memory_utilization;
        if !(share > 0.0 && share <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "engine.gpu_memory_utilization ({share}) must be in (0, 1]"
            )));
        }
        if self.server.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError::Invalid(
                "server.api_keys must not hold an empty key".into(),
            ));
        }
        let bad_origin = |o: &&String| {
            let web = o.starts_with("http://") || o.starts_with("https://");
            !(o.as_str() == "*"
                || web && !o.contains(|c: char| c.is_whitespace() || c.is_control()))
        };
        if let Some(o) = self.server.cors_allow_origins.iter().find(bad_origin) {
            return Err(ConfigError::Invalid(format!(
                "server.cors_allow_origins: `{o}` is not `*` or an http(s) origin"
            )));
        }
        let cpu_only = self.engine.devices.iter().all(|d| d.trim() == "cpu");
        let bf16 = self.models.iter().find(|m| m.dtype == Dtype::Bf16);
        if let Some(m) = bf16.filter(|_| cpu_only) {
            // candle has no bf16 matmul on CPU: every product would widen both sides to f32.
            return Err(ConfigError::Invalid(format!(
                "model {}: dtype bf16 is about 15 times slower than f32 on CPU; use f32 or \
                 f16 (bf16 checkpoints are converted when loaded), or a GPU (--devices cuda:0)",
                m.path.display()
            )));
        }
        let mut names: Vec<String> = self.models.iter().map(|m| m.served_name()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid(format!(
                "two models are named `{}`: give them distinct names",
                w[0]
            )));
        }
        Ok(())
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
        assert!(cfg.models.is_empty());
    }

    #[test]
    fn models_are_listed_with_defaults_and_unique_names() {
        let dir = std::env::temp_dir().join(format!("mmserve-cfgm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.toml");
        let two = "[[models]]\npath = \"/m/a\"\nquantize = \"q8_0\"\nvision_matmul_precision = \"high\"\n[[models]]\npath = \"/m/b\"\nkind = \"embedding\"\ndtype = \"f16\"\n";
        std::fs::write(&f, two).unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert_eq!(cfg.models.len(), 2);
        assert_eq!(cfg.models[0].kind, KindSetting::Auto);
        assert_eq!(cfg.models[0].dtype, Dtype::Auto);
        assert_eq!(cfg.models[1].kind, KindSetting::Embedding);
        assert_eq!(cfg.models[1].dtype, Dtype::F16);
        assert_eq!(cfg.models[0].quantize, Some(Quantize::Q8_0));
        assert_eq!(cfg.models[1].quantize, None);
        assert_eq!(cfg.models[0].vision_matmul_precision, MatmulPrecision::High);
        assert_eq!(
            cfg.models[1].vision_matmul_precision,
            MatmulPrecision::Highest
        );
        std::fs::write(&f, "[[models]]\npath = \"/m/a\"\ndtype = \"bf16\"\n").unwrap();
        let err = Config::load(Some(&f)).err().map(|e| e.to_string());
        assert!(
            err.is_some_and(|e| e.contains("bf16")),
            "bf16 compute is refused"
        );
        std::fs::write(
            &f,
            "[[models]]\npath = \"/x/a\"\n[[models]]\npath = \"/y/a\"\n",
        )
        .unwrap();
        assert!(
            Config::load(Some(&f)).is_err(),
            "duplicate names are refused"
        );
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
        let starved = "[engine]\nmax_num_seqs = 8\nmax_batched_tokens = 7\n";
        std::fs::write(&f, starved).unwrap();
        assert!(
            Config::load(Some(&f)).is_err(),
            "a step must fit every decode"
        );
    }

    #[test]
    fn api_keys_come_from_the_config_and_its_key_file() {
        let dir = std::env::temp_dir().join(format!("mmserve-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys");
        std::fs::write(
            &keys,
            "# team keys
sk-one

  sk-two  # ci
",
        )
        .unwrap();
        let f = dir.join("c.toml");
        let toml = format!(
            "[server]\napi_keys = [\"sk-zero\"]\napi_keys_file = {:?}\n",
            keys.display().to_string()
        );
        std::fs::write(&f, toml).unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert_eq!(cfg.server.api_keys, ["sk-zero", "sk-one", "sk-two"]);
        std::fs::write(&f, "[server]\napi_keys_file = \"/nonexistent/keys\"\n").unwrap();
        assert!(
            Config::load(Some(&f)).is_err(),
            "a missing key file is an error"
        );
        std::fs::write(&f, "[server]\napi_keys = [\" \"]\n").unwrap();
        assert!(Config::load(Some(&f)).is_err(), "an empty key is refused");
    }

    #[test]
    fn served_name_defaults_to_the_directory() {
        let mut m = ModelConfig::new(PathBuf::from("/models/llava-1.5-7b-hf"));
        assert_eq!(m.served_name(), "llava-1.5-7b-hf");
        m.name = "llava".into();
        assert_eq!(m.served_name(), "llava");
    }
}
