//! End-to-end: real clients (psql, tokio-postgres, raw protocol bytes) through the real
//! `dbproxy` binary to a real PostgreSQL: protocol coverage, cancels, limits, DSN layouts.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// psql and tokio-postgres (simple and extended protocol, prepared statements, transactions,
/// COPY both ways, error recovery, forwarded startup parameters) through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_and_tokio_postgres_through_proxy() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let port = proxy.port().to_string();

    // psql: any user, any database, no password; sslmode=prefer by default, so psql sends an
    // SSLRequest first and must be answered 'N'.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(psql_bin())
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "anything",
                "-d",
                "anything",
            ])
            .args([
                "-c",
                "select current_user",
                "-c",
                "select current_database()",
            ])
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .env_remove("PGSERVICE")
            .env("PGCONNECT_TIMEOUT", "30")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["app_a", APP_DB],
        "psql output"
    );

    // tokio-postgres, with startup parameters that must reach the server
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(proxy.port())
        .user("someone")
        .dbname("whatever")
        .application_name("e2e-app")
        .options("-c statement_timeout=12345")
        .connect_timeout(Duration::from_secs(30));
    let mut client = connect_with(&cfg).await?;
    let row = client
        .query_one(
            "SELECT session_user::text, current_database()::text,
                    current_setting('application_name'), current_setting('statement_timeout')",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "app_a");
    assert_eq!(row.get::<_, String>(1), APP_DB);
    assert_eq!(
        row.get::<_, String>(2),
        "e2e-app",
        "application_name not passed on"
    );
    assert_eq!(row.get::<_, String>(3), "12345ms", "options not passed on");

    // simple protocol, two statements in one Query
    let msgs = client
        .simple_query("SELECT 1 AS a; SELECT 'two' AS b")
        .await?;
    let values: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);

    // extended protocol with a parameter
    let row = client.query_one("SELECT $1::int4 + 1", &[&41i32]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);

    // a named prepared statement used several times
    let insert = client
        .prepare("INSERT INTO items (note) VALUES ($1) RETURNING id")
        .await?;
    let mut ids = Vec::new();
    for note in ["p1", "p2", "p3"] {
        ids.push(client.query_one(&insert, &[&note]).await?.get::<_, i64>(0));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids {ids:?}");

    // transactions: rollback discards, commit keeps
    let before = items_count(&client).await?;
    let tx = client.transaction().await?;
    tx.execute("INSERT INTO items (note) VALUES ('rolled back')", &[])
        .await?;
    tx.rollback().await?;
    assert_eq!(items_count(&client).await?, before);
    let tx = client.transaction().await?;
    tx.execute("INSERT INTO items (note) VALUES ('committed')", &[])
        .await?;
    tx.commit().await?;
    assert_eq!(items_count(&client).await?, before + 1);

    // COPY FROM STDIN
    let sink = client.copy_in("COPY items (note) FROM STDIN").await?;
    pin_mut!(sink);
    sink.send(Bytes::from_static(b"copy1\ncopy2\n")).await?;
    sink.send(Bytes::from_static(b"copy3\n")).await?;
    let copied = sink.finish().await?;
    assert_eq!(copied, 3);

    // COPY TO STDOUT
    let stream = client
        .copy_out("COPY (SELECT note FROM items WHERE note LIKE 'copy%' ORDER BY id) TO STDOUT")
        .await?;
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    assert_eq!(String::from_utf8_lossy(&out), "copy1\ncopy2\ncopy3\n");

    // an error in a query, then good queries on the same connection (simple and extended)
    let err = client
        .simple_query("SELECT 1/0")
        .await
        .expect_err("division by zero must fail");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err:?}");
    let err = client
        .query("SELECT $1::int4 / 0", &[&1i32])
        .await
        .expect_err("division by zero must fail");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err:?}");
    let err = client
        .query("SELECT * FROM no_such_table", &[])
        .await
        .expect_err("unknown table must fail");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
    assert_eq!(client.query_one("SELECT 7", &[]).await?.get::<_, i32>(0), 7);
    let id = client
        .query_one(&insert, &[&"after error"])
        .await?
        .get::<_, i64>(0);
    assert!(id > 0);
    // an error inside a transaction aborts it; ROLLBACK makes the session usable again
    let tx = client.transaction().await?;
    assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    let err = tx
        .execute("SELECT 1", &[])
        .await
        .expect_err("aborted transaction");
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    tx.rollback().await?;
    assert_eq!(client.query_one("SELECT 8", &[]).await?.get::<_, i32>(0), 8);
    Ok(())
}

async fn items_count(client: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT count(*) FROM items", &[])
        .await?
        .get(0))
}

// ---------------------------------------------------------------------------------------------
// Raw protocol helpers for the malformed-input test.

