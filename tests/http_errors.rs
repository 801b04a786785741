//! Bad input through real HTTP: every error has the OpenAI shape and the right
//! status, and the server keeps serving afterwards.

mod common;

use common::chat;
use serde_json::{json, Value};

const MODEL: &str = "llava-clip-llama";

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(err.as_object().unwrap().contains_key("param"), "{body}");
    assert_eq!(err["code"], want_code, "{body}");
}

fn user_parts(parts: Value) -> Value {
    json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]})
}

async fn raw_post(base: &str, path: &str, body: &'static str) -> (u16, Value) {
    let resp = common::client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400() {
    let base = common::server(MODEL);
    let (s, b) = raw_post(base, "/v1/chat/completions", "{not json").await;
    assert_error(s, &b, 400, "invalid_json");
    let (s, b) = raw_post(base, "/v1/chat/completions", r#"{"model": 3}"#).await;
    assert_error(s, &b, 400, "invalid_request");
    let (s, b) = raw_post(
        base,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"audio"}]}]}"#,
    )
    .await;
    assert_error(s, &b, 400, "invalid_request");
}

#[tokio::test]
async fn unknown_model_and_route_are_404() {
    let base = common::server(MODEL);
    let (s, b) = chat(
        base,
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_error(s, &b, 404, "model_not_found");
    assert!(
        b["error"]["message"].as_str().unwrap().contains(MODEL),
        "names the available model"
    );
    let (s, b) = common::get(base, "/v1/nope").await;
    assert_eq!(s, 404);
    assert_eq!(b["error"]["code"], "not_found");
}

#[tokio::test]
async fn bad_images_name_the_part() {
    let base = common::server(MODEL);
    let text = json!({"type": "text", "text": "what is this?"});
    let cases = [
        ("data:image/png;base64,!!!notbase64", "invalid_image"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "invalid_image"),
        ("data:image/bmp;base64,Qk0=", "unsupported_image_format"),
        ("data:text/plain;base64,aGk=", "unsupported_image_format"),
        ("https://example.com/cat.png", "remote_image_url"),
    ];
    for (url, code) in cases {
        let body = user_parts(json!([text, {"type": "image_url", "image_url": {"url": url}}]));
        let (s, b) = chat(base, &body).await;
        assert_error(s, &b, 400, code);
        assert_eq!(
            b["error"]["param"], "messages[0].content[1].image_url",
            "{url}"
        );
    }
}

#[tokio::test]
async fn typed_placeholders_cannot_forge_an_image() {
    let base = common::server(MODEL);
    let (s, b) = chat(base, &user_parts(json!("look: <image> what is it?"))).await;
    assert_error(s, &b, 400, "invalid_prompt");
    let (s, b) = chat(
        base,
        &user_parts(json!([{"type": "text", "text": "<image>"}])),
    )
    .await;
    assert_error(s, &b, 400, "invalid_prompt");
    assert_eq!(b["error"]["param"], "messages[0].content[0].text");
}

#[tokio::test]
async fn out_of_range_parameters_name_the_param() {
    let base = common::server(MODEL);
    for (field, value) in [
        ("temperature", json!(2.5)),
        ("top_p", json!(1.5)),
        ("n", json!(0)),
        ("presence_penalty", json!(-2.5)),
        ("top_logprobs", json!(3)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("max_tokens", json!(0)),
    ] {
        let mut body = user_parts(json!("hi"));
        body[field] = value;
        let (s, b) = chat(base, &body).await;
        assert_eq!(s, 400, "{field}: {b}");
        assert_eq!(b["error"]["param"], field, "{b}");
    }
}

#[tokio::test]
async fn too_long_a_request_is_context_length_exceeded() {
    let base = common::server(MODEL);
    let mut body = user_parts(json!("hi"));
    body["max_tokens"] = json!(1_000_000);
    let (s, b) = chat(base, &body).await;
    assert_error(s, &b, 400, "context_length_exceeded");
}

#[tokio::test]
async fn the_server_keeps_serving_after_errors() {
    let base = common::server(MODEL);
    for _ in 0..3 {
        let _ = raw_post(base, "/v1/chat/completions", "{").await;
        let bad = user_parts(
            json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
        );
        let _ = chat(base, &bad).await;
    }
    assert_eq!(common::get(base, "/health").await.0, 200);
    let (s, b) = chat(base, &user_parts(json!("hello"))).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let base = common::server(MODEL);
    let (_, b) = common::get(base, "/v1/models").await;
    assert_eq!(b["object"], "list");
    assert_eq!(b["data"][0]["id"], MODEL);
    assert_eq!(b["data"][0]["object"], "model");
}
