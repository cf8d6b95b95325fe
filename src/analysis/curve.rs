//! Histograms of reuse distances and the miss ratio curves read off them.

use serde::{Deserialize, Serialize};

use super::redis_sim::{RedisEviction, SimPoint};

/// Sub-buckets per power of two: a bucket is at most 1/32 (about 3%) of its lower bound wide.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Buckets of a [`LogHistogram`]: exact below 32, then 32 per power of two up to 2^63.
pub(crate) const LOG_BUCKETS: usize = SUB + (63 - SUB_BITS as usize) * SUB;

/// A histogram of non-negative values (reuse distances in objects or bytes) with log-linear buckets: width 1 below
/// 32, then 32 buckets per power of two, so a bucket is at most about 3% of its value wide. Counts are `f64`
/// because every sampled event weighs `1 / sampling rate`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LogHistogram {
    counts: Box<[f64]>,
}

impl Default for LogHistogram {
    fn default() -> Self {
        LogHistogram {
            counts: vec![0.0; LOG_BUCKETS].into_boxed_slice(),
        }
    }
}

/// The bucket of `x` (floored to an integer).
pub(crate) fn bucket_of(x: f64) -> usize {
    let v = if x.is_finite() && x > 0.0 {
        x as u64
    } else {
        0
    };
    if v < SUB as u64 {
        return v as usize;
    }
    let octave = 63 - v.leading_zeros(); // ≥ SUB_BITS
    let shift = octave - SUB_BITS;
    let mantissa = (v >> shift) as usize - SUB; // 0..SUB
    (SUB + (octave - SUB_BITS) as usize * SUB + mantissa).min(LOG_BUCKETS - 1)
}

/// `[lower, upper)` of bucket `i`.
pub(crate) fn bucket_bounds(i: usize) -> (f64, f64) {
    if i < SUB {
        return (i as f64, i as f64 + 1.0);
    }
    let octave = (i - SUB) / SUB + SUB_BITS as usize;
    let mantissa = (i - SUB) % SUB;
    let width = (1u64 << (octave - SUB_BITS as usize)) as f64;
    let lower = (SUB + mantissa) as f64 * width;
    (lower, lower + width)
}

impl LogHistogram {
    pub(crate) fn add(&mut self, x: f64, weight: f64) {
        self.counts[bucket_of(x)] += weight;
    }

    pub(crate) fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Weight of values `< c`, interpolating linearly inside the bucket that holds `c`.
    pub(crate) fn below(&self, c: f64) -> f64 {
        let mut sum = 0.0;
        for (i, &n) in self.counts.iter().enumerate() {
            if n == 0.0 {
                continue;
            }
            let (lo, hi) = bucket_bounds(i);
            if hi <= c {
                sum += n;
            } else if lo < c {
                sum += n * (c - lo) / (hi - lo);
            } else {
                break;
            }
        }
        sum
    }

    /// Smallest `c` with `below(c) >= target` (`None` when the histogram never reaches it).
    pub(crate) fn inverse(&self, target: f64) -> Option<f64> {
        if target <= 0.0 {
            return Some(0.0);
        }
        // The same running sum as `below`, negative buckets (a negative SHARDS_adj) included.
        let mut sum = 0.0;
        for (i, &n) in self.counts.iter().enumerate() {
            if n == 0.0 {
                continue;
            }
            let (lo, hi) = bucket_bounds(i);
            if n > 0.0 && sum + n >= target {
                return Some(lo + (hi - lo) * ((target - sum) / n).clamp(0.0, 1.0));
            }
            sum += n;
        }
        None
    }

    /// The lower bound of the first bucket and the upper bound of the last bucket holding a positive weight
    /// (`None` when none does).
    pub(crate) fn extent(&self) -> Option<(f64, f64)> {
        let first = self.counts.iter().position(|&n| n > 0.0)?;
        let last = self.counts.iter().rposition(|&n| n > 0.0)?;
        Some((bucket_bounds(first).0, bucket_bounds(last).1))
    }

    /// Bytes of heap this histogram holds.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.counts.len() * std::mem::size_of::<f64>()
    }
}

