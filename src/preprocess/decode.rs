//! Decoding uploaded image bytes into a `DynamicImage`, the way transformers' `load_image` opens
//! them with Pillow: the format is sniffed from the magic bytes (PNG, JPEG, WebP, GIF only), an
//! animated GIF or WebP yields its first frame, and the EXIF orientation is applied
//! (`PIL.ImageOps.exif_transpose`). Alpha is kept; `rgb` decides what to do with it.
//!
//! Nothing is decoded before the header's width and height pass the [`ImageLimits`], so a small
//! file that declares a huge image (a decompression bomb) costs only its header.
//!
//! JPEG pixels come from libjpeg-turbo, as in Pillow (see `jpeg`), so they are bit-identical to
//! Pillow's; the `image` crate only reads the JPEG's EXIF orientation. Other formats are decoded
//! by the `image` crate.
//!
//! Known gap versus Pillow: Pillow also reads an orientation from XMP (`tiff:Orientation`) when
//! there is no EXIF one.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

use super::{jpeg, ImageLimits, PreprocessError};

/// Largest decoded buffer we accept, in bytes (the `image` crate's default limit). An RGB8 image
/// of 178 megapixels (Pillow's own decompression-bomb error threshold) needs about this much.
const MAX_DECODED_BYTES: u64 = 512 * 1024 * 1024;

/// True for data that starts like SVG or other XML (after leading whitespace).
fn looks_like_xml(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let head = &bytes[start..bytes.len().min(start + 5)];
    head.eq_ignore_ascii_case(b"<svg ") || head.starts_with(b"<?xml") || head.starts_with(b"<svg")
}

/// Sniffs the container format from the first bytes, accepting only the four we serve.
fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::InvalidImage("empty image data".into()));
    }
    if looks_like_xml(bytes) {
        return Err(PreprocessError::UnsupportedFormat(
            "svg (vector images)".into(),
        ));
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(ImageFormat::Png);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Ok(ImageFormat::Gif);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(ImageFormat::WebP);
    }
    match image::guess_format(bytes) {
        Ok(f) => Err(PreprocessError::UnsupportedFormat(
            f.extensions_str()
                .first()
                .copied()
                .unwrap_or("unknown")
                .to_string(),
        )),
        Err(_) => Err(PreprocessError::InvalidImage(
            "the data is not a png, jpeg, webp or gif image".into(),
        )),
    }
}

fn map_image_error(format: ImageFormat, err: ImageError) -> PreprocessError {
    let name = format.extensions_str().first().copied().unwrap_or("image");
    match err {
        ImageError::Limits(e) => PreprocessError::ImageTooLarge(format!("{name}: {e}")),
        ImageError::Unsupported(e) => PreprocessError::UnsupportedFormat(format!("{name}: {e}")),
        other => PreprocessError::InvalidImage(format!("{name}: {other}")),
    }
}

/// Decodes PNG, JPEG, WebP or GIF bytes (first frame), with the EXIF orientation applied.
///
/// Errors: `UnsupportedFormat` for any other format (BMP, TIFF, SVG, ...), `InvalidImage` for
/// empty, unrecognized, truncated or corrupt data, `ImageTooLarge`, `ImageTooSmall` or
/// `AspectRatio` when the bytes or the header's size break `limits` (checked before decoding
/// pixels) or past the decoder memory cap. Never panics.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    limits.check_bytes(bytes.len())?;
    let format = sniff_format(bytes)?;
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, limits);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    let mut memory = Limits::default();
    memory.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(memory);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(format, e))?;
    let (w, h) = decoder.dimensions();
    limits.check_dimensions(w, h)?;
    // `into_decoder` checks dimensions but not `max_alloc` against the output buffer.
    let needed = decoder.total_bytes();
    if needed > MAX_DECODED_BYTES {
        return Err(PreprocessError::ImageTooLarge(format!(
            "{w}x{h} pixels need {needed} bytes decoded (limit {MAX_DECODED_BYTES})"
        )));
    }
    // A malformed EXIF block is ignored, as Pillow's exif_transpose does.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(format, e))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(PreprocessError::InvalidImage(
            "image has zero width or height".into(),
        ));
    }
    img.apply_orientation(orientation);
    Ok(img)
}

/// The EXIF orientation of a JPEG, read by the `image` crate's decoder from the headers only (no
/// pixel decoding). Anything it cannot parse counts as no orientation, as a malformed EXIF block
/// is ignored by Pillow's `exif_transpose`.
fn jpeg_orientation(bytes: &[u8]) -> Orientation {
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(ImageFormat::Jpeg);
    reader
        .into_decoder()
        .ok()
        .and_then(|mut d| d.orientation().ok())
        .unwrap_or(Orientation::NoTransforms)
}

