//! Fixed-size SHARDS: an online, TTL-aware estimate of the LRU miss ratio curve in bounded memory.
//!
//! Source: C. A. Waldspurger, N. Park, A. Garthwaite and I. Ahmad, "Efficient MRC Construction with SHARDS",
//! USENIX FAST 2015 (<https://www.usenix.org/conference/fast15/technical-sessions/presentation/waldspurger>).
//!
//! - **Spatial sampling.** A key is sampled when its 64-bit hash is below a threshold `T`; the rate is
//!   `R = T / 2^64`, and every reference of a sampled key is seen, so reuse distances between sampled keys are
//!   exact among them and scale to the whole stream by `1 / R` (§3).
//! - **Fixed size** (§4.2). At most `max_keys` keys are sampled. When one more arrives, the sampled key with the
//!   largest hash is dropped and `T` becomes that hash, so the rate only falls. Every event is weighted `1 / R` at
//!   the time it happens, which is the paper's histogram rescaling done incrementally.
//! - **SHARDS_adj** (§4.3): the gets offered minus the gets the sample accounts for are added to the smallest
//!   distance ([`Curve`]), which removes most of the bias of an unlucky sample of hot keys.
//! - **Distances.** The LRU stack is a Fenwick tree over logical access times (one per sampled reference), compacted
//!   when it fills: a key's reuse distance is the number (and total size) of distinct sampled keys touched since
//!   its previous access, in `O(log max_keys)`.
//! - **TTL** ("TTLs Matter", Sultan et al., EuroSys 2024): an entry is written with the pattern's TTL on a miss
//!   and not refreshed by hits, so a get later than `TTL` after the write is a miss, as in Redis with `SET … EX`.
//!   The write time is that of the last miss at unbounded capacity; a smaller cache misses (and rewrites) more
//!   often, so at small sizes expiries are slightly over-counted and the prediction errs low.
//! - **Invalidations.** A delete takes the key out of the stack (it no longer occupies the cache); its next get is
//!   a miss.
//!
//! Memory is bounded by `max_keys`, whatever the number of distinct keys: see [`Shards::heap_bytes_bound`].

use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::curve::{Curve, LogHistogram, PolicyCurve};
use super::redis_sim::{RedisEviction, SimAccess, Sims};

/// The 64-bit hash that decides sampling: foldhash with a fixed seed, finished with MurmurHash3's `fmix64` so the
/// high bits compared with the threshold are uniform. The same key gives the same hash in every process.
pub fn key_hash(key: &str) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x5eed_cafe_f00d_beef).build_hasher();
    h.write(key.as_bytes());
    fmix64(h.finish())
}

/// MurmurHash3's 64-bit finalizer (Austin Appleby, public domain).
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Keys are hashes already: the map uses them as they are.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `Entry::last` of a key only ever deleted: it has no access to measure a reuse interval from.
const NEVER: u32 = u32::MAX;

/// One sampled key.
#[derive(Clone, Copy)]
struct Entry {
    /// Logical time of its last access; 0 when it is not in the cache (invalidated).
    ts: u32,
    /// Bytes it occupies (key, value and per-key overhead).
    weight: u32,
    /// When its current copy was written, seconds.
    written: u32,
    /// When it was last accessed, seconds.
    last: u32,
    /// The sample's access count at its last access, modulo 2^32 (reuse times in accesses, for the
    /// characteristic-time split of a memory budget).
    last_tick: u32,
    /// Which key pattern it belongs to (for pattern invalidations of a shared estimator).
    tag: u32,
}

/// A Fenwick (binary indexed) tree of (objects, bytes) over logical access times `1..=n`.
#[derive(Default)]
struct Fenwick {
    count: Vec<u32>,
    bytes: Vec<u64>,
}

impl Fenwick {
    fn len(&self) -> usize {
        self.count.len().saturating_sub(1)
    }

    fn add(&mut self, mut i: usize, count: i64, bytes: i64) {
        while i < self.count.len() {
            self.count[i] = (i64::from(self.count[i]) + count) as u32;
            self.bytes[i] = (self.bytes[i] as i64 + bytes) as u64;
            i += i & i.wrapping_neg();
        }
    }

