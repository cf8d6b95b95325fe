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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;

use crate::analysis::{self, key_hash, Access, AnalysisOptions, Shards};
use crate::cache::{Cache, CacheImpl, Health, Lookup, MemoryCache, NullCache, RedisOptions};
#[cfg(feature = "redis")]
use crate::cache::{L1Patterns, RedisCache, TieredCache};
use crate::codec::{self, Codec, Json};
use crate::error::{Error, Result};
use crate::flight::{self, Flights, Join};
use crate::metrics::{Metrics, Operation, PatternCounts, PatternMetrics, RolloutMetrics};
use crate::pattern::{validate_key, validate_pattern, KeyPatterns, OTHER};
use crate::policy::{Mode, PatternPolicy, Policy, PolicyUpdate, RollbackRules, RollbackScope};
use crate::rollout::{self, Breaker, BreakerState, Event, Reason, Route, Window, WindowCounts};

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
    /// What asked for it: `startup`, `api`, `sighup`, `retry`, `library`, or `rollback` (an automatic rollback, its
    /// half-open probe, or its recovery).
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
    /// For a rollback: the pattern, the rule and the new breaker state (`user: timeout_rate -> observe`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    /// Every pattern seen that is whitelisted, configured or rolled back: its mode, ramp, breaker, window, and the
    /// ramped and unramped arms side by side.
    pub routes: BTreeMap<String, RouteView>,
}

/// One pattern's rollout, as `GET /internal/cache` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    /// The mode in effect now (`observe` while rolled back or not whitelisted).
    pub mode: Mode,
    /// The configured mode.
    pub configured_mode: Mode,
    /// The configured ramp, in percent of keys.
    pub ramp_percent: f64,
    /// The read deadline, in milliseconds.
    pub read_timeout_ms: u64,
    /// The TTL, in seconds.
    pub ttl_secs: u64,
    /// The breaker, while tripped.
    pub breaker: Option<Breaker>,
    /// The sliding window the rollback rules judge.
    pub window: WindowCounts,
    /// Calls of keys in the ramp, served (the A arm).
    pub ramped: ArmView,
    /// Calls of keys outside the ramp, observed (the B arm).
    pub unramped: ArmView,
    /// Calls of keys in the ramp while the pattern was in shadow mode.
    pub shadowed: ArmView,
    /// Shadow comparisons by result (`match`, `mismatch`, `miss`, `error`).
    pub shadow: BTreeMap<&'static str, u64>,
}

/// One arm of a ramp: whole-call counts and latency.
#[derive(Debug, Clone, Serialize)]
pub struct ArmView {
    /// Calls.
    pub calls: u64,
    /// Hits among them (the unramped and shadowed arms never hit; the ramped arm counts every hit of the pattern
    /// under the active impl).
    pub hits: u64,
    /// `hits / calls`, when there were calls.
    pub hit_ratio: Option<f64>,
    /// Mean call duration, in milliseconds.
    pub mean_ms: Option<f64>,
    /// 99th percentile call duration, in milliseconds: the upper bound of the histogram bucket that holds it
    /// (buckets double from 50 µs).
    pub p99_ms: Option<f64>,
}

impl ArmView {
    fn of(h: &crate::metrics::DurationHistogram, hits: u64) -> Self {
        let p = h.proto();
        let calls = p.get_sample_count();
        let p99 = (calls > 0)
            .then(|| {
                let want = (calls as f64 * 0.99).ceil() as u64;
                p.get_bucket()
                    .iter()
                    .find(|b| b.cumulative_count() >= want)
                    .map_or(f64::INFINITY, |b| b.upper_bound() * 1e3)
            })
            .filter(|v| v.is_finite());
        ArmView {
            calls,
            hits,
            hit_ratio: (calls > 0).then(|| hits.min(calls) as f64 / calls as f64),
            mean_ms: (calls > 0).then(|| p.get_sample_sum() / calls as f64 * 1e3),
            p99_ms: p99,
        }
    }
}

/// Most distinct key patterns a registry tracks (`max_patterns` is clamped to it).
pub const MAX_PATTERNS_LIMIT: usize = 10_000;

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
    /// Routes of the patterns that are whitelisted by name, configured or rolled back; under `*`, the other
    /// patterns take `default_route`.
    routes: HashMap<String, Route>,
    default_route: Route,
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

/// The patterns of `policy` with an in-process L1, and their L1 TTLs in seconds.
#[cfg(feature = "redis")]
fn l1_patterns(policy: &Policy) -> L1Patterns {
    policy
        .patterns
        .iter()
        .filter_map(|(p, pp)| pp.l1_ttl_secs.map(|t| (p.clone(), t)))
        .collect()
}

/// The route of a pattern with settings `pp`, whitelisted or not, under its breaker.
fn build_route(
    policy: &Policy,
    pp: Option<&PatternPolicy>,
    whitelisted: bool,
    breaker: Option<&Breaker>,
) -> Route {
    let none = PatternPolicy::default();
    let pp = pp.unwrap_or(&none);
    let rules = &policy.rollback;
    let mut percent = pp.ramp_percent.unwrap_or(100.0);
    let mut mode = if whitelisted {
        pp.mode.unwrap_or_default()
    } else {
        Mode::Observe
    };
    let mut probe = None;
    match breaker {
        Some(b) if b.state == BreakerState::Open => mode = Mode::Observe,
        Some(b) => {
            percent *= rules.probe_percent / 100.0;
            probe = Some(Arc::clone(&b.probe));
        }
        None => {}
    }
    Route {
        mode,
        ramp: rollout::ramp_threshold(percent),
        ttl: Duration::from_secs(pp.ttl_secs.unwrap_or(policy.default_ttl_secs)),
        read_timeout: Duration::from_millis(pp.read_timeout_ms.unwrap_or(policy.read_timeout_ms)),
        lease_ttl: Duration::from_millis(policy.lease_ttl_ms),
        lease_wait: Duration::from_millis(policy.lease_wait_ms),
        slow_nanos: (rules.max_p99_ms * 1e6) as u64,
        bucket_nanos: (rules.window_secs * 100_000_000).max(1),
        probe,
        probe_calls: rules.probe_calls,
    }
}

