//! The reference service's HTTP surface, driven in process with `tower::ServiceExt::oneshot`.

mod support;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use axum::Router;
use cache_rollout::config::{AppEnv, Settings};
use cache_rollout::http::{internal_router, AdminToken, InternalState};
use cache_rollout::{CacheRegistry, CacheRollout, RegistryOptions};
use serde_json::{json, Value};
use support::router::call;
use support::{metric, RedisServer};

const TOKEN: &str = "test-admin-token-0123456789";

/// The reference service's catalog, compiled here from the binary's source: it uses nothing but the library's
/// public API.
#[allow(dead_code, unreachable_pub)]
#[path = "../src/bin/cache-rollout/catalog.rs"]
mod catalog;

async fn service(mut settings: Settings) -> Router {
    settings.cache.redis.connect_timeout_ms = 500;
    let cache = CacheRollout::builder("catalog")
        .settings(settings)
        .build()
        .await
        .expect("cache");
    catalog::app(
        &cache,
        catalog::Origin::seeded(100, Duration::ZERO).expect("origin"),
    )
}

fn settings(redis_url: Option<String>, token: Option<&str>) -> Settings {
    let mut s = Settings::default();
    s.cache.admin_token = token.map(str::to_string);
    if let Some(url) = redis_url {
        s.cache.redis.url = url;
    }
    s
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value, String) {
    call(app, Method::GET, uri, None, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_user_walkthrough_observe_then_switch_user_to_redis() {
    let server = RedisServer::start();
    let app = service(settings(Some(server.url()), Some(TOKEN))).await;

    for _ in 0..2 {
        let (s, body, _) = get(&app, "/users/1").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["id"], 1);
    }
    let (_, state, _) = get(&app, "/internal/cache").await;
    assert_eq!(state["impl"], "null");
    assert_eq!(state["enabled"], true);
    assert_eq!(state["whitelist"], json!([]));
    assert_eq!(state["patterns"]["user"]["gets"], 2);
    assert_eq!(state["patterns"]["user"]["hits"], 0);

    let (s, state, text) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(TOKEN),
        Some(json!({"impl": "redis", "whitelist": ["user"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(state["impl"], "redis");
    assert_eq!(state["whitelist"], json!(["user"]));
    assert_eq!(state["redis"]["up"], true);

    for _ in 0..2 {
        let (s, body, _) = get(&app, "/users/1").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["name"], "User 1");
    }
    let (_, _, metrics) = get(&app, "/metrics").await;
    assert!(
        metric(
            &metrics,
            r#"cache_hits_total{impl="redis",key_pattern="user"}"#
        ) >= 1.0,
        "{metrics}"
    );
    let (_, state, _) = get(&app, "/internal/cache").await;
    let swaps = state["swaps"].as_array().expect("swaps");
    assert_eq!(swaps.last().expect("a swap")["source"], "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_then_ramp_then_serve_through_the_api() {
    let server = RedisServer::start();
    let app = service(settings(Some(server.url()), Some(TOKEN))).await;
    let put = |body: Value| {
        call(
            &app,
            Method::PUT,
            "/internal/cache/config",
            Some(TOKEN),
            Some(body),
        )
    };

    let (s, state, text) = put(json!({"impl": "redis", "whitelist": ["user"],
        "patterns": {"user": {"mode": "shadow"}}}))
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(state["routes"]["user"]["mode"], "shadow", "{state}");
    for _ in 0..3 {
        for id in 1..=20 {
            assert_eq!(get(&app, &format!("/users/{id}")).await.0, StatusCode::OK);
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // shadow fills run in the background
    }
    let (_, state, _) = get(&app, "/internal/cache").await;
    let user = &state["routes"]["user"];
    assert_eq!(user["shadow"]["miss"], 20, "{user}");
    assert!(user["shadow"]["match"].as_u64() >= Some(20), "{user}");
    assert_eq!(user["shadow"]["mismatch"], 0, "{user}");
    assert_eq!(state["patterns"]["user"]["hits"], 0, "shadow never serves");

    let (s, state, text) =
        put(json!({"patterns": {"user": {"mode": "serve", "ramp_percent": 50}}})).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(state["routes"]["user"]["ramp_percent"], 50.0);
    for id in 1..=20 {
        get(&app, &format!("/users/{id}")).await;
    }
    let (_, state, _) = get(&app, "/internal/cache").await;
    let user = &state["routes"]["user"];
    let (ramped, unramped) = (&user["ramped"], &user["unramped"]);
    assert_eq!(
        ramped["calls"].as_u64().unwrap_or(0) + unramped["calls"].as_u64().unwrap_or(0),
        20,
        "{user}"
    );
    assert_eq!(user["shadowed"]["calls"], 60, "{user}");
    assert!(ramped["calls"].as_u64() >= Some(1), "{user}");
    assert_eq!(
        ramped["hit_ratio"], 1.0,
        "the shadow fills are served: {user}"
    );
    assert_eq!(unramped["hit_ratio"], 0.0);

    let (s, _, text) = put(json!({"patterns": {"user": {"ramp_percent": 150}}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(text.contains("cache.patterns.user.ramp_percent"), "{text}");
}

#[tokio::test]
async fn put_requires_the_bearer_token() {
    let app = service(settings(None, Some(TOKEN))).await;
    let body = Some(json!({"impl": "memory", "whitelist": ["user"]}));
    let (s, _, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        None,
        body.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "no token");
    let (s, _, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some("wrong-token-wrong-token"),
        body.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "wrong token");
    let (s, _, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(&TOKEN[..TOKEN.len() - 1]),
        body.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a prefix of the token");
    let (_, state, _) = get(&app, "/internal/cache").await;
    assert_eq!(state["impl"], "null", "nothing changed");
    let (s, state, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(TOKEN),
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(state["impl"], "memory");
}

#[tokio::test]
async fn put_is_forbidden_without_a_configured_token() {
    let app = service(settings(None, None)).await;
    let (s, body, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some("anything-at-all-here"),
        Some(json!({"impl": "memory"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(body["error"]
        .as_str()
        .expect("message")
        .contains("CACHE_ADMIN_TOKEN"));
}

#[tokio::test]
async fn bad_bodies_get_400_with_a_message() {
    let app = service(settings(None, Some(TOKEN))).await;
    for (body, needle) in [
        (json!({"impl": "redsi"}), "redsi"),
        (
            json!({"impl": "memory", "whitelits": ["user"]}),
            "whitelits",
        ),
        (json!({"whitelist": ["bad pattern"]}), "bad pattern"),
        (json!({"patterns": {"user": {"ttl_secs": 0}}}), "ttl_secs"),
        (json!(["not", "an", "object"]), "bad body"),
    ] {
        let (s, resp, text) = call(
            &app,
            Method::PUT,
            "/internal/cache/config",
            Some(TOKEN),
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {text}");
        assert!(
            resp["error"].as_str().expect("message").contains(needle),
            "{text}"
        );
    }
}

#[tokio::test]
async fn unreachable_redis_is_refused_with_503_and_the_old_state_kept() {
    let url = format!("redis://127.0.0.1:{}", support::free_port());
    let app = service(settings(Some(url), Some(TOKEN))).await;
    let (s, body, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(TOKEN),
        Some(json!({"impl": "redis", "whitelist": ["user"]})),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"]
        .as_str()
        .expect("message")
        .contains("previous state kept"));
    let (_, state, _) = get(&app, "/internal/cache").await;
    assert_eq!(state["impl"], "null");
    assert_eq!(
        state["swaps"]
            .as_array()
            .expect("swaps")
            .last()
            .expect("swap")["ok"],
        false
    );
}

#[tokio::test]
async fn production_hides_everything_under_internal() {
    let mut s = settings(None, Some(TOKEN));
    s.app_env = AppEnv::Production;
    let app = service(s).await;
    for (method, uri) in [
        (Method::GET, "/internal/cache"),
        (Method::PUT, "/internal/cache/config"),
        (Method::GET, "/internal/cache/report"),
        (Method::GET, "/internal/anything/else"),
        (Method::GET, "/internal"),
        (Method::GET, "/internal/cache/ui"),
        (Method::GET, "/internal/cache/ui?part=main"),
        (Method::GET, "/internal/cache/ui/page.js"),
        (Method::GET, "/internal/cache/"),
    ] {
        let (status, _, _) = call(&app, method.clone(), uri, Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}");
    }
    let (s, _, _) = get(&app, "/users/1").await;
    assert_eq!(s, StatusCode::OK, "the service itself still works");
}

/// The `http` module's example as written (the library's pieces merged by hand): with the environment production,
/// every path under `/internal/` answers 404, whatever the application mounted.
#[tokio::test]
async fn the_internal_router_is_closed_in_production_however_it_is_mounted() {
    let registry = CacheRegistry::new(RegistryOptions::default())
        .await
        .expect("registry");
    let token = AdminToken::new(Some(TOKEN.into())).expect("a long token");
    let app = Router::new().merge(internal_router(
        InternalState::new(registry, token).with_env(AppEnv::Production),
    ));
    for (method, uri) in [
        (Method::GET, "/internal/cache"),
        (Method::PUT, "/internal/cache/config"),
        (Method::GET, "/internal/cache/report"),
        (Method::GET, "/internal/cache/ui"),
    ] {
        let (status, _, _) = call(&app, method.clone(), uri, Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}");
    }
}

/// A `GET` of `uri`, as the router answers it (headers included).
async fn response(app: &Router, uri: &str) -> axum::response::Response {
    use tower::ServiceExt;
    app.clone()
        .oneshot(
            axum::http::Request::get(uri)
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible")
}

/// The page's reading follows the JSON endpoints' rule: in staging, without the token, it is the page without a
/// figure (asking for the token) and a 401; its refreshed part answers the JSON error; with the token, the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_staging_the_page_asks_for_the_token_and_shows_nothing_without_it() {
    let mut s = settings(None, Some(TOKEN));
    s.app_env = AppEnv::Staging;
    let app = service(s).await;
    let (status, _, _) = get(&app, "/users/1").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, page) = get(&app, "/internal/cache/ui").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        page.contains("id=\"needs-token\"") && page.contains("id=\"token-form\""),
        "{page}"
    );
    assert!(
        !page.contains("data-pattern"),
        "no figure without the token: {page}"
    );
    // A browser's navigation carries no token: that page is not a refused read; a refused read of the figures is.
    let failures = |text: &str| metric(text, "cache_admin_auth_failures_total{action=\"read\"}");
    assert_eq!(failures(&get(&app, "/metrics").await.2), 0.0);
    let (status, body, _) = get(&app, "/internal/cache/ui?part=main").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "missing or wrong bearer token");
    assert_eq!(failures(&get(&app, "/metrics").await.2), 1.0);
    let (status, _, main) = call(
        &app,
        Method::GET,
        "/internal/cache/ui?part=main",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        main.contains("data-pattern=\"user\"") && !main.contains("<html"),
        "{main}"
    );
    // The script and the style hold no data: served without the token.
    let (status, _, js) = get(&app, "/internal/cache/ui/page.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(js.contains("/internal/cache/config"));
}

/// The page in development: every section, a what-if budget, a bad one said, and the
/// headers that keep it from being stored or from loading anything from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_every_section_and_a_what_if_budget() {
    let app = service(settings(None, Some(TOKEN))).await;
    for i in 0..600 {
        for path in [
            format!("/users/{}", i % 60 + 1),
            format!("/projects/{}", i % 8 + 1),
        ] {
            let (status, _, _) = get(&app, &path).await;
            assert_eq!(status, StatusCode::OK);
        }
    }
    let resp = response(&app, "/internal/cache/ui").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h["content-security-policy"]
        .to_str()
        .is_ok_and(|c| c.contains("default-src 'none'")));
    let (_, _, page) = get(&app, "/internal/cache/ui").await;
    for id in [
        "id=\"state\"",
        "id=\"patterns\"",
        "id=\"shared\"",
        "id=\"routes\"",
        "id=\"swaps\"",
    ] {
        assert!(page.contains(id), "{id}");
    }
    assert!(page.contains("data-pattern=\"user\"") && page.contains("data-pattern=\"project\""));
    assert!(page.contains("GET /users/{id}"), "candidate routes listed");
    assert!(
        page.matches("<svg").count() >= 3,
        "a curve per pattern and the shared one"
    );
    // Nothing from elsewhere: the only address in the page is the SVG namespace.
    let rest = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(!rest.contains("http://") && !rest.contains("https://"));

    let (status, _, page) = get(&app, "/internal/cache/ui?memory=1MiB").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("id=\"budget\"") && page.contains("What if Redis had 1.0 MiB"),
        "{page}"
    );
    let (status, _, page) = get(&app, "/internal/cache/ui?memory=lots").await;
    assert_eq!(status, StatusCode::OK, "a bad budget is said on the page");
    assert!(page.contains("id=\"memory-error\""));
    assert!(!page.contains("id=\"budget\""));

    let resp = response(&app, "/internal/cache/").await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/internal/cache/ui");
}

#[tokio::test]
async fn a_short_admin_token_is_refused_by_the_library() {
    let e = AdminToken::new(Some("12345".into())).expect_err("5 characters");
    assert!(e.to_string().contains("16"), "{e}");
    assert!(
        !e.to_string().contains("12345"),
        "the token is not echoed: {e}"
    );
    let mut s = settings(None, None);
    s.cache.admin_token = Some("short-token".into());
    let e = CacheRollout::builder("catalog")
        .settings(s)
        .build()
        .await
        .expect_err("a short token stops start-up");
    assert!(e.to_string().contains("admin_token"), "{e}");
}

#[tokio::test]
async fn state_redacts_the_redis_password_and_the_token() {
    let app = service(settings(
        Some("redis://:hunter2@127.0.0.1:1/0".into()),
        Some(TOKEN),
    ))
    .await;
    let (_, state, text) = get(&app, "/internal/cache").await;
    assert!(!text.contains("hunter2") && !text.contains(TOKEN), "{text}");
    assert_eq!(
        state["config"]["cache"]["redis"]["url"],
        "redis://:***@127.0.0.1:1/0"
    );
}

#[tokio::test]
async fn candidate_routes_are_counted_by_matched_path() {
    let app = service(settings(None, None)).await;
    for uri in [
        "/users/1",
        "/users/2",
        "/projects/3/members",
        "/no/such/route",
    ] {
        get(&app, uri).await;
    }
    let (_, _, m) = get(&app, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            r#"cache_candidate_requests_total{method="GET",route="/users/{id}"}"#
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"cache_candidate_requests_total{method="GET",route="/projects/{id}/members"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"cache_candidate_requests_total{method="GET",route="unmatched"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(!m.contains("/users/1\""), "raw URIs never become labels");
    assert!(m.contains(
        r#"cache_candidate_request_duration_seconds_count{method="GET",route="/users/{id}"} 2"#
    ));
}

#[tokio::test]
async fn put_user_invalidates_the_cached_copy() {
    let mut s = settings(None, Some(TOKEN));
    s.cache.cache_impl = cache_rollout::cache::CacheImpl::Memory;
    s.cache.whitelist = vec!["user".into()];
    let app = service(s).await;
    let (_, before, _) = get(&app, "/users/5").await;
    assert_eq!(before["name"], "User 5");
    get(&app, "/users/5").await;
    let (_, state, _) = get(&app, "/internal/cache").await;
    assert_eq!(
        state["patterns"]["user"]["hits"], 1,
        "the copy is cached before the write"
    );
    let (s, _, _) = call(
        &app,
        Method::PUT,
        "/users/5",
        None,
        Some(json!({"name": "Renamed", "email": "r@example.com"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, after, _) = get(&app, "/users/5").await;
    assert_eq!(after["name"], "Renamed", "no stale read after the write");
    let (s, _, _) = get(&app, "/users/99999").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body, _) = get(&app, "/projects/1/members").await;
    assert_eq!(s, StatusCode::OK);
    assert!(!body.as_array().expect("members").is_empty());
    let (s, _, _) = get(&app, "/health").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn renaming_a_user_refreshes_the_member_lists_that_show_them() {
    let mut s = settings(None, Some(TOKEN));
    s.cache.cache_impl = cache_rollout::cache::CacheImpl::Memory;
    s.cache.whitelist = vec!["user".into(), "project:*:members".into()];
    let app = service(s).await;
    let (_, members, _) = get(&app, "/projects/1/members").await;
    let owner = members
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["role"] == "owner")
        .expect("an owner")["user_id"]
        .as_i64()
        .expect("id");
    get(&app, "/projects/1/members").await;
    let (_, state, _) = get(&app, "/internal/cache").await;
    assert_eq!(
        state["patterns"]["project:*:members"]["hits"], 1,
        "the list is cached before the rename"
    );
    let (s, _, _) = call(
        &app,
        Method::PUT,
        &format!("/users/{owner}"),
        None,
        Some(json!({"name": "New Name", "email": "n@example.com"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, members, _) = get(&app, "/projects/1/members").await;
    assert!(members.to_string().contains("New Name"), "{members}");
}

#[tokio::test]
async fn config_shows_the_configuration_in_force_after_a_switch() {
    let app = service(settings(None, Some(TOKEN))).await;
    let (_, state, _) = get(&app, "/internal/cache").await;
    assert_eq!(state["config"]["cache"]["impl"], "null");
    let body =
        json!({"impl": "memory", "whitelist": ["user"], "patterns": {"user": {"ttl_secs": 60}}});
    let (s, state, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(state["config"]["cache"]["impl"], "memory");
    assert_eq!(state["config"]["cache"]["whitelist"], json!(["user"]));
    assert_eq!(state["config"]["cache"]["patterns"]["user"]["ttl_secs"], 60);
    assert_eq!(state["config"]["cache"]["admin_token"], "***");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_under_load_predicts_attributes_routes_and_recommends_what_put_accepts() {
    let redis = RedisServer::start();
    let app = service(settings(Some(redis.url()), Some(TOKEN))).await;
    // Load: 15 rounds over the 100 users (1,500 gets of `user`), 12 rounds over 10 projects' member lists, and a
    // few renames (writes that invalidate).
    for round in 0..15 {
        let calls = (1..=100).map(|id| {
            let app = app.clone();
            async move { get(&app, &format!("/users/{id}")).await.0 }
        });
        for s in futures_util::future::join_all(calls).await {
            assert_eq!(s, StatusCode::OK, "round {round}");
        }
        if round < 12 {
            for p in 1..=10 {
                assert_eq!(
                    get(&app, &format!("/projects/{p}/members")).await.0,
                    StatusCode::OK
                );
            }
        }
        let (s, _, text) = call(
            &app,
            Method::PUT,
            &format!("/users/{}", round + 1),
            None,
            Some(json!({"name": format!("renamed {round}"), "email": format!("r{round}@example.com")})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{text}");
    }
    let (s, report, text) = get(&app, "/internal/cache/report").await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let user = &report["patterns"]["user"];
    assert_eq!(user["gets"], 1500, "{user}");
    assert_eq!(user["unique_keys"], 100, "{user}");
    assert_eq!(user["estimated"], true);
    // 100 cold misses, up to 15 reads after an invalidation: the rest hit in any cache of 100 objects or more.
    let at_1000 = user["predicted_hit_ratio"]["1000"]
        .as_f64()
        .expect("prediction");
    assert!(
        (1385.0 / 1500.0..=1400.0 / 1500.0).contains(&at_1000),
        "{user}"
    );
    assert_eq!(user["recommended"], true, "{user}");
    assert!(user["loader"]["calls"].as_u64() == Some(1500), "{user}");
    assert!(
        user["sizes"][0]["memory_bytes"].as_u64().unwrap_or(0) > 100 * 128,
        "{user}"
    );

    // Route × pattern: every GET /users/{id} makes one `user` get; its loader time is a share of the route's time.
    let routes = report["routes"].as_array().expect("routes");
    let users = routes
        .iter()
        .find(|r| r["route"] == "/users/{id}" && r["method"] == "GET")
        .unwrap_or_else(|| panic!("no GET /users/{{id}} in {routes:?}"));
    assert_eq!(users["requests"], 1500);
    let p = &users["patterns"][0];
    assert_eq!(p["key_pattern"], "user");
    assert_eq!(p["calls"], 1500);
    assert_eq!(p["calls_per_request"], 1.0);
    let share = p["share_of_route_time"].as_f64().expect("share");
    assert!(share > 0.0 && share < 1.0, "{users}");
    let members = routes
        .iter()
        .find(|r| r["route"] == "/projects/{id}/members")
        .expect("members route");
    assert!(
        members["patterns"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{members}"
    );

    // The gauge, bounded to the configured capacities.
    let (_, _, metrics) = get(&app, "/metrics").await;
    assert!(
        (metric(
            &metrics,
            r#"cache_predicted_hit_ratio{capacity="1000",key_pattern="user"}"#
        ) - at_1000)
            .abs()
            < 0.01,
        "{metrics}"
    );
    assert_eq!(
        metrics.matches("cache_predicted_hit_ratio{").count(),
        4 * (report["patterns"].as_object().map_or(0, |p| p.len()) + 1),
        "4 capacities per pattern with an estimator, and for all patterns together"
    );

    // The recommendation is a PUT body as it is.
    let apply = report["recommendation"]["apply"].clone();
    assert_eq!(apply["impl"], "redis");
    let (s, state, text) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(TOKEN),
        Some(apply),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(
        state["whitelist"]
            .as_array()
            .is_some_and(|w| w.contains(&json!("user"))),
        "{state}"
    );
    for _ in 0..2 {
        assert_eq!(get(&app, "/users/50").await.0, StatusCode::OK);
    }
    let (_, _, metrics) = get(&app, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"cache_hits_total{impl="redis",key_pattern="user"}"#
        ),
        1.0
    );
    // The whitelist now has its own curve: the cache that serves it, since the switch.
    let (_, report, _) = get(&app, "/internal/cache/report").await;
    assert_eq!(report["whitelist"]["gets"], 2, "{}", report["whitelist"]);
    assert_eq!(report["whitelist"]["unique_keys"], 1);
    assert_eq!(report["patterns"]["user"]["served"], true);
}

#[tokio::test]
async fn every_error_of_the_api_is_json() {
    let app = service(settings(None, Some(TOKEN))).await;
    let (s, body, text) = get(&app, "/users/abc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"abc\"")),
        "{text}"
    );
    let (s, body, _) = get(&app, "/projects/1.5/members").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body["error"].is_string());
    let (s, body, text) = call(
        &app,
        Method::PUT,
        "/users/1",
        None,
        Some(json!({"name": 5})),
    )
    .await;
    // axum's statuses are kept: 422 for a body of the wrong shape, 415 for a request without a JSON content type.
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(body["error"].is_string(), "{text}");
    let (s, body, text) = call(&app, Method::PUT, "/users/1", None, None).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{text}");
    assert!(body["error"].is_string(), "{text}");
    let (s, body, _) = get(&app, "/users/999999").await;
    assert_eq!(
        (s, &body["error"]),
        (StatusCode::NOT_FOUND, &json!("not found"))
    );
    let (s, body, _) = get(&app, "/no/such/route").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn in_staging_reading_needs_the_token_and_refusals_are_counted() {
    let mut s = settings(None, Some(TOKEN));
    s.app_env = cache_rollout::config::AppEnv::Staging;
    let app = service(s.clone()).await;
    for path in ["/internal/cache", "/internal/cache/report"] {
        let (status, _, text) = get(&app, path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {text}");
        assert!(!text.contains(TOKEN));
        let (status, _, _) = call(
            &app,
            Method::GET,
            path,
            Some("wrong-token-0123456789"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, body, _) = call(&app, Method::GET, path, Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(body.is_object());
    }
    let (_, _, metrics) = get(&app, "/metrics").await;
    assert_eq!(
        support::metric(&metrics, "cache_admin_auth_failures_total{action=\"read\"}"),
        4.0,
        "{metrics}"
    );
    let (status, _, _) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some("wrong-token-0123456789"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, _, metrics) = get(&app, "/metrics").await;
    assert_eq!(
        support::metric(
            &metrics,
            "cache_admin_auth_failures_total{action=\"change\"}"
        ),
        1.0
    );
    // Opened by configuration; and without a token configured, reading is refused outright.
    let mut open = s.clone();
    open.cache.internal_reads_open = true;
    let (status, _, _) = get(&service(open).await, "/internal/cache").await;
    assert_eq!(status, StatusCode::OK);
    let mut none = s;
    none.cache.admin_token = None;
    let (status, body, _) = get(&service(none).await, "/internal/cache").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("needs the admin token")));
    // In development anyone reads.
    let (status, _, _) = get(
        &service(settings(None, Some(TOKEN))).await,
        "/internal/cache",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// `Cache-Status` is on by default outside production, off in production, and `cache_status_header` decides.
#[tokio::test]
async fn cache_status_is_added_outside_production_unless_configured_otherwise() {
    use tower::ServiceExt;
    let header = |app: Router| async move {
        let req = axum::http::Request::get("/users/1")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = app.oneshot(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.headers()
            .get("cache-status")
            .map(|v| v.to_str().expect("ASCII").to_string())
    };
    let dev = service(settings(None, None)).await;
    assert_eq!(
        header(dev).await.as_deref(),
        Some("cache-rollout; fwd=bypass")
    );
    let mut prod = settings(None, Some(TOKEN));
    prod.app_env = AppEnv::Production;
    assert_eq!(header(service(prod.clone()).await).await, None);
    prod.cache.cache_status_header = Some(true);
    assert!(header(service(prod).await).await.is_some());
    let mut off = settings(None, None);
    off.cache.cache_status_header = Some(false);
    assert_eq!(header(service(off).await).await, None);
}
