//! busway messages on the wire: [`Headers`] <-> NATS headers, and NATS messages -> busway
//! messages.
//!
//! | busway field     | NATS header       |
//! |------------------|-------------------|
//! | `id`             | `Busway-Id`       |
//! | `timestamp_us`   | `Busway-Ts`       |
//! | `source`         | `Busway-Src`      |
//! | `content_type`   | `Content-Type`    |
//! | `reply_to`       | `Busway-Reply-To` |
//! | `correlation_id` | `Busway-Corr`     |
//! | `extra` keys     | as they are       |
//!
//! NATS headers are a map, so when there are several extra keys their order rides in
//! `Busway-Order` (names joined by `:`, which a header name cannot hold). A message with no
//! busway headers (from any NATS client) decodes with empty headers.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use busway::transport::Framing;
use busway::{Error, ErrorKind, Headers, Message, Result, Topic};

const ID: &str = "Busway-Id";
const TS: &str = "Busway-Ts";
const SRC: &str = "Busway-Src";
const CONTENT_TYPE: &str = "Content-Type";
const REPLY_TO: &str = "Busway-Reply-To";
const CORR: &str = "Busway-Corr";
const ORDER: &str = "Busway-Order";
/// JetStream's de-duplication id, set by the stream-mode publish (the message id): not a
/// header of the message's own.
const MSG_ID: &str = "Nats-Msg-Id";

fn reserved(key: &str) -> bool {
    [ID, TS, SRC, CONTENT_TYPE, REPLY_TO, CORR, ORDER, MSG_ID]
        .iter()
        .any(|r| r.eq_ignore_ascii_case(key))
}

fn bad_header(topic: &Topic, key: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::Encode,
        format!(
            "message on {:?}: header {key:?} cannot travel as a NATS header: {why}",
            topic.as_str()
        ),
    )
}

fn put(map: &mut HeaderMap, topic: &Topic, key: &str, value: &str) -> Result<()> {
    let name = HeaderName::from_str(key).map_err(|_| {
        bad_header(
            topic,
            key,
            "invalid header name (':', control or non-ASCII characters)",
        )
    })?;
    let value = HeaderValue::from_str(value)
        .map_err(|_| bad_header(topic, key, "its value holds a line break"))?;
    map.insert(name, value);
    Ok(())
}

/// Whether `headers` has nothing to send. Field by field: `Headers::is_empty` compares with a
/// default value it builds and drops, on every publish.
fn is_empty(headers: &Headers) -> bool {
    let Headers {
        id,
        timestamp_us,
        source,
        content_type,
        reply_to,
        correlation_id,
        extra,
    } = headers;
    id.is_none()
        && timestamp_us.is_none()
        && source.is_none()
        && content_type.is_none()
        && reply_to.is_none()
        && correlation_id.is_none()
        && extra.is_empty()
}

/// The NATS headers a bus with `framing` sends for `headers`: none under `raw`.
///
/// # Errors
/// As [`encode`].
pub(crate) fn encode_framed(
    framing: Framing,
    topic: &Topic,
    headers: &Headers,
) -> Result<Option<HeaderMap>> {
    match framing {
        Framing::Busway => encode(topic, headers),
        Framing::Raw => Ok(None),
    }
}

/// NATS headers for `headers`, or `None` when there is nothing to send.
///
/// # Errors
/// [`ErrorKind::Encode`] naming the topic and key when an extra key is not a valid NATS header
/// name, collides with a busway header, or a value holds a line break.
pub(crate) fn encode(topic: &Topic, headers: &Headers) -> Result<Option<HeaderMap>> {
    if is_empty(headers) {
        return Ok(None);
    }
    let mut map = HeaderMap::new();
    if let Some(id) = &headers.id {
        put(&mut map, topic, ID, id)?;
    }
    if let Some(ts) = headers.timestamp_us {
        put(&mut map, topic, TS, &ts.to_string())?;
    }
    if let Some(src) = &headers.source {
        put(&mut map, topic, SRC, src)?;
    }
    if let Some(ct) = &headers.content_type {
        put(&mut map, topic, CONTENT_TYPE, ct)?;
    }
    if let Some(reply) = &headers.reply_to {
        put(&mut map, topic, REPLY_TO, reply.as_str())?;
    }
    if let Some(corr) = &headers.correlation_id {
        put(&mut map, topic, CORR, corr)?;
    }
    for (k, v) in &headers.extra {
        if reserved(k) {
            return Err(bad_header(
                topic,
                k,
                "the name is reserved for busway's own headers",
            ));
        }
        put(&mut map, topic, k, v)?;
    }
    if headers.extra.len() > 1 {
        let order: Vec<&str> = headers.extra.iter().map(|(k, _)| k.as_str()).collect();
        put(&mut map, topic, ORDER, &order.join(":"))?;
    }
    Ok(Some(map))
}

