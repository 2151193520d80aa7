//! The admin console: a client that connects to database `pgbouncer` or `dbproxy` gets a
//! pgbouncer-compatible command session (simple query protocol) instead of a server.

mod control;
mod show;
mod wire;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use clap::Parser;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::client::ClientContext;
use crate::config::{Cli, RunArgs};
use crate::error::{ProxyError, Result};
use crate::protocol::backend;
use crate::protocol::framing::read_message;
use crate::protocol::startup::StartupParams;
use crate::stats::{ClientEntry, ClientGuard, ClientState, Names};

/// Database names that open the admin console.
pub const ADMIN_DATABASES: [&str; 2] = ["pgbouncer", "dbproxy"];

/// Largest admin command accepted.
const MAX_COMMAND: usize = 64 * 1024;

/// What the console needs beyond the pool: who may use it and what to show as config.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The user name that may use the console from a non-loopback listener.
    pub admin_user: Option<String>,
    /// `SHOW CONFIG` rows: key, value, default.
    pub config: Vec<(String, String, String)>,
    pub started: Instant,
}

impl AdminSettings {
    pub fn new(args: &RunArgs) -> Self {
        AdminSettings {
            admin_user: args.admin_user.clone(),
            config: config_rows(args),
            started: Instant::now(),
        }
    }
}

/// Whether the client asked for the admin console.
pub fn is_admin_database(params: &StartupParams) -> bool {
    params
        .database
        .as_deref()
        .is_some_and(|d| ADMIN_DATABASES.contains(&d))
}

/// Why a client may not use the console, if it may not. Loopback clients may; on other
/// listeners only the configured admin user (who has already proven the client password).
pub fn refusal(peer: SocketAddr, user: Option<&str>, admin_user: Option<&str>) -> Option<String> {
    if peer.ip().is_loopback() {
        return None;
    }
    match admin_user {
        Some(admin) if user == Some(admin) => None,
        Some(_) => Some(
            "dbproxy: the admin console accepts only loopback clients or the user named by --admin-user"
                .into(),
        ),
        None => Some(
            "dbproxy: the admin console accepts only loopback clients (start dbproxy with --admin-user NAME to allow NAME from other addresses)"
                .into(),
        ),
    }
}

/// Lists a client in the registry (SHOW CLIENTS) until the guard drops; it starts waiting.
pub fn track_client(ctx: &ClientContext, peer: SocketAddr, params: &StartupParams) -> ClientGuard {
    let stats = ctx.pool.stats();
    stats.add_client(client_entry(
        stats.registry.next_id(),
        peer,
        params,
        ClientState::Waiting,
    ))
}

fn client_entry(
    id: u64,
    peer: SocketAddr,
    params: &StartupParams,
    state: ClientState,
) -> ClientEntry {
    let now = crate::stats::Stamp::now();
    ClientEntry {
        id,
        names: Names::new(
            params.user.as_deref().unwrap_or_default(),
            params.database.as_deref().unwrap_or_default(),
            params
                .forwarded
                .iter()
                .find(|(k, _)| k == "application_name")
                .map(|(_, v)| v.as_str())
                .unwrap_or_default(),
        ),
        addr: peer,
        state,
        connect_time: now,
        request_time: now,
    }
}

/// Serves an admin session to its end. Called by the client task after login instead of
/// acquiring a server.
pub async fn serve<S>(socket: &mut S, peer: SocketAddr, params: StartupParams, ctx: &ClientContext)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(1024);
    let settings = ctx.pool.admin_settings();
    let admin_user = settings.as_ref().and_then(|s| s.admin_user.as_deref());
    if let Some(why) = refusal(peer, params.user.as_deref(), admin_user) {
        tracing::warn!(%peer, "admin console refused");
        backend::fatal(&mut out, "28000", &why);
        let _ = socket.write_all(&out).await;
        let _ = socket.flush().await;
        return;
    }
    let stats = ctx.pool.stats();
    let entry = stats.add_client(client_entry(
        stats.registry.next_id(),
        peer,
        &params,
        ClientState::Admin,
    ));
    tracing::info!(%peer, client = entry.id(), "admin console session started");
    if let Err(e) = session(socket, ctx, &mut out).await
        && !matches!(e, ProxyError::Io(_))
    {
        tracing::debug!(%peer, error = %e, "admin console session ended with an error");
        out.clear();
        backend::fatal(&mut out, e.sqlstate(), &format!("dbproxy: {e}"));
        let _ = socket.write_all(&out).await;
        let _ = socket.flush().await;
    }
}

