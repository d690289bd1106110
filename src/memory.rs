//! The in-memory transport: the embedded default and the test double, with real semantics.
//!
//! Broadcast mode hands each message straight to the queues of the matching subscriptions
//! (one member per consumer group). The topic -> subscriptions decision is cached per topic
//! and invalidated only for the topics a subscription change can affect, so a publish on a
//! known topic is one read lock, one hash lookup and one queue push per subscriber.
//!
//! Stream mode appends each message to a per-topic log (bounded by `retain`) and feeds
//! consumer groups from a cursor per (group, topic); every delivery stays pending until it is
//! acked, and is delivered again after a nack or when its ack timeout passes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::bus::{request_via_inbox, Bus, Capabilities, Mode, INBOX_PREFIX};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::options::{QueueDefaults, StartFrom, SubscribeOptions, DEFAULT_ACK_TIMEOUT};
use crate::queue::{QueueSender, TrySend};
use crate::registry::{BuildContext, TransportFactory};
use crate::stats::{Counters, Health, StatsSnapshot};
use crate::subscription::{Acker, Delivery, Subscription};
use crate::topic::{Pattern, Topic, TopicMap};

/// Settings of a [`MemoryBus`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Broadcast or stream.
    pub mode: Mode,
    /// Queue defaults of subscriptions.
    pub queue: QueueDefaults,
    /// Stream mode: entries retained per topic (oldest trimmed first).
    pub retain: usize,
    /// Largest payload accepted.
    pub max_payload: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            mode: Mode::Broadcast,
            queue: QueueDefaults::default(),
            retain: 100_000,
            max_payload: 64 * 1024 * 1024,
        }
    }
}

impl MemoryConfig {
    /// Default settings in `mode`.
    pub fn new(mode: Mode) -> Self {
        MemoryConfig {
            mode,
            ..MemoryConfig::default()
        }
    }

    /// Sets the subscription queue defaults.
    pub fn queue(mut self, queue: QueueDefaults) -> Self {
        self.queue = queue;
        self
    }

    /// Sets how many entries a stream-mode topic retains (at least 1).
    pub fn retain(mut self, retain: usize) -> Self {
        self.retain = retain.max(1);
        self
    }

    /// Sets the largest payload accepted.
    pub fn max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self
    }
}

/// The cached topic -> subscriptions decision is dropped wholesale past this many topics, so
/// publishing to an unbounded set of topics (reply inboxes) cannot grow it without bound.
const MAX_CACHED_TOPICS: usize = 16 * 1024;

/// An in-process bus.
///
/// Cloning is cheap and every clone is the same bus. Publishing needs a Tokio runtime only
/// when a subscription under `block` is full (the publisher then waits) or in stream mode
/// (ack timeouts are timed by a background task).
///
/// A publish does its work when it is called, not when its future is polled: the message is
/// in every matching subscription's queue (or its stream log) by the time `publish` returns
/// the future, and the future is already complete, even if it is never awaited. Only when a
/// `block` subscription's queue is full does the future wait, and the message reaches that
/// subscription when the future is awaited; every other subscriber has it already.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("name", &self.inner.name)
            .field("mode", &self.inner.config.mode)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

struct Inner {
    name: Arc<str>,
    config: MemoryConfig,
    caps: Capabilities,
    stats: Arc<Counters>,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Broadcast subscriptions (every subscription in broadcast mode; reply inboxes in
    /// stream mode). Lock order: `table` before `cache`.
    table: RwLock<Table>,
    cache: RwLock<TopicMap<Arc<Targets>>>,
    stream: Mutex<StreamState>,
    /// Wakes the stream-mode timer task (a nack with a delay, close).
    timer: Arc<Notify>,
    timer_started: AtomicBool,
    /// This `Inner`'s own handle, for ackers, timer tasks and reply handles.
    me: Weak<Inner>,
}

/// One broadcast subscription.
struct Sub {
    id: u64,
    pattern: Pattern,
    group: Option<Arc<str>>,
    tx: QueueSender,
}

#[derive(Default)]
struct Table {
    exact: TopicMap<Vec<Arc<Sub>>>,
    wild: Vec<Arc<Sub>>,
}

/// The subscriptions one topic goes to.
#[derive(Default)]
struct Targets {
    solo: Vec<Arc<Sub>>,
    groups: Vec<GroupTargets>,
}

/// The members of one group that match a topic, served round-robin.
struct GroupTargets {
    members: Vec<Arc<Sub>>,
    next: AtomicUsize,
}

impl Targets {
    fn is_empty(&self) -> bool {
        self.solo.is_empty() && self.groups.is_empty()
    }

