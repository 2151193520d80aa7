//! Transaction pooling: a client holds a server connection for one transaction at a time.
//!
//! Between transactions the client's session lives in dbproxy ([`ClientSession`]): its named
//! prepared statements (protocol Parse), its SQL prepared statements, its session settings and
//! the parameters it has been told. Protocol statements are created on servers under a name
//! derived from their text and parameter types (`dbproxy_<128-bit hash>`), so clients that
//! prepare the same statement share it and two clients' `s1` never collide; a Bind or Describe
//! on a server that lacks the statement is preceded by a Parse dbproxy injects (its
//! ParseComplete is swallowed), a Parse the server already has is answered by dbproxy, and a
//! Close of a statement is answered by dbproxy while the server keeps it for others (at most
//! `--max-prepared-statements` per server, least recently used closed first). Settings and SQL
//! prepared statements are learned from the server after a transaction that may have changed
//! them (see [`crate::sql::may_touch_session_state`]) and re-applied, in the same round trip,
//! on whichever server serves the client's next transaction. State that cannot move (LISTEN,
//! temporary objects, WITH HOLD cursors, session advisory locks) pins the client to its
//! server until it is gone.
//!
//! The forwarding loop here parses whole client messages and server message headers; the
//! responses dbproxy owes or swallows are ordered by a queue of what each forwarded message
//! will be answered with.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::migrate::MoveSignal;
use crate::protocol::backend;
use crate::proxy::{DRAIN_TIMEOUT, TransactionClock};
use crate::ready::{ReadHint, ReadWatch};

use crate::sql::may_touch_session_state;
use crate::stats::hot;

/// What transaction pooling left on a server connection.
#[derive(Debug, Default)]
pub struct ServerSession {
    /// Protocol statements created under dbproxy's names, by content key, with last use.
    pub prepared: HashMap<[u8; 16], u64>,
    /// Session settings as last applied or observed (`pg_settings.source = 'session'`).
    pub settings: Vec<(String, String)>,
    /// SQL prepared statements: name and PREPARE statement.
    pub sql_prepared: Vec<(String, String)>,
    tick: u64,
    /// Custom settings (`app.tenant_id`) the statements of this connection's last rounds may
    /// have set or reset, by name, for the next snapshot. When one could not be named
    /// (`set_config($1, ...)`), the next client gets the connection after a `RESET ALL`.
    pub custom: crate::custom::CustomNames,
    /// The client this connection last served, under `--reset-settings-between-clients` (0:
    /// none yet).
    pub owner: u64,
    /// The client (registry id) whose Parse made the connection's unnamed statement, 0 when
    /// none did since a simple query destroyed it: another client's Bind or Describe of the
    /// unnamed statement must not reach it.
    unnamed_owner: u64,
    /// The rounds' buffers, kept with the connection while it is in use: allocating them per
    /// transaction was a measurable part of its cost. The pool's janitor drops them once the
    /// connection has been idle for a while ([`ServerSession::drop_idle_buffers`]).
    bufs: RoundBuffers,
}

impl ServerSession {
    /// Drops the round buffers (about 9 kB once a round has read a reply) of a connection
    /// idle in the pool; the next round allocates them again. Returns the bytes they held.
    pub fn drop_idle_buffers(&mut self) -> usize {
        let held = self.bufs.from_server.capacity()
            + self.bufs.to_client.capacity()
            + self.bufs.to_server.capacity()
            + self.bufs.queue.capacity() * std::mem::size_of::<Expect>();
        self.bufs = RoundBuffers::default();
        held
    }
}

/// Buffers a round works in; empty between rounds (a round that leaves bytes in them ends
/// unclean, and its connection is closed).
#[derive(Debug, Default)]
struct RoundBuffers {
    queue: VecDeque<Expect>,
    from_server: BytesMut,
    to_client: BytesMut,
    to_server: BytesMut,
}

impl RoundBuffers {
    /// Empties the buffers, dropping any that a large message grew.
    fn recycle(&mut self) {
        self.queue.clear();
        for buf in [
            &mut self.from_server,
            &mut self.to_client,
            &mut self.to_server,
        ] {
            buf.clear();
            if buf.capacity() > STREAM_ABOVE {
                *buf = BytesMut::new();
            }
        }
    }
}

/// A client's named protocol statement.
#[derive(Debug)]
struct Statement {
    key: [u8; 16],
    /// The name on servers: `dbproxy_` and the key in hex.
    server_name: String,
    /// Parse body after the name: query text, NUL, parameter count and type OIDs.
    rest: Bytes,
    /// Executing it may change session state (see `may_touch_session_state`).
    touches_state: bool,
}

/// A client's session as dbproxy keeps it between transactions. Every idle (and parked)
/// transaction-mode client keeps one, and most hold no named statement, setting or pin: what
/// only some have is boxed, 24 bytes here instead of 136.
#[derive(Debug)]
pub struct ClientSession {
    /// Named statements, settings, SQL prepared statements and pins, once there are any.
    state: Option<Box<SessionState>>,
    /// ParameterStatus values as this client last received them.
    pub seen: crate::server::ParameterStatus,
    /// Transaction status of the last ReadyForQuery.
    pub status: u8,
}

/// What a client's session holds besides its reported parameters.
#[derive(Debug, Default)]
struct SessionState {
    statements: HashMap<Vec<u8>, Arc<Statement>>,
    /// Settings the client's session has (learned from the server after it changed them).
    settings: Vec<(String, String)>,
    /// SQL prepared statements (name, PREPARE statement).
    sql_prepared: Vec<(String, String)>,
    /// Why the client cannot leave its server now.
    pins: Vec<&'static str>,
}

impl SessionState {
    fn is_empty(&self) -> bool {
        self.statements.is_empty()
            && self.settings.is_empty()
            && self.sql_prepared.is_empty()
            && self.pins.is_empty()
    }
}

impl ClientSession {
    pub fn new(seen: crate::server::ParameterStatus) -> Self {
        ClientSession {
            state: None,
            seen,
            status: b'I',
        }
    }

    pub fn statement_count(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.statements.len())
    }

    /// Settings the client's session has (learned from the server after it changed them).
    pub fn settings(&self) -> &[(String, String)] {
        self.state.as_ref().map_or(&[], |s| &s.settings)
    }

    /// SQL prepared statements (name, PREPARE statement).
    pub fn sql_prepared(&self) -> &[(String, String)] {
        self.state.as_ref().map_or(&[], |s| &s.sql_prepared)
    }

    /// Why the client cannot leave its server now.
    pub fn pins(&self) -> &[&'static str] {
        self.state.as_ref().map_or(&[], |s| &s.pins)
    }

    pub fn is_pinned(&self) -> bool {
        !self.pins().is_empty()
    }

    /// Records what the server said the session holds (after a transaction that may have
    /// changed it); the box goes once the session holds nothing.
    pub fn set_learned(
        &mut self,
        pins: Vec<&'static str>,
        settings: Vec<(String, String)>,
        sql_prepared: Vec<(String, String)>,
    ) {
        if self.state.is_none() && pins.is_empty() && settings.is_empty() && sql_prepared.is_empty()
        {
            return;
        }
        let state = self.state.get_or_insert_with(Default::default);
        state.pins = pins;
        state.settings = settings;
        state.sql_prepared = sql_prepared;
        self.drop_if_empty();
    }

    fn statement(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.state.as_ref()?.statements.get(name)
    }

    fn has_statement(&self, name: &[u8]) -> bool {
        self.statement(name).is_some()
    }

    fn add_statement(&mut self, name: Vec<u8>, statement: Arc<Statement>) {
        let state = self.state.get_or_insert_with(Default::default);
        state.statements.insert(name, statement);
    }

    /// Whether the client had a statement of that name.
    fn remove_statement(&mut self, name: &[u8]) -> bool {
        self.take_statement(name).is_some()
    }

    /// Removes and returns the client's statement of that name.
    fn take_statement(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        let removed = self.state.as_mut().and_then(|s| s.statements.remove(name));
        self.drop_if_empty();
        removed
    }

    /// DISCARD ALL or DEALLOCATE ALL: every prepared statement of the session is gone.
    fn clear_prepared(&mut self) {
        if let Some(state) = self.state.as_mut() {
            state.statements.clear();
            state.sql_prepared.clear();
        }
        self.drop_if_empty();
    }

    fn drop_if_empty(&mut self) {
        if self.state.as_ref().is_some_and(|s| s.is_empty()) {
            self.state = None;
        }
    }
}