impl Active {
    fn new(
        policy: Policy,
        backend: Arc<dyn Cache>,
        redis: RedisOptions,
        version: u64,
        patterns: Arc<PatternMap>,
        breakers: &BTreeMap<String, Breaker>,
    ) -> Self {
        let ttls = policy
            .patterns
            .iter()
            .filter_map(|(p, s)| s.ttl_secs.map(|t| (p.clone(), Duration::from_secs(t))))
            .collect();
        let whitelist: HashSet<String> = policy.whitelist.iter().cloned().collect();
        let serves_all = policy.serves_all();
        let (routes, default_route) = routes_of(&policy, &whitelist, serves_all, breakers);
        Active {
            stores: !backend.always_misses(),
            routes,
            default_route,
            whitelist,
            serves_all,
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

    /// The route of a pattern in shadow or serve mode; `None`: observed.
    #[inline]
    fn route(&self, pattern: &str) -> Option<&Route> {
        if !self.stores {
            return None;
        }
        match self.routes.get(pattern) {
            Some(r) => (r.mode != Mode::Observe).then_some(r),
            None => self.serves_all.then_some(&self.default_route),
        }
    }

    /// Whether the pattern's keys go to the backend (shadow or serve mode; writes of every key, reads of the
    /// ramped ones).
    fn serves(&self, pattern: &str) -> bool {
        self.route(pattern).is_some()
    }

    fn whitelisted(&self, pattern: &str) -> bool {
        self.serves_all || self.whitelist.contains(pattern)
    }

    /// This state with its routes rebuilt under `breakers`.
    fn with_breakers(&self, breakers: &BTreeMap<String, Breaker>) -> Self {
        let (routes, default_route) =
            routes_of(&self.policy, &self.whitelist, self.serves_all, breakers);
        Active {
            routes,
            default_route,
            ..self.clone()
        }
    }

    fn ttl(&self, pattern: &str) -> Duration {
        self.ttls.get(pattern).copied().unwrap_or(self.default_ttl)
    }
}

fn routes_of(
    policy: &Policy,
    whitelist: &HashSet<String>,
    serves_all: bool,
    breakers: &BTreeMap<String, Breaker>,
) -> (HashMap<String, Route>, Route) {
    let listed = |p: &str| serves_all || whitelist.contains(p);
    let mut routes: HashMap<String, Route> = policy
        .patterns
        .iter()
        .map(|(p, pp)| {
            (
                p.clone(),
                build_route(policy, Some(pp), listed(p), breakers.get(p)),
            )
        })
        .collect();
    for (p, b) in breakers {
        routes
            .entry(p.clone())
            .or_insert_with(|| build_route(policy, None, listed(p), Some(b)));
    }
    // Listed patterns get their entry too, so a call finds its route in one lookup; under `*` the patterns not in
    // the map take the default route.
    for p in whitelist.iter().filter(|p| *p != "*") {
        routes
            .entry(p.clone())
            .or_insert_with(|| build_route(policy, None, true, None));
    }
    (routes, build_route(policy, None, true, None))
}

/// Where a call goes, decided once from the active state.
enum Plan {
    /// Not routed: observed.
    Observe,
    /// Routed, but the key is outside the pattern's ramp: observed, and timed as the unramped arm.
    Unramped,
    /// Served or shadowed.
    Routed(Route, Arc<dyn Cache>),
}

/// One served or shadowed call: what its paths share.
#[derive(Clone, Copy)]
struct Call<'a> {
    key: &'a str,
    pattern: &'a str,
    entry: &'a PatternEntry,
    route: &'a Route,
    tags: &'a [String],
    /// Raw clock reading when the call started.
    start: u64,
}

/// What the miss path of a served call carries over from its read.
struct Miss<'a> {
    call: Call<'a>,
    backend: &'a Arc<dyn Cache>,
    /// Nanoseconds spent waiting on the cache so far in this call.
    cache_ns: u64,
    /// False once the cache failed in this call: no lease, no fill.
    backend_ok: bool,
}

/// How a cache read ended, for the rollback window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadResult {
    Ok,
    Error,
    Timeout,
}

impl ReadResult {
    fn of(e: &Error) -> Self {
        if matches!(e, Error::Timeout { .. }) {
            ReadResult::Timeout
        } else {
            ReadResult::Error
        }
    }
}

/// Runs a cache operation with `budget` as its deadline (only for a backend that can hang: an in-process one answers
/// without waiting, and a timer per call would be pure cost).
fn bounded<T, F: Future<Output = Result<T>>>(
    backend: &dyn Cache,
    budget: Duration,
    operation: &'static str,
    f: F,
) -> futures_util::future::Either<F, impl Future<Output = Result<T>>> {
    use futures_util::future::Either;
    if !backend.remote() {
        return Either::Left(f);
    }
    Either::Right(crate::cache::within(budget, operation, f))
}

