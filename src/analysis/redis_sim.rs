//! Redis's own eviction, simulated in miniature on the spatially hashed sample.
//!
//! Source: C. A. Waldspurger, T. Saemundsson, I. Ahmad and N. Park, "Cache Modeling and Optimization using
//! Miniature Simulations", USENIX ATC 2017 (MiniSim): a cache of `C` bytes fed the references of the keys a
//! spatial hash samples at rate `R` behaves like the whole cache scaled down to `C × R` bytes, for any eviction
//! policy. Each [`Sim`] is one such miniature, at one size of a fixed grid, running Redis 7.0's eviction as
//! `evict.c` does it:
//!
//! - **`allkeys-lru`**: before a victim is chosen, `maxmemory-samples` resident keys drawn at random are offered
//!   to a 16-entry eviction pool (`EVPOOL_SIZE`) sorted by idle time, scored when sampled and never rescored; the
//!   victim is the pool's best entry still resident. Idle time is kept at Redis's resolution of one second
//!   (`LRU_CLOCK_RESOLUTION`), so keys touched in the same second tie, and ties go first-in, first-out as in the
//!   pool's insertion rule.
//! - **`allkeys-lfu`**: the same pool, scored `255 − counter`, with Redis's 8-bit logarithmic counter: a new key
//!   starts at 5 (`LFU_INIT_VAL`), each access increments it with probability `1 / ((counter − 5) × lfu-log-factor
//!   + 1)`, and it decays by one per `lfu-decay-time` minutes since the key's last access. An overwrite keeps it.
//!
//! Memory is counted with the entry-size model ([`redis_entry_bytes`](super::redis_entry_bytes)): a miniature of
//! capacity `C` evicts until its sampled keys' bytes are at most `C × R`. A large miniature samples at its own
//! lower rate `R_m`, fixed when it starts (the sampled keys whose hash is below `R_m × 2^64`, nested in the
//! sample's), and then holds `C × min(R, R_m)`: about as many keys as a small one. When the sample's rate falls
//! (fixed-size SHARDS), the keys it drops leave the miniatures and the capacities shrink with `R`, as in MiniSim's
//! fixed-size variant (§3.2 of the paper).
//!
//! What each miniature reports is the *difference* between its hit ratio and the exact LRU hit ratio of the same
//! gets at the same size ([`SimPoint`]); the registry adds it to the SHARDS curve. The two come from the same
//! sampled keys, so most of the sample's error cancels in the difference.
//!
//! Gets are also counted in eight groups by the key hash's low bits, which are independent of the sampling
//! threshold: the spread of the groups' hit ratios gives each point's uncertainty (a jackknife over spatial
//! subsamples).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use serde::{Deserialize, Serialize};

use super::shards::IdHasher;

/// Redis's eviction policies the estimator simulates (`maxmemory-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionPolicy {
    /// `allkeys-lru` (and `volatile-lru` when every key has a TTL, as cache-aside entries do): sampled LRU.
    AllkeysLru,
    /// `allkeys-lfu` (and `volatile-lfu` likewise): sampled LFU with a logarithmic, decaying counter.
    AllkeysLfu,
}

impl EvictionPolicy {
    /// The name Redis gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionPolicy::AllkeysLru => "allkeys-lru",
            EvictionPolicy::AllkeysLfu => "allkeys-lfu",
        }
    }

    /// The policy a `maxmemory-policy` value evicts like: `allkeys-lru` and `volatile-lru` (every entry the
    /// registry writes has a TTL) as sampled LRU, the two `-lfu` ones as sampled LFU; `None` for the others
    /// (`noeviction`, `allkeys-random`, `volatile-random`, `volatile-ttl`), which are not simulated.
    pub fn from_redis(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "allkeys-lru" | "volatile-lru" => Some(EvictionPolicy::AllkeysLru),
            "allkeys-lfu" | "volatile-lfu" => Some(EvictionPolicy::AllkeysLfu),
            _ => None,
        }
    }
}

