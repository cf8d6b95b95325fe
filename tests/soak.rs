//! A soak under faults: instances of the reference service sharing one origin (a SQLite file) and one real Redis
//! (then a Redis Cluster), under a bounded mixed load of reads and writes whose every read is checked against a
//! history, while a driver changes the rollout and breaks Redis every few seconds.
//!
//! The load (on loopback only):
//! - readers: `GET /users/{id}` (skewed ids), `GET /projects/{id}/members` and `GET /projects/{id}`, on a random
//!   instance each time;
//! - writers: `PUT /users/{id}` with a new version in the name, each user written by one writer only. A write whose
//!   answer carries the `Warning` of a failed invalidation (Redis down) is sent again until it does not: that is
//!   what `docs/behaviour.md` asks of the caller. Only then is the version *acknowledged*.
//!
//! A read is stale when it started after a version was acknowledged and returned an older one (for a member list:
//! any of its members older). A request fails when it gets no answer or a status other than 2xx.
//!
//! The driver, every `step` (3 s), cycles through: a switch to Redis serving `user` and `project` (on one instance,
//! through the fleet), a ramp of 25% (with `cache-rollout fleet set`), Redis paused by SIGSTOP, `project` in shadow
//! mode, SIGHUP to one instance, Redis killed and restarted empty, a switch to `null`, back to Redis with `user` at
//! 50%, and a whitelist of `user` only. Every pattern has a 2 s TTL with stale-if-error and stale-while-revalidate
//! of 30 s, so reads past the TTL are served stale and refreshed in the background all along. An L1 (`l1_ttl_secs`) is left out: across instances it is allowed to serve
//! the old value for the few milliseconds its invalidation message takes (`docs/scaling.md`), which this check
//! would count as stale; `tests/rollout.rs` checks it on one registry.
//!
//! `SOAK_SECS` (default 60) is the length of the one-Redis run, and `SOAK_CLUSTER_SECS` (default half of it) of the
//! cluster run; `scripts/soak.sh` runs both longer in release. Each test fails if a request failed or a read was
//! stale, and prints what it measured: requests, writes, failures, stale reads, p99 and max latency, rollbacks,
//! resident memory and the number of metric series of every instance at start and end.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{command, metric, repo, rss_kib, RedisCluster, RedisServer, Rng, Service, TOKEN};

/// One soak at a time: each starts three instances and up to six Redis servers on a two-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Seeded users; the first `WRITTEN` of them are written to.
const USERS: u64 = 200;
const WRITTEN: u64 = 40;
/// Projects: a tenth of the users (the reference service's seed).
const PROJECTS: u64 = USERS / 10;
const READERS: usize = 12;
const WRITERS: u64 = 2;
const INSTANCES: usize = 3;

fn secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(10, 3_600)
}

/// The Redis the instances share, and the faults the driver can cause on it.
enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
        }
    }

    /// SIGSTOP for `d` (on a cluster, one primary, for less than the node timeout: no failover).
    fn pause(&self, d: Duration) -> String {
        match self {
            Backend::Single(r) => {
                r.pause();
                std::thread::sleep(d);
                r.resume();
                format!("ok: Redis paused {} ms", d.as_millis())
            }
            Backend::Cluster(c) => {
                let d = d.min(Duration::from_millis(600));
                let p = c.primaries()[0];
                c.nodes[p].pause();
                std::thread::sleep(d);
                c.nodes[p].resume();
                format!(
                    "ok: primary {} paused {} ms",
                    c.nodes[p].port,
                    d.as_millis()
                )
            }
        }
    }

    /// SIGKILL, and back empty (on a cluster, a primary: its replica takes over, it rejoins as a replica).
    fn kill_and_restart(&mut self) -> String {
        match self {
            Backend::Single(r) => {
                r.kill();
                std::thread::sleep(Duration::from_millis(300));
                r.restart();
                "ok: Redis killed, restarted empty".into()
            }
            Backend::Cluster(c) => {
                let p = c.primaries()[0];
                let t0 = Instant::now();
                c.nodes[p].kill();
                c.wait_ok(Duration::from_secs(30));
                c.nodes[p].restart();
                c.wait_ok(Duration::from_secs(30));
                format!(
                    "ok: primary {} killed, back as a replica after {} ms",
                    c.nodes[p].port,
                    t0.elapsed().as_millis()
                )
            }
        }
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    writes: AtomicU64,
    rewrites: AtomicU64,
    failed: AtomicU64,
    stale: AtomicU64,
    /// The first failures and stale reads, for the message.
    examples: Mutex<Vec<String>>,
    /// Latency of every request, in microseconds.
    latencies: Mutex<Vec<u32>>,
    /// The driver's step in progress (its index in the driver's log), and the stale reads seen during each.
    step: AtomicU64,
    stale_by_step: Mutex<std::collections::BTreeMap<u64, u64>>,
}

