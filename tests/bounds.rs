//! Nothing unbounded: a flood of names, keys, URLs and tags leaves the metric series, `GET /internal/cache` and the
//! process's memory within their bounds. One test in its own process, so that its memory is its own.

mod support;

use std::convert::Infallible;

use axum::extract::Path;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use axum::Router;
use cache_rollout::config::Settings;
use cache_rollout::{CacheRegistry, CacheRollout};
use serde_json::{json, Value};
use support::{rss_kib, Rng};

const TOKEN: &str = "bounds-test-token-0123456789";

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, String) {
    let (status, _, text) = support::router::call(app, method, uri, Some(TOKEN), body).await;
    (status, text)
}

/// One round of the flood: `keys` calls on random keys of thousands of key patterns, random URLs (matched and
/// not), and random invalidation tags.
async fn flood(app: &Router, registry: &CacheRegistry, rng: &mut Rng, keys: usize) {
    for _ in 0..keys {
        let key = format!("{}:{}", rng.word(), rng.next() % 1_000_000);
        let _ = registry
            .get_or_load(&key, || async { Ok::<_, Infallible>("v".to_string()) })
            .await;
    }
    for _ in 0..2_000 {
        let uri = if rng.next().is_multiple_of(2) {
            format!("/items/{}", rng.next() % 1000)
        } else {
            format!("/{}/{}?q={}", rng.word(), rng.word(), rng.next())
        };
        let _ = call(app, Method::GET, &uri, None).await;
    }
    for _ in 0..2_000 {
        let _ = registry.invalidate_tag(&rng.word()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_names_keys_urls_and_tags_stay_within_their_bounds() {
    let mut settings = Settings::default();
    settings.cache.admin_token = Some(TOKEN.into());
    settings.cache.cache_impl = cache_rollout::cache::CacheImpl::Memory;
    let max_patterns = settings.cache.max_patterns;
    let cache = CacheRollout::builder("bounds")
        .settings(settings)
        .build()
        .await
        .expect("cache");
    let registry = cache.registry().clone();
    let items = registry.clone();
    let app = Router::new()
        .route(
            "/items/{id}",
            get(move |Path(id): Path<u64>| {
                let r = items.clone();
                async move {
                    r.get_or_load(&format!("item:{id}"), || async { Ok::<_, Infallible>(id) })
                        .await
                        .unwrap_or(0)
                        .to_string()
                }
            }),
        )
        // As the catalog does: a fallback, so that the layer counts unmatched requests too (as `unmatched`).
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(cache.layer())
        .merge(cache.router());

    // A whitelist (or per-pattern settings) past cache.max_patterns is refused, naming the bound; at it, accepted.
    let names: Vec<String> = (0..20_000).map(|i| format!("name{i}")).collect();
    let (status, text) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(json!({"whitelist": names})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(
        text.contains("cache.whitelist") && text.contains(&format!("at most {max_patterns}")),
        "{text}"
    );
    let patterns: serde_json::Map<String, Value> = (0..=max_patterns)
        .map(|i| (format!("name{i}"), json!({"ttl_secs": 60})))
        .collect();
    let (status, text) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(json!({"patterns": patterns})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("cache.patterns"), "{text}");
    let (status, text) = call(
        &app,
        Method::PUT,
        "/internal/cache/config",
        Some(json!({"whitelist": names[..max_patterns]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // The flood, twice: the first fills every bounded table, the second must add nothing.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    flood(&app, &registry, &mut rng, 100_000).await;
    let (_, metrics_first) = call(&app, Method::GET, "/metrics", None).await;
    let rss_first = rss_kib("self");
    flood(&app, &registry, &mut rng, 100_000).await;
    let (_, metrics) = call(&app, Method::GET, "/metrics", None).await;
    let rss_second = rss_kib("self");
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    let (first, second) = (series(&metrics_first), series(&metrics));
    let (status, state) = call(&app, Method::GET, "/internal/cache", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, one) = call(&app, Method::GET, "/internal/cache?pattern=other", None).await;
    eprintln!(
        "series: {first} after the first flood, {second} after the second; /metrics {} bytes; \
         /internal/cache {} bytes (?pattern=other: {} bytes); RSS {rss_first} KiB -> {rss_second} KiB",
        metrics.len(),
        state.len(),
        one.len()
    );
    assert_eq!(first, second, "the second flood added series");
    assert!(second < 20_000, "{second} series");
    assert!(
        state.len() < 64 << 10,
        "GET /internal/cache is {} bytes",
        state.len()
    );
    let state: Value = serde_json::from_str(&state).expect("json");
    let rows = cache_rollout::http::INTERNAL_VIEW_ROWS;
    // The busiest rows and `other`.
    assert!(state["patterns"]
        .as_object()
        .is_some_and(|p| p.len() <= rows + 1));
    assert!(state["routes"].as_object().is_some_and(|r| r.len() <= rows));
    assert!(
        state["omitted"]["patterns"].as_u64() > Some(0),
        "{}",
        state["omitted"]
    );
    assert!(
        state["omitted"]["routes"].as_u64() > Some(0),
        "{}",
        state["omitted"]
    );
    assert!(
        state["patterns"].get("other").is_some(),
        "the folded rest is the busiest row"
    );
    let one: Value = serde_json::from_str(&one).expect("json");
    assert_eq!(one["patterns"].as_object().map(|p| p.len()), Some(1));
    let (status, _) = call(
        &app,
        Method::GET,
        "/internal/cache?pattern=nothing-like-it",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Whitelists replaced again and again by fresh names: the rollback series of names no longer served go.
    for round in 0..5 {
        let fresh: Vec<String> = (0..max_patterns)
            .map(|i| format!("round{round}name{i}"))
            .collect();
        let (status, text) = call(
            &app,
            Method::PUT,
            "/internal/cache/config",
            Some(json!({"whitelist": fresh})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let (_, after) = call(&app, Method::GET, "/metrics", None).await;
    let rollback_series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("cache_rollback_total{"))
            .count()
    };
    assert_eq!(
        rollback_series(&after),
        rollback_series(&metrics),
        "five more whitelists of fresh names piled up rollback series"
    );
    // Tags and routes folded too.
    assert!(metrics.contains("tag=\"other\""), "tags fold into other");
    assert!(metrics.contains("route=\"unmatched\""));
    assert!(
        rss_second < rss_first + 32 * 1024,
        "RSS grew from {rss_first} KiB to {rss_second} KiB over the second flood"
    );
}