    /// (objects, bytes) at times `1..=i`.
    fn prefix(&self, mut i: usize) -> (u64, u64) {
        let (mut c, mut b) = (0u64, 0u64);
        while i > 0 {
            c += u64::from(self.count[i]);
            b += self.bytes[i];
            i &= i - 1;
        }
        (c, b)
    }

    /// A tree of `n` positions holding `items` (time, weight), built in `O(n)`.
    fn build(n: usize, items: impl Iterator<Item = (usize, u32)>) -> Self {
        let mut f = Fenwick {
            count: vec![0; n + 1],
            bytes: vec![0; n + 1],
        };
        for (t, w) in items {
            f.count[t] += 1;
            f.bytes[t] += u64::from(w);
        }
        for i in 1..=n {
            let j = i + (i & i.wrapping_neg());
            if j <= n {
                f.count[j] += f.count[i];
                f.bytes[j] += f.bytes[i];
            }
        }
        f
    }
}

struct State {
    threshold: u64,
    /// `1 / R`: what one sampled event stands for.
    weight: f64,
    entries: HashMap<u64, Entry, BuildHasherDefault<IdHasher>>,
    /// Hashes of `entries`, largest on top: the next to drop when the sample is full.
    heap: BinaryHeap<u64>,
    tree: Fenwick,
    next_ts: usize,
    live_count: u64,
    live_bytes: u64,
    objects: LogHistogram,
    bytes: LogHistogram,
    /// Seconds between a key's accesses, log2 buckets.
    reuse_secs: [f64; 34],
    /// Accesses of the estimator's keys (gets and sets, sampled ones weighted `1 / R`) between a get and the key's
    /// previous access, for the gets that hit at some size.
    reuse_accesses: LogHistogram,
    /// Sampled accesses so far (wrapping).
    tick: u32,
    cold: f64,
    expired: f64,
    invalidated: f64,
    sampled_gets: u64,
    /// Redis's eviction in miniature, at a grid of sizes (MiniSim).
    sims: Sims,
}

/// What a reference does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read: counted in the curve.
    Get,
    /// A read whose value a cache would not keep (the load failed, or the value is over the size limit): counted
    /// in the curve like [`Access::Get`], but when it missed at every size the key is not in the cache afterwards,
    /// so its next get misses too.
    GetNotStored,
    /// A write: the key is (re)written and becomes most recent; not counted in the curve.
    Set,
}

/// The fixed-size SHARDS estimator of one key pattern (or of several patterns sharing one cache).
///
/// The check [`samples`](Shards::samples) is one relaxed atomic load; only sampled references take the mutex, and
/// the fraction sampled falls as `max_keys / distinct keys` once more than `max_keys` distinct keys were seen.
pub struct Shards {
    /// Read by every call, written only when the rate falls: kept off the mutex's cache line, which sampled calls
    /// write, so that unsampled calls on other threads do not miss on it.
    threshold: Padded<AtomicU64>,
    max_keys: usize,
    /// Highest threshold once warmed up (`max_rate × 2^64`).
    rate_cap: u64,
    state: Padded<Mutex<State>>,
}

/// A value alone on its (pair of) cache line(s).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("max_keys", &self.max_keys)
            .field("rate", &self.rate())
            .finish()
    }
}

/// Seconds-bucket of a reuse interval: 0 for < 1 s, then `1 + floor(log2 secs)` (bucket `i` holds
/// `[2^(i-1), 2^i)` seconds).
fn reuse_bucket(secs: u32) -> usize {
    if secs == 0 {
        0
    } else {
        (32 - secs.leading_zeros()) as usize
    }
}

/// Summary of the sample, besides the curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleStats {
    /// Current sampling rate `R` (0–1].
    pub rate: f64,
    /// Keys in the sample now (at most `max_keys`).
    pub sampled_keys: u64,
    /// Sampled gets since the start.
    pub sampled_gets: u64,
    /// Estimated distinct keys seen (first references, weighted `1 / R`).
    pub distinct_keys: f64,
    /// Mean bytes per key in the sample (key, value and per-key overhead); 0 when empty.
    pub mean_key_bytes: f64,
    /// Estimated gets that were cold misses (first get of a key).
    pub cold_misses: f64,
    /// Estimated gets later than the TTL after the key's write.
    pub expired_misses: f64,
    /// Estimated gets of a key invalidated since its last access.
    pub invalidated_misses: f64,
    /// Estimated reuse intervals: `[i]` counts reuses of `[2^(i-1), 2^i)` seconds (`[0]`: under one second).
    pub reuse_secs: [f64; 34],
}

