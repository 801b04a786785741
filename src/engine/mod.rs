//! The engine: one OS thread that owns the model, its KV cache and the
//! scheduler, and runs continuous batching. The async side talks to it through
//! an [`EngineHandle`]; each request gets its own event channel back.

mod core;
pub mod embed;
pub mod sampling;
pub mod scheduler;
mod sequence;

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::model::ImageInput;
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

pub use self::core::{EngineCore, EngineParts};
use sampling::SamplingParams;
pub use scheduler::SchedulerConfig;

/// A trusted, fully prepared generation request (one choice).
pub struct EngineRequest {
    /// Prompt ids with every image placeholder expanded to its feature rows.
    pub prompt_ids: Vec<u32>,
    /// Preprocessed images in prompt order.
    pub images: Vec<ImageInput>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Where this request's events go; dropping the receiver cancels it.
    pub events: tokio_mpsc::UnboundedSender<Event>,
}

/// Why a sequence ended, as OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The sampled token's log-probability and its most likely alternatives
/// (token id, logprob), under the model's raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the engine reports back for one request.
#[derive(Debug)]
pub enum Event {
    /// One generated token: its new text (possibly empty while held back) and,
    /// when asked for, its logprobs.
    Token {
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(EngineError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the model failed on this batch: {0}")]
    Model(String),
    #[error("could not detokenize the output: {0}")]
    Detokenize(String),
    #[error("the engine has stopped")]
    Stopped,
}

enum Command {
    Submit(Box<EngineRequest>),
    Ping(oneshot::Sender<()>),
}

/// Cloneable async-side handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Starts the engine thread; it runs until every handle is dropped.
    pub fn spawn(core: EngineCore) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name("mmserve-engine".into())
            .spawn(move || core.run(rx))?;
        Ok((EngineHandle { tx }, join))
    }

    /// Queues a request. Events arrive on the request's own channel.
    pub fn submit(&self, req: EngineRequest) -> Result<(), EngineError> {
        self.tx
            .send(Command::Submit(Box::new(req)))
            .map_err(|_| EngineError::Stopped)
    }

    /// True when the engine thread answers between two steps.
    pub async fn ping(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Ping(tx)).is_err() {
            return false;
        }
        rx.await.is_ok()
    }
}
