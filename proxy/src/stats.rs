//! Metric handles, registered once so the hot path only touches atomics, and the live
//! registry of clients and server connections that /metrics and the admin console read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use slab::Slab;

/// Histogram names, so the exporter can be given bucket boundaries for them.
pub const POOL_WAIT_SECONDS: &str = "dbproxy_pool_wait_seconds";
pub const TRANSACTION_SECONDS: &str = "dbproxy_transaction_duration_seconds";
pub const QUERY_SECONDS: &str = "dbproxy_query_duration_seconds";
pub const ROTATION_SECONDS: &str = "dbproxy_rotation_seconds";

/// Bucket boundaries (seconds) for every histogram: 100 µs to 60 s.
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

pub struct Stats {
    /// Clients connected (logged in or logging in).
    pub clients: Gauge,
    /// Clients holding a server connection.
    pub clients_active: Level,
    /// Clients waiting for a server connection (pool full, paused, or no credentials yet).
    pub clients_waiting: Level,
    pub server_connections: Level,
    pub rotations_applied: Counter,
    pub rotations_rejected: Counter,
    pub generation: Gauge,
    /// 1 while the newest DSN read from the file is not in use (rejected or failing validation).
    pub credential_rejected: Gauge,
    pub client_login_failures: Counter,
    pub pool_timeouts: Counter,
    /// Seconds from the watcher noticing a Secret change to the new generation being current.
    pub rotation_seconds: Histogram,
    /// Live clients and server connections, for the admin console and labelled gauges.
    pub registry: Registry,
    /// How many clients are parked now, read at each scrape (set when parking is on).
    pub parked_clients: OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    /// How many sessions the session lane forwards now (set when the lane runs).
    pub lane_sessions: OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    /// Clients in the transaction lane, when it runs.
    pub lane_clients: OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
}

impl Stats {
    /// Registers the metrics with whatever recorder is installed (none in unit tests).
    pub fn new() -> Self {
        Stats {
            clients: gauge!("dbproxy_clients"),
            clients_active: Level::default(),
            clients_waiting: Level::default(),
            server_connections: Level::default(),
            rotations_applied: counter!("dbproxy_rotations_applied_total"),
            rotations_rejected: counter!("dbproxy_rotations_rejected_total"),
            generation: gauge!("dbproxy_credential_generation"),
            credential_rejected: gauge!("dbproxy_credential_rejected"),
            client_login_failures: counter!("dbproxy_client_login_failures_total"),
            pool_timeouts: counter!("dbproxy_pool_timeouts_total"),
            rotation_seconds: histogram!(ROTATION_SECONDS),
            registry: Registry::default(),
            parked_clients: OnceLock::new(),
            lane_sessions: OnceLock::new(),
            lane_clients: OnceLock::new(),
        }
    }

    /// A server refused a login (ours: validation or a pool connection) with `sqlstate`.
    pub fn server_login_failed(&self, sqlstate: &str) {
        counter!("dbproxy_server_login_failures_total", "sqlstate" => sqlstate.to_owned())
            .increment(1);
    }

    /// Reloads of the DSN file asked for by an operator (`source`: sighup or admin).
    pub fn reload_requested(&self, source: &'static str) {
        counter!("dbproxy_reloads_total", "source" => source).increment(1);
    }

    /// Publishes `dbproxy_info` for the generation now current (and zeroes the previous one).
    pub fn set_info(&self, labels: InfoLabels) {
        let mut last = crate::lock(&self.registry.info);
        if let Some(old) = last.take()
            && old != labels
        {
            info_gauge(&old).set(0.0);
        }
        info_gauge(&labels).set(1.0);
        *last = Some(labels);
    }

