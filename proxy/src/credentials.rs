//! Credential generations: each new DSN from the watched Secret is validated by a real login
//! before it becomes current; failures keep the last good one and retry with backoff.

use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use dbcred::tls::ServerTlsPolicy;
use dbcred::{Dsn, FileWatcher, HostKind, ReloadHandle, SslMode, TimedEvent, WatchEvent};
use tokio::sync::{Notify, watch};

use crate::auth::scram_client::{SaltedPasswordCache, normalize};
use crate::config::RolePolicy;
use crate::error::{ProxyError, Result};
use crate::pool::Pool;
use crate::server::ServerConnection;
use crate::shutdown::Shutdown;
use crate::stats::{InfoLabels, Stats};
use crate::wake::{WakerList, WakerSlot};

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One validated DSN. Server connections carry the number of the generation that opened
/// them; a newer generation retires them.
pub struct Generation {
    pub number: u64,
    pub dsn: Dsn,
    /// Role for SET ROLE, derived from the policy and this DSN's user.
    pub role: Option<Arc<str>>,
    /// `user@hosts/db` ([`describe_dsn`]), shared by every server connection it opens.
    pub target: Arc<str>,
    /// Where cancels for its backends go, one per address and TLS use, shared by every server
    /// connection it opens (a session-mode client has one each: about 170 bytes saved per
    /// session).
    routes: std::sync::Mutex<Vec<Arc<crate::server::CancelRoute>>>,
    /// The password after SASLprep, for SCRAM.
    pub scram_password: Arc<[u8]>,
    /// The SCRAM salted password, derived once and shared by every login of this generation.
    pub scram_cache: Arc<SaltedPasswordCache>,
    /// The DSN's TLS policy (sslmode, root certificates, client certificate), built once: its
    /// files are read when the generation is validated, so a DSN whose sslrootcert cannot be
    /// used is rejected and the last good generation stays.
    pub tls: ServerTlsPolicy,
}

impl Generation {
    pub fn new(number: u64, dsn: Dsn, policy: &RolePolicy) -> Result<Self> {
        let role = dsn.user().and_then(|u| policy.role_for(u)).map(Into::into);
        let scram_password = normalize(dsn.password().unwrap_or("")).into();
        let tls = ServerTlsPolicy::from_dsn(&dsn).map_err(|e| ProxyError::BadDsn(e.to_string()))?;
        Ok(Generation {
            number,
            target: describe_dsn(&dsn).into(),
            dsn,
            role,
            routes: Default::default(),
            scram_password,
            scram_cache: Arc::default(),
            tls,
        })
    }

    /// `user@host:port` for logs: enough to tell generations apart, never the password.
    pub fn describe(&self) -> &str {
        &self.target
    }

    /// The shared route equal to `route` (same address, TLS name and TLS use; the policy is
    /// this generation's).
    pub fn cancel_route(
        &self,
        route: crate::server::CancelRoute,
    ) -> Arc<crate::server::CancelRoute> {
        let mut routes = crate::lock(&self.routes);
        if let Some(known) = routes
            .iter()
            .find(|r| r.addr == route.addr && r.host == route.host && r.tls == route.tls)
        {
            return known.clone();
        }
        let route = Arc::new(route);
        routes.push(route.clone());
        route
    }
}

/// `user@host:port/db` of a DSN, for logs and /readyz.
pub fn describe_dsn(dsn: &Dsn) -> String {
    let hosts = hosts_of(dsn);
    format!(
        "{}@{}/{}",
        dsn.user().unwrap_or("?"),
        hosts,
        dsn.dbname().or(dsn.user()).unwrap_or("?")
    )
}

/// The labels of `dbproxy_info` for a DSN (user, hosts, database, sslmode; no password).
pub fn info_labels(dsn: &Dsn) -> InfoLabels {
    InfoLabels {
        user: dsn.user().unwrap_or("").to_owned(),
        host: hosts_of(dsn),
        database: dsn.dbname().or(dsn.user()).unwrap_or("").to_owned(),
        sslmode: sslmode_name(dsn.sslmode()).to_owned(),
    }
}

/// libpq's spelling of an sslmode.
pub fn sslmode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

fn hosts_of(dsn: &Dsn) -> String {
    let hosts: Vec<String> = dsn
        .hosts()
        .iter()
        .map(|h| match &h.host {
            HostKind::Tcp(name) => format!("{name}:{}", h.port),
            HostKind::Unix(p) => format!("{}:{}", p.display(), h.port),
        })
        .collect();
    hosts.join(",")
}

