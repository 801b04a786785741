//! The KV cache's block pool: which blocks are held (and by how many sequences), which are free,
//! and which free ones still hold a full block of a known prefix (automatic prefix caching).
//!
//! A full block can be registered under the hash of its contents ([`BlockHash`]: a chain over
//! the tokens and images of every block up to it, computed by the engine). When the last
//! sequence holding it lets go, a registered block is not wiped: it stays *cached-free*, still
//! findable by its hash ([`BlockPool::share`] takes it back) yet counted free. Allocation takes
//! a truly free block first and only then evicts the least recently released cached one.

use std::collections::{BTreeMap, HashMap};

/// Hash of a full block's contents and of every block before it.
pub type BlockHash = [u8; 32];

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// Sequences holding the block.
    refs: u32,
    /// Registered contents, while the block is in the index.
    hash: Option<BlockHash>,
    /// When it was last released (its key in `evictable`).
    released: u64,
}

/// Reference-counted blocks with a prefix index.
#[derive(Debug)]
pub struct BlockPool {
    meta: Vec<Meta>,
    /// Unregistered blocks nobody holds; the most recently freed is reused first (warm memory).
    free: Vec<u32>,
    /// Registered blocks nobody holds, by release time: the oldest is evicted first.
    evictable: BTreeMap<u64, u32>,
    index: HashMap<BlockHash, u32>,
    clock: u64,
}

impl BlockPool {
    /// `num_blocks` free blocks.
    pub fn new(num_blocks: usize) -> Self {
        Self {
            meta: vec![Meta::default(); num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            index: HashMap::new(),
            clock: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks an allocation may take: truly free plus cached-free.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks some sequence holds.
    pub fn in_use(&self) -> usize {
        self.num_blocks() - self.available()
    }

    /// Free blocks that still hold a cached prefix block.
    pub fn cached_free(&self) -> usize {
        self.evictable.len()
    }

    /// Sequences holding `block`.
    pub fn refs(&self, block: u32) -> u32 {
        self.meta.get(block as usize).map_or(0, |m| m.refs)
    }

    /// A block for one holder: a truly free one, else the least recently released cached one
    /// (dropped from the index). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.meta[b as usize].hash.take() {
                    self.index.remove(&h);
                }
                b
            }
        };
        self.meta[block as usize].refs = 1;
        Some(block)
    }

    /// One holder lets go of `block`; with none left it becomes free, or cached-free if it is
    /// registered.
    pub fn release(&mut self, block: u32) {
        let Some(m) = self.meta.get_mut(block as usize) else {
            return;
        };
        m.refs = m.refs.saturating_sub(1);
        if m.refs > 0 {
            return;
        }
        if m.hash.is_some() {
            self.clock += 1;
            m.released = self.clock;
            self.evictable.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    /// How many of `hashes`, from the first, are cached.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(*h))
            .count()
    }

    /// Cached-free blocks among the first `n` of `hashes` (taking them back uses free blocks).
    pub fn revivals(&self, hashes: &[BlockHash], n: usize) -> usize {
        hashes
            .iter()
            .take(n)
            .filter(|h| self.index.get(*h).is_some_and(|&b| self.refs(b) == 0))
            .count()
    }

    /// One more holder for the block cached under `hash`, if any.
    pub fn share(&mut self, hash: &BlockHash) -> Option<u32> {
        let block = *self.index.get(hash)?;
        let m = &mut self.meta[block as usize];
        if m.refs == 0 {
            self.evictable.remove(&m.released);
        }
        m.refs += 1;
        Some(block)
    }

    /// Registers held `block` as holding `hash`'s contents, unless another block already does
    /// (that one stays the cached copy) or it is registered already.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        let Some(m) = self.meta.get_mut(block as usize) else {
            return;
        };
        if m.hash.is_some() || m.refs == 0 || self.index.contains_key(&hash) {
            return;
        }
        m.hash = Some(hash);
        self.index.insert(hash, block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> BlockHash {
        [i; 32]
    }

    #[test]
    fn a_released_registered_block_stays_findable_until_evicted() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().expect("free");
        p.register(a, h(1));
        p.release(a);
        assert_eq!((p.in_use(), p.available(), p.cached_free()), (0, 2, 1));
        // The truly free block goes first; the cached one survives.
        let b = p.allocate().expect("free");
        assert_ne!(a, b);
        assert_eq!(p.cached_prefix(&[h(1)]), 1);
        // Then the cached one is evicted and forgotten.
        assert_eq!(p.allocate(), Some(a));
        assert_eq!((p.cached_prefix(&[h(1)]), p.cached_free()), (0, 0));
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn eviction_takes_the_least_recently_released() {
        let mut p = BlockPool::new(3);
        let blocks: Vec<u32> = (0..3).filter_map(|_| p.allocate()).collect();
        for (i, &b) in blocks.iter().enumerate() {
            p.register(b, h(i as u8));
        }
        p.release(blocks[2]);
        p.release(blocks[0]);
        p.release(blocks[1]);
        // Block 0 is used again, then released last: 2 and 1 are now older.
        assert_eq!(p.share(&h(0)), Some(blocks[0]));
        p.release(blocks[0]);
        assert_eq!(p.allocate(), Some(blocks[2]));
        assert_eq!(p.allocate(), Some(blocks[1]));
        assert_eq!(p.cached_prefix(&[h(0), h(1)]), 1);
    }

    #[test]
    fn shared_blocks_count_their_holders() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().expect("free");
        p.register(a, h(7));
        assert_eq!(p.share(&h(7)), Some(a));
        assert_eq!((p.refs(a), p.revivals(&[h(7)], 1)), (2, 0));
        p.release(a);
        assert_eq!((p.in_use(), p.cached_free()), (1, 0), "still held once");
        p.release(a);
        assert_eq!((p.in_use(), p.revivals(&[h(7)], 1)), (0, 1));
        assert_eq!(p.share(&h(7)), Some(a));
        assert_eq!((p.in_use(), p.cached_free()), (1, 0), "taken back");
        assert_eq!(p.share(&h(8)), None);
    }

    #[test]
    fn the_first_copy_of_a_hash_stays_the_cached_one() {
        let mut p = BlockPool::new(2);
        let (a, b) = (p.allocate().expect("free"), p.allocate().expect("free"));
        p.register(a, h(1));
        p.register(b, h(1));
        p.release(b);
        p.release(a);
        // The duplicate went back to the truly free list.
        assert_eq!((p.cached_free(), p.available()), (1, 2));
        assert_eq!(p.share(&h(1)), Some(a));
    }
}