    /// Refreshes counters kept as plain atomics and gauges derived from the registry
    /// (called before each scrape).
    pub fn refresh(&self) {
        let h = hot();
        let copy = |name: &'static str, v: &AtomicU64| counter!(name).absolute(v.load(Relaxed));
        copy("dbproxy_client_bytes_received_total", &h.bytes_from_clients);
        copy("dbproxy_client_bytes_sent_total", &h.bytes_to_clients);
        copy("dbproxy_queries_total", &h.queries);
        counter!("dbproxy_transactions_total").absolute(h.transaction_seconds.count());
        copy("dbproxy_server_assignments_total", &h.assignments);
        for (name, level) in [
            ("dbproxy_clients_active", &self.clients_active),
            ("dbproxy_clients_waiting", &self.clients_waiting),
            ("dbproxy_server_connections", &self.server_connections),
        ] {
            gauge!(name).set(level.get() as f64);
        }
        if let Some(parked) = self.parked_clients.get() {
            gauge!("dbproxy_clients_parked").set(parked() as f64);
        }
        if let Some(lane) = self.lane_sessions.get() {
            gauge!("dbproxy_session_lane_clients").set(lane() as f64);
        }
        if let Some(lane) = self.lane_clients.get() {
            gauge!("dbproxy_transaction_lane_clients").set(lane() as f64);
        }
        let mut counts: HashMap<(&'static str, u64), f64> = HashMap::new();
        for s in self.registry.servers() {
            *counts.entry((s.state.name(), s.generation)).or_default() += 1.0;
        }
        let mut reported = crate::lock(&self.registry.reported_server_labels);
        for key in reported.iter() {
            if !counts.contains_key(key) {
                server_gauge(key.0, key.1).set(0.0);
            }
        }
        reported.clear();
        for (key, n) in counts {
            server_gauge(key.0, key.1).set(n);
            reported.push(key);
        }
    }
}

/// Appends the hot-path histograms to a Prometheus text exposition (they are kept outside
/// the recorder, see [`LatencyHistogram`]).
pub fn render_hot(out: &mut String) {
    let h = hot();
    h.pool_wait.render(
        POOL_WAIT_SECONDS,
        "Time clients waited for a server connection.",
        out,
    );
    h.query_seconds.render(
        QUERY_SECONDS,
        "Time from a client request to the server's ReadyForQuery.",
        out,
    );
    h.transaction_seconds.render(
        TRANSACTION_SECONDS,
        "Time from a transaction's first request to the ReadyForQuery that ends it.",
        out,
    );
}

/// A gauge kept as a plain atomic and published at each scrape: the pool moves
/// `dbproxy_clients_active` and friends twice per transaction in transaction mode.
#[derive(Debug, Default)]
pub struct Level(AtomicI64);

impl Level {
    #[inline]
    pub fn increment(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn decrement(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    #[inline]
    pub fn set(&self, v: usize) {
        self.0.store(v as i64, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds of [`BUCKETS`] in nanoseconds.
const BOUNDS_NS: [u64; BUCKETS.len()] = {
    let mut out = [0u64; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        out[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A latency histogram with the buckets of [`BUCKETS`], recorded with two relaxed atomic
/// additions and rendered at each scrape. The recorder's own histograms queue every sample
/// (with a clock read for recency) until the next upkeep: several hundred instructions per
/// sample, on a path that records up to three samples per transaction.
pub struct LatencyHistogram {
    /// Samples per bucket (upper bounds [`BOUNDS_NS`]); the last counts larger ones.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub const fn new() -> Self {
        LatencyHistogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// One sample of `ns` nanoseconds (Prometheus buckets are inclusive: `le`).
    #[inline]
    pub fn record_ns(&self, ns: u64) {
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn record(&self, d: std::time::Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Sum of the samples, in nanoseconds.
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns.load(Relaxed)
    }

    /// The histogram in Prometheus text format: cumulative buckets, `+Inf`, sum (seconds)
    /// and count. The count is the sum of the buckets read, so the two always agree.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut total = 0u64;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            total += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {total}");
        }
        total += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {total}");
    }
}

fn server_gauge(state: &'static str, generation: u64) -> Gauge {
    gauge!("dbproxy_server_connections_by_state", "state" => state, "generation" => generation.to_string())
}

/// The labels of `dbproxy_info`: what the proxy connects as and where; never the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoLabels {
    pub user: String,
    pub host: String,
    pub database: String,
    pub sslmode: String,
}

fn info_gauge(l: &InfoLabels) -> Gauge {
    gauge!("dbproxy_info",
        "user" => l.user.clone(),
        "host" => l.host.clone(),
        "database" => l.database.clone(),
        "sslmode" => l.sslmode.clone())
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters touched on every forwarded message batch: plain atomics (copied into the
/// exported counters at each scrape) and the latency histograms (rendered at each scrape).
pub struct HotStats {
    pub bytes_from_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    pub queries: AtomicU64,
    /// Server assignments and the time clients waited for them, in microseconds.
    pub assignments: AtomicU64,
    pub wait_us: AtomicU64,
    /// Query and transaction latencies; their counts and sums are also SHOW STATS' totals
    /// and `dbproxy_transactions_total`.
    pub query_seconds: LatencyHistogram,
    pub transaction_seconds: LatencyHistogram,
    /// Time clients waited for a server connection (0 when one was idle).
    pub pool_wait: LatencyHistogram,
    /// Origin of the pool's RECONNECT stamps (nanoseconds since then).
    pub epoch: Instant,
}

static HOT: OnceLock<HotStats> = OnceLock::new();

/// The process's hot-path metric handles (registered on first use, after the recorder).
pub fn hot() -> &'static HotStats {
    HOT.get_or_init(|| HotStats {
        bytes_from_clients: AtomicU64::new(0),
        bytes_to_clients: AtomicU64::new(0),
        queries: AtomicU64::new(0),
        assignments: AtomicU64::new(0),
        wait_us: AtomicU64::new(0),
        query_seconds: LatencyHistogram::new(),
        transaction_seconds: LatencyHistogram::new(),
        pool_wait: LatencyHistogram::new(),
        epoch: Instant::now(),
    })
}

impl HotStats {
    /// Nanoseconds on the monotonic clock (`Instant`'s clock, never 0, so 0 can mean "not
    /// started"), for the latency histograms' start and end stamps. Read directly: through
    /// `Instant::elapsed`, the checked `Timespec` subtraction and the 128-bit `as_nanos`
    /// cost about 90 instructions per stamp, two stamps per query.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
        secs.wrapping_mul(1_000_000_000).wrapping_add(nanos).max(1)
    }
}

/// What a server connection is doing, pgbouncer's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Active,
    Idle,
}

impl ServerState {
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Active => "active",
            ServerState::Idle => "idle",
        }
    }
}

/// A connection's user, database and application name, in one allocation shared by every
/// connection with the same three (clients of one application usually are): the registry
/// holds an entry per connection, so its size is per-client memory. Shared also keeps an idle
/// client's memory in few places: parked clients' pages go back to the system
/// ([`crate::park`]), which one small allocation of their own per client would prevent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names(Arc<str>);

/// The distinct [`Names`] in use. Those no connection holds any more are dropped when the set
/// has doubled since it was last swept, so it stays within twice the names in use.
struct Interned {
    set: std::collections::HashSet<Arc<str>>,
    sweep_at: usize,
}

static INTERNED: Mutex<Option<Interned>> = Mutex::new(None);

fn intern(joined: String) -> Arc<str> {
    let mut interned = crate::lock(&INTERNED);
    let interned = interned.get_or_insert_with(|| Interned {
        set: Default::default(),
        sweep_at: 64,
    });
    if let Some(names) = interned.set.get(joined.as_str()) {
        return names.clone();
    }
    if interned.set.len() >= interned.sweep_at {
        interned.set.retain(|names| Arc::strong_count(names) > 1);
        interned.sweep_at = (interned.set.len() * 2).max(64);
    }
    let names: Arc<str> = joined.into();
    interned.set.insert(names.clone());
    names
}

impl Names {
    /// PostgreSQL names cannot contain NUL (the protocol terminates them with it), so it
    /// separates the parts.
    pub fn new(user: &str, database: &str, application_name: &str) -> Names {
        let parts = [user, database, application_name];
        let mut joined = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 {
                joined.push('\0');
            }
            joined.extend(part.chars().filter(|&c| c != '\0'));
        }
        Names(intern(joined))
    }

    fn part(&self, i: usize) -> &str {
        self.0.split('\0').nth(i).unwrap_or("")
    }

    pub fn user(&self) -> &str {
        self.part(0)
    }

    pub fn database(&self) -> &str {
        self.part(1)
    }

    pub fn application_name(&self) -> &str {
        self.part(2)
    }
}

/// A wall-clock time to the microsecond in 8 bytes (a `SystemTime` takes 16): every
/// SHOW CLIENTS and SHOW SERVERS entry holds two, and every client, parked or not, has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

impl Stamp {
    pub fn now() -> Self {
        Self::read(libc::CLOCK_REALTIME)
    }

    /// The time to the kernel's tick (1 to 4 ms), for stamps shown to the second only (when
    /// a client or server became active: SHOW CLIENTS and SHOW SERVERS' `request_time`).
    /// A transaction-mode transaction takes two; this clock costs about 5 ns against 25.
    pub fn coarse() -> Self {
        Self::read(libc::CLOCK_REALTIME_COARSE)
    }

    fn read(clock: libc::clockid_t) -> Self {
        // The clock read directly: through SystemTime, the subtraction of the epoch and
        // as_micros' 128-bit arithmetic cost about 80 instructions per stamp.
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the timespec it is given.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let micros = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000;
        Stamp(secs * 1_000_000 + micros)
    }

    /// Time since then (zero if the clock went back).
    pub fn elapsed(self) -> std::time::Duration {
        std::time::Duration::from_micros(Stamp::now().0.saturating_sub(self.0))
    }
}

impl From<Stamp> for SystemTime {
    fn from(s: Stamp) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(s.0)
    }
}

/// One server connection as the admin console shows it. `state`, `request_time` and
/// `client` are read from its [`ServerLive`] when the registry is listed.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    pub id: u64,
    pub generation: u64,
    /// User and database (no application name).
    pub names: Names,
    pub addr: SocketAddr,
    pub backend_pid: i32,
    pub state: ServerState,
    pub connect_time: Stamp,
    pub request_time: Stamp,
    /// The registry id of the client it serves.
    pub client: Option<u64>,
}

/// [`ServerLive::holder`] of an idle server connection.
const IDLE: u64 = 0;
/// [`ServerLive::holder`] of a server connection in use with no client linked (opening,
/// syncing, resetting); client ids count up from 1 and never reach it.
const HELD: u64 = u64::MAX;

/// What changes on a server connection as clients come and go, shared by the connection and
/// its registry entry and set with plain stores (in transaction mode twice per transaction,
/// where a registry update under its lock cost about 60 instructions and two locked
/// operations each). A client's cancel request is routed through it: the server whose holder
/// is the client gets the cancel.
#[derive(Debug)]
pub struct ServerLive {
    /// [`IDLE`], [`HELD`], or the registry id of the client it serves.
    holder: AtomicU64,
    /// When a client was last linked to it ([`Stamp`]'s microseconds).
    request_time: AtomicU64,
}

impl Default for ServerLive {
    /// A server connection starts in use (being opened).
    fn default() -> Self {
        ServerLive {
            holder: AtomicU64::new(HELD),
            request_time: AtomicU64::new(Stamp::coarse().0),
        }
    }
}

impl ServerLive {
    /// Taken by a client task, no client linked yet.
    pub fn hold(&self) {
        self.holder.store(HELD, Relaxed);
    }

