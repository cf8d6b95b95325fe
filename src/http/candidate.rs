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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use crate::analysis::{RequestScope, ROUTE_SCOPE};
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
}

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
        }
    }
}

impl<S> Layer<S> for CandidateLayer {
    type Service = Candidate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Candidate {
            inner,
            routes: Arc::clone(&self.routes),
        }
    }
}

/// The service produced by [`CandidateLayer`].
#[derive(Clone)]
pub struct Candidate<S> {
    inner: S,
    routes: Arc<PatternTable<RouteMetrics>>,
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
    S: Service<Request>,
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
    }
}

impl<F: Future> Future for CandidateResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let out = std::task::ready!(this.inner.as_mut().poll(cx));
        this.handles
            .duration
            .observe(this.start.elapsed().as_secs_f64());
        if let Some(scope) = this.inner.take_value() {
            this.handles.calls.merge(scope);
        }
        Poll::Ready(out)
    }
}
