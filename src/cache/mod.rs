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
use futures_util::future::{BoxFuture, FutureExt};
use serde::{Deserialize, Serialize};

use crate::error::Result;

mod memory;
mod null;
#[cfg(feature = "redis")]
mod redis;
mod redis_options;
#[cfg(feature = "redis")]
mod tiered;

pub use self::memory::MemoryCache;
pub use self::null::NullCache;
#[cfg(feature = "fleet")]
pub(crate) use self::redis::{
    node_clients as redis_node_clients, subscribe as redis_subscribe, Conn as RedisConn,
    Ready as RedisReady,
};
#[cfg(feature = "redis")]
pub use self::redis::{RedisCache, RedisMemory};
pub(crate) use self::redis_options::cluster_nodes as redis_cluster_nodes;
pub use self::redis_options::{redact_url, RedisOptions};
#[cfg(feature = "redis")]
pub use self::tiered::{L1Patterns, TieredCache, L1_RESULTS};

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

/// Boxes a backend operation's future inside a `cache_op` span at DEBUG level, with the fields `operation` (`get`,
/// `set_tagged`, `lease`, `set_leased`, `release_lease`, `delete`, `delete_matching`, `invalidate_tag`), `backend`
/// (`memory`, `redis`) and `key` (the application's key; the tag or prefix for tag and pattern operations).
///
/// With `RUST_LOG=cache_rollout=debug` the service logs each span's close with its time (`time.busy`,
/// `time.idle`), and every event inside it (a failed read, a refused fill) carries the span's fields. At the default
/// INFO level (or with no `tracing` subscriber) there is no span: one comparison against the subscriber's maximum
/// level, and the future is boxed as before.
pub(crate) trait Traced: std::future::Future + Send + Sized {
    fn traced<'a>(
        self,
        operation: &'static str,
        backend: CacheImpl,
        key: &str,
    ) -> BoxFuture<'a, Self::Output>
    where
        Self: 'a,
    {
        use tracing::Instrument;
        // Checked first, so that a disabled span costs no span and no enter/exit per poll: measured at about
        // 570 instructions per memory hit otherwise, since `tracing`'s `log` feature (on through axum) keeps
        // disabled spans alive for a `log` logger.
        if tracing::enabled!(tracing::Level::DEBUG) {
            self.instrument(tracing::debug_span!(
                "cache_op",
                operation,
                backend = backend.as_str(),
                key
            ))
            .boxed()
        } else {
            self.boxed()
        }
    }
}

impl<F: std::future::Future + Send> Traced for F {}

/// Runs a cache operation with `budget` as its deadline: [`Error::Timeout`](crate::Error::Timeout) past it. With
/// nothing left of the budget the operation is not even started (a command sent anyway might still take effect,
/// say grant a lease to a caller that has given up).
pub(crate) async fn within<T>(
    budget: Duration,
    operation: &'static str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let timed_out = || crate::Error::Timeout {
        operation,
        after: budget,
    };
    if budget.is_zero() {
        return Err(timed_out());
    }
    tokio::time::timeout(budget, f)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
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

/// The answer to [`Cache::lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The key holds a value.
    Hit(Bytes),
    /// The key is empty and this caller now holds its lease under the given token: only a
    /// [`Cache::set_leased`] with that token can fill it, and only until the key is deleted or the lease expires.
    Lease(u64),
    /// The key is empty and someone else holds its lease (another caller is loading it).
    Held,
}

/// Suffix of the backend key that holds a key's lease. Valid keys never contain a space, so it cannot collide with
/// a key, and pattern deletion (which scans `prefix*`) also removes the leases of the pattern's keys.
pub const LEASE_SUFFIX: &str = " ~lease";

