//! Counters kept per bus and per subscription, and the snapshots read from them.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};

/// Whether a bus can currently reach its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Connected (or in-process) and working.
    Up,
    /// Not connected yet, or reconnecting after a failure.
    Connecting,
    /// Closed by `close()`.
    Closed,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Connecting => "connecting",
            Health::Closed => "closed",
        })
    }
}

/// Live counters, updated with relaxed atomics on the hot path. Transports own one per bus
/// and one per subscription; readers take a [`StatsSnapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages accepted by `publish`.
    pub published: AtomicU64,
    /// Messages handed to a subscriber.
    pub delivered: AtomicU64,
    /// Messages dropped by an overflow policy (or by the client library for a slow consumer).
    pub dropped: AtomicU64,
    /// Messages delivered again (nack, ack timeout, reclaimed from a dead consumer).
    pub redelivered: AtomicU64,
    /// Operations that failed (publish, ack, broker errors).
    pub errors: AtomicU64,
    /// Incoming bytes that did not decode and were skipped.
    pub decode_errors: AtomicU64,
    /// Foreign payloads (not a busway frame) delivered as header-less messages.
    pub unframed: AtomicU64,
    /// Deliveries acked (stream mode): counted by the transport's acker once the ack is
    /// taken.
    pub acked: AtomicU64,
    /// Deliveries nacked (stream mode).
    pub nacked: AtomicU64,
    /// Connections to the broker currently open.
    pub connections: AtomicI64,
    /// Times a connection was re-established after a failure.
    pub reconnects: AtomicU64,
    /// Entries moved to a dead-letter topic after too many deliveries.
    pub dead_lettered: AtomicU64,
    /// Copies of an already delivered message dropped by a subscription's de-duplication
    /// window (a router subscription listening on several buses of a mirror).
    pub duplicates: AtomicU64,
    /// Message ids pushed out of a full de-duplication window: a copy arriving later than
    /// that many newer ids would be delivered again.
    pub dedup_evictions: AtomicU64,
    health: AtomicU8,
}

impl Counters {
    /// Adds one to a counter.
    #[inline]
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Sets the health.
    pub fn set_health(&self, health: Health) {
        self.health.store(health as u8, Relaxed);
    }

    /// The current health.
    pub fn health(&self) -> Health {
        match self.health.load(Relaxed) {
            0 => Health::Up,
            1 => Health::Connecting,
            _ => Health::Closed,
        }
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            published: self.published.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            redelivered: self.redelivered.load(Relaxed),
            errors: self.errors.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            unframed: self.unframed.load(Relaxed),
            acked: self.acked.load(Relaxed),
            nacked: self.nacked.load(Relaxed),
            connections: self.connections.load(Relaxed).max(0) as u64,
            reconnects: self.reconnects.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            dedup_evictions: self.dedup_evictions.load(Relaxed),
            health: self.health(),
        }
    }
}

/// A copy of a bus's or a subscription's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Messages accepted by `publish`.
    pub published: u64,
    /// Messages handed to a subscriber.
    pub delivered: u64,
    /// Messages dropped by an overflow policy or by the client for a slow consumer.
    pub dropped: u64,
    /// Messages delivered again.
    pub redelivered: u64,
    /// Failed operations.
    pub errors: u64,
    /// Incoming bytes that did not decode and were skipped.
    pub decode_errors: u64,
    /// Foreign payloads that were not busway frames, delivered as header-less messages
    /// (a Redis broadcast bus with `unframed = "deliver"`).
    pub unframed: u64,
    /// Deliveries acked (stream mode).
    pub acked: u64,
    /// Deliveries nacked (stream mode).
    pub nacked: u64,
    /// Connections to the broker currently open.
    pub connections: u64,
    /// Reconnections after failures.
    pub reconnects: u64,
    /// Entries moved to a dead-letter topic.
    pub dead_lettered: u64,
    /// Duplicate copies dropped by a de-duplication window.
    pub duplicates: u64,
    /// Ids pushed out of a full de-duplication window.
    pub dedup_evictions: u64,
    /// Health at the time of the snapshot.
    pub health: Health,
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        Counters::default().snapshot()
    }
}

impl StatsSnapshot {
    /// Adds another snapshot's counters to this one (health keeps the worse of the two).
    pub fn merge(&mut self, other: &StatsSnapshot) {
        self.published += other.published;
        self.delivered += other.delivered;
        self.dropped += other.dropped;
        self.redelivered += other.redelivered;
        self.errors += other.errors;
        self.decode_errors += other.decode_errors;
        self.unframed += other.unframed;
        self.acked += other.acked;
        self.nacked += other.nacked;
        self.connections += other.connections;
        self.reconnects += other.reconnects;
        self.dead_lettered += other.dead_lettered;
        self.duplicates += other.duplicates;
        self.dedup_evictions += other.dedup_evictions;
        if other.health != Health::Up {
            self.health = other.health;
        }
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "health={} published={} delivered={} dropped={} redelivered={} errors={} decode_errors={} unframed={} acked={} nacked={} connections={} reconnects={} dead_lettered={} duplicates={} dedup_evictions={}",
            self.health,
            self.published,
            self.delivered,
            self.dropped,
            self.redelivered,
            self.errors,
            self.decode_errors,
            self.unframed,
            self.acked,
            self.nacked,
            self.connections,
            self.reconnects,
            self.dead_lettered,
            self.duplicates,
            self.dedup_evictions
        )
    }
}

/// How far one consumer group of a stream-mode bus is behind, as the broker reports it
/// ([`Bus::consumer_lag`](crate::Bus::consumer_lag)).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GroupLag {
    /// The group's name.
    pub group: String,
    /// Entries stored and not yet delivered to the group; `None` when the broker cannot
    /// tell (Redis, after entries were deleted from the middle of a stream).
    pub lag: Option<u64>,
    /// Entries delivered to the group and not yet acked.
    pub pending: u64,
}

impl GroupLag {
    /// The lag of `group`.
    pub fn new(group: impl Into<String>, lag: Option<u64>, pending: u64) -> GroupLag {
        GroupLag {
            group: group.into(),
            lag,
            pending,
        }
    }
}
