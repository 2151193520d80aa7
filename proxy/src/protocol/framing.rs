//! Finding message boundaries in a byte stream: a cheap header walker for the hot path and
//! whole-message reads for the login phases.

use std::ops::ControlFlow;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{ProxyError, Result};

/// What the walker reports while it passes over a chunk of a message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The first byte (the tag) of a message sits at `offset` in the current chunk.
    Start { tag: u8, offset: usize },
    /// The header of a message is complete: `len` counts the length field itself, like the
    /// protocol does; its body starts at `body_at` in the current chunk (which may end first).
    Length { tag: u8, len: usize, body_at: usize },
    /// The status byte of a ReadyForQuery ('I' idle, 'T' in transaction, 'E' failed).
    ReadyForQuery(u8),
}

/// Where walking a chunk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// The whole chunk was walked.
    Complete,
    /// The callback asked to stop; the event that stopped it was at this offset (for a
    /// `Start` event, the message's first byte).
    Stopped(usize),
}

/// Walks tagged messages (everything after the startup packet) across arbitrary chunk
/// splits, looking only at headers: no copy, no allocation, a few branches per message.
#[derive(Debug, Default, Clone)]
pub struct MessageWalker {
    header: [u8; 5],
    /// Header bytes held (0 to 4); a byte, so the walker is 16 bytes (two per session).
    header_len: u8,
    body_left: usize,
    want_status: bool,
}

impl MessageWalker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the stream is between two messages (nothing half-read).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Passes over `chunk`, calling `f` for each event; `f` may stop the walk early.
    pub fn walk<F>(&mut self, chunk: &[u8], mut f: F) -> Result<WalkEnd>
    where
        F: FnMut(Event) -> ControlFlow<()>,
    {
        let mut i = 0;
        while i < chunk.len() {
            if self.body_left > 0 {
                if self.want_status {
                    self.want_status = false;
                    if f(Event::ReadyForQuery(chunk[i])).is_break() {
                        return Ok(WalkEnd::Stopped(i));
                    }
                }
                let n = self.body_left.min(chunk.len() - i);
                i += n;
                self.body_left -= n;
                continue;
            }
            if self.header_len == 0 {
                let tag = chunk[i];
                if f(Event::Start { tag, offset: i }).is_break() {
                    return Ok(WalkEnd::Stopped(i));
                }
                // The whole header in this chunk (almost always): read in place.
                if let Some(&[a, b, c, d]) = chunk.get(i + 1..i + 5) {
                    i += 5;
                    if self.header_done(tag, i32::from_be_bytes([a, b, c, d]), i, &mut f)? {
                        return Ok(WalkEnd::Stopped(i));
                    }
                    continue;
                }
                self.header[0] = tag;
            }
            let held = usize::from(self.header_len);
            let n = (5 - held).min(chunk.len() - i);
            self.header[held..held + n].copy_from_slice(&chunk[i..i + n]);
            // At most 5.
            self.header_len += n as u8;
            i += n;
            if self.header_len == 5 {
                self.header_len = 0;
                let [tag, a, b, c, d] = self.header;
                if self.header_done(tag, i32::from_be_bytes([a, b, c, d]), i, &mut f)? {
                    return Ok(WalkEnd::Stopped(i));
                }
            }
        }
        Ok(WalkEnd::Complete)
    }

    /// A message's header is complete (its body starts at `body_at`): whether `f` stops.
    #[inline]
    fn header_done<F>(&mut self, tag: u8, len: i32, body_at: usize, f: &mut F) -> Result<bool>
    where
        F: FnMut(Event) -> ControlFlow<()>,
    {
        if len < 4 {
            return Err(ProxyError::Protocol(format!(
                "invalid message length {len} for message type {:?}",
                char::from(tag)
            )));
        }
        let len = len as usize;
        self.body_left = len - 4;
        self.want_status = tag == b'Z' && self.body_left > 0;
        Ok(f(Event::Length { tag, len, body_at }).is_break())
    }
}

/// Reads one tagged message (for login phases, not the hot path). Returns the tag and the
/// body; bytes read past the message stay in `buf` for the next call.
pub async fn read_message<R>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<(u8, BytesMut)>
where
    R: AsyncRead + Unpin,
{
    while buf.len() < 5 {
        fill(reader, buf).await?;
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max_len {
        return Err(ProxyError::Protocol(format!(
            "invalid length {len} for message type {:?}",
            char::from(tag)
        )));
    }
    let total = 1 + len as usize;
    while buf.len() < total {
        buf.reserve(total - buf.len());
        fill(reader, buf).await?;
    }
    buf.advance(5);
    let body = buf.split_to(total - 5);
    Ok((tag, body))
}

/// Reads more bytes into `buf`; end of stream is an error because a login phase always
/// expects more.
pub async fn fill<R>(reader: &mut R, buf: &mut BytesMut) -> Result<()>
where
    R: AsyncRead + Unpin,
{
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    let n = reader.read_buf(buf).await?;
    if n == 0 {
        return Err(ProxyError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed by peer",
        )));
    }
    Ok(())
}

