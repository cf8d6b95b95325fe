//! Phase 2: the estimators against exact LRU computed here, TTLs and invalidations, and the memory bound.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use cache_rollout::analysis::{key_hash, Access, AnalysisOptions, Shards};
use cache_rollout::replay::{self, Op, ReadOptions, ReplayOptions, TraceFormat, TraceReader};
use cache_rollout::{CacheRegistry, Policy, PolicyUpdate, RegistryOptions};

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/traces")
        .join(name)
}

/// An exact LRU cache of `capacity` objects: a get hits when the key is cached, a miss inserts it (evicting the
/// least recently used), a delete removes it.
struct ExactLru {
    capacity: usize,
    stamp: u64,
    by_key: HashMap<String, u64>,
    by_stamp: BTreeMap<u64, String>,
    gets: u64,
    hits: u64,
}

impl ExactLru {
    fn new(capacity: usize) -> Self {
        ExactLru {
            capacity,
            stamp: 0,
            by_key: HashMap::new(),
            by_stamp: BTreeMap::new(),
            gets: 0,
            hits: 0,
        }
    }

    fn touch(&mut self, key: &str) {
        self.stamp += 1;
        if let Some(old) = self.by_key.insert(key.to_string(), self.stamp) {
            self.by_stamp.remove(&old);
        }
        self.by_stamp.insert(self.stamp, key.to_string());
        while self.by_key.len() > self.capacity {
            let (_, victim) = self.by_stamp.pop_first().expect("non-empty");
            self.by_key.remove(&victim);
        }
    }

    fn get(&mut self, key: &str) {
        self.gets += 1;
        if self.by_key.contains_key(key) {
            self.hits += 1;
        }
        self.touch(key);
    }

    fn delete(&mut self, key: &str) {
        if let Some(s) = self.by_key.remove(key) {
            self.by_stamp.remove(&s);
        }
    }

    fn hit_ratio(&self) -> f64 {
        self.hits as f64 / self.gets.max(1) as f64
    }
}

/// The first `n` lines of the mixed trace.
fn mixed_slice(n: usize) -> Vec<String> {
    let file = std::fs::File::open(trace("mixed.twitter.csv.zst")).expect("trace");
    std::io::BufReader::new(zstd::stream::read::Decoder::new(file).expect("zstd"))
        .lines()
        .take(n)
        .map(|l| l.expect("line"))
        .collect()
}

