//! The `dsnexec` binary: `run` (watch and execute) and `render` (print commands, values redacted).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use dbcred::{FileWatcher, WatchConfig, WatchEvent};
use dsnexec::config;
use dsnexec::runner::Runner;
use dsnexec::status::Status;
use dsnexec::supervisor::{Supervisor, load_checked};

#[derive(Parser)]
#[command(
    name = "dsnexec",
    version,
    about = "Runs templated SQL, programs or file writes whenever mounted secrets change"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DSNEXEC_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every enabled config at start and whenever one of its files changes.
    Run(RunArgs),
    /// Print the rendered commands of every enabled config with every source value redacted.
    Render(Selection),
}

/// Which config file and which of its configs (db-controller's flags).
#[derive(Args)]
struct Selection {
    /// Path to the config file.
    #[arg(short = 'c', long = "config-file", default_value = "config.yaml")]
    config_file: PathBuf,
    /// Enable a config by name (repeatable, or comma-separated).
    #[arg(short = 'e', long = "enable", value_delimiter = ',')]
    enable: Vec<String>,
    /// Disable a config by name (repeatable, or comma-separated); wins over --enable.
    #[arg(short = 'd', long = "disable", value_delimiter = ',')]
    disable: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    selection: Selection,
    /// Run every enabled config once and exit: 0 only if all succeeded.
    #[arg(long)]
    once: bool,
    /// Address of the ops port (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9433", env = "DSNEXEC_OPS_ADDR")]
    ops_addr: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dsnexec: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Render(sel) => render(sel),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "dsnexec failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Loads the config and compiles every enabled config's templates.
fn load(sel: &Selection) -> anyhow::Result<Vec<Runner>> {
    let set = config::load(&sel.config_file, &sel.enable, &sel.disable)?;
    let mut runners = Vec::new();
    for c in set.enabled() {
        runners.push(Runner::new(c.clone())?);
    }
    if runners.is_empty() {
        tracing::warn!(file = %sel.config_file.display(), "no enabled config: nothing to run");
    }
    Ok(runners)
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let runners = load(&args.selection)?;
    if args.once {
        return Ok(run_once(runners).await);
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let status = Status::default();
    for r in &runners {
        status.register(&r.config().name);
    }
    let (addr, _ops) = dsnexec::ops::serve(args.ops_addr, status.clone(), Some(metrics)).await?;
    tracing::info!(ops = %addr, configs = runners.len(), "dsnexec started");
    let mut supervisor = Supervisor::new(status.clone());
    supervisor.apply(runners);

    // The config file is a mounted Secret too: follow it, apply a valid new version, keep the
    // running one when the new version is invalid.
    let sel = &args.selection;
    let (enable, disable) = (sel.enable.clone(), sel.disable.clone());
    let mut config_watch = match FileWatcher::spawn(
        sel.config_file.clone(),
        WatchConfig::default(),
        move |p: &Path| load_checked(p, &enable, &disable),
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(file = %sel.config_file.display(), error = %e, "cannot watch the config file; changes to it need a restart");
            None
        }
    };
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let event = async {
            match config_watch.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            event = event => match event {
                Some(WatchEvent::Changed(configs)) => {
                    apply_config_file(&mut supervisor, &sel.config_file, configs);
                }
                Some(WatchEvent::Rejected(reason)) => {
                    metrics::counter!("dsnexec_config_reloads_total", "outcome" => "rejected").increment(1);
                    tracing::error!(
                        file = %sel.config_file.display(),
                        reason = %reason,
                        running = %supervisor.names().join(","),
                        "config file rejected; the configs in force keep running"
                    );
                }
                None => {
                    tracing::warn!(file = %sel.config_file.display(), "config file watcher stopped; changes to it need a restart");
                    config_watch = None;
                }
            },
        }
    }
    tracing::info!("shutting down");
    supervisor.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Applies a validated new version of the config file (a no-op when nothing that runs changed,
/// as for the watcher's first read).
fn apply_config_file(supervisor: &mut Supervisor, file: &Path, configs: Vec<config::Config>) {
    let mut runners = Vec::with_capacity(configs.len());
    for c in configs {
        match Runner::new(c) {
            Ok(r) => runners.push(r),
            Err(e) => {
                // load_checked compiled them already; keep everything as it is if not.
                metrics::counter!("dsnexec_config_reloads_total", "outcome" => "rejected")
                    .increment(1);
                tracing::error!(file = %file.display(), error = %e, "config file rejected; the configs in force keep running");
                return;
            }
        }
    }
    let applied = supervisor.apply(runners);
    if applied.is_noop() {
        return;
    }
    metrics::counter!("dsnexec_config_reloads_total", "outcome" => "applied").increment(1);
    tracing::info!(
        file = %file.display(),
        started = %applied.started.join(","),
        restarted = %applied.restarted.join(","),
        stopped = %applied.stopped.join(","),
        unchanged = %applied.unchanged.join(","),
        "config file changed; applied"
    );
}

/// `--once`: each enabled config one attempt, all concurrently.
async fn run_once(runners: Vec<Runner>) -> ExitCode {
    let mut tasks = tokio::task::JoinSet::new();
    for r in runners {
        tasks.spawn(async move {
            let name = r.config().name.clone();
            (name, r.run_once().await)
        });
    }
    let mut failed = 0usize;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(_))) => tracing::info!(config = %name, "run succeeded"),
            Ok((name, Err(e))) => {
                failed += 1;
                tracing::error!(config = %name, error = %e, "run failed");
            }
            Err(e) => {
                failed += 1;
                tracing::error!(error = %e, "a run task failed");
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn render(sel: Selection) -> anyhow::Result<ExitCode> {
    let runners = load(&sel)?;
    let mut failed = false;
    for r in &runners {
        let c = r.config();
        println!(
            "# config {:?}: destination {}{}",
            c.name,
            c.destination.kind(),
            if c.transaction {
                " (one transaction)"
            } else {
                ""
            }
        );
        match r.render_redacted() {
            Ok(commands) => {
                for (i, (command, args)) in commands.iter().enumerate() {
                    println!("-- commands[{i}]");
                    println!("{command}");
                    if let Some(args) = args {
                        for (j, a) in args.iter().enumerate() {
                            println!("-- commands[{i}].args[{j}]: {a}");
                        }
                    }
                }
            }
            Err(e) => {
                failed = true;
                println!("-- error: {e}");
            }
        }
        println!();
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