impl Tally {
    fn note(&self, what: String) {
        let mut e = self.examples.lock().expect("examples");
        if e.len() < 20 {
            e.push(what);
        }
    }

    fn stale(&self, what: String) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        let step = self.step.load(Ordering::Relaxed);
        *self
            .stale_by_step
            .lock()
            .expect("stale_by_step")
            .entry(step)
            .or_default() += 1;
        self.note(format!("during driver step {step}: {what}"));
    }
}

/// Stops the load and waits for it, also when the driver panics (an assertion, a fixture), so that no load is
/// left running against ports the next test may be given.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the load");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per user, the last acknowledged version (0: the seeded name).
struct History {
    acked: Vec<AtomicU64>,
}

impl History {
    fn floor(&self, id: u64) -> u64 {
        self.acked[id as usize].load(Ordering::SeqCst)
    }
}

/// The version in a user's name: `u<id> v<version>`, or 0 for the seeded `User <id>`.
fn version(name: &str) -> Option<u64> {
    if name.starts_with("User ") {
        return Some(0);
    }
    name.rsplit_once(" v").and_then(|(_, v)| v.parse().ok())
}

/// 1..=n from `rng`, the low ids hot (u³, u uniform).
fn skewed(rng: &mut Rng, n: u64) -> u64 {
    let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    1 + ((u * u * u) * n as f64) as u64 % n
}

