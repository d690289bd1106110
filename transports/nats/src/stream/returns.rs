//! Giving back to the server, at once, the deliveries no handler took: those a
//! subscription's pull had prefetched or its queue still held when the subscription was
//! dropped or the bus closed.
//!
//! JetStream counts every message it sends to a pull request as a delivery, whether or not a
//! handler ever saw it. Left alone, what a dropped subscription held is redelivered only
//! after the ack wait, and each such loss uses up one of the message's `max_deliveries`: a
//! group consumer restarted a few times could terminate messages no handler had seen. So
//! each is nak'd (no delay) when its subscription goes, and this process remembers how many
//! times it gave each message back unseen ([`returned`]), which `Delivery::attempt` leaves
//! out. The memory is per process: another process counts those returns as attempts.
//!
//! "No handler took it" is known exactly under `block` (the stream-mode default): the queue
//! is first in, first out and drops nothing, so the deliveries a subscription has handed out
//! are the first `delivered` it queued. Under a dropping policy the queue drops under its
//! lock, where nothing may be asked of it: deliveries are then not tracked, and what a
//! dropped subscription held comes back after the ack wait, as an attempt.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use async_nats::Subject;
use busway::transport::{Counters, QueueSender};
use futures::FutureExt;
use parking_lot::Mutex;

/// At most this many messages are remembered as given back; past it the memory starts
/// afresh (those messages' returns then count as attempts: later dead-lettering, never loss).
const REMEMBERED: usize = 65_536;

/// Times this process gave a message back unseen, by consumer (`stream/consumer`) and stream
/// sequence.
static RETURNED: LazyLock<Mutex<Returned>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// (consumer, stream sequence) -> times given back unseen.
type Returned = HashMap<(Arc<str>, u64), u32>;

/// How many entries `RETURNED` holds: read without its lock on every delivery.
static REMEMBERED_NOW: AtomicUsize = AtomicUsize::new(0);

/// Times this process gave message `seq` of `consumer` back unseen.
pub(super) fn returned(consumer: &Arc<str>, seq: u64) -> u32 {
    if REMEMBERED_NOW.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    RETURNED
        .lock()
        .get(&(consumer.clone(), seq))
        .copied()
        .unwrap_or(0)
}

fn remember_return(consumer: &Arc<str>, seq: u64) {
    let mut map = RETURNED.lock();
    if map.len() >= REMEMBERED {
        map.clear();
    }
    *map.entry((consumer.clone(), seq)).or_insert(0) += 1;
    REMEMBERED_NOW.store(map.len(), Ordering::Relaxed);
}

/// Forgets message `seq` of `consumer` (acked or terminated: it will not come back).
pub(super) fn forget(consumer: &Arc<str>, seq: u64) {
    if REMEMBERED_NOW.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut map = RETURNED.lock();
    map.remove(&(consumer.clone(), seq));
    REMEMBERED_NOW.store(map.len(), Ordering::Relaxed);
}

/// Naks the delivery whose ack subject is `reply` (no delay) and remembers the return.
/// Written into the client's command buffer at once when it has room (so a bus closing
/// right after still sends it), else from a task.
pub(super) fn give_back(
    client: &async_nats::Client,
    consumer: &Arc<str>,
    reply: Subject,
    seq: u64,
) {
    remember_return(consumer, seq);
    let nak = bytes::Bytes::from_static(b"-NAK");
    let sent = client.publish(reply.clone(), nak.clone()).now_or_never();
    if sent.is_none() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = client.clone();
            rt.spawn(async move {
                let _ = client.publish(reply, nak).await;
            });
        }
    }
}

