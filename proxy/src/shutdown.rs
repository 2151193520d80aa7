//! Shutdown signal handed to every task, so each one decides where it can stop cleanly, and
//! the process signals that lead to it (SIGTERM/SIGINT, after a delay) or not (SIGHUP).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::wake::{WakerList, WakerSlot};

/// Fires once when the process starts shutting down (SIGTERM/SIGINT).
///
/// A flag and a list of waiting tasks: a wait ([`Shutdown::recv`]) registers its task once
/// and is then a flag check per poll (an idle transaction-mode client polls it at every
/// transaction), and is 32 bytes in the waiting future where a `watch` wait was 160.
#[derive(Clone)]
pub struct Shutdown {
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    fired: AtomicBool,
    waiters: WakerList,
}

/// The side that triggers shutdown; kept by `main`. Dropping it triggers shutdown too.
pub struct ShutdownTrigger {
    state: Arc<State>,
}

impl Shutdown {
    /// A pair: the trigger for `main`, the receiver to clone into tasks.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let state = Arc::new(State::default());
        (
            ShutdownTrigger {
                state: state.clone(),
            },
            Shutdown { state },
        )
    }

    /// Whether shutdown has started.
    pub fn is_shutdown(&self) -> bool {
        self.state.fired.load(Ordering::Acquire)
    }

    /// Completes when shutdown starts (at once if it already has). The future may be polled
    /// again after it completed (it stays ready), so one wait can serve a whole session.
    pub fn recv(&mut self) -> Recv<'_> {
        Recv {
            state: &self.state,
            slot: WakerSlot::default(),
        }
    }
}

/// See [`Shutdown::recv`].
pub struct Recv<'a> {
    state: &'a State,
    slot: WakerSlot,
}

impl Future for Recv<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.state.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        this.state.waiters.register(&mut this.slot, cx.waker());
        // A trigger between the check above and the registration woke the list before it.
        if this.state.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Recv<'_> {
    fn drop(&mut self) {
        self.state.waiters.remove(&mut self.slot);
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
        self.state.fired.store(true, Ordering::Release);
        self.state.waiters.wake_all();
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.trigger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_registers_once_wakes_on_trigger_and_leaves_when_dropped() {
        let (trigger, shutdown) = Shutdown::new();
        let waiter = {
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut wait = shutdown.recv();
                // Polled several times before the trigger: registered once.
                for _ in 0..3 {
                    let pending =
                        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut wait).poll(cx))).await;
                    assert!(pending.is_pending());
                }
                assert_eq!(wait.state.waiters.len(), 1);
                (&mut wait).await;
                // Ready again when polled again: one wait serves a whole session.
                (&mut wait).await;
            })
        };
        let mut other = shutdown.clone();
        let gone = std::future::poll_fn(|cx| {
            let mut wait = other.recv();
            let _ = Pin::new(&mut wait).poll(cx);
            Poll::Ready(())
        });
        gone.await;
        while shutdown.state.waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            shutdown.state.waiters.len(),
            1,
            "a dropped wait stayed listed"
        );
        trigger.trigger();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the registered waiter was not woken")
            .unwrap();
        assert!(shutdown.state.waiters.is_empty());
        // After the trigger, a new wait is ready at once.
        let mut late = shutdown.clone();
        late.recv().await;
    }

    #[tokio::test]
    async fn dropping_the_trigger_is_shutdown_too() {
        let (trigger, mut shutdown) = Shutdown::new();
        drop(trigger);
        shutdown.recv().await;
        assert!(shutdown.is_shutdown());
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
