//! [`CacheRegistry`]: every cache call of the application goes through it.
//!
//! The active state (the [`Policy`], the backend built for it, and the table of key patterns seen) sits in one
//! [`ArcSwap`]; each call loads it once and sees one consistent snapshot, and a switch replaces it atomically, so
//! a switch never fails a request: calls that started before it finish on the old backend.
//!
//! Per call, by key pattern:
//!
//! - **disabled** (`FEATURE_CACHE=false`): the loader runs directly, unmeasured.
//! - **observed** (impl `null`, or the pattern is not whitelisted): a counted miss, the loader runs and is timed,
//!   a would-be set is counted, and one value in `size_sample_every` has its encoded size measured. No allocation,
//!   no await besides the loader's, no lock.
//! - **served** (whitelisted under `memory` or `redis`): cache-aside. A hit decodes and returns; a miss runs the
//!   loader once per key however many callers miss together (single-flight), then stores the value with the
//!   pattern's TTL. Backend errors and timeouts fail open to the loader and are counted by `error_type`; a
//!   corrupted entry is deleted, counted as `corrupt`, and reloaded.
//!
//! Coherence across switches: invalidations (and sets of patterns that are not served) always reach the active
//! backend, whitelisted or not, enabled or not; and a backend that becomes active after a switch is first flushed
//! of everything under its key prefix, because it missed the invalidations made while it was not active. An
//! invalidation also detaches any load of that key in flight, so a load that began before a write is neither
//! handed to callers that arrive after the write nor stored. What remains is the narrow race of a load that
//! checked before the invalidation and stores after it (see `docs/behaviour.md`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;

use crate::analysis::{self, key_hash, Access, AnalysisOptions, Shards};
use crate::cache::{Cache, CacheImpl, Health, MemoryCache, NullCache, RedisCache, RedisOptions};
use crate::codec::{self, Codec, Json};
use crate::error::{Error, Result};
use crate::flight::{self, Flights, Join};
use crate::metrics::{Metrics, Operation, PatternCounts, PatternMetrics};
use crate::pattern::{validate_key, validate_pattern, KeyPatterns, OTHER};
use crate::policy::{Policy, PolicyUpdate};

/// How many swaps `GET /internal/cache` remembers.
pub const SWAP_HISTORY: usize = 20;

/// Everything a registry needs besides the [`Policy`]; fixed for the registry's life, except `redis`, which
/// [`CacheRegistry::reload`] may replace.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// The initial policy.
    pub policy: Policy,
    /// Key → pattern rule (templates).
    pub key_patterns: KeyPatterns,
    /// Bound on distinct key patterns in metrics; the rest fold into `other`.
    pub max_patterns: usize,
    /// Where Redis is.
    pub redis: RedisOptions,
    /// [`MemoryCache`] bound in entries.
    pub memory_max_entries: u64,
    /// [`MemoryCache`] bound in bytes.
    pub memory_max_bytes: u64,
    /// Largest encoded value stored, in bytes; larger values are served from the loader and not stored.
    pub max_value_bytes: usize,
    /// On the observe path, measure the encoded size of one loaded value in this many (1 = every value).
    pub size_sample_every: u64,
    /// Version of the application's cached value formats, mixed into every entry's type tag: bump it when a cached
    /// type changes meaning in a way serde would still decode, and every older entry becomes a miss.
    pub value_version: u32,
    /// Phase 2: the miss-ratio-curve estimators and the report.
    pub analysis: AnalysisOptions,
    /// The clock for durations and TTLs; `None`: the TSC-backed [`quanta::Clock::new`]. Trace replay passes a mock
    /// clock ([`quanta::Clock::mock`]) that follows the trace's timestamps.
    pub clock: Option<quanta::Clock>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            policy: Policy::default(),
            key_patterns: KeyPatterns::default(),
            max_patterns: 100,
            redis: RedisOptions::default(),
            memory_max_entries: 100_000,
            memory_max_bytes: 256 * 1024 * 1024,
            max_value_bytes: 1024 * 1024,
            size_sample_every: 16,
            value_version: 0,
            analysis: AnalysisOptions::default(),
            clock: None,
        }
    }
}

/// One entry of the swap history.
#[derive(Debug, Clone, Serialize)]
pub struct SwapRecord {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// What asked for it: `startup`, `api`, `sighup`, `retry` or `library`.
    pub source: String,
    /// State version after the swap (unchanged when it failed).
    pub version: u64,
    /// Whether the new state was installed.
    pub ok: bool,
    /// The impl before.
    pub from_impl: CacheImpl,
    /// The impl asked for.
    pub to_impl: CacheImpl,
    /// The whitelist asked for.
    pub whitelist: Vec<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A snapshot of the registry as `GET /internal/cache` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StateView {
    /// Master switch.
    pub enabled: bool,
    /// Active impl.
    #[serde(rename = "impl")]
    pub imp: CacheImpl,
    /// Whitelisted patterns.
    pub whitelist: Vec<String>,
    /// State version, +1 on every successful swap.
    pub version: u64,
    /// The full active policy.
    pub policy: Policy,
    /// Counters per key pattern.
    pub patterns: BTreeMap<String, PatternCounts>,
    /// Recent swaps, oldest first.
    pub swaps: Vec<SwapRecord>,
    /// Redis health when the active impl is `redis`.
    pub redis: Option<Health>,
}

/// Most distinct key patterns a registry tracks (`max_patterns` is clamped to it).
pub const MAX_PATTERNS_LIMIT: usize = 10_000;

/// Per-pattern entry of the pattern table.
struct PatternEntry {
    metrics: Arc<PatternMetrics>,
    /// Its slot: the pattern's tag in the shared estimator and in route × pattern.
    tag: u32,
    /// Its own miss-ratio-curve estimator (the first `analysis.max_patterns` patterns).
    shards: Option<Shards>,
}

/// The estimators shared by all patterns, and the origin of their seconds.
struct Analysis {
    opts: AnalysisOptions,
    shared: Shards,
    epoch: u64,
}

/// Where a sampled call goes in the estimators.
struct Track {
    hash: u64,
    ttl: Option<u32>,
    key_bytes: u64,
    /// The whitelist's estimator, when the key's pattern is served.
    whitelisted: Option<Arc<WhitelistShards>>,
}

/// A sampled get not yet fed to the estimators. It is fed when the call completes ([`PendingGet::finish`]), or, if
/// the caller's future is dropped first (a timeout, a client gone), on drop as a get whose value was not stored: the
/// gets offered count it either way, and a sampled get missing from the sample would be taken for a hit by
/// SHARDS_adj.
struct PendingGet<'a> {
    registry: &'a CacheRegistry,
    entry: &'a PatternEntry,
    track: Option<Track>,
    /// Raw clock reading when the get started.
    at: u64,
}

