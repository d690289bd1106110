//! Stream mode on JetStream: the bus's stream, consumers, the pump, ack / nack / term and
//! dead letters.
//!
//! - The stream (`stream`, `subjects`, limits from config) is created at build, or updated
//!   when its subjects or limits differ from the config.
//! - Without `subjects` in config the stream's subjects follow use: it starts with
//!   `<bus>.>`, and the first publish or subscribe under a new first token `t` adds `t` and
//!   `t.>` to the stream (one stream update per new token; subjects other processes added are
//!   kept). Topics whose first token is a wildcard cannot be derived and need `subjects`.
//!   With `subjects` set, anything outside them is refused with `ErrorKind::Unsupported`.
//! - A subscription with a group uses the durable pull consumer `<group>-<hash of pattern>`
//!   (group name with characters NATS refuses in consumer names replaced by `_`): every member
//!   of the group, in any process, shares it and the server splits the messages. It outlives
//!   the subscription, so the group resumes where it left off.
//! - A subscription without a group gets its own pull consumer `busway-<random>` with explicit
//!   acks (not an "ordered consumer", which cannot ack). It is deleted when the subscription
//!   drops or the bus closes, and the server removes it after `inactive_threshold` (1 hour) if
//!   the process died. It is durable on the server, so it also survives a server restart.
//! - `max_deliver` is enforced by busway, not the server: a delivery whose attempt exceeds it
//!   is published to `dead_letter` and terminated (or terminated and counted as dropped when
//!   there is no dead-letter topic). Subscribers see attempts `1..=max_deliver`.

use std::collections::HashSet;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use busway::transport::{Framing, QueueSender};
use busway::transport::{TransportDelivery, TransportSubscription};
use busway::{
    config::DEFAULT_ACK_TIMEOUT,
    transport::{new_message_id, Acker, BuildContext, Counters},
    Bus, Delivery, Error, ErrorKind, Message, Pattern, Result, StartFrom, SubscribeOptions,
    Subscription, Topic,
};
use futures::{FutureExt, StreamExt, TryFutureExt};
use parking_lot::Mutex;

use crate::bus::{Inner, NatsBus};
use crate::config::{NatsConfig, Storage};
use crate::core::{to_message, with_topic, SubjectTopics};
use crate::headers;

/// How long the server keeps a group-less subscription's consumer after its process vanished.
const ORPHAN_CONSUMER_TTL: Duration = Duration::from_secs(3600);

/// How often the server confirms a waiting pull request while no message flows. Two missed in
/// a row end the pull stream, and the pump pulls afresh (see `Pump::run`).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// The bus's JetStream stream and what its subscriptions need.
#[derive(Debug)]
pub(crate) struct StreamSetup {
    js: jetstream::Context,
    name: String,
    subjects: parking_lot::RwLock<Vec<Pattern>>,
    /// No `subjects` in config: new first tokens are added to the stream on first use.
    pub(crate) auto: bool,
    /// Serialises stream updates for new subjects.
    growing: tokio::sync::Mutex<()>,
    max_deliver: u32,
    dead_letter: Option<Topic>,
    /// Per-subscription consumers to delete on close.
    ephemeral: Mutex<HashSet<String>>,
}

fn js_err(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Broker, format!("{what}: {e}")).with_source(e)
}