/// Sampled gets after which an estimator's rate is capped by its `max_rate`.
pub const WARMUP_GETS: u64 = 65_536;

impl Shards {
    /// An estimator sampling at most `max_keys` keys (at least 64), at any rate.
    pub fn new(max_keys: usize) -> Self {
        Self::with_max_rate(max_keys, 1.0)
    }

    /// An estimator sampling at most `max_keys` keys (at least 64) which, after [`WARMUP_GETS`] sampled gets,
    /// also samples at most `max_rate` (0–1] of the keys: exact for small or young key spaces, and a bounded share
    /// of the calls of a hot small key space takes the lock. Lowering the rate is the same step as the fixed-size
    /// rule's, so the estimate stays consistent.
    pub fn with_max_rate(max_keys: usize, max_rate: f64) -> Self {
        let max_keys = max_keys.max(64);
        let rate_cap = if max_rate >= 1.0 {
            u64::MAX
        } else {
            (max_rate.max(1e-9) * 2f64.powi(64)) as u64
        };
        Shards {
            threshold: Padded(AtomicU64::new(u64::MAX)),
            max_keys,
            rate_cap,
            state: Padded(Mutex::new(State {
                threshold: u64::MAX,
                weight: 1.0,
                entries: HashMap::default(),
                heap: BinaryHeap::new(),
                tree: Fenwick::build(64, std::iter::empty()),
                next_ts: 1,
                live_count: 0,
                live_bytes: 0,
                objects: LogHistogram::default(),
                bytes: LogHistogram::default(),
                reuse_secs: [0.0; 34],
                reuse_accesses: LogHistogram::default(),
                tick: 0,
                cold: 0.0,
                expired: 0.0,
                invalidated: 0.0,
                sampled_gets: 0,
                sims: Sims::new(RedisEviction::default(), max_keys),
            })),
        }
    }

    /// Simulates `eviction` from now on (MiniSim, in [`Curve::hit_ratio_at_bytes_for`]); a change starts the
    /// miniatures afresh.
    pub fn set_eviction(&self, eviction: RedisEviction) {
        let mut s = self.lock();
        if s.sims.eviction() != eviction {
            s.sims = if s.sims.runs_miniatures() {
                Sims::new(eviction, self.max_keys)
            } else {
                Sims::without_miniatures(eviction)
            };
            s.regrid();
        }
    }

    /// Stops simulating Redis's eviction (and frees the miniatures): byte predictions are exact LRU's. The bound
    /// of [`Shards::heap_bytes_bound`] is then that of `heap_bytes_bound(max_keys, false)`.
    pub fn stop_simulating(&self) {
        let mut s = self.lock();
        let e = s.sims.eviction();
        s.sims = Sims::without_miniatures(e);
    }

    /// The eviction the miniatures simulate.
    pub fn eviction(&self) -> RedisEviction {
        self.lock().sims.eviction()
    }

    /// The most keys it samples.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Whether a key of hash `h` ([`key_hash`]) is in the sample: one relaxed load, no lock.
    #[inline]
    pub fn samples(&self, h: u64) -> bool {
        h < self.threshold.load(Ordering::Relaxed)
    }

    /// The current sampling rate (0–1].
    pub fn rate(&self) -> f64 {
        self.threshold.load(Ordering::Relaxed) as f64 / 2f64.powi(64)
    }

