//! The server's life after start-up: which requests are in flight, draining
//! on shutdown (new requests and `/health` answer 503 while the listener stays
//! open; requests already admitted get a deadline to finish), then stopping.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use super::error::ApiError;
use super::{router, AppState};

/// Draining state and the count of admitted requests.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Woken whenever the last in-flight request ends.
    idle: Notify,
}

/// One admitted request; it counts as in flight until dropped (for a stream,
/// when the stream has ended).
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    /// Admits a request, or refuses it with 503 `server_shutting_down`.
    pub fn admit(self: &Arc<Self>) -> Result<InFlight, ApiError> {
        // Counted before the check: a drain that starts now either sees this
        // request or this request sees the drain.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(Arc::clone(self));
        if self.is_draining() {
            return Err(shutting_down());
        }
        Ok(guard)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Resolves once no admitted request is left.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// The 503 of a draining server.
pub fn shutting_down() -> ApiError {
    ApiError::unavailable("the server is shutting down".into()).with_code("server_shutting_down")
}

/// Serves `state` on `listener` until `stop` resolves, then drains: new
/// requests get 503 while admitted ones have `drain_timeout` to finish; then
/// the connections are closed. Returns what `stop` returned.
pub async fn serve<T>(
    listener: TcpListener,
    state: Arc<AppState>,
    stop: impl Future<Output = T>,
    drain_timeout: Duration,
) -> std::io::Result<T> {
    let lifecycle = Arc::clone(&state.lifecycle);
    let (close, closed) = oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = closed.await;
            })
            .into_future(),
    );
    let reason = stop.await;
    lifecycle.start_draining();
    tracing::info!(in_flight = lifecycle.in_flight(), "draining");
    if tokio::time::timeout(drain_timeout, lifecycle.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = lifecycle.in_flight(),
            "drain deadline passed; closing anyway"
        );
    }
    let _ = close.send(());
    // The responses are complete; give the connections a moment to flush.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => return Err(std::io::Error::other(e)),
        Err(_) => tracing::warn!("connections still open after the drain; closing them"),
    }
    tracing::info!("stopped");
    Ok(reason)
}