async fn session<S>(socket: &mut S, ctx: &ClientContext, out: &mut BytesMut) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    out.clear();
    backend::authentication_ok(out);
    for (name, value) in [
        ("server_version", "15.0 (dbproxy admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        backend::parameter_status(out, name, value);
    }
    backend::backend_key_data(out, 0, 0);
    backend::ready_for_query(out, b'I');
    socket.write_all(out).await?;
    socket.flush().await?;

    let mut buf = BytesMut::with_capacity(1024);
    // After an extended-protocol message, skip until Sync (like a server after an error).
    let mut skipping = false;
    loop {
        let (tag, body) = read_message(socket, &mut buf, MAX_COMMAND).await?;
        out.clear();
        match tag {
            b'Q' => {
                let text = std::str::from_utf8(&body[..body.len().saturating_sub(1)])
                    .map_err(|_| ProxyError::Protocol("query is not valid UTF-8".into()))?;
                run_query(text, ctx, out);
                backend::ready_for_query(out, b'I');
            }
            b'X' => return Ok(()),
            b'S' => {
                skipping = false;
                backend::ready_for_query(out, b'I');
            }
            _ if skipping => continue,
            _ => {
                skipping = true;
                backend::error_response(
                    out,
                    "ERROR",
                    "0A000",
                    "the dbproxy admin console supports only the simple query protocol",
                    None,
                    Some("with psql this just works; with a driver use its simple-query call"),
                );
            }
        }
        socket.write_all(out).await?;
        socket.flush().await?;
    }
}

/// Runs every `;`-separated command of a simple query; stops at the first error.
fn run_query(text: &str, ctx: &ClientContext, out: &mut BytesMut) {
    let commands: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if commands.is_empty() {
        wire::empty_query(out);
        return;
    }
    for command in commands {
        if let Err((code, message)) = run_command(command, ctx, out) {
            backend::error_response(out, "ERROR", code, &message, None, Some(HELP_HINT));
            return;
        }
    }
}

const HELP_HINT: &str = "commands: SHOW POOLS | CLIENTS | SERVERS | STATS | CONFIG | VERSION | HELP; RELOAD; RECONNECT; PAUSE; RESUME";

/// One command; an error is (SQLSTATE, message).
fn run_command(
    command: &str,
    ctx: &ClientContext,
    out: &mut BytesMut,
) -> std::result::Result<(), (&'static str, String)> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", what] => show::run(what, ctx, out).ok_or_else(|| unknown(command)),
        ["SHOW"] => Err(("42601", "SHOW needs an argument".into())),
        ["RELOAD"] => {
            control::reload(ctx, out);
            Ok(())
        }
        // pgbouncer takes an optional database name; there is one pool here.
        ["RECONNECT", ..] => {
            control::reconnect(ctx, out);
            Ok(())
        }
        ["PAUSE", ..] => {
            control::pause(ctx, out);
            Ok(())
        }
        ["RESUME", ..] => {
            control::resume(ctx, out);
            Ok(())
        }
        _ => Err(unknown(command)),
    }
}

fn unknown(command: &str) -> (&'static str, String) {
    // Only the first word is echoed: whatever follows could be anything the user typed.
    let first: String = command
        .split_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .take(40)
        .collect();
    (
        "42601",
        format!("unknown admin console command \"{first}\""),
    )
}

/// A flag value's name as written on the command line (`--migrate changed`).
fn value_name(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

fn path_or_empty(path: Option<&std::path::Path>) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_default()
}

