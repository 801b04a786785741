//! Access control through real HTTP: API keys (from the config, its key file,
//! `--api-key` and `MMSERVE_API_KEYS`), a 401 in the OpenAI shape without
//! one, `/health` open, and CORS only when configured.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, ORIGIN};
use serde_json::json;

const MODEL: &str = "llava-clip-llama";

async fn status(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let resp = req.send().await.expect("request");
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or_default())
}

fn hi() -> serde_json::Value {
    json!({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn keys_guard_every_route_but_the_probes() {
    let mut cfg = common::config(&[MODEL]);
    cfg.server.api_keys = vec!["sk-a".into(), "sk-b".into()];
    let base = common::start(cfg);
    let c = common::client();
    let models = format!("{base}/v1/models");
    for auth in [
        None,
        Some("Bearer sk-c"),
        Some("sk-a"),
        Some("Bearer "),
        Some("Basic sk-a"),
    ] {
        let mut req = c.get(&models);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let b: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(b["error"]["code"], "invalid_api_key", "{b}");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert!(b["error"].as_object().unwrap().contains_key("param"));
    }
    let chat = format!("{base}/v1/chat/completions");
    let (s, b) = status(c.post(&chat).json(&hi())).await;
    assert_eq!((s, &b["error"]["code"]), (401, &json!("invalid_api_key")));
    let (s, _) = status(c.post(&chat).json(&hi()).bearer_auth("sk-b")).await;
    assert_eq!(s, 200);
    let (s, _) = status(c.get(&models).bearer_auth("sk-a")).await;
    assert_eq!(s, 200);
    for probe in ["/health", "/ready"] {
        assert_eq!(common::get(&base, probe).await.0, 200, "{probe} stays open");
    }
}

#[tokio::test]
async fn cors_answers_only_configured_origins() {
    let mut cfg = common::config(&[MODEL]);
    cfg.server.api_keys = vec!["sk-a".into()];
    cfg.server.cors_allow_origins = vec!["https://app.example".into()];
    let base = common::start(cfg);
    let c = common::client();
    let models = format!("{base}/v1/models");
    // A preflight carries no key and must still be answered.
    let pre = c
        .request(reqwest::Method::OPTIONS, &models)
        .header(ORIGIN, "https://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let get = |origin: &'static str| c.get(&models).header(ORIGIN, origin).bearer_auth("sk-a");
    let ok = get("https://app.example").send().await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = get("https://evil.example").send().await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // Off by default: no CORS headers, and a preflight is not a route.
    let plain = common::start(common::config(&[MODEL]));
    let resp = c
        .get(format!("{plain}/v1/models"))
        .header(ORIGIN, "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let pre = c
        .request(reqwest::Method::OPTIONS, format!("{plain}/v1/models"))
        .header(ORIGIN, "https://app.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status().as_u16(), 405);
}

/// The binary, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with a key file and these extra arguments and
/// environment; returns it once ready, with its base URL.
async fn spawn(extra: &[&str], env: &[(&str, &str)]) -> (Server, String) {
    let dir = std::env::temp_dir().join(format!("mmserve-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keys"), "sk-file\n").unwrap();
    let cfg = dir.join("c.toml");
    let keys = dir.join("keys").display().to_string();
    std::fs::write(&cfg, format!("[server]\napi_keys_file = {keys:?}\n")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = common::model_dir(MODEL).display().to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_mmserve"))
        .args(["serve", "--model", &model, "--port", &port.to_string()])
        .args(["--config", cfg.to_str().unwrap()])
        .args(extra)
        .envs(env.iter().copied())
        .env_remove("MMSERVE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run mmserve");
    let server = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = common::client();
    while !matches!(c.get(format!("{base}/ready")).send().await, Ok(r) if r.status() == 200) {
        assert!(Instant::now() < deadline, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, base)
}

#[tokio::test]
async fn the_binary_takes_keys_from_flag_env_and_key_file() {
    let c = common::client();
    type Run<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let runs: [Run; 2] = [
        (&["--api-key", "sk-flag"], &[], &["sk-flag", "sk-file"]),
        (
            &[],
            &[("MMSERVE_API_KEYS", "sk-env1,sk-env2")],
            &["sk-env1", "sk-env2", "sk-file"],
        ),
    ];
    for (args, env, good) in runs {
        let (_server, base) = spawn(args, env).await;
        let models = format!("{base}/v1/models");
        assert_eq!(status(c.get(&models)).await.0, 401);
        assert_eq!(status(c.get(&models).bearer_auth("sk-nope")).await.0, 401);
        for key in good {
            assert_eq!(
                status(c.get(&models).bearer_auth(key)).await.0,
                200,
                "{key}"
            );
        }
    }
}
