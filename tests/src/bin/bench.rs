//! Benchmark command: pgbench through `dbproxy`, against the same database directly and
//! through pgbouncer (when installed), with the proxies' own CPU time per transaction and
//! their memory per idle client. Prints a Markdown table ready for README.
//!
//! The matrix is workloads (script x protocol x client count) by targets (direct, or a
//! proxy in a pool mode). Transaction pooling (issue 4) adds `PoolMode::Transaction` and
//! the `prepared` protocol; TLS to the backend (issue 5) adds a field to `TargetSpec`.
//! Runs are interleaved (every target once per workload per round) so slow drifts of the
//! shared machine hit every target alike; each cell reports the median over the rounds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use dbtests::load::{self, ChildProcess, DbproxyConfig, Redactor};
use dbtests::postgres::PgOptions;
use dbtests::{PasswordKind, PgCluster, SecretDir};

/// Command line of the benchmark.
#[derive(Parser, Debug)]
#[command(about = "pgbench direct vs dbproxy vs pgbouncer, with proxy CPU and idle-client memory")]
struct Args {
    /// Short smoke run: 3 s per cell, 1 round, clients 1,8, scale 1, 100 idle clients.
    #[arg(long)]
    quick: bool,
    /// Rounds over the whole matrix; each cell reports the median (TPS varies 10-20 % run to run).
    #[arg(long)]
    runs: Option<u32>,
    /// Seconds per pgbench run (`-T`).
    #[arg(long)]
    duration: Option<u32>,
    /// pgbench client counts (`-c`), comma separated.
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<u32>>,
    /// pgbench worker threads (`-j`, capped at the client count).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// pgbench scripts.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Script::SelectOnly, Script::TpcbLike])]
    scripts: Vec<Script>,
    /// pgbench query protocols (`-M`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Protocol::Simple, Protocol::Extended])]
    protocols: Vec<Protocol>,
    /// What to measure against.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [TargetKind::Direct, TargetKind::Dbproxy, TargetKind::Pgbouncer])]
    targets: Vec<TargetKind>,
    /// Pool mode of the proxies.
    #[arg(long, value_enum, default_value_t = PoolMode::Session)]
    pool_mode: PoolMode,
    /// pgbench scale factor (`pgbench -i -s`).
    #[arg(long)]
    scale: Option<u32>,
    /// Idle clients for the memory measurement (0 skips it).
    #[arg(long)]
    idle_clients: Option<u32>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// pgbench's built-in scripts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Script {
    /// `-S`: one indexed SELECT per transaction.
    SelectOnly,
    /// The default TPC-B-like script: 5 statements in BEGIN/END.
    TpcbLike,
}

impl Script {
    fn label(self) -> &'static str {
        match self {
            Script::SelectOnly => "select-only",
            Script::TpcbLike => "TPC-B-like",
        }
    }
}

/// pgbench `-M`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Protocol {
    Simple,
    Extended,
    /// Named prepared statements (needs statement tracking in transaction mode, issue 4).
    Prepared,
}

impl Protocol {
    fn arg(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        }
    }
}

/// What pgbench talks to.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TargetKind {
    /// PostgreSQL itself (the baseline for the ratios).
    Direct,
    /// The workspace's `dbproxy`.
    Dbproxy,
    /// Debian's pgbouncer, configured like dbproxy.
    Pgbouncer,
}

/// Pool mode of a proxy target.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PoolMode {
    /// A server connection per client session.
    Session,
}

impl PoolMode {
    fn arg(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
        }
    }
}

/// One column of the comparison: a kind of target and, for proxies, how it pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TargetSpec {
    kind: TargetKind,
    pool_mode: Option<PoolMode>,
}

impl TargetSpec {
    fn label(&self) -> String {
        match (self.kind, self.pool_mode) {
            (TargetKind::Direct, _) => "direct".into(),
            (TargetKind::Dbproxy, Some(m)) => format!("dbproxy ({})", m.arg()),
            (TargetKind::Pgbouncer, Some(m)) => format!("pgbouncer ({})", m.arg()),
            (k, None) => format!("{k:?}").to_lowercase(),
        }
    }
}

