//! Per-pattern counters and loader-duration histogram, striped by thread so that threads observing the same key
//! pattern do not contend on one cache line.
//!
//! Every pattern has [`STRIPES`] stripes, each on its own 128-byte-aligned block; a thread always writes the stripe
//! picked for it on first use (round robin), with relaxed atomic adds, and a scrape sums the stripes. With one
//! shared counter per pattern, two threads observing one pattern spent about 4× as long per call as one thread
//! (`cargo bench --bench observe -- 2_threads`). The families are exposed through one `prometheus` collector,
//! [`PatternCollector`], under the seed system's names.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::{proto, Histogram, IntCounter};

use super::histogram::{bucket_index, histogram_proto, BUCKETS};
use crate::cache::CacheImpl;

/// Stripes per pattern.
pub const STRIPES: usize = 8;

#[derive(Clone, Copy)]
enum Kind {
    Hit = 0,
    Miss = 1,
    Set = 2,
    Del = 3,
    /// Application writes (`set`), not the fills counted under `Set`; not exposed, for the write ratio.
    Write = 4,
    /// Loader calls that failed; not exposed, for the report (stale-if-error advice).
    LoadError = 5,
    /// Loader values the caller marked absent; not exposed, for the report (negative caching advice).
    Absent = 6,
}

const KINDS: [(&str, &str, Kind); 4] = [
    (
        "cache_hits_total",
        "Cache reads that found a value.",
        Kind::Hit,
    ),
    (
        "cache_miss_total",
        "Cache reads that found nothing (the loader ran).",
        Kind::Miss,
    ),
    ("cache_set_total", "Cache writes.", Kind::Set),
    (
        "cache_del_total",
        "Cache deletes (invalidations of one key).",
        Kind::Del,
    ),
];

#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    counters: [[AtomicU64; 3]; 7], // [kind][impl]
    loader: [AtomicU64; BUCKETS],
    loader_sum_nanos: AtomicU64,
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised cells: reading them is a plain thread-local load, with no lazy-init registration.
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    static SIZE_SAMPLE: Cell<u64> = const { Cell::new(0) };
}

/// This thread's stripe, picked round robin on first use.
#[inline]
fn stripe_index() -> usize {
    STRIPE.with(|c| {
        let i = c.get();
        if i != usize::MAX {
            return i;
        }
        let i = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
        c.set(i);
        i
    })
}

/// The per-pattern handles of the stale, negative and refresh families.
pub(crate) struct Outcomes {
    pub(crate) stale_error: IntCounter,
    pub(crate) stale_revalidate: IntCounter,
    pub(crate) negative_hits: IntCounter,
    /// `stored`, `failed`, `not_stored`.
    pub(crate) refresh: [IntCounter; 3],
}

/// The metrics of one key pattern.
pub struct PatternMetrics {
    stripes: Box<[Stripe]>,
    coalesced: IntCounter,
    /// The stale, negative and refresh counters; set once by [`Metrics::pattern`](super::Metrics::pattern).
    outcomes: std::sync::OnceLock<Outcomes>,
    pub(crate) value_size: Histogram,
}

impl std::fmt::Debug for PatternMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatternMetrics")
            .field("counts", &self.counts())
            .finish()
    }
}

/// Counters of one key pattern summed over impls, as `GET /internal/cache` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PatternCounts {
    /// Reads (`hits + misses`).
    pub gets: u64,
    /// Reads that found a value.
    pub hits: u64,
    /// Reads that found nothing.
    pub misses: u64,
    /// Writes.
    pub sets: u64,
    /// Deletes.
    pub deletes: u64,
    /// Misses answered by another caller's load (single-flight); included in `misses`.
    pub coalesced: u64,
    /// Reads answered with an entry past its TTL (stale-if-error, counted in `misses`; stale-while-revalidate,
    /// counted in `hits`).
    pub stale: u64,
    /// Hits on a cached absence (`cache_negative_secs`); included in `hits`.
    pub negative_hits: u64,
    /// Refreshes started by stale-while-revalidate (loader runs no caller waited for).
    pub refreshes: u64,
    /// Loader calls that returned an error.
    pub loader_errors: u64,
    /// Loader values the caller marked absent ([`Fetch::absent_if`](crate::registry::Fetch::absent_if)).
    pub absent: u64,
    /// Application writes (`set` calls), as opposed to the fills after a miss that `sets` also counts.
    pub writes: u64,
}

