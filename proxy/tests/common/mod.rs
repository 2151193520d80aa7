//! Shared fixtures for dbproxy's end-to-end tests: the real binary as a child process, a real
//! PostgreSQL with db-controller-style roles, kubelet-written Secrets and client workloads.
#![allow(dead_code)] // each test file uses a different subset of these helpers

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dbtests::postgres::PgOptions;
use dbtests::{PasswordKind, PgCluster, SecretDir};
use tokio_postgres::{Client, NoTls};

/// How long a freshly started proxy may take to report ready on this noisy shared machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound on "new sessions observe the new credentials" (switches, host moves, the
/// concurrent rotation workload).
pub const SWITCH_DEADLINE: Duration = Duration::from_secs(2);
/// For tests whose subject is not the switch latency (secrets, broken DSNs, DSN layouts): the new
/// credentials must be picked up, the latency is only printed.
pub const PICKUP_DEADLINE: Duration = Duration::from_secs(20);
/// Upper bound for any single client operation, so a hung proxy fails a test instead of hanging it.
pub const CLIENT_OP_TIMEOUT: Duration = Duration::from_secs(60);
/// The database every test application uses; owned by the group role `app`.
pub const APP_DB: &str = "appdb";

/// Key under which the proxy's default DSN lives in the Secret.
pub const URI_KEY: &str = "uri_dsn.txt";

