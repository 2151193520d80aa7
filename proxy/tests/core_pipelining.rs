//! Core behaviours of the forwarding loop that need a real server: a client that pipelines a
//! query (and Terminate) right behind its startup packet gets every answer, and the server
//! connection is reused afterwards.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Reads until the proxy closes the connection; returns (tag, body) of every message.
async fn read_all(stream: &mut TcpStream) -> anyhow::Result<Vec<(u8, Vec<u8>)>> {
    let mut data = Vec::new();
    tokio::time::timeout(CLIENT_OP_TIMEOUT, stream.read_to_end(&mut data)).await??;
    let mut out = Vec::new();
    let mut i = 0;
    while i + 5 <= data.len() {
        let len = i32::from_be_bytes([data[i + 1], data[i + 2], data[i + 3], data[i + 4]]) as usize;
        anyhow::ensure!(
            len >= 4 && i + 1 + len <= data.len(),
            "truncated message stream"
        );
        out.push((data[i], data[i + 5..i + 1 + len].to_vec()));
        i += 1 + len;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_terminate_pipelined_behind_startup_are_answered() -> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY)).start()?;

    for round in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port())).await?;
        let mut bytes = startup(&[
            ("user", "x"),
            ("database", "y"),
            ("application_name", "pipe"),
        ]);
        bytes.extend(message(
            b'Q',
            b"SELECT current_user || '/' || current_setting('application_name')\0",
        ));
        bytes.extend(message(b'X', b""));
        stream.write_all(&bytes).await?;
        let messages = read_all(&mut stream).await?;
        let tags: String = messages.iter().map(|(t, _)| *t as char).collect();
        assert!(tags.starts_with('R'), "round {round}: login first: {tags}");
        let row = messages
            .iter()
            .find(|(t, _)| *t == b'D')
            .ok_or_else(|| anyhow::anyhow!("round {round}: no DataRow in {tags}"))?;
        // DataRow: column count (2), length (4), value.
        let value = String::from_utf8_lossy(&row.1[6..]).into_owned();
        assert_eq!(value, "app_a/pipe", "round {round}");
        assert!(
            tags.ends_with("CZ"),
            "round {round}: the query must complete: {tags}"
        );
    }

    // The server connection went back to the pool each time: one backend for application
    // "pipe" at most (sessions were sequential).
    let admin = db.admin().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_a' AND backend_type = 'client backend'",
            &[],
        )
        .await?;
    let backends: i64 = row.get(0);
    assert!(
        backends <= 1,
        "sequential sessions should reuse one backend, saw {backends}"
    );
    Ok(())
}

/// Transaction mode: a client idle in the transaction lane that sends a query and Terminate
/// in one write gets the whole answer before its connection closes (the round delivers what
/// the server still owes a terminating client, as PostgreSQL would), and the server
/// connection serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_terminate_from_an_idle_transaction_mode_client_are_answered()
-> anyhow::Result<()> {
    let db = AppCluster::start("one").await?;
    let secret = uri_secret(&db.uri("app_a"))?;
    let proxy = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(["--pool-mode", "transaction", "--pool-size", "1"])
        .args(["--worker-threads", "0", "--transaction-lane", "true"])
        .start()?;
    for round in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port())).await?;
        stream
            .write_all(&startup(&[("user", "x"), ("database", "y")]))
            .await?;
        // Up to the login's ReadyForQuery.
        let mut login = Vec::new();
        while !login.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            let mut b = [0u8; 512];
            let n = tokio::time::timeout(CLIENT_OP_TIMEOUT, stream.read(&mut b)).await??;
            anyhow::ensure!(n > 0, "round {round}: closed during the login");
            login.extend_from_slice(&b[..n]);
        }
        wait_in_tx_lane(&proxy, 1).await?;
        let mut bytes = message(b'Q', b"SELECT pg_sleep(0.2)::text || current_user\0");
        bytes.extend(message(b'X', b""));
        stream.write_all(&bytes).await?;
        let messages = read_all(&mut stream).await?;
        let tags: String = messages.iter().map(|(t, _)| *t as char).collect();
        let row = messages
            .iter()
            .find(|(t, _)| *t == b'D')
            .ok_or_else(|| anyhow::anyhow!("round {round}: no DataRow in {tags}"))?;
        let value = String::from_utf8_lossy(&row.1[6..]).into_owned();
        assert_eq!(value, "app_a", "round {round}");
        assert!(
            tags.ends_with("CZ"),
            "round {round}: the query must complete: {tags}"
        );
    }
    Ok(())
}
