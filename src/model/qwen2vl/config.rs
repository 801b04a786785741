//! `config.json` of a Qwen2-VL / Qwen2.5-VL checkpoint, in both shapes: transformers 5.x
//! (decoder settings under `text_config`, rope under `rope_parameters`) and 4.x hub (decoder
//! settings at the top level, `rope_scaling: {type: "mrope", mrope_section}`). Absent keys take
//! the transformers 5.24 config-class defaults.

use std::path::Path;

use serde_json::{Map, Value};

use crate::model::activation::Activation;
use crate::model::json::{self, Section};
use crate::model::text_config::TextConfig;
use crate::model::ModelError;

/// Which generation of the architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qwen2VlKind {
    /// `qwen2_vl`: LayerNorm blocks with a fc1/fc2 MLP, full attention in every block.
    Qwen2Vl,
    /// `qwen2_5_vl`: RMSNorm blocks with a SwiGLU MLP, windowed attention except in
    /// `fullatt_block_indexes`.
    Qwen25Vl,
}

/// The vision tower's `vision_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlVisionConfig {
    pub depth: usize,
    /// Width inside the tower (`embed_dim` for Qwen2-VL, `hidden_size` for Qwen2.5-VL).
    pub embed_dim: usize,
    /// Width of the merged output rows (Qwen2-VL `hidden_size`, Qwen2.5-VL `out_hidden_size`).
    pub out_dim: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub hidden_act: Activation,
    /// Base of the 2D (h, w) rotary embedding.
    pub rope_theta: f64,
    /// Window side in pixels (Qwen2.5-VL); `None`: every block attends over the whole frame.
    pub window_size: Option<usize>,
    /// Blocks that attend over the whole frame (Qwen2.5-VL).
    pub fullatt_block_indexes: Vec<usize>,
}

impl Qwen2VlVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Values per patch row: C * temporal_patch * patch * patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn parse(s: &Section<'_>, kind: Qwen2VlKind) -> Result<Self, ModelError> {
        let (embed_dim, out_dim, intermediate, act) = match kind {
            Qwen2VlKind::Qwen2Vl => {
                let embed = s.positive_or("embed_dim", 1280)?;
                let ratio = s.positive_or("mlp_ratio", 4)?;
                (
                    embed,
                    s.positive_or("hidden_size", 3584)?,
                    embed * ratio,
                    "quick_gelu",
                )
            }
            Qwen2VlKind::Qwen25Vl => (
                s.positive_or("hidden_size", 3584)?,
                s.positive_or("out_hidden_size", 3584)?,
                s.positive_or("intermediate_size", 3420)?,
                "silu",
            ),
        };
        let act_name = s.str_or("hidden_act", act)?;
        let channels = match s.opt_usize("in_channels")? {
            Some(c) => c,
            None => s.positive_or("in_chans", 3)?,
        };
        let empty = Map::new();
        let rope = s.nested(
            "rope_parameters",
            s.object("rope_parameters")?.unwrap_or(&empty),
        );
        let depth = s.usize_or("depth", 32)?;
        let cfg = Self {
            depth,
            embed_dim,
            out_dim,
            intermediate_size: intermediate,
            num_heads: s.positive_or("num_heads", 16)?,
            in_channels: channels,
            patch_size: s.positive_or("patch_size", 14)?,
            temporal_patch_size: s.positive_or("temporal_patch_size", 2)?,
            spatial_merge_size: s.positive_or("spatial_merge_size", 2)?,
            hidden_act: Activation::from_name(act_name)
                .ok_or_else(|| s.error("hidden_act", format!("unknown activation {act_name:?}")))?,
            rope_theta: rope.f64_or("rope_theta", 10_000.0)?,
            window_size: match kind {
                Qwen2VlKind::Qwen2Vl => None,
                Qwen2VlKind::Qwen25Vl => Some(s.positive_or("window_size", 112)?),
            },
            fullatt_block_indexes: match kind {
                Qwen2VlKind::Qwen2Vl => Vec::new(),
                Qwen2VlKind::Qwen25Vl => fullatt_blocks(s, depth)?,
            },
        };
        if !cfg.embed_dim.is_multiple_of(cfg.num_heads) || !cfg.head_dim().is_multiple_of(4) {
            return Err(s.error(
                "num_heads",
                "the head width (width / num_heads) must be a multiple of 4 for the 2D rotary",
            ));
        }
        if let Some(w) = cfg.window_size {
            if w / cfg.spatial_merge_size / cfg.patch_size == 0 {
                return Err(s.error("window_size", "smaller than one merged patch"));
            }
        }
        Ok(cfg)
    }
}

