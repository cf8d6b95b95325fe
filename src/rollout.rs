//! Phase 3 made safe: per-pattern routes (mode, ramp, deadline), the sliding window each pattern's cache reads are
//! judged on, and the circuit breaker that rolls a pattern back.
//!
//! - **Ramp.** A key is in its pattern's ramp when `XXH3-64(key) < ramp_percent / 100 · 2⁶⁴`: stable across
//!   processes, restarts and versions of this crate, and monotone, so raising the ramp only adds keys (the rule of
//!   Unleash's gradual rollout and of DialCache's ramps). The hash is independent of the one that samples keys for
//!   the miss ratio curves, so the ramp does not bias them.
//! - **Window.** Ten buckets of `window_secs / 10` each, counting reads, backend errors, timeouts, reads slower than
//!   `max_p99_ms`, shadow comparisons and mismatches, with relaxed atomics; a bucket is recycled when its time
//!   comes round again. A rate is judged only when a bad event happens, so a healthy call pays two atomic adds.
//!   The rules are judged on the whole window and on the current bucket alone: a sudden outage after a long
//!   healthy stretch trips within one bucket instead of waiting until its failures are 5% of the whole window.
//! - **p99 without a histogram.** "p99 over X ms" holds exactly when more than 1% of the reads took longer than X,
//!   so the window counts reads over X instead of keeping quantiles.
//! - **Breaker.** Closed → (a rule trips) → open: the pattern is observed → (`cooldown_secs`) → half-open: served for
//!   `probe_percent` of its ramp → (`probe_calls` reads without a trip) → closed; a trip while half-open opens it
//!   again. This is the circuit breaker of Nygard's *Release It!* (2nd ed., ch. 5), as in resilience4j.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::policy::{Mode, RollbackRules};

/// Buckets in a window.
const BUCKETS: u64 = 10;

/// A stable hash of a key for ramping: XXH3-64 with the default seed (xxHash specification 0.8).
pub fn ramp_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// The threshold of a ramp percentage: a key is in the ramp when `ramp_hash(key) < threshold`, or always when
/// `None` (100%).
pub(crate) fn ramp_threshold(percent: f64) -> Option<u64> {
    if percent >= 100.0 {
        None
    } else if percent <= 0.0 {
        Some(0)
    } else {
        // 2^64 · p / 100, in f64 then saturated: exact to 2^-53 of the key space.
        Some((percent / 100.0 * 18_446_744_073_709_551_616.0) as u64)
    }
}

/// How one served pattern's calls go.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) mode: Mode,
    /// `None`: every key; else keys whose ramp hash is below it.
    pub(crate) ramp: Option<u64>,
    pub(crate) ttl: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    /// Reads slower than this count against the p99 rule.
    pub(crate) slow_nanos: u64,
    /// Length of a window bucket.
    pub(crate) bucket_nanos: u64,
    /// While half-open: the probe's read counter.
    pub(crate) probe: Option<Arc<AtomicU64>>,
    /// Reads that close a half-open breaker.
    pub(crate) probe_calls: u64,
    /// How values are written.
    pub(crate) encoding: crate::codec::Encoding,
    /// How long past its TTL an entry may still answer a failed load.
    pub(crate) stale_if_error: Duration,
    /// How long past its TTL an entry is still served while one caller refreshes it.
    pub(crate) stale_while_revalidate: Duration,
    /// TTL of a cached absence; `None`: an absence is stored like any value.
    pub(crate) negative_ttl: Option<Duration>,
}

impl Route {
    /// Whether `key` is in the ramp.
    #[inline]
    pub(crate) fn includes(&self, key: &str) -> bool {
        self.ramp.is_none_or(|t| ramp_hash(key) < t)
    }

    /// How long the backend keeps an entry: its TTL, and the longer of the two stale windows past it.
    pub(crate) fn retain(&self) -> Duration {
        self.ttl + self.stale_if_error.max(self.stale_while_revalidate)
    }
}

