//! Moving a live session to a new server connection at a safe point (after ReadyForQuery 'I',
//! nothing in flight, no open extended sequence), and what may stop it.
//!
//! The server says what a session holds: before a move dbproxy asks the old backend, in one
//! round trip, for its session settings (`pg_settings` with `source = 'session'`: SET,
//! set_config, SET ROLE, SET SESSION CHARACTERISTICS), its prepared statements
//! (`pg_prepared_statements`, protocol and SQL), the reported parameters' current values, and
//! the state that cannot move: LISTEN channels (`pg_listening_channels()`), temporary objects
//! (`pg_class` in `pg_my_temp_schema()`), open cursors (`pg_cursors`: at an idle point only
//! WITH HOLD ones survive) and session advisory locks (`pg_locks` of its own pid). A session
//! holding any of those stays on its backend until it is gone or `--migration-timeout`
//! passes; then the client receives FATAL 57P01 naming what pinned it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use tokio::sync::watch;

use crate::credentials::{Credentials, Generation, RotationWaiter};
use crate::error::{ProxyError, Result};
use crate::server::{ServerConnection, quote_ident};
use crate::sql::{find_prepare, quote_literal};

/// `--migrate`: which rotations move live sessions (session mode) to new server connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MigratePolicy {
    /// Rotations that change the user, host, port or database (the default): a new password
    /// alone leaves sessions where they are (PostgreSQL keeps them logged in).
    Changed,
    /// Every rotation.
    Always,
    /// Never: sessions stay on their server until they end; only new sessions use the new
    /// credentials.
    Never,
}

impl MigratePolicy {
    /// Whether generation `g` moves a session on a server of generation `server_generation`
    /// opened for `server_target` (`user@hosts/db`).
    pub fn moves(self, server_generation: u64, server_target: &str, g: &Generation) -> bool {
        if g.number <= server_generation {
            return false;
        }
        match self {
            MigratePolicy::Never => false,
            MigratePolicy::Always => true,
            MigratePolicy::Changed => crate::credentials::describe_dsn(&g.dsn) != server_target,
        }
    }
}

/// How often a pinned session is asked again whether it still holds unmovable state.
const RECHECK: Duration = Duration::from_secs(1);

/// How long after the migration timeout a session's in-flight replies may still finish.
pub const FORCE_GRACE: Duration = Duration::from_secs(5);

/// What a forwarding loop is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Stop at the next safe point and let the session move.
    SafePoint,
    /// The migration timeout passed: close the client once the replies it is owed are
    /// delivered (up to its last ReadyForQuery), so a query in flight completes and the
    /// FATAL that follows is not taken for part of its reply.
    Now,
    /// [`FORCE_GRACE`] after `Now` the replies still have not finished (a long query, a
    /// client that keeps sending): stop at the next message boundary.
    Force,
}

impl StopKind {
    /// The stop level a forwarding loop records (the highest asked for wins): 1 stop at a
    /// safe point, 2 close once no reply is owed, 3 close at the next message boundary.
    pub fn level(self) -> u8 {
        match self {
            StopKind::SafePoint => 1,
            StopKind::Now => 2,
            StopKind::Force => 3,
        }
    }
}

/// Whether a forwarding loop at stop `level` closes the session now for the deadline: at
/// level 2 once no reply is owed, at level 3 regardless, never in the middle of a message
/// to the client.
pub fn deadline_reached(level: u8, replies_owed: bool, mid_message: bool) -> bool {
    !mid_message && (level >= 3 || (level == 2 && !replies_owed))
}

/// Tells a session when its server connection should be left: a newer credential generation
/// that the policy says to move to, a recheck of a pinned session, or the migration deadline.
///
/// Polled by the forwarding loops at every wake of the session's task, so it is cheap when
/// nothing changed: a rotation is noticed through the watch's version (one atomic load), and
/// the task is woken for it through the credentials' wake list, not a future of its own.
pub struct MoveSignal {
    rx: watch::Receiver<Option<Arc<Generation>>>,
    waiter: RotationWaiter,
    policy: MigratePolicy,
    timeout: Duration,
    server_generation: u64,
    server_target: Arc<str>,
    /// The current generation has not been compared with the server's yet (it may have
    /// changed before this signal existed, or before a rebase).
    unchecked: bool,
    /// Set once a move is wanted: when the session must be gone from its server.
    deadline: Option<Instant>,
    recheck_at: Option<Instant>,
    /// Set once the deadline was reported: when to stop even mid-reply.
    force_at: Option<Instant>,
    /// The timer for the recheck or the deadline, only while a move is wanted.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline has been reported; nothing more to say.
    finished: bool,
}

