//! The cost of the observe path: `get_or_load` through the NullCache against calling the loader directly, with and
//! without the phase-2 estimators, plus a MemoryCache hit and the key → pattern rule on its own.
//! Run: `cargo bench --bench observe`.
//!
//! The estimator's cost depends on the share of calls it samples. `null_observe` cycles over 1,024 keys: after the
//! warm-up (65,536 sampled gets, passed during criterion's warm-up) the rate cap keeps 1/16 of them in the sample.
//! `null_observe_200k_keys` cycles over 200,000 keys, of which the per-pattern sample keeps 7,168 (3.6%) and the
//! shared one 1/16. `_no_analysis` variants turn the estimators off.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use cache_rollout::analysis::AnalysisOptions;
use cache_rollout::cache::CacheImpl;
use cache_rollout::pattern::default_pattern;
use cache_rollout::{CacheRegistry, Policy, RegistryOptions};
use criterion::{criterion_group, criterion_main, Criterion};

fn keys() -> Vec<String> {
    (0..1024).map(|i| format!("user:{i}")).collect()
}

async fn loader(i: u64) -> Result<u64, Infallible> {
    Ok(black_box(i))
}

fn registry(
    rt: &tokio::runtime::Runtime,
    cache_impl: CacheImpl,
    enabled: bool,
    analysis: bool,
) -> CacheRegistry {
    rt.block_on(CacheRegistry::new(
        RegistryOptions::default()
            .with_policy(Policy {
                cache_impl,
                enabled,
                whitelist: vec!["*".into()],
                ..Policy::default()
            })
            .with_analysis(AnalysisOptions {
                enabled: analysis,
                ..AnalysisOptions::default()
            }),
    ))
    .expect("registry")
}

/// Times `iters` calls inside one `block_on`, so the runtime's entry cost is not part of each call.
fn per_call<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, mut f: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            f(i).await;
        }
        start.elapsed()
    })
}

/// `iters` calls of `get_or_load` on `registry`, cycling over `keys`.
fn cycle(
    rt: &tokio::runtime::Runtime,
    registry: &CacheRegistry,
    keys: &[String],
    iters: u64,
) -> Duration {
    per_call(rt, iters, |i| {
        let k = &keys[(i % keys.len() as u64) as usize];
        async move {
            black_box(registry.get_or_load(k, || loader(i)).await.ok());
        }
    })
}

fn observe(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keys = keys();
    let null = registry(&rt, CacheImpl::Null, true, true);
    let null_plain = registry(&rt, CacheImpl::Null, true, false);
    let disabled = registry(&rt, CacheImpl::Null, false, true);
    let memory = registry(&rt, CacheImpl::Memory, true, true);
    let many: Vec<String> = (0..200_000).map(|i| format!("user:{i}")).collect();
    let null_many = registry(&rt, CacheImpl::Null, true, true);
    rt.block_on(async {
        // Fill the sample, so the rate has fallen to its steady state before timing.
        for (i, k) in many.iter().enumerate() {
            let _ = null_many.get_or_load(k, || loader(i as u64)).await;
        }
    });
    rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            let _ = memory.get_or_load(k, || loader(i as u64)).await;
        }
    });

    let mut g = c.benchmark_group("get_or_load");
    g.bench_function("loader_direct", |b| {
        b.iter_custom(|n| {
            per_call(&rt, n, |i| async move {
                black_box(loader(i).await.ok());
            })
        })
    });
    // A key with an id inside (`project:N:members` → `project:*:members`): the pattern is built on the stack.
    let inner: Vec<String> = (0..1024).map(|i| format!("project:{i}:members")).collect();
    let null_many_plain = registry(&rt, CacheImpl::Null, true, false);
    for (name, reg, keys) in [
        ("disabled", &disabled, &keys),
        ("null_observe", &null, &keys),
        ("null_observe_no_analysis", &null_plain, &keys),
        (
            "null_observe_200k_keys_no_analysis",
            &null_many_plain,
            &many,
        ),
        ("null_observe_200k_keys", &null_many, &many),
        ("null_observe_inner_id", &null, &inner),
        ("memory_hit", &memory, &keys),
    ] {
        g.bench_function(name, |b| b.iter_custom(|n| cycle(&rt, reg, keys, n)));
    }
    // Two threads, each with its own runtime, observing the same pattern through one registry: what the shared
    // counters, the estimators and the ArcSwap cost under contention. Time per call on each thread.
    for (name, reg) in [
        ("null_observe_2_threads", &null),
        ("null_observe_2_threads_no_analysis", &null_plain),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..2)
                        .map(|_| {
                            let keys = &keys;
                            s.spawn(move || {
                                let rt = tokio::runtime::Builder::new_current_thread()
                                    .build()
                                    .expect("runtime");
                                cycle(&rt, reg, keys, n)
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("bench thread"))
                        .max()
                        .unwrap_or_default()
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("pattern");
    g.bench_function("default_pattern/user:123", |b| {
        b.iter(|| black_box(default_pattern(black_box("user:123")).len()))
    });
    g.bench_function("default_pattern/user:123:profile", |b| {
        b.iter(|| black_box(default_pattern(black_box("user:123:profile")).len()))
    });
    g.finish();
}

criterion_group!(benches, observe);
criterion_main!(benches);
