//! One rollout state for every instance of a service: the policy (impl, whitelist, per-pattern mode, ramp, TTL,
//! rollback rules) kept in Redis under one versioned key, signed with the admin token.
//!
//! - **Write**: [`Fleet::write`] merges a [`PolicyUpdate`] into the stored policy, bumps the version, signs the
//!   document (HMAC-SHA256 keyed by the admin token) and stores it with a compare-and-set script that also
//!   `PUBLISH`es the new version on the key's channel. A concurrent writer's change is never lost: the loser retries
//!   on the new version.
//! - **Follow**: `Fleet::spawn` (started by [`CacheRollout`](crate::CacheRollout)) subscribes to the channel and re-reads the key every `poll` (1 s by default), so a
//!   missed message is caught by the next read. A document of another epoch or a higher version, with a valid
//!   signature, is applied to the registry as a whole new policy (source `fleet`); one that does not verify is
//!   refused and logged.
//! - **Redis unreachable**: the instance keeps running on its last good state; the failure is logged and counted,
//!   and the next successful read catches up.
//! - **Rollbacks**: a breaker that trips on one instance is published on the channel; every other instance opens its
//!   own breaker for that pattern (its own cool-down) and probes its way back on its own traffic.
//!
//! See `docs/scaling.md` for the failure modes and the measured convergence times.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::cache::RedisOptions;
use crate::config::FleetOptions;
use crate::error::{Error, Result};
use crate::policy::{Policy, PolicyUpdate};
use crate::registry::CacheRegistry;

/// The stored document: a policy, its version, and who wrote it, signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetState {
    /// Random, chosen when the state is first stored (or stored again after the key was lost): instances apply a
    /// state of another epoch whatever its version.
    pub epoch: String,
    /// Increases by one with every write; within an epoch, instances apply only a higher version than they run.
    pub version: u64,
    /// The whole runtime policy.
    pub policy: Policy,
    /// RFC 3339 time of the write.
    pub updated_at: String,
    /// Who wrote it: `cli`, `api`, `init` (the first instance, from its configuration) or `restore` (a running
    /// instance that found the key gone stored the policy it runs).
    pub source: String,
    /// Hex HMAC-SHA256, keyed by the admin token, of the key and the other fields (their JSON, in this order).
    pub signature: String,
}

/// What an instance reports about the fleet state (`GET /internal/cache` → `fleet`, and metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FleetStatus {
    /// The key followed.
    pub key: String,
    /// The version this instance runs (0: none applied yet).
    pub version: u64,
    /// The epoch of that version.
    pub epoch: String,
    /// RFC 3339 time of the last successful read.
    pub last_read: Option<String>,
    /// The last failure (Redis unreachable, a document that does not verify), cleared by a good read.
    pub error: Option<String>,
    /// Failed reads and refused documents since start.
    pub failures: u64,
}

/// A broadcast on the state's channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    /// A new version was stored: re-read it.
    Changed { version: u64 },
    /// A breaker tripped on instance `from` at `at_ms` (Unix milliseconds): open it here too.
    Rollback {
        from: String,
        key_pattern: String,
        reason: String,
        at_ms: u64,
    },
}

/// What goes on the channel: a message and its HMAC (key and message JSON, keyed by the admin token), so that
/// someone who can PUBLISH but has no token cannot open breakers.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    msg: Message,
    sig: String,
}

/// A rollback message older than this (or this far in the future) is ignored: a replayed one does nothing.
const ROLLBACK_MAX_AGE_MS: u64 = 60_000;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Compare-and-set: store ARGV[2] only if the stored version is ARGV[1] (0: no document yet), then publish ARGV[3].
/// Returns `{1, version}` when stored, `{0, version}` when not (-1: a stored value that is not a fleet state).
const CAS: &str = r"
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and tonumber(doc.version) then v = tonumber(doc.version) else v = -1 end
end
if v ~= tonumber(ARGV[1]) then return {0, v} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[3])
return {1, v}
";

