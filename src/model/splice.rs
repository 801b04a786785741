//! The batched step shared by decoders whose images become rows spliced in at
//! the image-token positions (LLaVA, Idefics3): check and flatten the step,
//! embed the tokens, splice the image rows, run the decoder, and commit the
//! cache only when the whole step succeeded (else roll its reservation back).

use candle_core::{DType, Device, Tensor};

use super::batch::{Limits, SeqInput, StepPlan};
use super::decoder::TextModel;
use super::kv_cache::KvCache;
use super::ModelError;

/// The decoder and where its activations live.
pub(crate) struct Spliced<'a> {
    pub text: &'a TextModel,
    pub limits: Limits,
    pub dtype: DType,
    pub device: &'a Device,
}

impl Spliced<'_> {
    /// One engine step over all `batch` sequences (prefills and decodes mixed).
    /// Returns the logits of each sequence's last token: (batch.len(), vocab)
    /// f32. On error nothing is committed: cached lengths stay as they were.
    pub fn step(&self, batch: &[SeqInput<'_>], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let plan = StepPlan::new(batch, cache, self.limits)?;
        cache
            .reserve(&plan.spans)
            .map_err(|e| ModelError::Batch(e.to_string()))?;
        let result = self
            .input_embeddings(&plan)
            .and_then(|xs| self.text.forward(&xs, &plan.positions, &plan.spans, cache));
        match result {
            Ok(logits) => {
                for span in &plan.spans {
                    cache.commit(span.seq_id, span.len);
                }
                Ok(logits)
            }
            Err(e) => {
                cache.rollback(&plan.spans);
                Err(e.into())
            }
        }
    }

    /// Token embeddings with image rows spliced in: (T, text_hidden).
    fn input_embeddings(&self, plan: &StepPlan<'_>) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(plan.ids.as_slice(), self.device)?;
        let text = self.text.embed(&ids)?;
        let Some(gather) = &plan.gather else {
            return Ok(text);
        };
        let mut rows = vec![text];
        for img in &plan.images {
            rows.push(img.to_device(self.device)?.to_dtype(self.dtype)?);
        }
        // (T + image rows, D) -> (T, D)
        let gather = Tensor::new(gather.as_slice(), self.device)?;
        Tensor::cat(&rows, 0)?.index_select(&gather, 0)
    }
}
