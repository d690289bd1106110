//! Group-less deliveries: every subscription reading a key gets each entry; what it has not
//! acked is kept in process (ids only), delivered again on nack or after the ack timeout
//! (read again with `XRANGE`), and dead-lettered past `max_deliveries`.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::Value;

use busway::transport::{ack_each, Acker, Counters, QueueSender, TransportDelivery};
use busway::{Delivery, Message, Result, StartFrom};

use super::context::Ctx;
use super::entry::entries;
use super::ids::StreamId;
use crate::connect::Con;
use crate::state::Shared;

/// An entry handed to a group-less subscription and not yet acked. Only its id is kept (a
/// redelivery reads the entry again), so unacked deliveries of a busy subscription (a
/// dropping queue, a consumer that lags) cost a few bytes each, not a message each.
pub(super) struct Unacked {
    deliveries: u32,
    /// When it is delivered again unless acked first.
    pub(super) due: Instant,
}

/// A subscription's queue, and (group-less) what it was handed and has not acked.
pub(super) struct Target {
    pub(super) tx: QueueSender,
    pub(super) idle: Duration,
    pub(super) unacked: Mutex<HashMap<(Arc<str>, StreamId), Unacked>>,
}

impl Target {
    pub(super) fn new(tx: QueueSender, idle: Duration) -> Target {
        Target {
            tx,
            idle,
            unacked: Mutex::new(HashMap::new()),
        }
    }
}

/// Acks and nacks an entry of a group-less subscription, in process.
struct LocalAcker {
    ctx: Arc<Ctx>,
    target: Arc<Target>,
    key: Arc<str>,
    id: StreamId,
}

impl fmt::Debug for LocalAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAcker")
            .field("key", &self.key)
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl Acker for LocalAcker {
    async fn ack(&self) -> Result<()> {
        self.settle();
        Ok(())
    }

    /// Group-less entries (of any bus) are settled in process; the other ackers are
    /// passed on.
    async fn ack_with(&self, others: &[&dyn Acker]) -> Result<()> {
        self.settle();
        let mut rest = Vec::new();
        for &a in others {
            let any: &dyn Any = a;
            match any.downcast_ref::<LocalAcker>() {
                Some(l) => l.settle(),
                None => rest.push(a),
            }
        }
        ack_each(&rest).await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let delay = delay.unwrap_or_default();
        {
            let mut unacked = self.target.unacked.lock();
            let Some(u) = unacked.get_mut(&(self.key.clone(), self.id)) else {
                return Ok(()); // acked, or already redelivered past max_deliveries
            };
            // The ack-timeout sweep leaves it to the nack.
            u.due = Instant::now() + delay + self.target.idle;
        }
        Counters::incr(&self.ctx.shared.stats.nacked);
        let (ctx, target, key, id) = (
            self.ctx.clone(),
            self.target.clone(),
            self.key.clone(),
            self.id,
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            redeliver_local(&ctx, &target, &key, id).await;
        });
        Ok(())
    }
}

impl LocalAcker {
    /// Forgets the entry: it is acked (in process; nothing to tell the server).
    fn settle(&self) {
        let removed = self
            .target
            .unacked
            .lock()
            .remove(&(self.key.clone(), self.id));
        if removed.is_some() {
            Counters::incr(&self.ctx.shared.stats.acked);
        }
    }
}

/// Queues a group-less delivery, tracking it as unacked. Returns false when `target` is gone.
pub(super) async fn deliver_local(
    ctx: &Arc<Ctx>,
    target: &Arc<Target>,
    key: &Arc<str>,
    id: StreamId,
    message: Arc<Message>,
) -> bool {
    target.unacked.lock().insert(
        (key.clone(), id),
        Unacked {
            deliveries: 1,
            due: Instant::now() + target.idle,
        },
    );
    let acker = LocalAcker {
        ctx: ctx.clone(),
        target: target.clone(),
        key: key.clone(),
        id,
    };
    let d = Delivery::shared(message)
        .with_acker(Box::new(acker))
        .with_reply_via_if_request(&ctx.via);
    if target.tx.send(d).await {
        return true;
    }
    // The subscription is gone: nothing of it will be acked.
    target.unacked.lock().clear();
    false
}

