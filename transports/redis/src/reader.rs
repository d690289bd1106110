//! Stream-mode readers: a fixed number of blocking read connections per bus, shared by every
//! stream subscription of the process.
//!
//! A blocking `XREADGROUP` / `XREAD` holds its connection until it returns, so it cannot
//! share the command connection. Instead of one reader per subscription, a bus has:
//!
//! - **one reader per consumer group** with subscriptions in the process. It issues one
//!   `XREADGROUP GROUP g <consumer> COUNT n BLOCK ms STREAMS k1 k2 ... > > ...` over the union
//!   of the keys its subscriptions need, and hands each entry to *one* of the group's
//!   subscriptions whose pattern matches the entry's topic, in turn (a group is a work queue,
//!   within the process as across processes). Entries stay pending in the group until acked;
//!   `nack` claims the entry back (`XCLAIM`) and delivers it again to the same subscription;
//!   entries idle past the claim time in any consumer are claimed and delivered again;
//!   past `max_deliveries` they go to the dead-letter topic.
//! - **one reader for every subscription without a group**. It issues a plain
//!   `XREAD COUNT n BLOCK ms STREAMS k1 k2 ... id1 id2 ...`, remembering the last id read per
//!   key, and hands each entry to *every* group-less subscription reading that key. No consumer
//!   group holds their pending entries: each subscription keeps the ids of its unacked
//!   deliveries in process; `nack` and the ack timeout deliver them again (read again with
//!   `XRANGE`), `max_deliveries` dead-letters them. So a group-less stream subscription is at-least-once **within the process
//!   lifetime**, not across a crash of the subscriber (a restarted process starts afresh,
//!   from `StartFrom`). Use a group for deliveries that must survive the subscriber.
//!
//! A subscription that joins a reader already reading one of its keys past where the
//! subscription starts is first caught up from that key (`XRANGE`), so `StartFrom::Beginning`
//! and keys found by a wildcard later (read from their first entry) work with a shared read.
//!
//! When subscriptions come or go, the blocked read is woken (`CLIENT UNBLOCK <id>` on the
//! command connection, the reader's id taken with `CLIENT ID` after each connect) so it
//! reads the new key set at once rather than after `block_ms`. A key this process's writer
//! adds to the topic index wakes the readers that have a wildcard subscription the same
//! way; keys created by other processes are found by the rescan every `rescan_ms`.
//!
//! A reader opens its connection with its first subscription and closes it after its last.
//!
//! A group entry goes to a group mate whose queue has room before the reader waits for a
//! full `block` queue, so a stalled member does not hold up its group; a full `block` queue
//! of a group-less subscription holds up the group-less reader, as on the shared pub/sub
//! connection.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::Notify;

use busway::transport::TransportDelivery;
use busway::transport::{QueueSender, TrySend};
use busway::{
    transport::{Acker, Counters},
    Bus, Delivery, Error, Message, Pattern, Result, Topic,
};

use crate::bus::Inner;
use crate::conn::{is_connection_error, ConnCount};
use crate::stream::{
    create_group, decode_entry, entries, pending_count, read_reply, server_code, text, Entry,
};

/// A stream entry id (`ms-seq`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    /// Before every entry.
    pub(crate) const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub(crate) fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The smallest id after this one (an inclusive `XRANGE` start that excludes it).
    fn next(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The readers of one bus, by consumer group (`None`: the group-less reader).
pub(crate) type Registry = HashMap<Option<Arc<str>>, Arc<ReaderHandle>>;

/// What a subscription hands its reader.
pub(crate) struct NewMember {
    pub(crate) pattern: Pattern,
    pub(crate) tx: QueueSender,
    /// Ack timeout (group-less) or claim time (groups).
    pub(crate) idle: Duration,
    /// Its keys, each with the id after which it takes entries (group-less; ignored for
    /// groups, whose position is the group's).
    pub(crate) keys: Vec<(Arc<str>, StreamId)>,
}

struct Join {
    id: u64,
    member: NewMember,
}

#[derive(Default)]
struct Inbox {
    joins: Vec<Join>,
    leaves: Vec<u64>,
    /// Topics this process just added to the index.
    indexed: Vec<Topic>,
}

/// The part of a reader that subscriptions and the writer talk to.
pub(crate) struct ReaderHandle {
    inbox: Mutex<Inbox>,
    /// The reader connection's `CLIENT ID`; 0 while it has none.
    client_id: AtomicU64,
    /// Bumped by every change the reader must see; `seen` is the value its current read
    /// was built after.
    wanted: AtomicU64,
    seen: AtomicU64,
    /// Wakes a reader that waits without a read in flight (no keys yet).
    notify: Notify,
    /// Whether a subscription of this reader has a wildcard (new index topics concern it).
    wildcards: AtomicBool,
    /// A waker task is running.
    waking: AtomicBool,
}

impl fmt::Debug for ReaderHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReaderHandle")
            .field("client_id", &self.client_id.load(Relaxed))
            .finish()
    }
}

