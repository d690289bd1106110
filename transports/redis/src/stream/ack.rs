//! Stream-mode acks that share round trips.
//!
//! `Delivery::ack` must not return `Ok` before the server confirmed the `XACK`, so an ack
//! cannot be deferred; but acks made while another is in flight can travel together. The
//! batcher does flat combining:
//!
//! - An ack made while none is in flight is sent at once by its own caller (one `XACK`, no
//!   task hop: a consumer that acks one delivery at a time pays exactly one round trip).
//! - Acks made while one is in flight wait in a list. When the round trip in flight ends,
//!   one spawned drain task sends the whole list as one pipeline with one
//!   `XACK key group id1 id2 ...` per key and group, completes every waiter with the answer
//!   for its command, and repeats until the list is empty.
//!
//! So the number of round trips (and of XACK commands the server parses) grows with the
//! number of *waves* of acks, not with the number of acks: a consumer that acks a batch
//! concurrently (`join_all`) or many subscriptions acking at once share them.
//!
//! A waiter whose answer is lost (the task sending it was cancelled or the runtime shut
//! down) acks again itself: `XACK` is idempotent, so at worst an id is acked twice.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use redis::Value;
use tokio::sync::oneshot;

use busway::{transport::Counters, Error, Result};

use crate::state::Shared;

/// One ack waiting for the round trip in flight to end.
struct Waiting {
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    done: oneshot::Sender<Result<()>>,
}

#[derive(Default)]
struct State {
    /// An XACK round trip is in flight (a caller's own, or the drain task's).
    busy: bool,
    waiting: Vec<Waiting>,
}

/// The per-bus ack batcher (see the module docs).
pub(super) struct AckBatcher {
    shared: Arc<Shared>,
    state: Mutex<State>,
}

impl AckBatcher {
    pub(super) fn new(shared: Arc<Shared>) -> AckBatcher {
        AckBatcher {
            shared,
            state: Mutex::new(State::default()),
        }
    }
}

impl std::fmt::Debug for AckBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("AckBatcher")
            .field("busy", &s.busy)
            .field("waiting", &s.waiting.len())
            .finish()
    }
}

/// Clears `busy` when the caller's own round trip ends (or its future is dropped), handing
/// whatever queued up meanwhile to a drain task.
struct Leader<'a>(&'a Arc<AckBatcher>);

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let acks = self.0;
        let mut s = acks.state.lock();
        if s.waiting.is_empty() {
            s.busy = false;
            return;
        }
        // `busy` stays set: the drain task owns the round trips until the list is empty.
        drop(s);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(drain(acks.clone()));
            }
            Err(_) => {
                // No runtime to send them on: the waiters see their answer lost and retry.
                let mut s = acks.state.lock();
                s.waiting.clear();
                s.busy = false;
            }
        }
    }
}

/// Acks one entry; `Ok` once the server answered the `XACK` that carried it.
pub(super) async fn ack(
    acks: &Arc<AckBatcher>,
    key: &Arc<str>,
    group: &Arc<str>,
    id: &str,
) -> Result<()> {
    loop {
        let rx = {
            let mut s = acks.state.lock();
            if s.busy {
                let (done, rx) = oneshot::channel();
                s.waiting.push(Waiting {
                    key: key.clone(),
                    group: group.clone(),
                    id: id.to_string(),
                    done,
                });
                Some(rx)
            } else {
                s.busy = true;
                None
            }
        };
        match rx {
            Some(rx) => match rx.await {
                Ok(result) => return result,
                // Whoever was to send it is gone; ack again (idempotent).
                Err(_) => continue,
            },
            None => break,
        }
    }
    // The leader's round trip is a large future; boxed, it is allocated once per wave
    // instead of making every ack's (boxed) future that large.
    Box::pin(lead(acks, key, group, id)).await
}

/// The ack of a caller that found no round trip in flight: its own `XACK`.
async fn lead(acks: &Arc<AckBatcher>, key: &str, group: &str, id: &str) -> Result<()> {
    let _leader = Leader(acks);
    let shared = &acks.shared;
    let mut con = shared.cmd_connection()?;
    redis::cmd("XACK")
        .arg(key)
        .arg(group)
        .arg(id)
        .exec_async(&mut con)
        .await
        .map_err(|e| {
            Counters::incr(&shared.stats.errors);
            shared.connector.error("XACK", e)
        })
}

