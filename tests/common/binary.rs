//! The real `mmserve` binary as a child process on a free loopback port, for tests of what only
//! the command line does (default models, signals, exit codes).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `mmserve serve`; killed when dropped.
pub struct Served {
    pub child: Child,
    pub base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mmserve` with none of its MMSERVE_* settings taken from the test's environment.
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmserve"));
    for var in [
        "MMSERVE_MODEL",
        "MMSERVE_CONFIG",
        "MMSERVE_HOST",
        "MMSERVE_PORT",
        "MMSERVE_LOG_FORMAT",
        "MMSERVE_SERVED_MODEL_NAME",
        "MMSERVE_DTYPE",
        "MMSERVE_MAX_NUM_SEQS",
        "MMSERVE_MAX_BATCHED_TOKENS",
        "MMSERVE_API_KEYS",
    ] {
        c.env_remove(var);
    }
    c
}

/// A port nothing listens on right now (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts `mmserve serve ARGS --port P` with no MMSERVE_* settings from the environment and
/// waits until `/ready` answers 200 (models loaded and warmed up), for at most `ready_within`.
pub async fn start(args: &[&str], ready_within: Duration) -> Served {
    let mut served = spawn(args);
    wait_until(&mut served, "/ready", ready_within).await;
    served
}

/// Starts `mmserve serve ARGS --port P` (no MMSERVE_* settings from the environment) and returns
/// at once.
pub fn spawn(args: &[&str]) -> Served {
    let port = free_port().to_string();
    let child = command()
        .arg("serve")
        .args(args)
        .args(["--port", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run mmserve");
    Served {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// Waits until GET `path` answers 200, for at most `within`; panics if the process exits first.
pub async fn wait_until(served: &mut Served, path: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let client = reqwest::Client::new();
    loop {
        let ok = client
            .get(format!("{}{path}", served.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            return;
        }
        if let Some(status) = served.child.try_wait().expect("wait") {
            panic!("mmserve exited before {path} answered 200: {status}");
        }
        assert!(Instant::now() < deadline, "{path} not 200 in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