    fn compute(table: &Table, topic: &Topic) -> Targets {
        let mut t = Targets::default();
        let exact = table.exact.get(topic).into_iter().flatten();
        let wild = table.wild.iter().filter(|s| s.pattern.matches(topic));
        for sub in exact.chain(wild) {
            match &sub.group {
                None => t.solo.push(sub.clone()),
                Some(g) => match t
                    .groups
                    .iter_mut()
                    .find(|gt| gt.members[0].group.as_ref() == Some(g))
                {
                    Some(gt) => gt.members.push(sub.clone()),
                    None => t.groups.push(GroupTargets {
                        members: vec![sub.clone()],
                        next: AtomicUsize::new(0),
                    }),
                },
            }
        }
        t
    }
}

/// Removes a subscription from its bus when the subscription is dropped.
struct SubGuard {
    inner: Weak<Inner>,
    id: u64,
    pattern: Pattern,
    stream: bool,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            if self.stream {
                inner.remove_member(self.id);
            } else {
                inner.remove_sub(self.id, &self.pattern);
            }
        }
    }
}

fn is_inbox(topic: &str) -> bool {
    topic
        .strip_prefix(INBOX_PREFIX)
        .is_some_and(|rest| rest.starts_with('.'))
}

impl MemoryBus {
    /// A broadcast-mode bus.
    pub fn new(name: &str) -> MemoryBus {
        Self::with_config(name, MemoryConfig::default())
    }

    /// A stream-mode bus.
    pub fn stream(name: &str) -> MemoryBus {
        Self::with_config(name, MemoryConfig::new(Mode::Stream))
    }

    /// A bus with explicit settings.
    pub fn with_config(name: &str, config: MemoryConfig) -> MemoryBus {
        let caps = match config.mode {
            Mode::Broadcast => Capabilities::broadcast(config.max_payload),
            Mode::Stream => Capabilities::stream(config.max_payload),
        };
        let stats = Arc::new(Counters::default());
        stats.set_health(Health::Up);
        MemoryBus {
            inner: Arc::new_cyclic(|me| Inner {
                name: name.into(),
                config: MemoryConfig {
                    retain: config.retain.max(1),
                    ..config
                },
                caps,
                stats,
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                table: RwLock::new(Table::default()),
                cache: RwLock::new(TopicMap::default()),
                stream: Mutex::new(StreamState::default()),
                timer: Arc::new(Notify::new()),
                timer_started: AtomicBool::new(false),
                me: me.clone(),
            }),
        }
    }

