//! Stream mode on Redis Streams.
//!
//! - A topic `t` is the stream key `key_prefix + t` (default `busway:stream:t`). A publish is
//!   `XADD key MAXLEN ~ stream_maxlen * field value...`; the first publish of a topic by a
//!   process also adds the topic to the set `index_key` (default `busway:topics`), in the
//!   same pipeline.
//! - Headers travel as fields: `payload`, `id`, `ts`, `src`, `ct`, `reply_to`, `corr`, and
//!   `h:<key>` per free header.
//! - Each subscription has one reader task with its own connection that issues one blocking
//!   `XREADGROUP ... BLOCK block_ms STREAMS k1 k2 ... > > ...` over all its keys. A wildcard
//!   subscription takes its keys from `index_key`, rescanned every `rescan_ms`, so keys
//!   created after it subscribed are found; such a key is read from its first entry (it
//!   had no busway entries when the subscription started), so nothing is missed.
//! - Groups are created on demand (`XGROUP CREATE ... MKSTREAM`) at `$` (start new) or `0`
//!   (start from the beginning); an existing group keeps its position. A subscription without
//!   a group gets a private group, destroyed when the subscription ends.
//! - `ack` is `XACK`; `nack` re-claims the entry for the same consumer (`XCLAIM`, which bumps
//!   its delivery count) and delivers it again; entries pending longer than `claim_idle_ms`
//!   (or the ack timeout) in any consumer of the group are claimed (`XPENDING IDLE` +
//!   `XCLAIM`) and delivered again; past `max_deliveries` they are published to the
//!   `dead_letter` topic and acked.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::mpsc;

use busway::queue::QueueSender;
use busway::{
    Acker, Bus, Counters, Delivery, Error, Headers, Message, Pattern, Result, StartFrom,
    SubscribeOptions, Subscription, Topic, DEFAULT_ACK_TIMEOUT,
};

use crate::ack::AckBatcher;
use crate::bus::Inner;
use crate::config::RedisConfig;
use crate::conn::{is_connection_error, ConnCount};

/// The stream-mode state of a bus: the open subscriptions' queues, to end them on close.
#[derive(Debug)]
pub(crate) struct StreamState {
    subs: Mutex<Vec<QueueSender>>,
    /// Acks of every subscription of the bus, batched.
    pub(crate) acks: AckBatcher,
}

impl StreamState {
    pub(crate) fn new(_config: &RedisConfig) -> StreamState {
        StreamState {
            subs: Mutex::new(Vec::new()),
            acks: AckBatcher::default(),
        }
    }

    pub(crate) fn close_all(&self) {
        for tx in self.subs.lock().drain(..) {
            tx.close();
        }
    }
}

