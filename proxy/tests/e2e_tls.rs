//! TLS end to end: the proxy against a real PostgreSQL with `ssl=on` and certificates from the
//! test PKI (every `sslmode`, each verification failure, channel binding), and clients talking
//! TLS to the proxy (psql, certificate rotation, `--client-tls require`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use common::*;
use dbcred::Dsn;
use dbcred::tls::{Attempt, DsnTls, PgStream, ServerTlsPolicy, negotiate, tls_server_end_point};
use dbtests::tls::{ServerCert, TestPki};
use dbtests::{PasswordKind, SecretDir};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::Client;

/// pg_hba.conf for the TLS clusters: TLS and plaintext both allowed (the harness itself logs in
/// without TLS), so the proxy's DSN alone decides.
const HBA: [&str; 3] = [
    "local all all scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all all ::1/128 scram-sha-256",
];

/// A PostgreSQL presenting `which`, with the PKI that made its certificate.
struct TlsCluster {
    app: AppCluster,
    pki: TestPki,
}

async fn tls_cluster(name: &str, which: ServerCert) -> anyhow::Result<TlsCluster> {
    let pki = TestPki::generate()?;
    let options = pki.pg_options(which, &HBA)?;
    let app = AppCluster::start_with(name, options, PasswordKind::Scram).await?;
    Ok(TlsCluster { app, pki })
}

/// `app_a`'s key=value DSN with `sslmode` and other TLS keywords replaced by `tls`.
fn dsn_with(app: &AppCluster, tls: &str) -> String {
    let plain = app.kv("app_a");
    let base = plain.trim_end_matches("sslmode=disable").trim_end();
    format!("{base} {tls}")
}

/// A proxy reading `dsn` from a kubelet-style Secret; the password is redacted from output.
fn proxy_for(
    app: &AppCluster,
    dsn: &str,
    extra: &[&str],
) -> anyhow::Result<(SecretDir, ProxyBuilder)> {
    let secret = SecretDir::new()?;
    secret.write(&[(URI_KEY, dsn.as_bytes())])?;
    let builder = ProxyBuilder::new(&secret.file(URI_KEY))
        .args(extra.iter().copied())
        .redact(&app.password("app_a"));
    Ok((secret, builder))
}

/// Whether the server connection behind `client`'s session is encrypted (pg_stat_ssl).
async fn server_link_tls(client: &Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Polls /readyz until its body contains `needle`; returns (status, body).
fn wait_readyz_text(proxy: &ProxyProcess, needle: &str) -> anyhow::Result<(u16, String)> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let mut last = (0, String::new());
    while std::time::Instant::now() < deadline {
        if let Ok((code, body)) = proxy.http_get("/readyz") {
            if body.contains(needle) {
                return Ok((code, body));
            }
            last = (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "/readyz never mentioned {needle:?}; last: HTTP {} {}\n--- log ---\n{}",
        last.0,
        last.1,
        proxy.log_redacted()
    )
}

/// Asserts that no 10-character window of `secret` appears in `text`.
fn assert_no_secret(text: &str, secret: &str, what: &str) {
    let chars: Vec<char> = secret.chars().collect();
    for window in chars.windows(chars.len().min(10)) {
        let needle: String = window.iter().collect();
        assert!(!text.contains(&needle), "{what} contains part of a secret");
    }
}

/// Every sslmode against a TLS server: the proxy becomes ready, serves, and its server link is
/// encrypted exactly when libpq's rules say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_tls_server() -> anyhow::Result<()> {
    let c = tls_cluster("tls-modes", ServerCert::Valid).await?;
    let ca = c.pki.ca_cert.display().to_string();
    let cases = [
        ("sslmode=disable".to_string(), false),
        ("sslmode=allow".to_string(), false),
        ("sslmode=prefer".to_string(), true),
        ("sslmode=require".to_string(), true),
        (format!("sslmode=verify-ca sslrootcert={ca}"), true),
        (format!("sslmode=verify-full sslrootcert={ca}"), true),
        (
            format!("sslmode=verify-full sslrootcert={ca} channel_binding=require"),
            true,
        ),
        ("sslmode=require channel_binding=disable".to_string(), true),
    ];
    for (tls, encrypted) in cases {
        let dsn = dsn_with(&c.app, &tls);
        let (_secret, builder) = proxy_for(&c.app, &dsn, &[])?;
        let proxy = builder.start()?;
        let client = proxy.connect().await?;
        let (user, _, pid) = whoami(&client).await?;
        assert_eq!(user, "app_a", "{tls}");
        assert_eq!(server_link_tls(&client).await?, encrypted, "{tls}");
        // The server connection is reset and reused (over TLS too), and cancels reach it.
        drop(client);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let client = proxy.connect().await?;
        assert_eq!(
            whoami(&client).await?.2,
            pid,
            "{tls}: the server connection was not reused"
        );
        let token = client.cancel_token();
        let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await?;
        let cancelled = tokio::time::timeout(Duration::from_secs(20), sleeper).await??;
        let err = cancelled.expect_err("pg_sleep(30) was not cancelled");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{tls}: {err:?}"
        );
        assert_no_secret(&proxy.log(), &c.app.password("app_a"), "the proxy log");
    }
    Ok(())
}

