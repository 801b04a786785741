//! Before the model has loaded the server already answers: 503 in the OpenAI
//! error shape on every route that needs the model; `/ready` is 503 and says
//! the model is loading, while `/health` (liveness) is 200.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use mmserve::api::{router, AppState};
use mmserve::config::{Config, ModelKind, ServerConfig};
use tower::ServiceExt;

fn server() -> ServerConfig {
    Config::load(None).expect("defaults").server
}

async fn call(method: &str, uri: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let mut small = server();
    small.max_body_bytes = 1 << 20;
    let state = Arc::new(AppState::new(vec![("m".into(), ModelKind::Chat)], &small));
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router(state).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn requests_are_503_while_loading() {
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, json) = call("POST", "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["error"]["code"], "service_unavailable");
}

#[tokio::test]
async fn not_ready_but_alive_while_loading() {
    let (status, json) = call("GET", "/ready", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["status"], "not_ready");
    assert_eq!(json["models"]["m"], "loading");
    let (status, json) = call("GET", "/health", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "ok");
    assert_eq!(json["models"]["m"]["state"], "loading");
}

#[tokio::test]
async fn models_are_listed_while_loading() {
    let (status, json) = call("GET", "/v1/models", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["data"][0]["id"], "m");
    assert!(json["data"][0].get("max_model_len").is_none());
}

#[tokio::test]
async fn wrong_method_is_405_in_the_openai_shape() {
    let (status, json) = call("GET", "/v1/chat/completions", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(json["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn an_oversized_body_is_413_in_the_openai_shape() {
    let big = format!(
        r#"{{"model":"m","messages":[],"pad":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let mut small = server();
    small.max_body_bytes = 1 << 20;
    let state = Arc::new(AppState::new(vec![("m".into(), ModelKind::Chat)], &small));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .body(Body::from(big))
        .unwrap();
    let resp = router(state).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["error"]["code"], "request_too_large");
}
