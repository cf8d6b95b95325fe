//! Single-flight: concurrent misses on one key run the loader once.
//!
//! The first caller to miss becomes the leader and runs its loader; callers that miss on the same key while the
//! leader is loading wait for the leader's encoded value instead of running their own loader. If the leader's
//! loader fails, or its task is cancelled, the waiters run their own loaders, so one failure is never multiplied.
//! (The same idea as Go's `singleflight` and Spring's `@Cacheable(sync = true)`.) The map is sharded by key hash
//! so unrelated keys do not contend on one lock.
//!
//! An invalidation *detaches* the key's flight: later callers start a new load instead of joining one that began
//! before the write, and the detached leader neither publishes nor stores its value.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::watch;

const SHARDS: usize = 16;

struct Slot {
    rx: watch::Receiver<Option<Bytes>>,
    detached: Arc<AtomicBool>,
    /// The tags of the load (an invalidation of one of them detaches it).
    tags: Box<[String]>,
}

type Shard = Mutex<HashMap<Box<str>, Slot>>;

pub(crate) struct Flights {
    shards: Box<[Shard]>,
    hasher: foldhash::fast::FixedState,
}

pub(crate) enum Join {
    Leader(LeaderGuard),
    Follower(watch::Receiver<Option<Bytes>>),
}

/// Held by the leader while it loads; dropping it ends the flight.
pub(crate) struct LeaderGuard {
    flights: Arc<Flights>,
    key: Box<str>,
    tx: watch::Sender<Option<Bytes>>,
    detached: Arc<AtomicBool>,
}

impl Flights {
    pub(crate) fn new() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    fn shard(&self, key: &str) -> &Shard {
        let idx = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        &self.shards[idx]
    }

    pub(crate) fn join(self: &Arc<Self>, key: &str, tags: &[String]) -> Join {
        let mut map = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(key) {
            return Join::Follower(slot.rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        let detached = Arc::new(AtomicBool::new(false));
        map.insert(
            key.into(),
            Slot {
                rx,
                detached: Arc::clone(&detached),
                tags: tags.into(),
            },
        );
        Join::Leader(LeaderGuard {
            flights: Arc::clone(self),
            key: key.into(),
            tx,
            detached,
        })
    }

    /// Detaches the flight of `key`, if any (an invalidation of `key`).
    pub(crate) fn detach(&self, key: &str) {
        let mut map = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.remove(key) {
            slot.detached.store(true, Ordering::SeqCst);
        }
    }

    /// Detaches every flight whose key satisfies `matches` (an invalidation of a pattern).
    pub(crate) fn detach_matching(&self, matches: impl Fn(&str) -> bool) {
        self.detach_where(|k, _| matches(k));
    }

    /// Detaches every flight loading with `tag` (an invalidation of a tag).
    pub(crate) fn detach_tagged(&self, tag: &str) {
        self.detach_where(|_, tags| tags.iter().any(|t| t == tag));
    }

    fn detach_where(&self, matches: impl Fn(&str, &[String]) -> bool) {
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            map.retain(|k, slot| {
                let doomed = matches(k, &slot.tags);
                if doomed {
                    slot.detached.store(true, Ordering::SeqCst);
                }
                !doomed
            });
        }
    }

    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

impl LeaderGuard {
    /// Hands the encoded value to every waiter (and to those that join until the guard drops).
    pub(crate) fn publish(&self, value: Bytes) {
        self.tx.send_replace(Some(value));
    }

    fn remove_slot(&self) {
        let mut map = self
            .flights
            .shard(&self.key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map
            .get(&*self.key)
            .is_some_and(|slot| slot.rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&*self.key);
        }
    }

    /// True once an invalidation detached this flight: its value may predate a write.
    pub(crate) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.remove_slot();
        // `tx` drops after this: waiters that saw no value wake up and load themselves.
    }
}

/// Waits for the leader's value; `None` when the leader ended without one.
pub(crate) async fn wait(mut rx: watch::Receiver<Option<Bytes>>) -> Option<Bytes> {
    // `wait_for` looks at the current value first, so a value published before the leader ended is seen even
    // though the channel is closed; an error means the leader ended without one.
    rx.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|v| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_caller_follows_and_gets_the_published_value() {
        let f = Arc::new(Flights::new());
        let Join::Leader(lead) = f.join("k", &[]) else {
            panic!("first caller leads")
        };
        let Join::Follower(rx) = f.join("k", &[]) else {
            panic!("second caller follows")
        };
        lead.publish(Bytes::from_static(b"v"));
        drop(lead);
        assert_eq!(wait(rx).await.as_deref(), Some(&b"v"[..]));
        assert_eq!(f.in_flight(), 0);
    }

    #[tokio::test]
    async fn followers_get_none_when_the_leader_fails() {
        let f = Arc::new(Flights::new());
        let Join::Leader(lead) = f.join("k", &[]) else {
            panic!("first caller leads")
        };
        let Join::Follower(rx) = f.join("k", &[]) else {
            panic!("second caller follows")
        };
        drop(lead);
        assert_eq!(wait(rx).await, None);
        assert!(
            matches!(f.join("k", &[]), Join::Leader(_)),
            "a new flight starts after the failed one"
        );
    }

    #[tokio::test]
    async fn detaching_starts_a_new_flight_and_marks_the_old_leader() {
        let f = Arc::new(Flights::new());
        let Join::Leader(old) = f.join("k", &[]) else {
            panic!("first caller leads")
        };
        f.detach("k");
        assert!(old.is_detached());
        let Join::Leader(new) = f.join("k", &[]) else {
            panic!("after a detach, a new caller leads")
        };
        drop(old);
        assert!(
            matches!(f.join("k", &[]), Join::Follower(_)),
            "the old leader's end does not remove the new flight"
        );
        assert!(!new.is_detached());
        f.detach_matching(|k| k == "k");
        assert!(new.is_detached());
        let Join::Leader(tagged) = f.join("k", &["t".to_string()]) else {
            panic!("after a detach, a new caller leads")
        };
        f.detach_tagged("u");
        assert!(!tagged.is_detached(), "another tag leaves it alone");
        f.detach_tagged("t");
        assert!(tagged.is_detached());
    }
}
