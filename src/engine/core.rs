//! The engine loop: receive commands, plan a step, encode the step's images in
//! one vision batch, run one batched forward over every scheduled sequence, and
//! hand each sequence its logits.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::scheduler::{self, SchedulerConfig};
use super::sequence::{Progress, Sequence, TextTools};
use super::{Command, EngineError};
use crate::model::ImageInput;
use crate::model::{ChatCache, ChatModel, StepInput};
use crate::text::TokenTable;

/// What the engine is built from.
pub struct EngineParts {
    pub model: ChatModel,
    pub tokenizer: Arc<Tokenizer>,
    /// Token bytes, for the incremental detokenizer.
    pub tokens: Arc<TokenTable>,
    /// Token ids that end a sequence (generation_config, config and tokenizer).
    pub eos_token_ids: Vec<u32>,
    pub scheduler: SchedulerConfig,
}

/// State owned by the engine thread alone.
pub struct EngineCore {
    model: ChatModel,
    cache: ChatCache,
    tokenizer: Arc<Tokenizer>,
    tokens: Arc<TokenTable>,
    eos: Vec<u32>,
    sched: SchedulerConfig,
    /// Submitted, not yet prefilled, in arrival order.
    waiting: VecDeque<Sequence>,
    /// Prefilled, generating.
    running: Vec<Sequence>,
    next_id: u64,
}

impl EngineCore {
    pub fn new(parts: EngineParts) -> Self {
        let cache = parts.model.new_cache();
        EngineCore {
            model: parts.model,
            cache,
            tokenizer: parts.tokenizer,
            tokens: parts.tokens,
            eos: parts.eos_token_ids,
            sched: parts.scheduler,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
        }
    }

    /// Runs until every handle is gone and no work is left.
    pub(super) fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.is_idle() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.drop_abandoned();
            self.step();
        }
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req) => {
                let id = self.next_id;
                self.next_id += 1;
                self.waiting.push_back(Sequence::new(id, *req));
            }
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
        }
    }

    /// Cancellation: a client that went away loses its sequence and KV memory.
    fn drop_abandoned(&mut self) {
        self.waiting.retain(|s| !s.is_abandoned());
        let cache = &mut self.cache;
        self.running.retain(|s| {
            let keep = !s.is_abandoned();
            if !keep {
                cache.remove(s.id);
            }
            keep
        });
    }

    /// One step of continuous batching.
    fn step(&mut self) {
        let lens: Vec<usize> = self.waiting.iter().map(|s| s.prompt.len()).collect();
        let plan = scheduler::plan(&self.sched, &lens, self.running.len());
        if plan.is_empty() {
            return;
        }
        let mut admitted: Vec<Sequence> = self.waiting.drain(..plan.admit).collect();
        let embeds = match self.encode_images(&mut admitted) {
            Ok(e) => e,
            Err(err) => {
                // Only the new sequences carried the images; the running ones go on.
                for seq in &mut admitted {
                    seq.fail(err.clone());
                }
                admitted.clear();
                Vec::new()
            }
        };
        self.running.append(&mut admitted);
        if self.running.is_empty() {
            return;
        }
        let first_new = self.running.len() - embeds.len();
        match self.forward(first_new, &embeds) {
            Ok(rows) => self.advance_all(&rows),
            Err(err) => self.fail_all(err),
        }
    }

    /// Encodes the admitted sequences' images together; returns each admitted
    /// sequence's image rows (its image tokens, hidden), if any.
    fn encode_images(&self, admitted: &mut [Sequence]) -> Result<Vec<Option<Tensor>>, EngineError> {
        let counts: Vec<usize> = admitted.iter().map(|s| s.images.len()).collect();
        let images: Vec<ImageInput> = admitted
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.images))
            .collect();
        if images.is_empty() {
            return Ok(vec![None; admitted.len()]);
        }
        let err = |e: String| EngineError::Model(e);
        let refs: Vec<&ImageInput> = images.iter().collect();
        // One (tokens_i, hidden) tensor per image, in order.
        let mut rows = self
            .model
            .encode_images(&refs)
            .map_err(|e| err(e.to_string()))?
            .into_iter();
        let mut out = Vec::with_capacity(counts.len());
        for n in counts {
            if n == 0 {
                out.push(None);
                continue;
            }
            let mine: Vec<Tensor> = rows.by_ref().take(n).collect();
            // (sum of tokens_i, hidden)
            let cat = Tensor::cat(&mine, 0).map_err(|e| err(e.to_string()))?;
            out.push(Some(cat));
        }
        Ok(out)
    }

    /// Runs the batched forward; returns each running sequence's logits row.
    fn forward(
        &mut self,
        first_new: usize,
        embeds: &[Option<Tensor>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let inputs: Vec<StepInput<'_>> = self
            .running
            .iter()
            .enumerate()
            .map(|(i, s)| StepInput {
                seq_id: s.id,
                tokens: s.next_input(),
                start_pos: s.cached,
                image_grids: &s.grids,
                image_embeds: i
                    .checked_sub(first_new)
                    .and_then(|j| embeds.get(j))
                    .and_then(|e| e.as_ref()),
            })
            .collect();
        let logits = self
            .model
            .forward(&inputs, &mut self.cache)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        logits
            .to_vec2::<f32>()
            .map_err(|e| EngineError::Model(e.to_string()))
    }

    fn advance_all(&mut self, rows: &[Vec<f32>]) {
        let text = TextTools {
            tokenizer: &self.tokenizer,
            table: &self.tokens,
        };
        let mut still = Vec::with_capacity(self.running.len());
        for (mut seq, row) in self.running.drain(..).zip(rows) {
            match seq.advance(row, &self.eos, &text) {
                Progress::Running => still.push(seq),
                Progress::Finished | Progress::Abandoned => self.cache.remove(seq.id),
            }
        }
        self.running = still;
    }

    /// A failed forward fails every sequence in it; the engine keeps serving.
    fn fail_all(&mut self, err: EngineError) {
        tracing::error!(error = %err, "batch failed");
        for mut seq in self.running.drain(..) {
            seq.fail(err.clone());
            self.cache.remove(seq.id);
        }
    }
}