/// One row group of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Workload {
    script: Script,
    protocol: Protocol,
    clients: u32,
}

/// What one pgbench run measured.
#[derive(Clone, Debug)]
struct RunResult {
    tps: f64,
    latency_ms: f64,
    /// The proxy's CPU (user+system, all threads) per transaction; None for direct.
    cpu_us_per_tx: Option<f64>,
}

/// Settings resolved from the flags (`--quick` changes the defaults).
struct Plan {
    runs: u32,
    duration: u32,
    clients: Vec<u32>,
    scale: u32,
    idle_clients: u32,
    threads: u32,
    pool_size: u32,
    max_clients: u32,
}

/// Everything a target needs to start, shared by all targets.
struct BenchEnv {
    cluster: PgCluster,
    user: String,
    password: String,
    dbname: String,
    dbproxy_bin: Option<PathBuf>,
    pgbouncer_bin: Option<PathBuf>,
    secret: SecretDir,
    workdir: tempfile::TempDir,
    redactor: Redactor,
    plan_pool_size: u32,
    plan_max_clients: u32,
}

/// A started target: where pgbench connects and, for proxies, the process to measure.
struct RunningTarget {
    spec: TargetSpec,
    addr: SocketAddr,
    /// Sent as PGPASSWORD (direct only; the proxies' clients need none).
    password: Option<String>,
    process: Option<ChildProcess>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let redactor = Redactor::default();
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&args, &redactor) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {}", redactor.redact(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn plan(args: &Args) -> Plan {
    let q = args.quick;
    let clients = args
        .clients
        .clone()
        .unwrap_or_else(|| if q { vec![1, 8] } else { vec![1, 8, 32] });
    let idle_clients = args.idle_clients.unwrap_or(if q { 100 } else { 1000 });
    let max_c = clients.iter().copied().max().unwrap_or(1);
    // Session mode gives every logged-in client a server connection, so the pool must hold
    // the idle clients of the memory test; both proxies get the same size.
    let pool_size = max_c.max(idle_clients).max(1);
    Plan {
        runs: args.runs.unwrap_or(if q { 1 } else { 3 }).max(1),
        duration: args.duration.unwrap_or(if q { 3 } else { 10 }).max(1),
        clients,
        scale: args.scale.unwrap_or(if q { 1 } else { 10 }).max(1),
        idle_clients,
        threads: args.threads.max(1),
        pool_size,
        max_clients: pool_size * 2 + 100,
    }
}

