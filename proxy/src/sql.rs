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
pub fn split_statements(sql: &str) -> Statements<'_> {
    Statements { sql, pos: 0 }
}

/// The iterator [`split_statements`] returns (no allocation: the statements are slices).
pub struct Statements<'a> {
    sql: &'a str,
    /// Where the next statement starts; past the end once the last one was returned.
    pos: usize,
}

impl<'a> Iterator for Statements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        while self.pos <= self.sql.len() {
            let start = self.pos;
            let end = statement_end(self.sql.as_bytes(), start);
            self.pos = end + 1;
            let s = self.sql[start..end].trim_ascii();
            if !strip_comments_prefix(s).is_empty() {
                return Some(s);
            }
        }
        None
    }
}

/// The index of the `;` that ends the statement starting at `start`, or the end of `b`.
fn statement_end(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < b.len() {
        if !LEXICAL[usize::from(b[i])] {
            i += 1;
            continue;
        }
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
            b';' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// The bytes [`statement_end`] has to look at; everything else is skipped in a tight loop.
static LEXICAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'\'' as usize] = true;
    t[b'"' as usize] = true;
    t[b'-' as usize] = true;
    t[b'/' as usize] = true;
    t[b'$' as usize] = true;
    t[b';' as usize] = true;
    t
};

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
fn strip_comments_prefix(s: &str) -> &str {
    // Whitespace and comments end at an ASCII byte: a character boundary.
    &s[comments_prefix_len(s.as_bytes())..]
}

/// The length of the whitespace and comments at the start of `b`.
fn comments_prefix_len(b: &[u8]) -> usize {
    let mut i = 0;
    loop {
        while b.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        let rest = &b[i..];
        if rest.starts_with(b"--") {
            i = memchr::memchr(b'\n', rest).map_or(b.len(), |n| i + n + 1);
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j] == b'/' && rest.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if rest[j] == b'*' && rest.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            i += j.min(rest.len());
        } else {
            return i;
        }
    }
}

/// The first three keywords of a statement as written (identifiers and keywords only; stops
/// at anything else); compared case-insensitively, nothing allocated.
pub struct Keywords<'a>([&'a str; 3]);

impl<'a> Keywords<'a> {
    /// The `i`th keyword, empty if the statement has fewer.
    pub fn get(&self, i: usize) -> &'a str {
        self.0.get(i).copied().unwrap_or("")
    }

    /// Whether the `i`th keyword is `word` (any case).
    pub fn is(&self, i: usize, word: &str) -> bool {
        self.get(i).eq_ignore_ascii_case(word)
    }

    pub fn is_any(&self, i: usize, words: &[&str]) -> bool {
        words.iter().any(|w| self.is(i, w))
    }
}

pub fn leading_keywords(statement: &str) -> Keywords<'_> {
    let mut s = statement;
    let mut out = [""; 3];
    for slot in &mut out {
        let (word, rest) = next_keyword(s);
        if word.is_empty() {
            break;
        }
        *slot = word;
        s = rest;
    }
    Keywords(out)
}

/// Whether `text` (a Query or a Parse) may change session state that dbproxy carries across
/// backends, or state that pins a client to its backend: settings (SET, RESET, set_config),
/// SQL prepared statements, LISTEN, temporary objects, holdable cursors, session advisory
/// locks, DISCARD. Judged by each statement's leading keywords plus a scan for the functions
/// involved (and `pg_temp`); a hit only makes dbproxy ask the server afterwards, so a false
/// positive costs one round trip. `SELECT ... INTO TEMP` is not looked for here (that cost
/// about 220 instructions per simple-protocol transaction, 2 % of transaction mode's): the
/// server's reply tells it (a `SELECT n` completion without rows, see `txn.rs`), and a named
/// protocol statement is checked once, at its Parse ([`selects_into_temp`]).
pub fn may_touch_session_state(text: &[u8]) -> bool {
    if mentions_state_function(text) {
        return true;
    }
    // No `;` with more behind it: one statement, no need to split (a `;` inside a literal or
    // comment leaves more text behind it). Judged on the bytes: keywords, quotes and
    // semicolons are ASCII in every client encoding, and a query in the usual case is never
    // converted to text.
    let single = memchr::memchr(b';', text).is_none_or(|at| !more_after_semicolon(text, at));
    if single {
        return statement_touches_state(text);
    }
    // In a client encoding other than UTF-8 (LATIN1, ...) the bytes need not be UTF-8: the
    // invalid ones read as replacement characters, which leaves keywords, quotes and
    // semicolons where they were.
    split_statements(&String::from_utf8_lossy(text)).any(|s| statement_touches_state(s.as_bytes()))
}

