//! Switching: one operation (`install`) that builds the next state and swaps it in, whatever asked for it.

use super::*;

/// The patterns of `policy` with an in-process L1, and their L1 TTLs in seconds.
#[cfg(feature = "redis")]
pub(super) fn l1_patterns(policy: &Policy) -> L1Patterns {
    policy
        .patterns
        .iter()
        .filter(|(p, _)| p.as_str() != "*")
        .filter_map(|(p, pp)| pp.l1_ttl_secs.map(|t| (p.clone(), t)))
        .collect()
}

/// What asked for a swap: recorded in the swap history (`GET /internal/cache` → `swaps[].source`) and in its log
/// event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SwapSource {
    /// The configuration at start-up.
    Startup,
    /// The start-up configuration again, retried every 5 s while its backend was unreachable.
    Retry,
    /// `PUT /internal/cache/config`.
    Api,
    /// SIGHUP: the configuration files were re-read.
    Sighup,
    /// The application, through [`CacheRegistry::switch`].
    Library,
    /// The fleet state (`docs/scaling.md`).
    Fleet,
    /// An automatic rollback, its half-open probe, or its recovery.
    Rollback,
}

impl SwapSource {
    /// The lowercase name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SwapSource::Startup => "startup",
            SwapSource::Retry => "retry",
            SwapSource::Api => "api",
            SwapSource::Sighup => "sighup",
            SwapSource::Library => "library",
            SwapSource::Fleet => "fleet",
            SwapSource::Rollback => "rollback",
        }
    }
}

/// What a swap installs, decided under the switch lock so concurrent switches never lose one another's change.
pub(super) enum Change {
    Update(PolicyUpdate),
    Replace(Policy, Option<RedisOptions>),
    /// The start-up policy again, unless someone switched since `if_version`.
    Retry(Policy, u64),
    /// A whole policy from the fleet state: like `Replace`, but only the breakers of patterns whose settings
    /// changed are closed (a change to one pattern must not put every rolled-back pattern back to serving).
    Fleet(Policy),
}

impl Change {
    /// The breakers a successful swap closes: those of the patterns it names (for a fleet policy, those whose
    /// settings changed from `cur`), or `None`: all of them (a full reload).
    fn closes(&self, cur: &Policy) -> Option<Vec<String>> {
        match self {
            Change::Update(u) => Some(
                u.patterns
                    .as_ref()
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default(),
            ),
            Change::Replace(..) => None,
            Change::Retry(..) => Some(Vec::new()),
            Change::Fleet(p) => Some(
                cur.patterns
                    .keys()
                    .chain(p.patterns.keys())
                    .filter(|k| cur.patterns.get(*k) != p.patterns.get(*k))
                    .cloned()
                    .collect(),
            ),
        }
    }

    /// The policy and Redis options to install over `cur`, validated; `None` for a start-up retry that someone
    /// else's switch has superseded.
    fn resolve(self, cur: &Active) -> Result<Option<(Policy, RedisOptions)>> {
        Ok(Some(match self {
            Change::Update(u) => (cur.policy.merged(&u)?, cur.redis.clone()),
            Change::Replace(p, r) => {
                p.validate()?;
                (p, r.unwrap_or_else(|| cur.redis.clone()))
            }
            Change::Retry(p, since) => {
                if cur.version != since {
                    return Ok(None);
                }
                (p, cur.redis.clone())
            }
            Change::Fleet(p) => {
                p.validate()?;
                (p, cur.redis.clone())
            }
        }))
    }
}

impl CacheRegistry {
    /// Installs a whole policy read from the fleet state (source `fleet`, reason `fleet version N`). Breakers stay
    /// open but for those of patterns whose settings changed.
    ///
    /// # Errors
    /// As [`switch`](Self::switch); the previous state stays.
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    pub(crate) async fn apply_fleet_policy(&self, policy: Policy, version: u64) -> Result<()> {
        self.install(
            Change::Fleet(policy),
            SwapSource::Fleet,
            Some(format!("fleet version {version}")),
        )
        .await
    }

    /// Applies `update` at runtime: builds (and for Redis, connects) the new backend first, flushes it if it was not
    /// active before, then swaps atomically. On failure the old state stays in place. Switches are serialized and
    /// each applies to the state left by the previous one; calls in progress are never failed.
    ///
    /// # Errors
    /// An invalid update ([`Error::Config`], [`Error::InvalidPattern`]); an unreachable Redis ([`Error::Redis`],
    /// [`Error::Timeout`]).
    pub async fn switch(&self, update: &PolicyUpdate) -> Result<StateView> {
        self.switch_from(update, SwapSource::Library).await
    }