async fn run(args: &Args, redactor: &Redactor) -> anyhow::Result<()> {
    let plan = plan(args);
    if cfg!(debug_assertions) {
        eprintln!(
            "WARNING: this is a debug build; run `cargo run --release -p dbtests --bin bench` \
             so dbproxy is measured optimised"
        );
    }
    load::raise_nofile_limit(65_536);
    let pgbench = load::pgbench_bin()?;

    let mut specs: Vec<TargetSpec> = Vec::new();
    let mut targets = args.targets.clone();
    targets.sort();
    targets.dedup();
    for kind in targets {
        let pool_mode = (kind != TargetKind::Direct).then_some(args.pool_mode);
        specs.push(TargetSpec { kind, pool_mode });
    }
    let dbproxy_bin = if specs.iter().any(|s| s.kind == TargetKind::Dbproxy) {
        Some(load::dbproxy_bin()?)
    } else {
        None
    };
    let pgbouncer_bin = load::find_on_path("pgbouncer");
    if specs.iter().any(|s| s.kind == TargetKind::Pgbouncer) && pgbouncer_bin.is_none() {
        println!(
            "pgbouncer is not installed: skipping it (Debian/Ubuntu: apt-get install -y pgbouncer)"
        );
        specs.retain(|s| s.kind != TargetKind::Pgbouncer);
    }

    println!(
        "starting PostgreSQL (max_connections {})...",
        plan.idle_clients + 150
    );
    let cluster = PgCluster::start_with(PgOptions {
        max_connections: (plan.idle_clients + 150).max(200),
        // Commits still write WAL but do not wait for the disk flush: the comparison is
        // about the proxies, and a shared machine's fsync latency would drown it.
        extra_conf: vec!["synchronous_commit = off".into()],
        ..PgOptions::default()
    })
    .context("starting PostgreSQL")?;
    redactor.add(cluster.superuser_password());
    let password = load::generate_password()?;
    redactor.add(&password);
    cluster
        .create_role("bench", &password, PasswordKind::Scram)
        .await?;
    cluster.create_database("bench", "bench").await?;
    let secret = SecretDir::new()?;
    load::write_uri_dsn(&secret, &cluster.uri("bench", &password, "bench"))?;
    let env = BenchEnv {
        cluster,
        user: "bench".into(),
        password,
        dbname: "bench".into(),
        dbproxy_bin,
        pgbouncer_bin,
        secret,
        workdir: tempfile::tempdir()?,
        redactor: redactor.clone(),
        plan_pool_size: plan.pool_size,
        plan_max_clients: plan.max_clients,
    };

    println!("pgbench -i -s {} ...", plan.scale);
    let direct_addr = SocketAddr::new(env.cluster.host().parse()?, env.cluster.port());
    let mut init = pgbench_command(&pgbench, direct_addr, &env, Some(&env.password));
    init.args(["-i", "-q", "-s", &plan.scale.to_string(), &env.dbname]);
    let out = init.output().context("running pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed: {}",
            redactor.redact(&String::from_utf8_lossy(&out.stderr))
        );
    }

    let conditions = conditions(&env, &plan, &pgbench).await;
    let mut running = Vec::new();
    for spec in &specs {
        running.push(start_target(*spec, &env, "bench").await?);
    }

    let mut workloads = Vec::new();
    for &script in &args.scripts {
        for &protocol in &args.protocols {
            for &clients in &plan.clients {
                workloads.push(Workload {
                    script,
                    protocol,
                    clients,
                });
            }
        }
    }
    workloads.sort();
    workloads.dedup();
    let total = workloads.len() * running.len() * plan.runs as usize;
    println!(
        "{total} pgbench runs of {} s ({} rounds x {} workloads x {} targets), about {} min",
        plan.duration,
        plan.runs,
        workloads.len(),
        running.len(),
        (total as u64 * (plan.duration as u64 + 2)).div_ceil(60)
    );

    let mut results: BTreeMap<(Workload, TargetSpec), Vec<Result<RunResult, String>>> =
        BTreeMap::new();
    let mut n = 0;
    for round in 0..plan.runs {
        for w in &workloads {
            // Rotate the order per round so no target always runs first.
            let len = running.len();
            for i in 0..len {
                let t = &mut running[(i + round as usize) % len];
                n += 1;
                if let Some(p) = t.process.as_mut()
                    && let Some(st) = p.exited()
                {
                    bail!(
                        "{} exited ({st}); last log lines:\n{}",
                        t.spec.label(),
                        p.log_tail(30, redactor)
                    );
                }
                prepare_run(&env, w.script).await?;
                let r = run_pgbench(&pgbench, t, w, &plan, &env).await;
                match &r {
                    Ok(r) => println!(
                        "[{n}/{total}] {} {} c={} {}: {:.0} TPS, {:.3} ms{}",
                        w.script.label(),
                        w.protocol.arg(),
                        w.clients,
                        t.spec.label(),
                        r.tps,
                        r.latency_ms,
                        r.cpu_us_per_tx
                            .map(|c| format!(", proxy CPU {c:.1} µs/tx"))
                            .unwrap_or_default()
                    ),
                    Err(e) => println!(
                        "[{n}/{total}] {} {} c={} {}: FAILED: {e}",
                        w.script.label(),
                        w.protocol.arg(),
                        w.clients,
                        t.spec.label()
                    ),
                }
                results.entry((*w, t.spec)).or_default().push(r);
            }
        }
    }
    // The throughput processes served load; memory is measured on fresh ones.
    for t in &mut running {
        if let Some(p) = t.process.as_mut() {
            p.terminate(Duration::from_secs(10));
        }
    }
    drop(running);

    let mut memory = Vec::new();
    if plan.idle_clients > 0 {
        for spec in specs.iter().filter(|s| s.kind != TargetKind::Direct) {
            wait_backends_gone(&env).await;
            match measure_idle_memory(*spec, &env, plan.idle_clients).await {
                Ok(m) => memory.push(m),
                Err(e) => println!(
                    "memory test {}: FAILED: {}",
                    spec.label(),
                    redactor.redact(&format!("{e:#}"))
                ),
            }
        }
    }

    let report = render_report(&conditions, &workloads, &specs, &results, &memory, &plan);
    println!();
    println!("{report}");
    if let Some(path) = &args.output {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
        println!("(written to {})", path.display());
    }
    drop(env);
    Ok(())
}

