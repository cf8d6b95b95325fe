//! HTTP pieces for any axum app: the candidate-route layer, the `/internal/cache` router and `/metrics`.
//!
//! Most applications take them from [`CacheRollout`](crate::CacheRollout) (`cache.layer()`, `cache.router()`),
//! which also wires the fleet, the configuration shown and the SIGHUP token rotation. Mounted by hand:
//!
//! ```no_run
//! # async fn demo() -> Result<(), cache_rollout::Error> {
//! use axum::{routing::get, Router};
//! use cache_rollout::http::{internal_router, metrics_router, AdminToken, CandidateLayer, InternalState};
//! use cache_rollout::{CacheRegistry, RegistryOptions};
//!
//! let registry = CacheRegistry::new(RegistryOptions::default()).await?;
//! let token = AdminToken::new(std::env::var("CACHE_ADMIN_TOKEN").ok())?; // 16+ characters, or an error
//! let app = Router::new()
//!     .route("/users/{id}", get(|| async { "..." }))
//!     .layer(CandidateLayer::new(registry.metrics()))          // counts the routes above it
//!     .merge(metrics_router(registry.clone()))
//!     // Reads APP_ENV: in production, or with an unknown value, every path under /internal/ answers 404.
//!     .merge(internal_router(InternalState::new(registry, token)));
//! # let _ = app; Ok(()) }
//! ```

mod candidate;
mod internal;
pub mod ui;

pub use self::candidate::{
    Candidate, CandidateLayer, CandidateResponseFuture, CACHE_STATUS, UNMATCHED_ROUTE,
};
pub use self::internal::{internal_router, AdminToken, InternalState, INTERNAL_VIEW_ROWS};

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::CacheRegistry;

/// `GET /metrics`: every metric of `registry` in the Prometheus text format (version 0.0.4).
pub fn metrics_router(registry: CacheRegistry) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    registry.metrics().render(),
                )
                    .into_response()
            }
        }),
    )
}
