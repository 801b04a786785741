//! `POST /v1/embeddings`: validate (texts tokenized, images preprocessed),
//! embed through the model's engine (batched with concurrent requests), and
//! answer in OpenAI's shape, as floats or base64 little-endian f32.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;

use super::error::ApiError;
use super::json::ApiJson;
use super::{off_runtime, AppState};
use crate::openai::embeddings::{
    Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector,
};
use crate::validate::embed::Encoding;

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    let _in_flight = state.lifecycle.admit()?;
    let serving = state.embed(&req.model)?;
    let model = req.model.clone();
    let validator = Arc::clone(&serving.validator);
    let valid = off_runtime(move || validator.validate(req)).await?;
    let vectors = serving.engine.embed(valid.inputs).await?;
    serving
        .metrics
        .prompt_tokens
        .inc_by(valid.prompt_tokens as u64);
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding",
            index,
            embedding: encode(v, valid.encoding),
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens: valid.prompt_tokens,
            total_tokens: valid.prompt_tokens,
        },
    }))
}

fn encode(v: Vec<f32>, encoding: Encoding) -> EmbeddingVector {
    match encoding {
        Encoding::Float => EmbeddingVector::Float(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}