/// Prefix (after the namespace prefix) of the backend key of a tag's set of keys.
pub const TAG_PREFIX: &str = " ~tag:";

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

    /// Removes `key` and revokes its lease, if any; `true` when the key was present.
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

    /// The value under `key`, or else a lease on it (Facebook's leases, "Scaling Memcache at Facebook", NSDI 2013,
    /// §3.2.1): one atomic step that either returns the value, or grants `token` the right to fill the key for
    /// `lease_ttl`, or says that another caller holds that right. `tags` are recorded with the lease, so an
    /// [`invalidate_tag`](Cache::invalidate_tag) made while the caller loads also revokes it.
    ///
    /// The default (for backends that are only used inside one process) grants every lease.
    ///
    /// # Errors
    /// Backend failures.
    fn lease<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        _lease_ttl: Duration,
        _tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        async move {
            Ok(match self.get(key).await? {
                Some(v) => Lookup::Hit(v),
                None => Lookup::Lease(token),
            })
        }
        .boxed()
    }

    /// A lease to refresh `key`, which holds a value past its TTL (stale-while-revalidate, stale-if-error): as
    /// [`lease`](Cache::lease), but granted although the key holds a value, and [`Lookup::Held`] while another
    /// caller holds the key's lease; never [`Lookup::Hit`]. An invalidation revokes it as it revokes any lease.
    ///
    /// The default asks [`lease`](Cache::lease) and takes a value found as [`Lookup::Held`]: a backend that does not
    /// implement it serves entries past their TTL until the backend drops them, and never refreshes them early.
    ///
    /// # Errors
    /// Backend failures.
    fn lease_refresh<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        async move {
            Ok(match self.lease(key, token, lease_ttl, tags).await? {
                Lookup::Hit(_) => Lookup::Held,
                other => other,
            })
        }
        .boxed()
    }

    /// The value under `key` in the shared backend, never from an in-process copy in front of it
    /// ([`TieredCache`]: from Redis, without filling its L1). The registry reads so when it waits for another
    /// caller's fill or checks that an entry is still there. Default: [`get`](Cache::get).
    ///
    /// # Errors
    /// Backend failures.
    fn get_shared<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        self.get(key)
    }

    /// Fills `key` only if `token` still holds its lease, and ends the lease; `false` when the lease was revoked
    /// (the key was deleted or set since, or the lease expired): the value may predate a write, and is dropped.
    /// `tags`: tags of the entry ([`invalidate_tag`](Cache::invalidate_tag) removes it).
    ///
    /// # Errors
    /// Backend failures.
    fn set_leased<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        _token: u64,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            self.set_tagged(key, value, Some(ttl), tags).await?;
            Ok(true)
        }
        .boxed()
    }

    /// Ends `token`'s lease on `key` without filling the key (the load failed, or its value is not stored), so
    /// that other callers need not wait for it to expire. Nothing happens when the lease is no longer `token`'s.
    ///
    /// # Errors
    /// Backend failures.
    fn release_lease<'a>(&'a self, _key: &'a str, _token: u64) -> BoxFuture<'a, Result<()>> {
        futures_util::future::ready(Ok(())).boxed()
    }

    /// [`set`](Cache::set), recording the entry under each of `tags`.
    ///
    /// # Errors
    /// Backend failures.
    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
        _tags: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        self.set(key, value, ttl)
    }

    /// Deletes every entry recorded under `tag` (and revokes the leases taken with it); returns how many entries.
    ///
    /// # Errors
    /// Backend failures.
    fn invalidate_tag<'a>(&'a self, _tag: &'a str) -> BoxFuture<'a, Result<u64>> {
        futures_util::future::ready(Ok(0)).boxed()
    }

    /// Checks that the backend answers.
    fn health(&self) -> BoxFuture<'_, Health>;

    /// `true` for a backend in another process (Redis), whose calls can hang: the registry bounds them with the
    /// read deadline. In-process backends answer without waiting, and are not given a timer.
    fn remote(&self) -> bool {
        false
    }

    /// `true` for a backend that never holds anything, so a get can be skipped without changing the outcome.
    /// The registry uses this to keep the observe path free of allocations and awaits.
    fn always_misses(&self) -> bool {
        false
    }

    /// Called once when the registry stops serving from this backend but keeps it for deletions only (a process
    /// that left Redis still deletes there, see `docs/behaviour.md`): drop what is held in process. Default: nothing.
    fn retire(&self) {}
}
