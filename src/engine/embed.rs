//! The embedding engine: one thread that owns a contrastive model (CLIP,
//! SigLIP) and encodes the inputs of every waiting request together — texts in
//! one batch, images in another — then hands each request its vectors.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::{guarded, AliveGuard, EngineError, EngineLoad, EngineStats};
use crate::model::embed::EmbeddingModel;

/// One input to embed.
pub enum EmbedInput {
    /// Token ids, already truncated and padded as the model expects.
    Text(Vec<u32>),
    /// Preprocessed pixels, (3, H, W) f32.
    Image(Tensor),
}

/// A request's inputs and where its vectors go (in input order).
pub struct EmbedJob {
    pub inputs: Vec<EmbedInput>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
}

enum Command {
    Embed(EmbedJob),
}

/// Cloneable async-side handle to an embedding engine thread.
#[derive(Clone)]
pub struct EmbedHandle {
    tx: mpsc::Sender<Command>,
    /// Requests in flight (counted as waiting), bounded like a chat queue.
    load: Arc<EngineLoad>,
}

/// Gives a request's place in the queue back when it ends or is cancelled.
struct Place<'a>(&'a EngineLoad);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.release(1);
    }
}

impl EmbedHandle {
    /// Starts the thread; `max_batch` bounds the inputs of one forward pass,
    /// `max_waiting` the requests in flight.
    pub fn spawn(
        model: EmbeddingModel,
        max_batch: usize,
        max_waiting: usize,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(EngineLoad::new(max_waiting));
        let alive = AliveGuard(Arc::clone(&load));
        let join = std::thread::Builder::new()
            .name("mmserve-embed".into())
            .spawn(move || {
                let _alive = alive;
                run(&model, max_batch.max(1), &rx)
            })?;
        Ok((EmbedHandle { tx, load }, join))
    }

    /// Embeds a request's inputs; they are batched with other requests'.
    /// [`EngineError::QueueFull`] when too many requests are in flight.
    pub async fn embed(&self, inputs: Vec<EmbedInput>) -> Result<Vec<Vec<f32>>, EngineError> {
        if !self.load.try_reserve(1) {
            return Err(EngineError::QueueFull);
        }
        let _place = Place(&self.load);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Embed(EmbedJob { inputs, reply }))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Requests in flight, as `waiting`.
    pub fn stats(&self) -> EngineStats {
        self.load.stats()
    }

    /// False once the engine thread has ended.
    pub fn is_alive(&self) -> bool {
        self.load.is_alive()
    }
}

fn run(model: &EmbeddingModel, max_batch: usize, rx: &Receiver<Command>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = Vec::new();
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            let Command::Embed(job) = cmd;
            jobs.push(job);
            next = rx.try_recv().ok();
        }
        // A client that went away is not computed for.
        jobs.retain(|j| !j.reply.is_closed());
        if !jobs.is_empty() {
            step(model, max_batch, jobs);
        }
    }
}

/// Embeds every input of `jobs`, texts together and images together.
fn step(model: &EmbeddingModel, max_batch: usize, jobs: Vec<EmbedJob>) {
    let mut texts = Vec::new();
    let mut images = Vec::new();
    // Where each input's vector goes: (job, position in the job).
    let mut text_slots = Vec::new();
    let mut image_slots = Vec::new();
    let mut replies = Vec::with_capacity(jobs.len());
    let mut outputs: Vec<Vec<Vec<f32>>> = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.into_iter().enumerate() {
        outputs.push(vec![Vec::new(); job.inputs.len()]);
        for (k, input) in job.inputs.into_iter().enumerate() {
            match input {
                EmbedInput::Text(ids) => {
                    texts.push(ids);
                    text_slots.push((j, k));
                }
                EmbedInput::Image(px) => {
                    images.push(px);
                    image_slots.push((j, k));
                }
            }
        }
        replies.push(job.reply);
    }
    let result = guarded(|| embed_all(model, max_batch, &texts, &images)).map(|(t, i)| {
        for ((j, k), v) in text_slots.into_iter().zip(t) {
            outputs[j][k] = v;
        }
        for ((j, k), v) in image_slots.into_iter().zip(i) {
            outputs[j][k] = v;
        }
        outputs
    });
    match result {
        Ok(outputs) => {
            for (reply, out) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "embedding batch failed");
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

type Vectors = Vec<Vec<f32>>;

fn embed_all(
    model: &EmbeddingModel,
    max_batch: usize,
    texts: &[Vec<u32>],
    images: &[Tensor],
) -> Result<(Vectors, Vectors), EngineError> {
    let err = |e: String| EngineError::Model(e);
    let mut text_vecs = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(max_batch) {
        // (n, dim)
        let v = model.embed_texts(chunk).map_err(|e| err(e.to_string()))?;
        text_vecs.extend(v.to_vec2::<f32>().map_err(|e| err(e.to_string()))?);
    }
    let mut image_vecs = Vec::with_capacity(images.len());
    for chunk in images.chunks(max_batch) {
        // (n, 3, H, W)
        let px = Tensor::stack(chunk, 0).map_err(|e| err(e.to_string()))?;
        // (n, dim)
        let v = model.embed_images(&px).map_err(|e| err(e.to_string()))?;
        image_vecs.extend(v.to_vec2::<f32>().map_err(|e| err(e.to_string()))?);
    }
    Ok((text_vecs, image_vecs))
}
