//! TLS to a real PostgreSQL with `ssl=on` (every sslmode, each failure, client certificates, SCRAM-SHA-256-PLUS) and the client-facing acceptor.
//!
//! Logins are done by hand with postgres-protocol's message helpers over the `PgStream` that
//! `negotiate` returns, following `ServerTlsPolicy::attempts`/`fallback` the way a proxy would.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::BytesMut;
use dbcred::tls::{
    Attempt, AttemptFailure, ChannelBinding, ClientTlsAcceptor, PgStream, ServerTlsPolicy,
    TlsError, negotiate,
};
use dbcred::{Dsn, HostKind, WatchConfig};
use dbtests::tls::{ServerCert, TestPki, WRONG_HOST};
use dbtests::{PasswordKind, PgCluster, SecretDir};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound for any single connection or event on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "tls_app";
const PASSWORD: &str = "pw-Zq8!tls secret";
const CERT_USER: &str = "cert_app";

/// How a login ended.
#[derive(Debug)]
struct Session {
    tls: bool,
    /// SASL mechanism used, `None` when the server asked for no password (cert auth).
    mechanism: Option<String>,
    /// Attempts made, in order.
    attempts: Vec<Attempt>,
}

/// Why a connection failed.
#[derive(Debug)]
enum Failure {
    Tls(TlsError),
    /// The server's ErrorResponse message (or our channel-binding refusal).
    Login(String),
}

impl Failure {
    fn tls(self) -> TlsError {
        match self {
            Failure::Tls(e) => e,
            Failure::Login(m) => panic!("expected a TLS error, got a login failure: {m}"),
        }
    }
}

/// Starts a cluster with ssl=on presenting `cert`; the superuser keeps plaintext TCP for the
/// harness, the test role gets `hba` lines (with `{U}` replaced by the role).
async fn ssl_cluster(pki: &TestPki, cert: ServerCert, hba: &[&str]) -> PgCluster {
    let mut lines = vec!["host all postgres 127.0.0.1/32 scram-sha-256".to_string()];
    lines.extend(hba.iter().map(|l| l.to_string()));
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let options = pki.pg_options(cert, &lines).expect("PgOptions for TLS");
    let cluster = PgCluster::start_with(options).expect("starting PostgreSQL with ssl=on");
    cluster
        .create_role(USER, PASSWORD, PasswordKind::Scram)
        .await
        .expect("creating the test role");
    cluster
}

/// A cluster without TLS (ssl=off, the default).
async fn plain_cluster() -> PgCluster {
    let cluster = PgCluster::start().expect("starting PostgreSQL");
    cluster
        .create_role(USER, PASSWORD, PasswordKind::Scram)
        .await
        .expect("creating the test role");
    cluster
}

/// `host=localhost hostaddr=127.0.0.1 port=N user=tls_app password=... dbname=postgres` + `extra`.
fn dsn_text(cluster: &PgCluster, extra: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={USER} password='{PASSWORD}' dbname=postgres {extra}",
        cluster.port()
    )
}

fn policy(text: &str) -> Result<ServerTlsPolicy, TlsError> {
    let dsn = Dsn::parse(text).expect("test DSN parses");
    ServerTlsPolicy::from_dsn_with_home(&dsn, None)
}

/// Connects and logs in the way a proxy would: libpq's attempts, `negotiate`, then the login.
async fn connect(text: &str) -> Result<Session, Failure> {
    let dsn = Dsn::parse(text).expect("test DSN parses");
    let policy = ServerTlsPolicy::from_dsn_with_home(&dsn, None).map_err(Failure::Tls)?;
    connect_with(&dsn, &policy, None).await
}

