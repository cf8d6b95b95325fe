//! Trace replay: read an access trace and run every request through a [`CacheRegistry`].
//!
//! Formats ([`TraceFormat`]; `docs/analysis.md` says which column means what): Twitter's cache-trace CSV, ARC
//! `.lis`, the CloudPhysics block I/O CSV, libCacheSim's `oracleGeneral` binary, and any CSV whose columns a
//! [`CsvSpec`] names; plain or zstd-compressed, the format given or recognised from the content
//! ([`TraceReader::open`]).
//!
//! Requests map onto the registry as follows: a get is a [`fetch_bytes`](CacheRegistry::fetch_bytes) whose loader
//! returns `value_size` bytes; a set a
//! [`set_bytes`](CacheRegistry::set_bytes); a delete (or a block write, or `incr`/`decr`) an
//! [`invalidate`](CacheRegistry::invalidate): the cached copy no longer matches the origin.
//!
//! A replay fails rather than print a table of zeros: when no request could be read, and when more lines were
//! malformed than [`ReplayOptions::max_skipped`] allows (1% by default).

mod format;
mod reader;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::convert::Infallible;
use std::str::FromStr;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

pub use self::format::{
    parse_line, CsvSpec, Op, TraceFormat, TraceRequest, DEFAULT_CSV_VALUE_BYTES,
    MAX_TRACE_VALUE_BYTES,
};
pub use self::reader::{ReadOptions, Record, TraceReader, MAX_TRACE_LINE_BYTES};
use crate::analysis::CurveSamples;
use crate::error::{Error, Result};
use crate::pattern::OTHER;
use crate::CacheRegistry;

/// Per-pattern (or overall) replay figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayCounts {
    /// Trace requests of any operation.
    pub requests: u64,
    /// Reads.
    pub gets: u64,
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that ran the loader (and waited for it).
    pub misses: u64,
    /// Reads answered with an entry past its TTL (stale-while-revalidate; counted in `hits`).
    pub stale: u64,
    /// Loads no read waited for: stale-while-revalidate's background refreshes.
    pub refreshes: u64,
    /// `hits / gets` (0 when there were no gets): the measured hit ratio of the impl replayed (always 0 for
    /// `null`, which stores nothing).
    pub hit_ratio: f64,
    /// Estimated distinct keys (from the SHARDS sample; exact below `sample_keys` distinct keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_keys: Option<u64>,
    /// Predicted LRU hit ratio at each capacity in objects (`--capacities`), from the estimator the service runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_hit_ratio: Option<BTreeMap<String, f64>>,
    /// The whole predicted curve, in objects and in bytes (`--curve-points` points each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curve: Option<CurveSamples>,
}

/// The result of a replay: `{"format", "impl", "patterns": {...}, "overall": {...}, "malformed_lines", …}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// The trace format read ([`TraceFormat::as_str`]).
    pub format: String,
    /// The backend every request went through (`null`, `memory`, `redis`).
    #[serde(rename = "impl")]
    pub cache_impl: String,
    /// Figures per key pattern.
    pub patterns: BTreeMap<String, ReplayCounts>,
    /// Figures over the whole trace.
    pub overall: ReplayCounts,
    /// Lines (or records) skipped because they could not be read.
    pub malformed_lines: u64,
    /// Wall-clock seconds the replay took.
    pub elapsed_secs: f64,
    /// With `--impl redis`: the server's `maxmemory` in bytes (0: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_maxmemory_bytes: Option<u64>,
    /// With `--impl redis`: the server's memory that was not the replay's entries, in bytes: its `used_memory` at
    /// the end of the replay, before the replay's keys are removed, less those keys' bytes as the estimators count
    /// them (key, value, per-key overhead) and less the memory of the connection that reads it (`CLIENT INFO`
    /// `tot-mem`). Redis's own structures, the scripts and their caches, the replay's connections and anything
    /// outside the replay's prefix: memory the cache cannot use. `used_memory` before the replay (read on a
    /// connection of its own) when the end could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_baseline_bytes: Option<u64>,
    /// With `--impl redis` and a `maxmemory`: the predicted hit ratio of all patterns in one Redis of
    /// `maxmemory − baseline` bytes evicting by [`eviction`](Self::eviction) (keys, values and per-key overhead
    /// counted), beside the measured overall `hit_ratio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_hit_ratio_at_maxmemory: Option<f64>,
    /// The same for an exact LRU cache of that size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_lru_hit_ratio_at_maxmemory: Option<f64>,
    /// Half-width of an approximate 95% interval around `predicted_hit_ratio_at_maxmemory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_uncertainty: Option<f64>,
    /// The Redis eviction the predictions in bytes are for (the server's, with `--impl redis`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction: Option<crate::analysis::RedisEviction>,
    /// With `--memory`: that budget split across the patterns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::analysis::BudgetPlan>,
}

