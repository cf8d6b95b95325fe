//! What `GET /internal/cache` shows: the state, the swaps, the per-pattern routes and arms.

use super::*;

/// One entry of the swap history.
#[derive(Debug, Clone, Serialize)]
pub struct SwapRecord {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// What asked for it.
    pub source: SwapSource,
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
    pub cache_impl: CacheImpl,
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
    /// `true` while this process, having left Redis (impl `null` or `memory` after `redis`), still deletes there
    /// on every write and invalidation, for the instances that may still serve from it (`docs/behaviour.md`).
    pub deletes_in_left_redis: bool,
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
    /// Hits among them: for the ramped arm, every hit of the pattern under the active impl (served); for the
    /// shadowed arm, shadow reads that found a value in the cache, matching or not (not served: the hit ratio
    /// serving would have had); the unramped arm never reads the cache, so 0.
    pub hits: u64,
    /// `hits / calls`, when there were calls.
    pub hit_ratio: Option<f64>,
    /// Mean call duration, in milliseconds.
    pub mean_ms: Option<f64>,
    /// 99th percentile call duration is at most this, in milliseconds: the upper bound of the histogram bucket
    /// that holds it (buckets double from 50 µs), hence `le` as in Prometheus's buckets.
    pub p99_le_ms: Option<f64>,
}

impl ArmView {
    pub(super) fn of(h: &crate::metrics::DurationHistogram, hits: u64) -> Self {
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
            p99_le_ms: p99,
        }
    }
}

impl CacheRegistry {
    /// The active policy.
    pub fn policy(&self) -> Policy {
        self.inner.active.load().policy.clone()
    }

    /// The active Redis options (those of the last successful swap).
    pub fn redis_options(&self) -> RedisOptions {
        self.inner.active.load().redis.clone()
    }

    /// One line for logs: `cache: enabled impl=null whitelist=[]`.
    pub(crate) fn state_line(&self) -> String {
        let s = self.inner.active.load();
        format!(
            "cache: {} impl={} whitelist=[{}]",
            if s.policy.enabled {
                "enabled"
            } else {
                "disabled"
            },
            s.policy.cache_impl,
            s.policy.whitelist.join(",")
        )
    }

    /// Counters of every key pattern seen so far.
    pub fn pattern_counts(&self) -> BTreeMap<String, PatternCounts> {
        self.inner
            .active
            .load()
            .patterns
            .iter()
            .map(|(name, &i)| (name.to_string(), self.slot(i).metrics.counts()))
            .collect()
    }

    /// A snapshot for `GET /internal/cache`, with a Redis health check (at most 250 ms) when the impl is `redis`.
    pub async fn state(&self) -> StateView {
        let s = self.inner.active.load_full();
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
            cache_impl: s.policy.cache_impl,
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
            deletes_in_left_redis: s.sink.is_some(),
            routes: self.route_views(&s),
        }
    }

    pub(super) fn route_views(&self, s: &Active) -> BTreeMap<String, RouteView> {
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
                let hits = entry.map_or(0, |e| e.metrics.hits_of(s.policy.cache_impl));
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
                    // A shadow read "hits" when the cache held a value, matching or not, though the origin's
                    // was returned: the hit ratio serving would have had.
                    shadowed: ArmView::of(
                        &rm.shadowed,
                        rm.shadow(ShadowResult::Match).get()
                            + rm.shadow(ShadowResult::Mismatch).get(),
                    ),
                    shadow: ShadowResult::ALL
                        .into_iter()
                        .map(|r| (r.as_str(), rm.shadow(r).get()))
                        .collect(),
                };
                (name.to_string(), view)
            })
            .collect()
    }
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