/// busway headers from NATS headers. Unknown headers become extra keys; a `Busway-Ts` or
/// `Busway-Reply-To` that does not parse is a decode error (the caller counts and skips).
pub(crate) fn decode(map: Option<&HeaderMap>) -> Result<Headers> {
    let mut headers = Headers::default();
    let Some(map) = map else {
        return Ok(headers);
    };
    let mut order: Option<&str> = None;
    let mut extra: Vec<(String, String)> = Vec::new();
    for (name, values) in map.iter() {
        let Some(value) = values.last().map(|v| v.as_str()) else {
            continue;
        };
        let key = name.as_ref();
        match key {
            ID => headers.id = Some(value.to_string()),
            TS => {
                headers.timestamp_us = Some(value.parse().map_err(|_| {
                    Error::new(
                        ErrorKind::Decode,
                        format!("header {TS} is not a number: {value:?}"),
                    )
                })?)
            }
            SRC => headers.source = Some(value.to_string()),
            CONTENT_TYPE => headers.content_type = Some(value.to_string()),
            REPLY_TO => headers.reply_to = Some(Topic::new(value)?),
            CORR => headers.correlation_id = Some(value.to_string()),
            ORDER => order = Some(value),
            MSG_ID => {}
            _ => extra.push((key.to_string(), value.to_string())),
        }
    }
    // A map has no order: restore the sender's, then anything it did not list, sorted.
    extra.sort();
    if let Some(order) = order {
        for key in order.split(':') {
            if let Some(at) = extra.iter().position(|(k, _)| k == key) {
                headers.extra.push(extra.remove(at));
            }
        }
    }
    headers.extra.append(&mut extra);
    Ok(headers)
}

/// A busway message from a NATS message. `reply` (the NATS reply subject) stands in for a
/// missing `Busway-Reply-To` header, so plain NATS requesters can be answered.
pub(crate) fn to_message(
    subject: &str,
    payload: bytes::Bytes,
    map: Option<&async_nats::HeaderMap>,
    reply: Option<&str>,
) -> Result<Message> {
    with_topic(Topic::new(subject)?, payload, map, reply)
}

/// As [`to_message`], for a subject already parsed into `topic`.
pub(crate) fn with_topic(
    topic: Topic,
    payload: bytes::Bytes,
    map: Option<&async_nats::HeaderMap>,
    reply: Option<&str>,
) -> Result<Message> {
    Ok(Message {
        topic,
        payload,
        headers: reply_headers(map, reply)?,
    })
}

/// The busway headers of a NATS message with headers `map` and reply subject `reply`.
#[inline]
pub(crate) fn reply_headers(
    map: Option<&async_nats::HeaderMap>,
    reply: Option<&str>,
) -> Result<Headers> {
    if map.is_none() && reply.is_none() {
        // Most messages: built where the caller puts them, not returned through `decode`.
        return Ok(Headers::default());
    }
    let mut h = decode(map)?;
    if h.reply_to.is_none() {
        if let Some(reply) = reply {
            h.reply_to = Some(Topic::new(reply)?);
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_in_order() {
        let topic = Topic::new("a.b").unwrap();
        let h = Headers {
            id: Some("id1".into()),
            timestamp_us: Some(42),
            source: Some("app".into()),
            content_type: Some("application/json".into()),
            reply_to: Some(Topic::new("_INBOX.x").unwrap()),
            correlation_id: Some("c1".into()),
            extra: vec![("zeta".into(), "1".into()), ("alpha".into(), "2:3".into())],
        };
        let map = encode(&topic, &h).unwrap().unwrap();
        assert_eq!(decode(Some(&map)).unwrap(), h);
        assert_eq!(encode(&topic, &Headers::default()).unwrap(), None);
        assert_eq!(decode(None).unwrap(), Headers::default());
    }

    #[test]
    fn bad_keys_are_errors_not_panics() {
        let topic = Topic::new("a.b").unwrap();
        for (k, v) in [("a:b", "x"), ("ok", "line\nbreak"), ("busway-id", "x")] {
            let mut h = Headers::default();
            h.insert(k, v);
            let err = encode(&topic, &h).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Encode);
            assert!(err.to_string().contains("a.b"), "{err}");
        }
    }
}
