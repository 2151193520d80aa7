//! The forwarding loop: bytes between a client and its server, with message boundaries
//! tracked so the session knows when the server is at a safe point (ReadyForQuery 'I',
//! nothing in flight) and may be reused.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::custom::SessionCustom;
use crate::migrate::MoveSignal;
use crate::park::IdleWait;
use crate::protocol::framing::{Event, MessageWalker, WalkEnd};
use crate::protocol::frontend::{expects_ready_for_query, opens_extended_sequence};
use crate::ready::{ReadHint, ReadWatch};
use crate::stats::{HotStats, hot};

/// Size of the on-stack read buffer; nothing is kept per idle session.
const CHUNK: usize = 16 * 1024;

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
    /// Silent on both sides for `--client-park-after-ms` at a safe point (and no move
    /// wanted): the session may wait out of the runtime.
    Park,
    /// At a safe point after the transactions a session runs before it enters the session
    /// lane (see [`run_session`]'s `lane_after`).
    Lane,
}

/// What both directions of one session know about the server's state. Only the session's
/// own task touches it (relaxed atomics, never contended).
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
    /// 0: run, else a [`crate::migrate::StopKind::level`].
    pub(crate) stop: AtomicU8,
    /// A message from the client (or to it, from the server) is only partly forwarded.
    pub(crate) client_partial: AtomicBool,
    pub(crate) server_partial: AtomicBool,
    /// The server answered CopyInResponse and the client has not sent CopyDone or CopyFail
    /// since: PostgreSQL ignores the client's Syncs meanwhile.
    pub(crate) copy_in: AtomicBool,
    /// Syncs sent since the last Execute/Query and before a CopyDone or CopyFail: ignored by
    /// the server if its answer to that request turns out to be CopyInResponse.
    pub(crate) syncs_since_request: AtomicUsize,
    /// The client sent CopyDone or CopyFail since its last Execute/Query.
    pub(crate) copy_end_sent: AtomicBool,
    /// A direction is writing what it read: stopping must not drop it mid-write.
    pub(crate) c2s_writing: AtomicBool,
    pub(crate) s2c_writing: AtomicBool,
}