/// The stream fields of a message.
pub(crate) fn fields(message: Message) -> Vec<(String, Vec<u8>)> {
    let h = message.headers;
    let mut f = Vec::with_capacity(2 + h.extra.len());
    f.push(("payload".to_string(), message.payload.to_vec()));
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            f.push((k.to_string(), v.into_bytes()));
        }
    };
    put("id", h.id);
    put("ts", h.timestamp_us.map(|t| t.to_string()));
    put("src", h.source);
    put("ct", h.content_type);
    put("reply_to", h.reply_to.map(|t| t.as_str().to_string()));
    put("corr", h.correlation_id);
    for (k, v) in h.extra {
        f.push((format!("h:{k}"), v.into_bytes()));
    }
    f
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Decodes one entry's fields into a message on `topic`.
fn decode_entry(topic: Topic, fields: Vec<Value>) -> std::result::Result<Message, String> {
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
type Entry = (String, Vec<Value>);

/// `[id, [field, value, ...]]` entries of a reply.
fn entries(v: Value) -> Vec<Entry> {
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
fn read_reply(v: Value) -> Vec<(String, Vec<Entry>)> {
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

fn server_code(e: &redis::RedisError) -> Option<&str> {
    e.code()
}

async fn create_group(
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

struct Nack {
    key: String,
    id: String,
    due: Instant,
}

struct RedisAcker {
    inner: Arc<Inner>,
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    nacks: mpsc::UnboundedSender<Nack>,
}

impl std::fmt::Debug for RedisAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAcker")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("id", &self.id)
            .finish()
    }
}

impl std::fmt::Debug for Nack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nack").field("id", &self.id).finish()
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self) -> Result<()> {
        crate::ack::ack(&self.inner, &self.key, &self.group, &self.id).await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let _ = self.nacks.send(Nack {
            key: self.key.to_string(),
            id: self.id.clone(),
            due: Instant::now() + delay.unwrap_or_default(),
        });
        Ok(())
    }
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    pattern: Pattern,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let opts = &inner.config.options;
    let private = options.group.is_none();
    let group: Arc<str> = match &options.group {
        Some(g) => g.as_str().into(),
        None => format!(
            "{}:private:{:016x}",
            inner.config.client_name,
            rand::random::<u64>()
        )
        .into(),
    };
    let consumer = format!(
        "{}:{:016x}",
        inner.config.client_name,
        rand::random::<u64>()
    );
    let claim_idle = opts
        .claim_idle_ms
        .map(Duration::from_millis)
        .or(options.ack_timeout)
        .unwrap_or(DEFAULT_ACK_TIMEOUT);
    // A key that enters the index after the subscription started had no busway entries
    // when it started (the index is written with a topic's first XADD), so it is read from
    // its first entry: nothing published after the subscription is missed, and no clock
    // comparison between this process and the server is involved.
    let first_start = match options.start {
        StartFrom::New => "$",
        StartFrom::Beginning => "0",
    };
    let later_start = "0".to_string();
    // The reader's own connection: its XREADGROUP blocks, which would stall everything queued
    // behind it on a shared connection.
    let read_timeout = Duration::from_millis(opts.block_ms) + inner.config.response_timeout();
    let con = inner.connector.connect(Some(read_timeout), None).await?;
    let mut cmd = inner.cmd_connection()?;
    let mut keys = Vec::new();
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
    for t in topics {
        let key = format!("{}{t}", opts.key_prefix);
        create_group(&mut cmd, &key, &group, first_start)
            .await
            .map_err(|e| inner.connector.error("XGROUP CREATE", e))?;
        keys.push(key);
    }
    let (capacity, overflow) = options.queue(inner.config.queue);
    let (tx, sub) = Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
    inner.stream.subs.lock().push(tx.clone());
    let (nack_tx, nack_rx) = mpsc::unbounded_channel();
    let reader = Reader {
        via: inner.handle(),
        inner: inner.clone(),
        pattern,
        group,
        consumer,
        private,
        keys,
        later_start,
        claim_idle,
        tx,
        con: Some((con, ConnCount::new(&inner.stats))),
        nack_tx,
        nack_rx,
        nacks: Vec::new(),
        attempt: 0,
        down: false,
    };
    tokio::spawn(reader.run());
    Ok(sub)
}

struct Reader {
    inner: Arc<Inner>,
    via: Arc<dyn Bus>,
    pattern: Pattern,
    group: Arc<str>,
    consumer: String,
    private: bool,
    keys: Vec<String>,
    later_start: String,
    claim_idle: Duration,
    tx: QueueSender,
    con: Option<(MultiplexedConnection, ConnCount)>,
    nack_tx: mpsc::UnboundedSender<Nack>,
    nack_rx: mpsc::UnboundedReceiver<Nack>,
    nacks: Vec<Nack>,
    attempt: u32,
    down: bool,
}

impl Reader {
    async fn run(mut self) {
        let shutdown = self.inner.shutdown.subscribe();
        let rescan = Duration::from_millis(self.inner.config.options.rescan_ms.max(10));
        let mut next_maintenance = Instant::now() + rescan;
        loop {
            if *shutdown.borrow() || self.tx.is_closed() {
                break;
            }
            if self.con.is_none() {
                self.reconnect().await;
                continue;
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + rescan;
                if let Err(e) = self.maintenance().await {
                    tracing::debug!(bus = %self.inner.config.bus, error = %e, "stream maintenance failed");
                }
            }
            while let Ok(n) = self.nack_rx.try_recv() {
                self.nacks.push(n);
            }
            if !self.nacks.is_empty() {
                self.redeliver_nacked().await;
            }
            if self.keys.is_empty() {
                let wait = next_maintenance.saturating_duration_since(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    n = self.nack_rx.recv() => if let Some(n) = n { self.nacks.push(n) },
                }
                continue;
            }
            self.read().await;
        }
        self.finish().await;
    }

    async fn finish(&mut self) {
        self.tx.close();
        self.mark_down(false);
        if self.private {
            if let Ok(mut cmd) = self.inner.cmd_connection() {
                for key in &self.keys {
                    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
                        .arg("DESTROY")
                        .arg(key)
                        .arg(&*self.group)
                        .query_async(&mut cmd)
                        .await;
                }
            }
        }
    }

    fn mark_down(&mut self, down: bool) {
        if down != self.down {
            self.down = down;
            if down {
                self.inner.readers_down.fetch_add(1, Relaxed);
            } else {
                self.inner.readers_down.fetch_sub(1, Relaxed);
            }
        }
    }

