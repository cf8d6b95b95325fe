#![allow(missing_docs)]
use cache_rollout::metrics::Metrics;
use cache_rollout::pattern::PatternTable;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Instant;

fn parts(c: &mut Criterion) {
    let m = Metrics::new();
    let pm = m.pattern("user");
    let h = prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new("x", "y")
            .buckets(prometheus::exponential_buckets(0.00005, 2.0, 17).unwrap()),
    )
    .unwrap();
    c.bench_function("instant_pair", |b| {
        b.iter(|| {
            let s = Instant::now();
            black_box(s.elapsed().as_secs_f64())
        })
    });
    let clock = quanta::Clock::new();
    c.bench_function("quanta_instant_pair", |b| {
        b.iter(|| {
            let s = quanta::Instant::now();
            black_box(s.elapsed().as_secs_f64())
        })
    });
    c.bench_function("quanta_raw_pair", |b| {
        b.iter(|| {
            let s = clock.raw();
            black_box(clock.delta_as_nanos(s, clock.raw()))
        })
    });
    c.bench_function("histogram_observe", |b| {
        b.iter(|| h.observe(black_box(1e-7)))
    });
    c.bench_function("counts", |b| b.iter(|| black_box(pm.counts())));
    let t = PatternTable::new(100, |n: &str| n.to_string());
    t.get("user");
    c.bench_function("table_get", |b| {
        b.iter(|| black_box(t.get(black_box("user"))))
    });
    let a = arc_swap::ArcSwap::from_pointee(5u64);
    c.bench_function("arcswap_load", |b| b.iter(|| black_box(**a.load())));
}
criterion_group!(benches, parts);
criterion_main!(benches);