async fn connect_with(
    dsn: &Dsn,
    policy: &ServerTlsPolicy,
    binding_override: Option<Vec<u8>>,
) -> Result<Session, Failure> {
    let target = dsn.hosts().into_iter().next().expect("one host");
    let HostKind::Tcp(host) = &target.host else {
        panic!("tests use TCP hosts");
    };
    let addr = target.hostaddr.clone().unwrap_or_else(|| host.clone());
    let mut attempt = policy.attempts_for(&target.host)[0];
    let mut attempts = Vec::new();
    loop {
        attempts.push(attempt);
        assert!(attempts.len() <= 3, "fallback loops: {attempts:?}");
        let tcp = TcpStream::connect((addr.as_str(), target.port))
            .await
            .expect("TCP connect to the test server");
        let negotiated = tokio::time::timeout(WAIT, negotiate(tcp, host, policy, attempt))
            .await
            .expect("negotiate timed out");
        let stream = match negotiated {
            Ok(s) => s,
            Err(e) => match policy.fallback(attempt, AttemptFailure::Negotiation(&e)) {
                Some(next) => {
                    attempt = next;
                    continue;
                }
                None => return Err(Failure::Tls(e)),
            },
        };
        let tls = stream.is_tls();
        let login = tokio::time::timeout(
            WAIT,
            login(
                stream,
                dsn.user().unwrap_or_default(),
                dsn.password().unwrap_or_default(),
                policy.channel_binding(),
                binding_override.clone(),
            ),
        )
        .await
        .expect("login timed out")
        .expect("login I/O");
        match login {
            Ok(mechanism) => {
                return Ok(Session {
                    tls,
                    mechanism,
                    attempts,
                });
            }
            Err(message) => {
                match policy.fallback(attempt, AttemptFailure::Login { over_tls: tls }) {
                    Some(next) => attempt = next,
                    None => return Err(Failure::Login(message)),
                }
            }
        }
    }
}

/// Reads one backend message.
async fn read_message(stream: &mut PgStream, buf: &mut BytesMut) -> anyhow::Result<Message> {
    loop {
        if let Some(message) = Message::parse(buf)? {
            return Ok(message);
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("server closed the connection");
        }
    }
}

async fn send(stream: &mut PgStream, buf: &mut BytesMut) -> anyhow::Result<()> {
    stream.write_all(buf).await?;
    buf.clear();
    Ok(())
}

fn error_message(body: &postgres_protocol::message::backend::ErrorResponseBody) -> String {
    let mut fields = body.fields();
    let mut text = String::new();
    while let Ok(Some(field)) = fields.next() {
        if matches!(field.type_(), b'C' | b'M') {
            text.push_str(&String::from_utf8_lossy(field.value_bytes()));
            text.push(' ');
        }
    }
    text
}

/// Startup + authentication (SCRAM-SHA-256[-PLUS] as libpq chooses it under `binding`) up to
/// ReadyForQuery. Ok(Ok(mechanism)) on success, Ok(Err(message)) when the server refused.
async fn login(
    mut stream: PgStream,
    user: &str,
    password: &str,
    binding: ChannelBinding,
    binding_override: Option<Vec<u8>>,
) -> anyhow::Result<Result<Option<String>, String>> {
    let mut out = BytesMut::new();
    let mut inbuf = BytesMut::new();
    frontend::startup_message([("user", user), ("database", "postgres")], &mut out)?;
    send(&mut stream, &mut out).await?;
    let end_point = binding_override.or_else(|| stream.tls_server_end_point());
    let mut mechanism = None;
    let mut scram: Option<ScramSha256> = None;
    loop {
        match read_message(&mut stream, &mut inbuf).await? {
            Message::AuthenticationSasl(body) => {
                let offered: Vec<String> =
                    body.mechanisms().map(|m| Ok(m.to_string())).collect()?;
                let plus = offered.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS);
                let (name, cb) = match (&end_point, binding) {
                    (Some(data), ChannelBinding::Prefer | ChannelBinding::Require) if plus => (
                        sasl::SCRAM_SHA_256_PLUS,
                        sasl::ChannelBinding::tls_server_end_point(data.clone()),
                    ),
                    (_, ChannelBinding::Require) => {
                        return Ok(Err("channel binding required but not possible".into()));
                    }
                    (Some(_), ChannelBinding::Prefer) => {
                        (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                    }
                    _ => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                };
                let client = ScramSha256::new(password.as_bytes(), cb);
                frontend::sasl_initial_response(name, client.message(), &mut out)?;
                send(&mut stream, &mut out).await?;
                mechanism = Some(name.to_string());
                scram = Some(client);
            }
            Message::AuthenticationSaslContinue(body) => {
                let client = scram.as_mut().context("SASL continue before start")?;
                client.update(body.data())?;
                frontend::sasl_response(client.message(), &mut out)?;
                send(&mut stream, &mut out).await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                scram
                    .as_mut()
                    .context("SASL final before start")?
                    .finish(body.data())?;
            }
            Message::AuthenticationOk => {
                if binding == ChannelBinding::Require
                    && mechanism.as_deref() != Some(sasl::SCRAM_SHA_256_PLUS)
                {
                    return Ok(Err(
                        "channel binding required, but the server authenticated without it".into(),
                    ));
                }
            }
            Message::ErrorResponse(body) => return Ok(Err(error_message(&body))),
            Message::ReadyForQuery(_) => {
                frontend::terminate(&mut out);
                send(&mut stream, &mut out).await?;
                return Ok(Ok(mechanism));
            }
            Message::ParameterStatus(_)
            | Message::BackendKeyData(_)
            | Message::NoticeResponse(_) => {}
            _ => bail!("unexpected message during login"),
        }
    }
}