/// sslmode=require against a server without TLS: never ready, and /readyz says why; prefer
/// falls back to plaintext; channel_binding=require without TLS is a rejected DSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_against_a_plaintext_server_is_refused() -> anyhow::Result<()> {
    let app = AppCluster::start("tls-none").await?;
    let password = app.password("app_a");

    let (_s, builder) = proxy_for(&app, &dsn_with(&app, "sslmode=require"), &[])?;
    let proxy = builder.spawn()?;
    let (code, body) = wait_readyz_text(&proxy, "does not support TLS")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("sslmode=require"), "{body}");
    assert_no_secret(&proxy.log(), &password, "the proxy log");
    assert_no_secret(&body, &password, "/readyz");
    drop(proxy);

    let (_s, builder) = proxy_for(&app, &dsn_with(&app, "sslmode=prefer"), &[])?;
    let proxy = builder.start()?;
    let client = proxy.connect().await?;
    assert!(
        !server_link_tls(&client).await?,
        "prefer must fall back to plaintext"
    );
    drop(proxy);

    let (_s, builder) = proxy_for(
        &app,
        &dsn_with(&app, "sslmode=prefer channel_binding=require"),
        &[],
    )?;
    let proxy = builder.spawn()?;
    let (code, body) = wait_readyz_text(&proxy, "channel_binding=require")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not encrypted"), "{body}");
    drop(proxy);

    let (_s, builder) = proxy_for(
        &app,
        &dsn_with(&app, "sslmode=disable channel_binding=require"),
        &[],
    )?;
    let proxy = builder.spawn()?;
    let (code, body) = wait_readyz_text(&proxy, "channel_binding=require")?;
    assert_eq!(code, 503, "{body}");
    Ok(())
}

/// A certificate signed by another CA: verify-ca fails with "not signed by a trusted CA";
/// require without sslrootcert does not verify (libpq) and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_is_refused_under_verify_ca() -> anyhow::Result<()> {
    let c = tls_cluster("tls-other-ca", ServerCert::OtherCa).await?;
    let ca = c.pki.ca_cert.display().to_string();
    let (_s, builder) = proxy_for(
        &c.app,
        &dsn_with(&c.app, &format!("sslmode=verify-ca sslrootcert={ca}")),
        &[],
    )?;
    let proxy = builder.spawn()?;
    let (code, body) = wait_readyz_text(&proxy, "not signed by a trusted CA")?;
    assert_eq!(code, 503, "{body}");
    assert!(
        proxy.log().contains("not signed by a trusted CA"),
        "the log must say why"
    );
    drop(proxy);

    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=require"), &[])?;
    let proxy = builder.start()?;
    assert!(server_link_tls(&proxy.connect().await?).await?);
    Ok(())
}

/// A certificate for another host name: verify-full fails naming the certificate's names,
/// verify-ca accepts it. A rotation to the failing DSN keeps the last good generation serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_name_fails_verify_full_only() -> anyhow::Result<()> {
    let c = tls_cluster("tls-wrong-host", ServerCert::WrongHost).await?;
    let ca = c.pki.ca_cert.display().to_string();
    let good = dsn_with(&c.app, &format!("sslmode=verify-ca sslrootcert={ca}"));
    let (secret, builder) = proxy_for(&c.app, &good, &[])?;
    let proxy = builder.start()?;
    let held = proxy.connect().await?;
    assert!(server_link_tls(&held).await?);

    // Rotate to verify-full: the new DSN is rejected, the old generation keeps serving.
    let bad = dsn_with(&c.app, &format!("sslmode=verify-full sslrootcert={ca}"));
    secret.write(&[(URI_KEY, bad.as_bytes())])?;
    let (code, body) = wait_readyz_text(&proxy, "is not valid for the name")?;
    assert_eq!(
        code, 200,
        "the last good generation must stay in use: {body}"
    );
    assert!(body.contains(dbtests::tls::WRONG_HOST), "{body}");
    assert_eq!(whoami(&held).await?.0, "app_a");
    let fresh = proxy.connect().await?;
    assert!(server_link_tls(&fresh).await?);
    assert_no_secret(&proxy.log(), &c.app.password("app_a"), "the proxy log");
    drop(proxy);

    // verify-full from the start: never ready.
    let (_s, builder) = proxy_for(&c.app, &bad, &[])?;
    let proxy = builder.spawn()?;
    let (code, _) = wait_readyz_text(&proxy, "is not valid for the name")?;
    assert_eq!(code, 503);
    Ok(())
}

