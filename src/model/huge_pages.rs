//! The decoder's weights in transparent huge pages (2 MiB) on Linux.
//!
//! A decoding step streams every weight from memory once, and on this machine's 4 KiB pages
//! that stream ran 10-20% under what the same loop reads from 2 MiB pages (29.5 against 24-27
//! GB/s on 2 threads, bench/README.md "Fifth pass"): a TLB miss every 4 KiB, each a nested
//! page walk under virtualisation, and the hardware prefetchers stop at every 4 KiB boundary.
//! Where the kernel's THP mode is `madvise` (the common default), only memory that asks gets
//! huge pages, so the weights are copied into [`HugeArena`] chunks that ask before their pages
//! are first touched. Elsewhere the chunks are plain memory and everything works the same.

use candle_core::{DType, Device, Result, Tensor};

/// The huge page size of x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Bytes of one arena chunk: big enough that the two partial huge pages at its ends are a
/// small share, and above glibc's mmap threshold (32 MiB, `engine::memory`), so a chunk is
/// fresh, untouched memory from the kernel whose pages the advice can still shape.
const CHUNK_BYTES: usize = 64 << 20;

/// Each weight starts on a cache line.
const ALIGN_BYTES: usize = 64;

/// Asks the kernel to back the whole huge pages inside `buf` with huge pages when they are
/// first touched (`madvise(MADV_HUGEPAGE)`). Only advice: contents and validity are unchanged,
/// and a kernel that refuses (no THP, not Linux) leaves normal pages.
pub fn advise<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    huge_pages_of(buf, libc::MADV_HUGEPAGE);
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Moves the pages of `buf` already touched into huge pages now (`MADV_COLLAPSE`, Linux 6.1+
/// with glibc's constants; elsewhere nothing happens). Contents are kept.
fn collapse<T>(buf: &[T]) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    huge_pages_of(buf, libc::MADV_COLLAPSE);
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = buf;
}

/// `madvise(advice)` over the whole huge pages inside `buf`; a refusal changes nothing.
#[cfg(target_os = "linux")]
fn huge_pages_of<T>(buf: &[T], advice: libc::c_int) {
    let (start, end) = (
        buf.as_ptr() as usize,
        buf.as_ptr() as usize + size_of_val(buf),
    );
    let first = start.next_multiple_of(HUGE_PAGE);
    let last = end / HUGE_PAGE * HUGE_PAGE;
    if last > first {
        // SAFETY: the range lies inside `buf`, which the caller holds; both advices change how
        // its pages are backed, never their contents.
        unsafe {
            libc::madvise(first as *mut libc::c_void, last - first, advice);
        }
    }
}

/// Weights copied one after another into large CPU buffers advised into huge pages; each
/// weight comes back as a view of its chunk, with its shape and values, starting on a 64-byte
/// line (the chunk lives as long as a view of it does). Weights that are not on the CPU, or not
/// of the first one's dtype, come back as they are.
#[derive(Debug, Default)]
pub struct HugeArena {
    chunk: Option<Chunk>,
}

/// One 1-D buffer of the arena.
#[derive(Debug)]
struct Chunk {
    tensor: Tensor,
    /// Address of element 0 (glibc puts a header before it: it is not itself on a line).
    base: usize,
    /// Elements taken.
    used: usize,
}

impl Chunk {
    /// A zeroed chunk of at least `elems` elements (and at least [`CHUNK_BYTES`]), advised into
    /// huge pages before anything touches it.
    fn new(elems: usize, dtype: DType) -> Result<Self> {
        let size = dtype.size_in_bytes();
        let bytes = (elems * size).max(CHUNK_BYTES);
        let tensor = Tensor::zeros(
            bytes.next_multiple_of(HUGE_PAGE) / size,
            dtype,
            &Device::Cpu,
        )?;
        let base = {
            let (storage, _) = tensor.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("huge-page arena off the CPU")
            };
            // f32 and u8 zeros come from calloc, untouched, so the advice shapes their first
            // touch; f16 and bf16 ones are written, so their pages are collapsed into huge ones.
            match cpu {
                candle_core::CpuStorage::F32(v) => advise(v),
                candle_core::CpuStorage::U8(v) => advise(v),
                candle_core::CpuStorage::F16(v) => {
                    advise(v);
                    collapse(v);
                }
                candle_core::CpuStorage::BF16(v) => {
                    advise(v);
                    collapse(v);
                }
                _ => {}
            }
            cpu_base(cpu)
        };
        Ok(Self {
            tensor,
            base,
            used: 0,
        })
    }

    /// The first free element on a 64-byte line.
    fn next_line(&self) -> usize {
        let size = self.tensor.dtype().size_in_bytes();
        let at = self.base + self.used * size;
        (at.next_multiple_of(ALIGN_BYTES) - self.base) / size
    }
}

