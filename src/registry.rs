//! [`CacheRegistry`]: every cache call of the application goes through it.
//!
//! The active state (enabled, impl, whitelist, TTLs and the backend) sits in an [`ArcSwap`]; each call loads it
//! once and sees one consistent snapshot, and [`CacheRegistry::switch`] replaces it atomically, so a switch never
//! fails a request: calls that started before it finish on the old backend.
//!
//! Per call, by key pattern:
//!
//! - **disabled** (`FEATURE_CACHE=false`): the loader runs directly, unmeasured.
//! - **observed** (impl `null`, or the pattern is not whitelisted): a counted miss, the loader runs and is timed,
//!   a would-be set is counted, and one value in `size_sample_every` is measured. No allocation, no await besides
//!   the loader's, no lock.
//! - **served** (whitelisted under `memory` or `redis`): cache-aside. A hit decodes and returns; a miss runs the
//!   loader once per key however many callers miss together (single-flight), then stores the value with the
//!   pattern's TTL. Backend errors and timeouts fail open to the loader and are counted by `error_type`; a
//!   corrupted entry is deleted, counted as `corrupt`, and reloaded.
//!
//! Invalidations always go to the active backend, whitelisted or not, so that a pattern added to the whitelist
//! later never finds a value older than a write that happened while it was only observed. A backend that was not
//! active before a switch is flushed of the patterns it is about to serve before the swap, for the same reason.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, CacheImpl, Health, MemoryCache, NullCache, RedisCache, RedisOptions};
use crate::codec::{self, Codec, Json};
use crate::error::{Error, Result};
use crate::flight::{self, Flights, Join};
use crate::metrics::{Metrics, Operation, PatternCounts, PatternMetrics};
use crate::pattern::{validate_key, validate_pattern, KeyPatterns, PatternTable};

/// How many swaps `GET /internal/cache` remembers.
pub const SWAP_HISTORY: usize = 20;

/// The part of the configuration that can change at runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Master switch; `false` sends every call straight to its loader, unmeasured.
    pub enabled: bool,
    /// The backend that serves whitelisted patterns.
    #[serde(rename = "impl")]
    pub imp: CacheImpl,
    /// Key patterns served by `imp`; `["*"]` means all. Every other pattern is observed through the NullCache.
    pub whitelist: Vec<String>,
    /// TTL of patterns without their own, in seconds (at least 1).
    pub default_ttl_secs: u64,
    /// Per-pattern settings.
    pub patterns: BTreeMap<String, PatternPolicy>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            imp: CacheImpl::Null,
            whitelist: Vec::new(),
            default_ttl_secs: 300,
            patterns: BTreeMap::new(),
        }
    }
}

/// Settings of one key pattern (`[cache.patterns.<pattern>]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternPolicy {
    /// TTL in seconds (at least 1); `None`: the default TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A change to the [`Policy`]: the body of `PUT /internal/cache/config`. Absent fields keep their value.
///
/// ```json
/// {"impl": "redis", "whitelist": ["user"], "patterns": {"user": {"ttl_secs": 60}}}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    /// New master switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// New impl.
    #[serde(default, rename = "impl", skip_serializing_if = "Option::is_none")]
    pub imp: Option<CacheImpl>,
    /// New whitelist (replaces the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist: Option<Vec<String>>,
    /// New default TTL in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ttl_secs: Option<u64>,
    /// Per-pattern settings, merged into the current ones pattern by pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patterns: Option<BTreeMap<String, PatternPolicy>>,
}

impl Policy {
    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (`cache.default_ttl_secs`, `cache.patterns.<p>.ttl_secs`) and value, or
    /// [`Error::InvalidPattern`] for a bad whitelist entry or pattern name.
    pub fn validate(&self) -> Result<()> {
        if self.default_ttl_secs == 0 {
            return Err(Error::config(
                "cache.default_ttl_secs",
                "0",
                "must be at least 1 second",
            ));
        }
        for p in &self.whitelist {
            if p != "*" {
                validate_pattern(p)?;
            }
        }
        for (p, s) in &self.patterns {
            validate_pattern(p)?;
            if s.ttl_secs == Some(0) {
                return Err(Error::config(
                    format!("cache.patterns.{p}.ttl_secs"),
                    "0",
                    "must be at least 1 second",
                ));
            }
        }
        Ok(())
    }

