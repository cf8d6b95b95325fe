//! The `/internal/cache` router: the registry's state, and its runtime switch behind a bearer token.
//!
//! | request | answer |
//! |---|---|
//! | `GET /internal/cache` | 200, the [`StateView`](crate::registry::StateView) as JSON plus `config` (the settings with secrets redacted); `patterns` and `routes` hold the [`INTERNAL_VIEW_ROWS`] busiest rows each (and `patterns` its `other` row), and `omitted` counts the rest |
//! | `GET /internal/cache?pattern=NAME` | the same with only that pattern's rows; 404 for a pattern neither seen nor named |
//! | `GET /internal/cache/ui` | 200, the same for people: an HTML page with the curves, which refreshes itself and sends the `PUT` below (see [`ui`](super::ui): in `staging` without the token, a page that asks for it); `GET /internal/cache/` redirects to it |
//! | `GET /internal/cache/report` | 200, the phase-2 [`Report`](crate::analysis::Report) as JSON (schema in `docs/analysis.md`) |
//! | `PUT /internal/cache/config` with a [`PolicyUpdate`] body | 200 and the new state; 400 for a bad body or value; 503 when the new backend cannot be reached (the old state stays) |
//! | the same without `Authorization: Bearer <CACHE_ADMIN_TOKEN>`, or with a wrong token | 401 |
//! | the same when no token is configured | 403: changes are refused |
//! | a `GET` in `staging` without the token (unless [`InternalState::with_open_reads`]) | 401, or 403 when no token is configured |
//!
//! **Reading is a privilege too.** In `development` and `test` anyone may read; in `staging` reading needs the same
//! bearer token as changing, unless `cache.internal_reads_open` opens it. Every refusal for a missing or wrong token
//! is counted in `cache_admin_auth_failures_total{action="read"|"change"}` and logged at `warn` with the path,
//! never with the token presented (except the page at `/internal/cache/ui` opened with no token at all, as a browser
//! opens it: it answers a page that asks for the token, uncounted). The token is compared in constant time, and is at least 16 characters
//! ([`AdminToken::new`] refuses a shorter one).
//!
//! **Closed by construction.** The router reads the environment itself: when it is `production`, or `APP_ENV`
//! holds a value that is not one of the four known ones, the router answers 404 for every path under `/internal/`
//! (its own routes and any other: it mounts a catch-all there, so an application route under `/internal/` must not
//! be merged with it). [`InternalState::new`] reads `APP_ENV` (unset: `development`); [`InternalState::with_env`]
//! can close it further, never open it.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::cache::redact_url;
use crate::config::{check_admin_token, AppEnv};
use crate::error::Error;
use crate::policy::PolicyUpdate;
use crate::registry::SwapSource;
use crate::CacheRegistry;

/// The bearer token for `PUT /internal/cache/config`, replaceable at runtime (a SIGHUP reload replaces it, so a
/// leaked token can be rotated without a restart). Clones share the token. [`AdminToken::default`] holds none.
#[derive(Clone, Default)]
pub struct AdminToken(Arc<ArcSwapOption<String>>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.load().is_some();
        f.debug_tuple("AdminToken")
            .field(&if set { "***" } else { "unset" })
            .finish()
    }
}

impl AdminToken {
    /// `None` refuses every change with 403.
    ///
    /// # Errors
    /// [`Error::Config`] for a token under [`MIN_ADMIN_TOKEN_LEN`](crate::config::MIN_ADMIN_TOKEN_LEN) (16)
    /// characters; the token itself is not in the
    /// message.
    pub fn new(token: Option<String>) -> Result<Self, Error> {
        check_admin_token(token.as_deref())?;
        Ok(AdminToken(Arc::new(ArcSwapOption::from(
            token.map(Arc::new),
        ))))
    }

    /// Replaces the token; requests after this call are checked against the new one.
    ///
    /// # Errors
    /// As [`AdminToken::new`]; the old token stays.
    pub fn set(&self, token: Option<String>) -> Result<(), Error> {
        check_admin_token(token.as_deref())?;
        self.0.store(token.map(Arc::new));
        Ok(())
    }
}

/// What the internal router needs.
#[derive(Clone, Debug)]
pub struct InternalState {
    pub(super) registry: CacheRegistry,
    admin_token: AdminToken,
    config: serde_json::Value,
    #[cfg(feature = "fleet")]
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// `None`: `APP_ENV` held an unknown value; the router is closed.
    env: Option<AppEnv>,
    /// Anyone may read in `staging` too.
    open_reads: bool,
}