/// A port nobody listens on right now, and not one this process handed out recently
/// ([`dbtests::load::free_port`]).
pub fn free_port() -> u16 {
    for _ in 0..50 {
        if let Ok(port) = dbtests::load::free_port() {
            return port;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

/// What to start: listeners, credential source, extra flags and environment.
pub struct ProxyBuilder {
    dbc: Option<PathBuf>,
    dbc_via_env: bool,
    listen_hosts: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    redactions: Vec<String>,
}

impl ProxyBuilder {
    /// A proxy reading its DSN from `dbc` (a file or a one-file-per-key directory).
    pub fn new(dbc: &Path) -> ProxyBuilder {
        ProxyBuilder {
            dbc: Some(dbc.to_path_buf()),
            dbc_via_env: false,
            listen_hosts: vec!["127.0.0.1".to_string()],
            args: Vec::new(),
            env: vec![("RUST_LOG".to_string(), "info".to_string())],
            redactions: Vec::new(),
        }
    }

    /// Pass the DSN path through `DBPROXY_CREDENTIAL` instead of `--dbc`.
    pub fn dbc_via_env(mut self) -> Self {
        self.dbc_via_env = true;
        self
    }

    /// Listen on these hosts (one `--addr` each, each with its own free port).
    pub fn listen_hosts(mut self, hosts: &[&str]) -> Self {
        self.listen_hosts = hosts.iter().map(|h| h.to_string()).collect();
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Strings replaced before the captured log is printed on a panic (never echo a secret).
    pub fn redact(mut self, secret: &str) -> Self {
        self.redactions.push(secret.to_string());
        self
    }

    /// Starts the proxy and waits until `/readyz` answers 200; retries with new ports when a
    /// port picked as free was taken in between.
    pub fn start(self) -> anyhow::Result<ProxyProcess> {
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let mut proxy = self.spawn()?;
            match proxy.wait_ready(READY_TIMEOUT) {
                Ok(()) => return Ok(proxy),
                Err(err) => {
                    let log = proxy.log_redacted();
                    let exited = proxy.child.try_wait().ok().flatten().is_some();
                    let lower = log.to_lowercase();
                    if exited && (lower.contains("in use") || lower.contains("eaddrinuse")) {
                        last_log = log;
                        continue; // port race with another process: pick new ports
                    }
                    bail!("dbproxy did not become ready: {err:#}\n--- dbproxy log ---\n{log}");
                }
            }
        }
        bail!("dbproxy could not bind free ports in 3 attempts\n--- dbproxy log ---\n{last_log}")
    }

    /// Starts the proxy without waiting for readiness.
    pub fn spawn(&self) -> anyhow::Result<ProxyProcess> {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_dbproxy"));
        let ports: Vec<u16> = self.listen_hosts.iter().map(|_| free_port()).collect();
        let ops_port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.env_remove("DBPROXY_CREDENTIAL");
        if let Some(dbc) = &self.dbc {
            if self.dbc_via_env {
                cmd.env("DBPROXY_CREDENTIAL", dbc);
            } else {
                cmd.arg("--dbc").arg(dbc);
            }
        }
        for (host, port) in self.listen_hosts.iter().zip(&ports) {
            cmd.arg("--addr").arg(format!("{host}:{port}"));
        }
        cmd.arg("--ops-addr").arg(format!("127.0.0.1:{ops_port}"));
        cmd.args(&self.args);
        // DBPROXY_TEST_PARK_MS=N runs every proxy of the suite with parking after N ms, and
        // DBPROXY_TEST_WORKER_THREADS=N on N worker threads (unless the test sets the flag
        // itself): `DBPROXY_TEST_PARK_MS=1 cargo test -p dbproxy` puts every end-to-end
        // scenario through parking between its messages, `DBPROXY_TEST_WORKER_THREADS=2` on a
        // multi-threaded runtime, where a task may be polled on one thread while the reactor
        // wakes it from another.
        // DBPROXY_TEST_LANE_AFTER=N with `--session-lane-after N`: session-mode sessions then
        // run N transactions on the runtime's loop before they enter the session lane.
        for (var, flag) in [
            ("DBPROXY_TEST_PARK_MS", "--client-park-after-ms"),
            ("DBPROXY_TEST_WORKER_THREADS", "--worker-threads"),
            ("DBPROXY_TEST_LANE_AFTER", "--session-lane-after"),
        ] {
            if let Ok(value) = std::env::var(var)
                && !self.args.iter().any(|a| a == flag || a == "wait")
            {
                cmd.arg(flag).arg(value);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut drains = Vec::new();
        if let Some(out) = child.stdout.take() {
            drains.push(drain(out, log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            drains.push(drain(err, log.clone()));
        }
        Ok(ProxyProcess {
            child,
            ports,
            ops_port,
            log,
            drains,
            redactions: self.redactions.clone(),
            exit: None,
        })
    }
}

/// Copies a child's output into the shared log buffer until the pipe closes.
fn drain(
    mut pipe: impl Read + Send + 'static,
    log: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Ok(mut log) = log.lock() {
                        log.extend_from_slice(&buf[..n]);
                    }
                }
            }
        }
    })
}

/// A running `dbproxy`; killed on drop, its (redacted) log printed into the test's captured output.
pub struct ProxyProcess {
    child: Child,
    ports: Vec<u16>,
    ops_port: u16,
    log: Arc<Mutex<Vec<u8>>>,
    drains: Vec<std::thread::JoinHandle<()>>,
    redactions: Vec<String>,
    exit: Option<ExitStatus>,
}

impl ProxyProcess {
    /// The first PostgreSQL listener's port.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    pub fn ops_port(&self) -> u16 {
        self.ops_port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the proxy wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default()
    }

    /// The log with every registered secret replaced, safe to print.
    pub fn log_redacted(&self) -> String {
        let mut log = self.log();
        for secret in &self.redactions {
            if !secret.is_empty() {
                log = log.replace(secret.as_str(), "<redacted>");
            }
        }
        log
    }

    pub fn add_redaction(&mut self, secret: &str) {
        self.redactions.push(secret.to_string());
    }

    /// GET on the ops port; returns the status code and body.
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.ops_port, path)
    }

    /// Polls `/readyz` until it answers 200; fails early if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_readyz(200, timeout)
    }

    /// Polls `/readyz` until it answers `want`.
    pub fn wait_readyz(&mut self, want: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                bail!("dbproxy exited with {status} before /readyz answered {want}");
            }
            match self.http_get("/readyz") {
                Ok((code, _)) if code == want => return Ok(()),
                Ok((code, body)) => last = format!("HTTP {code}: {}", body.trim()),
                Err(err) => last = format!("{err:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("/readyz did not answer {want} within {timeout:?} (last: {last})")
    }

    /// Sends SIGTERM (through kill(1), so the proxy package needs no libc dependency).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "kill -TERM {} failed: {status:?}",
            self.child.id()
        );
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit: its status and how
    /// long it took, or an error naming what was waited for.
    pub fn sigterm_and_wait(&mut self, limit: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let t = Instant::now();
        self.sigterm();
        let status = self
            .wait_exit(limit)
            .ok_or_else(|| anyhow::anyhow!("dbproxy still running {limit:?} after SIGTERM"))?;
        Ok((status, t.elapsed()))
    }

    /// SIGTERM with nothing that should hold dbproxy back: it must exit 0 within 10 s (not
    /// wait for a long --shutdown-timeout). `what` names what was connected, for the
    /// failure message. Returns how long it took.
    pub fn sigterm_expect_prompt_exit(&mut self, what: &str) -> anyhow::Result<Duration> {
        let (status, took) = self.sigterm_and_wait(Duration::from_secs(30))?;
        println!("exited {took:?} after SIGTERM with {what}");
        anyhow::ensure!(status.success(), "dbproxy exited with {status}");
        anyhow::ensure!(
            took < Duration::from_secs(10),
            "{what} kept dbproxy running for {took:?}"
        );
        Ok(took)
    }

    /// The exit status if the proxy has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit; None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                // let the drain threads collect the last lines
                for handle in self.drains.drain(..) {
                    let _ = handle.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new client session through the first listener.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        connect(self.port(), "anything").await
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.try_exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // libtest shows a test's output only when it fails (panic or Err), which is when the
        // proxy's side of the story is needed
        {
            eprintln!(
                "--- dbproxy log (ports {:?}, ops {}) ---\n{}\n--- end of dbproxy log ---",
                self.ports,
                self.ops_port,
                self.log_redacted()
            );
        }
    }
}

