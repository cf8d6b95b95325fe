//! The observe path: a counted miss, the loader timed, a would-be set counted, a sampled value size.

use super::*;

impl CacheRegistry {
    pub(super) async fn observe<C, E, F, Fut, A>(
        &self,
        entry: &PatternEntry,
        track: Option<Track>,
        absent_if: Option<A>,
        loader: F,
    ) -> Result<C, E>
    where
        C: Codec,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        A: Fn(&C) -> bool + Copy,
    {
        let m = &entry.metrics;
        m.miss(CacheImpl::Null);
        let clock = &self.inner.clock;
        let start = clock.raw();
        let mut pending = PendingGet::new(self, entry, track, start);
        let r = loader().await;
        let nanos = nanos_since(clock, start);
        m.observed_load(nanos, r.is_ok());
        analysis::record_call(entry.slot, nanos);
        let mut size = None;
        if let Ok(v) = &r {
            if absent_if.is_some_and(|f| f(v)) {
                m.absent();
            }
            let sized = m.sample_size(self.inner.size_sample_every);
            if sized || pending.track.is_some() {
                let bytes = codec::HEADER_BYTES + v.payload_len(codec::Format::default());
                if sized {
                    m.value_size.observe(bytes as f64);
                }
                size = Some(bytes);
            }
        }
        // A cache would not store a failed load, nor a value over `max_value_bytes`.
        let stored = r.is_ok() && size.is_none_or(|b| b <= self.inner.max_value_bytes);
        pending.finish(size, stored);
        r
    }
}