/// A miss ratio curve read off a reuse-distance histogram: the predicted LRU hit ratio of a cache of a given
/// capacity, in objects or in bytes.
///
/// Every get is one of: a reuse at some distance (a hit in every cache larger than the distance), a cold miss (the
/// key's first get), an expiry miss (the reuse came after the TTL), or an invalidation miss (the key was deleted
/// since). The SHARDS_adj correction (Waldspurger et al., FAST 2015, §4.3) is already applied: the difference between
/// the gets offered and the gets the sample accounts for is added to the smallest distance.
#[derive(Clone, Debug)]
pub struct Curve {
    pub(crate) objects: LogHistogram,
    pub(crate) bytes: LogHistogram,
    /// Every get offered to the estimator, sampled or not.
    pub(crate) gets: f64,
    /// Redis's eviction in miniature: the correction to exact LRU at a grid of sizes, and the uncertainty.
    pub(crate) policy: Option<PolicyCurve>,
    /// Accesses of the estimator's keys between a get that hits at some size and the key's previous access (the
    /// characteristic-time split of a memory budget).
    pub(crate) reuse_accesses: LogHistogram,
}

/// What the miniature simulations of Redis's eviction measured ([`super::redis_sim`]).
#[derive(Clone, Debug)]
pub(crate) struct PolicyCurve {
    pub(crate) eviction: RedisEviction,
    /// Smallest size first.
    pub(crate) points: Vec<SimPoint>,
    /// One standard error of the hit ratio at unbounded size.
    pub(crate) max_std_error: f64,
}

/// `points` interpolated at `bytes`, linearly in `log2(size)`; the end values outside them.
fn interpolate(points: &[SimPoint], bytes: f64, f: impl Fn(&SimPoint) -> f64) -> Option<f64> {
    let first = points.first()?;
    let last = points.last()?;
    if bytes <= first.capacity_bytes {
        return Some(f(first));
    }
    if !bytes.is_finite() || bytes >= last.capacity_bytes {
        return Some(f(last));
    }
    let i = points.partition_point(|p| p.capacity_bytes <= bytes);
    let (a, b) = (&points[i - 1], &points[i]);
    let t = (bytes.log2() - a.capacity_bytes.log2())
        / (b.capacity_bytes.log2() - a.capacity_bytes.log2());
    Some(f(a) + (f(b) - f(a)) * t)
}

/// Standard errors are doubled for the uncertainty: about a 95% interval.
const INTERVAL: f64 = 2.0;

impl Curve {
    /// Predicted hit ratio (0–1) of an LRU cache holding `objects` entries. 0 when no get was seen.
    pub fn hit_ratio_at_objects(&self, objects: f64) -> f64 {
        self.ratio(self.objects.below(objects))
    }

    /// Predicted hit ratio (0–1) of an LRU cache of `bytes` bytes (keys, values and the per-key overhead counted).
    pub fn hit_ratio_at_bytes(&self, bytes: f64) -> f64 {
        self.ratio(self.bytes.below(bytes))
    }

    /// Predicted hit ratio (0–1) of a Redis of `bytes` bytes evicting by `policy`: the exact LRU prediction
    /// ([`hit_ratio_at_bytes`](Self::hit_ratio_at_bytes)) plus the difference the miniature simulations of that
    /// policy measured at that size (MiniSim, Waldspurger et al., USENIX ATC 2017), interpolated in log size
    /// between the simulated sizes. With `None` (exact LRU), or a policy the estimator does not simulate, or before
    /// any miniature has measured a get, the exact LRU prediction.
    pub fn hit_ratio_at_bytes_for(&self, policy: Option<RedisEviction>, bytes: f64) -> f64 {
        let lru = self.hit_ratio_at_bytes(bytes);
        match (policy, &self.policy) {
            (Some(want), Some(p)) if p.eviction.policy == want.policy => {
                let mut delta = interpolate(&p.points, bytes, |s| s.delta).unwrap_or(0.0);
                // Below the smallest miniature the difference shrinks with the hit ratio itself (none at 0 bytes).
                if let Some(first) = p.points.first() {
                    if bytes < first.capacity_bytes {
                        let at_first = self.hit_ratio_at_bytes(first.capacity_bytes);
                        delta *= if at_first > 0.0 {
                            (lru / at_first).min(1.0)
                        } else {
                            0.0
                        };
                    }
                }
                (lru + delta).clamp(0.0, self.max_hit_ratio())
            }
            _ => lru,
        }
    }

