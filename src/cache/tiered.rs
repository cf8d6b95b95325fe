//! [`TieredCache`]: an in-process L1 ([`MemoryCache`]) in front of Redis (L2) for chosen key patterns, kept
//! coherent across instances by a pub/sub invalidation channel.
//!
//! - **Reads** of an L1 pattern look in L1 first; a miss reads Redis (with its lease, as without L1) and keeps the
//!   value in L1 for at most the pattern's `l1_ttl_secs`.
//! - **Writes and invalidations** go to Redis first, then (even when Redis failed: it may have changed all the same)
//!   drop the key from this instance's L1, then `PUBLISH` the key on the channel `<key_prefix> ~l1`; every other
//!   instance drops it from its L1 when the message arrives. A failed `PUBLISH` fails the write or invalidation, so
//!   the caller retries it. Tag invalidations and pattern deletions publish "everything": the receivers empty their
//!   L1 (an L1 entry does not know its tags).
//! - **The stale-set race in L1**: a value read from Redis just before another instance's invalidation, and put in
//!   L1 just after its message, would stay there. Every message moves an invalidation sequence number under a write
//!   lock; a value is put in L1 only under the read lock and only if the sequence has not moved since before the
//!   Redis read. (Conservative: any message, of any key, skips the fills in flight.)
//! - **Lost messages**: pub/sub delivers at most once. While the subscription is down, L1 is not read and not
//!   filled, and it is emptied when the subscription (re)starts, so a message missed meanwhile cannot leave an old
//!   value behind. A dead subscription is noticed when its connection closes, or within about 2 s by a `PING`
//!   (sent every second, answered within a second); until then L1 is still read.
//! - **Every instance needs the same L1 patterns**: an instance publishes only the invalidations of its own L1
//!   patterns. The fleet state (`[cache.fleet]`) keeps the policy the same everywhere.
//!
//! What it does not promise: on *another* instance, the old value can be served from L1 until the message arrives
//! (the pub/sub delivery time; measured in `docs/scaling.md`). The instance that invalidated never serves it, and no
//! instance serves it after the message. `l1_ttl_secs` bounds the damage of anything unforeseen.
//!
//! Redis's own client-side caching (RESP3 `CLIENT TRACKING`) would do the same job; it was not used because the
//! `redis` crate's client-side cache (`cache-aio`) is tied to its own connection types and TTL policy, and this
//! design also covers leases and tags as the registry uses them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec};

use super::{Cache, CacheImpl, Health, Lookup, MemoryCache, RedisCache};
use crate::error::Result;
use crate::pattern::KeyPatterns;

/// Which patterns have an L1, and for how long an L1 entry may live (seconds, at least 1).
pub type L1Patterns = HashMap<String, u64>;

/// Redis with an in-process L1 for some patterns. Cheap to clone; dropping the last clone stops the subscriber.
#[derive(Clone)]
pub struct TieredCache {
    inner: Arc<Inner>,
}

struct Inner {
    l1: MemoryCache,
    l2: RedisCache,
    patterns: L1Patterns,
    key_patterns: KeyPatterns,
    channel: String,
    /// This instance's id in messages (its own are not applied twice).
    id: String,
    /// Moved by every message applied (under `gate`'s write lock).
    seq: AtomicU64,
    gate: tokio::sync::RwLock<()>,
    /// `true` while the subscription is up: only then is L1 read and filled.
    live: AtomicBool,
    /// `cache_l1_total`, one handle per result (resolved once: a label lookup per L1 hit would cost more than
    /// the rest of the hit's bookkeeping).
    counts: L1Counts,
}

struct L1Counts {
    hit: IntCounter,
    fill: IntCounter,
    skipped: IntCounter,
    invalidated: IntCounter,
    cleared: IntCounter,
}

impl std::fmt::Debug for TieredCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("l2", &self.inner.l2)
            .field("patterns", &self.inner.patterns)
            .field("live", &self.inner.live.load(Ordering::Relaxed))
            .finish()
    }
}

/// The result labels of `cache_l1_total`.
pub const L1_RESULTS: [&str; 5] = ["hit", "fill", "skipped", "invalidated", "cleared"];

