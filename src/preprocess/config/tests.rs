//! Tests of `preprocessor_config.json` parsing: real 4.x / 5.x layouts, defaults, and rejections.

use super::*;

fn parse(json: &str) -> Result<ImageProcessor, PreprocessError> {
    ImageProcessor::from_json_str(json)
}

/// openai/clip-vit-large-patch14-336 (a transformers 4.x feature-extractor era file).
const CLIP_336_V4: &str = r#"{
  "crop_size": 336, "do_center_crop": true, "do_normalize": true, "do_resize": true,
  "feature_extractor_type": "CLIPFeatureExtractor",
  "image_mean": [0.48145466, 0.4578275, 0.40821073],
  "image_std": [0.26862954, 0.26130258, 0.27577711],
  "resample": 3, "size": 336
}"#;

/// llava-hf style CLIP config (transformers 4.4x writer).
const LLAVA_CLIP_V4: &str = r#"{
  "crop_size": {"height": 336, "width": 336}, "do_center_crop": true, "do_convert_rgb": true,
  "do_normalize": true, "do_rescale": true, "do_resize": true,
  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
  "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
  "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}
}"#;

/// google/siglip-so400m-patch14-384 style (no do_convert_rgb, no crop keys).
const SIGLIP_V4: &str = r#"{
  "do_normalize": true, "do_rescale": true, "do_resize": true,
  "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
  "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
  "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}
}"#;

#[test]
fn real_configs_parse() {
    let clip = parse(CLIP_336_V4).unwrap();
    assert_eq!(clip.resize, Some(ResizeTo::ShortestEdge(336)));
    assert_eq!(clip.center_crop, Some((336, 336)));
    assert_eq!(clip.output_size(), (336, 336));
    assert_eq!(clip.rescale, Some(1.0 / 255.0));

    let llava = parse(LLAVA_CLIP_V4).unwrap();
    assert_eq!(llava.output_size(), (336, 336));
    assert_eq!(llava.resample, Resample::Bicubic);

    let siglip = parse(SIGLIP_V4).unwrap();
    assert_eq!(
        siglip.resize,
        Some(ResizeTo::Exact {
            height: 384,
            width: 384
        })
    );
    assert_eq!(siglip.center_crop, None);
    assert_eq!(siglip.output_size(), (384, 384));
    assert!(siglip.converts_rgb());
    assert_eq!(
        siglip.normalize,
        Some(Normalize {
            mean: [0.5; 3],
            std: [0.5; 3]
        })
    );
}

#[test]
fn class_defaults_fill_missing_and_null_keys() {
    let clip =
        parse(r#"{"image_processor_type": "CLIPImageProcessorFast", "crop_size": null}"#).unwrap();
    assert_eq!(clip.resize, Some(ResizeTo::ShortestEdge(224)));
    assert_eq!(clip.center_crop, Some((224, 224)));
    let Normalize { mean, std } = clip.normalize.unwrap();
    assert_eq!(mean, OPENAI_CLIP_MEAN.map(|x| x as f32));
    assert_eq!(std, OPENAI_CLIP_STD.map(|x| x as f32));

    let siglip =
        parse(r#"{"image_processor_type": "SiglipImageProcessorFast", "unknown": [1]}"#).unwrap();
    assert_eq!(siglip.output_size(), (224, 224));
    assert_eq!(siglip.resample, Resample::Bicubic);
}

#[test]
fn size_forms() {
    let p = parse(r#"{"image_processor_type": "SiglipImageProcessor", "size": [20, 30]}"#).unwrap();
    assert_eq!(p.output_size(), (20, 30));
    let p = parse(r#"{"image_processor_type": "SiglipImageProcessor", "size": 32, "default_to_square": true}"#).unwrap();
    assert_eq!(p.output_size(), (32, 32));
    // A bare int means shortest edge for SigLIP too (default_to_square = False), which has no
    // center crop: the output size would vary, so this is rejected.
    let e = parse(r#"{"image_processor_type": "SiglipImageProcessor", "size": 32}"#).unwrap_err();
    assert!(e.to_string().contains("depend on the input"), "{e}");
    let p = parse(r#"{"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 10, "width": 12}}"#).unwrap();
    assert_eq!(p.output_size(), (10, 12));
}

#[test]
fn bad_configs_are_config_errors() {
    let cases = [
        "not json",
        "[]",
        r#"{}"#,
        r#"{"image_processor_type": "Qwen2VLImageProcessor"}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "resample": 7}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "resample": "bicubic"}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 10}}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "size": 0}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "crop_size": -3}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5]}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "image_std": 0}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "do_resize": "yes"}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "do_pad": true}"#,
        r#"{"image_processor_type": "CLIPImageProcessor", "do_center_crop": false}"#,
        r#"{"image_processor_type": "SiglipImageProcessor", "do_center_crop": true}"#,
        r#"{"image_processor_type": "SiglipImageProcessor", "do_resize": false}"#,
    ];
    for json in cases {
        let e = parse(json).unwrap_err();
        assert!(matches!(e, PreprocessError::Config(_)), "{json}: {e}");
        assert!(!e.is_client_error());
    }
}

#[test]
fn read_from_either_file_and_errors_name_it() {
    use crate::preprocess::read_image_processor;
    let dir = std::env::temp_dir().join(format!("mmserve-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let read = |dir: &std::path::Path| read_image_processor(dir, ImageProcessor::from_json_str);
    let missing = read(&dir).unwrap_err();
    assert!(missing.to_string().contains("image_processor"), "{missing}");
    // transformers 5's processor save: the settings nested in processor_config.json.
    let nested = dir.join("processor_config.json");
    let entry = |json: &str| format!(r#"{{"patch_size": 14, "image_processor": {json}}}"#);
    std::fs::write(&nested, entry(SIGLIP_V4)).unwrap();
    assert_eq!(read(&dir).unwrap().output_size(), (384, 384));
    std::fs::write(
        &nested,
        entry(r#"{"image_processor_type": "CLIPImageProcessor", "resample": 9}"#),
    )
    .unwrap();
    let e = read(&dir).unwrap_err();
    assert!(
        e.to_string()
            .contains("processor_config.json: image_processor"),
        "{e}"
    );
    // preprocessor_config.json, when present, wins.
    let path = dir.join("preprocessor_config.json");
    std::fs::write(
        &path,
        r#"{"image_processor_type": "CLIPImageProcessor", "resample": 9}"#,
    )
    .unwrap();
    let e = read(&dir).unwrap_err();
    assert!(e.to_string().contains("preprocessor_config.json"), "{e}");
    std::fs::write(&path, SIGLIP_V4).unwrap();
    assert_eq!(read(&dir).unwrap().output_size(), (384, 384));
    std::fs::remove_dir_all(&dir).unwrap();
}