    /// The running miniature of whole-cache size `capacity` bytes: its own rate and the keys it holds.
    #[cfg(test)]
    pub(crate) fn miniature(&self, capacity: f64) -> Option<(f64, usize)> {
        self.lock().sims.miniature(capacity)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a get or set of the key of hash `h` at `now_ms` (milliseconds, any fixed origin). `weight` is the bytes the
    /// entry takes (`None`: unknown, the sample's mean is used), `ttl` the pattern's TTL in seconds (`None`: no
    /// expiry), `tag` the key's pattern. Does nothing when `h` is not sampled.
    pub fn access(
        &self,
        h: u64,
        access: Access,
        now_ms: u64,
        weight: Option<u32>,
        ttl: Option<u32>,
        tag: u32,
    ) {
        if !self.samples(h) {
            return;
        }
        let now = (now_ms / 1000).min(u64::from(u32::MAX)) as u32;
        let mut guard = self.lock();
        let s = &mut *guard;
        if h >= s.threshold {
            return; // the threshold fell while we waited
        }
        let get = access != Access::Set;
        if get && s.sampled_gets >= WARMUP_GETS && s.threshold > self.rate_cap {
            s.lower_to(self.rate_cap);
            self.threshold.store(s.threshold, Ordering::Relaxed);
            if h >= s.threshold {
                return;
            }
        }
        let w = s.weight;
        s.tick = s.tick.wrapping_add(1);
        let weight = weight.unwrap_or_else(|| s.mean_weight());
        if get {
            s.sampled_gets += 1;
        }
        // Count the access; then when the key's copy was written, and whether this get missed at every size.
        let mut lru_distance = None;
        let (written, missed_everywhere) = match s.entries.get(&h).copied() {
            Some(e) if e.ts != 0 => {
                let expired = ttl.is_some_and(|ttl| now.saturating_sub(e.written) >= ttl);
                if get {
                    s.reuse_secs[reuse_bucket(now.saturating_sub(e.last))] += w;
                    if expired {
                        s.expired += w;
                    } else {
                        let (c, b) = s.tree.prefix(e.ts as usize);
                        let after_count = s.live_count - c;
                        let after_bytes = s.live_bytes - b;
                        // A hit in every LRU cache of more than `after_count` objects, and of at least
                        // `after_bytes + own size` bytes: both recorded so that "hit at capacity c" is "value < c".
                        s.objects.add(after_count as f64 * w, w);
                        s.reuse_accesses
                            .add(f64::from(s.tick.wrapping_sub(e.last_tick)) * w, w);
                        let distance = after_bytes as f64 * w + f64::from(e.weight) - 1.0;
                        s.bytes.add(distance, w);
                        lru_distance = Some(distance);
                    }
                }
                s.unlink(e);
                if let Some(x) = s.entries.get_mut(&h) {
                    x.ts = 0; // out of the stack until re-pushed: a compaction in `push` must not count it
                }
                let written = if !get || expired { now } else { e.written };
                (written, get && expired)
            }
            Some(e) => {
                // Not in the cache: invalidated since its last access (a miss, then rewritten), or only ever
                // deleted so far (its first access: a cold miss, with no reuse interval).
                if get {
                    if e.last == NEVER {
                        s.cold += w;
                    } else {
                        s.invalidated += w;
                        s.reuse_secs[reuse_bucket(now.saturating_sub(e.last))] += w;
                    }
                }
                (now, get)
            }
            None => {
                if get {
                    s.cold += w;
                }
                if !self.make_room(s, h) {
                    return;
                }
                s.heap.push(h);
                (now, get)
            }
        };
        // A miss whose value a cache would not keep leaves the key out of the cache: its next get misses too.
        let ts = if missed_everywhere && access == Access::GetNotStored {
            0
        } else {
            s.push(weight)
        };
        s.entries.insert(
            h,
            Entry {
                ts,
                weight,
                written,
                last: now,
                last_tick: s.tick,
                tag,
            },
        );
        s.sims.access(SimAccess {
            hash: h,
            get,
            stores: access != Access::GetNotStored,
            now,
            weight,
            ttl,
            w,
            lru_distance,
        });
        if s.sims.due() {
            s.regrid();
        }
    }

    /// Before a new key of hash `h` joins a full sample, drops the largest hash of the sample and `h` together and
    /// lowers the threshold to it; `false` when that is `h` itself (the key is not kept).
    fn make_room(&self, s: &mut State, h: u64) -> bool {
        if s.entries.len() < self.max_keys {
            return true;
        }
        let keep = s.heap.peek().is_some_and(|&top| h < top);
        if keep {
            s.evict_largest();
        } else {
            s.lower_threshold(h);
        }
        self.threshold.store(s.threshold, Ordering::Relaxed);
        keep
    }

    /// The key of hash `h` (of pattern `tag`) was deleted: it leaves the cache, and its next get is a miss. A key
    /// first seen in a delete still counts as a distinct key.
    pub fn delete(&self, h: u64, tag: u32) {
        if !self.samples(h) {
            return;
        }
        let mut guard = self.lock();
        let s = &mut *guard;
        if h >= s.threshold {
            return;
        }
        match s.entries.get(&h).copied() {
            Some(e) if e.ts != 0 => {
                s.unlink(e);
                if let Some(e) = s.entries.get_mut(&h) {
                    e.ts = 0;
                }
                s.sims.remove(h);
            }
            Some(_) => {}
            None => {
                if !self.make_room(s, h) {
                    return;
                }
                s.entries.insert(
                    h,
                    Entry {
                        ts: 0,
                        weight: 0,
                        written: 0,
                        last: NEVER,
                        last_tick: 0,
                        tag,
                    },
                );
                s.heap.push(h);
            }
        }
    }

    /// Every key with `tag` (or every key, with `None`) was deleted.
    pub fn delete_all(&self, tag: Option<u32>) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let mut removed = Vec::new();
        for (&h, e) in s.entries.iter_mut() {
            if e.ts != 0 && tag.is_none_or(|t| t == e.tag) {
                removed.push((h, *e));
                e.ts = 0;
            }
        }
        for (h, e) in removed {
            s.unlink(e);
            s.sims.remove(h);
        }
    }

