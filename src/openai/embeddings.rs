//! The OpenAI embeddings request and response, with mmserve's image extension:
//! `input` list items may be `{"type": "image_url", ...}` or
//! `{"type": "text", ...}` parts, mixed with plain strings.

use serde::{Deserialize, Serialize};

use super::request::ContentPart;

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32, as the OpenAI SDK asks).
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u32>,
}

/// `input`: one string, one token-id list, or a list of items.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Ids(Vec<u32>),
    Items(Vec<EmbeddingItem>),
}

/// One input of a list: a string, token ids, or a typed content part.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingItem {
    Text(String),
    Ids(Vec<u32>),
    Part(ContentPart),
}

impl EmbeddingInput {
    /// The inputs in order, each as a list item.
    pub fn into_items(self) -> Vec<EmbeddingItem> {
        match self {
            EmbeddingInput::Text(t) => vec![EmbeddingItem::Text(t)],
            EmbeddingInput::Ids(ids) => vec![EmbeddingItem::Ids(ids)],
            EmbeddingInput::Items(items) => items,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingResponse {
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Embedding {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// A vector as floats, or as base64 of little-endian f32 bytes.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}
