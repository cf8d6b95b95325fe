//! Trace replay: read an access trace and run every request through a [`CacheRegistry`].
//!
//! Formats:
//!
//! - **Twitter cache-trace** (`*.twitter.csv`, <https://github.com/twitter/cache-trace>): no header, seven columns
//!   `timestamp,key,key_size,value_size,client_id,operation,ttl`.
//! - **ARC** (`*.lis`, Megiddo and Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003):
//!   `START_BLOCK N_BLOCKS IGNORED REQUEST_NUMBER`; each line is a get of key `block:<START_BLOCK>` whose value is
//!   `512 × N_BLOCKS` bytes.
//!
//! Either may be zstd-compressed (`.zst`). Requests map onto the registry as follows: `get`/`gets` is a
//! [`get_or_load_bytes`](CacheRegistry::get_or_load_bytes) whose loader returns `value_size` bytes;
//! `set`/`add`/`replace`/`cas`/`append`/`prepend` a [`set_bytes`](CacheRegistry::set_bytes); `delete`/`incr`/`decr`
//! an [`invalidate`](CacheRegistry::invalidate) (the cached copy no longer matches the origin).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use bytes::Bytes;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pattern::OTHER;
use crate::CacheRegistry;

/// A trace file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceFormat {
    /// Twitter's cache-trace CSV.
    Twitter,
    /// ARC `.lis`.
    Arc,
}

impl TraceFormat {
    /// Guesses the format from a file name (`.lis` → ARC, `.csv` → Twitter, after removing `.zst`).
    pub fn guess(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        let name = name.strip_suffix(".zst").unwrap_or(name);
        if name.ends_with(".lis") {
            Some(TraceFormat::Arc)
        } else if name.ends_with(".csv") {
            Some(TraceFormat::Twitter)
        } else {
            None
        }
    }
}

/// What a trace request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read (cache-aside get).
    Get,
    /// A write of a new value.
    Set,
    /// A delete or an in-place change: invalidates.
    Delete,
}

/// Largest value size a trace line may give, in bytes (64 MiB); larger sizes make the line malformed.
pub const MAX_TRACE_VALUE_BYTES: usize = 64 << 20;

fn checked_size(size: Option<usize>, what: &str) -> std::result::Result<usize, String> {
    match size {
        Some(n) if n <= MAX_TRACE_VALUE_BYTES => Ok(n),
        _ => Err(format!("{what} exceeds {MAX_TRACE_VALUE_BYTES} bytes")),
    }
}

/// One parsed trace request.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Seconds from the trace start (Twitter format; `None` for ARC, which has no time).
    pub timestamp: Option<f64>,
    /// Cache key.
    pub key: String,
    /// Operation.
    pub op: Op,
    /// Value size in bytes.
    pub value_size: usize,
}

/// Parses one line; `Ok(None)` for a blank line.
///
/// # Errors
/// A description of what is wrong with the line.
pub fn parse_line(
    format: TraceFormat,
    line: &str,
) -> std::result::Result<Option<TraceRequest>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    match format {
        TraceFormat::Twitter => {
            // Split into a fixed array: no allocation per line.
            let mut cols = [""; 7];
            let mut n = 0;
            for col in line.split(',') {
                if n < 7 {
                    cols[n] = col;
                }
                n += 1;
            }
            if n != 7 {
                return Err(format!("expected 7 comma-separated columns, found {n}"));
            }
            let timestamp: f64 = cols[0]
                .parse()
                .map_err(|_| format!("timestamp {:?} is not a number", cols[0]))?;
            if !(timestamp.is_finite() && timestamp >= 0.0) {
                return Err(format!(
                    "timestamp {:?} is not a non-negative number",
                    cols[0]
                ));
            }
            let key = cols[1];
            if key.is_empty() {
                return Err("empty key".into());
            }
            let value_size: usize = cols[3]
                .parse()
                .map_err(|_| format!("value_size {:?} is not a number", cols[3]))?;
            let value_size = checked_size(Some(value_size), "value_size")?;
            let op = match cols[5] {
                "get" | "gets" => Op::Get,
                "set" | "add" | "replace" | "cas" | "append" | "prepend" => Op::Set,
                "delete" | "incr" | "decr" => Op::Delete,
                other => return Err(format!("unknown operation {other:?}")),
            };
            Ok(Some(TraceRequest {
                timestamp: Some(timestamp),
                key: key.to_string(),
                op,
                value_size,
            }))
        }
        TraceFormat::Arc => {
            let mut it = line.split_ascii_whitespace();
            let (Some(start), Some(blocks)) = (it.next(), it.next()) else {
                return Err("expected START_BLOCK N_BLOCKS IGNORED REQUEST_NUMBER".into());
            };
            let start: u64 = start
                .parse()
                .map_err(|_| format!("start block {start:?} is not a number"))?;
            let blocks: usize = blocks
                .parse()
                .map_err(|_| format!("block count {blocks:?} is not a number"))?;
            Ok(Some(TraceRequest {
                timestamp: None,
                key: format!("block:{start}"),
                op: Op::Get,
                value_size: checked_size(blocks.checked_mul(512), "512 × N_BLOCKS")?,
            }))
        }
    }
}

