//! Test helpers: run the real `dsnexec` binary, read its logs, poll its ops port.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Generous limit for anything asynchronous on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dsnexec")
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let p = dir.join("config.yaml");
    std::fs::write(&p, yaml).expect("writing the config file");
    p
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
pub fn yq(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// `dsnexec run --once` (or any other args) to completion: exit status and stdout+stderr.
pub fn run_to_end(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("running dsnexec");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `dsnexec run`, killed on drop; stdout and stderr go to one file.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(config: &Path, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("dsnexec.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut args = vec![
            "run".to_owned(),
            "-c".to_owned(),
            config.display().to_string(),
            "--ops-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(bin())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting dsnexec");
        Daemon {
            child,
            log,
            _dir: dir,
        }
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The ops address, from the start-up log line.
    pub async fn ops_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            if let Some(addr) = log
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ops="))
                .and_then(|a| strip_ansi(a).parse().ok())
            {
                return addr;
            }
            assert!(self.alive(), "dsnexec exited early:\n{log}");
            assert!(
                Instant::now() < deadline,
                "no ops address in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the log contains `needle` `count` times.
    pub async fn wait_for_log(&mut self, needle: &str, count: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return;
            }
            assert!(self.alive(), "dsnexec exited:\n{log}");
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not appear {count} time(s):\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the process (SIGTERM) and returns its log.
    pub fn stop(mut self) -> String {
        unsafe_free_sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut in_escape = false;
    for c in s.chars() {
        if in_escape {
            if c.is_ascii_alphabetic() {
                in_escape = false;
            }
        } else if c == '\u{1b}' {
            in_escape = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// A plain HTTP/1.0 GET: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(_) => return (0, String::new()),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Polls `check` until it returns `Some`, or panics with `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of a Prometheus sample `name{config="cfg"}` in a /metrics body.
pub fn metric(body: &str, name: &str, config: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.contains(&format!("config=\"{config}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Asserts that none of `secrets` (nor their SQL-escaped forms) appears in `text`.
pub fn assert_no_secret(text: &str, secrets: &[&str]) {
    for s in secrets {
        for form in [
            s.to_string(),
            s.replace('\'', "''"),
            postgres_protocol_escape(s),
        ] {
            assert!(
                !text.contains(&form),
                "a secret appeared in the output:\n{text}"
            );
        }
    }
}

fn postgres_protocol_escape(s: &str) -> String {
    // The body of an SQL literal: quotes doubled, as it would appear quoted in a message.
    s.replace('\'', "''").replace('\\', "\\\\")
}
