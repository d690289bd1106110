//! Subscriptions (a `Stream` of deliveries) and deliveries (a message plus ack / nack / reply).

use std::any::{Any, TypeId};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::options::Overflow;
use crate::queue::{queue, QueueReceiver, QueueSender};
use crate::stats::{Counters, StatsSnapshot};
use crate::topic::Pattern;

/// Settles one stream-mode delivery with its broker. Transports implement it; users call
/// [`Delivery::ack`] / [`Delivery::nack`] / [`Delivery::ack_all`].
///
/// `Any` is a supertrait so that a transport's [`Acker::ack_with`] can recognise its own
/// ackers among others and settle them together.
#[async_trait]
pub trait Acker: Any + Send + Sync + fmt::Debug {
    /// Marks the delivery processed; it is not delivered again.
    async fn ack(&self) -> Result<()>;
    /// Asks for redelivery, after `delay` when given.
    async fn nack(&self, delay: Option<Duration>) -> Result<()>;
    /// Acks this delivery and `others` together, in as few broker round trips as the
    /// transport allows; `Ok` once every one of them is acked. [`ack_each`] hands a transport
    /// only ackers of its own type (of any of its buses): acks of another bus can be passed
    /// on with [`ack_each`].
    ///
    /// The default acks them all concurrently, one [`Acker::ack`] each.
    async fn ack_with(&self, others: &[&dyn Acker]) -> Result<()> {
        let all = std::iter::once(self.ack()).chain(others.iter().map(|a| a.ack()));
        futures::future::join_all(all).await.into_iter().collect()
    }
}

/// Acks every one of `ackers`: those of each transport's acker type go together to that
/// transport's [`Acker::ack_with`], which batches what it can. `Ok` once all are acked;
/// otherwise the first error (acks are idempotent, so acking the same set again is safe).
pub async fn ack_each(ackers: &[&dyn Acker]) -> Result<()> {
    let mut kinds: Vec<(TypeId, Vec<&dyn Acker>)> = Vec::new();
    for &a in ackers {
        let kind = (a as &dyn Any).type_id();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, same)) => same.push(a),
            None => kinds.push((kind, vec![a])),
        }
    }
    let settle = kinds
        .iter()
        .filter_map(|(_, same)| same.split_first())
        .map(|(first, rest)| first.ack_with(rest));
    futures::future::join_all(settle)
        .await
        .into_iter()
        .collect()
}

/// One message handed to a subscriber.
///
/// In broadcast mode `ack` and `nack` do nothing. In stream mode a delivery that is neither
/// acked nor nacked is delivered again after the subscription's ack timeout.
pub struct Delivery {
    // Shared, so fanning one message out to many subscribers copies a pointer, not the
    // message (its headers are ~150 bytes inline).
    message: Arc<Message>,
    attempt: u32,
    acker: Option<Box<dyn Acker>>,
    reply_via: Option<Arc<dyn Bus>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field("ackable", &self.acker.is_some())
            .finish()
    }
}

impl Delivery {
    /// A delivery with nothing to acknowledge (broadcast mode), first attempt.
    pub fn new(message: Message) -> Delivery {
        Delivery::shared(Arc::new(message))
    }

    /// A delivery of a message shared with other deliveries (fan-out), first attempt.
    pub fn shared(message: Arc<Message>) -> Delivery {
        Delivery {
            message,
            attempt: 1,
            acker: None,
            reply_via: None,
        }
    }

    /// Attaches the handle that acks / nacks this delivery with its broker.
    pub fn with_acker(mut self, acker: Box<dyn Acker>) -> Self {
        self.acker = Some(acker);
        self
    }

    /// Sets which delivery attempt this is (1 for the first).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Sets the bus that [`Delivery::reply`] publishes on (the bus the delivery came from).
    pub fn with_reply_via(mut self, bus: Arc<dyn Bus>) -> Self {
        self.reply_via = Some(bus);
        self
    }

