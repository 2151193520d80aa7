//! A client's connection from accept to goodbye: TLS if asked, startup packet, client
//! authentication, a server connection from the pool, the login replay, the session, and the
//! release.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbcred::tls::PgStream;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::scram_server::ScramVerifier;
use crate::cancel::{CancelMap, CancelTarget};
use crate::error::{ProxyError, Result};
use crate::pool::Pool;
use crate::protocol::backend;
use crate::protocol::framing::read_message;
use crate::protocol::frontend::parse_sasl_initial_response;
use crate::protocol::startup::{StartupParams, StartupRequest, parse_startup, read_startup_packet};
use crate::proxy::{SessionEnd, run_session};
use crate::server::{CancelRoute, send_cancel};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::{ClientStream, ClientTls, ClientTlsMode, run_session_any};

/// Largest SASL message a client may send during login.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// What every client task needs, shared.
pub struct ClientContext {
    pub pool: Arc<Pool>,
    pub cancels: Arc<CancelMap>,
    pub stats: Arc<Stats>,
    /// Verifier for clients on non-loopback listeners.
    pub scram: Option<Arc<ScramVerifier>>,
    pub login_timeout: Duration,
    pub pool_timeout: Duration,
    pub max_client_message: usize,
    /// What the listeners do with SSLRequest, and their certificate.
    pub client_tls: ClientTls,
    /// How to reach each backend serving a client now, for forwarding cancels (same TLS as
    /// the backend's session).
    pub cancel_routes: CancelRoutes,
}

/// Cancel routes by backend (address, pid), registered while a client holds the backend.
#[derive(Default)]
pub struct CancelRoutes {
    routes: Mutex<HashMap<(SocketAddr, i32), CancelRoute>>,
}

impl CancelRoutes {
    fn insert(&self, pid: i32, route: &CancelRoute) {
        if let Ok(mut m) = self.routes.lock() {
            m.insert((route.addr, pid), route.clone());
        }
    }

    fn remove(&self, addr: SocketAddr, pid: i32) {
        if let Ok(mut m) = self.routes.lock() {
            m.remove(&(addr, pid));
        }
    }

    fn get(&self, addr: SocketAddr, pid: i32) -> Option<CancelRoute> {
        self.routes.lock().ok()?.get(&(addr, pid)).cloned()
    }
}

/// What the startup phase produced.
enum Startup {
    /// A session to serve, with any bytes the client sent behind its startup packet.
    Session(StartupParams, BytesMut),
    /// Done already (cancel request, refused version).
    Done,
}

/// Serves one client connection to its end. Errors are answered to the client where the
/// protocol allows and logged at debug level; nothing here can affect another client.
pub async fn serve_client(
    socket: TcpStream,
    peer: SocketAddr,
    require_password: bool,
    ctx: Arc<ClientContext>,
    shutdown: Shutdown,
) {
    let _ = socket.set_nodelay(true);
    let mut socket = ClientStream::Plain(socket);
    let mut out = BytesMut::with_capacity(1024);
    let login = tokio::time::timeout(
        ctx.login_timeout,
        login(&mut socket, require_password, &ctx, &mut out),
    )
    .await;
    let params = match login {
        Ok(Ok(Startup::Session(params, early))) => (params, early),
        Ok(Ok(Startup::Done)) => return,
        Ok(Err(e)) => {
            ctx.stats.client_login_failures.increment(1);
            tracing::debug!(%peer, error = %e, "client login failed");
            send_error(&mut socket, &mut out, &e).await;
            return;
        }
        Err(_) => {
            ctx.stats.client_login_failures.increment(1);
            tracing::debug!(%peer, "client did not finish its startup in time");
            let e = ProxyError::Timeout("waiting for the client's startup packet");
            send_error(&mut socket, &mut out, &e).await;
            return;
        }
    };
    let (params, early) = params;
    if crate::admin::is_admin_database(&params) {
        return crate::admin::serve(&mut socket, peer, params, &ctx).await;
    }
    if let Err(e) = session(&mut socket, peer, params, early, &ctx, &mut out, shutdown).await {
        tracing::debug!(%peer, error = %e, "client session ended with an error");
        send_error(&mut socket, &mut out, &e).await;
    }
}

async fn send_error(socket: &mut ClientStream, out: &mut BytesMut, e: &ProxyError) {
    out.clear();
    match e {
        // Relay the server's own words when it refused the login.
        ProxyError::ServerRejected { fields, .. } => backend::error_response(
            out,
            "FATAL",
            &fields.code,
            &fields.message,
            fields.detail.as_deref(),
            fields.hint.as_deref(),
        ),
        ProxyError::Io(_) => return,
        other => backend::fatal(out, other.sqlstate(), &format!("dbproxy: {other}")),
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        socket.write_all(out).await?;
        socket.flush().await
    })
    .await;
}

