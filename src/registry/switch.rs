//! Switching: one operation (`install`) that builds the next state and swaps it in, whatever asked for it.

use super::*;

/// The patterns of `policy` with an in-process L1, and their L1 TTLs in seconds.
#[cfg(feature = "redis")]
pub(super) fn l1_patterns(policy: &Policy) -> L1Patterns {
    policy
        .patterns
        .iter()
        .filter_map(|(p, pp)| pp.l1_ttl_secs.map(|t| (p.clone(), t)))
        .collect()
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

impl CacheRegistry {
    /// Installs a whole policy read from the fleet state (source `fleet`, reason `fleet version N`). Breakers stay
    /// open but for those of patterns whose settings changed.
    ///
    /// # Errors
    /// As [`switch`](Self::switch); the previous state stays.
    pub async fn apply_fleet_policy(&self, policy: Policy, version: u64) -> Result<()> {
        self.install_why(
            Change::Fleet(policy),
            "fleet",
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
        self.switch_from(update, "library").await
    }

    /// [`switch`](Self::switch) with the source recorded in the swap history (`api`, `sighup`, …).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub async fn switch_from(&self, update: &PolicyUpdate, source: &str) -> Result<StateView> {
        self.install(Change::Update(update.clone()), source).await?;
        Ok(self.state().await)
    }

    /// Replaces the whole policy and the Redis options (SIGHUP: the configuration files were re-read).
    ///
    /// # Errors
    /// As [`switch`](Self::switch).
    pub async fn reload(&self, policy: Policy, redis: RedisOptions) -> Result<StateView> {
        self.install(Change::Replace(policy, Some(redis)), "sighup")
            .await?;
        Ok(self.state().await)
    }

    pub(super) async fn install(&self, change: Change, source: &str) -> Result<()> {
        self.install_why(change, source, None).await
    }

    pub(super) async fn install_why(
        &self,
        change: Change,
        source: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let _one_at_a_time = self.inner.switching.lock().await;
        let cur = self.inner.state.load_full();
        // Breakers a successful swap closes: those of the patterns it names, or all of them on a full reload.
        let closes: Option<Vec<String>> = match &change {
            Change::Update(u) => Some(
                u.patterns
                    .as_ref()
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default(),
            ),
            Change::Replace(..) => None,
            Change::Retry(..) => Some(Vec::new()),
            Change::Fleet(p) => Some(
                cur.policy
                    .patterns
                    .keys()
                    .chain(p.patterns.keys())
                    .filter(|k| cur.policy.patterns.get(*k) != p.patterns.get(*k))
                    .cloned()
                    .collect(),
            ),
        };
        let (policy, redis) = match change {
            Change::Update(u) => (cur.policy.merged(&u)?, cur.redis.clone()),
            Change::Replace(p, r) => {
                p.validate()?;
                (p, r.unwrap_or_else(|| cur.redis.clone()))
            }
            Change::Retry(p, since) => {
                if cur.version != since {
                    return Ok(()); // someone switched since start-up: their choice wins
                }
                (p, cur.redis.clone())
            }
            Change::Fleet(p) => {
                p.validate()?;
                (p, cur.redis.clone())
            }
        };
        let result = self.prepare(&cur, &policy, &redis).await;
        let version = cur.version + u64::from(result.is_ok());
        let record = SwapRecord {
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            source: source.to_string(),
            version,
            ok: result.is_ok(),
            from_impl: cur.policy.imp,
            to_impl: policy.imp,
            whitelist: policy.whitelist.clone(),
            error: result.as_ref().err().map(ToString::to_string),
            reason,
        };
        let backend = match result {
            Ok(b) => b,
            Err(e) if source == "retry" => {
                // The start-up failure is on record already; repeating it every 5 s would push the history out.
                tracing::debug!(to = %policy.imp, error = %e, "cache: start-up retry failed");
                return Err(e);
            }
            Err(e) => {
                self.inner.metrics.swap(false);
                tracing::warn!(
                    source,
                    to = %policy.imp,
                    reason = record.reason.as_deref().unwrap_or(source),
                    error = %e,
                    "cache: swap refused, previous state kept"
                );
                self.push_swap(record);
                return Err(e);
            }
        };
        self.inner.metrics.swap(true);
        let (enabled, imp) = (policy.enabled, policy.imp);
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
        if next.stores {
            for (pattern, route) in &next.routes {
                if route.mode != Mode::Observe {
                    self.inner.metrics.declare_rollbacks(imp, pattern);
                }
            }
        }
        // rcu, not store: a pattern first seen during the swap must not be lost. Under the breakers' lock, so a
        // trip cannot slip in between.
        self.inner.state.rcu(|cur| Active {
            patterns: Arc::clone(&cur.patterns),
            ..next.clone()
        });
        drop(breakers);
        self.inner.metrics.set_enabled(enabled, imp);
        tracing::info!(
            source,
            version,
            reason = record.reason.as_deref().unwrap_or(source),
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
        if cur.policy.imp == next.policy.imp && cur.policy.whitelist == next.policy.whitelist {
            if let Some(w) = &cur.whitelisted {
                return Some(Arc::clone(w));
            }
        }
        Some(Arc::new(WhitelistShards {
            shards: Shards::with_max_rate(a.opts.shared_sample_keys, a.opts.max_sampling_rate),
            gets: std::sync::atomic::AtomicU64::new(0),
            since: self.inner.clock.raw(),
        }))
    }

    pub(super) async fn prepare(
        &self,
        cur: &Active,
        policy: &Policy,
        redis: &RedisOptions,
    ) -> Result<Arc<dyn Cache>> {
        let same_impl = policy.imp == cur.policy.imp;
        #[cfg(feature = "redis")]
        let same_l1 = l1_patterns(policy) == l1_patterns(&cur.policy);
        #[cfg(not(feature = "redis"))]
        let same_l1 = true;
        if same_impl && (policy.imp != CacheImpl::Redis || (*redis == cur.redis && same_l1)) {
            return Ok(Arc::clone(&cur.backend));
        }
        // The same Redis data behind a new connection (only a timeout or the L1 patterns changed): everything it
        // holds saw every invalidation, so it is reconnected but not flushed.
        let same_data = same_impl
            && redis.url == cur.redis.url
            && redis.key_prefix == cur.redis.key_prefix
            && redis.tls_ca_file == cur.redis.tls_ca_file;
        let backend: Arc<dyn Cache> = match policy.imp {
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
            tracing::info!(imp = %policy.imp, deleted = n, "cache: flushed the newly active backend");
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
