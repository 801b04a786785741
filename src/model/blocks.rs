//! Block bookkeeping of the paged KV cache, without tensors: a pool of fixed-size blocks handed
//! out from a free list, and each sequence's block table (block `i` of a sequence holds its
//! positions `i * block_size ..`). Position `p` lives in slot `table[p / bs] * bs + p % bs` of
//! the pool tensors (`kv_cache`).
//!
//! A step first reserves room for its new tokens ([`BlockTables::reserve`], all or nothing),
//! then commits them once it succeeded, or rolls the reservation back, so a failed step leaves
//! every sequence as it was.

use std::collections::HashMap;

/// Not enough free blocks for a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache is full: the step needs {need} more blocks, {free} are free")]
pub struct OutOfBlocks {
    pub need: usize,
    pub free: usize,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    /// Committed positions.
    len: usize,
    /// Pool block of each `block_size` positions, in order (may reach past `len` while a step
    /// is reserved).
    blocks: Vec<u32>,
}

/// The block pool's free list and every sequence's block table.
#[derive(Debug)]
pub struct BlockTables {
    block_size: usize,
    num_blocks: usize,
    /// Free block ids; the most recently freed is reused first (its memory is warm).
    free: Vec<u32>,
    seqs: HashMap<u64, SeqBlocks>,
}

impl BlockTables {
    /// `num_blocks` blocks of `block_size` positions, all free.
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Blocks that hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Committed positions of `seq_id` (0 when unknown).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, |s| s.len)
    }

    pub fn contains(&self, seq_id: u64) -> bool {
        self.seqs.contains_key(&seq_id)
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Makes room for `new[i].1` positions after the committed length of sequence `new[i].0`
    /// (creating unknown sequences), for all of them or, on [`OutOfBlocks`], for none.
    pub fn reserve(&mut self, new: &[(u64, usize)]) -> Result<(), OutOfBlocks> {
        let need: usize = new
            .iter()
            .map(|&(id, n)| {
                let s = self.seqs.get(&id);
                let (len, held) = s.map_or((0, 0), |s| (s.len, s.blocks.len()));
                self.blocks_for(len + n).saturating_sub(held)
            })
            .sum();
        if need > self.free.len() {
            return Err(OutOfBlocks {
                need,
                free: self.free.len(),
            });
        }
        for &(id, n) in new {
            let want = self.blocks_for(self.seq_len(id) + n);
            let seq = self.seqs.entry(id).or_default();
            while seq.blocks.len() < want {
                // `need` blocks were counted free above.
                let Some(b) = self.free.pop() else { break };
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Advances the committed length of `seq_id` by `n` reserved positions.
    pub fn commit(&mut self, seq_id: u64, n: usize) {
        if let Some(s) = self.seqs.get_mut(&seq_id) {
            s.len += n;
        }
    }

    /// Gives back the blocks reserved past `seq_id`'s committed length; a sequence with nothing
    /// committed is dropped.
    pub fn rollback(&mut self, seq_id: u64) {
        let keep = self.blocks_for(self.seq_len(seq_id));
        if keep == 0 {
            self.remove(seq_id);
        } else if let Some(s) = self.seqs.get_mut(&seq_id) {
            self.free.extend(s.blocks.drain(keep..).rev());
        }
    }

    /// Frees every block of `seq_id` (nothing happens for an unknown sequence).
    pub fn remove(&mut self, seq_id: u64) {
        if let Some(s) = self.seqs.remove(&seq_id) {
            self.free.extend(s.blocks.into_iter().rev());
        }
    }

    /// Pool slot of each position in `from..to` of `seq_id` (reserved positions only).
    pub fn slots(&self, seq_id: u64, from: usize, to: usize) -> Vec<u32> {
        let bs = self.block_size;
        let blocks = self.seqs.get(&seq_id).map_or(&[][..], |s| &s.blocks);
        (from..to)
            .map_while(|p| blocks.get(p / bs).map(|&b| b * bs as u32 + (p % bs) as u32))
            .collect()
    }

    /// Positions `from..to` of `seq_id` as runs of consecutive slots: `(first position, first
    /// slot, length)`, one per block touched at most.
    pub fn runs(&self, seq_id: u64, from: usize, to: usize) -> Vec<(usize, usize, usize)> {
        let bs = self.block_size;
        let blocks = self.seqs.get(&seq_id).map_or(&[][..], |s| &s.blocks);
        let mut out = Vec::new();
        let mut p = from;
        while p < to {
            let Some(&b) = blocks.get(p / bs) else { break };
            let len = (bs - p % bs).min(to - p);
            out.push((p, b as usize * bs + p % bs, len));
            p += len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_commits_and_frees() {
        let mut t = BlockTables::new(4, 5);
        t.reserve(&[(1, 6), (2, 1)]).unwrap();
        assert_eq!((t.used_blocks(), t.free_blocks()), (3, 2));
        assert_eq!(t.seq_len(1), 0, "not committed yet");
        t.commit(1, 6);
        t.commit(2, 1);
        // Two more positions for 1 fit its second block; a third one needs a new block.
        t.reserve(&[(1, 2)]).unwrap();
        assert_eq!(t.used_blocks(), 3);
        t.commit(1, 2);
        t.reserve(&[(1, 1)]).unwrap();
        assert_eq!(t.used_blocks(), 4);
        t.commit(1, 1);
        assert_eq!(t.seq_len(1), 9);
        t.remove(1);
        t.remove(1);
        assert_eq!((t.used_blocks(), t.num_seqs()), (1, 1));
        t.remove(2);
        assert_eq!((t.used_blocks(), t.free_blocks()), (0, 5));
    }

    #[test]
    fn a_reservation_is_all_or_nothing() {
        let mut t = BlockTables::new(4, 3);
        t.reserve(&[(1, 8)]).unwrap();
        t.commit(1, 8);
        assert_eq!(
            t.reserve(&[(1, 1), (2, 4)]),
            Err(OutOfBlocks { need: 2, free: 1 })
        );
        assert_eq!((t.used_blocks(), t.num_seqs()), (2, 1));
        assert!(t.reserve(&[(2, 4)]).is_ok());
    }

    #[test]
    fn rollback_returns_uncommitted_blocks() {
        let mut t = BlockTables::new(2, 4);
        t.reserve(&[(1, 3), (2, 2)]).unwrap();
        t.commit(1, 3);
        t.rollback(2);
        assert!(!t.contains(2), "nothing committed: dropped");
        t.reserve(&[(1, 4)]).unwrap();
        assert_eq!(t.used_blocks(), 4);
        t.rollback(1);
        assert_eq!((t.used_blocks(), t.seq_len(1)), (2, 3));
    }

    #[test]
    fn slots_follow_the_block_table() {
        let mut t = BlockTables::new(4, 4);
        // Blocks go out 0, 1, 2; freeing 1 makes sequence 9's table [1, 3].
        t.reserve(&[(7, 4), (8, 4), (10, 4)]).unwrap();
        t.remove(8);
        t.reserve(&[(9, 6)]).unwrap();
        assert_eq!(t.slots(9, 2, 6), vec![6, 7, 12, 13]);
        assert_eq!(t.runs(9, 2, 6), vec![(2, 6, 2), (4, 12, 2)]);
        assert_eq!(t.runs(9, 0, 1), vec![(0, 4, 1)]);
        assert!(t.slots(9, 8, 9).is_empty(), "past the reservation");
    }
}
