//! The registry's behaviour: observe, serve, single-flight, fail-open, corruption, runtime switching.
//! Redis is a real `redis-server` started by `support`.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

use cache_rollout::cache::{CacheImpl, RedisOptions};
use cache_rollout::{CacheRegistry, Policy, PolicyUpdate, RegistryOptions};
use support::{metric, user, RedisServer, User};

fn options(
    cache_impl: CacheImpl,
    whitelist: &[&str],
    redis_url: Option<String>,
) -> RegistryOptions {
    RegistryOptions::default()
        .with_policy(Policy {
            cache_impl,
            whitelist: whitelist.iter().map(ToString::to_string).collect(),
            ..Policy::default()
        })
        .with_redis(
            RedisOptions::default()
                .with_url(redis_url.unwrap_or_else(|| "redis://127.0.0.1:1".into()))
                .with_connect_timeout(Duration::from_millis(500))
                .with_response_timeout(Duration::from_millis(200)),
        )
}

async fn registry(
    cache_impl: CacheImpl,
    whitelist: &[&str],
    redis_url: Option<String>,
) -> CacheRegistry {
    CacheRegistry::new(options(cache_impl, whitelist, redis_url))
        .await
        .expect("registry")
}

/// Loads `user(id, 1)` through the registry, counting loader runs.
async fn load(reg: &CacheRegistry, id: u64, calls: &AtomicUsize) -> User {
    reg.get_or_load(&format!("user:{id}"), || async {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Infallible>(user(id, 1))
    })
    .await
    .expect("infallible loader")
}