/// The deliveries of one subscription between its pump and a handler (`block` only: see
/// the module docs).
#[derive(Debug)]
pub(super) struct Line {
    pub(super) consumer: Arc<str>,
    client: async_nats::Client,
    /// The subscription's counters: `delivered` says how many of its deliveries left the
    /// queue for a handler.
    stats: Arc<Counters>,
    /// The queue, to see whether its subscription was dropped; taken out by [`LineGuard`]
    /// (the queue holds deliveries that hold this line).
    tx: Mutex<Option<QueueSender>>,
    /// The bus is closing: nothing queued can be acked any more.
    closing: AtomicBool,
    /// Queued and not settled: position in the queue -> (ack subject, stream sequence).
    queued: Mutex<BTreeMap<u64, (Subject, u64)>>,
    next: AtomicU64,
    /// Give-backs held until the pump has stopped (`None` once it has). A nak sent while
    /// the pump's pull request is still open on the server would be redelivered straight
    /// into that request, whose inbox is about to go.
    held: Mutex<Option<Vec<(Subject, u64)>>>,
}

impl Line {
    pub(super) fn new(consumer: Arc<str>, client: async_nats::Client, tx: QueueSender) -> Line {
        Line {
            consumer,
            client,
            stats: tx.stats().clone(),
            tx: Mutex::new(Some(tx)),
            closing: AtomicBool::new(false),
            queued: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            held: Mutex::new(Some(Vec::new())),
        }
    }

    fn give_back(&self, reply: Subject, seq: u64) {
        let mut held = self.held.lock();
        match held.as_mut() {
            Some(held) => held.push((reply, seq)),
            None => {
                drop(held);
                give_back(&self.client, &self.consumer, reply, seq);
            }
        }
    }

    /// The pump has stopped (its pull unsubscribed): sends what was held back.
    pub(super) fn pump_stopped(&self) {
        let held = self.held.lock().take().unwrap_or_default();
        for (reply, seq) in held {
            give_back(&self.client, &self.consumer, reply, seq);
        }
    }

    /// Registers a delivery about to be queued; its position in the queue.
    pub(super) fn enter(&self, reply: Subject, seq: u64) -> u64 {
        let at = self.next.fetch_add(1, Ordering::Relaxed);
        self.queued.lock().insert(at, (reply, seq));
        at
    }

    /// A handler settled delivery `at` (ack or nack): nothing to give back.
    pub(super) fn settled(&self, at: u64) {
        self.queued.lock().remove(&at);
    }

    /// Delivery `at` was dropped unsettled: given back if no handler took it and its
    /// subscription is gone. One a handler took and dropped comes back after the ack wait,
    /// as an attempt.
    pub(super) fn dropped(&self, at: u64) {
        let Some((reply, seq)) = self.queued.lock().remove(&at) else {
            return;
        };
        if at >= self.handed_out() && self.gone() {
            self.give_back(reply, seq);
        }
    }

    fn handed_out(&self) -> u64 {
        self.stats.delivered.load(Ordering::Acquire)
    }

    fn gone(&self) -> bool {
        self.closing.load(Ordering::Acquire)
            || self.tx.lock().as_ref().is_none_or(QueueSender::is_closed)
    }

    /// The bus is closing: gives back every delivery still queued (a handler that takes one
    /// now cannot ack it: the connection is going).
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let from = self.handed_out();
        let unseen = self.queued.lock().split_off(&from);
        for (reply, seq) in unseen.into_values() {
            self.give_back(reply, seq);
        }
    }
}

/// Dropped with the subscription, after its queue: lets go of the queue, so the deliveries
/// still in it are dropped (and given back) once the pump has stopped.
#[derive(Debug)]
pub(super) struct LineGuard(pub(super) Arc<Line>);

impl Drop for LineGuard {
    fn drop(&mut self) {
        // Taken out before it is dropped: dropping it may drop deliveries, which look at
        // `tx` again.
        let tx = self.0.tx.lock().take();
        drop(tx);
    }
}

/// Dropped when the pump's task has ended and its last pull has drained: see [`Line::held`].
pub(super) struct PumpStopped(pub(super) Option<Arc<Line>>);

impl Drop for PumpStopped {
    fn drop(&mut self) {
        if let Some(line) = &self.0 {
            line.pump_stopped();
        }
    }
}
