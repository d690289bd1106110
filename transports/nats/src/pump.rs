//! The core pumps: each moves one async-nats subscriber's messages into the busway queues of
//! its members, and the settling of what the client dropped on the way (see `drops`).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;

use busway::transport::{Counters, QueueSender, TransportDelivery, TrySend};
use busway::{Bus, Delivery, Message, Mode};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::drops::{ClientDrops, Probe, SETTLE_EVERY};
use crate::held::{self, DropWarning, Queued};
use crate::names::SubjectTopics;
use crate::state::{Inner, Members, StartPump};
use crate::wire::reply_headers;

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

/// The bounds of a `block` subscription's pump: what it may hold besides its queue.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    /// The pattern, to name the subscription in logs.
    pub(crate) pattern: String,
    /// Bytes in the queue and taken from the client but not yet queued (`max_pending_bytes`).
    pub(crate) bytes: usize,
    /// Messages taken from the client but not yet queued (`client_capacity`).
    pub(crate) messages: usize,
}

/// What starts the pump of `subscriber` once the bus has given it an id and its members.
/// With `bounds` (a `block` subscription, its pump's only member) the pump keeps taking
/// from the client while the queue is full and drops what exceeds them.
pub(crate) fn pump_starter<'a>(
    inner: &'a Arc<Inner>,
    subscriber: async_nats::Subscriber,
    topics: SubjectTopics,
    via: Arc<dyn Bus>,
    bounds: Option<Bounds>,
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
        let task = match bounds {
            Some(bounds) => tokio::spawn(pump_block(
                taken,
                probes,
                members,
                decoder,
                end,
                inner.name.clone(),
                bounds,
            )),
            None => tokio::spawn(pump(taken, probes, members, decoder, end)),
        };
        (task.abort_handle(), Some(probe))
    })
}

/// An async-nats subscriber whose every message taken out is counted (see `drops`), also
/// those still in its channel when the subscription goes away (they are not a slow
/// consumer's loss).
struct Taken {
    subscriber: async_nats::Subscriber,
    drops: Arc<ClientDrops>,
    /// Taken but not yet added to `drops`: added once per batch (one atomic add), always
    /// before a probe is answered.
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
/// each member's queue and at most one wake-up of its consumer per batch.
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

/// The pump of a `block` subscription. It never leaves messages in async-nats's channel,
/// which is bounded by count only: while the queue is full it keeps taking from the client
/// into a backlog of its own and waits for room for the oldest; what would take the queue
/// and backlog past `bounds` is dropped here, counted in `dropped` and logged.
async fn pump_block(
    mut taken: Taken,
    mut probes: UnboundedReceiver<Probe>,
    members: Arc<Members>,
    mut decoder: Decoder,
    end: PumpEnd,
    bus: String,
    bounds: Bounds,
) {
    let mut txs: Vec<QueueSender> = Vec::new();
    let mut seen = u64::MAX;
    members.refresh(&mut seen, &mut txs);
    let Some(tx) = txs.pop() else {
        end.run();
        return;
    };
    let mut queued = Queued::new(tx.stats().clone());
    let mut backlog: VecDeque<(Arc<Message>, usize)> = VecDeque::new();
    let mut backlog_bytes = 0usize;
    let mut received = Vec::with_capacity(BATCH);
    let mut warning = DropWarning::default();
    loop {
        if !backlog.is_empty() {
            // Everything that fits, under one lock of the queue.
            let mut offered = 0usize;
            let outcome = tx.try_send_many(&mut backlog.iter().map(|(m, _)| {
                offered += 1;
                decoder.delivery(m.clone())
            }));
            let queued_now = match outcome {
                TrySend::Full(_) => offered - 1,
                TrySend::Closed(_) => break,
                TrySend::Queued | TrySend::Dropped => offered,
            };
            for (_, size) in backlog.drain(..queued_now) {
                backlog_bytes -= size;
                queued.pushed(size);
            }
        }
        let more = match backlog.front() {
            None => poll_fn(|cx| taken.poll_batch(&mut probes, cx, &mut received, BATCH)).await,
            Some((oldest, size)) => {
                let size = *size;
                let send = tx.send(decoder.delivery(oldest.clone()));
                let next = poll_fn(|cx| taken.poll_batch(&mut probes, cx, &mut received, BATCH));
                tokio::select! {
                    biased;
                    sent = send => {
                        if !sent {
                            break;
                        }
                        backlog.pop_front();
                        backlog_bytes -= size;
                        queued.pushed(size);
                        continue;
                    }
                    // The send is dropped unfinished: the oldest was not queued, and is
                    // offered again first.
                    more = next => more,
                }
            }
        };
        if !more {
            break;
        }
        for msg in received.drain(..) {
            let size = held::size(msg.length);
            let Some(message) = decoder.message(msg, std::slice::from_ref(&tx)) else {
                continue;
            };
            if backlog.len() >= bounds.messages
                || queued.bytes() + backlog_bytes + size > bounds.bytes
            {
                Counters::incr(&tx.stats().dropped);
                Counters::incr(&decoder.bus_counters.dropped);
                warning.dropped(&bus, &bounds.pattern, bounds.bytes);
                continue;
            }
            backlog_bytes += size;
            backlog.push_back((message, size));
        }
    }
    end.run();
}

/// Settles the count of client-side drops (broadcast mode; see `drops`), attributing new
/// drops to the subscription when there is only one core subscription.
pub(crate) async fn settle_client_drops(inner: &Inner) {
    if inner.mode != Mode::Broadcast {
        return;
    }
    let stats = inner.client.statistics();
    if !inner
        .client_drops
        .unsettled(stats.in_messages.load(Ordering::Relaxed))
    {
        return;
    }
    let (probes, only) = inner.core_probes();
    if probes.is_empty() {
        // No core subscription: the client holds nothing it could drop for a slow consumer
        // (replies are taken by their requests), so there is nothing to settle.
        return;
    }
    let new = inner.client_drops.settle(&stats, &probes).await;
    if let Some(tx) = only {
        tx.stats().dropped.fetch_add(new, Ordering::Relaxed);
    }
}

/// Settles the client-side drop count while messages arrive, so `stats()` is exact shortly
/// after traffic pauses even if nobody calls `flush`. Ends with the bus.
pub(crate) async fn settle_loop(bus: Weak<Inner>) {
    let mut tick = tokio::time::interval(SETTLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = bus.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        settle_client_drops(&inner).await;
    }
}