    /// As [`with_reply_via`](Self::with_reply_via), only when the message is a request (has
    /// `reply_to`): nothing else can be answered, and a transport's deliveries would
    /// otherwise all touch the bus handle's one shared reference count.
    pub fn with_reply_via_if_request(self, bus: &Arc<dyn Bus>) -> Self {
        if self.message.headers.reply_to.is_some() {
            self.with_reply_via(bus.clone())
        } else {
            self
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Takes the message out, dropping the ack handle (stream mode: it will be redelivered
    /// after the ack timeout unless acked first).
    pub fn into_message(self) -> Message {
        Arc::try_unwrap(self.message).unwrap_or_else(|shared| (*shared).clone())
    }

    /// The message, shared (no copy).
    pub fn shared_message(&self) -> &Arc<Message> {
        &self.message
    }

    /// Which delivery attempt this is: 1 the first time, more after nacks or timeouts.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether this delivery must be acked (stream mode).
    pub fn is_ackable(&self) -> bool {
        self.acker.is_some()
    }

    /// Acknowledges the delivery. A no-op in broadcast mode.
    pub async fn ack(&self) -> Result<()> {
        match &self.acker {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }

    /// Acknowledges a batch of deliveries together: the transport settles those it can in one
    /// round trip (Redis: one `XACK` per stream key and group, all in one pipeline), where
    /// acking each one makes a round trip (or a share of one) per delivery. Deliveries in
    /// broadcast mode are skipped; deliveries of different buses may be mixed.
    ///
    /// # Errors
    /// The first ack that failed (the others may have succeeded; acks are idempotent, so
    /// acking the whole batch again is safe).
    ///
    /// ```no_run
    /// # async fn run(mut sub: busway::Subscription) -> busway::Result<()> {
    /// let mut batch = Vec::new();
    /// while sub.recv_many(&mut batch, 256).await > 0 {
    ///     // ... handle the batch ...
    ///     busway::Delivery::ack_all(&batch).await?;
    ///     batch.clear();
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ack_all<'a>(deliveries: impl IntoIterator<Item = &'a Delivery>) -> Result<()> {
        let ackers: Vec<&dyn Acker> = deliveries
            .into_iter()
            .filter_map(|d| d.acker.as_deref())
            .collect();
        ack_each(&ackers).await
    }

    /// Asks for redelivery now. A no-op in broadcast mode.
    pub async fn nack(&self) -> Result<()> {
        match &self.acker {
            Some(a) => a.nack(None).await,
            None => Ok(()),
        }
    }

    /// Asks for redelivery after `delay`. A no-op in broadcast mode.
    pub async fn nack_after(&self, delay: Duration) -> Result<()> {
        match &self.acker {
            Some(a) => a.nack(Some(delay)).await,
            None => Ok(()),
        }
    }

    /// Answers a request: publishes `payload` to the message's `reply_to` topic, with its
    /// correlation id, on the bus the request came from.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] when the message has no `reply_to`, or the transport did
    /// not say which bus it came from; otherwise whatever publishing returns.
    pub async fn reply(&self, payload: impl Into<Bytes>) -> Result<()> {
        let to = self.message.headers.reply_to.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot reply to a message on {:?}: it has no reply_to header",
                    self.message.topic.as_str()
                ),
            )
        })?;
        let bus = self.reply_via.as_ref().ok_or_else(|| {
            Error::unsupported("this delivery does not know the bus it came from")
        })?;
        let mut reply = Message::new(to, payload);
        reply.headers.correlation_id = self.message.headers.correlation_id.clone();
        bus.publish(reply).await
    }
}

enum Source {
    Queue(QueueReceiver),
    Stream(Pin<Box<dyn Stream<Item = Delivery> + Send>>),
    /// Several subscriptions polled in turn (see [`Merged`]).
    Merged(Box<Merged>),
}

type Filter = Box<dyn FnMut(&Delivery) -> bool + Send>;

