//! The bounded per-subscription queue with its overflow policy.
//!
//! Every transport feeds its subscriptions through one of these, so the four policies behave
//! the same everywhere. The producer side is a [`QueueSender`]; the consumer side lives inside
//! a [`Subscription`](crate::Subscription).
//!
//! The consumer takes the whole backlog in one lock (swapping buffers), so a busy queue costs
//! one lock per batch on the consumer side, not one per message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::delivery::Delivery;
use crate::options::Overflow;
use crate::stats::Counters;
use crate::topic::TopicMap;

/// What happened to a message offered with [`QueueSender::try_send`].
#[derive(Debug)]
pub enum TrySend {
    /// Queued (possibly after dropping an older one, which was counted).
    Queued,
    /// Dropped by the policy (counted).
    Dropped,
    /// The queue is full and the policy is `block`: the delivery is handed back.
    Full(Delivery),
    /// The subscription is gone: the delivery is handed back.
    Closed(Delivery),
}

struct State {
    items: VecDeque<Delivery>,
    /// For `latest`: topic -> sequence number of its queued item. Sequence `head_seq` is at
    /// the front of `items`.
    latest: TopicMap<u64>,
    head_seq: u64,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    overflow: Overflow,
    rx_waker: AtomicWaker,
    /// Wakes producers waiting for room under `block`.
    room: Notify,
    /// Producers in `send` that may be waiting on `room`: the consumer skips notifying (a
    /// lock inside `Notify`) on every refill while there are none.
    waiting: AtomicUsize,
    rx_gone: AtomicBool,
    sub_stats: Arc<Counters>,
    bus_stats: Arc<Counters>,
}

/// The producer side of a subscription queue. Cheap to clone.
#[derive(Clone)]
pub struct QueueSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QueueSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSender")
            .field("capacity", &self.shared.capacity)
            .field("overflow", &self.shared.overflow)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// A weak view of a queue's length, for the queue-depth gauge: it never keeps the queue
/// alive.
#[derive(Clone)]
pub(crate) struct QueueDepth(std::sync::Weak<Shared>);

impl QueueDepth {
    /// Messages waiting now; `None` once the queue is gone.
    pub(crate) fn get(&self) -> Option<usize> {
        let shared = self.0.upgrade()?;
        let n = shared.state.lock().items.len();
        Some(n)
    }
}

/// The consumer side, owned by a subscription.
pub(crate) struct QueueReceiver {
    shared: Arc<Shared>,
    local: VecDeque<Delivery>,
}

/// Makes a queue of `capacity` with `overflow`. Drops are counted in the subscription's
/// `sub_stats` and in the bus's `bus_stats`; deliveries are counted when the consumer takes
/// them.
pub(crate) fn queue(
    capacity: usize,
    overflow: Overflow,
    sub_stats: Arc<Counters>,
    bus_stats: Arc<Counters>,
) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::with_capacity(capacity.min(4096)),
            latest: HashMap::default(),
            head_seq: 0,
            closed: false,
        }),
        capacity: capacity.max(1),
        overflow,
        rx_waker: AtomicWaker::new(),
        room: Notify::new(),
        waiting: AtomicUsize::new(0),
        rx_gone: AtomicBool::new(false),
        sub_stats,
        bus_stats,
    });
    (
        QueueSender {
            shared: shared.clone(),
        },
        QueueReceiver {
            shared,
            local: VecDeque::new(),
        },
    )
}

impl QueueSender {
    fn dropped(&self) {
        Counters::incr(&self.shared.sub_stats.dropped);
        Counters::incr(&self.shared.bus_stats.dropped);
    }

    /// Offers a delivery without waiting; see [`TrySend`].
    pub fn try_send(&self, delivery: Delivery) -> TrySend {
        let mut st = self.shared.state.lock();
        let was_empty = st.items.is_empty();
        let outcome = self.offer(&mut st, delivery);
        self.release(st, was_empty);
        outcome
    }