    /// [`switch`](Self::switch) with another source recorded in the swap history.
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub(crate) async fn switch_from(
        &self,
        update: &PolicyUpdate,
        source: SwapSource,
    ) -> Result<StateView> {
        self.install(Change::Update(update.clone()), source, None)
            .await?;
        Ok(self.state().await)
    }

    /// Replaces the whole policy and the Redis options (SIGHUP: the configuration files were re-read).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub(crate) async fn reload(&self, policy: Policy, redis: RedisOptions) -> Result<StateView> {
        self.install(
            Change::Replace(policy, Some(redis)),
            SwapSource::Sighup,
            None,
        )
        .await?;
        Ok(self.state().await)
    }

    /// The one switching operation behind every source: builds the next state from `change` (connecting and
    /// flushing a newly active backend first), swaps it in atomically, and records the swap with `source` and
    /// `reason` (`None`: the source's name). On failure the state stays as it was.
    pub(super) async fn install(
        &self,
        change: Change,
        source: SwapSource,
        reason: Option<String>,
    ) -> Result<()> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let cur = self.inner.active.load_full();
        let closes = change.closes(&cur.policy);
        let Some((policy, redis)) = change.resolve(&cur)? else {
            return Ok(()); // a start-up retry, after someone else switched: their choice wins
        };
        super::check_policy_bounds(&policy, self.inner.max_patterns)?;
        let result = self.prepare(&cur, &policy, &redis).await;
        let version = cur.version + u64::from(result.is_ok());
        let record = SwapRecord {
            at: now_rfc3339(),
            source,
            version,
            ok: result.is_ok(),
            from_impl: cur.policy.cache_impl,
            to_impl: policy.cache_impl,
            whitelist: policy.whitelist.clone(),
            error: result.as_ref().err().map(ToString::to_string),
            reason,
        };
        let backend = match result {
            Ok(b) => b,
            Err(e) if source == SwapSource::Retry => {
                // The start-up failure is on record already; repeating it every 5 s would push the history out.
                tracing::debug!(to = %policy.cache_impl, error = %e, "cache: start-up retry failed");
                return Err(e);
            }
            Err(e) => {
                self.inner.metrics.swap(false);
                tracing::warn!(
                    source = source.as_str(),
                    to = %policy.cache_impl,
                    reason = record.reason.as_deref().unwrap_or(source.as_str()),
                    error = %e,
                    "cache: swap refused, previous state kept"
                );
                self.push_swap(record);
                return Err(e);
            }
        };
        self.inner.metrics.swap(true);
        let (enabled, cache_impl) = (policy.enabled, policy.cache_impl);
        let mut breakers = self.breakers();
        match closes {
            None => breakers.clear(),
            Some(names) => {
                for n in names {
                    if breakers.remove(&n).is_some() {
                        tracing::info!(key_pattern = %n, "cache: breaker closed by configuration");
                    }
                }
            }
        }
        let mut next = Active::new(policy, backend, redis, version, Arc::default(), &breakers);
        next.whitelisted = self.whitelist_estimator(&cur, &next);
        // Leaving Redis (for null or memory): keep deleting there (see `Active::sink`); back on Redis, the new
        // backend takes the invalidations.
        next.sink = match (next.backend.kind(), cur.backend.kind()) {
            (CacheImpl::Redis, _) => None,
            (_, CacheImpl::Redis) => {
                cur.backend.retire();
                tracing::info!(
                    to = %next.policy.cache_impl,
                    "cache: left Redis; writes and invalidations still delete there until Redis serves again"
                );
                Some(Arc::clone(&cur.backend))
            }
            _ => cur.sink.clone(),
        };
        let routed = next
            .routes
            .iter()
            .filter(|(_, route)| next.stores && route.mode != Mode::Observe)
            .map(|(pattern, _)| (cache_impl, pattern.clone()))
            .collect();
        self.inner.metrics.declare_rollbacks(routed);
        // rcu, not store: a pattern first seen during the swap must not be lost. Under the breakers' lock, so a
        // trip cannot slip in between.
        let replaced = self.inner.active.rcu(|cur| Active {
            patterns: Arc::clone(&cur.patterns),
            ..next.clone()
        });
        self.rebase_served(&replaced);
        drop(breakers);
        self.inner.metrics.set_enabled(enabled, cache_impl);
        tracing::info!(
            source = source.as_str(),
            version,
            reason = record.reason.as_deref().unwrap_or(source.as_str()),
            "{}",
            self.state_line()
        );
        self.push_swap(record);
        Ok(())
    }

    /// The whitelist's estimator for `next`: the current one while impl and whitelist stay, a new one when they
    /// change, none when nothing is served (or the analysis is off).
    pub(super) fn whitelist_estimator(
        &self,
        cur: &Active,
        next: &Active,
    ) -> Option<Arc<WhitelistShards>> {
        let a = self.inner.analysis.as_ref()?;
        if !next.stores || next.policy.whitelist.is_empty() {
            return None;
        }
        if cur.policy.cache_impl == next.policy.cache_impl
            && cur.policy.whitelist == next.policy.whitelist
        {
            if let Some(w) = &cur.whitelisted {
                return Some(Arc::clone(w));
            }
        }
        // The patterns known now (`next`'s table is filled in after this); one first seen later starts at 0.
        let baseline = cur
            .patterns
            .iter()
            .map(|(name, &i)| {
                let c = self.slot(i).metrics.counts();
                let full = next.fully_served(name);
                (
                    name.to_string(),
                    super::active::ServedBaseline {
                        gets: c.gets,
                        hits: c.hits,
                        full,
                    },
                )
            })
            .collect();
        Some(Arc::new(WhitelistShards {
            shards: a.shards(a.opts.shared_sample_keys),
            gets: std::sync::atomic::AtomicU64::new(0),
            since: self.inner.clock.raw(),
            baseline: std::sync::Mutex::new(baseline),
        }))
    }

    pub(super) async fn prepare(
        &self,
        cur: &Active,
        policy: &Policy,
        redis: &RedisOptions,
    ) -> Result<Arc<dyn Cache>> {
        let same_impl = policy.cache_impl == cur.policy.cache_impl;
        #[cfg(feature = "redis")]
        let same_l1 = l1_patterns(policy) == l1_patterns(&cur.policy);
        #[cfg(not(feature = "redis"))]
        let same_l1 = true;
        if same_impl && (policy.cache_impl != CacheImpl::Redis || (*redis == cur.redis && same_l1))
        {
            return Ok(Arc::clone(&cur.backend));
        }
        // The same Redis data behind a new connection (only a timeout or the L1 patterns changed): everything it
        // holds saw every invalidation, so it is reconnected but not flushed.
        let same_data = same_impl
            && redis.url == cur.redis.url
            && redis.key_prefix == cur.redis.key_prefix
            && redis.tls_ca_file == cur.redis.tls_ca_file;
        let backend: Arc<dyn Cache> = match policy.cache_impl {
            CacheImpl::Null => Arc::new(NullCache),
            CacheImpl::Memory => Arc::new(MemoryCache::new(
                self.inner.memory_max_entries,
                self.inner.memory_max_bytes,
            )),
            CacheImpl::Redis => self.connect_redis(policy, redis).await?,
        };
        // Otherwise the new backend missed every invalidation made while it was not active (in this process or a
        // previous one): drop everything it holds under its prefix before it serves anything.
        if !backend.always_misses() && !same_data {
            let n = backend.delete_matching("", &|_| true).await?;
            tracing::info!(to = %policy.cache_impl, deleted = n, "cache: flushed the newly active backend");
        }
        Ok(backend)
    }

    /// A Redis backend for `policy`: with an in-process L1 in front when some pattern asks for one.
    #[cfg(feature = "redis")]
    pub(super) async fn connect_redis(
        &self,
        policy: &Policy,
        redis: &RedisOptions,
    ) -> Result<Arc<dyn Cache>> {
        let l1 = l1_patterns(policy);
        let l2 = RedisCache::connect(redis.clone()).await?;
        if l1.is_empty() {
            return Ok(Arc::new(l2));
        }
        Ok(Arc::new(TieredCache::new(
            l2,
            l1,
            self.inner.key_patterns.clone(),
            self.inner.memory_max_entries,
            self.inner.memory_max_bytes,
            self.inner.metrics.l1_counts(),
        )?))
    }

    /// Without the `redis` feature there is no Redis backend: the switch is refused and the state kept.
    #[cfg(not(feature = "redis"))]
    pub(super) async fn connect_redis(
        &self,
        _: &Policy,
        _: &RedisOptions,
    ) -> Result<Arc<dyn Cache>> {
        Err(Error::config(
            "cache.impl (CACHE_IMPL)",
            "redis",
            "this build of cache-rollout has no `redis` feature",
        ))
    }

    pub(super) fn push_swap(&self, record: SwapRecord) {
        let mut swaps = self
            .inner
            .swaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if swaps.len() == SWAP_HISTORY {
            swaps.pop_front();
        }
        swaps.push_back(record);
    }
}
