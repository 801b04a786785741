//! `config.json` of a contrastive embedding checkpoint (`model_type` `"clip"` or `"siglip"`):
//! the text tower, the vision tower (parsed by the shared [`VisionConfig`]) and the projection
//! sizes. Absent keys take the transformers config-class defaults of the matching family.

use std::path::Path;

use serde_json::{Map, Value};

use super::super::activation::Activation;
use super::super::config::{VisionConfig, VisionKind};
use super::super::json::{self, Section};
use super::super::ModelError;
use super::EmbeddingKind;

/// Which token's final hidden state becomes the text embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPool {
    /// CLIP with the legacy `eos_token_id == 2`: the position of the largest token id.
    ArgmaxId,
    /// CLIP: the first position holding this id (position 0 when absent, as transformers).
    FirstOf(u32),
    /// SigLIP: the last position (usually padding).
    Last,
}

/// The text tower's `text_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTowerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `pad_token_id` (SigLIP pads every text to `max_position_embeddings` with it).
    pub pad_token_id: u32,
    pub pool: TextPool,
    /// Whether attention is causal (CLIP) or bidirectional (SigLIP).
    pub causal: bool,
    /// SigLIP's `head` output size (`projection_size`, default `hidden_size`).
    pub projection_size: usize,
}

impl TextTowerConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn parse(kind: EmbeddingKind, s: &Section<'_>) -> Result<Self, ModelError> {
        // (vocab, hidden, intermediate, heads, positions, act, eps) of CLIPTextConfig and
        // SiglipTextConfig in transformers 5.
        let (vocab, hidden, inter, heads, positions, act, eps, model_type) = match kind {
            EmbeddingKind::Clip => (
                49408,
                512,
                2048,
                8,
                77,
                "quick_gelu",
                1e-5,
                "clip_text_model",
            ),
            EmbeddingKind::Siglip => (
                32000,
                768,
                3072,
                12,
                64,
                "gelu_pytorch_tanh",
                1e-6,
                "siglip_text_model",
            ),
        };
        let found = s.str_or("model_type", model_type)?;
        if found != model_type {
            return Err(s.error(
                "model_type",
                format!("expected {model_type:?}, got {found:?}"),
            ));
        }
        let act_name = s.str_or("hidden_act", act)?;
        let hidden_size = s.positive_or("hidden_size", hidden)?;
        let cfg = Self {
            vocab_size: s.positive_or("vocab_size", vocab)?,
            hidden_size,
            intermediate_size: s.positive_or("intermediate_size", inter)?,
            num_hidden_layers: s.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: s.positive_or("num_attention_heads", heads)?,
            max_position_embeddings: s.positive_or("max_position_embeddings", positions)?,
            hidden_act: Activation::from_name(act_name)
                .ok_or_else(|| s.error("hidden_act", format!("unknown activation {act_name:?}")))?,
            layer_norm_eps: s.f64_or("layer_norm_eps", eps)?,
            pad_token_id: token_id(s, "pad_token_id", 1)?,
            pool: match kind {
                EmbeddingKind::Clip => clip_pool(s)?,
                EmbeddingKind::Siglip => TextPool::Last,
            },
            causal: kind == EmbeddingKind::Clip,
            projection_size: s.positive_or("projection_size", hidden_size)?,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(s.error(
                "hidden_size",
                "hidden_size must divide by num_attention_heads",
            ));
        }
        Ok(cfg)
    }
}

/// transformers 5's `CLIPTextModel` rule: `eos_token_id == 2` (configs from before PR #24773)
/// pools at the argmax of the ids, any other id at its first occurrence.
fn clip_pool(s: &Section<'_>) -> Result<TextPool, ModelError> {
    let ids = s.int_list("eos_token_id")?.unwrap_or(vec![49407]);
    match ids.as_slice() {
        [2] => Ok(TextPool::ArgmaxId),
        [id] => Ok(TextPool::FirstOf(token_id_value(s, "eos_token_id", *id)?)),
        _ => Err(s.error("eos_token_id", "expected a single token id")),
    }
}

