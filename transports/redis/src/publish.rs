//! The publish path: [`Publisher`] (what `publish` and `flush` call) and the writer task
//! that owns the command connection.
//!
//! Every publish goes through one bounded channel to one task that owns the multiplexed
//! command connection. The task drains whatever is queued (up to `max_batch`) and sends it
//! as one pipeline, so sequential publishers share round trips as much as concurrent ones.
//! Up to two pipelines are in flight: while the server works through one, the next one is
//! filled and sent (items leave the queue in order, each when its pipeline is answered).
//! Broadcast publishes return once queued; stream publishes (XADD) carry a one-shot that the
//! task completes with the server's answer. `flush` queues a marker completed when
//! everything before it is answered. With `min_replicas = N` a pipeline holding XADDs ends
//! with `WAIT N min_replicas_timeout`, and its stream publishes return Ok only when WAIT
//! counted N replicas.
//!
//! The task also owns reconnection of the command connection: on a connection error it
//! marks the bus down, reconnects with capped jittered backoff, and then resends the batch
//! that failed (`on_disconnect = "buffer"`) or fails everything held
//! (`on_disconnect = "fail"`). While idle it pings every second so an outage is noticed
//! (and health turns `connecting`) even when nobody publishes.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use busway::transport::{is_inbox, Counters, Framing, OnDisconnect};
use busway::{Error, ErrorKind, Message, Mode, Result, Topic};

use crate::connect::{is_connection_error, Con, ConnCount};
use crate::state::Shared;
use crate::stream::{self, Field, StreamState};
use crate::wire;

/// The front of the publish path: turns messages into writer items and applies the outage
/// policy, the publish timeout and the bounded queue.
pub(crate) struct Publisher {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Item>,
}

impl Publisher {
    /// A publisher and the writer task to spawn, which owns `con` (the command connection,
    /// whose push `events` announce its loss).
    pub(crate) fn new(
        shared: Arc<Shared>,
        streams: Arc<StreamState>,
        con: Con,
        events: mpsc::UnboundedReceiver<redis::PushInfo>,
    ) -> (Publisher, Writer) {
        let (tx, rx) = mpsc::channel(shared.config.publish_queue);
        let writer = Writer::new(shared.clone(), streams, rx, con, events);
        (Publisher { shared, tx }, writer)
    }

