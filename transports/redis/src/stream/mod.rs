//! Stream mode on Redis Streams.
//!
//! - A topic `t` is the stream key `key_prefix + t` (default `busway:stream:t`), unless the
//!   bus has a `layout` ([`crate::layout`]): then its keys and fields are the layout's, and
//!   no index is kept. A publish is
//!   `XADD key MAXLEN ~ stream_maxlen * field value...`; the first publish of a topic by a
//!   process also adds the topic to the set `index_key` (default `busway:topics`), in the
//!   same pipeline.
//! - Headers travel as fields: `payload`, `id`, `ts`, `src`, `ct`, `reply_to`, `corr`, and
//!   `h:<key>` per free header ([`entry`]).
//! - Groups are created on demand (`XGROUP CREATE ... MKSTREAM`) at `$` (start new) or `0`
//!   (start from the beginning); an existing group keeps its position. A subscription without
//!   a group uses no consumer group: it reads with `XREAD` from the last entry at subscribe
//!   time (start new) or from `0`, and its unacked deliveries are kept in process.
//! - `ack` is `XACK` for a group ([`ack`] batches them); `nack` re-claims the entry for the
//!   same consumer (`XCLAIM`, which bumps its delivery count) and delivers it again; entries
//!   pending longer than `claim_idle` (or the ack timeout) in any consumer of the group are
//!   claimed (`XPENDING IDLE` + `XCLAIM`) and delivered again; past `max_deliveries` they are
//!   published to the `dead_letter` topic and acked ([`group`]). Group-less deliveries are
//!   acked, nacked, redelivered after the ack timeout and dead-lettered in process
//!   ([`groupless`]).
//!
//! # Readers
//! A blocking `XREADGROUP` / `XREAD` holds its connection until it returns, so it cannot
//! share the command connection. The read connections of a bus are bounded by what its
//! subscriptions use, whatever their number ([`registry`], [`reader`]):
//!
//! - **one reader per consumer group** with subscriptions in the process. It issues one
//!   `XREADGROUP GROUP g <consumer> COUNT n BLOCK ms STREAMS k1 k2 ... > > ...` over the union
//!   of the keys its subscriptions need, and hands each entry to *one* of the group's
//!   subscriptions whose pattern matches the entry's topic, in turn (a group is a work queue,
//!   within the process as across processes). Entries stay pending in the group until acked.
//! - **one reader for every subscription without a group**. It issues a plain
//!   `XREAD COUNT n BLOCK ms STREAMS k1 k2 ... id1 id2 ...`, remembering the last id read per
//!   key, and hands each entry to *every* group-less subscription reading that key. No
//!   consumer group holds their pending entries: each subscription keeps the ids of its
//!   unacked deliveries in process; `nack` and the ack timeout deliver them again (read again
//!   with `XRANGE`), `max_deliveries` dead-letters them. So a group-less stream subscription
//!   is at-least-once **within the process lifetime**, not across a crash of the subscriber
//!   (a restarted process starts afresh, from `StartFrom`). Use a group for deliveries that
//!   must survive the subscriber.
//!
//! A wildcard subscription takes its keys from `index_key`, rescanned every
//! `rescan_interval` (and at once for topics this process indexes), so keys created after it
//! subscribed are found; such a key is read from its first entry (it had no busway entries
//! when the subscription started), so nothing is missed. A subscription that joins a reader
//! already reading one of its keys past where the subscription starts is first caught up
//! from that key (`XRANGE`), so `StartFrom::Beginning` and keys found by a wildcard later
//! work with a shared read.
//!
//! When subscriptions come or go, the blocked read is woken (`CLIENT UNBLOCK <id>` on the
//! command connection, the reader's id taken with `CLIENT ID` after each connect) so it
//! reads the new key set at once rather than after `read_block`. A reader opens its
//! connection with its first subscription and closes it after its last.
//!
//! A group entry goes to a group mate whose queue has room before the reader waits for a
//! full `block` queue, so a stalled member does not hold up its group; a full `block` queue
//! of a group-less subscription holds up the group-less reader, as on the shared pub/sub
//! connection.

mod ack;
mod context;
mod entry;
mod group;
mod groupless;
mod ids;
pub(crate) mod lag;
mod reader;
mod registry;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use busway::transport::TransportSubscription;
use busway::{
    config::DEFAULT_ACK_TIMEOUT, Bus, Error, ErrorKind, Pattern, Result, StartFrom,
    SubscribeOptions, Subscription,
};

pub(crate) use entry::{busway_field, fields, text, Field};
pub(crate) use registry::StreamState;

