//! Loading a chat model directory into a validator and a pool of running engines, one per
//! configured device.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokenizers::Tokenizer;

use super::device::{self, OpenDevice};
use super::read_json;
use crate::api::ChatServing;
use crate::config::{Config, MatmulPrecision, ModelConfig, Quantize};
use crate::engine::image_cache::ImageCache;
use crate::engine::{
    EngineCore, EngineHandle, EngineParts, EnginePool, PoolMember, SchedulerConfig,
};
use crate::metrics::metrics;
use crate::model::{ChatCache, ChatModel, KvCacheConfig};
use crate::preprocess::{
    read_image_processor, Idefics3ImageProcessor, Idefics3ImageTokens, ImageProcessor,
    Qwen2VlImageProcessor,
};
use crate::prompt::ChatTemplate;
use crate::text::TokenTable;
use crate::validate::params::SamplingDefaults;
use crate::validate::vision::VisionPrep;
use crate::validate::{ValidationLimits, Validator};

/// A chat model loaded on one device, with its KV cache.
struct OnDevice {
    device: String,
    model: ChatModel,
    cache: ChatCache,
    /// Image tokens encoded per step on this device.
    encoder_tokens: usize,
}

/// Loads everything and starts one engine thread per configured device.
pub fn load(cfg: &Config, m: &ModelConfig) -> Result<(ChatServing, Vec<JoinHandle<()>>)> {
    let dir = m.path.as_path();
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
    let tokenizer = Arc::new(tokenizer);
    let template = ChatTemplate::from_model_dir(dir)?;
    let loaded = device::open_all(&cfg.engine.devices)?
        .into_iter()
        .map(|d| load_on(cfg, m, d))
        .collect::<Result<Vec<_>>>()?;
    // Every engine runs the same weights; `open_all` gives at least one.
    let first = &loaded[0].model;
    let vision = vision_prep(dir, first)?;
    // A sequence alone must always fit the pool, or it could never finish.
    let kv_tokens = loaded.iter().map(|l| l.cache.kv().capacity_tokens()).min();
    let max_context = first.max_context().min(kv_tokens.unwrap_or(0));
    if max_context < first.max_context() {
        tracing::warn!(
            model = %m.served_name(),
            kv_tokens = max_context,
            model_context = first.max_context(),
            "the KV cache holds fewer positions than the model's context: requests are limited to it"
        );
    }

    let image_token_id = first.image_token_id();
    let image_token = tokenizer.id_to_token(image_token_id).with_context(|| {
        format!(
            "the image token id {image_token_id} is not in {}",
            tok_path.display()
        )
    })?;
    let eos_token_ids = eos_ids(dir, &tokenizer, template.eos_token())?;
    let bos_token = template.bos_token().map(str::to_string);
    let sampling_defaults = read_json(&dir.join("generation_config.json"))?
        .map(|g| SamplingDefaults::from_generation_config(&g))
        .unwrap_or_default();
    let tokens = Arc::new(TokenTable::new(&tokenizer));
    let validator = Validator {
        tokenizer: Arc::clone(&tokenizer),
        template,
        vision,
        image_token,
        image_token_id,
        bos_token,
        max_context,
        max_token_bytes: tokens.longest_token_bytes(),
        limits: ValidationLimits {
            max_images_per_request: cfg.limits.max_images_per_request,
            max_n: cfg.limits.max_n,
            max_top_logprobs: cfg.limits.max_top_logprobs,
            image: cfg.limits.image(),
            default_max_tokens: cfg.engine.default_max_tokens,
        },
        sampling_defaults,
    };
    let mut members = Vec::with_capacity(loaded.len());
    let mut threads = Vec::with_capacity(loaded.len());
    for OnDevice {
        device,
        model,
        cache,
        encoder_tokens,
    } in loaded
    {
        let core = EngineCore::new(EngineParts {
            model,
            tokenizer: Arc::clone(&tokenizer),
            tokens: Arc::clone(&tokens),
            eos_token_ids: eos_token_ids.clone(),
            scheduler: SchedulerConfig {
                max_num_seqs: cfg.engine.max_num_seqs,
                max_batched_tokens: cfg.engine.max_batched_tokens,
                max_encoder_tokens: encoder_tokens,
            },
            cache,
            max_waiting: cfg.engine.max_waiting,
            metrics: metrics().engine(&m.served_name()),
            image_cache: ImageCache::new(
                cfg.engine.image_cache_bytes,
                metrics().image_cache(&m.served_name()),
            ),
            prefix_caching: cfg.engine.enable_prefix_caching,
        });
        let (handle, join) = EngineHandle::spawn(core).context("cannot start the engine thread")?;
        members.push(PoolMember { device, handle });
        threads.push(join);
    }
    let engine = EnginePool::new(members).context("no engine started")?;
    let serving = ChatServing {
        validator: Arc::new(validator),
        engine,
        tokens,
        request_timeout: cfg.engine.request_timeout(),
        test_hooks: cfg.debug.test_hooks,
        metrics: metrics().model(&m.served_name()),
    };
    Ok((serving, threads))
}