impl<'a> PendingGet<'a> {
    /// A get starting at raw clock reading `at`; nothing to feed when `track` is `None` (not sampled).
    fn new(
        registry: &'a CacheRegistry,
        entry: &'a PatternEntry,
        track: Option<Track>,
        at: u64,
    ) -> Self {
        PendingGet {
            registry,
            entry,
            track,
            at,
        }
    }

    /// Feeds the get. `value_bytes`: the encoded value's size, when known; `stored`: whether a cache would hold
    /// the value now (not when the loader failed or the value is over `max_value_bytes`:
    /// [`Access::GetNotStored`]).
    fn finish(&mut self, value_bytes: Option<usize>, stored: bool) {
        if let Some(t) = self.track.take() {
            let access = if stored {
                Access::Get
            } else {
                Access::GetNotStored
            };
            self.registry
                .record(self.entry, &t, access, self.at, value_bytes);
        }
    }
}

impl Drop for PendingGet<'_> {
    fn drop(&mut self) {
        self.finish(None, false);
    }
}

/// Pattern name → index into `Inner::slots`.
type PatternMap = HashMap<Box<str>, usize, foldhash::fast::RandomState>;

/// The state every call loads once: policy, backend, and the pattern table (kept here so that one `ArcSwap` load
/// serves a whole call).
#[derive(Clone)]
struct Active {
    policy: Policy,
    backend: Arc<dyn Cache>,
    /// `!backend.always_misses()`, asked once instead of through a virtual call per request.
    stores: bool,
    redis: RedisOptions,
    whitelist: HashSet<String>,
    serves_all: bool,
    ttls: HashMap<String, Duration>,
    default_ttl: Duration,
    version: u64,
    patterns: Arc<PatternMap>,
    /// The estimator of the whitelisted patterns together, while a storing impl serves a whitelist.
    whitelisted: Option<Arc<WhitelistShards>>,
}

/// The miss ratio curve of the cache that serves the whitelist: every whitelisted pattern in one cache. Created when
/// a whitelist starts being served, kept while impl and whitelist stay the same.
struct WhitelistShards {
    shards: Shards,
    /// Gets of whitelisted patterns since it was created.
    gets: std::sync::atomic::AtomicU64,
    /// Raw clock reading when it was created.
    since: u64,
}

impl Active {
    fn new(
        policy: Policy,
        backend: Arc<dyn Cache>,
        redis: RedisOptions,
        version: u64,
        patterns: Arc<PatternMap>,
    ) -> Self {
        let ttls = policy
            .patterns
            .iter()
            .filter_map(|(p, s)| s.ttl_secs.map(|t| (p.clone(), Duration::from_secs(t))))
            .collect();
        Active {
            stores: !backend.always_misses(),
            whitelist: policy.whitelist.iter().cloned().collect(),
            serves_all: policy.serves_all(),
            default_ttl: Duration::from_secs(policy.default_ttl_secs),
            ttls,
            policy,
            backend,
            redis,
            version,
            patterns,
            whitelisted: None,
        }
    }

    fn serves(&self, pattern: &str) -> bool {
        self.stores && (self.serves_all || self.whitelist.contains(pattern))
    }

    fn ttl(&self, pattern: &str) -> Duration {
        self.ttls.get(pattern).copied().unwrap_or(self.default_ttl)
    }
}

/// What a swap installs, decided under the switch lock so concurrent switches never lose one another's change.
enum Change {
    Update(PolicyUpdate),
    Replace(Policy, Option<RedisOptions>),
    /// The start-up policy again, unless someone switched since `if_version`.
    Retry(Policy, u64),
}

struct Inner {
    state: ArcSwap<Active>,
    key_patterns: KeyPatterns,
    metrics: Metrics,
    flights: Arc<Flights>,
    swaps: Mutex<VecDeque<SwapRecord>>,
    switching: tokio::sync::Mutex<()>,
    /// Next free slot, under the lock that serializes new patterns.
    new_pattern: Mutex<usize>,
    /// Set once `other` has taken its slot: later unknown patterns go there without the lock.
    table_full: AtomicBool,
    /// Pattern entries, never moved or dropped before the registry: a call can borrow its entry across the
    /// loader's await without holding the `ArcSwap` guard or cloning an `Arc`. The last slot is `other`'s.
    slots: Box<[OnceLock<PatternEntry>]>,
    clock: quanta::Clock,
    /// Raw clock reading at creation.
    started: u64,
    analysis: Option<Analysis>,
    max_patterns: usize,
    memory_max_entries: u64,
    memory_max_bytes: u64,
    max_value_bytes: usize,
    size_sample_every: u64,
    value_version: u32,
}

/// The cache registry: a cheap, cloneable handle (clones share everything).
///
/// ```no_run
/// # async fn demo() -> Result<(), cache_rollout::Error> {
/// use cache_rollout::{CacheRegistry, RegistryOptions};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct User { id: u64, name: String }
///
/// let cache = CacheRegistry::new(RegistryOptions::default()).await?;
/// let user: Result<User, std::io::Error> = cache
///     .get_or_load("user:42", || async { Ok(User { id: 42, name: "Ada".into() }) })
///     .await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CacheRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CacheRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.state_line())
    }
}

/// Nanoseconds since a raw quanta reading (TSC-based where available: a pair of readings costs about a third of
/// two `std::time::Instant::now` calls on the reference machine).
fn nanos_since(clock: &quanta::Clock, start: u64) -> u64 {
    clock.delta_as_nanos(start, clock.raw())
}