impl ReaderHandle {
    /// Makes the reader see its inbox promptly: wakes its blocked read with
    /// `CLIENT UNBLOCK`, retrying while the reader is between reads and has not yet built
    /// its next one (an unblock sent then would be lost). One waker task per reader at a
    /// time: wakes that come while it runs are covered by it, so many subscriptions (or
    /// new topics) at once cost a few unblocks, not one each.
    fn wake(self: &Arc<Self>, inner: &Arc<Inner>) {
        self.wanted.fetch_add(1, SeqCst);
        self.notify.notify_one();
        if self.waking.swap(true, SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.waking.store(false, SeqCst);
            return;
        };
        let me = self.clone();
        let inner = Arc::downgrade(inner);
        rt.spawn(async move {
            let mut tries = 0u32;
            loop {
                if me.seen.load(SeqCst) >= me.wanted.load(SeqCst) {
                    me.waking.store(false, SeqCst);
                    // A wake that came just before the flag went down relied on this task.
                    if me.seen.load(SeqCst) < me.wanted.load(SeqCst)
                        && !me.waking.swap(true, SeqCst)
                    {
                        continue;
                    }
                    return;
                }
                if tries >= 100 || !me.unblock(&inner).await {
                    // Busy delivering, or reconnecting: it rebuilds its read at its next
                    // turn anyway.
                    me.waking.store(false, SeqCst);
                    return;
                }
                tries += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }

    /// Sends `CLIENT UNBLOCK` for the reader's connection; false when there is no reader
    /// connection or no command connection to send it on.
    async fn unblock(&self, inner: &Weak<Inner>) -> bool {
        let id = self.client_id.load(SeqCst);
        let Some(inner) = inner.upgrade().filter(|_| id != 0) else {
            return false;
        };
        let Ok(mut cmd) = inner.cmd_connection() else {
            return false;
        };
        drop(inner);
        redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .query_async::<i64>(&mut cmd)
            .await
            .is_ok()
    }
}

/// Removes its subscription from the reader when the subscription is dropped.
struct Leave {
    handle: Arc<ReaderHandle>,
    inner: Weak<Inner>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.handle.inbox.lock().leaves.push(self.id);
        if let Some(inner) = self.inner.upgrade() {
            self.handle.wake(&inner);
        }
    }
}

/// Adds a subscription to the bus's reader for `group` (`None`: the group-less one),
/// starting that reader (and opening its connection, whose errors the caller gets) when
/// it is the first. Returns the guard that removes it when dropped.
pub(crate) async fn join(
    inner: &Arc<Inner>,
    group: Option<Arc<str>>,
    member: NewMember,
) -> Result<impl std::any::Any + Send + Sync> {
    let stream = &inner.stream;
    let id = stream.next_member.fetch_add(1, Relaxed);
    let mut join = Join { id, member };
    loop {
        join = match push_join(inner, &group, join) {
            Ok(handle) => {
                handle.wake(inner);
                return Ok(Leave {
                    handle,
                    inner: Arc::downgrade(inner),
                    id,
                });
            }
            Err(join) => join,
        };
        // Starting a reader: one at a time, so two first subscriptions of a group do not
        // open two connections.
        let _starting = stream.starting.lock().await;
        if stream.readers.lock().contains_key(&group) {
            continue;
        }
        let (con, client_id) = connect(inner).await?;
        let handle = Arc::new(ReaderHandle {
            inbox: Mutex::new(Inbox::default()),
            client_id: AtomicU64::new(client_id),
            wanted: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            notify: Notify::new(),
            wildcards: AtomicBool::new(false),
            waking: AtomicBool::new(false),
        });
        // The first subscription is in the inbox before the reader can look at it, so the
        // reader never sees itself empty and retires at once.
        handle.inbox.lock().joins.push(join);
        stream.readers.lock().insert(group.clone(), handle.clone());
        let consumer = format!(
            "{}:{:016x}",
            inner.config.client_name,
            rand::random::<u64>()
        );
        let ctx = Arc::new(Ctx {
            inner: inner.clone(),
            via: inner.handle(),
            group: group.clone(),
            consumer,
        });
        let task = Task {
            ctx,
            handle: handle.clone(),
            members: Vec::new(),
            keys: HashMap::new(),
            routes: HashMap::new(),
            turn: 0,
            refused: HashSet::new(),
            con: Some((con, ConnCount::new(&inner.stats))),
            attempt: 0,
            down: false,
        };
        tokio::spawn(task.run());
        return Ok(Leave {
            handle,
            inner: Arc::downgrade(inner),
            id,
        });
    }
}

/// Puts `join` in the inbox of the running reader for `group`; hands it back when there
/// is none. Under the registry lock: a reader retires under it, and only with an empty inbox.
fn push_join(
    inner: &Inner,
    group: &Option<Arc<str>>,
    join: Join,
) -> std::result::Result<Arc<ReaderHandle>, Join> {
    let readers = inner.stream.readers.lock();
    match readers.get(group) {
        Some(handle) => {
            handle.inbox.lock().joins.push(join);
            Ok(handle.clone())
        }
        None => Err(join),
    }
}

/// Tells the readers with a wildcard subscription that this process added `topic` to the
/// index (its first publish), so they read its key without waiting for the rescan.
pub(crate) fn topic_indexed(inner: &Arc<Inner>, topic: &Topic) {
    let readers: Vec<Arc<ReaderHandle>> = {
        let readers = inner.stream.readers.lock();
        readers
            .values()
            .filter(|h| h.wildcards.load(Relaxed))
            .cloned()
            .collect()
    };
    for handle in readers {
        handle.inbox.lock().indexed.push(topic.clone());
        handle.wake(inner);
    }
}

/// A reader connection (its read blocks up to `block_ms`, so its response timeout is
/// longer) and its `CLIENT ID`.
async fn connect(inner: &Inner) -> Result<(MultiplexedConnection, u64)> {
    let read_timeout =
        Duration::from_millis(inner.config.options.block_ms) + inner.config.response_timeout();
    let mut con = inner.connector.connect(Some(read_timeout), None).await?;
    let id: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .map_err(|e| inner.connector.error("CLIENT ID", e))?;
    Ok((con, id))
}

/// What a reader's deliveries need after they leave the reader (to ack, nack, redeliver).
struct Ctx {
    inner: Arc<Inner>,
    /// The bus deliveries reply through (it does not keep the bus open).
    via: Arc<dyn Bus>,
    group: Option<Arc<str>>,
    /// This reader's consumer name in its group.
    consumer: String,
}

impl Ctx {
    fn topic_of(&self, key: &str) -> Option<Topic> {
        key.strip_prefix(&self.inner.config.options.key_prefix)
            .and_then(|t| Topic::new(t).ok())
    }

    /// Decodes an entry of `key`, refusing payloads over `max_payload` (a foreign producer
    /// is not bound by it; subscribers are promised it).
    fn decode(&self, key: &str, fields: Vec<Value>) -> std::result::Result<Message, String> {
        let topic = self
            .topic_of(key)
            .ok_or_else(|| format!("key {key:?} names no topic"))?;
        let m = decode_entry(topic, fields)?;
        let max = self.inner.config.options.max_payload;
        if m.payload.len() > max {
            return Err(format!(
                "payload of {} bytes exceeds max_payload {max}",
                m.payload.len()
            ));
        }
        Ok(m)
    }

    fn undecodable(&self, key: &str, id: &str, why: &str) {
        Counters::incr(&self.inner.stats.decode_errors);
        tracing::debug!(bus = %self.inner.config.bus, key, id, why, "skipped an undecodable stream entry");
    }

    /// Whether an entry delivered `delivered` times goes to the dead-letter topic now.
    fn exhausted(&self, delivered: u32) -> bool {
        self.inner
            .config
            .options
            .max_deliveries
            .is_some_and(|m| delivered >= m)
    }

    /// Publishes an entry that was delivered `delivered` times to the dead-letter topic.
    async fn dead_letter(&self, key: &str, message: Option<Message>, delivered: u32) -> Result<()> {
        let Some(dead) = self.inner.config.options.dead_letter.as_deref() else {
            return Ok(());
        };
        let dead = Topic::new(dead)?;
        let topic = self.topic_of(key);
        let mut message = message.unwrap_or_else(|| Message::new(dead.clone(), Vec::new()));
        message.topic = dead;
        message.headers.insert(
            "dead_letter.topic",
            topic.map(|t| t.as_str().to_string()).unwrap_or_default(),
        );
        message
            .headers
            .insert("dead_letter.deliveries", delivered.to_string());
        if let Some(group) = &self.group {
            message
                .headers
                .insert("dead_letter.group", group.to_string());
        }
        self.via.publish(message).await?;
        Counters::incr(&self.inner.stats.dead_lettered);
        Ok(())
    }

    fn redelivered(&self, tx: &QueueSender) {
        Counters::incr(&self.inner.stats.redelivered);
        Counters::incr(&tx.stats().redelivered);
    }
}

// ---------------------------------------------------------------------------------------
// consumer groups
// ---------------------------------------------------------------------------------------

/// Acks and nacks an entry of a consumer group.
struct GroupAcker {
    ctx: Arc<Ctx>,
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    /// The subscription a nacked entry goes back to.
    tx: QueueSender,
}

impl fmt::Debug for GroupAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupAcker")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl Acker for GroupAcker {
    async fn ack(&self) -> Result<()> {
        crate::ack::ack(&self.ctx.inner, &self.key, &self.group, &self.id).await
    }

    async fn ack_with(&self, others: &[&dyn Acker]) -> Result<()> {
        ack_together(&self.ctx.inner, self, others).await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let (ctx, key, group, id, tx) = (
            self.ctx.clone(),
            self.key.clone(),
            self.group.clone(),
            self.id.clone(),
            self.tx.clone(),
        );
        tokio::spawn(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Err(e) = nack_group(&ctx, &key, &group, &id, &tx).await {
                tracing::debug!(bus = %ctx.inner.config.bus, error = %e, "nack redelivery failed; the entry will be claimed after the claim time");
            }
        });
        Ok(())
    }
}