/// Reads entry `id` of `key` again (`XRANGE key id id`); `None` when the stream no longer
/// holds it.
async fn fetch(ctx: &Ctx, key: &str, id: StreamId) -> Result<Option<Vec<Value>>> {
    let mut cmd = ctx.shared.cmd_connection()?;
    let id = id.to_string();
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg(&id)
        .arg(&id)
        .query_async(&mut cmd)
        .await
        .map_err(|e| ctx.shared.connector.error("XRANGE", e))?;
    Ok(entries(reply).into_iter().next().map(|(_, fields)| fields))
}

/// Delivers an unacked group-less entry again (nack or ack timeout), read again from its
/// stream, or dead-letters it past `max_deliveries`.
pub(super) async fn redeliver_local(
    ctx: &Arc<Ctx>,
    target: &Arc<Target>,
    key: &Arc<str>,
    id: StreamId,
) {
    let entry = (key.clone(), id);
    let exhausted = match target.unacked.lock().get(&entry) {
        None => return, // acked meanwhile
        Some(u) => ctx.exhausted(u.deliveries),
    };
    let fields = match fetch(ctx, key, id).await {
        Ok(Some(fields)) => fields,
        Ok(None) => {
            target.unacked.lock().remove(&entry);
            Counters::incr(&ctx.shared.stats.errors);
            tracing::warn!(bus = %ctx.shared.config.bus, key = &**key, id = %id, "an unacked entry was trimmed from its stream (stream_maxlen) before it could be delivered again");
            return;
        }
        Err(e) => {
            // Tried again after the ack timeout.
            if let Some(u) = target.unacked.lock().get_mut(&entry) {
                u.due = Instant::now() + target.idle;
            }
            tracing::debug!(bus = %ctx.shared.config.bus, error = %e, "reading an entry to deliver again failed");
            return;
        }
    };
    // It decoded when first delivered; a foreign rewrite of the key is all that changes that.
    let message = ctx.decode(key, fields).ok();
    if exhausted {
        let Some(u) = target.unacked.lock().remove(&entry) else {
            return;
        };
        if let Err(e) = ctx.dead_letter(key, message, u.deliveries).await {
            Counters::incr(&ctx.shared.stats.errors);
            tracing::warn!(bus = %ctx.shared.config.bus, error = %e, "dead-lettering failed; the entry is dropped");
        }
        return;
    }
    let Some(message) = message else {
        target.unacked.lock().remove(&entry);
        return;
    };
    let attempt = {
        let mut unacked = target.unacked.lock();
        let Some(u) = unacked.get_mut(&entry) else {
            return; // acked while it was read
        };
        u.deliveries = u.deliveries.saturating_add(1);
        u.due = Instant::now() + target.idle;
        u.deliveries
    };
    ctx.redelivered(&target.tx);
    let acker = LocalAcker {
        ctx: ctx.clone(),
        target: target.clone(),
        key: key.clone(),
        id,
    };
    let d = Delivery::new(message)
        .with_attempt(attempt)
        .with_acker(Box::new(acker))
        .with_reply_via_if_request(&ctx.via);
    target.tx.send(d).await;
}

/// The entry id after which a group-less subscription starting now reads `key`: its last
/// entry (`StartFrom::New`), or nothing (`StartFrom::Beginning`, and keys without entries).
pub(super) async fn start_ids(
    shared: &Shared,
    cmd: &mut Con,
    keys: &[Arc<str>],
    start: StartFrom,
) -> Result<Vec<StreamId>> {
    if start == StartFrom::Beginning || keys.is_empty() {
        return Ok(vec![StreamId::ZERO; keys.len()]);
    }
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("XREVRANGE")
            .arg(&**key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
    }
    let replies: Vec<Value> = pipe
        .query_async(cmd)
        .await
        .map_err(|e| shared.connector.error("XREVRANGE", e))?;
    Ok(replies
        .into_iter()
        .map(|r| {
            entries(r)
                .first()
                .and_then(|(id, _)| StreamId::parse(id))
                .unwrap_or(StreamId::ZERO)
        })
        .collect())
}