const PROTOCOL_3_0: u32 = 196_608;

fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

fn special_request(code: u32) -> Vec<u8> {
    let mut p = 8u32.to_be_bytes().to_vec();
    p.extend(code.to_be_bytes());
    p
}

async fn raw_connect(port: u16) -> TcpStream {
    tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("connect to the proxy timed out")
    .expect("connect to the proxy")
}

/// Reads one backend message (tag, body). None on EOF or a reset.
async fn read_message(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    assert!(
        (4..1 << 20).contains(&len),
        "proxy sent a message with length {len}"
    );
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.ok()?;
    Some((header[0], body))
}

/// After bad input the proxy must answer with at most ErrorResponses and close the connection
/// promptly; returns whether an ErrorResponse came.
async fn expect_rejected(stream: &mut TcpStream, what: &str) -> bool {
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        let mut saw_error = false;
        while let Some((tag, body)) = read_message(stream).await {
            match tag {
                b'E' => saw_error = true,
                b'N' => {}
                other => panic!(
                    "{what}: unexpected message {:?} after bad input ({} bytes)",
                    other as char,
                    body.len()
                ),
            }
        }
        saw_error
    })
    .await;
    match outcome {
        Ok(saw_error) => saw_error,
        Err(_) => {
            panic!("{what}: the proxy neither rejected nor closed the connection within 15 s")
        }
    }
}