/// How many malformed lines a replay tolerates before it fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SkipLimit {
    /// At most this many lines.
    Lines(u64),
    /// At most this share (0–1) of the lines read.
    Share(f64),
}

impl FromStr for SkipLimit {
    type Err = Error;

    /// `N` (lines) or `P%` (a share of the lines read, 0 to 100).
    ///
    /// # Errors
    /// [`Error::Config`] (key `--max-skipped`) for anything else.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "--max-skipped",
                s,
                "must be a count of lines (1000) or a share (1%)",
            )
        };
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.trim().parse().map_err(|_| bad())?;
                if (0.0..=100.0).contains(&p) {
                    Ok(SkipLimit::Share(p / 100.0))
                } else {
                    Err(bad())
                }
            }
            None => s.trim().parse().map(SkipLimit::Lines).map_err(|_| bad()),
        }
    }
}

/// Malformed lines with no request before them after which a replay under a share limit gives up at once.
const GIVE_UP_AFTER: u64 = 1000;

/// How to replay.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplayOptions {
    /// Stop at the first malformed line.
    pub strict: bool,
    /// Fail when more lines than this are malformed (`None`: never). Default: 1% of the lines read. A share is
    /// judged at the end, except that the first 1,000 lines all malformed fail at once.
    pub max_skipped: Option<SkipLimit>,
    /// The registry's mock clock ([`quanta::Clock::mock`]): moved to each request's timestamp (measured from the
    /// first request's), so TTLs and rates follow trace time.
    pub clock: Option<std::sync::Arc<quanta::Mock>>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            strict: false,
            max_skipped: Some(SkipLimit::Share(0.01)),
            clock: None,
        }
    }
}

impl ReplayOptions {
    /// Sets [`strict`](Self::strict).
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Sets [`max_skipped`](Self::max_skipped).
    pub fn with_max_skipped(mut self, limit: Option<SkipLimit>) -> Self {
        self.max_skipped = limit;
        self
    }

    /// Sets [`clock`](Self::clock).
    pub fn with_clock(mut self, clock: Option<std::sync::Arc<quanta::Mock>>) -> Self {
        self.clock = clock;
        self
    }
}

/// What a replay tells its caller while it runs.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplayEvent<'a> {
    /// A line was skipped (an [`Error::Trace`] with its line number).
    Malformed(&'a Error),
    /// Every 8,192 requests: requests replayed and file bytes read so far ([`TraceReader::bytes_read`]).
    Progress {
        /// Requests replayed so far.
        requests: u64,
        /// Bytes of the file read so far.
        bytes_read: u64,
    },
}

