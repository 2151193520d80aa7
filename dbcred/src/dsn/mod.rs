//! libpq connection strings (key=value and URI forms) and db-controller's one-file-per-key Secret.
//!
//! Parsing follows libpq (`fe-connect.c`) so a DSN that works with `psql` means the same here:
//! the same keywords, quoting, escapes, percent-decoding, last-one-wins duplicates and
//! host/hostaddr/port list pairing. Differences, all deliberate:
//!
//! - surrounding whitespace of a URI is ignored (Secret files often end with a newline); in the
//!   key=value form libpq already skips it;
//! - the scheme is matched case-insensitively, another `scheme://` is a clear error, and a NUL
//!   byte is refused instead of truncating;
//! - values libpq only checks when connecting (ports, `sslmode`, integers, enumerations,
//!   `hostaddr`, list lengths) are checked at parse time, so a bad Secret is rejected before it
//!   replaces a good one;
//! - with no host at all, [`Dsn::hosts`] gives `localhost:5432` over TCP (libpq would use a
//!   Unix socket): the proxy sidecar never has a server socket in its pod;
//! - `requiressl` is translated to `sslmode` (`1` → `require`, else `prefer`) as libpq does.
//!
//! Errors and `Debug`/`Display` never show a value of a secret keyword; errors show no value
//! at all, only keyword names and byte offsets.

mod keyvalue;
mod keywords;
mod secret_dir;
mod uri;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::DsnError;

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn from_libpq(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one host entry points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    /// Host name or IP literal (IPv6 without brackets).
    Tcp(String),
    /// Unix-socket directory (a host starting with `/` or `@`).
    Unix(PathBuf),
}

/// One entry of the DSN's host list, after applying libpq's host/hostaddr/port pairing rules.
/// Connect to `hostaddr` when it is set (libpq then uses `host` only for TLS and the password
/// file); an entry with only a `hostaddr` has that address as its `Tcp` host too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHost {
    pub host: HostKind,
    /// `hostaddr` for this entry, if given (skips DNS).
    pub hostaddr: Option<String>,
    pub port: u16,
}

/// One keyword/value pair as a parser found it, before the keyword list and values are checked.
pub(crate) struct RawParam {
    keyword: String,
    value: String,
    /// Byte offset of the keyword in the input.
    offset: usize,
    /// The keyword must not appear in errors (it may be a fragment of a secret).
    withhold_name: bool,
}

/// Port used when none is given, as in libpq.
pub const DEFAULT_PORT: u16 = 5432;
/// Host used when none is given (libpq would use a Unix socket; see the module docs).
pub const DEFAULT_HOST: &str = "localhost";

/// A parsed connection string. Holds every keyword given, canonicalised to libpq names
/// (`user`, `password`, `dbname`, `host`, `port`, `sslmode`, ...), at most once each, in
/// libpq's keyword order, so equal DSNs compare equal. `Debug` and `Display` never show the
/// password (nor `sslpassword`, `oauth_client_secret`, `scram_*_key`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Dsn {
    params: Vec<(String, String)>,
}

