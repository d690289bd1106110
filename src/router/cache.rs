//! The route cache and the bus slots a cached decision points into.

use super::*;

/// Where one routing decision sends a message: names and buses, index for index.
pub(super) struct Targets {
    pub(super) names: Arc<[Arc<str>]>,
    pub(super) buses: Box<[Arc<dyn Bus>]>,
    /// The bus's place in [`BusSlots`] when there is exactly one bus.
    pub(super) slot: Option<u32>,
    /// Every bus's place in [`BusSlots`], index for index with `buses`.
    pub(super) slots: Box<[u32]>,
}

pub(super) const SLOT_CHUNK: usize = 64;

pub(super) type SlotChunk = Box<[OnceLock<Arc<dyn Bus>>]>;
pub(super) const SLOT_CHUNKS: usize = 64;

/// Every bus a router has held, at addresses stable for the router's life, so a publish can
/// borrow its bus from `&self` and return the bus's own future: no `Arc` clone and no second
/// boxed future on the hot path. Append-only: a reload will add its new buses, and a
/// retired bus stays here, closed (at most `SLOT_CHUNK * SLOT_CHUNKS` buses over a router's
/// life).
pub(super) struct BusSlots {
    pub(super) chunks: Box<[OnceLock<SlotChunk>]>,
    pub(super) len: parking_lot::Mutex<usize>,
    /// Each slot's metric handles, index for index (read off the hot path unless metrics are
    /// enabled).
    pub(super) handles: SlotHandles,
}

impl BusSlots {
    pub(super) fn new() -> BusSlots {
        BusSlots {
            chunks: (0..SLOT_CHUNKS).map(|_| OnceLock::new()).collect(),
            len: parking_lot::Mutex::new(0),
            handles: Default::default(),
        }
    }

    pub(super) fn push(&self, bus: Arc<dyn Bus>, handles: Arc<BusHandles>) -> Result<u32> {
        let mut len = self.len.lock();
        let chunk = self.chunks.get(*len / SLOT_CHUNK).ok_or_else(|| {
            Error::new(
                ErrorKind::Other,
                format!(
                    "a router holds at most {} buses over its life",
                    SLOT_CHUNK * SLOT_CHUNKS
                ),
            )
        })?;
        let slots = chunk.get_or_init(|| (0..SLOT_CHUNK).map(|_| OnceLock::new()).collect());
        // Only this function sets slots, under `len`'s lock, each slot once.
        let _ = slots[*len % SLOT_CHUNK].set(bus);
        self.handles.write().push(handles);
        let slot = *len as u32;
        *len += 1;
        Ok(slot)
    }

    /// The metric handles of a slot.
    pub(super) fn handles(&self, slot: u32) -> Option<Arc<BusHandles>> {
        self.handles.read().get(slot as usize).cloned()
    }

    #[inline]
    pub(super) fn get(&self, slot: u32) -> Option<&Arc<dyn Bus>> {
        let slot = slot as usize;
        self.chunks.get(slot / SLOT_CHUNK)?.get()?[slot % SLOT_CHUNK].get()
    }
}

pub(super) const CACHE_SHARDS: usize = 16;

pub(super) type CacheShard = RwLock<HashMap<Topic, Arc<Targets>, foldhash::fast::RandomState>>;

/// A bounded, sharded `topic -> targets` cache. Shards spread lock traffic of different
/// topics; a shard at its bound is cleared rather than tracked for LRU, which keeps the hit
/// path to one read lock and one lookup.
pub(super) struct RouteCache {
    pub(super) shards: Box<[CacheShard]>,
    pub(super) per_shard: usize,
    // Seeded apart from the maps' hasher: picking the shard with the maps' own hash bits
    // would leave every map in a shard with those bits all equal.
    pub(super) shard_of: foldhash::fast::FixedState,
}

impl RouteCache {
    pub(super) fn new(capacity: usize) -> RouteCache {
        RouteCache {
            shards: (0..CACHE_SHARDS).map(|_| RwLock::default()).collect(),
            per_shard: capacity.div_ceil(CACHE_SHARDS),
            shard_of: foldhash::fast::FixedState::with_seed(0x6275_7377_6179),
        }
    }

    #[inline]
    pub(super) fn shard(&self, topic: &Topic) -> &CacheShard {
        let h = self.shard_of.hash_one(topic.as_str());
        &self.shards[(h >> 60) as usize % CACHE_SHARDS]
    }

    #[inline]
    pub(super) fn get(&self, topic: &Topic) -> Option<Arc<Targets>> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(topic).read().get(topic.as_str()).cloned()
    }

    /// The slot of a cached topic's only bus; `None` when not cached or a mirror.
    #[inline]
    pub(super) fn single(&self, topic: &Topic) -> Option<u32> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(topic).read().get(topic.as_str())?.slot
    }

    pub(super) fn insert(&self, topic: &Topic, targets: &Arc<Targets>) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(topic).write();
        if shard.len() >= self.per_shard {
            shard.clear();
        }
        shard.insert(topic.clone(), targets.clone());
    }
}
