//! Broadcast mode's subscriptions (its publishes are `PUBLISH`es on the publish path): one
//! RESP3 pub/sub connection per bus shared by every subscription, with messages dispatched by
//! channel or glob to the subscriptions' queues.
//!
//! A literal pattern becomes `SUBSCRIBE <topic>`; a wildcard pattern becomes
//! `PSUBSCRIBE <glob>` where both `*` and `>` become the glob `*` (which also matches dots, so
//! the glob matches a superset); every delivery is then checked with
//! [`Pattern::matches`](busway::Pattern::matches), so `a.*` never delivers `a.b.c`.
//! Subscriptions with the same channel or glob share one Redis subscription.
//!
//! **Memory is bounded whatever publishers send.** redis-rs hands pushes to a sender that it
//! calls from the task reading the socket and that must not wait, so a channel between it
//! and dispatch would be unbounded. Instead the connection runs on a thread of its own (a
//! one-thread runtime with nothing else on it) and its sender waits for room in a channel
//! of [`PUSH_BUFFER`] pushes: while dispatch waits for a full `block` queue, the connection
//! stops reading, the socket's buffers fill, and the server's `client-output-buffer-limit
//! pubsub` applies: the server disconnects us, as it would any slow subscriber, and the task
//! reports it, reconnects and resubscribes. Commands sent meanwhile still go out; their
//! replies come once dispatch has room (or the command times out and the connection is
//! renewed), so the bus never deadlocks.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};

use busway::transport::{
    Counters, Framing, QueueSender, TransportDelivery, TransportSubscription, TrySend,
};
use busway::{
    topic::PatternToken, Bus, Delivery, Error, ErrorKind, Message, Pattern, Result,
    SubscribeOptions, Subscription, Topic,
};

use crate::config::Unframed;
use crate::connect::{is_connection_error, Con, ConnCount};
use crate::state::Shared;
use crate::wire;

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

#[derive(Clone)]
struct Entry {
    id: u64,
    pattern: Pattern,
    tx: QueueSender,
}

enum Ctl {
    Subscribe(Key, oneshot::Sender<()>),
    Unsubscribe(Key),
}

/// The broadcast subscriptions of one bus, by Redis subscription.
pub(crate) struct Broadcast {
    shared: Arc<Shared>,
    /// Per Redis subscription, its busway subscriptions: shared with dispatch, which takes
    /// one reference per message (no copy of the list); changed copy-on-write.
    table: Mutex<HashMap<Key, Arc<Vec<Entry>>>>,
    ctl: mpsc::UnboundedSender<Ctl>,
    ctl_rx: Mutex<Option<mpsc::UnboundedReceiver<Ctl>>>,
    start: tokio::sync::Mutex<bool>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Broadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broadcast")
            .field("keys", &self.table.lock().len())
            .finish()
    }
}

/// Removes a subscription from the table when dropped.
struct SubGuard {
    broadcast: Weak<Broadcast>,
    key: Key,
    id: u64,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        let Some(ps) = self.broadcast.upgrade() else {
            return;
        };
        let mut table = ps.table.lock();
        if let Some(entries) = table.get_mut(&self.key) {
            Arc::make_mut(entries).retain(|e| e.id != self.id);
            if entries.is_empty() {
                table.remove(&self.key);
                let _ = ps.ctl.send(Ctl::Unsubscribe(self.key.clone()));
            }
        }
    }
}

impl Broadcast {
    pub(crate) fn new(shared: Arc<Shared>) -> Broadcast {
        let (ctl, rx) = mpsc::unbounded_channel();
        Broadcast {
            shared,
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
            for e in entries.iter() {
                e.tx.close();
            }
        }
    }

