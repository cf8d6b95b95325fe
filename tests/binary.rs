//! The `cache-rollout` binary as a user runs it: `serve` in a real process, and `replay` on the real traces.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{metric, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_cache-rollout");
const TOKEN: &str = "binary-test-token-0123456789";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn trace(name: &str) -> PathBuf {
    repo().join("../shared/traces").join(name)
}

/// A `cache-rollout` command with none of the product's variables inherited from the test's environment.
fn command() -> Command {
    let mut c = Command::new(BIN);
    for v in [
        "APP_ENV",
        "FEATURE_CACHE",
        "CACHE_IMPL",
        "CACHE_PATTERNS",
        "REDIS_URL",
        "CACHE_ADMIN_TOKEN",
        "BIND_ADDR",
    ] {
        c.env_remove(v);
    }
    c.env("RUST_LOG", "info");
    c
}

struct Service {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Service {
    fn start(config_dir: &Path, env: &[(&str, &str)]) -> Service {
        let port = support::free_port();
        let mut cmd = command();
        cmd.arg("serve")
            .arg("--config-dir")
            .arg(config_dir)
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start cache-rollout serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().expect("log");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let s = Service {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        s.wait_for(
            || s.try_get("/health").is_some(),
            "the service to answer /health",
        );
        s
    }

    fn wait_for(&self, mut ok: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value, String)> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let mut req = client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().ok()?;
        let status = resp.status().as_u16();
        let text = resp.text().ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        ))
    }

    fn try_get(&self, path: &str) -> Option<(u16, Value, String)> {
        self.request(reqwest::Method::GET, path, None)
    }

    fn get(&self, path: &str) -> (u16, Value, String) {
        self.try_get(path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log()))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status();
        assert!(matches!(ok, Ok(s) if s.success()), "kill {sig}");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

    let (s, state, text) = svc
        .request(
            reqwest::Method::PUT,
            "/internal/cache/config",
            Some(json!({"impl": "redis", "whitelist": ["user"]})),
        )
        .expect("PUT");
    assert_eq!(s, 200, "{text}");
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
fn sighup_rereads_the_configuration_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_token = "first-token-0123456789";
    std::fs::write(
        dir.path().join("default.toml"),
        format!("admin_token = \"{old_token}\"\n[cache]\nimpl = \"null\"\n"),
    )
    .expect("write");
    let svc = Service::start(dir.path(), &[]);
    std::fs::write(
        dir.path().join("default.toml"),
        format!(
            "admin_token = \"{TOKEN}\"\n[cache]\nimpl = \"memory\"\nwhitelist = [\"project\"]\nvalue_version = 3\n\
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
fn replay_json(imp: &str, trace: &Path) -> Value {
    let out = command()
        .args(["replay", "--impl", imp, "--json"])
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