/// A live subscription: a [`Stream`] of [`Delivery`]s.
///
/// Dropping it unsubscribes (transports release broker state through the guard they attach).
/// The stream ends when the bus closes or after [`Subscription::unsubscribe`].
pub struct Subscription {
    source: Source,
    pattern: Pattern,
    stats: Arc<Counters>,
    filter: Option<Filter>,
    guard: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl Subscription {
    /// Makes a subscription fed through a queue of `capacity` with `overflow`. The transport
    /// keeps the returned [`QueueSender`] and pushes deliveries into it. Drops count in the
    /// subscription's stats and in `bus_stats`.
    pub fn channel(
        pattern: Pattern,
        capacity: usize,
        overflow: Overflow,
        bus_stats: Arc<Counters>,
    ) -> (QueueSender, Subscription) {
        let stats = Arc::new(Counters::default());
        let (tx, rx) = queue(capacity, overflow, stats.clone(), bus_stats);
        (
            tx,
            Subscription {
                source: Source::Queue(rx),
                pattern,
                stats,
                filter: None,
                guard: None,
            },
        )
    }

    /// Makes a subscription over any stream of deliveries (the router merges several
    /// subscriptions this way).
    pub fn from_stream(
        pattern: Pattern,
        stream: impl Stream<Item = Delivery> + Send + 'static,
        stats: Arc<Counters>,
    ) -> Subscription {
        Subscription {
            source: Source::Stream(Box::pin(stream)),
            pattern,
            stats,
            filter: None,
            guard: None,
        }
    }

    /// Merges several subscriptions into one that yields from each in turn and ends when
    /// all have ended (the router merges its per-bus subscriptions this way). Its
    /// [`pending`](Subscription::pending) and [`stats`](Subscription::stats) are the sums
    /// of theirs; dropping it drops them all.
    pub fn merge(pattern: Pattern, subs: Vec<Subscription>) -> Subscription {
        let parts = subs
            .into_iter()
            .enumerate()
            .map(|(i, sub)| (i as u64, sub, None))
            .collect();
        Subscription::merged(pattern, Merged::new(parts, 0, 0, None))
    }

    /// Merges `parts` (each under a caller-chosen key, with an optional [`Accept`] rule of
    /// rule generation `generation`) into
    /// one subscription whose set of parts can change while it is open, through the returned
    /// [`MergeHandle`]. The router makes its subscriptions this way, so a reload can move them
    /// to other buses.
    ///
    /// With `dedup_window > 0`, once the subscription has two parts or more it delivers each
    /// message id once among the last `dedup_window` ids it has delivered (see
    /// [`MergeHandle`]); a one-part subscription keeps no window. Messages without an id are
    /// never treated as duplicates. Duplicates dropped count in `duplicates` and ids pushed out
    /// of the full window in `dedup_evictions` of [`Subscription::stats`]; an ackable
    /// duplicate is acked (on a spawned task), as a filtered delivery is.
    pub fn merge_live(
        pattern: Pattern,
        generation: u64,
        parts: Vec<(u64, Subscription, Option<Accept>)>,
        dedup_window: usize,
    ) -> (Subscription, MergeHandle) {
        let control = Arc::new(MergeControl::default());
        let handle = MergeHandle {
            control: control.clone(),
        };
        let merged = Merged::new(parts, generation, dedup_window, Some(control));
        (Subscription::merged(pattern, merged), handle)
    }

    fn merged(pattern: Pattern, merged: Merged) -> Subscription {
        Subscription {
            source: Source::Merged(Box::new(merged)),
            pattern,
            stats: Arc::new(Counters::default()),
            filter: None,
            guard: None,
        }
    }

    /// Keeps only the deliveries `keep` accepts (the router drops those its table would not
    /// have put on the bus they came from). A rejected delivery leaves this subscription's
    /// `delivered` count; an ackable one is acked on a spawned task (within a Tokio runtime;
    /// otherwise it is redelivered after its ack timeout, and rejected again).
    pub fn with_filter(mut self, keep: impl FnMut(&Delivery) -> bool + Send + 'static) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Attaches a value dropped with the subscription: its `Drop` unsubscribes.
    pub fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// This subscription's counters (delivered, dropped by its overflow policy...); for a
    /// merged subscription, the sum over the merged ones.
    pub fn stats(&self) -> StatsSnapshot {
        match &self.source {
            Source::Merged(m) => {
                let mut total = m.retired;
                for part in &m.parts {
                    total.merge(&part.sub.stats());
                }
                let own = self.stats.snapshot();
                total.delivered = total.delivered.saturating_sub(own.duplicates);
                total.duplicates += own.duplicates;
                total.dedup_evictions += own.dedup_evictions;
                total
            }
            _ => self.stats.snapshot(),
        }
    }

    /// The live counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.stats
    }

    /// Messages queued and not yet taken.
    pub fn pending(&self) -> usize {
        match &self.source {
            Source::Queue(rx) => rx.len(),
            Source::Stream(_) => 0,
            Source::Merged(m) => m.parts.iter().map(|p| p.sub.pending()).sum(),
        }
    }

    /// The next delivery, or `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<Delivery> {
        futures::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A delivery that is already queued, without waiting; `None` when nothing is queued
    /// now (or the subscription ended).
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match self.poll_recv(&mut cx) {
            Poll::Ready(d) => d,
            Poll::Pending => None,
        }
    }

