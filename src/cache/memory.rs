//! [`MemoryCache`]: an in-process cache on moka, bounded in entries and in bytes, with a TTL per entry.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};
use moka::future::Cache as Moka;
use moka::Expiry;

use super::{Cache, CacheImpl, Health, Lookup, Traced};
use crate::error::Result;

#[derive(Clone)]
struct Entry {
    value: Bytes,
    ttl: Option<Duration>,
}

struct PerEntryTtl;

impl Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, value: &Entry, _now: Instant) -> Option<Duration> {
        value.ttl
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Entry,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        value.ttl
    }
}

/// An in-process byte cache (moka's TinyLFU admission with LRU eviction).
///
/// Bounded two ways: at most `max_entries` entries and at most `max_bytes` bytes of keys and values. Both are
/// enforced with one moka weigher: an entry weighs `max(key + value bytes, max_bytes / max_entries)` against a
/// capacity of `max_bytes`, so neither bound can be exceeded (small entries are counted as the average size the
/// bounds allow). Eviction is asynchronous in moka, so the bounds may be overshot briefly between maintenance runs.
///
/// Leases and tags are kept beside the entries: a lease lives in one of 16 lease maps, each behind an async lock
/// that a fill under a lease and a delete both take, so a revoked lease can never fill; a tag keeps the set of its
/// keys, pruned of keys no longer held when it grows past `max_entries`.
#[derive(Clone)]
pub struct MemoryCache {
    inner: Moka<String, Entry>,
    leases: Arc<[LeaseShard]>,
    tags: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    hasher: foldhash::fast::FixedState,
    max_entries: u64,
}

const LEASE_SHARDS: usize = 16;

/// Key → (lease token, expiry), behind the lock a fill under a lease and a delete of the key both take.
type LeaseShard = tokio::sync::Mutex<HashMap<String, (u64, Instant)>>;

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.inner.entry_count())
            .field("weighted_bytes", &self.inner.weighted_size())
            .finish()
    }
}

impl MemoryCache {
    /// A cache of at most `max_entries` entries and `max_bytes` bytes (both at least 1).
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        let max_entries = max_entries.max(1);
        let max_bytes = max_bytes.max(1);
        let floor = u32::try_from((max_bytes / max_entries).max(1)).unwrap_or(u32::MAX);
        let inner = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(move |k: &String, v: &Entry| {
                let size = u32::try_from(k.len() + v.value.len()).unwrap_or(u32::MAX);
                size.max(floor)
            })
            .expire_after(PerEntryTtl)
            .build();
        MemoryCache {
            inner,
            leases: (0..LEASE_SHARDS)
                .map(|_| tokio::sync::Mutex::new(HashMap::new()))
                .collect(),
            tags: Arc::default(),
            hasher: foldhash::fast::FixedState::default(),
            max_entries,
        }
    }

    fn lease_shard(&self, key: &str) -> &LeaseShard {
        let i = usize::try_from(self.hasher.hash_one(key) % LEASE_SHARDS as u64).unwrap_or(0);
        &self.leases[i]
    }

    /// Stores `key`, ending any lease on it; the caller holds the key's lease shard (`leases`), so no fill under a
    /// lease and no delete can come in between.
    async fn store(
        &self,
        leases: &mut HashMap<String, (u64, Instant)>,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        tags: &[String],
    ) {
        leases.remove(key);
        self.record_tags(key, tags);
        self.inner
            .insert(key.to_string(), Entry { value, ttl })
            .await;
    }

    /// The value or a lease (`over`: a lease even over a value, for a refresh), under the key's lease shard.
    async fn lease_with(
        &self,
        key: &str,
        token: u64,
        lease_ttl: Duration,
        tags: &[String],
        over: bool,
    ) -> Result<Lookup> {
        let mut leases = self.lease_shard(key).lock().await;
        if !over {
            if let Some(e) = self.inner.get(key).await {
                return Ok(Lookup::Hit(e.value));
            }
        }
        let now = Instant::now();
        if leases.get(key).is_some_and(|&(_, until)| until > now) {
            return Ok(Lookup::Held);
        }
        if leases.len() >= 1024 {
            leases.retain(|_, &mut (_, until)| until > now);
        }
        leases.insert(key.to_string(), (token, now + lease_ttl));
        self.record_tags(key, tags);
        Ok(Lookup::Lease(token))
    }

    fn record_tags(&self, key: &str, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        let mut map = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        for t in tags {
            let keys = map.entry(t.clone()).or_default();
            keys.insert(key.to_string());
            if keys.len() as u64 > self.max_entries.saturating_mul(2) {
                keys.retain(|k| self.inner.contains_key(k));
            }
        }
    }

    /// Drops every entry and tag record at once (moka's `invalidate_all`: no walk over the entries). Leases stay:
    /// only [`delete`](Cache::delete) and [`delete_matching`](Cache::delete_matching) revoke them.
    pub fn clear(&self) {
        self.inner.invalidate_all();
        self.tags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Number of entries (approximate until moka's pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, expirations) now; useful in tests.
    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }
}

