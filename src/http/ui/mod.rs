//! `GET /internal/cache/ui`: the rollout at a glance, for people. Server-rendered HTML (maud) with the curves as
//! inline SVG (plotters); nothing is fetched from elsewhere. A small script of the page's own
//! (`/internal/cache/ui/page.js`) refreshes it every [`REFRESH_SECS`] seconds (pausable) and sends the actions, each
//! the same `PUT /internal/cache/config` the runbook (`docs/rollout.md`) sends, with the admin token typed into
//! the page and kept only in its memory. Without JavaScript the page is read as it was loaded.
//!
//! | request | answer |
//! |---|---|
//! | `GET /internal/cache/ui` | 200, the page; `?memory=2GiB` adds the what-if budget split |
//! | `GET /internal/cache/ui?part=main` | 200, only the page's `<main>` (what the script refreshes) |
//! | the same where reading needs the token (`staging`) and no `Authorization` header is sent (a browser opening it) | the page without a figure, status 401 (403 with no token configured), which asks for the token; not counted as a refused read |
//! | the same with a wrong token, or `part=main` without the token | the JSON error of the other endpoints (401, counted, or 403) |
//! | `GET /internal/cache/ui/page.js`, `…/page.css` | the page's script and style (no data: open wherever the page is) |
//! | `GET /internal/cache/` | 303 to `/internal/cache/ui` |

mod chart;

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use self::chart::{curve_svg, Line, Mark};
use super::internal::{read_refusal, InternalState, INTERNAL_VIEW_ROWS};
use crate::analysis::{human_bytes, PatternReport, Report};
use crate::cache::CacheImpl;
use crate::policy::{Mode, Policy, PolicyUpdate};
use crate::registry::{ArmView, RouteView, StateView};

/// How often the page refreshes itself while open, seconds.
pub const REFRESH_SECS: u64 = 5;

/// A switch this recent is called out at the top of the page: the served counters start from it.
const JUST_SWITCHED_SECS: u64 = 300;

/// Swaps listed, newest first.
const SWAPS_SHOWN: usize = 8;

/// Candidate routes listed in each of the two tables (by traffic, by time in loaders).
const ROUTES_SHOWN: usize = 10;

/// The ramp steps offered as buttons, percent of keys (the runbook's 10 → 25 → 50 → 100).
const RAMP_STEPS: [f64; 3] = [10.0, 25.0, 50.0];

const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// The query of `GET /internal/cache/ui`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct UiQuery {
    /// `main`: only the `<main>` element.
    part: Option<String>,
    /// A memory budget to split across the patterns (`2GiB`).
    memory: Option<String>,
}