fn token_id(s: &Section<'_>, key: &str, default: u32) -> Result<u32, ModelError> {
    match s.int_list(key)?.as_deref() {
        None => Ok(default),
        Some([id]) => token_id_value(s, key, *id),
        Some(_) => Err(s.error(key, "expected a single token id")),
    }
}

fn token_id_value(s: &Section<'_>, key: &str, id: i64) -> Result<u32, ModelError> {
    u32::try_from(id).map_err(|_| s.error(key, format!("bad token id {id}")))
}

/// The parsed `config.json` of a CLIP or SigLIP dual encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedConfig {
    pub kind: EmbeddingKind,
    pub text: TextTowerConfig,
    pub vision: VisionConfig,
    /// CLIP's top-level `projection_dim` (both projections' output size); unused for SigLIP.
    pub projection_dim: usize,
    /// SigLIP's `vision_config.vision_use_head` (the pooled output needs it).
    pub vision_use_head: bool,
}

impl EmbedConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_json(path, &json::read_file(path)?)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let map = json::parse_object(path, json)?;
        let top = Section::new(path, "", &map);
        let kind = match top.opt_str("model_type")? {
            Some("clip") => EmbeddingKind::Clip,
            Some("siglip") => EmbeddingKind::Siglip,
            other => {
                let name = other.map_or("<missing>".to_string(), |n| format!("{n:?}"));
                return Err(top.error(
                    "model_type",
                    format!("{name} is not an embedding model (expected \"clip\" or \"siglip\")"),
                ));
            }
        };
        let text_map = sub_config(&top, "text_config", None)?;
        let text = TextTowerConfig::parse(kind, &top.nested("text_config", &text_map))?;
        let vision_type = match kind {
            EmbeddingKind::Clip => "clip_vision_model",
            EmbeddingKind::Siglip => "siglip_vision_model",
        };
        let vision_map = sub_config(&top, "vision_config", Some(vision_type))?;
        let vision_section = top.nested("vision_config", &vision_map);
        let vision = VisionConfig::parse(&vision_section)?;
        let expected = match kind {
            EmbeddingKind::Clip => VisionKind::Clip,
            EmbeddingKind::Siglip => VisionKind::Siglip,
        };
        if vision.kind != expected {
            return Err(vision_section.error("model_type", format!("expected {vision_type:?}")));
        }
        let cfg = Self {
            kind,
            projection_dim: top.positive_or("projection_dim", 512)?,
            vision_use_head: vision_section.bool_or("vision_use_head", true)?,
            text,
            vision,
        };
        cfg.validate(&top)?;
        Ok(cfg)
    }

    fn validate(&self, top: &Section<'_>) -> Result<(), ModelError> {
        if self.kind != EmbeddingKind::Siglip {
            return Ok(());
        }
        if !self.vision_use_head {
            return Err(top.error(
                "vision_config.vision_use_head",
                "must be true: SigLIP image embeddings come from the pooling head",
            ));
        }
        if self.text.projection_size != self.vision.hidden_size {
            return Err(top.error(
                "text_config.projection_size",
                format!(
                    "{} differs from vision_config.hidden_size {}: text and image embeddings \
                     would not share a space",
                    self.text.projection_size, self.vision.hidden_size
                ),
            ));
        }
        Ok(())
    }

    /// Size of the embeddings both towers produce.
    pub fn dim(&self) -> usize {
        match self.kind {
            EmbeddingKind::Clip => self.projection_dim,
            EmbeddingKind::Siglip => self.vision.hidden_size,
        }
    }
}