impl InternalState {
    /// `admin_token`: the bearer token for `PUT` (see [`AdminToken`]). The environment is read from `APP_ENV`
    /// now: unset is `development`; `production`, an unknown value or one that is not UTF-8 closes the router
    /// (every path 404).
    pub fn new(registry: CacheRegistry, admin_token: AdminToken) -> Self {
        let env = AppEnv::from_var(std::env::var("APP_ENV")).ok();
        InternalState {
            registry,
            admin_token,
            config: serde_json::Value::Null,
            #[cfg(feature = "fleet")]
            fleet: None,
            env,
            open_reads: false,
        }
    }

    /// Lets anyone read `GET /internal/cache` and its report in `staging` (`cache.internal_reads_open`). Reading is
    /// always open in `development` and `test`, and never possible in `production`.
    pub fn with_open_reads(mut self, open: bool) -> Self {
        self.open_reads = open;
        self
    }

    /// Whether an admin token is configured (without one, every change and every guarded read is refused).
    pub(super) fn token_configured(&self) -> bool {
        self.admin_token.0.load().is_some()
    }

    /// Whether a read needs the token here.
    pub(super) fn reads_need_token(&self) -> bool {
        !self.open_reads && !matches!(self.env, Some(AppEnv::Development | AppEnv::Test))
    }

    /// Also closes the router when `env` is [`AppEnv::Production`], and makes reading need the token when it is
    /// [`AppEnv::Staging`]. It can only close: the stricter of `APP_ENV` and `env` holds (development and test <
    /// staging < production; an unknown `APP_ENV` stays closed), so a configuration that did not come from the
    /// environment cannot open what the environment closed.
    pub fn with_env(mut self, env: AppEnv) -> Self {
        // How closed: development and test read openly, staging reads with the token, production is closed.
        let rank = |e: AppEnv| match e {
            AppEnv::Development | AppEnv::Test => 0,
            AppEnv::Staging => 1,
            AppEnv::Production => 2,
        };
        self.env = match self.env {
            None => None,
            Some(cur) if rank(env) > rank(cur) => Some(env),
            Some(cur) => Some(cur),
        };
        self
    }

    /// Adds the effective configuration shown under `config` (pass it redacted, e.g.
    /// [`Settings::redacted`](crate::config::Settings::redacted)).
    pub fn with_config(mut self, redacted: serde_json::Value) -> Self {
        self.config = redacted;
        self
    }

    /// The fleet state's status, when one is followed.
    #[cfg(feature = "fleet")]
    pub(super) fn fleet_status(&self) -> Option<crate::fleet::FleetStatus> {
        self.fleet.as_ref().map(|f| f.status())
    }

    /// Routes runtime changes through the fleet state (every instance applies them), and shows its status under
    /// `fleet` in `GET /internal/cache`.
    #[cfg(feature = "fleet")]
    pub fn with_fleet(mut self, fleet: Option<Arc<crate::fleet::Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }
}

/// `GET /internal/cache`, `GET /internal/cache/report` and `PUT /internal/cache/config`; in production, or when the
/// environment is unknown, every path under `/internal/` answers 404 instead (see the module doc).
pub fn internal_router(state: InternalState) -> Router {
    match state.env {
        Some(AppEnv::Production) => return closed_router(),
        None => {
            tracing::warn!(
                "APP_ENV holds an unknown value: every path under /internal/ answers 404"
            );
            return closed_router();
        }
        Some(_) => {}
    }
    Router::new()
        .route("/internal/cache", get(show))
        .route("/internal/cache/report", get(report))
        .route("/internal/cache/config", put(change))
        .route(
            "/internal/cache/",
            get(|| async { axum::response::Redirect::to("/internal/cache/ui") }),
        )
        .route("/internal/cache/ui", get(super::ui::page))
        .route("/internal/cache/ui/page.js", get(super::ui::script))
        .route("/internal/cache/ui/page.css", get(super::ui::style))
        .with_state(state)
}

/// Every path under `/internal/` answers 404.
fn closed_router() -> Router {
    let not_found = || async { StatusCode::NOT_FOUND };
    Router::new()
        .route("/internal", any(not_found))
        .route("/internal/", any(not_found))
        .route("/internal/{*rest}", any(not_found))
}

async fn view(state: &InternalState) -> serde_json::Value {
    let view = state.registry.state().await;
    let mut v = serde_json::to_value(&view).unwrap_or_else(|_| json!({}));
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "config".into(),
            effective_config(&state.config, &state.registry),
        );
        #[cfg(feature = "fleet")]
        if let Some(f) = &state.fleet {
            obj.insert("fleet".into(), json!(f.status()));
        }
    }
    v
}

