//! Checks of the sampling parameters against OpenAI's documented ranges.

use super::ValidationError;
use crate::engine::sampling::SamplingParams;
use crate::openai::request::ChatCompletionRequest;

/// Most stop strings OpenAI accepts.
const MAX_STOP: usize = 4;

fn in_range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ValidationError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ValidationError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    }
}

/// The model's own sampling defaults (`generation_config.json`), used where a
/// request leaves a field out, as vLLM does.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
}

impl SamplingDefaults {
    /// Reads `temperature`, `top_p` and `top_k` from a generation config.
    pub fn from_generation_config(json: &serde_json::Value) -> Self {
        let f = |k: &str| json[k].as_f64().map(|v| v as f32);
        SamplingDefaults {
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: json["top_k"].as_i64(),
        }
    }
}

/// Sampling settings of choice 0; the others differ only by seed.
pub fn sampling(
    req: &ChatCompletionRequest,
    defaults: &SamplingDefaults,
    max_top_logprobs: usize,
) -> Result<SamplingParams, ValidationError> {
    in_range("temperature", req.temperature, 0.0, 2.0)?;
    in_range("top_p", req.top_p, 0.0, 1.0)?;
    in_range("presence_penalty", req.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)?;
    if req.top_p == Some(0.0) {
        return Err(ValidationError::invalid(
            "top_p",
            "`top_p` must be greater than 0".to_string(),
        ));
    }
    let top_k = match req.top_k.or(defaults.top_k) {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ValidationError::invalid(
                "top_k",
                format!("`top_k` must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    let logprobs = req.logprobs.unwrap_or(false);
    let top_logprobs = req.top_logprobs.unwrap_or(0) as usize;
    if top_logprobs > max_top_logprobs {
        return Err(ValidationError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be at most {max_top_logprobs}, got {top_logprobs}"),
        ));
    }
    if top_logprobs > 0 && !logprobs {
        return Err(ValidationError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs` to be true".to_string(),
        ));
    }
    Ok(SamplingParams {
        temperature: req.temperature.or(defaults.temperature).unwrap_or(1.0),
        top_p: req.top_p.or(defaults.top_p).unwrap_or(1.0),
        top_k,
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        seed: 0,
        logprobs,
        top_logprobs,
    })
}

/// Per-choice seeds: the request's seed plus the choice index, or random ones.
pub fn seeds(seed: Option<i64>, n: usize) -> Vec<u64> {
    let base = seed.map(|s| s as u64).unwrap_or_else(rand::random);
    (0..n as u64).map(|i| base.wrapping_add(i)).collect()
}

pub fn n(req: &ChatCompletionRequest, max_n: usize) -> Result<usize, ValidationError> {
    let n = req.n.unwrap_or(1) as usize;
    if n == 0 || n > max_n {
        return Err(ValidationError::invalid(
            "n",
            format!("`n` must be between 1 and {max_n}, got {n}"),
        ));
    }
    Ok(n)
}

pub fn stop(req: &ChatCompletionRequest) -> Result<Vec<String>, ValidationError> {
    let stop = req.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ValidationError::invalid(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOP} sequences, got {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ValidationError::invalid(
            "stop",
            "stop sequences must not be empty".to_string(),
        ));
    }
    Ok(stop)
}

/// `max_completion_tokens` (or the older `max_tokens`), checked against what the
/// context has left after the prompt.
pub fn max_tokens(
    req: &ChatCompletionRequest,
    prompt_len: usize,
    context: usize,
    default: usize,
) -> Result<usize, ValidationError> {
    let (param, asked) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m as usize)),
        (None, m) => ("max_tokens", m.map(|m| m as usize)),
    };
    if asked == Some(0) {
        return Err(ValidationError::invalid(
            param,
            format!("`{param}` must be at least 1"),
        ));
    }
    let room = context.saturating_sub(prompt_len);
    let wanted = asked.unwrap_or(default.min(room));
    if prompt_len + wanted > context || room == 0 {
        return Err(ValidationError::ContextLength(format!(
            "This model's maximum context length is {context} tokens. However, you requested \
             {} tokens ({prompt_len} in the messages, {wanted} in the completion). Please reduce \
             the length of the messages or completion.",
            prompt_len + wanted
        )));
    }
    Ok(wanted)
}

/// vLLM's `min_tokens`: at least 0 and at most the completion length.
pub fn min_tokens(
    req: &ChatCompletionRequest,
    max_tokens: usize,
) -> Result<usize, ValidationError> {
    match req.min_tokens {
        None => Ok(0),
        Some(m) if m >= 0 && m as u64 <= max_tokens as u64 => Ok(m as usize),
        Some(m) => Err(ValidationError::invalid(
            "min_tokens",
            format!("`min_tokens` must be between 0 and max_tokens ({max_tokens}), got {m}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> ChatCompletionRequest {
        let mut base = serde_json::json!({"model": "m", "messages": []});
        if let (Some(b), Some(o)) = (base.as_object_mut(), json.as_object()) {
            b.extend(o.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    fn param_of(e: ValidationError) -> Option<String> {
        match e {
            ValidationError::Invalid { param, .. } => param,
            _ => None,
        }
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        for (field, v) in [
            ("temperature", 2.5),
            ("top_p", 1.5),
            ("top_p", 0.0),
            ("presence_penalty", -3.0),
            ("frequency_penalty", 2.1),
        ] {
            let e = sampling(&req(serde_json::json!({ field: v })), &NONE, 20).unwrap_err();
            assert_eq!(param_of(e).as_deref(), Some(field));
        }
    }

    const NONE: SamplingDefaults = SamplingDefaults {
        temperature: None,
        top_p: None,
        top_k: None,
    };

    #[test]
    fn generation_config_fills_what_the_request_leaves_out() {
        let d = SamplingDefaults::from_generation_config(
            &serde_json::json!({"temperature": 0.5, "top_k": 20, "eos_token_id": 2}),
        );
        let p = sampling(&req(serde_json::json!({"top_k": 5})), &d, 20).unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.5, 1.0, 5));
    }

    #[test]
    fn defaults_match_openai() {
        let p = sampling(&req(serde_json::json!({})), &NONE, 20).unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 1.0, 0));
        assert!(!p.logprobs);
    }

    #[test]
    fn top_logprobs_needs_logprobs_and_a_bound() {
        assert!(sampling(&req(serde_json::json!({"top_logprobs": 2})), &NONE, 20).is_err());
        let many = serde_json::json!({"logprobs": true, "top_logprobs": 21});
        assert!(sampling(&req(many), &NONE, 20).is_err());
        let three = serde_json::json!({"logprobs": true, "top_logprobs": 3});
        let p = sampling(&req(three), &NONE, 20).unwrap();
        assert_eq!(p.top_logprobs, 3);
    }

    #[test]
    fn stop_accepts_string_or_list_up_to_four() {
        assert_eq!(stop(&req(serde_json::json!({"stop": "x"}))).unwrap(), ["x"]);
        assert!(stop(&req(serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}))).is_err());
        assert!(stop(&req(serde_json::json!({"stop": [""]}))).is_err());
    }

    #[test]
    fn max_tokens_respects_the_context() {
        let r = req(serde_json::json!({"max_tokens": 10}));
        assert_eq!(max_tokens(&r, 5, 100, 16).unwrap(), 10);
        assert!(matches!(
            max_tokens(&r, 95, 100, 16),
            Err(ValidationError::ContextLength(_))
        ));
        // Without a value the default shrinks to what is left.
        let r = req(serde_json::json!({}));
        assert_eq!(max_tokens(&r, 90, 100, 16).unwrap(), 10);
        assert!(max_tokens(&r, 100, 100, 16).is_err());
        // The newer name wins.
        let r = req(serde_json::json!({"max_tokens": 10, "max_completion_tokens": 3}));
        assert_eq!(max_tokens(&r, 5, 100, 16).unwrap(), 3);
    }

    #[test]
    fn min_tokens_lies_between_zero_and_max_tokens() {
        assert_eq!(min_tokens(&req(serde_json::json!({})), 16).unwrap(), 0);
        let r = req(serde_json::json!({"min_tokens": 16}));
        assert_eq!(min_tokens(&r, 16).unwrap(), 16);
        for bad in [-1, 17] {
            let e = min_tokens(&req(serde_json::json!({ "min_tokens": bad })), 16).unwrap_err();
            assert_eq!(param_of(e).as_deref(), Some("min_tokens"));
        }
    }

    #[test]
    fn seeds_are_reproducible_per_choice() {
        assert_eq!(seeds(Some(7), 3), vec![7, 8, 9]);
        assert_eq!(seeds(Some(-1), 1), vec![u64::MAX]);
    }
}
