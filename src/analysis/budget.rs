//! Splitting one Redis's memory across key patterns: which patterns to serve, and what each then gets.
//!
//! Method: the characteristic-time approximation of LRU (H. Che, Y. Tung and Z. Wang, "Hierarchical Web caching
//! systems: modeling, design and experimental results", IEEE JSAC 20(7), 2002; its justification for mixed
//! streams: C. Fricker, P. Robert and J. Roberts, "A versatile and accurate approximation for LRU cache
//! performance", ITC 24, 2012). In an LRU cache every entry is evicted about the same time `T` after its last
//! access, whatever its pattern; a get hits when its key was accessed less than `T` ago. So patterns sharing one
//! cache share one `T`:
//!
//! - pattern `p` alone, in its own cache of `C` bytes, has the hit ratio `h_p(C)` of its SHARDS byte curve; the
//!   same hit ratio is the share of its gets whose key was accessed less than `T_p(C)` ago, which defines
//!   `T_p(C)`, and conversely `C_p(T)`: the memory `p` occupies when entries live `T` past their last access.
//!   Reuse times are counted in the pattern's own accesses (SHARDS keeps them per estimator) and turned into
//!   seconds by the pattern's rate, `n / λ_p`, so that patterns of different rates share one clock;
//! - patterns `S` sharing `B` bytes: the `T` with `Σ_{p∈S} C_p(T) = B`; pattern `p` then occupies `C_p(T)` and hits
//!   with `h_p(C_p(T))`, corrected for Redis's own eviction at that size (MiniSim, [`super::redis_sim`]).
//!
//! The whitelist is chosen by backward elimination: start from every pattern the report would recommend on its own
//! merits (traffic, writes, reachable hit ratio; at most [`MAX_PLANNED_PATTERNS`], those saving the most alone),
//! then drop, one at a time, the pattern whose removal saves the most origin time per second, while a removal saves
//! any. TTLs are each pattern's recommended TTL (the curves were
//! measured under the TTL in force; other TTLs are not predicted).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::curve::Curve;
use super::redis_sim::RedisEviction;

/// The most patterns a plan weighs against each other: backward elimination makes `O(n²)` evaluations of a split
/// that costs `O(n)`, so beyond this many eligible patterns only those saving the most on their own (with the whole
/// budget) are weighed, and the rest are left out, with that reason.
pub const MAX_PLANNED_PATTERNS: usize = 64;

/// Characteristic times tried, log-spaced: 1 µs to about 115 days, in seconds.
const TIMES: usize = 300;
const T_MIN: f64 = 1e-6;
const T_MAX: f64 = 1e7;

/// What one pattern brings to the split.
pub(crate) struct BudgetInput<'a> {
    pub(crate) name: &'a str,
    pub(crate) curve: &'a Curve,
    /// Gets per second.
    pub(crate) gets_per_second: f64,
    /// Gets and writes per second (the rate reuse times are counted in).
    pub(crate) accesses_per_second: f64,
    /// Mean loader time, seconds: what one hit saves.
    pub(crate) loader_seconds: f64,
    /// Whether the report would recommend it on its own merits.
    pub(crate) eligible: bool,
    pub(crate) ttl_secs: Option<u64>,
}

/// One pattern's part of a memory budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetShare {
    /// Whether the plan serves it (in its whitelist).
    pub served: bool,
    /// Memory it would occupy in the shared Redis, bytes (keys, values and the per-key overhead).
    pub memory_bytes: u64,
    /// Its predicted hit ratio there (0–1), for the plan's eviction.
    pub hit_ratio: f64,
    /// Half-width of an approximate 95% interval around `hit_ratio`.
    pub uncertainty: f64,
    /// Origin time it would save per second, seconds.
    pub origin_seconds_saved_per_second: f64,
    /// The TTL the plan gives it, seconds.
    pub ttl_secs: Option<u64>,
    /// Why it is served, left out, or withheld.
    pub reason: String,
}

/// A memory budget split across key patterns (`GET /internal/cache/report?memory=2GiB`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetPlan {
    /// The budget, bytes: memory for entries (keys, values and the per-key overhead).
    pub memory_bytes: u64,
    /// The eviction the hit ratios are for.
    pub eviction: RedisEviction,
    /// How the patterns were combined.
    pub method: String,
    /// How long after its last access an entry is evicted in the shared cache, seconds (`null`: never, the
    /// budget holds everything).
    pub characteristic_time_secs: Option<f64>,
    /// Predicted hit ratio of the served patterns' gets together (0–1).
    pub hit_ratio: f64,
    /// Origin time saved per second by the served patterns, seconds.
    pub origin_seconds_saved_per_second: f64,
    /// Every pattern with an estimator.
    pub patterns: BTreeMap<String, BudgetShare>,
    /// The served patterns.
    pub whitelist: Vec<String>,
}

