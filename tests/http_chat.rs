//! The chat API through real HTTP against tiny fixture models: reference
//! outputs, JSON versus SSE, concurrency, each sampling parameter, and vLLM's
//! `ignore_eos` / `min_tokens` extensions.

mod common;

use common::{chat, chat_stream, content, expected_text, greedy, streamed_text};
use serde_json::{json, Value};

const MODELS: [&str; 5] = common::CHAT_MODELS;

#[tokio::test]
async fn greedy_output_matches_transformers_for_every_case() {
    for model in MODELS {
        let base = common::server(model);
        for case in common::served_cases(model) {
            let name = case["name"].as_str().unwrap();
            let (status, body) = chat(base, &greedy(model, common::messages(&case), 20)).await;
            assert_eq!(status, 200, "{model}/{name}: {body}");
            let (text, n, reason) = expected_text(model, &case);
            assert_eq!(content(&body), text, "{model}/{name}");
            assert_eq!(
                body["choices"][0]["finish_reason"], reason,
                "{model}/{name}"
            );
            let prompt_len = case["prompt_ids"].as_array().unwrap().len();
            assert_eq!(body["usage"]["prompt_tokens"], prompt_len, "{model}/{name}");
            assert_eq!(body["usage"]["completion_tokens"], n, "{model}/{name}");
            assert_eq!(body["object"], "chat.completion");
            assert_eq!(body["model"], model);
        }
    }
}

#[tokio::test]
async fn streaming_gives_the_same_text_as_json() {
    let model = "llava-clip-llama";
    let base = common::server(model);
    for case in common::cases(model) {
        let mut req = greedy(model, common::messages(&case), 20);
        let (_, body) = chat(base, &req).await;
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let events = chat_stream(base, &req).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let first = &events[0];
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(streamed_text(&events, 0), content(&body));
        let usage_chunk = &events[events.len() - 2];
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"], body["usage"]);
        let last_choice = &events[events.len() - 3];
        assert_eq!(
            last_choice["choices"][0]["finish_reason"],
            body["choices"][0]["finish_reason"]
        );
        for e in &events[..events.len() - 2] {
            assert_eq!(e["id"], first["id"]);
            assert!(e["usage"].is_null());
        }
    }
}

#[tokio::test]
async fn eight_concurrent_requests_match_one_at_a_time() {
    // Different image sizes in one batch: Qwen2-VL's grids and M-RoPE
    // positions differ per sequence; LLaVA's do not.
    for model in [
        "llava-siglip-qwen2",
        "qwen2-vl-tiny",
        "qwen2.5-vl-tiny",
        "idefics3-tiny",
    ] {
        let base = common::server(model);
        let cases = common::served_cases(model);
        let reqs: Vec<Value> = (0..8)
            .map(|i| greedy(model, common::messages(&cases[i % cases.len()]), 16))
            .collect();
        let mut alone = Vec::new();
        for r in &reqs {
            alone.push(content(&chat(base, r).await.1));
        }
        let together = futures::future::join_all(reqs.iter().map(|r| chat(base, r))).await;
        for (i, (status, body)) in together.iter().enumerate() {
            assert_eq!(*status, 200);
            assert_eq!(
                content(body),
                alone[i],
                "{model}: request {i} changed inside a batch"
            );
        }
    }
}

fn text_case(model: &str) -> Value {
    common::cases(model)
        .into_iter()
        .find(|c| !c["messages"].to_string().contains("fixture:"))
        .expect("a text-only case")
}