/// Whether a statement of `text` is `SELECT ... INTO TEMP[ORARY] ...` (also after WITH),
/// which creates a temporary table. A word scan, not a parse: `into temp` inside a literal
/// counts too, which only costs a question to the server after each execution. Meant for
/// named protocol statements, checked once at their Parse, whose executions may come back
/// without the row description that gives the others away.
pub fn selects_into_temp(text: &str) -> bool {
    split_statements(text).any(|statement| {
        let first = next_keyword(statement).0;
        if !(first.eq_ignore_ascii_case("SELECT") || first.eq_ignore_ascii_case("WITH")) {
            return false;
        }
        let b = statement.as_bytes();
        memchr::memchr2_iter(b'i', b'I', b).any(|i| {
            word_around(b, i, 0, b"into")
                && (i == 0 || !is_ident_byte(b[i - 1]))
                && b.get(i + 4).is_none_or(|&c| !is_ident_byte(c))
                && {
                    let next = next_keyword(&statement[i + 4..]).0;
                    next.eq_ignore_ascii_case("TEMP") || next.eq_ignore_ascii_case("TEMPORARY")
                }
        })
    })
}

/// [`may_touch_session_state`] for one statement, from its leading keywords (read only as
/// far as needed).
fn statement_touches_state(statement: &[u8]) -> bool {
    let (first, rest) = next_keyword_bytes(statement);
    let is = |word: &[u8], w: &str| word.eq_ignore_ascii_case(w.as_bytes());
    // Dispatched on the first letter: most statements (SELECT, INSERT, UPDATE, ...) are
    // ruled out by one comparison.
    match first.first().map(u8::to_ascii_uppercase) {
        Some(b'S') if is(first, "SET") => {
            let second = next_keyword_bytes(rest).0;
            !["LOCAL", "TRANSACTION", "CONSTRAINTS"]
                .iter()
                .any(|w| is(second, w))
        }
        Some(b'C') if is(first, "CREATE") => {
            let (second, rest) = next_keyword_bytes(rest);
            let temp = |w: &[u8]| is(w, "TEMP") || is(w, "TEMPORARY");
            temp(second)
                || ((is(second, "LOCAL") || is(second, "GLOBAL"))
                    && temp(next_keyword_bytes(rest).0))
        }
        Some(b'C') => is(first, "CLOSE"),
        Some(b'R') => is(first, "RESET"),
        Some(b'D') => ["DISCARD", "DEALLOCATE", "DECLARE", "DROP"]
            .iter()
            .any(|w| is(first, w)),
        Some(b'P') => is(first, "PREPARE"),
        Some(b'L') => is(first, "LISTEN"),
        Some(b'U') => is(first, "UNLISTEN"),
        _ => false,
    }
}

/// The keyword (identifier characters) at the start of `s` after whitespace and comments,
/// and what follows it; empty if something else comes first.
fn next_keyword(s: &str) -> (&str, &str) {
    let (word, rest) = next_keyword_bytes(s.as_bytes());
    // Both ends are next to ASCII bytes (or the ends of `s`): character boundaries.
    let end = s.len() - rest.len();
    (&s[end - word.len()..end], &s[end..])
}

/// [`next_keyword`] on bytes.
fn next_keyword_bytes(b: &[u8]) -> (&[u8], &[u8]) {
    let b = &b[comments_prefix_len(b)..];
    let end = b
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
        .unwrap_or(b.len());
    b.split_at(end)
}

/// Whether `text` contains `set_config`, `advisory_lock`, `advisory_unlock` or `pg_temp`
/// (any case). Each holds an underscore at a known place, so only underscores are looked at:
/// a query without one costs one byte scan instead of a scan per name.
fn mentions_state_function(b: &[u8]) -> bool {
    memchr::memchr_iter(b'_', b).any(|i| {
        // The byte before the underscore rules out most (`user_id`, `pgbench_accounts`): a
        // name needs `t` (set_), `y` (advisory_) or `g` (pg_).
        let before = i.checked_sub(1).map_or(0, |j| b[j].to_ascii_lowercase());
        if !matches!(before, b't' | b'y' | b'g') {
            return false;
        }
        set_config_at(b, i)
            || word_around(b, i, 8, b"advisory_lock")
            || word_around(b, i, 8, b"advisory_unlock")
            // `CREATE TABLE pg_temp.t`, `... INTO pg_temp.t`: a temporary table by its schema.
            || word_around(b, i, 2, b"pg_temp")
    })
}

