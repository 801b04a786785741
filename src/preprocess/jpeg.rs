//! JPEG pixel decoding through libjpeg-turbo (TurboJPEG API, the system `libturbojpeg`), the
//! library Pillow decodes with, so that decoded pixels are bit-identical to Pillow's: accurate
//! integer IDCT (`JDCT_ISLOW`) and "fancy" chroma upsampling, both TurboJPEG's defaults.
//!
//! Output modes follow Pillow: a grayscale JPEG gives `Luma8` (mode "L"), a CMYK or YCCK one is
//! converted to `Rgb8` with Pillow's `CMYK;I` + `convert("RGB")` arithmetic, anything else gives
//! `Rgb8`. The EXIF orientation is not handled here (see `decode`).

use image::{DynamicImage, GrayImage, RgbImage};
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};

use super::PreprocessError;

fn invalid(err: turbojpeg::Error) -> PreprocessError {
    PreprocessError::InvalidImage(format!("jpg: {err}"))
}

/// Width and height from the JPEG header, without decoding any pixels.
pub(super) struct JpegHeader {
    pub width: usize,
    pub height: usize,
    colorspace: Colorspace,
}

impl JpegHeader {
    /// TurboJPEG pixel format we decode into, and its bytes per pixel.
    fn pixel_format(&self) -> (PixelFormat, usize) {
        match self.colorspace {
            Colorspace::Gray => (PixelFormat::GRAY, 1),
            Colorspace::CMYK | Colorspace::YCCK => (PixelFormat::CMYK, 4),
            _ => (PixelFormat::RGB, 3),
        }
    }

    /// Bytes of the buffer libjpeg-turbo decodes into.
    pub fn decoded_bytes(&self) -> u64 {
        let (_, channels) = self.pixel_format();
        (self.width as u64) * (self.height as u64) * (channels as u64)
    }
}

/// Parses the JPEG header (SOF and tables only).
pub(super) fn read_header(bytes: &[u8]) -> Result<JpegHeader, PreprocessError> {
    let mut tj = Decompressor::new().map_err(invalid)?;
    let header = tj.read_header(bytes).map_err(invalid)?;
    if header.width == 0 || header.height == 0 {
        return Err(PreprocessError::InvalidImage(
            "jpg: image has zero width or height".into(),
        ));
    }
    Ok(JpegHeader {
        width: header.width,
        height: header.height,
        colorspace: header.colorspace,
    })
}

/// Decodes the pixels described by `header` (call `read_header` first and check its size).
///
/// Any libjpeg error or warning (truncated data, corrupt entropy data) is an `InvalidImage`,
/// as Pillow raises on a truncated JPEG.
pub(super) fn decode_pixels(
    bytes: &[u8],
    header: &JpegHeader,
) -> Result<DynamicImage, PreprocessError> {
    let (format, channels) = header.pixel_format();
    let (w, h) = (header.width, header.height);
    let mut pixels = vec![0u8; w * h * channels]; // (h, w, channels) row-major
    let mut tj = Decompressor::new().map_err(invalid)?;
    let out = Image {
        pixels: pixels.as_mut_slice(),
        width: w,
        pitch: w * channels,
        height: h,
        format,
    };
    tj.decompress(bytes, out).map_err(invalid)?;
    let too_large = || PreprocessError::ImageTooLarge(format!("jpg: {w}x{h}"));
    let (w32, h32) = (
        u32::try_from(w).map_err(|_| too_large())?,
        u32::try_from(h).map_err(|_| too_large())?,
    );
    let mismatch = || PreprocessError::InvalidImage("jpg: decoded buffer size mismatch".into());
    Ok(match format {
        PixelFormat::GRAY => {
            DynamicImage::ImageLuma8(GrayImage::from_raw(w32, h32, pixels).ok_or_else(mismatch)?)
        }
        PixelFormat::CMYK => DynamicImage::ImageRgb8(
            RgbImage::from_raw(w32, h32, cmyk_to_rgb_like_pil(&pixels)).ok_or_else(mismatch)?,
        ),
        _ => DynamicImage::ImageRgb8(RgbImage::from_raw(w32, h32, pixels).ok_or_else(mismatch)?),
    })
}

/// Pillow's `MULDIV255`: `a * b / 255` rounded, in integers.
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// libjpeg's CMYK samples as Pillow converts them to RGB: it reads them as Adobe-inverted
/// (`CMYK;I`, so Pillow's C = 255 - sample), then `cmyk2rgb` computes
/// R = (255 - K) - MULDIV255(C, 255 - K) (likewise G from M, B from Y).
fn cmyk_to_rgb_like_pil(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        // 255 - Pillow's K is the raw sample.
        let nk = u32::from(px[3]);
        for &sample in &px[..3] {
            let c = 255 - u32::from(sample);
            // muldiv255(c, nk) <= nk, so this never underflows.
            rgb.push((nk - muldiv255(c, nk)) as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn muldiv255_rounds_like_pillow() {
        for a in 0..=255u32 {
            for b in 0..=255u32 {
                let exact = (a * b) as f64 / 255.0;
                assert_eq!(muldiv255(a, b), exact.round() as u32, "{a} {b}");
            }
        }
    }

    #[test]
    fn cmyk_corners_map_to_expected_colors() {
        // Raw (inverted) samples: 255 = no ink, so all-255 is white and K sample 0 is black.
        let cmyk = [255, 255, 255, 255, 0, 255, 255, 255, 10, 20, 30, 0];
        assert_eq!(
            cmyk_to_rgb_like_pil(&cmyk),
            vec![255, 255, 255, 0, 255, 255, 0, 0, 0]
        );
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        for bytes in [
            &[0xFF, 0xD8, 0xFF][..],
            &[0xFF, 0xD8, 0xFF, 0xE0, 0, 2],
            &[],
        ] {
            assert!(matches!(
                read_header(bytes),
                Err(PreprocessError::InvalidImage(_))
            ));
        }
    }
}