impl CacheRegistry {
    /// Builds a registry and installs `opts.policy` (source `startup`).
    ///
    /// If the policy's backend cannot be built (Redis unreachable), the registry starts observing (impl `null`,
    /// the rest of the policy kept), records the failed swap, and retries every 5 seconds in the background until
    /// it succeeds or another switch happens: the service starts, and caching begins when Redis is there.
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// An invalid policy.
    pub async fn new(opts: RegistryOptions) -> Result<Self> {
        opts.policy.validate()?;
        opts.analysis.validate()?;
        let clock = opts.clock.unwrap_or_default();
        let analysis = opts.analysis.enabled.then(|| Analysis {
            shared: Shards::with_max_rate(
                opts.analysis.shared_sample_keys,
                opts.analysis.max_sampling_rate,
            ),
            epoch: clock.raw(),
            opts: opts.analysis,
        });
        let max_patterns = opts.max_patterns.clamp(1, MAX_PATTERNS_LIMIT);
        let observe = Policy {
            imp: CacheImpl::Null,
            ..opts.policy.clone()
        };
        let initial = Active::new(
            observe,
            Arc::new(NullCache),
            opts.redis.clone(),
            0,
            Arc::default(),
        );
        let registry = CacheRegistry {
            inner: Arc::new(Inner {
                state: ArcSwap::from_pointee(initial),
                key_patterns: opts.key_patterns,
                metrics: Metrics::new(),
                flights: Arc::new(Flights::new()),
                swaps: Mutex::new(VecDeque::new()),
                switching: tokio::sync::Mutex::new(()),
                new_pattern: Mutex::new(0),
                table_full: AtomicBool::new(false),
                slots: (0..=max_patterns).map(|_| OnceLock::new()).collect(),
                started: clock.raw(),
                clock,
                analysis,
                max_patterns,
                memory_max_entries: opts.memory_max_entries,
                memory_max_bytes: opts.memory_max_bytes,
                max_value_bytes: opts.max_value_bytes,
                size_sample_every: opts.size_sample_every,
                value_version: opts.value_version,
            }),
        };
        if registry.inner.analysis.is_some() {
            let gauge = PredictedHitRatio::new(Arc::downgrade(&registry.inner));
            if let Err(e) = registry.inner.metrics.registry().register(Box::new(gauge)) {
                tracing::warn!(error = %e, "cache: cache_predicted_hit_ratio not registered");
            }
        }
        let target = opts.policy;
        registry
            .inner
            .metrics
            .set_enabled(target.enabled, CacheImpl::Null);
        if let Err(e) = registry
            .install(Change::Replace(target.clone(), None), "startup")
            .await
        {
            tracing::warn!(error = %e, "cache: {} unavailable at start-up; observing until it is", target.imp);
            tracing::info!(source = "startup", "{}", registry.state_line());
            registry.spawn_retry(target);
        }
        Ok(registry)
    }

