//! Go text/template rendering (gtmpl-ng) of commands and args, our functions, and secret redaction.
//!
//! The context is db-controller's: `.` maps each source's `filename` (exactly as written in the
//! config) to that source's `key -> string` map, so `{{ index . "/var/run/db-dsn/dsn.txt"
//! "password" }}` works unchanged. Unlike Go, a missing key is an error (naming the file and
//! key), never an empty string. Error messages are our own: gtmpl's can print the whole
//! context, so they are never passed on.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine;
use gtmpl_ng::{Context, Func, FuncError, Limits, Template, Value};

use crate::config::CommandSpec;
use crate::source::SourceValues;

/// Text written instead of a value in `dsnexec render` and in scrubbed messages.
pub const REDACTED: &str = "<redacted>";

/// Longest a single render may take (a runaway `range` must not stall the runner).
const RENDER_DEADLINE: Duration = Duration::from_secs(5);

thread_local! {
    /// The safe message of the last failing function of ours, picked up by [`Compiled::render`].
    static FUNC_FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// One parsed template with where it came from, for messages.
pub struct Compiled {
    /// `commands[0].command`, `commands[0].args[1]`.
    pub label: String,
    text: String,
    template: Template,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// One command's templates.
#[derive(Debug)]
pub struct CompiledCommand {
    pub command: Compiled,
    pub args: Vec<Compiled>,
}

/// Parses every command of a config; the error is `(field, reason)`.
pub fn compile_commands(
    commands: &[CommandSpec],
) -> Result<Vec<CompiledCommand>, (String, String)> {
    let mut out = Vec::with_capacity(commands.len());
    for (i, c) in commands.iter().enumerate() {
        let command = Compiled::new(format!("commands[{i}].command"), &c.command)?;
        let mut args = Vec::with_capacity(c.args.len());
        for (j, a) in c.args.iter().enumerate() {
            args.push(Compiled::new(format!("commands[{i}].args[{j}]"), a)?);
        }
        out.push(CompiledCommand { command, args });
    }
    Ok(out)
}

impl Compiled {
    /// Parses `text` with our functions; the error names the label (the text is config, not a secret).
    pub fn new(label: String, text: &str) -> Result<Compiled, (String, String)> {
        let mut template = Template::with_limits(Limits::default().with_deadline(RENDER_DEADLINE));
        template.add_funcs(FUNCTIONS);
        template
            .parse(text)
            .map_err(|e| (label.clone(), format!("template does not parse: {e}")))?;
        Ok(Compiled {
            label,
            text: text.to_owned(),
            template,
        })
    }

    /// Renders with the context; the error reason names the expression, never a value.
    pub fn render(&self, ctx: &RenderContext) -> Result<String, String> {
        FUNC_FAILURE.with(|f| f.borrow_mut().take());
        match self.template.render(&ctx.context) {
            Ok(text) => Ok(text),
            Err(e) => {
                let ours = FUNC_FAILURE.with(|f| f.borrow_mut().take());
                let reason = self.describe_failure(&e, ours);
                Err(ctx.redactor.scrub(&reason))
            }
        }
    }

    fn describe_failure(&self, e: &gtmpl_ng::ExecError, ours: Option<String>) -> String {
        let structured = e.as_structured();
        let place = structured.map(|s| {
            let c = &s.context;
            let excerpt = self
                .text
                .lines()
                .nth(c.line.saturating_sub(1))
                .and_then(|l| l.get(c.col.saturating_sub(1)..c.col.saturating_sub(1) + c.len))
                .unwrap_or("");
            format!("line {}, column {} ({excerpt})", c.line, c.col)
        });
        let what = match ours {
            Some(msg) => msg,
            None => match structured.map(|s| s.message.as_str()) {
                // `.file.key` on a missing key: the field name is template text, safe to show.
                Some(m) if m.starts_with("no field `") => {
                    let name = m["no field `".len()..].split('`').next().unwrap_or("");
                    format!("missing key {name:?}")
                }
                _ => "the template failed (details withheld: they may contain source values)"
                    .to_owned(),
            },
        };
        // The caller's error names the config and this template's label.
        match place {
            Some(p) => format!("{p}: {what}"),
            None => what,
        }
    }
}

/// The template context built from the sources of one run, and the redactor for its values.
pub struct RenderContext {
    context: Context,
    pub redactor: Redactor,
}

impl RenderContext {
    /// The real values, keyed by each source's `filename`.
    pub fn new(sources: &BTreeMap<String, SourceValues>) -> RenderContext {
        let mut root = HashMap::new();
        for (file, values) in sources {
            let map = values
                .values
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            root.insert(file.clone(), Value::Object(map));
        }
        RenderContext {
            context: Context::from(Value::Object(root)),
            redactor: Redactor::new(sources),
        }
    }

    /// Same keys, every value replaced by `<redacted:FILE#KEY>`, for `dsnexec render`.
    pub fn redacted(sources: &BTreeMap<String, SourceValues>) -> RenderContext {
        let mut root = HashMap::new();
        for (file, values) in sources {
            let map = values
                .values
                .keys()
                .map(|k| (k.clone(), Value::String(format!("<redacted:{file}#{k}>"))))
                .collect();
            root.insert(file.clone(), Value::Object(map));
        }
        RenderContext {
            context: Context::from(Value::Object(root)),
            redactor: Redactor::new(sources),
        }
    }
}

/// Replaces every source value found in a message by [`REDACTED`].
///
/// Defence in depth for messages that could echo a value (a PostgreSQL error quoting an
/// identifier, a file name built from a value). Values shorter than 4 characters are only
/// scrubbed when their key looks secret, so `port` 5432 does not blank every number.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values)", self.secrets.len())
    }
}

