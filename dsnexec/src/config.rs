//! The config file: db-controller's `configs.<name>` schema plus our run settings, validated.
//!
//! ```yaml
//! configs:
//!   sql:                       # the config's name (for -e/-d, logs and metrics)
//!     disabled: false
//!     sources:                 # files whose content the templates see, keyed by `filename`
//!     - driver: postgres       # postgres | json | yaml | none
//!       filename: /var/run/db-dsn/dsn.txt
//!     destination:
//!       driver: postgres       # postgres | hotload | shelldb (shell) | fprintf
//!       dsn: postgres://...
//!     commands:
//!     - command: "..."         # a Go text/template
//!       args: ["..."]          # templates too; with args the command is one statement
//!     # additions (not in db-controller):
//!     transaction: true        # postgres: run all commands of one run in one transaction
//!     timeout: 30s             # per command, and for connecting
//!     debounce: 500ms          # a burst of file changes closer than this is one run
//!     retry: {initial: 1s, max: 60s}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::source::SourceDriver;

/// Default timeout of one command (and of connecting to the destination).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default quiet period that turns a burst of file events into one run.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(500);
/// Default first retry delay after a failed run.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Default cap of the retry delay.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);

/// The file as written: `configs` keyed by name. A `BTreeMap` so configs start in a stable order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    configs: BTreeMap<String, RawConfig>,
}

/// One config as written (db-controller's fields plus ours).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    destination: Option<RawDestination>,
    #[serde(default)]
    commands: Vec<RawCommand>,
    #[serde(default)]
    transaction: Option<bool>,
    #[serde(default)]
    timeout: Option<DurationText>,
    #[serde(default)]
    debounce: Option<DurationText>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    driver: String,
    #[serde(default)]
    filename: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(default)]
    driver: String,
    #[serde(default)]
    dsn: String,
}

impl fmt::Debug for RawDestination {
    /// The DSN may hold a password: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawDestination")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    #[serde(default)]
    command: String,
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    initial: Option<DurationText>,
    #[serde(default)]
    max: Option<DurationText>,
}

/// A duration written as `500ms`, `30s`, `5m`, `1h` or a bare number of seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum DurationText {
    Seconds(u64),
    Text(String),
}

impl DurationText {
    fn parse(&self) -> std::result::Result<Duration, String> {
        match self {
            DurationText::Seconds(s) => Ok(Duration::from_secs(*s)),
            DurationText::Text(t) => parse_duration(t),
        }
    }
}

/// Parses `500ms`, `1.5s`, `30s`, `5m`, `1h` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{t:?} is not a duration (write e.g. 500ms, 30s, 5m, 1h)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {t:?} (use ms, s, m or h)"
            ));
        }
    };
    let seconds = value * scale;
    if !seconds.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err(format!("{t:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A whole config file after validation: the configs to run, in name order.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSet {
    /// Every config of the file, enabled or not.
    pub configs: Vec<Config>,
}

impl ConfigSet {
    /// The configs that will run.
    pub fn enabled(&self) -> impl Iterator<Item = &Config> {
        self.configs.iter().filter(|c| c.enabled)
    }
}

/// One validated config. Equal configs run identically, which is how a re-read config file
/// tells which runners to restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub name: String,
    pub enabled: bool,
    pub sources: Vec<Source>,
    pub destination: DestinationSpec,
    pub commands: Vec<CommandSpec>,
    /// Run the SQL commands of one run in one transaction (postgres only).
    pub transaction: bool,
    /// Limit for one command, and for connecting to the destination.
    pub timeout: Duration,
    /// Quiet period that merges a burst of changes into one run.
    pub debounce: Duration,
    pub retry: RetryPolicy,
}

/// Capped exponential backoff between attempts of a failed run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

/// A file the templates read; its values are keyed by `key`, the `filename` exactly as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub driver: SourceDriver,
    pub key: String,
    pub path: PathBuf,
}

/// Where a postgres destination's connection string comes from.
#[derive(Clone, PartialEq)]
pub enum DsnLocation {
    /// Written in the config.
    Literal(String),
    /// Read from this file at every run (db-controller's `hotload` with `fsnotify://`); a
    /// change of the file triggers a run.
    File(PathBuf),
}