fn fullatt_blocks(s: &Section<'_>, depth: usize) -> Result<Vec<usize>, ModelError> {
    let list = s
        .int_list("fullatt_block_indexes")?
        .unwrap_or(vec![7, 15, 23, 31]);
    list.into_iter()
        .map(|i| {
            usize::try_from(i)
                .ok()
                .filter(|&i| i < depth.max(32))
                .ok_or_else(|| s.error("fullatt_block_indexes", format!("bad block index {i}")))
        })
        .collect()
}

/// The parsed `config.json` of a Qwen2-VL or Qwen2.5-VL checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub kind: Qwen2VlKind,
    pub vision: Qwen2VlVisionConfig,
    /// The decoder, read as a Qwen2 text config (M-RoPE reduced to its default inverse
    /// frequencies; the per-stream split is [`Self::mrope_section`]).
    pub text: TextConfig,
    /// Rotary frequencies given to the temporal, height and width streams; sums to head_dim / 2.
    pub mrope_section: [usize; 3],
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids from the config (text config, else top level); may be empty.
    pub eos_token_ids: Vec<u32>,
}

impl Qwen2VlConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_json(path, &json::read_file(path)?)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let map = json::parse_object(path, json)?;
        let top = Section::new(path, "", &map);
        let kind = match top.opt_str("model_type")? {
            Some("qwen2_vl") => Qwen2VlKind::Qwen2Vl,
            Some("qwen2_5_vl") => Qwen2VlKind::Qwen25Vl,
            other => {
                return Err(ModelError::Unsupported {
                    what: "model_type",
                    name: other.unwrap_or("<missing>").to_string(),
                })
            }
        };
        let empty = Map::new();
        let vision_map = top.object("vision_config")?.unwrap_or(&empty);
        let vision = Qwen2VlVisionConfig::parse(&top.nested("vision_config", vision_map), kind)?;
        // 5.x: `text_config`; 4.x hub: the decoder keys sit at the top level.
        let (text_name, text_map) = match top.object("text_config")? {
            Some(m) => ("text_config", m),
            None => ("", &map),
        };
        let text_section = Section::new(path, text_name, text_map);
        let qwen2 = as_qwen2_text(text_map, kind);
        let text = TextConfig::parse(&Section::new(path, text_name, &qwen2))?;
        let mrope_section = mrope_section(&text_section, text.head_dim)?;
        let token = |key: &str, default: usize| -> Result<u32, ModelError> {
            u32::try_from(top.usize_or(key, default)?).map_err(|_| top.error(key, "too large"))
        };
        let eos_token_ids = if text.eos_token_ids.is_empty() {
            crate::model::config::eos_list(&top)?
        } else {
            text.eos_token_ids.clone()
        };
        Ok(Self {
            kind,
            tie_word_embeddings: top.bool_or("tie_word_embeddings", false)?
                || text.tie_word_embeddings,
            mrope_section,
            image_token_id: token("image_token_id", 151655)?,
            vision_start_token_id: token("vision_start_token_id", 151652)?,
            vision,
            text,
            eos_token_ids,
        })
    }
}

/// The rope dictionary of the text section: `rope_scaling` wins over `rope_parameters`, as in
/// transformers' `convert_rope_params_to_dict`.
fn rope_key(has_rope_scaling: bool) -> &'static str {
    match has_rope_scaling {
        true => "rope_scaling",
        false => "rope_parameters",
    }
}

/// `mrope_section` of the rope dictionary (transformers' default `[16, 24, 24]`), checked to
/// cover the `head_dim / 2` rotary frequencies.
fn mrope_section(text: &Section<'_>, head_dim: usize) -> Result<[usize; 3], ModelError> {
    let key = rope_key(text.get("rope_scaling").is_some());
    let empty = Map::new();
    let rope = text.nested(key, text.object(key)?.unwrap_or(&empty));
    let section = match rope.int_list("mrope_section")? {
        None => [16, 24, 24],
        Some(list) => match list.as_slice() {
            &[t, h, w] if t >= 0 && h >= 0 && w >= 0 => [t as usize, h as usize, w as usize],
            _ => return Err(rope.error("mrope_section", "expected three non-negative integers")),
        },
    };
    if section.iter().sum::<usize>() * 2 != head_dim {
        return Err(rope.error(
            "mrope_section",
            format!("must sum to head_dim / 2 = {}", head_dim / 2),
        ));
    }
    Ok(section)
}