/// Claims a nacked entry back for this consumer (its delivery count goes up) and delivers
/// it again to the subscription that nacked it, or dead-letters it.
async fn nack_group(
    ctx: &Arc<Ctx>,
    key: &Arc<str>,
    group: &Arc<str>,
    id: &str,
    tx: &QueueSender,
) -> Result<()> {
    let mut cmd = ctx.inner.cmd_connection()?;
    // The delivery count before this claim.
    let delivered = pending_count(&mut cmd, key, group, id).await.unwrap_or(1);
    if let Some((id, fields, attempt)) = claim(ctx, &mut cmd, key, group, id, 0, delivered).await? {
        deliver_group(ctx, key, group, id, fields, attempt, std::iter::once(tx)).await;
    }
    Ok(())
}

/// `XCLAIM`s one entry for this consumer; past `max_deliveries` publishes it to the
/// dead-letter topic and acks it. Returns the entry to deliver again, with its attempt.
async fn claim(
    ctx: &Ctx,
    cmd: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    id: &str,
    min_idle: u64,
    delivered: u32,
) -> Result<Option<(String, Vec<Value>, u32)>> {
    let reply: Value = redis::cmd("XCLAIM")
        .arg(key)
        .arg(group)
        .arg(&ctx.consumer)
        .arg(min_idle)
        .arg(id)
        .query_async(cmd)
        .await
        .map_err(|e| ctx.inner.connector.error("XCLAIM", e))?;
    let Some((id, fields)) = entries(reply).into_iter().next() else {
        return Ok(None);
    };
    if ctx.exhausted(delivered) {
        ctx.dead_letter(key, ctx.decode(key, fields).ok(), delivered)
            .await?;
        redis::cmd("XACK")
            .arg(key)
            .arg(group)
            .arg(&id)
            .exec_async(cmd)
            .await
            .map_err(|e| ctx.inner.connector.error("XACK", e))?;
        return Ok(None);
    }
    Ok(Some((id, fields, delivered.saturating_add(1))))
}

