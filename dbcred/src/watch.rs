//! Watches a file in a mounted Secret volume and yields each new valid value.
//! API CONTRACT (stub, being implemented in issue 2): other crates code against these signatures.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

/// How the watcher debounces and how often it re-reads as a fallback.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// A burst of events closer together than this yields one read.
    pub debounce: Duration,
    /// Re-read this often even without any event (lost inotify events, subPath mounts).
    pub poll_interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            debounce: Duration::from_millis(100),
            poll_interval: Duration::from_secs(10),
        }
    }
}

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<T> {
    /// A new valid value, different from the previous one. The first valid read is reported too.
    Changed(T),
    /// The file could not be read or did not parse; the last good value stays in force.
    /// The reason never contains the file's content.
    Rejected(String),
}

/// Lets another task ask for an immediate re-read (for example after `invalid_password`).
#[derive(Debug, Clone)]
pub struct ReloadHandle(Arc<Notify>);

impl ReloadHandle {
    /// Re-reads the file now; a changed value arrives as a `Changed` event.
    pub fn reload(&self) {
        self.0.notify_one();
    }
}

/// A running watcher. Dropping it stops the background task.
pub struct FileWatcher<T> {
    events: mpsc::Receiver<WatchEvent<T>>,
    reload: ReloadHandle,
    path: PathBuf,
}

impl<T> FileWatcher<T>
where
    T: Clone + PartialEq + Send + 'static,
{
    /// Starts watching `path` (a file, or a directory for the one-file-per-key layout).
    /// `parse` turns the path into a value; its error text must not contain the content.
    /// Must be called inside a tokio runtime.
    pub fn spawn<F, E>(
        path: impl Into<PathBuf>,
        _config: WatchConfig,
        _parse: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(&Path) -> Result<T, E> + Send + 'static,
        E: Display,
    {
        let (_tx, events) = mpsc::channel(16);
        Ok(FileWatcher {
            events,
            reload: ReloadHandle(Arc::new(Notify::new())),
            path: path.into(),
        })
    }

    /// The next event; `None` once the watcher has stopped.
    pub async fn next(&mut self) -> Option<WatchEvent<T>> {
        self.events.recv().await
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