/// `GET /internal/cache/ui`.
pub(super) async fn page(
    State(state): State<InternalState>,
    headers: HeaderMap,
    query: Result<Query<UiQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (part, memory) = match query {
        Ok(Query(q)) => (q.part, q.memory.filter(|m| !m.trim().is_empty())),
        Err(e) => return (StatusCode::BAD_REQUEST, e.body_text()).into_response(),
    };
    let only_main = part.as_deref() == Some("main");
    if state.reads_need_token() {
        // A browser's navigation never carries the token: the page without a figure, which asks for it, is not a
        // refused read (not counted, not logged). Its figures come with the token, checked like any read.
        if !only_main && !headers.contains_key(header::AUTHORIZATION) {
            let (status, text) = if state.token_configured() {
                (
                    StatusCode::UNAUTHORIZED,
                    "Reading this page needs the admin token here. Enter it above; it is kept in this page's \
                     memory only.",
                )
            } else {
                (
                    StatusCode::FORBIDDEN,
                    "Reading this page needs the admin token here, and no CACHE_ADMIN_TOKEN is configured: \
                     nothing can be shown.",
                )
            };
            let body = document(
                &memory.unwrap_or_default(),
                html! { p #needs-token .notice role="alert" { (text) } },
                true,
            );
            return with_page_headers(status, body.into_string());
        }
        if let Some(refused) = read_refusal(&state, &headers, "/internal/cache/ui") {
            return refused;
        }
    }
    let (budget, memory_error) = match memory.as_deref().map(crate::analysis::parse_memory) {
        None => (None, None),
        Some(Ok(bytes)) => (Some(bytes), None),
        Some(Err(e)) => (None, Some(e.to_string())),
    };
    let view = state.registry.state().await;
    let report = match budget {
        Some(bytes) => state.registry.report_for_memory(bytes),
        None => state.registry.report(),
    };
    let data = Data {
        view: &view,
        report: &report,
        fleet_version: fleet_version(&state),
        memory_error: memory_error.as_deref(),
        now: SystemTime::now(),
    };
    let main = main_view(&data);
    if only_main {
        return with_page_headers(StatusCode::OK, main.into_string());
    }
    let body = document(&memory.unwrap_or_default(), main, false);
    with_page_headers(StatusCode::OK, body.into_string())
}

#[cfg(feature = "fleet")]
fn fleet_version(state: &InternalState) -> Option<(u64, Option<String>)> {
    state.fleet_status().map(|f| (f.version, f.error))
}

#[cfg(not(feature = "fleet"))]
fn fleet_version(_: &InternalState) -> Option<(u64, Option<String>)> {
    None
}

/// `GET /internal/cache/ui/page.js`.
pub(super) async fn script() -> Response {
    static_file("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /internal/cache/ui/page.css`.
pub(super) async fn style() -> Response {
    static_file("text/css; charset=utf-8", STYLE)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The page's headers: HTML, never stored, and a content security policy that allows nothing but the page's own
/// script, style and requests.
fn with_page_headers(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// What one rendering shows.
struct Data<'a> {
    view: &'a StateView,
    report: &'a Report,
    /// The fleet state's version this instance runs, and its last error (`None`: no fleet).
    fleet_version: Option<(u64, Option<String>)>,
    memory_error: Option<&'a str>,
    now: SystemTime,
}

/// The whole document around `main`; `needs_token` marks a page loaded without the right to read.
fn document(memory: &str, main: Markup, needs_token: bool) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "cache-rollout" }
                link rel="stylesheet" href="/internal/cache/ui/page.css";
                script src="/internal/cache/ui/page.js" defer {}
            }
            body data-refresh-ms=(REFRESH_SECS * 1000) data-needs-token=[needs_token.then_some("1")] {
                header {
                    h1 { "cache-rollout" }
                    // No `name`, and disabled until the script takes it: the token is never sent in a URL.
                    form #token-form autocomplete="off" {
                        label for="token" { "Admin token" }
                        input #token type="password" autocomplete="off" size="24"
                            placeholder="CACHE_ADMIN_TOKEN" disabled;
                        button type="submit" disabled { "Use" }
                        span #token-state { "no token (actions are refused)" }
                    }
                    form #memory-form method="get" action="/internal/cache/ui" {
                        label for="memory" { "What if Redis had" }
                        input #memory type="text" name="memory" size="8" value=(memory) placeholder="2GiB";
                        button type="submit" { "Split" }
                    }
                    div .refresh {
                        button #pause type="button" aria-pressed="false" { "Pause refresh" }
                        span #updated { "as loaded" }
                    }
                    div #result role="status" aria-live="polite" {}
                }
                noscript {
                    p .notice { "Without JavaScript this page shows the figures as they were when it loaded, and "
                        "its buttons do nothing: reload it to refresh, and use the runbook's "
                        code { "curl -X PUT …/internal/cache/config" } " to change the rollout." }
                }
                main #main { (main) }
            }
        }
    }
}

/// Everything the script refreshes.
fn main_view(d: &Data<'_>) -> Markup {
    html! {
        (state_section(d))
        (patterns_section(d))
        (shared_section(d))
        (routes_section(d))
    }
}

/// A ratio as a percentage; `–` when there is none (0/0).
fn pct(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{:.1}%", r * 100.0),
        _ => "–".into(),
    }
}

