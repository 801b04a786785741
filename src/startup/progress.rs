//! Start-up progress for operators: each weights file and its size before a
//! model loads, a line every few seconds while it loads (elapsed time and the
//! process's resident memory, which grows as tensors are read), and the time
//! it took.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a model still loading is reported.
const EVERY: Duration = Duration::from_secs(5);

/// Reports a model's loading until [`Progress::done`] or drop.
pub struct Progress {
    name: String,
    started: Instant,
    /// Dropped to stop the reporting thread.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Logs the weights of the model `name` in `dir` and starts reporting.
pub fn start(name: &str, dir: &Path) -> Progress {
    // A missing file is reported by the loader itself, with its name.
    let files = crate::model::safetensors_files(dir).unwrap_or_default();
    let mut total = 0u64;
    for f in &files {
        let bytes = f.metadata().map_or(0, |m| m.len());
        total += bytes;
        tracing::info!(model = %name, file = %f.display(), bytes, "weights file");
    }
    tracing::info!(model = %name, files = files.len(), bytes = total, "loading weights");
    let started = Instant::now();
    let (stop, stopped) = mpsc::channel::<()>();
    let label = name.to_string();
    let thread = std::thread::Builder::new()
        .name("mmserve-progress".into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                tracing::info!(
                    model = %label,
                    elapsed_s = started.elapsed().as_secs(),
                    resident_mib = resident_bytes().map(mib),
                    weights_mib = mib(total),
                    "still loading weights"
                );
            }
        })
        .ok();
    Progress {
        name: name.to_string(),
        started,
        stop: Some(stop),
        thread,
    }
}

impl Progress {
    /// The model has loaded: says how long it took.
    pub fn done(self) {
        tracing::info!(
            model = %self.name,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            resident_mib = resident_bytes().map(mib),
            "weights loaded"
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// The process's resident memory (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