impl TieredCache {
    /// `l2` with an L1 of at most `max_entries` entries and `max_bytes` bytes for the keys whose pattern (by
    /// `key_patterns`) is in `patterns`. Starts the subscriber on the current Tokio runtime; until it has
    /// subscribed, L1 is not used. `counts`: the `cache_l1_total` counter, by result ([`L1_RESULTS`]).
    ///
    /// # Errors
    /// [`Error::Redis`](crate::Error::Redis) for a Redis URL that cannot be parsed.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn new(
        l2: RedisCache,
        patterns: L1Patterns,
        key_patterns: KeyPatterns,
        max_entries: u64,
        max_bytes: u64,
        counts: IntCounterVec,
    ) -> Result<Self> {
        let nodes = super::redis::node_clients(l2.options())?;
        let channel = format!("{} ~l1", l2.options().key_prefix);
        let inner = Arc::new(Inner {
            l1: MemoryCache::new(max_entries, max_bytes),
            l2,
            patterns,
            key_patterns,
            channel,
            id: format!("{:016x}", crate::random::random_u64()),
            seq: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
            live: AtomicBool::new(false),
            counts: L1Counts {
                hit: counts.with_label_values(&["hit"]),
                fill: counts.with_label_values(&["fill"]),
                skipped: counts.with_label_values(&["skipped"]),
                invalidated: counts.with_label_values(&["invalidated"]),
                cleared: counts.with_label_values(&["cleared"]),
            },
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let next = AtomicUsize::new(0);
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let channel = inner.channel.clone();
                drop(inner);
                match super::redis::subscribe(&nodes, &next, &channel).await {
                    Ok(pubsub) => listen(&weak, pubsub).await,
                    Err(e) => tracing::debug!(error = %e, "l1: cannot subscribe; retrying"),
                }
                if let Some(inner) = weak.upgrade() {
                    inner.go_dark().await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(TieredCache { inner })
    }

    /// The Redis behind the L1.
    pub fn l2(&self) -> &RedisCache {
        &self.inner.l2
    }

    /// `true` while the invalidation channel is subscribed (L1 in use).
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// The L1 time-to-live of `key`, when its pattern has an L1.
    fn l1_ttl(&self, key: &str) -> Option<Duration> {
        if self.inner.patterns.is_empty() {
            return None;
        }
        let p = self.inner.key_patterns.pattern_of(key);
        self.inner
            .patterns
            .get(p.as_ref())
            .map(|s| Duration::from_secs(*s))
    }

    async fn l1_get(&self, key: &str) -> Option<Bytes> {
        if !self.is_live() {
            return None;
        }
        let v = self.inner.l1.get(key).await.ok().flatten();
        if v.is_some() {
            self.inner.counts.hit.inc();
        }
        v
    }

    /// Puts `value` in L1 unless a message arrived since `seq` was read (or the subscription is down).
    async fn l1_fill(&self, key: &str, value: &Bytes, ttl: Duration, seq: u64) {
        let _gate = self.inner.gate.read().await;
        if !self.is_live() || self.inner.seq.load(Ordering::Acquire) != seq {
            self.inner.counts.skipped.inc();
            return;
        }
        let _ = self.inner.l1.set(key, value.clone(), Some(ttl)).await;
        self.inner.counts.fill.inc();
    }

    fn seq(&self) -> u64 {
        self.inner.seq.load(Ordering::Acquire)
    }

    /// Drops `key` here and tells the other instances (`None`: everything).
    async fn invalidate_everywhere(&self, key: Option<&str>) -> Result<()> {
        self.inner.apply(key).await;
        let msg = match key {
            Some(k) => format!("k {} {k}", self.inner.id),
            None => format!("a {}", self.inner.id),
        };
        self.inner.l2.publish(&self.inner.channel, &msg).await
    }
}

impl Inner {
    /// Applies one invalidation to L1: moves the sequence (so fills in flight are skipped) and drops the key, or
    /// everything.
    async fn apply(&self, key: Option<&str>) {
        let _gate = self.gate.write().await;
        self.seq.fetch_add(1, Ordering::AcqRel);
        match key {
            Some(k) => {
                if self.l1.delete(k).await.unwrap_or(false) {
                    self.counts.invalidated.inc();
                }
            }
            None => {
                self.l1.clear();
                self.counts.cleared.inc();
            }
        }
    }

    /// The subscription is down: stop using L1 and empty it (messages may be missed from now on).
    async fn go_dark(&self) {
        if self.live.swap(false, Ordering::AcqRel) {
            self.apply(None).await;
        }
    }
}

/// Applies messages until the subscription fails (a closed connection, or a `PING` not answered within a second:
/// checked every second) or the cache is dropped.
async fn listen(weak: &std::sync::Weak<Inner>, pubsub: redis::aio::PubSub) {
    {
        let Some(inner) = weak.upgrade() else { return };
        // Anything could have been missed before this subscription: start from an empty L1.
        inner.apply(None).await;
        inner.live.store(true, Ordering::Release);
    }
    let (mut sink, mut stream) = pubsub.split();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = tick.tick() => {
                let pong = tokio::time::timeout(Duration::from_secs(1), sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) || weak.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let Some(msg) = msg else { return };
        let Some(inner) = weak.upgrade() else { return };
        let Ok(payload) = msg.get_payload::<String>() else {
            continue;
        };
        let mut parts = payload.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("k"), Some(from), Some(key)) if from != inner.id => inner.apply(Some(key)).await,
            (Some("a"), Some(from), None) if from != inner.id => inner.apply(None).await,
            _ => {}
        }
    }
}