    pub(crate) async fn publish(&self, message: Message) -> Result<()> {
        let shared = &*self.shared;
        let config = &shared.config;
        if shared.closed.load(Relaxed) {
            return Err(shared.closed_error());
        }
        config.capabilities().check_payload(&config.bus, &message)?;
        if config.framing == Framing::Raw {
            refuse_user_headers(&config.bus, &message)?;
        }
        if !shared.cmd_up.load(Relaxed) {
            match config.on_disconnect {
                OnDisconnect::Fail => {
                    Counters::incr(&shared.stats.errors);
                    return Err(shared.connector.disconnected());
                }
                OnDisconnect::Buffer => {
                    if shared.queued.load(Relaxed) >= config.publish_buffer {
                        Counters::incr(&shared.stats.errors);
                        return Err(Error::new(
                            ErrorKind::BufferFull,
                            format!(
                                "bus {:?}: {} publishes are held while {} is unreachable (publish_buffer = {}); {:?} was not published",
                                config.bus,
                                shared.queued.load(Relaxed),
                                config.redacted_url(),
                                config.publish_buffer,
                                message.topic.as_str()
                            ),
                        ));
                    }
                }
            }
        }
        let timeout = config.response_timeout();
        let stream = config.mode == Mode::Stream && !is_inbox(message.topic.as_str());
        let topic = message.topic.clone();
        let (item, done) = if stream {
            let (tx, rx) = oneshot::channel();
            let (key, fields) = match &shared.layout {
                None => (
                    format!("{}{}", config.key_prefix, topic.as_str()),
                    stream::fields(message),
                ),
                Some(layout) => {
                    let Some((key, topic_fields)) = layout.route(&topic) else {
                        return Err(Error::new(
                            ErrorKind::InvalidTopic,
                            format!(
                                "bus {:?}: topic {:?} falls in no layout.streams topic, so it has no stream key",
                                config.bus,
                                topic.as_str()
                            ),
                        ));
                    };
                    (key, layout.fields(message, topic_fields))
                }
            };
            (
                Item::Xadd {
                    topic: topic.clone(),
                    key,
                    fields,
                    done: tx,
                },
                Some(rx),
            )
        } else {
            let data = if config.framing == Framing::Raw {
                message.payload.to_vec()
            } else {
                wire::encode(&message)
            };
            (
                Item::Publish {
                    channel: message.topic,
                    data,
                },
                None,
            )
        };
        shared.queued.fetch_add(1, Relaxed);
        // One deadline for the wait for room in the queue and the wait for the answer, so a
        // publish gives up after `publish_timeout` in all, not once per wait.
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let timed_out = || {
            Counters::incr(&shared.stats.errors);
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?}: publish on {:?} not accepted by {} after {} ms (publish_timeout = {timeout:?})",
                    config.bus,
                    topic.as_str(),
                    config.redacted_url(),
                    start.elapsed().as_millis()
                ),
            )
        };
        // The channel almost always has room: a timer (a clock read, a timer-wheel entry and
        // a reference to the runtime per publish) is made only when it is full.
        let queued = match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(shared.closed_error()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                match tokio::time::timeout_at(deadline, self.tx.send(item)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(shared.closed_error()),
                    Err(_) => Err(timed_out()),
                }
            }
        };
        if let Err(e) = queued {
            shared.queued.fetch_sub(1, Relaxed);
            return Err(e);
        }
        if let Some(done) = done {
            match tokio::time::timeout_at(deadline, done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => return Err(shared.closed_error()),
                Err(_) => return Err(timed_out()),
            }
        }
        Counters::incr(&shared.stats.published);
        Ok(())
    }

    /// Waits until every publish accepted before it is answered by the server.
    pub(crate) async fn flush(&self) -> Result<()> {
        let shared = &*self.shared;
        // Nothing accepted and unanswered: done, even if the server is frozen (the writer may
        // be waiting on its idle ping, which a flush marker would queue behind).
        if shared.queued.load(Relaxed) == 0 {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let timeout = shared.config.response_timeout();
        let err = || {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?}: flush: {} publishes not acknowledged by {} within {timeout:?} (publish_timeout)",
                    shared.config.bus,
                    shared.queued.load(Relaxed),
                    shared.config.redacted_url()
                ),
            )
        };
        tokio::time::timeout(timeout, async {
            if self.tx.send(Item::Flush(tx)).await.is_err() {
                return;
            }
            let _ = rx.await;
        })
        .await
        .map_err(|_| err())
    }
}

/// Raw framing sends the payload alone, so a header the caller set would be lost without a
/// word: refuse it. `id`, `timestamp` and `source` (set by the router and `stamped`) and
/// `content_type` (set by the codec helpers) are busway's own bookkeeping, not something the
/// caller asked to travel, so they are dropped rather than refused.
fn refuse_user_headers(bus: &str, message: &Message) -> Result<()> {
    let h = &message.headers;
    let header = if let Some((k, _)) = h.extra.first() {
        k.as_str()
    } else if h.reply_to.is_some() {
        "reply_to"
    } else if h.correlation_id.is_some() {
        "correlation_id"
    } else {
        return Ok(());
    };
    Err(Error::unsupported(format!(
        "bus {bus:?} uses raw framing, which carries the payload alone: header {header:?} on {:?} cannot travel (use framing = \"busway\" or drop the header)",
        message.topic.as_str()
    )))
}

/// One unit of work for the writer.
#[derive(Debug)]
enum Item {
    /// `PUBLISH channel data` (broadcast; the publisher does not wait).
    Publish { channel: Topic, data: Vec<u8> },
    /// `XADD key MAXLEN ~ n * fields...` (stream; the publisher waits for `done`).
    Xadd {
        topic: Topic,
        /// The stream key (`key_prefix` + topic, or the layout's).
        key: String,
        fields: Vec<Field>,
        done: oneshot::Sender<Result<()>>,
    },
    /// Completed once every item queued before it is answered.
    Flush(oneshot::Sender<()>),
}

impl Item {
    /// Whether anyone still waits for this item (a timed-out stream publisher does not: its
    /// XADD is not sent, so a publish that returned an error did not happen).
    fn wanted(&self) -> bool {
        match self {
            Item::Xadd { done, .. } => !done.is_closed(),
            _ => true,
        }
    }

