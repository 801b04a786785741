//! `Qwen2VlCache`: the decoder's KV cache plus each sequence's M-RoPE scan state (its running
//! position, from which transformers' `rope_deltas` follows). Both advance only when a whole
//! step succeeded.

use std::collections::HashMap;

use super::mrope::RopeState;
use crate::model::KvCache;

/// Per-sequence keys, values and M-RoPE state of a [`super::Qwen2VlModel`].
#[derive(Debug)]
pub struct Qwen2VlCache {
    pub(crate) kv: KvCache,
    pub(crate) rope: HashMap<u64, RopeState>,
}

impl Qwen2VlCache {
    pub(crate) fn new(kv: KvCache) -> Self {
        Self {
            kv,
            rope: HashMap::new(),
        }
    }

    /// Positions cached for `seq_id` (0 for an unknown sequence): the next `start_pos`.
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.kv.seq_len(seq_id)
    }

    pub fn contains(&self, seq_id: u64) -> bool {
        self.kv.contains(seq_id)
    }

    /// Drops a sequence (nothing happens for an unknown sequence).
    pub fn remove(&mut self, seq_id: u64) {
        self.kv.remove(seq_id);
        self.rope.remove(&seq_id);
    }

    pub fn num_seqs(&self) -> usize {
        self.kv.num_seqs()
    }

    /// Bytes of the key/value blocks in use.
    pub fn bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// The paged keys and values.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// transformers' `rope_deltas` for `seq_id`: the M-RoPE position of its next text token
    /// minus its cached length (0 for a text-only or unknown sequence).
    pub fn rope_delta(&self, seq_id: u64) -> i64 {
        let next = self.rope.get(&seq_id).map_or(0, |s| s.next_pos);
        next as i64 - self.seq_len(seq_id) as i64
    }

    /// The scan state a step for `seq_id` starts from.
    pub(crate) fn rope_state(&self, seq_id: u64) -> RopeState {
        self.rope.get(&seq_id).copied().unwrap_or_default()
    }
}