/// The address of a CPU storage's first element.
fn cpu_base(cpu: &candle_core::CpuStorage) -> usize {
    match cpu {
        candle_core::CpuStorage::F32(v) => v.as_ptr() as usize,
        candle_core::CpuStorage::U8(v) => v.as_ptr() as usize,
        candle_core::CpuStorage::F16(v) => v.as_ptr() as usize,
        candle_core::CpuStorage::BF16(v) => v.as_ptr() as usize,
        _ => 0,
    }
}

impl HugeArena {
    /// `w` copied into the arena, as a contiguous view of the same shape.
    pub fn put(&mut self, w: &Tensor) -> Result<Tensor> {
        let dtype = w.dtype();
        let kept = matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::U8);
        let other = self
            .chunk
            .as_ref()
            .is_some_and(|c| c.tensor.dtype() != dtype);
        if !w.device().is_cpu() || !kept || other {
            return Ok(w.clone());
        }
        let n = w.elem_count();
        let fits = |c: &Chunk| c.next_line() + n <= c.tensor.elem_count();
        let chunk = match self.chunk.take() {
            Some(c) if fits(&c) => c,
            _ => Chunk::new(n + ALIGN_BYTES / dtype.size_in_bytes(), dtype)?,
        };
        let chunk = self.chunk.insert(chunk);
        let at = chunk.next_line();
        chunk.tensor.slice_set(&w.flatten_all()?, 0, at)?;
        chunk.used = at + n;
        chunk.tensor.narrow(0, at, n)?.reshape(w.shape())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views keep their shapes and values, start on cache lines, share chunks while they fit,
    /// and a weight bigger than a chunk gets one of its own.
    #[test]
    fn views_hold_the_weights() -> Result<()> {
        let dev = Device::Cpu;
        let mut arena = HugeArena::default();
        let a = Tensor::randn(0f32, 1.0, (3, 5), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (7, 2), &dev)?;
        let big = Tensor::zeros(CHUNK_BYTES / 4 + 1, DType::F32, &dev)?.affine(1.0, 2.0)?;
        let half = Tensor::randn(0f32, 1.0, (2, 2), &dev)?.to_dtype(DType::F16)?;
        let (pa, pb, pbig, phalf) = (
            arena.put(&a)?,
            arena.put(&b)?,
            arena.put(&big)?,
            arena.put(&half)?,
        );
        for (packed, original) in [(&pa, &a), (&pb, &b), (&pbig, &big), (&phalf, &half)] {
            assert_eq!(packed.dims(), original.dims());
            assert!(packed.is_contiguous());
            let diff = (packed.to_dtype(DType::F32)? - original.to_dtype(DType::F32)?)?;
            assert_eq!(diff.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        let address = |t: &Tensor| -> Result<usize> {
            let (storage, layout) = t.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("not on the CPU")
            };
            Ok(cpu_base(cpu) + layout.start_offset() * t.dtype().size_in_bytes())
        };
        for t in [&pa, &pb, &pbig] {
            assert_eq!(address(t)? % ALIGN_BYTES, 0, "on a line");
        }
        let (from, to) = (address(&pa)?, address(&pb)?);
        assert_eq!(to - from, 64, "a's 15 values, then the next line");
        assert!(
            pbig.layout().start_offset() < 16,
            "a chunk of its own, from its start"
        );
        assert_eq!(phalf.dtype(), DType::F16, "another dtype stays as it was");
        Ok(())
    }
}
