//! The bad-input corpus: hostile and malformed requests, one table row each
//! (input → status, error `code`, `param`), sent through real HTTP to one
//! server; afterwards the server must still answer a normal request exactly
//! as transformers does. Image files come from tests/fixtures/bad_inputs
//! (written by scripts/make_bad_inputs.py).

mod common;

use base64::Engine as _;
use serde_json::{json, Value};

const CHAT: &str = "llava-clip-llama";
const EMBED: &str = "clip-tiny";

/// What one row sends.
enum Send {
    Chat(Value),
    Embed(Value),
    /// A raw body to a path.
    Raw(&'static str, Vec<u8>),
    /// A small valid chat request with these extra headers.
    Headers(Vec<(String, String)>),
    Get(&'static str),
}

/// One row of the table.
struct Row {
    name: String,
    send: Send,
    status: u16,
    /// Expected `error.code`; `None` for a success.
    code: Option<&'static str>,
    /// Expected `error.param`, when the row checks it.
    param: Option<&'static str>,
}

fn row(name: impl Into<String>, send: Send, status: u16, code: &'static str) -> Row {
    Row {
        name: name.into(),
        send,
        status,
        code: Some(code),
        param: None,
    }
}

impl Row {
    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn bad_file(name: &str) -> Vec<u8> {
    let path = common::fixtures().join("bad_inputs").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn user(content: Value) -> Value {
    json!({"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
}

/// A chat request with a text part and one image part with this URL.
fn with_image(url: String) -> Send {
    Send::Chat(user(json!([
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}}
    ])))
}

const IMAGE_PARAM: &str = "messages[0].content[1].image_url";

fn image_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let file_cases = [
        ("truncated.png", "png", "invalid_image"),
        ("truncated.jpg", "jpeg", "invalid_image"),
        ("truncated.gif", "gif", "invalid_image"),
        ("truncated.webp", "webp", "invalid_image"),
        ("corrupt.png", "png", "invalid_image"),
        ("corrupt.jpg", "jpeg", "invalid_image"),
        ("corrupt.gif", "gif", "invalid_image"),
        ("corrupt.webp", "webp", "invalid_image"),
        ("bomb_100000x100000.png", "png", "image_too_large"),
        ("bomb_65535x65535.gif", "gif", "image_too_large"),
        ("bomb_20000x20000.webp", "webp", "image_too_large"),
        ("bomb_60000x60000.jpg", "jpeg", "image_too_large"),
        ("tiny_1x1.png", "png", "image_too_small"),
        ("strip_1x10000.png", "png", "image_aspect_ratio"),
        ("vector.svg", "svg+xml", "unsupported_image_format"),
        ("vector.svg", "png", "unsupported_image_format"),
        ("text.txt", "png", "invalid_image"),
        ("ok.png", "bmp", "unsupported_image_format"),
    ];
    for (file, mime, code) in file_cases {
        let url = format!("data:image/{mime};base64,{}", b64(&bad_file(file)));
        rows.push(
            row(
                format!("{file} as image/{mime}"),
                with_image(url),
                400,
                code,
            )
            .param(IMAGE_PARAM),
        );
    }
    let png = b64(&bad_file("ok.png"));
    let urls = [
        (
            "invalid base64",
            "data:image/png;base64,!!!not base64!!!".to_string(),
            "invalid_image",
        ),
        (
            "base64 without the data-URL prefix",
            png.clone(),
            "invalid_image_url",
        ),
        (
            "data URL without ;base64",
            format!("data:image/png,{png}"),
            "invalid_image_url",
        ),
        (
            "data URL without a comma",
            "data:image/png;base64".into(),
            "invalid_image_url",
        ),
        (
            "wrong MIME type",
            format!("data:text/plain;base64,{png}"),
            "unsupported_image_format",
        ),
        (
            "remote https URL",
            "https://example.com/cat.png".into(),
            "remote_image_url",
        ),
        (
            "remote http URL",
            "http://169.254.169.254/latest".into(),
            "remote_image_url",
        ),
        ("file URL", "file:///etc/passwd".into(), "invalid_image_url"),
        (
            "empty image",
            "data:image/png;base64,".into(),
            "invalid_image",
        ),
        // 11 MiB of image: refused from the base64 length, before decoding.
        (
            "image over max_image_bytes",
            format!("data:image/png;base64,{}", "A".repeat(15 << 20)),
            "image_too_large",
        ),
    ];
    for (name, url, code) in urls {
        rows.push(row(name, with_image(url), 400, code).param(IMAGE_PARAM));
    }
    // A PNG labelled GIF: the format is sniffed from the bytes, as browsers and Pillow do.
    rows.push(Row {
        name: "png bytes labelled image/gif".into(),
        send: with_image(format!("data:image/gif;base64,{png}")),
        status: 200,
        code: None,
        param: None,
    });
    let tiny =
        json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}});
    rows.push(
        row(
            "200 images",
            Send::Chat(user(Value::Array(vec![tiny; 200]))),
            400,
            "too_many_images",
        )
        .param("messages[0].content[8]"),
    );
    rows
}