impl PatternMetrics {
    pub(crate) fn new(coalesced: IntCounter, value_size: Histogram) -> Self {
        PatternMetrics {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            coalesced,
            outcomes: std::sync::OnceLock::new(),
            value_size,
        }
    }

    #[inline]
    fn stripe(&self) -> &Stripe {
        &self.stripes[stripe_index()]
    }

    #[inline]
    fn add(&self, kind: Kind, cache_impl: CacheImpl) {
        self.stripe().counters[kind as usize][cache_impl.index()].fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn hit(&self, cache_impl: CacheImpl) {
        self.add(Kind::Hit, cache_impl);
    }
    #[inline]
    pub(crate) fn miss(&self, cache_impl: CacheImpl) {
        self.add(Kind::Miss, cache_impl);
    }
    #[inline]
    pub(crate) fn set(&self, cache_impl: CacheImpl) {
        self.add(Kind::Set, cache_impl);
    }
    #[inline]
    pub(crate) fn del(&self, cache_impl: CacheImpl) {
        self.add(Kind::Del, cache_impl);
    }
    /// An application write (`CacheRegistry::set`).
    #[inline]
    pub(crate) fn write(&self) {
        self.add(Kind::Write, CacheImpl::Null);
    }
    pub(crate) fn coalesced(&self) {
        self.coalesced.inc();
    }

    /// A loader call failed.
    pub(crate) fn load_failed(&self) {
        self.add(Kind::LoadError, CacheImpl::Null);
    }

    /// A loader value was an absence.
    pub(crate) fn absent(&self) {
        self.add(Kind::Absent, CacheImpl::Null);
    }

    pub(crate) fn set_outcomes(&self, outcomes: Outcomes) {
        let _ = self.outcomes.set(outcomes);
    }

    /// A read answered with a stale entry: `error` for stale-if-error, else stale-while-revalidate.
    pub(crate) fn stale_served(&self, error: bool) {
        if let Some(o) = self.outcomes.get() {
            if error {
                o.stale_error.inc();
            } else {
                o.stale_revalidate.inc();
            }
        }
    }

    pub(crate) fn negative_hit(&self) {
        if let Some(o) = self.outcomes.get() {
            o.negative_hits.inc();
        }
    }

    /// A stale-while-revalidate refresh ended: `Some(true)` stored, `Some(false)` not stored, `None` the loader
    /// failed.
    pub(crate) fn refreshed(&self, stored: Option<bool>) {
        if let Some(o) = self.outcomes.get() {
            let i = match stored {
                Some(true) => 0,
                None => 1,
                Some(false) => 2,
            };
            o.refresh[i].inc();
        }
    }

    /// The end of an observed miss: the loader took `nanos` nanoseconds, and when it succeeded the NullCache
    /// counts the set a cache would have made. One stripe lookup for both.
    #[inline]
    pub(crate) fn observed_load(&self, nanos: u64, ok: bool) {
        let s = self.stripe();
        s.loader[bucket_index(nanos)].fetch_add(1, Ordering::Relaxed);
        s.loader_sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        if !ok {
            s.counters[Kind::LoadError as usize][CacheImpl::Null.index()]
                .fetch_add(1, Ordering::Relaxed);
        } else {
            s.counters[Kind::Set as usize][CacheImpl::Null.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records one loader call of `nanos` nanoseconds.
    #[inline]
    pub(crate) fn loader_nanos(&self, nanos: u64) {
        let s = self.stripe();
        s.loader[bucket_index(nanos)].fetch_add(1, Ordering::Relaxed);
        s.loader_sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    #[inline]
    /// True once every `every` calls on this thread: which values get their size measured while observing.
    pub(crate) fn sample_size(&self, every: u64) -> bool {
        SIZE_SAMPLE.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            every <= 1 || n.is_multiple_of(every)
        })
    }

    fn total(&self, kind: Kind, cache_impl: CacheImpl) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.counters[kind as usize][cache_impl.index()].load(Ordering::Relaxed))
            .sum()
    }

    fn total_all(&self, kind: Kind) -> u64 {
        CacheImpl::ALL.iter().map(|&i| self.total(kind, i)).sum()
    }

    /// The counters summed over impls.
    pub fn counts(&self) -> PatternCounts {
        let hits = self.total_all(Kind::Hit);
        let misses = self.total_all(Kind::Miss);
        PatternCounts {
            gets: hits + misses,
            hits,
            misses,
            sets: self.total_all(Kind::Set),
            deletes: self.total_all(Kind::Del),
            coalesced: self.coalesced.get(),
            stale: self
                .outcomes
                .get()
                .map_or(0, |o| o.stale_error.get() + o.stale_revalidate.get()),
            negative_hits: self.outcomes.get().map_or(0, |o| o.negative_hits.get()),
            refreshes: self
                .outcomes
                .get()
                .map_or(0, |o| o.refresh.iter().map(IntCounter::get).sum()),
            writes: self.total(Kind::Write, CacheImpl::Null),
            loader_errors: self.total(Kind::LoadError, CacheImpl::Null),
            absent: self.total(Kind::Absent, CacheImpl::Null),
        }
    }

    /// Hits of one impl only.
    pub fn hits_of(&self, cache_impl: CacheImpl) -> u64 {
        self.total(Kind::Hit, cache_impl)
    }

    /// Loader calls so far and their total duration in seconds.
    pub fn loader_totals(&self) -> (u64, f64) {
        let (counts, sum) = self.loader_histogram();
        (counts.iter().sum(), sum as f64 * 1e-9)
    }

    /// The loader histogram as Prometheus exposes it.
    pub(crate) fn loader_proto(&self) -> proto::Histogram {
        let (counts, sum) = self.loader_histogram();
        histogram_proto(&counts, sum)
    }

    fn loader_histogram(&self) -> ([u64; BUCKETS], u64) {
        let mut counts = [0u64; BUCKETS];
        let mut sum = 0;
        for s in self.stripes.iter() {
            for (c, b) in counts.iter_mut().zip(&s.loader) {
                *c += b.load(Ordering::Relaxed);
            }
            sum += s.loader_sum_nanos.load(Ordering::Relaxed);
        }
        (counts, sum)
    }
}

/// Exposes every pattern's striped counters and loader histogram as `cache_{hits,miss,set,del}_total{impl,
/// key_pattern}` and `cache_loader_duration_seconds{key_pattern}`.
pub(crate) struct PatternCollector {
    counter_descs: Vec<Desc>,
    loader_desc: Desc,
    patterns: Mutex<Vec<(String, Arc<PatternMetrics>)>>,
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut p = proto::LabelPair::default();
    p.set_name(name.to_string());
    p.set_value(value.to_string());
    p
}

impl PatternCollector {
    pub(crate) fn new() -> prometheus::Result<Self> {
        let labels = || vec!["impl".to_string(), "key_pattern".to_string()];
        Ok(PatternCollector {
            counter_descs: KINDS
                .iter()
                .map(|(name, help, _)| {
                    Desc::new(
                        name.to_string(),
                        help.to_string(),
                        labels(),
                        Default::default(),
                    )
                })
                .collect::<prometheus::Result<_>>()?,
            loader_desc: Desc::new(
                "cache_loader_duration_seconds".into(),
                "Duration of loader (origin) calls in seconds.".into(),
                vec!["key_pattern".into()],
                Default::default(),
            )?,
            patterns: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn add(&self, name: &str, metrics: Arc<PatternMetrics>) {
        self.patterns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_string(), metrics));
    }
}

impl Collector for PatternCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.counter_descs
            .iter()
            .chain(std::iter::once(&self.loader_desc))
            .collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let patterns = self.patterns.lock().unwrap_or_else(PoisonError::into_inner);
        if patterns.is_empty() {
            return Vec::new(); // a family without metrics cannot be encoded
        }
        let family = |desc: &Desc, kind: proto::MetricType, metrics: Vec<proto::Metric>| {
            let mut mf = proto::MetricFamily::default();
            mf.set_name(desc.fq_name.clone());
            mf.set_help(desc.help.clone());
            mf.set_field_type(kind);
            mf.set_metric(metrics);
            mf
        };
        let mut out: Vec<proto::MetricFamily> = KINDS
            .iter()
            .zip(&self.counter_descs)
            .map(|((_, _, kind), desc)| {
                let metrics = patterns
                    .iter()
                    .flat_map(|(name, m)| {
                        CacheImpl::ALL.iter().map(move |&cache_impl| {
                            let mut metric = proto::Metric::from_label(vec![
                                label("impl", cache_impl.as_str()),
                                label("key_pattern", name),
                            ]);
                            let mut c = proto::Counter::default();
                            c.set_value(m.total(*kind, cache_impl) as f64);
                            metric.set_counter(c);
                            metric
                        })
                    })
                    .collect();
                family(desc, proto::MetricType::COUNTER, metrics)
            })
            .collect();
        let loaders = patterns
            .iter()
            .map(|(name, m)| {
                let mut metric = proto::Metric::from_label(vec![label("key_pattern", name)]);
                let (counts, sum) = m.loader_histogram();
                metric.set_histogram(histogram_proto(&counts, sum));
                metric
            })
            .collect();
        out.push(family(
            &self.loader_desc,
            proto::MetricType::HISTOGRAM,
            loaders,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<PatternMetrics> {
        let coalesced = IntCounter::new("c_total", "c").expect("counter");
        let size = Histogram::with_opts(prometheus::HistogramOpts::new("s_bytes", "s"))
            .expect("histogram");
        Arc::new(PatternMetrics::new(coalesced, size))
    }

    #[test]
    fn stripes_written_by_many_threads_sum_exactly() {
        let m = metrics();
        std::thread::scope(|s| {
            for _ in 0..6 {
                let m = Arc::clone(&m);
                s.spawn(move || {
                    for _ in 0..1000 {
                        m.miss(CacheImpl::Null);
                        m.loader_nanos(120_000);
                    }
                    m.hit(CacheImpl::Redis);
                });
            }
        });
        let c = m.counts();
        assert_eq!((c.gets, c.misses, c.hits), (6006, 6000, 6));
        assert_eq!(m.hits_of(CacheImpl::Redis), 6);
        let (n, secs) = m.loader_totals();
        assert_eq!(n, 6000);
        assert!((secs - 0.72).abs() < 1e-9, "{secs}");
    }

    #[test]
    fn the_collector_exposes_the_seed_names() {
        let c = Arc::new(PatternCollector::new().expect("collector"));
        let r = prometheus::Registry::new();
        assert!(r.gather().is_empty());
        r.register(Box::new(super::super::Shared(Arc::clone(&c))))
            .expect("register");
        assert!(r.gather().is_empty(), "no pattern yet: no family");
        let m = metrics();
        m.set(CacheImpl::Memory);
        m.loader_nanos(1_000);
        c.add("user:*:profile", m);
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out)
            .expect("encode");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains(r#"cache_set_total{impl="memory",key_pattern="user:*:profile"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"cache_hits_total{impl="redis",key_pattern="user:*:profile"} 0"#));
        assert!(
            text.contains(r#"cache_loader_duration_seconds_count{key_pattern="user:*:profile"} 1"#)
        );
        assert!(text.contains("# TYPE cache_miss_total counter"));
    }
}
