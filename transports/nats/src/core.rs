//! Broadcast mode on core NATS: subscriptions (with queue groups, or shared), the pump that
//! moves each async-nats subscriber into busway's queues, and native request/reply.

use std::future::poll_fn;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use busway::transport::{Framing, QueueSender};
use busway::transport::{TransportDelivery, TransportSubscription};
use busway::{
    transport::{new_message_id, Counters},
    Bus, Delivery, Error, ErrorKind, Headers, Message, Overflow, Pattern, Result, SubscribeOptions,
    Subscription, Topic,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::bus::{Inner, Members, SharedPump, StartPump, SubGuard};
use crate::drops::{ClientDrops, Probe};
use crate::headers;

/// A busway message from a NATS message. `reply` (the NATS reply subject) stands in for a
/// missing `Busway-Reply-To` header, so plain NATS requesters can be answered.
pub(crate) fn to_message(
    subject: &str,
    payload: bytes::Bytes,
    map: Option<&async_nats::HeaderMap>,
    reply: Option<&str>,
) -> Result<Message> {
    with_topic(Topic::new(subject)?, payload, map, reply)
}

pub(crate) fn with_topic(
    topic: Topic,
    payload: bytes::Bytes,
    map: Option<&async_nats::HeaderMap>,
    reply: Option<&str>,
) -> Result<Message> {
    Ok(Message {
        topic,
        payload,
        headers: reply_headers(map, reply)?,
    })
}

/// The busway headers of a NATS message with headers `map` and reply subject `reply`.
#[inline]
fn reply_headers(map: Option<&async_nats::HeaderMap>, reply: Option<&str>) -> Result<Headers> {
    if map.is_none() && reply.is_none() {
        // Most messages: built where the caller puts them, not returned through `decode`.
        return Ok(Headers::default());
    }
    let mut h = headers::decode(map)?;
    if h.reply_to.is_none() {
        if let Some(reply) = reply {
            h.reply_to = Some(Topic::new(reply)?);
        }
    }
    Ok(h)
}

/// The topics of one subscription's subjects. Subjects repeat (an exact subscription sees
/// one; a wildcard one often the same few), so the last topic is kept and a matching subject
/// reuses it instead of being parsed and allocated again.
#[derive(Debug, Clone)]
pub(crate) struct SubjectTopics {
    last: Topic,
}

impl SubjectTopics {
    pub(crate) fn new(pattern: &Pattern) -> SubjectTopics {
        // Any valid topic will do until the first message: a subject never equals it by
        // chance in a way that matters (equal strings are the same topic).
        let last = pattern
            .as_topic()
            .unwrap_or_else(|| Topic::new("_").expect("\"_\" is a valid topic"));
        SubjectTopics { last }
    }

    /// The topic named by `subject`.
    ///
    /// # Errors
    /// When the subject is not a valid busway topic (a foreign publisher's).
    pub(crate) fn topic(&mut self, subject: &str) -> Result<Topic> {
        if subject == self.last.as_str() {
            Ok(self.last.clone())
        } else {
            Topic::new(subject).inspect(|t| self.last = t.clone())
        }
    }
}

/// Turns one NATS subscription's messages into busway messages.
struct Decoder {
    topics: SubjectTopics,
    via: Arc<dyn Bus>,
    bus_counters: Arc<Counters>,
}

impl Decoder {
    /// The message for `msg`, or `None` (counted for the bus and for each of `members`) when
    /// it does not decode. Built in place in its `Arc`: a message is a few hundred bytes, and
    /// each move of it on the way is a copy.
    fn message(
        &mut self,
        msg: async_nats::Message,
        members: &[QueueSender],
    ) -> Option<Arc<Message>> {
        let async_nats::Message {
            subject,
            reply,
            payload,
            headers: map,
            ..
        } = msg;
        let decoded = self.topics.topic(subject.as_str()).and_then(|topic| {
            let headers = reply_headers(map.as_ref(), reply.as_deref())?;
            Ok(Arc::new(Message {
                topic,
                payload,
                headers,
            }))
        });
        match decoded {
            Ok(message) => Some(message),
            Err(e) => {
                Counters::incr(&self.bus_counters.decode_errors);
                for tx in members {
                    Counters::incr(&tx.stats().decode_errors);
                }
                tracing::debug!(%subject, error = %e, "skipped an undecodable NATS message");
                None
            }
        }
    }

    /// A delivery of `message`, answerable when it is a request.
    fn delivery(&self, message: Arc<Message>) -> Delivery {
        Delivery::shared(message).with_reply_via_if_request(&self.via)
    }
}

/// Subscribes in broadcast mode (and to request inboxes on a stream bus).
///
/// Subscriptions of one pattern without a group under a policy that never waits (every
/// policy but `block`) share one NATS subscription: the server sends each message once and
/// it is decoded once, then offered to each member's queue, where each applies its own
/// capacity and policy and counts its own drops. A `block` subscription, or one in a group,
/// has a NATS subscription of its own, so a full `block` queue stalls no other subscription.
pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    pattern: Pattern,
    options: SubscribeOptions,
    via: Arc<dyn Bus>,
) -> Result<Subscription> {
    let (capacity, overflow) = options.queue(inner.queue);
    let shared = options.group.is_none() && overflow != Overflow::Block;
    let key = pattern.as_str().to_string();
    let topics = SubjectTopics::new(&pattern);
    let (tx, sub) = Subscription::channel(pattern, capacity, overflow, inner.counters.clone());
    if !shared {
        let subscriber = nats_subscribe(inner, &key, options.group.as_deref()).await?;
        let start = pump_starter(inner, subscriber, topics, via);
        return Ok(sub.with_guard(inner.start_pump(tx, start)));
    }
    loop {
        if let Some(found) = inner.find_shared(&key) {
            if let Some(guard) = join(inner, found, &tx).await {
                return Ok(sub.with_guard(guard));
            }
            // That pump stopped meanwhile (its last member left): start a new one.
            continue;
        }
        let subscriber = nats_subscribe(inner, &key, None).await?;
        let start = pump_starter(inner, subscriber, topics.clone(), via.clone());
        match inner.start_shared(&key, tx.clone(), start) {
            Ok(guard) => return Ok(sub.with_guard(guard)),
            // Another subscription of the pattern started one first: ours was dropped
            // (unsubscribed) unused; join theirs.
            Err(found) => {
                if let Some(guard) = join(inner, found, &tx).await {
                    return Ok(sub.with_guard(guard));
                }
            }
        }
    }
}

