//! Watches a file (or a one-file-per-key directory) in a mounted Secret volume and yields each new valid value.
//!
//! The kubelet updates a Secret volume by writing a new timestamped directory and renaming a
//! `..data_tmp` symlink over `..data`; the user-visible files are symlinks through `..data`.
//! Watching the file itself is unreliable (inotify may report only `DELETE_SELF`, kubernetes#111947;
//! the swap may look like a plain write, configmap-reload#190; mtime may not change), so the
//! watcher:
//!
//! - watches the *parent directory* non-recursively (and, for a directory target, the directory
//!   itself), where the `..data` rename shows up, plus the directory of the resolved symlink
//!   target so in-place writes behind a symlink are seen too;
//! - re-arms after every burst and every poll: when a watched directory disappears it watches the
//!   nearest existing ancestor and comes back when the directory does;
//! - debounces a burst of events into one read, parses the content and compares the *parsed
//!   value* with the last one it yielded;
//! - re-reads every `poll_interval` even without events (lost events, subPath mounts) and on
//!   demand through [`ReloadHandle`];
//! - keeps the last good value when the content is missing or invalid, and reports each distinct
//!   failure once as [`WatchEvent::Rejected`], never with the content.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

/// Raw notify events waiting for the watcher task; beyond this they are counted as an overflow.
const RAW_EVENT_CAPACITY: usize = 256;
/// Events waiting for the consumer; the task waits when the consumer falls this far behind.
const OUTPUT_CAPACITY: usize = 16;
/// A burst that never goes quiet is still read after this many debounce periods.
const MAX_BURST_DEBOUNCES: u32 = 10;

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

