//! Locates the workspace's own binaries (dbproxy, dsnexec, dbwebhook) for end-to-end tests,
//! building them when they are missing or older than their sources.
//!
//! Tests inside a binary's own package should use `env!("CARGO_BIN_EXE_<name>")` instead; this is
//! for the dbtests crate's cross-component tests, the demo and the benchmark.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::{Context, bail};

/// Binaries this helper knows, with the package that builds each.
const KNOWN: &[(&str, &str)] = &[
    ("dbproxy", "dbproxy"),
    ("dsnexec", "dsnexec"),
    ("dbwebhook", "dbwebhook"),
];

/// The workspace root (the directory of the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else derived from the running executable
/// (`<target>/<profile>/deps/<test>` or `<target>/<profile>/<bin>`), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        // Cargo resolves a relative CARGO_TARGET_DIR against the directory it ran in; tests
        // are normally started from the workspace root.
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Some(profile) = exe_profile_dir()
        && let Some(target) = profile.parent()
    {
        return target.to_path_buf();
    }
    workspace_root().join("target")
}

/// `<target>/<profile>` of the running executable, when it looks like a Cargo build output.
fn exe_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.file_name()? == "deps" {
        dir = dir.parent()?;
    }
    // A profile directory sits next to Cargo's `.rustc_info.json` or `CACHEDIR.TAG`.
    let target = dir.parent()?;
    (target.join("CACHEDIR.TAG").is_file() || target.join(".rustc_info.json").is_file())
        .then(|| dir.to_path_buf())
}

/// Profile name of the running executable (`debug` unless it was built with `--release`).
fn profile_name() -> String {
    exe_profile_dir()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n == "release")
        .unwrap_or_else(|| "debug".to_string())
}

/// Path of workspace binary `name` (dbproxy, dsnexec, dbwebhook), built first when missing or
/// stale. Builds run once per binary per process and use env `CARGO` when set.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let Some(&(_, package)) = KNOWN.iter().find(|(bin, _)| *bin == name) else {
        bail!(
            "unknown workspace binary {name:?}; known: {}",
            KNOWN.iter().map(|(b, _)| *b).collect::<Vec<_>>().join(", ")
        );
    };
    let profile = profile_name();
    let target = target_dir();
    let path = target.join(&profile).join(name);

    static CHECKED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    // One build at a time; a binary already checked in this process is not checked again.
    let mut checked = CHECKED
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if checked.contains(name) && path.is_file() {
        return Ok(path);
    }
    if is_stale(&path, package) {
        build(name, package, &profile, &target)?;
        if !path.is_file() {
            bail!("cargo built {name} but {} does not exist", path.display());
        }
    }
    checked.insert(name.to_string());
    Ok(path)
}

/// Missing, or older than any source of its package, of dbcred, or of the lock file.
fn is_stale(binary: &Path, package_dir: &str) -> bool {
    let Some(built) = std::fs::metadata(binary).and_then(|m| m.modified()).ok() else {
        return true;
    };
    let root = workspace_root();
    let sources = [
        root.join(package_dir_of(package_dir)),
        root.join("dbcred"),
        root.join("Cargo.lock"),
        root.join("Cargo.toml"),
    ];
    sources
        .iter()
        .any(|p| newest_mtime(p).is_some_and(|m| m > built))
}

/// Directory of a package in the workspace.
fn package_dir_of(package: &str) -> &'static str {
    match package {
        "dbproxy" => "proxy",
        "dbwebhook" => "webhook",
        "dsnexec" => "dsnexec",
        _ => "",
    }
}

/// Newest modification time of `path` and, for a directory, of `Cargo.toml` and `src/` below it.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    let mut newest = None;
    for sub in [
        path.join("Cargo.toml"),
        path.join("src"),
        path.join("build.rs"),
    ] {
        newest = newest.max(newest_in_tree(&sub));
    }
    newest
}

/// Newest modification time of any file in a tree.
fn newest_in_tree(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let mut newest = meta.modified().ok();
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            newest = newest.max(newest_in_tree(&entry.path()));
        }
    }
    newest
}

/// `cargo build -p <package> --bin <name>` into `target`.
fn build(name: &str, package: &str, profile: &str, target: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["build", "-p", package, "--bin", name])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target);
    if profile == "release" {
        command.arg("--release");
    }
    let output = command
        .output()
        .with_context(|| format!("running {} build -p {package}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        bail!(
            "cargo build -p {package} --bin {name} failed ({}):\n{}",
            output.status,
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
    Ok(())
}
