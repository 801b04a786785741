//! One generating sequence: its tokens (prompt, then generated), how many of them
//! are in the KV cache, its image rows, sampler, incremental detokenizer, stop
//! matcher and the channel its events go back on.

use std::time::Instant;

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::model::{BlockHash, ImageKey, KeyedImage};
use tokio::sync::mpsc::UnboundedSender;

use super::sampling::Sampler;
use super::{EngineError, EngineRequest, Event, FinishReason, TestHook, TokenLogprobs};
use crate::text::{IncrementalDetokenizer, StopMatcher, StopOutcome, TokenTable};

pub struct Sequence {
    /// Key of this sequence's KV cache entry.
    pub id: u64,
    /// Prompt token ids (image placeholders already expanded), then the generated ones.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt.
    prompt_len: usize,
    /// Preprocessed images still to be encoded (or found in the image cache);
    /// emptied once their rows are in `image_rows`.
    pub images: Vec<KeyedImage>,
    /// The encoder's rows for every image token of the prompt, (n, hidden), kept for the
    /// sequence's life: a preempted sequence is recomputed from them.
    pub image_rows: Option<Tensor>,
    /// Patch grids of the prompt's images, for families that need them.
    pub grids: Vec<[usize; 3]>,
    /// Where the prompt's images start and their keys (prefix caching).
    image_keys: Vec<(usize, ImageKey)>,
    /// Hash chain of the full blocks of `tokens` made so far (see `prefix`).
    pub hashes: Vec<BlockHash>,
    /// Leading `tokens` in the KV cache.
    pub cached: usize,
    /// When the request must be over (see [`EngineRequest::deadline`]).
    pub deadline: Option<Instant>,
    /// A fault or behaviour a test asked for.
    pub hook: Option<TestHook>,
    /// When the engine received it; taken at its first admission, so a
    /// preempted sequence's queue time counts once.
    pub submitted: Option<Instant>,
    max_tokens: usize,
    /// Tokens generated before EOS or a stop string may end the sequence.
    min_tokens: usize,
    /// Whether EOS is just another token.
    ignore_eos: bool,
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
            prompt_len: req.prompt_ids.len(),
            tokens: req.prompt_ids,
            grids: req.images.iter().filter_map(|i| i.input.grid()).collect(),
            image_keys: req
                .image_starts
                .iter()
                .copied()
                .zip(req.images.iter().map(|i| i.key))
                .collect(),
            images: req.images,
            hashes: Vec::new(),
            image_rows: None,
            cached: 0,
            deadline: req.deadline,
            hook: req.hook,
            submitted: Some(Instant::now()),
            max_tokens: req.max_tokens,
            min_tokens: req.min_tokens,
            ignore_eos: req.ignore_eos,
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

    /// Prompt token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// Generated token ids.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Known tokens not yet in the KV cache: the prompt before prefill, the last
    /// generated token while decoding, everything after a preemption.
    pub fn uncached(&self) -> usize {
        self.tokens.len() - self.cached
    }

    /// Whether this step's chunk brings the cache up to date, so its logits are
    /// sampled (a mid-prompt chunk's are not).
    pub fn completes(&self, chunk: usize) -> bool {
        self.cached + chunk == self.tokens.len()
    }

    /// The next `n` uncached tokens, and the image rows of the prompt's image
    /// tokens among them (`image_token`), which may start or end inside an image.
    /// A chunk that would mix prompt image rows with generated image tokens (only
    /// when recomputing after a preemption) stops at the end of the prompt: the
    /// generated ones embed as plain tokens, as when they were decoded.
    pub fn chunk(&self, n: usize, image_token: u32) -> (&[u32], Option<Tensor>) {
        let (start, mut end) = (self.cached, (self.cached + n).min(self.tokens.len()));
        let Some(rows) = self.image_rows.as_ref().filter(|_| start < self.prompt_len) else {
            return (&self.tokens[start..end], None);
        };
        let count = |ids: &[u32]| ids.iter().filter(|&&t| t == image_token).count();
        let prompt_end = self.prompt_len.clamp(start, end);
        if prompt_end > start && count(&self.tokens[prompt_end..end]) > 0 {
            end = prompt_end;
        }
        let before = count(&self.tokens[..start]);
        let here = count(&self.tokens[start..prompt_end]);
        let rows = (here > 0)
            .then(|| rows.narrow(0, before, here).ok())
            .flatten();
        (&self.tokens[start..end], rows)
    }

    /// Extends [`Self::hashes`] to every full block of `tokens`.
    pub fn extend_hashes(&mut self, block_size: usize) {
        super::prefix::extend_chain(&mut self.hashes, &self.tokens, &self.image_keys, block_size);
    }

    /// The hashes of the full blocks a prefix-cache hit may cover: never the block of the last
    /// known token, which must be computed for its logits.
    pub fn reusable_hashes(&self, block_size: usize) -> &[BlockHash] {
        let n = self.tokens.len().saturating_sub(1) / block_size.max(1);
        &self.hashes[..n.min(self.hashes.len())]
    }

    /// Whether an image row of the prompt lies past the cached tokens, so the images must be
    /// encoded (they need not be when a cached prefix holds them all).
    pub fn needs_image_rows(&self, image_token: u32) -> bool {
        self.encoder_tokens(image_token, self.cached) > 0
    }

    /// The prompt's image tokens when its images must be encoded with the first `cached`
    /// tokens in the KV cache, else 0.
    pub fn encoder_tokens(&self, image_token: u32, cached: usize) -> usize {
        let prompt = self.prompt();
        let needed = self.image_rows.is_none()
            && !self.images.is_empty()
            && prompt
                .iter()
                .rposition(|&t| t == image_token)
                .is_some_and(|last| last >= cached);
        if needed {
            prompt.iter().filter(|&&t| t == image_token).count()
        } else {
            0
        }
    }