#[tokio::test]
async fn max_tokens_and_max_completion_tokens_cut_with_length() {
    let model = "llava-clip-llama";
    let base = common::server(model);
    let msgs = common::messages(&text_case(model));
    let (_, body) = chat(base, &greedy(model, msgs.clone(), 3)).await;
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let mut req = greedy(model, msgs, 50);
    req["max_completion_tokens"] = json!(2);
    let (_, body) = chat(base, &req).await;
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

/// The text case of `llava-clip-llama`: (model, server, messages, its 20 greedy tokens' text).
async fn greedy_text() -> (&'static str, &'static str, Value, String) {
    let model = "llava-clip-llama";
    let base = common::server(model);
    let msgs = common::messages(&text_case(model));
    let full = content(&chat(base, &greedy(model, msgs.clone(), 20)).await.1);
    (model, base, msgs, full)
}

/// Choice 0's text, streamed or not as `req` asks; unstreamed, its finish reason must be `reason`.
async fn text_of(base: &str, req: &Value, reason: &str) -> String {
    if req["stream"] == json!(true) {
        return streamed_text(&chat_stream(base, req).await, 0);
    }
    let (_, body) = chat(base, req).await;
    assert_eq!(body["choices"][0]["finish_reason"], reason, "{body}");
    content(&body)
}

#[tokio::test]
async fn stop_strings_end_the_text_and_never_leak() {
    let (model, base, msgs, full) = greedy_text().await;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "reference text too short: {full:?}");
    // A stop string from the middle of the output, spanning token boundaries.
    let stop: String = chars[3..6].iter().collect();
    let prefix = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut req = greedy(model, msgs.clone(), 20);
        req["stop"] = json!([stop, "never-in-output"]);
        req["stream"] = json!(stream);
        let text = text_of(base, &req, "stop").await;
        assert_eq!(text, prefix, "stream={stream}");
    }
}

/// A text case whose greedy output ends with EOS, and the tokens up to it.
fn eos_case() -> (&'static str, Value, usize) {
    let model = "llava-siglip-qwen2";
    let case = common::cases(model)
        .into_iter()
        .find(|c| c["name"] == "text_system")
        .expect("the text_system case");
    let (_, n, reason) = expected_text(model, &case);
    assert_eq!(reason, "stop", "the reference case stops at EOS");
    (model, common::messages(&case), n)
}

#[tokio::test]
async fn ignore_eos_generates_exactly_max_tokens() {
    let (model, msgs, n) = eos_case();
    let base = common::server(model);
    let (_, stopped) = chat(base, &greedy(model, msgs.clone(), 30)).await;
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["usage"]["completion_tokens"], n);
    for stream in [false, true] {
        let mut req = greedy(model, msgs.clone(), 30);
        req["ignore_eos"] = json!(true);
        req["stream"] = json!(stream);
        req["stream_options"] = json!({"include_usage": true});
        let (text, reason, usage) = if stream {
            let events = chat_stream(base, &req).await;
            let last = &events[events.len() - 3]["choices"][0]["finish_reason"];
            let usage = events[events.len() - 2]["usage"].clone();
            (streamed_text(&events, 0), last.clone(), usage)
        } else {
            let (status, body) = chat(base, &req).await;
            assert_eq!(status, 200, "{body}");
            let reason = body["choices"][0]["finish_reason"].clone();
            (content(&body), reason, body["usage"].clone())
        };
        assert_eq!(reason, "length", "stream={stream}");
        assert_eq!(usage["completion_tokens"], 30, "stream={stream}");
        assert!(text.starts_with(&content(&stopped)), "stream={stream}");
    }
}

#[tokio::test]
async fn min_tokens_masks_eos_until_reached() {
    let (model, msgs, n) = eos_case();
    let base = common::server(model);
    // EOS is the n-th token: allowed once n - 1 tokens are out, masked before.
    let mut req = greedy(model, msgs, 30);
    req["min_tokens"] = json!(n - 1);
    let (_, body) = chat(base, &req).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], n);
    req["min_tokens"] = json!(n);
    let (_, body) = chat(base, &req).await;
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens > n as u64, "{body}");
}

#[tokio::test]
async fn min_tokens_ignores_stop_strings_inside_the_first_tokens() {
    let (model, base, msgs, full) = greedy_text().await;
    let chars: Vec<char> = full.chars().collect();
    // A stop string that occurs once in the output, spanning token boundaries.
    let stop = (0..chars.len() - 3)
        .map(|i| chars[i..i + 3].iter().collect::<String>())
        .find(|s| full.find(s.as_str()) == full.rfind(s.as_str()) && !s.contains('\u{fffd}'))
        .expect("a 3-character string that occurs once");
    let mut req = greedy(model, msgs, 20);
    req["stop"] = json!([stop]);
    let (_, cut) = chat(base, &req).await;
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    // The stop completes with the k-th token: checked from min_tokens + 1 on.
    let k = cut["usage"]["completion_tokens"].as_u64().unwrap();
    req["min_tokens"] = json!(k - 1);
    let (_, body) = chat(base, &req).await;
    assert_eq!(
        content(&body),
        content(&cut),
        "stop {stop:?} ends in token {k}"
    );
    for stream in [false, true] {
        req["min_tokens"] = json!(k);
        req["stream"] = json!(stream);
        let text = text_of(base, &req, "length").await;
        assert_eq!(
            text, full,
            "stream={stream}: stop {stop:?} inside the first {k} tokens"
        );
    }
}

