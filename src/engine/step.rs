//! One step of continuous batching, with fault isolation: plan, encode the
//! admitted sequences' images in one vision batch, run one batched forward over
//! every running sequence, and hand each sequence its logits.
//!
//! An error or a panic in a batched call fails only the sequences that cause
//! it: the batch is retried one sequence at a time and each sequence keeps its
//! own result. The retry is exact because the vision tower is stateless and the
//! KV cache commits a step's keys only after the whole step succeeded
//! (`model::kv_cache`), so a failed step leaves every sequence as it was.

use candle_core::Tensor;

use super::core::EngineCore;
use super::scheduler;
use super::sequence::{Progress, Sequence, TextTools};
use super::{guarded, EngineError, TestHook};
use crate::model::{ImageInput, StepInput};

/// The fault a test asked for, if any sequence of a batch carries one.
fn injected(seqs: &[&Sequence]) -> Result<(), EngineError> {
    for s in seqs {
        match s.hook {
            Some(TestHook::FailForward) => {
                return Err(EngineError::Model("test hook: forward failed".into()))
            }
            Some(TestHook::PanicForward) => panic!("test hook: forward panicked"),
            _ => {}
        }
    }
    Ok(())
}

impl EngineCore {
    /// One step of continuous batching.
    pub(super) fn step(&mut self) {
        let lens: Vec<usize> = self.waiting.iter().map(|s| s.prompt.len()).collect();
        let plan = scheduler::plan(&self.sched, &lens, self.running.len());
        if plan.is_empty() {
            return;
        }
        let mut admitted: Vec<Sequence> = self.waiting.drain(..plan.admit).collect();
        self.load.release(admitted.len());
        let new_embeds = self.encode_admitted(&mut admitted);
        // Image rows aligned with `running`: none for sequences already prefilled.
        let mut embeds: Vec<Option<Tensor>> = vec![None; self.running.len()];
        embeds.extend(new_embeds);
        self.running.append(&mut admitted);
        if self.running.is_empty() {
            return;
        }
        let all: Vec<usize> = (0..self.running.len()).collect();
        let rows = match self.forward(&all, &embeds) {
            Ok(rows) => rows.into_iter().map(Some).collect(),
            Err(err) if self.running.len() > 1 => {
                tracing::warn!(error = %err, batch = self.running.len(),
                    "batched forward failed; retrying each sequence alone");
                self.forward_each(&embeds)
            }
            Err(err) => {
                self.running[0].fail(err);
                vec![None]
            }
        };
        self.advance_all(rows);
    }

    /// Encodes the admitted sequences' images, together, or one sequence at a
    /// time if the batch fails; a sequence whose images fail is failed and
    /// removed. Returns each remaining sequence's image rows, if any.
    fn encode_admitted(&self, admitted: &mut Vec<Sequence>) -> Vec<Option<Tensor>> {
        let rows = match guarded(|| self.encode_images(admitted.as_slice())) {
            Ok(rows) => rows,
            Err(err) if admitted.len() > 1 => {
                tracing::warn!(error = %err, "image batch failed; encoding each request alone");
                let each: Vec<_> = (0..admitted.len())
                    .map(|i| guarded(|| self.encode_images(&admitted[i..=i])))
                    .collect();
                let mut rows = Vec::with_capacity(admitted.len());
                let mut kept = Vec::with_capacity(admitted.len());
                for (mut seq, r) in admitted.drain(..).zip(each) {
                    match r.map(|mut v| v.pop().flatten()) {
                        Ok(r) => {
                            rows.push(r);
                            kept.push(seq);
                        }
                        Err(e) => {
                            seq.fail(e);
                        }
                    }
                }
                *admitted = kept;
                rows
            }
            Err(err) => {
                for seq in admitted.iter_mut() {
                    seq.fail(err.clone());
                }
                admitted.clear();
                Vec::new()
            }
        };
        // The pixels are no longer needed once encoded.
        admitted.iter_mut().for_each(|s| s.images.clear());
        rows
    }

    /// Encodes `seqs`' images in one vision batch; returns each sequence's
    /// image rows (its image tokens, hidden), if it has images.
    fn encode_images(&self, seqs: &[Sequence]) -> Result<Vec<Option<Tensor>>, EngineError> {
        let images: Vec<&ImageInput> = seqs.iter().flat_map(|s| s.images.iter()).collect();
        if images.is_empty() {
            return Ok(vec![None; seqs.len()]);
        }
        let err = |e: String| EngineError::Model(e);
        // One (tokens_i, hidden) tensor per image, in order.
        let mut rows = self
            .model
            .encode_images(&images)
            .map_err(|e| err(e.to_string()))?
            .into_iter();
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            if s.images.is_empty() {
                out.push(None);
                continue;
            }
            let mine: Vec<Tensor> = rows.by_ref().take(s.images.len()).collect();
            // (sum of tokens_i, hidden)
            let cat = Tensor::cat(&mine, 0).map_err(|e| err(e.to_string()))?;
            out.push(Some(cat));
        }
        Ok(out)
    }

    /// Runs one batched forward over the running sequences `which`; returns
    /// each one's last-token logits row.
    fn forward(
        &mut self,
        which: &[usize],
        embeds: &[Option<Tensor>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let seqs: Vec<&Sequence> = which.iter().map(|&i| &self.running[i]).collect();
        let inputs: Vec<StepInput<'_>> = which
            .iter()
            .zip(&seqs)
            .map(|(&i, s)| StepInput {
                seq_id: s.id,
                tokens: s.next_input(),
                start_pos: s.cached,
                image_grids: &s.grids,
                image_embeds: embeds.get(i).and_then(|e| e.as_ref()),
            })
            .collect();
        let (model, cache) = (&self.model, &mut self.cache);
        guarded(|| {
            injected(&seqs)?;
            let err = |e: String| EngineError::Model(e);
            // (batch, vocab)
            let logits = model
                .forward(&inputs, cache)
                .map_err(|e| err(e.to_string()))?;
            logits.to_vec2::<f32>().map_err(|e| err(e.to_string()))
        })
    }

    /// Runs every running sequence alone; a sequence that fails alone is
    /// failed, the others get their rows.
    fn forward_each(&mut self, embeds: &[Option<Tensor>]) -> Vec<Option<Vec<f32>>> {
        (0..self.running.len())
            .map(|i| match self.forward(&[i], embeds) {
                Ok(mut rows) => rows.pop(),
                Err(err) => {
                    self.running[i].fail(err);
                    None
                }
            })
            .collect()
    }

    /// Samples each sequence's next token from its row; a sequence without a
    /// row has failed. Finished, failed and abandoned sequences free their
    /// KV memory.
    fn advance_all(&mut self, rows: Vec<Option<Vec<f32>>>) {
        let text = TextTools {
            tokenizer: &self.tokenizer,
            table: &self.tokens,
        };
        let eos = &self.eos;
        let mut gone = 0;
        let mut still = Vec::with_capacity(self.running.len());
        for (mut seq, row) in self.running.drain(..).zip(rows) {
            let progress = match row {
                Some(row) => {
                    guarded(|| Ok(seq.advance(&row, eos, &text))).unwrap_or_else(|e| seq.fail(e))
                }
                None => Progress::Finished,
            };
            match progress {
                Progress::Running => still.push(seq),
                Progress::Finished => self.cache.remove(seq.id),
                Progress::Abandoned => {
                    gone += 1;
                    self.cache.remove(seq.id);
                }
            }
        }
        self.running = still;
        self.load.cancelled(gone);
    }
}
