//! `SHOW ...` commands, with pgbouncer's column names so existing scripts and dashboards work.

use std::sync::atomic::Ordering::Relaxed;

use bytes::BytesMut;

use super::wire::{INT8, TEXT, result_set, timestamp};
use crate::client::ClientContext;
use crate::stats::{ClientState, ServerState, Stamp, hot};

/// Runs `SHOW <what>`; None for an unknown `what`.
pub fn run(what: &str, ctx: &ClientContext, out: &mut BytesMut) -> Option<()> {
    match what {
        "POOLS" => pools(ctx, out),
        "CLIENTS" => clients(ctx, out),
        "SERVERS" => servers(ctx, out),
        "STATS" | "STATS_TOTALS" => stats(ctx, out),
        "CONFIG" => config(ctx, out),
        "VERSION" => result_set(
            out,
            &[("version", TEXT)],
            &[vec![format!("dbproxy {}", env!("CARGO_PKG_VERSION"))]],
        ),
        "HELP" => help(out),
        _ => return None,
    }
    Some(())
}

/// The pool's (user, database): the current generation's, or empty before the first.
fn pool_identity(ctx: &ClientContext) -> (String, String) {
    match ctx.pool.credentials().current() {
        Some(g) => (
            g.dsn.user().unwrap_or("").to_owned(),
            g.dsn.dbname().or(g.dsn.user()).unwrap_or("").to_owned(),
        ),
        None => (String::new(), String::new()),
    }
}

fn wait_of(since: Stamp) -> (u64, u64) {
    let d = since.elapsed();
    (d.as_secs(), u64::from(d.subsec_micros()))
}

fn pools(ctx: &ClientContext, out: &mut BytesMut) {
    let registry = &ctx.pool.stats().registry;
    let clients = registry.clients();
    let servers = registry.servers();
    let count_c = |s: ClientState| clients.iter().filter(|c| c.state == s).count();
    let count_s = |s: ServerState| servers.iter().filter(|c| c.state == s).count();
    let maxwait = clients
        .iter()
        .filter(|c| c.state == ClientState::Waiting)
        .map(|c| c.request_time.elapsed())
        .max()
        .unwrap_or_default();
    let login = ctx.pool.open_count().saturating_sub(servers.len());
    let (user, database) = pool_identity(ctx);
    let row = vec![
        database,
        user,
        count_c(ClientState::Active).to_string(),
        count_c(ClientState::Waiting).to_string(),
        "0".into(),
        "0".into(),
        count_s(ServerState::Active).to_string(),
        "0".into(),
        "0".into(),
        count_s(ServerState::Idle).to_string(),
        "0".into(),
        "0".into(),
        login.to_string(),
        maxwait.as_secs().to_string(),
        maxwait.subsec_micros().to_string(),
        if ctx.transaction_mode {
            "transaction"
        } else {
            "session"
        }
        .into(),
        if ctx.pool.is_paused() { "1" } else { "0" }.into(),
        ctx.pool.credentials().current_number().to_string(),
    ];
    result_set(
        out,
        &[
            ("database", TEXT),
            ("user", TEXT),
            ("cl_active", INT8),
            ("cl_waiting", INT8),
            ("cl_active_cancel_req", INT8),
            ("cl_waiting_cancel_req", INT8),
            ("sv_active", INT8),
            ("sv_active_cancel", INT8),
            ("sv_being_canceled", INT8),
            ("sv_idle", INT8),
            ("sv_used", INT8),
            ("sv_tested", INT8),
            ("sv_login", INT8),
            ("maxwait", INT8),
            ("maxwait_us", INT8),
            ("pool_mode", TEXT),
            ("paused", INT8),
            ("generation", INT8),
        ],
        &[row],
    );
}

/// Columns shared by SHOW CLIENTS and SHOW SERVERS (pgbouncer's).
const CONNECTION_COLUMNS: &[(&str, i32)] = &[
    ("type", TEXT),
    ("user", TEXT),
    ("database", TEXT),
    ("replication", TEXT),
    ("state", TEXT),
    ("addr", TEXT),
    ("port", INT8),
    ("local_addr", TEXT),
    ("local_port", INT8),
    ("connect_time", TEXT),
    ("request_time", TEXT),
    ("wait", INT8),
    ("wait_us", INT8),
    ("close_needed", INT8),
    ("ptr", TEXT),
    ("link", TEXT),
    ("remote_pid", INT8),
    ("tls", TEXT),
    ("application_name", TEXT),
    ("prepared_statements", INT8),
    ("id", INT8),
];