/// An expired server certificate fails verification with "expired"; require (no CA) accepts it
/// like libpq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused_when_verifying() -> anyhow::Result<()> {
    let c = tls_cluster("tls-expired", ServerCert::Expired).await?;
    let ca = c.pki.ca_cert.display().to_string();
    let (_s, builder) = proxy_for(
        &c.app,
        &dsn_with(&c.app, &format!("sslmode=verify-ca sslrootcert={ca}")),
        &[],
    )?;
    let proxy = builder.spawn()?;
    let (code, body) = wait_readyz_text(&proxy, "has expired")?;
    assert_eq!(code, 503, "{body}");
    drop(proxy);

    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=require"), &[])?;
    let proxy = builder.start()?;
    assert!(server_link_tls(&proxy.connect().await?).await?);
    Ok(())
}

/// channel_binding=require against a server that only allows md5 over TLS: the login has no
/// SCRAM-SHA-256-PLUS, so the DSN is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_required_but_server_asks_md5() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let options = pki.pg_options(
        ServerCert::Valid,
        &[
            "local all all scram-sha-256",
            "hostssl all app_a 127.0.0.1/32 md5",
            "host all all 127.0.0.1/32 scram-sha-256",
        ],
    )?;
    let app = AppCluster::start_with("tls-md5", options, PasswordKind::Md5).await?;
    let (_s, builder) = proxy_for(
        &app,
        &dsn_with(&app, "sslmode=require channel_binding=require"),
        &[],
    )?;
    let proxy = builder.spawn()?;
    let (code, body) = wait_readyz_text(&proxy, "channel_binding=require")?;
    assert_eq!(code, 503, "{body}");
    drop(proxy);
    // Without the requirement the same server works (md5 over TLS).
    let (_s, builder) = proxy_for(&app, &dsn_with(&app, "sslmode=require"), &[])?;
    let proxy = builder.start()?;
    assert!(server_link_tls(&proxy.connect().await?).await?);
    Ok(())
}

/// Runs psql through the proxy with `env`, returning stdout (fails with stderr otherwise).
fn psql(port: u16, host: &str, env: &[(&str, &str)], command: &str) -> anyhow::Result<String> {
    let out = Command::new(psql_bin())
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            "anyone",
            "-d",
            "anything",
            "-c",
            command,
        ])
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "30")
        .envs(env.iter().copied())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// psql with PGSSLMODE=require gets TLS from the default (self-signed) listener, and
/// verify-full works against the proxy's file certificate with the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_tls_to_the_proxy() -> anyhow::Result<()> {
    let c = tls_cluster("tls-psql", ServerCert::Valid).await?;
    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=require"), &[])?;
    let proxy = builder.start()?;
    let info = psql(
        proxy.port(),
        "127.0.0.1",
        &[("PGSSLMODE", "require")],
        "\\conninfo",
    )?;
    assert!(info.contains("SSL connection"), "{info}");
    let user = psql(
        proxy.port(),
        "127.0.0.1",
        &[("PGSSLMODE", "require")],
        "SELECT session_user",
    )?;
    assert_eq!(user.trim(), "app_a");
    drop(proxy);

    let certs = SecretDir::new()?;
    let (cert, key) = c.pki.server_pem(&["localhost", "127.0.0.1"])?;
    certs.write(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())])?;
    let (_s, builder) = proxy_for(
        &c.app,
        &dsn_with(&c.app, "sslmode=require"),
        &[
            "--client-tls-cert",
            &certs.file("tls.crt").display().to_string(),
            "--client-tls-key",
            &certs.file("tls.key").display().to_string(),
        ],
    )?;
    let proxy = builder.start()?;
    let ca = c.pki.ca_cert.display().to_string();
    let env = [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca.as_str())];
    let info = psql(proxy.port(), "localhost", &env, "\\conninfo")?;
    assert!(info.contains("SSL connection"), "{info}");
    assert_no_secret(&proxy.log(), &key, "the proxy log");
    Ok(())
}

