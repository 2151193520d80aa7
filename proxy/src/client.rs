//! A client's connection from accept to goodbye: TLS if asked, startup packet, client
//! authentication, a server connection from the pool, the login replay, the session, and the
//! release.

use std::future::Future;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use dbcred::tls::PgStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::scram_server::ScramVerifier;
use crate::cancel::{CancelKey, CancelMap};
use crate::error::{ProxyError, Result};
use crate::migrate::{MigratePolicy, MoveSignal, Snapshot};
use crate::pool::Pool;
use crate::protocol::backend;
use crate::protocol::framing::read_message;
use crate::protocol::frontend::parse_sasl_initial_response;
use crate::protocol::startup::{StartupParams, StartupRequest, parse_startup, read_startup_packet};
use crate::proxy::{SessionEnd, run_session};
use crate::ready::ReadWatch;
use crate::server::ServerConnection;
use crate::server::send_cancel;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::{ClientStream, ClientTls, ClientTlsMode};
use crate::txn::{ClientSession, RoundConfig, RoundEnd, run_round};

/// Largest SASL message a client may send during login.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// What every client task needs, shared.
pub struct ClientContext {
    pub pool: Arc<Pool>,
    pub cancels: Arc<CancelMap>,
    pub stats: Arc<Stats>,
    /// Verifier for clients on non-loopback listeners.
    pub scram: Option<Arc<ScramVerifier>>,
    pub login_timeout: Duration,
    pub pool_timeout: Duration,
    pub max_client_message: usize,
    /// What the listeners do with SSLRequest, and their certificate.
    pub client_tls: ClientTls,
    /// How to reach each backend serving a client now, for forwarding cancels (same TLS as
    /// the backend's session).
    /// `--pool-mode transaction`.
    pub transaction_mode: bool,
    /// `--migrate` and `--migration-timeout`.
    pub migrate: crate::migrate::MigratePolicy,
    pub migration_timeout: Duration,
    /// `--max-prepared-statements` (transaction mode).
    pub max_prepared_statements: usize,
    /// `--reset-settings-between-clients` (transaction mode).
    pub reset_settings_between_clients: bool,
    /// Statements servers have accepted (transaction mode).
    pub known_statements: crate::txn::KnownStatements,
    /// Where idle clients (a session-mode client with its server) wait once silent for
    /// `--client-park-after-ms` (none when 0).
    pub parker: Option<ClientParker>,
    /// Shutdown, as every client task watches it (a parked client takes its copy from here).
    pub shutdown: Shutdown,
    /// Where plaintext session-mode sessions are forwarded (`--session-lane`, session mode
    /// on one runtime thread).
    pub lane: Option<Arc<crate::lane::Lane>>,
    /// `--session-lane-after`: transactions a session runs before it enters the lane (0:
    /// right after its login). Entering and leaving cost a session about 25 µs of system
    /// calls and thread hand-offs (pgbench -C, one select-only transaction per connection:
    /// 126 against 94–100 µs of CPU per transaction); a transaction through the lane saves about
    /// 1 µs, and a session that enters at once never allocates what its task would use while
    /// it forwards (about 1 kB per idle session with its server connection, against 2.7 kB
    /// when it enters after an idle spell).
    pub lane_after: u32,
    /// Where idle plaintext transaction-mode clients wait and their transactions are
    /// forwarded (`--transaction-lane`, transaction mode on one runtime thread).
    pub tx_lane: Option<Arc<crate::txlane::TxLane>>,
    /// `--transaction-lane-after`: transactions a client runs before it enters the
    /// transaction lane.
    pub tx_lane_after: u32,
}

/// The parker of the pool mode: one per mode, so that a parked client's record in its slab
/// has the size of its own mode's state (a transaction-mode client's is less than half of a
/// session's).
pub enum ClientParker {
    Transaction(Arc<crate::park::Parker<ParkedTransaction>>),
    Session(Arc<crate::park::Parker<ParkedSession>>),
}

impl ClientParker {
    /// Starts the parker for the pool mode (see [`crate::park::Parker::start`]).
    pub fn start(
        transaction_mode: bool,
        period: Duration,
        shutdown: Shutdown,
    ) -> std::io::Result<Self> {
        use crate::park::Parker;
        Ok(if transaction_mode {
            ClientParker::Transaction(Parker::start(period, shutdown)?)
        } else {
            ClientParker::Session(Parker::start(period, shutdown)?)
        })
    }

    fn idle_wait(&self) -> crate::park::IdleWait {
        match self {
            ClientParker::Transaction(p) => p.idle_wait(),
            ClientParker::Session(p) => p.idle_wait(),
        }
    }

    fn epoch(&self) -> u64 {
        match self {
            ClientParker::Transaction(p) => p.epoch(),
            ClientParker::Session(p) => p.epoch(),
        }
    }

    /// How many clients are parked (for the gauge): a function that does not keep the
    /// parker alive.
    pub fn counter(&self) -> Box<dyn Fn() -> usize + Send + Sync> {
        fn weak_len<T: crate::park::Parkable>(
            p: &Arc<crate::park::Parker<T>>,
        ) -> Box<dyn Fn() -> usize + Send + Sync> {
            let p = Arc::downgrade(p);
            Box::new(move || p.upgrade().map_or(0, |p| p.len()))
        }
        match self {
            ClientParker::Transaction(p) => weak_len(p),
            ClientParker::Session(p) => weak_len(p),
        }
    }
}

/// A transaction-mode client parked between transactions: what its task resumes with, its
/// socket out of the runtime. The state is held by value, in the parker's slab, not in the
/// boxes it lived in: a parked client then keeps nothing of its own scattered over the heap,
/// so the pages its task and boxes used can go back to the system (see [`crate::park`]).
pub struct ParkedTransaction {
    conn: ParkedConn,
    socket: StdTcpStream,
    session: TxSession,
}

/// A session-mode client parked with its server, both idle at a safe point: what its task
/// resumes with and both sockets, out of the runtime (held by value, as above).
pub struct ParkedSession {
    conn: ParkedConn,
    socket: StdTcpStream,
    server: StdTcpStream,
    st: SessClient,
}

/// A [`ClientConn`] without what a parked client does not use or finds elsewhere: its
/// socket is out of the runtime, its reply buffer empty; the context is the slot's, the
/// shutdown watch the context's, the address the client's SHOW CLIENTS entry's.
struct ParkedConn {
    require_password: bool,
    slot: crate::listener::ClientSlot,
}

impl ParkedConn {
    fn ctx(&self) -> &Arc<ClientContext> {
        self.slot.ctx()
    }

    /// Back in the runtime with `socket`; `tracked` is the client's registry entry.
    fn resume(self, socket: TcpStream, tracked: &crate::stats::ClientGuard) -> Box<ClientConn> {
        let peer = tracked
            .peer()
            .or_else(|| socket.peer_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let ctx = self.slot.ctx().clone();
        Box::new(ClientConn {
            socket: ClientStream::Plain(socket),
            out: BytesMut::new(),
            peer,
            require_password: self.require_password,
            shutdown: ctx.shutdown.clone(),
            ctx,
            _slot: self.slot,
        })
    }
}

impl ParkedSession {
    /// Whether generation `g` moves this client's session under `policy`.
    pub fn moved_by(&self, policy: MigratePolicy, g: &crate::credentials::Generation) -> bool {
        policy.moves(self.st.server.generation, &self.st.server.target, g)
    }

    /// The client's socket and the server's, for the session lane.
    pub(crate) fn lane_sockets(&self) -> [&StdTcpStream; 2] {
        [&self.socket, &self.server]
    }

    pub(crate) fn lane_client(&self) -> &StdTcpStream {
        &self.socket
    }

    pub(crate) fn lane_server(&self) -> &StdTcpStream {
        &self.server
    }

    /// The custom setting names the client's statements mentioned.
    pub(crate) fn lane_custom(&mut self) -> &mut Option<Box<crate::custom::SessionCustom>> {
        &mut self.st.custom
    }

    /// The largest client message, and whether custom settings are tracked (for moves).
    pub(crate) fn lane_settings(&self) -> (usize, bool) {
        let ctx = self.conn.ctx();
        (ctx.max_client_message, ctx.migrate != MigratePolicy::Never)
    }

    /// The bytes the client sent behind its startup packet, not forwarded yet.
    pub(crate) fn take_initial(&mut self) -> BytesMut {
        std::mem::take(&mut self.st.initial)
    }

    /// Back in the runtime on a task of its own, its forwarding going on from `carry` (a
    /// session the lane refused or gave back). Called inside the runtime.
    pub(crate) fn resume_from(self: Box<Self>, carry: Option<Box<crate::proxy::Carry>>) {
        let mut session = *self;
        session.st.resume = carry;
        crate::park::Parkable::resume(session);
    }

    /// The same as a task for the lane thread to spawn on the runtime: the session is served
    /// on that task, not on one more spawned from it.
    pub(crate) async fn resumed(self: Box<Self>, carry: Option<Box<crate::proxy::Carry>>) {
        let mut session = *self;
        session.st.resume = carry;
        if let Some(task) = session.into_task() {
            task.await;
        }
    }
}

impl crate::park::Parkable for ParkedTransaction {
    fn sockets(&self) -> [Option<RawFd>; 2] {
        [Some(self.socket.as_raw_fd()), None]
    }

