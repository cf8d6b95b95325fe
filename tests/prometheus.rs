//! The shipped monitoring (`config/prometheus/`, `grafana/`) against a real Prometheus (Debian's `prometheus`
//! package; `scripts/test.sh` installs it) scraping the reference service under load.
//!
//! - `promtool check config`, `check rules`, `test rules` (the alert unit tests) and `check metrics` (on a scrape of
//!   `/metrics`) pass with no warning.
//! - The Grafana dashboard is a valid, importable model: every panel has a query, on the `datasource` variable.
//! - With Prometheus scraping the service through observe, shadow and serve, and a Redis pause that makes the
//!   service roll back, every dashboard query (template variables substituted as Grafana does) and every recording
//!   rule parses and returns at least one series, every metric name they use exists, every rule evaluates without
//!   error, and the rollback and folding alerts become active.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::{repo, RedisServer, Service, TOKEN};

fn prometheus_dir() -> PathBuf {
    repo().join("config/prometheus")
}

fn dashboard() -> Value {
    let path = repo().join("grafana/dashboards/cache-rollout.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard file");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// A Prometheus tool, by name or from `$var`; panics with the install hint when it is missing.
fn tool(var: &str, name: &str) -> String {
    let bin = std::env::var(var).unwrap_or_else(|_| name.to_string());
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{bin}` not found: install Debian's `prometheus` package (scripts/test.sh does) or set {var}"
    );
    bin
}

/// Runs `promtool ARGS` (with `stdin` piped in when given); its exit status and its whole output.
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(tool("PROMTOOL_BIN", "promtool"))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(input);
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_configuration_and_the_rules_and_their_unit_tests_pass() {
    let config = prometheus_dir().join("prometheus.yml");
    let rules = prometheus_dir().join("rules.yml");
    let tests = prometheus_dir().join("rules_test.yml");
    for args in [
        vec!["check", "config", config.to_str().expect("path")],
        vec!["check", "rules", rules.to_str().expect("path")],
        vec!["test", "rules", tests.to_str().expect("path")],
    ] {
        let (ok, out) = promtool(&args, None);
        assert!(ok, "promtool {args:?} failed:\n{out}");
        assert!(out.contains("SUCCESS"), "promtool {args:?}:\n{out}");
        assert!(
            !out.to_lowercase().contains("warn"),
            "promtool {args:?} warned:\n{out}"
        );
    }
    // Each alert has unit tests, and each one is shown both firing and quiet.
    let rules_text = std::fs::read_to_string(&rules).expect("rules.yml");
    let tests_text = std::fs::read_to_string(&tests).expect("rules_test.yml");
    let alerts: Vec<&str> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "alerts: {alerts:?}");
    for a in alerts {
        let cases: Vec<&str> = tests_text
            .split("alertname: ")
            .skip(1)
            .filter(|c| c.starts_with(&format!("{a}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{a}: no case where it stays quiet"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{a}: no case where it fires"
        );
    }
}

/// Every panel of the model, rows' nested panels included.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

#[test]
fn the_dashboard_is_an_importable_grafana_model_with_a_query_in_every_panel() {
    let d = dashboard();
    assert_eq!(d["uid"], "cache-rollout");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    // Grafana's schema (@grafana/schema) wants a variable's `current` to hold `text` and `value`, or be absent.
    for v in vars {
        assert!(
            v.get("current").is_none() || v["current"]["value"] != Value::Null,
            "variable {}: an empty `current`",
            v["name"]
        );
    }
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance"] {
        assert_eq!(var(name)["type"], "query");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}");
    }
    let mut ids = std::collections::HashSet::new();
    let mut queries = 0;
    for p in all_panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(
            g["x"].as_u64().unwrap_or(99) + g["w"].as_u64().unwrap_or(99) <= 24,
            "{title}: wider than the grid"
        );
        let kind = p["type"].as_str().expect("panel type");
        if kind == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat", "table"].contains(&kind),
            "{title}: panel type {kind}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: a panel without a query");
        let mut refs = std::collections::HashSet::new();
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: empty query"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: duplicate refId"
            );
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let annotations: Vec<&Value> = d["annotations"]["list"]
        .as_array()
        .expect("annotations")
        .iter()
        .filter(|a| a["builtIn"] != 1)
        .collect();
    let names: Vec<&str> = annotations
        .iter()
        .map(|a| a["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["Swaps", "Rollbacks"]);
    for a in annotations {
        assert!(a["target"]["expr"].as_str().is_some_and(|e| !e.is_empty()));
        assert!(a["target"]["refId"].is_string());
        assert_eq!(a["datasource"]["uid"], "${datasource}");
    }
}

/// A Prometheus server of the test's own, on a free loopback port, storing into a temporary directory.
struct Prometheus {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
    http: reqwest::blocking::Client,
}

impl Prometheus {
    fn start(config: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let (ok, out) = promtool(
            &["check", "config", config_path.to_str().expect("path")],
            None,
        );
        assert!(ok, "the test's configuration:\n{out}");
        let port = support::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(tool("PROMETHEUS_BIN", "prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("HTTP client"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !p
            .http
            .get(format!("{}/-/ready", p.base))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/PATH`: its `data`, or Prometheus's error (a query that does not parse, say).
    fn api(&self, path: &str, params: &[(&str, String)]) -> Result<Value, String> {
        let resp = self
            .http
            .get(format!("{}/api/v1/{path}", self.base))
            .query(params)
            .send()
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// The series of a range query over `window` (1 s steps), as Grafana's time-series panels run them.
    fn range(&self, expr: &str, window: (f64, f64)) -> Result<Vec<Value>, String> {
        let data = self.api(
            "query_range",
            &[
                ("query", expr.to_string()),
                ("start", window.0.to_string()),
                ("end", window.1.to_string()),
                ("step", "1".into()),
            ],
        )?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The series of an instant query at `at`, as Grafana's `instant` targets (stat, table) run them.
    fn instant(&self, expr: &str, at: f64) -> Result<Vec<Value>, String> {
        let data = self.api(
            "query",
            &[("query", expr.to_string()), ("time", at.to_string())],
        )?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The metric names an expression reads: identifiers outside string literals that are metric names (not functions,
/// keywords, label names or durations), keeping recorded names (`level:metric:operation`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut plain = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in expr.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, c) => plain.push(c),
        }
    }
    plain
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("cache_") || t.contains(":cache_") || *t == "ALERTS")
        .map(str::to_string)
        .collect()
}

/// Grafana's substitution: `$__rate_interval`, `$__interval`, `$__range`, then the dashboard's own variables.
fn substitute(expr: &str, vars: &[(String, String)]) -> String {
    let mut out = expr.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("${name}"), value);
    }
    assert!(!out.contains('$'), "unsubstituted variable in {out}");
    out
}

