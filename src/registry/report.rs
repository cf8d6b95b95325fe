//! The phase-2 report and the predicted hit ratios, from the estimators.

use super::*;

impl CacheRegistry {
    /// The phase-2 analysis (`GET /internal/cache/report`): per-pattern and shared miss ratio curves, memory,
    /// origin time saved, route × pattern, and the recommendation. Empty predictions when the analysis is disabled.
    pub fn report(&self) -> analysis::Report {
        self.report_for(None)
    }

    /// The report with `memory_bytes` of Redis split across the patterns ([`analysis::BudgetPlan`], the `budget`
    /// field): which patterns to serve so as to save the most origin time, each one's memory share and hit ratio;
    /// the recommendation applies that split.
    pub fn report_for_memory(&self, memory_bytes: u64) -> analysis::Report {
        self.report_for(Some(memory_bytes))
    }

    fn report_for(&self, memory_bytes: Option<u64>) -> analysis::Report {
        use prometheus::core::Metric as _;
        let s = self.inner.active.load_full();
        let (capacities, overhead, ignore_ttl, curve_points) = match &self.inner.analysis {
            Some(a) => (
                a.opts.capacities.clone(),
                a.opts.per_key_overhead_bytes,
                a.opts.ignore_ttl,
                a.opts.curve_points,
            ),
            None => {
                let d = AnalysisOptions::default();
                (
                    d.capacities,
                    d.per_key_overhead_bytes,
                    false,
                    d.curve_points,
                )
            }
        };
        let observed_seconds = self.observed_seconds();
        let mut names: Vec<(&str, usize)> = s.patterns.iter().map(|(n, &i)| (&**n, i)).collect();
        names.sort_unstable_by_key(|&(_, i)| i);
        let mut total_gets = 0;
        let (mut loader_secs, mut loader_calls) = (0.0, 0u64);
        let patterns: Vec<_> = names
            .iter()
            .map(|&(name, i)| {
                let e = self.slot(i);
                let counts = e.metrics.counts();
                total_gets += counts.gets;
                let loader = e.metrics.loader_proto();
                loader_secs += loader.get_sample_sum();
                loader_calls += loader.get_sample_count();
                analysis::PatternInput {
                    name: name.to_string(),
                    gets: counts.gets,
                    hits: counts.hits,
                    writes: counts.writes,
                    deletes: counts.deletes,
                    served: s.routed(name),
                    ttl_secs: (!ignore_ttl).then(|| s.ttl(name).as_secs()),
                    policy_ttl_secs: s.ttl(name).as_secs(),
                    loader,
                    value_size: e.metrics.value_size.metric().get_histogram().clone(),
                    curve: e.shards.as_ref().map(|sh| sh.curve(counts.gets)),
                    loader_errors: counts.loader_errors,
                    absent: counts.absent,
                    age_seconds: self.age_seconds(e.born),
                }
            })
            .collect();
        let mean_loader = if loader_calls > 0 {
            loader_secs / loader_calls as f64
        } else {
            0.0
        };
        let shared = self.inner.analysis.as_ref().map(|a| {
            let (curve, stats) = a.shared.curve(total_gets);
            analysis::shared_report(
                total_gets,
                &curve,
                &stats,
                &capacities,
                observed_seconds,
                mean_loader,
                curve_points,
            )
        });
        let whitelisted = s.whitelisted.as_ref().map(|w| {
            let gets = w.gets.load(Ordering::Relaxed);
            let (curve, stats) = w.shards.curve(gets);
            let since = self
                .inner
                .clock
                .delta_as_nanos(w.since, self.inner.clock.raw()) as f64
                * 1e-9;
            analysis::shared_report(
                gets,
                &curve,
                &stats,
                &capacities,
                since,
                mean_loader,
                curve_points,
            )
        });
        let tags: HashMap<u32, &str> = names.iter().map(|&(n, i)| (i as u32, n)).collect();
        let routes = self
            .inner
            .metrics
            .routes()
            .into_iter()
            .map(|(route, method, m)| analysis::RouteInput {
                method,
                route,
                requests: m.requests.get(),
                seconds: m.duration.get_sample_sum(),
                calls: m
                    .calls
                    .snapshot()
                    .into_iter()
                    .map(|(t, n, ns)| (tags.get(&t).map_or(OTHER, |n| *n).to_string(), n, ns))
                    .collect(),
            })
            .collect();
        let mut report = analysis::build(
            analysis::ReportContext {
                capacities: &capacities,
                per_key_overhead_bytes: overhead,
                observed_seconds,
                generated_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                curve_points,
                eviction: self.eviction(),
                memory_bytes,
            },
            patterns,
            shared,
            whitelisted,
            routes,
        );
        for (name, measured, predicted) in self.served_hit_ratios() {
            if let Some(p) = report.patterns.get_mut(&name) {
                p.served_hit_ratio = Some(measured);
                p.served_memory_bytes = predicted.map(|(bytes, _)| bytes);
                p.served_predicted_hit_ratio = predicted.map(|(_, h)| h);
            }
        }
        report
    }