/// The smallest budget a plan takes: 1 MiB.
pub const MIN_BUDGET_BYTES: u64 = 1 << 20;

/// Reads a memory budget as people write it: `2GiB`, `512MiB`, `1.5 GB`, `1000000` (bytes); binary (`KiB`, `MiB`,
/// `GiB`, `TiB`) and decimal (`KB`, `MB`, `GB`, `TB`) units, parsed by the `bytesize` crate.
///
/// # Errors
/// [`Error::Config`](crate::Error::Config) naming `memory` when it is not a size, or is under
/// [`MIN_BUDGET_BYTES`].
///
/// ```
/// use cache_rollout::analysis::parse_memory;
/// assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
/// assert_eq!(parse_memory("512 MB").unwrap(), 512_000_000);
/// assert!(parse_memory("lots").is_err());
/// assert!(parse_memory("10KiB").is_err());
/// ```
pub fn parse_memory(s: &str) -> crate::Result<u64> {
    let reason = "must be a size of at least 1 MiB, such as 2GiB, 512MiB or 1000000000 (bytes)";
    let bytes = s
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|_| crate::Error::config("memory", s, reason))?
        .as_u64();
    if bytes < MIN_BUDGET_BYTES {
        return Err(crate::Error::config("memory", s, reason));
    }
    Ok(bytes)
}

/// The method line of a plan.
pub const BUDGET_METHOD: &str = "characteristic time (Che, Tung and Wang, IEEE JSAC 2002; Fricker, Robert and \
Roberts, ITC 2012) over each pattern's SHARDS byte curve and reuse times, hit ratios corrected for Redis's eviction \
(MiniSim; the occupancies are LRU's, also under allkeys-lfu); whitelist by backward elimination over at most 64 \
patterns, those saving the most alone";

/// One pattern's occupancy and hit ratio at each characteristic time of the grid.
struct Table {
    /// Bytes occupied at `times[k]`.
    bytes: Vec<f64>,
}

fn time_at(k: usize) -> f64 {
    T_MIN * (T_MAX / T_MIN).powf(k as f64 / (TIMES - 1) as f64)
}

impl Table {
    /// `rate`: the pattern's accesses per second.
    fn new(curve: &Curve, rate: f64) -> Self {
        let total = curve.reuse_accesses.total();
        let max = curve.max_hit_ratio();
        // The size holding every reuse: the end of the byte histogram (`bytes_for(max)` can miss it by rounding).
        let top = curve.bytes.extent().map_or(0.0, |(_, hi)| hi);
        let bytes = (0..TIMES)
            .map(|k| {
                if total <= 0.0 || max <= 0.0 {
                    return 0.0;
                }
                let share = (curve.reuse_accesses.below(time_at(k) * rate) / total).clamp(0.0, 1.0);
                if share >= 1.0 {
                    return top;
                }
                curve.bytes_for(max * share).unwrap_or(top).min(top)
            })
            .collect();
        Table { bytes }
    }
}

/// The characteristic time (grid position, fractional) at which patterns `set` fill `budget`; `None` when they
/// fit whole.
fn fill(tables: &[Table], set: &[usize], budget: f64) -> Option<f64> {
    let at = |k: usize| set.iter().map(|&i| tables[i].bytes[k]).sum::<f64>();
    if at(TIMES - 1) <= budget {
        return None;
    }
    let mut prev = 0.0;
    for k in 0..TIMES {
        let b = at(k);
        if b > budget {
            if k == 0 {
                // Full before the shortest time of the grid: between no time (no bytes) and it.
                return Some(budget / b - 1.0);
            }
            let t = if b > prev {
                (budget - prev) / (b - prev)
            } else {
                0.0
            };
            return Some((k - 1) as f64 + t);
        }
        prev = b;
    }
    None
}