/// Load on the reference service's three routes (and a write now and then) from three threads, until `stop`;
/// bounded in time (240 s) and count (2 M requests a thread). Counts responses other than 200 and 404 in `failures`.
fn drive(
    base: &str,
    stop: &Arc<AtomicBool>,
    failures: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..3u64)
        .map(|w| {
            let (base, stop, failures) = (base.to_string(), Arc::clone(stop), Arc::clone(failures));
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("HTTP client");
                let limit = Instant::now() + Duration::from_secs(240);
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (w + 1);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit && sent < 2_000_000 {
                    // xorshift; the square skews ids towards 1, so there is reuse to hit.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let r = (x % 10_000) as f64 / 10_000.0;
                    let user = 1 + (r * r * 300.0) as u64;
                    let project = 1 + (r * r * 60.0) as u64;
                    let mut requests = vec![
                        (reqwest::Method::GET, format!("/users/{user}"), None),
                        (reqwest::Method::GET, format!("/projects/{project}"), None),
                        (reqwest::Method::GET, format!("/projects/{project}/members"), None),
                    ];
                    if sent.is_multiple_of(200) {
                        requests.push((
                            reqwest::Method::PUT,
                            format!("/users/{user}"),
                            Some(json!({"name": format!("User {user} v{sent}"), "email": format!("u{user}@example.com")})),
                        ));
                    }
                    for (method, path, body) in requests {
                        let mut req = http.request(method, format!("{base}{path}"));
                        if let Some(b) = body {
                            req = req.json(&b);
                        }
                        let ok = req
                            .send()
                            .is_ok_and(|r| r.status().is_success() || r.status().as_u16() == 404);
                        if !ok {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect()
}

#[test]
fn every_dashboard_query_and_recording_rule_returns_series_from_a_real_prometheus_under_load() {
    let redis = RedisServer::start();
    let url = redis.url();
    let svc = Service::start_with(
        &repo().join("config"),
        &[
            ("APP_ENV", "test"),
            ("FEATURE_CACHE", "true"),
            ("CACHE_IMPL", "null"),
            ("REDIS_URL", &url),
            ("CACHE_ADMIN_TOKEN", TOKEN),
            // Two named patterns; the third (project:*:members) folds into "other", for the folding alert.
            ("CACHE_ROLLOUT_CACHE__MAX_PATTERNS", "2"),
        ],
        &["--users", "400", "--origin-delay-ms", "1"],
    );
    // The patterns' first sight in a fixed order, so that user and project take the two named slots.
    for path in ["/users/1", "/projects/1", "/projects/1/members"] {
        assert_eq!(svc.get(path).0, 200, "{path}");
    }

    // The shipped scrape configuration, pointed at this service, scraping and evaluating every second.
    let shipped =
        std::fs::read_to_string(prometheus_dir().join("prometheus.yml")).expect("prometheus.yml");
    let target = svc.base.trim_start_matches("http://");
    let rules = prometheus_dir().join("rules.yml");
    let mut config = shipped.clone();
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        (
            "evaluation_interval: 15s",
            "evaluation_interval: 1s".to_string(),
        ),
        ("- 127.0.0.1:8900", format!("- {target}")),
        ("- rules.yml", format!("- {}", rules.display())),
    ] {
        assert!(
            config.contains(from),
            "prometheus.yml no longer has `{from}`"
        );
        config = config.replace(from, &to);
    }
    let prom = Prometheus::start(&config);
    let start = now();

    // Observe, then shadow and serve through Redis, then a Redis pause long enough for a rollback.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let workers = drive(&svc.base, &stop, &failures);
    std::thread::sleep(Duration::from_secs(6));
    svc.put_config(json!({
        "impl": "redis",
        "whitelist": ["user", "project"],
        "patterns": {"project": {"mode": "shadow"}},
        "rollback": {"min_calls": 20, "cooldown_secs": 2, "probe_calls": 20},
    }));
    std::thread::sleep(Duration::from_secs(6));
    svc.put_config(json!({"patterns": {"project": {"mode": "serve"}}}));
    std::thread::sleep(Duration::from_secs(6));
    let rollbacks = |svc: &Service| -> f64 {
        svc.get("/metrics")
            .2
            .lines()
            .filter(|l| l.starts_with("cache_rollback_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = rollbacks(&svc);
    redis.pause();
    svc.wait_for(
        || rollbacks(&svc) > before,
        "a rollback while Redis is paused",
    );
    redis.resume();
    // The cool-down (2 s), then the half-open probe closes the breakers and the patterns are served again.
    let closed = |svc: &Service| {
        let state = svc.get("/internal/cache").1;
        ["user", "project"].iter().all(|p| {
            state["routes"][p]["breaker"].is_null() && state["routes"][p]["mode"] == "serve"
        })
    };
    svc.wait_for(|| closed(&svc), "the breakers to close after the pause");
    std::thread::sleep(Duration::from_secs(2));
    let scrape = svc.get("/metrics").2;
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = workers
        .into_iter()
        .map(|w| w.join().expect("load thread"))
        .sum();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests under load"
    );
    assert!(sent > 100, "only {sent} requests");
    // Two more scrapes and rule evaluations after the last request.
    std::thread::sleep(Duration::from_secs(3));
    let end = now();
    let window = (start, end);

    // The scrape passes promtool's linter, and docs/metrics.md documents every family in it.
    let (ok, out) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).expect("docs/metrics.md");
    let families: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() >= 19, "{families:?}");
    for f in families {
        assert!(
            doc.contains(&format!("### `{f}`")),
            "docs/metrics.md does not document {f}"
        );
    }
    // The rollback and the swaps were logged (text format), with their reasons.
    let log = svc.log();
    let rollback = log
        .lines()
        .find(|l| l.contains("cache: rolled back to observe"));
    assert!(
        rollback.is_some_and(|l| l.contains("WARN") && l.contains("reason=")),
        "no rollback event in the log:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("INFO")
            && l.contains("source=\"api\"")
            && l.contains("impl=redis")),
        "no swap event in the log:\n{log}"
    );

    let names: Vec<String> = serde_json::from_value(
        prom.api("label/__name__/values", &[])
            .expect("metric names"),
    )
    .expect("names");
    // One slow scrape on a busy machine must not fail the test: up at least once in the last 10 s.
    let up = prom
        .instant("max_over_time(up{job=\"cache-rollout\"}[10s]) == 1", end)
        .expect("up");
    assert_eq!(
        up.len(),
        1,
        "the service is not scraped: {up:?}\n{}",
        prom.log()
    );
    let mut problems = Vec::new();
    let check_names = |what: &str, expr: &str, problems: &mut Vec<String>| {
        for n in metric_names(expr) {
            if !names.contains(&n) {
                problems.push(format!("{what}: no metric {n} in Prometheus"));
            }
        }
    };

    // Template variables, resolved in order as Grafana does: each query must return values; multi-value
    // variables take their "All" value, single ones the first value.
    let d = dashboard();
    let mut vars: Vec<(String, String)> = vec![
        ("__rate_interval".into(), "5s".into()),
        // Grafana's minimum for panels that set one ("1m") is far longer than this test: 5 s windows hold 5 scrapes.
        ("__interval".into(), "5s".into()),
        (
            "__range".into(),
            format!("{}s", (end - start).ceil() as u64),
        ),
    ];
    for v in d["templating"]["list"].as_array().expect("variables") {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().expect("name").to_string();
        let query = substitute(v["query"].as_str().expect("query"), &vars);
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name}: not a label_values() query: {query}"));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        check_names(&format!("variable {name}"), selector, &mut problems);
        let values: Vec<String> = serde_json::from_value(
            prom.api(
                &format!("label/{}/values", label.trim()),
                &[
                    ("match[]", selector.trim().to_string()),
                    ("start", start.to_string()),
                    ("end", end.to_string()),
                ],
            )
            .unwrap_or_else(|e| panic!("variable {name}: {e}")),
        )
        .expect("label values");
        assert!(!values.is_empty(), "variable {name}: no values for {query}");
        let value = if v["includeAll"] == true {
            v["allValue"].as_str().expect("allValue").to_string()
        } else {
            values[0].clone()
        };
        vars.push((name, value));
    }
    // Longest names first, so `$__interval` does not eat `$__interval_ms` and the like.
    vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));

    // A query passes when it parses, returns a series with at least one finite value (NaN everywhere is a
    // broken ratio or quantile), and every `{{label}}` of its legend is a label of some series it returned (a
    // typo in a `by (...)` clause would leave the legend blank).
    let run =
        |what: String, expr: &str, legend: &str, instant: bool, problems: &mut Vec<String>| {
            let q = substitute(expr, &vars);
            check_names(&what, &q, problems);
            let result = if instant {
                prom.instant(&q, end)
            } else {
                prom.range(&q, window)
            };
            let series = match result {
                Err(e) => return problems.push(format!("{what}: {e}\n  {q}")),
                Ok(series) => series,
            };
            let finite = |v: &Value| {
                v[1].as_str()
                    .and_then(|x| x.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            };
            let has_finite = series.iter().any(|s| {
                s["values"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(finite))
                    || finite(&s["value"])
            });
            if !has_finite {
                return problems.push(format!(
                    "{what}: no series with a finite value ({} series)\n  {q}",
                    series.len()
                ));
            }
            for label in legend
                .split("{{")
                .skip(1)
                .filter_map(|x| x.split_once("}}"))
                .map(|(l, _)| l.trim())
            {
                if !series.iter().any(|s| s["metric"][label].is_string()) {
                    problems.push(format!(
                        "{what}: legend label {label} is on no series\n  {q}"
                    ));
                }
            }
        };
    let mut count = 0;
    for p in all_panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let what = format!(
                "panel \"{}\" {}",
                p["title"].as_str().unwrap_or_default(),
                t["refId"]
            );
            run(
                what,
                t["expr"].as_str().expect("expr"),
                t["legendFormat"].as_str().unwrap_or_default(),
                t["instant"] == true,
                &mut problems,
            );
            count += 1;
        }
    }
    for a in d["annotations"]["list"].as_array().expect("annotations") {
        if let Some(expr) = a["target"]["expr"].as_str() {
            let legend = format!(
                "{} {}",
                a["titleFormat"].as_str().unwrap_or_default(),
                a["textFormat"].as_str().unwrap_or_default()
            );
            run(
                format!("annotation {}", a["name"]),
                expr,
                &legend,
                false,
                &mut problems,
            );
            count += 1;
        }
    }

    // The rules as Prometheus loaded them: all evaluate cleanly; recording rules return series, both their
    // expression and the series they record; alert expressions parse.
    let groups = prom.api("rules", &[]).expect("rules");
    let mut recording = 0;
    let mut alerting = 0;
    for g in groups["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["name"].as_str().expect("rule name");
            if r["health"] != "ok" {
                problems.push(format!(
                    "rule {name}: health {} {}",
                    r["health"], r["lastError"]
                ));
            }
            let expr = r["query"].as_str().expect("rule query");
            if r["type"] == "recording" {
                recording += 1;
                run(
                    format!("recording rule {name}"),
                    expr,
                    "",
                    false,
                    &mut problems,
                );
                run(
                    format!("recorded series {name}"),
                    name,
                    "",
                    false,
                    &mut problems,
                );
            } else {
                alerting += 1;
                check_names(&format!("alert {name}"), expr, &mut problems);
                if let Err(e) = prom.range(expr, window) {
                    problems.push(format!("alert {name}: {e}"));
                }
            }
        }
    }
    assert!(
        recording >= 8 && alerting >= 6,
        "{recording} recording rules, {alerting} alerts"
    );
    // The two alerts this run provokes became active (pending or firing).
    for alert in ["CacheRolledBack", "CacheKeyPatternsFolded"] {
        run(
            format!("alert {alert} active"),
            &format!("ALERTS{{alertname=\"{alert}\"}}"),
            "",
            false,
            &mut problems,
        );
    }
    assert!(
        problems.is_empty(),
        "{} of {count} dashboard queries and the rules failed:\n{}\nprometheus log:\n{}",
        problems.len(),
        problems.join("\n"),
        prom.log()
    );
}