/// Joins a shared pump once it has handed on what its NATS subscription received before
/// this subscribe: a new member gets messages published after `subscribe` returns, as with a
/// NATS subscription of its own, not ones already on their way. Bounded by
/// `publish_timeout`: a pump that never runs dry (a stream of messages faster than it) is
/// joined anyway, and the new member may then get a few messages published just before.
async fn join(inner: &Arc<Inner>, found: SharedPump, tx: &QueueSender) -> Option<SubGuard> {
    if inner.is_connected() {
        // Every message published before this point reaches the client before the answer.
        let _ = inner.round_trip().await;
    }
    if let Some(probe) = &found.probe {
        let (answer, answered) = tokio::sync::oneshot::channel();
        if probe.send(answer).is_ok() {
            let _ = tokio::time::timeout(inner.config.publish_timeout(), answered).await;
        }
    }
    inner.join_shared(found, tx.clone())
}

/// A NATS subscription to `subject`, registered on the server before this returns.
async fn nats_subscribe(
    inner: &Inner,
    subject: &str,
    group: Option<&str>,
) -> Result<async_nats::Subscriber> {
    let result = match group {
        Some(group) => {
            inner
                .client
                .queue_subscribe(subject.to_string(), group.to_string())
                .await
        }
        None => inner.client.subscribe(subject.to_string()).await,
    };
    let subscriber = result.map_err(|e| {
        inner.failed(
            Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: cannot subscribe to {subject:?}", inner.name),
            )
            .with_source(e),
        )
    })?;
    // A round trip makes the server register the SUB before we return, so messages published
    // afterwards (from any connection) reach it. Bounded: a dead server must not hang here.
    if inner.is_connected() {
        let _ = inner.round_trip().await;
    }
    Ok(subscriber)
}

