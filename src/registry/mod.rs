//! [`CacheRegistry`]: every cache call of the application goes through it.
//!
//! The active state (the [`Policy`], the backend built for it, and the table of key patterns seen) sits in one
//! [`ArcSwap`]; each call loads it once and sees one consistent snapshot, and a switch replaces it atomically, so
//! a switch never fails a request: calls that started before it finish on the old backend.
//!
//! Per call, by key pattern:
//!
//! - **disabled** (`FEATURE_CACHE=false`): the loader runs directly, unmeasured.
//! - **observed** (impl `null`, the pattern not whitelisted or in `observe` mode or rolled back, or the key outside
//!   the pattern's ramp): a counted miss, the loader runs and is timed, a would-be set is counted, and one value in
//!   `size_sample_every` has its encoded size measured. No allocation, no await besides the loader's, no lock.
//! - **served** (whitelisted under `memory` or `redis`, key in the ramp): cache-aside. A hit decodes and returns; a
//!   miss runs the loader once per key however many callers miss together (single-flight), under the key's lease,
//!   then fills the cache with the pattern's TTL if the lease still holds. Reads, lease and fill share the pattern's
//!   read deadline; backend errors and timeouts fail open to the loader and are counted by `error_type`; a
//!   corrupted entry is deleted, counted as `corrupt`, and reloaded.
//! - **shadowed** (`mode = "shadow"`, key in the ramp): the loader's value is always returned; the cache is read
//!   first, compared with it afterwards, and a miss is filled in the background.
//!
//! Every cache read of a routed pattern is counted in its sliding window; when a rollback rule trips, the pattern
//! returns to `observe` (see [`crate::rollout`]).
//!
//! Coherence: invalidations (and sets of patterns that are not served) always reach the active backend,
//! whitelisted or not, enabled or not; a backend that becomes active after a switch is first flushed of everything
//! under its key prefix, because it missed the invalidations made while it was not active. Every invalidation
//! revokes the key's lease in the same atomic step, so a load that began before it can never store its value
//! (leases, "Scaling Memcache at Facebook", NSDI 2013; see `docs/behaviour.md`).
//!
//! # Layout
//!
//! One concept per file; the call path reads top to bottom in `call.rs`.
//!
//! | file | what lives there |
//! |---|---|
//! | `mod.rs` | the handle ([`CacheRegistry`]), its construction, the pattern table |
//! | `call.rs` | `get_or_load` and the per-call plan: observe, unramped, serve or shadow, decided once |
//! | `active.rs` | the active state every call loads once, and each pattern's route |
//! | `observe.rs` | the observe path |
//! | `serve.rs` | the served path: hit, single-flight, lease, load, fill |
//! | `shadow.rs` | the shadow path |
//! | `write.rs` | the application's writes and invalidations |
//! | `switch.rs` | switching: one operation that builds the next state and swaps it in |
//! | `rollback.rs` | breakers and automatic rollback |
//! | `estimate.rs` | feeding the phase-2 estimators |
//! | `report.rs` | the phase-2 report and predicted hit ratios |
//! | `view.rs` | what `GET /internal/cache` shows |
//! | `timing.rs` | deadlines and timing of cache operations |

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;

use crate::analysis::{self, key_hash, Access, AnalysisOptions, RedisEviction, Shards};
use crate::cache::{Cache, CacheImpl, Health, Lookup, MemoryCache, NullCache, RedisOptions};
#[cfg(feature = "redis")]
use crate::cache::{L1Patterns, RedisCache, TieredCache};
use crate::codec::{self, Codec, Serde};
use crate::error::{Error, Result};
use crate::flight::{self, Flights, Join};
use crate::metrics::{
    Metrics, Operation, PatternCounts, PatternMetrics, RolloutMetrics, ShadowResult,
};
use crate::pattern::{validate_key, validate_pattern, KeyPatterns, OTHER};
use crate::policy::{Mode, PatternPolicy, Policy, PolicyUpdate, RollbackRules, RollbackScope};
use crate::rollout::{self, Breaker, BreakerState, Event, Reason, Route, Window, WindowCounts};

mod active;
mod call;
mod estimate;
mod observe;
mod report;
mod rollback;
mod serve;
mod shadow;
mod switch;
mod timing;
mod view;
mod write;

pub(crate) use self::call::Outcome;
pub use self::call::{CacheStatus, Cached, Fetch};
pub use self::switch::SwapSource;
pub use self::view::{ArmView, RouteView, StateView, SwapRecord};
#[allow(unused_imports)] // each file uses its own part
use self::{
    active::*, call::*, estimate::*, observe::*, report::*, rollback::*, serve::*, shadow::*,
    switch::*, timing::*, view::*, write::*,
};

