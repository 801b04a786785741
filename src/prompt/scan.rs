//! A lexer for Jinja template source, just deep enough to find the `{% ... %}` and `{{ ... }}` tags and
//! the tokens inside them (skipping text, `{# comments #}` and `{% raw %}` blocks, and honouring string
//! literals and bracket nesting as Jinja2's lexer does).
//!
//! Used for content-format detection (`detect`) and to strip Hugging Face's `{% generation %}` tags,
//! which minijinja does not know.

use std::ops::Range;

/// A token inside a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Name(String),
    /// A string literal, with its escapes resolved.
    Str(String),
    Number,
    /// An operator or punctuation: `.`, `|`, `(`, `==`, ...
    Op(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: TokenKind,
    /// Byte range in the template source.
    pub span: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagKind {
    /// `{% ... %}`
    Block,
    /// `{{ ... }}`
    Variable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tag {
    pub kind: TagKind,
    pub tokens: Vec<Token>,
}

/// The source is not well-formed Jinja (minijinja will say why when it compiles it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Longest operators first, so `//` wins over `/`.
const OPERATORS: [&str; 26] = [
    "//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]", "(", ")", "{", "}",
    ">", "<", "=", ".", ":", "|", ",", ";",
];

/// All tags of `source`, in order.
pub(crate) fn scan(source: &str) -> Result<Vec<Tag>, Malformed> {
    let mut tags = Vec::new();
    let mut pos = 0;
    while let Some(offset) = find_tag_start(&source[pos..]) {
        let start = pos + offset;
        let opener = &source[start..start + 2];
        pos = match opener {
            "{#" => start + 2 + source[start + 2..].find("#}").ok_or(Malformed)? + 2,
            _ => {
                let kind = if opener == "{{" {
                    TagKind::Variable
                } else {
                    TagKind::Block
                };
                let (tokens, end) = lex_tag(source, start + 2, kind)?;
                let is_raw = kind == TagKind::Block
                    && matches!(tokens.as_slice(), [t] if t.kind == TokenKind::Name("raw".into()));
                tags.push(Tag { kind, tokens });
                if is_raw {
                    skip_raw_body(source, end)?
                } else {
                    end
                }
            }
        };
    }
    Ok(tags)
}

fn find_tag_start(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b'{' && matches!(bytes[i + 1], b'{' | b'%' | b'#'))
}

/// Finds the `{% endraw %}` closing a raw block whose body starts at `pos`; returns the position after it.
fn skip_raw_body(source: &str, mut pos: usize) -> Result<usize, Malformed> {
    while let Some(offset) = source[pos..].find("{%") {
        let start = pos + offset;
        let (tokens, end) = lex_tag(source, start + 2, TagKind::Block)?;
        if matches!(tokens.as_slice(), [t] if t.kind == TokenKind::Name("endraw".into())) {
            return Ok(end);
        }
        pos = start + 2;
    }
    Err(Malformed)
}

/// Lexes a tag body starting just after its opener; returns the tokens and the position after the closer.
fn lex_tag(source: &str, mut pos: usize, kind: TagKind) -> Result<(Vec<Token>, usize), Malformed> {
    let closer = if kind == TagKind::Block { "%}" } else { "}}" };
    // `{%-`, `{%+`, `{{-`: whitespace control, not an operator.
    let modifiers: &[char] = if kind == TagKind::Block {
        &['-', '+']
    } else {
        &['-']
    };
    if source[pos..].starts_with(modifiers) {
        pos += 1;
    }
    let mut tokens = Vec::new();
    let mut depth = 0usize;
    loop {
        pos += whitespace_len(&source[pos..]);
        let rest = &source[pos..];
        if rest.is_empty() {
            return Err(Malformed);
        }
        if depth == 0 {
            let modifier_len = usize::from(rest.starts_with(modifiers));
            if rest[modifier_len..].starts_with(closer) {
                return Ok((tokens, pos + modifier_len + closer.len()));
            }
        }
        let (token_kind, len) = lex_token(rest)?;
        match token_kind {
            TokenKind::Op("(" | "[" | "{") => depth += 1,
            TokenKind::Op(")" | "]" | "}") => depth = depth.saturating_sub(1),
            _ => {}
        }
        tokens.push(Token {
            kind: token_kind,
            span: pos..pos + len,
        });
        pos += len;
    }
}

fn whitespace_len(text: &str) -> usize {
    text.len() - text.trim_start().len()
}

/// One token at the start of `text` and its length in bytes.
fn lex_token(text: &str) -> Result<(TokenKind, usize), Malformed> {
    let first = text.chars().next().ok_or(Malformed)?;
    if first == '\'' || first == '"' {
        return lex_string(text, first);
    }
    if first.is_ascii_digit() {
        let len = text
            .char_indices()
            .find(|&(i, c)| {
                !(c.is_ascii_alphanumeric() || c == '_' || (c == '.' && next_is_digit(text, i)))
            })
            .map_or(text.len(), |(i, _)| i);
        return Ok((TokenKind::Number, len));
    }
    if first.is_alphabetic() || first == '_' {
        let len = text
            .char_indices()
            .find(|&(_, c)| !(c.is_alphanumeric() || c == '_'))
            .map_or(text.len(), |(i, _)| i);
        return Ok((TokenKind::Name(text[..len].to_string()), len));
    }
    OPERATORS
        .iter()
        .find(|op| text.starts_with(**op))
        .map(|op| (TokenKind::Op(op), op.len()))
        .ok_or(Malformed)
}

fn next_is_digit(text: &str, i: usize) -> bool {
    text[i + 1..].starts_with(|c: char| c.is_ascii_digit())
}

/// A quoted string literal; backslash escapes are resolved the way Python's `unicode_escape` does
/// for the common cases (enough to compare keys such as `'content'`).
fn lex_string(text: &str, quote: char) -> Result<(TokenKind, usize), Malformed> {
    let mut value = String::new();
    let mut chars = text.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                let (_, escaped) = chars.next().ok_or(Malformed)?;
                value.push(match escaped {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    other => other,
                });
            }
            c if c == quote => return Ok((TokenKind::Str(value), i + c.len_utf8())),
            c => value.push(c),
        }
    }
    Err(Malformed)
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask tags, whose body is
/// rendered unchanged) with `{% with %}` / `{% endwith %}`: a block tag with the same whitespace
/// control (`-`, `+`, trim_blocks, lstrip_blocks) and, like the call block transformers compiles the
/// tag into, its own scope for `set`. Malformed source is returned unchanged for the compiler to report.
pub(crate) fn rewrite_generation_tags(source: &str) -> String {
    let Ok(tags) = scan(source) else {
        return source.to_string();
    };
    let mut out = String::with_capacity(source.len());
    let mut copied = 0;
    for tag in tags.iter().filter(|t| t.kind == TagKind::Block) {
        let [token] = tag.tokens.as_slice() else {
            continue;
        };
        let replacement = match &token.kind {
            TokenKind::Name(name) if name == "generation" => "with",
            TokenKind::Name(name) if name == "endgeneration" => "endwith",
            _ => continue,
        };
        out.push_str(&source[copied..token.span.start]);
        out.push_str(replacement);
        copied = token.span.end;
    }
    out.push_str(&source[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tag: &Tag) -> Vec<String> {
        tag.tokens
            .iter()
            .map(|t| match &t.kind {
                TokenKind::Name(n) => n.clone(),
                TokenKind::Str(s) => format!("'{s}'"),
                TokenKind::Number => "#".into(),
                TokenKind::Op(op) => op.to_string(),
            })
            .collect()
    }

    #[test]
    fn finds_tags_and_skips_text_comments_and_raw() {
        let src = "a {# {% no %} #}{%- for m in messages -%}{{ m['content'] }}{% raw %}{% no %}{% endraw %}b";
        let tags = scan(src).unwrap();
        assert_eq!(tags.len(), 3);
        assert_eq!(names(&tags[0]), ["for", "m", "in", "messages"]);
        assert_eq!(names(&tags[1]), ["m", "[", "'content'", "]"]);
        assert_eq!(names(&tags[2]), ["raw"]);
    }

    #[test]
    fn closers_inside_strings_and_brackets_do_not_end_a_tag() {
        let tags = scan("{{- \"}}\" }}{{ {'a': {'b': 1}} }}{% set x = '%}' -%}").unwrap();
        assert_eq!(names(&tags[0]), ["'}}'"]);
        assert_eq!(names(&tags[1]).len(), 9);
        assert_eq!(names(&tags[2]), ["set", "x", "=", "'%}'"]);
    }

    #[test]
    fn operators_and_numbers() {
        let tags = scan("{{ a // 2 ** 1.5 != -3 }}").unwrap();
        assert_eq!(names(&tags[0]), ["a", "//", "#", "**", "#", "!=", "-", "#"]);
    }

    #[test]
    fn unterminated_source_is_malformed() {
        assert_eq!(scan("{{ a "), Err(Malformed));
        assert_eq!(scan("{% raw %}x"), Err(Malformed));
        assert_eq!(scan("{# x"), Err(Malformed));
    }

    #[test]
    fn generation_tags_become_with_blocks() {
        let src = "{%- generation -%}x{% endgeneration +%}{{ '{% generation %}' }}{% raw %}{% generation %}{% endraw %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "{%- with -%}x{% endwith +%}{{ '{% generation %}' }}{% raw %}{% generation %}{% endraw %}"
        );
        assert_eq!(rewrite_generation_tags("{% if %"), "{% if %");
    }
}
