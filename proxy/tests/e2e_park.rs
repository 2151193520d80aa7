//! End-to-end: parking idle session-mode clients (`--client-park-after-ms`, default pool
//! mode) through the real `dbproxy` binary and a real PostgreSQL. A parked session's client
//! and server sockets both wait outside the runtime; either side speaking resumes it on the
//! same backend. (Transaction-mode parking is tested in e2e_txn.rs, TLS in e2e_tls.rs, a
//! host move of parked sessions in e2e_migration.rs.)

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::*;
use tokio_postgres::Client;

/// The parking delay the tests run with.
const PARK_MS: &str = "50";

/// Where idle sessions wait: parked (with the session lane off), or in the session lane (the
/// default in session mode), which forwards them with no task of their own from their first
/// idle moment. Both must keep every session's backend and state.
#[derive(Clone, Copy, Debug)]
enum Idle {
    Parked,
    Lane,
}

impl Idle {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Idle::Parked => &["--session-lane", "false", "--client-park-after-ms", PARK_MS],
            // With a count before a session enters the lane (dbproxy's default is 0: at
            // once), these sessions earn it by falling idle; the lane runs with one runtime
            // thread only.
            Idle::Lane => &[
                "--session-lane-after",
                "32",
                "--client-park-after-ms",
                PARK_MS,
                "--worker-threads",
                "0",
            ],
        }
    }

    /// Waits until `n` sessions wait there.
    async fn wait(self, proxy: &ProxyProcess, n: usize) -> anyhow::Result<()> {
        match self {
            Idle::Parked => wait_parked(proxy, n).await,
            Idle::Lane => wait_in_lane(proxy, n).await,
        }
    }
}

async fn backend_pid(client: &Client) -> anyhow::Result<i32> {
    let row = tokio::time::timeout(
        CLIENT_OP_TIMEOUT,
        client.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await
    .context("a parked session's query did not come back")??;
    Ok(row.get(0))
}

/// Sessions park once idle and come back on the same backend with everything a backend
/// keeps (a setting, a temporary table, a protocol prepared statement); a NOTIFY reaches a
/// parked LISTEN session without it sending anything; a parked client that hangs up gives its
/// server back to the pool; a backend terminated while its session is parked ends that
/// client's connection with the server's error at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_park_and_resume_on_their_backend() -> anyhow::Result<()> {
    sessions_resume_on_their_backend(Idle::Parked).await
}

/// The same through the session lane: a query, a notification, a hang-up and a terminated
/// backend reach it from either side while no task serves the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lane_sessions_keep_their_backend_and_state() -> anyhow::Result<()> {
    sessions_resume_on_their_backend(Idle::Lane).await
}