impl Redactor {
    pub fn new(sources: &BTreeMap<String, SourceValues>) -> Redactor {
        let mut secrets = Vec::new();
        for values in sources.values() {
            for (k, v) in &values.values {
                let secret_key = looks_secret(k);
                if v.is_empty() || (v.chars().count() < 4 && !secret_key) {
                    continue;
                }
                secrets.push(v.clone());
                // A value can also show up escaped (inside a quoted literal or identifier).
                for variant in [v.replace('\'', "''"), v.replace('"', "\"\"")] {
                    if variant != *v {
                        secrets.push(variant);
                    }
                }
                // And line by line, when a multi-line value is quoted partially.
                if v.contains('\n') {
                    secrets.extend(
                        v.lines()
                            .filter(|l| l.trim().chars().count() >= 4)
                            .map(str::to_owned),
                    );
                }
            }
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// Adds one more value to scrub (a destination DSN's password).
    pub fn add(&mut self, value: &str) {
        if !value.is_empty() {
            self.secrets.push(value.to_owned());
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// The message with every known value replaced.
    pub fn scrub(&self, message: &str) -> String {
        let mut out = message.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
        }
        out
    }
}

fn looks_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k == crate::source::RAW_DSN
        || ["pass", "secret", "token", "key", "cred"]
            .iter()
            .any(|w| k.contains(w))
}

/// A rendered argument after the `int64:`/`int32:`/`int16:`/`int8:`/`int:` cast of db-controller.
#[derive(Clone, PartialEq, Eq)]
pub enum Arg {
    Text(String),
    Int(i64),
}

impl std::fmt::Debug for Arg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arg::Text(_) => f.write_str("Text(..)"),
            Arg::Int(i) => write!(f, "Int({i})"),
        }
    }
}

impl Arg {
    /// The text sent to the destination (numbers in decimal).
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Arg::Text(t) => std::borrow::Cow::Borrowed(t),
            Arg::Int(i) => std::borrow::Cow::Owned(i.to_string()),
        }
    }
}

/// Applies a cast prefix; the error never repeats the text (it may be a secret).
pub fn cast(rendered: &str) -> Result<Arg, String> {
    let kinds: [(&str, i64, i64); 5] = [
        ("int64:", i64::MIN, i64::MAX),
        ("int32:", i32::MIN.into(), i32::MAX.into()),
        ("int16:", i16::MIN.into(), i16::MAX.into()),
        ("int8:", i8::MIN.into(), i8::MAX.into()),
        ("int:", i64::MIN, i64::MAX),
    ];
    for (prefix, min, max) in kinds {
        if let Some(number) = rendered.strip_prefix(prefix) {
            let kind = prefix.trim_end_matches(':');
            let n: i64 = number
                .parse()
                .map_err(|_| format!("the {kind} cast needs a decimal integer after {prefix:?}"))?;
            if n < min || n > max {
                return Err(format!("the value is out of range for {kind}"));
            }
            return Ok(Arg::Int(n));
        }
    }
    Ok(Arg::Text(rendered.to_owned()))
}