/// What a forwarded message will be answered with (in order).
#[derive(Debug)]
enum Expect {
    /// ParseComplete; `key` is set when the Parse created a dbproxy-named statement (undone if
    /// the server skips or fails it), `registered` when it is a client's named Parse (the
    /// client's statement is forgotten then too).
    Parse {
        key: Option<[u8; 16]>,
        swallow: bool,
        registered: Option<Registered>,
    },
    Bind,
    Describe,
    /// `blind`: the unnamed statement, parsed in an earlier batch, executed without a Describe
    /// of its portal: nothing in the reply or at hand tells whether a `SELECT 0` made a table.
    Execute {
        blind: bool,
    },
    Close {
        swallow: bool,
    },
    Sync,
    /// Query or FunctionCall: everything up to ReadyForQuery.
    Simple,
    /// No reply of its own: a CopyDone or CopyFail the client sent while a request that may
    /// start a COPY was unanswered. If that request's answer is CopyInResponse, the COPY ends
    /// here, and the Syncs between the two were ignored by the server (see
    /// [`Shared::copy_started`]); otherwise the server ignored it, and it is dropped once at
    /// the head of the queue.
    CopyEnd,
    /// A reply dbproxy gives itself, once everything before it is answered.
    Synthetic(Synthetic),
    /// A client's Parse of a name it already has: the server got a Parse of
    /// [`REFUSED_NAME`] with SQL that cannot parse instead,
    /// which fails there, so the transaction fails as PostgreSQL's would. Its error is
    /// replaced by 42P05 naming the client's statement (25P02 in a failed transaction, which
    /// PostgreSQL reports first).
    Refused(String),
}

/// The statement name of the Parse dbproxy sends for one it refuses; its SQL is a syntax
/// error, so nothing of that name is ever created.
const REFUSED_NAME: &str = "dbproxy_refused";

/// A client's named statement as its Parse registered it: forgotten again if the server skips
/// or fails that Parse (the client may then parse the name anew, as PostgreSQL lets it).
type Registered = Box<(Box<[u8]>, Arc<Statement>)>;

#[derive(Debug)]
enum Synthetic {
    /// A client's Parse of a statement the server already has.
    ParseComplete(Registered),
    /// A client's Close of a named statement, with the statement it removed (put back if the
    /// server skips the Close, behind an error).
    CloseComplete(Option<Registered>),
    /// `DEALLOCATE name` of a protocol statement: CommandComplete and ReadyForQuery.
    Deallocated(Registered),
}

/// Why a transaction round ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RoundEnd {
    /// The server is idle with nothing in flight: it may be released or swapped.
    SafePoint,
    ClientTerminated,
    ClientGone,
    ServerGone,
    ClientMessageTooLarge(usize),
    ClientProtocol(String),
    /// The migration deadline passed; the streams are at a message boundary.
    Deadline,
}

pub struct RoundOutcome {
    pub end: RoundEnd,
    /// Nothing was in flight when the round ended (the server may be reused).
    pub clean: bool,
    /// The round ran statements that may have changed session state: ask the server.
    pub recheck: bool,
}

/// Statements some server has accepted (by content key): a client that prepares one of
/// these while it holds no server is answered by dbproxy (libpq's PQprepare is a blocking
/// Parse+Sync; taking a server for it while other clients of the same thread hold every
/// server in open transactions would deadlock, as pgbench -M prepared shows).
#[derive(Default)]
pub struct KnownStatements {
    keys: Mutex<std::collections::HashSet<[u8; 16]>>,
}

/// Statements remembered as known (beyond this, new ones are not remembered).
const KNOWN_STATEMENTS: usize = 100_000;

impl KnownStatements {
    fn insert(&self, key: [u8; 16]) {
        if let Ok(mut keys) = self.keys.lock()
            && keys.len() < KNOWN_STATEMENTS
        {
            keys.insert(key);
        }
    }

    fn contains(&self, key: &[u8; 16]) -> bool {
        self.keys.lock().map(|k| k.contains(key)).unwrap_or(false)
    }
}

/// When the client, idle and without a server, sent only Parse messages of known statements
/// and Sync (libpq's PQprepare), answers them without a server: the statements join the
/// client's session and are created on whichever server later needs them. Returns the reply,
/// or None (nothing consumed) when a server is needed.
pub fn answer_without_server(
    client: &mut ClientSession,
    cbuf: &mut BytesMut,
    known: &KnownStatements,
) -> Option<BytesMut> {
    // Nearly every request starts otherwise (Query, Bind): ruled out before anything else.
    if cbuf.first() != Some(&b'P') || client.status != b'I' {
        return None;
    }
    let mut at = 0;
    let mut parses = Vec::new();
    let mut synced = false;
    while cbuf.len() >= at + 5 {
        let tag = cbuf[at];
        let len = i32::from_be_bytes([cbuf[at + 1], cbuf[at + 2], cbuf[at + 3], cbuf[at + 4]]);
        if len < 4 || cbuf.len() < at + 1 + len as usize {
            return None;
        }
        let body = &cbuf[at + 5..at + 1 + len as usize];
        match tag {
            b'P' => {
                let name = cstr_bytes(body)?;
                let rest = &body[name.len() + 1..];
                if name.is_empty() || synced || client.has_statement(name) {
                    return None;
                }
                let statement = Statement::new(Bytes::copy_from_slice(rest));
                if !known.contains(&statement.key) {
                    return None;
                }
                parses.push((name.to_vec(), statement));
            }
            b'S' if !parses.is_empty() => synced = true,
            _ => return None,
        }
        at += 1 + len as usize;
    }
    if !synced || at != cbuf.len() {
        return None;
    }
    cbuf.clear();
    let mut out = BytesMut::with_capacity(parses.len() * 5 + 6);
    for (name, statement) in parses {
        client.add_statement(name, Arc::new(statement));
        out.extend_from_slice(&[b'1', 0, 0, 0, 4]);
    }
    backend::ready_for_query(&mut out, b'I');
    Some(out)
}

/// Settings for a round.
pub struct RoundConfig<'a> {
    /// Statements servers have accepted (process-wide).
    pub known: &'a KnownStatements,
    pub max_message: usize,
    pub max_prepared: usize,
    /// End the round at the first safe point (not while pinned).
    pub end_at_safe_point: bool,
    /// The client's registry id.
    pub client_id: u64,
}

struct Shared<'a> {
    queue: VecDeque<Expect>,
    server: &'a mut ServerSession,
    server_params: &'a mut crate::server::ParameterStatus,
    client: &'a mut ClientSession,
    unsynced: bool,
    recheck: bool,
    terminated: bool,
    /// 0: run, else a [`crate::migrate::StopKind::level`].
    stop: u8,
    /// A server message is being passed through in pieces (not at a boundary).
    server_partial: bool,
    /// Somebody is writing (the other side must not be dropped mid-write).
    writing_to_server: bool,
    writing_to_client: bool,
    /// A synthetic reply is at the head of the queue.
    synthetic_ready: bool,
    max_prepared: usize,
    /// The server answered CopyInResponse and the client has not sent CopyDone or CopyFail
    /// since: the server ignores the client's Syncs meanwhile.
    copy_in: bool,
    /// dbproxy answered an extended-protocol message with an error: like PostgreSQL, skip the
    /// client's messages up to its Sync.
    skipping: bool,
    /// dbproxy refused a message itself, as PostgreSQL would have, where the server goes on
    /// with the rest of the batch (a Parse it answers itself, in a failed transaction):
    /// PostgreSQL skips to the Sync after an error, so the server's replies up to the
    /// batch's ReadyForQuery are not passed on (notifications, notices and parameter
    /// changes are).
    swallow_to_sync: bool,
    clock: TransactionClock,
    known: &'a KnownStatements,
    /// A RowDescription or DataRow came since the last completion.
    rows: bool,
    /// A NoData (a Describe of a statement that returns no rows) came since then.
    no_data: bool,
}

