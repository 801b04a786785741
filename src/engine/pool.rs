//! `EnginePool`: the engines of one chat model, one per device (each with its own thread, model
//! copy and KV cache), and the routing of each request to the least-loaded of them.

use super::{EngineError, EngineHandle, EngineRequest, EngineStats};

/// One engine of the pool and the device it runs on.
#[derive(Clone)]
pub struct PoolMember {
    /// The device as configured: `cpu`, `cuda:0`, ...
    pub device: String,
    pub handle: EngineHandle,
}

/// The engines serving one model; cloneable, like the handles it holds.
#[derive(Clone)]
pub struct EnginePool {
    members: Vec<PoolMember>,
}

impl EnginePool {
    /// A pool of at least one engine.
    pub fn new(members: Vec<PoolMember>) -> Option<Self> {
        (!members.is_empty()).then_some(EnginePool { members })
    }

    /// A pool of one engine.
    pub fn single(device: &str, handle: EngineHandle) -> Self {
        EnginePool {
            members: vec![PoolMember {
                device: device.to_string(),
                handle,
            }],
        }
    }

    pub fn members(&self) -> &[PoolMember] {
        &self.members
    }

    /// Queues a request's sequences on the least-loaded engine, all on the same one (they share
    /// a prompt). When that engine's queue is full, the next least-loaded one is tried.
    pub fn submit_all(&self, reqs: Vec<EngineRequest>) -> Result<(), EngineError> {
        let loads: Vec<EngineStats> = self.members.iter().map(|m| m.handle.stats()).collect();
        let order = by_load(&loads);
        let mut reqs = Some(reqs);
        let mut last = EngineError::Stopped;
        for i in order {
            let Some(batch) = reqs.take() else { break };
            match self.members[i].handle.try_submit_all(batch) {
                Ok(()) => return Ok(()),
                Err((err, back)) => {
                    last = err;
                    reqs = back;
                }
            }
        }
        Err(last)
    }

    /// The load of the whole pool: each figure summed over its engines.
    pub fn stats(&self) -> EngineStats {
        self.members
            .iter()
            .map(|m| m.handle.stats())
            .fold(EngineStats::default(), |a, s| EngineStats {
                waiting: a.waiting + s.waiting,
                running: a.running + s.running,
                kv_cache_bytes: a.kv_cache_bytes + s.kv_cache_bytes,
                kv_blocks_used: a.kv_blocks_used + s.kv_blocks_used,
                kv_blocks_total: a.kv_blocks_total + s.kv_blocks_total,
                kv_blocks_cached: a.kv_blocks_cached + s.kv_blocks_cached,
                cancelled: a.cancelled + s.cancelled,
                preempted: a.preempted + s.preempted,
            })
    }

    /// Each engine's device and load.
    pub fn per_device(&self) -> Vec<(String, EngineStats)> {
        self.members
            .iter()
            .map(|m| (m.device.clone(), m.handle.stats()))
            .collect()
    }

    /// True while every engine thread runs.
    pub fn is_alive(&self) -> bool {
        self.members.iter().all(|m| m.handle.is_alive())
    }
}

/// Engine indices from least to most loaded (sequences waiting plus running); ties keep the
/// configured order, so an idle pool fills its first device first.
pub fn by_load(loads: &[EngineStats]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&i| loads[i].waiting + loads[i].running);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(waiting: usize, running: usize) -> EngineStats {
        EngineStats {
            waiting,
            running,
            ..EngineStats::default()
        }
    }

    #[test]
    fn the_least_loaded_engine_comes_first() {
        assert_eq!(
            by_load(&[load(0, 3), load(1, 1), load(0, 0)]),
            vec![2, 1, 0]
        );
    }

    #[test]
    fn waiting_counts_as_much_as_running() {
        assert_eq!(by_load(&[load(2, 0), load(0, 1)]), vec![1, 0]);
    }

    #[test]
    fn ties_keep_the_configured_order() {
        assert_eq!(
            by_load(&[load(1, 1), load(0, 2), load(2, 0)]),
            vec![0, 1, 2]
        );
        assert_eq!(by_load(&[]), Vec::<usize>::new());
    }
}
