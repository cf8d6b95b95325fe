//! Phase 2: what a cache would buy, predicted while observing.
//!
//! Every get, set and invalidation that goes through the [`CacheRegistry`](crate::CacheRegistry), whatever the
//! impl, also feeds an online estimator of the LRU miss ratio curve: one per key pattern (for the first
//! [`AnalysisOptions::max_patterns`] patterns), one shared by every pattern (one Redis holds them all), and, while a
//! whitelist is served, one for the whitelisted patterns together (the cache that serves them). The
//! estimator is fixed-size SHARDS ([`Shards`], Waldspurger et al., FAST 2015), TTL-aware and invalidation-aware,
//! in a fixed amount of memory per pattern. [`Report`] turns the curves and the registry's counters into
//! per-pattern predictions (hit ratio, memory, origin time saved) and a recommendation that
//! `PUT /internal/cache/config` takes as it is. `docs/analysis.md` gives the method, its sources, and the measured
//! accuracy and cost.

mod budget;
mod curve;
mod redis_sim;
mod report;
mod route;
mod shards;
mod table;

pub use self::budget::{
    parse_memory, BudgetPlan, BudgetShare, BUDGET_METHOD, MAX_PLANNED_PATTERNS, MIN_BUDGET_BYTES,
};
pub(crate) use self::budget::{plan as plan_budget, split as split_budget, BudgetInput};
pub use self::curve::{Curve, CurvePoint, CurveSamples, SizeHit};
pub use self::redis_sim::{EvictionPolicy, RedisEviction};
#[cfg(feature = "axum")]
pub(crate) use self::report::human_bytes;
pub(crate) use self::report::{build, shared_report, PatternInput, ReportContext, RouteInput};
pub use self::report::{
    LoaderStats, MemoryPoint, MemoryPrediction, MissCauses, PatternReport, Recommendation, Report,
    RoutePatternReport, RouteReport, SharedReport, SizePoint, ValueSizes, MAX_RECOMMENDED_TTL_SECS,
    MAX_WRITE_RATIO, METHOD, MIN_GETS, MIN_HIT_RATIO, MIN_RECOMMENDED_TTL_SECS, SIZE_SHARE_OF_MAX,
    TTL_REUSE_SHARE,
};
#[cfg(feature = "axum")]
pub(crate) use self::route::Outcomes;
pub(crate) use self::route::{record_call, record_outcome, RouteCalls};
pub use self::route::{RequestScope, ROUTE_SCOPE};
pub use self::shards::{key_hash, Access, SampleStats, Shards, WARMUP_GETS};

use serde::{Deserialize, Serialize};

/// Redis memory per key besides the key and value strings, in bytes: the main and expires dictionary entries (32
/// bytes each), the value object (16) and about 21 bytes of hash-table slots. Measured on Redis 7.0.15 with jemalloc
/// 5.3 and `SET key value EX 300` (see `docs/analysis.md`, "Memory"); [`redis_entry_bytes`] adds the strings.
pub const REDIS_PER_KEY_OVERHEAD_BYTES: u32 = 101;

/// The smallest jemalloc size class holding `n` bytes (x86-64, 16-byte quantum): 8, then multiples of 16 up to 128,
/// then four classes per doubling (160, 192, 224, 256, 320, …). Source: jemalloc(3), "Size classes".
pub fn jemalloc_size_class(n: u64) -> u64 {
    if n <= 8 {
        8
    } else if n <= 128 {
        n.div_ceil(16) * 16
    } else {
        let base = 1u64 << (63 - (n - 1).leading_zeros());
        let step = base / 4;
        n.div_ceil(step) * step
    }
}

/// Bytes of Redis memory (`used_memory`) one string key with a TTL takes: `overhead` plus the key's and the value's
/// sds strings (3 and 5 header bytes with the terminator) rounded up to jemalloc size classes. Within about 1% of
/// `INFO memory` for keys of 16 and 40 bytes and values of 64 to 4,096 bytes (`docs/analysis.md`).
pub fn redis_entry_bytes(key_len: u64, value_len: u64, overhead: u32) -> u64 {
    u64::from(overhead) + jemalloc_size_class(key_len + 3) + jemalloc_size_class(value_len + 5)
}

