//! The readers of a bus ([`StreamState`]), by consumer group, and the handle through which
//! subscriptions (joining and leaving) and the publish path (new topics) reach a reader.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use busway::transport::QueueSender;
use busway::{Pattern, Topic};

use super::ack::AckBatcher;
use super::ids::StreamId;
use crate::state::Shared;

/// The stream-mode state of a bus.
pub(crate) struct StreamState {
    pub(crate) shared: Arc<Shared>,
    /// The open subscriptions' queues, to end them on close.
    pub(super) subs: Mutex<Vec<QueueSender>>,
    /// Acks of every subscription of the bus, batched.
    pub(super) acks: Arc<AckBatcher>,
    /// The running readers, by consumer group.
    pub(super) readers: Mutex<Registry>,
    /// Held while a reader is started, so a group gets one.
    pub(super) starting: tokio::sync::Mutex<()>,
    pub(super) next_member: AtomicU64,
    /// Group entries queued for a subscription and not yet acked or nacked, by token: what
    /// this consumer hands back when its subscription goes or the bus closes.
    pub(super) held: Mutex<HashMap<u64, super::group::Held>>,
    pub(super) next_held: AtomicU64,
}

impl StreamState {
    pub(crate) fn new(shared: Arc<Shared>) -> StreamState {
        StreamState {
            acks: Arc::new(AckBatcher::new(shared.clone())),
            shared,
            subs: Mutex::new(Vec::new()),
            readers: Mutex::new(Registry::new()),
            starting: tokio::sync::Mutex::new(()),
            next_member: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            next_held: AtomicU64::new(0),
        }
    }

    /// Puts `join` in the inbox of the running reader for `group`; hands it back when there
    /// is none. Under the registry lock: a reader retires under it, and only with an empty inbox.
    pub(super) fn push_join(
        &self,
        group: &Option<Arc<str>>,
        join: Join,
    ) -> std::result::Result<Arc<ReaderHandle>, Join> {
        let readers = self.readers.lock();
        match readers.get(group) {
            Some(handle) => {
                handle.inbox.lock().joins.push(join);
                Ok(handle.clone())
            }
            None => Err(join),
        }
    }

    /// Tells the readers with a wildcard subscription that this process added `topic` to the
    /// index (its first publish), so they read its key without waiting for the rescan.
    pub(crate) fn topic_indexed(&self, topic: &Topic) {
        let readers: Vec<Arc<ReaderHandle>> = {
            let readers = self.readers.lock();
            readers
                .values()
                .filter(|h| h.wildcards.load(Relaxed))
                .cloned()
                .collect()
        };
        for handle in readers {
            handle.inbox.lock().indexed.push(topic.clone());
            handle.wake(&self.shared);
        }
    }

    /// Closes every subscription's queue (the bus is closing).
    /// Waits (up to `publish_timeout`) for the readers to stop after shutdown, so none
    /// queues an entry after the hand-back.
    pub(crate) async fn stop_readers(&self) {
        let deadline = tokio::time::Instant::now() + self.shared.config.response_timeout();
        while !self.readers.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Hands back every group entry queued and not yet settled (the bus is closing), so
    /// another consumer of the group gets it at its next reclaim instead of after the
    /// claim time.
    pub(crate) async fn hand_back_all(&self) {
        let held: Vec<super::group::Held> = self.held.lock().drain().map(|(_, h)| h).collect();
        if held.is_empty() {
            return;
        }
        if let Ok(mut cmd) = self.shared.cmd_connection() {
            super::group::hand_back(&self.shared, &mut cmd, &held).await;
        }
    }

    pub(crate) fn close_all(&self) {
        for tx in self.subs.lock().drain(..) {
            tx.close();
        }
    }
}

/// The readers of one bus, by consumer group (`None`: the group-less reader).
pub(super) type Registry = HashMap<Option<Arc<str>>, Arc<ReaderHandle>>;

/// What a subscription hands its reader.
pub(super) struct NewMember {
    pub(super) pattern: Pattern,
    pub(super) tx: QueueSender,
    /// Its queue's capacity: a group's reader reads no more than its members have room for.
    pub(super) capacity: usize,
    /// Ack timeout (group-less) or claim time (groups).
    pub(super) idle: Duration,
    /// Its keys, each with the id after which it takes entries (group-less; ignored for
    /// groups, whose position is the group's).
    pub(super) keys: Vec<(Arc<str>, StreamId)>,
}

pub(super) struct Join {
    pub(super) id: u64,
    pub(super) member: NewMember,
}

/// What a reader takes in at its next turn.
#[derive(Default)]
pub(super) struct Inbox {
    pub(super) joins: Vec<Join>,
    pub(super) leaves: Vec<u64>,
    /// Topics this process just added to the index.
    pub(super) indexed: Vec<Topic>,
}

/// The part of a reader that subscriptions and the writer talk to.
pub(super) struct ReaderHandle {
    pub(super) inbox: Mutex<Inbox>,
    /// The reader connection's `CLIENT ID`; 0 while it has none.
    pub(super) client_id: AtomicU64,
    /// Bumped by every change the reader must see; `seen` is the value its current read
    /// was built after.
    pub(super) wanted: AtomicU64,
    pub(super) seen: AtomicU64,
    /// Wakes a reader that waits without a read in flight (no keys yet).
    pub(super) notify: Notify,
    /// Whether a subscription of this reader has a wildcard (new index topics concern it).
    pub(super) wildcards: AtomicBool,
    /// A waker task is running.
    waking: AtomicBool,
}

impl fmt::Debug for ReaderHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReaderHandle")
            .field("client_id", &self.client_id.load(Relaxed))
            .finish()
    }
}

