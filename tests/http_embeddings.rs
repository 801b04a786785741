//! `/v1/embeddings` through real HTTP against tiny CLIP and SigLIP models:
//! vectors equal transformers' (normalised) embeddings, float and base64 agree,
//! batches equal single requests, mixed text and image inputs keep their order.

mod common;

use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

const MODELS: [&str; 2] = ["clip-tiny", "siglip-tiny"];

/// Both sides compute in f32 with different summation orders; transformers'
/// own batched and single runs differ by up to 3e-6 on these vectors, so 1e-4
/// absolute on unit vectors leaves margin while a wrong pooling, mask or
/// projection moves entries by 1e-2 or more.
const MAX_ABS: f32 = 1e-4;
const MIN_COSINE: f32 = 0.99999;

fn tensors(model: &str) -> std::collections::HashMap<String, Tensor> {
    let path = common::fixtures().join(format!("reference/{model}.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference tensors")
}

fn reference_vec(t: &std::collections::HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    t[key].flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: dims");
    let dot: f32 = got.iter().zip(want).map(|(a, b)| a * b).sum();
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(dot >= MIN_COSINE, "{what}: cosine {dot}");
    assert!(max <= MAX_ABS, "{what}: max abs error {max}");
}

async fn embed(base: &str, body: &Value) -> (u16, Value) {
    let resp = common::client()
        .post(format!("{base}/v1/embeddings"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn image_item(file: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": common::data_url(file)}})
}

#[tokio::test]
async fn text_and_image_vectors_match_transformers() {
    for model in MODELS {
        let base = common::server(model);
        let reference = common::reference(model);
        let t = tensors(model);
        let texts: Vec<&Value> = reference["texts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["truncated"] == false)
            .collect();
        let inputs: Vec<&str> = texts.iter().map(|x| x["text"].as_str().unwrap()).collect();
        let (status, body) = embed(base, &json!({"model": model, "input": inputs})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "list");
        for (i, text) in texts.iter().enumerate() {
            let key = text["keys"]["normalized"].as_str().unwrap();
            let got = floats(&body["data"][i]["embedding"]);
            assert_close(&got, &reference_vec(&t, key), &format!("{model} text {i}"));
            assert_eq!(body["data"][i]["index"], i);
        }
        for image in reference["images"].as_array().unwrap() {
            let file = image["image"].as_str().unwrap();
            let req = json!({"model": model, "input": [image_item(file)]});
            let (status, body) = embed(base, &req).await;
            assert_eq!(status, 200, "{body}");
            let key = image["keys"]["normalized"].as_str().unwrap();
            let got = floats(&body["data"][0]["embedding"]);
            assert_close(&got, &reference_vec(&t, key), &format!("{model} {file}"));
        }
    }
}

#[tokio::test]
async fn base64_decodes_to_the_float_vectors() {
    let model = "clip-tiny";
    let base = common::server(model);
    let req = |fmt: &str| json!({"model": model, "input": ["a photo of a cat", image_item("gray.png")], "encoding_format": fmt});
    let (_, float) = embed(base, &req("float")).await;
    let (status, b64) = embed(base, &req("base64")).await;
    assert_eq!(status, 200, "{b64}");
    for i in 0..2 {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(v, floats(&float["data"][i]["embedding"]), "item {i}");
    }
}

#[tokio::test]
async fn mixed_inputs_keep_their_order_and_batches_equal_singles() {
    for model in MODELS {
        let base = common::server(model);
        let items = vec![
            json!("a photo of a cat"),
            image_item("rgba.png"),
            json!({"type": "text", "text": "A"}),
            image_item("palette.gif"),
        ];
        let (status, batch) = embed(base, &json!({"model": model, "input": items})).await;
        assert_eq!(status, 200, "{batch}");
        let bodies: Vec<Value> = items
            .iter()
            .map(|it| json!({"model": model, "input": [it]}))
            .collect();
        let singles = futures::future::join_all(bodies.iter().map(|b| embed(base, b))).await;
        for (i, (_, single)) in singles.iter().enumerate() {
            assert_eq!(batch["data"][i]["index"], i);
            assert_close(
                &floats(&batch["data"][i]["embedding"]),
                &floats(&single["data"][0]["embedding"]),
                &format!("{model} item {i}"),
            );
        }
        // Text tokens are counted, images are not.
        assert!(batch["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    }
}

#[tokio::test]
async fn token_id_inputs_equal_their_text() {
    let model = "clip-tiny";
    let base = common::server(model);
    let text = &common::reference(model)["texts"][0];
    let ids = text["input_ids"].clone();
    let (_, by_text) = embed(base, &json!({"model": model, "input": text["text"]})).await;
    let (s1, by_ids) = embed(base, &json!({"model": model, "input": ids})).await;
    let (s2, by_lists) = embed(base, &json!({"model": model, "input": [ids, ids]})).await;
    assert_eq!((s1, s2), (200, 200));
    let want = floats(&by_text["data"][0]["embedding"]);
    assert_eq!(floats(&by_ids["data"][0]["embedding"]), want);
    assert_eq!(floats(&by_lists["data"][1]["embedding"]), want);
}

#[tokio::test]
async fn embedding_errors_are_openai_shaped() {
    let base = common::server("clip-tiny");
    let long = "word ".repeat(100);
    let cases = [
        (
            json!({"model": "clip-tiny", "input": long}),
            400,
            "context_length_exceeded",
        ),
        (
            json!({"model": "clip-tiny", "input": "x", "encoding_format": "int8"}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "clip-tiny", "input": "x", "dimensions": 7}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "clip-tiny", "input": []}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "clip-tiny", "input": [[999999]]}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "clip-tiny", "input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}),
            400,
            "invalid_image",
        ),
        (
            json!({"model": "llava-clip-llama", "input": "x"}),
            400,
            "wrong_model_kind",
        ),
        (
            json!({"model": "nope", "input": "x"}),
            404,
            "model_not_found",
        ),
    ];
    for (body, status, code) in cases {
        let (s, b) = embed(base, &body).await;
        assert_eq!(s, status, "{body}: {b}");
        assert_eq!(b["error"]["code"], code, "{body}: {b}");
    }
    let (s, b) = common::chat(
        base,
        &json!({"model": "clip-tiny", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "wrong_model_kind");
}

#[tokio::test]
async fn one_server_lists_chat_and_embedding_models() {
    let base = common::server("clip-tiny");
    let b: Value = common::client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, common::ALL_MODELS);
}
