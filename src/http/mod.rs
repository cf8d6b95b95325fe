//! HTTP pieces for any axum app: the candidate-route layer, the `/internal/cache` router and `/metrics`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cache_rollout::Error> {
//! use axum::{routing::get, Router};
//! use cache_rollout::http::{internal_router, metrics_router, AdminToken, CandidateLayer, InternalState};
//! use cache_rollout::{CacheRegistry, RegistryOptions};
//!
//! let registry = CacheRegistry::new(RegistryOptions::default()).await?;
//! let app = Router::new()
//!     .route("/users/{id}", get(|| async { "..." }))
//!     .layer(CandidateLayer::new(registry.metrics()))          // counts the routes above it
//!     .merge(metrics_router(registry.clone()))
//!     .merge(internal_router(InternalState::new(registry, AdminToken::new(Some("a-long-admin-token".into())))));
//! # let _ = app; Ok(()) }
//! ```

mod candidate;
mod internal;

pub use self::candidate::{Candidate, CandidateLayer, CandidateResponseFuture, UNMATCHED_ROUTE};
pub use self::internal::{internal_router, production_internal_router, AdminToken, InternalState};

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
