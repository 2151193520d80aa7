//! Wires the proxy together: check the configuration, bind listeners and the ops port,
//! start the credential watcher and janitor, serve, and shut down on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dbcred::{Dsn, FileWatcher, WatchConfig};

use crate::auth::scram_server::ScramVerifier;
use crate::cancel::CancelMap;
use crate::client::ClientContext;
use crate::config::{PoolMode, RunArgs};
use crate::credentials::{Credentials, run_watcher};
use crate::error::{ProxyError, Result};
use crate::listener::{ClientCounter, accept_loop, bind_all, resolve};
use crate::migrate::MigratePolicy;
use crate::ops::{Readiness, serve as serve_ops};
use crate::pool::{Pool, PoolConfig};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Reads the DSN the way `--dbc` describes: a file with a URI or key=value text, or a
/// directory with one file per key. Errors never include the file's content.
pub fn read_dsn(path: &Path) -> std::result::Result<Dsn, String> {
    if path.is_dir() {
        return Dsn::from_secret_dir(path).map_err(|e| e.to_string());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))?;
    Dsn::parse(&text).map_err(|e| e.to_string())
}

/// Reads the client password file (one line; a trailing newline is not part of it).
fn read_client_password(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ProxyError::Config(format!(
            "cannot read --client-password-file {}: {}",
            path.display(),
            e.kind()
        ))
    })?;
    let password = text.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(ProxyError::Config(format!(
            "--client-password-file {} is empty",
            path.display()
        )));
    }
    Ok(password)
}

