//! [`Report`]: the phase-2 analysis as `GET /internal/cache/report` serves it (schema in `docs/analysis.md`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use prometheus::proto;
use serde::{Deserialize, Serialize};

use super::curve::{Curve, CurveSamples};
use super::redis_sim::RedisEviction;
use super::shards::SampleStats;
use crate::cache::CacheImpl;
use crate::policy::{PatternPolicy, PolicyUpdate, MAX_TTL_SECS};

/// Fewest gets of a pattern before it is recommended either way.
pub const MIN_GETS: u64 = 1000;

/// Largest share of writes (sets and invalidations over all requests) of a recommended pattern: 30%, the line
/// Twitter's study of 153 cache clusters draws for write-heavy workloads (J. Yang, Y. Yue and K. V. Rashmi, "A large
/// scale analysis of hundreds of in-memory cache clusters at Twitter", OSDI 2020, §4.2).
pub const MAX_WRITE_RATIO: f64 = 0.30;

/// Smallest best-case hit ratio of a recommended pattern: below it a cache mostly adds a round trip to each miss.
pub const MIN_HIT_RATIO: f64 = 0.10;

/// The recommended size reaches this share of the best hit ratio any size reaches.
pub const SIZE_SHARE_OF_MAX: f64 = 0.95;

/// The suggested TTL covers this share of the observed reuse intervals.
pub const TTL_REUSE_SHARE: f64 = 0.90;

/// Shortest recommended TTL, in seconds: a short observation window only sees short reuse intervals, and a TTL
/// below a minute would turn every pause in traffic into misses.
pub const MIN_RECOMMENDED_TTL_SECS: u64 = 60;

/// Longest recommended TTL, in seconds (one day).
pub const MAX_RECOMMENDED_TTL_SECS: u64 = 86_400;

/// Shares of the best hit ratio at which the report gives the memory needed.
const MEMORY_SHARES: [f64; 5] = [0.5, 0.8, 0.9, 0.95, 0.99];

/// One cache size and what it buys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizePoint {
    /// Capacity in objects.
    pub objects: u64,
    /// Predicted LRU hit ratio (0–1).
    pub hit_ratio: f64,
    /// Redis memory for that many objects, in bytes: `min(objects, unique keys) × mean bytes per key` (key, value and
    /// the per-key overhead).
    pub memory_bytes: u64,
    /// Origin (loader) time saved per second of wall time, in seconds: predicted hits per second × mean loader time.
    pub origin_seconds_saved_per_second: f64,
    /// Predicted hit ratio (0–1) of a Redis of `memory_bytes` evicting by the report's
    /// [`eviction`](Report::eviction) (MiniSim; `docs/analysis.md`, "Redis's own eviction").
    #[serde(default)]
    pub redis_hit_ratio: Option<f64>,
    /// Half-width of an approximate 95% interval around `redis_hit_ratio` (0–1).
    #[serde(default)]
    pub uncertainty: f64,
}

/// The memory needed to reach a hit ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPoint {
    /// Target hit ratio (0–1).
    pub hit_ratio: f64,
    /// That target as a share of the best hit ratio any size reaches.
    pub share_of_max: f64,
    /// Fewest objects that reach it (object miss ratio curve).
    pub objects: Option<u64>,
    /// Fewest bytes that reach it (byte miss ratio curve: keys, values and per-key overhead).
    pub memory_bytes: Option<u64>,
}

/// Observed value sizes of a pattern, in bytes (encoded, envelope included), from `cache_value_size_bytes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueSizes {
    /// Values measured.
    pub count: u64,
    /// Mean size.
    pub mean: f64,
    /// Median, interpolated inside its histogram bucket.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// Loader (origin) latency of a pattern, in seconds, from `cache_loader_duration_seconds`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoaderStats {
    /// Loader calls.
    pub calls: u64,
    /// Total loader time.
    pub total_seconds: f64,
    /// Mean loader time.
    pub mean_seconds: f64,
    /// Median.
    pub p50_seconds: Option<f64>,
    /// 99th percentile.
    pub p99_seconds: Option<f64>,
}

