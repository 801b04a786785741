//! Splitting an output buffer across candle's CPU thread pool (the spinning pool its quantized
//! kernels use: the calling thread works too, and a worker spins between a step's many small
//! calls instead of sleeping and waking as rayon's do), and reading the CPU custom ops'
//! operands.

use std::sync::atomic::{AtomicUsize, Ordering};

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

thread_local! {
    /// Set while this thread runs a [`for_each_index`] call's items: a nested call runs inline
    /// (the pool takes one call at a time; waiting for it from inside one would never end).
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Calls `f(i)` for every `i` in `0..n`, the indices shared out across the pool's threads.
///
/// Each thread takes a share of what is left at a time, a smaller one as the end nears
/// (guided scheduling; at least one index). Candle's own split takes a sixteenth each time,
/// so at the end of a decoding step's product one thread could wait for the other's last
/// sixteenth (the engine thread waited 7% of a batch-1 step in `BarrierGuard::drop`).
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    if n <= 1 || pool.n_workers() == 0 || IN_POOL.get() {
        (0..n).for_each(f);
        return;
    }
    let threads = pool.n_workers() + 1;
    let next = AtomicUsize::new(0);
    pool.execute(|_| {
        let was = IN_POOL.replace(true);
        while let Some(items) = grab(&next, n, threads) {
            items.for_each(&f);
        }
        IN_POOL.set(was);
    });
}

/// The next indices for one thread out of `0..n`, `next` being the first not taken: half of
/// an even share of what is left, at least one; `None` once all are taken.
fn grab(next: &AtomicUsize, n: usize, threads: usize) -> Option<std::ops::Range<usize>> {
    let mut start = next.load(Ordering::Relaxed);
    loop {
        if start >= n {
            return None;
        }
        let take = ((n - start) / (2 * threads)).max(1);
        match next.compare_exchange_weak(start, start + take, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => return Some(start..start + take),
            Err(now) => start = now,
        }
    }
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

    /// Every index once, from both threads, and a nested call (run inline) too.
    #[test]
    fn every_index_once_nested_or_not() {
        for n in [0, 1, 2, 7, 100, 3080] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each_index(n, |i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
                if i == 0 {
                    let inner = AtomicUsize::new(0);
                    for_each_index(5, |_| {
                        inner.fetch_add(1, Ordering::Relaxed);
                    });
                    assert_eq!(inner.load(Ordering::Relaxed), 5);
                }
            });
            assert!(
                seen.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn shares_shrink_to_single_items() {
        let (next, mut sizes) = (AtomicUsize::new(0), Vec::new());
        while let Some(r) = grab(&next, 100, 2) {
            sizes.push(r.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 100);
        assert_eq!(sizes[0], 25);
        assert_eq!(sizes.last(), Some(&1));
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]));
    }

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