/// Messages larger than this are passed through in pieces rather than buffered whole.
const STREAM_ABOVE: usize = 64 * 1024;

/// Runs one round: forwards the client's messages (starting with those in `cbuf`) to `server`
/// and the replies back, until a safe point (when asked to end there), the deadline of
/// `signal`, or either side ending.
#[allow(clippy::too_many_arguments)]
pub async fn run_round<C, S>(
    client: &mut C,
    server_stream: &mut S,
    server: &mut ServerSession,
    server_params: &mut crate::server::ParameterStatus,
    session: &mut ClientSession,
    cbuf: &mut BytesMut,
    config: &RoundConfig<'_>,
    mut signal: Option<&mut MoveSignal>,
    client_watch: &mut ReadWatch,
) -> RoundOutcome
where
    C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    S: AsyncRead + AsyncWrite + ReadHint + Unpin,
{
    let RoundBuffers {
        queue,
        from_server,
        to_client,
        to_server,
    } = std::mem::take(&mut server.bufs);
    let mut round = Round {
        sh: Shared {
            queue,
            server,
            server_params,
            client: session,
            unsynced: false,
            recheck: false,
            terminated: false,
            stop: 0,
            server_partial: false,
            writing_to_server: false,
            writing_to_client: false,
            synthetic_ready: false,
            max_prepared: config.max_prepared,
            copy_in: false,
            skipping: false,
            swallow_to_sync: false,
            clock: TransactionClock::default(),
            known: config.known,
            rows: false,
            no_data: false,
        },
        client,
        server: server_stream,
        cbuf,
        sbuf: from_server,
        to_client,
        to_server,
        config,
        c2s: C2s::Process,
        s2c: S2c::Process,
        written: 0,
        delivered: 0,
        passthrough: 0,
        progressed: false,
        c2s_moved: false,
        wake: false,
        end_at_safe_point: config.end_at_safe_point,
        client_watch,
        server_watch: ReadWatch::default(),
    };
    let mut end = std::future::poll_fn(|cx| round.poll(cx, signal.as_deref_mut())).await;
    if end == RoundEnd::ClientTerminated && !round.sh.queue.is_empty() {
        // Deliver what the server still owes (PostgreSQL would), then end.
        // Boxed: a timer is large, and this is the rare path of every transaction's future.
        let drained = Box::pin(tokio::time::timeout(
            DRAIN_TIMEOUT,
            std::future::poll_fn(|cx| round.poll_s2c(cx)),
        ))
        .await;
        end = match drained {
            Ok(RoundEnd::ClientTerminated) | Err(_) => RoundEnd::ClientTerminated,
            Ok(other) => other,
        };
    }
    let Round {
        sh,
        sbuf,
        to_client,
        to_server,
        ..
    } = round;
    let clean = sh.queue.is_empty()
        && !sh.unsynced
        && !sh.server_partial
        && !sh.writing_to_server
        && !sh.writing_to_client
        && sh.client.status == b'I';
    let mut bufs = RoundBuffers {
        queue: sh.queue,
        from_server: sbuf,
        to_client,
        to_server,
    };
    bufs.recycle();
    sh.server.bufs = bufs;
    RoundOutcome {
        end,
        clean,
        recheck: sh.recheck,
    }
}

/// Where the client-to-server direction of a round is.
enum C2s {
    /// Take the complete messages in the client buffer.
    Process,
    /// Write what they became to the server, then act on the verdict.
    Write(ClientVerdict),
    /// Wait for more bytes from the client.
    Read,
}

/// Where the server-to-client direction of a round is.
#[derive(PartialEq, Eq)]
enum S2c {
    /// Take what the server sent (and the replies dbproxy owes).
    Process,
    /// Write it to the client.
    Write,
    /// Wait for the server (or for the other direction to queue a reply dbproxy gives).
    Read,
}

/// A round as one hand-written future: both directions and the stop signal are polled from
/// one place, so they share state without a lock and wake each other with a flag. (As
/// `select!` over two async blocks with a Notify between them it cost about a third more
/// instructions per transaction.)
struct Round<'a, 'r, C, S> {
    sh: Shared<'a>,
    client: &'r mut C,
    server: &'r mut S,
    cbuf: &'r mut BytesMut,
    sbuf: BytesMut,
    to_client: BytesMut,
    to_server: BytesMut,
    config: &'r RoundConfig<'r>,
    c2s: C2s,
    s2c: S2c,
    /// Bytes of `to_server` written so far.
    written: usize,
    /// Bytes of `to_client` written so far.
    delivered: usize,
    /// Bytes of the current server message still to pass through unbuffered.
    passthrough: usize,
    /// The server side took or produced a message this round.
    progressed: bool,
    /// The client side took bytes since the server side last looked.
    c2s_moved: bool,
    /// The client side queued something the server side must look at (a synthetic reply,
    /// Terminate) or the stop signal changed what counts as the end.
    wake: bool,
    end_at_safe_point: bool,
    /// Whether each side's read waits registered (the client's outlives the round: the idle
    /// wait after it uses it too).
    client_watch: &'r mut ReadWatch,
    server_watch: ReadWatch,
}