/// A certificate for the proxy's client side (`localhost`, `127.0.0.1`) signed by the test CA,
/// in a Secret-like directory as `tls.crt` and `tls.key`; also the certificate and key PEM.
fn client_side_cert(c: &TlsCluster) -> anyhow::Result<(SecretDir, String, String)> {
    let certs = SecretDir::new()?;
    let (cert, key) = c.pki.server_pem(&["localhost", "127.0.0.1"])?;
    certs.write(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())])?;
    Ok((certs, cert, key))
}

/// `--client-tls-cert` and `--client-tls-key` for the files of [`client_side_cert`].
fn client_side_cert_flags(certs: &SecretDir) -> Vec<String> {
    vec![
        "--client-tls-cert".into(),
        certs.file("tls.crt").display().to_string(),
        "--client-tls-key".into(),
        certs.file("tls.key").display().to_string(),
    ]
}

/// A TLS session through the proxy with the DSN-driven connector (verify-full against `ca`).
async fn tls_client(port: u16, ca: &Path) -> anyhow::Result<Client> {
    let dsn = Dsn::parse(&format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=anyone dbname=anything sslmode=verify-full sslrootcert={}",
        ca.display()
    ))?;
    let tls = DsnTls::new(ServerTlsPolicy::from_dsn(&dsn)?);
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .hostaddr(std::net::IpAddr::from([127, 0, 0, 1]))
        .port(port)
        .user("anyone")
        .dbname("anything")
        .ssl_mode(tls.tokio_postgres_ssl_mode())
        .connect_timeout(Duration::from_secs(30));
    let (client, connection) = cfg.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The `tls-server-end-point` hash of the certificate the proxy serves to a new client.
async fn served_certificate_hash(port: u16, ca: &Path) -> anyhow::Result<Vec<u8>> {
    let dsn = Dsn::parse(&format!(
        "host=localhost sslmode=verify-full sslrootcert={}",
        ca.display()
    ))?;
    let policy = ServerTlsPolicy::from_dsn(&dsn)?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let stream = negotiate(tcp, "localhost", &policy, Attempt::TlsRequired).await?;
    let PgStream::Tls(_) = &stream else {
        anyhow::bail!("the proxy did not accept TLS")
    };
    stream
        .tls_server_end_point()
        .ok_or_else(|| anyhow::anyhow!("no certificate hash"))
}

fn pem_hash(pem: &str) -> anyhow::Result<Vec<u8>> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())?;
    tls_server_end_point(&der).ok_or_else(|| anyhow::anyhow!("no hash for the certificate"))
}

