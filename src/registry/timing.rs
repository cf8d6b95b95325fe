//! Deadlines and timing of cache operations.

use super::*;

/// Runs a cache operation with `budget` as its deadline (only for a backend that can hang: an in-process one answers
/// without waiting, and a timer per call would be pure cost).
pub(super) fn within_if_remote<T, F: Future<Output = Result<T>>>(
    backend: &dyn Cache,
    budget: Duration,
    operation: &'static str,
    f: F,
) -> futures_util::future::Either<F, impl Future<Output = Result<T>>> {
    use futures_util::future::Either;
    if !backend.remote() {
        return Either::Left(f);
    }
    Either::Right(crate::cache::within(budget, operation, f))
}

/// Nanoseconds since a raw quanta reading (TSC-based where available: a pair of readings costs about a third of
/// two `std::time::Instant::now` calls on the reference machine).
pub(super) fn nanos_since(clock: &quanta::Clock, start: u64) -> u64 {
    clock.delta_as_nanos(start, clock.raw())
}

/// The read deadline of one served call, shared by all its cache steps (the read, a corrupt entry's delete, the
/// lease, the polls for another process's fill, the fill, a lease's release): each step gets what is left, and the
/// time it takes is spent from it, so a Redis that hangs adds at most the deadline to the call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    budget: Duration,
    spent_ns: u64,
}

impl Deadline {
    /// `budget` for the whole call, of which `spent_ns` nanoseconds are already gone.
    pub(super) fn new(budget: Duration, spent_ns: u64) -> Self {
        Deadline { budget, spent_ns }
    }

    /// Spends `ns` nanoseconds of it.
    pub(super) fn spend(&mut self, ns: u64) {
        self.spent_ns += ns;
    }

    /// What is left of it (zero once it has passed).
    pub(super) fn left(&self) -> Duration {
        self.budget
            .saturating_sub(Duration::from_nanos(self.spent_ns))
    }
}

impl CacheRegistry {
    /// One cache step of a served call: `f` within what is left of `deadline` (past it, [`Error::Timeout`] of
    /// `name`), its duration observed in `cache_operation_duration_seconds{operation}` and spent from `deadline`.
    /// Failures are the caller's to count: some are expected (a lease held elsewhere), some are not.
    pub(super) async fn step<T>(
        &self,
        backend: &dyn Cache,
        deadline: &mut Deadline,
        operation: Operation,
        name: &'static str,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let clock = &self.inner.clock;
        let t0 = clock.raw();
        let r = within_if_remote(backend, deadline.left(), name, f).await;
        let ns = nanos_since(clock, t0);
        self.inner
            .metrics
            .op_duration(backend.kind(), operation)
            .observe_nanos(ns);
        deadline.spend(ns);
        r
    }

    /// Runs one backend operation off the read path (writes, invalidations, lease releases, background fills),
    /// observing its duration in
    /// `cache_operation_duration_seconds{operation}` and counting its failure in `cache_errors_total`, so that
    /// every counted error has its operation counted too (the error ratio's two sides count the same calls).
    pub(super) async fn timed<T>(
        &self,
        cache_impl: CacheImpl,
        operation: Operation,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let clock = &self.inner.clock;
        let t0 = clock.raw();
        let r = f.await;
        let metrics = &self.inner.metrics;
        metrics
            .op_duration(cache_impl, operation)
            .observe_nanos(nanos_since(clock, t0));
        if let Err(e) = &r {
            metrics.error(cache_impl, e.error_type());
        }
        r
    }
}

impl CacheRegistry {
    /// Milliseconds since the Unix epoch: the wall clock, or, on a mock clock (a trace replay), the wall clock at
    /// creation advanced by the mock. Entries are stamped with it, and judged fresh or stale by it, so instances
    /// sharing a Redis should keep their clocks in sync (NTP).
    pub(super) fn now_ms(&self) -> u64 {
        let i = &self.inner;
        if i.mock_clock {
            return i.wall_base_ms + i.clock.delta_as_nanos(i.started, i.clock.raw()) / 1_000_000;
        }
        wall_ms()
    }

    /// How long past its TTL the entry `stamp` is, by the registry's judgement; `None`: fresh. Without a stale window
    /// on a real clock the backend's own expiry decides (an entry it still holds is fresh: no clock skew between
    /// instances can make it a miss); with a window, or on a trace's mock clock, the stamp does. A cached absence
    /// has no stale window.
    pub(super) fn past_ttl(&self, route: &Route, stamp: &codec::Stamp) -> Option<Duration> {
        if !self.judges(route) {
            return None;
        }
        stamp.stale_by(self.now_ms())
    }

    /// Whether entries of `route` are judged by their stamp (a stale window, or a mock clock): see
    /// [`past_ttl`](Self::past_ttl).
    pub(super) fn judges(&self, route: &Route) -> bool {
        self.inner.mock_clock
            || !route.stale_if_error.is_zero()
            || !route.stale_while_revalidate.is_zero()
    }

    /// [`past_ttl`](Self::past_ttl) of the envelope `bytes` (`false` when it has no stamp of this version).
    pub(super) fn bytes_past_ttl(&self, route: &Route, bytes: &[u8]) -> bool {
        codec::stamp(bytes).is_some_and(|s| self.past_ttl(route, &s).is_some())
    }
}

/// The wall clock in milliseconds since the Unix epoch (0 before it).
pub(super) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
