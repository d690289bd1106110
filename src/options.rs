//! Subscription options: group, queue capacity, overflow policy, stream start and ack timeout.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// The queue capacity a subscription gets when neither its options nor its bus set one.
pub const DEFAULT_CAPACITY: usize = 1024;
/// How long a stream-mode delivery may stay unacknowledged before it is delivered again.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a subscription's queue does when it is full.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Wait for room. Nothing is lost in the process, but the producer (for a broker
    /// transport: the connection's reader, shared by the subscriptions on it) waits too.
    #[default]
    Block,
    /// Drop the oldest queued message to make room for the new one.
    DropOldest,
    /// Drop the new message.
    DropNewest,
    /// Keep only the newest queued message per topic (a conflating queue for prices).
    Latest,
}

impl Overflow {
    /// The config spelling: `block`, `drop_oldest`, `drop_newest`, `latest`.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Block => "block",
            Overflow::DropOldest => "drop_oldest",
            Overflow::DropNewest => "drop_newest",
            Overflow::Latest => "latest",
        }
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Overflow {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "block" => Overflow::Block,
            "drop_oldest" => Overflow::DropOldest,
            "drop_newest" => Overflow::DropNewest,
            "latest" => Overflow::Latest,
            _ => {
                return Err(Error::config(format!(
                    "unknown overflow policy {s:?}; expected one of block, drop_oldest, drop_newest, latest"
                )))
            }
        })
    }
}

/// Where a new stream-mode consumer starts reading.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// Only messages published after the subscription (or the group) was created.
    #[default]
    New,
    /// Every message still retained, from the oldest.
    Beginning,
}

/// How a subscription wants its messages. `None` fields take the bus's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Competing consumers: subscribers sharing a group name split the messages.
    /// Without a group every subscriber gets every message.
    pub group: Option<String>,
    /// Queue capacity (messages; distinct topics for [`Overflow::Latest`]).
    pub capacity: Option<usize>,
    /// What to do when the queue is full.
    pub overflow: Option<Overflow>,
    /// Stream mode: where a new consumer (group) starts.
    pub start: StartFrom,
    /// Stream mode: how long a delivery may stay unacknowledged before redelivery.
    pub ack_timeout: Option<Duration>,
}

impl SubscribeOptions {
    /// Default options: no group, the bus's queue defaults, new messages only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins a consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the queue capacity (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    /// Sets the overflow policy.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = Some(overflow);
        self
    }

    /// Sets where a stream-mode consumer starts.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Sets the stream-mode ack timeout.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    /// The queue capacity and policy, falling back to `defaults`.
    pub fn queue(&self, defaults: QueueDefaults) -> (usize, Overflow) {
        (
            self.capacity.unwrap_or(defaults.capacity).max(1),
            self.overflow.unwrap_or(defaults.overflow),
        )
    }
}

/// A bus's default queue settings (from its config: `capacity`, `overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDefaults {
    /// Default queue capacity.
    pub capacity: usize,
    /// Default overflow policy.
    pub overflow: Overflow,
}

impl Default for QueueDefaults {
    fn default() -> Self {
        QueueDefaults {
            capacity: DEFAULT_CAPACITY,
            overflow: Overflow::Block,
        }
    }
}