/// Reads a ParameterStatus message's name and value. They are in the session's client
/// encoding, which need not be UTF-8: a LATIN1 session logged in as a role named `rôle` gets
/// `session_authorization` in LATIN1. Bytes that are not UTF-8 read as U+FFFD: the login
/// goes on (the value is only kept to be shown and replayed), where refusing it would refuse
/// the client.
pub fn take_parameter_status(body: &mut BytesMut) -> Result<(String, String)> {
    let name = String::from_utf8_lossy(&take_cstr_bytes(body)?).into_owned();
    let value = String::from_utf8_lossy(&take_cstr_bytes(body)?).into_owned();
    Ok((name, value))
}

/// The bytes of the NUL-terminated string at the front of `body`, taken off it.
fn take_cstr_bytes(body: &mut BytesMut) -> Result<BytesMut> {
    let end = memchr::memchr(0, body)
        .ok_or_else(|| ProxyError::Protocol("missing string terminator".into()))?;
    let s = body.split_to(end);
    body.advance(1);
    Ok(s)
}

/// Reads a NUL-terminated string from the front of `body`.
pub fn take_cstr(body: &mut BytesMut) -> Result<String> {
    String::from_utf8(take_cstr_bytes(body)?.to_vec())
        .map_err(|_| ProxyError::Protocol("string is not valid UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn collect(stream: &[u8], split: usize) -> Vec<Event> {
        let mut w = MessageWalker::new();
        let mut events = Vec::new();
        for (n, chunk) in stream.chunks(split).enumerate() {
            let base = n * split;
            let end = w
                .walk(chunk, |e| {
                    // Offsets are chunk-relative: compared as offsets in the stream.
                    events.push(match e {
                        Event::Start { tag, offset } => Event::Start {
                            tag,
                            offset: base + offset,
                        },
                        Event::Length { tag, len, body_at } => Event::Length {
                            tag,
                            len,
                            body_at: base + body_at,
                        },
                        other => other,
                    });
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(end, WalkEnd::Complete);
        }
        assert!(w.at_boundary());
        events
    }

    #[test]
    fn walker_sees_same_events_for_every_split() {
        let mut stream = msg(b'T', b"rowdesc");
        stream.extend(msg(b'D', &[1; 300]));
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        stream.extend(msg(b'1', b""));
        stream.extend(msg(b'Z', b"T"));
        let whole = collect(&stream, stream.len());
        assert_eq!(
            whole
                .iter()
                .filter(|e| matches!(e, Event::ReadyForQuery(_)))
                .collect::<Vec<_>>(),
            vec![&Event::ReadyForQuery(b'I'), &Event::ReadyForQuery(b'T')]
        );
        assert_eq!(whole.len(), 6 * 2 + 2);
        for split in 1..stream.len() {
            assert_eq!(collect(&stream, split), whole, "split {split}");
        }
    }

    #[test]
    fn walker_stops_at_message_start() {
        let mut stream = msg(b'Q', b"select 1\0");
        let x_at = stream.len();
        stream.extend(msg(b'X', b""));
        let mut w = MessageWalker::new();
        let end = w
            .walk(&stream, |e| match e {
                Event::Start { tag: b'X', .. } => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            })
            .unwrap();
        assert_eq!(end, WalkEnd::Stopped(x_at));
    }

    #[test]
    fn walker_rejects_negative_length() {
        let mut w = MessageWalker::new();
        let bad = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(w.walk(&bad, |_| ControlFlow::Continue(())).is_err());
        let mut w = MessageWalker::new();
        let bad = [b'Q', 0, 0, 0, 3];
        assert!(w.walk(&bad, |_| ControlFlow::Continue(())).is_err());
        // The same with the header split across chunks (the path that copies it).
        for split in 1..5 {
            let mut w = MessageWalker::new();
            let (head, tail) = bad.split_at(split);
            assert!(w.walk(head, |_| ControlFlow::Continue(())).is_ok());
            assert!(w.walk(tail, |_| ControlFlow::Continue(())).is_err());
        }
    }

    #[tokio::test]
    async fn read_message_keeps_extra_bytes() {
        let mut stream = msg(b'R', &[0, 0, 0, 0]);
        stream.extend(msg(b'S', b"a\0b\0"));
        let mut reader = &stream[..];
        let mut buf = BytesMut::new();
        let (tag, body) = read_message(&mut reader, &mut buf, 1000).await.unwrap();
        assert_eq!((tag, &body[..]), (b'R', &[0u8, 0, 0, 0][..]));
        let (tag, mut body) = read_message(&mut reader, &mut buf, 1000).await.unwrap();
        assert_eq!(tag, b'S');
        assert_eq!(take_cstr(&mut body).unwrap(), "a");
        assert_eq!(take_cstr(&mut body).unwrap(), "b");
        let mut status = BytesMut::from(&b"session_authorization\0r\xf4le\0"[..]);
        assert_eq!(
            take_parameter_status(&mut status).unwrap(),
            ("session_authorization".into(), "r\u{fffd}le".into())
        );
        assert!(status.is_empty());
        assert!(take_parameter_status(&mut BytesMut::from(&b"name\0value"[..])).is_err());
        assert!(read_message(&mut reader, &mut buf, 1000).await.is_err());
    }

    #[tokio::test]
    async fn read_message_rejects_oversized() {
        let stream = msg(b'Q', &[b'a'; 100]);
        let mut reader = &stream[..];
        let mut buf = BytesMut::new();
        assert!(read_message(&mut reader, &mut buf, 50).await.is_err());
    }
}
