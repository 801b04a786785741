//! `mmserve::model::embed` against transformers: every reference text and image of the tiny CLIP
//! and SigLIP fixtures must give transformers' embeddings (raw `get_*_features` and
//! L2-normalised); a batch of all texts (different lengths) and a batch of all images must give
//! each item what it gets alone; bad checkpoints and inputs must fail with named errors.
//!
//! Fixtures are made by `scripts/make_embedding_fixtures.py` (transformers 5.24, f32, one torch
//! thread); the texts carry the `input_ids` transformers' processor produced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmserve::model::embed::{EmbeddingKind, EmbeddingModel, TextPadding};
use mmserve::model::ModelError;

/// Cosine similarity every embedding must reach against its reference.
const MIN_COSINE: f64 = 0.99999;
/// Max |ours - ref| for L2-normalised embeddings (unit vectors, entries <= 1). Both sides are f32
/// but sum in different orders (candle's gemm blocking vs torch's, softmax and layer-norm sums):
/// about 1e-7 relative per op, compounding over 2 encoder layers, the pooling and the
/// projection. We measured at most 2.3e-7 on these fixtures; 2e-6 keeps a ~9x margin and is
/// still orders of magnitude below what a wrong mask, pooling row or head changes (dropping
/// SigLIP's pad tokens moves the raw embedding by up to 2.1).
const NORMALIZED_ABS: f32 = 2e-6;
/// Raw (unnormalised) embeddings: the same relative error scaled by the vector's L2 norm (CLIP's
/// raw image embeddings have norms near 31 here), so |ours - ref| <= RAW_REL * |ref|_2; the
/// measured maximum was 2.3e-7.
const RAW_REL: f32 = 2e-6;
/// One item alone vs inside a batch, both ours: only the gemm shapes differ (padding rows under
/// a causal mask, more images), so sums are ordered differently at f32 rounding level; measured
/// at most 1.1e-7.
const BATCH_ABS: f32 = 1e-6;
/// bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); after 2 layers the embeddings stay
/// within this cosine of the f32 reference (measured at least 0.99984 on these fixtures).
const BF16_MIN_COSINE: f64 = 0.999;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    model: EmbeddingModel,
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn load(name: &str) -> Self {
        let dir = fixtures().join("models").join(name);
        let model = EmbeddingModel::load(&dir, DType::F32, &Device::Cpu).expect("model loads");
        let refs = fixtures().join("reference");
        let text = std::fs::read_to_string(refs.join(format!("{name}.json"))).expect("ref json");
        let json = serde_json::from_str(&text).expect("valid json");
        let tensors =
            candle_core::safetensors::load(refs.join(format!("{name}.safetensors")), &Device::Cpu)
                .expect("reference tensors");
        Self {
            model,
            json,
            tensors,
        }
    }

    fn vector(&self, key: &str) -> Vec<f32> {
        let t = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("f32 vector")
    }

    fn texts(&self) -> Vec<(usize, Vec<u32>, serde_json::Value)> {
        self.json["texts"]
            .as_array()
            .expect("texts")
            .iter()
            .map(|t| {
                let index = t["index"].as_u64().expect("index") as usize;
                (index, ids(&t["input_ids"]), t.clone())
            })
            .collect()
    }

    /// (image name, pixel_values (1, 3, H, W))
    fn images(&self) -> Vec<(String, Tensor)> {
        self.json["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| {
                let name = i["image"].as_str().expect("image name").to_string();
                let pixels = self.tensors[&format!("pixel_values.{name}")].clone();
                (name, pixels)
            })
            .collect()
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().expect("(N, dim) f32")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Checks one embedding, raw and normalised, against its reference.
fn check(what: &str, raw: &[f32], normalized: &[f32], r: &Reference, keys: (&str, &str)) {
    let (want_raw, want_norm) = (r.vector(keys.0), r.vector(keys.1));
    let cos = cosine(normalized, &want_norm);
    assert!(cos >= MIN_COSINE, "{what}: cosine {cos}");
    let err = max_abs(normalized, &want_norm);
    assert!(
        err <= NORMALIZED_ABS,
        "{what}: normalised max abs err {err}"
    );
    let scale = want_raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    let err = max_abs(raw, &want_raw);
    assert!(
        err <= RAW_REL * scale,
        "{what}: raw max abs err {err} (norm {scale})"
    );
}

