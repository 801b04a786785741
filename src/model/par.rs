//! Splitting an output buffer across candle's CPU thread pool (the spinning pool its quantized
//! kernels use: the calling thread works too, and a worker spins between a step's many small
//! calls instead of sleeping and waking as rayon's do), and reading the CPU custom ops'
//! operands.

use candle_core::{CpuStorage, Layout, Result, WithDType};

/// A custom op's operand as the contiguous slice of `T` its layout covers.
pub fn operand<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("CPU custom op: operand not contiguous")
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Calls `f(index, chunk)` for every `chunk`-long piece of `out` (the last may be shorter), the
/// pieces shared out across the pool's threads.
pub fn for_each_chunk_mut(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let (len, chunk) = (out.len(), chunk.max(1));
    let base = Disjoint(out.as_mut_ptr());
    for_each_index(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        // SAFETY: each index is handed to one call only, so its piece is written by that call
        // alone; `out` is borrowed mutably until `for_each_index` returns, which is after every
        // call has finished.
        let piece = unsafe { base.slice(start, chunk.min(len - start)) };
        f(i, piece);
    });
}

/// Calls `f(i)` for every `i` in `0..n`, the indices shared out across the pool's threads.
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |items| items.for_each(&f));
}

/// An output buffer shared by the pool's threads, each writing places no other call writes.
#[derive(Clone, Copy)]
pub struct Disjoint(*mut f32);

// SAFETY: written only through `slice` or `ptr`, whose callers keep to places of their own.
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// Shares `out`; the caller keeps `out` borrowed while any call uses it.
    pub fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// SAFETY: `start..start + len` lies in the buffer and overlaps no other live slice.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// The buffer's start, for writes the caller proves disjoint and in bounds.
    pub fn ptr(&self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_once_with_its_index() {
        let mut out = vec![0f32; 1003];
        for_each_chunk_mut(&mut out, 10, |i, piece| {
            for v in piece.iter_mut() {
                *v += i as f32 + 1.0;
            }
        });
        let want: Vec<f32> = (0..1003).map(|j| (j / 10) as f32 + 1.0).collect();
        assert_eq!(out, want);
    }
}