/// Completes a trust login after the startup packet was sent and runs one query.
async fn finish_login_and_query(stream: &mut TcpStream, what: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (tag, body) = read_message(stream)
                .await
                .unwrap_or_else(|| panic!("{what}: connection closed during login"));
            match tag {
                b'R' => assert_eq!(
                    &body[..4],
                    &[0, 0, 0, 0],
                    "{what}: expected AuthenticationOk"
                ),
                b'S' | b'K' | b'N' => {}
                b'Z' => break,
                b'E' => panic!("{what}: login failed: {}", String::from_utf8_lossy(&body)),
                other => panic!(
                    "{what}: unexpected message {:?} during login",
                    other as char
                ),
            }
        }
        let mut q = vec![b'Q'];
        let sql = b"SELECT 41 + 1\0";
        q.extend(((sql.len() + 4) as u32).to_be_bytes());
        q.extend_from_slice(sql);
        stream.write_all(&q).await.expect("send query");
        let mut data = None;
        loop {
            let (tag, body) = read_message(stream)
                .await
                .unwrap_or_else(|| panic!("{what}: connection closed during query"));
            match tag {
                b'D' => data = Some(body),
                b'E' => panic!("{what}: query failed: {}", String::from_utf8_lossy(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        let data = data.unwrap_or_else(|| panic!("{what}: no DataRow"));
        assert!(data.ends_with(b"42"), "{what}: unexpected row {data:?}");
        stream
            .write_all(&[b'X', 0, 0, 0, 4])
            .await
            .expect("send Terminate");
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: login/query through the proxy timed out"));
}

/// Garbage, oversized lengths, unfinished startups, SSL/GSSENC requests, old and new protocol
/// versions and bogus cancels: each handled cleanly, none disturbing a healthy workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_client_bytes_do_not_disturb_others() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--client-tls", "disable"])
        .start()?;
    let port = proxy.port();
    let workload = Workload::start(port, 2, 1);
    wait_for_traffic(&workload, 20).await;

    // 1. an HTTP request instead of a startup packet ("GET " read as a ~1.1 GB length)
    let mut s = raw_connect(port).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    expect_rejected(&mut s, "HTTP request").await;

    // 2. random bytes with a consistent length: a complete packet of garbage
    let mut garbage: Vec<u8> = (0..4092).map(|_| rand::random::<u8>()).collect();
    garbage[0] = 0xde; // never a valid protocol version code
    let mut packet = 4096u32.to_be_bytes().to_vec();
    packet.extend(garbage);
    let mut s = raw_connect(port).await;
    s.write_all(&packet).await?;
    expect_rejected(&mut s, "random startup packet").await;

    // 3. a startup packet claiming ~2 GB
    let mut s = raw_connect(port).await;
    let mut p = 0x7fff_fff0u32.to_be_bytes().to_vec();
    p.extend(PROTOCOL_3_0.to_be_bytes());
    p.extend_from_slice(b"user\0x\0");
    s.write_all(&p).await?;
    expect_rejected(&mut s, "oversized startup length").await;

    // 4. a length shorter than the header itself
    let mut s = raw_connect(port).await;
    s.write_all(&[0, 0, 0, 2, 0, 3, 0, 0]).await?;
    expect_rejected(&mut s, "startup length < 8").await;

    // 5. clients that never finish their startup packet, held open for the rest of the test
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = raw_connect(port).await;
        s.write_all(&[0, 0, 0]).await?;
        stalled.push(s);
    }
    let mut client = connect(port, "during-stall").await?;
    assert_eq!(whoami(&client).await?.0, "app_a");
    drop(client);

    // 6. an oversized regular message after a good login (Query claiming ~2 GB)
    let mut s = raw_connect(port).await;
    s.write_all(&startup_packet(
        PROTOCOL_3_0,
        &[("user", "x"), ("database", "y")],
    ))
    .await?;
    loop {
        match read_message(&mut s).await {
            Some((b'Z', _)) => break,
            Some((b'E', body)) => panic!("login failed: {}", String::from_utf8_lossy(&body)),
            Some(_) => {}
            None => panic!("connection closed during login"),
        }
    }
    let mut q = vec![b'Q'];
    q.extend(0x7fff_fff0u32.to_be_bytes());
    q.extend_from_slice(b"SELECT 1");
    s.write_all(&q).await?;
    expect_rejected(&mut s, "oversized Query message").await;

    // 7. SSLRequest answered 'N', then a normal startup on the same connection
    let mut s = raw_connect(port).await;
    s.write_all(&special_request(80_877_103)).await?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer)).await??;
    assert_eq!(answer[0], b'N', "SSLRequest must be answered N");
    s.write_all(&startup_packet(
        PROTOCOL_3_0,
        &[("user", "x"), ("database", "y")],
    ))
    .await?;
    finish_login_and_query(&mut s, "after SSLRequest").await;

    // 8. GSSENCRequest answered 'N', connection kept, then a normal startup works
    let mut s = raw_connect(port).await;
    s.write_all(&special_request(80_877_104)).await?;
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer)).await??;
    assert_eq!(answer[0], b'N', "GSSENCRequest must be answered N");
    s.write_all(&startup_packet(
        PROTOCOL_3_0,
        &[("user", "x"), ("database", "y")],
    ))
    .await?;
    finish_login_and_query(&mut s, "after GSSENCRequest").await;

    // 9. protocol 2.0 startup: a clear ErrorResponse
    let mut s = raw_connect(port).await;
    s.write_all(&startup_packet(
        0x0002_0000,
        &[("user", "x"), ("database", "y")],
    ))
    .await?;
    assert!(
        expect_rejected(&mut s, "protocol 2.0").await,
        "protocol 2.0 startup must get an ErrorResponse"
    );

    // 10. protocol 3.2 (PostgreSQL 18): an ErrorResponse, or NegotiateProtocolVersion to 3.0
    let mut s = raw_connect(port).await;
    s.write_all(&startup_packet(
        0x0003_0002,
        &[("user", "x"), ("database", "y")],
    ))
    .await?;
    let first = tokio::time::timeout(Duration::from_secs(15), read_message(&mut s)).await?;
    match first {
        Some((b'E', _)) => {}
        Some((b'v', body)) => {
            // NegotiateProtocolVersion carries the newest supported *minor* version: 3.0
            assert_eq!(
                &body[..4],
                &0u32.to_be_bytes(),
                "NegotiateProtocolVersion minor"
            );
            finish_login_and_query(&mut s, "after NegotiateProtocolVersion").await;
        }
        other => panic!(
            "protocol 3.2 startup: expected ErrorResponse or NegotiateProtocolVersion, got {:?}",
            other.map(|(t, _)| t as char)
        ),
    }

    // 11. a CancelRequest with a key nobody has: closed, cancels nothing
    let mut s = raw_connect(port).await;
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend(80_877_102u32.to_be_bytes());
    cancel.extend(rand::random::<u32>().to_be_bytes());
    cancel.extend(rand::random::<u32>().to_be_bytes());
    s.write_all(&cancel).await?;
    expect_rejected(&mut s, "bogus CancelRequest").await;

    // a healthy client still works while 20 half-open startups are held
    client = connect(port, "at-end").await?;
    assert_eq!(whoami(&client).await?.0, "app_a");
    wait_for_traffic(&workload, 20).await;
    let report = workload.stop().await;
    drop(stalled);
    assert_clean(&report, "healthy clients during malformed input");
    assert_eq!(proxy.http_get("/healthz")?.0, 200);
    println!(
        "healthy workload during malformed input: {} sessions, {} queries, 0 errors",
        report.sessions, report.queries
    );
    Ok(())
}

