//! Broadcast subscriptions: one RESP3 pub/sub connection per bus shared by every
//! subscription, with messages dispatched by channel or glob to the subscriptions' queues.
//!
//! A literal pattern becomes `SUBSCRIBE <topic>`; a wildcard pattern becomes
//! `PSUBSCRIBE <glob>` where both `*` and `>` become the glob `*` (which also matches dots, so
//! the glob matches a superset); every delivery is then checked with
//! [`Pattern::matches`](busway::Pattern::matches), so `a.*` never delivers `a.b.c`.
//! Subscriptions with the same channel or glob share one Redis subscription.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};

use busway::transport::QueueSender;
use busway::transport::{TransportDelivery, TransportSubscription};
use busway::{
    topic::PatternToken, transport::Counters, Bus, Delivery, Message, Pattern, Result,
    SubscribeOptions, Subscription, Topic,
};

use crate::bus::Inner;
use crate::config::Framing;
use crate::conn::{is_connection_error, ConnCount};
use crate::frame;

/// A Redis subscription: an exact channel or a glob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Channel(String),
    Glob(String),
}

impl Key {
    pub(crate) fn for_pattern(pattern: &Pattern) -> Key {
        if let Some(topic) = pattern.as_topic() {
            return Key::Channel(topic.as_str().to_string());
        }
        let glob: Vec<String> = pattern
            .tokens()
            .iter()
            .map(|t| match t {
                PatternToken::Literal(lit) => {
                    let mut s = String::with_capacity(lit.len());
                    for c in lit.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            s.push('\\');
                        }
                        s.push(c);
                    }
                    s
                }
                PatternToken::One | PatternToken::Rest => "*".to_string(),
            })
            .collect();
        Key::Glob(glob.join("."))
    }
}

struct Entry {
    id: u64,
    pattern: Pattern,
    tx: QueueSender,
}

enum Ctl {
    Subscribe(Key, oneshot::Sender<()>),
    Unsubscribe(Key),
}

/// The shared pub/sub state of one bus.
pub(crate) struct PubSub {
    table: Mutex<HashMap<Key, Vec<Entry>>>,
    ctl: mpsc::UnboundedSender<Ctl>,
    ctl_rx: Mutex<Option<mpsc::UnboundedReceiver<Ctl>>>,
    start: tokio::sync::Mutex<bool>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("keys", &self.table.lock().len())
            .finish()
    }
}

/// Removes a subscription from the table when dropped.
struct SubGuard {
    inner: Weak<Inner>,
    key: Key,
    id: u64,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let ps = &inner.pubsub;
        let mut table = ps.table.lock();
        if let Some(entries) = table.get_mut(&self.key) {
            entries.retain(|e| e.id != self.id);
            if entries.is_empty() {
                table.remove(&self.key);
                let _ = ps.ctl.send(Ctl::Unsubscribe(self.key.clone()));
            }
        }
    }
}

impl PubSub {
    pub(crate) fn new() -> PubSub {
        let (ctl, rx) = mpsc::unbounded_channel();
        PubSub {
            table: Mutex::new(HashMap::new()),
            ctl,
            ctl_rx: Mutex::new(Some(rx)),
            start: tokio::sync::Mutex::new(false),
            next_id: Default::default(),
        }
    }

    /// Closes every subscription's queue (the bus is closing).
    pub(crate) fn close_all(&self) {
        for (_, entries) in self.table.lock().drain() {
            for e in entries {
                e.tx.close();
            }
        }
    }