impl SessionState {
    /// The server answered CopyInResponse: the Syncs the client sent after its request and
    /// before any CopyDone or CopyFail (libpq and tokio-postgres send one right behind the
    /// Execute) are ignored by the server, and so are the client's Syncs until the COPY ends
    /// (unless the client already ended it).
    fn copy_started(&self) {
        let ignored = self.syncs_since_request.swap(0, Relaxed);
        let _ = self
            .pending
            .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(ignored)));
        if !self.copy_end_sent.load(Relaxed) {
            self.copy_in.store(true, Relaxed);
        }
    }

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
            1 => self.at_safe_point().then_some(SessionEnd::SafePoint),
            level => crate::migrate::deadline_reached(
                level,
                self.pending.load(Relaxed) > 0,
                self.server_partial.load(Relaxed) || self.s2c_writing.load(Relaxed),
            )
            .then_some(SessionEnd::Deadline),
        }
    }

    /// A stop was asked for (`kind`): the end to report now, if the session is already
    /// where it may stop.
    pub(crate) fn request_stop(&self, kind: crate::migrate::StopKind) -> Option<SessionEnd> {
        self.stop.fetch_max(kind.level(), Relaxed);
        self.stop_after_chunk()
    }

    /// Whether the server can be reset and reused after the session ended with `end`.
    pub(crate) fn server_clean(
        &self,
        end: &SessionEnd,
        client_walker: &MessageWalker,
        server_walker: &MessageWalker,
    ) -> bool {
        if matches!(
            end,
            SessionEnd::SafePoint | SessionEnd::Park | SessionEnd::Lane
        ) {
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
            hot.query_seconds.record_ns(now.saturating_sub(started));
        }
        // Pipelined requests: the next one is being answered from now on.
        self.request_start
            .store(if still_pending { now } else { 0 }, Relaxed);
        if status == b'I' {
            let tx = self.transaction_start.swap(0, Relaxed);
            if tx != 0 {
                hot.transaction_seconds.record_ns(now.saturating_sub(tx));
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
/// (sent right behind the startup packet). Plaintext and TLS streams alike: the returned
/// future owns no read buffer (each read goes through a buffer on the stack) and is a few
/// hundred bytes, which is what an idle session costs besides its sockets. With `lane_after`
/// above 0 the loop ends with [`SessionEnd::Lane`] at the `lane_after`-th safe point it
/// reaches after a server reply (about one per transaction).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_session<'a, C, S>(
    client: &'a mut C,
    server: &'a mut S,
    max_client_message: usize,
    initial: &[u8],
    resume: Option<Box<Carry>>,
    lane_after: u32,
    signal: Option<&'a mut MoveSignal>,
    idle: Option<&'a mut IdleWait>,
    custom: &'a mut Option<Box<SessionCustom>>,
) -> Pump<'a, C, S>
where
    C: AsyncRead + AsyncWrite + ReadHint + Unpin + Send,
    S: AsyncRead + AsyncWrite + ReadHint + Unpin + Send,
{
    let mut pump = Pump {
        client,
        server,
        carry: resume.map_or_else(Carry::new, |c| *c),
        max_client_message,
        stop: signal,
        idle,
        custom,
        drain: None,
        client_watch: ReadWatch::default(),
        server_watch: ReadWatch::default(),
        lane_after,
    };
    if !initial.is_empty() {
        // Bytes the client sent right behind its startup packet (pipelining clients).
        match inspect_client(
            &mut pump.carry.client_walker,
            &pump.carry.state,
            max_client_message,
            &mut pump.carry.verdict,
            pump.stop.is_some().then_some(&mut *pump.custom),
            initial,
        ) {
            Ok((forward, stop)) => {
                pump.carry
                    .to_server
                    .bytes
                    .extend_from_slice(&initial[..forward]);
                pump.carry.to_server.flush = true;
                pump.carry.client_done = stop;
                pump.carry.state.c2s_writing.store(true, Relaxed);
                pump.carry
                    .state
                    .client_partial
                    .store(!pump.carry.client_walker.at_boundary(), Relaxed);
            }
            Err(e) => pump.carry.early_end = Some(SessionEnd::ClientProtocol(e)),
        }
    }
    pump
}

/// Bytes read from one side that the other side's socket has not taken yet.
#[derive(Default)]
pub(crate) struct Outbox {
    pub(crate) bytes: Vec<u8>,
    /// Written but not flushed (TLS keeps records until flushed).
    pub(crate) flush: bool,
}

/// Everything a session's forwarding knows between two reads, apart from its sockets: what
/// the session lane ([`crate::lane`]) forwards with, and hands to a [`Pump`] when it gives a
/// session back to the runtime, which then goes on exactly where the lane stopped.
pub(crate) struct Carry {
    pub(crate) state: SessionState,
    pub(crate) client_walker: MessageWalker,
    pub(crate) server_walker: MessageWalker,
    pub(crate) to_server: Outbox,
    pub(crate) to_client: Outbox,
    pub(crate) verdict: ClientVerdict,
    /// The client sent Terminate (or an oversized message): nothing more is read from it.
    pub(crate) client_done: bool,
    /// How the session ended already (the lane saw it end).
    pub(crate) early_end: Option<SessionEnd>,
}

impl Carry {
    /// A session at a safe point: the server idle outside a transaction, nothing in flight.
    pub(crate) fn new() -> Self {
        Carry {
            state: SessionState::new(),
            client_walker: MessageWalker::new(),
            server_walker: MessageWalker::new(),
            to_server: Outbox::default(),
            to_client: Outbox::default(),
            verdict: ClientVerdict::Continue,
            client_done: false,
            early_end: None,
        }
    }
}

/// The forwarding loop of one session, as a hand-written future: both directions, the move
/// signal and the drain after Terminate are polled from one place, and all the state of a
/// session between messages is these fields.
pub struct Pump<'a, C, S> {
    client: &'a mut C,
    server: &'a mut S,
    /// Where forwarding stands (what the session lane hands over when it gives a session
    /// back).
    carry: Carry,
    max_client_message: usize,
    stop: Option<&'a mut MoveSignal>,
    /// The session's place among the idle ones, when it may be parked.
    idle: Option<&'a mut IdleWait>,
    /// Custom setting names the client's statements mentioned (kept by the session), read
    /// only when the session may move.
    custom: &'a mut Option<Box<SessionCustom>>,
    /// After Terminate, replies still owed are delivered until this fires.
    drain: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether each side's read waits registered: a wake by the other side skips it.
    client_watch: ReadWatch,
    server_watch: ReadWatch,
    /// Safe points left before the session goes to the lane (0: it does not).
    lane_after: u32,
}

/// Which side of a forwarding step failed.
enum Failure {
    Read,
    Write,
    Invalid(String),
}

/// Writes `buf` to `dst` from `*written` on until all of it is written or the socket is
/// full (`*written` keeps the progress across polls). No flush.
pub(crate) fn poll_write_from<W: AsyncWrite + Unpin>(
    dst: &mut W,
    cx: &mut Context<'_>,
    buf: &[u8],
    written: &mut usize,
) -> Poll<io::Result<()>> {
    while *written < buf.len() {
        match std::task::ready!(Pin::new(&mut *dst).poll_write(cx, &buf[*written..])) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => *written += n,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Writes `out` to `dst` until it is empty and flushed, or the socket is full.
fn poll_deliver<W: AsyncWrite + Unpin>(
    dst: &mut W,
    out: &mut Outbox,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let mut written = 0;
    let sent = poll_write_from(dst, cx, &out.bytes, &mut written);
    out.bytes.drain(..written);
    std::task::ready!(sent)?;
    // Delivered: the backlog's allocation goes too, so a session that once had a slow
    // reader does not keep it while idle (no allocation at all when none was needed).
    if out.bytes.capacity() > 0 {
        out.bytes = Vec::new();
    }
    if out.flush {
        std::task::ready!(Pin::new(&mut *dst).poll_flush(cx))?;
        out.flush = false;
    }
    Poll::Ready(Ok(()))
}

/// One read from `src` through a stack buffer, inspected by `inspect` (how many bytes to
/// forward, and whether to stop after them), then written to `dst` as far as it takes them;
/// the rest waits in `out`. Ready(None): end of stream.
fn poll_relay<R, W, F>(
    src: &mut R,
    dst: &mut W,
    out: &mut Outbox,
    cx: &mut Context<'_>,
    inspect: F,
) -> Poll<Result<Option<bool>, Failure>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: FnOnce(&[u8]) -> Result<(usize, bool), String>,
{
    let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
    let mut buf = ReadBuf::uninit(&mut chunk);
    match Pin::new(&mut *src).poll_read(cx, &mut buf) {
        Poll::Pending => return Poll::Pending,
        Poll::Ready(Err(_)) => return Poll::Ready(Err(Failure::Read)),
        Poll::Ready(Ok(())) => {}
    }
    let data = buf.filled();
    if data.is_empty() {
        return Poll::Ready(Ok(None));
    }
    let (forward, stop) = inspect(data).map_err(Failure::Invalid)?;
    let data = &data[..forward];
    if !data.is_empty() {
        out.flush = true;
        let written = match Pin::new(&mut *dst).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(Failure::Write)),
            // Registered for writability; the rest waits in `out`.
            Poll::Pending => 0,
        };
        out.bytes.extend_from_slice(&data[written..]);
    }
    Poll::Ready(Ok(Some(stop)))
}

impl<C, S> Pump<'_, C, S>
where
    C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    S: AsyncRead + AsyncWrite + ReadHint + Unpin,
{
    /// Bytes came from either side: the session is not idle.
    fn spoke(&mut self) {
        if let Some(idle) = self.idle.as_deref_mut() {
            idle.spoke();
        }
    }

    /// Both sides wait: whether the session has been silent long enough to park. Only at a
    /// safe point (the server idle outside a transaction, nothing in flight or unwritten),
    /// and not while a rotation wants the session moved (the move signal's state would not
    /// survive the parking).
    fn poll_park(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(idle) = self.idle.as_deref_mut() else {
            return false;
        };
        !self.carry.client_done
            && self.carry.to_server.bytes.is_empty()
            && self.carry.to_client.bytes.is_empty()
            && self.carry.state.at_safe_point()
            && self.stop.as_ref().is_none_or(|s| !s.wanted())
            && idle.poll_park(cx)
    }

    /// Whether the session could leave for the lane now: at a safe point, with nothing
    /// waiting to be written and the client not ending.
    fn at_lane_point(&self) -> bool {
        !self.carry.client_done
            && self.drain.is_none()
            && self.carry.to_server.bytes.is_empty()
            && self.carry.to_client.bytes.is_empty()
            && self.carry.state.at_safe_point()
    }

    fn client_end(&self) -> SessionEnd {
        match self.carry.verdict {
            ClientVerdict::TooLarge(len) => SessionEnd::ClientMessageTooLarge(len),
            _ => SessionEnd::ClientTerminated,
        }
    }

    /// Client to server until the client has nothing more or the server takes no more.
    /// Partial writes are finished before the next read: backpressure.
    fn poll_client(&mut self, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        self.client_watch.disarm();
        loop {
            if !self.carry.to_server.bytes.is_empty() || self.carry.to_server.flush {
                self.carry.state.c2s_writing.store(true, Relaxed);
                match poll_deliver(&mut *self.server, &mut self.carry.to_server, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(SessionEnd::ServerGone),
                    Poll::Ready(Ok(())) => self.carry.state.c2s_writing.store(false, Relaxed),
                }
            }
            if self.carry.client_done {
                return Poll::Ready(self.client_end());
            }
            let (walker, state, verdict, max, custom) = (
                &mut self.carry.client_walker,
                &self.carry.state,
                &mut self.carry.verdict,
                self.max_client_message,
                self.stop.is_some().then_some(&mut *self.custom),
            );
            let read = poll_relay(
                &mut *self.client,
                &mut *self.server,
                &mut self.carry.to_server,
                cx,
                |data| inspect_client(walker, state, max, verdict, custom, data),
            );
            match read {
                Poll::Pending => {
                    self.client_watch.polled(&read, cx);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(Some(stop))) => {
                    self.carry
                        .state
                        .client_partial
                        .store(!self.carry.client_walker.at_boundary(), Relaxed);
                    self.carry.client_done = stop;
                    self.spoke();
                }
                Poll::Ready(Ok(None) | Err(Failure::Read)) => {
                    return Poll::Ready(SessionEnd::ClientGone);
                }
                Poll::Ready(Err(Failure::Write)) => return Poll::Ready(SessionEnd::ServerGone),
                Poll::Ready(Err(Failure::Invalid(e))) => {
                    self.carry
                        .state
                        .client_partial
                        .store(!self.carry.client_walker.at_boundary(), Relaxed);
                    return Poll::Ready(SessionEnd::ClientProtocol(e));
                }
            }
        }
    }

    /// Server to client, with the end checks after each chunk delivered.
    fn poll_server(&mut self, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        let hot = hot();
        self.server_watch.disarm();
        loop {
            if !self.carry.to_client.bytes.is_empty() || self.carry.to_client.flush {
                self.carry.state.s2c_writing.store(true, Relaxed);
                match poll_deliver(&mut *self.client, &mut self.carry.to_client, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(SessionEnd::ClientGone),
                    Poll::Ready(Ok(())) => self.carry.state.s2c_writing.store(false, Relaxed),
                }
            }
            if self.carry.state.draining.load(Relaxed)
                && self.carry.state.pending.load(Relaxed) == 0
                && self.carry.server_walker.at_boundary()
            {
                return Poll::Ready(SessionEnd::ClientTerminated);
            }
            if let Some(end) = self.carry.state.stop_after_chunk() {
                return Poll::Ready(end);
            }
            let (walker, state) = (&mut self.carry.server_walker, &self.carry.state);
            let read = poll_relay(
                &mut *self.server,
                &mut *self.client,
                &mut self.carry.to_client,
                cx,
                |data| {
                    inspect_server(walker, state, hot, data)?;
                    Ok((data.len(), false))
                },
            );
            match read {
                Poll::Pending => {
                    self.server_watch.polled(&read, cx);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(Some(_))) => {
                    self.carry
                        .state
                        .server_partial
                        .store(!self.carry.server_walker.at_boundary(), Relaxed);
                    self.spoke();
                    if self.lane_after > 0 && self.at_lane_point() {
                        self.lane_after -= 1;
                        if self.lane_after == 0 {
                            return Poll::Ready(SessionEnd::Lane);
                        }
                    }
                }
                Poll::Ready(Ok(None) | Err(Failure::Read | Failure::Invalid(_))) => {
                    return Poll::Ready(SessionEnd::ServerGone);
                }
                Poll::Ready(Err(Failure::Write)) => return Poll::Ready(SessionEnd::ClientGone),
            }
        }
    }

    /// The move signal: a stop it asks for ends the session now if the session is where it
    /// may stop; otherwise the directions check after each chunk.
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        while let Some(signal) = self.stop.as_mut() {
            let kind = std::task::ready!(signal.poll_stop(cx));
            if let Some(end) = self.carry.state.request_stop(kind) {
                return Poll::Ready(end);
            }
        }
        Poll::Pending
    }

    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        if let Some(end) = self.carry.early_end.take() {
            return Poll::Ready(end);
        }
        if self.drain.is_some() {
            if let Poll::Ready(end) = self.poll_server(cx) {
                return Poll::Ready(end);
            }
            return match self.drain.as_mut() {
                Some(drain) => drain
                    .as_mut()
                    .poll(cx)
                    .map(|()| SessionEnd::ClientTerminated),
                None => Poll::Pending,
            };
        }
        // A side whose read waits registered, with nothing new on its socket, has nothing to
        // do: its writes are done (the read comes after them) and a stop is looked at by the
        // server side only, which is then always polled.
        let client = if self.client_watch.waiting(&*self.client, cx) {
            Poll::Pending
        } else {
            self.poll_client(cx)
        };
        match client {
            Poll::Ready(SessionEnd::ClientTerminated)
                if self.carry.state.pending.load(Relaxed) > 0 =>
            {
                // The client sent Terminate right behind queries (it may not read the
                // answers, but PostgreSQL would have sent them): deliver them, briefly.
                self.carry.state.draining.store(true, Relaxed);
                self.drain = Some(Box::pin(tokio::time::sleep(DRAIN_TIMEOUT)));
                return self.poll_end(cx);
            }
            Poll::Ready(end) => return Poll::Ready(end),
            Poll::Pending => {}
        }
        let skip_server = self.carry.state.stop.load(Relaxed) == 0
            && self.server_watch.waiting(&*self.server, cx);
        if !skip_server && let Poll::Ready(end) = self.poll_server(cx) {
            return Poll::Ready(end);
        }
        if let Poll::Ready(end) = self.poll_stop(cx) {
            return Poll::Ready(end);
        }
        if self.poll_park(cx) {
            return Poll::Ready(SessionEnd::Park);
        }
        Poll::Pending
    }
}

