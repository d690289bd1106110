//! Stream mode: a per-topic log, consumer groups fed from cursors, pending until acked.

use super::*;

#[derive(Default)]
pub(super) struct StreamState {
    /// Sequence across all topics: orders "published after the group was created".
    pub(super) next_gseq: u64,
    pub(super) logs: HashMap<Topic, Log>,
    pub(super) groups: HashMap<u64, Group>,
    pub(super) named: HashMap<Arc<str>, u64>,
}

/// One topic's retained entries; `base` is the topic sequence of `entries[0]`.
#[derive(Default)]
pub(super) struct Log {
    pub(super) base: u64,
    pub(super) entries: VecDeque<(u64, Message)>,
}

impl Log {
    pub(super) fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    pub(super) fn get(&self, seq: u64) -> Option<&Message> {
        let at = seq.checked_sub(self.base)?;
        self.entries.get(at as usize).map(|(_, m)| m)
    }
}

/// A consumer group (named, or the private group of one subscription without a group).
pub(super) struct Group {
    /// Entries with a global sequence below this are not for the group.
    pub(super) start_gseq: u64,
    pub(super) members: Vec<Member>,
    pub(super) next: usize,
    pub(super) cursors: HashMap<Topic, Cursor>,
    /// Private groups die with their only member; named groups keep their cursors.
    pub(super) private: bool,
}

pub(super) struct Member {
    pub(super) id: u64,
    pub(super) pattern: Pattern,
    pub(super) tx: QueueSender,
    pub(super) ack_timeout: Duration,
    /// A delivery is waiting for room in this member's `block` queue.
    pub(super) stalled: bool,
}

#[derive(Default)]
pub(super) struct Cursor {
    /// The next topic sequence to hand out.
    pub(super) next: u64,
    pub(super) pending: BTreeMap<u64, Pending>,
}

pub(super) struct Pending {
    pub(super) attempt: u32,
    pub(super) due: Instant,
    pub(super) member: u64,
}

pub(super) struct MemAcker {
    pub(super) inner: Weak<Inner>,
    pub(super) group: u64,
    pub(super) topic: Topic,
    pub(super) seq: u64,
    pub(super) attempt: u32,
}

impl fmt::Debug for MemAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemAcker")
            .field("topic", &self.topic)
            .field("seq", &self.seq)
            .field("attempt", &self.attempt)
            .finish()
    }
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(&self) -> Result<()> {
        if let Some(inner) = self.inner.upgrade() {
            let mut st = inner.stream.lock();
            if let Some(c) = st
                .groups
                .get_mut(&self.group)
                .and_then(|g| g.cursors.get_mut(&self.topic))
            {
                if c.pending.remove(&self.seq).is_some() {
                    Counters::incr(&inner.stats.acked);
                }
            }
        }
        Ok(())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let mut st = inner.stream.lock();
        let Some(p) = st
            .groups
            .get_mut(&self.group)
            .and_then(|g| g.cursors.get_mut(&self.topic))
            .and_then(|c| c.pending.get_mut(&self.seq))
        else {
            return Ok(());
        };
        // A nack of an older attempt (already redelivered) changes nothing.
        if p.attempt != self.attempt {
            return Ok(());
        }
        Counters::incr(&inner.stats.nacked);
        p.due = Instant::now() + delay.unwrap_or_default();
        match delay {
            None => {
                inner.redeliver_due(&mut st, Instant::now());
            }
            Some(_) => inner.timer.notify_one(),
        }
        Ok(())
    }
}

impl MemoryBus {
    pub(super) fn publish_stream(&self, message: Message) {
        let inner = &*self.inner;
        let mut st = inner.stream.lock();
        let gseq = st.next_gseq;
        st.next_gseq += 1;
        let topic = message.topic.clone();
        let log = st.logs.entry(topic.clone()).or_default();
        log.entries.push_back((gseq, message));
        if log.entries.len() > inner.config.retain {
            log.entries.pop_front();
            log.base += 1;
        }
        let st = &mut *st;
        for (&gid, group) in st.groups.iter_mut() {
            if group.members.iter().any(|m| m.pattern.matches(&topic)) {
                inner.pump(&st.logs, gid, group, &topic);
            }
        }
    }

