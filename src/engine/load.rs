//! `EngineLoad`: the live figures of one engine (waiting and running sequences,
//! KV cache bytes, cancellations), shared between its thread, which updates them, and its
//! handles, which read them for backpressure, `/health` and metrics. Reading
//! never waits for the engine thread, so a long forward pass does not block it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A snapshot of an engine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sequences submitted and not yet started (including those still in the
    /// command channel).
    pub waiting: usize,
    /// Sequences generating (chat) or being encoded (embeddings).
    pub running: usize,
    /// Bytes held by the KV cache (0 for embedding engines).
    pub kv_cache_bytes: usize,
    /// Sequences dropped so far because their client went away.
    pub cancelled: usize,
}

/// Shared gauges of one engine plus the bound of its waiting queue.
#[derive(Debug)]
pub struct EngineLoad {
    waiting: AtomicUsize,
    running: AtomicUsize,
    kv_cache_bytes: AtomicUsize,
    cancelled: AtomicUsize,
    /// Most sequences allowed to wait; submissions beyond it are refused.
    max_waiting: usize,
}

impl EngineLoad {
    pub fn new(max_waiting: usize) -> Self {
        EngineLoad {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_cache_bytes: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            max_waiting,
        }
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: self.waiting.load(Ordering::SeqCst),
            running: self.running.load(Ordering::SeqCst),
            kv_cache_bytes: self.kv_cache_bytes.load(Ordering::SeqCst),
            cancelled: self.cancelled.load(Ordering::SeqCst),
        }
    }

    /// Takes `n` places in the waiting queue, all or none. A request larger
    /// than the whole queue still gets in when the queue is empty, so it is
    /// never refused forever.
    pub fn try_reserve(&self, n: usize) -> bool {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w == 0 || w + n <= self.max_waiting).then_some(w + n)
            })
            .is_ok()
    }

    /// `n` sequences left the waiting queue (started, cancelled or failed).
    pub fn release(&self, n: usize) {
        if n > 0 {
            let _ = self
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                    Some(w.saturating_sub(n))
                });
        }
    }

    /// `n` sequences were dropped because their client went away.
    pub fn cancelled(&self, n: usize) {
        self.cancelled.fetch_add(n, Ordering::SeqCst);
    }

    /// Published by the engine thread after each step.
    pub fn set_running(&self, running: usize, kv_cache_bytes: usize) {
        self.running.store(running, Ordering::SeqCst);
        self.kv_cache_bytes.store(kv_cache_bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_all_or_none() {
        let load = EngineLoad::new(3);
        assert!(load.try_reserve(2));
        assert!(!load.try_reserve(2), "2 + 2 > 3");
        assert!(load.try_reserve(1));
        assert!(!load.try_reserve(1));
        load.release(3);
        assert_eq!(load.stats().waiting, 0);
        assert!(load.try_reserve(5), "an empty queue takes any request");
        assert!(!load.try_reserve(1));
        load.release(9);
        assert_eq!(load.stats().waiting, 0, "never below zero");
    }
}
