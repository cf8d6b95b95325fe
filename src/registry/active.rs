//! The active state every call loads once (policy, backend, routes, TTLs), and how a pattern's route is built
//! from its settings and its breaker.

use super::*;

/// The state every call loads once: policy, backend, and the pattern table (kept here so that one `ArcSwap` load
/// serves a whole call).
#[derive(Clone)]
pub(super) struct Active {
    pub(super) policy: Policy,
    pub(super) backend: Arc<dyn Cache>,
    /// `!backend.always_misses()`, asked once instead of through a virtual call per request.
    pub(super) stores: bool,
    /// Routes of the patterns that are whitelisted by name, configured or rolled back; under `*`, the other
    /// patterns take `default_route`.
    pub(super) routes: HashMap<String, Route>,
    pub(super) default_route: Route,
    pub(super) redis: RedisOptions,
    pub(super) whitelist: HashSet<String>,
    pub(super) serves_all: bool,
    pub(super) ttls: HashMap<String, Duration>,
    pub(super) default_ttl: Duration,
    pub(super) version: u64,
    pub(super) patterns: Arc<PatternMap>,
    /// The estimator of the whitelisted patterns together, while a storing impl serves a whitelist.
    pub(super) whitelisted: Option<Arc<WhitelistShards>>,
    /// While the impl is not Redis: the Redis an earlier state of this process served from, which other
    /// instances may still serve from (a fleet switching one instance at a time, a rollback of this instance
    /// alone). Invalidations and writes also delete there, so that none of them is lost to the others.
    pub(super) sink: Option<Arc<dyn Cache>>,
}

/// The miss ratio curve of the cache that serves the whitelist: every whitelisted pattern in one cache. Created when
/// a whitelist starts being served, kept while impl and whitelist stay the same.
pub(super) struct WhitelistShards {
    pub(super) shards: Shards,
    /// Gets of whitelisted patterns since it was created.
    pub(super) gets: std::sync::atomic::AtomicU64,
    /// Raw clock reading when it was created.
    pub(super) since: u64,
    /// Per pattern, the (gets, hits) its served hit ratio counts from, and whether it was fully served then (serve
    /// mode, every key, no breaker). Restarted when that changes ([`CacheRegistry::rebase_served`]): a shadow
    /// period, a ramp's unramped keys or a rollback would otherwise dilute the figure checked against the
    /// prediction.
    pub(super) baseline: std::sync::Mutex<HashMap<String, ServedBaseline>>,
}

/// Where a pattern's served hit ratio counts from.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServedBaseline {
    pub(super) gets: u64,
    pub(super) hits: u64,
    /// Whether the pattern was fully served when these were read.
    pub(super) full: bool,
}

/// The route of a pattern with settings `pp`, whitelisted or not, under its breaker.
pub(super) fn build_route(
    policy: &Policy,
    pp: Option<&PatternPolicy>,
    whitelisted: bool,
    breaker: Option<&Breaker>,
) -> Route {
    let star = policy.patterns.get("*");
    let pp = pp.map_or_else(|| star.cloned().unwrap_or_default(), |own| own.or(star));
    let pp = &pp;
    let rules = &policy.rollback;
    let mut percent = pp.ramp_percent.unwrap_or(100.0);
    let mut mode = if whitelisted {
        pp.mode.unwrap_or_default()
    } else {
        Mode::Observe
    };
    let mut probe = None;
    match breaker {
        Some(b) if b.state == BreakerState::Open => mode = Mode::Observe,
        Some(b) => {
            percent *= rules.probe_percent / 100.0;
            probe = Some(Arc::clone(&b.probe));
        }
        None => {}
    }
    Route {
        mode,
        ramp: rollout::ramp_threshold(percent),
        ttl: Duration::from_secs(pp.ttl_secs.unwrap_or(policy.default_ttl_secs)),
        read_timeout: Duration::from_millis(pp.read_timeout_ms.unwrap_or(policy.read_timeout_ms)),
        lease_ttl: Duration::from_millis(policy.lease_ttl_ms),
        lease_wait: Duration::from_millis(policy.lease_wait_ms),
        slow_nanos: (rules.max_p99_ms * 1e6) as u64,
        bucket_nanos: (rules.window_secs * 100_000_000).max(1),
        probe,
        probe_calls: rules.probe_calls,
        encoding: codec::Encoding {
            format: pp.format.unwrap_or_default(),
            compress_above: pp
                .compress_above_bytes
                .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
        },
        stale_if_error: Duration::from_secs(pp.stale_if_error_secs.unwrap_or(0)),
        stale_while_revalidate: Duration::from_secs(pp.stale_while_revalidate_secs.unwrap_or(0)),
        negative_ttl: pp.cache_negative_secs.map(Duration::from_secs),
    }
}

