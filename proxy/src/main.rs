//! dbproxy binary: parse the command line, set up logging and metrics, run the proxy (or
//! `dbproxy wait` for a running one to become ready).

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use dbproxy::config::{Cli, Command, LogFormat, WaitArgs};
use dbproxy::stats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;

/// Used when RUST_LOG is unset: info, but not notify's warning at every kubelet Secret
/// update ("Unable to remove the path from the watches").
const DEFAULT_LOG_FILTER: &str = "info,notify=error";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Wait(args)) = &cli.command {
        return wait(args);
    }
    let args = cli.into_run_args();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::stderr().is_terminal())
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    let runtime = if args.worker_threads == 0 {
        // One thread: the reactor never runs beside a task, so read polls that cannot find
        // anything may be skipped (see dbproxy::ready).
        dbproxy::ready::allow_skips();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), stats::BUCKETS)
        .and_then(|b| b.install_recorder());
    let metrics = match metrics {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics disabled");
            None
        }
    };
    match runtime.block_on(dbproxy::service::run(args, metrics)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("dbproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `dbproxy wait`: polls /readyz until 200 (exit 0) or the timeout (exit 1). Plain blocking
/// HTTP/1.0: no runtime needed for one request every 200 ms.
fn wait(args: &WaitArgs) -> ExitCode {
    let mut addr = args.ops_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let last = match readyz(addr) {
            Ok((200, _)) => {
                eprintln!("dbproxy wait: {addr} is ready");
                return ExitCode::SUCCESS;
            }
            Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            eprintln!(
                "dbproxy wait: not ready after {} s at http://{addr}/readyz (last: {last})",
                args.timeout
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn readyz(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The webhook's postStart hook runs exactly `["dbproxy", "wait"]`: the defaults must
    /// point at the proxy's own ops port.
    #[test]
    fn bare_wait_targets_the_local_ops_port() {
        let cli = Cli::try_parse_from(["dbproxy", "wait"]).unwrap();
        let Some(Command::Wait(args)) = cli.command else {
            panic!("`dbproxy wait` did not parse as the wait subcommand");
        };
        assert_eq!(args.ops_addr, "127.0.0.1:9432".parse().unwrap());
        assert_eq!(args.timeout, 300);
    }
}