    /// This policy with `update` applied.
    ///
    /// # Errors
    /// As [`Policy::validate`] on the result.
    pub fn merged(&self, update: &PolicyUpdate) -> Result<Policy> {
        let mut p = self.clone();
        if let Some(e) = update.enabled {
            p.enabled = e;
        }
        if let Some(i) = update.imp {
            p.imp = i;
        }
        if let Some(w) = &update.whitelist {
            p.whitelist = normalize_whitelist(w);
        }
        if let Some(t) = update.default_ttl_secs {
            p.default_ttl_secs = t;
        }
        if let Some(pats) = &update.patterns {
            for (k, v) in pats {
                p.patterns.insert(k.clone(), v.clone());
            }
        }
        p.validate()?;
        Ok(p)
    }

    fn serves_all(&self) -> bool {
        self.whitelist.iter().any(|p| p == "*")
    }
}

/// Trims, drops empties and duplicates, keeps order.
pub(crate) fn normalize_whitelist<S: AsRef<str>>(items: &[S]) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .iter()
        .map(|s| s.as_ref().trim().to_string())
        .filter(|s| !s.is_empty() && seen.insert(s.clone()))
        .collect()
}

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

struct Active {
    policy: Policy,
    backend: Arc<dyn Cache>,
    redis: RedisOptions,
    whitelist: HashSet<String>,
    serves_all: bool,
    ttls: HashMap<String, Duration>,
    default_ttl: Duration,
    version: u64,
}

impl Active {
    fn new(policy: Policy, backend: Arc<dyn Cache>, redis: RedisOptions, version: u64) -> Self {
        let ttls = policy
            .patterns
            .iter()
            .filter_map(|(p, s)| s.ttl_secs.map(|t| (p.clone(), Duration::from_secs(t))))
            .collect();
        Active {
            whitelist: policy.whitelist.iter().cloned().collect(),
            serves_all: policy.serves_all(),
            default_ttl: Duration::from_secs(policy.default_ttl_secs),
            ttls,
            policy,
            backend,
            redis,
            version,
        }
    }

    fn serves(&self, pattern: &str) -> bool {
        !self.backend.always_misses() && (self.serves_all || self.whitelist.contains(pattern))
    }

    fn ttl(&self, pattern: &str) -> Duration {
        self.ttls.get(pattern).copied().unwrap_or(self.default_ttl)
    }
}

/// Per-pattern entry of the registry's pattern table.
struct PatternEntry {
    metrics: PatternMetrics,
}

struct Inner {
    state: ArcSwap<Active>,
    key_patterns: KeyPatterns,
    patterns: PatternTable<PatternEntry>,
    metrics: Metrics,
    flights: Arc<Flights>,
    swaps: Mutex<VecDeque<SwapRecord>>,
    switching: tokio::sync::Mutex<()>,
    memory_max_entries: u64,
    memory_max_bytes: u64,
    max_value_bytes: usize,
    size_sample_every: u64,
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

impl CacheRegistry {
    /// Builds a registry and installs `opts.policy` (source `startup`).
    ///
    /// If the policy's backend cannot be built (Redis unreachable), the registry starts observing (impl `null`,
    /// the rest of the policy kept), records the failed swap, and retries every 5 seconds in the background until
    /// it succeeds or another switch happens: the service starts, and caching begins when Redis is there.
    ///
    /// # Errors
    /// An invalid policy or key-pattern template.
    pub async fn new(opts: RegistryOptions) -> Result<Self> {
        opts.policy.validate()?;
        let metrics = Metrics::new();
        let m = metrics.clone();
        let observe = Policy {
            imp: CacheImpl::Null,
            ..opts.policy.clone()
        };
        let registry = CacheRegistry {
            inner: Arc::new(Inner {
                state: ArcSwap::from_pointee(Active::new(
                    observe,
                    Arc::new(NullCache),
                    opts.redis.clone(),
                    0,
                )),
                key_patterns: opts.key_patterns,
                patterns: PatternTable::new(opts.max_patterns, move |name| PatternEntry {
                    metrics: m.pattern(name),
                }),
                metrics,
                flights: Arc::new(Flights::new()),
                swaps: Mutex::new(VecDeque::new()),
                switching: tokio::sync::Mutex::new(()),
                memory_max_entries: opts.memory_max_entries,
                memory_max_bytes: opts.memory_max_bytes,
                max_value_bytes: opts.max_value_bytes,
                size_sample_every: opts.size_sample_every,
            }),
        };
        let target = opts.policy;
        if let Err(e) = registry.install(target.clone(), None, "startup").await {
            tracing::warn!(error = %e, "cache: {} unavailable at start-up; observing until it is", target.imp);
            registry
                .inner
                .metrics
                .set_enabled(target.enabled, CacheImpl::Null);
            registry.spawn_retry(target);
        }
        Ok(registry)
    }