    /// Waits for one delivery, then takes those already queued behind it, up to `limit` in
    /// all, appending them to `buf`. Returns how many were added; 0 means the subscription
    /// ended. Consumers that ack a batch concurrently (`futures::future::join_all`) let a
    /// stream transport settle the batch in one round trip instead of one per delivery.
    pub async fn recv_many(&mut self, buf: &mut Vec<Delivery>, limit: usize) -> usize {
        let Some(first) = self.recv().await else {
            return 0;
        };
        buf.push(first);
        let mut n = 1;
        while n < limit {
            match self.try_recv() {
                Some(d) => {
                    buf.push(d);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// The next delivery within `timeout`: `Ok(None)` when the subscription ended,
    /// a [`ErrorKind::Timeout`] error when nothing came in time.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Delivery>> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no message on {:?} within {timeout:?}",
                        self.pattern.as_str()
                    ),
                )
            })
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            let next = match &mut self.source {
                Source::Queue(rx) => rx.poll_recv(cx),
                Source::Stream(s) => s.as_mut().poll_next(cx),
                Source::Merged(m) => m.poll(&self.stats, cx),
            };
            let Poll::Ready(Some(d)) = next else {
                return next;
            };
            let keep = match &mut self.filter {
                Some(keep) => keep(&d),
                None => true,
            };
            if keep {
                return Poll::Ready(Some(d));
            }
            self.reject(d);
        }
    }

    fn reject(&self, d: Delivery) {
        let _ = self
            .stats
            .delivered
            .fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
        ack_dropped(d);
    }

    /// Ends the subscription now (the same as dropping it).
    pub fn unsubscribe(self) {}
}

/// Acks a delivery nobody will see (filtered out, or a duplicate), so a stream bus does not
/// redeliver it forever. Needs a Tokio runtime; without one it is redelivered after its ack
/// timeout and dropped again.
fn ack_dropped(d: Delivery) {
    if d.is_ackable() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = d.ack().await;
            });
        }
    }
}

/// A rule deciding which deliveries of one part of a merged subscription are kept (the router
/// keeps those its routing table would have put on the bus they came from).
pub type Accept = Arc<dyn Fn(&Delivery) -> bool + Send + Sync>;

/// Changes a [`Subscription::merge_live`] subscription while it is open: add parts, widen or
/// narrow what a part keeps, end a part once drained.
///
/// # Behavior
/// Changes are applied by the subscription itself, at the start of its next poll, before it
/// takes any delivery: a change made before a message is published is in effect when that
/// message is judged. "After the backlog" means after the part has handed out what was queued
/// in it when the change was applied, so messages already waiting are judged by the rules
/// they arrived under. A part keeps a delivery when any of its accept rules does (a part
/// added without a rule keeps everything; one whose rules were all forgotten keeps nothing).
/// The subscription ends when it has no part left.
#[derive(Clone)]
pub struct MergeHandle {
    control: Arc<MergeControl>,
}

impl fmt::Debug for MergeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergeHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MergeHandle {
    /// Adds a part under `key`, keeping what `accept` keeps (everything for `None`), under
    /// rule generation `generation`.
    pub fn add(&self, key: u64, sub: Subscription, generation: u64, accept: Option<Accept>) {
        self.send(Change::Add(key, sub, accept.map(|a| (generation, a))));
    }

