//! One generating sequence: its tokens, sampler, incremental detokenizer, stop
//! matcher and the channel its events go back on.

use std::time::Instant;

use crate::model::ImageInput;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::sampling::Sampler;
use super::{EngineError, EngineRequest, Event, FinishReason, TestHook, TokenLogprobs};
use crate::text::{IncrementalDetokenizer, StopMatcher, TokenTable};

pub struct Sequence {
    /// Key of this sequence's KV cache entry.
    pub id: u64,
    /// Prompt token ids, image placeholders already expanded.
    pub prompt: Vec<u32>,
    /// Preprocessed images still to be encoded; emptied at prefill.
    pub images: Vec<ImageInput>,
    /// Patch grids of the prompt's images, for families that need them.
    pub grids: Vec<[usize; 3]>,
    /// Generated token ids.
    pub output: Vec<u32>,
    /// Tokens already in the KV cache.
    pub cached: usize,
    /// When the request must be over (see [`EngineRequest::deadline`]).
    pub deadline: Option<Instant>,
    /// A fault or behaviour a test asked for.
    pub hook: Option<TestHook>,
    max_tokens: usize,
    logprobs: bool,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    events: UnboundedSender<Event>,
}

/// The tokenizer and its byte table, shared by all sequences.
pub struct TextTools<'a> {
    pub tokenizer: &'a Tokenizer,
    pub table: &'a TokenTable,
}

/// What happened to a sequence after one sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Running,
    Finished,
    /// The client is gone: drop the sequence silently.
    Abandoned,
}

impl Sequence {
    pub fn new(id: u64, req: EngineRequest) -> Self {
        Sequence {
            id,
            prompt: req.prompt_ids,
            grids: req.images.iter().filter_map(ImageInput::grid).collect(),
            images: req.images,
            output: Vec::new(),
            cached: 0,
            deadline: req.deadline,
            hook: req.hook,
            max_tokens: req.max_tokens,
            logprobs: req.sampling.logprobs,
            sampler: Sampler::new(&req.sampling),
            detok: IncrementalDetokenizer::new(true),
            stop: StopMatcher::new(req.stop),
            events: req.events,
        }
    }

    /// True when the client dropped its receiver.
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// True once the request's deadline has passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Ends a generating sequence whose deadline passed: the text so far, then
    /// `finish_reason: "length"`, as when `max_tokens` is reached.
    pub fn cut(&mut self, text: &TextTools<'_>) -> Progress {
        self.finish(FinishReason::Length, true, text.tokenizer)
    }

    /// Tokens this sequence feeds the model next: the whole prompt at prefill,
    /// else its last generated token.
    pub fn next_input(&self) -> &[u32] {
        if self.cached == 0 {
            &self.prompt
        } else {
            let n = self.output.len();
            &self.output[n.saturating_sub(1)..]
        }
    }

    /// Samples from this sequence's last-token logits, streams the text out and
    /// says whether the sequence goes on.
    pub fn advance(&mut self, logits: &[f32], eos: &[u32], text: &TextTools<'_>) -> Progress {
        self.cached += self.next_input().len();
        let sampled = match self.sampler.sample(logits, &self.output) {
            Ok(s) => s,
            Err(e) => return self.fail(EngineError::Model(format!("sampling failed: {e}"))),
        };
        let tok = text.tokenizer;
        self.output.push(sampled.token);
        if eos.contains(&sampled.token) && self.hook != Some(TestHook::IgnoreEos) {
            return self.finish(FinishReason::Stop, true, tok);
        }
        let piece = match self.detok.push(tok, text.table, sampled.token) {
            Ok(piece) => piece,
            Err(e) => return self.fail(EngineError::Detokenize(e.to_string())),
        };
        let outcome = self.stop.push(&piece);
        let logprobs = self.logprobs.then_some(TokenLogprobs {
            token: sampled.token,
            logprob: sampled.logprob,
            top: sampled.top_logprobs,
        });
        if !self.send(Event::Token {
            text: outcome.emit,
            logprobs,
        }) {
            return Progress::Abandoned;
        }
        if outcome.stopped {
            return self.finish(FinishReason::Stop, false, tok);
        }
        if self.output.len() >= self.max_tokens {
            return self.finish(FinishReason::Length, true, tok);
        }
        Progress::Running
    }

    /// Sends the final event, after the text held back by the detokenizer and
    /// the stop matcher unless a stop string ended the sequence.
    fn finish(&mut self, reason: FinishReason, flush: bool, tok: &Tokenizer) -> Progress {
        if flush {
            let tail = match self.detok.flush(tok) {
                Ok(t) => t,
                Err(e) => return self.fail(EngineError::Detokenize(e.to_string())),
            };
            let outcome = self.stop.push(&tail);
            let mut text = outcome.emit;
            if !outcome.stopped {
                text.push_str(&self.stop.flush());
            }
            if !text.is_empty() {
                self.send(Event::Token {
                    text,
                    logprobs: None,
                });
            }
        }
        self.send(Event::Finished {
            reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.output.len(),
        });
        Progress::Finished
    }

    /// Reports an error to the client; the sequence is over.
    pub fn fail(&mut self, err: EngineError) -> Progress {
        self.send(Event::Failed(err));
        Progress::Finished
    }

    fn send(&self, event: Event) -> bool {
        self.events.send(event).is_ok()
    }
}
