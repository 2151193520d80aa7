//! The forwarding loop: bytes between a client and its server, with message boundaries
//! tracked so the session knows when the server is at a safe point (ReadyForQuery 'I',
//! nothing in flight) and may be reused.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::protocol::framing::{Event, MessageWalker, WalkEnd};
use crate::protocol::frontend::{expects_ready_for_query, opens_extended_sequence};
use crate::stats::{HotStats, hot};

/// Size of the on-stack read buffer; nothing is kept per idle session.
const CHUNK: usize = 16 * 1024;

/// A write backlog larger than this is released after use instead of kept.
const KEEP_BACKLOG: usize = 64 * 1024;

/// How long replies still owed to a terminating client are delivered.
pub(crate) const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client closed its socket (or it broke).
    ClientGone,
    /// The server closed or broke the connection.
    ServerGone,
    /// The client sent a message longer than the configured limit.
    ClientMessageTooLarge(usize),
    /// The client sent bytes that are not a valid message stream.
    ClientProtocol(String),
    /// Asked to stop at a safe point (a move to a new server), and there is one: the server
    /// is idle, nothing in flight, no open extended sequence, both streams between messages.
    SafePoint,
    /// The migration deadline passed; the server-to-client stream is between messages.
    Deadline,
}

/// What both directions of one session know about the server's state. Atomics only because
/// the two directions are separate futures of the same task; there is no contention.
/// Shared by the plaintext loop here and the TLS loop in `tls.rs`, so both track the
/// protocol (and record metrics) the same way.
#[derive(Default)]
pub(crate) struct SessionState {
    /// Messages sent that will be answered by a ReadyForQuery not yet seen.
    pub(crate) pending: AtomicUsize,
    /// Extended-protocol messages sent since the last Sync.
    pub(crate) unsynced: AtomicBool,
    /// Status of the last ReadyForQuery.
    pub(crate) status: AtomicU8,
    /// The client has terminated; the server side stops once every reply is delivered.
    pub(crate) draining: AtomicBool,
    /// Query and transaction timing for the metrics.
    clock: TransactionClock,
    /// 0: run; 1: stop at the next safe point; 2: stop at the next message boundary.
    pub(crate) stop: AtomicU8,
    /// A message from the client (or to it, from the server) is only partly forwarded.
    pub(crate) client_partial: AtomicBool,
    pub(crate) server_partial: AtomicBool,
    /// The client is sending COPY data (PostgreSQL ignores Sync meanwhile).
    pub(crate) copy_in: AtomicBool,
    /// Syncs sent since the last Execute/Query (ignored if a COPY turns out to follow).
    pub(crate) syncs_since_request: AtomicUsize,
    /// A direction is writing what it read: stopping must not drop it mid-write.
    pub(crate) c2s_writing: AtomicBool,
    pub(crate) s2c_writing: AtomicBool,
}

impl SessionState {
    /// A session starts idle, as after the server's login ReadyForQuery.
    pub(crate) fn new() -> Self {
        SessionState {
            status: AtomicU8::new(b'I'),
            ..Default::default()
        }
    }

    /// Whether the session may leave its server right now (stopping drops nothing).
    pub(crate) fn at_safe_point(&self) -> bool {
        self.pending.load(Relaxed) == 0
            && !self.unsynced.load(Relaxed)
            && self.status.load(Relaxed) == b'I'
            && !self.client_partial.load(Relaxed)
            && !self.server_partial.load(Relaxed)
            && !self.c2s_writing.load(Relaxed)
            && !self.s2c_writing.load(Relaxed)
    }

    /// What the server-to-client direction should end with after delivering a chunk, if a
    /// stop was asked for.
    pub(crate) fn stop_after_chunk(&self) -> Option<SessionEnd> {
        match self.stop.load(Relaxed) {
            0 => None,
            1 if self.at_safe_point() => Some(SessionEnd::SafePoint),
            2 if !self.server_partial.load(Relaxed) && !self.s2c_writing.load(Relaxed) => {
                Some(SessionEnd::Deadline)
            }
            _ => None,
        }
    }

    /// A stop was asked for (`kind`): the end to report now, if the session is already
    /// where it may stop.
    pub(crate) fn request_stop(&self, kind: crate::migrate::StopKind) -> Option<SessionEnd> {
        let level = match kind {
            crate::migrate::StopKind::SafePoint => 1,
            crate::migrate::StopKind::Now => 2,
        };
        self.stop.fetch_max(level, Relaxed);
        self.stop_after_chunk()
    }