    /// Resumes on a new task. Should the reactor refuse the socket, the client is closed.
    fn resume(self) {
        let ParkedTransaction {
            conn,
            socket,
            session,
        } = self;
        let Some(socket) = crate::park::to_runtime(socket) else {
            return;
        };
        let conn = conn.resume(socket, &session.tracked);
        let st = Box::new(TxClient::idle(session));
        drop(tokio::spawn(serve_transaction(conn, st)));
    }
}

impl crate::park::Parkable for ParkedSession {
    fn sockets(&self) -> [Option<RawFd>; 2] {
        [Some(self.socket.as_raw_fd()), Some(self.server.as_raw_fd())]
    }

    /// Resumes on a new task. Should the reactor refuse a socket, the client is closed and
    /// its server with it.
    fn resume(self) {
        if let Some(task) = self.into_task() {
            drop(tokio::spawn(task));
        }
    }
}

impl ParkedSession {
    /// Its sockets back in the reactor, and the session's task to run (none if the reactor
    /// refused a socket: the client is closed then, and its server with it). Called inside the
    /// runtime.
    fn into_task(self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let ParkedSession {
            conn,
            socket,
            server,
            mut st,
        } = self;
        let (Some(socket), Some(server)) = (
            crate::park::to_runtime(socket),
            crate::park::to_runtime(server),
        ) else {
            return None;
        };
        st.server.stream.attach(server);
        let conn = conn.resume(socket, &st.tracked);
        Some(serve_session(conn, Box::new(st)))
    }
}

/// A transaction-mode client in the transaction lane (see [`crate::txlane`]): its socket
/// out of the runtime, its session, and the bytes of its next request.
pub struct LaneTxClient {
    conn: ParkedConn,
    socket: StdTcpStream,
    session: TxSession,
    cbuf: BytesMut,
    watch: ReadWatch,
    pub(crate) flags: Arc<crate::txlane::Flags>,
}

/// A server connection the transaction lane holds: its socket out of the runtime.
pub struct LaneServer {
    server: Box<ServerConnection>,
    socket: StdTcpStream,
    pub(crate) flags: Arc<crate::txlane::Flags>,
}

/// What a lane client's request needs.
pub(crate) enum Prep {
    /// A server.
    Server,
    /// Nothing: the client said Terminate.
    Terminate,
    /// The runtime (a pinned session).
    GiveBack,
    /// Nothing but this reply, which dbproxy gives itself.
    Reply(BytesMut),
}

impl LaneTxClient {
    pub(crate) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub(crate) fn ctx(&self) -> &Arc<ClientContext> {
        self.conn.ctx()
    }

    pub(crate) fn params(&self) -> &crate::server::ServerParams {
        &self.session.server_params
    }

    pub(crate) fn has_request(&self) -> bool {
        !self.cbuf.is_empty()
    }

    /// One read of the client's socket into its request buffer.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let mut io = crate::txlane::LaneIo::new(&self.socket, &self.flags);
        let read = crate::txn::poll_read_appending(&mut io, cx, &mut self.cbuf);
        if let Poll::Ready(Ok(n)) = read {
            crate::proxy::count_client_bytes(n);
        }
        read
    }

    /// What the request at hand needs.
    pub(crate) fn prepare(&mut self) -> Prep {
        if self.cbuf.first() == Some(&b'X') {
            return Prep::Terminate;
        }
        if self.session.client.is_pinned() {
            return Prep::GiveBack;
        }
        let known = &self.conn.ctx().known_statements;
        match crate::txn::answer_without_server(&mut self.session.client, &mut self.cbuf, known) {
            Some(reply) => Prep::Reply(reply),
            None => Prep::Server,
        }
    }

