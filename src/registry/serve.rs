//! The served path (cache-aside): read; a fresh entry answers; an entry past its TTL is served while it is
//! refreshed (stale-while-revalidate) or kept to answer a failed load (stale-if-error); on a miss single-flight, the
//! key's lease, the load and the fill.

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
    /// The key held an entry (past its TTL, or of another version): the lease is asked for as a refresh, over it.
    pub(super) over: bool,
    /// That entry was past its TTL (the status says `refreshed`).
    pub(super) past: bool,
    /// That entry, while within `stale_if_error`: it answers a failed load if it is still there.
    pub(super) stale: Option<Stale>,
}

/// An entry past its TTL, as read: its bytes, its stamp, and the clock (ms since the Unix epoch) at the read.
pub(super) struct Stale {
    pub(super) bytes: Bytes,
    pub(super) stamp: codec::Stamp,
    pub(super) read_at: u64,
}

impl CacheRegistry {
    pub(super) async fn serve<C, E, F, Fut, A>(
        &self,
        call: Call<'_>,
        track: Option<Track>,
        shared: &Arc<dyn Cache>,
        opts: Opts<E, A>,
        loader: F,
    ) -> Step<C, E, F, A>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        A: Fn(&C) -> bool + Copy,
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
        // `over`: the key holds an entry (past its TTL, or of another version) and the lease is a refresh;
        // `past`: that entry was past its TTL (the call's status says `refreshed`).
        let (mut over, mut past_entry, mut stale) = (false, false, None);
        match got {
            Ok(Some(bytes)) => {
                // The wall clock is read only when the stamp is judged; otherwise when asked for
                // (`Outcome::read`'s 0).
                let now = if self.judges(route) { self.now_ms() } else { 0 };
                let stamp = codec::stamp(&bytes);
                let past = stamp.and_then(|s| Some((s, s.stale_by(now).filter(|_| now > 0)?)));
                let len = bytes.len();
                match (past, codec::decode::<C>(bytes.clone(), version)) {
                    (None, Ok(v)) => {
                        self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                        m.hit(cache_impl);
                        if stamp.is_some_and(|s| s.negative) {
                            m.negative_hit();
                        }
                        analysis::record_call(entry.slot, 0);
                        pending.finish(Some(len), true);
                        call.outcome.set(Outcome {
                            status: CacheStatus::Hit,
                            read: stamp.map(|s| (s, now)),
                        });
                        return Step::Done(Ok(v));
                    }
                    (Some((stamp, late)), Ok(v))
                        if late < route.stale_while_revalidate && !stamp.negative =>
                    {
                        self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                        let stale = Stale {
                            bytes,
                            stamp,
                            read_at: now,
                        };
                        // Boxed: a rare path, which inline would enlarge every served call's future.
                        return Box::pin(self.revalidate(
                            call,
                            shared,
                            deadline,
                            v,
                            stale,
                            &mut pending,
                            opts,
                            loader,
                        ))
                        .await;
                    }
                    (Some((stamp, late)), Ok(_)) => {
                        // Past its TTL and its stale-while-revalidate window: a miss, whose lease is a refresh;
                        // within stale-if-error, the entry is kept to answer a failed load.
                        self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                        over = true;
                        past_entry = true;
                        if late < route.stale_if_error && !stamp.negative {
                            stale = Some(Stale {
                                bytes,
                                stamp,
                                read_at: now,
                            });
                        }
                    }
                    (_, Err(_)) if codec::foreign::<C>(&bytes, version) => {
                        // Written by another version of the application (a rolling deploy): a plain miss,
                        // replaced under a refresh lease; neither an error nor deleted first.
                        self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                        over = true;
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
                }
            }
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
        Step::Done(
            Box::pin(self.serve_miss(
                Miss {
                    call,
                    backend: shared,
                    deadline,
                    backend_ok,
                    over,
                    past: past_entry,
                    stale,
                },
                pending,
                opts,
                loader,
            ))
            .await,
        )
    }

    /// Stale-while-revalidate: the entry past its TTL (`value`) answers this caller; the first caller of this
    /// process to find it so leads the key's flight and asks for its lease as a refresh, and on a grant the
    /// caller's wrapper refreshes it (in the background for [`fetch`](Self::fetch), inline otherwise). While a
    /// refresh runs here or elsewhere, every other caller is answered with the stale value.
    #[allow(clippy::too_many_arguments)]
    async fn revalidate<C, E, F, A>(
        &self,
        call: Call<'_>,
        shared: &Arc<dyn Cache>,
        mut deadline: Deadline,
        value: C,
        stale: Stale,
        pending: &mut PendingGet<'_>,
        opts: Opts<E, A>,
        loader: F,
    ) -> Step<C, E, F, A> {
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
        pending.finish(Some(stale.bytes.len()), true);
        // The stale value answers this caller (counted here, or by the wrapper that refreshes in the background).
        let answered = |value: C| {
            self.served_stale(entry, cache_impl, call.outcome, &stale);
            Step::Done(Ok(value))
        };
        let Join::Leader(guard) = self.inner.flights.join(key, tags) else {
            return answered(value); // this process refreshes it already
        };
        let token = self.next_token();
        let lease = backend.lease_refresh(key, token, route.lease_ttl, tags);
        match self
            .step(backend, &mut deadline, Operation::Get, "lease", lease)
            .await
        {
            Ok(Lookup::Lease(token)) => {
                metrics.lease(cache_impl, "granted");
                Step::Refresh(
                    value,
                    Box::new(RefreshJob {
                        loader,
                        absent_if: opts.absent_if,
                        key: key.to_string(),
                        slot: entry.slot as usize,
                        route: route.clone(),
                        backend: Arc::clone(shared),
                        tags: tags.to_vec(),
                        token,
                        guard,
                        stale,
                        stale_if: opts.stale_if,
                    }),
                )
            }
            Ok(_) => {
                metrics.lease(cache_impl, "held"); // another process refreshes it
                answered(value)
            }
            Err(e) => {
                metrics.error(cache_impl, e.error_type());
                if matches!(e, Error::Timeout { .. }) {
                    self.release_in_background(shared, key, token);
                }
                answered(value)
            }
        }
    }

    /// Counts a read answered with an entry within its stale-while-revalidate window: a hit, served stale.
    pub(super) fn served_stale(
        &self,
        entry: &PatternEntry,
        cache_impl: CacheImpl,
        outcome: &OutcomeCell,
        stale: &Stale,
    ) {
        entry.metrics.hit(cache_impl);
        entry.metrics.stale_served(false);
        analysis::record_call(entry.slot, 0);
        outcome.set(Outcome {
            status: CacheStatus::StaleWhileRevalidate,
            read: Some((stale.stamp, stale.read_at)),
        });
    }

    /// Runs a stale-while-revalidate refresh: load, then fill under the refresh's lease (released if the value
    /// is not stored). With `caller` (the inline refresh of `get_or_load`, whose caller waits), the call's outcome
    /// is kept there, and a failed load the caller allows is answered as stale-if-error answers one, within the longer
    /// stale window; a background refresh answers nobody.
    ///
    /// # Errors
    /// The loader's error (the lease is released; the stale entry stays until its windows end).
    pub(super) async fn refresh<C, E, F, Fut, A>(
        &self,
        job: Box<RefreshJob<F, A, E>>,
        caller: Option<&OutcomeCell>,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        A: Fn(&C) -> bool + Copy,
    {
        let RefreshJob {
            loader,
            absent_if,
            key,
            slot,
            route,
            backend,
            tags,
            token,
            guard,
            stale,
            stale_if,
        } = *job;
        let entry = self.slot(slot);
        let own = OutcomeCell::new();
        let outcome = caller.unwrap_or(&own);
        let refreshed = |stored| Outcome {
            status: CacheStatus::Miss {
                refreshed: true,
                stored,
            },
            read: None,
        };
        outcome.set(refreshed(false));
        let call = Call {
            key: &key,
            pattern: &entry.name,
            entry,
            route: &route,
            tags: &tags,
            start: self.inner.clock.raw(),
            outcome,
        };
        let value = match self.load(entry, loader).await {
            Ok(v) => v,
            Err(e) => {
                entry.metrics.refreshed(None);
                self.release_in_background(&backend, &key, token);
                if caller.is_some() && stale_if.is_none_or(|f| f(&e)) {
                    let window = route.stale_while_revalidate.max(route.stale_if_error);
                    let deadline = Deadline::new(route.read_timeout, 0);
                    // Boxed: a rare path.
                    let answer = self.stale_if_error(call, &*backend, deadline, stale, window);
                    if let Some(v) = Box::pin(answer).await {
                        return Ok(v);
                    }
                }
                return Err(e);
            }
        };
        let negative = absent_if.is_some_and(|f| f(&value));
        if negative {
            entry.metrics.absent();
        }
        let stored = if guard.is_detached() {
            false // an invalidation came during the load: it revoked the lease too
        } else if let Some(bytes) =
            self.storable_fill(&key, &value, &route, negative, backend.kind())
        {
            let ttl = stored_ttl(&route, negative);
            let deadline = Deadline::new(route.read_timeout, 0);
            self.fill(call, &backend, deadline, token, bytes, Some(&guard), ttl)
                .await
        } else {
            self.release_in_background(&backend, &key, token);
            false
        };
        entry.metrics.refreshed(Some(stored));
        outcome.set(refreshed(stored));
        drop(guard);
        Ok(value)
    }

    /// `value` encoded for a fill of `route` (a cached absence when `negative` and the pattern caches absences);
    /// `None` (counted and logged) when it cannot be encoded or is larger than `max_value_bytes`.
    pub(super) fn storable_fill<C: Codec>(
        &self,
        key: &str,
        value: &C,
        route: &Route,
        negative: bool,
        cache_impl: CacheImpl,
    ) -> Option<Bytes> {
        let metrics = &self.inner.metrics;
        let negative = negative && route.negative_ttl.is_some();
        let ttl = if negative {
            route.negative_ttl
        } else {
            Some(route.ttl)
        };
        let stamp = codec::Stamp::new(self.now_ms(), ttl, negative);
        match codec::encode(key, value, self.inner.value_version, route.encoding, stamp) {
            Ok(b) if b.len() <= self.inner.max_value_bytes => Some(b),
            Ok(b) => {
                metrics.error(cache_impl, "too_large");
                tracing::warn!(
                    key,
                    size = b.len(),
                    max = self.inner.max_value_bytes,
                    "cache: value too large, not stored"
                );
                None
            }
            Err(e) => {
                metrics.error(cache_impl, e.error_type());
                tracing::warn!(key, error = %e, "cache: value not stored");
                None
            }
        }
    }

    /// The miss path of [`serve`](Self::serve), in four phases: join the key's single flight (a follower is
    /// served the leader's fill), take the key's lease, load, fill.
    pub(super) async fn serve_miss<C, E, F, Fut, A>(
        &self,
        miss: Miss<'_>,
        mut pending: PendingGet<'_>,
        opts: Opts<E, A>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        A: Fn(&C) -> bool + Copy,
    {
        let Miss {
            call,
            backend: shared,
            mut deadline,
            mut backend_ok,
            over,
            past,
            stale,
        } = miss;
        let Call {
            key, entry, route, ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;
        call.outcome.set(Outcome {
            status: CacheStatus::Miss {
                refreshed: past,
                stored: false,
            },
            read: None,
        });

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
            match self.take_lease(call, shared, &mut deadline, over).await {
                Leased::Granted(token) => lease = Some(token),
                Leased::Filled(bytes) => {
                    // Another caller (another process) filled it: as good as a coalesced miss.
                    if let Some(v) = self.served_copy(call, bytes, leader.as_ref(), &mut pending) {
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
                let allowed = stale.is_some() && opts.stale_if.is_none_or(|f| f(&e));
                if let (Some(stale), true) = (stale, allowed) {
                    // Boxed: a rare path.
                    let answer =
                        self.stale_if_error(call, backend, deadline, stale, route.stale_if_error);
                    if let Some(v) = Box::pin(answer).await {
                        return Ok(v);
                    }
                }
                return Err(e);
            }
        };
        if leader.as_ref().is_none_or(flight::LeaderGuard::is_detached) {
            // An invalidation arrived while loading (or we are a follower whose leader failed): this value may
            // predate a write, so it is returned to this caller only, never shared or stored.
            let size = pending
                .track
                .as_ref()
                .map(|_| codec::HEADER_BYTES + value.payload_len(route.encoding.format));
            pending.finish(size, false);
            return Ok(value);
        }
        let negative = opts.absent_if.is_some_and(|f| f(&value));
        if negative {
            entry.metrics.absent();
        }
        let Some(bytes) = self.storable_fill(key, &value, route, negative, cache_impl) else {
            pending.finish(None, false);
            release(lease, deadline).await;
            return Ok(value);
        };
        pending.finish(Some(bytes.len()), true);
        entry.metrics.value_size.observe(bytes.len() as f64);

        // 4. Fill. Followers are told only once the value is stored under a lease that was still valid (they then
        // read it from the cache). Without a fill (the cache failing, another process's lease) they load for
        // themselves.
        if let (Some(token), true) = (lease, backend_ok) {
            let ttl = stored_ttl(route, negative);
            let stored = self
                .fill(call, shared, deadline, token, bytes, leader.as_ref(), ttl)
                .await;
            call.outcome.set(Outcome {
                status: CacheStatus::Miss {
                    refreshed: past,
                    stored,
                },
                read: None,
            });
        }
        drop(leader);
        Ok(value)
    }

    /// Stale-if-error: the load failed and the caller allows a stale answer; the entry past its TTL read earlier
    /// answers, if the key still holds it (an invalidation since then removed it, and then nothing stale may be
    /// served), or a fresh value another caller stored meanwhile. `None`: neither.
    async fn stale_if_error<C: Codec>(
        &self,
        call: Call<'_>,
        backend: &dyn Cache,
        mut deadline: Deadline,
        stale: Stale,
        window: Duration,
    ) -> Option<C> {
        let read_at = self.now_ms();
        // Still within the window now, after the load, not only when it was read.
        if stale.stamp.stale_by(read_at)? >= window {
            return None;
        }
        let again = backend.get_shared(call.key);
        let now = match self
            .step(backend, &mut deadline, Operation::Get, "get", again)
            .await
        {
            Ok(b) => b?,
            Err(e) => {
                self.inner.metrics.error(backend.kind(), e.error_type());
                return None;
            }
        };
        let version = self.inner.value_version;
        if now == stale.bytes {
            let v = codec::decode::<C>(stale.bytes, version).ok()?;
            call.entry.metrics.stale_served(true);
            call.outcome.set(Outcome {
                status: CacheStatus::StaleIfError,
                read: Some((stale.stamp, read_at)),
            });
            return Some(v);
        }
        let stamp = codec::stamp(&now)?;
        if self.past_ttl(call.route, &stamp).is_some() {
            return None;
        }
        let v = codec::decode::<C>(now, version).ok()?;
        call.entry.metrics.coalesced();
        call.outcome.set(Outcome {
            status: CacheStatus::Collapsed,
            read: Some((stamp, read_at)),
        });
        Some(v)
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
        let read = backend.get_shared(call.key);
        let again = self
            .step(backend, deadline, Operation::Get, "get", read)
            .await;
        let bytes = again.ok()??;
        self.served_copy(call, bytes, None, pending)
    }

    /// Phase 2: asks for the key's lease; while another process holds it, waits for its fill.
    async fn take_lease(
        &self,
        call: Call<'_>,
        shared: &Arc<dyn Cache>,
        deadline: &mut Deadline,
        over: bool,
    ) -> Leased {
        let Call {
            key, route, tags, ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;
        let asked = self.next_token();
        let lease = if over {
            backend.lease_refresh(key, asked, route.lease_ttl, tags)
        } else {
            backend.lease(key, asked, route.lease_ttl, tags)
        };
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
        if loaded.is_err() {
            entry.metrics.load_failed();
        }
        analysis::record_call(entry.slot, nanos);
        loaded
    }

    /// Phase 4: stores `bytes` under the lease `token` with what is left of the deadline (past it the caller goes
    /// on and the fill is dropped; the lease then expires by itself), and tells the followers once it is stored.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        call: Call<'_>,
        shared: &Arc<dyn Cache>,
        mut deadline: Deadline,
        token: u64,
        bytes: Bytes,
        leader: Option<&flight::LeaderGuard>,
        ttl: Duration,
    ) -> bool {
        let Call {
            key, entry, tags, ..
        } = call;
        let backend: &dyn Cache = &**shared;
        let cache_impl = backend.kind();
        let metrics = &self.inner.metrics;
        let fill = backend.set_leased(key, bytes.clone(), ttl, token, tags);
        match self
            .step(backend, &mut deadline, Operation::Set, "set", fill)
            .await
        {
            Ok(true) => {
                entry.metrics.set(cache_impl);
                if let Some(g) = leader {
                    g.publish(bytes);
                }
                true
            }
            Ok(false) => {
                metrics.lease(cache_impl, "revoked");
                tracing::debug!(
                    key,
                    "cache: lease revoked by an invalidation, value not stored"
                );
                false
            }
            Err(e) => {
                metrics.error(cache_impl, e.error_type());
                tracing::debug!(key, error = %e, "cache: fill failed");
                if matches!(e, Error::Timeout { .. }) {
                    // The fill may not have run: release its lease (a no-op if it did run).
                    self.release_in_background(shared, key, token);
                }
                false
            }
        }
    }

    /// A copy of the key's value that another caller stored, decoded for this one: counted as a coalesced miss,
    /// and passed on to this process's followers when this caller leads the flight. `None`: it does not decode.
    fn served_copy<C: Codec>(
        &self,
        call: Call<'_>,
        bytes: Bytes,
        leader: Option<&flight::LeaderGuard>,
        pending: &mut PendingGet<'_>,
    ) -> Option<C> {
        let entry = call.entry;
        let len = bytes.len();
        let read_at = self.now_ms();
        let stamp = codec::stamp(&bytes).filter(|s| self.past_ttl(call.route, s).is_none())?;
        let v = codec::decode::<C>(bytes.clone(), self.inner.value_version).ok()?;
        if let Some(g) = leader {
            g.publish(bytes);
        }
        call.outcome.set(Outcome {
            status: CacheStatus::Collapsed,
            read: Some((stamp, read_at)),
        });
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
            let poll = backend.get_shared(key);
            match self
                .step(backend, &mut deadline, Operation::Get, "get", poll)
                .await
            {
                Ok(Some(b)) if !self.bytes_past_ttl(route, &b) => return Some(b),
                Ok(_) => {}
                Err(e) => {
                    self.inner.metrics.error(backend.kind(), e.error_type());
                    return None;
                }
            }
        }
        None
    }
}

/// How long the backend keeps a fill of `route`: a cached absence its negative TTL, any other value its TTL and
/// the longer stale window.
pub(super) fn stored_ttl(route: &Route, negative: bool) -> Duration {
    match route.negative_ttl {
        Some(t) if negative => t,
        _ => route.retain(),
    }
}
