//! `shelldb` destination: runs a program (no shell) once per command, with a timeout.
//!
//! As in db-controller's dsnexec, the destination's `dsn` names the program (looked up in
//! `PATH`); a command without args runs `program COMMAND` (the rendered command is the one
//! argument), a command with args runs `program ARG...` (the command text is not passed). No
//! shell parses anything, so a value cannot inject a second command. The program's standard
//! output and error are discarded, as in the reference: they could echo a secret into our logs.

use std::process::Stdio;

use tokio::process::Command;

use crate::config::Config;
use crate::destination::RenderedCommand;
use crate::error::{Error, Result};

/// Runs every command in order; the first failure stops the run.
pub async fn execute(config: &Config, program: &str, commands: &[RenderedCommand]) -> Result<()> {
    for c in commands {
        let argv: Vec<String> = match &c.args {
            None => vec![c.command.clone()],
            Some(args) => args.iter().map(|a| a.as_text().into_owned()).collect(),
        };
        let fail = |reason: String| Error::Command {
            config: config.name.clone(),
            command: c.index,
            reason,
        };
        let mut child = Command::new(program)
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot run {program:?}: {e}")))?;
        match tokio::time::timeout(config.timeout, child.wait()).await {
            Err(_) => {
                let _ = child.kill().await;
                return Err(Error::Timeout {
                    config: config.name.clone(),
                    what: format!("commands[{}] ({program})", c.index),
                    seconds: config.timeout.as_secs_f64(),
                });
            }
            Ok(Err(e)) => return Err(fail(format!("waiting for {program:?}: {e}"))),
            Ok(Ok(status)) if !status.success() => {
                return Err(fail(format!("{program:?} failed: {status}")));
            }
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}
