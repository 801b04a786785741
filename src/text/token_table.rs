//! [`TokenTable`]: every token's own raw bytes (the OpenAI logprobs `bytes` and `token`
//! fields) and whether it is special, built once from a `tokenizers::Tokenizer`.
//!
//! Bytes follow the tokenizer's decoder token by token (see `DecoderKind::token_bytes`):
//! - byte-level BPE (GPT-2/Qwen/Llama-3): each char through the GPT-2 unicode→byte table, so
//!   the bytes of a completion's tokens concatenate to exactly its UTF-8 text (for a completion
//!   whose bytes are valid UTF-8; the decoder itself turns invalid bytes into U+FFFD);
//! - SentencePiece style (`▁` and `<0xNN>` byte fallback): `▁` → space, `<0xNN>` → that byte.
//!   Concatenation equals the text except that the decoder strips one leading space from the
//!   whole decode (`Strip` or the `Metaspace` first-token rule), which the per-token bytes keep;
//! - special tokens: their content as UTF-8 (decode with `skip_special_tokens` drops them);
//! - ids the tokenizer does not know (padding rows of a larger embedding): no bytes.

use std::collections::HashSet;

use tokenizers::Tokenizer;

use super::decoder_kind::DecoderKind;

/// What kind of token an id is, as far as decoding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// No token has this id; `decode` ignores it.
    Unknown,
    /// An ordinary token (including non-special added tokens).
    Normal,
    /// A special added token; `decode(.., skip_special_tokens = true)` drops it.
    Special,
    /// A `<0xNN>` byte-fallback token, with a `ByteFallback` decoder.
    Byte,
}

/// Raw bytes and kind of every token id, stored flat.
#[derive(Debug, Clone)]
pub struct TokenTable {
    /// `bytes[offsets[id]..offsets[id + 1]]` are the bytes of `id`; length `vocab_size + 1`.
    offsets: Vec<usize>,
    /// All tokens' bytes, concatenated in id order.
    bytes: Vec<u8>,
    /// Kind of each id; length `vocab_size`.
    kinds: Vec<TokenKind>,
}

impl TokenTable {
    /// Builds the table for every id up to the largest one the tokenizer knows (model vocab and
    /// added tokens). Costs one pass over the vocabulary; build it once per model.
    pub fn new(tok: &Tokenizer) -> Self {
        let decoder = DecoderKind::of(tok);
        let specials: HashSet<String> = tok
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        let vocab = tok.get_vocab(true);
        let vocab_size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        drop(vocab);

        let mut table = Self {
            offsets: Vec::with_capacity(vocab_size + 1),
            bytes: Vec::new(),
            kinds: Vec::with_capacity(vocab_size),
        };
        table.offsets.push(0);
        for id in 0..vocab_size as u32 {
            let (bytes, kind) = match tok.id_to_token(id) {
                None => (Vec::new(), TokenKind::Unknown),
                // `decode` decides "special" by the token's string, so do the same here.
                Some(s) if specials.contains(&s) => (s.into_bytes(), TokenKind::Special),
                Some(s) => match decoder.token_bytes(&s) {
                    (b, true) => (b, TokenKind::Byte),
                    (b, false) => (b, TokenKind::Normal),
                },
            };
            table.bytes.extend_from_slice(&bytes);
            table.offsets.push(table.bytes.len());
            table.kinds.push(kind);
        }
        table
    }

