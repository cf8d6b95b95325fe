//! # cache-rollout
//!
//! Put a cache in front of a slow origin without guessing. Every cache call of the application goes through a
//! [`CacheRegistry`]:
//!
//! 1. **Observe** (`CACHE_IMPL=null`): the [`NullCache`](cache::NullCache) stores nothing and always misses, so the
//!    application behaves exactly as before, while every call is measured per key pattern (`user:123` → `user`).
//! 2. **Analyse**: online miss ratio curves per key pattern (fixed-size SHARDS) predict what a cache would buy at
//!    each size, and [`CacheRegistry::report`] recommends what to whitelist with which TTL.
//! 3. **Serve** (`CACHE_IMPL=redis`, `CACHE_PATTERNS=user,project`): whitelisted patterns are served from Redis,
//!    switched at runtime without a restart; Redis errors and timeouts fail open to the loader.
//!
//! ## Getting started
//!
//! An application builds one [`CacheRollout`] (configuration, registry, fleet, SIGHUP, the axum pieces) and reads
//! through [`CacheRegistry::get_or_load`]; `docs/integration.md` and `examples/existing_service.rs` show a whole
//! service. Without axum or configuration files, the registry alone:
//!
//! ```no_run
//! # async fn demo() -> Result<(), cache_rollout::Error> {
//! use cache_rollout::{CacheRegistry, PolicyUpdate, RegistryOptions};
//! use cache_rollout::cache::CacheImpl;
//!
//! let cache = CacheRegistry::new(RegistryOptions::default()).await?; // observing
//! let name: Result<String, std::io::Error> =
//!     cache.get_or_load("user:1", || async { Ok("Ada".to_string()) }).await;
//!
//! // Later, at runtime: serve `user` from an in-process cache (or from Redis, with the `redis` feature).
//! cache
//!     .switch(&PolicyUpdate {
//!         cache_impl: Some(CacheImpl::Memory),
//!         whitelist: Some(vec!["user".into()]),
//!         ..Default::default()
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! | feature | adds |
//! |---|---|
//! | *(none)* | the registry, the null and in-process backends, metrics, the analysis, [`CacheRollout`] |
//! | `redis` | the Redis backend (single, Cluster, TLS) and the L1 in front of it |
//! | `axum` | `http`: the candidate-route layer, `/metrics`, `/internal/cache`; `CacheRollout::layer` and `router` |
//! | `fleet` | `fleet`: one rollout state for every instance (implies `redis`) |
//! | `replay` | `replay`: trace readers and the replay driver |
//! | `cli` (default) | the `cache-rollout` binary; all of the above |
//!
//! ## Layout
//!
//! | module | what lives there |
//! |---|---|
//! | [`service`] | [`CacheRollout`]: the one entry point for an application |
//! | [`config`] | [`Settings`](config::Settings): the `[cache]` table and the product's variables, loaded with figment |
//! | [`registry`] | [`CacheRegistry`]: a folder of one concept per file (call path, observe, serve, shadow, writes, switching, rollback, estimators, views) |
//! | [`policy`] | [`Policy`] and [`PolicyUpdate`]: what can change at runtime, and its validation |
//! | [`rollout`] | per-pattern route, ramp, sliding window and breaker |
//! | [`cache`] | the [`Cache`](cache::Cache) trait and the null, memory and Redis backends |
//! | [`codec`] | the versioned, checksummed envelope of cached values |
//! | [`pattern`] | key → key pattern, templates, the bounded pattern table |
//! | [`analysis`] | SHARDS miss-ratio-curve estimators, route × pattern, the phase-2 report and recommendation |
//! | [`metrics`] | Prometheus families and per-pattern label handles |
//! | `http` | candidate-route layer, `/internal/cache` router, `/metrics` (feature `axum`) |
//! | `fleet` | the fleet state in Redis (feature `fleet`) |
//! | `replay` | trace readers (Twitter cache-trace, ARC `.lis`) and the replay driver (feature `replay`) |
//! | [`error`] | the one [`Error`] type, with predicates |
//!
//! The binary (`src/bin/cache-rollout/`, feature `cli`) is the reference service, a catalog API over SQLite, built
//! on this public API only.

// The documentation is written for the full crate (docs.rs builds it with every feature); a build without some
// features keeps links to items that are compiled out.
#![cfg_attr(
    not(all(
        feature = "redis",
        feature = "axum",
        feature = "fleet",
        feature = "replay"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]

pub mod analysis;
pub mod cache;
pub mod codec;
pub mod config;
pub mod error;
#[cfg(feature = "fleet")]
pub mod fleet;
mod flight;
#[cfg(feature = "axum")]
pub mod http;
pub mod metrics;
pub mod pattern;
pub mod policy;
mod random;
pub mod registry;
#[cfg(feature = "replay")]
pub mod replay;
pub mod rollout;
pub mod service;

pub use crate::error::{Error, Result};

pub use crate::policy::{Mode, PatternPolicy, Policy, PolicyUpdate, RollbackRules, RollbackScope};
pub use crate::registry::{CacheRegistry, RegistryOptions};
pub use crate::service::CacheRollout;
