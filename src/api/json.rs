//! A JSON body extractor whose failures are OpenAI-shaped 400s (or 413), not
//! the web framework's plain-text 415/422. The content type is not required, so
//! a `curl -d` without `-H 'Content-Type: application/json'` still works.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use super::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "request_too_large",
                    "the request body is larger than the server accepts".into(),
                )
            } else {
                ApiError::bad_request("invalid_request", e.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            let code = match e.classify() {
                Category::Data => "invalid_request",
                _ => "invalid_json",
            };
            ApiError::bad_request(code, format!("invalid request body: {e}"))
        })
    }
}
