//! Runs one config: at start and after every (debounced) change, with retries and backoff.
//!
//! A run reads every source fresh, renders every command, then hands them to the destination
//! (for postgres, in one transaction unless the config says otherwise). A failed run is
//! retried with capped exponential backoff and jitter, even if no file changes
//! (consul-template#1015); a change during the wait runs sooner. Each config has its own task,
//! so one failing config never stops another.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dbcred::WatchConfig;

use crate::config::{Config, RetryPolicy};
use crate::destination::{self, RenderedCommand};
use crate::error::{Error, Result};
use crate::source::{self, SourceValues};
use crate::status::Status;
use crate::template::{self, CompiledCommand, Redactor, RenderContext};
use crate::watch::{ConfigWatch, Signal};

/// Longest a burst of changes can postpone a run, in multiples of the debounce.
const MAX_DEBOUNCE_FACTOR: u32 = 10;

/// One config, ready to run: its settings and its parsed templates.
pub struct Runner {
    config: Arc<Config>,
    commands: Arc<Vec<CompiledCommand>>,
}

/// What a successful run read: the fingerprint of every file, to ignore repeated events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRecord {
    pub fingerprints: BTreeMap<PathBuf, u64>,
}

/// Why a run started (for the logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    Change,
    Retry,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Change => "change",
            Trigger::Retry => "retry",
        }
    }
}

