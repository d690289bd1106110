//! The router's merged subscription: several per-bus subscriptions as one, with
//! per-part accept rules a reload can change, and de-duplication across mirror buses.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::delivery::Delivery;
use crate::metrics::BusHandles;
use crate::stats::{Counters, StatsSnapshot};
use crate::subscription::{ack_dropped, Subscription};
use crate::topic::Pattern;

/// Each slot's metric handles, index for index with the router's bus slots.
pub(crate) type SlotHandles = Arc<parking_lot::RwLock<Vec<Arc<BusHandles>>>>;

/// A rule deciding which deliveries of one part of a merged subscription are kept (the router
/// keeps those its routing table would have put on the bus they came from).
pub(crate) type Accept = Arc<dyn Fn(&Delivery) -> bool + Send + Sync>;

/// Changes a [`merge_live`] subscription while it is open: add parts, widen or
/// narrow what a part keeps, end a part once drained.
///
/// # Behavior
/// Changes are applied by the subscription itself, at the start of its next poll, before it
/// takes any delivery: a change made before a message is published is in effect when that
/// message is judged. "After the backlog" means after the part has handed out what was queued
/// in it when the change was applied, so messages already waiting are judged by the rules
/// they arrived under. A part keeps a delivery when any of its accept rules does (a part
/// added without a rule keeps everything; one whose rules were all forgotten keeps nothing).
/// The subscription ends when it has no part left.
#[derive(Clone)]
pub(crate) struct MergeHandle {
    control: Arc<MergeControl>,
}

impl fmt::Debug for MergeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergeHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MergeHandle {
    /// Adds a part under `key`, keeping what `accept` keeps (everything for `None`), under
    /// rule generation `generation`.
    pub(crate) fn add(&self, key: u64, sub: Subscription, generation: u64, accept: Option<Accept>) {
        self.send(Change::Add(key, sub, accept.map(|a| (generation, a))));
    }

    /// From now on part `key` also keeps what `accept` keeps (rule `generation`).
    pub(crate) fn accept_also(&self, key: u64, generation: u64, accept: Accept) {
        self.send(Change::AcceptAlso(key, generation, accept));
    }

    /// After its backlog, part `key` forgets its rules older than `generation`.
    pub(crate) fn forget_before_after_backlog(&self, key: u64, generation: u64) {
        self.send(Change::Later(key, Later::ForgetBefore(generation)));
    }

    /// From now on the subscription remembers the ids it delivers, as it does once it has
    /// two parts: sent before a part is subscribed for an open subscription, so a message
    /// delivered by an old part in the meantime is known when its mirror copy comes through
    /// the new part (without it, the window would start only when the new part is added).
    pub(crate) fn remember_ids(&self) {
        self.send(Change::RememberIds);
    }

    /// After its backlog, part `key` ends (and its subscription is dropped).
    pub(crate) fn end_after_backlog(&self, key: u64) {
        self.send(Change::Later(key, Later::End));
    }

    /// Whether the subscription was dropped or has ended: changes are then discarded.
    pub(crate) fn is_closed(&self) -> bool {
        self.control.closed.load(Relaxed)
    }

    fn send(&self, change: Change) {
        if self.is_closed() {
            return;
        }
        self.control.changes.lock().push(change);
        self.control
            .dirty
            .store(true, std::sync::atomic::Ordering::Release);
        self.control.waker.wake();
    }
}

#[derive(Default)]
struct MergeControl {
    changes: parking_lot::Mutex<Vec<Change>>,
    dirty: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
}

enum Change {
    Add(u64, Subscription, Option<(u64, Accept)>),
    AcceptAlso(u64, u64, Accept),
    Later(u64, Later),
    RememberIds,
}

enum Later {
    ForgetBefore(u64),
    End,
}

/// One part of a merged subscription.
struct Part {
    key: u64,
    sub: Subscription,
    /// `None`: keeps everything; otherwise keeps what any rule (generation, rule) keeps.
    accept: Option<Vec<(u64, Accept)>>,
    /// Deliveries taken from `sub` so far (before filtering).
    taken: u64,
    /// Changes due once `taken` reaches their mark, in mark order.
    later: Vec<(u64, Later)>,
    /// The bus's histograms (delivery latency), when the key is a router bus slot.
    handles: Option<Arc<BusHandles>>,
}

impl Part {
    fn keeps(&self, d: &Delivery) -> bool {
        match &self.accept {
            None => true,
            Some(rules) => rules.iter().any(|(_, keep)| keep(d)),
        }
    }

    /// Applies the changes whose mark is reached; `false` when the part has ended.
    fn due(&mut self) -> bool {
        while self.later.first().is_some_and(|(at, _)| *at <= self.taken) {
            match self.later.remove(0).1 {
                Later::ForgetBefore(generation) => {
                    if let Some(rules) = &mut self.accept {
                        rules.retain(|(g, _)| *g >= generation);
                    }
                }
                Later::End => return false,
            }
        }
        true
    }
}