    /// Whether the server can be reset and reused after the session ended with `end`.
    pub(crate) fn server_clean(
        &self,
        end: &SessionEnd,
        client_walker: &MessageWalker,
        server_walker: &MessageWalker,
    ) -> bool {
        if *end == SessionEnd::SafePoint {
            return true;
        }
        if *end == SessionEnd::Deadline {
            // The caller may still move the session if it happens to be idle.
            return self.at_safe_point();
        }
        matches!(end, SessionEnd::ClientTerminated | SessionEnd::ClientGone)
            && client_walker.at_boundary()
            && server_walker.at_boundary()
            && self.pending.load(Relaxed) == 0
            && !self.unsynced.load(Relaxed)
            && self.status.load(Relaxed) == b'I'
    }
}

/// Per-session timing of queries and transactions, for `dbproxy_queries_total`,
/// `dbproxy_transactions_total` and their latency histograms. Any forwarding loop (plain or
/// TLS) calls [`TransactionClock::request_sent`] for each client message answered by a
/// ReadyForQuery (or opening an extended sequence) and
/// [`TransactionClock::ready_for_query`] for each ReadyForQuery from the server.
#[derive(Default)]
pub struct TransactionClock {
    /// When the request now being answered started (ns since `HotStats::epoch`; 0: none).
    request_start: AtomicU64,
    /// When the transaction in progress started (0: the session is idle).
    transaction_start: AtomicU64,
}

/// Counts bytes read from a client (any forwarding loop).
#[inline]
pub fn count_client_bytes(n: usize) {
    hot().bytes_from_clients.fetch_add(n as u64, Relaxed);
}

/// Counts bytes read from a server and sent on to its client (any forwarding loop).
#[inline]
pub fn count_server_bytes(n: usize) {
    hot().bytes_to_clients.fetch_add(n as u64, Relaxed);
}

impl TransactionClock {
    /// The client sent a message that will be answered by a ReadyForQuery.
    #[inline]
    pub fn request_sent(&self, hot: &HotStats) {
        if self.request_start.load(Relaxed) == 0 {
            let now = hot.now_ns();
            self.request_start.store(now, Relaxed);
            if self.transaction_start.load(Relaxed) == 0 {
                self.transaction_start.store(now, Relaxed);
            }
        }
    }

    /// The server sent ReadyForQuery: one query answered, maybe a transaction finished.
    /// Counters and histograms only: no allocation, no lock.
    #[inline]
    pub fn ready_for_query(&self, hot: &HotStats, status: u8, still_pending: bool) {
        let now = hot.now_ns();
        let started = self.request_start.load(Relaxed);
        hot.queries.fetch_add(1, Relaxed);
        if started != 0 {
            let ns = now.saturating_sub(started);
            hot.query_us.fetch_add(ns / 1000, Relaxed);
            hot.query_seconds.record(ns as f64 / 1e9);
        }
        // Pipelined requests: the next one is being answered from now on.
        self.request_start
            .store(if still_pending { now } else { 0 }, Relaxed);
        if status == b'I' {
            let tx = self.transaction_start.swap(0, Relaxed);
            if tx != 0 {
                let ns = now.saturating_sub(tx);
                hot.transactions.fetch_add(1, Relaxed);
                hot.transaction_us.fetch_add(ns / 1000, Relaxed);
                hot.transaction_seconds.record(ns as f64 / 1e9);
            }
        }
    }
}

/// Result of a session: why it ended and whether its server can be reused.
pub struct SessionOutcome {
    pub end: SessionEnd,
    /// The server is idle with nothing in flight: safe to reset and reuse.
    pub server_clean: bool,
}

/// Forwards until either side ends the session. `initial` holds client bytes already read
/// (sent right behind the startup packet).
pub async fn run_session(
    client: &mut TcpStream,
    server: &mut TcpStream,
    max_client_message: usize,
    initial: &[u8],
    mut signal: Option<&mut crate::migrate::MoveSignal>,
) -> SessionOutcome {
    let state = SessionState::new();
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut client_walker = MessageWalker::new();
    let mut server_walker = MessageWalker::new();

    let end = {
        let c2s = client_to_server(
            &mut client_read,
            &mut server_write,
            &mut client_walker,
            &state,
            max_client_message,
            initial,
        );
        let s2c = server_to_client(
            &mut server_read,
            &mut client_write,
            &mut server_walker,
            &state,
        );
        tokio::pin!(c2s, s2c);
        let end = select_with_signal(&mut c2s, &mut s2c, &state, &mut signal).await;
        if end == SessionEnd::ClientTerminated && state.pending.load(Relaxed) > 0 {
            // The client sent Terminate right behind queries (it may not read the answers,
            // but PostgreSQL would have sent them): deliver them, briefly, then end.
            state.draining.store(true, Relaxed);
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut s2c).await {
                Ok(SessionEnd::ClientTerminated) | Err(_) => SessionEnd::ClientTerminated,
                Ok(other) => other,
            }
        } else {
            end
        }
    };
    let server_clean = state.server_clean(&end, &client_walker, &server_walker);
    SessionOutcome { end, server_clean }
}

