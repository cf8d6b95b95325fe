//! The pieces of the observe path, timed one by one, to show where its budget goes and why the registry uses a
//! TSC clock (quanta) and its own duration histogram. Run: `cargo bench --bench components`.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use cache_rollout::metrics::{bucket_bounds_seconds, DurationHistogram};
use criterion::{criterion_group, criterion_main, Criterion};

fn components(c: &mut Criterion) {
    let mut g = c.benchmark_group("component");
    g.bench_function("std_instant_pair", |b| {
        b.iter(|| {
            let s = Instant::now();
            black_box(s.elapsed())
        })
    });
    let clock = quanta::Clock::new();
    g.bench_function("quanta_raw_pair", |b| {
        b.iter(|| {
            let s = clock.raw();
            black_box(clock.delta_as_nanos(s, clock.raw()))
        })
    });
    let prom = prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new("x_seconds", "x").buckets(bucket_bounds_seconds()),
    )
    .expect("valid histogram");
    g.bench_function("prometheus_histogram_observe", |b| {
        b.iter(|| prom.observe(black_box(1e-4)))
    });
    let ours = DurationHistogram::default();
    g.bench_function("duration_histogram_observe", |b| {
        b.iter(|| ours.observe_nanos(black_box(100_000)))
    });
    let swap = arc_swap::ArcSwap::from_pointee(5u64);
    g.bench_function("arc_swap_load", |b| b.iter(|| black_box(**swap.load())));
    let counter = prometheus::IntCounter::new("c_total", "c").expect("valid counter");
    g.bench_function("prometheus_counter_inc", |b| b.iter(|| counter.inc()));
    g.finish();
}

criterion_group!(benches, components);
criterion_main!(benches);
