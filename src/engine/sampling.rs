//! Token sampling for one sequence: OpenAI presence/frequency penalties, temperature, top-k,
//! top-p, a seeded RNG, and the logprobs the API returns.
//!
//! Order of operations (as vLLM): penalties on the raw logits, then greedy argmax when
//! `temperature < 1e-5` (ties → lowest id, no randomness used), otherwise divide by the
//! temperature, keep the `top_k` best, keep the nucleus (smallest set whose probability, after
//! top-k, reaches `top_p`; always at least one token) and draw one token.
//!
//! Logprobs (`logprob`, `top_logprobs`) are log-softmax values of the RAW logits, the model's
//! distribution before penalties and temperature, which is what vLLM returns by default. They
//! are computed only when `params.logprobs`; otherwise `logprob` is 0.0 and `top_logprobs` empty.
//! A logit of -inf gives a logprob of -inf (OpenAI clients expect a number: map it at the API).
//!
//! Ranking is a total order: higher score first, then lower id. Selection uses
//! `select_nth_unstable` and sorts only the few tokens it keeps, so a 150k vocabulary costs a few
//! linear passes; the draw walks the vocabulary in id order, so a seed gives the same tokens
//! whatever the selection algorithm does internally. NaN logits count as -inf and +inf as the
//! largest finite value.

mod select;

use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use select::{argmax, best_ids, log_sum_exp, nucleus_last, rank, sanitize};

/// Below this temperature sampling is greedy.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// The sampling settings of one request, validated upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; below 1e-5 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 (or more) turns top-p off.
    pub top_p: f32,
    /// Keep only the `top_k` best tokens; 0 turns top-k off.
    pub top_k: usize,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Seed of the sampler's RNG (pick one at random upstream when the request has none).
    pub seed: u64,
    /// Whether to compute `logprob` and `top_logprobs`.
    pub logprobs: bool,
    /// How many of the most likely tokens to return with their logprobs.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, no top-p/top-k, no penalties, no logprobs.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token id.
    pub token: u32,
    /// Its raw log-softmax value (0.0 unless `logprobs`).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens by raw logit, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why a token could not be sampled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplingError {
    #[error("cannot sample from empty logits")]
    EmptyLogits,
    #[error("no logit is finite (all NaN or -inf)")]
    NoFiniteLogit,
}

/// Samples the tokens of one sequence; owns its seeded RNG, so the same seed and the same
/// logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// The request's settings.
    params: SamplingParams,
    /// Seeded from `params.seed`; one draw per non-greedy token.
    rng: StdRng,
    /// Scratch, (vocab,): penalised, then temperature-scaled logits.
    scores: Vec<f32>,
    /// Scratch, (vocab,): exp(score - max) of the kept tokens, 0 for the others (sums in f64).
    weights: Vec<f32>,
    /// Scratch: token ids being ranked by selection.
    order: Vec<u32>,
    /// Scratch: sorted copy of the generated tokens, for penalty counts.
    counts: Vec<u32>,
}

impl Sampler {
    /// A sampler for one sequence, its RNG seeded with `params.seed`.
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(params.seed),
            scores: Vec::new(),
            weights: Vec::new(),
            order: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (vocab,), given the tokens generated so far (the
    /// prompt is not counted by the penalties), never one of `banned` (vLLM's `min_tokens`
    /// masks the EOS ids this way; the logprobs still describe the raw logits).
    pub fn sample(
        &mut self,
        logits: &[f32],
        output_tokens: &[u32],
        banned: &[u32],
    ) -> Result<Sampled, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        self.scores.clear();
        self.scores.extend(logits.iter().map(|&x| sanitize(x)));
        self.apply_penalties(output_tokens);
        for &id in banned {
            if let Some(score) = self.scores.get_mut(id as usize) {
                *score = f32::NEG_INFINITY;
            }
        }
        let token = if self.params.temperature < GREEDY_TEMPERATURE {
            argmax(&self.scores).ok_or(SamplingError::NoFiniteLogit)?
        } else {
            self.draw()?
        };
        if !self.params.logprobs {
            return Ok(Sampled {
                token,
                logprob: 0.0,
                top_logprobs: Vec::new(),
            });
        }
        let lse = log_sum_exp(logits);
        let logprob_of = |id: u32| (f64::from(sanitize(logits[id as usize])) - lse) as f32;
        let raw = |id: u32| sanitize(logits[id as usize]);
        best_ids(logits.len(), self.params.top_logprobs, raw, &mut self.order);
        Ok(Sampled {
            token,
            logprob: logprob_of(token),
            top_logprobs: self.order.iter().map(|&id| (id, logprob_of(id))).collect(),
        })
    }

    /// OpenAI: `logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`.
    fn apply_penalties(&mut self, output_tokens: &[u32]) {
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq == 0.0 && pres == 0.0 {
            return;
        }
        self.counts.clear();
        self.counts.extend_from_slice(output_tokens);
        self.counts.sort_unstable();
        for run in self.counts.chunk_by(|a, b| a == b) {
            if let Some(score) = self.scores.get_mut(run[0] as usize) {
                *score = sanitize(*score - run.len() as f32 * freq - pres);
            }
        }
    }

    /// Temperature, top-k, top-p, then one draw, walking the kept tokens in id order.
    fn draw(&mut self) -> Result<u32, SamplingError> {
        let inv_t = 1.0 / self.params.temperature;
        for s in &mut self.scores {
            *s = sanitize(*s * inv_t);
        }
        let best = argmax(&self.scores).ok_or(SamplingError::NoFiniteLogit)?;
        self.keep_candidates(self.scores[best as usize]);
        // `total` ≥ 1: the best token is always kept and has weight exp(0).
        let total: f64 = self.weights.iter().map(|&w| f64::from(w)).sum();
        let target = self.rng.gen::<f64>() * total;
        let mut acc = 0.0f64;
        for (id, &w) in self.weights.iter().enumerate() {
            acc += f64::from(w);
            if target < acc {
                return Ok(id as u32);
            }
        }
        // Rounding left `target` past the last sum: take the last kept token.
        let last = self.weights.iter().rposition(|&w| w > 0.0);
        Ok(last.map_or(best, |i| i as u32))
    }

    /// Fills `weights` with exp(score - max) for the tokens top-k and top-p keep, 0 elsewhere;
    /// exponentials are computed only for the top-k candidates.
    fn keep_candidates(&mut self, max: f32) {
        let (scores, weights, pool) = (&self.scores, &mut self.weights, &mut self.order);
        let n = scores.len();
        let k = match self.params.top_k {
            0 => n,
            k => k.min(n),
        };
        weights.clear();
        pool.clear();
        if k < n {
            best_ids(n, k, |id| scores[id as usize], pool);
            weights.resize(n, 0.0);
            for &id in pool.iter() {
                weights[id as usize] = (scores[id as usize] - max).exp();
            }
        } else {
            weights.extend(scores.iter().map(|&s| (s - max).exp()));
        }
        // A NaN top_p compares false: top-p off.
        if self.params.top_p < 1.0 {
            if k == n {
                pool.extend(0..n as u32);
            }
            let top_p = f64::from(self.params.top_p.max(0.0));
            let last = nucleus_last(scores, weights, pool, top_p);
            let cut = (scores[last as usize], last);
            for &id in pool.iter() {
                if rank((scores[id as usize], id), cut) == Ordering::Greater {
                    weights[id as usize] = 0.0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