/// A wrong JSON type for every request field, and where the error points.
fn type_rows() -> Vec<Row> {
    let fields: [(&str, Value, &str); 20] = [
        ("model", json!(3), "model"),
        ("messages", json!("hi"), "messages"),
        ("max_tokens", json!("2"), "max_tokens"),
        (
            "max_completion_tokens",
            json!(true),
            "max_completion_tokens",
        ),
        ("temperature", json!("hot"), "temperature"),
        ("top_p", json!([1]), "top_p"),
        ("top_k", json!(1.5), "top_k"),
        ("min_tokens", json!(1.5), "min_tokens"),
        ("ignore_eos", json!("yes"), "ignore_eos"),
        ("seed", json!("s"), "seed"),
        ("stop", json!(3), "stop"),
        ("n", json!("2"), "n"),
        ("presence_penalty", json!({}), "presence_penalty"),
        ("frequency_penalty", json!(null), ""),
        ("logprobs", json!("yes"), "logprobs"),
        ("top_logprobs", json!(1.5), "top_logprobs"),
        ("stream", json!("true"), "stream"),
        ("stream_options", json!(3), "stream_options"),
        (
            "stream_options",
            json!({"include_usage": "x"}),
            "stream_options.include_usage",
        ),
        (
            "messages",
            json!([{"role": 3, "content": "hi"}]),
            "messages[0].role",
        ),
    ];
    let mut rows = Vec::new();
    for (field, value, param) in fields {
        let mut body = user(json!("hi"));
        body[field] = value.clone();
        if param.is_empty() {
            // null is "absent" for optional fields.
            rows.push(Row {
                name: format!("{field} = {value}"),
                send: Send::Chat(body),
                status: 200,
                code: None,
                param: None,
            });
            continue;
        }
        rows.push(
            row(
                format!("{field} = {value}"),
                Send::Chat(body),
                400,
                "invalid_request",
            )
            .param(param),
        );
    }
    let parts = [
        (json!(3), "messages[0].content"),
        (
            json!([{"type": "audio", "audio": "x"}]),
            "messages[0].content",
        ),
        (json!([{"type": "text", "text": 3}]), "messages[0].content"),
        (
            json!([{"type": "image_url", "image_url": "x"}]),
            "messages[0].content",
        ),
        (
            json!([{"type": "image_url", "image_url": {"url": 3}}]),
            "messages[0].content",
        ),
    ];
    for (content, param) in parts {
        rows.push(
            row(
                format!("content = {content}"),
                Send::Chat(user(content.clone())),
                400,
                "invalid_request",
            )
            .param(param),
        );
    }
    rows
}

