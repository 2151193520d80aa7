//! Throwaway PostgreSQL clusters started from the system's server binaries, so tests talk to a real server.
//!
//! Each cluster lives in its own temporary directory (data, Unix socket, server log), listens on
//! 127.0.0.1 at a free port and is stopped and removed on drop. `initdb` is slow, so one
//! initialised data directory is cached per set of server binaries (in the target directory) and
//! copied for every cluster. As root, the server runs as `nobody` because PostgreSQL refuses root.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{PermissionsExt, lchown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use rand::Rng;
use tokio_postgres::NoTls;

/// What to tell a developer whose machine lacks the server binaries.
const INSTALL_HINT: &str = "install the PostgreSQL server: apt-get install postgresql";
/// Name of the bootstrap superuser of every cluster.
const SUPERUSER: &str = "postgres";
/// How long a server may take to start or stop on a loaded 2-core machine.
const SERVER_DEADLINE: Duration = Duration::from_secs(60);
/// Attempts to find a free port before giving up.
const PORT_ATTEMPTS: usize = 8;
/// Bump when the template's layout changes so stale caches are ignored.
const TEMPLATE_FORMAT: u32 = 1;
/// Set to `1` to run `initdb` for every cluster instead of copying the cached template.
const NO_TEMPLATE_ENV: &str = "DBTESTS_PG_NO_TEMPLATE";
/// Overrides where the server binaries are searched.
const BIN_DIR_ENV: &str = "DBTESTS_PG_BIN_DIR";
/// Overrides where cluster directories are created.
const TMPDIR_ENV: &str = "DBTESTS_PG_TMPDIR";

/// How a role's password is stored on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordKind {
    /// A SCRAM-SHA-256 verifier (the default since PostgreSQL 14).
    Scram,
    /// An `md5` hash of password and role name (legacy servers and clients).
    Md5,
}

/// The server's authentication method for TCP and socket logins (pg_hba.conf), so the proxy can be
/// tested against each method it must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMethod {
    /// `scram-sha-256`: only roles with a SCRAM verifier can log in.
    #[default]
    ScramSha256,
    /// `md5`: md5 roles use md5, roles with a SCRAM verifier still use SCRAM.
    Md5,
    /// `password`: the client sends the password in clear text.
    Password,
}

impl AuthMethod {
    /// The keyword in pg_hba.conf.
    pub fn hba_keyword(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Password => "password",
        }
    }
}

/// Settings for [`PgCluster::start_with`]; `PgOptions::default()` is what [`PgCluster::start`] uses.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Authentication method written to pg_hba.conf (ignored when `hba` is not empty).
    pub auth: AuthMethod,
    /// `max_connections`; load tests need more than PostgreSQL's default of 100.
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines, appended after the harness's own (so they win).
    pub extra_conf: Vec<String>,
    /// Replaces the generated pg_hba.conf lines when not empty.
    pub hba: Vec<String>,
    /// Directory holding `initdb` and `postgres`; found automatically when `None`.
    pub bin_dir: Option<PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            auth: AuthMethod::ScramSha256,
            max_connections: 200,
            extra_conf: Vec::new(),
            hba: Vec::new(),
            bin_dir: None,
        }
    }
}

/// The unprivileged account the server runs as when the tests run as root.
#[derive(Debug, Clone, Copy)]
struct ServerUser {
    uid: u32,
    gid: u32,
}

/// A running throwaway cluster; stopped and removed on drop (also after a panic).
pub struct PgCluster {
    /// Owns the directory; removed when dropped, after `Drop` stopped the server.
    root: tempfile::TempDir,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    superuser_password: String,
    run_as: Option<ServerUser>,
    /// The postmaster, when running.
    server: Option<Child>,
}