/// A cancel through the proxy reaches the right backend and only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_reaches_only_the_right_backend() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
    let victim = proxy.connect().await?;
    let bystander = proxy.connect().await?;
    let token = victim.cancel_token();

    let bystander_task = tokio::spawn(async move {
        let t = Instant::now();
        let r = bystander.simple_query("SELECT pg_sleep(4)").await;
        (r, t.elapsed())
    });
    let victim_task = tokio::spawn(async move {
        let t = Instant::now();
        let r = victim.simple_query("SELECT pg_sleep(30)").await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cancelled_at = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await?;

    let (result, _) = tokio::time::timeout(Duration::from_secs(20), victim_task).await??;
    let cancel_latency = cancelled_at.elapsed();
    let err = result.expect_err("the cancelled query must fail");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(
        cancel_latency < Duration::from_secs(10),
        "cancel took {cancel_latency:?}"
    );
    let (result, elapsed) = tokio::time::timeout(Duration::from_secs(30), bystander_task).await??;
    result.map_err(|e| anyhow::anyhow!("the other client's query was disturbed: {e:?}"))?;
    assert!(
        elapsed >= Duration::from_secs(4),
        "bystander returned after {elapsed:?}"
    );
    println!("cancel answered after {cancel_latency:?}");
    Ok(())
}

/// `--pool-size 2 --pool-timeout 1`: a third session waits, then gets a clear error; a session
/// released in time lets a waiter through. `--max-clients` refuses clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_size_wait_queue_and_client_limit() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-size", "2", "--pool-timeout", "1"])
        .start()?;
    let port = proxy.port();
    let s1 = connect(port, "s1").await?;
    let s2 = connect(port, "s2").await?;
    whoami(&s1).await?;
    whoami(&s2).await?;

    // third session: waits ~1 s then a clear error (at login or at its first query)
    let started = Instant::now();
    let third = tokio::time::timeout(Duration::from_secs(30), async {
        let c = connect(port, "s3").await?;
        whoami(&c).await?;
        Ok::<_, tokio_postgres::Error>(c)
    })
    .await
    .map_err(|_| anyhow::anyhow!("the third session hung instead of timing out"))?;
    let waited = started.elapsed();
    let err = match third {
        Ok(_) => panic!("a third session got through a pool of 2 held sessions"),
        Err(err) => err,
    };
    let code = err.code().map(|c| c.code().to_string());
    println!("pool timeout error after {waited:?}: {err:?}");
    assert!(
        matches!(code.as_deref(), Some(c) if c.starts_with("53") || c == "57P03"),
        "pool timeout must be a clear SQLSTATE (class 53 or 57P03), got {err:?}"
    );
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(15),
        "pool timeout of 1 s answered after {waited:?}"
    );
    // the held sessions were not harmed
    whoami(&s1).await?;

    // a waiter gets the connection a released session gives back
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let c = connect(port, "s4").await?;
        let who = whoami(&c).await?;
        Ok::<_, tokio_postgres::Error>((who, t.elapsed()))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s1);
    let (who, waited) = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await??
        .map_err(|e| anyhow::anyhow!("the waiting session failed after a release: {e:?}"))?;
    assert_eq!(who.0, "app_a");
    println!("waiter got through after {waited:?}");
    drop(s2);
    drop(proxy);

    // --max-clients 2: the third client is refused with a clear error
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--max-clients", "2"])
        .start()?;
    let port = proxy.port();
    let c1 = connect(port, "c1").await?;
    let c2 = connect(port, "c2").await?;
    whoami(&c1).await?;
    whoami(&c2).await?;
    let third = tokio::time::timeout(Duration::from_secs(30), async {
        let c = connect(port, "c3").await?;
        whoami(&c).await?;
        Ok::<_, tokio_postgres::Error>(c)
    })
    .await
    .map_err(|_| anyhow::anyhow!("a client over --max-clients hung"))?;
    let err = third.expect_err("a third client got through --max-clients 2");
    assert!(
        matches!(err.code().map(|c| c.code()), Some(c) if c.starts_with("53")),
        "over --max-clients must be SQLSTATE class 53, got {err:?}"
    );
    whoami(&c1).await?;
    drop(c2);
    // the slot is free again
    let c3 = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(c) = connect(port, "c3").await
                && whoami(&c).await.is_ok()
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("a client slot was not freed by a disconnect"))?;
    assert_eq!(whoami(&c3).await?.0, "app_a");
    Ok(())
}

/// db-controller's one-file-per-key layout as `--dbc DIR`, including a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dbc_directory_layout() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = dbtests::SecretDir::new()?;
    let parts = |user: &str| {
        vec![
            ("hostname", db.cluster.host().to_string()),
            ("port", db.cluster.port().to_string()),
            ("database", APP_DB.to_string()),
            ("username", user.to_string()),
            ("password", db.password(user)),
            ("sslmode", "disable".to_string()),
        ]
    };
    let write = |user: &str| {
        let p = parts(user);
        let files: Vec<(&str, &[u8])> = p.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        secret.write(&files)
    };
    write("app_a")?;
    let proxy = ProxyBuilder::new(secret.path()).start()?;
    let client = proxy.connect().await?;
    assert_eq!(whoami(&client).await?.0, "app_a");
    write("app_b")?;
    let since = Instant::now();
    let latency = wait_for_session_user(proxy.port(), "app_b", since, PICKUP_DEADLINE).await?;
    println!("directory layout: app_a -> app_b observed after {latency:?}");
    // A user change moves open sessions too (--migrate changed, the default).
    assert_eq!(
        session_user_soon(&client, "app_b").await?,
        "app_b",
        "the open session moves to the new user"
    );
    Ok(())
}

