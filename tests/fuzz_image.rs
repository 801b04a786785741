//! Property test (fuzzing on stable Rust) of the image path: for any bytes —
//! noise, mutated real PNG/JPEG/GIF/WebP files, or valid images of odd sizes
//! and colour types — decoding under the default limits and every family's
//! preprocessing never panic and fail only with a client error.
//!
//! Cases: `PROPTEST_CASES` (default 48, for CI); e.g.
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_image` for a long run.

mod common;

use common::fuzz;

use std::io::Cursor;
use std::sync::OnceLock;

use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};
use mmserve::config::Config;
use mmserve::preprocess::{
    decode_image, read_image_processor, Idefics3ImageProcessor, ImageLimits, ImageProcessor,
    PreprocessError, Qwen2VlImageProcessor,
};
use proptest::prelude::*;

/// Every family's processor, loaded once.
struct Processors {
    clip: ImageProcessor,
    siglip: ImageProcessor,
    qwen2vl: Qwen2VlImageProcessor,
    idefics3: Idefics3ImageProcessor,
    limits: ImageLimits,
}

fn processors() -> &'static Processors {
    static P: OnceLock<Processors> = OnceLock::new();
    P.get_or_init(|| {
        let dir = |m: &str| common::model_dir(m);
        Processors {
            clip: read_image_processor(&dir("llava-clip-llama"), ImageProcessor::from_json_str)
                .unwrap(),
            siglip: read_image_processor(&dir("llava-siglip-qwen2"), ImageProcessor::from_json_str)
                .unwrap(),
            qwen2vl: read_image_processor(
                &dir("qwen2-vl-tiny"),
                Qwen2VlImageProcessor::from_json_str,
            )
            .unwrap(),
            idefics3: read_image_processor(
                &dir("idefics3-tiny"),
                Idefics3ImageProcessor::from_json_str,
            )
            .unwrap(),
            limits: Config::load(None).unwrap().limits.image(),
        }
    })
}

/// Small real files of each format, the seeds of mutation.
fn seeds() -> &'static [Vec<u8>] {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let f = common::fixtures();
        [
            "bad_inputs/ok.png",
            "images/palette.gif",
            "images/exif_rotated.jpg",
            "images/rgba.png",
            "preprocess/inputs/anim.webp",
            "preprocess/inputs/anim.gif",
            "preprocess/inputs/cmyk.jpg",
            "preprocess/inputs/gray16.png",
            "preprocess/inputs/la16.png",
        ]
        .iter()
        .map(|p| std::fs::read(f.join(p)).unwrap())
        .collect()
    })
}

/// A valid image of an odd size and colour type, encoded in one of the four formats.
fn generated() -> impl Strategy<Value = Vec<u8>> {
    let sizes = prop_oneof![
        (1u32..40, 1u32..40),
        (1u32..4, 1u32..900),
        (1u32..900, 1u32..4)
    ];
    (sizes, 0usize..4, 0usize..4, any::<u64>()).prop_map(|((w, h), format, color, seed)| {
        let img = RgbaImage::from_fn(w, h, |x, y| {
            let v = seed.wrapping_mul(u64::from(x * 31 + y * 17 + 1));
            Rgba([v as u8, (v >> 8) as u8, (v >> 16) as u8, (v >> 24) as u8])
        });
        let img = match color {
            0 => DynamicImage::ImageRgba8(img),
            1 => DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(img).to_rgb8()),
            2 => DynamicImage::ImageLuma8(DynamicImage::ImageRgba8(img).to_luma8()),
            _ => DynamicImage::ImageLumaA8(DynamicImage::ImageRgba8(img).to_luma_alpha8()),
        };
        let format = [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Gif,
            ImageFormat::WebP,
        ][format];
        let img = match format {
            // JPEG has no alpha; the WebP encoder takes 8-bit RGB(A) only.
            ImageFormat::Jpeg => DynamicImage::ImageRgb8(img.to_rgb8()),
            ImageFormat::WebP | ImageFormat::Gif => DynamicImage::ImageRgba8(img.to_rgba8()),
            _ => img,
        };
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encode");
        out.into_inner()
    })
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512),
        4 => (0..seeds().len(), prop::collection::vec(fuzz::edit(), 1..6))
            .prop_map(|(s, edits)| fuzz::apply(seeds()[s].clone(), &edits)),
        3 => generated(),
    ]
}

fn client_error(e: &PreprocessError) -> Result<(), TestCaseError> {
    prop_assert!(e.is_client_error(), "not a client error: {e}");
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config())]

    #[test]
    fn decoding_and_preprocessing_never_panic(bytes in input()) {
        let p = processors();
        let img = match decode_image(&bytes, &p.limits) {
            Ok(img) => img,
            Err(e) => return client_error(&e),
        };
        for processor in [&p.clip, &p.siglip] {
            match processor.preprocess(&img) {
                Ok(t) => prop_assert_eq!(t.dims()[0], 3),
                Err(e) => client_error(&e)?,
            }
        }
        match p.qwen2vl.preprocess(&img) {
            Ok(q) => prop_assert!(p.qwen2vl.num_image_tokens(q.grid_thw) > 0),
            Err(e) => client_error(&e)?,
        }
        if let Err(e) = p.idefics3.preprocess(&img) {
            client_error(&e)?;
        }
    }
}
