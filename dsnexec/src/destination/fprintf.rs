//! `fprintf` destination: writes a file atomically (temp file in the same directory, mode
//! 0600, fsync, rename), once per command.
//!
//! As in db-controller's dsnexec, the command is a Go-style format string and the args its
//! operands (`%s`, `%v`, `%d`, `%q`, `%%`). Unlike the reference, a command without args is
//! written as is, so a `%` inside a rendered secret is never taken for a verb; and a verb
//! without an operand (or an operand without a verb) is an error rather than `%!s(MISSING)`
//! text in the file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::destination::RenderedCommand;
use crate::error::{Error, Result};

/// Writes the file once per command (the last command's text is what stays).
pub async fn execute(config: &Config, path: &Path, commands: &[RenderedCommand]) -> Result<()> {
    for c in commands {
        let content = match &c.args {
            None => c.command.clone(),
            Some(args) => {
                let texts: Vec<String> = args.iter().map(|a| a.as_text().into_owned()).collect();
                go_sprintf(&c.command, &texts).map_err(|reason| Error::Command {
                    config: config.name.clone(),
                    command: c.index,
                    reason,
                })?
            }
        };
        let target = path.to_owned();
        let written =
            tokio::task::spawn_blocking(move || write_atomic(&target, content.as_bytes()));
        let outcome = tokio::time::timeout(config.timeout, written).await;
        let fail = |reason: String| Error::Command {
            config: config.name.clone(),
            command: c.index,
            reason,
        };
        match outcome {
            Err(_) => {
                return Err(Error::Timeout {
                    config: config.name.clone(),
                    what: format!("writing {}", path.display()),
                    seconds: config.timeout.as_secs_f64(),
                });
            }
            Ok(Err(join)) => return Err(fail(format!("writer task failed: {join}"))),
            Ok(Ok(Err(e))) => return Err(fail(format!("writing {}: {e}", path.display()))),
            Ok(Ok(Ok(()))) => {}
        }
    }
    Ok(())
}

/// Replaces `path` with `content` so a reader sees the old or the new file, never a part.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{name}.dsnexec-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Go's `fmt.Sprintf` for the verbs configs use, with every operand a string.
/// Errors never contain an operand.
pub fn go_sprintf(format: &str, args: &[String]) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(format.len() + args.iter().map(String::len).sum::<usize>());
    let mut next = 0;
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let verb = chars
            .next()
            .ok_or_else(|| "the format ends with a lone %".to_owned())?;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let arg = args
            .get(next)
            .ok_or_else(|| format!("verb %{verb} number {} has no argument", next + 1))?;
        next += 1;
        match verb {
            's' | 'v' => out.push_str(arg),
            'd' => {
                if arg.parse::<i64>().is_err() {
                    return Err(format!("argument {next} for %d is not an integer"));
                }
                out.push_str(arg);
            }
            'q' => out.push_str(&serde_json::Value::String(arg.clone()).to_string()),
            other => {
                return Err(format!(
                    "unsupported verb %{other} (use %s, %v, %d, %q or %%)"
                ));
            }
        }
    }
    if next != args.len() {
        return Err(format!(
            "{} argument(s) given but the format uses {next}",
            args.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sprintf_verbs() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            go_sprintf("%s=%d %q 100%%", &a(&["k", "5", "x\"y"])).unwrap(),
            "k=5 \"x\\\"y\" 100%"
        );
        assert!(go_sprintf("%s %s", &a(&["only"])).is_err());
        let err = go_sprintf("%s", &a(&["a", "secret-extra"])).unwrap_err();
        assert!(!err.contains("secret-extra"));
        let err = go_sprintf("%d", &a(&["secret-nan"])).unwrap_err();
        assert!(!err.contains("secret-nan"));
        assert!(go_sprintf("%x", &a(&["1"])).is_err());
    }

    #[test]
    fn atomic_write_mode_and_replace() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp file left behind");
    }
}
