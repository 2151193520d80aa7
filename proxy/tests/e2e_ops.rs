//! End-to-end: operating the real `dbproxy` binary: health endpoints, SIGTERM, secrets kept
//! out of logs and endpoints, and the non-loopback listener opt-in.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::error::SqlState;

/// `/healthz` answers while alive; `/readyz` only once the DSN was validated by a real login.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_waits_for_a_valid_dsn() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let wrong = rotated_password();
    let secret = uri_secret(&db.cluster.uri("app_a", &wrong, APP_DB))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .redact(&wrong)
        .spawn()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((code, _)) = proxy.http_get("/healthz") {
            assert_eq!(code, 200, "/healthz must be 200 while alive");
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never answered");
        assert!(
            proxy.wait_exit(Duration::ZERO).is_none(),
            "dbproxy exited with a wrong-password DSN"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        let (code, body) = proxy.http_get("/readyz")?;
        assert_eq!(code, 503, "/readyz with a DSN that cannot log in: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        proxy.http_get("/healthz")?.0,
        200,
        "liveness must not depend on the database"
    );
    write_uri(&secret, &db.uri("app_a"))?;
    proxy.wait_ready(Duration::from_secs(30))?;
    assert_eq!(whoami(&proxy.connect().await?).await?.0, "app_a");
    let (code, metrics) = proxy.http_get("/metrics")?;
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| !l.starts_with('#') && !l.trim().is_empty()),
        "/metrics has no samples: {metrics}"
    );
    Ok(())
}

/// SIGTERM: new connections are refused, an open transaction can still commit, and the process
/// exits 0 once that session disconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_open_sessions_then_exits_zero() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--shutdown-timeout", "60"])
        .start()?;
    let port = proxy.port();
    let session = proxy.connect().await?;
    session
        .batch_execute("BEGIN; INSERT INTO items (note) VALUES ('in flight')")
        .await?;

    proxy.sigterm();
    let refused_after = refused_within(port, Duration::from_secs(15)).await?;
    println!("new connections refused {refused_after:?} after SIGTERM");
    assert!(
        proxy.wait_exit(Duration::from_millis(500)).is_none(),
        "dbproxy exited while a session was still open in a transaction"
    );
    session
        .batch_execute("INSERT INTO items (note) VALUES ('after sigterm'); COMMIT")
        .await?;
    let admin = db.admin().await?;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM items WHERE note IN ('in flight', 'after sigterm')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        n, 2,
        "the transaction open at SIGTERM must be able to commit"
    );

    let disconnected = Instant::now();
    drop(session);
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .ok_or_else(|| anyhow::anyhow!("dbproxy still running 20 s after its last session left"))?;
    assert!(
        status.success(),
        "dbproxy exited with {status} after SIGTERM"
    );
    println!(
        "exited {:?} after the last session left",
        disconnected.elapsed()
    );
    Ok(())
}

/// SIGTERM with a session that never leaves: exit 0 after `--shutdown-timeout`, the session is
/// closed and its open transaction rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_shutdown_timeout_closes_stuck_sessions() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--shutdown-timeout", "2"])
        .start()?;
    let session = proxy.connect().await?;
    session
        .batch_execute("BEGIN; INSERT INTO items (note) VALUES ('never committed')")
        .await?;
    let (status, took) = proxy.sigterm_and_wait(Duration::from_secs(30))?;
    assert!(status.success(), "dbproxy exited with {status}");
    assert!(
        took >= Duration::from_millis(1500),
        "exited after {took:?}, before the timeout"
    );
    println!("exited {took:?} after SIGTERM with --shutdown-timeout 2");
    assert!(
        session.simple_query("SELECT 1").await.is_err(),
        "session survived the proxy"
    );
    let admin = db.admin().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_a'",
                &[],
            )
            .await?
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} server session(s) left behind by the exited proxy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM items WHERE note = 'never committed'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 0);
    Ok(())
}