impl Runner {
    /// Compiles the config's templates; a template that does not parse names config and field.
    pub fn new(config: Config) -> Result<Runner> {
        let commands =
            template::compile_commands(&config.commands).map_err(|(field, reason)| {
                Error::ConfigField {
                    config: config.name.clone(),
                    field,
                    reason,
                }
            })?;
        Ok(Runner {
            config: Arc::new(config),
            commands: Arc::new(commands),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Reads every source (and the hotload DSN file) now.
    fn read_sources(&self) -> Result<(BTreeMap<String, SourceValues>, Option<String>, RunRecord)> {
        let mut values = BTreeMap::new();
        let mut record = RunRecord::default();
        for s in &self.config.sources {
            let read = source::read(s)?;
            record.fingerprints.insert(s.path.clone(), read.fingerprint);
            values.insert(s.key.clone(), read.values);
        }
        let dsn_text = match self.config.destination.dsn_file() {
            Some(path) => {
                let text = source::read_text(path).map_err(|e| Error::Destination {
                    config: self.config.name.clone(),
                    reason: e.to_string(),
                })?;
                record
                    .fingerprints
                    .insert(path.to_owned(), source::fingerprint(&text));
                Some(text)
            }
            None => None,
        };
        Ok((values, dsn_text, record))
    }

    /// Renders every command with the given context.
    fn render(&self, ctx: &RenderContext) -> Result<Vec<RenderedCommand>> {
        let name = &self.config.name;
        let mut out = Vec::with_capacity(self.commands.len());
        for (index, c) in self.commands.iter().enumerate() {
            let render_err = |label: &str, reason: String| Error::Render {
                config: name.clone(),
                template: label.to_owned(),
                reason,
            };
            let command = c
                .command
                .render(ctx)
                .map_err(|r| render_err(&c.command.label, r))?;
            let args = if c.args.is_empty() {
                None
            } else {
                let mut args = Vec::with_capacity(c.args.len());
                for (j, a) in c.args.iter().enumerate() {
                    let text = a.render(ctx).map_err(|r| render_err(&a.label, r))?;
                    args.push(template::cast(&text).map_err(|reason| Error::Cast {
                        config: name.clone(),
                        command: index,
                        arg: j,
                        reason,
                    })?);
                }
                Some(args)
            };
            out.push(RenderedCommand {
                index,
                command,
                args,
            });
        }
        Ok(out)
    }

    /// One run: read, render, execute. Returns what it read, for change detection.
    pub async fn run_once(&self) -> Result<RunRecord> {
        let (values, dsn_text, record) = self.read_sources()?;
        let ctx = RenderContext::new(&values);
        let mut redactor = ctx.redactor.clone();
        let commands = self.render(&ctx)?;
        destination::execute(&self.config, dsn_text.as_deref(), &commands, &mut redactor)
            .await
            .map_err(|e| scrub_error(e, &redactor))?;
        Ok(record)
    }

    /// The commands as `dsnexec render` prints them: every source value replaced by a marker.
    pub fn render_redacted(&self) -> Result<Vec<(String, Option<Vec<String>>)>> {
        let (values, _, _) = self.read_sources()?;
        let ctx = RenderContext::redacted(&values);
        let name = &self.config.name;
        let mut out = Vec::new();
        for c in self.commands.iter() {
            let err = |label: &str, reason: String| Error::Render {
                config: name.clone(),
                template: label.to_owned(),
                reason,
            };
            let command = c
                .command
                .render(&ctx)
                .map_err(|r| err(&c.command.label, r))?;
            let args = if c.args.is_empty() {
                None
            } else {
                let mut v = Vec::new();
                for a in &c.args {
                    v.push(a.render(&ctx).map_err(|r| err(&a.label, r))?);
                }
                Some(v)
            };
            out.push((command, args));
        }
        Ok(out)
    }

    /// Runs the config at start, on changes, and retries failures, until `stop` turns true (or
    /// its sender is dropped). A run in progress is finished first (it is bounded by the
    /// config's timeouts), so a replacement runner never overlaps with this one.
    pub async fn run_forever(self, status: Status, mut stop: tokio::sync::watch::Receiver<bool>) {
        let name = self.config.name.clone();
        if *stop.borrow_and_update() {
            return;
        }
        status.register(&name);
        // Present from the start, so a dashboard sees 0 rather than no series.
        metrics::counter!("dsnexec_runs_total", "config" => name.clone()).increment(0);
        metrics::counter!("dsnexec_run_failures_total", "config" => name.clone()).increment(0);
        let mut watch = match ConfigWatch::spawn(&self.config, WatchConfig::default()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(config = %name, error = %e, "cannot watch the config's files; only retries will re-run it");
                None
            }
        };
        let mut last_ok: Option<RunRecord> = None;
        let mut failures: u32 = 0;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut pending = Some(Trigger::Start);
        loop {
            if let Some(trigger) = pending.take() {
                self.debounce(&mut watch, &name).await;
                if stopped(&stop) {
                    return;
                }
                let started = Instant::now();
                tracing::info!(config = %name, trigger = trigger.as_str(), "run started");
                let outcome = self.run_once().await;
                let elapsed = started.elapsed();
                metrics::counter!("dsnexec_runs_total", "config" => name.clone()).increment(1);
                metrics::histogram!("dsnexec_run_duration_seconds", "config" => name.clone())
                    .record(elapsed.as_secs_f64());
                match outcome {
                    Ok(record) => {
                        failures = 0;
                        retry_at = None;
                        last_ok = Some(record);
                        status.record_success(&name);
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64();
                        metrics::gauge!("dsnexec_last_success_timestamp_seconds", "config" => name.clone()).set(now);
                        metrics::gauge!("dsnexec_consecutive_failures", "config" => name.clone())
                            .set(0.0);
                        tracing::info!(
                            config = %name,
                            commands = self.commands.len(),
                            millis = elapsed.as_millis() as u64,
                            "run succeeded"
                        );
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let delay = backoff(self.config.retry, failures);
                        retry_at = Some(tokio::time::Instant::now() + delay);
                        let message = e.to_string();
                        status.record_failure(&name, &message);
                        metrics::counter!("dsnexec_run_failures_total", "config" => name.clone())
                            .increment(1);
                        metrics::gauge!("dsnexec_consecutive_failures", "config" => name.clone())
                            .set(f64::from(failures));
                        tracing::warn!(
                            config = %name,
                            error = %message,
                            attempt = failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "run failed; will retry"
                        );
                    }
                }
            }

            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = next_signal(&mut watch) => match signal {
                    Some(Signal::Changed { path, fingerprint }) => {
                        let known = last_ok.as_ref().and_then(|r| r.fingerprints.get(&path));
                        if known != Some(&fingerprint) {
                            tracing::info!(config = %name, file = %path.display(), "file changed");
                            pending = Some(Trigger::Change);
                        }
                    }
                    Some(Signal::Rejected { path, reason }) => {
                        report_rejected(&name, &path, &reason);
                    }
                    None => {
                        tracing::warn!(config = %name, "file watchers stopped; only retries will re-run the config");
                        watch = None;
                    }
                },
                _ = retry => pending = Some(Trigger::Retry),
                _ = stop.changed() => {
                    if stopped(&stop) {
                        tracing::debug!(config = %name, "runner stopped");
                        return;
                    }
                }
            }
        }
    }

    /// Waits until no file event arrived for the debounce period (bounded), so a burst of
    /// changes across all files of the config becomes one run.
    async fn debounce(&self, watch: &mut Option<ConfigWatch>, name: &str) {
        let quiet = self.config.debounce;
        if quiet.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + quiet * MAX_DEBOUNCE_FACTOR;
        loop {
            let until = (tokio::time::Instant::now() + quiet).min(deadline);
            tokio::select! {
                signal = next_signal(watch) => match signal {
                    Some(Signal::Rejected { path, reason }) => {
                        tracing::warn!(config = %name, file = %path.display(), reason = %reason, "file rejected");
                    }
                    Some(Signal::Changed { .. }) => {}
                    None => *watch = None,
                },
                _ = tokio::time::sleep_until(until) => return,
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// True once the stop flag is set or its sender is gone.
fn stopped(stop: &tokio::sync::watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

fn report_rejected(name: &str, path: &std::path::Path, reason: &str) {
    metrics::counter!("dsnexec_source_rejected_total", "config" => name.to_owned()).increment(1);
    tracing::warn!(
        config = %name,
        file = %path.display(),
        reason = %reason,
        "file rejected; keeping the last applied values"
    );
}

async fn next_signal(watch: &mut Option<ConfigWatch>) -> Option<Signal> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Delay before attempt `failures + 1`: `initial * 2^(failures-1)`, capped, with ±20 % jitter.
pub fn backoff(policy: RetryPolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = policy.initial.saturating_mul(1u32 << exp).min(policy.max);
    let jitter: f64 = rand::random_range(0.8..1.2);
    base.mul_f64(jitter).min(policy.max)
}

/// Last line of defence: scrub every source value from an error's message.
fn scrub_error(e: Error, redactor: &Redactor) -> Error {
    match e {
        Error::Command {
            config,
            command,
            reason,
        } => Error::Command {
            config,
            command,
            reason: redactor.scrub(&reason),
        },
        Error::Destination { config, reason } => Error::Destination {
            config,
            reason: redactor.scrub(&reason),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let d1 = backoff(p, 1);
        assert!(
            d1 >= Duration::from_millis(800) && d1 <= Duration::from_millis(1200),
            "{d1:?}"
        );
        let d3 = backoff(p, 3);
        assert!(
            d3 >= Duration::from_millis(3200) && d3 <= Duration::from_millis(4800),
            "{d3:?}"
        );
        for n in [7, 20, 1000] {
            let d = backoff(p, n);
            assert!(
                d <= Duration::from_secs(60) && d >= Duration::from_secs(48),
                "{n}: {d:?}"
            );
        }
    }
}
