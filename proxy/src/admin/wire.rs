//! Result-set messages the admin console writes: RowDescription, DataRow, CommandComplete.

use bytes::{BufMut, BytesMut};

/// OIDs of the column types the console uses.
pub const TEXT: i32 = 25;
pub const INT8: i32 = 20;

fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// RowDescription with text-format columns of the given names and type OIDs.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, i32)]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (name, oid) in columns {
            put_cstr(b, name);
            b.put_i32(0); // table
            b.put_i16(0); // column
            b.put_i32(*oid);
            b.put_i16(if *oid == INT8 { 8 } else { -1 });
            b.put_i32(-1); // typmod
            b.put_i16(0); // text format
        }
    });
}

/// DataRow; `None` is SQL NULL.
pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| put_cstr(b, tag));
}

pub fn empty_query(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

/// A whole result set: description, rows, and `SHOW` completion.
pub fn result_set(buf: &mut BytesMut, columns: &[(&str, i32)], rows: &[Vec<String>]) {
    row_description(buf, columns);
    for row in rows {
        let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
        data_row(buf, &values);
    }
    command_complete(buf, "SHOW");
}

/// `2026-11-22 04:13:00 UTC`, pgbouncer's timestamp format, without a date library.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(timestamp(t), "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn data_row_encodes_null_and_text() {
        let mut b = BytesMut::new();
        data_row(&mut b, &[Some("ab"), None]);
        assert_eq!(&b[..], b"D\0\0\0\x10\0\x02\0\0\0\x02ab\xff\xff\xff\xff");
    }
}