impl std::fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a Redis evicts: the policy and the settings that shape it (Redis's defaults: 5 samples, log factor 10,
/// decay time 1 minute).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisEviction {
    /// `maxmemory-policy`.
    pub policy: EvictionPolicy,
    /// `maxmemory-samples`: keys sampled per eviction (1–64 here).
    pub samples: u32,
    /// `lfu-log-factor` (LFU only).
    pub lfu_log_factor: u32,
    /// `lfu-decay-time`, minutes (LFU only; 0: no decay).
    pub lfu_decay_minutes: u32,
}

impl std::fmt::Display for RedisEviction {
    /// `allkeys-lru (5 samples)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} samples)", self.policy, self.samples)
    }
}

impl Default for RedisEviction {
    fn default() -> Self {
        RedisEviction {
            policy: EvictionPolicy::AllkeysLru,
            samples: 5,
            lfu_log_factor: 10,
            lfu_decay_minutes: 1,
        }
    }
}

/// `EVPOOL_SIZE` in `evict.c`.
const POOL: usize = 16;
/// `LFU_INIT_VAL` in `server.h`.
const LFU_INIT: u8 = 5;
/// Hash groups for the uncertainty.
pub(crate) const GROUPS: usize = 8;
/// The smallest size of the grid: 64 KiB; the grid doubles from there.
pub(crate) const GRID_MIN_BYTES: f64 = 65_536.0;
/// Grid sizes: 64 KiB to 64 TiB.
const GRID: usize = 31;
/// A miniature smaller than this many sampled keys is too coarse to stand for Redis (its 16-entry pool would be a
/// large part of it): it is not run.
pub(crate) const MIN_MINI_KEYS: f64 = 256.0;
/// A miniature is started when the sampled keys fill half of it, so that its LFU counters have history by
/// the time it evicts; above four times the keys' bytes it is not needed (nothing is evicted).
const START_SHARE: f64 = 0.5;
/// A running miniature is stopped when it is this many times the sampled keys' bytes.
const STOP_SHARE: f64 = 8.0;
/// A miniature that would hold more than this share of the sample's most keys (and at least [`MIN_CAP_KEYS`])
/// samples at its own, lower rate, fixed when it starts, so that it holds about that many: the sampled keys whose
/// hash is below its own threshold (nested in the sample's; MiniSim's miniatures of one fixed rate each). The large
/// ones cost no more instructions than the small, and a sampled access reaches about three miniatures rather than
/// six.
const CAP_SHARE: f64 = 0.0625;
/// The least a miniature's cap is, in sampled keys.
const MIN_CAP_KEYS: f64 = 512.0;

/// What one miniature measured: its size, and its hit ratio against exact LRU's over the same gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SimPoint {
    /// Cache size, bytes (whole-cache scale).
    pub(crate) capacity_bytes: f64,
    /// Its hit ratio minus exact LRU's on the same gets.
    pub(crate) delta: f64,
    /// One standard error of its hit ratio, from the hash groups.
    pub(crate) std_error: f64,
    /// One standard error of exact LRU's hit ratio at the same size, from the hash groups (over every sampled get,
    /// also those of keys a subsampling miniature leaves out).
    pub(crate) lru_std_error: f64,
    /// Its own sampling rate `R_m` (0–1]; its sample's rate is `min(R, R_m)`, whose finite-population correction
    /// `std_error` takes where the sample's `R` is known.
    pub(crate) rate: f64,
}

/// A resident key's state in one miniature.
#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    weight: u32,
    /// When its copy was written, seconds (TTL).
    written: u32,
    /// Last access, seconds (LRU idle time, LFU decay).
    last: u32,
    /// LFU counter.
    counter: u8,
}

