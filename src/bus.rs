//! The [`Bus`] trait every transport and the router implement, and its [`Capabilities`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{new_message_id, Message};
use crate::options::SubscribeOptions;
use crate::stats::{GroupLag, StatsSnapshot};
use crate::subscription::Subscription;
use crate::topic::{Pattern, Topic};
use crate::transport::BoxFuture;

/// How a bus delivers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Pub/sub, at most once: every subscriber (or one member per group) gets each message
    /// published while it is subscribed.
    #[default]
    Broadcast,
    /// Durable log, at least once: consumer groups, ack / nack, redelivery and replay.
    Stream,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Broadcast => "broadcast",
            Mode::Stream => "stream",
        })
    }
}

/// What a bus can do. The router checks its config against these at build time, and the
/// conformance suite skips exactly what a bus declares it cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// The mode this bus runs in.
    pub mode: Mode,
    /// Consumer groups (competing consumers) are honoured.
    pub groups: bool,
    /// Deliveries must be acked; nack and ack timeouts redeliver.
    pub ack: bool,
    /// A subscription can start from the beginning of the retained log.
    pub replay: bool,
    /// `request` works.
    pub request_reply: bool,
    /// Headers travel with the payload (false for `raw` framing).
    pub headers: bool,
    /// Subscriptions may use `*` and `>`.
    pub wildcards: bool,
    /// The largest payload accepted, in bytes.
    pub max_payload: usize,
}

impl Capabilities {
    /// Everything a broadcast bus can offer, with `max_payload`.
    pub fn broadcast(max_payload: usize) -> Self {
        Capabilities {
            mode: Mode::Broadcast,
            groups: true,
            ack: false,
            replay: false,
            request_reply: true,
            headers: true,
            wildcards: true,
            max_payload,
        }
    }

    /// Everything a stream bus can offer, with `max_payload`.
    pub fn stream(max_payload: usize) -> Self {
        Capabilities {
            mode: Mode::Stream,
            ack: true,
            replay: true,
            ..Capabilities::broadcast(max_payload)
        }
    }

    /// Checks subscribe options against these capabilities.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] naming `bus` when a group, a replay or a wildcard is asked
    /// of a bus that cannot do it.
    pub fn check_subscribe(
        &self,
        bus: &str,
        pattern: &Pattern,
        options: &SubscribeOptions,
    ) -> Result<()> {
        if options.group.is_some() && !self.groups {
            return Err(Error::unsupported(format!(
                "bus {bus:?} ({} mode) does not support consumer groups; use a stream-mode bus for competing consumers",
                self.mode
            )));
        }
        if options.start == crate::options::StartFrom::Beginning && !self.replay {
            return Err(Error::unsupported(format!(
                "bus {bus:?} ({} mode) cannot replay from the beginning; use a stream-mode bus",
                self.mode
            )));
        }
        if !self.wildcards && !pattern.is_literal() {
            return Err(Error::unsupported(format!(
                "bus {bus:?} does not support wildcard subscriptions ({pattern})"
            )));
        }
        Ok(())
    }

    /// Checks a payload's size.
    ///
    /// # Errors
    /// [`ErrorKind::PayloadTooLarge`] naming the bus, topic, size and limit.
    pub fn check_payload(&self, bus: &str, message: &Message) -> Result<()> {
        if message.payload.len() > self.max_payload {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "bus {bus:?}: payload of {} bytes on {:?} exceeds the limit of {} bytes",
                    message.payload.len(),
                    message.topic.as_str(),
                    self.max_payload
                ),
            ));
        }
        Ok(())
    }
}