/// Minimal HTTP/1.0 GET against 127.0.0.1:`port`.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("not an HTTP response: {:?}", text.lines().next()))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Opens a session through the proxy the way an application in the pod does: any user
/// name, no password, plaintext.
pub async fn connect(port: u16, user: &str) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname("anything")
        .application_name("proxytest")
        .connect_timeout(Duration::from_secs(30));
    connect_with(&cfg).await
}

/// Connects with the given configuration and drives the connection on a task.
pub async fn connect_with(cfg: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `session_user`, `current_user` and the backend pid of a session.
pub async fn whoami(client: &Client) -> Result<(String, String, i32), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT session_user::text, current_user::text, pg_backend_pid()",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// Opens new sessions until one reports `session_user = expected`; every attempt must succeed.
/// Returns the time from `since` (the Secret write) to the first such session.
pub async fn wait_for_session_user(
    port: u16,
    expected: &str,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    wait_for_value(port, "SELECT session_user::text", expected, since, timeout).await
}

/// Opens new sessions until `query` (one text column) returns `expected`.
pub async fn wait_for_value(
    port: u16,
    query: &str,
    expected: &str,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        let attempt = async {
            let client = connect(port, "prober").await?;
            let row = client.query_one(query, &[]).await?;
            Ok::<String, tokio_postgres::Error>(row.get(0))
        };
        let value = tokio::time::timeout(CLIENT_OP_TIMEOUT, attempt)
            .await
            .context("a new session through the proxy hung")?
            .context("a new session through the proxy failed")?;
        if value == expected {
            let elapsed = since.elapsed();
            if elapsed > timeout {
                bail!(
                    "new sessions observed {expected:?} only {elapsed:?} after the Secret write (want within {timeout:?})"
                );
            }
            return Ok(elapsed);
        }
        if since.elapsed() > timeout {
            bail!(
                "new sessions still observe {value:?} {:?} after the Secret write (want {expected:?} within {timeout:?})",
                since.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A password like the ones db-controller generates: long, mixed classes, and containing every
/// character that needs escaping in a URI or a key=value DSN.
pub fn rotated_password() -> String {
    use rand::Rng;
    use rand::seq::SliceRandom;
    const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const DIGIT: &[u8] = b"0123456789";
    const SPECIAL: &[u8] = b"@:/?#%'\\ ";
    let mut rng = rand::rng();
    let mut pick = |set: &[u8]| set[rng.random_range(0..set.len())] as char;
    let mut middle: Vec<char> = SPECIAL.iter().map(|&b| b as char).collect();
    for _ in 0..6 {
        middle.push(pick(LOWER));
        middle.push(pick(UPPER));
        middle.push(pick(DIGIT));
    }
    middle.shuffle(&mut rand::rng());
    // alphanumeric at both ends so no reader can argue about trimming whitespace
    let mut out = String::new();
    out.push(pick(UPPER));
    out.extend(middle);
    out.push(pick(LOWER));
    out
}

/// A password of `len` characters (an IAM-token-sized one is ~2 kB) built like
/// [`rotated_password`], so every character class and escape-needing character is in it.
pub fn long_password(len: usize) -> String {
    let mut out = String::new();
    while out.len() < len {
        out.push_str(&rotated_password());
    }
    out.truncate(len - 1);
    out.push('z'); // never end on a space
    out
}

/// Percent-encodes everything outside RFC 3986's unreserved set.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Quotes a value for a libpq key=value DSN.
pub fn kv_quote(s: &str) -> String {
    let mut out = String::from("'");
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A libpq key=value DSN for `cluster`.
pub fn kv_dsn(cluster: &PgCluster, user: &str, password: &str, dbname: &str) -> String {
    format!(
        "host={} port={} user={} password={} dbname={} sslmode=disable",
        cluster.host(),
        cluster.port(),
        kv_quote(user),
        kv_quote(password),
        kv_quote(dbname)
    )
}

/// A PostgreSQL cluster set up the way db-controller leaves it: group role `app` owning
/// database `appdb` and its tables, and login roles `app_a`/`app_b`, both members of `app`.
pub struct AppCluster {
    pub cluster: PgCluster,
    pub name: String,
    kind: PasswordKind,
    password_a: Mutex<String>,
    password_b: Mutex<String>,
}

impl AppCluster {
    /// Starts a cluster; `name` is stored in table `marker` so tests can tell clusters apart.
    pub async fn start(name: &str) -> anyhow::Result<AppCluster> {
        Self::start_with(name, PgOptions::default(), PasswordKind::Scram).await
    }

    /// Starts a cluster with the given server settings, storing passwords as `kind`.
    pub async fn start_with(
        name: &str,
        options: PgOptions,
        kind: PasswordKind,
    ) -> anyhow::Result<AppCluster> {
        let cluster = PgCluster::start_with(options).context("starting PostgreSQL")?;
        let password_a = rotated_password();
        let password_b = rotated_password();
        cluster.create_group_role("app").await?;
        cluster.create_role("app_a", &password_a, kind).await?;
        cluster.create_role("app_b", &password_b, kind).await?;
        cluster.execute("GRANT app TO app_a, app_b").await?;
        cluster.create_database(APP_DB, "app").await?;
        let admin = cluster
            .connect(cluster.superuser(), cluster.superuser_password(), APP_DB)
            .await?;
        admin
            .batch_execute(&format!(
                "CREATE TABLE items (id bigserial PRIMARY KEY, note text NOT NULL);
                 ALTER TABLE items OWNER TO app;
                 CREATE TABLE marker (name text NOT NULL);
                 INSERT INTO marker VALUES ('{name}');
                 ALTER TABLE marker OWNER TO app;"
            ))
            .await?;
        Ok(AppCluster {
            cluster,
            name: name.to_string(),
            kind,
            password_a: Mutex::new(password_a),
            password_b: Mutex::new(password_b),
        })
    }

    /// The current password of `app_a` or `app_b`.
    pub fn password(&self, user: &str) -> String {
        let slot = if user == "app_a" {
            &self.password_a
        } else {
            &self.password_b
        };
        slot.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// `ALTER ROLE user PASSWORD` with a fresh db-controller-style password; returns it.
    pub async fn rotate_password(&self, user: &str) -> anyhow::Result<String> {
        self.set_password(user, rotated_password()).await
    }

    /// `ALTER ROLE user PASSWORD` with the given password; returns it.
    pub async fn set_password(&self, user: &str, password: String) -> anyhow::Result<String> {
        self.cluster
            .alter_password(user, &password, self.kind)
            .await?;
        let slot = if user == "app_a" {
            &self.password_a
        } else {
            &self.password_b
        };
        if let Ok(mut p) = slot.lock() {
            *p = password.clone();
        }
        Ok(password)
    }

    /// The URI DSN for `user` with its current password.
    pub fn uri(&self, user: &str) -> String {
        self.cluster.uri(user, &self.password(user), APP_DB)
    }

    /// The key=value DSN for `user` with its current password.
    pub fn kv(&self, user: &str) -> String {
        kv_dsn(&self.cluster, user, &self.password(user), APP_DB)
    }

    /// A superuser session on `appdb`, bypassing the proxy.
    pub async fn admin(&self) -> anyhow::Result<Client> {
        self.cluster
            .connect(
                self.cluster.superuser(),
                self.cluster.superuser_password(),
                APP_DB,
            )
            .await
    }
}

/// A kubelet-style Secret holding `uri_dsn.txt`.
pub fn uri_secret(uri: &str) -> anyhow::Result<SecretDir> {
    let secret = SecretDir::new()?;
    secret.write(&[(URI_KEY, uri.as_bytes())])?;
    Ok(secret)
}

/// Publishes a new `uri_dsn.txt` and returns the instant of the write.
pub fn write_uri(secret: &SecretDir, uri: &str) -> anyhow::Result<Instant> {
    secret.write(&[(URI_KEY, uri.as_bytes())])?;
    Ok(Instant::now())
}

/// Counters and errors of a running client workload.
#[derive(Default)]
pub struct WorkloadStats {
    pub sessions: AtomicU64,
    /// Held sessions that moved to a new backend (a rotation changed user or host).
    pub moves: AtomicU64,
    pub queries: AtomicU64,
    pub errors: Mutex<Vec<String>>,
}

impl WorkloadStats {
    fn error(&self, what: String) {
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(what);
        }
    }
}

/// What a workload saw, once stopped.
#[derive(Debug)]
pub struct WorkloadReport {
    pub sessions: u64,
    pub queries: u64,
    pub errors: Vec<String>,
}

/// Clients hammering the proxy: `churners` open a new session per iteration, `holders` keep one
/// session open and query it continuously. Every loop is bounded by `max_iterations`.
pub struct Workload {
    stop: Arc<AtomicBool>,
    pub stats: Arc<WorkloadStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    pub fn start(port: u16, churners: usize, holders: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WorkloadStats::default());
        let mut tasks = Vec::new();
        const MAX_ITERATIONS: u64 = 200_000;
        for i in 0..churners {
            let (stop, stats) = (stop.clone(), stats.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..MAX_ITERATIONS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let work = async {
                        let client = connect(port, &format!("churner{i}")).await?;
                        stats.sessions.fetch_add(1, Ordering::Relaxed);
                        whoami(&client).await?;
                        client.query_one("SELECT count(*) FROM marker", &[]).await?;
                        stats.queries.fetch_add(2, Ordering::Relaxed);
                        Ok::<(), tokio_postgres::Error>(())
                    };
                    match tokio::time::timeout(CLIENT_OP_TIMEOUT, work).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => stats.error(format!("churner{i}: {err:?}")),
                        Err(_) => stats.error(format!("churner{i}: session hung")),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        for i in 0..holders {
            let (stop, stats) = (stop.clone(), stats.clone());
            tasks.push(tokio::spawn(async move {
                let client = match tokio::time::timeout(
                    CLIENT_OP_TIMEOUT,
                    connect(port, &format!("holder{i}")),
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(err)) => return stats.error(format!("holder{i} connect: {err:?}")),
                    Err(_) => return stats.error(format!("holder{i} connect hung")),
                };
                stats.sessions.fetch_add(1, Ordering::Relaxed);
                // Session state that must survive every rotation: when a rotation moves the
                // session to a new backend (--migrate changed: user or host changed), dbproxy
                // carries its settings along.
                let lock_timeout = format!("{}s", 100 + i);
                if let Err(err) = client
                    .batch_execute(&format!("SET lock_timeout = '{lock_timeout}'"))
                    .await
                {
                    return stats.error(format!("holder{i} SET: {err:?}"));
                }
                let mut last: Option<(String, i32)> = None;
                for _ in 0..MAX_ITERATIONS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let check = async {
                        let who = whoami(&client).await?;
                        let setting = client.query_one("SHOW lock_timeout", &[]).await?;
                        Ok::<_, tokio_postgres::Error>((who, setting.get::<_, String>(0)))
                    };
                    match tokio::time::timeout(CLIENT_OP_TIMEOUT, check).await {
                        Ok(Ok(((user, _, p), setting))) => {
                            stats.queries.fetch_add(2, Ordering::Relaxed);
                            if setting != lock_timeout {
                                stats.error(format!(
                                    "holder{i}: lost its SET across a rotation ({setting})"
                                ));
                            }
                            // A changed backend is a move (counted; the SET above proves the
                            // session came along).
                            if last.as_ref().is_some_and(|(_, last_pid)| *last_pid != p) {
                                stats.moves.fetch_add(1, Ordering::Relaxed);
                            }
                            last = Some((user, p));
                        }
                        Ok(Err(err)) => stats.error(format!("holder{i}: {err:?}")),
                        Err(_) => stats.error(format!("holder{i}: query hung")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        Workload { stop, stats, tasks }
    }

    /// Errors seen so far.
    pub fn errors(&self) -> Vec<String> {
        self.stats
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    pub fn queries(&self) -> u64 {
        self.stats.queries.load(Ordering::Relaxed)
    }

    /// Stops every client and waits for them.
    pub async fn stop(self) -> WorkloadReport {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            if let Err(err) = task.await {
                self.stats.error(format!("workload task panicked: {err}"));
            }
        }
        WorkloadReport {
            sessions: self.stats.sessions.load(Ordering::Relaxed),
            queries: self.stats.queries.load(Ordering::Relaxed),
            errors: self
                .stats
                .errors
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default(),
        }
    }
}

/// Asserts a stopped workload did real work and saw no error.
pub fn assert_clean(report: &WorkloadReport, what: &str) {
    assert!(
        report.errors.is_empty(),
        "{what}: clients saw {} error(s), first ones: {:#?}",
        report.errors.len(),
        &report.errors[..report.errors.len().min(5)]
    );
    assert!(
        report.queries > 0 && report.sessions > 0,
        "{what}: the workload ran no queries ({report:?})"
    );
}

/// Waits until `queries` grew by at least `n` (so a phase of a test really had traffic).
pub async fn wait_for_traffic(workload: &Workload, n: u64) {
    let start = workload.queries();
    let deadline = Instant::now() + Duration::from_secs(60);
    while workload.queries() < start + n {
        assert!(
            Instant::now() < deadline,
            "the workload made no progress for 60 s (errors: {:?})",
            workload.errors()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The psql binary: the harness's PostgreSQL bin dir, else /usr/bin/psql.
pub fn psql_bin() -> PathBuf {
    if let Ok(dir) = PgCluster::bin_dir() {
        let p = dir.join("psql");
        if p.exists() {
            return p;
        }
    }
    let p = PathBuf::from("/usr/bin/psql");
    assert!(
        p.exists(),
        "psql not found: install the PostgreSQL client (apt-get install postgresql-client)"
    );
    p
}

/// Removes an environment variable the builder would set (the child then inherits the test's).
impl ProxyBuilder {
    pub fn env_unset(mut self, key: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self
    }
}

/// The proxy's /metrics text.
pub fn scrape(proxy: &ProxyProcess) -> anyhow::Result<String> {
    let (code, body) = proxy.http_get("/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered HTTP {code}: {body}");
    Ok(body)
}

/// The value of the series `name` whose labels include every pair of `labels` (summed over
/// the series that match), from Prometheus text; None when no series matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
            && let Ok(v) = value.parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// [`metric`], or 0 when the series does not exist (yet).
pub fn metric_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// Polls /metrics until `check` holds for the text; returns the last text, or fails with it.
pub async fn wait_for_metrics(
    proxy: &ProxyProcess,
    what: &str,
    timeout: Duration,
    check: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(proxy)?;
        if check(&text) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("/metrics never showed {what} within {timeout:?}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `dbproxy_clients_parked` is `n` (`--client-park-after-ms`).
pub async fn wait_parked(proxy: &ProxyProcess, n: usize) -> anyhow::Result<()> {
    wait_for_metrics(
        proxy,
        &format!("{n} parked clients"),
        Duration::from_secs(10),
        |text| metric_or_zero(text, "dbproxy_clients_parked", &[]) == n as f64,
    )
    .await?;
    Ok(())
}

/// Waits until the session lane forwards `n` sessions (`dbproxy_session_lane_clients`).
pub async fn wait_in_lane(proxy: &ProxyProcess, n: usize) -> anyhow::Result<()> {
    wait_for_metrics(
        proxy,
        &format!("{n} sessions in the session lane"),
        Duration::from_secs(10),
        |text| metric_or_zero(text, "dbproxy_session_lane_clients", &[]) == n as f64,
    )
    .await?;
    Ok(())
}

/// Waits until the transaction lane holds `n` clients (`dbproxy_transaction_lane_clients`).
pub async fn wait_in_tx_lane(proxy: &ProxyProcess, n: usize) -> anyhow::Result<()> {
    wait_for_metrics(
        proxy,
        &format!("{n} clients in the transaction lane"),
        Duration::from_secs(10),
        |text| metric_or_zero(text, "dbproxy_transaction_lane_clients", &[]) == n as f64,
    )
    .await?;
    Ok(())
}

/// An admin console session (database `pgbouncer` or `dbproxy`) through the first listener.
pub async fn admin_connect(port: u16, dbname: &str) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("ops")
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(30));
    connect_with(&cfg).await
}

/// Runs an admin command; each row as column name -> text value.
pub async fn admin_rows(
    client: &Client,
    command: &str,
) -> anyhow::Result<Vec<std::collections::BTreeMap<String, String>>> {
    let messages = tokio::time::timeout(CLIENT_OP_TIMEOUT, client.simple_query(command))
        .await
        .with_context(|| format!("{command} hung"))?
        .with_context(|| format!("{command} failed"))?;
    let mut rows = Vec::new();
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            let mut map = std::collections::BTreeMap::new();
            for (i, col) in row.columns().iter().enumerate() {
                map.insert(col.name().to_string(), row.get(i).unwrap_or("").to_string());
            }
            rows.push(map);
        }
    }
    Ok(rows)
}

/// The column names of an admin command's result.
pub async fn admin_columns(client: &Client, command: &str) -> anyhow::Result<Vec<String>> {
    let messages = client.simple_query(command).await?;
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::RowDescription(cols) = m {
            return Ok(cols.iter().map(|c| c.name().to_string()).collect());
        }
    }
    bail!("{command} returned no row description")
}

/// Sends a signal to a process through kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "kill -{signal} {pid} failed: {status:?}"
    );
}

/// Fails if any secret (raw or percent-encoded) occurs in `text`.
pub fn assert_no_secrets(text: &str, secrets: &[&str], what: &str) {
    for (i, secret) in secrets.iter().enumerate() {
        assert!(!secret.is_empty());
        let encoded = percent_encode(secret);
        assert!(
            !text.contains(secret) && !text.contains(encoded.as_str()),
            "secret #{i} appears in {what}"
        );
    }
}

/// How a client connection ended, as its connection task saw it: an unsolicited FATAL (such as
/// `57P01` when the proxy gives up migrating a pinned session) ends the connection, not a query.
#[derive(Debug, Clone)]
pub struct ConnectionEnd {
    /// SQLSTATE of the server's (or proxy's) error, when the end was an ErrorResponse.
    pub code: Option<String>,
    /// The error's message (the server's message text for an ErrorResponse).
    pub message: String,
    pub at: Instant,
}

/// A session whose connection task forwards notifications (LISTEN/NOTIFY) and records how the
/// connection ended.
pub struct ObservedClient {
    pub client: Client,
    pub notifications: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    end: Arc<Mutex<Option<ConnectionEnd>>>,
}

impl ObservedClient {
    /// How the connection ended, if it did.
    pub fn ended(&self) -> Option<ConnectionEnd> {
        self.end.lock().ok().and_then(|e| e.clone())
    }

    /// Waits up to `timeout` for the connection to end.
    pub async fn wait_ended(&self, timeout: Duration) -> Option<ConnectionEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.ended() {
                return Some(end);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `timeout` for a notification on `channel`; returns its payload.
    pub async fn next_notification(&mut self, channel: &str, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.notifications.recv()).await {
                Ok(Some(n)) if n.channel() == channel => return Some(n.payload().to_string()),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The SQLSTATE and message behind a failed query: the query's own error when it carries
    /// one, else (the connection was closed under it) the error that ended the connection.
    pub async fn failure_of(&self, err: &tokio_postgres::Error) -> (Option<String>, String) {
        if let Some(db) = err.as_db_error() {
            return (Some(db.code().code().to_string()), db.message().to_string());
        }
        match self.wait_ended(Duration::from_secs(5)).await {
            Some(end) => (end.code, end.message),
            None => (None, format!("{err:?}")),
        }
    }
}

/// [`connect_with`], keeping notifications and the connection's end observable.
pub async fn connect_observed(
    cfg: &tokio_postgres::Config,
) -> Result<ObservedClient, tokio_postgres::Error> {
    let (client, mut connection) = cfg.connect(NoTls).await?;
    let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
    let end = Arc::new(Mutex::new(None));
    let end_slot = end.clone();
    tokio::spawn(async move {
        let result = loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n);
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            }
        };
        let ended = match result {
            Ok(()) => ConnectionEnd {
                code: None,
                message: "connection closed".to_string(),
                at: Instant::now(),
            },
            Err(err) => ConnectionEnd {
                code: err.as_db_error().map(|d| d.code().code().to_string()),
                message: err
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| format!("{err:?}")),
                at: Instant::now(),
            },
        };
        if let Ok(mut slot) = end_slot.lock() {
            *slot = Some(ended);
        }
    });
    Ok(ObservedClient {
        client,
        notifications,
        end,
    })
}

/// A client configuration for the proxy's first listener, like [`connect`] uses.
pub fn proxy_config(port: u16, user: &str, application_name: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname("anything")
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(30));
    cfg
}

/// The SQLSTATE of an error, as text (`None` when it is not a server error).
pub fn sqlstate(err: &tokio_postgres::Error) -> Option<String> {
    err.as_db_error().map(|d| d.code().code().to_string())
}

/// `inet_server_port()` of the backend that serves the session right now.
pub async fn server_port(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT inet_server_port()", &[])
        .await?
        .get(0))
}

/// One backend message as a raw protocol test sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    RowDescription,
    ParameterDescription,
    DataRow(Vec<Option<String>>),
    CommandComplete(String),
    EmptyQuery,
    Error { code: String, message: String },
    Notice,
    ParameterStatus(String, String),
    ReadyForQuery(u8),
    Other(u8),
}

/// A hand-driven protocol 3.0 session (no TLS, no password), for tests that need exact control
/// of message boundaries (Flush without Sync, Close, ParameterStatus) that tokio-postgres hides.
pub struct RawSession {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// ParameterStatus messages received at login.
    pub parameters: Vec<(String, String)>,
    /// BackendKeyData (pid, secret) received at login.
    pub key: (i32, i32),
}

fn put_cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A frontend message: tag, length, body.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Builders for the frontend messages raw tests send.
pub mod msg {
    use super::{frame, put_cstr};

    pub fn query(sql: &str) -> Vec<u8> {
        query_bytes(sql.as_bytes())
    }
    /// A Query in the session's client encoding, whatever that is (LATIN1 bytes, say).
    pub fn query_bytes(sql: &[u8]) -> Vec<u8> {
        let mut b = sql.to_vec();
        b.push(0);
        frame(b'Q', &b)
    }
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        parse_bytes(name, sql.as_bytes())
    }
    /// A Parse whose text is in the session's client encoding, whatever that is.
    pub fn parse_bytes(name: &str, sql: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        put_cstr(&mut b, name);
        b.extend_from_slice(sql);
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        frame(b'P', &b)
    }
    /// Bind with text parameters and text results.
    pub fn bind(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        put_cstr(&mut b, portal);
        put_cstr(&mut b, statement);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        frame(b'B', &b)
    }
    pub fn describe_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        put_cstr(&mut b, name);
        frame(b'D', &b)
    }
    pub fn describe_portal(name: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        put_cstr(&mut b, name);
        frame(b'D', &b)
    }
    pub fn execute(portal: &str) -> Vec<u8> {
        let mut b = Vec::new();
        put_cstr(&mut b, portal);
        b.extend_from_slice(&0i32.to_be_bytes());
        frame(b'E', &b)
    }
    pub fn close_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        put_cstr(&mut b, name);
        frame(b'C', &b)
    }
    pub fn sync() -> Vec<u8> {
        frame(b'S', &[])
    }
    pub fn flush() -> Vec<u8> {
        frame(b'H', &[])
    }
    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        frame(b'd', data)
    }
    pub fn copy_done() -> Vec<u8> {
        frame(b'c', &[])
    }
    pub fn copy_fail(why: &str) -> Vec<u8> {
        let mut b = Vec::new();
        put_cstr(&mut b, why);
        frame(b'f', &b)
    }
}