/// One miniature cache.
struct Sim {
    /// Whole-cache bytes.
    capacity: f64,
    /// Its own sampling rate (0–1]: it takes the sampled keys whose hash is below `cut` (`rate × 2^64`); while the
    /// sample's rate is lower, every sampled key.
    rate: f64,
    cut: u64,
    /// Resident keys: hash → index in `order`.
    slots: HashMap<u64, u32, BuildHasherDefault<IdHasher>>,
    /// Resident keys and their state, in no order: a random index is a random sample.
    order: Vec<Slot>,
    /// Bytes of the resident keys (whole-key sizes, sample scale).
    bytes: u64,
    /// The eviction pool: (score, hash), ascending, at most [`POOL`].
    pool: Vec<(u64, u64)>,
    /// The time of the latest access, seconds: Redis's clock when it samples.
    clock: u32,
    gets: [f64; GROUPS],
    hits: [f64; GROUPS],
    lru_hits: [f64; GROUPS],
    /// Every sampled get since it started, and those exact LRU of its size hits, per group (its own sample or not).
    all_gets: [f64; GROUPS],
    all_lru_hits: [f64; GROUPS],
    /// Sampled gets counted so far (unweighted).
    sampled: u64,
    /// Sampled accesses still to pass before gets count: one turnover of what it held when it started, so that
    /// LFU counters and the pool have history.
    warming: u64,
}

/// Sampled gets a miniature needs before its point is used.
const MIN_POINT_GETS: u64 = 256;

/// One access as the miniatures see it.
#[derive(Clone, Copy)]
pub(crate) struct SimAccess {
    pub(crate) hash: u64,
    /// A get (counted), or a set.
    pub(crate) get: bool,
    /// Whether a miss stores the value.
    pub(crate) stores: bool,
    pub(crate) now: u32,
    pub(crate) weight: u32,
    pub(crate) ttl: Option<u32>,
    /// `1 / R` now.
    pub(crate) w: f64,
    /// The exact LRU reuse distance in bytes, when the get would hit some LRU cache (a hit at `c` iff `< c`).
    pub(crate) lru_distance: Option<f64>,
}

/// The miniatures of one estimator.
pub(crate) struct Sims {
    eviction: RedisEviction,
    /// Indexed by grid position; `None` when not running.
    sims: Vec<Option<Sim>>,
    rng: fastrand::Rng,
    /// Per hash group: gets, and gets that are reuses at unbounded size.
    group_gets: [f64; GROUPS],
    group_reuses: [f64; GROUPS],
    /// Sampled accesses since the grid was last checked.
    since_check: u32,
    /// Whether miniatures run at all (`cache.analysis.simulate_eviction`).
    on: bool,
    /// The most sampled keys (of the mean size) a miniature holds before it subsamples.
    cap_keys: f64,
}

fn grid_bytes(i: usize) -> f64 {
    GRID_MIN_BYTES * 2f64.powi(i as i32)
}

impl Sims {
    /// Miniatures for a sample of at most `max_keys` keys.
    pub(crate) fn new(eviction: RedisEviction, max_keys: usize) -> Self {
        Sims {
            eviction,
            sims: (0..GRID).map(|_| None).collect(),
            rng: fastrand::Rng::with_seed(0x05ee_d0f4_ed15),
            group_gets: [0.0; GROUPS],
            group_reuses: [0.0; GROUPS],
            since_check: 0,
            on: true,
            cap_keys: (max_keys as f64 * CAP_SHARE).max(MIN_CAP_KEYS),
        }
    }

    /// The same, running no miniature: predictions stay exact LRU's, the uncertainty is still measured.
    pub(crate) fn without_miniatures(eviction: RedisEviction) -> Self {
        Sims {
            on: false,
            ..Sims::new(eviction, 0)
        }
    }

    pub(crate) fn runs_miniatures(&self) -> bool {
        self.on
    }

    pub(crate) fn eviction(&self) -> RedisEviction {
        self.eviction
    }