/// Why gets would miss at any size, as shares of all gets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MissCauses {
    /// First get of a key.
    pub cold: f64,
    /// Get later than the TTL after the key was written.
    pub expired: f64,
    /// Get after an invalidation of the key.
    pub invalidated: f64,
}

/// Loader error share from which the report advises stale-if-error (0.1%).
const ADVISE_ERROR_RATIO: f64 = 0.001;
/// Share of absences from which the report advises negative caching (5%).
const ADVISE_ABSENT_RATIO: f64 = 0.05;
/// Share of gets past their entry's TTL from which the report advises stale-while-revalidate (5%).
const ADVISE_EXPIRED_SHARE: f64 = 0.05;

/// The analysis of one key pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternReport {
    /// Reads.
    pub gets: u64,
    /// Reads served from the cache (0 while observing).
    pub hits: u64,
    /// Application writes (`set`).
    pub writes: u64,
    /// Invalidations of one key.
    pub deletes: u64,
    /// Reads per second over the observed time.
    pub gets_per_second: f64,
    /// `(writes + deletes) / (gets + writes + deletes)`.
    pub write_ratio: f64,
    /// Measured hit ratio `hits / gets` (what the cache in place does).
    pub measured_hit_ratio: f64,
    /// Whether this pattern has its own estimator (the first `cache.analysis.max_patterns` patterns do); without
    /// one, the predictions below are empty.
    pub estimated: bool,
    /// Estimated distinct keys.
    pub unique_keys: u64,
    /// Predicted LRU hit ratio at each configured capacity in objects (keys are the capacities).
    pub predicted_hit_ratio: BTreeMap<String, f64>,
    /// Best hit ratio any size reaches.
    pub max_hit_ratio: f64,
    /// What each configured size buys.
    pub sizes: Vec<SizePoint>,
    /// Memory needed for shares of the best hit ratio.
    pub memory_for_hit_ratio: Vec<MemoryPoint>,
    /// Misses no size avoids.
    pub misses_at_any_size: MissCauses,
    /// TTL the predictions assume, in seconds (`None`: no expiry modelled).
    pub ttl_secs: Option<u64>,
    /// Value sizes.
    pub value_bytes: ValueSizes,
    /// Mean Redis bytes per key (key, value and per-key overhead) in the sample.
    pub mean_key_bytes: f64,
    /// Loader latency.
    pub loader: LoaderStats,
    /// SHARDS sampling rate now (0–1].
    pub sampling_rate: f64,
    /// Keys in the sample now.
    pub sampled_keys: u64,
    /// Whether it is served now (whitelisted under a storing impl).
    pub served: bool,
    /// The recommendation: whitelist it or not.
    pub recommended: bool,
    /// Recommended capacity in objects (reaches 95% of the best hit ratio).
    pub recommended_objects: Option<u64>,
    /// Redis memory of the recommended capacity, in bytes.
    pub recommended_memory_bytes: Option<u64>,
    /// Recommended TTL in seconds: the shortest power of two covering 90% of observed reuse intervals, within
    /// 60 s … 1 day (the current TTL when no reuse was seen).
    pub recommended_ttl_secs: Option<u64>,
    /// Why (or why not).
    pub reasons: Vec<String>,
    /// Share (0–1) of loader calls that returned an error.
    #[serde(default)]
    pub loader_error_ratio: f64,
    /// Share (0–1) of loader values the caller marked absent (`Fetch::absent_if`: a "not found").
    #[serde(default)]
    pub absent_ratio: f64,
    /// Which of stale-if-error, negative caching and stale-while-revalidate this pattern's figures say are worth
    /// turning on, and why (empty when none is).
    #[serde(default)]
    pub advice: Vec<String>,
    /// Fully served patterns (serve mode, every key, no breaker): the hit ratio measured since it last became so
    /// (0–1). Left out in shadow mode, a ramp under 100% or a rollback, whose unserved gets would dilute it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_hit_ratio: Option<f64>,
    /// Served patterns: the hit ratio predicted for the Redis memory it shares with the other served patterns,
    /// under Redis's eviction (0–1); far above `served_hit_ratio` for long is drift (docs/rollout.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_predicted_hit_ratio: Option<f64>,
    /// Served patterns: the memory that prediction gives it in Redis, bytes (keys, values and the per-key overhead):
    /// its share of what the served patterns occupy together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_memory_bytes: Option<u64>,
    /// The whole predicted miss ratio curve, in objects and in bytes (empty without an estimator).
    #[serde(default)]
    pub curve: CurveSamples,
}

