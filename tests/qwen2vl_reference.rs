//! `mmserve::model::qwen2vl` against transformers 5.24: every reference case of both tiny
//! fixtures (Qwen2-VL in the 5.x config shape, Qwen2.5-VL in the sharded 4.x hub shape with
//! window attention) must give the same M-RoPE positions, the same 20 greedy tokens and the same
//! per-step logits; a batch of all cases (chunked prefills beside decodes, sequences joining
//! late) must give each sequence the tokens it gets alone; a bad config must name file and key.
//!
//! Fixtures are made by `scripts/make_vlm_fixtures.py` (transformers 5.24, f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use mmserve::model::qwen2vl::{Qwen2VlCache, Qwen2VlInput, Qwen2VlModel, RopeState};
use mmserve::model::KvCacheConfig;

/// The paged KV cache of a sequence run alone: blocks of 16 positions.
fn alone_cache() -> KvCacheConfig {
    KvCacheConfig::with_bytes(16, 1 << 24)
}

/// The paged KV cache of a batch: blocks of 3 positions, so every sequence spans many blocks,
/// interleaved with its neighbours', and chunks start and end inside blocks.
fn tiny_blocks() -> KvCacheConfig {
    KvCacheConfig::with_bytes(3, 1 << 24)
}

const MODELS: [&str; 2] = ["qwen2-vl-tiny", "qwen2.5-vl-tiny"];

/// Tolerance for logits: |ours - ref| <= ABS + REL * |ref|. Both sides are f32 but accumulate in
/// different orders (candle's gemm vs torch's conv3d/matmul, softmax and norm sums), about 1e-6
/// relative per op over 2 vision + 2 text layers; transformers' own full-forward vs generate
/// logits differ by up to 1.7e-5 on these fixtures. ABS leaves a margin over that, and stays far
/// below the smallest top-1/top-2 gap of any step (0.02), so greedy tokens must match exactly.
const ABS: f32 = 1e-4;
const REL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    name: String,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    image_keys: Vec<String>,
}

struct Reference {
    cases: Vec<Case>,
    tensors: HashMap<String, Tensor>,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn reference(model: &str) -> Reference {
    let dir = fixtures().join("reference");
    let text = std::fs::read_to_string(dir.join(format!("{model}.json"))).expect("reference json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    let cases = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_tokens"]),
            image_keys: c["image_keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{model}.safetensors")), &Device::Cpu)
            .expect("reference tensors");
    let r = Reference { cases, tensors };
    assert!(
        r.cases.iter().any(|c| c.image_keys.len() > 1),
        "{model}: no multi-image case"
    );
    r
}

fn load(model: &str) -> Qwen2VlModel {
    Qwen2VlModel::load(
        &fixtures().join("models").join(model),
        DType::F32,
        &Device::Cpu,
    )
    .expect("model loads")
}

fn grid_of(r: &Reference, key: &str) -> [usize; 3] {
    let g: Vec<Vec<i64>> = r.tensors[&format!("{key}.image_grid_thw")]
        .to_vec2()
        .expect("grid");
    [g[0][0] as usize, g[0][1] as usize, g[0][2] as usize]
}

/// The case's image grids and its encoded image rows (all images concatenated), if any.
fn images(model: &Qwen2VlModel, r: &Reference, case: &Case) -> (Vec<[usize; 3]>, Option<Tensor>) {
    let mut grids = vec![];
    let mut rows = vec![];
    for key in &case.image_keys {
        let grid = grid_of(r, key);
        let patches = &r.tensors[&format!("{key}.pixel_values")];
        let feats = model.encode_image(patches, grid).expect("encode");
        let merge = model.spatial_merge_size();
        assert_eq!(
            feats.dim(0).ok(),
            Some(grid.iter().product::<usize>() / (merge * merge))
        );
        grids.push(grid);
        rows.push(feats);
    }
    let rows = (!rows.is_empty()).then(|| Tensor::cat(&rows, 0).expect("cat"));
    (grids, rows)
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got: Vec<f32> = got.flatten_all().and_then(|t| t.to_vec1()).expect("got");
    let want: Vec<f32> = want.flatten_all().and_then(|t| t.to_vec1()).expect("want");
    let (mut worst, mut max_abs) = (f32::MIN, 0f32);
    for (g, w) in got.iter().zip(&want) {
        max_abs = max_abs.max((g - w).abs());
        worst = worst.max((g - w).abs() - REL * w.abs());
    }
    eprintln!("{what}: max |diff| {max_abs:.2e}");
    assert!(worst <= ABS, "{what}: |diff| - {REL}|ref| reaches {worst}");
}

fn argmax(logits: &Tensor) -> Vec<u32> {
    logits
        .argmax(D::Minus1)
        .and_then(|t| t.to_vec1())
        .expect("argmax")
}

/// Prefill then greedy-decode as many tokens as the reference, one sequence alone.
fn run_alone(
    model: &Qwen2VlModel,
    case: &Case,
    grids: &[[usize; 3]],
    rows: Option<&Tensor>,
) -> (Vec<u32>, Tensor) {
    let mut cache = model.new_cache(&alone_cache()).expect("cache");
    let seq = Qwen2VlInput {
        seq_id: 1,
        tokens: &case.prompt,
        start_pos: 0,
        image_embeds: rows,
        image_grids: grids,
    };
    let mut logits = model.forward(&[seq], &mut cache).expect("prefill");
    let (mut tokens, mut steps) = (vec![], vec![]);
    loop {
        tokens.push(argmax(&logits)[0]);
        steps.push(logits.clone());
        if tokens.len() == case.greedy.len() {
            break;
        }
        let next = [tokens[tokens.len() - 1]];
        let seq = Qwen2VlInput {
            seq_id: 1,
            tokens: &next,
            start_pos: cache.seq_len(1),
            image_embeds: None,
            image_grids: &[],
        };
        logits = model.forward(&[seq], &mut cache).expect("decode");
    }
    (tokens, Tensor::cat(&steps, 0).expect("cat"))
}