    /// A subscription to `pattern`; its deliveries of requests reply through `via`.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        pattern: Pattern,
        options: &SubscribeOptions,
        via: Arc<dyn Bus>,
    ) -> Result<Subscription> {
        let (ps, shared) = (self, &self.shared);
        {
            // The first subscription opens the connection here, so its errors reach the caller
            // and the subscription is live when this returns.
            let mut started = ps.start.lock().await;
            if !*started {
                let (con, push_rx) = open(shared).await?;
                let ctl_rx = ps
                    .ctl_rx
                    .lock()
                    .take()
                    .expect("the pub/sub task starts once");
                shared.pubsub_up.store(true, Relaxed);
                shared.pubsub_started.store(true, Relaxed);
                let task = Task {
                    shared: shared.clone(),
                    broadcast: self.clone(),
                    con: Some(con),
                    push_rx,
                    ctl_rx,
                    attempt: 0,
                    last_foreign_warn: None,
                    foreign_since_warn: 0,
                    via,
                    moves_at_connect: shared.connector.primary_moves(),
                    cluster_resubscribe: false,
                };
                tokio::spawn(task.run());
                *started = true;
            }
        }
        let (capacity, overflow) = options.queue(shared.config.queue);
        let (tx, sub) =
            Subscription::channel(pattern.clone(), capacity, overflow, shared.stats.clone());
        let key = Key::for_pattern(&pattern);
        let id = ps.next_id.fetch_add(1, Relaxed);
        let is_new = {
            let mut table = ps.table.lock();
            let entries = Arc::make_mut(table.entry(key.clone()).or_default());
            entries.push(Entry { id, pattern, tx });
            entries.len() == 1
        };
        let guard = SubGuard {
            broadcast: Arc::downgrade(self),
            key: key.clone(),
            id,
        };
        if is_new {
            let (done_tx, done_rx) = oneshot::channel();
            let _ = ps.ctl.send(Ctl::Subscribe(key, done_tx));
            // While disconnected the subscription starts with the connection's return (the
            // task resubscribes the whole table); while connected, wait for the server's
            // confirmation so that messages published after this returns are delivered.
            if shared.pubsub_up.load(Relaxed) {
                let _ = tokio::time::timeout(shared.config.response_timeout(), done_rx).await;
            }
        }
        Ok(sub.with_guard(guard))
    }
}

/// Pushes read from the pub/sub connection and not yet dispatched: with the subscriptions'
/// queues, all the memory the connection holds (plus one frame being read).
const PUSH_BUFFER: usize = 128;

/// An open pub/sub connection and the thread that reads it.
struct Conn {
    con: Con,
    _count: ConnCount,
    /// Dropped with the connection: ends the thread that reads it (and so closes it).
    _stop: oneshot::Sender<()>,
}

/// Opens the pub/sub connection on a thread of its own, whose pushes wait for room in the
/// returned channel (see the module docs for why).
async fn open(shared: &Arc<Shared>) -> Result<(Conn, mpsc::Receiver<PushInfo>)> {
    let (push_tx, push_rx) = mpsc::channel::<PushInfo>(PUSH_BUFFER);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::Connection,
            format!(
                "bus {:?}: pub/sub connection: {what}: {e}",
                shared.config.bus
            ),
        )
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed("cannot start its runtime", &e))?;
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("busway-pubsub-{}", shared.config.bus))
        .spawn(move || {
            runtime.block_on(async move {
                // Waiting here blocks the thread, which runs nothing but this connection:
                // it stops reading the socket until dispatch has room. `unconstrained`: the
                // reading task's coop budget must not make the wait spin.
                let push = move |p: PushInfo| {
                    futures::executor::block_on(tokio::task::unconstrained(push_tx.send(p)))
                };
                let con = thread_shared.connector.connect_with_push(push).await;
                let ok = con.is_ok();
                drop(thread_shared);
                if ready_tx.send(con).is_ok() && ok {
                    let _ = stop_rx.await;
                }
            });
        })
        .map_err(|e| failed("cannot start its thread", &e))?;
    let con = ready_rx
        .await
        .map_err(|_| failed("its thread ended", &"no connection"))??;
    let conn = Conn {
        con,
        _count: ConnCount::new(&shared.stats),
        _stop: stop_tx,
    };
    Ok((conn, push_rx))
}

