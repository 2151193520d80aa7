//! libpq's connection keywords (PostgreSQL 18 level) and the checks libpq applies to their values.
//!
//! libpq checks most values only when it connects; we check the ones a proxy or a migration
//! job would otherwise trip over later, at parse time, with errors that never show the value.

use std::net::IpAddr;

use crate::DsnError;

/// Every keyword libpq accepts, in libpq's own order (`PQconninfoOptions`). A [`super::Dsn`]
/// keeps its parameters in this order so that two DSNs meaning the same compare equal.
pub(crate) const KEYWORDS: &[&str] = &[
    "service",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslcertmode",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslkeylogfile",
    "requirepeer",
    "require_auth",
    "min_protocol_version",
    "max_protocol_version",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "replication",
    "target_session_attrs",
    "load_balance_hosts",
    "scram_client_key",
    "scram_server_key",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
];

/// Keywords whose values are secrets: `Debug`, `Display` and errors never show them.
const SECRETS: &[&str] = &[
    "password",
    "sslpassword",
    "oauth_client_secret",
    "scram_client_key",
    "scram_server_key",
];

/// Position of `keyword` in [`KEYWORDS`], or `None` if libpq does not know it.
pub(crate) fn index_of(keyword: &str) -> Option<usize> {
    KEYWORDS.iter().position(|k| *k == keyword)
}

/// The `'static` spelling of a known keyword (error messages carry it without allocating).
pub(crate) fn canonical(keyword: &str) -> Option<&'static str> {
    index_of(keyword).map(|i| KEYWORDS[i])
}

pub(crate) fn is_secret(keyword: &str) -> bool {
    SECRETS.contains(&keyword)
}

/// libpq's whitespace (C `isspace` in the C locale), which includes vertical tab.
pub(crate) fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// libpq's `parse_int_param`: optional surrounding whitespace, an optional sign, decimal
/// digits, and a value that fits a C `int`.
pub(crate) fn parse_int(value: &str) -> Option<i32> {
    let t = value.trim_matches(|c: char| c.is_ascii() && is_space(c as u8));
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<i32>().ok()
}

/// Checks one final value the way libpq would when connecting. The problem text never
/// contains the value.
pub(crate) fn validate(keyword: &'static str, value: &str) -> Result<(), DsnError> {
    let invalid = |problem: String| DsnError::InvalidValue { keyword, problem };
    let one_of = |allowed: &[&str]| -> Result<(), DsnError> {
        if allowed.contains(&value) {
            Ok(())
        } else {
            Err(invalid(format!("must be one of {}", allowed.join(", "))))
        }
    };
    match keyword {
        "port" => {
            let entries: Vec<&str> = value.split(',').collect();
            for (i, entry) in entries.iter().enumerate() {
                // An empty entry means the default port, as in libpq.
                if entry.is_empty() {
                    continue;
                }
                let at = entry_name(i, entries.len());
                match parse_int(entry) {
                    None => return Err(invalid(format!("{at} is not an integer"))),
                    Some(p) if !(1..=65535).contains(&p) => {
                        return Err(invalid(format!("{at} is outside 1..65535")));
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        }
        "connect_timeout"
        | "keepalives"
        | "keepalives_idle"
        | "keepalives_interval"
        | "keepalives_count"
        | "tcp_user_timeout" => match parse_int(value) {
            Some(_) => Ok(()),
            None => Err(invalid("must be an integer".into())),
        },
        "hostaddr" => {
            let entries: Vec<&str> = value.split(',').collect();
            for (i, entry) in entries.iter().enumerate() {
                if entry.is_empty() {
                    continue;
                }
                // A zone suffix (`fe80::1%eth0`) is accepted by getaddrinfo; std's parser is not.
                let addr = entry.split_once('%').map_or(*entry, |(a, _)| a);
                if addr.parse::<IpAddr>().is_err() {
                    let at = entry_name(i, entries.len());
                    return Err(invalid(format!(
                        "{at} is not a numeric IP address (use host for names)"
                    )));
                }
            }
            Ok(())
        }
        "sslmode" => one_of(&[
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ]),
        "gssencmode" | "channel_binding" => one_of(&["disable", "prefer", "require"]),
        "sslnegotiation" => one_of(&["postgres", "direct"]),
        "sslcertmode" => one_of(&["disable", "allow", "require"]),
        "load_balance_hosts" => one_of(&["disable", "random"]),
        "target_session_attrs" => one_of(&[
            "any",
            "read-write",
            "read-only",
            "primary",
            "standby",
            "prefer-standby",
        ]),
        "ssl_min_protocol_version" | "ssl_max_protocol_version" => {
            // libpq compares these case-insensitively and accepts an empty value.
            const TLS: [&str; 4] = ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"];
            if value.is_empty() || TLS.iter().any(|v| v.eq_ignore_ascii_case(value)) {
                Ok(())
            } else {
                Err(invalid(format!("must be one of {}", TLS.join(", "))))
            }
        }
        _ => Ok(()),
    }
}

/// "the value" for a one-element list, "entry N of the list" otherwise (1-based).
fn entry_name(index: usize, len: usize) -> String {
    if len == 1 {
        "the value".into()
    } else {
        format!("entry {} of the list", index + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_int_follows_libpq() {
        for (text, want) in [
            ("5432", Some(5432)),
            (" 5432 ", Some(5432)),
            ("+7", Some(7)),
            ("-3", Some(-3)),
            ("", None),
            ("+", None),
            ("12a", None),
            ("1 2", None),
            ("99999999999", None),
            ("0x10", None),
        ] {
            assert_eq!(parse_int(text), want, "{text:?}");
        }
    }

    #[test]
    fn keywords_are_unique_and_secrets_known() {
        for (i, k) in KEYWORDS.iter().enumerate() {
            assert_eq!(index_of(k), Some(i), "{k} listed twice");
        }
        for s in SECRETS {
            assert!(index_of(s).is_some(), "{s}");
        }
    }
}