impl<C, S> Round<'_, '_, C, S>
where
    C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    S: AsyncRead + AsyncWrite + ReadHint + Unpin,
{
    /// Both directions until neither can move, then the stop signal (pinned clients only).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut signal: Option<&mut MoveSignal>,
    ) -> Poll<RoundEnd> {
        loop {
            if matches!(self.c2s, C2s::Read) {
                // The client side waits for its socket: woken, most likely, by the server. Its
                // side first, so a reply that ends the round ends it without polling the
                // client again (one readiness poll, about 160 instructions per transaction);
                // the server side again if the client side then moved.
                if let Poll::Ready(end) = self.poll_s2c(cx) {
                    return Poll::Ready(end);
                }
                self.c2s_moved = false;
                if let Poll::Ready(end) = self.poll_c2s(cx) {
                    return Poll::Ready(end);
                }
                if self.c2s_moved
                    && let Poll::Ready(end) = self.poll_s2c(cx)
                {
                    return Poll::Ready(end);
                }
            } else {
                if let Poll::Ready(end) = self.poll_c2s(cx) {
                    return Poll::Ready(end);
                }
                if let Poll::Ready(end) = self.poll_s2c(cx) {
                    return Poll::Ready(end);
                }
            }
            let Some(Poll::Ready(kind)) = signal.as_deref_mut().map(|s| s.poll_stop(cx)) else {
                return Poll::Pending;
            };
            let sh = &mut self.sh;
            sh.stop = sh.stop.max(kind.level());
            let quiet = !sh.writing_to_client && !sh.writing_to_server && !sh.server_partial;
            let safe = quiet && sh.queue.is_empty() && !sh.unsynced && sh.client.status == b'I';
            if sh.deadline_reached() {
                return Poll::Ready(RoundEnd::Deadline);
            }
            if safe {
                return Poll::Ready(RoundEnd::SafePoint);
            }
            self.end_at_safe_point = true;
            self.wake = true;
        }
    }

    /// Client to server: process, write, read, until a socket is not ready or the round ends.
    fn poll_c2s(&mut self, cx: &mut Context<'_>) -> Poll<RoundEnd> {
        loop {
            match std::mem::replace(&mut self.c2s, C2s::Read) {
                C2s::Process => {
                    self.c2s_moved = true;
                    let verdict =
                        process_client(&mut self.sh, self.cbuf, &mut self.to_server, self.config);
                    if !self.to_server.is_empty() {
                        self.sh.writing_to_server = true;
                        self.written = 0;
                    }
                    self.c2s = C2s::Write(verdict);
                }
                C2s::Write(verdict) => {
                    if !self.to_server.is_empty() {
                        match poll_write_all(self.server, cx, &self.to_server, &mut self.written) {
                            Poll::Pending => {
                                self.c2s = C2s::Write(verdict);
                                return Poll::Pending;
                            }
                            Poll::Ready(Err(_)) => {
                                self.sh.writing_to_server = false;
                                return Poll::Ready(RoundEnd::ServerGone);
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                        self.sh.writing_to_server = false;
                        self.to_server.clear();
                        if self.to_server.capacity() > STREAM_ABOVE {
                            self.to_server = BytesMut::new();
                        }
                    }
                    if self.sh.synthetic_ready {
                        self.wake = true;
                    }
                    match verdict {
                        ClientVerdict::Continue | ClientVerdict::Incomplete(_) => {}
                        ClientVerdict::Terminate => {
                            self.sh.terminated = true;
                            self.wake = true;
                            return Poll::Ready(RoundEnd::ClientTerminated);
                        }
                        ClientVerdict::TooLarge(len) => {
                            return Poll::Ready(RoundEnd::ClientMessageTooLarge(len));
                        }
                        ClientVerdict::Invalid(e) => {
                            return Poll::Ready(RoundEnd::ClientProtocol(e));
                        }
                    }
                }
                C2s::Read => {
                    if self.client_watch.waiting(&*self.client, cx) {
                        return Poll::Pending;
                    }
                    let read = poll_read_appending(self.client, cx, self.cbuf);
                    self.client_watch.polled(&read, cx);
                    match read {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(RoundEnd::ClientGone),
                        Poll::Ready(Ok(n)) => {
                            crate::proxy::count_client_bytes(n);
                            self.c2s = C2s::Process;
                        }
                    }
                }
            }
        }
    }

    /// Server to client: process, write, look for the end, read, until a socket is not ready
    /// or the round ends.
    fn poll_s2c(&mut self, cx: &mut Context<'_>) -> Poll<RoundEnd> {
        loop {
            match self.s2c {
                S2c::Process => {
                    let sh = &mut self.sh;
                    if let Err(e) = process_server(
                        sh,
                        &mut self.sbuf,
                        &mut self.to_client,
                        &mut self.passthrough,
                        &mut self.progressed,
                    ) {
                        tracing::debug!(error = %e, "invalid server message stream");
                        return Poll::Ready(RoundEnd::ServerGone);
                    }
                    // Part of a message is through, or waits in the buffer: not a boundary.
                    sh.server_partial = self.passthrough > 0 || !self.sbuf.is_empty();
                    if !self.to_client.is_empty() {
                        sh.writing_to_client = true;
                        self.delivered = 0;
                    }
                    self.s2c = S2c::Write;
                }
                S2c::Write => {
                    if !self.to_client.is_empty() {
                        match poll_write_all(self.client, cx, &self.to_client, &mut self.delivered)
                        {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Err(_)) => {
                                self.sh.writing_to_client = false;
                                return Poll::Ready(RoundEnd::ClientGone);
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                        self.sh.writing_to_client = false;
                        crate::proxy::count_server_bytes(self.to_client.len());
                        self.to_client.clear();
                        if self.to_client.capacity() > STREAM_ABOVE {
                            self.to_client = BytesMut::new();
                        }
                    }
                    let sh = &self.sh;
                    let idle = sh.queue.is_empty() && !sh.unsynced && !sh.writing_to_server;
                    if sh.terminated && sh.queue.is_empty() {
                        return Poll::Ready(RoundEnd::ClientTerminated);
                    }
                    if sh.deadline_reached() {
                        return Poll::Ready(RoundEnd::Deadline);
                    }
                    if idle
                        && !sh.server_partial
                        && self.progressed
                        && sh.client.status == b'I'
                        && (self.end_at_safe_point || sh.stop >= 1 || sh.recheck)
                    {
                        return Poll::Ready(RoundEnd::SafePoint);
                    }
                    if self.sbuf.capacity() - self.sbuf.len() < 1024 {
                        self.sbuf.reserve(8 * 1024);
                    }
                    self.s2c = S2c::Read;
                }
                S2c::Read => {
                    // Registered and nothing new: only the other side's synthetic reply can
                    // move this side.
                    if !self.wake && self.server_watch.waiting(&*self.server, cx) {
                        return Poll::Pending;
                    }
                    let read = tokio_util::io::poll_read_buf(
                        Pin::new(&mut *self.server),
                        cx,
                        &mut self.sbuf,
                    );
                    self.server_watch.polled(&read, cx);
                    match read {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(RoundEnd::ServerGone),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Pending if self.wake => self.wake = false,
                        Poll::Pending => return Poll::Pending,
                    }
                    self.s2c = S2c::Process;
                }
            }
        }
    }
}

/// Writes `buf` from `*written` on, then flushes.
fn poll_write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    buf: &[u8],
    written: &mut usize,
) -> Poll<std::io::Result<()>> {
    std::task::ready!(crate::proxy::poll_write_from(w, cx, buf, written))?;
    Pin::new(w).poll_flush(cx)
}

/// One read appended to `buf`: straight into its spare room when it has 8 KiB of it, else
/// through a buffer on the stack, so a small request costs an allocation of its own size
/// rather than 8 KiB (an idle client's buffer holds no memory at all).
pub async fn read_appending<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_appending(reader, cx, buf)).await
}

/// [`read_appending`] as a poll.
pub fn poll_read_appending<R: AsyncRead + Unpin>(
    reader: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    const CHUNK: usize = 8 * 1024;
    if buf.capacity() - buf.len() >= CHUNK {
        return tokio_util::io::poll_read_buf(Pin::new(reader), cx, buf);
    }
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); CHUNK];
    let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
    std::task::ready!(Pin::new(reader).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

impl Shared<'_> {
    /// Whether the round ends now for the migration deadline (see
    /// [`crate::migrate::deadline_reached`]).
    fn deadline_reached(&self) -> bool {
        crate::migrate::deadline_reached(
            self.stop,
            !self.queue.is_empty(),
            self.server_partial || self.writing_to_client,
        )
    }
}

enum ClientVerdict {
    Continue,
    /// A message of this length is not complete yet (internal to [`process_client`]).
    Incomplete(usize),
    Terminate,
    TooLarge(usize),
    Invalid(String),
}

/// Takes every complete message from `cbuf`, rewriting and answering as needed; what goes to
/// the server is appended to `out`. Messages are read in place and `cbuf` advanced once.
fn process_client(
    sh: &mut Shared<'_>,
    cbuf: &mut BytesMut,
    out: &mut BytesMut,
    config: &RoundConfig<'_>,
) -> ClientVerdict {
    let mut at = 0;
    let verdict = client_messages(sh, &cbuf[..], &mut at, out, config);
    consume(cbuf, at);
    if cbuf.is_empty() && cbuf.capacity() > STREAM_ABOVE {
        *cbuf = BytesMut::new();
    }
    if let ClientVerdict::Incomplete(len) = verdict {
        cbuf.reserve(len + 1 - cbuf.len());
        return ClientVerdict::Continue;
    }
    verdict
}

