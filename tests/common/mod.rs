//! Shared test harness: an in-process mmserve on a loopback port, serving a
//! tiny fixture model, plus the reference cases recorded by
//! `scripts/make_fixtures.py`.
#![allow(dead_code)]

pub mod binary;
pub mod fuzz;
pub mod live;
pub mod scrape;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use mmserve::api::{router, warmup, AppState};
use mmserve::config::{Config, ModelConfig};
use mmserve::startup;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A config serving the fixture models `names`.
pub fn config(names: &[&str]) -> Config {
    let mut cfg = Config::load(None).expect("default config");
    cfg.models = names
        .iter()
        .map(|n| ModelConfig::new(model_dir(n)))
        .collect();
    cfg.engine.max_num_seqs = 16;
    cfg
}

/// Starts a server for `cfg` on its own thread and runtime (it outlives any one
/// test's runtime), its models loaded and warmed up, and returns its base URL.
pub fn start(cfg: Config) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut slots = Vec::new();
            for m in &cfg.models {
                slots.push((m.served_name(), startup::model_kind(m).expect("kind")));
            }
            let state = Arc::new(AppState::new(slots.clone(), &cfg.server));
            for (m, (name, kind)) in cfg.models.iter().zip(slots) {
                let (served, _join) = startup::load(&cfg, m, kind).expect("model loads");
                assert!(state.install(&name, served));
                warmup::warm_up(&state, &name, &cfg.debug)
                    .await
                    .expect("warm-up");
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tx.send(format!("http://{addr}")).expect("send url");
            axum::serve(listener, router(state)).await.expect("serve");
        });
    });
    rx.recv().expect("server started")
}

/// One server per test binary, serving every fixture model.
pub fn server(_name: &'static str) -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| start(config(&ALL_MODELS)))
}

/// Every chat fixture model.
pub const CHAT_MODELS: [&str; 5] = [
    "llava-clip-llama",
    "llava-siglip-qwen2",
    "qwen2-vl-tiny",
    "qwen2.5-vl-tiny",
    "idefics3-tiny",
];

/// Every fixture model, chat and embedding.
pub const ALL_MODELS: [&str; 7] = [
    "llava-clip-llama",
    "llava-siglip-qwen2",
    "qwen2-vl-tiny",
    "qwen2.5-vl-tiny",
    "idefics3-tiny",
    "clip-tiny",
    "siglip-tiny",
];

pub fn data_url(file: &str) -> String {
    let path = fixtures().join("images").join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ext = file.rsplit('.').next().unwrap_or("png");
    let mime = if ext == "jpg" { "jpeg" } else { ext };
    format!(
        "data:image/{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Replaces `fixture:NAME` image URLs with data URLs of the fixture images.
pub fn resolve_images(v: &mut Value) {
    match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("fixture:") {
                *s = data_url(name);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(resolve_images),
        Value::Object(o) => o.values_mut().for_each(resolve_images),
        _ => {}
    }
}

/// The reference cases of a fixture model.
pub fn reference(name: &str) -> Value {
    let path = fixtures().join("reference").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference json")
}

pub fn cases(name: &str) -> Vec<Value> {
    reference(name)["cases"].as_array().expect("cases").clone()
}

/// The cases a client can reproduce: those made with the model's own processor
/// settings (not a per-call override such as `do_image_splitting=False`).
pub fn served_cases(name: &str) -> Vec<Value> {
    cases(name)
        .into_iter()
        .filter(|c| {
            c["processor_overrides"]
                .as_object()
                .is_none_or(|o| o.is_empty())
        })
        .collect()
}

/// A case's messages, with data URLs.
pub fn messages(case: &Value) -> Value {
    let mut m = case["messages"].clone();
    resolve_images(&mut m);
    m
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// GETs a path; returns status and JSON body.
pub async fn get(base: &str, path: &str) -> (u16, Value) {
    let resp = client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

/// POSTs a chat request; returns status and JSON body.
pub async fn chat(base: &str, body: &Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, json)
}

/// POSTs a streaming chat request; returns the parsed `data:` payloads
/// (`[DONE]` as the JSON string "[DONE]").
pub async fn chat_stream(base: &str, body: &Value) -> Vec<Value> {
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_string();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let text = resp.text().await.expect("body");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"));
            if data == "[DONE]" {
                Value::String("[DONE]".into())
            } else {
                serde_json::from_str(data).expect("chunk json")
            }
        })
        .collect()
}

/// The assistant text of a non-streamed answer's first choice.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// Concatenated streamed text of choice `index`.
pub fn streamed_text(events: &[Value], index: u64) -> String {
    events
        .iter()
        .filter(|e| e.is_object() && e["choices"].as_array().is_some_and(|c| !c.is_empty()))
        .filter(|e| e["choices"][0]["index"] == index)
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

pub fn greedy(model: &str, messages: Value, max_tokens: u32) -> Value {
    json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
}

/// The reference greedy text, cut at the first end-of-sequence token as the
/// server stops there.
pub fn expected_text(model: &str, case: &Value) -> (String, usize, &'static str) {
    let tok = Tokenizer::from_file(model_dir(model).join("tokenizer.json")).unwrap();
    let reference = reference(model);
    let mut eos = match &reference["generation_config_eos_token_id"] {
        Value::Array(_) => ids(&reference["generation_config_eos_token_id"]),
        v => vec![v.as_u64().unwrap() as u32],
    };
    eos.extend(
        reference["tokenizer"]["eos_token_id"]
            .as_u64()
            .map(|x| x as u32),
    );
    let tokens = ids(&case["greedy_tokens"]);
    let (cut, reason) = match tokens.iter().position(|t| eos.contains(t)) {
        Some(i) => (i + 1, "stop"),
        None => (tokens.len(), "length"),
    };
    let text = tok.decode(&tokens[..cut], true).unwrap();
    (text, cut, reason)
}
