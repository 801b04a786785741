//! The `mmserve` binary: command-line flags, logging, start-up, and the HTTP
//! server until a signal (drain, exit 0) or a fatal error (exit non-zero).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mmserve::api::{lifecycle, warmup, AppState};
use mmserve::config::{Config, Dtype, LogFormat, ModelConfig, ModelKind};
use mmserve::startup::demo;
use tokio::sync::mpsc;

/// An OpenAI-compatible inference server for vision-language models.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a model over the OpenAI HTTP API (the default command).
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// A TOML config file; keys it leaves out keep the defaults of config/mmserve.toml.
    #[arg(long, env = "MMSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// A local Hugging Face model directory (config.json, *.safetensors, tokenizer.json, ...);
    /// repeat to serve several models (chat and embedding). Replaces the config's [[models]].
    /// With no model here or in the config, the embedded demo models are served
    /// (`mmserve-demo`, chat, and `mmserve-demo-clip`, embeddings).
    #[arg(long, env = "MMSERVE_MODEL")]
    model: Vec<PathBuf>,
    /// The model name clients send in `model` (default: the directory's name); with one --model.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on (default 127.0.0.1; 0.0.0.0 in containers).
    #[arg(long, env = "MMSERVE_HOST")]
    host: Option<String>,
    /// Port to listen on (default 8000).
    #[arg(long, env = "MMSERVE_PORT")]
    port: Option<u16>,
    /// Log lines as `text` or `json` (one object per line) [default: the
    /// config's `server.log_format`, text].
    #[arg(long, env = "MMSERVE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Compute dtype of every model given by --model (default f32; bf16 is slow on CPUs).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Most sequences decoded together in one engine step.
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// Most tokens in one forward pass.
    #[arg(long)]
    max_batched_tokens: Option<usize>,
    /// An API key clients must send as `Authorization: Bearer KEY` (repeatable, or
    /// comma-separated in the environment variable); added to the config's keys.
    #[arg(
        long = "api-key",
        env = "MMSERVE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
}

impl ServeArgs {
    /// Flags override the config file.
    fn config(&self) -> Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if !self.model.is_empty() {
            cfg.models = self.model.iter().cloned().map(ModelConfig::new).collect();
        }
        if cfg.models.is_empty() {
            tracing::info!(
                chat = demo::CHAT_NAME,
                embedding = demo::EMBEDDING_NAME,
                "no model given: serving the embedded demo models (pass --model DIR for your own)"
            );
            cfg.models = demo::models()?;
        }
        if let Some(n) = &self.served_model_name {
            match cfg.models.as_mut_slice() {
                [m] => m.name = n.clone(),
                _ => anyhow::bail!("--served-model-name needs exactly one model"),
            }
        }
        if let Some(d) = self.dtype {
            cfg.models.iter_mut().for_each(|m| m.dtype = d);
        }
        if let Some(h) = &self.host {
            cfg.server.host = h.clone();
        }
        if let Some(p) = self.port {
            cfg.server.port = p;
        }
        if let Some(f) = self.log_format {
            cfg.server.log_format = f;
        }
        if let Some(n) = self.max_num_seqs {
            cfg.engine.max_num_seqs = n;
        }
        if let Some(n) = self.max_batched_tokens {
            cfg.engine.max_batched_tokens = n;
        }
        let keys = self
            .api_keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty());
        cfg.server.api_keys.extend(keys.map(str::to_string));
        cfg.check()?;
        Ok(cfg)
    }
}

/// Logs to stdout at RUST_LOG's levels (default info), as text or JSON.
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().with_current_span(true).init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(a)) => a,
        None => ServeArgs::default(),
    };
    let cfg = args.config()?;
    init_logging(cfg.server.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(serve(cfg));
    // Do not wait for a model still loading on a blocking thread.
    rt.shutdown_background();
    result
}

/// Why the server stops.
enum Stop {
    /// SIGTERM or SIGINT: drain, then exit 0.
    Signal,
    /// A model could not load: exit non-zero with the reason.
    LoadFailed(anyhow::Error),
    /// An engine thread ended: exit non-zero so the orchestrator restarts us.
    EngineDied(String),
}

async fn serve(cfg: Config) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", cfg.server.host, cfg.server.port)
        .parse()
        .with_context(|| format!("invalid address {}:{}", cfg.server.host, cfg.server.port))?;
    let mut slots = Vec::with_capacity(cfg.models.len());
    for m in &cfg.models {
        slots.push((m.served_name(), mmserve::startup::model_kind(m)?));
    }
    let kinds: Vec<_> = slots.iter().map(|s| s.1).collect();
    let state = Arc::new(AppState::new(slots, &cfg.server));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        %addr,
        api_keys = cfg.server.api_keys.len(),
        cors_origins = ?cfg.server.cors_allow_origins,
        "listening; loading the models"
    );
    let drain_timeout = Duration::from_secs(cfg.server.drain_timeout_secs);
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel();

    // Load and warm up in the background; /ready answers 503 meanwhile.
    let loader_state = Arc::clone(&state);
    let loader_stop = stop_tx.clone();
    tokio::spawn(async move {
        if let Err(e) = bring_up(cfg, kinds, &loader_state, &loader_stop).await {
            let _ = loader_stop.send(Stop::LoadFailed(e));
        }
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(Stop::Signal);
        shutdown_signal().await;
        tracing::warn!("second signal: stopping now");
        std::process::exit(1);
    });
    let stop = async move { stop_rx.recv().await.unwrap_or(Stop::Signal) };
    let reason = lifecycle::serve(listener, state, stop, drain_timeout)
        .await
        .context("server error")?;
    match reason {
        Stop::Signal => Ok(()),
        Stop::LoadFailed(e) => Err(e),
        Stop::EngineDied(name) => anyhow::bail!("the engine of `{name}` stopped; exiting"),
    }
}

/// Loads each model (off the runtime), installs it, watches its engine
/// thread and warms it up. A failed load or warm-up stops the server: a model
/// that cannot answer its canary request would never become ready.
async fn bring_up(
    cfg: Config,
    kinds: Vec<ModelKind>,
    state: &AppState,
    stop: &mpsc::UnboundedSender<Stop>,
) -> Result<()> {
    let cfg = Arc::new(cfg);
    for (i, kind) in kinds.into_iter().enumerate() {
        let m = cfg.models[i].clone();
        let name = m.served_name();
        let path = m.path.clone();
        let load_cfg = Arc::clone(&cfg);
        let (served, engine_thread) =
            tokio::task::spawn_blocking(move || mmserve::startup::load(&load_cfg, &m, kind))
                .await
                .context("the loading task failed")??;
        state.install(&name, served);
        watch_engine(engine_thread, name.clone(), stop.clone());
        tracing::info!(model = %name, path = %path.display(), "model loaded");
        warmup::warm_up(state, &name, &cfg.debug)
            .await
            .map_err(|e| anyhow::anyhow!("the warm-up of `{name}` failed: {}", e.message))?;
    }
    tracing::info!("every model is ready");
    Ok(())
}

/// Reports an engine thread's end (a panic outside the per-request guards).
fn watch_engine(thread: JoinHandle<()>, name: String, stop: mpsc::UnboundedSender<Stop>) {
    let watcher = std::thread::Builder::new()
        .name("mmserve-watch".into())
        .spawn(move || {
            let _ = thread.join();
            tracing::error!(model = %name, "engine thread stopped");
            let _ = stop.send(Stop::EngineDied(name));
        });
    if let Err(e) = watcher {
        tracing::warn!(error = %e, "cannot watch an engine thread");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