/// Startup packet(s) and client authentication.
async fn login(
    socket: &mut ClientStream,
    require_password: bool,
    ctx: &ClientContext,
    out: &mut BytesMut,
) -> Result<Startup> {
    let mut buf = BytesMut::with_capacity(256);
    // At most one SSLRequest and one GSSENCRequest precede the StartupMessage.
    for _ in 0..3 {
        let body = read_startup_packet(socket, &mut buf).await?;
        match parse_startup(body)? {
            request @ (StartupRequest::Ssl | StartupRequest::GssEnc) => {
                if !buf.is_empty() {
                    // Bytes that arrived with the request would be read as plaintext after a
                    // TLS handshake the client thinks happened (CVE-2021-23222 style).
                    return Err(ProxyError::Protocol(
                        "data received after an encryption request".into(),
                    ));
                }
                let acceptor = match (&request, &ctx.client_tls.acceptor) {
                    (StartupRequest::Ssl, Some(acceptor)) if !socket.is_tls() => acceptor,
                    _ => {
                        socket.write_all(b"N").await?;
                        socket.flush().await?;
                        continue;
                    }
                };
                socket.write_all(b"S").await?;
                socket.flush().await?;
                let ClientStream::Plain(tcp) = std::mem::replace(socket, ClientStream::Closed)
                else {
                    return Err(ProxyError::Protocol("TLS requested twice".into()));
                };
                let tls = acceptor.acceptor().accept(tcp).await.map_err(|e| {
                    ProxyError::Protocol(format!("client TLS handshake failed: {e}"))
                })?;
                *socket = ClientStream::Tls(Box::new(tls));
            }
            StartupRequest::Cancel { pid, key } => {
                if let Some((target, _in_flight)) = ctx.cancels.lookup(pid, key) {
                    match ctx.cancel_routes.get(target.addr, target.pid) {
                        Some(route) => {
                            if let Err(e) = send_cancel(&route, target.pid, target.key).await {
                                tracing::debug!(error = %e, "forwarding a cancel request failed");
                            }
                        }
                        None => tracing::debug!("cancel request for a backend no longer in use"),
                    }
                }
                return Ok(Startup::Done);
            }
            StartupRequest::UnsupportedVersion { major, minor } => {
                return Err(ProxyError::Protocol(format!(
                    "unsupported frontend protocol {major}.{minor}: dbproxy supports 3.0"
                )));
            }
            StartupRequest::Startup { minor, params } => {
                if ctx.client_tls.mode == ClientTlsMode::Require && !socket.is_tls() {
                    return Err(ProxyError::ServerRejected {
                        host: "dbproxy".into(),
                        port: 0,
                        user: params.user.clone().unwrap_or_default(),
                        fields: Box::new(crate::error::ServerErrorFields {
                            severity: "FATAL".into(),
                            code: "28000".into(),
                            message: "dbproxy requires TLS on this listener (--client-tls require)"
                                .into(),
                            detail: None,
                            hint: Some("connect with sslmode=require or stricter".into()),
                        }),
                    });
                }
                if minor > 0 || !params.protocol_options.is_empty() {
                    out.clear();
                    backend::negotiate_protocol_version(out, 0, &params.protocol_options);
                    socket.write_all(out).await?;
                    socket.flush().await?;
                }
                if let Some((_, v)) = params.forwarded.iter().find(|(k, _)| k == "replication")
                    && !matches!(
                        v.to_ascii_lowercase().as_str(),
                        "false" | "off" | "no" | "0"
                    )
                {
                    return Err(ProxyError::Protocol(
                        "replication connections are not supported through dbproxy; connect to the server directly".into(),
                    ));
                }
                if require_password {
                    authenticate(
                        socket,
                        &mut buf,
                        ctx,
                        out,
                        params.user.as_deref().unwrap_or(""),
                    )
                    .await?;
                }
                return Ok(Startup::Session(params, buf));
            }
        }
    }
    Err(ProxyError::Protocol("too many encryption requests".into()))
}

