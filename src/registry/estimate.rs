//! Feeding the phase-2 estimators: which calls are sampled, and what each feeds.

use super::*;

/// The estimators shared by all patterns, and the origin of their seconds.
pub(super) struct Analysis {
    pub(super) opts: AnalysisOptions,
    pub(super) shared: Shards,
    pub(super) epoch: u64,
    /// The eviction the estimators simulate: configured, read from Redis, or the default.
    pub(super) eviction: std::sync::Mutex<RedisEviction>,
    /// Nanoseconds past the Unix minute at `epoch` (0 on a mock clock): the estimators' seconds and minutes then
    /// turn with Redis's, whose LRU clock counts Unix seconds and whose LFU decay counts Unix minutes.
    pub(super) phase_nanos: u64,
    /// Memory for entries in the Redis the registry uses, bytes, as last read (`None`: not read yet, or no limit).
    pub(super) redis_entry_bytes: std::sync::Mutex<Option<Option<u64>>>,
}

/// An estimator of `max_keys` keys under `opts`, simulating `eviction` (unless the simulations are off).
pub(super) fn new_shards(
    opts: &AnalysisOptions,
    eviction: RedisEviction,
    max_keys: usize,
) -> Shards {
    let s = Shards::with_max_rate(max_keys, opts.max_sampling_rate);
    if !opts.simulate_eviction {
        s.stop_simulating();
    }
    s.set_eviction(eviction);
    s
}

impl Analysis {
    /// A new estimator of `max_keys` keys, simulating the current eviction.
    pub(super) fn shards(&self, max_keys: usize) -> Shards {
        new_shards(&self.opts, self.eviction(), max_keys)
    }

    pub(super) fn eviction(&self) -> RedisEviction {
        *self
            .eviction
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where a sampled call goes in the estimators.
pub(super) struct Track {
    pub(super) hash: u64,
    pub(super) ttl: Option<u32>,
    pub(super) key_bytes: u64,
    /// The whitelist's estimator, when the key's pattern is served.
    pub(super) whitelisted: Option<Arc<WhitelistShards>>,
}

/// A sampled get not yet fed to the estimators. It is fed when the call completes ([`PendingGet::finish`]), or, if
/// the caller's future is dropped first (a timeout, a client gone), on drop as a get whose value was not stored: the
/// gets offered count it either way, and a sampled get missing from the sample would be taken for a hit by
/// SHARDS_adj.
pub(super) struct PendingGet<'a> {
    pub(super) registry: &'a CacheRegistry,
    pub(super) entry: &'a PatternEntry,
    pub(super) track: Option<Track>,
    /// Raw clock reading when the get started.
    pub(super) at: u64,
}

impl<'a> PendingGet<'a> {
    /// A get starting at raw clock reading `at`; nothing to feed when `track` is `None` (not sampled).
    pub(super) fn new(
        registry: &'a CacheRegistry,
        entry: &'a PatternEntry,
        track: Option<Track>,
        at: u64,
    ) -> Self {
        PendingGet {
            registry,
            entry,
            track,
            at,
        }
    }

    /// Feeds the get. `value_bytes`: the encoded value's size, when known; `stored`: whether a cache would hold
    /// the value now (not when the loader failed or the value is over `max_value_bytes`:
    /// [`Access::GetNotStored`]).
    pub(super) fn finish(&mut self, value_bytes: Option<usize>, stored: bool) {
        if let Some(t) = self.track.take() {
            let access = if stored {
                Access::Get
            } else {
                Access::GetNotStored
            };
            self.registry
                .record(self.entry, &t, access, self.at, value_bytes);
        }
    }
}

impl Drop for PendingGet<'_> {
    fn drop(&mut self) {
        self.finish(None, false);
    }
}

impl CacheRegistry {
    /// The call's place in the estimators when its key is sampled by the pattern's or the shared one.
    /// `served`: whether the pattern is served now (its calls also feed the whitelist's estimator).
    #[inline]
    pub(super) fn track(
        &self,
        state: &Active,
        entry: &PatternEntry,
        pattern: &str,
        key: &str,
        served: bool,
    ) -> Option<Track> {
        let a = self.inner.analysis.as_ref()?;
        let hash = key_hash(key);
        let whitelisted = state.whitelisted.as_ref().filter(|_| served);
        if !(a.shared.samples(hash)
            || entry.shards.as_ref().is_some_and(|s| s.samples(hash))
            || whitelisted.is_some_and(|w| w.shards.samples(hash)))
        {
            return None;
        }
        Some(self.track_cold(state, pattern, key, hash, a, whitelisted))
    }

    #[cold]
    pub(super) fn track_cold(
        &self,
        state: &Active,
        pattern: &str,
        key: &str,
        hash: u64,
        a: &Analysis,
        whitelisted: Option<&Arc<WhitelistShards>>,
    ) -> Track {
        let ttl = (!a.opts.ignore_ttl)
            .then(|| state.ttl(pattern).as_secs().min(u64::from(u32::MAX)) as u32);
        Track {
            hash,
            ttl,
            key_bytes: (key.len() + state.redis.key_prefix.len()) as u64,
            whitelisted: whitelisted.cloned(),
        }
    }

    /// Feeds a sampled access, made at raw clock reading `at`, to the pattern's and the shared estimators.
    /// `value_bytes`: the encoded value's size, when known.
    pub(super) fn record(
        &self,
        entry: &PatternEntry,
        t: &Track,
        access: Access,
        at: u64,
        value_bytes: Option<usize>,
    ) {
        let Some(a) = &self.inner.analysis else {
            return;
        };
        let now_ms = (self.inner.clock.delta_as_nanos(a.epoch, at) + a.phase_nanos) / 1_000_000;
        let weight = value_bytes.map(|v| {
            analysis::redis_entry_bytes(t.key_bytes, v as u64, a.opts.per_key_overhead_bytes)
                .min(u64::from(u32::MAX)) as u32
        });
        if let Some(s) = &entry.shards {
            s.access(t.hash, access, now_ms, weight, t.ttl, entry.slot);
        }
        a.shared
            .access(t.hash, access, now_ms, weight, t.ttl, entry.slot);
        if let Some(w) = &t.whitelisted {
            w.shards
                .access(t.hash, access, now_ms, weight, t.ttl, entry.slot);
        }
    }

    /// Takes a sampled key out of the estimators' caches (a write of it was refused, and its old copy deleted).
    pub(super) fn forget(&self, entry: &PatternEntry, t: &Track) {
        let Some(a) = &self.inner.analysis else {
            return;
        };
        if let Some(s) = &entry.shards {
            s.delete(t.hash, entry.slot);
        }
        a.shared.delete(t.hash, entry.slot);
        if let Some(w) = &t.whitelisted {
            w.shards.delete(t.hash, entry.slot);
        }
    }
}