impl std::fmt::Debug for PgCluster {
    /// Leaves out the superuser password so a `{:?}` never prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.root.path())
            .field("port", &self.port)
            .field("running", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl PgCluster {
    /// Starts a new cluster with scram-sha-256 auth on 127.0.0.1 and a random free port.
    pub fn start() -> anyhow::Result<PgCluster> {
        Self::start_with(PgOptions::default())
    }

    /// Starts a new cluster with the given options.
    pub fn start_with(options: PgOptions) -> anyhow::Result<PgCluster> {
        let bin_dir = match &options.bin_dir {
            Some(dir) => check_bin_dir(dir)?,
            None => Self::bin_dir()?,
        };
        let run_as = server_user()?;
        let root = tempfile::Builder::new()
            .prefix("dbtests-pg-")
            .tempdir_in(scratch_base(run_as))
            .context("creating the cluster's temporary directory")?;
        let data_dir = root.path().join("data");
        let socket_dir = root.path().join("sock");
        let log_path = root.path().join("server.log");
        fs::create_dir(&socket_dir).context("creating the socket directory")?;

        let superuser_password = if std::env::var_os(NO_TEMPLATE_ENV).is_some_and(|v| v == "1") {
            let password = random_password();
            run_initdb(&bin_dir, root.path(), &data_dir, &password, run_as)?;
            password
        } else {
            let template = template_for(&bin_dir, run_as)?;
            copy_tree(&template.data_dir, &data_dir, run_as)
                .context("copying the cached template data directory")?;
            template.superuser_password.clone()
        };
        if let Some(user) = run_as {
            for dir in [root.path(), &socket_dir] {
                lchown(dir, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("chown {}", dir.display()))?;
            }
        }
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))?;
        write_config(&data_dir, &socket_dir, &options)?;

        let mut cluster = PgCluster {
            root,
            data_dir,
            socket_dir,
            log_path,
            bin_dir,
            port: 0,
            superuser_password,
            run_as,
            server: None,
        };
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(StartError::PortInUse) => {
                    last_error = Some(anyhow!("port {} was taken", cluster.port));
                }
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!("no free port found after {PORT_ATTEMPTS} attempts")))
    }

    /// Where the server binaries live (`initdb`, `postgres`, `psql`, `pgbench`): env
    /// `DBTESTS_PG_BIN_DIR`, else the directory of `initdb` on PATH, else the highest version under
    /// `/usr/lib/postgresql/*/bin`.
    pub fn bin_dir() -> anyhow::Result<PathBuf> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return check_bin_dir(Path::new(&dir));
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let initdb = dir.join("initdb");
                if initdb.is_file() {
                    // /usr/local/bin/initdb may be a symlink into the real bin dir.
                    let real = fs::canonicalize(&initdb).unwrap_or(initdb);
                    if let Some(parent) = real.parent()
                        && let Ok(found) = check_bin_dir(parent)
                    {
                        return Ok(found);
                    }
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = Vec::new();
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let version = name
                    .to_string_lossy()
                    .split('.')
                    .next()
                    .and_then(|v| v.parse().ok());
                let bin = entry.path().join("bin");
                if let Some(version) = version
                    && check_bin_dir(&bin).is_ok()
                {
                    versions.push((version, bin));
                }
            }
        }
        versions.sort();
        match versions.pop() {
            Some((_, bin)) => Ok(bin),
            None => bail!(
                "PostgreSQL server binaries (initdb, postgres) not found on PATH nor under \
                 /usr/lib/postgresql/*/bin; {INSTALL_HINT}"
            ),
        }
    }

    /// Host to connect to over TCP.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// TCP port (and Unix socket number) of the server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory holding data, socket and log; removed on drop.
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// Directory of the server binaries this cluster runs.
    pub fn server_bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Name of the bootstrap superuser.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// Password of the bootstrap superuser (stored as a SCRAM verifier).
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// A percent-encoded `postgres://` URI for this server with `sslmode=disable`.
    pub fn uri(&self, user: &str, password: &str, dbname: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}?sslmode=disable",
            uri_encode(user),
            uri_encode(password),
            self.host(),
            self.port,
            uri_encode(dbname)
        )
    }

    /// Logs in over TCP without TLS; the connection task runs on the current tokio runtime.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        dbname: &str,
    ) -> anyhow::Result<tokio_postgres::Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(30));
        let (client, connection) = config.connect(NoTls).await.with_context(|| {
            format!(
                "connecting to {}:{} as {user:?}, database {dbname:?}",
                self.host(),
                self.port
            )
        })?;
        tokio::spawn(async move {
            // The error (if any) surfaces on the client's next call; nothing to do here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A client logged in as the superuser to database `postgres`.
    pub async fn superuser_client(&self) -> anyhow::Result<tokio_postgres::Client> {
        self.connect(SUPERUSER, &self.superuser_password, "postgres")
            .await
    }

    /// Runs SQL (possibly several statements) as the superuser with the simple protocol.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        let client = self.superuser_client().await?;
        client
            .batch_execute(sql)
            .await
            .context("running SQL as the superuser")?;
        Ok(())
    }

    /// Creates a LOGIN role; the password is hashed here so no statement ever carries it in clear.
    pub async fn create_role(
        &self,
        name: &str,
        password: &str,
        kind: PasswordKind,
    ) -> anyhow::Result<()> {
        let sql = format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            escape_identifier(name),
            escape_literal(&hash_password(name, password, kind))
        );
        self.execute(&sql)
            .await
            .with_context(|| format!("creating role {name:?}"))
    }

    /// Creates a NOLOGIN role, for example the group `myapp` that `myapp_a`/`myapp_b` belong to.
    pub async fn create_group_role(&self, name: &str) -> anyhow::Result<()> {
        let sql = format!("CREATE ROLE {} NOLOGIN", escape_identifier(name));
        self.execute(&sql)
            .await
            .with_context(|| format!("creating group role {name:?}"))
    }

    /// Makes `member` a member of `group`.
    pub async fn grant_role(&self, member: &str, group: &str) -> anyhow::Result<()> {
        let sql = format!(
            "GRANT {} TO {}",
            escape_identifier(group),
            escape_identifier(member)
        );
        self.execute(&sql)
            .await
            .with_context(|| format!("granting {group:?} to {member:?}"))
    }

    /// Changes a role's password (hashed here); existing sessions stay, new logins need the new one.
    pub async fn alter_password(
        &self,
        name: &str,
        password: &str,
        kind: PasswordKind,
    ) -> anyhow::Result<()> {
        let sql = format!(
            "ALTER ROLE {} PASSWORD {}",
            escape_identifier(name),
            escape_literal(&hash_password(name, password, kind))
        );
        self.execute(&sql)
            .await
            .with_context(|| format!("changing the password of role {name:?}"))
    }

    /// Creates a database owned by `owner`.
    pub async fn create_database(&self, name: &str, owner: &str) -> anyhow::Result<()> {
        let sql = format!(
            "CREATE DATABASE {} OWNER {}",
            escape_identifier(name),
            escape_identifier(owner)
        );
        self.execute(&sql)
            .await
            .with_context(|| format!("creating database {name:?}"))
    }

    /// Whether the postmaster is running (not stopped or killed).
    pub fn is_running(&mut self) -> bool {
        match &mut self.server {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fast shutdown (sessions are terminated, a checkpoint is written), waiting until it is down.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown(libc::SIGINT)
    }

    /// Stops (if running) and starts the server again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        // The port is ours until someone else binds it; retry briefly in case of a race.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.start_server() {
                Ok(()) => return Ok(()),
                Err(StartError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::PortInUse) => {
                    bail!(
                        "restart failed: port {} is taken by another process",
                        self.port
                    )
                }
                Err(StartError::Other(e)) => return Err(e.context("restarting the server")),
            }
        }
    }

    /// Crashes the server: SIGKILL to the postmaster and every server process, like a host failure.
    /// Clients see their connections drop; [`PgCluster::restart`] recovers the data. The harness
    /// runs with `synchronous_commit = off`, so a commit from the last moment before the crash can
    /// be lost unless the session ran `SET synchronous_commit = on`.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let pid = child_pid(&child)?;
        // Freeze the postmaster so it cannot fork while its children are collected.
        // SAFETY: plain signal to a process we started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let children = child_pids(pid);
        for &c in &children {
            // SAFETY: plain signal; children of our postmaster are server processes.
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
        // SAFETY: plain signal to a process we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        child.wait().context("waiting for the killed postmaster")?;
        let deadline = Instant::now() + SERVER_DEADLINE;
        while children.iter().any(|&c| process_alive(c)) {
            if Instant::now() > deadline {
                bail!("server processes {children:?} survived SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.remove_stale_lock();
        Ok(())
    }

    /// The server log so far (connections, errors; statements are not logged).
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("(server log {} unreadable: {e})", self.log_path.display()),
        }
    }

    /// Starts the postmaster on `self.port` and waits until it accepts connections.
    fn start_server(&mut self) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the server log")?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .current_dir(self.root.path())
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log handle")?)
            .stderr(log)
            .process_group(0);
        if let Some(user) = self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        // SAFETY: prctl and getppid are async-signal-safe; no allocation happens in the closure.
        unsafe {
            command.pre_exec(|| {
                // The server must not outlive a test process that was killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_from_long_lived_thread(command)
            .with_context(|| format!("starting {}", self.bin_dir.join("postgres").display()))?;
        self.server = Some(child);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.force_down();
                let new_log = self.log_since(log_start);
                if new_log.contains("could not bind") || new_log.contains("Address already in use")
                {
                    return Err(StartError::PortInUse);
                }
                Err(StartError::Other(e.context(format!(
                    "PostgreSQL did not start; server log:\n{}",
                    tail(&new_log, 100)
                ))))
            }
        }
    }

    /// Polls until postmaster.pid says `ready` and the TCP port answers, or the server exits.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SERVER_DEADLINE;
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            let child = self
                .server
                .as_mut()
                .ok_or_else(|| anyhow!("server not started"))?;
            if let Some(status) = child.try_wait()? {
                bail!("postgres exited during startup with {status}");
            }
            let pid = child.id();
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let lines: Vec<&str> = text.lines().collect();
                let ours = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid);
                let ready = lines.get(7).map(|l| l.trim()) == Some("ready");
                if ours
                    && ready
                    && TcpStream::connect_timeout(
                        &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
                        Duration::from_secs(2),
                    )
                    .is_ok()
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("postgres not ready after {SERVER_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals the postmaster (SIGINT fast, SIGQUIT immediate) and waits; SIGKILL after the deadline.
    fn shutdown(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = child_pid(&child)?;
        // SAFETY: plain signal to a process we started and have not reaped.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.server = Some(child);
                self.kill()?;
                bail!("server ignored shutdown signal {signal} for {SERVER_DEADLINE:?}; killed it");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Best effort: bring the server down no matter what (used on failed starts and drop).
    fn force_down(&mut self) {
        if self.shutdown(libc::SIGQUIT).is_err() {
            let _ = self.kill();
        }
    }

    /// After a crash, drops the old lock file and its System V segment (nothing is attached any
    /// more) so neither leaks when the cluster is removed, and restart starts cleanly.
    fn remove_stale_lock(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        if let Ok(text) = fs::read_to_string(&pid_file) {
            let shm_id = text
                .lines()
                .nth(6)
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|id| id.parse::<libc::c_int>().ok());
            if let Some(id) = shm_id {
                // SAFETY: IPC_RMID with a null buffer only marks the segment for removal.
                unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
            let _ = fs::remove_file(&pid_file);
        }
    }

    /// Log text written since byte `offset`.
    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path)
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of the PostgreSQL log ({}) ----\n{}\n---- end of PostgreSQL log ----",
                self.log_path.display(),
                tail(&self.log(), 100)
            );
        }
        self.force_down();
        self.remove_stale_lock();
        // `self.root` removes the directory when it is dropped right after this.
    }
}

