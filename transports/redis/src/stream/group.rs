//! Consumer-group deliveries: handing an entry to one subscription of the group, acking it
//! (`XACK`, batched), nacking and reclaiming it (`XCLAIM`), dead-lettering it past
//! `max_deliveries`.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::Value;

use busway::transport::{ack_each, Acker, QueueSender, TransportDelivery, TrySend};
use busway::{Delivery, Result};

use super::ack;
use super::context::Ctx;
use super::entry::entries;

/// Acks and nacks an entry of a consumer group.
pub(super) struct GroupAcker {
    ctx: Arc<Ctx>,
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    /// The subscription a nacked entry goes back to.
    tx: QueueSender,
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
        ack::ack(&self.ctx.streams.acks, &self.key, &self.group, &self.id).await
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
                Some(g) => entries.push((&g.key, &g.group, g.id.as_str())),
                None => rest.push(a),
            }
        }
        let (mine, theirs) = futures::join!(
            ack::ack_batch(&self.ctx.streams.acks, entries),
            ack_each(&rest)
        );
        mine.and(theirs)
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
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
        deliver_group(ctx, key, group, id, fields, attempt, std::iter::once(tx)).await;
    }
    Ok(())
}

/// `XCLAIM`s one entry for this consumer; past `max_deliveries` publishes it to the
/// dead-letter topic and acks it. Returns the entry to deliver again, with its attempt.
pub(super) async fn claim(
    ctx: &Ctx,
    cmd: &mut MultiplexedConnection,
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

/// Decodes and queues one group entry for the first of `to` (subscriptions in turn order)
/// with room, or, when every queue is full, waits for the first that is open; an
/// undecodable entry is counted and acked, so it never blocks the group or comes back.
/// Preferring a queue with room means one slow subscription of a group does not hold up
/// the entries its group mates could take.
pub(super) async fn deliver_group<'a>(
    ctx: &Arc<Ctx>,
    key: &Arc<str>,
    group: &Arc<str>,
    id: String,
    fields: Vec<Value>,
    attempt: u32,
    to: impl Iterator<Item = &'a QueueSender> + Clone,
) {
    let message = match ctx.decode(key, fields) {
        Ok(message) => Arc::new(message),
        Err(why) => {
            ctx.undecodable(key, &id, &why);
            if let Ok(mut cmd) = ctx.shared.cmd_connection() {
                let _: redis::RedisResult<()> = redis::cmd("XACK")
                    .arg(&**key)
                    .arg(&**group)
                    .arg(&id)
                    .query_async(&mut cmd)
                    .await;
            }
            return;
        }
    };
    let delivery = |tx: &QueueSender| {
        let acker = GroupAcker {
            ctx: ctx.clone(),
            key: key.clone(),
            group: group.clone(),
            id: id.clone(),
            tx: tx.clone(),
        };
        Delivery::shared(message.clone())
            .with_attempt(attempt)
            .with_acker(Box::new(acker))
            .with_reply_via_if_request(&ctx.via)
    };
    let counted = |tx: &QueueSender| {
        if attempt > 1 {
            ctx.redelivered(tx);
        }
    };
    for tx in to.clone() {
        match tx.try_send(delivery(tx)) {
            TrySend::Queued | TrySend::Dropped => return counted(tx),
            TrySend::Full(_) | TrySend::Closed(_) => {}
        }
    }
    for tx in to {
        if tx.send(delivery(tx)).await {
            return counted(tx);
        }
    }
    // Every subscription went away: the entry stays pending and is claimed after the
    // claim time.
}

/// Creates `group` on `key` at `start` (`$` or `0`), creating the stream too; an existing
/// group is left as it is.
pub(super) async fn create_group(
    con: &mut MultiplexedConnection,
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
async fn pending_count(
    cmd: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    id: &str,
) -> Option<u32> {
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