/// Loads the weights onto one device and sizes its KV cache.
fn load_on(cfg: &Config, m: &ModelConfig, d: OpenDevice) -> Result<OnDevice> {
    let dir = m.path.as_path();
    let dtype = device::compute_dtype(m.dtype, &d.device);
    let mut model = ChatModel::load(dir, dtype, &d.device)
        .with_context(|| format!("cannot load the model in {} on {}", dir.display(), d.name))?;
    if let Some(q) = m.quantize {
        quantize(&mut model, q, &m.served_name())?;
    }
    if m.vision_matmul_precision == MatmulPrecision::High && d.device.is_cpu() {
        vision_bf16x3(&mut model, &m.served_name())?;
    }
    let cache = model
        .new_cache(&KvCacheConfig {
            block_size: cfg.engine.block_size,
            max_bytes: device::kv_cache_bytes(&cfg.engine, &d.device)?,
            max_tokens: cfg.engine.max_num_seqs.saturating_mul(model.max_context()),
        })
        .context("cannot size the KV cache (engine.kv_cache_bytes)")?;
    tracing::info!(model = %m.served_name(), device = %d.name, ?dtype, "engine weights on device");
    Ok(OnDevice {
        encoder_tokens: device::encoder_tokens(&cfg.engine, &d.device),
        device: d.name,
        model,
        cache,
    })
}

/// Quantizes the decoder in place and says once what it did.
fn quantize(model: &mut ChatModel, q: Quantize, name: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let r = model
        .quantize(q.ggml())
        .with_context(|| format!("cannot quantize `{name}` to {q:?}"))?;
    let mib = |b: usize| b / (1 << 20);
    tracing::info!(
        model = %name,
        quantize = ?q,
        quantized = r.quantized,
        kept_dense = r.kept_dense,
        weights_mib_before = mib(r.bytes_before),
        weights_mib_after = mib(r.bytes_after),
        secs = started.elapsed().as_secs_f32(),
        "decoder projections quantized and repacked"
    );
    if r.kept_dense > 0 {
        tracing::warn!(
            model = %name,
            kept_dense = r.kept_dense,
            block = q.ggml().block_size(),
            "projections whose input size is not a multiple of the block stay dense"
        );
    }
    Ok(())
}

/// Runs the vision tower's products as bf16x3 and says once how many do.
fn vision_bf16x3(model: &mut ChatModel, name: &str) -> Result<()> {
    let n = model
        .use_bf16x3()
        .with_context(|| format!("cannot repack `{name}`'s vision tower for bf16x3"))?;
    match n {
        0 => tracing::warn!(
            model = %name,
            "vision_matmul_precision = high: no AMX-BF16 here (or not an f32 CLIP/SigLIP tower), products stay f32"
        ),
        n => {
            tracing::info!(model = %name, projections = n, "vision tower products run as bf16x3 on AMX tiles")
        }
    }
    Ok(())
}

/// End-of-sequence ids: `generation_config.json`'s `eos_token_id` (an id or a
/// list), `config.json`'s, and the tokenizer's EOS token, as vLLM combines them.
fn eos_ids(dir: &Path, tok: &Tokenizer, eos_token: Option<&str>) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for file in ["generation_config.json", "config.json"] {
        if let Some(json) = read_json(&dir.join(file))? {
            let v = &json["eos_token_id"];
            let v = if v.is_null() {
                &json["text_config"]["eos_token_id"]
            } else {
                v
            };
            match v {
                serde_json::Value::Number(n) => ids.extend(n.as_u64().map(|x| x as u32)),
                serde_json::Value::Array(a) => {
                    ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
    }
    ids.extend(eos_token.and_then(|t| tok.token_to_id(t)));
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The model family's image preparation, from the checkpoint's image-processor settings.
fn vision_prep(dir: &Path, model: &ChatModel) -> Result<VisionPrep> {
    Ok(match model {
        ChatModel::Llava(m) => VisionPrep::Fixed {
            processor: read_image_processor(dir, ImageProcessor::from_json_str)?,
            tokens_per_image: m.tokens_per_image(),
        },
        ChatModel::Qwen2Vl(_) => VisionPrep::Qwen2Vl(read_image_processor(
            dir,
            Qwen2VlImageProcessor::from_json_str,
        )?),
        ChatModel::Idefics3(m) => VisionPrep::Idefics3 {
            processor: read_image_processor(dir, Idefics3ImageProcessor::from_json_str)?,
            image_seq_len: m.tokens_per_tile(),
            tokens: Idefics3ImageTokens::default(),
        },
    })
}
