//! The reader task: one blocking `XREADGROUP` (a group's reader) or `XREAD` (the group-less
//! reader) at a time over the keys of its subscriptions, handing entries out, and between
//! reads taking subscriptions in and out, finding new keys for wildcards, reclaiming idle
//! group entries and redelivering group-less ones past their ack timeout.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use busway::transport::Counters;
use busway::{Error, Pattern, Result};

use super::context::Ctx;
use super::entry::{entries, read_reply, text, Entry};
use super::group::{claim, create_group, deliver_group};
use super::groupless::{deliver_local, redeliver_local, Target};
use super::ids::StreamId;
use super::registry::{Join, NewMember, ReaderHandle};
use crate::connect::{is_connection_error, Con, ConnCount};
use crate::state::Shared;

/// How often a group reader whose queues are full looks for room again.
const ROOM_POLL: Duration = Duration::from_millis(20);

/// A reader connection (its read blocks up to `read_block`, so its response timeout is
/// longer) and its `CLIENT ID`.
pub(super) async fn connect(shared: &Shared) -> Result<(Con, u64)> {
    let read_timeout = shared.config.read_block + shared.config.response_timeout();
    let mut con = shared.connector.connect(Some(read_timeout), None).await?;
    let id: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .map_err(|e| shared.connector.error("CLIENT ID", e))?;
    Ok((con, id))
}

struct Member {
    id: u64,
    pattern: Pattern,
    target: Arc<Target>,
    capacity: usize,
    /// Keys it reads and (group-less) the id after which it takes their entries.
    keys: HashMap<Arc<str>, StreamId>,
}

pub(super) struct Task {
    ctx: Arc<Ctx>,
    handle: Arc<ReaderHandle>,
    members: Vec<Member>,
    /// The keys read, with (group-less) the last id read.
    keys: HashMap<Arc<str>, StreamId>,
    /// Per key, the members its entries go to (indices into `members`).
    routes: HashMap<Arc<str>, Vec<usize>>,
    /// Round-robin position within a group.
    turn: usize,
    /// Keys found to hold something other than a stream: never read.
    refused: HashSet<Arc<str>>,
    con: Option<(Con, ConnCount)>,
    attempt: u32,
    down: bool,
}

impl Task {
    /// The task of a reader started with its connection `con`.
    pub(super) fn new(ctx: Arc<Ctx>, handle: Arc<ReaderHandle>, con: Con) -> Task {
        let count = ConnCount::new(&ctx.shared.stats);
        Task {
            ctx,
            handle,
            members: Vec::new(),
            keys: HashMap::new(),
            routes: HashMap::new(),
            turn: 0,
            refused: HashSet::new(),
            con: Some((con, count)),
            attempt: 0,
            down: false,
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.ctx.shared
    }

    fn grouped(&self) -> Option<Arc<str>> {
        self.ctx.group.clone()
    }

    pub(super) async fn run(mut self) {
        let mut shutdown = self.shared().shutdown.subscribe();
        let rescan = self
            .shared()
            .config
            .rescan_interval
            .max(Duration::from_millis(10));
        let mut next_maintenance = Instant::now() + rescan;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let generation = self.handle.wanted.load(SeqCst);
            self.apply_inbox().await;
            if self.members.is_empty() && self.retire() {
                break;
            }
            self.handle.seen.store(generation, SeqCst);
            if self.con.is_none() {
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = self.reconnect() => {}
                }
                continue;
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + rescan;
                if let Err(e) = self.maintenance().await {
                    tracing::debug!(bus = %self.shared().config.bus, error = %e, "stream maintenance failed");
                }
                continue;
            }
            let until = next_maintenance.saturating_duration_since(Instant::now());
            if self.keys.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(until) => {}
                    _ = self.handle.notify.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let Some(count) = self.room() else {
                // The group's queues are full: what is not read stays in the stream for
                // the group's other consumers, or for this one once its queues have room
                // (the queues do not say when, so look again shortly).
                let wait = until.min(ROOM_POLL);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.handle.notify.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            };
            // A read never blocks past the next maintenance (wildcard rescan, reclaim).
            let block = self
                .shared()
                .config
                .read_block
                .as_millis()
                .min(until.as_millis())
                .max(1) as u64;
            let reply = tokio::select! {
                reply = self.read(count, block) => reply,
                _ = shutdown.changed() => continue,
            };
            match reply {
                Ok(v) => {
                    // Subscriptions that joined while the read was blocked take part in
                    // its entries (they may have been published after they subscribed).
                    self.apply_inbox().await;
                    self.dispatch(read_reply(v)).await;
                }
                Err(e) => self.read_failed(e).await,
            }
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.handle.client_id.store(0, SeqCst);
        self.mark_down(false);
        let group = self.grouped();
        let mut readers = self.ctx.streams.readers.lock();
        if readers
            .get(&group)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
        {
            readers.remove(&group);
        }
    }

