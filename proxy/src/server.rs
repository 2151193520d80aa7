//! Server connections: connect to the DSN's hosts in order with the DSN's TLS policy (libpq's
//! `sslmode` attempts and fallbacks), log in (SCRAM-SHA-256 with or without channel binding,
//! md5, cleartext), SET ROLE, reset with DISCARD ALL, and cancel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use dbcred::HostKind;
use dbcred::tls::{
    Attempt, AttemptFailure, ChannelBinding, PgStream, ServerTlsPolicy, TlsError, negotiate,
};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::scram_client::{Gs2Binding, ScramClient};
use crate::credentials::Generation;
use crate::error::{ProxyError, Result, ServerErrorFields};
use crate::protocol::backend::parse_error_fields;
use crate::protocol::framing::{read_message, take_cstr, take_parameter_status};

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

/// ParameterStatus values as a server last reported them. Connections that report the same
/// values (nearly all of them) share one copy: a private one costs about 1 kB of strings per
/// session, held even while the session is idle.
pub type ParameterStatus = Arc<ParameterList>;

/// (name, value) pairs in the order the server sent them.
pub type ParameterList = [(String, String)];

/// How many distinct live ParameterStatus sets are shared at most; beyond that (clients
/// with many different startup parameters) a connection keeps its own copy.
const MAX_SHARED_PARAMETER_STATUS: usize = 64;

/// The shared copy of `list` if a live connection already has the same values.
pub fn share_parameter_status(list: Vec<(String, String)>) -> ParameterStatus {
    static SHARED: std::sync::Mutex<Vec<std::sync::Weak<ParameterList>>> =
        std::sync::Mutex::new(Vec::new());
    let mut shared = crate::lock(&SHARED);
    shared.retain(|w| w.strong_count() > 0);
    if let Some(found) = shared
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .find(|s| **s == *list)
    {
        return found;
    }
    let list: ParameterStatus = list.into();
    if shared.len() < MAX_SHARED_PARAMETER_STATUS {
        shared.push(Arc::downgrade(&list));
    }
    list
}

/// Sets one reported value in a shared list (copy on write; unchanged values keep sharing).
pub fn set_parameter_status(list: &mut ParameterStatus, name: &str, value: &str) {
    let known = list.iter().find(|(n, _)| n == name);
    if known.is_some_and(|(_, v)| v == value) {
        return;
    }
    let mut copy = list.to_vec();
    match copy.iter_mut().find(|(n, _)| n == name) {
        Some(entry) => entry.1 = value.to_owned(),
        None => copy.push((name.to_owned(), value.to_owned())),
    }
    *list = share_parameter_status(copy);
}

/// How to reach a backend again for a CancelRequest: same address, same TLS as its session
/// (PostgreSQL reads a CancelRequest after an SSLRequest too).
#[derive(Clone, Debug)]
pub struct CancelRoute {
    pub addr: SocketAddr,
    /// The name TLS verifies (the DSN's host).
    pub host: String,
    pub policy: ServerTlsPolicy,
    pub tls: bool,
}

/// A logged-in connection to PostgreSQL, tagged with the credential generation that
/// opened it so rotations can retire it.
pub struct ServerConnection {
    pub stream: PgStream,
    pub generation: u64,
    pub params: ServerParams,
    /// ParameterStatus values as the server last reported them, replayed to each client.
    pub parameter_status: ParameterStatus,
    pub backend_pid: i32,
    pub backend_key: i32,
    pub created: Instant,
    pub idle_since: Instant,
    /// Where cancels for this backend go, and how.
    pub cancel_route: Arc<CancelRoute>,
    role: Option<Arc<str>>,
    /// `user@hosts/db` of the generation that opened it: a rotation that changes this moves
    /// sessions (`--migrate changed`).
    pub target: Arc<str>,
    /// What transaction pooling left on this connection (prepared statements, settings);
    /// allocated on first use, so session-mode connections do not carry it.
    pub txn: Option<Box<crate::txn::ServerSession>>,
    /// Its entry in the registry (SHOW SERVERS; set by the pool that opened it) and its live
    /// state there.
    pub registry: crate::stats::ServerHandle,
}

