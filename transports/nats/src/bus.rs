//! [`NatsBus`]: one async-nats client per bus, core NATS (broadcast) or JetStream (stream).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::message::OutboundMessage;
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use async_trait::async_trait;
use busway::transport::redact_url;
use busway::transport::BoxFuture;
use busway::transport::QueueSender;
use busway::{
    config::QueueDefaults,
    transport::{BuildContext, Counters, TransportFactory},
    Bus, Capabilities, Error, ErrorKind, Health, Message, Mode, Pattern, Result, StatsSnapshot,
    SubscribeOptions, Subscription, Topic,
};
use futures::FutureExt;
use parking_lot::Mutex;

use busway::transport::{is_inbox, Framing, OnDisconnect};

use crate::config::NatsConfig;
use crate::drops::{ClientDrops, ProbeSender, SETTLE_EVERY};
use crate::headers;
use crate::jetstream::StreamSetup;
use crate::subject;

/// A bus on NATS: core NATS in broadcast mode, JetStream in stream mode.
///
/// One async-nats client (one TCP connection, named `busway:<app>:<bus>`) carries every
/// publish, subscription and request of the bus. Build it through the registry
/// ([`register`](crate::register)) or with [`NatsBus::connect`].
#[derive(Debug, Clone)]
pub struct NatsBus {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) name: String,
    /// The URL list with passwords and tokens replaced by `***`.
    pub(crate) url: String,
    pub(crate) client: async_nats::Client,
    pub(crate) mode: Mode,
    pub(crate) config: NatsConfig,
    pub(crate) queue: QueueDefaults,
    pub(crate) counters: Arc<Counters>,
    pub(crate) stream: Option<StreamSetup>,
    /// What async-nats dropped for slow consumers (see `drops`).
    pub(crate) client_drops: Arc<ClientDrops>,
    closed: AtomicBool,
    pumps: Mutex<Pumps>,
    next_sub: AtomicU64,
}

/// The running pumps of the bus (each fed by one NATS subscription or JetStream consumer),
/// and which of them core subscriptions of a pattern share.
#[derive(Debug, Default)]
struct Pumps {
    by_id: HashMap<u64, PumpEntry>,
    /// Pattern -> the pump that subscriptions of that pattern without a group and under a
    /// policy that never waits share (see `core::subscribe`).
    shared: HashMap<String, u64>,
}

#[derive(Debug)]
struct PumpEntry {
    members: Arc<Members>,
    task: tokio::task::AbortHandle,
    /// Core pumps only: answers once its async-nats channel is empty.
    probe: Option<ProbeSender>,
    /// Its key in `Pumps::shared`, when shared.
    shared: Option<String>,
}

/// The subscription queues one pump feeds: one, or several for a shared core subscription.
#[derive(Debug, Default)]
pub(crate) struct Members {
    list: Mutex<Vec<(u64, QueueSender)>>,
    /// Bumped (under the lock) on every change, so the pump re-reads the list only then.
    generation: AtomicU64,
}

impl Members {
    fn add(&self, id: u64, tx: QueueSender) {
        let mut list = self.list.lock();
        list.push((id, tx));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Removes member `id`; true when none is left.
    fn remove(&self, id: u64) -> bool {
        let mut list = self.list.lock();
        list.retain(|(m, _)| *m != id);
        self.generation.fetch_add(1, Ordering::Release);
        list.is_empty()
    }

    /// Brings `into` up to date with the members, if they changed since generation `seen`.
    /// One atomic load when nothing changed (the pump calls it for every message).
    pub(crate) fn refresh(&self, seen: &mut u64, into: &mut Vec<QueueSender>) {
        if self.generation.load(Ordering::Acquire) == *seen {
            return;
        }
        let list = self.list.lock();
        into.clear();
        into.extend(list.iter().map(|(_, tx)| tx.clone()));
        *seen = self.generation.load(Ordering::Acquire);
    }

    /// Ends every member's subscription (once it has drained its queue).
    pub(crate) fn close_all(&self) {
        for (_, tx) in self.list.lock().iter() {
            tx.close();
        }
    }

    /// The member, when there is exactly one.
    fn only(&self) -> Option<QueueSender> {
        match self.list.lock().as_slice() {
            [(_, tx)] => Some(tx.clone()),
            _ => None,
        }
    }
}

/// Dropped with a subscription: takes it out of its pump's members; the last one out stops
/// the pump (which unsubscribes or deletes its consumer).
#[derive(Debug)]
pub(crate) struct SubGuard {
    bus: Weak<Inner>,
    pump: u64,
    member: u64,
    task: tokio::task::AbortHandle,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        match self.bus.upgrade() {
            Some(bus) => bus.leave(self.pump, self.member, &self.task),
            None => self.task.abort(),
        }
    }
}

