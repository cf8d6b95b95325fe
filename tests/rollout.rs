//! Phase 3 made safe, against a real `redis-server` started by `support`: ramps, shadow mode, automatic rollback,
//! read deadlines, leases (no stale sets, no thundering herd), tags, and the faults a Redis can have.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_rollout::cache::{CacheImpl, RedisOptions};
use cache_rollout::registry::SwapSource;
use cache_rollout::rollout::{ramp_hash, BreakerState};
use cache_rollout::{
    CacheRegistry, Mode, PatternPolicy, Policy, PolicyUpdate, RegistryOptions, RollbackRules,
};
use serde::{Deserialize, Serialize};
use support::{metric, RedisCluster, RedisServer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    id: u64,
    version: u64,
}

/// Rollback rules that act within a test's few seconds.
fn quick_rules() -> RollbackRules {
    RollbackRules {
        window_secs: 2,
        min_calls: 20,
        // The faults trip the error and timeout rules; a p99 rule at 25 ms would also trip on the stalls of a
        // busy 2-core machine running these tests in parallel.
        max_p99_ms: 1000.0,
        cooldown_secs: 1,
        probe_percent: 50.0,
        probe_calls: 20,
        ..RollbackRules::default()
    }
}

/// Options for tests that are not about deadlines or rollbacks: this shared VM stalls a process for 100 ms now and
/// then, which a 50 ms deadline or a p99 rule would (rightly) act on. Fault tests set their own.
fn options(
    cache_impl: CacheImpl,
    url: &str,
    patterns: &[(&str, PatternPolicy)],
) -> RegistryOptions {
    RegistryOptions::default()
        .with_policy(Policy {
            cache_impl,
            whitelist: vec!["item".into()],
            patterns: patterns
                .iter()
                .map(|(p, s)| (p.to_string(), s.clone()))
                .collect(),
            rollback: RollbackRules {
                enabled: false,
                ..quick_rules()
            },
            read_timeout_ms: 2000,
            ..Policy::default()
        })
        .with_redis(
            RedisOptions::default()
                .with_url(url.to_string())
                .with_connect_timeout(Duration::from_millis(1000))
                .with_response_timeout(Duration::from_millis(200)),
        )
}

async fn registry(opts: RegistryOptions) -> CacheRegistry {
    let cache_impl = opts.policy.cache_impl;
    let reg = CacheRegistry::new(opts).await.expect("registry");
    // A loaded CI machine can miss the first connection's deadline; the registry then observes and retries every
    // 5 s (its documented start-up behaviour), so wait for that retry rather than failing on the first try.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reg.policy().cache_impl != cache_impl && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reg.policy().cache_impl,
        cache_impl,
        "the backend is reachable"
    );
    reg
}

fn pattern(mode: Mode, ramp: f64) -> PatternPolicy {
    PatternPolicy {
        mode: Some(mode),
        ramp_percent: Some(ramp),
        ..PatternPolicy::default()
    }
}

/// A tiny deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The origin of the history checker: per key, the version the origin holds, and the highest version whose
/// invalidation has returned (a read that starts after that must see at least it).
struct Origin {
    versions: Vec<AtomicU64>,
    committed: Vec<AtomicU64>,
    loads: AtomicUsize,
    /// Readers store `item:k` under the tag `row:k`, and writers invalidate that tag instead of the key.
    tagged: bool,
}

impl Origin {
    fn new(keys: usize) -> Arc<Self> {
        Self::with_tags(keys, false)
    }

    fn with_tags(keys: usize, tagged: bool) -> Arc<Self> {
        Arc::new(Origin {
            versions: (0..keys).map(|_| AtomicU64::new(1)).collect(),
            committed: (0..keys).map(|_| AtomicU64::new(1)).collect(),
            loads: AtomicUsize::new(0),
            tagged,
        })
    }
}

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    writes: AtomicU64,
    stale: AtomicU64,
    /// Largest call duration during the fault, in microseconds.
    max_fault_micros: AtomicU64,
}

/// One reader call: reads key `k` through `reg`, the loader reading the origin and then pausing up to
/// `pause_micros` (which widens the window in which a write can slip in before the value would be stored).
async fn read(
    reg: &CacheRegistry,
    origin: &Origin,
    tally: &Tally,
    k: usize,
    pause_micros: u64,
) -> Duration {
    let floor = origin.committed[k].load(Ordering::SeqCst);
    let start = Instant::now();
    let tag = format!("row:{k}");
    let tags: &[&str] = if origin.tagged { &[&tag] } else { &[] };
    let got: Result<Item, Infallible> = reg
        .get_or_load_tagged(&format!("item:{k}"), tags, || async {
            origin.loads.fetch_add(1, Ordering::Relaxed);
            let v = origin.versions[k].load(Ordering::SeqCst);
            if pause_micros > 0 {
                tokio::time::sleep(Duration::from_micros(pause_micros)).await;
            }
            Ok(Item {
                id: k as u64,
                version: v,
            })
        })
        .await;
    let took = start.elapsed();
    let item = got.expect("infallible loader");
    assert_eq!(item.id, k as u64, "the value of another key");
    tally.reads.fetch_add(1, Ordering::Relaxed);
    if item.version < floor {
        tally.stale.fetch_add(1, Ordering::Relaxed);
    }
    took
}

