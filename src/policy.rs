//! The runtime policy: what `PUT /internal/cache/config`, SIGHUP and [`CacheRegistry::switch`] change.
//!
//! [`CacheRegistry::switch`]: crate::CacheRegistry::switch

use std::collections::{BTreeMap, HashSet};
use std::ops::{Bound, RangeBounds};

use serde::{Deserialize, Serialize};

use crate::cache::CacheImpl;
use crate::codec::Format;
use crate::error::{Error, Result};
use crate::pattern::validate_pattern;

/// Longest accepted TTL: one year, in seconds (Redis and moka accept more, but such a TTL is a unit mistake).
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// Longest `stale_if_error_secs` and `stale_while_revalidate_secs`: 7 days, in seconds.
pub const MAX_STALE_SECS: u64 = 7 * 24 * 3600;

/// `Ok` when `v` lies in `range`; else [`Error::Config`] naming `key` and the value, with `expected` as the reason.
fn check_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    v: T,
    range: impl RangeBounds<T>,
    expected: &str,
) -> Result<()> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(Error::config(key, v.to_string(), expected))
    }
}

fn check_ttl(key: &str, ttl: u64) -> Result<()> {
    check_range(
        key,
        ttl,
        1..=MAX_TTL_SECS,
        "must be between 1 and 31536000 seconds (one year)",
    )
}

fn check_percent(key: &str, v: f64) -> Result<()> {
    check_range(key, v, 0.0..=100.0, "must be between 0 and 100")
}

fn check_deadline_ms(key: &str, v: u64) -> Result<()> {
    check_range(
        key,
        v,
        1..=60_000,
        "must be between 1 and 60000 milliseconds",
    )
}

/// The part of the configuration that can change at runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Master switch; `false` sends every call straight to its loader, unmeasured.
    pub enabled: bool,
    /// The backend that serves whitelisted patterns.
    #[serde(rename = "impl")]
    pub cache_impl: CacheImpl,
    /// Key patterns served by `cache_impl`; `["*"]` means all. Every other pattern is observed through the NullCache.
    pub whitelist: Vec<String>,
    /// TTL of patterns without their own, in seconds (at least 1).
    pub default_ttl_secs: u64,
    /// Per-pattern settings.
    pub patterns: BTreeMap<String, PatternPolicy>,
    /// Deadline of a cache read (and of a lease request) of patterns without their own, in milliseconds: past it
    /// the read counts as a `timeout` and the loader runs. Writes after a load are bounded by the same deadline
    /// counted from the start of the call, then finish in the background.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// How long a lease (the right to fill a missed key) lives in the backend, in milliseconds: a holder that dies
    /// blocks fills of that key for at most this long (callers still get their loader's value).
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// How long a caller that misses while another process holds the key's lease waits for that process's value
    /// (polling every 5 ms) before it runs its own loader, in milliseconds; 0 loads at once.
    #[serde(default = "default_lease_wait_ms")]
    pub lease_wait_ms: u64,
    /// The automatic rollback rules (`[cache.rollback]`).
    #[serde(default)]
    pub rollback: RollbackRules,
}

fn default_read_timeout_ms() -> u64 {
    50
}
fn default_lease_ttl_ms() -> u64 {
    10_000
}
fn default_lease_wait_ms() -> u64 {
    100
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            cache_impl: CacheImpl::Null,
            whitelist: Vec::new(),
            default_ttl_secs: 300,
            patterns: BTreeMap::new(),
            read_timeout_ms: default_read_timeout_ms(),
            lease_ttl_ms: default_lease_ttl_ms(),
            lease_wait_ms: default_lease_wait_ms(),
            rollback: RollbackRules::default(),
        }
    }
}

/// What a whitelisted key pattern does (`[cache.patterns.<pattern>] mode`). A pattern that is not whitelisted is
/// observed whatever its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Through the NullCache: measured, nothing stored.
    Observe,
    /// Shadow mode: the loader's value is always served; in the background the cache is read, what it returned is
    /// compared with the loader's value (match, mismatch, miss, error), and the loader's value is stored.
    Shadow,
    /// Served from the cache (cache-aside).
    #[default]
    Serve,
}

impl Mode {
    /// The lowercase name used in configuration and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::Shadow => "shadow",
            Mode::Serve => "serve",
        }
    }
}