/// The client-facing certificate is rotated kubelet-style while a TLS client stays connected:
/// that client keeps working, new clients get the new certificate, and a broken new pair keeps
/// the previous one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_rotates_without_dropping_clients() -> anyhow::Result<()> {
    let c = tls_cluster("tls-rotate", ServerCert::Valid).await?;
    let (certs, cert1, key1) = client_side_cert(&c)?;
    let mut flags = client_side_cert_flags(&certs);
    flags.extend(["--poll-interval".to_string(), "1".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=require"), &flags)?;
    let proxy = builder.start()?;
    let ca = c.pki.ca_cert.clone();
    let held = tls_client(proxy.port(), &ca).await?;
    assert_eq!(whoami(&held).await?.0, "app_a");
    assert_eq!(
        served_certificate_hash(proxy.port(), &ca).await?,
        pem_hash(&cert1)?
    );

    let (cert2, key2) = c.pki.server_pem(&["localhost", "127.0.0.1"])?;
    certs.write(&[("tls.crt", cert2.as_bytes()), ("tls.key", key2.as_bytes())])?;
    let want = pem_hash(&cert2)?;
    let deadline = std::time::Instant::now() + PICKUP_DEADLINE;
    loop {
        if served_certificate_hash(proxy.port(), &ca).await? == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served within {PICKUP_DEADLINE:?}\n{}",
            proxy.log_redacted()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The client connected before the rotation still works, and new clients verify.
    assert_eq!(whoami(&held).await?.0, "app_a");
    let fresh = tls_client(proxy.port(), &ca).await?;
    assert_eq!(whoami(&fresh).await?.0, "app_a");

    // A key that does not match the certificate: refused, the second pair stays.
    certs.write(&[("tls.crt", cert1.as_bytes()), ("tls.key", key2.as_bytes())])?;
    let deadline = std::time::Instant::now() + PICKUP_DEADLINE;
    while !proxy.log().contains("refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken pair was not reported\n{}",
            proxy.log_redacted()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served_certificate_hash(proxy.port(), &ca).await?, want);
    assert_eq!(whoami(&held).await?.0, "app_a");
    let log = proxy.log();
    for key in [&key1, &key2] {
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_no_secret(&log, &body, "the proxy log");
    }
    assert_no_secret(&log, &c.app.password("app_a"), "the proxy log");
    Ok(())
}

/// `--client-tls require` refuses plaintext clients with a clear error and serves TLS ones;
/// `--client-tls disable` answers N so TLS-requiring clients fail and others work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_require_and_disable() -> anyhow::Result<()> {
    let app = AppCluster::start("tls-client-modes").await?;
    let (_s, builder) = proxy_for(
        &app,
        &dsn_with(&app, "sslmode=disable"),
        &["--client-tls", "require"],
    )?;
    let proxy = builder.start()?;
    let err = proxy
        .connect()
        .await
        .expect_err("a plaintext client got in");
    let text = format!("{err:?}");
    assert!(text.contains("requires TLS"), "{text}");
    let user = psql(
        proxy.port(),
        "127.0.0.1",
        &[("PGSSLMODE", "require")],
        "SELECT session_user",
    )?;
    assert_eq!(user.trim(), "app_a");
    drop(proxy);

    let (_s, builder) = proxy_for(
        &app,
        &dsn_with(&app, "sslmode=disable"),
        &["--client-tls", "disable"],
    )?;
    let proxy = builder.start()?;
    assert!(
        psql(
            proxy.port(),
            "127.0.0.1",
            &[("PGSSLMODE", "require")],
            "SELECT 1"
        )
        .is_err()
    );
    let user = psql(
        proxy.port(),
        "127.0.0.1",
        &[("PGSSLMODE", "prefer")],
        "SELECT session_user",
    )?;
    assert_eq!(user.trim(), "app_a");
    Ok(())
}

/// A non-loopback listener with a client password works over TLS (SCRAM inside TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_password_over_tls_on_a_non_loopback_listener() -> anyhow::Result<()> {
    let app = AppCluster::start("tls-any").await?;
    let dir = tempfile::tempdir()?;
    let client_password = rotated_password();
    let password_file = dir.path().join("client-password");
    std::fs::write(&password_file, &client_password)?;
    let (_s, builder) = proxy_for(
        &app,
        &dsn_with(&app, "sslmode=disable"),
        &[
            "--client-password-file",
            &password_file.display().to_string(),
        ],
    )?;
    let proxy = builder
        .listen_hosts(&["0.0.0.0"])
        .redact(&client_password)
        .start()?;
    let env = [
        ("PGSSLMODE", "require"),
        ("PGPASSWORD", client_password.as_str()),
    ];
    let info = psql(proxy.port(), "127.0.0.1", &env, "\\conninfo")?;
    assert!(info.contains("SSL connection"), "{info}");
    let user = psql(proxy.port(), "127.0.0.1", &env, "SELECT session_user")?;
    assert_eq!(user.trim(), "app_a");
    assert_no_secret(&proxy.log(), &client_password, "the proxy log");
    Ok(())
}

/// With TLS offered (the default): GSSENCRequest is still answered `N` and the client may then
/// ask for TLS; bytes sent behind an SSLRequest in the same packet get the connection dropped
/// instead of being read as plaintext after the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_requests_follow_the_safe_rules() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = AppCluster::start("tls-requests").await?;
    let (_s, builder) = proxy_for(&app, &dsn_with(&app, "sslmode=disable"), &[])?;
    let proxy = builder.start()?;
    let request = |code: u32| {
        let mut p = 8u32.to_be_bytes().to_vec();
        p.extend(code.to_be_bytes());
        p
    };
    let (ssl, gss) = (request(80_877_103), request(80_877_104));
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port())).await?;
    s.write_all(&gss).await?;
    assert_eq!(
        read_byte(&mut s).await,
        Some(b'N'),
        "GSSENCRequest must get N"
    );
    s.write_all(&ssl).await?;
    assert_eq!(read_byte(&mut s).await, Some(b'S'), "SSLRequest must get S");

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port())).await?;
    let mut smuggled = ssl.clone();
    smuggled.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
    s.write_all(&smuggled).await?;
    let first = read_byte(&mut s).await;
    assert_ne!(
        first,
        Some(b'S'),
        "bytes behind an SSLRequest must not get TLS"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await?;
    Ok(())
}