    /// Back in the pool.
    pub fn release(&self) {
        self.holder.store(IDLE, Relaxed);
    }

    /// Whether client `id` is linked to it. Sequentially consistent: see
    /// [`ClientGuard::unlink`].
    pub fn serves(&self, id: u64) -> bool {
        self.holder.load(Ordering::SeqCst) == id
    }

    fn state(&self) -> (ServerState, Option<u64>) {
        match self.holder.load(Relaxed) {
            IDLE => (ServerState::Idle, None),
            HELD => (ServerState::Active, None),
            id => (ServerState::Active, Some(id)),
        }
    }
}

/// A server connection's place in the registry and its live state.
#[derive(Debug, Default)]
pub struct ServerHandle {
    pub slot: Slot,
    pub live: Arc<ServerLive>,
}

/// A server connection as the registry keeps it: what it was opened with, where its cancels
/// go, and its live state.
struct ServerRecord {
    entry: ServerEntry,
    cancel: crate::cancel::CancelTarget,
    live: Arc<ServerLive>,
}

/// What a client is doing, pgbouncer's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Waiting,
    Active,
    /// Connected to the admin console.
    Admin,
}

/// One client as the admin console shows it.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    pub id: u64,
    /// What the client sent (the server side uses the DSN's user and database).
    pub names: Names,
    pub addr: SocketAddr,
    pub state: ClientState,
    pub connect_time: Stamp,
    pub request_time: Stamp,
}