/// One writer step: a new version at the origin, then the invalidation, retried until it succeeds (an
/// invalidation that failed has not committed: the caller knows, see `invalidate`'s docs).
async fn write(reg: &CacheRegistry, origin: &Origin, tally: &Tally, k: usize) {
    let v = origin.versions[k].fetch_add(1, Ordering::SeqCst) + 1;
    loop {
        let done = if origin.tagged {
            reg.invalidate_tag(&format!("row:{k}")).await.map(|_| ())
        } else {
            reg.invalidate(&format!("item:{k}")).await.map(|_| ())
        };
        if done.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    origin.committed[k].fetch_max(v, Ordering::SeqCst);
    tally.writes.fetch_add(1, Ordering::Relaxed);
}

/// Randomized concurrent history check: `readers` tasks per registry and `writers` tasks share `keys` keys for
/// `ops` reads; every read is checked against the versions whose invalidation had returned when it started.
/// The history checks run one at a time: each drives 16 or more tasks (and on a cluster six redis-servers) flat out,
/// and two at once on a two-core machine starve each other's Redis replies past their deadlines.
static ONE_HISTORY_CHECK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn history_check(regs: &[CacheRegistry], keys: usize, ops: u64, seed: u64) -> Arc<Tally> {
    history_run(regs, keys, Arc::new(AtomicU64::new(ops)), seed, false).await
}

/// [`history_check`] until `limit` reads, a limit the caller may change while it runs.
async fn history_run(
    regs: &[CacheRegistry],
    keys: usize,
    limit: Arc<AtomicU64>,
    seed: u64,
    tagged: bool,
) -> Arc<Tally> {
    let origin = Origin::with_tags(keys, tagged);
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (r, reg) in regs.iter().enumerate() {
        for t in 0..4u64 {
            let (reg, origin, tally, done, limit) = (
                reg.clone(),
                origin.clone(),
                tally.clone(),
                done.clone(),
                limit.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(seed ^ ((r as u64 + 1) << 32) ^ (t + 1));
                while done.fetch_add(1, Ordering::Relaxed) < limit.load(Ordering::Relaxed) {
                    let k = rng.below(keys as u64) as usize;
                    let pause = if rng.below(4) == 0 {
                        rng.below(1500)
                    } else {
                        0
                    };
                    read(&reg, &origin, &tally, k, pause).await;
                    // An L1 hit never waits: without this, readers would starve the writers of the runtime.
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let (reg, origin, tally, stop) = (
            regs[w as usize % regs.len()].clone(),
            origin.clone(),
            tally.clone(),
            stop.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ 0xABCD ^ w);
            while !stop.load(Ordering::Relaxed) {
                write(&reg, &origin, &tally, rng.below(keys as u64) as usize).await;
                tokio::time::sleep(Duration::from_micros(200 + rng.below(800))).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("reader");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_value_is_ever_read_after_an_invalidation_returned() {
    let _alone = ONE_HISTORY_CHECK_AT_A_TIME.lock().await;
    let server = RedisServer::start();
    // Two registries with their own connections and single-flight tables: two processes sharing one Redis.
    let a = registry(options(CacheImpl::Redis, &server.url(), &[])).await;
    let b = registry(options(CacheImpl::Redis, &server.url(), &[])).await;
    let tally = history_check(&[a.clone(), b.clone()], 16, 12_000, 0x5EED).await;
    let (reads, writes, stale) = (
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    assert!(
        reads >= 12_000 && writes > 100,
        "{reads} reads, {writes} writes"
    );
    assert_eq!(stale, 0, "stale reads in {reads} reads and {writes} writes");
    let series = r#"cache_lease_total{impl="redis",result="revoked"}"#;
    let revoked = metric(&a.metrics().render(), series) + metric(&b.metrics().render(), series);
    let hits = a.pattern_counts()["item"].hits + b.pattern_counts()["item"].hits;
    eprintln!(
        "{reads} reads, {writes} writes, {hits} hits, {revoked}+ fills refused by a revoked lease"
    );
    assert!(hits > 1000, "the cache served: {hits} hits");
    assert!(
        revoked >= 1.0,
        "the race the leases exist for happened during the test (a fill refused)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_value_on_a_cluster_even_when_a_primary_is_killed_during_load() {
    let _alone = ONE_HISTORY_CHECK_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start();
    let mut o = options(CacheImpl::Redis, &cluster.url(), &[]);
    // Every write and invalidation is on a replica before it returns, so the replica that takes over from a killed
    // primary never brings back a value an invalidation removed.
    o.redis.wait_replicas = 1;
    let a = registry(o.clone()).await;
    let b = registry(o).await;
    let regs = vec![a.clone(), b.clone()];

    // Without a fault first.
    let tally = history_check(&regs, 16, 8_000, 0xC1A5).await;
    let (reads, writes, stale) = (
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    let hits = a.pattern_counts()["item"].hits + b.pattern_counts()["item"].hits;
    eprintln!("cluster: {reads} reads, {writes} writes, {hits} hits");
    assert_eq!(stale, 0, "stale reads in {reads} reads and {writes} writes");
    assert!(hits > 500, "the cluster served: {hits} hits");

    // The same with tags, whose sets live in other slots than their keys: every value is stored under a tag, and
    // every write invalidates the tag, not the key.
    let revoked = |r: &CacheRegistry| {
        metric(
            &r.metrics().render(),
            r#"cache_lease_total{impl="redis",result="revoked"}"#,
        )
    };
    let revoked_before = revoked(&a) + revoked(&b);
    // The first run's entries carry no tag (a tag invalidation would never reach them): start empty.
    a.invalidate_pattern("item")
        .await
        .expect("invalidate_pattern");
    let limit = Arc::new(AtomicU64::new(8_000));
    let tally = history_run(&regs, 16, limit, 0x7A65, true).await;
    let (reads, writes, stale) = (
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    let refused = revoked(&a) + revoked(&b) - revoked_before;
    eprintln!("cluster, tags: {reads} reads, {writes} writes, {refused} fills refused by a tag invalidation");
    assert_eq!(
        stale, 0,
        "stale reads in {reads} reads and {writes} tag invalidations"
    );
    assert!(writes > 100, "{writes} tag invalidations");

    // Then a primary SIGKILLed under load. Its replica takes over after the node timeout; the killed node comes
    // back (empty) and rejoins as the new primary's replica. The load runs through all of it.
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    let load = {
        let (regs, limit) = (regs.clone(), limit.clone());
        tokio::spawn(async move { history_run(&regs, 16, limit, 0xDEAD, false).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = cluster.primaries()[0];
    let killed = Instant::now();
    cluster.nodes[victim].kill();
    tokio::task::block_in_place(|| cluster.wait_ok(Duration::from_secs(30)));
    let failover = killed.elapsed();
    tokio::task::block_in_place(|| {
        cluster.nodes[victim].restart();
        cluster.wait_ok(Duration::from_secs(30));
    });
    let rejoined = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hits_before = a.pattern_counts()["item"].hits + b.pattern_counts()["item"].hits;
    tokio::time::sleep(Duration::from_secs(1)).await;
    limit.store(0, Ordering::Relaxed);
    let tally = load.await.expect("load");
    let (reads, writes, stale) = (
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    let hits_after = a.pattern_counts()["item"].hits + b.pattern_counts()["item"].hits;
    eprintln!(
        "primary killed: failover after {failover:?}, rejoined after {rejoined:?}; {reads} reads, {writes} writes, \
         {} hits in the last second",
        hits_after - hits_before
    );
    assert_eq!(
        stale, 0,
        "stale reads in {reads} reads and {writes} writes across the failover"
    );
    assert!(
        writes > 100 && reads > 1000,
        "{reads} reads, {writes} writes"
    );
    assert!(
        hits_after - hits_before > 100,
        "the cache serves again after the failover: {} hits in the last second",
        hits_after - hits_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_in_process_cache_passes_the_history_check_too() {
    let _alone = ONE_HISTORY_CHECK_AT_A_TIME.lock().await;
    let reg = registry(options(CacheImpl::Memory, "redis://127.0.0.1:1", &[])).await;
    let tally = history_check(std::slice::from_ref(&reg), 16, 10_000, 0xF00D).await;
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0);
    assert!(reg.pattern_counts()["item"].hits > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_key_is_loaded_once_per_process_and_once_across_processes_with_a_lease() {
    let server = RedisServer::start();
    let mut regs = Vec::new();
    for _ in 0..4 {
        let mut opts = options(CacheImpl::Redis, &server.url(), &[]);
        // 400 callers on a shared 2-core machine in a debug build: a deadline this test is not about.
        opts.policy.read_timeout_ms = 2000;
        opts.policy.lease_wait_ms = 2000;
        regs.push(registry(opts).await);
    }
    let loads: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for (reg, loads) in regs.iter().zip(&loads) {
        for _ in 0..100 {
            let (reg, loads) = (reg.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                reg.get_or_load("item:1", || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    Ok::<_, Infallible>(Item { id: 1, version: 7 })
                })
                .await
            }));
        }
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("task"),
            Ok(Item { id: 1, version: 7 }),
            "every caller gets the value"
        );
    }
    let per: Vec<usize> = loads.iter().map(|l| l.load(Ordering::SeqCst)).collect();
    let total: usize = per.iter().sum();
    eprintln!("origin loads per process: {per:?}");
    assert!(per.iter().all(|&n| n <= 1), "single-flight: {per:?}");
    assert!(
        total <= 2,
        "the lease lets one process load for all: {per:?}"
    );
    let waited: f64 = regs
        .iter()
        .map(|r| {
            metric(
                &r.metrics().render(),
                r#"cache_lease_total{impl="redis",result="waited"}"#,
            )
        })
        .sum();
    assert!(waited >= 1.0, "the other processes waited for the fill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_serves_only_its_keys_and_reports_both_arms() {
    let server = RedisServer::start();
    let reg = registry(options(
        CacheImpl::Redis,
        &server.url(),
        &[("item", pattern(Mode::Serve, 30.0))],
    ))
    .await;
    let origin = Origin::new(1000);
    let tally = Tally::default();
    for _pass in 0..2 {
        for k in 0..1000 {
            read(&reg, &origin, &tally, k, 0).await;
        }
    }
    let threshold = (0.30 * 2f64.powi(64)) as u64;
    let in_ramp = (0..1000)
        .filter(|k| ramp_hash(&format!("item:{k}")) < threshold)
        .count() as u64;
    let counts = reg.pattern_counts()["item"];
    assert_eq!(
        counts.hits, in_ramp,
        "exactly the ramped keys hit on the second pass"
    );
    assert!(
        (250..350).contains(&in_ramp),
        "{in_ramp} keys of 1000 in a 30% ramp"
    );
    let state = reg.state().await;
    let view = &state.routes["item"];
    assert_eq!(view.mode, Mode::Serve);
    assert_eq!(view.ramped.calls, 2 * in_ramp);
    assert_eq!(view.unramped.calls, 2000 - 2 * in_ramp);
    assert!((view.ramped.hit_ratio.expect("calls") - 0.5).abs() < 1e-9);
    assert_eq!(view.unramped.hit_ratio, Some(0.0));
    assert!(view.ramped.p99_le_ms.is_some() && view.unramped.mean_ms.is_some());
    let text = reg.metrics().render();
    assert_eq!(
        metric(
            &text,
            r#"cache_call_duration_seconds_count{arm="ramped",key_pattern="item"}"#
        ),
        (2 * in_ramp) as f64
    );

    // Raising the ramp keeps every ramped key cached and adds others.
    reg.switch(&PolicyUpdate {
        patterns: Some(BTreeMap::from([(
            "item".into(),
            pattern(Mode::Serve, 60.0),
        )])),
        ..PolicyUpdate::default()
    })
    .await
    .expect("switch");
    let loads_before = origin.loads.load(Ordering::Relaxed);
    for k in 0..1000 {
        read(&reg, &origin, &tally, k, 0).await;
    }
    let loaded = (origin.loads.load(Ordering::Relaxed) - loads_before) as u64;
    assert_eq!(
        loaded,
        1000 - in_ramp,
        "the 30% keys are still cached at 60%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_serves_the_loader_compares_and_rolls_back_on_mismatches() {
    let server = RedisServer::start();
    let mut opts = options(
        CacheImpl::Redis,
        &server.url(),
        &[("item", pattern(Mode::Shadow, 100.0))],
    );
    // Only the mismatch rule: a stall of this shared machine must not trip another one first.
    opts.policy.rollback = RollbackRules {
        max_error_rate: 1.0,
        max_timeout_rate: 1.0,
        max_p99_ms: 60_000.0,
        ..quick_rules()
    };
    let reg = registry(opts).await;
    let origin = Origin::new(40);
    let tally = Tally::default();
    for k in 0..40 {
        read(&reg, &origin, &tally, k, 0).await;
    }
    // The fills run in the background: wait until they are all in Redis.
    let mut conn = server.conn();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut exists = redis::cmd("EXISTS");
    for k in 0..40 {
        exists.arg(format!("cr:item:{k}"));
    }
    while exists.query::<u64>(&mut conn).expect("exists") < 40 {
        assert!(Instant::now() < deadline, "shadow fills did not arrive");
        std::thread::sleep(Duration::from_millis(10));
    }
    for k in 0..40 {
        read(&reg, &origin, &tally, k, 0).await;
    }
    assert_eq!(
        origin.loads.load(Ordering::Relaxed),
        80,
        "shadow always loads"
    );
    assert_eq!(reg.pattern_counts()["item"].hits, 0, "and never serves");
    let shadow = reg.state().await.routes["item"].shadow.clone();
    assert_eq!(shadow["miss"], 40);
    assert_eq!(shadow["match"], 40);

    // The origin changes behind the cache's back (no invalidation): every comparison now differs.
    for v in &origin.versions {
        v.fetch_add(1, Ordering::SeqCst);
    }
    for k in 0..40 {
        let _ = read(&reg, &origin, &tally, k, 0).await;
    }
    assert_eq!(
        tally.stale.load(Ordering::Relaxed),
        0,
        "the caller always had the loader's value"
    );
    // A difference is confirmed by a second read in the background before it counts: wait for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    while reg.state().await.routes["item"].breaker.is_none() {
        assert!(
            Instant::now() < deadline,
            "no rollback after the mismatches"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = reg.state().await;
    let view = &state.routes["item"];
    // 1 mismatch in 41 comparisons is over the 1% bound: the first one trips the rule.
    assert!(view.shadow["mismatch"] >= 1, "{:?}", view.shadow);
    let breaker = view.breaker.as_ref().expect("rolled back");
    assert_eq!(breaker.state, BreakerState::Open);
    assert_eq!(view.mode, Mode::Observe, "back to observe");
    assert!(state.swaps.iter().any(|s| s.source == SwapSource::Rollback
        && s.reason.as_deref() == Some("item: mismatch_rate -> observe")));
    assert_eq!(
        metric(
            &reg.metrics().render(),
            r#"cache_rollback_total{impl="redis",key_pattern="item",reason="mismatch_rate"}"#
        ),
        1.0
    );

    // Configuration brings it back at once.
    reg.switch(&PolicyUpdate {
        patterns: Some(BTreeMap::from([(
            "item".into(),
            pattern(Mode::Serve, 100.0),
        )])),
        ..PolicyUpdate::default()
    })
    .await
    .expect("switch");
    let view = &reg.state().await.routes["item"];
    assert!(view.breaker.is_none());
    assert_eq!(view.mode, Mode::Serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_invalidate_their_entries_and_revoke_loads_in_flight() {
    let server = RedisServer::start();
    for cache_impl in [CacheImpl::Redis, CacheImpl::Memory] {
        let reg = registry(options(cache_impl, &server.url(), &[])).await;
        let loads = AtomicUsize::new(0);
        let get = |k: u64, tags: &'static [&'static str]| {
            let (reg, loads) = (&reg, &loads);
            async move {
                reg.get_or_load_tagged(&format!("item:{k}"), tags, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(Item { id: k, version: 1 })
                })
                .await
                .expect("infallible")
            }
        };
        get(1, &["team:7"]).await;
        get(2, &["team:7", "org:1"]).await;
        get(3, &["org:1"]).await;
        reg.set_tagged("item:4", &Item { id: 4, version: 1 }, &["team:7"])
            .await
            .expect("set");
        get(1, &["team:7"]).await;
        assert_eq!(loads.load(Ordering::SeqCst), 3, "{cache_impl}: cached");
        assert_eq!(
            reg.invalidate_tag("team:7").await.expect("invalidate"),
            3,
            "{cache_impl}"
        );
        get(1, &["team:7"]).await;
        get(2, &["team:7", "org:1"]).await;
        get(3, &["org:1"]).await;
        assert_eq!(
            loads.load(Ordering::SeqCst),
            5,
            "{cache_impl}: 1 and 2 reloaded, 3 kept"
        );
        assert!(
            reg.invalidate_tag("bad tag").await.is_err(),
            "a tag follows the key rules"
        );
        for i in 0..40 {
            reg.invalidate_tag(&format!("t{i}"))
                .await
                .expect("invalidate");
        }
        let text = reg.metrics().render();
        let tag_series = text
            .lines()
            .filter(|l| l.starts_with("cache_invalidate_total{"))
            .filter(|l| !l.contains(r#"tag="key""#) && !l.contains(r#"tag="pattern""#))
            .count();
        assert!(
            tag_series <= 32 + 1,
            "{cache_impl}: tag labels are bounded: {tag_series}"
        );
        assert!(
            metric(
                &text,
                &format!(r#"cache_invalidate_total{{impl="{cache_impl}",tag="other"}}"#)
            ) >= 8.0
        );
        assert_eq!(
            metric(
                &text,
                &format!(r#"cache_invalidate_total{{impl="{cache_impl}",tag="team:7"}}"#)
            ),
            1.0
        );
    }

    // Another process invalidates the tag while this one loads: the fill is refused, the old value never stored.
    let a = registry(options(CacheImpl::Redis, &server.url(), &[])).await;
    let b = registry(options(CacheImpl::Redis, &server.url(), &[])).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let task = {
        let (a, release) = (a.clone(), release.clone());
        tokio::spawn(async move {
            a.get_or_load_tagged("item:9", &["team:9"], || async move {
                let _ = started_tx.send(());
                release.notified().await;
                Ok::<_, Infallible>(Item { id: 9, version: 1 })
            })
            .await
        })
    };
    started_rx.await.expect("loading");
    b.invalidate_tag("team:9").await.expect("invalidate");
    release.notify_one();
    assert_eq!(task.await.expect("task"), Ok(Item { id: 9, version: 1 }));
    let mut conn = server.conn();
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg("cr:item:9")
        .query(&mut conn)
        .expect("get");
    assert_eq!(stored, None, "the revoked fill stored nothing");
    assert_eq!(
        metric(
            &a.metrics().render(),
            r#"cache_lease_total{impl="redis",result="revoked"}"#
        ),
        1.0
    );
}

/// What happens to Redis in a fault test.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL, down for 2 s, then started again, empty.
    Killed,
    /// SIGSTOP for 3 s, then SIGCONT.
    Stopped,
    /// SIGKILL and started again at once, empty.
    RestartedEmpty,
}

/// Runs readers and a writer through a fault, then checks: no failed call, no stale read, the fault counted, a
/// rollback that closes again, and hits after the fault.
async fn fault_test(fault: Fault) {
    let mut server = RedisServer::start();
    let mut opts = options(CacheImpl::Redis, &server.url(), &[]);
    opts.policy.rollback = quick_rules();
    opts.policy.read_timeout_ms = 50;
    let reg = registry(opts).await;
    let origin = Origin::new(50);
    let tally = Arc::new(Tally::default());
    let in_fault = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (reg, origin, tally, in_fault, stop) = (
            reg.clone(),
            origin.clone(),
            tally.clone(),
            in_fault.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xFA17 + t);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 2_000_000 {
                n += 1;
                let k = rng.below(50) as usize;
                let took = read(&reg, &origin, &tally, k, 0).await;
                if in_fault.load(Ordering::Relaxed) {
                    tally
                        .max_fault_micros
                        .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }));
    }
    let writer = {
        let (reg, origin, tally, stop) = (reg.clone(), origin.clone(), tally.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = Rng(0x3141);
            while !stop.load(Ordering::Relaxed) {
                write(&reg, &origin, &tally, rng.below(50) as usize).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Served before the fault (bounded wait: on a busy machine a stall can trip a rule early, and the breaker
    // then needs its cool-down and probe first).
    let ready = Instant::now() + Duration::from_secs(20);
    while reg.pattern_counts().get("item").map_or(0, |c| c.hits) <= 200 {
        assert!(
            Instant::now() < ready,
            "{fault:?}: nothing served before the fault"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    in_fault.store(true, Ordering::Relaxed);
    match fault {
        Fault::Killed => {
            server.kill();
            tokio::time::sleep(Duration::from_secs(2)).await;
            server.restart();
        }
        Fault::Stopped => {
            server.pause();
            tokio::time::sleep(Duration::from_secs(3)).await;
            server.resume();
        }
        Fault::RestartedEmpty => server.restart(),
    }
    in_fault.store(false, Ordering::Relaxed);
    let after = Instant::now();
    // Recovery: the breaker (if it tripped) closes through its half-open probe, and hits resume.
    let deadline = after + Duration::from_secs(30);
    let hits_at = reg.pattern_counts()["item"].hits;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let state = reg.state().await;
        let closed = state.routes["item"].breaker.is_none();
        if closed && reg.pattern_counts()["item"].hits > hits_at + 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{fault:?}: no recovery: breaker {:?}",
            state.routes["item"].breaker
        );
    }
    eprintln!("{fault:?}: recovered in {:?}", after.elapsed());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("no call failed or panicked");
    }
    writer.await.expect("writer");
    let text = reg.metrics().render();
    let errors: f64 = ["connection", "timeout", "redis"]
        .iter()
        .map(|t| {
            metric(
                &text,
                &format!(r#"cache_errors_total{{error_type="{t}",impl="redis"}}"#),
            )
        })
        .sum();
    let reads = tally.reads.load(Ordering::Relaxed);
    let max_fault_ms = tally.max_fault_micros.load(Ordering::Relaxed) as f64 / 1e3;
    eprintln!(
        "{fault:?}: {reads} reads, {} writes, {errors} errors counted, slowest call during the fault {max_fault_ms} ms",
        tally.writes.load(Ordering::Relaxed)
    );
    assert_eq!(
        tally.stale.load(Ordering::Relaxed),
        0,
        "{fault:?}: no stale value served"
    );
    if !matches!(fault, Fault::RestartedEmpty) {
        assert!(errors > 0.0, "{fault:?}: the fault is counted");
        let rollbacks: f64 = ["error_rate", "timeout_rate", "p99_latency"]
            .iter()
            .map(|r| {
                metric(
                    &text,
                    &format!(
                        r#"cache_rollback_total{{impl="redis",key_pattern="item",reason="{r}"}}"#
                    ),
                )
            })
            .sum();
        assert!(rollbacks >= 1.0, "{fault:?}: the pattern was rolled back");
        let swaps = reg.state().await.swaps;
        assert!(
            swaps
                .iter()
                .any(|s| s.reason.as_deref() == Some("item: probe passed -> closed")),
            "{fault:?}: the breaker closed again: {swaps:?}"
        );
    }
    if matches!(fault, Fault::Stopped) {
        // The read deadline is 50 ms; the loader is immediate. Generous slack for a shared 2-core machine.
        assert!(
            max_fault_ms < 50.0 + 250.0,
            "a stopped Redis added more than its deadline: {max_fault_ms} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_load_fails_no_call_rolls_back_and_recovers() {
    fault_test(Fault::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_3_s_adds_at_most_the_deadline_and_recovers() {
    fault_test(Fault::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_serves_nothing_stale() {
    fault_test(Fault::RestartedEmpty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_deadline_bounds_reads_of_a_stopped_redis() {
    let server = RedisServer::start();
    let fast = PatternPolicy {
        read_timeout_ms: Some(20),
        ..PatternPolicy::default()
    };
    let opts = options(CacheImpl::Redis, &server.url(), &[("item", fast)]);
    let reg = registry(opts).await;
    let origin = Origin::new(4);
    let tally = Tally::default();
    read(&reg, &origin, &tally, 0, 0).await;
    server.pause();
    let mut slowest = Duration::ZERO;
    for k in 0..4 {
        slowest = slowest.max(read(&reg, &origin, &tally, k, 0).await);
    }
    server.resume();
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0);
    assert!(
        reg.metrics().errors(CacheImpl::Redis, "timeout") >= 4,
        "each read timed out"
    );
    eprintln!("slowest call with Redis stopped and a 20 ms deadline: {slowest:?}");
    assert!(slowest < Duration::from_millis(20 + 250), "{slowest:?}");
    let view = &reg.state().await.routes["item"];
    assert_eq!(view.read_timeout_ms, 20);
    assert!(view.window.timeouts >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impl_scope_rollback_switches_to_null_and_back_after_the_cool_down() {
    let server = RedisServer::start();
    let mut opts = options(CacheImpl::Redis, &server.url(), &[]);
    opts.policy.rollback = RollbackRules {
        scope: cache_rollout::RollbackScope::Impl,
        ..quick_rules()
    };
    opts.policy.read_timeout_ms = 50;
    let reg = registry(opts).await;
    let origin = Origin::new(10);
    let tally = Tally::default();
    for k in 0..10 {
        read(&reg, &origin, &tally, k, 0).await;
    }
    server.pause();
    let mut n = 0;
    while reg.policy().cache_impl == CacheImpl::Redis {
        read(&reg, &origin, &tally, n % 10, 0).await;
        n += 1;
        assert!(n < 2000, "no rollback after {n} timed-out reads");
        tokio::task::yield_now().await;
    }
    server.resume();
    let state = reg.state().await;
    assert_eq!(state.cache_impl, CacheImpl::Null);
    let last = state.swaps.last().expect("the rollback swap");
    assert_eq!(last.source, SwapSource::Rollback);
    assert!(
        last.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("item: timeout_rate") && r.ends_with("impl null")),
        "{last:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while reg.policy().cache_impl != CacheImpl::Redis {
        assert!(Instant::now() < deadline, "the impl did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tally.stale.load(Ordering::Relaxed), 0);
    assert_eq!(
        metric(
            &reg.metrics().render(),
            r#"cache_rollback_total{impl="redis",key_pattern="item",reason="timeout_rate"}"#
        ),
        1.0
    );
}

/// Options with an in-process L1 (60 s) in front of Redis for `item`.
fn l1_options(url: &str) -> RegistryOptions {
    let mut l1 = pattern(Mode::Serve, 100.0);
    l1.l1_ttl_secs = Some(60);
    options(CacheImpl::Redis, url, &[("item", l1)])
}

fn l1_count(reg: &CacheRegistry, result: &str) -> f64 {
    metric(
        &reg.metrics().render(),
        &format!(r#"cache_l1_total{{result="{result}"}}"#),
    )
}

/// Waits until every registry's L1 has subscribed to the invalidation channel (its first clear).
async fn l1_live(regs: &[CacheRegistry]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while regs.iter().any(|r| l1_count(r, "cleared") < 1.0) {
        assert!(Instant::now() < deadline, "the L1 did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `item:{k}` through `reg`, loading `version` from the shared origin; the version read.
async fn read_version(reg: &CacheRegistry, k: u64, version: &AtomicU64) -> u64 {
    let item: Result<Item, Infallible> = reg
        .get_or_load_tagged(&format!("item:{k}"), &["items"], || async {
            Ok(Item {
                id: k,
                version: version.load(Ordering::SeqCst),
            })
        })
        .await;
    item.expect("infallible").version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_l1_in_front_of_redis_passes_the_history_check() {
    let _alone = ONE_HISTORY_CHECK_AT_A_TIME.lock().await;
    let server = RedisServer::start();
    let reg = registry(l1_options(&server.url())).await;
    l1_live(std::slice::from_ref(&reg)).await;
    // L1 hits take microseconds: many reads, so that the writers (one write per ~0.7 ms) make enough changes.
    let tally = history_check(std::slice::from_ref(&reg), 16, 100_000, 0x11AA).await;
    let (reads, writes, stale) = (
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
    );
    let (hits, fills, skipped) = (
        l1_count(&reg, "hit"),
        l1_count(&reg, "fill"),
        l1_count(&reg, "skipped"),
    );
    eprintln!("L1: {reads} reads, {writes} writes, {hits} L1 hits, {fills} fills, {skipped} fills skipped");
    assert_eq!(stale, 0, "stale reads in {reads} reads and {writes} writes");
    assert!(writes > 100, "{writes} writes");
    assert!(hits > 1000.0, "the L1 served: {hits} hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_on_one_instance_reaches_every_instances_l1() {
    let mut server = RedisServer::start();
    let regs: Vec<CacheRegistry> =
        futures_util::future::join_all((0..3).map(|_| registry(l1_options(&server.url())))).await;
    l1_live(&regs).await;
    let version = AtomicU64::new(1);
    // Every instance holds item:1 in its L1: its second read is an L1 hit.
    for reg in &regs {
        assert_eq!(read_version(reg, 1, &version).await, 1);
        let before = l1_count(reg, "hit");
        assert_eq!(read_version(reg, 1, &version).await, 1);
        assert_eq!(l1_count(reg, "hit"), before + 1.0, "served from L1");
    }

    // Written on the origin, invalidated on instance 0: the other two drop their L1 copy when the message arrives.
    let mut lag = Vec::new();
    for (round, step) in ["key", "tag", "pattern"].into_iter().enumerate() {
        let new = version.fetch_add(1, Ordering::SeqCst) + 1;
        let by = &regs[round % 3];
        let t0 = Instant::now();
        match step {
            "key" => assert!(by.invalidate("item:1").await.expect("invalidate")),
            "tag" => assert_eq!(by.invalidate_tag("items").await.expect("invalidate_tag"), 1),
            _ => assert_eq!(
                by.invalidate_pattern("item")
                    .await
                    .expect("invalidate_pattern"),
                1
            ),
        }
        let returned = t0.elapsed();
        // The instance that invalidated never serves the old value.
        assert_eq!(read_version(by, 1, &version).await, new, "{}", step);
        for reg in &regs {
            let deadline = Instant::now() + Duration::from_secs(5);
            while read_version(reg, 1, &version).await != new {
                assert!(
                    Instant::now() < deadline,
                    "{}: an L1 kept the old value",
                    step
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let everywhere = t0.elapsed();
        lag.push((step, returned, everywhere));
        // And from then on, no instance serves the old value.
        for _ in 0..50 {
            for reg in &regs {
                assert_eq!(read_version(reg, 1, &version).await, new, "{}", step);
            }
        }
    }
    eprintln!("invalidation returned → every L1 without the old value: {lag:?}");
    for (what, _, everywhere) in &lag {
        assert!(
            *everywhere < Duration::from_secs(1),
            "{what}: {everywhere:?}"
        );
    }

    // Redis gone: the L1 stops being used (no message could reach it), and every read is the loader's.
    let hits_before: f64 = regs.iter().map(|r| l1_count(r, "hit")).sum();
    let cleared: Vec<f64> = regs.iter().map(|r| l1_count(r, "cleared")).collect();
    server.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while regs
        .iter()
        .zip(&cleared)
        .any(|(r, c)| l1_count(r, "cleared") < c + 1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the L1 did not notice the lost subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = version.fetch_add(1, Ordering::SeqCst) + 1;
    for reg in &regs {
        assert_eq!(
            read_version(reg, 1, &version).await,
            new,
            "the loader's value"
        );
    }
    let hits_after: f64 = regs.iter().map(|r| l1_count(r, "hit")).sum();
    assert_eq!(
        hits_after, hits_before,
        "no L1 hit without the subscription"
    );
    // Back: each L1 subscribes again (starting empty) and serves.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while regs
        .iter()
        .zip(&cleared)
        .any(|(r, c)| l1_count(r, "cleared") < c + 2.0)
    {
        assert!(Instant::now() < deadline, "the L1 did not subscribe again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for reg in &regs {
        let hits = l1_count(reg, "hit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while l1_count(reg, "hit") == hits {
            assert_eq!(read_version(reg, 1, &version).await, new);
            assert!(Instant::now() < deadline, "the L1 serves again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
