//! Session pool: idle server connections, the pool-size limit, the bounded wait for a free
//! connection, release with reset, and the janitor that enforces idle timeout and lifetime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::credentials::Credentials;
use crate::error::{ProxyError, Result};
use crate::server::{ServerConnection, ServerParams};
use crate::shutdown::Shutdown;
use crate::stats::{Names, ServerEntry, ServerState, Stats};

/// Limits and timeouts of the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub size: usize,
    /// `--min-pool-size`.
    pub min: usize,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

struct PoolState {
    /// Boxed: a connection moves between the pool and clients once per transaction in
    /// transaction mode, and a pointer moves cheaper than the connection.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConnection>>,
    /// Server connections that exist or are being opened (idle + in use + opening).
    open: usize,
}

pub struct Pool {
    state: Mutex<PoolState>,
    /// Signalled whenever a slot frees up or a connection becomes idle.
    changed: Notify,
    credentials: Arc<Credentials>,
    config: PoolConfig,
    stats: Arc<Stats>,
    /// True while the admin console has paused new server assignments.
    paused: AtomicBool,
    /// Signalled at RESUME.
    resumed: Notify,
    /// RECONNECT: connections created up to this instant (nanoseconds since the stats epoch,
    /// plus one; 0: never) are retired at their next safe point.
    retire_before: AtomicU64,
    /// Set once at startup; the admin console reads it.
    admin: std::sync::OnceLock<Arc<crate::admin::AdminSettings>>,
    /// The ParameterStatus a server sent at login, by generation and startup parameters:
    /// transaction pooling greets new clients with it instead of taking a server (a client
    /// must never wait for a server just to log in while others hold them all).
    welcome: Mutex<Vec<Welcome>>,
    /// Startup parameter sets clients sent, shared (see [`Pool::intern_params`]).
    interned: Mutex<Vec<ServerParams>>,
    /// The startup parameters of the last connection opened for a client: what
    /// `--min-pool-size` opens connections with.
    last_params: Mutex<Option<ServerParams>>,
    /// The transaction lane's call to give back the connections it keeps idle (set once
    /// when it starts): made when a client of the runtime must wait, at RECONNECT.
    lane_flush: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Clients of the runtime waiting for a connection: the transaction lane gives back
    /// instead of keeping what its clients release while there are any.
    runtime_waiters: std::sync::atomic::AtomicUsize,
}

/// Generation, startup parameters and the ParameterStatus a server sent at login.
type Welcome = (u64, ServerParams, crate::server::ParameterStatus);

/// Login parameter sets remembered for greeting clients.
const WELCOME_CACHE: usize = 16;

/// Distinct startup parameter sets shared between clients (beyond this, a new set is not
/// shared; a set no client uses any more is forgotten when room is needed).
const INTERNED_PARAMS: usize = 64;

/// See [`Pool::slot_guard`]: borrows its pool, or owns a reference to it (a session's, which
/// may outlive its task while parked).
pub struct SlotGuard<P: std::ops::Deref<Target = Pool> = Arc<Pool>> {
    pool: P,
    armed: bool,
}

impl<P: std::ops::Deref<Target = Pool>> SlotGuard<P> {
    /// The slot is accounted for elsewhere now (returned by `release`).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl<P: std::ops::Deref<Target = Pool>> Drop for SlotGuard<P> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.slot_freed();
        }
    }
}

enum Decision {
    Take(Box<ServerConnection>),
    Open(Option<Box<ServerConnection>>),
    Wait,
}

/// Nanoseconds from the stats epoch to `t` (0 for earlier instants).
fn since_epoch_ns(t: Instant) -> u64 {
    u64::try_from(
        t.saturating_duration_since(crate::stats::hot().epoch)
            .as_nanos(),
    )
    .unwrap_or(u64::MAX - 1)
}

/// How long a server connection sits idle in the pool before the janitor drops its
/// transaction-mode round buffers.
const BUFFERS_IDLE: Duration = Duration::from_secs(1);

/// How many times a client's login retries after the Secret rotated under it.
const MAX_ROTATION_RETRIES: usize = 3;

