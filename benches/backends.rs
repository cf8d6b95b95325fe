//! A RedisCache hit through the registry against a raw `redis` GET on the same kind of connection (a
//! `ConnectionManager`), both against a `redis-server` started for the bench. Run: `cargo bench --bench backends`.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use cache_rollout::cache::{CacheImpl, RedisOptions};
use cache_rollout::{CacheRegistry, Policy, RegistryOptions};
use criterion::{criterion_group, criterion_main, Criterion};
use redis::AsyncCommands;

#[derive(serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

fn backends(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reg = rt
        .block_on(CacheRegistry::new(RegistryOptions {
            policy: Policy {
                imp: CacheImpl::Redis,
                whitelist: vec!["user".into()],
                ..Policy::default()
            },
            redis: RedisOptions {
                url: server.url(),
                response_timeout: Duration::from_secs(1),
                ..RedisOptions::default()
            },
            ..RegistryOptions::default()
        }))
        .expect("registry");
    assert_eq!(reg.policy().imp, CacheImpl::Redis, "bench Redis reachable");
    let keys: Vec<String> = (0..256).map(|i| format!("user:{i}")).collect();
    let mut raw = rt
        .block_on(async {
            let client = redis::Client::open(server.url())?;
            redis::aio::ConnectionManager::new(client).await
        })
        .expect("raw connection");
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
        b.iter_custom(|n| {
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
        })
    });
    g.finish();
}

criterion_group!(benches, backends);
criterion_main!(benches);