impl Dsn {
    /// Parses either form: a `postgres://` / `postgresql://` URI or libpq key=value text.
    /// Surrounding whitespace (a trailing newline in a Secret file) is ignored.
    pub fn parse(text: &str) -> Result<Dsn, DsnError> {
        if let Some(offset) = text.bytes().position(|b| b == 0) {
            return Err(DsnError::NulByte { offset });
        }
        let trimmed = text.trim_start_matches(is_space_char);
        let base = text.len() - trimmed.len();
        if trimmed.is_empty() {
            return Err(DsnError::Empty);
        }
        let raw = match uri_scheme(trimmed) {
            Some(scheme) => {
                let prefix_len = scheme.len() + 3;
                if !scheme.eq_ignore_ascii_case("postgres")
                    && !scheme.eq_ignore_ascii_case("postgresql")
                {
                    let plain = scheme
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || matches!(b, b'+' | b'-' | b'.'));
                    return Err(DsnError::UnsupportedScheme {
                        scheme: plain.then(|| scheme.to_string()),
                    });
                }
                uri::parse(trimmed.trim_end_matches(is_space_char), prefix_len, base)?
            }
            // The key=value parser skips whitespace itself; not trimming the end keeps an
            // escaped trailing space (`password=a\ `) exactly as libpq reads it.
            None => keyvalue::parse(text)?,
        };
        let mut dsn = Dsn::default();
        for p in raw {
            dsn.store(p)?;
        }
        dsn.validate()?;
        Ok(dsn)
    }

    /// Reads db-controller's one-file-per-key layout (`hostname`, `port`, `database`,
    /// `username`, `password`, `sslmode`) from a directory. `hostname`, `database`,
    /// `username` and `password` are required; `port` defaults to 5432 and `sslmode` to
    /// libpq's default. Values are trimmed, except the password, which loses only one trailing
    /// `\n` (or `\r\n`). In a kubelet volume all files come from one `..data` generation.
    /// `uri_dsn.txt` / `dsn.txt` in the same directory are ignored: the caller chooses the
    /// source.
    pub fn from_secret_dir(dir: &Path) -> Result<Dsn, DsnError> {
        secret_dir::read(dir)
    }

    /// Value of a libpq keyword, if set (last one wins).
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// Every keyword and value, including the password: never log this.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }
    /// The password as given; `Some("")` for `password=''` (libpq then treats it as unset and
    /// consults the password file).
    pub fn password(&self) -> Option<&str> {
        self.get("password")
    }
    pub fn dbname(&self) -> Option<&str> {
        self.get("dbname")
    }

    /// `sslmode`, defaulting like libpq: `verify-full` when `sslrootcert=system`, else `prefer`.
    pub fn sslmode(&self) -> SslMode {
        match self.get("sslmode").and_then(SslMode::from_libpq) {
            Some(mode) => mode,
            None if self.get("sslrootcert") == Some("system") => SslMode::VerifyFull,
            None => SslMode::Prefer,
        }
    }

    /// `connect_timeout` as libpq reads it (values below 2 s count as 2 s; 0 or absent = none).
    pub fn connect_timeout(&self) -> Option<Duration> {
        let secs = keywords::parse_int(self.get("connect_timeout")?)?;
        (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
    }

    /// Hosts in the order libpq tries them; defaults to `localhost:5432` like libpq.
    ///
    /// The entry count is that of `hostaddr` if given, else of `host`, else 1; `port` has one
    /// entry for all hosts or one per host (checked when parsing); an empty entry in any list
    /// takes the default.
    pub fn hosts(&self) -> Vec<TargetHost> {
        let list = |k: &str| -> Option<Vec<&str>> {
            self.get(k)
                .filter(|v| !v.is_empty())
                .map(|v| v.split(',').collect())
        };
        let hostaddrs = list("hostaddr");
        let hosts = list("host");
        let ports = list("port");
        let count = hostaddrs.as_ref().or(hosts.as_ref()).map_or(1, |l| l.len());
        let entry = |l: &Option<Vec<&str>>, i: usize| -> Option<String> {
            l.as_ref()
                .and_then(|l| l.get(i))
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string())
        };
        (0..count)
            .map(|i| {
                let hostaddr = entry(&hostaddrs, i);
                let host = match entry(&hosts, i) {
                    Some(h) if h.starts_with('/') || h.starts_with('@') => {
                        HostKind::Unix(PathBuf::from(h))
                    }
                    Some(h) => HostKind::Tcp(h),
                    None => HostKind::Tcp(hostaddr.clone().unwrap_or_else(|| DEFAULT_HOST.into())),
                };
                let port_text = match &ports {
                    Some(p) if p.len() == 1 => entry(&ports, 0),
                    _ => entry(&ports, i),
                };
                // Validated when parsing; fall back to the default rather than panic.
                let port = port_text
                    .and_then(|p| keywords::parse_int(&p))
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .unwrap_or(DEFAULT_PORT);
                TargetHost {
                    host,
                    hostaddr,
                    port,
                }
            })
            .collect()
    }

    /// Sets (or overrides) one libpq keyword, with the same checks as parsing. `requiressl` is
    /// translated to `sslmode` like libpq does.
    pub fn with_param(mut self, keyword: &str, value: &str) -> Result<Dsn, DsnError> {
        self.store(RawParam {
            keyword: keyword.to_string(),
            value: value.to_string(),
            offset: 0,
            withhold_name: false,
        })
        .map_err(|e| match e {
            DsnError::UnknownKeyword { keyword, .. } => DsnError::UnknownKeyword {
                keyword,
                offset: None,
            },
            e => e,
        })?;
        self.validate()?;
        Ok(self)
    }

    /// Removes one keyword (for instance one a client library does not understand).
    pub fn without_param(mut self, keyword: &str) -> Dsn {
        self.params.retain(|(k, _)| k != keyword);
        self
    }

    /// The whole DSN as a libpq key=value string, **including the password** (hence the name):
    /// for building client configurations (`tokio_postgres::Config::from_str`, `psql`), never
    /// for logs. Values are single-quoted with `\` and `'` escaped when needed, so
    /// `Dsn::parse(&d.expose_key_value_string()) == Ok(d)`.
    ///
    /// Client libraries accept fewer keywords than libpq (tokio-postgres 0.7 rejects unknown
    /// ones such as `sslrootcert`, and `sslmode=verify-*`): use
    /// [`Dsn::expose_key_value_string_with`] or [`Dsn::without_param`] to leave those out.
    pub fn expose_key_value_string(&self) -> String {
        self.expose_key_value_string_with(|_| true)
    }

    /// [`Dsn::expose_key_value_string`] limited to the keywords `keep` accepts; **includes the
    /// password** if `keep("password")`.
    pub fn expose_key_value_string_with(&self, keep: impl Fn(&str) -> bool) -> String {
        let mut out = String::new();
        for (k, v) in self.params.iter().filter(|(k, _)| keep(k)) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(k);
            out.push('=');
            push_quoted(&mut out, v);
        }
        out
    }

    /// The libpq keyword/value store step (`conninfo_storeval`): alias, lookup, last one wins.
    fn store(&mut self, p: RawParam) -> Result<(), DsnError> {
        let (keyword, value) = if p.keyword == "requiressl" {
            let v = if p.value.starts_with('1') {
                "require"
            } else {
                "prefer"
            };
            ("sslmode".to_string(), v.to_string())
        } else {
            (p.keyword, p.value)
        };
        let Some(index) = keywords::index_of(&keyword) else {
            let shown = (!p.withhold_name && looks_like_keyword(&keyword)).then_some(keyword);
            return Err(DsnError::UnknownKeyword {
                keyword: shown,
                offset: Some(p.offset),
            });
        };
        match self.params.iter_mut().find(|(k, _)| *k == keyword) {
            Some(slot) => slot.1 = value,
            None => {
                let at = self
                    .params
                    .iter()
                    .position(|(k, _)| keywords::index_of(k).is_some_and(|j| j > index))
                    .unwrap_or(self.params.len());
                self.params.insert(at, (keyword, value));
            }
        }
        Ok(())
    }

    /// Checks the final values and the list pairing, as libpq does before connecting.
    fn validate(&self) -> Result<(), DsnError> {
        for (k, v) in &self.params {
            if let Some(k) = keywords::canonical(k) {
                keywords::validate(k, v)?;
            }
        }
        let count = |k: &str| {
            self.get(k)
                .filter(|v| !v.is_empty())
                .map(|v| v.split(',').count())
        };
        let hostaddrs = count("hostaddr");
        let hosts = count("host");
        if let (Some(h), Some(a)) = (hosts, hostaddrs)
            && h != a
        {
            return Err(DsnError::HostaddrCount {
                hosts: h,
                hostaddrs: a,
            });
        }
        let entries = hostaddrs.or(hosts).unwrap_or(1);
        if let Some(ports) = count("port")
            && ports != 1
            && ports != entries
        {
            return Err(DsnError::PortCount {
                ports,
                hosts: entries,
            });
        }
        if self.get("sslrootcert") == Some("system")
            && let Some(mode) = self.get("sslmode")
            && mode != "verify-full"
        {
            return Err(DsnError::InvalidValue {
                keyword: "sslmode",
                problem: "must be verify-full (or unset) with sslrootcert=system".into(),
            });
        }
        Ok(())
    }
}

