//! The Secret file watcher against real files changed the way the kubelet and other writers do.
//!
//! Event-driven tests use a 60 s poll interval so that a value arriving within the test's
//! timeout can only have come from an inotify event, not from the poll fallback.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dbcred::watch::TimedEvent;
use dbcred::{FileWatcher, WatchConfig, WatchEvent};
use dbtests::SecretDir;

const KEY: &str = "uri_dsn.txt";
/// Generous bound for an event to arrive on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(5);
/// Latency every change must meet (the product target).
const LATENCY_BOUND: Duration = Duration::from_secs(2);
/// How long "nothing happens" is observed.
const QUIET: Duration = Duration::from_secs(1);

/// Reads the file as text; the text "garbage" is invalid. The error never includes the content.
fn parse_text(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {}", e.kind()))?;
    let text = text.trim().to_string();
    if text == "garbage" {
        return Err("content is not a valid value".to_string());
    }
    Ok(text)
}

/// Reads every visible key of a one-file-per-key directory.
fn parse_dir(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    let entries = std::fs::read_dir(path).map_err(|e| format!("cannot list: {}", e.kind()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list: {}", e.kind()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        map.insert(name, parse_text(&entry.path())?);
    }
    Ok(map)
}

fn events_only() -> WatchConfig {
    WatchConfig::default().with_poll_interval(Duration::from_secs(60))
}

async fn next_within<T: Clone + PartialEq + Send + 'static>(
    watcher: &mut FileWatcher<T>,
    limit: Duration,
) -> Option<TimedEvent<T>> {
    tokio::time::timeout(limit, watcher.next_timed())
        .await
        .ok()
        .flatten()
}

/// Waits for `Changed(expected)` and returns the latency from `since` to its arrival.
async fn expect_changed<T>(
    watcher: &mut FileWatcher<T>,
    expected: T,
    since: Instant,
    what: &str,
) -> Duration
where
    T: Clone + PartialEq + Send + std::fmt::Debug + 'static,
{
    let event = next_within(watcher, WAIT).await;
    let latency = since.elapsed();
    match event {
        Some(TimedEvent {
            event: WatchEvent::Changed(value),
            detected,
        }) => {
            assert_eq!(value, expected, "{what}: wrong value");
            let noticed = detected.saturating_duration_since(since);
            eprintln!(
                "{what}: change noticed after {noticed:?}, value delivered after {latency:?}"
            );
            assert!(latency < LATENCY_BOUND, "{what}: took {latency:?}");
            latency
        }
        other => panic!(
            "{what}: expected Changed({expected:?}), got {:?}",
            other.map(|e| e.event)
        ),
    }
}

async fn expect_rejected<T>(watcher: &mut FileWatcher<T>, what: &str) -> String
where
    T: Clone + PartialEq + Send + std::fmt::Debug + 'static,
{
    match next_within(watcher, WAIT).await.map(|e| e.event) {
        Some(WatchEvent::Rejected(reason)) => {
            eprintln!("{what}: rejected: {reason}");
            reason
        }
        other => panic!("{what}: expected Rejected, got {other:?}"),
    }
}

async fn expect_quiet<T>(watcher: &mut FileWatcher<T>, what: &str)
where
    T: Clone + PartialEq + Send + std::fmt::Debug + 'static,
{
    if let Some(event) = next_within(watcher, QUIET).await {
        panic!("{what}: expected no event, got {:?}", event.event);
    }
}

fn secret(value: &str) -> std::io::Result<SecretDir> {
    let dir = SecretDir::new()?;
    dir.write(&[(KEY, value.as_bytes()), ("password", b"pw")])?;
    Ok(dir)
}

#[tokio::test]
async fn kubelet_atomic_updates_are_seen_every_time() -> std::io::Result<()> {
    let dir = secret("v0")?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v0".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    // Several rotations in a row: a watcher that loses its watch after the first swap fails here.
    for i in 1..=4 {
        let value = format!("v{i}");
        let start = Instant::now();
        dir.write(&[(KEY, value.as_bytes()), ("password", b"pw")])?;
        expect_changed(&mut watcher, value, start, &format!("kubelet rotation {i}")).await;
        assert_eq!(watcher.current(), Some(format!("v{i}")));
    }
    Ok(())
}

#[tokio::test]
async fn in_place_write_is_seen() -> std::io::Result<()> {
    let dir = SecretDir::new()?;
    dir.write_in_place(KEY, b"v1")?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    for i in 2..=3 {
        let start = Instant::now();
        dir.write_in_place(KEY, format!("v{i}").as_bytes())?;
        expect_changed(&mut watcher, format!("v{i}"), start, "in-place write").await;
    }
    Ok(())
}

