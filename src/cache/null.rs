//! [`NullCache`]: the safe default. Stores nothing, always misses, never fails.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};

use super::{Cache, CacheImpl, Health};
use crate::error::Result;

/// A cache that stores nothing: every get misses, every set and delete succeeds and does nothing.
///
/// Behind the [`CacheRegistry`](crate::CacheRegistry) it is the observe phase: the application behaves exactly as
/// without a cache while every call is measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullCache;

impl Cache for NullCache {
    fn kind(&self) -> CacheImpl {
        CacheImpl::Null
    }

    fn get<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        future::ready(Ok(None)).boxed()
    }

    fn set<'a>(
        &'a self,
        _key: &'a str,
        _value: Bytes,
        _ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<()>> {
        future::ready(Ok(())).boxed()
    }

    fn delete<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<bool>> {
        future::ready(Ok(false)).boxed()
    }

    fn delete_matching<'a>(
        &'a self,
        _prefix: &'a str,
        _belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>> {
        future::ready(Ok(0)).boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        future::ready(Health::local()).boxed()
    }

    fn always_misses(&self) -> bool {
        true
    }
}