/// The fleet state of one service in one Redis.
pub struct Fleet {
    /// One client per node for the subscription (a cluster delivers a `PUBLISH` on every node), tried in turn.
    nodes: Vec<redis::Client>,
    next_node: std::sync::atomic::AtomicUsize,
    conn: crate::cache::RedisConn,
    key: String,
    secret: String,
    poll: Duration,
    /// Bound on the names of a stored policy ([`FleetOptions::max_patterns`]).
    max_patterns: usize,
    instance: String,
    status: Mutex<FleetStatus>,
    /// One read-and-apply at a time, so an older read can never be applied after a newer one.
    syncing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("key", &self.key)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Fleet {
    /// A fleet handle for `opts.key` in the Redis of `redis` (its URL and TLS settings), signing with `secret`
    /// (the admin token). Connects lazily.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL, an empty key, a poll under 100 ms, or a secret under 16 characters.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the lazy connection needs one); [`Fleet::check`] validates without it.
    pub fn new(opts: &FleetOptions, redis: &RedisOptions, secret: &str) -> Result<Self> {
        let nodes = Self::checked(opts, redis, secret)?;
        let key = opts.key.clone().unwrap_or_default();
        Ok(Fleet {
            nodes,
            next_node: std::sync::atomic::AtomicUsize::new(0),
            conn: crate::cache::RedisConn::lazy(
                redis,
                Duration::from_secs(2),
                Duration::from_secs(2),
            )?,
            key: key.clone(),
            secret: secret.to_string(),
            poll: Duration::from_millis(opts.poll_ms),
            max_patterns: opts
                .max_patterns
                .clamp(1, crate::pattern::MAX_PATTERNS_LIMIT),
            instance: format!(
                "{}:{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
                std::process::id()
            ),
            status: Mutex::new(FleetStatus {
                key,
                ..FleetStatus::default()
            }),
            syncing: tokio::sync::Mutex::new(()),
        })
    }

    /// Checks what [`Fleet::new`] would refuse, without building the handle (no runtime needed).
    ///
    /// # Errors
    /// As [`Fleet::new`].
    pub fn check(opts: &FleetOptions, redis: &RedisOptions, secret: &str) -> Result<()> {
        Self::checked(opts, redis, secret).map(|_| ())
    }

    /// The checks of [`Fleet::check`]; the clients of the Redis nodes it built on the way.
    fn checked(
        opts: &FleetOptions,
        redis: &RedisOptions,
        secret: &str,
    ) -> Result<Vec<redis::Client>> {
        let key = opts.key.clone().unwrap_or_default();
        if key.is_empty() {
            return Err(Error::config("cache.fleet.key", "", "must not be empty"));
        }
        if opts.poll_ms < 100 {
            return Err(Error::config(
                "cache.fleet.poll_ms",
                opts.poll_ms.to_string(),
                "must be at least 100",
            ));
        }
        if key.starts_with(&redis.key_prefix) {
            return Err(Error::config(
                "cache.fleet.key",
                &key,
                format!(
                    "must not start with cache.redis.key_prefix ({:?}): flushing the cache would delete it",
                    redis.key_prefix
                ),
            ));
        }
        if secret.chars().count() < crate::config::MIN_ADMIN_TOKEN_LEN {
            return Err(Error::config(
                "cache.admin_token (CACHE_ADMIN_TOKEN)",
                "***",
                "the fleet state is signed with the admin token: set one of at least 16 characters",
            ));
        }
        crate::cache::redis_node_clients(redis)
    }

    async fn conn(&self) -> Result<crate::cache::RedisReady> {
        Ok(self.conn.ready().await?)
    }

    fn sign(
        &self,
        epoch: &str,
        version: u64,
        policy: &Policy,
        updated_at: &str,
        source: &str,
    ) -> String {
        // The signed bytes: the key, then the unsigned fields' JSON in a fixed order (a BTreeMap inside, so
        // deterministic). The key is in, so a state cannot be copied to another service sharing the token.
        let body = serde_json::to_vec(&(&self.key, epoch, version, policy, updated_at, source))
            .unwrap_or_default();
        self.mac(&body)
    }

    fn mac(&self, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.as_bytes())
            .expect("HMAC takes any key length");
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn verify(&self, s: &FleetState) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.sign(&s.epoch, s.version, &s.policy, &s.updated_at, &s.source);
        expected.as_bytes().ct_eq(s.signature.as_bytes()).into()
    }