/// SCRAM-SHA-256 against `--client-password-file`.
async fn authenticate(
    socket: &mut ClientStream,
    buf: &mut BytesMut,
    ctx: &ClientContext,
    out: &mut BytesMut,
    user: &str,
) -> Result<()> {
    let failed = || ProxyError::ServerRejected {
        host: "dbproxy".into(),
        port: 0,
        user: user.to_owned(),
        fields: Box::new(crate::error::ServerErrorFields {
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: format!("password authentication failed for user \"{user}\""),
            detail: None,
            hint: None,
        }),
    };
    let Some(verifier) = ctx.scram.as_ref() else {
        return Err(ProxyError::Config(
            "this listener requires a client password but none is configured".into(),
        ));
    };
    let mut exchange = verifier.exchange();
    out.clear();
    backend::authentication_sasl(out);
    socket.write_all(out).await?;
    socket.flush().await?;
    let (tag, body) = read_message(socket, buf, MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(failed());
    }
    let (mechanism, data) = parse_sasl_initial_response(body)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(ProxyError::Protocol(format!(
            "SASL mechanism {mechanism:?} is not offered"
        )));
    }
    let server_first = exchange.server_first(&data)?;
    out.clear();
    backend::authentication_sasl_continue(out, &server_first);
    socket.write_all(out).await?;
    socket.flush().await?;
    let (tag, body) = read_message(socket, buf, MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(failed());
    }
    match exchange.server_final(&body)? {
        Some(server_final) => {
            out.clear();
            backend::authentication_sasl_final(out, &server_final);
            socket.write_all(out).await?;
            socket.flush().await?;
            Ok(())
        }
        None => Err(failed()),
    }
}

/// Gets a server, replays the login to the client, forwards, and releases.
async fn session(
    socket: &mut ClientStream,
    peer: SocketAddr,
    params: StartupParams,
    early: BytesMut,
    ctx: &ClientContext,
    out: &mut BytesMut,
    mut shutdown: Shutdown,
) -> Result<()> {
    // Usually empty: release the login buffer instead of carrying it through the session.
    let early = if early.is_empty() {
        BytesMut::new()
    } else {
        early
    };
    let tracked = crate::admin::track_client(ctx, peer, &params);
    let server_params = Arc::new(params.forwarded);
    let deadline = Instant::now() + ctx.pool_timeout;
    let mut server = tokio::select! {
        s = ctx.pool.acquire(&server_params, deadline) => s?,
        _ = shutdown.recv() => return Err(ProxyError::ShuttingDown),
    };
    tracked.set_server(Some(server.backend_pid));
    // If this task panics or is dropped before the release below, the slot is given back.
    let slot = ctx.pool.slot_guard();
    let cancel_key = ctx.cancels.register();
    ctx.cancel_routes
        .insert(server.backend_pid, &server.cancel_route);
    cancel_key.set_target(Some(CancelTarget {
        addr: server.peer,
        pid: server.backend_pid,
        key: server.backend_key,
    }));

    out.clear();
    backend::authentication_ok(out);
    for (name, value) in &server.parameter_status {
        backend::parameter_status(out, name, value);
    }
    backend::backend_key_data(out, cancel_key.pid, cancel_key.key);
    backend::ready_for_query(out, b'I');
    let replayed = match socket.write_all(out).await {
        Ok(()) => socket.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = replayed {
        drop(cancel_key);
        ctx.cancel_routes.remove(server.peer, server.backend_pid);
        slot.disarm();
        ctx.pool.release(server, true).await;
        return Err(e.into());
    }
    // Nothing is kept per idle session: the forwarding loop reads into stack buffers.
    *out = BytesMut::new();

    // Plaintext on both sides keeps the TcpStream fast path; TLS on either side takes the
    // generic loop.
    let outcome = match (&mut *socket, &mut server.stream) {
        (ClientStream::Plain(client), PgStream::Plain(backend)) => {
            run_session(client, backend, ctx.max_client_message, &early).await
        }
        (client, backend) => run_session_any(client, backend, ctx.max_client_message, &early).await,
    };
    drop(early);
    // Unregister first, then let cancels already on their way land: a cancel must never
    // reach the backend once it may serve someone else.
    drop(cancel_key);
    ctx.cancels
        .wait_no_cancel_in_flight(server.peer, server.backend_pid)
        .await;
    ctx.cancel_routes.remove(server.peer, server.backend_pid);
    tracing::trace!(%peer, end = ?outcome.end, clean = outcome.server_clean, "session ended");
    slot.disarm();
    ctx.pool.release(server, outcome.server_clean).await;
    match outcome.end {
        SessionEnd::ClientMessageTooLarge(len) => Err(ProxyError::Protocol(format!(
            "client message of {len} bytes exceeds the limit of {} bytes (--max-client-message)",
            ctx.max_client_message
        ))),
        SessionEnd::ClientProtocol(e) => Err(ProxyError::Protocol(e)),
        _ => Ok(()),
    }
}
