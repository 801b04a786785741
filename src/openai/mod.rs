//! OpenAI wire types, shared by `api` (which speaks HTTP) and `validate` (which
//! checks requests). Plain serde data, no behaviour beyond tiny helpers.

pub mod embeddings;
pub mod request;
pub mod response;

/// A client-supplied string as error messages quote it: at most 64
/// characters, so a megabyte of base64 in the wrong field is never echoed
/// (or logged) whole.
pub fn excerpt(s: &str) -> std::borrow::Cow<'_, str> {
    clip(s, 64)
}

/// `s` cut to at most `max_chars` characters, marked with `…` when cut.
pub fn clip(s: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => s.into(),
        Some((end, _)) => format!("{}…", &s[..end]).into(),
    }
}