/// The analysis of all patterns in one cache (one Redis holds every whitelisted pattern).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedReport {
    /// Reads of every pattern.
    pub gets: u64,
    /// Estimated distinct keys.
    pub unique_keys: u64,
    /// Predicted LRU hit ratio at each configured capacity.
    pub predicted_hit_ratio: BTreeMap<String, f64>,
    /// Best hit ratio any size reaches.
    pub max_hit_ratio: f64,
    /// What each configured size buys.
    pub sizes: Vec<SizePoint>,
    /// Memory needed for shares of the best hit ratio.
    pub memory_for_hit_ratio: Vec<MemoryPoint>,
    /// SHARDS sampling rate now.
    pub sampling_rate: f64,
    /// The whole predicted miss ratio curve, in objects and in bytes.
    #[serde(default)]
    pub curve: CurveSamples,
}

/// One pattern called by one candidate route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutePatternReport {
    /// The key pattern.
    pub key_pattern: String,
    /// Gets of the pattern made by the route's requests.
    pub calls: u64,
    /// Mean gets per request.
    pub calls_per_request: f64,
    /// Loader time of those gets, in seconds.
    pub loader_seconds: f64,
    /// `loader_seconds / route seconds`: the share of the route's time spent loading this pattern.
    pub share_of_route_time: f64,
}

/// One candidate route and the patterns its requests call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteReport {
    /// HTTP method.
    pub method: String,
    /// Matched route (`/users/{id}`).
    pub route: String,
    /// Requests.
    pub requests: u64,
    /// Total request time, seconds.
    pub seconds: f64,
    /// Share of the route's time spent in loaders (all patterns).
    pub loader_share: f64,
    /// Patterns called, most loader time first.
    pub patterns: Vec<RoutePatternReport>,
}

/// The recommendation, ready to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// Recommended patterns.
    pub whitelist: Vec<String>,
    /// Sum of the recommended patterns' memory, bytes.
    pub memory_bytes: u64,
    /// Origin time the recommended patterns would save per second at their recommended sizes, seconds.
    pub origin_seconds_saved_per_second: f64,
    /// A valid `PUT /internal/cache/config` body: impl `redis`, the whitelist, each pattern's TTL.
    pub apply: PolicyUpdate,
    /// The same as a `config/<env>.toml` snippet.
    pub toml: String,
}

/// The phase-2 report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When, RFC 3339 UTC.
    pub generated_at: String,
    /// Seconds the registry has observed.
    pub observed_seconds: f64,
    /// The estimator and its sources.
    pub method: String,
    /// Capacities (objects) of `predicted_hit_ratio`.
    pub capacities: Vec<u64>,
    /// Redis bytes per key besides key and value, in the memory figures.
    pub per_key_overhead_bytes: u32,
    /// Per key pattern.
    pub patterns: BTreeMap<String, PatternReport>,
    /// All patterns in one cache.
    pub shared: Option<SharedReport>,
    /// The whitelisted patterns in one cache (the one serving them), since the whitelist was last changed; `None`
    /// while nothing is served.
    pub whitelist: Option<SharedReport>,
    /// Route × pattern.
    pub routes: Vec<RouteReport>,
    /// What to whitelist, with which TTL.
    pub recommendation: Recommendation,
    /// The Redis eviction the `redis_hit_ratio` predictions are for.
    #[serde(default)]
    pub eviction: Option<RedisEviction>,
    /// With a memory budget (`?memory=2GiB`, `report --memory`): its split across the patterns; the
    /// recommendation then applies that split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<super::BudgetPlan>,
}

