//! A client's connection from accept to goodbye: startup packet, client authentication, a
//! server connection from the pool, the login replay, the session, and the release.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
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
use crate::server::send_cancel;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

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
    mut socket: TcpStream,
    peer: SocketAddr,
    require_password: bool,
    ctx: Arc<ClientContext>,
    shutdown: Shutdown,
) {
    let _ = socket.set_nodelay(true);
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
    if let Err(e) = session(&mut socket, peer, params, early, &ctx, &mut out, shutdown).await {
        tracing::debug!(%peer, error = %e, "client session ended with an error");
        send_error(&mut socket, &mut out, &e).await;
    }
}

async fn send_error(socket: &mut TcpStream, out: &mut BytesMut, e: &ProxyError) {
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
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.write_all(out)).await;
}

/// Startup packet(s) and client authentication.
async fn login(
    socket: &mut TcpStream,
    require_password: bool,
    ctx: &ClientContext,
    out: &mut BytesMut,
) -> Result<Startup> {
    let mut buf = BytesMut::with_capacity(256);
    // At most one SSLRequest and one GSSENCRequest precede the StartupMessage.
    for _ in 0..3 {
        let body = read_startup_packet(socket, &mut buf).await?;
        match parse_startup(body)? {
            StartupRequest::Ssl | StartupRequest::GssEnc => {
                if !buf.is_empty() {
                    // Bytes that arrived with the request would be read as plaintext after a
                    // TLS handshake the client thinks happened (CVE-2021-23222 style).
                    return Err(ProxyError::Protocol(
                        "data received after an encryption request".into(),
                    ));
                }
                socket.write_all(b"N").await?;
            }
            StartupRequest::Cancel { pid, key } => {
                if let Some((target, _in_flight)) = ctx.cancels.lookup(pid, key)
                    && let Err(e) = send_cancel(target.addr, target.pid, target.key).await
                {
                    tracing::debug!(error = %e, "forwarding a cancel request failed");
                }
                return Ok(Startup::Done);
            }
            StartupRequest::UnsupportedVersion { major, minor } => {
                return Err(ProxyError::Protocol(format!(
                    "unsupported frontend protocol {major}.{minor}: dbproxy supports 3.0"
                )));
            }
            StartupRequest::Startup { minor, params } => {
                if minor > 0 || !params.protocol_options.is_empty() {
                    out.clear();
                    backend::negotiate_protocol_version(out, 0, &params.protocol_options);
                    socket.write_all(out).await?;
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
    socket: &mut TcpStream,
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
    let (tag, body) = read_message(socket, buf, MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(failed());
    }
    match exchange.server_final(&body)? {
        Some(server_final) => {
            out.clear();
            backend::authentication_sasl_final(out, &server_final);
            socket.write_all(out).await?;
            Ok(())
        }
        None => Err(failed()),
    }
}

/// Gets a server, replays the login to the client, forwards, and releases.
async fn session(
    socket: &mut TcpStream,
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
    let server_params = Arc::new(params.forwarded);
    let deadline = Instant::now() + ctx.pool_timeout;
    let mut server = tokio::select! {
        s = ctx.pool.acquire(&server_params, deadline) => s?,
        _ = shutdown.recv() => return Err(ProxyError::ShuttingDown),
    };
    // If this task panics or is dropped before the release below, the slot is given back.
    let slot = ctx.pool.slot_guard();
    let cancel_key = ctx.cancels.register();
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
    if let Err(e) = socket.write_all(out).await {
        drop(cancel_key);
        slot.disarm();
        ctx.pool.release(server, true).await;
        return Err(e.into());
    }
    // Nothing is kept per idle session: the forwarding loop reads into stack buffers.
    *out = BytesMut::new();

    let outcome = run_session(socket, &mut server.stream, ctx.max_client_message, &early).await;
    drop(early);
    // Unregister first, then let cancels already on their way land: a cancel must never
    // reach the backend once it may serve someone else.
    drop(cancel_key);
    ctx.cancels
        .wait_no_cancel_in_flight(server.peer, server.backend_pid)
        .await;
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
