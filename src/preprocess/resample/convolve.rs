//! The convolution filters of Pillow's `ImagingResample` (libImaging/Resample.c) on 8-bit RGB:
//! per-axis coefficient tables (`precompute_coeffs` + `normalize_coeffs_8bpc`) and the two
//! separable passes, each rounding and clipping to uint8. Each pass's output rows are split
//! over as many scoped threads as candle's pool has (the image profile had the two passes of
//! SmolVLM's 512 -> 2048 -> 512 resize at 70-85 ms of one core, ahead of the encoder); every
//! row is computed as alone, so the bytes do not change. Sums are 32-bit integers, as Pillow's;
//! the vertical pass's inner loop (a row of bytes times one weight, added to a row of sums) is
//! compiled for AVX-512 and AVX2 and picked at run time. Both steps of 512 -> 2048 -> 512 on 2
//! threads, 3 alternating runs of 3 resizes on a noisy machine: 51-74 ms (median 55) before,
//! 25-50 ms (median 29) after.
//!
//! The horizontal pass summed each output pixel's taps one by one, 3 channels at a time. It
//! now transposes 16 rows at a time, so that the sums of the 16 rows are one vector and its
//! loop is the vertical pass's: SmolVLM's whole preprocessing of a 512 px photo (both resizes,
//! rescaling, normalising), 6 runs each on 2 threads: 20-26 ms against 25-42 ms.

use std::ops::Range;

use image::RgbImage;

use super::{Kernel, Window, CHANNELS};

/// Fractional bits of the fixed-point weights (Pillow's `PRECISION_BITS`: 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// Normalized fixed-point weights for a run of output positions along one axis.
struct Coeffs {
    /// Weights per output position (`ksize` slots each, unused slots zero).
    ksize: usize,
    /// First input index read by each output position.
    starts: Vec<usize>,
    /// Number of input indices read by each output position.
    counts: Vec<usize>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for output positions
    /// `first..first + n` of an `in_size` → `out_size` resize along one axis (box = whole axis).
    fn new(in_size: u32, out_size: u32, first: u32, n: u32, kernel: Kernel) -> Self {
        // Pillow keeps the box edges as C floats: in1 - in0 is computed in f32.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = kernel.support * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let mut starts = Vec::with_capacity(n as usize);
        let mut counts = Vec::with_capacity(n as usize);
        let mut weights = vec![0i32; n as usize * ksize];
        let mut raw = vec![0f64; ksize];
        for (i, xx) in (first..first + n).enumerate() {
            let center = (f64::from(xx) + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let count = ((xmax - xmin).max(0) as usize).min(ksize);
            let mut total = 0.0;
            for (x, w) in raw.iter_mut().enumerate().take(count) {
                *w = (kernel.eval)(((x as i64 + xmin) as f64 - center + 0.5) * inv);
                total += *w;
            }
            let row = &mut weights[i * ksize..i * ksize + count];
            for (dst, &w) in row.iter_mut().zip(&raw) {
                let w = if total != 0.0 { w / total } else { w };
                *dst = to_fixed(w);
            }
            starts.push(xmin as usize);
            counts.push(count);
        }
        Self {
            ksize,
            starts,
            counts,
            weights,
        }
    }

    /// The input indices read by any of these output positions (Pillow's `ybox_first..ybox_last`).
    fn span(&self) -> Range<usize> {
        let first = self.starts.first().copied().unwrap_or(0);
        let end = self
            .starts
            .iter()
            .zip(&self.counts)
            .map(|(s, c)| s + c)
            .max()
            .unwrap_or(first);
        first..end.max(first)
    }

    /// Input range and weights of output position `i` (relative to `first`).
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.ksize..i * self.ksize + self.counts[i]];
        (self.starts[i], w)
    }
}

