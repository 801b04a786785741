//! The language model's `text_config` (Llama, Qwen2, Mistral), with each family's
//! transformers defaults for keys a hub config leaves out.

use super::activation::Activation;
use super::config::eos_list;
use super::json::Section;
use super::rope::RopeConfig;
use super::ModelError;

/// Which decoder family the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// `llama`: optional `attention_bias` (q/k/v/o) and `mlp_bias`.
    Llama,
    /// `qwen2`: q/k/v carry a bias; optional sliding window on upper layers.
    Qwen2,
    /// `mistral`: sliding window on every layer when `sliding_window` is set.
    Mistral,
}

/// The decoder's configuration, resolved to concrete values.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub kind: TextKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on gate/up/down projections.
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Per layer: `Some(w)` when a query may only see the last `w` positions (itself included).
    pub sliding_window: Vec<Option<usize>>,
    /// `eos_token_id` of the text config (family default when absent); may be empty.
    pub eos_token_ids: Vec<u32>,
}

/// Family defaults, as in transformers' `LlamaConfig`, `Qwen2Config`, `MistralConfig`.
struct Defaults {
    vocab_size: usize,
    intermediate_size: usize,
    /// `None`: as many as attention heads.
    kv_heads: Option<usize>,
    max_positions: usize,
    eos: Option<i64>,
}

impl TextKind {
    fn defaults(self) -> Defaults {
        match self {
            Self::Llama => Defaults {
                vocab_size: 32000,
                intermediate_size: 11008,
                kv_heads: None,
                max_positions: 2048,
                eos: Some(2),
            },
            Self::Qwen2 => Defaults {
                vocab_size: 151936,
                intermediate_size: 22016,
                kv_heads: Some(32),
                max_positions: 32768,
                eos: None,
            },
            Self::Mistral => Defaults {
                vocab_size: 32000,
                intermediate_size: 14336,
                kv_heads: Some(8),
                max_positions: 131072,
                eos: Some(2),
            },
        }
    }
}

impl TextConfig {
    pub(crate) fn parse(s: &Section<'_>) -> Result<Self, ModelError> {
        let kind = match s.str_or("model_type", "llama")? {
            "llama" => TextKind::Llama,
            "qwen2" => TextKind::Qwen2,
            "mistral" => TextKind::Mistral,
            other => {
                return Err(ModelError::Unsupported {
                    what: "text model_type",
                    name: other.to_string(),
                })
            }
        };
        let d = kind.defaults();
        let hidden_size = s.positive_or("hidden_size", 4096)?;
        let heads = s.positive_or("num_attention_heads", 32)?;
        let kv_heads = s.positive_or("num_key_value_heads", d.kv_heads.unwrap_or(heads))?;
        if heads % kv_heads != 0 {
            return Err(s.error("num_key_value_heads", "must divide num_attention_heads"));
        }
        let head_dim = s.positive_or("head_dim", hidden_size / heads)?;
        if head_dim % 2 != 0 {
            return Err(s.error("head_dim", "must be even for rotary embeddings"));
        }
        let num_layers = s.usize_or("num_hidden_layers", 32)?;
        let max_positions = s.positive_or("max_position_embeddings", d.max_positions)?;
        let act = s.str_or("hidden_act", "silu")?;
        let attention_bias = s.bool_or("attention_bias", false)?;
        let eos_token_ids = match (s.has("eos_token_id"), d.eos) {
            (false, Some(id)) => vec![id as u32],
            _ => eos_list(s)?,
        };
        Ok(Self {
            kind,
            vocab_size: s.positive_or("vocab_size", d.vocab_size)?,
            hidden_size,
            intermediate_size: s.positive_or("intermediate_size", d.intermediate_size)?,
            num_hidden_layers: num_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            hidden_act: Activation::from_name(act)
                .ok_or_else(|| s.error("hidden_act", format!("unknown activation {act:?}")))?,
            max_position_embeddings: max_positions,
            rms_norm_eps: s.f64_or("rms_norm_eps", 1e-6)?,
            rope: RopeConfig::parse(s, max_positions)?,
            qkv_bias: kind == TextKind::Qwen2 || (kind == TextKind::Llama && attention_bias),
            o_bias: kind == TextKind::Llama && attention_bias,
            mlp_bias: kind == TextKind::Llama && s.bool_or("mlp_bias", false)?,
            tie_word_embeddings: s.bool_or("tie_word_embeddings", false)?,
            sliding_window: sliding_windows(s, kind, num_layers)?,
            eos_token_ids,
        })
    }
}

/// Per-layer sliding windows as transformers resolves them for each family.
fn sliding_windows(
    s: &Section<'_>,
    kind: TextKind,
    num_layers: usize,
) -> Result<Vec<Option<usize>>, ModelError> {
    // An explicit `null` disables the window; an absent key takes the family default (4096).
    let window = if s.has("sliding_window") {
        s.opt_usize("sliding_window")?
    } else {
        Some(4096)
    };
    if window == Some(0) {
        return Err(s.error("sliding_window", "must be positive"));
    }
    match kind {
        TextKind::Llama => Ok(vec![None; num_layers]),
        TextKind::Mistral => Ok(vec![window; num_layers]),
        TextKind::Qwen2 => {
            let window = if s.bool_or("use_sliding_window", false)? {
                window
            } else {
                None
            };
            qwen2_layer_windows(s, window, num_layers)
        }
    }
}

/// Qwen2: explicit `layer_types`, else sliding from `max_window_layers` (default 28) upwards.
fn qwen2_layer_windows(
    s: &Section<'_>,
    window: Option<usize>,
    num_layers: usize,
) -> Result<Vec<Option<usize>>, ModelError> {
    match s.get("layer_types") {
        Some(serde_json::Value::Array(types)) if types.len() == num_layers => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(window),
                Some("full_attention") => Ok(None),
                _ => Err(s.error("layer_types", format!("unsupported layer type {t}"))),
            })
            .collect(),
        Some(_) => Err(s.error("layer_types", "expected one entry per layer")),
        None => {
            let first = s.usize_or("max_window_layers", 28)?;
            Ok((0..num_layers)
                .map(|i| window.filter(|_| i >= first))
                .collect())
        }
    }
}
