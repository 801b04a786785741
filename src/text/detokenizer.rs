//! [`IncrementalDetokenizer`]: streaming detokenization of one sequence's generated ids.
//!
//! Contract: the pieces returned by `push`, followed by `flush`, concatenate to exactly
//! `tokenizer.decode(all_ids, skip_special_tokens)`, and no piece ever ends inside a UTF-8
//! character (a piece holds U+FFFD only where that decode does).
//!
//! Method (the prefix/read-offset idea of vLLM and TGI): keep a short window of ids. Its first
//! `read` ids were already streamed and decode to `prefix_text`; the rest are pending. When the
//! pending tail is complete, decode the whole window, stream what follows `prefix_text`, and
//! slide the window so the just-streamed ids become the new prefix. The prefix gives the decoder
//! the context it needs (SentencePiece strips a leading space only at the very start; byte
//! tokens join across tokens), so each step costs O(window), not O(all ids).
//!
//! Exactness rests on three rules:
//! - ids that `decode` drops (skipped specials, unknown ids) never enter the window;
//! - the window is cut only where the bytes so far end on a character boundary (byte-level BPE
//!   can split a character across tokens);
//! - and never inside a run of `<0xNN>` byte-fallback tokens: the `ByteFallback` decoder turns
//!   a whole invalid run into U+FFFD, so a run's text is known only when a normal token ends it.

use tokenizers::Tokenizer;

use super::token_table::{TokenKind, TokenTable};
use super::TextError;

/// Streaming detokenizer state for one sequence.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    /// Passed to `decode`; also decides which ids reach the window.
    skip_special_tokens: bool,
    /// Ids that reach the decoder, from the last cut-before-last on: `[..read]` streamed, rest
    /// pending. Empty `[..read]` means the window starts at the beginning of the sequence.
    window: Vec<u32>,
    /// Number of window ids already streamed.
    read: usize,
    /// `decode(window[..read])`, the text to cut off the front of the next window decode.
    prefix_text: String,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a new sequence. Use `skip_special_tokens = true` for OpenAI output.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds one generated id and returns the newly completed text (often empty while a
    /// character or a byte-fallback run is incomplete). `table` must be built from `tok`: it
    /// tells which ids are skipped and where characters end.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        table: &TokenTable,
        id: u32,
    ) -> Result<String, TextError> {
        if !table.is_text(id, self.skip_special_tokens) {
            return Ok(String::new());
        }
        self.window.push(id);
        if !self.pending_is_complete(table) {
            return Ok(String::new());
        }
        let piece = self.take_pending(tok)?;
        self.window.drain(..self.read);
        self.read = self.window.len();
        self.prefix_text = decode(tok, &self.window, self.skip_special_tokens)?;
        Ok(piece)
    }

    /// Returns the text still held back (an incomplete character decodes to U+FFFD here, as in
    /// `decode`) and resets the detokenizer for reuse.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, TextError> {
        let piece = if self.read < self.window.len() {
            self.take_pending(tok)?
        } else {
            String::new()
        };
        *self = Self::new(self.skip_special_tokens);
        Ok(piece)
    }

    /// Decodes the whole window and returns the text after `prefix_text`.
    fn take_pending(&self, tok: &Tokenizer) -> Result<String, TextError> {
        let text = decode(tok, &self.window, self.skip_special_tokens)?;
        match text.strip_prefix(self.prefix_text.as_str()) {
            Some(new) => Ok(new.to_string()),
            None => Err(TextError::Inconsistent {
                already: self.prefix_text.clone(),
                now: text,
            }),
        }
    }

    /// Whether the pending ids end on a character boundary outside any byte-fallback run.
    fn pending_is_complete(&self, table: &TokenTable) -> bool {
        let pending = &self.window[self.read..];
        match pending.last() {
            None => false,
            Some(&last) if table.kind(last) == TokenKind::Byte => false,
            Some(_) => !ends_inside_char(&last_bytes(table, pending)),
        }
    }
}

/// The last (up to) four bytes of `ids`, enough to see whether they end inside a character.
fn last_bytes(table: &TokenTable, ids: &[u32]) -> Vec<u8> {
    let mut tail = Vec::with_capacity(8);
    for &id in ids.iter().rev() {
        let bytes = table.bytes(id);
        tail.splice(0..0, bytes[bytes.len().saturating_sub(4)..].iter().copied());
        if tail.len() >= 4 {
            break;
        }
    }
    tail.split_off(tail.len().saturating_sub(4))
}

/// True when `bytes` end with the start of a valid multi-byte character that more bytes could
/// complete. An invalid sequence is final (it becomes U+FFFD whatever follows), so it is not
/// "inside" a character.
fn ends_inside_char(bytes: &[u8]) -> bool {
    let is_continuation = |b: &u8| b & 0xC0 == 0x80;
    let Some(start) = bytes.iter().rposition(|b| !is_continuation(b)) else {
        return false;
    };
    match std::str::from_utf8(&bytes[start..]) {
        Ok(_) => false,
        Err(e) => e.valid_up_to() == 0 && e.error_len().is_none(),
    }
}

