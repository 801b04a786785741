//! `EngineLoad`: the live figures of one engine (waiting and running sequences,
//! KV cache bytes and blocks, cancellations, preemptions), shared between its thread, which updates them, and its
//! handles, which read them for backpressure, `/health` and metrics. Reading
//! never waits for the engine thread, so a long forward pass does not block it.
//! It also says whether the thread is still running ([`AliveGuard`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntCounter;

use crate::metrics::EngineMetrics;

/// A snapshot of an engine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sequences submitted and not yet started (including those still in the
    /// command channel).
    pub waiting: usize,
    /// Sequences generating (chat) or being encoded (embeddings).
    pub running: usize,
    /// Bytes of the KV blocks in use (0 for embedding engines).
    pub kv_cache_bytes: usize,
    /// KV blocks in use, and in the whole pool (0 for embedding engines).
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Free KV blocks still holding a cached prefix block (prefix caching).
    pub kv_blocks_cached: usize,
    /// Sequences dropped so far because their client went away.
    pub cancelled: usize,
    /// Times so far a sequence was preempted (KV blocks freed, recomputed later).
    pub preempted: usize,
}

/// The KV cache's use, as the engine thread publishes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub bytes: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub blocks_cached: usize,
}

/// Shared gauges of one engine plus the bound of its waiting queue.
#[derive(Debug)]
pub struct EngineLoad {
    waiting: AtomicUsize,
    running: AtomicUsize,
    kv_cache_bytes: AtomicUsize,
    kv_blocks_used: AtomicUsize,
    kv_blocks_total: AtomicUsize,
    kv_blocks_cached: AtomicUsize,
    cancelled: AtomicUsize,
    preempted: AtomicUsize,
    /// Most sequences allowed to wait; submissions beyond it are refused.
    max_waiting: usize,
    /// Cleared when the engine thread ends, normally or by a panic.
    alive: AtomicBool,
    /// `/metrics` counters of cancellations and preemptions, if any.
    counters: Option<(IntCounter, IntCounter)>,
}

/// Held by an engine thread for its whole life: dropping it (on return or
/// while a panic unwinds) marks the engine as stopped.
pub struct AliveGuard(pub Arc<EngineLoad>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

impl EngineLoad {
    pub fn new(max_waiting: usize) -> Self {
        EngineLoad {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_cache_bytes: AtomicUsize::new(0),
            kv_blocks_used: AtomicUsize::new(0),
            kv_blocks_total: AtomicUsize::new(0),
            kv_blocks_cached: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            preempted: AtomicUsize::new(0),
            max_waiting,
            alive: AtomicBool::new(true),
            counters: None,
        }
    }

    /// Also counts cancellations and preemptions in `metrics`' counters.
    pub fn counting(mut self, metrics: &EngineMetrics) -> Self {
        self.counters = Some((metrics.cancelled.clone(), metrics.preempted.clone()));
        self
    }

    /// False once the engine thread has ended.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting: self.waiting.load(Ordering::SeqCst),
            running: self.running.load(Ordering::SeqCst),
            kv_cache_bytes: self.kv_cache_bytes.load(Ordering::SeqCst),
            kv_blocks_used: self.kv_blocks_used.load(Ordering::SeqCst),
            kv_blocks_total: self.kv_blocks_total.load(Ordering::SeqCst),
            kv_blocks_cached: self.kv_blocks_cached.load(Ordering::SeqCst),
            cancelled: self.cancelled.load(Ordering::SeqCst),
            preempted: self.preempted.load(Ordering::SeqCst),
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
        if let Some((cancelled, _)) = &self.counters {
            cancelled.inc_by(n as u64);
        }
    }

    /// `n` preempted sequences went back to the waiting queue (not bounded by
    /// `max_waiting`: they were admitted once already).
    pub fn requeued(&self, n: usize) {
        self.waiting.fetch_add(n, Ordering::SeqCst);
        self.preempted.fetch_add(n, Ordering::SeqCst);
        if let Some((_, preempted)) = &self.counters {
            preempted.inc_by(n as u64);
        }
    }

    /// Published by the engine thread before each step.
    pub fn set_running(&self, running: usize, kv: KvUsage) {
        self.running.store(running, Ordering::SeqCst);
        self.kv_cache_bytes.store(kv.bytes, Ordering::SeqCst);
        self.kv_blocks_used.store(kv.blocks_used, Ordering::SeqCst);
        self.kv_blocks_total
            .store(kv.blocks_total, Ordering::SeqCst);
        self.kv_blocks_cached
            .store(kv.blocks_cached, Ordering::SeqCst);
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

    #[test]
    fn a_panicking_thread_is_seen_as_stopped() {
        let load = Arc::new(EngineLoad::new(1));
        let guard = AliveGuard(Arc::clone(&load));
        assert!(load.is_alive());
        let t = std::thread::spawn(move || {
            let _guard = guard;
            panic!("engine died");
        });
        assert!(t.join().is_err());
        assert!(!load.is_alive());
    }
}
