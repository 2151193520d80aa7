//! Source files: read fresh at every run and turned into `key -> string` maps for the templates.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::Path;

use serde_json::value::RawValue;

use crate::config::Source;
use crate::error::{Error, Result};

/// Largest source file read (a DSN, a small JSON/YAML document): protects memory from a wrong path.
pub const MAX_SOURCE_BYTES: u64 = 1024 * 1024;

/// Key every source adds: the file's content as is.
pub const RAW_DSN: &str = "raw_dsn";

/// How a source file is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDriver {
    /// A libpq connection string, URI or key=value: keys `user`, `password`, `host`, `port`,
    /// `dbname` and every other parameter given.
    Postgres,
    /// A JSON object: strings as is, numbers as written, nested values as JSON text.
    Json,
    /// A YAML mapping: strings as is, numbers as numbers, nested values as JSON text.
    Yaml,
    /// Not parsed: only `raw_dsn`.
    None,
}

impl SourceDriver {
    /// The driver for a config's `driver` field; empty means `none`, as in db-controller.
    pub fn from_name(name: &str) -> Option<SourceDriver> {
        match name {
            "postgres" | "postgresql" => Some(SourceDriver::Postgres),
            "json" => Some(SourceDriver::Json),
            "yaml" | "yml" => Some(SourceDriver::Yaml),
            "none" | "" => Some(SourceDriver::None),
            _ => None,
        }
    }

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            SourceDriver::Postgres => "postgres",
            SourceDriver::Json => "json",
            SourceDriver::Yaml => "yaml",
            SourceDriver::None => "none",
        }
    }
}

/// The values of one source. `Debug` shows the keys only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SourceValues {
    pub values: BTreeMap<String, String>,
}

impl fmt::Debug for SourceValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

/// One source as read for a run: its values and a fingerprint of the content it came from.
#[derive(Debug, Clone)]
pub struct ReadSource {
    pub values: SourceValues,
    pub fingerprint: u64,
}

/// Reads and parses a source now.
pub fn read(source: &Source) -> Result<ReadSource> {
    let text = read_text(&source.path)?;
    let values = parse(source.driver, &text).map_err(|reason| Error::SourceParse {
        path: source.path.clone(),
        driver: source.driver.name(),
        reason,
    })?;
    Ok(ReadSource {
        values,
        fingerprint: fingerprint(&text),
    })
}

/// Reads a (possibly kubelet-symlinked) file as UTF-8, bounded in size.
pub fn read_text(path: &Path) -> Result<String> {
    let err = |reason: String| Error::SourceRead {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(err(format!("larger than {MAX_SOURCE_BYTES} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| err("not valid UTF-8".into()))
}

/// A stable fingerprint of a file's content, to tell a real change from a repeated event.
pub fn fingerprint(text: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Parses source text with its driver. The error never quotes the text.
pub fn parse(driver: SourceDriver, text: &str) -> std::result::Result<SourceValues, String> {
    let mut values = match driver {
        SourceDriver::Postgres => parse_postgres(text)?,
        SourceDriver::Json => parse_json(text)?,
        SourceDriver::Yaml => parse_yaml(text)?,
        SourceDriver::None => BTreeMap::new(),
    };
    values.insert(RAW_DSN.to_owned(), text.to_owned());
    Ok(SourceValues { values })
}

fn parse_postgres(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let dsn = dbcred::Dsn::parse(text).map_err(|e| e.to_string())?;
    Ok(dsn
        .params()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn parse_json(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let object: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a JSON object (line {}, column {}: {})",
            e.line(),
            e.column(),
            json_error_kind(&e)
        )
    })?;
    let mut out = BTreeMap::new();
    for (key, raw) in object {
        let raw = raw.get().trim();
        let value = if raw.starts_with('"') {
            serde_json::from_str::<String>(raw).map_err(|_| format!("key {key:?}: bad string"))?
        } else if raw.starts_with('{') || raw.starts_with('[') {
            // Nested values become compact JSON, so `toJson`-style consumers can use them.
            serde_json::from_str::<serde_json::Value>(raw)
                .map_err(|_| format!("key {key:?}: bad nested value"))?
                .to_string()
        } else if raw == "null" {
            // Absent rather than empty: using it is an error, never a silent empty value.
            continue;
        } else {
            // Numbers as written, `true`, `false`.
            raw.to_owned()
        };
        out.insert(key, value);
    }
    Ok(out)
}

/// serde_json's error category without its message (which can quote a token of the text).
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "the top level must be an object",
        serde_json::error::Category::Eof => "unexpected end of input",
    }
}

fn parse_yaml(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
            Some(l) => format!("not valid YAML (line {}, column {})", l.line(), l.column()),
            None => "not valid YAML".to_owned(),
        })?;
    let serde_yaml_ng::Value::Mapping(map) = doc else {
        return Err("the top level must be a mapping".into());
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let key = match scalar_text(&k) {
            Some(Some(key)) => key,
            _ => return Err("every top-level key must be a scalar".into()),
        };
        let value = match scalar_text(&v) {
            Some(Some(text)) => text,
            Some(None) => continue, // null: absent, like JSON null
            None => serde_json::to_string(&v)
                .map_err(|_| format!("key {key:?}: nested value cannot be written as JSON"))?,
        };
        out.insert(key, value);
    }
    Ok(out)
}

