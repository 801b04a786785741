//! Rotary position embedding: parameters from the text config (4.x `rope_theta`/`rope_scaling`
//! or 5.x `rope_parameters`), inverse frequencies as transformers computes them, and cos/sin rows
//! gathered for arbitrary per-token positions (so a flattened batch rotates every token by its own
//! position).

use candle_core::{DType, Device, Tensor};

use super::json::Section;
use super::ModelError;

/// How the inverse frequencies are scaled (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: no scaling.
    None,
    /// `linear`: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// `llama3`: transformers' `_compute_llama3_parameters`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding parameters of the text model.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength (`rope_theta`).
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Reads the rope settings of a text config section, resolving the same precedence as
    /// transformers' `convert_rope_params_to_dict`: `rope_scaling` or `rope_parameters` first,
    /// then a top-level `rope_theta`, then 10000.
    pub(crate) fn parse(text: &Section<'_>, max_positions: usize) -> Result<Self, ModelError> {
        let key = if text.get("rope_scaling").is_some() {
            "rope_scaling"
        } else {
            "rope_parameters"
        };
        let empty = serde_json::Map::new();
        let params = text.nested(key, text.object(key)?.unwrap_or(&empty));
        let theta = match params.opt_f64("rope_theta")? {
            Some(t) => t,
            None => text.f64_or("rope_theta", 10_000.0)?,
        };
        let partial = params.f64_or(
            "partial_rotary_factor",
            text.f64_or("partial_rotary_factor", 1.0)?,
        )?;
        if partial != 1.0 {
            return Err(params.error("partial_rotary_factor", "only 1.0 is supported"));
        }
        let rope_type = match params.opt_str("rope_type")? {
            Some(t) => t,
            None => params.str_or("type", "default")?,
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required(&params, "factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required(&params, "factor")?,
                low_freq_factor: required(&params, "low_freq_factor")?,
                high_freq_factor: required(&params, "high_freq_factor")?,
                original_max_position_embeddings: params
                    .f64_or("original_max_position_embeddings", max_positions as f64)?,
            },
            other => {
                return Err(ModelError::Unsupported {
                    what: "rope_type",
                    name: other.to_string(),
                })
            }
        };
        Ok(Self { theta, scaling })
    }

    /// Inverse frequencies for `head_dim`, in f32 like transformers: `(head_dim / 2,)`.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / self.theta.powf(i as f64 / head_dim as f64) as f32);
        match self.scaling {
            RopeScaling::None => base.collect(),
            RopeScaling::Linear { factor } => base.map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => base
                .map(|f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let low_wavelen = old_len / low_freq_factor;
                    let high_wavelen = old_len / high_freq_factor;
                    let scaled = if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    scaled as f32
                })
                .collect(),
        }
    }
}

fn required(params: &Section<'_>, key: &str) -> Result<f64, ModelError> {
    params
        .opt_f64(key)?
        .ok_or_else(|| params.error(key, "required for this rope_type"))
}

/// Precomputed inverse frequencies; produces cos/sin for any list of positions.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// (1, head_dim / 2) f32
    inv_freq: Tensor,
}

impl Rotary {
    pub fn new(config: &RopeConfig, head_dim: usize, device: &Device) -> candle_core::Result<Self> {
        let inv = config.inv_freq(head_dim);
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, n), device)?,
        })
    }

    /// cos and sin for each position, each `(positions.len(), head_dim / 2)` in `dtype`.
    /// Computed in f32 (`position * inv_freq`, then cos/sin) as transformers does.
    pub fn cos_sin(
        &self,
        positions: &[usize],
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        // (T, 1) * (1, head_dim / 2) -> (T, head_dim / 2)
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv_freq.device())?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(v: serde_json::Value) -> Result<RopeConfig, ModelError> {
        let m = v.as_object().cloned().unwrap_or_default();
        RopeConfig::parse(
            &Section::new(Path::new("config.json"), "text_config", &m),
            8192,
        )
    }

    #[test]
    fn reads_both_config_generations() -> Result<(), ModelError> {
        let old = parse(serde_json::json!({"rope_theta": 500000.0}))?;
        assert_eq!(old.theta, 500000.0);
        assert_eq!(old.scaling, RopeScaling::None);
        let new = parse(
            serde_json::json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}),
        )?;
        assert_eq!(new.theta, 1e6);
        let lin = parse(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}))?;
        assert_eq!(
            (lin.theta, lin.scaling),
            (10_000.0, RopeScaling::Linear { factor: 2.0 })
        );
        let err =
            parse(serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}));
        assert!(err.is_err_and(|e| e.to_string().contains("\"yarn\"")));
        Ok(())
    }

    /// Reference from transformers 5.24 `_compute_llama3_parameters` (theta 500000, head_dim 16,
    /// factor 8, low 1, high 4, original 8192); 1e-6 relative covers f32 vs f64 pow.
    #[test]
    fn llama3_matches_transformers() -> Result<(), ModelError> {
        let cfg = parse(serde_json::json!({"rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}))?;
        let want = [
            1.0f64,
            0.19392276,
            0.037606031,
            0.0072926651,
            0.00052484602,
            3.4281024e-05,
            6.6478697e-06,
            1.2891732e-06,
        ];
        for (g, w) in cfg.inv_freq(16).iter().zip(want) {
            assert!((f64::from(*g) - w).abs() <= 1e-6 * w.abs(), "{g} vs {w}");
        }
        Ok(())
    }
}