/// Drops the first `n` bytes of `buf`. All of them, the usual case, is a `clear`: cheaper than
/// `advance` (about 40 instructions), and the room stays at the front for the next read.
#[inline]
fn consume(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

/// The loop of [`process_client`] over `buf`, from `*at` (left after the last message taken).
fn client_messages(
    sh: &mut Shared<'_>,
    buf: &[u8],
    at: &mut usize,
    out: &mut BytesMut,
    config: &RoundConfig<'_>,
) -> ClientVerdict {
    let hot = hot();
    // The unnamed portal was bound from the unnamed statement and not described since (see
    // the Execute arm), and where that statement's text is in `buf` if it was parsed there.
    let mut undescribed_unnamed = false;
    let mut unnamed_sql: Option<std::ops::Range<usize>> = None;
    loop {
        let rest = &buf[*at..];
        if rest.len() < 5 {
            return ClientVerdict::Continue;
        }
        let tag = rest[0];
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return ClientVerdict::Invalid(format!(
                "invalid message length {len} for message type {:?}",
                char::from(tag)
            ));
        }
        let len = len as usize;
        if len > config.max_message {
            return ClientVerdict::TooLarge(len);
        }
        if rest.len() < len + 1 {
            return ClientVerdict::Incomplete(len);
        }
        let msg = &rest[..len + 1];
        let body = &msg[5..];
        let body_at = *at + 5;
        *at += len + 1;
        if sh.skipping {
            if tag != b'S' {
                continue;
            }
            sh.skipping = false;
        }
        if sh.copy_in && !matches!(tag, b'd' | b'c' | b'f' | b'S' | b'H') {
            // Anything else fails the COPY, and the server takes the message as the cause of
            // that error: no reply of its own.
            sh.copy_in = false;
            out.extend_from_slice(msg);
            continue;
        }
        match tag {
            b'X' => return ClientVerdict::Terminate,
            b'Q' => {
                sh.clock.request_sent(hot);
                // The query string is the whole body but its NUL (PostgreSQL refuses a Query
                // with more after it). Judged on the bytes; text only when it may touch state.
                // (DEALLOCATE is one of the statements that may touch session state.)
                let sql = body.strip_suffix(b"\0").unwrap_or(body);
                if may_touch_session_state(sql) {
                    sh.recheck = true;
                    let text = String::from_utf8_lossy(sql);
                    sh.server.custom.note(&text);
                    if let Some(name) = deallocate_target(&text)
                        && let Some(statement) = sh.client.take_statement(name.as_bytes())
                    {
                        // A protocol statement: the server knows it under another name and
                        // keeps it for other clients; answer as PostgreSQL would.
                        let removed = Box::new((Box::from(name.as_bytes()), statement));
                        push_synthetic(sh, Synthetic::Deallocated(removed));
                        continue;
                    }
                }
                sh.queue.push_back(Expect::Simple);
                // A simple query destroys the unnamed statement.
                sh.server.unnamed_owner = 0;
                out.extend_from_slice(msg);
            }
            b'F' => {
                sh.clock.request_sent(hot);
                sh.queue.push_back(Expect::Simple);
                out.extend_from_slice(msg);
            }
            b'P' => {
                sh.unsynced = true;
                let Some(name) = cstr_bytes(body) else {
                    return ClientVerdict::Invalid("Parse without a statement name".into());
                };
                let rest = &body[name.len() + 1..];
                if let Some(sql) = cstr_bytes(rest)
                    && may_touch_session_state(sql)
                {
                    sh.recheck = true;
                    sh.server.custom.note(&String::from_utf8_lossy(sql));
                }
                if name.is_empty() {
                    sh.server.unnamed_owner = config.client_id;
                    let start = body_at + name.len() + 1;
                    unnamed_sql = cstr_bytes(rest).map(|sql| start..start + sql.len());
                    sh.queue.push_back(Expect::Parse {
                        key: None,
                        swallow: false,
                        registered: None,
                    });
                    out.extend_from_slice(msg);
                    continue;
                }
                if sh.client.has_statement(name) {
                    let name = String::from_utf8_lossy(name).into_owned();
                    sh.queue.push_back(Expect::Refused(name));
                    frontend::parse(REFUSED_NAME, "dbproxy refuses this Parse", [], out)
                        .expect("a fixed Parse message fits");
                    continue;
                }
                let statement = Arc::new(Statement::new(Bytes::copy_from_slice(rest)));
                sh.client.add_statement(name.to_vec(), statement.clone());
                let registered = Box::new((Box::from(name), statement.clone()));
                if sh.touch(&statement.key) {
                    push_synthetic(sh, Synthetic::ParseComplete(registered));
                } else {
                    sh.create(&statement, false, out, Some(registered));
                }
            }
            b'B' | b'D' => {
                sh.unsynced = true;
                if tag == b'B' {
                    // Portal "" from statement "".
                    undescribed_unnamed = body.starts_with(&[0, 0]);
                } else if body.starts_with(b"P\0") {
                    undescribed_unnamed = false;
                }
                sh.queue.push_back(if tag == b'B' {
                    Expect::Bind
                } else {
                    Expect::Describe
                });
                // Bind: portal, statement, ...; Describe: 'S' or 'P', name.
                let unnamed_statement = if tag == b'B' {
                    cstr_bytes(body).and_then(|p| body.get(p.len() + 1)) == Some(&0)
                } else {
                    body.starts_with(b"S\0")
                };
                if unnamed_statement {
                    let expect = sh.queue.pop_back();
                    sh.own_unnamed(config.client_id, out);
                    sh.queue.extend(expect);
                }
                let (prefix_len, name) = if tag == b'B' {
                    let portal = cstr_bytes(body).map_or(0, |p| p.len() + 1);
                    (portal, body.get(portal..).and_then(cstr_bytes))
                } else if body.first() == Some(&b'S') {
                    (1, body.get(1..).and_then(cstr_bytes))
                } else {
                    (0, None)
                };
                let statement = name
                    .filter(|n| !n.is_empty())
                    .and_then(|n| sh.client.statement(n).cloned());
                match (statement, name) {
                    (Some(statement), Some(name)) => {
                        if tag == b'B' && statement.touches_state {
                            sh.recheck = true;
                            sh.server.custom.note(
                                &cstr_bytes(&statement.rest)
                                    .map_or_else(Default::default, String::from_utf8_lossy),
                            );
                        }
                        // The queue entry for this message must come after the injected Parse.
                        let expect = sh.queue.pop_back();
                        if !sh.touch(&statement.key) {
                            sh.create(&statement, true, out, None);
                        }
                        sh.queue.extend(expect);
                        let tail = &body[prefix_len + name.len() + 1..];
                        let new_len = 4 + prefix_len + statement.server_name.len() + 1 + tail.len();
                        out.put_u8(tag);
                        out.put_i32(new_len as i32);
                        out.extend_from_slice(&body[..prefix_len]);
                        out.extend_from_slice(statement.server_name.as_bytes());
                        out.put_u8(0);
                        out.extend_from_slice(tail);
                    }
                    _ => {
                        out.extend_from_slice(msg);
                    }
                }
            }
            b'C' => {
                sh.unsynced = true;
                let named = body
                    .get(1..)
                    .and_then(cstr_bytes)
                    .filter(|name| !name.is_empty());
                if let (Some(b'S'), Some(name)) = (body.first(), named) {
                    // Closing a named statement: the server keeps it (under dbproxy's name)
                    // for others; closing an unknown name is not an error in PostgreSQL
                    // either. (The unnamed statement lives on the server: its Close goes
                    // there.)
                    let removed = sh.client.take_statement(name);
                    let removed = removed.map(|statement| Box::new((Box::from(name), statement)));
                    push_synthetic(sh, Synthetic::CloseComplete(removed));
                } else {
                    if body.starts_with(b"S\0") {
                        sh.own_unnamed(config.client_id, out);
                    }
                    sh.queue.push_back(Expect::Close { swallow: false });
                    out.extend_from_slice(msg);
                }
            }
            b'E' => {
                sh.unsynced = true;
                let mut blind = false;
                if undescribed_unnamed && body.first() == Some(&0) {
                    // An unnamed statement executed without a Describe of its portal (pgjdbc
                    // does that once it knows the columns): its reply has no row description
                    // whose absence would tell `SELECT ... INTO TEMP` (an empty table made
                    // says only `SELECT 0`), so its text is looked at, only here.
                    // Parsed in an earlier batch (inside a transaction: unnamed statements do
                    // not outlive one here), the text is gone: a `SELECT 0` completion asks
                    // the server.
                    undescribed_unnamed = false;
                    match unnamed_sql.clone().and_then(|r| buf.get(r)) {
                        Some(sql) => {
                            if crate::sql::selects_into_temp(&String::from_utf8_lossy(sql)) {
                                sh.recheck = true;
                            }
                        }
                        None => blind = true,
                    }
                }
                sh.queue.push_back(Expect::Execute { blind });
                out.extend_from_slice(msg);
            }
            b'S' => {
                if !sh.copy_in {
                    sh.clock.request_sent(hot);
                    sh.unsynced = false;
                    sh.queue.push_back(Expect::Sync);
                }
                out.extend_from_slice(msg);
            }
            b'd' | b'c' | b'f' => {
                // Whether a COPY is under way, the server's CopyInResponse says, not the
                // client's messages: outside one PostgreSQL ignores these three, and a client
                // that sends them there must not make dbproxy forget replies still to come
                // (their server would go back to the pool with them on their way, to the next
                // client).
                if tag != b'd' {
                    if sh.copy_in {
                        sh.copy_in = false;
                    } else if sh
                        .queue
                        .iter()
                        .any(|e| matches!(e, Expect::Simple | Expect::Execute { .. }))
                    {
                        sh.queue.push_back(Expect::CopyEnd);
                    }
                }
                out.extend_from_slice(msg);
            }
            _ => {
                // Flush, CopyData/CopyDone/CopyFail and anything else: as is (the server
                // answers what it does not know with an error).
                out.extend_from_slice(msg);
            }
        }
    }
}