use context::Ctx;
use group::create_group;
use groupless::start_ids;
use ids::StreamId;
use registry::{Join, Leave, NewMember, ReaderHandle};

/// A stream subscription to `pattern`; deliveries of requests reply through `via`.
pub(crate) async fn subscribe(
    streams: &Arc<StreamState>,
    pattern: Pattern,
    options: SubscribeOptions,
    via: Arc<dyn Bus>,
) -> Result<Subscription> {
    let shared = &*streams.shared;
    let opts = &shared.config;
    let idle = opts
        .claim_idle
        .or(options.ack_timeout)
        .unwrap_or(DEFAULT_ACK_TIMEOUT);
    let mut cmd = shared.cmd_connection()?;
    let keys: Vec<Arc<str>> = match &shared.layout {
        // A layout's keys come from its config, whoever wrote them.
        Some(layout) => layout
            .keys_for(&pattern)
            .map_err(|why| {
                Error::new(ErrorKind::Unsupported, format!("bus {:?}: {why}", opts.bus))
            })?
            .into_iter()
            .map(Arc::from)
            .collect(),
        None => {
            let topics: Vec<String> = match pattern.as_topic() {
                Some(t) => vec![t.as_str().to_string()],
                None => {
                    let all: Vec<String> = redis::cmd("SMEMBERS")
                        .arg(&opts.index_key)
                        .query_async(&mut cmd)
                        .await
                        .map_err(|e| shared.connector.error("SMEMBERS", e))?;
                    all.into_iter().filter(|t| pattern.matches_str(t)).collect()
                }
            };
            topics
                .iter()
                .map(|t| format!("{}{t}", opts.key_prefix).into())
                .collect()
        }
    };
    let group: Option<Arc<str>> = options.group.as_deref().map(Arc::from);
    let starts = match &group {
        Some(group) => {
            // A key that enters the index after the subscription started had no busway
            // entries when it started (the index is written with a topic's first XADD), so
            // the reader reads it from its first entry: nothing published after the
            // subscription is missed, and no clock comparison is involved.
            let start = match options.start {
                StartFrom::New => "$",
                StartFrom::Beginning => "0",
            };
            for key in &keys {
                create_group(&mut cmd, key, group, start)
                    .await
                    .map_err(|e| shared.connector.error("XGROUP CREATE", e))?;
            }
            vec![StreamId::ZERO; keys.len()]
        }
        None => start_ids(shared, &mut cmd, &keys, options.start).await?,
    };
    let (capacity, overflow) = options.queue(shared.config.queue);
    let (tx, sub) =
        Subscription::channel(pattern.clone(), capacity, overflow, shared.stats.clone());
    {
        let mut subs = streams.subs.lock();
        subs.retain(|tx| !tx.is_closed());
        subs.push(tx.clone());
    }
    let member = NewMember {
        pattern,
        tx,
        capacity,
        idle,
        keys: keys.into_iter().zip(starts).collect(),
    };
    let guard = join(streams, group, member, via).await?;
    Ok(sub.with_guard(guard))
}

/// Adds a subscription to the bus's reader for `group` (`None`: the group-less one),
/// starting that reader (and opening its connection, whose errors the caller gets) when
/// it is the first. Returns the guard that removes it when dropped.
async fn join(
    streams: &Arc<StreamState>,
    group: Option<Arc<str>>,
    member: NewMember,
    via: Arc<dyn Bus>,
) -> Result<Leave> {
    let id = streams.next_member.fetch_add(1, Relaxed);
    let mut join = Join { id, member };
    loop {
        join = match streams.push_join(&group, join) {
            Ok(handle) => {
                handle.wake(&streams.shared);
                return Ok(Leave::new(handle, &streams.shared, id));
            }
            Err(join) => join,
        };
        // Starting a reader: one at a time, so two first subscriptions of a group do not
        // open two connections.
        let _starting = streams.starting.lock().await;
        if streams.readers.lock().contains_key(&group) {
            continue;
        }
        let shared = &streams.shared;
        let (con, client_id) = reader::connect(shared).await?;
        let handle = Arc::new(ReaderHandle::new(client_id));
        // The first subscription is in the inbox before the reader can look at it, so the
        // reader never sees itself empty and retires at once.
        handle.inbox.lock().joins.push(join);
        streams.readers.lock().insert(group.clone(), handle.clone());
        let consumer = shared.config.consumer_name(group.as_deref().unwrap_or(""));
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            streams: streams.clone(),
            via,
            group,
            consumer,
        });
        tokio::spawn(reader::Task::new(ctx, handle.clone(), con).run());
        return Ok(Leave::new(handle, &streams.shared, id));
    }
}
