//! The playground page through real HTTP: `/` and its assets are served from the binary with
//! their content types, open even when API keys guard the API, and the page's script reads the
//! `kind` that `/v1/models` gives each model. (The page's behaviour in a browser is checked by
//! `scripts/playground-check.sh` with headless Chromium.)

mod common;

use reqwest::header::CONTENT_TYPE;

const CHAT: &str = "llava-clip-llama";
const EMBED: &str = "clip-tiny";

async fn fetch(base: &str, path: &str) -> (u16, String, String) {
    let resp = common::client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, kind, resp.text().await.expect("body"))
}

#[tokio::test]
async fn page_and_assets_are_served_without_a_key() {
    let mut cfg = common::config(&[CHAT]);
    cfg.server.api_keys = vec!["sk-a".into()];
    let base = common::start(cfg);
    let (status, kind, html) = fetch(&base, "/").await;
    assert_eq!((status, kind.as_str()), (200, "text/html; charset=utf-8"));
    for asset in ["/playground/app.js", "/playground/style.css"] {
        assert!(html.contains(asset), "the page links {asset}");
    }
    let (status, kind, js) = fetch(&base, "/playground/app.js").await;
    assert_eq!(
        (status, kind.as_str()),
        (200, "text/javascript; charset=utf-8")
    );
    assert!(js.contains("/v1/chat/completions") && js.contains("/v1/embeddings"));
    let (status, kind, _) = fetch(&base, "/playground/style.css").await;
    assert_eq!((status, kind.as_str()), (200, "text/css; charset=utf-8"));
    // The API behind it still needs the key.
    let (status, _, _) = fetch(&base, "/v1/models").await;
    assert_eq!(status, 401);
    let (status, _, _) = fetch(&base, "/playground/other.js").await;
    assert_eq!(status, 401, "only the page's own files are open");
}

#[tokio::test]
async fn models_say_which_endpoint_serves_them() {
    let base = common::start(common::config(&[CHAT, EMBED]));
    let (status, list) = common::get(&base, "/v1/models").await;
    assert_eq!(status, 200);
    let kinds: Vec<(&str, &str)> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or(""),
                m["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(kinds, [(CHAT, "chat"), (EMBED, "embedding")]);
}