/// Decodes and queues one group entry for the first of `to` (subscriptions in turn order)
/// with room, or, when every queue is full, waits for the first that is open; an
/// undecodable entry is counted and acked, so it never blocks the group or comes back.
/// Preferring a queue with room means one slow subscription of a group does not hold up
/// the entries its group mates could take.
async fn deliver_group<'a>(
    ctx: &Arc<Ctx>,
    key: &Arc<str>,
    group: &Arc<str>,
    id: String,
    fields: Vec<Value>,
    attempt: u32,
    to: impl Iterator<Item = &'a QueueSender> + Clone,
) {
    let message = match ctx.decode(key, fields) {
        Ok(message) => Arc::new(message),
        Err(why) => {
            ctx.undecodable(key, &id, &why);
            if let Ok(mut cmd) = ctx.inner.cmd_connection() {
                let _: redis::RedisResult<()> = redis::cmd("XACK")
                    .arg(&**key)
                    .arg(&**group)
                    .arg(&id)
                    .query_async(&mut cmd)
                    .await;
            }
            return;
        }
    };
    let delivery = |tx: &QueueSender| {
        let acker = GroupAcker {
            ctx: ctx.clone(),
            key: key.clone(),
            group: group.clone(),
            id: id.clone(),
            tx: tx.clone(),
        };
        Delivery::shared(message.clone())
            .with_attempt(attempt)
            .with_acker(Box::new(acker))
            .with_reply_via_if_request(&ctx.via)
    };
    let counted = |tx: &QueueSender| {
        if attempt > 1 {
            ctx.redelivered(tx);
        }
    };
    for tx in to.clone() {
        match tx.try_send(delivery(tx)) {
            TrySend::Queued | TrySend::Dropped => return counted(tx),
            TrySend::Full(_) | TrySend::Closed(_) => {}
        }
    }
    for tx in to {
        if tx.send(delivery(tx)).await {
            return counted(tx);
        }
    }
    // Every subscription went away: the entry stays pending and is claimed after the
    // claim time.
}

// ---------------------------------------------------------------------------------------
// group-less subscriptions
// ---------------------------------------------------------------------------------------

/// An entry handed to a group-less subscription and not yet acked. Only its id is kept (a
/// redelivery reads the entry again), so unacked deliveries of a busy subscription (a
/// dropping queue, a consumer that lags) cost a few bytes each, not a message each.
struct Unacked {
    deliveries: u32,
    /// When it is delivered again unless acked first.
    due: Instant,
}

/// A subscription's queue, and (group-less) what it was handed and has not acked.
struct Target {
    tx: QueueSender,
    idle: Duration,
    unacked: Mutex<HashMap<(Arc<str>, StreamId), Unacked>>,
}

/// Acks and nacks an entry of a group-less subscription, in process.
struct LocalAcker {
    ctx: Arc<Ctx>,
    target: Arc<Target>,
    key: Arc<str>,
    id: StreamId,
}

impl fmt::Debug for LocalAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAcker")
            .field("key", &self.key)
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl Acker for LocalAcker {
    async fn ack(&self) -> Result<()> {
        self.settle();
        Ok(())
    }

    async fn ack_with(&self, others: &[&dyn Acker]) -> Result<()> {
        ack_together(&self.ctx.inner, self, others).await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let delay = delay.unwrap_or_default();
        {
            let mut unacked = self.target.unacked.lock();
            let Some(u) = unacked.get_mut(&(self.key.clone(), self.id)) else {
                return Ok(()); // acked, or already redelivered past max_deliveries
            };
            // The ack-timeout sweep leaves it to the nack.
            u.due = Instant::now() + delay + self.target.idle;
        }
        let (ctx, target, key, id) = (
            self.ctx.clone(),
            self.target.clone(),
            self.key.clone(),
            self.id,
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            redeliver_local(&ctx, &target, &key, id).await;
        });
        Ok(())
    }
}

impl LocalAcker {
    /// Forgets the entry: it is acked (in process; nothing to tell the server).
    fn settle(&self) {
        self.target
            .unacked
            .lock()
            .remove(&(self.key.clone(), self.id));
    }
}

/// `Acker::ack_with` for this transport's ackers: the consumer-group entries of the bus of
/// `inner` go out in one pipeline (one `XACK` per key and group), group-less entries are
/// settled in process, and ackers of other buses or transports are passed on.
async fn ack_together(inner: &Arc<Inner>, first: &dyn Acker, others: &[&dyn Acker]) -> Result<()> {
    let mut entries = Vec::with_capacity(others.len() + 1);
    let mut foreign = Vec::new();
    for &a in std::iter::once(&first).chain(others) {
        let any: &dyn Any = a;
        if let Some(g) = any
            .downcast_ref::<GroupAcker>()
            .filter(|g| Arc::ptr_eq(&g.ctx.inner, inner))
        {
            entries.push((&g.key, &g.group, g.id.as_str()));
        } else if let Some(l) = any.downcast_ref::<LocalAcker>() {
            l.settle();
        } else {
            foreign.push(a);
        }
    }
    let (mine, theirs) = futures::join!(
        crate::ack::ack_batch(inner, entries),
        busway::transport::ack_each(&foreign)
    );
    mine.and(theirs)
}

/// Queues a group-less delivery, tracking it as unacked. Returns false when `target` is gone.
async fn deliver_local(
    ctx: &Arc<Ctx>,
    target: &Arc<Target>,
    key: &Arc<str>,
    id: StreamId,
    message: Arc<Message>,
) -> bool {
    target.unacked.lock().insert(
        (key.clone(), id),
        Unacked {
            deliveries: 1,
            due: Instant::now() + target.idle,
        },
    );
    let acker = LocalAcker {
        ctx: ctx.clone(),
        target: target.clone(),
        key: key.clone(),
        id,
    };
    let d = Delivery::shared(message)
        .with_acker(Box::new(acker))
        .with_reply_via_if_request(&ctx.via);
    if target.tx.send(d).await {
        return true;
    }
    // The subscription is gone: nothing of it will be acked.
    target.unacked.lock().clear();
    false
}