/// What a swap installs, decided under the switch lock so concurrent switches never lose one another's change.
enum Change {
    Update(PolicyUpdate),
    Replace(Policy, Option<RedisOptions>),
    /// The start-up policy again, unless someone switched since `if_version`.
    Retry(Policy, u64),
    /// A whole policy from the fleet state: like `Replace`, but only the breakers of patterns whose settings
    /// changed are closed (a change to one pattern must not put every rolled-back pattern back to serving).
    Fleet(Policy),
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
pub type RollbackHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A [`CacheRegistry`] handle that does not keep it alive ([`CacheRegistry::downgrade`]).
#[derive(Clone)]
pub struct WeakRegistry(std::sync::Weak<Inner>);

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
            &BTreeMap::new(),
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
                breakers: Mutex::new(BTreeMap::new()),
                impl_rolled_back: AtomicBool::new(false),
                rollback_hook: Mutex::new(None),
                next_id: std::sync::atomic::AtomicU64::new(1),
                token_seed: crate::random_u64(),
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
            tracing::info!(
                source = "startup",
                reason = "startup: the configured impl is unavailable",
                "{}",
                registry.state_line()
            );
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
            name: name.into(),
            metrics: self.inner.metrics.pattern(name),
            window: Window::default(),
            rollout: OnceLock::new(),
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
        self.get_or_load_with(key, &[], || async { loader().await.map(Json) })
            .await
            .map(|Json(v)| v)
    }

    /// [`get_or_load`](Self::get_or_load) whose stored value is recorded under `tags`, so that
    /// [`invalidate_tag`](Self::invalidate_tag) of any of them removes it (and revokes a fill in progress). A tag
    /// follows the rules of a key ([`validate_key`]); a malformed one bypasses the cache like a malformed key.
    ///
    /// # Errors
    /// Only the loader's own error.
    pub async fn get_or_load_tagged<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<T, E>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_load_with(key, tags, || async { loader().await.map(Json) })
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
        self.get_or_load_with(key, &[], loader).await
    }

    async fn get_or_load_with<C, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let mut buf = None;
        let (entry, plan, track, pattern) = {
            let state = self.inner.state.load();
            if !state.policy.enabled {
                drop(state);
                return loader().await;
            }
            if validate_key(key).is_err() || tags.iter().any(|t| validate_key(t).is_err()) {
                self.inner
                    .metrics
                    .error(state.backend.kind(), "invalid_key");
                drop(state);
                return loader().await;
            }
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            let entry = self.entry(&state, &pattern);
            let plan = match state.route(&pattern) {
                None => Plan::Observe,
                Some(r) if !r.includes(key) => Plan::Unramped,
                Some(r) => Plan::Routed(r.clone(), Arc::clone(&state.backend)),
            };
            let serves = matches!(plan, Plan::Routed(..));
            let track = self.track(&state, entry, &pattern, key, serves);
            if serves {
                if let Some(w) = &state.whitelisted {
                    w.gets.fetch_add(1, Ordering::Relaxed);
                }
            }
            (entry, plan, track, pattern)
        };
        if let Plan::Routed(route, backend) = plan {
            let tags: Vec<String> = if tags.is_empty() {
                Vec::new()
            } else {
                tags.iter().map(|t| (*t).to_string()).collect()
            };
            let call = Call {
                key,
                pattern: &pattern,
                entry,
                route: &route,
                tags: &tags,
                start: self.inner.clock.raw(),
            };
            let shadowed = route.mode == Mode::Shadow;
            // Boxed: the served paths hold much more across their awaits than the observe path (timers, the
            // route, the flight), and inline they would make every call's future, observed ones too, larger,
            // which costs the observe path a larger copy per call. A served call does I/O anyway.
            let r = if shadowed {
                Box::pin(self.shadow(call, track, backend, loader)).await
            } else {
                Box::pin(self.serve(call, track, &backend, loader)).await
            };
            let rm = self.rollout_metrics(entry);
            let arm = if shadowed { &rm.shadowed } else { &rm.ramped };
            arm.observe_nanos(nanos_since(&self.inner.clock, call.start));
            return r;
        }
        // Observed: not routed, or a key outside its pattern's ramp (then timed as the ramp's unramped arm). One
        // call site, so the observe future is built in place.
        let unramped = matches!(plan, Plan::Unramped).then(|| self.inner.clock.raw());
        let r = self.observe(entry, track, loader).await;
        if let Some(start) = unramped {
            self.rollout_metrics(entry)
                .unramped
                .observe_nanos(nanos_since(&self.inner.clock, start));
        }
        r
    }

    fn rollout_metrics<'e>(&self, entry: &'e PatternEntry) -> &'e RolloutMetrics {
        entry
            .rollout
            .get_or_init(|| self.inner.metrics.rollout(&entry.name))
    }

    /// The window bucket number of raw clock reading `at`.
    fn bucket(&self, route: &Route, at: u64) -> u64 {
        self.inner.clock.delta_as_nanos(self.inner.started, at) / route.bucket_nanos
    }

    /// A fresh lease token: random per process, unique within it.
    fn next_token(&self) -> u64 {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        (self.inner.token_seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
    }

    /// Counts one cache read of a routed pattern in its window, judges the rules when it went wrong, and counts
    /// half-open probes.
    fn read_done(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        route: &Route,
        at: u64,
        nanos: u64,
        result: ReadResult,
    ) {
        let bucket = self.bucket(route, at);
        let w = &entry.window;
        w.add(Event::Read, bucket);
        let mut bad = match result {
            ReadResult::Ok => false,
            ReadResult::Error => {
                w.add(Event::Error, bucket);
                true
            }
            ReadResult::Timeout => {
                w.add(Event::Timeout, bucket);
                true
            }
        };
        if nanos > route.slow_nanos {
            w.add(Event::Slow, bucket);
            bad = true;
        }
        if bad {
            self.judge(entry, pattern, route, bucket);
        } else if let Some(p) = &route.probe {
            if p.fetch_add(1, Ordering::Relaxed) + 1 >= route.probe_calls {
                self.close_breaker(pattern, p);
            }
        }
    }

    /// Counts one shadow comparison in the window.
    fn compared(&self, entry: &PatternEntry, pattern: &str, route: &Route, at: u64, same: bool) {
        let bucket = self.bucket(route, at);
        entry.window.add(Event::Compared, bucket);
        if !same {
            entry.window.add(Event::Mismatch, bucket);
            self.judge(entry, pattern, route, bucket);
        }
    }

    #[cold]
    fn judge(&self, entry: &PatternEntry, pattern: &str, route: &Route, bucket: u64) {
        let state = self.inner.state.load();
        let rules = &state.policy.rollback;
        if !rules.enabled {
            return;
        }
        // Half-open, a few calls are enough to send the pattern back.
        let min = if route.probe.is_some() {
            rules.min_calls.min(10)
        } else {
            rules.min_calls
        };
        let counts = entry.window.counts(bucket);
        let recent = entry.window.bucket(bucket);
        let tripped = rollout::judge(rules, &counts, min)
            .map(|r| (r, counts))
            .or_else(|| rollout::judge(rules, &recent, min).map(|r| (r, recent)));
        if let Some((reason, counts)) = tripped {
            let (rules, imp) = (rules.clone(), state.policy.imp);
            drop(state);
            self.trip(entry, pattern, reason, counts, &rules, imp);
        }
    }

    fn breakers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Breaker>> {
        self.inner
            .breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Rebuilds the active routes under `breakers` (called with the breakers' lock held, so no change is lost).
    fn apply_breakers(&self, breakers: &BTreeMap<String, Breaker>) {
        self.inner.state.rcu(|cur| cur.with_breakers(breakers));
    }

    /// Records an automatic rollback, or one of its steps, in the swap history.
    fn push_rollback(&self, pattern: &str, what: String) {
        let s = self.inner.state.load();
        self.push_swap(SwapRecord {
            at: now_rfc3339(),
            source: "rollback".into(),
            version: s.version,
            ok: true,
            from_impl: s.policy.imp,
            to_impl: s.policy.imp,
            whitelist: s.policy.whitelist.clone(),
            error: None,
            reason: Some(format!("{pattern}: {what}")),
        });
    }

    /// A rule tripped on `pattern`: its breaker opens (or, with `scope = "impl"`, the impl goes to `null`), and the
    /// trip is counted and logged once.
    #[cold]
    fn trip(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        reason: Reason,
        counts: WindowCounts,
        rules: &RollbackRules,
        imp: CacheImpl,
    ) {
        let cooldown = Duration::from_secs(rules.cooldown_secs);
        let to = match rules.scope {
            RollbackScope::Pattern => {
                if !self.open_breaker(entry, pattern, reason, counts, cooldown) {
                    return; // tripped already
                }
                "observe"
            }
            RollbackScope::Impl => {
                if self.inner.impl_rolled_back.swap(true, Ordering::AcqRel) {
                    return;
                }
                entry.window.reset();
                self.roll_impl_back(pattern, reason, cooldown);
                "impl null"
            }
        };
        self.inner
            .metrics
            .rollback(imp, &entry.name, reason.as_str());
        tracing::warn!(
            key_pattern = pattern,
            reason = reason.as_str(),
            reads = counts.reads,
            errors = counts.errors,
            timeouts = counts.timeouts,
            slow = counts.slow,
            mismatched = counts.mismatched,
            cooldown_secs = rules.cooldown_secs,
            "cache: rolled back to {to}"
        );
        let hook = self
            .inner
            .rollback_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(pattern, reason.as_str());
        }
    }

    /// Calls `hook(key_pattern, reason)` on every rollback this registry decides (not on those it is
    /// told of by [`remote_rollback`](Self::remote_rollback)). One hook; a second call replaces the first.
    pub fn on_rollback(&self, hook: RollbackHook) {
        *self
            .inner
            .rollback_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// Another instance rolled `pattern` back (`reason`, one of `cache_rollback_total`'s reasons): open this
    /// instance's breaker for it too, for this instance's own `cooldown_secs`, after which it probes on its own
    /// traffic; nothing happens while rollback is off here or the pattern's breaker is open or probing. Not counted in
    /// `cache_rollback_total` (the deciding instance counted it); logged at WARN and kept in the swap history. A
    /// pattern this instance has not seen yet, or whose breaker is open already, is left alone.
    pub fn remote_rollback(&self, pattern: &str, reason: &str, from: &str) {
        let rules = self.inner.state.load().policy.rollback.clone();
        if !rules.enabled || self.breakers().contains_key(pattern) {
            // Rollback off here, or this instance's own breaker for the pattern is open or probing already.
            return;
        }
        let cooldown = Duration::from_secs(rules.cooldown_secs);
        let Some(reason) = Reason::ALL.into_iter().find(|r| r.as_str() == reason) else {
            tracing::debug!(
                key_pattern = pattern,
                reason,
                "cache: unknown rollback reason ignored"
            );
            return;
        };
        let Some(&idx) = self.inner.state.load().patterns.get(pattern) else {
            return;
        };
        let entry = self.slot(idx);
        if self.open_breaker(entry, pattern, reason, WindowCounts::default(), cooldown) {
            tracing::warn!(
                key_pattern = pattern,
                reason = reason.as_str(),
                from,
                cooldown_secs = cooldown.as_secs(),
                "cache: rolled back to observe by another instance"
            );
        }
    }

    /// Installs a whole policy read from the fleet state (source `fleet`, reason `fleet version N`). Breakers stay
    /// open but for those of patterns whose settings changed.
    ///
    /// # Errors
    /// As [`switch`](Self::switch); the previous state stays.
    pub async fn apply_fleet_policy(&self, policy: Policy, version: u64) -> Result<()> {
        self.install_why(
            Change::Fleet(policy),
            "fleet",
            Some(format!("fleet version {version}")),
        )
        .await
    }

    /// A handle that does not keep the registry alive (background tasks stop once it is dropped).
    pub fn downgrade(&self) -> WeakRegistry {
        WeakRegistry(Arc::downgrade(&self.inner))
    }

    /// The registry of a [`WeakRegistry`], if it is still alive.
    pub fn upgrade(weak: &WeakRegistry) -> Option<CacheRegistry> {
        weak.0.upgrade().map(|inner| CacheRegistry { inner })
    }

    /// Opens the pattern's breaker, unless it is open already (`false`), and schedules its half-open probe.
    fn open_breaker(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        reason: Reason,
        counts: WindowCounts,
        cooldown: Duration,
    ) -> bool {
        // The trip's probe counter also identifies it: the cool-down acts only on its own trip.
        let trip: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        {
            let mut b = self.breakers();
            let trips = match b.get(pattern) {
                Some(x) if x.state == BreakerState::Open => return false,
                Some(x) => x.trips + 1,
                None => 1,
            };
            b.insert(
                pattern.to_string(),
                Breaker {
                    state: BreakerState::Open,
                    reason,
                    window: counts,
                    since: now_rfc3339(),
                    trips,
                    probe: Arc::clone(&trip),
                },
            );
            entry.window.reset();
            self.apply_breakers(&b);
        }
        self.push_rollback(pattern, format!("{} -> observe", reason.as_str()));
        let weak = Arc::downgrade(&self.inner);
        let pattern = pattern.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(cooldown).await;
            if let Some(inner) = weak.upgrade() {
                CacheRegistry { inner }.half_open(&pattern, &trip);
            }
        });
        true
    }

    /// `scope = "impl"`: the whole impl goes to `null`, and after the cool-down back to what it was, unless the
    /// configuration changed in between.
    fn roll_impl_back(&self, pattern: &str, reason: Reason, cooldown: Duration) {
        let reg = self.clone();
        let why = format!("{pattern}: {} -> impl null", reason.as_str());
        tokio::spawn(async move {
            let before = reg.policy();
            let update = PolicyUpdate {
                imp: Some(CacheImpl::Null),
                ..PolicyUpdate::default()
            };
            let done = reg
                .install_why(Change::Update(update), "rollback", Some(why))
                .await;
            let since = reg.inner.state.load().version;
            tokio::time::sleep(cooldown).await;
            reg.inner.impl_rolled_back.store(false, Ordering::Release);
            if done.is_ok() {
                let back = Some(format!("cool-down over -> impl {}", before.imp));
                let _ = reg
                    .install_why(Change::Retry(before, since), "rollback", back)
                    .await;
            }
        });
    }

    fn half_open(&self, pattern: &str, trip: &Arc<std::sync::atomic::AtomicU64>) {
        let mut b = self.breakers();
        match b.get_mut(pattern) {
            Some(x) if Arc::ptr_eq(&x.probe, trip) && x.state == BreakerState::Open => {
                x.state = BreakerState::HalfOpen;
                x.probe = Arc::default();
            }
            _ => return, // closed by configuration, or tripped again since
        }
        if let Some(&i) = self.inner.state.load().patterns.get(pattern) {
            self.slot(i).window.reset();
        }
        self.apply_breakers(&b);
        drop(b);
        tracing::info!(
            key_pattern = pattern,
            "cache: rollback cool-down over, probing (half-open)"
        );
        self.push_rollback(pattern, "cool-down over -> half-open".into());
    }

    /// Closes the pattern's breaker if it is still in the half-open episode whose probe counter is `probe` (a call
    /// holding the route of an earlier episode must not close a later one).
    fn close_breaker(&self, pattern: &str, probe: &Arc<std::sync::atomic::AtomicU64>) {
        let mut b = self.breakers();
        if !matches!(b.get(pattern), Some(x) if x.state == BreakerState::HalfOpen && Arc::ptr_eq(&x.probe, probe))
        {
            return;
        }
        b.remove(pattern);
        self.apply_breakers(&b);
        drop(b);
        tracing::info!(
            key_pattern = pattern,
            "cache: probe passed, pattern restored"
        );
        self.push_rollback(pattern, "probe passed -> closed".into());
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

    async fn serve<C, E, F, Fut>(
        &self,
        call: Call<'_>,
        track: Option<Track>,
        shared: &Arc<dyn Cache>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let Call {
            key,
            pattern,
            entry,
            route,
            start,
            ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let m = &entry.metrics;
        let imp = backend.kind();
        let metrics = &self.inner.metrics;
        let version = self.inner.value_version;
        let clock = &self.inner.clock;
        let mut pending = PendingGet::new(self, entry, track, start);
        let got = bounded(backend, route.read_timeout, "get", backend.get(key)).await;
        let read_ns = nanos_since(clock, start);
        metrics
            .op_duration(imp, Operation::Get)
            .observe_nanos(read_ns);
        // Time spent waiting on the cache in this call: reads, lease and fill share one deadline.
        let mut cache_ns = read_ns;
        let mut backend_ok = true;
        match got {
            Ok(Some(bytes)) => match (bytes.len(), codec::decode::<C>(bytes, version)) {
                (len, Ok(v)) => {
                    self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                    m.hit(imp);
                    analysis::record_call(entry.tag, 0);
                    pending.finish(Some(len), true);
                    return Ok(v);
                }
                (_, Err(e)) => {
                    self.read_done(entry, pattern, route, start, read_ns, ReadResult::Error);
                    metrics.error(imp, e.error_type());
                    tracing::warn!(key, error = %e, "cache: corrupted entry deleted");
                    let t0 = clock.raw();
                    let budget = route
                        .read_timeout
                        .saturating_sub(Duration::from_nanos(cache_ns));
                    if let Err(e) = bounded(backend, budget, "delete", backend.delete(key)).await {
                        metrics.error(imp, e.error_type());
                    }
                    // Timed by hand: `timed` here would enlarge every served call's future (measured: +370
                    // instructions per memory hit).
                    let delete_ns = nanos_since(clock, t0);
                    metrics
                        .op_duration(imp, Operation::Delete)
                        .observe_nanos(delete_ns);
                    cache_ns += delete_ns;
                }
            },
            Ok(None) => self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok),
            Err(e) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::of(&e));
                metrics.error(imp, e.error_type());
                tracing::debug!(key, error = %e, "cache: get failed, falling back to the loader");
                backend_ok = false;
            }
        }
        m.miss(imp);
        // The miss path is boxed: it holds much more across its awaits (flight, lease, load, fill) than the hit
        // path, and inline it would make every call's future as large as its own. A miss runs the loader anyway.
        Box::pin(self.serve_miss(
            Miss {
                call,
                backend: shared,
                cache_ns,
                backend_ok,
            },
            pending,
            loader,
        ))
        .await
    }

    /// The miss path of [`serve`](Self::serve): single-flight, lease, load, fill.
    async fn serve_miss<C, E, F, Fut>(
        &self,
        miss: Miss<'_>,
        mut pending: PendingGet<'_>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let Miss {
            call:
                Call {
                    key,
                    entry,
                    route,
                    tags,
                    ..
                },
            backend: shared,
            mut cache_ns,
            mut backend_ok,
        } = miss;
        let backend: &dyn Cache = &**shared;
        let m = &entry.metrics;
        let imp = backend.kind();
        let metrics = &self.inner.metrics;
        let version = self.inner.value_version;
        let clock = &self.inner.clock;
        let leader = match self.inner.flights.join(key, tags) {
            Join::Follower(rx) => {
                // The leader signals once the cache holds the key's value; the follower then reads it from the
                // cache rather than taking the leader's copy: a read made after the follower started cannot
                // predate an invalidation (from any process) that returned before it started, since every fill is
                // made under a lease that invalidation revokes.
                if flight::wait(rx).await.is_some() {
                    let t0 = clock.raw();
                    let budget = route
                        .read_timeout
                        .saturating_sub(Duration::from_nanos(cache_ns));
                    let again = bounded(backend, budget, "get", backend.get(key)).await;
                    metrics
                        .op_duration(imp, Operation::Get)
                        .observe_nanos(nanos_since(clock, t0));
                    if let Ok(Some(bytes)) = again {
                        let len = bytes.len();
                        if let Ok(v) = codec::decode::<C>(bytes, version) {
                            m.coalesced();
                            analysis::record_call(entry.tag, 0);
                            pending.finish(Some(len), true);
                            return Ok(v);
                        }
                    }
                }
                None // the leader failed or was detached: load ourselves, without storing over a newer load
            }
            Join::Leader(guard) => Some(guard),
        };
        // The leader asks for the key's lease before it reads the origin: an invalidation from now on revokes it,
        // so a value read before a write can never be stored after that write's invalidation.
        let mut lease = None;
        if leader.is_some() && backend_ok {
            let t0 = clock.raw();
            let budget = route
                .read_timeout
                .saturating_sub(Duration::from_nanos(cache_ns));
            let asked = self.next_token();
            let r = bounded(
                backend,
                budget,
                "lease",
                backend.lease(key, asked, route.lease_ttl, tags),
            )
            .await;
            let lease_ns = nanos_since(clock, t0);
            cache_ns += lease_ns;
            metrics
                .op_duration(imp, Operation::Get)
                .observe_nanos(lease_ns);
            let filled = match r {
                Ok(Lookup::Lease(t)) => {
                    metrics.lease(imp, "granted");
                    lease = Some(t);
                    None
                }
                Ok(Lookup::Hit(bytes)) => Some(bytes),
                Ok(Lookup::Held) => {
                    metrics.lease(imp, "held");
                    // Boxed: a rare path whose timers would otherwise enlarge every served call's future.
                    let got = Box::pin(self.wait_for_fill(backend, key, route, cache_ns)).await;
                    if got.is_some() {
                        metrics.lease(imp, "waited");
                    }
                    got
                }
                Err(e) => {
                    metrics.error(imp, e.error_type());
                    if matches!(e, Error::Timeout { .. }) {
                        // Redis may still grant it after we gave up: release it, or it blocks fills until it
                        // expires.
                        self.release_in_background(shared, key, asked);
                    }
                    backend_ok = false;
                    None
                }
            };
            if let Some(bytes) = filled {
                let len = bytes.len();
                if let Ok(v) = codec::decode::<C>(bytes.clone(), version) {
                    // Another caller (another process) filled it: as good as a coalesced miss.
                    if let Some(g) = &leader {
                        g.publish(bytes);
                    }
                    m.coalesced();
                    analysis::record_call(entry.tag, 0);
                    pending.finish(Some(len), true);
                    return Ok(v);
                }
            }
        }
        let load_start = clock.raw();
        let loaded = loader().await;
        let nanos = nanos_since(clock, load_start);
        m.loader_nanos(nanos);
        analysis::record_call(entry.tag, nanos);
        // A lease that will not be filled is released, so that other processes need not wait for it to expire.
        let release = |token: Option<u64>, cache_ns: u64| async move {
            if let (Some(t), true) = (token, backend_ok) {
                let budget = route
                    .read_timeout
                    .saturating_sub(Duration::from_nanos(cache_ns));
                let release = bounded(backend, budget, "release", backend.release_lease(key, t));
                let _ = self.timed(imp, Operation::Delete, release).await;
            }
        };
        let value = match loaded {
            Ok(v) => v,
            Err(e) => {
                pending.finish(None, false);
                release(lease, cache_ns).await;
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
                release(lease, cache_ns).await;
                return Ok(value);
            }
        };
        pending.finish(Some(bytes.len()), bytes.len() <= self.inner.max_value_bytes);
        m.value_size.observe(bytes.len() as f64);
        // Followers are told only once the value is stored under a lease that was still valid (they then read it
        // from the cache). Without a fill (the cache failing, another process's lease, a value too large) they
        // load for themselves.
        if bytes.len() > self.inner.max_value_bytes {
            metrics.error(imp, "too_large");
            tracing::warn!(
                key,
                size = bytes.len(),
                max = self.inner.max_value_bytes,
                "cache: value too large, not stored"
            );
            release(lease, cache_ns).await;
        } else if let (Some(token), true) = (lease, backend_ok) {
            // The fill gets what is left of the deadline; past it the caller goes on and the fill is dropped (the
            // lease then expires by itself).
            let budget = route
                .read_timeout
                .saturating_sub(Duration::from_nanos(cache_ns));
            let t0 = clock.raw();
            let r = bounded(
                backend,
                budget,
                "set",
                backend.set_leased(key, bytes.clone(), route.ttl, token, tags),
            )
            .await;
            metrics
                .op_duration(imp, Operation::Set)
                .observe_nanos(nanos_since(clock, t0));
            match r {
                Ok(true) => {
                    m.set(imp);
                    if let Some(g) = &leader {
                        g.publish(bytes);
                    }
                }
                Ok(false) => {
                    metrics.lease(imp, "revoked");
                    tracing::debug!(
                        key,
                        "cache: lease revoked by an invalidation, value not stored"
                    );
                }
                Err(e) => {
                    metrics.error(imp, e.error_type());
                    tracing::debug!(key, error = %e, "cache: fill failed");
                    if matches!(e, Error::Timeout { .. }) {
                        // The fill may not have run: release its lease (a no-op if it did run).
                        self.release_in_background(shared, key, token);
                    }
                }
            }
        }
        drop(leader);
        Ok(value)
    }

    /// Releases `token`'s lease on `key` in the background, bounded by the backend's own command timeout.
    fn release_in_background(&self, backend: &Arc<dyn Cache>, key: &str, token: u64) {
        let (reg, backend, key) = (self.clone(), Arc::clone(backend), key.to_string());
        tokio::spawn(async move {
            let _ = reg
                .timed(
                    backend.kind(),
                    Operation::Delete,
                    backend.release_lease(&key, token),
                )
                .await;
        });
    }

    /// Runs one backend operation off the read path (writes, invalidations, lease releases, background fills),
    /// observing its duration in
    /// `cache_operation_duration_seconds{operation}` and counting its failure in `cache_errors_total`, so that
    /// every counted error has its operation counted too (the error ratio's two sides count the same calls).
    async fn timed<T>(
        &self,
        imp: CacheImpl,
        operation: Operation,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let clock = &self.inner.clock;
        let t0 = clock.raw();
        let r = f.await;
        let metrics = &self.inner.metrics;
        metrics
            .op_duration(imp, operation)
            .observe_nanos(nanos_since(clock, t0));
        if let Err(e) = &r {
            metrics.error(imp, e.error_type());
        }
        r
    }

    /// Another process holds the key's lease: polls for its fill every 5 ms for at most `lease_wait`.
    /// The polls share what is left of the call's read deadline (`cache_ns` spent so far): a Redis that hangs
    /// meanwhile still adds no more than the deadline to the call.
    async fn wait_for_fill(
        &self,
        backend: &dyn Cache,
        key: &str,
        route: &Route,
        mut cache_ns: u64,
    ) -> Option<Bytes> {
        let clock = &self.inner.clock;
        let until = tokio::time::Instant::now() + route.lease_wait;
        while tokio::time::Instant::now() + Duration::from_millis(5) <= until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let budget = route
                .read_timeout
                .saturating_sub(Duration::from_nanos(cache_ns));
            let t0 = clock.raw();
            let poll = bounded(backend, budget, "get", backend.get(key));
            let r = self.timed(backend.kind(), Operation::Get, poll).await;
            cache_ns += nanos_since(clock, t0);
            match r {
                Ok(Some(b)) => return Some(b),
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Shadow mode: the caller always gets the loader's value. Before the loader runs, the cache is read (a lease
    /// on a miss, so that the fill is safe); afterwards what it held is compared with the loader's value, and a
    /// miss is filled (or a differing copy deleted) in the background.
    async fn shadow<C, E, F, Fut>(
        &self,
        call: Call<'_>,
        track: Option<Track>,
        backend: Arc<dyn Cache>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let Call {
            key,
            pattern,
            entry,
            route,
            tags,
            start,
        } = call;
        let imp = backend.kind();
        let clock = &self.inner.clock;
        let token = self.next_token();
        let looked = bounded(
            &*backend,
            route.read_timeout,
            "lease",
            backend.lease(key, token, route.lease_ttl, tags),
        )
        .await;
        let read_ns = nanos_since(clock, start);
        self.inner
            .metrics
            .op_duration(imp, Operation::Get)
            .observe_nanos(read_ns);
        let rm = self.rollout_metrics(entry);
        let looked = match looked {
            Ok(l) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                Some(l)
            }
            Err(e) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::of(&e));
                self.inner.metrics.error(imp, e.error_type());
                rm.shadow[3].inc();
                None
            }
        };
        let r = self.observe(entry, track, loader).await;
        let Some(looked) = looked else {
            return r;
        };
        // The loader's value as it would be stored; `None`: nothing to compare or fill (the loader failed, or the
        // value cannot be encoded or is too large).
        let bytes = match &r {
            Ok(v) => match codec::encode(key, v, self.inner.value_version) {
                Ok(b) if b.len() <= self.inner.max_value_bytes => Some(b),
                Ok(_) => {
                    self.inner.metrics.error(imp, "too_large");
                    None
                }
                Err(e) => {
                    self.inner.metrics.error(imp, e.error_type());
                    None
                }
            },
            Err(_) => None,
        };
        let (reg, key, idx) = (self.clone(), key.to_string(), entry.tag as usize);
        match (looked, bytes) {
            (Lookup::Hit(cached), Some(bytes)) => {
                if codec::same_value(&cached, &bytes) {
                    rm.shadow[0].inc();
                    self.compared(entry, pattern, route, start, true);
                } else {
                    // Confirm before counting: if the key changed or went away meanwhile, a write and its
                    // invalidation came during the load, and the difference is not the cache's fault.
                    let (pattern, route) = (pattern.to_string(), route.clone());
                    tokio::spawn(async move {
                        let e = reg.slot(idx);
                        let rm = reg.rollout_metrics(e);
                        match reg.timed(imp, Operation::Get, backend.get(&key)).await {
                            Ok(Some(now)) if now == cached => {
                                rm.shadow[1].inc();
                                tracing::warn!(key, "cache: shadow mismatch, cached copy deleted");
                                reg.compared(e, &pattern, &route, reg.inner.clock.raw(), false);
                                let _ = reg
                                    .timed(imp, Operation::Delete, backend.delete(&key))
                                    .await;
                            }
                            Ok(_) => rm.shadow[2].inc(),
                            Err(_) => rm.shadow[3].inc(),
                        }
                    });
                }
            }
            (Lookup::Lease(token), Some(bytes)) => {
                rm.shadow[2].inc();
                let (tags, ttl) = (tags.to_vec(), route.ttl);
                tokio::spawn(async move {
                    let fill = backend.set_leased(&key, bytes, ttl, token, &tags);
                    match reg.timed(imp, Operation::Set, fill).await {
                        Ok(true) => reg.slot(idx).metrics.set(imp),
                        Ok(false) => reg.inner.metrics.lease(imp, "revoked"),
                        Err(_) => {}
                    }
                });
            }
            (Lookup::Lease(token), None) => {
                // Not filled: release the lease so that other processes need not wait for it to expire.
                self.release_in_background(&backend, &key, token);
            }
            (Lookup::Held, _) => rm.shadow[2].inc(),
            (Lookup::Hit(_), None) => {}
        }
        r
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
        self.set_value(key, &JsonRef(value), &[]).await
    }

    /// [`set`](Self::set), recording the entry under `tags` (see [`invalidate_tag`](Self::invalidate_tag)).
    ///
    /// # Errors
    /// As [`set`](Self::set); a malformed tag is an [`Error::InvalidKey`].
    pub async fn set_tagged<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
        tags: &[&str],
    ) -> Result<()> {
        self.set_value(key, &JsonRef(value), tags).await
    }

    /// [`set`](Self::set) for raw bytes.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_bytes(&self, key: &str, value: Bytes) -> Result<()> {
        self.set_value(key, &value, &[]).await
    }

    async fn set_value<C: Codec>(&self, key: &str, value: &C, tags: &[&str]) -> Result<()> {
        validate_key(key)?;
        for t in tags {
            validate_key(t)?;
        }
        let state = self.inner.state.load_full();
        let (entry, ttl, track) = {
            let mut buf = None;
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            let entry = self.entry(&state, &pattern);
            let route = state.route(&pattern);
            let serves = route.is_some();
            let track = state
                .policy
                .enabled
                .then(|| self.track(&state, entry, &pattern, key, serves))
                .flatten();
            (entry, route.map(|r| r.ttl), track)
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
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_string()).collect();
        let imp = state.backend.kind();
        let write = state.backend.set_tagged(key, bytes, Some(ttl), &tags);
        self.timed(imp, Operation::Set, write)
            .await
            .inspect(|()| entry.metrics.set(imp))
            .inspect_err(|e| tracing::debug!(key, error = %e, "cache: set failed"))
    }

    /// Deletes every entry stored with `tag` ([`get_or_load_tagged`](Self::get_or_load_tagged),
    /// [`set_tagged`](Self::set_tagged)) from the active backend, revokes the leases of loads in progress with it
    /// (in every process: the tag's keys are kept in the backend), and detaches this process's loads with it;
    /// returns how many entries were deleted. Counted in `cache_invalidate_total{tag}` (the first 32 tags by
    /// name, later ones as `other`).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a malformed tag, or the backend's error (also counted).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        validate_key(tag)?;
        let state = self.inner.state.load_full();
        if state.stores {
            self.inner.flights.detach_tagged(tag);
        }
        let imp = state.backend.kind();
        self.inner.metrics.invalidated_tag(imp, tag);
        if !state.stores {
            return Ok(0);
        }
        self.timed(
            imp,
            Operation::InvalidateTag,
            state.backend.invalidate_tag(tag),
        )
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
        self.timed(imp, Operation::Delete, state.backend.delete(key))
            .await
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
        let delete = self.delete_pattern_in(&*state.backend, pattern);
        self.timed(imp, Operation::DeletePattern, delete).await
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
        self.install_why(change, source, None).await
    }

    async fn install_why(
        &self,
        change: Change,
        source: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let cur = self.inner.state.load_full();
        // Breakers a successful swap closes: those of the patterns it names, or all of them on a full reload.
        let closes: Option<Vec<String>> = match &change {
            Change::Update(u) => Some(
                u.patterns
                    .as_ref()
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default(),
            ),
            Change::Replace(..) => None,
            Change::Retry(..) => Some(Vec::new()),
            Change::Fleet(p) => Some(
                cur.policy
                    .patterns
                    .keys()
                    .chain(p.patterns.keys())
                    .filter(|k| cur.policy.patterns.get(*k) != p.patterns.get(*k))
                    .cloned()
                    .collect(),
            ),
        };
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
            Change::Fleet(p) => {
                p.validate()?;
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
            reason,
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
                tracing::warn!(
                    source,
                    to = %policy.imp,
                    reason = record.reason.as_deref().unwrap_or(source),
                    error = %e,
                    "cache: swap refused, previous state kept"
                );
                self.push_swap(record);
                return Err(e);
            }
        };
        self.inner.metrics.swap(true);
        let (enabled, imp) = (policy.enabled, policy.imp);
        let mut breakers = self.breakers();
        match closes {
            None => breakers.clear(),
            Some(names) => {
                for n in names {
                    if breakers.remove(&n).is_some() {
                        tracing::info!(key_pattern = %n, "cache: breaker closed by configuration");
                    }
                }
            }
        }
        let mut next = Active::new(policy, backend, redis, version, Arc::default(), &breakers);
        next.whitelisted = self.whitelist_estimator(&cur, &next);
        if next.stores {
            for (pattern, route) in &next.routes {
                if route.mode != Mode::Observe {
                    self.inner.metrics.declare_rollbacks(imp, pattern);
                }
            }
        }
        // rcu, not store: a pattern first seen during the swap must not be lost. Under the breakers' lock, so a
        // trip cannot slip in between.
        self.inner.state.rcu(|cur| Active {
            patterns: Arc::clone(&cur.patterns),
            ..next.clone()
        });
        drop(breakers);
        self.inner.metrics.set_enabled(enabled, imp);
        tracing::info!(
            source,
            version,
            reason = record.reason.as_deref().unwrap_or(source),
            "{}",
            self.state_line()
        );
        self.push_swap(record);
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
        #[cfg(feature = "redis")]
        let same_l1 = l1_patterns(policy) == l1_patterns(&cur.policy);
        #[cfg(not(feature = "redis"))]
        let same_l1 = true;
        if same_impl && (policy.imp != CacheImpl::Redis || (*redis == cur.redis && same_l1)) {
            return Ok(Arc::clone(&cur.backend));
        }
        // The same Redis data behind a new connection (only a timeout or the L1 patterns changed): everything it
        // holds saw every invalidation, so it is reconnected but not flushed.
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
            CacheImpl::Redis => self.connect_redis(policy, redis).await?,
        };
        // Otherwise the new backend missed every invalidation made while it was not active (in this process or a
        // previous one): drop everything it holds under its prefix before it serves anything.
        if !backend.always_misses() && !same_data {
            let n = backend.delete_matching("", &|_| true).await?;
            tracing::info!(imp = %policy.imp, deleted = n, "cache: flushed the newly active backend");
        }
        Ok(backend)
    }

    /// A Redis backend for `policy`: with an in-process L1 in front when some pattern asks for one.
    #[cfg(feature = "redis")]
    async fn connect_redis(&self, policy: &Policy, redis: &RedisOptions) -> Result<Arc<dyn Cache>> {
        let l1 = l1_patterns(policy);
        let l2 = RedisCache::connect(redis.clone()).await?;
        if l1.is_empty() {
            return Ok(Arc::new(l2));
        }
        Ok(Arc::new(TieredCache::new(
            l2,
            l1,
            self.inner.key_patterns.clone(),
            self.inner.memory_max_entries,
            self.inner.memory_max_bytes,
            self.inner.metrics.l1_counts(),
        )?))
    }

    /// Without the `redis` feature there is no Redis backend: the switch is refused and the state kept.
    #[cfg(not(feature = "redis"))]
    async fn connect_redis(&self, _: &Policy, _: &RedisOptions) -> Result<Arc<dyn Cache>> {
        Err(Error::config(
            "cache.impl (CACHE_IMPL)",
            "redis",
            "this build of cache-rollout has no `redis` feature",
        ))
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
            routes: self.route_views(&s),
        }
    }

    fn route_views(&self, s: &Active) -> BTreeMap<String, RouteView> {
        let breakers = self.breakers().clone();
        let bucket = self.bucket(&s.default_route, self.inner.clock.raw());
        // Patterns seen and whitelisted, and every pattern configured, listed or rolled back, seen or not.
        let mut names: std::collections::BTreeSet<&str> = s
            .patterns
            .keys()
            .map(|n| &**n)
            .filter(|n| s.whitelisted(n))
            .collect();
        names.extend(s.policy.patterns.keys().map(String::as_str));
        names.extend(
            s.policy
                .whitelist
                .iter()
                .map(String::as_str)
                .filter(|p| *p != "*"),
        );
        names.extend(breakers.keys().map(String::as_str));
        // A pattern not seen yet has no handles: its arms are empty.
        let empty = RolloutMetrics::default();
        names
            .into_iter()
            .map(|name| {
                let pp = s.policy.patterns.get(name);
                let route = s.routes.get(name).unwrap_or(&s.default_route);
                let entry = s.patterns.get(name).map(|&i| self.slot(i));
                let rm = entry.map_or(&empty, |e| self.rollout_metrics(e));
                let hits = entry.map_or(0, |e| e.metrics.hits_of(s.policy.imp));
                let view = RouteView {
                    mode: if s.route(name).is_some() {
                        route.mode
                    } else {
                        Mode::Observe
                    },
                    configured_mode: pp.and_then(|p| p.mode).unwrap_or_default(),
                    ramp_percent: pp.and_then(|p| p.ramp_percent).unwrap_or(100.0),
                    read_timeout_ms: route.read_timeout.as_millis() as u64,
                    ttl_secs: route.ttl.as_secs(),
                    breaker: breakers.get(name).cloned(),
                    window: entry.map(|e| e.window.counts(bucket)).unwrap_or_default(),
                    ramped: ArmView::of(&rm.ramped, hits),
                    unramped: ArmView::of(&rm.unramped, 0),
                    shadowed: ArmView::of(&rm.shadowed, 0),
                    shadow: crate::metrics::SHADOW_RESULTS
                        .iter()
                        .zip(&rm.shadow)
                        .map(|(r, c)| (*r, c.get()))
                        .collect(),
                };
                (name.to_string(), view)
            })
            .collect()
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
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