    /// Leaves the registry when no subscription is left or joining; false when one is
    /// joining after all.
    fn retire(&mut self) -> bool {
        let group = self.grouped();
        let streams = self.ctx.streams.clone();
        let mut readers = streams.readers.lock();
        if !self.handle.inbox.lock().joins.is_empty() {
            return false;
        }
        if readers
            .get(&group)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
        {
            readers.remove(&group);
        }
        true
    }

    fn mark_down(&mut self, down: bool) {
        if down != self.down {
            self.down = down;
            if down {
                self.shared().readers_down.fetch_add(1, Relaxed);
            } else {
                self.shared().readers_down.fetch_sub(1, Relaxed);
            }
        }
    }

    fn lost(&mut self, e: Error) {
        if self.con.take().is_some() {
            tracing::warn!(bus = %self.shared().config.bus, error = %e, "stream reader connection lost");
        }
        self.handle.client_id.store(0, SeqCst);
        self.mark_down(true);
    }

    async fn reconnect(&mut self) {
        tokio::time::sleep(self.shared().connector.backoff(self.attempt)).await;
        match connect(self.shared()).await {
            Ok((con, id)) => {
                self.attempt = 0;
                self.handle.client_id.store(id, SeqCst);
                self.con = Some((con, ConnCount::new(&self.ctx.shared.stats)));
                self.mark_down(false);
                Counters::incr(&self.shared().stats.reconnects);
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                tracing::debug!(bus = %self.shared().config.bus, error = %e, "stream reader reconnect failed");
            }
        }
    }

    /// Takes in joining and leaving subscriptions and topics newly indexed by this process.
    async fn apply_inbox(&mut self) {
        let (joins, leaves, indexed) = {
            let mut inbox = self.handle.inbox.lock();
            (
                std::mem::take(&mut inbox.joins),
                std::mem::take(&mut inbox.leaves),
                std::mem::take(&mut inbox.indexed),
            )
        };
        let before = self.members.len();
        self.members
            .retain(|m| !leaves.contains(&m.id) && !m.target.tx.is_closed());
        let mut changed = self.members.len() != before;
        let mut retry = Vec::new();
        for join in joins {
            if join.member.tx.is_closed() || leaves.contains(&join.id) {
                continue;
            }
            match self.activate(join).await {
                Ok(()) => changed = true,
                Err((join, e)) => {
                    tracing::debug!(bus = %self.shared().config.bus, error = %e, "a stream subscription could not start reading yet; retrying");
                    retry.push(join);
                }
            }
        }
        if !retry.is_empty() {
            // Caught up later: positions move on meanwhile, so the catch-up covers more.
            self.handle.inbox.lock().joins.extend(retry);
        }
        if !indexed.is_empty() {
            let topics: Vec<String> = indexed.iter().map(|t| t.as_str().to_string()).collect();
            if let Err(e) = self.discover(topics).await {
                tracing::debug!(bus = %self.shared().config.bus, error = %e, "reading a newly indexed key failed; the rescan will retry");
            }
            changed = true;
        }
        if changed {
            self.rebuild();
        }
    }

    /// Starts reading for a joining subscription; group-less ones that start behind a key
    /// the reader is already past are caught up first.
    async fn activate(&mut self, join: Join) -> std::result::Result<(), (Join, Error)> {
        let Join { id, member } = join;
        let target = Arc::new(Target::new(member.tx, member.idle));
        let mut m = Member {
            id,
            pattern: member.pattern,
            target,
            capacity: member.capacity,
            keys: HashMap::new(),
        };
        let mut keys = member.keys.into_iter();
        while let Some((key, from)) = keys.next() {
            if self.refused.contains(&key) {
                continue;
            }
            match self.catch_up(&m, &key, from).await {
                Ok(from) => {
                    m.keys.insert(key.clone(), from);
                    self.keys.entry(key).or_insert(from);
                }
                Err((progress, e)) => {
                    // What was delivered is not delivered twice; what is left waits.
                    let keys = std::iter::once((key, progress))
                        .chain(keys)
                        .chain(m.keys)
                        .collect();
                    let member = NewMember {
                        pattern: m.pattern,
                        tx: m.target.tx.clone(),
                        capacity: m.capacity,
                        idle: m.target.idle,
                        keys,
                    };
                    return Err((Join { id, member }, e));
                }
            }
        }
        self.members.push(m);
        Ok(())
    }