async fn sessions_resume_on_their_backend(idle: Idle) -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(idle.flags().iter().copied())
        .start()?;
    let mut clients = Vec::new();
    for k in 0..3 {
        let client =
            connect_observed(&proxy_config(proxy.port(), "any", &format!("park{k}"))).await?;
        let c = &client.client;
        c.batch_execute(&format!(
            "SET work_mem = '{}MB'; CREATE TEMP TABLE mine AS SELECT {k} AS k",
            10 + k
        ))
        .await?;
        let statement = c.prepare("SELECT k + $1::int FROM mine").await?;
        let pid = backend_pid(c).await?;
        clients.push((client, statement, pid));
    }
    clients[0]
        .0
        .client
        .batch_execute("LISTEN parked_channel")
        .await?;
    idle.wait(&proxy, 3).await?;

    for round in 0..2 {
        for (k, (client, statement, pid)) in clients.iter().enumerate() {
            let c = &client.client;
            let v: i32 = tokio::time::timeout(CLIENT_OP_TIMEOUT, c.query_one(statement, &[&100]))
                .await
                .context("a parked session's query did not come back")??
                .get(0);
            ensure!(v == 100 + k as i32, "round {round}: session {k} got {v}");
            ensure!(
                backend_pid(c).await? == *pid,
                "round {round}: session {k} came back on another backend"
            );
            let work_mem = c.query_one("SHOW work_mem", &[]).await?.get::<_, String>(0);
            ensure!(
                work_mem == format!("{}MB", 10 + k),
                "round {round}: session {k}: {work_mem}"
            );
        }
        idle.wait(&proxy, 3).await?;
    }

    // The server speaks first: a notification wakes the parked LISTEN session.
    let direct = db.admin().await?;
    direct
        .batch_execute("NOTIFY parked_channel, 'while parked'")
        .await?;
    let listener = &mut clients[0].0;
    let payload = listener
        .next_notification("parked_channel", Duration::from_secs(10))
        .await;
    ensure!(
        payload.as_deref() == Some("while parked"),
        "a parked LISTEN session did not get its notification: {payload:?}"
    );
    idle.wait(&proxy, 3).await?;

    // A parked client hangs up: its session ends and its server goes back to the pool.
    let idle_servers = |text: &str| {
        metric_or_zero(
            text,
            "dbproxy_server_connections_by_state",
            &[("state", "idle")],
        )
    };
    let before = idle_servers(&scrape(&proxy)?);
    let (gone, _, _) = clients.pop().context("three clients")?;
    drop(gone);
    idle.wait(&proxy, 2).await?;
    wait_for_metrics(
        &proxy,
        "the hung-up session's server back in the pool",
        Duration::from_secs(10),
        |text| {
            idle_servers(text) == before + 1.0
                && metric_or_zero(text, "dbproxy_clients", &[]) == 2.0
        },
    )
    .await?;

    // The backend of a parked session is terminated: the client hears it at once.
    let (victim, _, victim_pid) = &clients[1];
    let since = Instant::now();
    direct
        .execute("SELECT pg_terminate_backend($1)", &[victim_pid])
        .await?;
    let end = victim
        .wait_ended(Duration::from_secs(10))
        .await
        .context("the client of a terminated parked session never saw its connection end")?;
    ensure!(
        end.code.as_deref() == Some("57P01"),
        "a terminated parked session should end with the server's 57P01, got {end:?}"
    );
    println!(
        "terminated parked session ended {:?} after the kill",
        end.at - since
    );
    idle.wait(&proxy, 1).await?;
    // The one left is untouched.
    let (survivor, statement, _) = &clients[0];
    let v: i32 = survivor.client.query_one(statement, &[&1]).await?.get(0);
    ensure!(v == 1, "the surviving session got {v}");
    Ok(())
}

/// SIGTERM with parked sessions: they are resumed and treated like any open session (the
/// proxy exits 0 once `--shutdown-timeout` is over), and their connections end with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_resumes_parked_sessions_and_exits() -> anyhow::Result<()> {
    sigterm_with_idle_sessions(Idle::Parked).await
}

/// The same with sessions in the session lane: it gives them back at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_takes_sessions_out_of_the_lane_and_exits() -> anyhow::Result<()> {
    sigterm_with_idle_sessions(Idle::Lane).await
}

async fn sigterm_with_idle_sessions(idle: Idle) -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(idle.flags().iter().copied())
        .args(["--shutdown-delay", "0", "--shutdown-timeout", "2"])
        .start()?;
    let mut clients = Vec::new();
    for k in 0..2 {
        clients.push(
            connect_observed(&proxy_config(proxy.port(), "any", &format!("parkterm{k}"))).await?,
        );
    }
    idle.wait(&proxy, 2).await?;
    let (status, took) = proxy.sigterm_and_wait(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "dbproxy exited with {status} after SIGTERM"
    );
    println!("dbproxy with 2 sessions waiting ({idle:?}) exited {took:?} after SIGTERM");
    for (k, client) in clients.iter().enumerate() {
        ensure!(
            client.wait_ended(Duration::from_secs(10)).await.is_some(),
            "session {k} ({idle:?}) outlived the proxy"
        );
    }
    Ok(())
}

