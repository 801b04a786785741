//! Pillow's `Image.resize` for 8-bit RGB images, bit-exact.
//!
//! Convolution filters follow libImaging/Resample.c (`ImagingResample`): a separable two-pass
//! convolution. Per output pixel the filter support is scaled by the downscale factor, the weights
//! are normalized to sum 1, converted to fixed point with 22 fractional bits, and each pass rounds
//! and clips to uint8. A pass whose size does not change is skipped. The horizontal pass runs
//! first (over only the input rows the vertical pass will read), except that Pillow 13
//! (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by more than
//! twice as many pixels as the width does (`in_h - out_h > 2 * (in_w - out_w)`, `out_h < in_h`).
//! The order moves some outputs by one level; the rule was established against Pillow 13.0.0, the
//! reference here (older Pillow always goes horizontal first). `Nearest` follows
//! `ImagingScaleAffine` (libImaging/Geometry.c): source coordinates accumulated in f64 from the
//! pixel centers, then truncated.
//!
//! `resize_rgb8_window` computes only a rectangle of the output. Every output pixel of Pillow's
//! algorithm depends only on its own coefficients, so a window equals the same crop of the full
//! resize; this bounds the work of "resize shortest edge, then center crop" on extreme aspect
//! ratios (a 1x100000 image upscaled to shortest edge 336 would otherwise be 336x33.6M).

mod convolve;

use image::RgbImage;

use convolve::convolve_window;

/// Interleaved channels of an RGB image.
const CHANNELS: usize = 3;

/// Pillow's resampling filters, with the integer codes used by `resample` in
/// `preprocessor_config.json` (`PIL.Image.Resampling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// Code 0.
    Nearest,
    /// Code 1 (Lanczos-3, truncated sinc).
    Lanczos,
    /// Code 2 (triangle filter).
    Bilinear,
    /// Code 3 (Keys cubic, a = -0.5).
    Bicubic,
    /// Code 4 (area average).
    Box,
    /// Code 5.
    Hamming,
}

impl Resample {
    /// The filter for a PIL resampling code, `None` for unknown codes (PIL's 6 and 7, MKS2013 and
    /// MKS2021, are not implemented).
    pub fn from_pil_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    /// The convolution kernel, `None` for `Nearest` (not a convolution).
    fn kernel(self) -> Option<Kernel> {
        let (support, eval): (f64, fn(f64) -> f64) = match self {
            Self::Nearest => return None,
            Self::Box => (0.5, box_filter),
            Self::Bilinear => (1.0, bilinear_filter),
            Self::Hamming => (1.0, hamming_filter),
            Self::Bicubic => (2.0, bicubic_filter),
            Self::Lanczos => (3.0, lanczos_filter),
        };
        Some(Kernel { support, eval })
    }
}

/// A convolution filter: its half-width at scale 1 and its weight function.
#[derive(Clone, Copy)]
struct Kernel {
    support: f64,
    eval: fn(f64) -> f64,
}

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes the constants as C floats (0.54f, 0.46f), promoted to double.
    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// A rectangle of the output image: columns `x..x + width`, rows `y..y + height`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Window {
    /// The whole of a `width` x `height` image.
    pub fn full(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            width,
            height,
        }
    }

    /// This window intersected with a `width` x `height` image.
    fn clamp_to(self, width: u32, height: u32) -> Self {
        let x = self.x.min(width);
        let y = self.y.min(height);
        Self {
            x,
            y,
            width: self.width.min(width - x),
            height: self.height.min(height - y),
        }
    }
}

/// Pillow's `img.resize((width, height), filter)` for an RGB image, bit-exact.
pub fn resize_rgb8(src: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    resize_rgb8_window(src, (width, height), Window::full(width, height), filter)
}

/// The `window` part of `resize_rgb8(src, out_size.0, out_size.1, filter)`, computed without the
/// rest. A window reaching past `out_size` is clamped to it; an empty source or output gives an
/// empty image.
pub fn resize_rgb8_window(
    src: &RgbImage,
    out_size: (u32, u32),
    window: Window,
    filter: Resample,
) -> RgbImage {
    let (out_w, out_h) = out_size;
    let win = window.clamp_to(out_w, out_h);
    if src.width() == 0 || src.height() == 0 || win.width == 0 || win.height == 0 {
        return RgbImage::new(win.width, win.height);
    }
    match filter.kernel() {
        None => nearest_window(src, out_size, win),
        Some(kernel) => convolve_window(src, out_size, win, kernel),
    }
}

