//! Consumer-group deliveries: handing an entry to one subscription of the group, acking it
//! (`XACK`, batched), nacking and reclaiming it (`XCLAIM`), dead-lettering it past
//! `max_deliveries`.

use std::any::Any;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use busway::transport::{ack_each, Acker, Counters, QueueSender, TransportDelivery, TrySend};
use busway::{Delivery, Pattern, Result};

use super::ack;
use super::context::Ctx;
use super::entry::entries;
use crate::connect::Con;

/// Acks and nacks an entry of a consumer group.
pub(super) struct GroupAcker {
    ctx: Arc<Ctx>,
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    /// The subscription a nacked entry goes back to.
    tx: QueueSender,
    /// Its token in `StreamState::held` once queued (0: not queued, or settled).
    held: Arc<std::sync::atomic::AtomicU64>,
    attempt: u32,
}

/// A group entry this consumer holds in a subscription's queue.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    attempt: u32,
}

/// How idle a handed-back entry is made to look: older than any sane claim time, so the
/// group's next reclaim (any member's, every `rescan_interval`) takes it at once.
const HANDED_BACK_IDLE_MS: u64 = 30 * 24 * 3600 * 1000;

/// Hands entries back to their group: `XCLAIM ... IDLE <long ago> RETRYCOUNT <attempt - 1>
/// JUSTID` keeps them pending (nothing is lost if no one else is there) but makes them look
/// abandoned, and sets their delivery count back to what it was before this consumer read
/// them, so the handler that gets them next sees the attempt number this consumer's
/// handler would have seen (it never saw them).
pub(super) async fn hand_back(shared: &crate::state::Shared, cmd: &mut Con, held: &[Held]) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for h in held {
        pipe.cmd("XCLAIM")
            .arg(&*h.key)
            .arg(&*h.group)
            .arg("busway-handed-back")
            .arg(0)
            .arg(&h.id)
            .arg("IDLE")
            .arg(HANDED_BACK_IDLE_MS)
            .arg("RETRYCOUNT")
            .arg(h.attempt.saturating_sub(1))
            .arg("JUSTID");
    }
    match pipe.query_async::<Vec<Value>>(cmd).await {
        Ok(_) => {
            tracing::debug!(bus = %shared.config.bus, entries = held.len(), "handed unread group entries back")
        }
        Err(e) => {
            tracing::debug!(bus = %shared.config.bus, error = %shared.connector.error("XCLAIM", e), "handing entries back failed; they are claimed after the claim time")
        }
    }
}

impl GroupAcker {
    /// Forgets the entry in `held` (it is settled or gone); whether it was there.
    fn unhold(&self) -> bool {
        let token = self.held.swap(0, Relaxed);
        token != 0 && self.ctx.streams.held.lock().remove(&token).is_some()
    }
}

impl Drop for GroupAcker {
    fn drop(&mut self) {
        // Dropped unsettled with its subscription gone: the entry was in the queue and no
        // handler saw it (or its handler outlived the subscription). Hand it back now.
        // (Dropped with the subscription still there, by an overflow policy or a handler
        // that did not ack: it is claimed after the claim time, as before.)
        if !self.unhold() || !self.tx.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(mut cmd) = self.ctx.shared.cmd_connection() else {
            return;
        };
        let shared = self.ctx.shared.clone();
        let held = [Held {
            key: self.key.clone(),
            group: self.group.clone(),
            id: self.id.clone(),
            attempt: self.attempt,
        }];
        runtime.spawn(async move { hand_back(&shared, &mut cmd, &held).await });
    }
}

