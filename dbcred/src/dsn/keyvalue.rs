//! The libpq `keyword=value` form, parsed exactly like libpq's `conninfo_parse`.
//!
//! Whitespace may surround `=`; a value is either a run of non-whitespace or a single-quoted
//! string; in both, a backslash takes the next character literally (`\'`, `\\`, `\ `). A
//! keyword directly followed by `=` and whitespace takes the *next word* as its value, as in
//! libpq (`host= port=5432` sets host to `port=5432`): write `host=''` for an empty value.

use super::RawParam;
use super::keywords::{is_secret, is_space};
use crate::DsnError;

/// Splits `text` into keyword/value pairs (not yet checked against the keyword list).
pub(super) fn parse(text: &str) -> Result<Vec<RawParam>, DsnError> {
    let b = text.as_bytes();
    let n = b.len();
    let mut out = Vec::new();
    let mut i = 0;
    // Set when the previous value was an unquoted secret: a stray word after it is probably
    // the rest of that secret, so errors must not show it.
    let mut after_unquoted_secret = false;
    while i < n {
        if is_space(b[i]) {
            i += 1;
            continue;
        }
        let key_start = i;
        while i < n && b[i] != b'=' && !is_space(b[i]) {
            i += 1;
        }
        let key_end = i;
        while i < n && is_space(b[i]) {
            i += 1;
        }
        if i >= n || b[i] != b'=' {
            return Err(DsnError::MissingEquals { offset: key_start });
        }
        i += 1;
        while i < n && is_space(b[i]) {
            i += 1;
        }
        let mut value: Vec<u8> = Vec::new();
        let quoted = i < n && b[i] == b'\'';
        if !quoted {
            while i < n {
                if is_space(b[i]) {
                    i += 1;
                    break;
                }
                if b[i] == b'\\' {
                    i += 1;
                    if i < n {
                        value.push(b[i]);
                        i += 1;
                    }
                } else {
                    value.push(b[i]);
                    i += 1;
                }
            }
        } else {
            let quote_at = i;
            i += 1;
            loop {
                if i >= n {
                    return Err(DsnError::UnterminatedQuote { offset: quote_at });
                }
                match b[i] {
                    b'\\' => {
                        i += 1;
                        if i < n {
                            value.push(b[i]);
                            i += 1;
                        }
                    }
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        }
        let keyword = text[key_start..key_end].to_string();
        // Only ASCII backslashes were removed from valid UTF-8, so this cannot fail; map the
        // impossible case to an error rather than panic.
        let value = String::from_utf8(value).map_err(|_| DsnError::InvalidValue {
            keyword: "(connection string)",
            problem: "value is not valid UTF-8".into(),
        })?;
        let withhold_name = after_unquoted_secret;
        after_unquoted_secret = !quoted && is_secret(&keyword);
        out.push(RawParam {
            keyword,
            value,
            offset: key_start,
            withhold_name,
        });
    }
    Ok(out)
}