impl MoveSignal {
    pub fn new(
        credentials: &Arc<Credentials>,
        policy: MigratePolicy,
        timeout: Duration,
        server: &ServerConnection,
    ) -> Self {
        MoveSignal {
            rx: credentials.subscribe(),
            waiter: credentials.rotation_waiter(),
            policy,
            timeout,
            server_generation: server.generation,
            server_target: server.target.clone(),
            unchecked: true,
            deadline: None,
            recheck_at: None,
            force_at: None,
            timer: None,
            finished: false,
        }
    }

    /// Follows a new server connection: nothing is wanted until the next rotation.
    pub fn rebase(&mut self, server: &ServerConnection) {
        self.server_generation = server.generation;
        self.server_target = server.target.clone();
        self.unchecked = true;
        self.deadline = None;
        self.recheck_at = None;
        self.force_at = None;
        self.timer = None;
        self.finished = false;
    }

    /// A move was wanted but could not happen now (pinned, or the attempt failed): ask
    /// again at the next safe point after a short while, until the deadline.
    pub fn retry_later(&mut self) {
        self.recheck_at = Some(Instant::now() + RECHECK);
    }

    /// Whether the session should move now (a rotation asks for it), without waiting.
    pub fn wanted(&self) -> bool {
        self.deadline.is_some()
    }

    /// Whether no rotation published so far asks this session to move (looked at without
    /// waiting: a session about to leave the runtime checks that nothing wants it back).
    pub fn settled(&self) -> bool {
        self.deadline.is_none() && !self.requires_move(&self.rx.borrow())
    }

    /// Whether a rotation was published since this signal last looked (one that may ask
    /// for a move; never with `--migrate never`).
    pub fn rotated_unseen(&self) -> bool {
        self.policy != MigratePolicy::Never && self.rx.has_changed().unwrap_or(false)
    }

    fn requires_move(&self, generation: &Option<Arc<Generation>>) -> bool {
        generation.as_ref().is_some_and(|g| {
            self.policy
                .moves(self.server_generation, &self.server_target, g)
        })
    }

    /// Ready when the loop should stop: first at the rotation that asks for a move
    /// (`SafePoint`), then at each recheck time (`SafePoint`), then at the deadline (`Now`),
    /// then [`FORCE_GRACE`] later (`Force`).
    /// Its state lives here, so a caller may poll it from a new future each time.
    pub fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<StopKind> {
        if self.finished || self.policy == MigratePolicy::Never {
            return Poll::Pending;
        }
        let Some(deadline) = self.deadline else {
            // Registered before looking: a publish after the look wakes this task.
            self.waiter.register(cx.waker());
            if !std::mem::take(&mut self.unchecked) && !self.rx.has_changed().unwrap_or(false) {
                return Poll::Pending;
            }
            let current = self.rx.borrow_and_update().clone();
            if !self.requires_move(&current) {
                return Poll::Pending;
            }
            self.deadline = Some(Instant::now() + self.timeout);
            return Poll::Ready(StopKind::SafePoint);
        };
        let (at, kind) = match (self.force_at, self.recheck_at) {
            (Some(force), _) => (force, StopKind::Force),
            (None, Some(at)) if at < deadline => (at, StopKind::SafePoint),
            _ => (deadline, StopKind::Now),
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
        if timer.deadline() != at.into() {
            timer.as_mut().reset(at.into());
        }
        std::task::ready!(timer.as_mut().poll(cx));
        match kind {
            StopKind::SafePoint => self.recheck_at = None,
            StopKind::Now => self.force_at = Some(at + FORCE_GRACE),
            StopKind::Force => {
                self.finished = true;
                self.timer = None;
            }
        }
        Poll::Ready(kind)
    }

    /// [`MoveSignal::poll_stop`] as a future.
    pub async fn wait(&mut self) -> StopKind {
        std::future::poll_fn(|cx| self.poll_stop(cx)).await
    }
}

/// What the old backend holds, as it told us.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Why the session cannot move (empty: it can).
    pub pins: Vec<&'static str>,
    /// Session-level settings (`pg_settings.source = 'session'`), current values.
    pub settings: Vec<(String, String)>,
    /// SQL prepared statements: name and the PREPARE statement that made it.
    pub sql_prepared: Vec<(String, String)>,
    /// Protocol prepared statements: name, text, parameter type OIDs.
    pub parses: Vec<(String, String, Vec<u32>)>,
    /// Current values of the parameters the server reports (what the client has seen).
    pub reported: Vec<(String, String)>,
}