/// A registry serving key pattern `item` from `redis`, with a read deadline of `read_timeout_ms`, its predictions
/// made for 1 GiB of Redis memory.
async fn item_registry(redis: &RedisServer, read_timeout_ms: u64) -> cache_rollout::CacheRegistry {
    use cache_rollout::analysis::AnalysisOptions;
    use cache_rollout::cache::{CacheImpl, RedisOptions};
    use cache_rollout::{CacheRegistry, Policy, RegistryOptions};
    CacheRegistry::new(
        RegistryOptions::default()
            .with_policy(Policy {
                cache_impl: CacheImpl::Redis,
                whitelist: vec!["item".into()],
                read_timeout_ms,
                ..Policy::default()
            })
            .with_redis(RedisOptions::default().with_url(redis.url()))
            .with_analysis(AnalysisOptions {
                redis_memory_bytes: Some(1 << 30),
                ..AnalysisOptions::default()
            }),
    )
    .await
    .expect("registry")
}

/// The served hit ratio checked against the prediction counts only gets served throughout: a shadow period, a
/// ramp's unramped keys and a rollback are left out (the A/B arms compare those). Here 100 keys are read in shadow
/// mode (which fills Redis), then at a 50% ramp, then fully served: every fully served get hits, so the figure is
/// exactly 1, where counting from the start of the whitelist would give about a half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_hit_ratio_counts_from_when_the_pattern_is_fully_served() {
    use cache_rollout::{CacheRegistry, Mode, PatternPolicy, PolicyUpdate};

    let redis = RedisServer::start();
    let mode = |mode, ramp| PolicyUpdate {
        patterns: Some(
            [(
                "item".to_string(),
                PatternPolicy {
                    mode: Some(mode),
                    ramp_percent: ramp,
                    ..PatternPolicy::default()
                },
            )]
            .into(),
        ),
        ..PolicyUpdate::default()
    };
    let registry = item_registry(&redis, 2000).await;
    let read_all = || async {
        for id in 0..100 {
            let v: String = registry
                .get_or_load(&format!("item:{id}"), || async {
                    Ok::<_, std::convert::Infallible>(format!("value {id}"))
                })
                .await
                .expect("value");
            assert_eq!(v, format!("value {id}"));
        }
    };
    let served = |registry: &CacheRegistry| registry.report().patterns["item"].served_hit_ratio;
    // Nothing reads the figure in shadow mode here: the switch itself restarts it.
    registry
        .switch(&mode(Mode::Shadow, None))
        .await
        .expect("shadow");
    read_all().await;
    registry
        .switch(&mode(Mode::Serve, None))
        .await
        .expect("serve");
    read_all().await;
    assert_eq!(
        served(&registry),
        Some(1.0),
        "only the served gets, all hits"
    );

    registry
        .switch(&mode(Mode::Shadow, None))
        .await
        .expect("shadow");
    for _ in 0..3 {
        read_all().await;
    }
    assert_eq!(served(&registry), None, "not checked in shadow mode");
    registry
        .switch(&mode(Mode::Serve, Some(50.0)))
        .await
        .expect("ramp");
    read_all().await;
    assert_eq!(served(&registry), None, "not checked during a ramp");
    registry
        .switch(&mode(Mode::Serve, None))
        .await
        .expect("serve");
    assert_eq!(served(&registry), None, "no get since it is fully served");
    for _ in 0..3 {
        read_all().await;
    }
    assert_eq!(served(&registry), Some(1.0), "every get since then hit");
}