fn number_rows() -> Vec<Row> {
    let cases: [(&str, Value, &str); 16] = [
        ("max_tokens", json!(-1), "invalid_request"),
        ("max_tokens", json!(1e12), "invalid_request"),
        ("max_tokens", json!(1_000_000), "context_length_exceeded"),
        ("max_tokens", json!(0), "invalid_value"),
        ("n", json!(-1), "invalid_request"),
        ("n", json!(0), "invalid_value"),
        ("n", json!(1_000_000_000), "invalid_value"),
        ("temperature", json!(-1), "invalid_value"),
        ("temperature", json!(1e300), "invalid_value"),
        ("top_p", json!(0), "invalid_value"),
        ("top_k", json!(-5), "invalid_value"),
        ("min_tokens", json!(-1), "invalid_value"),
        ("min_tokens", json!(1_000_000), "invalid_value"),
        (
            "seed",
            json!(9_223_372_036_854_775_808u64),
            "invalid_request",
        ),
        ("top_logprobs", json!(-1), "invalid_request"),
        ("frequency_penalty", json!(-1e30), "invalid_value"),
    ];
    let mut rows: Vec<Row> = cases
        .into_iter()
        .map(|(field, v, code)| {
            let mut body = user(json!("hi"));
            body[field] = v.clone();
            body["logprobs"] = json!(field == "top_logprobs");
            let r = row(format!("{field} = {v}"), Send::Chat(body), 400, code);
            if code == "context_length_exceeded" {
                r
            } else {
                r.param(field)
            }
        })
        .collect();
    let mut many = user(json!("hi"));
    many["logprobs"] = json!(true);
    many["top_logprobs"] = json!(21);
    rows.push(
        row("top_logprobs = 21", Send::Chat(many), 400, "invalid_value").param("top_logprobs"),
    );
    // Huge but legal: top_k past the vocabulary keeps every token.
    let mut huge_k = user(json!("hi"));
    huge_k["top_k"] = json!(1u64 << 62);
    rows.push(Row {
        name: "top_k = 2^62".into(),
        send: Send::Chat(huge_k),
        status: 200,
        code: None,
        param: None,
    });
    rows
}

