//! The bytes a `block` subscription holds in the process, for `max_pending_bytes`.
//!
//! async-nats bounds its per-subscription channel by message count only, and a busway queue
//! by count too: a peer sending large messages to a stalled `block` subscriber could fill
//! both with gigabytes. The pumps count bytes instead, as they hand deliveries on: a `block`
//! queue is first in, first out and drops nothing, so the deliveries a handler has taken are
//! the first `delivered` (the subscription's counter) of those the pump queued.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::transport::Counters;

/// Bookkeeping counted per message beside its payload and headers: the delivery, its
/// `Arc<Message>` and the queue slot are a few hundred bytes, which dominate for small
/// messages.
const PER_MESSAGE: usize = 256;

/// What one message of `len` bytes (payload + encoded headers, as NATS counts it) is
/// counted as.
pub(crate) fn size(len: usize) -> usize {
    len.saturating_add(PER_MESSAGE)
}

/// The bytes of the deliveries a pump queued that no handler has taken yet.
#[derive(Debug)]
pub(crate) struct Queued {
    stats: Arc<Counters>,
    /// The subscription's `delivered` when last looked at.
    taken: u64,
    /// Sizes of the deliveries queued and not taken, oldest first.
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl Queued {
    /// For the queue whose subscription counts its deliveries in `stats`.
    pub(crate) fn new(stats: Arc<Counters>) -> Queued {
        Queued {
            taken: stats.delivered.load(Ordering::Acquire),
            stats,
            sizes: VecDeque::new(),
            bytes: 0,
        }
    }

    /// A delivery of `size` bytes was queued.
    pub(crate) fn pushed(&mut self, size: usize) {
        self.sizes.push_back(size);
        self.bytes += size;
    }

    /// The bytes queued and not yet taken by a handler.
    pub(crate) fn bytes(&mut self) -> usize {
        let delivered = self.stats.delivered.load(Ordering::Acquire);
        while self.taken < delivered {
            let Some(size) = self.sizes.pop_front() else {
                self.taken = delivered;
                break;
            };
            self.bytes -= size;
            self.taken += 1;
        }
        self.bytes
    }
}

/// How often at most a pump logs that it drops for `max_pending_bytes`.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Warns, at most every [`WARN_EVERY`], that a subscription drops messages past its bound.
#[derive(Debug, Default)]
pub(crate) struct DropWarning {
    last: Option<Instant>,
    since: u64,
}

impl DropWarning {
    /// One message dropped on bus `bus` (pattern `pattern`), whose bound is `max` bytes.
    pub(crate) fn dropped(&mut self, bus: &str, pattern: &str, max: usize) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let dropped = std::mem::take(&mut self.since);
        tracing::warn!(
            bus,
            pattern,
            dropped,
            max_pending_bytes = max,
            "a block subscription is not reading: messages past max_pending_bytes are dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_deliveries_free_their_bytes_in_order() {
        let stats = Arc::new(Counters::default());
        let mut q = Queued::new(stats.clone());
        q.pushed(10);
        q.pushed(20);
        q.pushed(30);
        assert_eq!(q.bytes(), 60);
        stats.delivered.fetch_add(2, Ordering::Relaxed);
        assert_eq!(q.bytes(), 30);
        stats.delivered.fetch_add(5, Ordering::Relaxed);
        assert_eq!(q.bytes(), 0);
        q.pushed(7);
        assert_eq!(q.bytes(), 7);
    }
}
