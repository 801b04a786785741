//! `config.json` of an Idefics3 / SmolVLM checkpoint (`model_type: "idefics3"`): the
//! `idefics3_vision` tower, the Llama `text_config`, `scale_factor` and the image token, with
//! transformers 5.24's `Idefics3Config` / `Idefics3VisionConfig` defaults for absent keys.

use std::path::Path;

use serde_json::Map;

use crate::model::activation::Activation;
use crate::model::config::{eos_list, square};
use crate::model::json::{self, Section};
use crate::model::text_config::TextConfig;
use crate::model::{ModelError, VisionConfig, VisionKind};

/// The parsed `config.json` of a `model_type: "idefics3"` checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Idefics3Config {
    /// The SigLIP-style tower (`kind` is always [`VisionKind::Siglip`]).
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Placeholder token replaced by image rows (`image_token_id`, default 128257).
    pub image_token_id: u32,
    /// Pixel-shuffle factor of the connector (default 2).
    pub scale_factor: usize,
    /// Whether `lm_head` shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids (text config, else top level); may be empty.
    pub eos_token_ids: Vec<u32>,
}

impl Idefics3Config {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_json(path, &json::read_file(path)?)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let map = json::parse_object(path, json)?;
        let top = Section::new(path, "", &map);
        match top.opt_str("model_type")? {
            Some("idefics3") => {}
            other => {
                return Err(ModelError::Unsupported {
                    what: "model_type",
                    name: other.unwrap_or("<missing>").to_string(),
                })
            }
        }
        let empty = Map::new();
        let vision_map = top.object("vision_config")?.unwrap_or(&empty);
        let vision = parse_vision(&top.nested("vision_config", vision_map))?;
        let text = match top.object("text_config")? {
            Some(m) => TextConfig::parse(&top.nested("text_config", m))?,
            // `Idefics3Config` builds a default Llama with `rms_norm_eps=1e-5` when absent.
            None => TextConfig {
                rms_norm_eps: 1e-5,
                ..TextConfig::parse(&top.nested("text_config", &empty))?
            },
        };
        let scale_factor = top.positive_or("scale_factor", 2)?;
        let grid = vision.grid();
        if !grid.is_multiple_of(scale_factor) {
            return Err(top.error(
                "scale_factor",
                format!("must divide the {grid} patches per side"),
            ));
        }
        let image_token_id = u32::try_from(top.usize_or("image_token_id", 128257)?)
            .map_err(|_| top.error("image_token_id", "too large"))?;
        let eos_token_ids = if text.eos_token_ids.is_empty() {
            eos_list(&top)?
        } else {
            text.eos_token_ids.clone()
        };
        Ok(Self {
            tie_word_embeddings: top.bool_or("tie_word_embeddings", false)?
                || text.tie_word_embeddings,
            vision,
            text,
            image_token_id,
            scale_factor,
            eos_token_ids,
        })
    }

    /// Image-token rows per full-size tile: (image_size / patch)^2 / scale_factor^2.
    pub fn tokens_per_tile(&self) -> usize {
        let side = self.vision.grid() / self.scale_factor;
        side * side
    }
}

/// `Idefics3VisionConfig` (model_type `idefics3_vision`; the hub configs of SmolVLM name it so,
/// older ones may omit it).
fn parse_vision(s: &Section<'_>) -> Result<VisionConfig, ModelError> {
    match s.str_or("model_type", "idefics3_vision")? {
        "idefics3_vision" | "idefics3" | "siglip_vision_model" => {}
        other => {
            return Err(ModelError::Unsupported {
                what: "vision model_type",
                name: other.to_string(),
            })
        }
    }
    let act_name = s.str_or("hidden_act", "gelu_pytorch_tanh")?;
    let cfg = VisionConfig {
        kind: VisionKind::Siglip,
        hidden_size: s.positive_or("hidden_size", 1152)?,
        intermediate_size: s.positive_or("intermediate_size", 3072)?,
        num_hidden_layers: s.usize_or("num_hidden_layers", 12)?,
        num_attention_heads: s.positive_or("num_attention_heads", 16)?,
        num_channels: s.positive_or("num_channels", 3)?,
        image_size: square(s, "image_size", 224)?,
        patch_size: square(s, "patch_size", 32)?,
        layer_norm_eps: s.f64_or("layer_norm_eps", 1e-6)?,
        hidden_act: Activation::from_name(act_name)
            .ok_or_else(|| s.error("hidden_act", format!("unknown activation {act_name:?}")))?,
    };
    if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        || !cfg.image_size.is_multiple_of(cfg.patch_size)
    {
        return Err(s.error(
            "hidden_size",
            "hidden_size must divide by num_attention_heads and image_size by patch_size",
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Idefics3Config, ModelError> {
        Idefics3Config::from_json(Path::new("config.json"), json)
    }

    #[test]
    fn smolvlm_shape_and_defaults() -> Result<(), ModelError> {
        // HuggingFaceTB/SmolVLM-256M-Instruct's vision/connector numbers.
        let cfg = parse(
            r#"{"model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4,
            "vision_config": {"model_type": "idefics3_vision", "hidden_size": 768,
                "image_size": 512, "patch_size": 16, "num_attention_heads": 12},
            "text_config": {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49280, "tie_word_embeddings": true}}"#,
        )?;
        assert_eq!((cfg.image_token_id, cfg.tokens_per_tile()), (49190, 64));
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.text.rms_norm_eps, 1e-6);
        // Class defaults: 224 / 32 = 7 patches per side, which scale_factor 2 cannot divide.
        let cfg = parse(r#"{"model_type": "idefics3", "vision_config": {"image_size": 256}}"#)?;
        assert_eq!(
            (
                cfg.vision.hidden_size,
                cfg.vision.patch_size,
                cfg.scale_factor
            ),
            (1152, 32, 2)
        );
        assert_eq!((cfg.text.rms_norm_eps, cfg.image_token_id), (1e-5, 128257));
        Ok(())
    }

    #[test]
    fn bad_configs_name_the_key() {
        let err = |json: &str| parse(json).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(r#"{"model_type": "idefics3", "scale_factor": 3}"#).contains("scale_factor"));
        assert!(err(r#"{"model_type": "llava"}"#).contains("model_type \"llava\""));
        assert!(
            err(r#"{"model_type": "idefics3", "vision_config": {"hidden_act": "nope"}}"#)
                .contains("vision_config.hidden_act")
        );
    }
}