// ---- template functions ----

/// Functions added to Go's builtins: db-controller's configs use sprig, these are the common ones.
const FUNCTIONS: &[(&str, Func)] = &[
    ("index", index_strict),
    ("sqlLiteral", sql_literal),
    ("sqlIdent", sql_ident),
    ("toJson", to_json),
    ("quote", quote),
    ("squote", squote),
    ("default", default),
    ("required", required),
    ("upper", upper),
    ("lower", lower),
    ("trim", trim),
    ("trimPrefix", trim_prefix),
    ("trimSuffix", trim_suffix),
    ("replace", replace),
    ("contains", contains),
    ("hasPrefix", has_prefix),
    ("hasSuffix", has_suffix),
    ("b64enc", b64enc),
    ("b64dec", b64dec),
];

/// Records a safe message for [`Compiled::render`] and returns it as the function's error.
fn fail(message: String) -> FuncError {
    FUNC_FAILURE.with(|f| *f.borrow_mut() = Some(message.clone()));
    FuncError::Generic(message)
}

fn arity(name: &str, args: &[Value], n: usize) -> Result<(), FuncError> {
    if args.len() != n {
        return Err(fail(format!(
            "{name} takes {n} argument(s), got {}",
            args.len()
        )));
    }
    Ok(())
}

/// A value as text; an absent value is an error so it can never become an empty secret.
fn text(name: &str, v: &Value) -> Result<String, FuncError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::NoValue | Value::Nil => Err(fail(format!("{name}: the argument has no value"))),
        Value::Array(_) | Value::Map(_) | Value::Object(_) | Value::Function(_) => Err(fail(
            format!("{name}: the argument must be a string, not a collection"),
        )),
    }
}

fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Go's `index`, but a missing map key is an error naming the key and the path to it.
fn index_strict(args: &[Value]) -> Result<Value, FuncError> {
    let Some(mut current) = args.first() else {
        return Err(fail("index needs at least one argument".into()));
    };
    let mut path: Vec<String> = Vec::new();
    for key in &args[1..] {
        let next = match (current, key) {
            (Value::Object(m) | Value::Map(m), k) => {
                let Some(name) = key_text(k) else {
                    return Err(fail("index: a map key must be a string".into()));
                };
                match m.get(&name) {
                    Some(v) => {
                        path.push(name);
                        v
                    }
                    None => {
                        let within = if path.is_empty() {
                            "the sources (no source has this filename)".to_owned()
                        } else {
                            format!("{:?}", path.join(" "))
                        };
                        return Err(fail(format!("missing key {name:?} in {within}")));
                    }
                }
            }
            (Value::Array(a), Value::Number(n)) => {
                match n.as_u64().and_then(|i| a.get(usize::try_from(i).ok()?)) {
                    Some(v) => {
                        path.push(n.to_string());
                        v
                    }
                    None => return Err(fail(format!("index {n} is out of range"))),
                }
            }
            _ => {
                return Err(fail(
                    "index: only maps (by name) and lists (by number) can be indexed".into(),
                ));
            }
        };
        current = next;
    }
    Ok(current.clone())
}

/// A SQL string literal with its quotes (`'...'`, or `E'...'` when the value has a backslash):
/// the safe way to put a secret into DDL such as `ALTER ROLE ... PASSWORD`.
fn sql_literal(args: &[Value]) -> Result<Value, FuncError> {
    arity("sqlLiteral", args, 1)?;
    let s = text("sqlLiteral", &args[0])?;
    if s.contains('\0') {
        return Err(fail("sqlLiteral: the value contains a NUL byte".into()));
    }
    Ok(Value::String(postgres_protocol::escape::escape_literal(&s)))
}

/// A SQL identifier with its double quotes, for role, schema or server names.
fn sql_ident(args: &[Value]) -> Result<Value, FuncError> {
    arity("sqlIdent", args, 1)?;
    let s = text("sqlIdent", &args[0])?;
    if s.contains('\0') {
        return Err(fail("sqlIdent: the value contains a NUL byte".into()));
    }
    Ok(Value::String(postgres_protocol::escape::escape_identifier(
        &s,
    )))
}