    /// The bus's live counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.inner.stats
    }

    fn closed_error(&self) -> Error {
        Error::closed(format!("bus {:?}", &*self.inner.name))
    }

    fn reply_handle(&self, message: &Message) -> Option<Arc<dyn Bus>> {
        // Only requests need a way back; skipping the allocation keeps plain publishes cheap.
        message
            .headers
            .reply_to
            .as_ref()
            .map(|_| Arc::new(self.clone()) as Arc<dyn Bus>)
    }

    /// Hands `message` to the queue of every matching subscription (one member per group)
    /// without waiting. Returns the deliveries that found their `block` queue full, for the
    /// publisher to wait on; empty (no allocation) in the common case.
    fn deliver_broadcast(&self, message: Message) -> Vec<(Arc<Sub>, Delivery)> {
        let targets = self.inner.targets(&message.topic);
        if targets.is_empty() {
            return Vec::new();
        }
        let reply = self.reply_handle(&message);
        let message = Arc::new(message);
        let make = |m: Arc<Message>| match &reply {
            Some(bus) => Delivery::shared(m).with_reply_via(bus.clone()),
            None => Delivery::shared(m),
        };
        let mut blocked: Vec<(Arc<Sub>, Delivery)> = Vec::new();
        let mut gone: Vec<&Arc<Sub>> = Vec::new();
        for sub in &targets.solo {
            match sub.tx.try_send(make(message.clone())) {
                TrySend::Queued | TrySend::Dropped => {}
                TrySend::Full(d) => blocked.push((sub.clone(), d)),
                TrySend::Closed(_) => gone.push(sub),
            }
        }
        for group in &targets.groups {
            let n = group.members.len();
            let start = group.next.fetch_add(1, Ordering::Relaxed);
            let mut delivery = Some(make(message.clone()));
            let mut first_full = None;
            for i in 0..n {
                let member = &group.members[(start + i) % n];
                let Some(d) = delivery.take() else { break };
                match member.tx.try_send(d) {
                    TrySend::Queued | TrySend::Dropped => {}
                    TrySend::Full(d) => {
                        first_full.get_or_insert(member);
                        delivery = Some(d);
                    }
                    TrySend::Closed(d) => {
                        gone.push(member);
                        delivery = Some(d);
                    }
                }
            }
            // Every live member is full under `block`: wait for the first one tried.
            if let (Some(d), Some(member)) = (delivery, first_full) {
                blocked.push((member.clone(), d));
            }
        }
        for sub in gone {
            self.inner.remove_sub(sub.id, &sub.pattern);
        }
        blocked
    }

    /// Waits for room in the full `block` queues, after every other subscriber was served:
    /// a full queue delays the publisher, never the other subscribers of this message.
    async fn wait_blocked(&self, blocked: Vec<(Arc<Sub>, Delivery)>) -> Result<()> {
        for (sub, d) in blocked {
            if !sub.tx.send(d).await {
                self.inner.remove_sub(sub.id, &sub.pattern);
            }
        }
        Ok(())
    }

    /// Everything a publish does that needs no waiting. Returns the deliveries that must
    /// still wait for room under `block` (none, and no allocation, in the common case).
    fn publish_now(&self, message: Message) -> Result<Vec<(Arc<Sub>, Delivery)>> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        inner.caps.check_payload(&inner.name, &message)?;
        Counters::incr(&inner.stats.published);
        if inner.config.mode == Mode::Stream && !is_inbox(message.topic.as_str()) {
            self.publish_stream(message);
            return Ok(Vec::new());
        }
        Ok(self.deliver_broadcast(message))
    }

    fn subscribe_broadcast(
        &self,
        pattern: Pattern,
        options: &SubscribeOptions,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        let (capacity, overflow) = options.queue(inner.config.queue);
        let (tx, sub) =
            Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Sub {
            id,
            pattern: pattern.clone(),
            group: options.group.as_deref().map(Arc::from),
            tx,
        });
        {
            let mut table = inner.table.write();
            // Checked under the lock `close` takes after setting the flag: a subscription
            // either sees the close or is ended by it.
            if inner.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            match pattern.as_topic() {
                Some(topic) => table.exact.entry(topic).or_default().push(entry),
                None => table.wild.push(entry),
            }
            inner.invalidate(&pattern);
        }
        Ok(sub.with_guard(SubGuard {
            inner: Arc::downgrade(inner),
            id,
            pattern,
            stream: false,
        }))
    }
}

impl Inner {
    /// The subscriptions `topic` goes to, from the cache or computed and cached.
    fn targets(&self, topic: &Topic) -> Arc<Targets> {
        if let Some(t) = self.cache.read().get(topic.as_str()) {
            return t.clone();
        }
        // Computed and inserted under the table's read lock, so a concurrent subscription
        // change (which holds the write lock while invalidating) cannot be missed.
        let table = self.table.read();
        let targets = Arc::new(Targets::compute(&table, topic));
        let mut cache = self.cache.write();
        if cache.len() >= MAX_CACHED_TOPICS {
            cache.clear();
        }
        cache.insert(topic.clone(), targets.clone());
        targets
    }