/// The ids a merged subscription delivered last: a FIFO of hashes bounded by `capacity`.
struct Dedup {
    seen: std::collections::HashSet<u64, foldhash::fast::RandomState>,
    order: std::collections::VecDeque<u64>,
    capacity: usize,
    hasher: foldhash::fast::RandomState,
}

impl Dedup {
    fn new(capacity: usize) -> Dedup {
        Dedup {
            seen: Default::default(),
            order: Default::default(),
            capacity,
            hasher: Default::default(),
        }
    }

    /// Records `id`; `false` when it is already in the window. 64-bit hashes of the ids
    /// (randomly seeded per subscription) keep the window small; two ids colliding within one
    /// window is a chance of about window / 2^64.
    fn first_time(&mut self, id: &str, stats: &Counters) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(id);
        if !self.seen.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
                Counters::incr(&stats.dedup_evictions);
            }
        }
        true
    }
}

/// Merges `parts` (each under a caller-chosen key, with an optional [`Accept`] rule of rule
/// generation `generation`) into one subscription whose set of parts can change while it is
/// open, through the returned [`MergeHandle`]. The router makes its subscriptions this way,
/// so a reload can move them to other buses.
///
/// With `dedup_window > 0`, once the subscription has two parts or more it delivers each
/// message id once among the last `dedup_window` ids it has delivered (or once a reload is
/// about to add a part: [`MergeHandle::remember_ids`]); a one-part subscription keeps no
/// window otherwise. Messages without an id are never treated as duplicates.
/// Duplicates dropped count in `duplicates` and ids pushed out of the full window in
/// `dedup_evictions` of [`Subscription::stats`]; an ackable duplicate is acked (on a spawned
/// task), as a delivery no rule accepts is.
pub(crate) fn merge_live(
    pattern: Pattern,
    generation: u64,
    parts: Vec<(u64, Subscription, Option<Accept>)>,
    dedup_window: usize,
    slot_handles: Option<SlotHandles>,
) -> (Subscription, MergeHandle) {
    let control = Arc::new(MergeControl::default());
    let handle = MergeHandle {
        control: control.clone(),
    };
    let merged = Merged::new(parts, generation, dedup_window, Some(control), slot_handles);
    (Subscription::merged(pattern, merged), handle)
}

/// The source of a merged subscription: its parts, polled in turn.
pub(crate) struct Merged {
    parts: Vec<Part>,
    next: usize,
    control: Option<Arc<MergeControl>>,
    dedup_window: usize,
    /// Allocated once the subscription has had two parts at once.
    dedup: Option<Dedup>,
    /// The counters of parts that ended.
    retired: StatsSnapshot,
    /// Where a part finds its bus's histograms by its key.
    slot_handles: Option<SlotHandles>,
}

impl Drop for Merged {
    fn drop(&mut self) {
        if let Some(c) = &self.control {
            c.closed.store(true, Relaxed);
            c.changes.lock().clear();
        }
    }
}

impl Merged {
    /// The counters of the whole: the sum over its parts (live and ended), less the
    /// duplicates the merge itself dropped (`own`).
    pub(crate) fn stats(&self, own: &StatsSnapshot) -> StatsSnapshot {
        let mut total = self.retired;
        for part in &self.parts {
            total.merge(&part.sub.stats());
        }
        total.delivered = total.delivered.saturating_sub(own.duplicates);
        total.duplicates += own.duplicates;
        total.dedup_evictions += own.dedup_evictions;
        total
    }

    /// Deliveries queued in its parts.
    pub(crate) fn pending(&self) -> usize {
        self.parts.iter().map(|p| p.sub.pending()).sum()
    }

    fn new(
        parts: Vec<(u64, Subscription, Option<Accept>)>,
        generation: u64,
        dedup_window: usize,
        control: Option<Arc<MergeControl>>,
        slot_handles: Option<SlotHandles>,
    ) -> Merged {
        let mut m = Merged {
            parts: Vec::with_capacity(parts.len()),
            next: 0,
            control,
            dedup_window,
            dedup: None,
            retired: StatsSnapshot::default(),
            slot_handles,
        };
        for (key, sub, accept) in parts {
            m.add(key, sub, accept.map(|a| (generation, a)));
        }
        m
    }

    fn add(&mut self, key: u64, sub: Subscription, rule: Option<(u64, Accept)>) {
        self.parts.push(Part {
            key,
            sub,
            accept: rule.map(|r| vec![r]),
            taken: 0,
            later: Vec::new(),
            handles: self
                .slot_handles
                .as_ref()
                .and_then(|h| h.read().get(key as usize).cloned()),
        });
        if self.parts.len() >= 2 && self.dedup_window > 0 && self.dedup.is_none() {
            self.dedup = Some(Dedup::new(self.dedup_window));
        }
    }

    fn end_part(&mut self, i: usize) {
        let part = self.parts.remove(i);
        self.retired.merge(&part.sub.stats());
        if self.next > i {
            self.next -= 1;
        }
    }