/// Parking is on by default (a parker runs without the flag). Once enough clients parked,
/// the memory their tasks and boxes used is handed back to the system (the give-back logs at
/// debug level), and parked clients are served as before afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parking_is_on_by_default_and_parked_memory_goes_back() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let default = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let text = scrape(&default)?;
    ensure!(
        metric(&text, "dbproxy_clients_parked", &[]).is_some(),
        "no parker without --client-park-after-ms:\n{text}"
    );
    drop(default);
    memory_goes_back(&db, &secret, Idle::Parked).await
}

/// Sessions entering the session lane free their tasks' memory the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lane_sessions_memory_goes_back() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    memory_goes_back(&db, &secret, Idle::Lane).await
}

async fn memory_goes_back(
    _db: &AppCluster,
    secret: &dbtests::SecretDir,
    idle: Idle,
) -> anyhow::Result<()> {
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(idle.flags().iter().copied())
        .args(["--pool-size", "50"])
        .env("RUST_LOG", "info,dbproxy::memory=debug")
        .start()?;
    // Each parked client frees about 1 kB; 16 KiB reported start a give-back. (Session mode:
    // nothing else here reports freed memory, no client leaves and no transaction-mode
    // connection drops its buffers.)
    let n = 40;
    let mut clients = Vec::new();
    for k in 0..n {
        let client =
            connect_observed(&proxy_config(proxy.port(), "any", &format!("giveback{k}"))).await?;
        client.client.simple_query("SELECT 1").await?;
        clients.push(client);
    }
    idle.wait(&proxy, n).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.log().contains("gave free memory back to the system") {
        ensure!(
            Instant::now() < deadline,
            "{n} clients parked and no memory was given back within 10 s; log:\n{}",
            proxy.log_redacted()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (k, client) in clients.iter().enumerate() {
        let rows = tokio::time::timeout(
            CLIENT_OP_TIMEOUT,
            client
                .client
                .query_one("SELECT $1::int + 1", &[&(k as i32)]),
        )
        .await
        .context("a parked client's query did not come back")??;
        ensure!(
            rows.get::<_, i32>(0) == k as i32 + 1,
            "client {k}: wrong answer"
        );
    }
    Ok(())
}

/// With `--session-lane-after N` a session enters the session lane only once it has run N
/// transactions (a connection that runs one transaction and leaves never pays the lane's
/// entry and exit), or once it falls idle for `--client-park-after-ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_earn_the_lane_by_transactions_or_idleness() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let busy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--session-lane-after", "5", "--client-park-after-ms", "0"])
        .args(["--worker-threads", "0"])
        .start()?;
    let client = connect_observed(&proxy_config(busy.port(), "any", "earn")).await?;
    let c = &client.client;
    for k in 0..4 {
        c.simple_query(&format!("SELECT {k}")).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&busy)?;
    ensure!(
        metric_or_zero(&text, "dbproxy_session_lane_clients", &[]) == 0.0,
        "a session entered the lane after 4 of 5 transactions"
    );
    // A transaction block counts once, at its end.
    c.batch_execute("BEGIN; SELECT 1; SELECT 2; COMMIT").await?;
    wait_in_lane(&busy, 1).await?;
    let pid = backend_pid(c).await?;
    ensure!(pid > 0, "no answer from the lane");
    drop(client);
    wait_in_lane(&busy, 0).await?;

    let idle = ProxyBuilder::new(&secret.file(URI_KEY))
        .args([
            "--session-lane-after",
            "1000",
            "--client-park-after-ms",
            PARK_MS,
        ])
        .args(["--worker-threads", "0"])
        .start()?;
    let client = connect_observed(&proxy_config(idle.port(), "any", "earn")).await?;
    client.client.simple_query("SELECT 1").await?;
    wait_in_lane(&idle, 1).await?;
    let text = scrape(&idle)?;
    ensure!(
        metric_or_zero(&text, "dbproxy_clients_parked", &[]) == 0.0,
        "a session-mode session parked while the lane runs"
    );
    ensure!(backend_pid(&client.client).await? > 0);
    Ok(())
}
