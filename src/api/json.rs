//! A JSON body extractor whose failures are OpenAI-shaped 400s (or 413), not
//! the web framework's plain-text 415/422, with `param` naming the field whose
//! type is wrong. The content type is not required, so a `curl -d` without
//! `-H 'Content-Type: application/json'` still works.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use super::error::ApiError;
use crate::openai::clip;

/// Longest serde message quoted back: its quoted values come from the client.
const MAX_DETAIL_CHARS: usize = 200;

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
        parse(&bytes).map(ApiJson)
    }
}

/// Deserializes the whole body, naming the path of a field of the wrong type.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let detail = clip(&inner.to_string(), MAX_DETAIL_CHARS).into_owned();
        match inner.classify() {
            Category::Data => {
                let param = (path != ".").then_some(path);
                ApiError::bad_request("invalid_request", format!("invalid request body: {detail}"))
                    .with_param(param)
            }
            _ => ApiError::bad_request("invalid_json", format!("invalid JSON: {detail}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON: {e}")))?;
    Ok(value)
}