/// Replays `reader` through `registry`. With `opts.strict`, the first malformed line stops the run with its error;
/// otherwise `on_event` is told about it and the line is skipped. The predictions come from the registry's
/// [`report`](CacheRegistry::report).
///
/// Figures come from the registry's own per-pattern counters, so use a fresh registry (and enough
/// `max_patterns`) for a trace.
///
/// # Errors
/// [`Error::Io`] when reading fails; [`Error::Trace`] for a malformed line under `strict`; [`Error::TraceFile`]
/// when no request could be read (naming the format and the first bad line) or when more lines were malformed than
/// `opts.max_skipped`; [`Error::Config`] when the reader's key pattern is one numeric ids do not map back to.
pub async fn replay(
    registry: &CacheRegistry,
    reader: &mut TraceReader,
    opts: &ReplayOptions,
    mut on_event: impl FnMut(ReplayEvent<'_>),
) -> Result<ReplayReport> {
    let started = Instant::now();
    let pattern = reader.pattern().to_string();
    if reader.format() != TraceFormat::Twitter {
        if pattern.is_empty() || pattern == OTHER || pattern.split(':').any(|s| s == "*") {
            return Err(Error::config(
                "--pattern",
                pattern.as_str(),
                format!("must name one key pattern: not empty, not {OTHER:?}, no '*' segment"),
            ));
        }
        crate::pattern::validate_pattern(&pattern)
            .map_err(|e| Error::config("--pattern", pattern.as_str(), e.to_string()))?;
        let probe = format!("{pattern}:1");
        let got = registry.pattern_of(&probe);
        if got != pattern.as_str() {
            return Err(Error::config(
                "--pattern",
                pattern.as_str(),
                format!("its keys ({probe}) map to key pattern {got:?}: pick a name of letters, '_' and '-'"),
            ));
        }
    }
    let format = reader.format();
    let mut clock_nanos = 0u64;
    let mut first_timestamp: Option<f64> = None;
    let mut requests: HashMap<String, u64, foldhash::fast::RandomState> = HashMap::default();
    let (mut total, mut malformed) = (0u64, 0u64);
    let mut first_bad: Option<String> = None;
    let mut zeros = Bytes::from(vec![0u8; 1 << 16]);
    let max_patterns = 10_000;
    let name = reader.name().to_string();
    let unit = if format == TraceFormat::OracleGeneral {
        "records"
    } else {
        "lines"
    };
    let too_many = |malformed: u64, total: u64, first_bad: &Option<String>, limit: &str| {
        Error::trace_file(
            &name,
            format!(
                "{malformed} of {} {unit} could not be read as {format}, more than --max-skipped {limit} allows; \
                 the first: {}; if the format is wrong, pass --format",
                malformed + total,
                first_bad.as_deref().unwrap_or("-")
            ),
        )
    };
    let mut records = 0u64;
    loop {
        let record = reader.next_record()?;
        records += 1;
        if records.is_multiple_of(8192) {
            // A replay through the NullCache, or of a run of malformed lines, never waits: let the runtime run
            // other tasks (a Ctrl-C handler).
            tokio::task::yield_now().await;
        }
        let req = match record {
            None => break,
            Some(Record::Request(r)) => r,
            Some(Record::Malformed(e)) => {
                if opts.strict {
                    return Err(e);
                }
                malformed += 1;
                if first_bad.is_none() {
                    first_bad = Some(e.to_string());
                }
                on_event(ReplayEvent::Malformed(&e));
                match opts.max_skipped {
                    Some(SkipLimit::Lines(n)) if malformed > n => {
                        return Err(too_many(malformed, total, &first_bad, &n.to_string()));
                    }
                    // Not one request in the first lines: the format is wrong, and the rest need not be read.
                    Some(SkipLimit::Share(share))
                        if total == 0 && malformed >= GIVE_UP_AFTER && share < 1.0 =>
                    {
                        return Err(Error::trace_file(
                            &name,
                            format!(
                                "none of the first {GIVE_UP_AFTER} {unit} could be read as {format}; the first: {}; \
                                 if the format is wrong, pass --format",
                                first_bad.as_deref().unwrap_or("-")
                            ),
                        ));
                    }
                    _ => {}
                }
                continue;
            }
        };
        total += 1;
        if total.is_multiple_of(8192) {
            on_event(ReplayEvent::Progress {
                requests: total,
                bytes_read: reader.bytes_read(),
            });
        }
        if let (Some(mock), Some(t)) = (&opts.clock, req.timestamp) {
            let t0 = *first_timestamp.get_or_insert(t);
            let nanos = ((t - t0).max(0.0) * 1e9) as u64;
            if nanos > clock_nanos {
                mock.increment(nanos - clock_nanos);
                clock_nanos = nanos;
            }
        }
        let pattern = registry.pattern_of(&req.key);
        if let Some(c) = requests.get_mut(pattern.as_ref()) {
            *c += 1;
        } else if requests.len() < max_patterns {
            requests.insert(pattern.into_owned(), 1);
        } else {
            *requests.entry(OTHER.to_string()).or_default() += 1;
        }
        if req.value_size > zeros.len() {
            zeros = Bytes::from(vec![0u8; req.value_size.next_power_of_two()]);
        }
        let value = zeros.slice(0..req.value_size);
        match req.op {
            Op::Get => {
                // `fetch_bytes`: with stale-while-revalidate, a refresh runs in the background.
                let _ = registry
                    .fetch_bytes(&req.key, move || async move { Ok::<_, Infallible>(value) })
                    .await;
            }
            Op::Set => {
                // A refused or failed set is counted by the registry; the replay goes on.
                let _ = registry.set_bytes(&req.key, value).await;
            }
            Op::Delete => {
                let _ = registry.invalidate(&req.key).await;
            }
        }
    }
    if total == 0 {
        return Err(Error::trace_file(
            reader.name(),
            match first_bad {
                None => format!("holds no requests (read as {format})"),
                Some(bad) => format!(
                    "no line could be read as {format}; the first: {bad}; if the format is wrong, pass --format"
                ),
            },
        ));
    }
    if let Some(SkipLimit::Share(share)) = opts.max_skipped {
        if malformed as f64 > share * (malformed + total) as f64 {
            return Err(too_many(
                malformed,
                total,
                &first_bad,
                &format!("{}%", (share * 100.0 * 1e6).round() / 1e6),
            ));
        }
    }
    let mut report = ReplayReport {
        format: format.as_str().to_string(),
        cache_impl: registry.policy().cache_impl.as_str().to_string(),
        malformed_lines: malformed,
        ..ReplayReport::default()
    };
    let counts = registry.pattern_counts();
    let analysis = registry.report();
    for (pattern, n) in requests {
        let c = counts.get(&pattern).copied().unwrap_or_default();
        let predicted = analysis.patterns.get(&pattern).filter(|p| p.estimated);
        let r = ReplayCounts {
            requests: n,
            gets: c.gets,
            hits: c.hits,
            misses: c.misses,
            stale: c.stale,
            refreshes: c.refreshes,
            hit_ratio: ratio(c.hits, c.gets),
            unique_keys: predicted.map(|p| p.unique_keys),
            predicted_hit_ratio: predicted.map(|p| p.predicted_hit_ratio.clone()),
            curve: predicted.map(|p| p.curve.clone()),
        };
        report.overall.requests += r.requests;
        report.overall.gets += r.gets;
        report.overall.hits += r.hits;
        report.overall.misses += r.misses;
        report.overall.stale += r.stale;
        report.overall.refreshes += r.refreshes;
        report.patterns.insert(pattern, r);
    }
    report.overall.hit_ratio = ratio(report.overall.hits, report.overall.gets);
    if let Some(shared) = &analysis.shared {
        report.overall.unique_keys = Some(shared.unique_keys);
        report.overall.predicted_hit_ratio = Some(shared.predicted_hit_ratio.clone());
        report.overall.curve = Some(shared.curve.clone());
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl ReplayReport {
    /// A plain-text table: one row per pattern, then the overall row. Measured columns show `-` with
    /// `--impl null` (which stores nothing) and where a ratio would be 0/0.
    pub fn to_table(&self) -> String {
        let measured = self.cache_impl != "null";
        let caps: Vec<String> = self
            .overall
            .predicted_hit_ratio
            .as_ref()
            .map(|m| {
                let mut k: Vec<String> = m.keys().cloned().collect();
                k.sort_by_key(|c| c.parse::<u64>().unwrap_or(0));
                k
            })
            .unwrap_or_default();
        let mut out = format!(
            "{:<24} {:>12} {:>12} {:>12} {:>12} {:>9} {:>10}",
            "pattern", "requests", "gets", "hits", "misses", "hit_ratio", "unique"
        );
        for c in &caps {
            out.push_str(&format!(" {:>10}", format!("pred@{c}")));
        }
        out.push('\n');
        let row = |name: &str, c: &ReplayCounts| {
            let dash = || "-".to_string();
            let (hits, misses) = if measured {
                (c.hits.to_string(), c.misses.to_string())
            } else {
                (dash(), dash())
            };
            let hit_ratio = if measured && c.gets > 0 {
                format!("{:.5}", c.hit_ratio)
            } else {
                dash()
            };
            let mut line = format!(
                "{:<24} {:>12} {:>12} {:>12} {:>12} {:>9} {:>10}",
                name,
                c.requests,
                c.gets,
                hits,
                misses,
                hit_ratio,
                c.unique_keys.map_or_else(dash, |u| u.to_string())
            );
            for cap in &caps {
                match c.predicted_hit_ratio.as_ref().and_then(|m| m.get(cap)) {
                    Some(v) => line.push_str(&format!(" {v:>10.5}")),
                    None => line.push_str(&format!(" {:>10}", "-")),
                }
            }
            line.push('\n');
            line
        };
        for (p, c) in &self.patterns {
            out.push_str(&row(p, c));
        }
        out.push_str(&row("(overall)", &self.overall));
        if let (Some(max), Some(p)) = (
            self.redis_maxmemory_bytes,
            self.predicted_hit_ratio_at_maxmemory,
        ) {
            out.push_str(&format!(
                "redis maxmemory {max} bytes ({} not the replay's entries): measured hit ratio {:.5}, predicted {p:.5} ± \
                 {:.5} for {} (exact LRU {:.5})\n",
                self.redis_baseline_bytes.unwrap_or(0),
                self.overall.hit_ratio,
                self.prediction_uncertainty.unwrap_or(0.0),
                self.eviction
                    .map_or_else(|| "exact LRU".to_string(), |e| e.to_string()),
                self.predicted_lru_hit_ratio_at_maxmemory.unwrap_or(p),
            ));
        }
        if let Some(plan) = &self.budget {
            out.push_str(&plan.to_table());
        }
        if !measured {
            out.push_str(
                "impl null stores nothing: hits, misses and hit_ratio are measured with --impl memory or redis; \
                 pred@N is the predicted LRU hit ratio of a cache of N objects\n",
            );
        }
        out
    }
}