/// Source indices of output positions `first..first + n` for Pillow's nearest-neighbour scale:
/// `pos = step / 2`, then `pos += step` per output from position 0 (the rounding of this running
/// sum is part of the result), each truncated; `None` when outside the source.
fn nearest_table(in_size: u32, out_size: u32, first: u32, n: u32) -> Vec<Option<usize>> {
    let step = f64::from(in_size as f32) / f64::from(out_size);
    let mut pos = step * 0.5;
    let mut table = Vec::with_capacity(n as usize);
    for i in 0..first + n {
        if i >= first {
            let idx = if pos < 0.0 { -1 } else { pos as i64 };
            table.push(
                (0..i64::from(in_size))
                    .contains(&idx)
                    .then_some(idx as usize),
            );
        }
        pos += step;
    }
    table
}

fn nearest_window(src: &RgbImage, (out_w, out_h): (u32, u32), win: Window) -> RgbImage {
    let (in_w, in_h) = src.dimensions();
    if (out_w, out_h) == (in_w, in_h) {
        // Pillow copies an image resized to its own size.
        return image::imageops::crop_imm(src, win.x, win.y, win.width, win.height).to_image();
    }
    let cols = nearest_table(in_w, out_w, win.x, win.width);
    let rows = nearest_table(in_h, out_h, win.y, win.height);
    let mut out = RgbImage::new(win.width, win.height);
    for (yy, row) in rows.iter().enumerate() {
        let Some(sy) = *row else { continue };
        for (xx, col) in cols.iter().enumerate() {
            if let Some(sx) = *col {
                out.put_pixel(xx as u32, yy as u32, *src.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 13) as u8, ((x ^ y) * 5) as u8])
        })
    }

    #[test]
    fn pil_codes_round_trip() {
        assert_eq!(Resample::from_pil_code(3), Some(Resample::Bicubic));
        assert_eq!(Resample::from_pil_code(0), Some(Resample::Nearest));
        assert_eq!(Resample::from_pil_code(6), None);
    }

    #[test]
    fn same_size_is_identity_for_every_filter() {
        let img = gradient(9, 5);
        for code in 0..=5 {
            let f = Resample::from_pil_code(code).unwrap();
            assert_eq!(resize_rgb8(&img, 9, 5, f), img, "filter {f:?}");
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let img = gradient(37, 23);
        for code in 0..=5 {
            let f = Resample::from_pil_code(code).unwrap();
            for (ow, oh) in [(16, 50), (80, 11), (37, 9), (5, 23)] {
                let full = resize_rgb8(&img, ow, oh, f);
                let win = Window {
                    x: ow / 3,
                    y: oh / 4,
                    width: ow / 2,
                    height: oh / 2,
                };
                let part = resize_rgb8_window(&img, (ow, oh), win, f);
                let crop = image::imageops::crop_imm(&full, win.x, win.y, win.width, win.height)
                    .to_image();
                assert_eq!(part, crop, "filter {f:?} to {ow}x{oh}");
            }
        }
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let one = gradient(1, 1);
        let line = gradient(1, 500);
        for code in 0..=5 {
            let f = Resample::from_pil_code(code).unwrap();
            assert_eq!(resize_rgb8(&one, 7, 3, f).dimensions(), (7, 3));
            assert_eq!(resize_rgb8(&line, 48, 2, f).dimensions(), (48, 2));
            assert_eq!(resize_rgb8(&line, 1, 1, f).dimensions(), (1, 1));
            let empty = resize_rgb8_window(
                &line,
                (4, 4),
                Window {
                    x: 9,
                    y: 9,
                    width: 3,
                    height: 3,
                },
                f,
            );
            assert_eq!(empty.dimensions(), (0, 0));
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        // Weights sum to 1 << 22 up to rounding, so a flat image stays flat after any resize.
        let img = RgbImage::from_pixel(13, 7, image::Rgb([200, 3, 77]));
        for code in 0..=5 {
            let f = Resample::from_pil_code(code).unwrap();
            let out = resize_rgb8(&img, 29, 4, f);
            assert!(out.pixels().all(|p| p.0 == [200, 3, 77]), "filter {f:?}");
        }
    }
}