impl fmt::Debug for DsnLocation {
    /// A literal DSN may hold a password: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DsnLocation::Literal(_) => f.write_str("Literal(..)"),
            DsnLocation::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// What the commands act on.
#[derive(Debug, Clone, PartialEq)]
pub enum DestinationSpec {
    /// A PostgreSQL database.
    Postgres { dsn: DsnLocation },
    /// A program run without a shell, once per command.
    Shell { program: String },
    /// A file written atomically, once per command.
    Fprintf { path: PathBuf },
}

impl DestinationSpec {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DestinationSpec::Postgres { .. } => "postgres",
            DestinationSpec::Shell { .. } => "shelldb",
            DestinationSpec::Fprintf { .. } => "fprintf",
        }
    }

    /// The DSN file to watch, for a `hotload` destination.
    pub fn dsn_file(&self) -> Option<&Path> {
        match self {
            DestinationSpec::Postgres {
                dsn: DsnLocation::File(p),
            } => Some(p),
            _ => None,
        }
    }
}

/// One command as written; the templates are compiled by [`crate::template`].
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    pub command: String,
    pub args: Vec<String>,
}

/// Reads and validates a config file, then applies `--enable` / `--disable`.
///
/// Names given to `--enable`/`--disable` that the file does not have are ignored with a
/// warning, as db-controller's dsnexec ignores them.
pub fn load(path: &Path, enable: &[String], disable: &[String]) -> Result<ConfigSet> {
    load_with(path, enable, disable, true)
}

/// [`load`] without the warnings about unknown `--enable`/`--disable` names: for re-reading
/// the same file when it changes (the watcher also re-reads it periodically).
pub fn reload(path: &Path, enable: &[String], disable: &[String]) -> Result<ConfigSet> {
    load_with(path, enable, disable, false)
}

fn load_with(path: &Path, enable: &[String], disable: &[String], warn: bool) -> Result<ConfigSet> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigRead {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut set = parse(&text).map_err(|e| match e {
        Error::ConfigSyntax { reason, .. } => Error::ConfigSyntax {
            path: path.to_owned(),
            reason,
        },
        other => other,
    })?;
    for (flag, name) in select(&mut set, enable, disable) {
        if warn {
            tracing::warn!(flag, config = %name, "no config with this name; ignoring the flag");
        }
    }
    validate_enabled(&set)?;
    Ok(set)
}

/// Parses config text; disabled configs are parsed but only enabled ones must be complete.
pub fn parse(text: &str) -> Result<ConfigSet> {
    let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| Error::ConfigSyntax {
        path: PathBuf::new(),
        reason: scrub_yaml_error(&e.to_string()),
    })?;
    let mut configs = Vec::new();
    for (name, rc) in raw.configs {
        configs.push(build(&name, rc)?);
    }
    Ok(ConfigSet { configs })
}

/// Applies `--enable` then `--disable` (so disable wins, as in db-controller).
pub fn apply_flags(set: &mut ConfigSet, enable: &[String], disable: &[String]) -> Result<()> {
    for (flag, name) in select(set, enable, disable) {
        tracing::warn!(flag, config = %name, "no config with this name; ignoring the flag");
    }
    Ok(())
}

/// Applies the flags; returns the names the file does not have, with their flag.
fn select<'a>(
    set: &mut ConfigSet,
    enable: &'a [String],
    disable: &'a [String],
) -> Vec<(&'static str, &'a str)> {
    let mut unknown = Vec::new();
    for (flag, names, enabled) in [("enable", enable, true), ("disable", disable, false)] {
        for name in names {
            match set.configs.iter_mut().find(|c| &c.name == name) {
                Some(c) => c.enabled = enabled,
                None => unknown.push((flag, name.as_str())),
            }
        }
    }
    unknown
}

/// Enabled configs must have commands, a program for shelldb and a valid literal DSN.
pub fn validate_enabled(set: &ConfigSet) -> Result<()> {
    for c in set.enabled() {
        if c.commands.is_empty() {
            return Err(field(
                &c.name,
                "commands",
                "at least one command is required",
            ));
        }
        // Checked at load (and at every re-read), not only at the first run; the message
        // never quotes the string.
        if let DestinationSpec::Postgres {
            dsn: DsnLocation::Literal(text),
        } = &c.destination
        {
            dbcred::Dsn::parse(text).map_err(|e| {
                field(
                    &c.name,
                    "destination.dsn",
                    format!("invalid connection string: {e}"),
                )
            })?;
        }
        if let DestinationSpec::Shell { program } = &c.destination
            && program.is_empty()
        {
            return Err(field(
                &c.name,
                "destination.dsn",
                "the program to run is required",
            ));
        }
    }
    Ok(())
}