    fn spawn_retry(&self, target: Policy) {
        let weak = Arc::downgrade(&self.inner);
        let started_at = self.inner.state.load().version;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(inner) = weak.upgrade() else { return };
                let reg = CacheRegistry { inner };
                if reg.inner.state.load().version != started_at {
                    return; // someone switched since: their choice wins
                }
                if reg.install(target.clone(), None, "retry").await.is_ok() {
                    return;
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

    fn entry(&self, pattern: &str) -> Arc<PatternEntry> {
        self.inner.patterns.get(pattern)
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
        let (entry, backend, ttl) = {
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
            let pattern = self.inner.key_patterns.pattern_of(key);
            let entry = self.entry(&pattern);
            if state.serves(&pattern) {
                let ttl = state.ttl(&pattern);
                (entry, Some(Arc::clone(&state.backend)), ttl)
            } else {
                (entry, None, Duration::ZERO)
            }
        };
        match backend {
            None => self.observe(&entry.metrics, loader).await,
            Some(backend) => {
                self.serve(key, &entry.metrics, &*backend, ttl, loader)
                    .await
            }
        }
    }

    async fn observe<C, E, F, Fut>(&self, m: &PatternMetrics, loader: F) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        m.miss(CacheImpl::Null);
        let start = Instant::now();
        let r = loader().await;
        m.loader.observe(start.elapsed().as_secs_f64());
        if let Ok(v) = &r {
            m.set(CacheImpl::Null);
            if m.sample_size(self.inner.size_sample_every) {
                m.value_size
                    .observe((codec::HEADER_BYTES + v.payload_len()) as f64);
            }
        }
        r
    }

    async fn serve<C, E, F, Fut>(
        &self,
        key: &str,
        m: &PatternMetrics,
        backend: &dyn Cache,
        ttl: Duration,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let imp = backend.kind();
        let metrics = &self.inner.metrics;
        let start = Instant::now();
        let got = backend.get(key).await;
        metrics
            .op_duration(imp, Operation::Get)
            .observe(start.elapsed().as_secs_f64());
        let mut backend_ok = true;
        match got {
            Ok(Some(bytes)) => match codec::decode::<C>(bytes) {
                Ok(v) => {
                    m.hit(imp);
                    return Ok(v);
                }
                Err(e) => {
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
        let guard = match self.inner.flights.join(key) {
            Join::Follower(rx) => {
                if let Some(bytes) = flight::wait(rx).await {
                    if let Ok(v) = codec::decode::<C>(bytes) {
                        m.coalesced();
                        return Ok(v);
                    }
                }
                None
            }
            Join::Leader(guard) => Some(guard),
        };
        let start = Instant::now();
        let loaded = loader().await;
        m.loader.observe(start.elapsed().as_secs_f64());
        let value = loaded?;
        let bytes = match codec::encode(key, &value) {
            Ok(b) => b,
            Err(e) => {
                metrics.error(imp, e.error_type());
                tracing::warn!(key, error = %e, "cache: value not stored");
                return Ok(value);
            }
        };
        m.value_size.observe(bytes.len() as f64);
        if let Some(g) = &guard {
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
            self.timed_set(backend, m, key, bytes, ttl).await.ok();
        }
        drop(guard);
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
        let start = Instant::now();
        let r = backend.set(key, bytes, Some(ttl)).await;
        self.inner
            .metrics
            .op_duration(imp, Operation::Set)
            .observe(start.elapsed().as_secs_f64());
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

    /// Stores `value` under `key` with the pattern's TTL (counted only when the pattern is observed).
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::Encode`], [`Error::ValueTooLarge`], or the backend's error (also counted).
    pub async fn set<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<()> {
        self.set_encoded(key, |k| codec::encode(k, &JsonRef(value)))
            .await
    }

    /// [`set`](Self::set) for raw bytes.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_bytes(&self, key: &str, value: Bytes) -> Result<()> {
        self.set_encoded(key, |k| codec::encode(k, &value)).await
    }

    async fn set_encoded(
        &self,
        key: &str,
        encode: impl FnOnce(&str) -> Result<Bytes>,
    ) -> Result<()> {
        let state = self.inner.state.load_full();
        if !state.policy.enabled {
            return Ok(());
        }
        validate_key(key)?;
        let pattern = self.pattern_of(key);
        let entry = self.entry(&pattern);
        let bytes = encode(key)?;
        if !state.serves(&pattern) {
            entry.metrics.set(CacheImpl::Null);
            entry.metrics.value_size.observe(bytes.len() as f64);
            return Ok(());
        }
        let imp = state.backend.kind();
        if bytes.len() > self.inner.max_value_bytes {
            self.inner.metrics.error(imp, "too_large");
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: bytes.len(),
                max: self.inner.max_value_bytes,
            });
        }
        entry.metrics.value_size.observe(bytes.len() as f64);
        self.timed_set(
            &*state.backend,
            &entry.metrics,
            key,
            bytes,
            state.ttl(&pattern),
        )
        .await
    }

    /// Deletes `key` from the active backend (whitelisted or not, see the module docs); `true` when it was there.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], or the backend's error (also counted): the caller must know that a stale value may
    /// remain until its TTL.
    pub async fn invalidate(&self, key: &str) -> Result<bool> {
        let state = self.inner.state.load_full();
        if !state.policy.enabled {
            return Ok(false);
        }
        validate_key(key)?;
        let entry = self.entry(&self.pattern_of(key));
        let imp = state.backend.kind();
        entry.metrics.del(imp);
        self.inner.metrics.invalidated(imp, "key");
        let start = Instant::now();
        let r = state.backend.delete(key).await;
        self.inner
            .metrics
            .op_duration(imp, Operation::Delete)
            .observe(start.elapsed().as_secs_f64());
        r.inspect_err(|e| self.inner.metrics.error(imp, e.error_type()))
    }

    /// Deletes every key of `pattern` from the active backend (Redis: `SCAN` + `UNLINK`); returns how many.
    ///
    /// # Errors
    /// [`Error::InvalidPattern`], or the backend's error (also counted).
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<u64> {
        validate_pattern(pattern)?;
        let state = self.inner.state.load_full();
        let imp = state.backend.kind();
        self.inner.metrics.invalidated(imp, "pattern");
        let start = Instant::now();
        let r = self.delete_pattern_in(&*state.backend, pattern).await;
        self.inner
            .metrics
            .op_duration(imp, Operation::DeletePattern)
            .observe(start.elapsed().as_secs_f64());
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

    /// Applies `update` at runtime: builds (and for Redis, connects) the new backend first, flushes the patterns it
    /// will serve if it was not active before, then swaps atomically. On failure the old state stays in place.
    /// Switches are serialized; calls in progress are never failed.
    ///
    /// # Errors
    /// An invalid update ([`Error::Config`], [`Error::InvalidPattern`]); an unreachable Redis ([`Error::Redis`]).
    pub async fn switch(&self, update: &PolicyUpdate) -> Result<StateView> {
        self.switch_from(update, "library").await
    }

    /// [`switch`](Self::switch) with the source recorded in the swap history (`api`, `sighup`, …).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub async fn switch_from(&self, update: &PolicyUpdate, source: &str) -> Result<StateView> {
        let policy = self.inner.state.load().policy.merged(update)?;
        self.install(policy, None, source).await?;
        Ok(self.state().await)
    }

    /// Replaces the whole policy and the Redis options (SIGHUP: the configuration files were re-read).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub async fn reload(&self, policy: Policy, redis: RedisOptions) -> Result<StateView> {
        policy.validate()?;
        self.install(policy, Some(redis), "sighup").await?;
        Ok(self.state().await)
    }

    async fn install(
        &self,
        policy: Policy,
        redis: Option<RedisOptions>,
        source: &str,
    ) -> Result<()> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let cur = self.inner.state.load_full();
        let redis = redis.unwrap_or_else(|| cur.redis.clone());
        let result = self.prepare(&cur, &policy, &redis).await;
        let ok = result.is_ok();
        let version = if ok { cur.version + 1 } else { cur.version };
        let record = SwapRecord {
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            source: source.to_string(),
            version,
            ok,
            from_impl: cur.policy.imp,
            to_impl: policy.imp,
            whitelist: policy.whitelist.clone(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        self.inner.metrics.swap(ok);
        let backend = match result {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(source, to = %policy.imp, error = %e, "cache: swap refused, previous state kept");
                self.push_swap(record);
                return Err(e);
            }
        };
        let next = Active::new(policy, backend, redis, version);
        self.inner
            .metrics
            .set_enabled(next.policy.enabled, next.policy.imp);
        self.inner.state.store(Arc::new(next));
        self.push_swap(record);
        tracing::info!(source, version, "{}", self.state_line());
        Ok(())
    }

    async fn prepare(
        &self,
        cur: &Active,
        policy: &Policy,
        redis: &RedisOptions,
    ) -> Result<Arc<dyn Cache>> {
        let reuse =
            policy.imp == cur.policy.imp && (policy.imp != CacheImpl::Redis || *redis == cur.redis);
        if reuse {
            return Ok(Arc::clone(&cur.backend));
        }
        let backend: Arc<dyn Cache> = match policy.imp {
            CacheImpl::Null => Arc::new(NullCache),
            CacheImpl::Memory => Arc::new(MemoryCache::new(
                self.inner.memory_max_entries,
                self.inner.memory_max_bytes,
            )),
            CacheImpl::Redis => Arc::new(RedisCache::connect(redis.clone()).await?),
        };
        // The new backend missed every invalidation made while it was not active: drop what it holds for the
        // patterns it is about to serve.
        if !backend.always_misses() {
            if policy.serves_all() {
                backend.delete_matching("", &|_| true).await?;
            } else {
                for p in &policy.whitelist {
                    self.delete_pattern_in(&*backend, p).await?;
                }
            }
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
            .patterns
            .entries()
            .into_iter()
            .map(|(name, e)| (name, e.metrics.counts()))
            .collect()
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

/// The part of a pattern before its first `*` segment: every key of the pattern starts with it.
fn literal_prefix(pattern: &str) -> &str {
    match pattern.find('*') {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

struct JsonRef<'a, T>(&'a T);

impl<T: Serialize + serde::de::DeserializeOwned> Codec for JsonRef<'_, T> {
    fn write_payload(
        &self,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<(), serde_json::Error> {
        serde_json::to_writer(bytes::BufMut::writer(out), self.0)
    }
    fn read_payload(_payload: Bytes) -> std::result::Result<Self, String> {
        Err("write-only".into())
    }
    fn type_tag() -> u32 {
        <Json<T> as Codec>::type_tag()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_merges_and_validates() {
        let p = Policy::default();
        let u: PolicyUpdate =
            serde_json::from_str(r#"{"impl":"redis","whitelist":["user"," user ",""]}"#)
                .expect("parses");
        let m = p.merged(&u).expect("valid");
        assert_eq!(m.imp, CacheImpl::Redis);
        assert_eq!(m.whitelist, ["user"]);
        assert!(m.enabled);
        let bad = PolicyUpdate {
            patterns: Some(BTreeMap::from([(
                "user".into(),
                PatternPolicy { ttl_secs: Some(0) },
            )])),
            ..Default::default()
        };
        let e = p.merged(&bad).expect_err("ttl 0");
        assert!(
            e.to_string().contains("cache.patterns.user.ttl_secs"),
            "{e}"
        );
    }

    #[test]
    fn unknown_update_fields_are_rejected() {
        assert!(
            serde_json::from_str::<PolicyUpdate>(r#"{"impl":"redis","whitelits":["user"]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<PolicyUpdate>(r#"{"impl":"redsi"}"#).is_err());
    }

    #[test]
    fn whitelist_decides_what_is_served() {
        let policy = Policy {
            imp: CacheImpl::Memory,
            whitelist: vec!["user".into()],
            ..Policy::default()
        };
        let a = Active::new(
            policy.clone(),
            Arc::new(MemoryCache::new(10, 1000)),
            RedisOptions::default(),
            1,
        );
        assert!(a.serves("user"));
        assert!(!a.serves("project"));
        let all = Active::new(
            Policy {
                whitelist: vec!["*".into()],
                ..policy.clone()
            },
            Arc::new(MemoryCache::new(10, 1000)),
            RedisOptions::default(),
            1,
        );
        assert!(all.serves("project"));
        let null = Active::new(
            Policy {
                whitelist: vec!["*".into()],
                ..policy
            },
            Arc::new(NullCache),
            RedisOptions::default(),
            1,
        );
        assert!(
            !null.serves("user"),
            "the NullCache serves nothing even when whitelisted"
        );
    }

    #[test]
    fn pattern_ttl_overrides_default() {
        let policy = Policy {
            patterns: BTreeMap::from([("user".into(), PatternPolicy { ttl_secs: Some(60) })]),
            ..Policy::default()
        };
        let a = Active::new(policy, Arc::new(NullCache), RedisOptions::default(), 0);
        assert_eq!(a.ttl("user"), Duration::from_secs(60));
        assert_eq!(a.ttl("project"), Duration::from_secs(300));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        assert_eq!(literal_prefix("user"), "user");
        assert_eq!(literal_prefix("user:*:profile"), "user:");
        assert_eq!(literal_prefix("*"), "");
    }
}