impl fmt::Debug for GroupAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupAcker")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl Acker for GroupAcker {
    async fn ack(&self) -> Result<()> {
        self.unhold();
        ack::ack(&self.ctx.streams.acks, &self.key, &self.group, &self.id).await?;
        Counters::incr(&self.ctx.shared.stats.acked);
        Ok(())
    }

    /// The group entries of this bus go out in one pipeline (one `XACK` per key and
    /// group); the other ackers are passed on.
    async fn ack_with(&self, others: &[&dyn Acker]) -> Result<()> {
        let mut entries = Vec::with_capacity(others.len() + 1);
        let mut rest = Vec::new();
        for &a in std::iter::once(&(self as &dyn Acker)).chain(others) {
            let any: &dyn Any = a;
            match any
                .downcast_ref::<GroupAcker>()
                .filter(|g| Arc::ptr_eq(&g.ctx.shared, &self.ctx.shared))
            {
                Some(g) => {
                    g.unhold();
                    entries.push((&g.key, &g.group, g.id.as_str()))
                }
                None => rest.push(a),
            }
        }
        let n = entries.len() as u64;
        let (mine, theirs) = futures::join!(
            ack::ack_batch(&self.ctx.streams.acks, entries),
            ack_each(&rest)
        );
        if mine.is_ok() {
            self.ctx.shared.stats.acked.fetch_add(n, Relaxed);
        }
        mine.and(theirs)
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.unhold();
        Counters::incr(&self.ctx.shared.stats.nacked);
        let (ctx, key, group, id, tx) = (
            self.ctx.clone(),
            self.key.clone(),
            self.group.clone(),
            self.id.clone(),
            self.tx.clone(),
        );
        tokio::spawn(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Err(e) = nack_group(&ctx, &key, &group, &id, &tx).await {
                tracing::debug!(bus = %ctx.shared.config.bus, error = %e, "nack redelivery failed; the entry will be claimed after the claim time");
            }
        });
        Ok(())
    }
}

/// Claims a nacked entry back for this consumer (its delivery count goes up) and delivers
/// it again to the subscription that nacked it, or dead-letters it.
async fn nack_group(
    ctx: &Arc<Ctx>,
    key: &Arc<str>,
    group: &Arc<str>,
    id: &str,
    tx: &QueueSender,
) -> Result<()> {
    let mut cmd = ctx.shared.cmd_connection()?;
    // The delivery count before this claim.
    let delivered = pending_count(&mut cmd, key, group, id).await.unwrap_or(1);
    if let Some((id, fields, attempt)) = claim(ctx, &mut cmd, key, group, id, 0, delivered).await? {
        deliver_group(
            ctx,
            key,
            group,
            id,
            fields,
            attempt,
            std::iter::once((tx, None)),
        )
        .await;
    }
    Ok(())
}

/// `XCLAIM`s one entry for this consumer; past `max_deliveries` publishes it to the
/// dead-letter topic and acks it. Returns the entry to deliver again, with its attempt.
pub(super) async fn claim(
    ctx: &Ctx,
    cmd: &mut Con,
    key: &str,
    group: &str,
    id: &str,
    min_idle: u64,
    delivered: u32,
) -> Result<Option<(String, Vec<Value>, u32)>> {
    let reply: Value = redis::cmd("XCLAIM")
        .arg(key)
        .arg(group)
        .arg(&ctx.consumer)
        .arg(min_idle)
        .arg(id)
        .query_async(cmd)
        .await
        .map_err(|e| ctx.shared.connector.error("XCLAIM", e))?;
    let Some((id, fields)) = entries(reply).into_iter().next() else {
        return Ok(None);
    };
    if ctx.exhausted(delivered) {
        ctx.dead_letter(key, ctx.decode(key, fields).ok(), delivered)
            .await?;
        redis::cmd("XACK")
            .arg(key)
            .arg(group)
            .arg(&id)
            .exec_async(cmd)
            .await
            .map_err(|e| ctx.shared.connector.error("XACK", e))?;
        return Ok(None);
    }
    Ok(Some((id, fields, delivered.saturating_add(1))))
}

