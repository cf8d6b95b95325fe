//! Writes and invalidations by the application: `set`, `invalidate`, `invalidate_tag`, `invalidate_pattern`.

use super::*;

impl CacheRegistry {
    /// Stores `value` under `key` with the pattern's TTL. For a pattern that is not served (or with caching
    /// disabled) the write is only counted, and the key is deleted from the active backend so that an older copy
    /// can never be served later. After this process left Redis (impl `null` or `memory`), the key is also
    /// deleted there, for the instances that may still serve from it.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::Encode`], [`Error::ValueTooLarge`], or the backend's error (also counted).
    pub async fn set<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<()> {
        self.set_value(key, &SerdeRef(value), &[]).await
    }

    /// [`set`](Self::set), recording the entry under `tags` (see [`invalidate_tag`](Self::invalidate_tag)).
    ///
    /// # Errors
    /// As [`set`](Self::set); a malformed tag is an [`Error::InvalidKey`].
    pub async fn set_tagged<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
        tags: &[&str],
    ) -> Result<()> {
        self.set_value(key, &SerdeRef(value), tags).await
    }

    /// [`set`](Self::set) for raw bytes.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_bytes(&self, key: &str, value: Bytes) -> Result<()> {
        self.set_value(key, &value, &[]).await
    }

    pub(super) async fn set_value<C: Codec>(
        &self,
        key: &str,
        value: &C,
        tags: &[&str],
    ) -> Result<()> {
        // One state for both parts: a swap between them must not lose the deletion in the Redis just left.
        let state = self.inner.active.load_full();
        let local = self.set_here(&state, key, value, tags).await;
        // The Redis this process left, if it keeps one: after the local write, whatever its outcome.
        let left = match (&local, &state.sink) {
            (Err(Error::InvalidKey { .. }), _) | (_, None) => Ok(()),
            (_, Some(sink)) => self.delete_in_sink(&state, sink, key).await,
        };
        local.and(left)
    }

    async fn set_here<C: Codec>(
        &self,
        state: &Active,
        key: &str,
        value: &C,
        tags: &[&str],
    ) -> Result<()> {
        validate_key(key)?;
        for t in tags {
            validate_key(t)?;
        }
        let (entry, ttl, track) = {
            let mut buf = None;
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            let entry = self.entry(state, &pattern);
            let route = state.route(&pattern);
            let serves = route.is_some();
            let track = state
                .policy
                .enabled
                .then(|| self.track(state, entry, &pattern, key, serves))
                .flatten();
            (entry, route.map(|r| (r.ttl, r.retain(), r.encoding)), track)
        };
        if state.policy.enabled {
            entry.metrics.write();
        }
        if let Some(t) = &track {
            let size = codec::HEADER_BYTES + value.payload_len(codec::Format::default());
            if size <= self.inner.max_value_bytes {
                self.record(entry, t, Access::Set, self.inner.clock.raw(), Some(size));
            } else {
                self.forget(entry, t); // refused as too large: the key is not in the cache after this
            }
        }
        // Under the NullCache there is nothing to detach or delete: a load left over from an earlier backend can
        // only store into a backend that is flushed before it is active again.
        if state.stores {
            // Whatever happens below, a load of this key in flight predates this value.
            self.inner.flights.detach(key);
        }
        let Some((ttl, retain, encoding)) = ttl.filter(|_| state.policy.enabled) else {
            if state.policy.enabled {
                // Observed: count the write, size one in `size_sample_every` without encoding.
                entry.metrics.set(CacheImpl::Null);
                if entry.metrics.sample_size(self.inner.size_sample_every) {
                    entry.metrics.value_size.observe(
                        (codec::HEADER_BYTES + value.payload_len(codec::Format::default())) as f64,
                    );
                }
            }
            if !state.stores {
                return Ok(());
            }
            // The active backend may hold an older copy (see the module docs): drop it.
            return state.backend.delete(key).await.map(|_| ());
        };
        let stamp = codec::Stamp::new(self.now_ms(), Some(ttl), false);
        let bytes = match codec::encode(key, value, self.inner.value_version, encoding, stamp) {
            Ok(b) => b,
            Err(e) => {
                // As for a value too large: the old value is stale now, do not leave it behind.
                let _ = state.backend.delete(key).await;
                return Err(e);
            }
        };
        let cache_impl = state.backend.kind();
        if bytes.len() > self.inner.max_value_bytes {
            self.inner.metrics.error(cache_impl, "too_large");
            // The old value is stale now that the caller has a new one: do not leave it behind.
            let _ = state.backend.delete(key).await;
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: bytes.len(),
                max: self.inner.max_value_bytes,
            });
        }
        entry.metrics.value_size.observe(bytes.len() as f64);
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_string()).collect();
        let cache_impl = state.backend.kind();
        let write = state.backend.set_tagged(key, bytes, Some(retain), &tags);
        self.timed(cache_impl, Operation::Set, write)
            .await
            .inspect(|()| entry.metrics.set(cache_impl))
            .inspect_err(|e| tracing::debug!(key, error = %e, "cache: set failed"))
    }

    /// Deletes every entry stored with `tag` ([`get_or_load_tagged`](Self::get_or_load_tagged),
    /// [`set_tagged`](Self::set_tagged)) from the active backend, revokes the leases of loads in progress with it
    /// (in every process: the tag's keys are kept in the backend), and detaches this process's loads with it;
    /// returns how many entries were deleted. Counted in `cache_invalidate_total{tag}` (the first 32 tags by
    /// name, later ones as `other`).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a malformed tag, or the backend's error (also counted).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        validate_key(tag)?;
        let state = self.inner.active.load_full();
        if state.stores {
            self.inner.flights.detach_tagged(tag);
        }
        let cache_impl = state.backend.kind();
        self.inner.metrics.invalidated_tag(cache_impl, tag);
        let local = if state.stores {
            self.timed(
                cache_impl,
                Operation::InvalidateTag,
                state.backend.invalidate_tag(tag),
            )
            .await
        } else {
            Ok(0)
        };
        let left = match &state.sink {
            Some(sink) => self
                .in_sink(&state, Operation::InvalidateTag, sink.invalidate_tag(tag))
                .await
                .map(|_| ()),
            None => Ok(()),
        };
        local.and_then(|n| left.map(|()| n))
    }

    /// Deletes `key` from the active backend (whitelisted or not, see the module docs), and from the Redis this
    /// process left if it did (impl `null` or `memory` after `redis`), and detaches any load of it in flight;
    /// `true` when it was present in the active backend.
    ///
    /// With caching disabled the delete still happens (unmeasured), so that re-enabling never serves a value
    /// older than a write made in between.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], or the backend's error (also counted): the caller must know that a stale value may
    /// remain until its TTL.
    pub async fn invalidate(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        // One state for both parts, as in `set`.
        let state = self.inner.active.load_full();
        let local = self.invalidate_here(&state, key).await;
        let left = match &state.sink {
            Some(sink) => self.delete_in_sink(&state, sink, key).await,
            None => Ok(()),
        };
        local.and_then(|found| left.map(|()| found))
    }

    async fn invalidate_here(&self, state: &Active, key: &str) -> Result<bool> {
        if state.stores {
            self.inner.flights.detach(key);
        }
        if !state.policy.enabled {
            return state.backend.delete(key).await;
        }
        let (entry, served) = {
            let mut buf = None;
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            (self.entry(state, &pattern), state.routed(&pattern))
        };
        let cache_impl = state.backend.kind();
        entry.metrics.del(cache_impl);
        self.inner.metrics.invalidated(cache_impl, "key");
        if let Some(a) = &self.inner.analysis {
            let hash = key_hash(key);
            if let Some(s) = &entry.shards {
                s.delete(hash, entry.slot);
            }
            a.shared.delete(hash, entry.slot);
            if let Some(w) = state.whitelisted.as_ref().filter(|_| served) {
                w.shards.delete(hash, entry.slot);
            }
        }
        if !state.stores {
            return Ok(false); // the NullCache holds nothing
        }
        self.timed(cache_impl, Operation::Delete, state.backend.delete(key))
            .await
    }

    /// Deletes every key of `pattern` from the active backend (Redis: `SCAN` + `UNLINK`) and detaches the
    /// pattern's loads in flight; returns how many keys were deleted.
    ///
    /// # Errors
    /// [`Error::InvalidPattern`], or the backend's error (also counted).
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<u64> {
        validate_pattern(pattern)?;
        let kp = &self.inner.key_patterns;
        if pattern == "*" {
            self.inner.flights.detach_matching(|_| true);
        } else {
            self.inner
                .flights
                .detach_matching(|k| kp.pattern_of(k) == pattern);
        }
        let state = self.inner.active.load_full();
        let cache_impl = state.backend.kind();
        self.inner.metrics.invalidated(cache_impl, "pattern");
        if let Some(a) = &self.inner.analysis {
            if pattern == "*" {
                for &i in state.patterns.values() {
                    if let Some(s) = &self.slot(i).shards {
                        s.delete_all(None);
                    }
                }
                a.shared.delete_all(None);
                if let Some(w) = &state.whitelisted {
                    w.shards.delete_all(None);
                }
            } else if let Some(&i) = state.patterns.get(pattern) {
                let entry = self.slot(i);
                if let Some(s) = &entry.shards {
                    s.delete_all(None);
                }
                a.shared.delete_all(Some(entry.slot));
                if let Some(w) = &state.whitelisted {
                    w.shards.delete_all(Some(entry.slot));
                }
            }
        }
        let delete = self.delete_pattern_in(&*state.backend, pattern);
        let local = self
            .timed(cache_impl, Operation::DeletePattern, delete)
            .await;
        let left = match &state.sink {
            Some(sink) => {
                let delete = self.delete_pattern_in(&**sink, pattern);
                self.in_sink(&state, Operation::DeletePattern, delete)
                    .await
                    .map(|_| ())
            }
            None => Ok(()),
        };
        local.and_then(|n| left.map(|()| n))
    }

    /// Deletes `key` (and revokes its lease) in `sink`, the Redis `state` keeps (see `Active::sink`).
    async fn delete_in_sink(&self, state: &Active, sink: &Arc<dyn Cache>, key: &str) -> Result<()> {
        self.in_sink(state, Operation::Delete, sink.delete(key))
            .await
            .map(|_| ())
    }

    /// One operation on the sink: timed and counted under `impl="redis"`, unless caching is disabled (as `set`
    /// and `invalidate` then are not).
    async fn in_sink<T>(
        &self,
        state: &Active,
        op: Operation,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        if state.policy.enabled {
            self.timed(CacheImpl::Redis, op, f).await
        } else {
            f.await
        }
    }

    pub(super) async fn delete_pattern_in(
        &self,
        backend: &dyn Cache,
        pattern: &str,
    ) -> Result<u64> {
        if pattern == "*" {
            return backend.delete_matching("", &|_| true).await;
        }
        let prefix = literal_prefix(pattern);
        let kp = &self.inner.key_patterns;
        backend
            .delete_matching(prefix, &|k| kp.pattern_of(k) == pattern)
            .await
    }
}

/// The part of a pattern before its first `*` segment: every key of the pattern starts with it.
pub(super) fn literal_prefix(pattern: &str) -> &str {
    match pattern.find('*') {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

/// Encodes a borrowed value with the same type tag as [`Serde<T>`], for `set`.
pub(super) struct SerdeRef<'a, T>(pub(super) &'a T);

impl<T: Serialize + serde::de::DeserializeOwned> Codec for SerdeRef<'_, T> {
    fn write_payload(
        &self,
        format: codec::Format,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<(), String> {
        codec::write_serde(self.0, format, out)
    }
    fn read_payload(
        _format: Option<codec::Format>,
        _payload: Bytes,
    ) -> std::result::Result<Self, String> {
        Err("SerdeRef only encodes".into())
    }
    fn type_tag() -> u32 {
        <Serde<T> as Codec>::type_tag()
    }
    fn payload_len(&self, format: codec::Format) -> usize {
        codec::serde_len(self.0, format)
    }
    fn same(&self, _other: &Self) -> bool {
        false
    }
}
