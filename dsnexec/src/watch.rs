//! Watches every file one config depends on (its sources and a hotload DSN file) as one stream.
//!
//! Each file gets a `dbcred::FileWatcher` that reads and parses the file after every event
//! (and by polling), and reports a fingerprint of the content when it changed and parses, or
//! the reason it was rejected. The runner merges the stream into debounced runs.

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use dbcred::{FileWatcher, WatchConfig, WatchEvent};

use crate::config::Config;
use crate::source::{self, SourceDriver};

/// Something happened to one watched file.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// The file now holds valid content with this fingerprint (also sent for the first read).
    Changed { path: PathBuf, fingerprint: u64 },
    /// The file is unreadable or does not parse; the reason never quotes the content.
    Rejected { path: PathBuf, reason: String },
}

/// The merged watchers of one config. Dropping it stops them.
pub struct ConfigWatch {
    signals: mpsc::Receiver<Signal>,
    _tasks: JoinSet<()>,
}

impl ConfigWatch {
    /// Starts a watcher per file of the config. Must be called inside a tokio runtime.
    pub fn spawn(config: &Config, watch: WatchConfig) -> std::io::Result<ConfigWatch> {
        let (tx, signals) = mpsc::channel(64);
        let mut tasks = JoinSet::new();
        for s in &config.sources {
            let driver = s.driver;
            let w = FileWatcher::spawn(s.path.clone(), watch.clone(), move |p: &Path| {
                validated_fingerprint(p, Some(driver))
            })?;
            tasks.spawn(forward(w, tx.clone()));
        }
        if let Some(dsn_file) = config.destination.dsn_file() {
            let w = FileWatcher::spawn(dsn_file.to_owned(), watch.clone(), |p: &Path| {
                validated_fingerprint(p, None)
            })?;
            tasks.spawn(forward(w, tx.clone()));
        }
        Ok(ConfigWatch {
            signals,
            _tasks: tasks,
        })
    }

    /// The next signal; `None` once every watcher stopped.
    pub async fn next(&mut self) -> Option<Signal> {
        self.signals.recv().await
    }

    /// A signal already waiting, without blocking.
    pub fn try_next(&mut self) -> Option<Signal> {
        self.signals.try_recv().ok()
    }
}

/// Reads a file, checks it parses (as a source, or as a DSN when `driver` is `None`), and
/// returns the fingerprint the runner compares with what its last successful run read.
fn validated_fingerprint(path: &Path, driver: Option<SourceDriver>) -> Result<u64, String> {
    let text = source::read_text(path).map_err(|e| e.to_string())?;
    match driver {
        Some(d) => {
            source::parse(d, &text)?;
        }
        None => {
            dbcred::Dsn::parse(&text).map_err(|e| format!("invalid DSN: {e}"))?;
        }
    }
    Ok(source::fingerprint(&text))
}

async fn forward(mut w: FileWatcher<u64>, tx: mpsc::Sender<Signal>) {
    let path = w.path().to_owned();
    while let Some(event) = w.next().await {
        let signal = match event {
            WatchEvent::Changed(fingerprint) => Signal::Changed {
                path: path.clone(),
                fingerprint,
            },
            WatchEvent::Rejected(reason) => Signal::Rejected {
                path: path.clone(),
                reason,
            },
        };
        if tx.send(signal).await.is_err() {
            return;
        }
    }
}
