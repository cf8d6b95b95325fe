//! A team's integration, as `docs/integration.md` describes it: `examples/existing_service.rs` run as a real
//! process against a real `redis-server` (observe, runtime switch, fleet, SIGHUP, production 404), and two
//! services built with [`CacheRollout`] on one Redis that never touch each other's keys or fleet state.

mod support;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cache_rollout::cache::CacheImpl;
use cache_rollout::config::Settings;
use cache_rollout::{CacheRollout, PolicyUpdate};
use serde_json::json;
use support::service::{command_for, Service, TOKEN};
use support::{metric, RedisServer};

/// `target/<profile>/examples/existing_service`, built before the tests by `scripts/test.sh` (`cargo test
/// --all-targets` builds examples only as test harnesses).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join("examples").join("existing_service");
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --example existing_service` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The example in `dir` (its working directory, holding `config/`), with none of the product's variables
/// inherited.
fn bookshop(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = command_for(example());
    c.current_dir(dir);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn write_config(dir: &Path, toml: &str) {
    std::fs::create_dir_all(dir.join("config")).expect("config dir");
    std::fs::write(dir.join("config/default.toml"), toml).expect("write default.toml");
}

/// The application keeps its own keys beside `[cache]`; the library must leave them alone.
const APP_KEYS: &str = "database_url = \"postgres://bookshop\"\n[server]\nworkers = 4\n";

#[test]
fn the_example_observes_switches_at_runtime_and_follows_the_fleet() {
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(
        dir.path(),
        &format!(
            "{APP_KEYS}[cache]\nimpl = \"null\"\n[cache.fleet]\nenabled = true\npoll_ms = 5000\n"
        ),
    );
    let env = [("REDIS_URL", url.as_str()), ("CACHE_ADMIN_TOKEN", TOKEN)];
    let a = Service::launch(bookshop(dir.path(), &env));
    let b = Service::launch(bookshop(dir.path(), &env));

    // Observe: both reads go to the origin, both are measured, and so is the route.
    for _ in 0..2 {
        let (s, book, _) = a.get("/books/1");
        assert_eq!((s, book["title"].as_str()), (200, Some("Book 1")));
    }
    let (_, state, _) = a.get("/internal/cache");
    assert_eq!(state["impl"], "null");
    assert_eq!(state["patterns"]["book"]["gets"], 2, "{state}");
    assert_eq!(state["patterns"]["book"]["misses"], 2, "{state}");
    let metrics = a.get("/metrics").2;
    assert_eq!(
        metric(
            &metrics,
            r#"cache_candidate_requests_total{method="GET",route="/books/{id}"}"#
        ),
        2.0,
        "{metrics}"
    );

    // The runtime switch on one instance; the other follows through the fleet state.
    a.put_config(json!({"impl": "redis", "whitelist": ["book"]}));
    b.wait_for(
        || b.get("/internal/cache").1["impl"] == "redis",
        "instance b to follow the fleet state",
    );
    assert_eq!(b.get("/books/2").1["stock"], 10);
    assert_eq!(b.get("/books/2").1["stock"], 10);
    let hits = r#"cache_hits_total{impl="redis",key_pattern="book"}"#;
    assert_eq!(metric(&b.get("/metrics").2, hits), 1.0);

    // The service's names in Redis come from its name, "bookshop".
    let mut conn = redis.conn();
    let exists = |conn: &mut redis::Connection, key: &str| -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query::<i64>(conn)
            .is_ok_and(|n| n == 1)
    };
    assert!(exists(&mut conn, "cr:bookshop:book:2"));
    assert!(exists(&mut conn, "cache-rollout:bookshop:fleet"));

    // A write on instance a invalidates the shared copy; a reads and refills it, and b is served the new stock
    // from Redis (b's own origin, a separate in-memory database, still says 10).
    let (s, _, text) = a
        .request(reqwest::Method::PUT, "/books/2", Some(json!({"stock": 3})))
        .expect("PUT /books/2");
    assert_eq!(s, 204, "{text}");
    assert!(!exists(&mut conn, "cr:bookshop:book:2"));
    assert_eq!(a.get("/books/2").1["stock"], 3);
    a.wait_for(
        || exists(&mut conn, "cr:bookshop:book:2"),
        "a's refill of book:2",
    );
    assert_eq!(b.get("/books/2").1["stock"], 3);
    assert!(
        !a.log().contains("database_url") && !a.log().contains("ERROR"),
        "{}",
        a.log()
    );
}

#[test]
fn the_example_rereads_its_configuration_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), &format!("{APP_KEYS}[cache]\nimpl = \"null\"\n"));
    let svc = Service::launch(bookshop(dir.path(), &[]));
    assert_eq!(svc.get("/internal/cache").1["impl"], "null");
    write_config(
        dir.path(),
        &format!("{APP_KEYS}[cache]\nimpl = \"memory\"\nwhitelist = [\"book\"]\n"),
    );
    svc.signal("-HUP");
    svc.wait_for(
        || svc.get("/internal/cache").1["impl"] == "memory",
        "the SIGHUP reload",
    );
    svc.get("/books/3");
    svc.get("/books/3");
    let hits = r#"cache_hits_total{impl="memory",key_pattern="book"}"#;
    assert_eq!(metric(&svc.get("/metrics").2, hits), 1.0);
}

#[test]
fn the_example_hides_internal_in_production_and_refuses_an_unknown_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), APP_KEYS);
    let svc = Service::launch(bookshop(
        dir.path(),
        &[("APP_ENV", "production"), ("CACHE_ADMIN_TOKEN", TOKEN)],
    ));
    for (method, path) in [
        (reqwest::Method::GET, "/internal/cache"),
        (reqwest::Method::GET, "/internal/cache/report"),
        (reqwest::Method::PUT, "/internal/cache/config"),
        (reqwest::Method::GET, "/internal/anything"),
    ] {
        let (status, _, _) = svc
            .request(method.clone(), path, Some(json!({"impl": "null"})))
            .expect("request");
        assert_eq!(status, 404, "{method} {path}");
    }
    assert_eq!(svc.get("/books/1").0, 200, "the service itself works");
    assert_eq!(svc.get("/metrics").0, 200, "metrics stay scrapeable");

    // An unknown environment stops start-up with a message naming it.
    let out = bookshop(dir.path(), &[("APP_ENV", "prod")])
        .env("BIND_ADDR", format!("127.0.0.1:{}", support::free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("APP_ENV") && err.contains("prod"), "{err}");
}

fn settings(redis_url: &str, fleet: bool) -> Settings {
    let mut s = Settings::default();
    s.cache.cache_impl = CacheImpl::Redis;
    s.cache.whitelist = vec!["*".into()];
    s.cache.redis.url = redis_url.into();
    s.cache.admin_token = Some(TOKEN.into());
    s.cache.fleet.enabled = fleet;
    s.cache.fleet.poll_ms = 100;
    s
}

async fn read(cache: &CacheRollout, key: &str, origin: &'static str) -> String {
    let v: Result<String, Infallible> = cache
        .registry()
        .get_or_load(key, || async move { Ok(origin.to_string()) })
        .await;
    v.unwrap_or_else(|e| match e {})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_on_one_redis_never_flush_invalidate_or_steer_each_other() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = CacheRollout::builder("shop-a")
        .settings(settings(&url, true))
        .build()
        .await
        .expect("a");
    let b = CacheRollout::builder("shop-b")
        .settings(settings(&url, true))
        .build()
        .await
        .expect("b");
    for (cache, name) in [(&a, "a"), (&b, "b")] {
        let s = cache.registry().state().await;
        assert_eq!(s.cache_impl, CacheImpl::Redis, "{name}: {:?}", s.swaps);
    }
    assert_eq!(read(&a, "user:1", "from a").await, "from a");
    assert_eq!(read(&b, "user:1", "from b").await, "from b");
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cr:*user:1")
        .query(&mut conn)
        .expect("KEYS");
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, ["cr:shop-a:user:1", "cr:shop-b:user:1"]);

    // a's pattern deletion, and a's flush when Redis becomes active again, stay under a's prefix.
    a.registry()
        .invalidate_pattern("user")
        .await
        .expect("invalidate");
    for to in [CacheImpl::Null, CacheImpl::Redis] {
        let update = PolicyUpdate {
            cache_impl: Some(to),
            ..Default::default()
        };
        a.registry().switch(&update).await.expect("switch");
    }
    assert_eq!(
        read(&b, "user:1", "b's origin again").await,
        "from b",
        "b's entry survived a's invalidation and flush"
    );

    // a's fleet change is a's alone.
    let (fa, fb) = (a.fleet().expect("a fleet"), b.fleet().expect("b fleet"));
    assert_ne!(fa.status().key, fb.status().key);
    let update = PolicyUpdate {
        whitelist: Some(vec!["project".into()]),
        ..Default::default()
    };
    fa.write(&a.registry().policy(), &update, "test")
        .await
        .expect("write a's fleet state");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.registry().policy().whitelist != ["project"] {
        assert!(
            std::time::Instant::now() < deadline,
            "a never applied its own change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ten of b's poll periods later, b still runs its own policy.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(b.registry().policy().whitelist, ["*"]);
}
