//! Decoder self-attention over a flattened batch: q/k/v/o projections run once over every
//! token of the step; rotary, cache append and the causal (optionally sliding-window) softmax
//! run per sequence, so a sequence's result does not depend on its batch neighbours. The
//! decoding sequences' attention is `decode_attention.rs`, a prefilling one's on the CPU
//! `prefill_attention.rs`; elsewhere (f16, no AVX-512, other devices) the candle ops below.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::rotary_emb::rope_thd;
use candle_nn::VarBuilder;

use super::decode_attention::{self, Query};
use super::huge_pages::HugeArena;
use super::kv_cache::KvCache;
use super::linear::{Linear, QuantReport};
use super::prefill_attention::{self, Causal};
use super::rope_store::{rotate_and_store, Heads};
use super::text_config::TextConfig;

/// One sequence's slice of a flattened step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub seq_id: u64,
    /// First row of this sequence in the flattened (T, D) activations.
    pub offset: usize,
    /// New tokens this step.
    pub len: usize,
    /// Position of the first new token (= cached length before the step).
    pub start_pos: usize,
}

/// Softmax over the last axis in f32 (as transformers does), returned in the input dtype.
/// `mask`, when given, is added before the softmax (broadcast; `-inf` hides a key).
pub(crate) fn softmax_f32(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let s = scores.to_dtype(DType::F32)?;
    let s = match mask {
        Some(m) => s.broadcast_add(m)?,
        None => s,
    };
    let probs = if s.device().is_cpu() {
        s.contiguous()?.apply_op1_no_bwd(&RowSoftmax)?
    } else {
        candle_nn::ops::softmax_last_dim(&s)?
    };
    probs.to_dtype(scores.dtype())
}

/// Rows of scores per work item of [`RowSoftmax`]'s parallel map: about 64 KiB.
const SOFTMAX_ITEM_VALUES: usize = 16 << 10;

/// Softmax over the last axis, f32 on the CPU, rows spread over candle's thread pool (the
/// image profile found candle's own on one thread: 33 ms of a SigLIP layer's 190).
struct RowSoftmax;

impl candle_core::CustomOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "row-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax: scores not contiguous")
        };
        let xs = &s.as_slice::<f32>()?[start..end];
        let width = l.dims().last().copied().unwrap_or(1).max(1);
        let rows = (SOFTMAX_ITEM_VALUES / width).max(1);
        let mut out = vec![0f32; xs.len()];
        super::par::for_each_chunk_mut(&mut out, rows * width, |i, piece| {
            let (from, len) = (i * rows * width, piece.len());
            for (o, x) in piece
                .chunks_mut(width)
                .zip(xs[from..from + len].chunks(width))
            {
                softmax_row(x, o);
            }
        });
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `out = exp(x - max x) / sum`; a row of `-inf` only (every key hidden) gives NaN, as
/// torch's softmax does.
pub(crate) fn softmax_row(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected just above.
        return unsafe { super::fast_exp::softmax_avx512(x, out) };
    }
    softmax_portable(x, out)
}

/// [`softmax_row`] in plain loops.
fn softmax_portable(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v - max;
    }
    super::fast_exp::exp_in_place(out);
    // 16 partial sums: shorter rounding chains than one running sum, and they vectorise.
    let mut lanes = [0f32; 16];
    let chunks = out.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Additive mask (t, keys) for queries at `start..start + t` over keys at `first..start + t`:
/// causal, and limited to the last `window` positions when set. `None` when nothing is hidden.
pub(crate) fn causal_mask(
    t: usize,
    start: usize,
    first: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let keys = start + t - first;
    let visible = |i: usize, j: usize| {
        let (q_pos, k_pos) = (start + i, first + j);
        k_pos <= q_pos && window.is_none_or(|w| q_pos < k_pos + w)
    };
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..keys).map(move |j| (i, j)))
        .map(|(i, j)| {
            if visible(i, j) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    if values.iter().all(|&v| v == 0.0) {
        return Ok(None);
    }
    Tensor::from_vec(values, (t, keys), device).map(Some)
}

#[derive(Debug)]
pub struct SelfAttention {
    /// q_proj, k_proj and v_proj stacked: (T, D) -> (T, (heads + 2 kv_heads) * head_dim).
    qkv: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Sliding window of this layer, if any.
    window: Option<usize>,
}

impl SelfAttention {
    pub fn load(cfg: &TextConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            qkv: Linear::load_stacked(
                d,
                &[
                    (heads * hd, "q_proj"),
                    (kv_heads * hd, "k_proj"),
                    (kv_heads * hd, "v_proj"),
                ],
                cfg.qkv_bias,
                vb.clone(),
            )?,
            o: Linear::load(heads * hd, d, cfg.o_bias, vb.pp("o_proj"))?,
            heads,
            kv_heads,
            head_dim: hd,
            window: cfg.sliding_window.get(layer).copied().flatten(),
        })
    }

    /// `xs` (T, D) and per-token `cos`/`sin` (T, head_dim / 2) -> (T, D). Writes each span's
    /// keys and values into its reserved slots of `cache` at `layer` (uncommitted).
    pub fn forward(
        &self,
        xs: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        spans: &[Span],
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (t, hd) = (xs.dim(0)?, self.head_dim);
        // (T, heads * hd) -> (1, T, heads, hd), rotated, -> (T, heads, hd)
        let rotate = |x: Tensor, heads: usize| {
            rope_thd(&x.reshape((1, t, heads, hd))?, cos, sin)?.squeeze(0)
        };
        let (q_width, kv_width) = (self.heads * hd, self.kv_heads * hd);
        // (T, q_width + 2 kv_width)
        let qkv = self.qkv.forward(xs)?;
        let heads = Heads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: hd,
        };
        let rows = |x: &Tensor, s: &Span| x.narrow(0, s.offset, s.len);
        // (T, heads, hd), rotated; the keys and values are in the cache after this.
        let q = match rotate_and_store(&qkv, (cos, sin), heads, spans, layer, cache)? {
            Some(q) => q,
            None => {
                let k = rotate(qkv.narrow(1, q_width, kv_width)?, self.kv_heads)?;
                let v =
                    qkv.narrow(1, q_width + kv_width, kv_width)?
                        .reshape((t, self.kv_heads, hd))?;
                for s in spans {
                    cache.write(s.seq_id, layer, s.start_pos, &rows(&k, s)?, &rows(&v, s)?)?;
                }
                rotate(qkv.narrow(1, 0, q_width)?, self.heads)?
            }
        };
        // Keys older than the first query's window are invisible to every query: skip them.
        let first = |s: &Span| {
            self.window
                .map_or(0, |w| (s.start_pos + 1).saturating_sub(w))
        };
        // The decoding sequences (one query each) at once, straight from the pool, where that
        // path applies; `None` sends them down the general path too.
        let decoding: Vec<&Span> = spans.iter().filter(|s| s.len == 1).collect();
        let queries = decoding
            .iter()
            .map(|s| {
                let slots = cache.slot_ids(s.seq_id, first(s), s.start_pos + 1 - first(s))?;
                Ok(Query {
                    row: s.offset,
                    slots,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let scale = (hd as f64).powf(-0.5);
        let decoded = decode_attention::attend(&q, cache.pools(layer)?, &queries, scale)?;
        if let Some(d) = &decoded {
            // Every span decoding: the rows are already in span order.
            if queries.len() == spans.len() {
                return self.o.forward(d);
            }
        }
        let mut outs = Vec::with_capacity(spans.len());
        let mut next_decoded = 0;
        for s in spans {
            match &decoded {
                Some(d) if s.len == 1 => {
                    outs.push(d.narrow(0, next_decoded, 1)?);
                    next_decoded += 1;
                }
                _ => {
                    let first = first(s);
                    let n = s.start_pos + s.len - first;
                    let at = Causal {
                        start: s.start_pos,
                        first,
                        window: self.window,
                    };
                    let slots = cache.slot_ids(s.seq_id, first, n)?;
                    let fused = prefill_attention::attend(
                        &rows(&q, s)?,
                        cache.pools(layer)?,
                        slots,
                        at,
                        scale as f32,
                    )?;
                    let out = match fused {
                        Some(out) => out,
                        None => {
                            let (keys, values) = cache.read(s.seq_id, layer, first, n)?;
                            self.attend(&rows(&q, s)?, &keys, &values, s.start_pos, first)?
                        }
                    };
                    outs.push(out);
                }
            }
        }
        self.o.forward(&Tensor::cat(&outs, 0)?)
    }

    /// One sequence: `q` (t, heads, hd) at positions `start..`, `keys`/`values`
    /// (n_keys, kv_heads, hd) at positions `first..start + t` -> (t, heads * hd).
    fn attend(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        start: usize,
        first: usize,
    ) -> Result<Tensor> {
        let (t, _, hd) = q.dims3()?;
        let (kvh, n_rep) = (self.kv_heads, self.heads / self.kv_heads);
        let n_keys = start + t - first;
        // (n_keys, kv_heads, hd) -> (kv_heads, n_keys, hd), a strided view the gemm reads as is.
        let (keys, values) = (keys.transpose(0, 1)?, values.transpose(0, 1)?);
        // (t, heads, hd) -> (kv_heads, n_rep * t, hd): the n_rep query heads sharing a kv head
        // are stacked, which is grouped-query attention without copying keys.
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kvh, n_rep * t, hd))?;
        let scale = (hd as f64).powf(-0.5);
        // (kv_heads, n_rep * t, n_keys) -> (kv_heads, n_rep, t, n_keys)
        let scores = (q.matmul(&keys.t()?)? * scale)?.reshape((kvh, n_rep, t, n_keys))?;
        let mask = causal_mask(t, start, first, self.window, q.device())?;
        let probs = softmax_f32(&scores, mask.as_ref())?.reshape((kvh, n_rep * t, n_keys))?;
        // (kv_heads, n_rep * t, hd) -> (heads, t, hd) -> (t, heads * hd)
        probs
            .matmul(&values)?
            .reshape((self.heads, t, hd))?
            .transpose(0, 1)?
            .reshape((t, self.heads * hd))
    }

    /// Moves the q/k/v and o weights into `arena`, in the order a step reads them.
    pub fn pack(&mut self, arena: &mut HugeArena) -> Result<()> {
        self.qkv.pack(arena)?;
        self.o.pack(arena)
    }

    /// Quantizes the q/k/v/o projections in place.
    pub fn quantize(
        &mut self,
        dtype: GgmlDType,
        report: &mut QuantReport,
        arena: &mut HugeArena,
    ) -> Result<()> {
        for l in [&mut self.qkv, &mut self.o] {
            l.quantize(dtype, report, arena)?;
        }
        Ok(())
    }

    /// Key/value heads and their width, for sizing the cache.
    pub fn kv_dims(&self) -> (usize, usize) {
        (self.kv_heads, self.head_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 row softmax gives the portable loops' bits (it sums in the same order and
    /// uses the same `exp`), at lengths around the 16-lane chunks, with huge and hidden
    /// (-inf) scores, a row hidden entirely (NaN, as torch) and a NaN score.
    #[test]
    fn avx512_softmax_is_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            for n in [0, 1, 15, 16, 17, 33, 1024, 1029] {
                let mut x: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                    .collect();
                if n > 3 {
                    x[1] = f32::NEG_INFINITY;
                }
                let (mut huge, mut with_nan) = (x.clone(), x.clone());
                if n > 3 {
                    huge[n - 1] = 80.0;
                    with_nan[2] = f32::NAN;
                }
                let hidden = vec![f32::NEG_INFINITY; n];
                for row in [&x, &huge, &hidden, &with_nan] {
                    let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
                    softmax_portable(row, &mut want);
                    // SAFETY: the feature was detected above; the lengths match.
                    unsafe { crate::model::fast_exp::softmax_avx512(row, &mut got) };
                    let bits = |v: &[f32]| v.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "n = {n}");
                }
            }
            return;
        }
        eprintln!("skipped: no AVX-512 on this CPU");
    }

    /// Against candle's softmax over rows of several widths (odd ones, one row per item and
    /// many), with a masked key. Both compute exp(x - max) / sum in f32; only the sum's order
    /// differs (candle: 8 lanes, here 16), which moves it by about sqrt(n) ulps: 1e-5 relative
    /// for 20,000 terms. Each probability must be within 1e-4 of candle's, relative.
    #[test]
    fn row_softmax_matches_candle() -> Result<()> {
        for (rows, width) in [(3, 5), (40, 1000), (2, 20_000), (1, 1)] {
            let s = Tensor::randn(0f32, 3.0, (rows, width), &Device::Cpu)?;
            let mut hide = vec![0f32; width];
            hide[0] = f32::NEG_INFINITY;
            let mask = Tensor::new(hide.as_slice(), &Device::Cpu)?;
            // A 1-wide row with its key masked hides everything: NaN, checked below.
            let masks = if width > 1 {
                vec![None, Some(&mask)]
            } else {
                vec![None]
            };
            for m in masks {
                let want = match m {
                    Some(m) => candle_nn::ops::softmax_last_dim(&s.broadcast_add(m)?)?,
                    None => candle_nn::ops::softmax_last_dim(&s)?,
                };
                let got = softmax_f32(&s, m)?;
                let diff = ((&got - &want)?.abs()? / (want + 1e-30)?)?;
                let diff = diff.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "{rows}x{width} masked {}: {diff}", m.is_some());
            }
        }
        let hidden = Tensor::new(&[[f32::NEG_INFINITY, f32::NEG_INFINITY]], &Device::Cpu)?;
        let probs = softmax_f32(&hidden, None)?.to_vec2::<f32>()?;
        assert!(probs[0].iter().all(|p| p.is_nan()), "as torch: {probs:?}");
        Ok(())
    }

    fn visible(mask: Option<Tensor>) -> Result<Vec<Vec<u8>>> {
        let Some(m) = mask else { return Ok(vec![]) };
        Ok(m.to_vec2::<f32>()?
            .into_iter()
            .map(|row| row.into_iter().map(|v| u8::from(v == 0.0)).collect())
            .collect())
    }

    #[test]
    fn causal_prefill_with_offset() -> Result<()> {
        // Two cached positions, three new queries.
        let m = causal_mask(3, 2, 0, None, &Device::Cpu)?;
        assert_eq!(
            visible(m)?,
            vec![
                vec![1, 1, 1, 0, 0],
                vec![1, 1, 1, 1, 0],
                vec![1, 1, 1, 1, 1]
            ]
        );
        assert!(
            causal_mask(1, 9, 0, None, &Device::Cpu)?.is_none(),
            "decode needs no mask"
        );
        Ok(())
    }

    #[test]
    fn sliding_window_hides_old_keys() -> Result<()> {
        // Window 2, queries at 3 and 4; keys start at first = 3 + 1 - 2 = 2.
        let m = causal_mask(2, 3, 2, Some(2), &Device::Cpu)?;
        assert_eq!(visible(m)?, vec![vec![1, 1, 0], vec![0, 1, 1]]);
        Ok(())
    }
}