    /// From now on part `key` also keeps what `accept` keeps (rule `generation`).
    pub fn accept_also(&self, key: u64, generation: u64, accept: Accept) {
        self.send(Change::AcceptAlso(key, generation, accept));
    }

    /// After its backlog, part `key` forgets its rules older than `generation`.
    pub fn forget_before_after_backlog(&self, key: u64, generation: u64) {
        self.send(Change::Later(key, Later::ForgetBefore(generation)));
    }

    /// After its backlog, part `key` ends (and its subscription is dropped).
    pub fn end_after_backlog(&self, key: u64) {
        self.send(Change::Later(key, Later::End));
    }

    /// Whether the subscription was dropped or has ended: changes are then discarded.
    pub fn is_closed(&self) -> bool {
        self.control.closed.load(Relaxed)
    }

    fn send(&self, change: Change) {
        if self.is_closed() {
            return;
        }
        self.control.changes.lock().push(change);
        self.control
            .dirty
            .store(true, std::sync::atomic::Ordering::Release);
        self.control.waker.wake();
    }
}

#[derive(Default)]
struct MergeControl {
    changes: parking_lot::Mutex<Vec<Change>>,
    dirty: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
}

enum Change {
    Add(u64, Subscription, Option<(u64, Accept)>),
    AcceptAlso(u64, u64, Accept),
    Later(u64, Later),
}

enum Later {
    ForgetBefore(u64),
    End,
}

/// One part of a merged subscription.
struct Part {
    key: u64,
    sub: Subscription,
    /// `None`: keeps everything; otherwise keeps what any rule (generation, rule) keeps.
    accept: Option<Vec<(u64, Accept)>>,
    /// Deliveries taken from `sub` so far (before filtering).
    taken: u64,
    /// Changes due once `taken` reaches their mark, in mark order.
    later: Vec<(u64, Later)>,
}

impl Part {
    fn keeps(&self, d: &Delivery) -> bool {
        match &self.accept {
            None => true,
            Some(rules) => rules.iter().any(|(_, keep)| keep(d)),
        }
    }

    /// Applies the changes whose mark is reached; `false` when the part has ended.
    fn due(&mut self) -> bool {
        while self.later.first().is_some_and(|(at, _)| *at <= self.taken) {
            match self.later.remove(0).1 {
                Later::ForgetBefore(generation) => {
                    if let Some(rules) = &mut self.accept {
                        rules.retain(|(g, _)| *g >= generation);
                    }
                }
                Later::End => return false,
            }
        }
        true
    }
}

/// The ids a merged subscription delivered last: a FIFO of hashes bounded by `capacity`.
struct Dedup {
    seen: std::collections::HashSet<u64, foldhash::fast::RandomState>,
    order: std::collections::VecDeque<u64>,
    capacity: usize,
    hasher: foldhash::fast::RandomState,
}

impl Dedup {
    fn new(capacity: usize) -> Dedup {
        Dedup {
            seen: Default::default(),
            order: Default::default(),
            capacity,
            hasher: Default::default(),
        }
    }

    /// Records `id`; `false` when it is already in the window. 64-bit hashes of the ids
    /// (randomly seeded per subscription) keep the window small; two ids colliding within one
    /// window is a chance of about window / 2^64.
    fn first_time(&mut self, id: &str, stats: &Counters) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(id);
        if !self.seen.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
                Counters::incr(&stats.dedup_evictions);
            }
        }
        true
    }
}

/// The source of a merged subscription: its parts, polled in turn.
struct Merged {
    parts: Vec<Part>,
    next: usize,
    control: Option<Arc<MergeControl>>,
    dedup_window: usize,
    /// Allocated once the subscription has had two parts at once.
    dedup: Option<Dedup>,
    /// The counters of parts that ended.
    retired: StatsSnapshot,
}

impl Drop for Merged {
    fn drop(&mut self) {
        if let Some(c) = &self.control {
            c.closed.store(true, Relaxed);
            c.changes.lock().clear();
        }
    }
}

