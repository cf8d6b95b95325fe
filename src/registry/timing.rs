//! Deadlines and timing of cache operations.

use super::*;

/// Runs a cache operation with `budget` as its deadline (only for a backend that can hang: an in-process one answers
/// without waiting, and a timer per call would be pure cost).
pub(super) fn bounded<T, F: Future<Output = Result<T>>>(
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

impl CacheRegistry {
    /// Runs one backend operation off the read path (writes, invalidations, lease releases, background fills),
    /// observing its duration in
    /// `cache_operation_duration_seconds{operation}` and counting its failure in `cache_errors_total`, so that
    /// every counted error has its operation counted too (the error ratio's two sides count the same calls).
    pub(super) async fn timed<T>(
        &self,
        imp: CacheImpl,
        operation: Operation,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let clock = &self.inner.clock;
        let t0 = clock.raw();
        let r = f.await;
        let metrics = &self.inner.metrics;
        metrics
            .op_duration(imp, operation)
            .observe_nanos(nanos_since(clock, t0));
        if let Err(e) = &r {
            metrics.error(imp, e.error_type());
        }
        r
    }
}
