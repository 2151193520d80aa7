//! Listening sockets: resolving and binding `--addr`, the accept loop, and the client limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::client::{ClientConn, ClientContext, serve_client};
use crate::error::{ProxyError, Result};
use crate::protocol::backend;
use crate::shutdown::Shutdown;

/// Resolves `--addr` values (`127.0.0.1:5432`, `[::1]:5432`, `localhost:5432`).
pub async fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ProxyError::Config(format!("cannot resolve --addr {addr}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(ProxyError::Config(format!(
            "--addr {addr} resolves to no address"
        )));
    }
    Ok(addrs)
}

/// A bound listener and whether clients on it must present the client password.
pub struct BoundListener {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub require_password: bool,
}

/// Binds every address; an address that cannot be bound is logged and skipped (for
/// example `::1` in a pod without IPv6), and only binding none at all is an error.
pub async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<BoundListener>> {
    let mut bound = Vec::new();
    let mut failures = Vec::new();
    for &addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(addr = %local, "listening for PostgreSQL clients");
                bound.push(BoundListener {
                    listener,
                    addr: local,
                    require_password: !addr.ip().is_loopback(),
                });
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "could not bind a listener; continuing with the others");
                failures.push(format!("{addr}: {e}"));
            }
        }
    }
    if bound.is_empty() {
        return Err(ProxyError::Config(format!(
            "no listener could be bound ({})",
            failures.join("; ")
        )));
    }
    Ok(bound)
}

/// Counts connected clients; the guard decrements on drop so a panicking task still
/// gives its slot back.
pub struct ClientCounter {
    count: AtomicUsize,
}

pub struct ClientSlot {
    counter: Arc<ClientCounter>,
    ctx: Arc<ClientContext>,
}

impl ClientCounter {
    pub fn new() -> Arc<Self> {
        Arc::new(ClientCounter {
            count: AtomicUsize::new(0),
        })
    }
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// What a client that leaves frees, roughly (an idle one kept 1 to 3 kB).
const FREED_BY_A_CLIENT: usize = 2048;

impl ClientSlot {
    pub fn ctx(&self) -> &Arc<ClientContext> {
        &self.ctx
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let n = self.counter.count.fetch_sub(1, Ordering::Relaxed) - 1;
        self.ctx.stats.clients.set(n as f64);
        // The client's connection, state and task go with it.
        crate::memory::freed(FREED_BY_A_CLIENT);
    }
}

/// Accepts clients until shutdown; each one runs in its own task.
pub async fn accept_loop(
    bound: BoundListener,
    ctx: Arc<ClientContext>,
    counter: Arc<ClientCounter>,
    max_clients: usize,
    mut shutdown: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            a = bound.listener.accept() => a,
            _ = shutdown.recv() => return,
        };
        let (mut socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                tracing::warn!(addr = %bound.addr, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let n = counter.count.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = ClientSlot {
            counter: counter.clone(),
            ctx: ctx.clone(),
        };
        ctx.stats.clients.set(n as f64);
        if n > max_clients {
            tokio::spawn(async move {
                let _slot = slot;
                let mut out = BytesMut::new();
                backend::fatal(
                    &mut out,
                    "53300",
                    "dbproxy: too many clients already; raise --max-clients",
                );
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), socket.write_all(&out))
                        .await;
            });
            continue;
        }
        let conn = ClientConn::new(
            socket,
            peer,
            bound.require_password,
            ctx.clone(),
            shutdown.clone(),
            slot,
        );
        // No span per client (a span costs ~370 bytes of subscriber state per connection):
        // client events carry `peer` and, once registered, `client` (SHOW CLIENTS' id).
        tokio::spawn(serve_client(conn));
    }
}