    /// The miss ratio curve over `gets_offered` gets (every get of the keys this estimator is for, sampled or not,
    /// since it was created), with the SHARDS_adj correction, and the sample's statistics.
    pub fn curve(&self, gets_offered: u64) -> (Curve, SampleStats) {
        let s = self.lock();
        let mut objects = s.objects.clone();
        let mut bytes = s.bytes.clone();
        let accounted = objects.total() + s.cold + s.expired + s.invalidated;
        let adj = gets_offered as f64 - accounted;
        if s.sampled_gets > 0 {
            objects.add(0.0, adj);
            bytes.add(0.0, adj);
        }
        let stats = SampleStats {
            rate: s.threshold as f64 / 2f64.powi(64),
            sampled_keys: s.entries.len() as u64,
            sampled_gets: s.sampled_gets,
            distinct_keys: s.entries.len() as f64 * s.weight,
            mean_key_bytes: s.mean_weight_opt().unwrap_or(0.0),
            cold_misses: s.cold,
            expired_misses: s.expired,
            invalidated_misses: s.invalidated,
            reuse_secs: s.reuse_secs,
        };
        let curve = Curve {
            objects,
            bytes,
            reuse_accesses: s.reuse_accesses.clone(),
            gets: if s.sampled_gets > 0 {
                gets_offered as f64
            } else {
                0.0
            },
            policy: s.sims.runs_miniatures().then(|| {
                let rate = s.threshold as f64 / 2f64.powi(64);
                let fpc = Sims::finite_population(rate);
                let mut points = s.sims.points();
                for p in &mut points {
                    // A miniature sampling below the sample's rate has its own sample's error.
                    p.std_error *= Sims::finite_population(p.rate.min(rate));
                    p.lru_std_error *= fpc;
                }
                PolicyCurve {
                    eviction: s.sims.eviction(),
                    points,
                    max_std_error: s.sims.max_std_error() * fpc,
                }
            }),
        };
        (curve, stats)
    }

    /// Heap bytes held now.
    pub fn heap_bytes(&self) -> usize {
        let s = self.lock();
        s.heap_bytes()
    }

    /// The most heap bytes an estimator of `max_keys` can ever hold: the key table at its largest (32 bytes and a
    /// control byte per bucket; the table of a full sample grows to room for `2 × max_keys` keys, because removals
    /// leave tombstones and hashbrown only rehashes in place below half its capacity), the heap of hashes, a Fenwick
    /// tree of `2 × max_keys` logical times at 12 bytes, the transient compaction buffer (16 bytes per key), and two
    /// fixed histograms of 1,888 `f64` buckets. About 0.9 MiB for the default 7,168 keys.
    pub fn heap_bytes_bound(max_keys: usize) -> usize {
        Self::heap_bytes_bound_with(max_keys, true)
    }