struct Task {
    shared: Arc<Shared>,
    broadcast: Arc<Broadcast>,
    con: Option<Conn>,
    push_rx: mpsc::Receiver<PushInfo>,
    ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    attempt: u32,
    last_foreign_warn: Option<std::time::Instant>,
    foreign_since_warn: u64,
    /// The bus deliveries reply through (an internal handle: it does not keep the bus open).
    via: Arc<dyn Bus>,
    /// [`Connector::primary_moves`](crate::connect::Connector::primary_moves) when the
    /// connection opened.
    moves_at_connect: u64,
    /// A cluster node's connection was lost: its sharded subscriptions must be made again on
    /// the primaries that serve their slots now.
    cluster_resubscribe: bool,
}

/// How often a cluster bus retries `SSUBSCRIBE` of every channel after a node's connection
/// was lost, until every one succeeds (the slots' new primary is known once the cluster has
/// failed over and the cluster client has re-read the slot map).
const CLUSTER_RESUBSCRIBE: std::time::Duration = std::time::Duration::from_millis(100);

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
        let mut shutdown = self.shared.shutdown.subscribe();
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
                    // On a cluster one node's connection went: the other shards'
                    // subscriptions stay; the lost ones are made again where their slots
                    // now live (see `resubscribe_cluster`).
                    Some(p) if p.kind == PushKind::Disconnection && self.shared.config.is_cluster() => {
                        tracing::warn!(bus = %self.shared.config.bus, "pub/sub: a cluster node's connection was lost; resubscribing on the slots' current primaries");
                        self.cluster_resubscribe = true;
                    }
                    Some(p) if p.kind == PushKind::Disconnection => self.lost(CLOSED_BY_SERVER),
                    Some(p) => self.dispatch(p).await,
                    None => self.lost(CLOSED_BY_SERVER),
                },
                _ = tokio::time::sleep(CLUSTER_RESUBSCRIBE), if self.cluster_resubscribe => {
                    self.resubscribe_cluster().await;
                }
                _ = self.shared.pubsub_moved.notified() => {
                    // A notice from before this connection opened is stale.
                    if self.shared.connector.primary_moves() != self.moves_at_connect {
                        self.lost("the sentinels named another primary");
                    }
                }
            }
        }
        self.shared.pubsub_up.store(false, Relaxed);
        self.broadcast.close_all();
    }

    /// Awaits `fut` (a command on the pub/sub connection) while dispatching what the
    /// connection reads meanwhile: its reply comes after the pushes before it, and the
    /// connection reads nothing while the push channel is full.
    async fn drive<T>(&mut self, fut: impl Future<Output = T>) -> T {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                push = self.push_rx.recv() => match push {
                    Some(p) if p.kind != PushKind::Disconnection => self.dispatch(p).await,
                    Some(_) if self.shared.config.is_cluster() => {}
                    // The connection is gone: the command fails with it.
                    _ => return fut.await,
                },
            }
        }
    }

    fn lost(&mut self, why: &str) {
        if self.con.take().is_some() {
            tracing::warn!(bus = %self.shared.config.bus, why, "pub/sub connection lost");
        }
        self.shared.pubsub_up.store(false, Relaxed);
    }

    async fn control(&mut self, ctl: Ctl) {
        let (key, done, subscribe) = match ctl {
            Ctl::Subscribe(key, done) => (key, Some(done), true),
            Ctl::Unsubscribe(key) => (key, None, false),
        };
        // The table is the truth: a key may have come and gone since the message was sent.
        let wanted = self.broadcast.table.lock().contains_key(&key);
        if wanted != subscribe {
            return;
        }
        let Some(conn) = &self.con else {
            return; // resubscribed from the table on reconnect
        };
        let mut con = conn.con.clone();
        let (cmd, arg) = args(&key, subscribe);
        let glob = matches!(key, Key::Glob(_));
        let command = async move {
            match (subscribe, glob) {
                (true, false) => con.subscribe(&[arg]).await,
                (true, true) => con.psubscribe(&[arg]).await,
                (false, false) => con.unsubscribe(arg).await,
                (false, true) => con.punsubscribe(arg).await,
            }
        };
        let result = self.drive(command).await;
        if let Err(e) = result {
            if is_connection_error(&e) {
                self.lost("a subscribe failed");
            } else {
                Counters::incr(&self.shared.stats.errors);
                tracing::warn!(bus = %self.shared.config.bus, error = %self.shared.connector.error(cmd, e), "pub/sub command refused");
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    async fn reconnect(&mut self) {
        tokio::select! {
            _ = tokio::time::sleep(self.shared.connector.backoff(self.attempt)) => {}
            _ = self.shared.pubsub_retry.notified() => {}
        }
        let (conn, push_rx) = match open(&self.shared).await {
            Ok(opened) => {
                self.moves_at_connect = self.shared.connector.primary_moves();
                opened
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                tracing::debug!(bus = %self.shared.config.bus, error = %e, "pub/sub reconnect failed");
                return;
            }
        };
        let (channels, globs): (Vec<String>, Vec<String>) = {
            let table = self.broadcast.table.lock();
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
        // Messages may arrive before the last confirmation: dispatched as they come.
        self.push_rx = push_rx;
        let mut con = conn.con.clone();
        let (c, g) = (&channels, &globs);
        let resubscribe = async move {
            if !c.is_empty() {
                con.subscribe(c).await?;
            }
            if !g.is_empty() {
                con.psubscribe(g).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        if let Err(e) = self.drive(resubscribe).await {
            self.attempt = self.attempt.saturating_add(1);
            tracing::debug!(bus = %self.shared.config.bus, error = %self.shared.connector.error("resubscribe", e), "pub/sub resubscribe failed");
            return;
        }
        self.attempt = 0;
        self.con = Some(conn);
        self.shared.pubsub_up.store(true, Relaxed);
        Counters::incr(&self.shared.stats.reconnects);
        tracing::info!(bus = %self.shared.config.bus, channels = channels.len(), globs = globs.len(), "pub/sub connection re-established and resubscribed");
        // Subscribe requests queued during the outage are covered by the resubscription.
        while let Ok(ctl) = self.ctl_rx.try_recv() {
            self.control(ctl).await;
        }
    }

    /// `SSUBSCRIBE` of every channel again, each routed to the primary of its slot now; a
    /// channel still subscribed on a live shard is unaffected (the server ignores a repeat).
    /// Stays pending until every one succeeds.
    async fn resubscribe_cluster(&mut self) {
        let Some(conn) = &self.con else {
            return;
        };
        let mut con = conn.con.clone();
        let channels: Vec<String> = self
            .broadcast
            .table
            .lock()
            .keys()
            .filter_map(|k| match k {
                Key::Channel(c) => Some(c.clone()),
                Key::Glob(_) => None,
            })
            .collect();
        let c = &channels;
        let again = async move {
            for channel in c {
                con.subscribe(&[channel]).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        match self.drive(again).await {
            Ok(()) => {
                self.cluster_resubscribe = false;
                Counters::incr(&self.shared.stats.reconnects);
                tracing::info!(bus = %self.shared.config.bus, channels = channels.len(), "pub/sub: resubscribed on the cluster's current primaries");
            }
            Err(e) => {
                tracing::debug!(bus = %self.shared.config.bus, error = %self.shared.connector.error("SSUBSCRIBE", e), "pub/sub: cluster resubscribe failed; retrying");
            }
        }
    }

    async fn dispatch(&mut self, push: PushInfo) {
        let mut data = push.data.into_iter();
        // The channel is the key's own string for a channel subscription (not copied), the
        // push's for a glob.
        let (key, glob_channel, payload) = match push.kind {
            // SMessage: sharded pub/sub (a cluster).
            PushKind::Message | PushKind::SMessage => {
                let (Some(c), Some(p)) = (data.next(), data.next()) else {
                    return;
                };
                let Some(c) = as_string(c) else {
                    Counters::incr(&self.shared.stats.decode_errors);
                    return;
                };
                (Key::Channel(c), None, p)
            }
            PushKind::PMessage => {
                let (Some(g), Some(c), Some(p)) = (data.next(), data.next(), data.next()) else {
                    return;
                };
                let (Some(g), Some(c)) = (as_string(g), as_string(c)) else {
                    Counters::incr(&self.shared.stats.decode_errors);
                    return;
                };
                (Key::Glob(g), Some(c), p)
            }
            _ => return, // subscribe confirmations and the like
        };
        let channel: &str = match (&key, &glob_channel) {
            (_, Some(c)) | (Key::Channel(c), None) => c,
            (Key::Glob(_), None) => return,
        };
        let Ok(topic) = Topic::new(channel) else {
            // A channel that is not a busway topic (a glob superset can catch one, a foreign
            // publisher can send one).
            self.foreign(channel, "the channel is not a valid busway topic");
            return;
        };
        // One lookup and one reference: the list is not copied, nor the lock held while the
        // deliveries wait for room.
        let Some(entries) = self.broadcast.table.lock().get(&key).cloned() else {
            return;
        };
        if !entries.iter().any(|e| e.pattern.matches(&topic)) {
            return;
        }
        let payload = match payload {
            Value::BulkString(b) => Bytes::from(b),
            _ => {
                Counters::incr(&self.shared.stats.decode_errors);
                return;
            }
        };
        let message = match (self.shared.config.framing, self.shared.config.unframed) {
            (Framing::Raw, _) => Message::new(topic, payload),
            (Framing::Busway, Unframed::Skip) => match wire::decode(topic, payload) {
                Ok(m) => m,
                Err(e) => {
                    self.foreign(channel, &e.to_string());
                    return;
                }
            },
            (Framing::Busway, Unframed::Deliver) => {
                match wire::decode(topic.clone(), payload.clone()) {
                    Ok(m) => m,
                    Err(e) => {
                        Counters::incr(&self.shared.stats.unframed);
                        tracing::trace!(bus = %self.shared.config.bus, channel, why = %e, "delivered a foreign payload without headers");
                        Message::new(topic, payload)
                    }
                }
            }
        };
        // A foreign publisher is not bound by our max_payload; subscribers are promised it.
        let max = self.shared.config.max_payload;
        if message.payload.len() > max {
            Counters::incr(&self.shared.stats.decode_errors);
            tracing::debug!(bus = %self.shared.config.bus, channel, size = message.payload.len(), max_payload = max, "skipped a message larger than max_payload");
            return;
        }
        // One message, shared by its subscribers' deliveries instead of copied for each.
        let message = std::sync::Arc::new(message);
        for e in entries.iter().filter(|e| e.pattern.matches(&message.topic)) {
            let d = Delivery::shared(message.clone()).with_reply_via_if_request(&self.via);
            // Only a full `block` queue waits.
            if let TrySend::Full(d) = e.tx.try_send(d) {
                e.tx.send(d).await;
            }
        }
    }
}

/// Why the pub/sub connection ended when the server closed it: a subscriber that falls
/// behind is disconnected by the server at its `client-output-buffer-limit pubsub`.
const CLOSED_BY_SERVER: &str = "the server closed the connection (a server restart, or a subscriber too slow for its client-output-buffer-limit pubsub)";

/// How often a foreign message is logged at warn: once, then at most once a minute, so a
/// foreign publisher cannot flood the log.
const FOREIGN_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Task {
    /// Counts a message that is not for busway (not a frame, or not on a busway topic) and
    /// says so at warn, rate-limited.
    fn foreign(&mut self, channel: &str, why: &str) {
        Counters::incr(&self.shared.stats.decode_errors);
        self.foreign_since_warn += 1;
        let now = std::time::Instant::now();
        if self
            .last_foreign_warn
            .is_some_and(|at| now.duration_since(at) < FOREIGN_WARN_EVERY)
        {
            tracing::debug!(bus = %self.shared.config.bus, channel, why, "skipped a foreign message");
            return;
        }
        tracing::warn!(
            bus = %self.shared.config.bus,
            channel,
            why,
            skipped = self.foreign_since_warn,
            "skipped messages that are not busway frames on a busway topic (a foreign publisher?); counted in decode_errors"
        );
        self.foreign_since_warn = 0;
        self.last_foreign_warn = Some(now);
    }
}

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}