impl ReaderHandle {
    /// The handle of a reader whose connection has `CLIENT ID` `client_id`.
    pub(super) fn new(client_id: u64) -> ReaderHandle {
        ReaderHandle {
            inbox: Mutex::new(Inbox::default()),
            client_id: AtomicU64::new(client_id),
            wanted: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            notify: Notify::new(),
            wildcards: AtomicBool::new(false),
            waking: AtomicBool::new(false),
        }
    }

    /// Makes the reader see its inbox promptly: wakes its blocked read with
    /// `CLIENT UNBLOCK`, retrying while the reader is between reads and has not yet built
    /// its next one (an unblock sent then would be lost). One waker task per reader at a
    /// time: wakes that come while it runs are covered by it, so many subscriptions (or
    /// new topics) at once cost a few unblocks, not one each.
    pub(super) fn wake(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.wanted.fetch_add(1, SeqCst);
        self.notify.notify_one();
        if self.waking.swap(true, SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.waking.store(false, SeqCst);
            return;
        };
        let me = self.clone();
        let shared = Arc::downgrade(shared);
        rt.spawn(async move {
            let mut tries = 0u32;
            loop {
                if me.seen.load(SeqCst) >= me.wanted.load(SeqCst) {
                    me.waking.store(false, SeqCst);
                    // A wake that came just before the flag went down relied on this task.
                    if me.seen.load(SeqCst) < me.wanted.load(SeqCst)
                        && !me.waking.swap(true, SeqCst)
                    {
                        continue;
                    }
                    return;
                }
                if tries >= 100 || !me.unblock(&shared).await {
                    // Busy delivering, or reconnecting: it rebuilds its read at its next
                    // turn anyway.
                    me.waking.store(false, SeqCst);
                    return;
                }
                tries += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }

    /// Sends `CLIENT UNBLOCK` for the reader's connection; false when there is no reader
    /// connection or no command connection to send it on.
    async fn unblock(&self, shared: &Weak<Shared>) -> bool {
        let id = self.client_id.load(SeqCst);
        let Some(shared) = shared.upgrade().filter(|_| id != 0) else {
            return false;
        };
        let Ok(mut cmd) = shared.cmd_connection() else {
            return false;
        };
        drop(shared);
        redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .query_async::<i64>(&mut cmd)
            .await
            .is_ok()
    }
}

/// Removes its subscription from the reader when the subscription is dropped.
pub(super) struct Leave {
    handle: Arc<ReaderHandle>,
    shared: Weak<Shared>,
    id: u64,
}

impl Leave {
    pub(super) fn new(handle: Arc<ReaderHandle>, shared: &Arc<Shared>, id: u64) -> Leave {
        Leave {
            handle,
            shared: Arc::downgrade(shared),
            id,
        }
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.handle.inbox.lock().leaves.push(self.id);
        if let Some(shared) = self.shared.upgrade() {
            self.handle.wake(&shared);
        }
    }
}