fn field(config: &str, field: &str, reason: impl Into<String>) -> Error {
    Error::ConfigField {
        config: config.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Turns one raw config into a validated one; errors name the config and the field.
fn build(name: &str, rc: RawConfig) -> Result<Config> {
    if name.trim().is_empty() {
        return Err(field(name, "configs", "a config needs a non-empty name"));
    }
    let mut sources = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, s) in rc.sources.iter().enumerate() {
        let driver = SourceDriver::from_name(&s.driver).ok_or_else(|| {
            field(
                name,
                &format!("sources[{i}].driver"),
                format!(
                    "unknown driver {:?} (use postgres, json, yaml or none)",
                    s.driver
                ),
            )
        })?;
        if s.filename.trim().is_empty() {
            return Err(field(
                name,
                &format!("sources[{i}].filename"),
                "a file name is required",
            ));
        }
        if !seen.insert(s.filename.clone()) {
            return Err(field(
                name,
                &format!("sources[{i}].filename"),
                format!("{:?} is listed twice", s.filename),
            ));
        }
        sources.push(Source {
            driver,
            key: s.filename.clone(),
            path: PathBuf::from(&s.filename),
        });
    }

    let dest = rc
        .destination
        .ok_or_else(|| field(name, "destination", "a destination is required"))?;
    let destination = build_destination(name, &dest)?;

    let mut commands = Vec::new();
    for (i, c) in rc.commands.into_iter().enumerate() {
        if c.command.trim().is_empty() && c.args.is_empty() {
            return Err(field(
                name,
                &format!("commands[{i}].command"),
                "the command is empty",
            ));
        }
        commands.push(CommandSpec {
            command: c.command,
            args: c.args,
        });
    }

    let is_pg = matches!(destination, DestinationSpec::Postgres { .. });
    let transaction = match rc.transaction {
        Some(true) if !is_pg => {
            return Err(field(
                name,
                "transaction",
                format!(
                    "transactions apply to postgres destinations only, not {}",
                    destination.kind()
                ),
            ));
        }
        Some(t) => t,
        None => is_pg,
    };
    let dur = |v: &Option<DurationText>, f: &str, default: Duration| -> Result<Duration> {
        match v {
            None => Ok(default),
            Some(d) => d.parse().map_err(|e| field(name, f, e)),
        }
    };
    let timeout = dur(&rc.timeout, "timeout", DEFAULT_TIMEOUT)?;
    if timeout.is_zero() {
        return Err(field(name, "timeout", "must be greater than zero"));
    }
    let debounce = dur(&rc.debounce, "debounce", DEFAULT_DEBOUNCE)?;
    let (initial, max) = match &rc.retry {
        None => (DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX),
        Some(r) => (
            dur(&r.initial, "retry.initial", DEFAULT_RETRY_INITIAL)?,
            dur(&r.max, "retry.max", DEFAULT_RETRY_MAX)?,
        ),
    };
    if initial.is_zero() {
        return Err(field(name, "retry.initial", "must be greater than zero"));
    }
    if max < initial {
        return Err(field(
            name,
            "retry.max",
            "must not be smaller than retry.initial",
        ));
    }

    Ok(Config {
        name: name.to_owned(),
        enabled: !rc.disabled,
        sources,
        destination,
        commands,
        transaction,
        timeout,
        debounce,
        retry: RetryPolicy { initial, max },
    })
}

/// Reads `destination{driver, dsn}` the way db-controller's dsnexec understands it.
fn build_destination(name: &str, d: &RawDestination) -> Result<DestinationSpec> {
    match d.driver.as_str() {
        "postgres" | "postgresql" | "pgx" => {
            if d.dsn.trim().is_empty() {
                return Err(field(
                    name,
                    "destination.dsn",
                    "a connection string is required",
                ));
            }
            if d.dsn.starts_with("fsnotify://") {
                return Ok(DestinationSpec::Postgres {
                    dsn: DsnLocation::File(hotload_path(name, &d.dsn)?),
                });
            }
            Ok(DestinationSpec::Postgres {
                dsn: DsnLocation::Literal(d.dsn.clone()),
            })
        }
        "hotload" => Ok(DestinationSpec::Postgres {
            dsn: DsnLocation::File(hotload_path(name, &d.dsn)?),
        }),
        "shelldb" | "shell" => Ok(DestinationSpec::Shell {
            program: d.dsn.trim().to_owned(),
        }),
        "fprintf" => Ok(DestinationSpec::Fprintf {
            path: fprintf_path(name, &d.dsn)?,
        }),
        other => Err(field(
            name,
            "destination.driver",
            format!("unknown driver {other:?} (use postgres, hotload, shelldb or fprintf)"),
        )),
    }
}

/// `fsnotify://postgres/path/to/file[?options]` -> `/path/to/file` (hotload's form).
fn hotload_path(name: &str, dsn: &str) -> Result<PathBuf> {
    let rest = dsn.strip_prefix("fsnotify://").ok_or_else(|| {
        field(
            name,
            "destination.dsn",
            "a hotload DSN has the form fsnotify://postgres/path/to/dsn-file",
        )
    })?;
    let rest = rest.split('?').next().unwrap_or_default();
    let (driver, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !matches!(driver, "postgres" | "postgresql" | "pgx") {
        return Err(field(
            name,
            "destination.dsn",
            format!("hotload driver {driver:?} is not supported (use fsnotify://postgres/...)"),
        ));
    }
    if path.len() <= 1 {
        return Err(field(
            name,
            "destination.dsn",
            "the hotload DSN names no file (fsnotify://postgres/path/to/dsn-file)",
        ));
    }
    Ok(PathBuf::from(decode_path(path)))
}

/// `file://[fprintf]/path` -> the path; `/$tmp/name` means `name` in the temp directory.
fn fprintf_path(name: &str, dsn: &str) -> Result<PathBuf> {
    let rest = dsn.trim().strip_prefix("file://").ok_or_else(|| {
        field(
            name,
            "destination.dsn",
            "an fprintf destination has the form file:///path/to/file (or file:///$tmp/name)",
        )
    })?;
    let (templater, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !matches!(templater, "" | "fprintf") {
        return Err(field(
            name,
            "destination.dsn",
            format!(
                "fprintf templater {templater:?} is not supported (leave it empty or use fprintf)"
            ),
        ));
    }
    let path = decode_path(path);
    if let Some(file) = path.strip_prefix("/$tmp/") {
        if file.is_empty() || file.contains('/') {
            return Err(field(
                name,
                "destination.dsn",
                "file:///$tmp/NAME needs a plain file name",
            ));
        }
        return Ok(std::env::temp_dir().join(file));
    }
    if path.len() <= 1 || path.ends_with('/') {
        return Err(field(name, "destination.dsn", "the file name is missing"));
    }
    Ok(PathBuf::from(path))
}

fn decode_path(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

/// YAML errors may quote a scalar of the file (which can be a DSN with a password): every
/// double-quoted part is replaced.
fn scrub_yaml_error(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for ch in msg.chars() {
        if ch == '"' {
            if inside {
                out.push_str("\"...\"");
            }
            inside = !inside;
            continue;
        }
        if !inside {
            out.push(ch);
        }
    }
    if inside {
        out.push_str("\"...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
configs:
  sql:
    disabled: false
    sources:
    - driver: postgres
      filename: /var/run/db-dsn/dsn.txt
    destination:
      driver: postgres
      dsn: "postgres://local:pw@localhost:5432/app?sslmode=disable"
    commands:
    - command: |-
        ALTER USER MAPPING FOR app SERVER remote
          OPTIONS (SET password '{{ index . "/var/run/db-dsn/dsn.txt" "password" }}');
  files:
    disabled: true
    sources:
    - filename: /x
    destination:
      driver: fprintf
      dsn: file:///$tmp/out.json
    commands:
    - command: "%s"
      args: ['{{ index . "/x" "raw_dsn" }}']
"#;

    #[test]
    fn db_controller_example_parses_with_defaults() {
        let set = parse(EXAMPLE).unwrap();
        assert_eq!(set.configs.len(), 2);
        let files = &set.configs[0];
        assert_eq!(files.name, "files");
        assert!(!files.enabled);
        assert!(
            !files.transaction,
            "non-postgres destinations run no transaction"
        );
        assert_eq!(
            files.destination,
            DestinationSpec::Fprintf {
                path: std::env::temp_dir().join("out.json")
            }
        );
        assert_eq!(files.sources[0].driver, SourceDriver::None);
        let sql = &set.configs[1];
        assert!(sql.enabled);
        assert!(
            sql.transaction,
            "postgres defaults to one transaction per run"
        );
        assert_eq!(sql.timeout, DEFAULT_TIMEOUT);
        assert_eq!(sql.retry.initial, DEFAULT_RETRY_INITIAL);
        assert_eq!(sql.sources[0].key, "/var/run/db-dsn/dsn.txt");
        assert_eq!(sql.commands.len(), 1);
    }

    #[test]
    fn flags_enable_then_disable() {
        let mut set = parse(EXAMPLE).unwrap();
        apply_flags(&mut set, &["files".into()], &[]).unwrap();
        assert_eq!(set.enabled().count(), 2);
        apply_flags(&mut set, &["sql".into()], &["sql".into(), "nope".into()]).unwrap();
        let names: Vec<_> = set.enabled().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["files"]);
    }

    #[test]
    fn hotload_destination_reads_the_file_path() {
        for (driver, dsn) in [
            ("hotload", "fsnotify://postgres/var/run/dsn/uri_dsn.txt"),
            (
                "postgres",
                "fsnotify://postgres/var/run/dsn/uri_dsn.txt?forceKill=true",
            ),
        ] {
            let text = format!(
                "configs:\n  a:\n    destination: {{driver: {driver}, dsn: \"{dsn}\"}}\n    commands: [{{command: select 1}}]\n"
            );
            let set = parse(&text).unwrap();
            assert_eq!(
                set.configs[0].destination.dsn_file(),
                Some(Path::new("/var/run/dsn/uri_dsn.txt"))
            );
        }
    }

    #[test]
    fn our_settings_parse() {
        let text = "configs:\n  a:\n    destination: {driver: postgres, dsn: \"host=x\"}\n    commands: [{command: select 1}]\n    transaction: false\n    timeout: 1500ms\n    debounce: 2\n    retry: {initial: 2s, max: 1m}\n";
        let c = &parse(text).unwrap().configs[0];
        assert!(!c.transaction);
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.debounce, Duration::from_secs(2));
        assert_eq!(
            c.retry,
            RetryPolicy {
                initial: Duration::from_secs(2),
                max: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn errors_name_config_and_field() {
        let cases = [
            (
                "configs:\n  a:\n    sources: [{driver: mysql, filename: /x}]\n    destination: {driver: postgres, dsn: x}\n    commands: [{command: x}]\n",
                "config \"a\": sources[0].driver",
            ),
            (
                "configs:\n  b:\n    sources: [{driver: json}]\n    destination: {driver: postgres, dsn: x}\n    commands: [{command: x}]\n",
                "config \"b\": sources[0].filename",
            ),
            (
                "configs:\n  c:\n    destination: {driver: oracle, dsn: x}\n    commands: [{command: x}]\n",
                "config \"c\": destination.driver",
            ),
            (
                "configs:\n  d:\n    commands: [{command: x}]\n",
                "config \"d\": destination",
            ),
            (
                "configs:\n  e:\n    destination: {driver: postgres, dsn: x}\n    commands: [{command: x}]\n    timeout: 3 weeks\n",
                "config \"e\": timeout",
            ),
            (
                "configs:\n  f:\n    destination: {driver: shelldb, dsn: /bin/true}\n    commands: [{command: x}]\n    transaction: true\n",
                "config \"f\": transaction",
            ),
            (
                "configs:\n  g:\n    destination: {driver: fprintf, dsn: \"s3://bucket/x\"}\n    commands: [{command: x}]\n",
                "config \"g\": destination.dsn",
            ),
            (
                "configs:\n  h:\n    destination: {driver: postgres, dsn: x}\n    commands: [{command: \"\"}]\n",
                "config \"h\": commands[0].command",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
        let mut set =
            parse("configs:\n  z:\n    destination: {driver: postgres, dsn: x}\n").unwrap();
        apply_flags(&mut set, &[], &[]).unwrap();
        let err = validate_enabled(&set).unwrap_err().to_string();
        assert!(err.starts_with("config \"z\": commands"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let err = parse("configs:\n  a:\n    transacton: false\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("transacton"), "{err}");
    }

    #[test]
    fn yaml_errors_do_not_quote_values() {
        let err = parse("configs:\n  a:\n    disabled: \"postgres://u:s3cret@h/db\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("disabled"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