    /// The eviction the miniature simulations run (the policy [`hit_ratio_at_bytes_for`] corrects for).
    ///
    /// [`hit_ratio_at_bytes_for`]: Self::hit_ratio_at_bytes_for
    pub fn simulated_eviction(&self) -> Option<RedisEviction> {
        self.policy.as_ref().map(|p| p.eviction)
    }

    /// The uncertainty of the predicted hit ratio at `bytes` (for `policy`, or exact LRU with `None`): twice the
    /// standard error across eight spatial subsamples of the sample (keys grouped by hash), about a 95% interval
    /// half-width, 0–1. 0 while fewer than two subsamples have gets.
    pub fn uncertainty_at_bytes(&self, policy: Option<RedisEviction>, bytes: f64) -> f64 {
        let Some(p) = &self.policy else {
            return 0.0;
        };
        let beyond = p.points.last().is_none_or(|l| bytes > l.capacity_bytes);
        let simulated = policy.is_some_and(|want| want.policy == p.eviction.policy);
        let se = if beyond {
            p.max_std_error
        } else if simulated {
            interpolate(&p.points, bytes, |s| s.std_error).unwrap_or(p.max_std_error)
        } else {
            interpolate(&p.points, bytes, |s| s.lru_std_error).unwrap_or(p.max_std_error)
        };
        let mut u = se * INTERVAL;
        // Below the smallest miniature the correction is extrapolated: at least as unsure as the correction.
        if let Some(first) = p.points.first() {
            if simulated && bytes < first.capacity_bytes {
                u = u.max(first.delta.abs());
            }
        }
        (u * 1e5).round() / 1e5
    }

    /// The best hit ratio any size reaches: every get that is not a cold, expiry or invalidation miss.
    pub fn max_hit_ratio(&self) -> f64 {
        self.ratio(self.objects.total())
    }

    /// Fewest objects at which the predicted hit ratio reaches `hit_ratio`; `None` if no size reaches it.
    pub fn objects_for(&self, hit_ratio: f64) -> Option<f64> {
        if self.gets <= 0.0 {
            return None;
        }
        self.objects.inverse(hit_ratio * self.gets).map(f64::ceil)
    }

    /// Fewest bytes at which the predicted hit ratio reaches `hit_ratio`; `None` if no size reaches it.
    pub fn bytes_for(&self, hit_ratio: f64) -> Option<f64> {
        if self.gets <= 0.0 {
            return None;
        }
        self.bytes.inverse(hit_ratio * self.gets).map(f64::ceil)
    }

    /// The whole curve at `points` log-spaced sizes (at most; equal sizes after rounding are merged), in objects
    /// and in bytes, from the smallest reuse distance seen to a quarter past the largest, where the curve has
    /// reached [`max_hit_ratio`](Self::max_hit_ratio). Empty when no reuse was seen.
    pub fn samples(&self, points: usize) -> CurveSamples {
        let sample = |h: &LogHistogram,
                      at: &dyn Fn(f64) -> f64,
                      unsure: &dyn Fn(f64) -> f64|
         -> Vec<SizeHit> {
            let Some((lo, hi)) = h.extent() else {
                return Vec::new();
            };
            let (lo, hi) = (lo.max(1.0), (hi * 1.25).max(2.0));
            let n = points.max(2);
            let mut out: Vec<SizeHit> = Vec::with_capacity(n);
            for i in 0..n {
                let size = (lo * (hi / lo).powf(i as f64 / (n - 1) as f64)).round() as u64;
                if out.last().is_some_and(|p| p.size >= size) {
                    continue;
                }
                out.push(SizeHit {
                    size,
                    hit_ratio: (at(size as f64) * 1e5).round() / 1e5,
                    uncertainty: unsure(size as f64),
                });
            }
            out
        };
        CurveSamples {
            objects: sample(&self.objects, &|x| self.hit_ratio_at_objects(x), &|_| 0.0),
            bytes: sample(&self.bytes, &|x| self.hit_ratio_at_bytes(x), &|x| {
                self.uncertainty_at_bytes(None, x)
            }),
        }
    }