/// Where an entry sits in its registry, and whose it is: a handle whose entry is gone (the
/// slot since reused) touches nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    index: usize,
    /// The entry's id; 0 for a handle that was never registered.
    id: u64,
}

impl Slot {
    pub fn id(self) -> u64 {
        self.id
    }
}

/// Looks up a slot's entry if it is still the one the slot was given for.
fn entry_mut<T: HasId>(slab: &mut Slab<T>, slot: Slot) -> Option<&mut T> {
    slab.get_mut(slot.index).filter(|e| e.id() == slot.id)
}

fn entry<T: HasId>(slab: &Slab<T>, slot: Slot) -> Option<&T> {
    slab.get(slot.index).filter(|e| e.id() == slot.id)
}

fn remove_entry<T: HasId>(slab: &mut Slab<T>, slot: Slot) {
    if slab.get(slot.index).is_some_and(|e| e.id() == slot.id) {
        slab.remove(slot.index);
    }
}

trait HasId {
    fn id(&self) -> u64;
}

impl HasId for ClientEntry {
    fn id(&self) -> u64 {
        self.id
    }
}

impl HasId for ServerRecord {
    fn id(&self) -> u64 {
        self.entry.id
    }
}

/// Live clients and servers. Touched at connect, assignment and release only, never per
/// message. Entries live in slabs (a vector with a free list): one entry-sized slot per
/// connection, where a hash map kept up to twice that plus its keys.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    clients: Mutex<Slab<ClientEntry>>,
    servers: Mutex<Slab<ServerRecord>>,
    reported_server_labels: Mutex<Vec<(&'static str, u64)>>,
    info: Mutex<Option<InfoLabels>>,
}

