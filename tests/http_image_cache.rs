//! The vision-encoder output cache through real HTTP, for every chat family:
//! an image sent again (alone, or beside a new one in the next turn of a
//! chat, or as the same pixels in another file) skips the encoder and the
//! answer is byte for byte the first one; a new image, or the same picture at
//! another size, is encoded. Counted by `/metrics`: the image-cache hits and
//! misses and the vision-encoder histogram, which only real encodes move.
//! Then a budget that holds one image: least recently used out, answers
//! unchanged.

mod common;

use std::io::Cursor;

use base64::Engine as _;
use common::scrape::{moved, sample, scrape};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageEncoder};
use mmserve::config::ModelConfig;
use serde_json::{json, Value};

const HITS: &str = "mmserve:image_cache_hits_total";
const MISSES: &str = "mmserve:image_cache_misses_total";
const ENCODES: &str = "mmserve:vision_encoder_time_seconds_count";
const HELD: &str = "mmserve:image_cache_usage_bytes";

/// The picture the tests resend, and the one a later turn adds.
const FIRST: &str = "cat_landscape.png";
const SECOND: &str = "bike_portrait.png";

fn png_url(img: &DynamicImage, compression: CompressionType) -> String {
    let rgb = img.to_rgb8();
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(Cursor::new(&mut bytes), compression, FilterType::Adaptive)
        .write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:image/png;base64,{b64}")
}

fn fixture_image(name: &str) -> DynamicImage {
    image::open(common::fixtures().join("images").join(name)).expect("fixture image")
}

/// A user turn: a question, then images.
fn user(text: &str, urls: &[&str]) -> Value {
    let mut parts = vec![json!({"type": "text", "text": text})];
    parts.extend(
        urls.iter()
            .map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
    );
    json!({"role": "user", "content": parts})
}

/// Greedy answer to `messages` (`n` choices, with logprobs): the choices as
/// sent, to compare byte for byte.
async fn answer(base: &str, model: &str, messages: Value, n: u32) -> Value {
    let body = json!({
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 8,
        "logprobs": true, "top_logprobs": 3, "n": n,
    });
    let (status, v) = common::chat(base, &body).await;
    assert_eq!(status, 200, "{model}: {v}");
    v["choices"].clone()
}

/// Image-cache hits, misses and vision-encoder batches of `model` since `before`.
async fn counts(base: &str, model: &str, before: &mut String) -> (f64, f64, f64) {
    let after = scrape(base).await;
    let m = [("model_name", model)];
    let c = (
        moved(before, &after, HITS, &m),
        moved(before, &after, MISSES, &m),
        moved(before, &after, ENCODES, &m),
    );
    *before = after;
    c
}

/// Every chat fixture, with the prefix cache off: a repeated prompt would reuse its image's KV
/// blocks and never ask the image cache (`http_prefix` tests that path).
fn without_prefix_cache() -> &'static str {
    static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        let mut cfg = common::config(&common::CHAT_MODELS);
        cfg.engine.enable_prefix_caching = false;
        common::start(cfg)
    })
}