/// The reasons a session may be pinned, in the words the client will read.
const PIN_LISTEN: &str = "it is listening on channels (LISTEN)";
const PIN_TEMP: &str = "it holds temporary tables or other temporary objects";
const PIN_CURSOR: &str = "it holds open cursors (WITH HOLD)";
const PIN_LOCK: &str = "it holds session-level advisory locks";

/// How often a snapshot canceled by the session's own statement_timeout is asked again.
const SNAPSHOT_ATTEMPTS: u32 = 5;

/// The fixed part of [`snapshot`]'s query, built once.
///
/// The client's own timeouts must not cancel dbproxy's question, and the answer must come in
/// UTF-8 whatever the client's encoding, so those settings are overridden for it (SET LOCAL,
/// in the implicit transaction of this one query string, see `OVERRIDDEN`); their session
/// values are read first (cheap, ASCII) and compared with their values at session start (SET
/// LOCAL ... TO DEFAULT) to know whether the client changed them.
static SNAPSHOT_QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let current: Vec<String> = OVERRIDDEN
        .iter()
        .map(|(name, _)| format!("pg_catalog.current_setting('{name}')"))
        .collect();
    let current = current.join(", ");
    let mut sql = format!("SELECT 'cur', {current}; ");
    for (name, _) in OVERRIDDEN {
        sql.push_str(&format!("SET LOCAL {name} TO DEFAULT; "));
    }
    sql.push_str(&format!("SELECT 'def', {current}; "));
    for statement in overrides() {
        sql.push_str(&statement);
        sql.push_str("; ");
    }
    sql.push_str(
        "SELECT 'pin', 'listen', NULL, NULL, NULL FROM pg_catalog.pg_listening_channels() HAVING count(*) > 0 \
         UNION ALL SELECT 'pin', 'temp', NULL, NULL, NULL FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema() HAVING count(*) > 0 \
         UNION ALL SELECT 'pin', 'cursor', NULL, NULL, NULL FROM pg_catalog.pg_cursors HAVING count(*) > 0 \
         UNION ALL SELECT 'pin', 'lock', NULL, NULL, NULL FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() HAVING count(*) > 0 \
         UNION ALL SELECT 'set', name, pg_catalog.current_setting(name), NULL, NULL FROM pg_catalog.pg_settings WHERE source = 'session' \
         UNION ALL SELECT 'role', 'role', pg_catalog.current_setting('role'), NULL, NULL \
         UNION ALL SELECT 'prep', name, statement, parameter_types::pg_catalog.oid[]::pg_catalog.text, from_sql::pg_catalog.text FROM pg_catalog.pg_prepared_statements",
    );
    sql
});