/// A copy of the sub-config object `key` (empty when absent), with the legacy
/// `<key>_dict` values laid over it as `CLIPConfig` does, and `model_type` filled in.
fn sub_config(
    top: &Section<'_>,
    key: &str,
    default_type: Option<&str>,
) -> Result<Map<String, Value>, ModelError> {
    let mut map = top.object(key)?.cloned().unwrap_or_default();
    if let Some(legacy) = top.object(&format!("{key}_dict"))? {
        map.extend(legacy.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if let Some(t) = default_type {
        let missing = map.get("model_type").is_none_or(Value::is_null);
        if missing {
            map.insert("model_type".into(), Value::String(t.into()));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EmbedConfig, ModelError> {
        EmbedConfig::from_json(Path::new("config.json"), json)
    }

    /// openai/clip-vit-base-patch32's config (abridged): legacy `eos_token_id: 2`.
    #[test]
    fn hub_clip_config() -> Result<(), ModelError> {
        let cfg = parse(
            r#"{"model_type": "clip", "projection_dim": 512, "text_config_dict": null,
            "text_config": {"bos_token_id": 0, "eos_token_id": 2, "hidden_size": 512,
                "intermediate_size": 2048, "max_position_embeddings": 77,
                "model_type": "clip_text_model", "num_attention_heads": 8, "vocab_size": 49408},
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                "model_type": "clip_vision_model", "num_attention_heads": 12, "patch_size": 32}}"#,
        )?;
        assert_eq!((cfg.kind, cfg.dim()), (EmbeddingKind::Clip, 512));
        assert_eq!(cfg.text.pool, TextPool::ArgmaxId);
        assert!(cfg.text.causal);
        assert_eq!(cfg.text.hidden_act, Activation::QuickGelu);
        assert_eq!(
            (cfg.vision.kind, cfg.vision.seq_len()),
            (VisionKind::Clip, 50)
        );
        Ok(())
    }

    #[test]
    fn clip_defaults_and_legacy_dict() -> Result<(), ModelError> {
        let cfg = parse(
            r#"{"model_type": "clip", "text_config": {"hidden_size": 64},
            "text_config_dict": {"hidden_size": 32, "eos_token_id": 49407}}"#,
        )?;
        assert_eq!(cfg.text.hidden_size, 32);
        assert_eq!(cfg.text.pool, TextPool::FirstOf(49407));
        assert_eq!(
            (cfg.text.max_position_embeddings, cfg.vision.patch_size),
            (77, 32)
        );
        Ok(())
    }

    /// google/siglip-base-patch16-224's config (abridged): sub-configs mostly defaulted.
    #[test]
    fn hub_siglip_config() -> Result<(), ModelError> {
        let cfg = parse(
            r#"{"model_type": "siglip", "text_config": {"model_type": "siglip_text_model"},
            "vision_config": {"patch_size": 16}}"#,
        )?;
        assert_eq!((cfg.kind, cfg.dim()), (EmbeddingKind::Siglip, 768));
        assert_eq!((cfg.text.pool, cfg.text.causal), (TextPool::Last, false));
        assert_eq!(
            (cfg.text.max_position_embeddings, cfg.text.pad_token_id),
            (64, 1)
        );
        assert_eq!(
            (cfg.vision.kind, cfg.vision.seq_len()),
            (VisionKind::Siglip, 196)
        );
        Ok(())
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = |json: &str| parse(json).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            err(r#"{"model_type": "llava"}"#),
            "config.json: model_type: \"llava\" is not an embedding model (expected \"clip\" or \"siglip\")"
        );
        assert!(err("{}").contains("model_type: <missing>"));
        assert!(
            err(r#"{"model_type": "siglip", "vision_config": {"vision_use_head": false}}"#)
                .contains("vision_use_head")
        );
        assert!(
            err(r#"{"model_type": "siglip", "text_config": {"projection_size": 5}}"#)
                .contains("text_config.projection_size")
        );
        assert!(
            err(r#"{"model_type": "clip", "text_config": {"eos_token_id": [1, 2]}}"#)
                .contains("config.json: text_config.eos_token_id")
        );
        assert!(err(
            r#"{"model_type": "clip", "vision_config": {"model_type": "siglip_vision_model"}}"#
        )
        .contains("vision_config.model_type"));
    }
}
