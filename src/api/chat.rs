//! `POST /v1/chat/completions`: validate, submit one engine request per choice,
//! answer with one JSON body or an SSE stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::error::ApiError;
use super::json::ApiJson;
use super::observe::ChatTimer;
use super::{off_runtime, stream, unix_now, AppState, ChatServing};
use crate::engine::{EngineRequest, Event, TestHook, TokenLogprobs};
use crate::openai::request::ChatCompletionRequest;
use crate::openai::response::{
    AssistantMessage, ChatCompletion, Choice, ChoiceLogprobs, TokenLogprob, TopLogprob, Usage,
};
use crate::text::TokenTable;
use crate::validate::ValidChatRequest;

/// The header a client sets to shorten its request's deadline, in seconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout";
/// The fault-injection header, honoured only with `[debug] test_hooks`.
pub const TEST_HOOK_HEADER: &str = "x-mmserve-test-hook";

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let in_flight = state.lifecycle.admit()?;
    let serving = state.chat(&req.model)?;
    let opts = HeaderOptions::read(&headers, serving, arrived)?;
    let validator = Arc::clone(&serving.validator);
    let req_model = req.model.clone();
    let valid = off_runtime(move || {
        if opts.hook == Some(TestHook::PanicValidation) {
            panic!("test hook: validation panicked");
        }
        validator.validate_chat(&req)
    })
    .await?;
    let receivers = submit(serving, &valid, opts)?;
    serving.metrics.images.inc_by(valid.images.len() as u64);
    let timer = ChatTimer::new(serving.metrics.clone(), arrived, receivers.len());
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: req_model,
        logprobs: valid.choices.first().is_some_and(|c| c.logprobs),
    };
    let tokens = Arc::clone(&serving.tokens);
    if valid.stream {
        let sse = stream::sse(
            meta,
            receivers,
            tokens,
            valid.include_usage,
            in_flight,
            timer,
        );
        return Ok(sse.into_response());
    }
    // Dropped with the connection, this future drops the receivers, which
    // cancels the sequences.
    Ok(Json(collect(meta, receivers, &tokens, timer).await?).into_response())
}

/// What a request's headers ask of the engine.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeaderOptions {
    pub(super) deadline: Option<Instant>,
    pub(super) hook: Option<TestHook>,
}

impl HeaderOptions {
    /// The deadline is the configured one, shortened by `x-request-timeout`.
    fn read(
        headers: &HeaderMap,
        serving: &ChatServing,
        arrived: Instant,
    ) -> Result<Self, ApiError> {
        let asked = match headers.get(TIMEOUT_HEADER) {
            None => None,
            Some(v) => Some(parse_timeout(v.to_str().unwrap_or(""))?),
        };
        let timeout = match (serving.request_timeout, asked) {
            (Some(c), Some(a)) => Some(c.min(a)),
            (c, a) => c.or(a),
        };
        let hook = match headers.get(TEST_HOOK_HEADER) {
            Some(v) if serving.test_hooks => {
                let v = v.to_str().unwrap_or("");
                Some(TestHook::parse(v).ok_or_else(|| {
                    ApiError::bad_request("invalid_test_hook", format!("unknown test hook `{v}`"))
                })?)
            }
            _ => None,
        };
        Ok(HeaderOptions {
            deadline: timeout.map(|t| arrived + t),
            hook,
        })
    }
}

/// `x-request-timeout`: positive seconds, fractions allowed.
fn parse_timeout(v: &str) -> Result<Duration, ApiError> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request_timeout",
                format!("{TIMEOUT_HEADER} must be a positive number of seconds, not `{v}`"),
            )
            .with_param(Some(TIMEOUT_HEADER.into()))
        })
}

/// Fields every response and chunk repeats.
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Whether the client asked for logprobs.
    pub logprobs: bool,
}

/// Queues one engine request per choice, all or none (429 when the queue is full).
pub(super) fn submit(
    serving: &ChatServing,
    valid: &ValidChatRequest,
    opts: HeaderOptions,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let (reqs, receivers) = engine_requests(valid, opts);
    serving.engine.submit_all(reqs)?;
    Ok(receivers)
}

/// One engine request per choice, and the channels their events come back on.
pub(super) fn engine_requests(
    valid: &ValidChatRequest,
    opts: HeaderOptions,
) -> (Vec<EngineRequest>, Vec<UnboundedReceiver<Event>>) {
    let mut receivers = Vec::with_capacity(valid.choices.len());
    let mut reqs = Vec::with_capacity(valid.choices.len());
    for sampling in &valid.choices {
        let (tx, rx) = unbounded_channel();
        reqs.push(EngineRequest {
            prompt_ids: valid.prompt_ids.clone(),
            images: valid.images.clone(),
            image_starts: valid.image_starts.clone(),
            sampling: sampling.clone(),
            max_tokens: valid.max_tokens,
            min_tokens: valid.min_tokens,
            ignore_eos: valid.ignore_eos,
            stop: valid.stop.clone(),
            events: tx,
            deadline: opts.deadline,
            hook: opts.hook,
        });
        receivers.push(rx);
    }
    (reqs, receivers)
}

/// Waits for every choice to finish and builds the JSON body.
async fn collect(
    meta: ResponseMeta,
    receivers: Vec<UnboundedReceiver<Event>>,
    tokens: &TokenTable,
    mut timer: ChatTimer,
) -> Result<ChatCompletion, ApiError> {
    let mut choices = Vec::with_capacity(receivers.len());
    let mut usage = Usage::default();
    for (index, mut rx) in receivers.into_iter().enumerate() {
        let mut content = String::new();
        let mut logprobs = Vec::new();
        let finish_reason = loop {
            match rx.recv().await {
                Some(Event::Token { text, logprobs: lp }) => {
                    timer.token(index);
                    content.push_str(&text);
                    logprobs.extend(lp.map(|l| to_openai_logprob(&l, tokens)));
                }
                Some(Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    usage = Usage::new(prompt_tokens, usage.completion_tokens + completion_tokens);
                    timer.finished(index, completion_tokens);
                    break reason;
                }
                Some(Event::Failed(e)) => return Err(e.into()),
                None => return Err(crate::engine::EngineError::Stopped.into()),
            }
        };
        choices.push(Choice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content,
            },
            logprobs: meta
                .logprobs
                .then_some(ChoiceLogprobs { content: logprobs }),
            finish_reason: finish_reason.as_str(),
        });
    }
    timer.done(&usage);
    Ok(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage,
    })
}

/// JSON has no infinity: an impossible token's logprob is reported as -9999,
/// as OpenAI and vLLM do.
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// One token's logprobs in OpenAI's shape, bytes taken from the token itself.
pub fn to_openai_logprob(l: &TokenLogprobs, tokens: &TokenTable) -> TokenLogprob {
    TokenLogprob {
        token: tokens.token_string(l.token),
        logprob: finite(l.logprob),
        bytes: tokens.bytes(l.token).to_vec(),
        top_logprobs: Some(
            l.top
                .iter()
                .map(|&(id, logprob)| TopLogprob {
                    token: tokens.token_string(id),
                    logprob: finite(logprob),
                    bytes: tokens.bytes(id).to_vec(),
                })
                .collect(),
        ),
    }
}
