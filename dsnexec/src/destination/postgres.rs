//! PostgreSQL destination: one connection per run, commands in one transaction by default.
//!
//! A command without args goes through the simple query protocol (`batch_execute`), so it may
//! hold several statements (`DROP ...; CREATE ...;`) and DDL with rendered literals. A command
//! with args is one statement sent through the extended protocol with every parameter in
//! text format, as lib/pq sends them for db-controller's dsnexec.
//!
//! TLS follows the DSN as libpq reads it (`sslmode`, `sslrootcert`, `sslcert`/`sslkey`,
//! `channel_binding`, ...: `dbcred::tls::ServerTlsPolicy`), including libpq's retry sequence
//! for `allow` and `prefer`; the certificate files are read at every run, so rotated files are
//! picked up by the next run.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::Client;
use tokio_postgres::Socket;
use tokio_postgres::config::{
    ChannelBinding as TpChannelBinding, SslMode as TpSslMode, SslNegotiation,
};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

use dbcred::tls::{
    Attempt, AttemptFailure, ChannelBinding, DsnTls, DsnTlsConnect, DsnTlsStream, ServerTlsPolicy,
    TlsError,
};
use dbcred::{Dsn, HostKind};

use crate::config::Config;
use crate::destination::RenderedCommand;
use crate::error::{Error, Result};
use crate::template::Redactor;

/// Runs the commands of one run against the DSN `dsn_text`.
pub async fn execute(
    config: &Config,
    dsn_text: &str,
    commands: &[RenderedCommand],
    redactor: &mut Redactor,
) -> Result<()> {
    let dest_err = |reason: String| Error::Destination {
        config: config.name.clone(),
        reason,
    };
    let dsn = Dsn::parse(dsn_text).map_err(|e| dest_err(format!("invalid DSN: {e}")))?;
    if let Some(pw) = dsn.password() {
        redactor.add(pw);
    }
    let target = Target::from_dsn(&dsn).map_err(dest_err)?;

    let connect = target.connect(redactor);
    let (client, connection, tls) = match tokio::time::timeout(config.timeout, connect).await {
        Err(_) => {
            return Err(Error::Timeout {
                config: config.name.clone(),
                what: "connecting to the destination".into(),
                seconds: config.timeout.as_secs_f64(),
            });
        }
        Ok(Err(reason)) => return Err(dest_err(reason)),
        Ok(Ok(opened)) => opened,
    };
    let conn_task = tokio::spawn(async move {
        // Errors here surface through the client's calls; nothing to add.
        let _ = connection.await;
    });

    let result = run_commands(config, &client, &tls, commands, redactor).await;
    // Dropping the client closes the connection; an open transaction is rolled back by the server.
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    result
}

/// A connection as tokio-postgres opened it, with the TLS connector its cancel requests need.
type Opened = (
    Client,
    tokio_postgres::Connection<Socket, DsnTlsStream<Socket>>,
    DsnTls,
);

/// Where and how to connect: the settings shared by every attempt, the hosts in order and
/// the DSN's TLS policy (files read now, so a rotated CA or client certificate is used by the
/// next run).
struct Target {
    base: tokio_postgres::Config,
    hosts: Vec<HostEntry>,
    policy: ServerTlsPolicy,
}

/// One `host`/`port`/`hostaddr` entry of the DSN.
struct HostEntry {
    host: HostKind,
    port: u16,
    hostaddr: Option<IpAddr>,
}

impl HostEntry {
    fn label(&self) -> String {
        match &self.host {
            HostKind::Tcp(name) if name.contains(':') => format!("[{name}]:{}", self.port),
            HostKind::Tcp(name) => format!("{name}:{}", self.port),
            HostKind::Unix(dir) => format!("socket {}/.s.PGSQL.{}", dir.display(), self.port),
        }
    }
}

