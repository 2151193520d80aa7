//! Server connections: connect to the DSN's hosts in order, log in (SCRAM-SHA-256, md5,
//! cleartext), SET ROLE, reset with DISCARD ALL, and cancel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use dbcred::{HostKind, SslMode};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::scram_client::ScramClient;
use crate::credentials::Generation;
use crate::error::{ProxyError, Result, ServerErrorFields};
use crate::protocol::backend::parse_error_fields;
use crate::protocol::framing::{read_message, take_cstr};

/// Largest message we accept from a server during login or reset (ParameterStatus,
/// ErrorResponse, SASL data are all small).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// How long a reset (DISCARD ALL, SET ROLE) may take before the connection is dropped.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-host login limit when the DSN gives no connect_timeout.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The startup parameters (other than user and database) a server connection was opened
/// with; clients reuse only servers whose parameters equal theirs.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// A logged-in connection to PostgreSQL, tagged with the credential generation that
/// opened it so rotations can retire it.
pub struct ServerConnection {
    pub stream: TcpStream,
    pub generation: u64,
    pub params: ServerParams,
    /// ParameterStatus values as the server last reported them, replayed to each client.
    pub parameter_status: Vec<(String, String)>,
    pub backend_pid: i32,
    pub backend_key: i32,
    pub peer: SocketAddr,
    pub created: Instant,
    pub idle_since: Instant,
    role: Option<String>,
}

impl std::fmt::Debug for ServerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConnection")
            .field("peer", &self.peer)
            .field("generation", &self.generation)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

