//! The shadow path: the loader's value is always returned; the cache is read, compared and filled beside it.

use super::*;

impl CacheRegistry {
    /// Shadow mode: the caller always gets the loader's value. Before the loader runs, the cache is read (a lease
    /// on a miss, so that the fill is safe); afterwards what it held is compared with the loader's value, and a
    /// miss is filled (or a differing copy deleted) in the background.
    pub(super) async fn shadow<C, E, F, Fut, A>(
        &self,
        call: Call<'_>,
        track: Option<Track>,
        backend: Arc<dyn Cache>,
        absent_if: Option<A>,
        loader: F,
    ) -> Result<C, E>
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
            tags,
            start,
            ..
        } = call;
        let cache_impl = backend.kind();
        let clock = &self.inner.clock;
        let token = self.next_token();
        let looked = within_if_remote(
            &*backend,
            route.read_timeout,
            "lease",
            backend.lease(key, token, route.lease_ttl, tags),
        )
        .await;
        let read_ns = nanos_since(clock, start);
        self.inner
            .metrics
            .op_duration(cache_impl, Operation::Get)
            .observe_nanos(read_ns);
        let rm = self.rollout_metrics(entry);
        let looked = match looked {
            Ok(l) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                Some(l)
            }
            Err(e) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::of(&e));
                self.inner.metrics.error(cache_impl, e.error_type());
                rm.shadow(ShadowResult::Error).inc();
                None
            }
        };
        let r = self.observe(entry, track, absent_if, loader).await;
        let Some(looked) = looked else {
            return r;
        };
        // The loader's value as it would be stored; `None`: nothing to compare or fill (the loader failed, or the
        // value cannot be encoded or is too large).
        let bytes = r
            .as_ref()
            .ok()
            .map(|v| (v, absent_if.is_some_and(|f| f(v))))
            .and_then(|(v, negative)| {
                let b = self.storable_fill(key, v, route, negative, cache_impl)?;
                Some((b, stored_ttl(route, negative)))
            });
        let version = self.inner.value_version;
        match (looked, bytes) {
            // Written by another version of the application: not comparable (not a mismatch), as a miss.
            (Lookup::Hit(cached), bytes) if codec::foreign::<C>(&cached, version) => {
                if bytes.is_some() {
                    rm.shadow(ShadowResult::Miss).inc();
                }
            }
            // Past its TTL (kept for a stale window): not compared; deleted (always safe) so that the next shadow
            // read of the key takes a lease and refills it.
            (Lookup::Hit(cached), bytes) if self.bytes_past_ttl(route, &cached) => {
                if bytes.is_some() {
                    rm.shadow(ShadowResult::Miss).inc();
                }
                let (backend, key) = (Arc::clone(&backend), key.to_string());
                let reg = self.clone();
                tokio::spawn(async move {
                    let _ = reg
                        .timed(backend.kind(), Operation::Delete, backend.delete(&key))
                        .await;
                });
            }
            (Lookup::Hit(cached), Some(_))
                if r.as_ref()
                    .is_ok_and(|v| codec::same_value(&cached, v, version)) =>
            {
                rm.shadow(ShadowResult::Match).inc();
                self.compared(entry, pattern, route, start, true);
            }
            (Lookup::Hit(cached), Some(_)) => self.confirm_mismatch(call, backend, cached),
            (Lookup::Lease(token), Some((bytes, ttl))) => {
                rm.shadow(ShadowResult::Miss).inc();
                self.fill_in_background(call, backend, token, bytes, ttl);
            }
            (Lookup::Lease(token), None) => {
                // Not filled: release the lease so that other processes need not wait for it to expire.
                self.release_in_background(&backend, key, token);
            }
            (Lookup::Held, _) => rm.shadow(ShadowResult::Miss).inc(),
            (Lookup::Hit(_), None) => {}
        }
        r
    }

    /// The cache held another value than the loader's: confirmed in the background before it is counted. If the
    /// key changed or went away meanwhile, a write and its invalidation came during the load, and the difference
    /// is not the cache's fault; otherwise it is a mismatch, and the cached copy is deleted.
    fn confirm_mismatch(&self, call: Call<'_>, backend: Arc<dyn Cache>, cached: Bytes) {
        let (reg, key, slot) = (self.clone(), call.key.to_string(), call.entry.slot as usize);
        let (pattern, route) = (call.pattern.to_string(), call.route.clone());
        let cache_impl = backend.kind();
        tokio::spawn(async move {
            let e = reg.slot(slot);
            let rm = reg.rollout_metrics(e);
            match reg
                .timed(cache_impl, Operation::Get, backend.get(&key))
                .await
            {
                Ok(Some(now)) if now == cached => {
                    rm.shadow(ShadowResult::Mismatch).inc();
                    tracing::warn!(key, "cache: shadow mismatch, cached copy deleted");
                    reg.compared(e, &pattern, &route, reg.inner.clock.raw(), false);
                    let _ = reg
                        .timed(cache_impl, Operation::Delete, backend.delete(&key))
                        .await;
                }
                Ok(_) => rm.shadow(ShadowResult::Miss).inc(),
                Err(_) => rm.shadow(ShadowResult::Error).inc(),
            }
        });
    }

    /// A shadow miss under the key's lease: the loader's value is stored in the background.
    fn fill_in_background(
        &self,
        call: Call<'_>,
        backend: Arc<dyn Cache>,
        token: u64,
        bytes: Bytes,
        ttl: Duration,
    ) {
        let (reg, key, slot) = (self.clone(), call.key.to_string(), call.entry.slot as usize);
        let tags = call.tags.to_vec();
        let cache_impl = backend.kind();
        tokio::spawn(async move {
            let fill = backend.set_leased(&key, bytes, ttl, token, &tags);
            match reg.timed(cache_impl, Operation::Set, fill).await {
                Ok(true) => reg.slot(slot).metrics.set(cache_impl),
                Ok(false) => reg.inner.metrics.lease(cache_impl, "revoked"),
                Err(_) => {}
            }
        });
    }
}