/// 25P02, as PostgreSQL answers what it refuses in a failed transaction.
fn aborted_transaction_error(out: &mut BytesMut) {
    backend::error_response(
        out,
        "ERROR",
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
        None,
        None,
    );
}

fn push_synthetic(sh: &mut Shared<'_>, s: Synthetic) {
    sh.queue.push_back(Expect::Synthetic(s));
    if sh.queue.len() == 1 {
        sh.synthetic_ready = true;
    }
}

impl Statement {
    fn new(rest: Bytes) -> Self {
        let digest = Sha256::digest(&rest);
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        let server_name = server_name(&key);
        // Checked once per named statement: `SELECT ... INTO TEMP` too, since an execution
        // without a Describe gives no row description whose absence would tell it.
        let touches_state = cstr_bytes(&rest).is_some_and(|sql| {
            may_touch_session_state(sql)
                || crate::sql::selects_into_temp(&String::from_utf8_lossy(sql))
        });
        Statement {
            key,
            server_name,
            rest,
            touches_state,
        }
    }
}

impl Shared<'_> {
    /// Marks a statement used on this server; false when the server does not have it.
    fn touch(&mut self, key: &[u8; 16]) -> bool {
        self.server.tick += 1;
        let tick = self.server.tick;
        match self.server.prepared.get_mut(key) {
            Some(t) => {
                *t = tick;
                true
            }
            None => false,
        }
    }

    /// Sends a Parse creating `statement` on the server under dbproxy's name (its reply
    /// swallowed when dbproxy injected it), closing the least recently used statement first
    /// when the server holds the maximum.
    fn create(
        &mut self,
        statement: &Statement,
        injected: bool,
        out: &mut BytesMut,
        registered: Option<Registered>,
    ) {
        if self.server.prepared.len() >= self.max_prepared.max(1)
            && let Some((&oldest, _)) = self.server.prepared.iter().min_by_key(|(_, t)| **t)
        {
            self.server.prepared.remove(&oldest);
            let name = Statement::name_of(&oldest);
            out.put_u8(b'C');
            out.put_i32((4 + 1 + name.len() + 1) as i32);
            out.put_u8(b'S');
            out.extend_from_slice(name.as_bytes());
            out.put_u8(0);
            self.queue.push_back(Expect::Close { swallow: true });
        }
        self.server.tick += 1;
        self.server.prepared.insert(statement.key, self.server.tick);
        out.put_u8(b'P');
        out.put_i32((4 + statement.server_name.len() + 1 + statement.rest.len()) as i32);
        out.extend_from_slice(statement.server_name.as_bytes());
        out.put_u8(0);
        out.extend_from_slice(&statement.rest);
        self.queue.push_back(Expect::Parse {
            key: Some(statement.key),
            swallow: injected,
            registered,
        });
    }

    /// Before a client's Bind, Describe or Close of the unnamed statement: if another client's
    /// Parse made the one the server holds, it is closed first (the reply swallowed), so the
    /// client finds none, as it would on its own connection.
    fn own_unnamed(&mut self, client_id: u64, out: &mut BytesMut) {
        if self.server.unnamed_owner != client_id {
            frontend::close(b'S', "", out).expect("a fixed Close message fits");
            self.queue.push_back(Expect::Close { swallow: true });
            self.server.unnamed_owner = client_id;
        }
    }

    /// A statement a Close or `DEALLOCATE` removed, back: the server did not carry that out
    /// (unless the client parsed the name anew since).
    fn restore(&mut self, (name, statement): (Box<[u8]>, Arc<Statement>)) {
        if !self.client.has_statement(&name) {
            self.client.add_statement(name.into_vec(), statement);
        }
    }

    /// A client's Parse the server skipped or failed: the client does not have the statement
    /// (unless it parsed the name anew since).
    fn unregister(&mut self, registered: &(Box<[u8]>, Arc<Statement>)) {
        let (name, statement) = registered;
        if self
            .client
            .statement(name)
            .is_some_and(|s| Arc::ptr_eq(s, statement))
        {
            self.client.remove_statement(name);
        }
        // A Close of it queued behind must not put it back if the server skips that Close.
        for e in self.queue.iter_mut() {
            if let Expect::Synthetic(Synthetic::CloseComplete(removed)) = e
                && removed
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(&r.1, statement))
            {
                *removed = None;
            }
        }
    }

    /// The server answered the request at the head of the queue with CopyInResponse: until
    /// the client's next CopyDone or CopyFail it ignores the client's Syncs (libpq and
    /// tokio-postgres send one right behind the Execute). Those already queued after the
    /// request, up to the first [`Expect::CopyEnd`], get no reply; with no CopyEnd yet, the
    /// COPY goes on and the client's Syncs are not queued until it ends.
    fn copy_started(&mut self) {
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue[i] {
                Expect::Sync => {
                    self.queue.remove(i);
                }
                Expect::CopyEnd => {
                    self.queue.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// Whether synthetic replies are at the head of the queue, due now (checked after every
    /// server message: the usual case, none, stays inline).
    #[inline]
    fn synthetic_pending(&mut self) -> bool {
        let pending = matches!(self.queue.front(), Some(Expect::Synthetic(_)));
        if !pending {
            self.synthetic_ready = false;
        }
        pending
    }

    /// Emits the synthetic replies at the head of the queue.
    #[cold]
    fn emit_synthetics_now(&mut self, out: &mut BytesMut) -> bool {
        let mut any = false;
        while let Some(Expect::Synthetic(_)) = self.queue.front() {
            let Some(Expect::Synthetic(s)) = self.queue.pop_front() else {
                break;
            };
            any = true;
            match s {
                Synthetic::ParseComplete(registered) if self.client.status == b'E' => {
                    // PostgreSQL refuses a Parse in a failed transaction and skips to Sync.
                    self.unregister(&registered);
                    aborted_transaction_error(out);
                    // What went to the server behind it is answered there: skipped here.
                    self.swallow_to_sync = true;
                    self.skip_to_sync();
                }
                Synthetic::ParseComplete(_) => out.extend_from_slice(&[b'1', 0, 0, 0, 4]),
                Synthetic::CloseComplete(_) => out.extend_from_slice(&[b'3', 0, 0, 0, 4]),
                Synthetic::Deallocated(removed) => {
                    if self.client.status == b'E' {
                        // Refused in a failed transaction: the statement stays.
                        self.restore(*removed);
                        aborted_transaction_error(out);
                    } else {
                        out.put_u8(b'C');
                        out.put_i32(4 + "DEALLOCATE".len() as i32 + 1);
                        out.extend_from_slice(b"DEALLOCATE\0");
                    }
                    backend::ready_for_query(out, self.client.status);
                }
            }
        }
        self.synthetic_ready = false;
        any
    }

    /// The server failed a message of an extended sequence: it skips everything up to Sync,
    /// so do the replies dbproxy owed or would swallow in between.
    fn skip_to_sync(&mut self) {
        while !matches!(self.queue.front(), Some(Expect::Sync) | None) {
            match self.queue.pop_front() {
                Some(Expect::Parse {
                    key, registered, ..
                }) => {
                    match (key, registered) {
                        (Some(key), registered) => {
                            self.server.prepared.remove(&key);
                            if let Some(registered) = registered {
                                self.unregister(&registered);
                            }
                        }
                        (None, Some(registered)) => self.unregister(&registered),
                        // The client's Parse of the unnamed statement, skipped: the one the
                        // server holds may be another client's.
                        (None, None) => self.server.unnamed_owner = 0,
                    }
                }
                Some(Expect::Synthetic(Synthetic::ParseComplete(registered))) => {
                    self.unregister(&registered);
                }
                Some(Expect::Synthetic(Synthetic::CloseComplete(Some(removed)))) => {
                    // The server skipped the Close: the client still has the statement.
                    self.restore(*removed);
                }
                _ => {}
            }
        }
    }
}

impl Statement {
    fn name_of(key: &[u8; 16]) -> String {
        server_name(key)
    }
}

/// The name dbproxy gives a statement on servers: `dbproxy_` and its key in hex.
pub fn server_name(key: &[u8; 16]) -> String {
    let mut s = String::with_capacity(8 + 32);
    s.push_str("dbproxy_");
    for b in key {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Reads server messages from `sbuf`: tracks the replies owed, swallows the ones dbproxy
/// caused, emits the ones dbproxy owes, and appends what the client gets to `out`. Messages
/// are read in place; each run of forwarded bytes is copied to `out` at once and `sbuf`
/// advanced once (per message, the copies and advances cost about 270 instructions per
/// select-only transaction).
fn process_server(
    sh: &mut Shared<'_>,
    sbuf: &mut BytesMut,
    out: &mut BytesMut,
    passthrough: &mut usize,
    progressed: &mut bool,
) -> Result<(), String> {
    let mut walk = Walk::default();
    let result = server_messages(sh, &sbuf[..], &mut walk, out, passthrough, progressed);
    walk.flush(&sbuf[..], out);
    consume(sbuf, walk.at);
    // An incomplete message: room for the whole of it.
    if let Ok(Some(whole)) = result {
        sbuf.reserve(whole.saturating_sub(sbuf.len()));
    }
    result.map(drop)
}

/// Where [`server_messages`] is in the server's bytes.
#[derive(Default)]
struct Walk {
    /// Bytes taken (the next message starts here).
    at: usize,
    /// The start of the forwarded bytes not yet copied to the client's buffer.
    run: usize,
}

impl Walk {
    /// Copies the pending run of forwarded bytes, before something else goes to `out`.
    fn flush(&mut self, buf: &[u8], out: &mut BytesMut) {
        if self.run < self.at {
            out.extend_from_slice(&buf[self.run..self.at]);
        }
        self.run = self.at;
    }

    /// Takes `n` bytes the client does not get.
    fn swallow(&mut self, buf: &[u8], out: &mut BytesMut, n: usize) {
        self.flush(buf, out);
        self.at += n;
        self.run = self.at;
    }
}

/// The loop of [`process_server`] over `buf`, from `walk.at`; `Ok(Some(n))` when the next
/// message is incomplete and `n` bytes long with its header.
fn server_messages(
    sh: &mut Shared<'_>,
    buf: &[u8],
    walk: &mut Walk,
    out: &mut BytesMut,
    passthrough: &mut usize,
    progressed: &mut bool,
) -> Result<Option<usize>, String> {
    let hot = hot();
    if sh.synthetic_pending() {
        walk.flush(buf, out);
        if sh.emit_synthetics_now(out) {
            *progressed = true;
        }
    }
    loop {
        let rest = &buf[walk.at..];
        if *passthrough > 0 {
            let n = (*passthrough).min(rest.len());
            if n == 0 {
                return Ok(None);
            }
            walk.at += n;
            *passthrough -= n;
            continue;
        }
        if rest.len() < 5 {
            return Ok(None);
        }
        let tag = rest[0];
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return Err(format!("invalid server message length {len}"));
        }
        let len = len as usize;
        let whole = len + 1;
        // Header-level decisions are enough for big messages (rows, copy data).
        if whole > STREAM_ABOVE && rest.len() < whole {
            if matches!(tag, b'D' | b'd' | b'T' | b'N' | b'E' | b'A') {
                sh.note_result(tag);
                sh.note_completion(tag, &[]);
                walk.at += 5;
                *passthrough = len - 4;
                continue;
            }
            return Ok(Some(whole));
        }
        if rest.len() < whole {
            return Ok(Some(whole));
        }
        let msg = &rest[..whole];
        let body = &msg[5..];
        let forward = if sh.swallow_to_sync && !matches!(tag, b'Z' | b'A' | b'N' | b'S') {
            false
        } else {
            match tag {
                b'Z' => {
                    let status = body.first().copied().unwrap_or(b'I');
                    sh.client.status = status;
                    sh.swallow_to_sync = false;
                    sh.note_result(tag);
                    while let Some(front) = sh.queue.pop_front() {
                        match front {
                            Expect::Sync | Expect::Simple => break,
                            // Answered by nothing before the ReadyForQuery: skipped.
                            Expect::Parse {
                                registered: Some(registered),
                                ..
                            } => sh.unregister(&registered),
                            Expect::Parse {
                                key: None,
                                registered: None,
                                ..
                            } => sh.server.unnamed_owner = 0,
                            _ => {}
                        }
                    }
                    let still_pending = sh
                        .queue
                        .iter()
                        .any(|e| matches!(e, Expect::Sync | Expect::Simple));
                    sh.clock.ready_for_query(hot, status, still_pending);
                    *progressed = true;
                    true
                }
                b'S' => {
                    if let (Some(name), Some(value)) = (
                        cstr_bytes(body),
                        body.iter()
                            .position(|&b| b == 0)
                            .and_then(|p| body.get(p + 1..))
                            .and_then(cstr_bytes),
                    ) {
                        let name = String::from_utf8_lossy(name).into_owned();
                        let value = String::from_utf8_lossy(value).into_owned();
                        crate::server::set_parameter_status(sh.server_params, &name, &value);
                        crate::server::set_parameter_status(&mut sh.client.seen, &name, &value);
                    }
                    true
                }
                b'1' => match sh.queue.front() {
                    Some(Expect::Parse { swallow, key, .. }) => {
                        let swallow = *swallow;
                        if let Some(key) = key {
                            sh.known.insert(*key);
                        }
                        sh.queue.pop_front();
                        !swallow
                    }
                    _ => true,
                },
                b'3' => match sh.queue.front() {
                    Some(Expect::Close { swallow }) => {
                        let swallow = *swallow;
                        sh.queue.pop_front();
                        !swallow
                    }
                    _ => true,
                },
                b'E' if matches!(sh.queue.front(), Some(Expect::Refused(_))) => {
                    let Some(Expect::Refused(name)) = sh.queue.pop_front() else {
                        unreachable!("matched above");
                    };
                    sh.skip_to_sync();
                    sh.note_result(tag);
                    // The server's error is for dbproxy's Parse (a syntax error): the client
                    // gets PostgreSQL's answer to its own, 25P02 first in a failed
                    // transaction.
                    walk.flush(buf, out);
                    if sh.client.status == b'E' {
                        aborted_transaction_error(out);
                    } else {
                        backend::error_response(
                            out,
                            "ERROR",
                            "42P05",
                            &format!("prepared statement \"{name}\" already exists"),
                            None,
                            None,
                        );
                    }
                    false
                }
                b'E' => {
                    match sh.queue.front() {
                        Some(Expect::Simple) | None => {}
                        Some(_) => sh.skip_to_sync(),
                    }
                    sh.note_result(tag);
                    true
                }
                b'G' => {
                    sh.copy_started();
                    true
                }
                b'C' => {
                    let tag_text = body.strip_suffix(b"\0").unwrap_or(body);
                    // `SELECT n` without a row: a table made from a query (SELECT ... INTO,
                    // CREATE TABLE ... AS), which may be temporary: ask the server afterwards. A
                    // simple query's SELECT always sends its RowDescription, so does an extended
                    // one whose portal was described (NoData says it returns none). An execution
                    // without a Describe sends its rows, so `SELECT n` with n > 0 and none before
                    // it made a table; `SELECT 0` there says nothing (a named statement was
                    // checked at its Parse, an unnamed one at its Execute when parsed in the same
                    // batch; one parsed earlier is `blind`: the server is asked).
                    if !sh.rows
                        && tag_text.starts_with(b"SELECT ")
                        && (sh.no_data
                            || matches!(
                                sh.queue.front(),
                                Some(Expect::Simple | Expect::Execute { blind: true })
                            )
                            || tag_text != b"SELECT 0")
                    {
                        sh.recheck = true;
                    }
                    sh.note_result(tag);
                    if tag_text == b"DISCARD ALL" || tag_text == b"DEALLOCATE ALL" {
                        // Every prepared statement of the session is gone, dbproxy's names too.
                        sh.client.clear_prepared();
                        sh.server.prepared.clear();
                        sh.server.sql_prepared.clear();
                    }
                    sh.note_completion(tag, body);
                    true
                }
                _ => {
                    sh.note_result(tag);
                    sh.note_completion(tag, body);
                    true
                }
            }
        };
        if forward {
            walk.at += whole;
        } else {
            walk.swallow(buf, out, whole);
        }
        // A CopyEnd whose request was answered without a COPY: the server ignored it.
        while matches!(sh.queue.front(), Some(Expect::CopyEnd)) {
            sh.queue.pop_front();
        }
        if sh.synthetic_pending() {
            walk.flush(buf, out);
            if sh.emit_synthetics_now(out) {
                *progressed = true;
            }
        }
    }
}

impl Shared<'_> {
    /// Whether the statement being answered returned rows: RowDescription or DataRow say it
    /// did, NoData that its described portal returns none; a completion, an error,
    /// EmptyQueryResponse or ReadyForQuery ends the statement.
    fn note_result(&mut self, tag: u8) {
        match tag {
            b'T' | b'D' => self.rows = true,
            b'n' => self.no_data = true,
            b'C' | b'E' | b'I' | b'Z' => (self.rows, self.no_data) = (false, false),
            _ => {}
        }
    }

    /// Pops the queue entry a reply completes (Bind, Describe, Execute).
    fn note_completion(&mut self, tag: u8, _body: &[u8]) {
        let done = matches!(
            (tag, self.queue.front()),
            (b'2', Some(Expect::Bind))
                | (b'T' | b'n', Some(Expect::Describe))
                | (b'C' | b'I' | b's', Some(Expect::Execute { .. }))
        );
        if done {
            self.queue.pop_front();
        }
    }
}

/// The bytes of a NUL-terminated string at the start of `b` (without the NUL).
fn cstr_bytes(b: &[u8]) -> Option<&[u8]> {
    memchr::memchr(0, b).map(|p| &b[..p])
}

/// The statement name of a query that is exactly `DEALLOCATE [PREPARE] name`.
fn deallocate_target(text: &str) -> Option<String> {
    let mut statements = crate::sql::split_statements(text);
    let (Some(one), None) = (statements.next(), statements.next()) else {
        return None;
    };
    if !crate::sql::leading_keywords(one).is(0, "DEALLOCATE") {
        return None;
    }
    let words: Vec<&str> = one.split_whitespace().collect();
    let name = match words.as_slice() {
        [_, name] => *name,
        [_, p, name] if p.eq_ignore_ascii_case("prepare") => *name,
        _ => return None,
    };
    if name.eq_ignore_ascii_case("all") {
        return None;
    }
    Some(
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_lowercase(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What most clients never have takes no memory, and goes once the session holds none of
    /// it again.
    #[test]
    fn a_client_session_boxes_its_state_only_while_it_has_some() {
        let seen = crate::server::share_parameter_status(Vec::new());
        let mut client = ClientSession::new(seen);
        assert!(client.state.is_none());
        // Nothing learned: no box either.
        client.set_learned(Vec::new(), Vec::new(), Vec::new());
        assert!(client.state.is_none());

        let statement = Arc::new(Statement::new(Bytes::from_static(b"SELECT 1\0\0\0")));
        client.add_statement(b"s1".to_vec(), statement);
        assert!(client.has_statement(b"s1") && client.statement_count() == 1);
        client.set_learned(
            vec!["temporary table"],
            vec![("a.b".into(), "1".into())],
            Vec::new(),
        );
        assert!(client.is_pinned());
        assert_eq!(client.settings(), [("a.b".to_string(), "1".to_string())]);

        // DISCARD ALL drops the statements; the setting and the pin keep the box.
        client.clear_prepared();
        assert_eq!(client.statement_count(), 0);
        assert!(client.state.is_some());
        client.set_learned(Vec::new(), Vec::new(), Vec::new());
        assert!(client.state.is_none() && !client.is_pinned() && client.settings().is_empty());

        // The last statement closed: gone too.
        let statement = Arc::new(Statement::new(Bytes::from_static(b"SELECT 2\0\0\0")));
        client.add_statement(b"s2".to_vec(), statement);
        assert!(!client.remove_statement(b"other"));
        assert!(client.state.is_some());
        assert!(client.remove_statement(b"s2"));
        assert!(client.state.is_none());
    }

    #[test]
    fn statements_in_other_client_encodings_are_judged_too() {
        // LATIN1 bytes (0xe9 is not UTF-8 on its own).
        let judged = |sql: &[u8]| cstr_bytes(sql).is_some_and(may_touch_session_state);
        assert!(judged(b"SET search_path = \"sch\xe9ma\"\0"));
        assert!(judged(b"SELECT 'caf\xe9'; SET application_name = 'x'\0"));
        assert!(judged(b"PREPARE p AS SELECT 'n\xe9'\0"));
        assert!(!judged(b"SELECT 'caf\xe9; SET a = 1'\0"));
        assert!(!judged(b"SET a = 1"), "no terminator");
        // Text in UTF-8 is judged and noted in place, not copied.
        assert!(matches!(
            cstr_bytes(b"SELECT 1\0").map(String::from_utf8_lossy),
            Some(std::borrow::Cow::Borrowed(_))
        ));
    }

    #[test]
    fn an_idle_connection_gives_back_its_round_buffers() {
        let mut session = ServerSession::default();
        assert_eq!(
            session.drop_idle_buffers(),
            0,
            "nothing held before any round"
        );
        // What a round leaves: a read buffer sized for replies, small write buffers.
        session.bufs.from_server.reserve(8 * 1024);
        session.bufs.to_client.extend_from_slice(b"reply");
        session.bufs.recycle();
        assert!(
            session.bufs.from_server.capacity() >= 8 * 1024,
            "kept between rounds"
        );
        assert!(session.drop_idle_buffers() >= 8 * 1024 + 5);
        assert_eq!(session.bufs.from_server.capacity(), 0);
        assert_eq!(session.bufs.to_client.capacity(), 0);
        assert_eq!(session.drop_idle_buffers(), 0);
    }

    #[test]
    fn deallocate_targets() {
        assert_eq!(deallocate_target("DEALLOCATE s1"), Some("s1".into()));
        assert_eq!(
            deallocate_target("deallocate prepare \"S1\";"),
            Some("S1".into())
        );
        assert_eq!(deallocate_target("DEALLOCATE ALL"), None);
        assert_eq!(deallocate_target("DEALLOCATE a; select 1"), None);
        assert_eq!(deallocate_target("select 1"), None);
    }

    #[test]
    fn statement_names_depend_on_text_and_types() {
        let a = Statement::new(Bytes::from_static(b"select $1\0\0\x01\0\0\0\x17"));
        let b = Statement::new(Bytes::from_static(b"select $1\0\0\x01\0\0\0\x19"));
        assert_ne!(a.server_name, b.server_name);
        assert_eq!(a.server_name, Statement::name_of(&a.key));
        assert!(a.server_name.len() < 64);
    }
}