/// `c` is libpq whitespace.
fn is_space_char(c: char) -> bool {
    c.is_ascii() && keywords::is_space(c as u8)
}

/// The scheme of `text` if it starts with `scheme://` (RFC 3986 scheme characters).
fn uri_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// An unknown keyword is shown in errors only if it looks like a keyword someone mistyped
/// (lower-case letters and `_`, like every libpq keyword, or a known keyword in the wrong
/// case); anything else (digits, mixed case, punctuation) may be a fragment of a mis-quoted
/// secret. A secret made only of lower-case letters and written where a keyword belongs would
/// still be shown: that residual risk is accepted so that typos get a useful message.
fn looks_like_keyword(k: &str) -> bool {
    let plain =
        !k.is_empty() && k.len() <= 40 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    plain || keywords::index_of(&k.to_ascii_lowercase()).is_some()
}

/// Appends `v` as a key=value value: bare if that is unambiguous, else single-quoted.
fn push_quoted(out: &mut String, v: &str) {
    let bare = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.,:/@+%".contains(&b));
    if bare {
        out.push_str(v);
        return;
    }
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

/// What a URI may carry unencoded in user, host, dbname and query parts (RFC 3986 unreserved).
const URI_PART: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// [`URI_PART`] plus `:` for a bracketed IPv6 literal.
const URI_IPV6: &AsciiSet = &URI_PART.remove(b':');

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted;
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("***")
            }
        }
        let mut s = f.debug_struct("Dsn");
        for (k, v) in &self.params {
            if keywords::is_secret(k) {
                s.field(k, &Redacted);
            } else {
                s.field(k, v);
            }
        }
        s.finish()
    }
}