/// What starts the pump of `subscriber` once the bus has given it an id and its members.
fn pump_starter<'a>(
    inner: &'a Arc<Inner>,
    subscriber: async_nats::Subscriber,
    topics: SubjectTopics,
    via: Arc<dyn Bus>,
) -> StartPump<'a> {
    Box::new(move |id, members| {
        let (probe, probes) = tokio::sync::mpsc::unbounded_channel();
        let taken = Taken::new(subscriber, inner.client_drops.clone());
        let decoder = Decoder {
            topics,
            via,
            bus_counters: inner.counters.clone(),
        };
        let end = PumpEnd {
            bus: Arc::downgrade(inner),
            id,
            members: members.clone(),
        };
        let task = tokio::spawn(pump(taken, probes, members, decoder, end));
        (task.abort_handle(), Some(probe))
    })
}

/// An async-nats subscriber whose every message taken out is counted (see `drops`), also
/// those still in its channel when the subscription goes away (they are not a slow
/// consumer's loss).
struct Taken {
    subscriber: async_nats::Subscriber,
    drops: Arc<ClientDrops>,
    /// Taken but not yet added to `drops`: counted once per batch instead of one atomic
    /// increment per message, and always before a probe is answered.
    untold: u64,
}

impl Taken {
    fn new(subscriber: async_nats::Subscriber, drops: Arc<ClientDrops>) -> Taken {
        Taken {
            subscriber,
            drops,
            untold: 0,
        }
    }

    fn tell(&mut self) {
        if self.untold > 0 {
            self.drops.took_many(std::mem::take(&mut self.untold));
        }
    }