/// Starts a pump, given its id and members: its task and, for a core pump, its probe.
pub(crate) type StartPump<'a> =
    Box<dyn FnOnce(u64, Arc<Members>) -> (tokio::task::AbortHandle, Option<ProbeSender>) + 'a>;

/// A shared core pump found for a new member: what joining it needs (see
/// [`Inner::join_shared`]).
#[derive(Debug)]
pub(crate) struct SharedPump {
    pump: u64,
    task: tokio::task::AbortHandle,
    /// Answers once the pump has handed on everything its NATS subscription received.
    pub(crate) probe: Option<ProbeSender>,
}

impl Pumps {
    fn find_shared(&self, pattern: &str) -> Option<SharedPump> {
        let pump = *self.shared.get(pattern)?;
        let entry = self.by_id.get(&pump)?;
        Some(SharedPump {
            pump,
            task: entry.task.clone(),
            probe: entry.probe.clone(),
        })
    }
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Records a running pump feeding `tx` alone and returns the guard to attach to its
    /// subscription.
    pub(crate) fn track(
        self: &Arc<Self>,
        tx: QueueSender,
        task: tokio::task::AbortHandle,
        probe: Option<ProbeSender>,
    ) -> SubGuard {
        self.start_pump(tx, Box::new(|_, _| (task, probe)))
    }

    /// Records a new pump feeding `tx`, started by `start(pump id, its members)`, and returns
    /// the guard to attach to `tx`'s subscription.
    pub(crate) fn start_pump(self: &Arc<Self>, tx: QueueSender, start: StartPump<'_>) -> SubGuard {
        let mut pumps = self.pumps.lock();
        self.insert_pump(&mut pumps, None, tx, start)
    }

    /// As [`Inner::start_pump`], for a pump that later subscriptions of `pattern` share
    /// (found by [`Inner::find_shared`]). If another one was registered for the pattern
    /// meanwhile, `start` is not called (what it owns, such as a NATS subscription, is
    /// dropped) and that pump is returned, to join instead.
    pub(crate) fn start_shared(
        self: &Arc<Self>,
        pattern: &str,
        tx: QueueSender,
        start: StartPump<'_>,
    ) -> std::result::Result<SubGuard, SharedPump> {
        let mut pumps = self.pumps.lock();
        if let Some(found) = pumps.find_shared(pattern) {
            return Err(found);
        }
        Ok(self.insert_pump(&mut pumps, Some(pattern.to_string()), tx, start))
    }

    fn insert_pump(
        self: &Arc<Self>,
        pumps: &mut Pumps,
        shared: Option<String>,
        tx: QueueSender,
        start: StartPump<'_>,
    ) -> SubGuard {
        let pump = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let member = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let members = Arc::new(Members::default());
        members.add(member, tx);
        let (task, probe) = start(pump, members.clone());
        if let Some(key) = &shared {
            pumps.shared.insert(key.clone(), pump);
        }
        pumps.by_id.insert(
            pump,
            PumpEntry {
                members,
                task: task.clone(),
                probe,
                shared,
            },
        );
        SubGuard {
            bus: Arc::downgrade(self),
            pump,
            member,
            task,
        }
    }

    /// The shared pump of `pattern`, if one is running.
    pub(crate) fn find_shared(&self, pattern: &str) -> Option<SharedPump> {
        self.pumps.lock().find_shared(pattern)
    }

    /// Adds `tx` to the members of `found`; `None` when that pump has stopped meanwhile.
    pub(crate) fn join_shared(
        self: &Arc<Self>,
        found: SharedPump,
        tx: QueueSender,
    ) -> Option<SubGuard> {
        let pumps = self.pumps.lock();
        let entry = pumps.by_id.get(&found.pump)?;
        let member = self.next_sub.fetch_add(1, Ordering::Relaxed);
        entry.members.add(member, tx);
        Some(SubGuard {
            bus: Arc::downgrade(self),
            pump: found.pump,
            member,
            task: found.task,
        })
    }