#[tokio::test]
async fn rename_over_the_file_is_seen() -> std::io::Result<()> {
    let dir = SecretDir::new()?;
    dir.write_rename(KEY, b"v1")?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    for i in 2..=3 {
        let start = Instant::now();
        dir.write_rename(KEY, format!("v{i}").as_bytes())?;
        expect_changed(&mut watcher, format!("v{i}"), start, "rename over").await;
    }
    Ok(())
}

#[tokio::test]
async fn deleted_then_recreated_file_is_seen() -> std::io::Result<()> {
    let dir = SecretDir::new()?;
    dir.write_in_place(KEY, b"v1")?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;

    dir.remove(KEY)?;
    let reason = expect_rejected(&mut watcher, "file deleted").await;
    assert!(reason.contains(KEY), "reason names the path: {reason}");
    assert_eq!(
        watcher.current(),
        Some("v1".to_string()),
        "last good value kept"
    );

    let start = Instant::now();
    dir.write_in_place(KEY, b"v2")?;
    expect_changed(&mut watcher, "v2".to_string(), start, "file re-created").await;

    // Delete and re-create within one debounce window: one new value, no rejection.
    let start = Instant::now();
    dir.recreate(KEY, b"v3")?;
    expect_changed(
        &mut watcher,
        "v3".to_string(),
        start,
        "file deleted and re-created at once",
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn deleted_then_recreated_directory_is_seen() -> anyhow_free::Result {
    let base = tempfile::tempdir()?;
    let dir = SecretDir::at(base.path().join("mnt").join("secret"))?;
    dir.write(&[(KEY, b"v1")])?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;

    dir.remove_dir()?;
    expect_rejected(&mut watcher, "directory deleted").await;
    // Also remove the parent so the watcher has to fall back two levels.
    std::fs::remove_dir(base.path().join("mnt"))?;
    expect_quiet(
        &mut watcher,
        "parent deleted while file missing (same failure)",
    )
    .await;

    let start = Instant::now();
    std::fs::create_dir(base.path().join("mnt"))?;
    dir.recreate_dir(&[(KEY, b"v2")])?;
    expect_changed(
        &mut watcher,
        "v2".to_string(),
        start,
        "directory re-created",
    )
    .await;

    // The watch was re-armed on the new directory: a later kubelet update arrives by event.
    let start = Instant::now();
    dir.write(&[(KEY, b"v3")])?;
    expect_changed(
        &mut watcher,
        "v3".to_string(),
        start,
        "kubelet update in re-created directory",
    )
    .await;

    // Delete and re-create within one debounce window.
    let start = Instant::now();
    dir.recreate_dir(&[(KEY, b"v4")])?;
    expect_changed(
        &mut watcher,
        "v4".to_string(),
        start,
        "directory deleted and re-created at once",
    )
    .await;
    let start = Instant::now();
    dir.write(&[(KEY, b"v5")])?;
    expect_changed(
        &mut watcher,
        "v5".to_string(),
        start,
        "kubelet update after quick re-create",
    )
    .await;
    Ok(())
}

/// `?` on io errors in tests without pulling anyhow into dbcred's dev-dependencies.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}

#[tokio::test]
async fn burst_of_key_updates_yields_one_value() -> std::io::Result<()> {
    let dir = SecretDir::new()?;
    let keys = [
        "hostname", "port", "database", "username", "password", "sslmode",
    ];
    let old: Vec<(&str, &[u8])> = keys.iter().map(|k| (*k, b"old".as_slice())).collect();
    dir.write(&old)?;
    let config = events_only().with_debounce(Duration::from_millis(300));
    let mut watcher = FileWatcher::spawn(dir.path(), config, parse_dir)?;
    let expected_old: BTreeMap<String, String> =
        keys.iter().map(|k| (k.to_string(), "old".into())).collect();
    expect_changed(
        &mut watcher,
        expected_old,
        Instant::now(),
        "initial directory read",
    )
    .await;

    // Six kubelet updates in quick succession, each changing one more key: a watcher without
    // debounce would yield a mix of old and new values.
    let start = Instant::now();
    for n in 1..=keys.len() {
        let files: Vec<(&str, &[u8])> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    *k,
                    if i < n {
                        b"new".as_slice()
                    } else {
                        b"old".as_slice()
                    },
                )
            })
            .collect();
        dir.write(&files)?;
    }
    let written = start.elapsed();
    eprintln!("six kubelet updates written in {written:?}");
    let expected_new: BTreeMap<String, String> =
        keys.iter().map(|k| (k.to_string(), "new".into())).collect();
    expect_changed(&mut watcher, expected_new, start, "burst of six updates").await;
    expect_quiet(&mut watcher, "after the burst").await;
    Ok(())
}