/// Opens a trace, decompressing `.zst`.
///
/// # Errors
/// [`Error::Io`] naming the path.
pub fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let io = |source| Error::Io {
        context: format!("opening trace {}", path.display()),
        source,
    };
    let file = File::open(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "zst") {
        let dec = zstd::stream::read::Decoder::new(file).map_err(io)?;
        Ok(Box::new(BufReader::with_capacity(1 << 16, dec)))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
    }
}

/// Per-pattern (or overall) replay figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayCounts {
    /// Trace requests of any operation.
    pub requests: u64,
    /// Reads.
    pub gets: u64,
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that ran the loader.
    pub misses: u64,
    /// `hits / gets` (0 when there were no gets): the measured hit ratio of the impl replayed.
    pub hit_ratio: f64,
    /// Estimated distinct keys (from the SHARDS sample; exact below `sample_keys` distinct keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_keys: Option<u64>,
    /// Predicted LRU hit ratio at each capacity in objects (`--capacities`), from the estimator the service runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_hit_ratio: Option<BTreeMap<String, f64>>,
}

/// The result of a replay: `{"patterns": {...}, "overall": {...}, "malformed_lines": n}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Figures per key pattern.
    pub patterns: BTreeMap<String, ReplayCounts>,
    /// Figures over the whole trace.
    pub overall: ReplayCounts,
    /// Lines skipped because they could not be parsed.
    pub malformed_lines: u64,
    /// With `--impl redis`: the server's `maxmemory` in bytes (0: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_maxmemory_bytes: Option<u64>,
    /// With `--impl redis`: the server's `used_memory` before the replay, in bytes (its own structures and anything
    /// outside the replay's prefix), which the cache cannot use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_baseline_bytes: Option<u64>,
    /// With `--impl redis` and a `maxmemory`: the predicted hit ratio of all patterns in one LRU cache of
    /// `maxmemory − baseline` bytes (byte miss ratio curve: keys, values and per-key overhead), beside the measured
    /// overall `hit_ratio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_hit_ratio_at_maxmemory: Option<f64>,
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Stop at the first malformed line.
    pub strict: bool,
    /// The registry's mock clock ([`quanta::Clock::mock`]): moved to each request's timestamp, so TTLs and rates
    /// follow trace time.
    pub clock: Option<std::sync::Arc<quanta::Mock>>,
}

