//! The `postgres://` / `postgresql://` URI form, parsed like libpq's `conninfo_uri_parse`.
//!
//! `postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?key=value&...]`.
//! Every part is percent-decoded (`%2F` in the host gives a Unix-socket directory, `%25` in a
//! bracketed IPv6 literal gives a zone separator); `+` stays a plus sign and `#` has no special
//! meaning, as in libpq. The query accepts every libpq keyword plus libpq's JDBC alias
//! `ssl=true` (= `sslmode=require`).

use super::RawParam;
use crate::DsnError;

/// Parses the URI `text` whose scheme prefix (including `://`) is `prefix_len` bytes long;
/// `base` is the offset of `text` in the caller's input, so error offsets point into it.
pub(super) fn parse(text: &str, prefix_len: usize, base: usize) -> Result<Vec<RawParam>, DsnError> {
    let b = text.as_bytes();
    let n = b.len();
    let mut out = Vec::new();
    let mut push =
        |keyword: &str, raw: &str, part: &'static str, at: usize| -> Result<(), DsnError> {
            out.push(RawParam {
                keyword: keyword.to_string(),
                value: decode(raw, part, base + at)?,
                offset: base + at,
                withhold_name: false,
            });
            Ok(())
        };

    let start = prefix_len;
    let mut p = start;

    // user[:password]@ : libpq looks ahead for '@' before the first '/'.
    let mut q = start;
    while q < n && b[q] != b'@' && b[q] != b'/' {
        q += 1;
    }
    if q < n && b[q] == b'@' {
        let mut u = start;
        while b[u] != b':' && b[u] != b'@' {
            u += 1;
        }
        if u > start {
            push("user", &text[start..u], "user name", start)?;
        }
        if b[u] == b':' && q > u + 1 {
            push("password", &text[u + 1..q], "password", u + 1)?;
        }
        p = q + 1;
    }

    // host[:port][,host[:port]...]
    let hosts_at = p;
    let mut hosts = String::new();
    let mut ports = String::new();
    let mut terminator: Option<u8>;
    loop {
        let host;
        let host_at;
        if p < n && b[p] == b'[' {
            let open = p;
            p += 1;
            let h0 = p;
            while p < n && b[p] != b']' {
                p += 1;
            }
            if p >= n {
                return Err(DsnError::MalformedUri {
                    offset: base + open,
                    problem: "no matching \"]\" for the \"[\" of an IPv6 host address",
                });
            }
            if p == h0 {
                return Err(DsnError::MalformedUri {
                    offset: base + open,
                    problem: "IPv6 host address may not be empty",
                });
            }
            host = &text[h0..p];
            host_at = h0;
            p += 1;
            if p < n && !matches!(b[p], b':' | b'/' | b'?' | b',') {
                return Err(DsnError::MalformedUri {
                    offset: base + p,
                    problem: "unexpected character after \"]\" (expected \":\", \"/\", \"?\" or \",\")",
                });
            }
        } else {
            let h0 = p;
            while p < n && !matches!(b[p], b':' | b'/' | b'?' | b',') {
                p += 1;
            }
            host = &text[h0..p];
            host_at = h0;
        }
        // Decoded again as one list below; decoding each piece here gives exact error offsets.
        decode(host, "host", base + host_at)?;
        hosts.push_str(host);
        terminator = b.get(p).copied();
        if terminator == Some(b':') {
            p += 1;
            let p0 = p;
            while p < n && !matches!(b[p], b'/' | b'?' | b',') {
                p += 1;
            }
            decode(&text[p0..p], "port", base + p0)?;
            ports.push_str(&text[p0..p]);
            terminator = b.get(p).copied();
        }
        if terminator != Some(b',') {
            break;
        }
        p += 1;
        hosts.push(',');
        ports.push(',');
    }
    if !hosts.is_empty() {
        push("host", &hosts, "host", hosts_at)?;
    }
    if !ports.is_empty() {
        push("port", &ports, "port", hosts_at)?;
    }

    // /dbname
    if terminator == Some(b'/') {
        p += 1;
        let d0 = p;
        while p < n && b[p] != b'?' {
            p += 1;
        }
        terminator = b.get(p).copied();
        // An empty dbname is not stored, as in libpq (it would force the user-name default).
        if p > d0 {
            push("dbname", &text[d0..p], "database name", d0)?;
        }
    }

    // ?key=value&...
    if terminator.is_some() {
        p += 1;
        while p < n {
            let k0 = p;
            let mut eq = None;
            let end = loop {
                if p < n && b[p] == b'=' {
                    if eq.is_some() {
                        return Err(DsnError::MalformedUri {
                            offset: base + p,
                            problem: "extra \"=\" in a query parameter (percent-encode it as %3D)",
                        });
                    }
                    eq = Some(p);
                    p += 1;
                } else if p >= n || b[p] == b'&' {
                    let end = p;
                    if p < n {
                        p += 1;
                    }
                    break end;
                } else {
                    p += 1;
                }
            };
            let Some(eq) = eq else {
                return Err(DsnError::MalformedUri {
                    offset: base + k0,
                    problem: "query parameter without \"=\"",
                });
            };
            let keyword = decode(&text[k0..eq], "query parameter name", base + k0)?;
            let value = decode(&text[eq + 1..end], "query parameter value", base + eq + 1)?;
            // libpq's JDBC compatibility alias; any other `ssl` value is an unknown keyword.
            let (keyword, value) = if keyword == "ssl" && value == "true" {
                ("sslmode".to_string(), "require".to_string())
            } else {
                (keyword, value)
            };
            // A name that is not a plain identifier is withheld from errors by the caller.
            out.push(RawParam {
                keyword,
                value,
                offset: base + k0,
                withhold_name: false,
            });
        }
    }
    Ok(out)
}

/// libpq's `conninfo_uri_decode`: `%XX` becomes one byte, `%00` is forbidden, anything else
/// is copied. The result must be UTF-8.
pub(super) fn decode(raw: &str, part: &'static str, offset: usize) -> Result<String, DsnError> {
    if !raw.contains('%') {
        return Ok(raw.to_string());
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(DsnError::BadPercentEncoding {
                part,
                offset: offset + i,
                problem: "\"%\" must be followed by two hex digits",
            });
        };
        let byte = (hi * 16 + lo) as u8;
        if byte == 0 {
            return Err(DsnError::BadPercentEncoding {
                part,
                offset: offset + i,
                problem: "%00 is not allowed",
            });
        }
        out.push(byte);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| DsnError::BadPercentEncoding {
        part,
        offset,
        problem: "the decoded bytes are not valid UTF-8",
    })
}
