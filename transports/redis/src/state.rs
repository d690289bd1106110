//! [`Shared`]: what every part of one bus shares. The publish path, broadcast mode and
//! stream mode each hold an `Arc` of it; it knows none of them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use busway::transport::Counters;
use busway::{Error, Health, Result};

use crate::config::RedisConfig;
use crate::connect::{Con, Connector};
use crate::layout::Layout;

/// The state shared by a bus's handles and its background tasks.
pub(crate) struct Shared {
    pub(crate) config: RedisConfig,
    /// Stream mode: the checked `layout`, when the bus maps an existing one.
    pub(crate) layout: Option<Layout>,
    pub(crate) connector: Connector,
    pub(crate) stats: Arc<Counters>,
    pub(crate) closed: AtomicBool,
    /// The command connection is up.
    pub(crate) cmd_up: AtomicBool,
    /// The pub/sub connection is up (it opens with the first broadcast subscription).
    pub(crate) pubsub_up: AtomicBool,
    pub(crate) pubsub_started: AtomicBool,
    /// Stream readers currently without a connection.
    pub(crate) readers_down: AtomicUsize,
    /// Publishes accepted and not yet answered by the server.
    pub(crate) queued: AtomicUsize,
    /// Wakes the pub/sub task's reconnect backoff: the command connection is back, so the
    /// server is, and both connections return on the same schedule.
    pub(crate) pubsub_retry: tokio::sync::Notify,
    /// Tells the pub/sub task that the command connection found another primary (Sentinel):
    /// its own connection may be on the old one, frozen, and would never hear of it.
    pub(crate) pubsub_moved: tokio::sync::Notify,
    /// Set once when the bus closes or its last user handle goes; every task watches it.
    pub(crate) shutdown: watch::Sender<bool>,
    cmd: Mutex<Option<Con>>,
}

impl Shared {
    /// The state of a bus whose command connection `cmd` is open.
    pub(crate) fn new(config: RedisConfig, connector: Connector, cmd: Con) -> Shared {
        // `connect` validated the config, so a layout given is a good one.
        let layout = config.layout.as_ref().and_then(|l| Layout::new(l).ok());
        Shared {
            layout,
            config,
            connector,
            stats: Arc::new(Counters::default()),
            closed: AtomicBool::new(false),
            cmd_up: AtomicBool::new(true),
            pubsub_up: AtomicBool::new(false),
            pubsub_started: AtomicBool::new(false),
            readers_down: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            pubsub_retry: tokio::sync::Notify::new(),
            pubsub_moved: tokio::sync::Notify::new(),
            shutdown: watch::channel(false).0,
            cmd: Mutex::new(Some(cmd)),
        }
    }

    pub(crate) fn set_cmd_connection(&self, con: Option<Con>) {
        *self.cmd.lock() = con;
    }

    /// A clone of the command connection (commands on it pipeline with everyone else's).
    ///
    /// # Errors
    /// `Connection` while it is down.
    pub(crate) fn cmd_connection(&self) -> Result<Con> {
        self.cmd
            .lock()
            .clone()
            .ok_or_else(|| self.connector.disconnected_plain())
    }

    /// `Closed` naming the bus.
    pub(crate) fn closed_error(&self) -> Error {
        Error::closed(format!("bus {:?}", self.config.bus))
    }

    pub(crate) fn health(&self) -> Health {
        if self.closed.load(Relaxed) {
            return Health::Closed;
        }
        let pubsub_ok = !self.pubsub_started.load(Relaxed) || self.pubsub_up.load(Relaxed);
        if self.cmd_up.load(Relaxed) && pubsub_ok && self.readers_down.load(Relaxed) == 0 {
            Health::Up
        } else {
            Health::Connecting
        }
    }
}