/// What one Redis of a given size would give every pattern together.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryPrediction {
    /// Memory for entries, bytes (keys, values and the per-key overhead; Redis's own `used_memory` at start not
    /// included).
    pub memory_bytes: u64,
    /// The eviction [`hit_ratio`](Self::hit_ratio) is for.
    pub eviction: RedisEviction,
    /// Predicted hit ratio under `eviction` (0–1).
    pub hit_ratio: f64,
    /// Predicted hit ratio of an exact LRU cache of the same size (0–1).
    pub lru_hit_ratio: f64,
    /// Half-width of an approximate 95% interval around `hit_ratio` (0–1).
    pub uncertainty: f64,
}

/// The method line of every report.
pub const METHOD: &str =
    "fixed-size SHARDS with SHARDS_adj (Waldspurger et al., FAST 2015), TTL-aware \
(Sultan et al., EuroSys 2024), deletes end reuse; LRU hit ratio by object count and by bytes";

/// Everything the registry knows about one pattern.
pub(crate) struct PatternInput {
    pub(crate) name: String,
    pub(crate) gets: u64,
    pub(crate) hits: u64,
    pub(crate) writes: u64,
    pub(crate) deletes: u64,
    pub(crate) served: bool,
    pub(crate) ttl_secs: Option<u64>,
    pub(crate) policy_ttl_secs: u64,
    pub(crate) loader: proto::Histogram,
    pub(crate) value_size: proto::Histogram,
    pub(crate) curve: Option<(Curve, SampleStats)>,
    pub(crate) loader_errors: u64,
    pub(crate) absent: u64,
    /// Seconds since the pattern was first seen (its rates in a budget split).
    pub(crate) age_seconds: f64,
}

/// One route's raw figures.
pub(crate) struct RouteInput {
    pub(crate) method: String,
    pub(crate) route: String,
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    /// (pattern name, calls, loader nanoseconds)
    pub(crate) calls: Vec<(String, u64, u64)>,
}

/// The `q` quantile of a Prometheus histogram, interpolated linearly inside its bucket as PromQL's
/// `histogram_quantile` does; `None` when empty. In the `+Inf` bucket it answers the largest finite bound.
pub(crate) fn quantile(h: &proto::Histogram, q: f64) -> Option<f64> {
    let total = h.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut prev_bound, mut prev_count) = (0.0, 0u64);
    for b in h.get_bucket() {
        let (bound, count) = (b.upper_bound(), b.cumulative_count());
        if count as f64 >= rank {
            let inside = (count - prev_count) as f64;
            let frac = if inside > 0.0 {
                (rank - prev_count as f64) / inside
            } else {
                0.0
            };
            return Some(prev_bound + (bound - prev_bound) * frac);
        }
        (prev_bound, prev_count) = (bound, count);
    }
    Some(prev_bound)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Capacities as report keys: `"1000"`.
fn capacity_map(capacities: &[u64], curve: &Curve) -> BTreeMap<String, f64> {
    capacities
        .iter()
        .map(|&c| (c.to_string(), round5(curve.hit_ratio_at_objects(c as f64))))
        .collect()
}

fn round5(x: f64) -> f64 {
    (x * 1e5).round() / 1e5
}

fn sizes(
    capacities: &[u64],
    curve: &Curve,
    stats: &SampleStats,
    gets_per_second: f64,
    mean_loader_seconds: f64,
) -> Vec<SizePoint> {
    capacities
        .iter()
        .map(|&c| {
            let h = curve.hit_ratio_at_objects(c as f64);
            let memory_bytes =
                ((c as f64).min(stats.distinct_keys.ceil()) * stats.mean_key_bytes) as u64;
            let eviction = curve.simulated_eviction();
            SizePoint {
                objects: c,
                hit_ratio: round5(h),
                memory_bytes,
                origin_seconds_saved_per_second: h * gets_per_second * mean_loader_seconds,
                redis_hit_ratio: eviction
                    .map(|e| round5(curve.hit_ratio_at_bytes_for(Some(e), memory_bytes as f64))),
                uncertainty: curve.uncertainty_at_bytes(eviction, memory_bytes as f64),
            }
        })
        .collect()
}

