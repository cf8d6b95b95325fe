//! Prometheus metric families and the label handles cached per key pattern.
//!
//! Names are the seed system's (`cache_hits_total`, `cache_miss_total`, …) so its dashboards carry over; the
//! histograms follow Prometheus conventions (seconds, bytes). Every family lives in one [`prometheus::Registry`]
//! owned by [`Metrics`], so several registries (tests, several caches in one process) never clash; `GET /metrics`
//! renders it with [`Metrics::render`].
//!
//! | family | type | labels |
//! |---|---|---|
//! | `cache_hits_total`, `cache_miss_total`, `cache_set_total`, `cache_del_total` | counter | `impl`, `key_pattern` |
//! | `cache_coalesced_total` | counter | `key_pattern` (misses answered by another caller's load: single-flight) |
//! | `cache_stale_served_total` | counter | `key_pattern`, `reason` (`error`: stale-if-error, `revalidate`: stale-while-revalidate) |
//! | `cache_negative_hits_total` | counter | `key_pattern` (hits on a cached absence, `cache_negative_secs`; also in `cache_hits_total`) |
//! | `cache_refresh_total` | counter | `key_pattern`, `result` (`stored`, `failed`: the loader failed, `not_stored`): refreshes of entries past their TTL by stale-while-revalidate |
//! | `cache_errors_total` | counter | `impl`, `error_type` |
//! | `cache_invalidate_total` | counter | `impl`, `tag` (`key`, `pattern`, or an application tag: the first 32 seen, then `other`) |
//! | `cache_call_duration_seconds` | histogram | `arm`, `key_pattern` (`ramped`: served, `unramped`: outside the ramp, observed, `shadowed`): whole calls of patterns in shadow or serve mode |
//! | `cache_shadow_total` | counter | `key_pattern`, `result` (`match`, `mismatch`, `miss`, `error`) |
//! | `cache_rollback_total` | counter | `impl`, `key_pattern`, `reason` |
//! | `cache_lease_total` | counter | `impl`, `result` (`granted`, `held`, `revoked`, `waited`) |
//! | `cache_enabled` | gauge | `impl` (1 for the active impl while enabled) |
//! | `cache_swaps_total` | counter | `result` (`ok`, `error`) |
//! | `cache_operation_duration_seconds` | histogram | `impl`, `operation` |
//! | `cache_loader_duration_seconds` | histogram | `key_pattern` |
//! | `cache_value_size_bytes` | histogram | `key_pattern` |
//! | `cache_candidate_requests_total` | counter | `route`, `method` |
//! | `cache_candidate_request_duration_seconds` | histogram | `route`, `method` |
//! | `cache_admin_auth_failures_total` | counter | `action` (`read`, `change`): `/internal/cache` requests refused for a missing or wrong admin token |
//!
//! Label handles are resolved once per pattern ([`PatternMetrics`]) or per route and cached; the hot path never
//! looks a label up by string.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::analysis::RouteCalls;

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cache::CacheImpl;

mod histogram;
mod pattern;

pub use self::histogram::{bucket_bounds_seconds, DurationHistogram, DurationHistogramVec};
use self::pattern::PatternCollector;
pub use self::pattern::{PatternCounts, PatternMetrics, STRIPES};

/// The `error_type` label values, in a fixed order (see [`Error::error_type`](crate::Error::error_type)).
pub const ERROR_TYPES: [&str; 8] = [
    "timeout",
    "connection",
    "redis",
    "corrupt",
    "too_large",
    "encode",
    "invalid_key",
    "other",
];

/// The `operation` label values of `cache_operation_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// A read.
    Get,
    /// A write.
    Set,
    /// A delete of one key.
    Delete,
    /// A delete of every key of a pattern.
    DeletePattern,
    /// A delete of every entry of a tag.
    InvalidateTag,
}

impl Operation {
    const ALL: [Operation; 5] = [
        Operation::Get,
        Operation::Set,
        Operation::Delete,
        Operation::DeletePattern,
        Operation::InvalidateTag,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Set => "set",
            Operation::Delete => "delete",
            Operation::DeletePattern => "delete_pattern",
            Operation::InvalidateTag => "invalidate_tag",
        }
    }
}

