//! M-RoPE: the three position streams (temporal, height, width) of every decoder token, and
//! their rotary cos/sin.
//!
//! Positions follow transformers 5.24 `get_rope_index`: a text token takes the running position
//! `p` in all three streams and advances it by one; an image of grid (t, h, w) and merge size m
//! spans t·(h/m)·(w/m) tokens at (p + ti, p + hi, p + wi) in row-major (t, h/m, w/m) order, and
//! then advances `p` by max(h, w) / m. The scan is incremental ([`RopeState`]), so a prefill may
//! be split into chunks anywhere (even inside an image) and a decode token simply takes `p`,
//! which equals transformers' `cache_len + rope_delta`.

use candle_core::{DType, Device, Result, Tensor};

/// Where a sequence's position scan stands after its committed tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RopeState {
    /// Position of the next text token (transformers' `current_pos`).
    pub next_pos: usize,
    /// Images of the prompt fully placed so far.
    pub images_done: usize,
    /// Inside an image: its first position and how many of its tokens were placed.
    pub in_image: Option<(usize, usize)>,
}

/// Why a chunk's tokens do not fit the image grids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl RopeState {
    /// Positions `[t, h, w]` of `tokens`, continuing the scan; `grids` are the (t, h, w) patch
    /// grids of every image of the sequence's prompt, in order; `merge` the spatial merge size.
    /// `self` advances past the chunk.
    pub fn place(
        &mut self,
        tokens: &[u32],
        image_token: u32,
        grids: &[[usize; 3]],
        merge: usize,
    ) -> std::result::Result<Vec<[usize; 3]>, LayoutError> {
        let mut out = Vec::with_capacity(tokens.len());
        for &tok in tokens {
            if self.in_image.is_none() && tok == image_token && self.images_done < grids.len() {
                self.in_image = Some((self.next_pos, 0));
            }
            let Some((base, k)) = self.in_image else {
                out.push([self.next_pos; 3]);
                self.next_pos += 1;
                continue;
            };
            let [t, h, w] = grids[self.images_done];
            let (gh, gw) = (h / merge, w / merge);
            let count = t * gh * gw;
            if tok != image_token {
                return Err(LayoutError(format!(
                    "image {} has {count} tokens but only {k} image tokens precede a text token",
                    self.images_done
                )));
            }
            out.push([base + k / (gh * gw), base + (k / gw) % gh, base + k % gw]);
            if k + 1 == count {
                self.next_pos = base + gh.max(gw);
                self.images_done += 1;
                self.in_image = None;
            } else {
                self.in_image = Some((base, k + 1));
            }
        }
        Ok(out)
    }
}

/// Rotary tables for M-RoPE: the default inverse frequencies, with frequency `j` driven by the
/// stream its `mrope_section` assigns (first `s0` by t, next `s1` by h, the rest by w).
#[derive(Debug, Clone)]
pub struct MropeRotary {
    /// (1, head_dim / 2) f32
    inv_freq: Tensor,
    section: [usize; 3],
}

impl MropeRotary {
    pub fn new(inv_freq: Vec<f32>, section: [usize; 3], device: &Device) -> Result<Self> {
        let n = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, n), device)?,
            section,
        })
    }

    /// cos and sin, each (positions.len(), head_dim / 2) in `dtype`; angles and their cos/sin in
    /// f32 as transformers computes them, then recomposed stream by stream.
    pub fn cos_sin(&self, positions: &[[usize; 3]], dtype: DType) -> Result<(Tensor, Tensor)> {
        let n = positions.len();
        let mut streams = Vec::with_capacity(3);
        let mut first = 0;
        for (axis, &width) in self.section.iter().enumerate() {
            let pos: Vec<f32> = positions.iter().map(|p| p[axis] as f32).collect();
            // (T, 1) * (1, width) -> (T, width)
            let pos = Tensor::from_vec(pos, (n, 1), self.inv_freq.device())?;
            let inv = self.inv_freq.narrow(1, first, width)?;
            streams.push(pos.broadcast_mul(&inv)?);
            first += width;
        }
        // (T, head_dim / 2)
        let freqs = Tensor::cat(&streams, 1)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;

    /// transformers 5.24 `get_rope_index` on [text, text, image 1x4x6 (merge 2), text]:
    /// the image is a 2x3 merged grid at base 2, and text resumes at 2 + max(2, 3) = 5.
    #[test]
    fn places_text_and_images() -> std::result::Result<(), LayoutError> {
        let tokens = [1, 2, IMG, IMG, IMG, IMG, IMG, IMG, 3];
        let mut state = RopeState::default();
        let pos = state.place(&tokens, IMG, &[[1, 4, 6]], 2)?;
        let want = vec![
            [0, 0, 0],
            [1, 1, 1],
            [2, 2, 2],
            [2, 2, 3],
            [2, 2, 4],
            [2, 3, 2],
            [2, 3, 3],
            [2, 3, 4],
            [5, 5, 5],
        ];
        assert_eq!(pos, want);
        // Decode continues at 6 = cache_len 9 + delta (max 5 + 1 - 9 = -3).
        assert_eq!(state.place(&[4], IMG, &[[1, 4, 6]], 2)?, vec![[6, 6, 6]]);
        // The same prompt split in the middle of the image gives the same positions.
        let mut split = RopeState::default();
        let mut got = split.place(&tokens[..4], IMG, &[[1, 4, 6]], 2)?;
        got.extend(split.place(&tokens[4..], IMG, &[[1, 4, 6]], 2)?);
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn image_tokens_beyond_the_grids_are_text() -> std::result::Result<(), LayoutError> {
        let mut state = RopeState::default();
        assert_eq!(state.place(&[IMG, IMG], IMG, &[], 2)?, vec![[0; 3], [1; 3]]);
        let short = RopeState::default().place(&[IMG, 1], IMG, &[[1, 2, 4]], 2);
        assert!(short.is_err());
        Ok(())
    }

    #[test]
    fn streams_drive_their_sections() -> Result<()> {
        let rot = MropeRotary::new(vec![1.0, 0.5, 0.25, 0.125], [1, 1, 2], &Device::Cpu)?;
        let (cos, _) = rot.cos_sin(&[[1, 2, 4]], DType::F32)?;
        let want = [1.0f32.cos(), 1.0f32.cos(), 1.0f32.cos(), 0.5f32.cos()];
        let got = cos.flatten_all()?.to_vec1::<f32>()?;
        // Exact angles (powers of two); 1e-7 covers cos rounding.
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{got:?}");
        }
        Ok(())
    }
}