/// A redacted URI: `postgres://user:***@host:5432/db?sslmode=require`. Hosts are listed as
/// [`Dsn::hosts`] resolves them (defaults filled in); secrets show as `***`.
impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("postgres://")?;
        let user = self.user().filter(|u| !u.is_empty());
        let password = self.password().filter(|p| !p.is_empty());
        if let Some(u) = user {
            write!(f, "{}", utf8_percent_encode(u, URI_PART))?;
        }
        if password.is_some() {
            f.write_str(":***")?;
        }
        if user.is_some() || password.is_some() {
            f.write_str("@")?;
        }
        for (i, t) in self.hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match &t.host {
                HostKind::Tcp(h) if h.contains(':') => {
                    write!(f, "[{}]", utf8_percent_encode(h, URI_IPV6))?
                }
                HostKind::Tcp(h) => write!(f, "{}", utf8_percent_encode(h, URI_PART))?,
                HostKind::Unix(p) => {
                    write!(f, "{}", utf8_percent_encode(&p.to_string_lossy(), URI_PART))?
                }
            }
            write!(f, ":{}", t.port)?;
        }
        if let Some(db) = self.dbname().filter(|d| !d.is_empty()) {
            write!(f, "/{}", utf8_percent_encode(db, URI_PART))?;
        }
        let mut sep = '?';
        for (k, v) in &self.params {
            if matches!(k.as_str(), "user" | "password" | "host" | "port" | "dbname") {
                continue;
            }
            write!(f, "{sep}{k}=")?;
            sep = '&';
            if keywords::is_secret(k) {
                f.write_str("***")?;
            } else {
                write!(f, "{}", utf8_percent_encode(v, URI_PART))?;
            }
        }
        Ok(())
    }
}