async fn replay_registry(
    lines: &[String],
    analysis: AnalysisOptions,
    ttl: Option<u64>,
) -> CacheRegistry {
    let (clock, mock) = quanta::Clock::mock();
    let registry = CacheRegistry::new(
        RegistryOptions::default()
            .with_policy(Policy {
                default_ttl_secs: ttl.unwrap_or(86_400),
                ..Policy::default()
            })
            .with_max_patterns(1000)
            .with_analysis(AnalysisOptions {
                ignore_ttl: ttl.is_none(),
                ..analysis
            })
            .with_clock(clock),
    )
    .await
    .expect("registry");
    let text = lines.join("\n");
    let opts = ReplayOptions::default()
        .with_strict(true)
        .with_clock(Some(mock));
    let mut reader = TraceReader::new(
        std::io::Cursor::new(text.into_bytes()),
        &ReadOptions::default().with_format(Some(TraceFormat::Twitter)),
    )
    .expect("reader");
    replay::replay(&registry, &mut reader, &opts, |_| {})
        .await
        .expect("replay");
    registry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_match_an_exact_lru_simulation_on_a_trace_slice() {
    let lines = mixed_slice(300_000);
    // The issue's range: 1,000 objects and up (at 100 objects, a few sampled keys stand for the whole cache).
    let capacities = [1_000u64, 5_000, 10_000, 50_000];
    // Exact LRU, one cache per pattern and one for all.
    let mut exact: BTreeMap<String, Vec<ExactLru>> = BTreeMap::new();
    let mut all: Vec<ExactLru> = capacities
        .iter()
        .map(|&c| ExactLru::new(c as usize))
        .collect();
    for line in &lines {
        let req = replay::parse_line(TraceFormat::Twitter, line)
            .expect("valid")
            .expect("line");
        let pattern = req.key.rsplit_once(':').expect("namespaced").0.to_string();
        let caches = exact.entry(pattern).or_insert_with(|| {
            capacities
                .iter()
                .map(|&c| ExactLru::new(c as usize))
                .collect()
        });
        for lru in caches.iter_mut().chain(all.iter_mut()) {
            match req.op {
                Op::Get => lru.get(&req.key),
                Op::Delete => lru.delete(&req.key),
                Op::Set => lru.touch(&req.key),
            }
        }
    }
    let registry = replay_registry(
        &lines,
        AnalysisOptions {
            capacities: capacities.to_vec(),
            ..AnalysisOptions::default()
        },
        None,
    )
    .await;
    let report = registry.report();
    let check = |name: &str, predicted: &BTreeMap<String, f64>, lrus: &[ExactLru]| {
        let mut sum = 0.0;
        for (lru, c) in lrus.iter().zip(capacities) {
            let p = predicted[&c.to_string()];
            let e = lru.hit_ratio();
            eprintln!("{name} @{c}: predicted {p:.4}, exact {e:.4}");
            assert!(
                (p - e).abs() <= 0.04,
                "{name} @{c}: predicted {p}, exact {e}"
            );
            sum += (p - e).abs();
        }
        let mae = sum / capacities.len() as f64;
        assert!(mae <= 0.02, "{name}: mean absolute error {mae}");
    };
    for (name, lrus) in &exact {
        check(name, &report.patterns[name].predicted_hit_ratio, lrus);
    }
    let shared = report.shared.as_ref().expect("shared estimator");
    check("all", &shared.predicted_hit_ratio, &all);
}

#[tokio::test]
async fn ttl_turns_late_reuses_into_misses() {
    // 50 keys read in turn, one read per second: each key comes back every 50 s.
    let lines: Vec<String> = (0..5_000)
        .map(|i| format!("{i},item:{},10,100,1,get,0", i % 50))
        .collect();
    let long = replay_registry(&lines, AnalysisOptions::default(), Some(600)).await;
    let short = replay_registry(&lines, AnalysisOptions::default(), Some(30)).await;
    let none = replay_registry(&lines, AnalysisOptions::default(), None).await;
    let max = |r: &CacheRegistry| r.report().patterns["item"].max_hit_ratio;
    // With a TTL of 600 s a key is rewritten every 600 s: 1 miss in 12 reads after the first.
    assert!(
        (max(&long) - (1.0 - 50.0 / 5000.0 - 50.0 * 8.0 / 5000.0)).abs() < 0.02,
        "{}",
        max(&long)
    );
    assert_eq!(max(&short), 0.0, "every reuse comes after a 30 s TTL");
    assert!((max(&none) - 0.99).abs() < 1e-9);
    let r = short.report();
    let item = &r.patterns["item"];
    assert!(
        item.misses_at_any_size.expired > 0.98,
        "{:?}",
        item.misses_at_any_size
    );
    assert_eq!(
        item.recommended_ttl_secs,
        Some(64),
        "the shortest power of two above 50 s"
    );
}

#[tokio::test]
async fn invalidations_end_reuse() {
    let registry = CacheRegistry::new(RegistryOptions::default())
        .await
        .expect("registry");
    for round in 0..20 {
        for id in 0..50 {
            let _: Result<u32, Infallible> = registry
                .get_or_load(&format!("order:{id}"), || async { Ok(id) })
                .await;
            if round % 2 == 1 {
                registry
                    .invalidate(&format!("order:{id}"))
                    .await
                    .expect("invalidate");
            }
        }
    }
    let report = registry.report();
    let order = &report.patterns["order"];
    assert_eq!(order.gets, 1000);
    assert_eq!(order.deletes, 500);
    // Every read after an invalidation misses: half the reads of rounds 2..20, plus the 50 cold misses.
    assert!((order.misses_at_any_size.invalidated - 450.0 / 1000.0).abs() < 1e-9);
    assert!((order.max_hit_ratio - 500.0 / 1000.0).abs() < 1e-9);
    assert!(!order.recommended, "writes are a third of requests");
    assert!(
        order.reasons.iter().any(|r| r.contains("write-heavy")),
        "{:?}",
        order.reasons
    );
    // Back in the cache (50 more invalidation misses), then flushed by pattern: the next read of order:1 misses.
    for id in 0..50 {
        let _: Result<u32, Infallible> = registry
            .get_or_load(&format!("order:{id}"), || async { Ok(id) })
            .await;
    }
    registry.invalidate_pattern("order").await.expect("flush");
    let _: Result<u32, Infallible> = registry.get_or_load("order:1", || async { Ok(1) }).await;
    let report = registry.report();
    let after = &report.patterns["order"];
    assert_eq!(after.gets, 1051);
    assert!(
        (after.misses_at_any_size.invalidated - 501.0 / 1051.0).abs() < 1e-4,
        "{:?}",
        after.misses_at_any_size
    );
}

#[tokio::test]
async fn the_recommendation_applies_as_it_is() {
    let registry = CacheRegistry::new(RegistryOptions::default())
        .await
        .expect("registry");
    for _ in 0..10 {
        for id in 0..200 {
            let _: Result<String, Infallible> = registry
                .get_or_load(&format!("user:{id}"), || async {
                    tokio::time::sleep(Duration::from_micros(50)).await;
                    Ok(format!("user number {id}"))
                })
                .await;
        }
    }
    // A pattern with too few gets is not recommended.
    let _: Result<u8, Infallible> = registry.get_or_load("rare:1", || async { Ok(1) }).await;
    let report = registry.report();
    let user = &report.patterns["user"];
    assert!(user.recommended, "{:?}", user.reasons);
    assert_eq!(user.unique_keys, 200);
    assert!((user.max_hit_ratio - 0.9).abs() < 1e-9);
    assert_eq!(user.recommended_objects, Some(200));
    assert!(user.loader.mean_seconds > 40e-6, "{:?}", user.loader);
    assert!(user
        .sizes
        .iter()
        .all(|s| s.origin_seconds_saved_per_second > 0.0));
    // key "cr:user:NNN" + envelope + JSON string + 128 bytes of overhead
    assert!(
        (150.0..220.0).contains(&user.mean_key_bytes),
        "{}",
        user.mean_key_bytes
    );
    assert!(!report.patterns["rare"].recommended);
    let rec = &report.recommendation;
    assert_eq!(rec.whitelist, vec!["user".to_string()]);
    assert!(rec.toml.contains("whitelist = [\"user\"]"), "{}", rec.toml);
    // The apply section is a valid PUT body: it round-trips through JSON and the registry takes it.
    let body = serde_json::to_string(&rec.apply).expect("JSON");
    let update: PolicyUpdate = serde_json::from_str(&body).expect("a PolicyUpdate");
    let merged = registry.policy().merged(&update).expect("valid update");
    assert_eq!(merged.whitelist, vec!["user".to_string()]);
    // The TOML snippet parses and names the same TTL.
    let toml: toml::Value = toml::from_str(&rec.toml).expect("TOML");
    assert_eq!(
        toml["cache"]["patterns"]["user"]["ttl_secs"].as_integer(),
        user.recommended_ttl_secs.map(|t| t as i64)
    );
    // The gauge.
    let text = registry.metrics().render();
    assert!(
        text.contains(r#"cache_predicted_hit_ratio{capacity="1000",key_pattern="user"} 0.9"#),
        "{text}"
    );
}

#[test]
fn estimator_memory_stays_within_its_bound_over_ten_million_keys() {
    let s = Shards::new(AnalysisOptions::default().sample_keys);
    let bound = Shards::heap_bytes_bound(s.max_keys());
    let n = 10_000_000u64;
    let mut peak = 0;
    for i in 0..n {
        let h = key_hash(&format!("session:{i:016x}"));
        s.access(h, Access::Get, 0, Some(200), None, 0);
        if i % 1_000_000 == 0 {
            peak = peak.max(s.heap_bytes());
        }
    }
    peak = peak.max(s.heap_bytes());
    let (curve, stats) = s.curve(n);
    eprintln!(
        "10M distinct keys: {} sampled, rate {:.6}, {} distinct estimated, peak {peak} bytes, bound {bound} bytes",
        stats.sampled_keys, stats.rate, stats.distinct_keys
    );
    assert!(peak <= bound, "{peak} > {bound}");
    assert!(
        bound < 6_300 * 1024,
        "the documented bound is about 6.0 MiB: {bound}"
    );
    assert!(
        Shards::heap_bytes_bound_with(s.max_keys(), false) < 950 * 1024,
        "without the eviction simulations, about 0.9 MiB"
    );
    assert!(stats.sampled_keys as usize <= s.max_keys());
    assert!(
        (stats.distinct_keys / n as f64 - 1.0).abs() < 0.05,
        "{}",
        stats.distinct_keys
    );
    // No key is read twice; what remains is SHARDS_adj moving the sample's ±1/sqrt(s_max) (about 1.2%) count
    // error to distance 0.
    assert!(curve.max_hit_ratio() < 0.03, "{}", curve.max_hit_ratio());
}

#[tokio::test]
async fn values_a_cache_would_refuse_are_not_predicted_as_hits() {
    let registry = CacheRegistry::new(RegistryOptions::default().with_max_value_bytes(100))
        .await
        .expect("registry");
    for _ in 0..10 {
        for id in 0..50 {
            let _: Result<String, Infallible> = registry
                .get_or_load(&format!("big:{id}"), || async { Ok("x".repeat(200)) })
                .await;
            let _: Result<String, Infallible> = registry
                .get_or_load(&format!("small:{id}"), || async { Ok("x".repeat(20)) })
                .await;
        }
    }
    let report = registry.report();
    assert_eq!(
        report.patterns["big"].max_hit_ratio, 0.0,
        "over max_value_bytes: never stored"
    );
    assert!(!report.patterns["big"].recommended);
    assert!((report.patterns["small"].max_hit_ratio - 0.9).abs() < 1e-9);
}

#[tokio::test]
async fn cancelled_gets_are_not_taken_for_hits() {
    let registry = CacheRegistry::new(RegistryOptions::default())
        .await
        .expect("registry");
    // One get completes; then every call gives up before its loader answers (a request timeout, a client gone).
    // Left out of the sample, those 200 gets would be taken for hits at distance 0 by SHARDS_adj.
    let _: Result<u32, Infallible> = registry.get_or_load("slow:0", || async { Ok(0) }).await;
    for id in 1..=200 {
        let key = format!("slow:{id}");
        let call = registry.get_or_load(&key, || async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>(id)
        });
        assert!(tokio::time::timeout(Duration::from_millis(1), call)
            .await
            .is_err());
    }
    let slow = &registry.report().patterns["slow"];
    assert_eq!(slow.gets, 201);
    assert_eq!(
        slow.max_hit_ratio, 0.0,
        "201 distinct keys read once: nothing can hit"
    );
}