    /// Drops the sequence's place in the KV cache: it will be recomputed from
    /// its tokens, with the client's stream carrying on where it was.
    pub fn preempt(&mut self) {
        self.cached = 0;
    }

    /// Samples from this sequence's last-token logits, streams the text out and
    /// says whether the sequence goes on.
    pub fn advance(&mut self, logits: &[f32], eos: &[u32], text: &TextTools<'_>) -> Progress {
        // Before `min_tokens`, EOS cannot be drawn (vLLM masks it the same way).
        let banned = if self.output().len() < self.min_tokens {
            eos
        } else {
            &[]
        };
        let sampled = match self
            .sampler
            .sample(logits, &self.tokens[self.prompt_len..], banned)
        {
            Ok(s) => s,
            Err(e) => return self.fail(EngineError::Model(format!("sampling failed: {e}"))),
        };
        let tok = text.tokenizer;
        self.tokens.push(sampled.token);
        if eos.contains(&sampled.token) && !self.ignore_eos {
            return self.finish(FinishReason::Stop, true, tok);
        }
        let piece = match self.detok.push(tok, text.table, sampled.token) {
            Ok(piece) => piece,
            Err(e) => return self.fail(EngineError::Detokenize(e.to_string())),
        };
        let outcome = self.stop_check(&piece);
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
        if self.output().len() >= self.max_tokens {
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
            let outcome = self.stop_check(&tail);
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
            prompt_tokens: self.prompt_len,
            completion_tokens: self.output().len(),
        });
        Progress::Finished
    }

    /// Pushes new text through the stop matcher; text of the first `min_tokens`
    /// tokens holds no stop of its own (vLLM's rule).
    fn stop_check(&mut self, text: &str) -> StopOutcome {
        if self.output().len() > self.min_tokens {
            self.stop.push(text)
        } else {
            self.stop.push_unchecked(text)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageInput;
    use candle_core::Device;

    const IMG: u32 = 9;

    /// A sequence with `prompt` whose image tokens have rows 0, 1, 2, ... (row `i` is all `i`),
    /// and `generated` tokens after it.
    fn seq(prompt: &[u32], generated: &[u32]) -> Sequence {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Sequence::new(
            1,
            EngineRequest {
                prompt_ids: prompt.to_vec(),
                images: vec![],
                image_starts: vec![],
                sampling: Default::default(),
                max_tokens: 100,
                min_tokens: 0,
                ignore_eos: false,
                stop: vec![],
                events,
                deadline: None,
                hook: None,
            },
        );
        let n = prompt.iter().filter(|&&t| t == IMG).count();
        let rows: Vec<f32> = (0..n).flat_map(|i| [i as f32; 2]).collect();
        s.image_rows = Tensor::from_vec(rows, (n, 2), &Device::Cpu).ok();
        s.tokens.extend_from_slice(generated);
        s
    }

    fn rows(chunk: (&[u32], Option<Tensor>)) -> (Vec<u32>, Vec<f32>) {
        let ids = chunk.0.to_vec();
        let rows = chunk.1.map_or(vec![], |t| {
            t.narrow(1, 0, 1)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .unwrap_or_default()
        });
        (ids, rows)
    }

    #[test]
    fn a_chunk_may_split_an_image_and_takes_its_rows() {
        let mut s = seq(&[1, IMG, IMG, IMG, 2, IMG, 3], &[]);
        assert_eq!(rows(s.chunk(3, IMG)), (vec![1, IMG, IMG], vec![0., 1.]));
        s.cached = 3;
        assert_eq!(rows(s.chunk(3, IMG)), (vec![IMG, 2, IMG], vec![2., 3.]));
        s.cached = 6;
        assert_eq!(rows(s.chunk(3, IMG)), (vec![3], vec![]));
        assert!(s.completes(1) && !s.completes(0));
    }

    #[test]
    fn a_recomputed_chunk_stops_before_a_generated_image_token() {
        // Preempted after generating [4, IMG, 5]: the generated image token was decoded as a
        // plain token, so it must not take (or be counted against) the prompt's image rows.
        let mut s = seq(&[1, IMG, 2], &[4, IMG, 5]);
        assert_eq!(s.uncached(), 6);
        assert_eq!(rows(s.chunk(6, IMG)), (vec![1, IMG, 2], vec![0.]));
        s.cached = 3;
        assert_eq!(rows(s.chunk(6, IMG)), (vec![4, IMG, 5], vec![]));
        // Without a generated image token the chunk runs on past the prompt.
        let s = seq(&[1, IMG, 2], &[4, 5]);
        assert_eq!(rows(s.chunk(5, IMG)), (vec![1, IMG, 2, 4, 5], vec![0.]));
    }

    #[test]
    fn images_inside_the_cached_prefix_need_no_encoding() {
        let mut s = seq(&[1, IMG, IMG, 2, 3, 4], &[]);
        s.image_rows = None;
        assert!(!s.needs_image_rows(IMG), "no pixels: nothing to encode");
        s.images = Tensor::zeros((3, 2, 2), candle_core::DType::F32, &Device::Cpu)
            .and_then(|t| KeyedImage::new(ImageInput::Pixels(t)))
            .into_iter()
            .collect();
        assert!(s.needs_image_rows(IMG));
        // The last image row is at 2: a prefix of 2 straddles the image, one of 3 holds it.
        s.cached = 2;
        assert!(s.needs_image_rows(IMG));
        s.cached = 3;
        assert!(!s.needs_image_rows(IMG));
    }
}