/// Settings of one key pattern (`[cache.patterns.<pattern>]`); the entry named `"*"` gives the default of each
/// setting for every pattern ([`PatternPolicy::or`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternPolicy {
    /// TTL in seconds (at least 1); `None`: the default TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// What the pattern does when whitelisted; `None`: `serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Share of the pattern's keys, in percent (0 to 100), that `mode` applies to; the other keys are observed.
    /// A key is in the ramp when a stable hash of it (XXH3-64) falls under the percentage, so raising the ramp
    /// only adds keys. `None`: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_percent: Option<f64>,
    /// Deadline of a cache read of this pattern, in milliseconds; `None`: `read_timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout_ms: Option<u64>,
    /// With `impl = "redis"`: keep this pattern's values also in an in-process L1 in front of Redis, for at most
    /// this many seconds (1 to 86,400), invalidated on every instance through Redis pub/sub
    /// ([`TieredCache`](crate::cache::TieredCache)). `None`: no L1. Ignored with another impl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l1_ttl_secs: Option<u64>,
    /// The serde format of the pattern's stored values: `msgpack` (the default), `postcard` (plain structs of fixed
    /// shape only) or `json` (values other programs read). See [`crate::codec`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// With the `zstd` feature: store a value whose payload is longer than this many bytes zstd-compressed, when
    /// that makes it smaller. `None`: never compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_above_bytes: Option<u64>,
    /// Serve stale on origin failure: an entry is kept this many seconds past its TTL (0 to 604,800), and while it
    /// is, a loader that fails (with an error the caller allows, see
    /// [`Fetch::stale_if`](crate::registry::Fetch::stale_if)) is answered with the stale value instead, counted in
    /// `cache_stale_served_total{reason="error"}`. An invalidation removes the stale copy too. `None`: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error_secs: Option<u64>,
    /// Stale-while-revalidate: for this many seconds past its TTL (0 to 604,800) an entry is still served, counted
    /// in `cache_stale_served_total{reason="revalidate"}`, while one caller per key refreshes it under the key's
    /// lease (in the background with [`CacheRegistry::fetch`](crate::CacheRegistry::fetch)). `None`: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate_secs: Option<u64>,
    /// Negative caching: a loader's "not found" (a value the caller marks absent, see
    /// [`Fetch::absent_if`](crate::registry::Fetch::absent_if)) is stored for this many seconds (1 to 86,400)
    /// instead of the TTL, and its hits are counted apart (`cache_negative_hits_total`). `None`: an absence is stored
    /// like any value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_negative_secs: Option<u64>,
}

impl PatternPolicy {
    /// These settings, each unset one taken from `fallback` (the `"*"` entry: defaults for every pattern), except
    /// `l1_ttl_secs`, which is only ever the pattern's own.
    pub fn or(&self, fallback: Option<&PatternPolicy>) -> PatternPolicy {
        let Some(f) = fallback else {
            return self.clone();
        };
        PatternPolicy {
            ttl_secs: self.ttl_secs.or(f.ttl_secs),
            mode: self.mode.or(f.mode),
            ramp_percent: self.ramp_percent.or(f.ramp_percent),
            read_timeout_ms: self.read_timeout_ms.or(f.read_timeout_ms),
            l1_ttl_secs: self.l1_ttl_secs,
            format: self.format.or(f.format),
            compress_above_bytes: self.compress_above_bytes.or(f.compress_above_bytes),
            stale_if_error_secs: self.stale_if_error_secs.or(f.stale_if_error_secs),
            stale_while_revalidate_secs: self
                .stale_while_revalidate_secs
                .or(f.stale_while_revalidate_secs),
            cache_negative_secs: self.cache_negative_secs.or(f.cache_negative_secs),
        }
    }
}

/// Where a tripped rollback sends the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RollbackScope {
    /// The tripped pattern returns to `observe`; other patterns keep their mode.
    #[default]
    Pattern,
    /// The whole impl returns to `null`.
    Impl,
}

