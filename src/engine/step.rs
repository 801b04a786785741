//! One step of continuous batching, with fault isolation: plan (see
//! `scheduler.rs`), preempt and admit as planned, encode the images of
//! sequences starting their prefill in one vision batch, run one batched
//! forward over every scheduled chunk, and hand each sequence whose chunk
//! completes it its logits. Images already in the image cache (see
//! `image_cache.rs`) skip the encoder.
//!
//! An error or a panic in a batched call fails only the sequences that cause
//! it: the batch is retried one sequence at a time and each sequence keeps its
//! own result. The retry is exact because the vision tower is stateless and the
//! KV cache commits a step's keys only after the whole step succeeded
//! (`model::kv_cache`), so a failed step leaves every sequence as it was.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::Tensor;

use super::core::EngineCore;
use super::scheduler::{self, Blocks, Plan, SeqState};
use super::sequence::{Progress, Sequence, TextTools};
use super::{guarded, EngineError, TestHook};
use crate::metrics::observe;
use crate::model::{KeyedImage, StepInput};

/// How long a forward with a `slow-forward` test hook sleeps first.
const SLOW_FORWARD: std::time::Duration = std::time::Duration::from_millis(20);

/// The fault a test asked for, if any sequence of a batch carries one.
fn injected(seqs: &[&Sequence]) -> Result<(), EngineError> {
    for s in seqs {
        match s.hook {
            Some(TestHook::FailForward) => {
                return Err(EngineError::Model("test hook: forward failed".into()))
            }
            Some(TestHook::PanicForward) => panic!("test hook: forward panicked"),
            Some(TestHook::SlowForward) => std::thread::sleep(SLOW_FORWARD),
            _ => {}
        }
    }
    Ok(())
}

impl EngineCore {
    /// One step of continuous batching.
    pub(super) fn step(&mut self) {
        let plan = self.plan();
        let mut chunks = self.preempt(&plan);
        if plan.reject_head {
            self.reject_head();
        }
        self.admit(&plan.admit, &mut chunks);
        let failed = self.encode_new(&chunks);
        self.drop_failed(&mut chunks, &failed);
        // (running index, tokens fed) of every scheduled sequence.
        let image_token = self.model.image_token_id();
        let fed: Vec<(usize, usize)> = (0..self.running.len())
            .filter(|&i| chunks[i] > 0)
            .map(|i| (i, self.running[i].chunk(chunks[i], image_token).0.len()))
            .collect();
        if fed.is_empty() {
            return;
        }
        self.metrics.batch_size.observe(fed.len() as f64);
        let rows = match self.forward(&fed) {
            Ok(rows) => rows.into_iter().map(Some).collect(),
            Err(err) if fed.len() > 1 => {
                tracing::warn!(error = %err, batch = fed.len(),
                    "batched forward failed; retrying each sequence alone");
                self.forward_each(&fed)
            }
            Err(err) => {
                self.running[fed[0].0].fail(err);
                vec![None]
            }
        };
        self.advance_all(&fed, rows);
    }

    fn plan(&self) -> Plan {
        let kv = self.cache.kv();
        let blocks = Blocks {
            block_size: kv.block_size(),
            free: kv.free_blocks(),
            total: kv.num_blocks(),
        };
        let running: Vec<SeqState> = self
            .running
            .iter()
            .map(|s| SeqState {
                cached: s.cached,
                uncached: s.uncached(),
                frees: kv.sole_blocks(s.id),
                revives: 0,
                encoder: 0,
            })
            .collect();
        // No more than `max_num_seqs` of the queue can be admitted in one step.
        let mut queued = HashSet::new();
        let waiting: Vec<SeqState> = self
            .waiting
            .iter()
            .take(self.sched.max_num_seqs)
            .map(|s| self.waiting_state(s, &mut queued))
            .collect();
        scheduler::plan(&self.sched, blocks, &running, &waiting)
    }