/// Why one start attempt failed: a taken port is retried with another one.
enum StartError {
    PortInUse,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> Self {
        StartError::Other(e)
    }
}

/// The text PostgreSQL stores for a password, so the clear text never reaches the server.
fn hash_password(name: &str, password: &str, kind: PasswordKind) -> String {
    match kind {
        PasswordKind::Scram => postgres_protocol::password::scram_sha_256(password.as_bytes()),
        PasswordKind::Md5 => postgres_protocol::password::md5(password.as_bytes(), name),
    }
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
fn uri_encode(text: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SET).to_string()
}

/// A 32-character alphanumeric password.
fn random_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Checks that `dir` holds the server binaries and returns it.
fn check_bin_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    for name in ["initdb", "postgres"] {
        if !dir.join(name).is_file() {
            bail!(
                "PostgreSQL server binary {name} not found in {}; {INSTALL_HINT}",
                dir.display()
            );
        }
    }
    Ok(dir.to_path_buf())
}

/// As root, the account the server runs as (`nobody`); otherwise `None` (run as ourselves).
fn server_user() -> anyhow::Result<Option<ServerUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("nobody").map_err(|e| anyhow!("{e}"))?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Ok(Some(ServerUser {
            uid: 65534,
            gid: 65534,
        }));
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some(ServerUser { uid, gid }))
}