/// Text of a YAML scalar; `Some(None)` for null, `None` for a nested value.
fn scalar_text(v: &serde_yaml_ng::Value) -> Option<Option<String>> {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => Some(None),
        Y::Bool(b) => Some(Some(b.to_string())),
        Y::Number(n) => Some(Some(n.to_string())),
        Y::String(s) => Some(Some(s.clone())),
        Y::Tagged(t) => scalar_text(&t.value),
        Y::Sequence(_) | Y::Mapping(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_as_written_and_nested_as_json() {
        let v = parse(
            SourceDriver::Json,
            r#"{"user":"u","port":5432,"ratio":1.50,"ok":true,"gone":null,"nested":{"a":[1, 2]}}"#,
        )
        .unwrap();
        let m = &v.values;
        assert_eq!(m["user"], "u");
        assert_eq!(m["port"], "5432");
        assert_eq!(m["ratio"], "1.50");
        assert_eq!(m["ok"], "true");
        assert!(!m.contains_key("gone"));
        assert_eq!(m["nested"], r#"{"a":[1,2]}"#);
        assert!(m[RAW_DSN].starts_with("{\"user\""));
    }

    #[test]
    fn yaml_values() {
        let text = "user: u\nport: 5432\npassword: \"p'w\"\nlist: [a, b]\nmap: {x: 1}\n";
        let m = parse(SourceDriver::Yaml, text).unwrap().values;
        assert_eq!(m["user"], "u");
        assert_eq!(m["port"], "5432");
        assert_eq!(m["password"], "p'w");
        assert_eq!(m["list"], r#"["a","b"]"#);
        assert_eq!(m["map"], r#"{"x":1}"#);
        assert_eq!(m[RAW_DSN], text);
    }

    #[test]
    fn parse_errors_never_quote_the_content() {
        let secret = "hunter2-very-secret";
        for (driver, text) in [
            (SourceDriver::Json, format!("{{\"password\": {secret}}}")),
            (SourceDriver::Json, format!("[\"{secret}\"]")),
            (SourceDriver::Yaml, format!("- {secret}\n")),
            (SourceDriver::Yaml, format!("password: [{secret}\n")),
        ] {
            let err = parse(driver, &text).unwrap_err();
            assert!(!err.contains(secret), "{driver:?}: {err}");
        }
    }

    #[test]
    fn none_only_raw() {
        let v = parse(SourceDriver::None, "anything").unwrap();
        assert_eq!(v.values.len(), 1);
        assert_eq!(v.values[RAW_DSN], "anything");
        assert_eq!(format!("{v:?}"), "{\"raw_dsn\"}");
    }

    #[test]
    fn driver_names() {
        assert_eq!(SourceDriver::from_name(""), Some(SourceDriver::None));
        assert_eq!(
            SourceDriver::from_name("postgres"),
            Some(SourceDriver::Postgres)
        );
        assert_eq!(SourceDriver::from_name("mysql"), None);
    }
}
