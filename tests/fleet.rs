//! One rollout state for a fleet: three instances of the reference service on loopback, one real Redis.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{command, metric, repo, RedisCluster, RedisServer, Service, TOKEN};

/// The environment of a fleet instance; `poll_ms`: the re-read period.
fn fleet_env(url: &str, poll_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        ("FEATURE_CACHE", "true".into()),
        ("CACHE_IMPL", "null".into()),
        ("REDIS_URL", url.to_string()),
        ("CACHE_ADMIN_TOKEN", TOKEN.into()),
        ("CACHE_ROLLOUT_CACHE__FLEET__ENABLED", "true".into()),
        ("CACHE_ROLLOUT_CACHE__FLEET__POLL_MS", poll_ms.to_string()),
    ]
}

/// The reference service (`catalog`) keeps its fleet state under the key derived from its name.
const KEY: &str = "cache-rollout:catalog:fleet";

fn start(env: &[(&'static str, String)]) -> Service {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::start(&repo().join("config"), &env)
}

fn state(svc: &Service) -> Value {
    svc.get("/internal/cache").1
}

/// Waits until every instance's state satisfies `ok`; the time it took.
fn converge(fleet: &[Service], what: &str, ok: impl Fn(&Value) -> bool) -> Duration {
    let t0 = Instant::now();
    for svc in fleet {
        svc.wait_for(|| ok(&state(svc)), what);
    }
    t0.elapsed()
}

/// `PUT /users/5` (a new name) on `svc`, which invalidates `user:5`; then `svc` reads the new name.
fn rename_user_5(svc: &Service) {
    let (s, _, text) = svc
        .request(
            reqwest::Method::PUT,
            "/users/5",
            Some(json!({"name": "Renamed", "email": "r@example.com"})),
        )
        .expect("PUT /users/5");
    assert_eq!(s, 200, "{text}");
    assert_eq!(svc.get("/users/5").1["name"], "Renamed");
}

fn counter(svc: &Service, series: &str) -> f64 {
    metric(&svc.get("/metrics").2, series)
}

#[test]
fn three_instances_follow_one_state_and_see_each_others_invalidations() {
    let redis = RedisServer::start();
    // A 5 s re-read: a change that reaches every instance within a second came by its notification.
    let env = fleet_env(&redis.url(), 5000);
    let fleet: Vec<Service> = (0..3).map(|_| start(&env)).collect();
    // The first instance stores its configuration as version 1; all three run it.
    converge(&fleet, "fleet version 1", |s| s["fleet"]["version"] == 1);
    for svc in &fleet {
        assert_eq!(state(svc)["impl"], "null");
        assert!(svc.get("/metrics").2.contains("cache_fleet_version 1"));
    }

    // A change made on one instance is run by all three.
    let t0 = Instant::now();
    fleet[0].put_config(json!({"impl": "redis", "whitelist": ["user"]}));
    converge(&fleet, "impl redis everywhere", |s| {
        s["impl"] == "redis" && s["whitelist"] == json!(["user"]) && s["fleet"]["version"] == 2
    });
    let flip = t0.elapsed();
    eprintln!("PUT on one instance → all three serving: {flip:?}");
    assert!(flip < Duration::from_secs(1), "{flip:?}");

    // user:5 is cached in the shared Redis and every instance has read that copy. Then the write on instance 0
    // invalidates it: instance 0 reloads and fills the new value, and the other two (whose own origins, separate
    // SQLite databases, still hold the old name) answer the new one from the cache, never the old copy.
    let hits = r#"cache_hits_total{impl="redis",key_pattern="user"}"#;
    for svc in &fleet {
        assert_eq!(svc.get("/users/5").1["name"], "User 5");
    }
    let hits_before: f64 = fleet.iter().map(|s| counter(s, hits)).sum();
    assert!(hits_before >= 2.0, "{hits_before}");
    rename_user_5(&fleet[0]);
    // The fill may finish just after instance 0 answered: wait for it, or the others would load from their own
    // origins.
    let mut conn = redis.conn();
    fleet[0].wait_for(
        || {
            redis::cmd("EXISTS")
                .arg("cr:catalog:user:5")
                .query::<i64>(&mut conn)
                .is_ok_and(|n| n == 1)
        },
        "the refill of user:5",
    );
    for svc in &fleet[1..] {
        assert_eq!(svc.get("/users/5").1["name"], "Renamed");
    }
    assert_eq!(
        fleet.iter().map(|s| counter(s, hits)).sum::<f64>(),
        hits_before + 2.0,
        "instances 1 and 2 hit the refilled value"
    );

    // The command line steers the fleet without /internal/.
    let t0 = Instant::now();
    let out = command()
        .args(["fleet", "--config-dir"])
        .arg(repo().join("config"))
        .args(["set", r#"{"whitelist": ["user", "project"]}"#])
        .env("REDIS_URL", redis.url())
        .env("CACHE_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("cache-rollout fleet set");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Value = serde_json::from_slice(&out.stdout).expect("the new state");
    assert_eq!(written["version"], 3);
    assert_eq!(written["source"], "cli");
    converge(&fleet, "whitelist from the command line", |s| {
        s["whitelist"] == json!(["user", "project"]) && s["fleet"]["version"] == 3
    });
    eprintln!(
        "cache-rollout fleet set → all three serving: {:?}",
        t0.elapsed()
    );

    // Without the admin token the command refuses, and the state is unchanged.
    let out = command()
        .args(["fleet", "--config-dir"])
        .arg(repo().join("config"))
        .args(["set", r#"{"impl": "null"}"#])
        .env("REDIS_URL", redis.url())
        .env("CACHE_ADMIN_TOKEN", "another-token-0123456789")
        .output()
        .expect("cache-rollout fleet set");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not signed with this admin token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_fleet_on_a_redis_cluster_follows_one_state_through_a_node_failure() {
    let mut cluster = RedisCluster::start();
    let env = fleet_env(&cluster.url(), 5000);
    let fleet: Vec<Service> = (0..2).map(|_| start(&env)).collect();
    converge(&fleet, "fleet version 1", |s| s["fleet"]["version"] == 1);
    // Turning Redis on connects to the cluster and flushes it (16,384 slot generations): not timed.
    let t0 = Instant::now();
    fleet[0].put_config(json!({"impl": "redis", "whitelist": ["user"]}));
    converge(&fleet, "impl redis everywhere", |s| {
        s["impl"] == "redis" && s["fleet"]["version"] == 2
    });
    eprintln!(
        "cluster: PUT impl=redis on one instance → both serving: {:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    fleet[0].put_config(json!({"whitelist": ["user", "team"]}));
    converge(&fleet, "the whitelist everywhere", |s| {
        s["whitelist"] == json!(["user", "team"]) && s["fleet"]["version"] == 3
    });
    let flip = t0.elapsed();
    eprintln!("cluster: PUT on one instance → both serving: {flip:?}");
    assert!(flip < Duration::from_secs(1), "{flip:?}");

    // An invalidation on one instance reaches the other through the cluster: instance 1 hits the value instance
    // 0 refilled after its write (its own origin still has the old name).
    for svc in &fleet {
        assert_eq!(svc.get("/users/5").1["name"], "User 5");
    }
    rename_user_5(&fleet[0]);
    let key = cache_rollout::cache::RedisCache::connect_lazy(
        cache_rollout::cache::RedisOptions::default()
            .with_url(cluster.url())
            .with_key_prefix("cr:catalog:"),
    )
    .expect("cluster options")
    .redis_key("user:5");
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let mut conn = redis::cluster::ClusterClient::new(nodes)
        .and_then(|c| c.get_connection())
        .expect("a cluster connection");
    fleet[0].wait_for(
        || {
            redis::cmd("EXISTS")
                .arg(&key)
                .query::<i64>(&mut conn)
                .is_ok_and(|n| n == 1)
        },
        "the refill of user:5",
    );
    assert_eq!(fleet[1].get("/users/5").1["name"], "Renamed");

    // The node both instances subscribe through (the URL's first, a primary) dies: its replica takes over, the
    // instances subscribe through another node, and the next change still arrives by notification.
    drop(conn);
    cluster.nodes[0].kill();
    cluster.wait_ok(Duration::from_secs(30));
    let t0 = Instant::now();
    fleet[1].put_config(json!({"whitelist": ["user", "project"]}));
    converge(&fleet, "the change after the failover", |s| {
        s["whitelist"] == json!(["user", "project"]) && s["fleet"]["version"] == 4
    });
    let flip = t0.elapsed();
    eprintln!("cluster, after a failover: PUT on one instance → both serving: {flip:?}");
    assert!(flip < Duration::from_secs(1), "{flip:?}");
}

#[test]
fn a_forged_state_is_refused_and_an_unreachable_redis_keeps_the_last_good_state() {
    let redis = RedisServer::start();
    let env = fleet_env(&redis.url(), 1000);
    let svc = start(&env);
    converge(std::slice::from_ref(&svc), "fleet version 1", |s| {
        s["fleet"]["version"] == 1
    });
    svc.put_config(json!({"impl": "redis", "whitelist": ["user"]}));

    // Someone with Redis access but not the token writes a higher version: refused, reported, not applied.
    let mut conn = redis.conn();
    let raw: String = redis::cmd("GET")
        .arg(KEY)
        .query(&mut conn)
        .expect("the stored state");
    let mut forged: Value = serde_json::from_str(&raw).expect("JSON");
    forged["version"] = json!(99);
    forged["policy"]["impl"] = json!("null");
    let _: () = redis::cmd("SET")
        .arg(KEY)
        .arg(forged.to_string())
        .query(&mut conn)
        .expect("SET");
    svc.wait_for(
        || {
            state(&svc)["fleet"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("not signed"))
        },
        "the forged state to be refused",
    );
    let s = state(&svc);
    assert_eq!(
        (s["impl"].clone(), s["fleet"]["version"].clone()),
        (json!("redis"), json!(2))
    );

    // Redis gone: the instance keeps serving on its last good state and says why.
    drop(conn);
    let mut redis = redis;
    redis.kill();
    svc.wait_for(
        || {
            state(&svc)["fleet"]["error"]
                .as_str()
                .is_some_and(|e| !e.contains("not signed"))
        },
        "the read failure to be reported",
    );
    assert_eq!(svc.get("/users/3").0, 200);
    assert_eq!(state(&svc)["impl"], "redis");
    assert!(state(&svc)["fleet"]["failures"].as_u64().unwrap_or(0) >= 1);
}

/// Signs a state as the service does (written out again here, to pin the format): HMAC-SHA256, keyed by the admin
/// token, of the JSON of `(key, epoch, version, policy, updated_at, source)`.
fn sign(
    epoch: &str,
    version: u64,
    policy: &cache_rollout::Policy,
    updated_at: &str,
    source: &str,
) -> String {
    use hmac::Mac;
    let body =
        serde_json::to_vec(&(KEY, epoch, version, policy, updated_at, source)).expect("JSON");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(TOKEN.as_bytes()).expect("key");
    mac.update(&body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_change_whose_notification_is_lost_is_applied_by_the_next_read() {
    let redis = RedisServer::start();
    let env = fleet_env(&redis.url(), 1000);
    let fleet: Vec<Service> = (0..2).map(|_| start(&env)).collect();
    converge(&fleet, "fleet version 1", |s| s["fleet"]["version"] == 1);
    // A valid version 2, stored without the PUBLISH that normally goes with it.
    let mut conn = redis.conn();
    let raw: String = redis::cmd("GET")
        .arg(KEY)
        .query(&mut conn)
        .expect("the stored state");
    let doc: Value = serde_json::from_str(&raw).expect("JSON");
    let mut policy: cache_rollout::Policy =
        serde_json::from_value(doc["policy"].clone()).expect("a policy");
    policy.cache_impl = cache_rollout::cache::CacheImpl::Memory;
    policy.whitelist = vec!["project".into()];
    let at = "2026-01-01T00:00:00Z";
    let epoch = doc["epoch"].as_str().expect("epoch").to_string();
    let next = json!({
        "epoch": epoch,
        "version": 2,
        "policy": policy,
        "updated_at": at,
        "source": "test",
        "signature": sign(&epoch, 2, &policy, at, "test"),
    });
    let t0 = Instant::now();
    let _: () = redis::cmd("SET")
        .arg(KEY)
        .arg(next.to_string())
        .query(&mut conn)
        .expect("SET");
    let took = converge(&fleet, "the re-read to apply version 2", |s| {
        s["impl"] == "memory" && s["fleet"]["version"] == 2
    });
    eprintln!(
        "a change without its notification → both instances: {:?}",
        t0.elapsed().max(took)
    );

    // A SIGHUP re-reads the files (impl null there), but under a fleet state the running policy stays.
    fleet[0].signal("-HUP");
    fleet[0].wait_for(
        || {
            state(&fleet[0])["swaps"]
                .as_array()
                .and_then(|w| w.last())
                .is_some_and(|w| w["source"] == "sighup")
        },
        "the SIGHUP reload",
    );
    assert_eq!(state(&fleet[0])["impl"], "memory");

    // The key lost (a Redis restarted without persistence, a flush): the instances store what they run again, as
    // a new epoch, and a change made after that reaches both.
    let _: i64 = redis::cmd("DEL").arg(KEY).query(&mut conn).expect("DEL");
    converge(&fleet, "the state stored again", |s| {
        s["fleet"]["version"] == 1 && s["fleet"]["epoch"] != epoch.as_str() && s["impl"] == "memory"
    });
    let restored: Value = serde_json::from_str(
        &redis::cmd("GET")
            .arg(KEY)
            .query::<String>(&mut conn)
            .expect("the restored state"),
    )
    .expect("JSON");
    assert_eq!(restored["source"], "restore");
    fleet[1].put_config(json!({"whitelist": ["project", "user"]}));
    converge(&fleet, "a change after the restore", |s| {
        s["whitelist"] == json!(["project", "user"]) && s["fleet"]["version"] == 2
    });
}

#[test]
fn a_rollback_on_one_instance_opens_the_breaker_on_the_others() {
    let redis = RedisServer::start();
    let env = fleet_env(&redis.url(), 1000);
    let fleet: Vec<Service> = (0..2).map(|_| start(&env)).collect();
    converge(&fleet, "fleet version 1", |s| s["fleet"]["version"] == 1);
    fleet[0].put_config(json!({
        "impl": "redis",
        "whitelist": ["user"],
        "rollback": {"min_calls": 10, "cooldown_secs": 60},
    }));
    converge(&fleet, "user served", |s| {
        s["routes"]["user"]["mode"] == "serve"
    });
    // Instance 1 has seen the pattern, but gets no traffic during the fault.
    assert_eq!(fleet[1].get("/users/1").0, 200);
    // A rollback message without the token's signature does nothing.
    let mut conn = redis.conn();
    let forged = json!({"msg": {"kind": "rollback", "from": "x", "key_pattern": "user",
        "reason": "error_rate", "at_ms": 0}, "sig": "00"});
    let _: i64 = redis::cmd("PUBLISH")
        .arg(KEY)
        .arg(forged.to_string())
        .query(&mut conn)
        .expect("PUBLISH");
    drop(conn);
    fleet[1].wait_for(
        || {
            fleet[1]
                .log()
                .contains("not signed with this admin token was ignored")
        },
        "the forged message to be ignored",
    );
    assert!(state(&fleet[1])["routes"]["user"]["breaker"].is_null());
    redis.pause();
    let t0 = Instant::now();
    let mut i = 0u64;
    fleet[0].wait_for(
        || {
            i += 1;
            let _ = fleet[0].get(&format!("/users/{}", i % 50 + 1));
            state(&fleet[0])["routes"]["user"]["breaker"]["state"] == "open"
        },
        "instance 0 to roll back",
    );
    redis.resume();
    fleet[1].wait_for(
        || state(&fleet[1])["routes"]["user"]["breaker"]["state"] == "open",
        "instance 1 to roll back on instance 0's word",
    );
    eprintln!("fault → both instances rolled back: {:?}", t0.elapsed());
    let s1 = state(&fleet[1]);
    assert_eq!(s1["routes"]["user"]["mode"], "observe");
    assert!(
        fleet[1]
            .log()
            .contains("rolled back to observe by another instance"),
        "{}",
        fleet[1].log()
    );
    // A fleet change to another pattern leaves both breakers open (only a change to the pattern closes it).
    fleet[1].put_config(json!({"patterns": {"project": {"ttl_secs": 120}}}));
    converge(&fleet, "the unrelated change", |s| {
        s["fleet"]["version"] == 3
    });
    for svc in &fleet {
        assert_eq!(state(svc)["routes"]["user"]["breaker"]["state"], "open");
    }
}

#[test]
fn the_fleet_state_needs_an_admin_token_to_sign_it() {
    let mut child = command()
        .args(["serve", "--config-dir"])
        .arg(repo().join("config"))
        .env("CACHE_ROLLOUT_CACHE__FLEET__ENABLED", "true")
        .env("BIND_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cache-rollout serve");
    // It must refuse to start; were it to run, the test stops it rather than hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cache-rollout serve started without an admin token");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin_token") && err.contains("signed"),
        "{err}"
    );
}