    /// Writes `reply` as far as the socket takes it: what is left, if anything.
    pub(crate) fn write_reply(&self, mut reply: BytesMut) -> Option<BytesMut> {
        use std::io::Write;
        while !reply.is_empty() {
            match (&self.socket).write(&reply) {
                Ok(n) => {
                    let _ = reply.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Some(reply),
            }
        }
        None
    }

    /// Marks the client waiting for a server (SHOW CLIENTS).
    pub(crate) fn set_waiting(&self) {
        self.session.tracked.set_waiting();
    }

    /// Takes `server` for the request at hand when nothing on it needs bringing in line
    /// (false: the runtime syncs it, as [`transaction_step`] does).
    pub(crate) fn begin(&mut self, server: &mut LaneServer) -> bool {
        let owner = self
            .conn
            .ctx()
            .reset_settings_between_clients
            .then(|| self.session.tracked.id());
        let (server_conn, client) = (&mut server.server, &self.session.client);
        if !in_sync(server_conn, client, owner) && !sync_is_empty(server_conn, client, owner) {
            return false;
        }
        self.session.tracked.link(&server.server.registry);
        true
    }

    /// Forwards one round between the client and `server`, to the first safe point.
    pub(crate) async fn round(
        mut self: Box<Self>,
        mut server: Box<LaneServer>,
    ) -> (Box<Self>, Box<LaneServer>, crate::txn::RoundOutcome) {
        let LaneTxClient {
            conn,
            socket,
            session,
            cbuf,
            watch,
            flags,
        } = &mut *self;
        let LaneServer {
            server: conn_s,
            socket: server_socket,
            flags: server_flags,
        } = &mut *server;
        let ctx = conn.ctx();
        let config = RoundConfig {
            known: &ctx.known_statements,
            max_message: ctx.max_client_message,
            max_prepared: ctx.max_prepared_statements,
            end_at_safe_point: true,
            client_id: session.tracked.id(),
        };
        let ServerConnection {
            txn,
            parameter_status,
            ..
        } = &mut **conn_s;
        let outcome = run_round(
            &mut crate::txlane::LaneIo::new(socket, flags),
            &mut crate::txlane::LaneIo::new(server_socket, server_flags),
            txn.get_or_insert_with(Default::default),
            parameter_status,
            &mut session.client,
            cbuf,
            &config,
            None,
            watch,
        )
        .await;
        (self, server, outcome)
    }

    /// Whether the round ended where the lane goes on (a safe point, nothing to look at, no
    /// pin): then the client's cancels stop going to `server`.
    pub(crate) fn settled(
        &mut self,
        server: &LaneServer,
        outcome: &crate::txn::RoundOutcome,
    ) -> bool {
        if outcome.end != RoundEnd::SafePoint || outcome.recheck || self.session.client.is_pinned()
        {
            return false;
        }
        self.session.tracked.unlink(&server.server.registry);
        true
    }

    /// Back to the runtime, on a task of its own: with the server it holds, if any, and
    /// where the lane left it. Called inside the runtime.
    pub(crate) async fn resumed(
        self: Box<Self>,
        server: Option<Box<LaneServer>>,
        resume: Option<TxResume>,
    ) {
        let LaneTxClient {
            conn,
            socket,
            session,
            cbuf,
            ..
        } = *self;
        let pool = conn.ctx().pool.clone();
        let held = server.and_then(|s| s.into_runtime(&pool));
        let Some(socket) = crate::park::to_runtime(socket) else {
            if let Some(server) = held {
                pool.release_now(server, false);
            }
            return;
        };
        let conn = conn.resume(socket, &session.tracked);
        let mut st = Box::new(TxClient::idle(session));
        st.cbuf = cbuf;
        st.assigned = held.is_some() && matches!(resume, Some(TxResume::After(_)));
        st.held = held;
        st.resume = resume.map(Box::new);
        // It earned the lane: it goes back as soon as it is idle again.
        st.transactions = u32::MAX;
        serve_transaction(conn, st).await;
    }
}

impl LaneServer {
    /// A server connection out of the runtime for the lane; back (in the runtime) when it
    /// cannot be (TLS).
    pub(crate) fn from_runtime(
        mut server: Box<ServerConnection>,
    ) -> std::result::Result<Box<Self>, Box<ServerConnection>> {
        let Some(tcp) = server.stream.detach() else {
            return Err(server);
        };
        match tcp.into_std() {
            Ok(socket) => Ok(Box::new(LaneServer {
                server,
                socket,
                flags: Default::default(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take a server connection out of the runtime for the transaction lane; closing it");
                Err(server)
            }
        }
    }

    /// Back in the runtime (None, counted closed, if the reactor refuses its socket).
    pub(crate) fn into_runtime(self, pool: &Pool) -> Option<Box<ServerConnection>> {
        let LaneServer {
            mut server, socket, ..
        } = self;
        match crate::park::to_runtime(socket) {
            Some(tcp) => {
                server.stream.attach(tcp);
                Some(server)
            }
            None => {
                pool.lane_close(server);
                None
            }
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub(crate) fn conn(&self) -> &ServerConnection {
        &self.server
    }

    /// Whether a cancel is on its way to this backend (it must not serve another client
    /// before it landed).
    pub(crate) fn cancel_in_flight(&self, ctx: &ClientContext) -> bool {
        ctx.cancels
            .cancel_in_flight(self.server.peer(), self.server.backend_pid)
    }

    /// Closes it (Terminate, then the socket) and gives its slot back.
    pub(crate) fn close(self, pool: &Pool) {
        use std::io::Write;
        let LaneServer { server, socket, .. } = self;
        let _ = (&socket).write(&[b'X', 0, 0, 0, 4]);
        pool.lane_close(server);
    }
}

/// Hands an idle transaction-mode client to the transaction lane: its task ends here.
fn to_tx_lane(conn: ClientConn, st: TxClient) {
    let ClientConn {
        socket,
        peer,
        require_password,
        _slot: slot,
        ..
    } = conn;
    let ClientStream::Plain(socket) = socket else {
        return;
    };
    let Some(lane) = slot.ctx().tx_lane.clone() else {
        return;
    };
    match socket.into_std() {
        Ok(socket) => lane.enter(Box::new(LaneTxClient {
            conn: ParkedConn {
                require_password,
                slot,
            },
            socket,
            session: st.into_idle(),
            cbuf: BytesMut::new(),
            watch: ReadWatch::default(),
            flags: Default::default(),
        })),
        Err(e) => tracing::warn!(
            %peer,
            error = %e,
            "cannot take an idle client's socket out of the runtime for the transaction lane; closing it (if this repeats, turn the lane off with --transaction-lane false)"
        ),
    }
}

/// What the startup phase produced.
enum Startup {
    /// A session to serve, with any bytes the client sent behind its startup packet.
    Session(StartupParams, BytesMut),
    /// Done already (cancel request, refused version).
    Done,
}

/// An accepted client connection and what serving it needs, in one allocation: the task of
/// an idle client keeps a pointer to it and the state of the session kind it is in.
pub struct ClientConn {
    socket: ClientStream,
    out: BytesMut,
    peer: SocketAddr,
    require_password: bool,
    ctx: Arc<ClientContext>,
    shutdown: Shutdown,
    /// The client's place under --max-clients, given back when the connection is dropped.
    _slot: crate::listener::ClientSlot,
}

impl ClientConn {
    pub fn new(
        socket: TcpStream,
        peer: SocketAddr,
        require_password: bool,
        ctx: Arc<ClientContext>,
        shutdown: Shutdown,
        slot: crate::listener::ClientSlot,
    ) -> Box<Self> {
        let _ = socket.set_nodelay(true);
        Box::new(ClientConn {
            socket: ClientStream::Plain(socket),
            out: BytesMut::with_capacity(1024),
            peer,
            require_password,
            ctx,
            shutdown,
            _slot: slot,
        })
    }
}

/// Serves one client connection to its end. Errors are answered to the client where the
/// protocol allows and logged at debug level; nothing here can affect another client.
pub async fn serve_client(mut conn: Box<ClientConn>) {
    // Each phase is boxed and gone once it is over: what an idle client's task keeps is the
    // connection and the state of the session kind it is in. The task's own future holds
    // little more than `c` (its size decides the task's allocation: 384 bytes at 176 bytes
    // of future, 256 below about 150).
    let c = &mut *conn;
    let ctx: &ClientContext = &c.ctx;
    let opened = Box::pin(open(
        &mut c.socket,
        c.peer,
        c.require_password,
        ctx,
        &mut c.out,
        &mut c.shutdown,
    ))
    .await;
    // A task of its own, the login's ends: an idle client keeps one small future.
    match opened {
        Opened::Done => {}
        Opened::Failed(e) => Box::pin(end_with_error(&mut c.socket, &mut c.out, c.peer, *e)).await,
        Opened::Session(st) => drop(tokio::spawn(serve_session(conn, st))),
        Opened::Transaction(st) => drop(tokio::spawn(serve_transaction(conn, st))),
    }
}

/// Serves a session-mode client from its login (or from where it was parked) until it ends
/// or is parked again.
async fn serve_session(mut conn: Box<ClientConn>, st: Box<SessClient>) {
    let c = &mut *conn;
    let served = Box::pin(session(&mut c.socket, c.peer, &c.ctx, st, &mut c.out)).await;
    match served {
        Ok(SessExit::Done) => {}
        Ok(SessExit::Park(st, epoch)) => park(*conn, ToPark::Session(st, epoch)),
        Ok(SessExit::Lane(st, epoch)) => park(*conn, ToPark::Lane(st, epoch)),
        Err(e) => Box::pin(end_with_error(&mut c.socket, &mut c.out, c.peer, e)).await,
    }
}

/// Serves a transaction-mode client from its login (or from where it was parked) until it
/// ends or is parked again.
async fn serve_transaction(mut conn: Box<ClientConn>, st: Box<TxClient>) {
    let c = &mut *conn;
    let served = Box::pin(transaction_session(
        &mut c.socket,
        &c.ctx,
        st,
        &mut c.out,
        &mut c.shutdown,
    ))
    .await;
    match served {
        Ok(TxExit::Done) => {}
        Ok(TxExit::Park(st)) => park(*conn, ToPark::Transaction(st)),
        Ok(TxExit::Lane(st)) => to_tx_lane(*conn, *st),
        Err(e) => Box::pin(end_with_error(&mut c.socket, &mut c.out, c.peer, e)).await,
    }
}

/// A client's idle accounting when it may be parked: parking is on and its socket is
/// plaintext (a TLS client's socket lives inside its TLS stream). Boxed: for a TLS client or
/// with parking off (`--client-park-after-ms 0`) it is 8 bytes of every idle client's future.
fn idle_wait(ctx: &ClientContext, socket: &ClientStream) -> Option<Box<crate::park::IdleWait>> {
    match (&ctx.parker, socket) {
        (Some(parker), ClientStream::Plain(_)) => Some(Box::new(parker.idle_wait())),
        _ => None,
    }
}

/// What goes to the parker, its sockets still in the runtime's reactor.
enum ToPark {
    Transaction(Box<TxClient>),
    /// A session, with the parker's epoch as it last looked for a rotation.
    Session(Box<SessClient>, u64),
    /// A session for the lane, with the lane's epoch as it last looked for a rotation.
    Lane(Box<SessClient>, u64),
}

/// Hands an idle client to the parker: its task ends here, and its sockets (a session's
/// server socket too) leave the runtime's reactor until either side speaks again (or, for a
/// session, a rotation resumes every parked one: see [`crate::park::Parker::park`]).
fn park(conn: ClientConn, what: ToPark) {
    // Nothing is written while parked: the reply buffer goes.
    let ClientConn {
        socket,
        out: _,
        peer,
        require_password,
        ctx: _,
        shutdown: _,
        _slot: slot,
    } = conn;
    // Clients are offered parking only with a parker and plaintext sockets.
    let ClientStream::Plain(socket) = socket else {
        return;
    };
    let conn = ParkedConn {
        require_password,
        slot,
    };
    let parked = || -> std::io::Result<()> {
        let parker = conn.ctx().parker.as_ref();
        match (parker, what) {
            (Some(ClientParker::Transaction(parker)), ToPark::Transaction(st)) => {
                let parker = parker.clone();
                let socket = socket.into_std()?;
                let epoch = parker.epoch();
                let session = st.into_idle();
                let parked = ParkedTransaction {
                    conn,
                    socket,
                    session,
                };
                parker.park(parked, epoch);
            }
            (Some(ClientParker::Session(parker)), ToPark::Session(st, epoch)) => {
                let parker = parker.clone();
                parker.park(out_of_runtime(conn, socket, st)?, epoch);
            }
            (_, ToPark::Lane(st, epoch)) => {
                let lane = conn
                    .ctx()
                    .lane
                    .clone()
                    .ok_or_else(|| std::io::Error::other("no session lane"))?;
                lane.enter(Box::new(out_of_runtime(conn, socket, st)?), epoch);
            }
            // Parking is offered by the parker of the client's own pool mode only.
            _ => return Err(std::io::Error::other("no parker for this pool mode")),
        }
        Ok(())
    };
    // Only if the reactor cannot let go of a socket: the client is closed by then (a
    // session's server too, its pool slot given back).
    if let Err(e) = parked() {
        tracing::warn!(
            %peer,
            error = %e,
            "cannot take an idle client's socket out of the runtime to park it; closing it (if this repeats, turn parking off with --client-park-after-ms 0)"
        );
    }
}

/// A session's sockets out of the runtime's reactor, with what its task resumes with.
fn out_of_runtime(
    conn: ParkedConn,
    socket: TcpStream,
    mut st: Box<SessClient>,
) -> std::io::Result<ParkedSession> {
    let socket = socket.into_std()?;
    let server = st
        .server
        .stream
        .detach()
        .ok_or_else(|| std::io::Error::other("the server connection is not plaintext"))?;
    let server = server.into_std()?;
    Ok(ParkedSession {
        conn,
        socket,
        server,
        st: *st,
    })
}

/// A session ended with an error: log it and tell the client where the protocol allows.
async fn end_with_error(
    socket: &mut ClientStream,
    out: &mut BytesMut,
    peer: SocketAddr,
    e: ProxyError,
) {
    tracing::debug!(%peer, error = %e, "client session ended with an error");
    send_error(socket, out, &e).await;
}

/// Where a client's login left it.
enum Opened {
    /// Served already (cancel request, refused login, admin console).
    Done,
    /// The login could not get the client a server connection (answered by the caller).
    Failed(Box<ProxyError>),
    Session(Box<SessClient>),
    Transaction(Box<TxClient>),
}

/// The client's startup and login, up to its first ReadyForQuery.
async fn open(
    socket: &mut ClientStream,
    peer: SocketAddr,
    require_password: bool,
    ctx: &ClientContext,
    out: &mut BytesMut,
    shutdown: &mut Shutdown,
) -> Opened {
    let login = tokio::time::timeout(
        ctx.login_timeout,
        Box::pin(login(socket, require_password, ctx, out)),
    )
    .await;
    let (params, early) = match login {
        Ok(Ok(Startup::Session(params, early))) => (params, early),
        Ok(Ok(Startup::Done)) => return Opened::Done,
        Ok(Err(e)) => {
            ctx.stats.client_login_failures.increment(1);
            tracing::debug!(%peer, error = %e, "client login failed");
            Box::pin(send_error(socket, out, &e)).await;
            return Opened::Done;
        }
        Err(_) => {
            ctx.stats.client_login_failures.increment(1);
            tracing::debug!(%peer, "client did not finish its startup in time");
            let e = ProxyError::Timeout("waiting for the client's startup packet");
            Box::pin(send_error(socket, out, &e)).await;
            return Opened::Done;
        }
    };
    if crate::admin::is_admin_database(&params) {
        Box::pin(crate::admin::serve(socket, peer, params, ctx)).await;
        return Opened::Done;
    }
    let opened = if ctx.transaction_mode {
        Box::pin(transaction_login(
            socket, peer, params, early, ctx, out, shutdown,
        ))
        .await
        .map(Opened::Transaction)
    } else {
        Box::pin(session_login(
            socket, peer, params, early, ctx, out, shutdown,
        ))
        .await
        .map(Opened::Session)
    };
    opened.unwrap_or_else(|e| Opened::Failed(Box::new(e)))
}

async fn send_error(socket: &mut ClientStream, out: &mut BytesMut, e: &ProxyError) {
    out.clear();
    match e {
        // Relay the server's own words when it refused the login.
        ProxyError::ServerRejected { fields, .. } => backend::error_response(
            out,
            "FATAL",
            &fields.code,
            &fields.message,
            fields.detail.as_deref(),
            fields.hint.as_deref(),
        ),
        ProxyError::Io(_) => return,
        other => backend::fatal(out, other.sqlstate(), &format!("dbproxy: {other}")),
    }
    let sent = tokio::time::timeout(Duration::from_secs(5), async {
        socket.write_all(out).await?;
        socket.flush().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        linger(socket).await;
    }
}

/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(1);

/// Closes the write side, then reads (and drops) what the client still sends until it
/// closes too, for at most [`LINGER`]. Closing with unread bytes from the client would make
/// the kernel answer with a reset, and the client could lose the error just sent.
async fn linger(socket: &mut ClientStream) {
    let _ = tokio::time::timeout(LINGER, async {
        socket.shutdown().await?;
        let mut scratch = [0u8; 1024];
        while socket.read(&mut scratch).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Startup packet(s) and client authentication.
async fn login(
    socket: &mut ClientStream,
    require_password: bool,
    ctx: &ClientContext,
    out: &mut BytesMut,
) -> Result<Startup> {
    let mut buf = BytesMut::with_capacity(256);
    // At most one SSLRequest and one GSSENCRequest precede the StartupMessage.
    for _ in 0..3 {
        let body = read_startup_packet(socket, &mut buf).await?;
        match parse_startup(body)? {
            request @ (StartupRequest::Ssl | StartupRequest::GssEnc) => {
                if !buf.is_empty() {
                    // Bytes that arrived with the request would be read as plaintext after a
                    // TLS handshake the client thinks happened (CVE-2021-23222 style).
                    return Err(ProxyError::Protocol(
                        "data received after an encryption request".into(),
                    ));
                }
                let acceptor = match (&request, &ctx.client_tls.acceptor) {
                    (StartupRequest::Ssl, Some(acceptor)) if !socket.is_tls() => acceptor,
                    _ => {
                        socket.write_all(b"N").await?;
                        socket.flush().await?;
                        continue;
                    }
                };
                socket.write_all(b"S").await?;
                socket.flush().await?;
                let ClientStream::Plain(tcp) = std::mem::replace(socket, ClientStream::Closed)
                else {
                    return Err(ProxyError::Protocol("TLS requested twice".into()));
                };
                let tls = acceptor.acceptor().accept(tcp).await.map_err(|e| {
                    ProxyError::Protocol(format!("client TLS handshake failed: {e}"))
                })?;
                *socket = ClientStream::Tls(Box::new(tls));
            }
            StartupRequest::Cancel { pid, key } => {
                if let Some((target, _in_flight)) =
                    ctx.cancels.lookup(pid, key, &ctx.pool.stats().registry)
                    && let Err(e) = send_cancel(&target.route, target.pid, target.key).await
                {
                    tracing::debug!(backend_pid = target.pid, error = %e, "forwarding a cancel request failed");
                }
                return Ok(Startup::Done);
            }
            StartupRequest::UnsupportedVersion { major, minor } => {
                return Err(ProxyError::Protocol(format!(
                    "unsupported frontend protocol {major}.{minor}: dbproxy supports 3.0"
                )));
            }
            StartupRequest::Startup { minor, params } => {
                if ctx.client_tls.mode == ClientTlsMode::Require && !socket.is_tls() {
                    return Err(ProxyError::ServerRejected {
                        host: "dbproxy".into(),
                        port: 0,
                        user: params.user.clone().unwrap_or_default(),
                        fields: Box::new(crate::error::ServerErrorFields {
                            severity: "FATAL".into(),
                            code: "28000".into(),
                            message: "dbproxy requires TLS on this listener (--client-tls require)"
                                .into(),
                            detail: None,
                            hint: Some("connect with sslmode=require or stricter".into()),
                        }),
                    });
                }
                if minor > 0 || !params.protocol_options.is_empty() {
                    out.clear();
                    backend::negotiate_protocol_version(out, 0, &params.protocol_options);
                    socket.write_all(out).await?;
                    socket.flush().await?;
                }
                if let Some((_, v)) = params.forwarded.iter().find(|(k, _)| k == "replication")
                    && !matches!(
                        v.to_ascii_lowercase().as_str(),
                        "false" | "off" | "no" | "0"
                    )
                {
                    return Err(ProxyError::Protocol(
                        "replication connections are not supported through dbproxy; connect to the server directly".into(),
                    ));
                }
                if require_password {
                    authenticate(
                        socket,
                        &mut buf,
                        ctx,
                        out,
                        params.user.as_deref().unwrap_or(""),
                    )
                    .await?;
                }
                return Ok(Startup::Session(params, buf));
            }
        }
    }
    Err(ProxyError::Protocol("too many encryption requests".into()))
}

/// SCRAM-SHA-256 against `--client-password-file`.
async fn authenticate(
    socket: &mut ClientStream,
    buf: &mut BytesMut,
    ctx: &ClientContext,
    out: &mut BytesMut,
    user: &str,
) -> Result<()> {
    let failed = || ProxyError::ServerRejected {
        host: "dbproxy".into(),
        port: 0,
        user: user.to_owned(),
        fields: Box::new(crate::error::ServerErrorFields {
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: format!("password authentication failed for user \"{user}\""),
            detail: None,
            hint: None,
        }),
    };
    let Some(verifier) = ctx.scram.as_ref() else {
        return Err(ProxyError::Config(
            "this listener requires a client password but none is configured".into(),
        ));
    };
    let mut exchange = verifier.exchange();
    out.clear();
    backend::authentication_sasl(out);
    socket.write_all(out).await?;
    socket.flush().await?;
    let (tag, body) = read_message(socket, buf, MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(failed());
    }
    let (mechanism, data) = parse_sasl_initial_response(body)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(ProxyError::Protocol(format!(
            "SASL mechanism {mechanism:?} is not offered"
        )));
    }
    let server_first = exchange.server_first(&data)?;
    out.clear();
    backend::authentication_sasl_continue(out, &server_first);
    socket.write_all(out).await?;
    socket.flush().await?;
    let (tag, body) = read_message(socket, buf, MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(failed());
    }
    match exchange.server_final(&body)? {
        Some(server_final) => {
            out.clear();
            backend::authentication_sasl_final(out, &server_final);
            socket.write_all(out).await?;
            socket.flush().await?;
            Ok(())
        }
        None => Err(failed()),
    }
}

/// The client leaves `server`: cancels for it are no longer routed there, and any already on
/// their way land before the server may serve someone else. False when one did not: the
/// server must be closed, not reused.
#[must_use]
async fn unassign(
    ctx: &ClientContext,
    tracked: &crate::stats::ClientGuard,
    server: &ServerConnection,
) -> bool {
    tracked.unlink(&server.registry);
    ctx.cancels
        .wait_no_cancel_in_flight(server.peer(), server.backend_pid)
        .await
}

/// AuthenticationOk, the server's parameters, our cancel key and ReadyForQuery.
async fn replay_login(
    socket: &mut ClientStream,
    out: &mut BytesMut,
    parameter_status: &[(String, String)],
    cancel_key: &CancelKey,
) -> std::io::Result<()> {
    out.clear();
    backend::authentication_ok(out);
    for (name, value) in parameter_status {
        backend::parameter_status(out, name, value);
    }
    backend::backend_key_data(out, cancel_key.pid, cancel_key.key);
    backend::ready_for_query(out, b'I');
    socket.write_all(out).await?;
    socket.flush().await
}

/// What a session-mode client holds while it is served. One allocation: the task's future
/// stays small while the client is idle.
struct SessClient {
    tracked: crate::stats::ClientGuard,
    slot: crate::pool::SlotGuard,
    cancel_key: CancelKey,
    server: ServerConnection,
    /// Bytes the client sent right behind its startup packet.
    initial: BytesMut,
    /// Custom settings the client's statements mentioned, which a move asks the server for.
    custom: Option<Box<crate::custom::SessionCustom>>,
    /// Where forwarding stood when the session lane gave the session back.
    resume: Option<Box<crate::proxy::Carry>>,
    /// The session ran `--session-lane-after` transactions or fell idle: it goes to the
    /// lane at its safe points.
    lane_earned: bool,
}

/// Session mode, login: gets a server and replays the login to the client.
async fn session_login(
    socket: &mut ClientStream,
    peer: SocketAddr,
    params: StartupParams,
    early: BytesMut,
    ctx: &ClientContext,
    out: &mut BytesMut,
    shutdown: &mut Shutdown,
) -> Result<Box<SessClient>> {
    // Usually empty: release the login buffer (4 KiB) instead of carrying it through the
    // session. The explicit drop matters: a shadowed parameter lives to the end of the
    // function, and an empty `BytesMut` split from the buffer still owns it.
    let early = if early.is_empty() {
        drop(early);
        BytesMut::new()
    } else {
        early
    };
    let tracked = crate::admin::track_client(ctx, peer, &params);
    let server_params = ctx.pool.intern_params(params.forwarded);
    let server = tokio::select! {
        // Boxed: opening a server connection (TCP, SCRAM, SET ROLE) needs kilobytes of
        // future state that would otherwise stay in every idle session's task.
        s = Box::pin(ctx.pool.acquire(&server_params, ctx.pool_timeout)) => s?,
        _ = shutdown.recv() => return Err(ProxyError::ShuttingDown),
    };
    // Only the pool needed these; the server holds its own copy (moves use that).
    drop(server_params);
    // If this task panics or is dropped before the release below, the slot is given back.
    let slot = ctx.pool.owned_slot_guard();
    let cancel_key = ctx.cancels.register(tracked.id());
    tracked.link(&server.registry);

    if let Err(e) = Box::pin(replay_login(
        socket,
        out,
        &server.parameter_status,
        &cancel_key,
    ))
    .await
    {
        let landed = Box::pin(unassign(ctx, &tracked, &server)).await;
        slot.disarm();
        Box::pin(ctx.pool.release(server, landed)).await;
        return Err(e.into());
    }
    // Nothing is kept per idle session: the forwarding loop reads into stack buffers.
    *out = BytesMut::new();
    Ok(Box::new(SessClient {
        tracked,
        slot,
        cancel_key,
        server: *server,
        initial: early,
        custom: None,
        resume: None,
        lane_earned: false,
    }))
}

/// Session mode: forwards, moves the session to a new server when a rotation asks for it,
/// and releases. While the session forwards, this future is the forwarding loop plus a few
/// references: everything else happens in boxed futures that are gone once done.
async fn session(
    socket: &mut ClientStream,
    peer: SocketAddr,
    ctx: &ClientContext,
    mut st: Box<SessClient>,
    out: &mut BytesMut,
) -> Result<SessExit> {
    let mut moves = Moves {
        signal: (ctx.migrate != MigratePolicy::Never).then(|| {
            MoveSignal::new(
                ctx.pool.credentials(),
                ctx.migrate,
                ctx.migration_timeout,
                &st.server,
            )
        }),
        pins: Vec::new(),
    };
    // Only plaintext on both sides parks: the server's stream is checked at each turn (a
    // move may change it), the client's here.
    let mut idle_wait = idle_wait(ctx, socket);
    let ended = loop {
        // At a safe point here (after the login, a move, or an idle spell), unless the lane
        // just gave the session back: a plaintext session that earned the lane goes there
        // when no rotation wants it moved; one that did not yet is counted towards it.
        let mut lane_after = 0;
        if let Some(lane) = ctx.lane.as_ref().filter(|l| l.is_open())
            && matches!(
                (&*socket, &st.server.stream),
                (ClientStream::Plain(_), PgStream::Plain(_))
            )
        {
            // Read before the session's last look for a rotation, as for the parker.
            let epoch = lane.epoch();
            if moves.signal.as_ref().is_none_or(MoveSignal::settled) {
                let earned = st.lane_earned || ctx.lane_after == 0;
                if earned && st.resume.is_none() {
                    return Ok(SessExit::Lane(st, epoch));
                }
                lane_after = if earned { 1 } else { ctx.lane_after };
            }
        }
        let SessClient {
            server,
            initial,
            custom,
            resume,
            ..
        } = &mut *st;
        // Plaintext on both sides keeps the TcpStream fast path; TLS on either side goes
        // through the stream enums. Both loops are the same code and the same size.
        let outcome = match (&mut *socket, &mut server.stream) {
            (ClientStream::Plain(client), PgStream::Plain(backend)) => {
                run_session(
                    client,
                    backend,
                    ctx.max_client_message,
                    initial,
                    resume.take(),
                    lane_after,
                    moves.signal.as_mut(),
                    idle_wait.as_deref_mut(),
                    custom,
                )
                .await
            }
            (client, backend) => {
                run_session(
                    client,
                    backend,
                    ctx.max_client_message,
                    initial,
                    resume.take(),
                    lane_after,
                    moves.signal.as_mut(),
                    None,
                    custom,
                )
                .await
            }
        };
        *initial = BytesMut::new();
        if matches!(outcome.end, SessionEnd::Lane)
            || (outcome.end == SessionEnd::Park && ctx.lane.is_some())
        {
            // Busy or idle long enough to be worth the lane's entry and exit.
            st.lane_earned = true;
            continue;
        }
        if outcome.end == SessionEnd::Park {
            if let Some(parker) = &ctx.parker {
                // Read before the session's last look for a rotation: one published after
                // that look resumes the session as soon as it is parked.
                let epoch = parker.epoch();
                if !moves
                    .signal
                    .as_ref()
                    .is_some_and(MoveSignal::rotated_unseen)
                {
                    return Ok(SessExit::Park(st, epoch));
                }
            }
            continue;
        }
        if let ControlFlow::Break(ended) = Box::pin(after_forwarding(
            socket, peer, ctx, &mut st, out, &mut moves, outcome,
        ))
        .await
        {
            break ended;
        }
    };
    Box::pin(finish_session(ctx, peer, st, ended))
        .await
        .map(|()| SessExit::Done)
}

/// How a session-mode session left its task.
enum SessExit {
    /// Over: the server went back to the pool.
    Done,
    /// Idle at a safe point on both sides: the client and its server go to the parker, with
    /// the parker's epoch as the session last saw it.
    Park(Box<SessClient>, u64),
    /// At a safe point, plaintext on both sides: the client and its server go to the
    /// session lane, with the lane's epoch as the session last saw it.
    Lane(Box<SessClient>, u64),
}

/// A session's migration state: the rotation signal and what pinned it last time.
struct Moves {
    signal: Option<MoveSignal>,
    pins: Vec<&'static str>,
}

/// The forwarding loop stopped: move the session when it stopped for that (then forward
/// again), or end it.
async fn after_forwarding(
    socket: &mut ClientStream,
    peer: SocketAddr,
    ctx: &ClientContext,
    st: &mut SessClient,
    out: &mut BytesMut,
    moves: &mut Moves,
    outcome: crate::proxy::SessionOutcome,
) -> ControlFlow<Result<crate::proxy::SessionOutcome>> {
    let SessClient {
        tracked,
        server,
        custom,
        ..
    } = st;
    let custom = crate::custom::SessionCustom::names(custom);
    let Moves { signal, pins } = moves;
    match outcome.end {
        SessionEnd::SafePoint => {
            let Some(sig) = signal.as_mut() else {
                return ControlFlow::Break(Ok(outcome));
            };
            match Box::pin(try_move(ctx, server, custom, socket, out)).await {
                Ok(Moved::To(new)) => {
                    Box::pin(adopt(ctx, peer, tracked, server, new)).await;
                    sig.rebase(server);
                    pins.clear();
                }
                Ok(Moved::Pinned(why)) => {
                    if pins.is_empty() {
                        tracing::info!(client = tracked.id(), %peer, reason = why.join(", "), "session cannot move yet; it keeps its server until that state is gone or the migration timeout");
                    }
                    *pins = why;
                    sig.retry_later();
                }
                Err(e) => {
                    tracing::warn!(client = tracked.id(), %peer, error = %e, "moving a session failed; it keeps its server and tries again");
                    metrics::counter!("dbproxy_migrations_total", "result" => "retry").increment(1);
                    sig.retry_later();
                }
            }
            ControlFlow::Continue(())
        }
        SessionEnd::Deadline => {
            if outcome.server_clean
                && let Ok(Moved::To(new)) =
                    Box::pin(try_move(ctx, server, custom, socket, out)).await
            {
                // Idle and no longer pinned at the last moment: move after all.
                Box::pin(adopt(ctx, peer, tracked, server, new)).await;
                if let Some(sig) = signal.as_mut() {
                    sig.rebase(server);
                }
                pins.clear();
                return ControlFlow::Continue(());
            }
            if !outcome.server_clean {
                cancel_running(server);
            }
            metrics::counter!("dbproxy_migrations_total", "result" => "closed").increment(1);
            tracing::warn!(client = tracked.id(), %peer, reason = pins.join(", "), "closing a session that could not move within the migration timeout");
            ControlFlow::Break(Err(ProxyError::Unmovable(crate::migrate::pinned_message(
                pins,
                ctx.migration_timeout,
            ))))
        }
        _ => ControlFlow::Break(Ok(outcome)),
    }
}

/// Cancels whatever a backend about to be closed is still running: a query cut at the end
/// of the migration grace would otherwise run on the old server until it ends by itself.
fn cancel_running(server: &ServerConnection) {
    let (route, pid, key) = (
        server.cancel_route.clone(),
        server.backend_pid,
        server.backend_key,
    );
    tokio::spawn(async move {
        if let Err(e) = crate::server::send_cancel(&route, pid, key).await {
            tracing::debug!(backend_pid = pid, error = %e, "canceling a cut query failed");
        }
    });
}

/// The session moves to `new`: cancels in flight for the old server land first, then
/// cancels go to the new one, and the old server goes back to the pool.
async fn adopt(
    ctx: &ClientContext,
    peer: SocketAddr,
    tracked: &crate::stats::ClientGuard,
    server: &mut ServerConnection,
    new: Box<ServerConnection>,
) {
    let old = std::mem::replace(server, *new);
    let landed = unassign(ctx, tracked, &old).await;
    tracked.link(&server.registry);
    tracing::info!(client = tracked.id(), %peer, from = %old.target, to = %server.target, "session moved to a new server connection");
    metrics::counter!("dbproxy_migrations_total", "result" => "moved").increment(1);
    ctx.pool.release(Box::new(old), landed).await;
}

/// The session is over: its server goes back to the pool (reset and reused when clean).
async fn finish_session(
    ctx: &ClientContext,
    peer: SocketAddr,
    st: Box<SessClient>,
    ended: Result<crate::proxy::SessionOutcome>,
) -> Result<()> {
    let SessClient {
        server,
        slot,
        cancel_key,
        tracked,
        ..
    } = *st;
    // Unregister first, then let cancels already on their way land: a cancel must never
    // reach the backend once it may serve someone else.
    let landed = unassign(ctx, &tracked, &server).await;
    drop(cancel_key);
    slot.disarm();
    let result = match ended {
        Ok(outcome) => {
            tracing::trace!(client = tracked.id(), %peer, end = ?outcome.end, clean = outcome.server_clean, "session ended");
            ctx.pool
                .release(Box::new(server), outcome.server_clean && landed)
                .await;
            session_result(outcome.end, ctx)
        }
        Err(e) => {
            ctx.pool.release(Box::new(server), false).await;
            Err(e)
        }
    };
    drop(tracked);
    result
}

fn session_result(end: SessionEnd, ctx: &ClientContext) -> Result<()> {
    match end {
        SessionEnd::ClientMessageTooLarge(len) => Err(ProxyError::Protocol(format!(
            "client message of {len} bytes exceeds the limit of {} bytes (--max-client-message)",
            ctx.max_client_message
        ))),
        SessionEnd::ClientProtocol(e) => Err(ProxyError::Protocol(e)),
        _ => Ok(()),
    }
}

enum Moved {
    To(Box<ServerConnection>),
    Pinned(Vec<&'static str>),
}

/// At a safe point: asks the old server what the session holds; unless something pins it,
/// gets a server of the current generation, restores settings and prepared statements there
/// and tells the client about reported parameters that changed.
async fn try_move(
    ctx: &ClientContext,
    server: &mut ServerConnection,
    custom: &[String],
    socket: &mut ClientStream,
    out: &mut BytesMut,
) -> Result<Moved> {
    let params = server.params.clone();
    let snap = crate::migrate::snapshot(server, true, custom).await?;
    if !snap.pins.is_empty() {
        return Ok(Moved::Pinned(snap.pins));
    }
    let mut new = ctx.pool.acquire_for_move(&params, ctx.pool_timeout).await?;
    if let Err(e) = crate::migrate::restore(&mut new, &snap).await {
        ctx.pool.release(new, false).await;
        return Err(e);
    }
    let changes = crate::migrate::reported_changes(&snap.reported, &new.parameter_status);
    if !changes.is_empty() {
        out.clear();
        for (name, value) in &changes {
            backend::parameter_status(out, name, value);
        }
        let written = async {
            socket.write_all(out).await?;
            socket.flush().await
        }
        .await;
        *out = BytesMut::new();
        if let Err(e) = written {
            ctx.pool.release(new, true).await;
            return Err(e.into());
        }
    }
    Ok(Moved::To(new))
}

/// How often a transaction-mode client tries another server connection when bringing one in
/// line with its session was canceled on the server.
const SYNC_ATTEMPTS: u32 = 3;

/// What dbproxy keeps for a transaction-mode client between its transactions. One
/// allocation: the task's future stays small while the client is idle.
struct TxClient {
    session: TxSession,
    /// Bytes from the client not yet forwarded.
    cbuf: BytesMut,
    /// The server connection while the client has one (boxed: idle clients have none).
    held: Option<Box<ServerConnection>>,
    /// Whether cancels are routed to `held`.
    assigned: bool,
    /// Rotations, while state pins the client to its server (boxed: rarely there).
    signal: Option<Box<MoveSignal>>,
    sync_failures: u32,
    /// Where the transaction lane gave the client back (boxed: rarely there).
    resume: Option<Box<TxResume>>,
    /// Transactions run on the runtime, up to `--transaction-lane-after` (`u32::MAX` once
    /// the client has been in the transaction lane).
    transactions: u32,
}

/// Why the transaction lane gave a client back, when its next step is not the usual one.
pub(crate) enum TxResume {
    /// A round ended where the runtime decides (an error, a pinned session, a change to look
    /// at): the client still holds the round's server.
    After(crate::txn::RoundOutcome),
    /// Getting a server failed.
    Failed(ProxyError),
    /// A reply dbproxy gave without a server, not all written yet.
    Reply(BytesMut),
}

/// What a transaction-mode client keeps between transactions, parked too: who it is and its
/// session (the rest of [`TxClient`] is empty then).
struct TxSession {
    tracked: crate::stats::ClientGuard,
    server_params: crate::server::ServerParams,
    /// Kept for its registration: the client's cancels are routed while it lives.
    _cancel_key: CancelKey,
    client: ClientSession,
}

impl TxClient {
    /// A client between transactions.
    fn idle(session: TxSession) -> Self {
        TxClient {
            session,
            cbuf: BytesMut::new(),
            held: None,
            assigned: false,
            signal: None,
            sync_failures: 0,
            resume: None,
            transactions: 0,
        }
    }

    /// What an idle client keeps (it holds no server and has no bytes to forward).
    fn into_idle(self) -> TxSession {
        debug_assert!(
            self.held.is_none()
                && self.cbuf.is_empty()
                && self.signal.is_none()
                && self.resume.is_none()
        );
        self.session
    }
}

/// Transaction pooling, login: greets the client with what a server with its parameters
/// said at login (only the first client of a generation waits for a server to learn it).
async fn transaction_login(
    socket: &mut ClientStream,
    peer: SocketAddr,
    params: StartupParams,
    early: BytesMut,
    ctx: &ClientContext,
    out: &mut BytesMut,
    shutdown: &mut Shutdown,
) -> Result<Box<TxClient>> {
    let tracked = crate::admin::track_client(ctx, peer, &params);
    let server_params = ctx.pool.intern_params(params.forwarded);
    let cancel_key = ctx.cancels.register(tracked.id());
    let (welcome, first) = match ctx.pool.welcome(&server_params) {
        Some(welcome) => (welcome.to_vec(), None),
        None => {
            let first = tokio::select! {
                s = Box::pin(ctx.pool.acquire(&server_params, ctx.pool_timeout)) => s?,
                _ = shutdown.recv() => return Err(ProxyError::ShuttingDown),
            };
            (first.parameter_status.to_vec(), Some(first))
        }
    };
    let replayed = Box::pin(replay_login(socket, out, &welcome, &cancel_key)).await;
    *out = BytesMut::new();
    if let Err(e) = replayed {
        if let Some(first) = first {
            Box::pin(ctx.pool.release_with(first, true, false)).await;
        }
        return Err(e.into());
    }
    // Logged in, holding no server: active in pgbouncer's words (a transaction-mode client
    // between transactions stays so; linking a server sets it again).
    tracked.set_active();
    Ok(Box::new(TxClient {
        session: TxSession {
            tracked,
            server_params,
            _cancel_key: cancel_key,
            client: ClientSession::new(crate::server::share_parameter_status(welcome)),
        },
        cbuf: early,
        held: first,
        assigned: false,
        signal: None,
        sync_failures: 0,
        resume: None,
        transactions: 0,
    }))
}

/// Whether the transaction lane takes idle client `st` now: the lane is open, the client's
/// socket is plaintext and nothing pins it to a server.
#[inline]
fn tx_lane_takes(ctx: &ClientContext, socket: &ClientStream, st: &TxClient) -> bool {
    ctx.tx_lane.as_ref().is_some_and(|lane| lane.is_open())
        && matches!(socket, ClientStream::Plain(_))
        && st.signal.is_none()
        && !st.session.client.is_pinned()
}

/// The largest request buffer an idle transaction-mode client keeps (bytes).
const KEEP_IDLE_REQUEST_BUFFER: usize = 512;

/// Transaction pooling: a server per transaction (or for as long as state pins the client to
/// it), the session itself kept by dbproxy in between.
///
/// Between transactions an idle client waits here, in a future of a few dozen bytes; the
/// state of a transaction (server assignment, forwarding, release) lives in a future boxed
/// per step and gone while the client is idle.
async fn transaction_session(
    socket: &mut ClientStream,
    ctx: &ClientContext,
    mut st: Box<TxClient>,
    out: &mut BytesMut,
    shutdown: &mut Shutdown,
) -> Result<TxExit> {
    // One wait for the whole session: registered once, then a flag check per poll.
    let mut stop = shutdown.recv();
    let mut idle_wait = idle_wait(ctx, socket);
    // Whether the client's read waits registered: set by a round's last read, so the idle
    // wait after the round does not poll the socket again while nothing arrived.
    let mut watch = ReadWatch::default();
    loop {
        if st.held.is_none() && st.cbuf.is_empty() {
            // An idle client keeps a small request buffer (the next request is read into a
            // stack buffer and copied into it): reusing it saves an allocation, a free and a
            // growth per transaction, about 230 instructions. A big one goes, and a parked
            // client keeps none.
            if st.cbuf.capacity() > KEEP_IDLE_REQUEST_BUFFER {
                st.cbuf = BytesMut::new();
            }
            if st.transactions >= ctx.tx_lane_after && tx_lane_takes(ctx, socket, &st) {
                return Ok(TxExit::Lane(st));
            }
            // Idle from now (a long transaction does not count as silence).
            if let Some(wait) = idle_wait.as_mut() {
                wait.quiet_from_now();
            }
            let idle = std::future::poll_fn(|cx| {
                st.poll_idle(socket, &mut stop, idle_wait.as_deref_mut(), &mut watch, cx)
            })
            .await;
            match idle {
                Idle::Read(Ok(0) | Err(_)) => return Ok(TxExit::Done),
                Idle::Read(Ok(n)) => crate::proxy::count_client_bytes(n),
                Idle::Stop => return Err(ProxyError::ShuttingDown),
                // Silent for --client-park-after-ms before --transaction-lane-after
                // transactions: the lane, if it takes the client, rather than the parker.
                Idle::Park if tx_lane_takes(ctx, socket, &st) => {
                    st.transactions = u32::MAX;
                    return Ok(TxExit::Lane(st));
                }
                Idle::Park => return Ok(TxExit::Park(st)),
            }
            if let Some(wait) = idle_wait.as_mut() {
                wait.spoke();
            }
        }
        let step = Box::pin(transaction_step(
            socket, ctx, &mut st, out, &mut stop, &mut watch,
        ))
        .await?;
        if step == Step::Done {
            return Ok(TxExit::Done);
        }
    }
}

impl TxClient {
    /// The wait of an idle client: its next bytes, shutdown, or time to park.
    fn poll_idle(
        &mut self,
        socket: &mut ClientStream,
        stop: &mut crate::shutdown::Recv<'_>,
        idle_wait: Option<&mut crate::park::IdleWait>,
        watch: &mut ReadWatch,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Idle> {
        // The read first: the shutdown signal is only looked at while the client is idle (its
        // next request not already here), which is when it applies.
        if !watch.waiting(socket, cx) {
            let read = crate::txn::poll_read_appending(socket, cx, &mut self.cbuf);
            watch.polled(&read, cx);
            if let Poll::Ready(read) = read {
                return Poll::Ready(Idle::Read(read));
            }
        }
        if Pin::new(stop).poll(cx).is_ready() {
            return Poll::Ready(Idle::Stop);
        }
        if let Some(wait) = idle_wait
            && wait.poll_park(cx)
        {
            return Poll::Ready(Idle::Park);
        }
        Poll::Pending
    }
}

/// What woke an idle transaction-mode client.
enum Idle {
    Read(std::io::Result<usize>),
    Stop,
    /// Silent for `--client-park-after-ms`.
    Park,
}

/// How a transaction-mode session left its task.
enum TxExit {
    /// Over: the client is gone.
    Done,
    /// Idle: the client's state goes to the parker.
    Park(Box<TxClient>),
    /// Idle: the client goes to the transaction lane.
    Lane(Box<TxClient>),
}

/// Where a transaction-mode step left the client.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Back to the top: wait for the client if it is idle, else take the next step.
    Again,
    /// The client is gone (or said Terminate): the session ends without an error.
    Done,
}

/// One step of a transaction-mode session with bytes from the client at hand or a server
/// held: answer without a server, get one, bring it in line, forward a round and give the
/// server back at its safe point.
async fn transaction_step(
    socket: &mut ClientStream,
    ctx: &ClientContext,
    st: &mut TxClient,
    out: &mut BytesMut,
    stop: &mut crate::shutdown::Recv<'_>,
    watch: &mut ReadWatch,
) -> Result<Step> {
    // Armed again by the round's reads, if there is a round.
    watch.disarm();
    if let Some(resume) = st.resume.take() {
        match *resume {
            TxResume::After(outcome) => return after_round(ctx, st, outcome).await,
            TxResume::Failed(e) => return Err(e),
            TxResume::Reply(reply) => {
                socket.write_all(&reply).await?;
                socket.flush().await?;
                return Ok(Step::Again);
            }
        }
    }
    let TxClient {
        session:
            TxSession {
                tracked,
                server_params,
                client,
                ..
            },
        cbuf,
        held,
        assigned,
        signal,
        sync_failures,
        ..
    } = st;
    let config = |pinned: bool| RoundConfig {
        known: &ctx.known_statements,
        max_message: ctx.max_client_message,
        max_prepared: ctx.max_prepared_statements,
        end_at_safe_point: !pinned,
        client_id: tracked.id(),
    };
    if held.is_none() {
        if cbuf.first() == Some(&b'X') {
            // Terminate while holding no server: nothing to forward.
            return Ok(Step::Done);
        }
        if let Some(reply) = crate::txn::answer_without_server(client, cbuf, &ctx.known_statements)
        {
            socket.write_all(&reply).await?;
            socket.flush().await?;
            return Ok(Step::Again);
        }
        let server = match ctx.pool.try_acquire(server_params) {
            Some(server) => server,
            None => {
                tracked.set_waiting();
                tokio::select! {
                    biased;
                    s = ctx.pool.acquire_waiting(server_params, ctx.pool_timeout, false) => s?,
                    () = stop => return Err(ProxyError::ShuttingDown),
                }
            }
        };
        *held = Some(server);
    } else if cbuf.is_empty() && !client.is_pinned() && !*assigned {
        // The login server: give it back until the client asks for something.
        if let Some(server) = held.take() {
            ctx.pool.release_with(server, true, false).await;
        }
        return Ok(Step::Again);
    }
    let Some(server) = held.as_mut() else {
        return Ok(Step::Again);
    };
    if !*assigned {
        tracked.link(&server.registry);
        *assigned = true;
        // The client's registry id (from 1 up) tells clients apart.
        let owner = ctx.reset_settings_between_clients.then(|| tracked.id());
        let synced = if in_sync(server, client, owner) {
            Ok(())
        } else {
            Box::pin(sync_session(server, client, socket, out, owner)).await
        };
        if let Err(e) = synced {
            // The server's state is unknown now: it is closed, never reused.
            if let Some(server) = held.take() {
                give_back(ctx, tracked, server, false, false).await;
            }
            *assigned = false;
            if matches!(e, ProxyError::Canceled(_)) && *sync_failures < SYNC_ATTEMPTS {
                // Canceled by a statement_timeout the previous session left there: try
                // another server connection.
                *sync_failures += 1;
                return Ok(Step::Again);
            }

            return Err(e);
        }
        *sync_failures = 0;
    }
    let pinned = client.is_pinned();
    if pinned && signal.is_none() {
        *signal = Some(Box::new(MoveSignal::new(
            ctx.pool.credentials(),
            ctx.migrate,
            ctx.migration_timeout,
            server,
        )));
    }
    let outcome = run_round(
        socket,
        &mut server.stream,
        server.txn.get_or_insert_with(Default::default),
        &mut server.parameter_status,
        client,
        cbuf,
        &config(pinned),
        if pinned { signal.as_deref_mut() } else { None },
        watch,
    )
    .await;
    st.transactions = st.transactions.saturating_add(1);
    after_round(ctx, st, outcome).await
}

/// What a transaction-mode round's end leaves to do: give the server back at a safe point,
/// look at a change to the session's state, end the client after an error.
async fn after_round(
    ctx: &ClientContext,
    st: &mut TxClient,
    outcome: crate::txn::RoundOutcome,
) -> Result<Step> {
    let TxClient {
        session: TxSession {
            tracked, client, ..
        },
        held,
        assigned,
        signal,
        ..
    } = st;
    let Some(server) = held.as_mut() else {
        return Ok(Step::Again);
    };
    if outcome.end == RoundEnd::SafePoint && outcome.recheck {
        match Box::pin(relearn(server, client)).await {
            Ok(()) => {}
            Err(e) => {
                if let Some(server) = held.take() {
                    give_back(ctx, tracked, server, false, false).await;
                }

                return Err(e);
            }
        }
    }
    match outcome.end {
        RoundEnd::SafePoint => {
            if !client.is_pinned() {
                *signal = None;
                if let Some(server) = held.take() {
                    give_back(ctx, tracked, server, true, false).await;
                }
                *assigned = false;
            } else if let Some(sig) = signal.as_mut()
                && sig.wanted()
            {
                sig.retry_later();
            }
        }
        RoundEnd::Deadline => {
            // Idle at the deadline: ask once more whether the state is gone.
            if outcome.clean
                && Box::pin(relearn(server, client)).await.is_ok()
                && !client.is_pinned()
            {
                *signal = None;
                if let Some(server) = held.take() {
                    give_back(ctx, tracked, server, true, false).await;
                }
                *assigned = false;

                return Ok(Step::Again);
            }
            metrics::counter!("dbproxy_migrations_total", "result" => "closed").increment(1);
            if let Some(server) = held.take() {
                if !outcome.clean {
                    cancel_running(&server);
                }
                give_back(ctx, tracked, server, false, false).await;
            }

            return Err(ProxyError::Unmovable(crate::migrate::pinned_message(
                client.pins(),
                ctx.migration_timeout,
            )));
        }
        end => {
            let clean =
                matches!(end, RoundEnd::ClientTerminated | RoundEnd::ClientGone) && outcome.clean;
            // A pinned client's state (LISTEN, temporary tables, ...) must not reach the
            // next client: reset then.
            let reset = client.is_pinned();
            if let Some(server) = held.take() {
                give_back(ctx, tracked, server, clean, reset).await;
            }
            return match end {
                RoundEnd::ClientMessageTooLarge(len) => Err(ProxyError::Protocol(format!(
                    "client message of {len} bytes exceeds the limit of {} bytes (--max-client-message)",
                    ctx.max_client_message
                ))),
                RoundEnd::ClientProtocol(e) => Err(ProxyError::Protocol(e)),
                _ => Ok(Step::Done),
            };
        }
    }
    Ok(Step::Again)
}

/// The client leaves `server` for good (transaction mode): unassign, then back to the pool
/// (reset only when `reset`). The usual case, once per transaction, takes no await; a reset
/// is boxed, so this future stays small.
async fn give_back(
    ctx: &ClientContext,
    tracked: &crate::stats::ClientGuard,
    server: Box<ServerConnection>,
    clean: bool,
    reset: bool,
) {
    if let Some(server) = give_back_now(ctx, tracked, server, clean, reset) {
        Box::pin(give_back_rest(ctx, server, clean, reset)).await;
    }
}

/// [`give_back`] up to its first await; the server comes back when the rest must wait (a
/// reset): then [`give_back_rest`].
///
/// A server with a cancel on its way is given back by a task of its own once the cancel
/// landed (about a millisecond, up to the forwarding timeout if PostgreSQL is slow to
/// answer), as pgbouncer keeps such a server aside: the client goes on at once and takes
/// another server for its next transaction.
fn give_back_now(
    ctx: &ClientContext,
    tracked: &crate::stats::ClientGuard,
    server: Box<ServerConnection>,
    clean: bool,
    reset: bool,
) -> Option<Box<ServerConnection>> {
    tracked.unlink(&server.registry);
    if ctx
        .cancels
        .cancel_in_flight(server.peer(), server.backend_pid)
    {
        let (pool, cancels) = (ctx.pool.clone(), ctx.cancels.clone());
        tokio::spawn(async move {
            let landed = cancels
                .wait_no_cancel_in_flight(server.peer(), server.backend_pid)
                .await;
            pool.release_with(server, clean && landed, reset).await;
        });
        return None;
    }
    if reset {
        return Some(server);
    }
    ctx.pool.release_now(server, clean);
    None
}

/// The end of a [`give_back`] that must wait: the reset.
async fn give_back_rest(
    ctx: &ClientContext,
    server: Box<ServerConnection>,
    clean: bool,
    reset: bool,
) {
    ctx.pool.release_with(server, clean, reset).await;
}

/// Whether `server`, just assigned, certainly has nothing to bring in line (the usual case in
/// transaction mode: nothing set, nothing prepared by SQL, the same reported parameters);
/// records the owner then. Otherwise [`sync_session`] looks closer.
fn in_sync(server: &mut ServerConnection, client: &ClientSession, owner: Option<u64>) -> bool {
    let txn = server.txn();
    let other_client = owner.is_some_and(|id| txn.owner != 0 && txn.owner != id);
    let nothing = txn.settings.is_empty()
        && client.settings().is_empty()
        && txn.sql_prepared.is_empty()
        && client.sql_prepared().is_empty()
        && !txn.custom.unnamed
        && !other_client
        && std::ptr::eq(&client.seen[..], &server.parameter_status[..]);
    if nothing && let Some(id) = owner {
        server.txn_mut().owner = id;
    }
    nothing
}

/// Whether [`sync_session`] would do nothing: the server already has the client's settings
/// and SQL prepared statements (a client that set something, on the server it set it on or on
/// one that another client with the same settings used), and reports what the client has
/// seen. Records the owner then.
fn sync_is_empty(
    server: &mut ServerConnection,
    client: &ClientSession,
    owner: Option<u64>,
) -> bool {
    let last = server.txn().owner;
    let other_client = owner.is_some_and(|id| last != 0 && last != id);
    let txn = server.txn();
    let nothing = crate::migrate::restore_statements(
        &txn.settings,
        client.settings(),
        &txn.sql_prepared,
        client.sql_prepared(),
        server.policy_role(),
        txn.custom.unnamed || other_client,
    )
    .is_empty()
        && crate::migrate::reported_changes(&client.seen, &server.parameter_status).is_empty();
    if nothing && let Some(id) = owner {
        server.txn_mut().owner = id;
    }
    nothing
}

/// Brings a server just assigned to the client in line with the client's session: settings
/// and SQL prepared statements (one round trip, only when they differ), then tells the client
/// about reported parameters whose values differ from what it has seen. `owner` is the
/// client's identity under `--reset-settings-between-clients`: a server that last served
/// another client is reset first.
async fn sync_session(
    server: &mut ServerConnection,
    client: &mut ClientSession,
    socket: &mut ClientStream,
    out: &mut BytesMut,
    owner: Option<u64>,
) -> Result<()> {
    let last = server.txn().owner;
    let other_client = owner.is_some_and(|id| last != 0 && last != id);
    let queries = crate::migrate::restore_statements(
        &server.txn().settings,
        client.settings(),
        &server.txn().sql_prepared,
        client.sql_prepared(),
        server.policy_role(),
        server.txn().custom.unnamed || other_client,
    );
    if !queries.is_empty() {
        Box::pin(server.replay(&queries, &[], &[])).await.map_err(|e| match e {
            ProxyError::Canceled(_) => e,
            e => ProxyError::Reset(format!(
                "restoring this session's settings and prepared statements on another server connection failed: {e}"
            )),
        })?;
        let txn = server.txn_mut();
        txn.settings = client.settings().to_vec();
        txn.sql_prepared = client.sql_prepared().to_vec();
        txn.custom.unnamed = false;
    }
    if let Some(id) = owner {
        server.txn_mut().owner = id;
    }
    let changes = crate::migrate::reported_changes(&client.seen, &server.parameter_status);
    if !changes.is_empty() {
        out.clear();
        for (name, value) in &changes {
            backend::parameter_status(out, name, value);
            crate::server::set_parameter_status(&mut client.seen, name, value);
        }
        socket.write_all(out).await?;
        socket.flush().await?;
        out.clear();
    }
    Ok(())
}

/// Asks the server what the client's session holds now and records it ([`learn`]). Custom
/// settings are asked for by name: those the session holds and those its rounds on `server`
/// may have set since the last time.
async fn relearn(server: &mut ServerConnection, client: &mut ClientSession) -> Result<()> {
    let mut custom = server.txn_mut().custom.take_names();
    for (name, _) in client.settings() {
        if crate::custom::is_custom(name) && !custom.contains(name) {
            custom.push(name.clone());
        }
    }
    let snap = crate::migrate::snapshot(server, false, &custom).await?;
    learn(server, client, snap);
    Ok(())
}

/// What the server said after a transaction that may have changed session state.
fn learn(server: &mut ServerConnection, client: &mut ClientSession, snap: Snapshot) {
    client.set_learned(snap.pins, snap.settings.clone(), snap.sql_prepared.clone());
    let txn = server.txn_mut();
    txn.settings = snap.settings;
    txn.sql_prepared = snap.sql_prepared;
    // Statements dbproxy created that the server no longer has (DISCARD, DEALLOCATE).
    let present: std::collections::HashSet<&str> =
        snap.parses.iter().map(|(n, _, _)| n.as_str()).collect();
    txn.prepared
        .retain(|key, _| present.contains(crate::txn::server_name(key).as_str()));
}

#[cfg(test)]
mod size_tests {
    use std::mem::size_of;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<A, F: std::future::Future>(_: fn(A) -> F) -> usize {
        size_of::<F>()
    }

    fn future_size2<A, B, F: std::future::Future>(_: fn(A, B) -> F) -> usize {
        size_of::<F>()
    }

    /// What every idle session-mode client keeps besides its sockets and task: a guard
    /// against fields that quietly grow per-client memory (measured on 64-bit Linux; the
    /// limits leave some room for layout changes between compiler versions).
    #[test]
    fn per_session_state_stays_small() {
        let sizes = [
            (
                "ServerConnection",
                size_of::<crate::server::ServerConnection>(),
                192,
            ),
            ("SessClient", size_of::<super::SessClient>(), 296),
            ("ClientConn", size_of::<super::ClientConn>(), 168),
            ("Moves", size_of::<super::Moves>(), 184),
            ("TxClient", size_of::<super::TxClient>(), 152),
            // A parked client's whole state, in the parker's slab.
            (
                "ParkedTransaction",
                size_of::<super::ParkedTransaction>(),
                128,
            ),
            ("ParkedSession", size_of::<super::ParkedSession>(), 328),
            (
                "Pump",
                size_of::<crate::proxy::Pump<tokio::net::TcpStream, tokio::net::TcpStream>>(),
                272,
            ),
            // Every client's task: tokio allocates it in multiples of 128 bytes, and past
            // about 150 bytes of future it takes 384 instead of 256.
            ("serve_client future", future_size(super::serve_client), 144),
            (
                "serve_transaction future",
                future_size2(super::serve_transaction),
                144,
            ),
            (
                "serve_session future",
                future_size2(super::serve_session),
                144,
            ),
        ];
        for (name, size, limit) in sizes {
            println!("{name}: {size} bytes (limit {limit})");
            assert!(
                size <= limit,
                "{name} is {size} bytes (limit {limit}); every idle client keeps one: box \
                 what is rarely used, or raise the limit here if the growth is intended"
            );
        }
    }
}