/// Polls until a new session through the proxy fails; returns how long that took.
async fn refused_within(port: u16, timeout: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(10), async {
            let c = connect(port, "late").await?;
            c.simple_query("SELECT 1").await?;
            Ok::<_, tokio_postgres::Error>(())
        })
        .await;
        if !matches!(attempt, Ok(Ok(()))) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            anyhow::bail!("new sessions still accepted {timeout:?} after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every string a secret could show up as: raw, percent-encoded, JSON-escaped.
fn secret_forms(secret: &str) -> Vec<String> {
    let json = secret.replace('\\', "\\\\").replace('"', "\\\"");
    vec![secret.to_string(), percent_encode(secret), json]
}

/// Fails if any 10-character window of any form of any secret occurs in `text`.
fn assert_no_secret(text: &str, secrets: &[String], where_: &str) {
    for (i, secret) in secrets.iter().enumerate() {
        for form in secret_forms(secret) {
            let chars: Vec<char> = form.chars().collect();
            let width = chars.len().min(10);
            for window in chars.windows(width) {
                let needle: String = window.iter().collect();
                // never print the secret itself: name it by index
                assert!(
                    !text.contains(&needle),
                    "{where_} contains part of secret #{i} (a form of length {})",
                    form.len()
                );
            }
        }
    }
}

/// A rotation scenario with a wrong password and garbage DSNs; checks that none of the
/// passwords involved shows up in the log or the ops endpoints.
async fn secrets_scenario(log_format: &str) -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let mut secrets = vec![db.password("app_a"), db.password("app_b")];
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--log-format", log_format, "--server-lifetime", "1"])
        .env("RUST_LOG", "debug")
        .start()?;
    for s in &secrets {
        proxy.add_redaction(s);
    }
    let workload = Workload::start(proxy.port(), 2, 1);
    wait_for_traffic(&workload, 20).await;
    let mut bodies = Vec::new();
    let mut sample = |proxy: &ProxyProcess| -> anyhow::Result<()> {
        for path in ["/readyz", "/metrics", "/healthz"] {
            bodies.push((path, proxy.http_get(path)?.1));
        }
        Ok(())
    };

    // 1. rotate the password of the same user
    let new_a = db.rotate_password("app_a").await?;
    secrets.push(new_a.clone());
    proxy.add_redaction(&new_a);
    write_uri(&secret, &db.uri("app_a"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sample(&proxy)?;

    // 2. a wrong password
    let wrong = rotated_password();
    secrets.push(wrong.clone());
    proxy.add_redaction(&wrong);
    write_uri(&secret, &db.cluster.uri("app_a", &wrong, APP_DB))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sample(&proxy)?;

    // 3. garbage that still carries secrets: a URI with a bad port, a key=value DSN with an
    //    unterminated quote, and a bare password line
    let garbage = rotated_password();
    secrets.push(garbage.clone());
    proxy.add_redaction(&garbage);
    let bad_uri = format!(
        "postgres://app_a:{}@127.0.0.1:notaport/{APP_DB}",
        percent_encode(&garbage)
    );
    write_uri(&secret, &bad_uri)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sample(&proxy)?;
    let bad_kv = format!("host=127.0.0.1 user=app_a password='{garbage}");
    write_uri(&secret, &bad_kv)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sample(&proxy)?;

    // 4. a switch to app_b, which must be picked up
    let new_b = db.rotate_password("app_b").await?;
    secrets.push(new_b.clone());
    proxy.add_redaction(&new_b);
    let since = write_uri(&secret, &db.uri("app_b"))?;
    let latency = wait_for_session_user(proxy.port(), "app_b", since, PICKUP_DEADLINE).await?;
    println!("switch to app_b observed after {latency:?}");
    sample(&proxy)?;
    let report = workload.stop().await;
    assert_clean(&report, "clients during the secrets scenario");

    // 5. SIGTERM so shutdown messages are in the log too
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(60));
    assert!(
        matches!(status, Some(s) if s.success()),
        "exit after SIGTERM: {status:?}"
    );

    let log = proxy.log();
    assert!(
        !log.trim().is_empty(),
        "dbproxy logged nothing at RUST_LOG=debug"
    );
    // the rejected DSNs were reported (the error paths are where secrets usually leak)
    assert!(
        log.contains("WARN") || log.contains("ERROR"),
        "the wrong-password and garbage DSNs were not reported in the log"
    );
    assert_no_secret(&log, &secrets, &format!("the {log_format} log"));
    for (path, body) in &bodies {
        assert_no_secret(body, &secrets, path);
    }
    if log_format == "json" {
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.trim_start().starts_with('{'),
                "--log-format json printed a non-JSON line: {line}"
            );
        }
    }
    println!(
        "{log_format} log: {} lines, {} endpoint bodies checked, no secret found",
        log.lines().count(),
        bodies.len()
    );
    Ok(())
}