/// `x`, or 0 for anything not above 0 (no `-0.00` from a rounding below zero).
fn positive(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2} ms"),
        _ => "–".into(),
    }
}

/// A breaker's state in words.
fn breaker_state(state: crate::rollout::BreakerState) -> &'static str {
    match state {
        crate::rollout::BreakerState::Open => "open",
        crate::rollout::BreakerState::HalfOpen => "half-open",
    }
}

fn seconds_ago(at: &str, now: SystemTime) -> Option<u64> {
    let at = humantime::parse_rfc3339(at).ok()?;
    Some(now.duration_since(at).map_or(0, |d| d.as_secs()))
}

fn state_section(d: &Data<'_>) -> Markup {
    let v = d.view;
    // The last swap that changed the impl or the whitelist: the cache was (re)filled from there. The first swap
    // listed is the baseline.
    let mut last_switch = None;
    let mut before: Option<(CacheImpl, &Vec<String>)> = None;
    for s in v.swaps.iter().filter(|s| s.ok) {
        let now = (s.to_impl, &s.whitelist);
        if before.is_some_and(|b| b != now) {
            last_switch = Some(s);
        }
        before = Some(now);
    }
    let switched_ago = last_switch.and_then(|s| seconds_ago(&s.at, d.now).map(|ago| (s, ago)));
    html! {
        section #state aria-labelledby="state-h" {
            h2 #state-h { "State" }
            @if let Some((s, ago)) = switched_ago.filter(|(_, ago)| *ago < JUST_SWITCHED_SECS) {
                p #just-switched .notice role="note" {
                    "Switched " (ago) " s ago (to impl " (s.to_impl) ", whitelist " (s.whitelist.join(", "))
                    ", by " (s.source.as_str()) "): a cache just turned on is still filling (give it one TTL). "
                    "A pattern's served hit ratio counts from when it was last fully served (serve mode, every key); "
                    "the arms count since the service started."
                }
            }
            dl .glance {
                dt { "caching" } dd #enabled { @if v.enabled { "enabled" } @else { "disabled (every call goes to the origin)" } }
                dt { "impl" } dd #impl { (v.cache_impl) }
                dt { "whitelist" } dd #whitelist {
                    @if v.whitelist.is_empty() { "none: every pattern observed" } @else { (v.whitelist.join(", ")) }
                }
                dt { "state version" } dd #version { (v.version) }
                dt { "fleet" } dd #fleet {
                    @match &d.fleet_version {
                        None => "off: this instance only",
                        Some((version, None)) => { "version " (version) }
                        Some((version, Some(e))) => { "version " (version) ", last read failed: " (e) }
                    }
                }
                dt { "Redis" } dd #redis {
                    @match &v.redis {
                        None => "not in use",
                        Some(h) if h.up => { "up ✓" @if let Some(l) = h.latency_ms { ", " (ms(Some(l))) " round trip" } }
                        Some(h) => { span .bad { "down ✗" } @if let Some(e) = &h.error { ": " (e) } }
                    }
                }
                @if v.deletes_in_left_redis {
                    dt { "left Redis" } dd { "still deleted from on every write and invalidation" }
                }
                @if let Some((s, ago)) = switched_ago {
                    dt { "last switch" } dd { (s.at) " (" (ago) " s ago)" }
                }
            }
            h3 { "Last swaps and rollbacks" }
            @if v.swaps.is_empty() {
                p { "none yet" }
            } @else {
                table #swaps {
                    thead { tr { th { "when (UTC)" } th { "by" } th { "result" } th { "impl" } th { "whitelist" } th { "reason" } } }
                    tbody {
                        @for s in v.swaps.iter().rev().take(SWAPS_SHOWN) {
                            tr {
                                td { (s.at) }
                                td { (s.source.as_str()) }
                                td { @if s.ok { "ok ✓" } @else { span .bad { "failed ✗" } } }
                                td { (s.from_impl) " → " (s.to_impl) }
                                td { (s.whitelist.join(", ")) }
                                td { (s.reason.as_deref().or(s.error.as_deref()).unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The patterns with a card, at most [`INTERNAL_VIEW_ROWS`]: those the rollout names (whitelisted, configured or
/// rolled back) first, then the busiest seen, by gets; and how many more there are.
fn shown_patterns<'a>(d: &Data<'a>) -> (Vec<&'a str>, usize) {
    let mut names: Vec<&str> = d
        .view
        .routes
        .keys()
        .chain(d.view.patterns.keys())
        .chain(d.report.patterns.keys())
        .map(String::as_str)
        // `other` is the overflow row; `*` holds the defaults of every pattern, not a pattern to roll out.
        .filter(|n| *n != crate::pattern::OTHER && *n != "*")
        .collect();
    names.sort_unstable();
    names.dedup();
    let gets = |n: &str| d.view.patterns.get(n).map_or(0, |c| c.gets);
    let named = |n: &str| d.view.routes.contains_key(n);
    names.sort_by(|a, b| {
        named(b)
            .cmp(&named(a))
            .then_with(|| gets(b).cmp(&gets(a)))
            .then_with(|| a.cmp(b))
    });
    let more = names.len().saturating_sub(INTERNAL_VIEW_ROWS);
    names.truncate(INTERNAL_VIEW_ROWS);
    (names, more)
}

fn patterns_section(d: &Data<'_>) -> Markup {
    let (names, more) = shown_patterns(d);
    html! {
        section #patterns aria-labelledby="patterns-h" {
            h2 #patterns-h { "Key patterns" }
            @if names.is_empty() {
                p { "No key pattern seen yet: send the service some traffic." }
            }
            div .cards {
                @for name in &names { (pattern_card(d, name)) }
            }
            @if more > 0 {
                p { (more) " more patterns with fewer gets are not shown: "
                    code { "GET /internal/cache?pattern=NAME" } " shows any one." }
            }
        }
    }
}

fn mode_text(route: Option<&RouteView>) -> String {
    match route {
        None => "observe".into(),
        Some(r) if r.mode == Mode::Observe && r.configured_mode != Mode::Observe => {
            format!(
                "observe (configured {}, not served now)",
                r.configured_mode.as_str()
            )
        }
        Some(r) if r.mode == Mode::Observe => "observe".into(),
        Some(r) if r.ramp_percent < 100.0 => {
            format!("{} {}% of keys", r.mode.as_str(), r.ramp_percent)
        }
        Some(r) => r.mode.as_str().to_string(),
    }
}

fn pattern_card(d: &Data<'_>, name: &str) -> Markup {
    let route = d.view.routes.get(name);
    let counts = d.view.patterns.get(name);
    let rep = d.report.patterns.get(name);
    let mode = route.map_or(Mode::Observe, |r| r.mode);
    let gets = counts.map_or(0, |c| c.gets);
    let measured = counts
        .filter(|c| c.gets > 0)
        .map(|c| c.hits as f64 / c.gets as f64);
    html! {
        article .card .pattern data-pattern=(name) data-mode=(mode.as_str()) {
            h3 { (name) " " span .mode { "mode: " (mode_text(route)) } }
            @if let Some(b) = route.and_then(|r| r.breaker.as_ref()) {
                p .notice .bad {
                    @if b.state == crate::rollout::BreakerState::Open { "Rolled back ✗: " } @else { "Probing after a rollback (half-open): " }
                    (b.reason.as_str()) " since " (b.since)
                }
            }
            table .figures {
                tbody {
                    tr { th { "gets" } td { (gets) } th { "gets/s" } td { (rep.map_or("–".into(), |r| format!("{:.1}", r.gets_per_second))) } }
                    tr {
                        th { "hit ratio (since start)" } td .measured { (pct(measured)) }
                        th { "served, since fully served" } td .served { (pct(rep.and_then(|r| r.served_hit_ratio))) }
                    }
                    tr {
                        th { "predicted for its Redis share" }
                        td { (pct(rep.and_then(|r| r.served_predicted_hit_ratio)))
                             @if let Some(b) = rep.and_then(|r| r.served_memory_bytes) { " in " (human_bytes(b)) } }
                        th { "recommended" }
                        td .recommended { (recommended_text(rep)) }
                    }
                    @if let Some(r) = route {
                        tr {
                            th { "breaker" }
                            td .breaker { @match &r.breaker { None => "closed ✓", Some(b) => span .bad { (breaker_state(b.state)) " ✗" } } }
                            th { "read deadline, TTL" }
                            td { (r.read_timeout_ms) " ms, " (r.ttl_secs) " s" }
                        }
                    }
                }
            }
            @if let Some(r) = route {
                table .arms {
                    caption { "Calls by arm (ramped: served from the cache; unramped: observed; shadowed: compared)" }
                    thead { tr { th { "arm" } th { "calls" } th { "hit ratio" } th { "mean" } th { "p99 ≤" } } }
                    tbody {
                        (arm_row("ramped", &r.ramped))
                        (arm_row("unramped", &r.unramped))
                        (arm_row("shadowed", &r.shadowed))
                    }
                }
                p .shadow {
                    "shadow comparisons: "
                    @for (result, n) in &r.shadow { span .count data-result=(result) { (result) " " (n) } " " }
                }
            }
            (pattern_chart(name, rep, d.report.eviction.as_ref()))
            @if let Some(rep) = rep.filter(|r| !r.reasons.is_empty() || !r.advice.is_empty()) {
                details {
                    summary { "why (the report's reasons)" }
                    ul { @for reason in rep.reasons.iter().chain(&rep.advice) { li { (reason) } } }
                }
            }
            (actions(d.view, name, route))
        }
    }
}

fn recommended_text(rep: Option<&PatternReport>) -> String {
    match rep {
        None => "–".into(),
        Some(r) if !r.estimated => "not estimated (beyond max_patterns)".into(),
        Some(r) if r.recommended => match r.recommended_memory_bytes {
            Some(b) => format!("yes, {}", human_bytes(b)),
            None => "yes".into(),
        },
        Some(_) => "no".into(),
    }
}

fn arm_row(arm: &str, a: &ArmView) -> Markup {
    html! {
        tr data-arm=(arm) {
            th { (arm) }
            td { (a.calls) }
            td { (pct(a.hit_ratio)) }
            td { (ms(a.mean_ms)) }
            td { (ms(a.p99_le_ms)) }
        }
    }
}

/// A pattern's predicted curve, with the measured point at the memory it has while served and the recommended
/// size.
fn pattern_chart(
    name: &str,
    rep: Option<&PatternReport>,
    eviction: Option<&crate::analysis::RedisEviction>,
) -> Markup {
    let Some(rep) = rep else {
        return html! { p .nochart { "No curve yet." } };
    };
    let mut marks = Vec::new();
    if let (Some(bytes), Some(h)) = (rep.served_memory_bytes, rep.served_hit_ratio) {
        marks.push(Mark {
            bytes,
            hit_ratio: h,
            label: format!(" measured {}", pct(Some(h))),
            filled: true,
        });
        if let (Some(p), Some(e)) = (rep.served_predicted_hit_ratio, eviction) {
            marks.push(Mark {
                bytes,
                hit_ratio: p,
                label: format!(
                    " predicted {} ({})",
                    pct(Some(p)),
                    e.policy.as_str().trim_start_matches("allkeys-")
                ),
                filled: false,
            });
        }
    }
    if let Some(bytes) = rep.recommended_memory_bytes.filter(|_| rep.recommended) {
        let h = interpolate(&rep.curve.bytes, bytes);
        marks.push(Mark {
            bytes,
            hit_ratio: h,
            label: " recommended".into(),
            filled: false,
        });
    }
    let title = format!("{name}: predicted hit ratio against memory");
    let legend = format!("{name} (exact LRU)");
    match curve_svg(
        &title,
        &[Line {
            name: &legend,
            points: &rep.curve.bytes,
            emphasis: false,
        }],
        &marks,
    ) {
        Some(svg) => {
            html! { figure .chart { (PreEscaped(svg)) figcaption {
                (title) ". The line is an exact LRU cache, with about a 95% interval at each point. Once the pattern "
                "is served, the filled dot is the hit ratio measured since the switch, and the hollow one beside it "
                "the prediction for its share of Redis under Redis's own eviction."
            } } }
        }
        None => html! { p .nochart { "No curve yet (no estimator, or too few gets)." } },
    }
}

/// The hit ratio of a sampled curve at `bytes`, linear in log size between its two nearest points (0 below the
/// first, the last beyond the last).
fn interpolate(points: &[crate::analysis::SizeHit], bytes: u64) -> f64 {
    let x = (bytes.max(1) as f64).ln();
    let mut below: Option<&crate::analysis::SizeHit> = None;
    for p in points {
        let px = (p.size.max(1) as f64).ln();
        if px >= x {
            return match below {
                None => 0.0_f64.max(if px == x { p.hit_ratio } else { 0.0 }),
                Some(b) => {
                    let bx = (b.size.max(1) as f64).ln();
                    b.hit_ratio
                        + (p.hit_ratio - b.hit_ratio) * (x - bx) / (px - bx).max(f64::EPSILON)
                }
            };
        }
        below = Some(p);
    }
    below.map_or(0.0, |b| b.hit_ratio)
}

/// The rollout buttons of one pattern, each carrying the `PUT /internal/cache/config` body it sends.
fn actions(view: &StateView, name: &str, route: Option<&RouteView>) -> Markup {
    let current = route.map(|r| (r.configured_mode, r.ramp_percent));
    let steps: Vec<(String, Mode, Option<f64>)> =
        std::iter::once(("shadow".to_string(), Mode::Shadow, None))
            .chain(
                RAMP_STEPS
                    .iter()
                    .map(|&p| (format!("ramp {p}%"), Mode::Serve, Some(p))),
            )
            .chain([
                ("serve 100%".to_string(), Mode::Serve, None),
                ("back to observe".to_string(), Mode::Observe, None),
            ])
            .collect();
    html! {
        div .actions role="group" aria-label={ "rollout of " (name) } {
            @for (label, mode, ramp) in steps {
                @let body = action_body(&view.policy, name, mode, ramp);
                @let here = view.whitelist.iter().any(|w| w == name || w == "*")
                    && current == Some((mode, ramp.unwrap_or(100.0)));
                button type="button" data-action=(label) data-pattern=(name) data-body=(body)
                    title={ "PUT /internal/cache/config " (body) } aria-current=[here.then_some("true")] {
                        (label) @if here { " (now)" }
                    }
            }
        }
    }
}

/// The body of the `PUT` that takes `name` to `mode` at `ramp` percent (`None`: every key), keeping the pattern's
/// other settings (a pattern's entry replaces its previous one). Shadow and serve also whitelist the pattern, and
/// turn Redis on when nothing is cached (impl `null`), as the runbook's first step does; observe changes only the
/// mode.
pub(super) fn action_body(policy: &Policy, name: &str, mode: Mode, ramp: Option<f64>) -> String {
    let mut pattern = policy.patterns.get(name).cloned().unwrap_or_default();
    pattern.mode = Some(mode);
    pattern.ramp_percent = ramp;
    let mut update = PolicyUpdate {
        patterns: Some(BTreeMap::from([(name.to_string(), pattern)])),
        ..PolicyUpdate::default()
    };
    if mode != Mode::Observe {
        if policy.cache_impl == CacheImpl::Null {
            update.cache_impl = Some(CacheImpl::Redis);
        }
        if !policy.whitelist.iter().any(|w| w == name || w == "*") {
            let mut whitelist = policy.whitelist.clone();
            whitelist.push(name.to_string());
            update.whitelist = Some(whitelist);
        }
    }
    serde_json::to_string(&update).unwrap_or_default()
}

fn shared_section(d: &Data<'_>) -> Markup {
    let r = d.report;
    let rec = &r.recommendation;
    let mut lines = Vec::new();
    if let Some(s) = &r.shared {
        lines.push(Line {
            name: "every pattern in one cache",
            points: &s.curve.bytes,
            emphasis: true,
        });
    }
    if let Some(w) = &r.whitelist {
        lines.push(Line {
            name: "the whitelist",
            points: &w.curve.bytes,
            emphasis: false,
        });
    }
    let title = "Every pattern in one cache, and the whitelist's patterns in one: predicted hit ratio against memory \
                 (exact LRU)";
    let chart = curve_svg(title, &lines, &[]);
    let apply = serde_json::to_string(&rec.apply).unwrap_or_default();
    html! {
        section #shared aria-labelledby="shared-h" {
            h2 #shared-h { "Prediction and recommendation" }
            p .method {
                "Observed for " (format!("{:.0}", r.observed_seconds)) " s; "
                "the curves are of an exact LRU cache; "
                @match &r.eviction {
                    Some(e) => { "the budget split and the served patterns' predictions are for Redis's own eviction, " (e.policy.as_str()) }
                    None => "no Redis eviction is known, so every prediction is exact LRU"
                }
                "."
            }
            @match chart {
                Some(svg) => figure .chart { (PreEscaped(svg)) figcaption { (title) } },
                None => p .nochart { "No curve yet." },
            }
            div #recommendation {
                h3 { "Recommendation" }
                @if rec.whitelist.is_empty() {
                    p { "Nothing to serve yet: no pattern saves origin time at any size." }
                } @else {
                    p {
                        "Serve " strong { (rec.whitelist.join(", ")) } " in " (human_bytes(rec.memory_bytes))
                        ", saving " (format!("{:.3}", rec.origin_seconds_saved_per_second)) " s of origin time per second."
                    }
                    button #apply type="button" data-action="apply the recommendation" data-body=(apply)
                        title={ "PUT /internal/cache/config " (apply) } { "Apply the recommendation" }
                }
            }
            @if let Some(e) = d.memory_error {
                p #memory-error .notice .bad { "What-if budget: " (e) }
            }
            @if let Some(plan) = &r.budget {
                div #budget {
                    h3 { "What if Redis had " (human_bytes(plan.memory_bytes)) " for entries" }
                    p {
                        "Serve " (plan.whitelist.join(", ")) ": " (pct(Some(plan.hit_ratio))) " of their gets hit, saving "
                        (format!("{:.3}", plan.origin_seconds_saved_per_second)) " s of origin time per second ("
                        (plan.eviction.policy.as_str()) ")."
                    }
                    table {
                        thead { tr { th { "pattern" } th { "served" } th { "memory" } th { "hit ratio" } th { "origin s/s saved" } th { "why" } } }
                        tbody {
                            @for (name, s) in &plan.patterns {
                                tr {
                                    th { (name) }
                                    td { @if s.served { "yes ✓" } @else { "no" } }
                                    td { (human_bytes(s.memory_bytes)) }
                                    td { (pct(Some(s.hit_ratio))) " ± " (format!("{:.1}", s.uncertainty * 100.0)) " pp" }
                                    td { (format!("{:.3}", s.origin_seconds_saved_per_second)) }
                                    td { (s.reason) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn routes_section(d: &Data<'_>) -> Markup {
    let mut by_traffic: Vec<_> = d.report.routes.iter().collect();
    by_traffic.sort_by_key(|r| std::cmp::Reverse(r.requests));
    let mut by_loaders: Vec<_> = d.report.routes.iter().collect();
    let loader_seconds = |r: &crate::analysis::RouteReport| positive(r.seconds * r.loader_share);
    by_loaders.sort_by(|a, b| loader_seconds(b).total_cmp(&loader_seconds(a)));
    let table = |rows: &[&crate::analysis::RouteReport], id: &str| {
        html! {
            table id=(id) {
                thead { tr { th { "route" } th { "requests" } th { "time" } th { "in loaders" } th { "key patterns (calls per request)" } } }
                tbody {
                    @for r in rows.iter().take(ROUTES_SHOWN) {
                        tr {
                            th { (r.method) " " (r.route) }
                            td { (r.requests) }
                            td { (format!("{:.2} s", r.seconds)) }
                            td { (format!("{:.2} s", loader_seconds(r))) " (" (pct(Some(positive(r.loader_share)))) ")" }
                            td { @for p in &r.patterns { (p.key_pattern) " (" (format!("{:.2}", p.calls_per_request)) ") " } }
                        }
                    }
                }
            }
        }
    };
    html! {
        section #routes aria-labelledby="routes-h" {
            h2 #routes-h { "Candidate routes" }
            @if d.report.routes.is_empty() {
                p { "No route counted yet (the candidate-route layer counts the routes above it)." }
            } @else {
                div .two {
                    div { h3 { "By traffic" } (table(&by_traffic, "routes-by-traffic")) }
                    div { h3 { "By time spent in loaders" } (table(&by_loaders, "routes-by-loaders")) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PatternPolicy;

    #[test]
    fn an_action_keeps_the_patterns_settings_and_whitelists_it() {
        let mut policy = Policy {
            whitelist: vec!["project".into()],
            ..Policy::default()
        };
        policy.patterns.insert(
            "user".into(),
            PatternPolicy {
                ttl_secs: Some(60),
                mode: Some(Mode::Shadow),
                ..PatternPolicy::default()
            },
        );
        let body = action_body(&policy, "user", Mode::Serve, Some(25.0));
        let update = PolicyUpdate::from_json(body.as_bytes()).expect("a valid PUT body");
        assert_eq!(
            update.cache_impl,
            Some(CacheImpl::Redis),
            "null turns Redis on"
        );
        assert_eq!(
            update.whitelist,
            Some(vec!["project".to_string(), "user".to_string()])
        );
        let user = &update.patterns.as_ref().expect("patterns")["user"];
        assert_eq!(
            (user.mode, user.ramp_percent, user.ttl_secs),
            (Some(Mode::Serve), Some(25.0), Some(60))
        );

        // Already whitelisted, on Redis: only the pattern's entry; observe never touches impl or whitelist.
        policy.cache_impl = CacheImpl::Redis;
        policy.whitelist.push("user".into());
        let update: serde_json::Value =
            serde_json::from_str(&action_body(&policy, "user", Mode::Observe, None)).expect("json");
        assert_eq!(
            update,
            serde_json::json!({"patterns": {"user": {"ttl_secs": 60, "mode": "observe"}}})
        );
    }

    #[test]
    fn a_curve_is_read_between_its_points_on_a_log_axis() {
        let pts = |v: &[(u64, f64)]| {
            v.iter()
                .map(|&(size, hit_ratio)| crate::analysis::SizeHit {
                    size,
                    hit_ratio,
                    uncertainty: 0.0,
                })
                .collect::<Vec<_>>()
        };
        let c = pts(&[(100, 0.2), (10_000, 0.6)]);
        assert!((interpolate(&c, 1_000) - 0.4).abs() < 1e-9);
        assert_eq!(interpolate(&c, 100), 0.2);
        assert_eq!(interpolate(&c, 50), 0.0);
        assert_eq!(interpolate(&c, 1 << 30), 0.6);
        assert_eq!(interpolate(&[], 10), 0.0);
    }

    #[test]
    fn ratios_without_calls_show_a_dash() {
        assert_eq!(pct(None), "–");
        assert_eq!(pct(Some(f64::NAN)), "–");
        assert_eq!(pct(Some(0.8341)), "83.4%");
        assert_eq!(ms(None), "–");
    }
}