/// Why a rule tripped: the `reason` label of `cache_rollback_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Backend errors over `max_error_rate`.
    ErrorRate,
    /// Reads past their deadline over `max_timeout_rate`.
    TimeoutRate,
    /// More than 1% of reads slower than `max_p99_ms`.
    P99Latency,
    /// Shadow mismatches over `max_mismatch_rate`.
    MismatchRate,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 4] = [
        Reason::ErrorRate,
        Reason::TimeoutRate,
        Reason::P99Latency,
        Reason::MismatchRate,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ErrorRate => "error_rate",
            Reason::TimeoutRate => "timeout_rate",
            Reason::P99Latency => "p99_latency",
            Reason::MismatchRate => "mismatch_rate",
        }
    }
}

/// What a window counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Read = 0,
    Error = 1,
    Timeout = 2,
    Slow = 3,
    Compared = 4,
    Mismatch = 5,
}

#[derive(Default)]
struct Bucket {
    /// Bucket number + 1 of the counts held; 0: empty.
    epoch: AtomicU64,
    counts: [AtomicU64; 6],
}

/// Totals of a window, as `GET /internal/cache` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WindowCounts {
    /// Cache reads.
    pub reads: u64,
    /// Reads that failed with a backend error (timeouts apart), corrupt entries included.
    pub errors: u64,
    /// Reads past their deadline.
    pub timeouts: u64,
    /// Reads slower than `max_p99_ms`.
    pub slow: u64,
    /// Shadow comparisons.
    pub compared: u64,
    /// Shadow comparisons that found a different value.
    pub mismatched: u64,
}

/// A sliding window of one pattern's cache reads (see the module docs).
#[derive(Default)]
pub(crate) struct Window {
    buckets: [Bucket; BUCKETS as usize],
}

