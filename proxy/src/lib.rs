//! dbproxy: a PostgreSQL proxy that logs in with whatever the mounted Secret holds now.
//!
//! A query's path: `listener` accepts, `client` reads the startup and authenticates,
//! `pool` hands out a `server` connection logged in with the current `credentials`
//! generation, `proxy` forwards bytes, and `pool` resets and keeps the server afterwards.

/// The pgbouncer-compatible admin console (database `pgbouncer` or `dbproxy`).
pub mod admin;
/// Client-facing SCRAM-SHA-256 verification for non-loopback listeners.
pub mod auth;
/// Synthetic cancel keys and routing of CancelRequests to the right backend.
pub mod cancel;
/// A client's connection: startup, authentication, login replay, session, release.
pub mod client;
/// Command line flags and their defaults.
pub mod config;
/// Credential generations: watching, validating and publishing DSNs.
pub mod credentials;
/// Custom settings (`app.tenant_id`): their names, read from the client's statements.
pub mod custom;
/// The crate's error type.
pub mod error;
/// Idle client connections parked out of the runtime until they speak again.
pub mod lane;
/// Binding listeners and accepting clients.
pub mod listener;
/// Handing free memory back to the system after clients park or leave.
pub mod memory;
/// Moving live sessions to new server connections at safe points (rotation, migration).
pub mod migrate;
/// /healthz, /readyz and /metrics.
pub mod ops;
pub mod park;
/// Server connections kept for reuse, limits, waiting and the janitor.
pub mod pool;
/// Wire protocol: startup packets, message framing, messages we read and write.
pub mod protocol;
/// The forwarding loop between a client and its server.
pub mod proxy;
/// Read polls skipped while a socket's waker is registered and nothing arrived.
pub mod ready;
/// Logging in to PostgreSQL, resetting and cancelling server connections.
pub mod server;
/// Startup and shutdown of the whole proxy.
pub mod service;
/// The shutdown signal passed to every task.
pub mod shutdown;
/// Just enough SQL lexing to know when to ask the server about session state.
pub mod sql;
/// Metric handles.
pub mod stats;
/// TLS towards clients (SSLRequest, certificate, mode) and the forwarding loop for TLS sessions.
pub mod tls;
/// Transaction-mode clients served out of the runtime (`--transaction-lane`).
pub mod txlane;
/// Transaction pooling: the per-transaction forwarding loop and the session kept between.
pub mod txn;
/// Waker lists for events that wake many waiting tasks at once.
pub mod wake;

/// Locks `mutex`, recovering it if a panic poisoned it: dbproxy's critical sections are a
/// few field updates, so a panic inside one cannot leave the data inconsistent.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