impl WatchConfig {
    /// Sets how long the watcher waits after the last event of a burst before reading.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets the fallback re-read period (clamped to at least 10 ms so a zero cannot spin).
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
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

/// An event together with the moment the watcher first noticed the change behind it, so a
/// consumer can measure "file changed -> new value in use".
#[derive(Debug, Clone)]
pub struct TimedEvent<T> {
    pub event: WatchEvent<T>,
    /// When the first filesystem event of the burst arrived (or the poll/reload that found it).
    pub detected: std::time::Instant,
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

/// A running watcher. Dropping it stops the background task and its inotify watches.
pub struct FileWatcher<T> {
    events: mpsc::Receiver<TimedEvent<T>>,
    reload: ReloadHandle,
    path: PathBuf,
    current: Arc<Mutex<Option<T>>>,
    task: JoinHandle<()>,
}

impl<T> Drop for FileWatcher<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T> FileWatcher<T>
where
    T: Clone + PartialEq + Send + 'static,
{
    /// Starts watching `path` (a file, or a directory for the one-file-per-key layout).
    /// `parse` turns the path into a value; its error text must not contain the content.
    /// Must be called inside a tokio runtime (otherwise returns an error).
    ///
    /// `parse` runs on the watcher's tokio task: it should only read a few small files.
    /// If inotify is unavailable (for example its instance limit is reached) the watcher logs a
    /// warning and relies on polling.
    pub fn spawn<F, E>(
        path: impl Into<PathBuf>,
        config: WatchConfig,
        parse: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(&Path) -> Result<T, E> + Send + 'static,
        E: Display,
    {
        Self::start(path.into(), config, parse, true)
    }

    /// Like [`FileWatcher::spawn`] but without inotify: the file is only read at start, every
    /// `poll_interval` and on [`ReloadHandle::reload`]. For filesystems where inotify does not
    /// work (some network or FUSE mounts), and for tests that prove the poll fallback alone.
    pub fn spawn_polling<F, E>(
        path: impl Into<PathBuf>,
        config: WatchConfig,
        parse: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(&Path) -> Result<T, E> + Send + 'static,
        E: Display,
    {
        Self::start(path.into(), config, parse, false)
    }

    fn start<F, E>(
        path: PathBuf,
        config: WatchConfig,
        parse: F,
        use_events: bool,
    ) -> std::io::Result<Self>
    where
        F: Fn(&Path) -> Result<T, E> + Send + 'static,
        E: Display,
    {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            std::io::Error::other("FileWatcher::spawn must be called inside a tokio runtime")
        })?;
        let target = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        let (raw_tx, raw_rx) = mpsc::channel(RAW_EVENT_CAPACITY);
        let overflow = Arc::new(AtomicBool::new(false));
        let watcher = if use_events {
            new_notify_watcher(raw_tx, overflow.clone(), &path)
        } else {
            drop(raw_tx);
            None
        };
        let (out_tx, events) = mpsc::channel(OUTPUT_CAPACITY);
        let reload = Arc::new(Notify::new());
        let current = Arc::new(Mutex::new(None));
        let worker = Worker {
            shown: path.clone(),
            scope: Scope::new(target),
            config,
            parse: Box::new(move |path: &Path| parse(path).map_err(|err| err.to_string())),
            watcher,
            watched: BTreeMap::new(),
            last: None,
            last_rejection: None,
            out: out_tx,
            current: current.clone(),
        };
        let task = runtime.spawn(worker.run(raw_rx, overflow, reload.clone()));
        Ok(FileWatcher {
            events,
            reload: ReloadHandle(reload),
            path,
            current,
            task,
        })
    }

    /// The next event; `None` once the watcher has stopped.
    pub async fn next(&mut self) -> Option<WatchEvent<T>> {
        self.events.recv().await.map(|timed| timed.event)
    }

    /// The next event with the moment its change was first noticed.
    pub async fn next_timed(&mut self) -> Option<TimedEvent<T>> {
        self.events.recv().await
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last valid value the watcher has read, possibly ahead of events not yet taken by
    /// [`FileWatcher::next`]; `None` until the first valid read.
    pub fn current(&self) -> Option<T> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A notify event (or error) stamped with the moment it arrived.
type RawEvent = (std::time::Instant, notify::Result<notify::Event>);

/// Creates the inotify watcher whose callback, on notify's own thread, only forwards events.
fn new_notify_watcher(
    raw_tx: mpsc::Sender<RawEvent>,
    overflow: Arc<AtomicBool>,
    shown: &Path,
) -> Option<RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| {
        if raw_tx.try_send((std::time::Instant::now(), res)).is_err() {
            // Full (the task will read anyway) or closed (the watcher is stopping).
            overflow.store(true, Ordering::Relaxed);
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            warn!(path = %shown.display(), error = %err, "cannot use inotify; falling back to polling only");
            None
        }
    }
}

/// Identity of a watched directory, so a deleted and re-created directory is watched again.
type DirId = Option<(u64, u64)>;

fn dir_id(path: &Path) -> DirId {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Which paths matter for the target right now: the target, its resolved symlink target, and
/// whether it is a directory (one file per key) or a single file.
struct Scope {
    target: PathBuf,
    resolved: Option<PathBuf>,
    is_dir: bool,
}

impl Scope {
    fn new(target: PathBuf) -> Scope {
        let mut scope = Scope {
            target,
            resolved: None,
            is_dir: false,
        };
        scope.refresh();
        scope
    }

    fn refresh(&mut self) {
        self.is_dir = std::fs::metadata(&self.target).is_ok_and(|m| m.is_dir());
        self.resolved = std::fs::canonicalize(&self.target)
            .ok()
            .filter(|resolved| resolved != &self.target);
    }

    fn bases(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.target.as_path()).chain(self.resolved.as_deref())
    }

    /// Directories to watch: a directory target itself, and the parent of every base (or its
    /// nearest existing ancestor while it is missing).
    fn desired(&self) -> BTreeMap<PathBuf, DirId> {
        let mut dirs = BTreeSet::new();
        for base in self.bases() {
            if self.is_dir {
                dirs.insert(base.to_path_buf());
            }
            if let Some(parent) = base.parent() {
                dirs.insert(nearest_existing_dir(parent));
            }
        }
        dirs.into_iter()
            .map(|dir| {
                let id = dir_id(&dir);
                (dir, id)
            })
            .collect()
    }

    /// Whether an event on `path` can change what the target reads.
    fn concerns(&self, path: &Path) -> bool {
        self.bases().any(|base| {
            if base.starts_with(path) {
                // The target itself or one of its ancestors was created, removed or renamed.
                return true;
            }
            let Some(parent) = path.parent() else {
                return false;
            };
            if self.is_dir {
                return parent == base;
            }
            let name = path.file_name();
            parent == base.parent().unwrap_or(base)
                && (name == base.file_name()
                    || name.is_some_and(|n| n.to_string_lossy().starts_with("..")))
        })
    }

    fn event_concerns(&self, res: &notify::Result<notify::Event>) -> bool {
        let Ok(event) = res else {
            return true;
        };
        match event.kind {
            // Our own reads open and close the files; only a close after writing matters.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        event.need_rescan()
            || event.paths.is_empty()
            || event.paths.iter().any(|p| self.concerns(p))
    }
}

fn nearest_existing_dir(start: &Path) -> PathBuf {
    let mut dir = start;
    loop {
        if dir.is_dir() {
            return dir.to_path_buf();
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => return dir.to_path_buf(),
        }
    }
}

/// A pending burst of events.
#[derive(Clone, Copy)]
struct Burst {
    first_seen: std::time::Instant,
    quiet_at: Instant,
    latest: Instant,
}

/// The parse function with its error already turned into text.
type ParseFn<T> = Box<dyn Fn(&Path) -> Result<T, String> + Send>;

/// The background task: owns the inotify watcher, the last good value and the parse function.
struct Worker<T> {
    shown: PathBuf,
    scope: Scope,
    config: WatchConfig,
    parse: ParseFn<T>,
    watcher: Option<RecommendedWatcher>,
    watched: BTreeMap<PathBuf, DirId>,
    last: Option<T>,
    last_rejection: Option<String>,
    out: mpsc::Sender<TimedEvent<T>>,
    current: Arc<Mutex<Option<T>>>,
}

impl<T> Worker<T>
where
    T: Clone + PartialEq + Send + 'static,
{
    async fn run(
        mut self,
        mut raw: mpsc::Receiver<RawEvent>,
        overflow: Arc<AtomicBool>,
        reload: Arc<Notify>,
    ) {
        self.rearm();
        if !self.read(std::time::Instant::now()).await {
            return;
        }
        let debounce = self.config.debounce;
        let period = self.config.poll_interval.max(Duration::from_millis(10));
        let mut poll = tokio::time::interval_at(Instant::now() + period, period);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut raw_open = self.watcher.is_some();
        let mut burst: Option<Burst> = None;
        loop {
            let deadline = burst.map(|b| b.quiet_at.min(b.latest));
            let cause = tokio::select! {
                received = raw.recv(), if raw_open => {
                    let Some((seen, res)) = received else {
                        raw_open = false;
                        continue;
                    };
                    let overflowed = overflow.swap(false, Ordering::Relaxed);
                    if !(overflowed || self.scope.event_concerns(&res)) {
                        continue;
                    }
                    match &res {
                        Ok(event) => debug!(path = %self.shown.display(), kind = ?event.kind, paths = ?event.paths, "file event"),
                        Err(err) => debug!(path = %self.shown.display(), error = %err, "file watch error"),
                    }
                    let now = Instant::now();
                    burst = Some(match burst {
                        Some(b) => Burst { quiet_at: now + debounce, ..b },
                        None => Burst {
                            first_seen: seen,
                            quiet_at: now + debounce,
                            latest: now + debounce * MAX_BURST_DEBOUNCES,
                        },
                    });
                    continue;
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    let first = burst.take().map_or_else(std::time::Instant::now, |b| b.first_seen);
                    (first, "events")
                }
                _ = reload.notified() => {
                    burst = None;
                    (std::time::Instant::now(), "reload")
                }
                _ = poll.tick() => (std::time::Instant::now(), "poll"),
            };
            let (detected, why) = cause;
            debug!(path = %self.shown.display(), trigger = why, "reading");
            self.rearm();
            if !self.read(detected).await {
                return;
            }
        }
    }

    /// Makes the inotify watches match what the target looks like now.
    fn rearm(&mut self) {
        self.scope.refresh();
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let desired = self.scope.desired();
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(dir, id)| desired.get(*dir) != Some(*id))
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in stale {
            // notify may already have dropped the watch of a deleted directory: ignore errors.
            let _ = watcher.unwatch(&dir);
            self.watched.remove(&dir);
            debug!(dir = %dir.display(), "unwatched");
        }
        for (dir, id) in desired {
            if self.watched.contains_key(&dir) {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    debug!(dir = %dir.display(), "watching");
                    self.watched.insert(dir, id);
                }
                // Retried at the next burst or poll; the poll covers the gap.
                Err(err) => {
                    warn!(dir = %dir.display(), error = %err, "cannot watch directory; relying on polling")
                }
            }
        }
    }

    /// Reads and parses the target and reports the outcome if it is news. Returns false once
    /// nobody listens any more.
    async fn read(&mut self, detected: std::time::Instant) -> bool {
        let Some(event) = self.evaluate() else {
            return true;
        };
        self.out.send(TimedEvent { event, detected }).await.is_ok()
    }

    fn evaluate(&mut self) -> Option<WatchEvent<T>> {
        let outcome = match std::fs::metadata(&self.scope.target) {
            Err(err) => Err(format!(
                "cannot read {}: {}",
                self.shown.display(),
                err.kind()
            )),
            Ok(_) => (self.parse)(&self.scope.target)
                .map_err(|err| format!("rejected {}: {err}", self.shown.display())),
        };
        match outcome {
            Ok(value) => {
                self.last_rejection = None;
                if self.last.as_ref() == Some(&value) {
                    return None;
                }
                info!(path = %self.shown.display(), "new value loaded");
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(value.clone());
                self.last = Some(value.clone());
                Some(WatchEvent::Changed(value))
            }
            Err(reason) => {
                if self.last_rejection.as_ref() == Some(&reason) {
                    return None;
                }
                warn!(reason = %reason, keeping_last_good = self.last.is_some(), "secret file rejected");
                self.last_rejection = Some(reason.clone());
                Some(WatchEvent::Rejected(reason))
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