    pub(crate) async fn subscribe(
        inner: &Arc<Inner>,
        pattern: Pattern,
        options: &SubscribeOptions,
    ) -> Result<Subscription> {
        let ps = &inner.pubsub;
        {
            // The first subscription opens the connection here, so its errors reach the caller
            // and the subscription is live when this returns.
            let mut started = ps.start.lock().await;
            if !*started {
                let (push_tx, push_rx) = mpsc::unbounded_channel();
                let con = inner.connector.connect(None, Some(push_tx)).await?;
                let ctl_rx = ps
                    .ctl_rx
                    .lock()
                    .take()
                    .expect("the pub/sub task starts once");
                inner.pubsub_up.store(true, Relaxed);
                inner.pubsub_started.store(true, Relaxed);
                let task = Task {
                    inner: inner.clone(),
                    con: Some((con, ConnCount::new(&inner.stats))),
                    push_rx,
                    ctl_rx,
                    attempt: 0,
                    via: inner.handle(),
                };
                tokio::spawn(task.run());
                *started = true;
            }
        }
        let (capacity, overflow) = options.queue(inner.config.queue);
        let (tx, sub) =
            Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
        let key = Key::for_pattern(&pattern);
        let id = ps.next_id.fetch_add(1, Relaxed);
        let is_new = {
            let mut table = ps.table.lock();
            let entries = table.entry(key.clone()).or_default();
            entries.push(Entry { id, pattern, tx });
            entries.len() == 1
        };
        let guard = SubGuard {
            inner: Arc::downgrade(inner),
            key: key.clone(),
            id,
        };
        if is_new {
            let (done_tx, done_rx) = oneshot::channel();
            let _ = ps.ctl.send(Ctl::Subscribe(key, done_tx));
            // While disconnected the subscription starts with the connection's return (the
            // task resubscribes the whole table); while connected, wait for the server's
            // confirmation so that messages published after this returns are delivered.
            if inner.pubsub_up.load(Relaxed) {
                let _ = tokio::time::timeout(inner.config.response_timeout(), done_rx).await;
            }
        }
        Ok(sub.with_guard(guard))
    }
}

struct Task {
    inner: Arc<Inner>,
    con: Option<(MultiplexedConnection, ConnCount)>,
    push_rx: mpsc::UnboundedReceiver<PushInfo>,
    ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    attempt: u32,
    /// The bus deliveries reply through (an internal handle: it does not keep the bus open).
    via: Arc<dyn Bus>,
}

fn args(key: &Key, subscribe: bool) -> (&'static str, &str) {
    match (key, subscribe) {
        (Key::Channel(c), true) => ("SUBSCRIBE", c),
        (Key::Glob(g), true) => ("PSUBSCRIBE", g),
        (Key::Channel(c), false) => ("UNSUBSCRIBE", c),
        (Key::Glob(g), false) => ("PUNSUBSCRIBE", g),
    }
}

