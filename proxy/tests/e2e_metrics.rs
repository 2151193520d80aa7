//! /metrics against real PostgreSQL: every metric the issue names moves the way a real
//! scenario says it should (traffic, waiting, rotation, a rejected DSN, a wrong password).

mod common;

use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_traffic_waiting_and_rotations() -> anyhow::Result<()> {
    let db = AppCluster::start("metrics").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-size", "1", "--pool-timeout", "60"])
        .redact(&db.password("app_a"))
        .redact(&db.password("app_b"))
        .start()?;

    // Startup: generation 1 is current and described without the password.
    let text = scrape(&proxy)?;
    assert_eq!(
        metric(&text, "dbproxy_credential_generation", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "dbproxy_info",
            &[
                ("user", "app_a"),
                ("database", APP_DB),
                ("sslmode", "disable")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "dbproxy_rotations_applied_total", &[]),
        Some(1.0)
    );
    let queries0 = metric_or_zero(&text, "dbproxy_queries_total", &[]);
    let xacts0 = metric_or_zero(&text, "dbproxy_transactions_total", &[]);

    // Traffic: 10 single-statement queries and one 3-statement transaction.
    let session = proxy.connect().await?;
    for _ in 0..10 {
        session.simple_query("SELECT 1").await?;
    }
    session
        .batch_execute("BEGIN; SELECT 1; SELECT 2; COMMIT")
        .await?;
    let text = scrape(&proxy)?;
    let queries = metric_or_zero(&text, "dbproxy_queries_total", &[]) - queries0;
    let xacts = metric_or_zero(&text, "dbproxy_transactions_total", &[]) - xacts0;
    println!("queries +{queries}, transactions +{xacts}");
    assert!(queries >= 11.0, "queries_total moved by {queries}:\n{text}");
    assert!(
        xacts >= 11.0,
        "transactions_total moved by {xacts}:\n{text}"
    );
    assert!(
        metric_or_zero(&text, "dbproxy_query_duration_seconds_count", &[]) >= 11.0,
        "{text}"
    );
    assert!(
        metric_or_zero(&text, "dbproxy_transaction_duration_seconds_count", &[]) >= 11.0,
        "{text}"
    );
    assert!(metric_or_zero(&text, "dbproxy_transaction_duration_seconds_sum", &[]) > 0.0);
    assert!(metric_or_zero(&text, "dbproxy_client_bytes_received_total", &[]) > 100.0);
    assert!(metric_or_zero(&text, "dbproxy_client_bytes_sent_total", &[]) > 100.0);
    assert!(metric_or_zero(&text, "dbproxy_pool_wait_seconds_count", &[]) >= 1.0);
    assert_eq!(metric(&text, "dbproxy_clients", &[]), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "dbproxy_clients_active", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "dbproxy_server_connections_by_state",
            &[("state", "active"), ("generation", "1")]
        ),
        Some(1.0),
        "{text}"
    );

    // Waiting: the pool holds one connection, so a second client waits for it.
    let port = proxy.port();
    let waiter = tokio::spawn(async move {
        let c = connect(port, "second").await?;
        c.simple_query("SELECT 1").await?;
        Ok::<_, tokio_postgres::Error>(c)
    });
    wait_for_metrics(&proxy, "one waiting client", WAIT, |t| {
        metric(t, "dbproxy_clients_waiting", &[]) == Some(1.0)
    })
    .await?;
    // Keep it waiting a measurable while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(session);
    let second = tokio::time::timeout(WAIT, waiter).await???;
    let text = wait_for_metrics(&proxy, "no waiting client", WAIT, |t| {
        metric(t, "dbproxy_clients_waiting", &[]) == Some(0.0)
    })
    .await?;
    assert!(
        metric_or_zero(&text, "dbproxy_pool_wait_seconds_sum", &[]) > 0.25,
        "the waiting client's wait is not in the histogram:\n{text}"
    );
    drop(second);
    wait_for_metrics(&proxy, "an idle server connection", WAIT, |t| {
        metric(
            t,
            "dbproxy_server_connections_by_state",
            &[("state", "idle")],
        ) == Some(1.0)
    })
    .await?;

    // Rotation: switch to app_b; generation 2, its info, the rotation latency, old info 0.
    let written = write_uri(&secret, &db.uri("app_b"))?;
    wait_for_session_user(port, "app_b", written, PICKUP_DEADLINE).await?;
    let text = wait_for_metrics(&proxy, "generation 2", WAIT, |t| {
        metric(t, "dbproxy_credential_generation", &[]) == Some(2.0)
    })
    .await?;
    assert_eq!(
        metric(&text, "dbproxy_rotations_applied_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "dbproxy_rotation_seconds_count", &[]),
        Some(1.0),
        "{text}"
    );
    let took = metric_or_zero(&text, "dbproxy_rotation_seconds_sum", &[]);
    println!("Secret change -> generation 2 current: {took:.3} s");
    assert!(took > 0.0 && took < 20.0, "rotation_seconds_sum {took}");
    assert_eq!(
        metric(&text, "dbproxy_info", &[("user", "app_b")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "dbproxy_info", &[("user", "app_a")]),
        Some(0.0)
    );

    // A file that does not parse: rejected, nothing changes.
    let rejected0 = metric_or_zero(&text, "dbproxy_rotations_rejected_total", &[]);
    secret.write(&[(URI_KEY, b"postgres://[not a dsn")])?;
    let text = wait_for_metrics(&proxy, "a rejected rotation", WAIT, |t| {
        metric_or_zero(t, "dbproxy_rotations_rejected_total", &[]) > rejected0
    })
    .await?;
    assert_eq!(metric(&text, "dbproxy_credential_rejected", &[]), Some(1.0));

    // A wrong password: the validation login fails with 28P01, counted by SQLSTATE.
    let wrong = rotated_password();
    proxy.add_redaction(&wrong);
    let rejected1 = metric_or_zero(&text, "dbproxy_rotations_rejected_total", &[]);
    write_uri(&secret, &db.cluster.uri("app_b", &wrong, APP_DB))?;
    let text = wait_for_metrics(&proxy, "a 28P01 login failure", WAIT, |t| {
        metric_or_zero(
            t,
            "dbproxy_server_login_failures_total",
            &[("sqlstate", "28P01")],
        ) >= 1.0
    })
    .await?;
    assert!(metric_or_zero(&text, "dbproxy_rotations_rejected_total", &[]) > rejected1);
    assert_eq!(
        metric(&text, "dbproxy_credential_generation", &[]),
        Some(2.0)
    );
    let started = Instant::now();
    // Still serving with generation 2.
    assert_eq!(whoami(&proxy.connect().await?).await?.0, "app_b");
    println!(
        "served with the last good generation ({:?})",
        started.elapsed()
    );

    println!("--- /metrics at the end of the scenario ---\n{text}");
    assert_no_secrets(
        &text,
        &[&db.password("app_a"), &db.password("app_b"), &wrong],
        "/metrics",
    );
    Ok(())
}
