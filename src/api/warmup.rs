//! The start-up warm-up of a loaded model, through the same validator and
//! engine a request goes through (not through HTTP, so the request counters
//! and latency histograms do not see it): each engine of a chat model (one per
//! device) encodes one canary image and generates one token; an embedding model embeds one text and the
//! canary image. `/ready` answers 200 only once every model has warmed up.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::{ImageFormat, Rgb, RgbImage};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::chat::{self, HeaderOptions};
use super::error::ApiError;
use super::{off_runtime, AppState, ChatServing, EmbedServing, Served};
use crate::config::DebugConfig;
use crate::engine::{EngineError, Event, TestHook};

/// Warms the loaded model `name` up, then marks it warm for `/ready`; an
/// error says why it could not answer its canary request.
pub async fn warm_up(state: &AppState, name: &str, debug: &DebugConfig) -> Result<(), ApiError> {
    let slot = state.models.iter().find(|m| m.name == name);
    let Some(served) = slot.and_then(|m| m.served.get()) else {
        return Err(ApiError::internal(format!(
            "the model `{name}` is not loaded"
        )));
    };
    if !debug.warmup_gate.is_empty() {
        wait_for(Path::new(&debug.warmup_gate)).await;
    }
    let started = Instant::now();
    match served {
        Served::Chat(c) => warm_chat(c, name, hook(&debug.warmup_hook)?).await?,
        Served::Embed(e) => warm_embed(e, name).await?,
    }
    state.mark_warm(name);
    tracing::info!(
        model = %name,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "warm-up done"
    );
    Ok(())
}

/// The `[debug] warmup_hook` setting, if any.
fn hook(name: &str) -> Result<Option<TestHook>, ApiError> {
    if name.is_empty() {
        return Ok(None);
    }
    TestHook::parse(name)
        .map(Some)
        .ok_or_else(|| ApiError::internal(format!("unknown debug.warmup_hook `{name}`")))
}

/// Polls until `gate` exists (tests hold the warm-up this way).
async fn wait_for(gate: &Path) {
    tracing::info!(gate = %gate.display(), "warm-up held until the gate file exists");
    while !gate.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One canary image, one generated token.
async fn warm_chat(c: &ChatServing, name: &str, hook: Option<TestHook>) -> Result<(), ApiError> {
    let req = parse(json!({
        "model": name,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": canary_data_url()}},
            {"type": "text", "text": "What is in this image?"},
        ]}],
        "max_tokens": 1,
        "temperature": 0,
    }))?;
    let validator = Arc::clone(&c.validator);
    let valid = off_runtime(move || validator.validate_chat(&req)).await?;
    // Every engine of the pool (one per device) runs the canary.
    for member in c.engine.members() {
        let opts = HeaderOptions {
            deadline: None,
            hook,
        };
        let (reqs, receivers) = chat::engine_requests(&valid, opts);
        member.handle.submit_all(reqs)?;
        for mut rx in receivers {
            loop {
                match rx.recv().await {
                    Some(Event::Token { .. }) => {}
                    Some(Event::Finished { .. }) => break,
                    Some(Event::Failed(e)) => return Err(e.into()),
                    None => return Err(EngineError::Stopped.into()),
                }
            }
        }
    }
    Ok(())
}

/// One text and the canary image.
async fn warm_embed(e: &EmbedServing, name: &str) -> Result<(), ApiError> {
    let req = parse(json!({
        "model": name,
        "input": [
            "a small test picture",
            {"type": "image_url", "image_url": {"url": canary_data_url()}},
        ],
    }))?;
    let validator = Arc::clone(&e.validator);
    let valid = off_runtime(move || validator.validate(req)).await?;
    e.engine.embed(valid.inputs).await?;
    Ok(())
}

fn parse<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("the canary request: {e}")))
}

/// A 64×64 PNG gradient, as a data URL.
fn canary_data_url() -> String {
    let img = RgbImage::from_fn(64, 64, |x, y| {
        Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let mut png = Vec::new();
    // Encoding a small in-memory image cannot fail short of running out of memory.
    let _ = img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}
