//! The embedded demo models, as `mmserve` with no `--model` serves them: the committed example
//! images (held-out scenes, models/demo/examples/) get their true captions and answers with greedy
//! decoding, and the CLIP model ranks each image's own caption first. A change that breaks
//! loading, preprocessing or decoding of the shipped model fails here.

mod common;

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

fn examples() -> (std::path::PathBuf, Vec<Value>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/examples");
    let text = std::fs::read_to_string(dir.join("examples.json")).expect("examples.json");
    (
        dir,
        serde_json::from_str(&text).expect("examples.json is JSON"),
    )
}

fn image_part(dir: &std::path::Path, example: &Value) -> Value {
    let bytes = std::fs::read(dir.join(example["file"].as_str().unwrap())).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let url = format!("data:{};base64,{b64}", example["mime"].as_str().unwrap());
    json!({"type": "image_url", "image_url": {"url": url}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_demo_models_answer_the_committed_examples() {
    let server = common::binary::start(&[], Duration::from_secs(60)).await;
    let (dir, examples) = examples();
    let models = common::client()
        .get(format!("{}/v1/models", server.base))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mmserve-demo", "mmserve-demo-clip"]);

    for ex in &examples {
        let mut asks = vec![("Describe the image.", ex["caption"].as_str().unwrap())];
        for q in ex["questions"].as_array().unwrap() {
            asks.push((
                q["question"].as_str().unwrap(),
                q["answer"].as_str().unwrap(),
            ));
        }
        for (question, want) in asks {
            let body = json!({
                "model": "mmserve-demo",
                "temperature": 0,
                "messages": [{"role": "user", "content": [
                    image_part(&dir, ex), {"type": "text", "text": question}
                ]}],
            });
            let (status, v) = common::chat(&server.base, &body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(common::content(&v), want, "{}: {question}", ex["file"]);
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
    }

    // Zero-shot retrieval among the examples' captions: each image's own caption scores highest.
    let captions: Vec<&str> = examples
        .iter()
        .map(|e| e["caption"].as_str().unwrap())
        .collect();
    let mut inputs: Vec<Value> = captions.iter().map(|c| json!(c)).collect();
    inputs.extend(examples.iter().map(|e| image_part(&dir, e)));
    let resp = common::client()
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"model": "mmserve-demo-clip", "input": inputs}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let vecs: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let (texts, images) = vecs.split_at(captions.len());
    for (i, image) in images.iter().enumerate() {
        let scores: Vec<f64> = texts
            .iter()
            .map(|t| t.iter().zip(image).map(|(a, b)| a * b).sum())
            .collect();
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        // Examples can share a caption (two scenes alike): any caption equal to its own counts.
        assert_eq!(
            captions[best], captions[i],
            "{}: {scores:?}",
            examples[i]["file"]
        );
    }
}
