//! The one error type of dsnexec; no message ever carries a source value, a password or rendered SQL.

use std::path::PathBuf;

/// Everything that can go wrong while loading a config or running it.
///
/// Messages name the config, the command index, the file and the key involved, so a user
/// can act on them, but never the content of a source file or the rendered text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    ConfigRead { path: PathBuf, reason: String },

    /// The config file is not valid YAML for the schema.
    #[error("config file {path} is invalid: {reason}")]
    ConfigSyntax { path: PathBuf, reason: String },

    /// One field of one config is wrong.
    #[error("config {config:?}: {field}: {reason}")]
    ConfigField {
        config: String,
        field: String,
        reason: String,
    },

    /// `--enable`/`--disable` named a config the file does not have.
    #[error("--{flag} {name:?}: no config with that name (configs: {known})")]
    UnknownConfigName {
        flag: &'static str,
        name: String,
        known: String,
    },

    /// A source file could not be read.
    #[error("source {path}: cannot read: {reason}")]
    SourceRead { path: PathBuf, reason: String },

    /// A source file did not parse with its driver. The reason never quotes the content.
    #[error("source {path} ({driver}): {reason}")]
    SourceParse {
        path: PathBuf,
        driver: &'static str,
        reason: String,
    },

    /// A template failed to render (missing key, bad function call, ...).
    #[error("config {config:?}: {template}: {reason}")]
    Render {
        config: String,
        template: String,
        reason: String,
    },

    /// A rendered argument had a cast prefix (`int64:`...) whose number did not parse.
    #[error("config {config:?}: commands[{command}].args[{arg}]: {reason}")]
    Cast {
        config: String,
        command: usize,
        arg: usize,
        reason: String,
    },

    /// The destination could not be reached or opened.
    #[error("config {config:?}: destination: {reason}")]
    Destination { config: String, reason: String },

    /// One command failed at the destination.
    #[error("config {config:?}: commands[{command}]: {reason}")]
    Command {
        config: String,
        command: usize,
        reason: String,
    },

    /// One command (or the connection) took longer than the config's timeout.
    #[error("config {config:?}: {what} timed out after {seconds:.1} s")]
    Timeout {
        config: String,
        what: String,
        seconds: f64,
    },

    /// The ops listener could not start.
    #[error("ops listener {addr}: {reason}")]
    Ops { addr: String, reason: String },
}

/// Result with dsnexec's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