/// The check of the prediction after the switch, end to end: a registry serving a pattern from a real Redis of
/// 2 MiB while its prediction is made for 1 GiB (`cache.analysis.redis_memory_bytes`: Redis was given less memory
/// than predicted). A loop over 8 MiB of values hits nearly always in 1 GiB and never in 2 MiB, so the gauge pair
/// drifts apart; the gauges as scraped are then fed to promtool, which must fire `CacheHitRatioBelowPrediction`
/// after its 30 minutes (and not before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_alert_fires_when_redis_has_less_memory_than_predicted() {
    use cache_rollout::cache::CacheImpl;

    let redis =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let registry = item_registry(&redis, cache_rollout::Policy::default().read_timeout_ms).await;
    assert_eq!(registry.policy().cache_impl, CacheImpl::Redis);
    let value = "x".repeat(2000);
    for _round in 0..6 {
        for id in 0..4000 {
            let v: String = registry
                .get_or_load(&format!("item:{id}"), || async {
                    Ok::<_, std::convert::Infallible>(value.clone())
                })
                .await
                .expect("value");
            assert_eq!(v.len(), 2000);
        }
    }
    let gauge = |name: &str| -> f64 {
        registry
            .metrics()
            .registry()
            .gather()
            .into_iter()
            .find(|f| f.name() == name)
            .and_then(|f| {
                f.get_metric()
                    .iter()
                    .find(|m| m.get_label().iter().any(|l| l.value() == "item"))
                    .map(|m| m.get_gauge().get_value())
            })
            .unwrap_or_else(|| panic!("{name}{{key_pattern=\"item\"}} not exported"))
    };
    let measured = gauge("cache_served_hit_ratio");
    let predicted = gauge("cache_served_predicted_hit_ratio");
    eprintln!("2 MiB Redis, predicted for 1 GiB: measured {measured:.3}, predicted {predicted:.3}");
    assert!(
        predicted - measured > 0.5,
        "measured {measured}, predicted {predicted}"
    );
    let report = registry.report();
    assert_eq!(report.patterns["item"].served_hit_ratio, Some(measured));

    // The scraped prediction, held for an hour, with the measured ratio as the served reads' counters (1,000 a
    // minute), through the shipped rules.
    let hits = (measured * 1000.0).round();
    let shown = format!("{:.2}", predicted - hits / 1000.0);
    let tests = format!(
        r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'cache_served_predicted_hit_ratio{{job="cache-rollout",instance="a:8900",key_pattern="item"}}'
        values: '{predicted}x60'
      - series: 'cache_hits_total{{job="cache-rollout",instance="a:8900",impl="redis",key_pattern="item"}}'
        values: '0+{hits}x60'
      - series: 'cache_miss_total{{job="cache-rollout",instance="a:8900",impl="redis",key_pattern="item"}}'
        values: '0+{misses}x60'
    alert_rule_test:
      - eval_time: 20m
        alertname: CacheHitRatioBelowPrediction
        exp_alerts: []
      - eval_time: 45m
        alertname: CacheHitRatioBelowPrediction
        exp_alerts:
          - exp_labels:
              severity: warning
              job: cache-rollout
              instance: a:8900
              key_pattern: item
            exp_annotations:
              summary: 'Key pattern item hit ratio {shown} below its prediction'
              description: 'Served key pattern item on a:8900 has hit at least 10 points below the hit ratio predicted for the Redis memory it has for 30 minutes (its served reads against cache_served_predicted_hit_ratio). Check Redis maxmemory and what else it holds, then GET /internal/cache/report?memory=<its maxmemory>; see docs/rollout.md.'
"#,
        rules = prometheus_dir().join("rules.yml").display(),
        misses = 1000.0 - hits,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("drift_test.yml");
    std::fs::write(&file, tests).expect("write the test");
    let (ok, out) = promtool(&["test", "rules", &file.display().to_string()], None);
    assert!(ok, "{out}");
}