fn root(pki: &TestPki) -> String {
    format!("sslrootcert={}", pki.ca_cert.display())
}

#[tokio::test]
async fn every_sslmode_against_a_tls_server() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let cases: [(&str, bool, &[Attempt]); 6] = [
        ("sslmode=disable", false, &[Attempt::Plain]),
        ("sslmode=allow", false, &[Attempt::Plain]),
        ("sslmode=prefer", true, &[Attempt::TlsIfOffered]),
        ("sslmode=require", true, &[Attempt::TlsRequired]),
        ("sslmode=verify-ca", true, &[Attempt::TlsRequired]),
        ("sslmode=verify-full", true, &[Attempt::TlsRequired]),
    ];
    for (mode, tls, attempts) in cases {
        let extra = format!("{mode} {}", root(&pki));
        let session = connect(&dsn_text(&cluster, &extra))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}\n{}", cluster.log()));
        assert_eq!(session.tls, tls, "{mode}");
        assert_eq!(session.attempts, attempts, "{mode}");
        assert_eq!(
            session.mechanism.as_deref(),
            Some("SCRAM-SHA-256-PLUS")
                .filter(|_| tls)
                .or(Some("SCRAM-SHA-256")),
            "{mode}"
        );
    }
    // No sslmode at all = prefer.
    let session = connect(&dsn_text(&cluster, ""))
        .await
        .expect("default sslmode");
    assert!(session.tls);
}

#[tokio::test]
async fn every_sslmode_against_a_server_without_tls() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = plain_cluster().await;
    for mode in ["disable", "allow", "prefer"] {
        let session = connect(&dsn_text(&cluster, &format!("sslmode={mode}")))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        assert!(!session.tls, "{mode}");
        assert_eq!(session.mechanism.as_deref(), Some("SCRAM-SHA-256"));
    }
    for mode in ["require", "verify-ca", "verify-full"] {
        let text = dsn_text(&cluster, &format!("sslmode={mode} {}", root(&pki)));
        let err = connect(&text).await.expect_err(mode).tls();
        assert!(
            matches!(err, TlsError::ServerRefusedTls { .. }),
            "{mode}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("does not support TLS"), "{message}");
        assert!(message.contains(&format!("sslmode={mode}")), "{message}");
    }
}

#[tokio::test]
async fn allow_retries_with_tls_when_plaintext_is_rejected() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &[
            "hostnossl all all 127.0.0.1/32 reject",
            "hostssl all all 127.0.0.1/32 scram-sha-256",
        ],
    )
    .await;
    let session = connect(&dsn_text(&cluster, "sslmode=allow"))
        .await
        .expect("allow");
    assert!(session.tls);
    assert_eq!(session.attempts, [Attempt::Plain, Attempt::TlsIfOffered]);
    // disable has no second attempt: the server's refusal is the answer.
    match connect(&dsn_text(&cluster, "sslmode=disable")).await {
        Err(Failure::Login(message)) => assert!(
            message.contains("no encryption") || message.contains("rejects"),
            "{message}"
        ),
        other => panic!("disable against hostssl-only: {other:?}"),
    }
}

#[tokio::test]
async fn prefer_retries_in_plaintext_when_the_tls_login_is_rejected() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &[
            "hostssl all all 127.0.0.1/32 reject",
            "hostnossl all all 127.0.0.1/32 scram-sha-256",
        ],
    )
    .await;
    let session = connect(&dsn_text(&cluster, "sslmode=prefer"))
        .await
        .expect("prefer");
    assert!(!session.tls);
    assert_eq!(session.attempts, [Attempt::TlsIfOffered, Attempt::Plain]);
    // require does not fall back.
    match connect(&dsn_text(&cluster, "sslmode=require")).await {
        Err(Failure::Login(message)) => assert!(message.contains("28000"), "{message}"),
        other => panic!("require against hostssl reject: {other:?}"),
    }
}