fn memory_points(curve: &Curve) -> Vec<MemoryPoint> {
    let max = curve.max_hit_ratio();
    MEMORY_SHARES
        .iter()
        .map(|&share| {
            let target = max * share;
            MemoryPoint {
                hit_ratio: round5(target),
                share_of_max: share,
                objects: curve.objects_for(target).map(|x| x as u64),
                memory_bytes: curve.bytes_for(target).map(|x| x as u64),
            }
        })
        .collect()
}

/// Shortest power-of-two TTL (seconds) covering `share` of the reuse intervals, within 1 s … 1 day.
fn suggested_ttl(reuse: &[f64; 34], share: f64) -> Option<u64> {
    let total: f64 = reuse.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut sum = 0.0;
    for (i, &n) in reuse.iter().enumerate() {
        sum += n;
        if sum >= share * total {
            // bucket i holds intervals below 2^i seconds
            return Some((1u64 << i.min(40)).clamp(1, 86_400));
        }
    }
    Some(86_400)
}

pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The pattern's report, and the origin seconds per second its recommended size would save (0 when not
/// recommended).
fn pattern_report(
    p: &PatternInput,
    capacities: &[u64],
    observed_seconds: f64,
    curve_points: usize,
) -> (PatternReport, f64) {
    let requests = p.gets + p.writes + p.deletes;
    let write_ratio = ratio((p.writes + p.deletes) as f64, requests as f64);
    let gets_per_second = ratio(p.gets as f64, observed_seconds);
    let loader_total = p.loader.get_sample_sum();
    let loader = LoaderStats {
        calls: p.loader.get_sample_count(),
        total_seconds: loader_total,
        mean_seconds: ratio(loader_total, p.loader.get_sample_count() as f64),
        p50_seconds: quantile(&p.loader, 0.5),
        p99_seconds: quantile(&p.loader, 0.99),
    };
    let value_bytes = ValueSizes {
        count: p.value_size.get_sample_count(),
        mean: ratio(
            p.value_size.get_sample_sum(),
            p.value_size.get_sample_count() as f64,
        ),
        p50: quantile(&p.value_size, 0.5),
        p90: quantile(&p.value_size, 0.9),
        p99: quantile(&p.value_size, 0.99),
    };
    let calls = loader.calls;
    let mut r = PatternReport {
        gets: p.gets,
        hits: p.hits,
        writes: p.writes,
        deletes: p.deletes,
        gets_per_second,
        write_ratio,
        measured_hit_ratio: ratio(p.hits as f64, p.gets as f64),
        estimated: p.curve.is_some(),
        unique_keys: 0,
        predicted_hit_ratio: BTreeMap::new(),
        max_hit_ratio: 0.0,
        sizes: Vec::new(),
        memory_for_hit_ratio: Vec::new(),
        misses_at_any_size: MissCauses::default(),
        ttl_secs: p.ttl_secs,
        value_bytes,
        mean_key_bytes: 0.0,
        loader,
        sampling_rate: 0.0,
        sampled_keys: 0,
        served: p.served,
        recommended: false,
        recommended_objects: None,
        recommended_memory_bytes: None,
        recommended_ttl_secs: None,
        reasons: Vec::new(),
        loader_error_ratio: ratio(p.loader_errors as f64, calls as f64),
        absent_ratio: ratio(p.absent as f64, calls as f64),
        advice: Vec::new(),
        served_hit_ratio: None,
        served_predicted_hit_ratio: None,
        served_memory_bytes: None,
        curve: CurveSamples::default(),
    };
    if r.loader_error_ratio >= ADVISE_ERROR_RATIO {
        r.advice.push(format!(
            "stale_if_error_secs: the loader failed in {:.2}% of its {calls} calls; with stale-if-error a read past \
             the TTL gets the last value instead of the error",
            r.loader_error_ratio * 100.0
        ));
    }
    if r.absent_ratio >= ADVISE_ABSENT_RATIO {
        r.advice.push(format!(
            "cache_negative_secs: {:.1}% of the loader's values were absences (not found); a short negative TTL \
             keeps repeated lookups of missing ids off the origin",
            r.absent_ratio * 100.0
        ));
    }
    let Some((curve, stats)) = &p.curve else {
        r.reasons
            .push("no estimator: the pattern came after cache.analysis.max_patterns others".into());
        return (r, 0.0);
    };
    let max = curve.max_hit_ratio();
    r.unique_keys = stats.distinct_keys.round() as u64;
    r.predicted_hit_ratio = capacity_map(capacities, curve);
    r.max_hit_ratio = round5(max);
    r.sizes = sizes(
        capacities,
        curve,
        stats,
        gets_per_second,
        r.loader.mean_seconds,
    );
    r.memory_for_hit_ratio = memory_points(curve);
    r.curve = curve.samples(curve_points);
    let gets = (p.gets as f64).max(1.0);
    r.misses_at_any_size = MissCauses {
        cold: round5(stats.cold_misses / gets),
        expired: round5(stats.expired_misses / gets),
        invalidated: round5(stats.invalidated_misses / gets),
    };
    r.mean_key_bytes = stats.mean_key_bytes.round();
    r.sampling_rate = stats.rate;
    r.sampled_keys = stats.sampled_keys;
    let target = max * SIZE_SHARE_OF_MAX;
    r.recommended_objects = curve.objects_for(target).map(|x| x as u64);
    r.recommended_memory_bytes = curve.bytes_for(target).map(|x| x as u64);
    r.recommended_ttl_secs = Some(match suggested_ttl(&stats.reuse_secs, TTL_REUSE_SHARE) {
        Some(ttl) => ttl.clamp(MIN_RECOMMENDED_TTL_SECS, MAX_RECOMMENDED_TTL_SECS),
        None => p.policy_ttl_secs.clamp(1, MAX_TTL_SECS),
    });

    let mut ok = true;
    if p.gets < MIN_GETS {
        ok = false;
        r.reasons.push(format!(
            "too little traffic: {} of the {MIN_GETS} gets needed to recommend",
            p.gets
        ));
    }
    if write_ratio > MAX_WRITE_RATIO {
        ok = false;
        r.reasons.push(format!(
            "write-heavy: writes and invalidations are {:.0}% of requests, over the {:.0}% line of Yang et al. \
             (OSDI 2020)",
            write_ratio * 100.0,
            MAX_WRITE_RATIO * 100.0
        ));
    }
    let max_uncertainty = curve.uncertainty_at_bytes(curve.simulated_eviction(), f64::MAX);
    if max < MIN_HIT_RATIO {
        ok = false;
        r.reasons.push(format!(
            "at most {:.1}% of gets would hit at any size (cold {:.0}%, expired {:.0}%, invalidated {:.0}%)",
            max * 100.0,
            r.misses_at_any_size.cold * 100.0,
            r.misses_at_any_size.expired * 100.0,
            r.misses_at_any_size.invalidated * 100.0
        ));
    } else if max - max_uncertainty < MIN_HIT_RATIO {
        ok = false;
        r.reasons.push(format!(
            "withheld: at most {:.1}% ± {:.1}% of gets would hit at any size, too close to the {:.0}% line to say \
             (the sample is small: observe longer, or raise cache.analysis.sample_keys)",
            max * 100.0,
            max_uncertainty * 100.0,
            MIN_HIT_RATIO * 100.0
        ));
    }
    let mut saved = 0.0;
    if ok {
        let objects = r.recommended_objects.unwrap_or(0);
        let hit_ratio = curve.hit_ratio_at_objects(objects as f64);
        saved = hit_ratio * gets_per_second * r.loader.mean_seconds;
        r.reasons.push(format!(
            "predicted hit ratio {:.1}% at {} objects ({}), {:.0}% of the best any size reaches; saves {:.3} s of \
             origin time per second",
            hit_ratio * 100.0,
            objects,
            human_bytes(r.recommended_memory_bytes.unwrap_or(0)),
            SIZE_SHARE_OF_MAX * 100.0,
            saved
        ));
        if let Some(ttl) = r.recommended_ttl_secs {
            r.reasons.push(format!(
                "TTL {ttl} s keeps {:.0}% of the observed reuse intervals (the shortest power of two of seconds \
                 that does, at least {MIN_RECOMMENDED_TTL_SECS} s, at most a day)",
                TTL_REUSE_SHARE * 100.0
            ));
        }
    }
    if r.misses_at_any_size.expired >= ADVISE_EXPIRED_SHARE {
        r.advice.push(format!(
            "stale_while_revalidate_secs: {:.1}% of gets come after their entry's TTL; served stale while one \
             caller refreshes the key, they would not wait for the loader (p99 {})",
            r.misses_at_any_size.expired * 100.0,
            r.loader
                .p99_seconds
                .map_or_else(|| "-".to_string(), |s| format!("{:.1} ms", s * 1e3))
        ));
    }
    r.recommended = ok;
    (r, saved)
}

