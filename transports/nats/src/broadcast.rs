//! Broadcast mode on core NATS: subscriptions (with queue groups, or sharing one NATS
//! subscription) and native request/reply.

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use busway::transport::{new_message_id, Counters, QueueSender, TransportSubscription};
use busway::{
    Bus, Error, ErrorKind, Message, Overflow, Pattern, Result, SubscribeOptions, Subscription,
};

use crate::names::SubjectTopics;
use crate::pump::{pump_starter, Bounds};
use crate::state::{Inner, SharedPump, SubGuard};
use crate::wire;

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
        let bounds = (overflow == Overflow::Block).then(|| Bounds {
            pattern: key.clone(),
            bytes: inner.options.max_pending_bytes(),
            messages: inner.options.client_capacity(capacity),
        });
        let start = pump_starter(inner, subscriber, topics, via, bounds);
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
        let start = pump_starter(inner, subscriber, topics.clone(), via.clone(), None);
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
            let _ = tokio::time::timeout(inner.options.publish_timeout(), answered).await;
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
    let map = wire::encode_framed(inner.options.framing, &topic, &message.headers)?;
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
    wire::to_message(
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