#[tokio::test]
async fn certificate_from_an_unknown_ca() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::OtherCa,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    // require without a root certificate does not verify, like libpq.
    assert!(
        connect(&dsn_text(&cluster, "sslmode=require"))
            .await
            .expect("require")
            .tls
    );
    // prefer with a root certificate verifies; on failure libpq retries in plaintext.
    let session = connect(&dsn_text(
        &cluster,
        &format!("sslmode=prefer {}", root(&pki)),
    ))
    .await
    .expect("prefer falls back");
    assert!(!session.tls);
    assert_eq!(session.attempts, [Attempt::TlsIfOffered, Attempt::Plain]);
    // require with sslrootcert behaves like verify-ca.
    for mode in ["require", "verify-ca", "verify-full"] {
        let err = connect(&dsn_text(
            &cluster,
            &format!("sslmode={mode} {}", root(&pki)),
        ))
        .await
        .expect_err(mode)
        .tls();
        assert!(matches!(err, TlsError::UnknownCa { .. }), "{mode}: {err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&pki.ca_cert.display().to_string()),
            "names the sslrootcert path: {message}"
        );
        assert!(message.contains("not signed by a trusted CA"), "{message}");
    }
}

#[tokio::test]
async fn system_roots_do_not_trust_a_private_ca() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let text = dsn_text(&cluster, "sslrootcert=system");
    let p = policy(&text).expect("system roots load (install ca-certificates if this fails)");
    assert_eq!(
        p.sslmode(),
        dbcred::SslMode::VerifyFull,
        "sslrootcert=system implies verify-full"
    );
    let err = connect(&text).await.expect_err("private CA").tls();
    assert!(matches!(err, TlsError::UnknownCa { .. }), "{err:?}");
    assert!(err.to_string().contains("system"), "{err}");
}

#[tokio::test]
async fn wrong_host_name_fails_verify_full_only() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::WrongHost,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let err = connect(&dsn_text(
        &cluster,
        &format!("sslmode=verify-full {}", root(&pki)),
    ))
    .await
    .expect_err("wrong host")
    .tls();
    assert!(matches!(err, TlsError::WrongHostName { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("\"localhost\""),
        "names the host: {message}"
    );
    assert!(
        message.contains("verify-ca"),
        "suggests verify-ca: {message}"
    );
    assert!(
        message.contains(WRONG_HOST),
        "says which names the certificate has: {message}"
    );
    for mode in ["verify-ca", "require"] {
        let session = connect(&dsn_text(
            &cluster,
            &format!("sslmode={mode} {}", root(&pki)),
        ))
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        assert!(session.tls);
    }
}

#[tokio::test]
async fn verify_full_checks_ip_addresses_and_names() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let port = cluster.port();
    let extra = format!(
        "user={USER} password='{PASSWORD}' dbname=postgres sslmode=verify-full {}",
        root(&pki)
    );
    // host is an IP literal: checked against the IP SANs (and no SNI is sent).
    assert!(
        connect(&format!("host=127.0.0.1 port={port} {extra}"))
            .await
            .expect("ip host")
            .tls
    );
    // Only hostaddr: libpq verifies against hostaddr.
    assert!(
        connect(&format!("hostaddr=127.0.0.1 port={port} {extra}"))
            .await
            .expect("hostaddr")
            .tls
    );
    // host is the name verified, hostaddr only where we dial.
    let err = connect(&format!(
        "host={WRONG_HOST} hostaddr=127.0.0.1 port={port} {extra}"
    ))
    .await
    .expect_err("name not in the certificate")
    .tls();
    assert!(matches!(err, TlsError::WrongHostName { .. }), "{err:?}");
    // sslsni=0 changes nothing for verification.
    assert!(
        connect(&format!(
            "host=localhost hostaddr=127.0.0.1 port={port} sslsni=0 {extra}"
        ))
        .await
        .expect("sslsni=0")
        .tls
    );
}

#[tokio::test]
async fn expired_certificate_is_reported_as_expired() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Expired,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    for mode in ["verify-ca", "verify-full"] {
        let err = connect(&dsn_text(
            &cluster,
            &format!("sslmode={mode} {}", root(&pki)),
        ))
        .await
        .expect_err(mode)
        .tls();
        assert!(
            matches!(err, TlsError::CertificateExpired { .. }),
            "{mode}: {err:?}"
        );
        assert!(err.to_string().contains("expired"), "{err}");
    }
    // Without verification libpq does not look at dates either.
    assert!(
        connect(&dsn_text(&cluster, "sslmode=require"))
            .await
            .expect("require")
            .tls
    );
}