    /// Takes member `member` out of pump `pump`; stops the pump when it was the last.
    fn leave(&self, pump: u64, member: u64, task: &tokio::task::AbortHandle) {
        let mut pumps = self.pumps.lock();
        let Some(entry) = pumps.by_id.get(&pump) else {
            // Already retired (its subscription ended) or the bus closed.
            task.abort();
            return;
        };
        if entry.members.remove(member) {
            if let Some(entry) = pumps.by_id.remove(&pump) {
                if let Some(key) = entry.shared {
                    pumps.shared.remove(&key);
                }
            }
            task.abort();
        }
    }

    /// Forgets pump `pump` whose NATS subscription ended (the client closed): later
    /// subscriptions of its pattern start a new one.
    pub(crate) fn retire(&self, pump: u64) {
        let mut pumps = self.pumps.lock();
        if let Some(entry) = pumps.by_id.remove(&pump) {
            if let Some(key) = entry.shared {
                pumps.shared.remove(&key);
            }
        }
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::closed(format!("bus {:?}", self.name))
    }

    /// The error for a publish while disconnected under `on_disconnect = "fail"`.
    pub(crate) fn disconnected_error(&self, topic: &Topic) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "bus {:?}: not connected to NATS at {} (publishing {:?}; on_disconnect = \"fail\")",
                self.name,
                self.url,
                topic.as_str()
            ),
        )
    }

    /// Counts a publish's outcome.
    fn published(&self, result: Result<()>) -> Result<()> {
        match result {
            Ok(()) => {
                Counters::incr(&self.counters.published);
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    pub(crate) fn failed(&self, e: Error) -> Error {
        Counters::incr(&self.counters.errors);
        e
    }

    /// Core NATS publish (broadcast mode, and replies to inboxes in stream mode).
    pub(crate) async fn publish_core(&self, message: Message) -> Result<()> {
        let (outbound, topic) = self.outbound(message)?;
        self.core_send(outbound, topic).await
    }

    /// The async-nats message for `message`, and its topic (for error messages).
    ///
    /// # Errors
    /// [`ErrorKind::Encode`] when a header cannot travel as a NATS header.
    fn outbound(&self, message: Message) -> Result<(OutboundMessage, Topic)> {
        let Message {
            topic,
            payload,
            headers: h,
        } = message;
        let headers = match self.config.framing {
            Framing::Busway => headers::encode(&topic, &h)?,
            Framing::Raw => None,
        };
        let outbound = OutboundMessage {
            subject: subject::of(&topic),
            // Reply subjects are request inboxes, each used once: copied, not cached.
            reply: h
                .reply_to
                .as_ref()
                .map(|r| async_nats::Subject::from(r.as_str())),
            payload,
            headers,
        };
        Ok((outbound, topic))
    }

    /// The core publish of `outbound`: a future that holds the async-nats send and nothing
    /// else of the message (a publish future is boxed and moved on every publish, so its size
    /// is a per-message cost).
    fn core_send(
        &self,
        outbound: OutboundMessage,
        topic: Topic,
    ) -> CoreSend<
        '_,
        impl Future<Output = std::result::Result<(), async_nats::PublishError>> + Send + '_,
    > {
        use async_nats::client::traits::Publisher;
        // `publish_message` takes every kind of message as it is; the `publish*` variants
        // would make the future an `Either` of four.
        CoreSend::new(self, topic, self.client.publish_message(outbound))
    }

    /// The error for a publish async-nats refused.
    fn send_error(&self, topic: &Topic, e: async_nats::PublishError) -> Error {
        let too_large = e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded;
        self.publish_error(topic, e.to_string(), too_large, e)
    }

    fn publish_error(
        &self,
        topic: &Topic,
        what: String,
        too_large: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        let kind = if too_large {
            ErrorKind::PayloadTooLarge
        } else {
            ErrorKind::Connection
        };
        Error::new(
            kind,
            format!(
                "bus {:?}: publish on {:?} failed: {what}",
                self.name,
                topic.as_str()
            ),
        )
        .with_source(source)
    }

    /// Waits until the server has processed everything this client sent so far (bounded by
    /// `publish_timeout`). async-nats's `flush` only writes the socket; a request nobody
    /// answers comes back as "no responders" after the server handled what preceded it.
    pub(crate) async fn round_trip(&self) -> Result<()> {
        use async_nats::client::RequestErrorKind;
        let subject = format!("{}.busway-sync", self.client.new_inbox());
        let timeout = self.config.publish_timeout();
        let answer =
            tokio::time::timeout(timeout, self.client.request(subject, bytes::Bytes::new())).await;
        match answer {
            Ok(Ok(_)) => {
                self.client_drops.took();
                Ok(())
            }
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                // The "no responders" status is a message too.
                self.client_drops.took();
                Ok(())
            }
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: flush to {} failed", self.name, self.url),
            )
            .with_source(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?}: flush to {} did not finish within {timeout:?} ({})",
                    self.name,
                    self.url,
                    if self.is_connected() {
                        "connected"
                    } else {
                        "disconnected"
                    }
                ),
            )),
        }
    }

    /// Settles the count of client-side drops (broadcast mode; see `drops`), attributing
    /// new drops to the subscription when there is only one core subscription.
    pub(crate) async fn settle_client_drops(&self) {
        if self.mode != Mode::Broadcast {
            return;
        }
        let stats = self.client.statistics();
        if !self
            .client_drops
            .unsettled(stats.in_messages.load(Ordering::Relaxed))
        {
            return;
        }
        let (pumps, only): (Vec<ProbeSender>, Option<QueueSender>) = {
            let all = self.pumps.lock();
            let pumps: Vec<ProbeSender> =
                all.by_id.values().filter_map(|e| e.probe.clone()).collect();
            // A message async-nats dropped never reached any member of its pump: it is
            // attributed only when one pump with one member can have lost it.
            let only = match (pumps.len(), all.by_id.values().find(|e| e.probe.is_some())) {
                (1, Some(e)) => e.members.only(),
                _ => None,
            };
            (pumps, only)
        };
        if pumps.is_empty() {
            // No core subscription: the client holds nothing it could drop for a slow
            // consumer (replies are taken by their requests), so there is nothing to settle.
            return;
        }
        let new = self.client_drops.settle(&stats, &pumps).await;
        if let Some(tx) = only {
            tx.stats().dropped.fetch_add(new, Ordering::Relaxed);
        }
    }

    fn max_payload(&self) -> usize {
        // The server's limit covers headers too; leave them room.
        // An atomic load: `server_info()` would clone the whole INFO (strings, URL lists)
        // under a lock on every publish.
        self.client.max_payload().saturating_sub(4096).max(1)
    }
}

