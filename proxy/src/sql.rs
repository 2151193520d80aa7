//! Just enough SQL lexing for session tracking: splitting a simple-query string into its
//! statements (respecting quotes, dollar quotes and comments), reading a statement's leading
//! keywords, and quoting values for the statements dbproxy itself sends.
//!
//! dbproxy never interprets what a statement does from its text alone: the text only tells
//! it *when* to ask the server (pg_settings, pg_prepared_statements, pg_listening_channels),
//! and the server's answer is what counts.

/// The statements of a query string, as byte ranges of `sql` (without the `;`), skipping
/// empty ones. Quotes ('...', E'...', "..."), dollar quotes ($tag$...$tag$), line comments and
/// nested block comments are honoured, so a `;` inside them does not split.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // E'...' strings treat backslash as an escape.
                let escapes = i > 0
                    && (b[i - 1] == b'E' || b[i - 1] == b'e')
                    && (i < 2 || !is_ident_byte(b[i - 2]));
                i = skip_quoted(b, i + 1, b'\'', escapes);
            }
            b'"' => i = skip_quoted(b, i + 1, b'"', false),
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 1;
                i += 2;
                while i < b.len() && depth > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' if i == 0 || !is_ident_byte(b[i - 1]) => match dollar_tag(b, i) {
                Some(tag_end) => {
                    let tag = &b[i..tag_end];
                    i = tag_end;
                    loop {
                        if i >= b.len() {
                            break;
                        }
                        if b[i..].starts_with(tag) {
                            i += tag.len();
                            break;
                        }
                        i += 1;
                    }
                }
                None => i += 1,
            },
            b';' => {
                push_statement(&mut out, sql, start, i);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    push_statement(&mut out, sql, start, b.len());
    out
}

fn push_statement<'a>(out: &mut Vec<&'a str>, sql: &'a str, start: usize, end: usize) {
    let s = sql[start..end].trim();
    if !strip_comments_prefix(s).is_empty() {
        out.push(s);
    }
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Index just past the closing quote (or the end).
fn skip_quoted(b: &[u8], mut i: usize, quote: u8, escapes: bool) -> usize {
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// If a dollar-quote opening tag (`$$` or `$tag$`) starts at `i`, the index just past it.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() && b[j] != b'$' {
        if !(is_ident_byte(b[j]) && !(j == i + 1 && b[j].is_ascii_digit())) {
            return None;
        }
        j += 1;
    }
    (j < b.len()).then_some(j + 1)
}

/// `s` without leading whitespace and comments.
fn strip_comments_prefix(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.find('\n').map_or("", |n| &rest[n + 1..]);
        } else if s.starts_with("/*") {
            let b = s.as_bytes();
            let mut depth = 0;
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            s = &s[i.min(s.len())..];
        } else {
            return s;
        }
    }
}

/// The first `n` keywords of a statement, upper-cased (identifiers and keywords only; stops at
/// anything else).
pub fn leading_keywords(statement: &str, n: usize) -> Vec<String> {
    let mut s = strip_comments_prefix(statement);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        s = strip_comments_prefix(s);
        let end = s
            .bytes()
            .position(|c| !(c.is_ascii_alphanumeric() || c == b'_'))
            .unwrap_or(s.len());
        if end == 0 {
            break;
        }
        out.push(s[..end].to_ascii_uppercase());
        s = &s[end..];
    }
    out
}

/// Whether `text` (a Query or a Parse) may change session state that dbproxy carries across
/// backends, or state that pins a client to its backend: settings (SET, RESET, set_config),
/// SQL prepared statements, LISTEN, temporary objects, holdable cursors, session advisory
/// locks, DISCARD. Judged by each statement's leading keywords plus a scan for the functions
/// involved; a hit only makes dbproxy ask the server afterwards, so a false positive costs one
/// round trip and a miss of an exotic form (SELECT INTO TEMP) is documented.
pub fn may_touch_session_state(text: &str) -> bool {
    if contains_ignore_case(text, b"set_config")
        || contains_ignore_case(text, b"advisory_lock")
        || contains_ignore_case(text, b"advisory_unlock")
    {
        return true;
    }
    split_statements(text).into_iter().any(|statement| {
        let kw = leading_keywords(statement, 3);
        let word = |i: usize| kw.get(i).map(String::as_str).unwrap_or("");
        match word(0) {
            "SET" => !matches!(word(1), "LOCAL" | "TRANSACTION" | "CONSTRAINTS"),
            "RESET" | "DISCARD" | "PREPARE" | "DEALLOCATE" | "LISTEN" | "UNLISTEN" | "CLOSE"
            | "DECLARE" | "DROP" => true,
            "CREATE" => {
                matches!(word(1), "TEMP" | "TEMPORARY")
                    || (matches!(word(1), "LOCAL" | "GLOBAL")
                        && matches!(word(2), "TEMP" | "TEMPORARY"))
            }
            _ => false,
        }
    })
}

