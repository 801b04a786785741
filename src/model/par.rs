//! Splitting an output buffer across candle's CPU thread pool (the spinning pool its quantized
//! kernels use: the calling thread works too, and a worker spins between a step's many small
//! calls instead of sleeping and waking as rayon's do), and reading the CPU custom ops'
//! operands.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

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
/// Thread `t` owns the `t`-th contiguous share of `0..n` and takes it from the front a piece
/// at a time, so each thread reads its part of a weight matrix as one stream (a long stream
/// is what lets the small-m kernel's prefetches run ahead: `small_m`). A thread whose share is
/// done takes half of what is left of another's, from the back, until nothing is left, so at
/// the end of a decoding step's product neither thread waits long for the other (with
/// candle's own split of sixteenths the engine thread waited 7% of a batch-1 step in
/// `BarrierGuard::drop`).
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    if n <= 1 || pool.n_workers() == 0 || IN_POOL.get() {
        (0..n).for_each(f);
        return;
    }
    // Shares pack their bounds in 32 bits each.
    let most = u32::MAX as usize;
    for base in (0..n).step_by(most) {
        let shares = Shares::new(most.min(n - base), pool.n_workers() + 1);
        pool.execute(|thread| {
            let was = IN_POOL.replace(true);
            while let Some(items) = shares.grab(thread) {
                items.for_each(|i| f(base + i));
            }
            IN_POOL.set(was);
        });
    }
}

/// Each thread's share of `0..n` as `(next, end)` packed in one word, so that the owner
/// (taking from the front) and another thread (taking from the back) move it atomically.
struct Shares(Vec<AtomicU64>);

impl Shares {
    fn new(n: usize, threads: usize) -> Self {
        let bound = |t: usize| n * t / threads;
        Self(
            (0..threads)
                .map(|t| AtomicU64::new(pack(bound(t), bound(t + 1))))
                .collect(),
        )
    }

    /// The next indices for `thread`: a quarter of what is left of its own share (at least
    /// one), or else half of what is left of another's, from its back; `None` once all are
    /// taken.
    fn grab(&self, thread: usize) -> Option<Range<usize>> {
        let count = self.0.len();
        let own = thread % count;
        take(&self.0[own], true)
            .or_else(|| (1..count).find_map(|d| take(&self.0[(own + d) % count], false)))
    }
}

fn pack(next: usize, end: usize) -> u64 {
    ((next as u64) << 32) | end as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & u64::from(u32::MAX)) as usize)
}

/// Takes indices from the front of `share` (its owner) or from its back (another thread).
fn take(share: &AtomicU64, front: bool) -> Option<Range<usize>> {
    let mut current = share.load(Ordering::Relaxed);
    loop {
        let (next, end) = unpack(current);
        if next >= end {
            return None;
        }
        let (items, left) = if front {
            let take = ((end - next) / 4).max(1);
            (next..next + take, pack(next + take, end))
        } else {
            let take = ((end - next) / 2).max(1);
            (end - take..end, pack(next, end - take))
        };
        match share.compare_exchange_weak(current, left, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(items),
            Err(now) => current = now,
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

    /// Shares `out`, not yet written; the caller keeps it borrowed while any call uses it, and
    /// reads it as `f32` only where the calls wrote.
    pub fn uninit(out: &mut [std::mem::MaybeUninit<f32>]) -> Self {
        Self(out.as_mut_ptr().cast())
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
    use std::sync::atomic::AtomicUsize;

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

    /// The owner's pieces run front to back, one after the other, shrinking to single
    /// items; another thread takes halves of what is left from the back.
    #[test]
    fn owners_read_in_order_and_others_take_from_the_back() {
        let shares = Shares::new(100, 2);
        let (mut own, mut next) = (Vec::new(), 0);
        while let Some(r) = take(&shares.0[0], true) {
            assert_eq!(r.start, next, "contiguous");
            next = r.end;
            own.push(r.len());
        }
        assert_eq!((next, own[0], own.last()), (50, 12, Some(&1)));
        let stolen = shares.grab(0);
        assert_eq!(
            stolen,
            Some(75..100),
            "half of thread 1's share, from its back"
        );
        assert_eq!(
            shares.grab(1),
            Some(50..56),
            "its owner goes on from the front"
        );
        let mut rest: Vec<usize> = std::iter::from_fn(|| shares.grab(1)).flatten().collect();
        rest.extend(std::iter::from_fn(|| shares.grab(0)).flatten());
        rest.sort_unstable();
        assert_eq!(rest, (56..75).collect::<Vec<_>>());
    }

    /// Shares of uneven sizes, more threads than indices: each index in exactly one share.
    #[test]
    fn shares_cover_every_index_once() {
        for (n, threads) in [(1, 3), (7, 2), (101, 3), (5, 8)] {
            let shares = Shares::new(n, threads);
            let mut all = Vec::new();
            for t in 0..threads {
                while let Some(r) = shares.grab(t) {
                    all.extend(r);
                }
            }
            all.sort_unstable();
            assert_eq!(
                all,
                (0..n).collect::<Vec<_>>(),
                "n = {n}, threads = {threads}"
            );
        }
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