    /// The stored state, verified; `None` when there is none yet.
    ///
    /// # Errors
    /// Redis unreachable ([`Error::Redis`]); a document that does not parse or whose signature does not verify
    /// (written without the admin token, or with another one) is [`Error::Config`] naming `cache.fleet.key`.
    pub async fn read(&self) -> Result<Option<FleetState>> {
        let mut c = self.conn().await?;
        let raw: Option<String> = redis::cmd("GET").arg(&self.key).query_async(&mut c).await?;
        let Some(raw) = raw else { return Ok(None) };
        let state: FleetState = serde_json::from_str(&raw).map_err(|e| {
            Error::config(
                "cache.fleet.key",
                &self.key,
                format!("not a fleet state: {e}"),
            )
        })?;
        if !self.verify(&state) {
            return Err(Error::config(
                "cache.fleet.key",
                &self.key,
                format!(
                    "version {} is not signed with this admin token; refused",
                    state.version
                ),
            ));
        }
        Ok(Some(state))
    }

    /// Merges `update` into the stored policy (or into `base` when nothing is stored yet), validates it, and stores
    /// it as the next version; every instance following the key applies it within a poll period.
    ///
    /// # Errors
    /// An invalid update, or one naming more patterns than `cache.max_patterns` ([`Error::Config`]); Redis
    /// unreachable; a stored document that does not verify.
    pub async fn write(
        &self,
        base: &Policy,
        update: &PolicyUpdate,
        source: &str,
    ) -> Result<FleetState> {
        for _ in 0..16 {
            let (after, epoch, policy) = match self.read().await? {
                Some(s) => (s.version, s.epoch, s.policy.merged(update)?),
                None => (0, new_epoch(), base.merged(update)?),
            };
            // Refused before it is stored: a policy no instance would install must not reach the fleet.
            crate::registry::check_policy_bounds(&policy, self.max_patterns)?;
            if let Some(state) = self.store(after, &epoch, policy, source).await? {
                return Ok(state);
            }
            // Another writer stored a version in between: merge into that one instead.
        }
        Err(Error::Fleet(
            "16 concurrent writes in a row won the race; try again".into(),
        ))
    }

    /// Stores `policy` as version `after + 1` of `epoch` if the stored version is still `after` (0: nothing
    /// stored), and publishes the change; `None` if another writer came first.
    async fn store(
        &self,
        after: u64,
        epoch: &str,
        policy: Policy,
        source: &str,
    ) -> Result<Option<FleetState>> {
        let version = after + 1;
        let updated_at = now_rfc3339();
        let state = FleetState {
            epoch: epoch.to_string(),
            version,
            signature: self.sign(epoch, version, &policy, &updated_at, source),
            policy,
            updated_at,
            source: source.to_string(),
        };
        let doc = serde_json::to_string(&state).map_err(|e| Error::Fleet(e.to_string()))?;
        let msg = self.envelope(Message::Changed { version })?;
        let mut c = self.conn().await?;
        let (stored, _): (i64, i64) = redis::Script::new(CAS)
            .key(&self.key)
            .arg(after)
            .arg(doc)
            .arg(msg)
            .invoke_async(&mut c)
            .await?;
        Ok((stored == 1).then_some(state))
    }

    fn envelope(&self, msg: Message) -> Result<String> {
        let body =
            serde_json::to_vec(&(&self.key, &msg)).map_err(|e| Error::Fleet(e.to_string()))?;
        let sig = self.mac(&body);
        serde_json::to_string(&Envelope { msg, sig }).map_err(|e| Error::Fleet(e.to_string()))
    }

    /// The message of a published envelope, if its signature verifies.
    fn open(&self, payload: &str) -> Option<Message> {
        use subtle::ConstantTimeEq;
        let env: Envelope = serde_json::from_str(payload).ok()?;
        let body = serde_json::to_vec(&(&self.key, &env.msg)).ok()?;
        let ok: bool = self.mac(&body).as_bytes().ct_eq(env.sig.as_bytes()).into();
        ok.then_some(env.msg)
    }

    /// Publishes a rollback decided on this instance.
    async fn publish_rollback(&self, key_pattern: &str, reason: &str) -> Result<()> {
        let msg = self.envelope(Message::Rollback {
            from: self.instance.clone(),
            key_pattern: key_pattern.to_string(),
            reason: reason.to_string(),
            at_ms: unix_ms(),
        })?;
        let mut c = self.conn().await?;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&self.key)
            .arg(msg)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// The version this instance runs and the health of its link to the state.
    pub fn status(&self) -> FleetStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn failed(&self, e: &Error) {
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        s.failures += 1;
        let first = s.error.is_none();
        s.error = Some(e.to_string());
        drop(s);
        if first {
            tracing::warn!(key = %self.key, error = %e, "fleet: cannot follow the fleet state; running on the last good one");
        }
    }