/// Where cluster directories go: env `DBTESTS_PG_TMPDIR`, else /dev/shm when it is a roomy tmpfs
/// (creating the ~1000 files of a data directory costs about 1 s on this machine's ext4 and 60 ms
/// on tmpfs), else /tmp (as root the server user must be able to traverse the path, so not
/// `$TMPDIR`, which may be under /root).
fn scratch_base(run_as: Option<ServerUser>) -> PathBuf {
    if let Some(dir) = std::env::var_os(TMPDIR_ENV) {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if free_bytes(shm).is_some_and(|free| free >= 2 << 30) {
        return shm.to_path_buf();
    }
    if run_as.is_some() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    }
}

/// Free space of the file system holding `dir`, if it is a writable directory.
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: access and statvfs only read the NUL-terminated path; `stat` is a plain out-struct.
    unsafe {
        if libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) != 0 {
            return None;
        }
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return None;
        }
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
}

/// Runs `initdb` into `data_dir` (created here) with `password` for the superuser.
fn run_initdb(
    bin_dir: &Path,
    work_dir: &Path,
    data_dir: &Path,
    password: &str,
    run_as: Option<ServerUser>,
) -> anyhow::Result<()> {
    fs::create_dir(data_dir).context("creating the data directory")?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))?;
    let pwfile = work_dir.join("pwfile");
    fs::write(&pwfile, password)?;
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))?;
    if let Some(user) = run_as {
        for path in [work_dir, data_dir, &pwfile] {
            lchown(path, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
    }
    let mut command = Command::new(bin_dir.join("initdb"));
    command
        .arg("-D")
        .arg(data_dir)
        .arg("-U")
        .arg(SUPERUSER)
        .arg("--pwfile")
        .arg(&pwfile)
        .args([
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ])
        .current_dir(work_dir)
        .env_remove("PGDATA")
        .stdin(Stdio::null());
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", bin_dir.join("initdb").display()))?;
    let _ = fs::remove_file(&pwfile);
    if !output.status.success() {
        bail!(
            "initdb failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// An initialised data directory to copy, with its superuser password.
struct Template {
    data_dir: PathBuf,
    superuser_password: String,
}

/// The cached template for these binaries: built once (by whichever test process comes first) in
/// the target directory and reused by every later cluster and process.
fn template_for(bin_dir: &Path, run_as: Option<ServerUser>) -> anyhow::Result<Arc<Template>> {
    static TEMPLATES: OnceLock<Mutex<HashMap<PathBuf, Arc<Template>>>> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| Mutex::new(HashMap::new()));
    // Holding the lock while initdb runs makes parallel tests wait for one initdb, not run many.
    let mut map = templates
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(t) = map.get(bin_dir) {
        return Ok(t.clone());
    }
    let cache_root = template_cache_root()?;
    let final_dir = cache_root.join(template_key(bin_dir));
    let template = match load_template(&final_dir) {
        Some(t) => t,
        None => {
            build_template(bin_dir, run_as, &cache_root, &final_dir)?;
            load_template(&final_dir)
                .ok_or_else(|| anyhow!("template {} unusable", final_dir.display()))?
        }
    };
    let template = Arc::new(template);
    map.insert(bin_dir.to_path_buf(), template.clone());
    Ok(template)
}

/// `<target>/dbtests-pg-template`, or a per-user directory in the temp dir when the target
/// directory is not writable (tests run as another user).
fn template_cache_root() -> anyhow::Result<PathBuf> {
    let in_target = crate::binaries::target_dir().join("dbtests-pg-template");
    if fs::create_dir_all(&in_target).is_ok() && free_bytes(&in_target).is_some() {
        return Ok(in_target);
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let fallback = std::env::temp_dir().join(format!("dbtests-pg-template-{euid}"));
    fs::create_dir_all(&fallback).with_context(|| format!("creating {}", fallback.display()))?;
    fs::set_permissions(&fallback, fs::Permissions::from_mode(0o700))?;
    Ok(fallback)
}

/// Cache key: binaries' location and build, so a server upgrade gets a fresh template.
fn template_key(bin_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    TEMPLATE_FORMAT.hash(&mut hasher);
    bin_dir.hash(&mut hasher);
    if let Ok(meta) = fs::metadata(bin_dir.join("postgres")) {
        meta.len().hash(&mut hasher);
        meta.modified().ok().hash(&mut hasher);
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    format!("v{TEMPLATE_FORMAT}-{euid}-{:016x}", hasher.finish())
}

/// A complete template directory (it is renamed into place only once complete).
fn load_template(dir: &Path) -> Option<Template> {
    let superuser_password = fs::read_to_string(dir.join("superuser_password")).ok()?;
    let data_dir = dir.join("data");
    data_dir.join("PG_VERSION").is_file().then_some(Template {
        data_dir,
        superuser_password,
    })
}

/// Runs initdb in a scratch directory, then publishes the result atomically under `final_dir`.
fn build_template(
    bin_dir: &Path,
    run_as: Option<ServerUser>,
    cache_root: &Path,
    final_dir: &Path,
) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("dbtests-initdb-")
        .tempdir_in(scratch_base(run_as))
        .context("creating a scratch directory for initdb")?;
    let password = random_password();
    let scratch_data = scratch.path().join("data");
    run_initdb(bin_dir, scratch.path(), &scratch_data, &password, run_as)?;

    let staging = tempfile::Builder::new()
        .prefix("staging-")
        .tempdir_in(cache_root)
        .context("creating the template staging directory")?;
    copy_tree(&scratch_data, &staging.path().join("data"), None)?;
    let pw_path = staging.path().join("superuser_password");
    fs::write(&pw_path, &password)?;
    fs::set_permissions(&pw_path, fs::Permissions::from_mode(0o600))?;
    let staging_path = staging.keep();
    if let Err(e) = fs::rename(&staging_path, final_dir) {
        let _ = fs::remove_dir_all(&staging_path);
        // Another process published its template first: use that one.
        if load_template(final_dir).is_none() {
            return Err(e).with_context(|| format!("publishing template {}", final_dir.display()));
        }
    }
    Ok(())
}

/// Recursive copy preserving modes; chowns everything to `owner` when given.
fn copy_tree(from: &Path, to: &Path, owner: Option<ServerUser>) -> io::Result<()> {
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::metadata(from)?.permissions())?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target, owner)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
        if let Some(user) = owner {
            lchown(&target, Some(user.uid), Some(user.gid))?;
        }
    }
    if let Some(user) = owner {
        lchown(to, Some(user.uid), Some(user.gid))?;
    }
    Ok(())
}

/// Writes the harness's settings and pg_hba.conf into a fresh data directory.
fn write_config(data_dir: &Path, socket_dir: &Path, options: &PgOptions) -> anyhow::Result<()> {
    let socket = socket_dir
        .to_str()
        .ok_or_else(|| anyhow!("socket directory path is not UTF-8"))?
        .replace('\'', "''");
    let password_encryption = match options.auth {
        AuthMethod::Md5 => "md5",
        _ => "scram-sha-256",
    };
    let mut conf = format!(
        "\n# dbtests harness\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{socket}'\n\
         max_connections = {}\n\
         shared_buffers = 16MB\n\
         dynamic_shared_memory_type = mmap\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         password_encryption = '{password_encryption}'\n\
         logging_collector = off\n\
         log_connections = on\n\
         log_statement = none\n\
         log_min_error_statement = panic\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n",
        options.max_connections
    );
    for line in &options.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    let conf_path = data_dir.join("postgresql.conf");
    let mut existing = fs::read_to_string(&conf_path).context("reading postgresql.conf")?;
    existing.push_str(&conf);
    fs::write(&conf_path, existing).context("writing postgresql.conf")?;

    let hba = if options.hba.is_empty() {
        let method = options.auth.hba_keyword();
        format!(
            "local all all {method}\nhost all all 127.0.0.1/32 {method}\nhost all all ::1/128 {method}\n"
        )
    } else {
        let mut hba = options.hba.join("\n");
        hba.push('\n');
        hba
    };
    fs::write(data_dir.join("pg_hba.conf"), hba).context("writing pg_hba.conf")?;
    Ok(())
}

/// A port the kernel considered free a moment ago (start retries if someone takes it meanwhile).
fn free_port() -> anyhow::Result<u16> {
    crate::load::free_port()
}

/// Spawns from one thread that lives as long as the process: PR_SET_PDEATHSIG fires when the
/// spawning *thread* exits, and test threads end while a shared cluster may still be in use.
fn spawn_from_long_lived_thread(command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("dbtests-pg-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("dbtests: cannot start the spawner thread: {e}"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

fn child_pid(child: &Child) -> anyhow::Result<libc::pid_t> {
    libc::pid_t::try_from(child.id()).map_err(|_| anyhow!("pid {} out of range", child.id()))
}

/// Direct children of `parent`, from /proc.
fn child_pids(parent: libc::pid_t) -> Vec<libc::pid_t> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent) {
            pids.push(pid);
        }
    }
    pids
}

/// State letter and parent pid of a process.
fn proc_stat(pid: libc::pid_t) -> Option<(char, libc::pid_t)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Alive and not a zombie (a zombie holds no shared memory).
fn process_alive(pid: libc::pid_t) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
