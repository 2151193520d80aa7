//! Benchmark command: pgbench through `dbproxy`, against the same database directly and
//! through pgbouncer (when installed), with the proxies' own CPU time per transaction and
//! their memory per idle client. Prints a Markdown table ready for README.
//!
//! The matrix is workloads (script x protocol x client count) by targets (direct, or a
//! proxy in a pool mode). `--pool-mode session,transaction` measures both pool modes side by
//! side (issue 4); the `dbproxy-tls` target runs dbproxy with `sslmode=require` to a server
//! with `ssl = on` while every other target stays plaintext on the same cluster (issue 5).
//! Runs are interleaved (every target once per workload per round) so slow drifts of the
//! shared machine hit every target alike; each cell reports the median over the rounds.
//!
//! `--migration` measures something else: clients that stay connected while the Secret
//! moves the proxy between two clusters (live migration, issue 4), with the errors they saw
//! and the time until every client's queries ran on the new host.

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
use dbtests::tls::{ServerCert, TestPki};
use dbtests::{PasswordKind, PgCluster, SecretDir};

/// Command line of the benchmark.
#[derive(Parser, Debug)]
#[command(about = "pgbench direct vs dbproxy vs pgbouncer, with proxy CPU and idle-client memory")]
struct Args {
    /// Short smoke run: 3 s per cell, 1 round, clients 1,8, scale 1, 100 idle clients
    /// (with --migration: 2 rotations per pool mode).
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
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [TargetKind::Direct, TargetKind::Dbproxy, TargetKind::DbproxyTls, TargetKind::Pgbouncer])]
    targets: Vec<TargetKind>,
    /// Pool modes of the proxies, comma separated: every proxy target runs in each
    /// [default: session; with --migration: session,transaction].
    #[arg(long, value_enum, value_delimiter = ',')]
    pool_mode: Vec<PoolMode>,
    /// pgbench scale factor (`pgbench -i -s`).
    #[arg(long)]
    scale: Option<u32>,
    /// Idle clients for the memory measurement (0 skips it).
    #[arg(long)]
    idle_clients: Option<u32>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Instead of pgbench: live migration under load. Clients stay connected to dbproxy
    /// while its Secret alternates between two clusters; reports errors and the time until
    /// every client's queries ran on the new host.
    #[arg(long)]
    migration: bool,
    /// Concurrent clients of the migration run (one connection each).
    #[arg(long, default_value_t = 50)]
    migration_clients: u32,
    /// Secret rotations (A->B, B->A, ...) per pool mode in the migration run [default: 6; 2 with --quick].
    #[arg(long)]
    migration_rotations: Option<u32>,
    /// Seconds the clients keep running on the new host once all moved, before the next rotation.
    #[arg(long, default_value_t = 3)]
    migration_hold: u64,
    /// Pause of each migration client between two iterations, in milliseconds (0: as fast as it can).
    #[arg(long, default_value_t = 0)]
    migration_pause_ms: u64,
    /// One more dbproxy flag for every dbproxy the run starts (repeatable), for example
    /// `--dbproxy-arg=--transaction-lane=true`.
    #[arg(long, allow_hyphen_values = true)]
    dbproxy_arg: Vec<String>,
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
    /// `dbproxy` with `sslmode=require` to the server (the server runs `ssl = on`; pgbench
    /// still talks plaintext to the proxy).
    DbproxyTls,
    /// Debian's pgbouncer, configured like dbproxy.
    Pgbouncer,
}

impl TargetKind {
    /// Whether this target is a dbproxy process.
    fn is_dbproxy(self) -> bool {
        matches!(self, TargetKind::Dbproxy | TargetKind::DbproxyTls)
    }
}

/// Pool mode of a proxy target.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PoolMode {
    /// A server connection per client session.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    fn arg(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
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
            (TargetKind::DbproxyTls, Some(m)) => format!("dbproxy, TLS to server ({})", m.arg()),
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
    pool_modes: Vec<PoolMode>,
    /// `--dbproxy-arg`s, appended to every dbproxy's command line.
    dbproxy_args: Vec<String>,
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
    /// The same DSN with `sslmode=require`, for the `dbproxy-tls` target.
    secret_tls: Option<SecretDir>,
    /// Keeps the server's certificate files alive while the cluster runs.
    _pki: Option<TestPki>,
    /// `PgBouncer 1.18.0` as it prints itself, and the parsed (major, minor).
    pgbouncer_version: Option<(String, (u32, u32))>,
    workdir: tempfile::TempDir,
    redactor: Redactor,
    plan_pool_size: u32,
    plan_max_clients: u32,
    plan_dbproxy_args: Vec<String>,
}

/// The first PgBouncer release with `max_prepared_statements` (prepared statements in
/// transaction mode).
const PGBOUNCER_PREPARED_SINCE: (u32, u32) = (1, 21);

