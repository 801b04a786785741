//! Validation against transformers: for every reference case, the prompt ids
//! (template, tokenization, image-token expansion) are exactly the processor's,
//! and the preprocessed images match its `pixel_values`.

mod common;

use candle_core::{Device, Tensor};
use mmserve::api::Served;
use mmserve::config::ModelKind;
use mmserve::model::{ImageInput, KeyedImage};
use mmserve::openai::request::ChatCompletionRequest;
use mmserve::startup;

const MODELS: [&str; 5] = common::CHAT_MODELS;

/// PIL's resampling is reproduced bit-exactly on uint8, so what remains is
/// float rounding of rescale and normalize: 1e-5 covers f32 ulp at |x| <= 3
/// with margin. A one-level uint8 difference would show up as ~0.015.
const PIXEL_TOLERANCE: f32 = 1e-5;

fn request(case: &serde_json::Value, model: &str) -> ChatCompletionRequest {
    let body = serde_json::json!({"model": model, "messages": common::messages(case)});
    serde_json::from_value(body).expect("request parses")
}

#[test]
fn prompt_ids_and_pixels_match_the_processor() {
    for model in MODELS {
        let cfg = common::config(&[model]);
        let (served, _engine) = startup::load(&cfg, &cfg.models[0], ModelKind::Chat).expect("load");
        let Served::Chat(serving) = served else {
            panic!("{model} is a chat model")
        };
        let tensors = candle_core::safetensors::load(
            common::fixtures().join(format!("reference/{model}.safetensors")),
            &Device::Cpu,
        )
        .expect("reference tensors");
        for case in common::served_cases(model) {
            let name = case["name"].as_str().expect("name");
            let valid = serving
                .validator
                .validate_chat(&request(&case, model))
                .unwrap_or_else(|e| panic!("{model}/{name}: {e}"));
            assert_eq!(
                valid.prompt_ids,
                common::ids(&case["prompt_ids"]),
                "{model}/{name}: prompt ids"
            );
            let Some(expected) = expected_pixels(&tensors, &case) else {
                assert!(
                    valid.images.is_empty(),
                    "{model}/{name}: images without reference"
                );
                continue;
            };
            let got = got_pixels(&valid.images);
            assert_eq!(got.dims(), expected.dims(), "{model}/{name}: pixel shape");
            let expected = &expected;
            let diff = (got - expected)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert!(
                diff <= PIXEL_TOLERANCE,
                "{model}/{name}: pixel max diff {diff}"
            );
        }
    }
}

/// The processor's pixels for a case: LLaVA stores them per case, (N, 3, H, W);
/// Qwen2-VL per image, (patches_i, C*T*P*P), Idefics3 per image, (frames_i, 3,
/// H, W), concatenated in prompt order.
fn expected_pixels(
    tensors: &std::collections::HashMap<String, Tensor>,
    case: &serde_json::Value,
) -> Option<Tensor> {
    let name = case["name"].as_str()?;
    if let Some(t) = tensors.get(&format!("{name}.pixel_values")) {
        return Some(t.clone());
    }
    let keys = case["image_keys"].as_array()?;
    if keys.is_empty() {
        return None;
    }
    // Idefics3 stores (1, frames, 3, H, W) per image: its tiles are the rows.
    let parts: Vec<Tensor> = keys
        .iter()
        .map(|k| &tensors[&format!("{}.pixel_values", k.as_str().expect("key"))])
        .map(|t| {
            if t.rank() == 5 {
                t.squeeze(0).expect("squeeze")
            } else {
                t.clone()
            }
        })
        .collect();
    Some(Tensor::cat(&parts, 0).expect("cat"))
}

/// Our prepared images in the same layout as [`expected_pixels`].
fn got_pixels(images: &[KeyedImage]) -> Tensor {
    let pixels: Vec<&Tensor> = images
        .iter()
        .map(|i| match &i.input {
            ImageInput::Pixels(t)
            | ImageInput::Patches { patches: t, .. }
            | ImageInput::Tiles { pixels: t, .. } => t,
        })
        .collect();
    match images.first().map(|i| &i.input) {
        Some(ImageInput::Pixels(_)) => Tensor::stack(&pixels, 0).expect("stack"),
        _ => Tensor::cat(&pixels, 0).expect("cat"),
    }
}