/// The current generation and what is known about newer DSNs, shared by every task.
pub struct Credentials {
    current: watch::Sender<Option<Arc<Generation>>>,
    /// Why the newest DSN is not in use (None when the newest is current).
    problem: Mutex<Option<String>>,
    reload: Mutex<Option<ReloadHandle>>,
    /// Wakes the watcher task to retry a pending DSN now rather than after its backoff.
    auth_failed: Notify,
    role_policy: RolePolicy,
    validate_timeout: Duration,
    /// Sessions that move on rotations, woken when a generation is published. One waker per
    /// session in a slab instead of a `watch::changed()` future per session (~200 bytes,
    /// and polled again at every wake of the session's task).
    rotation_wakers: WakerList,
    /// The current generation's number, for the checks made once or twice per transaction
    /// (a load instead of the watch's lock).
    current_number: std::sync::atomic::AtomicU64,
}

/// A session's place in the rotation wake list; leaves it when dropped.
pub struct RotationWaiter {
    credentials: Arc<Credentials>,
    slot: WakerSlot,
}

impl RotationWaiter {
    /// Makes sure `waker` is woken by the next publish.
    pub fn register(&mut self, waker: &Waker) {
        self.credentials
            .rotation_wakers
            .register(&mut self.slot, waker);
    }
}

impl Drop for RotationWaiter {
    fn drop(&mut self) {
        self.credentials.rotation_wakers.remove(&mut self.slot);
    }
}

impl Credentials {
    pub fn new(role_policy: RolePolicy, validate_timeout: Duration) -> Arc<Self> {
        Arc::new(Credentials {
            current: watch::channel(None).0,
            problem: Mutex::new(Some("waiting for the first valid DSN".into())),
            reload: Mutex::new(None),
            auth_failed: Notify::new(),
            role_policy,
            validate_timeout,
            rotation_wakers: WakerList::default(),
            current_number: Default::default(),
        })
    }

    /// A place in the list of sessions woken at each publish (see [`RotationWaiter`]).
    pub fn rotation_waiter(self: &Arc<Self>) -> RotationWaiter {
        RotationWaiter {
            credentials: self.clone(),
            slot: WakerSlot::default(),
        }
    }

    /// The generation new server connections use, if any has been validated yet.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.borrow().clone()
    }

    /// Follows the current generation (sessions watch it to know when to move).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Generation>>> {
        self.current.subscribe()
    }

    pub fn current_number(&self) -> u64 {
        self.current_number
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Why the newest DSN is not (yet) in use, for /readyz and logs.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    fn set_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }

    /// Waits until a generation newer than `newer_than` exists (or `deadline`).
    pub async fn wait_newer(&self, newer_than: u64, deadline: Instant) -> Option<Arc<Generation>> {
        let mut rx = self.current.subscribe();
        let waited = tokio::time::timeout_at(
            deadline.into(),
            rx.wait_for(|g| g.as_ref().is_some_and(|g| g.number > newer_than)),
        )
        .await;
        match waited {
            Ok(Ok(g)) => g.clone(),
            _ => None,
        }
    }

    /// The current generation, waiting for the first one until `deadline`.
    pub async fn wait_current(&self, deadline: Instant) -> Result<Arc<Generation>> {
        if let Some(g) = self.current() {
            return Ok(g);
        }
        self.wait_newer(0, deadline).await.ok_or_else(|| {
            ProxyError::NoCredentials(
                self.problem()
                    .unwrap_or_else(|| "no DSN validated yet".into()),
            )
        })
    }

    /// Asks the watcher to re-read the DSN file now (SIGHUP, admin RELOAD). False when no
    /// watcher runs yet.
    pub fn reload(&self) -> bool {
        match self.reload.lock() {
            Ok(r) => match r.as_ref() {
                Some(r) => {
                    r.reload();
                    self.auth_failed.notify_one();
                    true
                }
                None => false,
            },
            Err(_) => false,
        }
    }

    /// A login with generation `number` was refused as invalid_password: the Secret has
    /// probably rotated. Re-read the file now and retry any pending DSN at once.
    pub fn report_auth_failure(&self, number: u64) {
        tracing::info!(
            generation = number,
            "login with the current credentials was refused; re-reading the DSN file"
        );
        if let Ok(r) = self.reload.lock()
            && let Some(r) = r.as_ref()
        {
            r.reload();
        }
        self.auth_failed.notify_one();
    }

    /// Makes a validated candidate the current generation (keeping its SCRAM cache, so the
    /// first client logins do not derive the key again).
    pub fn publish(&self, mut candidate: Generation) -> Arc<Generation> {
        candidate.number = self.current_number() + 1;
        let generation = Arc::new(candidate);
        self.current.send_replace(Some(generation.clone()));
        self.current_number
            .store(generation.number, std::sync::atomic::Ordering::Release);
        // After the send: a session woken here sees the new generation.
        self.rotation_wakers.wake_all();
        self.set_problem(None);
        generation
    }

    /// Logs in once with `dsn` to prove it works; returns the candidate generation.
    pub async fn validate(&self, dsn: &Dsn) -> Result<Generation> {
        let candidate = Generation::new(0, dsn.clone(), &self.role_policy)?;
        let deadline = Instant::now() + self.validate_timeout;
        let conn = ServerConnection::connect(&candidate, &Arc::new(Vec::new()), deadline).await?;
        conn.close();
        Ok(candidate)
    }
}