fn clients(ctx: &ClientContext, out: &mut BytesMut) {
    let registry = &ctx.pool.stats().registry;
    let servers = registry.servers();
    let rows: Vec<Vec<String>> = registry
        .clients()
        .into_iter()
        .map(|c| {
            let (state, waiting) = match c.state {
                ClientState::Active => ("active", false),
                ClientState::Waiting => ("waiting", true),
                ClientState::Admin => ("active", false),
            };
            let (wait, wait_us) = if waiting {
                wait_of(c.request_time)
            } else {
                (0, 0)
            };
            let link = servers
                .iter()
                .find(|s| s.client == Some(c.id))
                .map(|s| format!("{:x}", s.id))
                .unwrap_or_default();
            vec![
                "C".into(),
                c.names.user().to_owned(),
                c.names.database().to_owned(),
                "none".into(),
                state.into(),
                c.addr.ip().to_string(),
                c.addr.port().to_string(),
                String::new(),
                "0".into(),
                timestamp(c.connect_time.into()),
                timestamp(c.request_time.into()),
                wait.to_string(),
                wait_us.to_string(),
                "0".into(),
                format!("{:x}", c.id),
                link,
                "0".into(),
                String::new(),
                c.names.application_name().to_owned(),
                "0".into(),
                c.id.to_string(),
            ]
        })
        .collect();
    result_set(out, CONNECTION_COLUMNS, &rows);
}

fn servers(ctx: &ClientContext, out: &mut BytesMut) {
    let registry = &ctx.pool.stats().registry;
    let current = ctx.pool.credentials().current_number();
    let mut columns = CONNECTION_COLUMNS.to_vec();
    columns.push(("generation", INT8));
    let rows: Vec<Vec<String>> = registry
        .servers()
        .into_iter()
        .map(|s| {
            let link = s.client.map(|id| format!("{id:x}")).unwrap_or_default();
            vec![
                "S".into(),
                s.names.user().to_owned(),
                s.names.database().to_owned(),
                "none".into(),
                s.state.name().into(),
                s.addr.ip().to_string(),
                s.addr.port().to_string(),
                String::new(),
                "0".into(),
                timestamp(s.connect_time.into()),
                timestamp(s.request_time.into()),
                "0".into(),
                "0".into(),
                u8::from(s.generation != current).to_string(),
                format!("{:x}", s.id),
                link,
                s.backend_pid.to_string(),
                String::new(),
                String::new(),
                "0".into(),
                s.id.to_string(),
                s.generation.to_string(),
            ]
        })
        .collect();
    result_set(out, &columns, &rows);
}

fn stats(ctx: &ClientContext, out: &mut BytesMut) {
    let h = hot();
    let (_, database) = pool_identity(ctx);
    let row = vec![
        database,
        h.assignments.load(Relaxed).to_string(),
        h.transaction_seconds.count().to_string(),
        h.queries.load(Relaxed).to_string(),
        h.bytes_from_clients.load(Relaxed).to_string(),
        h.bytes_to_clients.load(Relaxed).to_string(),
        (h.transaction_seconds.sum_ns() / 1000).to_string(),
        (h.query_seconds.sum_ns() / 1000).to_string(),
        h.wait_us.load(Relaxed).to_string(),
    ];
    result_set(
        out,
        &[
            ("database", TEXT),
            ("total_server_assignment_count", INT8),
            ("total_xact_count", INT8),
            ("total_query_count", INT8),
            ("total_received", INT8),
            ("total_sent", INT8),
            ("total_xact_time", INT8),
            ("total_query_time", INT8),
            ("total_wait_time", INT8),
        ],
        &[row],
    );
}

fn config(ctx: &ClientContext, out: &mut BytesMut) {
    let rows: Vec<Vec<String>> = ctx
        .pool
        .admin_settings()
        .map(|s| {
            s.config
                .iter()
                .map(|(k, v, d)| vec![k.clone(), v.clone(), d.clone(), "no".into()])
                .collect()
        })
        .unwrap_or_default();
    result_set(
        out,
        &[
            ("key", TEXT),
            ("value", TEXT),
            ("default", TEXT),
            ("changeable", TEXT),
        ],
        &rows,
    );
}

fn help(out: &mut BytesMut) {
    let rows: Vec<Vec<String>> = [
        ("SHOW POOLS", "clients and server connections of the pool"),
        ("SHOW CLIENTS", "one row per client connection"),
        (
            "SHOW SERVERS",
            "one row per server connection, with its credential generation",
        ),
        (
            "SHOW STATS",
            "totals: assignments, transactions, queries, bytes, times (µs)",
        ),
        ("SHOW CONFIG", "effective settings and their defaults"),
        ("SHOW VERSION", "dbproxy version"),
        ("RELOAD", "re-read the DSN Secret now"),
        (
            "RECONNECT",
            "replace every server connection at its next safe point",
        ),
        (
            "PAUSE",
            "hold new server assignments (clients wait up to --pool-timeout)",
        ),
        ("RESUME", "end PAUSE"),
    ]
    .iter()
    .map(|(c, d)| vec![(*c).to_owned(), (*d).to_owned()])
    .collect();
    result_set(out, &[("command", TEXT), ("description", TEXT)], &rows);
}