    /// Frees the preempted sequences' blocks and puts them back at the head of
    /// the queue, in arrival order; returns the chunk of each remaining running
    /// sequence.
    fn preempt(&mut self, plan: &Plan) -> Vec<usize> {
        let mut chunks = Vec::with_capacity(self.running.len());
        let mut kept = Vec::with_capacity(self.running.len());
        let mut out = Vec::new();
        for (i, mut seq) in self.running.drain(..).enumerate() {
            if plan.preempt.contains(&i) {
                self.cache.remove(seq.id);
                seq.preempt();
                out.push(seq);
            } else {
                chunks.push(plan.tokens.get(i).copied().unwrap_or(0));
                kept.push(seq);
            }
        }
        self.running = kept;
        if !out.is_empty() {
            tracing::debug!(
                preempted = out.len(),
                "KV cache full: preempting the newest"
            );
            self.load.requeued(out.len());
        }
        for seq in out.into_iter().rev() {
            self.waiting.push_front(seq);
        }
        chunks
    }

    /// The head of the queue can never fit the KV cache: it ends (with what it
    /// generated before a preemption, if anything).
    fn reject_head(&mut self) {
        let Some(mut seq) = self.waiting.pop_front() else {
            return;
        };
        self.load.release(1);
        if seq.output().is_empty() {
            seq.fail(EngineError::Model(format!(
                "the sequence needs {} tokens of KV cache, more than the whole cache holds",
                seq.tokens.len()
            )));
        } else {
            let text = TextTools {
                tokenizer: &self.tokenizer,
                table: &self.tokens,
            };
            seq.cut(&text);
        }
    }

    /// Moves the admitted sequences from the queue to the running batch.
    fn admit(&mut self, first_chunks: &[usize], chunks: &mut Vec<usize>) {
        let n = first_chunks.len().min(self.waiting.len());
        for s in self.waiting.range_mut(..n) {
            if let Some(t) = s.submitted.take() {
                observe(&self.metrics.queue_time, t.elapsed());
            }
        }
        let first = self.running.len();
        self.running.extend(self.waiting.drain(..n));
        self.load.release(n);
        for (i, &chunk) in (first..).zip(&first_chunks[..n]) {
            self.attach_prefix(i);
            chunks.push(chunk.min(self.running[i].uncached()));
        }
    }

    /// Removes the running sequences marked failed (already told so).
    fn drop_failed(&mut self, chunks: &mut Vec<usize>, failed: &[bool]) {
        if !failed.contains(&true) {
            return;
        }
        let mut i = 0;
        self.running.retain(|_| {
            i += 1;
            !failed[i - 1]
        });
        let mut i = 0;
        chunks.retain(|_| {
            i += 1;
            !failed[i - 1]
        });
    }