fn take_cstr(body: &[u8], at: &mut usize) -> String {
    let start = (*at).min(body.len());
    let end = body[start..]
        .iter()
        .position(|&b| b == 0)
        .map(|p| start + p)
        .unwrap_or(body.len());
    *at = (end + 1).min(body.len() + 1);
    String::from_utf8_lossy(&body[start..end]).into_owned()
}

fn parse_reply(tag: u8, body: &[u8]) -> Reply {
    match tag {
        b'1' => Reply::ParseComplete,
        b'2' => Reply::BindComplete,
        b'3' => Reply::CloseComplete,
        b'n' => Reply::NoData,
        b'T' => Reply::RowDescription,
        b't' => Reply::ParameterDescription,
        b'I' => Reply::EmptyQuery,
        b'N' => Reply::Notice,
        b'Z' => Reply::ReadyForQuery(body.first().copied().unwrap_or(0)),
        b'C' => {
            let mut at = 0;
            Reply::CommandComplete(take_cstr(body, &mut at))
        }
        b'S' => {
            let mut at = 0;
            let k = take_cstr(body, &mut at);
            let v = take_cstr(body, &mut at);
            Reply::ParameterStatus(k, v)
        }
        b'E' => {
            let (mut code, mut message) = (String::new(), String::new());
            let mut at = 0;
            while at < body.len() && body[at] != 0 {
                let field = body[at];
                at += 1;
                let value = take_cstr(body, &mut at);
                match field {
                    b'C' => code = value,
                    b'M' => message = value,
                    _ => {}
                }
            }
            Reply::Error { code, message }
        }
        b'D' => {
            let mut cols = Vec::new();
            if body.len() >= 2 {
                let n = i16::from_be_bytes([body[0], body[1]]);
                let mut at = 2;
                for _ in 0..n.max(0) {
                    if at + 4 > body.len() {
                        break;
                    }
                    let len =
                        i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
                    at += 4;
                    if len < 0 {
                        cols.push(None);
                    } else {
                        let end = (at + len as usize).min(body.len());
                        cols.push(Some(String::from_utf8_lossy(&body[at..end]).into_owned()));
                        at = end;
                    }
                }
            }
            Reply::DataRow(cols)
        }
        other => Reply::Other(other),
    }
}