    fn spawn_retry(&self, target: Policy) {
        let weak = Arc::downgrade(&self.inner);
        let since = self.inner.state.load().version;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(inner) = weak.upgrade() else { return };
                let reg = CacheRegistry { inner };
                match reg
                    .install(Change::Retry(target.clone(), since), "retry")
                    .await
                {
                    Ok(_) => return, // installed, or superseded by a newer switch
                    Err(_) => continue,
                }
            }
        });
    }

    /// The metric families (for `GET /metrics`, or to register your own).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The key pattern of `key` under this registry's templates.
    pub fn pattern_of<'k>(&'k self, key: &'k str) -> std::borrow::Cow<'k, str> {
        self.inner.key_patterns.pattern_of(key)
    }

    /// The pattern's entry, created (or folded into `other`) on first sight.
    fn entry(&self, state: &Active, pattern: &str) -> &PatternEntry {
        let idx = match state.patterns.get(pattern) {
            Some(&i) => i,
            None => self.new_entry(pattern),
        };
        self.slot(idx)
    }

    fn slot(&self, idx: usize) -> &PatternEntry {
        // `new_entry` initialises a slot before its index reaches the map (or `table_full`), so this never
        // creates anything; `get_or_init` only spares an `expect`.
        self.inner.slots[idx].get_or_init(|| self.new_pattern_entry(OTHER, idx))
    }

    fn new_pattern_entry(&self, name: &str, idx: usize) -> PatternEntry {
        let shards = self.inner.analysis.as_ref().and_then(|a| {
            (idx < a.opts.max_patterns && idx < self.inner.max_patterns)
                .then(|| Shards::with_max_rate(a.opts.sample_keys, a.opts.max_sampling_rate))
        });
        PatternEntry {
            metrics: self.inner.metrics.pattern(name),
            tag: idx as u32,
            shards,
        }
    }

    #[cold]
    fn new_entry(&self, pattern: &str) -> usize {
        if self.inner.table_full.load(Ordering::Acquire) {
            return self.inner.max_patterns; // past the bound: `other`, without the lock
        }
        let mut next_slot = self
            .inner
            .new_pattern
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let cur = self.inner.state.load();
        if let Some(&i) = cur.patterns.get(pattern) {
            return i;
        }
        let other = self.inner.max_patterns;
        // Slots are handed out by a counter that only grows, never by the map's size, so no two names can ever
        // share a slot whatever happens to the map.
        let (name, idx) = if *next_slot < other {
            *next_slot += 1;
            (pattern, *next_slot - 1)
        } else {
            (OTHER, other)
        };
        if let Some(&i) = cur.patterns.get(name) {
            return i;
        }
        self.inner.slots[idx].get_or_init(|| self.new_pattern_entry(name, idx));
        self.inner.state.rcu(|cur| {
            let mut patterns = PatternMap::clone(&cur.patterns);
            patterns.insert(name.into(), idx);
            Active {
                patterns: Arc::new(patterns),
                ..Active::clone(cur)
            }
        });
        if idx == other {
            self.inner.table_full.store(true, Ordering::Release);
        }
        idx
    }

    /// Typed cache-aside: the value under `key`, or the loader's value, which is then stored.
    ///
    /// `T` is encoded with serde_json inside a versioned, checksummed envelope ([`codec`]). Cache failures never
    /// reach the caller: they are counted and the loader runs (fail-open). A malformed key (see
    /// [`validate_key`]) bypasses the cache, is counted as `invalid_key`, and the loader runs.
    ///
    /// # Errors
    /// Only the loader's own error, which is returned as is and not cached.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, E>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_load_with(key, || async { loader().await.map(Json) })
            .await
            .map(|Json(v)| v)
    }

    /// [`get_or_load`](Self::get_or_load) for raw bytes (no serde; still in the envelope). Used by `replay`.
    ///
    /// # Errors
    /// Only the loader's own error.
    pub async fn get_or_load_bytes<E, F, Fut>(&self, key: &str, loader: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        self.get_or_load_with(key, loader).await
    }

    async fn get_or_load_with<C, E, F, Fut>(&self, key: &str, loader: F) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let (entry, served, track) = {
            let state = self.inner.state.load();
            if !state.policy.enabled {
                drop(state);
                return loader().await;
            }
            if validate_key(key).is_err() {
                self.inner
                    .metrics
                    .error(state.backend.kind(), "invalid_key");
                drop(state);
                return loader().await;
            }
            let mut buf = None;
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            let entry = self.entry(&state, &pattern);
            let serves = state.serves(&pattern);
            let track = self.track(&state, entry, &pattern, key, serves);
            if serves {
                if let Some(w) = &state.whitelisted {
                    w.gets.fetch_add(1, Ordering::Relaxed);
                }
            }
            let served = serves.then(|| (Arc::clone(&state.backend), state.ttl(&pattern)));
            (entry, served, track)
        };
        match served {
            None => self.observe(entry, track, loader).await,
            Some((backend, ttl)) => self.serve(key, entry, track, &*backend, ttl, loader).await,
        }
    }

    /// The call's place in the estimators when its key is sampled by the pattern's or the shared one.
    /// `served`: whether the pattern is served now (its calls also feed the whitelist's estimator).
    #[inline]
    fn track(
        &self,
        state: &Active,
        entry: &PatternEntry,
        pattern: &str,
        key: &str,
        served: bool,
    ) -> Option<Track> {
        let a = self.inner.analysis.as_ref()?;
        let hash = key_hash(key);
        let whitelisted = state.whitelisted.as_ref().filter(|_| served);
        if !(a.shared.samples(hash)
            || entry.shards.as_ref().is_some_and(|s| s.samples(hash))
            || whitelisted.is_some_and(|w| w.shards.samples(hash)))
        {
            return None;
        }
        Some(self.track_cold(state, pattern, key, hash, a, whitelisted))
    }

    #[cold]
    fn track_cold(
        &self,
        state: &Active,
        pattern: &str,
        key: &str,
        hash: u64,
        a: &Analysis,
        whitelisted: Option<&Arc<WhitelistShards>>,
    ) -> Track {
        let ttl = (!a.opts.ignore_ttl)
            .then(|| state.ttl(pattern).as_secs().min(u64::from(u32::MAX)) as u32);
        Track {
            hash,
            ttl,
            key_bytes: (key.len() + state.redis.key_prefix.len()) as u64,
            whitelisted: whitelisted.cloned(),
        }
    }

    /// Feeds a sampled access, made at raw clock reading `at`, to the pattern's and the shared estimators.
    /// `value_bytes`: the encoded value's size, when known.
    fn record(
        &self,
        entry: &PatternEntry,
        t: &Track,
        access: Access,
        at: u64,
        value_bytes: Option<usize>,
    ) {
        let Some(a) = &self.inner.analysis else {
            return;
        };
        let now = (self.inner.clock.delta_as_nanos(a.epoch, at) / 1_000_000_000)
            .min(u64::from(u32::MAX)) as u32;
        let weight = value_bytes.map(|v| {
            analysis::redis_entry_bytes(t.key_bytes, v as u64, a.opts.per_key_overhead_bytes)
                .min(u64::from(u32::MAX)) as u32
        });
        if let Some(s) = &entry.shards {
            s.access(t.hash, access, now, weight, t.ttl, entry.tag);
        }
        a.shared
            .access(t.hash, access, now, weight, t.ttl, entry.tag);
        if let Some(w) = &t.whitelisted {
            w.shards
                .access(t.hash, access, now, weight, t.ttl, entry.tag);
        }
    }

    /// Takes a sampled key out of the estimators' caches (a write of it was refused, and its old copy deleted).
    fn forget(&self, entry: &PatternEntry, t: &Track) {
        let Some(a) = &self.inner.analysis else {
            return;
        };
        if let Some(s) = &entry.shards {
            s.delete(t.hash, entry.tag);
        }
        a.shared.delete(t.hash, entry.tag);
        if let Some(w) = &t.whitelisted {
            w.shards.delete(t.hash, entry.tag);
        }
    }

    async fn observe<C, E, F, Fut>(
        &self,
        entry: &PatternEntry,
        track: Option<Track>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let m = &entry.metrics;
        m.miss(CacheImpl::Null);
        let clock = &self.inner.clock;
        let start = clock.raw();
        let mut pending = PendingGet::new(self, entry, track, start);
        let r = loader().await;
        let nanos = nanos_since(clock, start);
        m.observed_load(nanos, r.is_ok());
        analysis::record_call(entry.tag, nanos);
        let mut size = None;
        if let Ok(v) = &r {
            let sized = m.sample_size(self.inner.size_sample_every);
            if sized || pending.track.is_some() {
                let bytes = codec::HEADER_BYTES + v.payload_len();
                if sized {
                    m.value_size.observe(bytes as f64);
                }
                size = Some(bytes);
            }
        }
        // A cache would not store a failed load, nor a value over `max_value_bytes`.
        let stored = r.is_ok() && size.is_none_or(|b| b <= self.inner.max_value_bytes);
        pending.finish(size, stored);
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve<C, E, F, Fut>(
        &self,
        key: &str,
        entry: &PatternEntry,
        track: Option<Track>,
        backend: &dyn Cache,
        ttl: Duration,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let m = &entry.metrics;
        let imp = backend.kind();
        let metrics = &self.inner.metrics;
        let version = self.inner.value_version;
        let clock = &self.inner.clock;
        let start = clock.raw();
        let mut pending = PendingGet::new(self, entry, track, start);
        let got = backend.get(key).await;
        metrics
            .op_duration(imp, Operation::Get)
            .observe_nanos(nanos_since(clock, start));
        let mut backend_ok = true;
        match got {
            Ok(Some(bytes)) => match (bytes.len(), codec::decode::<C>(bytes, version)) {
                (len, Ok(v)) => {
                    m.hit(imp);
                    analysis::record_call(entry.tag, 0);
                    pending.finish(Some(len), true);
                    return Ok(v);
                }
                (_, Err(e)) => {
                    metrics.error(imp, e.error_type());
                    tracing::warn!(key, error = %e, "cache: corrupted entry deleted");
                    if let Err(e) = backend.delete(key).await {
                        metrics.error(imp, e.error_type());
                    }
                }
            },
            Ok(None) => {}
            Err(e) => {
                metrics.error(imp, e.error_type());
                tracing::debug!(key, error = %e, "cache: get failed, falling back to the loader");
                backend_ok = false;
            }
        }
        m.miss(imp);
        let leader = match self.inner.flights.join(key) {
            Join::Follower(rx) => {
                if let Some(bytes) = flight::wait(rx).await {
                    let len = bytes.len();
                    if let Ok(v) = codec::decode::<C>(bytes, version) {
                        m.coalesced();
                        analysis::record_call(entry.tag, 0);
                        pending.finish(Some(len), true);
                        return Ok(v);
                    }
                }
                None // the leader failed or was detached: load ourselves, without storing over a newer load
            }
            Join::Leader(guard) => Some(guard),
        };
        let load_start = clock.raw();
        let loaded = loader().await;
        let nanos = nanos_since(clock, load_start);
        m.loader_nanos(nanos);
        analysis::record_call(entry.tag, nanos);
        let value = match loaded {
            Ok(v) => v,
            Err(e) => {
                pending.finish(None, false);
                return Err(e);
            }
        };
        if leader.as_ref().is_none_or(flight::LeaderGuard::is_detached) {
            // An invalidation arrived while loading (or we are a follower whose leader failed): this value may
            // predate a write, so it is returned to this caller only, never shared or stored.
            let size = pending
                .track
                .as_ref()
                .map(|_| codec::HEADER_BYTES + value.payload_len());
            pending.finish(size, false);
            return Ok(value);
        }
        let bytes = match codec::encode(key, &value, version) {
            Ok(b) => b,
            Err(e) => {
                metrics.error(imp, e.error_type());
                tracing::warn!(key, error = %e, "cache: value not stored");
                pending.finish(None, false);
                return Ok(value);
            }
        };
        pending.finish(Some(bytes.len()), bytes.len() <= self.inner.max_value_bytes);
        m.value_size.observe(bytes.len() as f64);
        if let Some(g) = &leader {
            g.publish(bytes.clone());
        }
        if bytes.len() > self.inner.max_value_bytes {
            metrics.error(imp, "too_large");
            tracing::warn!(
                key,
                size = bytes.len(),
                max = self.inner.max_value_bytes,
                "cache: value too large, not stored"
            );
        } else if backend_ok {
            // A failed set is counted inside; the caller has its value either way.
            let _ = self.timed_set(backend, m, key, bytes, ttl).await;
        }
        drop(leader);
        Ok(value)
    }

    async fn timed_set(
        &self,
        backend: &dyn Cache,
        m: &PatternMetrics,
        key: &str,
        bytes: Bytes,
        ttl: Duration,
    ) -> Result<()> {
        let imp = backend.kind();
        let clock = &self.inner.clock;
        let start = clock.raw();
        let r = backend.set(key, bytes, Some(ttl)).await;
        self.inner
            .metrics
            .op_duration(imp, Operation::Set)
            .observe_nanos(nanos_since(clock, start));
        match r {
            Ok(()) => {
                m.set(imp);
                Ok(())
            }
            Err(e) => {
                self.inner.metrics.error(imp, e.error_type());
                tracing::debug!(key, error = %e, "cache: set failed");
                Err(e)
            }
        }
    }

    /// Stores `value` under `key` with the pattern's TTL. For a pattern that is not served (or with caching
    /// disabled) the write is only counted, and the key is deleted from the active backend so that an older copy
    /// can never be served later.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::Encode`], [`Error::ValueTooLarge`], or the backend's error (also counted).
    pub async fn set<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<()> {
        self.set_value(key, &JsonRef(value)).await
    }

    /// [`set`](Self::set) for raw bytes.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_bytes(&self, key: &str, value: Bytes) -> Result<()> {
        self.set_value(key, &value).await
    }

    async fn set_value<C: Codec>(&self, key: &str, value: &C) -> Result<()> {
        validate_key(key)?;
        let state = self.inner.state.load_full();
        let (entry, ttl, track) = {
            let mut buf = None;
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            let entry = self.entry(&state, &pattern);
            let serves = state.serves(&pattern);
            let track = state
                .policy
                .enabled
                .then(|| self.track(&state, entry, &pattern, key, serves))
                .flatten();
            (entry, serves.then(|| state.ttl(&pattern)), track)
        };
        if state.policy.enabled {
            entry.metrics.write();
        }
        if let Some(t) = &track {
            let size = codec::HEADER_BYTES + value.payload_len();
            if size <= self.inner.max_value_bytes {
                self.record(entry, t, Access::Set, self.inner.clock.raw(), Some(size));
            } else {
                self.forget(entry, t); // refused as too large: the key is not in the cache after this
            }
        }
        // Under the NullCache there is nothing to detach or delete: a load left over from an earlier backend can
        // only store into a backend that is flushed before it is active again.
        if state.stores {
            // Whatever happens below, a load of this key in flight predates this value.
            self.inner.flights.detach(key);
        }
        let Some(ttl) = ttl.filter(|_| state.policy.enabled) else {
            if state.policy.enabled {
                // Observed: count the write, size one in `size_sample_every` without encoding.
                entry.metrics.set(CacheImpl::Null);
                if entry.metrics.sample_size(self.inner.size_sample_every) {
                    entry
                        .metrics
                        .value_size
                        .observe((codec::HEADER_BYTES + value.payload_len()) as f64);
                }
            }
            if !state.stores {
                return Ok(());
            }
            // The active backend may hold an older copy (see the module docs): drop it.
            return state.backend.delete(key).await.map(|_| ());
        };
        let bytes = codec::encode(key, value, self.inner.value_version)?;
        let imp = state.backend.kind();
        if bytes.len() > self.inner.max_value_bytes {
            self.inner.metrics.error(imp, "too_large");
            // The old value is stale now that the caller has a new one: do not leave it behind.
            let _ = state.backend.delete(key).await;
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: bytes.len(),
                max: self.inner.max_value_bytes,
            });
        }
        entry.metrics.value_size.observe(bytes.len() as f64);
        self.timed_set(&*state.backend, &entry.metrics, key, bytes, ttl)
            .await
    }

    /// Deletes `key` from the active backend (whitelisted or not, see the module docs) and detaches any load of it
    /// in flight; `true` when it was present.
    ///
    /// With caching disabled the delete still happens (unmeasured), so that re-enabling never serves a value
    /// older than a write made in between.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], or the backend's error (also counted): the caller must know that a stale value may
    /// remain until its TTL.
    pub async fn invalidate(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        let state = self.inner.state.load_full();
        if state.stores {
            self.inner.flights.detach(key);
        }
        if !state.policy.enabled {
            return state.backend.delete(key).await;
        }
        let (entry, served) = {
            let mut buf = None;
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            (self.entry(&state, &pattern), state.serves(&pattern))
        };
        let imp = state.backend.kind();
        entry.metrics.del(imp);
        self.inner.metrics.invalidated(imp, "key");
        if let Some(a) = &self.inner.analysis {
            let hash = key_hash(key);
            if let Some(s) = &entry.shards {
                s.delete(hash, entry.tag);
            }
            a.shared.delete(hash, entry.tag);
            if let Some(w) = state.whitelisted.as_ref().filter(|_| served) {
                w.shards.delete(hash, entry.tag);
            }
        }
        if !state.stores {
            return Ok(false); // the NullCache holds nothing
        }
        let clock = &self.inner.clock;
        let start = clock.raw();
        let r = state.backend.delete(key).await;
        self.inner
            .metrics
            .op_duration(imp, Operation::Delete)
            .observe_nanos(nanos_since(clock, start));
        r.inspect_err(|e| self.inner.metrics.error(imp, e.error_type()))
    }

    /// Deletes every key of `pattern` from the active backend (Redis: `SCAN` + `UNLINK`) and detaches the
    /// pattern's loads in flight; returns how many keys were deleted.
    ///
    /// # Errors
    /// [`Error::InvalidPattern`], or the backend's error (also counted).
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<u64> {
        validate_pattern(pattern)?;
        let kp = &self.inner.key_patterns;
        if pattern == "*" {
            self.inner.flights.detach_matching(|_| true);
        } else {
            self.inner
                .flights
                .detach_matching(|k| kp.pattern_of(k) == pattern);
        }
        let state = self.inner.state.load_full();
        let imp = state.backend.kind();
        self.inner.metrics.invalidated(imp, "pattern");
        if let Some(a) = &self.inner.analysis {
            if pattern == "*" {
                for &i in state.patterns.values() {
                    if let Some(s) = &self.slot(i).shards {
                        s.delete_all(None);
                    }
                }
                a.shared.delete_all(None);
                if let Some(w) = &state.whitelisted {
                    w.shards.delete_all(None);
                }
            } else if let Some(&i) = state.patterns.get(pattern) {
                let entry = self.slot(i);
                if let Some(s) = &entry.shards {
                    s.delete_all(None);
                }
                a.shared.delete_all(Some(entry.tag));
                if let Some(w) = &state.whitelisted {
                    w.shards.delete_all(Some(entry.tag));
                }
            }
        }
        let clock = &self.inner.clock;
        let start = clock.raw();
        let r = self.delete_pattern_in(&*state.backend, pattern).await;
        self.inner
            .metrics
            .op_duration(imp, Operation::DeletePattern)
            .observe_nanos(nanos_since(clock, start));
        r.inspect_err(|e| self.inner.metrics.error(imp, e.error_type()))
    }

    async fn delete_pattern_in(&self, backend: &dyn Cache, pattern: &str) -> Result<u64> {
        if pattern == "*" {
            return backend.delete_matching("", &|_| true).await;
        }
        let prefix = literal_prefix(pattern);
        let kp = &self.inner.key_patterns;
        backend
            .delete_matching(prefix, &|k| kp.pattern_of(k) == pattern)
            .await
    }

    /// Applies `update` at runtime: builds (and for Redis, connects) the new backend first, flushes it if it was not
    /// active before, then swaps atomically. On failure the old state stays in place. Switches are serialized and
    /// each applies to the state left by the previous one; calls in progress are never failed.
    ///
    /// # Errors
    /// An invalid update ([`Error::Config`], [`Error::InvalidPattern`]); an unreachable Redis ([`Error::Redis`],
    /// [`Error::Timeout`]).
    pub async fn switch(&self, update: &PolicyUpdate) -> Result<StateView> {
        self.switch_from(update, "library").await
    }

    /// [`switch`](Self::switch) with the source recorded in the swap history (`api`, `sighup`, …).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub async fn switch_from(&self, update: &PolicyUpdate, source: &str) -> Result<StateView> {
        self.install(Change::Update(update.clone()), source).await?;
        Ok(self.state().await)
    }

    /// Replaces the whole policy and the Redis options (SIGHUP: the configuration files were re-read).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub async fn reload(&self, policy: Policy, redis: RedisOptions) -> Result<StateView> {
        self.install(Change::Replace(policy, Some(redis)), "sighup")
            .await?;
        Ok(self.state().await)
    }

    async fn install(&self, change: Change, source: &str) -> Result<()> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let cur = self.inner.state.load_full();
        let (policy, redis) = match change {
            Change::Update(u) => (cur.policy.merged(&u)?, cur.redis.clone()),
            Change::Replace(p, r) => {
                p.validate()?;
                (p, r.unwrap_or_else(|| cur.redis.clone()))
            }
            Change::Retry(p, since) => {
                if cur.version != since {
                    return Ok(()); // someone switched since start-up: their choice wins
                }
                (p, cur.redis.clone())
            }
        };
        let result = self.prepare(&cur, &policy, &redis).await;
        let version = cur.version + u64::from(result.is_ok());
        let record = SwapRecord {
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            source: source.to_string(),
            version,
            ok: result.is_ok(),
            from_impl: cur.policy.imp,
            to_impl: policy.imp,
            whitelist: policy.whitelist.clone(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        let backend = match result {
            Ok(b) => b,
            Err(e) if source == "retry" => {
                // The start-up failure is on record already; repeating it every 5 s would push the history out.
                tracing::debug!(to = %policy.imp, error = %e, "cache: start-up retry failed");
                return Err(e);
            }
            Err(e) => {
                self.inner.metrics.swap(false);
                tracing::warn!(source, to = %policy.imp, error = %e, "cache: swap refused, previous state kept");
                self.push_swap(record);
                return Err(e);
            }
        };
        self.inner.metrics.swap(true);
        let (enabled, imp) = (policy.enabled, policy.imp);
        let mut next = Active::new(policy, backend, redis, version, Arc::default());
        next.whitelisted = self.whitelist_estimator(&cur, &next);
        // rcu, not store: a pattern first seen during the swap must not be lost.
        self.inner.state.rcu(|cur| Active {
            patterns: Arc::clone(&cur.patterns),
            ..next.clone()
        });
        self.inner.metrics.set_enabled(enabled, imp);
        self.push_swap(record);
        tracing::info!(source, version, "{}", self.state_line());
        Ok(())
    }

    /// The whitelist's estimator for `next`: the current one while impl and whitelist stay, a new one when they
    /// change, none when nothing is served (or the analysis is off).
    fn whitelist_estimator(&self, cur: &Active, next: &Active) -> Option<Arc<WhitelistShards>> {
        let a = self.inner.analysis.as_ref()?;
        if !next.stores || next.policy.whitelist.is_empty() {
            return None;
        }
        if cur.policy.imp == next.policy.imp && cur.policy.whitelist == next.policy.whitelist {
            if let Some(w) = &cur.whitelisted {
                return Some(Arc::clone(w));
            }
        }
        Some(Arc::new(WhitelistShards {
            shards: Shards::with_max_rate(a.opts.shared_sample_keys, a.opts.max_sampling_rate),
            gets: std::sync::atomic::AtomicU64::new(0),
            since: self.inner.clock.raw(),
        }))
    }

    async fn prepare(
        &self,
        cur: &Active,
        policy: &Policy,
        redis: &RedisOptions,
    ) -> Result<Arc<dyn Cache>> {
        let same_impl = policy.imp == cur.policy.imp;
        if same_impl && (policy.imp != CacheImpl::Redis || *redis == cur.redis) {
            return Ok(Arc::clone(&cur.backend));
        }
        // The same Redis data behind a new connection (only a timeout changed): everything it holds saw every
        // invalidation, so it is reconnected but not flushed.
        let same_data = same_impl
            && redis.url == cur.redis.url
            && redis.key_prefix == cur.redis.key_prefix
            && redis.tls_ca_file == cur.redis.tls_ca_file;
        let backend: Arc<dyn Cache> = match policy.imp {
            CacheImpl::Null => Arc::new(NullCache),
            CacheImpl::Memory => Arc::new(MemoryCache::new(
                self.inner.memory_max_entries,
                self.inner.memory_max_bytes,
            )),
            CacheImpl::Redis => Arc::new(RedisCache::connect(redis.clone()).await?),
        };
        // Otherwise the new backend missed every invalidation made while it was not active (in this process or a
        // previous one): drop everything it holds under its prefix before it serves anything.
        if !backend.always_misses() && !same_data {
            let n = backend.delete_matching("", &|_| true).await?;
            tracing::info!(imp = %policy.imp, deleted = n, "cache: flushed the newly active backend");
        }
        Ok(backend)
    }

    fn push_swap(&self, record: SwapRecord) {
        let mut swaps = self
            .inner
            .swaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if swaps.len() == SWAP_HISTORY {
            swaps.pop_front();
        }
        swaps.push_back(record);
    }

    /// The active policy.
    pub fn policy(&self) -> Policy {
        self.inner.state.load().policy.clone()
    }

    /// The active Redis options (those of the last successful swap).
    pub fn redis_options(&self) -> RedisOptions {
        self.inner.state.load().redis.clone()
    }

    /// One line for logs: `cache: enabled impl=null whitelist=[]`.
    pub fn state_line(&self) -> String {
        let s = self.inner.state.load();
        format!(
            "cache: {} impl={} whitelist=[{}]",
            if s.policy.enabled {
                "enabled"
            } else {
                "disabled"
            },
            s.policy.imp,
            s.policy.whitelist.join(",")
        )
    }

    /// Counters of every key pattern seen so far.
    pub fn pattern_counts(&self) -> BTreeMap<String, PatternCounts> {
        self.inner
            .state
            .load()
            .patterns
            .iter()
            .map(|(name, &i)| (name.to_string(), self.slot(i).metrics.counts()))
            .collect()
    }

    /// The phase-2 analysis (`GET /internal/cache/report`): per-pattern and shared miss ratio curves, memory,
    /// origin time saved, route × pattern, and the recommendation. Empty predictions when the analysis is disabled.
    pub fn report(&self) -> analysis::Report {
        use prometheus::core::Metric as _;
        let s = self.inner.state.load_full();
        let (capacities, overhead, ignore_ttl) = match &self.inner.analysis {
            Some(a) => (
                a.opts.capacities.clone(),
                a.opts.per_key_overhead_bytes,
                a.opts.ignore_ttl,
            ),
            None => (
                AnalysisOptions::default().capacities,
                analysis::REDIS_PER_KEY_OVERHEAD_BYTES,
                false,
            ),
        };
        let observed_seconds = self.observed_seconds();
        let mut names: Vec<(&str, usize)> = s.patterns.iter().map(|(n, &i)| (&**n, i)).collect();
        names.sort_unstable_by_key(|&(_, i)| i);
        let mut total_gets = 0;
        let (mut loader_secs, mut loader_calls) = (0.0, 0u64);
        let patterns: Vec<_> = names
            .iter()
            .map(|&(name, i)| {
                let e = self.slot(i);
                let counts = e.metrics.counts();
                total_gets += counts.gets;
                let loader = e.metrics.loader_proto();
                loader_secs += loader.get_sample_sum();
                loader_calls += loader.get_sample_count();
                analysis::PatternInput {
                    name: name.to_string(),
                    gets: counts.gets,
                    hits: counts.hits,
                    writes: counts.writes,
                    deletes: counts.deletes,
                    served: s.serves(name),
                    ttl_secs: (!ignore_ttl).then(|| s.ttl(name).as_secs()),
                    policy_ttl_secs: s.ttl(name).as_secs(),
                    loader,
                    value_size: e.metrics.value_size.metric().get_histogram().clone(),
                    curve: e.shards.as_ref().map(|sh| sh.curve(counts.gets)),
                }
            })
            .collect();
        let mean_loader = if loader_calls > 0 {
            loader_secs / loader_calls as f64
        } else {
            0.0
        };
        let shared = self.inner.analysis.as_ref().map(|a| {
            let (curve, stats) = a.shared.curve(total_gets);
            analysis::shared_report(
                total_gets,
                &curve,
                &stats,
                &capacities,
                observed_seconds,
                mean_loader,
            )
        });
        let whitelisted = s.whitelisted.as_ref().map(|w| {
            let gets = w.gets.load(Ordering::Relaxed);
            let (curve, stats) = w.shards.curve(gets);
            let since = self
                .inner
                .clock
                .delta_as_nanos(w.since, self.inner.clock.raw()) as f64
                * 1e-9;
            analysis::shared_report(gets, &curve, &stats, &capacities, since, mean_loader)
        });
        let tags: HashMap<u32, &str> = names.iter().map(|&(n, i)| (i as u32, n)).collect();
        let routes = self
            .inner
            .metrics
            .routes()
            .into_iter()
            .map(|(route, method, m)| analysis::RouteInput {
                method,
                route,
                requests: m.requests.get(),
                seconds: m.duration.get_sample_sum(),
                calls: m
                    .calls
                    .snapshot()
                    .into_iter()
                    .map(|(t, n, ns)| (tags.get(&t).map_or(OTHER, |n| *n).to_string(), n, ns))
                    .collect(),
            })
            .collect();
        analysis::build(
            analysis::ReportContext {
                capacities: &capacities,
                per_key_overhead_bytes: overhead,
                observed_seconds,
                generated_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            },
            patterns,
            shared,
            whitelisted,
            routes,
        )
    }

    /// Predicted hit ratio of every pattern together in one LRU cache of `bytes` bytes (keys, values and the
    /// per-key overhead counted); `None` when the analysis is disabled.
    pub fn predicted_hit_ratio_at_bytes(&self, bytes: u64) -> Option<f64> {
        let a = self.inner.analysis.as_ref()?;
        let s = self.inner.state.load();
        let gets = s
            .patterns
            .values()
            .map(|&i| self.slot(i).metrics.counts().gets)
            .sum();
        Some(a.shared.curve(gets).0.hit_ratio_at_bytes(bytes as f64))
    }

    /// Seconds since the registry started, on its clock.
    fn observed_seconds(&self) -> f64 {
        let epoch = self
            .inner
            .analysis
            .as_ref()
            .map_or(self.inner.started, |a| a.epoch);
        self.inner
            .clock
            .delta_as_nanos(epoch, self.inner.clock.raw()) as f64
            * 1e-9
    }

    /// Predicted hit ratios at the configured capacities, per pattern with an estimator and for all patterns
    /// together (`key_pattern="*"`), for the `cache_predicted_hit_ratio` gauge: (pattern, capacity, ratio).
    pub(crate) fn predicted_hit_ratios(&self) -> Vec<(String, u64, f64)> {
        let Some(a) = &self.inner.analysis else {
            return Vec::new();
        };
        let s = self.inner.state.load();
        let mut out = Vec::new();
        let mut total = 0;
        for (name, &i) in s.patterns.iter() {
            let e = self.slot(i);
            let gets = e.metrics.counts().gets;
            total += gets;
            if let Some(sh) = &e.shards {
                let (curve, _) = sh.curve(gets);
                for &c in &a.opts.capacities {
                    out.push((name.to_string(), c, curve.hit_ratio_at_objects(c as f64)));
                }
            }
        }
        let (curve, _) = a.shared.curve(total);
        for &c in &a.opts.capacities {
            out.push(("*".to_string(), c, curve.hit_ratio_at_objects(c as f64)));
        }
        out
    }

    /// A snapshot for `GET /internal/cache`, with a Redis health check (at most 250 ms) when the impl is `redis`.
    pub async fn state(&self) -> StateView {
        let s = self.inner.state.load_full();
        let redis = if s.backend.kind() == CacheImpl::Redis {
            Some(
                tokio::time::timeout(Duration::from_millis(250), s.backend.health())
                    .await
                    .unwrap_or_else(|_| Health {
                        up: false,
                        latency_ms: None,
                        error: Some("health check timed out after 250 ms".into()),
                    }),
            )
        } else {
            None
        };
        StateView {
            enabled: s.policy.enabled,
            imp: s.policy.imp,
            whitelist: s.policy.whitelist.clone(),
            version: s.version,
            policy: s.policy.clone(),
            patterns: self.pattern_counts(),
            swaps: self
                .inner
                .swaps
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned()
                .collect(),
            redis,
        }
    }
}