    /// Reads the state and applies it at once if it is newer than the one running (after a write through
    /// [`write`](Self::write), so the writing instance need not wait for its poll).
    ///
    /// # Errors
    /// As [`read`](Self::read); a policy the registry refuses.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) async fn apply_now(&self, registry: &CacheRegistry) -> Result<()> {
        self.sync(registry, None).await
    }

    /// Reads the state and applies it when it is of another epoch or a higher version than the one running.
    /// `init`: the policy to store when the key is empty and this instance runs no fleet state yet (its
    /// configuration). A running instance that finds the key gone (a Redis restarted without persistence, a flush)
    /// stores the policy it runs as a new epoch, so the fleet goes on with what it ran.
    pub(crate) async fn sync(&self, registry: &CacheRegistry, init: Option<&Policy>) -> Result<()> {
        let _one = self.syncing.lock().await;
        // (version, epoch) running here; only this function changes them, under `syncing`.
        let running = {
            let s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            (s.version, s.epoch.clone())
        };
        let state = match self.read().await? {
            Some(s) => s,
            None => {
                let (policy, source) = if running.0 > 0 {
                    tracing::warn!(key = %self.key, version = running.0, "fleet: the fleet state is gone; storing the running policy again");
                    (registry.policy(), "restore")
                } else {
                    match init {
                        Some(p) => (p.clone(), "init"),
                        None => return Ok(()),
                    }
                };
                policy.validate()?;
                // Several instances at once: one stores, the others run what it stored.
                match self.store(0, &new_epoch(), policy, source).await? {
                    Some(s) => s,
                    None => match self.read().await? {
                        Some(s) => s,
                        None => return Ok(()),
                    },
                }
            }
        };
        {
            let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            if s.error.take().is_some() {
                tracing::info!(key = %self.key, "fleet: the fleet state is readable again");
            }
            s.last_read = Some(now_rfc3339());
        }
        if state.epoch != running.1 || state.version > running.0 {
            registry
                .apply_fleet_policy(state.policy.clone(), state.version)
                .await?;
            let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            s.version = state.version;
            s.epoch = state.epoch;
            drop(s);
            registry.metrics().set_fleet_version(state.version);
        }
        Ok(())
    }

    /// Follows the state for `registry` until the registry is dropped: applies it now (storing `init` if the key
    /// is empty), then on every notification and every poll period. Rollbacks of this instance are published;
    /// those of other instances open the same breaker here.
    pub(crate) fn spawn(self: Arc<Self>, registry: CacheRegistry, init: Policy) {
        let weak = registry.downgrade();
        let fleet = Arc::clone(&self);
        registry.on_rollback(Arc::new(
            move |pattern: &str, reason: &str| {
                let (fleet, pattern, reason) =
                    (Arc::clone(&fleet), pattern.to_string(), reason.to_string());
                tokio::spawn(async move {
                    if let Err(e) = fleet.publish_rollback(&pattern, &reason).await {
                        tracing::warn!(key_pattern = %pattern, error = %e, "fleet: rollback not published");
                    }
                });
            },
        ));
        drop(registry);
        // Notifications: a dedicated connection, re-subscribed after any failure and after a quiet minute (a
        // connection that died silently would otherwise never deliver again).
        let (notify_tx, mut notify_rx) = tokio::sync::mpsc::channel::<()>(16);
        let sub = Arc::clone(&self);
        let sub_weak = weak.clone();
        tokio::spawn(async move {
            while !notify_tx.is_closed() {
                match sub.listen(&sub_weak, &notify_tx).await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "fleet: subscription lost; re-subscribing")
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        tokio::spawn(async move {
            let mut init = Some(init);
            let mut tick = tokio::time::interval(self.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(()) = notify_rx.recv() => {}
                }
                // The registry gone: stop, which also closes the channel and stops the subscriber.
                let Some(registry) = CacheRegistry::upgrade(&weak) else {
                    return;
                };
                match self.sync(&registry, init.as_ref()).await {
                    Ok(()) => init = None,
                    Err(e) => self.failed(&e),
                }
            }
        });
    }

    /// One subscription: until it fails, goes quiet for a minute (`Ok`: re-subscribe), or nobody listens.
    async fn listen(
        &self,
        weak: &crate::registry::WeakRegistry,
        notify: &tokio::sync::mpsc::Sender<()>,
    ) -> Result<()> {
        let mut pubsub =
            crate::cache::redis_subscribe(&self.nodes, &self.next_node, &self.key).await?;
        // A change made while unsubscribed is picked up by this read.
        let _ = notify.try_send(());
        let mut stream = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                () = tokio::time::sleep(Duration::from_secs(60)) => return Ok(()),
                () = notify.closed() => return Ok(()),
            };
            let Some(msg) = msg else {
                return Err(Error::Fleet("subscription closed".into()));
            };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            match self.open(&payload) {
                Some(Message::Changed { .. }) => {
                    let _ = notify.try_send(());
                }
                Some(Message::Rollback {
                    from,
                    key_pattern,
                    reason,
                    at_ms,
                }) if from != self.instance && unix_ms().abs_diff(at_ms) <= ROLLBACK_MAX_AGE_MS => {
                    if let Some(registry) = CacheRegistry::upgrade(weak) {
                        registry.remote_rollback(&key_pattern, &reason, &from);
                    }
                }
                Some(Message::Rollback { .. }) => {}
                None => {
                    tracing::warn!(key = %self.key, "fleet: a message not signed with this admin token was ignored")
                }
            }
        }
    }
}

