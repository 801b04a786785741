//! Checks every request passes before it reaches a handler: the count and
//! total size of its headers (431 `headers_too_large`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

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
