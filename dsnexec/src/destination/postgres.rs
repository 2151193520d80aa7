//! PostgreSQL destination: one connection per run, commands in one transaction by default.
//!
//! A command without args goes through the simple query protocol (`batch_execute`), so it may
//! hold several statements (`DROP ...; CREATE ...;`) and DDL with rendered literals. A command
//! with args is one statement sent through the extended protocol with every parameter in
//! text format, as lib/pq sends them for db-controller's dsnexec.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls};

use dbcred::{Dsn, HostKind, SslMode};

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
    let pg = client_config(&dsn).map_err(dest_err)?;

    let connect = pg.connect(NoTls);
    let (client, connection) = match tokio::time::timeout(config.timeout, connect).await {
        Err(_) => {
            return Err(Error::Timeout {
                config: config.name.clone(),
                what: "connecting to the destination".into(),
                seconds: config.timeout.as_secs_f64(),
            });
        }
        Ok(Err(e)) => {
            return Err(dest_err(format!(
                "cannot connect: {}",
                describe(&e, redactor)
            )));
        }
        Ok(Ok(pair)) => pair,
    };
    let conn_task = tokio::spawn(async move {
        // Errors here surface through the client's calls; nothing to add.
        let _ = connection.await;
    });

    let result = run_commands(config, &client, commands, redactor).await;
    // Dropping the client closes the connection; an open transaction is rolled back by the server.
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    result
}

async fn run_commands(
    config: &Config,
    client: &Client,
    commands: &[RenderedCommand],
    redactor: &Redactor,
) -> Result<()> {
    if config.transaction {
        with_timeout(config, client, "BEGIN", client.batch_execute("BEGIN"))
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
                with_timeout(config, client, &format!("commands[{}]", c.index), fut).await
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
        with_timeout(config, client, "COMMIT", client.batch_execute("COMMIT"))
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
    what: &str,
    fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, Failure> {
    match tokio::time::timeout(config.timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Pg(e)),
        Err(_) => {
            let token = client.cancel_token();
            let _ = tokio::time::timeout(Duration::from_secs(5), token.cancel_query(NoTls)).await;
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
        None => redactor.scrub(&e.to_string()),
    }
}

/// SQLSTATEs whose message may repeat part of the statement or of a value.
fn quotes_input(code: &str) -> bool {
    code == "42601" // syntax_error: "at or near <token>"
        || code.starts_with("22") // data_exception: "invalid input syntax for type ...: <value>"
        || code == "42602" // invalid_name
        || code == "42622" // name_too_long: repeats the identifier
        || code == "XX000" // internal_error: anything
}

/// Translates a parsed DSN into tokio-postgres settings.
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
    match dsn.sslmode() {
        SslMode::Disable => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        SslMode::Allow | SslMode::Prefer => {
            // Without TLS support the connection is plaintext, as libpq's `prefer` falls back.
            pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
        }
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            return Err(
                "sslmode require/verify-ca/verify-full is not supported for dsnexec destinations; \
                 connect through the local dbproxy (sslmode=disable on 127.0.0.1) instead"
                    .into(),
            );
        }
    }
    if dsn.get("target_session_attrs") == Some("read-write") {
        pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    let hosts = dsn.hosts();
    if hosts.is_empty() {
        pg.host("localhost");
        pg.port(5432);
    }
    let with_addr = hosts.iter().filter(|h| h.hostaddr.is_some()).count();
    if with_addr != 0 && with_addr != hosts.len() {
        return Err("give hostaddr for every host or for none".into());
    }
    for h in &hosts {
        match &h.host {
            HostKind::Tcp(name) => {
                pg.host(name);
            }
            HostKind::Unix(path) => {
                pg.host_path(path);
            }
        }
        pg.port(h.port);
        if let Some(addr) = &h.hostaddr {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("hostaddr {addr:?} is not an IP address"))?;
            pg.hostaddr(ip);
        }
    }
    Ok(pg)
}
