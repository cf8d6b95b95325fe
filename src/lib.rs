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
//! ```no_run
//! # async fn demo() -> Result<(), cache_rollout::Error> {
//! use cache_rollout::{CacheRegistry, PolicyUpdate, RegistryOptions};
//! use cache_rollout::cache::CacheImpl;
//!
//! let cache = CacheRegistry::new(RegistryOptions::default()).await?; // observing
//! let name: Result<String, std::io::Error> =
//!     cache.get_or_load("user:1", || async { Ok("Ada".to_string()) }).await;
//!
//! // Later, at runtime: serve `user` from Redis.
//! cache
//!     .switch(&PolicyUpdate {
//!         imp: Some(CacheImpl::Redis),
//!         whitelist: Some(vec!["user".into()]),
//!         ..Default::default()
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! | module | what lives there |
//! |---|---|
//! | [`analysis`] | SHARDS miss-ratio-curve estimators, route × pattern, the phase-2 report and recommendation |
//! | [`error`] | the one [`Error`] type, with predicates |
//! | [`pattern`] | key → key pattern, templates, the bounded pattern table |
//! | [`cache`] | the [`Cache`](cache::Cache) trait and the null, memory and Redis backends |
//! | [`codec`] | the versioned, checksummed envelope of cached values |
//! | [`policy`] | [`Policy`] and [`PolicyUpdate`]: what can change at runtime, and its validation |
//! | [`registry`] | [`CacheRegistry`]: the `ArcSwap`ped policy and backend, cache-aside, single-flight, switching |
//! | [`metrics`] | Prometheus families and per-pattern label handles |
//! | [`http`] | candidate-route layer, `/internal/cache` router, `/metrics` |
//! | [`config`] | [`Settings`](config::Settings), loaded with figment |
//! | [`replay`] | trace readers (Twitter cache-trace, ARC `.lis`) and the replay driver |
//! | [`catalog`] | the reference service: a catalog API over SQLite, cached through the registry |

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
pub mod registry;
#[cfg(feature = "replay")]
pub mod replay;
pub mod rollout;
pub mod service;

pub use crate::error::{Error, Result};

/// 64 random bits (std's per-call random hasher keys, seeded from the OS), for ids and tokens that must differ
/// between processes and calls: lease tokens' seed, fleet epochs, L1 instance ids, tag invalidation tokens. Not
/// for secrets.
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::hash::RandomState::new().hash_one((std::process::id(), now))
}
pub use crate::policy::{Mode, PatternPolicy, Policy, PolicyUpdate, RollbackRules, RollbackScope};
pub use crate::registry::{CacheRegistry, RegistryOptions};
pub use crate::service::CacheRollout;