/// How many swaps `GET /internal/cache` remembers.
pub const SWAP_HISTORY: usize = 20;

/// Everything a registry needs besides the [`Policy`]; fixed for the registry's life, except `redis`, which
/// a SIGHUP reload (`CacheRollout::builder(..).reload_on_sighup(true)`) may replace.
///
/// Built from [`RegistryOptions::default`] with the `with_*` setters, each of which states its default:
///
/// ```
/// use cache_rollout::{Policy, RegistryOptions};
///
/// let opts = RegistryOptions::default()
///     .with_max_value_bytes(64 * 1024)
///     .with_memory_max_entries(10_000);
/// assert_eq!(opts.max_patterns, 100);
/// ```
///
/// Most applications use [`CacheRollout`](crate::CacheRollout), which builds these from the configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
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

impl RegistryOptions {
    /// The initial policy. Default: [`Policy::default`] (observe everything through the NullCache).
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Key → pattern rule. Default: the default rule, no templates.
    #[must_use]
    pub fn with_key_patterns(mut self, key_patterns: KeyPatterns) -> Self {
        self.key_patterns = key_patterns;
        self
    }

    /// Bound on distinct key patterns, a count (clamped to 1 … [`MAX_PATTERNS_LIMIT`]). Default: 100.
    #[must_use]
    pub fn with_max_patterns(mut self, max_patterns: usize) -> Self {
        self.max_patterns = max_patterns;
        self
    }

    /// Where Redis is. Default: [`RedisOptions::default`] (`redis://127.0.0.1:6379`, prefix `cr:`).
    #[must_use]
    pub fn with_redis(mut self, redis: RedisOptions) -> Self {
        self.redis = redis;
        self
    }

    /// [`MemoryCache`] bound, in entries. Default: 100,000.
    #[must_use]
    pub fn with_memory_max_entries(mut self, entries: u64) -> Self {
        self.memory_max_entries = entries;
        self
    }

    /// [`MemoryCache`] bound, in bytes of keys and values. Default: 256 MiB.
    #[must_use]
    pub fn with_memory_max_bytes(mut self, bytes: u64) -> Self {
        self.memory_max_bytes = bytes;
        self
    }

    /// Largest encoded value stored, in bytes. Default: 1 MiB.
    #[must_use]
    pub fn with_max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// On the observe path, measure one loaded value's size in this many (1 = every value). Default: 16.
    #[must_use]
    pub fn with_size_sample_every(mut self, every: u64) -> Self {
        self.size_sample_every = every;
        self
    }

    /// Version of the application's cached value formats. Default: 0.
    #[must_use]
    pub fn with_value_version(mut self, version: u32) -> Self {
        self.value_version = version;
        self
    }

    /// The phase-2 estimators. Default: [`AnalysisOptions::default`] (on).
    #[must_use]
    pub fn with_analysis(mut self, analysis: AnalysisOptions) -> Self {
        self.analysis = analysis;
        self
    }