/// JPEG: libjpeg-turbo pixels (bit-identical to Pillow's), then the EXIF orientation.
fn decode_jpeg(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    let header = jpeg::read_header(bytes)?;
    let too_wide =
        |_| PreprocessError::ImageTooLarge(format!("jpg: {}x{}", header.width, header.height));
    let w = u32::try_from(header.width).map_err(too_wide)?;
    let h = u32::try_from(header.height).map_err(too_wide)?;
    limits.check_dimensions(w, h)?;
    let needed = header.decoded_bytes();
    if needed > MAX_DECODED_BYTES {
        return Err(PreprocessError::ImageTooLarge(format!(
            "{}x{} pixels need {needed} bytes decoded (limit {MAX_DECODED_BYTES})",
            header.width, header.height
        )));
    }
    let mut img = jpeg::decode_pixels(bytes, &header)?;
    img.apply_orientation(jpeg_orientation(bytes));
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ExtendedColorType, ImageEncoder, Rgba, RgbaImage};

    fn decode(bytes: &[u8]) -> Result<DynamicImage, PreprocessError> {
        decode_image(bytes, &ImageLimits::default())
    }

    fn sample(w: u32, h: u32) -> RgbaImage {
        RgbaImage::from_fn(w, h, |x, y| {
            Rgba([(x * 40) as u8, (y * 40) as u8, 100, 255])
        })
    }

    fn encode(format: ImageFormat, img: &RgbaImage) -> Vec<u8> {
        let mut buf = Vec::new();
        let (w, h) = img.dimensions();
        match format {
            ImageFormat::Png => image::codecs::png::PngEncoder::new(&mut buf)
                .write_image(img.as_raw(), w, h, ExtendedColorType::Rgba8)
                .unwrap(),
            ImageFormat::Jpeg => {
                let rgb = DynamicImage::ImageRgba8(img.clone()).to_rgb8();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
                    .write_image(rgb.as_raw(), w, h, ExtendedColorType::Rgb8)
                    .unwrap()
            }
            ImageFormat::WebP => image::codecs::webp::WebPEncoder::new_lossless(&mut buf)
                .write_image(img.as_raw(), w, h, ExtendedColorType::Rgba8)
                .unwrap(),
            ImageFormat::Gif => {
                let mut enc = image::codecs::gif::GifEncoder::new(&mut buf);
                enc.encode(img.as_raw(), w, h, ExtendedColorType::Rgba8)
                    .unwrap();
            }
            _ => unreachable!(),
        }
        buf
    }

    #[test]
    fn decodes_each_supported_format() {
        let img = sample(5, 3);
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Gif,
        ] {
            let out = decode(&encode(format, &img)).unwrap();
            assert_eq!((out.width(), out.height()), (5, 3), "{format:?}");
            if format != ImageFormat::Jpeg {
                // Lossless formats (the GIF palette holds these few colors exactly).
                assert_eq!(out.to_rgba8(), img, "{format:?}");
            }
        }
    }

    #[test]
    fn every_format_is_checked_against_the_limits() {
        type Is = fn(&PreprocessError) -> bool;
        let large: Is = |e| matches!(e, PreprocessError::ImageTooLarge(_));
        let small: Is = |e| matches!(e, PreprocessError::ImageTooSmall(_));
        let thin: Is = |e| matches!(e, PreprocessError::AspectRatio(_));
        let base = ImageLimits::default();
        let cases = [
            (
                ImageLimits {
                    max_width: 39,
                    ..base
                },
                large,
            ),
            (
                ImageLimits {
                    max_pixels: 159,
                    ..base
                },
                large,
            ),
            (
                ImageLimits {
                    max_bytes: 10,
                    ..base
                },
                large,
            ),
            (
                ImageLimits {
                    min_side: 5,
                    ..base
                },
                small,
            ),
            (
                ImageLimits {
                    max_aspect_ratio: 9,
                    ..base
                },
                thin,
            ),
        ];
        let just_fits = ImageLimits {
            max_width: 40,
            max_pixels: 160,
            min_side: 4,
            max_aspect_ratio: 10,
            ..base
        };
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Gif,
        ] {
            let bytes = encode(format, &sample(40, 4));
            for (limits, is) in &cases {
                let err = decode_image(&bytes, limits).unwrap_err();
                assert!(is(&err), "{format:?} {limits:?}: {err}");
            }
            assert!(decode_image(&bytes, &just_fits).is_ok(), "{format:?}");
        }
    }

    #[test]
    fn truncated_and_corrupt_data_are_client_errors() {
        let img = sample(16, 16);
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Gif,
        ] {
            let bytes = encode(format, &img);
            for cut in [bytes.len() / 2, 20, 12] {
                let err = decode(&bytes[..cut]).unwrap_err();
                assert!(err.is_client_error(), "{format:?} cut at {cut}: {err}");
            }
            let mut garbled = bytes.clone();
            for b in garbled.iter_mut().skip(16) {
                *b ^= 0x5A;
            }
            if let Err(err) = decode(&garbled) {
                assert!(err.is_client_error(), "{format:?} garbled: {err}");
            }
        }
        assert!(matches!(decode(&[]), Err(PreprocessError::InvalidImage(_))));
    }

    /// A valid 1x1 24-bit BMP (the `image` crate is built without its BMP codec).
    fn tiny_bmp() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"BM");
        b.extend_from_slice(&58u32.to_le_bytes()); // file size
        b.extend_from_slice(&0u32.to_le_bytes()); // reserved
        b.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
        b.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER size
        b.extend_from_slice(&1i32.to_le_bytes()); // width
        b.extend_from_slice(&1i32.to_le_bytes()); // height
        b.extend_from_slice(&1u16.to_le_bytes()); // planes
        b.extend_from_slice(&24u16.to_le_bytes()); // bits per pixel
        b.extend_from_slice(&[0; 24]); // compression, sizes, resolution, palette counts
        b.extend_from_slice(&[10, 20, 30, 0]); // one BGR pixel, row padded to 4 bytes
        b
    }

    #[test]
    fn bmp_and_svg_are_unsupported_noise_is_invalid() {
        let bmp = tiny_bmp();
        let err = decode(&bmp).unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedFormat(_)),
            "{err}"
        );
        assert!(err.is_client_error());
        let err = decode(b"hello, world").unwrap_err();
        assert!(matches!(err, PreprocessError::InvalidImage(_)), "{err}");
        let svg = b"  <svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>";
        let err = decode(svg).unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedFormat(_)),
            "{err}"
        );
    }

    /// CRC-32 (IEEE) of a PNG chunk's type and data.
    fn png_crc(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn huge_dimensions_are_rejected_before_allocating() {
        // A 1x1 PNG whose header is patched to claim 50000 x 50000 RGBA (10 GB decoded).
        let mut png = encode(ImageFormat::Png, &sample(1, 1));
        png[16..20].copy_from_slice(&50_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        let crc = png_crc(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode(&png).unwrap_err();
        assert!(matches!(err, PreprocessError::ImageTooLarge(_)), "{err}");
        assert!(err.is_client_error());
    }

    fn photo(name: &str) -> Vec<u8> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        std::fs::read(dir.join(name)).unwrap()
    }

    #[test]
    fn truncated_or_corrupt_jpegs_are_invalid_not_panics() {
        // Pillow raises on a truncated JPEG; libjpeg-turbo's "premature end" warning is an error.
        for name in [
            "images/bike.jpg",
            "preprocess/inputs/jpeg/progressive_420.jpg",
        ] {
            let bytes = photo(name);
            for cut in [
                bytes.len() - 2,
                bytes.len() * 3 / 4,
                bytes.len() / 2,
                300,
                4,
            ] {
                let err = decode(&bytes[..cut]).unwrap_err();
                assert!(
                    matches!(err, PreprocessError::InvalidImage(_)),
                    "{name} cut at {cut}: {err}"
                );
            }
            // Garbled entropy data after the headers: an error or some pixels, never a panic.
            let mut garbled = bytes.clone();
            let n = garbled.len();
            for b in garbled[n / 2..n - 2].iter_mut() {
                *b ^= 0x5A;
            }
            if let Err(err) = decode(&garbled) {
                assert!(
                    matches!(err, PreprocessError::InvalidImage(_)),
                    "{name}: {err}"
                );
            }
        }
    }

    #[test]
    fn junk_before_the_final_marker_is_tolerated_like_pillow() {
        // Pillow decodes this (some cameras write it) to the same pixels as the clean file.
        let clean = photo("preprocess/inputs/jpeg/baseline_420.jpg");
        let n = clean.len();
        let mut junk = clean[..n - 2].to_vec();
        junk.extend_from_slice(&[0x00, 0x11, 0x22]);
        junk.extend_from_slice(&clean[n - 2..]);
        let want = decode(&clean).unwrap();
        assert_eq!(decode(&junk).unwrap(), want);
    }

    #[test]
    fn huge_jpeg_is_rejected_from_its_header() {
        // Patch the SOF0 of a small baseline JPEG to claim 60000 x 60000 (10.8 GB of RGB).
        let mut bytes = photo("preprocess/inputs/jpeg/baseline_420.jpg");
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bytes[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, PreprocessError::ImageTooLarge(_)), "{err}");
    }

    #[test]
    fn grayscale_jpeg_stays_luma_and_orientation_applies() {
        let gray = decode(&photo("preprocess/inputs/jpeg/gray.jpg")).unwrap();
        assert!(matches!(gray, DynamicImage::ImageLuma8(_)));
        assert_eq!((gray.width(), gray.height()), (45, 31));
        // Stored 48 x 32 with EXIF Orientation 6 (rotate 90 degrees clockwise).
        let rotated = decode(&photo("preprocess/inputs/exif_rotated.jpg")).unwrap();
        assert_eq!((rotated.width(), rotated.height()), (32, 48));
    }

    #[test]
    fn degenerate_images_decode() {
        for (w, h) in [(1, 1), (1, 500), (500, 1)] {
            let img = sample(w, h);
            let out = decode(&encode(ImageFormat::Png, &img)).unwrap();
            assert_eq!((out.width(), out.height()), (w, h));
        }
    }
}