pub(crate) fn shared_report(
    gets: u64,
    curve: &Curve,
    stats: &SampleStats,
    capacities: &[u64],
    observed_seconds: f64,
    mean_loader_seconds: f64,
    curve_points: usize,
) -> SharedReport {
    SharedReport {
        gets,
        unique_keys: stats.distinct_keys.round() as u64,
        predicted_hit_ratio: capacity_map(capacities, curve),
        max_hit_ratio: round5(curve.max_hit_ratio()),
        sizes: sizes(
            capacities,
            curve,
            stats,
            ratio(gets as f64, observed_seconds),
            mean_loader_seconds,
        ),
        memory_for_hit_ratio: memory_points(curve),
        sampling_rate: stats.rate,
        curve: curve.samples(curve_points),
    }
}

fn route_report(r: RouteInput) -> RouteReport {
    let mut patterns: Vec<RoutePatternReport> = r
        .calls
        .into_iter()
        .map(|(key_pattern, calls, nanos)| {
            let loader_seconds = nanos as f64 * 1e-9;
            RoutePatternReport {
                key_pattern,
                calls,
                calls_per_request: ratio(calls as f64, r.requests as f64),
                loader_seconds,
                share_of_route_time: ratio(loader_seconds, r.seconds).min(1.0),
            }
        })
        .collect();
    patterns.sort_by(|a, b| b.loader_seconds.total_cmp(&a.loader_seconds));
    let loader: f64 = patterns.iter().map(|p| p.loader_seconds).sum();
    RouteReport {
        method: r.method,
        route: r.route,
        requests: r.requests,
        seconds: r.seconds,
        loader_share: ratio(loader, r.seconds).min(1.0),
        patterns,
    }
}