/// Decodes and queues one group entry for the first of `to` (subscriptions in turn order,
/// with the pattern the entry's topic must match, if any) with room, or, when every queue is
/// full, waits for the first that is open; an undecodable entry is counted and acked, so it
/// never blocks the group or comes back. Preferring a queue with room means one slow
/// subscription of a group does not hold up the entries its group mates could take.
///
/// Under a layout a key holds many topics and the group reads all its entries, as the
/// platform's own consumers do: an entry whose topic none of the group's subscriptions in
/// this process matches is acked and counted in `dropped`.
pub(super) async fn deliver_group<'a>(
    ctx: &Arc<Ctx>,
    key: &Arc<str>,
    group: &Arc<str>,
    id: String,
    fields: Vec<Value>,
    attempt: u32,
    to: impl Iterator<Item = (&'a QueueSender, Option<&'a Pattern>)> + Clone,
) {
    let settle = |why: &str| {
        let (key, group, id) = (key.clone(), group.clone(), id.clone());
        let cmd = ctx.shared.cmd_connection();
        tracing::debug!(bus = %ctx.shared.config.bus, key = &*key, id, why, "acked a stream entry without delivering it");
        async move {
            if let Ok(mut cmd) = cmd {
                let _: redis::RedisResult<()> = redis::cmd("XACK")
                    .arg(&*key)
                    .arg(&*group)
                    .arg(&id)
                    .query_async(&mut cmd)
                    .await;
            }
        }
    };
    let message = match ctx.decode(key, fields) {
        Ok(message) => Arc::new(message),
        Err(why) => {
            ctx.undecodable(key, &id, &why);
            settle(&why).await;
            return;
        }
    };
    let to = to
        .filter(|(_, p)| p.is_none_or(|p| p.matches(&message.topic)))
        .map(|(tx, _)| tx);
    if to.clone().next().is_none() {
        busway::transport::Counters::incr(&ctx.shared.stats.dropped);
        settle("no subscription of the group matches its topic").await;
        return;
    }
    let delivery = |tx: &QueueSender, cell: &Arc<std::sync::atomic::AtomicU64>| {
        let acker = GroupAcker {
            ctx: ctx.clone(),
            key: key.clone(),
            group: group.clone(),
            id: id.clone(),
            tx: tx.clone(),
            held: cell.clone(),
            attempt,
        };
        Delivery::shared(message.clone())
            .with_attempt(attempt)
            .with_acker(Box::new(acker))
            .with_reply_via_if_request(&ctx.via)
    };
    // Remembered once queued, for the hand-back. (An ack racing this only leaves a settled
    // entry in `held`, which the hand-back on close skips: it is no longer pending.)
    let queued = |tx: &QueueSender, cell: &Arc<std::sync::atomic::AtomicU64>| {
        let token = ctx.streams.next_held.fetch_add(1, Relaxed) + 1;
        ctx.streams.held.lock().insert(
            token,
            Held {
                key: key.clone(),
                group: group.clone(),
                id: id.clone(),
                attempt,
            },
        );
        cell.store(token, Relaxed);
        if attempt > 1 {
            ctx.redelivered(tx);
        }
    };
    for tx in to.clone() {
        let cell = Arc::default();
        match tx.try_send(delivery(tx, &cell)) {
            TrySend::Queued => return queued(tx, &cell),
            // An overflow policy dropped one: not tracked, claimed after the claim time.
            TrySend::Dropped => {
                if attempt > 1 {
                    ctx.redelivered(tx);
                }
                return;
            }
            TrySend::Full(_) | TrySend::Closed(_) => {}
        }
    }
    for tx in to {
        let cell = Arc::default();
        if tx.send(delivery(tx, &cell)).await {
            return queued(tx, &cell);
        }
    }
    // Every subscription went away: hand the entry back so another consumer takes it at
    // its next reclaim (without a connection it stays pending and is claimed after the
    // claim time).
    if let Ok(mut cmd) = ctx.shared.cmd_connection() {
        let held = [Held {
            key: key.clone(),
            group: group.clone(),
            id: id.clone(),
            attempt,
        }];
        hand_back(&ctx.shared, &mut cmd, &held).await;
    }
}

/// Creates `group` on `key` at `start` (`$` or `0`), creating the stream too; an existing
/// group is left as it is.
pub(super) async fn create_group(
    con: &mut Con,
    key: &str,
    group: &str,
    start: &str,
) -> redis::RedisResult<()> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// How many times entry `id` of `key` was delivered in `group`.
async fn pending_count(cmd: &mut Con, key: &str, group: &str, id: &str) -> Option<u32> {
    let v: Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(cmd)
        .await
        .ok()?;
    let Value::Array(rows) = v else { return None };
    let Value::Array(cols) = rows.into_iter().next()? else {
        return None;
    };
    match cols.into_iter().nth(3)? {
        Value::Int(n) => Some(n as u32),
        _ => None,
    }
}