/// Conditions printed above the table: a benchmark number means nothing without them.
async fn conditions(env: &BenchEnv, plan: &Plan, pgbench: &Path) -> String {
    let mut c = String::new();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let server_version = match env.cluster.superuser_client().await {
        Ok(client) => client
            .query_one("SHOW server_version", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "?".into()),
        Err(_) => "?".into(),
    };
    let pgbouncer = env
        .pgbouncer_bin
        .as_ref()
        .and_then(|b| Command::new(b).arg("--version").output().ok())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "not installed".into());
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(dbtests::binaries::workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        c,
        "Conditions: {cpus} CPUs ({model}), everything on one machine over loopback \
         (PostgreSQL {server_version} with synchronous_commit=off, pgbench, proxy); {pgbouncer}; \
         dbproxy at {commit}, {build} build. pgbench scale {}, `-T {}`, `-j` up to {}, median of {} run(s) per cell, \
         targets interleaved. Both proxies in session mode with pool size {}, clients \
         without password (dbproxy trust on loopback; pgbouncer `auth_type = trust`, server \
         login SCRAM with the password from its auth_file). pgbench: `{}`.",
        plan.scale,
        plan.duration,
        plan.threads,
        plan.runs,
        plan.pool_size,
        pgbench.display(),
        build = if cfg!(debug_assertions) {
            "DEBUG"
        } else {
            "release"
        },
    );
    c
}

/// A pgbench command aimed at `addr` with a clean libpq environment.
fn pgbench_command(
    pgbench: &Path,
    addr: SocketAddr,
    env: &BenchEnv,
    password: Option<&str>,
) -> Command {
    let mut cmd = Command::new(pgbench);
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGAPPNAME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PGSSLMODE", "disable");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd.args([
        "-h",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-U",
        &env.user,
    ]);
    cmd
}

/// What pgbench itself does before a run (it is skipped with `-n` because the proxies
/// would see it): clean the TPC-B tables so every run starts alike.
async fn prepare_run(env: &BenchEnv, script: Script) -> anyhow::Result<()> {
    if script == Script::TpcbLike {
        let client = env
            .cluster
            .connect(&env.user, &env.password, &env.dbname)
            .await?;
        // Separate messages: VACUUM cannot run inside the implicit transaction of a batch.
        for sql in [
            "VACUUM pgbench_branches, pgbench_tellers",
            "TRUNCATE pgbench_history",
        ] {
            client
                .batch_execute(sql)
                .await
                .with_context(|| format!("{sql} before a TPC-B-like run"))?;
        }
    }
    Ok(())
}

