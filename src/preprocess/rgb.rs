//! Conversion of a decoded image to 8-bit RGB, matching transformers 5's `convert_to_rgb` on the
//! PIL image that Pillow would have opened from the same file.
//!
//! transformers 5 (`image_transforms.convert_to_rgb`, used by both the PIL and the torchvision
//! backend for PIL inputs) composites any transparency onto an opaque white background with
//! `PIL.Image.alpha_composite` and then drops alpha; images without alpha go through
//! `Image.convert("RGB")`. (Its `load_image` helper, by contrast, calls a plain
//! `convert("RGB")` that drops alpha without compositing; we follow the image processor.)
//!
//! How Pillow opens what the `image` crate gives us, and what `convert("RGB")` then does:
//! - 8-bit L / LA / RGB / RGBA (PNG, JPEG, WebP) and palette or tRNS images (expanded to RGBA by
//!   the `image` crate, carried as `P` + `transparency` by Pillow): channels replicated, alpha
//!   composited on white with Pillow's integer `ImagingAlphaComposite`.
//! - 16-bit RGB / RGBA / LA PNGs: Pillow keeps the high byte of each sample (`RGB;16B` unpacker).
//! - 16-bit grayscale PNGs: Pillow opens them as mode `I;16`, and `convert("RGB")` *clips* each
//!   value to 255 (it does not scale). We reproduce that, because it is what the reference
//!   `pixel_values` contain, even though it whitens most such images.
//! - Float images cannot come from the supported formats; they are converted by the `image`
//!   crate's own rules.

use std::borrow::Cow;

use image::{DynamicImage, Rgb, RgbImage};

/// Fixed-point bits of Pillow's alpha compositing (`PRECISION_BITS` in AlphaComposite.c).
const ALPHA_PRECISION_BITS: u32 = 7;

/// One channel of `alpha_composite(white, (value, alpha))` exactly as Pillow's scalar code path.
fn composite_on_white(value: u8, alpha: u8) -> u8 {
    if alpha == 0 {
        return 255;
    }
    let (value, alpha) = (u32::from(value), u32::from(alpha));
    // The destination is opaque white: dst.a = 255, dst.r = dst.g = dst.b = 255.
    let blend = 255 * (255 - alpha);
    let outa255 = alpha * 255 + blend;
    let coef1 = alpha * 255 * 255 * (1 << ALPHA_PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << ALPHA_PRECISION_BITS) - coef1;
    let tmp = value * coef1 + 255 * coef2 + (0x80 << ALPHA_PRECISION_BITS);
    // SHIFTFORDIV255: a rounded division by 255 done with shifts.
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> ALPHA_PRECISION_BITS) as u8
}

fn gray(v: u8) -> Rgb<u8> {
    Rgb([v, v, v])
}

fn rgba_on_white(p: [u8; 4]) -> Rgb<u8> {
    Rgb([
        composite_on_white(p[0], p[3]),
        composite_on_white(p[1], p[3]),
        composite_on_white(p[2], p[3]),
    ])
}

/// The high byte of a 16-bit sample, as Pillow's `;16B` unpackers keep it.
fn high(v: u16) -> u8 {
    (v >> 8) as u8
}

/// `convert_to_rgb` of transformers 5 applied to the image Pillow would have decoded.
pub fn to_rgb8_like_pil(img: &DynamicImage) -> RgbImage {
    as_rgb8_like_pil(img).into_owned()
}

/// As [`to_rgb8_like_pil`], borrowing an image that is already 8-bit RGB.
pub(super) fn as_rgb8_like_pil(img: &DynamicImage) -> Cow<'_, RgbImage> {
    match img {
        DynamicImage::ImageRgb8(rgb) => Cow::Borrowed(rgb),
        other => Cow::Owned(convert(other)),
    }
}

fn convert(img: &DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma8(l) => RgbImage::from_fn(w, h, |x, y| gray(l.get_pixel(x, y).0[0])),
        DynamicImage::ImageLumaA8(la) => RgbImage::from_fn(w, h, |x, y| {
            let [v, a] = la.get_pixel(x, y).0;
            gray(composite_on_white(v, a))
        }),
        DynamicImage::ImageRgba8(rgba) => {
            RgbImage::from_fn(w, h, |x, y| rgba_on_white(rgba.get_pixel(x, y).0))
        }
        DynamicImage::ImageLuma16(l) => {
            RgbImage::from_fn(w, h, |x, y| gray(l.get_pixel(x, y).0[0].min(255) as u8))
        }
        DynamicImage::ImageLumaA16(la) => RgbImage::from_fn(w, h, |x, y| {
            let [v, a] = la.get_pixel(x, y).0;
            gray(composite_on_white(high(v), high(a)))
        }),
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            Rgb([high(r), high(g), high(b)])
        }),
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            rgba_on_white([high(r), high(g), high(b), high(a)])
        }),
        other => {
            let rgba = other.to_rgba8();
            RgbImage::from_fn(w, h, |x, y| rgba_on_white(rgba.get_pixel(x, y).0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayAlphaImage, GrayImage, ImageBuffer, LumaA, Rgba, RgbaImage};

    #[test]
    fn opaque_and_transparent_extremes() {
        for v in 0..=255u8 {
            // Fully opaque pixels keep their value; fully transparent ones become white.
            assert_eq!(composite_on_white(v, 255), v);
            assert_eq!(composite_on_white(v, 0), 255);
        }
    }

    #[test]
    fn half_alpha_blends_toward_white() {
        // 0 at alpha 128 over white: 255 * 127 / 255 = 127 (Pillow gives 127).
        assert_eq!(composite_on_white(0, 128), 127);
        assert_eq!(composite_on_white(255, 128), 255);
    }

    #[test]
    fn modes_convert_like_pillow() {
        let l = GrayImage::from_pixel(2, 1, image::Luma([9]));
        assert_eq!(
            to_rgb8_like_pil(&DynamicImage::ImageLuma8(l))
                .get_pixel(1, 0)
                .0,
            [9, 9, 9]
        );

        let la = GrayAlphaImage::from_pixel(1, 1, LumaA([0, 0]));
        assert_eq!(
            to_rgb8_like_pil(&DynamicImage::ImageLumaA8(la))
                .get_pixel(0, 0)
                .0,
            [255; 3]
        );

        let rgba = RgbaImage::from_pixel(1, 1, Rgba([10, 20, 30, 255]));
        assert_eq!(
            to_rgb8_like_pil(&DynamicImage::ImageRgba8(rgba))
                .get_pixel(0, 0)
                .0,
            [10, 20, 30]
        );

        let l16: ImageBuffer<image::Luma<u16>, Vec<u16>> =
            ImageBuffer::from_raw(3, 1, vec![7, 255, 40000]).unwrap();
        let out = to_rgb8_like_pil(&DynamicImage::ImageLuma16(l16));
        assert_eq!(
            out.as_raw().as_slice(),
            &[7, 7, 7, 255, 255, 255, 255, 255, 255]
        );

        let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> =
            ImageBuffer::from_raw(1, 1, vec![255, 256, 65535]).unwrap();
        let out = to_rgb8_like_pil(&DynamicImage::ImageRgb16(rgb16));
        assert_eq!(out.get_pixel(0, 0).0, [0, 1, 255]);
    }
}
