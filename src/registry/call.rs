//! The call path of `get_or_load` and `fetch`, top to bottom: the decision (the loader alone, observe / unramped,
//! serve / shadow), made once per call from the active state, then the path it names.

use super::*;

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
    /// How the call ended, set by the path that ends it.
    pub(super) outcome: &'a OutcomeCell,
}

/// Where a value returned by [`CacheRegistry::fetch`] came from; also the base of the response's RFC 9211
/// `Cache-Status` ([`crate::http::CandidateLayer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheStatus {
    /// The cache was not used for this value: the pattern is observed (or the key outside its ramp, or in shadow
    /// mode, where the loader always answers), the registry is disabled, or the key is malformed.
    Bypass,
    /// A fresh entry (a cached absence included).
    Hit,
    /// Another caller's load of the same key answered (single-flight in this process, or a lease held by another).
    Collapsed,
    /// The loader ran: no usable entry (`refreshed`: there was one, past its TTL and its stale windows, or this
    /// caller refreshed it); `stored`: its value was stored.
    Miss {
        /// An entry past its TTL was there.
        refreshed: bool,
        /// The value was stored.
        stored: bool,
    },
    /// Past its TTL but within `stale_while_revalidate_secs`: served while one caller refreshes the key.
    StaleWhileRevalidate,
    /// Past its TTL but within `stale_if_error_secs`: the loader failed, and this was served instead of its error.
    StaleIfError,
}

/// A value from [`CacheRegistry::fetch`], with where it came from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Cached<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub status: CacheStatus,
    /// For a value read from the cache (fresh or stale): how long ago it was stored, on the writer's clock.
    pub age: Option<Duration>,
    /// For a value read from the cache: its remaining freshness in whole seconds, negative once past its TTL (the
    /// `ttl` of RFC 9211); `None` for a loaded value.
    pub ttl_secs: Option<i64>,
}

impl<T> Cached<T> {
    /// The same, with the value mapped by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Cached<U> {
        Cached {
            value: f(self.value),
            status: self.status,
            age: self.age,
            ttl_secs: self.ttl_secs,
        }
    }

    /// `true` for a value served past its TTL (either stale window).
    pub fn is_stale(&self) -> bool {
        matches!(
            self.status,
            CacheStatus::StaleWhileRevalidate | CacheStatus::StaleIfError
        )
    }
}

/// Where a call keeps how it ended while it runs: a mutex, not a `Cell`, so that the call's future stays `Send`
/// (uncontended: only the call's own task touches it).
#[derive(Debug)]
pub(super) struct OutcomeCell(std::sync::Mutex<Outcome>);

impl OutcomeCell {
    pub(super) fn new() -> Self {
        OutcomeCell(std::sync::Mutex::new(Outcome::BYPASS))
    }

    pub(super) fn get(&self) -> Outcome {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn set(&self, o: Outcome) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = o;
    }
}

/// How one call ended, kept while it runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) status: CacheStatus,
    /// The stamp of the entry served, and the registry's clock (ms since the Unix epoch) when it was read (0: not
    /// read then; the wall clock when asked).
    pub(crate) read: Option<(codec::Stamp, u64)>,
}

impl Outcome {
    pub(super) const BYPASS: Outcome = Outcome {
        status: CacheStatus::Bypass,
        read: None,
    };

    fn cached<T>(self, value: T) -> Cached<T> {
        let read = self.read();
        Cached {
            value,
            status: self.status,
            age: read.map(|(s, now)| s.age(now)),
            ttl_secs: read.and_then(|(s, now)| s.ttl_secs(now)),
        }
    }

    /// [`read`](Self::read) with its clock filled in.
    pub(crate) fn read(&self) -> Option<(codec::Stamp, u64)> {
        self.read
            .map(|(s, at)| (s, if at == 0 { wall_ms() } else { at }))
    }
}

