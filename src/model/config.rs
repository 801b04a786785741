//! `config.json` of a LLaVA checkpoint: the top-level glue settings and the vision tower.
//! Absent keys take the defaults of the transformers config classes, so 4.x-era hub configs
//! (which omit most sub-config fields) parse to the same model transformers builds.

use std::path::Path;

use serde_json::Map;

use super::activation::Activation;
use super::json::{self, Section};
use super::text_config::TextConfig;
use super::ModelError;

/// Which vision encoder the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionKind {
    /// `clip_vision_model`: class token, `pre_layrnorm`, bias-free patch conv.
    Clip,
    /// `siglip_vision_model`: no class token, patch conv with bias.
    Siglip,
}

/// The vision tower's `vision_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub kind: VisionKind,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// Input height = width in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl VisionConfig {
    /// Patches per side of the input image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Rows the encoder produces per image (patches, plus the class token for CLIP).
    pub fn seq_len(&self) -> usize {
        let patches = self.grid() * self.grid();
        match self.kind {
            VisionKind::Clip => patches + 1,
            VisionKind::Siglip => patches,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub(crate) fn parse(s: &Section<'_>) -> Result<Self, ModelError> {
        let kind = match s.str_or("model_type", "clip_vision_model")? {
            "clip_vision_model" => VisionKind::Clip,
            "siglip_vision_model" => VisionKind::Siglip,
            other => {
                return Err(ModelError::Unsupported {
                    what: "vision model_type",
                    name: other.to_string(),
                })
            }
        };
        let (patch, act, eps) = match kind {
            VisionKind::Clip => (32, "quick_gelu", 1e-5),
            VisionKind::Siglip => (16, "gelu_pytorch_tanh", 1e-6),
        };
        let act_name = s.str_or("hidden_act", act)?;
        let cfg = Self {
            kind,
            hidden_size: s.positive_or("hidden_size", 768)?,
            intermediate_size: s.positive_or("intermediate_size", 3072)?,
            num_hidden_layers: s.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: s.positive_or("num_attention_heads", 12)?,
            num_channels: s.positive_or("num_channels", 3)?,
            image_size: square(s, "image_size", 224)?,
            patch_size: square(s, "patch_size", patch)?,
            layer_norm_eps: s.f64_or("layer_norm_eps", eps)?,
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

    /// `LlavaConfig`'s defaults for a missing `vision_config` (CLIP ViT-L/14 at 336 px).
    fn llava_defaults(self) -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            ..self
        }
    }
}

/// An integer, or a `[h, w]` pair that must be square.
pub(crate) fn square(s: &Section<'_>, key: &str, default: usize) -> Result<usize, ModelError> {
    let Some(dims) = s.int_list(key)? else {
        return Ok(default);
    };
    match dims.as_slice() {
        [n] | [n, _] if *n > 0 && dims.iter().all(|m| m == n) => Ok(*n as usize),
        _ => Err(s.error(key, "expected a positive integer (or a square [h, w])")),
    }
}

/// Which rows of the selected hidden states become image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// `default`: drop the first row (the CLS token).
    DropFirst,
    /// `full`: keep every row.
    Full,
}

/// The parsed `config.json` of a `model_type: "llava"` checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Placeholder token replaced by image features (`image_token_index` / `image_token_id`).
    pub image_token_id: u32,
    /// Hidden-state indices (as transformers: 0 = embeddings, negative from the end) whose
    /// outputs are concatenated along the feature axis.
    pub vision_feature_layers: Vec<i64>,
    pub feature_select: FeatureSelect,
    pub projector_act: Activation,
    pub projector_bias: bool,
    /// Whether `lm_head` shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids from the config (text config, else top level); may be empty.
    pub eos_token_ids: Vec<u32>,
}

impl LlavaConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_json(path, &json::read_file(path)?)
    }

    /// Parses config JSON; `path` is only used in error messages.
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let map = json::parse_object(path, json)?;
        let top = Section::new(path, "", &map);
        match top.opt_str("model_type")? {
            Some("llava") => {}
            other => {
                return Err(ModelError::Unsupported {
                    what: "model_type",
                    name: other.unwrap_or("<missing>").to_string(),
                })
            }
        }
        let empty = Map::new();
        let vision = match top.object("vision_config")? {
            Some(m) => VisionConfig::parse(&top.nested("vision_config", m))?,
            None => VisionConfig::parse(&top.nested("vision_config", &empty))?.llava_defaults(),
        };
        let text_section = top.nested("text_config", top.object("text_config")?.unwrap_or(&empty));
        let text = TextConfig::parse(&text_section)?;
        Self::finish(&top, vision, text)
    }

    fn finish(
        top: &Section<'_>,
        vision: VisionConfig,
        text: TextConfig,
    ) -> Result<Self, ModelError> {
        let image_token = match top.opt_usize("image_token_index")? {
            Some(id) => id,
            None => top.usize_or("image_token_id", 32000)?,
        };
        let image_token_id =
            u32::try_from(image_token).map_err(|_| top.error("image_token_index", "too large"))?;
        let vision_feature_layers = top.int_list("vision_feature_layer")?.unwrap_or(vec![-2]);
        let n = vision.num_hidden_layers as i64;
        if vision_feature_layers.is_empty()
            || vision_feature_layers.iter().any(|&l| l < -(n + 1) || l > n)
        {
            return Err(top.error(
                "vision_feature_layer",
                format!("must select hidden states in -{}..={n}", n + 1),
            ));
        }
        let feature_select = match top.str_or("vision_feature_select_strategy", "default")? {
            "default" => FeatureSelect::DropFirst,
            "full" => FeatureSelect::Full,
            other => {
                return Err(top.error(
                    "vision_feature_select_strategy",
                    format!("unknown {other:?}"),
                ))
            }
        };
        let act = top.str_or("projector_hidden_act", "gelu")?;
        let projector_act = Activation::from_name(act).ok_or_else(|| {
            top.error(
                "projector_hidden_act",
                format!("unknown activation {act:?}"),
            )
        })?;
        let eos_token_ids = if text.eos_token_ids.is_empty() {
            eos_list(top)?
        } else {
            text.eos_token_ids.clone()
        };
        Ok(Self {
            tie_word_embeddings: top.bool_or("tie_word_embeddings", false)?
                || text.tie_word_embeddings,
            projector_bias: top.bool_or("multimodal_projector_bias", true)?,
            vision,
            text,
            image_token_id,
            vision_feature_layers,
            feature_select,
            projector_act,
            eos_token_ids,
        })
    }

    /// Image-token rows per image after the select strategy.
    pub fn tokens_per_image(&self) -> usize {
        match self.feature_select {
            FeatureSelect::DropFirst => self.vision.seq_len() - 1,
            FeatureSelect::Full => self.vision.seq_len(),
        }
    }
}