impl std::fmt::Debug for ServerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConnection")
            .field("peer", &self.peer())
            .field("generation", &self.generation)
            .field("backend_pid", &self.backend_pid)
            .field("tls", &self.stream.is_tls())
            .finish_non_exhaustive()
    }
}

impl ServerConnection {
    /// The backend's address (its cancel route's).
    pub fn peer(&self) -> SocketAddr {
        self.cancel_route.addr
    }

    /// What transaction pooling left here (empty when nothing has).
    pub fn txn(&self) -> &crate::txn::ServerSession {
        static EMPTY: std::sync::LazyLock<crate::txn::ServerSession> =
            std::sync::LazyLock::new(Default::default);
        self.txn.as_deref().unwrap_or(&EMPTY)
    }

    pub fn txn_mut(&mut self) -> &mut crate::txn::ServerSession {
        self.txn.get_or_insert_with(Default::default)
    }
}

/// Quotes an identifier for SET ROLE.
/// The error for an ErrorResponse to one of dbproxy's own statements: 57014 (canceled, most
/// often by the client's own statement_timeout, which also applies to the first statement
/// dbproxy runs on its behalf) is worth retrying, anything else is not.
fn bookkeeping_failure(body: &[u8]) -> ProxyError {
    let f = parse_error_fields(body);
    let message = format!("{} ({})", f.message, f.code);
    if f.code == "57014" {
        ProxyError::Canceled(message)
    } else {
        ProxyError::Reset(message)
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// How one connection attempt failed, for libpq's retry rules.
enum AttemptError {
    /// TLS negotiation failed before anything was sent.
    Negotiation(TlsError),
    /// The server refused the login with an ErrorResponse.
    Rejected { error: ProxyError, over_tls: bool },
    /// Anything else (I/O, protocol, unsupported authentication, channel binding, SET ROLE).
    Other(ProxyError),
}

impl From<ProxyError> for AttemptError {
    fn from(e: ProxyError) -> Self {
        AttemptError::Other(e)
    }
}

impl From<std::io::Error> for AttemptError {
    fn from(e: std::io::Error) -> Self {
        AttemptError::Other(ProxyError::Io(e))
    }
}

impl ServerConnection {
    /// Opens a connection with `generation`'s credentials, trying its hosts in order like
    /// libpq, and for each host libpq's sequence of TLS and plaintext attempts for the DSN's
    /// `sslmode`. An authentication failure stops at the first host that answered (libpq does
    /// the same); connection and TLS failures move on to the next host.
    pub async fn connect(
        generation: &Generation,
        params: &ServerParams,
        deadline: Instant,
    ) -> Result<Self> {
        let dsn = &generation.dsn;
        let policy = generation.tls.clone();
        let per_host = dsn.connect_timeout().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let mut last_err = ProxyError::BadDsn("the DSN names no host".into());
        for target in dsn.hosts() {
            let (host, tls_name) = match &target.host {
                HostKind::Tcp(name) => (
                    target.hostaddr.clone().unwrap_or_else(|| name.clone()),
                    name.clone(),
                ),
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
            let connect_err = |reason: String| ProxyError::Connect {
                host: host.clone(),
                port,
                reason,
            };
            for addr in addrs {
                let mut attempt = policy.attempts_for(&target.host).first().copied();
                while let Some(a) = attempt {
                    let route = CancelRoute {
                        addr,
                        host: tls_name.clone(),
                        policy: policy.clone(),
                        tls: false,
                    };
                    let result = tokio::time::timeout_at(
                        host_deadline.into(),
                        Self::login(route, generation, params, a),
                    )
                    .await;
                    attempt = None;
                    match result {
                        Ok(Ok(conn)) => return Ok(conn),
                        Ok(Err(AttemptError::Negotiation(e))) => {
                            attempt = policy.fallback(a, AttemptFailure::Negotiation(&e));
                            last_err = connect_err(e.to_string());
                        }
                        Ok(Err(AttemptError::Rejected { error, over_tls })) => {
                            attempt = policy.fallback(a, AttemptFailure::Login { over_tls });
                            if attempt.is_none() {
                                return Err(error);
                            }
                            last_err = error;
                        }
                        Ok(Err(AttemptError::Other(
                            e @ (ProxyError::UnsupportedAuth(_)
                            | ProxyError::SetRole { .. }
                            | ProxyError::BadDsn(_)),
                        ))) => return Err(e),
                        Ok(Err(AttemptError::Other(ProxyError::Io(e)))) => {
                            last_err = connect_err(e.to_string());
                        }
                        Ok(Err(AttemptError::Other(e))) => last_err = e,
                        Err(_) => last_err = connect_err("timed out".into()),
                    }
                }
            }
        }
        Err(last_err)
    }

    async fn login(
        mut route: CancelRoute,
        generation: &Generation,
        params: &ServerParams,
        attempt: Attempt,
    ) -> std::result::Result<Self, AttemptError> {
        let dsn = &generation.dsn;
        let addr = route.addr;
        let host = route.host.clone();
        let host = host.as_str();
        let user = dsn
            .user()
            .ok_or_else(|| ProxyError::BadDsn("the DSN has no user".into()))?;
        let dbname = dsn.dbname().unwrap_or(user);
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut stream = negotiate(tcp, &route.host, &route.policy, attempt)
            .await
            .map_err(AttemptError::Negotiation)?;
        route.tls = stream.is_tls();
        let over_tls = route.tls;
        let channel_binding = route.policy.channel_binding();
        let require_binding = |what: &str| {
            ProxyError::UnsupportedAuth(format!(
                "{what} while the DSN has channel_binding=require (SCRAM-SHA-256-PLUS over TLS \
                 is required); use sslmode=require or stricter with a server that offers \
                 SCRAM-SHA-256-PLUS, or relax channel_binding"
            ))
        };

        let mut out = BytesMut::with_capacity(512);
        let startup = [("user", user), ("database", dbname)]
            .into_iter()
            .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(startup, &mut out)?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        out.clear();

        let rejected = |fields: ServerErrorFields| AttemptError::Rejected {
            error: ProxyError::ServerRejected {
                host: host.to_owned(),
                port: addr.port(),
                user: user.to_owned(),
                fields: Box::new(fields),
            },
            over_tls,
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
                        return Err(
                            ProxyError::Protocol("short authentication request".into()).into()
                        );
                    }
                    let code = body.get_i32();
                    if channel_binding == ChannelBinding::Require
                        && !matches!(code, 0 | 10 | 11 | 12)
                    {
                        return Err(require_binding(
                            "the server asked for a password without SASL",
                        )
                        .into());
                    }
                    match code {
                        0 => {
                            if channel_binding == ChannelBinding::Require
                                && !scram.as_ref().is_some_and(|s| s.is_bound())
                            {
                                return Err(require_binding(
                                    "the server accepted the login without SCRAM-SHA-256-PLUS",
                                )
                                .into());
                            }
                        }
                        3 => frontend::password_message(password()?, &mut out)?,
                        5 => {
                            if body.len() < 4 {
                                return Err(ProxyError::Protocol("short md5 request".into()).into());
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
                            let binding = choose_binding(channel_binding, &stream, &mechanisms)
                                .map_err(|why| require_binding(&why))?;
                            if !mechanisms.iter().any(|m| m == binding.mechanism()) {
                                return Err(ProxyError::UnsupportedAuth(format!(
                                    "SASL with {}",
                                    mechanisms.join(", ")
                                ))
                                .into());
                            }
                            password()?;
                            let client = ScramClient::with_binding(
                                generation.scram_password.clone(),
                                generation.scram_cache.clone(),
                                binding,
                            );
                            frontend::sasl_initial_response(
                                client.mechanism(),
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
                        2 => return Err(ProxyError::UnsupportedAuth("Kerberos V5".into()).into()),
                        6 => {
                            return Err(
                                ProxyError::UnsupportedAuth("SCM credentials".into()).into()
                            );
                        }
                        7 | 8 => return Err(ProxyError::UnsupportedAuth("GSSAPI".into()).into()),
                        9 => return Err(ProxyError::UnsupportedAuth("SSPI".into()).into()),
                        other => {
                            return Err(ProxyError::UnsupportedAuth(format!("code {other}")).into());
                        }
                    }
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        out.clear();
                    }
                }
                b'E' => return Err(rejected(parse_error_fields(&body))),
                b'S' => {
                    parameter_status.push(take_parameter_status(&mut body)?);
                }
                b'K' => {
                    if body.len() < 8 {
                        return Err(ProxyError::Protocol("short BackendKeyData".into()).into());
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
            parameter_status: share_parameter_status(parameter_status),
            backend_pid: backend.0,
            backend_key: backend.1,
            created: now,
            idle_since: now,
            cancel_route: generation.cancel_route(route),
            role: generation.role.clone(),
            target: generation.target.clone(),
            txn: None,
            registry: Default::default(),
        };
        if let Some(role) = conn.role.clone() {
            conn.simple_queries(&[&format!("SET ROLE {}", quote_ident(&role))])
                .await
                .map_err(|e| match e {
                    ProxyError::Reset(message) => ProxyError::SetRole {
                        role: role.to_string(),
                        code: "42501".into(),
                        message,
                    },
                    other => other,
                })?;
        }
        Ok(conn)
    }

    /// The role dbproxy sets on this connection (`--set-role` / `--set-base-role`).
    pub fn policy_role(&self) -> Option<&str> {
        self.role.as_deref()
    }

    /// Runs one simple query and returns its rows as text (NULL as None). For dbproxy's own
    /// questions to the server (session state before a move); never for client traffic.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(sql, &mut out)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let (tag, mut body) =
                read_message(&mut self.stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
            match tag {
                b'D' => {
                    if body.len() < 2 {
                        return Err(ProxyError::Protocol("short DataRow".into()));
                    }
                    let n = body.get_i16().max(0) as usize;
                    let mut row = Vec::with_capacity(n);
                    for _ in 0..n {
                        if body.len() < 4 {
                            return Err(ProxyError::Protocol("short DataRow".into()));
                        }
                        let len = body.get_i32();
                        if len < 0 {
                            row.push(None);
                        } else {
                            let len = len as usize;
                            if body.len() < len {
                                return Err(ProxyError::Protocol("short DataRow".into()));
                            }
                            let v = body.split_to(len);
                            row.push(Some(String::from_utf8_lossy(&v).into_owned()));
                        }
                    }
                    rows.push(row);
                }
                b'E' => {
                    failure.get_or_insert_with(|| bookkeeping_failure(&body));
                }
                b'S' => self.note_parameter_status(&mut body)?,
                b'Z' => break,
                _ => {}
            }
        }
        if !buf.is_empty() {
            return Err(ProxyError::Reset("unexpected data after a query".into()));
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    fn note_parameter_status(&mut self, body: &mut BytesMut) -> Result<()> {
        let (name, value) = take_parameter_status(body)?;
        set_parameter_status(&mut self.parameter_status, &name, &value);
        Ok(())
    }

    /// Re-creates session state on this connection in one round trip: simple queries first
    /// (settings, SQL PREPARE), then protocol-level Parse messages (name, text, parameter
    /// type OIDs) and a Sync, then `after` (COMMIT). Any error fails the whole replay.
    pub async fn replay(
        &mut self,
        queries: &[String],
        parses: &[(String, String, Vec<u32>)],
        after: &[String],
    ) -> Result<()> {
        let mut out = BytesMut::with_capacity(256);
        for q in queries {
            frontend::query(q, &mut out)?;
        }
        for (name, text, types) in parses {
            frontend::parse(name, text, types.iter().copied(), &mut out)?;
        }
        let mut remaining = queries.len() + after.len();
        if !parses.is_empty() {
            frontend::sync(&mut out);
            remaining += 1;
        }
        for q in after {
            frontend::query(q, &mut out)?;
        }
        if remaining == 0 {
            return Ok(());
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut failure = None;
        while remaining > 0 {
            let (tag, mut body) =
                read_message(&mut self.stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
            match tag {
                b'Z' => remaining -= 1,
                b'E' => {
                    failure.get_or_insert_with(|| bookkeeping_failure(&body));
                }
                b'S' => self.note_parameter_status(&mut body)?,
                _ => {}
            }
        }
        if !buf.is_empty() {
            return Err(ProxyError::Reset("unexpected data after a replay".into()));
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends simple queries in one write and reads until each has its ReadyForQuery,
    /// recording ParameterStatus changes. Any ErrorResponse fails the whole reset.
    async fn simple_queries(&mut self, queries: &[&str]) -> Result<()> {
        let mut out = BytesMut::with_capacity(64);
        for q in queries {
            frontend::query(q, &mut out)?;
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut remaining = queries.len();
        let mut failure = None;
        while remaining > 0 {
            let (tag, mut body) =
                read_message(&mut self.stream, &mut buf, MAX_LOGIN_MESSAGE).await?;
            match tag {
                b'Z' => remaining -= 1,
                b'E' => {
                    failure.get_or_insert_with(|| bookkeeping_failure(&body));
                }
                b'S' => self.note_parameter_status(&mut body)?,
                _ => {}
            }
        }
        if !buf.is_empty() {
            return Err(ProxyError::Reset("unexpected data after reset".into()));
        }
        match failure {
            Some(e) => Err(e),
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
        // DISCARD ALL drops prepared statements and settings, whatever transaction pooling
        // left here.
        self.txn = None;
        match tokio::time::timeout(RESET_TIMEOUT, self.simple_queries(&queries)).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Timeout("resetting a server connection")),
        }
    }

    /// A cheap check that the server has not closed the connection (or sent an unsolicited
    /// FATAL) while it sat idle. Over TLS the socket is peeked, never read, so no record is
    /// taken from under the TLS layer: any byte waiting on an idle connection means trouble.
    pub fn is_alive(&self) -> bool {
        match &self.stream {
            PgStream::Plain(tcp) => {
                // Nothing arrived since its last read ended in WouldBlock: alive, known from
                // the socket's readiness alone (once per transaction-mode transaction).
                if !crate::ready::ReadHint::may_read(tcp) {
                    return true;
                }
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            PgStream::Tls(tls) => {
                let mut probe = [0u8; 1];
                let mut buf = tokio::io::ReadBuf::new(&mut probe);
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                tls.get_ref().0.poll_peek(&mut cx, &mut buf).is_pending()
            }
            PgStream::Detached => false,
        }
    }

    /// Closes politely (Terminate) without waiting.
    pub fn close(self) {
        match self.stream {
            PgStream::Plain(tcp) => {
                let _ = tcp.try_write(&[b'X', 0, 0, 0, 4]);
            }
            PgStream::Tls(mut tls) => {
                // Terminate and close_notify need the TLS layer: send them in the background.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            tls.write_all(&[b'X', 0, 0, 0, 4]).await?;
                            tls.shutdown().await
                        })
                        .await;
                    });
                }
            }
            PgStream::Detached => {}
        }
    }
}

/// Picks the SCRAM channel binding as libpq does: `-PLUS` when the connection is TLS, the
/// server offers it and the DSN does not disable it; an error (the reason) when the DSN
/// requires it and it cannot be had.
fn choose_binding(
    mode: ChannelBinding,
    stream: &PgStream,
    mechanisms: &[String],
) -> std::result::Result<Gs2Binding, String> {
    if mode == ChannelBinding::Disable {
        return Ok(Gs2Binding::NotSupported);
    }
    let offered = mechanisms.iter().any(|m| m == "SCRAM-SHA-256-PLUS");
    let end_point = stream.tls_server_end_point();
    match (end_point, offered) {
        (Some(data), true) => Ok(Gs2Binding::TlsServerEndPoint(data)),
        _ if mode == ChannelBinding::Require => Err(if !stream.is_tls() {
            "the server connection is not encrypted".into()
        } else if !offered {
            "the server does not offer SCRAM-SHA-256-PLUS".into()
        } else {
            "the server's certificate uses a signature algorithm without a \
             tls-server-end-point hash"
                .into()
        }),
        (Some(_), false) => Ok(Gs2Binding::NotOffered),
        (None, _) => Ok(Gs2Binding::NotSupported),
    }
}

/// How long forwarding a cancel may take, from connecting to PostgreSQL to its closing the
/// connection (pgbouncer's `cancel_wait_timeout` is 10 s too).
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a CancelRequest for a backend over a fresh connection, as PostgreSQL requires, with
/// the same TLS as the backend's own session, and waits until PostgreSQL closes it.
///
/// PostgreSQL answers a cancel with nothing and closes the connection once it has signaled
/// the backend. Until then the signal may still be on its way, and a backend given to another
/// client in the meantime would cancel that client's query (pgbouncer#717's second race): the
/// caller keeps the backend marked as canceled until this returns.
pub async fn send_cancel(route: &CancelRoute, pid: i32, key: i32) -> Result<()> {
    let mut out = BytesMut::with_capacity(16);
    frontend::cancel_request(pid, key, &mut out);
    let fut = async {
        let tcp = TcpStream::connect(route.addr).await?;
        let attempt = if !route.tls {
            Attempt::Plain
        } else if route.policy.attempts().contains(&Attempt::TlsRequired) {
            Attempt::TlsRequired
        } else {
            Attempt::TlsIfOffered
        };
        let mut stream = negotiate(tcp, &route.host, &route.policy, attempt)
            .await
            .map_err(|e| ProxyError::Connect {
                host: route.host.clone(),
                port: route.addr.port(),
                reason: e.to_string(),
            })?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        // PostgreSQL sends nothing back: any bytes, the end of the stream, or a TLS session
        // cut without close_notify all mean it is done with the request.
        let mut byte = [0u8; 1];
        let _ = stream.read(&mut byte).await;
        Ok::<_, ProxyError>(())
    };
    match tokio::time::timeout(CANCEL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout("sending a cancel request")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_parameter_status_is_shared() {
        let list = |tz: &str| {
            vec![
                ("TimeZone".to_owned(), tz.to_owned()),
                ("server_version".to_owned(), "15".to_owned()),
            ]
        };
        let a = share_parameter_status(list("UTC"));
        let b = share_parameter_status(list("UTC"));
        assert!(Arc::ptr_eq(&a, &b));
        let mut c = share_parameter_status(list("Europe/Paris"));
        assert!(!Arc::ptr_eq(&a, &c));
        set_parameter_status(&mut c, "TimeZone", "UTC");
        assert!(Arc::ptr_eq(&a, &c), "copy on write finds the shared copy");
        // Once every holder is gone, an equal list gets a fresh copy, not a dangling one.
        drop((a, b, c));
        let d = share_parameter_status(list("UTC"));
        assert_eq!(*d, *list("UTC"));
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
