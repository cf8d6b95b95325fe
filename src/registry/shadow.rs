//! The shadow path: the loader's value is always returned; the cache is read, compared and filled beside it.

use super::*;

impl CacheRegistry {
    /// Shadow mode: the caller always gets the loader's value. Before the loader runs, the cache is read (a lease
    /// on a miss, so that the fill is safe); afterwards what it held is compared with the loader's value, and a
    /// miss is filled (or a differing copy deleted) in the background.
    pub(super) async fn shadow<C, E, F, Fut>(
        &self,
        call: Call<'_>,
        track: Option<Track>,
        backend: Arc<dyn Cache>,
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
            tags,
            start,
        } = call;
        let imp = backend.kind();
        let clock = &self.inner.clock;
        let token = self.next_token();
        let looked = bounded(
            &*backend,
            route.read_timeout,
            "lease",
            backend.lease(key, token, route.lease_ttl, tags),
        )
        .await;
        let read_ns = nanos_since(clock, start);
        self.inner
            .metrics
            .op_duration(imp, Operation::Get)
            .observe_nanos(read_ns);
        let rm = self.rollout_metrics(entry);
        let looked = match looked {
            Ok(l) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::Ok);
                Some(l)
            }
            Err(e) => {
                self.read_done(entry, pattern, route, start, read_ns, ReadResult::of(&e));
                self.inner.metrics.error(imp, e.error_type());
                rm.shadow[3].inc();
                None
            }
        };
        let r = self.observe(entry, track, loader).await;
        let Some(looked) = looked else {
            return r;
        };
        // The loader's value as it would be stored; `None`: nothing to compare or fill (the loader failed, or the
        // value cannot be encoded or is too large).
        let bytes = match &r {
            Ok(v) => match codec::encode(key, v, self.inner.value_version) {
                Ok(b) if b.len() <= self.inner.max_value_bytes => Some(b),
                Ok(_) => {
                    self.inner.metrics.error(imp, "too_large");
                    None
                }
                Err(e) => {
                    self.inner.metrics.error(imp, e.error_type());
                    None
                }
            },
            Err(_) => None,
        };
        let (reg, key, idx) = (self.clone(), key.to_string(), entry.tag as usize);
        match (looked, bytes) {
            (Lookup::Hit(cached), Some(bytes)) => {
                if codec::same_value(&cached, &bytes) {
                    rm.shadow[0].inc();
                    self.compared(entry, pattern, route, start, true);
                } else {
                    // Confirm before counting: if the key changed or went away meanwhile, a write and its
                    // invalidation came during the load, and the difference is not the cache's fault.
                    let (pattern, route) = (pattern.to_string(), route.clone());
                    tokio::spawn(async move {
                        let e = reg.slot(idx);
                        let rm = reg.rollout_metrics(e);
                        match reg.timed(imp, Operation::Get, backend.get(&key)).await {
                            Ok(Some(now)) if now == cached => {
                                rm.shadow[1].inc();
                                tracing::warn!(key, "cache: shadow mismatch, cached copy deleted");
                                reg.compared(e, &pattern, &route, reg.inner.clock.raw(), false);
                                let _ = reg
                                    .timed(imp, Operation::Delete, backend.delete(&key))
                                    .await;
                            }
                            Ok(_) => rm.shadow[2].inc(),
                            Err(_) => rm.shadow[3].inc(),
                        }
                    });
                }
            }
            (Lookup::Lease(token), Some(bytes)) => {
                rm.shadow[2].inc();
                let (tags, ttl) = (tags.to_vec(), route.ttl);
                tokio::spawn(async move {
                    let fill = backend.set_leased(&key, bytes, ttl, token, &tags);
                    match reg.timed(imp, Operation::Set, fill).await {
                        Ok(true) => reg.slot(idx).metrics.set(imp),
                        Ok(false) => reg.inner.metrics.lease(imp, "revoked"),
                        Err(_) => {}
                    }
                });
            }
            (Lookup::Lease(token), None) => {
                // Not filled: release the lease so that other processes need not wait for it to expire.
                self.release_in_background(&backend, &key, token);
            }
            (Lookup::Held, _) => rm.shadow[2].inc(),
            (Lookup::Hit(_), None) => {}
        }
        r
    }
}