#[tokio::test]
async fn several_updates_in_one_window_yield_the_final_value() -> std::io::Result<()> {
    let dir = secret("v0")?;
    let config = events_only().with_debounce(Duration::from_millis(300));
    let mut watcher = FileWatcher::spawn(dir.file(KEY), config, parse_text)?;
    expect_changed(
        &mut watcher,
        "v0".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    let start = Instant::now();
    for i in 1..=5 {
        dir.write(&[(KEY, format!("v{i}").as_bytes()), ("password", b"pw")])?;
    }
    expect_changed(
        &mut watcher,
        "v5".to_string(),
        start,
        "five quick kubelet updates",
    )
    .await;
    expect_quiet(&mut watcher, "after the updates").await;
    Ok(())
}

#[tokio::test]
async fn identical_content_yields_no_event() -> std::io::Result<()> {
    let dir = secret("v1")?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;

    // A new ..data generation with the same bytes, then a change of another key only.
    dir.write_always(&[(KEY, b"v1"), ("password", b"pw")])?;
    dir.write(&[(KEY, b"v1"), ("password", b"pw2")])?;
    dir.write_in_place("unrelated", b"x")?;
    expect_quiet(&mut watcher, "same content rewritten").await;

    // The watcher is alive: a real change still arrives.
    let start = Instant::now();
    dir.write(&[(KEY, b"v2"), ("password", b"pw2")])?;
    expect_changed(
        &mut watcher,
        "v2".to_string(),
        start,
        "real change after no-ops",
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn invalid_content_is_rejected_once_and_last_good_value_kept() -> std::io::Result<()> {
    let dir = secret("v1")?;
    // Short poll: the same failure seen at every poll must still be reported only once.
    let config = WatchConfig::default().with_poll_interval(Duration::from_millis(100));
    let mut watcher = FileWatcher::spawn(dir.file(KEY), config, parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;

    dir.write(&[(KEY, b"garbage"), ("password", b"pw")])?;
    let reason = expect_rejected(&mut watcher, "garbage written").await;
    assert!(
        !reason.contains("garbage"),
        "reason leaks the content: {reason}"
    );
    assert!(reason.contains(KEY), "reason names the file: {reason}");
    expect_quiet(&mut watcher, "same failure at every poll").await;
    assert_eq!(watcher.current(), Some("v1".to_string()));

    let start = Instant::now();
    dir.write(&[(KEY, b"v2"), ("password", b"pw")])?;
    expect_changed(&mut watcher, "v2".to_string(), start, "valid after invalid").await;
    Ok(())
}

#[tokio::test]
async fn missing_at_start_is_rejected_then_changed() -> std::io::Result<()> {
    let dir = SecretDir::new()?;
    let mut watcher = FileWatcher::spawn(dir.file(KEY), events_only(), parse_text)?;
    let reason = expect_rejected(&mut watcher, "missing at start").await;
    assert!(
        reason.contains("not found"),
        "reason says what is wrong: {reason}"
    );
    assert_eq!(watcher.current(), None);
    let start = Instant::now();
    dir.write(&[(KEY, b"v1")])?;
    expect_changed(&mut watcher, "v1".to_string(), start, "first valid value").await;
    Ok(())
}

#[tokio::test]
async fn poll_finds_changes_without_events() -> std::io::Result<()> {
    let dir = secret("v1")?;
    // Without inotify and with a long poll, a change is NOT seen within a second: this proves
    // `spawn_polling` really has no events, so the next part can only pass through the poll.
    let mut slow = FileWatcher::spawn_polling(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut slow,
        "v1".to_string(),
        Instant::now(),
        "initial read (no events)",
    )
    .await;
    let poll = WatchConfig::default().with_poll_interval(Duration::from_millis(300));
    let mut polled = FileWatcher::spawn_polling(dir.file(KEY), poll, parse_text)?;
    expect_changed(
        &mut polled,
        "v1".to_string(),
        Instant::now(),
        "initial read (polled)",
    )
    .await;

    let start = Instant::now();
    dir.write(&[(KEY, b"v2"), ("password", b"pw")])?;
    expect_changed(
        &mut polled,
        "v2".to_string(),
        start,
        "found by the 300 ms poll",
    )
    .await;
    expect_quiet(&mut slow, "no events and no poll yet").await;
    Ok(())
}

#[tokio::test]
async fn reload_handle_reads_at_once() -> std::io::Result<()> {
    let dir = secret("v1")?;
    let mut watcher = FileWatcher::spawn_polling(dir.file(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    dir.write(&[(KEY, b"v2"), ("password", b"pw")])?;
    expect_quiet(&mut watcher, "change invisible without events or poll").await;
    let start = Instant::now();
    watcher.reload_handle().reload();
    expect_changed(&mut watcher, "v2".to_string(), start, "forced reload").await;
    Ok(())
}

/// Counts the reads a watcher makes through its parse function.
fn counting_parse(
    reads: Arc<AtomicUsize>,
) -> impl Fn(&Path) -> Result<String, String> + Send + 'static {
    move |path| {
        reads.fetch_add(1, Ordering::SeqCst);
        parse_text(path)
    }
}

#[tokio::test]
async fn idle_watcher_does_not_reread_its_own_reads() -> std::io::Result<()> {
    // The watcher's own open/close of the file produce inotify events in the watched directory;
    // they must not trigger further reads (a read loop).
    let dir = secret("v1")?;
    let reads = Arc::new(AtomicUsize::new(0));
    let mut watcher =
        FileWatcher::spawn(dir.file(KEY), events_only(), counting_parse(reads.clone()))?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    // Other readers of the same file must not trigger reads either.
    for _ in 0..5 {
        let _ = std::fs::read(dir.file(KEY))?;
    }
    tokio::time::sleep(QUIET).await;
    let count = reads.load(Ordering::SeqCst);
    assert_eq!(count, 1, "idle watcher read {count} times");
    Ok(())
}

#[tokio::test]
async fn dropping_the_watcher_stops_it() -> std::io::Result<()> {
    let dir = secret("v1")?;
    let reads = Arc::new(AtomicUsize::new(0));
    let config = WatchConfig::default().with_poll_interval(Duration::from_millis(20));
    let mut watcher = FileWatcher::spawn(dir.file(KEY), config, counting_parse(reads.clone()))?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        reads.load(Ordering::SeqCst) > 2,
        "the poll runs while the watcher lives"
    );

    drop(watcher);
    // The task owned the parse function: once it is gone, only our reference remains.
    let deadline = Instant::now() + WAIT;
    while Arc::strong_count(&reads) > 1 {
        assert!(
            Instant::now() < deadline,
            "watcher task still alive after drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after_drop = reads.load(Ordering::SeqCst);
    dir.write(&[(KEY, b"v2"), ("password", b"pw")])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reads.load(Ordering::SeqCst), after_drop, "reads after drop");
    Ok(())
}

#[tokio::test]
async fn directory_target_sees_each_key() -> std::io::Result<()> {
    let dir = SecretDir::new()?;
    dir.write(&[("hostname", b"db1"), ("password", b"p1")])?;
    let mut watcher = FileWatcher::spawn(dir.path(), events_only(), parse_dir)?;
    let map = |h: &str, p: &str| {
        BTreeMap::from([
            ("hostname".to_string(), h.to_string()),
            ("password".to_string(), p.to_string()),
        ])
    };
    expect_changed(
        &mut watcher,
        map("db1", "p1"),
        Instant::now(),
        "initial directory read",
    )
    .await;
    let start = Instant::now();
    dir.write(&[("hostname", b"db1"), ("password", b"p2")])?;
    expect_changed(&mut watcher, map("db1", "p2"), start, "password rotated").await;
    let start = Instant::now();
    dir.write(&[("hostname", b"db2"), ("password", b"p2")])?;
    expect_changed(&mut watcher, map("db2", "p2"), start, "host migrated").await;
    // A key's value becomes invalid: rejected, then fixed.
    dir.write(&[("hostname", b"db2"), ("password", b"garbage")])?;
    let reason = expect_rejected(&mut watcher, "invalid key in directory").await;
    assert!(
        !reason.contains("garbage"),
        "reason leaks the content: {reason}"
    );
    let start = Instant::now();
    dir.write(&[("hostname", b"db2"), ("password", b"p3")])?;
    expect_changed(&mut watcher, map("db2", "p3"), start, "fixed key").await;
    Ok(())
}

#[test]
fn spawn_outside_a_runtime_is_an_error() {
    let result = FileWatcher::spawn("/nonexistent/file", WatchConfig::default(), parse_text);
    assert!(result.is_err());
}

#[tokio::test]
async fn in_place_write_behind_a_symlink_is_seen() -> std::io::Result<()> {
    // The watched path is a symlink into another directory (not the kubelet layout): a write
    // to the real file shows no event in the symlink's directory, only in the target's.
    let base = tempfile::tempdir()?;
    let real = SecretDir::at(base.path().join("real"))?;
    real.write_in_place(KEY, b"v1")?;
    let links = base.path().join("links");
    std::fs::create_dir(&links)?;
    std::os::unix::fs::symlink(real.file(KEY), links.join(KEY))?;
    let mut watcher = FileWatcher::spawn(links.join(KEY), events_only(), parse_text)?;
    expect_changed(
        &mut watcher,
        "v1".to_string(),
        Instant::now(),
        "initial read",
    )
    .await;
    let start = Instant::now();
    real.write_in_place(KEY, b"v2")?;
    expect_changed(
        &mut watcher,
        "v2".to_string(),
        start,
        "write behind symlink",
    )
    .await;
    Ok(())
}