/// Quotes an identifier for SET ROLE.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl ServerConnection {
    /// Opens a connection with `generation`'s credentials, trying its hosts in order like
    /// libpq. An authentication failure stops at the first host that answered (libpq does
    /// the same); connection failures move on to the next host.
    pub async fn connect(
        generation: &Generation,
        params: &ServerParams,
        deadline: Instant,
    ) -> Result<Self> {
        let dsn = &generation.dsn;
        match dsn.sslmode() {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => {}
            other => {
                let name = match other {
                    SslMode::Require => "require",
                    SslMode::VerifyCa => "verify-ca",
                    _ => "verify-full",
                };
                return Err(ProxyError::TlsRequired(name.into()));
            }
        }
        let per_host = dsn.connect_timeout().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let mut last_err = ProxyError::BadDsn("the DSN names no host".into());
        for target in dsn.hosts() {
            let host = match &target.host {
                HostKind::Tcp(name) => target.hostaddr.clone().unwrap_or_else(|| name.clone()),
                HostKind::Unix(path) => {
                    last_err = ProxyError::BadDsn(format!(
                        "unix-socket host {} is not supported; use a TCP host",
                        path.display()
                    ));
                    continue;
                }
            };
            let port = target.port;
            let host_deadline = deadline.min(Instant::now() + per_host);
            let lookup = tokio::time::timeout_at(
                host_deadline.into(),
                tokio::net::lookup_host((host.clone(), port)),
            )
            .await;
            let addrs = match lookup {
                Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
                Ok(Err(e)) => {
                    last_err = ProxyError::Connect {
                        host,
                        port,
                        reason: format!("name resolution failed: {e}"),
                    };
                    continue;
                }
                Err(_) => {
                    last_err = ProxyError::Connect {
                        host,
                        port,
                        reason: "name resolution timed out".into(),
                    };
                    continue;
                }
            };
            for addr in addrs {
                let attempt = tokio::time::timeout_at(
                    host_deadline.into(),
                    Self::login(addr, &host, generation, params),
                )
                .await;
                match attempt {
                    Ok(Ok(conn)) => return Ok(conn),
                    Ok(Err(
                        e @ (ProxyError::ServerRejected { .. }
                        | ProxyError::UnsupportedAuth(_)
                        | ProxyError::SetRole { .. }),
                    )) => {
                        return Err(e);
                    }
                    Ok(Err(ProxyError::Io(e))) => {
                        last_err = ProxyError::Connect {
                            host: host.clone(),
                            port,
                            reason: e.to_string(),
                        };
                    }
                    Ok(Err(e)) => last_err = e,
                    Err(_) => {
                        last_err = ProxyError::Connect {
                            host: host.clone(),
                            port,
                            reason: "timed out".into(),
                        };
                    }
                }
            }
        }
        Err(last_err)
    }

    async fn login(
        addr: SocketAddr,
        host: &str,
        generation: &Generation,
        params: &ServerParams,
    ) -> Result<Self> {
        let dsn = &generation.dsn;
        let user = dsn
            .user()
            .ok_or_else(|| ProxyError::BadDsn("the DSN has no user".into()))?;
        let dbname = dsn.dbname().unwrap_or(user);
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;

        let mut out = BytesMut::with_capacity(512);
        let startup = [("user", user), ("database", dbname)]
            .into_iter()
            .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(startup, &mut out)?;
        stream.write_all(&out).await?;
        out.clear();

        let rejected = |fields: ServerErrorFields| ProxyError::ServerRejected {
            host: host.to_owned(),
            port: addr.port(),
            user: user.to_owned(),
            fields: Box::new(fields),
        };
        let password = || {
            dsn.password().map(str::as_bytes).ok_or_else(|| {
                ProxyError::BadDsn("the server asks for a password but the DSN has none".into())
            })
        };

        let mut buf = BytesMut::with_capacity(1024);
        let mut scram: Option<ScramClient> = None;
        let mut parameter_status = Vec::with_capacity(16);
        let mut backend = (0, 0);
        loop {
            let (tag, mut body) = read_message(&mut stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(ProxyError::Protocol("short authentication request".into()));
                    }
                    match body.get_i32() {
                        0 => {}
                        3 => frontend::password_message(password()?, &mut out)?,
                        5 => {
                            if body.len() < 4 {
                                return Err(ProxyError::Protocol("short md5 request".into()));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(user.as_bytes(), password()?, salt);
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        10 => {
                            let mut mechanisms = Vec::new();
                            while !body.is_empty() && body[0] != 0 {
                                mechanisms.push(take_cstr(&mut body)?);
                            }
                            if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                                return Err(ProxyError::UnsupportedAuth(format!(
                                    "SASL with {} (channel binding needs TLS)",
                                    mechanisms.join(", ")
                                )));
                            }
                            password()?;
                            let client = ScramClient::new(
                                generation.scram_password.clone(),
                                generation.scram_cache.clone(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                &client.client_first(),
                                &mut out,
                            )?;
                            scram = Some(client);
                        }
                        11 => {
                            let client = scram.as_mut().ok_or_else(|| {
                                ProxyError::Protocol("SASL continue without SASL start".into())
                            })?;
                            let client_final = client.client_final(&body).await?;
                            frontend::sasl_response(&client_final, &mut out)?;
                        }
                        12 => {
                            let client = scram.as_mut().ok_or_else(|| {
                                ProxyError::Protocol("SASL final without SASL start".into())
                            })?;
                            client.verify_server_final(&body)?;
                        }
                        2 => return Err(ProxyError::UnsupportedAuth("Kerberos V5".into())),
                        6 => return Err(ProxyError::UnsupportedAuth("SCM credentials".into())),
                        7 | 8 => return Err(ProxyError::UnsupportedAuth("GSSAPI".into())),
                        9 => return Err(ProxyError::UnsupportedAuth("SSPI".into())),
                        other => return Err(ProxyError::UnsupportedAuth(format!("code {other}"))),
                    }
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                }
                b'E' => return Err(rejected(parse_error_fields(&body))),
                b'S' => {
                    let name = take_cstr(&mut body)?;
                    let value = take_cstr(&mut body)?;
                    parameter_status.push((name, value));
                }
                b'K' => {
                    if body.len() < 8 {
                        return Err(ProxyError::Protocol("short BackendKeyData".into()));
                    }
                    backend = (body.get_i32(), body.get_i32());
                }
                b'Z' => break,
                // NoticeResponse, NegotiateProtocolVersion: nothing to do.
                _ => {}
            }
        }
        let now = Instant::now();
        let mut conn = ServerConnection {
            stream,
            generation: generation.number,
            params: params.clone(),
            parameter_status,
            backend_pid: backend.0,
            backend_key: backend.1,
            peer: addr,
            created: now,
            idle_since: now,
            role: generation.role.clone(),
        };
        if let Some(role) = conn.role.clone() {
            conn.simple_queries(&[&format!("SET ROLE {}", quote_ident(&role))])
                .await
                .map_err(|e| match e {
                    ProxyError::Reset(message) => ProxyError::SetRole {
                        role,
                        code: "42501".into(),
                        message,
                    },
                    other => other,
                })?;
        }
        Ok(conn)
    }

    /// Sends simple queries in one write and reads until each has its ReadyForQuery,
    /// recording ParameterStatus changes. Any ErrorResponse fails the whole reset.
    async fn simple_queries(&mut self, queries: &[&str]) -> Result<()> {
        let mut out = BytesMut::with_capacity(64);
        for q in queries {
            frontend::query(q, &mut out)?;
        }
        self.stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut remaining = queries.len();
        let mut failure = None;
        while remaining > 0 {
            let (tag, mut body) =
                read_message(&mut self.stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
            match tag {
                b'Z' => remaining -= 1,
                b'E' => {
                    let f = parse_error_fields(&body);
                    failure = Some(format!("{} ({})", f.message, f.code));
                }
                b'S' => {
                    let name = take_cstr(&mut body)?;
                    let value = take_cstr(&mut body)?;
                    match self.parameter_status.iter_mut().find(|(n, _)| *n == name) {
                        Some(entry) => entry.1 = value,
                        None => self.parameter_status.push((name, value)),
                    }
                }
                _ => {}
            }
        }
        if !buf.is_empty() {
            return Err(ProxyError::Reset("unexpected data after reset".into()));
        }
        match failure {
            Some(message) => Err(ProxyError::Reset(message)),
            None => Ok(()),
        }
    }

    /// Returns the connection to its login state for the next client: DISCARD ALL, then
    /// SET ROLE again (DISCARD ALL resets the role too).
    pub async fn reset(&mut self) -> Result<()> {
        let set_role = self
            .role
            .as_deref()
            .map(|r| format!("SET ROLE {}", quote_ident(r)));
        let mut queries = vec!["DISCARD ALL"];
        if let Some(q) = set_role.as_deref() {
            queries.push(q);
        }
        match tokio::time::timeout(RESET_TIMEOUT, self.simple_queries(&queries)).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Timeout("resetting a server connection")),
        }
    }

    /// A cheap check that the server has not closed the connection (or sent an unsolicited
    /// FATAL) while it sat idle.
    pub fn is_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Closes politely (Terminate) without waiting.
    pub fn close(self) {
        let _ = self.stream.try_write(&[b'X', 0, 0, 0, 4]);
    }
}

/// Sends a CancelRequest for a backend over a fresh connection, as PostgreSQL requires.
pub async fn send_cancel(addr: SocketAddr, pid: i32, key: i32) -> Result<()> {
    let mut out = BytesMut::with_capacity(16);
    frontend::cancel_request(pid, key, &mut out);
    let fut = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ProxyError::Timeout("sending a cancel request")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
