//! The broadcast-mode frame: the message's headers and payload in one PUBLISH value.
//!
//! ```text
//! byte 0      magic 0xB5
//! byte 1      version (1)
//! byte 2      flags: which optional fields follow, one bit each, in this order:
//!             0x01 id, 0x02 timestamp_us, 0x04 source, 0x08 content_type,
//!             0x10 reply_to, 0x20 correlation_id, 0x40 extra headers
//! fields      a string is a LEB128 length then UTF-8 bytes; timestamp_us is a LEB128 u64;
//!             extra headers are a LEB128 count then key, value strings
//! rest        the payload, to the end of the value
//! ```
//!
//! A message with no headers costs three bytes. Decoding checks every length against the
//! bytes present, so truncated or foreign bytes give an error (counted and skipped by the
//! subscriber), never a panic or an over-read.

use bytes::{BufMut, Bytes, BytesMut};

use busway::{Error, ErrorKind, Headers, Message, Result, Topic};

/// The first byte of every frame.
pub const MAGIC: u8 = 0xB5;
/// The frame version written by this crate.
pub const VERSION: u8 = 1;

const F_ID: u8 = 0x01;
const F_TS: u8 = 0x02;
const F_SRC: u8 = 0x04;
const F_CT: u8 = 0x08;
const F_REPLY: u8 = 0x10;
const F_CORR: u8 = 0x20;
const F_EXTRA: u8 = 0x40;

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_str(buf: &mut BytesMut, s: &str) {
    put_varint(buf, s.len() as u64);
    buf.put_slice(s.as_bytes());
}

/// Encodes a message's headers and payload as one frame.
pub fn encode(message: &Message) -> Vec<u8> {
    let h = &message.headers;
    let mut flags = 0u8;
    let mut size = 3 + message.payload.len();
    for (bit, s) in [
        (F_ID, h.id.as_deref()),
        (F_SRC, h.source.as_deref()),
        (F_CT, h.content_type.as_deref()),
        (F_REPLY, h.reply_to.as_ref().map(|t| t.as_str())),
        (F_CORR, h.correlation_id.as_deref()),
    ] {
        if let Some(s) = s {
            flags |= bit;
            size += s.len() + 2;
        }
    }
    if h.timestamp_us.is_some() {
        flags |= F_TS;
        size += 10;
    }
    if !h.extra.is_empty() {
        flags |= F_EXTRA;
        size += h
            .extra
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
            + 2;
    }
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u8(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(flags);
    if let Some(s) = &h.id {
        put_str(&mut buf, s);
    }
    if let Some(ts) = h.timestamp_us {
        put_varint(&mut buf, ts);
    }
    if let Some(s) = &h.source {
        put_str(&mut buf, s);
    }
    if let Some(s) = &h.content_type {
        put_str(&mut buf, s);
    }
    if let Some(t) = &h.reply_to {
        put_str(&mut buf, t.as_str());
    }
    if let Some(s) = &h.correlation_id {
        put_str(&mut buf, s);
    }
    if !h.extra.is_empty() {
        put_varint(&mut buf, h.extra.len() as u64);
        for (k, v) in &h.extra {
            put_str(&mut buf, k);
            put_str(&mut buf, v);
        }
    }
    buf.put_slice(&message.payload);
    buf.into()
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn bad(why: impl Into<String>) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!("bad busway frame: {}", why.into()),
    )
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| bad("truncated length"))?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("length longer than 64 bits"))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.varint()?;
        let left = (self.bytes.len() - self.at) as u64;
        if len > left {
            return Err(bad(format!(
                "{what} claims {len} bytes, only {left} remain"
            )));
        }
        let end = self.at + len as usize;
        let s = std::str::from_utf8(&self.bytes[self.at..end])
            .map_err(|_| bad(format!("{what} is not UTF-8")))?;
        self.at = end;
        Ok(s.to_string())
    }
}