pin_project_lite::pin_project! {
    /// A core publish waiting for room in the client's command buffer, for at most
    /// `publish_timeout` (see [`Inner::core_send`]).
    pub(crate) struct CoreSend<'a, F> {
        #[pin]
        send: F,
        inner: &'a Inner,
        topic: Topic,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        // Whether the outcome counts in the bus's `published` / `errors` (a `Bus::publish`);
        // counted here rather than by a `map` around the boxed future, one poll layer less
        // per publish.
        counted: bool,
    }
}

impl<'a, F> CoreSend<'a, F> {
    fn new(inner: &'a Inner, topic: Topic, send: F) -> Self {
        CoreSend {
            send,
            inner,
            topic,
            timer: None,
            counted: false,
        }
    }

    /// Counts the outcome as a `Bus::publish`'s.
    fn counted(mut self) -> Self {
        self.counted = true;
        self
    }
}

impl<F> Future for CoreSend<'_, F>
where
    F: Future<Output = std::result::Result<(), async_nats::PublishError>>,
{
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.project();
        let inner = *this.inner;
        if let Poll::Ready(sent) = this.send.poll(cx) {
            let sent = sent.map_err(|e| inner.send_error(this.topic, e));
            return Poll::Ready(if *this.counted {
                inner.published(sent)
            } else {
                sent
            });
        }
        // The command buffer almost always has room: the timer is armed only when the send
        // really waits. A send that is pending only because this task used up its Tokio
        // budget (a publisher with many publishes in flight) is woken again at once by
        // Tokio, and arming a timer for it would cost a clock read and a timer-wheel entry
        // per publish.
        if this.timer.is_none() && !tokio::task::coop::has_budget_remaining() {
            return Poll::Pending;
        }
        let timeout = inner.config.publish_timeout();
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        std::task::ready!(timer.as_mut().poll(cx));
        let e = Error::new(
            ErrorKind::BufferFull,
            format!(
                "bus {:?}: publish on {:?} found the client's outage buffer full (publish_buffer) for {timeout:?} while {}",
                inner.name,
                this.topic.as_str(),
                if inner.is_connected() { "connected" } else { "disconnected" }
            ),
        );
        Poll::Ready(Err(if *this.counted { inner.failed(e) } else { e }))
    }
}