/// `cache_predicted_hit_ratio{key_pattern,capacity}`: the estimators' predictions at the configured capacities,
/// computed at scrape time. `key_pattern` is a pattern with its own estimator (at most `analysis.max_patterns`) or
/// `*` for all patterns in one cache; `capacity` one of the (at most 8) configured capacities, in objects.
struct PredictedHitRatio {
    registry: std::sync::Weak<Inner>,
    desc: prometheus::core::Desc,
}

impl PredictedHitRatio {
    fn new(registry: std::sync::Weak<Inner>) -> Self {
        let desc = prometheus::core::Desc::new(
            "cache_predicted_hit_ratio".into(),
            "Predicted LRU hit ratio (0-1) of a cache of `capacity` objects, per key pattern (`*`: all patterns in \
             one cache), from the SHARDS miss ratio curve."
                .into(),
            vec!["key_pattern".into(), "capacity".into()],
            HashMap::new(),
        )
        .expect("valid gauge description");
        PredictedHitRatio { registry, desc }
    }
}

impl prometheus::core::Collector for PredictedHitRatio {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let Some(inner) = self.registry.upgrade() else {
            return Vec::new();
        };
        let registry = CacheRegistry { inner };
        let metrics = registry
            .predicted_hit_ratios()
            .into_iter()
            .map(|(pattern, capacity, ratio)| {
                let mut m = proto::Metric::default();
                let mut labels = Vec::with_capacity(2);
                for (n, v) in [("capacity", capacity.to_string()), ("key_pattern", pattern)] {
                    let mut l = proto::LabelPair::default();
                    l.set_name(n.to_string());
                    l.set_value(v);
                    labels.push(l);
                }
                m.set_label(labels);
                let mut g = proto::Gauge::default();
                g.set_value(ratio);
                m.set_gauge(g);
                m
            })
            .collect();
        let mut family = proto::MetricFamily::default();
        family.set_name("cache_predicted_hit_ratio".into());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::GAUGE);
        family.set_metric(metrics);
        vec![family]
    }
}

