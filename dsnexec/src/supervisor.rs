//! Keeps one runner task per enabled config and applies a changed config file to them.
//!
//! The config file is usually a mounted Secret too, so it rotates like the sources. A new
//! version is validated completely before anything changes ([`load_checked`]); then only the
//! configs whose content changed are restarted, new ones are started and removed (or newly
//! disabled) ones stopped. A config that did not change keeps its runner, without a re-run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, Config};
use crate::error::Result;
use crate::runner::Runner;
use crate::status::Status;

/// How long [`Supervisor::shutdown`] lets runs in progress finish before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Reads the config file, validates it, applies `--enable`/`--disable` and compiles every
/// enabled config's templates: what a new version of the file must pass before it is applied.
/// Returns the enabled configs in name order. Quiet (no warnings), for repeated re-reads.
pub fn load_checked(path: &Path, enable: &[String], disable: &[String]) -> Result<Vec<Config>> {
    let set = config::reload(path, enable, disable)?;
    let enabled: Vec<Config> = set.enabled().cloned().collect();
    for c in &enabled {
        Runner::new(c.clone())?;
    }
    Ok(enabled)
}

/// One running config.
struct Running {
    config: Config,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What [`Supervisor::apply`] did, by config name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
    pub unchanged: Vec<String>,
}

impl Applied {
    /// True when the new file changed nothing that runs.
    pub fn is_noop(&self) -> bool {
        self.started.is_empty() && self.restarted.is_empty() && self.stopped.is_empty()
    }
}

/// The runner tasks of the enabled configs.
pub struct Supervisor {
    status: Status,
    running: BTreeMap<String, Running>,
}

impl Supervisor {
    pub fn new(status: Status) -> Supervisor {
        Supervisor {
            status,
            running: BTreeMap::new(),
        }
    }

    /// Names of the configs that run now.
    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Makes the running configs match `runners`: starts new ones, restarts changed ones (the
    /// old runner finishes its run in progress first), stops the ones not listed and leaves
    /// equal ones alone. Must be called inside a tokio runtime.
    pub fn apply(&mut self, runners: Vec<Runner>) -> Applied {
        let mut applied = Applied::default();
        let mut wanted = BTreeMap::new();
        for r in runners {
            wanted.insert(r.config().name.clone(), r);
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = self.running.remove(&name) {
                let _ = old.stop.send(true);
                self.status.unregister(&name);
                applied.stopped.push(name);
            }
        }
        for (name, runner) in wanted {
            let previous = match self.running.remove(&name) {
                Some(old) if old.config == *runner.config() => {
                    self.running.insert(name.clone(), old);
                    applied.unchanged.push(name);
                    continue;
                }
                Some(old) => {
                    let _ = old.stop.send(true);
                    applied.restarted.push(name.clone());
                    Some(old.task)
                }
                None => {
                    applied.started.push(name.clone());
                    None
                }
            };
            let config = runner.config().clone();
            let (stop, stop_rx) = watch::channel(false);
            let status = self.status.clone();
            let task = tokio::spawn(async move {
                if let Some(previous) = previous {
                    // The old runner returns after its run in progress; never two at once.
                    let _ = previous.await;
                }
                runner.run_forever(status, stop_rx).await;
            });
            self.running.insert(name, Running { config, stop, task });
        }
        applied
    }

    /// Stops every runner: runs in progress get [`SHUTDOWN_GRACE`] to finish, then are aborted
    /// (an open transaction is then rolled back by the server).
    pub async fn shutdown(self) {
        let mut tasks = Vec::new();
        for (_, r) in self.running {
            let _ = r.stop.send(true);
            tasks.push(r.task);
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for mut t in tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
            }
        }
    }
}