    /// Takes the messages the client has ready, up to `limit`, into `out`, waiting only
    /// while it has none; `false` once the client closed and nothing was taken. While there
    /// is nothing to take or hand on, answers `probes`: "my async-nats channel is empty". A
    /// subscriber that is pending only because the task used up its Tokio budget leaves the
    /// probe receiver pending too (it is budgeted the same way), so a probe is never
    /// answered while messages wait.
    fn poll_batch(
        &mut self,
        probes: &mut UnboundedReceiver<Probe>,
        cx: &mut std::task::Context<'_>,
        out: &mut Vec<async_nats::Message>,
        limit: usize,
    ) -> Poll<bool> {
        loop {
            match self.subscriber.poll_next_unpin(cx) {
                Poll::Ready(Some(msg)) => {
                    self.untold += 1;
                    out.push(msg);
                    if out.len() >= limit {
                        return Poll::Ready(true);
                    }
                }
                Poll::Ready(None) => {
                    self.tell();
                    return Poll::Ready(!out.is_empty());
                }
                Poll::Pending => {
                    self.tell();
                    if !out.is_empty() {
                        return Poll::Ready(true);
                    }
                    while let Poll::Ready(Some(probe)) = probes.poll_recv(cx) {
                        let _ = probe.send(());
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        while let Some(Some(_)) = self.subscriber.next().now_or_never() {
            self.untold += 1;
        }
        self.tell();
    }
}

/// Runs when a pump ends on its own (the client closed): the bus forgets it and its members'
/// subscriptions end once drained.
struct PumpEnd {
    bus: Weak<Inner>,
    id: u64,
    members: Arc<Members>,
}

impl PumpEnd {
    fn run(self) {
        if let Some(bus) = self.bus.upgrade() {
            bus.retire(self.id);
        }
        self.members.close_all();
    }
}

/// Messages a pump takes from its async-nats subscriber and hands on at once: one lock of
/// each member's queue and at most one wake-up of its consumer per batch, instead of per
/// message.
const BATCH: usize = 64;

/// Moves messages from the async-nats subscriber into its members' queues, a batch (what
/// the client has ready) at a time. Under a dropping policy it never waits, so async-nats's
/// own channel stays near empty; under `block` (one member, alone on its NATS subscription)
/// it waits, and what async-nats then drops for the full channel is counted (see `drops`).
/// While it has nothing in hand it answers probes: "my async-nats channel is empty".
async fn pump(
    mut taken: Taken,
    mut probes: UnboundedReceiver<Probe>,
    members: Arc<Members>,
    mut decoder: Decoder,
    end: PumpEnd,
) {
    let mut txs: Vec<QueueSender> = Vec::new();
    let mut seen = u64::MAX;
    let mut received = Vec::with_capacity(BATCH);
    let mut messages = Vec::with_capacity(BATCH);
    while poll_fn(|cx| taken.poll_batch(&mut probes, cx, &mut received, BATCH)).await {
        members.refresh(&mut seen, &mut txs);
        messages.extend(
            received
                .drain(..)
                .filter_map(|msg| decoder.message(msg, &txs)),
        );
        match txs.as_slice() {
            [tx] => {
                // Only a full `block` queue waits. A subscription that went away is taken
                // out of the members by its guard, which stops the pump after the last one.
                tx.send_many(messages.drain(..).map(|m| decoder.delivery(m)))
                    .await;
            }
            txs => {
                // Shared members never block: each takes or drops its copy of the pointers.
                for tx in txs {
                    tx.try_send_many(&mut messages.iter().map(|m| decoder.delivery(m.clone())));
                }
                messages.clear();
            }
        }
    }
    end.run();
}

/// Native NATS request: a multiplexed inbox on the bus's one connection.
pub(crate) async fn request(
    inner: &Inner,
    mut message: Message,
    timeout: Duration,
) -> Result<Message> {
    if message.headers.correlation_id.is_none() {
        message.headers.correlation_id = Some(new_message_id());
    }
    let topic = message.topic.clone();
    let map = match inner.config.framing {
        Framing::Busway => headers::encode(&topic, &message.headers)?,
        Framing::Raw => None,
    };
    let mut request = async_nats::client::Request::new()
        .payload(message.payload)
        .timeout(Some(timeout));
    if let Some(map) = map {
        request = request.headers(map);
    }
    let subject = async_nats::Subject::from(topic.as_str());
    // The client's own timeout covers the reply; ours also covers a full command buffer.
    let reply = tokio::time::timeout(
        timeout + Duration::from_millis(50),
        inner.client.send_request(subject, request),
    )
    .await;
    let reply = match reply {
        Ok(Ok(reply)) => {
            inner.client_drops.took();
            reply
        }
        Ok(Err(e)) => {
            if e.kind() == RequestErrorKind::NoResponders {
                // The "no responders" status is a message too.
                inner.client_drops.took();
            }
            let (kind, why) = match e.kind() {
                RequestErrorKind::NoResponders => (
                    ErrorKind::NoResponders,
                    "no responders: nobody is subscribed to it".to_string(),
                ),
                RequestErrorKind::TimedOut => {
                    (ErrorKind::Timeout, format!("no reply within {timeout:?}"))
                }
                RequestErrorKind::MaxPayloadExceeded => (ErrorKind::PayloadTooLarge, e.to_string()),
                _ if !inner.is_connected() => (
                    ErrorKind::Connection,
                    format!("not connected to NATS at {}", inner.url),
                ),
                _ => (ErrorKind::Other, e.to_string()),
            };
            return Err(inner.failed(Error::new(
                kind,
                format!(
                    "request on {:?} (bus {:?}): {why}",
                    topic.as_str(),
                    inner.name
                ),
            )));
        }
        Err(_) => {
            return Err(inner.failed(Error::new(
                ErrorKind::Timeout,
                format!(
                    "request on {:?} (bus {:?}): no reply within {timeout:?}",
                    topic.as_str(),
                    inner.name
                ),
            )))
        }
    };
    to_message(
        reply.subject.as_str(),
        reply.payload,
        reply.headers.as_ref(),
        None,
    )
    .map_err(|e| {
        Counters::incr(&inner.counters.decode_errors);
        e.context(format!(
            "request on {:?} (bus {:?}): undecodable reply",
            topic.as_str(),
            inner.name
        ))
    })
}
