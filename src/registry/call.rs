//! The call path of `get_or_load`, top to bottom: the plan (observe / unramped / serve / shadow), decided once
//! per call from the active state, then the path it names.

use super::*;

/// Where a call goes, decided once from the active state.
pub(super) enum Plan {
    /// Not routed: observed.
    Observe,
    /// Routed, but the key is outside the pattern's ramp: observed, and timed as the unramped arm.
    Unramped,
    /// In the ramp of a pattern in serve mode: cache-aside on `Arc<dyn Cache>`.
    Serve(Route, Arc<dyn Cache>),
    /// In the ramp of a pattern in shadow mode: the loader answers, the cache is compared beside it.
    Shadow(Route, Arc<dyn Cache>),
}

/// One served or shadowed call: what its paths share.
#[derive(Clone, Copy)]
pub(super) struct Call<'a> {
    pub(super) key: &'a str,
    pub(super) pattern: &'a str,
    pub(super) entry: &'a PatternEntry,
    pub(super) route: &'a Route,
    pub(super) tags: &'a [String],
    /// Raw clock reading when the call started.
    pub(super) start: u64,
}

impl CacheRegistry {
    /// Typed cache-aside: the value under `key`, or the loader's value, which is then stored.
    ///
    /// `T` is encoded with serde_json inside a versioned, checksummed envelope ([`codec`]). Cache failures never
    /// reach the caller: they are counted and the loader runs (fail-open). A malformed key (see
    /// [`validate_key`]) bypasses the cache, is counted as `invalid_key`, and the loader runs.
    ///
    /// # Errors
    /// Only the loader's own error, which is returned as is and not cached.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, E>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_load_with(key, &[], || async { loader().await.map(Json) })
            .await
            .map(|Json(v)| v)
    }

    /// [`get_or_load`](Self::get_or_load) whose stored value is recorded under `tags`, so that
    /// [`invalidate_tag`](Self::invalidate_tag) of any of them removes it (and revokes a fill in progress). A tag
    /// follows the rules of a key ([`validate_key`]); a malformed one bypasses the cache like a malformed key.
    ///
    /// # Errors
    /// Only the loader's own error.
    pub async fn get_or_load_tagged<T, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<T, E>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_load_with(key, tags, || async { loader().await.map(Json) })
            .await
            .map(|Json(v)| v)
    }

    /// [`get_or_load`](Self::get_or_load) for raw bytes (no serde; still in the envelope). Used by `replay`.
    ///
    /// # Errors
    /// Only the loader's own error.
    pub async fn get_or_load_bytes<E, F, Fut>(&self, key: &str, loader: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        self.get_or_load_with(key, &[], loader).await
    }

    pub(super) async fn get_or_load_with<C, E, F, Fut>(
        &self,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let mut buf = None;
        let (entry, plan, track, pattern) = {
            let state = self.inner.active.load();
            if !state.policy.enabled {
                drop(state);
                return loader().await;
            }
            if validate_key(key).is_err() || tags.iter().any(|t| validate_key(t).is_err()) {
                self.inner
                    .metrics
                    .error(state.backend.kind(), "invalid_key");
                drop(state);
                return loader().await;
            }
            let pattern = self.inner.key_patterns.pattern_in(key, &mut buf);
            let entry = self.entry(&state, &pattern);
            // The one decision of the call.
            let plan = match state.route(&pattern) {
                None => Plan::Observe,
                Some(r) if !r.includes(key) => Plan::Unramped,
                Some(r) if r.mode == Mode::Shadow => {
                    Plan::Shadow(r.clone(), Arc::clone(&state.backend))
                }
                Some(r) => Plan::Serve(r.clone(), Arc::clone(&state.backend)),
            };
            let routed = matches!(plan, Plan::Serve(..) | Plan::Shadow(..));
            let track = self.track(&state, entry, &pattern, key, routed);
            if routed {
                if let Some(w) = &state.whitelisted {
                    w.gets.fetch_add(1, Ordering::Relaxed);
                }
            }
            (entry, plan, track, pattern)
        };
        let (route, backend, shadowed) = match plan {
            Plan::Serve(route, backend) => (route, backend, false),
            Plan::Shadow(route, backend) => (route, backend, true),
            Plan::Observe | Plan::Unramped => {
                // Observed: not routed, or a key outside its pattern's ramp (then timed as the ramp's unramped
                // arm). One call site, so the observe future is built in place.
                let unramped = matches!(plan, Plan::Unramped).then(|| self.inner.clock.raw());
                let r = self.observe(entry, track, loader).await;
                if let Some(start) = unramped {
                    self.rollout_metrics(entry)
                        .unramped
                        .observe_nanos(nanos_since(&self.inner.clock, start));
                }
                return r;
            }
        };
        let tags: Vec<String> = if tags.is_empty() {
            Vec::new()
        } else {
            tags.iter().map(|t| (*t).to_string()).collect()
        };
        let call = Call {
            key,
            pattern: &pattern,
            entry,
            route: &route,
            tags: &tags,
            start: self.inner.clock.raw(),
        };
        // Boxed: the served paths hold much more across their awaits than the observe path (timers, the
        // route, the flight), and inline they would make every call's future, observed ones too, larger,
        // which costs the observe path a larger copy per call. A served call does I/O anyway.
        let r = if shadowed {
            Box::pin(self.shadow(call, track, backend, loader)).await
        } else {
            Box::pin(self.serve(call, track, &backend, loader)).await
        };
        let rm = self.rollout_metrics(entry);
        let arm = if shadowed { &rm.shadowed } else { &rm.ramped };
        arm.observe_nanos(nanos_since(&self.inner.clock, call.start));
        r
    }
}
