//! Breakers and rollback: every cache read is judged in its pattern's window; a tripped rule sends the pattern
//! (or the impl) back to observing, then probes its way back.

use super::*;

/// How a cache read ended, for the rollback window.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadResult {
    Ok,
    Error,
    Timeout,
}

impl ReadResult {
    pub(super) fn of(e: &Error) -> Self {
        if matches!(e, Error::Timeout { .. }) {
            ReadResult::Timeout
        } else {
            ReadResult::Error
        }
    }
}

impl CacheRegistry {
    pub(super) fn rollout_metrics<'e>(&self, entry: &'e PatternEntry) -> &'e RolloutMetrics {
        entry
            .rollout
            .get_or_init(|| self.inner.metrics.rollout(&entry.name))
    }

    /// The window bucket number of raw clock reading `at`.
    pub(super) fn bucket(&self, route: &Route, at: u64) -> u64 {
        self.inner.clock.delta_as_nanos(self.inner.started, at) / route.bucket_nanos
    }

    /// Counts one cache read of a routed pattern in its window, judges the rules when it went wrong, and counts
    /// half-open probes.
    pub(super) fn read_done(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        route: &Route,
        at: u64,
        nanos: u64,
        result: ReadResult,
    ) {
        let bucket = self.bucket(route, at);
        let w = &entry.window;
        w.add(Event::Read, bucket);
        let mut bad = match result {
            ReadResult::Ok => false,
            ReadResult::Error => {
                w.add(Event::Error, bucket);
                true
            }
            ReadResult::Timeout => {
                w.add(Event::Timeout, bucket);
                true
            }
        };
        if nanos > route.slow_nanos {
            w.add(Event::Slow, bucket);
            bad = true;
        }
        if bad {
            self.judge(entry, pattern, route, bucket);
        } else if let Some(p) = &route.probe {
            if p.fetch_add(1, Ordering::Relaxed) + 1 >= route.probe_calls {
                self.close_breaker(pattern, p);
            }
        }
    }

    /// Counts one shadow comparison in the window.
    pub(super) fn compared(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        route: &Route,
        at: u64,
        same: bool,
    ) {
        let bucket = self.bucket(route, at);
        entry.window.add(Event::Compared, bucket);
        if !same {
            entry.window.add(Event::Mismatch, bucket);
            self.judge(entry, pattern, route, bucket);
        }
    }

    #[cold]
    pub(super) fn judge(&self, entry: &PatternEntry, pattern: &str, route: &Route, bucket: u64) {
        let state = self.inner.active.load();
        let rules = &state.policy.rollback;
        if !rules.enabled {
            return;
        }
        // Half-open, a few calls are enough to send the pattern back.
        let min = if route.probe.is_some() {
            rules.min_calls.min(10)
        } else {
            rules.min_calls
        };
        let counts = entry.window.counts(bucket);
        let recent = entry.window.bucket(bucket);
        let tripped = rollout::judge(rules, &counts, min)
            .map(|r| (r, counts))
            .or_else(|| rollout::judge(rules, &recent, min).map(|r| (r, recent)));
        if let Some((reason, counts)) = tripped {
            let (rules, cache_impl) = (rules.clone(), state.policy.cache_impl);
            drop(state);
            self.trip(entry, pattern, reason, counts, &rules, cache_impl);
        }
    }

    pub(super) fn breakers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Breaker>> {
        self.inner
            .breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Rebuilds the active routes under `breakers` (called with the breakers' lock held, so no change is lost).
    pub(super) fn apply_breakers(&self, breakers: &BTreeMap<String, Breaker>) {
        let replaced = self.inner.active.rcu(|cur| cur.with_breakers(breakers));
        self.rebase_served(&replaced);
    }

    /// Records an automatic rollback, or one of its steps, in the swap history.
    pub(super) fn push_rollback(&self, pattern: &str, what: String) {
        let s = self.inner.active.load();
        self.push_swap(SwapRecord {
            at: now_rfc3339(),
            source: SwapSource::Rollback,
            version: s.version,
            ok: true,
            from_impl: s.policy.cache_impl,
            to_impl: s.policy.cache_impl,
            whitelist: s.policy.whitelist.clone(),
            error: None,
            reason: Some(format!("{pattern}: {what}")),
        });
    }

    /// A rule tripped on `pattern`: its breaker opens (or, with `scope = "impl"`, the impl goes to `null`), and the
    /// trip is counted and logged once.
    #[cold]
    pub(super) fn trip(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        reason: Reason,
        counts: WindowCounts,
        rules: &RollbackRules,
        cache_impl: CacheImpl,
    ) {
        let cooldown = Duration::from_secs(rules.cooldown_secs);
        let to = match rules.scope {
            RollbackScope::Pattern => {
                if !self.open_breaker(entry, pattern, reason, counts, cooldown) {
                    return; // tripped already
                }
                "observe"
            }
            RollbackScope::Impl => {
                if self.inner.impl_rolled_back.swap(true, Ordering::AcqRel) {
                    return;
                }
                entry.window.reset();
                self.roll_impl_back(pattern, reason, cooldown);
                "impl null"
            }
        };
        self.inner
            .metrics
            .rollback(cache_impl, &entry.name, reason.as_str());
        tracing::warn!(
            key_pattern = pattern,
            reason = reason.as_str(),
            reads = counts.reads,
            errors = counts.errors,
            timeouts = counts.timeouts,
            slow = counts.slow,
            mismatched = counts.mismatched,
            cooldown_secs = rules.cooldown_secs,
            "cache: rolled back to {to}"
        );
        let hook = self
            .inner
            .rollback_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(pattern, reason.as_str());
        }
    }

    /// Calls `hook(key_pattern, reason)` on every rollback this registry decides (not on those it is
    /// told of by [`remote_rollback`](Self::remote_rollback)). One hook; a second call replaces the first.
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    pub(crate) fn on_rollback(&self, hook: RollbackHook) {
        *self
            .inner
            .rollback_hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// Another instance rolled `pattern` back (`reason`, one of `cache_rollback_total`'s reasons): open this
    /// instance's breaker for it too, for this instance's own `cooldown_secs`, after which it probes on its own
    /// traffic; nothing happens while rollback is off here or the pattern's breaker is open or probing. Not counted in
    /// `cache_rollback_total` (the deciding instance counted it); logged at WARN and kept in the swap history. A
    /// pattern this instance has not seen yet, or whose breaker is open already, is left alone.
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    pub(crate) fn remote_rollback(&self, pattern: &str, reason: &str, from: &str) {
        let rules = self.inner.active.load().policy.rollback.clone();
        if !rules.enabled || self.breakers().contains_key(pattern) {
            // Rollback off here, or this instance's own breaker for the pattern is open or probing already.
            return;
        }
        let cooldown = Duration::from_secs(rules.cooldown_secs);
        let Some(reason) = Reason::ALL.into_iter().find(|r| r.as_str() == reason) else {
            tracing::debug!(
                key_pattern = pattern,
                reason,
                "cache: unknown rollback reason ignored"
            );
            return;
        };
        let Some(&idx) = self.inner.active.load().patterns.get(pattern) else {
            return;
        };
        let entry = self.slot(idx);
        if self.open_breaker(entry, pattern, reason, WindowCounts::default(), cooldown) {
            tracing::warn!(
                key_pattern = pattern,
                reason = reason.as_str(),
                from,
                cooldown_secs = cooldown.as_secs(),
                "cache: rolled back to observe by another instance"
            );
        }
    }

    /// Opens the pattern's breaker, unless it is open already (`false`), and schedules its half-open probe.
    pub(super) fn open_breaker(
        &self,
        entry: &PatternEntry,
        pattern: &str,
        reason: Reason,
        counts: WindowCounts,
        cooldown: Duration,
    ) -> bool {
        // The trip's probe counter also identifies it: the cool-down acts only on its own trip.
        let trip: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        {
            let mut b = self.breakers();
            let trips = match b.get(pattern) {
                Some(x) if x.state == BreakerState::Open => return false,
                Some(x) => x.trips + 1,
                None => 1,
            };
            b.insert(
                pattern.to_string(),
                Breaker {
                    state: BreakerState::Open,
                    reason,
                    window: counts,
                    since: now_rfc3339(),
                    trips,
                    probe: Arc::clone(&trip),
                },
            );
            entry.window.reset();
            self.apply_breakers(&b);
        }
        self.push_rollback(pattern, format!("{} -> observe", reason.as_str()));
        let weak = Arc::downgrade(&self.inner);
        let pattern = pattern.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(cooldown).await;
            if let Some(inner) = weak.upgrade() {
                CacheRegistry { inner }.half_open(&pattern, &trip);
            }
        });
        true
    }

    /// `scope = "impl"`: the whole impl goes to `null`, and after the cool-down back to what it was, unless the
    /// configuration changed in between.
    pub(super) fn roll_impl_back(&self, pattern: &str, reason: Reason, cooldown: Duration) {
        let reg = self.clone();
        let why = format!("{pattern}: {} -> impl null", reason.as_str());
        tokio::spawn(async move {
            let before = reg.policy();
            let update = PolicyUpdate {
                cache_impl: Some(CacheImpl::Null),
                ..PolicyUpdate::default()
            };
            let done = reg
                .install(Change::Update(update), SwapSource::Rollback, Some(why))
                .await;
            let since = reg.inner.active.load().version;
            tokio::time::sleep(cooldown).await;
            reg.inner.impl_rolled_back.store(false, Ordering::Release);
            if done.is_ok() {
                let back = Some(format!("cool-down over -> impl {}", before.cache_impl));
                let _ = reg
                    .install(Change::Retry(before, since), SwapSource::Rollback, back)
                    .await;
            }
        });
    }

    pub(super) fn half_open(&self, pattern: &str, trip: &Arc<std::sync::atomic::AtomicU64>) {
        let mut b = self.breakers();
        match b.get_mut(pattern) {
            Some(x) if Arc::ptr_eq(&x.probe, trip) && x.state == BreakerState::Open => {
                x.state = BreakerState::HalfOpen;
                x.probe = Arc::default();
            }
            _ => return, // closed by configuration, or tripped again since
        }
        if let Some(&i) = self.inner.active.load().patterns.get(pattern) {
            self.slot(i).window.reset();
        }
        self.apply_breakers(&b);
        drop(b);
        tracing::info!(
            key_pattern = pattern,
            "cache: rollback cool-down over, probing (half-open)"
        );
        self.push_rollback(pattern, "cool-down over -> half-open".into());
    }

    /// Closes the pattern's breaker if it is still in the half-open episode whose probe counter is `probe` (a call
    /// holding the route of an earlier episode must not close a later one).
    pub(super) fn close_breaker(&self, pattern: &str, probe: &Arc<std::sync::atomic::AtomicU64>) {
        let mut b = self.breakers();
        if !matches!(b.get(pattern), Some(x) if x.state == BreakerState::HalfOpen && Arc::ptr_eq(&x.probe, probe))
        {
            return;
        }
        b.remove(pattern);
        self.apply_breakers(&b);
        drop(b);
        tracing::info!(
            key_pattern = pattern,
            "cache: probe passed, pattern restored"
        );
        self.push_rollback(pattern, "probe passed -> closed".into());
    }
}