/// A copy of the decoder keys that [`TextConfig::parse`] reads as the equivalent Qwen2 decoder:
/// `model_type: qwen2`, rope type `mrope` as `default`, and the Qwen2-VL class defaults filled
/// in where the file leaves a key out.
fn as_qwen2_text(text: &Map<String, Value>, kind: Qwen2VlKind) -> Map<String, Value> {
    let mut m = text.clone();
    m.insert("model_type".into(), Value::from("qwen2"));
    let rms_eps = match kind {
        Qwen2VlKind::Qwen2Vl => 1e-5,
        Qwen2VlKind::Qwen25Vl => 1e-6,
    };
    let defaults: [(&str, Value); 10] = [
        ("vocab_size", 152064.into()),
        ("hidden_size", 8192.into()),
        ("intermediate_size", 29568.into()),
        ("num_hidden_layers", 80.into()),
        ("num_attention_heads", 64.into()),
        ("max_position_embeddings", 32768.into()),
        ("rms_norm_eps", rms_eps.into()),
        ("rope_theta", 1_000_000.0.into()),
        ("max_window_layers", 80.into()),
        ("eos_token_id", 151645.into()),
    ];
    for (key, value) in defaults {
        m.entry(key).or_insert(value);
    }
    match m.get("num_key_value_heads") {
        None => {
            m.insert("num_key_value_heads".into(), 8.into());
        }
        Some(Value::Null) => {
            let heads = m.get("num_attention_heads").cloned().unwrap_or(64.into());
            m.insert("num_key_value_heads".into(), heads);
        }
        Some(_) => {}
    }
    let key = rope_key(m.get("rope_scaling").is_some_and(|v| !v.is_null()));
    if let Some(Value::Object(rope)) = m.get_mut(key) {
        let ty = rope.get("rope_type").or_else(|| rope.get("type"));
        if ty.and_then(Value::as_str) == Some("mrope") {
            rope.remove("type");
            rope.insert("rope_type".into(), Value::from("default"));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Qwen2VlConfig, ModelError> {
        Qwen2VlConfig::from_json(Path::new("config.json"), json)
    }

    /// Qwen/Qwen2-VL-2B-Instruct's config.json (4.x hub shape), trimmed of unread keys.
    const HUB_2B: &str = r#"{
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
        "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
        "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "use_cache": true, "use_sliding_window": false,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
            "in_chans": 3, "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936}"#;

    #[test]
    fn reads_the_hub_shape() -> Result<(), ModelError> {
        let c = parse(HUB_2B)?;
        assert_eq!(c.kind, Qwen2VlKind::Qwen2Vl);
        assert_eq!((c.text.hidden_size, c.text.head_dim), (1536, 128));
        assert_eq!((c.text.num_key_value_heads, c.text.vocab_size), (2, 151936));
        assert_eq!(c.text.rope.theta, 1e6);
        assert_eq!(c.mrope_section, [16, 24, 24]);
        assert!(c.text.qkv_bias && !c.text.o_bias && c.tie_word_embeddings);
        assert!(c.text.sliding_window.iter().all(Option::is_none));
        assert_eq!((c.vision.embed_dim, c.vision.out_dim), (1280, 1536));
        assert_eq!(c.vision.intermediate_size, 5120);
        assert_eq!(c.vision.hidden_act, Activation::QuickGelu);
        assert_eq!(
            (c.image_token_id, c.eos_token_ids.clone()),
            (151655, vec![151645])
        );
        Ok(())
    }

    #[test]
    fn reads_the_5x_shape_and_names_bad_keys() -> Result<(), ModelError> {
        let json = r#"{"model_type": "qwen2_5_vl", "image_token_id": 7,
            "text_config": {"hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
                "vocab_size": 300, "rope_parameters": {"rope_type": "default",
                "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
            "vision_config": {"hidden_size": 32, "out_hidden_size": 64, "num_heads": 2,
                "depth": 4, "intermediate_size": 48, "window_size": 56,
                "fullatt_block_indexes": [1, 3]}}"#;
        let c = parse(json)?;
        assert_eq!(c.kind, Qwen2VlKind::Qwen25Vl);
        assert_eq!((c.mrope_section, c.text.rope.theta), ([2, 3, 3], 10000.0));
        assert_eq!(c.text.rms_norm_eps, 1e-6);
        assert_eq!(c.vision.fullatt_block_indexes, vec![1, 3]);
        assert_eq!(c.vision.hidden_act, Activation::Silu);
        let bad = json.replace("[2, 3, 3]", "[2, 3, 4]");
        let err = parse(&bad).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("config.json: text_config.rope_parameters.mrope_section: must sum to head_dim / 2 = 8")
        );
        let bad = json.replace("\"num_heads\": 2", "\"num_heads\": \"two\"");
        let err = parse(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("vision_config.num_heads"), "{err}");
        Ok(())
    }
}