fn request_rows() -> Vec<Row> {
    let lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. ";
    let ten_mb = lorem.repeat((10 << 20) / lorem.len());
    let big_body = format!(
        r#"{{"model":"{CHAT}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(21 << 20)
    );
    let headers: Vec<(String, String)> = (0..70).map(|i| (format!("x-h{i}"), "v".into())).collect();
    vec![
        row("unknown model", Send::Chat(json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})), 404, "model_not_found").param("model"),
        row("embedding model on chat", Send::Chat(json!({"model": EMBED, "messages": [{"role": "user", "content": "hi"}]})), 400, "wrong_model_kind").param("model"),
        row("empty messages", Send::Chat(json!({"model": CHAT, "messages": []})), 400, "invalid_value").param("messages"),
        row("empty content list", Send::Chat(user(json!([]))), 400, "invalid_value").param("messages[0].content"),
        row("unknown role", Send::Chat(json!({"model": CHAT, "messages": [{"role": "tool", "content": "hi"}]})), 400, "invalid_value").param("messages[0].role"),
        row("missing messages", Send::Chat(json!({"model": CHAT})), 400, "invalid_request"),
        row("10 MB of text", Send::Chat(user(json!(ten_mb.clone()))), 400, "context_length_exceeded").param("messages"),
        row("malformed JSON", Send::Raw("/v1/chat/completions", b"{\"model\": ".to_vec()), 400, "invalid_json"),
        row("trailing garbage", Send::Raw("/v1/chat/completions", br#"{"model":"m","messages":[]} x"#.to_vec()), 400, "invalid_json"),
        row("a JSON array", Send::Raw("/v1/chat/completions", b"[]".to_vec()), 400, "invalid_request"),
        row("not UTF-8", Send::Raw("/v1/chat/completions", vec![0xff, 0xfe, 0x00]), 400, "invalid_json"),
        row("body over max_body_bytes", Send::Raw("/v1/chat/completions", big_body.into_bytes()), 413, "request_too_large"),
        row("70 headers", Send::Headers(headers), 431, "headers_too_large"),
        row("a 40 KB header", Send::Headers(vec![("x-big".into(), "v".repeat(40 << 10))]), 431, "headers_too_large"),
        row("GET on a POST route", Send::Get("/v1/chat/completions"), 405, "method_not_allowed"),
        row("unknown route", Send::Get("/v1/completions"), 404, "not_found"),
        row("embeddings: bomb image", Send::Embed(json!({"model": EMBED, "input": [{"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&bad_file("bomb_100000x100000.png")))}}]})), 400, "image_too_large").param("input[0].image_url"),
        row("embeddings: 10 MB of text", Send::Embed(json!({"model": EMBED, "input": [ten_mb]})), 400, "context_length_exceeded").param("input[0]"),
        row("embeddings: empty input", Send::Embed(json!({"model": EMBED, "input": []})), 400, "invalid_value").param("input[0]"),
        row("embeddings: wrong input type", Send::Embed(json!({"model": EMBED, "input": 3})), 400, "invalid_request").param("input"),
        row("embeddings: chat model", Send::Embed(json!({"model": CHAT, "input": "hi"})), 400, "wrong_model_kind").param("model"),
    ]
}

/// Sends a row; returns status and JSON body.
async fn send(base: &str, send: &Send) -> (u16, Value) {
    let client = common::client();
    let req = match send {
        Send::Chat(body) => client
            .post(format!("{base}/v1/chat/completions"))
            .json(body),
        Send::Embed(body) => client.post(format!("{base}/v1/embeddings")).json(body),
        Send::Raw(path, body) => client.post(format!("{base}{path}")).body(body.clone()),
        Send::Headers(headers) => {
            let mut r = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&user(json!("hi")));
            for (k, v) in headers {
                r = r.header(k, v);
            }
            r
        }
        Send::Get(path) => client.get(format!("{base}{path}")),
    };
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// What is wrong with a response, if anything.
fn check(row: &Row, status: u16, body: &Value) -> Option<String> {
    let text = body.to_string();
    let shown = &text[..text.len().min(300)];
    if status != row.status {
        return Some(format!("status {status}, want {}: {shown}", row.status));
    }
    let Some(code) = row.code else {
        let ok = body["choices"].is_array();
        return (!ok).then(|| format!("not a completion: {shown}"));
    };
    let err = &body["error"];
    let shaped = err["message"].as_str().is_some_and(|m| !m.is_empty())
        && err["type"].is_string()
        && err.as_object().is_some_and(|o| o.contains_key("param"));
    if !shaped || err["code"] != code {
        return Some(format!("want code {code}: {shown}"));
    }
    if let Some(p) = row.param {
        if err["param"] != p {
            return Some(format!("want param {p}: {shown}"));
        }
    }
    // An error never echoes a payload back.
    (text.len() > 2000).then(|| format!("error body of {} bytes", text.len()))
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_code_and_the_server_keeps_serving() {
    let mut cfg = common::config(&[CHAT, EMBED]);
    cfg.limits.min_image_side = 2;
    let base = common::start(cfg);
    let rows: Vec<Row> = [image_rows(), type_rows(), number_rows(), request_rows()]
        .into_iter()
        .flatten()
        .collect();
    let mut failures = Vec::new();
    for row in &rows {
        let (status, body) = send(&base, &row.send).await;
        if let Some(why) = check(row, status, &body) {
            failures.push(format!("{}: {why}", row.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );

    assert_eq!(common::get(&base, "/health").await.0, 200);
    let case = &common::served_cases(CHAT)[0];
    let (status, body) =
        common::chat(&base, &common::greedy(CHAT, common::messages(case), 20)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(common::content(&body), common::expected_text(CHAT, case).0);
}
