//! Deliveries: a message plus ack / nack / reply, and the [`Acker`] transports implement.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

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

/// How a transport builds a [`Delivery`]; engine code only reads deliveries.
pub trait TransportDelivery: Sized {
    /// A delivery with nothing to acknowledge (broadcast mode), first attempt.
    fn new(message: Message) -> Self;
    /// A delivery of a message shared with other deliveries (fan-out), first attempt.
    fn shared(message: Arc<Message>) -> Self;
    /// Attaches the handle that acks / nacks this delivery with its broker.
    fn with_acker(self, acker: Box<dyn Acker>) -> Self;
    /// Sets which delivery attempt this is (1 for the first).
    fn with_attempt(self, attempt: u32) -> Self;
    /// Sets the bus that [`Delivery::reply`] publishes on (the bus the delivery came from).
    fn with_reply_via(self, bus: Arc<dyn Bus>) -> Self;
    /// As [`with_reply_via`](Self::with_reply_via), only when the message is a request (has
    /// `reply_to`): nothing else can be answered, and a transport's deliveries would
    /// otherwise all touch the bus handle's one shared reference count.
    fn with_reply_via_if_request(self, bus: &Arc<dyn Bus>) -> Self;
}

impl TransportDelivery for Delivery {
    fn new(message: Message) -> Delivery {
        Delivery::shared(Arc::new(message))
    }

    fn shared(message: Arc<Message>) -> Delivery {
        Delivery {
            message,
            attempt: 1,
            acker: None,
            reply_via: None,
        }
    }

    fn with_acker(mut self, acker: Box<dyn Acker>) -> Self {
        self.acker = Some(acker);
        self
    }

    fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    fn with_reply_via(mut self, bus: Arc<dyn Bus>) -> Self {
        self.reply_via = Some(bus);
        self
    }

    fn with_reply_via_if_request(self, bus: &Arc<dyn Bus>) -> Self {
        if self.message.headers.reply_to.is_some() {
            self.with_reply_via(bus.clone())
        } else {
            self
        }
    }
}

impl Delivery {
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