/// `eos_token_id` of a section as ids (an integer or a list; absent = empty).
pub(crate) fn eos_list(s: &Section<'_>) -> Result<Vec<u32>, ModelError> {
    s.int_list("eos_token_id")?
        .unwrap_or_default()
        .into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| s.error("eos_token_id", format!("bad token id {id}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RopeScaling, TextKind};

    fn parse(json: &str) -> Result<LlavaConfig, ModelError> {
        LlavaConfig::from_json(Path::new("config.json"), json)
    }

    /// llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36): most fields are left to the
    /// class defaults, which must resolve to CLIP ViT-L/336 + Llama-7B.
    #[test]
    fn hub_llava_15_config_takes_class_defaults() -> Result<(), ModelError> {
        let cfg = parse(
            r#"{"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
            "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
            "projector_hidden_act": "gelu",
            "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                "torch_dtype": "float16", "vocab_size": 32064},
            "tie_word_embeddings": false, "torch_dtype": "float16",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#,
        )?;
        assert_eq!(cfg.image_token_id, 32000);
        assert_eq!(
            (cfg.vision.kind, cfg.vision.hidden_act),
            (VisionKind::Clip, Activation::QuickGelu)
        );
        assert_eq!(cfg.tokens_per_image(), 576);
        let t = &cfg.text;
        assert_eq!(
            (
                t.kind,
                t.hidden_size,
                t.num_hidden_layers,
                t.num_key_value_heads
            ),
            (TextKind::Llama, 4096, 32, 32)
        );
        assert_eq!(
            (t.head_dim, t.intermediate_size, t.vocab_size),
            (128, 11008, 32064)
        );
        assert_eq!(
            (t.rope.theta, &t.rope.scaling),
            (10_000.0, &RopeScaling::None)
        );
        assert_eq!(
            (cfg.eos_token_ids.as_slice(), cfg.tie_word_embeddings),
            (&[2][..], false)
        );
        assert!(t.sliding_window.iter().all(Option::is_none));
        Ok(())
    }

    #[test]
    fn sub_config_defaults_and_5x_names() -> Result<(), ModelError> {
        let cfg = parse(
            r#"{"model_type": "llava", "image_token_id": 151655, "vision_feature_layer": [-2, -5],
            "text_config": {"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8,
                "num_hidden_layers": 4, "max_window_layers": 2, "tie_word_embeddings": true},
            "vision_config": {"model_type": "siglip_vision_model", "image_size": [384, 384]}}"#,
        )?;
        assert_eq!(
            (cfg.image_token_id, cfg.vision_feature_layers.as_slice()),
            (151655, &[-2, -5][..])
        );
        assert_eq!(
            (
                cfg.vision.kind,
                cfg.vision.image_size,
                cfg.vision.patch_size
            ),
            (VisionKind::Siglip, 384, 16)
        );
        assert_eq!(cfg.text.sliding_window, vec![None, None, Some(8), Some(8)]);
        assert!(cfg.tie_word_embeddings && cfg.text.qkv_bias && !cfg.text.o_bias);
        assert!(cfg.eos_token_ids.is_empty());
        // No vision_config at all: LLaVA-1.5's tower.
        let cfg = parse(r#"{"model_type": "llava", "text_config": {"model_type": "mistral"}}"#)?;
        assert_eq!(
            (
                cfg.vision.image_size,
                cfg.vision.patch_size,
                cfg.vision.num_hidden_layers
            ),
            (336, 14, 24)
        );
        assert_eq!(
            (cfg.text.num_key_value_heads, cfg.text.sliding_window[0]),
            (8, Some(4096))
        );
        let no_window = r#"{"model_type": "llava", "text_config": {"model_type": "mistral", "sliding_window": null}}"#;
        assert_eq!(parse(no_window)?.text.sliding_window[0], None);
        Ok(())
    }

    #[test]
    fn bad_configs_name_the_key() {
        let err = |json: &str| parse(json).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err(r#"{"model_type": "llava", "vision_feature_layer": 30}"#)
                .contains("vision_feature_layer")
        );
        assert!(
            err(r#"{"model_type": "llava", "projector_hidden_act": "swoosh"}"#)
                .contains("\"swoosh\"")
        );
        assert!(
            err(r#"{"model_type": "llava", "text_config": {"hidden_size": "big"}}"#)
                .contains("text_config.hidden_size")
        );
        assert!(err(r#"{"model_type": "paligemma"}"#).contains("model_type \"paligemma\""));
        assert!(err("not json").contains("invalid JSON"));
    }
}