/// Runs both directions until one ends, or until a stop asked by `signal` finds the session
/// where it may stop (directions that are behind check again after each chunk).
pub(crate) async fn select_with_signal<A, B>(
    c2s: &mut Pin<&mut A>,
    s2c: &mut Pin<&mut B>,
    state: &SessionState,
    signal: &mut Option<&mut crate::migrate::MoveSignal>,
) -> SessionEnd
where
    A: std::future::Future<Output = SessionEnd>,
    B: std::future::Future<Output = SessionEnd>,
{
    loop {
        let stop = async {
            match signal.as_deref_mut() {
                Some(s) => s.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            end = c2s.as_mut() => return end,
            end = s2c.as_mut() => return end,
            kind = stop => {
                if let Some(end) = state.request_stop(kind) {
                    return end;
                }
            }
        }
    }
}

/// Which side of a forwarding step failed.
enum Failure {
    Read,
    Write,
    Invalid(String),
}

/// One read from `src` into a stack buffer, inspected by `inspect` (which returns how many
/// bytes to forward and whether to stop after them), then written to `dst` without
/// blocking; whatever the socket does not take goes to `backlog`.
async fn read_and_forward<F>(
    src: &mut ReadHalf<'_>,
    dst: &WriteHalf<'_>,
    backlog: &mut Vec<u8>,
    mut inspect: F,
) -> Result<Option<bool>, Failure>
where
    F: FnMut(&[u8]) -> Result<(usize, bool), String>,
{
    poll_fn(|cx| {
        let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *src).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(Failure::Read)),
            Poll::Ready(Ok(())) => {
                let data = buf.filled();
                if data.is_empty() {
                    return Poll::Ready(Ok(None));
                }
                let (forward, stop) = match inspect(data) {
                    Ok(v) => v,
                    Err(e) => return Poll::Ready(Err(Failure::Invalid(e))),
                };
                let data = &data[..forward];
                if !data.is_empty() {
                    let written = if backlog.is_empty() {
                        match dst.try_write(data) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                            Err(_) => return Poll::Ready(Err(Failure::Write)),
                        }
                    } else {
                        0
                    };
                    backlog.extend_from_slice(&data[written..]);
                }
                Poll::Ready(Ok(Some(stop)))
            }
        }
    })
    .await
}

async fn flush_backlog(dst: &mut WriteHalf<'_>, backlog: &mut Vec<u8>) -> io::Result<()> {
    if !backlog.is_empty() {
        dst.write_all(backlog).await?;
        backlog.clear();
        if backlog.capacity() > KEEP_BACKLOG {
            *backlog = Vec::new();
        }
    }
    Ok(())
}

/// Walks client bytes: counts replies owed, notes extended-protocol state, and stops before
/// Terminate or at an oversized message. Returns how many bytes to forward and whether the
/// session ends after them.
pub(crate) fn inspect_client(
    walker: &mut MessageWalker,
    state: &SessionState,
    max_message: usize,
    verdict: &mut ClientVerdict,
    data: &[u8],
) -> Result<(usize, bool), String> {
    let hot = hot();
    count_client_bytes(data.len());
    let end = walker
        .walk(data, |event| match event {
            Event::Start { tag: b'X', .. } => {
                *verdict = ClientVerdict::Terminate;
                ControlFlow::Break(())
            }
            Event::Start { tag: b'S', .. } if state.copy_in.load(Relaxed) => {
                // PostgreSQL ignores Sync while it receives COPY data: no reply comes.
                ControlFlow::Continue(())
            }
            Event::Start {
                tag: tag @ (b'd' | b'c' | b'f'),
                ..
            } => {
                if !state.copy_in.swap(true, Relaxed) {
                    // The first COPY message after the Execute that started the COPY: the
                    // Syncs the client sent in between (libpq and tokio-postgres send one right
                    // behind the Execute) were ignored by the server.
                    let ignored = state.syncs_since_request.swap(0, Relaxed);
                    let _ = state
                        .pending
                        .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(ignored)));
                }
                if tag != b'd' {
                    state.copy_in.store(false, Relaxed);
                }
                ControlFlow::Continue(())
            }
            Event::Start { tag, .. } => {
                if matches!(tag, b'E' | b'Q' | b'F') {
                    state.syncs_since_request.store(0, Relaxed);
                }
                if expects_ready_for_query(tag) {
                    state.clock.request_sent(hot);
                    state.pending.fetch_add(1, Relaxed);
                    if tag == b'S' {
                        state.unsynced.store(false, Relaxed);
                        state.syncs_since_request.fetch_add(1, Relaxed);
                    }
                } else if opens_extended_sequence(tag) {
                    state.clock.request_sent(hot);
                    state.unsynced.store(true, Relaxed);
                }
                ControlFlow::Continue(())
            }
            Event::Length { len, .. } if len > max_message => {
                *verdict = ClientVerdict::TooLarge(len);
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        })
        .map_err(|e| e.to_string())?;
    Ok(match end {
        WalkEnd::Complete => (data.len(), false),
        // Forward what precedes Terminate; nothing of an oversized message beyond what
        // already went (the session ends anyway).
        WalkEnd::Stopped(at) => (at, true),
    })
}