fn decode(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
    tok.decode(ids, skip_special_tokens)
        .map_err(|e| TextError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_fixtures::{byte_level, random_ids, sample_ids, sentencepiece};
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, DecoderWrapper,
    };
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

    /// Streams `ids` and checks every piece and the total against `decode`; returns the pieces.
    /// Also checks latency: whenever `decode` of the ids so far ends in a whole character and
    /// the last id is an ordinary token, everything has been streamed.
    fn check_stream(tok: &Tokenizer, table: &TokenTable, ids: &[u32], skip: bool) -> Vec<String> {
        let mut detok = IncrementalDetokenizer::new(skip);
        let mut pieces = Vec::new();
        for (n, &id) in ids.iter().enumerate() {
            pieces.push(detok.push(tok, table, id).unwrap());
            let so_far = tok.decode(&ids[..=n], skip).unwrap();
            if table.kind(id) == TokenKind::Normal && !so_far.ends_with('\u{FFFD}') {
                assert_eq!(
                    pieces.concat(),
                    so_far,
                    "held back text after {:?}",
                    &ids[..=n]
                );
            }
        }
        pieces.push(detok.flush(tok).unwrap());
        let expected = tok.decode(ids, skip).unwrap();
        assert_eq!(pieces.concat(), expected, "ids {ids:?}");
        if !expected.contains('\u{FFFD}') {
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        }
        pieces
    }

    fn check_tokenizer(tok: &Tokenizer, special: &str) {
        let table = TokenTable::new(tok);
        for (_, ids) in random_ids(table.vocab_size(), 300, 60) {
            check_stream(tok, &table, &ids, true);
            check_stream(tok, &table, &ids, false);
        }
        check_stream(tok, &table, &sample_ids(tok, special), true);
    }

    #[test]
    fn byte_level_stream_equals_decode() {
        check_tokenizer(&byte_level(), "<|im_end|>");
    }

    #[test]
    fn sentencepiece_stream_equals_decode() {
        check_tokenizer(&sentencepiece(), "</s>");
    }

    #[test]
    fn metaspace_decoder_stream_equals_decode() {
        // Older conversions: a Metaspace decoder (first-token space strip) with byte fallback.
        let mut tok = sentencepiece();
        let meta = Metaspace::new('▁', PrependScheme::First, true);
        let seq = Sequence::new(vec![
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Metaspace(meta),
        ]);
        tok.with_decoder(Some(seq));
        check_tokenizer(&tok, "</s>");
    }

    #[test]
    fn gemma_style_decoder_stream_equals_decode() {
        // Replace/ByteFallback/Fuse without Strip: leading spaces are kept.
        let mut tok = sentencepiece();
        let seq = Sequence::new(vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").unwrap()),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ]);
        tok.with_decoder(Some(seq));
        check_tokenizer(&tok, "</s>");
    }

    #[test]
    fn split_character_waits_for_its_last_byte() {
        let tok = byte_level();
        let table = TokenTable::new(&tok);
        // 'ꙮ' is EA 99 AE, the GPT-2 chars 'ê', 'Ļ', '®': three single-byte tokens after a word.
        let id = |s: &str| tok.token_to_id(s).unwrap();
        let ids = [id("the"), id("ê"), id("Ļ"), id("®")];
        let pieces = check_stream(&tok, &table, &ids, true);
        assert_eq!(pieces, ["the", "", "", "ꙮ", ""]);
    }

    #[test]
    fn byte_run_waits_for_a_normal_token() {
        let tok = sentencepiece();
        let table = TokenTable::new(&tok);
        let id = |s: &str| tok.token_to_id(s).unwrap();
        let ids = [
            id("▁the"),
            id("<0xF0>"),
            id("<0x9F>"),
            id("<0xA6>"),
            id("<0x80>"),
        ];
        let mut all = ids.to_vec();
        all.extend([id("</s>"), id("▁cat")]);
        let pieces = check_stream(&tok, &table, &all, true);
        assert_eq!(pieces, ["the", "", "", "", "", "", "🦀 cat", ""]);
        let pieces = check_stream(&tok, &table, &ids, true);
        assert_eq!(pieces, ["the", "", "", "", "", "🦀"]);
    }

    #[test]
    fn leading_space_is_stripped_only_at_the_start() {
        let tok = sentencepiece();
        let table = TokenTable::new(&tok);
        let id = |s: &str| tok.token_to_id(s).unwrap();
        let ids = [id("<s>"), id("▁the"), id("</s>"), id("▁cat")];
        assert_eq!(
            check_stream(&tok, &table, &ids, true),
            ["", "the", "", " cat", ""]
        );
    }

    #[test]
    fn ends_inside_char_cases() {
        assert!(ends_inside_char(&[0xE4]));
        assert!(ends_inside_char(&[b'a', 0xF0, 0x9F, 0x98]));
        assert!(!ends_inside_char(&[0xE4, 0xB8, 0xAD]));
        assert!(!ends_inside_char(&[0xE4, 0xB8, 0xFF]));
        assert!(!ends_inside_char(&[0x80, 0x80]));
        assert!(!ends_inside_char(&[0xED, 0xA0])); // surrogate: invalid, final
        assert!(!ends_inside_char(&[]));
    }

    #[test]
    fn window_stays_short() {
        let tok = byte_level();
        let table = TokenTable::new(&tok);
        let mut detok = IncrementalDetokenizer::new(true);
        for id in sample_ids(&tok, "<|im_end|>") {
            detok.push(&tok, &table, id).unwrap();
            // Sample text splits at most one character over a few tokens.
            assert!(detok.window.len() <= 8, "{:?}", detok.window);
        }
    }
}