/// Maps a connect failure to a busway error naming the bus and the redacted URL.
fn connect_error(bus: &str, url: &str, e: async_nats::ConnectError) -> Error {
    let kind = match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            ErrorKind::Auth
        }
        ConnectErrorKind::ServerParse => ErrorKind::InvalidConfig,
        _ => ErrorKind::Connection,
    };
    let hint = match kind {
        ErrorKind::Auth => {
            " (the server refused the credentials: check user/password, token, creds or nkey)"
        }
        _ => "",
    };
    // The error's own text never holds the credentials (async-nats prints kinds only).
    Error::new(
        kind,
        format!("bus {bus:?}: cannot connect to NATS at {url}: {e}{hint}"),
    )
}

fn handle_event(bus: &str, counters: &Counters, drops: &ClientDrops, event: async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            tracing::info!(bus, "connected to NATS");
        }
        Event::Disconnected => {
            tracing::warn!(bus, "disconnected from NATS; async-nats reconnects");
        }
        Event::SlowConsumer(sid) => {
            // async-nats dropped a message because a subscription's channel was full. A lower
            // bound: `stats()` reports the exact count once it settles (see `drops`).
            drops.slow_consumer_event();
            tracing::debug!(bus, sid, "slow consumer: async-nats dropped a message");
        }
        Event::ServerError(e) => {
            Counters::incr(&counters.errors);
            tracing::warn!(bus, error = %e, "NATS server error");
        }
        Event::ClientError(e) => {
            Counters::incr(&counters.errors);
            tracing::warn!(bus, error = %e, "NATS client error");
        }
        other => tracing::info!(bus, event = %other, "NATS event"),
    }
}