#[test]
fn greedy_tokens_and_logits_match_transformers() {
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        for case in &r.cases {
            let (grids, rows) = images(&model, &r, case);
            let (tokens, logits) = run_alone(&model, case, &grids, rows.as_ref());
            assert_eq!(tokens, case.greedy, "{name}/{}: greedy tokens", case.name);
            let want = &r.tensors[&format!("{}.logits", case.name)];
            assert_close(&logits, want, &format!("{name}/{} logits", case.name));
        }
    }
}

#[test]
fn mrope_positions_match_get_rope_index() {
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        for case in &r.cases {
            let grids: Vec<[usize; 3]> = case.image_keys.iter().map(|k| grid_of(&r, k)).collect();
            let mut state = RopeState::default();
            let got = model
                .rope_positions(&mut state, &case.prompt, &grids)
                .expect("positions");
            let want: Vec<Vec<i64>> = r.tensors[&format!("{}.position_ids", case.name)]
                .to_vec2()
                .expect("position_ids");
            for (axis, row) in want.iter().enumerate() {
                let ours: Vec<i64> = got.iter().map(|p| p[axis] as i64).collect();
                assert_eq!(&ours, row, "{name}/{}: stream {axis}", case.name);
            }
            let max = want.iter().flatten().copied().max().unwrap_or(-1);
            let delta = max + 1 - case.prompt.len() as i64;
            assert_eq!(
                state.next_pos as i64 - case.prompt.len() as i64,
                delta,
                "{name}/{}: rope delta",
                case.name
            );
        }
    }
}

/// One sequence's progress in the mixed batch.
struct Running<'a> {
    id: u64,
    case: &'a Case,
    grids: Vec<[usize; 3]>,
    rows: Option<Tensor>,
    /// Prompt tokens fed so far.
    fed: usize,
    out: Vec<u32>,
}

/// All cases in one batch: sequence i joins at step i, prefills in chunks of 7 tokens (so
/// chunks split images) beside other sequences' decodes. Each must produce its solo tokens.
#[test]
fn batch_is_invariant_to_neighbours_and_chunking() {
    const CHUNK: usize = 7;
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let mut pending: Vec<Running<'_>> = r
            .cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let (grids, rows) = images(&model, &r, case);
                Running {
                    id: 100 + i as u64,
                    case,
                    grids,
                    rows,
                    fed: 0,
                    out: vec![],
                }
            })
            .collect();
        let mut cache: Qwen2VlCache = model.new_cache(&tiny_blocks()).expect("cache");
        for step in 0.. {
            if pending.iter().all(|s| s.out.len() == s.case.greedy.len()) {
                break;
            }
            let active: Vec<usize> = (0..pending.len().min(step + 1))
                .filter(|&i| pending[i].out.len() < pending[i].case.greedy.len())
                .collect();
            let mut slices = vec![];
            for &i in &active {
                let s = &pending[i];
                if s.fed < s.case.prompt.len() {
                    let end = (s.fed + CHUNK).min(s.case.prompt.len());
                    let chunk = &s.case.prompt[s.fed..end];
                    let img = model.image_token_id();
                    let before = s.case.prompt[..s.fed].iter().filter(|&&t| t == img).count();
                    let n = chunk.iter().filter(|&&t| t == img).count();
                    let rows = match (&s.rows, n) {
                        (Some(rows), n) if n > 0 => Some(rows.narrow(0, before, n).expect("rows")),
                        _ => None,
                    };
                    slices.push((i, chunk.to_vec(), rows));
                } else {
                    slices.push((i, vec![s.out[s.out.len() - 1]], None));
                }
            }
            let batch: Vec<Qwen2VlInput<'_>> = slices
                .iter()
                .map(|(i, toks, rows)| Qwen2VlInput {
                    seq_id: pending[*i].id,
                    tokens: toks,
                    start_pos: cache.seq_len(pending[*i].id),
                    image_embeds: rows.as_ref(),
                    image_grids: &pending[*i].grids,
                })
                .collect();
            let logits = model.forward(&batch, &mut cache).expect("batched step");
            let next = argmax(&logits);
            for ((i, toks, _), tok) in slices.iter().zip(next) {
                let s = &mut pending[*i];
                if s.fed < s.case.prompt.len() {
                    s.fed += toks.len();
                    if s.fed < s.case.prompt.len() {
                        continue;
                    }
                }
                s.out.push(tok);
            }
        }
        for s in &pending {
            assert_eq!(
                s.out, s.case.greedy,
                "{name}/{}: batched tokens",
                s.case.name
            );
        }
    }
}

#[test]
fn bad_config_names_file_and_key() {
    let src = fixtures().join("models/qwen2-vl-tiny");
    let dir = std::env::temp_dir().join(format!("mmserve-qwen2vl-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = std::fs::read_to_string(src.join("config.json")).expect("config");
    let bad = config.replacen(
        "\"mrope_section\": [\n        2,",
        "\"mrope_section\": [\n        4,",
        1,
    );
    assert_ne!(bad, config, "fixture config layout changed");
    std::fs::write(dir.join("config.json"), bad).expect("write");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).expect("copy");
    let err = Qwen2VlModel::load(&dir, DType::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("config.json") && err.contains("text_config.rope_parameters.mrope_section"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