/// Replays `reader` through `registry`. With `opts.strict`, the first malformed line stops the run with its error;
/// otherwise `on_malformed` is told about it and the line is skipped. The predictions come from the registry's
/// [`report`](CacheRegistry::report).
///
/// Figures come from the registry's own per-pattern counters, so use a fresh registry (and enough
/// `max_patterns`) for a trace.
///
/// # Errors
/// [`Error::Io`] when reading fails; [`Error::Trace`] for a malformed line under `strict`.
pub async fn replay(
    registry: &CacheRegistry,
    mut reader: impl BufRead,
    format: TraceFormat,
    opts: &ReplayOptions,
    mut on_malformed: impl FnMut(&Error),
) -> Result<ReplayReport> {
    let strict = opts.strict;
    let mut clock_nanos = 0u64;
    let mut line = String::new();
    let mut line_no = 0u64;
    let mut requests: HashMap<String, u64, foldhash::fast::RandomState> = HashMap::default();
    let mut malformed = 0u64;
    let mut zeros = Bytes::from(vec![0u8; 1 << 16]);
    let max_patterns = 10_000;
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|source| Error::Io {
            context: format!("reading trace at line {}", line_no + 1),
            source,
        })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let req = match parse_line(format, &line) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(reason) => {
                let e = Error::Trace {
                    line: line_no,
                    reason,
                };
                if strict {
                    return Err(e);
                }
                malformed += 1;
                on_malformed(&e);
                continue;
            }
        };
        if let (Some(mock), Some(t)) = (&opts.clock, req.timestamp) {
            let nanos = (t * 1e9) as u64;
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
                let _ = registry
                    .get_or_load_bytes(&req.key, || async { Ok::<_, Infallible>(value) })
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
    let mut report = ReplayReport {
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
            hit_ratio: ratio(c.hits, c.gets),
            unique_keys: predicted.map(|p| p.unique_keys),
            predicted_hit_ratio: predicted.map(|p| p.predicted_hit_ratio.clone()),
        };
        report.overall.requests += r.requests;
        report.overall.gets += r.gets;
        report.overall.hits += r.hits;
        report.overall.misses += r.misses;
        report.patterns.insert(pattern, r);
    }
    report.overall.hit_ratio = ratio(report.overall.hits, report.overall.gets);
    if let Some(shared) = &analysis.shared {
        report.overall.unique_keys = Some(shared.unique_keys);
        report.overall.predicted_hit_ratio = Some(shared.predicted_hit_ratio.clone());
    }
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
    /// A plain-text table: one row per pattern, then the overall row.
    pub fn to_table(&self) -> String {
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
            let mut line = format!(
                "{:<24} {:>12} {:>12} {:>12} {:>12} {:>9.5} {:>10}",
                name,
                c.requests,
                c.gets,
                c.hits,
                c.misses,
                c.hit_ratio,
                c.unique_keys.map_or("-".to_string(), |u| u.to_string())
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
                "redis maxmemory {max} bytes ({} before the replay): measured hit ratio {:.5}, predicted {p:.5}\n",
                self.redis_baseline_bytes.unwrap_or(0),
                self.overall.hit_ratio
            ));
        }
        if self.malformed_lines > 0 {
            out.push_str(&format!(
                "{} malformed lines skipped\n",
                self.malformed_lines
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twitter_lines_parse() {
        let r = parse_line(TraceFormat::Twitter, "0,oltp:page:17,12,512,1,get,0\n")
            .expect("valid")
            .expect("not blank");
        assert_eq!(
            r,
            TraceRequest {
                timestamp: Some(0.0),
                key: "oltp:page:17".into(),
                op: Op::Get,
                value_size: 512
            }
        );
        let r = parse_line(TraceFormat::Twitter, "3,vm:lbn:9,8,4096,3,delete,0")
            .expect("valid")
            .expect("line");
        assert_eq!(r.op, Op::Delete);
        assert_eq!(parse_line(TraceFormat::Twitter, "  \n"), Ok(None));
    }

    #[test]
    fn malformed_twitter_lines_say_why() {
        assert!(parse_line(TraceFormat::Twitter, "0,k,1,2,3,get")
            .expect_err("6 cols")
            .contains("7"));
        assert!(parse_line(TraceFormat::Twitter, "0,k,1,x,3,get,0")
            .expect_err("size")
            .contains("value_size"));
        assert!(parse_line(TraceFormat::Twitter, "0,k,1,2,3,frob,0")
            .expect_err("op")
            .contains("frob"));
    }

    #[test]
    fn arc_lines_parse() {
        let r = parse_line(TraceFormat::Arc, "1024 8 0 1")
            .expect("valid")
            .expect("line");
        assert_eq!(
            r,
            TraceRequest {
                timestamp: None,
                key: "block:1024".into(),
                op: Op::Get,
                value_size: 4096
            }
        );
        assert!(parse_line(TraceFormat::Arc, "x 8 0 1").is_err());
        assert!(parse_line(TraceFormat::Arc, "1 18446744073709551615 0 1")
            .expect_err("overflow")
            .contains("exceeds"));
        assert!(
            parse_line(TraceFormat::Twitter, "0,k,1,99999999999,3,get,0")
                .expect_err("huge")
                .contains("exceeds")
        );
    }

    #[test]
    fn format_is_guessed_from_the_name() {
        assert_eq!(
            TraceFormat::guess(Path::new("a/mixed.twitter.csv.zst")),
            Some(TraceFormat::Twitter)
        );
        assert_eq!(
            TraceFormat::guess(Path::new("OLTP.lis")),
            Some(TraceFormat::Arc)
        );
        assert_eq!(TraceFormat::guess(Path::new("trace.bin")), None);
    }
}