impl NatsBus {
    /// Connects a bus described by `ctx` (its `url`, `mode`, queue defaults and the NATS keys
    /// of [`NatsConfig`]). In stream mode the JetStream stream is created, or updated to the
    /// configured subjects and limits.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] naming the file and key; [`ErrorKind::Auth`] when the
    /// server refuses the credentials (at once, without retrying);
    /// [`ErrorKind::Connection`] when no server answers within `connect_timeout`;
    /// [`ErrorKind::Broker`] when the stream cannot be created.
    pub async fn connect(ctx: BuildContext<'_>) -> Result<NatsBus> {
        let config: NatsConfig = ctx.options()?;
        let raw_url = ctx
            .config
            .url
            .clone()
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string());
        let url = redact_url(&raw_url);
        let mut addrs = Vec::new();
        // async-nats ignores credentials in URLs: `nats://user:pass@h` and `nats://token@h`
        // are honoured here (keys in config win).
        let mut url_user_pass = None;
        let mut url_token = None;
        for one in raw_url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = ServerAddr::from_str(one).map_err(|e| {
                ctx.config_error(
                    "url",
                    format!("{:?} is not a NATS URL: {e}", redact_url(one)),
                )
            })?;
            match (addr.username(), addr.password()) {
                (Some(u), Some(p)) => {
                    url_user_pass = Some((decode_userinfo(u), decode_userinfo(p)))
                }
                (Some(t), None) => url_token = Some(decode_userinfo(t)),
                _ => {}
            }
            // The credentials go through the connect options (which async-nats masks in its
            // logs); the address it is given, and logs at debug level, holds none.
            let addr = match one.split_once("://") {
                Some((scheme, rest)) if addr.username().is_some() => {
                    let at = rest[..rest.find(['/', '?']).unwrap_or(rest.len())]
                        .rfind('@')
                        .map_or(0, |i| i + 1);
                    ServerAddr::from_str(&format!("{scheme}://{}", &rest[at..])).map_err(|e| {
                        ctx.config_error(
                            "url",
                            format!("{:?} is not a NATS URL: {e}", redact_url(one)),
                        )
                    })?
                }
                _ => addr,
            };
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err(ctx.config_error("url", "is empty"));
        }
        let queue = ctx.config.queue_defaults();
        let counters = Arc::new(Counters::default());
        counters.set_health(Health::Connecting);

        let mut options = ConnectOptions::new()
            .name(ctx.client_name())
            .subscription_capacity(config.client_capacity(queue.capacity))
            .client_capacity(config.publish_buffer.unwrap_or(8192).max(1))
            // Every subject busway sends is a validated `Topic` (no whitespace, wildcards or
            // empty tokens): async-nats need not scan it again on every publish.
            .skip_subject_validation(true)
            .connection_timeout(config.connect_timeout())
            .max_reconnects(config.max_reconnects)
            .require_tls(config.tls_required);
        let client_drops = Arc::new(ClientDrops::default());
        {
            let counters = counters.clone();
            let drops = client_drops.clone();
            let bus = ctx.bus.to_string();
            options = options.event_callback(move |event| {
                handle_event(&bus, &counters, &drops, event);
                async {}
            });
        }
        match (&config.user, &config.password) {
            (Some(u), Some(p)) => options = options.user_and_password(u.clone(), p.clone()),
            (None, None) => {
                if let Some((u, p)) = url_user_pass {
                    options = options.user_and_password(u, p);
                }
            }
            (Some(_), None) => {
                return Err(ctx.config_error("password", "`user` is set without `password`"))
            }
            (None, Some(_)) => {
                return Err(ctx.config_error("user", "`password` is set without `user`"))
            }
        }
        if let Some(token) = config.token.clone().or(url_token) {
            options = options.token(token);
        }
        if let Some(seed) = &config.nkey {
            options = options.nkey(seed.clone());
        }
        if let Some(creds) = &config.creds {
            options = options.credentials_file(creds).await.map_err(|e| {
                ctx.config_error("creds", format!("cannot read the credentials file: {e}"))
            })?;
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => options = options.add_client_certificate(c.clone(), k.clone()),
            (None, None) => {}
            _ => {
                return Err(
                    ctx.config_error("tls_cert", "`tls_cert` and `tls_key` must be set together")
                )
            }
        }
        // retry_on_initial_connect stays off: a wrong password or an absent server is an
        // error now, not a background retry loop.
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| connect_error(ctx.bus, &url, e))?;
        counters.set_health(Health::Up);

        let stream = match ctx.config.mode {
            Mode::Broadcast => None,
            Mode::Stream => Some(StreamSetup::ensure(&ctx, &config, &client).await?),
        };
        let inner = Arc::new(Inner {
            name: ctx.bus.to_string(),
            url,
            client,
            mode: ctx.config.mode,
            config,
            queue,
            counters,
            stream,
            client_drops,
            closed: AtomicBool::new(false),
            pumps: Mutex::new(Pumps::default()),
            next_sub: AtomicU64::new(0),
        });
        if inner.mode == Mode::Broadcast {
            tokio::spawn(settle_loop(Arc::downgrade(&inner)));
        }
        Ok(NatsBus { inner })
    }

    /// The async-nats client (for raw access in tests and benches).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.is_closed() {
            Err(self.inner.closed_error())
        } else {
            Ok(())
        }
    }

    fn as_dyn(&self) -> Arc<dyn Bus> {
        Arc::new(self.clone())
    }
}

/// Settles the client-side drop count while messages arrive, so `stats()` is exact shortly
/// after traffic pauses even if nobody calls `flush`. Ends with the bus.
async fn settle_loop(bus: Weak<Inner>) {
    let mut tick = tokio::time::interval(SETTLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = bus.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        inner.settle_client_drops().await;
    }
}

/// Percent-decodes URL user info (`p%40ss` -> `p@ss`).
fn decode_userinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[async_trait]
impl Bus for NatsBus {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capabilities(&self) -> Capabilities {
        let max = self.inner.max_payload();
        let mut caps = match self.inner.mode {
            Mode::Broadcast => Capabilities::broadcast(max),
            Mode::Stream => Capabilities::stream(max),
        };
        caps.headers = self.inner.config.framing == Framing::Busway;
        caps
    }