    fn fail(self, shared: &Shared, e: &Error) {
        match self {
            Item::Publish { channel, .. } => {
                Counters::incr(&shared.stats.errors);
                tracing::warn!(bus = %shared.config.bus, topic = %channel, error = %e, "broadcast publish lost");
            }
            Item::Xadd { done, .. } => {
                Counters::incr(&shared.stats.errors);
                let _ = done.send(Err(Error::new(e.kind(), e.message().to_string())));
            }
            Item::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// The task that owns the command connection and sends what the [`Publisher`] queues.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    /// Stream mode: the readers told about topics this process indexes.
    streams: Arc<StreamState>,
    rx: mpsc::Receiver<Item>,
    pending: VecDeque<Item>,
    con: Option<(Con, ConnCount)>,
    /// The command connection is RESP3 with a push channel only so that its loss is
    /// announced at once (`Disconnection`), not found by the next publish or ping.
    events: mpsc::UnboundedReceiver<redis::PushInfo>,
    /// Stream mode: topics this process already added to the index set.
    indexed: HashSet<Topic>,
    attempt: u32,
    /// Pipelines sent and not yet answered, oldest first. Their items are the front of
    /// `pending`, in order; an item leaves `pending` only when its pipeline is answered.
    inflight: VecDeque<InFlight>,
    /// Their answers, in the same order. All of them are polled, so each pipeline is handed
    /// to the connection as soon as it is built, in order.
    answers: FuturesOrdered<Pin<Box<dyn Future<Output = Replies> + Send>>>,
    /// How many items at the front of `pending` are in `inflight`'s pipelines.
    sent: usize,
}

const IDLE_PING: Duration = Duration::from_secs(1);

/// Pipelines in flight at once: while the server works through one, the next one is built
/// and sent, so neither side waits for the other (with one, 7 publishers reach ~0.8 of the
/// raw client's rate).
const MAX_INFLIGHT: usize = 2;

type Replies = redis::RedisResult<Vec<Value>>;

/// One pipeline on its way: how many items of `pending` it carries, how many replies
/// each of them has, and whether it ends with a `WAIT` (`min_replicas`).
struct InFlight {
    n: usize,
    replies_per_item: Vec<usize>,
    wait: bool,
}

/// A pipeline built from `pending`, not yet sent.
struct Batch {
    n: usize,
    replies_per_item: Vec<usize>,
    wait: bool,
    pipe: redis::Pipeline,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        streams: Arc<StreamState>,
        rx: mpsc::Receiver<Item>,
        con: Con,
        events: mpsc::UnboundedReceiver<redis::PushInfo>,
    ) -> Writer {
        let count = ConnCount::new(&shared.stats);
        Writer {
            shared,
            streams,
            rx,
            events,
            pending: VecDeque::new(),
            con: Some((con, count)),
            indexed: HashSet::new(),
            attempt: 0,
            inflight: VecDeque::new(),
            answers: FuturesOrdered::new(),
            sent: 0,
        }
    }

    fn take(&mut self, item: Item) {
        self.pending.push_back(item);
    }

    fn drain_channel(&mut self, limit: usize) {
        while self.pending.len() < limit {
            match self.rx.try_recv() {
                Ok(item) => self.take(item),
                Err(_) => break,
            }
        }
    }

    pub(crate) async fn run(mut self) {
        let mut shutdown = self.shared.shutdown.subscribe();
        let max_batch = self.shared.config.max_batch;
        loop {
            if *shutdown.borrow() {
                // Closed first: a publish racing `close` then gets `Closed` instead of `Ok`
                // for an item queued after this last drain and never sent.
                self.rx.close();
                self.drain_channel(usize::MAX);
                // Last chance for whatever is queued (a bus dropped without close): the
                // pipelines in flight are answered, then the rest goes in one more.
                while self.con.is_some() && !self.inflight.is_empty() {
                    if let Err(e) = self.settle_front().await {
                        self.lost_connection(e);
                    }
                }
                if self.con.is_some() && !self.pending.is_empty() {
                    let _ = self.send_batch(usize::MAX).await;
                }
                let e = Error::closed(format!("bus {:?}", self.shared.config.bus));
                for item in self.pending.drain(..) {
                    item.fail(&self.shared, &e);
                }
                self.shared.cmd_up.store(false, Relaxed);
                return;
            }
            if self.con.is_none() {
                self.reconnect(&mut shutdown).await;
                continue;
            }
            if self.pending.is_empty() {
                tokio::select! {
                    item = self.rx.recv() => match item {
                        Some(item) => self.take(item),
                        None => return,
                    },
                    _ = tokio::time::sleep(IDLE_PING) => {
                        self.ping().await;
                        continue;
                    }
                    event = self.events.recv(), if self.con.is_some() => {
                        if event.is_none_or(|e| e.kind == redis::PushKind::Disconnection) {
                            let e = self.shared.connector.disconnected_plain();
                            self.lost_connection(e);
                        }
                        continue;
                    }
                    _ = shutdown.changed() => continue,
                }
            }
            self.drain_channel(self.sent + max_batch);
            self.answer_flushes();
            while self.inflight.len() < MAX_INFLIGHT {
                let Some(batch) = self.build_batch(self.sent, max_batch) else {
                    break;
                };
                self.send(batch);
            }
            if self.inflight.is_empty() {
                continue;
            }
            // Wait for the oldest pipeline's answer, taking new publishes meanwhile so the
            // next pipeline is ready when a slot frees.
            let room = self.pending.len() < self.sent + max_batch;
            let mut answered = None;
            let mut taken = None;
            tokio::select! {
                biased;
                Some(replies) = self.answers.next() => answered = Some(replies),
                item = self.rx.recv(), if room => taken = item,
                _ = shutdown.changed() => {}
            }
            if let Some(item) = taken {
                self.take(item);
            }
            if let Some(replies) = answered {
                if let Err(e) = self.settle_answered(replies) {
                    self.lost_connection(e);
                }
            }
        }
    }

    async fn ping(&mut self) {
        if let Some((con, _)) = &mut self.con {
            if let Err(e) = redis::cmd("PING").query_async::<()>(con).await {
                if is_connection_error(&e) {
                    let e = self.shared.connector.error("PING", e);
                    self.lost_connection(e);
                }
            }
        }
    }

    fn lost_connection(&mut self, e: Error) {
        // Unanswered pipelines are dropped; their items stay in `pending` and are sent again
        // after the reconnect (or failed, per `on_disconnect`).
        self.inflight.clear();
        self.answers = FuturesOrdered::new();
        self.sent = 0;
        if self.con.take().is_some() {
            tracing::warn!(bus = %self.shared.config.bus, error = %e, "command connection lost");
        }
        self.shared.set_cmd_connection(None);
        self.shared.cmd_up.store(false, Relaxed);
        if self.shared.config.on_disconnect == OnDisconnect::Fail {
            self.fail_pending(&e);
        }
    }

    fn fail_pending(&mut self, e: &Error) {
        for item in self.pending.drain(..) {
            if let Item::Xadd { .. } | Item::Publish { .. } = item {
                self.shared.queued.fetch_sub(1, Relaxed);
            }
            item.fail(&self.shared, e);
        }
    }

    /// One connection attempt after a backoff delay; items keep being taken from the channel
    /// while waiting, so publishers see the outage policy rather than a full channel.
    async fn reconnect(&mut self, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        let delay = self.shared.connector.backoff(self.attempt);
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = shutdown.changed() => return,
                item = self.rx.recv() => match item {
                    Some(item) => {
                        self.take(item);
                        if self.shared.config.on_disconnect == OnDisconnect::Fail {
                            self.fail_pending(&self.shared.connector.disconnected());
                        }
                    }
                    None => return,
                },
            }
        }
        let (events_tx, events) = mpsc::unbounded_channel();
        let moves = self.shared.connector.primary_moves();
        match self.shared.connector.connect(None, Some(events_tx)).await {
            Ok(con) => {
                if self.shared.connector.primary_moves() != moves
                    && self.shared.pubsub_started.load(Relaxed)
                {
                    // The pub/sub connection may still be on the old primary (frozen, it
                    // would never say so): it moves too, and the held publishes wait for it.
                    self.shared.pubsub_up.store(false, Relaxed);
                    self.shared.pubsub_moved.notify_one();
                }
                self.events = events;
                self.attempt = 0;
                Counters::incr(&self.shared.stats.reconnects);
                self.shared.set_cmd_connection(Some(con.clone()));
                self.con = Some((con, ConnCount::new(&self.shared.stats)));
                self.shared.cmd_up.store(true, Relaxed);
                self.indexed.clear();
                tracing::info!(bus = %self.shared.config.bus, "command connection re-established");
                self.await_pubsub(shutdown).await;
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                tracing::debug!(bus = %self.shared.config.bus, error = %e, "reconnect failed");
                if self.shared.config.on_disconnect == OnDisconnect::Fail {
                    self.fail_pending(&e);
                }
            }
        }
    }

    /// After the command connection's return, holds the publishes until the bus's own
    /// pub/sub connection has resubscribed (at most `publish_timeout`): resent at once, they
    /// would reach the server before this process's subscriptions are back, and nobody.
    async fn await_pubsub(&mut self, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        let shared = &self.shared;
        if !shared.pubsub_started.load(Relaxed) || shared.pubsub_up.load(Relaxed) {
            return;
        }
        // The server is back: the pub/sub connection need not wait out its backoff.
        shared.pubsub_retry.notify_one();
        let deadline = tokio::time::Instant::now() + shared.config.response_timeout();
        while !shared.pubsub_up.load(Relaxed) && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Answers the flush markers at the front of `pending`: everything before them is done.
    fn answer_flushes(&mut self) {
        if self.sent > 0 {
            return;
        }
        while let Some(Item::Flush(_)) = self.pending.front() {
            if let Some(Item::Flush(done)) = self.pending.pop_front() {
                let _ = done.send(());
            }
        }
    }

    /// A pipeline of up to `max_batch` items of `pending` from index `from`, ending before a
    /// flush marker; `None` when there is nothing to send there.
    fn build_batch(&mut self, from: usize, max_batch: usize) -> Option<Batch> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut n = 0;
        let mut replies_per_item = Vec::new();
        let mut xadds = false;
        let opts = &self.shared.config;
        for item in self.pending.iter().skip(from) {
            if n >= max_batch {
                break;
            }
            match item {
                Item::Flush(_) => break,
                _ if !item.wanted() => {
                    replies_per_item.push(0);
                }
                Item::Publish { channel, data } => {
                    // Sharded pub/sub on a cluster: the message stays in its channel's shard.
                    pipe.cmd(if opts.is_cluster() {
                        "SPUBLISH"
                    } else {
                        "PUBLISH"
                    })
                    .arg(channel.as_str())
                    .arg(data.as_slice());
                    replies_per_item.push(1);
                }
                Item::Xadd {
                    topic, key, fields, ..
                } => {
                    let mut extra = 0;
                    // Inserted now so a batch adds each new topic once; the set is cleared on
                    // reconnect, so a failed batch only costs a repeated (idempotent) SADD.
                    // A layout's keys come from its config: no index.
                    if self.shared.layout.is_none() && self.indexed.insert(topic.clone()) {
                        pipe.cmd("SADD").arg(&opts.index_key).arg(topic.as_str());
                        extra = 1;
                        // Wildcard subscriptions of this process read the new key at once
                        // rather than at their next rescan.
                        self.streams.topic_indexed(topic);
                    }
                    let cmd = pipe.cmd("XADD").arg(key.as_str());
                    if opts.stream_maxlen > 0 {
                        cmd.arg("MAXLEN").arg("~").arg(opts.stream_maxlen);
                    }
                    cmd.arg("*");
                    for (k, v) in fields {
                        cmd.arg(&**k).arg(&v[..]);
                    }
                    replies_per_item.push(1 + extra);
                    xadds = true;
                }
            }
            n += 1;
        }
        // One WAIT covers every XADD before it on this connection.
        let wait = xadds && opts.min_replicas > 0;
        if wait {
            pipe.cmd("WAIT")
                .arg(opts.min_replicas)
                .arg(opts.min_replicas_timeout.as_millis().max(1) as u64);
        }
        (n > 0).then_some(Batch {
            n,
            replies_per_item,
            wait,
            pipe,
        })
    }

    /// Sends `batch` (the items after those in flight) without waiting for its answer.
    fn send(&mut self, batch: Batch) {
        let Some((con, _)) = &self.con else {
            return;
        };
        let mut con = con.clone();
        let Batch {
            n,
            replies_per_item,
            wait,
            pipe,
        } = batch;
        let answer: Pin<Box<dyn Future<Output = Replies> + Send>> = if pipe.is_empty() {
            Box::pin(std::future::ready(Ok(Vec::new())))
        } else {
            Box::pin(async move { pipe.query_async(&mut con).await })
        };
        self.sent += n;
        self.inflight.push_back(InFlight {
            n,
            replies_per_item,
            wait,
        });
        self.answers.push_back(answer);
    }

    /// Waits for the oldest pipeline's answer and settles its items. An error return means
    /// the connection failed; the items stay at the front of `pending`.
    async fn settle_front(&mut self) -> Result<()> {
        match self.answers.next().await {
            Some(replies) => self.settle_answered(replies),
            None => Ok(()),
        }
    }

    /// Settles the oldest pipeline, which answered `replies`.
    fn settle_answered(&mut self, replies: Replies) -> Result<()> {
        let Some(InFlight {
            n,
            replies_per_item,
            wait,
        }) = self.inflight.pop_front()
        else {
            return Ok(());
        };
        self.sent -= n;
        self.settle(n, replies_per_item, wait, replies)
    }

    /// Sends the front of `pending` as one pipeline and settles it (nothing else in flight).
    /// An error return means the connection failed; the batch stays at the front of
    /// `pending`.
    async fn send_batch(&mut self, max_batch: usize) -> Result<()> {
        self.answer_flushes();
        let Some(batch) = self.build_batch(0, max_batch) else {
            return Ok(());
        };
        self.send(batch);
        self.settle_front().await
    }

    /// Settles the front `n` items of `pending` with the answer to their pipeline (whose
    /// last reply is `WAIT`'s when `wait`).
    fn settle(
        &mut self,
        n: usize,
        replies_per_item: Vec<usize>,
        wait: bool,
        replies: Replies,
    ) -> Result<()> {
        let mut replies: Vec<Value> = match replies {
            Ok(r) => r,
            Err(e) if is_connection_error(&e) => {
                return Err(self.shared.connector.error("pipeline", e))
            }
            Err(e) => {
                // The server refused the whole pipeline (not one command): fail the batch.
                let e = self.shared.connector.error("pipeline", e);
                self.indexed.clear();
                for item in self.pending.drain(..n) {
                    if !matches!(item, Item::Flush(_)) {
                        self.shared.queued.fetch_sub(1, Relaxed);
                    }
                    item.fail(&self.shared, &e);
                }
                return Ok(());
            }
        };
        // A server that just restarted answers LOADING until its AOF / RDB is read back: an
        // outage, not a refusal. Keep the batch and resend it after the reconnect backoff,
        // as for a broken connection (XADDs of a batch split by the end of loading are sent
        // twice: stream entries are at least once anyway).
        let loading = replies.iter().any(|v| {
            matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::BusyLoading))
        });
        if loading {
            return Err(Error::new(
                busway::ErrorKind::Connection,
                format!(
                    "bus {:?}: {} is loading its dataset",
                    self.shared.config.bus,
                    self.shared.config.redacted_url()
                ),
            ));
        }
        // READONLY: the server was demoted to a replica (a Sentinel failover). An outage too:
        // the batch is resent on the next connection, which goes to the new primary.
        let read_only = replies.iter().any(|v| {
            matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::ReadOnly))
        });
        if read_only {
            return Err(Error::new(
                busway::ErrorKind::Connection,
                format!(
                    "bus {:?}: {} is a read-only replica now (failover)",
                    self.shared.config.bus,
                    self.shared.config.redacted_url()
                ),
            ));
        }
        let short = if wait {
            self.replicas_short(replies.pop())
        } else {
            None
        };
        let mut replies = replies.into_iter();
        for (item, count) in self.pending.drain(..n).zip(replies_per_item) {
            self.shared.queued.fetch_sub(1, Relaxed);
            let mut result = Ok(());
            for _ in 0..count {
                if let Some(Value::ServerError(e)) = replies.next() {
                    result = Err(e);
                }
            }
            match (item, result) {
                (Item::Xadd { topic, done, .. }, Ok(())) => match &short {
                    None => {
                        let _ = done.send(Ok(()));
                    }
                    Some(why) => {
                        Counters::incr(&self.shared.stats.errors);
                        let _ = done.send(Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "bus {:?}: publish on {:?}: {why}",
                                self.shared.config.bus,
                                topic.as_str()
                            ),
                        )));
                    }
                },
                (item, Err(e)) => {
                    let e = self.shared.connector.error("publish", e.into());
                    item.fail(&self.shared, &e);
                }
                (_, Ok(())) => {}
            }
        }
        Ok(())
    }

    /// Why `WAIT`'s answer `reply` falls short of `min_replicas`, or `None` when enough
    /// replicas hold the pipeline's entries.
    fn replicas_short(&self, reply: Option<Value>) -> Option<String> {
        let config = &self.shared.config;
        let (want, within) = (config.min_replicas, config.min_replicas_timeout);
        let got = match reply {
            Some(Value::Int(k)) if k >= i64::from(want) => return None,
            Some(Value::Int(k)) => format!("{k}"),
            Some(Value::ServerError(e)) => return Some(format!("WAIT refused: {e:?}")),
            other => return Some(format!("WAIT answered {other:?}")),
        };
        Some(format!(
            "{got} of {want} replicas acknowledged it within {within:?} (min_replicas = {want}, min_replicas_timeout); the entry is on the primary and may be lost in a failover"
        ))
    }
}