/// Pillow rounds each normalized weight half away from zero into 22-bit fixed point.
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// One output sample of a pass: `acc` starts at one half (rounding), then shift and clip.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A rectangle of a packed RGB buffer: `rows` rows of `width` pixels, row `y` starting at pixel
/// `(y0 + y) * stride + x0` of `data`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [u8],
    stride: usize,
    x0: usize,
    y0: usize,
    width: usize,
    rows: usize,
}

impl<'a> View<'a> {
    /// `rows` x `cols` of an image.
    fn of(img: &'a RgbImage, rows: Range<usize>, cols: Range<usize>) -> Self {
        Self::packed(img.as_raw(), img.width() as usize, rows, cols)
    }

    /// `rows` x `cols` of a packed buffer `stride` pixels wide.
    fn packed(data: &'a [u8], stride: usize, rows: Range<usize>, cols: Range<usize>) -> Self {
        Self {
            data,
            stride,
            x0: cols.start,
            y0: rows.start,
            width: cols.len(),
            rows: rows.len(),
        }
    }

    /// The `width * 3` bytes of row `y` of the view.
    fn row(&self, y: usize) -> &'a [u8] {
        let start = ((self.y0 + y) * self.stride + self.x0) * CHANNELS;
        &self.data[start..start + self.width * CHANNELS]
    }

    fn to_vec(self) -> Vec<u8> {
        (0..self.rows)
            .flat_map(|y| self.row(y).iter().copied())
            .collect()
    }
}

/// Horizontal pass over every row of `src`: output columns given by `coeffs`, whose source
/// column indices start at `col0` in the view. Returns (src rows, coeffs outputs, 3) packed.
fn horizontal_pass(src: View, coeffs: &Coeffs, col0: usize) -> Vec<u8> {
    let n_out = coeffs.starts.len();
    let mut out = vec![0u8; src.rows * n_out * CHANNELS];
    let pass = Horizontal { src, coeffs, col0 };
    for_rows(&mut out, n_out * CHANNELS, STRIP, |y, strip| {
        simd::horizontal_strip(&pass, y, strip)
    });
    out
}

/// A horizontal pass's input and weights: `coeffs` give the output columns, their source
/// column indices starting at `col0` in `src`.
#[derive(Clone, Copy)]
struct Horizontal<'a> {
    src: View<'a>,
    coeffs: &'a Coeffs,
    col0: usize,
}

/// Rows the horizontal pass computes together, one per lane of its sums.
const STRIP: usize = 16;

/// Vertical pass over every column of `src`: output rows given by `coeffs`, whose source row
/// indices start at `row0` in the view. Returns (coeffs outputs, src width, 3) packed.
fn vertical_pass(src: View, coeffs: &Coeffs, row0: usize) -> Vec<u8> {
    let row_len = src.width * CHANNELS;
    let n_out = coeffs.starts.len();
    let mut out = vec![0u8; n_out * row_len];
    for_rows(&mut out, row_len, 1, |y, out_row| {
        let (start, taps) = coeffs.taps(y);
        let mut acc = vec![HALF; row_len];
        for (t, &k) in taps.iter().enumerate() {
            simd::add_scaled(&mut acc, src.row(start - row0 + t), k);
        }
        for (dst, &a) in out_row.iter_mut().zip(&acc) {
            *dst = clip8(a);
        }
    });
    out
}

/// Where a pass's sums start: one half, so that the shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// The sums in 32-bit integers, as Pillow's `int ss`: each weight is below 2^22 in size and
/// a normalised filter's weights add up in size to under 1.5 x 2^22 (Lanczos' negative lobes
/// are the most), so a sum of bytes times weights stays under 255 x 1.5 x 2^22 + 2^21 < 2^31.
/// A filter cut short at an image edge is normalised by a smaller total, so that bound is not
/// a proof: the additions wrap, as Pillow's C ints do in practice, rather than panic in a
/// build with overflow checks on a request's pixels. Integer sums are exact (and wrapping ones
/// exact modulo 2^32), so the order of the additions does not matter.
mod simd {
    use super::{clip8, Horizontal, CHANNELS, HALF, STRIP};