#[tokio::test]
async fn client_certificate_authentication() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &[
            &format!("hostssl all {CERT_USER} 127.0.0.1/32 cert"),
            "host all all 127.0.0.1/32 scram-sha-256",
        ],
    )
    .await;
    cluster
        .create_role(CERT_USER, "unused-password", PasswordKind::Scram)
        .await
        .expect("role");
    let files = pki.client_files(CERT_USER).expect("client certificate");
    let base = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={CERT_USER} dbname=postgres sslmode=verify-full {}",
        cluster.port(),
        root(&pki)
    );
    let with_cert = format!(
        "{base} sslcert={} sslkey={}",
        files.cert.display(),
        files.key.display()
    );
    let session = connect(&with_cert)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cluster.log()));
    assert!(session.tls);
    assert_eq!(session.mechanism, None, "cert auth asks for no password");
    // Without the certificate the server refuses.
    match connect(&base).await {
        Err(Failure::Login(message)) => assert!(message.contains("28000"), "{message}"),
        other => panic!("no client certificate: {other:?}"),
    }
    // channel_binding=require fails when the server authenticated without SCRAM, as libpq does.
    match connect(&format!("{with_cert} channel_binding=require")).await {
        Err(Failure::Login(message)) => assert!(message.contains("channel binding"), "{message}"),
        other => panic!("channel_binding=require with cert auth: {other:?}"),
    }
    // An sslcert naming another role is refused by the server (CN must match the user).
    let other = pki
        .client_files("somebody_else")
        .expect("client certificate");
    let wrong = format!(
        "{base} sslcert={} sslkey={}",
        other.cert.display(),
        other.key.display()
    );
    assert!(matches!(connect(&wrong).await, Err(Failure::Login(_))));
}

#[tokio::test]
async fn unreadable_or_invalid_client_key_is_a_clear_error_without_content() {
    let pki = TestPki::generate().expect("PKI");
    let files = pki.client_files(CERT_USER).expect("client certificate");
    let secret = "super-secret-key-material-123";
    let bad_key = pki.dir().join("bad.key");
    std::fs::write(
        &bad_key,
        format!("-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"),
    )
    .expect("write");
    let base = format!(
        "host=localhost password='{PASSWORD}' sslmode=require sslcert={}",
        files.cert.display()
    );
    let cases = [
        (format!("{base} sslkey={}", bad_key.display()), "sslkey"),
        (
            format!("{base} sslkey={}/missing.key", pki.dir().display()),
            "does not exist",
        ),
        (
            format!("{base} sslkey={}", files.cert.display()),
            "no PEM private key",
        ),
    ];
    for (text, expected) in cases {
        let err = policy(&text).expect_err("bad key");
        let message = err.to_string();
        let debug = format!("{err:?}");
        assert!(message.contains(expected), "{message}");
        for shown in [&message, &debug] {
            assert!(!shown.contains(secret), "key content leaked: {shown}");
            assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
        }
    }
    // A certificate and key that do not belong together.
    let other = pki.client_files("other").expect("client certificate");
    let text = format!("{base} sslkey={}", other.key.display());
    let err = policy(&text).expect_err("mismatched pair");
    assert!(err.to_string().contains("sslcert and sslkey"), "{err}");
    // The policy's Debug shows no password either.
    let ok = policy(&format!(
        "host=localhost password='{PASSWORD}' sslmode=require"
    ))
    .expect("policy");
    assert!(!format!("{ok:?}").contains(PASSWORD));
}

#[tokio::test]
async fn configuration_errors_libpq_also_refuses() {
    let bad = [
        (
            "host=h sslmode=prefer sslnegotiation=direct",
            "sslnegotiation=direct",
        ),
        ("host=h sslmode=verify-ca", "root certificate"),
        (
            "host=h sslmode=verify-full sslrootcert=/nonexistent/root.crt",
            "/nonexistent/root.crt",
        ),
        (
            "host=h sslmode=disable channel_binding=require",
            "channel_binding=require",
        ),
        ("host=h ssl_max_protocol_version=TLSv1.1", "TLS version"),
    ];
    for (text, expected) in bad {
        let message = policy(text).expect_err(text).to_string();
        assert!(message.contains(expected), "{text}: {message}");
    }
    // require with a missing sslrootcert file is accepted by libpq (no verification).
    let p = policy("host=h sslmode=require sslrootcert=/nonexistent/root.crt").expect("require");
    assert_eq!(p.attempts(), [Attempt::TlsRequired]);
    // Unix sockets never use TLS.
    assert_eq!(
        p.attempts_for(&HostKind::Unix("/tmp".into())),
        [Attempt::Plain]
    );
}