/// The part of a pattern before its first `*` segment: every key of the pattern starts with it.
fn literal_prefix(pattern: &str) -> &str {
    match pattern.find('*') {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

/// Encodes a borrowed value with the same type tag as [`Json<T>`], for `set`.
struct JsonRef<'a, T>(&'a T);

impl<T: Serialize + serde::de::DeserializeOwned> Codec for JsonRef<'_, T> {
    fn write_payload(
        &self,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<(), serde_json::Error> {
        serde_json::to_writer(bytes::BufMut::writer(out), self.0)
    }
    fn read_payload(_payload: Bytes) -> std::result::Result<Self, String> {
        Err("JsonRef only encodes".into())
    }
    fn type_tag() -> u32 {
        <Json<T> as Codec>::type_tag()
    }
    fn payload_len(&self) -> usize {
        codec::json_len(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PatternPolicy;

    fn active(policy: Policy, backend: Arc<dyn Cache>) -> Active {
        Active::new(policy, backend, RedisOptions::default(), 1, Arc::default())
    }

    #[test]
    fn whitelist_decides_what_is_served() {
        let policy = Policy {
            imp: CacheImpl::Memory,
            whitelist: vec!["user".into()],
            ..Policy::default()
        };
        let a = active(policy.clone(), Arc::new(MemoryCache::new(10, 1000)));
        assert!(a.serves("user"));
        assert!(!a.serves("project"));
        let all = Policy {
            whitelist: vec!["*".into()],
            ..policy.clone()
        };
        assert!(active(all.clone(), Arc::new(MemoryCache::new(10, 1000))).serves("project"));
        assert!(
            !active(all, Arc::new(NullCache)).serves("user"),
            "the NullCache serves nothing even when whitelisted"
        );
    }

    #[test]
    fn pattern_ttl_overrides_default() {
        let policy = Policy {
            patterns: BTreeMap::from([("user".into(), PatternPolicy { ttl_secs: Some(60) })]),
            ..Policy::default()
        };
        let a = active(policy, Arc::new(NullCache));
        assert_eq!(a.ttl("user"), Duration::from_secs(60));
        assert_eq!(a.ttl("project"), Duration::from_secs(300));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        assert_eq!(literal_prefix("user"), "user");
        assert_eq!(literal_prefix("user:*:profile"), "user:");
        assert_eq!(literal_prefix("*"), "");
    }

    #[tokio::test]
    async fn pattern_table_is_bounded_and_folds_into_other() {
        let reg = CacheRegistry::new(RegistryOptions {
            max_patterns: 3,
            ..RegistryOptions::default()
        })
        .await
        .expect("registry");
        for i in 0..10 {
            let _: Result<u8, std::convert::Infallible> = reg
                .get_or_load(&format!("p{i}:1"), || async { Ok(1) })
                .await;
        }
        let counts = reg.pattern_counts();
        assert_eq!(counts.len(), 4, "{counts:?}");
        assert_eq!(counts[OTHER].gets, 7);
        assert!(reg.metrics().render().contains(r#"key_pattern="other""#));
    }
}
