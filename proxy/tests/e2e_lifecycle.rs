//! Lifecycle as a Kubernetes sidecar against real PostgreSQL: the SIGTERM timeline (serve
//! during --shutdown-delay, then refuse, drain, exit 0), SIGHUP re-reads, `dbproxy wait`, and
//! the redaction proof over logs (text and JSON), errors, /metrics and admin output.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Polls new connections until one is refused; returns when.
async fn refused_after(port: u16, since: Instant, limit: Duration) -> anyhow::Result<Duration> {
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(10), async {
            let c = connect(port, "probe").await?;
            c.simple_query("SELECT 1").await
        })
        .await;
        if !matches!(attempt, Ok(Ok(_))) {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            since.elapsed() < limit,
            "new clients still served after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_serves_during_the_delay_then_refuses_drains_and_exits_zero() -> anyhow::Result<()>
{
    let db = AppCluster::start("lifecycle").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--shutdown-delay", "3", "--shutdown-timeout", "30"])
        .redact(&db.password("app_a"))
        .start()?;
    let port = proxy.port();
    let session = proxy.connect().await?;
    session
        .batch_execute("BEGIN; INSERT INTO items (note) VALUES ('open at sigterm')")
        .await?;

    let t0 = Instant::now();
    proxy.sigterm();
    // During the delay the app (shutting down too) still opens new sessions.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during = connect(port, "during-delay").await?;
    assert_eq!(whoami(&during).await?.0, "app_a");
    let served_at = t0.elapsed();
    drop(during);
    assert!(
        served_at < Duration::from_secs(3),
        "the check ran too late ({served_at:?}) to prove serving during the delay"
    );
    let refused = refused_after(port, t0, Duration::from_secs(30)).await?;
    println!(
        "served a new client {served_at:?} after SIGTERM; refused new clients from {refused:?}"
    );
    assert!(
        refused >= Duration::from_millis(2500),
        "new clients refused {refused:?} after SIGTERM, before --shutdown-delay 3"
    );
    // Draining: the open transaction still commits.
    session
        .batch_execute("INSERT INTO items (note) VALUES ('after refusal'); COMMIT")
        .await?;
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a session open"
    );
    drop(session);
    let status = proxy
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("dbproxy still running after its last session left"))?;
    assert!(status.success(), "dbproxy exited with {status}");
    println!("exited {:?} after SIGTERM", t0.elapsed());
    let n: i64 = db
        .admin()
        .await?
        .query_one(
            "SELECT count(*) FROM items WHERE note IN ('open at sigterm', 'after refusal')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 2);
    let log = proxy.log();
    assert!(log.contains("--shutdown-delay"), "the delay is not logged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_rereads_the_secret_and_notify_noise_is_silenced() -> anyhow::Result<()> {
    let db = AppCluster::start("sighup").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    // RUST_LOG unset: the default filter applies (info, notify=error).
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .env_unset("RUST_LOG")
        .args(["--poll-interval", "600"])
        .redact(&db.password("app_a"))
        .redact(&db.password("app_b"))
        .start()?;
    common::send_signal(proxy.pid(), "HUP");
    wait_for_metrics(&proxy, "a SIGHUP reload", WAIT, |t| {
        metric(t, "dbproxy_reloads_total", &[("source", "sighup")]) == Some(1.0)
    })
    .await?;
    // The log reaches the harness through a pipe and a reader thread: it may trail the
    // metric a little (it did once under load).
    let logged = "SIGHUP: re-reading the DSN file";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !proxy.log().contains(logged) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.log().contains(logged), "not logged: {logged}");
    // Still serving, and kubelet-style rotations still apply (several, to give notify
    // its chance to warn about the removed ..data directories).
    for user in ["app_b", "app_a", "app_b"] {
        let written = write_uri(&secret, &db.uri(user))?;
        wait_for_session_user(proxy.port(), user, written, PICKUP_DEADLINE).await?;
    }
    let log = proxy.log();
    assert!(
        !log.contains("WatchNotFound"),
        "notify's warning is not silenced:\n{log}"
    );
    assert!(log.contains("credential generation applied"));
    Ok(())
}