    /// Group-less: delivers `key`'s entries after `from` up to where the reader is, to `m`
    /// alone; returns the id after which `m` takes the key's entries from the shared read.
    /// On failure, returns how far it got.
    async fn catch_up(
        &self,
        m: &Member,
        key: &Arc<str>,
        from: StreamId,
    ) -> std::result::Result<StreamId, (StreamId, Error)> {
        if self.ctx.group.is_some() {
            return Ok(StreamId::ZERO);
        }
        let Some(&until) = self.keys.get(key) else {
            return Ok(from);
        };
        let mut at = from;
        let count = self.shared().config.read_count.max(1);
        while at < until {
            let mut cmd = self.shared().cmd_connection().map_err(|e| (at, e))?;
            let reply: Value = redis::cmd("XRANGE")
                .arg(&**key)
                .arg(at.next().to_string())
                .arg(until.to_string())
                .arg("COUNT")
                .arg(count)
                .query_async(&mut cmd)
                .await
                .map_err(|e| (at, self.shared().connector.error("XRANGE", e)))?;
            let batch = entries(reply);
            let n = batch.len();
            for (id, fields) in batch {
                let Some(sid) = StreamId::parse(&id) else {
                    continue;
                };
                at = at.max(sid);
                match self.ctx.decode(key, fields) {
                    Ok(message) if !m.pattern.matches(&message.topic) => {}
                    Ok(message) => {
                        deliver_local(&self.ctx, &m.target, key, sid, Arc::new(message)).await;
                    }
                    Err(why) => self.ctx.undecodable(key, &id, &why),
                }
            }
            if n < count {
                break;
            }
        }
        Ok(until.max(from))
    }

