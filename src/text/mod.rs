//! Per-token text machinery, pure logic with no model: the raw bytes of every token
//! ([`TokenTable`], for OpenAI logprobs), streaming detokenization that never splits a UTF-8
//! character ([`IncrementalDetokenizer`]), and OpenAI `stop` strings ([`StopMatcher`]).
//!
//! Typical use per generated token, on the engine thread:
//! `text = detok.push(&tokenizer, &table, id)?` then `stop.push(&text)`; at the end
//! `detok.flush(..)` and `stop.flush()`.

mod decoder_kind;
mod detokenizer;
mod stop;
mod token_table;

pub use detokenizer::IncrementalDetokenizer;
pub use stop::{StopMatcher, StopOutcome};
pub use token_table::TokenTable;

/// Errors of the text machinery.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The tokenizer's own `decode` failed.
    #[error("tokenizer decode failed: {0}")]
    Decode(String),
    /// Decoding a longer window changed text that had already been streamed. This cannot happen
    /// for the byte-level, SentencePiece and plain decoders this module understands; it is
    /// reported rather than streaming wrong text if an unusual decoder does it.
    #[error("incremental decode is inconsistent: {already:?} is not a prefix of {now:?}")]
    Inconsistent {
        /// Text of the window that had already been streamed.
        already: String,
        /// Text of the same window with the new tokens.
        now: String,
    },
}

#[cfg(test)]
pub(crate) mod test_fixtures;