/// `SHOW CONFIG` rows from the effective flags, with the defaults a bare `dbproxy` would use.
pub fn config_rows(args: &RunArgs) -> Vec<(String, String, String)> {
    let defaults = Cli::try_parse_from(["dbproxy"])
        .map(|c| c.into_run_args())
        .ok();
    let fields = |a: &RunArgs| -> Vec<(&'static str, String)> {
        vec![
            ("dbc", a.dbc.display().to_string()),
            ("addr", a.addr.join(",")),
            ("ops_addr", a.ops_addr.to_string()),
            ("pool_mode", format!("{:?}", a.pool_mode).to_lowercase()),
            ("pool_size", a.pool_size.to_string()),
            ("min_pool_size", a.min_pool_size.to_string()),
            ("max_clients", a.max_clients.to_string()),
            ("pool_timeout", a.pool_timeout.to_string()),
            ("server_idle_timeout", a.server_idle_timeout.to_string()),
            ("server_lifetime", a.server_lifetime.to_string()),
            ("shutdown_delay", a.shutdown_delay.to_string()),
            ("shutdown_timeout", a.shutdown_timeout.to_string()),
            ("set_role", a.set_role.clone().unwrap_or_default()),
            ("set_base_role", a.set_base_role.to_string()),
            ("poll_interval", a.poll_interval.to_string()),
            ("validate_timeout", a.validate_timeout.to_string()),
            ("log_format", format!("{:?}", a.log_format).to_lowercase()),
            (
                "client_password_file",
                path_or_empty(a.client_password_file.as_deref()),
            ),
            ("admin_user", a.admin_user.clone().unwrap_or_default()),
            ("max_client_message", a.max_client_message.to_string()),
            ("client_login_timeout", a.client_login_timeout.to_string()),
            ("worker_threads", a.worker_threads.to_string()),
            ("session_lane", a.session_lane.to_string()),
            ("session_lane_after", a.session_lane_after.to_string()),
            ("transaction_lane", a.transaction_lane.to_string()),
            (
                "transaction_lane_after",
                a.transaction_lane_after.to_string(),
            ),
            ("migrate", value_name(&a.migrate)),
            ("migration_timeout", a.migration_timeout.to_string()),
            (
                "max_prepared_statements",
                a.max_prepared_statements.to_string(),
            ),
            (
                "reset_settings_between_clients",
                a.reset_settings_between_clients.to_string(),
            ),
            ("client_park_after_ms", a.client_park_after_ms.to_string()),
            ("client_tls", value_name(&a.client_tls)),
            (
                "client_tls_cert",
                path_or_empty(a.client_tls_cert.as_deref()),
            ),
            ("client_tls_key", path_or_empty(a.client_tls_key.as_deref())),
        ]
    };
    let current = fields(args);
    let defaults = defaults.map(|d| fields(&d)).unwrap_or_default();
    current
        .into_iter()
        .map(|(k, v)| {
            let d = defaults
                .iter()
                .find(|(dk, _)| *dk == k)
                .map(|(_, dv)| dv.clone())
                .unwrap_or_default();
            (k.to_owned(), v, d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_or_admin_user() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: SocketAddr = "[::1]:1".parse().unwrap();
        let remote: SocketAddr = "10.0.0.5:1".parse().unwrap();
        assert!(refusal(lo, Some("x"), None).is_none());
        assert!(refusal(lo6, None, None).is_none());
        assert!(refusal(remote, Some("x"), None).is_some());
        assert!(refusal(remote, Some("x"), Some("ops")).is_some());
        assert!(refusal(remote, Some("ops"), Some("ops")).is_none());
    }

    #[test]
    fn config_rows_show_values_and_defaults() {
        let args = Cli::try_parse_from(["dbproxy", "--pool-size", "7"])
            .unwrap()
            .into_run_args();
        let rows = config_rows(&args);
        let row = rows.iter().find(|r| r.0 == "pool_size").unwrap();
        assert_eq!((row.1.as_str(), row.2.as_str()), ("7", "20"));
    }

    /// Every flag of `dbproxy run` is a SHOW CONFIG key (its long name, `-` as `_`).
    #[test]
    fn config_rows_list_every_run_flag() {
        use clap::Args;
        let args = Cli::try_parse_from(["dbproxy"]).unwrap().into_run_args();
        let keys: Vec<String> = config_rows(&args).into_iter().map(|r| r.0).collect();
        let flags: Vec<String> = RunArgs::augment_args(clap::Command::new("run"))
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(|l| l.replace('-', "_"))
            .collect();
        assert!(flags.len() > 20, "{flags:?}");
        let missing: Vec<&String> = flags.iter().filter(|f| !keys.contains(f)).collect();
        assert!(missing.is_empty(), "not in SHOW CONFIG: {missing:?}");
        let row = |k: &str| config_rows(&args).into_iter().find(|r| r.0 == k).unwrap();
        assert_eq!(row("migrate").1, "changed");
        assert_eq!(row("client_tls").1, "prefer");
        assert_eq!(row("session_lane").1, "true");
    }

    #[test]
    fn unknown_commands_echo_little() {
        let (code, msg) = unknown("FROBNICATE all the secret-things now");
        assert_eq!(code, "42601");
        assert!(msg.contains("FROBNICATE"));
        assert!(!msg.contains("secret-things"));
    }
}