impl Window {
    /// Counts `event` in bucket number `bucket` (the clock in units of `window / 10`).
    pub(crate) fn add(&self, event: Event, bucket: u64) {
        let b = &self.buckets[(bucket % BUCKETS) as usize];
        let want = bucket + 1;
        let have = b.epoch.load(Ordering::Acquire);
        if have != want
            && have < want
            && b.epoch
                .compare_exchange(have, want, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for c in &b.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        b.counts[event as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The totals of the buckets within the window that ends at bucket number `bucket`.
    pub(crate) fn counts(&self, bucket: u64) -> WindowCounts {
        let mut t = [0u64; 6];
        for b in &self.buckets {
            let e = b.epoch.load(Ordering::Acquire);
            if e != 0 && e + BUCKETS > bucket + 1 && e <= bucket + 1 {
                for (t, c) in t.iter_mut().zip(&b.counts) {
                    *t += c.load(Ordering::Relaxed);
                }
            }
        }
        WindowCounts {
            reads: t[0],
            errors: t[1],
            timeouts: t[2],
            slow: t[3],
            compared: t[4],
            mismatched: t[5],
        }
    }

    /// The counts of bucket number `bucket` alone (empty when it holds another time's counts).
    pub(crate) fn bucket(&self, bucket: u64) -> WindowCounts {
        let b = &self.buckets[(bucket % BUCKETS) as usize];
        if b.epoch.load(Ordering::Acquire) != bucket + 1 {
            return WindowCounts::default();
        }
        let c = |i: usize| b.counts[i].load(Ordering::Relaxed);
        WindowCounts {
            reads: c(0),
            errors: c(1),
            timeouts: c(2),
            slow: c(3),
            compared: c(4),
            mismatched: c(5),
        }
    }

    /// Forgets everything (after a trip, so the half-open probe is judged on its own calls).
    pub(crate) fn reset(&self) {
        for b in &self.buckets {
            b.epoch.store(0, Ordering::Release);
            for c in &b.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// The first rule `counts` breaks, if any; rules are judged once the window holds `min_calls` reads (or
/// comparisons, for the mismatch rule).
pub(crate) fn judge(rules: &RollbackRules, c: &WindowCounts, min_calls: u64) -> Option<Reason> {
    let over = |n: u64, of: u64, max: f64| of > 0 && n as f64 > max * of as f64;
    if c.reads >= min_calls.max(1) {
        if over(c.errors, c.reads, rules.max_error_rate) {
            return Some(Reason::ErrorRate);
        }
        if over(c.timeouts, c.reads, rules.max_timeout_rate) {
            return Some(Reason::TimeoutRate);
        }
        if over(c.slow, c.reads, 0.01) {
            return Some(Reason::P99Latency);
        }
    }
    if c.compared >= min_calls.max(1) && over(c.mismatched, c.compared, rules.max_mismatch_rate) {
        return Some(Reason::MismatchRate);
    }
    None
}

/// Where a pattern's breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Rolled back: observed until the cool-down ends.
    Open,
    /// Served for `probe_percent` of its ramp until `probe_calls` reads pass.
    HalfOpen,
}

/// A tripped breaker, as `GET /internal/cache` shows it (under `rollbacks`).
#[derive(Debug, Clone, Serialize)]
pub struct Breaker {
    /// Open or half-open.
    pub state: BreakerState,
    /// The rule that tripped.
    pub reason: Reason,
    /// The window when it tripped.
    pub window: WindowCounts,
    /// When it tripped, RFC 3339 UTC.
    pub since: String,
    /// Trips since the breaker was last closed.
    pub trips: u64,
    /// Half-open reads so far; a new counter on every trip and every half-open episode, so it also identifies
    /// them (the cool-down acts only on its own trip, and only its own probes close an episode).
    #[serde(skip)]
    pub(crate) probe: Arc<AtomicU64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_ramp_only_adds_keys() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("user:{i}")).collect();
        let mut prev: Option<Vec<bool>> = None;
        for p in [0.0, 1.0, 5.0, 25.0, 50.0, 99.0, 100.0] {
            let t = ramp_threshold(p);
            let r = Route {
                mode: Mode::Serve,
                ramp: t,
                ttl: Duration::from_secs(1),
                read_timeout: Duration::from_millis(50),
                lease_ttl: Duration::from_secs(1),
                lease_wait: Duration::ZERO,
                slow_nanos: 1,
                bucket_nanos: 1,
                probe: None,
                probe_calls: 1,
                encoding: crate::codec::Encoding::default(),
                stale_if_error: Duration::ZERO,
                stale_while_revalidate: Duration::ZERO,
                negative_ttl: None,
            };
            let inside: Vec<bool> = keys.iter().map(|k| r.includes(k)).collect();
            let share = inside.iter().filter(|&&b| b).count() as f64 / keys.len() as f64;
            assert!((share * 100.0 - p).abs() < 1.0, "{p}%: {share}");
            if let Some(prev) = &prev {
                assert!(
                    prev.iter().zip(&inside).all(|(&a, &b)| !a || b),
                    "a key left the ramp when it rose to {p}%"
                );
            }
            prev = Some(inside);
        }
        assert_eq!(ramp_hash("user:1"), ramp_hash("user:1"));
        // XXH3-64 of the empty input with seed 0 (the specification's test vector).
        assert_eq!(ramp_hash(""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn the_window_slides_and_rules_trip() {
        let w = Window::default();
        let rules = RollbackRules {
            min_calls: 10,
            ..RollbackRules::default()
        };
        for _ in 0..100 {
            w.add(Event::Read, 5);
        }
        assert_eq!(judge(&rules, &w.counts(5), rules.min_calls), None);
        for _ in 0..5 {
            w.add(Event::Timeout, 5);
        }
        assert_eq!(
            judge(&rules, &w.counts(5), rules.min_calls),
            None,
            "5% is not over 5%"
        );
        w.add(Event::Timeout, 6);
        assert_eq!(
            judge(&rules, &w.counts(6), rules.min_calls),
            Some(Reason::TimeoutRate)
        );
        assert_eq!(
            w.counts(14).reads,
            100,
            "bucket 5 is still within 10 buckets of 14"
        );
        assert_eq!(w.counts(15).reads, 0, "and gone at 15");
        w.add(Event::Read, 15);
        assert_eq!(
            w.counts(15),
            WindowCounts {
                reads: 1,
                timeouts: 1, // bucket 6's; bucket 5's were recycled
                ..WindowCounts::default()
            }
        );
        for _ in 0..20 {
            w.add(Event::Read, 16);
        }
        w.add(Event::Slow, 16);
        assert_eq!(
            judge(&rules, &w.counts(16), rules.min_calls),
            Some(Reason::P99Latency),
            "1 slow read in 21 is more than 1%"
        );
        w.reset();
        assert_eq!(w.counts(16), WindowCounts::default());
        for _ in 0..10 {
            w.add(Event::Compared, 20);
        }
        w.add(Event::Mismatch, 20);
        assert_eq!(
            judge(&rules, &w.counts(20), rules.min_calls),
            Some(Reason::MismatchRate)
        );
    }
}
