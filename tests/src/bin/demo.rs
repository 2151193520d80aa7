//! The main job in one command: clients keep working through `dbproxy` while the
//! credentials in its mounted Secret are rotated the way db-controller rotates them.
//!
//! Starts a throwaway PostgreSQL, creates group role `app` with login users `app_a` and
//! `app_b`, writes a kubelet-style Secret directory with `uri_dsn.txt`, starts `dbproxy`
//! on free loopback ports and runs a concurrent client workload through it while
//! rotating: change the password of the user not in use and switch the Secret to it
//! (alternating `app_a`/`app_b`), and now and then change the password of the user in
//! use. Prints queries ok/failed and, per rotation, the time from the Secret write to the
//! first new session served with the new credentials. Exits non-zero if any query failed
//! or a rotation was not observed. Passwords are never printed.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use dbtests::load::{self, DbproxyConfig, Redactor, Workload, WorkloadConfig};
use dbtests::{PasswordKind, PgCluster, SecretDir};

/// Command line of the demo.
#[derive(Parser, Debug)]
#[command(about = "Rotate database credentials under a live client workload through dbproxy")]
struct Args {
    /// Number of credential rotations.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    rotations: u32,
    /// Number of concurrent clients.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=200))]
    clients: u32,
    /// Seconds between the observation of one rotation and the next rotation.
    #[arg(long, default_value_t = 4.0)]
    interval: f64,
    /// Seconds to wait for a rotation to be observed before declaring it missed.
    #[arg(long, default_value_t = 20.0)]
    observe_timeout: f64,
    /// After the summary, keep PostgreSQL and dbproxy running until Ctrl-C (try psql).
    #[arg(long)]
    keep: bool,
}

/// The two kinds of rotation db-controller performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RotationKind {
    /// New password for the user not in use, then the Secret switches to that user.
    SwitchUser,
    /// New password for the user in use (the Secret follows right after).
    SamePassword,
}

/// What one rotation did and when its effect was seen.
struct RotationResult {
    kind: RotationKind,
    from_user: &'static str,
    to_user: &'static str,
    /// Secret write -> first query answered on a session logged in with the new credentials.
    observed_after: Option<Duration>,
}

/// Set once the summary is printed in `--keep` mode, so Ctrl-C then means "done", not "interrupted".
static KEEPING: AtomicU8 = AtomicU8::new(0);
const KEEP_PASSED: u8 = 1;
const KEEP_FAILED: u8 = 2;