impl RawSession {
    /// Logs in as `user` (no password: the proxy's loopback clients need none) and reads up to
    /// the first ReadyForQuery.
    pub async fn connect(port: u16, user: &str) -> anyhow::Result<RawSession> {
        Self::connect_to(port, user, "anything").await
    }

    /// [`RawSession::connect`] to a given database (PostgreSQL itself, with trust logins).
    pub async fn connect_to(port: u16, user: &str, database: &str) -> anyhow::Result<RawSession> {
        use tokio::io::AsyncWriteExt;
        let stream = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .context("connecting to the proxy hung")??;
        let mut session = RawSession {
            stream,
            buf: Vec::new(),
            parameters: Vec::new(),
            key: (0, 0),
        };
        let mut body = Vec::new();
        body.extend_from_slice(&196_608i32.to_be_bytes());
        for (k, v) in [
            ("user", user),
            ("database", database),
            ("application_name", "rawtest"),
        ] {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.push(0);
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        session.stream.write_all(&startup).await?;
        loop {
            let (tag, body) = session.read_raw().await?;
            match tag {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    anyhow::ensure!(
                        code == Some(0),
                        "the proxy asked for authentication {code:?}"
                    );
                }
                b'K' if body.len() >= 8 => {
                    session.key = (
                        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    );
                }
                _ => match parse_reply(tag, &body) {
                    Reply::ParameterStatus(k, v) => session.parameters.push((k, v)),
                    Reply::ReadyForQuery(_) => return Ok(session),
                    Reply::Error { code, message } => bail!("login failed: {code} {message}"),
                    _ => {}
                },
            }
        }
    }

