//! The [`Cache`] trait, over bytes, and its three backends.
//!
//! | backend | stores | fails |
//! |---|---|---|
//! | [`NullCache`] | nothing; every get misses | never |
//! | [`MemoryCache`] | in process (moka), bounded in entries and bytes, per-entry TTL | never |
//! | [`RedisCache`] | in Redis, one multiplexed auto-reconnecting connection with timeouts | on Redis errors and timeouts |
//!
//! The trait is dyn-compatible (`Arc<dyn Cache>`); its async methods return boxed futures. Values are opaque bytes:
//! encoding, integrity checks and TTL policy belong to the [`CacheRegistry`](crate::CacheRegistry).

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::Result;

mod memory;
mod null;
mod redis;

pub use self::memory::MemoryCache;
pub use self::null::NullCache;
pub use self::redis::{RedisCache, RedisOptions};

/// Which backend: the value of `CACHE_IMPL`, and the `impl` label of every metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CacheImpl {
    /// [`NullCache`]: observe only.
    #[default]
    Null,
    /// [`MemoryCache`]: in process.
    Memory,
    /// [`RedisCache`].
    Redis,
}

impl CacheImpl {
    /// Every impl, in label order.
    pub const ALL: [CacheImpl; 3] = [CacheImpl::Null, CacheImpl::Memory, CacheImpl::Redis];

    /// The lowercase name used in configuration, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheImpl::Null => "null",
            CacheImpl::Memory => "memory",
            CacheImpl::Redis => "redis",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CacheImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CacheImpl {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "null" => Ok(CacheImpl::Null),
            "memory" => Ok(CacheImpl::Memory),
            "redis" => Ok(CacheImpl::Redis),
            _ => Err(crate::Error::config(
                "cache.impl",
                s,
                "expected one of null, memory, redis",
            )),
        }
    }
}

/// A backend's health as shown by `GET /internal/cache`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Health {
    /// `true` when the backend answered its health check.
    pub up: bool,
    /// Round-trip time of the health check in milliseconds, when it was measured.
    pub latency_ms: Option<f64>,
    /// The error of a failed check.
    pub error: Option<String>,
}

impl Health {
    /// Always up, no latency: the in-process backends.
    pub fn local() -> Self {
        Health {
            up: true,
            latency_ms: None,
            error: None,
        }
    }
}

/// A byte cache. Implementations must be cheap to call concurrently from many tasks.
///
/// Keys are already validated ([`validate_key`](crate::pattern::validate_key)); values are opaque.
pub trait Cache: Send + Sync + 'static {
    /// Which backend this is.
    fn kind(&self) -> CacheImpl;

    /// The value under `key`, or `None`.
    ///
    /// # Errors
    /// Backend failures ([`Error::Redis`](crate::Error::Redis), [`Error::Timeout`](crate::Error::Timeout)).
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>>;

    /// Stores `value` under `key` for `ttl` (`None`: until evicted).
    ///
    /// # Errors
    /// Backend failures.
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<()>>;

    /// Removes `key`; `true` when it was present.
    ///
    /// # Errors
    /// Backend failures.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Removes every key that starts with `prefix` and for which `belongs(key)` is true; returns how many.
    ///
    /// The registry passes the pattern's literal prefix and an exact test (`pattern_of(key) == pattern`), so a
    /// backend can narrow its scan (Redis: `SCAN MATCH prefix*`) and still delete only the pattern's keys.
    ///
    /// # Errors
    /// Backend failures; keys deleted before the failure stay deleted.
    fn delete_matching<'a>(
        &'a self,
        prefix: &'a str,
        belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>>;

    /// Checks that the backend answers.
    fn health(&self) -> BoxFuture<'_, Health>;

    /// `true` for a backend that never holds anything, so a get can be skipped without changing the outcome.
    /// The registry uses this to keep the observe path free of allocations and awaits.
    fn always_misses(&self) -> bool {
        false
    }
}
