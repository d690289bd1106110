//! Stream mode on Redis Streams.
//!
//! - A topic `t` is the stream key `key_prefix + t` (default `busway:stream:t`). A publish is
//!   `XADD key MAXLEN ~ stream_maxlen * field value...`; the first publish of a topic by a
//!   process also adds the topic to the set `index_key` (default `busway:topics`), in the
//!   same pipeline.
//! - Headers travel as fields: `payload`, `id`, `ts`, `src`, `ct`, `reply_to`, `corr`, and
//!   `h:<key>` per free header.
//! - Reading is shared: one blocking read connection per consumer group with subscriptions
//!   in the process, and one for every subscription without a group (see `reader.rs`).
//!   A wildcard subscription takes its keys from `index_key`, rescanned every `rescan_ms`
//!   (and at once for topics this process indexes), so keys created after it subscribed are
//!   found; such a key is read from its first entry (it had no busway entries when the
//!   subscription started), so nothing is missed.
//! - Groups are created on demand (`XGROUP CREATE ... MKSTREAM`) at `$` (start new) or `0`
//!   (start from the beginning); an existing group keeps its position. A subscription without
//!   a group uses no consumer group: it reads with `XREAD` from the last entry at subscribe
//!   time (start new) or from `0`, and its unacked deliveries are kept in process.
//! - `ack` is `XACK` for a group; `nack` re-claims the entry for the same consumer (`XCLAIM`,
//!   which bumps its delivery count) and delivers it again; entries pending longer than
//!   `claim_idle_ms` (or the ack timeout) in any consumer of the group are claimed
//!   (`XPENDING IDLE` + `XCLAIM`) and delivered again; past `max_deliveries` they are
//!   published to the `dead_letter` topic and acked. Group-less deliveries are acked, nacked,
//!   redelivered after the ack timeout and dead-lettered in process.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::Value;

use busway::transport::QueueSender;
use busway::transport::TransportSubscription;
use busway::{
    config::DEFAULT_ACK_TIMEOUT, Headers, Message, Pattern, Result, StartFrom, SubscribeOptions,
    Subscription, Topic,
};

use crate::ack::AckBatcher;
use crate::bus::Inner;
use crate::config::RedisConfig;
use crate::reader::{NewMember, Registry, StreamId};

/// The stream-mode state of a bus.
#[derive(Debug)]
pub(crate) struct StreamState {
    /// The open subscriptions' queues, to end them on close.
    subs: Mutex<Vec<QueueSender>>,
    /// Acks of every subscription of the bus, batched.
    pub(crate) acks: AckBatcher,
    /// The running readers, by consumer group.
    pub(crate) readers: Mutex<Registry>,
    /// Held while a reader is started, so a group gets one.
    pub(crate) starting: tokio::sync::Mutex<()>,
    pub(crate) next_member: AtomicU64,
}

impl StreamState {
    pub(crate) fn new(_config: &RedisConfig) -> StreamState {
        StreamState {
            subs: Mutex::new(Vec::new()),
            acks: AckBatcher::default(),
            readers: Mutex::new(Registry::new()),
            starting: tokio::sync::Mutex::new(()),
            next_member: AtomicU64::new(0),
        }
    }

    pub(crate) fn close_all(&self) {
        for tx in self.subs.lock().drain(..) {
            tx.close();
        }
    }
}

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
pub(crate) fn decode_entry(
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
        match k.as_str() {
            "id" => h.id = Some(v),
            "ts" => h.timestamp_us = Some(v.parse().map_err(|_| format!("ts {v:?}"))?),
            "src" => h.source = Some(v),
            "ct" => h.content_type = Some(v),
            "reply_to" => h.reply_to = Some(Topic::new(&v).map_err(|e| e.to_string())?),
            "corr" => h.correlation_id = Some(v),
            _ => match k.strip_prefix("h:") {
                Some(key) => h.extra.push((key.to_string(), v)),
                None => return Err(format!("unknown field {k:?}")),
            },
        }
    }
    Ok(Message {
        topic,
        payload: payload.ok_or("no payload field")?,
        headers: h,
    })
}