/// The key=value `dsn.txt` form, given through `DBPROXY_CREDENTIAL`, including a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dbc_key_value_dsn_via_env() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = dbtests::SecretDir::new()?;
    secret.write(&[("dsn.txt", db.kv("app_a").as_bytes())])?;
    let proxy = ProxyBuilder::new(&secret.file("dsn.txt"))
        .dbc_via_env()
        .start()?;
    let client = proxy.connect().await?;
    assert_eq!(whoami(&client).await?.0, "app_a");
    db.rotate_password("app_b").await?;
    secret.write(&[("dsn.txt", db.kv("app_b").as_bytes())])?;
    let since = Instant::now();
    let latency = wait_for_session_user(proxy.port(), "app_b", since, PICKUP_DEADLINE).await?;
    println!("key=value DSN: app_a -> app_b observed after {latency:?}");
    Ok(())
}

/// The proxy answers whatever the server asks: md5 (role stored as md5) and cleartext
/// `password` auth, including a rotation on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_auth_md5_and_cleartext() -> anyhow::Result<()> {
    use dbtests::{AuthMethod, PasswordKind, PgOptions};
    for (auth, kind) in [
        (AuthMethod::Md5, PasswordKind::Md5),
        (AuthMethod::Password, PasswordKind::Scram),
    ] {
        let options = PgOptions {
            auth,
            ..PgOptions::default()
        };
        let db = AppCluster::start_with("one", options, kind).await?;
        let secret = uri_secret(&db.uri("app_a"))?;
        let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;
        let c = proxy.connect().await?;
        assert_eq!(whoami(&c).await?.0, "app_a", "{auth:?}");
        db.rotate_password("app_b").await?;
        let since = write_uri(&secret, &db.uri("app_b"))?;
        let latency = wait_for_session_user(proxy.port(), "app_b", since, PICKUP_DEADLINE).await?;
        println!("{auth:?}: app_a -> app_b observed after {latency:?}");
        assert_eq!(
            session_user_soon(&c, "app_b").await?,
            "app_b",
            "{auth:?}: the open session moves to the new user"
        );
    }
    Ok(())
}

