//! Shutdown signal handed to every task, so each one decides where it can stop cleanly, and
//! the process signals that lead to it (SIGTERM/SIGINT, after a delay) or not (SIGHUP).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Fires once when the process starts shutting down (SIGTERM/SIGINT).
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The side that triggers shutdown; kept by `main`.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    /// A pair: the trigger for `main`, the receiver to clone into tasks.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Whether shutdown has started.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when shutdown starts (at once if it already has).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped: treat it as shutdown too.
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

/// Waits for SIGTERM or SIGINT, calling `on_hangup` for every SIGHUP meanwhile; then keeps
/// going for `delay` (the application in the pod is stopping too and still needs its
/// database), cut short by a second SIGTERM/SIGINT.
pub async fn wait_for_termination(delay: Duration, on_hangup: impl Fn()) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers; only Ctrl-C stops dbproxy");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    let name = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => on_hangup(),
        }
    };
    if delay.is_zero() {
        return;
    }
    tracing::info!(
        signal = name,
        delay_s = delay.as_secs(),
        "shutdown requested; still serving new clients during --shutdown-delay"
    );
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return,
            _ = term.recv() => {
                tracing::info!("second SIGTERM: skipping the rest of --shutdown-delay");
                return;
            }
            _ = int.recv() => {
                tracing::info!("second SIGINT: skipping the rest of --shutdown-delay");
                return;
            }
            _ = hup.recv() => on_hangup(),
        }
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recv_completes_after_trigger() {
        let (trigger, mut shutdown) = Shutdown::new();
        assert!(!shutdown.is_shutdown());
        trigger.trigger();
        shutdown.recv().await;
        assert!(shutdown.is_shutdown());
    }
}
