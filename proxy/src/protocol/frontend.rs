//! Parsing the client messages dbproxy itself must understand (SASL during client login);
//! everything else is forwarded without parsing.

use bytes::{Buf, BytesMut};

use super::framing::take_cstr;
use crate::error::{ProxyError, Result};

/// Messages that make the server answer with a ReadyForQuery (so a session has a reply
/// pending until that ReadyForQuery arrives).
pub fn expects_ready_for_query(tag: u8) -> bool {
    matches!(tag, b'Q' | b'S' | b'F')
}

/// Extended-protocol messages that leave the server with state until the next Sync.
pub fn opens_extended_sequence(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'E' | b'D' | b'C' | b'H')
}

/// The body of a SASLInitialResponse: mechanism name and the client-first-message.
pub fn parse_sasl_initial_response(mut body: BytesMut) -> Result<(String, BytesMut)> {
    let mechanism = take_cstr(&mut body)?;
    if body.len() < 4 {
        return Err(ProxyError::Protocol("SASLInitialResponse too short".into()));
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(ProxyError::Protocol(
            "SASLInitialResponse length mismatch".into(),
        ));
    }
    Ok((mechanism, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn sasl_initial_response() {
        let mut b = BytesMut::new();
        b.put_slice(b"SCRAM-SHA-256\0");
        b.put_i32(3);
        b.put_slice(b"abc");
        let (m, data) = parse_sasl_initial_response(b).unwrap();
        assert_eq!(m, "SCRAM-SHA-256");
        assert_eq!(&data[..], b"abc");

        let mut b = BytesMut::new();
        b.put_slice(b"SCRAM-SHA-256\0");
        b.put_i32(30);
        b.put_slice(b"abc");
        assert!(parse_sasl_initial_response(b).is_err());
    }

    #[test]
    fn tags() {
        assert!(expects_ready_for_query(b'Q'));
        assert!(expects_ready_for_query(b'S'));
        assert!(!expects_ready_for_query(b'P'));
        assert!(opens_extended_sequence(b'B'));
        assert!(!opens_extended_sequence(b'S'));
    }
}