fn dbproxy_bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_dbproxy").into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_subcommand_returns_when_ready_and_times_out_otherwise() -> anyhow::Result<()> {
    // Nothing listening: non-zero exit after --timeout.
    let t = Instant::now();
    let out = Command::new(dbproxy_bin())
        .args([
            "wait",
            "--ops-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--timeout",
            "2",
        ])
        .output()?;
    let took = t.elapsed();
    assert!(
        !out.status.success(),
        "dbproxy wait succeeded with nothing listening"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready"));

    // A proxy without its Secret yet: /readyz 503 (the native sidecar's startupProbe keeps
    // the app waiting), `dbproxy wait` blocks, and both turn ready once the Secret appears.
    let db = AppCluster::start("wait").await?;
    let secret = dbtests::SecretDir::new()?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .redact(&db.password("app_a"))
        .spawn()?;
    proxy.wait_readyz(503, WAIT)?;
    let mut waiter = Command::new(dbproxy_bin())
        .args([
            "wait",
            "--ops-addr",
            &format!("0.0.0.0:{}", proxy.ops_port()),
            "--timeout",
            "120",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        waiter.try_wait()?.is_none(),
        "dbproxy wait returned before the proxy was ready"
    );
    write_uri(&secret, &db.uri("app_a"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = waiter.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = waiter.kill();
            anyhow::bail!("dbproxy wait still blocked 60 s after the Secret appeared");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "dbproxy wait exited with {status}");
    assert_eq!(proxy.http_get("/readyz")?.0, 200);
    assert_eq!(whoami(&proxy.connect().await?).await?.0, "app_a");
    Ok(())
}

/// Every place an operator or a client can read: no password (old, new, wrong, or inside a
/// garbage file) ever shows up.
async fn redaction_scenario(format: &str) -> anyhow::Result<()> {
    let db = AppCluster::start("redaction").await?;
    let old = db.password("app_a");
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .env("RUST_LOG", "debug")
        .args(["--log-format", format, "--pool-timeout", "3"])
        .redact(&old)
        .start()?;
    let port = proxy.port();
    let mut errors = Vec::new();
    let session = proxy.connect().await?;
    session.simple_query("SELECT 1").await?;

    // The password changes on the server before the Secret: new logins fail for a while.
    let new = db.rotate_password("app_a").await?;
    proxy.add_redaction(&new);
    match connect(port, "during-rotation").await {
        Ok(c) => {
            if let Err(e) = c.simple_query("SELECT 1").await {
                errors.push(format!("{e:?} {e}"));
            }
        }
        Err(e) => errors.push(format!("{e:?} {e}")),
    }
    let written = write_uri(&secret, &db.uri("app_a"))?;
    wait_for_value(port, "SELECT 'ok'", "ok", written, PICKUP_DEADLINE).await?;

    // A wrong password, then garbage that contains a password-looking string.
    let wrong = rotated_password();
    let garbage = rotated_password();
    proxy.add_redaction(&wrong);
    proxy.add_redaction(&garbage);
    let rejected = metric_or_zero(&scrape(&proxy)?, "dbproxy_rotations_rejected_total", &[]);
    write_uri(&secret, &db.cluster.uri("app_a", &wrong, APP_DB))?;
    wait_for_metrics(&proxy, "the wrong password rejected", WAIT, |t| {
        metric_or_zero(t, "dbproxy_rotations_rejected_total", &[]) > rejected
    })
    .await?;
    secret.write(&[(
        URI_KEY,
        format!("postgres://app_a:{garbage}@[::1").as_bytes(),
    )])?;
    let readyz = wait_for_readyz_body(&proxy, "rejected").await?;
    // Still serving with the new password.
    let c = proxy.connect().await?;
    assert_eq!(whoami(&c).await?.0, "app_a");

    let admin = admin_connect(port, "pgbouncer").await?;
    let mut admin_output = String::new();
    for command in [
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW STATS",
        "SHOW CONFIG",
        "SHOW VERSION",
        "SHOW HELP",
        "RELOAD",
    ] {
        admin_output.push_str(&format!("{:?}\n", admin_rows(&admin, command).await?));
    }
    if let Err(e) = admin.simple_query(&format!("SHOW {garbage}")).await {
        errors.push(format!("{e:?} {e}"));
    }
    let metrics = scrape(&proxy)?;
    drop((c, session, admin));
    proxy.sigterm();
    proxy.wait_exit(WAIT);
    let log = proxy.log();
    let secrets = [old.as_str(), new.as_str(), wrong.as_str(), garbage.as_str()];
    assert_no_secrets(&log, &secrets, &format!("the {format} log"));
    assert_no_secrets(&errors.join("\n"), &secrets, "client errors");
    assert_no_secrets(&metrics, &secrets, "/metrics");
    assert_no_secrets(&readyz, &secrets, "/readyz");
    assert_no_secrets(&admin_output, &secrets, "admin console output");
    // The scenario really happened: the log tells it (without the secrets).
    assert!(
        log.contains("failed validation"),
        "no validation failure logged"
    );
    assert!(log.contains("rejected"), "no rejected DSN logged");
    assert!(!errors.is_empty(), "no client error was captured");
    if format == "json" {
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            assert!(line.starts_with('{'), "not a JSON line: {line}");
        }
        assert!(
            log.contains("\"peer\":\"127.0.0.1:"),
            "no client address on client events in JSON logs"
        );
    } else {
        assert!(
            log.contains("peer=127.0.0.1:"),
            "no client address on client events in text logs"
        );
    }
    println!(
        "{format}: {} log lines, {} client errors, no secret anywhere",
        log.lines().count(),
        errors.len()
    );
    Ok(())
}

async fn wait_for_readyz_body(proxy: &ProxyProcess, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = proxy.http_get("/readyz")?;
        if body.contains(needle) {
            return Ok(body);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "/readyz never mentioned {needle:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_password_in_text_logs_errors_metrics_or_admin_output() -> anyhow::Result<()> {
    redaction_scenario("text").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_password_in_json_logs_errors_metrics_or_admin_output() -> anyhow::Result<()> {
    redaction_scenario("json").await
}