async fn run_pgbench(
    pgbench: &Path,
    target: &RunningTarget,
    w: &Workload,
    plan: &Plan,
    env: &BenchEnv,
) -> Result<RunResult, String> {
    let mut cmd = pgbench_command(pgbench, target.addr, env, target.password.as_deref());
    cmd.args(["-n", "-M", w.protocol.arg()]);
    if w.script == Script::SelectOnly {
        cmd.arg("-S");
    }
    cmd.args([
        "-c",
        &w.clients.to_string(),
        "-j",
        &plan.threads.min(w.clients).to_string(),
        "-T",
        &plan.duration.to_string(),
        &env.dbname,
    ]);
    let pid = target.process.as_ref().map(|p| p.pid());
    let cpu_before = pid
        .map(load::proc_cpu_time)
        .transpose()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("running pgbench: {e}"))?;
    let cpu_after = pid
        .map(load::proc_cpu_time)
        .transpose()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(env.redactor.redact(&format!(
            "pgbench exited {} after {:.1} s: {}",
            out.status,
            started.elapsed().as_secs_f64(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    let field = |prefix: &str| -> Option<&str> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let tps: f64 = field("tps =")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench output: {stdout}"))?;
    let latency_ms: f64 = field("latency average =")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no latency average in pgbench output".to_owned())?;
    let transactions: u64 = field("number of transactions actually processed:")
        .and_then(|v| v.split(['/', ' ']).next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no transaction count in pgbench output".to_owned())?;
    let failed: u64 = field("number of failed transactions:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if failed > 0 {
        return Err(format!("{failed} failed transactions"));
    }
    let cpu_us_per_tx = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if transactions > 0 => {
            Some(a.saturating_sub(b).as_secs_f64() * 1e6 / transactions as f64)
        }
        _ => None,
    };
    Ok(RunResult {
        tps,
        latency_ms,
        cpu_us_per_tx,
    })
}

/// Starts one target and waits until a client can log in through it.
async fn start_target(
    spec: TargetSpec,
    env: &BenchEnv,
    tag: &str,
) -> anyhow::Result<RunningTarget> {
    match spec.kind {
        TargetKind::Direct => Ok(RunningTarget {
            spec,
            addr: SocketAddr::new(env.cluster.host().parse()?, env.cluster.port()),
            password: Some(env.password.clone()),
            process: None,
        }),
        TargetKind::Dbproxy => {
            let bin = env
                .dbproxy_bin
                .clone()
                .context("dbproxy binary not resolved")?;
            let mut cfg = DbproxyConfig::loopback(
                bin,
                env.secret.file("uri_dsn.txt"),
                env.workdir.path().join(format!("dbproxy-{tag}.log")),
            )?;
            cfg.pool_size = Some(env.plan_pool_size);
            cfg.max_clients = Some(env.plan_max_clients);
            cfg.pool_mode = spec.pool_mode.map(|m| m.arg().to_owned());
            let process = load::start_dbproxy(&cfg, Duration::from_secs(60), &env.redactor)
                .await
                .context("starting dbproxy")?;
            Ok(RunningTarget {
                spec,
                addr: cfg.addr(),
                password: None,
                process: Some(process),
            })
        }
        TargetKind::Pgbouncer => {
            let (addr, process) = start_pgbouncer(spec, env, tag).await?;
            Ok(RunningTarget {
                spec,
                addr,
                password: None,
                process: Some(process),
            })
        }
    }
}

/// Starts pgbouncer in the foreground with a config equivalent to dbproxy's: same pool
/// size and mode, clients trusted on loopback, SCRAM to the server with the password
/// from its auth_file. As root it runs as `nobody` (it refuses root), with the raised
/// open-file limit inherited from this process.
async fn start_pgbouncer(
    spec: TargetSpec,
    env: &BenchEnv,
    tag: &str,
) -> anyhow::Result<(SocketAddr, ChildProcess)> {
    let bin = env
        .pgbouncer_bin
        .clone()
        .context("pgbouncer not installed")?;
    let mode = spec.pool_mode.unwrap_or(PoolMode::Session);
    let dir = env.workdir.path().join(format!("pgbouncer-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let addr = load::free_loopback_addr()?;
    let userlist = dir.join("userlist.txt");
    let quoted = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    std::fs::write(
        &userlist,
        format!("{} {}\n", quoted(&env.user), quoted(&env.password)),
    )?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             {db} = host={host} port={port} dbname={db}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {lport}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {userlist}\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool}\n\
             max_client_conn = {maxc}\n\
             max_db_connections = 0\n\
             server_reset_query = DISCARD ALL\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile =\n\
             pidfile =\n",
            db = env.dbname,
            host = env.cluster.host(),
            port = env.cluster.port(),
            lport = addr.port(),
            userlist = userlist.display(),
            mode = mode.arg(),
            pool = env.plan_pool_size,
            maxc = env.plan_max_clients,
        ),
    )?;
    let mut cmd = Command::new(&bin);
    cmd.arg(&ini);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let (uid, gid) = unprivileged_user()?;
        for p in [&dir, &userlist, &ini] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&userlist, std::fs::Permissions::from_mode(0o600))?;
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let mut process = ChildProcess::spawn(
        "pgbouncer",
        cmd,
        &env.workdir.path().join(format!("pgbouncer-{tag}.log")),
    )?;
    let conninfo = format!(
        "host={} port={} user={} dbname={} sslmode=disable",
        addr.ip(),
        addr.port(),
        env.user,
        env.dbname
    );
    load::wait_pg_login(
        &mut process,
        &conninfo,
        Duration::from_secs(30),
        &env.redactor,
    )
    .await?;
    Ok((addr, process))
}

/// uid and gid of `nobody`, the account pgbouncer runs as when we are root.
fn unprivileged_user() -> anyhow::Result<(u32, u32)> {
    let name = std::ffi::CString::new("nobody")?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("user `nobody` not found; pgbouncer refuses to run as root");
    }
    // SAFETY: non-null result of getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

/// After a proxy stops, its server connections take a moment to leave PostgreSQL; the
/// next measurement needs the slots.
async fn wait_backends_gone(env: &BenchEnv) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let n: i64 = match env.cluster.superuser_client().await {
            Ok(c) => c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(i64::MAX),
            Err(_) => i64::MAX,
        };
        if n <= 5 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// RSS of a fresh proxy with no clients and with `n` logged-in idle clients.
struct MemoryResult {
    spec: TargetSpec,
    clients: u32,
    rss_empty: u64,
    rss_loaded: u64,
}

async fn measure_idle_memory(
    spec: TargetSpec,
    env: &BenchEnv,
    n: u32,
) -> anyhow::Result<MemoryResult> {
    println!("memory: {} with {n} idle clients...", spec.label());
    let target = start_target(spec, env, "memory").await?;
    let pid = target.process.as_ref().context("no process")?.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_empty = load::proc_rss_bytes(pid)?;
    let conninfo = format!(
        "host={} port={} user={} dbname={} sslmode=disable connect_timeout=60",
        target.addr.ip(),
        target.addr.port(),
        env.user,
        env.dbname
    );
    let mut clients = Vec::with_capacity(n as usize);
    let mut pending = tokio::task::JoinSet::new();
    let mut opened = 0u32;
    // At most 32 logins in flight: PostgreSQL forks a backend for each one.
    while opened < n || !pending.is_empty() {
        while opened < n && pending.len() < 32 {
            let conninfo = conninfo.clone();
            pending.spawn(async move {
                let (client, conn) =
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
                let driver = tokio::spawn(conn);
                client.simple_query("SELECT 1").await?;
                Ok::<_, tokio_postgres::Error>((client, driver))
            });
            opened += 1;
        }
        if let Some(r) = pending.join_next().await {
            let pair = r
                .context("login task")?
                .map_err(|e| anyhow::anyhow!(env.redactor.redact(&e.to_string())))
                .with_context(|| format!("idle client {} of {n}", clients.len() + 1))?;
            clients.push(pair);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_loaded = load::proc_rss_bytes(pid)?;
    drop(clients);
    Ok(MemoryResult {
        spec,
        clients: n,
        rss_empty,
        rss_loaded,
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Median figures of one cell.
struct Cell {
    tps: f64,
    tps_min: f64,
    tps_max: f64,
    latency_ms: f64,
    cpu_us: Option<f64>,
    runs: usize,
    failures: usize,
}

fn cell(runs: &[Result<RunResult, String>]) -> Option<Cell> {
    let ok: Vec<&RunResult> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    let tps: Vec<f64> = ok.iter().map(|r| r.tps).collect();
    Some(Cell {
        tps: median(tps.clone())?,
        tps_min: tps.iter().cloned().fold(f64::INFINITY, f64::min),
        tps_max: tps.iter().cloned().fold(0.0, f64::max),
        latency_ms: median(ok.iter().map(|r| r.latency_ms).collect())?,
        cpu_us: median(ok.iter().filter_map(|r| r.cpu_us_per_tx).collect()),
        runs: ok.len(),
        failures: runs.len() - ok.len(),
    })
}

fn render_report(
    conditions: &str,
    workloads: &[Workload],
    specs: &[TargetSpec],
    results: &BTreeMap<(Workload, TargetSpec), Vec<Result<RunResult, String>>>,
    memory: &[MemoryResult],
    plan: &Plan,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{conditions}");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| workload | clients | target | TPS{} | vs direct | mean latency | latency vs direct | proxy CPU per tx |",
        if plan.runs > 1 { " (min-max)" } else { "" }
    );
    let _ = writeln!(s, "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    let direct = specs.iter().find(|s| s.kind == TargetKind::Direct);
    for w in workloads {
        let base = direct.and_then(|d| results.get(&(*w, *d)).and_then(|r| cell(r)));
        for (i, spec) in specs.iter().enumerate() {
            let label = if i == 0 {
                format!("{} {}", w.script.label(), w.protocol.arg())
            } else {
                String::new()
            };
            let clients = if i == 0 {
                w.clients.to_string()
            } else {
                String::new()
            };
            let runs = results.get(&(*w, *spec)).map(Vec::as_slice).unwrap_or(&[]);
            let Some(c) = cell(runs) else {
                let why = runs
                    .iter()
                    .find_map(|r| r.as_ref().err())
                    .cloned()
                    .unwrap_or_else(|| "not run".into());
                let _ = writeln!(
                    s,
                    "| {label} | {clients} | {} | failed: {} | | | | |",
                    spec.label(),
                    why.replace('|', "/")
                );
                continue;
            };
            let tps = if plan.runs > 1 {
                format!("{:.0} ({:.0}-{:.0})", c.tps, c.tps_min, c.tps_max)
            } else {
                format!("{:.0}", c.tps)
            };
            let failures = if c.failures > 0 {
                format!(" ({} of {} runs failed)", c.failures, c.failures + c.runs)
            } else {
                String::new()
            };
            let (ratio, dlat) = match (&base, spec.kind) {
                (Some(b), k) if k != TargetKind::Direct => (
                    format!("{:.2}x", c.tps / b.tps),
                    format!("{:+.0} µs", (c.latency_ms - b.latency_ms) * 1000.0),
                ),
                (Some(_), _) => ("1.00x".into(), "".into()),
                (None, _) => ("".into(), "".into()),
            };
            let cpu = c.cpu_us.map(|v| format!("{v:.1} µs")).unwrap_or_default();
            let _ = writeln!(
                s,
                "| {label} | {clients} | {}{failures} | {tps} | {ratio} | {:.3} ms | {dlat} | {cpu} |",
                spec.label(),
                c.latency_ms
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Proxy CPU per tx: user+system CPU of the proxy process (all threads, from \
         /proc/<pid>/stat) during the run divided by the transactions pgbench completed. \
         A TPC-B-like transaction is 7 statements, a select-only one is 1."
    );
    if !memory.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| idle clients | target | RSS, no clients | RSS with clients | per idle client |"
        );
        let _ = writeln!(s, "| ---: | --- | ---: | ---: | ---: |");
        for m in memory {
            let per = (m.rss_loaded as f64 - m.rss_empty as f64) / m.clients.max(1) as f64;
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} kB |",
                m.clients,
                m.spec.label(),
                m.rss_empty as f64 / 1048576.0,
                m.rss_loaded as f64 / 1048576.0,
                per / 1024.0
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Memory: VmRSS of a freshly started proxy, then with every client logged in and \
             idle after one `SELECT 1` (in session mode each holds a server connection, so the \
             pool size and PostgreSQL's max_connections are raised to fit). The per-client \
             figure is the difference divided by the number of clients."
        );
    }
    s
}
