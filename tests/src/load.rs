//! Client workloads shared by the demo and the benchmark command.
//!
//! Everything here drives real processes over loopback: rotated passwords generated the
//! way db-controller does, the `dbproxy` release binary and its `/readyz` probe, CPU and
//! memory readings from `/proc`, and a bounded concurrent client loop that records which
//! credentials served each new session.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::SecretDir;

/// Characters that need escaping in a URI (or quoting in libpq's key=value form). Every
/// rotated password carries all of them so escaping bugs cannot hide.
pub const URI_HOSTILE_CHARS: &[char] = &['@', ':', '/', '?', '#', '%', '\'', '\\', ' ', '&', '='];

/// A password like db-controller generates (20 characters of mixed classes from the
/// `passwords` crate) with every URI-hostile character inserted at a random inner position.
pub fn generate_password() -> anyhow::Result<String> {
    let generator = passwords::PasswordGenerator {
        length: 20,
        numbers: true,
        lowercase_letters: true,
        uppercase_letters: true,
        symbols: true,
        spaces: false,
        exclude_similar_characters: false,
        strict: true,
    };
    let base = generator
        .generate_one()
        .map_err(|e| anyhow::anyhow!("password generator: {e}"))?;
    let mut chars: Vec<char> = base.chars().collect();
    let mut rng = rand::rng();
    for &c in URI_HOSTILE_CHARS {
        // Never first or last: leading/trailing spaces are legal but not what this tests.
        let at = rng.random_range(1..chars.len());
        chars.insert(at, c);
    }
    Ok(chars.into_iter().collect())
}

/// Scrubs known secrets out of text before it is printed (errors, process logs).
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<Mutex<Vec<String>>>,
}

impl Redactor {
    /// Remembers a secret (and its percent-encoded form) so `redact` removes it.
    pub fn add(&self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        secrets.push(secret.to_owned());
        let encoded = percent_encode_all(secret);
        if encoded != secret {
            secrets.push(encoded);
        }
    }

    /// Whether `text` contains any known secret (to prove logs stay clean).
    pub fn leaks(&self, text: &str) -> bool {
        let secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        secrets.iter().any(|s| text.contains(s.as_str()))
    }

    /// `text` with every known secret replaced by `<redacted>`.
    pub fn redact(&self, text: &str) -> String {
        let secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = text.to_owned();
        for s in secrets.iter() {
            out = out.replace(s.as_str(), "<redacted>");
        }
        out
    }
}

/// Percent-encodes every byte that is not alphanumeric or `-._~` (RFC 3986 unreserved).
fn percent_encode_all(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Publishes `uri` as the Secret's `uri_dsn.txt`, one kubelet atomic update.
pub fn write_uri_dsn(secret: &SecretDir, uri: &str) -> anyhow::Result<()> {
    secret
        .write(&[("uri_dsn.txt", uri.as_bytes())])
        .context("writing uri_dsn.txt into the Secret directory")
}

/// A free TCP port on 127.0.0.1 (bound then released). The kernel may hand out a port it
/// has just released again, so a port this process handed out recently is not handed out
/// twice: a proxy's listener and ops port, asked for in a row, once got the same one.
pub fn free_port() -> anyhow::Result<u16> {
    static RECENT: std::sync::Mutex<std::collections::VecDeque<u16>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
        let port = l.local_addr()?.port();
        let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
        if recent.contains(&port) {
            continue;
        }
        if recent.len() >= 1024 {
            recent.pop_front();
        }
        recent.push_back(port);
        return Ok(port);
    }
    bail!("no free TCP port on 127.0.0.1 that this process has not handed out recently")
}

/// A free `127.0.0.1:port` address.
pub fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// The `dbproxy` binary: `$DBPROXY_BIN` if set, otherwise the workspace's own, built now in
/// the running executable's profile when missing or stale (so `cargo run --release` of the
/// demo or the benchmark uses an optimised proxy).
pub fn dbproxy_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("DBPROXY_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("DBPROXY_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    eprintln!("checking dbproxy build (cargo build -p dbproxy, same profile as this program)...");
    crate::binaries::workspace_bin("dbproxy")
}