/// What every part of a report shares.
pub(crate) struct ReportContext<'a> {
    pub(crate) capacities: &'a [u64],
    pub(crate) per_key_overhead_bytes: u32,
    pub(crate) observed_seconds: f64,
    pub(crate) generated_at: String,
    pub(crate) curve_points: usize,
    pub(crate) eviction: Option<RedisEviction>,
    /// A memory budget to split across the patterns, bytes.
    pub(crate) memory_bytes: Option<u64>,
}

/// Builds the report.
pub(crate) fn build(
    ctx: ReportContext<'_>,
    patterns: Vec<PatternInput>,
    shared: Option<SharedReport>,
    whitelisted: Option<SharedReport>,
    routes: Vec<RouteInput>,
) -> Report {
    let ReportContext {
        capacities,
        per_key_overhead_bytes,
        observed_seconds,
        generated_at,
        curve_points,
        eviction,
        memory_bytes,
    } = ctx;
    let mut out = BTreeMap::new();
    let mut saved = 0.0;
    for p in &patterns {
        let (r, pattern_saved) = pattern_report(p, capacities, observed_seconds, curve_points);
        saved += pattern_saved;
        out.insert(p.name.clone(), r);
    }
    let budget = memory_bytes.map(|b| {
        let inputs: Vec<super::BudgetInput<'_>> = patterns
            .iter()
            .filter_map(|p| {
                let (curve, _) = p.curve.as_ref()?;
                let r = &out[&p.name];
                Some(super::BudgetInput {
                    name: &p.name,
                    curve,
                    gets_per_second: ratio(p.gets as f64, p.age_seconds),
                    accesses_per_second: ratio((p.gets + p.writes) as f64, p.age_seconds),
                    // A hit saves the mean load; with no load timed yet (a replay's instant loader), 1 µs, so
                    // that the plan still maximises hits.
                    loader_seconds: r.loader.mean_seconds.max(1e-6),
                    eligible: r.recommended,
                    ttl_secs: r.recommended_ttl_secs,
                })
            })
            .collect();
        super::plan_budget(&inputs, b, eviction.unwrap_or_default())
    });
    let whitelist: Vec<String> = match &budget {
        Some(plan) => plan.whitelist.clone(),
        None => out
            .iter()
            .filter(|(_, r)| r.recommended)
            .map(|(n, _)| n.clone())
            .collect(),
    };
    if let Some(plan) = &budget {
        saved = plan.origin_seconds_saved_per_second;
        // The per-pattern verdicts follow the plan: a pattern it leaves out is not recommended.
        for (name, share) in &plan.patterns {
            if let Some(r) = out.get_mut(name) {
                r.recommended = share.served;
                r.reasons.push(format!("memory budget: {}", share.reason));
                if share.served {
                    r.recommended_memory_bytes = Some(share.memory_bytes);
                }
            }
        }
    }
    let mut apply_patterns = BTreeMap::new();
    let mut toml = String::from("[cache]\nimpl = \"redis\"\n");
    let _ = writeln!(toml, "whitelist = {:?}", whitelist);
    let mut memory = 0u64;
    for name in &whitelist {
        let r = &out[name];
        memory += match &budget {
            Some(plan) => plan.patterns.get(name).map_or(0, |s| s.memory_bytes),
            None => r.recommended_memory_bytes.unwrap_or(0),
        };
        if let Some(ttl) = r.recommended_ttl_secs {
            apply_patterns.insert(
                name.clone(),
                PatternPolicy {
                    ttl_secs: Some(ttl),
                    ..PatternPolicy::default()
                },
            );
            let _ = write!(toml, "\n[cache.patterns.{:?}]\nttl_secs = {ttl}\n", name);
        }
    }
    let apply = PolicyUpdate {
        cache_impl: Some(CacheImpl::Redis),
        whitelist: Some(whitelist.clone()),
        patterns: (!apply_patterns.is_empty()).then_some(apply_patterns),
        ..PolicyUpdate::default()
    };
    Report {
        generated_at,
        observed_seconds,
        method: METHOD.to_string(),
        capacities: capacities.to_vec(),
        per_key_overhead_bytes,
        patterns: out,
        shared,
        whitelist: whitelisted,
        routes: routes.into_iter().map(route_report).collect(),
        recommendation: Recommendation {
            whitelist,
            memory_bytes: memory,
            origin_seconds_saved_per_second: saved,
            apply,
            toml,
        },
        eviction,
        budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_promql() {
        let mut h = proto::Histogram::default();
        let mut buckets = Vec::new();
        for (bound, count) in [(1.0, 10u64), (2.0, 20), (4.0, 20)] {
            let mut b = proto::Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(count);
            buckets.push(b);
        }
        h.set_bucket(buckets);
        h.set_sample_count(20);
        assert_eq!(quantile(&h, 0.5), Some(1.0));
        assert_eq!(quantile(&h, 0.75), Some(1.5));
        assert_eq!(quantile(&proto::Histogram::default(), 0.5), None);
    }

    #[test]
    fn ttl_covers_most_reuses() {
        let mut reuse = [0.0; 34];
        reuse[3] = 80.0; // 4–8 s
        reuse[10] = 20.0; // 512–1024 s
        assert_eq!(suggested_ttl(&reuse, 0.8), Some(8));
        assert_eq!(suggested_ttl(&reuse, 0.9), Some(1024));
        assert_eq!(suggested_ttl(&[0.0; 34], 0.9), None);
    }
}