/// Whether `word` (any case) is in `b` with its byte `offset` at `i`: the statement checks find
/// words by one of their bytes (`_`) with memchr, then look around it.
#[inline]
fn word_around(b: &[u8], i: usize, offset: usize, word: &[u8]) -> bool {
    i.checked_sub(offset)
        .and_then(|s| b.get(s..s + word.len()))
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
}

/// Whether the `_` at `i` is set_config's.
#[inline]
fn set_config_at(b: &[u8], i: usize) -> bool {
    word_around(b, i, 3, b"set_config")
}

/// Whether anything but whitespace and semicolons follows the `;` at `at`: another statement.
#[inline]
fn more_after_semicolon(b: &[u8], at: usize) -> bool {
    !b[at..]
        .iter()
        .all(|&c| c == b';' || c.is_ascii_whitespace())
}

/// Custom setting names (`app.tenant_id`: with a dot, no extension defines them) that a query
/// string may set or reset: `SET [SESSION] name`, `RESET name` and `set_config('name', ...)`.
/// PostgreSQL lists such settings nowhere (`pg_settings` and `SHOW ALL` leave them out), so
/// dbproxy learns their names from the text and then asks the server for their values. Calls
/// `found` with each name, lowercased (setting names are case-insensitive); returns false when
/// a `set_config` takes its name from a parameter or an expression, which no text tells.
pub fn custom_setting_names(text: &str, mut found: impl FnMut(String)) -> bool {
    for statement in split_statements(text) {
        let (first, rest) = next_keyword(statement);
        let rest = if first.eq_ignore_ascii_case("SET") {
            let (second, after) = next_keyword(rest);
            if second.eq_ignore_ascii_case("LOCAL") {
                continue;
            }
            if second.eq_ignore_ascii_case("SESSION") {
                after
            } else {
                rest
            }
        } else if first.eq_ignore_ascii_case("RESET") {
            rest
        } else {
            continue;
        };
        if let Some(name) = dotted_name(rest) {
            found(name);
        }
    }
    let b = text.as_bytes();
    let mut literal_names = true;
    for underscore in memchr::memchr_iter(b'_', b).filter(|&i| set_config_at(b, i)) {
        let after = text[underscore + "_config".len()..].trim_ascii_start();
        let Some(args) = after.strip_prefix('(') else {
            continue;
        };
        let args = args.trim_ascii_start().as_bytes();
        if args.first() != Some(&b'\'') {
            literal_names = false;
            continue;
        }
        let end = skip_quoted(args, 1, b'\'', false);
        let inner = &args[1..end.saturating_sub(1).max(1)];
        let name = String::from_utf8_lossy(inner).replace("''", "'");
        if crate::custom::is_custom(&name) {
            found(name.to_ascii_lowercase());
        }
    }
    literal_names
}

