//! The `cache-rollout` binary as a user runs it: `serve` in a real process, and `replay` on the real traces.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{command, metric, repo, RedisServer, Service, TOKEN};

fn trace(name: &str) -> PathBuf {
    repo().join("../shared/traces").join(name)
}

#[test]
fn serve_walkthrough_observe_switch_to_redis_and_shut_down_cleanly() {
    let redis = RedisServer::start();
    let mut svc = Service::start(
        &repo().join("config"),
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("CACHE_ADMIN_TOKEN", TOKEN),
        ],
    );
    assert!(
        svc.log().contains("cache: enabled impl=null whitelist=[]"),
        "{}",
        svc.log()
    );
    for _ in 0..2 {
        let (s, body, _) = svc.get("/users/1");
        assert_eq!((s, body["id"].as_i64()), (200, Some(1)));
    }
    let (_, state, _) = svc.get("/internal/cache");
    assert_eq!(state["impl"], "null");
    assert_eq!(state["patterns"]["user"]["gets"], 2);

    let state = svc.put_config(json!({"impl": "redis", "whitelist": ["user"]}));
    assert_eq!(state["impl"], "redis");
    for _ in 0..2 {
        assert_eq!(svc.get("/users/1").0, 200);
    }
    let (_, _, metrics) = svc.get("/metrics");
    assert!(
        metric(
            &metrics,
            r#"cache_hits_total{impl="redis",key_pattern="user"}"#
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        svc.log().contains("impl=redis whitelist=[user]"),
        "the swap is logged: {}",
        svc.log()
    );
    // At the default INFO level the per-operation spans print nothing; and a log that is not a terminal gets no
    // colour codes.
    assert!(!svc.log().contains("cache_op"), "{}", svc.log());
    assert!(!svc.log().contains('\u{1b}'), "ANSI codes: {}", svc.log());

    svc.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = svc.child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
}

#[test]
fn json_logs_have_a_debug_span_per_cache_operation_and_an_event_per_swap() {
    let redis = RedisServer::start();
    let svc = Service::start(
        &repo().join("config"),
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("CACHE_ADMIN_TOKEN", TOKEN),
            ("CACHE_ROLLOUT_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,cache_rollout::cache=debug"),
        ],
    );
    svc.put_config(json!({"impl": "redis", "whitelist": ["user"]}));
    for _ in 0..2 {
        assert_eq!(svc.get("/users/7").0, 200);
    }
    let lines = |svc: &Service| -> Vec<Value> {
        svc.log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let is_op = |l: &Value, op: &str| {
        l["span"]["name"] == "cache_op"
            && l["span"]["operation"] == op
            && l["span"]["backend"] == "redis"
            && l["span"]["key"] == "user:7"
            && l["level"] == "DEBUG"
            && l["fields"]["message"] == "close"
            && l["fields"]["time.busy"].is_string()
    };
    // The miss: a read, a lease, a fill; the hit: a read.
    svc.wait_for(
        || lines(&svc).iter().filter(|l| is_op(l, "get")).count() >= 2,
        "two cache_op get spans",
    );
    let all = lines(&svc);
    for op in ["lease", "set_leased"] {
        assert!(
            all.iter().any(|l| is_op(l, op)),
            "no {op} span: {}",
            svc.log()
        );
    }
    let swaps: Vec<&Value> = all
        .iter()
        .filter(|l| {
            l["level"] == "INFO"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cache: enabled"))
        })
        .collect();
    assert_eq!(swaps.len(), 2, "start-up and the PUT: {}", svc.log());
    assert_eq!(swaps[0]["fields"]["source"], "startup");
    assert_eq!(swaps[1]["fields"]["source"], "api");
    assert_eq!(swaps[1]["fields"]["reason"], "api");
    assert!(swaps[1]["fields"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("impl=redis whitelist=[user]")));
}

#[test]
fn sighup_rereads_the_configuration_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_token = "first-token-0123456789";
    std::fs::write(
        dir.path().join("default.toml"),
        format!("[cache]\nadmin_token = \"{old_token}\"\nimpl = \"null\"\n"),
    )
    .expect("write");
    let svc = Service::start(dir.path(), &[]);
    std::fs::write(
        dir.path().join("default.toml"),
        format!(
            "[cache]\nadmin_token = \"{TOKEN}\"\nimpl = \"memory\"\nwhitelist = [\"project\"]\nvalue_version = 3\n\
             [cache.patterns.project]\nttl_secs = 30\n"
        ),
    )
    .expect("write");
    svc.signal("-HUP");
    svc.wait_for(
        || svc.get("/internal/cache").1["impl"] == "memory",
        "the reload",
    );
    let (_, state, _) = svc.get("/internal/cache");
    assert_eq!(state["whitelist"], json!(["project"]));
    assert_eq!(state["policy"]["patterns"]["project"]["ttl_secs"], 30);
    assert_eq!(
        state["swaps"]
            .as_array()
            .expect("swaps")
            .last()
            .expect("swap")["source"],
        "sighup"
    );
    assert!(
        svc.log().contains("cache.value_version"),
        "restart-only keys are named: {}",
        svc.log()
    );
    // The rotated token is in force (requests are sent with the new TOKEN).
    let (s, _, text) = svc
        .request(
            reqwest::Method::PUT,
            "/internal/cache/config",
            Some(json!({"whitelist": ["user"]})),
        )
        .expect("PUT");
    assert_eq!(s, 200, "{text}");

    // A broken file keeps the running state.
    std::fs::write(
        dir.path().join("default.toml"),
        "[cache]\nimpl = \"redsi\"\n",
    )
    .expect("write");
    svc.signal("-HUP");
    svc.wait_for(
        || svc.log().contains("previous state kept"),
        "the refusal in the log",
    );
    assert_eq!(svc.get("/internal/cache").1["impl"], "memory");
}