impl Task {
    async fn run(mut self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.con.is_none() {
                tokio::select! {
                    _ = shutdown.changed() => continue,
                    _ = self.reconnect() => continue,
                }
            }
            tokio::select! {
                _ = shutdown.changed() => continue,
                ctl = self.ctl_rx.recv() => match ctl {
                    Some(ctl) => self.control(ctl).await,
                    None => break,
                },
                push = self.push_rx.recv() => match push {
                    Some(p) if p.kind == PushKind::Disconnection => self.lost("the server closed the connection"),
                    Some(p) => self.dispatch(p).await,
                    None => self.lost("the connection ended"),
                },
            }
        }
        self.inner.pubsub_up.store(false, Relaxed);
        self.inner.pubsub.close_all();
    }

    fn lost(&mut self, why: &str) {
        if self.con.take().is_some() {
            tracing::warn!(bus = %self.inner.config.bus, why, "pub/sub connection lost");
        }
        self.inner.pubsub_up.store(false, Relaxed);
    }

    async fn control(&mut self, ctl: Ctl) {
        let (key, done, subscribe) = match ctl {
            Ctl::Subscribe(key, done) => (key, Some(done), true),
            Ctl::Unsubscribe(key) => (key, None, false),
        };
        // The table is the truth: a key may have come and gone since the message was sent.
        let wanted = self.inner.pubsub.table.lock().contains_key(&key);
        if wanted != subscribe {
            return;
        }
        let Some((con, _)) = &mut self.con else {
            return; // resubscribed from the table on reconnect
        };
        let (cmd, arg) = args(&key, subscribe);
        let result = match (subscribe, &key) {
            (true, Key::Channel(_)) => con.subscribe(arg).await,
            (true, Key::Glob(_)) => con.psubscribe(arg).await,
            (false, Key::Channel(_)) => con.unsubscribe(arg).await,
            (false, Key::Glob(_)) => con.punsubscribe(arg).await,
        };
        if let Err(e) = result {
            if is_connection_error(&e) {
                self.lost("a subscribe failed");
            } else {
                Counters::incr(&self.inner.stats.errors);
                tracing::warn!(bus = %self.inner.config.bus, error = %self.inner.connector.error(cmd, e), "pub/sub command refused");
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    async fn reconnect(&mut self) {
        tokio::time::sleep(self.inner.connector.backoff(self.attempt)).await;
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let mut con = match self.inner.connector.connect(None, Some(push_tx)).await {
            Ok(con) => con,
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                tracing::debug!(bus = %self.inner.config.bus, error = %e, "pub/sub reconnect failed");
                return;
            }
        };
        let (channels, globs): (Vec<String>, Vec<String>) = {
            let table = self.inner.pubsub.table.lock();
            let mut c = Vec::new();
            let mut g = Vec::new();
            for key in table.keys() {
                match key {
                    Key::Channel(s) => c.push(s.clone()),
                    Key::Glob(s) => g.push(s.clone()),
                }
            }
            (c, g)
        };
        let mut result = Ok(());
        if !channels.is_empty() {
            result = con.subscribe(&channels).await;
        }
        if result.is_ok() && !globs.is_empty() {
            result = con.psubscribe(&globs).await;
        }
        if let Err(e) = result {
            self.attempt = self.attempt.saturating_add(1);
            tracing::debug!(bus = %self.inner.config.bus, error = %self.inner.connector.error("resubscribe", e), "pub/sub resubscribe failed");
            return;
        }
        self.attempt = 0;
        self.push_rx = push_rx;
        self.con = Some((con, ConnCount::new(&self.inner.stats)));
        self.inner.pubsub_up.store(true, Relaxed);
        Counters::incr(&self.inner.stats.reconnects);
        tracing::info!(bus = %self.inner.config.bus, channels = channels.len(), globs = globs.len(), "pub/sub connection re-established and resubscribed");
        // Subscribe requests queued during the outage are covered by the resubscription.
        while let Ok(ctl) = self.ctl_rx.try_recv() {
            self.control(ctl).await;
        }
    }

    async fn dispatch(&mut self, push: PushInfo) {
        let mut data = push.data.into_iter();
        let (key, channel, payload) = match push.kind {
            PushKind::Message => {
                let (Some(c), Some(p)) = (data.next(), data.next()) else {
                    return;
                };
                let Some(c) = as_string(c) else {
                    Counters::incr(&self.inner.stats.decode_errors);
                    return;
                };
                (Key::Channel(c.clone()), c, p)
            }
            PushKind::PMessage => {
                let (Some(g), Some(c), Some(p)) = (data.next(), data.next(), data.next()) else {
                    return;
                };
                let (Some(g), Some(c)) = (as_string(g), as_string(c)) else {
                    Counters::incr(&self.inner.stats.decode_errors);
                    return;
                };
                (Key::Glob(g), c, p)
            }
            _ => return, // subscribe confirmations and the like
        };
        let Ok(topic) = Topic::new(&channel) else {
            // A channel that is not a busway topic (a glob superset can catch one).
            return;
        };
        let targets: Vec<QueueSender> = {
            let table = self.inner.pubsub.table.lock();
            match table.get(&key) {
                Some(entries) => entries
                    .iter()
                    .filter(|e| e.pattern.matches(&topic))
                    .map(|e| e.tx.clone())
                    .collect(),
                None => return,
            }
        };
        if targets.is_empty() {
            return;
        }
        let payload = match payload {
            Value::BulkString(b) => Bytes::from(b),
            _ => {
                Counters::incr(&self.inner.stats.decode_errors);
                return;
            }
        };
        let message = if self.inner.config.options.framing == Framing::Raw {
            Message::new(topic, payload)
        } else {
            match frame::decode(topic, payload) {
                Ok(m) => m,
                Err(e) => {
                    Counters::incr(&self.inner.stats.decode_errors);
                    tracing::debug!(bus = %self.inner.config.bus, channel, error = %e, "skipped an undecodable message");
                    return;
                }
            }
        };
        // A foreign publisher is not bound by our max_payload; subscribers are promised it.
        let max = self.inner.config.options.max_payload;
        if message.payload.len() > max {
            Counters::incr(&self.inner.stats.decode_errors);
            tracing::debug!(bus = %self.inner.config.bus, channel, size = message.payload.len(), max_payload = max, "skipped a message larger than max_payload");
            return;
        }
        // One message, shared by its subscribers' deliveries instead of copied for each.
        let message = std::sync::Arc::new(message);
        for tx in targets {
            tx.send(Delivery::shared(message.clone()).with_reply_via_if_request(&self.via))
                .await;
        }
    }
}

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}
