//! Server-sent events for `stream: true`: a role chunk per choice, one chunk
//! per piece of text, a final chunk with `finish_reason`, an optional usage
//! chunk, then `data: [DONE]`. An error mid-stream is sent as
//! `data: {"error": ...}` followed by `[DONE]`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use tokio::sync::mpsc::{channel, Sender, UnboundedReceiver};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};

use super::chat::{to_openai_logprob, ResponseMeta};
use super::error::ApiError;
use super::lifecycle::InFlight;
use super::observe::ChatTimer;
use crate::engine::{EngineError, Event};
use crate::openai::response::{ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, Usage};
use crate::text::TokenTable;

/// Chunks buffered between the relay task and the client.
const BUFFER: usize = 64;

type SseStream = Sse<ReceiverStream<Result<SseEvent, Infallible>>>;

/// Starts relaying engine events as SSE. When the client goes away the relay
/// ends at once, dropping the engine receivers, which cancels the sequences.
/// The request counts as in flight until the relay ends.
pub fn sse(
    meta: ResponseMeta,
    receivers: Vec<UnboundedReceiver<Event>>,
    tokens: Arc<TokenTable>,
    include_usage: bool,
    in_flight: InFlight,
    timer: ChatTimer,
) -> SseStream {
    let (tx, rx) = channel(BUFFER);
    tokio::spawn(async move {
        let closed = tx.clone();
        tokio::select! {
            () = relay(meta, receivers, tokens, include_usage, tx, timer) => {}
            () = closed.closed() => {}
        }
        drop(in_flight);
    });
    Sse::new(ReceiverStream::new(rx))
}

struct Relay {
    meta: ResponseMeta,
    tx: Sender<Result<SseEvent, Infallible>>,
}

impl Relay {
    async fn data(&self, data: String) -> bool {
        self.tx
            .send(Ok(SseEvent::default().data(data)))
            .await
            .is_ok()
    }

    async fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> bool {
        let chunk = ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices,
            usage,
        };
        match serde_json::to_string(&chunk) {
            Ok(s) => self.data(s).await,
            Err(_) => false,
        }
    }

    async fn choice(&self, index: usize, delta: Delta, finish: Option<&'static str>) -> bool {
        self.chunk_with_logprobs(index, delta, None, finish).await
    }

    async fn chunk_with_logprobs(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Option<ChoiceLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> bool {
        let choice = ChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        };
        self.chunk(vec![choice], None).await
    }

    async fn error_and_done(&self, err: ApiError) {
        if self.data(err.body_json()).await {
            self.data("[DONE]".into()).await;
        }
    }
}

async fn relay(
    meta: ResponseMeta,
    receivers: Vec<UnboundedReceiver<Event>>,
    tokens: Arc<TokenTable>,
    include_usage: bool,
    tx: Sender<Result<SseEvent, Infallible>>,
    mut timer: ChatTimer,
) {
    let relay = Relay { meta, tx };
    let n = receivers.len();
    let mut events = StreamMap::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        events.insert(i, UnboundedReceiverStream::new(rx));
        let role = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        if !relay.choice(i, role, None).await {
            return;
        }
    }
    let mut finished = HashSet::new();
    let mut usage = Usage::default();
    while let Some((i, event)) = events.next().await {
        let sent = match event {
            Event::Token { text, logprobs } => {
                timer.token(i);
                if text.is_empty() && logprobs.is_none() {
                    continue;
                }
                let lp = relay.meta.logprobs.then(|| ChoiceLogprobs {
                    content: logprobs
                        .map(|l| vec![to_openai_logprob(&l, &tokens)])
                        .unwrap_or_default(),
                });
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                relay.chunk_with_logprobs(i, delta, lp, None).await
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                finished.insert(i);
                usage = Usage::new(prompt_tokens, usage.completion_tokens + completion_tokens);
                timer.finished(i, completion_tokens);
                relay
                    .choice(i, Delta::default(), Some(reason.as_str()))
                    .await
            }
            Event::Failed(e) => {
                relay.error_and_done(e.into()).await;
                return;
            }
        };
        if !sent {
            return;
        }
    }
    if finished.len() < n {
        relay.error_and_done(EngineError::Stopped.into()).await;
        return;
    }
    timer.done(&usage);
    if include_usage && !relay.chunk(Vec::new(), Some(usage)).await {
        return;
    }
    relay.data("[DONE]".into()).await;
}
