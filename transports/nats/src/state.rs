//! The state a bus's modes share: the client, the options, the counters, and the running
//! pumps with the subscription queues each one feeds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use async_nats::connection::State;
use busway::config::QueueDefaults;
use busway::transport::{Counters, QueueSender};
use busway::{Error, ErrorKind, Mode, Result, Topic};
use parking_lot::Mutex;

use crate::config::{NatsConfig, NatsOptions};
use crate::drops::{ClientDrops, ProbeSender};

/// One bus's state, shared by its handles, pumps and subscription guards.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) name: String,
    /// The URL list with passwords and tokens replaced by `***`.
    pub(crate) url: String,
    pub(crate) client: async_nats::Client,
    pub(crate) mode: Mode,
    pub(crate) options: NatsOptions,
    pub(crate) queue: QueueDefaults,
    pub(crate) counters: Arc<Counters>,
    /// What async-nats dropped for slow consumers (see `drops`).
    pub(crate) client_drops: Arc<ClientDrops>,
    /// Stream mode: JetStream publishes sent again after no PubAck came (busway's
    /// `Counters` has no field for it; read with `NatsBus::publish_retries`).
    pub(crate) publish_retries: AtomicU64,
    closed: AtomicBool,
    pumps: Mutex<Pumps>,
    next_sub: AtomicU64,
}

/// The running pumps of the bus (each fed by one NATS subscription or JetStream consumer),
/// and which of them core subscriptions of a pattern share.
#[derive(Debug, Default)]
struct Pumps {
    by_id: HashMap<u64, PumpEntry>,
    /// Pattern -> the pump that subscriptions of that pattern without a group and under a
    /// policy that never waits share (see `broadcast::subscribe`).
    shared: HashMap<String, u64>,
}

#[derive(Debug)]
struct PumpEntry {
    members: Arc<Members>,
    task: tokio::task::AbortHandle,
    /// Core pumps only: answers once its async-nats channel is empty.
    probe: Option<ProbeSender>,
    /// Its key in `Pumps::shared`, when shared.
    shared: Option<String>,
}

/// The subscription queues one pump feeds: one, or several for a shared core subscription.
#[derive(Debug, Default)]
pub(crate) struct Members {
    list: Mutex<Vec<(u64, QueueSender)>>,
    /// Bumped (under the lock) on every change, so the pump re-reads the list only then.
    generation: AtomicU64,
}

impl Members {
    fn add(&self, id: u64, tx: QueueSender) {
        let mut list = self.list.lock();
        list.push((id, tx));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Removes member `id`; true when none is left.
    fn remove(&self, id: u64) -> bool {
        let mut list = self.list.lock();
        list.retain(|(m, _)| *m != id);
        self.generation.fetch_add(1, Ordering::Release);
        list.is_empty()
    }

    /// Brings `into` up to date with the members, if they changed since generation `seen`.
    /// One atomic load when nothing changed (the pump calls it for every message).
    pub(crate) fn refresh(&self, seen: &mut u64, into: &mut Vec<QueueSender>) {
        if self.generation.load(Ordering::Acquire) == *seen {
            return;
        }
        let list = self.list.lock();
        into.clear();
        into.extend(list.iter().map(|(_, tx)| tx.clone()));
        *seen = self.generation.load(Ordering::Acquire);
    }

    /// Ends every member's subscription (once it has drained its queue).
    pub(crate) fn close_all(&self) {
        for (_, tx) in self.list.lock().iter() {
            tx.close();
        }
    }

    /// The member, when there is exactly one.
    fn only(&self) -> Option<QueueSender> {
        match self.list.lock().as_slice() {
            [(_, tx)] => Some(tx.clone()),
            _ => None,
        }
    }
}

/// Dropped with a subscription: takes it out of its pump's members; the last one out stops
/// the pump (which unsubscribes or deletes its consumer).
#[derive(Debug)]
pub(crate) struct SubGuard {
    bus: Weak<Inner>,
    pump: u64,
    member: u64,
    task: tokio::task::AbortHandle,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        match self.bus.upgrade() {
            Some(bus) => bus.leave(self.pump, self.member, &self.task),
            None => self.task.abort(),
        }
    }
}

/// Starts a pump, given its id and members: its task and, for a core pump, its probe.
pub(crate) type StartPump<'a> =
    Box<dyn FnOnce(u64, Arc<Members>) -> (tokio::task::AbortHandle, Option<ProbeSender>) + 'a>;