#[tokio::test]
async fn seed_makes_sampling_reproducible() {
    let model = "llava-clip-llama";
    let base = common::server(model);
    let msgs = common::messages(&text_case(model));
    let req = |seed: u64| json!({"model": model, "messages": msgs, "temperature": 1.5, "seed": seed, "max_tokens": 20});
    let a = content(&chat(base, &req(42)).await.1);
    let b = content(&chat(base, &req(42)).await.1);
    let c = content(&chat(base, &req(43)).await.1);
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "another seed, another output");
    let greedy_text = content(&chat(base, &greedy(model, msgs.clone(), 20)).await.1);
    assert_ne!(a, greedy_text, "temperature 1.5 departs from greedy");
}

#[tokio::test]
async fn top_k_one_and_tiny_top_p_are_greedy() {
    let model = "llava-siglip-qwen2";
    let base = common::server(model);
    let msgs = common::messages(&common::cases(model)[1]);
    let greedy_text = content(&chat(base, &greedy(model, msgs.clone(), 20)).await.1);
    for extra in [json!({"top_k": 1}), json!({"top_p": 1e-6})] {
        let mut req = json!({"model": model, "messages": msgs, "temperature": 1.0, "seed": 7, "max_tokens": 20});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        assert_eq!(content(&chat(base, &req).await.1), greedy_text, "{extra}");
    }
}

#[tokio::test]
async fn penalties_change_greedy_output() {
    let model = "llava-clip-llama";
    let base = common::server(model);
    let msgs = common::messages(&text_case(model));
    // Penalties act only on tokens already generated: over 100 greedy tokens a
    // positive one must break the first repeat, a negative one must create one.
    let plain = content(&chat(base, &greedy(model, msgs.clone(), 100)).await.1);
    for field in ["presence_penalty", "frequency_penalty"] {
        for value in [2.0, -2.0] {
            let mut req = greedy(model, msgs.clone(), 100);
            req[field] = json!(value);
            let text = content(&chat(base, &req).await.1);
            assert_ne!(text, plain, "{field}={value} had no effect");
        }
    }
}

#[tokio::test]
async fn n_returns_distinct_indexed_choices() {
    let model = "llava-clip-llama";
    let base = common::server(model);
    let msgs = common::messages(&text_case(model));
    let req = json!({"model": model, "messages": msgs, "n": 3, "seed": 1, "temperature": 1.5, "max_tokens": 12});
    let (status, body) = chat(base, &req).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: Vec<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "choices all equal: {texts:?}"
    );
    let all_length = choices.iter().all(|c| c["finish_reason"] == "length");
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    // Usage adds the choices up: 3 x 12 unless one stopped early at EOS.
    assert!(
        completion <= 36 && (completion == 36) == all_length,
        "{completion}"
    );
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let events = chat_stream(base, &sreq).await;
    for i in 0..3 {
        assert_eq!(
            streamed_text(&events, i),
            texts[i as usize],
            "streamed choice {i}"
        );
    }
}

#[tokio::test]
async fn logprobs_carry_token_bytes_that_rebuild_the_text() {
    let model = "llava-clip-llama";
    let base = common::server(model);
    let msgs = common::messages(&text_case(model));
    let mut req = greedy(model, msgs, 20);
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(3);
    let (status, body) = chat(base, &req).await;
    assert_eq!(status, 200, "{body}");
    let entries = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!entries.is_empty());
    let mut bytes = Vec::new();
    for e in entries {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
        bytes.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    // The tokens' own bytes rebuild the content: the random model emits byte
    // tokens that are not valid UTF-8, which the text shows as U+FFFD just as
    // a lossy decode of the bytes does (EOS, if sampled, has no entry).
    assert_eq!(String::from_utf8_lossy(&bytes), content(&body));
    // Without logprobs the field is null.
    let (_, plain) = chat(base, &greedy(model, common::messages(&text_case(model)), 2)).await;
    assert!(plain["choices"][0]["logprobs"].is_null());
}
