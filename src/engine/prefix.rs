//! Automatic prefix caching, engine side (vLLM's, with the same rules): every full KV block of
//! a sequence is named by a hash chain — SHA-256 of the previous block's hash, the block's
//! token ids and the digests of the images whose placeholder rows start in it — so equal
//! hashes mean equal keys and values. Committed full blocks are registered in the pool
//! (`model::block_pool`); a sequence being admitted takes the longest run of its blocks found
//! there (always leaving its last token to compute, for the logits) and prefills only the rest.
//!
//! Images: a sequence whose every image row lies inside its cached prefix is not encoded at
//! all. One with an image row past the prefix (an image straddling the boundary, or after it)
//! encodes its images as without caching and feeds only the rows after the prefix, so the
//! prefix is never shortened. Qwen2-VL's M-RoPE state is rebuilt over the cached tokens
//! (`ChatModel::attach_prefix`), so the remaining tokens get the positions they would have had.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use super::core::EngineCore;
use super::scheduler::SeqState;
use super::sequence::Sequence;
use crate::model::{BlockHash, ImageKey};

/// Extends `hashes` (the chain of `tokens`' first full blocks) to every full block of `tokens`.
/// `images` are the prompt's images: where their rows start, and their keys.
pub fn extend_chain(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    images: &[(usize, ImageKey)],
    block_size: usize,
) {
    let bs = block_size.max(1);
    for (i, block) in tokens.chunks_exact(bs).enumerate().skip(hashes.len()) {
        let mut h = Sha256::new();
        if let Some(parent) = hashes.last() {
            h.update(parent);
        }
        for t in block {
            h.update(t.to_le_bytes());
        }
        let span = i * bs..(i + 1) * bs;
        for (_, key) in images.iter().filter(|(start, _)| span.contains(start)) {
            h.update(key.as_bytes());
        }
        hashes.push(h.finalize().into());
    }
}

impl EngineCore {
    /// The scheduler's view of waiting `s`: with prefix caching, the cached run of its blocks
    /// counts as cached. Its image tokens count against the encoder budget when one of its
    /// images is neither in the image cache nor in `queued` (the images of the sequences ahead
    /// of it in this plan, e.g. another choice of the same request); its images join `queued`.
    pub(super) fn waiting_state(&self, s: &Sequence, queued: &mut HashSet<ImageKey>) -> SeqState {
        let kv = self.cache.kv();
        let (blocks, revives) = if self.prefix_caching {
            kv.cached_prefix(s.reusable_hashes(kv.block_size()))
        } else {
            (0, 0)
        };
        let cached = blocks * kv.block_size();
        let mut encoder = s.encoder_tokens(self.model.image_token_id(), cached);
        let mut new = false;
        for img in &s.images {
            new |= !self.image_cache.holds(&img.key) && queued.insert(img.key);
        }
        if !new {
            encoder = 0;
        }
        SeqState {
            cached,
            uncached: s.tokens.len() - cached,
            frees: 0,
            revives,
            encoder,
        }
    }

    /// Starts just-admitted running sequence `i` from its cached prefix, and counts the
    /// tokens looked up and found.
    pub(super) fn attach_prefix(&mut self, i: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.cache.kv().block_size();
        let Some(seq) = self.running.get_mut(i) else {
            return;
        };
        let hashes = seq.reusable_hashes(bs);
        let hit =
            self.model
                .attach_prefix(&mut self.cache, seq.id, hashes, &seq.tokens, &seq.grids);
        seq.cached = hit;
        self.metrics.prefix_queries.inc_by(seq.tokens.len() as u64);
        self.metrics.prefix_hits.inc_by(hit as u64);
    }

    /// Registers the full blocks running sequence `i` has committed, for later sequences.
    pub(super) fn register_blocks(&mut self, i: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.cache.kv().block_size();
        if let Some(seq) = self.running.get_mut(i) {
            seq.extend_hashes(bs);
            self.cache.register(seq.id, &seq.hashes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageInput;

    const IMG: u32 = 9;

    /// An image starting at `start`, keyed by a one-value tensor.
    fn at(start: usize, value: f32) -> (usize, ImageKey) {
        let t = candle_core::Tensor::new(&[value], &candle_core::Device::Cpu).expect("tensor");
        (start, ImageKey::of(&ImageInput::Pixels(t)).expect("key"))
    }

    fn chain(tokens: &[u32], images: &[(usize, ImageKey)]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        extend_chain(&mut out, tokens, images, 2);
        out
    }

    #[test]
    fn a_block_hash_covers_everything_before_it() {
        let a = chain(&[1, 2, 3, 4, 5], &[]);
        assert_eq!(a.len(), 2, "the partial block has no hash");
        // The same second block after a different first one hashes differently.
        let b = chain(&[1, 9, 3, 4], &[]);
        assert_eq!((a[0] == b[0], a[1] == b[1]), (false, false));
        // Extending keeps the hashes already made.
        let mut grown = a.clone();
        extend_chain(&mut grown, &[1, 2, 3, 4, 5, 6], &[], 2);
        assert_eq!((&grown[..2], grown.len()), (&a[..], 3));
    }

    #[test]
    fn the_image_behind_the_placeholders_is_part_of_the_hash() {
        let tokens = [1, IMG, IMG, IMG];
        let one = chain(&tokens, &[at(1, 1.0)]);
        let other = chain(&tokens, &[at(1, 2.0)]);
        // Both blocks differ: the first holds the image's start, the second follows it.
        assert_ne!(one[0], other[0]);
        assert_ne!(one[1], other[1]);
        assert_eq!(one, chain(&tokens, &[at(1, 1.0)]));
    }
}