    /// Feeds one sampled access to every running miniature.
    pub(crate) fn access(&mut self, a: SimAccess) {
        let g = (a.hash as usize) & (GROUPS - 1);
        if a.get {
            self.group_gets[g] += a.w;
            if a.lru_distance.is_some() {
                self.group_reuses[g] += a.w;
            }
        }
        let eviction = self.eviction;
        for sim in self.sims.iter_mut().flatten() {
            if a.get && sim.warming == 0 {
                sim.all_gets[g] += a.w;
                if a.lru_distance.is_some_and(|d| d < sim.capacity) {
                    sim.all_lru_hits[g] += a.w;
                }
            }
            if a.hash < sim.cut {
                // One of its keys stands for `1 / min(R, its rate)`.
                let own = SimAccess {
                    w: a.w.max(1.0 / sim.rate),
                    ..a
                };
                sim.access(own, g, &eviction, &mut self.rng);
            }
        }
    }

    /// Takes a key out of every miniature (deleted, or dropped from the sample).
    pub(crate) fn remove(&mut self, h: u64) {
        for sim in self.sims.iter_mut().flatten() {
            if h < sim.cut {
                sim.remove(h);
            }
        }
    }

    /// Whether the grid should be checked now (every 256 sampled accesses).
    pub(crate) fn due(&mut self) -> bool {
        self.since_check += 1;
        if self.since_check >= 256 {
            self.since_check = 0;
            true
        } else {
            false
        }
    }

    /// Starts the miniatures the sample has grown into and stops those too small for it: a miniature runs while
    /// it would hold at least [`MIN_MINI_KEYS`] sampled keys of the mean size and the sampled keys fill at least a
    /// half of it. A new one starts holding every live key of its own sample (`live`: hash, bytes, written, last
    /// access), as a cache that has not evicted yet would. `rate`: the sampling rate; `live_bytes` and
    /// `mean_weight` of the sample.
    pub(crate) fn regrid(
        &mut self,
        rate: f64,
        live_bytes: u64,
        mean_weight: f64,
        live: &mut dyn Iterator<Item = (u64, u32, u32, u32)>,
    ) {
        if !self.on {
            return;
        }
        let mut wanted = Vec::new();
        for i in 0..GRID {
            let mini = grid_bytes(i) * rate;
            let run = mean_weight > 0.0
                && mini >= MIN_MINI_KEYS * mean_weight
                && live_bytes as f64 >= START_SHARE * mini;
            // A running one is kept while it has history to give, unless too small for the sample now (at its own
            // rate too: the keys grew larger since it started), or so large that it holds every key eight times
            // over (the sample shrank: invalidations, a falling rate).
            let own = self.sims[i].as_ref().map_or(rate, |s| s.rate.min(rate));
            let stop = grid_bytes(i) * own < MIN_MINI_KEYS * mean_weight
                || mini > STOP_SHARE * live_bytes as f64;
            match (&self.sims[i], run) {
                (Some(_), false) if stop => self.sims[i] = None,
                (None, true) => wanted.push(i),
                _ => {}
            }
        }
        if wanted.is_empty() {
            return;
        }
        let keys: Vec<(u64, u32, u32, u32)> = live.collect();
        for i in wanted {
            // Above the cap, its own rate, for about `cap_keys` keys.
            let own = (self.cap_keys * mean_weight / grid_bytes(i)).min(1.0);
            let cut = if own >= 1.0 {
                u64::MAX
            } else {
                (own * 2f64.powi(64)) as u64
            };
            let holds = keys.iter().filter(|k| k.0 < cut).count();
            let mut sim = Sim {
                capacity: grid_bytes(i),
                rate: own,
                cut,
                slots: HashMap::with_capacity_and_hasher(holds, Default::default()),
                order: Vec::with_capacity(holds),
                bytes: 0,
                pool: Vec::with_capacity(POOL),
                clock: keys.iter().map(|k| k.3).max().unwrap_or(0),
                gets: [0.0; GROUPS],
                hits: [0.0; GROUPS],
                lru_hits: [0.0; GROUPS],
                all_gets: [0.0; GROUPS],
                all_lru_hits: [0.0; GROUPS],
                sampled: 0,
                warming: 0,
            };
            for &(h, weight, written, last) in &keys {
                if h < cut {
                    sim.insert(h, weight, written, last);
                }
            }
            sim.warming = sim.order.len() as u64;
            sim.evict(rate.min(own), &self.eviction, &mut self.rng);
            self.sims[i] = Some(sim);
        }
    }