    /// `acc[j] += row[j] * k` for every `j`.
    pub(super) fn add_scaled(acc: &mut [i32], row: &[u8], k: i32) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bw") {
            // SAFETY: the features were detected just above.
            return unsafe { add_scaled_avx512(acc, row, k) };
        } else if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { add_scaled_avx2(acc, row, k) };
        }
        add_scaled_plain(acc, row, k)
    }

    #[inline(always)]
    fn add_scaled_plain(acc: &mut [i32], row: &[u8], k: i32) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = a.wrapping_add(i32::from(v).wrapping_mul(k));
        }
    }

    /// The same loop, vectorised by the compiler 16 lanes wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn add_scaled_avx512(acc: &mut [i32], row: &[u8], k: i32) {
        add_scaled_plain(acc, row, k)
    }

    /// The same loop, 8 lanes wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_scaled_avx2(acc: &mut [i32], row: &[u8], k: i32) {
        add_scaled_plain(acc, row, k)
    }

    /// Rows `y..` of the horizontal pass (`out.len() / row_len` of them, at most [`STRIP`]):
    /// output pixel `i` is the sum of input pixels `start_i - col0 ..` times its taps, channel
    /// by channel. The strip is transposed first, so that one byte of every row lies side by
    /// side and the sums of all rows are one vector; a row's sums are those it would have alone.
    pub(super) fn horizontal_strip(pass: &Horizontal, y: usize, out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bw") {
            // SAFETY: the features were detected just above.
            return unsafe { horizontal_strip_avx512(pass, y, out) };
        } else if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { horizontal_strip_avx2(pass, y, out) };
        }
        horizontal_strip_plain(pass, y, out)
    }

    /// The same loops, the sums of a strip one 16-lane vector.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn horizontal_strip_avx512(pass: &Horizontal, y: usize, out: &mut [u8]) {
        horizontal_strip_plain(pass, y, out)
    }

    /// The same loops, two 8-lane vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_strip_avx2(pass: &Horizontal, y: usize, out: &mut [u8]) {
        horizontal_strip_plain(pass, y, out)
    }

    #[inline(always)]
    fn horizontal_strip_plain(pass: &Horizontal, y: usize, out: &mut [u8]) {
        let Horizontal { src, coeffs, col0 } = *pass;
        let row_len = coeffs.starts.len() * CHANNELS;
        let rows = out.len() / row_len.max(1);
        // (width * 3, STRIP): byte x of row r at x * STRIP + r; rows past `rows` stay zero.
        let mut t = vec![0u8; src.width * CHANNELS * STRIP];
        for r in 0..rows {
            for (x, &b) in src.row(y + r).iter().enumerate() {
                t[x * STRIP + r] = b;
            }
        }
        for i in 0..coeffs.starts.len() {
            let (start, taps) = coeffs.taps(i);
            for c in 0..CHANNELS {
                let mut acc = [HALF; STRIP];
                for (j, &k) in taps.iter().enumerate() {
                    let at = ((start - col0 + j) * CHANNELS + c) * STRIP;
                    let col: &[u8; STRIP] = t[at..at + STRIP].try_into().unwrap_or(&[0; STRIP]);
                    for (a, &v) in acc.iter_mut().zip(col) {
                        *a = a.wrapping_add(i32::from(v).wrapping_mul(k));
                    }
                }
                for (r, &a) in acc.iter().enumerate().take(rows) {
                    out[r * row_len + i * CHANNELS + c] = clip8(a);
                }
            }
        }
    }
}

/// Rows per thread below which a pass is not split (a thread's start costs about as much as
/// a few rows of a 2048-pixel image).
const MIN_ROWS_PER_THREAD: usize = 64;