#[test]
fn libpq_attempt_order_and_fallbacks() {
    let refused = TlsError::ServerRefusedTls {
        host: "h".into(),
        mode: "require",
    };
    let handshake = TlsError::Handshake {
        host: "h".into(),
        detail: "x".into(),
    };
    let p = |mode: &str| {
        ServerTlsPolicy::from_dsn_with_home(
            &Dsn::parse(&format!("host=h sslmode={mode}")).expect("dsn"),
            None,
        )
        .expect("policy")
    };
    let login = |over_tls| AttemptFailure::Login { over_tls };
    assert_eq!(p("disable").attempts(), [Attempt::Plain]);
    assert_eq!(p("disable").fallback(Attempt::Plain, login(false)), None);
    assert_eq!(
        p("allow").fallback(Attempt::Plain, login(false)),
        Some(Attempt::TlsIfOffered)
    );
    assert_eq!(
        p("allow").fallback(Attempt::TlsIfOffered, login(true)),
        None
    );
    assert_eq!(
        p("prefer").fallback(Attempt::TlsIfOffered, login(true)),
        Some(Attempt::Plain)
    );
    assert_eq!(
        p("prefer").fallback(Attempt::TlsIfOffered, login(false)),
        None,
        "N then rejected: done"
    );
    assert_eq!(
        p("prefer").fallback(
            Attempt::TlsIfOffered,
            AttemptFailure::Negotiation(&handshake)
        ),
        Some(Attempt::Plain)
    );
    assert_eq!(p("prefer").fallback(Attempt::Plain, login(false)), None);
    assert_eq!(
        p("require").fallback(Attempt::TlsRequired, AttemptFailure::Negotiation(&refused)),
        None
    );
    assert_eq!(
        p("require").fallback(
            Attempt::TlsRequired,
            AttemptFailure::Negotiation(&handshake)
        ),
        None
    );
}

#[tokio::test]
async fn direct_tls_against_postgres_15_fails_clearly() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let version = cluster
        .superuser_client()
        .await
        .expect("superuser")
        .query_one("SHOW server_version_num", &[])
        .await
        .expect("version")
        .get::<_, String>(0)
        .parse::<u32>()
        .expect("number");
    let text = dsn_text(
        &cluster,
        &format!("sslmode=verify-full sslnegotiation=direct {}", root(&pki)),
    );
    let result = connect(&text).await;
    if version >= 170000 {
        assert!(result.expect("direct TLS on PostgreSQL 17+").tls);
    } else {
        let err = result.expect_err("direct TLS before 17").tls();
        assert!(
            matches!(err, TlsError::DirectNotSupported { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("PostgreSQL 17"), "{err}");
    }
}

#[tokio::test]
async fn scram_sha_256_plus_uses_the_end_point_hash() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let text = dsn_text(
        &cluster,
        &format!("sslmode=verify-full channel_binding=require {}", root(&pki)),
    );
    let session = connect(&text)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cluster.log()));
    assert_eq!(session.mechanism.as_deref(), Some("SCRAM-SHA-256-PLUS"));
    // A different hash is refused by the server: the value is what binds the login.
    let dsn = Dsn::parse(&text).expect("dsn");
    let p = ServerTlsPolicy::from_dsn_with_home(&dsn, None).expect("policy");
    match connect_with(&dsn, &p, Some(vec![0u8; 32])).await {
        Err(Failure::Login(message)) => assert!(
            message.contains("28P01") || message.contains("channel binding"),
            "{message}"
        ),
        other => panic!("wrong binding data: {other:?}"),
    }
    // channel_binding=disable uses plain SCRAM over TLS.
    let session = connect(&dsn_text(
        &cluster,
        "sslmode=require channel_binding=disable",
    ))
    .await
    .expect("disable");
    assert_eq!(session.mechanism.as_deref(), Some("SCRAM-SHA-256"));
    // Without TLS, require cannot be met.
    let plain = plain_cluster().await;
    match connect(&dsn_text(&plain, "sslmode=prefer channel_binding=require")).await {
        Err(Failure::Login(message)) => assert!(message.contains("channel binding"), "{message}"),
        other => panic!("channel_binding=require without TLS: {other:?}"),
    }
}

