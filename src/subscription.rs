//! Subscriptions (a `Stream` of deliveries) and deliveries (a message plus ack / nack / reply).

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::options::Overflow;
use crate::queue::{queue, QueueReceiver, QueueSender};
use crate::stats::{Counters, StatsSnapshot};
use crate::topic::Pattern;

/// Settles one stream-mode delivery with its broker. Transports implement it; users call
/// [`Delivery::ack`] / [`Delivery::nack`].
#[async_trait]
pub trait Acker: Send + Sync + fmt::Debug + 'static {
    /// Marks the delivery processed; it is not delivered again.
    async fn ack(&self) -> Result<()>;
    /// Asks for redelivery, after `delay` when given.
    async fn nack(&self, delay: Option<Duration>) -> Result<()>;
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

impl Delivery {
    /// A delivery with nothing to acknowledge (broadcast mode), first attempt.
    pub fn new(message: Message) -> Delivery {
        Delivery::shared(Arc::new(message))
    }

    /// A delivery of a message shared with other deliveries (fan-out), first attempt.
    pub fn shared(message: Arc<Message>) -> Delivery {
        Delivery {
            message,
            attempt: 1,
            acker: None,
            reply_via: None,
        }
    }

    /// Attaches the handle that acks / nacks this delivery with its broker.
    pub fn with_acker(mut self, acker: Box<dyn Acker>) -> Self {
        self.acker = Some(acker);
        self
    }

    /// Sets which delivery attempt this is (1 for the first).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Sets the bus that [`Delivery::reply`] publishes on (the bus the delivery came from).
    pub fn with_reply_via(mut self, bus: Arc<dyn Bus>) -> Self {
        self.reply_via = Some(bus);
        self
    }

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

enum Source {
    Queue(QueueReceiver),
    Stream(Pin<Box<dyn Stream<Item = Delivery> + Send>>),
    /// Several subscriptions polled in turn; an ended one is `None`.
    Merged {
        subs: Vec<Option<Subscription>>,
        next: usize,
    },
}

type Filter = Box<dyn FnMut(&Delivery) -> bool + Send>;

/// A live subscription: a [`Stream`] of [`Delivery`]s.
///
/// Dropping it unsubscribes (transports release broker state through the guard they attach).
/// The stream ends when the bus closes or after [`Subscription::unsubscribe`].
pub struct Subscription {
    source: Source,
    pattern: Pattern,
    stats: Arc<Counters>,
    filter: Option<Filter>,
    guard: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl Subscription {
    /// Makes a subscription fed through a queue of `capacity` with `overflow`. The transport
    /// keeps the returned [`QueueSender`] and pushes deliveries into it. Drops count in the
    /// subscription's stats and in `bus_stats`.
    pub fn channel(
        pattern: Pattern,
        capacity: usize,
        overflow: Overflow,
        bus_stats: Arc<Counters>,
    ) -> (QueueSender, Subscription) {
        let stats = Arc::new(Counters::default());
        let (tx, rx) = queue(capacity, overflow, stats.clone(), bus_stats);
        (
            tx,
            Subscription {
                source: Source::Queue(rx),
                pattern,
                stats,
                filter: None,
                guard: None,
            },
        )
    }

    /// Makes a subscription over any stream of deliveries (the router merges several
    /// subscriptions this way).
    pub fn from_stream(
        pattern: Pattern,
        stream: impl Stream<Item = Delivery> + Send + 'static,
        stats: Arc<Counters>,
    ) -> Subscription {
        Subscription {
            source: Source::Stream(Box::pin(stream)),
            pattern,
            stats,
            filter: None,
            guard: None,
        }
    }

    /// Merges several subscriptions into one that yields from each in turn and ends when
    /// all have ended (the router merges its per-bus subscriptions this way). Its
    /// [`pending`](Subscription::pending) and [`stats`](Subscription::stats) are the sums
    /// of theirs; dropping it drops them all.
    pub fn merge(pattern: Pattern, subs: Vec<Subscription>) -> Subscription {
        Subscription {
            source: Source::Merged {
                subs: subs.into_iter().map(Some).collect(),
                next: 0,
            },
            pattern,
            stats: Arc::new(Counters::default()),
            filter: None,
            guard: None,
        }
    }

    /// Keeps only the deliveries `keep` accepts (the router drops those its table would not
    /// have put on the bus they came from). A rejected delivery leaves this subscription's
    /// `delivered` count; an ackable one is acked on a spawned task (within a Tokio runtime;
    /// otherwise it is redelivered after its ack timeout, and rejected again).
    pub fn with_filter(mut self, keep: impl FnMut(&Delivery) -> bool + Send + 'static) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Attaches a value dropped with the subscription: its `Drop` unsubscribes.
    pub fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// This subscription's counters (delivered, dropped by its overflow policy...); for a
    /// merged subscription, the sum over the merged ones.
    pub fn stats(&self) -> StatsSnapshot {
        match &self.source {
            Source::Merged { subs, .. } => {
                let mut total = StatsSnapshot::default();
                for sub in subs.iter().flatten() {
                    total.merge(&sub.stats());
                }
                total
            }
            _ => self.stats.snapshot(),
        }
    }

    /// The live counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.stats
    }

    /// Messages queued and not yet taken.
    pub fn pending(&self) -> usize {
        match &self.source {
            Source::Queue(rx) => rx.len(),
            Source::Stream(_) => 0,
            Source::Merged { subs, .. } => subs.iter().flatten().map(|s| s.pending()).sum(),
        }
    }

    /// The next delivery, or `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<Delivery> {
        futures::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next delivery within `timeout`: `Ok(None)` when the subscription ended,
    /// a [`ErrorKind::Timeout`] error when nothing came in time.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Delivery>> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no message on {:?} within {timeout:?}",
                        self.pattern.as_str()
                    ),
                )
            })
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            let next = match &mut self.source {
                Source::Queue(rx) => rx.poll_recv(cx),
                Source::Stream(s) => s.as_mut().poll_next(cx),
                Source::Merged { subs, next } => poll_merged(subs, next, cx),
            };
            let Poll::Ready(Some(d)) = next else {
                return next;
            };
            let keep = match &mut self.filter {
                Some(keep) => keep(&d),
                None => true,
            };
            if keep {
                return Poll::Ready(Some(d));
            }
            self.reject(d);
        }
    }

    fn reject(&self, d: Delivery) {
        let _ = self
            .stats
            .delivered
            .fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
        if d.is_ackable() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = d.ack().await;
                });
            }
        }
    }

    /// Ends the subscription now (the same as dropping it).
    pub fn unsubscribe(self) {}
}

/// Polls the merged subscriptions in turn from `next`, so a busy one cannot starve the rest.
fn poll_merged(
    subs: &mut [Option<Subscription>],
    next: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<Option<Delivery>> {
    let n = subs.len();
    for k in 0..n {
        let i = (*next + k) % n;
        let Some(sub) = &mut subs[i] else { continue };
        match sub.poll_recv(cx) {
            Poll::Ready(Some(d)) => {
                *next = (i + 1) % n;
                return Poll::Ready(Some(d));
            }
            Poll::Ready(None) => subs[i] = None,
            Poll::Pending => {}
        }
    }
    if subs.iter().all(Option::is_none) {
        Poll::Ready(None)
    } else {
        Poll::Pending
    }
}

impl Stream for Subscription {
    type Item = Delivery;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_recv(cx)
    }
}
