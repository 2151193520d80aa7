//! End-to-end: live migration of session-mode clients to the new credential generation's backend
//! (`--migrate`, `--migration-timeout`) through the real `dbproxy` binary, between two real
//! PostgreSQL clusters with the same roles and database.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::*;
use dbtests::PasswordKind;
use dbtests::postgres::PgOptions;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// The bound for "every session moved" after a rotation (generous: this machine is shared).
const MOVE_DEADLINE: Duration = Duration::from_secs(30);

fn port_of(cluster: &AppCluster) -> i32 {
    i32::from(cluster.cluster.port())
}

/// The one-row, one-column text result of a simple-protocol query.
async fn simple_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// Polls `client` until `inet_server_port()` is `want` (every query must succeed).
async fn wait_on_port(
    client: &Client,
    want: i32,
    since: Instant,
    what: &str,
) -> anyhow::Result<Duration> {
    loop {
        let port = tokio::time::timeout(CLIENT_OP_TIMEOUT, server_port(client))
            .await
            .with_context(|| format!("{what}: query hung"))?
            .with_context(|| format!("{what}: query failed while waiting to move"))?;
        if port == want {
            return Ok(since.elapsed());
        }
        ensure!(
            since.elapsed() < MOVE_DEADLINE,
            "{what}: still on port {port} {:?} after the rotation (want {want} within {MOVE_DEADLINE:?})",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one migrating client saw.
struct MoveReport {
    k: i32,
    client: Client,
    moved_after: Option<Instant>,
    on_a: u32,
    on_b: u32,
    errors: Vec<String>,
}

/// 50 session-mode clients, each with a SET, a startup application_name, a protocol prepared
/// statement and an SQL PREPARE, loop queries while the Secret moves to another cluster: every
/// client ends up on the new cluster within 30 s with zero errors, its setting and both
/// statements intact; no old backend is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_sessions_move_with_their_state() -> anyhow::Result<()> {
    const CLIENTS: i32 = 50;
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let (a_port, b_port) = (port_of(&a), port_of(&b));
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-size", "120"])
        .start()?;
    let port = proxy.port();
    let ready = Arc::new(AtomicUsize::new(0));
    // clients stop 60 s after the rotation at the latest (and 240 s after the start in any case)
    let rotated: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let give_up = Instant::now() + Duration::from_secs(240);

    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let (ready, rotated) = (ready.clone(), rotated.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("mig{k}");
            let client = connect_with(&proxy_config(port, &name, &name)).await?;
            let work_mem = format!("{}MB", 64 + k);
            client
                .batch_execute(&format!("SET work_mem = '{work_mem}'"))
                .await?;
            // A custom setting (pg_settings does not list them), set with SET or with
            // set_config in the extended protocol.
            let tenant = format!("t{k}");
            if k % 2 == 0 {
                client
                    .batch_execute(&format!("SET app.tenant = '{tenant}'"))
                    .await?;
            } else {
                client
                    .query_one("SELECT set_config('app.tenant', $1, false)", &[&tenant])
                    .await?;
            }
            let stmt = client
                .prepare(&format!(
                    "SELECT $1::int4 + {k}, inet_server_port(), current_setting('work_mem'), \
                     current_setting('application_name'), current_setting('app.tenant', true)"
                ))
                .await?;
            client
                .batch_execute(&format!("PREPARE sq(int) AS SELECT $1 * 10 + {k}"))
                .await?;
            let mut report = MoveReport {
                k,
                client,
                moved_after: None,
                on_a: 0,
                on_b: 0,
                errors: Vec::new(),
            };
            for i in 0..10_000i32 {
                let late = rotated
                    .get()
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(60));
                if late || Instant::now() > give_up || report.errors.len() >= 5 {
                    break;
                }
                let step = async {
                    let row = report.client.query_one(&stmt, &[&i]).await?;
                    let sq = simple_value(&report.client, &format!("EXECUTE sq({i})")).await?;
                    Ok::<_, tokio_postgres::Error>((row, sq))
                };
                let (row, sq) = match tokio::time::timeout(CLIENT_OP_TIMEOUT, step).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(err)) => {
                        report.errors.push(format!("iteration {i}: {err:?}"));
                        continue;
                    }
                    Err(_) => {
                        report.errors.push(format!("iteration {i}: hung"));
                        continue;
                    }
                };
                let server: i32 = row.get(1);
                let checks = [
                    (row.get::<_, i32>(0) == i + k, "protocol statement result"),
                    (row.get::<_, String>(2) == work_mem, "work_mem"),
                    (row.get::<_, String>(3) == name, "application_name"),
                    (
                        row.get::<_, Option<String>>(4).as_deref() == Some(tenant.as_str()),
                        "app.tenant",
                    ),
                    (sq == (i * 10 + k).to_string(), "SQL prepared statement sq"),
                ];
                for (ok, what) in checks {
                    if !ok {
                        report.errors.push(format!(
                            "iteration {i} on port {server}: wrong {what} (row {row:?}, sq {sq:?})"
                        ));
                    }
                }
                if server == a_port {
                    report.on_a += 1;
                    if report.on_a == 3 {
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                    if report.moved_after.is_some() {
                        report
                            .errors
                            .push(format!("iteration {i}: back on the old cluster"));
                    }
                } else if server == b_port {
                    report.moved_after.get_or_insert_with(Instant::now);
                    report.on_b += 1;
                    if report.on_b >= 5 {
                        break;
                    }
                } else {
                    report
                        .errors
                        .push(format!("iteration {i}: unknown server port {server}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, anyhow::Error>(report)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while ready.load(Ordering::SeqCst) < CLIENTS as usize {
        ensure!(
            Instant::now() < deadline,
            "only {} of {CLIENTS} clients got going on the first cluster within 90 s",
            ready.load(Ordering::SeqCst)
        );
        ensure!(
            !tasks.iter().any(|t| t.is_finished()),
            "a client ended before the rotation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let since = write_uri(&secret, &b.uri("app_a"))?;
    let _ = rotated.set(since);

    let mut reports = Vec::new();
    for task in tasks {
        let report = tokio::time::timeout(Duration::from_secs(200), task)
            .await
            .context("a client task hung")???;
        reports.push(report);
    }
    let mut latencies = Vec::new();
    let mut problems = Vec::new();
    for r in &reports {
        if !r.errors.is_empty() {
            problems.push(format!(
                "client {}: {:?}",
                r.k,
                &r.errors[..r.errors.len().min(3)]
            ));
        }
        match r.moved_after {
            Some(at) => latencies.push(at.saturating_duration_since(since)),
            None => problems.push(format!(
                "client {} never moved ({} queries on the old cluster, {} on the new)",
                r.k, r.on_a, r.on_b
            )),
        }
    }
    let max = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "{} of {CLIENTS} clients moved; slowest {max:?} after the Secret write; {} client(s) with problems",
        latencies.len(),
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} problem(s): {problems:#?}",
        problems.len()
    );
    assert!(
        max <= MOVE_DEADLINE,
        "the slowest client moved {max:?} after the Secret write (want within {MOVE_DEADLINE:?})"
    );
    // the old backends are gone while the clients are still connected
    let admin_a = a.admin().await?;
    let t = Instant::now();
    loop {
        let left: i64 = admin_a
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mig%'",
                &[],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            t.elapsed() < MOVE_DEADLINE,
            "{left} old backend(s) of moved clients still open on the old cluster"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin_b = b.admin().await?;
    let on_b: i64 = admin_b
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mig%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        on_b,
        i64::from(CLIENTS),
        "backends of the moved clients on the new cluster"
    );
    drop(reports);
    Ok(())
}

/// What happened to one pinned client after the rotation.
#[derive(Debug, Default)]
struct PinnedOutcome {
    failure: Option<(Option<String>, String, Duration)>,
}

/// Polls a pinned client: while it works it must still be on the old cluster; records its first
/// failure (SQLSTATE, message, time since the rotation).
async fn poll_pinned(
    client: &ObservedClient,
    sql: &str,
    old_port: i32,
    since: Instant,
    outcome: &mut PinnedOutcome,
    what: &str,
) -> anyhow::Result<()> {
    if outcome.failure.is_some() {
        return Ok(());
    }
    match tokio::time::timeout(CLIENT_OP_TIMEOUT, client.client.query_one(sql, &[])).await {
        Err(_) => anyhow::bail!("{what}: query hung"),
        Ok(Ok(row)) => {
            let port: i32 = row.get(0);
            ensure!(
                port == old_port,
                "{what}: moved to port {port} {:?} after the rotation although its session state cannot move",
                since.elapsed()
            );
        }
        Ok(Err(err)) => {
            let (code, message) = client.failure_of(&err).await;
            outcome.failure = Some((code, message, since.elapsed()));
        }
    }
    Ok(())
}

/// A session holding state that cannot move, how it was made, and the word its 57P01 must say.
struct PinnedClient {
    what: &'static str,
    observed: ObservedClient,
    poll: &'static str,
    word: &'static str,
    outcome: PinnedOutcome,
}

/// Opens the four kinds of pinned sessions: LISTEN, a temporary table, a WITH HOLD cursor and a
/// session advisory lock.
async fn pinned_clients(port: u16) -> anyhow::Result<Vec<PinnedClient>> {
    let kinds: [(&str, &str, &str, &str); 4] = [
        (
            "LISTEN client",
            "LISTEN mig_chan",
            "SELECT inet_server_port()",
            "listen",
        ),
        (
            "temp table client",
            "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)",
            "SELECT inet_server_port() FROM scratch",
            "temporary",
        ),
        (
            "WITH HOLD cursor client",
            "DECLARE held CURSOR WITH HOLD FOR SELECT generate_series(1, 1000)",
            "SELECT inet_server_port() FROM pg_cursors WHERE name = 'held'",
            "cursor",
        ),
        (
            "advisory lock client",
            "SELECT pg_advisory_lock(777)",
            "SELECT inet_server_port()",
            "advisory",
        ),
    ];
    let mut out = Vec::new();
    for (what, setup, poll, word) in kinds {
        let observed = connect_observed(&proxy_config(port, "pinned", what)).await?;
        observed
            .client
            .batch_execute(setup)
            .await
            .with_context(|| format!("{what}: {setup}"))?;
        out.push(PinnedClient {
            what,
            observed,
            poll,
            word,
            outcome: PinnedOutcome::default(),
        });
    }
    Ok(out)
}

/// Checks every pinned client was closed with FATAL 57P01 naming its reason, no sooner than the
/// migration timeout (3 s) and within [`MOVE_DEADLINE`].
fn assert_pinned_closed(pinned: &[PinnedClient]) -> anyhow::Result<()> {
    for p in pinned {
        let (code, message, after) = p
            .outcome
            .failure
            .clone()
            .with_context(|| format!("the {} was never closed within 40 s", p.what))?;
        ensure!(
            code.as_deref() == Some("57P01"),
            "{}: want FATAL 57P01 (admin_shutdown), got {code:?}: {message}",
            p.what
        );
        ensure!(
            message.to_lowercase().contains(p.word),
            "{}: the 57P01 message does not say why ({:?}): {message:?}",
            p.what,
            p.word
        );
        ensure!(
            after >= Duration::from_millis(2500) && after <= MOVE_DEADLINE,
            "{}: closed {after:?} after the rotation with --migration-timeout 3",
            p.what
        );
    }
    Ok(())
}

/// `--migration-timeout 3`: sessions holding LISTEN, a temp table, a WITH HOLD cursor or a
/// session advisory lock stay on the old cluster (LISTEN still receiving notifications there),
/// then get FATAL 57P01 naming the reason; a session that UNLISTENs in time and a plain one move
/// without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_sessions_stay_then_get_admin_shutdown() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let (a_port, b_port) = (port_of(&a), port_of(&b));
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--migration-timeout", "3"])
        .start()?;
    let port = proxy.port();
    let admin_a = a.admin().await?;

    let mut pinned = pinned_clients(port).await?;
    let unlisten = connect_observed(&proxy_config(port, "unlisten", "unlisten")).await?;
    unlisten.client.batch_execute("LISTEN other_chan").await?;
    let plain = connect(port, "plain").await?;
    plain.batch_execute("SET work_mem = '33MB'").await?;
    for p in &pinned {
        assert_eq!(server_port(&p.observed.client).await?, a_port);
    }
    assert_eq!(server_port(&unlisten.client).await?, a_port);
    assert_eq!(server_port(&plain).await?, a_port);

    let since = write_uri(&secret, &b.uri("app_a"))?;
    let (mut unlistened, mut notified) = (false, false);
    let (mut unlisten_moved, mut plain_moved) = (None, None);
    let mut notifications = Vec::new();
    while since.elapsed() < Duration::from_secs(40) {
        for p in pinned.iter_mut() {
            poll_pinned(&p.observed, p.poll, a_port, since, &mut p.outcome, p.what).await?;
        }
        if !notified && since.elapsed() >= Duration::from_millis(1500) {
            // straight to the old cluster: the LISTEN session must still be there
            admin_a
                .batch_execute("NOTIFY mig_chan, 'still-here'")
                .await?;
            notified = true;
        }
        while let Ok(n) = pinned[0].observed.notifications.try_recv() {
            notifications.push(n.payload().to_string());
        }
        if !unlistened && since.elapsed() >= Duration::from_secs(1) {
            unlisten
                .client
                .batch_execute("UNLISTEN *")
                .await
                .context("UNLISTEN before the migration timeout failed")?;
            unlistened = true;
        }
        if unlistened && unlisten_moved.is_none() {
            let p = server_port(&unlisten.client)
                .await
                .context("the client that ran UNLISTEN got an error")?;
            if p == b_port {
                unlisten_moved = Some(since.elapsed());
            }
        }
        if plain_moved.is_none() {
            let p = server_port(&plain)
                .await
                .context("the plain client got an error")?;
            if p == b_port {
                plain_moved = Some(since.elapsed());
            }
        }
        if pinned.iter().all(|p| p.outcome.failure.is_some())
            && unlisten_moved.is_some()
            && plain_moved.is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in &pinned {
        println!("{}: {:?}", p.what, p.outcome.failure);
    }
    println!(
        "UNLISTEN client moved after {unlisten_moved:?}; plain client moved after {plain_moved:?}; \
         notifications {notifications:?}"
    );
    assert!(
        notifications.iter().any(|n| n == "still-here"),
        "the pinned LISTEN session did not receive a NOTIFY on the old cluster: {notifications:?}"
    );
    let unlisten_moved = unlisten_moved.context("the client that ran UNLISTEN never moved")?;
    let plain_moved = plain_moved.context("the plain client never moved")?;
    assert!(unlisten_moved <= MOVE_DEADLINE && plain_moved <= MOVE_DEADLINE);
    assert!(
        unlisten.ended().is_none(),
        "the UNLISTEN client's connection ended"
    );
    assert_eq!(simple_value(&plain, "SHOW work_mem").await?, "33MB");
    assert_pinned_closed(&pinned)?;
    Ok(())
}

/// Transaction mode across a host move: every client's next transactions run on the new cluster
/// with its settings, protocol and SQL prepared statements (re-Parsed/re-prepared there); a
/// pinned (LISTEN) client stays on the old cluster, then gets FATAL 57P01 after
/// `--migration-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_mode_clients_follow_rotation_with_their_state() -> anyhow::Result<()> {
    const CLIENTS: i32 = 6;
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let (a_port, b_port) = (port_of(&a), port_of(&b));
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-mode", "transaction", "--pool-size", "3"])
        .args(["--migration-timeout", "3"])
        .start()?;
    let port = proxy.port();

    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let c = connect(port, &format!("t{k}")).await?;
        c.batch_execute(&format!(
            "SET work_mem = '{}MB'; PREPARE sq AS SELECT {k}",
            40 + k
        ))
        .await?;
        let stmt = c
            .prepare(&format!(
                "SELECT $1::int4 + {k}, inet_server_port(), current_setting('work_mem')"
            ))
            .await?;
        clients.push((k, c, stmt));
    }
    let listener = connect_observed(&proxy_config(port, "listener", "listener")).await?;
    listener.client.batch_execute("LISTEN txn_chan").await?;

    async fn check(
        k: i32,
        c: &Client,
        stmt: &tokio_postgres::Statement,
        i: i32,
    ) -> anyhow::Result<i32> {
        let row = c
            .query_one(stmt, &[&i])
            .await
            .with_context(|| format!("client {k}: protocol statement"))?;
        ensure!(row.get::<_, i32>(0) == i + k, "client {k}: wrong result");
        let port: i32 = row.get(1);
        ensure!(
            row.get::<_, String>(2) == format!("{}MB", 40 + k),
            "client {k} on port {port}: work_mem {:?}",
            row.get::<_, String>(2)
        );
        let sq = simple_value(c, "EXECUTE sq")
            .await
            .with_context(|| format!("client {k} (last on port {port}): EXECUTE sq"))?;
        ensure!(sq == k.to_string(), "client {k}: sq returned {sq:?}");
        Ok(port)
    }
    for (k, c, stmt) in &clients {
        assert_eq!(check(*k, c, stmt, 1).await?, a_port);
    }
    let since = write_uri(&secret, &b.uri("app_a"))?;
    let mut listener_outcome = PinnedOutcome::default();
    let mut moved: Vec<Option<Duration>> = vec![None; clients.len()];
    let mut i = 0;
    while since.elapsed() < Duration::from_secs(40) {
        i += 1;
        for (idx, (k, c, stmt)) in clients.iter().enumerate() {
            let p = check(*k, c, stmt, i).await?;
            if p == b_port {
                moved[idx].get_or_insert(since.elapsed());
            } else {
                ensure!(
                    moved[idx].is_none(),
                    "client {k}: back on the old cluster after a transaction on the new one"
                );
            }
        }
        poll_pinned(
            &listener,
            "SELECT inet_server_port()",
            a_port,
            since,
            &mut listener_outcome,
            "LISTEN client",
        )
        .await?;
        if moved.iter().all(Option::is_some) && listener_outcome.failure.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "transaction-mode clients on the new cluster after {moved:?}; LISTEN client: {:?}",
        listener_outcome.failure
    );
    for (idx, m) in moved.iter().enumerate() {
        let m = m.with_context(|| format!("client {idx} never ran on the new cluster"))?;
        assert!(m <= MOVE_DEADLINE, "client {idx} moved only after {m:?}");
    }
    let (code, message, after) = listener_outcome
        .failure
        .context("the pinned LISTEN client was never closed within 40 s")?;
    assert_eq!(code.as_deref(), Some("57P01"), "{message}");
    assert!(message.to_lowercase().contains("listen"), "{message:?}");
    assert!(
        after >= Duration::from_millis(2500),
        "closed after {after:?}"
    );
    Ok(())
}

/// A query running when the migration timeout passes finishes and returns its row; the
/// 57P01 comes after it, never in place of (or in the middle of) a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_in_flight_at_the_migration_deadline_completes_first() -> anyhow::Result<()> {
    in_flight_at_deadline("session").await
}

/// The same for a transaction-mode client pinned to its server by a temporary table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_mode_query_in_flight_at_the_deadline_completes_first() -> anyhow::Result<()> {
    in_flight_at_deadline("transaction").await
}

/// A session pinned by a temporary table, 1.5 s after a host rotation, with
/// `--migration-timeout 3`: its close is due about 1.5 s later.
struct PinnedAtRotation {
    old: AppCluster,
    _new: AppCluster,
    _proxy: ProxyProcess,
    /// Kept: the proxy watches its files.
    _secret: dbtests::SecretDir,
    pinned: ObservedClient,
    /// When the rotation was written.
    since: Instant,
}

async fn pinned_at_rotation(pool_mode: &str, app: &str) -> anyhow::Result<PinnedAtRotation> {
    let old = AppCluster::start("one").await?;
    let new = AppCluster::start("two").await?;
    let secret = uri_secret(&old.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--migration-timeout", "3", "--pool-mode", pool_mode])
        .start()?;
    let pinned = connect_observed(&proxy_config(proxy.port(), "pinned", app)).await?;
    pinned
        .client
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await?;
    let since = write_uri(&secret, &new.uri("app_a"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(PinnedAtRotation {
        old,
        _new: new,
        _proxy: proxy,
        _secret: secret,
        pinned,
        since,
    })
}

/// A query still running 5 s (the grace) after the migration timeout is cut: it fails with
/// the 57P01 that names the reason, and the old backend stops running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_running_past_the_grace_gets_57p01() -> anyhow::Result<()> {
    // Bound whole: a `..` pattern would drop the proxy and clusters right here.
    let scene = pinned_at_rotation("session", "longquery").await?;
    let (old, pinned, since) = (&scene.old, &scene.pinned, scene.since);
    let err = pinned
        .client
        .query_one("SELECT 42 FROM pg_sleep(20)", &[])
        .await
        .err()
        .context("a 20 s query outlived the migration timeout and its grace")?;
    let after = since.elapsed();
    let (code, message) = pinned.failure_of(&err).await;
    println!("cut {after:?} after the rotation: {code:?}: {message}");
    assert_eq!(code.as_deref(), Some("57P01"), "{message}");
    assert!(message.contains("temporary"), "{message}");
    ensure!(
        after >= Duration::from_secs(7) && after <= MOVE_DEADLINE,
        "cut {after:?} after the rotation (migration timeout 3 s + 5 s grace)"
    );
    // The old backend stops too (canceled), rather than sleeping out its 20 s.
    let admin_old = old.admin().await?;
    let cut = Instant::now();
    loop {
        let running: i64 = admin_old
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query LIKE '%pg_sleep(20)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .get(0);
        if running == 0 {
            break;
        }
        ensure!(
            cut.elapsed() < Duration::from_secs(5),
            "the cut query still runs on the old cluster {:?} after the cut",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn in_flight_at_deadline(pool_mode: &str) -> anyhow::Result<()> {
    let scene = pinned_at_rotation(pool_mode, "inflight").await?;
    let (pinned, since) = (&scene.pinned, scene.since);
    // Runs from ~1.5 s to ~4.5 s after the rotation: across the 3 s migration timeout.
    let row = pinned
        .client
        .query_one("SELECT 42 FROM pg_sleep(3)", &[])
        .await
        .context("the query running at the migration deadline failed")?;
    let finished = since.elapsed();
    assert_eq!(row.get::<_, i32>(0), 42);
    let end = pinned
        .wait_ended(Duration::from_secs(15))
        .await
        .context("the pinned session was not closed after its query")?;
    println!(
        "{pool_mode} mode: query finished {finished:?} after the rotation; then {:?}: {}",
        end.code, end.message
    );
    assert_eq!(end.code.as_deref(), Some("57P01"), "{}", end.message);
    assert!(
        end.message.contains("temporary"),
        "the 57P01 does not say why: {}",
        end.message
    );
    Ok(())
}

/// Sessions that send nothing after a host move still move: the rotation itself wakes them
/// (no query of theirs does). Watched from the clusters' pg_stat_activity only; the clients'
/// first query after the move runs on the new cluster with its setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_move_without_client_traffic() -> anyhow::Result<()> {
    idle_sessions_move("idlemove", &["--session-lane", "false"], Held::Task).await
}

/// The same with the sessions parked (`--client-park-after-ms`): the parker resumes those the
/// rotation moves, they move at once, then park again on the new cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_sessions_move_when_the_host_changes() -> anyhow::Result<()> {
    idle_sessions_move(
        "parkmove",
        &["--session-lane", "false", "--client-park-after-ms", "50"],
        Held::Parked,
    )
    .await
}

/// The same with the sessions in the session lane (the default): the lane gives back those
/// the rotation moves, their tasks move them, and they enter the lane again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lane_sessions_move_when_the_host_changes() -> anyhow::Result<()> {
    idle_sessions_move(
        "lanemove",
        &["--session-lane-after", "0", "--worker-threads", "0"],
        Held::Lane,
    )
    .await
}

/// Where idle sessions wait.
#[derive(PartialEq)]
enum Held {
    Task,
    Parked,
    Lane,
}

impl Held {
    /// Waits until `n` sessions wait there.
    async fn wait(&self, proxy: &ProxyProcess, n: usize) -> anyhow::Result<()> {
        match self {
            Held::Task => Ok(()),
            Held::Parked => wait_parked(proxy, n).await,
            Held::Lane => wait_in_lane(proxy, n).await,
        }
    }
}

async fn idle_sessions_move(app: &str, flags: &[&str], held: Held) -> anyhow::Result<()> {
    const CLIENTS: usize = 3;
    let count =
        format!("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{app}%'");
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let (a_port, b_port) = (port_of(&a), port_of(&b));
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(flags.iter().copied())
        .start()?;
    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let (client, conn) = proxy_config(proxy.port(), "idle", &format!("{app}{k}"))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("SET work_mem = '{}MB'", 50 + k))
            .await?;
        assert_eq!(server_port(&client).await?, a_port);
        clients.push(client);
    }
    held.wait(&proxy, CLIENTS).await?;
    let (admin_a, admin_b) = (a.admin().await?, b.admin().await?);
    let since = write_uri(&secret, &b.uri("app_a"))?;
    let moved = loop {
        let on_a: i64 = admin_a.query_one(&count, &[]).await?.get(0);
        let on_b: i64 = admin_b.query_one(&count, &[]).await?.get(0);
        if on_a == 0 && on_b == CLIENTS as i64 {
            break since.elapsed();
        }
        ensure!(
            since.elapsed() < MOVE_DEADLINE,
            "idle sessions did not move by themselves: {on_a} backend(s) on the old cluster, \
             {on_b} on the new one {:?} after the rotation",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("{CLIENTS} idle sessions moved {moved:?} after the Secret write, without a query");
    held.wait(&proxy, CLIENTS).await?;
    for (k, client) in clients.iter().enumerate() {
        assert_eq!(server_port(client).await?, b_port);
        assert_eq!(
            simple_value(client, "SHOW work_mem").await?,
            format!("{}MB", 50 + k)
        );
    }
    Ok(())
}

/// `--migrate never`: open sessions stay on the old cluster (with their state) while new
/// sessions go to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_never_leaves_sessions_in_place() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let a_port = port_of(&a);
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--migrate", "never"])
        .start()?;
    let port = proxy.port();
    let s = proxy.connect().await?;
    s.batch_execute("SET work_mem = '21MB'").await?;
    let (_, _, pid) = whoami(&s).await?;
    let since = write_uri(&secret, &b.uri("app_a"))?;
    let latency = wait_for_value(
        port,
        "SELECT name FROM marker",
        "two",
        since,
        PICKUP_DEADLINE,
    )
    .await?;
    println!("new sessions on the new cluster after {latency:?}");
    for i in 0..30 {
        let row = s
            .query_one(
                "SELECT inet_server_port(), pg_backend_pid(), current_setting('work_mem')",
                &[],
            )
            .await
            .with_context(|| format!("poll {i}: the unmoved session failed"))?;
        assert_eq!(
            (
                row.get::<_, i32>(0),
                row.get::<_, i32>(1),
                row.get::<_, String>(2)
            ),
            (a_port, pid, "21MB".to_string()),
            "poll {i}: --migrate never moved the session"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        simple_value(&proxy.connect().await?, "SELECT name FROM marker").await?,
        "two"
    );
    Ok(())
}

/// Default `--migrate changed`: a password-only rotation leaves open sessions on their backend;
/// a user switch (app_a -> app_b) moves them, with their state, to a backend of the new user.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changed_moves_on_user_switch_not_on_password_rotation() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let admin = db.admin().await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let port = proxy.port();
    let s = proxy.connect().await?;
    s.batch_execute("SET work_mem = '23MB'; PREPARE sq AS SELECT 'sq'")
        .await?;
    let stmt = s.prepare("SELECT $1::text || '!'").await?;
    let (_, _, pid0) = whoami(&s).await?;

    // password only: a new session logs in with the new password, the open one stays
    let before: String = admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0);
    db.rotate_password("app_a").await?;
    let since = write_uri(&secret, &db.uri("app_a"))?;
    wait_for_value(
        port,
        &format!(
            "SELECT (backend_start >= '{before}'::timestamptz)::text
             FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ),
        "true",
        since,
        PICKUP_DEADLINE,
    )
    .await?;
    for i in 0..15 {
        let (user, _, pid) = whoami(&s).await?;
        assert_eq!(
            (user.as_str(), pid),
            ("app_a", pid0),
            "poll {i}: a password-only rotation moved the session (--migrate changed)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // user switch: the session moves to app_b
    let since = write_uri(&secret, &db.uri("app_b"))?;
    loop {
        let (user, _, pid) = whoami(&s)
            .await
            .context("session failed while waiting to move")?;
        if user == "app_b" {
            assert_ne!(pid, pid0);
            break;
        }
        assert!(
            since.elapsed() < MOVE_DEADLINE,
            "the session is still app_a {:?} after the switch",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("session moved to app_b after {:?}", since.elapsed());
    assert_eq!(simple_value(&s, "SHOW work_mem").await?, "23MB");
    assert_eq!(simple_value(&s, "EXECUTE sq").await?, "sq");
    assert_eq!(
        s.query_one(&stmt, &[&"moved"]).await?.get::<_, String>(0),
        "moved!"
    );
    Ok(())
}

/// The raw session's user, client encoding, search_path and `app.note` (UTF-8 hex, ASCII in any
/// encoding), and what its SQL prepared statement `p` and protocol statement `q` return.
async fn latin1_state(raw: &mut RawSession) -> anyhow::Result<Vec<String>> {
    raw.send(&[
        msg::query(
            "SELECT current_user, pg_catalog.current_setting('client_encoding'), \
             pg_catalog.encode(pg_catalog.convert_to(pg_catalog.current_setting('search_path'), 'UTF8'), 'hex'), \
             pg_catalog.encode(pg_catalog.convert_to(pg_catalog.current_setting('app.note', true), 'UTF8'), 'hex')",
        ),
        msg::query("EXECUTE p"),
        msg::bind("", "q", &[]),
        msg::execute(""),
        msg::sync(),
    ])
    .await?;
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.extend(raw.until_ready().await?);
    }
    ensure!(error_codes(&replies).is_empty(), "{replies:?}");
    Ok(data_cells(&replies))
}

/// A session in LATIN1 whose settings (a custom one too), SQL PREPARE and protocol statement
/// hold non-ASCII text moves on a user switch with all of it intact: dbproxy reads the old
/// server's state and re-creates it on the new one in UTF-8, and the session keeps LATIN1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latin1_session_moves_with_its_text() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let mut raw = RawSession::connect(proxy.port(), "latin1").await?;
    let setup: [&[u8]; 4] = [
        b"SET client_encoding = 'LATIN1'",
        b"SET search_path = \"sch\xe9ma\", public",
        b"SET app.note = 'caf\xe9'",
        b"PREPARE p AS SELECT pg_catalog.encode(pg_catalog.convert_to('n\xe9', 'UTF8'), 'hex')",
    ];
    raw.run_all_ok(&setup).await?;
    raw.send(&[
        msg::parse_bytes(
            "q",
            b"SELECT pg_catalog.encode(pg_catalog.convert_to('\xe0 la carte', 'UTF8'), 'hex')",
        ),
        msg::sync(),
    ])
    .await?;
    let replies = raw.until_ready().await?;
    ensure!(error_codes(&replies).is_empty(), "{replies:?}");
    let before = latin1_state(&mut raw).await?;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    ensure!(
        before[0] == "app_a"
            && before[1] == "LATIN1"
            && before[2].contains("c3a9")
            && before[3] == hex("caf\u{e9}")
            && before[4] == hex("n\u{e9}")
            && before[5] == hex("\u{e0} la carte"),
        "before the move: {before:?}"
    );
    let since = write_uri(&secret, &db.uri("app_b"))?;
    let after = loop {
        let state = latin1_state(&mut raw).await?;
        if state[0] == "app_b" {
            break state;
        }
        ensure!(
            since.elapsed() < MOVE_DEADLINE,
            "the session is still app_a {:?} after the switch",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        after[1..] == before[1..],
        "after the move: {after:?}, before: {before:?}"
    );
    Ok(())
}

/// `--migrate always`: even a password-only rotation moves sessions to a fresh backend (logged in
/// with the new password) carrying their state; the old backend is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn always_moves_on_password_rotation() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let admin = db.admin().await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--migrate", "always"])
        .start()?;
    let s = proxy.connect().await?;
    s.batch_execute("SET work_mem = '22MB'; PREPARE sq(int) AS SELECT $1 + 1")
        .await?;
    let stmt = s.prepare("SELECT $1::int4 * 2").await?;
    let (_, _, pid0) = whoami(&s).await?;
    let before: String = admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0);
    db.rotate_password("app_a").await?;
    let since = write_uri(&secret, &db.uri("app_a"))?;
    let pid = loop {
        let (_, _, pid) = whoami(&s)
            .await
            .context("session failed while waiting to move")?;
        if pid != pid0 {
            break pid;
        }
        assert!(
            since.elapsed() < MOVE_DEADLINE,
            "--migrate always: session still on backend {pid0} {:?} after a password rotation",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "moved from backend {pid0} to {pid} after {:?}",
        since.elapsed()
    );
    let fresh: bool = admin
        .query_one(
            "SELECT backend_start >= $1::text::timestamptz FROM pg_stat_activity WHERE pid = $2",
            &[&before, &pid],
        )
        .await?
        .get(0);
    assert!(fresh, "the new backend logged in before the rotation");
    assert_eq!(simple_value(&s, "SHOW work_mem").await?, "22MB");
    assert_eq!(simple_value(&s, "EXECUTE sq(41)").await?, "42");
    assert_eq!(s.query_one(&stmt, &[&21i32]).await?.get::<_, i32>(0), 42);
    let t = Instant::now();
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid0],
            )
            .await?
            .get(0);
        if n == 0 {
            break;
        }
        assert!(
            t.elapsed() < MOVE_DEADLINE,
            "the old backend {pid0} was never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// After a move, a cancel (with the key the client got at login) reaches the new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_after_move_hits_the_new_backend() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let c = proxy.connect().await?;
    assert_eq!(server_port(&c).await?, port_of(&a));
    let token = c.cancel_token();
    let since = write_uri(&secret, &b.uri("app_a"))?;
    let moved = wait_on_port(&c, port_of(&b), since, "the client").await?;
    println!("moved after {moved:?}");

    let sleeper =
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    let admin_b = b.admin().await?;
    let t = Instant::now();
    loop {
        let n: i64 = admin_b
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await?
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the moved client's pg_sleep never showed up on the new cluster"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await?;
    let result = tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .context("the cancel did not reach the new backend within 20 s")??;
    let err = result.expect_err("the cancelled query must fail");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    println!(
        "cancel on the new backend answered after {:?}",
        cancelled.elapsed()
    );
    Ok(())
}

/// After a move to a cluster whose default TimeZone differs, the client gets a ParameterStatus
/// with the new value (it had not SET it); a client that SET its TimeZone keeps it and is never
/// told otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parameter_status_for_values_that_differ_after_move() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let options = PgOptions {
        extra_conf: vec!["timezone = 'Asia/Tokyo'".to_string()],
        ..PgOptions::default()
    };
    let b = AppCluster::start_with("two", options, PasswordKind::Scram).await?;
    let b_port = port_of(&b).to_string();
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let port = proxy.port();

    let mut plain = RawSession::connect(port, "plain").await?;
    let login_tz = plain
        .parameters
        .iter()
        .find(|(k, _)| k == "TimeZone")
        .map(|(_, v)| v.clone())
        .context("no TimeZone ParameterStatus at login")?;
    assert_ne!(login_tz, "Asia/Tokyo");
    let mut setter = RawSession::connect(port, "setter").await?;
    setter
        .send(&[msg::query("SET TimeZone = 'Europe/Paris'")])
        .await?;
    let replies = setter.until_ready().await?;
    assert!(error_codes(&replies).is_empty(), "{replies:?}");

    let since = write_uri(&secret, &b.uri("app_a"))?;
    let mut seen: Vec<(String, String, String)> = Vec::new();
    let mut moved: HashSet<&str> = HashSet::new();
    while moved.len() < 2 {
        ensure!(
            since.elapsed() < MOVE_DEADLINE,
            "not both raw sessions moved within {MOVE_DEADLINE:?} ({moved:?})"
        );
        for (name, session) in [("plain", &mut plain), ("setter", &mut setter)] {
            if moved.contains(name) {
                continue;
            }
            session
                .send(&[msg::query(
                    "SELECT inet_server_port()::text || ' ' || current_setting('TimeZone')",
                )])
                .await?;
            let replies = session.until_ready().await?;
            ensure!(error_codes(&replies).is_empty(), "{name}: {replies:?}");
            for r in &replies {
                if let Reply::ParameterStatus(k, v) = r {
                    seen.push((name.to_string(), k.clone(), v.clone()));
                }
            }
            let row = first_column(&replies)
                .first()
                .cloned()
                .flatten()
                .unwrap_or_default();
            let (server, tz) = row.split_once(' ').unwrap_or(("", ""));
            if server == b_port {
                moved.insert(name);
                let want = if name == "plain" {
                    "Asia/Tokyo"
                } else {
                    "Europe/Paris"
                };
                ensure!(
                    tz == want,
                    "{name}: TimeZone {tz:?} on the new cluster, want {want:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("ParameterStatus seen after the rotation: {seen:?}");
    let last_tz = |who: &str| {
        seen.iter()
            .filter(|(n, k, _)| n == who && k == "TimeZone")
            .map(|(_, _, v)| v.clone())
            .next_back()
    };
    assert_eq!(
        last_tz("plain").as_deref(),
        Some("Asia/Tokyo"),
        "the plain client was not told its TimeZone changed"
    );
    assert!(
        matches!(last_tz("setter").as_deref(), None | Some("Europe/Paris")),
        "the client that SET TimeZone was told {:?}",
        last_tz("setter")
    );
    Ok(())
}

/// Sessions that ran COPY FROM STDIN through tokio-postgres (which sends a Sync before the data,
/// one PostgreSQL ignores in copy-in mode), or COPY TO STDOUT, still reach an idle point and
/// move after a host change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_move_after_copy() -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let copy_in = proxy.connect().await?;
    let sink = copy_in
        .copy_in::<_, bytes::Bytes>("COPY items (note) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    for i in 0..10 {
        sink.send(bytes::Bytes::from(format!("row-{i}\n"))).await?;
    }
    assert_eq!(sink.finish().await?, 10);
    let copy_out = proxy.connect().await?;
    let stream = copy_out.copy_out("COPY (SELECT 1) TO STDOUT").await?;
    futures_util::pin_mut!(stream);
    while let Some(chunk) = stream.next().await {
        chunk?;
    }
    for c in [&copy_in, &copy_out] {
        c.batch_execute("SET work_mem = '24MB'").await?;
        assert_eq!(server_port(c).await?, port_of(&a));
    }
    let since = write_uri(&secret, &b.uri("app_a"))?;
    let mut failures = Vec::new();
    for (what, c) in [("COPY TO STDOUT", &copy_out), ("COPY FROM STDIN", &copy_in)] {
        match wait_on_port(c, port_of(&b), since, what).await {
            Ok(moved) => {
                println!("{what} client moved after {moved:?}");
                assert_eq!(simple_value(c, "SHOW work_mem").await?, "24MB");
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// A session inside an open transaction at the rotation stays on its backend until COMMIT (its
/// transaction is not disturbed), then moves; the committed row is on the old cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_transaction_finishes_before_the_move() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let c = proxy.connect().await?;
    c.batch_execute("BEGIN; INSERT INTO items (note) VALUES ('in-flight')")
        .await?;
    let since = write_uri(&secret, &b.uri("app_a"))?;
    for i in 0..15 {
        let row = c
            .query_one(
                "SELECT inet_server_port(), pg_current_xact_id_if_assigned() IS NOT NULL",
                &[],
            )
            .await
            .with_context(|| format!("poll {i} inside the open transaction"))?;
        assert_eq!(
            (row.get::<_, i32>(0), row.get::<_, bool>(1)),
            (port_of(&a), true),
            "poll {i}: the session left its open transaction's backend"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.batch_execute("COMMIT").await?;
    let moved = wait_on_port(&c, port_of(&b), since, "the client after COMMIT").await?;
    println!("moved {moved:?} after the rotation (committed after ~3 s)");
    let n: i64 = a
        .admin()
        .await?
        .query_one("SELECT count(*) FROM items WHERE note = 'in-flight'", &[])
        .await?
        .get(0);
    assert_eq!(
        n, 1,
        "the transaction open at the rotation was not committed on the old cluster"
    );
    Ok(())
}

/// Settings whose values need quoting when re-applied (a quoted identifier in search_path, a
/// quote and a backslash in application_name, list-valued DateStyle, a time zone name, units,
/// standard_conforming_strings off) arrive on the new cluster exactly as SHOW reported them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn awkward_setting_values_survive_the_move() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let c = proxy.connect().await?;
    c.batch_execute(
        r#"SET search_path = "My Schema", public;
           SET application_name = 'it''s a \ test';
           SET DateStyle = 'SQL, DMY';
           SET TimeZone = 'America/New_York';
           SET statement_timeout = '1h';
           SET standard_conforming_strings = off"#,
    )
    .await?;
    let show = "SELECT current_setting('search_path'), current_setting('application_name'),
                current_setting('DateStyle'), current_setting('TimeZone'),
                current_setting('statement_timeout'), current_setting('standard_conforming_strings')";
    let values = |row: tokio_postgres::Row| -> Vec<String> { (0..6).map(|i| row.get(i)).collect() };
    let before = values(c.query_one(show, &[]).await?);
    println!("before: {before:?}");
    let since = write_uri(&secret, &b.uri("app_a"))?;
    wait_on_port(&c, port_of(&b), since, "the client").await?;
    let after = values(c.query_one(show, &[]).await?);
    assert_eq!(after, before, "settings after the move");
    Ok(())
}

/// An SQL prepared statement whose text has a backslash in a string literal, prepared while
/// standard_conforming_strings was on, moves with a session that later turned it off (a real
/// pattern: legacy code switching the setting after preparing its statements).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_prepared_statement_moves_despite_standard_conforming_strings_off() -> anyhow::Result<()>
{
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let c = proxy.connect().await?;
    c.batch_execute(r"PREPARE q(text) AS SELECT $1 || '\'")
        .await?;
    c.batch_execute("SET standard_conforming_strings = off")
        .await?;
    assert_eq!(simple_value(&c, "EXECUTE q('x')").await?, r"x\");
    let since = write_uri(&secret, &b.uri("app_a"))?;
    wait_on_port(&c, port_of(&b), since, "the client").await?;
    assert_eq!(simple_value(&c, "EXECUTE q('x')").await?, r"x\");
    assert_eq!(
        simple_value(&c, "SHOW standard_conforming_strings").await?,
        "off"
    );
    Ok(())
}

/// SET ROLE moves with the session: current_user is still the group role on the new cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_role_survives_the_move() -> anyhow::Result<()> {
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let c = proxy.connect().await?;
    c.batch_execute("SET ROLE app").await?;
    assert_eq!(whoami(&c).await?.1, "app");
    let since = write_uri(&secret, &b.uri("app_a"))?;
    wait_on_port(&c, port_of(&b), since, "the client").await?;
    let (session, current, _) = whoami(&c).await?;
    assert_eq!((session.as_str(), current.as_str()), ("app_a", "app"));
    Ok(())
}

/// A session in the session lane that is in the middle of a large result, with its client
/// not reading, when a rotation moves it: the lane gives it back with what it had read and
/// not yet delivered, the runtime delivers every row in order, and the session moves once the
/// result is over, then enters the lane again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lane_session_given_back_mid_result_delivers_every_row_then_moves() -> anyhow::Result<()> {
    const ROWS: usize = 3000;
    const WIDTH: usize = 32 * 300;
    let a = AppCluster::start("one").await?;
    let b = AppCluster::start("two").await?;
    let (a_port, b_port) = (port_of(&a), port_of(&b));
    let secret = uri_secret(&a.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--session-lane-after", "0", "--worker-threads", "0"])
        .start()?;
    let mut raw = RawSession::connect(proxy.port(), "x").await?;
    raw.send(&[msg::query("SELECT inet_server_port()")]).await?;
    let port = first_column(&raw.until_ready().await?);
    ensure!(
        port == [Some(a_port.to_string())],
        "first query on {port:?}"
    );
    wait_in_lane(&proxy, 1).await?;

    raw.send(&[msg::query(&format!(
        "SELECT i, repeat(md5(i::text), {}) FROM generate_series(1, {ROWS}) i",
        WIDTH / 32
    ))])
    .await?;
    let mut next = 1usize;
    let mut check = |reply: Reply| -> anyhow::Result<bool> {
        match reply {
            Reply::DataRow(cols) => {
                ensure!(
                    cols.first().cloned().flatten() == Some(next.to_string()),
                    "row {next} expected, got {:?}",
                    cols.first()
                );
                let text = cols.get(1).cloned().flatten().unwrap_or_default();
                ensure!(text.len() == WIDTH, "row {next} has {} bytes", text.len());
                next += 1;
                Ok(false)
            }
            Reply::ReadyForQuery(_) => Ok(true),
            Reply::Error { code, message } => anyhow::bail!("{code} {message}"),
            _ => Ok(false),
        }
    };
    for _ in 0..10 {
        check(raw.read().await?)?;
    }
    // The client stops reading: the socket buffers fill, the rest waits in the proxy and the
    // server, and the rotation lands meanwhile. It takes the session out of the lane.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_uri(&secret, &b.uri("app_a"))?;
    wait_in_lane(&proxy, 0).await?;
    while !check(raw.read().await?)? {}
    ensure!(
        next - 1 == ROWS,
        "{} rows arrived, {ROWS} were sent",
        next - 1
    );
    // The result was over: the session moved, and is in the lane again.
    let deadline = Instant::now() + MOVE_DEADLINE;
    loop {
        raw.send(&[msg::query("SELECT inet_server_port()")]).await?;
        let port = first_column(&raw.until_ready().await?);
        if port == [Some(b_port.to_string())] {
            break;
        }
        ensure!(
            port == [Some(a_port.to_string())] && Instant::now() < deadline,
            "the session did not move: {port:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_in_lane(&proxy, 1).await?;
    Ok(())
}