/// The start-up configuration with its runtime part replaced by what is in force now (after PUTs and SIGHUPs).
fn effective_config(startup: &serde_json::Value, registry: &CacheRegistry) -> serde_json::Value {
    let mut config = startup.clone();
    let policy = registry.policy();
    let redis = registry.redis_options();
    if let Some(cache) = config.get_mut("cache").and_then(|c| c.as_object_mut()) {
        cache.insert("enabled".into(), json!(policy.enabled));
        cache.insert("impl".into(), json!(policy.cache_impl));
        cache.insert("whitelist".into(), json!(policy.whitelist));
        cache.insert("default_ttl_secs".into(), json!(policy.default_ttl_secs));
        cache.insert("patterns".into(), json!(policy.patterns));
        if let Some(r) = cache.get_mut("redis").and_then(|r| r.as_object_mut()) {
            r.insert("url".into(), json!(redact_url(&redis.url)));
            r.insert("key_prefix".into(), json!(redis.key_prefix));
            r.insert(
                "connect_timeout_ms".into(),
                json!(redis.connect_timeout.as_millis()),
            );
            r.insert(
                "response_timeout_ms".into(),
                json!(redis.response_timeout.as_millis()),
            );
        }
    }
    config
}

/// Rows of `patterns` and of `routes` that `GET /internal/cache` shows: the busiest by calls (and always the
/// `other` row of `patterns`); the rest are counted under `omitted`, and `?pattern=NAME` shows one pattern's rows.
/// The answer stays a few tens of kilobytes whatever the number of patterns.
pub const INTERNAL_VIEW_ROWS: usize = 20;

/// The query of `GET /internal/cache`.
#[derive(Debug, serde::Deserialize)]
struct ShowQuery {
    pattern: Option<String>,
}