/// Every metric family of one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    patterns: Arc<PatternCollector>,
    coalesced: IntCounterVec,
    stale_served: IntCounterVec,
    negative_hits: IntCounterVec,
    refreshes: IntCounterVec,
    value_size: HistogramVec,
    enabled: IntGaugeVec,
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    fleet_version: prometheus::IntGauge,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    l1: IntCounterVec,
    swaps: IntCounterVec,
    invalidate: IntCounterVec,
    candidate_requests: IntCounterVec,
    candidate_duration: HistogramVec,
    routes: Arc<Mutex<Vec<(String, String, RouteMetrics)>>>,
    call_duration: Arc<DurationHistogramVec>,
    shadow: IntCounterVec,
    rollbacks: IntCounterVec,
    leases: IntCounterVec,
    /// The `(impl, pattern)` pairs whose rollback series [`Metrics::declare_rollbacks`] created last.
    rollbacks_declared: Arc<Mutex<HashSet<(CacheImpl, String)>>>,
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    auth_failures: IntCounterVec,
    tag_labels: Arc<Mutex<HashSet<String>>>,
    errors: Vec<Vec<IntCounter>>,                  // [impl][error_type]
    op_duration: Vec<Vec<Arc<DurationHistogram>>>, // [impl][operation]
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Seconds: 50 µs … ~3.3 s, doubling.
fn duration_buckets() -> Vec<f64> {
    exponential_buckets(0.000_05, 2.0, 17).unwrap_or_default()
}