/// One stream entry: its id and its flat `field, value, ...` list.
pub(crate) type Entry = (String, Vec<Value>);

/// `[id, [field, value, ...]]` entries of a reply.
pub(crate) fn entries(v: Value) -> Vec<Entry> {
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
pub(crate) fn read_reply(v: Value) -> Vec<(String, Vec<Entry>)> {
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

pub(crate) fn server_code(e: &redis::RedisError) -> Option<&str> {
    e.code()
}

pub(crate) async fn create_group(
    con: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    start: &str,
) -> redis::RedisResult<()> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match r {
        Err(e) if server_code(&e) == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// The entry id after which a group-less subscription starting now reads `key`: its last
/// entry (`StartFrom::New`), or nothing (`StartFrom::Beginning`, and keys without entries).
async fn start_ids(
    inner: &Inner,
    cmd: &mut MultiplexedConnection,
    keys: &[Arc<str>],
    start: StartFrom,
) -> Result<Vec<StreamId>> {
    if start == StartFrom::Beginning || keys.is_empty() {
        return Ok(vec![StreamId::ZERO; keys.len()]);
    }
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("XREVRANGE")
            .arg(&**key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
    }
    let replies: Vec<Value> = pipe
        .query_async(cmd)
        .await
        .map_err(|e| inner.connector.error("XREVRANGE", e))?;
    Ok(replies
        .into_iter()
        .map(|r| {
            entries(r)
                .first()
                .and_then(|(id, _)| StreamId::parse(id))
                .unwrap_or(StreamId::ZERO)
        })
        .collect())
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    pattern: Pattern,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let opts = &inner.config.options;
    let idle = opts
        .claim_idle_ms
        .map(Duration::from_millis)
        .or(options.ack_timeout)
        .unwrap_or(DEFAULT_ACK_TIMEOUT);
    let mut cmd = inner.cmd_connection()?;
    let topics: Vec<String> = match pattern.as_topic() {
        Some(t) => vec![t.as_str().to_string()],
        None => {
            let all: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&opts.index_key)
                .query_async(&mut cmd)
                .await
                .map_err(|e| inner.connector.error("SMEMBERS", e))?;
            all.into_iter().filter(|t| pattern.matches_str(t)).collect()
        }
    };
    let keys: Vec<Arc<str>> = topics
        .iter()
        .map(|t| format!("{}{t}", opts.key_prefix).into())
        .collect();
    let group: Option<Arc<str>> = options.group.as_deref().map(Arc::from);
    let starts = match &group {
        Some(group) => {
            // A key that enters the index after the subscription started had no busway
            // entries when it started (the index is written with a topic's first XADD), so
            // the reader reads it from its first entry: nothing published after the
            // subscription is missed, and no clock comparison is involved.
            let start = match options.start {
                StartFrom::New => "$",
                StartFrom::Beginning => "0",
            };
            for key in &keys {
                create_group(&mut cmd, key, group, start)
                    .await
                    .map_err(|e| inner.connector.error("XGROUP CREATE", e))?;
            }
            vec![StreamId::ZERO; keys.len()]
        }
        None => start_ids(inner, &mut cmd, &keys, options.start).await?,
    };
    let (capacity, overflow) = options.queue(inner.config.queue);
    let (tx, sub) = Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
    {
        let mut subs = inner.stream.subs.lock();
        subs.retain(|tx| !tx.is_closed());
        subs.push(tx.clone());
    }
    let member = NewMember {
        pattern,
        tx,
        idle,
        keys: keys.into_iter().zip(starts).collect(),
    };
    let guard = crate::reader::join(inner, group, member).await?;
    Ok(sub.with_guard(guard))
}

pub(crate) async fn pending_count(
    cmd: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    id: &str,
) -> Option<u32> {
    let v: Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(cmd)
        .await
        .ok()?;
    let Value::Array(rows) = v else { return None };
    let Value::Array(cols) = rows.into_iter().next()? else {
        return None;
    };
    match cols.into_iter().nth(3)? {
        Value::Int(n) => Some(n as u32),
        _ => None,
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
        let bad = vec![
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(b"y".to_vec()),
        ];
        assert!(decode_entry(m.topic.clone(), bad).is_err());
    }
}