/// Whether a statement string may set a custom setting, judged on its bytes for every Query
/// and Parse of a session-mode client (a few comparisons for an ordinary statement); a yes is
/// read with [`custom_setting_names`].
pub fn may_set_custom(text: &[u8]) -> bool {
    let t = text.trim_ascii_start();
    let keyword = |w: &[u8]| {
        t.get(..w.len()).is_some_and(|p| p.eq_ignore_ascii_case(w))
            && t.get(w.len()).is_none_or(|&c| !is_ident_byte(c))
    };
    if t.starts_with(b"/*") || t.starts_with(b"--") || keyword(b"set") || keyword(b"reset") {
        return true;
    }
    // The usual trailing `;` (and blanks) first, so that one pass finds both a `set_config`
    // and a `;` with another statement behind it (any `;` left has something after it).
    let end = text
        .iter()
        .rposition(|&c| c != b';' && !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let text = &text[..end];
    memchr::memchr2_iter(b';', b'_', text).any(|i| text[i] == b';' || set_config_at(text, i))
}

/// A dotted setting name at the start of `s` (`app.x`, `"App".x`), lowercased; None without a
/// dot.
fn dotted_name(s: &str) -> Option<String> {
    let b = strip_comments_prefix(s).as_bytes();
    let mut name = String::new();
    let mut i = 0;
    loop {
        if b.get(i) == Some(&b'"') {
            let end = skip_quoted(b, i + 1, b'"', false);
            let inner = &b[i + 1..end.saturating_sub(1).max(i + 1)];
            name.push_str(&String::from_utf8_lossy(inner).to_ascii_lowercase());
            i = end;
        } else {
            let start = i;
            while b.get(i).is_some_and(|&c| is_ident_byte(c) || c == b'$') {
                i += 1;
            }
            if i == start {
                return None;
            }
            name.push_str(&String::from_utf8_lossy(&b[start..i]).to_ascii_lowercase());
        }
        if b.get(i) != Some(&b'.') {
            break;
        }
        name.push('.');
        i += 1;
    }
    crate::custom::is_custom(&name).then_some(name)
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
    split_statements(source).find(|s| {
        leading_keywords(s).is(0, "PREPARE") && prepared_name(s).is_some_and(|n| n == name)
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

    fn touches(text: &str) -> bool {
        may_touch_session_state(text.as_bytes())
    }

    #[test]
    fn select_into_temp_is_found_in_named_statements() {
        for yes in [
            "SELECT g INTO TEMP t FROM generate_series(1, 3) g",
            "select g into temporary table t from generate_series(1, 3) g",
            "WITH x AS (SELECT 1 AS a) SELECT a INTO /* c */ TEMP t FROM x",
            "SELECT 1; SELECT 2 AS b\nINTO\ttemp t",
        ] {
            assert!(selects_into_temp(yes), "{yes}");
        }
        for no in [
            "SELECT g INTO t FROM generate_series(1, 3) g",
            "SELECT g INTO UNLOGGED t FROM generate_series(1, 3) g",
            "INSERT INTO temp VALUES (1)",
            "SELECT intotemp, x_into FROM temp",
            "SELECT 'a' AS into_x",
            "CREATE TEMP TABLE t (x int)",
        ] {
            assert!(!selects_into_temp(no), "{no}");
        }
    }

    fn custom(text: &str) -> (Vec<String>, bool) {
        let mut names = Vec::new();
        let literal = custom_setting_names(text, |n| names.push(n));
        (names, literal)
    }

    #[test]
    fn custom_setting_names_come_from_set_reset_and_set_config() {
        assert_eq!(
            custom("SET app.tenant_id = '42'; SET SESSION My.Flag TO on; RESET \"App\".\"X\""),
            (
                vec!["app.tenant_id".into(), "my.flag".into(), "app.x".into()],
                true
            )
        );
        assert_eq!(
            custom(
                "SELECT pg_catalog.set_config( 'app.user''s', $1, false), set_config('work_mem', '1MB', false)"
            ),
            (vec!["app.user's".into()], true)
        );
        assert_eq!(
            custom("SET LOCAL app.x = 1; SET work_mem = '1MB'; RESET ALL; SELECT 1"),
            (vec![], true),
            "SET LOCAL is not carried, and settings without a dot are in pg_settings"
        );
        assert_eq!(
            custom("SELECT set_config($1, $2, false)"),
            (vec![], false),
            "a name dbproxy cannot read"
        );
        assert_eq!(custom("SET app. = 1; SET = 2; RESET"), (vec![], true));
        for yes in [
            "SET app.x = 1",
            " reset app.x;",
            "SELECT pg_catalog.SET_CONFIG('app.x', '1', false)",
            "SELECT 1; SET app.x = 1",
            "/* c */ SET app.x = 1",
        ] {
            assert!(may_set_custom(yes.as_bytes()), "{yes}");
        }
        for no in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "SETTLE",
            "UPDATE t SET a = 1",
            "select 1; ",
        ] {
            assert!(!may_set_custom(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn splits_on_semicolons_outside_quotes_and_comments() {
        let sql = "select 'a;b', \"x;y\" ; -- c;d\n prepare p(int) as select $1; \
                   select $$;$$, $t$ ; $t$, E'\\';' /* ; /* ; */ */ ;;  ";
        let parts: Vec<&str> = split_statements(sql).collect();
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert_eq!(parts[0], "select 'a;b', \"x;y\"");
        assert!(parts[1].ends_with("prepare p(int) as select $1"));
        assert!(parts[2].starts_with("select $$;$$"));
    }

    #[test]
    fn keywords() {
        let kw = leading_keywords("  /* x */ set LOCAL work_mem = 1");
        assert!(kw.is(0, "SET") && kw.is(1, "local") && kw.is(2, "work_mem"));
        let kw = leading_keywords("-- c\nDISCARD all");
        assert_eq!((kw.get(0), kw.get(1), kw.get(2)), ("DISCARD", "all", ""));
        assert_eq!(leading_keywords("(select 1)").get(0), "");
        assert!(
            split_statements(" ;; -- only a comment\n; /* c */ ")
                .next()
                .is_none()
        );
        assert_eq!(
            split_statements("select 1").collect::<Vec<_>>(),
            ["select 1"]
        );
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
        assert!(touches("SET work_mem = '8MB'"));
        assert!(touches("select set_config('a','b',false)"));
        assert!(touches("LISTEN x"));
        assert!(touches("create TEMP table t(a int)"));
        assert!(!touches("select 1"));
        assert!(!touches(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        ));
        assert!(!touches(
            "UPDATE pgbench_accounts SET abalance = 1; SET LOCAL a = 1"
        ));
        assert!(touches(
            "begin; create local temporary table t(a int); commit"
        ));
        assert!(touches("select pg_advisory_lock(1)"));
        assert!(touches("SELECT PG_TRY_ADVISORY_LOCK(1)"));
        assert!(touches("select pg_advisory_unlock_all()"));
        assert!(touches("select Set_Config('a', 'b', false)"));
        assert!(touches("select set_config"));
        // Transaction-level advisory locks end with the transaction: nothing to track.
        assert!(!touches("select pg_advisory_xact_lock(1)"));
        assert!(!touches("select _config, set_conf, advisory_loc"));
        assert!(!touches("_"));
        assert!(touches("declare c cursor with hold for select 1"));
    }

    #[test]
    fn temporary_tables_in_schema_pg_temp() {
        assert!(touches("CREATE TABLE pg_temp.t (a int)"));
        assert!(touches("create unlogged table PG_TEMP.t (a int)"));
        assert!(touches("SELECT 1 INTO pg_temp.t"));
        assert!(touches("select 1; create table pg_temp.t as select 2"));
        assert!(!touches("SELECT 1 INTO t"));
        assert!(!touches(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7"
        ));
        // Not looked for in the text of every query: the server's reply tells it (txn.rs),
        // and a named statement's text is checked with `selects_into_temp`.
        assert!(!touches("SELECT 1 AS x INTO TEMP t"));
    }

    #[test]
    fn session_state_scan_with_semicolons() {
        // One statement with trailing semicolons and whitespace: judged without a split.
        assert!(!touches("SELECT 1;"));
        assert!(touches(" /* c */ SET a = 1 ;; \n"));
        assert!(!touches("SET LOCAL a = 1;"));
        assert!(touches("CREATE GLOBAL TEMP TABLE t(a int);"));
        assert!(!touches("CREATE TABLE t(a int);"));
        // A `;` inside a literal, a comment or a dollar quote does not end the statement.
        assert!(!touches("SELECT ';SET a = 1'"));
        assert!(touches("SELECT ';'; SET a = 1"));
        assert!(!touches("SELECT 1 -- ; SET a = 1"));
        assert!(touches("SELECT $$;$$; LISTEN x;"));
        assert!(touches("SELECT 1; /* x */ RESET ALL"));
        assert!(!touches(";;"));
        assert!(!touches(""));
        // Every leading keyword that may change session state, any case; and look-alikes.
        for text in [
            "set a = 1",
            "Set Session a = 1",
            "RESET a",
            "discard all",
            "PREPARE p AS SELECT 1",
            "deallocate p",
            "LISTEN c",
            "unlisten *",
            "CLOSE cur",
            "declare c cursor with hold for select 1",
            "DROP TABLE t",
            "create temporary table t (a int)",
            "CREATE LOCAL TEMP TABLE t (a int)",
            "create global temporary table t (a int)",
        ] {
            assert!(touches(text), "{text}");
        }
        for text in [
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "set constraints all deferred",
            "SETTLE",
            "CREATE INDEX i ON t (a)",
            "CLOSED",
            "DELETE FROM t",
            "PREPARED",
            "LISTENER",
            "UPDATE t SET a = 1",
            "INSERT INTO t VALUES (1)",
        ] {
            assert!(!touches(text), "{text}");
        }
    }
}