impl Registry {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed) + 1
    }

    pub fn clients(&self) -> Vec<ClientEntry> {
        let mut v: Vec<_> = crate::lock(&self.clients)
            .iter()
            .map(|(_, c)| c.clone())
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn servers(&self) -> Vec<ServerEntry> {
        let mut v: Vec<_> = crate::lock(&self.servers)
            .iter()
            .map(|(_, s)| {
                let mut entry = s.entry.clone();
                (entry.state, entry.client) = s.live.state();
                entry.request_time = Stamp(s.live.request_time.load(Relaxed));
                entry
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Registers a server connection (its `state`, `request_time` and `client` come from
    /// `live`); the slot removes it.
    pub fn add_server(
        &self,
        entry: ServerEntry,
        cancel: crate::cancel::CancelTarget,
        live: Arc<ServerLive>,
    ) -> Slot {
        let id = entry.id;
        let index = crate::lock(&self.servers).insert(ServerRecord {
            entry,
            cancel,
            live,
        });
        Slot { index, id }
    }

    /// Where a cancel from client `id` goes: the backend of the server connection it is
    /// linked to, and that connection's live state (to check the link again).
    pub fn cancel_target(&self, id: u64) -> Option<(crate::cancel::CancelTarget, Arc<ServerLive>)> {
        crate::lock(&self.servers)
            .iter()
            .find(|(_, s)| s.live.serves(id))
            .map(|(_, s)| (s.cancel.clone(), s.live.clone()))
    }

    pub fn remove_server(&self, slot: Slot) {
        remove_entry(&mut crate::lock(&self.servers), slot);
    }

    /// Forgets every server entry (when the pool knows it holds none).
    pub fn clear_servers(&self) {
        crate::lock(&self.servers).clear();
    }

    fn update_client(&self, slot: Slot, f: impl FnOnce(&mut ClientEntry)) {
        if let Some(c) = entry_mut(&mut crate::lock(&self.clients), slot) {
            f(c);
        }
    }
}

/// Keeps a client listed while it is connected. Owns a handle on the stats, so a client's
/// state can outlive its task (a parked idle client).
pub struct ClientGuard {
    stats: Arc<Stats>,
    slot: Slot,
}

impl Stats {
    /// Registers a client; the entry disappears when the returned guard drops.
    pub fn add_client(self: &Arc<Self>, entry: ClientEntry) -> ClientGuard {
        let id = entry.id;
        let index = crate::lock(&self.registry.clients).insert(entry);
        ClientGuard {
            stats: self.clone(),
            slot: Slot { index, id },
        }
    }
}

impl ClientGuard {
    pub fn id(&self) -> u64 {
        self.slot.id
    }

    /// The client's address, as listed (a parked client keeps it only here).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        entry(&crate::lock(&self.stats.registry.clients), self.slot).map(|c| c.addr)
    }

    /// The client is served by `server` from now on: SHOW CLIENTS and SHOW SERVERS link them
    /// and its cancel requests go there.
    pub fn link(&self, server: &ServerHandle) {
        let now = Stamp::coarse();
        server.live.request_time.store(now.0, Relaxed);
        server.live.holder.store(self.slot.id, Ordering::Release);
        self.stats.registry.update_client(self.slot, |c| {
            c.state = ClientState::Active;
            c.request_time = now;
        });
    }

    /// The client leaves `server` (it stays active in pgbouncer's words: a transaction-mode
    /// client between transactions is). Its cancels are no longer routed there.
    ///
    /// The store is sequentially consistent, and so is the caller's check for cancels in
    /// flight that follows it ([`crate::cancel::CancelMap::cancel_in_flight`]); a cancel
    /// lookup marks itself in flight and then checks the link, both sequentially consistent.
    /// So either the check here sees the cancel and waits for it, or the lookup sees the link
    /// gone and drops the cancel: a cancel never reaches the backend once it serves someone
    /// else.
    pub fn unlink(&self, server: &ServerHandle) {
        server.live.holder.store(HELD, Ordering::SeqCst);
    }

    /// The client is logged in and holds no server: active in pgbouncer's words.
    pub fn set_active(&self) {
        self.stats.registry.update_client(self.slot, |c| {
            c.state = ClientState::Active;
        });
    }

    /// The client waits for a server from now on.
    pub fn set_waiting(&self) {
        self.stats.registry.update_client(self.slot, |c| {
            c.state = ClientState::Waiting;
            c.request_time = Stamp::now();
        });
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        remove_entry(&mut crate::lock(&self.stats.registry.clients), self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_buckets_are_inclusive_and_cumulative() {
        let h = LatencyHistogram::new();
        h.record_ns(0);
        h.record_ns(100_000); // exactly 0.0001 s: in the first bucket (le)
        h.record_ns(100_001);
        h.record(std::time::Duration::from_secs(61)); // beyond the last bound
        let mut text = String::new();
        h.render("x_seconds", "test", &mut text);
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
                .parse()
                .unwrap()
        };
        assert_eq!(value("x_seconds_bucket{le=\"0.0001\"}"), 2.0);
        assert_eq!(value("x_seconds_bucket{le=\"0.00025\"}"), 3.0);
        assert_eq!(value("x_seconds_bucket{le=\"60\"}"), 3.0);
        assert_eq!(value("x_seconds_bucket{le=\"+Inf\"}"), 4.0);
        assert_eq!(value("x_seconds_count"), 4.0);
        assert!((value("x_seconds_sum") - 61.000200001).abs() < 1e-9);
        assert!(text.contains("# TYPE x_seconds histogram"));
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_ns(), 61_000_200_001);
    }

    /// Every client keeps a SHOW CLIENTS entry, parked or not.
    #[test]
    fn a_client_entry_stays_small_and_keeps_its_times() {
        let size = std::mem::size_of::<ClientEntry>();
        println!("ClientEntry: {size} bytes");
        assert!(size <= 80, "ClientEntry is {size} bytes (limit 80)");
        let before = SystemTime::now();
        let stamp = Stamp::now();
        let back = SystemTime::from(stamp);
        let off = back.duration_since(before).unwrap_or_else(|e| e.duration());
        assert!(off < std::time::Duration::from_millis(100), "{off:?}");
        assert!(stamp.elapsed() < std::time::Duration::from_secs(5));
        // The coarse clock lags by a kernel tick at most (1 to 4 ms; 100 ms allowed here).
        let coarse = SystemTime::from(Stamp::coarse());
        let off = coarse
            .duration_since(SystemTime::now())
            .unwrap_or_else(|e| e.duration());
        assert!(off < std::time::Duration::from_millis(100), "{off:?}");
    }

    #[test]
    fn registry_lists_and_forgets() {
        let stats = Arc::new(Stats::new());
        let r = &stats.registry;
        let addr: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let dsn = dbcred::Dsn::parse("host=127.0.0.1 user=u sslmode=disable").unwrap();
        let route = Arc::new(crate::server::CancelRoute {
            addr,
            host: "127.0.0.1".into(),
            policy: dbcred::ServerTlsPolicy::from_dsn(&dsn).unwrap(),
            tls: false,
        });
        let add = |pid: i32, live: &Arc<ServerLive>| {
            r.add_server(
                ServerEntry {
                    id: r.next_id(),
                    generation: 1,
                    names: Names::new("u", "d", ""),
                    addr,
                    backend_pid: pid,
                    state: ServerState::Active,
                    connect_time: Stamp::now(),
                    request_time: Stamp::now(),
                    client: None,
                },
                crate::cancel::CancelTarget {
                    route: route.clone(),
                    pid,
                    key: 1,
                },
                live.clone(),
            )
        };
        let mut server = ServerHandle::default();
        server.slot = add(7, &server.live);
        let id = r.next_id();
        {
            let g = stats.add_client(ClientEntry {
                id,
                names: Names::new("u", "d", ""),
                addr,
                state: ClientState::Waiting,
                connect_time: Stamp::now(),
                request_time: Stamp::now(),
            });
            g.link(&server);
            // A parked client finds its address here.
            assert_eq!(g.peer(), Some(addr));
            let c = r.clients();
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].state, ClientState::Active);
            let s = r.servers();
            assert_eq!((s[0].state, s[0].client), (ServerState::Active, Some(id)));
            g.unlink(&server);
            assert_eq!(r.servers()[0].client, None);
        }
        assert!(r.clients().is_empty());
        let names = Names::new("us\0er", "", "app");
        assert_eq!(
            (names.user(), names.database(), names.application_name()),
            ("user", "", "app")
        );
        server.live.release();
        assert_eq!(r.servers()[0].state, ServerState::Idle);
        // A stale handle (its entry cleared, the slot reused) removes nothing.
        r.clear_servers();
        let other = ServerHandle::default();
        let again = add(8, &other.live);
        r.remove_server(server.slot);
        let listed = r.servers();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].backend_pid, listed[0].state),
            (8, ServerState::Active)
        );
        r.remove_server(again);
        assert!(r.servers().is_empty());
    }

    #[test]
    fn names_are_shared_and_the_set_forgets_unused_ones() {
        let a = Names::new("intern_u", "intern_d", "app");
        let b = Names::new("intern_u", "intern_d", "app");
        assert!(Arc::ptr_eq(&a.0, &b.0), "equal names share one allocation");
        assert!(!Arc::ptr_eq(
            &a.0,
            &Names::new("intern_u", "intern_d", "other").0
        ));
        // Thousands of distinct names, each dropped at once: the set stays bounded.
        for i in 0..5000 {
            drop(Names::new("intern_u", "intern_d", &format!("app{i}")));
        }
        let len = crate::lock(&INTERNED).as_ref().unwrap().set.len();
        assert!(len <= 1000, "{len} names kept for a handful in use");
        // A name still in use survives the sweeps and is still shared.
        assert!(Arc::ptr_eq(
            &a.0,
            &Names::new("intern_u", "intern_d", "app").0
        ));
    }
}