/// `PgBouncer 1.18.0` (first line of `pgbouncer --version`) -> (1, 18).
fn parse_pgbouncer_version(text: &str) -> Option<(u32, u32)> {
    let v = text
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let minor = minor.parse().ok()?;
    Some((major, minor))
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
    let mut pool_modes = args.pool_mode.clone();
    if pool_modes.is_empty() {
        pool_modes = if args.migration {
            vec![PoolMode::Session, PoolMode::Transaction]
        } else {
            vec![PoolMode::Session]
        };
    }
    pool_modes.sort();
    pool_modes.dedup();
    Plan {
        runs: args.runs.unwrap_or(if q { 1 } else { 3 }).max(1),
        duration: args.duration.unwrap_or(if q { 3 } else { 10 }).max(1),
        clients,
        scale: args.scale.unwrap_or(if q { 1 } else { 10 }).max(1),
        idle_clients,
        threads: args.threads.max(1),
        pool_size,
        max_clients: pool_size * 2 + 100,
        pool_modes,
        dbproxy_args: args.dbproxy_arg.clone(),
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
    if args.migration {
        return migration::run(args, &plan, redactor).await;
    }
    let pgbench = load::pgbench_bin()?;

    let mut specs: Vec<TargetSpec> = Vec::new();
    let mut targets = args.targets.clone();
    targets.sort();
    targets.dedup();
    for kind in targets {
        if kind == TargetKind::Direct {
            specs.push(TargetSpec {
                kind,
                pool_mode: None,
            });
        } else {
            for &m in &plan.pool_modes {
                specs.push(TargetSpec {
                    kind,
                    pool_mode: Some(m),
                });
            }
        }
    }
    let dbproxy_bin = if specs.iter().any(|s| s.kind.is_dbproxy()) {
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
    let pgbouncer_version = pgbouncer_bin.as_deref().and_then(|b| {
        let text = version_line(b)?;
        let parsed = parse_pgbouncer_version(&text)?;
        Some((text, parsed))
    });

    let tls = specs.iter().any(|s| s.kind == TargetKind::DbproxyTls);
    println!(
        "starting PostgreSQL (max_connections {}{})...",
        plan.idle_clients + 150,
        if tls { ", ssl = on" } else { "" }
    );
    // One cluster serves every target: with `ssl = on` it still accepts the plaintext
    // logins of direct, dbproxy and pgbouncer (their DSNs say sslmode=disable), and the
    // `host` lines of pg_hba.conf match both.
    let pki = if tls {
        Some(TestPki::generate().context("creating the test CA for ssl = on")?)
    } else {
        None
    };
    let mut options = match &pki {
        Some(pki) => pki.pg_options(
            ServerCert::Valid,
            &[
                "local all all scram-sha-256",
                "host all all 127.0.0.1/32 scram-sha-256",
                "host all all ::1/128 scram-sha-256",
            ],
        )?,
        None => PgOptions::default(),
    };
    options.max_connections = (plan.idle_clients + 150).max(200);
    // Commits still write WAL but do not wait for the disk flush: the comparison is
    // about the proxies, and a shared machine's fsync latency would drown it.
    options.extra_conf.push("synchronous_commit = off".into());
    let cluster = PgCluster::start_with(options).context("starting PostgreSQL")?;
    redactor.add(cluster.superuser_password());
    let password = load::generate_password()?;
    redactor.add(&password);
    cluster
        .create_role("bench", &password, PasswordKind::Scram)
        .await?;
    cluster.create_database("bench", "bench").await?;
    let secret = SecretDir::new()?;
    let uri = cluster.uri("bench", &password, "bench");
    load::write_uri_dsn(&secret, &uri)?;
    let secret_tls = if tls {
        let base = uri
            .strip_suffix("?sslmode=disable")
            .context("PgCluster::uri no longer ends in ?sslmode=disable")?;
        let dir = SecretDir::new()?;
        load::write_uri_dsn(&dir, &format!("{base}?sslmode=require"))?;
        Some(dir)
    } else {
        None
    };
    let env = BenchEnv {
        cluster,
        user: "bench".into(),
        password,
        dbname: "bench".into(),
        dbproxy_bin,
        pgbouncer_bin,
        secret,
        secret_tls,
        _pki: pki,
        pgbouncer_version,
        workdir: tempfile::tempdir()?,
        redactor: redactor.clone(),
        plan_pool_size: plan.pool_size,
        plan_max_clients: plan.max_clients,
        plan_dbproxy_args: plan.dbproxy_args.clone(),
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
        running.push(start_target(*spec, &env, "bench", &[]).await?);
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
    let mut notes: BTreeMap<(Workload, TargetSpec), String> = BTreeMap::new();
    for w in &workloads {
        for spec in &specs {
            if let Some(note) = cell_note(&env, w, spec) {
                notes.insert((*w, *spec), note);
            }
        }
    }
    let mut tls_info: Option<String> = None;
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
                let ok = r.is_ok();
                results.entry((*w, t.spec)).or_default().push(r);
                if ok && tls_info.is_none() && t.spec.kind == TargetKind::DbproxyTls {
                    // The proxy keeps its server connections a while: ask the server
                    // what they negotiated.
                    tls_info = server_tls_info(&env).await;
                }
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

    let report = render_report(
        &conditions,
        &workloads,
        &specs,
        &Outcome {
            results: &results,
            notes: &notes,
            tls_info: tls_info.as_deref(),
            memory: &memory,
        },
        &plan,
    );
    println!();
    println!("{report}");
    if let Some(path) = &args.output {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
        println!("(written to {})", path.display());
    }
    drop(env);
    Ok(())
}

/// Why a cell may not work as measured: pgbouncer before 1.21 does not track named
/// prepared statements, so in transaction mode `-M prepared` works only as long as every
/// transaction of a client happens to get the server that prepared its statements.
fn cell_note(env: &BenchEnv, w: &Workload, spec: &TargetSpec) -> Option<String> {
    if spec.kind != TargetKind::Pgbouncer
        || spec.pool_mode != Some(PoolMode::Transaction)
        || w.protocol != Protocol::Prepared
    {
        return None;
    }
    match &env.pgbouncer_version {
        Some((_, v)) if *v >= PGBOUNCER_PREPARED_SINCE => None,
        Some((text, _)) => Some(format!(
            "{text} has no max_prepared_statements (added in {}.{}): it does not track named \
             prepared statements in transaction mode",
            PGBOUNCER_PREPARED_SINCE.0, PGBOUNCER_PREPARED_SINCE.1
        )),
        None => Some(
            "pgbouncer version unknown: max_prepared_statements not set, named prepared \
             statements are not tracked in transaction mode"
                .into(),
        ),
    }
}

/// TLS version and cipher of the proxy's server connections, from `pg_stat_ssl`.
async fn server_tls_info(env: &BenchEnv) -> Option<String> {
    let client = env.cluster.superuser_client().await.ok()?;
    let row = client
        .query_opt(
            "SELECT s.version, s.cipher, s.bits FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.usename = $1 LIMIT 1",
            &[&env.user],
        )
        .await
        .ok()??;
    let version: Option<String> = row.get(0);
    let cipher: Option<String> = row.get(1);
    let bits: Option<i32> = row.get(2);
    Some(format!(
        "{} {} ({} bits)",
        version.unwrap_or_default(),
        cipher.unwrap_or_default(),
        bits.unwrap_or_default()
    ))
}

/// First line of `bin --version`.
fn version_line(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
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
        .pgbouncer_version
        .as_ref()
        .map(|(text, _)| text.clone())
        .or_else(|| env.pgbouncer_bin.as_deref().and_then(version_line))
        .unwrap_or_else(|| "pgbouncer not installed".into());
    let prepared = match &env.pgbouncer_version {
        Some((_, v)) if *v >= PGBOUNCER_PREPARED_SINCE => {
            " (transaction mode with `max_prepared_statements = 200`)"
        }
        _ => "",
    };
    let modes = plan
        .pool_modes
        .iter()
        .map(|m| m.arg())
        .collect::<Vec<_>>()
        .join(" and ");
    let tls = if env.secret_tls.is_some() {
        " The server runs `ssl = on` (ECDSA P-256 certificate from a test CA); the \
         `dbproxy, TLS to server` target's DSN has `sslmode=require` (channel binding \
         `prefer`), every other target logs in to the same server in plaintext \
         (`sslmode=disable`), and pgbench talks plaintext to every proxy."
    } else {
        ""
    };
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
         (PostgreSQL {server_version} with synchronous_commit=off, pgbench, proxy); {pgbouncer}{prepared}; \
         dbproxy {dbproxy}. pgbench scale {}, `-T {}`, `-j` up to {}, median of {} run(s) per cell, \
         targets interleaved. Proxies in {modes} mode with pool size {}, clients \
         without password (dbproxy trust on loopback; pgbouncer `auth_type = trust`, server \
         login SCRAM with the password from its auth_file).{tls} pgbench: `{}`.",
        plan.scale,
        plan.duration,
        plan.threads,
        plan.runs,
        plan.pool_size,
        pgbench.display(),
        dbproxy = dbproxy_origin(&commit, &plan.dbproxy_args),
    );
    c
}

/// Appends the `--dbproxy-arg`s to `cfg`; a `--pool-size`, `--max-clients` or `--pool-mode`
/// among them replaces the bench's own (dbproxy refuses a flag given twice).
fn with_dbproxy_args(cfg: &mut DbproxyConfig, args: &[String]) {
    let given = |flag: &str| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if given("--pool-size") {
        cfg.pool_size = None;
    }
    if given("--max-clients") {
        cfg.max_clients = None;
    }
    if given("--pool-mode") {
        cfg.pool_mode = None;
    }
    cfg.extra_args.extend(args.iter().cloned());
}

/// Where the measured dbproxy came from: the work tree, or a binary named by `DBPROXY_BIN`
/// (then the tree's commit says nothing about it), and the `--dbproxy-arg`s it ran with.
fn dbproxy_origin(commit: &str, extra: &[String]) -> String {
    let origin = match std::env::var_os("DBPROXY_BIN") {
        Some(p) => format!(
            "from `DBPROXY_BIN={}` (work tree at {commit})",
            Path::new(&p).display()
        ),
        None => format!(
            "at {commit}, {} build",
            if cfg!(debug_assertions) {
                "DEBUG"
            } else {
                "release"
            }
        ),
    };
    if extra.is_empty() {
        origin
    } else {
        format!("{origin}, run with `{}`", extra.join(" "))
    }
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
    extra_args: &[&str],
) -> anyhow::Result<RunningTarget> {
    match spec.kind {
        TargetKind::Direct => Ok(RunningTarget {
            spec,
            addr: SocketAddr::new(env.cluster.host().parse()?, env.cluster.port()),
            password: Some(env.password.clone()),
            process: None,
        }),
        TargetKind::Dbproxy | TargetKind::DbproxyTls => {
            let bin = env
                .dbproxy_bin
                .clone()
                .context("dbproxy binary not resolved")?;
            let secret = match spec.kind {
                TargetKind::DbproxyTls => env
                    .secret_tls
                    .as_ref()
                    .context("no sslmode=require Secret (the cluster runs without ssl)")?,
                _ => &env.secret,
            };
            let name = format!(
                "{:?}-{}-{tag}",
                spec.kind,
                spec.pool_mode.unwrap_or(PoolMode::Session).arg()
            )
            .to_lowercase();
            let mut cfg = DbproxyConfig::loopback(
                bin,
                secret.file("uri_dsn.txt"),
                env.workdir.path().join(format!("{name}.log")),
            )?;
            cfg.pool_size = Some(env.plan_pool_size);
            cfg.max_clients = Some(env.plan_max_clients);
            cfg.pool_mode = spec.pool_mode.map(|m| m.arg().to_owned());
            cfg.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
            with_dbproxy_args(&mut cfg, &env.plan_dbproxy_args);
            let process = load::start_dbproxy(&cfg, Duration::from_secs(60), &env.redactor)
                .await
                .with_context(|| format!("starting {}", spec.label()))?;
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
    let dir = env
        .workdir
        .path()
        .join(format!("pgbouncer-{}-{tag}", mode.arg()));
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
             pidfile =\n\
             {prepared}",
            db = env.dbname,
            host = env.cluster.host(),
            port = env.cluster.port(),
            lport = addr.port(),
            userlist = userlist.display(),
            mode = mode.arg(),
            pool = env.plan_pool_size,
            maxc = env.plan_max_clients,
            prepared = match &env.pgbouncer_version {
                Some((_, v)) if *v >= PGBOUNCER_PREPARED_SINCE && mode == PoolMode::Transaction => {
                    "max_prepared_statements = 200\n"
                }
                _ => "",
            },
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
        &env.workdir
            .path()
            .join(format!("pgbouncer-{}-{tag}.log", mode.arg())),
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

/// How long the memory test leaves the clients idle before its second reading: dbproxy parks
/// a client after 10 to 20 s of silence (`--client-park-after-ms` 10000 by default) and hands
/// the memory back half a second later.
const IDLE_READ_AFTER: Duration = Duration::from_secs(22);

/// RSS of a fresh proxy with no clients and with `n` logged-in idle clients.
struct MemoryResult {
    label: String,
    clients: u32,
    rss_empty: u64,
    /// Anonymous memory (`RssAnon`) with no clients, a second after the last login, and
    /// after [`IDLE_READ_AFTER`] of silence.
    anon: [u64; 3],
}

async fn measure_idle_memory(
    spec: TargetSpec,
    env: &BenchEnv,
    n: u32,
) -> anyhow::Result<MemoryResult> {
    println!("memory: {} with {n} idle clients...", spec.label());
    let target = start_target(spec, env, "memory", &[]).await?;
    let pid = target.process.as_ref().context("no process")?.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_empty = load::proc_rss_bytes(pid)?;
    let anon_empty = load::proc_anon_bytes(pid)?;
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
    let anon_loaded = load::proc_anon_bytes(pid)?;
    tokio::time::sleep(IDLE_READ_AFTER - Duration::from_secs(1)).await;
    let anon_idle = load::proc_anon_bytes(pid)?;
    drop(clients);
    Ok(MemoryResult {
        label: spec.label(),
        clients: n,
        rss_empty,
        anon: [anon_empty, anon_loaded, anon_idle],
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

/// Everything the matrix measured, for the report.
struct Outcome<'a> {
    results: &'a BTreeMap<(Workload, TargetSpec), Vec<Result<RunResult, String>>>,
    /// Cells that are known not to work as measured, with the reason.
    notes: &'a BTreeMap<(Workload, TargetSpec), String>,
    /// What the `dbproxy-tls` target's server connections negotiated.
    tls_info: Option<&'a str>,
    memory: &'a [MemoryResult],
}

fn render_report(
    conditions: &str,
    workloads: &[Workload],
    specs: &[TargetSpec],
    outcome: &Outcome<'_>,
    plan: &Plan,
) -> String {
    let results = outcome.results;
    let memory = outcome.memory;
    let mut footnotes: Vec<String> = Vec::new();
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
            let note = outcome.notes.get(&(*w, *spec));
            let Some(c) = cell(runs) else {
                let why = runs
                    .iter()
                    .find_map(|r| r.as_ref().err())
                    .cloned()
                    .unwrap_or_else(|| "not run".into());
                let verdict = match note {
                    Some(n) => format!("n/a: {n}; pgbench: {}", server_errors(&why)),
                    None => format!("failed: {why}"),
                };
                let _ = writeln!(
                    s,
                    "| {label} | {clients} | {} | {} | | | | |",
                    spec.label(),
                    verdict.replace('|', "/")
                );
                continue;
            };
            let mark = match note {
                Some(n) => {
                    footnotes.push(format!(
                        "{} in `{} {} -c {}` completed, but {n}: it worked only because each \
                         client's transactions happened to find the server holding its \
                         statements.",
                        spec.label(),
                        w.script.label(),
                        w.protocol.arg(),
                        w.clients
                    ));
                    format!(" [{}]", footnotes.len())
                }
                None => String::new(),
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
                "| {label} | {clients} | {}{mark}{failures} | {tps} | {ratio} | {:.3} ms | {dlat} | {cpu} |",
                spec.label(),
                c.latency_ms
            );
        }
    }
    let _ = writeln!(s);
    for (i, f) in footnotes.iter().enumerate() {
        let _ = writeln!(s, "[{}] {f}", i + 1);
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "Proxy CPU per tx: user+system CPU of the proxy process (all threads, from \
         /proc/<pid>/stat) during the run divided by the transactions pgbench completed. \
         A TPC-B-like transaction is 7 statements, a select-only one is 1."
    );
    render_tls_cost(&mut s, workloads, specs, outcome);
    if !memory.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| idle clients | target | RSS, no clients | per client, 1 s after the logins \
             | per client, after {} s idle |",
            IDLE_READ_AFTER.as_secs()
        );
        let _ = writeln!(s, "| ---: | --- | ---: | ---: | ---: |");
        for m in memory {
            let per =
                |anon: u64| (anon as f64 - m.anon[0] as f64) / m.clients.max(1) as f64 / 1024.0;
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} MiB | {:.2} kB | **{:.2} kB** |",
                m.clients,
                m.label,
                m.rss_empty as f64 / 1048576.0,
                per(m.anon[1]),
                per(m.anon[2]),
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Memory: VmRSS of a freshly started proxy, then the growth of its anonymous \
             memory (`RssAnon`: heap, stacks; not the code pages, which the page cache \
             shares) with every client logged in and idle after one `SELECT 1`, divided by \
             the number of clients, read twice: a second after the last login, and after {} \
             s of silence. In session mode each idle client holds a server connection (so \
             the pool size and PostgreSQL's max_connections are raised to fit); in \
             transaction mode it holds none. dbproxy parks a client silent for 10 to \
             20 s (`--client-park-after-ms`, 10000 by default): its sockets (a session's \
             server socket too) leave the runtime until either side speaks again, and the \
             memory its task and buffers used goes back to the system.",
            IDLE_READ_AFTER.as_secs()
        );
    }
    s
}

/// The distinct server errors in pgbench's output (`ERROR:  prepared statement "P_0" does
/// not exist`), or the whole text when there are none.
fn server_errors(text: &str) -> String {
    let mut seen: Vec<String> = Vec::new();
    for part in text.split(" | ") {
        if let Some(i) = part.find("ERROR:") {
            let e = part[i..].split_whitespace().collect::<Vec<_>>().join(" ");
            if !seen.contains(&e) {
                seen.push(e);
            }
        }
    }
    if seen.is_empty() {
        text.to_owned()
    } else {
        seen.join("; ")
    }
}

/// The price of TLS to the server: `dbproxy, TLS to server` against plaintext `dbproxy` in
/// the same pool mode and workload, side by side.
fn render_tls_cost(s: &mut String, workloads: &[Workload], specs: &[TargetSpec], o: &Outcome<'_>) {
    let pairs: Vec<(TargetSpec, TargetSpec)> = specs
        .iter()
        .filter(|t| t.kind == TargetKind::DbproxyTls)
        .filter_map(|t| {
            specs
                .iter()
                .find(|p| p.kind == TargetKind::Dbproxy && p.pool_mode == t.pool_mode)
                .map(|p| (*p, *t))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "TLS to the server{}, against plaintext dbproxy in the same run (medians):",
        o.tls_info
            .map(|i| format!(" ({i}, from pg_stat_ssl)"))
            .unwrap_or_default()
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| workload | clients | pool mode | TPS TLS / plaintext | CPU per tx plaintext | CPU per tx TLS | TLS adds |"
    );
    let _ = writeln!(s, "| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for w in workloads {
        for (plain, tls) in &pairs {
            let get = |t: &TargetSpec| o.results.get(&(*w, *t)).and_then(|r| cell(r));
            let (Some(p), Some(t)) = (get(plain), get(tls)) else {
                continue;
            };
            let (cpu_p, cpu_t, delta) = match (p.cpu_us, t.cpu_us) {
                (Some(a), Some(b)) => (
                    format!("{a:.1} µs"),
                    format!("{b:.1} µs"),
                    format!("{:+.1} µs ({:+.0} %)", b - a, (b / a - 1.0) * 100.0),
                ),
                _ => (String::new(), String::new(), String::new()),
            };
            let _ = writeln!(
                s,
                "| {} {} | {} | {} | {:.2}x | {cpu_p} | {cpu_t} | {delta} |",
                w.script.label(),
                w.protocol.arg(),
                w.clients,
                plain.pool_mode.map(PoolMode::arg).unwrap_or("-"),
                t.tps / p.tps
            );
        }
    }
}

/// Live migration under load (`--migration`): dbproxy follows a Secret that alternates
/// between two clusters A and B with the same role, database and tables, while clients
/// stay connected and keep querying. Measures the errors the clients see and the time from
/// each Secret write until every client's latest query ran on the new host.
mod migration {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use dbtests::load::{self, DbproxyConfig, Redactor};
    use dbtests::postgres::PgOptions;
    use dbtests::{PasswordKind, PgCluster, SecretDir};

    use super::{Args, Plan, PoolMode};

    /// Rows of the probe table each client reads through its prepared statement.
    const PROBE_ROWS: i32 = 100;
    /// Bound on one connect or statement of a client.
    const OP_TIMEOUT: Duration = Duration::from_secs(30);
    /// Bound on one rotation: dbproxy's `--migration-timeout` default (60 s) plus margin.
    const ROTATION_BOUND: Duration = Duration::from_secs(90);
    /// The statement every client prepares once: it reports the session's own
    /// `statement_timeout` (set by the client at connect) and which server ran it.
    const PROBE_SQL: &str = "SELECT current_setting('statement_timeout'), inet_server_port(), v \
         FROM migration_probe WHERE id = $1";

    /// What one client slot reports to the controller, lock-free.
    #[derive(Default)]
    struct Slot {
        /// Epoch of the last target this client reached.
        moved_epoch: AtomicU32,
        /// When it reached it, in ns since `Shared::base`.
        moved_at_ns: AtomicU64,
    }

    /// State shared by the clients and the controller.
    struct Shared {
        base: Instant,
        stop: AtomicBool,
        /// `epoch << 32 | port` of the cluster the Secret points to now.
        target: AtomicU64,
        slots: Vec<Slot>,
        queries: AtomicU64,
        errors: AtomicU64,
        reconnects: AtomicU64,
        state_lost: AtomicU64,
        went_back: AtomicU64,
        /// Every distinct problem message (secrets removed) with how often it happened.
        messages: Mutex<BTreeMap<String, u64>>,
        redactor: Redactor,
    }

    impl Shared {
        fn now_ns(&self) -> u64 {
            self.base.elapsed().as_nanos() as u64
        }

        fn record(&self, counter: &AtomicU64, message: String) {
            counter.fetch_add(1, Ordering::Relaxed);
            let message = self.redactor.redact(&message);
            let mut m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
            *m.entry(message).or_default() += 1;
        }

        /// A query of client `id` ran on `port`: note when it first reached the target.
        fn observe(&self, id: usize, port: u32) {
            let t = self.target.load(Ordering::Acquire);
            let (epoch, target) = ((t >> 32) as u32, (t & 0xffff_ffff) as u32);
            let slot = &self.slots[id];
            let moved = slot.moved_epoch.load(Ordering::Acquire);
            if port == target {
                if moved != epoch {
                    slot.moved_at_ns.store(self.now_ns(), Ordering::Release);
                    slot.moved_epoch.store(epoch, Ordering::Release);
                }
            } else if moved == epoch {
                self.record(
                    &self.went_back,
                    format!(
                        "a query ran on port {port} after the client had reached the new host \
                         (port {target})"
                    ),
                );
            }
        }
    }

    /// One rotation as measured.
    struct Rotation {
        to_port: u16,
        /// Time from the Secret write until every client had a query on the new host.
        all_moved: Option<Duration>,
        /// Mean over the clients that moved.
        mean_client: Option<Duration>,
        moved: usize,
        /// The account's server connections still open on the old host after the hold.
        left_on_old: Option<i64>,
    }

    /// Everything measured for one pool mode.
    struct ModeResult {
        mode: PoolMode,
        clients: usize,
        rotations: Vec<Rotation>,
        queries: u64,
        errors: u64,
        reconnects: u64,
        state_lost: u64,
        went_back: u64,
        messages: BTreeMap<String, u64>,
        cpu_us_per_query: Option<f64>,
        proxy_exit: String,
    }

    pub(super) async fn run(args: &Args, plan: &Plan, redactor: &Redactor) -> anyhow::Result<()> {
        let bin = load::dbproxy_bin()?;
        let help = std::process::Command::new(&bin)
            .arg("--help")
            .output()
            .with_context(|| format!("running {} --help", bin.display()))?;
        let help = String::from_utf8_lossy(&help.stdout);
        if !help.contains("--migrate") {
            bail!(
                "{} has no --migrate flag: this tree's dbproxy does not implement live \
                 migration yet (issue 4), so there is nothing to measure",
                bin.display()
            );
        }
        let clients = args.migration_clients.max(1) as usize;
        let rotations = args
            .migration_rotations
            .unwrap_or(if args.quick { 2 } else { 6 })
            .max(1);
        let password = load::generate_password()?;
        redactor.add(&password);
        println!("starting PostgreSQL clusters A and B...");
        let a = start_cluster(clients, &password, redactor).await?;
        let b = start_cluster(clients, &password, redactor).await?;
        let workdir = tempfile::tempdir()?;
        let mut results = Vec::new();
        for &mode in &plan.pool_modes {
            let r = measure(
                MeasureSetup {
                    mode,
                    clients,
                    rotations,
                    hold: Duration::from_secs(args.migration_hold),
                    pause: Duration::from_millis(args.migration_pause_ms),
                    dbproxy_args: plan.dbproxy_args.clone(),
                },
                &bin,
                [&a, &b],
                &password,
                workdir.path(),
                redactor,
            )
            .await
            .with_context(|| format!("migration run in {} mode", mode.arg()))?;
            results.push(r);
        }
        let conditions = conditions(&a, args, clients, rotations).await;
        let report = render(&conditions, &results);
        println!();
        println!("{report}");
        if let Some(path) = &args.output {
            std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
            println!("(written to {})", path.display());
        }
        Ok(())
    }

    /// A cluster with role `bench` (SCRAM, the same password on both), database `bench`
    /// and the probe table.
    async fn start_cluster(
        clients: usize,
        password: &str,
        redactor: &Redactor,
    ) -> anyhow::Result<PgCluster> {
        let cluster = PgCluster::start_with(PgOptions {
            // Each client may hold a server connection on both hosts for a moment.
            max_connections: (clients as u32 * 2 + 50).max(200),
            extra_conf: vec!["synchronous_commit = off".into()],
            ..PgOptions::default()
        })
        .context("starting PostgreSQL")?;
        redactor.add(cluster.superuser_password());
        cluster
            .create_role("bench", password, PasswordKind::Scram)
            .await?;
        cluster.create_database("bench", "bench").await?;
        let client = cluster.connect("bench", password, "bench").await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE migration_probe (id int PRIMARY KEY, v text NOT NULL); \
                 INSERT INTO migration_probe SELECT i, 'row ' || i FROM generate_series(1, {PROBE_ROWS}) i"
            ))
            .await
            .context("creating the probe table")?;
        Ok(cluster)
    }

    struct MeasureSetup {
        mode: PoolMode,
        clients: usize,
        rotations: u32,
        hold: Duration,
        pause: Duration,
        dbproxy_args: Vec<String>,
    }

    async fn measure(
        setup: MeasureSetup,
        bin: &std::path::Path,
        clusters: [&PgCluster; 2],
        password: &str,
        workdir: &std::path::Path,
        redactor: &Redactor,
    ) -> anyhow::Result<ModeResult> {
        let MeasureSetup {
            mode,
            clients,
            rotations,
            hold,
            pause,
            dbproxy_args,
        } = setup;
        println!(
            "migration, {} mode: {clients} clients, {rotations} rotations",
            mode.arg()
        );
        let secret = SecretDir::new()?;
        let uris = clusters.map(|c| c.uri("bench", password, "bench"));
        let ports = clusters.map(|c| c.port());
        load::write_uri_dsn(&secret, &uris[0])?;
        let mut cfg = DbproxyConfig::loopback(
            bin.to_path_buf(),
            secret.file("uri_dsn.txt"),
            workdir.join(format!("dbproxy-migration-{}.log", mode.arg())),
        )?;
        cfg.pool_size = Some(clients as u32 * 2 + 10);
        cfg.max_clients = Some(clients as u32 * 2 + 100);
        cfg.pool_mode = Some(mode.arg().to_owned());
        super::with_dbproxy_args(&mut cfg, &dbproxy_args);
        let mut proxy = load::start_dbproxy(&cfg, Duration::from_secs(60), redactor)
            .await
            .context("starting dbproxy")?;
        let pid = proxy.pid();

        let shared = Arc::new(Shared {
            base: Instant::now(),
            stop: AtomicBool::new(false),
            target: AtomicU64::new((1u64 << 32) | u64::from(ports[0])),
            slots: (0..clients).map(|_| Slot::default()).collect(),
            queries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            state_lost: AtomicU64::new(0),
            went_back: AtomicU64::new(0),
            messages: Mutex::new(BTreeMap::new()),
            redactor: redactor.clone(),
        });
        let cpu_before = load::proc_cpu_time(pid).ok();
        let mut tasks = tokio::task::JoinSet::new();
        for id in 0..clients {
            tasks.spawn(client_loop(id, cfg.addr(), pause, shared.clone()));
        }
        // Epoch 1 is the start on A: wait until every client ran a query there.
        let started = wait_all_moved(&shared, 1, Duration::from_secs(60)).await;
        if started < clients {
            println!("  only {started} of {clients} clients running after 60 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        let mut measured = Vec::new();
        for r in 0..rotations {
            let epoch = r + 2;
            let to = (r as usize + 1) % 2;
            let from = 1 - to;
            shared.target.store(
                (u64::from(epoch) << 32) | u64::from(ports[to]),
                Ordering::Release,
            );
            let t0 = shared.now_ns();
            load::write_uri_dsn(&secret, &uris[to])?;
            let moved = wait_all_moved(&shared, epoch, ROTATION_BOUND).await;
            let times: Vec<u64> = shared
                .slots
                .iter()
                .filter(|s| s.moved_epoch.load(Ordering::Acquire) == epoch)
                .map(|s| s.moved_at_ns.load(Ordering::Acquire).saturating_sub(t0))
                .collect();
            let all_moved = (moved == clients)
                .then(|| times.iter().copied().max().map(Duration::from_nanos))
                .flatten();
            let mean_client = (!times.is_empty())
                .then(|| Duration::from_nanos(times.iter().sum::<u64>() / times.len() as u64));
            tokio::time::sleep(hold).await;
            let left_on_old = account_connections(clusters[from]).await;
            let fmt = |d: Option<Duration>| {
                d.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "  rotation {} -> port {}: {moved}/{clients} clients moved, all moved after {}, \
                 client mean {}, old host connections after {} s: {}; errors so far {}",
                r + 1,
                ports[to],
                fmt(all_moved),
                fmt(mean_client),
                hold.as_secs(),
                left_on_old
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into()),
                shared.errors.load(Ordering::Relaxed)
            );
            measured.push(Rotation {
                to_port: ports[to],
                all_moved,
                mean_client,
                moved,
                left_on_old,
            });
        }

        shared.stop.store(true, Ordering::Relaxed);
        let joined = tokio::time::timeout(OP_TIMEOUT * 2, async {
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r {
                    shared.record(&shared.errors, format!("client task: {e}"));
                }
            }
        })
        .await;
        if joined.is_err() {
            tasks.abort_all();
            shared.record(&shared.errors, "client did not stop within 60 s".into());
        }
        let queries = shared.queries.load(Ordering::Relaxed);
        let cpu_us_per_query = match (cpu_before, load::proc_cpu_time(pid).ok()) {
            (Some(b), Some(a)) if queries > 0 => {
                Some(a.saturating_sub(b).as_secs_f64() * 1e6 / queries as f64)
            }
            _ => None,
        };
        let proxy_exit = match proxy.exited() {
            Some(st) => format!(
                "dbproxy exited during the run ({st}); last log lines:\n{}",
                proxy.log_tail(30, redactor)
            ),
            None => "running".into(),
        };
        proxy.terminate(Duration::from_secs(10));
        let messages = shared
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(ModeResult {
            mode,
            clients,
            rotations: measured,
            queries,
            errors: shared.errors.load(Ordering::Relaxed),
            reconnects: shared.reconnects.load(Ordering::Relaxed),
            state_lost: shared.state_lost.load(Ordering::Relaxed),
            went_back: shared.went_back.load(Ordering::Relaxed),
            messages,
            cpu_us_per_query,
            proxy_exit,
        })
    }

    /// Polls until every client reached `epoch` or `bound` passes; returns how many did.
    async fn wait_all_moved(shared: &Shared, epoch: u32, bound: Duration) -> usize {
        let deadline = Instant::now() + bound;
        loop {
            let moved = shared
                .slots
                .iter()
                .filter(|s| s.moved_epoch.load(Ordering::Acquire) == epoch)
                .count();
            if moved == shared.slots.len() || Instant::now() >= deadline {
                return moved;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Server connections of the benchmark's account on `cluster` (None if it cannot tell).
    async fn account_connections(cluster: &PgCluster) -> Option<i64> {
        let client = cluster.superuser_client().await.ok()?;
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'bench'",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get(0))
    }

    /// A short description of a client error (the server's message when there is one).
    fn describe(e: &tokio_postgres::Error) -> String {
        match e.as_db_error() {
            Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
            None => e.to_string(),
        }
    }

    /// One client: connect once, `SET statement_timeout` to a value of its own, prepare the
    /// probe statement, then loop (until stopped) over the prepared statement and a simple
    /// `SELECT inet_server_port()`. It reconnects only after its connection broke (counted).
    async fn client_loop(
        id: usize,
        addr: std::net::SocketAddr,
        pause: Duration,
        shared: Arc<Shared>,
    ) {
        let conninfo = format!(
            "host={} port={} user=bench dbname=bench sslmode=disable connect_timeout={} \
             application_name=migration-client-{id}",
            addr.ip(),
            addr.port(),
            OP_TIMEOUT.as_secs()
        );
        let key = (id as i32 % PROBE_ROWS) + 1;
        let mut first = true;
        while !shared.stop.load(Ordering::Relaxed) {
            if !first {
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            first = false;
            let session = tokio::time::timeout(OP_TIMEOUT, async {
                let (client, conn) =
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
                let driver = tokio::spawn(conn);
                client
                    .batch_execute(&format!("SET statement_timeout = '{}ms'", 60_000 + id))
                    .await?;
                let expected: String = client
                    .query_one("SELECT current_setting('statement_timeout')", &[])
                    .await?
                    .get(0);
                let stmt = client.prepare(PROBE_SQL).await?;
                Ok::<_, tokio_postgres::Error>((client, driver, expected, stmt))
            })
            .await;
            let (client, driver, expected, stmt) = match session {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    shared.record(
                        &shared.errors,
                        format!("connect/SET/prepare: {}", describe(&e)),
                    );
                    continue;
                }
                Err(_) => {
                    shared.record(&shared.errors, "connect/SET/prepare: timed out".into());
                    continue;
                }
            };
            while !shared.stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(OP_TIMEOUT, client.query_one(&stmt, &[&key])).await {
                    Ok(Ok(row)) => {
                        shared.queries.fetch_add(1, Ordering::Relaxed);
                        let setting: String = row.get(0);
                        let port: i32 = row.get(1);
                        if setting != expected {
                            shared.record(
                                &shared.state_lost,
                                format!(
                                    "statement_timeout was {setting}, the session SET {expected}"
                                ),
                            );
                        }
                        shared.observe(id, port as u32);
                    }
                    Ok(Err(e)) => {
                        shared.record(
                            &shared.errors,
                            format!("prepared statement: {}", describe(&e)),
                        );
                        if client.is_closed() {
                            break;
                        }
                        continue;
                    }
                    Err(_) => {
                        shared.record(&shared.errors, "prepared statement: timed out".into());
                        break;
                    }
                }
                match tokio::time::timeout(
                    OP_TIMEOUT,
                    client.simple_query("SELECT inet_server_port()"),
                )
                .await
                {
                    Ok(Ok(msgs)) => {
                        shared.queries.fetch_add(1, Ordering::Relaxed);
                        let port = msgs.iter().find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).and_then(|p| p.parse::<u32>().ok())
                            }
                            _ => None,
                        });
                        match port {
                            Some(p) => shared.observe(id, p),
                            None => shared.record(
                                &shared.errors,
                                "SELECT inet_server_port(): no port in the answer".into(),
                            ),
                        }
                    }
                    Ok(Err(e)) => {
                        shared.record(
                            &shared.errors,
                            format!("SELECT inet_server_port(): {}", describe(&e)),
                        );
                        if client.is_closed() {
                            break;
                        }
                    }
                    Err(_) => {
                        shared.record(
                            &shared.errors,
                            "SELECT inet_server_port(): timed out".into(),
                        );
                        break;
                    }
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            drop(client);
            let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
        }
    }

    async fn conditions(
        cluster: &PgCluster,
        args: &Args,
        clients: usize,
        rotations: u32,
    ) -> String {
        let server_version = match cluster.superuser_client().await {
            Ok(c) => c
                .query_one("SHOW server_version", &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_else(|_| "?".into()),
            Err(_) => "?".into(),
        };
        let commit = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(dbtests::binaries::workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        format!(
            "Conditions: {} CPUs, two PostgreSQL {server_version} clusters A and B on loopback \
             (same role, password, database and table), dbproxy {dbproxy} \
             with `--pool-mode <mode>` and the default `--migrate changed \
             --migration-timeout 60`, its Secret written with the kubelet's atomic writer. \
             {clients} clients (tokio-postgres), each connected once: `SET statement_timeout` \
             to a value of its own, prepare `{}` (a named statement), then loop: the prepared \
             statement, then `SELECT inet_server_port()` (simple protocol){pause}. A rotation \
             writes the other cluster's DSN (host port changes), waits until every client ran \
             a query on the new host, keeps them there {hold} s, then counts the account's \
             connections left on the old host. {rotations} rotations (A->B, B->A, ...) per \
             pool mode; a rotation not completed after {bound} s is reported as such.",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            PROBE_SQL,
            pause = if args.migration_pause_ms > 0 {
                format!(", pausing {} ms", args.migration_pause_ms)
            } else {
                ", without pause".into()
            },
            hold = args.migration_hold,
            dbproxy = super::dbproxy_origin(&commit, &args.dbproxy_arg),
            bound = ROTATION_BOUND.as_secs(),
        )
    }

    fn render(conditions: &str, results: &[ModeResult]) -> String {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let mut s = String::new();
        let _ = writeln!(s, "{conditions}");
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| pool mode | rotations | clients | queries | errors | reconnects | SET lost | all clients moved, mean / median / max | one client moved, mean | old-host connections after hold | proxy CPU per query |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in results {
            let all: Vec<Duration> = r.rotations.iter().filter_map(|x| x.all_moved).collect();
            let incomplete = r.rotations.len() - all.len();
            let all_cell = if all.is_empty() {
                "never".to_owned()
            } else {
                let mean = all.iter().sum::<Duration>() / all.len() as u32;
                let max = all.iter().max().copied().unwrap_or_default();
                let median = super::median(all.iter().map(Duration::as_secs_f64).collect())
                    .map(Duration::from_secs_f64)
                    .unwrap_or_default();
                let mut c = format!("{} / {} / {}", ms(mean), ms(median), ms(max));
                if incomplete > 0 {
                    let _ = write!(
                        c,
                        " ({incomplete} rotations: not all moved within {} s)",
                        ROTATION_BOUND.as_secs()
                    );
                }
                c
            };
            let client_means: Vec<Duration> =
                r.rotations.iter().filter_map(|x| x.mean_client).collect();
            let client_cell = if client_means.is_empty() {
                String::new()
            } else {
                ms(client_means.iter().sum::<Duration>() / client_means.len() as u32)
            };
            let left: Vec<String> = r
                .rotations
                .iter()
                .map(|x| {
                    x.left_on_old
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "?".into())
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {all_cell} | {client_cell} | {} | {} |",
                r.mode.arg(),
                r.rotations.len(),
                r.clients,
                r.queries,
                r.errors,
                r.reconnects,
                r.state_lost,
                left.join(", "),
                r.cpu_us_per_query
                    .map(|c| format!("{c:.1} µs"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Times run from the Secret write to the first answer from the new host (per \
             client; \"all clients moved\" is the slowest client of a rotation). The new DSN \
             is validated with a real login before it is used, after a 100 ms debounce of the \
             Secret watcher. Queries counts both statements of each iteration. Proxy CPU per \
             query: dbproxy's user+system CPU over the whole run divided by the queries."
        );
        for r in results {
            let each: Vec<String> = r
                .rotations
                .iter()
                .map(|x| match x.all_moved {
                    Some(d) => ms(d),
                    None => format!("{} of {} moved", x.moved, r.clients),
                })
                .collect();
            let _ = writeln!(
                s,
                "\n{} mode, all clients moved after, per rotation: {}.",
                r.mode.arg(),
                each.join(", ")
            );
        }
        for r in results {
            for x in &r.rotations {
                if x.moved < r.clients {
                    let _ = writeln!(
                        s,
                        "\n{} mode, rotation to port {}: only {} of {} clients reached the new host.",
                        r.mode.arg(),
                        x.to_port,
                        x.moved,
                        r.clients
                    );
                }
            }
            if r.went_back > 0 {
                let _ = writeln!(
                    s,
                    "\n{} mode: {} queries ran on the old host after their client had reached the new one.",
                    r.mode.arg(),
                    r.went_back
                );
            }
            if !r.messages.is_empty() {
                let _ = writeln!(
                    s,
                    "\n{} mode, every distinct error the clients saw:\n",
                    r.mode.arg()
                );
                for (m, n) in &r.messages {
                    let _ = writeln!(s, "- {n} x `{}`", m.replace('`', "'"));
                }
            }
            if r.proxy_exit != "running" {
                let _ = writeln!(s, "\n{} mode: {}", r.mode.arg(), r.proxy_exit);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbouncer_versions_parse_from_their_banner() {
        assert_eq!(parse_pgbouncer_version("PgBouncer 1.18.0"), Some((1, 18)));
        assert_eq!(parse_pgbouncer_version("PgBouncer 1.21.0"), Some((1, 21)));
        assert_eq!(parse_pgbouncer_version("PgBouncer 1.24rc1"), Some((1, 24)));
        assert_eq!(parse_pgbouncer_version("PgBouncer"), None);
        assert!(parse_pgbouncer_version("PgBouncer 1.18.0").unwrap() < PGBOUNCER_PREPARED_SINCE);
        assert!(parse_pgbouncer_version("PgBouncer 1.22.1").unwrap() >= PGBOUNCER_PREPARED_SINCE);
    }

    #[test]
    fn pgbench_failures_shrink_to_their_distinct_server_errors() {
        let text = "pgbench exited exit status: 2 after 10.0 s: pgbench: error: client 2 script 0 \
                    aborted in command 1 query 0: ERROR:  prepared statement \"P_0\" does not exist \
                    | pgbench: error: ERROR:  prepared statement \"P_0\" already exists \
                    | pgbench: error: client 0 script 0 aborted in command 1 query 0: ERROR:  \
                    prepared statement \"P_0\" does not exist | pgbench: error: Run was aborted";
        assert_eq!(
            server_errors(text),
            "ERROR: prepared statement \"P_0\" does not exist; \
             ERROR: prepared statement \"P_0\" already exists"
        );
        assert_eq!(server_errors("no tps"), "no tps");
    }
}