/// Secrets never appear in text logs, `/metrics`, `/readyz` or `/healthz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_appear_text_log() -> anyhow::Result<()> {
    secrets_scenario("text").await
}

/// Secrets never appear in JSON logs, `/metrics`, `/readyz` or `/healthz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_appear_json_log() -> anyhow::Result<()> {
    secrets_scenario("json").await
}

/// A non-loopback listener is an explicit opt-in: without `--client-password-file` the proxy
/// refuses to start; with it, clients on that listener must give the password (verified by the
/// proxy with SCRAM), while the loopback listener stays trust. The test connects through
/// 127.0.0.1 to the 0.0.0.0 listener: what counts is the listener's address, not the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_loopback_listener_requires_client_password() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;

    let mut refused = ProxyBuilder::new(&secret.file(URI_KEY))
        .listen_hosts(&["0.0.0.0"])
        .spawn()?;
    let status = refused.wait_exit(Duration::from_secs(30)).ok_or_else(|| {
        anyhow::anyhow!("dbproxy started on 0.0.0.0 without --client-password-file")
    })?;
    assert!(
        !status.success(),
        "0.0.0.0 without a client password must exit non-zero"
    );
    let log = refused.log();
    assert!(
        log.contains("--client-password-file"),
        "the refusal must name --client-password-file: {log}"
    );
    drop(refused);

    let client_password = rotated_password();
    let dir = tempfile::tempdir()?;
    let password_file = dir.path().join("client-password");
    std::fs::write(&password_file, &client_password)?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .listen_hosts(&["127.0.0.1", "0.0.0.0"])
        .arg("--client-password-file")
        .arg(password_file.to_string_lossy().into_owned())
        .redact(&client_password)
        .start()?;
    let (loopback, any) = (proxy.ports()[0], proxy.ports()[1]);

    // loopback listener: trust
    assert_eq!(whoami(&connect(loopback, "x").await?).await?.0, "app_a");

    let cfg = |password: Option<&str>| {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(any)
            .user("anyone")
            .dbname("anything")
            .connect_timeout(Duration::from_secs(30));
        if let Some(p) = password {
            cfg.password(p);
        }
        cfg
    };
    let c = connect_with(&cfg(Some(&client_password))).await?;
    assert_eq!(whoami(&c).await?.0, "app_a");

    let err = connect_with(&cfg(Some("not the password")))
        .await
        .expect_err("a wrong client password was accepted");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    assert!(
        connect_with(&cfg(None)).await.is_err(),
        "a client without password got in on the non-loopback listener"
    );
    assert_no_secret(&proxy.log(), &[client_password], "the log");
    Ok(())
}

/// Transaction pooling: a client between transactions holds no server and nothing worth
/// waiting for, so SIGTERM ends its session at once and dbproxy exits without waiting for
/// --shutdown-timeout. The idle client was registered for the shutdown signal once, at its
/// first transaction, and not again: this is what proves the registration holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_ends_idle_transaction_mode_clients_at_once() -> anyhow::Result<()> {
    let db = AppCluster::start("txnstop").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args([
            "--pool-mode",
            "transaction",
            "--shutdown-delay",
            "0",
            "--shutdown-timeout",
            "60",
        ])
        .redact(&db.password("app_a"))
        .start()?;
    let idle = proxy.connect().await?;
    for _ in 0..3 {
        idle.simple_query("SELECT 1").await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.sigterm_expect_prompt_exit("one idle transaction-mode client")?;
    assert!(
        idle.simple_query("SELECT 1").await.is_err(),
        "the idle client's session survived the proxy"
    );
    Ok(())
}
