//! Counting what async-nats drops for a slow consumer, exactly.
//!
//! async-nats hands each message to its subscription's bounded channel with `try_send`; when
//! the channel is full the message is dropped and a `SlowConsumer` event is sent through a
//! 128-deep event channel that itself discards when full. The events are therefore only a
//! lower bound. The exact figure comes from the client's own statistics: every message read
//! from the socket is counted in `Statistics::in_messages` before it is handed on, and busway
//! counts every message it takes out of the client (pumped out of a core subscriber, or a
//! reply to a request or flush). Whenever every core pump has found its async-nats channel
//! empty and nothing arrived meanwhile, `in_messages - taken` is exactly what the client
//! discarded. That settled figure is recomputed on `flush` and every [`SETTLE_EVERY`] while
//! messages arrive; `stats()` reports the larger of it and the event count.
//!
//! Only in broadcast mode: in stream mode JetStream's own consumers take messages out of the
//! client where busway cannot count them, so the events remain the (lower-bound) source; a
//! message the client drops there is redelivered by JetStream anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// How often a broadcast bus settles its count while messages arrive.
pub(crate) const SETTLE_EVERY: Duration = Duration::from_millis(200);

/// How long a settle waits for the pumps to answer (a pump blocked on a full `block` queue
/// cannot, and its async-nats channel is not empty anyway).
const PROBE_WAIT: Duration = Duration::from_millis(50);

/// A probe sent to a core pump: answered once its async-nats channel was seen empty.
pub(crate) type Probe = oneshot::Sender<()>;

/// The sending side of a core pump's probe channel.
pub(crate) type ProbeSender = mpsc::UnboundedSender<Probe>;

/// The client-side drop ledger of one bus.
#[derive(Debug, Default)]
pub(crate) struct ClientDrops {
    /// `SlowConsumer` events received (a lower bound).
    events: AtomicU64,
    /// Messages busway took out of the client: pumped from core subscribers, request and
    /// flush replies.
    taken: AtomicU64,
    /// The exact count at the last settled moment (monotonic).
    settled: AtomicU64,
    /// `in_messages` at the last settle attempt that succeeded: nothing new, nothing to do.
    settled_in: AtomicU64,
}

impl ClientDrops {
    pub(crate) fn slow_consumer_event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// One message taken out of the client.
    pub(crate) fn took(&self) {
        self.taken.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` messages taken out of the client.
    pub(crate) fn took_many(&self, n: u64) {
        self.taken.fetch_add(n, Ordering::Relaxed);
    }

    /// The client's drops as known now: exact at the last settled moment, never below the
    /// events seen.
    pub(crate) fn count(&self) -> u64 {
        self.settled
            .load(Ordering::Relaxed)
            .max(self.events.load(Ordering::Relaxed))
    }

    /// Whether anything arrived since the last settled moment.
    pub(crate) fn unsettled(&self, in_messages: u64) -> bool {
        self.settled_in.load(Ordering::Relaxed) != in_messages
    }

    /// Tries to settle the count: probes every core pump (each answers once its async-nats
    /// channel is empty), twice with a pause between, and accepts `in_messages - taken` only
    /// if nothing arrived and nothing was taken in the meantime. The pause lets a message the
    /// connection task had counted but not yet handed on at the first look reach its channel,
    /// where the second probe finds it (and the attempt fails, to be retried later).
    ///
    /// Returns the newly settled drops (0 when it did not settle or nothing new was lost).
    pub(crate) async fn settle(
        &self,
        stats: &async_nats::Statistics,
        pumps: &[ProbeSender],
    ) -> u64 {
        let in_messages = || stats.in_messages.load(Ordering::Relaxed);
        let first_in = in_messages();
        if !probe_all(pumps).await {
            return 0;
        }
        let first_taken = self.taken.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(2)).await;
        if !probe_all(pumps).await {
            return 0;
        }
        let taken = self.taken.load(Ordering::Relaxed);
        let last_in = in_messages();
        if last_in != first_in || taken != first_taken {
            return 0;
        }
        self.settled_in.store(last_in, Ordering::Relaxed);
        let dropped = last_in.saturating_sub(taken);
        let before = self.settled.fetch_max(dropped, Ordering::Relaxed);
        dropped.saturating_sub(before)
    }
}

/// Whether every pump answered a probe in time.
async fn probe_all(pumps: &[ProbeSender]) -> bool {
    let mut answers = Vec::with_capacity(pumps.len());
    for pump in pumps {
        let (tx, rx) = oneshot::channel();
        // A pump that ended has nothing left in its channel.
        if pump.send(tx).is_ok() {
            answers.push(rx);
        }
    }
    let all = futures::future::join_all(answers);
    // An `Err` answer is a pump that ended meanwhile: its channel is gone, nothing waits.
    tokio::time::timeout(PROBE_WAIT, all).await.is_ok()
}
