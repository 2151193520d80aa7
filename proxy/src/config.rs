//! Command line and environment: every knob of the proxy, with the defaults the chart relies on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "dbproxy",
    version,
    args_conflicts_with_subcommands = true,
    about = "PostgreSQL sidecar proxy that follows a mounted, rotating credential Secret"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
// Parsed once at startup; boxing RunArgs would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Run(RunArgs),
    /// Wait until a running proxy's /readyz answers 200 (for a postStart hook).
    Wait(WaitArgs),
}

/// `dbproxy wait`: exit 0 once the proxy is ready, 1 when the timeout passes first.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The proxy's ops address (0.0.0.0 means this host).
    #[arg(long = "ops-addr", default_value = "127.0.0.1:9432")]
    pub ops_addr: SocketAddr,

    /// Seconds to wait before giving up.
    #[arg(long = "timeout", default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The DSN file (URI or key=value), or a directory with one file per key.
    #[arg(
        long = "dbc",
        env = "DBPROXY_CREDENTIAL",
        default_value = "/dbproxy/uri_dsn.txt"
    )]
    pub dbc: PathBuf,

    /// Address to accept PostgreSQL clients on (repeatable).
    #[arg(long = "addr", default_values = ["127.0.0.1:5432", "[::1]:5432"])]
    pub addr: Vec<String>,

    /// Address of the HTTP endpoints /healthz, /readyz and /metrics.
    #[arg(long = "ops-addr", default_value = "0.0.0.0:9432")]
    pub ops_addr: SocketAddr,

    /// Pooling mode: `session` (a server per client session) or `transaction` (a server per
    /// transaction; see proxy/POOLING.md).
    #[arg(long = "pool-mode", value_enum, default_value = "session")]
    pub pool_mode: PoolMode,

    /// Maximum number of server connections.
    #[arg(long = "pool-size", default_value_t = 20)]
    pub pool_size: usize,

    /// Server connections kept open even when idle (pgbouncer's min_pool_size), with the
    /// startup parameters of the last client that needed a new one: opened again after an
    /// idle timeout, lifetime or rotation closed them. 0: none (connections open on demand).
    #[arg(long = "min-pool-size", default_value_t = 0)]
    pub min_pool_size: usize,

    /// Maximum number of client connections (at most one million).
    #[arg(
        long = "max-clients",
        default_value_t = 1000,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    pub max_clients: usize,

    /// Seconds a client waits for a server connection before it gets an error.
    #[arg(long = "pool-timeout", default_value_t = 30)]
    pub pool_timeout: u64,

    /// Seconds an idle server connection is kept.
    #[arg(long = "server-idle-timeout", default_value_t = 600)]
    pub server_idle_timeout: u64,

    /// Seconds after which a server connection is closed when released.
    #[arg(long = "server-lifetime", default_value_t = 3600)]
    pub server_lifetime: u64,

    /// Which rotations move live sessions to new server connections at their next idle
    /// point (session mode): `changed` (user, host, port or database changed), `always`, or
    /// `never`. Transaction mode moves every new transaction anyway.
    #[arg(long = "migrate", value_enum, default_value = "changed")]
    pub migrate: crate::migrate::MigratePolicy,

    /// Seconds a session that cannot move (LISTEN, temporary tables, WITH HOLD cursors,
    /// session advisory locks, or never idle) keeps its old server after a rotation asked it
    /// to move; then it is closed with FATAL 57P01 saying why, once a query in flight has
    /// finished (at most 5 s more).
    #[arg(long = "migration-timeout", default_value_t = 60)]
    pub migration_timeout: u64,

    /// Transaction mode: prepared statements kept per server connection (least recently used
    /// closed first), like pgbouncer's max_prepared_statements.
    #[arg(long = "max-prepared-statements", default_value_t = 200)]
    pub max_prepared_statements: usize,

    /// Transaction mode: before a server connection serves another client, its settings are
    /// reset (`RESET ALL`, then that client's own settings), so a setting changed where
    /// dbproxy cannot see it (inside a function the client called) never reaches another
    /// client; such a setting then lasts only while its server keeps serving its client.
    /// Costs one round trip each time a server changes client.
    #[arg(long = "reset-settings-between-clients")]
    pub reset_settings_between_clients: bool,

    /// Seconds to keep serving normally after SIGTERM (the app is shutting down too and
    /// still needs its database) before refusing new clients and draining.
    #[arg(long = "shutdown-delay", default_value_t = 5)]
    pub shutdown_delay: u64,

    /// Seconds sessions may take to finish after the shutdown delay.
    #[arg(long = "shutdown-timeout", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Role to `SET ROLE` to on every server connection.
    #[arg(long = "set-role", conflicts_with = "set_base_role")]
    pub set_role: Option<String>,

    /// `SET ROLE` to the DSN user without its `_a`/`_b` suffix (db-controller's users).
    #[arg(long = "set-base-role")]
    pub set_base_role: bool,

    /// Seconds between fallback re-reads of the DSN file.
    #[arg(long = "poll-interval", default_value_t = 10)]
    pub poll_interval: u64,

    /// Seconds a validation login of a new DSN may take.
    #[arg(long = "validate-timeout", default_value_t = 10)]
    pub validate_timeout: u64,

    /// Log format.
    #[arg(long = "log-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// File with the password clients must present on non-loopback listeners (SCRAM-SHA-256).
    #[arg(long = "client-password-file")]
    pub client_password_file: Option<PathBuf>,

    /// User name allowed to use the admin console from non-loopback listeners (it logs in
    /// with the --client-password-file password); loopback clients may always use it.
    #[arg(long = "admin-user")]
    pub admin_user: Option<String>,

    /// Largest client message accepted, in bytes; larger ones end the session with 08P01.
    #[arg(long = "max-client-message", default_value_t = 256 * 1024 * 1024)]
    pub max_client_message: usize,

    /// Seconds a client may take to finish its startup and login.
    #[arg(long = "client-login-timeout", default_value_t = 15)]
    pub client_login_timeout: u64,

    /// Parks idle clients after N to 2N milliseconds of silence: the socket (in session
    /// mode, the session's server socket too) leaves the runtime and waits with no task in
    /// one epoll set until either side speaks again. Half to two thirds of an idle client's
    /// memory goes (plaintext only: a TLS client, or a session over TLS to the server, is
    /// never parked); a parked client's next query costs a few syscalls and a task spawn
    /// more (about 30 us). 0 never parks.
    #[arg(long = "client-park-after-ms", default_value_t = 10_000)]
    pub client_park_after_ms: u64,

    /// Runtime worker threads; 0 runs everything on one thread (lowest CPU per query).
    #[arg(long = "worker-threads", default_value_t = 0)]
    pub worker_threads: usize,

    /// Session mode with --worker-threads 0: a thread of its own forwards the sessions that
    /// are plaintext on both sides (one epoll set, no task per session: a third of the
    /// instructions per select-only query, about half the user CPU; system time is the
    /// same); logins, moves, resets and everything else stay on the runtime. `false`
    /// forwards every session on the runtime.
    #[arg(long = "session-lane", default_value_t = true, action = clap::ArgAction::Set)]
    pub session_lane: bool,

    /// Transactions a session runs on the runtime before it enters the session lane (an
    /// idle spell of --client-park-after-ms sends it there too); 0, the default, enters
    /// right after the login. Entering and leaving cost a session about 25 us of system
    /// calls and thread hand-offs, which clients that connect for each transaction may
    /// rather not pay (32 makes pgbench -C as cheap as with the lane off); but a session
    /// that enters after its task has run keeps more memory while idle (about 2.7 kB with
    /// its server connection, against 1 kB when it enters at once).
    #[arg(long = "session-lane-after", default_value_t = 0)]
    pub session_lane_after: u32,

    /// Transaction mode with --worker-threads 0: a thread of its own holds the idle
    /// plaintext clients and forwards their transactions over the server connections it
    /// takes from the pool (one epoll set, no task per client); logins, bringing a server in
    /// line with a client's session, pinned sessions, errors and TLS stay on the runtime.
    /// `false` serves every client on the runtime.
    #[arg(long = "transaction-lane", default_value_t = true, action = clap::ArgAction::Set)]
    pub transaction_lane: bool,

    /// Transactions a client runs on the runtime before it enters the transaction lane (an
    /// idle spell of --client-park-after-ms sends it there too); 0, the default, enters right
    /// after the login. Entering costs a client a move of its socket between two epoll sets,
    /// about 15 us of CPU (pgbench -C, one select-only transaction per connection): 1 keeps
    /// clients that connect for one transaction out of the lane.
    #[arg(long = "transaction-lane-after", default_value_t = 0)]
    pub transaction_lane_after: u32,

    /// TLS for clients: `disable` answers N to SSLRequest, `allow`/`prefer` accept TLS when
    /// asked, `require` refuses plaintext clients.
    #[arg(long = "client-tls", value_enum, default_value = "prefer")]
    pub client_tls: crate::tls::ClientTlsMode,

    /// PEM certificate chain for client TLS (reloaded when it changes); without it a
    /// self-signed certificate is generated at startup.
    #[arg(long = "client-tls-cert", requires = "client_tls_key")]
    pub client_tls_cert: Option<PathBuf>,

    /// PEM private key of --client-tls-cert.
    #[arg(long = "client-tls-key", requires = "client_tls_cert")]
    pub client_tls_key: Option<PathBuf>,
}