impl<C, S> Future for Pump<'_, C, S>
where
    C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    S: AsyncRead + AsyncWrite + ReadHint + Unpin,
{
    type Output = SessionOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionOutcome> {
        let this = self.get_mut();
        let end = std::task::ready!(this.poll_end(cx));
        let Carry {
            state,
            client_walker,
            server_walker,
            ..
        } = &this.carry;
        let server_clean = state.server_clean(&end, client_walker, server_walker);
        Poll::Ready(SessionOutcome { end, server_clean })
    }
}

/// Walks client bytes: counts replies owed, notes extended-protocol state, and stops before
/// Terminate or at an oversized message. Returns how many bytes to forward and whether the
/// session ends after them.
pub(crate) fn inspect_client(
    walker: &mut MessageWalker,
    state: &SessionState,
    max_message: usize,
    verdict: &mut ClientVerdict,
    mut custom: Option<&mut Option<Box<SessionCustom>>>,
    data: &[u8],
) -> Result<(usize, bool), String> {
    let hot = hot();
    count_client_bytes(data.len());
    if let Some(custom) = custom.as_deref_mut() {
        SessionCustom::continue_with(custom, data);
    }
    let end = walker
        .walk(data, |event| match event {
            Event::Start { tag: b'X', .. } => {
                *verdict = ClientVerdict::Terminate;
                ControlFlow::Break(())
            }
            Event::Start {
                tag: b'S' | b'H' | b'd',
                ..
            } if state.copy_in.load(Relaxed) => {
                // PostgreSQL ignores Sync and Flush while it receives COPY data: no reply.
                ControlFlow::Continue(())
            }
            Event::Start {
                tag: tag @ (b'd' | b'c' | b'f'),
                ..
            } => {
                // Whether a COPY is under way, the server's CopyInResponse says (see
                // `inspect_server`); outside one PostgreSQL ignores these three.
                if tag != b'd' && !state.copy_in.swap(false, Relaxed) {
                    state.copy_end_sent.store(true, Relaxed);
                }
                ControlFlow::Continue(())
            }
            Event::Start { .. } if state.copy_in.load(Relaxed) => {
                // Anything else fails the COPY, and the server takes the message as the cause
                // of that error: no reply of its own.
                state.copy_in.store(false, Relaxed);
                ControlFlow::Continue(())
            }
            Event::Start { tag, .. } => {
                if matches!(tag, b'E' | b'Q' | b'F') {
                    state.syncs_since_request.store(0, Relaxed);
                    state.copy_end_sent.store(false, Relaxed);
                }
                if expects_ready_for_query(tag) {
                    state.clock.request_sent(hot);
                    state.pending.fetch_add(1, Relaxed);
                    if tag == b'S' {
                        state.unsynced.store(false, Relaxed);
                        if !state.copy_end_sent.load(Relaxed) {
                            state.syncs_since_request.fetch_add(1, Relaxed);
                        }
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
            Event::Length {
                tag: tag @ (b'Q' | b'P'),
                len,
                body_at,
            } => {
                // Custom settings a move must carry (PostgreSQL cannot list them).
                if let Some(custom) = custom.as_deref_mut() {
                    let body_len = len - 4;
                    let available = &data[body_at..data.len().min(body_at + body_len)];
                    SessionCustom::message(custom, tag, body_len, available);
                }
                ControlFlow::Continue(())
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
            match event {
                Event::ReadyForQuery(status) => {
                    state.status.store(status, Relaxed);
                    // Saturating: a server may send ReadyForQuery we did not count
                    // (never in practice); do not wrap.
                    let before = state
                        .pending
                        .fetch_update(Relaxed, Relaxed, |p| p.checked_sub(1))
                        .unwrap_or(0);
                    state.clock.ready_for_query(hot, status, before > 1);
                }
                Event::Start { tag: b'G', .. } => state.copy_started(),
                _ => {}
            }
            ControlFlow::Continue(())
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}
