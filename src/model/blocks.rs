//! Block bookkeeping of the paged KV cache, without tensors: a pool of fixed-size blocks handed
//! out from a free list, and each sequence's block table (block `i` of a sequence holds its
//! positions `i * block_size ..`). Position `p` lives in slot `table[p / bs] * bs + p % bs` of
//! the pool tensors (`kv_cache`).
//!
//! A step first reserves room for its new tokens ([`BlockTables::reserve`], all or nothing),
//! then commits them once it succeeded, or rolls the reservation back, so a failed step leaves
//! every sequence as it was.
//!
//! Prefix caching: a sequence's full blocks are registered under their hash chain once committed
//! ([`BlockTables::register`]); a new sequence starts from the longest cached run of its
//! hashes ([`BlockTables::attach`]), sharing those blocks (see `block_pool`).

use std::collections::HashMap;

use super::block_pool::{BlockHash, BlockPool};

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
    /// Leading blocks registered in the prefix index (or taken from it).
    hashed: usize,
}

/// The block pool and every sequence's block table.
#[derive(Debug)]
pub struct BlockTables {
    block_size: usize,
    pool: BlockPool,
    seqs: HashMap<u64, SeqBlocks>,
}

impl BlockTables {
    /// `num_blocks` blocks of `block_size` positions, all free.
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        Self {
            block_size,
            pool: BlockPool::new(num_blocks),
            seqs: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks a reservation may take (free, or cached-free and evictable).
    pub fn free_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Blocks some sequence holds.
    pub fn used_blocks(&self) -> usize {
        self.pool.in_use()
    }

    /// Free blocks that still hold a cached prefix block.
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached_free()
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
        if need > self.free_blocks() {
            return Err(OutOfBlocks {
                need,
                free: self.free_blocks(),
            });
        }
        for &(id, n) in new {
            let want = self.blocks_for(self.seq_len(id) + n);
            let seq = self.seqs.entry(id).or_default();
            while seq.blocks.len() < want {
                // `need` blocks were counted free above.
                let Some(b) = self.pool.allocate() else { break };
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
            for b in s.blocks.drain(keep..).rev() {
                self.pool.release(b);
            }
        }
    }

    /// Lets go of every block of `seq_id` (nothing happens for an unknown sequence), the last
    /// first, so a cached prefix is evicted from its end.
    pub fn remove(&mut self, seq_id: u64) {
        if let Some(s) = self.seqs.remove(&seq_id) {
            for b in s.blocks.into_iter().rev() {
                self.pool.release(b);
            }
        }
    }

    /// How many leading blocks of a sequence with full-block `hashes` are cached, and how many
    /// of those are cached-free (sharing them takes them off the free count).
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> (usize, usize) {
        let n = self.pool.cached_prefix(hashes);
        (n, self.pool.revivals(hashes, n))
    }

    /// Starts the new sequence `seq_id` from the cached blocks of its leading `hashes`, shared
    /// with whoever holds them; returns the positions they cover (0: nothing cached, or the
    /// sequence already exists).
    pub fn attach(&mut self, seq_id: u64, hashes: &[BlockHash]) -> usize {
        if self.seqs.contains_key(&seq_id) {
            return 0;
        }
        let blocks: Vec<u32> = hashes.iter().map_while(|h| self.pool.share(h)).collect();
        if blocks.is_empty() {
            return 0;
        }
        let len = blocks.len() * self.block_size;
        let hashed = blocks.len();
        self.seqs.insert(
            seq_id,
            SeqBlocks {
                len,
                blocks,
                hashed,
            },
        );
        len
    }

    /// Registers `seq_id`'s committed full blocks under `hashes` (its full blocks' hash chain,
    /// from the first).
    pub fn register(&mut self, seq_id: u64, hashes: &[BlockHash]) {
        let Some(s) = self.seqs.get_mut(&seq_id) else {
            return;
        };
        let full = (s.len / self.block_size).min(hashes.len());
        for (&block, &hash) in s.blocks.iter().zip(hashes).take(full).skip(s.hashed) {
            self.pool.register(block, hash);
        }
        s.hashed = s.hashed.max(full);
    }

    /// Blocks that preempting `seq_id` would free: those nobody else holds.
    pub fn sole_blocks(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, |s| {
            s.blocks.iter().filter(|&&b| self.pool.refs(b) == 1).count()
        })
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

    fn h(i: u8) -> BlockHash {
        [i; 32]
    }

    /// Sequence `id` with `tokens` positions committed and its full blocks registered.
    fn cached_seq(t: &mut BlockTables, id: u64, tokens: usize, hashes: &[BlockHash]) {
        t.reserve(&[(id, tokens)]).unwrap();
        t.commit(id, tokens);
        t.register(id, hashes);
    }

    #[test]
    fn a_finished_prefix_is_shared_by_the_next_sequence() {
        let mut t = BlockTables::new(4, 6);
        // 10 positions: two full blocks registered, the partial third is not.
        cached_seq(&mut t, 1, 10, &[h(1), h(2)]);
        t.remove(1);
        assert_eq!(
            (t.used_blocks(), t.free_blocks(), t.cached_blocks()),
            (0, 6, 2)
        );
        // A prompt sharing only the first block.
        assert_eq!(t.cached_prefix(&[h(1), h(9)]), (1, 1));
        assert_eq!(t.attach(2, &[h(1), h(9)]), 4);
        assert_eq!(
            (t.seq_len(2), t.used_blocks(), t.cached_blocks()),
            (4, 1, 1)
        );
        // It grows into fresh blocks after the shared one.
        t.reserve(&[(2, 3)]).unwrap();
        t.commit(2, 3);
        assert_eq!((t.seq_len(2), t.used_blocks()), (7, 2));
        assert_eq!(t.attach(2, &[h(1)]), 0, "already running");
    }

    #[test]
    fn running_sequences_share_blocks_and_preemption_frees_only_their_own() {
        let mut t = BlockTables::new(4, 8);
        cached_seq(&mut t, 1, 8, &[h(1), h(2)]);
        assert_eq!(t.cached_prefix(&[h(1), h(2)]), (2, 0), "held: not revived");
        assert_eq!(t.attach(2, &[h(1), h(2)]), 8);
        t.reserve(&[(2, 1)]).unwrap();
        t.commit(2, 1);
        assert_eq!(t.used_blocks(), 3);
        // Preempting 2 frees only its own third block; 1 holds both shared ones.
        assert_eq!((t.sole_blocks(1), t.sole_blocks(2)), (0, 1));
        t.remove(2);
        assert_eq!((t.used_blocks(), t.sole_blocks(1)), (2, 2));
        t.remove(1);
        assert_eq!((t.used_blocks(), t.cached_blocks()), (0, 2));
    }

    #[test]
    fn allocation_evicts_cached_blocks_from_the_end_of_a_prefix() {
        let mut t = BlockTables::new(2, 3);
        cached_seq(&mut t, 1, 6, &[h(1), h(2), h(3)]);
        t.remove(1);
        // All three are cached-free; a 2-block sequence evicts the tail (3, then 2) first.
        t.reserve(&[(2, 4)]).unwrap();
        assert_eq!(t.cached_prefix(&[h(1), h(2), h(3)]), (1, 1));
        t.rollback(2);
        assert_eq!(
            (t.used_blocks(), t.free_blocks(), t.cached_blocks()),
            (0, 3, 1)
        );
    }

    #[test]
    fn a_rolled_back_attachment_keeps_its_shared_blocks() {
        let mut t = BlockTables::new(2, 4);
        cached_seq(&mut t, 1, 4, &[h(1), h(2)]);
        t.remove(1);
        assert_eq!(t.attach(2, &[h(1), h(2)]), 4);
        t.reserve(&[(2, 1)]).unwrap();
        t.rollback(2);
        assert_eq!((t.seq_len(2), t.used_blocks()), (4, 2));
        // Registering again changes nothing; removing caches both again.
        t.register(2, &[h(1), h(2)]);
        t.remove(2);
        assert_eq!((t.used_blocks(), t.cached_blocks()), (0, 2));
    }
}
