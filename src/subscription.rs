//! Subscriptions: a `Stream` of deliveries fed by a transport's queue or stream.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

use crate::delivery::Delivery;
use crate::error::{Error, ErrorKind, Result};
use crate::options::Overflow;
use crate::queue::{queue, QueueReceiver, QueueSender};
use crate::router::Merged;
use crate::stats::{Counters, StatsSnapshot};
use crate::topic::Pattern;

enum Source {
    Queue(QueueReceiver),
    Stream(Pin<Box<dyn Stream<Item = Delivery> + Send>>),
    /// Several subscriptions polled in turn (see [`Merged`]).
    Merged(Box<Merged>),
}

/// A live subscription: a [`Stream`] of [`Delivery`]s.
///
/// Dropping it unsubscribes (transports release broker state through the guard they attach).
/// The stream ends when the bus closes or after [`Subscription::unsubscribe`].
pub struct Subscription {
    source: Source,
    pattern: Pattern,
    stats: Arc<Counters>,
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

/// How a transport makes a [`Subscription`].
pub trait TransportSubscription: Sized {
    /// A subscription fed through a queue of `capacity` with `overflow`. The transport keeps
    /// the returned [`QueueSender`] and pushes deliveries into it. Drops count in the
    /// subscription's stats and in `bus_stats`.
    fn channel(
        pattern: Pattern,
        capacity: usize,
        overflow: Overflow,
        bus_stats: Arc<Counters>,
    ) -> (QueueSender, Self);
    /// A subscription over any stream of deliveries, counting in `stats` (a wrapper that
    /// decorates another subscription passes that one's [`counters`](Self::counters)).
    fn from_stream(
        pattern: Pattern,
        stream: impl Stream<Item = Delivery> + Send + 'static,
        stats: Arc<Counters>,
    ) -> Self;
    /// Attaches a value dropped with the subscription: its `Drop` unsubscribes.
    fn with_guard(self, guard: impl Any + Send + Sync) -> Self;
    /// The live counters.
    fn counters(&self) -> &Arc<Counters>;
}

impl TransportSubscription for Subscription {
    fn channel(
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
                guard: None,
            },
        )
    }

    fn from_stream(
        pattern: Pattern,
        stream: impl Stream<Item = Delivery> + Send + 'static,
        stats: Arc<Counters>,
    ) -> Subscription {
        Subscription {
            source: Source::Stream(Box::pin(stream)),
            pattern,
            stats,
            guard: None,
        }
    }

    fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    fn counters(&self) -> &Arc<Counters> {
        &self.stats
    }
}

impl Subscription {
    /// A subscription over the router's merged per-bus subscriptions.
    pub(crate) fn merged(pattern: Pattern, merged: Merged) -> Subscription {
        Subscription {
            source: Source::Merged(Box::new(merged)),
            pattern,
            stats: Arc::new(Counters::default()),
            guard: None,
        }
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// This subscription's counters (delivered, dropped by its overflow policy...); for a
    /// merged subscription, the sum over the merged ones.
    pub fn stats(&self) -> StatsSnapshot {
        match &self.source {
            Source::Merged(m) => m.stats(&self.stats.snapshot()),
            _ => self.stats.snapshot(),
        }
    }

    /// A weak view of its queue's length (a queue-backed subscription only).
    pub(crate) fn queue_depth(&self) -> Option<crate::queue::QueueDepth> {
        match &self.source {
            Source::Queue(rx) => Some(rx.depth()),
            _ => None,
        }
    }

    /// Messages queued and not yet taken.
    pub fn pending(&self) -> usize {
        match &self.source {
            Source::Queue(rx) => rx.len(),
            Source::Stream(_) => 0,
            Source::Merged(m) => m.pending(),
        }
    }

    /// The next delivery, or `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<Delivery> {
        futures::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A delivery that is already queued, without waiting; `None` when nothing is queued
    /// now (or the subscription ended).
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match self.poll_recv(&mut cx) {
            Poll::Ready(d) => d,
            Poll::Pending => None,
        }
    }

    /// Waits for one delivery, then takes those already queued behind it, up to `limit` in
    /// all, appending them to `buf`. Returns how many were added; 0 means the subscription
    /// ended. Consumers that ack a batch concurrently (`futures::future::join_all`) let a
    /// stream transport settle the batch in one round trip instead of one per delivery.
    pub async fn recv_many(&mut self, buf: &mut Vec<Delivery>, limit: usize) -> usize {
        let Some(first) = self.recv().await else {
            return 0;
        };
        buf.push(first);
        let mut n = 1;
        while n < limit {
            match self.try_recv() {
                Some(d) => {
                    buf.push(d);
                    n += 1;
                }
                None => break,
            }
        }
        n
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

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        match &mut self.source {
            Source::Queue(rx) => rx.poll_recv(cx),
            Source::Stream(s) => s.as_mut().poll_next(cx),
            Source::Merged(m) => m.poll(&self.stats, cx),
        }
    }

    /// Takes back a delivery this subscription handed out and nobody will see: it leaves the
    /// `delivered` count and is acked when ackable.
    pub(crate) fn reject(&self, d: Delivery) {
        let _ = self
            .stats
            .delivered
            .fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
        ack_dropped(d);
    }

    /// Ends the subscription now (the same as dropping it).
    pub fn unsubscribe(self) {}
}

/// Acks a delivery nobody will see (not accepted by a router part, or a duplicate), so a stream bus does not
/// redeliver it forever. Needs a Tokio runtime; without one it is redelivered after its ack
/// timeout and dropped again.
pub(crate) fn ack_dropped(d: Delivery) {
    if d.is_ackable() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = d.ack().await;
            });
        }
    }
}

impl Stream for Subscription {
    type Item = Delivery;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_recv(cx)
    }
}