impl Cache for TieredCache {
    fn kind(&self) -> CacheImpl {
        CacheImpl::Redis
    }

    /// Empties the L1: kept for deletions only, it is never read again (its invalidations still reach the other
    /// instances' L1s).
    fn retire(&self) {
        self.inner.l1.clear();
    }

    fn remote(&self) -> bool {
        true
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move {
            let Some(ttl) = self.l1_ttl(key) else {
                return self.inner.l2.get(key).await;
            };
            if let Some(v) = self.l1_get(key).await {
                return Ok(Some(v));
            }
            let seq = self.seq();
            let v = self.inner.l2.get(key).await?;
            if let Some(v) = &v {
                self.l1_fill(key, v, ttl, seq).await;
            }
            Ok(v)
        }
        .boxed()
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
            // Whatever Redis answered (a failed call may still have changed it), the L1 copies go.
            let stored = self.inner.l2.set_tagged(key, value, ttl, tags).await;
            if self.l1_ttl(key).is_some() {
                self.invalidate_everywhere(Some(key)).await?;
            }
            stored
        }
        .boxed()
    }

    fn lease<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        async move {
            let Some(ttl) = self.l1_ttl(key) else {
                return self.inner.l2.lease(key, token, lease_ttl, tags).await;
            };
            if let Some(v) = self.l1_get(key).await {
                return Ok(Lookup::Hit(v));
            }
            let seq = self.seq();
            let r = self.inner.l2.lease(key, token, lease_ttl, tags).await?;
            if let Lookup::Hit(v) = &r {
                self.l1_fill(key, v, ttl, seq).await;
            }
            Ok(r)
        }
        .boxed()
    }

    /// Drops this instance's L1 copy (past its TTL, since a refresh is asked for) before asking Redis: the reads
    /// that follow go to Redis and see the refreshed value, whoever stores it.
    fn lease_refresh<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        async move {
            let _ = self.inner.l1.delete(key).await;
            self.inner
                .l2
                .lease_refresh(key, token, lease_ttl, tags)
                .await
        }
        .boxed()
    }

    fn get_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        self.inner.l2.get(key)
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
            let l1 = self.l1_ttl(key);
            let seq = self.seq();
            let stored = self
                .inner
                .l2
                .set_leased(key, value.clone(), ttl, token, tags)
                .await?;
            if let (true, Some(l1)) = (stored, l1) {
                self.l1_fill(key, &value, l1.min(ttl), seq).await;
            }
            Ok(stored)
        }
        .boxed()
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: u64) -> BoxFuture<'a, Result<()>> {
        self.inner.l2.release_lease(key, token)
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<u64>> {
        async move {
            let n = self.inner.l2.invalidate_tag(tag).await;
            self.invalidate_everywhere(None).await?;
            n
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        async move {
            let present = self.inner.l2.delete(key).await;
            if self.l1_ttl(key).is_some() {
                self.invalidate_everywhere(Some(key)).await?;
            }
            present
        }
        .boxed()
    }

    fn delete_matching<'a>(
        &'a self,
        prefix: &'a str,
        belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>> {
        async move {
            let n = self.inner.l2.delete_matching(prefix, belongs).await;
            self.invalidate_everywhere(None).await?;
            n
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.l2.health()
    }
}