    /// Offers each delivery of `deliveries` in turn, as [`try_send`](Self::try_send) would,
    /// under one lock and with at most one wake-up of the consumer: the way to hand on a
    /// batch read from the broker at once. Stops at the first delivery handed back
    /// ([`TrySend::Full`] under `block`, or [`TrySend::Closed`]), leaving the rest in the
    /// iterator; otherwise returns the outcome of the last one ([`TrySend::Queued`] for none).
    pub fn try_send_many(&self, deliveries: &mut impl Iterator<Item = Delivery>) -> TrySend {
        let mut st = self.shared.state.lock();
        let was_empty = st.items.is_empty();
        let mut outcome = TrySend::Queued;
        for delivery in deliveries.by_ref() {
            outcome = self.offer(&mut st, delivery);
            if matches!(outcome, TrySend::Full(_) | TrySend::Closed(_)) {
                break;
            }
        }
        self.release(st, was_empty);
        outcome
    }

    /// Unlocks the queue and wakes the consumer if it was empty and no longer is. Only the
    /// push that makes the queue non-empty wakes the consumer: it registers its waker before
    /// its last look at the queue, so a non-empty queue always had a wake issued after it
    /// became non-empty. Skipping the rest saves a contended atomic and, more, a needless
    /// task wake-up per message.
    #[inline(always)]
    fn release(&self, st: parking_lot::MutexGuard<'_, State>, was_empty: bool) {
        let wake = was_empty && !st.items.is_empty();
        drop(st);
        if wake {
            self.shared.rx_waker.wake();
        }
    }

    /// Applies the policy to one delivery, under the lock. Inlined: a call costs the
    /// single-delivery `try_send` (every MemoryBus publish, per subscriber) a good part of
    /// what the policy itself does.
    #[inline(always)]
    fn offer(&self, st: &mut State, delivery: Delivery) -> TrySend {
        let shared = &*self.shared;
        if st.closed || shared.rx_gone.load(Ordering::Relaxed) {
            return TrySend::Closed(delivery);
        }
        if shared.overflow == Overflow::Latest {
            if let Some(&seq) = st.latest.get(&delivery.message().topic) {
                let at = (seq - st.head_seq) as usize;
                st.items[at] = delivery;
                self.dropped();
                return TrySend::Queued;
            }
        }
        if st.items.len() >= shared.capacity {
            match shared.overflow {
                Overflow::Block => return TrySend::Full(delivery),
                Overflow::DropNewest => {
                    self.dropped();
                    return TrySend::Dropped;
                }
                Overflow::DropOldest | Overflow::Latest => {
                    if let Some(old) = st.items.pop_front() {
                        let seq = st.head_seq;
                        st.head_seq += 1;
                        if shared.overflow == Overflow::Latest
                            && st.latest.get(&old.message().topic) == Some(&seq)
                        {
                            st.latest.remove(&old.message().topic);
                        }
                    }
                    self.dropped();
                }
            }
        }
        if shared.overflow == Overflow::Latest {
            let seq = st.head_seq + st.items.len() as u64;
            st.latest.insert(delivery.message().topic.clone(), seq);
        }
        st.items.push_back(delivery);
        TrySend::Queued
    }