impl StreamSetup {
    /// Creates the stream, or brings an existing one to the configured subjects and limits.
    pub(crate) async fn ensure(
        ctx: &BuildContext<'_>,
        config: &NatsConfig,
        client: &async_nats::Client,
    ) -> Result<StreamSetup> {
        let name = config
            .stream
            .clone()
            .unwrap_or_else(|| format!("BUSWAY_{}", ctx.bus.to_uppercase().replace('-', "_")));
        if name.is_empty()
            || name
                .bytes()
                .any(|b| !(0x21..=0x7e).contains(&b) || b".*>/\\".contains(&b))
        {
            return Err(ctx.config_error(
                "stream",
                format!("{name:?} is not a valid JetStream stream name (no '.', '*', '>', '/', '\\' or spaces)"),
            ));
        }
        let auto = config.subjects.is_none();
        let mut subject_strings = config
            .subjects
            .clone()
            .unwrap_or_else(|| vec![format!("{}.>", ctx.bus)]);
        if subject_strings.is_empty() {
            return Err(ctx.config_error("subjects", "is empty"));
        }
        for s in &subject_strings {
            Pattern::new(s).map_err(|e| ctx.config_error("subjects", e))?;
        }
        let dead_letter = match &config.dead_letter {
            Some(t) => Some(Topic::new(t).map_err(|e| ctx.config_error("dead_letter", e))?),
            None => None,
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout())
            .backpressure_on_inflight(true)
            .build(client.clone());

        let want_storage = match config.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        };
        let max_messages = config.max_msgs.unwrap_or(-1);
        let max_bytes = config.max_bytes.unwrap_or(-1);
        let max_age = config.max_age.map(|d| d.0).unwrap_or(Duration::ZERO);
        let what = format!(
            "bus {:?}: JetStream stream {name:?} (subjects {subject_strings:?})",
            ctx.bus
        );
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| js_err(format!("{what}: reading its info"), e))?;
                let mut cfg = info.config.clone();
                if auto {
                    // Keep what earlier runs and other processes added.
                    for have in &cfg.subjects {
                        if !subject_strings.contains(have) {
                            subject_strings.push(have.clone());
                        }
                    }
                }
                let same = {
                    let mut have = cfg.subjects.clone();
                    let mut want = subject_strings.clone();
                    have.sort();
                    want.sort();
                    have == want
                } && cfg.max_messages == max_messages
                    && cfg.max_bytes == max_bytes
                    && cfg.max_age == max_age;
                if !same {
                    cfg.subjects = subject_strings.clone();
                    cfg.max_messages = max_messages;
                    cfg.max_bytes = max_bytes;
                    cfg.max_age = max_age;
                    js.update_stream(cfg)
                        .await
                        .map_err(|e| js_err(format!("{what}: updating it"), e))?;
                }
            }
            Err(e) if matches!(e.kind(), async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.code() == 404) =>
            {
                js.create_stream(stream::Config {
                    name: name.clone(),
                    subjects: subject_strings.clone(),
                    max_messages,
                    max_bytes,
                    max_age,
                    storage: want_storage,
                    num_replicas: config.replicas.unwrap_or(1).max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err(format!("{what}: creating it"), e))?;
            }
            Err(e) => return Err(js_err(format!("{what}: looking it up"), e)),
        }
        // Subjects the server holds may use NATS syntax busway patterns refuse; those are
        // skipped here (a topic they capture is then treated as outside the stream).
        let subjects = subject_strings
            .iter()
            .filter_map(|s| Pattern::new(s).ok())
            .collect();
        Ok(StreamSetup {
            js,
            name,
            subjects: parking_lot::RwLock::new(subjects),
            auto,
            growing: tokio::sync::Mutex::new(()),
            max_deliver: config.max_deliver(),
            dead_letter,
            ephemeral: Mutex::new(HashSet::new()),
        })
    }

    /// Whether the stream stores messages published on `topic`.
    pub(crate) fn captures(&self, topic: &Topic) -> bool {
        self.subjects.read().iter().any(|p| p.matches(topic))
    }

    fn subject_list(&self) -> Vec<String> {
        self.subjects
            .read()
            .iter()
            .map(|p| p.as_str().to_string())
            .collect()
    }

    /// In auto mode, adds `first` and `first.>` to the stream unless already captured.
    async fn grow(&self, bus: &str, first: &str) -> Result<()> {
        let probe = Topic::new(format!("{first}.x"))?;
        let single = Topic::new(first)?;
        if self.captures(&probe) && self.captures(&single) {
            return Ok(());
        }
        let _one_at_a_time = self.growing.lock().await;
        if self.captures(&probe) && self.captures(&single) {
            return Ok(());
        }
        let what = format!(
            "bus {bus:?}: adding {first:?} to JetStream stream {:?}",
            self.name
        );
        let mut stream = self
            .js
            .get_stream(&self.name)
            .await
            .map_err(|e| js_err(what.clone(), e))?;
        let mut cfg = stream
            .info()
            .await
            .map_err(|e| js_err(what.clone(), e))?
            .config
            .clone();
        for s in [first.to_string(), format!("{first}.>")] {
            if !cfg.subjects.contains(&s) {
                cfg.subjects.push(s);
            }
        }
        let subjects = cfg.subjects.clone();
        self.js
            .update_stream(cfg)
            .await
            .map_err(|e| js_err(what, e))?;
        *self.subjects.write() = subjects
            .iter()
            .filter_map(|s| Pattern::new(s).ok())
            .collect();
        Ok(())
    }

    /// Makes sure the stream stores `topic` (growing it in auto mode).
    pub(crate) async fn ensure_topic(&self, bus: &str, topic: &Topic) -> Result<()> {
        if self.captures(topic) {
            return Ok(());
        }
        if !self.auto {
            return Err(self.not_captured(bus, topic));
        }
        let first = topic.tokens().next().unwrap_or_default();
        self.grow(bus, first).await
    }

    /// The topic and the client's publish of `message` (headers encoded per the framing).
    fn prepare(
        &self,
        inner: &Inner,
        message: Message,
    ) -> Result<(Topic, jetstream::message::PublishMessage)> {
        let Message {
            topic,
            payload,
            headers: h,
        } = message;
        let publish = jetstream::message::PublishMessage::build().payload(payload);
        let publish = match inner.config.framing {
            Framing::Busway => match headers::encode(&topic, &h)? {
                Some(map) => publish.headers(map),
                None => publish,
            },
            Framing::Raw => publish,
        };
        Ok((topic, publish))
    }

    /// Makes sure the stream can hold what `pattern` matches (growing it in auto mode).
    async fn ensure_pattern(&self, bus: &str, pattern: &Pattern) -> Result<()> {
        use busway::topic::PatternToken;
        if self.subjects.read().iter().any(|s| s.covers(pattern)) {
            return Ok(());
        }
        match (self.auto, pattern.tokens().first()) {
            (true, Some(PatternToken::Literal(first))) => self.grow(bus, first).await,
            _ if self.subjects.read().iter().any(|s| s.overlaps(pattern)) => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "bus {bus:?}: pattern {:?} matches nothing JetStream stream {:?} stores (subjects {:?}){}",
                    pattern.as_str(),
                    self.name,
                    self.subject_list(),
                    if self.auto { "; a pattern starting with a wildcard needs `subjects` in config" } else { "" }
                ),
            )),
        }
    }

    fn not_captured(&self, bus: &str, topic: &Topic) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "bus {bus:?}: topic {:?} is outside JetStream stream {:?} (subjects {:?}); add it to `subjects`",
                topic.as_str(),
                self.name,
                self.subject_list()
            ),
        )
    }

    /// Publishes and waits for the PubAck. Concurrent publishers are not serialised: each
    /// awaits its own ack while the client pipelines the writes.
    ///
    /// The future is boxed on every publish, so it is kept small (under the allocator's
    /// fast-path size): the message becomes the client's publish before the future is made,
    /// the future holds the client's send and then its ack (never both), and the rare growing
    /// of the stream for a new first token is boxed on its own.
    pub(crate) fn publish<'a>(
        &'a self,
        inner: &'a Inner,
        message: Message,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        use futures::future::Either;
        if !self.captures(&message.topic) {
            return Either::Left(Box::pin(async move {
                self.ensure_topic(&inner.name, &message.topic).await?;
                self.send(inner, message).await
            }));
        }
        Either::Right(self.send(inner, message))
    }

    /// [`StreamSetup::publish`] of a topic the stream holds.
    fn send<'a>(
        &'a self,
        inner: &'a Inner,
        message: Message,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        use futures::future::{ready, Either};
        let (topic, publish) = match self.prepare(inner, message) {
            Ok(prepared) => prepared,
            Err(e) => return Either::Left(ready(Err(e))),
        };
        let subject = async_nats::Subject::from(topic.as_str());
        Either::Right(
            self.js
                .send_publish(subject, publish)
                .and_then(IntoFuture::into_future)
                .map(move |acked| {
                    acked.map(drop).map_err(|e| {
                        let kind = match e.kind() {
                            PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
                            PublishErrorKind::StreamNotFound => ErrorKind::Broker,
                            _ if !inner.is_connected() => ErrorKind::Connection,
                            PublishErrorKind::TimedOut => ErrorKind::Timeout,
                            PublishErrorKind::BrokenPipe => ErrorKind::Connection,
                            _ => ErrorKind::Broker,
                        };
                        Error::new(
                            kind,
                            format!(
                                "bus {:?}: publish on {:?} to JetStream stream {:?} was not acknowledged: {e}",
                                inner.name,
                                topic.as_str(),
                                self.name
                            ),
                        )
                        .with_source(e)
                    })
                }),
        )
    }

    /// A request on a stream bus: the request is stored in the stream (so a responder may
    /// be offline for a while) and the reply comes back on a core NATS inbox. JetStream
    /// cannot tell that nobody listens, so a missing responder is a timeout.
    pub(crate) async fn request(
        &self,
        bus: &NatsBus,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let inner = &bus.inner;
        let inbox = Topic::new(inner.client.new_inbox())?;
        let mut replies = inner
            .client
            .subscribe(inbox.as_str().to_string())
            .await
            .map_err(|e| {
                inner.failed(
                    Error::new(
                        ErrorKind::Connection,
                        format!("bus {:?}: cannot subscribe to a reply inbox", inner.name),
                    )
                    .with_source(e),
                )
            })?;
        let topic = message.topic.clone();
        message.headers.reply_to = Some(inbox);
        if message.headers.correlation_id.is_none() {
            message.headers.correlation_id = Some(new_message_id());
        }
        bus.publish(message).await?;
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(reply)) => to_message(
                reply.subject.as_str(),
                reply.payload,
                reply.headers.as_ref(),
                None,
            ),
            Ok(None) => Err(inner.closed_error()),
            Err(_) => Err(inner.failed(Error::new(
                ErrorKind::Timeout,
                format!(
                    "request on {:?} (bus {:?}): no reply within {timeout:?}",
                    topic.as_str(),
                    inner.name
                ),
            ))),
        }
    }

    fn consumer_config(
        &self,
        name: &str,
        durable: bool,
        pattern: &Pattern,
        options: &SubscribeOptions,
    ) -> pull::Config {
        pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject: pattern.as_str().to_string(),
            deliver_policy: match options.start {
                StartFrom::New => DeliverPolicy::New,
                StartFrom::Beginning => DeliverPolicy::All,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT),
            // busway enforces max_deliver itself (dead letters), so the server never gives up.
            max_deliver: -1,
            inactive_threshold: if durable {
                Duration::ZERO
            } else {
                ORPHAN_CONSUMER_TTL
            },
            ..Default::default()
        }
    }

    /// Gets the consumer, creating it or updating its ack wait as needed.
    async fn consumer(
        &self,
        bus: &str,
        config: &pull::Config,
    ) -> Result<jetstream::consumer::PullConsumer> {
        let name = config.durable_name.clone().unwrap_or_default();
        let what = format!(
            "bus {bus:?}: consumer {name:?} on stream {:?} for {:?}",
            self.name, config.filter_subject
        );
        let stream = self
            .js
            .get_stream_no_info(&self.name)
            .await
            .map_err(|e| js_err(what.clone(), e))?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| js_err(what.clone(), e))?;
        let info = consumer.info().await.map_err(|e| js_err(what.clone(), e))?;
        if info.config.filter_subject != config.filter_subject {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{what}: it exists with filter {:?}",
                    info.config.filter_subject
                ),
            ));
        }
        if info.config.ack_wait != config.ack_wait {
            let mut updated = info.config.clone();
            updated.ack_wait = config.ack_wait;
            stream
                .create_consumer(updated)
                .await
                .map_err(|e| js_err(format!("{what}: updating its ack wait"), e))?;
        }
        Ok(consumer)
    }

    pub(crate) async fn subscribe(
        &self,
        inner: &Arc<Inner>,
        pattern: Pattern,
        options: SubscribeOptions,
        via: Arc<dyn Bus>,
    ) -> Result<Subscription> {
        self.ensure_pattern(&inner.name, &pattern)
            .await
            .map_err(|e| inner.failed(e))?;
        let (name, durable) = match &options.group {
            Some(group) => (group_consumer_name(group, &pattern), true),
            None => (format!("busway-{}", &new_message_id()[..16]), false),
        };
        let config = self.consumer_config(&name, durable, &pattern, &options);
        let consumer = self
            .consumer(&inner.name, &config)
            .await
            .map_err(|e| inner.failed(e))?;
        if !durable {
            self.ephemeral.lock().insert(name.clone());
        }
        let (capacity, overflow) = options.queue(inner.queue);
        let topics = SubjectTopics::new(&pattern);
        let (tx, sub) = Subscription::channel(pattern, capacity, overflow, inner.counters.clone());
        let pump = Pump {
            inner: inner.clone(),
            tx: tx.clone(),
            via,
            config,
            durable,
            capacity,
        };
        let task = tokio::spawn(pump.run(consumer, topics));
        let guard = inner.track(tx, task.abort_handle(), None);
        let cleanup = ConsumerCleanup {
            inner: Arc::downgrade(inner),
            name: (!durable).then_some(name),
        };
        Ok(sub.with_guard((guard, cleanup)))
    }

    /// Deletes the per-subscription consumers (groups keep theirs: they are the group's
    /// position in the stream).
    pub(crate) async fn close(&self, _inner: &Inner) {
        let names: Vec<String> = self.ephemeral.lock().drain().collect();
        if let Ok(stream) = self.js.get_stream_no_info(&self.name).await {
            for name in names {
                let _ = tokio::time::timeout(Duration::from_secs(2), stream.delete_consumer(&name))
                    .await;
            }
        }
    }
}