/// Bytes pattern `i` occupies at fractional grid position `pos` (`None`: all it ever needs).
fn occupancy(table: &Table, pos: Option<f64>) -> f64 {
    match pos {
        None => table.bytes[TIMES - 1],
        Some(p) if p < 0.0 => table.bytes[0] * (p + 1.0),
        Some(p) => {
            let k = (p.floor() as usize).min(TIMES - 1);
            let next = (k + 1).min(TIMES - 1);
            let t = p - k as f64;
            table.bytes[k] + (table.bytes[next] - table.bytes[k]) * t
        }
    }
}

/// Origin seconds saved per second by `set` sharing `budget`, and each member's (bytes, hit ratio).
fn evaluate(
    inputs: &[BudgetInput<'_>],
    tables: &[Table],
    set: &[usize],
    budget: f64,
    eviction: RedisEviction,
) -> (f64, Option<f64>, Vec<(f64, f64)>) {
    let pos = fill(tables, set, budget);
    let mut saved = 0.0;
    let parts = set
        .iter()
        .map(|&i| {
            let bytes = occupancy(&tables[i], pos);
            let h = inputs[i]
                .curve
                .hit_ratio_at_bytes_for(Some(eviction), bytes);
            saved += h * inputs[i].gets_per_second * inputs[i].loader_seconds;
            (bytes, h)
        })
        .collect();
    (saved, pos, parts)
}

/// Every pattern of `inputs` sharing `budget` bytes (`None`: no limit): the bytes each occupies and its predicted
/// hit ratio under `eviction`, in the order of `inputs`.
pub(crate) fn split(
    inputs: &[BudgetInput<'_>],
    budget: Option<u64>,
    eviction: RedisEviction,
) -> Vec<(f64, f64)> {
    let tables: Vec<Table> = inputs
        .iter()
        .map(|p| Table::new(p.curve, p.accesses_per_second))
        .collect();
    match budget {
        Some(b) => {
            let set: Vec<usize> = (0..inputs.len()).collect();
            evaluate(inputs, &tables, &set, b as f64, eviction).2
        }
        None => inputs
            .iter()
            .zip(&tables)
            .map(|(p, t)| (t.bytes[TIMES - 1], p.curve.max_hit_ratio()))
            .collect(),
    }
}

/// Splits `budget` bytes across the patterns of `inputs` (see the module's documentation).
pub(crate) fn plan(inputs: &[BudgetInput<'_>], budget: u64, eviction: RedisEviction) -> BudgetPlan {
    let tables: Vec<Table> = inputs
        .iter()
        .map(|p| Table::new(p.curve, p.accesses_per_second))
        .collect();
    let b = budget as f64;
    let mut set: Vec<usize> = (0..inputs.len()).filter(|&i| inputs[i].eligible).collect();
    // Past the bound, the patterns saving the most alone with the whole budget.
    let alone = |i: usize| {
        let p = &inputs[i];
        p.curve.hit_ratio_at_bytes_for(Some(eviction), b) * p.gets_per_second * p.loader_seconds
    };
    let mut unplanned = std::collections::BTreeSet::new();
    if set.len() > MAX_PLANNED_PATTERNS {
        let mut ranked: Vec<(f64, usize)> = set.iter().map(|&i| (alone(i), i)).collect();
        ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        unplanned.extend(
            ranked
                .split_off(MAX_PLANNED_PATTERNS)
                .into_iter()
                .map(|(_, i)| i),
        );
        set = ranked.into_iter().map(|(_, i)| i).collect();
        set.sort_unstable();
    }
    let mut dropped: BTreeMap<usize, f64> = BTreeMap::new();
    loop {
        let (now, _, _) = evaluate(inputs, &tables, &set, b, eviction);
        let best = (0..set.len())
            .map(|j| {
                let mut without = set.clone();
                without.remove(j);
                (j, evaluate(inputs, &tables, &without, b, eviction).0 - now)
            })
            .max_by(|x, y| x.1.total_cmp(&y.1));
        match best {
            Some((j, gain)) if gain > 0.0 => {
                dropped.insert(set[j], gain);
                set.remove(j);
            }
            _ => break,
        }
    }
    // A pattern whose part is smaller than its uncertainty is withheld (not served); the others then share the
    // budget without it.
    let (saved, _, parts) = evaluate(inputs, &tables, &set, b, eviction);
    let mut withheld: BTreeMap<usize, String> = BTreeMap::new();
    for (j, &i) in set.iter().enumerate() {
        let p = &inputs[i];
        let (bytes, h) = parts[j];
        let uncertainty = p.curve.uncertainty_at_bytes(Some(eviction), bytes);
        let mut without = set.clone();
        without.remove(j);
        let gain = saved - evaluate(inputs, &tables, &without, b, eviction).0;
        let unsure = uncertainty * p.gets_per_second * p.loader_seconds;
        if gain <= unsure {
            withheld.insert(
                i,
                format!(
                    "withheld: serving it would save {gain:.3} s of origin time per second more than not, no more \
                     than its uncertainty ({unsure:.3} s: hit ratio {:.1}% ± {:.1}%); observe longer",
                    h * 100.0,
                    uncertainty * 100.0
                ),
            );
        }
    }
    set.retain(|i| !withheld.contains_key(i));
    let (saved, pos, parts) = evaluate(inputs, &tables, &set, b, eviction);
    let mut patterns = BTreeMap::new();
    let (mut hits, mut gets) = (0.0, 0.0);
    let mut whitelist = Vec::new();
    for (i, p) in inputs.iter().enumerate() {
        let share = if let Some(j) = set.iter().position(|&s| s == i) {
            let (bytes, h) = parts[j];
            let uncertainty = p.curve.uncertainty_at_bytes(Some(eviction), bytes);
            let own = h * p.gets_per_second * p.loader_seconds;
            hits += h * p.gets_per_second;
            gets += p.gets_per_second;
            whitelist.push(p.name.to_string());
            BudgetShare {
                served: true,
                memory_bytes: bytes as u64,
                hit_ratio: round5(h),
                uncertainty,
                origin_seconds_saved_per_second: own,
                ttl_secs: p.ttl_secs,
                reason: format!(
                    "served: {:.1}% ± {:.1}% of its gets would hit in its {} of the budget, saving {:.3} s of \
                     origin time per second",
                    h * 100.0,
                    uncertainty * 100.0,
                    super::report::human_bytes(bytes as u64),
                    own
                ),
            }
        } else {
            let reason = match (withheld.remove(&i), dropped.get(&i)) {
                (Some(why), _) => why,
                (None, None) if unplanned.contains(&i) => format!(
                    "left out: with more than {MAX_PLANNED_PATTERNS} eligible patterns only the \
                     {MAX_PLANNED_PATTERNS} saving the most alone with the whole budget are weighed, and it is not \
                     among them ({:.3} s of origin time per second alone)",
                    alone(i)
                ),
                (None, Some(gain)) => format!(
                    "left out: the others save {gain:.3} s of origin time per second more with its memory"
                ),
                (None, None) => "left out: not recommended on its own (see its reasons)".to_string(),
            };
            BudgetShare {
                served: false,
                memory_bytes: 0,
                hit_ratio: 0.0,
                uncertainty: 0.0,
                origin_seconds_saved_per_second: 0.0,
                ttl_secs: p.ttl_secs,
                reason,
            }
        };
        patterns.insert(p.name.to_string(), share);
    }
    BudgetPlan {
        memory_bytes: budget,
        eviction,
        method: BUDGET_METHOD.to_string(),
        characteristic_time_secs: pos.map(|p| {
            if p < 0.0 {
                return time_at(0) * (p + 1.0);
            }
            let k = (p.floor() as usize).min(TIMES - 1);
            let t = p - k as f64;
            let (a, z) = (time_at(k).ln(), time_at((k + 1).min(TIMES - 1)).ln());
            ((a + (z - a) * t).exp() * 1e3).round() / 1e3
        }),
        hit_ratio: round5(if gets > 0.0 { hits / gets } else { 0.0 }),
        origin_seconds_saved_per_second: saved,
        patterns,
        whitelist,
    }
}

fn round5(x: f64) -> f64 {
    (x * 1e5).round() / 1e5
}

impl BudgetPlan {
    /// A plain-text rendering: the budget, then one row per pattern (served first), then the whitelist.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "memory budget {} ({}): hit ratio {:.1}% of the served patterns' gets, {:.3} s of origin time saved per \
             second{}",
            super::report::human_bytes(self.memory_bytes),
            self.eviction,
            self.hit_ratio * 100.0,
            self.origin_seconds_saved_per_second,
            self.characteristic_time_secs
                .map_or_else(String::new, |t| format!(", entries evicted about {t:.1} s after their last access"))
        );
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>10} {:>16} {:>10}  why",
            "key_pattern", "served", "memory", "hit ratio", "saved s/s"
        );
        let mut rows: Vec<(&String, &BudgetShare)> = self.patterns.iter().collect();
        rows.sort_by_key(|(_, s)| !s.served);
        for (name, s) in rows {
            let _ = writeln!(
                out,
                "{:<24} {:>7} {:>10} {:>16} {:>10.3}  {}",
                name,
                if s.served { "yes" } else { "no" },
                super::report::human_bytes(s.memory_bytes),
                if s.served {
                    format!(
                        "{:.1}% ± {:.1}%",
                        s.hit_ratio * 100.0,
                        s.uncertainty * 100.0
                    )
                } else {
                    "–".to_string()
                },
                s.origin_seconds_saved_per_second,
                s.reason
            );
        }
        let _ = writeln!(out, "whitelist: {:?}", self.whitelist);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Access, Shards};

    /// A pattern of `keys` keys of `bytes` each, read round-robin `rounds` times, and its curve.
    fn looped(keys: u64, bytes: u32, rounds: u64, salt: u64) -> Curve {
        let s = Shards::with_max_rate(100_000, 1.0);
        for i in 0..keys * rounds {
            let h = ((i % keys) + salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            s.access(h, Access::Get, i, Some(bytes), None, 0);
        }
        s.curve(keys * rounds).0
    }

    fn input<'a>(name: &'a str, curve: &'a Curve, rate: f64, eligible: bool) -> BudgetInput<'a> {
        BudgetInput {
            name,
            curve,
            gets_per_second: rate,
            accesses_per_second: rate,
            loader_seconds: 0.01,
            eligible,
            ttl_secs: Some(60),
        }
    }

    #[test]
    fn a_budget_that_holds_everything_serves_every_eligible_pattern_whole() {
        let a = looped(100, 1000, 20, 0);
        let b = looped(50, 1000, 20, 1_000_000);
        let inputs = [input("a", &a, 100.0, true), input("b", &b, 50.0, true)];
        let plan = plan(&inputs, 1 << 30, RedisEviction::default());
        assert_eq!(plan.whitelist, ["a", "b"]);
        assert_eq!(plan.characteristic_time_secs, None);
        assert!((plan.patterns["a"].hit_ratio - a.max_hit_ratio()).abs() < 1e-4);
        assert!(plan.patterns["a"].memory_bytes >= 100 * 1000);
    }

    #[test]
    fn a_tight_budget_is_shared_within_it_and_nothing_eligible_serves_nothing() {
        let a = looped(400, 1000, 20, 0);
        let b = looped(400, 1000, 20, 1_000_000);
        let inputs = [input("a", &a, 100.0, true), input("b", &b, 100.0, true)];
        let budget = 300 * 1000;
        let shares = split(&inputs, Some(budget), RedisEviction::default());
        let total: f64 = shares.iter().map(|(bytes, _)| bytes).sum();
        assert!(total <= budget as f64 * 1.01, "{total}");
        // Two identical patterns at the same rate share it evenly.
        assert!(
            (shares[0].0 - shares[1].0).abs() < budget as f64 * 0.1,
            "{shares:?}"
        );
        let none = [input("a", &a, 100.0, false)];
        let plan = plan(&none, budget, RedisEviction::default());
        assert!(plan.whitelist.is_empty());
        assert!(!plan.patterns["a"].served);
        assert!(plan.patterns["a"].reason.starts_with("left out"));
    }

    #[test]
    fn a_plan_weighs_at_most_its_bound_of_patterns() {
        // 100 eligible patterns, the same curve at rates 1..=100: the 64 busiest are weighed, the rest left out
        // with the reason.
        let c = looped(200, 1000, 20, 0);
        let names: Vec<String> = (1..=100).map(|i| format!("p{i:03}")).collect();
        let inputs: Vec<BudgetInput<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| input(n, &c, (i + 1) as f64, true))
            .collect();
        let plan = plan(&inputs, 1 << 30, RedisEviction::default());
        assert_eq!(plan.whitelist.len(), MAX_PLANNED_PATTERNS);
        assert!(plan.patterns["p100"].served && plan.patterns["p037"].served);
        let out = &plan.patterns["p036"];
        assert!(!out.served);
        assert!(
            out.reason.contains("only the 64 saving the most"),
            "{}",
            out.reason
        );
    }

    #[test]
    fn parse_memory_takes_the_units_people_write() {
        assert_eq!(parse_memory("512MiB").expect("size"), 512 << 20);
        assert_eq!(parse_memory(" 1.5 GiB ").expect("size"), 3 << 29);
        assert!(parse_memory("").is_err());
        assert!(parse_memory("-1GiB").is_err());
    }
}