/// Runs the proxy until a shutdown signal and the drain that follows.
pub async fn run(
    args: RunArgs,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<()> {
    if args.pool_size == 0 {
        return Err(ProxyError::Config("--pool-size must be at least 1".into()));
    }
    if args.min_pool_size > args.pool_size {
        return Err(ProxyError::Config(format!(
            "--min-pool-size ({}) exceeds --pool-size ({}): lower --min-pool-size or raise --pool-size",
            args.min_pool_size, args.pool_size
        )));
    }

    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in &args.addr {
        match resolve(a).await {
            Ok(mut r) => addrs.append(&mut r),
            Err(e) => tracing::warn!(error = %e, "skipping listener address"),
        }
    }
    let needs_password = addrs.iter().any(|a| !a.ip().is_loopback());
    let scram = match (&args.client_password_file, needs_password) {
        (Some(path), _) => Some(Arc::new(ScramVerifier::new(&read_client_password(path)?))),
        (None, true) => {
            return Err(ProxyError::Config(
                "listening on a non-loopback --addr requires --client-password-file (clients then log in with SCRAM-SHA-256); \
                 without it anyone on the network could use the database credentials"
                    .into(),
            ));
        }
        (None, false) => None,
    };

    let (trigger, shutdown) = Shutdown::new();
    let stats = Arc::new(Stats::new());
    let credentials = Credentials::new(args.role_policy(), args.validate_timeout());
    let pool = Pool::new(
        PoolConfig {
            size: args.pool_size,
            min: args.min_pool_size,
            timeout: args.pool_timeout(),
            idle_timeout: Duration::from_secs(args.server_idle_timeout),
            lifetime: Duration::from_secs(args.server_lifetime),
        },
        credentials.clone(),
        stats.clone(),
    );
    pool.set_admin_settings(crate::admin::AdminSettings::new(&args));
    let readiness = Arc::new(Readiness {
        listeners_bound: Default::default(),
        credentials: credentials.clone(),
    });
    let ops = serve_ops(
        args.ops_addr,
        readiness.clone(),
        metrics,
        stats.clone(),
        shutdown.clone(),
    )
    .await?;

    let dbc = args.dbc.clone();
    let watcher = FileWatcher::spawn(
        dbc.clone(),
        WatchConfig {
            poll_interval: Duration::from_secs(args.poll_interval.max(1)),
            ..WatchConfig::default()
        },
        move |p: &Path| read_dsn(p),
    )
    .map_err(|e| ProxyError::Config(format!("cannot watch --dbc {}: {e}", dbc.display())))?;
    tokio::spawn(run_watcher(
        credentials.clone(),
        pool.clone(),
        watcher,
        stats.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(pool.clone().run_janitor(shutdown.clone()));
    tokio::spawn(crate::memory::give_back(shutdown.clone()));

    let bound = bind_all(&addrs).await?;
    readiness.listeners_bound.store(true, Ordering::Relaxed);
    let ctx = Arc::new(ClientContext {
        pool: pool.clone(),
        cancels: CancelMap::new(),
        stats: stats.clone(),
        scram,
        login_timeout: Duration::from_secs(args.client_login_timeout.max(1)),
        pool_timeout: args.pool_timeout(),
        max_client_message: args.max_client_message,
        client_tls: crate::tls::ClientTls::from_flags(
            args.client_tls,
            args.client_tls_cert.as_deref(),
            args.client_tls_key.as_deref(),
            Duration::from_secs(args.poll_interval.max(1)),
        )?,
        transaction_mode: args.pool_mode == PoolMode::Transaction,
        migrate: args.migrate,
        migration_timeout: Duration::from_secs(args.migration_timeout),
        max_prepared_statements: args.max_prepared_statements,
        reset_settings_between_clients: args.reset_settings_between_clients,
        known_statements: Default::default(),
        shutdown: shutdown.clone(),
        lane: start_lane(&args, &credentials, &stats, &shutdown),
        lane_after: args.session_lane_after,
        tx_lane: start_tx_lane(&args, &pool, &credentials, &stats, &shutdown),
        tx_lane_after: args.transaction_lane_after,
        parker: match args.client_park_after_ms {
            0 => None,
            ms => match crate::client::ClientParker::start(
                args.pool_mode == PoolMode::Transaction,
                Duration::from_millis(ms),
                shutdown.clone(),
            ) {
                Err(e) => {
                    // Parking saves memory; clients are served without it all the same.
                    tracing::warn!(error = %e, "cannot start the parker for idle clients (an epoll set: check the open-files limit); running without parking (--client-park-after-ms 0 says so and silences this)");
                    None
                }
                Ok(parker) => {
                    let _ = stats.parked_clients.set(parker.counter());
                    if let crate::client::ClientParker::Session(parker) = &parker
                        && args.migrate != MigratePolicy::Never
                    {
                        // A parked session has no task to notice a rotation: the rotation
                        // resumes those it moves (they move at once, then park again after
                        // --client-park-after-ms); the others stay parked.
                        let (parker, policy) = (parker.clone(), args.migrate);
                        tokio::spawn(on_rotation(
                            credentials.clone(),
                            shutdown.clone(),
                            move |g| parker.resume_if(|client| client.moved_by(policy, &g)),
                        ));
                    }
                    Some(parker)
                }
            },
        },
    });
    let counter = ClientCounter::new();
    for b in bound {
        tokio::spawn(accept_loop(
            b,
            ctx.clone(),
            counter.clone(),
            args.max_clients,
            shutdown.clone(),
        ));
    }

    crate::shutdown::wait_for_termination(Duration::from_secs(args.shutdown_delay), || {
        let asked = credentials.reload();
        tracing::info!(watcher_running = asked, "SIGHUP: re-reading the DSN file");
        // Counted after the log line is written: whoever sees the count finds the line.
        stats.reload_requested("sighup");
    })
    .await;
    tracing::info!(
        clients = counter.get(),
        timeout_s = args.shutdown_timeout,
        "shutting down: no new clients; waiting for sessions to finish"
    );
    trigger.trigger();
    let deadline = Instant::now() + Duration::from_secs(args.shutdown_timeout);
    while counter.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if counter.get() > 0 {
        tracing::warn!(
            clients = counter.get(),
            "shutdown timeout reached; closing remaining sessions"
        );
    }
    pool.close_idle();
    let _ = tokio::time::timeout(Duration::from_secs(1), ops).await;
    tracing::info!("dbproxy stopped");
    Ok(())
}

/// The session lane, in session mode on one runtime thread with `--session-lane` (with
/// worker threads the runtime's threads forward sessions side by side), and the task that
/// gives back the sessions a rotation moves.
fn start_lane(
    args: &RunArgs,
    credentials: &Arc<Credentials>,
    stats: &Arc<Stats>,
    shutdown: &Shutdown,
) -> Option<Arc<crate::lane::Lane>> {
    if !args.session_lane || args.worker_threads != 0 || args.pool_mode != PoolMode::Session {
        return None;
    }
    match crate::lane::Lane::start(shutdown.clone()) {
        Err(e) => {
            // The lane saves CPU; sessions are served without it all the same.
            tracing::warn!(error = %e, "cannot start the session lane (a thread and an epoll set: check the thread and open-files limits); the runtime forwards every session (--session-lane false says so and silences this)");
            None
        }
        Ok(lane) => {
            let weak = Arc::downgrade(&lane);
            let _ = stats
                .lane_sessions
                .set(Box::new(move || weak.upgrade().map_or(0, |l| l.len())));
            if args.migrate != MigratePolicy::Never {
                // The lane gives back the sessions a rotation moves: their tasks move them,
                // and they enter the lane again after the move.
                let (lane, policy) = (lane.clone(), args.migrate);
                tokio::spawn(on_rotation(
                    credentials.clone(),
                    shutdown.clone(),
                    move |g| lane.resume_if(move |client| client.moved_by(policy, &g)),
                ));
            }
            Some(lane)
        }
    }
}

/// The transaction lane, in transaction mode on one runtime thread with
/// `--transaction-lane`, and the task that has it give back its idle connections at each
/// rotation (the pool closes those of older generations).
fn start_tx_lane(
    args: &RunArgs,
    pool: &Arc<Pool>,
    credentials: &Arc<Credentials>,
    stats: &Arc<Stats>,
    shutdown: &Shutdown,
) -> Option<Arc<crate::txlane::TxLane>> {
    // With --reset-settings-between-clients a server that changes client is reset first, on
    // the runtime: nearly every transaction would leave the lane and come back.
    if !args.transaction_lane
        || args.worker_threads != 0
        || args.pool_mode != PoolMode::Transaction
        || args.reset_settings_between_clients
    {
        return None;
    }
    match crate::txlane::TxLane::start(pool.clone(), args.pool_timeout(), shutdown.clone()) {
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the transaction lane (a thread and an epoll set: check the thread and open-files limits); the runtime serves every client (--transaction-lane false says so and silences this)");
            None
        }
        Ok(lane) => {
            let weak = Arc::downgrade(&lane);
            let _ = stats
                .lane_clients
                .set(Box::new(move || weak.upgrade().map_or(0, |l| l.len())));
            let flushing = lane.clone();
            tokio::spawn(on_rotation(
                credentials.clone(),
                shutdown.clone(),
                move |_| flushing.flush(),
            ));
            Some(lane)
        }
    }
}

/// Calls `apply` with each credential generation published, until shutdown: how sessions
/// without a task (in the session lane, or parked) hear of a rotation.
async fn on_rotation(
    credentials: Arc<Credentials>,
    mut shutdown: Shutdown,
    apply: impl Fn(Arc<crate::credentials::Generation>),
) {
    let mut rotations = credentials.subscribe();
    let mut stop = shutdown.recv();
    loop {
        tokio::select! {
            changed = rotations.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = rotations.borrow_and_update().clone();
                if let Some(g) = current {
                    apply(g);
                }
            }
            () = &mut stop => return,
        }
    }
}