/// A shared core pump found for a new member: what joining it needs (see
/// [`Inner::join_shared`]).
#[derive(Debug)]
pub(crate) struct SharedPump {
    pump: u64,
    task: tokio::task::AbortHandle,
    /// Answers once the pump has handed on everything its NATS subscription received.
    pub(crate) probe: Option<ProbeSender>,
}

impl Pumps {
    fn find_shared(&self, pattern: &str) -> Option<SharedPump> {
        let pump = *self.shared.get(pattern)?;
        let entry = self.by_id.get(&pump)?;
        Some(SharedPump {
            pump,
            task: entry.task.clone(),
            probe: entry.probe.clone(),
        })
    }
}

/// The core pumps' probes, and the one subscription queue that can have lost what the
/// client dropped (see [`Inner::core_probes`]).
pub(crate) type CoreProbes = (Vec<ProbeSender>, Option<QueueSender>);

impl Inner {
    pub(crate) fn new(
        config: NatsConfig,
        client: async_nats::Client,
        counters: Arc<Counters>,
        client_drops: Arc<ClientDrops>,
    ) -> Inner {
        Inner {
            url: config.redacted_url(),
            name: config.bus,
            client,
            mode: config.mode,
            options: config.options,
            queue: config.queue,
            counters,
            client_drops,
            publish_retries: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            pumps: Mutex::new(Pumps::default()),
            next_sub: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the bus closed; false when it already was.
    pub(crate) fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Records a running pump feeding `tx` alone and returns the guard to attach to its
    /// subscription.
    pub(crate) fn track(
        self: &Arc<Self>,
        tx: QueueSender,
        task: tokio::task::AbortHandle,
        probe: Option<ProbeSender>,
    ) -> SubGuard {
        self.start_pump(tx, Box::new(|_, _| (task, probe)))
    }

    /// Records a new pump feeding `tx`, started by `start(pump id, its members)`, and returns
    /// the guard to attach to `tx`'s subscription.
    pub(crate) fn start_pump(self: &Arc<Self>, tx: QueueSender, start: StartPump<'_>) -> SubGuard {
        let mut pumps = self.pumps.lock();
        self.insert_pump(&mut pumps, None, tx, start)
    }

    /// As [`Inner::start_pump`], for a pump that later subscriptions of `pattern` share
    /// (found by [`Inner::find_shared`]). If another one was registered for the pattern
    /// meanwhile, `start` is not called (what it owns, such as a NATS subscription, is
    /// dropped) and that pump is returned, to join instead.
    pub(crate) fn start_shared(
        self: &Arc<Self>,
        pattern: &str,
        tx: QueueSender,
        start: StartPump<'_>,
    ) -> std::result::Result<SubGuard, SharedPump> {
        let mut pumps = self.pumps.lock();
        if let Some(found) = pumps.find_shared(pattern) {
            return Err(found);
        }
        Ok(self.insert_pump(&mut pumps, Some(pattern.to_string()), tx, start))
    }

    fn insert_pump(
        self: &Arc<Self>,
        pumps: &mut Pumps,
        shared: Option<String>,
        tx: QueueSender,
        start: StartPump<'_>,
    ) -> SubGuard {
        let pump = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let member = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let members = Arc::new(Members::default());
        members.add(member, tx);
        let (task, probe) = start(pump, members.clone());
        if let Some(key) = &shared {
            pumps.shared.insert(key.clone(), pump);
        }
        pumps.by_id.insert(
            pump,
            PumpEntry {
                members,
                task: task.clone(),
                probe,
                shared,
            },
        );
        SubGuard {
            bus: Arc::downgrade(self),
            pump,
            member,
            task,
        }
    }

    /// The shared pump of `pattern`, if one is running.
    pub(crate) fn find_shared(&self, pattern: &str) -> Option<SharedPump> {
        self.pumps.lock().find_shared(pattern)
    }

    /// Adds `tx` to the members of `found`; `None` when that pump has stopped meanwhile.
    pub(crate) fn join_shared(
        self: &Arc<Self>,
        found: SharedPump,
        tx: QueueSender,
    ) -> Option<SubGuard> {
        let pumps = self.pumps.lock();
        let entry = pumps.by_id.get(&found.pump)?;
        let member = self.next_sub.fetch_add(1, Ordering::Relaxed);
        entry.members.add(member, tx);
        Some(SubGuard {
            bus: Arc::downgrade(self),
            pump: found.pump,
            member,
            task: found.task,
        })
    }

    /// Takes member `member` out of pump `pump`; stops the pump when it was the last.
    fn leave(&self, pump: u64, member: u64, task: &tokio::task::AbortHandle) {
        let mut pumps = self.pumps.lock();
        let Some(entry) = pumps.by_id.get(&pump) else {
            // Already retired (its subscription ended) or the bus closed.
            task.abort();
            return;
        };
        if entry.members.remove(member) {
            if let Some(entry) = pumps.by_id.remove(&pump) {
                if let Some(key) = entry.shared {
                    pumps.shared.remove(&key);
                }
            }
            task.abort();
        }
    }

    /// Forgets pump `pump` whose NATS subscription ended (the client closed): later
    /// subscriptions of its pattern start a new one.
    pub(crate) fn retire(&self, pump: u64) {
        let mut pumps = self.pumps.lock();
        if let Some(entry) = pumps.by_id.remove(&pump) {
            if let Some(key) = entry.shared {
                pumps.shared.remove(&key);
            }
        }
    }

    /// Stops every pump and ends its members' subscriptions (once drained); returns once
    /// every pump task has ended (so what a JetStream pump prefetched has been given back
    /// before the connection goes), or after 2 s.
    pub(crate) async fn stop_pumps(&self) {
        let pumps: Vec<PumpEntry> = {
            let mut all = self.pumps.lock();
            all.shared.clear();
            all.by_id.drain().map(|(_, e)| e).collect()
        };
        for pump in &pumps {
            pump.task.abort();
            pump.members.close_all();
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while pumps.iter().any(|p| !p.task.is_finished()) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// The core pumps' probes, and the subscription queue a client-side drop is attributed
    /// to: a message async-nats dropped never reached any member of its pump, so only when
    /// one core pump with one member is running.
    pub(crate) fn core_probes(&self) -> CoreProbes {
        let all = self.pumps.lock();
        let probes: Vec<ProbeSender> = all.by_id.values().filter_map(|e| e.probe.clone()).collect();
        let only = match (probes.len(), all.by_id.values().find(|e| e.probe.is_some())) {
            (1, Some(e)) => e.members.only(),
            _ => None,
        };
        (probes, only)
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::closed(format!("bus {:?}", self.name))
    }

    /// The error for a publish while disconnected under `on_disconnect = "fail"`.
    pub(crate) fn disconnected_error(&self, topic: &Topic) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "bus {:?}: not connected to NATS at {} (publishing {:?}; on_disconnect = \"fail\")",
                self.name,
                self.url,
                topic.as_str()
            ),
        )
    }

    /// Counts `e` in the bus's errors and returns it.
    pub(crate) fn failed(&self, e: Error) -> Error {
        Counters::incr(&self.counters.errors);
        e
    }

    /// Waits until the server has processed everything this client sent so far (bounded by
    /// `publish_timeout`). async-nats's `flush` only writes the socket; a request nobody
    /// answers comes back as "no responders" after the server handled what preceded it.
    pub(crate) async fn round_trip(&self) -> Result<()> {
        use async_nats::client::RequestErrorKind;
        let subject = format!("{}.busway-sync", self.client.new_inbox());
        let timeout = self.options.publish_timeout();
        let answer =
            tokio::time::timeout(timeout, self.client.request(subject, bytes::Bytes::new())).await;
        match answer {
            Ok(Ok(_)) => {
                self.client_drops.took();
                Ok(())
            }
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                // The "no responders" status is a message too.
                self.client_drops.took();
                Ok(())
            }
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: flush to {} failed", self.name, self.url),
            )
            .with_source(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "bus {:?}: flush to {} did not finish within {timeout:?} ({})",
                    self.name,
                    self.url,
                    if self.is_connected() {
                        "connected"
                    } else {
                        "disconnected"
                    }
                ),
            )),
        }
    }

    /// The server's `max_payload`: the largest payload a message without headers may
    /// carry. With headers, payload + encoded header block must fit (async-nats checks the
    /// message being published: `PayloadTooLarge`). `max_payload()` is an atomic load, where
    /// `server_info()` would clone the whole INFO under a lock.
    pub(crate) fn max_payload(&self) -> usize {
        self.client.max_payload().max(1)
    }
}