fn to_json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::NoValue | Value::Nil | Value::Function(_) => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Value::Array(a) => serde_json::Value::Array(a.iter().map(to_json_value).collect()),
        Value::Object(m) | Value::Map(m) => {
            let sorted: BTreeMap<_, _> = m.iter().collect();
            serde_json::Value::Object(
                sorted
                    .into_iter()
                    .map(|(k, v)| (k.clone(), to_json_value(v)))
                    .collect(),
            )
        }
    }
}

/// sprig's `toJson` (keys sorted, like Go's encoding/json).
fn to_json(args: &[Value]) -> Result<Value, FuncError> {
    arity("toJson", args, 1)?;
    Ok(Value::String(to_json_value(&args[0]).to_string()))
}

/// Go's `%q`: double quotes with backslash escapes.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// sprig's `quote`: each argument in double quotes, joined by spaces.
fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let parts: Result<Vec<_>, _> = args
        .iter()
        .map(|a| text("quote", a).map(|s| go_quote(&s)))
        .collect();
    Ok(Value::String(parts?.join(" ")))
}

/// sprig's `squote`: each argument in single quotes (no escaping: use sqlLiteral for SQL).
fn squote(args: &[Value]) -> Result<Value, FuncError> {
    let parts: Result<Vec<_>, _> = args
        .iter()
        .map(|a| text("squote", a).map(|s| format!("'{s}'")))
        .collect();
    Ok(Value::String(parts?.join(" ")))
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::NoValue | Value::Nil => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Map(m) | Value::Object(m) => m.is_empty(),
        Value::Function(_) => false,
    }
}

/// sprig's `default DEFAULT VALUE`: VALUE unless it is empty.
fn default(args: &[Value]) -> Result<Value, FuncError> {
    match args {
        [d] => Ok(d.clone()),
        [d, given] => Ok(if is_empty(given) {
            d.clone()
        } else {
            given.clone()
        }),
        _ => Err(fail(format!(
            "default takes 1 or 2 arguments, got {}",
            args.len()
        ))),
    }
}

/// sprig's `required MESSAGE VALUE`: fails with MESSAGE when VALUE is empty.
fn required(args: &[Value]) -> Result<Value, FuncError> {
    arity("required", args, 2)?;
    if is_empty(&args[1]) {
        let msg = text("required", &args[0]).unwrap_or_else(|_| "a required value is empty".into());
        return Err(fail(msg));
    }
    Ok(args[1].clone())
}

fn upper(args: &[Value]) -> Result<Value, FuncError> {
    arity("upper", args, 1)?;
    Ok(Value::String(text("upper", &args[0])?.to_uppercase()))
}

fn lower(args: &[Value]) -> Result<Value, FuncError> {
    arity("lower", args, 1)?;
    Ok(Value::String(text("lower", &args[0])?.to_lowercase()))
}

fn trim(args: &[Value]) -> Result<Value, FuncError> {
    arity("trim", args, 1)?;
    Ok(Value::String(text("trim", &args[0])?.trim().to_owned()))
}

fn trim_prefix(args: &[Value]) -> Result<Value, FuncError> {
    arity("trimPrefix", args, 2)?;
    let (p, s) = (text("trimPrefix", &args[0])?, text("trimPrefix", &args[1])?);
    Ok(Value::String(
        s.strip_prefix(p.as_str()).unwrap_or(&s).to_owned(),
    ))
}

fn trim_suffix(args: &[Value]) -> Result<Value, FuncError> {
    arity("trimSuffix", args, 2)?;
    let (p, s) = (text("trimSuffix", &args[0])?, text("trimSuffix", &args[1])?);
    Ok(Value::String(
        s.strip_suffix(p.as_str()).unwrap_or(&s).to_owned(),
    ))
}

/// sprig's `replace OLD NEW STRING`.
fn replace(args: &[Value]) -> Result<Value, FuncError> {
    arity("replace", args, 3)?;
    let (old, new, s) = (
        text("replace", &args[0])?,
        text("replace", &args[1])?,
        text("replace", &args[2])?,
    );
    Ok(Value::String(s.replace(old.as_str(), &new)))
}