/// Automatic rollback (`[cache.rollback]`): a circuit breaker per key pattern over a sliding window of its cache
/// calls. A rule trips when the window (or its latest tenth alone) holds at least `min_calls` reads and a rate is
/// over its bound; the pattern
/// then returns to `observe` (or the impl to `null`, with `scope = "impl"`), and after `cooldown_secs` comes back
/// half-open: served for `probe_percent` of its ramp until `probe_calls` reads pass without tripping, then closed.
/// A configuration change that names the pattern (or a SIGHUP reload) closes its breaker at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackRules {
    /// `false` never rolls back.
    pub enabled: bool,
    /// Length of the sliding window, in seconds (kept as 10 buckets).
    pub window_secs: u64,
    /// Fewest cache reads in the window before any rule is judged.
    pub min_calls: u64,
    /// Highest share (0–1) of reads failing with a backend error (not timeouts), corrupt entries included.
    pub max_error_rate: f64,
    /// Highest share (0–1) of reads past their deadline.
    pub max_timeout_rate: f64,
    /// Highest p99 of cache read latency, in milliseconds: trips when more than 1% of the window's reads took
    /// longer.
    pub max_p99_ms: f64,
    /// Highest share (0–1) of shadow comparisons that found a different value.
    pub max_mismatch_rate: f64,
    /// Seconds in `observe` before the half-open probe.
    pub cooldown_secs: u64,
    /// Share of the pattern's ramp, in percent, served while half-open.
    pub probe_percent: f64,
    /// Reads served while half-open without tripping that close the breaker.
    pub probe_calls: u64,
    /// What a trip rolls back.
    pub scope: RollbackScope,
}

impl Default for RollbackRules {
    fn default() -> Self {
        RollbackRules {
            enabled: true,
            window_secs: 30,
            min_calls: 100,
            max_error_rate: 0.05,
            max_timeout_rate: 0.05,
            max_p99_ms: 25.0,
            max_mismatch_rate: 0.01,
            cooldown_secs: 60,
            probe_percent: 10.0,
            probe_calls: 100,
            scope: RollbackScope::Pattern,
        }
    }
}

impl RollbackRules {
    fn validate(&self) -> Result<()> {
        let rate = |key, v| check_range(key, v, 0.0..=1.0, "must be between 0 and 1");
        rate("cache.rollback.max_error_rate", self.max_error_rate)?;
        rate("cache.rollback.max_timeout_rate", self.max_timeout_rate)?;
        rate("cache.rollback.max_mismatch_rate", self.max_mismatch_rate)?;
        let day = "must be between 1 and 86400 seconds";
        check_range(
            "cache.rollback.window_secs",
            self.window_secs,
            1..=86_400,
            day,
        )?;
        check_range(
            "cache.rollback.cooldown_secs",
            self.cooldown_secs,
            1..=86_400,
            day,
        )?;
        check_range(
            "cache.rollback.max_p99_ms",
            self.max_p99_ms,
            (Bound::Excluded(0.0), Bound::Excluded(f64::INFINITY)),
            "must be a positive number of milliseconds",
        )?;
        // At 0 no read would ever probe, and the breaker would stay half-open for good.
        check_range(
            "cache.rollback.probe_percent",
            self.probe_percent,
            (Bound::Excluded(0.0), Bound::Included(100.0)),
            "must be more than 0 and at most 100",
        )?;
        check_range(
            "cache.rollback.probe_calls",
            self.probe_calls,
            1..,
            "must be at least 1",
        )
    }
}

/// A change to the [`Policy`]: the body of `PUT /internal/cache/config`. Absent fields keep their value.
///
/// ```json
/// {"impl": "redis", "whitelist": ["user"], "patterns": {"user": {"ttl_secs": 60}}}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    /// New master switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// New impl.
    #[serde(default, rename = "impl", skip_serializing_if = "Option::is_none")]
    pub cache_impl: Option<CacheImpl>,
    /// New whitelist (replaces the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist: Option<Vec<String>>,
    /// New default TTL in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ttl_secs: Option<u64>,
    /// Per-pattern settings, merged into the current ones pattern by pattern (a pattern's entry replaces its old
    /// one). Naming a pattern here also closes its rollback breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patterns: Option<BTreeMap<String, PatternPolicy>>,
    /// New default read deadline in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout_ms: Option<u64>,
    /// New rollback rules (replace the old ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackRules>,
}