/// One byte from `s`, or None on end of stream, error or 20 s of silence.
async fn read_byte(s: &mut tokio::net::TcpStream) -> Option<u8> {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await {
        Ok(Ok(1)) => Some(b[0]),
        _ => None,
    }
}

/// `--client-park-after-ms` parks plaintext clients only: a TLS session's socket lives inside
/// its TLS stream, so a TLS client stays in its task, idle or not, and keeps working beside a
/// parked plaintext client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_are_not_parked() -> anyhow::Result<()> {
    let c = tls_cluster("tls-park", ServerCert::Valid).await?;
    let (certs, _, _) = client_side_cert(&c)?;
    let mut flags = client_side_cert_flags(&certs);
    flags.extend(["--pool-mode", "transaction", "--client-park-after-ms", "20"].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=require"), &flags)?;
    let proxy = builder.start()?;
    let tls = tls_client(proxy.port(), &c.pki.ca_cert).await?;
    let plain = proxy.connect().await?;
    plain.simple_query("SELECT 1").await?;
    tls.simple_query("SELECT 1").await?;
    let parked = |text: &str| metric_or_zero(text, "dbproxy_clients_parked", &[]);
    wait_for_metrics(
        &proxy,
        "the plaintext client parked",
        Duration::from_secs(10),
        |t| parked(t) == 1.0,
    )
    .await?;
    // Several park periods later, still only the plaintext client.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&proxy)?;
    assert_eq!(parked(&text), 1.0, "{text}");
    assert_eq!(whoami(&tls).await?.0, "app_a");
    assert_eq!(whoami(&plain).await?.0, "app_a");
    Ok(())
}

/// A session-mode session parks only with plaintext on both sides: over TLS to the server
/// (`sslmode=require`) the server's socket lives inside its TLS stream, so even a plaintext
/// client's session stays in its task, idle or not. (Sessions that do park: e2e_park.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_tls_to_the_server_are_not_parked() -> anyhow::Result<()> {
    let c = tls_cluster("tls-park-session", ServerCert::Valid).await?;
    let flags = ["--client-park-after-ms", "20"];
    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=require"), &flags)?;
    let proxy = builder.start()?;
    let plain = proxy.connect().await?;
    plain.simple_query("SELECT 1").await?;
    // Many park periods later, nothing is parked, and the session works.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = scrape(&proxy)?;
    assert_eq!(
        metric(&text, "dbproxy_clients_parked", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(whoami(&plain).await?.0, "app_a");
    Ok(())
}

/// The transaction lane keeps the server connection its plaintext client released for its
/// next request; a TLS client (served on the runtime) that needs it gets it from there at
/// once, not after `--pool-timeout`, and back and forth with one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_get_the_connection_the_transaction_lane_keeps() -> anyhow::Result<()> {
    let c = tls_cluster("tls-lane", ServerCert::Valid).await?;
    let (certs, _, _) = client_side_cert(&c)?;
    let mut flags = client_side_cert_flags(&certs);
    flags.extend(
        [
            "--pool-mode",
            "transaction",
            "--pool-size",
            "1",
            "--pool-timeout",
            "5",
            "--worker-threads",
            "0",
            "--transaction-lane",
            "true",
        ]
        .map(String::from),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_s, builder) = proxy_for(&c.app, &dsn_with(&c.app, "sslmode=disable"), &flags)?;
    let proxy = builder.start()?;
    let tls = tls_client(proxy.port(), &c.pki.ca_cert).await?;
    let plain = proxy.connect().await?;
    for round in 0..3 {
        plain.simple_query("SELECT 1").await?;
        wait_in_tx_lane(&proxy, 1).await?;
        let t = std::time::Instant::now();
        tls.simple_query("SELECT 1")
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!("round {round}: the TLS client did not get the connection the lane kept")
            })?;
        // Not a speed check: without the lane's hand-over the client waits for the lane's
        // sweep (one to two seconds) or the pool timeout.
        let waited = t.elapsed();
        anyhow::ensure!(
            waited < Duration::from_millis(900),
            "round {round}: the TLS client waited {waited:?} for the connection the lane kept idle"
        );
    }
    let text = scrape(&proxy)?;
    assert_eq!(
        metric_or_zero(&text, "dbproxy_pool_timeouts_total", &[]),
        0.0,
        "{text}"
    );
    Ok(())
}
