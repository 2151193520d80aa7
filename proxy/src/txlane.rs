//! The transaction lane: idle plaintext transaction-mode clients wait, and their
//! transactions are forwarded, on a thread of its own with one epoll set, out of the tokio
//! runtime.
//!
//! Through the runtime a select-only transaction costs about 7600 instructions, twice
//! pgbouncer's: readiness bookkeeping and waker registration for each read and write, the
//! scheduler, the timer wheel and clock reads at each park, an acquire and a release on the
//! pool's lock. The lane keeps the server connections its clients use (as many as they use
//! at once, out of the pool's slots), hands one to a client whose request arrives, forwards
//! the round with the same [`crate::txn`] code the runtime runs (polled from epoll events,
//! with non-blocking reads and writes), and takes it back at the round's safe point.
//!
//! Anything that needs a decision goes back to the runtime, with the server the client holds
//! and where the round ended: a server that must be brought in line with the client's
//! session first, a round that ended other than at a plain safe point (an error, a client
//! that ended, state that pins the session, statements that may have changed it), Terminate,
//! a failed wait for a server, shutdown. The runtime's step goes on from there, and the client
//! comes back once idle and unpinned.
//!
//! Connections the lane keeps idle go back to the pool when a client of the runtime waits for
//! one, at a rotation or RECONNECT (the pool then closes those it would not keep), and after
//! one to two seconds unused (the pool's idle timeout and lifetime then apply as usual).

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::{LaneServer, LaneTxClient, Prep, TxResume};
use crate::error::ProxyError;
use crate::pool::Pool;
use crate::server::ServerParams;
use crate::shutdown::Shutdown;
use crate::txn::RoundOutcome;

/// The token of the lane's waker; client tokens are `key << 1`, server tokens `key << 1 | 1`.
const WAKE: Token = Token(usize::MAX);

/// How often idle connections are looked at: one unused for a whole period goes back to the
/// pool.
const SWEEP: Duration = Duration::from_secs(1);

/// The shortest wait for a server the lane starts (for a client with no time left of
/// `--pool-timeout`, which then gets the pool's error).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Loop turns between clock reads.
const CLOCK_TURNS: u32 = 64;

/// Reads a client's turn may make before the others go first (a round delivering a large
/// result to a fast reader would otherwise hold the lane until the result's end).
const READS_PER_TURN: u32 = 16;

thread_local! {
    /// Reads left in the current turn (a turn is one [`Lanes::drive`]).
    static BUDGET: Cell<u32> = const { Cell::new(READS_PER_TURN) };
    /// The current turn ran out of reads: it goes on after the others had theirs.
    static YIELDED: Cell<bool> = const { Cell::new(false) };
}

/// Readiness of a socket in the lane, as its epoll events reported it.
#[derive(Default)]
pub struct Flags {
    /// Bytes (or a FIN) may be there: an event came and no read since found it drained.
    ready: AtomicBool,
    /// The peer's FIN (or an error) was reported: readable until a read says so.
    hup: AtomicBool,
}

impl Flags {
    fn event(&self, hup: bool) {
        self.ready.store(true, Relaxed);
        if hup {
            self.hup.store(true, Relaxed);
        }
    }
}

/// A socket in the lane as the round's code reads and writes it: non-blocking, `Pending`
/// when it would block (the lane polls the round again at the socket's next event).
pub struct LaneIo<'a> {
    socket: &'a TcpStream,
    flags: &'a Flags,
}

impl<'a> LaneIo<'a> {
    pub fn new(socket: &'a TcpStream, flags: &'a Flags) -> Self {
        LaneIo { socket, flags }
    }
}

impl AsyncRead for LaneIo<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.flags.ready.load(Relaxed) {
            // Drained since its last event: the next one polls the round again. (Without
            // this, a round's reads found nothing 0.78 times per select-only transaction.)
            return Poll::Pending;
        }
        let left = BUDGET.get();
        if left == 0 {
            YIELDED.set(true);
            return Poll::Pending;
        }
        BUDGET.set(left - 1);
        // SAFETY: recv writes at most `len` bytes into the buffer's unfilled part, and only
        // the bytes it reports written are marked initialized.
        let unfilled = unsafe { buf.unfilled_mut() };
        let len = unfilled.len();
        loop {
            // SAFETY: as above; the pointer and length describe the unfilled part.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    len,
                    0,
                )
            };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: recv initialized the first `n` bytes of the unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                if n > 0 && n < len && !self.flags.hup.load(Relaxed) {
                    // Edge-triggered: a short read drained the socket; later bytes report.
                    self.flags.ready.store(false, Relaxed);
                }
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    self.flags.ready.store(false, Relaxed);
                    return Poll::Pending;
                }
                _ => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for LaneIo<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match (&*self.socket).write(data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.shutdown(std::net::Shutdown::Write))
    }
}