    /// What each running miniature measured, smallest first; those without a get yet are left out.
    pub(crate) fn points(&self) -> Vec<SimPoint> {
        self.sims
            .iter()
            .flatten()
            .filter_map(|s| s.point())
            .collect()
    }

    /// One standard error of the hit ratio at unbounded size (every reuse a hit), from the hash groups.
    pub(crate) fn max_std_error(&self) -> f64 {
        std_error(&self.group_reuses, &self.group_gets)
    }

    /// The finite-population correction of a standard error at sampling rate `rate`: `√(1 − R)`. A sample of
    /// every key has no sampling error, whatever the spread of its groups.
    pub(crate) fn finite_population(rate: f64) -> f64 {
        (1.0 - rate).clamp(0.0, 1.0).sqrt()
    }

    /// The most miniatures that run at once for a sample of `max_keys`: their sizes double from
    /// [`MIN_MINI_KEYS`] keys of the mean size to [`STOP_SHARE`] times the sample's bytes.
    pub(crate) fn max_running(max_keys: usize) -> usize {
        let span = STOP_SHARE * max_keys as f64 / MIN_MINI_KEYS;
        (span.max(1.0).log2().floor() as usize + 1).min(GRID)
    }

    /// The most heap bytes one miniature holds for a sample of `max_keys`: every sampled key resident, in a key
    /// table grown to room for `2 × max_keys` (removals leave tombstones; hashbrown's sizing: buckets the next power
    /// of two of 8/7 of that, 16 bytes and a control byte each) and a resident array grown by doubling, and the pool.
    pub(crate) fn sim_bytes_bound(max_keys: usize) -> usize {
        let buckets = (2 * max_keys * 8).div_ceil(7).next_power_of_two();
        let table = buckets * (std::mem::size_of::<(u64, u32)>() + 1) + 16;
        let order = 2 * max_keys.next_power_of_two() * std::mem::size_of::<Slot>();
        table + order + POOL * 16
    }

    /// The running miniature of whole-cache size `capacity` bytes: its own rate and the keys it holds.
    #[cfg(test)]
    pub(crate) fn miniature(&self, capacity: f64) -> Option<(f64, usize)> {
        self.sims
            .iter()
            .flatten()
            .find(|m| m.capacity == capacity)
            .map(|m| (m.rate, m.order.len()))
    }

    /// Heap bytes held now.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.sims
            .iter()
            .flatten()
            .map(|s| {
                s.slots.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
                    + s.order.capacity() * std::mem::size_of::<Slot>()
                    + s.pool.capacity() * 16
            })
            .sum()
    }
}

/// The standard error of a ratio estimated from `G` groups: the groups' ratios' standard deviation over `√G`
/// (groups without gets left out; 0 with fewer than two).
fn std_error(num: &[f64; GROUPS], den: &[f64; GROUPS]) -> f64 {
    let ratios: Vec<f64> = num
        .iter()
        .zip(den)
        .filter(|(_, &d)| d > 0.0)
        .map(|(&n, &d)| n / d)
        .collect();
    let k = ratios.len();
    if k < 2 {
        return 0.0;
    }
    let mean = ratios.iter().sum::<f64>() / k as f64;
    let var = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
    (var / k as f64).sqrt()
}

impl Sim {
    fn point(&self) -> Option<SimPoint> {
        let gets: f64 = self.gets.iter().sum();
        if gets <= 0.0 || self.sampled < MIN_POINT_GETS {
            return None;
        }
        let hits: f64 = self.hits.iter().sum();
        let lru: f64 = self.lru_hits.iter().sum();
        Some(SimPoint {
            capacity_bytes: self.capacity,
            delta: (hits - lru) / gets,
            std_error: std_error(&self.hits, &self.gets),
            lru_std_error: std_error(&self.all_lru_hits, &self.all_gets),
            rate: self.rate,
        })
    }