    /// Encodes the images of the scheduled sequences that need their rows
    /// (not all inside a cached prefix), together, or one sequence at a time if the batch fails. Returns which
    /// running sequences failed (and were told so).
    fn encode_new(&mut self, chunks: &[usize]) -> Vec<bool> {
        let mut failed = vec![false; self.running.len()];
        let image_token = self.model.image_token_id();
        let todo: Vec<usize> = (0..self.running.len())
            .filter(|&i| chunks[i] > 0 && self.running[i].needs_image_rows(image_token))
            .collect();
        if todo.is_empty() {
            return failed;
        }
        let results = match guarded(|| self.encode_images(&todo)) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(err) if todo.len() > 1 => {
                tracing::warn!(error = %err, "image batch failed; encoding each request alone");
                todo.iter()
                    .map(|&i| {
                        let one = guarded(|| self.encode_images(&[i]))?;
                        one.into_iter()
                            .next()
                            .ok_or_else(|| EngineError::Model("no image rows".into()))
                    })
                    .collect()
            }
            Err(err) => vec![Err(err)],
        };
        for (&i, result) in todo.iter().zip(results) {
            let seq = &mut self.running[i];
            match result {
                Ok(rows) => {
                    seq.image_rows = Some(rows);
                    // The pixels are no longer needed once encoded.
                    seq.images.clear();
                }
                Err(e) => {
                    seq.fail(e);
                    failed[i] = true;
                }
            }
        }
        failed
    }

    /// Encodes running sequences `which`' images in one vision batch, those
    /// not in the image cache; returns each one's image rows (its image tokens,
    /// hidden), checked against the image tokens of its prompt.
    fn encode_images(&mut self, which: &[usize]) -> Result<Vec<Tensor>, EngineError> {
        let seqs: Vec<&Sequence> = which.iter().map(|&i| &self.running[i]).collect();
        let images: Vec<&KeyedImage> = seqs.iter().flat_map(|s| s.images.iter()).collect();
        let err = |e: String| EngineError::Model(e);
        let (model, vision_time) = (&self.model, &self.metrics.vision_time);
        // One (tokens_i, hidden) tensor per image, in order.
        let mut rows = self
            .image_cache
            .rows(&images, |fresh| {
                let started = Instant::now();
                let rows = model.encode_images(fresh);
                observe(vision_time, started.elapsed());
                rows
            })
            .map_err(|e| err(e.to_string()))?
            .into_iter();
        let image_token = self.model.image_token_id();
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            let mine: Vec<Tensor> = rows.by_ref().take(s.images.len()).collect();
            // (sum of tokens_i, hidden)
            let cat = Tensor::cat(&mine, 0).map_err(|e| err(e.to_string()))?;
            let want = s.prompt().iter().filter(|&&t| t == image_token).count();
            if cat.dim(0).ok() != Some(want) {
                return Err(err(format!(
                    "{want} image tokens in the prompt but {:?} image rows",
                    cat.dims()
                )));
            }
            out.push(cat);
        }
        Ok(out)
    }

    /// Runs one batched forward over the chunks `fed` (running index, tokens);
    /// returns each one's last-token logits row.
    fn forward(&mut self, fed: &[(usize, usize)]) -> Result<Vec<Vec<f32>>, EngineError> {
        let image_token = self.model.image_token_id();
        let seqs: Vec<&Sequence> = fed.iter().map(|&(i, _)| &self.running[i]).collect();
        let chunks: Vec<(&[u32], Option<Tensor>)> = fed
            .iter()
            .zip(&seqs)
            .map(|(&(_, n), s)| s.chunk(n, image_token))
            .collect();
        let inputs: Vec<StepInput<'_>> = seqs
            .iter()
            .zip(&chunks)
            .map(|(s, (tokens, rows))| StepInput {
                seq_id: s.id,
                tokens,
                start_pos: s.cached,
                image_grids: &s.grids,
                image_embeds: rows.as_ref(),
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

    /// Runs every scheduled chunk alone; a sequence that fails alone is failed,
    /// the others get their rows.
    fn forward_each(&mut self, fed: &[(usize, usize)]) -> Vec<Option<Vec<f32>>> {
        fed.iter()
            .map(|&one| match self.forward(&[one]) {
                Ok(mut rows) => rows.pop(),
                Err(err) => {
                    self.running[one.0].fail(err);
                    None
                }
            })
            .collect()
    }

    /// Advances each scheduled sequence past its chunk and samples its next
    /// token when the chunk completed it; a sequence without a row has failed.
    /// Finished, failed and abandoned sequences free their KV blocks.
    fn advance_all(&mut self, fed: &[(usize, usize)], rows: Vec<Option<Vec<f32>>>) {
        let text = TextTools {
            tokenizer: &self.tokenizer,
            table: &self.tokens,
        };
        let eos = &self.eos;
        let mut outcome = vec![Progress::Running; self.running.len()];
        for (&(i, n), row) in fed.iter().zip(rows) {
            let seq = &mut self.running[i];
            outcome[i] = match row {
                Some(row) => {
                    let done = seq.completes(n);
                    seq.cached += n;
                    if done {
                        guarded(|| Ok(seq.advance(&row, eos, &text)))
                            .unwrap_or_else(|e| seq.fail(e))
                    } else {
                        Progress::Running
                    }
                }
                None => Progress::Finished,
            };
        }
        for &(i, _) in fed {
            self.register_blocks(i);
        }
        let mut gone = 0;
        let mut still = Vec::with_capacity(self.running.len());
        for (seq, progress) in self.running.drain(..).zip(outcome) {
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