fn texts_match(name: &str) {
    let r = Reference::load(name);
    let texts = r.texts();
    assert_eq!(texts.len(), 6);
    for (i, input_ids, _) in &texts {
        let one = std::slice::from_ref(input_ids);
        let raw = rows(&r.model.text_features(one).expect("text features"));
        let norm = rows(&r.model.embed_texts(one).expect("text embeds"));
        assert_eq!(norm.len(), 1);
        assert_eq!(norm[0].len(), r.model.dim());
        let keys = (
            format!("text_embeds.{i}"),
            format!("text_embeds_normalized.{i}"),
        );
        check(
            &format!("{name} text {i}"),
            &raw[0],
            &norm[0],
            &r,
            (&keys.0, &keys.1),
        );
    }
}

fn images_match(name: &str) {
    let r = Reference::load(name);
    for (image, pixels) in r.images() {
        let raw = rows(&r.model.image_features(&pixels).expect("image features"));
        let norm = rows(&r.model.embed_images(&pixels).expect("image embeds"));
        assert_eq!(norm[0].len(), r.model.dim());
        let keys = (
            format!("image_embeds.{image}"),
            format!("image_embeds_normalized.{image}"),
        );
        check(
            &format!("{name} image {image}"),
            &raw[0],
            &norm[0],
            &r,
            (&keys.0, &keys.1),
        );
    }
}

/// All texts at once (CLIP: six different lengths) equal each text alone.
fn text_batch_equals_single(name: &str) {
    let r = Reference::load(name);
    let all: Vec<Vec<u32>> = r.texts().into_iter().map(|(_, ids, _)| ids).collect();
    let batch = rows(&r.model.embed_texts(&all).expect("batch"));
    for (i, ids) in all.iter().enumerate() {
        let alone = rows(
            &r.model
                .embed_texts(std::slice::from_ref(ids))
                .expect("single"),
        );
        let err = max_abs(&batch[i], &alone[0]);
        assert!(err <= BATCH_ABS, "{name} text {i}: batch vs single {err}");
    }
}

fn image_batch_equals_single(name: &str) {
    let r = Reference::load(name);
    let images = r.images();
    let pixels: Vec<Tensor> = images.iter().map(|(_, p)| p.clone()).collect();
    let batch = rows(
        &r.model
            .embed_images(&Tensor::cat(&pixels, 0).expect("cat"))
            .expect("batch"),
    );
    assert_eq!(batch.len(), images.len());
    for (i, (image, p)) in images.iter().enumerate() {
        let alone = rows(&r.model.embed_images(p).expect("single"));
        let err = max_abs(&batch[i], &alone[0]);
        assert!(
            err <= BATCH_ABS,
            "{name} image {image}: batch vs single {err}"
        );
    }
}

#[test]
fn clip_texts_match_transformers() {
    texts_match("clip-tiny");
}

#[test]
fn clip_images_match_transformers() {
    images_match("clip-tiny");
}

#[test]
fn siglip_texts_match_transformers() {
    texts_match("siglip-tiny");
}

#[test]
fn siglip_images_match_transformers() {
    images_match("siglip-tiny");
}

#[test]
fn clip_text_batch_of_mixed_lengths_equals_single() {
    let r = Reference::load("clip-tiny");
    let lengths: std::collections::BTreeSet<usize> =
        r.texts().iter().map(|(_, ids, _)| ids.len()).collect();
    assert!(lengths.len() >= 4, "fixture texts should differ in length");
    text_batch_equals_single("clip-tiny");
}

#[test]
fn siglip_text_batch_equals_single() {
    text_batch_equals_single("siglip-tiny");
}

#[test]
fn image_batches_equal_single() {
    image_batch_equals_single("clip-tiny");
    image_batch_equals_single("siglip-tiny");
}

#[test]
fn describes_the_models() {
    let clip = Reference::load("clip-tiny").model;
    assert_eq!(
        (
            clip.kind(),
            clip.dim(),
            clip.max_text_len(),
            clip.image_size()
        ),
        (EmbeddingKind::Clip, 48, 16, 48)
    );
    assert_eq!(clip.text_padding(), TextPadding::None);
    let siglip = Reference::load("siglip-tiny").model;
    assert_eq!(
        (
            siglip.kind(),
            siglip.dim(),
            siglip.max_text_len(),
            siglip.image_size()
        ),
        (EmbeddingKind::Siglip, 48, 16, 32)
    );
    assert_eq!(
        siglip.text_padding(),
        TextPadding::MaxLength {
            length: 16,
            pad_id: 1
        }
    );
}