    /// The token's own raw bytes; empty for an id outside the vocabulary.
    pub fn bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        match (self.offsets.get(id), self.offsets.get(id + 1)) {
            (Some(&start), Some(&end)) => &self.bytes[start..end],
            _ => &[],
        }
    }

    /// Bytes of the longest token: no token covers more text than this, so a text of `n`
    /// bytes takes at least `n / longest_token_bytes()` tokens.
    pub fn longest_token_bytes(&self) -> usize {
        self.offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }

    /// Whether `id` is a special added token (dropped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.kind(id) == TokenKind::Special
    }

    /// Number of ids covered: the largest known id + 1. Logits may be wider (padded
    /// embeddings); ids past this have no bytes and decode to nothing.
    pub fn vocab_size(&self) -> usize {
        self.kinds.len()
    }

    /// The OpenAI logprobs `token` field: the bytes as UTF-8, with U+FFFD where a token holds
    /// only part of a character (the `bytes` field carries the exact value).
    pub fn token_string(&self, id: u32) -> String {
        String::from_utf8_lossy(self.bytes(id)).into_owned()
    }

    pub(crate) fn kind(&self, id: u32) -> TokenKind {
        self.kinds
            .get(id as usize)
            .copied()
            .unwrap_or(TokenKind::Unknown)
    }

    /// Whether `id` reaches the decoder: known, and not a special token being skipped.
    pub(crate) fn is_text(&self, id: u32, skip_special_tokens: bool) -> bool {
        match self.kind(id) {
            TokenKind::Unknown => false,
            TokenKind::Special => !skip_special_tokens,
            TokenKind::Normal | TokenKind::Byte => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_fixtures::{byte_level, random_ids, sample_text, sentencepiece};

    fn concat(table: &TokenTable, ids: &[u32]) -> Vec<u8> {
        ids.iter()
            .filter(|&&id| table.is_text(id, true))
            .flat_map(|&id| table.bytes(id).to_vec())
            .collect()
    }

    #[test]
    fn byte_level_bytes_concatenate_to_decode_for_random_ids() {
        let tok = byte_level();
        let table = TokenTable::new(&tok);
        assert_eq!(table.vocab_size(), tok.get_vocab_size(true));
        for (seed, ids) in random_ids(table.vocab_size(), 300, 40) {
            // The ByteLevel decoder is exactly lossy UTF-8 of the concatenated bytes.
            let text = tok.decode(&ids, true).unwrap();
            let bytes = concat(&table, &ids);
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                text,
                "seed {seed}: {ids:?}"
            );
        }
    }

    #[test]
    fn byte_level_bytes_are_exact_utf8_of_real_text() {
        let tok = byte_level();
        let table = TokenTable::new(&tok);
        for line in sample_text().lines() {
            let ids = tok.encode(line, false).unwrap().get_ids().to_vec();
            assert_eq!(concat(&table, &ids), line.as_bytes(), "{line}");
        }
    }

    #[test]
    fn sentencepiece_bytes_are_text_with_the_leading_space() {
        let tok = sentencepiece();
        let table = TokenTable::new(&tok);
        for line in sample_text().lines() {
            let ids = tok.encode(line, false).unwrap().get_ids().to_vec();
            let text = tok.decode(&ids, true).unwrap();
            let bytes = String::from_utf8(concat(&table, &ids)).unwrap();
            // The Metaspace pre-tokenizer prepends `▁`; the decoder's Strip removes it again.
            assert_eq!(bytes, format!(" {text}"), "{line}");
        }
    }

    #[test]
    fn kinds_and_strings() {
        let tok = sentencepiece();
        let table = TokenTable::new(&tok);
        let id = |s: &str| tok.token_to_id(s).unwrap();
        assert_eq!(table.bytes(id("<0xF0>")), &[0xF0]);
        assert_eq!(table.kind(id("<0xF0>")), TokenKind::Byte);
        assert_eq!(table.token_string(id("<0xF0>")), "\u{FFFD}");
        assert_eq!(table.bytes(id("▁the")), b" the");
        assert!(table.is_special(id("</s>")));
        assert_eq!(table.token_string(id("</s>")), "</s>");
        assert!(!table.is_special(id("<tool_call>")));
        assert_eq!(table.bytes(u32::MAX), b"");
        assert!(!table.is_special(u32::MAX));

        let tok = byte_level();
        let table = TokenTable::new(&tok);
        let id = |s: &str| tok.token_to_id(s).unwrap();
        assert_eq!(table.bytes(id("Ġcat")), b" cat");
        assert!(table.is_special(id("<|im_end|>")));
        assert_eq!(table.bytes(id("<|im_end|>")), b"<|im_end|>");
        // Non-special added tokens follow the decoder: outside the table → UTF-8, inside → mapped.
        assert_eq!(table.bytes(id("你好世界")), "你好世界".as_bytes());
        assert_eq!(table.bytes(id("Ġindent")), b" indent");
    }
}