    /// [`heap_bytes_bound`](Self::heap_bytes_bound), with or without the miniature simulations of Redis's eviction
    /// (`cache.analysis.simulate_eviction`): about 6.0 MiB and 0.9 MiB for the default 7,168 keys.
    pub fn heap_bytes_bound_with(max_keys: usize, miniatures: bool) -> usize {
        let max_keys = max_keys.max(64);
        let table = table_bytes(2 * max_keys);
        let heap = max_keys.next_power_of_two() * 8;
        let tree = (2 * max_keys + 3) * 12;
        let compaction = max_keys * 16;
        let histograms = 3 * LogHistogram::default().heap_bytes() + 34 * 8;
        // Each running miniature (redis_sim) holds at most every sampled key.
        let miniatures = if miniatures {
            Sims::max_running(max_keys) * Sims::sim_bytes_bound(max_keys)
        } else {
            0
        };
        table + heap + tree + compaction + histograms + miniatures
    }
}

/// Heap bytes of a key table that can hold `capacity` entries without growing (hashbrown's sizing: buckets are the
/// next power of two of `8/7 × capacity`; 32 bytes per (hash, entry) pair, one control byte per bucket, plus a group
/// of trailing control bytes).
fn table_bytes(capacity: usize) -> usize {
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8).div_ceil(7).next_power_of_two()
    };
    buckets * (std::mem::size_of::<(u64, Entry)>() + 1) + 16
}

impl State {
    fn mean_weight_opt(&self) -> Option<f64> {
        (self.live_count > 0).then(|| self.live_bytes as f64 / self.live_count as f64)
    }

    fn mean_weight(&self) -> u32 {
        self.mean_weight_opt().map_or(0, |m| m as u32)
    }

    fn heap_bytes(&self) -> usize {
        table_bytes(self.entries.capacity())
            + self.heap.capacity() * 8
            + self.tree.count.capacity() * 4
            + self.tree.bytes.capacity() * 8
            + 3 * self.objects.heap_bytes()
            + self.sims.heap_bytes()
    }

    /// Starts and stops miniatures as the sample grows or its rate falls.
    fn regrid(&mut self) {
        let rate = self.threshold as f64 / 2f64.powi(64);
        let mean = self.mean_weight_opt().unwrap_or(0.0);
        let mut live = self
            .entries
            .iter()
            .filter(|(_, e)| e.ts != 0)
            .map(|(&h, e)| (h, e.weight, e.written, e.last));
        self.sims.regrid(rate, self.live_bytes, mean, &mut live);
    }

    /// Removes an entry's access from the stack.
    fn unlink(&mut self, e: Entry) {
        if e.ts == 0 {
            return;
        }
        self.tree.add(e.ts as usize, -1, -i64::from(e.weight));
        self.live_count -= 1;
        self.live_bytes -= u64::from(e.weight);
    }

    /// Adds an access at the next logical time (compacting or growing the tree first if it is full).
    fn push(&mut self, weight: u32) -> u32 {
        if self.next_ts > self.tree.len() {
            self.compact();
        }
        let ts = self.next_ts;
        self.next_ts += 1;
        self.tree.add(ts, 1, i64::from(weight));
        self.live_count += 1;
        self.live_bytes += u64::from(weight);
        ts as u32
    }

    /// Renumbers the live accesses `1..=live` in order, in a tree at least twice as large as what is live.
    fn compact(&mut self) {
        let mut live: Vec<(u32, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.ts != 0)
            .map(|(&h, e)| (e.ts, h))
            .collect();
        live.sort_unstable();
        let n = (2 * (live.len() + 1)).max(64).max(self.tree.len());
        for (i, &(_, h)) in live.iter().enumerate() {
            if let Some(e) = self.entries.get_mut(&h) {
                e.ts = i as u32 + 1;
            }
        }
        let entries = &self.entries;
        self.tree = Fenwick::build(
            n,
            live.iter()
                .enumerate()
                .map(|(i, (_, h))| (i + 1, entries.get(h).map_or(0, |e| e.weight))),
        );
        self.next_ts = live.len() + 1;
    }