    /// Rebuilds the read key set and the routes after subscriptions changed.
    fn rebuild(&mut self) {
        let mut wanted: HashSet<Arc<str>> = HashSet::new();
        for m in &self.members {
            wanted.extend(m.keys.keys().cloned());
        }
        self.keys.retain(|k, _| wanted.contains(k));
        for k in wanted {
            self.keys.entry(k).or_insert(StreamId::ZERO);
        }
        self.routes.clear();
        let grouped = self.ctx.group.is_some();
        for key in self.keys.keys() {
            let topic = self.ctx.topic_of(key);
            let to: Vec<usize> = self
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| {
                    if grouped {
                        // A group is one work queue: any member whose pattern matches.
                        m.keys.contains_key(key)
                            || topic.as_ref().is_some_and(|t| m.pattern.matches(t))
                    } else {
                        m.keys.contains_key(key)
                    }
                })
                .map(|(i, _)| i)
                .collect();
            self.routes.insert(key.clone(), to);
        }
        self.handle.wildcards.store(
            self.members.iter().any(|m| !m.pattern.is_literal()),
            Relaxed,
        );
    }

    /// Adds the keys of `topics` to the wildcard subscriptions that match them and do not
    /// read them yet, from their first entry (they had no busway entries when those
    /// subscriptions started).
    async fn discover(&mut self, topics: Vec<String>) -> Result<()> {
        let prefix = self.shared().config.key_prefix.clone();
        let mut changed = false;
        let mut result = Ok(());
        for t in topics {
            let key: Arc<str> = format!("{prefix}{t}").into();
            if self.refused.contains(&key) {
                continue;
            }
            for i in 0..self.members.len() {
                let m = &self.members[i];
                if m.pattern.is_literal() || m.keys.contains_key(&key) || !m.pattern.matches_str(&t)
                {
                    continue;
                }
                if let Some(group) = &self.ctx.group {
                    let created = match self.shared().cmd_connection() {
                        Ok(mut cmd) => create_group(&mut cmd, &key, group, "0")
                            .await
                            .map_err(|e| self.shared().connector.error("XGROUP CREATE", e)),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = created {
                        result = Err(e);
                        continue;
                    }
                }
                match self.catch_up(&self.members[i], &key, StreamId::ZERO).await {
                    Ok(from) => {
                        self.members[i].keys.insert(key.clone(), from);
                        self.keys.entry(key.clone()).or_insert(from);
                        changed = true;
                    }
                    // Not added: the next rescan catches it up from its first entry again
                    // (what was delivered may come twice; nothing is skipped).
                    Err((_, e)) => result = Err(e),
                }
            }
        }
        if changed {
            self.rebuild();
        }
        result
    }

    /// Finds new keys for wildcards; reclaims idle group entries, or redelivers group-less
    /// deliveries past their ack timeout.
    async fn maintenance(&mut self) -> Result<()> {
        let indexed = self.shared().layout.is_none();
        if indexed && self.members.iter().any(|m| !m.pattern.is_literal()) {
            let mut cmd = self.shared().cmd_connection()?;
            let all: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&self.shared().config.index_key)
                .query_async(&mut cmd)
                .await
                .map_err(|e| self.shared().connector.error("SMEMBERS", e))?;
            self.discover(all).await?;
        }
        match self.ctx.group.clone() {
            Some(group) => self.reclaim(&group).await,
            None => {
                self.sweep().await;
                Ok(())
            }
        }
    }

    /// Redelivers group-less deliveries unacked past their ack timeout.
    ///
    /// At most `read_count` per subscription per turn (each is read again from its stream),
    /// as the group reclaim takes at most `read_count` per key: a subscription that leaves
    /// many entries unacked (a dropping queue) does not stall the reader for long; the rest
    /// follow at the next turns.
    async fn sweep(&mut self) {
        let now = Instant::now();
        let count = self.shared().config.read_count.max(1);
        for i in 0..self.members.len() {
            let target = self.members[i].target.clone();
            let due: Vec<(Arc<str>, StreamId)> = target
                .unacked
                .lock()
                .iter()
                .filter(|(_, u)| u.due <= now)
                .map(|(k, _)| k.clone())
                .take(count)
                .collect();
            for (key, id) in due {
                redeliver_local(&self.ctx, &target, &key, id).await;
            }
        }
    }

    /// Claims the group's entries pending longer than the claim time in any consumer (a
    /// dead or slow one) and delivers them again.
    async fn reclaim(&mut self, group: &Arc<str>) -> Result<()> {
        let Some(idle) = self.members.iter().map(|m| m.target.idle).min() else {
            return Ok(());
        };
        let idle = idle.as_millis() as u64;
        let mut cmd = self.shared().cmd_connection()?;
        let count = self.shared().config.read_count;
        let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
        for key in keys {
            let pending: Value = redis::cmd("XPENDING")
                .arg(&*key)
                .arg(&**group)
                .arg("IDLE")
                .arg(idle)
                .arg("-")
                .arg("+")
                .arg(count)
                .query_async(&mut cmd)
                .await
                .map_err(|e| self.shared().connector.error("XPENDING", e))?;
            let Value::Array(rows) = pending else {
                continue;
            };
            for row in rows {
                let Value::Array(cols) = row else { continue };
                let mut cols = cols.into_iter();
                let (Some(id), _, _, Some(count)) =
                    (cols.next(), cols.next(), cols.next(), cols.next())
                else {
                    continue;
                };
                let (Some(id), Value::Int(count)) = (text(id), count) else {
                    continue;
                };
                let delivered = u32::try_from(count).unwrap_or(u32::MAX);
                if let Some((id, fields, attempt)) =
                    claim(&self.ctx, &mut cmd, &key, group, &id, idle, delivered).await?
                {
                    self.hand_to_group(&key, group, id, fields, attempt).await;
                }
            }
        }
        Ok(())
    }

    /// How many entries the next read may take: `read_count`, and for a group no more than
    /// its members' queues have room for (an entry a group consumer reads is its to
    /// deliver: it stays pending, in memory here, until a queue takes it). `None` when the
    /// group has no room at all.
    fn room(&self) -> Option<usize> {
        let count = self.shared().config.read_count.max(1);
        if self.ctx.group.is_none() {
            // Every entry goes to every member: a `block` queue makes the fan-out wait (one
            // read's worth held at most), a dropping queue drops by its policy.
            return Some(count);
        }
        let room: usize = self
            .members
            .iter()
            .filter(|m| !m.target.tx.is_closed())
            .map(|m| m.capacity.saturating_sub(m.target.tx.len()))
            .sum();
        (room > 0).then_some(room.min(count))
    }

    async fn read(&mut self, count: usize, block: u64) -> redis::RedisResult<Value> {
        let mut cmd = match &self.ctx.group {
            Some(group) => {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP").arg(&**group).arg(&self.ctx.consumer);
                cmd
            }
            None => redis::cmd("XREAD"),
        };
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS");
        let keys: Vec<(&Arc<str>, &StreamId)> = self.keys.iter().collect();
        for (key, _) in &keys {
            cmd.arg(&***key);
        }
        for (_, id) in &keys {
            match self.ctx.group {
                Some(_) => cmd.arg(">"),
                None => cmd.arg(id.to_string()),
            };
        }
        let Some((con, _)) = self.con.as_mut() else {
            return Ok(Value::Nil);
        };
        cmd.query_async(con).await
    }

    async fn read_failed(&mut self, e: redis::RedisError) {
        if is_connection_error(&e) {
            let e = self.shared().connector.error("stream read", e);
            self.lost(e);
            return;
        }
        if let (Some(group), Some("NOGROUP")) = (self.ctx.group.clone(), e.code()) {
            // The server lost the group (restarted without persistence, or the key was
            // deleted): recreate it; entries now in the key were written after the loss.
            if let Ok(mut cmd) = self.shared().cmd_connection() {
                let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
                for key in keys {
                    let _ = create_group(&mut cmd, &key, &group, "0").await;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
        Counters::incr(&self.shared().stats.errors);
        let wrong_type = e.code() == Some("WRONGTYPE");
        tracing::warn!(bus = %self.shared().config.bus, error = %self.shared().connector.error("stream read", e), "stream read failed");
        if wrong_type {
            // One key that is not a stream (written by something else) fails the whole
            // read: stop reading it, so the other keys go on.
            self.refuse_foreign_keys().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
        tokio::time::sleep(self.shared().connector.backoff(3)).await;
    }

    /// Stops reading the keys that hold something other than a stream.
    async fn refuse_foreign_keys(&mut self) {
        let Ok(mut cmd) = self.shared().cmd_connection() else {
            return;
        };
        let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("TYPE").arg(&**key);
        }
        let Ok(types) = pipe.query_async::<Vec<String>>(&mut cmd).await else {
            return;
        };
        for (key, kind) in keys.into_iter().zip(types) {
            if kind == "stream" || kind == "none" {
                continue;
            }
            tracing::warn!(bus = %self.shared().config.bus, key = &*key, kind, "not reading a key that is not a stream");
            for m in &mut self.members {
                m.keys.remove(&key);
            }
            self.refused.insert(key);
        }
        self.rebuild();
    }

    /// Hands each entry read to its subscription(s).
    async fn dispatch(&mut self, read: Vec<(String, Vec<Entry>)>) {
        for (key, batch) in read {
            let Some((key, _)) = self.keys.get_key_value(key.as_str()) else {
                continue; // no longer read (group entries left are claimed after the claim time)
            };
            let key = key.clone();
            match self.ctx.group.clone() {
                Some(group) => {
                    for (id, fields) in batch {
                        self.hand_to_group(&key, &group, id, fields, 1).await;
                    }
                }
                None => self.fan_out(&key, batch).await,
            }
        }
    }

    /// One group entry to one matching subscription, in turn. With none left (they went
    /// away meanwhile) it stays pending and is claimed after the claim time.
    async fn hand_to_group(
        &mut self,
        key: &Arc<str>,
        group: &Arc<str>,
        id: String,
        fields: Vec<Value>,
        attempt: u32,
    ) {
        let Some(to) = self.routes.get(key) else {
            return;
        };
        self.turn = self.turn.wrapping_add(1);
        let (n, turn, members) = (to.len(), self.turn, &self.members);
        // A closed member's queue refuses the entry and the next one in turn gets it.
        let in_turn = (0..n).map(|k| {
            let m = &members[to[(turn + k) % n]];
            (&m.target.tx, Some(&m.pattern))
        });
        deliver_group(&self.ctx, key, group, id, fields, attempt, in_turn).await;
    }

    /// Every entry to every group-less subscription reading the key past where it started.
    async fn fan_out(&mut self, key: &Arc<str>, batch: Vec<Entry>) {
        let targets: Vec<(Arc<Target>, StreamId, Pattern)> = match self.routes.get(key) {
            Some(to) => to
                .iter()
                .filter_map(|&i| {
                    let m = &self.members[i];
                    Some((m.target.clone(), *m.keys.get(key)?, m.pattern.clone()))
                })
                .collect(),
            None => Vec::new(),
        };
        for (id, fields) in batch {
            let Some(sid) = StreamId::parse(&id) else {
                self.ctx.undecodable(key, &id, "the entry id is not ms-seq");
                continue;
            };
            if let Some(at) = self.keys.get_mut(key) {
                *at = (*at).max(sid);
            }
            if !targets.iter().any(|(_, from, _)| sid > *from) {
                continue;
            }
            let message = match self.ctx.decode(key, fields) {
                Ok(m) => Arc::new(m),
                Err(why) => {
                    self.ctx.undecodable(key, &id, &why);
                    continue;
                }
            };
            // Under a layout a key holds many topics: each subscription takes its own.
            for (target, from, pattern) in &targets {
                if sid > *from && pattern.matches(&message.topic) {
                    deliver_local(&self.ctx, target, key, sid, message.clone()).await;
                }
            }
        }
    }
}