pub(crate) enum ClientVerdict {
    Continue,
    Terminate,
    TooLarge(usize),
}

async fn client_to_server(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    walker: &mut MessageWalker,
    state: &SessionState,
    max_message: usize,
    initial: &[u8],
) -> SessionEnd {
    let mut backlog = Vec::new();
    let mut verdict = ClientVerdict::Continue;
    if !initial.is_empty() {
        // Bytes the client sent right behind its startup packet (pipelining clients).
        match inspect_client(walker, state, max_message, &mut verdict, initial) {
            Ok((forward, stop)) => {
                if dst.write_all(&initial[..forward]).await.is_err() {
                    return SessionEnd::ServerGone;
                }
                if stop {
                    return match verdict {
                        ClientVerdict::TooLarge(len) => SessionEnd::ClientMessageTooLarge(len),
                        _ => SessionEnd::ClientTerminated,
                    };
                }
            }
            Err(e) => return SessionEnd::ClientProtocol(e),
        }
    }
    loop {
        let read = read_and_forward(src, dst, &mut backlog, |data| {
            inspect_client(walker, state, max_message, &mut verdict, data)
        })
        .await;
        state.client_partial.store(!walker.at_boundary(), Relaxed);
        match read {
            Ok(Some(stop)) => {
                // Partial writes wait here, before the next read: backpressure.
                if !backlog.is_empty() {
                    state.c2s_writing.store(true, Relaxed);
                    let flushed = flush_backlog(dst, &mut backlog).await;
                    state.c2s_writing.store(false, Relaxed);
                    if flushed.is_err() {
                        return SessionEnd::ServerGone;
                    }
                }
                if stop {
                    return match verdict {
                        ClientVerdict::TooLarge(len) => SessionEnd::ClientMessageTooLarge(len),
                        _ => SessionEnd::ClientTerminated,
                    };
                }
            }
            Ok(None) | Err(Failure::Read) => return SessionEnd::ClientGone,
            Err(Failure::Write) => return SessionEnd::ServerGone,
            Err(Failure::Invalid(e)) => return SessionEnd::ClientProtocol(e),
        }
    }
}

/// Walks server bytes: records each ReadyForQuery's status, settles the replies owed and
/// times queries and transactions.
pub(crate) fn inspect_server(
    walker: &mut MessageWalker,
    state: &SessionState,
    hot: &HotStats,
    data: &[u8],
) -> Result<(), String> {
    count_server_bytes(data.len());
    walker
        .walk(data, |event| {
            if let Event::ReadyForQuery(status) = event {
                state.status.store(status, Relaxed);
                // Saturating: a server may send ReadyForQuery we did not count
                // (never in practice); do not wrap.
                let before = state
                    .pending
                    .fetch_update(Relaxed, Relaxed, |p| p.checked_sub(1))
                    .unwrap_or(0);
                state.clock.ready_for_query(hot, status, before > 1);
            }
            ControlFlow::Continue(())
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn server_to_client(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    walker: &mut MessageWalker,
    state: &SessionState,
) -> SessionEnd {
    let mut backlog = Vec::new();
    let hot = hot();
    loop {
        let read = read_and_forward(src, dst, &mut backlog, |data| {
            inspect_server(walker, state, hot, data)?;
            Ok((data.len(), false))
        })
        .await;
        state.server_partial.store(!walker.at_boundary(), Relaxed);
        match read {
            Ok(Some(_)) => {
                if !backlog.is_empty() {
                    state.s2c_writing.store(true, Relaxed);
                    let flushed = flush_backlog(dst, &mut backlog).await;
                    state.s2c_writing.store(false, Relaxed);
                    if flushed.is_err() {
                        return SessionEnd::ClientGone;
                    }
                }
                if state.draining.load(Relaxed)
                    && state.pending.load(Relaxed) == 0
                    && walker.at_boundary()
                {
                    return SessionEnd::ClientTerminated;
                }
                if let Some(end) = state.stop_after_chunk() {
                    return end;
                }
            }
            Ok(None) | Err(Failure::Read) | Err(Failure::Invalid(_)) => {
                return SessionEnd::ServerGone;
            }
            Err(Failure::Write) => return SessionEnd::ClientGone,
        }
    }
}