/// Per-call options of [`CacheRegistry::fetch`]: tags, which loader errors may be answered with a stale value,
/// which values are absences.
///
/// ```
/// use cache_rollout::registry::Fetch;
///
/// #[derive(Debug)]
/// enum DbError { Timeout, NotAllowed }
///
/// let opts: Fetch<'_, Option<String>, DbError> = Fetch::new()
///     .tags(&["team:7"])
///     .stale_if(|e| matches!(e, DbError::Timeout))
///     .absent_if(Option::is_none);
/// # let _ = opts;
/// ```
#[derive(Debug)]
pub struct Fetch<'a, T, E> {
    pub(super) tags: &'a [&'a str],
    pub(super) stale_if: Option<fn(&E) -> bool>,
    pub(super) absent_if: Option<fn(&T) -> bool>,
}

impl<T, E> Clone for Fetch<'_, T, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, E> Copy for Fetch<'_, T, E> {}

impl<T, E> Default for Fetch<'_, T, E> {
    fn default() -> Self {
        Fetch {
            tags: &[],
            stale_if: None,
            absent_if: None,
        }
    }
}

impl<'a, T, E> Fetch<'a, T, E> {
    /// No tags; every loader error may be answered with a stale value (when the pattern has
    /// `stale_if_error_secs`); no value is an absence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the stored value under `tags` ([`CacheRegistry::invalidate_tag`]); as
    /// [`get_or_load_tagged`](CacheRegistry::get_or_load_tagged).
    #[must_use]
    pub fn tags(mut self, tags: &'a [&'a str]) -> Self {
        self.tags = tags;
        self
    }

    /// Only loader errors for which `allow` is true are answered with a stale value (stale-if-error); the others
    /// are returned as they are. Default: every error. A "not found" that is a value, not an error, is never one.
    #[must_use]
    pub fn stale_if(mut self, allow: fn(&E) -> bool) -> Self {
        self.stale_if = Some(allow);
        self
    }

    /// Values for which `absent` is true are absences (a typed "not found", e.g. `Option::is_none`): with the
    /// pattern's `cache_negative_secs` they are stored for that long instead of the TTL, and their hits counted in
    /// `cache_negative_hits_total`.
    #[must_use]
    pub fn absent_if(mut self, absent: fn(&T) -> bool) -> Self {
        self.absent_if = Some(absent);
        self
    }
}

/// The options of one call as the paths see them: `A` tells an absence of the encoded type.
#[derive(Clone, Copy)]
pub(super) struct Opts<E, A> {
    pub(super) stale_if: Option<fn(&E) -> bool>,
    pub(super) absent_if: Option<A>,
}

/// The absence predicate of calls that have none.
pub(super) type NoAbsence<C> = fn(&C) -> bool;

impl<E, C> Opts<E, NoAbsence<C>> {
    pub(super) const NONE: Self = Opts {
        stale_if: None,
        absent_if: None,
    };
}

/// What the call path hands back: a result, or a stale value to serve and a refresh this caller must run.
pub(super) enum Step<C, E, F, A> {
    Done(Result<C, E>),
    /// Stale-while-revalidate: the stale value answers; this caller leads the key's flight and holds its lease.
    /// (Boxed: inline, the job would make every call's result, observed ones too, much larger to move.)
    Refresh(C, Box<RefreshJob<F, A, E>>),
}

/// A refresh of one key under stale-while-revalidate, owned so that it can move to a background task.
pub(super) struct RefreshJob<F, A, E> {
    pub(super) loader: F,
    pub(super) absent_if: Option<A>,
    pub(super) key: String,
    pub(super) slot: usize,
    pub(super) route: Route,
    pub(super) backend: Arc<dyn Cache>,
    pub(super) tags: Vec<String>,
    pub(super) token: u64,
    pub(super) guard: flight::LeaderGuard,
    /// The entry past its TTL that answers meanwhile.
    pub(super) stale: Stale,
    /// Which loader errors the stale value may answer (inline refresh).
    pub(super) stale_if: Option<fn(&E) -> bool>,
}