#[test]
fn production_answers_404_under_internal() {
    let svc = Service::start(
        &repo().join("config"),
        &[("APP_ENV", "production"), ("CACHE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(svc.get("/internal/cache").0, 404);
    assert_eq!(svc.get("/users/1").0, 200);
}

#[test]
fn bad_configuration_stops_start_up_naming_key_and_value() {
    for (var, value) in [
        ("CACHE_IMPL", "redsi"),
        ("APP_ENV", "prod"),
        ("REDIS_URL", "not a url"),
        ("BIND_ADDR", "nowhere"),
    ] {
        let out = command()
            .args(["serve", "--config-dir"])
            .arg(repo().join("config"))
            .env(var, value)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} must stop start-up");
        assert!(
            err.contains(var) || err.contains(&var.to_lowercase()),
            "{var}: {err}"
        );
        assert!(err.contains(value), "{var}: {err}");
    }
}

/// `cache-rollout replay --impl IMP --json TRACE`, which must succeed, parsed.
fn replay_json(cache_impl: &str, trace: &Path) -> Value {
    let out = command()
        .args(["replay", "--impl", cache_impl, "--json"])
        .arg(trace)
        .output()
        .expect("run replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[test]
fn replay_of_the_mixed_trace_reports_the_three_patterns() {
    let report = replay_json("memory", &trace("mixed.twitter.csv.zst"));
    let p = &report["patterns"];
    // Request counts from ../shared/traces/README.md.
    assert_eq!(p["oltp:page"]["requests"], 914_145);
    assert_eq!(p["ws:blk"]["requests"], 238_578);
    assert_eq!(p["vm:lbn"]["requests"], 113_872);
    assert_eq!(p["vm:lbn"]["gets"], 46_974);
    assert_eq!(p["oltp:page"]["gets"], 914_145);
    assert_eq!(report["overall"]["requests"], 1_266_595);
    assert_eq!(report["malformed_lines"], 0);
    for name in ["oltp:page", "ws:blk", "vm:lbn"] {
        let c = &p[name];
        let (gets, hits, misses) = (c["gets"].as_u64(), c["hits"].as_u64(), c["misses"].as_u64());
        assert_eq!(
            gets,
            hits.zip(misses).map(|(h, m)| h + m),
            "{name}: gets = hits + misses"
        );
        let ratio = c["hit_ratio"].as_f64().expect("ratio");
        assert!((0.0..=1.0).contains(&ratio), "{name}: {ratio}");
    }
    // A cache of 100,000 objects must hit: the exact LRU figure for oltp:page at that size is 0.78.
    assert!(p["oltp:page"]["hit_ratio"].as_f64().expect("ratio") > 0.3);
}

#[test]
fn replay_of_an_arc_trace_uses_block_keys() {
    let report = replay_json("null", &trace("arc-p3.lis.zst"));
    assert_eq!(report["patterns"]["block"]["requests"], 238_578);
    assert_eq!(
        report["patterns"]["block"]["hits"], 0,
        "the NullCache never hits"
    );
}

#[test]
fn replay_skips_malformed_lines_or_stops_with_strict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.twitter.csv");
    std::fs::write(
        &path,
        "0,user:1,6,100,1,get,0\n1,user:1,6,100,1,get,0\nthis line is wrong\n2,user:1,6,100,1,frob,0\n3,user:2,6,100,1,get,0\n",
    )
    .expect("write");
    let out = command()
        .args(["replay", "--impl", "memory", "--json"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("line 4"), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["malformed_lines"], 2);
    assert_eq!(report["patterns"]["user"]["requests"], 3);
    assert_eq!(report["patterns"]["user"]["hits"], 1);

    let out = command()
        .args(["replay", "--strict"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 3"));
}

/// Mean absolute error of `predicted` against `exact`, over the capacities of `exact`, and the largest error.
fn errors(predicted: &Value, exact: &Value) -> (f64, f64) {
    let exact = exact.as_object().expect("capacity map");
    let mut sum = 0.0;
    let mut max: f64 = 0.0;
    for (capacity, e) in exact {
        let p = predicted[capacity]
            .as_f64()
            .unwrap_or_else(|| panic!("no prediction at {capacity}: {predicted}"));
        let err = (p - e.as_f64().expect("exact ratio")).abs();
        sum += err;
        max = max.max(err);
    }
    (sum / exact.len() as f64, max)
}

#[test]
fn replay_predicts_the_exact_lru_hit_ratios_of_the_mixed_trace() {
    // Target of issue 3: mean absolute error at most 0.02 per pattern over capacities 1,000 to 100,000.
    let exact: Value = serde_json::from_str(
        &std::fs::read_to_string(trace("mixed.lru-exact.json")).expect("exact LRU figures"),
    )
    .expect("JSON");
    let out = command()
        .args([
            "replay",
            "--json",
            "--capacities",
            "1000,10000,50000,100000",
        ])
        .arg(trace("mixed.twitter.csv.zst"))
        .output()
        .expect("run replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    for (name, e) in exact["patterns"].as_object().expect("patterns") {
        let p = &report["patterns"][name];
        let (mae, max) = errors(&p["predicted_hit_ratio"], &e["lru_hit_ratio"]);
        eprintln!("{name}: mean absolute error {mae:.4}, largest {max:.4}");
        assert!(mae <= 0.02, "{name}: MAE {mae} > 0.02: {p}");
        let unique = p["unique_keys"].as_f64().expect("unique_keys");
        let exact_unique = e["unique_keys"].as_f64().expect("exact unique");
        assert!(
            (unique / exact_unique - 1.0).abs() < 0.05,
            "{name}: {unique} distinct keys estimated, {exact_unique} exact"
        );
    }
    let (mae, max) = errors(
        &report["overall"]["predicted_hit_ratio"],
        &exact["overall"]["lru_hit_ratio"],
    );
    eprintln!("all patterns in one cache: mean absolute error {mae:.4}, largest {max:.4}");
    assert!(mae <= 0.02, "overall MAE {mae}: {}", report["overall"]);
}

#[test]
fn replay_against_a_redis_with_maxmemory_prints_measured_beside_predicted() {
    // The first 200,000 requests of the mixed trace into a Redis of 8 MiB evicting by (approximate) LRU.
    let dir = tempfile::tempdir().expect("tempdir");
    let slice = dir.path().join("slice.twitter.csv");
    let reader = BufReader::new(
        zstd::stream::read::Decoder::new(
            std::fs::File::open(trace("mixed.twitter.csv.zst")).expect("trace"),
        )
        .expect("zstd"),
    );
    let lines: Vec<String> = reader
        .lines()
        .take(200_000)
        .map(|l| l.expect("line"))
        .collect();
    std::fs::write(&slice, lines.join("\n")).expect("write slice");
    let redis =
        RedisServer::start_with(&["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"]);
    let out = command()
        .args(["replay", "--impl", "redis", "--json", "--redis-url"])
        .arg(redis.url())
        .arg(&slice)
        .output()
        .expect("run replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["redis_maxmemory_bytes"], 8 * 1024 * 1024);
    let measured = report["overall"]["hit_ratio"].as_f64().expect("measured");
    let predicted = report["predicted_hit_ratio_at_maxmemory"]
        .as_f64()
        .expect("prediction at maxmemory");
    eprintln!("8 MiB allkeys-lru: measured {measured:.4}, predicted {predicted:.4}");
    assert!(
        report["redis_baseline_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0 && b < 8 << 20),
        "{report}"
    );
    assert!(measured > 0.0, "{report}");
    assert!(
        (measured - predicted).abs() < 0.05,
        "measured {measured} vs predicted {predicted}"
    );
    // The table shows both (a shorter slice: only the line matters here).
    let short = dir.path().join("short.twitter.csv");
    std::fs::write(&short, lines[..20_000].join("\n")).expect("write slice");
    let out = command()
        .args(["replay", "--impl", "redis", "--redis-url"])
        .arg(redis.url())
        .arg(&short)
        .output()
        .expect("run replay");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("redis maxmemory 8388608 bytes (") && table.contains("measured hit ratio"),
        "{table}"
    );
}

#[test]
fn report_subcommand_prints_the_running_service_analysis() {
    let svc = Service::start(&repo().join("config"), &[("CACHE_ADMIN_TOKEN", TOKEN)]);
    for round in 0..3 {
        for id in 1..=400 {
            assert_eq!(svc.get(&format!("/users/{id}")).0, 200, "round {round}");
        }
    }
    let out = command()
        .args(["report", "--url", &svc.base])
        .output()
        .expect("run report");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("key_pattern") && table.contains("user "),
        "{table}"
    );
    assert!(table.contains("recommended whitelist: [user"), "{table}");
    assert!(table.contains("GET /users/{id}"), "{table}");

    let out = command()
        .args(["report", "--json", "--url", &svc.base])
        .output()
        .expect("run report");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["patterns"]["user"]["gets"], 1200);
    assert_eq!(report["patterns"]["user"]["unique_keys"], 400);

    let out = command()
        .args(["report", "--url", "http://127.0.0.1:1"])
        .output()
        .expect("run report");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("report from http://127.0.0.1:1/internal/cache/report"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