/// SigLIP texts given unpadded are padded to max_length with the pad id, as the tokenizer does.
#[test]
fn siglip_pads_short_texts_itself() {
    let r = Reference::load("siglip-tiny");
    for (i, padded, entry) in r.texts() {
        if entry["truncated"].as_bool() == Some(true) {
            continue;
        }
        let unpadded = ids(&entry["untruncated_input_ids"]);
        assert!(unpadded.len() < padded.len() || unpadded == padded);
        let a = rows(&r.model.embed_texts(&[unpadded]).expect("unpadded"));
        let b = rows(&r.model.embed_texts(&[padded]).expect("padded"));
        assert_eq!(a, b, "text {i}");
    }
}

/// The model runs in bf16 too (weights, activations; f32 softmax, f32 output).
#[test]
fn bf16_stays_close_to_reference() {
    for name in ["clip-tiny", "siglip-tiny"] {
        let r = Reference::load(name);
        let dir = fixtures().join("models").join(name);
        let model = EmbeddingModel::load(&dir, DType::BF16, &Device::Cpu).expect("bf16 load");
        let all: Vec<Vec<u32>> = r.texts().into_iter().map(|(_, ids, _)| ids).collect();
        let texts = rows(&model.embed_texts(&all).expect("bf16 texts"));
        for (i, got) in texts.iter().enumerate() {
            let cos = cosine(got, &r.vector(&format!("text_embeds_normalized.{i}")));
            assert!(cos >= BF16_MIN_COSINE, "{name} bf16 text {i}: cosine {cos}");
        }
        for (image, pixels) in r.images() {
            let got = rows(&model.embed_images(&pixels).expect("bf16 image"));
            let cos = cosine(
                &got[0],
                &r.vector(&format!("image_embeds_normalized.{image}")),
            );
            assert!(
                cos >= BF16_MIN_COSINE,
                "{name} bf16 image {image}: cosine {cos}"
            );
        }
    }
}

#[test]
fn empty_batches_give_empty_matrices() {
    let r = Reference::load("clip-tiny");
    let t = r.model.embed_texts(&[]).expect("no texts");
    assert_eq!(t.dims(), &[0, 48]);
    let none = Tensor::zeros((0, 3, 48, 48), DType::F32, &Device::Cpu).expect("zeros");
    assert_eq!(
        r.model.embed_images(&none).expect("no images").dims(),
        &[0, 48]
    );
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmserve-embed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn load_err(dir: &Path) -> String {
    match EmbeddingModel::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn load_errors_name_the_file_and_model_type() {
    let dir = temp_dir("errors");
    let err = load_err(&dir);
    assert!(
        err.contains("missing file") && err.contains("config.json"),
        "{err}"
    );

    std::fs::write(dir.join("config.json"), r#"{"model_type": "llava"}"#).expect("write");
    let err = load_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("\"llava\""),
        "{err}"
    );

    let clip = fixtures().join("models/clip-tiny");
    std::fs::copy(clip.join("config.json"), dir.join("config.json")).expect("copy");
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors"), "{err}");

    // CLIP config over SigLIP weights: the tensor and the file are named.
    let siglip = fixtures().join("models/siglip-tiny/model.safetensors");
    std::fs::copy(siglip, dir.join("model.safetensors")).expect("copy");
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("text_model."),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_named() {
    let r = Reference::load("clip-tiny");
    let too_long = vec![1u32; 17];
    let err = r.model.embed_texts(&[vec![853, 854], too_long]).err();
    assert!(
        matches!(&err, Some(ModelError::Input { seq_id: 1, message }) if message.contains("17 tokens")),
        "{err:?}"
    );
    let err = r.model.embed_texts(&[vec![]]).err();
    assert!(
        matches!(err, Some(ModelError::Input { seq_id: 0, .. })),
        "{err:?}"
    );
    let err = r
        .model
        .embed_texts(&[vec![853, 9999]])
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("9999")),
        "{err:?}"
    );
    let wrong = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).expect("zeros");
    let err = r.model.embed_images(&wrong).err();
    assert!(matches!(err, Some(ModelError::Pixels(_))), "{err:?}");
}