impl PolicyUpdate {
    /// Parses a JSON body (`PUT /internal/cache/config`, `cache-rollout fleet set`), naming the field that is wrong.
    ///
    /// ```
    /// use cache_rollout::PolicyUpdate;
    /// let err = PolicyUpdate::from_json(br#"{"patterns":{"user":{"ttl_secs":"soon"}}}"#).unwrap_err();
    /// assert!(err.to_string().contains("patterns.user.ttl_secs"));
    /// assert!(err.to_string().contains(r#"= "soon""#), "the value as sent: {err}");
    /// assert!(PolicyUpdate::from_json(br#"{"whitelist":["user"]}"#).is_ok());
    /// ```
    ///
    /// # Errors
    /// [`Error::Config`] whose key is the path of the offending field (`patterns.user.ttl_secs`), or `body` when
    /// the body as a whole is not a JSON object of this shape; the reason is serde's.
    pub fn from_json(body: &[u8]) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = if path.is_empty() || path == "." {
                "body".to_string()
            } else {
                path
            };
            // The offending value as sent, when the body is JSON and the path leads to one (cut at 200 bytes).
            let root = serde_json::from_slice::<serde_json::Value>(body).ok();
            let value = root
                .as_ref()
                .and_then(|v| {
                    e.path().iter().try_fold(v, |v, seg| match seg {
                        serde_path_to_error::Segment::Map { key } => v.get(key),
                        serde_path_to_error::Segment::Seq { index } => v.get(index),
                        _ => None,
                    })
                })
                .map(|v| {
                    // A string as it was written (as the configuration's errors show it), anything else as JSON.
                    let mut text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    if crate::pattern::cut_to(&mut text, 200) {
                        text.push('…');
                    }
                    text
                })
                .unwrap_or_default();
            Error::Config {
                key,
                value,
                reason: e.into_inner().to_string(),
            }
        })
    }
}