    /// Predicted hit ratio of every pattern together in one LRU cache of `bytes` bytes (keys, values and the
    /// per-key overhead counted); `None` when the analysis is disabled.
    pub fn predicted_hit_ratio_at_bytes(&self, bytes: u64) -> Option<f64> {
        self.predict_at_bytes(bytes).map(|p| p.lru_hit_ratio)
    }

    /// What every pattern together would get from one Redis of `bytes` bytes of memory for entries (keys, values
    /// and the per-key overhead counted): the hit ratio under the eviction the estimators simulate, exact LRU's,
    /// and the uncertainty. `None` when the analysis is disabled.
    pub fn predict_at_bytes(&self, bytes: u64) -> Option<analysis::MemoryPrediction> {
        let a = self.inner.analysis.as_ref()?;
        let s = self.inner.active.load();
        let gets = s
            .patterns
            .values()
            .map(|&i| self.slot(i).metrics.counts().gets)
            .sum();
        let curve = a.shared.curve(gets).0;
        let eviction = curve.simulated_eviction();
        Some(analysis::MemoryPrediction {
            memory_bytes: bytes,
            eviction: eviction.unwrap_or_default(),
            hit_ratio: curve.hit_ratio_at_bytes_for(eviction, bytes as f64),
            lru_hit_ratio: curve.hit_ratio_at_bytes(bytes as f64),
            uncertainty: curve.uncertainty_at_bytes(eviction, bytes as f64),
        })
    }

    /// The Redis eviction the estimators simulate (configured, read from Redis, or `allkeys-lru` with 5 samples);
    /// `None` when the analysis is disabled.
    pub fn eviction(&self) -> Option<RedisEviction> {
        self.inner.analysis.as_ref().map(|a| a.eviction())
    }