    /// Queues a delivery, waiting for room under `block`; other policies never wait.
    /// Returns `false` when the subscription is gone (the delivery is dropped, uncounted:
    /// nobody is listening any more).
    pub async fn send(&self, delivery: Delivery) -> bool {
        let mut delivery = match self.try_send(delivery) {
            TrySend::Queued | TrySend::Dropped => return true,
            TrySend::Closed(_) => return false,
            TrySend::Full(d) => d,
        };
        // Counted before the waiter registers and before each look at the queue, so a
        // refill that makes room after that look (under the queue's lock) sees it.
        self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.shared.waiting);
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(delivery) {
                TrySend::Queued | TrySend::Dropped => return true,
                TrySend::Closed(_) => return false,
                TrySend::Full(d) => {
                    delivery = d;
                    room.await;
                }
            }
        }
    }

    /// Queues every delivery of `deliveries` in order, as [`send`](Self::send) would, taking
    /// the lock once per run that fits. Returns `false` when the subscription is gone (the
    /// rest are dropped, uncounted).
    pub async fn send_many(&self, deliveries: impl IntoIterator<Item = Delivery>) -> bool {
        let mut rest = deliveries.into_iter();
        loop {
            match self.try_send_many(&mut rest) {
                TrySend::Queued | TrySend::Dropped => return true,
                TrySend::Closed(_) => return false,
                TrySend::Full(d) => {
                    if !self.send(d).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Whether the subscription was dropped or the queue closed.
    pub fn is_closed(&self) -> bool {
        self.shared.rx_gone.load(Ordering::Relaxed) || self.shared.state.lock().closed
    }

    /// Ends the subscription once the consumer has drained what is queued.
    pub fn close(&self) {
        self.shared.state.lock().closed = true;
        self.shared.rx_waker.wake();
        self.shared.room.notify_waiters();
    }

    /// Messages waiting in the queue.
    pub fn len(&self) -> usize {
        self.shared.state.lock().items.len()
    }

    /// Whether nothing is waiting in the queue.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The subscription's counters (shared with the consumer side).
    pub fn stats(&self) -> &Arc<Counters> {
        &self.shared.sub_stats
    }
}

/// One producer waiting in `send`, for as long as it exists (also when the wait is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl QueueReceiver {
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        if let Some(d) = self.take_local() {
            return Poll::Ready(Some(d));
        }
        if self.refill() {
            return Poll::Ready(self.take_local());
        }
        self.shared.rx_waker.register(cx.waker());
        if self.refill() {
            return Poll::Ready(self.take_local());
        }
        // Emptiness and `closed` are read under one lock: a delivery queued just before
        // `close` (after the refill above) must still be handed out before the end.
        let st = self.shared.state.lock();
        if !st.items.is_empty() {
            drop(st);
            self.refill();
            return Poll::Ready(self.take_local());
        }
        if st.closed {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn take_local(&mut self) -> Option<Delivery> {
        let d = self.local.pop_front()?;
        // The bus counter, shared by every subscription, is counted per batch in `refill`.
        Counters::incr(&self.shared.sub_stats.delivered);
        Some(d)
    }

    /// Moves the shared backlog into the local buffer; true when something came.
    fn refill(&mut self) -> bool {
        let mut st = self.shared.state.lock();
        if st.items.is_empty() {
            return false;
        }
        std::mem::swap(&mut st.items, &mut self.local);
        st.head_seq += self.local.len() as u64;
        st.latest.clear();
        drop(st);
        self.shared
            .bus_stats
            .delivered
            .fetch_add(self.local.len() as u64, Ordering::Relaxed);
        if self.shared.overflow == Overflow::Block
            && self.shared.waiting.load(Ordering::Acquire) > 0
        {
            self.shared.room.notify_waiters();
        }
        true
    }

    /// A weak view of the shared backlog's length.
    pub(crate) fn depth(&self) -> QueueDepth {
        QueueDepth(Arc::downgrade(&self.shared))
    }

    /// Messages waiting (shared backlog plus the local buffer).
    pub(crate) fn len(&self) -> usize {
        self.local.len() + self.shared.state.lock().items.len()
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        // Taken from the queue but never handed out: not delivered after all.
        self.shared
            .bus_stats
            .delivered
            .fetch_sub(self.local.len() as u64, Ordering::Relaxed);
        self.shared.rx_gone.store(true, Ordering::Relaxed);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::delivery::TransportDelivery;
    use crate::message::Message;

    fn setup(capacity: usize, overflow: Overflow) -> (QueueSender, QueueReceiver, Arc<Counters>) {
        let bus = Arc::new(Counters::default());
        let (tx, rx) = queue(
            capacity,
            overflow,
            Arc::new(Counters::default()),
            bus.clone(),
        );
        (tx, rx, bus)
    }

    fn d(topic: &str, payload: &str) -> Delivery {
        Delivery::new(Message::try_new(topic, payload.to_string()).unwrap())
    }

    async fn drain(rx: &mut QueueReceiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = futures::future::poll_fn(|cx| match rx.poll_recv(cx) {
            Poll::Pending => Poll::Ready(None),
            other => other,
        })
        .await
        {
            out.push(format!(
                "{}={}",
                d.message().topic,
                String::from_utf8_lossy(&d.message().payload)
            ));
        }
        out
    }

    #[tokio::test]
    async fn latest_keeps_the_newest_per_topic_in_first_seen_order() {
        let (tx, mut rx, bus) = setup(2, Overflow::Latest);
        for (t, p) in [("a", "1"), ("b", "1"), ("a", "2"), ("a", "3"), ("b", "2")] {
            assert!(matches!(tx.try_send(d(t, p)), TrySend::Queued));
        }
        assert_eq!(tx.len(), 2);
        assert_eq!(bus.snapshot().dropped, 3);
        assert_eq!(drain(&mut rx).await, ["a=3", "b=2"]);
        // A new topic when full evicts the oldest queued topic.
        for (t, p) in [("a", "4"), ("b", "3"), ("c", "1"), ("b", "4")] {
            tx.try_send(d(t, p));
        }
        assert_eq!(drain(&mut rx).await, ["b=4", "c=1"]);
        assert_eq!(bus.snapshot().dropped, 5);
        assert_eq!(bus.snapshot().delivered, 4);
    }

    #[tokio::test]
    async fn latest_after_a_partial_drain_replaces_the_right_slot() {
        let (tx, mut rx, _) = setup(4, Overflow::Latest);
        tx.try_send(d("a", "1"));
        tx.try_send(d("b", "1"));
        assert_eq!(drain(&mut rx).await, ["a=1", "b=1"]);
        tx.try_send(d("c", "1"));
        tx.try_send(d("a", "2"));
        tx.try_send(d("c", "2"));
        tx.try_send(d("a", "3"));
        assert_eq!(drain(&mut rx).await, ["c=2", "a=3"]);
    }

    #[tokio::test]
    async fn drop_policies_keep_first_or_last() {
        let (tx, mut rx, bus) = setup(2, Overflow::DropNewest);
        for p in ["1", "2", "3"] {
            tx.try_send(d("t", p));
        }
        assert!(matches!(tx.try_send(d("t", "4")), TrySend::Dropped));
        assert_eq!(drain(&mut rx).await, ["t=1", "t=2"]);
        assert_eq!(bus.snapshot().dropped, 2);

        let (tx, mut rx, bus) = setup(2, Overflow::DropOldest);
        for p in ["1", "2", "3", "4"] {
            assert!(matches!(tx.try_send(d("t", p)), TrySend::Queued));
        }
        assert_eq!(drain(&mut rx).await, ["t=3", "t=4"]);
        assert_eq!(bus.snapshot().dropped, 2);
    }

    #[tokio::test]
    async fn a_batch_follows_the_policy_message_by_message() {
        let (tx, mut rx, bus) = setup(3, Overflow::DropOldest);
        let batch = ["1", "2", "3", "4", "5"].map(|p| d("t", p));
        assert!(matches!(
            tx.try_send_many(&mut batch.into_iter()),
            TrySend::Queued
        ));
        assert_eq!(drain(&mut rx).await, ["t=3", "t=4", "t=5"]);
        assert_eq!(bus.snapshot().dropped, 2);

        // Under `block` the batch stops at the first delivery that finds no room, and the
        // rest stay with the caller.
        let (tx, mut rx, _) = setup(2, Overflow::Block);
        let mut rest = ["1", "2", "3", "4"].map(|p| d("t", p)).into_iter();
        let TrySend::Full(third) = tx.try_send_many(&mut rest) else {
            panic!("a full block queue hands the delivery back");
        };
        assert_eq!(&third.message().payload[..], b"3");
        assert_eq!(rest.len(), 1);
        assert_eq!(drain(&mut rx).await, ["t=1", "t=2"]);
    }

    #[tokio::test]
    async fn send_many_waits_for_room_and_keeps_the_order() {
        let (tx, mut rx, _) = setup(2, Overflow::Block);
        let sending = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send_many((1..=7).map(|i| d("t", &i.to_string()))).await }
        });
        let mut got = Vec::new();
        while got.len() < 7 {
            let next = tokio::time::timeout(
                Duration::from_secs(5),
                futures::future::poll_fn(|cx| rx.poll_recv(cx)),
            )
            .await
            .expect("the sender makes progress as the queue drains")
            .expect("the queue is open");
            got.push(String::from_utf8_lossy(&next.message().payload).into_owned());
        }
        assert_eq!(got, ["1", "2", "3", "4", "5", "6", "7"]);
        assert!(sending.await.unwrap());
        // The receiver gone: the rest of a batch is refused.
        drop(rx);
        assert!(!tx.send_many([d("t", "8"), d("t", "9")]).await);
    }

    #[tokio::test]
    async fn close_hands_out_the_backlog_then_ends() {
        let (tx, mut rx, _) = setup(8, Overflow::Block);
        tx.try_send(d("t", "1"));
        tx.close();
        assert!(matches!(tx.try_send(d("t", "2")), TrySend::Closed(_)));
        assert!(tx.is_closed());
        assert_eq!(drain(&mut rx).await, ["t=1"]);
        let end = futures::future::poll_fn(|cx| rx.poll_recv(cx)).await;
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn block_send_waits_for_room_and_ends_when_the_receiver_goes() {
        let (tx, mut rx, _) = setup(1, Overflow::Block);
        tx.try_send(d("t", "1"));
        assert!(matches!(tx.try_send(d("t", "2")), TrySend::Full(_)));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(d("t", "2")).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        assert_eq!(drain(&mut rx).await, ["t=1"]);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap());
        assert_eq!(drain(&mut rx).await, ["t=2"]);

        tx.try_send(d("t", "3"));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(d("t", "4")).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(!sent, "send reports the subscription gone");
        assert!(tx.is_closed());
    }

    /// Seven producers into a queue of 4 under `block`, on a runtime with two workers: every
    /// delivery arrives once, each producer's in its order, and nothing is counted dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_many_producers_lose_nothing_and_keep_each_ones_order() {
        let (tx, mut rx, bus) = setup(4, Overflow::Block);
        let producers: Vec<_> = (0..7)
            .map(|p| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for i in 0..2000 {
                        assert!(tx.send(d(&format!("p{p}"), &i.to_string())).await);
                    }
                })
            })
            .collect();
        let mut next = [0u32; 7];
        for _ in 0..7 * 2000 {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                futures::future::poll_fn(|cx| rx.poll_recv(cx)),
            )
            .await
            .expect("deliveries keep coming")
            .expect("the queue is open");
            let p: usize = got.message().topic.as_str()[1..].parse().unwrap();
            let i: u32 = String::from_utf8_lossy(&got.message().payload)
                .parse()
                .unwrap();
            assert_eq!(i, next[p], "producer {p} out of order");
            next[p] += 1;
            assert!(tx.len() <= 4, "never more than the capacity queued");
        }
        for p in producers {
            p.await.unwrap();
        }
        assert_eq!(rx.len(), 0);
        assert_eq!(bus.snapshot().dropped, 0);
        assert_eq!(bus.snapshot().delivered, 7 * 2000);
    }

    /// Producers racing a slow consumer under `drop_newest`: what arrived plus what was
    /// counted dropped is exactly what was offered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_newest_under_contention_counts_every_drop() {
        let (tx, mut rx, bus) = setup(8, Overflow::DropNewest);
        let producers: Vec<_> = (0..4)
            .map(|_| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut dropped = 0u64;
                    for i in 0..5000 {
                        match tx.try_send(d("t", &i.to_string())) {
                            TrySend::Queued => {}
                            TrySend::Dropped => dropped += 1,
                            other => panic!("unexpected {other:?}"),
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    dropped
                })
            })
            .collect();
        let mut received = 0u64;
        while !producers.iter().all(|p| p.is_finished()) {
            received += drain(&mut rx).await.len() as u64;
            tokio::task::yield_now().await;
        }
        let mut dropped = 0;
        for p in producers {
            dropped += p.await.unwrap();
        }
        received += drain(&mut rx).await.len() as u64;
        assert_eq!(received + dropped, 4 * 5000);
        assert_eq!(bus.snapshot().dropped, dropped);
        assert_eq!(bus.snapshot().delivered, received);
    }

    /// `close` racing producers: every delivery was either handed out before the end or
    /// handed back as closed, never lost in between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_racing_producers_loses_nothing_silently() {
        for _ in 0..20 {
            let (tx, mut rx, _) = setup(1 << 16, Overflow::Block);
            let producers: Vec<_> = (0..3)
                .map(|_| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut accepted = 0u64;
                        for i in 0..2000 {
                            match tx.try_send(d("t", &i.to_string())) {
                                TrySend::Queued => accepted += 1,
                                TrySend::Closed(_) => break,
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                        accepted
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            tx.close();
            let mut received = 0u64;
            while tokio::time::timeout(
                Duration::from_secs(10),
                futures::future::poll_fn(|cx| rx.poll_recv(cx)),
            )
            .await
            .expect("the end comes")
            .is_some()
            {
                received += 1;
            }
            let mut accepted = 0;
            for p in producers {
                accepted += p.await.unwrap();
            }
            assert_eq!(received, accepted);
        }
    }
}