/// Deletes a group-less subscription's consumer when the subscription drops.
#[derive(Debug)]
struct ConsumerCleanup {
    inner: std::sync::Weak<Inner>,
    name: Option<String>,
}

impl Drop for ConsumerCleanup {
    fn drop(&mut self) {
        let (Some(name), Some(inner)) = (self.name.take(), self.inner.upgrade()) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let Some(setup) = &inner.stream else { return };
            if !setup.ephemeral.lock().remove(&name) {
                return; // close() already deleted it
            }
            if let Ok(stream) = setup.js.get_stream_no_info(&setup.name).await {
                let _ = stream.delete_consumer(&name).await;
            }
        });
    }
}

/// A durable consumer name for `group` reading `pattern`: the group (characters NATS refuses
/// replaced by `_`) and a hash of the pattern, so one group may read several patterns.
pub(crate) fn group_consumer_name(group: &str, pattern: &Pattern) -> String {
    let clean: String = group
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // FNV-1a: stable across processes and releases, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for b in pattern.as_str().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{clean}-{hash:08x}")
}

struct Pump {
    inner: Arc<Inner>,
    tx: QueueSender,
    via: Arc<dyn Bus>,
    config: pull::Config,
    durable: bool,
    capacity: usize,
}

impl Pump {
    async fn run(self, mut consumer: jetstream::consumer::PullConsumer, mut topics: SubjectTopics) {
        let setup = self.inner.stream.as_ref().expect("stream mode");
        let mut backoff = Duration::from_millis(100);
        loop {
            let batch = self.capacity.clamp(1, 256);
            let messages = consumer
                .stream()
                .max_messages_per_batch(batch)
                .heartbeat(PULL_HEARTBEAT)
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            match messages {
                Ok(mut messages) => {
                    while let Some(item) = messages.next().await {
                        match item {
                            Ok(msg) => {
                                backoff = Duration::from_millis(100);
                                if !self.handle(setup, &mut topics, msg).await {
                                    return;
                                }
                            }
                            Err(e) => {
                                use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                                match e.kind() {
                                    // The stream recovers by itself after this.
                                    K::Pull => {
                                        tracing::debug!(bus = %self.inner.name, error = %e, "JetStream pull hiccup");
                                    }
                                    // The server stopped answering this pull stream (no
                                    // message, no heartbeat): the stream would wait for its
                                    // own request expiry (~35 s) before asking again. Pull
                                    // afresh now, through the consumer lookup below (100 ms
                                    // back-off); anything unacked is redelivered.
                                    K::MissingHeartbeat => {
                                        tracing::debug!(bus = %self.inner.name, error = %e, "JetStream pull stream went quiet; pulling afresh");
                                        break;
                                    }
                                    _ => {
                                        tracing::warn!(bus = %self.inner.name, error = %e, "JetStream consumer lost; recreating it");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(bus = %self.inner.name, error = %e, "cannot start pulling");
                }
            }
            if self.inner.is_closed() || self.tx.is_closed() {
                return;
            }
            // Lost the consumer (server restart without it, deletion) or the pull loop: get or
            // recreate it by name and continue. A durable keeps its acked position.
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                if self.inner.is_closed() || self.tx.is_closed() {
                    return;
                }
                match setup.consumer(&self.inner.name, &self.config).await {
                    Ok(c) => {
                        consumer = c;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(bus = %self.inner.name, error = %e, durable = self.durable, "recreating the consumer failed; retrying");
                    }
                }
            }
        }
    }

    /// Handles one JetStream message; false when the subscription is gone.
    async fn handle(
        &self,
        setup: &StreamSetup,
        topics: &mut SubjectTopics,
        msg: jetstream::Message,
    ) -> bool {
        let attempt = match msg.info() {
            Ok(info) => u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
            Err(_) => 1,
        };
        let (msg, acker) = msg.split();
        let counters = &self.inner.counters;
        let decoded = topics
            .topic(msg.subject.as_str())
            .and_then(|topic| with_topic(topic, msg.payload.clone(), msg.headers.as_ref(), None));
        let message = match decoded {
            Ok(m) => m,
            Err(e) => {
                // Undecodable: redelivering cannot help, so it is terminated and counted.
                Counters::incr(&counters.decode_errors);
                Counters::incr(&self.tx.stats().decode_errors);
                tracing::debug!(bus = %self.inner.name, subject = %msg.subject, error = %e, "skipped an undecodable JetStream message");
                let _ = acker.ack_with(AckKind::Term).await;
                return true;
            }
        };
        if setup.max_deliver > 0 && attempt > setup.max_deliver {
            self.dead_letter(setup, message, attempt, acker).await;
            return true;
        }
        if attempt > 1 {
            Counters::incr(&counters.redelivered);
            Counters::incr(&self.tx.stats().redelivered);
        }
        let delivery = Delivery::new(message)
            .with_attempt(attempt)
            .with_acker(Box::new(JsAcker {
                acker,
                inner: self.inner.clone(),
            }))
            .with_reply_via_if_request(&self.via);
        // A delivery a dropping policy discards is never acked: the server redelivers it
        // after the ack wait, so stream mode stays at least once.
        self.tx.send(delivery).await
    }

    async fn dead_letter(
        &self,
        setup: &StreamSetup,
        message: Message,
        attempt: u32,
        acker: jetstream::message::Acker,
    ) {
        let counters = &self.inner.counters;
        let Some(dl) = &setup.dead_letter else {
            Counters::incr(&counters.dropped);
            tracing::warn!(bus = %self.inner.name, topic = %message.topic, attempt, "delivery failed max_deliver times and no dead_letter topic is set: terminated");
            let _ = acker.ack_with(AckKind::Term).await;
            return;
        };
        let original = message.topic.clone();
        let mut letter = Message {
            topic: dl.clone(),
            payload: message.payload,
            headers: message.headers,
        };
        letter
            .headers
            .insert("dead_letter_topic", original.as_str());
        letter
            .headers
            .insert("dead_letter_attempts", (attempt - 1).to_string());
        let published = if setup.auto || setup.captures(dl) {
            setup.publish(&self.inner, letter).await
        } else {
            self.inner.publish_core(letter).await
        };
        match published {
            Ok(()) => {
                Counters::incr(&counters.dead_lettered);
                let _ = acker.ack_with(AckKind::Term).await;
            }
            Err(e) => {
                // Keep it: it comes back later and the dead-lettering is tried again.
                Counters::incr(&counters.errors);
                tracing::warn!(bus = %self.inner.name, topic = %original, error = %e, "cannot publish a dead letter; will retry");
                let _ = acker
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

/// Acks, naks (with delay) a JetStream delivery.
struct JsAcker {
    acker: jetstream::message::Acker,
    /// The bus's name and counters (one reference count, not a copy of the name).
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JsAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsAcker")
            .field("bus", &self.inner.name)
            .finish()
    }
}

impl JsAcker {
    async fn send(&self, kind: AckKind, what: &str) -> Result<()> {
        self.acker.ack_with(kind).await.map_err(|e| {
            Counters::incr(&self.inner.counters.errors);
            Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: {what} failed: {e}", self.inner.name),
            )
        })
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack, "ack").await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.send(AckKind::Nak(delay), "nack").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_valid_consumer_names() {
        let p = Pattern::new("orders.>").unwrap();
        let n = group_consumer_name("billing.v2 east", &p);
        assert!(n.starts_with("billing_v2_east-"), "{n}");
        assert!(!n.contains(['.', ' ', '*', '>']));
        assert_ne!(
            n,
            group_consumer_name("billing.v2 east", &Pattern::new("orders.*").unwrap())
        );
        assert_eq!(n, group_consumer_name("billing.v2 east", &p));
    }
}