/// The session user an open client sees, polled until it is `want` (or PICKUP_DEADLINE).
async fn session_user_soon(client: &tokio_postgres::Client, want: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let user = whoami(client).await?.0;
        if user == want || start.elapsed() > PICKUP_DEADLINE {
            return Ok(user);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Megabytes each way through one session: a COPY upload as fast as the client can send, then
/// a result far larger than the socket buffers read by a client that reads slowly. The proxy
/// holds what a socket does not take and reads no more from that side until it is delivered;
/// every byte arrives in order, and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_transfers_with_backpressure_both_ways() -> anyhow::Result<()> {
    const ROWS: i64 = 2_000;
    const WIDTH: usize = 32 * 300;
    let db = AppCluster::start("big").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;

    // Client to server: ~19 MB of COPY data.
    let client = proxy.connect().await?;
    client
        .batch_execute("CREATE TABLE big_in (n int8, line text)")
        .await?;
    let sink = client.copy_in("COPY big_in (n, line) FROM STDIN").await?;
    pin_mut!(sink);
    for n in 0..ROWS {
        let fill = char::from(b'a' + (n % 26) as u8);
        let line = format!("{n}\t{}\n", fill.to_string().repeat(WIDTH));
        sink.send(Bytes::from(line)).await?;
    }
    let copied = sink.finish().await?;
    assert_eq!(copied, ROWS as u64);
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT n), sum(length(line))::int8,
                    bool_and(line = repeat(chr(97 + (n % 26)::int), length(line)))
               FROM big_in",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, i64>(0), ROWS);
    assert_eq!(row.get::<_, i64>(1), ROWS);
    assert_eq!(row.get::<_, i64>(2), ROWS * WIDTH as i64);
    assert!(row.get::<_, bool>(3), "a COPY line arrived altered");

    // Server to client: ~19 MB read 16 kB at a time with pauses, on a raw socket so nothing
    // buffers ahead of the reader.
    let mut slow = raw_connect(proxy.port()).await;
    slow.write_all(&startup_packet(
        PROTOCOL_3_0,
        &[("user", "x"), ("database", "x")],
    ))
    .await?;
    loop {
        let (tag, body) = read_message(&mut slow).await.expect("login");
        assert_ne!(
            tag,
            b'E',
            "login failed: {}",
            String::from_utf8_lossy(&body)
        );
        if tag == b'Z' {
            break;
        }
    }
    let sql = format!(
        "SELECT i, repeat(md5(i::text), {}) FROM generate_series(1, {ROWS}) i\0",
        WIDTH / 32
    );
    let mut q = vec![b'Q'];
    q.extend(((sql.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    slow.write_all(&q).await?;

    let other = proxy.connect().await?;
    let reader = async {
        let mut next = 1i64;
        let mut buffered = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut reads = 0u32;
        loop {
            // Parse what is complete, then read a little more.
            while buffered.len() >= 5 {
                let len = u32::from_be_bytes(buffered[1..5].try_into().unwrap()) as usize;
                if buffered.len() < 1 + len {
                    break;
                }
                let msg: Vec<u8> = buffered.drain(..1 + len).collect();
                match msg[0] {
                    b'D' => {
                        let (i, text) = data_row_pair(&msg[5..]);
                        assert_eq!(i, next.to_string(), "rows out of order");
                        assert_eq!(text.len(), WIDTH);
                        assert!(
                            text.chunks(32).all(|c| c == &text[..32]),
                            "row {i} arrived altered"
                        );
                        next += 1;
                    }
                    b'Z' => return next - 1,
                    b'E' => panic!("query failed: {}", String::from_utf8_lossy(&msg)),
                    _ => {}
                }
            }
            let n = slow.read(&mut chunk).await.expect("read");
            assert!(n > 0, "proxy closed the connection mid-result");
            buffered.extend_from_slice(&chunk[..n]);
            reads += 1;
            if reads.is_multiple_of(4) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    // While the slow reader holds its session back, another session is served.
    let meanwhile = async {
        for k in 0..50i32 {
            let row = other.query_one("SELECT $1::int4 * 2", &[&k]).await?;
            assert_eq!(row.get::<_, i32>(0), k * 2);
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    let (rows, served) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(reader, meanwhile)
    })
    .await
    .expect("large transfers through the proxy timed out");
    served?;
    assert_eq!(rows, ROWS);

    // The slow session is still in step afterwards.
    let sql = b"SELECT 42\0";
    let mut q = vec![b'Q'];
    q.extend(((sql.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(sql);
    slow.write_all(&q).await?;
    let mut saw = None;
    loop {
        let (tag, body) = read_message(&mut slow)
            .await
            .expect("after the large result");
        match tag {
            b'D' => saw = Some(body),
            b'Z' => break,
            b'E' => panic!("{}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    assert!(saw.expect("no row").ends_with(b"42"));
    Ok(())
}

/// The two text columns of a DataRow.
fn data_row_pair(body: &[u8]) -> (String, Vec<u8>) {
    let mut at = 2;
    let mut cols = Vec::new();
    for _ in 0..2 {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        cols.push(body[at..at + len].to_vec());
        at += len;
    }
    let text = cols.pop().unwrap();
    (String::from_utf8(cols.pop().unwrap()).unwrap(), text)
}

/// A LATIN1 client (startup `client_encoding`) served by a role whose name is not ASCII: the
/// server reports `session_authorization` at login in LATIN1, which is not UTF-8. dbproxy
/// logs in and serves the client in both pool modes (it refused the login before: "string is
/// not valid UTF-8").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin1_client_of_a_non_ascii_role() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let role = "r\u{f4}le";
    let password = rotated_password();
    db.cluster
        .create_role(role, &password, dbtests::PasswordKind::Scram)
        .await?;
    db.cluster.execute("GRANT app TO \"r\u{f4}le\"").await?;
    let secret = uri_secret(&db.cluster.uri(role, &password, APP_DB))?;
    for mode in ["session", "transaction"] {
        let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
            .args(["--pool-mode", mode])
            .redact(&password)
            .start()?;
        let port = proxy.port().to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(psql_bin())
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "x", "-d", "x"])
                .args([
                    "-c",
                    "SELECT (current_user = U&'r\\00F4le')::text, current_setting('client_encoding')",
                    "-c",
                    "SELECT count(*) FROM items",
                ])
                .env_remove("PGPASSWORD")
                .env_remove("PGPASSFILE")
                .env_remove("PGSERVICE")
                .env("PGCLIENTENCODING", "LATIN1")
                .env("PGCONNECT_TIMEOUT", "30")
                .output()
        })
        .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.lines().collect::<Vec<_>>() == ["true|LATIN1", "0"],
            "{mode} mode: psql {:?}, stdout {stdout:?}, stderr {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            proxy.log_redacted()
        );
    }
    Ok(())
}

/// A small deterministic generator for the random protocol test (seeded, so a failing run can
/// be replayed with `DBPROXY_FUZZ_SEED`).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }

    fn bytes(&mut self, max: u32) -> Vec<u8> {
        (0..self.below(max + 1))
            .map(|_| self.next() as u8)
            .collect()
    }
}

/// A frontend message with a correct length and a body that is well formed, truncated,
/// inconsistent (counts that do not match, negative lengths) or random.
fn random_message(r: &mut Lcg) -> Vec<u8> {
    const SQL: &[&str] = &[
        "SELECT 1",
        "SELECT $1::int4",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SET app.fuzz = 'x'",
        "SELEC",
        "",
        "PREPARE p AS SELECT 1",
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "LISTEN fuzz",
        "SELECT 1; SELECT 2",
        "COPY (SELECT 1) TO STDOUT",
        "CREATE TEMP TABLE fuzz (x int)",
        "SELECT pg_advisory_lock(1)",
    ];
    const NAMES: &[&str] = &["", "s1", "s2", "a_rather_long_statement_name"];
    let cstr = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    let mut body = Vec::new();
    let tag = match r.below(14) {
        0 => {
            cstr(&mut body, SQL[r.below(SQL.len() as u32) as usize]);
            b'Q'
        }
        1 => {
            cstr(&mut body, NAMES[r.below(4) as usize]);
            cstr(&mut body, SQL[r.below(SQL.len() as u32) as usize]);
            let n = [0i16, 1, 2, -1, 300][r.below(5) as usize];
            body.extend_from_slice(&n.to_be_bytes());
            for _ in 0..r.below(3) {
                body.extend_from_slice(&23u32.to_be_bytes());
            }
            b'P'
        }
        2 => {
            cstr(&mut body, NAMES[r.below(4) as usize]);
            cstr(&mut body, NAMES[r.below(4) as usize]);
            for _ in 0..3 {
                let n = [0i16, 1, 2, -5, 1000][r.below(5) as usize];
                body.extend_from_slice(&n.to_be_bytes());
                for _ in 0..r.below(3) {
                    let len = [-1i32, 0, 1, 4, 1 << 30][r.below(5) as usize];
                    body.extend_from_slice(&len.to_be_bytes());
                    if (0..=8).contains(&len) {
                        body.extend(std::iter::repeat_n(b'7', len as usize));
                    }
                }
            }
            b'B'
        }
        3 => {
            body.push([b'S', b'P', b'X'][r.below(3) as usize]);
            cstr(&mut body, NAMES[r.below(4) as usize]);
            b'D'
        }
        4 => {
            cstr(&mut body, NAMES[r.below(4) as usize]);
            let rows = [0i32, 1, -1, i32::MAX][r.below(4) as usize];
            body.extend_from_slice(&rows.to_be_bytes());
            b'E'
        }
        5 => {
            body.push([b'S', b'P', b'Z'][r.below(3) as usize]);
            cstr(&mut body, NAMES[r.below(4) as usize]);
            b'C'
        }
        6 => b'S',
        7 => b'H',
        8 => {
            body = r.bytes(24);
            [b'd', b'c', b'f'][r.below(3) as usize]
        }
        9 => {
            body = r.bytes(24);
            b'F'
        }
        10 => {
            // A message cut short: a valid tag whose body lacks its terminator.
            body = b"SELECT 1".to_vec();
            [b'Q', b'P', b'B', b'D', b'E', b'C'][r.below(6) as usize]
        }
        _ => {
            body = r.bytes(40);
            // Any byte as a tag but Terminate (which would just end the session).
            match r.next() as u8 {
                b'X' => b'?',
                t => t,
            }
        }
    };
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Random message sequences (well framed, but with any tag and malformed, truncated or
/// inconsistent bodies) from 120 clients in each pool mode. Each client then sends Sync,
/// ROLLBACK and a marker query: it must get the marker's answer or a clean end of its
/// connection, never a hang. Healthy clients keep working throughout, the proxy never panics, and afterwards both
/// server connections of the pool are free (nothing the garbage did was left holding one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_protocol_garbage_loses_nothing() -> anyhow::Result<()> {
    use anyhow::Context;
    // Seeds 2 and 33 found a stray CopyData that desynchronized transaction mode (see
    // e2e_txn stray_copy_messages_never_hand_replies_to_another_client).
    let seeds: Vec<u64> = match std::env::var("DBPROXY_FUZZ_SEED") {
        Ok(s) => vec![s.parse().context("DBPROXY_FUZZ_SEED must be a number")?],
        Err(_) => vec![2, 33, 20_261_207],
    };
    let db = AppCluster::start("fuzz").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    for (seed, mode) in seeds
        .iter()
        .flat_map(|&seed| ["session", "transaction"].map(|mode| (seed, mode)))
    {
        println!("seed {seed} (DBPROXY_FUZZ_SEED replays it), {mode} mode");
        let mut proxy = ProxyBuilder::new(&secret.file(URI_KEY))
            .args([
                "--pool-mode",
                mode,
                "--pool-size",
                "2",
                "--pool-timeout",
                "20",
            ])
            .redact(&db.password("app_a"))
            .start()?;
        let healthy = proxy.connect().await?;
        let mut r = Lcg(seed ^ u64::from(mode.len() as u32));
        let (mut answered, mut closed) = (0, 0);
        for i in 0..120 {
            let case = format!("seed {seed}, {mode} client {i}");
            let mut raw = RawSession::connect(proxy.port(), "fuzz")
                .await
                .with_context(|| format!("{case}: login"))?;
            let messages: Vec<Vec<u8>> = (0..1 + r.below(8))
                .map(|_| random_message(&mut r))
                .collect();
            raw.send(&messages).await?;
            // ROLLBACK first: an error inside a transaction the garbage opened would fail the
            // marker (25P02) as it would directly against PostgreSQL.
            raw.send(&[
                msg::sync(),
                msg::query("ROLLBACK"),
                msg::query("SELECT 4242"),
            ])
            .await?;
            let mut replies = Vec::new();
            let outcome = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match raw.read().await {
                        Ok(Reply::DataRow(cols)) if cols == [Some("4242".to_string())] => {
                            return true;
                        }
                        Ok(reply) => replies.push(reply),
                        Err(_) => return false,
                    }
                }
            })
            .await;
            if outcome.is_err() {
                println!("{case} got {replies:?}");
            }
            if outcome.is_err() {
                // What each backend was doing, for the failure's story.
                if let Ok(admin) = db.admin().await
                    && let Ok(rows) = admin
                        .query(
                            "SELECT pid, state, wait_event_type, wait_event, left(query, 60) \
                             FROM pg_stat_activity WHERE usename = 'app_a'",
                            &[],
                        )
                        .await
                {
                    for row in rows {
                        let (pid, state, wt, we, q): (
                            i32,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                        ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
                        println!("backend {pid}: {state:?} {wt:?} {we:?} {q:?}");
                    }
                }
            }
            let outcome = outcome.with_context(|| {
                format!(
                    "{case} hung after {:?} ({}); proxy log:\n{}",
                    messages.iter().map(|m| m[0] as char).collect::<String>(),
                    messages
                        .iter()
                        .map(|m| format!("{:?}", String::from_utf8_lossy(m)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    proxy.log_redacted()
                )
            })?;
            if std::env::var_os("DBPROXY_FUZZ_VERBOSE").is_some() {
                println!(
                    "{case}: {} -> {}",
                    messages
                        .iter()
                        .map(|m| format!("{:?}", String::from_utf8_lossy(m)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    if outcome { "answered" } else { "closed" }
                );
            }
            if outcome {
                answered += 1;
            } else {
                closed += 1;
            }
            drop(raw);
            if std::env::var_os("DBPROXY_FUZZ_VERBOSE").is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let admin = db.admin().await?;
                for row in admin
                    .query(
                        "SELECT pid, state FROM pg_stat_activity WHERE usename = 'app_a' \
                         AND state <> 'idle'",
                        &[],
                    )
                    .await?
                {
                    let (pid, state): (i32, Option<String>) = (row.get(0), row.get(1));
                    println!("  after {case}: backend {pid} {state:?}");
                }
            }
            if i % 10 == 9 {
                let (user, _, _) = tokio::time::timeout(CLIENT_OP_TIMEOUT, whoami(&healthy))
                    .await
                    .with_context(|| format!("{case}: the healthy client hung"))??;
                anyhow::ensure!(user == "app_a", "{case}: healthy client is {user}");
            }
        }
        println!("{mode}: {answered} sessions answered the marker, {closed} were closed");
        anyhow::ensure!(proxy.try_exit_status().is_none(), "the proxy exited");
        let log = proxy.log_redacted();
        anyhow::ensure!(!log.contains("panicked"), "a task panicked:\n{log}");
        // Both server connections free: two clients hold a transaction each at once (the
        // healthy client leaves first: in session mode it holds one).
        drop(healthy);
        let (a, b) = (proxy.connect().await?, proxy.connect().await?);
        let held = tokio::time::timeout(Duration::from_secs(30), async {
            a.batch_execute("BEGIN").await?;
            b.batch_execute("BEGIN").await?;
            let pa: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
            let pb: i32 = b.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
            a.batch_execute("COMMIT").await?;
            b.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>((pa, pb))
        })
        .await
        .with_context(|| {
            format!("{mode}: a server connection is still held after the garbage")
        })??;
        anyhow::ensure!(held.0 != held.1, "{mode}: {held:?}");
    }
    Ok(())
}
