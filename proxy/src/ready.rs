//! Read polls skipped when they cannot find anything.
//!
//! A forwarding loop polls both of its sockets whenever its task wakes, though only one of
//! them woke it. A read poll that finds nothing costs about 160 instructions and a lock on
//! the socket's waiter list (tokio registers the task's waker anew each time). But once a
//! read returned `Pending` with the task's waker registered, and no readiness event came
//! for that socket since, the waker is still registered and a new poll would find nothing:
//! tokio sets a socket's readiness before it takes and wakes the registered waker. So
//! [`ReadWatch::waiting`] looks at the readiness alone (one atomic load) and the poll is
//! skipped. Plaintext sockets only: a TLS stream may hold decrypted bytes its socket's
//! readiness does not show, so it is always polled.
//!
//! Single-threaded runtimes only (the default, `--worker-threads 0`). With worker threads
//! the reactor runs beside the tasks, and setting a socket's readiness and taking its waker
//! are two steps: a task may read the bytes and clear the readiness in between (its next
//! poll registers its waker again), then the reactor takes that waker and wakes the task,
//! which finds no readiness, skips the poll, and is never woken again. On one thread the
//! reactor only runs while no task does. [`allow_skips`] is called by `main` when it builds
//! a current-thread runtime; until then no watch arms.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};

use dbcred::tls::PgStream;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::tls::ClientStream;

/// Whether watches may arm: the runtime is single-threaded (see the module's notes).
static SKIPS_ALLOWED: AtomicBool = AtomicBool::new(false);

/// Lets watches arm: call once, for a current-thread runtime only.
pub fn allow_skips() {
    SKIPS_ALLOWED.store(true, Relaxed);
}

/// A stream whose readiness to read can be looked at without polling it.
pub trait ReadHint {
    /// False only when a read would certainly find nothing new: the socket's last read
    /// ended in `WouldBlock` and no readiness event came since. True when unknown.
    fn may_read(&self) -> bool;
}

impl ReadHint for TcpStream {
    #[inline]
    fn may_read(&self) -> bool {
        // Readiness is looked at first, and without it the closure is not called: no
        // system call, no registration, nothing cleared.
        self.try_io(Interest::READABLE, || Ok(())).is_ok()
    }
}

impl ReadHint for ClientStream {
    #[inline]
    fn may_read(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.may_read(),
            _ => true,
        }
    }
}

impl ReadHint for PgStream {
    #[inline]
    fn may_read(&self) -> bool {
        match self {
            PgStream::Plain(s) => s.may_read(),
            _ => true,
        }
    }
}

/// Whether one socket's read waits with a task's waker registered: the address of the
/// waker's data (a tokio task's header), zero when not waiting. Eight bytes, as every session
/// that is not parked keeps two.
///
/// The address is compared, not kept alive: a watch lives in a future or a local of the task
/// that armed it, and is dropped or disarmed before its socket moves anywhere else (parked
/// connections leave the runtime and come back with a new registration, and a new watch). So
/// the wakers it meets are its task's, or those of a combinator the task polls it through,
/// whose data is an allocation of its own: the address tells them apart. A waker without
/// data (`Waker::noop`) never arms it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadWatch {
    waker: usize,
}

impl ReadWatch {
    fn id(cx: &Context<'_>) -> usize {
        cx.waker().data() as usize
    }

    /// Whether the read can be skipped: it waits with this task's waker registered and
    /// nothing arrived since.
    #[inline]
    pub fn waiting<R: ReadHint + ?Sized>(&self, stream: &R, cx: &Context<'_>) -> bool {
        self.waker != 0 && self.waker == Self::id(cx) && !stream.may_read()
    }

    /// Records a read poll's result. `Pending` registered the waker unless the task's
    /// cooperative budget ran out (tokio then returns `Pending` before looking at the
    /// socket, and wakes the task again at once): only a `Pending` with budget left arms
    /// the watch.
    #[inline]
    pub fn polled<T>(&mut self, poll: &Poll<T>, cx: &Context<'_>) {
        self.waker = if poll.is_pending()
            && SKIPS_ALLOWED.load(Relaxed)
            && tokio::task::coop::has_budget_remaining()
        {
            Self::id(cx)
        } else {
            0
        };
    }

    /// Forgets the registration (the socket is about to be polled elsewhere, or not at all).
    #[inline]
    pub fn disarm(&mut self) {
        self.waker = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected loopback pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn poll_read(s: &mut TcpStream, cx: &mut Context<'_>) -> Poll<usize> {
        let mut buf = [0u8; 64];
        let mut rb = ReadBuf::new(&mut buf);
        std::pin::Pin::new(s)
            .poll_read(cx, &mut rb)
            .map(|r| r.map(|()| rb.filled().len()).unwrap())
    }

    #[tokio::test]
    async fn a_waiting_read_is_skipped_until_bytes_arrive() {
        // A current-thread runtime, as `main` builds by default.
        allow_skips();
        let (mut a, mut b) = pair().await;
        let mut watch = ReadWatch::default();
        std::future::poll_fn(|cx| {
            // Nothing sent yet: the first poll registers, the watch arms, the next look skips.
            assert!(!watch.waiting(&a, cx), "an unarmed watch never skips");
            let poll = poll_read(&mut a, cx);
            assert!(poll.is_pending());
            watch.polled(&poll, cx);
            assert!(
                watch.waiting(&a, cx),
                "registered and nothing arrived: skip"
            );
            Poll::Ready(())
        })
        .await;
        b.write_all(b"hello").await.unwrap();
        // The registered waker is woken once the bytes arrive; from then on the look says
        // poll.
        let woken = std::future::poll_fn(|cx| {
            if watch.waiting(&a, cx) {
                return Poll::Pending;
            }
            let poll = poll_read(&mut a, cx);
            assert_eq!(poll, Poll::Ready(5));
            watch.polled(&poll, cx);
            assert!(!watch.waiting(&a, cx), "a read that found bytes disarms");
            Poll::Ready(())
        });
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("the registered waker was not woken by the bytes");
        // Another task's waker never matches.
        std::future::poll_fn(|cx| {
            let poll = poll_read(&mut a, cx);
            assert!(poll.is_pending());
            watch.polled(&poll, cx);
            Poll::Ready(())
        })
        .await;
        let mut other = Context::from_waker(Waker::noop());
        assert!(!watch.waiting(&a, &other), "another waker: poll");
        // The peer closing is readiness too.
        drop(b);
        let mut rest = Vec::new();
        let closed = std::future::poll_fn(|cx| {
            if watch.waiting(&a, cx) {
                return Poll::Pending;
            }
            Poll::Ready(())
        });
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the registered waker was not woken by the peer closing");
        assert_eq!(a.read_to_end(&mut rest).await.unwrap(), 0);
        let poll = poll_read(&mut a, &mut other);
        assert_eq!(poll, Poll::Ready(0));
    }

    #[tokio::test]
    async fn tls_and_detached_streams_are_always_polled() {
        assert!(PgStream::Detached.may_read());
        assert!(ClientStream::Closed.may_read());
    }
}
