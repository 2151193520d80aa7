//! The client's first packet: SSLRequest, GSSENCRequest, CancelRequest or StartupMessage.

use bytes::{Buf, BytesMut};
use tokio::io::AsyncRead;

use super::framing::fill;
use crate::error::{ProxyError, Result};

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;

/// A startup packet may be no longer than this (PostgreSQL uses 10 000 bytes too).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// What the client's untagged first packet asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// Protocol 3.x; `minor` > 0 is answered with NegotiateProtocolVersion.
    Startup {
        minor: u16,
        params: StartupParams,
    },
    /// Any other protocol version (2.0, 4.x): refused with an ErrorResponse.
    UnsupportedVersion {
        major: u16,
        minor: u16,
    },
}

/// The parameters of a StartupMessage, split into what we replace and what we pass on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupParams {
    /// The names the client asked for; replaced by the DSN's, kept for messages only.
    pub user: Option<String>,
    pub database: Option<String>,
    /// Every other parameter, sorted by name: passed to the server, and the key that decides
    /// which pooled server connections a client may reuse.
    pub forwarded: Vec<(String, String)>,
    /// `_pq_.*` protocol options, which we do not support and report back.
    pub protocol_options: Vec<String>,
}

/// Reads one untagged packet (length-prefixed) and returns its body after the length.
pub async fn read_startup_packet<R>(reader: &mut R, buf: &mut BytesMut) -> Result<BytesMut>
where
    R: AsyncRead + Unpin,
{
    while buf.len() < 4 {
        fill(reader, buf).await?;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(ProxyError::Protocol(format!(
            "invalid startup packet length {len}"
        )));
    }
    while buf.len() < len {
        fill(reader, buf).await?;
    }
    buf.advance(4);
    Ok(buf.split_to(len - 4))
}

/// Interprets the body of a startup packet.
pub fn parse_startup(mut body: BytesMut) -> Result<StartupRequest> {
    if body.len() < 4 {
        return Err(ProxyError::Protocol("startup packet too short".into()));
    }
    let code = body.get_u32();
    match code {
        SSL_REQUEST => return Ok(StartupRequest::Ssl),
        GSSENC_REQUEST => return Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST => {
            if body.len() < 8 {
                return Err(ProxyError::Protocol("cancel request too short".into()));
            }
            let pid = body.get_i32();
            let key = body.get_i32();
            return Ok(StartupRequest::Cancel { pid, key });
        }
        _ => {}
    }
    let major = (code >> 16) as u16;
    let minor = (code & 0xffff) as u16;
    if major != 3 {
        return Ok(StartupRequest::UnsupportedVersion { major, minor });
    }
    let mut params = StartupParams::default();
    loop {
        let name = take_str(&mut body)?;
        if name.is_empty() {
            break;
        }
        let value = take_str(&mut body)?;
        match name.as_str() {
            "user" => params.user = Some(value),
            "database" => params.database = Some(value),
            _ if name.starts_with("_pq_.") => params.protocol_options.push(name),
            _ => params.forwarded.push((name, value)),
        }
    }
    params.forwarded.sort();
    params.forwarded.dedup_by(|a, b| a.0 == b.0);
    Ok(StartupRequest::Startup { minor, params })
}

fn take_str(body: &mut BytesMut) -> Result<String> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ProxyError::Protocol("startup packet is not terminated".into()))?;
    let s = std::str::from_utf8(&body[..end])
        .map_err(|_| ProxyError::Protocol("startup parameter is not valid UTF-8".into()))?
        .to_owned();
    body.advance(end + 1);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32((8 + rest.len()) as u32);
        v.put_u32(code);
        v.extend_from_slice(rest);
        v
    }

    async fn parse(bytes: &[u8]) -> Result<StartupRequest> {
        let mut reader = bytes;
        let mut buf = BytesMut::new();
        let body = read_startup_packet(&mut reader, &mut buf).await?;
        parse_startup(body)
    }

    #[tokio::test]
    async fn startup_splits_user_database_and_forwarded() {
        let p = packet(
            196608,
            b"user\0me\0database\0db\0application_name\0app\0_pq_.x\0y\0DateStyle\0ISO\0\0",
        );
        let StartupRequest::Startup { minor, params } = parse(&p).await.unwrap() else {
            panic!("expected startup");
        };
        assert_eq!(minor, 0);
        assert_eq!(params.user.as_deref(), Some("me"));
        assert_eq!(params.database.as_deref(), Some("db"));
        assert_eq!(
            params.forwarded,
            vec![
                ("DateStyle".into(), "ISO".into()),
                ("application_name".into(), "app".into())
            ]
        );
        assert_eq!(params.protocol_options, vec!["_pq_.x".to_string()]);
    }

    #[tokio::test]
    async fn special_requests() {
        assert_eq!(
            parse(&packet(SSL_REQUEST, b"")).await.unwrap(),
            StartupRequest::Ssl
        );
        assert_eq!(
            parse(&packet(GSSENC_REQUEST, b"")).await.unwrap(),
            StartupRequest::GssEnc
        );
        let mut rest = Vec::new();
        rest.put_i32(7);
        rest.put_i32(-9);
        assert_eq!(
            parse(&packet(CANCEL_REQUEST, &rest)).await.unwrap(),
            StartupRequest::Cancel { pid: 7, key: -9 }
        );
        assert_eq!(
            parse(&packet(2 << 16, b"\0")).await.unwrap(),
            StartupRequest::UnsupportedVersion { major: 2, minor: 0 }
        );
        assert!(matches!(
            parse(&packet((3 << 16) | 2, b"user\0u\0\0")).await.unwrap(),
            StartupRequest::Startup { minor: 2, .. }
        ));
    }

    #[tokio::test]
    async fn bad_packets_are_errors() {
        // Oversized length.
        assert!(parse(&[0, 1, 0, 0, 0, 3, 0, 0]).await.is_err());
        // Too short.
        assert!(parse(&[0, 0, 0, 4]).await.is_err());
        // Unterminated parameter.
        assert!(parse(&packet(196608, b"user\0me")).await.is_err());
        // Invalid UTF-8.
        assert!(parse(&packet(196608, b"user\0\xff\0\0")).await.is_err());
        // Truncated stream.
        assert!(parse(&[0, 0, 0, 20, 0, 3]).await.is_err());
    }
}
