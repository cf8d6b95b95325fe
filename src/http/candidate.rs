//! A tower layer that counts requests per matched route: `cache_candidate_requests_total{route,method}` and
//! `cache_candidate_request_duration_seconds{route,method}`.
//!
//! The `route` label is axum's [`MatchedPath`] (`/users/{id}`, never the raw URI), so its values are bounded by the
//! app's routes; a request that matched no route is counted under [`UNMATCHED_ROUTE`]. Methods outside the
//! standard nine are counted as `OTHER`. Add the layer with `Router::layer` after the routes it should count (see
//! the example in [`crate::http`]).
//!
//! Each request also runs inside a task-local [`RequestScope`]: the registry's gets made by the request's task are
//! attributed to its route (route × key pattern in the report, see [`crate::analysis`]).
//!
//! **`Cache-Status`** ([RFC 9211](https://www.rfc-editor.org/rfc/rfc9211)). With
//! [`with_cache_status`](CandidateLayer::with_cache_status) (on by default outside production, `[cache]
//! cache_status_header`), each response of a request that made cache calls gets one `Cache-Status` member named
//! `cache-rollout`, summing up its calls:
//!
//! | the request's cache calls | `Cache-Status` |
//! |---|---|
//! | only observed (or shadow mode, where the loader answers) | `cache-rollout; fwd=bypass` |
//! | every one a hit (fresh, or stale-while-revalidate) | `cache-rollout; hit; ttl=N` (the least remaining freshness in seconds, negative when a stale value was served) |
//! | some loader failed and a stale value answered | `cache-rollout; fwd=stale; ttl=N; detail=stale-if-error` |
//! | some loader ran after a miss | `cache-rollout; fwd=uri-miss` (`fwd=stale` when the entry was there but past its TTL), `; stored` when a value was stored, `; collapsed` when another call's load answered one |
//! | only answered by other callers' loads | `cache-rollout; fwd=uri-miss; collapsed` |
//!
//! A response of a request that made no cache call gets no member. An existing `Cache-Status` (from an inner
//! cache) is kept; ours is added after it, as the RFC orders caches from the origin outwards.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::Response;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use crate::analysis::{Outcomes, RequestScope, ROUTE_SCOPE};
use crate::metrics::{Metrics, RouteMetrics};
use crate::pattern::PatternTable;

/// The `route` label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Most distinct (method, route) pairs tracked; the rest share one series.
const MAX_ROUTES: usize = 512;

/// The layer: counts requests per matched route (see [`crate::http`] for an example).
#[derive(Clone)]
pub struct CandidateLayer {
    routes: Arc<PatternTable<RouteMetrics>>,
    cache_status: bool,
}

/// The `Cache-Status` header name (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

impl std::fmt::Debug for CandidateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandidateLayer").finish_non_exhaustive()
    }
}

impl CandidateLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let metrics = metrics.clone();
        CandidateLayer {
            routes: Arc::new(PatternTable::new(MAX_ROUTES, move |name| {
                // Names are "METHOD route"; the fold name `other` has no space.
                let (method, route) = name.split_once(' ').unwrap_or(("OTHER", UNMATCHED_ROUTE));
                metrics.route(route, method)
            })),
            cache_status: false,
        }
    }

    /// Adds an RFC 9211 `Cache-Status` header to every response of a request that made cache calls (see the
    /// module docs). Default: off here; [`CacheRollout::layer`](crate::CacheRollout::layer) turns it on outside
    /// production (`[cache] cache_status_header`).
    #[must_use]
    pub fn with_cache_status(mut self, on: bool) -> Self {
        self.cache_status = on;
        self
    }
}

/// The `Cache-Status` member of a request whose routed calls ended as `o` (see the module docs).
pub(crate) fn cache_status(o: &Outcomes) -> String {
    let mut v = String::from("cache-rollout");
    let ttl = o.ttl_secs.map(|t| format!("; ttl={t}")).unwrap_or_default();
    if o.stale_on_error > 0 {
        v.push_str("; fwd=stale");
        v.push_str(&ttl);
        v.push_str("; detail=stale-if-error");
    } else if o.misses > 0 {
        v.push_str(if o.refreshed > 0 {
            "; fwd=stale"
        } else {
            "; fwd=uri-miss"
        });
        if o.stored {
            v.push_str("; stored");
        }
        if o.collapsed > 0 {
            v.push_str("; collapsed");
        }
    } else if o.collapsed > 0 {
        v.push_str("; fwd=uri-miss; collapsed");
    } else if o.hits + o.revalidating > 0 {
        v.push_str("; hit");
        v.push_str(&ttl);
    } else {
        v.push_str("; fwd=bypass");
    }
    v
}

impl<S> Layer<S> for CandidateLayer {
    type Service = Candidate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Candidate {
            inner,
            routes: Arc::clone(&self.routes),
            cache_status: self.cache_status,
        }
    }
}

/// The service produced by [`CandidateLayer`].
#[derive(Clone)]
pub struct Candidate<S> {
    inner: S,
    routes: Arc<PatternTable<RouteMetrics>>,
    cache_status: bool,
}

impl<S> std::fmt::Debug for Candidate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate").finish_non_exhaustive()
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

impl<S> Service<Request> for Candidate<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CandidateResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
        let name = format!("{} {}", method_label(req.method()), route);
        let handles = self.routes.get(&name);
        handles.requests.inc();
        CandidateResponseFuture {
            inner: ROUTE_SCOPE.scope(RequestScope::new(), self.inner.call(req)),
            start: Instant::now(),
            handles,
            cache_status: self.cache_status,
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Candidate`]: runs the request in its [`RequestScope`], and records the duration and
    /// the scope's cache calls when the response is ready.
    pub struct CandidateResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<RequestScope, F>,
        start: Instant,
        handles: Arc<RouteMetrics>,
        cache_status: bool,
    }
}

impl<F, E> Future for CandidateResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut out = std::task::ready!(this.inner.as_mut().poll(cx));
        this.handles
            .duration
            .observe(this.start.elapsed().as_secs_f64());
        if let Some(scope) = this.inner.take_value() {
            if *this.cache_status {
                if let (Ok(resp), Some(o)) = (out.as_mut(), scope.outcomes()) {
                    if let Ok(v) = HeaderValue::from_str(&cache_status(&o)) {
                        resp.headers_mut().append(CACHE_STATUS, v);
                    }
                }
            }
            this.handles.calls.merge(scope);
        }
        Poll::Ready(out)
    }
}
