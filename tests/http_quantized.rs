//! `quantize` through HTTP against the tiny fixture models and transformers' goldens: Q8_0
//! keeps greedy output wherever the golden's top-1/top-2 margin is above the quantization
//! error, with logprobs within that error; K-quants, whose 256-wide blocks do not fit the
//! fixtures' 64- and 128-wide projections, leave every layer dense and change nothing. The
//! vision tower's bf16x3 products (`vision_matmul_precision = "high"`) are checked the same
//! way, with their own bound.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use mmserve::config::{MatmulPrecision, Quantize};
use mmserve::text::TokenTable;
use serde_json::json;
use tokenizers::Tokenizer;

/// Largest logit error Q8_0 may cause on the fixtures. Candle's Q8_0 product rounds weights
/// and activations to 8 bits per block of 32: 0.9% relative error per product (the unit test
/// in src/model/linear.rs; shared/notes/candle-cpu.md measured the same on a decoder-sized
/// matrix). The fixtures' random 64-wide, 2-layer decoders amplify it about tenfold, to logit
/// errors of up to ~8% of the logits' rms (1.6 on every fixture): over 530 greedy steps of the
/// five fixtures we measured logprob errors of median 0.039, p99 0.20, max 0.23, and saw greedy
/// picks flip only where the golden's top-2 margin was at most 0.25 (two logits moving by
/// ~0.13 each). 0.2 covers that with a margin.
const Q8_0_LOGIT_ERROR: f64 = 0.2;

/// A logprob is a logit minus the log-sum-exp of all logits; each moves by at most the logit
/// error, so a logprob moves by at most twice it. A greedy pick cannot flip where the golden's
/// top-1/top-2 margin exceeds twice the logit error either.
const Q8_0_BOUND: f64 = 2.0 * Q8_0_LOGIT_ERROR;

/// Dense f32 against transformers: the model reference tests hold logits to 1e-4, so logprobs
/// to 2e-4; plus the JSON's f32 rounding of the logprob.
const DENSE_LOGPROB_ERROR: f64 = 3e-4;

/// Largest logit error of the vision tower's bf16x3 products on the fixtures: each product term
/// within about 1e-5 of its f32 value; `tests/idefics3_reference.rs` measured logit errors up
/// to 1.5e-4 and bounds them at 1e-3, which is used here too.
const BF16X3_LOGIT_ERROR: f64 = 1e-3;
const BF16X3_BOUND: f64 = 2.0 * BF16X3_LOGIT_ERROR + DENSE_LOGPROB_ERROR;

/// A server for `models`, each quantized to `q`.
fn quantized_server(models: &[&str], q: Quantize) -> String {
    let mut cfg = common::config(models);
    cfg.models.iter_mut().for_each(|m| m.quantize = Some(q));
    common::start(cfg)
}

/// The golden: per case, the (steps, vocab) logits transformers chose each greedy token from.
fn golden_logits(model: &str) -> HashMap<String, Vec<Vec<f32>>> {
    let path = common::fixtures()
        .join("reference")
        .join(format!("{model}.safetensors"));
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("golden tensors");
    tensors
        .into_iter()
        .filter_map(|(k, t): (String, Tensor)| {
            let case = k.strip_suffix(".logits")?.to_string();
            Some((case, t.to_vec2::<f32>().expect("logits (steps, vocab)")))
        })
        .collect()
}