/// Asks a backend at a safe point what its session holds. `reported` names the parameters
/// whose current values are wanted too.
///
/// `custom` names custom settings (`app.tenant_id`) to ask for: PostgreSQL lists them nowhere,
/// so their names come from the client's statements (`crate::custom`).
pub async fn snapshot(
    server: &mut ServerConnection,
    with_reported: bool,
    custom: &[String],
) -> Result<Snapshot> {
    let mut sql = SNAPSHOT_QUERY.clone();
    if with_reported && !server.parameter_status.is_empty() {
        let names: Vec<String> = server
            .parameter_status
            .iter()
            .map(|(n, _)| quote_literal(n))
            .collect();
        sql.push_str(&format!(
            " UNION ALL SELECT 'ps', n, pg_catalog.current_setting(n, true), NULL, NULL FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) n",
            names.join(",")
        ));
    }
    if !custom.is_empty() {
        let names: Vec<String> = custom.iter().map(|n| quote_literal(n)).collect();
        // Settings pg_settings lists come with the 'set' rows (and some may not be read).
        sql.push_str(&format!(
            " UNION ALL SELECT 'cus', n, pg_catalog.current_setting(n, true), NULL, NULL FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) n \
             WHERE n NOT IN (SELECT name FROM pg_catalog.pg_settings)",
            names.join(",")
        ));
    }
    // One simple query is one implicit transaction: a canceled attempt (the session's own
    // statement_timeout still applies to its first statement) changed nothing; ask again.
    let mut attempt = 0;
    let rows = loop {
        attempt += 1;
        match tokio::time::timeout(Duration::from_secs(10), server.query_rows(&sql))
            .await
            .map_err(|_| ProxyError::Timeout("asking a server connection for its session state"))?
        {
            Err(ProxyError::Canceled(_)) if attempt < SNAPSHOT_ATTEMPTS => continue,
            other => break other?,
        }
    };
    let policy_role = server.policy_role().map(str::to_owned);
    let mut snap = Snapshot::default();
    // (session value, value at session start) of each overridden setting.
    let mut overridden: [(Option<String>, Option<String>); OVERRIDDEN.len()] = Default::default();
    let mut customs = Vec::new();
    for row in rows {
        let col = |i: usize| row.get(i).cloned().flatten();
        let (Some(kind), Some(name)) = (col(0), col(1)) else {
            continue;
        };
        match kind.as_str() {
            "cur" => {
                for (i, o) in overridden.iter_mut().enumerate() {
                    o.0 = col(i + 1);
                }
            }
            "def" => {
                for (i, o) in overridden.iter_mut().enumerate() {
                    o.1 = col(i + 1);
                }
            }
            // Read under dbproxy's SET LOCAL: the values above are the session's.
            "set" if overridden_index(&name).is_some() => {}
            "pin" => snap.pins.push(match name.as_str() {
                "listen" => PIN_LISTEN,
                "temp" => PIN_TEMP,
                "cursor" => PIN_CURSOR,
                _ => PIN_LOCK,
            }),
            "set" => snap.settings.push((name, col(2).unwrap_or_default())),
            "role" => {
                // `role` is hidden from pg_settings: ask for it directly. dbproxy's own SET
                // ROLE (--set-role / --set-base-role) is the baseline, not the client's.
                let value = col(2).unwrap_or_default();
                if value != policy_role.as_deref().unwrap_or("none") {
                    snap.settings.push((name, value));
                }
            }
            "prep" => {
                let text = col(2).unwrap_or_default();
                if col(4).as_deref() == Some("true") {
                    let prepare = find_prepare(&text, &name).unwrap_or(&text).to_owned();
                    snap.sql_prepared.push((name, prepare));
                } else {
                    let types = parse_oid_array(&col(3).unwrap_or_default());
                    snap.parses.push((name, text, types));
                }
            }
            // A custom setting never set, or RESET ('' then), is not the session's.
            "cus" => {
                if let Some(v) = col(2).filter(|v| !v.is_empty()) {
                    customs.push((name, v));
                }
            }
            "ps" => {
                let value = match overridden_index(&name) {
                    Some(i) => overridden[i].0.clone(),
                    None => col(2),
                };
                if let Some(v) = value {
                    snap.reported.push((name, v));
                }
            }
            _ => {}
        }
    }
    for ((name, _), (current, default)) in OVERRIDDEN.iter().zip(overridden) {
        if let Some(current) = current
            && Some(&current) != default.as_ref()
        {
            snap.settings.push(((*name).to_owned(), current));
        }
    }
    for (name, value) in customs {
        if !snap
            .settings
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            snap.settings.push((name, value));
        }
    }
    Ok(snap)
}

/// Settings dbproxy overrides (SET LOCAL) for its own statements, and their values there: the
/// client's timeouts must not cancel them, and they are read and written in UTF-8 whatever
/// encoding the client chose (a session in LATIN1 must not get its `SET search_path =
/// "schéma"` back as other bytes). The snapshot reads their session values in this order.
const OVERRIDDEN: [(&str, &str); 3] = [
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("client_encoding", "'UTF8'"),
];

