//! Broadcast mode: each message straight to the queues of the matching subscriptions.

use super::*;

/// One broadcast subscription.
pub(super) struct Sub {
    pub(super) id: u64,
    pub(super) pattern: Pattern,
    pub(super) group: Option<Arc<str>>,
    pub(super) tx: QueueSender,
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) exact: TopicMap<Vec<Arc<Sub>>>,
    pub(super) wild: Vec<Arc<Sub>>,
}

/// The subscriptions one topic goes to.
#[derive(Default)]
pub(super) struct Targets {
    pub(super) solo: Vec<Arc<Sub>>,
    pub(super) groups: Vec<GroupTargets>,
}

/// The members of one group that match a topic, served round-robin.
pub(super) struct GroupTargets {
    pub(super) members: Vec<Arc<Sub>>,
    pub(super) next: AtomicUsize,
}

impl Targets {
    pub(super) fn is_empty(&self) -> bool {
        self.solo.is_empty() && self.groups.is_empty()
    }

    pub(super) fn compute(table: &Table, topic: &Topic) -> Targets {
        let mut t = Targets::default();
        let exact = table.exact.get(topic).into_iter().flatten();
        let wild = table.wild.iter().filter(|s| s.pattern.matches(topic));
        for sub in exact.chain(wild) {
            match &sub.group {
                None => t.solo.push(sub.clone()),
                Some(g) => match t
                    .groups
                    .iter_mut()
                    .find(|gt| gt.members[0].group.as_ref() == Some(g))
                {
                    Some(gt) => gt.members.push(sub.clone()),
                    None => t.groups.push(GroupTargets {
                        members: vec![sub.clone()],
                        next: AtomicUsize::new(0),
                    }),
                },
            }
        }
        t
    }
}

impl MemoryBus {
    /// Hands `message` to the queue of every matching subscription (one member per group)
    /// without waiting. Returns the deliveries that found their `block` queue full, for the
    /// publisher to wait on; empty (no allocation) in the common case.
    pub(super) fn deliver_broadcast(&self, message: Message) -> Vec<(Arc<Sub>, Delivery)> {
        // A cached topic is served under the cache's read lock, without taking a reference
        // to its targets: publishers on one topic then share one contended cache line (the
        // lock's), not two (the lock's and the targets' reference count).
        let cache = self.inner.cache.read();
        let (blocked, gone) = match cache.get(message.topic.as_str()) {
            Some(targets) => self.deliver_to(targets, message),
            None => {
                drop(cache);
                let targets = self.inner.targets(&message.topic);
                self.deliver_to(&targets, message)
            }
        };
        // Removing takes the table's and the cache's write locks: after the read lock is gone.
        for sub in gone {
            self.inner.remove_sub(sub.id, &sub.pattern);
        }
        blocked
    }

    /// [`deliver_broadcast`](Self::deliver_broadcast) to `targets`; also returns the
    /// subscriptions found gone, for the caller to remove.
    #[allow(clippy::type_complexity)]
    fn deliver_to(
        &self,
        targets: &Targets,
        message: Message,
    ) -> (Vec<(Arc<Sub>, Delivery)>, Vec<Arc<Sub>>) {
        let mut blocked: Vec<(Arc<Sub>, Delivery)> = Vec::new();
        let mut gone: Vec<Arc<Sub>> = Vec::new();
        if targets.is_empty() {
            return (blocked, gone);
        }
        let reply = self.reply_handle(&message);
        let message = Arc::new(message);
        let make = |m: Arc<Message>| match &reply {
            Some(bus) => Delivery::shared(m).with_reply_via(bus.clone()),
            None => Delivery::shared(m),
        };
        // The last solo subscriber takes the message's own reference: one reference-count
        // increment fewer per publish (the only one, with a single subscriber).
        let mut message = Some(message);
        let n = targets.solo.len();
        for (i, sub) in targets.solo.iter().enumerate() {
            let m = if i + 1 == n && targets.groups.is_empty() {
                message.take()
            } else {
                message.clone()
            };
            let Some(m) = m else { break };
            match sub.tx.try_send(make(m)) {
                TrySend::Queued | TrySend::Dropped => {}
                TrySend::Full(d) => blocked.push((sub.clone(), d)),
                TrySend::Closed(_) => gone.push(sub.clone()),
            }
        }
        let Some(message) = message else {
            return (blocked, gone);
        };
        for group in &targets.groups {
            let n = group.members.len();
            let start = group.next.fetch_add(1, Ordering::Relaxed);
            let mut delivery = Some(make(message.clone()));
            let mut first_full = None;
            for i in 0..n {
                let member = &group.members[(start + i) % n];
                let Some(d) = delivery.take() else { break };
                match member.tx.try_send(d) {
                    TrySend::Queued | TrySend::Dropped => {}
                    TrySend::Full(d) => {
                        first_full.get_or_insert(member);
                        delivery = Some(d);
                    }
                    TrySend::Closed(d) => {
                        gone.push(member.clone());
                        delivery = Some(d);
                    }
                }
            }
            // Every live member is full under `block`: wait for the first one tried.
            if let (Some(d), Some(member)) = (delivery, first_full) {
                blocked.push((member.clone(), d));
            }
        }
        (blocked, gone)
    }

