//! The served path (cache-aside): read, then on a miss single-flight, the key's lease, the load and the fill.

use super::*;

/// How phase 2 of a miss (the lease) ended.
enum Leased {
    /// This caller holds the key's lease (its token): it loads and fills.
    Granted(u64),
    /// The key was filled meanwhile (found while asking, or after waiting for another process's fill).
    Filled(Bytes),
    /// Another process holds the lease and did not fill in time: load without storing.
    Elsewhere,
    /// The cache failed: load, and touch the cache no more in this call.
    Failed,
}

/// What the miss path of a served call carries over from its read.
pub(super) struct Miss<'a> {
    pub(super) call: Call<'a>,
    pub(super) backend: &'a Arc<dyn Cache>,
    /// What is left of the call's read deadline.
    pub(super) deadline: Deadline,
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
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;
        let version = self.inner.value_version;
        let clock = &self.inner.clock;
        let mut pending = PendingGet::new(self, entry, track, start);
        let got = within_if_remote(backend, route.read_timeout, "get", backend.get(key)).await;
        let read_ns = nanos_since(clock, start);
        metrics
            .op_duration(cache_impl, Operation::Get)
            .observe_nanos(read_ns);
        // Reads, lease and fill share one deadline.
        let mut deadline = Deadline::new(route.read_timeout, read_ns);
        let mut backend_ok = true;
        match got {
            Ok(Some(bytes)) => match (bytes.len(), codec::decode::<C>(bytes, version)) {
                (len, Ok(v)) => {
                    self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                    m.hit(cache_impl);
                    analysis::record_call(entry.slot, 0);
                    pending.finish(Some(len), true);
                    return Ok(v);
                }
                (_, Err(e)) => {
                    self.read_done(entry, pattern, route, start, read_ns, ReadResult::Error);
                    metrics.error(cache_impl, e.error_type());
                    tracing::warn!(key, error = %e, "cache: corrupted entry deleted");
                    // Boxed: inline, this rare step would enlarge every served call's future (measured before:
                    // +370 instructions per memory hit).
                    let delete = self.step(
                        backend,
                        &mut deadline,
                        Operation::Delete,
                        "delete",
                        backend.delete(key),
                    );
                    if let Err(e) = Box::pin(delete).await {
                        metrics.error(cache_impl, e.error_type());
                    }
                }
            },
            Ok(None) => self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok),
            Err(e) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::of(&e));
                metrics.error(cache_impl, e.error_type());
                tracing::debug!(key, error = %e, "cache: get failed, falling back to the loader");
                backend_ok = false;
            }
        }
        m.miss(cache_impl);
        // The miss path is boxed: it holds much more across its awaits (flight, lease, load, fill) than the hit
        // path, and inline it would make every call's future as large as its own. A miss runs the loader anyway.
        Box::pin(self.serve_miss(
            Miss {
                call,
                backend: shared,
                deadline,
                backend_ok,
            },
            pending,
            loader,
        ))
        .await
    }

    /// The miss path of [`serve`](Self::serve), in four phases: join the key's single flight (a follower is
    /// served the leader's fill), take the key's lease, load, fill.
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
            call,
            backend: shared,
            mut deadline,
            mut backend_ok,
        } = miss;
        let Call { key, entry, .. } = call;
        let backend: &dyn Cache = &**shared;
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;

        // 1. Single-flight: one load per key in this process.
        let leader = match self.inner.flights.join(key, call.tags) {
            Join::Follower(rx) => {
                if let Some(v) = self
                    .follow(call, backend, &mut deadline, rx, &mut pending)
                    .await
                {
                    return Ok(v);
                }
                None // the leader failed or was detached: load ourselves, without storing over a newer load
            }
            Join::Leader(guard) => Some(guard),
        };

        // 2. The leader asks for the key's lease before it reads the origin: an invalidation from now on revokes
        // it, so a value read before a write can never be stored after that write's invalidation.
        let mut lease = None;
        if leader.is_some() && backend_ok {
            match self.take_lease(call, shared, &mut deadline).await {
                Leased::Granted(token) => lease = Some(token),
                Leased::Filled(bytes) => {
                    // Another caller (another process) filled it: as good as a coalesced miss.
                    if let Some(v) = self.served_copy(entry, bytes, leader.as_ref(), &mut pending) {
                        return Ok(v);
                    }
                }
                Leased::Elsewhere => {}
                Leased::Failed => backend_ok = false,
            }
        }

        // 3. Load.
        let loaded = self.load(entry, loader).await;
        // A lease that will not be filled is released, so that other processes need not wait for it to expire.
        let release = |token: Option<u64>, mut deadline: Deadline| async move {
            if let (Some(t), true) = (token, backend_ok) {
                let release = backend.release_lease(key, t);
                let r = self
                    .step(
                        backend,
                        &mut deadline,
                        Operation::Delete,
                        "release",
                        release,
                    )
                    .await;
                if let Err(e) = r {
                    metrics.error(cache_impl, e.error_type());
                }
            }
        };
        let value = match loaded {
            Ok(v) => v,
            Err(e) => {
                pending.finish(None, false);
                release(lease, deadline).await;
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
        let bytes = match codec::encode(key, &value, self.inner.value_version) {
            Ok(b) => b,
            Err(e) => {
                metrics.error(cache_impl, e.error_type());
                tracing::warn!(key, error = %e, "cache: value not stored");
                pending.finish(None, false);
                release(lease, deadline).await;
                return Ok(value);
            }
        };
        pending.finish(Some(bytes.len()), bytes.len() <= self.inner.max_value_bytes);
        entry.metrics.value_size.observe(bytes.len() as f64);

        // 4. Fill. Followers are told only once the value is stored under a lease that was still valid (they then
        // read it from the cache). Without a fill (the cache failing, another process's lease, a value too large)
        // they load for themselves.
        if bytes.len() > self.inner.max_value_bytes {
            metrics.error(cache_impl, "too_large");
            tracing::warn!(
                key,
                size = bytes.len(),
                max = self.inner.max_value_bytes,
                "cache: value too large, not stored"
            );
            release(lease, deadline).await;
        } else if let (Some(token), true) = (lease, backend_ok) {
            self.fill(call, shared, deadline, token, bytes, leader.as_ref())
                .await;
        }
        drop(leader);
        Ok(value)
    }

    /// Phase 1 for a follower: waits for the leader's fill, then reads it from the cache rather than taking the
    /// leader's copy: a read made after the follower started cannot predate an invalidation (from any process)
    /// that returned before it started, since every fill is made under a lease that invalidation revokes. `None`:
    /// no fill to read (the leader failed, was detached, or the read failed).
    async fn follow<C: Codec>(
        &self,
        call: Call<'_>,
        backend: &dyn Cache,
        deadline: &mut Deadline,
        filled: tokio::sync::watch::Receiver<Option<Bytes>>,
        pending: &mut PendingGet<'_>,
    ) -> Option<C> {
        flight::wait(filled).await?;
        let read = backend.get(call.key);
        let again = self
            .step(backend, deadline, Operation::Get, "get", read)
            .await;
        let bytes = again.ok()??;
        self.served_copy(call.entry, bytes, None, pending)
    }

    /// Phase 2: asks for the key's lease; while another process holds it, waits for its fill.
    async fn take_lease(
        &self,
        call: Call<'_>,
        shared: &Arc<dyn Cache>,
        deadline: &mut Deadline,
    ) -> Leased {
        let Call {
            key, route, tags, ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;
        let asked = self.next_token();
        let lease = backend.lease(key, asked, route.lease_ttl, tags);
        match self
            .step(backend, deadline, Operation::Get, "lease", lease)
            .await
        {
            Ok(Lookup::Lease(t)) => {
                metrics.lease(cache_impl, "granted");
                Leased::Granted(t)
            }
            Ok(Lookup::Hit(bytes)) => Leased::Filled(bytes),
            Ok(Lookup::Held) => {
                metrics.lease(cache_impl, "held");
                // Boxed: a rare path whose timers would otherwise enlarge every served call's future.
                match Box::pin(self.wait_for_fill(backend, key, route, *deadline)).await {
                    Some(bytes) => {
                        metrics.lease(cache_impl, "waited");
                        Leased::Filled(bytes)
                    }
                    None => Leased::Elsewhere,
                }
            }
            Err(e) => {
                metrics.error(cache_impl, e.error_type());
                if matches!(e, Error::Timeout { .. }) {
                    // Redis may still grant it after we gave up: release it, or it blocks fills until it expires.
                    self.release_in_background(shared, key, asked);
                }
                Leased::Failed
            }
        }
    }

    /// Phase 3: runs the loader, timed into the pattern's loader histogram and route × pattern.
    async fn load<C, E, F, Fut>(&self, entry: &PatternEntry, loader: F) -> Result<C, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let clock = &self.inner.clock;
        let start = clock.raw();
        let loaded = loader().await;
        let nanos = nanos_since(clock, start);
        entry.metrics.loader_nanos(nanos);
        analysis::record_call(entry.slot, nanos);
        loaded
    }

    /// Phase 4: stores `bytes` under the lease `token` with what is left of the deadline (past it the caller goes
    /// on and the fill is dropped; the lease then expires by itself), and tells the followers once it is stored.
    async fn fill(
        &self,
        call: Call<'_>,
        shared: &Arc<dyn Cache>,
        mut deadline: Deadline,
        token: u64,
        bytes: Bytes,
        leader: Option<&flight::LeaderGuard>,
    ) {
        let Call {
            key,
            entry,
            route,
            tags,
            ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;
        let fill = backend.set_leased(key, bytes.clone(), route.ttl, token, tags);
        match self
            .step(backend, &mut deadline, Operation::Set, "set", fill)
            .await
        {
            Ok(true) => {
                entry.metrics.set(cache_impl);
                if let Some(g) = leader {
                    g.publish(bytes);
                }
            }
            Ok(false) => {
                metrics.lease(cache_impl, "revoked");
                tracing::debug!(
                    key,
                    "cache: lease revoked by an invalidation, value not stored"
                );
            }
            Err(e) => {
                metrics.error(cache_impl, e.error_type());
                tracing::debug!(key, error = %e, "cache: fill failed");
                if matches!(e, Error::Timeout { .. }) {
                    // The fill may not have run: release its lease (a no-op if it did run).
                    self.release_in_background(shared, key, token);
                }
            }
        }
    }

    /// A copy of the key's value that another caller stored, decoded for this one: counted as a coalesced miss,
    /// and passed on to this process's followers when this caller leads the flight. `None`: it does not decode.
    fn served_copy<C: Codec>(
        &self,
        entry: &PatternEntry,
        bytes: Bytes,
        leader: Option<&flight::LeaderGuard>,
        pending: &mut PendingGet<'_>,
    ) -> Option<C> {
        let len = bytes.len();
        let v = codec::decode::<C>(bytes.clone(), self.inner.value_version).ok()?;
        if let Some(g) = leader {
            g.publish(bytes);
        }
        entry.metrics.coalesced();
        analysis::record_call(entry.slot, 0);
        pending.finish(Some(len), true);
        Some(v)
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
    /// The polls share what is left of the call's read `deadline`: a Redis that hangs meanwhile still adds no more
    /// than the deadline to the call.
    pub(super) async fn wait_for_fill(
        &self,
        backend: &dyn Cache,
        key: &str,
        route: &Route,
        mut deadline: Deadline,
    ) -> Option<Bytes> {
        let until = tokio::time::Instant::now() + route.lease_wait;
        while tokio::time::Instant::now() + Duration::from_millis(5) <= until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let poll = backend.get(key);
            match self
                .step(backend, &mut deadline, Operation::Get, "get", poll)
                .await
            {
                Ok(Some(b)) => return Some(b),
                Ok(None) => {}
                Err(e) => {
                    self.inner.metrics.error(backend.kind(), e.error_type());
                    return None;
                }
            }
        }
        None
    }
}