impl Active {
    pub(super) fn new(
        policy: Policy,
        backend: Arc<dyn Cache>,
        redis: RedisOptions,
        version: u64,
        patterns: Arc<PatternMap>,
        breakers: &BTreeMap<String, Breaker>,
    ) -> Self {
        let ttls = policy
            .patterns
            .iter()
            .filter_map(|(p, s)| s.ttl_secs.map(|t| (p.clone(), Duration::from_secs(t))))
            .collect();
        let whitelist: HashSet<String> = policy.whitelist.iter().cloned().collect();
        let serves_all = policy.serves_all();
        let (routes, default_route) = routes_of(&policy, &whitelist, serves_all, breakers);
        Active {
            stores: !backend.always_misses(),
            routes,
            default_route,
            whitelist,
            serves_all,
            default_ttl: Duration::from_secs(
                policy
                    .patterns
                    .get("*")
                    .and_then(|s| s.ttl_secs)
                    .unwrap_or(policy.default_ttl_secs),
            ),
            ttls,
            policy,
            backend,
            redis,
            version,
            patterns,
            whitelisted: None,
            sink: None,
        }
    }

    /// The route of a pattern in shadow or serve mode; `None`: observed.
    #[inline]
    pub(super) fn route(&self, pattern: &str) -> Option<&Route> {
        if !self.stores {
            return None;
        }
        match self.routes.get(pattern) {
            Some(r) => (r.mode != Mode::Observe).then_some(r),
            None => self.serves_all.then_some(&self.default_route),
        }
    }

    /// Whether the pattern's keys go to the backend (shadow or serve mode; writes of every key, reads of the
    /// ramped ones).
    pub(super) fn routed(&self, pattern: &str) -> bool {
        self.route(pattern).is_some()
    }

    /// Whether every key of the pattern is served from the cache now: serve mode, no ramp, no breaker probe.
    pub(super) fn fully_served(&self, pattern: &str) -> bool {
        self.route(pattern)
            .is_some_and(|r| r.mode == Mode::Serve && r.ramp.is_none() && r.probe.is_none())
    }

    pub(super) fn whitelisted(&self, pattern: &str) -> bool {
        self.serves_all || self.whitelist.contains(pattern)
    }

    /// This state with its routes rebuilt under `breakers`.
    pub(super) fn with_breakers(&self, breakers: &BTreeMap<String, Breaker>) -> Self {
        let (routes, default_route) =
            routes_of(&self.policy, &self.whitelist, self.serves_all, breakers);
        Active {
            routes,
            default_route,
            ..self.clone()
        }
    }

    pub(super) fn ttl(&self, pattern: &str) -> Duration {
        self.ttls.get(pattern).copied().unwrap_or(self.default_ttl)
    }
}

pub(super) fn routes_of(
    policy: &Policy,
    whitelist: &HashSet<String>,
    serves_all: bool,
    breakers: &BTreeMap<String, Breaker>,
) -> (HashMap<String, Route>, Route) {
    let listed = |p: &str| serves_all || whitelist.contains(p);
    let mut routes: HashMap<String, Route> = policy
        .patterns
        .iter()
        .map(|(p, pp)| {
            (
                p.clone(),
                build_route(policy, Some(pp), listed(p), breakers.get(p)),
            )
        })
        .collect();
    for (p, b) in breakers {
        routes
            .entry(p.clone())
            .or_insert_with(|| build_route(policy, None, listed(p), Some(b)));
    }
    // Listed patterns get their entry too, so a call finds its route in one lookup; under `*` the patterns not in
    // the map take the default route.
    for p in whitelist.iter().filter(|p| *p != "*") {
        routes
            .entry(p.clone())
            .or_insert_with(|| build_route(policy, None, true, None));
    }
    (routes, build_route(policy, None, true, None))
}
