//! What a tokenizer's decoder does to one token, read once from the decoder's serialized
//! form: GPT-2 byte-level mapping, SentencePiece `▁` replacement, `<0xNN>` byte fallback.
//! Owns the GPT-2 unicode→byte table and the per-token byte rule that [`super::TokenTable`] uses.

use serde_json::Value;
use tokenizers::Tokenizer;

/// The decoder steps that change a token's bytes, as far as this module understands them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DecoderKind {
    /// A `ByteLevel` decoder: each char of a token stands for one byte (GPT-2 table).
    pub byte_level: bool,
    /// A `ByteFallback` decoder: `<0xNN>` tokens stand for the byte `NN`.
    pub byte_fallback: bool,
    /// Literal string replacements applied to every token, in order (SentencePiece: `▁` → ` `,
    /// from a `Replace` or a `Metaspace` decoder).
    pub replacements: Vec<(String, String)>,
}

impl DecoderKind {
    /// Reads the decoder of `tok`; a tokenizer without a decoder gets the plain kind.
    pub fn of(tok: &Tokenizer) -> Self {
        let mut kind = Self::default();
        if let Some(json) = tok.get_decoder().and_then(|d| serde_json::to_value(d).ok()) {
            kind.visit(&json);
        }
        kind
    }

    fn visit(&mut self, node: &Value) {
        match node.get("type").and_then(Value::as_str) {
            Some("ByteLevel") => self.byte_level = true,
            Some("ByteFallback") => self.byte_fallback = true,
            Some("Metaspace") => {
                if let Some(r) = node.get("replacement").and_then(Value::as_str) {
                    self.replacements.push((r.to_string(), " ".to_string()));
                }
            }
            Some("Replace") => {
                let pattern = node.pointer("/pattern/String").and_then(Value::as_str);
                let content = node.get("content").and_then(Value::as_str);
                if let (Some(p), Some(c)) = (pattern, content) {
                    self.replacements.push((p.to_string(), c.to_string()));
                }
            }
            Some("Sequence") => {
                let children = node.get("decoders").and_then(Value::as_array);
                for child in children.into_iter().flatten() {
                    self.visit(child);
                }
            }
            _ => {}
        }
    }

    /// The bytes the decoder makes of `token` on its own, and whether it is a `<0xNN>` byte
    /// token. Mirrors the decoders token by token; what they do across tokens (the leading-space
    /// strip of SentencePiece, lossy UTF-8 of incomplete sequences) is not part of it.
    pub fn token_bytes(&self, token: &str) -> (Vec<u8>, bool) {
        if self.byte_level {
            // The ByteLevel decoder maps a token only if every char is in the table; otherwise
            // it keeps the token's UTF-8 (added tokens such as `你好世界`).
            let mapped: Option<Vec<u8>> = token.chars().map(gpt2_char_to_byte).collect();
            return (mapped.unwrap_or_else(|| token.as_bytes().to_vec()), false);
        }
        let mut text = token.to_string();
        for (pattern, content) in &self.replacements {
            if text.contains(pattern.as_str()) {
                text = text.replace(pattern.as_str(), content);
            }
        }
        match self.byte_fallback.then(|| fallback_byte(&text)).flatten() {
            Some(b) => (vec![b], true),
            None => (text.into_bytes(), false),
        }
    }
}

/// `<0xNN>` → `NN`, exactly as the ByteFallback decoder recognises it.
fn fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Bytes that GPT-2 maps to the char with the same code point.
fn gpt2_printable(b: u32) -> bool {
    (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable bytes are their own char; the other 68
/// bytes, in increasing order (0x00–0x20, 0x7F–0xA0, 0xAD), are U+0100 + n.
pub(crate) fn gpt2_char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if gpt2_printable(code) {
        return u8::try_from(code).ok();
    }
    let n = code.checked_sub(0x100)?;
    let byte = match n {
        0..=0x20 => n,
        0x21..=0x42 => 0x7F + (n - 0x21),
        0x43 => 0xAD,
        _ => return None,
    };
    u8::try_from(byte).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's `bytes_to_unicode`, written out the way the original builds it.
    fn reference_table() -> Vec<(u8, char)> {
        let mut bs: Vec<u32> = (0..=255).filter(|b| gpt2_printable(*b)).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..=255u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let pairs = bs.into_iter().zip(cs);
        pairs
            .map(|(b, c)| (b as u8, char::from_u32(c).unwrap()))
            .collect()
    }

    #[test]
    fn gpt2_table_matches_reference() {
        let table = reference_table();
        assert_eq!(table.len(), 256);
        for (b, c) in table {
            assert_eq!(gpt2_char_to_byte(c), Some(b), "char {c:?}");
        }
        assert_eq!(gpt2_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(gpt2_char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(gpt2_char_to_byte(' '), None);
        assert_eq!(gpt2_char_to_byte('\u{144}'), None);
        assert_eq!(gpt2_char_to_byte('你'), None);
    }

    #[test]
    fn fallback_byte_parses_only_exact_form() {
        assert_eq!(fallback_byte("<0xE4>"), Some(0xE4));
        assert_eq!(fallback_byte("<0x0a>"), Some(0x0A));
        assert_eq!(fallback_byte("<0xE4"), None);
        assert_eq!(fallback_byte("<0x123>"), None);
        assert_eq!(fallback_byte("x<0xE4>"), None);
    }

    #[test]
    fn sentencepiece_rule() {
        let kind = DecoderKind {
            byte_fallback: true,
            replacements: vec![("▁".into(), " ".into())],
            ..DecoderKind::default()
        };
        assert_eq!(kind.token_bytes("▁the"), (b" the".to_vec(), false));
        assert_eq!(kind.token_bytes("<0xF0>"), (vec![0xF0], true));
        let plain = DecoderKind::default();
        assert_eq!(plain.token_bytes("<0xF0>"), (b"<0xF0>".to_vec(), false));
    }
}