    fn insert(&mut self, h: u64, weight: u32, written: u32, last: u32) {
        self.slots.insert(h, self.order.len() as u32);
        self.order.push(Slot {
            hash: h,
            weight,
            written,
            last,
            counter: LFU_INIT,
        });
        self.bytes += u64::from(weight);
    }

    fn remove(&mut self, h: u64) {
        if let Some(pos) = self.slots.remove(&h) {
            let pos = pos as usize;
            let slot = self.order.swap_remove(pos);
            if let Some(moved) = self.order.get(pos) {
                if let Some(m) = self.slots.get_mut(&moved.hash) {
                    *m = pos as u32;
                }
            }
            self.bytes -= u64::from(slot.weight);
        }
    }

    fn access(&mut self, a: SimAccess, g: usize, e: &RedisEviction, rng: &mut fastrand::Rng) {
        let rate = 1.0 / a.w;
        // While it warms up it evicts and updates, but counts nothing.
        let count = a.get && self.warming == 0;
        self.warming = self.warming.saturating_sub(1);
        if count {
            self.sampled += 1;
        }
        self.clock = self.clock.max(a.now);
        let lru_hit = a.lru_distance.is_some_and(|d| d < self.capacity);
        let live = self.slots.get(&a.hash).map(|&p| p as usize).filter(|&p| {
            a.ttl
                .is_none_or(|ttl| a.now.saturating_sub(self.order[p].written) < ttl)
        });
        match live {
            Some(p) => {
                if count {
                    self.gets[g] += a.w;
                    self.hits[g] += a.w;
                    if lru_hit {
                        self.lru_hits[g] += a.w;
                    }
                }
                let s = &mut self.order[p];
                if e.policy == EvictionPolicy::AllkeysLfu {
                    let c = lfu_decayed(s.counter, s.last, a.now, e.lfu_decay_minutes);
                    s.counter = lfu_incr(c, e.lfu_log_factor, rng);
                }
                s.last = a.now;
                if !a.get {
                    s.written = a.now;
                }
                if s.weight != a.weight {
                    let old = s.weight;
                    s.weight = a.weight;
                    self.bytes = self.bytes - u64::from(old) + u64::from(a.weight);
                    self.evict(rate, e, rng);
                }
            }
            None => {
                if count {
                    self.gets[g] += a.w;
                    if lru_hit {
                        self.lru_hits[g] += a.w;
                    }
                }
                // An expired copy is deleted on access (a new key then, with a new counter).
                self.remove(a.hash);
                if a.stores {
                    self.insert(a.hash, a.weight, a.now, a.now);
                    self.evict(rate, e, rng);
                }
            }
        }
    }

    /// Evicts as Redis's `performEvictions` does until the keys fit in `capacity × rate`. The key just written
    /// may go too: Redis writes it, then evicts for the overshoot before the next command, that key included.
    fn evict(&mut self, rate: f64, e: &RedisEviction, rng: &mut fastrand::Rng) {
        let limit = self.capacity * rate;
        while self.bytes as f64 > limit && !self.order.is_empty() {
            let Some(victim) = self.pick(e, rng) else {
                break;
            };
            self.remove(victim);
        }
    }

    /// `performEvictions`' choice of one victim: offer a fresh sample to the pool, then take its best entry
    /// still resident (ghosts dropped), sampling again while the pool drains.
    fn pick(&mut self, e: &RedisEviction, rng: &mut fastrand::Rng) -> Option<u64> {
        for _ in 0..64 {
            self.populate(e, rng);
            while let Some((_, h)) = self.pool.pop() {
                if self.slots.contains_key(&h) {
                    return Some(h);
                }
            }
        }
        None
    }