const USERS: [&str; 2] = ["app_a", "app_b"];
const DBNAME: &str = "demo";

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let redactor = Redactor::default();
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&args, &redactor) => r,
            _ = tokio::signal::ctrl_c() => match KEEPING.load(Ordering::SeqCst) {
                KEEP_PASSED => Ok(true),
                KEEP_FAILED => Ok(false),
                _ => Err(anyhow::anyhow!("interrupted")),
            },
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {}", redactor.redact(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Runs the whole demo; `Ok(false)` when it ran but a query failed or a rotation was missed.
async fn run(args: &Args, redactor: &Redactor) -> anyhow::Result<bool> {
    let proxy_bin = load::dbproxy_bin()?;
    // Timed from here: building dbproxy is not part of the demo.
    let started = Instant::now();

    println!("starting a throwaway PostgreSQL...");
    let cluster = PgCluster::start().context("starting PostgreSQL")?;
    redactor.add(cluster.superuser_password());
    let mut passwords = [load::generate_password()?, load::generate_password()?];
    for p in &passwords {
        redactor.add(p);
    }
    cluster.create_group_role("app").await?;
    for (user, password) in USERS.iter().zip(&passwords) {
        cluster
            .create_role(user, password, PasswordKind::Scram)
            .await?;
        cluster.grant_role(user, "app").await?;
    }
    cluster.create_database(DBNAME, "app").await?;
    let admin = cluster
        .connect(cluster.superuser(), cluster.superuser_password(), DBNAME)
        .await?;
    admin
        .batch_execute(&format!(
            "{}; ALTER TABLE load_events OWNER TO app",
            load::WORKLOAD_TABLE_DDL
        ))
        .await
        .context("creating the demo table")?;
    drop(admin);

    let secret = SecretDir::new().context("creating the Secret directory")?;
    let mut active = 0usize;
    load::write_uri_dsn(
        &secret,
        &cluster.uri(USERS[active], &passwords[active], DBNAME),
    )?;

    let log_dir = tempfile::tempdir()?;
    let mut proxy_cfg = DbproxyConfig::loopback(
        proxy_bin,
        secret.file("uri_dsn.txt"),
        log_dir.path().join("dbproxy.log"),
    )?;
    proxy_cfg.pool_size = Some(args.clients * 2);
    proxy_cfg.max_clients = Some(args.clients * 4);
    let mut proxy = load::start_dbproxy(&proxy_cfg, Duration::from_secs(30), redactor)
        .await
        .context("starting dbproxy")?;
    println!(
        "dbproxy listening on {} (ops http://{}); PostgreSQL on {}:{}",
        proxy_cfg.addr(),
        proxy_cfg.ops,
        cluster.host(),
        cluster.port()
    );

    let workload = Workload::start(
        WorkloadConfig {
            addr: proxy_cfg.addr(),
            user: "whoever".into(),
            dbname: "anything".into(),
            clients: args.clients as usize,
            max_queries_per_client: 1_000_000,
            session_queries: (3, 30),
            pause: Duration::from_millis(2),
            op_timeout: Duration::from_secs(15),
        },
        redactor.clone(),
    );
    println!(
        "{} clients running; {} rotations follow",
        args.clients, args.rotations
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    if workload
        .find_observation(0, |o| o.user == USERS[active])
        .is_none()
    {
        println!("warning: no session served as {} yet", USERS[active]);
    }

    let observe_timeout = Duration::from_secs_f64(args.observe_timeout.max(1.0));
    let interval = Duration::from_secs_f64(args.interval.max(0.0));
    let mut results = Vec::new();
    for i in 0..args.rotations {
        let kind = if i % 3 == 2 {
            RotationKind::SamePassword
        } else {
            RotationKind::SwitchUser
        };
        let from = active;
        let to = match kind {
            RotationKind::SwitchUser => 1 - active,
            RotationKind::SamePassword => active,
        };
        let new_password = load::generate_password()?;
        redactor.add(&new_password);
        cluster
            .alter_password(USERS[to], &new_password, PasswordKind::Scram)
            .await?;
        passwords[to] = new_password;
        let uri = cluster.uri(USERS[to], &passwords[to], DBNAME);
        let mark = workload.observation_count();
        let wall = SystemTime::now();
        let written = Instant::now();
        load::write_uri_dsn(&secret, &uri)?;
        active = to;

        // Seen when a session that logged in as the new user, on a backend that started
        // after the write, answers: before the write nobody could know the new password.
        let deadline = written + observe_timeout;
        let mut observed_after = None;
        while Instant::now() < deadline {
            if let Some(o) = workload.find_observation(mark, |o| {
                o.user == USERS[to] && o.backend_start >= wall && o.at >= written
            }) {
                observed_after = Some(o.at.duration_since(written));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let result = RotationResult {
            kind,
            from_user: USERS[from],
            to_user: USERS[to],
            observed_after,
        };
        print_rotation(
            i + 1,
            &result,
            workload.queries_ok(),
            workload.queries_failed(),
        );
        results.push(result);
        tokio::time::sleep(interval).await;
    }

    let report = workload.stop().await;
    let proxy_alive = proxy.exited().is_none();
    let elapsed = started.elapsed();

    println!();
    println!("## dbproxy demo summary");
    println!();
    println!(
        "clients: {}, sessions opened: {}, run time: {:.1} s",
        args.clients,
        report.sessions,
        elapsed.as_secs_f64()
    );
    println!("queries ok:     {}", report.queries_ok);
    println!("queries failed: {}", report.queries_failed);
    let observed = results
        .iter()
        .filter(|r| r.observed_after.is_some())
        .count();
    println!("rotations:      {} ({} observed)", results.len(), observed);
    println!();
    println!("| # | rotation | user | Secret write -> first query with new credentials |");
    println!("| --- | --- | --- | --- |");
    for (i, r) in results.iter().enumerate() {
        println!(
            "| {} | {} | {} -> {} | {} |",
            i + 1,
            kind_label(r.kind),
            r.from_user,
            r.to_user,
            r.observed_after
                .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "NOT OBSERVED".into())
        );
    }
    let times: Vec<f64> = results
        .iter()
        .filter_map(|r| r.observed_after.map(|d| d.as_secs_f64() * 1000.0))
        .collect();
    if !times.is_empty() {
        let max = times.iter().cloned().fold(0.0, f64::max);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!();
        println!("new credentials in use after: mean {mean:.0} ms, max {max:.0} ms");
    }
    if !report.first_errors.is_empty() {
        println!();
        println!("first errors:");
        for e in &report.first_errors {
            println!("  {e}");
        }
    }
    if !proxy_alive {
        println!(
            "dbproxy exited during the run; last log lines:\n{}",
            proxy.log_tail(30, redactor)
        );
    }
    // The proxy promises never to log a secret; every password of this run is known here.
    let log = std::fs::read_to_string(proxy.log_path()).unwrap_or_default();
    let log_clean = !redactor.leaks(&log);
    if !log_clean {
        println!(
            "a password appeared in the dbproxy log ({})",
            proxy.log_path().display()
        );
    }
    let ok = report.queries_failed == 0 && observed == results.len() && proxy_alive && log_clean;
    println!();
    println!(
        "{}",
        if ok {
            "PASS: zero failed queries, every rotation picked up, no password in the proxy log"
        } else {
            "FAIL: see above"
        }
    );

    if args.keep {
        println!();
        println!(
            "--keep: dbproxy still serving on {}; try: psql -h {} -p {} -U anyone -c 'select session_user' demo",
            proxy_cfg.addr(),
            proxy_cfg.addr().ip(),
            proxy_cfg.addr().port()
        );
        println!("dbproxy log: {}", proxy.log_path().display());
        println!("press Ctrl-C to stop and clean up");
        // main's Ctrl-C branch ends this future; dropping it stops dbproxy and PostgreSQL.
        KEEPING.store(if ok { KEEP_PASSED } else { KEEP_FAILED }, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }
    proxy.terminate(Duration::from_secs(10));
    drop(cluster);
    Ok(ok)
}

fn kind_label(kind: RotationKind) -> &'static str {
    match kind {
        RotationKind::SwitchUser => "switch user (new password)",
        RotationKind::SamePassword => "password change, same user",
    }
}

fn print_rotation(n: u32, r: &RotationResult, ok: u64, failed: u64) {
    let seen = r
        .observed_after
        .map(|d| {
            format!(
                "new credentials served after {:.0} ms",
                d.as_secs_f64() * 1000.0
            )
        })
        .unwrap_or_else(|| "NOT observed".into());
    println!(
        "rotation {n}: {} {} -> {}: {seen} (queries ok {ok}, failed {failed})",
        kind_label(r.kind),
        r.from_user,
        r.to_user
    );
}