/// Where pgbench lives: next to the server binaries the harness uses, else on PATH.
pub fn pgbench_bin() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = crate::PgCluster::bin_dir() {
        let p = dir.join("pgbench");
        if p.is_file() {
            return Ok(p);
        }
    }
    find_on_path("pgbench").context(
        "pgbench not found: install it (Debian: apt-get install postgresql-client or postgresql-contrib)",
    )
}

/// First executable named `name` in `$PATH` (plus the sbin directories Debian uses for daemons).
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/<pid>/stat`.
pub fn proc_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/pid/stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14 and stime field 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as u64 } else { 100 };
    Ok(Duration::from_nanos(
        (utime + stime).saturating_mul(1_000_000_000) / ticks,
    ))
}

/// Resident set size of a process in bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn proc_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

/// Its anonymous part (`RssAnon`: heap, stacks, anonymous mappings), without the binary's
/// and libraries' pages, which the page cache shares and which grow with the code a process
/// has run, not with what it holds.
pub fn proc_anon_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_status_kb(pid, "RssAnon:").map(|kb| kb * 1024)
}

fn proc_status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} line"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("no {field} value"))?
        .parse()?)
}

/// Raises this process's open-file limit (children inherit it): 1000 idle clients need
/// more than the usual 1024 descriptors in the proxy, in pgbouncer and in the load client.
pub fn raise_nofile_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let mut new = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: (want as libc::rlim_t).max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
            // Not root: go as high as the hard limit allows.
            new.rlim_cur = lim.rlim_max.min(want as libc::rlim_t);
            new.rlim_max = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &new);
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, with its output
/// captured in a log file so failures can be explained without flooding the terminal.
pub struct ChildProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<ChildProcess> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Process id (for `/proc` readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Name given at spawn, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the captured output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the captured output, with known secrets removed.
    pub fn log_tail(&self, lines: usize, redactor: &Redactor) -> String {
        let Ok(f) = File::open(&self.log) else {
            return String::new();
        };
        let mut tail = VecDeque::with_capacity(lines);
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if tail.len() == lines {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        redactor.redact(&tail.into_iter().collect::<Vec<_>>().join("\n"))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status if it exited.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(st) = self.exited() {
            return Some(st);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
    }
}

/// HTTP status of `GET path` on `addr` (a minimal HTTP/1.1 client for health probes).
pub async fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(256);
        // The status line is all we need; a bounded read keeps a chatty server harmless.
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .context("HTTP probe timed out")??;
    let line = String::from_utf8_lossy(&buf);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    Ok(code)
}

/// Command-line settings for one `dbproxy` process (the flags are the fixed CLI contract).
#[derive(Clone, Debug)]
pub struct DbproxyConfig {
    /// The `dbproxy` executable.
    pub bin: PathBuf,
    /// The DSN file (`--dbc`), normally `<secret>/uri_dsn.txt`.
    pub dbc: PathBuf,
    /// PostgreSQL listeners (`--addr`, repeatable).
    pub listen: Vec<SocketAddr>,
    /// Health/metrics port (`--ops-addr`).
    pub ops: SocketAddr,
    /// `--pool-size`.
    pub pool_size: Option<u32>,
    /// `--max-clients`.
    pub max_clients: Option<u32>,
    /// `--pool-mode` (`session`; `transaction` once issue 4 lands).
    pub pool_mode: Option<String>,
    /// Anything else (`--set-base-role`, `--log-format json`, ...).
    pub extra_args: Vec<String>,
    /// Where stdout/stderr go.
    pub log: PathBuf,
}

impl DbproxyConfig {
    /// Defaults for a loopback run: one listener and an ops port on free ports.
    pub fn loopback(bin: PathBuf, dbc: PathBuf, log: PathBuf) -> anyhow::Result<DbproxyConfig> {
        Ok(DbproxyConfig {
            bin,
            dbc,
            listen: vec![free_loopback_addr()?],
            ops: free_loopback_addr()?,
            pool_size: None,
            max_clients: None,
            pool_mode: None,
            extra_args: Vec::new(),
            log,
        })
    }

    /// The first listener, where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.listen[0]
    }
}

/// Starts `dbproxy` and waits until its `/readyz` answers 200 (or it exits, or `timeout`).
pub async fn start_dbproxy(
    cfg: &DbproxyConfig,
    timeout: Duration,
    redactor: &Redactor,
) -> anyhow::Result<ChildProcess> {
    let mut cmd = Command::new(&cfg.bin);
    cmd.arg("--dbc").arg(&cfg.dbc);
    for a in &cfg.listen {
        cmd.arg("--addr").arg(a.to_string());
    }
    cmd.arg("--ops-addr").arg(cfg.ops.to_string());
    if let Some(n) = cfg.pool_size {
        cmd.arg("--pool-size").arg(n.to_string());
    }
    if let Some(n) = cfg.max_clients {
        cmd.arg("--max-clients").arg(n.to_string());
    }
    if let Some(m) = &cfg.pool_mode {
        cmd.arg("--pool-mode").arg(m);
    }
    cmd.args(&cfg.extra_args);
    let mut child = ChildProcess::spawn("dbproxy", cmd, &cfg.log)?;
    wait_ready(&mut child, cfg.ops, timeout, redactor).await?;
    Ok(child)
}

/// Polls `GET /readyz` on `ops` until it answers 200; fails early if the process dies.
pub async fn wait_ready(
    child: &mut ChildProcess,
    ops: SocketAddr,
    timeout: Duration,
    redactor: &Redactor,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        if let Some(st) = child.exited() {
            bail!(
                "{} exited ({st}) before becoming ready; last log lines:\n{}",
                child.name(),
                child.log_tail(30, redactor)
            );
        }
        match http_status(ops, "/readyz").await {
            Ok(200) => return Ok(()),
            Ok(code) => last = format!("HTTP {code}"),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not ready on http://{ops}/readyz after {timeout:?} ({last}); last log lines:\n{}",
                child.name(),
                child.log_tail(30, redactor)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a PostgreSQL login through `addr` succeeds (for targets without `/readyz`).
pub async fn wait_pg_login(
    child: &mut ChildProcess,
    conninfo: &str,
    timeout: Duration,
    redactor: &Redactor,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.exited() {
            bail!(
                "{} exited ({st}); last log lines:\n{}",
                child.name(),
                child.log_tail(30, redactor)
            );
        }
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(conn);
            let r = client.simple_query("SELECT 1").await;
            drop(client);
            let _ = driver.await;
            r.map(|_| ())
        })
        .await;
        let err = match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => redactor.redact(&e.to_string()),
            Err(_) => "login timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            bail!(
                "{}: no successful login after {timeout:?} ({err}); last log lines:\n{}",
                child.name(),
                child.log_tail(30, redactor)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The table the client workload writes to; create it (owned by the application's group
/// role) before starting a [`Workload`].
pub const WORKLOAD_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS load_events (\
     id bigserial PRIMARY KEY, client_id int NOT NULL, at timestamptz NOT NULL DEFAULT now())";

/// Settings of the concurrent client loop.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Where the clients connect (the proxy's listener).
    pub addr: SocketAddr,
    /// User and database the clients send (the proxy replaces both with the DSN's).
    pub user: String,
    pub dbname: String,
    /// Number of concurrent clients.
    pub clients: usize,
    /// Hard bound on statements per client, so the loop ends even if never stopped.
    pub max_queries_per_client: u64,
    /// Statements per session before the client disconnects and opens a new one.
    pub session_queries: (u32, u32),
    /// Pause between statements (keeps the demo from saturating a small machine).
    pub pause: Duration,
    /// Bound on a connect or a single statement.
    pub op_timeout: Duration,
}

/// Which credentials served a new session: the login user and when its backend started.
#[derive(Clone, Debug)]
pub struct SessionObservation {
    /// When the answer reached the client.
    pub at: Instant,
    /// `session_user` on the server (the user the proxy logged in as).
    pub user: String,
    /// The server backend's start time: a backend that started after a Secret write and
    /// logged in as the expected user used the new credentials.
    pub backend_start: SystemTime,
}

/// What the workload did, once stopped.
#[derive(Clone, Debug, Default)]
pub struct WorkloadReport {
    pub queries_ok: u64,
    pub queries_failed: u64,
    pub sessions: u64,
    /// The first few failures, secrets removed.
    pub first_errors: Vec<String>,
}

struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    sessions: AtomicU64,
    errors: Mutex<Vec<String>>,
    observations: Mutex<Vec<SessionObservation>>,
    redactor: Redactor,
}

impl Shared {
    fn fail(&self, what: &str, err: &dyn std::fmt::Display) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 10 {
            errors.push(self.redactor.redact(&format!("{what}: {err}")));
        }
    }
}

/// A running set of clients; stop it with [`Workload::stop`].
pub struct Workload {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Workload {
    /// Starts `cfg.clients` client loops on the current tokio runtime.
    pub fn start(cfg: WorkloadConfig, redactor: Redactor) -> Workload {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            observations: Mutex::new(Vec::new()),
            redactor,
        });
        let cfg = Arc::new(cfg);
        let mut tasks = JoinSet::new();
        for id in 0..cfg.clients {
            let (cfg, shared) = (cfg.clone(), shared.clone());
            tasks.spawn(client_loop(id as i32, cfg, shared));
        }
        Workload { shared, tasks }
    }

    /// Statements that succeeded so far.
    pub fn queries_ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Statements (or connects) that failed so far.
    pub fn queries_failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// The first session observation at or after index `from` matching `pred`, with its index.
    pub fn find_observation(
        &self,
        from: usize,
        pred: impl Fn(&SessionObservation) -> bool,
    ) -> Option<SessionObservation> {
        let obs = self
            .shared
            .observations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        obs.iter().skip(from).find(|o| pred(o)).cloned()
    }

    /// Number of session observations recorded so far.
    pub fn observation_count(&self) -> usize {
        self.shared
            .observations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Signals every client to finish its current statement and waits for them.
    pub async fn stop(mut self) -> WorkloadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        while let Some(r) = self.tasks.join_next().await {
            if let Err(e) = r {
                self.shared.fail("client task", &e);
            }
        }
        WorkloadReport {
            queries_ok: self.shared.ok.load(Ordering::Relaxed),
            queries_failed: self.shared.failed.load(Ordering::Relaxed),
            sessions: self.shared.sessions.load(Ordering::Relaxed),
            first_errors: self
                .shared
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// One client: open a session, record who served it, run a mix of statements (extended
/// protocol, simple-protocol multi-statement transactions, explicit transactions), close,
/// repeat, until stopped or the statement bound is reached.
async fn client_loop(id: i32, cfg: Arc<WorkloadConfig>, shared: Arc<Shared>) {
    let conninfo = format!(
        "host={} port={} user={} dbname={} connect_timeout={} application_name=load-client-{id}",
        cfg.addr.ip(),
        cfg.addr.port(),
        cfg.user,
        cfg.dbname,
        cfg.op_timeout.as_secs().max(1)
    );
    let mut done: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) && done < cfg.max_queries_per_client {
        let connected = tokio::time::timeout(
            cfg.op_timeout,
            tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
        )
        .await;
        let (mut client, conn) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                shared.fail("connect", &e);
                done += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                shared.fail("connect", &"timed out");
                done += 1;
                continue;
            }
        };
        let driver = tokio::spawn(conn);
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        let len = {
            let mut rng = rand::rng();
            rng.random_range(
                cfg.session_queries.0..=cfg.session_queries.1.max(cfg.session_queries.0),
            )
        };
        // First statement of every session: which credentials did the proxy use?
        let observed = tokio::time::timeout(
            cfg.op_timeout,
            client.query_one(
                "SELECT session_user::text, extract(epoch FROM backend_start)::float8 \
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            ),
        )
        .await;
        done += 1;
        let mut healthy = match observed {
            Ok(Ok(row)) => {
                let at = Instant::now();
                let user: String = row.get(0);
                let start: f64 = row.get(1);
                let backend_start =
                    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(start.max(0.0));
                shared.ok.fetch_add(1, Ordering::Relaxed);
                shared
                    .observations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(SessionObservation {
                        at,
                        user,
                        backend_start,
                    });
                true
            }
            Ok(Err(e)) => {
                shared.fail("session_user query", &e);
                false
            }
            Err(_) => {
                shared.fail("session_user query", &"timed out");
                false
            }
        };
        let mut n = 0;
        while healthy
            && n < len
            && done < cfg.max_queries_per_client
            && !shared.stop.load(Ordering::Relaxed)
        {
            n += 1;
            done += 1;
            let kind = rand::rng().random_range(0..4u8);
            let r =
                tokio::time::timeout(cfg.op_timeout, one_statement(&mut client, id, kind)).await;
            match r {
                Ok(Ok(())) => {
                    shared.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    shared.fail("statement", &e);
                    healthy = false;
                }
                Err(_) => {
                    shared.fail("statement", &"timed out");
                    healthy = false;
                }
            }
            if !cfg.pause.is_zero() {
                tokio::time::sleep(cfg.pause).await;
            }
        }
        drop(client);
        // The driver ends once the client is gone (Terminate sent, socket closed).
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    }
}

/// One statement of the mix; `kind` picks which.
async fn one_statement(
    client: &mut tokio_postgres::Client,
    id: i32,
    kind: u8,
) -> Result<(), tokio_postgres::Error> {
    match kind {
        0 => {
            client
                .query_one(
                    "INSERT INTO load_events (client_id) VALUES ($1) RETURNING id",
                    &[&id],
                )
                .await?;
        }
        1 => {
            // Simple protocol, several statements in one message, an implicit transaction.
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO load_events (client_id) VALUES ({id}); \
                     SELECT count(*) FROM load_events WHERE client_id = {id}; COMMIT"
                ))
                .await?;
        }
        2 => {
            let tx = client.transaction().await?;
            tx.execute("INSERT INTO load_events (client_id) VALUES ($1)", &[&id])
                .await?;
            tx.query_one("SELECT max(id) FROM load_events", &[]).await?;
            tx.commit().await?;
        }
        _ => {
            client
                .query_one("SELECT current_user::text, now()", &[])
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_mixed_and_uri_hostile() {
        for _ in 0..50 {
            let p = generate_password().expect("generator");
            assert!(p.chars().count() >= 15, "too short");
            assert!(p.chars().any(|c| c.is_ascii_lowercase()));
            assert!(p.chars().any(|c| c.is_ascii_uppercase()));
            assert!(p.chars().any(|c| c.is_ascii_digit()));
            for c in URI_HOSTILE_CHARS {
                assert!(p.contains(*c), "missing {c:?}");
            }
            assert!(!p.starts_with(' ') && !p.ends_with(' '));
        }
    }

    #[test]
    fn redactor_removes_raw_and_percent_encoded_secrets() {
        let r = Redactor::default();
        r.add("p@ss word");
        let text = "uri postgres://u:p%40ss%20word@h/db and raw p@ss word";
        assert!(r.leaks("x p@ss word y"));
        let out = r.redact(text);
        assert!(
            !out.contains("p@ss word") && !out.contains("p%40ss%20word"),
            "{out}"
        );
        assert_eq!(out, "uri postgres://u:<redacted>@h/db and raw <redacted>");
    }

    #[test]
    fn proc_readings_work_for_this_process() {
        let pid = std::process::id();
        assert!(proc_rss_bytes(pid).expect("rss") > 0);
        assert!(proc_anon_bytes(pid).expect("anon") > 0);
        proc_cpu_time(pid).expect("cpu time");
    }
}