/// Sends the waiting acks, one pipeline per wave, until none is left.
async fn drain(acks: Arc<AckBatcher>) {
    loop {
        let batch = {
            let mut s = acks.state.lock();
            if s.waiting.is_empty() {
                s.busy = false;
                return;
            }
            std::mem::take(&mut s.waiting)
        };
        send(&acks.shared, batch).await;
    }
}

/// A stream key and a group: what one `XACK` command addresses.
type KeyGroup = (Arc<str>, Arc<str>);

/// Groups `items` by stream key and group, in first-seen order: one `XACK` each.
fn by_key_group<T>(items: impl IntoIterator<Item = (KeyGroup, T)>) -> Vec<(KeyGroup, Vec<T>)> {
    let mut commands: Vec<(KeyGroup, Vec<T>)> = Vec::new();
    let mut index: HashMap<KeyGroup, usize> = HashMap::new();
    for (k, item) in items {
        match index.get(&k) {
            Some(&i) => commands[i].1.push(item),
            None => {
                index.insert(k.clone(), commands.len());
                commands.push((k, vec![item]));
            }
        }
    }
    commands
}

/// Sends one pipeline with one `XACK key group id...` per entry of `commands`; the server's
/// answer for each command, or the error that lost them all.
async fn xack<T>(
    shared: &Shared,
    commands: &[(KeyGroup, Vec<T>)],
    id: impl Fn(&T) -> &str,
) -> Result<Vec<Result<()>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for ((key, group), items) in commands {
        let cmd = pipe.cmd("XACK").arg(&**key).arg(&**group);
        for item in items {
            cmd.arg(id(item));
        }
    }
    let mut con = shared.cmd_connection()?;
    let replies: Vec<Value> = pipe
        .query_async(&mut con)
        .await
        .map_err(|e| shared.connector.error("XACK", e))?;
    Ok(replies
        .into_iter()
        .map(|reply| match reply {
            Value::ServerError(e) => {
                Err(shared.connector.error("XACK", redis::RedisError::from(e)))
            }
            _ => Ok(()),
        })
        .collect())
}

/// Acks a batch of consumer-group entries at once, in one round trip (see
/// `Delivery::ack_all`); `Ok` once the server confirmed every `XACK`.
pub(super) async fn ack_batch<'a>(
    acks: &AckBatcher,
    entries: impl IntoIterator<Item = (&'a Arc<str>, &'a Arc<str>, &'a str)>,
) -> Result<()> {
    let commands = by_key_group(
        entries
            .into_iter()
            .map(|(key, group, id)| ((key.clone(), group.clone()), id)),
    );
    if commands.is_empty() {
        return Ok(());
    }
    let shared = &*acks.shared;
    let replies = xack(shared, &commands, |id| id).await;
    match replies.and_then(|r| r.into_iter().collect::<Result<()>>()) {
        Ok(()) => Ok(()),
        Err(e) => {
            Counters::incr(&shared.stats.errors);
            Err(e)
        }
    }
}

/// One pipeline for a wave of waiting acks, each waiter answered with its command's result.
async fn send(shared: &Shared, batch: Vec<Waiting>) {
    let commands = by_key_group(
        batch
            .into_iter()
            .map(|w| ((w.key.clone(), w.group.clone()), w)),
    );
    match xack(shared, &commands, |w| &w.id).await {
        Ok(replies) => {
            for ((_, ws), result) in commands.into_iter().zip(replies) {
                for w in ws {
                    let _ = w.done.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            Counters::incr(&shared.stats.errors);
                            Err(Error::new(e.kind(), e.message().to_string()))
                        }
                    });
                }
            }
        }
        Err(e) => {
            for w in commands.into_iter().flat_map(|(_, ws)| ws) {
                Counters::incr(&shared.stats.errors);
                let _ = w
                    .done
                    .send(Err(Error::new(e.kind(), e.message().to_string())));
            }
        }
    }
}