/// Settings of the analysis (`[cache.analysis]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisOptions {
    /// Run the estimators at all. Off, the observe path skips the key hash and the sample check.
    pub enabled: bool,
    /// Keys sampled per key pattern (SHARDS `s_max`, 64 to 1,048,576). Memory per pattern is bounded by
    /// [`Shards::heap_bytes_bound`] of this: about 6.0 MiB for the default 7,168 with the eviction simulations (0.9
    /// MiB without), approached only by patterns with more distinct keys than that.
    pub sample_keys: usize,
    /// Keys sampled by the estimator shared by all patterns.
    pub shared_sample_keys: usize,
    /// Largest share of keys an estimator samples once it has seen [`WARMUP_GETS`] sampled
    /// gets (0–1]: small key spaces are exact at first, then a hot small key space costs the lock on at most this
    /// share of its calls.
    pub max_sampling_rate: f64,
    /// Patterns with their own estimator (the first seen, default 32); later patterns only feed the shared one. With
    /// the defaults the estimators hold at most 32 × 6.0 MiB + 2 × 20 MiB (shared, whitelist) ≈ 232 MiB
    /// (measured peak on uniform keys: 1.0 MiB per pattern), or 31 MiB with `simulate_eviction` off.
    pub max_patterns: usize,
    /// Redis memory per key besides key and value, in bytes.
    pub per_key_overhead_bytes: u32,
    /// Cache capacities, in objects, at which the report and the `cache_predicted_hit_ratio` gauge give the
    /// predicted hit ratio.
    pub capacities: Vec<u64>,
    /// Predict as if entries never expired (trace replay without `--ttl`); otherwise each pattern's TTL applies.
    pub ignore_ttl: bool,
    /// Points of the whole miss ratio curve the report gives per pattern and for the shared cache (its `curve`
    /// field, which `--plot` draws), in objects and in bytes each: 2 to 1,000.
    pub curve_points: usize,
    /// Redis's eviction to predict besides exact LRU (`[cache.analysis.eviction]`: `policy = "allkeys-lru"` or
    /// `"allkeys-lfu"`, `samples`, `lfu_log_factor`, `lfu_decay_minutes`). Unset (the default), it is read from
    /// the Redis of `REDIS_URL` when that answers (`CONFIG GET maxmemory-policy maxmemory-samples lfu-log-factor
    /// lfu-decay-time`), and is `allkeys-lru` with 5 samples until then.
    pub eviction: Option<RedisEviction>,
    /// Memory the served patterns share in Redis, bytes, for the prediction the measured hit ratio is checked
    /// against (`cache_served_predicted_hit_ratio`). Unset (the default): the Redis's `maxmemory` less its
    /// `used_memory_startup`, read every minute; no limit without a `maxmemory`.
    pub redis_memory_bytes: Option<u64>,
    /// Run the miniature simulations of Redis's eviction (MiniSim). Off, byte predictions are exact LRU's and
    /// each estimator's memory bound falls from about 6.0 MiB to 0.9 MiB ([`Shards::heap_bytes_bound_with`]);
    /// measured peak with it on: 1.0 MiB per estimator on ten million distinct keys.
    pub simulate_eviction: bool,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions {
            enabled: true,
            sample_keys: 7168,
            shared_sample_keys: 16_384,
            max_sampling_rate: 0.0625,
            max_patterns: 32,
            per_key_overhead_bytes: REDIS_PER_KEY_OVERHEAD_BYTES,
            capacities: vec![1_000, 10_000, 100_000, 1_000_000],
            ignore_ttl: false,
            curve_points: 40,
            eviction: None,
            redis_memory_bytes: None,
            simulate_eviction: true,
        }
    }
}

/// Most capacities the report and the gauge take (the gauge's `capacity` label stays bounded).
pub const MAX_CAPACITIES: usize = 8;

impl AnalysisOptions {
    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the key and the value.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::Error;
        if !(64..=1 << 20).contains(&self.sample_keys) {
            return Err(Error::config(
                "cache.analysis.sample_keys",
                self.sample_keys.to_string(),
                "must be between 64 and 1048576",
            ));
        }
        if !(64..=1 << 20).contains(&self.shared_sample_keys) {
            return Err(Error::config(
                "cache.analysis.shared_sample_keys",
                self.shared_sample_keys.to_string(),
                "must be between 64 and 1048576",
            ));
        }
        if !(self.max_sampling_rate > 0.0 && self.max_sampling_rate <= 1.0) {
            return Err(Error::config(
                "cache.analysis.max_sampling_rate",
                self.max_sampling_rate.to_string(),
                "must be above 0 and at most 1",
            ));
        }
        if self.max_patterns > crate::pattern::MAX_PATTERNS_LIMIT {
            return Err(Error::config(
                "cache.analysis.max_patterns",
                self.max_patterns.to_string(),
                "must be at most 10000",
            ));
        }
        if let Some(e) = &self.eviction {
            if !(1..=64).contains(&e.samples) {
                return Err(Error::config(
                    "cache.analysis.eviction.samples",
                    e.samples.to_string(),
                    "must be between 1 and 64",
                ));
            }
        }
        if !(2..=1000).contains(&self.curve_points) {
            return Err(Error::config(
                "cache.analysis.curve_points",
                self.curve_points.to_string(),
                "must be between 2 and 1000",
            ));
        }
        if self.capacities.is_empty()
            || self.capacities.len() > MAX_CAPACITIES
            || self.capacities.contains(&0)
        {
            return Err(Error::config(
                "cache.analysis.capacities",
                format!("{:?}", self.capacities),
                "must list 1 to 8 capacities, each at least 1 object",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bytes_match_the_measurements() {
        // (key, value, measured bytes per key: key + value + measured overhead), Redis 7.0.15, N = 100,000.
        for (k, v, measured) in [
            (16, 64, 213.56),
            (16, 512, 772.97),
            (16, 4096, 5253.17),
            (40, 64, 228.97),
            (40, 512, 788.96),
            (40, 4096, 5268.96),
        ] {
            let model = redis_entry_bytes(k, v, REDIS_PER_KEY_OVERHEAD_BYTES) as f64;
            assert!(
                (model / measured - 1.0).abs() < 0.01,
                "{k}/{v}: {model} vs {measured}"
            );
        }
        assert_eq!(jemalloc_size_class(517), 640);
        assert_eq!(jemalloc_size_class(69), 80);
        assert_eq!(jemalloc_size_class(4101), 5120);
    }
}