    /// Simulates `eviction` from now on in every estimator (their miniatures start afresh when it changes).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn set_eviction(&self, eviction: RedisEviction) {
        let Some(a) = self.inner.analysis.as_ref() else {
            return;
        };
        {
            let mut e = a.eviction.lock().unwrap_or_else(PoisonError::into_inner);
            if *e == eviction {
                return;
            }
            *e = eviction;
        }
        a.shared.set_eviction(eviction);
        for slot in self.inner.slots.iter() {
            if let Some(entry) = slot.get() {
                if let Some(s) = &entry.shards {
                    s.set_eviction(eviction);
                }
            }
        }
        if let Some(w) = &self.inner.active.load().whitelisted {
            w.shards.set_eviction(eviction);
        }
    }

    /// Seconds since raw clock reading `born`, on the registry's clock.
    pub(super) fn age_seconds(&self, born: u64) -> f64 {
        self.inner
            .clock
            .delta_as_nanos(born, self.inner.clock.raw()) as f64
            * 1e-9
    }

    /// Seconds since the registry started, on its clock.
    pub(super) fn observed_seconds(&self) -> f64 {
        let epoch = self
            .inner
            .analysis
            .as_ref()
            .map_or(self.inner.started, |a| a.epoch);
        self.inner
            .clock
            .delta_as_nanos(epoch, self.inner.clock.raw()) as f64
            * 1e-9
    }

    /// For each fully served pattern with an estimator and a get since it became so: (pattern, measured hit ratio
    /// since then, (bytes it occupies, predicted hit ratio) for the memory it shares with the other patterns that
    /// store in Redis). The prediction is `None` until that memory is known (`cache.analysis.redis_memory_bytes`,
    /// or read from Redis).
    pub(crate) fn served_hit_ratios(&self) -> Vec<ServedRow> {
        let Some(a) = &self.inner.analysis else {
            return Vec::new();
        };
        let Some(w) = self.inner.active.load().whitelisted.clone() else {
            return Vec::new();
        };
        // Every pattern that stores in Redis shares its memory (shadow and ramped ones too); only the fully served
        // ones are checked (in shadow mode, a ramp or a rollback some gets are not served: the A/B arms compare
        // those). `measured` is `None` for the others.
        let mut measured: Vec<Option<(String, f64)>> = Vec::new();
        let mut curves = Vec::new();
        {
            let mut baselines = w.baseline.lock().unwrap_or_else(PoisonError::into_inner);
            // Read under the lock, so that a switch's rebase cannot be undone by this reading.
            let s = self.inner.active.load_full();
            if !s.whitelisted.as_ref().is_some_and(|now| Arc::ptr_eq(now, &w))
                // The prediction is of a Redis: an in-process cache is not checked against it.
                || s.policy.cache_impl != CacheImpl::Redis
            {
                return Vec::new();
            }
            self.rebase_locked(&mut baselines, &s, &s);
            for (name, &i) in s.patterns.iter() {
                if !s.routed(name) {
                    continue;
                }
                let e = self.slot(i);
                let Some(sh) = &e.shards else { continue };
                let c = e.metrics.counts();
                let m = baselines
                    .get(&**name)
                    .filter(|b| b.full && c.gets > b.gets)
                    .map(|b| c.hits.saturating_sub(b.hits) as f64 / (c.gets - b.gets) as f64);
                measured.push(m.map(|m| (name.to_string(), m)));
                curves.push((
                    name.to_string(),
                    sh.curve(c.gets).0,
                    c.gets,
                    c.writes,
                    self.age_seconds(e.born),
                ));
            }
        }
        let memory = match a.opts.redis_memory_bytes {
            Some(b) => Some(Some(b)),
            None => *a
                .redis_entry_bytes
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        };
        let predicted: Vec<Option<(u64, f64)>> = match memory {
            None => vec![None; curves.len()],
            Some(budget) => {
                let inputs: Vec<analysis::BudgetInput<'_>> = curves
                    .iter()
                    .map(|(name, curve, gets, writes, age)| analysis::BudgetInput {
                        name,
                        curve,
                        gets_per_second: *gets as f64 / age.max(1e-9),
                        accesses_per_second: (gets + writes) as f64 / age.max(1e-9),
                        loader_seconds: 1.0,
                        eligible: true,
                        ttl_secs: None,
                    })
                    .collect();
                analysis::split_budget(&inputs, budget, a.eviction())
                    .into_iter()
                    .map(|(bytes, h)| Some((bytes.round() as u64, h)))
                    .collect()
            }
        };
        measured
            .into_iter()
            .zip(predicted)
            .filter_map(|(m, p)| m.map(|(n, m)| (n, m, p)))
            .collect()
    }

    /// Restarts the served hit ratio of every pattern whose fully-served state changed since its baseline was read.
    /// `prev` is the state just replaced (at a reading, the current one): a pattern first seen since the whitelist
    /// was served lived under it, so it starts at 0 with `prev`'s state. Called after every switch and rollback
    /// step (under the breakers' lock) and at every reading, so the figure counts only gets served throughout.
    pub(super) fn rebase_served(&self, prev: &super::Active) {
        let Some(w) = self.inner.active.load().whitelisted.clone() else {
            return;
        };
        let mut baselines = w.baseline.lock().unwrap_or_else(PoisonError::into_inner);
        let s = self.inner.active.load();
        if s.whitelisted
            .as_ref()
            .is_some_and(|now| Arc::ptr_eq(now, &w))
        {
            self.rebase_locked(&mut baselines, prev, &s);
        }
    }

    fn rebase_locked(
        &self,
        baselines: &mut HashMap<String, super::active::ServedBaseline>,
        prev: &super::Active,
        s: &super::Active,
    ) {
        for (name, &i) in s.patterns.iter() {
            let full = s.fully_served(name);
            let b = match baselines.get_mut(&**name) {
                Some(b) => b,
                None => {
                    baselines
                        .entry(name.to_string())
                        .or_insert(super::active::ServedBaseline {
                            gets: 0,
                            hits: 0,
                            full: prev.fully_served(name),
                        })
                }
            };
            if b.full != full {
                let c = self.slot(i).metrics.counts();
                *b = super::active::ServedBaseline {
                    gets: c.gets,
                    hits: c.hits,
                    full,
                };
            }
        }
    }

    /// Predicted hit ratios at the configured capacities, per pattern with an estimator and for all patterns
    /// together (`key_pattern="*"`), for the `cache_predicted_hit_ratio` gauge: (pattern, capacity, ratio).
    pub(crate) fn predicted_hit_ratios(&self) -> Vec<(String, u64, f64)> {
        let Some(a) = &self.inner.analysis else {
            return Vec::new();
        };
        let s = self.inner.active.load();
        let mut out = Vec::new();
        let mut total = 0;
        for (name, &i) in s.patterns.iter() {
            let e = self.slot(i);
            let gets = e.metrics.counts().gets;
            total += gets;
            if let Some(sh) = &e.shards {
                let (curve, _) = sh.curve(gets);
                for &c in &a.opts.capacities {
                    out.push((name.to_string(), c, curve.hit_ratio_at_objects(c as f64)));
                }
            }
        }
        let (curve, _) = a.shared.curve(total);
        for &c in &a.opts.capacities {
            out.push(("*".to_string(), c, curve.hit_ratio_at_objects(c as f64)));
        }
        out
    }
}