fn contains_ignore_case(text: &str, needle: &[u8]) -> bool {
    text.as_bytes().windows(needle.len()).any(|w| {
        w.iter()
            .zip(needle)
            .all(|(x, y)| x.to_ascii_lowercase() == *y)
    })
}

/// A SQL string literal for `value` (standard_conforming_strings on or off).
pub fn quote_literal(value: &str) -> String {
    let escaped = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", escaped.replace('\\', "\\\\"))
    } else {
        format!("'{escaped}'")
    }
}

/// The PREPARE statement named `name` inside a query string (PostgreSQL reports a SQL
/// prepared statement's source as the whole query string that created it).
pub fn find_prepare<'a>(source: &'a str, name: &str) -> Option<&'a str> {
    split_statements(source).into_iter().find(|s| {
        let kw = leading_keywords(s, 2);
        kw.first().map(String::as_str) == Some("PREPARE")
            && prepared_name(s).is_some_and(|n| n == name)
    })
}

/// The name a `PREPARE name [(types)] AS ...` statement creates (as PostgreSQL folds it).
fn prepared_name(statement: &str) -> Option<String> {
    let s = strip_comments_prefix(statement);
    let rest = s.get(7..)?.trim_start(); // after PREPARE
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return Some(name);
                }
            } else {
                name.push(c);
            }
        }
        return None;
    }
    let end = rest
        .bytes()
        .position(|c| !is_ident_byte(c) && c != b'$')
        .unwrap_or(rest.len());
    (end > 0).then(|| rest[..end].to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_semicolons_outside_quotes_and_comments() {
        let sql = "select 'a;b', \"x;y\" ; -- c;d\n prepare p(int) as select $1; \
                   select $$;$$, $t$ ; $t$, E'\\';' /* ; /* ; */ */ ;;  ";
        let parts = split_statements(sql);
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert_eq!(parts[0], "select 'a;b', \"x;y\"");
        assert!(parts[1].ends_with("prepare p(int) as select $1"));
        assert!(parts[2].starts_with("select $$;$$"));
    }

    #[test]
    fn keywords() {
        assert_eq!(
            leading_keywords("  /* x */ set LOCAL work_mem = 1", 2),
            vec!["SET", "LOCAL"]
        );
        assert_eq!(
            leading_keywords("-- c\nDISCARD all", 3),
            vec!["DISCARD", "ALL"]
        );
        assert!(leading_keywords("(select 1)", 1).is_empty());
    }

    #[test]
    fn finds_prepare_in_a_multi_statement_source() {
        let src = "select 1; PREPARE \"Q\"\"x\"(int) AS select $1; prepare q2 as select 2";
        assert_eq!(
            find_prepare(src, "Q\"x"),
            Some("PREPARE \"Q\"\"x\"(int) AS select $1")
        );
        assert_eq!(find_prepare(src, "q2"), Some("prepare q2 as select 2"));
        assert_eq!(find_prepare(src, "q3"), None);
        assert_eq!(
            find_prepare("PREPARE Up AS select 1", "up"),
            Some("PREPARE Up AS select 1")
        );
    }

    #[test]
    fn literals() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
        assert_eq!(quote_literal("\"$user\", public"), "'\"$user\", public'");
    }

    #[test]
    fn session_state_scan() {
        assert!(may_touch_session_state("SET work_mem = '8MB'"));
        assert!(may_touch_session_state("select set_config('a','b',false)"));
        assert!(may_touch_session_state("LISTEN x"));
        assert!(may_touch_session_state("create TEMP table t(a int)"));
        assert!(!may_touch_session_state("select 1"));
        assert!(!may_touch_session_state(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        ));
        assert!(!may_touch_session_state(
            "UPDATE pgbench_accounts SET abalance = 1; SET LOCAL a = 1"
        ));
        assert!(may_touch_session_state(
            "begin; create local temporary table t(a int); commit"
        ));
        assert!(may_touch_session_state("select pg_advisory_lock(1)"));
        assert!(may_touch_session_state(
            "declare c cursor with hold for select 1"
        ));
    }
}
