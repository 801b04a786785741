//! The engine: one OS thread that owns the model, its KV cache and the
//! scheduler, and runs continuous batching. The async side talks to it through
//! an [`EngineHandle`]; each request gets its own event channel back.

mod core;
pub mod embed;
pub mod image_cache;
mod load;
pub mod memory;
mod pool;
mod prefix;
pub mod sampling;
pub mod scheduler;
mod sequence;
mod step;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::model::KeyedImage;
use tokio::sync::mpsc as tokio_mpsc;

pub use self::core::{EngineCore, EngineParts};
pub use load::{AliveGuard, EngineLoad, EngineStats};
pub use pool::{EnginePool, PoolMember};
use sampling::SamplingParams;
pub use scheduler::SchedulerConfig;

/// A trusted, fully prepared generation request (one choice).
pub struct EngineRequest {
    /// Prompt ids with every image placeholder expanded to its feature rows.
    pub prompt_ids: Vec<u32>,
    /// Preprocessed images in prompt order, with their cache keys.
    pub images: Vec<KeyedImage>,
    /// Where each image's rows start in `prompt_ids` (its first placeholder token), for prefix
    /// caching.
    pub image_starts: Vec<usize>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Tokens to generate before EOS or a stop string may end the sequence
    /// (vLLM's `min_tokens`): EOS ids are masked out of sampling until then,
    /// and stop strings only match where they end in later text.
    pub min_tokens: usize,
    /// Generate past EOS, to `max_tokens` (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    /// Where this request's events go; dropping the receiver cancels it.
    pub events: tokio_mpsc::UnboundedSender<Event>,
    /// When the request must be over: still waiting then, it fails with
    /// [`EngineError::QueueTimeout`]; generating, it ends with `length`.
    pub deadline: Option<Instant>,
    /// A fault or behaviour a test asked for (only with `[debug] test_hooks`).
    pub hook: Option<TestHook>,
}

/// What a test can ask of a request through the `x-mmserve-test-hook` header,
/// honoured only when `[debug] test_hooks` is on (never by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHook {
    /// Make every batched forward that includes this request fail.
    FailForward,
    /// Make every batched forward that includes this request panic.
    PanicForward,
    /// Sleep a little before every batched forward that includes this request
    /// (it stays running for a while, at any machine speed).
    SlowForward,
    /// Panic while validating (preprocessing) the request.
    PanicValidation,
    /// Panic outside any guard: the engine thread dies.
    KillEngine,
}

impl TestHook {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "fail-forward" => TestHook::FailForward,
            "panic-forward" => TestHook::PanicForward,
            "slow-forward" => TestHook::SlowForward,
            "panic-validation" => TestHook::PanicValidation,
            "kill-engine" => TestHook::KillEngine,
            _ => return None,
        })
    }
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
    #[error("the engine failed on this request: {0}")]
    Panicked(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the server is busy: its waiting queue is full")]
    QueueFull,
    #[error("the request's deadline passed before it could start")]
    QueueTimeout,
}

/// Runs `f`, turning a panic into an error for the requests involved.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(EngineError::Panicked(msg))
    })
}

enum Command {
    Submit(Box<EngineRequest>),
}

/// Why requests were not queued, and the requests when none of them was.
pub type Refused = (EngineError, Option<Vec<EngineRequest>>);

/// Cloneable async-side handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    load: Arc<EngineLoad>,
}

impl EngineHandle {
    /// Starts the engine thread; it runs until every handle is dropped.
    pub fn spawn(core: EngineCore) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let load = core.load();
        let alive = AliveGuard(Arc::clone(&load));
        let join = std::thread::Builder::new()
            .name("mmserve-engine".into())
            .spawn(move || {
                let _alive = alive;
                core.run(rx)
            })?;
        Ok((EngineHandle { tx, load }, join))
    }

    /// Queues a request's sequences (one per choice), all or none: when the
    /// waiting queue has no room for them all, nothing is queued and the
    /// answer is [`EngineError::QueueFull`]. Events arrive on each request's
    /// own channel.
    pub fn submit_all(&self, reqs: Vec<EngineRequest>) -> Result<(), EngineError> {
        self.try_submit_all(reqs).map_err(|(err, _)| err)
    }

    /// [`Self::submit_all`], giving the requests back when none was queued
    /// (a full queue or a stopped engine), so another engine can take them.
    pub fn try_submit_all(&self, reqs: Vec<EngineRequest>) -> Result<(), Refused> {
        let n = reqs.len();
        if !self.load.try_reserve(n) {
            return Err((EngineError::QueueFull, Some(reqs)));
        }
        let mut reqs = reqs.into_iter();
        let mut sent = 0;
        while let Some(req) = reqs.next() {
            if let Err(mpsc::SendError(Command::Submit(req))) =
                self.tx.send(Command::Submit(Box::new(req)))
            {
                self.load.release(n - sent);
                // A closed channel refuses the first send: nothing was queued.
                let back = (sent == 0).then(|| std::iter::once(*req).chain(reqs).collect());
                return Err((EngineError::Stopped, back));
            }
            sent += 1;
        }
        Ok(())
    }

    /// The engine's current load, without waiting for its thread.
    pub fn stats(&self) -> EngineStats {
        self.load.stats()
    }

    /// False once the engine thread has ended (it panicked outside the
    /// per-request guards); read without waiting for the thread.
    pub fn is_alive(&self) -> bool {
        self.load.is_alive()
    }
}