impl Target {
    fn from_dsn(dsn: &Dsn) -> std::result::Result<Target, String> {
        let policy = ServerTlsPolicy::from_dsn(dsn).map_err(|e| e.to_string())?;
        let mut base = client_config(dsn)?;
        base.channel_binding(match policy.channel_binding() {
            ChannelBinding::Disable => TpChannelBinding::Disable,
            ChannelBinding::Prefer => TpChannelBinding::Prefer,
            ChannelBinding::Require => TpChannelBinding::Require,
        });
        if policy.direct() {
            base.ssl_negotiation(SslNegotiation::Direct);
        }
        let hosts = host_entries(dsn)?;
        Ok(Target {
            base,
            hosts,
            policy,
        })
    }

    /// Tries every host in order and, for each, libpq's sequence of plaintext and TLS attempts
    /// for the DSN's `sslmode` (`allow`: plaintext, then TLS if the login was rejected;
    /// `prefer`: TLS if offered, then plaintext if the handshake or the login over TLS failed).
    /// The error names every host and why it failed, scrubbed of secrets.
    async fn connect(&self, redactor: &Redactor) -> std::result::Result<Opened, String> {
        let mut failures = Vec::new();
        for h in &self.hosts {
            let attempts = self.policy.attempts_for(&h.host);
            let mut attempt = attempts.first().copied();
            while let Some(a) = attempt {
                let mut pg = self.base.clone();
                match &h.host {
                    HostKind::Tcp(name) => pg.host(name),
                    HostKind::Unix(path) => pg.host_path(path),
                };
                pg.port(h.port);
                if let Some(ip) = h.hostaddr {
                    pg.hostaddr(ip);
                }
                pg.ssl_mode(match a {
                    Attempt::Plain => TpSslMode::Disable,
                    Attempt::TlsIfOffered => TpSslMode::Prefer,
                    Attempt::TlsRequired => TpSslMode::Require,
                });
                let started = Arc::new(AtomicBool::new(false));
                let tls = ObservedTls {
                    inner: DsnTls::new(self.policy.clone()),
                    handshake_started: started.clone(),
                };
                match pg.connect(tls).await {
                    Ok((client, connection)) => {
                        let over_tls = started.load(Ordering::Relaxed);
                        tracing::debug!(host = %h.label(), tls = over_tls, "connected to the destination");
                        return Ok((client, connection, DsnTls::new(self.policy.clone())));
                    }
                    Err(e) => {
                        let over_tls = started.load(Ordering::Relaxed);
                        let how = match tls_error(&e) {
                            Some(t) => Some(AttemptFailure::Negotiation(t)),
                            None if e.as_db_error().is_some() => {
                                Some(AttemptFailure::Login { over_tls })
                            }
                            None => None,
                        };
                        let next = how.and_then(|how| self.policy.fallback(a, how));
                        failures.push(format!(
                            "{}{}: {}",
                            h.label(),
                            attempt_label(a, over_tls),
                            self.explain(&e, a, over_tls, redactor)
                        ));
                        attempt = next;
                    }
                }
            }
        }
        Err(format!("cannot connect: {}", failures.join("; ")))
    }

    /// A connection error in words a user can act on.
    fn explain(
        &self,
        e: &tokio_postgres::Error,
        attempt: Attempt,
        over_tls: bool,
        redactor: &Redactor,
    ) -> String {
        // tokio-postgres' own words for an `N` answer to the SSLRequest under sslmode=require.
        if attempt == Attempt::TlsRequired
            && !over_tls
            && tls_error(e).is_none()
            && with_causes(e).ends_with("server does not support TLS")
        {
            return format!(
                "the server does not support TLS (it refused the SSLRequest) but sslmode={} \
                 requires it: enable ssl on the server, or use sslmode=prefer or disable",
                self.policy.sslmode()
            );
        }
        match tls_error(e) {
            Some(t) => redactor.scrub(&t.to_string()),
            None => describe(e, redactor),
        }
    }
}

