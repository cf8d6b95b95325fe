//! The page at `/internal/cache/ui` in a real browser: Debian's chromium, driven through chromedriver (WebDriver,
//! the `fantoccini` crate), against the reference service (`cache-rollout serve`) under load and a real Redis. The
//! test takes the screenshots in `target/ui-screenshots/`; with `UPDATE_SCREENSHOTS=1` it also writes the two in
//! `docs/` that the README shows.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use support::{free_port, repo, RedisServer, Service, TOKEN};

/// `chromedriver` on a free loopback port, killed when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    fn start() -> Self {
        let bin = std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} (install Debian's chromium and chromium-driver): {e}")
            });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::blocking::get(format!("{url}/status")).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {url}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ChromeDriver { child, url }
    }

    /// A headless chromium session with a laptop's window.
    async fn session(&self) -> Client {
        let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--hide-scrollbars", "--window-size=1366,900", "--lang=en-US"],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests to the three routes from two clients until stopped, at most 5 minutes and 1,000,000 requests.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, users: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..2u64)
            .map(|w| {
                let (stop, sent, base) = (stop.clone(), sent.clone(), base.to_string());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("client");
                    let mut rng = support::Rng(0x0b5e_55ed + w);
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(300)
                        && sent.load(Ordering::Relaxed) < 1_000_000
                    {
                        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                        let path = match rng.below(10) {
                            0..=5 => format!("/users/{}", 1 + (u * u * users as f64) as u64),
                            6..=8 => {
                                format!("/projects/{}", 1 + (u * u * (users / 10) as f64) as u64)
                            }
                            _ => format!(
                                "/projects/{}/members",
                                1 + (u * (users / 10) as f64) as u64
                            ),
                        };
                        let status = client
                            .get(format!("{base}{path}"))
                            .send()
                            .map(|r| r.status().as_u16());
                        assert!(matches!(status, Ok(200)), "GET {path}: {status:?}");
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            threads,
        }
    }

    fn wait_for(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.sent.load(Ordering::Relaxed) < n {
            assert!(
                !self
                    .threads
                    .iter()
                    .any(std::thread::JoinHandle::is_finished),
                "a load worker stopped (an answer other than 200, or its bound) after {} requests",
                self.sent.load(Ordering::Relaxed)
            );
            assert!(
                Instant::now() < deadline,
                "the load sent {} of {n}",
                self.sent.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load worker (every answer 200)");
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// The text of the first element matching `css`.
async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// Waits (up to 20 s) until `ok` holds for the text of `css`, and returns that text.
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = match c.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{css} never held what was expected; last: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the first element matching `css`, finding it again when a refresh replaced it in between.
async fn click(c: &Client, css: &str) {
    let mut tries = 0;
    loop {
        let clicked = match c.find(Locator::Css(css)).await {
            Ok(e) => e.click().await,
            Err(e) => Err(e),
        };
        match clicked {
            Ok(()) => return,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("click {css}: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("click {css}: {e}"),
        }
    }
}

/// One browser test at a time: two chromiums and a service on two cores make every deadline tight.
static ONE_BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Types `token` into the page's token field and submits it.
async fn use_token(c: &Client, token: &str) {
    let field = c.find(Locator::Id("token")).await.expect("the token field");
    field.clear().await.expect("clear");
    field.send_keys(token).await.expect("type the token");
    click(c, "#token-form button[type=submit]").await;
    wait_text(c, "#token-state", |t| t.contains("token set")).await;
}

/// The whole page as a PNG: the window made as tall as the document, then back.
async fn screenshot(c: &Client, name: &str) {
    // Twice: the layout at the new size can be taller than at the old one.
    for _ in 0..2 {
        let height = c
            .execute("return document.documentElement.scrollHeight;", vec![])
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .unwrap_or(900)
            .clamp(900, 4000);
        c.set_window_size(1366, height as u32 + 120)
            .await
            .expect("resize");
    }
    c.execute("window.scrollTo(0, 0);", vec![])
        .await
        .expect("scroll to the top");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = c.screenshot().await.expect("screenshot");
    c.set_window_size(1366, 900).await.expect("resize");
    assert_eq!(&png[1..4], b"PNG", "{name} is a PNG");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    std::fs::write(dir.join(name), &png).expect("write the screenshot");
    if std::env::var("UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        std::fs::write(repo().join("docs").join(name), &png)
            .expect("write the screenshot into docs/");
    }
}

/// The runtime the browser is driven from.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs blocking work (the test's HTTP client) on the browser's runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `routes.user` and the whitelist from `GET /internal/cache`.
fn user_route(svc: &Service) -> (String, f64, Vec<String>, String) {
    let (_, state, _) = svc.get("/internal/cache?pattern=user");
    let r = &state["routes"]["user"];
    (
        r["configured_mode"].as_str().unwrap_or("").to_string(),
        r["ramp_percent"].as_f64().unwrap_or(-1.0),
        state["whitelist"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        state["impl"].as_str().unwrap_or("").to_string(),
    )
}

/// Loads the page against the reference service under load, checks its sections and curves, is refused with a
/// wrong token, takes `user` through shadow → ramp 25% → serve with the right one (each step checked against
/// `GET /internal/cache`), and sees the page show the served pattern with its measured point.
#[test]
fn the_page_in_chromium_takes_a_pattern_from_shadow_to_serve_under_load() {
    let _one = ONE_BROWSER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    const USERS: u64 = 2000;
    // A known maxmemory: the served pattern's share, where its measured point is drawn, comes from it.
    let redis =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    // The shipped default.toml, with the rollback rules off and a 1 s read deadline: the test is of the page's flow,
    // and a debug build beside chromium on two cores reads Redis slowly now and then, which the default rules (a
    // 50 ms deadline, 1% of reads over 25 ms) would rightly act on.
    let config = support::config_with(
        "[cache]\nread_timeout_ms = 1000\n\n[cache.rollback]\nenabled = false\n",
    );
    let svc = Service::start_with(
        config.path(),
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("CACHE_ADMIN_TOKEN", TOKEN),
            ("RUST_LOG", "warn"),
        ],
        &["--users", &USERS.to_string()],
    );
    let load = Load::start(&svc.base, USERS);
    load.wait_for(3000);
    let driver = ChromeDriver::start();
    runtime().block_on(browse(&svc, &load, &driver));
    let sent = load.stop();
    eprintln!("{sent} requests sent while the page was open");
    let (_, state, _) = svc.get("/internal/cache");
    assert_eq!(
        state["patterns"]["user"]["gets"].as_u64().map(|g| g > 0),
        Some(true)
    );
}

/// The browser's part of the test above.
async fn browse(svc: &Service, load: &Load, driver: &ChromeDriver) {
    let c = driver.session().await;
    c.goto(&format!("{}/internal/cache/", svc.base))
        .await
        .expect("open the page");
    assert!(
        c.current_url()
            .await
            .expect("url")
            .path()
            .ends_with("/internal/cache/ui"),
        "redirected"
    );

    // Observe: the state, a card per pattern with its curve, the shared curve, the candidate routes.
    assert_eq!(text(&c, "#impl").await, "null");
    for p in ["user", "project", "project:*:members"] {
        let card = format!("article[data-pattern=\"{p}\"]");
        assert!(
            text(&c, &format!("{card} h3"))
                .await
                .contains("mode: observe"),
            "{p}"
        );
        let lines = c
            .find_all(Locator::Css(&format!("{card} svg.curve polyline")))
            .await
            .expect("polylines");
        assert!(!lines.is_empty(), "{p}: a predicted curve");
    }
    assert!(!c
        .find_all(Locator::Css("#shared svg.curve polyline"))
        .await
        .expect("shared")
        .is_empty());
    assert!(text(&c, "#routes-by-traffic")
        .await
        .contains("GET /users/{id}"));
    // The page refreshes itself.
    wait_text(&c, "#updated", |t| t.starts_with("updated")).await;
    screenshot(&c, "ui-observe.png").await;

    // A wrong token: the error is shown, nothing changes.
    use_token(&c, "wrong-token-0123456789").await;
    click(
        &c,
        "article[data-pattern=\"user\"] button[data-action=\"shadow\"]",
    )
    .await;
    let said = wait_text(&c, "#result", |t| t.contains("refused")).await;
    assert!(
        said.contains("401") && said.contains("missing or wrong bearer token"),
        "{said}"
    );
    assert_eq!(blocking(|| user_route(svc)).3, "null");

    // The right token: shadow, ramp 25%, serve; each the same PUT the runbook sends, checked in the JSON state.
    use_token(&c, TOKEN).await;
    let steps = [
        ("shadow", "shadow", 100.0),
        ("ramp 25%", "serve", 25.0),
        ("serve 100%", "serve", 100.0),
    ];
    for (action, mode, ramp) in steps {
        click(
            &c,
            &format!("article[data-pattern=\"user\"] button[data-action=\"{action}\"]"),
        )
        .await;
        let said = wait_text(&c, "#result", |t| {
            t.contains("done") || t.contains("refused") || t.contains("failed")
        })
        .await;
        assert!(said.contains("done"), "{action}: {said}");
        let (configured, ramp_percent, whitelist, cache_impl) = blocking(|| user_route(svc));
        assert_eq!(
            (configured.as_str(), ramp_percent),
            (mode, ramp),
            "{action}"
        );
        assert_eq!(cache_impl, "redis", "{action}");
        assert!(
            whitelist.contains(&"user".to_string()),
            "{action}: {whitelist:?}"
        );
        // The page shows the new mode after its refresh.
        let want = if ramp < 100.0 {
            format!("mode: {mode} {ramp}% of keys")
        } else {
            format!("mode: {mode}")
        };
        wait_text(&c, "article[data-pattern=\"user\"] h3", |t| {
            t.ends_with(&want)
        })
        .await;
        wait_text(&c, "#result", |t| !t.contains("sending")).await;
    }

    // Served: the switch is called out, the served hit ratio is measured and drawn on the curve.
    // Long enough for the served hit ratio to climb towards the prediction (the screenshot shows both).
    blocking(|| load.wait_for(load.sent.load(Ordering::Relaxed) + 20_000));
    assert_eq!(text(&c, "#impl").await, "redis");
    wait_text(&c, "#just-switched", |t| t.contains("Switched")).await;
    wait_text(&c, "article[data-pattern=\"user\"] td.served", |t| {
        t.ends_with('%')
    })
    .await;
    wait_text(&c, "article[data-pattern=\"user\"] svg.curve", |t| {
        t.contains("measured")
    })
    .await;
    // Paused, the page holds still: its table and its curve show the same measured hit ratio.
    click(&c, "#pause").await;
    wait_text(&c, "#updated", |t| t == "paused").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let served = text(&c, "article[data-pattern=\"user\"] td.served").await;
    let gets = text(&c, "article[data-pattern=\"user\"] table.figures td").await;
    // Longer than a refresh period, under load: a page that refreshed would show more gets.
    tokio::time::sleep(Duration::from_secs(
        cache_rollout::http::ui::REFRESH_SECS + 1,
    ))
    .await;
    assert_eq!(
        text(&c, "article[data-pattern=\"user\"] table.figures td").await,
        gets,
        "paused"
    );
    let measured_point = text(&c, "article[data-pattern=\"user\"] svg.curve").await;
    assert!(
        measured_point.contains(&format!("measured {served}")),
        "{measured_point:?} shows {served}"
    );
    assert!(text(&c, "#redis").await.starts_with("up ✓"));
    let ramped_calls = text(
        &c,
        "article[data-pattern=\"user\"] tr[data-arm=\"ramped\"] td",
    )
    .await;
    assert!(
        ramped_calls.parse::<u64>().is_ok_and(|n| n > 0),
        "{ramped_calls}"
    );
    screenshot(&c, "ui-serve.png").await;
    click(&c, "#pause").await;
    wait_text(&c, "#updated", |t| {
        t == "refreshing" || t.starts_with("updated")
    })
    .await;

    // Back to observe, and the page and the JSON agree.
    click(
        &c,
        "article[data-pattern=\"user\"] button[data-action=\"back to observe\"]",
    )
    .await;
    wait_text(&c, "article[data-pattern=\"user\"] h3", |t| {
        t.ends_with("mode: observe")
    })
    .await;
    assert_eq!(blocking(|| user_route(svc)).0, "observe");
    let now = text(
        &c,
        "article[data-pattern=\"user\"] button[aria-current=\"true\"]",
    )
    .await;
    assert_eq!(now, "back to observe (now)");

    // A what-if budget, without a reload (the token stays), and its recommendation applied.
    let field = c
        .find(Locator::Id("memory"))
        .await
        .expect("the memory field");
    field.send_keys("1MiB").await.expect("type a budget");
    click(&c, "#memory-form button[type=submit]").await;
    wait_text(&c, "#budget h3", |t| {
        t.contains("What if Redis had 1.0 MiB")
    })
    .await;
    assert!(c
        .current_url()
        .await
        .expect("url")
        .query()
        .is_some_and(|q| q.contains("memory=1MiB")));
    click(&c, "#apply").await;
    let said = wait_text(&c, "#result", |t| {
        t.contains("done") || t.contains("refused") || t.contains("failed")
    })
    .await;
    assert!(said.starts_with("apply the recommendation: done"), "{said}");
    // The whitelist the server answered (the page fetched the recommendation again just before sending it).
    let want: Vec<String> = said
        .rsplit_once("whitelist ")
        .map(|(_, w)| {
            w.trim_end_matches(')')
                .split(", ")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    assert!(!want.is_empty() && want[0] != "none", "{said}");
    let shown = want.join(", ");
    wait_text(&c, "#whitelist", |t| t == shown).await;
    let (_, _, whitelist, cache_impl) = blocking(|| user_route(svc));
    assert_eq!(
        (cache_impl.as_str(), &whitelist),
        ("redis", &want),
        "{said}"
    );
    c.close().await.expect("close the session");
}

/// In staging, reading needs the token, as for the JSON endpoints: the page shows no figure until the token is
/// typed in, a wrong one is refused, the right one shows the figures.
#[test]
fn in_staging_the_page_in_chromium_shows_figures_only_with_the_token() {
    let _one = ONE_BROWSER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let svc = Service::start_with(
        &repo().join("config"),
        &[
            ("APP_ENV", "staging"),
            ("CACHE_ADMIN_TOKEN", TOKEN),
            ("RUST_LOG", "warn"),
        ],
        &["--users", "100"],
    );
    for id in 1..=20 {
        assert_eq!(svc.get(&format!("/users/{id}")).0, 200);
    }
    let driver = ChromeDriver::start();
    runtime().block_on(async {
        let c = driver.session().await;
        c.goto(&format!("{}/internal/cache/ui", svc.base))
            .await
            .expect("open the page");
        assert!(text(&c, "#needs-token")
            .await
            .contains("needs the admin token"));
        let cards = c.find_all(Locator::Css("article[data-pattern]")).await;
        assert!(
            cards.expect("cards").is_empty(),
            "no figure without the token"
        );
        use_token(&c, "wrong-token-0123456789").await;
        let said = wait_text(&c, "#result", |t| t.contains("401")).await;
        assert!(said.contains("missing or wrong bearer token"), "{said}");
        let cards = c.find_all(Locator::Css("article[data-pattern]")).await;
        assert!(cards.expect("cards").is_empty(), "none with a wrong one");
        use_token(&c, TOKEN).await;
        wait_text(&c, "article[data-pattern=\"user\"] h3", |t| {
            t.contains("mode: observe")
        })
        .await;
        assert_eq!(text(&c, "#impl").await, "null");
        c.close().await.expect("close the session");
    });
}