impl Merged {
    fn new(
        parts: Vec<(u64, Subscription, Option<Accept>)>,
        generation: u64,
        dedup_window: usize,
        control: Option<Arc<MergeControl>>,
    ) -> Merged {
        let mut m = Merged {
            parts: Vec::with_capacity(parts.len()),
            next: 0,
            control,
            dedup_window,
            dedup: None,
            retired: StatsSnapshot::default(),
        };
        for (key, sub, accept) in parts {
            m.add(key, sub, accept.map(|a| (generation, a)));
        }
        m
    }

    fn add(&mut self, key: u64, sub: Subscription, rule: Option<(u64, Accept)>) {
        self.parts.push(Part {
            key,
            sub,
            accept: rule.map(|r| vec![r]),
            taken: 0,
            later: Vec::new(),
        });
        if self.parts.len() >= 2 && self.dedup_window > 0 && self.dedup.is_none() {
            self.dedup = Some(Dedup::new(self.dedup_window));
        }
    }

    fn end_part(&mut self, i: usize) {
        let part = self.parts.remove(i);
        self.retired.merge(&part.sub.stats());
        if self.next > i {
            self.next -= 1;
        }
    }

    fn apply_changes(&mut self, control: &MergeControl) {
        let changes = std::mem::take(&mut *control.changes.lock());
        for change in changes {
            match change {
                Change::Add(key, sub, rule) => self.add(key, sub, rule),
                Change::AcceptAlso(key, generation, accept) => {
                    if let Some(p) = self.parts.iter_mut().find(|p| p.key == key) {
                        p.accept
                            .get_or_insert_with(Vec::new)
                            .push((generation, accept));
                    }
                }
                Change::Later(key, later) => {
                    if let Some(p) = self.parts.iter_mut().find(|p| p.key == key) {
                        let at = p.taken + p.sub.pending() as u64;
                        // Marks only grow, so pushing keeps `later` in mark order.
                        p.later.push((at, later));
                    }
                }
            }
        }
    }

    fn poll(&mut self, stats: &Counters, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            if let Some(control) = self.control.clone() {
                if control
                    .dirty
                    .swap(false, std::sync::atomic::Ordering::Acquire)
                {
                    self.apply_changes(&control);
                }
            }
            match self.poll_parts(stats, cx) {
                Poll::Ready(None) => {
                    if let Some(c) = &self.control {
                        c.closed.store(true, Relaxed);
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let Some(control) = &self.control else {
                        return Poll::Pending;
                    };
                    // Registered before the last look, so a change sent after it wakes us.
                    control.waker.register(cx.waker());
                    if !control.dirty.load(std::sync::atomic::Ordering::Acquire) {
                        return Poll::Pending;
                    }
                }
                ready => return ready,
            }
        }
    }

    /// Polls the parts in turn from `next`, so a busy one cannot starve the rest.
    fn poll_parts(&mut self, stats: &Counters, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let mut k = 0;
        while k < self.parts.len() {
            let i = (self.next + k) % self.parts.len();
            if !self.parts[i].due() {
                self.end_part(i);
                // Scan again from the start: every part must be polled (and so wake us)
                // before we may return `Pending`.
                k = 0;
                continue;
            }
            let part = &mut self.parts[i];
            match part.sub.poll_recv(cx) {
                Poll::Ready(Some(d)) => {
                    part.taken += 1;
                    if !part.keeps(&d) {
                        part.sub.reject(d);
                        // Look at the same part again: it may hold more.
                        continue;
                    }
                    let duplicate = match (&mut self.dedup, &d.message().headers.id) {
                        (Some(window), Some(id)) => !window.first_time(id, stats),
                        _ => false,
                    };
                    if duplicate {
                        Counters::incr(&stats.duplicates);
                        ack_dropped(d);
                        continue;
                    }
                    self.next = (i + 1) % self.parts.len();
                    return Poll::Ready(Some(d));
                }
                Poll::Ready(None) => {
                    self.end_part(i);
                    k = 0;
                }
                Poll::Pending => k += 1,
            }
        }
        if self.parts.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

impl Stream for Subscription {
    type Item = Delivery;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_recv(cx)
    }
}
