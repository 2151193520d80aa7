//! Custom settings (`SET app.tenant_id = '42'`, the usual companion of row-level security):
//! PostgreSQL lists them nowhere (`pg_settings` and `SHOW ALL` leave them out), so the names
//! a session may have set are read from its statements ([`crate::sql::custom_setting_names`])
//! and the server is asked for their values (`current_setting(name, true)`) whenever dbproxy
//! reads the session's state.

/// Names kept per session (session mode) or per server connection between two reads of its
/// state (transaction mode), at most.
pub const MAX_NAMES: usize = 64;

/// A Query or Parse longer than this that arrives in pieces is not read for names.
const MAX_GATHERED: usize = 4096;

/// Custom setting names a session's statements mentioned.
#[derive(Debug, Default)]
pub struct CustomNames {
    names: Vec<String>,
    /// A setting could not be named: a `set_config` whose name is not a literal, or a name
    /// past [`MAX_NAMES`].
    pub unnamed: bool,
}

impl CustomNames {
    /// Notes the names `text` may set or reset.
    pub fn note(&mut self, text: &str) {
        let names = &mut self.names;
        let mut all_kept = true;
        let literal = crate::sql::custom_setting_names(text, |name| {
            if names.contains(&name) {
                return;
            }
            if names.len() < MAX_NAMES {
                names.push(name);
            } else {
                all_kept = false;
            }
        });
        if !literal || !all_kept {
            self.unnamed = true;
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The names noted so far, forgetting them.
    pub fn take_names(&mut self) -> Vec<String> {
        std::mem::take(&mut self.names)
    }
}

/// Session mode: the custom setting names of a client's Query and Parse messages, read as the
/// forwarding loop passes them on. A message that arrives in pieces is gathered first (up to
/// 4 KiB). Boxed in the session and created at the first name or piece: most sessions never
/// need it.
#[derive(Debug, Default)]
pub struct SessionCustom {
    pub names: CustomNames,
    /// The message being gathered: its tag, its body so far and how much is missing.
    tag: u8,
    gathered: Vec<u8>,
    left: usize,
}

impl SessionCustom {
    /// A Query or Parse whose header the walker just read: `body_len` bytes of body, of which
    /// `available` arrived with it.
    pub fn message(this: &mut Option<Box<Self>>, tag: u8, body_len: usize, available: &[u8]) {
        if available.len() >= body_len {
            if let Some(text) = custom_statement(tag, &available[..body_len]) {
                this.get_or_insert_default()
                    .names
                    .note(&String::from_utf8_lossy(text));
            }
        } else if body_len <= MAX_GATHERED {
            let this = this.get_or_insert_default();
            this.tag = tag;
            this.gathered.clear();
            this.gathered.extend_from_slice(available);
            this.left = body_len - available.len();
        }
    }

    /// The start of a read: the rest of a message begun in an earlier one, if any.
    pub fn continue_with(this: &mut Option<Box<Self>>, data: &[u8]) {
        let Some(this) = this.as_deref_mut() else {
            return;
        };
        if this.left == 0 {
            return;
        }
        let n = this.left.min(data.len());
        this.gathered.extend_from_slice(&data[..n]);
        this.left -= n;
        if this.left > 0 {
            return;
        }
        let body = std::mem::take(&mut this.gathered);
        if let Some(text) = custom_statement(this.tag, &body) {
            this.names.note(&String::from_utf8_lossy(text));
        }
    }

    /// The names noted so far (kept: they are asked for at every move).
    pub fn names(this: &Option<Box<Self>>) -> &[String] {
        this.as_deref().map_or(&[], |c| c.names.names())
    }
}

/// Whether a setting name is a custom one (`app.tenant_id`: a dot, which no built-in setting
/// has; PostgreSQL lists such settings nowhere).
pub fn is_custom(name: &str) -> bool {
    name.contains('.')
}

/// The statement text of a Query or Parse body, if it may set a custom setting.
fn custom_statement(tag: u8, body: &[u8]) -> Option<&[u8]> {
    statement_of(tag, body).filter(|text| crate::sql::may_set_custom(text))
}

/// The statement text of a Query (`text\0`) or Parse (`name\0text\0...`) body.
fn statement_of(tag: u8, body: &[u8]) -> Option<&[u8]> {
    if tag == b'Q' {
        // The text is the whole body but its terminator (PostgreSQL rejects anything else).
        return body.split_last().map(|(_, text)| text);
    }
    // Statement names are short (usually empty).
    let body = &body[body.iter().position(|&c| c == 0)? + 1..];
    memchr::memchr(0, body).map(|end| &body[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        b
    }

    #[test]
    fn names_come_from_whole_and_gathered_messages() {
        let mut custom = None;
        SessionCustom::message(&mut custom, b'Q', 9, &query("SELECT 1")[..]);
        assert!(
            custom.is_none(),
            "nothing allocated for ordinary statements"
        );
        let set = query("SET app.tenant_id = '42'");
        SessionCustom::message(&mut custom, b'Q', set.len(), &set);
        assert_eq!(SessionCustom::names(&custom), ["app.tenant_id"]);
        // A Parse in three reads.
        let mut parse = b"s1\0".to_vec();
        parse.extend_from_slice(&query("SELECT set_config('app.role', $1, false)"));
        parse.extend_from_slice(&[0, 0]);
        SessionCustom::message(&mut custom, b'P', parse.len(), &parse[..5]);
        SessionCustom::continue_with(&mut custom, &parse[5..20]);
        assert_eq!(SessionCustom::names(&custom).len(), 1, "not complete yet");
        let mut next = parse[20..].to_vec();
        next.extend_from_slice(b"Sxxxx");
        SessionCustom::continue_with(&mut custom, &next);
        assert_eq!(SessionCustom::names(&custom), ["app.tenant_id", "app.role"]);
        // Too long to gather.
        let long = query(&format!("SET app.long = '{}'", "x".repeat(5000)));
        SessionCustom::message(&mut custom, b'Q', long.len(), &long[..100]);
        SessionCustom::continue_with(&mut custom, &long[100..]);
        assert_eq!(SessionCustom::names(&custom).len(), 2);
    }

    #[test]
    fn names_are_bounded_and_unnamed_settings_noted() {
        let mut names = CustomNames::default();
        for i in 0..MAX_NAMES + 1 {
            names.note(&format!("SET app.n{i} = 1"));
        }
        assert_eq!(names.names().len(), MAX_NAMES);
        assert!(names.unnamed);
        let mut names = CustomNames::default();
        names.note("SELECT set_config($1, $2, false)");
        assert!(names.unnamed && names.names().is_empty());
        names.note("SET app.x = 1; SET app.x = 2");
        assert_eq!(names.take_names(), ["app.x"]);
        assert!(names.names().is_empty());
    }
}
