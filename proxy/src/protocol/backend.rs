//! Server-side messages: writing those dbproxy plays towards its clients, and reading a
//! server's ErrorResponse fields.

use bytes::{BufMut, BytesMut};

use crate::error::ServerErrorFields;

/// Parses an ErrorResponse or NoticeResponse body into the fields we relay or log.
pub fn parse_error_fields(body: &[u8]) -> ServerErrorFields {
    let mut fields = ServerErrorFields {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'D' => fields.detail = Some(value),
            b'H' => fields.hint = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    fields
}

/// Appends a message: tag, length, then whatever `body` writes.
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - len_at) as i32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // An interior NUL would end the field early and shift the rest; replace it.
    if s.as_bytes().contains(&0) {
        buf.put_slice(s.replace('\0', " ").as_bytes());
    } else {
        buf.put_slice(s.as_bytes());
    }
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE and message (and optional detail/hint).
pub fn error_response(
    buf: &mut BytesMut,
    severity: &str,
    code: &str,
    msg: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    message(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, msg);
        if let Some(d) = detail {
            b.put_u8(b'D');
            put_cstr(b, d);
        }
        if let Some(h) = hint {
            b.put_u8(b'H');
            put_cstr(b, h);
        }
        b.put_u8(0);
    });
}

/// A FATAL ErrorResponse, the usual way a login or session ends with an error.
pub fn fatal(buf: &mut BytesMut, code: &str, msg: &str) {
    error_response(buf, "FATAL", code, msg, None, None);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

/// AuthenticationSASL offering only SCRAM-SHA-256 (no channel binding without TLS).
pub fn authentication_sasl(buf: &mut BytesMut) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        put_cstr(b, "SCRAM-SHA-256");
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: the newest minor version we speak and the options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unsupported: &[String]) {
    message(buf, b'v', |b| {
        b.put_i32(newest_minor);
        b.put_i32(unsupported.len() as i32);
        for opt in unsupported {
            put_cstr(b, opt);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn messages_parse_with_postgres_protocol() {
        let mut buf = BytesMut::new();
        authentication_ok(&mut buf);
        parameter_status(&mut buf, "client_encoding", "UTF8");
        backend_key_data(&mut buf, 42, -7);
        error_response(&mut buf, "FATAL", "53300", "too many", Some("d"), Some("h"));
        ready_for_query(&mut buf, b'I');
        assert!(matches!(
            Message::parse(&mut buf).unwrap(),
            Some(Message::AuthenticationOk)
        ));
        match Message::parse(&mut buf).unwrap() {
            Some(Message::ParameterStatus(p)) => {
                assert_eq!(p.name().unwrap(), "client_encoding");
                assert_eq!(p.value().unwrap(), "UTF8");
            }
            _ => panic!("expected ParameterStatus"),
        }
        match Message::parse(&mut buf).unwrap() {
            Some(Message::BackendKeyData(k)) => {
                assert_eq!((k.process_id(), k.secret_key()), (42, -7));
            }
            _ => panic!("expected BackendKeyData"),
        }
        match Message::parse(&mut buf).unwrap() {
            Some(Message::ErrorResponse(_)) => {}
            _ => panic!("expected ErrorResponse"),
        }
        match Message::parse(&mut buf).unwrap() {
            Some(Message::ReadyForQuery(r)) => assert_eq!(r.status(), b'I'),
            _ => panic!("expected ReadyForQuery"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn error_fields_round_trip() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, "FATAL", "28P01", "bad\0pw", Some("d"), Some("h"));
        let f = parse_error_fields(&buf[5..]);
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.code, "28P01");
        assert_eq!(f.message, "bad pw");
        assert_eq!(f.detail.as_deref(), Some("d"));
        assert_eq!(f.hint.as_deref(), Some("h"));
        assert!(f.is_auth_failure());
    }

    #[test]
    fn negotiate_lists_options() {
        let mut buf = BytesMut::new();
        negotiate_protocol_version(&mut buf, 0, &["_pq_.x".into()]);
        assert_eq!(buf[0], b'v');
        assert_eq!(&buf[5..13], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&buf[13..], b"_pq_.x\0");
    }
}
