//! dbwebhook: `serve` runs the admission server, `inject` rewrites manifests offline.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use dbwebhook::admission::{self, AppState};
use dbwebhook::claims::{ClaimResolver, ResolverConfig};
use dbwebhook::config::InjectArgs;
use dbwebhook::inject;
use dbwebhook::tls::CertStore;

#[derive(Parser)]
#[command(
    name = "dbwebhook",
    version,
    about = "Injects dbproxy and dsnexec sidecars into labelled pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTPS admission server.
    Serve(ServeArgs),
    /// Add the sidecars to YAML manifests offline and print the result.
    Inject(InjectCmd),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "DBWEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    addr: SocketAddr,
    #[arg(
        long,
        env = "DBWEBHOOK_TLS_CERT_FILE",
        default_value = "/etc/dbwebhook/tls/tls.crt"
    )]
    tls_cert_file: PathBuf,
    #[arg(
        long,
        env = "DBWEBHOOK_TLS_KEY_FILE",
        default_value = "/etc/dbwebhook/tls/tls.key"
    )]
    tls_key_file: PathBuf,
    /// Re-read the certificate this often even without a file event.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    cert_poll_seconds: u64,
    /// Reuse a resolved claim for this long.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    claim_cache_seconds: u64,
    /// Reuse "claim not found" for this long.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    claim_negative_cache_seconds: u64,
    /// Give up on the Kubernetes API after this long (keep well below the webhook timeout).
    #[arg(long, default_value = "2000", value_name = "MILLISECONDS")]
    claim_lookup_timeout_ms: u64,
    /// `text` or `json`.
    #[arg(long, env = "DBWEBHOOK_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(flatten)]
    inject: InjectArgs,
}

#[derive(clap::Args)]
struct InjectCmd {
    /// The manifest file, `-` for stdin.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Resolve a claim to its Secret: CLAIM=SECRET (repeatable).
    #[arg(long = "claim-secret", value_name = "CLAIM=SECRET")]
    claim_secret: Vec<String>,
    #[command(flatten)]
    inject: InjectArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(&args.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(serve(args))
        }
        Command::Inject(args) => run_inject(args),
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.inject.to_config()?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let resolver = ClaimResolver::new(
        client,
        ResolverConfig {
            positive_ttl: Duration::from_secs(args.claim_cache_seconds),
            negative_ttl: Duration::from_secs(args.claim_negative_cache_seconds),
            timeout: Duration::from_millis(args.claim_lookup_timeout_ms),
        },
    );
    let certs = CertStore::new(&args.tls_cert_file, &args.tls_key_file);
    let _watcher = certs
        .clone()
        .spawn_watcher(Duration::from_secs(args.cert_poll_seconds.max(1)));
    let state = AppState {
        config: Arc::new(config),
        resolver: Arc::new(resolver),
        certs,
        metrics: dbwebhook::metrics::install(),
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    tracing::info!(addr = %args.addr, class = %state.config.class, mode = %state.config.sidecar_mode, "dbwebhook serving");
    admission::serve(listener, state, shutdown_signal()).await?;
    tracing::info!("dbwebhook stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn run_inject(args: InjectCmd) -> anyhow::Result<()> {
    let config = args.inject.to_config()?;
    let mut claims = HashMap::new();
    for arg in &args.claim_secret {
        let (claim, secret) = inject::parse_claim_secret(arg)?;
        claims.insert(claim, secret);
    }
    let input = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let (output, report) = inject::inject_manifests(&input, &config, &claims)?;
    std::io::stdout()
        .write_all(output.as_bytes())
        .context("writing stdout")?;
    eprintln!(
        "dbwebhook inject: {} of {} documents changed{}{}",
        report.injected.len(),
        report.documents,
        if report.injected.is_empty() { "" } else { ": " },
        report.injected.join(", ")
    );
    Ok(())
}
