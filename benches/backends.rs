//! A RedisCache hit through the registry against a raw `redis` GET on the same kind of connection (a
//! `ConnectionManager`), both against a `redis-server` started for the bench; the same hit with an in-process L1 in
//! front (`l1_ttl_secs`), and through a Redis Cluster (three primaries, three replicas) started for the bench.
//! Run: `cargo bench --bench backends`.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use cache_rollout::cache::{CacheImpl, RedisOptions};
use cache_rollout::{CacheRegistry, PatternPolicy, Policy, RegistryOptions};
use criterion::{criterion_group, criterion_main, Criterion};
use redis::AsyncCommands;

#[derive(serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

/// A registry serving `user` from the Redis at `url`, with an L1 of `l1_ttl_secs` when given.
fn registry(rt: &tokio::runtime::Runtime, url: String, l1_ttl_secs: Option<u64>) -> CacheRegistry {
    let reg = rt
        .block_on(CacheRegistry::new(
            RegistryOptions::default()
                .with_policy(Policy {
                    cache_impl: CacheImpl::Redis,
                    whitelist: vec!["user".into()],
                    patterns: [(
                        "user".to_string(),
                        PatternPolicy {
                            l1_ttl_secs,
                            ..PatternPolicy::default()
                        },
                    )]
                    .into(),
                    ..Policy::default()
                })
                .with_redis(
                    RedisOptions::default()
                        .with_url(url)
                        .with_response_timeout(Duration::from_secs(1)),
                ),
        ))
        .expect("registry");
    assert_eq!(
        reg.policy().cache_impl,
        CacheImpl::Redis,
        "bench Redis reachable"
    );
    reg
}

/// Loads every key once, so that every later read is a hit.
fn warm(rt: &tokio::runtime::Runtime, reg: &CacheRegistry, keys: &[String]) {
    rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            let user = || async move {
                Ok::<_, Infallible>(User {
                    id: i as u64,
                    name: format!("User {i}"),
                    email: format!("user{i}@example.com"),
                })
            };
            let _ = reg.get_or_load(k, user).await;
        }
    });
}

/// `get_or_load` of cached keys, round robin; the time of `n` calls.
fn hits(rt: &tokio::runtime::Runtime, reg: &CacheRegistry, keys: &[String], n: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..n {
            let v: Result<User, Infallible> = reg
                .get_or_load(&keys[(i % 256) as usize], || async {
                    unreachable!("every key is cached")
                })
                .await;
            black_box(v.ok());
        }
        start.elapsed()
    })
}

fn backends(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reg = registry(&rt, server.url(), None);
    let keys: Vec<String> = (0..256).map(|i| format!("user:{i}")).collect();
    let mut raw = rt
        .block_on(async {
            let client = redis::Client::open(server.url())?;
            redis::aio::ConnectionManager::new(client).await
        })
        .expect("raw connection");
    warm(&rt, &reg, &keys);

    let mut g = c.benchmark_group("redis");
    g.bench_function("raw_get", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..n {
                    let v: Option<Vec<u8>> = raw
                        .get(format!("cr:{}", keys[(i % 256) as usize]))
                        .await
                        .expect("GET");
                    black_box(v);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("registry_hit", |b| {
        b.iter_custom(|n| hits(&rt, &reg, &keys, n))
    });
    // The same hits answered by an in-process L1 (the first read of each key fills it from Redis).
    let l1 = registry(&rt, server.url(), Some(60));
    warm(&rt, &l1, &keys);
    warm(&rt, &l1, &keys);
    g.bench_function("l1_hit", |b| b.iter_custom(|n| hits(&rt, &l1, &keys, n)));
    g.finish();

    let cluster = support::RedisCluster::start();
    let on_cluster = registry(&rt, cluster.url(), None);
    warm(&rt, &on_cluster, &keys);
    let mut g = c.benchmark_group("cluster");
    g.bench_function("registry_hit", |b| {
        b.iter_custom(|n| hits(&rt, &on_cluster, &keys, n))
    });
    g.finish();
}

criterion_group!(benches, backends);
criterion_main!(benches);