impl crate::ready::ReadHint for LaneIo<'_> {
    #[inline]
    fn may_read(&self) -> bool {
        self.flags.ready.load(Relaxed)
    }
}

/// Shared between the lane thread and the runtime.
pub struct TxLane {
    waker: mio::Waker,
    inbox: Mutex<Vec<Message>>,
    /// Clients in the lane now (for the gauge).
    count: AtomicUsize,
    /// False once shutdown started or the lane thread stopped: clients stay on the runtime.
    open: AtomicBool,
    /// False once the lane thread stopped (a panic, a failed epoll set).
    alive: AtomicBool,
    /// A generation whose server connections are TLS, which the lane cannot hold: clients
    /// stay on the runtime while it is the current one.
    tls_generation: AtomicU64,
    /// Server connections the lane holds (given back to the pool's count should its thread
    /// panic).
    servers: AtomicUsize,
    runtime: tokio::runtime::Handle,
    pool: Arc<Pool>,
    /// `--pool-timeout`: how long a client waits for a server.
    timeout: Duration,
}

enum Message {
    Enter(Box<LaneTxClient>),
    /// What a wait for a server connection (started then) brought.
    Server(ServerParams, Instant, Fetched),
    /// Give the idle connections back to the pool.
    Flush,
    /// A round's waker (a timer inside the round).
    Wake(usize),
    Close,
}

enum Fetched {
    Ready(Box<LaneServer>),
    /// Nobody waited for it any more when it would have taken or opened a connection.
    NotNeeded,
    /// A TLS connection: it went back to the pool.
    Tls(u64),
    Failed(ProxyError),
}

type Done = (Box<LaneTxClient>, Box<LaneServer>, RoundOutcome);

/// A client in the lane.
struct Client {
    state: ClientState,
    flags: Arc<Flags>,
    waker: Waker,
    fd: RawFd,
}

enum ClientState {
    Idle(Box<LaneTxClient>),
    /// Waiting for a server since then.
    Waiting(Box<LaneTxClient>, Instant),
    /// In a round with server `usize`.
    Active(Pin<Box<dyn Future<Output = Done> + Send>>, usize),
    /// Being moved.
    Gone,
}

/// A server connection the lane holds.
struct Server {
    state: ServerState,
    flags: Arc<Flags>,
    fd: RawFd,
    /// Used since the last sweep.
    used: bool,
}

enum ServerState {
    Idle(Box<LaneServer>),
    /// In a round of client `usize`.
    Busy(usize),
}

/// Why a client went back to the runtime (`dbproxy_transaction_lane_returns_total`).
#[derive(Clone, Copy)]
enum Back {
    /// Its session is pinned to a server.
    Pinned,
    /// The server it got must be brought in line with its session first.
    Sync,
    /// Its round ended other than at a plain safe point (an error, a pin, a change to look
    /// at).
    Round,
    /// Its wait for a server failed.
    WaitFailed,
    /// A reply dbproxy gave did not fit in the socket.
    Reply,
    /// The generation's server connections are TLS.
    Tls,
    Shutdown,
}

impl Back {
    fn name(self) -> &'static str {
        match self {
            Back::Pinned => "pinned",
            Back::Sync => "sync",
            Back::Round => "round",
            Back::WaitFailed => "wait_failed",
            Back::Reply => "reply",
            Back::Tls => "tls",
            Back::Shutdown => "shutdown",
        }
    }
}

/// Wakes the lane for a client's round (its timers).
struct RoundWaker {
    lane: Weak<TxLane>,
    key: usize,
}

impl Wake for RoundWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(lane) = self.lane.upgrade() {
            lane.push(Message::Wake(self.key));
        }
    }
}

