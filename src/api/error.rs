//! The one place where errors become HTTP responses, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::validate::ValidationError;

/// `Retry-After` of a busy server: short, so the SDKs' retries land soon.
const RETRY_AFTER_SECS: u64 = 1;

/// An error on its way to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<String>,
    /// A stable string code, never the HTTP status number.
    pub code: Option<String>,
    /// Seconds after which a retry may succeed, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &str, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: None,
            code: Some(code.to_string()),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &str, message: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn not_found(code: &str, message: String) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn internal(message: String) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    pub fn unavailable(message: String) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "service_unavailable",
            message,
        )
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_string());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_param(mut self, param: Option<String>) -> Self {
        self.param = param;
        self
    }

    /// The JSON body alone, as sent in a mid-stream SSE error event.
    pub fn body_json(&self) -> String {
        let body = Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_string()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        }
        let body = self.body_json();
        let mut resp = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Invalid {
                message,
                param,
                code,
            } => ApiError::bad_request(code, message).with_param(param),
            ValidationError::ContextLength(message) => {
                ApiError::bad_request("context_length_exceeded", message)
                    .with_param(Some("messages".into()))
            }
            ValidationError::Internal(message) => ApiError::internal(message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Stopped => ApiError::unavailable(e.to_string()),
            EngineError::QueueFull => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_error",
                "queue_full",
                e.to_string(),
            )
            .with_retry_after(RETRY_AFTER_SECS),
            EngineError::QueueTimeout => ApiError::unavailable(e.to_string())
                .with_code("queue_timeout")
                .with_retry_after(RETRY_AFTER_SECS),
            EngineError::Model(_) | EngineError::Detokenize(_) | EngineError::Panicked(_) => {
                ApiError::internal(e.to_string())
            }
        }
    }
}