/// A fresh random epoch: 16 hex digits.
fn new_epoch() -> String {
    format!("{:016x}", crate::random::random_u64())
}

/// Property tests (proptest, 256 cases each, run by `cargo test`). The handle connects lazily, to a port where
/// nothing listens: nothing here reaches a Redis.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "property-test-token-0123";

    fn fleet(secret: &str) -> Fleet {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        let rt = RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        });
        let _in_runtime = rt.enter();
        let opts = FleetOptions {
            key: Some("cache-rollout:prop:fleet".into()),
            ..FleetOptions::default()
        };
        let redis = RedisOptions::default().with_url("redis://127.0.0.1:1");
        Fleet::new(&opts, &redis, secret).expect("fleet handle")
    }

    fn signed(
        f: &Fleet,
        epoch: &str,
        version: u64,
        whitelist: Vec<String>,
        source: &str,
    ) -> FleetState {
        let policy = Policy {
            whitelist,
            ..Policy::default()
        };
        let updated_at = "2026-12-01T00:00:00Z".to_string();
        FleetState {
            signature: f.sign(epoch, version, &policy, &updated_at, source),
            epoch: epoch.into(),
            version,
            policy,
            updated_at,
            source: source.into(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A state verifies only as signed: any field changed, another token, or any other signature is refused.
        #[test]
        fn only_a_signed_state_verifies(
            epoch in "[0-9a-f]{16}",
            version in any::<u64>(),
            whitelist in proptest::collection::vec("[a-z]{1,8}", 0..4),
            source in "(cli|api|init|restore)",
            other in "[0-9a-f]{64}",
            which in 0usize..5,
        ) {
            let f = fleet(TOKEN);
            let s = signed(&f, &epoch, version, whitelist, &source);
            prop_assert!(f.verify(&s));
            prop_assert!(!fleet("another-token-0123456789").verify(&s));
            let mut t = s.clone();
            match which {
                0 => t.version = t.version.wrapping_add(1),
                1 => t.epoch.push('0'),
                2 => t.policy.whitelist.push("intruder".into()),
                3 => t.source.push('x'),
                _ => t.updated_at.push('x'),
            }
            prop_assert!(!f.verify(&t));
            let mut u = s.clone();
            u.signature = other;
            prop_assert!(u.signature == s.signature || !f.verify(&u));
        }

        /// Any payload on the channel opens only if it was enveloped with the token.
        #[test]
        fn only_a_signed_message_opens(payload in ".{0,200}", version in any::<u64>()) {
            let f = fleet(TOKEN);
            prop_assert!(f.open(&payload).is_none());
            let sealed = f.envelope(Message::Changed { version }).expect("envelope");
            prop_assert!(f.open(&sealed).is_some());
            prop_assert!(fleet("another-token-0123456789").open(&sealed).is_none());
            let tampered = sealed.replace(&format!("\"version\":{version}"), &format!("\"version\":{}", version.wrapping_add(1)));
            prop_assert!(f.open(&tampered).is_none());
        }
    }
}
