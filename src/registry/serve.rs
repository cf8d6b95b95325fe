//! The served path (cache-aside): read, then on a miss single-flight, the key's lease, the load and the fill.

use super::*;

/// What the miss path of a served call carries over from its read.
pub(super) struct Miss<'a> {
    pub(super) call: Call<'a>,
    pub(super) backend: &'a Arc<dyn Cache>,
    /// Nanoseconds spent waiting on the cache so far in this call.
    pub(super) cache_ns: u64,
    /// False once the cache failed in this call: no lease, no fill.
    pub(super) backend_ok: bool,
}

impl CacheRegistry {
    pub(super) async fn serve<C, E, F, Fut>(
        &self,
        call: Call<'_>,
        track: Option<Track>,
        shared: &Arc<dyn Cache>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let Call {
            key,
            pattern,
            entry,
            route,
            start,
            ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let m = &entry.metrics;
        let imp = backend.kind();
        let metrics = &self.inner.metrics;
        let version = self.inner.value_version;
        let clock = &self.inner.clock;
        let mut pending = PendingGet::new(self, entry, track, start);
        let got = bounded(backend, route.read_timeout, "get", backend.get(key)).await;
        let read_ns = nanos_since(clock, start);
        metrics
            .op_duration(imp, Operation::Get)
            .observe_nanos(read_ns);
        // Time spent waiting on the cache in this call: reads, lease and fill share one deadline.
        let mut cache_ns = read_ns;
        let mut backend_ok = true;
        match got {
            Ok(Some(bytes)) => match (bytes.len(), codec::decode::<C>(bytes, version)) {
                (len, Ok(v)) => {
                    self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                    m.hit(imp);
                    analysis::record_call(entry.tag, 0);
                    pending.finish(Some(len), true);
                    return Ok(v);
                }
                (_, Err(e)) => {
                    self.read_done(entry, pattern, route, start, read_ns, ReadResult::Error);
                    metrics.error(imp, e.error_type());
                    tracing::warn!(key, error = %e, "cache: corrupted entry deleted");
                    let t0 = clock.raw();
                    let budget = route
                        .read_timeout
                        .saturating_sub(Duration::from_nanos(cache_ns));
                    if let Err(e) = bounded(backend, budget, "delete", backend.delete(key)).await {
                        metrics.error(imp, e.error_type());
                    }
                    // Timed by hand: `timed` here would enlarge every served call's future (measured: +370
                    // instructions per memory hit).
                    let delete_ns = nanos_since(clock, t0);
                    metrics
                        .op_duration(imp, Operation::Delete)
                        .observe_nanos(delete_ns);
                    cache_ns += delete_ns;
                }
            },
            Ok(None) => self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok),
            Err(e) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::of(&e));
                metrics.error(imp, e.error_type());
                tracing::debug!(key, error = %e, "cache: get failed, falling back to the loader");
                backend_ok = false;
            }
        }
        m.miss(imp);
        // The miss path is boxed: it holds much more across its awaits (flight, lease, load, fill) than the hit
        // path, and inline it would make every call's future as large as its own. A miss runs the loader anyway.
        Box::pin(self.serve_miss(
            Miss {
                call,
                backend: shared,
                cache_ns,
                backend_ok,
            },
            pending,
            loader,
        ))
        .await
    }

    /// The miss path of [`serve`](Self::serve): single-flight, lease, load, fill.
    pub(super) async fn serve_miss<C, E, F, Fut>(
        &self,
        miss: Miss<'_>,
        mut pending: PendingGet<'_>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let Miss {
            call:
                Call {
                    key,
                    entry,
                    route,
                    tags,
                    ..
                },
            backend: shared,
            mut cache_ns,
            mut backend_ok,
        } = miss;
        let backend: &dyn Cache = &**shared;
        let m = &entry.metrics;
        let imp = backend.kind();
        let metrics = &self.inner.metrics;
        let version = self.inner.value_version;
        let clock = &self.inner.clock;
        let leader = match self.inner.flights.join(key, tags) {
            Join::Follower(rx) => {
                // The leader signals once the cache holds the key's value; the follower then reads it from the
                // cache rather than taking the leader's copy: a read made after the follower started cannot
                // predate an invalidation (from any process) that returned before it started, since every fill is
                // made under a lease that invalidation revokes.
                if flight::wait(rx).await.is_some() {
                    let t0 = clock.raw();
                    let budget = route
                        .read_timeout
                        .saturating_sub(Duration::from_nanos(cache_ns));
                    let again = bounded(backend, budget, "get", backend.get(key)).await;
                    metrics
                        .op_duration(imp, Operation::Get)
                        .observe_nanos(nanos_since(clock, t0));
                    if let Ok(Some(bytes)) = again {
                        let len = bytes.len();
                        if let Ok(v) = codec::decode::<C>(bytes, version) {
                            m.coalesced();
                            analysis::record_call(entry.tag, 0);
                            pending.finish(Some(len), true);
                            return Ok(v);
                        }
                    }
                }
                None // the leader failed or was detached: load ourselves, without storing over a newer load
            }
            Join::Leader(guard) => Some(guard),
        };
        // The leader asks for the key's lease before it reads the origin: an invalidation from now on revokes it,
        // so a value read before a write can never be stored after that write's invalidation.
        let mut lease = None;
        if leader.is_some() && backend_ok {
            let t0 = clock.raw();
            let budget = route
                .read_timeout
                .saturating_sub(Duration::from_nanos(cache_ns));
            let asked = self.next_token();
            let r = bounded(
                backend,
                budget,
                "lease",
                backend.lease(key, asked, route.lease_ttl, tags),
            )
            .await;
            let lease_ns = nanos_since(clock, t0);
            cache_ns += lease_ns;
            metrics
                .op_duration(imp, Operation::Get)
                .observe_nanos(lease_ns);
            let filled = match r {
                Ok(Lookup::Lease(t)) => {
                    metrics.lease(imp, "granted");
                    lease = Some(t);
                    None
                }
                Ok(Lookup::Hit(bytes)) => Some(bytes),
                Ok(Lookup::Held) => {
                    metrics.lease(imp, "held");
                    // Boxed: a rare path whose timers would otherwise enlarge every served call's future.
                    let got = Box::pin(self.wait_for_fill(backend, key, route, cache_ns)).await;
                    if got.is_some() {
                        metrics.lease(imp, "waited");
                    }
                    got
                }
                Err(e) => {
                    metrics.error(imp, e.error_type());
                    if matches!(e, Error::Timeout { .. }) {
                        // Redis may still grant it after we gave up: release it, or it blocks fills until it
                        // expires.
                        self.release_in_background(shared, key, asked);
                    }
                    backend_ok = false;
                    None
                }
            };
            if let Some(bytes) = filled {
                let len = bytes.len();
                if let Ok(v) = codec::decode::<C>(bytes.clone(), version) {
                    // Another caller (another process) filled it: as good as a coalesced miss.
                    if let Some(g) = &leader {
                        g.publish(bytes);
                    }
                    m.coalesced();
                    analysis::record_call(entry.tag, 0);
                    pending.finish(Some(len), true);
                    return Ok(v);
                }
            }
        }
        let load_start = clock.raw();
        let loaded = loader().await;
        let nanos = nanos_since(clock, load_start);
        m.loader_nanos(nanos);
        analysis::record_call(entry.tag, nanos);
        // A lease that will not be filled is released, so that other processes need not wait for it to expire.
        let release = |token: Option<u64>, cache_ns: u64| async move {
            if let (Some(t), true) = (token, backend_ok) {
                let budget = route
                    .read_timeout
                    .saturating_sub(Duration::from_nanos(cache_ns));
                let release = bounded(backend, budget, "release", backend.release_lease(key, t));
                let _ = self.timed(imp, Operation::Delete, release).await;
            }
        };
        let value = match loaded {
            Ok(v) => v,
            Err(e) => {
                pending.finish(None, false);
                release(lease, cache_ns).await;
                return Err(e);
            }
        };
        if leader.as_ref().is_none_or(flight::LeaderGuard::is_detached) {
            // An invalidation arrived while loading (or we are a follower whose leader failed): this value may
            // predate a write, so it is returned to this caller only, never shared or stored.
            let size = pending
                .track
                .as_ref()
                .map(|_| codec::HEADER_BYTES + value.payload_len());
            pending.finish(size, false);
            return Ok(value);
        }
        let bytes = match codec::encode(key, &value, version) {
            Ok(b) => b,
            Err(e) => {
                metrics.error(imp, e.error_type());
                tracing::warn!(key, error = %e, "cache: value not stored");
                pending.finish(None, false);
                release(lease, cache_ns).await;
                return Ok(value);
            }
        };
        pending.finish(Some(bytes.len()), bytes.len() <= self.inner.max_value_bytes);
        m.value_size.observe(bytes.len() as f64);
        // Followers are told only once the value is stored under a lease that was still valid (they then read it
        // from the cache). Without a fill (the cache failing, another process's lease, a value too large) they
        // load for themselves.
        if bytes.len() > self.inner.max_value_bytes {
            metrics.error(imp, "too_large");
            tracing::warn!(
                key,
                size = bytes.len(),
                max = self.inner.max_value_bytes,
                "cache: value too large, not stored"
            );
            release(lease, cache_ns).await;
        } else if let (Some(token), true) = (lease, backend_ok) {
            // The fill gets what is left of the deadline; past it the caller goes on and the fill is dropped (the
            // lease then expires by itself).
            let budget = route
                .read_timeout
                .saturating_sub(Duration::from_nanos(cache_ns));
            let t0 = clock.raw();
            let r = bounded(
                backend,
                budget,
                "set",
                backend.set_leased(key, bytes.clone(), route.ttl, token, tags),
            )
            .await;
            metrics
                .op_duration(imp, Operation::Set)
                .observe_nanos(nanos_since(clock, t0));
            match r {
                Ok(true) => {
                    m.set(imp);
                    if let Some(g) = &leader {
                        g.publish(bytes);
                    }
                }
                Ok(false) => {
                    metrics.lease(imp, "revoked");
                    tracing::debug!(
                        key,
                        "cache: lease revoked by an invalidation, value not stored"
                    );
                }
                Err(e) => {
                    metrics.error(imp, e.error_type());
                    tracing::debug!(key, error = %e, "cache: fill failed");
                    if matches!(e, Error::Timeout { .. }) {
                        // The fill may not have run: release its lease (a no-op if it did run).
                        self.release_in_background(shared, key, token);
                    }
                }
            }
        }
        drop(leader);
        Ok(value)
    }

    /// Releases `token`'s lease on `key` in the background, bounded by the backend's own command timeout.
    pub(super) fn release_in_background(&self, backend: &Arc<dyn Cache>, key: &str, token: u64) {
        let (reg, backend, key) = (self.clone(), Arc::clone(backend), key.to_string());
        tokio::spawn(async move {
            let _ = reg
                .timed(
                    backend.kind(),
                    Operation::Delete,
                    backend.release_lease(&key, token),
                )
                .await;
        });
    }

    /// Another process holds the key's lease: polls for its fill every 5 ms for at most `lease_wait`.
    /// The polls share what is left of the call's read deadline (`cache_ns` spent so far): a Redis that hangs
    /// meanwhile still adds no more than the deadline to the call.
    pub(super) async fn wait_for_fill(
        &self,
        backend: &dyn Cache,
        key: &str,
        route: &Route,
        mut cache_ns: u64,
    ) -> Option<Bytes> {
        let clock = &self.inner.clock;
        let until = tokio::time::Instant::now() + route.lease_wait;
        while tokio::time::Instant::now() + Duration::from_millis(5) <= until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let budget = route
                .read_timeout
                .saturating_sub(Duration::from_nanos(cache_ns));
            let t0 = clock.raw();
            let poll = bounded(backend, budget, "get", backend.get(key));
            let r = self.timed(backend.kind(), Operation::Get, poll).await;
            cache_ns += nanos_since(clock, t0);
            match r {
                Ok(Some(b)) => return Some(b),
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        None
    }
}
