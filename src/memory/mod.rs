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

use crate::bus::{request_via_inbox, Bus, Capabilities, Mode};
use crate::config::ConfigDuration;
use crate::delivery::{Acker, Delivery};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::options::{QueueDefaults, StartFrom, SubscribeOptions, DEFAULT_ACK_TIMEOUT};
use crate::queue::{QueueSender, TrySend};
use crate::registry::{BuildContext, TransportFactory};
use crate::stats::{Counters, Health, StatsSnapshot};
use crate::subscription::Subscription;
use crate::topic::{Pattern, Topic, TopicMap};
use crate::transport::{is_inbox, BoxFuture, TransportDelivery, TransportSubscription};

mod broadcast;
mod factory;
mod stream;

pub use factory::MemoryFactory;

use broadcast::{Sub, Table, Targets};
use stream::StreamState;

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
    /// Stream mode: how long `close` waits for subscribers to take the entries their groups
    /// have not been handed yet; what is left after it is counted in `dropped`.
    pub close_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            mode: Mode::Broadcast,
            queue: QueueDefaults::default(),
            retain: 100_000,
            max_payload: 64 * 1024 * 1024,
            close_timeout: Duration::from_secs(5),
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

    /// Sets how long a stream-mode `close` waits for subscribers to take what their groups
    /// have not been handed yet.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
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
/// the future, even if the future is never awaited. Awaited, the future completes at once,
/// except that it yields to the runtime when the task's Tokio budget is spent, as a send on a
/// Tokio channel does. Only when a `block` subscription's queue is full does the future wait,
/// and the message reaches that subscription when the future is awaited; every other
/// subscriber has it already.
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
}

/// The future of a publish that completed when it was made: `Ok`, and zero-sized, so boxing
/// it does not allocate.
///
/// It takes a unit of the task's Tokio budget, as a send on a Tokio channel does: a task
/// publishing in a loop yields to its worker once the budget is spent (every 128 operations)
/// instead of holding the worker, so the subscribers it wakes (queued behind it on the same
/// worker) run in batches. Outside a runtime the budget is unlimited and it is ready at once.
struct Published;

impl Future for Published {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Result<()>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        coop.made_progress();
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn transport_kind(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    // The work is done here, synchronously, and the common outcome is returned as a
    // zero-sized future, whose box allocates nothing. Only a publish that must wait for
    // room under `block` returns a real future.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
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
        // Nothing is in flight: a publish has reached every matching queue (broadcast) or its
        // topic's log (stream) by the time it returns. Stream entries reach subscribers as
        // they take them; `close` waits for that.
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let inner = &*self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.stats.set_health(Health::Closed);
        if inner.config.mode == Mode::Stream {
            inner.drain_stream().await;
        }
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