/// Calls `f(y, rows)` for every run of `unit` `row_len`-byte rows of `out` starting at row `y`
/// (the last run may be shorter), runs of them on scoped threads.
fn for_rows(out: &mut [u8], row_len: usize, unit: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let threads = candle_core::utils::get_num_threads().min(rows / MIN_ROWS_PER_THREAD);
    let per = rows.div_ceil(threads.max(1)).max(1).next_multiple_of(unit);
    let run = |first: usize, piece: &mut [u8]| {
        for (j, run) in piece.chunks_mut(unit * row_len).enumerate() {
            f(first + j * unit, run);
        }
    };
    if threads <= 1 {
        return run(0, out);
    }
    std::thread::scope(|s| {
        for (i, piece) in out.chunks_mut(per * row_len).enumerate() {
            let run = &run;
            s.spawn(move || run(i * per, piece));
        }
    });
}

/// Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by
/// more rows than twice the columns the width shrinks by: `in_h - out_h > 2 * (in_w - out_w)`
/// with `out_h < in_h`. So a growing width with a shrinking height always goes vertical first,
/// and growing heights never do. Established against Pillow 13.0.0 on ~2000 random size and
/// filter combinations, hundreds of them within 3 rows of the boundary; `reference_tests` holds
/// the decisive cases on both sides of it.
fn vertical_first((in_w, in_h): (usize, usize), (out_w, out_h): (u32, u32)) -> bool {
    let (in_w, in_h) = (in_w as i64, in_h as i64);
    let (out_w, out_h) = (i64::from(out_w), i64::from(out_h));
    out_h < in_h && in_h - out_h > 2 * (in_w - out_w)
}

pub(super) fn convolve_window(
    src: &RgbImage,
    (out_w, out_h): (u32, u32),
    win: Window,
    kernel: Kernel,
) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let need_h = out_w as usize != in_w;
    let need_v = out_h as usize != in_h;
    let horiz = Coeffs::new(src.width(), out_w, win.x, win.width, kernel);
    let vert = Coeffs::new(src.height(), out_h, win.y, win.height, kernel);
    let win_cols = win.x as usize..(win.x + win.width) as usize;
    let win_rows = win.y as usize..(win.y + win.height) as usize;
    // The horizontal pass runs first, over only the input rows the vertical pass reads, unless
    // `vertical_first` says Pillow 13 swaps the passes.
    let out = if need_h && need_v && vertical_first((in_w, in_h), (out_w, out_h)) {
        let cols = horiz.span();
        let width = cols.len();
        let tmp = vertical_pass(View::of(src, 0..in_h, cols.clone()), &vert, 0);
        horizontal_pass(
            View::packed(&tmp, width, 0..win_rows.len(), 0..width),
            &horiz,
            cols.start,
        )
    } else {
        let rows = if need_v { vert.span() } else { win_rows };
        let n_rows = rows.len();
        let tmp;
        let view = if need_h {
            tmp = horizontal_pass(View::of(src, rows.clone(), 0..in_w), &horiz, 0);
            View::packed(&tmp, win_cols.len(), 0..n_rows, 0..win_cols.len())
        } else {
            View::of(src, rows.clone(), win_cols)
        };
        if need_v {
            vertical_pass(view, &vert, rows.start)
        } else {
            view.to_vec()
        }
    };
    RgbImage::from_raw(win.width, win.height, out)
        .unwrap_or_else(|| RgbImage::new(win.width, win.height))
}

#[cfg(test)]
mod tests {
    use super::vertical_first;

    #[test]
    fn pass_order_follows_pillow_13() {
        // The SigLIP exif_image resize, measured vertical-first in Pillow 13.0.0.
        assert!(vertical_first((40, 64), (32, 32)));
        // Wider and shorter: always vertical first; taller: never.
        assert!(vertical_first((37, 23), (111, 22)));
        assert!(!vertical_first((37, 23), (7, 46)));
        assert!(!vertical_first((96, 64), (288, 128)));
        // Both shrink: vertical first only past the boundary; the tie goes horizontal first.
        assert!(vertical_first((40, 64), (19, 20)));
        assert!(!vertical_first((40, 64), (18, 20)));
        assert!(!vertical_first((96, 64), (7, 3)));
    }
}