/// A fully served pattern's row: its name, the hit ratio measured since it became so, and (the bytes it occupies,
/// the hit ratio predicted there).
pub(crate) type ServedRow = (String, f64, Option<(u64, f64)>);

/// `cache_served_hit_ratio{key_pattern}` and `cache_served_predicted_hit_ratio{key_pattern}`: for every served
/// pattern, the hit ratio measured since it was last fully served and the one predicted for the memory it has, computed at
/// scrape time (the check of the prediction after the switch).
pub(super) struct ServedHitRatio {
    pub(super) registry: std::sync::Weak<Inner>,
    pub(super) measured: prometheus::core::Desc,
    pub(super) predicted: prometheus::core::Desc,
}

impl ServedHitRatio {
    pub(super) fn new(registry: std::sync::Weak<Inner>) -> Self {
        let desc = |name: &str, help: &str| {
            prometheus::core::Desc::new(
                name.into(),
                help.into(),
                vec!["key_pattern".into()],
                HashMap::new(),
            )
            .expect("valid gauge description")
        };
        ServedHitRatio {
            registry,
            measured: desc(
                "cache_served_hit_ratio",
                "Hit ratio (0-1) of a fully served key pattern's gets since it was last fully served.",
            ),
            predicted: desc(
                "cache_served_predicted_hit_ratio",
                "Predicted hit ratio (0-1) of a fully served key pattern for the Redis memory it shares with the \
                 other patterns stored there, under Redis's eviction.",
            ),
        }
    }
}

/// One gauge family of `(key_pattern, value)` rows.
fn gauge_family(
    desc: &prometheus::core::Desc,
    rows: impl Iterator<Item = (String, f64)>,
) -> prometheus::proto::MetricFamily {
    use prometheus::proto;
    let metrics = rows
        .map(|(pattern, v)| {
            let mut m = proto::Metric::default();
            let mut l = proto::LabelPair::default();
            l.set_name("key_pattern".to_string());
            l.set_value(pattern);
            m.set_label(vec![l]);
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
            m
        })
        .collect();
    let mut family = proto::MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(proto::MetricType::GAUGE);
    family.set_metric(metrics);
    family
}

impl prometheus::core::Collector for ServedHitRatio {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.measured, &self.predicted]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(inner) = self.registry.upgrade() else {
            return Vec::new();
        };
        let rows = CacheRegistry { inner }.served_hit_ratios();
        vec![
            gauge_family(&self.measured, rows.iter().map(|(n, m, _)| (n.clone(), *m))),
            gauge_family(
                &self.predicted,
                rows.iter()
                    .filter_map(|(n, _, p)| p.map(|(_, h)| (n.clone(), h))),
            ),
        ]
    }
}

/// `cache_predicted_hit_ratio{key_pattern,capacity}`: the estimators' predictions at the configured capacities,
/// computed at scrape time. `key_pattern` is a pattern with its own estimator (at most `analysis.max_patterns`) or
/// `*` for all patterns in one cache; `capacity` one of the (at most 8) configured capacities, in objects.
pub(super) struct PredictedHitRatio {
    pub(super) registry: std::sync::Weak<Inner>,
    pub(super) desc: prometheus::core::Desc,
}

impl PredictedHitRatio {
    pub(super) fn new(registry: std::sync::Weak<Inner>) -> Self {
        let desc = prometheus::core::Desc::new(
            "cache_predicted_hit_ratio".into(),
            "Predicted LRU hit ratio (0-1) of a cache of `capacity` objects, per key pattern (`*`: all patterns in \
             one cache), from the SHARDS miss ratio curve."
                .into(),
            vec!["key_pattern".into(), "capacity".into()],
            HashMap::new(),
        )
        .expect("valid gauge description");
        PredictedHitRatio { registry, desc }
    }
}

impl prometheus::core::Collector for PredictedHitRatio {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let Some(inner) = self.registry.upgrade() else {
            return Vec::new();
        };
        let registry = CacheRegistry { inner };
        let metrics = registry
            .predicted_hit_ratios()
            .into_iter()
            .map(|(pattern, capacity, ratio)| {
                let mut m = proto::Metric::default();
                let mut labels = Vec::with_capacity(2);
                for (n, v) in [("capacity", capacity.to_string()), ("key_pattern", pattern)] {
                    let mut l = proto::LabelPair::default();
                    l.set_name(n.to_string());
                    l.set_value(v);
                    labels.push(l);
                }
                m.set_label(labels);
                let mut g = proto::Gauge::default();
                g.set_value(ratio);
                m.set_gauge(g);
                m
            })
            .collect();
        let mut family = proto::MetricFamily::default();
        family.set_name("cache_predicted_hit_ratio".into());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::GAUGE);
        family.set_metric(metrics);
        vec![family]
    }
}
