//! [`MemoryCache`]: an in-process cache on moka, bounded in entries and in bytes, with a TTL per entry.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};
use moka::future::Cache as Moka;
use moka::Expiry;

use super::{Cache, CacheImpl, Health};
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
#[derive(Clone)]
pub struct MemoryCache {
    inner: Moka<String, Entry>,
}

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
        MemoryCache { inner }
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
        async move { Ok(self.inner.get(key).await.map(|e| e.value)) }.boxed()
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            self.inner
                .insert(key.to_string(), Entry { value, ttl })
                .await;
            Ok(())
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        async move { Ok(self.inner.remove(key).await.is_some()) }.boxed()
    }

    fn delete_matching<'a>(
        &'a self,
        prefix: &'a str,
        belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>> {
        async move {
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
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        future::ready(Health::local()).boxed()
    }
}