    fn ratio(&self, hits: f64) -> f64 {
        if self.gets <= 0.0 {
            0.0
        } else {
            (hits / self.gets).clamp(0.0, 1.0)
        }
    }
}

/// One point of a miss ratio curve, as the report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Cache capacity in objects.
    pub objects: u64,
    /// Predicted hit ratio at that capacity (0–1).
    pub hit_ratio: f64,
}

/// One point of a sampled miss ratio curve: a cache size (objects or bytes, as the list it is in says) and the
/// predicted LRU hit ratio (0–1) there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SizeHit {
    /// Cache capacity, in objects or in bytes.
    pub size: u64,
    /// Predicted hit ratio at that capacity (0–1, rounded to 5 decimals).
    pub hit_ratio: f64,
    /// Half-width of an approximate 95% interval around `hit_ratio` (byte curves; left out when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uncertainty: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A whole miss ratio curve, as a plot draws it: `{"objects": [{"size", "hit_ratio"}…], "bytes": […]}`, sizes
/// increasing and log-spaced (`cache.analysis.curve_points` of them at most).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CurveSamples {
    /// Hit ratio against capacity in objects.
    pub objects: Vec<SizeHit>,
    /// Hit ratio against capacity in bytes (keys, values and the per-key overhead).
    pub bytes: Vec<SizeHit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_line() {
        let mut prev_hi = 0.0;
        for i in 0..LOG_BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo, prev_hi, "bucket {i}");
            assert!(hi > lo);
            if i >= 32 {
                assert!((hi - lo) / lo <= 1.0 / 32.0 + 1e-12, "bucket {i}");
            } else {
                assert_eq!(hi - lo, 1.0, "bucket {i}");
            }
            prev_hi = hi;
        }
        for x in [0.0, 1.0, 31.0, 32.0, 33.5, 1000.0, 1e6, 123_456_789.0, 1e18] {
            let (lo, hi) = bucket_bounds(bucket_of(x));
            assert!(lo <= x.floor() && x.floor() < hi, "{x} in [{lo}, {hi})");
        }
        assert_eq!(bucket_of(-3.0), 0);
        assert_eq!(bucket_of(f64::NAN), 0);
    }

    #[test]
    fn below_and_inverse_agree() {
        let mut h = LogHistogram::default();
        for d in 0..1000 {
            h.add(d as f64, 1.0);
        }
        assert_eq!(h.below(10.0), 10.0);
        assert!((h.below(500.0) - 500.0).abs() < 1e-9);
        assert!((h.below(777.0) - 777.0).abs() < 1.0);
        let c = h.inverse(600.0).expect("reached");
        assert!((c - 600.0).abs() < 1.0, "{c}");
        assert_eq!(h.inverse(1001.0), None);
        // A negative adjustment at distance 0 counts in both.
        h.add(0.0, -100.0);
        let c = h.inverse(500.0).expect("reached");
        assert!((h.below(c) - 500.0).abs() < 1.0, "{c}: {}", h.below(c));
    }

    #[test]
    fn samples_cover_the_curve_in_increasing_sizes() {
        let mut curve = Curve {
            objects: LogHistogram::default(),
            bytes: LogHistogram::default(),
            gets: 2000.0,
            policy: None,
            reuse_accesses: LogHistogram::default(),
        };
        for d in 0..1000 {
            curve.objects.add(d as f64, 1.0);
            curve.bytes.add(d as f64 * 100.0, 1.0);
        }
        let s = curve.samples(20);
        for series in [&s.objects, &s.bytes] {
            assert!((2..=20).contains(&series.len()), "{}", series.len());
            assert!(series.windows(2).all(|w| w[0].size < w[1].size));
            assert!(series.windows(2).all(|w| w[0].hit_ratio <= w[1].hit_ratio));
            // The last point is past every reuse distance: the curve's maximum, 1000 reuses of 2000 gets.
            assert_eq!(series.last().map(|p| p.hit_ratio), Some(0.5));
        }
        assert_eq!(s.objects[0].size, 1);
        let empty = Curve {
            objects: LogHistogram::default(),
            bytes: LogHistogram::default(),
            gets: 10.0,
            policy: None,
            reuse_accesses: LogHistogram::default(),
        };
        assert_eq!(empty.samples(20), CurveSamples::default());
    }
}
