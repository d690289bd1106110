//! Stream entries on the wire: a message as stream fields and back, and the entries of
//! `XRANGE` / `XREAD` / `XREADGROUP` replies.

use std::borrow::Cow;

use bytes::Bytes;
use redis::Value;

use busway::{Headers, Message, Topic};

/// A stream field: a name (busway's own names are static) and its value.
pub(crate) type Field = (Cow<'static, str>, Bytes);

/// The stream fields of a message. The payload and header values are moved, not copied.
pub(crate) fn fields(message: Message) -> Vec<Field> {
    let h = message.headers;
    let mut f = Vec::with_capacity(1 + h.extra.len());
    f.push((Cow::Borrowed("payload"), message.payload));
    let mut put = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            f.push((Cow::Borrowed(k), Bytes::from(v)));
        }
    };
    put("id", h.id);
    put("ts", h.timestamp_us.map(|t| t.to_string()));
    put("src", h.source);
    put("ct", h.content_type);
    put("reply_to", h.reply_to.map(|t| t.as_str().to_string()));
    put("corr", h.correlation_id);
    for (k, v) in h.extra {
        f.push((Cow::Owned(format!("h:{k}")), Bytes::from(v)));
    }
    f
}

pub(crate) fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Decodes one entry's fields into a message on `topic`.
pub(super) fn decode_entry(
    topic: Topic,
    fields: Vec<Value>,
) -> std::result::Result<Message, String> {
    let mut payload = None;
    let mut h = Headers::default();
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = text(k).ok_or("a field name is not text")?;
        if k == "payload" {
            match v {
                Value::BulkString(b) => payload = Some(Bytes::from(b)),
                _ => return Err("payload is not a string".into()),
            }
            continue;
        }
        let v = text(v).ok_or_else(|| format!("field {k:?} is not UTF-8"))?;
        busway_field(&mut h, k, v)?;
    }
    Ok(Message {
        topic,
        payload: payload.ok_or("no payload field")?,
        headers: h,
    })
}

/// Puts a field other than the payload into `h`: busway's own field names, `h:<key>`, and
/// any other field as a free header of its name.
pub(crate) fn busway_field(h: &mut Headers, k: String, v: String) -> Result<(), String> {
    match k.as_str() {
        "id" => h.id = Some(v),
        "ts" => h.timestamp_us = Some(v.parse().map_err(|_| format!("ts {v:?}"))?),
        "src" => h.source = Some(v),
        "ct" => h.content_type = Some(v),
        "reply_to" => h.reply_to = Some(Topic::new(&v).map_err(|e| e.to_string())?),
        "corr" => h.correlation_id = Some(v),
        // A field busway does not write (a foreign producer's `symbol AAPL`) is kept as a
        // free header rather than losing the entry over it.
        _ => match k.strip_prefix("h:") {
            Some(key) => h.extra.push((key.to_string(), v)),
            None => h.extra.push((k, v)),
        },
    }
    Ok(())
}

/// One stream entry: its id and its flat `field, value, ...` list.
pub(super) type Entry = (String, Vec<Value>);

/// `[id, [field, value, ...]]` entries of a reply.
pub(super) fn entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|e| match e {
            Value::Array(mut pair) if pair.len() == 2 => {
                let fields = pair.pop()?;
                let id = text(pair.pop()?)?;
                match fields {
                    Value::Array(f) => Some((id, f)),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect()
}

/// `(key, entries)` of an XREADGROUP reply (array or map form).
pub(super) fn read_reply(v: Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Array(keys) => keys
            .into_iter()
            .filter_map(|k| match k {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let es = pair.pop()?;
                    Some((text(pair.pop()?)?, entries(es)))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, es)| Some((text(k)?, entries(es))))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_headers_in_order() {
        let mut m = Message::try_new("a.b", &b"p"[..]).unwrap();
        m.headers.id = Some("i".into());
        m.headers.timestamp_us = Some(7);
        m.headers.reply_to = Some(Topic::new("_INBOX.1").unwrap());
        m.headers.insert("z", "1");
        m.headers.insert("a", "2");
        let values: Vec<Value> = fields(m.clone())
            .into_iter()
            .flat_map(|(k, v)| {
                [
                    Value::BulkString(k.into_owned().into_bytes()),
                    Value::BulkString(v.to_vec()),
                ]
            })
            .collect();
        assert_eq!(decode_entry(m.topic.clone(), values).unwrap(), m);
        let no_payload = vec![
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(b"y".to_vec()),
        ];
        assert!(decode_entry(m.topic.clone(), no_payload).is_err());
    }
}