async fn resent_images_skip_the_encoder(model: &str) {
    let base = without_prefix_cache();
    let first = fixture_image(FIRST);
    let a = common::data_url(FIRST);
    let b = common::data_url(SECOND);
    let ask = user("Describe it.", &[&a]);
    let mut seen = scrape(base).await;

    let one = answer(base, model, json!([ask]), 1).await;
    assert_eq!(
        counts(base, model, &mut seen).await,
        (0.0, 1.0, 1.0),
        "{model}"
    );
    let again = answer(base, model, json!([ask]), 1).await;
    assert_eq!(again, one, "{model}: a cached image changed the answer");
    assert_eq!(
        counts(base, model, &mut seen).await,
        (1.0, 0.0, 0.0),
        "{model}"
    );

    // The next turn of the chat resends the first image and adds one.
    let text = one[0]["message"]["content"].as_str().expect("content");
    let chat = json!([ask, {"role": "assistant", "content": text}, user("And this?", &[&b])]);
    answer(base, model, chat, 1).await;
    assert_eq!(
        counts(base, model, &mut seen).await,
        (1.0, 1.0, 1.0),
        "{model}"
    );

    // The same pixels in another file are the same image.
    let same = png_url(&first, CompressionType::Best);
    assert_ne!(same, a, "the re-encoded file differs");
    let from_copy = answer(base, model, json!([user("Describe it.", &[&same])]), 1).await;
    assert_eq!(from_copy, one, "{model}");
    assert_eq!(
        counts(base, model, &mut seen).await,
        (1.0, 0.0, 0.0),
        "{model}"
    );

    // The same picture at twice the size preprocesses differently.
    let (w, h) = (first.width() * 2, first.height() * 2);
    let big = png_url(
        &first.resize_exact(w, h, image::imageops::FilterType::Nearest),
        CompressionType::Fast,
    );
    answer(base, model, json!([user("Describe it.", &[&big])]), 1).await;
    assert_eq!(
        counts(base, model, &mut seen).await,
        (0.0, 1.0, 1.0),
        "{model}"
    );

    // Two choices of one request share one encode.
    let flipped = png_url(&first.fliph(), CompressionType::Fast);
    let two = answer(base, model, json!([user("Describe it.", &[&flipped])]), 2).await;
    assert_eq!(two[0]["message"], two[1]["message"], "{model}");
    let (hits, misses, _) = counts(base, model, &mut seen).await;
    assert_eq!((hits, misses), (1.0, 1.0), "{model}");
}

#[tokio::test]
async fn resent_images_skip_the_encoder_in_every_chat_family() {
    for model in common::CHAT_MODELS {
        resent_images_skip_the_encoder(model).await;
    }
}

/// A server of one fixture model under its own name (its own metrics).
fn named(fixture: &str, name: &str, image_cache_bytes: usize) -> String {
    let mut cfg = common::config(&[]);
    let mut m = ModelConfig::new(common::model_dir(fixture));
    m.name = name.to_string();
    cfg.models = vec![m];
    cfg.engine.image_cache_bytes = image_cache_bytes;
    cfg.engine.enable_prefix_caching = false;
    common::start(cfg)
}

#[tokio::test]
async fn a_budget_of_one_image_keeps_the_last_one() {
    const FIXTURE: &str = "llava-clip-llama";
    let (a, b) = (common::data_url(FIRST), common::data_url(SECOND));
    let (ask_a, ask_b) = (json!([user("What?", &[&a])]), json!([user("What?", &[&b])]));

    // What one image's rows take, and the answers with room to spare.
    // (The start-up warm-up's canary image is held already.)
    let roomy = named(FIXTURE, "cache-roomy", 1 << 20);
    let held = |text: &str| sample(text, HELD, &[("model_name", "cache-roomy")]);
    let before = held(&scrape(&roomy).await);
    let want_a = answer(&roomy, "cache-roomy", ask_a.clone(), 1).await;
    let one_image = held(&scrape(&roomy).await) - before;
    assert!(one_image > 0.0);
    let want_b = answer(&roomy, "cache-roomy", ask_b.clone(), 1).await;

    let model = "cache-tight";
    let tight = named(FIXTURE, model, one_image as usize * 3 / 2);
    let mut seen = scrape(&tight).await;
    for (ask, want, hit) in [
        (&ask_a, &want_a, false),
        (&ask_b, &want_b, false),
        (&ask_a, &want_a, false), // b evicted a
        (&ask_a, &want_a, true),
    ] {
        assert_eq!(&answer(&tight, model, ask.clone(), 1).await, want);
        let (hits, misses, _) = counts(&tight, model, &mut seen).await;
        assert_eq!((hits, misses), if hit { (1.0, 0.0) } else { (0.0, 1.0) });
        assert_eq!(sample(&seen, HELD, &[("model_name", model)]), one_image);
    }
}