    pub(super) fn subscribe_stream(
        &self,
        pattern: Pattern,
        options: &SubscribeOptions,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        inner.start_timer();
        let (capacity, overflow) = options.queue(inner.config.queue);
        let (tx, sub) =
            Subscription::channel(pattern.clone(), capacity, overflow, inner.stats.clone());
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let member = Member {
            id,
            pattern: pattern.clone(),
            tx,
            ack_timeout: options.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT),
            stalled: false,
        };
        {
            let mut st = inner.stream.lock();
            if inner.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            let st = &mut *st;
            let start_gseq = match options.start {
                StartFrom::New => st.next_gseq,
                StartFrom::Beginning => 0,
            };
            let new_group = |private| Group {
                start_gseq,
                members: Vec::new(),
                next: 0,
                cursors: HashMap::new(),
                private,
            };
            let gid = match &options.group {
                Some(name) => match st.named.get(name.as_str()) {
                    Some(&gid) => gid,
                    None => {
                        st.named.insert(name.as_str().into(), id);
                        st.groups.insert(id, new_group(false));
                        id
                    }
                },
                None => {
                    st.groups.insert(id, new_group(true));
                    id
                }
            };
            let group = st.groups.get_mut(&gid).expect("group just found or made");
            group.members.push(member);
            // Retained entries (a replay, or what a named group has not consumed yet) and
            // pending entries nobody could take before.
            let topics: Vec<Topic> = st
                .logs
                .keys()
                .filter(|t| pattern.matches(t))
                .cloned()
                .collect();
            for topic in topics {
                inner.pump(&st.logs, gid, group, &topic);
            }
            inner.redeliver_due(st, Instant::now());
        }
        Ok(sub.with_guard(SubGuard {
            inner: Arc::downgrade(inner),
            id,
            pattern,
            stream: true,
        }))
    }
}

impl Inner {
    /// Hands the group's next entries of `topic` to its members until they run out or every
    /// matching member is stalled.
    pub(super) fn pump(
        &self,
        logs: &HashMap<Topic, Log>,
        gid: u64,
        group: &mut Group,
        topic: &Topic,
    ) {
        let Some(log) = logs.get(topic) else { return };
        let cursor = group.cursors.entry(topic.clone()).or_insert_with(|| {
            let skip = log.entries.partition_point(|(g, _)| *g < group.start_gseq);
            Cursor {
                next: log.base + skip as u64,
                pending: BTreeMap::new(),
            }
        });
        if cursor.next < log.base {
            // Trimmed before this group read them: lost to it.
            let lost = log.base - cursor.next;
            self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
            cursor.next = log.base;
        }
        while cursor.next < log.end() {
            let Some(mi) = pick_member(&group.members, &mut group.next, topic) else {
                return;
            };
            let seq = cursor.next;
            cursor.next += 1;
            let message = log.get(seq).expect("seq within the log").clone();
            let member = &mut group.members[mi];
            cursor.pending.insert(
                seq,
                Pending {
                    attempt: 1,
                    due: Instant::now() + member.ack_timeout,
                    member: member.id,
                },
            );
            let d = self.stream_delivery(message, gid, topic, seq, 1);
            self.offer(gid, member, d);
        }
    }

    pub(super) fn stream_delivery(
        &self,
        message: Message,
        gid: u64,
        topic: &Topic,
        seq: u64,
        attempt: u32,
    ) -> Delivery {
        // A strong handle only for requests; it lives as long as the delivery.
        let reply = match message.headers.reply_to {
            Some(_) => self
                .me
                .upgrade()
                .map(|inner| Arc::new(MemoryBus { inner }) as Arc<dyn Bus>),
            None => None,
        };
        let mut d = Delivery::new(message)
            .with_attempt(attempt)
            .with_acker(Box::new(MemAcker {
                inner: self.me.clone(),
                group: gid,
                topic: topic.clone(),
                seq,
                attempt,
            }));
        if let Some(bus) = reply {
            d = d.with_reply_via(bus);
        }
        d
    }

    /// Queues `d` to `member`; a full `block` queue stalls the member and a task waits for
    /// room, so the bus lock is never held across a wait.
    pub(super) fn offer(&self, gid: u64, member: &mut Member, d: Delivery) {
        match member.tx.try_send(d) {
            TrySend::Queued | TrySend::Dropped | TrySend::Closed(_) => {
                // A closed member is removed by its guard; its pending entries are then
                // redelivered to the others.
            }
            TrySend::Full(d) => {
                member.stalled = true;
                let tx = member.tx.clone();
                let id = member.id;
                let weak = self.me.clone();
                tokio::spawn(async move {
                    let sent = tx.send(d).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let mut st = inner.stream.lock();
                    let st = &mut *st;
                    let Some(group) = st.groups.get_mut(&gid) else {
                        return;
                    };
                    if let Some(m) = group.members.iter_mut().find(|m| m.id == id) {
                        m.stalled = false;
                    }
                    let _ = sent;
                    let topics: Vec<Topic> = group.cursors.keys().cloned().collect();
                    for topic in topics {
                        inner.pump(&st.logs, gid, group, &topic);
                    }
                    inner.redeliver_due(st, Instant::now());
                });
            }
        }
    }

