//! Shutdown signal handed to every task, so each one decides where it can stop cleanly, and
//! the process signals that lead to it (SIGTERM/SIGINT, after a delay) or not (SIGHUP).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;

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

/// Shutdown as idle transaction-mode clients wait for it: a flag and a list of their tasks'
/// wakers. A client registers once per session (24 bytes in the list, a key in its future);
/// the shutdown wait of [`Shutdown::recv`] cost 160 bytes in every idle client's future and
/// several hundred instructions each time it was polled again.
#[derive(Default)]
pub struct IdleStop {
    fired: AtomicBool,
    wakers: Mutex<Slab<Waker>>,
}

impl IdleStop {
    /// Shutdown started: every registered client is woken, and every later poll is ready.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        let wakers: Vec<Waker> = crate::lock(&self.wakers).drain().collect();
        for w in wakers {
            w.wake();
        }
    }

    /// A client's registration, removed when dropped.
    pub fn register(&self) -> IdleStopWait<'_> {
        IdleStopWait {
            stop: self,
            key: None,
        }
    }
}

/// One client's wait for [`IdleStop::fire`].
pub struct IdleStopWait<'a> {
    stop: &'a IdleStop,
    key: Option<usize>,
}

impl IdleStopWait<'_> {
    /// Ready once shutdown started. The first poll registers the task's waker, which tokio
    /// keeps for the life of the task, so later polls only look at the flag.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stop.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if self.key.is_none() {
            self.key = Some(crate::lock(&self.stop.wakers).insert(cx.waker().clone()));
            // A fire between the check above and the insert drained the list before it.
            if self.stop.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl Drop for IdleStopWait<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key
            && !self.stop.fired.load(Ordering::Acquire)
        {
            crate::lock(&self.stop.wakers).try_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_stop_wakes_registered_waiters_and_forgets_dropped_ones() {
        let stop = std::sync::Arc::new(IdleStop::default());
        let waiter = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut wait = stop.register();
                // Polled several times before the fire: registered once.
                for _ in 0..3 {
                    let pending = std::future::poll_fn(|cx| Poll::Ready(wait.poll(cx))).await;
                    assert!(pending.is_pending());
                }
                assert_eq!(crate::lock(&stop.wakers).len(), 1);
                std::future::poll_fn(|cx| wait.poll(cx)).await;
            })
        };
        let gone = stop.register();
        drop(gone);
        while crate::lock(&stop.wakers).is_empty() {
            tokio::task::yield_now().await;
        }
        stop.fire();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the registered waiter was not woken")
            .unwrap();
        assert!(crate::lock(&stop.wakers).is_empty());
        // After the fire, a new wait is ready at once.
        let mut late = stop.register();
        std::future::poll_fn(|cx| late.poll(cx)).await;
    }

    #[tokio::test]
    async fn recv_completes_after_trigger() {
        let (trigger, mut shutdown) = Shutdown::new();
        assert!(!shutdown.is_shutdown());
        trigger.trigger();
        shutdown.recv().await;
        assert!(shutdown.is_shutdown());
    }
}