    /// Forgets the cached decisions `pattern` can change. Called with the table write-locked.
    fn invalidate(&self, pattern: &Pattern) {
        let mut cache = self.cache.write();
        match pattern.as_topic() {
            Some(topic) => {
                cache.remove(&topic);
            }
            None => cache.retain(|topic, _| !pattern.matches(topic)),
        }
    }

    fn remove_sub(&self, id: u64, pattern: &Pattern) {
        let mut table = self.table.write();
        let removed = match pattern.as_topic() {
            Some(topic) => match table.exact.get_mut(&topic) {
                Some(subs) => {
                    let before = subs.len();
                    subs.retain(|s| s.id != id);
                    let removed = subs.len() != before;
                    if subs.is_empty() {
                        table.exact.remove(&topic);
                    }
                    removed
                }
                None => false,
            },
            None => {
                let before = table.wild.len();
                table.wild.retain(|s| s.id != id);
                table.wild.len() != before
            }
        };
        if removed {
            self.invalidate(pattern);
        }
    }
}

/// The future of a publish that completed when it was made: ready at once with `Ok`, and
/// zero-sized, so boxing it does not allocate.
struct Published;

impl Future for Published {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    // Written as `async_trait` expands it, not as an `async fn`: the work is done here,
    // synchronously, and the common outcome is returned as a zero-sized ready future, whose
    // box allocates nothing. Only a publish that must wait for room under `block` returns a
    // real future.
    fn publish<'life0, 'async_trait>(
        &'life0 self,
        message: Message,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        match self.publish_now(message) {
            Ok(blocked) if blocked.is_empty() => Box::pin(Published),
            Ok(blocked) => Box::pin(self.wait_blocked(blocked)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        self.inner
            .caps
            .check_subscribe(&self.inner.name, &pattern, &options)?;
        if self.inner.config.mode == Mode::Stream && !is_inbox(pattern.as_str()) {
            self.subscribe_stream(pattern, &options)
        } else {
            self.subscribe_broadcast(pattern, &options)
        }
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        if self.inner.config.mode == Mode::Broadcast
            && self.inner.targets(&message.topic).is_empty()
        {
            return Err(Error::new(
                ErrorKind::NoResponders,
                format!(
                    "request on {:?} (bus {:?}): nobody is subscribed",
                    message.topic.as_str(),
                    &*self.inner.name
                ),
            ));
        }
        request_via_inbox(self, message, timeout).await
    }

    async fn flush(&self) -> Result<()> {
        // A publish has reached every subscriber's queue by the time it returns.
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let inner = &*self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.stats.set_health(Health::Closed);
        {
            let mut table = inner.table.write();
            let table = std::mem::take(&mut *table);
            for sub in table.exact.values().flatten().chain(&table.wild) {
                sub.tx.close();
            }
            inner.cache.write().clear();
        }
        {
            let mut st = inner.stream.lock();
            for group in st.groups.values() {
                for m in &group.members {
                    m.tx.close();
                }
            }
            st.groups.clear();
            st.named.clear();
        }
        inner.timer.notify_one();
        Ok(())
    }

    fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }
}

// ---------------------------------------------------------------------------------------
// Stream mode
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct StreamState {
    /// Sequence across all topics: orders "published after the group was created".
    next_gseq: u64,
    logs: HashMap<Topic, Log>,
    groups: HashMap<u64, Group>,
    named: HashMap<Arc<str>, u64>,
}

/// One topic's retained entries; `base` is the topic sequence of `entries[0]`.
#[derive(Default)]
struct Log {
    base: u64,
    entries: VecDeque<(u64, Message)>,
}

impl Log {
    fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    fn get(&self, seq: u64) -> Option<&Message> {
        let at = seq.checked_sub(self.base)?;
        self.entries.get(at as usize).map(|(_, m)| m)
    }
}

/// A consumer group (named, or the private group of one subscription without a group).
struct Group {
    /// Entries with a global sequence below this are not for the group.
    start_gseq: u64,
    members: Vec<Member>,
    next: usize,
    cursors: HashMap<Topic, Cursor>,
    /// Private groups die with their only member; named groups keep their cursors.
    private: bool,
}

struct Member {
    id: u64,
    pattern: Pattern,
    tx: QueueSender,
    ack_timeout: Duration,
    /// A delivery is waiting for room in this member's `block` queue.
    stalled: bool,
}

#[derive(Default)]
struct Cursor {
    /// The next topic sequence to hand out.
    next: u64,
    pending: BTreeMap<u64, Pending>,
}

struct Pending {
    attempt: u32,
    due: Instant,
    member: u64,
}

struct MemAcker {
    inner: Weak<Inner>,
    group: u64,
    topic: Topic,
    seq: u64,
    attempt: u32,
}

impl fmt::Debug for MemAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemAcker")
            .field("topic", &self.topic)
            .field("seq", &self.seq)
            .field("attempt", &self.attempt)
            .finish()
    }
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(&self) -> Result<()> {
        if let Some(inner) = self.inner.upgrade() {
            let mut st = inner.stream.lock();
            if let Some(c) = st
                .groups
                .get_mut(&self.group)
                .and_then(|g| g.cursors.get_mut(&self.topic))
            {
                c.pending.remove(&self.seq);
            }
        }
        Ok(())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let mut st = inner.stream.lock();
        let Some(p) = st
            .groups
            .get_mut(&self.group)
            .and_then(|g| g.cursors.get_mut(&self.topic))
            .and_then(|c| c.pending.get_mut(&self.seq))
        else {
            return Ok(());
        };
        // A nack of an older attempt (already redelivered) changes nothing.
        if p.attempt != self.attempt {
            return Ok(());
        }
        p.due = Instant::now() + delay.unwrap_or_default();
        match delay {
            None => {
                inner.redeliver_due(&mut st, Instant::now());
            }
            Some(_) => inner.timer.notify_one(),
        }
        Ok(())
    }
}

