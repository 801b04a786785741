//! The engine loop: receive commands, drop cancelled and expired sequences,
//! run one step (see `step.rs`), publish the load; the state the loop owns.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;

use super::image_cache::ImageCache;
use super::load::KvUsage;
use super::scheduler::SchedulerConfig;
use super::sequence::{Sequence, TextTools};
use super::{Command, EngineError, EngineLoad, TestHook};
use crate::metrics::EngineMetrics;
use crate::model::{ChatCache, ChatModel};
use crate::text::TokenTable;

/// What the engine is built from.
pub struct EngineParts {
    pub model: ChatModel,
    pub tokenizer: Arc<Tokenizer>,
    /// Token bytes, for the incremental detokenizer.
    pub tokens: Arc<TokenTable>,
    /// Token ids that end a sequence (generation_config, config and tokenizer).
    pub eos_token_ids: Vec<u32>,
    pub scheduler: SchedulerConfig,
    /// The model's paged KV cache, sized at start-up.
    pub cache: ChatCache,
    /// Most sequences allowed to wait for a seat.
    pub max_waiting: usize,
    /// Where each step's queue times, vision time and batch size go.
    pub metrics: EngineMetrics,
    /// The vision encoder's outputs, by image key.
    pub image_cache: ImageCache,
    /// Reuse cached KV blocks of earlier sequences' prefixes (see `prefix`).
    pub prefix_caching: bool,
}

/// State owned by the engine thread alone.
pub struct EngineCore {
    pub(super) model: ChatModel,
    pub(super) cache: ChatCache,
    /// Encoder rows of recent images, so a resent image is not encoded again.
    pub(super) image_cache: ImageCache,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) tokens: Arc<TokenTable>,
    pub(super) eos: Vec<u32>,
    pub(super) sched: SchedulerConfig,
    /// Submitted or preempted, not in the KV cache, in arrival order.
    pub(super) waiting: VecDeque<Sequence>,
    /// Admitted (prefilling in chunks, or generating), oldest first.
    pub(super) running: Vec<Sequence>,
    /// Figures the handles read; the waiting count is taken by the handles on
    /// submit and given back here when a sequence leaves the queue.
    pub(super) load: Arc<EngineLoad>,
    pub(super) metrics: EngineMetrics,
    pub(super) prefix_caching: bool,
    next_id: u64,
}

impl EngineCore {
    pub fn new(parts: EngineParts) -> Self {
        EngineCore {
            model: parts.model,
            cache: parts.cache,
            image_cache: parts.image_cache,
            tokenizer: parts.tokenizer,
            tokens: parts.tokens,
            eos: parts.eos_token_ids,
            sched: parts.scheduler,
            waiting: VecDeque::new(),
            running: Vec::new(),
            load: Arc::new(EngineLoad::new(parts.max_waiting).counting(&parts.metrics)),
            metrics: parts.metrics,
            prefix_caching: parts.prefix_caching,
            next_id: 0,
        }
    }

    pub(super) fn load(&self) -> Arc<EngineLoad> {
        Arc::clone(&self.load)
    }

    /// Runs until every handle is gone and no work is left.
    pub(super) fn run(mut self, rx: Receiver<Command>) {
        loop {
            self.publish();
            if self.waiting.is_empty() && self.running.is_empty() {
                match wait_idle(&rx) {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.is_idle() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.reap();
            self.step();
        }
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req) => {
                if req.hook == Some(TestHook::KillEngine) {
                    // Outside every guard, on purpose: the thread dies.
                    panic!("test hook: the engine thread was asked to die");
                }
                let id = self.next_id;
                self.next_id += 1;
                let mut seq = Sequence::new(id, *req);
                if self.prefix_caching {
                    seq.extend_hashes(self.cache.kv().block_size());
                }
                self.waiting.push_back(seq);
            }
        }
    }

    /// Cancellation and deadlines, before each step: a sequence whose client
    /// went away is dropped with its KV blocks; one whose deadline passed fails
    /// with `QueueTimeout` if it had not started, or ends with `length` if it
    /// had generated (even if it was preempted since).
    fn reap(&mut self) {
        let now = Instant::now();
        let mut gone = 0;
        let before = self.waiting.len();
        let text = TextTools {
            tokenizer: &self.tokenizer,
            table: &self.tokens,
        };
        self.waiting.retain_mut(|s| {
            if s.is_abandoned() {
                gone += 1;
                return false;
            }
            if s.is_expired(now) {
                if s.output().is_empty() {
                    s.fail(EngineError::QueueTimeout);
                } else {
                    s.cut(&text);
                }
                return false;
            }
            true
        });
        self.load.release(before - self.waiting.len());
        let cache = &mut self.cache;
        self.running.retain_mut(|s| {
            if s.is_abandoned() {
                gone += 1;
            } else if s.is_expired(now) {
                s.cut(&text);
            } else {
                return true;
            }
            cache.remove(s.id);
            false
        });
        self.load.cancelled(gone);
    }

    /// Tells the handles how busy the engine is.
    fn publish(&self) {
        let kv = self.cache.kv();
        self.load.set_running(
            self.running.len(),
            KvUsage {
                bytes: kv.bytes(),
                blocks_used: kv.used_blocks(),
                blocks_cached: kv.cached_blocks(),
                blocks_total: kv.num_blocks(),
            },
        );
    }
}

/// How long the engine waits without work before it returns freed memory to the system.
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The next command of an engine with nothing to do (`None`: every handle is gone). After
/// [`TRIM_AFTER_IDLE`] without one, the heap's free memory goes back to the system first, so a
/// burst's memory does not stay resident while back-to-back requests keep their pages.
fn wait_idle(rx: &Receiver<Command>) -> Option<Command> {
    match rx.recv_timeout(TRIM_AFTER_IDLE) {
        Ok(cmd) => Some(cmd),
        Err(RecvTimeoutError::Disconnected) => None,
        Err(RecvTimeoutError::Timeout) => {
            super::memory::release_free_memory();
            rx.recv().ok()
        }
    }
}
