//! Where rendered commands go: a PostgreSQL database, a program, or a file.

pub mod fprintf;
pub mod postgres;
pub mod shelldb;

use crate::config::{Config, DestinationSpec, DsnLocation};
use crate::error::{Error, Result};
use crate::source;
use crate::template::{Arg, Redactor};

/// One command after rendering: its text and, if the config gave args, the cast args.
pub struct RenderedCommand {
    /// Position in the config's `commands` list (0-based, as in `commands[0]`).
    pub index: usize,
    pub command: String,
    /// `None` when the config gave no args (SQL then goes through the simple protocol).
    pub args: Option<Vec<Arg>>,
}

impl std::fmt::Debug for RenderedCommand {
    /// The text may hold secrets: only the shape is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedCommand")
            .field("index", &self.index)
            .field("args", &self.args.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

/// Runs one run's commands at the config's destination. `dsn_file_text` is the hotload DSN
/// file as the run read it (read here when not given).
pub async fn execute(
    config: &Config,
    dsn_file_text: Option<&str>,
    commands: &[RenderedCommand],
    redactor: &mut Redactor,
) -> Result<()> {
    match &config.destination {
        DestinationSpec::Postgres { dsn } => {
            let text = match (dsn, dsn_file_text) {
                (DsnLocation::Literal(t), _) => t.clone(),
                (DsnLocation::File(_), Some(t)) => t.to_owned(),
                (DsnLocation::File(path), None) => {
                    source::read_text(path).map_err(|e| Error::Destination {
                        config: config.name.clone(),
                        reason: e.to_string(),
                    })?
                }
            };
            postgres::execute(config, &text, commands, redactor).await
        }
        DestinationSpec::Shell { program } => shelldb::execute(config, program, commands).await,
        DestinationSpec::Fprintf { path } => fprintf::execute(config, path, commands).await,
    }
}