    /// The clock for durations and TTLs, e.g. a [`quanta::Clock::mock`] that follows a trace's timestamps. With a
    /// clock given here, entries are stamped and judged by it (the wall clock at creation, advanced by it) instead of
    /// the wall clock, and always by their stamp (as with a stale window).
    /// Default: the TSC-backed [`quanta::Clock::new`].
    #[must_use]
    pub fn with_clock(mut self, clock: quanta::Clock) -> Self {
        self.clock = Some(clock);
        self
    }
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

use crate::pattern::MAX_PATTERNS_LIMIT;

/// Per-pattern entry of the pattern table.
struct PatternEntry {
    /// The pattern's name (`other` for the folded ones).
    name: Box<str>,
    metrics: Arc<PatternMetrics>,
    /// The window the rollback rules judge.
    window: Window,
    /// Ramp and shadow handles, resolved when the pattern is first routed.
    rollout: OnceLock<RolloutMetrics>,
    /// Its slot: the pattern's tag in the shared estimator and in route × pattern.
    slot: u32,
    /// Its own miss-ratio-curve estimator (the first `analysis.max_patterns` patterns).
    shards: Option<Shards>,
    /// Raw clock reading when it was first seen: its rates are over its own age.
    born: u64,
}

/// Pattern name → index into `Inner::slots`.
type PatternMap = HashMap<Box<str>, usize, foldhash::fast::RandomState>;

struct Inner {
    /// The active state: every call loads it once.
    active: ArcSwap<Active>,
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
    /// The wall clock at creation, in milliseconds since the Unix epoch.
    wall_base_ms: u64,
    /// The clock is a mock (a trace replay): entry stamps follow it.
    mock_clock: bool,
    analysis: Option<Analysis>,
    /// Tripped rollback breakers by pattern; every change to it rebuilds the active routes under this lock.
    breakers: Mutex<BTreeMap<String, Breaker>>,
    /// Set while an impl-wide rollback is in force.
    impl_rolled_back: AtomicBool,
    /// Told of every rollback decided here (the fleet state publishes it to the other instances).
    rollback_hook: Mutex<Option<RollbackHook>>,
    /// Counter behind lease tokens and trip ids.
    next_id: std::sync::atomic::AtomicU64,
    /// Random per process, so lease tokens of different processes differ.
    token_seed: u64,
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

/// A callback told of each rollback a registry decides: `(key_pattern, reason)`.
pub(crate) type RollbackHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A [`CacheRegistry`] handle that does not keep it alive ([`CacheRegistry::downgrade`]).
#[derive(Clone)]
pub(crate) struct WeakRegistry(std::sync::Weak<Inner>);

impl std::fmt::Debug for WeakRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakRegistry").finish_non_exhaustive()
    }
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
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// An invalid policy, or one that names more patterns than `max_patterns` in its whitelist or its per-pattern
    /// settings ([`Error::Config`] naming `cache.whitelist` or `cache.patterns`).
    pub async fn new(opts: RegistryOptions) -> Result<Self> {
        opts.policy.validate()?;
        opts.analysis.validate()?;
        check_policy_bounds(&opts.policy, opts.max_patterns.clamp(1, MAX_PATTERNS_LIMIT))?;
        let mock_clock = opts.clock.is_some();
        let clock = opts.clock.unwrap_or_default();
        let analysis = opts.analysis.enabled.then(|| {
            let eviction = opts.analysis.eviction.unwrap_or_default();
            let shared =
                estimate::new_shards(&opts.analysis, eviction, opts.analysis.shared_sample_keys);
            Analysis {
                shared,
                epoch: clock.raw(),
                opts: opts.analysis,
                eviction: std::sync::Mutex::new(eviction),
                redis_entry_bytes: std::sync::Mutex::new(None),
                phase_nanos: if mock_clock {
                    0
                } else {
                    SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| (d.as_nanos() % 60_000_000_000) as u64)
                },
            }
        });
        let max_patterns = opts.max_patterns.clamp(1, MAX_PATTERNS_LIMIT);
        let observe = Policy {
            cache_impl: CacheImpl::Null,
            ..opts.policy.clone()
        };
        let initial = Active::new(
            observe,
            Arc::new(NullCache),
            opts.redis.clone(),
            0,
            Arc::default(),
            &BTreeMap::new(),
        );
        let registry = CacheRegistry {
            inner: Arc::new(Inner {
                active: ArcSwap::from_pointee(initial),
                key_patterns: opts.key_patterns,
                metrics: Metrics::new(),
                flights: Arc::new(Flights::new()),
                swaps: Mutex::new(VecDeque::new()),
                switching: tokio::sync::Mutex::new(()),
                new_pattern: Mutex::new(0),
                table_full: AtomicBool::new(false),
                slots: (0..=max_patterns).map(|_| OnceLock::new()).collect(),
                started: clock.raw(),
                wall_base_ms: timing::wall_ms(),
                mock_clock,
                clock,
                analysis,
                breakers: Mutex::new(BTreeMap::new()),
                impl_rolled_back: AtomicBool::new(false),
                rollback_hook: Mutex::new(None),
                next_id: std::sync::atomic::AtomicU64::new(1),
                token_seed: crate::random::random_u64(),
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
            let served = report::ServedHitRatio::new(Arc::downgrade(&registry.inner));
            if let Err(e) = registry.inner.metrics.registry().register(Box::new(served)) {
                tracing::warn!(error = %e, "cache: cache_served_hit_ratio not registered");
            }
        }
        #[cfg(feature = "redis")]
        let probe_default = opts.policy.cache_impl == CacheImpl::Redis;
        let target = opts.policy;
        registry
            .inner
            .metrics
            .set_enabled(target.enabled, CacheImpl::Null);
        if let Err(e) = registry
            .install(
                Change::Replace(target.clone(), None),
                SwapSource::Startup,
                None,
            )
            .await
        {
            tracing::warn!(error = %e, "cache: {} unavailable at start-up; observing until it is", target.cache_impl);
            tracing::info!(
                source = "startup",
                reason = "startup: the configured impl is unavailable",
                "{}",
                registry.state_line()
            );
            registry.spawn_retry(target);
        }
        // Only a Redis the service was told about: the default URL is not asked unless the policy serves from it.
        #[cfg(feature = "redis")]
        if registry.inner.analysis.is_some()
            && (probe_default
                || registry.inner.active.load().redis.url != RedisOptions::default().url)
        {
            registry.spawn_redis_probe();
        }
        Ok(registry)
    }

    /// Reads the memory and eviction of the Redis the registry would use (`CONFIG GET maxmemory-policy …`, `INFO
    /// memory`) at start and every minute: the estimators simulate its eviction (unless `cache.analysis.eviction`
    /// is set; a policy they do not simulate leaves the current one), and the served patterns' prediction is for its
    /// memory. Nothing is written.
    #[cfg(feature = "redis")]
    fn spawn_redis_probe(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let url = inner.active.load().redis.url.clone();
                drop(inner);
                let read = crate::cache::RedisMemory::read(&url, Duration::from_secs(2)).await;
                let Some(inner) = weak.upgrade() else { return };
                let reg = CacheRegistry { inner };
                if let Err(e) = &read {
                    tracing::debug!(error = %e, "cache: Redis's memory and eviction not read");
                }
                if let Ok(m) = read {
                    if let Some(a) = &reg.inner.analysis {
                        *a.redis_entry_bytes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(m.entry_bytes());
                        if a.opts.eviction.is_none() {
                            if let Some(e) = m.eviction {
                                reg.set_eviction(e);
                            }
                        }
                    }
                }
                drop(reg);
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
    }

    fn spawn_retry(&self, target: Policy) {
        let weak = Arc::downgrade(&self.inner);
        let since = self.inner.active.load().version;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(inner) = weak.upgrade() else { return };
                let reg = CacheRegistry { inner };
                match reg
                    .install(
                        Change::Retry(target.clone(), since),
                        SwapSource::Retry,
                        None,
                    )
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
                .then(|| a.shards(a.opts.sample_keys))
        });
        PatternEntry {
            name: name.into(),
            metrics: self.inner.metrics.pattern(name),
            window: Window::default(),
            rollout: OnceLock::new(),
            slot: idx as u32,
            shards,
            born: self.inner.clock.raw(),
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
        let cur = self.inner.active.load();
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
        self.inner.active.rcu(|cur| {
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

    /// A fresh lease token: random per process, unique within it.
    fn next_token(&self) -> u64 {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        (self.inner.token_seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
    }

    /// A handle that does not keep the registry alive (background tasks stop once it is dropped).
    pub(crate) fn downgrade(&self) -> WeakRegistry {
        WeakRegistry(Arc::downgrade(&self.inner))
    }

    /// The registry of a [`WeakRegistry`], if it is still alive.
    pub(crate) fn upgrade(weak: &WeakRegistry) -> Option<CacheRegistry> {
        weak.0.upgrade().map(|inner| CacheRegistry { inner })
    }
}

/// A policy names at most `max_patterns` (`cache.max_patterns`) patterns in its whitelist, and as many in its
/// per-pattern settings: each named pattern gets rollback series, a route and a row in `GET /internal/cache`, so
/// names are bounded like the key patterns themselves (`"*"` serves every pattern in one entry).
///
/// # Errors
/// [`Error::Config`](crate::Error::Config) naming `cache.whitelist` or `cache.patterns` and the bound.
pub(crate) fn check_policy_bounds(policy: &Policy, max_patterns: usize) -> Result<()> {
    for (key, n) in [
        ("cache.whitelist", policy.whitelist.len()),
        ("cache.patterns", policy.patterns.len()),
    ] {
        if n > max_patterns {
            return Err(crate::Error::config(
                key,
                format!("{n} names"),
                format!(
                    "at most {max_patterns} (cache.max_patterns): each named pattern gets metric series; \
                     use \"*\" to serve every pattern"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PatternPolicy;

    fn active(policy: Policy, backend: Arc<dyn Cache>) -> Active {
        Active::new(
            policy,
            backend,
            RedisOptions::default(),
            1,
            Arc::default(),
            &BTreeMap::new(),
        )
    }

    #[test]
    fn whitelist_decides_what_is_served() {
        let policy = Policy {
            cache_impl: CacheImpl::Memory,
            whitelist: vec!["user".into()],
            ..Policy::default()
        };
        let a = active(policy.clone(), Arc::new(MemoryCache::new(10, 1000)));
        assert!(a.routed("user"));
        assert!(!a.routed("project"));
        let all = Policy {
            whitelist: vec!["*".into()],
            ..policy.clone()
        };
        assert!(active(all.clone(), Arc::new(MemoryCache::new(10, 1000))).routed("project"));
        assert!(
            !active(all, Arc::new(NullCache)).routed("user"),
            "the NullCache serves nothing even when whitelisted"
        );
    }

    #[test]
    fn pattern_ttl_overrides_default() {
        let policy = Policy {
            patterns: BTreeMap::from([(
                "user".into(),
                PatternPolicy {
                    ttl_secs: Some(60),
                    ..PatternPolicy::default()
                },
            )]),
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
