//! Errors a user can act on; none of them ever carries a password or raw DSN text.

/// Why a DSN could not be parsed or read. Messages name the problem, the keyword and a byte
/// offset into the text; they never contain a value (any value could be, or contain, a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DsnError {
    /// Nothing but whitespace.
    #[error("connection string is empty")]
    Empty,
    /// libpq stops at a NUL byte; we refuse rather than silently truncate.
    #[error("connection string contains a NUL byte at byte {offset}")]
    NulByte { offset: usize },
    /// `scheme://...` with a scheme other than `postgres` / `postgresql`. The scheme is
    /// withheld (`None`) unless it is plain lower-case letters, like `mysql`.
    #[error("{}", unsupported_scheme_message(.scheme.as_deref()))]
    UnsupportedScheme { scheme: Option<String> },
    /// key=value form: a keyword not followed by `=`.
    #[error(
        "missing \"=\" after the keyword starting at byte {offset} of the connection string \
         (a value containing spaces must be single-quoted)"
    )]
    MissingEquals { offset: usize },
    /// key=value form: `'` without its closing `'`.
    #[error("unterminated quoted value starting at byte {offset} of the connection string")]
    UnterminatedQuote { offset: usize },
    /// A keyword libpq does not know. `keyword` is `None` when it was withheld because it might
    /// be a fragment of a secret (it does not look like a keyword name, or directly follows an
    /// unquoted password).
    #[error("{}", unknown_keyword_message(.keyword.as_deref(), *.offset))]
    UnknownKeyword {
        keyword: Option<String>,
        offset: Option<usize>,
    },
    /// URI form: `%` not followed by two hex digits, `%00`, or bytes that are not UTF-8.
    #[error("invalid percent-encoding in the URI {part} at byte {offset}: {problem}")]
    BadPercentEncoding {
        part: &'static str,
        offset: usize,
        problem: &'static str,
    },
    /// URI form: structural problem (unclosed `[`, query parameter without `=`, ...).
    #[error("malformed URI at byte {offset}: {problem}")]
    MalformedUri {
        offset: usize,
        problem: &'static str,
    },
    /// A value libpq would reject. `problem` never contains the value.
    #[error("invalid value for {keyword}: {problem}")]
    InvalidValue {
        keyword: &'static str,
        problem: String,
    },
    /// The port list has neither one entry nor one per host.
    #[error(
        "could not match {ports} port numbers to {hosts} hosts: give one port for all hosts or one per host"
    )]
    PortCount { ports: usize, hosts: usize },
    /// `host` and `hostaddr` lists of different lengths.
    #[error("could not match {hosts} host names to {hostaddrs} hostaddr values")]
    HostaddrCount { hosts: usize, hostaddrs: usize },
    /// A required one-file-per-key Secret file is absent.
    #[error("required file \"{file}\" is missing from the Secret directory {dir}")]
    SecretFileMissing { dir: String, file: &'static str },
    /// A Secret file exists but cannot be used (unreadable, not UTF-8, empty, too large).
    #[error("cannot use \"{file}\" in the Secret directory {dir}: {problem}")]
    SecretFileUnusable {
        dir: String,
        file: &'static str,
        problem: String,
    },
    /// A Secret file's content is not a valid value for its keyword.
    #[error("Secret file \"{file}\": {cause}")]
    SecretFileValue {
        file: &'static str,
        cause: Box<DsnError>,
    },
}

fn unknown_keyword_message(keyword: Option<&str>, offset: Option<usize>) -> String {
    let at = offset.map_or(String::new(), |o| format!(" at byte {o}"));
    match keyword {
        Some(k) if k.bytes().any(|b| b.is_ascii_uppercase()) => format!(
            "invalid connection option \"{k}\"{at}: not a libpq keyword (keywords are lower case)"
        ),
        Some(k) => format!("invalid connection option \"{k}\"{at}: not a libpq keyword"),
        None => format!(
            "invalid connection option{at}: not a libpq keyword (name not shown: it may be part \
             of a secret; check the quoting of the value before it)"
        ),
    }
}

fn unsupported_scheme_message(scheme: Option<&str>) -> String {
    match scheme {
        Some(s) => format!("unsupported URI scheme \"{s}\": use postgres:// or postgresql://"),
        None => "unsupported URI scheme: use postgres:// or postgresql://".into(),
    }
}