    /// Drops the sampled key with the largest hash and lowers the threshold to it.
    fn evict_largest(&mut self) {
        while let Some(h) = self.heap.pop() {
            if let Some(e) = self.entries.remove(&h) {
                self.unlink(e);
                self.sims.remove(h);
                self.lower_threshold(h);
                return;
            }
        }
    }

    /// Drops every sampled key of hash `cap` or more and samples below `cap` from now on.
    fn lower_to(&mut self, cap: u64) {
        while self.heap.peek().is_some_and(|&top| top >= cap) {
            if let Some(h) = self.heap.pop() {
                if let Some(e) = self.entries.remove(&h) {
                    self.unlink(e);
                    self.sims.remove(h);
                }
            }
        }
        self.lower_threshold(cap);
    }

    /// Samples only hashes below `h` from now on: `R = h / 2^64`.
    fn lower_threshold(&mut self, h: u64) {
        self.threshold = h;
        self.weight = 2f64.powi(64) / h.max(1) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_while_every_key_is_sampled() {
        // a b c a b c … : every reuse at distance 2, after the three cold misses.
        let s = Shards::new(1000);
        for i in 0..30u64 {
            s.access(i % 3, Access::Get, 0, Some(10), None, 0);
        }
        let (c, st) = s.curve(30);
        assert_eq!(st.rate, 1.0);
        assert!((st.distinct_keys - 3.0).abs() < 1e-9);
        assert_eq!(
            c.hit_ratio_at_objects(2.0),
            0.0,
            "LRU of 2 thrashes a cycle of 3"
        );
        assert!((c.hit_ratio_at_objects(3.0) - 0.9).abs() < 1e-9);
        assert!((c.max_hit_ratio() - 0.9).abs() < 1e-9);
        // bytes: two others of 10 bytes in between, plus itself.
        assert_eq!(c.hit_ratio_at_bytes(29.0), 0.0);
        assert!((c.hit_ratio_at_bytes(30.0) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn compactions_keep_distances_exact() {
        // A cycle over 20 keys (distances below 32 have exact buckets), many times: the 64-slot tree compacts
        // every ~44 accesses, and every reuse stays at distance 19.
        let s = Shards::new(1000);
        let rounds = 50u64;
        for i in 0..20 * rounds {
            s.access(i % 20, Access::Get, 0, Some(1), None, 0);
        }
        let (c, st) = s.curve(20 * rounds);
        assert_eq!(st.sampled_keys, 20);
        assert_eq!(c.hit_ratio_at_objects(19.0), 0.0);
        let expect = (rounds - 1) as f64 / rounds as f64;
        assert!((c.hit_ratio_at_objects(20.0) - expect).abs() < 1e-9);
        assert!((c.hit_ratio_at_bytes(20.0) - expect).abs() < 1e-9);
        assert_eq!(c.hit_ratio_at_bytes(19.0), 0.0);
    }

    #[test]
    fn ttl_and_deletes_make_misses() {
        let s = Shards::new(1000);
        s.access(1, Access::Get, 0, Some(1), Some(10), 0); // cold
        s.access(1, Access::Get, 5000, Some(1), Some(10), 0); // hit
        s.access(1, Access::Get, 10000, Some(1), Some(10), 0); // written at 0, TTL 10: expired
        s.access(1, Access::Get, 15000, Some(1), Some(10), 0); // rewritten at 10: hit
        s.delete(1, 0);
        s.delete(2, 0); // first seen in a delete: a distinct key, not in the cache
        s.access(1, Access::Get, 16000, Some(1), Some(10), 0); // invalidated
        let (c, st) = s.curve(5);
        assert_eq!(st.cold_misses, 1.0);
        assert_eq!(
            st.reuse_secs.iter().sum::<f64>(),
            4.0,
            "four gets of key 1 after its first"
        );
        assert_eq!(st.expired_misses, 1.0);
        assert_eq!(st.invalidated_misses, 1.0);
        assert_eq!(st.distinct_keys, 2.0);
        assert!((c.max_hit_ratio() - 0.4).abs() < 1e-9);
    }

    #[test]
    fn a_key_first_seen_in_a_delete_is_cold_on_its_first_get() {
        let s = Shards::new(1000);
        s.delete(9, 0);
        s.access(9, Access::Get, 86_000_000, Some(1), None, 0);
        let (_, st) = s.curve(1);
        assert_eq!((st.cold_misses, st.invalidated_misses), (1.0, 0.0));
        assert_eq!(
            st.reuse_secs.iter().sum::<f64>(),
            0.0,
            "no reuse interval from the delete"
        );
    }

    #[test]
    fn a_miss_not_stored_leaves_the_key_out_but_a_hit_keeps_it() {
        let s = Shards::new(1000);
        s.access(1, Access::GetNotStored, 0, Some(1), None, 0); // cold, not stored
        s.access(1, Access::Get, 1000, Some(1), None, 0); // so a miss again, then stored
        s.access(1, Access::GetNotStored, 2000, Some(1), None, 0); // a hit: the cached copy stays
        s.access(1, Access::Get, 3000, Some(1), None, 0); // a hit
        let (c, st) = s.curve(4);
        assert_eq!((st.cold_misses, st.invalidated_misses), (1.0, 1.0));
        assert!((c.max_hit_ratio() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_set_refreshes_without_counting() {
        let s = Shards::new(1000);
        s.access(1, Access::Set, 0, Some(1), Some(10), 0);
        s.access(2, Access::Get, 1000, Some(1), Some(10), 0);
        s.access(1, Access::Get, 2000, Some(1), Some(10), 0); // distance 1
        let (c, st) = s.curve(2);
        assert_eq!(st.sampled_gets, 2);
        assert_eq!(c.hit_ratio_at_objects(1.0), 0.0);
        assert!((c.hit_ratio_at_objects(2.0) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn pattern_deletes_only_touch_their_tag() {
        let s = Shards::new(1000);
        s.access(1, Access::Get, 0, Some(1), None, 7);
        s.access(2, Access::Get, 0, Some(1), None, 8);
        s.delete_all(Some(7));
        s.access(1, Access::Get, 0, Some(1), None, 7);
        s.access(2, Access::Get, 0, Some(1), None, 8);
        let (_, st) = s.curve(4);
        assert_eq!(st.invalidated_misses, 1.0);
    }

    #[test]
    fn memory_stays_bounded_and_distinct_keys_are_estimated() {
        let s = Shards::new(1024);
        let n = 2_000_000u64;
        for i in 0..n {
            let h = fmix64(i);
            s.access(h, Access::Get, 0, Some(100), None, 0);
        }
        let (_, st) = s.curve(n);
        assert!(st.sampled_keys <= 1024);
        assert!(
            (st.distinct_keys / n as f64 - 1.0).abs() < 0.1,
            "{}",
            st.distinct_keys
        );
        assert!(s.heap_bytes() <= Shards::heap_bytes_bound(1024));
        assert!(st.rate < 0.001);
    }

    #[test]
    fn the_rate_is_capped_after_the_warm_up() {
        let s = Shards::with_max_rate(100_000, 0.125);
        let keys = 1024u64;
        let n = 4 * WARMUP_GETS;
        for i in 0..n {
            s.access(fmix64(i % keys), Access::Get, 0, Some(1), None, 0);
        }
        let (c, st) = s.curve(n);
        assert!((st.rate - 0.125).abs() < 1e-9, "{}", st.rate);
        assert!(
            (st.sampled_keys as f64 / keys as f64 - 0.125).abs() < 0.05,
            "{}",
            st.sampled_keys
        );
        assert!(st.sampled_gets < WARMUP_GETS + n / 4, "{}", st.sampled_gets);
        // Still about right: every reuse is at distance 1023.
        assert!(
            c.hit_ratio_at_objects(900.0) < 0.1,
            "{}",
            c.hit_ratio_at_objects(900.0)
        );
        assert!(
            c.hit_ratio_at_objects(1100.0) > 0.9,
            "{}",
            c.hit_ratio_at_objects(1100.0)
        );
    }

    #[test]
    fn key_hash_is_stable() {
        assert_eq!(key_hash("user:1"), key_hash("user:1"));
        assert_ne!(key_hash("user:1"), key_hash("user:2"));
    }
}
