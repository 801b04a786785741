//! Property test (fuzzing on stable Rust) of the request parser and
//! validators: arbitrary JSON shaped like chat and embedding requests (odd
//! types, extreme numbers, placeholder and special-token text, good and bad
//! images), sometimes with its bytes mutated, is parsed and validated for each
//! model family. Nothing panics; the result is a trusted request that fits
//! the context, or a client error — never an internal one.
//!
//! Cases: `PROPTEST_CASES` (default 48, for CI); e.g.
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz_request` for a long run.

mod common;

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use common::fuzz;
use mmserve::api::Served;
use mmserve::openai::embeddings::EmbeddingRequest;
use mmserve::openai::request::ChatCompletionRequest;
use mmserve::startup;
use mmserve::validate::embed::EmbedValidator;
use mmserve::validate::{ValidationError, Validator};
use proptest::prelude::*;
use serde_json::{Map, Value};

const CHAT: [&str; 3] = ["llava-clip-llama", "qwen2-vl-tiny", "idefics3-tiny"];
const EMBED: &str = "clip-tiny";

/// The validators of one model per chat family and of an embedding model.
struct Validators {
    chat: Vec<Arc<Validator>>,
    embed: Arc<EmbedValidator>,
}

fn validators() -> &'static Validators {
    static V: OnceLock<Validators> = OnceLock::new();
    V.get_or_init(|| {
        let mut names = CHAT.to_vec();
        names.push(EMBED);
        let cfg = common::config(&names);
        let mut chat = Vec::new();
        let mut embed = None;
        for m in &cfg.models {
            let kind = startup::model_kind(m).unwrap();
            match startup::load(&cfg, m, kind).unwrap().0 {
                Served::Chat(c) => chat.push(Arc::clone(&c.validator)),
                Served::Embed(e) => embed = Some(Arc::clone(&e.validator)),
            }
        }
        Validators {
            chat,
            embed: embed.unwrap(),
        }
    })
}

fn data_url(mime: &str, file: &str) -> String {
    let bytes = std::fs::read(common::fixtures().join(file)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:image/{mime};base64,{b64}")
}

/// Image URLs: good ones of every format, and broken or refused ones.
fn urls() -> &'static [String] {
    static U: OnceLock<Vec<String>> = OnceLock::new();
    U.get_or_init(|| {
        let mut v: Vec<String> = [
            ("png", "bad_inputs/ok.png"),
            ("png", "bad_inputs/tiny_1x1.png"),
            ("png", "bad_inputs/strip_1x10000.png"),
            ("png", "bad_inputs/bomb_100000x100000.png"),
            ("png", "bad_inputs/truncated.png"),
            ("gif", "images/palette.gif"),
            ("webp", "preprocess/inputs/anim.webp"),
            ("jpeg", "images/exif_rotated.jpg"),
            ("jpeg", "bad_inputs/corrupt.jpg"),
        ]
        .iter()
        .map(|(m, f)| data_url(m, f))
        .collect();
        v.extend(
            [
                "https://example.com/a.png",
                "data:image/png;base64,!!",
                "data:image/svg+xml;base64,PHN2Zz4=",
                "",
            ]
            .map(String::from),
        );
        v
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("hi".to_string()),
        Just("<image>".to_string()),
        Just("<|image_pad|><|vision_start|>".to_string()),
        Just("<fake_token_around_image><global-img>".to_string()),
        Just("<|im_start|>system\n</s><s>[INST]".to_string()),
        Just("{{ raise_exception('x') }}{% for %}".to_string()),
        Just("word ".repeat(3000)),
        any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..40).prop_map(Value::from),
        prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(1 << 40)].prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        (-3.0f64..3.0).prop_map(Value::from),
        prop_oneof![Just(1e300), Just(-1e-300), Just(2.0000001)].prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn part() -> impl Strategy<Value = Value> {
    prop_oneof![
        20 => text().prop_map(|t| serde_json::json!({"type": "text", "text": t})),
        20 => (0..urls().len()).prop_map(|i| {
            serde_json::json!({"type": "image_url", "image_url": {"url": urls()[i], "detail": "high"}})
        }),
        1 => json(),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        8 => Just("user"),
        3 => Just("assistant"),
        2 => Just("system"),
        1 => Just("developer"),
        1 => Just("tool"),
    ];
    let content = prop_oneof![
        12 => text().prop_map(Value::String),
        24 => prop::collection::vec(part(), 1..4).prop_map(Value::Array),
        1 => json(),
    ];
    (role, content).prop_map(|(r, c)| serde_json::json!({"role": r, "content": c}))
}

/// An optional request field: absent, a plausible value, or (rarely, as most
/// then fail to parse) anything.
fn field(plausible: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![120 => Just(None), 79 => plausible.prop_map(Some), 1 => json().prop_map(Some)]
}

/// Mostly `usual`, sometimes an extreme or odd number.
fn usual(usual: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
    prop_oneof![40 => usual, 1 => number()].boxed()
}

const FIELDS: [&str; 14] = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "stop",
    "logprobs",
    "stream",
    "stream_options",
];

fn chat_request() -> impl Strategy<Value = Value> {
    let count = || usual((0u32..48).prop_map(Value::from));
    let float = |lo: f64, hi: f64| usual((lo..hi).prop_map(Value::from));
    let numbers = vec![
        field(count()),
        field(count()),
        field(float(0.0, 2.0)),
        field(float(0.01, 1.0)),
        field(usual((-2i64..50).prop_map(Value::from))),
        field(any::<i64>().prop_map(Value::from).boxed()),
        field(usual((0u32..4).prop_map(Value::from))),
        field(float(-2.0, 2.0)),
        field(float(-2.0, 2.0)),
        field(usual((0u32..4).prop_map(Value::from))),
    ];
    let stop = prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(text().prop_map(Value::String), 0..6).prop_map(Value::Array)
    ];
    let flag = any::<bool>().prop_map(Value::Bool);
    let rest = vec![
        field(stop.boxed()),
        field(flag.clone().boxed()),
        field(flag.clone().boxed()),
        field(
            flag.prop_map(|b| serde_json::json!({"include_usage": b}))
                .boxed(),
        ),
    ];
    let messages = prop_oneof![
        30 => prop::collection::vec(message(), 1..4).prop_map(Value::Array),
        1 => json(),
    ];
    (messages, numbers, rest, prop::bool::weighted(0.8)).prop_map(
        |(messages, numbers, rest, lp)| {
            let mut o = Map::new();
            o.insert("model".into(), Value::from("m"));
            o.insert("messages".into(), messages);
            for (k, v) in FIELDS.iter().zip(numbers.into_iter().chain(rest)) {
                if let Some(v) = v {
                    o.insert((*k).into(), v);
                }
            }
            if lp && o.contains_key("top_logprobs") {
                o.insert("logprobs".into(), Value::Bool(true));
            }
            Value::Object(o)
        },
    )
}

fn embed_request() -> impl Strategy<Value = Value> {
    let item = prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(prop_oneof![0u64..60000, Just(u64::from(u32::MAX))], 0..8)
            .prop_map(Value::from),
        part(),
    ];
    let input = prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(item, 0..4).prop_map(Value::Array),
        json(),
    ];
    let format = prop_oneof![Just("float"), Just("base64"), Just("int8")];
    (
        input,
        field(format.prop_map(Value::from).boxed()),
        field(number().boxed()),
    )
        .prop_map(|(input, format, dims)| {
            let mut o = serde_json::json!({"model": "m", "input": input});
            if let Some(f) = format {
                o["encoding_format"] = f;
            }
            if let Some(d) = dims {
                o["dimensions"] = d;
            }
            o
        })
}

/// The request's bytes, sometimes mutated.
fn bytes(request: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec(fuzz::edit(), 0..3);
    (request, prop::bool::weighted(0.2), edits).prop_map(|(v, mutate, edits)| {
        let b = serde_json::to_vec(&v).expect("serialize");
        if mutate {
            fuzz::apply(b, &edits)
        } else {
            b
        }
    })
}

fn not_internal<T>(r: &Result<T, ValidationError>) -> Result<(), TestCaseError> {
    if let Err(ValidationError::Internal(m)) = r {
        return Err(TestCaseError::fail(format!("internal error: {m}")));
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config())]

    #[test]
    fn chat_requests_validate_or_fail_cleanly(body in bytes(chat_request())) {
        let Ok(req) = serde_json::from_slice::<ChatCompletionRequest>(&body) else {
            return Ok(());
        };
        for v in &validators().chat {
            let r = v.validate_chat(&req);
            not_internal(&r)?;
            if let Ok(valid) = r {
                prop_assert!(!valid.prompt_ids.is_empty());
                prop_assert!(valid.max_tokens >= 1);
                prop_assert!(valid.prompt_ids.len() + valid.max_tokens <= v.max_context);
                prop_assert!(!valid.choices.is_empty());
            }
        }
    }

    #[test]
    fn embedding_requests_validate_or_fail_cleanly(body in bytes(embed_request())) {
        let Ok(req) = serde_json::from_slice::<EmbeddingRequest>(&body) else {
            return Ok(());
        };
        let r = validators().embed.validate(req);
        not_internal(&r)?;
        if let Ok(valid) = r {
            prop_assert!(!valid.inputs.is_empty());
        }
    }
}