impl Metrics {
    /// Registers every family in a fresh [`Registry`].
    ///
    /// # Panics
    /// Never in practice: the names and label sets are constants, and registration into a fresh registry only
    /// fails for duplicate or malformed names.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("valid counter definition");
            registry
                .register(Box::new(c.clone()))
                .expect("fresh registry");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid histogram definition");
            registry
                .register(Box::new(h.clone()))
                .expect("fresh registry");
            h
        };
        let patterns = Arc::new(PatternCollector::new().expect("valid pattern families"));
        registry
            .register(Box::new(Shared(Arc::clone(&patterns))))
            .expect("fresh registry");
        let coalesced = counter(
            "cache_coalesced_total",
            "Misses answered by another caller's load of the same key (single-flight).",
            &["key_pattern"],
        );
        let stale_served = counter(
            "cache_stale_served_total",
            "Reads answered with an entry past its TTL: reason error (the loader failed: stale-if-error) or \
             revalidate (stale-while-revalidate, while one caller refreshes it).",
            &["key_pattern", "reason"],
        );
        let negative_hits = counter(
            "cache_negative_hits_total",
            "Hits on a cached absence (a loader's not-found, kept cache_negative_secs); also in cache_hits_total.",
            &["key_pattern"],
        );
        let refreshes = counter(
            "cache_refresh_total",
            "Refreshes of entries past their TTL under stale-while-revalidate, by result (stored, failed, not_stored).",
            &["key_pattern", "result"],
        );
        let errors_vec = counter(
            "cache_errors_total",
            "Cache backend errors, by type; each fell back to the loader.",
            &["impl", "error_type"],
        );
        let invalidate = counter(
            "cache_invalidate_total",
            "Invalidations, by tag.",
            &["impl", "tag"],
        );
        let swaps = counter(
            "cache_swaps_total",
            "Runtime configuration swaps, by result.",
            &["result"],
        );
        // Both results exist from the start, so the first swap (or refusal) is an increase `increase()` can see.
        for result in ["ok", "error"] {
            swaps.with_label_values(&[result]);
        }
        let candidate_requests = counter(
            "cache_candidate_requests_total",
            "HTTP requests per matched route (candidates for caching).",
            &["route", "method"],
        );
        let enabled = IntGaugeVec::new(
            Opts::new(
                "cache_enabled",
                "1 for the active cache impl while caching is enabled, else 0.",
            ),
            &["impl"],
        )
        .expect("valid gauge definition");
        registry
            .register(Box::new(enabled.clone()))
            .expect("fresh registry");
        let fleet_version = prometheus::IntGauge::new(
            "cache_fleet_version",
            "Version of the fleet state this instance runs (0: none, or the fleet state is off).",
        )
        .expect("valid gauge definition");
        registry
            .register(Box::new(fleet_version.clone()))
            .expect("fresh registry");
        let l1 = counter(
            "cache_l1_total",
            "In-process L1 in front of Redis: hits, fills, fills skipped for an invalidation in flight, entries \
             invalidated by a message, whole-L1 clears.",
            &["result"],
        );
        #[cfg(feature = "redis")]
        for result in crate::cache::L1_RESULTS {
            l1.with_label_values(&[result]);
        }
        let fast = |name: &str, help: &str, labels: &[&str]| {
            let h = Arc::new(
                DurationHistogramVec::new(name, help, labels).expect("valid histogram definition"),
            );
            registry
                .register(Box::new(Shared(Arc::clone(&h))))
                .expect("fresh registry");
            h
        };
        let op_vec = fast(
            "cache_operation_duration_seconds",
            "Duration of cache backend operations in seconds.",
            &["impl", "operation"],
        );

        let value_size = histogram(
            "cache_value_size_bytes",
            "Encoded size of loaded values in bytes.",
            &["key_pattern"],
            exponential_buckets(64.0, 4.0, 10).unwrap_or_default(),
        );
        let candidate_duration = histogram(
            "cache_candidate_request_duration_seconds",
            "Duration of HTTP requests per matched route in seconds.",
            &["route", "method"],
            duration_buckets(),
        );
        let call_duration = fast(
            "cache_call_duration_seconds",
            "Duration of whole cache calls (read, load, fill) of patterns in shadow or serve mode, in seconds: served \
             keys in the ramp, observed keys outside it, and shadowed keys.",
            // Sorted, as the `prometheus` crate exposes its own families' labels.
            &["arm", "key_pattern"],
        );
        let shadow = counter(
            "cache_shadow_total",
            "Shadow comparisons of the cached value with the loader's, by result.",
            &["key_pattern", "result"],
        );
        let rollbacks = counter(
            "cache_rollback_total",
            "Automatic rollbacks, by the rule that tripped.",
            &["impl", "key_pattern", "reason"],
        );
        let leases = counter(
            "cache_lease_total",
            "Fill leases: granted, held by another caller, revoked before the fill, waited for another's fill.",
            &["impl", "result"],
        );
        let auth_failures = counter(
            "cache_admin_auth_failures_total",
            "Requests under /internal/cache refused for a missing or wrong admin token, by what they tried.",
            &["action"],
        );
        for action in ["read", "change"] {
            auth_failures.with_label_values(&[action]);
        }
        // The storing impls' lease results and built-in invalidation kinds exist from the start, at 0, so that the
        // first of each is an increase Prometheus can see.
        for cache_impl in [CacheImpl::Memory, CacheImpl::Redis] {
            for result in ["granted", "held", "waited", "revoked"] {
                leases.with_label_values(&[cache_impl.as_str(), result]);
            }
            for tag in ["key", "pattern"] {
                invalidate.with_label_values(&[cache_impl.as_str(), tag]);
            }
        }
        let errors = CacheImpl::ALL
            .iter()
            .map(|i| {
                ERROR_TYPES
                    .iter()
                    .map(|t| errors_vec.with_label_values(&[i.as_str(), t]))
                    .collect()
            })
            .collect();
        let op_duration = CacheImpl::ALL
            .iter()
            .map(|i| {
                Operation::ALL
                    .iter()
                    .map(|o| op_vec.with_label_values(&[i.as_str(), o.as_str()]))
                    .collect()
            })
            .collect();
        for i in CacheImpl::ALL {
            enabled.with_label_values(&[i.as_str()]).set(0);
        }
        Metrics {
            registry,
            patterns,
            coalesced,
            stale_served,
            negative_hits,
            refreshes,
            value_size,
            enabled,
            fleet_version,
            l1,
            swaps,
            invalidate,
            candidate_requests,
            candidate_duration,
            routes: Arc::default(),
            call_duration,
            shadow,
            rollbacks,
            leases,
            rollbacks_declared: Arc::default(),
            auth_failures,
            tag_labels: Arc::default(),
            errors,
            op_duration,
        }
    }

    /// Counts a request refused for a missing or wrong admin token (`action`: `read` or `change`).
    #[cfg(feature = "axum")]
    pub(crate) fn auth_failed(&self, action: &'static str) {
        self.auth_failures.with_label_values(&[action]).inc();
    }

    /// The Prometheus registry holding every family (to add your own, or to gather).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition format (version 0.0.4) of every family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` cannot register.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Creates the metrics of one key pattern and adds them to the exposition.
    pub fn pattern(&self, pattern: &str) -> Arc<PatternMetrics> {
        let m = Arc::new(PatternMetrics::new(
            self.coalesced.with_label_values(&[pattern]),
            self.value_size.with_label_values(&[pattern]),
        ));
        m.set_outcomes(pattern::Outcomes {
            stale_error: self.stale_served.with_label_values(&[pattern, "error"]),
            stale_revalidate: self
                .stale_served
                .with_label_values(&[pattern, "revalidate"]),
            negative_hits: self.negative_hits.with_label_values(&[pattern]),
            refresh: ["stored", "failed", "not_stored"]
                .map(|r| self.refreshes.with_label_values(&[pattern, r])),
        });
        self.patterns.add(pattern, Arc::clone(&m));
        m
    }

    /// Resolves the label handles of one candidate route.
    pub fn route(&self, route: &str, method: &str) -> RouteMetrics {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, m)) = routes.iter().find(|(r, me, _)| r == route && me == method) {
            return m.clone();
        }
        let m = RouteMetrics {
            requests: self.candidate_requests.with_label_values(&[route, method]),
            duration: self.candidate_duration.with_label_values(&[route, method]),
            calls: Arc::default(),
        };
        routes.push((route.to_string(), method.to_string(), m.clone()));
        m
    }

    /// Every candidate route seen: (route, method, handles).
    pub(crate) fn routes(&self) -> Vec<(String, String, RouteMetrics)> {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn error(&self, cache_impl: CacheImpl, error_type: &str) {
        let idx = ERROR_TYPES
            .iter()
            .position(|t| *t == error_type)
            .unwrap_or(ERROR_TYPES.len() - 1);
        self.errors[cache_impl.index()][idx].inc();
    }

    pub(crate) fn op_duration(&self, cache_impl: CacheImpl, op: Operation) -> &DurationHistogram {
        &self.op_duration[cache_impl.index()][op as usize]
    }

    pub(crate) fn set_enabled(&self, enabled: bool, active: CacheImpl) {
        for i in CacheImpl::ALL {
            self.enabled
                .with_label_values(&[i.as_str()])
                .set(i64::from(enabled && i == active));
        }
    }

    /// The `cache_l1_total` counter, by result, for a [`TieredCache`](crate::cache::TieredCache).
    #[cfg(feature = "redis")]
    pub(crate) fn l1_counts(&self) -> IntCounterVec {
        self.l1.clone()
    }

    #[cfg(feature = "fleet")]
    pub(crate) fn set_fleet_version(&self, version: u64) {
        self.fleet_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    pub(crate) fn swap(&self, ok: bool) {
        self.swaps
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub(crate) fn invalidated(&self, cache_impl: CacheImpl, tag: &str) {
        self.invalidate
            .with_label_values(&[cache_impl.as_str(), tag])
            .inc();
    }

    /// `cache_invalidate_total` for an application tag: the first [`MAX_TAG_LABELS`] tags seen keep their name,
    /// later ones count under `other`.
    pub(crate) fn invalidated_tag(&self, cache_impl: CacheImpl, tag: &str) {
        let label = {
            let mut seen = self
                .tag_labels
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if seen.contains(tag) || (seen.len() < MAX_TAG_LABELS && seen.insert(tag.to_string())) {
                tag.to_string()
            } else {
                crate::pattern::OTHER.to_string()
            }
        };
        self.invalidated(cache_impl, &label);
    }

    /// The ramp and shadow handles of one pattern (resolved when the pattern is first routed).
    pub(crate) fn rollout(&self, pattern: &str) -> RolloutMetrics {
        RolloutMetrics {
            ramped: self.call_duration.with_label_values(&["ramped", pattern]),
            unramped: self.call_duration.with_label_values(&["unramped", pattern]),
            shadowed: self.call_duration.with_label_values(&["shadowed", pattern]),
            shadow: ShadowResult::ALL
                .map(|r| self.shadow.with_label_values(&[pattern, r.as_str()])),
        }
    }

    /// Creates the `cache_rollback_total` series of the served or shadowed patterns at 0, one per reason, so that
    /// the first rollback is an increase Prometheus can see (`increase()` cannot see a series that starts at 1);
    /// and removes those of patterns no longer served or shadowed that never counted a rollback, so that changing
    /// the whitelist again and again does not pile series up.
    pub(crate) fn declare_rollbacks(&self, routed: HashSet<(CacheImpl, String)>) {
        use crate::rollout::Reason;
        let mut declared = self
            .rollbacks_declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (cache_impl, pattern) in declared.difference(&routed) {
            let labels = |r: Reason| [cache_impl.as_str(), pattern.as_str(), r.as_str()];
            let untouched = Reason::ALL.into_iter().all(|r| {
                self.rollbacks
                    .get_metric_with_label_values(&labels(r))
                    .map_or(true, |c| c.get() == 0)
            });
            if untouched {
                for r in Reason::ALL {
                    let _ = self.rollbacks.remove_label_values(&labels(r));
                }
            }
        }
        for (cache_impl, pattern) in &routed {
            for reason in Reason::ALL {
                self.rollbacks
                    .with_label_values(&[cache_impl.as_str(), pattern, reason.as_str()]);
            }
        }
        *declared = routed;
    }

    pub(crate) fn rollback(&self, cache_impl: CacheImpl, pattern: &str, reason: &str) {
        self.rollbacks
            .with_label_values(&[cache_impl.as_str(), pattern, reason])
            .inc();
    }

    pub(crate) fn lease(&self, cache_impl: CacheImpl, result: &str) {
        self.leases
            .with_label_values(&[cache_impl.as_str(), result])
            .inc();
    }

    /// Total of `cache_errors_total` for one impl and error type (for tests and the JSON state).
    pub fn errors(&self, cache_impl: CacheImpl, error_type: &str) -> u64 {
        ERROR_TYPES
            .iter()
            .position(|t| *t == error_type)
            .map_or(0, |idx| self.errors[cache_impl.index()][idx].get())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers an `Arc`ed collector: the registry takes ownership of a `Box`, and we keep a handle to add children.
pub(crate) struct Shared<C>(pub(crate) Arc<C>);

impl<C: prometheus::core::Collector> prometheus::core::Collector for Shared<C> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

/// Most application tags with their own `tag` label in `cache_invalidate_total`.
pub const MAX_TAG_LABELS: usize = 32;

/// How one shadow comparison ended: the `result` label of `cache_shadow_total`.
/// The discriminant is the index in [`ShadowResult::ALL`] and in a pattern's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShadowResult {
    /// The cache held the loader's value.
    Match = 0,
    /// The cache held another value (deleted, then refilled).
    Mismatch = 1,
    /// The cache held nothing (filled in the background).
    Miss = 2,
    /// The cache failed.
    Error = 3,
}

impl ShadowResult {
    /// Every result, in the order `GET /internal/cache` lists them (and of their discriminants).
    pub(crate) const ALL: [ShadowResult; 4] = [
        ShadowResult::Match,
        ShadowResult::Mismatch,
        ShadowResult::Miss,
        ShadowResult::Error,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ShadowResult::Match => "match",
            ShadowResult::Mismatch => "mismatch",
            ShadowResult::Miss => "miss",
            ShadowResult::Error => "error",
        }
    }
}

/// The label handles of one routed pattern (`Default`: detached handles, all zero, for a pattern not seen yet).
#[derive(Debug, Clone)]
pub(crate) struct RolloutMetrics {
    pub(crate) ramped: Arc<DurationHistogram>,
    pub(crate) unramped: Arc<DurationHistogram>,
    pub(crate) shadowed: Arc<DurationHistogram>,
    /// By [`ShadowResult`], in the order of [`ShadowResult::ALL`].
    shadow: [IntCounter; 4],
}

impl RolloutMetrics {
    /// The `cache_shadow_total` counter of one result.
    pub(crate) fn shadow(&self, result: ShadowResult) -> &IntCounter {
        &self.shadow[result as usize]
    }
}

impl Default for RolloutMetrics {
    fn default() -> Self {
        let zero = || {
            IntCounter::new("cache_shadow_unseen", "A pattern not seen yet.")
                .expect("valid counter definition")
        };
        RolloutMetrics {
            ramped: Arc::default(),
            unramped: Arc::default(),
            shadowed: Arc::default(),
            shadow: [zero(), zero(), zero(), zero()],
        }
    }
}

/// The cached label handles of one candidate route.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    pub(crate) requests: IntCounter,
    pub(crate) duration: Histogram,
    pub(crate) calls: Arc<RouteCalls>,
}