fn logprob(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&z| (z as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits[token as usize] as f64 - lse
}

/// What one model's served cases showed.
#[derive(Default)]
struct Checked {
    /// Greedy steps that matched the golden.
    steps: usize,
    /// Steps skipped after an allowed flip (a margin within the error).
    skipped: usize,
    /// Largest |logprob - golden logprob| over the checked steps.
    worst: f64,
    /// The logprobs of the checked steps, in order.
    logprobs: Vec<f64>,
}

/// Runs every served case of `model` on `base` with logprobs and compares each greedy step
/// with the golden while the two agree: a step may pick another token only where the golden's
/// top-1/top-2 margin is at most `margin` (the rest of that case is then skipped); the logprob
/// of an agreeing step must be within `tolerance` of the golden's.
async fn check_model(base: &str, model: &str, margin: f64, tolerance: f64) -> Checked {
    let tok = Tokenizer::from_file(common::model_dir(model).join("tokenizer.json")).unwrap();
    let table = TokenTable::new(&tok);
    let logits = golden_logits(model);
    let mut out = Checked::default();
    for case in common::served_cases(model) {
        let name = case["name"].as_str().unwrap();
        let mut req = common::greedy(model, common::messages(&case), 20);
        req["logprobs"] = json!(true);
        let (status, body) = common::chat(base, &req).await;
        assert_eq!(status, 200, "{model}/{name}: {body}");
        let entries = body["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs entries");
        let (_, cut, reason) = common::expected_text(model, &case);
        let greedy = common::ids(&case["greedy_tokens"]);
        let gaps: Vec<f64> = case["top2_gaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        for i in 0..cut {
            let golden_eos = reason == "stop" && i + 1 == cut;
            // The server's token at step i: its bytes, or None for EOS (which has no entry).
            let got = entries.get(i).map(|e| {
                let bytes: Vec<u8> = e["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                (bytes, e["logprob"].as_f64().unwrap())
            });
            let same = match &got {
                None => golden_eos,
                Some((bytes, _)) => !golden_eos && bytes == table.bytes(greedy[i]),
            };
            if !same {
                // A flip is allowed only within the error; the rest of the case then differs.
                assert!(
                    gaps[i] <= margin,
                    "{model}/{name}: step {i} differs with a top-2 margin of {}",
                    gaps[i]
                );
                out.skipped += cut - i;
                break;
            }
            out.steps += 1;
            if let Some((_, lp)) = got {
                let diff = (lp - logprob(&logits[name][i], greedy[i])).abs();
                assert!(
                    diff <= tolerance,
                    "{model}/{name} step {i}: logprob off by {diff}"
                );
                out.worst = out.worst.max(diff);
                out.logprobs.push(lp);
            }
        }
    }
    out
}

#[tokio::test]
async fn q8_0_keeps_greedy_output_where_the_margin_allows() {
    let base = quantized_server(&common::CHAT_MODELS, Quantize::Q8_0);
    for model in common::CHAT_MODELS {
        let c = check_model(&base, model, Q8_0_BOUND, Q8_0_BOUND).await;
        eprintln!(
            "{model}: {} steps matched, {} skipped after a flip, worst logprob error {:.4}",
            c.steps, c.skipped, c.worst
        );
        // A good part of the steps is compared, or the test would prove little.
        let all = c.steps + c.skipped;
        assert!(3 * c.steps >= all, "{model}: {} of {all} steps", c.steps);
        // And the layers were quantized: dense f32 stays within DENSE_LOGPROB_ERROR.
        assert!(c.worst > DENSE_LOGPROB_ERROR, "{model}: {:.2e}", c.worst);
    }
}

/// Q4K and Q6K need input sizes in multiples of 256; the fixtures' are 64 and 128, so every
/// projection stays dense (as the load logs) and the output is transformers' to f32 precision.
#[tokio::test]
async fn k_quants_leave_small_layers_dense_and_exact() {
    for (model, q) in [
        ("llava-clip-llama", Quantize::Q4K),
        ("qwen2-vl-tiny", Quantize::Q6K),
    ] {
        let base = quantized_server(&[model], q);
        let c = check_model(&base, model, 0.0, DENSE_LOGPROB_ERROR).await;
        assert_eq!(c.skipped, 0, "{model}: every step matches");
        assert!(c.steps >= 100, "{model}: {} steps", c.steps);
    }
}

/// `vision_matmul_precision = "high"`: the image fixtures' answers stay transformers' within
/// the bf16x3 bound, and differ from the f32 server's (the setting reached the tower), where
/// the CPU has AMX-BF16. Qwen2-VL's tower keeps f32 products.
#[tokio::test]
async fn vision_bf16x3_keeps_greedy_output_within_its_bound() {
    let models = ["llava-clip-llama", "llava-siglip-qwen2"];
    let mut cfg = common::config(&models);
    cfg.models
        .iter_mut()
        .for_each(|m| m.vision_matmul_precision = MatmulPrecision::High);
    let (high, exact) = (common::start(cfg), common::start(common::config(&models)));
    for model in models {
        let c = check_model(&high, model, BF16X3_BOUND, BF16X3_BOUND).await;
        let f32s = check_model(&exact, model, 0.0, DENSE_LOGPROB_ERROR).await;
        eprintln!(
            "{model}: {} steps matched, {} skipped, worst logprob error {:.2e} (f32: {:.2e})",
            c.steps, c.skipped, c.worst, f32s.worst
        );
        assert!(
            3 * c.steps >= c.steps + c.skipped,
            "{model}: {} steps",
            c.steps
        );
        if mmserve::model::bf16x3::available() {
            assert_ne!(c.logprobs, f32s.logprobs, "{model}: bf16x3 changed nothing");
        } else {
            eprintln!("no AMX-BF16 here: both servers computed in f32");
        }
    }
}
