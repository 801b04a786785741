//! Checks every request passes before it reaches a handler: the count and
//! total size of its headers (431 `headers_too_large`), and its API key when
//! keys are configured (401 `invalid_api_key`; `/health`, `/ready`, `/metrics` and the
//! playground page stay open).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// Refuses requests with more headers, or more header bytes, than configured.
pub async fn header_limits(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let count = headers.len();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let server = &state.server;
    if count > server.max_header_count || bytes > server.max_header_bytes {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            "headers_too_large",
            format!(
                "the request has {count} headers of {bytes} bytes; at most {} headers of {} \
                 bytes in all are accepted",
                server.max_header_count, server.max_header_bytes
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Routes open without a key: orchestrators probe them.
const OPEN_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];

/// Lets a request through when no keys are configured, for an open path, or
/// with `Authorization: Bearer KEY` naming a configured key.
pub async fn api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let keys = &state.server.api_keys;
    let path = req.uri().path();
    if keys.is_empty() || OPEN_PATHS.contains(&path) || super::playground::is_page(path) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return unauthorized("no API key: send it as `Authorization: Bearer KEY`");
    };
    // Compare against every key, in constant time per key.
    let known = keys.iter().fold(0u8, |hit, k| {
        hit | k.as_bytes().ct_eq(given.as_bytes()).unwrap_u8()
    });
    if known == 0 {
        return unauthorized("incorrect API key provided");
    }
    next.run(req).await
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        message.to_string(),
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}
