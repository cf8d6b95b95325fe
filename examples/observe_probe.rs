//! Instruction counts of the observe path, for `valgrind --tool=callgrind` (which counts instructions, not seconds,
//! so the figure repeats on a shared machine whatever else runs). Each run warms a registry up with 300,000 calls
//! (past the estimators' warm-up); with a third argument it then makes N timed calls. The difference between the
//! two runs' totals, divided by N, is the cost per call:
//!
//! ```text
//! cargo build --release --example observe_probe
//! for s in null_plain null null200k_plain null200k memory_plain memory; do
//!   a=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/observe_probe $s 100000 2>&1 | awk '/Collected/ {print $4}')
//!   b=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/observe_probe $s 100000 run 2>&1 | awk '/Collected/ {print $4}')
//!   echo "$s $(( (b - a) / 100000 )) instructions per call"
//! done
//! ```
//!
//! Scenarios: `null` (observe through the NullCache) or `memory` (MemoryCache hits), over 1,024 keys or, with
//! `200k`, 200,000 keys; `_plain` turns the phase-2 estimators off.
//!
//! The registry runs on a mock clock that advances 100 µs a call, so the count does not depend on how fast valgrind
//! runs (the estimators' simulations of Redis's eviction read the clock).

use std::convert::Infallible;
use std::hint::black_box;

use cache_rollout::analysis::AnalysisOptions;
use cache_rollout::cache::CacheImpl;
use cache_rollout::{CacheRegistry, Policy, RegistryOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).cloned().unwrap_or_else(|| "null".into());
    let n: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let run = args.get(3).is_some();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let cache_impl = if scenario.starts_with("memory") {
            CacheImpl::Memory
        } else {
            CacheImpl::Null
        };
        let keys_n: u64 = if scenario.contains("200k") {
            200_000
        } else {
            1024
        };
        // A mock clock, 100 µs a call: the estimators' simulations of Redis's eviction read the clock (idle seconds),
        // so on the wall clock the count would depend on how fast valgrind ran.
        let (clock, mock) = quanta::Clock::mock();
        let registry = CacheRegistry::new(
            RegistryOptions::default()
                .with_clock(clock)
                .with_policy(Policy {
                    cache_impl,
                    whitelist: vec!["*".into()],
                    ..Policy::default()
                })
                .with_analysis(AnalysisOptions {
                    enabled: !scenario.ends_with("_plain"),
                    ..AnalysisOptions::default()
                }),
        )
        .await
        .expect("registry");
        let keys: Vec<String> = (0..keys_n).map(|i| format!("user:{i}")).collect();
        for i in 0..300_000u64 {
            mock.increment(std::time::Duration::from_micros(100));
            let k = &keys[(i % keys_n) as usize];
            let _: Result<u64, Infallible> = registry.get_or_load(k, || async move { Ok(i) }).await;
        }
        if run {
            for i in 0..n {
                mock.increment(std::time::Duration::from_micros(100));
                let k = &keys[(i % keys_n) as usize];
                let r: Result<u64, Infallible> = registry
                    .get_or_load(k, || async move { Ok(black_box(i)) })
                    .await;
                black_box(r.ok());
            }
        }
    });
}