    // The checks and the preparation run before the future is boxed, so the box holds only the send (small enough for the allocator's
    // per-thread cache) instead of the message, the send and the state between them.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
        let inner = &*self.inner;
        let checked = self.check_open().and_then(|()| {
            // The limit alone first: building the whole `Capabilities` costs more than the
            // comparison, on every publish.
            if message.payload.len() > inner.max_payload() {
                self.capabilities()
                    .check_payload(&inner.name, &message)
                    .map_err(|e| inner.failed(e))?;
            }
            if inner.config.on_disconnect == OnDisconnect::Fail && !inner.is_connected() {
                return Err(inner.failed(inner.disconnected_error(&message.topic)));
            }
            Ok(())
        });
        if let Err(e) = checked {
            return Box::pin(std::future::ready(Err(e)));
        }
        match &inner.stream {
            Some(stream) if !is_inbox(message.topic.as_str()) => Box::pin(
                stream
                    .publish(inner, message)
                    .map(move |r| inner.published(r)),
            ),
            _ => {
                let (outbound, topic) = match inner.outbound(message) {
                    Ok(prepared) => prepared,
                    Err(e) => return Box::pin(std::future::ready(Err(inner.failed(e)))),
                };
                // A message with neither headers nor a reply subject (the usual one) goes
                // through `publish`, whose future is a quarter smaller than
                // `publish_message`'s; a separate box type each, so it does not pay for the
                // larger one.
                match outbound {
                    OutboundMessage {
                        subject,
                        reply: None,
                        payload,
                        headers: None,
                    } => Box::pin(
                        CoreSend::new(inner, topic, inner.client.publish(subject, payload))
                            .counted(),
                    ),
                    outbound => Box::pin(inner.core_send(outbound, topic).counted()),
                }
            }
        }
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let inbox = is_inbox(pattern.as_str());
        if !inbox {
            self.capabilities()
                .check_subscribe(&self.inner.name, &pattern, &options)?;
        }
        if let Some(group) = &options.group {
            if group.is_empty() || group.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "bus {:?}: group {group:?} must be non-empty printable ASCII without spaces",
                        self.inner.name
                    ),
                ));
            }
        }
        match &self.inner.stream {
            Some(stream) if !inbox => {
                stream
                    .subscribe(&self.inner, pattern, options, self.as_dyn())
                    .await
            }
            _ => crate::core::subscribe(&self.inner, pattern, options, self.as_dyn()).await,
        }
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        let inner = &self.inner;
        self.capabilities()
            .check_payload(&inner.name, &message)
            .map_err(|e| inner.failed(e))?;
        if inner.config.on_disconnect == OnDisconnect::Fail && !inner.is_connected() {
            return Err(inner.failed(inner.disconnected_error(&message.topic)));
        }
        match &inner.stream {
            Some(stream) if stream.auto || stream.captures(&message.topic) => {
                stream.request(self, message, timeout).await
            }
            _ => crate::core::request(inner, message, timeout).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.inner
            .round_trip()
            .await
            .map_err(|e| self.inner.failed(e))?;
        self.inner.settle_client_drops().await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Stream publishes already awaited their PubAck; make the server take what is
        // still buffered (broadcast) before the connection goes.
        let flushed = inner.round_trip().await;
        let pumps: Vec<PumpEntry> = {
            let mut all = inner.pumps.lock();
            all.shared.clear();
            all.by_id.drain().map(|(_, e)| e).collect()
        };
        for pump in pumps {
            pump.task.abort();
            pump.members.close_all();
        }
        if let Some(stream) = &inner.stream {
            stream.close(inner).await;
        }
        // Best effort: the server may already be gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), inner.client.drain()).await;
        inner.counters.set_health(Health::Closed);
        flushed.map_err(|e| e.context("closing"))
    }

    fn stats(&self) -> StatsSnapshot {
        let inner = &self.inner;
        let mut s = inner.counters.snapshot();
        s.dropped += inner.client_drops.count();
        let connected = inner.is_connected();
        // async-nats counts every successful connect: the first is not a reconnect.
        let connects = inner.client.statistics().connects.load(Ordering::Relaxed);
        s.reconnects = connects.saturating_sub(1);
        s.connections = u64::from(connected && !inner.is_closed());
        s.health = if inner.is_closed() {
            Health::Closed
        } else if connected {
            Health::Up
        } else {
            Health::Connecting
        };
        s
    }
}

/// Builds [`NatsBus`]es for `transport = "nats"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsFactory;

#[async_trait]
impl TransportFactory for NatsFactory {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn validate(&self, ctx: BuildContext<'_>) -> Result<()> {
        ctx.options::<NatsConfig>().map(drop)
    }

    async fn build(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>> {
        Ok(Arc::new(NatsBus::connect(ctx).await?))
    }
}

/// Registers the `nats` transport.
pub fn register(registry: &mut busway::Registry) {
    registry.register(NatsFactory);
}