    /// `evictionPoolPopulate`: `samples` keys drawn at random, each inserted by score (higher: evicted sooner),
    /// left of the first entry scoring at least as much; a full pool drops its lowest entry, or the new key when
    /// it scores no more than that entry.
    fn populate(&mut self, e: &RedisEviction, rng: &mut fastrand::Rng) {
        let n = self.order.len();
        if n == 0 {
            return;
        }
        for _ in 0..e.samples.min(n as u32) {
            let s = self.order[rng.usize(..n)];
            let h = s.hash;
            let score = match e.policy {
                // Idle seconds (Redis's milliseconds are whole seconds too).
                EvictionPolicy::AllkeysLru => u64::from(self.clock.saturating_sub(s.last)),
                EvictionPolicy::AllkeysLfu => {
                    255 - u64::from(lfu_decayed(
                        s.counter,
                        s.last,
                        self.clock,
                        e.lfu_decay_minutes,
                    ))
                }
            };
            let k = self
                .pool
                .iter()
                .position(|&(sc, _)| sc >= score)
                .unwrap_or(self.pool.len());
            if self.pool.len() == POOL {
                if k == 0 {
                    continue;
                }
                self.pool.remove(0);
                self.pool.insert(k - 1, (score, h));
            } else {
                self.pool.insert(k, (score, h));
            }
        }
    }
}

/// `LFUDecrAndReturn`: the counter less one per `decay` minutes since the last access (`last`, `now` in seconds;
/// minutes on wall-clock minute boundaries).
fn lfu_decayed(counter: u8, last: u32, now: u32, decay: u32) -> u8 {
    if decay == 0 {
        return counter;
    }
    let periods = (now / 60).saturating_sub(last / 60) / decay;
    counter.saturating_sub(periods.min(255) as u8)
}