/// Reads entry `id` of `key` again (`XRANGE key id id`); `None` when the stream no longer
/// holds it.
async fn fetch(ctx: &Ctx, key: &str, id: StreamId) -> Result<Option<Vec<Value>>> {
    let mut cmd = ctx.inner.cmd_connection()?;
    let id = id.to_string();
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg(&id)
        .arg(&id)
        .query_async(&mut cmd)
        .await
        .map_err(|e| ctx.inner.connector.error("XRANGE", e))?;
    Ok(entries(reply).into_iter().next().map(|(_, fields)| fields))
}

/// Delivers an unacked group-less entry again (nack or ack timeout), read again from its
/// stream, or dead-letters it past `max_deliveries`.
async fn redeliver_local(ctx: &Arc<Ctx>, target: &Arc<Target>, key: &Arc<str>, id: StreamId) {
    let entry = (key.clone(), id);
    let exhausted = match target.unacked.lock().get(&entry) {
        None => return, // acked meanwhile
        Some(u) => ctx.exhausted(u.deliveries),
    };
    let fields = match fetch(ctx, key, id).await {
        Ok(Some(fields)) => fields,
        Ok(None) => {
            target.unacked.lock().remove(&entry);
            Counters::incr(&ctx.inner.stats.errors);
            tracing::warn!(bus = %ctx.inner.config.bus, key = &**key, id = %id, "an unacked entry was trimmed from its stream (stream_maxlen) before it could be delivered again");
            return;
        }
        Err(e) => {
            // Tried again after the ack timeout.
            if let Some(u) = target.unacked.lock().get_mut(&entry) {
                u.due = Instant::now() + target.idle;
            }
            tracing::debug!(bus = %ctx.inner.config.bus, error = %e, "reading an entry to deliver again failed");
            return;
        }
    };
    // It decoded when first delivered; a foreign rewrite of the key is all that changes that.
    let message = ctx.decode(key, fields).ok();
    if exhausted {
        let Some(u) = target.unacked.lock().remove(&entry) else {
            return;
        };
        if let Err(e) = ctx.dead_letter(key, message, u.deliveries).await {
            Counters::incr(&ctx.inner.stats.errors);
            tracing::warn!(bus = %ctx.inner.config.bus, error = %e, "dead-lettering failed; the entry is dropped");
        }
        return;
    }
    let Some(message) = message else {
        target.unacked.lock().remove(&entry);
        return;
    };
    let attempt = {
        let mut unacked = target.unacked.lock();
        let Some(u) = unacked.get_mut(&entry) else {
            return; // acked while it was read
        };
        u.deliveries = u.deliveries.saturating_add(1);
        u.due = Instant::now() + target.idle;
        u.deliveries
    };
    ctx.redelivered(&target.tx);
    let acker = LocalAcker {
        ctx: ctx.clone(),
        target: target.clone(),
        key: key.clone(),
        id,
    };
    let d = Delivery::new(message)
        .with_attempt(attempt)
        .with_acker(Box::new(acker))
        .with_reply_via_if_request(&ctx.via);
    target.tx.send(d).await;
}

// ---------------------------------------------------------------------------------------
// the reader task
// ---------------------------------------------------------------------------------------

struct Member {
    id: u64,
    pattern: Pattern,
    target: Arc<Target>,
    /// Keys it reads and (group-less) the id after which it takes their entries.
    keys: HashMap<Arc<str>, StreamId>,
}

struct Task {
    ctx: Arc<Ctx>,
    handle: Arc<ReaderHandle>,
    members: Vec<Member>,
    /// The keys read, with (group-less) the last id read.
    keys: HashMap<Arc<str>, StreamId>,
    /// Per key, the members its entries go to (indices into `members`).
    routes: HashMap<Arc<str>, Vec<usize>>,
    /// Round-robin position within a group.
    turn: usize,
    /// Keys found to hold something other than a stream: never read.
    refused: HashSet<Arc<str>>,
    con: Option<(MultiplexedConnection, ConnCount)>,
    attempt: u32,
    down: bool,
}

impl Task {
    fn inner(&self) -> &Arc<Inner> {
        &self.ctx.inner
    }

    fn grouped(&self) -> Option<Arc<str>> {
        self.ctx.group.clone()
    }