    fn lost(&mut self, e: Error) {
        if self.con.take().is_some() {
            tracing::warn!(bus = %self.inner.config.bus, error = %e, "stream reader connection lost");
        }
        self.mark_down(true);
    }

    async fn reconnect(&mut self) {
        tokio::time::sleep(self.inner.connector.backoff(self.attempt)).await;
        let opts = &self.inner.config.options;
        let read_timeout =
            Duration::from_millis(opts.block_ms) + self.inner.config.response_timeout();
        match self.inner.connector.connect(Some(read_timeout), None).await {
            Ok(con) => {
                self.attempt = 0;
                self.con = Some((con, ConnCount::new(&self.inner.stats)));
                self.mark_down(false);
                Counters::incr(&self.inner.stats.reconnects);
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                tracing::debug!(bus = %self.inner.config.bus, error = %e, "stream reader reconnect failed");
            }
        }
    }

    /// Finds new keys (wildcards) and reclaims entries idle past the claim time.
    async fn maintenance(&mut self) -> Result<()> {
        let mut cmd = self.inner.cmd_connection()?;
        let inner = self.inner.clone();
        let opts = &inner.config.options;
        if !self.pattern.is_literal() {
            let all: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&opts.index_key)
                .query_async(&mut cmd)
                .await
                .map_err(|e| self.inner.connector.error("SMEMBERS", e))?;
            for t in all {
                if !self.pattern.matches_str(&t) {
                    continue;
                }
                let key = format!("{}{t}", opts.key_prefix);
                if self.keys.contains(&key) {
                    continue;
                }
                create_group(&mut cmd, &key, &self.group, &self.later_start)
                    .await
                    .map_err(|e| self.inner.connector.error("XGROUP CREATE", e))?;
                self.keys.push(key);
            }
        }
        let idle = self.claim_idle.as_millis() as u64;
        for key in self.keys.clone() {
            let pending: Value = redis::cmd("XPENDING")
                .arg(&key)
                .arg(&*self.group)
                .arg("IDLE")
                .arg(idle)
                .arg("-")
                .arg("+")
                .arg(opts.read_count)
                .query_async(&mut cmd)
                .await
                .map_err(|e| self.inner.connector.error("XPENDING", e))?;
            let Value::Array(rows) = pending else {
                continue;
            };
            for row in rows {
                let Value::Array(cols) = row else { continue };
                let mut cols = cols.into_iter();
                let (Some(id), _, _, Some(count)) =
                    (cols.next(), cols.next(), cols.next(), cols.next())
                else {
                    continue;
                };
                let (Some(id), Value::Int(count)) = (text(id), count) else {
                    continue;
                };
                self.claim(&mut cmd, &key, &id, idle, count as u32).await?;
            }
        }
        Ok(())
    }

    /// Claims one entry for this consumer and delivers it again (or dead-letters it).
    async fn claim(
        &mut self,
        cmd: &mut MultiplexedConnection,
        key: &str,
        id: &str,
        min_idle: u64,
        delivered: u32,
    ) -> Result<()> {
        let reply: Value = redis::cmd("XCLAIM")
            .arg(key)
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(min_idle)
            .arg(id)
            .query_async(cmd)
            .await
            .map_err(|e| self.inner.connector.error("XCLAIM", e))?;
        for (id, fields) in entries(reply) {
            let attempt = delivered.saturating_add(1);
            let max = self.inner.config.options.max_deliveries;
            if max.is_some_and(|m| delivered >= m) {
                self.dead_letter(cmd, key, &id, fields, delivered).await?;
                continue;
            }
            Counters::incr(&self.inner.stats.redelivered);
            Counters::incr(&self.tx.stats().redelivered);
            self.deliver(key, id, fields, attempt).await;
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        cmd: &mut MultiplexedConnection,
        key: &str,
        id: &str,
        fields: Vec<Value>,
        delivered: u32,
    ) -> Result<()> {
        let Some(dead) = self.inner.config.options.dead_letter.as_deref() else {
            return Ok(());
        };
        let dead = Topic::new(dead)?;
        let topic = self.topic_of(key);
        let mut message = match topic.clone().and_then(|t| decode_entry(t, fields).ok()) {
            Some(m) => m,
            None => Message::new(dead.clone(), Bytes::new()),
        };
        message.topic = dead;
        message.headers.insert(
            "dead_letter.topic",
            topic.map(|t| t.as_str().to_string()).unwrap_or_default(),
        );
        message
            .headers
            .insert("dead_letter.deliveries", delivered.to_string());
        message
            .headers
            .insert("dead_letter.group", self.group.to_string());
        self.via.publish(message).await?;
        redis::cmd("XACK")
            .arg(key)
            .arg(&*self.group)
            .arg(id)
            .exec_async(cmd)
            .await
            .map_err(|e| self.inner.connector.error("XACK", e))?;
        Counters::incr(&self.inner.stats.dead_lettered);
        Ok(())
    }

    async fn redeliver_nacked(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Nack>, Vec<Nack>) = std::mem::take(&mut self.nacks)
            .into_iter()
            .partition(|n| n.due <= now);
        self.nacks = later;
        let Ok(mut cmd) = self.inner.cmd_connection() else {
            self.nacks.extend(due);
            return;
        };
        for n in due {
            // The delivery count before this claim: XPENDING for the one id.
            let count = pending_count(&mut cmd, &n.key, &self.group, &n.id)
                .await
                .unwrap_or(1);
            if let Err(e) = self.claim(&mut cmd, &n.key.clone(), &n.id, 0, count).await {
                tracing::debug!(bus = %self.inner.config.bus, error = %e, "nack redelivery failed; the entry will be reclaimed after claim_idle");
            }
        }
    }

    fn topic_of(&self, key: &str) -> Option<Topic> {
        key.strip_prefix(&self.inner.config.options.key_prefix)
            .and_then(|t| Topic::new(t).ok())
    }

    async fn deliver(&mut self, key: &str, id: String, fields: Vec<Value>, attempt: u32) {
        let Some(topic) = self.topic_of(key) else {
            Counters::incr(&self.inner.stats.decode_errors);
            return;
        };
        let max = self.inner.config.options.max_payload;
        // A foreign producer is not bound by our max_payload; subscribers are promised it.
        let decoded = decode_entry(topic, fields).and_then(|m| {
            if m.payload.len() > max {
                Err(format!(
                    "payload of {} bytes exceeds max_payload {max}",
                    m.payload.len()
                ))
            } else {
                Ok(m)
            }
        });
        match decoded {
            Ok(message) => {
                let acker = RedisAcker {
                    inner: self.inner.clone(),
                    key: key.into(),
                    group: self.group.clone(),
                    id,
                    nacks: self.nack_tx.clone(),
                };
                let d = Delivery::new(message)
                    .with_attempt(attempt)
                    .with_acker(Box::new(acker))
                    .with_reply_via(self.via.clone());
                self.tx.send(d).await;
            }
            Err(why) => {
                // Foreign or broken entries are counted and acked, so they never block the
                // group or come back.
                Counters::incr(&self.inner.stats.decode_errors);
                tracing::debug!(bus = %self.inner.config.bus, key, id, why, "skipped an undecodable stream entry");
                if let Ok(mut cmd) = self.inner.cmd_connection() {
                    let _: redis::RedisResult<()> = redis::cmd("XACK")
                        .arg(key)
                        .arg(&*self.group)
                        .arg(&id)
                        .query_async(&mut cmd)
                        .await;
                }
            }
        }
    }

    async fn read(&mut self) {
        let inner = self.inner.clone();
        let opts = &inner.config.options;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(opts.read_count)
            .arg("BLOCK")
            .arg(opts.block_ms)
            .arg("STREAMS")
            .arg(&self.keys);
        for _ in &self.keys {
            cmd.arg(">");
        }
        let (con, _) = self.con.as_mut().expect("read runs with a connection");
        let reply: redis::RedisResult<Value> = cmd.query_async(con).await;
        match reply {
            Ok(v) => {
                for (key, es) in read_reply(v) {
                    for (id, fields) in es {
                        self.deliver(&key, id, fields, 1).await;
                    }
                }
            }
            Err(e) if is_connection_error(&e) => {
                let e = self.inner.connector.error("XREADGROUP", e);
                self.lost(e);
            }
            Err(e) if server_code(&e) == Some("NOGROUP") => {
                // The server lost the group (restarted without persistence, or the key was
                // deleted): recreate it; entries now in the key were written after the loss.
                if let Ok(mut cmd) = self.inner.cmd_connection() {
                    for key in self.keys.clone() {
                        let _ = create_group(&mut cmd, &key, &self.group, "0").await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                Counters::incr(&self.inner.stats.errors);
                tracing::warn!(bus = %self.inner.config.bus, error = %self.inner.connector.error("XREADGROUP", e), "stream read failed");
                tokio::time::sleep(self.inner.connector.backoff(3)).await;
            }
        }
    }
}

async fn pending_count(
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
            .flat_map(|(k, v)| [Value::BulkString(k.into_bytes()), Value::BulkString(v)])
            .collect();
        assert_eq!(decode_entry(m.topic.clone(), values).unwrap(), m);
        let bad = vec![
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(b"y".to_vec()),
        ];
        assert!(decode_entry(m.topic.clone(), bad).is_err());
    }
}