impl TxLane {
    /// Starts the lane thread. Must be called inside the runtime, where clients go back.
    pub fn start(pool: Arc<Pool>, timeout: Duration, shutdown: Shutdown) -> io::Result<Arc<Self>> {
        let poll = mio::Poll::new()?;
        let lane = Arc::new(TxLane {
            waker: mio::Waker::new(poll.registry(), WAKE)?,
            inbox: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            open: AtomicBool::new(true),
            alive: AtomicBool::new(true),
            tls_generation: AtomicU64::new(u64::MAX),
            servers: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
            pool,
            timeout,
        });
        let thread = Lanes {
            lane: lane.clone(),
            poll,
            clients: Slab::new(),
            servers: Slab::new(),
            idle: Vec::new(),
            waiting: HashMap::new(),
            waiters: 0,
            again: Vec::new(),
            swept: Instant::now(),
            closed: false,
            now: Instant::now(),
        };
        std::thread::Builder::new()
            .name("dbproxy-txlane".into())
            .spawn(move || thread.run())?;
        let weak = Arc::downgrade(&lane);
        lane.pool.set_lane_flush(Box::new(move || {
            if let Some(lane) = weak.upgrade() {
                lane.push(Message::Flush);
            }
        }));
        let closing = lane.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            shutdown.recv().await;
            closing.open.store(false, Relaxed);
            closing.push(Message::Close);
        });
        Ok(lane)
    }

    /// Whether the lane takes clients: not after shutdown started or its thread stopped, nor
    /// while the current generation's server connections are TLS.
    pub fn is_open(&self) -> bool {
        self.open.load(Relaxed)
            && self.tls_generation.load(Relaxed) != self.pool.credentials().current_number()
    }

    /// How many clients the lane holds now.
    pub fn len(&self) -> usize {
        self.count.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the connections the lane keeps idle back to the pool (a rotation).
    pub fn flush(&self) {
        self.push(Message::Flush);
    }

    /// Takes an idle client (its socket out of the runtime). It goes back at once if the lane
    /// is closed. Called inside the runtime.
    pub fn enter(&self, client: Box<LaneTxClient>) {
        let mut inbox = crate::lock(&self.inbox);
        if !self.open.load(Relaxed) {
            drop(inbox);
            tokio::spawn(client.resumed(None, None));
            return;
        }
        inbox.push(Message::Enter(client));
        self.count.fetch_add(1, Relaxed);
        drop(inbox);
        self.wake();
    }

    fn push(&self, message: Message) {
        crate::lock(&self.inbox).push(message);
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake the transaction lane (its eventfd refused a write): clients waiting to enter and servers waiting to be handed over are served at its next wakeup; if this repeats, restart with --transaction-lane false");
        }
    }
}

/// The lane thread's state.
struct Lanes {
    lane: Arc<TxLane>,
    poll: mio::Poll,
    clients: Slab<Client>,
    servers: Slab<Server>,
    /// Idle servers, the most recently released last.
    idle: Vec<usize>,
    /// Clients waiting for a server, by the startup parameters they need.
    waiting: HashMap<ServerParams, Demand>,
    /// Clients waiting for a server, all parameters together.
    waiters: usize,
    /// Clients whose turn ran out of reads, driven again after the others.
    again: Vec<usize>,
    /// When idle servers were last swept.
    swept: Instant,
    closed: bool,
    /// The time, read after each wait that could be long and every [`CLOCK_TURNS`] turns:
    /// what server lifetimes are checked against (a clock read per transaction cost about
    /// 130 instructions).
    now: Instant,
}

/// Clients of the lane waiting for a server with one set of startup parameters, and the
/// waits for one running on the runtime for them. There is at least one wait per waiting
/// client: a wait whose client got a server meanwhile (another client released one) is not
/// aborted, it may be opening a connection, which the lane then keeps (or gives back after
/// the sweep).
#[derive(Default)]
struct Demand {
    /// First come first.
    clients: VecDeque<usize>,
    fetching: usize,
    /// How many clients wait (`clients.len()`), shared with the waits: one that finds it 0
    /// ends before it takes or opens a connection nobody waits for.
    wanted: Arc<AtomicUsize>,
}

impl Demand {
    fn push(&mut self, key: usize) {
        self.clients.push_back(key);
        self.wanted.store(self.clients.len(), Relaxed);
    }

    fn pop(&mut self) -> Option<usize> {
        let key = self.clients.pop_front()?;
        self.wanted.store(self.clients.len(), Relaxed);
        Some(key)
    }

    fn remove(&mut self, key: usize) -> bool {
        let Some(pos) = self.clients.iter().position(|&k| k == key) else {
            return false;
        };
        self.clients.remove(pos);
        self.wanted.store(self.clients.len(), Relaxed);
        true
    }
}

/// Should the lane thread panic (a bug), its clients are closed (their slots go back with
/// them), the pool counts its servers as closed, and the lane closes: clients waiting to
/// enter and every later one stay on the runtime.
struct Exit(Arc<TxLane>);