async fn reader(
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    history: Arc<History>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let mut lat = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let base = &bases[rng.below(bases.len() as u64) as usize];
        let op = rng.below(100);
        let (path, floors) = if op < 60 {
            let id = skewed(&mut rng, USERS);
            (format!("/users/{id}"), vec![(id, history.floor(id))])
        } else if op < 85 {
            // Which users a list shows is known only from the answer: take every floor before sending.
            let floors = (1..=USERS).map(|id| (id, history.floor(id))).collect();
            (
                format!("/projects/{}/members", 1 + rng.below(PROJECTS)),
                floors,
            )
        } else {
            (format!("/projects/{}", 1 + rng.below(PROJECTS)), vec![])
        };
        let t0 = Instant::now();
        let answer = client.get(format!("{base}{path}")).send().await;
        let body = match answer {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => Some(v),
                Err(e) => {
                    tally.note(format!("GET {base}{path}: the body: {e}"));
                    None
                }
            },
            Ok(r) => {
                tally.note(format!("GET {base}{path}: {}", r.status()));
                None
            }
            Err(e) => {
                tally.note(format!("GET {base}{path}: {e}"));
                None
            }
        };
        lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let Some(body) = body else {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // The answer is about what was asked.
        let asked: u64 = path
            .split('/')
            .nth(2)
            .and_then(|id| id.parse().ok())
            .unwrap_or(0);
        let answered = if path.ends_with("/members") {
            asked
        } else {
            body["id"].as_u64().unwrap_or(0)
        };
        if answered != asked {
            tally.stale(format!("GET {base}{path} answered {body}"));
        }
        // (user id, name) pairs in the answer.
        let seen: Vec<(u64, String)> = if path.starts_with("/users/") {
            vec![(
                body["id"].as_u64().unwrap_or(0),
                body["name"].as_str().unwrap_or_default().to_string(),
            )]
        } else if path.ends_with("/members") {
            body.as_array()
                .map(|ms| {
                    ms.iter()
                        .map(|m| {
                            (
                                m["user_id"].as_u64().unwrap_or(0),
                                m["name"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        } else {
            vec![]
        };
        for (id, name) in seen {
            let floor = floors.iter().find(|f| f.0 == id).map_or(0, |f| f.1);
            match version(&name) {
                Some(v) if v >= floor => {}
                got => tally.stale(format!(
                    "GET {base}{path} showed user {id} as {name:?} ({got:?}) after version {floor} was acknowledged"
                )),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tally.latencies.lock().expect("latencies").extend(lat);
}

async fn writer(
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    history: Arc<History>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    w: u64,
) {
    let mut rng = Rng(0x5EED ^ (w + 1).wrapping_mul(0x9E37_79B9));
    let mut lat = Vec::new();
    let mut next = vec![0u64; USERS as usize + 1];
    while !stop.load(Ordering::Relaxed) {
        // This writer's users: id ≡ w (mod WRITERS), among the first WRITTEN.
        let id = 1 + (rng.below(WRITTEN / WRITERS) * WRITERS + w);
        next[id as usize] = next[id as usize].max(history.floor(id)) + 1;
        let v = next[id as usize];
        let body = json!({"name": format!("u{id} v{v}"), "email": format!("u{id}@example.com")});
        // Until an answer says the invalidation was done (bounded: 60 s; a cluster whose primary was killed
        // refuses invalidations of a third of the slots until the killed node is back as a replica).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = true;
        loop {
            let base = &bases[rng.below(bases.len() as u64) as usize];
            let t0 = Instant::now();
            let answer = client
                .put(format!("{base}/users/{id}"))
                .json(&body)
                .send()
                .await;
            lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            tally.requests.fetch_add(1, Ordering::Relaxed);
            if !first {
                tally.rewrites.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let done = match answer {
                Ok(r) if r.status().is_success() => !r.headers().contains_key("warning"),
                Ok(r) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    tally.note(format!("PUT {base}/users/{id}: {}", r.status()));
                    false
                }
                Err(e) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    tally.note(format!("PUT {base}/users/{id}: {e}"));
                    false
                }
            };
            if done {
                history.acked[id as usize].store(v, Ordering::SeqCst);
                tally.writes.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if Instant::now() > deadline {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                tally.note(format!(
                    "PUT /users/{id}: the invalidation kept failing for 60 s"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(10 + rng.below(20))).await;
    }
    tally.latencies.lock().expect("latencies").extend(lat);
}

/// Metric series in an instance's `/metrics`. The check of the prediction after the switch
/// (`cache_served_hit_ratio`, `cache_served_predicted_hit_ratio`) has a series per pattern only while it is fully served,
/// so those come and go with the driver's switches (bounded by the patterns): they are not counted.
fn series(svc: &Service) -> usize {
    svc.get("/metrics")
        .2
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.starts_with("cache_served_"))
        .count()
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1e3
}

/// `PUT /internal/cache/config` on one instance; the status (or 0 without an answer).
fn put(svc: &Service, body: &Value) -> String {
    match svc.request(
        reqwest::Method::PUT,
        "/internal/cache/config",
        Some(body.clone()),
    ) {
        Some((200, _, _)) => format!("ok: PUT {body} → 200"),
        Some((s, _, text)) => format!("PUT {body} → {s} {text}"),
        None => format!("PUT {body} → no answer"),
    }
}

/// `cache-rollout fleet set BODY` against the shared Redis.
fn fleet_set(url: &str, body: &Value) -> String {
    let out = command()
        .args(["fleet", "--config-dir"])
        .arg(repo().join("config"))
        .args(["set", &body.to_string()])
        .env("REDIS_URL", url)
        .env("CACHE_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("cache-rollout fleet set");
    if out.status.success() {
        format!("ok: fleet set {body}")
    } else {
        format!(
            "fleet set {body} → {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Serves `user` and `project`, every pattern with a 2 s TTL, stale-if-error and stale-while-revalidate of 30 s (the
/// `"*"` defaults, which later changes leave in place): entries go past their TTL all the time, are served stale
/// and refreshed in the background, and the history check must still find no stale read.
fn serve_both() -> Value {
    json!({"impl": "redis", "whitelist": ["user", "project"],
           "patterns": {"user": {"mode": "serve"}, "project": {"mode": "serve"},
                        "*": {"ttl_secs": 2, "stale_if_error_secs": 30, "stale_while_revalidate_secs": 30}}})
}

fn soak(backend: impl FnOnce() -> Backend, duration: Duration, label: &str) {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut backend = backend();
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("origin.db");
    let url = backend.url();
    let wait_replicas = if matches!(backend, Backend::Cluster(_)) {
        "1"
    } else {
        "0"
    };
    let env = [
        ("FEATURE_CACHE", "true"),
        ("CACHE_IMPL", "redis"),
        ("CACHE_PATTERNS", "user,project"),
        ("REDIS_URL", url.as_str()),
        ("CACHE_ADMIN_TOKEN", TOKEN),
        ("CACHE_ROLLOUT_CACHE__FLEET__ENABLED", "true"),
        ("CACHE_ROLLOUT_CACHE__ROLLBACK__COOLDOWN_SECS", "2"),
        ("CACHE_ROLLOUT_CACHE__REDIS__WAIT_REPLICAS", wait_replicas),
        ("RUST_LOG", "warn,cache_rollout=info"),
    ];
    let users = USERS.to_string();
    let db_arg = db.to_str().expect("a UTF-8 path");
    let fleet: Vec<Service> = (0..INSTANCES)
        .map(|_| {
            Service::start_with(
                &repo().join("config"),
                &env,
                &["--users", &users, "--database", db_arg],
            )
        })
        .collect();
    for svc in &fleet {
        svc.wait_for(
            || svc.get("/internal/cache").1["impl"] == "redis",
            "serving from Redis",
        );
    }
    let start_rss: Vec<u64> = fleet
        .iter()
        .map(|s| rss_kib(&s.child.id().to_string()))
        .collect();
    let start_series: Vec<usize> = fleet.iter().map(series).collect();

    let bases = Arc::new(fleet.iter().map(|s| s.base.clone()).collect::<Vec<_>>());
    let history = Arc::new(History {
        acked: (0..=USERS).map(|_| AtomicU64::new(0)).collect(),
    });
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (bases, history, tally, stop) = (bases, history, tally.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let mut tasks = Vec::new();
                for r in 0..READERS {
                    tasks.push(tokio::spawn(reader(
                        client.clone(),
                        bases.clone(),
                        history.clone(),
                        tally.clone(),
                        stop.clone(),
                        0xA11CE ^ ((r as u64 + 1) << 20),
                    )));
                }
                for w in 0..WRITERS {
                    tasks.push(tokio::spawn(writer(
                        client.clone(),
                        bases.clone(),
                        history.clone(),
                        tally.clone(),
                        stop.clone(),
                        w,
                    )));
                }
                for t in tasks {
                    t.await.expect("load task");
                }
            });
        })
    };
    let mut load = Load {
        stop,
        thread: Some(thread),
    };

    // The driver. Each action's outcome starts with `ok` when it was done; step k of the log is the k-th action
    // (stale reads are counted per step: those seen after it and before the next).
    let t0 = Instant::now();
    let step = Duration::from_secs(3);
    let mut log = Vec::new();
    let mut not_done = 0;
    let mut series_after_a_cycle = None;
    let mut i = 0usize;
    while t0.elapsed() + step <= duration {
        std::thread::sleep(step);
        if i == 9 {
            series_after_a_cycle = Some(fleet.iter().map(series).collect::<Vec<_>>());
        }
        let svc = &fleet[i % INSTANCES];
        tally.step.store(i as u64 + 1, Ordering::Relaxed);
        let done = match i % 9 {
            0 => put(svc, &serve_both()),
            1 => fleet_set(
                &url,
                &json!({"patterns": {"user": {"mode": "serve", "ramp_percent": 25}}}),
            ),
            2 => backend.pause(Duration::from_millis(1500)),
            3 => put(
                svc,
                &json!({"patterns": {"user": {"mode": "serve"}, "project": {"mode": "shadow"}}}),
            ),
            4 => {
                svc.signal("-HUP");
                format!("ok: SIGHUP to {}", svc.base)
            }
            5 => backend.kill_and_restart(),
            6 => fleet_set(&url, &json!({"impl": "null"})),
            7 => put(
                svc,
                &json!({"impl": "redis", "patterns": {"user": {"mode": "serve", "ramp_percent": 50}}}),
            ),
            _ => put(svc, &json!({"whitelist": ["user"]})),
        };
        if !done.starts_with("ok") {
            not_done += 1;
        }
        log.push(format!(
            "{:>3} {:>6.1} s  {done}",
            i + 1,
            t0.elapsed().as_secs_f64()
        ));
        i += 1;
    }
    // Back to serving both patterns fully, and some traffic served so.
    tally.step.store(i as u64 + 1, Ordering::Relaxed);
    // Redis may have just been restarted: the instance's connection is made again on its next command.
    let mut last = put(&fleet[0], &serve_both());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !last.starts_with("ok") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = put(&fleet[0], &serve_both());
    }
    log.push(format!(
        "{:>3} {:>6.1} s  {last}",
        i + 1,
        t0.elapsed().as_secs_f64()
    ));
    let hits = |svc: &Service| {
        metric(
            &svc.get("/metrics").2,
            r#"cache_hits_total{impl="redis",key_pattern="user"}"#,
        )
    };
    let hits_before: Vec<f64> = fleet.iter().map(hits).collect();
    std::thread::sleep(Duration::from_secs(2));
    load.finish();
    let elapsed = t0.elapsed().as_secs_f64();
    let hits_at_end: f64 = fleet
        .iter()
        .zip(&hits_before)
        .map(|(s, before)| hits(s) - before)
        .sum();

    let end_rss: Vec<u64> = fleet
        .iter()
        .map(|s| rss_kib(&s.child.id().to_string()))
        .collect();
    let end_series: Vec<usize> = fleet.iter().map(series).collect();
    let rollbacks: f64 = fleet
        .iter()
        .map(|s| {
            s.get("/metrics")
                .2
                .lines()
                .filter(|l| l.starts_with("cache_rollback_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    let revoked: f64 = fleet
        .iter()
        .map(|s| {
            metric(
                &s.get("/metrics").2,
                r#"cache_lease_total{impl="redis",result="revoked"}"#,
            )
        })
        .sum();
    // Reads served past their TTL (either reason) and background refreshes, summed over the instances.
    let sum_of = |prefix: &str| -> f64 {
        fleet
            .iter()
            .map(|s| {
                s.get("/metrics")
                    .2
                    .lines()
                    .filter(|l| l.starts_with(prefix))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .sum()
    };
    let stale_served = sum_of("cache_stale_served_total{");
    let refreshed = sum_of("cache_refresh_total{");
    let mut lat = std::mem::take(&mut *tally.latencies.lock().expect("latencies"));
    lat.sort_unstable();
    let requests = tally.requests.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let stale = tally.stale.load(Ordering::Relaxed);
    let by_step = tally.stale_by_step.lock().expect("stale_by_step").clone();
    eprintln!("soak ({label}), driver:\n{}", log.join("\n"));
    if !by_step.is_empty() {
        eprintln!("soak ({label}): stale reads by driver step: {by_step:?}");
    }
    eprintln!(
        "soak ({label}): {requests} requests in {elapsed:.0} s ({:.0}/s), {} writes acknowledged ({} sent again after a \
         failed invalidation), {failed} failed, {stale} stale reads; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         {rollbacks} rollbacks, {revoked} fills refused by an invalidation; {stale_served} reads served past their \
         TTL, {refreshed} background refreshes; RSS KiB {start_rss:?} → {end_rss:?}; series {start_series:?} → \
         {end_series:?}",
        requests as f64 / elapsed,
        tally.writes.load(Ordering::Relaxed),
        tally.rewrites.load(Ordering::Relaxed),
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        quantile(&lat, 1.0),
    );
    let examples = tally.examples.lock().expect("examples").join("\n");
    let logs = || {
        fleet
            .iter()
            .map(|s| {
                let l = s.log();
                let tail: Vec<&str> = l.lines().rev().take(40).collect();
                format!(
                    "--- {} (last lines)\n{}",
                    s.base,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(failed, 0, "failed requests:\n{examples}\n{}", logs());
    assert_eq!(stale, 0, "stale reads:\n{examples}\n{}", logs());
    assert!(
        stale_served > 0.0 && refreshed > 0.0,
        "entries past their TTL were served and refreshed: {stale_served}, {refreshed}"
    );
    assert!(
        tally.writes.load(Ordering::Relaxed) > 100,
        "the writers wrote"
    );
    // The driver's changes were made (a fault may refuse one now and then, not most), and the end state served.
    assert!(
        not_done * 3 <= i,
        "{not_done} of {i} driver actions not done:\n{}",
        log.join("\n")
    );
    assert!(last.starts_with("ok"), "{last}");
    assert!(hits_at_end > 0.0, "no Redis hit after the last switch");
    // Series are bounded by the patterns, routes and label values, not by the traffic or the changes: after a
    // whole cycle of the driver, every label value has been seen, and the end has no more.
    if let Some(after) = series_after_a_cycle {
        for ((s, a), e) in start_series.iter().zip(&after).zip(&end_series) {
            assert!(
                e <= a,
                "series: {s} at start, {a} after a cycle, {e} at the end"
            );
        }
    }
    drop(fleet);
    drop(backend);
}

#[test]
fn soak_on_one_redis() {
    let secs = secs("SOAK_SECS", 60);
    soak(
        || Backend::Single(RedisServer::start()),
        Duration::from_secs(secs),
        "one Redis",
    );
}

#[test]
fn soak_on_a_cluster() {
    let secs = secs("SOAK_CLUSTER_SECS", secs("SOAK_SECS", 60) / 2);
    soak(
        || Backend::Cluster(RedisCluster::start()),
        Duration::from_secs(secs),
        "Redis Cluster",
    );
}
