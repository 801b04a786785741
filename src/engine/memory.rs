//! How the engine's heap behaves on glibc: large temporaries stay in the heap while the engine
//! works, and freed memory goes back to the system when it has nothing left to do.
//!
//! glibc serves every allocation above its mmap threshold (128 KiB at first, raised by frees to
//! at most 32 MiB) with fresh pages from the kernel and returns them on free, so each
//! multi-MiB activation of the vision encoder was page-faulted and zeroed again, layer after
//! layer (its attention scores' product took 2.5 times as long). Keeping them in the heap
//! means the heap keeps its high-water mark, so the engine trims it when it goes idle.
//!
//! glibc also gives each thread that allocates while others hold the heap an arena of its own
//! (up to 8 per core): the HTTP workers, the engine thread and candle's pool threads. Memory
//! freed into those arenas came back to the system only in part, and the server's RSS grew by
//! ~230 MB over `bench/run.sh`'s load (3101 -> 3331 MB, +7%); with 2 arenas it grew by 3 MB,
//! at the same throughput within the run-to-run noise (bench/README.md, "Memory").
//!
//! All threads now share the one main arena. A second arena is built of 64 MiB heaps mapped on
//! demand, and glibc unmaps such a heap as soon as it is empty, so the image preprocessing and
//! the encoder's temporaries that landed there were faulted in afresh by every request: a
//! one-image request took 12,400 to 14,900 page faults (~2 us each here) back to back, 100 to
//! 200 with one arena.

/// Fixes glibc's thresholds: allocations up to 32 MiB come from the heap, up to 128 MiB of
/// free heap top is kept for the next step rather than returned, and all threads share one
/// arena. Call once, before threads start (from `main`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_large_allocations() {
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free memory (every arena's) to the system: the engine calls it when it
/// runs out of work, so the memory of a burst does not stay resident after it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages; live allocations are untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_large_allocations() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