/// Which kind of attempt failed, when the sequence has more than one (for the error message).
fn attempt_label(a: Attempt, over_tls: bool) -> &'static str {
    match (a, over_tls) {
        (Attempt::Plain, _) => " (without TLS)",
        (_, true) => " (TLS)",
        (Attempt::TlsIfOffered, false) => " (without TLS: the server offered none)",
        (Attempt::TlsRequired, false) => "",
    }
}

/// The TLS failure behind a tokio-postgres error, if the handshake was ours and failed.
fn tls_error(e: &tokio_postgres::Error) -> Option<&TlsError> {
    let mut source = StdError::source(e);
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<TlsError>() {
            return Some(t);
        }
        source = s.source();
    }
    None
}

/// [`DsnTls`] that records whether a TLS handshake was started, so a failed login can be told
/// apart as over TLS or not (libpq's `prefer` retries only the former in plaintext).
#[derive(Clone)]
struct ObservedTls {
    inner: DsnTls,
    handshake_started: Arc<AtomicBool>,
}

impl<S> MakeTlsConnect<S> for ObservedTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = DsnTlsStream<S>;
    type TlsConnect = ObservedTlsConnect;
    type Error = TlsError;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<ObservedTlsConnect, TlsError> {
        Ok(ObservedTlsConnect {
            inner: <DsnTls as MakeTlsConnect<S>>::make_tls_connect(&mut self.inner, domain)?,
            handshake_started: self.handshake_started.clone(),
        })
    }
}

struct ObservedTlsConnect {
    inner: DsnTlsConnect,
    handshake_started: Arc<AtomicBool>,
}

impl<S> TlsConnect<S> for ObservedTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = DsnTlsStream<S>;
    type Error = TlsError;
    type Future = <DsnTlsConnect as TlsConnect<S>>::Future;

    fn connect(self, stream: S) -> Self::Future {
        self.handshake_started.store(true, Ordering::Relaxed);
        self.inner.connect(stream)
    }
}

async fn run_commands(
    config: &Config,
    client: &Client,
    tls: &DsnTls,
    commands: &[RenderedCommand],
    redactor: &Redactor,
) -> Result<()> {
    if config.transaction {
        with_timeout(config, client, tls, "BEGIN", client.batch_execute("BEGIN"))
            .await
            .map_err(|r| Error::Destination {
                config: config.name.clone(),
                reason: format!("BEGIN failed: {}", r.describe(redactor)),
            })?;
    }
    for c in commands {
        let outcome = match &c.args {
            None => {
                with_timeout(
                    config,
                    client,
                    tls,
                    &format!("commands[{}]", c.index),
                    client.batch_execute(&c.command),
                )
                .await
            }
            Some(args) => {
                let fut = async {
                    let statement = client.prepare(&c.command).await?;
                    // tokio-postgres checks that the count matches the placeholders.
                    let params: Vec<TextParam<'_>> =
                        args.iter().map(|a| TextParam(a.as_text())).collect();
                    client.execute_raw(&statement, params).await.map(|_| ())
                };
                with_timeout(config, client, tls, &format!("commands[{}]", c.index), fut).await
            }
        };
        outcome.map_err(|r| match r {
            Failure::Timeout(e) => e,
            Failure::Pg(e) => Error::Command {
                config: config.name.clone(),
                command: c.index,
                reason: describe(&e, redactor),
            },
        })?;
    }
    if config.transaction {
        with_timeout(
            config,
            client,
            tls,
            "COMMIT",
            client.batch_execute("COMMIT"),
        )
        .await
        .map_err(|r| Error::Destination {
            config: config.name.clone(),
            reason: format!("COMMIT failed: {}", r.describe(redactor)),
        })?;
    }
    Ok(())
}

/// Why one step failed.
enum Failure {
    Timeout(Error),
    Pg(tokio_postgres::Error),
}

impl Failure {
    fn describe(&self, redactor: &Redactor) -> String {
        match self {
            Failure::Timeout(e) => e.to_string(),
            Failure::Pg(e) => describe(e, redactor),
        }
    }
}

