//! The admin console against real PostgreSQL: every command, pgbouncer's column names, who
//! may use it, and what PAUSE/RESUME/RECONNECT/RELOAD do to real sessions.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::error::SqlState;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn show_commands_report_pools_clients_servers_stats_config_version() -> anyhow::Result<()> {
    let db = AppCluster::start("admin").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-size", "3"])
        .redact(&db.password("app_a"))
        .start()?;
    let app = proxy.connect().await?;
    let (_, _, backend_pid) = whoami(&app).await?;
    app.batch_execute("BEGIN; SELECT 1; COMMIT").await?;

    let admin = admin_connect(proxy.port(), "pgbouncer").await?;

    let pools = admin_rows(&admin, "SHOW POOLS").await?;
    println!("SHOW POOLS: {pools:?}");
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(p["database"], APP_DB);
    assert_eq!(p["user"], "app_a");
    assert_eq!(
        p["cl_active"], "1",
        "the admin session is not a pool client"
    );
    assert_eq!(p["cl_waiting"], "0");
    assert_eq!(p["sv_active"], "1");
    assert_eq!(p["sv_idle"], "0");
    assert_eq!(p["pool_mode"], "session");
    for column in ["maxwait", "maxwait_us", "sv_used", "sv_tested", "sv_login"] {
        assert!(
            p.contains_key(column),
            "SHOW POOLS lacks pgbouncer's {column}"
        );
    }

    let clients = admin_rows(&admin, "SHOW CLIENTS").await?;
    println!("SHOW CLIENTS: {clients:?}");
    let app_row = clients
        .iter()
        .find(|c| c["database"] == "anything")
        .expect("the application's client is listed");
    assert_eq!(app_row["type"], "C");
    assert_eq!(app_row["state"], "active");
    assert_eq!(app_row["addr"], "127.0.0.1");
    assert_eq!(app_row["application_name"], "proxytest");
    assert!(clients.iter().any(|c| c["database"] == "pgbouncer"));

    let servers = admin_rows(&admin, "SHOW SERVERS").await?;
    println!("SHOW SERVERS: {servers:?}");
    assert_eq!(servers.len(), 1);
    let s = &servers[0];
    assert_eq!(s["type"], "S");
    assert_eq!(s["state"], "active");
    assert_eq!(s["remote_pid"], backend_pid.to_string());
    assert_eq!(s["user"], "app_a");
    assert_eq!(s["generation"], "1");
    assert_eq!(s["port"], db.cluster.port().to_string());
    assert_eq!(s["link"], app_row["ptr"], "server links to its client");

    let stats = admin_rows(&admin, "SHOW STATS").await?;
    println!("SHOW STATS: {stats:?}");
    let xacts: u64 = stats[0]["total_xact_count"].parse()?;
    let queries: u64 = stats[0]["total_query_count"].parse()?;
    assert!(xacts >= 2 && queries >= 2, "{stats:?}");
    assert!(stats[0]["total_received"].parse::<u64>()? > 0);
    assert!(stats[0]["total_server_assignment_count"].parse::<u64>()? >= 1);

    let config = admin_rows(&admin, "SHOW CONFIG").await?;
    let pool_size = config
        .iter()
        .find(|r| r["key"] == "pool_size")
        .expect("pool_size");
    assert_eq!(
        (pool_size["value"].as_str(), pool_size["default"].as_str()),
        ("3", "20")
    );
    assert_eq!(
        admin_columns(&admin, "SHOW CONFIG").await?,
        ["key", "value", "default", "changeable"]
    );

    let version = admin_rows(&admin, "SHOW VERSION").await?;
    assert!(version[0]["version"].starts_with("dbproxy "), "{version:?}");
    let help = admin_rows(&admin, "show help").await?;
    assert!(help.iter().any(|r| r["command"] == "RECONNECT"), "{help:?}");

    // Unknown commands: 42601 with the list of commands as hint; the session continues.
    let err = admin
        .simple_query("SHOW ME_THE_MONEY")
        .await
        .expect_err("an unknown command succeeded");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code(), &SqlState::SYNTAX_ERROR);
    assert!(
        db_err.hint().unwrap_or("").contains("SHOW POOLS"),
        "{db_err:?}"
    );
    assert_eq!(admin_rows(&admin, "SHOW VERSION").await?.len(), 1);

    // `dbproxy` is the console too, and psql works with it.
    let other = admin_connect(proxy.port(), "dbproxy").await?;
    assert_eq!(admin_rows(&other, "SHOW POOLS").await?.len(), 1);
    let psql = |command: &str| -> anyhow::Result<String> {
        let out = std::process::Command::new(psql_bin())
            .args(["-h", "127.0.0.1", "-p", &proxy.port().to_string()])
            .args(["-U", "ops", "-d", "pgbouncer", "-c", command])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "psql -c {command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let stdout = psql("SHOW SERVERS")?;
    assert!(
        stdout.contains("remote_pid") && stdout.contains(&backend_pid.to_string()),
        "{stdout}"
    );
    // The transcript OPERATIONS.md shows.
    for command in [
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW STATS",
        "SHOW CONFIG",
        "SHOW VERSION",
        "SHOW HELP",
    ] {
        println!("pgbouncer=# {command};\n{}", psql(command)?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_resume_reconnect_and_reload_act_on_real_sessions() -> anyhow::Result<()> {
    let db = AppCluster::start("admin-control").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args([
            "--pool-size",
            "3",
            "--pool-timeout",
            "3",
            "--poll-interval",
            "600",
        ])
        .redact(&db.password("app_a"))
        .start()?;
    let admin = admin_connect(proxy.port(), "pgbouncer").await?;

    // RECONNECT: an idle server closes now, a busy one when its client leaves.
    let busy = proxy.connect().await?;
    let (_, _, busy_pid) = whoami(&busy).await?;
    {
        let idle = proxy.connect().await?;
        idle.simple_query("SELECT 1").await?;
    }
    let deadline = Instant::now() + WAIT;
    while !admin_rows(&admin, "SHOW SERVERS")
        .await?
        .iter()
        .any(|s| s["state"] == "idle")
    {
        anyhow::ensure!(Instant::now() < deadline, "the idle server never showed up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.simple_query("RECONNECT").await?;
    let servers = admin_rows(&admin, "SHOW SERVERS").await?;
    assert_eq!(
        servers.len(),
        1,
        "the idle server survived RECONNECT: {servers:?}"
    );
    assert_eq!(servers[0]["remote_pid"], busy_pid.to_string());
    assert_eq!(
        whoami(&busy).await?.2,
        busy_pid,
        "RECONNECT broke a busy session"
    );
    drop(busy);
    let deadline = Instant::now() + WAIT;
    while !admin_rows(&admin, "SHOW SERVERS").await?.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the retired server was kept after release"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = proxy.connect().await?;
    assert_ne!(whoami(&fresh).await?.2, busy_pid);
    drop(fresh);

    // PAUSE: a new client waits (visible as cl_waiting) and proceeds on RESUME.
    admin.simple_query("PAUSE").await?;
    assert_eq!(admin_rows(&admin, "SHOW POOLS").await?[0]["paused"], "1");
    let port = proxy.port();
    let held = tokio::spawn(async move {
        let c = connect(port, "held").await?;
        whoami(&c).await
    });
    let deadline = Instant::now() + WAIT;
    while admin_rows(&admin, "SHOW POOLS").await?[0]["cl_waiting"] != "1" {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the paused client is not waiting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a client got a server while paused");
    admin.simple_query("RESUME").await?;
    let (user, _, _) = tokio::time::timeout(WAIT, held).await???;
    assert_eq!(user, "app_a");

    // PAUSE with no RESUME: the waiting client gets an error after --pool-timeout.
    admin.simple_query("PAUSE").await?;
    let t = Instant::now();
    let err = match connect(port, "late").await {
        Ok(c) => c.simple_query("SELECT 1").await.err(),
        Err(e) => Some(e),
    }
    .expect("a client got through a PAUSE");
    println!("paused client refused after {:?}: {err}", t.elapsed());
    assert!(format!("{err:?}").contains("RESUME"), "{err:?}");
    assert!(t.elapsed() >= Duration::from_secs(2));
    admin.simple_query("RESUME").await?;
    assert_eq!(whoami(&proxy.connect().await?).await?.0, "app_a");

    // RELOAD: the re-read is asked for (counted and logged).
    admin.simple_query("RELOAD").await?;
    wait_for_metrics(&proxy, "an admin reload", WAIT, |t| {
        metric(t, "dbproxy_reloads_total", &[("source", "admin")]) == Some(1.0)
    })
    .await?;
    // The log reaches the test through a reader thread: give it a moment.
    let deadline = Instant::now() + WAIT;
    while !proxy.log().contains("admin RELOAD") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.log().contains("admin RELOAD"));
    Ok(())
}

/// The machine's non-loopback address, to reach a listener the way another pod would.
fn non_loopback_ip() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").expect("UDP socket");
    probe
        .connect("192.0.2.1:9")
        .or_else(|_| probe.connect("8.8.8.8:53"))
        .expect("this test needs a non-loopback IPv4 address with a route (none found)");
    let ip = probe.local_addr().expect("local address").ip();
    assert!(
        !ip.is_loopback(),
        "no non-loopback IPv4 address on this machine"
    );
    ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_loopback_clients_or_the_admin_user_get_the_console() -> anyhow::Result<()> {
    let db = AppCluster::start("admin-auth").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let client_password = rotated_password();
    let dir = tempfile::tempdir()?;
    let password_file = dir.path().join("client-password");
    std::fs::write(&password_file, &client_password)?;
    let ip = non_loopback_ip();
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .listen_hosts(&["127.0.0.1", &ip.to_string()])
        .arg("--client-password-file")
        .arg(password_file.to_string_lossy().into_owned())
        .args(["--admin-user", "opsadmin"])
        .redact(&client_password)
        .redact(&db.password("app_a"))
        .start()?;
    let remote_port = proxy.ports()[1];
    let cfg = |user: &str| {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(ip.to_string())
            .port(remote_port)
            .user(user)
            .password(client_password.as_str())
            .dbname("pgbouncer")
            .connect_timeout(Duration::from_secs(30));
        cfg
    };
    // Another address, right password, not the admin user: 28000 with a clear message.
    let err = match connect_with(&cfg("someone")).await {
        Ok(c) => c.simple_query("SHOW POOLS").await.err(),
        Err(e) => Some(e),
    }
    .expect("a non-admin user from another address got the console");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(
        db_err.code(),
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    assert!(db_err.message().contains("--admin-user"), "{db_err:?}");

    // The admin user from the same address gets it.
    let admin = connect_with(&cfg("opsadmin")).await?;
    assert_eq!(admin_rows(&admin, "SHOW POOLS").await?.len(), 1);
    // Loopback: always.
    let local = admin_connect(proxy.ports()[0], "dbproxy").await?;
    assert_eq!(admin_rows(&local, "SHOW VERSION").await?.len(), 1);
    // The non-loopback application path still works.
    let app = connect_with(cfg("app").dbname("appdb")).await?;
    assert_eq!(whoami(&app).await?.0, "app_a");
    Ok(())
}

/// Transaction pooling: clients between transactions hold no server and wait for nothing.
/// pgbouncer counts them in cl_active; counting them as waiting (as dbproxy once did) made
/// maxwait grow with their idle time. A client that does wait (pool of one held by an open
/// transaction) is counted in cl_waiting, and maxwait measures its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_mode_idle_clients_are_active_and_waiters_are_waiting() -> anyhow::Result<()> {
    let db = AppCluster::start("admintxn").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-mode", "transaction", "--pool-size", "1"])
        .redact(&db.password("app_a"))
        .start()?;
    let first = proxy.connect().await?;
    let second = proxy.connect().await?;
    first.simple_query("SELECT 1").await?;
    second.simple_query("SELECT 1").await?;
    let admin = admin_connect(proxy.port(), "pgbouncer").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = admin_rows(&admin, "SHOW POOLS").await?.remove(0);
    println!("SHOW POOLS, both idle: {p:?}");
    assert_eq!(p["pool_mode"], "transaction");
    assert_eq!(p["cl_active"], "2", "{p:?}");
    assert_eq!(p["cl_waiting"], "0", "{p:?}");
    assert_eq!(
        (p["maxwait"].as_str(), p["maxwait_us"].as_str()),
        ("0", "0"),
        "idle time counted as waiting: {p:?}"
    );
    let clients = admin_rows(&admin, "SHOW CLIENTS").await?;
    let app_rows: Vec<_> = clients
        .iter()
        .filter(|c| c["database"] == "anything")
        .collect();
    assert_eq!(app_rows.len(), 2);
    assert!(
        app_rows.iter().all(|c| c["state"] == "active"),
        "{clients:?}"
    );

    // The first client holds the only server in an open transaction: the second waits.
    first.batch_execute("BEGIN; SELECT 1").await?;
    let waiter = tokio::spawn(async move { second.simple_query("SELECT 2").await.map(|_| second) });
    let deadline = Instant::now() + WAIT;
    let p = loop {
        let p = admin_rows(&admin, "SHOW POOLS").await?.remove(0);
        if p["cl_waiting"] == "1" && (p["maxwait"] != "0" || p["maxwait_us"] != "0") {
            break p;
        }
        anyhow::ensure!(Instant::now() < deadline, "no waiting client shown: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("SHOW POOLS, one waiting: {p:?}");
    assert_eq!(p["cl_active"], "1", "{p:?}");
    first.batch_execute("COMMIT").await?;
    let second = tokio::time::timeout(WAIT, waiter).await???;
    second.simple_query("SELECT 3").await?;
    let p = admin_rows(&admin, "SHOW POOLS").await?.remove(0);
    assert_eq!(
        (p["cl_active"].as_str(), p["cl_waiting"].as_str()),
        ("2", "0"),
        "{p:?}"
    );
    Ok(())
}