    /// Waits for room in the full `block` queues, after every other subscriber was served:
    /// a full queue delays the publisher, never the other subscribers of this message.
    pub(super) async fn wait_blocked(&self, blocked: Vec<(Arc<Sub>, Delivery)>) -> Result<()> {
        for (sub, d) in blocked {
            if !sub.tx.send(d).await {
                // Ended by `close` while this publish waited: the message never got there.
                if self.inner.closed.load(Ordering::Acquire) {
                    return Err(self.closed_error());
                }
                self.inner.remove_sub(sub.id, &sub.pattern);
            }
        }
        Ok(())
    }

    pub(super) fn subscribe_broadcast(
        &self,
        pattern: Pattern,
        options: &SubscribeOptions,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        let (capacity, overflow) = options.queue(inner.config.queue);
        let (tx, sub) =
            Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Sub {
            id,
            pattern: pattern.clone(),
            group: options.group.as_deref().map(Arc::from),
            tx,
        });
        {
            let mut table = inner.table.write();
            // Checked under the lock `close` takes after setting the flag: a subscription
            // either sees the close or is ended by it.
            if inner.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            match pattern.as_topic() {
                Some(topic) => table.exact.entry(topic).or_default().push(entry),
                None => table.wild.push(entry),
            }
            inner.invalidate(&pattern);
        }
        Ok(sub.with_guard(SubGuard {
            inner: Arc::downgrade(inner),
            id,
            pattern,
            stream: false,
        }))
    }
}

impl Inner {
    /// The subscriptions `topic` goes to, from the cache or computed and cached.
    pub(super) fn targets(&self, topic: &Topic) -> Arc<Targets> {
        if let Some(t) = self.cache.read().get(topic.as_str()) {
            return t.clone();
        }
        // Computed and inserted under the table's read lock, so a concurrent subscription
        // change (which holds the write lock while invalidating) cannot be missed.
        let table = self.table.read();
        let targets = Arc::new(Targets::compute(&table, topic));
        let mut cache = self.cache.write();
        if cache.len() >= MAX_CACHED_TOPICS {
            cache.clear();
        }
        cache.insert(topic.clone(), targets.clone());
        targets
    }

    /// Forgets the cached decisions `pattern` can change. Called with the table write-locked.
    pub(super) fn invalidate(&self, pattern: &Pattern) {
        let mut cache = self.cache.write();
        match pattern.as_topic() {
            Some(topic) => {
                cache.remove(&topic);
            }
            None => cache.retain(|topic, _| !pattern.matches(topic)),
        }
    }

    pub(super) fn remove_sub(&self, id: u64, pattern: &Pattern) {
        let mut table = self.table.write();
        let removed = match pattern.as_topic() {
            Some(topic) => match table.exact.get_mut(&topic) {
                Some(subs) => {
                    let before = subs.len();
                    subs.retain(|s| s.id != id);
                    let removed = subs.len() != before;
                    if subs.is_empty() {
                        table.exact.remove(&topic);
                    }
                    removed
                }
                None => false,
            },
            None => {
                let before = table.wild.len();
                table.wild.retain(|s| s.id != id);
                table.wild.len() != before
            }
        };
        if removed {
            self.invalidate(pattern);
        }
    }
}