impl Cli {
    /// The run arguments, whether given with or without the `run` subcommand.
    pub fn into_run_args(self) -> RunArgs {
        match self.command {
            Some(Command::Run(args)) => args,
            Some(Command::Wait(_)) | None => self.run,
        }
    }
}

/// Which role to `SET ROLE` to after login and after each reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolePolicy {
    None,
    Fixed(String),
    /// Strip `_a`/`_b` from the DSN user.
    BaseOfUser,
}

impl RolePolicy {
    /// The role for a given DSN user, if any.
    pub fn role_for(&self, user: &str) -> Option<String> {
        match self {
            RolePolicy::None => None,
            RolePolicy::Fixed(r) => Some(r.clone()),
            RolePolicy::BaseOfUser => Some(base_role(user).to_owned()),
        }
    }
}

/// db-controller names its two users `<role>_a` and `<role>_b`.
pub fn base_role(user: &str) -> &str {
    user.strip_suffix("_a")
        .or_else(|| user.strip_suffix("_b"))
        .filter(|s| !s.is_empty())
        .unwrap_or(user)
}

impl RunArgs {
    pub fn role_policy(&self) -> RolePolicy {
        match (&self.set_role, self.set_base_role) {
            (Some(r), _) => RolePolicy::Fixed(r.clone()),
            (None, true) => RolePolicy::BaseOfUser,
            (None, false) => RolePolicy::None,
        }
    }
    pub fn pool_timeout(&self) -> Duration {
        Duration::from_secs(self.pool_timeout)
    }
    pub fn validate_timeout(&self) -> Duration {
        Duration::from_secs(self.validate_timeout.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_run_subcommand() {
        let cli = Cli::try_parse_from(["dbproxy"]).unwrap().into_run_args();
        assert_eq!(cli.addr, vec!["127.0.0.1:5432", "[::1]:5432"]);
        assert_eq!(cli.pool_size, 20);
        // Server connections open on demand unless --min-pool-size says otherwise.
        assert_eq!(cli.min_pool_size, 0);
        assert_eq!(cli.pool_mode, PoolMode::Session);
        // Idle clients park after 10 to 20 s of silence unless told otherwise.
        assert_eq!(cli.client_park_after_ms, 10_000);
        let cli = Cli::try_parse_from(["dbproxy", "run", "--dbc", "/x", "--addr", "127.0.0.1:1"])
            .unwrap()
            .into_run_args();
        assert_eq!(cli.dbc, PathBuf::from("/x"));
        assert_eq!(cli.addr, vec!["127.0.0.1:1"]);
    }

    #[test]
    fn base_role_strips_suffix() {
        assert_eq!(base_role("myapp_a"), "myapp");
        assert_eq!(base_role("myapp_b"), "myapp");
        assert_eq!(base_role("myapp"), "myapp");
        assert_eq!(base_role("_a"), "_a");
        assert_eq!(RolePolicy::BaseOfUser.role_for("x_b").as_deref(), Some("x"));
    }
}