fn contains(args: &[Value]) -> Result<Value, FuncError> {
    arity("contains", args, 2)?;
    Ok(Value::Bool(
        text("contains", &args[1])?.contains(text("contains", &args[0])?.as_str()),
    ))
}

fn has_prefix(args: &[Value]) -> Result<Value, FuncError> {
    arity("hasPrefix", args, 2)?;
    Ok(Value::Bool(
        text("hasPrefix", &args[1])?.starts_with(text("hasPrefix", &args[0])?.as_str()),
    ))
}

fn has_suffix(args: &[Value]) -> Result<Value, FuncError> {
    arity("hasSuffix", args, 2)?;
    Ok(Value::Bool(
        text("hasSuffix", &args[1])?.ends_with(text("hasSuffix", &args[0])?.as_str()),
    ))
}

fn b64enc(args: &[Value]) -> Result<Value, FuncError> {
    arity("b64enc", args, 1)?;
    Ok(Value::String(
        base64::engine::general_purpose::STANDARD.encode(text("b64enc", &args[0])?),
    ))
}

fn b64dec(args: &[Value]) -> Result<Value, FuncError> {
    arity("b64dec", args, 1)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text("b64dec", &args[0])?.trim())
        .map_err(|_| fail("b64dec: the argument is not valid base64".into()))?;
    String::from_utf8(bytes)
        .map(Value::String)
        .map_err(|_| fail("b64dec: the decoded bytes are not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{SourceDriver, parse};

    const FILE: &str = "/var/run/db-dsn/dsn.txt";
    const PW: &str = r#"p'w\"q x"#;

    fn sources() -> BTreeMap<String, SourceValues> {
        let mut m = BTreeMap::new();
        let json = serde_json::json!({"user": "app", "password": PW, "port": 5432}).to_string();
        m.insert(FILE.to_owned(), parse(SourceDriver::Json, &json).unwrap());
        m
    }

    fn render(text: &str) -> Result<String, String> {
        let t = Compiled::new("commands[0].command".into(), text).map_err(|e| e.1)?;
        t.render(&RenderContext::new(&sources()))
    }

    #[test]
    fn db_controller_forms_render() {
        assert_eq!(
            render(r#"{{ index . "/var/run/db-dsn/dsn.txt" "user" }}"#).unwrap(),
            "app"
        );
        assert_eq!(
            render(r#"{{ $s := index . "/var/run/db-dsn/dsn.txt" }}{{ $s.port }}-{{ $s.user | upper }}"#).unwrap(),
            "5432-APP"
        );
        let json = render(r#"{{ index . "/var/run/db-dsn/dsn.txt" | toJson }}"#).unwrap();
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["password"], PW);
        assert_eq!(back["port"], "5432");
    }

    #[test]
    fn sql_quoting_functions() {
        assert_eq!(
            render(r#"{{ index . "/var/run/db-dsn/dsn.txt" "password" | sqlLiteral }}"#).unwrap(),
            postgres_protocol::escape::escape_literal(PW)
        );
        assert!(
            render(r#"{{ sqlLiteral (index . "/var/run/db-dsn/dsn.txt" "password") }}"#)
                .unwrap()
                .starts_with(" E'")
        );
        assert_eq!(
            render(r#"{{ sqlIdent "my role" }}"#).unwrap(),
            "\"my role\""
        );
        assert_eq!(render(r#"{{ sqlIdent "a\"b" }}"#).unwrap(), "\"a\"\"b\"");
    }

    #[test]
    fn sprig_functions() {
        assert_eq!(render(r#"{{ quote "a\"b" }}"#).unwrap(), r#""a\"b""#);
        assert_eq!(render(r#"{{ squote "ab" }}"#).unwrap(), "'ab'");
        assert_eq!(render(r#"{{ "" | default "x" }}"#).unwrap(), "x");
        assert_eq!(render(r#"{{ "y" | default "x" }}"#).unwrap(), "y");
        assert_eq!(render(r#"{{ "  a " | trim }}"#).unwrap(), "a");
        assert_eq!(render(r#"{{ "a-b" | replace "-" "_" }}"#).unwrap(), "a_b");
        assert_eq!(render(r#"{{ "abc" | b64enc }}"#).unwrap(), "YWJj");
        assert_eq!(render(r#"{{ "YWJj" | b64dec }}"#).unwrap(), "abc");
        assert_eq!(render(r#"{{ urlquery "a b&c" }}"#).unwrap(), "a+b%26c");
        assert_eq!(render(r#"{{ "pre-x" | trimPrefix "pre-" }}"#).unwrap(), "x");
    }

    #[test]
    fn missing_keys_are_errors_naming_file_and_key() {
        let err = render(r#"{{ index . "/var/run/db-dsn/dsn.txt" "pasword" }}"#).unwrap_err();
        assert!(err.contains("missing key \"pasword\""), "{err}");
        assert!(err.contains(FILE), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let err = render(r#"{{ index . "/other" "password" }}"#).unwrap_err();
        assert!(err.contains("missing key \"/other\""), "{err}");
        let err =
            render(r#"{{ $s := index . "/var/run/db-dsn/dsn.txt" }}{{ $s.pasword }}"#).unwrap_err();
        assert!(err.contains("missing key \"pasword\""), "{err}");
        assert!(err.contains("$s.pasword"), "{err}");
    }

    #[test]
    fn errors_never_contain_values() {
        for text in [
            r#"{{ index . "/var/run/db-dsn/dsn.txt" "nope" }}"#,
            r#"{{ $s := index . "/var/run/db-dsn/dsn.txt" }}{{ $s.nope }}"#,
            r#"{{ index (index . "/var/run/db-dsn/dsn.txt" "password") 3 4 }}"#,
            r#"{{ range $k, $v := index . "/var/run/db-dsn/dsn.txt" }}{{ $v.x }}{{ end }}"#,
            r#"{{ index . "/var/run/db-dsn/dsn.txt" "password" | required "need it" | printf "%d" | b64dec }}"#,
            r#"{{ len 3 }}{{ . }}"#,
            r#"{{ template "x" . }}"#,
            r#"{{ (index . "/var/run/db-dsn/dsn.txt").password.deeper }}"#,
            r#"{{ call (index . "/var/run/db-dsn/dsn.txt" "password") }}"#,
            r#"{{ slice (index . "/var/run/db-dsn/dsn.txt" "password") 1 99 }}"#,
        ] {
            let err = match render(text) {
                Err(e) => e,
                Ok(_) => continue,
            };
            for needle in [PW, "p'w", "q x", "app"] {
                assert!(!err.contains(needle), "{text}: {err}");
            }
        }
    }

    #[test]
    fn redacted_render_shows_placeholders() {
        let t = Compiled::new(
            "c".into(),
            r#"ALTER USER x PASSWORD {{ index . "/var/run/db-dsn/dsn.txt" "password" | sqlLiteral }}"#,
        )
        .unwrap();
        let out = t.render(&RenderContext::redacted(&sources())).unwrap();
        assert_eq!(
            out,
            "ALTER USER x PASSWORD '<redacted:/var/run/db-dsn/dsn.txt#password>'"
        );
    }

    #[test]
    fn redactor_scrubs_values_and_escaped_forms() {
        let r = Redactor::new(&sources());
        let msg = format!(
            "near \"{}\" and '{}'",
            PW.replace('"', "\"\""),
            PW.replace('\'', "''")
        );
        let out = r.scrub(&msg);
        assert!(!out.contains("q x"), "{out}");
        assert_eq!(
            r.scrub("role app"),
            "role app",
            "short non-secret values stay"
        );
    }

    #[test]
    fn casts() {
        assert_eq!(cast("int64:123").unwrap(), Arg::Int(123));
        assert_eq!(cast("int32:-5").unwrap(), Arg::Int(-5));
        assert_eq!(cast("int:7").unwrap(), Arg::Int(7));
        assert_eq!(cast("int8:127").unwrap(), Arg::Int(127));
        assert!(cast("int8:128").is_err());
        assert!(cast("int16:40000").is_err());
        let err = cast("int64:hunter2").unwrap_err();
        assert!(!err.contains("hunter2"));
        assert_eq!(cast("plain").unwrap(), Arg::Text("plain".into()));
        assert_eq!(Arg::Int(9).as_text(), "9");
    }
}