async fn show(
    State(state): State<InternalState>,
    headers: HeaderMap,
    query: Result<Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = read_refusal(&state, &headers, "/internal/cache") {
        return refused;
    }
    let only = match query {
        Ok(Query(q)) => q.pattern.filter(|p| !p.is_empty()),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let mut v = view(&state).await;
    if let Some(p) = &only {
        let known = ["patterns", "routes"]
            .iter()
            .any(|f| v.get(f).and_then(|m| m.get(p)).is_some());
        if !known {
            return error(
                StatusCode::NOT_FOUND,
                format!("no key pattern {p:?} seen or named in the policy"),
            );
        }
    }
    trim_view(&mut v, only.as_deref());
    Json(v).into_response()
}

/// Keeps the busiest [`INTERNAL_VIEW_ROWS`] rows of `patterns` (and `other`) and of `routes`, or only `only`'s
/// rows of both, and counts the rest under `omitted`.
fn trim_view(v: &mut serde_json::Value, only: Option<&str>) {
    let num = |r: &serde_json::Value, key: &str| {
        r.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
    };
    // A pattern row's calls; a route row's are those of its arms.
    let calls = |r: &serde_json::Value| {
        ["gets", "writes", "deletes"]
            .iter()
            .map(|k| num(r, k))
            .chain(
                ["ramped", "unramped", "shadowed"]
                    .iter()
                    .map(|arm| r.get(arm).map_or(0, |a| num(a, "calls"))),
            )
            .sum::<u64>()
    };
    let mut omitted = serde_json::Map::new();
    for field in ["patterns", "routes"] {
        let Some(map) = v.get_mut(field).and_then(serde_json::Value::as_object_mut) else {
            continue;
        };
        let total = map.len();
        match only {
            Some(p) => map.retain(|k, _| k == p),
            None => {
                let mut rows: Vec<(u64, &String)> = map
                    .iter()
                    .filter(|(k, _)| field != "patterns" || *k != crate::pattern::OTHER)
                    .map(|(k, r)| (calls(r), k))
                    .collect();
                rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
                let keep: std::collections::HashSet<String> = rows
                    .into_iter()
                    .take(INTERNAL_VIEW_ROWS)
                    .map(|(_, k)| k.clone())
                    .collect();
                map.retain(|k, _| {
                    (field == "patterns" && k == crate::pattern::OTHER) || keep.contains(k)
                });
            }
        }
        omitted.insert(field.into(), json!(total - map.len()));
    }
    if let Some(obj) = v.as_object_mut() {
        obj.insert("omitted".into(), serde_json::Value::Object(omitted));
    }
}

/// The query of `GET /internal/cache/report`.
#[derive(Debug, serde::Deserialize)]
struct ReportQuery {
    /// A memory budget to split across the patterns (`2GiB`).
    memory: Option<String>,
}

async fn report(
    State(state): State<InternalState>,
    headers: HeaderMap,
    query: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = read_refusal(&state, &headers, "/internal/cache/report") {
        return refused;
    }
    let memory = match query {
        Ok(Query(q)) => q.memory.filter(|m| !m.is_empty()),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match memory.map(|m| crate::analysis::parse_memory(&m)) {
        None => Json(state.registry.report()).into_response(),
        Some(Ok(bytes)) => Json(state.registry.report_for_memory(bytes)).into_response(),
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// A read's refusal: `None` where reading is open, else [`refusal`] for `action = "read"`.
pub(super) fn read_refusal(
    state: &InternalState,
    headers: &HeaderMap,
    path: &'static str,
) -> Option<Response> {
    state
        .reads_need_token()
        .then(|| refusal(state, headers, "read", path))
        .flatten()
}

/// Checks the bearer token: `None` when it is right; else the refusal, 403 when none is configured, 401 (counted
/// and logged, without what was presented) when it is missing or wrong.
fn refusal(
    state: &InternalState,
    headers: &HeaderMap,
    action: &'static str,
    path: &'static str,
) -> Option<Response> {
    let token = state.admin_token.0.load_full();
    let Some(expected) = token.as_deref() else {
        return Some(error(
            StatusCode::FORBIDDEN,
            if action == "read" {
                "reading /internal/cache outside development and test needs the admin token, and no \
                 CACHE_ADMIN_TOKEN is configured"
            } else {
                "runtime changes are disabled: no CACHE_ADMIN_TOKEN is configured"
            },
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let authorized = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(expected.as_bytes())));
    if authorized {
        return None;
    }
    state.registry.metrics().auth_failed(action);
    tracing::warn!(
        path,
        action,
        presented = given.is_some(),
        "cache: refused a request under /internal/cache without a valid admin token"
    );
    let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn change(State(state): State<InternalState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&state, &headers, "change", "/internal/cache/config") {
        return refused;
    }
    let update = match PolicyUpdate::from_json(&body) {
        Ok(u) => u,
        Err(Error::Config { key, reason, .. }) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad body: {key}: {reason}"),
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad body: {e}")),
    };
    #[cfg(feature = "fleet")]
    let applied = match &state.fleet {
        // Stored for every instance, then applied here at once (the others follow within their poll period).
        Some(f) => match f.write(&state.registry.policy(), &update, "api").await {
            Ok(stored) => match f.apply_now(&state.registry).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "stored as fleet version {} (every instance will try it), but this instance refused it: {e}",
                            stored.version
                        ),
                    )
                }
            },
            Err(e) => Err(e),
        },
        None => state.registry.switch_from(&update, SwapSource::Api).await.map(|_| ()),
    };
    #[cfg(not(feature = "fleet"))]
    let applied = state
        .registry
        .switch_from(&update, SwapSource::Api)
        .await
        .map(|_| ());
    match applied {
        Ok(_) => Json(view(&state).await).into_response(),
        Err(e @ (Error::Config { .. } | Error::InvalidPattern { .. })) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("switch refused, previous state kept: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_keeps_the_busiest_rows_and_other_and_counts_the_rest() {
        // 30 patterns with 1..=30 gets, and `other` with none; 25 routes with 1..=25 ramped calls.
        let mut patterns = serde_json::Map::new();
        for i in 1..=30u64 {
            patterns.insert(
                format!("p{i}"),
                json!({"gets": i, "writes": 0, "deletes": 0}),
            );
        }
        patterns.insert(crate::pattern::OTHER.into(), json!({"gets": 0}));
        let mut routes = serde_json::Map::new();
        for i in 1..=25u64 {
            routes.insert(
                format!("p{i}"),
                json!({"ramped": {"calls": i}, "unramped": {"calls": 0}}),
            );
        }
        let view = json!({"patterns": patterns, "routes": routes});

        let mut all = view.clone();
        trim_view(&mut all, None);
        let kept = all["patterns"].as_object().expect("patterns");
        assert_eq!(kept.len(), INTERNAL_VIEW_ROWS + 1);
        assert!(kept.contains_key("other") && kept.contains_key("p30") && kept.contains_key("p11"));
        assert!(!kept.contains_key("p10"));
        let kept = all["routes"].as_object().expect("routes");
        assert_eq!(kept.len(), INTERNAL_VIEW_ROWS);
        assert!(kept.contains_key("p25") && kept.contains_key("p6") && !kept.contains_key("p5"));
        assert_eq!(all["omitted"], json!({"patterns": 10, "routes": 5}));

        let mut one = view;
        trim_view(&mut one, Some("p3"));
        assert_eq!(one["patterns"].as_object().map(|m| m.len()), Some(1));
        assert_eq!(one["routes"]["p3"]["ramped"]["calls"], 3);
        assert_eq!(one["omitted"], json!({"patterns": 30, "routes": 24}));
    }
}