/// TLS client configuration trusting exactly `leaf`.
fn client_trusting(leaf: &rustls_pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(leaf.clone()).expect("trust anchor");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Accepts connections forever with the acceptor's current config and echoes bytes.
async fn serve_echo(acceptor: ClientTlsAcceptor) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = acceptor.acceptor();
            tokio::spawn(async move {
                if let Ok(mut stream) = tls.accept(tcp).await {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Connects with `config` and returns the stream and the server's leaf certificate.
async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("no peer certificate"))?
        .to_vec();
    Ok((stream, leaf))
}

async fn echo(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, text: &[u8]) -> Vec<u8> {
    stream.write_all(text).await.expect("write");
    let mut got = vec![0u8; text.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .expect("read");
    got
}

#[tokio::test]
async fn self_signed_acceptor_serves_tls_and_negotiate_can_verify_it() {
    let acceptor = ClientTlsAcceptor::self_signed().expect("self-signed");
    let leaf = acceptor.state().leaf;
    let addr = serve_echo(acceptor.clone()).await;
    let (mut stream, seen) = tls_connect(addr, client_trusting(&leaf))
        .await
        .expect("handshake");
    assert_eq!(seen, leaf.to_vec());
    assert_eq!(echo(&mut stream, b"hello").await, b"hello");

    // The same certificate through `negotiate` with verify-full and SNI, for 127.0.0.1 and ::1
    // names too, as a PostgreSQL-style server answering `S` to SSLRequest.
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let root_file = pki_dir.path().join("self-signed.crt");
    std::fs::write(&root_file, pem_encode(&leaf)).expect("write root");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn({
        let acceptor = acceptor.clone();
        async move {
            for _ in 0..2 {
                let (mut tcp, _) = listener.accept().await.expect("accept");
                let mut request = [0u8; 8];
                tcp.read_exact(&mut request).await.expect("SSLRequest");
                assert_eq!(request, dbcred::tls::SSL_REQUEST);
                tcp.write_all(b"S").await.expect("S");
                let mut tls = acceptor
                    .acceptor()
                    .accept(tcp)
                    .await
                    .expect("server handshake");
                tls.write_all(b"ok").await.expect("write");
                tls.flush().await.expect("flush");
            }
        }
    });
    for host in ["localhost", "127.0.0.1"] {
        let text = format!(
            "host={host} port={port} sslmode=verify-full sslrootcert={}",
            root_file.display()
        );
        let p = policy(&text).expect("policy");
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut stream = negotiate(tcp, host, &p, Attempt::TlsRequired)
            .await
            .expect("negotiate");
        assert!(stream.tls_server_end_point().is_some());
        let mut ok = [0u8; 2];
        stream.read_exact(&mut ok).await.expect("read");
        assert_eq!(&ok, b"ok");
    }
    server.await.expect("server task");
}

/// PEM text of one DER certificate.
fn pem_encode(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[tokio::test]
async fn file_acceptor_follows_kubelet_rotation_and_keeps_the_old_pair_on_bad_input() {
    let pki = TestPki::generate().expect("PKI");
    let secret = SecretDir::new().expect("secret dir");
    let (cert_a, key_a) = pki.server_pem(&["localhost"]).expect("pair A");
    secret
        .write(&[
            ("tls.crt", cert_a.as_bytes()),
            ("tls.key", key_a.as_bytes()),
        ])
        .expect("write A");
    let acceptor = ClientTlsAcceptor::from_files(
        secret.file("tls.crt"),
        secret.file("tls.key"),
        WatchConfig::default().with_poll_interval(Duration::from_secs(60)),
    )
    .expect("acceptor from files");
    let mut changes = acceptor.subscribe();
    let addr = serve_echo(acceptor.clone()).await;
    let ca = {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::pem::PemObject::pem_file_iter(&pki.ca_cert).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add");
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    };
    let (mut old_conn, leaf_a) = tls_connect(addr, ca.clone()).await.expect("connect A");
    assert_eq!(leaf_a, acceptor.state().leaf.to_vec());

    // Rotate: one kubelet atomic-writer update of both files.
    let (cert_b, key_b) = pki.server_pem(&["localhost"]).expect("pair B");
    secret
        .write(&[
            ("tls.crt", cert_b.as_bytes()),
            ("tls.key", key_b.as_bytes()),
        ])
        .expect("write B");
    tokio::time::timeout(WAIT, changes.wait_for(|s| s.generation == 1))
        .await
        .expect("reload within the timeout (inotify, poll is 60 s)")
        .expect("watch open");
    let (_, leaf_b) = tls_connect(addr, ca.clone()).await.expect("connect B");
    assert_ne!(leaf_b, leaf_a, "a new connection sees the new certificate");
    // The connection made before the rotation still works.
    assert_eq!(echo(&mut old_conn, b"still here").await, b"still here");

    // A broken update (certificate C with key B): refused, B stays.
    let (cert_c, _key_c) = pki.server_pem(&["localhost"]).expect("pair C");
    secret
        .write(&[
            ("tls.crt", cert_c.as_bytes()),
            ("tls.key", key_b.as_bytes()),
        ])
        .expect("write mismatched");
    let state = tokio::time::timeout(WAIT, changes.wait_for(|s| s.last_rejection.is_some()))
        .await
        .expect("rejection within the timeout")
        .expect("watch open")
        .clone();
    assert_eq!(state.generation, 1);
    let reason = state.last_rejection.unwrap_or_default();
    assert!(
        reason.contains("cannot use this certificate with this key"),
        "{reason}"
    );
    assert!(
        !reason.contains("PRIVATE KEY"),
        "no key content in the reason: {reason}"
    );
    let (_, leaf_now) = tls_connect(addr, ca.clone())
        .await
        .expect("connect after bad update");
    assert_eq!(leaf_now, leaf_b, "the previous good pair is kept");
    // Garbage in the key file: refused too.
    secret
        .write(&[("tls.crt", cert_b.as_bytes()), ("tls.key", b"not a key")])
        .expect("write garbage");
    tokio::time::timeout(
        WAIT,
        changes.wait_for(|s| {
            s.last_rejection
                .as_deref()
                .is_some_and(|r| r.contains("no PEM private key"))
        }),
    )
    .await
    .expect("second rejection")
    .expect("watch open");
    assert_eq!(tls_connect(addr, ca).await.expect("connect").1, leaf_b);
}

#[tokio::test]
async fn file_acceptor_refuses_to_start_with_a_bad_pair() {
    let pki = TestPki::generate().expect("PKI");
    let secret = SecretDir::new().expect("secret dir");
    let (cert, _) = pki.server_pem(&["localhost"]).expect("pair");
    let (_, other_key) = pki.server_pem(&["localhost"]).expect("pair");
    secret
        .write(&[
            ("tls.crt", cert.as_bytes()),
            ("tls.key", other_key.as_bytes()),
        ])
        .expect("write");
    let err = ClientTlsAcceptor::from_files(
        secret.file("tls.crt"),
        secret.file("tls.key"),
        WatchConfig::default(),
    )
    .expect_err("mismatched pair");
    assert!(err.to_string().contains("tls.crt"), "{err}");
    let err = ClientTlsAcceptor::from_files(
        secret.file("missing.crt"),
        secret.file("tls.key"),
        WatchConfig::default(),
    )
    .expect_err("missing file");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// tokio-postgres with this policy: `config.ssl_mode(tls.tokio_postgres_ssl_mode())`.
async fn tokio_postgres_connect(
    cluster: &PgCluster,
    text: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let dsn = Dsn::parse(text).expect("dsn");
    let Some(HostKind::Tcp(host)) = dsn.hosts().into_iter().next().map(|t| t.host) else {
        panic!("tests use one TCP host");
    };
    let tls = dbcred::tls::DsnTls::new(policy(text).expect("policy"));
    let mut config = tokio_postgres::Config::new();
    config
        .host(&host)
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(cluster.port())
        .user(USER)
        .password(PASSWORD)
        .dbname("postgres")
        .ssl_mode(tls.tokio_postgres_ssl_mode())
        .channel_binding(tokio_postgres::config::ChannelBinding::Require);
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test]
async fn tokio_postgres_connector_verifies_and_binds_the_channel() {
    let pki = TestPki::generate().expect("PKI");
    let cluster = ssl_cluster(
        &pki,
        ServerCert::Valid,
        &["host all all 127.0.0.1/32 scram-sha-256"],
    )
    .await;
    let client = tokio_postgres_connect(
        &cluster,
        &format!("host=localhost sslmode=verify-full {}", root(&pki)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log()));
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the session is encrypted");
    // channel_binding=require succeeded, so the end-point hash matched the server's.
    let err = tokio_postgres_connect(
        &cluster,
        &format!("host={WRONG_HOST} sslmode=verify-full {}", root(&pki)),
    )
    .await
    .expect_err("name mismatch");
    let message = error_chain(&err);
    assert!(message.contains("verify-ca"), "{message}");
    let other = TestPki::generate().expect("PKI");
    let err = tokio_postgres_connect(
        &cluster,
        &format!("host=localhost sslmode=verify-ca {}", root(&other)),
    )
    .await
    .expect_err("unknown CA");
    let message = error_chain(&err);
    assert!(message.contains("not signed by a trusted CA"), "{message}");
}

/// An error and its sources, as one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