    /// Sends the concatenation of `messages` in one write.
    pub async fn send(&mut self, messages: &[Vec<u8>]) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let all: Vec<u8> = messages.concat();
        self.stream.write_all(&all).await?;
        Ok(())
    }

    async fn read_raw(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                anyhow::ensure!(len >= 4, "bad message length {len}");
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let tag = self.buf[0];
                    let body = self.buf[5..total].to_vec();
                    self.buf.drain(..total);
                    return Ok((tag, body));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(CLIENT_OP_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .context("no message from the proxy within the client timeout")??;
            anyhow::ensure!(n > 0, "the proxy closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next backend message.
    pub async fn read(&mut self) -> anyhow::Result<Reply> {
        let (tag, body) = self.read_raw().await?;
        Ok(parse_reply(tag, &body))
    }

    /// Messages up to and including the next ReadyForQuery.
    /// Runs each query string (bytes: any client encoding) as a simple Query and fails on
    /// the first error, naming its statement.
    pub async fn run_all_ok(&mut self, queries: &[&[u8]]) -> anyhow::Result<()> {
        for sql in queries {
            self.send(&[msg::query_bytes(sql)]).await?;
            let replies = self.until_ready().await?;
            anyhow::ensure!(
                error_codes(&replies).is_empty(),
                "{}: {replies:?}",
                String::from_utf8_lossy(sql)
            );
        }
        Ok(())
    }

    pub async fn until_ready(&mut self) -> anyhow::Result<Vec<Reply>> {
        let mut out = Vec::new();
        loop {
            let reply = self.read().await?;
            let done = matches!(reply, Reply::ReadyForQuery(_));
            out.push(reply);
            if done {
                return Ok(out);
            }
        }
    }

    /// Reads exactly `n` messages (for a Flush, which ends with no ReadyForQuery).
    pub async fn read_n(&mut self, n: usize) -> anyhow::Result<Vec<Reply>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.read().await?);
        }
        Ok(out)
    }
}

/// The first column of every DataRow among `replies`.
pub fn first_column(replies: &[Reply]) -> Vec<Option<String>> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::DataRow(cols) => Some(cols.first().cloned().flatten()),
            _ => None,
        })
        .collect()
}

/// Every cell of every DataRow among `replies`, in order (NULL as empty).
pub fn data_cells(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::DataRow(cols) => Some(cols.iter().map(|c| c.clone().unwrap_or_default())),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The SQLSTATEs of every ErrorResponse among `replies`.
pub fn error_codes(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Error { code, .. } => Some(code.clone()),
            _ => None,
        })
        .collect()
}