impl MemoryBus {
    fn publish_stream(&self, message: Message) {
        let inner = &*self.inner;
        let mut st = inner.stream.lock();
        let gseq = st.next_gseq;
        st.next_gseq += 1;
        let topic = message.topic.clone();
        let log = st.logs.entry(topic.clone()).or_default();
        log.entries.push_back((gseq, message));
        if log.entries.len() > inner.config.retain {
            log.entries.pop_front();
            log.base += 1;
        }
        let st = &mut *st;
        for (&gid, group) in st.groups.iter_mut() {
            if group.members.iter().any(|m| m.pattern.matches(&topic)) {
                inner.pump(&st.logs, gid, group, &topic);
            }
        }
    }

    fn subscribe_stream(
        &self,
        pattern: Pattern,
        options: &SubscribeOptions,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        inner.start_timer();
        let (capacity, overflow) = options.queue(inner.config.queue);
        let (tx, sub) =
            Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let member = Member {
            id,
            pattern: pattern.clone(),
            tx,
            ack_timeout: options.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT),
            stalled: false,
        };
        {
            let mut st = inner.stream.lock();
            if inner.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            let st = &mut *st;
            let start_gseq = match options.start {
                StartFrom::New => st.next_gseq,
                StartFrom::Beginning => 0,
            };
            let new_group = |private| Group {
                start_gseq,
                members: Vec::new(),
                next: 0,
                cursors: HashMap::new(),
                private,
            };
            let gid = match &options.group {
                Some(name) => match st.named.get(name.as_str()) {
                    Some(&gid) => gid,
                    None => {
                        st.named.insert(name.as_str().into(), id);
                        st.groups.insert(id, new_group(false));
                        id
                    }
                },
                None => {
                    st.groups.insert(id, new_group(true));
                    id
                }
            };
            let group = st.groups.get_mut(&gid).expect("group just found or made");
            group.members.push(member);
            // Retained entries (a replay, or what a named group has not consumed yet) and
            // pending entries nobody could take before.
            let topics: Vec<Topic> = st
                .logs
                .keys()
                .filter(|t| pattern.matches(t))
                .cloned()
                .collect();
            for topic in topics {
                inner.pump(&st.logs, gid, group, &topic);
            }
            inner.redeliver_due(st, Instant::now());
        }
        Ok(sub.with_guard(SubGuard {
            inner: Arc::downgrade(inner),
            id,
            pattern,
            stream: true,
        }))
    }
}