fn overridden_index(name: &str) -> Option<usize> {
    OVERRIDDEN
        .iter()
        .position(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// `SET LOCAL` of every overridden setting.
fn overrides() -> impl Iterator<Item = String> {
    OVERRIDDEN
        .iter()
        .map(|(name, value)| format!("SET LOCAL {name} = {value}"))
}

/// `{23,25}` -> [23, 25].
fn parse_oid_array(s: &str) -> Vec<u32> {
    s.trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

/// The statements that turn a connection's settings from `have` into `want`, for the
/// transaction of [`in_transaction`]: set_config for every value that differs (it takes the
/// value as current_setting printed it, lists and units included), RESET for settings only
/// `have` holds. `policy_role` is restored instead of resetting `role`. The settings dbproxy
/// overrides come last and are overridden again behind them: a restored `client_encoding`
/// must not change how the values after it are read, nor a restored `statement_timeout`
/// cancel them.
pub fn settings_delta(
    have: &[(String, String)],
    want: &[(String, String)],
    policy_role: Option<&str>,
) -> Vec<String> {
    let (mut out, mut last) = (Vec::new(), Vec::new());
    let mut place = |name: &str, statement: String| {
        if overridden_index(name).is_some() {
            last.push(statement);
        } else {
            out.push(statement);
        }
    };
    for (name, _) in have {
        if !want.iter().any(|(n, _)| n == name) {
            let statement = match (name.as_str(), policy_role) {
                ("role", Some(role)) => format!("SET ROLE {}", quote_ident(role)),
                _ => format!("RESET {}", quote_ident(name)),
            };
            place(name, statement);
        }
    }
    for (name, value) in want {
        if have.iter().any(|(n, v)| n == name && v == value) {
            continue;
        }
        let statement = format!(
            "SELECT pg_catalog.set_config({}, {}, false)",
            quote_literal(name),
            quote_literal(value)
        );
        place(name, statement);
    }
    if !last.is_empty() {
        out.append(&mut last);
        out.extend(overrides());
    }
    out
}

/// The statements that turn a connection's SQL prepared statements from `have` into `want`.
pub fn sql_prepared_delta(have: &[(String, String)], want: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, text) in have {
        if !want.iter().any(|(n, t)| n == name && t == text) {
            out.push(format!("DEALLOCATE {}", quote_ident(name)));
        }
    }
    for (name, text) in want {
        if !have.iter().any(|(n, t)| n == name && t == text) {
            out.push(text.clone());
        }
    }
    out
}

/// Reported parameters whose value on `new` differs from what the client has seen.
pub fn reported_changes(
    seen: &[(String, String)],
    new: &[(String, String)],
) -> Vec<(String, String)> {
    // Equal lists are usually one shared allocation (see `share_parameter_status`).
    if std::ptr::eq(seen, new) {
        return Vec::new();
    }
    new.iter()
        .filter(|(n, v)| !seen.iter().any(|(sn, sv)| sn == n && sv == v))
        .cloned()
        .collect()
}

/// Wraps state-restoring statements in one transaction (each still its own Query message, so a
/// restored standard_conforming_strings applies to the statements after it), with the client's
/// own statement and lock timeouts off and the client encoding UTF-8 for its duration
/// (`OVERRIDDEN`). All or nothing.
pub fn in_transaction(statements: Vec<String>) -> Vec<String> {
    if statements.is_empty() {
        return statements;
    }
    let mut out = Vec::with_capacity(statements.len() + 2 + OVERRIDDEN.len());
    out.push("BEGIN".to_owned());
    out.extend(overrides());
    out.extend(statements);
    out.push("COMMIT".to_owned());
    out
}

/// The statements that turn a connection's settings and SQL prepared statements into the
/// client's: settings first (names in PREPARE statements resolve with the client's
/// search_path), then DEALLOCATE/PREPARE, each PREPARE lexed with
/// standard_conforming_strings on (PostgreSQL's default: a statement prepared before the
/// client turned it off must not be re-read with backslash escapes).
pub fn restore_statements(
    have_settings: &[(String, String)],
    want_settings: &[(String, String)],
    have_prepared: &[(String, String)],
    want_prepared: &[(String, String)],
    policy_role: Option<&str>,
    reset_all: bool,
) -> Vec<String> {
    // The common case in transaction mode (once per transaction): nothing set anywhere.
    if have_settings.is_empty()
        && want_settings.is_empty()
        && have_prepared.is_empty()
        && want_prepared.is_empty()
        && !reset_all
    {
        return Vec::new();
    }
    let mut statements = Vec::new();
    let mut have_settings = have_settings;
    let role_only: Vec<(String, String)>;
    if reset_all {
        // Every setting back to its default but the role (RESET ALL leaves it), dbproxy's
        // overrides included.
        statements.push("RESET ALL".to_owned());
        statements.extend(overrides());
        role_only = have_settings
            .iter()
            .filter(|(n, _)| n == "role")
            .cloned()
            .collect();
        have_settings = &role_only;
    }
    statements.extend(settings_delta(have_settings, want_settings, policy_role));
    let prepared = sql_prepared_delta(have_prepared, want_prepared);
    if reset_all && prepared.is_empty() && statements.len() == 1 + OVERRIDDEN.len() {
        // Nothing to restore behind the reset: one statement, no transaction around it.
        return vec!["RESET ALL".to_owned()];
    }
    if !prepared.is_empty() {
        statements.push("SET LOCAL standard_conforming_strings = on".to_owned());
        statements.extend(prepared);
        // Back to the client's value for the rest of the transaction (the session value,
        // which the settings above may have set, takes over at COMMIT anyway).
    }
    in_transaction(statements)
}

/// Re-creates a snapshot's movable state on a fresh connection.
pub async fn restore(server: &mut ServerConnection, snap: &Snapshot) -> Result<()> {
    let mut queries = restore_statements(
        &[],
        &snap.settings,
        &[],
        &snap.sql_prepared,
        server.policy_role(),
        false,
    );
    let mut after = Vec::new();
    if queries.is_empty() && !snap.parses.is_empty() {
        // Nothing but protocol statements: still one transaction with the timeouts off.
        queries = in_transaction(vec!["SELECT 1".to_owned()]);
    }
    // The protocol-level Parses go inside the same transaction, before its COMMIT.
    if queries.last().is_some_and(|q| q == "COMMIT") {
        after.push(queries.pop().unwrap_or_default());
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        server.replay(&queries, &snap.parses, &after),
    )
    .await
    .map_err(|_| ProxyError::Timeout("restoring session state on a new server connection"))?
}

/// The client-facing explanation of a close after the migration timeout.
pub fn pinned_message(pins: &[&str], timeout: Duration) -> String {
    if pins.is_empty() {
        format!(
            "terminating connection: dbproxy moved to new database credentials and this session \
             was not idle within the migration timeout ({} s); reconnect",
            timeout.as_secs()
        )
    } else {
        format!(
            "terminating connection: dbproxy moved to new database credentials, but this session \
             could not follow because {} (session state that only its old server has); it was \
             kept for the migration timeout ({} s); reconnect",
            pins.join(" and "),
            timeout.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_waits_for_owed_replies_until_forced() {
        let (now, force) = (StopKind::Now.level(), StopKind::Force.level());
        assert!(StopKind::SafePoint.level() < now && now < force);
        assert!(deadline_reached(now, false, false));
        assert!(!deadline_reached(now, true, false), "a reply is owed");
        assert!(deadline_reached(force, true, false), "past the grace");
        assert!(!deadline_reached(force, true, true), "mid-message");
        assert!(!deadline_reached(StopKind::SafePoint.level(), false, false));
    }

    #[test]
    fn which_rotations_move_a_session() {
        let generation = |number, dsn: &str| {
            let dsn = dbcred::Dsn::parse(dsn).unwrap();
            Generation::new(number, dsn, &crate::config::RolePolicy::None).unwrap()
        };
        let server_target = "app_a@db1:5432/app";
        let new_password = generation(2, "postgresql://app_a:new@db1:5432/app");
        let other_user = generation(2, "postgresql://app_b:pw@db1:5432/app");
        let other_host = generation(2, "postgresql://app_a:pw@db2:5432/app");
        assert_eq!(
            crate::credentials::describe_dsn(&new_password.dsn),
            server_target,
            "the test's target must be what a server of that DSN records"
        );
        let changed = MigratePolicy::Changed;
        assert!(!changed.moves(1, server_target, &new_password));
        assert!(changed.moves(1, server_target, &other_user));
        assert!(changed.moves(1, server_target, &other_host));
        assert!(MigratePolicy::Always.moves(1, server_target, &new_password));
        assert!(!MigratePolicy::Never.moves(1, server_target, &other_host));
        // A server already of that generation (or a newer one) stays.
        assert!(!MigratePolicy::Always.moves(2, server_target, &other_host));
    }

    fn kv(a: &str, b: &str) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }

    #[test]
    fn deltas() {
        let have = vec![
            kv("work_mem", "4MB"),
            kv("role", "x"),
            kv("search_path", "a"),
        ];
        let want = vec![kv("work_mem", "8MB"), kv("search_path", "a")];
        let d = settings_delta(&have, &want, Some("app"));
        assert_eq!(
            d,
            vec![
                "SET ROLE \"app\"".to_owned(),
                "SELECT pg_catalog.set_config('work_mem', '8MB', false)".to_owned()
            ]
        );
        assert_eq!(
            settings_delta(&have, &[], None),
            vec![
                "RESET \"work_mem\"",
                "RESET \"role\"",
                "RESET \"search_path\""
            ]
        );
        let d = sql_prepared_delta(
            &[
                kv("a", "PREPARE a AS SELECT 1"),
                kv("b", "PREPARE b AS SELECT 2"),
            ],
            &[
                kv("a", "PREPARE a AS SELECT 1"),
                kv("b", "PREPARE b AS SELECT 3"),
            ],
        );
        assert_eq!(d, vec!["DEALLOCATE \"b\"", "PREPARE b AS SELECT 3"]);
        // A restored client_encoding or statement_timeout comes after the other settings and
        // is overridden again for the rest of dbproxy's transaction.
        let have = vec![kv("client_encoding", "LATIN1"), kv("work_mem", "4MB")];
        let want = vec![
            kv("client_encoding", "LATIN9"),
            kv("search_path", "\"sch\u{e9}ma\""),
            kv("statement_timeout", "1ms"),
        ];
        assert_eq!(
            settings_delta(&have, &want, None),
            vec![
                "RESET \"work_mem\"",
                "SELECT pg_catalog.set_config('search_path', '\"sch\u{e9}ma\"', false)",
                "SELECT pg_catalog.set_config('client_encoding', 'LATIN9', false)",
                "SELECT pg_catalog.set_config('statement_timeout', '1ms', false)",
                "SET LOCAL statement_timeout = 0",
                "SET LOCAL lock_timeout = 0",
                "SET LOCAL client_encoding = 'UTF8'",
            ]
        );
        assert_eq!(
            in_transaction(vec!["SELECT 1".to_owned()]),
            vec![
                "BEGIN",
                "SET LOCAL statement_timeout = 0",
                "SET LOCAL lock_timeout = 0",
                "SET LOCAL client_encoding = 'UTF8'",
                "SELECT 1",
                "COMMIT",
            ]
        );
        // A reset with nothing to restore behind it is one statement; with something, the
        // whole transaction.
        assert_eq!(
            restore_statements(&[kv("app.x", "1")], &[], &[], &[], None, true),
            vec!["RESET ALL"]
        );
        let with_setting = restore_statements(&[], &[kv("app.x", "2")], &[], &[], None, true);
        assert_eq!(
            with_setting[..2],
            ["BEGIN", "SET LOCAL statement_timeout = 0"]
        );
        assert!(with_setting.contains(&"RESET ALL".to_owned()));
        assert_eq!(with_setting.last().map(String::as_str), Some("COMMIT"));
        assert_eq!(parse_oid_array("{23,25}"), vec![23, 25]);
        assert!(parse_oid_array("{}").is_empty());
        assert_eq!(
            reported_changes(&[kv("a", "1"), kv("b", "2")], &[kv("a", "1"), kv("b", "3")]),
            vec![kv("b", "3")]
        );
    }
}