    async fn run(mut self) {
        let mut shutdown = self.inner().shutdown.subscribe();
        let rescan = Duration::from_millis(self.inner().config.options.rescan_ms.max(10));
        let mut next_maintenance = Instant::now() + rescan;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let generation = self.handle.wanted.load(SeqCst);
            self.apply_inbox().await;
            if self.members.is_empty() && self.retire() {
                break;
            }
            self.handle.seen.store(generation, SeqCst);
            if self.con.is_none() {
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = self.reconnect() => {}
                }
                continue;
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + rescan;
                if let Err(e) = self.maintenance().await {
                    tracing::debug!(bus = %self.inner().config.bus, error = %e, "stream maintenance failed");
                }
                continue;
            }
            let until = next_maintenance.saturating_duration_since(Instant::now());
            if self.keys.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(until) => {}
                    _ = self.handle.notify.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // A read never blocks past the next maintenance (wildcard rescan, reclaim).
            let block = (self.inner().config.options.block_ms as u128)
                .min(until.as_millis())
                .max(1) as u64;
            let reply = tokio::select! {
                reply = self.read(block) => reply,
                _ = shutdown.changed() => continue,
            };
            match reply {
                Ok(v) => {
                    // Subscriptions that joined while the read was blocked take part in
                    // its entries (they may have been published after they subscribed).
                    self.apply_inbox().await;
                    self.dispatch(read_reply(v)).await;
                }
                Err(e) => self.read_failed(e).await,
            }
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.handle.client_id.store(0, SeqCst);
        self.mark_down(false);
        let group = self.grouped();
        let mut readers = self.inner().stream.readers.lock();
        if readers
            .get(&group)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
        {
            readers.remove(&group);
        }
    }

    /// Leaves the registry when no subscription is left or joining; false when one is
    /// joining after all.
    fn retire(&mut self) -> bool {
        let group = self.grouped();
        let inner = self.ctx.inner.clone();
        let mut readers = inner.stream.readers.lock();
        if !self.handle.inbox.lock().joins.is_empty() {
            return false;
        }
        if readers
            .get(&group)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
        {
            readers.remove(&group);
        }
        true
    }

    fn mark_down(&mut self, down: bool) {
        if down != self.down {
            self.down = down;
            if down {
                self.inner().readers_down.fetch_add(1, Relaxed);
            } else {
                self.inner().readers_down.fetch_sub(1, Relaxed);
            }
        }
    }

    fn lost(&mut self, e: Error) {
        if self.con.take().is_some() {
            tracing::warn!(bus = %self.inner().config.bus, error = %e, "stream reader connection lost");
        }
        self.handle.client_id.store(0, SeqCst);
        self.mark_down(true);
    }

    async fn reconnect(&mut self) {
        tokio::time::sleep(self.inner().connector.backoff(self.attempt)).await;
        match connect(self.inner()).await {
            Ok((con, id)) => {
                self.attempt = 0;
                self.handle.client_id.store(id, SeqCst);
                self.con = Some((con, ConnCount::new(&self.ctx.inner.stats)));
                self.mark_down(false);
                Counters::incr(&self.inner().stats.reconnects);
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                tracing::debug!(bus = %self.inner().config.bus, error = %e, "stream reader reconnect failed");
            }
        }
    }

    /// Takes in joining and leaving subscriptions and topics newly indexed by this process.
    async fn apply_inbox(&mut self) {
        let (joins, leaves, indexed) = {
            let mut inbox = self.handle.inbox.lock();
            (
                std::mem::take(&mut inbox.joins),
                std::mem::take(&mut inbox.leaves),
                std::mem::take(&mut inbox.indexed),
            )
        };
        let before = self.members.len();
        self.members
            .retain(|m| !leaves.contains(&m.id) && !m.target.tx.is_closed());
        let mut changed = self.members.len() != before;
        let mut retry = Vec::new();
        for join in joins {
            if join.member.tx.is_closed() || leaves.contains(&join.id) {
                continue;
            }
            match self.activate(join).await {
                Ok(()) => changed = true,
                Err((join, e)) => {
                    tracing::debug!(bus = %self.inner().config.bus, error = %e, "a stream subscription could not start reading yet; retrying");
                    retry.push(join);
                }
            }
        }
        if !retry.is_empty() {
            // Caught up later: positions move on meanwhile, so the catch-up covers more.
            self.handle.inbox.lock().joins.extend(retry);
        }
        if !indexed.is_empty() {
            let topics: Vec<String> = indexed.iter().map(|t| t.as_str().to_string()).collect();
            if let Err(e) = self.discover(topics).await {
                tracing::debug!(bus = %self.inner().config.bus, error = %e, "reading a newly indexed key failed; the rescan will retry");
            }
            changed = true;
        }
        if changed {
            self.rebuild();
        }
    }

    /// Starts reading for a joining subscription; group-less ones that start behind a key
    /// the reader is already past are caught up first.
    async fn activate(&mut self, join: Join) -> std::result::Result<(), (Join, Error)> {
        let Join { id, member } = join;
        let target = Arc::new(Target {
            tx: member.tx,
            idle: member.idle,
            unacked: Mutex::new(HashMap::new()),
        });
        let mut m = Member {
            id,
            pattern: member.pattern,
            target,
            keys: HashMap::new(),
        };
        let mut keys = member.keys.into_iter();
        while let Some((key, from)) = keys.next() {
            if self.refused.contains(&key) {
                continue;
            }
            match self.catch_up(&m, &key, from).await {
                Ok(from) => {
                    m.keys.insert(key.clone(), from);
                    self.keys.entry(key).or_insert(from);
                }
                Err((progress, e)) => {
                    // What was delivered is not delivered twice; what is left waits.
                    let keys = std::iter::once((key, progress))
                        .chain(keys)
                        .chain(m.keys)
                        .collect();
                    let member = NewMember {
                        pattern: m.pattern,
                        tx: m.target.tx.clone(),
                        idle: m.target.idle,
                        keys,
                    };
                    return Err((Join { id, member }, e));
                }
            }
        }
        self.members.push(m);
        Ok(())
    }

    /// Group-less: delivers `key`'s entries after `from` up to where the reader is, to `m`
    /// alone; returns the id after which `m` takes the key's entries from the shared read.
    /// On failure, returns how far it got.
    async fn catch_up(
        &self,
        m: &Member,
        key: &Arc<str>,
        from: StreamId,
    ) -> std::result::Result<StreamId, (StreamId, Error)> {
        if self.ctx.group.is_some() {
            return Ok(StreamId::ZERO);
        }
        let Some(&until) = self.keys.get(key) else {
            return Ok(from);
        };
        let mut at = from;
        let count = self.inner().config.options.read_count.max(1);
        while at < until {
            let mut cmd = self.inner().cmd_connection().map_err(|e| (at, e))?;
            let reply: Value = redis::cmd("XRANGE")
                .arg(&**key)
                .arg(at.next().to_string())
                .arg(until.to_string())
                .arg("COUNT")
                .arg(count)
                .query_async(&mut cmd)
                .await
                .map_err(|e| (at, self.inner().connector.error("XRANGE", e)))?;
            let batch = entries(reply);
            let n = batch.len();
            for (id, fields) in batch {
                let Some(sid) = StreamId::parse(&id) else {
                    continue;
                };
                at = at.max(sid);
                match self.ctx.decode(key, fields) {
                    Ok(message) => {
                        deliver_local(&self.ctx, &m.target, key, sid, Arc::new(message)).await;
                    }
                    Err(why) => self.ctx.undecodable(key, &id, &why),
                }
            }
            if n < count {
                break;
            }
        }
        Ok(until.max(from))
    }

    /// Rebuilds the read key set and the routes after subscriptions changed.
    fn rebuild(&mut self) {
        let mut wanted: HashSet<Arc<str>> = HashSet::new();
        for m in &self.members {
            wanted.extend(m.keys.keys().cloned());
        }
        self.keys.retain(|k, _| wanted.contains(k));
        for k in wanted {
            self.keys.entry(k).or_insert(StreamId::ZERO);
        }
        self.routes.clear();
        let grouped = self.ctx.group.is_some();
        for key in self.keys.keys() {
            let topic = self.ctx.topic_of(key);
            let to: Vec<usize> = self
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| {
                    if grouped {
                        // A group is one work queue: any member whose pattern matches.
                        m.keys.contains_key(key)
                            || topic.as_ref().is_some_and(|t| m.pattern.matches(t))
                    } else {
                        m.keys.contains_key(key)
                    }
                })
                .map(|(i, _)| i)
                .collect();
            self.routes.insert(key.clone(), to);
        }
        self.handle.wildcards.store(
            self.members.iter().any(|m| !m.pattern.is_literal()),
            Relaxed,
        );
    }

    /// Adds the keys of `topics` to the wildcard subscriptions that match them and do not
    /// read them yet, from their first entry (they had no busway entries when those
    /// subscriptions started).
    async fn discover(&mut self, topics: Vec<String>) -> Result<()> {
        let prefix = self.inner().config.options.key_prefix.clone();
        let mut changed = false;
        let mut result = Ok(());
        for t in topics {
            let key: Arc<str> = format!("{prefix}{t}").into();
            if self.refused.contains(&key) {
                continue;
            }
            for i in 0..self.members.len() {
                let m = &self.members[i];
                if m.pattern.is_literal() || m.keys.contains_key(&key) || !m.pattern.matches_str(&t)
                {
                    continue;
                }
                if let Some(group) = &self.ctx.group {
                    let created = match self.inner().cmd_connection() {
                        Ok(mut cmd) => create_group(&mut cmd, &key, group, "0")
                            .await
                            .map_err(|e| self.inner().connector.error("XGROUP CREATE", e)),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = created {
                        result = Err(e);
                        continue;
                    }
                }
                match self.catch_up(&self.members[i], &key, StreamId::ZERO).await {
                    Ok(from) => {
                        self.members[i].keys.insert(key.clone(), from);
                        self.keys.entry(key.clone()).or_insert(from);
                        changed = true;
                    }
                    // Not added: the next rescan catches it up from its first entry again
                    // (what was delivered may come twice; nothing is skipped).
                    Err((_, e)) => result = Err(e),
                }
            }
        }
        if changed {
            self.rebuild();
        }
        result
    }

    /// Finds new keys for wildcards; reclaims idle group entries, or redelivers group-less
    /// deliveries past their ack timeout.
    async fn maintenance(&mut self) -> Result<()> {
        if self.members.iter().any(|m| !m.pattern.is_literal()) {
            let mut cmd = self.inner().cmd_connection()?;
            let all: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&self.inner().config.options.index_key)
                .query_async(&mut cmd)
                .await
                .map_err(|e| self.inner().connector.error("SMEMBERS", e))?;
            self.discover(all).await?;
        }
        match self.ctx.group.clone() {
            Some(group) => self.reclaim(&group).await,
            None => {
                self.sweep().await;
                Ok(())
            }
        }
    }

    /// Redelivers group-less deliveries unacked past their ack timeout.
    ///
    /// At most `read_count` per subscription per turn (each is read again from its stream),
    /// as the group reclaim takes at most `read_count` per key: a subscription that leaves
    /// many entries unacked (a dropping queue) does not stall the reader for long; the rest
    /// follow at the next turns.
    async fn sweep(&mut self) {
        let now = Instant::now();
        let count = self.inner().config.options.read_count.max(1);
        for i in 0..self.members.len() {
            let target = self.members[i].target.clone();
            let due: Vec<(Arc<str>, StreamId)> = target
                .unacked
                .lock()
                .iter()
                .filter(|(_, u)| u.due <= now)
                .map(|(k, _)| k.clone())
                .take(count)
                .collect();
            for (key, id) in due {
                redeliver_local(&self.ctx, &target, &key, id).await;
            }
        }
    }

    /// Claims the group's entries pending longer than the claim time in any consumer (a
    /// dead or slow one) and delivers them again.
    async fn reclaim(&mut self, group: &Arc<str>) -> Result<()> {
        let Some(idle) = self.members.iter().map(|m| m.target.idle).min() else {
            return Ok(());
        };
        let idle = idle.as_millis() as u64;
        let mut cmd = self.inner().cmd_connection()?;
        let count = self.inner().config.options.read_count;
        let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
        for key in keys {
            let pending: Value = redis::cmd("XPENDING")
                .arg(&*key)
                .arg(&**group)
                .arg("IDLE")
                .arg(idle)
                .arg("-")
                .arg("+")
                .arg(count)
                .query_async(&mut cmd)
                .await
                .map_err(|e| self.inner().connector.error("XPENDING", e))?;
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
                let delivered = u32::try_from(count).unwrap_or(u32::MAX);
                if let Some((id, fields, attempt)) =
                    claim(&self.ctx, &mut cmd, &key, group, &id, idle, delivered).await?
                {
                    self.hand_to_group(&key, group, id, fields, attempt).await;
                }
            }
        }
        Ok(())
    }

    async fn read(&mut self, block: u64) -> redis::RedisResult<Value> {
        let opts = &self.ctx.inner.config.options;
        let mut cmd = match &self.ctx.group {
            Some(group) => {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP").arg(&**group).arg(&self.ctx.consumer);
                cmd
            }
            None => redis::cmd("XREAD"),
        };
        cmd.arg("COUNT")
            .arg(opts.read_count)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS");
        let keys: Vec<(&Arc<str>, &StreamId)> = self.keys.iter().collect();
        for (key, _) in &keys {
            cmd.arg(&***key);
        }
        for (_, id) in &keys {
            match self.ctx.group {
                Some(_) => cmd.arg(">"),
                None => cmd.arg(id.to_string()),
            };
        }
        let Some((con, _)) = self.con.as_mut() else {
            return Ok(Value::Nil);
        };
        cmd.query_async(con).await
    }

    async fn read_failed(&mut self, e: redis::RedisError) {
        if is_connection_error(&e) {
            let e = self.inner().connector.error("stream read", e);
            self.lost(e);
            return;
        }
        if let (Some(group), Some("NOGROUP")) = (self.ctx.group.clone(), server_code(&e)) {
            // The server lost the group (restarted without persistence, or the key was
            // deleted): recreate it; entries now in the key were written after the loss.
            if let Ok(mut cmd) = self.inner().cmd_connection() {
                let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
                for key in keys {
                    let _ = create_group(&mut cmd, &key, &group, "0").await;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
        Counters::incr(&self.inner().stats.errors);
        let wrong_type = server_code(&e) == Some("WRONGTYPE");
        tracing::warn!(bus = %self.inner().config.bus, error = %self.inner().connector.error("stream read", e), "stream read failed");
        if wrong_type {
            // One key that is not a stream (written by something else) fails the whole
            // read: stop reading it, so the other keys go on.
            self.refuse_foreign_keys().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
        tokio::time::sleep(self.inner().connector.backoff(3)).await;
    }

    /// Stops reading the keys that hold something other than a stream.
    async fn refuse_foreign_keys(&mut self) {
        let Ok(mut cmd) = self.inner().cmd_connection() else {
            return;
        };
        let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("TYPE").arg(&**key);
        }
        let Ok(types) = pipe.query_async::<Vec<String>>(&mut cmd).await else {
            return;
        };
        for (key, kind) in keys.into_iter().zip(types) {
            if kind == "stream" || kind == "none" {
                continue;
            }
            tracing::warn!(bus = %self.inner().config.bus, key = &*key, kind, "not reading a key that is not a stream");
            for m in &mut self.members {
                m.keys.remove(&key);
            }
            self.refused.insert(key);
        }
        self.rebuild();
    }

    /// Hands each entry read to its subscription(s).
    async fn dispatch(&mut self, read: Vec<(String, Vec<Entry>)>) {
        for (key, batch) in read {
            let Some((key, _)) = self.keys.get_key_value(key.as_str()) else {
                continue; // no longer read (group entries left are claimed after the claim time)
            };
            let key = key.clone();
            match self.ctx.group.clone() {
                Some(group) => {
                    for (id, fields) in batch {
                        self.hand_to_group(&key, &group, id, fields, 1).await;
                    }
                }
                None => self.fan_out(&key, batch).await,
            }
        }
    }

    /// One group entry to one matching subscription, in turn. With none left (they went
    /// away meanwhile) it stays pending and is claimed after the claim time.
    async fn hand_to_group(
        &mut self,
        key: &Arc<str>,
        group: &Arc<str>,
        id: String,
        fields: Vec<Value>,
        attempt: u32,
    ) {
        let Some(to) = self.routes.get(key) else {
            return;
        };
        self.turn = self.turn.wrapping_add(1);
        let (n, turn, members) = (to.len(), self.turn, &self.members);
        // A closed member's queue refuses the entry and the next one in turn gets it.
        let in_turn = (0..n).map(|k| &members[to[(turn + k) % n]].target.tx);
        deliver_group(&self.ctx, key, group, id, fields, attempt, in_turn).await;
    }

    /// Every entry to every group-less subscription reading the key past where it started.
    async fn fan_out(&mut self, key: &Arc<str>, batch: Vec<Entry>) {
        let targets: Vec<(Arc<Target>, StreamId)> = match self.routes.get(key) {
            Some(to) => to
                .iter()
                .filter_map(|&i| {
                    let m = &self.members[i];
                    Some((m.target.clone(), *m.keys.get(key)?))
                })
                .collect(),
            None => Vec::new(),
        };
        for (id, fields) in batch {
            let Some(sid) = StreamId::parse(&id) else {
                self.ctx.undecodable(key, &id, "the entry id is not ms-seq");
                continue;
            };
            if let Some(at) = self.keys.get_mut(key) {
                *at = (*at).max(sid);
            }
            if !targets.iter().any(|(_, from)| sid > *from) {
                continue;
            }
            let message = match self.ctx.decode(key, fields) {
                Ok(m) => Arc::new(m),
                Err(why) => {
                    self.ctx.undecodable(key, &id, &why);
                    continue;
                }
            };
            for (target, from) in &targets {
                if sid > *from {
                    deliver_local(&self.ctx, target, key, sid, message.clone()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_and_step_like_redis() {
        let a = StreamId::parse("1700000000000-5").unwrap();
        let b = StreamId::parse("1700000000001-0").unwrap();
        assert!(StreamId::ZERO < a && a < b);
        assert_eq!(a.next().to_string(), "1700000000000-6");
        assert_eq!(
            StreamId::parse(&format!("7-{}", u64::MAX))
                .unwrap()
                .next()
                .to_string(),
            "8-0"
        );
        assert!(StreamId::parse("12").is_none());
        assert!(StreamId::parse("a-1").is_none());
    }
}
