//! db-controller's one-file-per-key Secret layout: `hostname`, `port`, `database`, `username`,
//! `password`, `sslmode`, each a file in the mounted Secret directory.
//!
//! Rules:
//! - `hostname`, `database`, `username` and `password` are required; `port` defaults to 5432
//!   and `sslmode` to libpq's default when their file is absent.
//! - Every value but the password has surrounding whitespace trimmed. The password is kept
//!   byte for byte except for one trailing `\n` (or `\r\n`), which editors and
//!   `kubectl create secret --from-file` add; db-controller itself writes no newline. A
//!   password that really ends with a newline therefore needs a second one.
//! - When the directory is a kubelet Secret volume (it has `..data`), every file is read
//!   through the resolved `..data` directory, so one call never mixes two Secret versions.
//! - Values go through the same checks as a parsed DSN (`port` range, `sslmode` values).

use std::fs;
use std::io::Read;
use std::path::Path;

use super::Dsn;
use crate::DsnError;

/// Files larger than this are refused (a 2 kB IAM token fits many times over).
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// (file name, libpq keyword, required)
const FILES: &[(&str, &str, bool)] = &[
    ("hostname", "host", true),
    ("port", "port", false),
    ("database", "dbname", true),
    ("username", "user", true),
    ("password", "password", true),
    ("sslmode", "sslmode", false),
];

pub(super) fn read(dir: &Path) -> Result<Dsn, DsnError> {
    let shown = dir.display().to_string();
    // One generation of a kubelet atomic-writer volume: resolve `..data` once.
    let data = dir.join("..data");
    let base = match fs::canonicalize(&data) {
        Ok(resolved) if resolved.is_dir() => resolved,
        _ => dir.to_path_buf(),
    };
    let mut dsn = Dsn::default();
    for &(file, keyword, required) in FILES {
        let unusable = |problem: String| DsnError::SecretFileUnusable {
            dir: shown.clone(),
            file,
            problem,
        };
        let bytes = match read_limited(&base.join(file)) {
            Ok(Some(b)) => b,
            Ok(None) if required => {
                return Err(DsnError::SecretFileMissing {
                    dir: shown.clone(),
                    file,
                });
            }
            Ok(None) => continue,
            Err(problem) => return Err(unusable(problem)),
        };
        let text = String::from_utf8(bytes).map_err(|_| unusable("not valid UTF-8".into()))?;
        let value = if keyword == "password" {
            let t = text.strip_suffix('\n').unwrap_or(&text);
            t.strip_suffix('\r').unwrap_or(t).to_string()
        } else {
            let t = text.trim();
            if t.is_empty() {
                return Err(unusable("the file is empty".into()));
            }
            t.to_string()
        };
        dsn = dsn
            .with_param(keyword, &value)
            .map_err(|cause| DsnError::SecretFileValue {
                file,
                cause: Box::new(cause),
            })?;
    }
    Ok(dsn)
}

/// The file's bytes, `None` if it does not exist, or a description of why it cannot be read
/// (never its content).
fn read_limited(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {}", e.kind())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {}", e.kind()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(Some(bytes))
}