/// What a call does (see [`CacheRegistry::decide`]).
// Not boxed: the value is taken apart at once, never held across an await, and a box would cost every served call an
// allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Decided<'a> {
    /// Disabled, or a malformed key or tag: the loader alone.
    Direct,
    /// Observed; `unramped`: a key outside its pattern's ramp, with the raw clock when the call started.
    Observe {
        entry: &'a PatternEntry,
        track: Option<Track>,
        unramped: Option<u64>,
    },
    /// Served or shadowed.
    Routed(Routed<'a>),
}

/// A served or shadowed call's route, backend and pattern.
pub(super) struct Routed<'a> {
    entry: &'a PatternEntry,
    route: Route,
    backend: Arc<dyn Cache>,
    shadowed: bool,
    track: Option<Track>,
    pattern: std::borrow::Cow<'a, str>,
}

/// The arm a routed call is timed into, once it is complete.
pub(super) struct ArmTiming<'a> {
    entry: &'a PatternEntry,
    start: u64,
    shadowed: bool,
}

impl CacheRegistry {
    /// Typed cache-aside: the value under `key`, or the loader's value, which is then stored.
    ///
    /// `T` is encoded in the pattern's format (MessagePack unless `format` says otherwise) inside a versioned,
    /// checksummed, time-stamped envelope ([`codec`]). Cache failures never reach the caller: they are counted and the loader
    /// runs (fail-open). A malformed key (see [`validate_key`]) bypasses the cache, is counted as `invalid_key`,
    /// and the loader runs.
    ///
    /// With the pattern's `stale_if_error_secs`, any loader error is answered with the entry past its TTL while
    /// there is one; with `stale_while_revalidate_secs`, an entry past its TTL is served while this process's
    /// first caller refreshes it inline (it waits; the others do not). [`fetch`](Self::fetch) chooses which errors,
    /// refreshes in the background and says where the value came from.
    ///
    /// # Errors
    /// Only the loader's own error, which is returned as is and not cached.
    pub async fn get_or_load<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, E>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_load_with(key, &[], Opts::NONE, || async { loader().await.map(Serde) })
            .await
            .map(|Serde(v)| v)
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
        self.get_or_load_with(key, tags, Opts::NONE, || async {
            loader().await.map(Serde)
        })
        .await
        .map(|Serde(v)| v)
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
        self.get_or_load_with(key, &[], Opts::NONE, loader).await
    }

    /// Cache-aside that says where the value came from ([`Cached`]: fresh hit, miss, collapsed, or stale and why,
    /// with the entry's age), with per-call options ([`Fetch`]): tags, which loader errors may be answered with a
    /// stale value, which values are absences. The loader is `Send + 'static` (it owns what it needs, e.g. a pool
    /// handle), so that under `stale_while_revalidate_secs` an entry past its TTL is served to every caller while
    /// one background task per key refreshes it under the key's lease.
    ///
    /// ```no_run
    /// # async fn demo(cache: cache_rollout::CacheRegistry) {
    /// use cache_rollout::registry::{CacheStatus, Fetch};
    ///
    /// let user = cache
    ///     .fetch("user:42", Fetch::new().absent_if(Option::is_none), || async {
    ///         Ok::<Option<String>, std::io::Error>(Some("Ada".into()))
    ///     })
    ///     .await
    ///     .expect("loaded");
    /// if user.status == CacheStatus::StaleIfError {
    ///     tracing::warn!(age = ?user.age, "served stale: the origin failed");
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// Only the loader's own error, when no stale value may answer it.
    ///
    /// # Panics
    /// Outside a Tokio runtime (a refresh is spawned on it), as every served call of the registry.
    pub async fn fetch<T, E, F, Fut>(
        &self,
        key: &str,
        opts: Fetch<'_, T, E>,
        loader: F,
    ) -> Result<Cached<T>, E>
    where
        T: Serialize + serde::de::DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let absent = opts.absent_if.map(|f| move |c: &Serde<T>| f(&c.0));
        let o = Opts {
            stale_if: opts.stale_if,
            absent_if: absent,
        };
        let loader = move || async move { loader().await.map(Serde) };
        self.fetch_with(key, opts.tags, o, loader)
            .await
            .map(|c| c.map(|Serde(v)| v))
    }

    /// [`fetch`](Self::fetch) for raw bytes (no serde; still in the envelope), without per-call options: every
    /// loader error may be answered with a stale value. Used by `replay`.
    ///
    /// # Errors
    /// Only the loader's own error, when no stale value may answer it.
    pub async fn fetch_bytes<E, F, Fut>(&self, key: &str, loader: F) -> Result<Cached<Bytes>, E>
    where
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
    {
        self.fetch_with(key, &[], Opts::NONE, loader).await
    }

    async fn fetch_with<C, E, F, Fut, A>(
        &self,
        key: &str,
        tags: &[&str],
        opts: Opts<E, A>,
        loader: F,
    ) -> Result<Cached<C>, E>
    where
        C: Codec + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<C, E>> + Send + 'static,
        A: Fn(&C) -> bool + Copy + Send + 'static,
    {
        let mut buf = None;
        let r = match self.decide(key, tags, &mut buf) {
            Decided::Direct => return loader().await.map(|v| Outcome::BYPASS.cached(v)),
            Decided::Observe {
                entry,
                track,
                unramped,
            } => {
                let r = self
                    .observed(entry, track, unramped, opts.absent_if, loader)
                    .await;
                return r.map(|v| Outcome::BYPASS.cached(v));
            }
            Decided::Routed(r) => r,
        };
        let outcome = OutcomeCell::new();
        let arm = ArmTiming {
            entry: r.entry,
            start: self.inner.clock.raw(),
            shadowed: r.shadowed,
        };
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_string()).collect();
        let call = Call {
            key,
            pattern: &r.pattern,
            entry: r.entry,
            route: &r.route,
            tags: &tags,
            start: arm.start,
            outcome: &outcome,
        };
        // Boxed: see `get_or_load_with`. (These lines repeat there: a shared `async fn` for them measured about 280
        // instructions more per memory hit, the copy of its larger future; see docs/performance.md.)
        let step = if r.shadowed {
            Step::Done(
                Box::pin(self.shadow(call, r.track, r.backend, opts.absent_if, loader)).await,
            )
        } else {
            Box::pin(self.serve(call, r.track, &r.backend, opts, loader)).await
        };
        let r = match step {
            Step::Done(r) => r,
            Step::Refresh(stale, job) => {
                self.served_stale(
                    self.slot(job.slot),
                    job.backend.kind(),
                    &outcome,
                    &job.stale,
                );
                let reg = self.clone();
                let (slot, limit) = (job.slot, job.route.lease_ttl);
                tokio::spawn(async move {
                    // Bounded by the lease's life (a fill after it would be refused anyway): a hung origin must not
                    // keep the key's flight, whose followers wait on it, forever.
                    let refresh = reg.refresh::<C, E, _, _, _>(job, None);
                    if tokio::time::timeout(limit, refresh).await.is_err() {
                        reg.slot(slot).metrics.refreshed(None);
                    }
                });
                Ok(stale)
            }
        };
        self.time_arm(arm, &outcome);
        r.map(|v| outcome.get().cached(v))
    }

    pub(super) async fn get_or_load_with<C, E, F, Fut, A>(
        &self,
        key: &str,
        tags: &[&str],
        opts: Opts<E, A>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        A: Fn(&C) -> bool + Copy,
    {
        let mut buf = None;
        let r = match self.decide(key, tags, &mut buf) {
            Decided::Direct => return loader().await,
            Decided::Observe {
                entry,
                track,
                unramped,
            } => {
                // One call site, so the observe future is built in place.
                let r = self.observe(entry, track, opts.absent_if, loader).await;
                if let Some(start) = unramped {
                    self.rollout_metrics(entry)
                        .unramped
                        .observe_nanos(nanos_since(&self.inner.clock, start));
                }
                return r;
            }
            Decided::Routed(r) => r,
        };
        let outcome = OutcomeCell::new();
        let arm = ArmTiming {
            entry: r.entry,
            start: self.inner.clock.raw(),
            shadowed: r.shadowed,
        };
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_string()).collect();
        let call = Call {
            key,
            pattern: &r.pattern,
            entry: r.entry,
            route: &r.route,
            tags: &tags,
            start: arm.start,
            outcome: &outcome,
        };
        // Boxed: the served paths hold much more across their awaits than the observe path (timers, the
        // route, the flight), and inline they would make every call's future, observed ones too, larger,
        // which costs the observe path a larger copy per call. A served call does I/O anyway.
        let step = if r.shadowed {
            Step::Done(
                Box::pin(self.shadow(call, r.track, r.backend, opts.absent_if, loader)).await,
            )
        } else {
            Box::pin(self.serve(call, r.track, &r.backend, opts, loader)).await
        };
        let r = match step {
            Step::Done(r) => r,
            // Inline: this caller refreshes and waits (a miss); the others are served the stale value.
            Step::Refresh(_, job) => {
                self.slot(job.slot).metrics.miss(job.backend.kind());
                Box::pin(self.refresh(job, Some(&outcome))).await
            }
        };
        self.time_arm(arm, &outcome);
        r
    }

    /// The end of a routed call: its arm timed, its outcome recorded for the response's `Cache-Status`.
    fn time_arm(&self, a: ArmTiming<'_>, outcome: &OutcomeCell) {
        analysis::record_outcome(outcome.get());
        let rm = self.rollout_metrics(a.entry);
        let h = if a.shadowed { &rm.shadowed } else { &rm.ramped };
        h.observe_nanos(nanos_since(&self.inner.clock, a.start));
    }

    /// The one decision of a call, from the active state, without an await: the loader alone, observe (or
    /// unramped), or a routed path.
    fn decide<'a>(
        &'a self,
        key: &'a str,
        tags: &[&str],
        buf: &'a mut Option<crate::pattern::PatternBuf>,
    ) -> Decided<'a> {
        let state = self.inner.active.load();
        if !state.policy.enabled {
            return Decided::Direct;
        }
        if validate_key(key).is_err() || tags.iter().any(|t| validate_key(t).is_err()) {
            self.inner
                .metrics
                .error(state.backend.kind(), "invalid_key");
            return Decided::Direct;
        }
        let pattern = self.inner.key_patterns.pattern_in(key, buf);
        let entry = self.entry(&state, &pattern);
        let (route, shadowed) = match state.route(&pattern) {
            None => {
                let track = self.track(&state, entry, &pattern, key, false);
                return Decided::Observe {
                    entry,
                    track,
                    unramped: None,
                };
            }
            Some(r) if !r.includes(key) => {
                let track = self.track(&state, entry, &pattern, key, false);
                return Decided::Observe {
                    entry,
                    track,
                    unramped: Some(self.inner.clock.raw()),
                };
            }
            Some(r) => (r.clone(), r.mode == Mode::Shadow),
        };
        let track = self.track(&state, entry, &pattern, key, true);
        if let Some(w) = &state.whitelisted {
            w.gets.fetch_add(1, Ordering::Relaxed);
        }
        Decided::Routed(Routed {
            entry,
            route,
            backend: Arc::clone(&state.backend),
            shadowed,
            track,
            pattern,
        })
    }

    /// Observed: not routed, or a key outside its pattern's ramp (then timed as the ramp's unramped arm).
    async fn observed<C, E, F, Fut, A>(
        &self,
        entry: &PatternEntry,
        track: Option<Track>,
        unramped: Option<u64>,
        absent_if: Option<A>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        A: Fn(&C) -> bool + Copy,
    {
        let r = self.observe(entry, track, absent_if, loader).await;
        if let Some(start) = unramped {
            self.rollout_metrics(entry)
                .unramped
                .observe_nanos(nanos_since(&self.inner.clock, start));
        }
        r
    }
}