/// Follows the watched DSN file for the life of the process: validate, publish, retire old
/// server connections, and retry failures with capped exponential backoff.
pub async fn run_watcher(
    credentials: Arc<Credentials>,
    pool: Arc<Pool>,
    mut watcher: FileWatcher<Dsn>,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) {
    if let Ok(mut r) = credentials.reload.lock() {
        *r = Some(watcher.reload_handle());
    }
    let mut candidate: Option<Dsn> = None;
    // When the watcher noticed the change behind `candidate`.
    let mut detected = Instant::now();
    let mut backoff = BACKOFF_START;
    let mut retry_at: Option<Instant> = None;
    loop {
        let sleep_until = retry_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            event = watcher.next_timed() => match event {
                None => {
                    tracing::error!("the DSN watcher stopped; credentials will no longer follow the file");
                    return;
                }
                Some(TimedEvent { event: WatchEvent::Changed(dsn), detected: at }) => {
                    if credentials.current().is_some_and(|g| g.dsn == dsn) {
                        // The file went back to what is already in use.
                        candidate = None;
                        retry_at = None;
                        credentials.set_problem(None);
                        stats.credential_rejected.set(0.0);
                        continue;
                    }
                    tracing::info!(dsn = %describe_dsn(&dsn), "new DSN read; validating it with a login");
                    candidate = Some(dsn);
                    detected = at;
                    backoff = BACKOFF_START;
                    retry_at = Some(Instant::now());
                }
                Some(TimedEvent { event: WatchEvent::Rejected(reason), .. }) => {
                    stats.rotations_rejected.increment(1);
                    stats.credential_rejected.set(1.0);
                    let serving = credentials.current_number();
                    tracing::warn!(%reason, serving_generation = serving, "DSN file rejected; keeping the last good credentials");
                    credentials.set_problem(Some(format!("DSN file rejected: {reason}")));
                }
            },
            _ = tokio::time::sleep_until(sleep_until.into()), if retry_at.is_some() => {
                let Some(dsn) = candidate.clone() else {
                    retry_at = None;
                    continue;
                };
                match credentials.validate(&dsn).await {
                    Ok(validated) => {
                        let generation = credentials.publish(validated);
                        stats.rotations_applied.increment(1);
                        stats.generation.set(generation.number as f64);
                        stats.set_info(info_labels(&generation.dsn));
                        if generation.number > 1 {
                            // The first generation is the startup, not a rotation.
                            stats.rotation_seconds.record(detected.elapsed().as_secs_f64());
                        }
                        stats.credential_rejected.set(0.0);
                        tracing::info!(generation = generation.number, dsn = %generation.describe(), "credential generation applied");
                        pool.retire_old_generations();
                        candidate = None;
                        retry_at = None;
                    }
                    Err(e) => {
                        if let ProxyError::ServerRejected { fields, .. } = &e {
                            stats.server_login_failed(&fields.code);
                        }
                        // Count each rejected DSN once, not each retry.
                        if backoff == BACKOFF_START {
                            stats.rotations_rejected.increment(1);
                        }
                        stats.credential_rejected.set(1.0);
                        let serving = credentials.current_number();
                        tracing::warn!(error = %e, dsn = %describe_dsn(&dsn), serving_generation = serving, retry_in_s = backoff.as_secs(), "new DSN failed validation; keeping the last good credentials");
                        credentials.set_problem(Some(format!("new DSN {} failed validation: {e}", describe_dsn(&dsn))));
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            _ = credentials.auth_failed.notified(), if candidate.is_some() => {
                retry_at = Some(Instant::now());
            }
            _ = shutdown.recv() => return,
        }
    }
}