impl Cache for MemoryCache {
    fn kind(&self) -> CacheImpl {
        CacheImpl::Memory
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move { Ok(self.inner.get(key).await.map(|e| e.value)) }.traced(
            "get",
            CacheImpl::Memory,
            key,
        )
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<()>> {
        self.set_tagged(key, value, ttl, &[])
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut leases = self.lease_shard(key).lock().await;
            self.store(&mut leases, key, value, ttl, tags).await;
            Ok(())
        }
        .traced("set_tagged", CacheImpl::Memory, key)
    }

    fn lease<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        self.lease_with(key, token, lease_ttl, tags, false)
            .traced("lease", CacheImpl::Memory, key)
    }

    fn lease_refresh<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        self.lease_with(key, token, lease_ttl, tags, true)
            .traced("lease", CacheImpl::Memory, key)
    }

    fn set_leased<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        token: u64,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            let mut leases = self.lease_shard(key).lock().await;
            match leases.get(key) {
                Some(&(t, until)) if t == token && until > Instant::now() => {}
                _ => return Ok(false),
            }
            self.store(&mut leases, key, value, Some(ttl), tags).await;
            Ok(true)
        }
        .traced("set_leased", CacheImpl::Memory, key)
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: u64) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut leases = self.lease_shard(key).lock().await;
            if leases.get(key).is_some_and(|&(t, _)| t == token) {
                leases.remove(key);
            }
            Ok(())
        }
        .traced("release_lease", CacheImpl::Memory, key)
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<u64>> {
        async move {
            let keys = self
                .tags
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(tag)
                .unwrap_or_default();
            let mut n = 0;
            for k in keys {
                if self.delete(&k).await? {
                    n += 1;
                }
            }
            Ok(n)
        }
        .traced("invalidate_tag", CacheImpl::Memory, tag)
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        async move {
            let mut leases = self.lease_shard(key).lock().await;
            leases.remove(key);
            Ok(self.inner.remove(key).await.is_some())
        }
        .traced("delete", CacheImpl::Memory, key)
    }

    fn delete_matching<'a>(
        &'a self,
        prefix: &'a str,
        belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>> {
        async move {
            // Leases first: a fill under a lease taken before this deletion must fail, even for a key the entry
            // pass below has already gone by (a fill and this shard's lease removal are serialized by its lock).
            for shard in self.leases.iter() {
                shard
                    .lock()
                    .await
                    .retain(|k, _| !(k.starts_with(prefix) && belongs(k)));
            }
            let doomed: Vec<_> = self
                .inner
                .iter()
                .filter(|(k, _)| k.starts_with(prefix) && belongs(k))
                .map(|(k, _)| k)
                .collect();
            let mut n = 0;
            for k in doomed {
                if self.inner.remove(k.as_str()).await.is_some() {
                    n += 1;
                }
            }
            Ok(n)
        }
        .traced("delete_matching", CacheImpl::Memory, prefix)
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        future::ready(Health::local()).boxed()
    }
}