impl Pool {
    pub fn new(config: PoolConfig, credentials: Arc<Credentials>, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(Pool {
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            changed: Notify::new(),
            credentials,
            config,
            stats,
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            retire_before: AtomicU64::new(0),
            admin: std::sync::OnceLock::new(),
            welcome: Mutex::new(Vec::new()),
            interned: Mutex::new(Vec::new()),
            last_params: Mutex::new(None),
            lane_flush: std::sync::OnceLock::new(),
            runtime_waiters: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn set_admin_settings(&self, settings: crate::admin::AdminSettings) {
        let _ = self.admin.set(Arc::new(settings));
    }

    pub fn admin_settings(&self) -> Option<Arc<crate::admin::AdminSettings>> {
        self.admin.get().cloned()
    }

    /// What a server of the current generation with these startup parameters said at login,
    /// if one has logged in.
    pub fn welcome(&self, params: &ServerParams) -> Option<crate::server::ParameterStatus> {
        let generation = self.credentials.current_number();
        let cache = self.welcome.lock().ok()?;
        cache
            .iter()
            .find(|(g, p, _)| *g == generation && p == params)
            .map(|(_, _, w)| w.clone())
    }

    /// The startup parameters a client sent, shared with every other client that sent the
    /// same ones: a sidecar's clients are mostly one application with one set, and a copy
    /// per client was about 190 bytes of each idle client's memory. Sharing also makes the
    /// pool's parameter comparisons pointer comparisons.
    pub fn intern_params(&self, params: Vec<(String, String)>) -> ServerParams {
        let mut interned = crate::lock(&self.interned);
        if let Some(known) = interned.iter().find(|p| ***p == params) {
            return known.clone();
        }
        if interned.len() >= INTERNED_PARAMS {
            // Only the table holds these: no client uses them any more.
            interned.retain(|p| Arc::strong_count(p) > 1);
        }
        let params = Arc::new(params);
        if interned.len() < INTERNED_PARAMS {
            interned.push(params.clone());
        }
        params
    }

    fn remember_welcome(&self, server: &ServerConnection) {
        if let Ok(mut cache) = self.welcome.lock() {
            if cache
                .iter()
                .any(|(g, p, _)| *g == server.generation && *p == server.params)
            {
                return;
            }
            if cache.len() >= WELCOME_CACHE {
                cache.remove(0);
            }
            cache.push((
                server.generation,
                server.params.clone(),
                server.parameter_status.clone(),
            ));
        }
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// PAUSE: clients that need a server wait (up to their pool timeout) until RESUME.
    pub fn pause(&self) {
        self.paused.store(true, SeqCst);
    }

    /// RESUME: waiting clients proceed.
    pub fn resume(&self) {
        self.paused.store(false, SeqCst);
        self.resumed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(SeqCst)
    }

    /// RECONNECT: every server connection that exists now is replaced at its next safe point;
    /// idle ones close at once, busy ones when their client releases them.
    pub fn reconnect(&self) -> usize {
        self.retire_before
            .store(since_epoch_ns(Instant::now()) + 1, SeqCst);
        self.flush_lane();
        self.sweep().0
    }

    /// A client's wait for a connection timed out.
    pub fn count_timeout(&self) {
        self.stats.pool_timeouts.increment(1);
    }

    /// Sets the transaction lane's call that gives back the connections it keeps idle.
    pub fn set_lane_flush(&self, flush: Box<dyn Fn() + Send + Sync>) {
        let _ = self.lane_flush.set(flush);
    }

    /// Asks the transaction lane for the connections it keeps idle (they come back here, or
    /// close if this pool would not keep them).
    pub fn flush_lane(&self) {
        if let Some(flush) = self.lane_flush.get() {
            flush();
        }
    }

    /// Whether clients of the runtime wait for a connection now.
    pub fn runtime_waiters(&self) -> usize {
        self.runtime_waiters.load(Relaxed)
    }

    fn retired(&self, server: &ServerConnection) -> bool {
        let before = self.retire_before.load(SeqCst);
        before != 0 && since_epoch_ns(server.created) < before
    }

    /// Forgets a server in the registry as it closes.
    fn forget(&self, server: &ServerConnection) {
        self.stats.registry.remove_server(server.registry.slot);
    }

    /// Waits while the pool is paused; an error once `deadline` passes.
    async fn wait_unpaused(&self, deadline: Instant) -> Result<()> {
        let resumed = async {
            loop {
                // Registered before the check, so a RESUME in between is not missed.
                let resumed = self.resumed.notified();
                tokio::pin!(resumed);
                resumed.as_mut().enable();
                if !self.is_paused() {
                    return;
                }
                resumed.await;
            }
        };
        match tokio::time::timeout_at(deadline.into(), resumed).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ProxyError::Timeout(
                "waiting for RESUME: the pool is paused by the admin console",
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding this lock cannot leave the state inconsistent (every
        // critical section is a few field updates), so recover from poisoning.
        crate::lock(&self.state)
    }

    /// Number of server connections open or opening.
    pub fn open_count(&self) -> usize {
        self.lock().open
    }

    pub fn idle_count(&self) -> usize {
        self.lock().idle.len()
    }

    /// A server connection for a client with startup parameters `params`: an idle one of
    /// the current generation with the same parameters, else a new one if the pool has
    /// room (evicting an idle mismatched one if needed), else wait up to `timeout`.
    pub async fn acquire(
        &self,
        params: &ServerParams,
        timeout: Duration,
    ) -> Result<Box<ServerConnection>> {
        self.acquire_with(params, timeout, false).await
    }

    /// A server connection for a session moving off `old` (which it still holds and gives
    /// back right after): may exceed the pool size by one while both exist, so a full pool
    /// of moving sessions cannot wait on itself.
    pub async fn acquire_for_move(
        &self,
        params: &ServerParams,
        timeout: Duration,
    ) -> Result<Box<ServerConnection>> {
        self.acquire_with(params, timeout, true).await
    }

    async fn acquire_with(
        &self,
        params: &ServerParams,
        timeout: Duration,
        exceed: bool,
    ) -> Result<Box<ServerConnection>> {
        if let Some(server) = self.try_acquire(params) {
            return Ok(server);
        }
        self.acquire_waiting(params, timeout, exceed).await
    }

    /// [`Pool::acquire`] after [`Pool::try_acquire`] found nothing: open a connection or wait
    /// for one, up to `timeout`.
    pub async fn acquire_waiting(
        &self,
        params: &ServerParams,
        timeout: Duration,
        exceed: bool,
    ) -> Result<Box<ServerConnection>> {
        // Counted down by a guard: the caller may drop this future midway (shutdown).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.runtime_waiters.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.runtime_waiters);
        match self.acquire_counted(params, timeout, exceed, None).await? {
            Some(server) => Ok(server),
            // Only a wait of the lane's gives up unasked.
            None => Err(ProxyError::PoolExhausted(self.config.timeout.as_secs())),
        }
    }

    /// A connection for the transaction lane's clients: [`Pool::acquire_waiting`] that does
    /// not count as a client of the runtime waiting. `wanted` counts the lane's clients still
    /// waiting for a connection with these parameters: once it is 0 (another client released
    /// one to them), the wait ends with `None` before it takes or opens a connection (with a
    /// full pool, opening one closes another: a login for nobody).
    pub async fn acquire_for_lane(
        &self,
        params: &ServerParams,
        timeout: Duration,
        wanted: &std::sync::atomic::AtomicUsize,
    ) -> Result<Option<Box<ServerConnection>>> {
        if wanted.load(Relaxed) == 0 {
            return Ok(None);
        }
        if let Some(server) = self.try_acquire(params) {
            return Ok(Some(server));
        }
        self.acquire_counted(params, timeout, false, Some(wanted))
            .await
    }

    async fn acquire_counted(
        &self,
        params: &ServerParams,
        timeout: Duration,
        exceed: bool,
        lane: Option<&std::sync::atomic::AtomicUsize>,
    ) -> Result<Option<Box<ServerConnection>>> {
        let for_lane = lane.is_some();
        let started = Instant::now();
        // The transaction lane counts its clients' waits itself (a wait on its behalf may
        // outlast them). Counted down by a guard: the caller may drop this future midway.
        struct Waiting<'a>(&'a crate::stats::Level);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.decrement();
            }
        }
        let waiting = (!for_lane).then(|| {
            self.stats.clients_waiting.increment();
            Waiting(&self.stats.clients_waiting)
        });
        let got = self
            .acquire_inner(params, started + timeout, exceed, lane)
            .await;
        drop(waiting);
        let waited = started.elapsed();
        if !for_lane {
            crate::stats::hot().pool_wait.record(waited);
        }
        if let Ok(Some(server)) = &got {
            self.assigned(
                server,
                if for_lane {
                    0
                } else {
                    waited.as_micros() as u64
                },
            );
        }
        got
    }

    /// An idle connection of the current generation with these parameters, when there is one
    /// and the pool is not paused: the common case (once per transaction in transaction
    /// mode), with no clock read, no wait registration and no gauge of waiting clients.
    pub fn try_acquire(&self, params: &ServerParams) -> Option<Box<ServerConnection>> {
        let server = self.try_take(params)?;
        crate::stats::hot().pool_wait.record_ns(0);
        self.assigned(&server, 0);
        Some(server)
    }

    fn try_take(&self, params: &ServerParams) -> Option<Box<ServerConnection>> {
        if self.is_paused() {
            return None;
        }
        let generation = self.credentials.current_number();
        if generation == 0 {
            return None;
        }
        let mut state = self.lock();
        self.take_idle(&mut state, generation, params)
    }

    /// Accounts for a server handed to a client after `waited_us` of waiting.
    fn assigned(&self, server: &ServerConnection, waited_us: u64) {
        let hot = crate::stats::hot();
        hot.assignments
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if waited_us > 0 {
            hot.wait_us
                .fetch_add(waited_us, std::sync::atomic::Ordering::Relaxed);
        }
        self.stats.clients_active.increment();
        server.registry.live.hold();
    }

    async fn acquire_inner(
        &self,
        params: &ServerParams,
        deadline: Instant,
        exceed: bool,
        lane: Option<&std::sync::atomic::AtomicUsize>,
    ) -> Result<Option<Box<ServerConnection>>> {
        let for_lane = lane.is_some();
        let mut woken = false;
        loop {
            if let Some(wanted) = lane
                && wanted.load(Relaxed) == 0
            {
                if woken {
                    // The release that woke this wait is for another waiter.
                    self.changed.notify_one();
                }
                return Ok(None);
            }
            if self.is_paused() {
                Box::pin(self.wait_unpaused(deadline)).await?;
            }
            let generation = match self.credentials.current() {
                Some(g) => g,
                None => Box::pin(self.credentials.wait_current(deadline)).await?,
            };
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered for wake-ups only once it looks like waiting, then decided again, so
            // a release in between is not missed and the common case takes no extra lock.
            let mut registered = false;
            let decision = loop {
                match self.decide(&generation, params, exceed) {
                    Decision::Wait if !registered => {
                        notified.as_mut().enable();
                        registered = true;
                    }
                    decision => break decision,
                }
            };
            match decision {
                Decision::Take(server) => return Ok(Some(server)),
                Decision::Open(victim) => {
                    if let Some(v) = victim {
                        self.forget(&v);
                        v.close();
                    }
                    // Frees the slot if opening fails, or if this future is dropped midway.
                    let slot = self.slot_guard();
                    // Boxed: logging in is the rare path, and inline it would make every
                    // acquire (one per transaction in transaction mode) a 3.5 kB future.
                    let server = Box::pin(self.open_new(generation, params, deadline)).await?;
                    slot.disarm();
                    return Ok(Some(Box::new(server)));
                }
                Decision::Wait => {
                    // Connections the transaction lane keeps idle come back for it (for a
                    // wait of the lane's own too: those it keeps have other parameters, and
                    // here one can make room for a connection with these).
                    self.flush_lane();
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        // The lane counts the timeouts that reach a client of its own.
                        if !for_lane {
                            self.count_timeout();
                        }
                        return Err(ProxyError::PoolExhausted(self.config.timeout.as_secs()));
                    }
                    woken = true;
                }
            }
        }
    }

    /// What [`Pool::acquire_inner`] does now: take an idle connection of `generation` with
    /// these parameters, open one (maybe replacing an idle mismatched one), or wait.
    fn decide(
        &self,
        generation: &crate::credentials::Generation,
        params: &ServerParams,
        exceed: bool,
    ) -> Decision {
        let mut state = self.lock();
        let found = self.take_idle(&mut state, generation.number, params);
        let decision = if let Some(server) = found {
            Decision::Take(server)
        } else if self.take_slot(&mut state, exceed) {
            Decision::Open(None)
        } else if !state.idle.is_empty() {
            // Full, but an idle connection with other parameters (or an older generation)
            // holds a slot: replace it.
            let victim = state.idle.remove(0);
            Decision::Open(Some(victim))
        } else {
            Decision::Wait
        };
        self.stats.server_connections.set(state.open);
        decision
    }

    /// Takes the most recently released idle connection of `generation` with `params`,
    /// closing dead ones met on the way.
    fn take_idle(
        &self,
        state: &mut PoolState,
        generation: u64,
        params: &ServerParams,
    ) -> Option<Box<ServerConnection>> {
        while let Some(pos) = state
            .idle
            .iter()
            .rposition(|s| s.generation == generation && s.params == *params)
        {
            let server = state.idle.swap_remove(pos);
            if server.is_alive() {
                return Some(server);
            }
            self.forget(&server);
            state.open -= 1;
            self.stats.server_connections.set(state.open);
        }
        None
    }

    /// Opens a connection; if the server says our password is wrong, the Secret has probably
    /// just rotated: ask for a re-read and retry with the newer generation.
    async fn open_new(
        &self,
        mut generation: Arc<crate::credentials::Generation>,
        params: &ServerParams,
        deadline: Instant,
    ) -> Result<ServerConnection> {
        let mut retries = 0;
        loop {
            let id = self.stats.registry.next_id();
            let span = tracing::debug_span!("server", id, generation = generation.number);
            let connect = ServerConnection::connect(&generation, params, deadline);
            let err = match tracing::Instrument::instrument(connect, span).await {
                Ok(mut server) => {
                    let now = crate::stats::Stamp::now();
                    tracing::debug!(server.id = id, generation = server.generation, peer = %server.peer(), backend_pid = server.backend_pid, "server connection opened");
                    let cancel = crate::cancel::CancelTarget {
                        route: server.cancel_route.clone(),
                        pid: server.backend_pid,
                        key: server.backend_key,
                    };
                    server.registry.slot = self.stats.registry.add_server(
                        ServerEntry {
                            id,
                            generation: server.generation,
                            names: Names::new(
                                generation.dsn.user().unwrap_or(""),
                                generation
                                    .dsn
                                    .dbname()
                                    .or(generation.dsn.user())
                                    .unwrap_or(""),
                                "",
                            ),
                            addr: server.peer(),
                            backend_pid: server.backend_pid,
                            state: ServerState::Active,
                            connect_time: now,
                            request_time: now,
                            client: None,
                        },
                        cancel,
                        server.registry.live.clone(),
                    );
                    self.remember_welcome(&server);
                    if self.config.min > 0 {
                        *crate::lock(&self.last_params) = Some(params.clone());
                    }
                    return Ok(server);
                }
                Err(e) => e,
            };
            if let ProxyError::ServerRejected { fields, .. } = &err {
                self.stats.server_login_failed(&fields.code);
            }
            let rotated = matches!(&err, ProxyError::ServerRejected { fields, .. } if fields.is_auth_failure());
            if !rotated || retries >= MAX_ROTATION_RETRIES {
                return Err(err);
            }
            retries += 1;
            self.credentials.report_auth_failure(generation.number);
            match self
                .credentials
                .wait_newer(generation.number, deadline)
                .await
            {
                Some(newer) => generation = newer,
                // Nothing newer arrived within the client's wait: the server's own error
                // reaches the client.
                None => return Err(err),
            }
        }
    }

    /// A guard that gives one slot back when dropped, unless disarmed: a session that
    /// panics or is cancelled must not leak its place in the pool.
    pub fn slot_guard(&self) -> SlotGuard<&Pool> {
        SlotGuard {
            pool: self,
            armed: true,
        }
    }

    /// [`Pool::slot_guard`] owning a reference to the pool.
    pub fn owned_slot_guard(self: &Arc<Self>) -> SlotGuard {
        SlotGuard {
            pool: self.clone(),
            armed: true,
        }
    }

    fn slot_freed(&self) {
        {
            let mut state = self.lock();
            state.open = state.open.saturating_sub(1);
            self.stats.server_connections.set(state.open);
            if state.open == 0 {
                // A session that panicked dropped its server without telling us which.
                self.stats.registry.clear_servers();
            }
        }
        self.changed.notify_one();
    }

    /// Takes a connection back from a client. `clean` says the session ended at a safe point
    /// (idle, nothing in flight); only then, and only for the current generation within its
    /// lifetime, is it reset and kept.
    pub async fn release(&self, server: Box<ServerConnection>, clean: bool) {
        self.release_with(server, clean, true).await
    }

    /// Like [`Pool::release`]; `reset: false` keeps the session state (transaction pooling
    /// carries prepared statements and settings on the connection and syncs them per client).
    pub async fn release_with(&self, mut server: Box<ServerConnection>, clean: bool, reset: bool) {
        if !reset {
            self.release_now(server, clean);
            return;
        }
        self.stats.clients_active.decrement();
        if self.keeps(&server, clean, Instant::now()) && Box::pin(server.reset()).await.is_ok() {
            // (The generation may have changed during the reset: checked there.)
            self.add_idle(server, Instant::now());
        } else {
            self.close_counted(server);
        }
    }

    /// [`Pool::release_with`] without a reset: no await. (Transaction mode releases once per
    /// transaction, almost never with a reset.)
    pub fn release_now(&self, server: Box<ServerConnection>, clean: bool) {
        self.stats.clients_active.decrement();
        let now = Instant::now();
        if self.keeps(&server, clean, now) {
            self.add_idle(server, now);
        } else {
            self.close_counted(server);
        }
    }

    /// The transaction lane takes `server` (kept idle by it) for a client: counted as
    /// [`Pool::try_acquire`] counts a connection it hands out.
    pub fn lane_assign(&self, server: &ServerConnection, waited: Option<Duration>) {
        match waited {
            None => {
                crate::stats::hot().pool_wait.record_ns(0);
                self.assigned(server, 0);
            }
            Some(waited) => {
                crate::stats::hot().pool_wait.record(waited);
                self.assigned(server, waited.as_micros() as u64);
            }
        }
    }

    /// A client of the transaction lane starts (or stops) waiting for a connection.
    pub fn lane_waiting(&self, waiting: bool) {
        if waiting {
            self.stats.clients_waiting.increment();
        } else {
            self.stats.clients_waiting.decrement();
        }
    }

    /// A client of the transaction lane released `server`, which the lane keeps idle: counted
    /// as idle, not in the pool's list.
    pub fn lane_idle(&self, server: &ServerConnection) {
        self.stats.clients_active.decrement();
        server.registry.live.release();
    }

    /// Whether the pool would keep `server` if it were released clean at `now` (the
    /// transaction lane asks before keeping one idle itself, with a clock it reads about
    /// every second rather than once per transaction).
    pub fn would_keep(&self, server: &ServerConnection, now: Instant) -> bool {
        !self.is_paused() && self.keeps(server, true, now)
    }

    /// A connection the transaction lane kept idle comes back: kept idle here, or closed if
    /// the pool would not keep it.
    pub fn lane_return(&self, server: Box<ServerConnection>) {
        let now = Instant::now();
        if self.keeps(&server, true, now) {
            self.add_idle(server, now);
        } else {
            self.close_counted(server);
        }
    }

    /// The transaction lane lost `n` connections (its thread panicked): their slots go back.
    pub fn lost_slots(&self, n: usize) {
        for _ in 0..n {
            self.slot_freed();
        }
    }

    /// Closes a connection the transaction lane kept (its socket out of the runtime: the
    /// caller sends Terminate on it), and gives its slot back.
    pub fn lane_close(&self, server: Box<ServerConnection>) {
        self.forget(&server);
        drop(server);
        self.slot_freed();
    }

    /// Whether a released connection goes back to the pool: clean, of the current generation,
    /// within its lifetime, not retired.
    fn keeps(&self, server: &ServerConnection, clean: bool, now: Instant) -> bool {
        clean
            && server.generation == self.credentials.current_number()
            // An addition and a comparison: cheaper than the checked subtraction of
            // `saturating_duration_since` on the per-transaction release.
            && server
                .created
                .checked_add(self.config.lifetime)
                .is_none_or(|end| now < end)
            && !self.retired(server)
    }

    /// Closes a connection that holds a slot, and gives the slot back.
    fn close_counted(&self, server: Box<ServerConnection>) {
        self.forget(&server);
        server.close();
        self.slot_freed();
    }

    /// Closes idle connections that are too old, idle too long, dead, or of an older
    /// generation. Called by the janitor and after each new generation. Returns how many it
    /// closed, and the startup parameters of those closed for an older generation alone
    /// (alive, in their lifetime, not idle too long), which a rotation replaces.
    pub fn sweep(&self) -> (usize, Vec<ServerParams>) {
        let current = self.credentials.current_number();
        let mut closed = Vec::new();
        let mut replaceable = Vec::new();
        {
            let mut state = self.lock();
            let mut i = 0;
            while i < state.idle.len() {
                let s = &state.idle[i];
                // Idle too long only above --min-pool-size.
                let idle_expired = s.idle_since.elapsed() >= self.config.idle_timeout
                    && state.open.saturating_sub(closed.len()) > self.config.min;
                let expired = idle_expired
                    || s.created.elapsed() >= self.config.lifetime
                    || self.retired(s)
                    || !s.is_alive();
                if expired || s.generation != current {
                    if !expired {
                        replaceable.push(s.params.clone());
                    }
                    closed.push(state.idle.swap_remove(i));
                    continue;
                }
                // Transaction mode: a connection idle for a while gives back its round
                // buffers (a pool that was busy once keeps no 9 kB per connection).
                let s = &mut state.idle[i];
                if s.idle_since.elapsed() >= BUFFERS_IDLE
                    && let Some(txn) = s.txn.as_mut()
                {
                    crate::memory::freed(txn.drop_idle_buffers());
                }
                i += 1;
            }
            state.open = state.open.saturating_sub(closed.len());
            self.stats.server_connections.set(state.open);
        }
        let n = closed.len();
        for s in closed {
            self.forget(&s);
            s.close();
        }
        if n > 0 {
            self.changed.notify_waiters();
        }
        (n, replaceable)
    }

    /// After a rotation: idle connections of older generations close at once; busy ones
    /// close when their clients release them.
    ///
    /// Each idle connection closed for its generation alone is replaced at once, in the
    /// background, by one of the new generation with the same startup parameters: the
    /// clients that come next find it ready instead of waiting for a login (a connection, a
    /// backend start and SCRAM's key derivation on the server). Only while the pool has room
    /// and is not paused; a replacement that fails leaves its slot free and is only logged
    /// (at debug level: the next client opens one itself, with the usual retries).
    pub fn retire_old_generations(self: &Arc<Self>) {
        let (n, replaceable) = self.sweep();
        if n > 0 {
            tracing::info!(
                closed = n,
                replacing = replaceable.len(),
                "closed idle server connections of older credential generations"
            );
        }
        for params in replaceable {
            if !self.open_ahead(params) {
                break;
            }
        }
        self.fill_to_min();
    }

    /// Opens a connection with `params` in the background, with no client waiting for it:
    /// it goes idle. False (nothing done) when the pool is full or paused. A failure leaves
    /// the slot free and is only logged (at debug level: the next client opens one itself,
    /// with the usual retries).
    fn open_ahead(self: &Arc<Self>, params: ServerParams) -> bool {
        if self.is_paused() || !self.reserve_slot() {
            return false;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let slot = pool.owned_slot_guard();
            let Some(generation) = pool.credentials.current() else {
                return;
            };
            let deadline = Instant::now() + pool.config.timeout;
            match Box::pin(pool.open_new(generation, &params, deadline)).await {
                Ok(server) => {
                    slot.disarm();
                    pool.add_idle(Box::new(server), Instant::now());
                }
                Err(e) => tracing::debug!(
                    error = %e,
                    "could not open a server connection ahead of its clients"
                ),
            }
        });
        true
    }

    /// `--min-pool-size`: opens what is missing, with the startup parameters of the last
    /// connection opened for a client (none before the first).
    fn fill_to_min(self: &Arc<Self>) {
        if self.config.min == 0 || self.credentials.current_number() == 0 {
            return;
        }
        let Some(params) = crate::lock(&self.last_params).clone() else {
            return;
        };
        let missing = self.config.min.saturating_sub(self.lock().open);
        for _ in 0..missing {
            if !self.open_ahead(params.clone()) {
                break;
            }
        }
    }

    /// Takes a slot for a connection about to be opened, if the pool has room.
    fn reserve_slot(&self) -> bool {
        let mut state = self.lock();
        let taken = self.take_slot(&mut state, false);
        self.stats.server_connections.set(state.open);
        taken
    }

    /// Counts a connection about to be opened if the pool has room (or `exceed`).
    fn take_slot(&self, state: &mut PoolState, exceed: bool) -> bool {
        let room = state.open < self.config.size || exceed;
        if room {
            state.open += 1;
        }
        room
    }

    /// A connection with no client (released, or just opened ahead of clients) goes idle,
    /// idle since `since`; closed instead if a newer generation came meanwhile.
    fn add_idle(&self, mut server: Box<ServerConnection>, since: Instant) {
        server.idle_since = since;
        let mut state = self.lock();
        if server.generation == self.credentials.current_number() {
            server.registry.live.release();
            state.idle.push(server);
            drop(state);
            self.changed.notify_one();
            return;
        }
        drop(state);
        self.close_counted(server);
    }

    /// Closes every idle connection (at shutdown).
    pub fn close_idle(&self) {
        let idle = {
            let mut state = self.lock();
            let idle = std::mem::take(&mut state.idle);
            state.open = state.open.saturating_sub(idle.len());
            idle
        };
        for s in idle {
            self.forget(&s);
            s.close();
        }
    }

    /// Runs the periodic sweep until shutdown.
    pub async fn run_janitor(self: Arc<Self>, mut shutdown: Shutdown) {
        let period = (self.config.idle_timeout.min(self.config.lifetime) / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.sweep();
                    self.fill_to_min();
                }
                _ = shutdown.recv() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<Pool> {
        Pool::new(
            PoolConfig {
                size: 1,
                min: 0,
                timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(60),
                lifetime: Duration::from_secs(3600),
            },
            Credentials::new(crate::config::RolePolicy::None, Duration::from_secs(1)),
            Arc::new(Stats::new()),
        )
    }

    fn set(app: &str) -> Vec<(String, String)> {
        vec![("application_name".to_owned(), app.to_owned())]
    }

    #[test]
    fn clients_with_the_same_startup_parameters_share_one_copy() {
        let pool = pool();
        let a = pool.intern_params(set("app"));
        let b = pool.intern_params(set("app"));
        let other = pool.intern_params(set("other"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(*other, set("other"));
    }

    #[test]
    fn the_shared_table_is_bounded_and_forgets_unused_sets() {
        let pool = pool();
        // Sets still held by clients fill the table; more are handed out, just not shared.
        let held: Vec<_> = (0..INTERNED_PARAMS)
            .map(|i| pool.intern_params(set(&format!("app{i}"))))
            .collect();
        let extra = pool.intern_params(set("extra"));
        let again = pool.intern_params(set("extra"));
        assert!(!Arc::ptr_eq(&extra, &again), "the full table grew");
        assert_eq!(crate::lock(&pool.interned).len(), INTERNED_PARAMS);
        // Once their clients are gone, their entries make room.
        drop(held);
        let shared = pool.intern_params(set("extra"));
        assert!(Arc::ptr_eq(&shared, &pool.intern_params(set("extra"))));
        assert_eq!(crate::lock(&pool.interned).len(), 1);
    }
}
