//! The `mmserve` binary: command-line flags, logging, start-up, and the HTTP
//! server until a signal (drain, exit 0) or a fatal error (exit non-zero).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use mmserve::api::{lifecycle, warmup, AppState};
use mmserve::config::{
    Config, Dtype, LogFormat, MatmulPrecision, ModelConfig, ModelKind, Quantize,
};
use mmserve::startup::demo;
use tokio::sync::mpsc;

/// An OpenAI-compatible inference server for vision-language models.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "With no command, mmserve runs `mmserve serve` with its defaults (the embedded \
                  demo models on 127.0.0.1:8000). `mmserve serve --help` lists every flag with \
                  its environment variable and default."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a model over the OpenAI HTTP API (the default command).
    Serve(ServeArgs),
}

/// The flags of `serve`. Each one left out keeps the config file's value; the
/// defaults shown in `--help` are the compiled-in config's ([`flag_defaults`]).
#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// A TOML config file; keys it leaves out keep the defaults of config/mmserve.toml.
    #[arg(long, env = "MMSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// A local Hugging Face model directory (config.json, *.safetensors, tokenizer.json, ...);
    /// repeat to serve several models (chat and embedding). Replaces the config's [[models]].
    #[arg(long, env = "MMSERVE_MODEL")]
    model: Vec<PathBuf>,
    /// The model name clients send in `model`; with one --model.
    #[arg(long, env = "MMSERVE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Address to listen on (0.0.0.0 in containers).
    #[arg(long, env = "MMSERVE_HOST")]
    host: Option<String>,
    /// Port to listen on.
    #[arg(long, env = "MMSERVE_PORT")]
    port: Option<u16>,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, env = "MMSERVE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Weight and activation dtype of every model: auto is f32 on CPU and bf16 on GPU; f16
    /// halves the weights' memory; bf16 is refused on CPU (no matmul kernel there); bf16
    /// checkpoints are converted to this dtype when loaded.
    #[arg(long, env = "MMSERVE_DTYPE", value_enum)]
    dtype: Option<Dtype>,
    /// Quantize every chat model's decoder projections at load to a GGML block type (faster
    /// CPU decoding, about 1/4 of the f32 weight memory for q8_0); the vision tower stays as is.
    #[arg(long, env = "MMSERVE_QUANTIZE", value_enum)]
    quantize: Option<Quantize>,
    /// How chat models' vision towers run their f32 products: highest (f32), or high (bf16x3
    /// on AMX tiles where the CPU has them: about 1e-5 relative error per product, the
    /// products about 1.7x faster).
    #[arg(long, env = "MMSERVE_VISION_MATMUL_PRECISION", value_enum)]
    vision_matmul_precision: Option<MatmulPrecision>,
    /// Devices to run each chat model on, one engine per entry: `cpu`, or `cuda:0,cuda:1`
    /// (GPU builds).
    #[arg(long, env = "MMSERVE_DEVICES", value_delimiter = ',')]
    devices: Vec<String>,
    /// Most sequences decoded together in one engine step.
    #[arg(long, env = "MMSERVE_MAX_NUM_SEQS")]
    max_num_seqs: Option<usize>,
    /// Most tokens in one forward pass.
    #[arg(long, env = "MMSERVE_MAX_BATCHED_TOKENS")]
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

/// What each `serve` flag stands for when left out, by argument id: the
/// compiled-in config's values (config/mmserve.toml), which a config file may change.
fn flag_defaults() -> Vec<(&'static str, String)> {
    let Ok(d) = Config::load(None) else {
        return Vec::new();
    };
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map_or(String::new(), |v| v.get_name().to_string())
    };
    vec![
        ("config", "none: the compiled-in config/mmserve.toml".into()),
        ("model", "the config's [[models]]; with none, the embedded demo models mmserve-demo (chat) and mmserve-demo-clip (embeddings)".into()),
        ("served_model_name", "the directory's name".into()),
        ("host", format!("{} (server.host)", d.server.host)),
        ("port", format!("{} (server.port)", d.server.port)),
        ("log_format", format!("{} (server.log_format)", name(d.server.log_format.to_possible_value()))),
        ("dtype", format!("{} (models' dtype)", name(Dtype::default().to_possible_value()))),
        ("quantize", "none (models' quantize)".into()),
        ("vision_matmul_precision", "highest (models' vision_matmul_precision)".into()),
        ("devices", format!("{} (engine.devices)", d.engine.devices.join(","))),
        ("max_num_seqs", format!("{} (engine.max_num_seqs)", d.engine.max_num_seqs)),
        ("max_batched_tokens", format!("{} (engine.max_batched_tokens)", d.engine.max_batched_tokens)),
        ("api_keys", "none (server.api_keys and server.api_keys_file still apply)".into()),
    ]
}

/// The command line, each `serve` flag's help ending with its default.
fn command() -> clap::Command {
    let defaults = flag_defaults();
    Cli::command().mut_subcommand("serve", |mut serve| {
        for (id, value) in &defaults {
            serve = serve.mut_arg(*id, |a| {
                let help = a.get_help().map(ToString::to_string).unwrap_or_default();
                a.help(format!("{help} [default: {value}]"))
            });
        }
        serve
    })
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
        if let Some(q) = self.quantize {
            cfg.models.iter_mut().for_each(|m| m.quantize = Some(q));
        }
        if let Some(p) = self.vision_matmul_precision {
            cfg.models
                .iter_mut()
                .for_each(|m| m.vision_matmul_precision = p);
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
        if !self.devices.is_empty() {
            cfg.engine.devices = self.devices.clone();
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

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    mmserve::engine::memory::keep_large_allocations();
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
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
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "cannot listen on {addr}: the port is already in use (another server? choose a \
             port with --port or MMSERVE_PORT)"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
    };
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
        let (served, engine_threads) =
            tokio::task::spawn_blocking(move || mmserve::startup::load(&load_cfg, &m, kind))
                .await
                .context("the loading task failed")??;
        state.install(&name, served);
        for thread in engine_threads {
            watch_engine(thread, name.clone(), stop.clone());
        }
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
