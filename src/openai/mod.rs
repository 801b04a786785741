//! OpenAI wire types, shared by `api` (which speaks HTTP) and `validate` (which
//! checks requests). Plain serde data, no behaviour beyond tiny helpers.

pub mod embeddings;
pub mod request;
pub mod response;