impl Inner {
    /// Hands the group's next entries of `topic` to its members until they run out or every
    /// matching member is stalled.
    fn pump(&self, logs: &HashMap<Topic, Log>, gid: u64, group: &mut Group, topic: &Topic) {
        let Some(log) = logs.get(topic) else { return };
        let cursor = group.cursors.entry(topic.clone()).or_insert_with(|| {
            let skip = log.entries.partition_point(|(g, _)| *g < group.start_gseq);
            Cursor {
                next: log.base + skip as u64,
                pending: BTreeMap::new(),
            }
        });
        if cursor.next < log.base {
            // Trimmed before this group read them: lost to it.
            let lost = log.base - cursor.next;
            self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
            cursor.next = log.base;
        }
        while cursor.next < log.end() {
            let Some(mi) = pick_member(&group.members, &mut group.next, topic) else {
                return;
            };
            let seq = cursor.next;
            cursor.next += 1;
            let message = log.get(seq).expect("seq within the log").clone();
            let member = &mut group.members[mi];
            cursor.pending.insert(
                seq,
                Pending {
                    attempt: 1,
                    due: Instant::now() + member.ack_timeout,
                    member: member.id,
                },
            );
            let d = self.stream_delivery(message, gid, topic, seq, 1);
            self.offer(gid, member, d);
        }
    }

    fn stream_delivery(
        &self,
        message: Message,
        gid: u64,
        topic: &Topic,
        seq: u64,
        attempt: u32,
    ) -> Delivery {
        // A strong handle only for requests; it lives as long as the delivery.
        let reply = match message.headers.reply_to {
            Some(_) => self
                .me
                .upgrade()
                .map(|inner| Arc::new(MemoryBus { inner }) as Arc<dyn Bus>),
            None => None,
        };
        let mut d = Delivery::new(message)
            .with_attempt(attempt)
            .with_acker(Box::new(MemAcker {
                inner: self.me.clone(),
                group: gid,
                topic: topic.clone(),
                seq,
                attempt,
            }));
        if let Some(bus) = reply {
            d = d.with_reply_via(bus);
        }
        d
    }

    /// Queues `d` to `member`; a full `block` queue stalls the member and a task waits for
    /// room, so the bus lock is never held across a wait.
    fn offer(&self, gid: u64, member: &mut Member, d: Delivery) {
        match member.tx.try_send(d) {
            TrySend::Queued | TrySend::Dropped | TrySend::Closed(_) => {
                // A closed member is removed by its guard; its pending entries are then
                // redelivered to the others.
            }
            TrySend::Full(d) => {
                member.stalled = true;
                let tx = member.tx.clone();
                let id = member.id;
                let weak = self.me.clone();
                tokio::spawn(async move {
                    let sent = tx.send(d).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let mut st = inner.stream.lock();
                    let st = &mut *st;
                    let Some(group) = st.groups.get_mut(&gid) else {
                        return;
                    };
                    if let Some(m) = group.members.iter_mut().find(|m| m.id == id) {
                        m.stalled = false;
                    }
                    let _ = sent;
                    let topics: Vec<Topic> = group.cursors.keys().cloned().collect();
                    for topic in topics {
                        inner.pump(&st.logs, gid, group, &topic);
                    }
                    inner.redeliver_due(st, Instant::now());
                });
            }
        }
    }