impl Policy {
    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (`cache.default_ttl_secs`, `cache.patterns.<p>.ttl_secs`) and value, or
    /// [`Error::InvalidPattern`] for a bad whitelist entry or pattern name; [`Error::Config`] for impl `redis` in a
    /// build without the `redis` feature.
    pub fn validate(&self) -> Result<()> {
        #[cfg(not(feature = "redis"))]
        if self.cache_impl == CacheImpl::Redis {
            return Err(Error::config(
                "cache.impl (CACHE_IMPL)",
                "redis",
                "this build of cache-rollout has no `redis` feature",
            ));
        }
        check_ttl("cache.default_ttl_secs", self.default_ttl_secs)?;
        for p in &self.whitelist {
            if p != "*" {
                validate_pattern(p)?;
            }
        }
        for (p, s) in &self.patterns {
            validate_pattern(p)?;
            if let Some(ttl) = s.ttl_secs {
                check_ttl(&format!("cache.patterns.{p}.ttl_secs"), ttl)?;
            }
            if let Some(r) = s.ramp_percent {
                check_percent(&format!("cache.patterns.{p}.ramp_percent"), r)?;
            }
            if let Some(t) = s.read_timeout_ms {
                check_deadline_ms(&format!("cache.patterns.{p}.read_timeout_ms"), t)?;
            }
            if let Some(t) = s.l1_ttl_secs {
                check_range(
                    &format!("cache.patterns.{p}.l1_ttl_secs"),
                    t,
                    1..=86_400,
                    "must be between 1 and 86400 seconds",
                )?;
            }
            for (name, v) in [
                ("stale_if_error_secs", s.stale_if_error_secs),
                ("stale_while_revalidate_secs", s.stale_while_revalidate_secs),
            ] {
                if let Some(v) = v {
                    check_range(
                        &format!("cache.patterns.{p}.{name}"),
                        v,
                        0..=MAX_STALE_SECS,
                        "must be between 0 and 604800 seconds",
                    )?;
                }
            }
            if let Some(t) = s.cache_negative_secs {
                check_range(
                    &format!("cache.patterns.{p}.cache_negative_secs"),
                    t,
                    1..=86_400,
                    "must be between 1 and 86400 seconds",
                )?;
            }
            if let Some(b) = s.compress_above_bytes {
                #[cfg(not(feature = "zstd"))]
                return Err(Error::config(
                    format!("cache.patterns.{p}.compress_above_bytes"),
                    b.to_string(),
                    "this build of cache-rollout has no `zstd` feature",
                ));
                #[cfg(feature = "zstd")]
                check_range(
                    &format!("cache.patterns.{p}.compress_above_bytes"),
                    b,
                    64..,
                    "must be at least 64 bytes",
                )?;
            }
        }
        check_deadline_ms("cache.read_timeout_ms", self.read_timeout_ms)?;
        check_range(
            "cache.lease_ttl_ms",
            self.lease_ttl_ms,
            1..=600_000,
            "must be between 1 and 600000 milliseconds",
        )?;
        check_range(
            "cache.lease_wait_ms",
            self.lease_wait_ms,
            ..=60_000,
            "must be at most 60000 milliseconds",
        )?;
        self.rollback.validate()
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
        if let Some(i) = update.cache_impl {
            p.cache_impl = i;
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
        if let Some(t) = update.read_timeout_ms {
            p.read_timeout_ms = t;
        }
        if let Some(r) = &update.rollback {
            p.rollback = r.clone();
        }
        p.validate()?;
        Ok(p)
    }

    pub(crate) fn serves_all(&self) -> bool {
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

/// Property tests (proptest, 512 cases, run by `cargo test`).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// A JSON value of any type, small.
    fn any_json() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-z*: ]{0,8}".prop_map(Value::from),
        ]
    }

    /// A value for `field` that is usually of the right type and often out of range, sometimes of another type.
    fn field_value(field: &'static str) -> BoxedStrategy<Value> {
        let right: BoxedStrategy<Value> = match field {
            "enabled" => any::<bool>().prop_map(Value::from).boxed(),
            "impl" => prop_oneof![Just("null"), Just("memory"), Just("redis"), Just("disk")]
                .prop_map(Value::from)
                .boxed(),
            "whitelist" => proptest::collection::vec("[a-z*:_ ]{0,10}", 0..5)
                .prop_map(|v| json!(v))
                .boxed(),
            "patterns" => proptest::collection::btree_map(
                "[a-z:*]{0,8}",
                (
                    proptest::option::of(0u64..200_000),
                    proptest::option::of(prop_oneof![
                        Just("observe"),
                        Just("shadow"),
                        Just("serve"),
                        Just("sideways")
                    ]),
                    proptest::option::of(-50.0f64..150.0),
                    proptest::option::of(0u64..100_000),
                ),
                0..4,
            )
            .prop_map(|m| {
                let m: serde_json::Map<String, Value> = m
                    .into_iter()
                    .map(|(k, (ttl, mode, ramp, rt))| {
                        let mut o = serde_json::Map::new();
                        if let Some(t) = ttl {
                            o.insert("ttl_secs".into(), json!(t));
                        }
                        if let Some(m) = mode {
                            o.insert("mode".into(), json!(m));
                        }
                        if let Some(r) = ramp {
                            o.insert("ramp_percent".into(), json!(r));
                        }
                        if let Some(r) = rt {
                            o.insert("read_timeout_ms".into(), json!(r));
                        }
                        (k, Value::Object(o))
                    })
                    .collect();
                Value::Object(m)
            })
            .boxed(),
            "rollback" => (any::<bool>(), -1.0f64..2.0, 0u64..1000, -5.0f64..500.0)
                .prop_map(|(enabled, rate, min_calls, p99)| {
                    json!({"enabled": enabled, "max_error_rate": rate, "min_calls": min_calls, "max_p99_ms": p99})
                })
                .boxed(),
            _ => (0u64..10_000_000).prop_map(Value::from).boxed(),
        };
        prop_oneof![4 => right, 1 => any_json()].boxed()
    }

    const FIELDS: [&str; 8] = [
        "enabled",
        "impl",
        "whitelist",
        "default_ttl_secs",
        "patterns",
        "read_timeout_ms",
        "rollback",
        "colour",
    ];

    fn any_update() -> impl Strategy<Value = Value> {
        proptest::sample::subsequence(FIELDS.to_vec(), 0..=FIELDS.len())
            .prop_flat_map(|fields| {
                fields
                    .into_iter()
                    .map(|f| field_value(f).prop_map(move |v| (f.to_string(), v)))
                    .collect::<Vec<_>>()
            })
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any body is applied, or refused with the key (or pattern) that is wrong; an applied one round-trips.
        #[test]
        fn any_update_is_applied_or_refused_naming_the_key(body in any_update()) {
            let bytes = serde_json::to_vec(&body).expect("json");
            let update = match PolicyUpdate::from_json(&bytes) {
                Ok(u) => u,
                Err(Error::Config { key, .. }) => {
                    prop_assert!(!key.is_empty());
                    prop_assert!(key == "body" || FIELDS.iter().any(|f| key.starts_with(f)), "key {}", key);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("not a Config error: {e}"))),
            };
            match Policy::default().merged(&update) {
                Ok(p) => {
                    prop_assert!(p.validate().is_ok());
                    let back: Policy = serde_json::from_value(serde_json::to_value(&p).expect("serialize"))
                        .expect("an applied policy parses back");
                    prop_assert_eq!(back, p);
                    let again = PolicyUpdate::from_json(&serde_json::to_vec(&update).expect("json"))
                        .expect("an update parses back");
                    prop_assert_eq!(again, update);
                }
                Err(Error::Config { key, .. }) => {
                    prop_assert!(key.starts_with("cache."), "key {}", key);
                }
                Err(Error::InvalidPattern { pattern, .. }) => {
                    let _ = pattern;
                }
                Err(e) => return Err(TestCaseError::fail(format!("not a Config error: {e}"))),
            }
        }

        /// Bytes that are not JSON at all are refused as a body.
        #[test]
        fn any_bytes_are_refused_or_parsed(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Err(e) = PolicyUpdate::from_json(&raw) {
                let is_config = matches!(e, Error::Config { .. });
                prop_assert!(is_config, "{}", e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_is_valid_only_in_a_build_with_the_redis_feature() {
        let p = Policy {
            cache_impl: CacheImpl::Redis,
            ..Policy::default()
        };
        let r = p.validate();
        if cfg!(feature = "redis") {
            assert!(r.is_ok(), "{r:?}");
        } else {
            let e = r.expect_err("no redis feature").to_string();
            assert!(e.contains("redis") && e.contains("feature"), "{e}");
        }
    }

    #[test]
    fn update_merges_and_validates() {
        let p = Policy::default();
        let u: PolicyUpdate =
            serde_json::from_str(r#"{"impl":"memory","whitelist":["user"," user ",""]}"#)
                .expect("parses");
        let m = p.merged(&u).expect("valid");
        assert_eq!(m.cache_impl, CacheImpl::Memory);
        assert_eq!(m.whitelist, ["user"]);
        assert!(m.enabled);
        let bad = PolicyUpdate {
            patterns: Some(BTreeMap::from([(
                "user".into(),
                PatternPolicy {
                    ttl_secs: Some(0),
                    ..PatternPolicy::default()
                },
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
    fn modes_ramps_deadlines_and_rules_are_validated() {
        let u: PolicyUpdate = serde_json::from_str(
            r#"{"patterns":{"user":{"mode":"shadow","ramp_percent":12.5,"read_timeout_ms":20}}}"#,
        )
        .expect("parses");
        let m = Policy::default().merged(&u).expect("valid");
        assert_eq!(m.patterns["user"].mode, Some(Mode::Shadow));
        assert_eq!(m.patterns["user"].ramp_percent, Some(12.5));
        for (body, key) in [
            (
                r#"{"patterns":{"user":{"ramp_percent":101}}}"#,
                "cache.patterns.user.ramp_percent",
            ),
            (
                r#"{"patterns":{"user":{"read_timeout_ms":0}}}"#,
                "cache.patterns.user.read_timeout_ms",
            ),
            (r#"{"read_timeout_ms":0}"#, "cache.read_timeout_ms"),
            (
                r#"{"rollback":{"max_error_rate":1.5}}"#,
                "cache.rollback.max_error_rate",
            ),
            (
                r#"{"rollback":{"probe_calls":0}}"#,
                "cache.rollback.probe_calls",
            ),
        ] {
            let u: PolicyUpdate = serde_json::from_str(body).expect("parses");
            let e = Policy::default().merged(&u).expect_err(body);
            assert!(e.to_string().contains(key), "{body}: {e}");
        }
        assert!(
            serde_json::from_str::<PolicyUpdate>(r#"{"patterns":{"user":{"mode":"serv"}}}"#)
                .is_err()
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
    fn ttl_bounds_are_enforced() {
        let p = Policy {
            default_ttl_secs: MAX_TTL_SECS + 1,
            ..Policy::default()
        };
        assert!(p
            .validate()
            .expect_err("too long")
            .to_string()
            .contains("cache.default_ttl_secs"));
        let p = Policy {
            default_ttl_secs: MAX_TTL_SECS,
            ..Policy::default()
        };
        assert!(p.validate().is_ok());
    }
}
