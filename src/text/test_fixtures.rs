//! Test-only helpers: the tokenizer fixtures of `tests/fixtures/text/` (made by
//! `scripts/gen_text_fixtures.py`) and seeded random id sequences.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/text/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Byte-level BPE (ByteLevel decoder), 699 ids, with special and non-special added tokens.
pub fn byte_level() -> Tokenizer {
    Tokenizer::from_file(fixture("bytelevel.json")).unwrap()
}

/// Llama/Mistral-style BPE with `<0xNN>` byte fallback and the
/// Replace/ByteFallback/Fuse/Strip decoder.
pub fn sentencepiece() -> Tokenizer {
    Tokenizer::from_file(fixture("sentencepiece.json")).unwrap()
}

/// Multilingual lines with CJK, accents, emojis and rare chars that fall back to bytes.
pub fn sample_text() -> String {
    std::fs::read_to_string(fixture("sample_text.txt")).unwrap()
}

/// `count` seeded sequences of up to `max_len` ids drawn from `0..vocab_size + 3` (the last
/// three are unknown ids, as a padded embedding would produce). Returns `(seed, ids)`.
pub fn random_ids(vocab_size: usize, count: u64, max_len: usize) -> Vec<(u64, Vec<u32>)> {
    (0..count)
        .map(|seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let len = rng.gen_range(0..=max_len);
            let ids = (0..len)
                .map(|_| rng.gen_range(0..vocab_size as u32 + 3))
                .collect();
            (seed, ids)
        })
        .collect()
}

/// Encodes every line of the sample text and joins the ids, with `special` between lines.
pub fn sample_ids(tok: &Tokenizer, special: &str) -> Vec<u32> {
    let special = tok.token_to_id(special).unwrap();
    let mut ids = Vec::new();
    for line in sample_text().lines() {
        ids.extend_from_slice(tok.encode(line, false).unwrap().get_ids());
        ids.push(special);
    }
    ids
}