    fn apply_changes(&mut self, control: &MergeControl) {
        let changes = std::mem::take(&mut *control.changes.lock());
        for change in changes {
            match change {
                Change::Add(key, sub, rule) => self.add(key, sub, rule),
                Change::RememberIds => {
                    if self.dedup_window > 0 && self.dedup.is_none() {
                        self.dedup = Some(Dedup::new(self.dedup_window));
                    }
                }
                Change::AcceptAlso(key, generation, accept) => {
                    if let Some(p) = self.parts.iter_mut().find(|p| p.key == key) {
                        p.accept
                            .get_or_insert_with(Vec::new)
                            .push((generation, accept));
                    }
                }
                Change::Later(key, later) => {
                    if let Some(p) = self.parts.iter_mut().find(|p| p.key == key) {
                        let at = p.taken + p.sub.pending() as u64;
                        // Marks only grow, so pushing keeps `later` in mark order.
                        p.later.push((at, later));
                    }
                }
            }
        }
    }

    pub(crate) fn poll(
        &mut self,
        stats: &Counters,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Delivery>> {
        loop {
            if let Some(control) = self.control.clone() {
                if control
                    .dirty
                    .swap(false, std::sync::atomic::Ordering::Acquire)
                {
                    self.apply_changes(&control);
                }
            }
            match self.poll_parts(stats, cx) {
                Poll::Ready(None) => {
                    if let Some(c) = &self.control {
                        c.closed.store(true, Relaxed);
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let Some(control) = &self.control else {
                        return Poll::Pending;
                    };
                    // Registered before the last look, so a change sent after it wakes us.
                    control.waker.register(cx.waker());
                    if !control.dirty.load(std::sync::atomic::Ordering::Acquire) {
                        return Poll::Pending;
                    }
                }
                ready => return ready,
            }
        }
    }

    /// Polls the parts in turn from `next`, so a busy one cannot starve the rest.
    fn poll_parts(&mut self, stats: &Counters, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let mut k = 0;
        while k < self.parts.len() {
            let i = (self.next + k) % self.parts.len();
            if !self.parts[i].due() {
                self.end_part(i);
                // Scan again from the start: every part must be polled (and so wake us)
                // before we may return `Pending`.
                k = 0;
                continue;
            }
            let part = &mut self.parts[i];
            match part.sub.poll_recv(cx) {
                Poll::Ready(Some(d)) => {
                    part.taken += 1;
                    if !part.keeps(&d) {
                        part.sub.reject(d);
                        // Look at the same part again: it may hold more.
                        continue;
                    }
                    let duplicate = match (&mut self.dedup, &d.message().headers.id) {
                        (Some(window), Some(id)) => !window.first_time(id, stats),
                        _ => false,
                    };
                    if duplicate {
                        Counters::incr(&stats.duplicates);
                        ack_dropped(d);
                        continue;
                    }
                    if crate::metrics::enabled() && crate::metrics::sampled() {
                        let part = &self.parts[i];
                        if let (Some(h), Some(ts)) =
                            (&part.handles, d.message().headers.timestamp_us)
                        {
                            h.delivered(ts);
                        }
                    }
                    self.next = (i + 1) % self.parts.len();
                    return Poll::Ready(Some(d));
                }
                Poll::Ready(None) => {
                    self.end_part(i);
                    k = 0;
                }
                Poll::Pending => k += 1,
            }
        }
        if self.parts.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Bus, MemoryBus, Message, SubscribeOptions, Topic};

    /// The ids a one-part subscription delivers when a reload adds a second part whose bus
    /// got a mirror copy of a message the first part delivers before the part is added.
    async fn ids_through_a_move(remember: bool) -> Vec<String> {
        let (a, b) = (MemoryBus::new("a"), MemoryBus::new("b"));
        let p = Pattern::new("t").unwrap();
        let on_a = a
            .subscribe(p.clone(), SubscribeOptions::new())
            .await
            .unwrap();
        let (mut merged, handle) = merge_live(p.clone(), 1, vec![(0, on_a, None)], 100, None);
        if remember {
            handle.remember_ids();
        }
        let on_b = b
            .subscribe(p.clone(), SubscribeOptions::new())
            .await
            .unwrap();
        let m = Message::new(Topic::new("t").unwrap(), &b"x"[..]).with_id("m1");
        a.publish(m.clone()).await.unwrap();
        b.publish(m).await.unwrap();
        let wait = Duration::from_millis(300);
        let mut ids = Vec::new();
        let first = merged.recv_timeout(wait).await.unwrap().unwrap();
        ids.extend(first.message().headers.id.clone());
        handle.add(1, on_b, 1, None);
        while let Ok(Some(d)) = merged.recv_timeout(wait).await {
            ids.extend(d.message().headers.id.clone());
        }
        ids
    }

    #[tokio::test]
    async fn ids_remembered_before_a_part_is_added_drop_its_copies() {
        assert_eq!(ids_through_a_move(false).await, ["m1", "m1"]);
        assert_eq!(ids_through_a_move(true).await, ["m1"]);
    }
}