    /// Delivers again every pending entry whose time has come; returns the next due time.
    fn redeliver_due(&self, st: &mut StreamState, now: Instant) -> Option<Instant> {
        let mut next_due: Option<Instant> = None;
        let logs = &st.logs;
        for (&gid, group) in st.groups.iter_mut() {
            for (topic, cursor) in group.cursors.iter_mut() {
                let log = logs.get(topic);
                let due: Vec<u64> = cursor
                    .pending
                    .iter()
                    .filter(|(_, p)| p.due <= now)
                    .map(|(&seq, _)| seq)
                    .collect();
                for seq in due {
                    let Some(message) = log.and_then(|l| l.get(seq)).cloned() else {
                        // Trimmed from the log: it cannot come back.
                        cursor.pending.remove(&seq);
                        Counters::incr(&self.stats.dropped);
                        continue;
                    };
                    let Some(mi) = pick_member(&group.members, &mut group.next, topic) else {
                        break;
                    };
                    let member = &mut group.members[mi];
                    let p = cursor.pending.get_mut(&seq).expect("listed above");
                    p.attempt += 1;
                    p.due = now + member.ack_timeout;
                    p.member = member.id;
                    let attempt = p.attempt;
                    Counters::incr(&self.stats.redelivered);
                    Counters::incr(&member.tx.stats().redelivered);
                    let d = self.stream_delivery(message, gid, topic, seq, attempt);
                    self.offer(gid, member, d);
                }
                for p in cursor.pending.values() {
                    if p.due > now {
                        next_due = Some(next_due.map_or(p.due, |n| n.min(p.due)));
                    }
                }
            }
        }
        next_due
    }

    fn remove_member(&self, id: u64) {
        let mut st = self.stream.lock();
        let st = &mut *st;
        let Some((&gid, group)) = st
            .groups
            .iter_mut()
            .find(|(_, g)| g.members.iter().any(|m| m.id == id))
        else {
            return;
        };
        group.members.retain(|m| m.id != id);
        if group.private {
            st.groups.remove(&gid);
            return;
        }
        // What the member held unacked goes to the others now rather than after its timeout.
        let now = Instant::now();
        for cursor in group.cursors.values_mut() {
            for p in cursor.pending.values_mut() {
                if p.member == id {
                    p.due = now;
                }
            }
        }
        self.redeliver_due(st, now);
    }

    fn start_timer(self: &Arc<Inner>) {
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let notify = self.timer.clone();
        tokio::spawn(async move {
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (next, tick) = {
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.closed.load(Ordering::Acquire) {
                        return;
                    }
                    let mut st = inner.stream.lock();
                    let next = inner.redeliver_due(&mut st, Instant::now());
                    // Entries handed out after this scan do not wake us: re-scan often enough
                    // that the shortest ack timeout is honoured within a quarter of itself.
                    let shortest = st
                        .groups
                        .values()
                        .flat_map(|g| g.members.iter().map(|m| m.ack_timeout))
                        .min()
                        .unwrap_or(DEFAULT_ACK_TIMEOUT);
                    let tick =
                        (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    (next, tick)
                };
                let wake = Instant::now() + tick;
                let wake = next.map_or(wake, |n| n.min(wake));
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = notified => {}
                }
            }
        });
    }
}

/// The next live, unstalled member matching `topic`, round-robin.
fn pick_member(members: &[Member], next: &mut usize, topic: &Topic) -> Option<usize> {
    let n = members.len();
    for i in 0..n {
        let at = (*next + i) % n;
        let m = &members[at];
        if !m.stalled && m.pattern.matches(topic) && !m.tx.is_closed() {
            *next = at + 1;
            return Some(at);
        }
    }
    None
}

/// The keys a `memory` bus reads besides the common ones (`transport`, `mode`, `url`,
/// `capacity`, `overflow`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryOptions {
    /// Stream mode: entries retained per topic (default 100 000).
    retain: Option<usize>,
    /// Largest payload accepted in bytes (default 64 MiB).
    max_payload: Option<usize>,
}

/// Builds [`MemoryBus`]es for `transport = "memory"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFactory;

#[async_trait]
impl TransportFactory for MemoryFactory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn build(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>> {
        let opts: MemoryOptions = ctx.options()?;
        let mut config = MemoryConfig::new(ctx.config.mode).queue(ctx.config.queue_defaults());
        if let Some(retain) = opts.retain {
            if retain == 0 {
                return Err(ctx.config_error("retain", "must be at least 1"));
            }
            config.retain = retain;
        }
        if let Some(max) = opts.max_payload {
            if max == 0 {
                return Err(ctx.config_error("max_payload", "must be at least 1"));
            }
            config.max_payload = max;
        }
        Ok(Arc::new(MemoryBus::with_config(ctx.bus, config)))
    }
}