/// Runs one step with the config's timeout; on timeout the server-side query is cancelled.
async fn with_timeout<T>(
    config: &Config,
    client: &Client,
    tls: &DsnTls,
    what: &str,
    fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, Failure> {
    match tokio::time::timeout(config.timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Pg(e)),
        Err(_) => {
            let token = client.cancel_token();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), token.cancel_query(tls.clone())).await;
            Err(Failure::Timeout(Error::Timeout {
                config: config.name.clone(),
                what: what.to_owned(),
                seconds: config.timeout.as_secs_f64(),
            }))
        }
    }
}

/// A parameter sent in text format whatever type the server inferred, as lib/pq does.
#[derive(Debug)]
struct TextParam<'a>(std::borrow::Cow<'a, str>);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// A PostgreSQL error for logs and messages: severity, SQLSTATE and the message, except for
/// errors whose message can quote the statement text (syntax errors, bad input values), where
/// only the SQLSTATE is given. Detail, hint, context and position are never used (they can
/// quote SQL or values); everything left is scrubbed of source values.
pub fn describe(e: &tokio_postgres::Error, redactor: &Redactor) -> String {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let message = if quotes_input(code) {
                "message withheld: it can quote the statement or a value".to_owned()
            } else {
                redactor.scrub(db.message())
            };
            format!("{} SQLSTATE {code}: {message}", db.severity())
        }
        None => redactor.scrub(&with_causes(e)),
    }
}

/// An error and its chain of causes ("error connecting to server: Connection refused"):
/// tokio-postgres' own message names only the kind.
fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = StdError::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// SQLSTATEs whose message may repeat part of the statement or of a value.
fn quotes_input(code: &str) -> bool {
    code == "42601" // syntax_error: "at or near <token>"
        || code.starts_with("22") // data_exception: "invalid input syntax for type ...: <value>"
        || code == "42602" // invalid_name
        || code == "42622" // name_too_long: repeats the identifier
        || code == "XX000" // internal_error: anything
}

/// Translates a parsed DSN into the tokio-postgres settings every attempt shares (hosts and
/// TLS are set per attempt).
fn client_config(dsn: &Dsn) -> std::result::Result<tokio_postgres::Config, String> {
    let mut pg = tokio_postgres::Config::new();
    match dsn.user() {
        Some(u) => {
            pg.user(u);
        }
        None => return Err("the DSN names no user".into()),
    }
    if let Some(p) = dsn.password() {
        pg.password(p);
    }
    if let Some(d) = dsn.dbname() {
        pg.dbname(d);
    }
    pg.application_name(dsn.get("application_name").unwrap_or("dsnexec"));
    if let Some(o) = dsn.get("options") {
        pg.options(o);
    }
    if let Some(t) = dsn.connect_timeout() {
        pg.connect_timeout(t);
    }
    if dsn.get("target_session_attrs") == Some("read-write") {
        pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    Ok(pg)
}

/// The DSN's hosts in order (`localhost:5432` when it names none).
fn host_entries(dsn: &Dsn) -> std::result::Result<Vec<HostEntry>, String> {
    let hosts = dsn.hosts();
    if hosts.is_empty() {
        return Ok(vec![HostEntry {
            host: HostKind::Tcp("localhost".into()),
            port: 5432,
            hostaddr: None,
        }]);
    }
    let with_addr = hosts.iter().filter(|h| h.hostaddr.is_some()).count();
    if with_addr != 0 && with_addr != hosts.len() {
        return Err("give hostaddr for every host or for none".into());
    }
    hosts
        .iter()
        .map(|h| {
            let hostaddr = match &h.hostaddr {
                Some(addr) => Some(
                    addr.parse::<IpAddr>()
                        .map_err(|_| format!("hostaddr {addr:?} is not an IP address"))?,
                ),
                None => None,
            };
            Ok(HostEntry {
                host: h.host.clone(),
                port: h.port,
                hostaddr,
            })
        })
        .collect()
}