/// A message bus: what engines hold, as `Arc<dyn Bus>`.
///
/// Implemented by every transport (memory, Redis, NATS) and by the
/// [`Router`](crate::Router), so engine code never knows which it talks to.
#[async_trait]
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    /// The bus's name (from the config; `"router"` for a router).
    fn name(&self) -> &str;

    /// What this bus can do.
    fn capabilities(&self) -> Capabilities;

    /// Publishes a message.
    ///
    /// # Behavior
    /// - Returns once the bus has accepted the message. What "accepted" means per transport:
    ///   - memory: in every matching subscription's queue (broadcast) or in the topic's log
    ///     (stream);
    ///   - Redis broadcast: queued to the connection's writer task, not yet written (`flush`
    ///     waits until the server has answered everything queued); Redis stream: `XADD`
    ///     answered by the server;
    ///   - NATS core: in the client's write buffer (`flush` waits for the server's `PONG`);
    ///     JetStream: the server's publish ack received.
    /// - Messages from one publisher on one topic arrive in publish order.
    /// - A transport may do the work when `publish` is called rather than when its future is
    ///   first polled (the memory transport does); the outcome is known only by awaiting it.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`] after `close`; [`ErrorKind::PayloadTooLarge`] above
    /// `max_payload`; [`ErrorKind::NoRoute`] from a router with no route for the topic;
    /// connection errors per the bus's outage policy.
    ///
    /// # For implementors
    /// Written out rather than `async fn`, so an implementation can decide before boxing
    /// anything: the memory bus does the whole publish synchronously and returns a
    /// zero-sized future (whose box allocates nothing), the router returns the chosen
    /// bus's own future.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>>;

    /// Subscribes to every topic matching `pattern`.
    ///
    /// # Behavior
    /// - Broadcast mode: messages published after this returns are delivered; with a group,
    ///   each message goes to one member of the group.
    /// - Stream mode (capability `ack`): deliveries must be acked; `options.start` picks
    ///   new messages or a replay of the retained log.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] when the options ask for a capability the bus lacks;
    /// [`ErrorKind::Closed`] after `close`.
    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription>;

    /// Publishes `message` with a fresh `reply_to` and waits for the first reply.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when no reply came within `timeout`;
    /// [`ErrorKind::NoResponders`] where the transport can tell nobody listens;
    /// [`ErrorKind::Unsupported`] without the `request_reply` capability.
    async fn request(&self, message: Message, timeout: Duration) -> Result<Message>;

    /// Waits until every publish accepted so far has reached the broker.
    async fn flush(&self) -> Result<()>;

    /// Flushes, ends every subscription and releases connections. Idempotent. Later
    /// publishes and subscribes fail with [`ErrorKind::Closed`].
    async fn close(&self) -> Result<()>;

    /// A snapshot of this bus's counters.
    fn stats(&self) -> StatsSnapshot;

    /// The transport kind (`memory`, `redis`, `nats`), for the `transport` label of metrics
    /// when the bus was not built from a config (a config's `transport` key wins).
    /// Default: `unknown`.
    fn transport_kind(&self) -> &str {
        "unknown"
    }

    /// Stream mode: how far behind each consumer group of this bus's streams is, asked of
    /// the broker. [`metrics`](crate::metrics) calls it at scrape time, never per message.
    ///
    /// # Behavior
    /// - One entry per group the broker knows on this bus's streams (groups of other
    ///   processes included), summed over the streams or consumers the group reads.
    /// - A bus without consumer groups on a broker (broadcast mode, memory) returns none:
    ///   the default.
    ///
    /// # Errors
    /// Connection and broker errors of the queries; the caller keeps the previous values.
    fn consumer_lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// The prefix of reply topics made by [`request_via_inbox`].
pub const INBOX_PREFIX: &str = "_INBOX";

/// Whether `topic` is a reply inbox made by [`request_via_inbox`] (`_INBOX.<id>`).
pub fn is_inbox(topic: &str) -> bool {
    topic
        .strip_prefix(INBOX_PREFIX)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// `request` for transports without a native request mechanism: subscribes to a fresh inbox
/// topic on `bus`, publishes `message` with `reply_to` set to it and a correlation id, and
/// waits for the first reply.
///
/// # Errors
/// [`ErrorKind::Timeout`] naming the topic when nothing answers within `timeout`.
pub async fn request_via_inbox(
    bus: &dyn Bus,
    mut message: Message,
    timeout: Duration,
) -> Result<Message> {
    let id = new_message_id();
    let inbox = Topic::new(format!("{INBOX_PREFIX}.{id}"))?;
    let mut replies = bus
        .subscribe(
            Pattern::exact(&inbox),
            SubscribeOptions::new()
                .capacity(4)
                .overflow(crate::Overflow::DropNewest),
        )
        .await?;
    let topic = message.topic.clone();
    message.headers.reply_to = Some(inbox);
    if message.headers.correlation_id.is_none() {
        message.headers.correlation_id = Some(id);
    }
    bus.publish(message).await?;
    match tokio::time::timeout(timeout, replies.next()).await {
        Ok(Some(d)) => Ok(d.into_message()),
        Ok(None) => Err(Error::closed(format!("bus {:?}", bus.name()))),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "request on {:?} (bus {:?}): no reply within {timeout:?}",
                topic.as_str(),
                bus.name()
            ),
        )),
    }
}