impl Drop for Exit {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        tracing::error!(
            "the transaction lane thread panicked: its clients were closed; the runtime serves every client from now on"
        );
        let lane = &self.0;
        let messages = {
            let mut inbox = crate::lock(&lane.inbox);
            lane.open.store(false, Relaxed);
            lane.alive.store(false, Relaxed);
            std::mem::take(&mut *inbox)
        };
        for message in messages {
            match message {
                Message::Enter(client) => drop(lane.runtime.spawn(client.resumed(None, None))),
                Message::Server(_, _, Fetched::Ready(server)) => server.close(&lane.pool),
                _ => {}
            }
        }
        lane.pool.lost_slots(lane.servers.swap(0, Relaxed));
        lane.count.store(0, Relaxed);
    }
}

impl Lanes {
    fn run(mut self) {
        let lane = self.lane.clone();
        let _exit = Exit(lane.clone());
        // Rounds create timers and clients go back on tasks: the runtime's context.
        let _runtime = lane.runtime.enter();
        let mut events = Events::with_capacity(1024);
        let mut turns = 0u32;
        loop {
            let timeout = if !self.again.is_empty() {
                Some(Duration::ZERO)
            } else {
                (!self.idle.is_empty()).then_some(SWEEP)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "the transaction lane's epoll set failed: its clients go back to the runtime, and new ones stay there");
                {
                    let _inbox = crate::lock(&lane.inbox);
                    lane.open.store(false, Relaxed);
                    lane.alive.store(false, Relaxed);
                }
                self.closed = true;
                self.close();
                // Rounds in flight cannot be moved: they end with their sockets, and the
                // servers they hold close.
                for client in self.clients.drain() {
                    if let ClientState::Active(..) = client.state {
                        lane.count.fetch_sub(1, Relaxed);
                    }
                }
                for server in self.servers.drain() {
                    if let ServerState::Idle(server) = server.state {
                        server.close(&lane.pool);
                    } else {
                        lane.pool.lost_slots(1);
                    }
                }
                lane.servers.store(0, Relaxed);
                return;
            }
            turns += 1;
            // After a wait without a timeout the clock may be far behind.
            if timeout.is_none() || events.is_empty() || turns.is_multiple_of(CLOCK_TURNS) {
                self.now = Instant::now();
            }
            if self.now.saturating_duration_since(self.swept) >= SWEEP {
                self.swept = self.now;
                self.sweep();
            }
            for event in events.iter() {
                if event.token() == WAKE {
                    self.take_messages();
                    continue;
                }
                let key = event.token().0 >> 1;
                let hup = event.is_read_closed() || event.is_error();
                let readable = event.is_readable() || hup;
                if event.token().0 & 1 == 0 {
                    let Some(client) = self.clients.get(key) else {
                        continue;
                    };
                    if readable {
                        client.flags.event(hup);
                    }
                    self.drive(key);
                } else {
                    let Some(server) = self.servers.get(key) else {
                        continue;
                    };
                    if readable {
                        server.flags.event(hup);
                    }
                    match server.state {
                        ServerState::Busy(client) => self.drive(client),
                        ServerState::Idle(_) if readable => self.idle_server_spoke(key),
                        ServerState::Idle(_) => {}
                    }
                }
            }
            for key in std::mem::take(&mut self.again) {
                self.drive(key);
            }
        }
    }

    fn take_messages(&mut self) {
        let messages = std::mem::take(&mut *crate::lock(&self.lane.inbox));
        for message in messages {
            match message {
                Message::Enter(client) => self.admit(client),
                Message::Server(params, started, fetched) => self.fetched(params, started, fetched),
                Message::Flush => self.flush(),
                Message::Wake(key) => self.drive(key),
                Message::Close => {
                    self.closed = true;
                    self.close();
                }
            }
        }
    }

    /// A new client: registered; its first event serves it.
    fn admit(&mut self, client: Box<LaneTxClient>) {
        if self.closed {
            self.lane.count.fetch_sub(1, Relaxed);
            drop(tokio::spawn(client.resumed(None, None)));
            return;
        }
        let key = self.clients.vacant_key();
        let fd = client.fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(key << 1),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %e, "cannot add a client to the transaction lane; the runtime serves it (check fs.epoll.max_user_watches and the open-files limit)");
            self.lane.count.fetch_sub(1, Relaxed);
            drop(tokio::spawn(client.resumed(None, None)));
            return;
        }
        // Bytes (or a FIN) already there are reported by the registration itself: no read
        // before the first event (it would find nothing after most logins).
        let flags = client.flags.clone();
        let waker = Waker::from(Arc::new(RoundWaker {
            lane: Arc::downgrade(&self.lane),
            key,
        }));
        self.clients.insert(Client {
            state: ClientState::Idle(client),
            flags,
            waker,
            fd,
        });
    }

    /// Moves client `key` on as far as it goes.
    fn drive(&mut self, key: usize) {
        BUDGET.set(READS_PER_TURN);
        YIELDED.set(false);
        self.turn(key);
        if YIELDED.get() {
            self.again.push(key);
        }
    }

    /// [`Lanes::drive`] within a turn's budget.
    fn turn(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        match &mut client.state {
            ClientState::Active(round, _) => {
                let mut cx = Context::from_waker(&client.waker);
                if let Poll::Ready(done) = round.as_mut().poll(&mut cx) {
                    self.finish(key, done);
                }
            }
            ClientState::Idle(_) => self.serve_idle(key),
            // Its request waits for a server; a client waiting to enter is not here yet.
            ClientState::Waiting(..) | ClientState::Gone => {}
        }
    }

    /// An idle client: read its request, answer it or get it a server.
    fn serve_idle(&mut self, key: usize) {
        loop {
            let entry = &mut self.clients[key];
            let ClientState::Idle(client) = &mut entry.state else {
                return;
            };
            if !client.has_request() {
                if !entry.flags.ready.load(Relaxed) {
                    return;
                }
                let mut cx = Context::from_waker(&entry.waker);
                match client.poll_read(&mut cx) {
                    Poll::Pending => return,
                    // Gone: the runtime ends it as it would have.
                    Poll::Ready(Ok(0) | Err(_)) => return self.end(key),
                    Poll::Ready(Ok(_)) => {}
                }
            }
            match client.prepare() {
                Prep::Terminate => return self.end(key),
                Prep::GiveBack => return self.give_back(key, Back::Pinned, None, None),
                Prep::Reply(reply) => {
                    if let Some(rest) = client.write_reply(reply) {
                        return self.give_back(key, Back::Reply, None, Some(TxResume::Reply(rest)));
                    }
                }
                Prep::Server => return self.assign(key),
            }
        }
    }

    /// Client `key` needs a server: an idle one with its parameters, else it waits.
    fn assign(&mut self, key: usize) {
        let ClientState::Idle(client) = &self.clients[key].state else {
            return;
        };
        let params = client.params().clone();
        if let Some(server) = self.take_idle(&params) {
            return self.start(key, server);
        }
        let ClientState::Idle(client) =
            std::mem::replace(&mut self.clients[key].state, ClientState::Gone)
        else {
            return;
        };
        client.set_waiting();
        self.lane.pool.lane_waiting(true);
        self.clients[key].state = ClientState::Waiting(client, Instant::now());
        self.waiting.entry(params.clone()).or_default().push(key);
        self.waiters += 1;
        self.top_up(&params);
    }

    /// Starts waits for a server with `params` until there is one per client waiting for
    /// such a server, and forgets `params` once nobody waits and no wait runs. The running
    /// waits count for the first clients; a new one is for a later client and lasts what that
    /// client has left of `--pool-timeout`, so a client gets the pool's error when it has
    /// waited the timeout, as on the runtime (not a timeout after a wait started for another
    /// client ended).
    fn top_up(&mut self, params: &ServerParams) {
        let Some(demand) = self.waiting.get_mut(params) else {
            return;
        };
        let running = demand.fetching;
        let missing = demand.clients.len().saturating_sub(running);
        if missing == 0 {
            if demand.clients.is_empty() && running == 0 {
                self.waiting.remove(params);
            }
            return;
        }
        demand.fetching += missing;
        let now = Instant::now();
        let timeout = self.lane.timeout;
        let left: Vec<Duration> = demand
            .clients
            .iter()
            .skip(running)
            .map(|&key| match &self.clients[key].state {
                ClientState::Waiting(_, since) => (*since + timeout).saturating_duration_since(now),
                _ => timeout,
            })
            .collect();
        let wanted = demand.wanted.clone();
        for left in left {
            self.fetch(params.clone(), left.max(MIN_WAIT), wanted.clone());
        }
    }

    /// The most recently released idle server with `params` the pool would still keep;
    /// those it would not keep are given back on the way (the pool closes them).
    fn take_idle(&mut self, params: &ServerParams) -> Option<usize> {
        while let Some(pos) = self.idle.iter().rposition(|&s| {
            matches!(&self.servers[s].state, ServerState::Idle(server) if server.conn().params == *params)
        }) {
            let skey = self.idle.swap_remove(pos);
            let ServerState::Idle(server) = &self.servers[skey].state else {
                continue;
            };
            if self.lane.pool.would_keep(server.conn(), self.now) {
                return Some(skey);
            }
            self.return_server(skey);
        }
        None
    }

    /// Asks the runtime for a server connection with `params` (the pool's wait, for at most
    /// `timeout`; a new connection if the pool has room). Counted by [`Lanes::top_up`].
    fn fetch(&self, params: ServerParams, timeout: Duration, wanted: Arc<AtomicUsize>) {
        let lane = self.lane.clone();
        let started = Instant::now();
        drop(tokio::spawn(async move {
            let fetched = match lane.pool.acquire_for_lane(&params, timeout, &wanted).await {
                Ok(None) => Fetched::NotNeeded,
                Ok(Some(server)) => match LaneServer::from_runtime(server) {
                    Ok(server) => Fetched::Ready(server),
                    Err(server) => {
                        let generation = server.generation;
                        lane.pool.release_now(server, true);
                        Fetched::Tls(generation)
                    }
                },
                Err(e) => Fetched::Failed(e),
            };
            if !lane.alive.load(Relaxed) {
                // The lane thread stopped: nobody takes it.
                if let Fetched::Ready(server) = fetched {
                    server.close(&lane.pool);
                }
                return;
            }
            lane.push(Message::Server(params, started, fetched));
        }));
    }

    /// A wait for a server ended.
    fn fetched(&mut self, params: ServerParams, started: Instant, fetched: Fetched) {
        if let Some(demand) = self.waiting.get_mut(&params) {
            demand.fetching = demand.fetching.saturating_sub(1);
        }
        match fetched {
            Fetched::Ready(server) => {
                // Counted as handed out by the pool: idle in the lane until a client takes it.
                self.lane.pool.lane_idle(server.conn());
                if let Some(skey) = self.add_server(server) {
                    self.released(skey, true);
                }
            }
            // Its clients got connections others released: topped up below if some wait.
            Fetched::NotNeeded => {}
            Fetched::Failed(e) => {
                // The client that has waited since before this wait started gets the error
                // (the pool's timeout, a failed login); one that came later, whose wait this
                // was not, waits on.
                let oldest = self
                    .waiting
                    .get(&params)
                    .and_then(|d| d.clients.front())
                    .and_then(|&key| match &self.clients[key].state {
                        ClientState::Waiting(_, since) => Some(*since),
                        _ => None,
                    });
                if oldest.is_some_and(|since| since <= started)
                    && let Some(key) = self.first_waiting(&params)
                {
                    if matches!(e, ProxyError::PoolExhausted(_)) {
                        self.lane.pool.count_timeout();
                    }
                    self.give_back(key, Back::WaitFailed, None, Some(TxResume::Failed(e)));
                }
            }
            Fetched::Tls(generation) => {
                // The runtime serves this generation's clients.
                self.lane.tls_generation.store(generation, Relaxed);
                while let Some(key) = self.first_waiting(&params) {
                    self.give_back(key, Back::Tls, None, None);
                }
            }
        }
        // Whatever this wait brought, the clients still waiting keep one wait each.
        self.top_up(&params);
    }

    /// Registers a server connection with the lane (None: it could not be, and closed).
    fn add_server(&mut self, server: Box<LaneServer>) -> Option<usize> {
        let skey = self.servers.vacant_key();
        let fd = server.fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(skey << 1 | 1),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %e, "cannot add a server connection to the transaction lane; closing it (check fs.epoll.max_user_watches and the open-files limit)");
            server.close(&self.lane.pool);
            return None;
        }
        let flags = server.flags.clone();
        self.servers.insert(Server {
            state: ServerState::Idle(server),
            flags,
            fd,
            used: true,
        });
        self.lane.servers.fetch_add(1, Relaxed);
        Some(skey)
    }

    /// Server `skey` is idle: released by its client, or `fresh` from the pool for the
    /// lane's waiting clients. To the first client waiting for its parameters, else kept
    /// idle, or back to the pool if the lane is closing, the pool would not keep it, or
    /// clients wait for other parameters or on the runtime.
    ///
    /// A released one also goes back to the pool when a client of the runtime or one with
    /// other parameters has waited longer (first come first, as in the pool, whose waits then
    /// replace it with a connection for theirs). A fresh one goes to a client of its
    /// parameters regardless: it may have cost a login, and sending it back would make the
    /// pool close it for the next wait in line (at 50 clients with their own
    /// application_name on 10 connections that was 33 logins per transaction).
    fn released(&mut self, skey: usize, fresh: bool) {
        let ServerState::Idle(server) = &self.servers[skey].state else {
            return;
        };
        let pool = &self.lane.pool;
        if self.closed || !pool.would_keep(server.conn(), self.now) {
            return self.return_server(skey);
        }
        let runtime_waits = pool.runtime_waiters() > 0;
        let params = server.conn().params.clone();
        if !fresh && (runtime_waits || self.older_elsewhere(&params)) {
            return self.return_server(skey);
        }
        if let Some(key) = self.first_waiting(&params) {
            return self.start(key, skey);
        }
        if self.waiters > 0 || runtime_waits {
            // Nobody here waits for its parameters: the slot serves the others in the pool.
            return self.return_server(skey);
        }
        self.idle.push(skey);
    }

    /// Whether a client waiting for a server with other parameters has waited longer than
    /// the first one waiting for `params` (or at all, when nobody waits for `params`).
    fn older_elsewhere(&self, params: &ServerParams) -> bool {
        // Nobody waits, nearly always: no hashing of the parameters per transaction.
        if self.waiters == 0 {
            return false;
        }
        let mine = self.waiting.get(params);
        if self.waiters == mine.map_or(0, |d| d.clients.len()) {
            return false;
        }
        let since = |key: &usize| match &self.clients[*key].state {
            ClientState::Waiting(_, since) => Some(*since),
            _ => None,
        };
        let Some(first) = mine.and_then(|d| d.clients.front()).and_then(since) else {
            return true;
        };
        self.waiting
            .iter()
            .filter(|(p, _)| *p != params)
            .filter_map(|(_, d)| d.clients.front().and_then(since))
            .any(|other| other < first)
    }

    /// Takes the first client waiting for a server with `params` off the queue (its
    /// [`Demand`] stays until [`Lanes::top_up`] finds it empty).
    fn first_waiting(&mut self, params: &ServerParams) -> Option<usize> {
        if self.waiters == 0 {
            return None;
        }
        let key = self.waiting.get_mut(params)?.pop()?;
        self.waiters -= 1;
        Some(key)
    }

    /// Client `key` takes idle server `skey` and its round starts.
    fn start(&mut self, key: usize, skey: usize) {
        let ServerState::Idle(mut server) =
            std::mem::replace(&mut self.servers[skey].state, ServerState::Busy(key))
        else {
            return;
        };
        self.servers[skey].used = true;
        let (mut client, waited) =
            match std::mem::replace(&mut self.clients[key].state, ClientState::Gone) {
                ClientState::Idle(client) => (client, None),
                ClientState::Waiting(client, since) => {
                    self.lane.pool.lane_waiting(false);
                    (client, Some(since.elapsed()))
                }
                _ => unreachable!("only idle or waiting clients take a server"),
            };
        self.lane.pool.lane_assign(server.conn(), waited);
        if !client.begin(&mut server) {
            // Something on the server needs bringing in line: the runtime does it.
            self.remove_server(skey);
            self.clients[key].state = ClientState::Idle(client);
            return self.give_back(key, Back::Sync, Some(server), None);
        }
        let fut = client.round(server);
        self.clients[key].state = ClientState::Active(Box::pin(fut), skey);
        self.drive(key);
    }

    /// A round ended.
    fn finish(&mut self, key: usize, (mut client, server, outcome): Done) {
        let ClientState::Active(_, skey) =
            std::mem::replace(&mut self.clients[key].state, ClientState::Gone)
        else {
            unreachable!("a round ends for an active client");
        };
        if !client.settled(&server, &outcome) {
            self.remove_server(skey);
            self.clients[key].state = ClientState::Idle(client);
            return self.give_back(
                key,
                Back::Round,
                Some(server),
                Some(TxResume::After(outcome)),
            );
        }
        if server.cancel_in_flight(client.ctx()) {
            // It serves nobody before the cancel landed (as the runtime's release).
            self.remove_server(skey);
            let ctx = client.ctx().clone();
            if let Some(server) = server.into_runtime(&ctx.pool) {
                drop(tokio::spawn(async move {
                    let landed = ctx
                        .cancels
                        .wait_no_cancel_in_flight(server.peer(), server.backend_pid)
                        .await;
                    ctx.pool.release_with(server, landed, false).await;
                }));
            }
        } else {
            self.lane.pool.lane_idle(server.conn());
            self.servers[skey].state = ServerState::Idle(server);
            self.released(skey, false);
        }
        self.clients[key].state = ClientState::Idle(client);
        if self.closed {
            return self.give_back(key, Back::Shutdown, None, None);
        }
        self.serve_idle(key);
    }

    /// An idle server's socket reported bytes or a FIN: a server that speaks unasked is
    /// ending (an idle-session timeout, a terminated backend). Checked with a peek, since the
    /// event may be from its last round.
    fn idle_server_spoke(&mut self, skey: usize) {
        let server = &self.servers[skey];
        let mut probe = [0u8; 1];
        // SAFETY: a one-byte peek into a stack buffer.
        let n = unsafe {
            libc::recv(
                server.fd,
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
            server.flags.ready.store(false, Relaxed);
            return;
        }
        if let Some(pos) = self.idle.iter().position(|&s| s == skey) {
            self.idle.swap_remove(pos);
        }
        if let Some(ServerState::Idle(server)) = self.remove_server(skey) {
            server.close(&self.lane.pool);
        }
    }

    /// Unregisters server `skey` and takes it out of the lane.
    fn remove_server(&mut self, skey: usize) -> Option<ServerState> {
        let server = self.servers.try_remove(skey)?;
        let _ = self.poll.registry().deregister(&mut SourceFd(&server.fd));
        self.lane.servers.fetch_sub(1, Relaxed);
        Some(server.state)
    }

    /// Idle server `skey` back to the pool (which closes it if it would not keep it).
    fn return_server(&mut self, skey: usize) {
        if let Some(ServerState::Idle(server)) = self.remove_server(skey)
            && let Some(server) = server.into_runtime(&self.lane.pool)
        {
            self.lane.pool.lane_return(server);
        }
    }

    /// Every idle server back to the pool.
    fn flush(&mut self) {
        for skey in std::mem::take(&mut self.idle) {
            self.return_server(skey);
        }
    }

    /// Idle servers unused since the last sweep go back to the pool.
    fn sweep(&mut self) {
        let mut keep = Vec::with_capacity(self.idle.len());
        for skey in std::mem::take(&mut self.idle) {
            let server = &mut self.servers[skey];
            if server.used {
                server.used = false;
                keep.push(skey);
            } else {
                self.return_server(skey);
            }
        }
        self.idle = keep;
    }

    /// Client `key` ended (Terminate, or its socket closed or broke) while idle: closed here,
    /// as the runtime would (its slot, SHOW CLIENTS entry and cancel key go with it), without
    /// a trip back for a client that connects for one transaction.
    fn end(&mut self, key: usize) {
        let Some(entry) = self.clients.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut SourceFd(&entry.fd));
        self.lane.count.fetch_sub(1, Relaxed);
        drop(entry);
    }

    /// Client `key` back to the runtime, with `server` if it holds one.
    fn give_back(
        &mut self,
        key: usize,
        why: Back,
        server: Option<Box<LaneServer>>,
        resume: Option<TxResume>,
    ) {
        metrics::counter!("dbproxy_transaction_lane_returns_total", "reason" => why.name())
            .increment(1);
        let Some(entry) = self.clients.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut SourceFd(&entry.fd));
        self.lane.count.fetch_sub(1, Relaxed);
        let client = match entry.state {
            ClientState::Idle(client) => client,
            ClientState::Waiting(client, _) => {
                // Still queued unless its wait failed or its generation is TLS.
                let params = client.params().clone();
                if let Some(demand) = self.waiting.get_mut(&params)
                    && demand.remove(key)
                {
                    self.waiters -= 1;
                    self.top_up(&params);
                }
                self.lane.pool.lane_waiting(false);
                client
            }
            ClientState::Active(..) | ClientState::Gone => {
                unreachable!("only idle or waiting clients go back")
            }
        };
        drop(tokio::spawn(client.resumed(server, resume)));
    }

    /// Shutdown (or a failed epoll set): idle and waiting clients go back to the runtime,
    /// idle servers to the pool; clients in a round go back when it ends.
    fn close(&mut self) {
        let keys: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| matches!(c.state, ClientState::Idle(_) | ClientState::Waiting(..)))
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            self.give_back(key, Back::Shutdown, None, None);
        }
        self.flush();
        let messages = std::mem::take(&mut *crate::lock(&self.lane.inbox));
        for message in messages {
            match message {
                Message::Enter(client) => {
                    self.lane.count.fetch_sub(1, Relaxed);
                    drop(tokio::spawn(client.resumed(None, None)));
                }
                Message::Server(params, started, fetched) => self.fetched(params, started, fetched),
                Message::Wake(key) => self.drive(key),
                Message::Flush | Message::Close => {}
            }
        }
    }
}