    /// Entries that groups with members have not handed to one yet: behind a cursor, or
    /// waiting for room in a stalled member's queue.
    fn undelivered(&self) -> u64 {
        let st = self.stream.lock();
        let mut left = 0;
        for group in st.groups.values().filter(|g| !g.members.is_empty()) {
            left += group.members.iter().filter(|m| m.stalled).count() as u64;
            for (topic, cursor) in &group.cursors {
                if let Some(log) = st.logs.get(topic) {
                    left += log.end().saturating_sub(cursor.next.max(log.base));
                }
            }
        }
        left
    }

    /// On `close` (publishes already refused): lets subscribers take what their groups still
    /// owe them, up to `close_timeout`; what is left then is counted in `dropped`.
    pub(super) async fn drain_stream(&self) {
        let deadline = Instant::now() + self.config.close_timeout;
        loop {
            let left = self.undelivered();
            if left == 0 {
                return;
            }
            if Instant::now() >= deadline {
                self.stats.dropped.fetch_add(left, Ordering::Relaxed);
                tracing::warn!(
                    bus = &*self.name,
                    undelivered = left,
                    "closing a stream bus whose subscribers did not take every entry in time"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Delivers again every pending entry whose time has come; returns the next due time.
    pub(super) fn redeliver_due(&self, st: &mut StreamState, now: Instant) -> Option<Instant> {
        let mut next_due: Option<Instant> = None;
        let logs = &st.logs;
        for (&gid, group) in st.groups.iter_mut() {
            for (topic, cursor) in group.cursors.iter_mut() {
                let log = logs.get(topic);
                let due: Vec<u64> = cursor
                    .pending
                    .iter()
                    .filter(|(_, p)| p.due <= now)
                    .map(|(&seq, _)| seq)
                    .collect();
                for seq in due {
                    let Some(message) = log.and_then(|l| l.get(seq)).cloned() else {
                        // Trimmed from the log: it cannot come back.
                        cursor.pending.remove(&seq);
                        Counters::incr(&self.stats.dropped);
                        continue;
                    };
                    let Some(mi) = pick_member(&group.members, &mut group.next, topic) else {
                        break;
                    };
                    let member = &mut group.members[mi];
                    let p = cursor.pending.get_mut(&seq).expect("listed above");
                    p.attempt += 1;
                    p.due = now + member.ack_timeout;
                    p.member = member.id;
                    let attempt = p.attempt;
                    Counters::incr(&self.stats.redelivered);
                    Counters::incr(&member.tx.stats().redelivered);
                    let d = self.stream_delivery(message, gid, topic, seq, attempt);
                    self.offer(gid, member, d);
                }
                for p in cursor.pending.values() {
                    if p.due > now {
                        next_due = Some(next_due.map_or(p.due, |n| n.min(p.due)));
                    }
                }
            }
        }
        next_due
    }

    pub(super) fn remove_member(&self, id: u64) {
        let mut st = self.stream.lock();
        let st = &mut *st;
        let Some((&gid, group)) = st
            .groups
            .iter_mut()
            .find(|(_, g)| g.members.iter().any(|m| m.id == id))
        else {
            return;
        };
        group.members.retain(|m| m.id != id);
        if group.private {
            st.groups.remove(&gid);
            return;
        }
        // What the member held unacked goes to the others now rather than after its timeout.
        let now = Instant::now();
        for cursor in group.cursors.values_mut() {
            for p in cursor.pending.values_mut() {
                if p.member == id {
                    p.due = now;
                }
            }
        }
        self.redeliver_due(st, now);
    }

    pub(super) fn start_timer(self: &Arc<Inner>) {
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let notify = self.timer.clone();
        tokio::spawn(async move {
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (next, tick) = {
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.closed.load(Ordering::Acquire) {
                        return;
                    }
                    let mut st = inner.stream.lock();
                    let next = inner.redeliver_due(&mut st, Instant::now());
                    // Entries handed out after this scan do not wake us: re-scan often enough
                    // that the shortest ack timeout is honoured within a quarter of itself.
                    let shortest = st
                        .groups
                        .values()
                        .flat_map(|g| g.members.iter().map(|m| m.ack_timeout))
                        .min()
                        .unwrap_or(DEFAULT_ACK_TIMEOUT);
                    let tick =
                        (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    (next, tick)
                };
                let wake = Instant::now() + tick;
                let wake = next.map_or(wake, |n| n.min(wake));
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = notified => {}
                }
            }
        });
    }
}

/// The next live, unstalled member matching `topic`, round-robin.
pub(super) fn pick_member(members: &[Member], next: &mut usize, topic: &Topic) -> Option<usize> {
    let n = members.len();
    for i in 0..n {
        let at = (*next + i) % n;
        let m = &members[at];
        if !m.stalled && m.pattern.matches(topic) && !m.tx.is_closed() {
            *next = at + 1;
            return Some(at);
        }
    }
    None
}