/// Decodes a frame received on `topic`.
///
/// # Errors
/// [`ErrorKind::Decode`] for a wrong magic byte or version, unknown flags, truncated fields,
/// non-UTF-8 strings or an invalid reply topic.
pub fn decode(topic: Topic, frame: Bytes) -> Result<Message> {
    let (magic, version, flags) = match frame.get(..3) {
        Some(&[m, v, f]) => (m, v, f),
        _ => {
            return Err(bad(format!(
                "{} bytes is shorter than a header",
                frame.len()
            )))
        }
    };
    if magic != MAGIC {
        return Err(bad(format!(
            "magic byte 0x{magic:02x}, expected 0x{MAGIC:02x}"
        )));
    }
    if version != VERSION {
        return Err(bad(format!(
            "version {version}; this build reads {VERSION}"
        )));
    }
    if flags & 0x80 != 0 {
        return Err(bad(format!("unknown flags 0x{flags:02x}")));
    }
    let mut r = Reader {
        bytes: &frame,
        at: 3,
    };
    let mut h = Headers::default();
    if flags & F_ID != 0 {
        h.id = Some(r.string("id")?);
    }
    if flags & F_TS != 0 {
        h.timestamp_us = Some(r.varint()?);
    }
    if flags & F_SRC != 0 {
        h.source = Some(r.string("source")?);
    }
    if flags & F_CT != 0 {
        h.content_type = Some(r.string("content_type")?);
    }
    if flags & F_REPLY != 0 {
        let t = r.string("reply_to")?;
        h.reply_to = Some(Topic::new(&t).map_err(|e| bad(format!("reply_to: {e}")))?);
    }
    if flags & F_CORR != 0 {
        h.correlation_id = Some(r.string("correlation_id")?);
    }
    if flags & F_EXTRA != 0 {
        let n = r.varint()?;
        // Each pair takes at least two bytes, which bounds the count before allocating.
        if n > (frame.len() - r.at) as u64 / 2 {
            return Err(bad(format!("{n} extra headers cannot fit")));
        }
        for _ in 0..n {
            let k = r.string("header key")?;
            let v = r.string("header value")?;
            h.extra.push((k, v));
        }
    }
    let payload = frame.slice(r.at..);
    Ok(Message {
        topic,
        payload,
        headers: h,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Message {
        let mut m = Message::try_new("a.b", &b"payload"[..]).unwrap();
        m.headers.id = Some("id1".into());
        m.headers.timestamp_us = Some(1_700_000_000_000_000);
        m.headers.source = Some("app".into());
        m.headers.content_type = Some("application/json".into());
        m.headers.reply_to = Some(Topic::new("_INBOX.x").unwrap());
        m.headers.correlation_id = Some("c".into());
        m.headers.insert("k", "v");
        m.headers.insert("ké", "");
        m
    }

    #[test]
    fn round_trips_every_header() {
        let m = full();
        let f = encode(&m);
        assert_eq!(decode(m.topic.clone(), f.into()).unwrap(), m);
        let bare = Message::try_new("a", Bytes::new()).unwrap();
        let f = encode(&bare);
        assert_eq!(f, vec![MAGIC, VERSION, 0]);
        assert_eq!(decode(bare.topic.clone(), f.into()).unwrap(), bare);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        let m = full();
        let f = encode(&m);
        let header_len = f.len() - m.payload.len();
        for cut in 0..header_len {
            let r = decode(m.topic.clone(), Bytes::copy_from_slice(&f[..cut]));
            assert!(r.is_err(), "cut at {cut} decoded");
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Decode);
        }
        for garbage in [
            &b"hello"[..],
            &[MAGIC, 9, 0],
            &[MAGIC, VERSION, 0xff],
            &[MAGIC, VERSION, F_EXTRA, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ] {
            assert!(decode(m.topic.clone(), Bytes::copy_from_slice(garbage)).is_err());
        }
    }
}