/// Starts `get_or_load(key)` in a task whose loader returns `value` only once released; returns when the loader is
/// running, with the task and the release.
async fn blocked_load(
    reg: &CacheRegistry,
    key: &'static str,
    value: User,
) -> (
    tokio::task::JoinHandle<Result<User, Infallible>>,
    Arc<Notify>,
) {
    let (started_tx, started_rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    let task = {
        let (reg, release) = (reg.clone(), release.clone());
        tokio::spawn(async move {
            reg.get_or_load(key, || async move {
                let _ = started_tx.send(());
                release.notified().await;
                Ok::<_, Infallible>(value)
            })
            .await
        })
    };
    started_rx.await.expect("the load is running");
    (task, release)
}

/// Loads user 1 twice in a row until the second is a hit again (at most 20 s), after a fault ended.
async fn hits_resume(reg: &CacheRegistry, calls: &AtomicUsize, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = calls.load(Ordering::SeqCst);
        load(reg, 1, calls).await;
        load(reg, 1, calls).await;
        if calls.load(Ordering::SeqCst) - before <= 1 {
            return; // a hit again
        }
        assert!(Instant::now() < deadline, "caching did not resume {after}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn switch(cache_impl: CacheImpl, whitelist: &[&str]) -> PolicyUpdate {
    PolicyUpdate {
        cache_impl: Some(cache_impl),
        whitelist: Some(whitelist.iter().map(ToString::to_string).collect()),
        ..PolicyUpdate::default()
    }
}

#[tokio::test]
async fn observe_mode_always_runs_the_loader_and_counts_every_call() {
    let reg = registry(CacheImpl::Null, &[], None).await;
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the NullCache never serves"
    );
    let c = reg.pattern_counts()["user"];
    assert_eq!((c.gets, c.hits, c.misses, c.sets), (3, 0, 3, 3));
    let text = reg.metrics().render();
    assert!(
        text.contains(r#"cache_miss_total{impl="null",key_pattern="user"} 3"#),
        "{text}"
    );
    assert!(text.contains(r#"cache_loader_duration_seconds_count{key_pattern="user"} 3"#));
    assert!(
        text.contains(r#"cache_value_size_bytes_count{key_pattern="user"} 1"#),
        "one value in 16 is sized"
    );
}

#[tokio::test]
async fn disabled_registry_calls_the_loader_unmeasured() {
    let mut opts = options(CacheImpl::Memory, &["*"], None);
    opts.policy.enabled = false;
    let reg = CacheRegistry::new(opts).await.expect("registry");
    let calls = AtomicUsize::new(0);
    load(&reg, 1, &calls).await;
    load(&reg, 1, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(reg.pattern_counts().is_empty(), "nothing measured");
}

#[tokio::test]
async fn malformed_key_bypasses_the_cache_and_is_counted() {
    let reg = registry(CacheImpl::Memory, &["*"], None).await;
    for key in ["", "user 1", "user:\n1"] {
        let v: Result<u32, Infallible> = reg.get_or_load(key, || async { Ok(7) }).await;
        assert_eq!(v, Ok(7));
    }
    assert_eq!(reg.metrics().errors(CacheImpl::Memory, "invalid_key"), 3);
    assert!(reg.set("bad key", &1u32).await.is_err());
    assert!(reg.invalidate("").await.is_err());
}

#[tokio::test]
async fn memory_serves_whitelisted_patterns_and_observes_the_rest() {
    let reg = registry(CacheImpl::Memory, &["user"], None).await;
    let calls = AtomicUsize::new(0);
    assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "second call is a hit");
    let project_calls = AtomicUsize::new(0);
    for _ in 0..2 {
        let _: Result<u64, Infallible> = reg
            .get_or_load("project:1", || async {
                project_calls.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await;
    }
    assert_eq!(
        project_calls.load(Ordering::SeqCst),
        2,
        "not whitelisted: observed only"
    );
    let counts = reg.pattern_counts();
    assert_eq!((counts["user"].hits, counts["user"].misses), (1, 1));
    assert_eq!((counts["project"].hits, counts["project"].misses), (0, 2));
    let text = reg.metrics().render();
    assert!(text.contains(r#"cache_hits_total{impl="memory",key_pattern="user"} 1"#));
    assert!(text.contains(r#"cache_miss_total{impl="null",key_pattern="project"} 2"#));
    assert!(text.contains(r#"cache_enabled{impl="memory"} 1"#));
}

#[tokio::test]
async fn loader_errors_are_returned_and_not_cached() {
    let reg = registry(CacheImpl::Memory, &["*"], None).await;
    let r: Result<u32, String> = reg
        .get_or_load("user:1", || async { Err("origin down".to_string()) })
        .await;
    assert_eq!(r, Err("origin down".to_string()));
    let r: Result<u32, String> = reg.get_or_load("user:1", || async { Ok(5) }).await;
    assert_eq!(r, Ok(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_one_key_run_the_loader_once() {
    let reg = registry(CacheImpl::Memory, &["*"], None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let reg = reg.clone();
        let calls = Arc::clone(&calls);
        tasks.push(tokio::spawn(async move {
            reg.get_or_load("user:7", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, Infallible>(user(7, 1))
            })
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), Ok(user(7, 1)));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let c = reg.pattern_counts()["user"];
    assert_eq!(c.gets, 100);
    assert_eq!(c.coalesced, 99);
}

#[tokio::test]
async fn oversized_values_are_served_but_not_stored() {
    let mut opts = options(CacheImpl::Memory, &["*"], None);
    opts.max_value_bytes = 100;
    let reg = CacheRegistry::new(opts).await.expect("registry");
    let calls = AtomicUsize::new(0);
    for _ in 0..2 {
        let v: Result<String, Infallible> = reg
            .get_or_load("blob:1", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok("x".repeat(1000))
            })
            .await;
        assert_eq!(v.expect("loader value").len(), 1000);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "never stored, so never a hit"
    );
    assert_eq!(reg.metrics().errors(CacheImpl::Memory, "too_large"), 2);
    let e = reg
        .set("blob:1", &"x".repeat(1000))
        .await
        .expect_err("explicit set refuses");
    assert!(e.to_string().contains("exceeds"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_redis_entry_is_a_miss_and_is_replaced() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["user"], Some(server.url())).await;
    let calls = AtomicUsize::new(0);
    load(&reg, 1, &calls).await;
    let mut raw = server.conn();
    for garbage in [
        &b"not ours"[..],
        b"",
        // (An entry with our magic and version but another type tag would be another application version's, a
        // plain miss rather than an error: `tests/stale.rs`.)
        b"CR",
    ] {
        let () = redis::cmd("SET")
            .arg("cr:user:1")
            .arg(garbage)
            .query(&mut raw)
            .expect("corrupt");
        assert_eq!(
            load(&reg, 1, &calls).await,
            user(1, 1),
            "never a wrong value"
        );
    }
    // Flip one byte of a valid entry: the checksum catches it.
    let mut good: Vec<u8> = redis::cmd("GET")
        .arg("cr:user:1")
        .query(&mut raw)
        .expect("get");
    let last = good.len() - 2;
    good[last] ^= 0x01;
    let () = redis::cmd("SET")
        .arg("cr:user:1")
        .arg(good)
        .query(&mut raw)
        .expect("corrupt");
    assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "every corrupted read reloaded"
    );
    assert_eq!(reg.metrics().errors(CacheImpl::Redis, "corrupt"), 4);
    assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "the reload replaced the entry: a hit again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_to_unreachable_redis_keeps_the_old_state() {
    let reg = registry(
        CacheImpl::Memory,
        &["user"],
        Some(format!("redis://127.0.0.1:{}", support::free_port())),
    )
    .await;
    let e = reg
        .switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect_err("nothing listens");
    assert!(e.is_connection() || e.is_timeout(), "{e}");
    let state = reg.state().await;
    assert_eq!(state.cache_impl, CacheImpl::Memory);
    let last = state.swaps.last().expect("history");
    assert!(!last.ok && last.error.is_some());
    assert_eq!(last.to_impl, CacheImpl::Redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_starts_observing_when_redis_is_down_and_switches_when_it_appears() {
    let port = support::free_port();
    let reg = registry(
        CacheImpl::Redis,
        &["user"],
        Some(format!("redis://127.0.0.1:{port}")),
    )
    .await;
    assert_eq!(reg.policy().cache_impl, CacheImpl::Null, "starts observing");
    let calls = AtomicUsize::new(0);
    assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    let state = reg.state().await;
    assert!(!state.swaps[0].ok, "the failed start-up swap is recorded");
    assert!(state.whitelist.contains(&"user".to_string()));

    let _server = RedisServer::start_on(port, &[]);
    // The background retry runs every 5 s; bounded wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reg.policy().cache_impl != CacheImpl::Redis {
        assert!(
            Instant::now() < deadline,
            "did not switch to Redis once it appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load(&reg, 1, &calls).await;
    load(&reg, 1, &calls).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "served from Redis once it was there"
    );
    assert_eq!(
        reg.state().await.swaps.last().map(|s| s.source.as_str()),
        Some("retry")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_observed_is_never_hidden_by_an_older_redis_value() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["user"], Some(server.url())).await;
    let v = |version: u64| move || async move { Ok::<_, Infallible>(user(1, version)) };
    assert_eq!(reg.get_or_load("user:1", v(1)).await, Ok(user(1, 1)));
    // Stop serving `user` but keep Redis: the invalidation still reaches Redis.
    reg.switch(&switch(CacheImpl::Redis, &[]))
        .await
        .expect("unwhitelist");
    reg.invalidate("user:1").await.expect("invalidate");
    reg.switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect("whitelist again");
    assert_eq!(reg.get_or_load("user:1", v(2)).await, Ok(user(1, 2)));
    // Leave Redis entirely: invalidations cannot reach it, so it is flushed when it becomes active again.
    reg.switch(&switch(CacheImpl::Null, &[]))
        .await
        .expect("to null");
    reg.invalidate("user:1").await.expect("invalidate");
    reg.switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect("back to redis");
    assert_eq!(reg.get_or_load("user:1", v(3)).await, Ok(user(1, 3)));
    // Disable caching (same backend): invalidations still reach Redis.
    reg.switch(&PolicyUpdate {
        enabled: Some(false),
        ..PolicyUpdate::default()
    })
    .await
    .expect("disable");
    reg.invalidate("user:1")
        .await
        .expect("invalidate while disabled");
    reg.switch(&PolicyUpdate {
        enabled: Some(true),
        ..PolicyUpdate::default()
    })
    .await
    .expect("enable");
    assert_eq!(reg.get_or_load("user:1", v(4)).await, Ok(user(1, 4)));
}

/// Two instances on one Redis, one of which leaves it first (a fleet flip reaching it before the other, a rollback
/// of this instance alone): its writes must still reach the copy the other serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_left_redis_still_invalidates_what_the_others_serve() {
    let mut server = RedisServer::start();
    // A read deadline no loaded machine reaches, so that every fill below happens.
    let opts = || {
        let mut o = options(CacheImpl::Redis, &["user"], Some(server.url()));
        o.policy.read_timeout_ms = 2_000;
        o
    };
    let a = CacheRegistry::new(opts()).await.expect("a");
    let b = CacheRegistry::new(opts()).await.expect("b");
    let v = |version: u64| move || async move { Ok::<_, Infallible>(user(1, version)) };
    let url = server.url();
    let exists = |key: &str| {
        redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| {
                redis::cmd("EXISTS")
                    .arg(format!("cr:{key}"))
                    .query::<bool>(&mut c)
            })
            .expect("exists")
    };
    let tagged = |version: u64| {
        b.get_or_load_tagged("user:9", &["team:1"], move || async move {
            Ok::<_, Infallible>(user(9, version))
        })
    };
    // Each way out of Redis: to null; to memory; to memory and then on to null (the kept Redis carried along).
    let ways: [(&[PolicyUpdate], &str); 3] = [
        (&[switch(CacheImpl::Null, &[])], "null"),
        (&[switch(CacheImpl::Memory, &["user"])], "memory"),
        (
            &[
                switch(CacheImpl::Memory, &["user"]),
                switch(CacheImpl::Null, &[]),
            ],
            "memory then null",
        ),
    ];
    for (leave, label) in ways {
        a.switch(&switch(CacheImpl::Redis, &["user"]))
            .await
            .expect("a on redis");
        assert!(!a.state().await.deletes_in_left_redis);
        assert_eq!(b.get_or_load("user:1", v(1)).await, Ok(user(1, 1)));
        assert!(exists("user:1"), "b filled user:1");
        // `a` leaves Redis; `b` still serves user:1 from it.
        for change in leave {
            a.switch(change).await.expect("a leaves redis");
        }
        assert!(a.state().await.deletes_in_left_redis, "{label}");
        // A write through `a` (the origin now has version 2), and its invalidation.
        a.invalidate("user:1").await.expect("invalidate through a");
        assert!(
            !exists("user:1"),
            "a's invalidation under {label} reached Redis"
        );
        assert_eq!(b.get_or_load("user:1", v(2)).await, Ok(user(1, 2)));
        assert!(exists("user:1"), "b filled user:1 again");
        // `set` goes there too.
        a.set("user:1", &user(1, 3)).await.expect("set through a");
        assert!(
            !exists("user:1"),
            "a's set under {label} removed the old copy"
        );
        assert_eq!(b.get_or_load("user:1", v(3)).await, Ok(user(1, 3)));
        // And tag and pattern invalidations.
        assert_eq!(tagged(1).await, Ok(user(9, 1)));
        assert!(exists("user:9"), "b filled user:9");
        a.invalidate_tag("team:1")
            .await
            .expect("invalidate_tag through a");
        assert!(
            !exists("user:9"),
            "a's tag invalidation under {label} reached Redis"
        );
        assert_eq!(tagged(2).await, Ok(user(9, 2)));
        assert!(exists("user:1") && exists("user:9"));
        a.invalidate_pattern("user")
            .await
            .expect("invalidate_pattern through a");
        assert!(
            !exists("user:1") && !exists("user:9"),
            "a's pattern deletion under {label} reached Redis"
        );
    }
    // With that Redis down, the invalidation says so (the caller retries it), as it does with Redis active.
    server.kill();
    assert!(
        a.invalidate("user:1").await.is_err(),
        "an invalidation that could not reach Redis is an error"
    );
    server.restart();
    // Back on Redis, `a` deletes through its new backend, and keeps no other.
    a.switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect("a back on redis");
    assert!(!a.state().await.deletes_in_left_redis);
    // `b`'s connection is re-made on its first command after the restart: a few reads until it fills again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(b.get_or_load("user:1", v(4)).await, Ok(user(1, 4)));
        if exists("user:1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never filled the restarted Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.invalidate("user:1").await.expect("invalidate");
    assert!(!exists("user:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_pattern_removes_only_that_pattern() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["*"], Some(server.url())).await;
    for i in 0..10 {
        reg.set(&format!("user:{i}"), &i).await.expect("set");
        reg.set(&format!("user:{i}:profile"), &i)
            .await
            .expect("set");
    }
    assert_eq!(reg.invalidate_pattern("user").await.expect("delete"), 10);
    assert_eq!(
        reg.invalidate_pattern("user:*:profile")
            .await
            .expect("delete"),
        10
    );
    assert!(reg.invalidate_pattern("bad pattern").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_load_themselves_when_the_leader_fails() {
    let reg = registry(CacheImpl::Memory, &["*"], None).await;
    let (started_tx, started_rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    let leader_done = Arc::new(AtomicBool::new(false));
    let leader = {
        let (reg, release, leader_done) = (reg.clone(), release.clone(), leader_done.clone());
        tokio::spawn(async move {
            reg.get_or_load("user:8", || async move {
                let _ = started_tx.send(());
                release.notified().await;
                leader_done.store(true, Ordering::SeqCst);
                Err::<User, _>("boom")
            })
            .await
        })
    };
    started_rx.await.expect("the leader's loader is running");
    let follower = {
        let (reg, leader_done) = (reg.clone(), leader_done.clone());
        tokio::spawn(async move {
            reg.get_or_load("user:8", || async move {
                // Runs only after the leader failed: the follower waited instead of loading alongside it.
                Ok::<_, &str>((leader_done.load(Ordering::SeqCst), user(8, 1)))
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.notify_one();
    assert_eq!(leader.await.expect("task"), Err("boom"));
    let (waited, value) = follower.await.expect("task").expect("own load");
    assert!(
        waited,
        "the follower's loader ran only after the leader's failed"
    );
    assert_eq!(value, user(8, 1));
    assert_eq!(reg.pattern_counts()["user"].coalesced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_detaches_the_load_in_flight() {
    let reg = registry(CacheImpl::Memory, &["user"], None).await;
    // Reads version 1 from the origin, before the write below.
    let (old_load, release) = blocked_load(&reg, "user:1", user(1, 1)).await;
    // The write: origin now holds version 2, then the key is invalidated.
    reg.invalidate("user:1").await.expect("invalidate");
    let fresh: Result<User, Infallible> =
        reg.get_or_load("user:1", || async { Ok(user(1, 2)) }).await;
    assert_eq!(
        fresh,
        Ok(user(1, 2)),
        "a read after the invalidation does not join the older load"
    );
    release.notify_one();
    assert_eq!(
        old_load.await.expect("task"),
        Ok(user(1, 1)),
        "its own caller still gets its value"
    );
    let later: Result<User, Infallible> =
        reg.get_or_load("user:1", || async { Ok(user(1, 3)) }).await;
    assert_eq!(
        later,
        Ok(user(1, 2)),
        "the detached load did not overwrite the fresh value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_of_an_unserved_pattern_removes_the_old_copy() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["user"], Some(server.url())).await;
    let calls = AtomicUsize::new(0);
    load(&reg, 1, &calls).await;
    reg.switch(&switch(CacheImpl::Redis, &[]))
        .await
        .expect("unwhitelist");
    reg.set("user:1", &user(1, 2))
        .await
        .expect("set while observed");
    reg.switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect("whitelist again");
    let v: Result<User, Infallible> = reg.get_or_load("user:1", || async { Ok(user(1, 2)) }).await;
    assert_eq!(v, Ok(user(1, 2)), "the copy stored before the set is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_added_later_finds_nothing_older_than_its_writes() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["user", "project"], Some(server.url())).await;
    let v = |version: u64| move || async move { Ok::<_, Infallible>(user(1, version)) };
    assert_eq!(reg.get_or_load("project:1", v(1)).await, Ok(user(1, 1)));
    reg.switch(&switch(CacheImpl::Null, &[]))
        .await
        .expect("to null");
    reg.invalidate("project:1")
        .await
        .expect("a write while Redis is not active");
    reg.switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect("redis, user only");
    reg.switch(&switch(CacheImpl::Redis, &["user", "project"]))
        .await
        .expect("add project");
    assert_eq!(reg.get_or_load("project:1", v(2)).await, Ok(user(1, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_switches_both_apply() {
    let reg = registry(CacheImpl::Memory, &[], None).await;
    let a = {
        let reg = reg.clone();
        tokio::spawn(async move {
            reg.switch(&PolicyUpdate {
                whitelist: Some(vec!["user".into()]),
                ..PolicyUpdate::default()
            })
            .await
        })
    };
    let b = {
        let reg = reg.clone();
        tokio::spawn(async move {
            let ttl = cache_rollout::PatternPolicy {
                ttl_secs: Some(42),
                ..Default::default()
            };
            reg.switch(&PolicyUpdate {
                patterns: Some([("user".to_string(), ttl)].into()),
                ..PolicyUpdate::default()
            })
            .await
        })
    };
    a.await.expect("task").expect("switch a");
    b.await.expect("task").expect("switch b");
    let p = reg.policy();
    assert_eq!(p.whitelist, ["user"]);
    assert_eq!(p.patterns["user"].ttl_secs, Some(42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_null_redis_null_under_load_fails_no_call() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Null, &[], Some(server.url())).await;
    let start_version = reg.state().await.version;
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (reg, stop, wrong, done) = (reg.clone(), stop.clone(), wrong.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            // Bounded in time (and in count, far above what the phases need).
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && i < 50_000_000 {
                let id = (w * 31 + i) % 50;
                let got: Result<User, String> = reg
                    .get_or_load(&format!("user:{id}"), || async { Ok(user(id, 1)) })
                    .await;
                if got != Ok(user(id, 1)) {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::task::yield_now().await;
            }
        }));
    }
    let phase = |d: &AtomicUsize| d.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = phase(&done);
    reg.switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect("to redis");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = phase(&done);
    let redis_hits = metric(
        &reg.metrics().render(),
        r#"cache_hits_total{impl="redis",key_pattern="user"}"#,
    );
    reg.switch(&switch(CacheImpl::Null, &[]))
        .await
        .expect("back to null");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = phase(&done);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker never panics");
    }
    assert!(
        before > 0 && during > before && after > during,
        "calls ran in every phase: {before} {during} {after}"
    );
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "every call returned the loader's value"
    );
    assert!(redis_hits > 0.0, "Redis served hits while it was on");
    let state = reg.state().await;
    assert_eq!(state.cache_impl, CacheImpl::Null);
    assert_eq!(state.version, start_version + 2, "two successful swaps");
    for t in ["connection", "timeout", "redis", "corrupt"] {
        assert_eq!(reg.metrics().errors(CacheImpl::Redis, t), 0, "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_times_out_to_the_loader_and_recovers() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["user"], Some(server.url())).await;
    let calls = AtomicUsize::new(0);
    load(&reg, 1, &calls).await;
    load(&reg, 1, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "cached");

    server.pause(); // SIGSTOP: connections stay open, nothing answers
    for _ in 0..5 {
        assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "every call fell back to the loader"
    );
    assert!(
        reg.metrics().errors(CacheImpl::Redis, "timeout") >= 5,
        "each stalled read timed out"
    );
    server.resume();

    hits_resume(&reg, &calls, "after SIGCONT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_values_carry_the_pattern_ttl() {
    let server = RedisServer::start();
    let mut opts = options(CacheImpl::Redis, &["*"], Some(server.url()));
    opts.policy.patterns = [(
        "user".to_string(),
        cache_rollout::PatternPolicy {
            ttl_secs: Some(60),
            ..Default::default()
        },
    )]
    .into();
    let reg = CacheRegistry::new(opts).await.expect("registry");
    let calls = AtomicUsize::new(0);
    load(&reg, 1, &calls).await;
    let _: Result<u8, Infallible> = reg.get_or_load("project:1", || async { Ok(1) }).await;
    let mut raw = server.conn();
    let user_ttl: i64 = redis::cmd("PTTL")
        .arg("cr:user:1")
        .query(&mut raw)
        .expect("pttl");
    let project_ttl: i64 = redis::cmd("PTTL")
        .arg("cr:project:1")
        .query(&mut raw)
        .expect("pttl");
    assert!(
        (50_000..=60_000).contains(&user_ttl),
        "user: its own TTL of 60 s, found {user_ttl} ms"
    );
    assert!(
        (290_000..=300_000).contains(&project_ttl),
        "project: the default 300 s, found {project_ttl} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_patterns_during_switches_keep_their_own_counts() {
    let reg = registry(CacheImpl::Null, &[], None).await;
    let switcher = {
        let reg = reg.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let cache_impl = if i % 2 == 0 {
                    CacheImpl::Memory
                } else {
                    CacheImpl::Null
                };
                reg.switch(&switch(cache_impl, &["p1", "p7"]))
                    .await
                    .expect("switch");
                tokio::task::yield_now().await;
            }
        })
    };
    let mut callers = Vec::new();
    for t in 0..4u64 {
        let reg = reg.clone();
        callers.push(tokio::spawn(async move {
            for round in 0..5u64 {
                for p in 0..30u64 {
                    let key = format!("p{p}:{}", t * 1000 + round);
                    let _: Result<u64, Infallible> =
                        reg.get_or_load(&key, || async { Ok(p) }).await;
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for c in callers {
        c.await.expect("caller");
    }
    switcher.await.expect("switcher");
    let counts = reg.pattern_counts();
    assert_eq!(counts.len(), 30, "{:?}", counts.keys().collect::<Vec<_>>());
    for p in 0..30 {
        assert_eq!(
            counts[&format!("p{p}")].gets,
            20,
            "p{p}: 4 tasks x 5 rounds, no counts lost or shared"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_every_pattern_detaches_every_load_in_flight() {
    let reg = registry(CacheImpl::Memory, &["*"], None).await;
    let (old_load, release) = blocked_load(&reg, "user:1", user(1, 1)).await;
    reg.invalidate_pattern("*").await.expect("flush everything");
    release.notify_one();
    assert_eq!(old_load.await.expect("task"), Ok(user(1, 1)));
    let later: Result<User, Infallible> =
        reg.get_or_load("user:1", || async { Ok(user(1, 2)) }).await;
    assert_eq!(
        later,
        Ok(user(1, 2)),
        "the load that began before the flush was not stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_key_prefix_is_refused() {
    let server = RedisServer::start();
    let mut opts = options(CacheImpl::Null, &["user"], Some(server.url()));
    opts.redis.key_prefix = String::new();
    let reg = CacheRegistry::new(opts).await.expect("registry");
    let e = reg
        .switch(&switch(CacheImpl::Redis, &["user"]))
        .await
        .expect_err("empty prefix");
    assert!(e.to_string().contains("key_prefix"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_writes_with_oom_fails_no_call_and_recovers() {
    // `maxmemory` with `noeviction`: once over it, Redis answers every SET with an OOM error (reads still work).
    // A limit of one byte puts it over at once, whatever the baseline.
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let reg = registry(CacheImpl::Redis, &["user"], Some(server.url())).await;
    let mut conn = server.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query(&mut conn)
        .expect("config set");
    let calls = AtomicUsize::new(0);
    for id in 0..20 {
        assert_eq!(
            load(&reg, id, &calls).await,
            user(id, 1),
            "the loader's value"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    assert!(
        reg.metrics().errors(CacheImpl::Redis, "redis") >= 20,
        "each refused SET counted"
    );
    for id in 0..20 {
        load(&reg, id, &calls).await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        40,
        "nothing was stored, nothing is served stale"
    );

    // Room again: values are stored and served.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut conn)
        .expect("config set");
    load(&reg, 1, &calls).await;
    load(&reg, 1, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 41, "stored, then a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_falls_back_to_the_loader_and_recovers() {
    let server = RedisServer::start();
    let reg = registry(CacheImpl::Redis, &["user"], Some(server.url())).await;
    let calls = AtomicUsize::new(0);
    load(&reg, 1, &calls).await;
    load(&reg, 1, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "cached");

    // CLIENT PAUSE holds every client's commands (the connection stays up) for 2 s.
    let mut conn = server.conn();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("ALL")
        .query(&mut conn)
        .expect("pause");
    for _ in 0..3 {
        assert_eq!(load(&reg, 1, &calls).await, user(1, 1));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "every paused read fell back to the loader"
    );
    assert!(
        reg.metrics().errors(CacheImpl::Redis, "timeout") >= 3,
        "counted as timeouts"
    );

    hits_resume(&reg, &calls, "after the pause").await;
}