/// `LFULogIncr`.
fn lfu_incr(counter: u8, log_factor: u32, rng: &mut fastrand::Rng) -> u8 {
    if counter == 255 {
        return 255;
    }
    let base = f64::from(counter.saturating_sub(LFU_INIT));
    let p = 1.0 / (base * f64::from(log_factor) + 1.0);
    if rng.f64() < p {
        counter + 1
    } else {
        counter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Access, Shards};

    fn spread(i: u64) -> u64 {
        // Any fixed bijection that spreads the low bits (the hash groups) does.
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
    }

    #[test]
    fn lfu_counter_follows_redis() {
        let mut rng = fastrand::Rng::with_seed(1);
        // At or below LFU_INIT_VAL every access counts.
        assert_eq!(lfu_incr(3, 10, &mut rng), 4);
        assert_eq!(lfu_incr(5, 10, &mut rng), 6);
        assert_eq!(lfu_incr(255, 10, &mut rng), 255);
        // From 6, with probability 1/11: about 1,000 of 11,000.
        let n = (0..11_000)
            .filter(|_| lfu_incr(6, 10, &mut rng) == 7)
            .count();
        assert!((800..1200).contains(&n), "{n}");
        // One per minute boundary crossed since the last access, not below 0.
        assert_eq!(lfu_decayed(10, 0, 59, 1), 10);
        assert_eq!(lfu_decayed(10, 59, 60, 1), 9);
        assert_eq!(lfu_decayed(10, 0, 600, 2), 5);
        assert_eq!(lfu_decayed(3, 0, 6000, 1), 0);
        assert_eq!(lfu_decayed(3, 0, 6000, 0), 3);
    }

    #[test]
    fn sampled_lru_with_one_second_ties_beats_exact_lru_on_a_loop() {
        // A loop over 600 keys of 1,000 bytes, all in the same second: exact LRU of 512 KiB (524 keys) never hits;
        // Redis, whose keys all tie, evicts among them at random and keeps most of the loop.
        let s = Shards::with_max_rate(10_000, 1.0);
        let n = 600u64;
        let rounds = 40u64;
        for i in 0..n * rounds {
            s.access(spread(i % n), Access::Get, 0, Some(1000), None, 0);
        }
        let (c, _) = s.curve(n * rounds);
        let lru = RedisEviction::default();
        let cap = 512.0 * 1024.0;
        assert_eq!(c.hit_ratio_at_bytes(cap), 0.0);
        let redis = c.hit_ratio_at_bytes_for(Some(lru), cap);
        assert!(redis > 0.5, "{redis}");
        // Every key sampled: no sampling error.
        assert_eq!(c.uncertainty_at_bytes(Some(lru), cap), 0.0);
        // Another policy than the one simulated: exact LRU.
        let lfu = RedisEviction {
            policy: EvictionPolicy::AllkeysLfu,
            ..lru
        };
        assert_eq!(c.hit_ratio_at_bytes_for(Some(lfu), cap), 0.0);
    }

    #[test]
    fn a_miniature_above_its_cap_subsamples_and_predicts_the_same() {
        // A loop over 6,000 keys of 1,000 bytes, all in the same second: exact LRU of 4 MiB (4,194 keys) never hits,
        // Redis's eviction (random among ties) keeps much of the loop. A sample of 4,096 keys caps its miniatures at
        // 512 keys, so the one for 4 MiB (about 2,900 keys at the sample's rate) samples at its own lower rate; a
        // sample of 200,000 keys (every key) runs it whole. Both find the same difference from exact LRU.
        let at = 4.0 * 1024.0 * 1024.0;
        let run = |max_keys: usize| {
            let s = Shards::with_max_rate(max_keys, 1.0);
            for i in 0..240_000u64 {
                s.access(spread(i % 6_000), Access::Get, 0, Some(1000), None, 0);
            }
            let (c, _) = s.curve(240_000);
            let (rate, keys) = s.miniature(at).unwrap_or((0.0, 0));
            // Redis's eviction against exact LRU at that size: what the miniature adds.
            let lru = RedisEviction::default();
            (
                c.hit_ratio_at_bytes_for(Some(lru), at) - c.hit_ratio_at_bytes(at),
                c.uncertainty_at_bytes(Some(lru), at),
                rate,
                keys,
            )
        };
        let (capped, uncertainty, rate, keys) = run(4096);
        let (whole, _, whole_rate, whole_keys) = run(200_000);
        assert!(rate < 0.2, "own rate {rate}");
        assert!((400..=600).contains(&keys), "{keys} keys");
        assert_eq!(whole_rate, 1.0);
        assert!(whole_keys > 4000, "{whole_keys} keys");
        // The difference is there, the subsample finds it, and says how sure it is.
        eprintln!("capped {capped} ± {uncertainty}, whole {whole}");
        assert!(whole > 0.2, "Redis against exact LRU, whole: {whole}");
        assert!(
            (capped - whole).abs() < 0.02_f64.max(uncertainty),
            "capped {capped} ± {uncertainty}, whole {whole}"
        );
        assert!(uncertainty > 0.0);
    }

    #[test]
    fn lfu_keeps_a_hot_set_through_a_scan() {
        // 200 hot keys read in turn, each followed by 2 keys of a scan that is never read again; a cache of 512 KiB
        // (524 keys of 1,000 bytes) evicting by LFU keeps the hot keys, sampled LRU loses some to the scan.
        let run = |policy: EvictionPolicy| {
            let s = Shards::with_max_rate(100_000, 1.0);
            let e = RedisEviction {
                policy,
                ..RedisEviction::default()
            };
            s.set_eviction(e);
            let mut scan = 1_000_000u64;
            for i in 0..60_000u64 {
                let now = (i / 200) * 1000; // 200 accesses a second, in milliseconds
                s.access(spread(i % 200), Access::Get, now, Some(1000), None, 0);
                for _ in 0..2 {
                    s.access(spread(scan), Access::Get, now, Some(1000), None, 0);
                    scan += 1;
                }
            }
            let (c, _) = s.curve(180_000);
            (
                c.hit_ratio_at_bytes_for(Some(e), 512.0 * 1024.0),
                c.hit_ratio_at_bytes(512.0 * 1024.0),
            )
        };
        let (lfu, exact) = run(EvictionPolicy::AllkeysLfu);
        let (lru, _) = run(EvictionPolicy::AllkeysLru);
        // The hot keys are a third of the gets: LFU hits nearly all of them.
        assert!(lfu > 0.32, "LFU {lfu}");
        assert!(
            lfu > lru + 0.01,
            "LFU {lfu}, sampled LRU {lru}, exact LRU {exact}"
        );
    }
}
