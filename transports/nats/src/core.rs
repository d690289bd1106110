//! Broadcast mode on core NATS: subscriptions (with queue groups), the pump that moves each
//! async-nats subscriber into busway's queue, and native request/reply.

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use busway::queue::{QueueSender, TrySend};
use busway::{
    new_message_id, Bus, Counters, Delivery, Error, ErrorKind, Message, Pattern, Result,
    SubscribeOptions, Subscription, Topic,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::bus::Inner;
use crate::config::Framing;
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

fn with_topic(
    topic: Topic,
    payload: bytes::Bytes,
    map: Option<&async_nats::HeaderMap>,
    reply: Option<&str>,
) -> Result<Message> {
    let mut h = headers::decode(map)?;
    if h.reply_to.is_none() {
        if let Some(reply) = reply {
            h.reply_to = Some(Topic::new(reply)?);
        }
    }
    Ok(Message {
        topic,
        payload,
        headers: h,
    })
}

/// Turns one subscription's NATS messages into deliveries. Subjects repeat (an exact
/// subscription sees one; a wildcard one often the same few), so the last topic is kept and
/// a matching subject reuses it instead of being parsed and allocated again.
struct Decoder {
    last: Topic,
    via: Arc<dyn Bus>,
    drops: Arc<ClientDrops>,
    bus_counters: Arc<Counters>,
    sub_stats: Arc<Counters>,
}

impl Decoder {
    /// The delivery for `msg`, or `None` (counted) when it does not decode.
    fn delivery(&mut self, msg: async_nats::Message) -> Option<Delivery> {
        self.drops.took();
        let subject = msg.subject.as_str();
        let topic = if subject == self.last.as_str() {
            Ok(self.last.clone())
        } else {
            Topic::new(subject).inspect(|t| self.last = t.clone())
        };
        let decoded = topic.and_then(|topic| {
            with_topic(
                topic,
                msg.payload,
                msg.headers.as_ref(),
                msg.reply.as_deref(),
            )
        });
        match decoded {
            Ok(message) => {
                // Only a request can be answered: the bus handle rides along only then.
                let answerable = message.headers.reply_to.is_some();
                let delivery = Delivery::new(message);
                Some(if answerable {
                    delivery.with_reply_via(self.via.clone())
                } else {
                    delivery
                })
            }
            Err(e) => {
                Counters::incr(&self.bus_counters.decode_errors);
                Counters::incr(&self.sub_stats.decode_errors);
                tracing::debug!(subject = %msg.subject, error = %e, "skipped an undecodable NATS message");
                None
            }
        }
    }
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    pattern: Pattern,
    options: SubscribeOptions,
    via: Arc<dyn Bus>,
) -> Result<Subscription> {
    let subject = pattern.as_str().to_string();
    let result = match &options.group {
        Some(group) => inner.client.queue_subscribe(subject, group.clone()).await,
        None => inner.client.subscribe(subject).await,
    };
    let subscriber = result.map_err(|e| {
        inner.failed(
            Error::new(
                ErrorKind::Connection,
                format!(
                    "bus {:?}: cannot subscribe to {:?}",
                    inner.name,
                    pattern.as_str()
                ),
            )
            .with_source(e),
        )
    })?;
    // A round trip makes the server register the SUB before we return, so messages published
    // afterwards (from any connection) reach it. Bounded: a dead server must not hang here.
    if inner.is_connected() {
        let _ = inner.round_trip().await;
    }
    let (capacity, overflow) = options.queue(inner.queue);
    let (probe, probes) = tokio::sync::mpsc::unbounded_channel();
    let taken = Taken {
        subscriber,
        drops: inner.client_drops.clone(),
    };
    // Any valid topic will do until the first message: a subject never equals it by chance
    // in a way that matters (equal strings are the same topic).
    let last = pattern
        .as_topic()
        .unwrap_or_else(|| Topic::new("_").expect("\"_\" is a valid topic"));
    let (tx, sub) = Subscription::channel(pattern, capacity, overflow, inner.counters.clone());
    let decoder = Decoder {
        last,
        via,
        drops: inner.client_drops.clone(),
        bus_counters: inner.counters.clone(),
        sub_stats: tx.stats().clone(),
    };
    let task = tokio::spawn(pump(taken, probes, tx.clone(), decoder));
    let guard = inner.track(tx, task.abort_handle(), Some(probe));
    Ok(sub.with_guard(guard))
}

/// An async-nats subscriber whose every message taken out is counted (see `drops`), also
/// those still in its channel when the subscription goes away (they are not a slow
/// consumer's loss).
struct Taken {
    subscriber: async_nats::Subscriber,
    drops: Arc<ClientDrops>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        while let Some(Some(_)) = self.subscriber.next().now_or_never() {
            self.drops.took();
        }
    }
}

/// Moves messages from the async-nats subscriber into busway's queue. Under a dropping policy
/// it never waits, so async-nats's own channel stays near empty; under `block` it waits, and
/// what async-nats then drops for the full channel is counted (see `drops`). Between
/// messages it answers probes: "my async-nats channel is empty".
async fn pump(
    mut taken: Taken,
    mut probes: UnboundedReceiver<Probe>,
    tx: QueueSender,
    mut decoder: Decoder,
) {
    loop {
        let next = tokio::select! {
            biased;
            next = taken.subscriber.next() => next,
            Some(probe) = probes.recv() => {
                // `biased`: the subscriber was polled just before and had nothing.
                let _ = probe.send(());
                continue;
            }
        };
        let Some(msg) = next else { break };
        let Some(delivery) = decoder.delivery(msg) else {
            continue;
        };
        match tx.try_send(delivery) {
            TrySend::Closed(_) => break,
            // Only a full `block` queue waits (and only then pays for a wake-up registration).
            TrySend::Full(d) => {
                let queued = tx.send(d).await;
                if !queued {
                    break;
                }
            }
            _ => {}
        }
    }
    // The client closed (or the subscription went away): end the subscription.
    tx.close();
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
        Framing::Headers => headers::encode(&topic, &message.headers)?,
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
