//! [`RedisCache`]: Redis through the `redis` crate's [`ConnectionManager`], a multiplexed connection that
//! reconnects by itself (with exponential back-off) after a failure.
//!
//! Every key is stored under a namespace prefix (`cache.redis.key_prefix`, default `cr:`) so that pattern deletion
//! (`SCAN MATCH`, never `KEYS`) can never touch keys that belong to something else in the same database.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use super::{Cache, CacheImpl, Health, Lookup, Traced, LEASE_SUFFIX, TAG_PREFIX};
use crate::error::{Error, Result};

/// Value or lease, atomically. KEYS: key, lease key, generation key, tag sets…; ARGV: token, lease ms, the key
/// without prefix. The lease holds `token:generation`. Returns `{1, value}`, `{2, token}` (granted) or `{3, ""}`
/// (held by another caller).
static LEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local g = redis.call('GET', KEYS[3]) or '0'
if not redis.call('SET', KEYS[2], ARGV[1] .. ':' .. g, 'NX', 'PX', ARGV[2]) then return {3, ''} end
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[3])
  local t = redis.call('PTTL', KEYS[i])
  if t >= 0 and t < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return {2, ARGV[1]}
",
    )
});

/// Fill under a lease: only if the lease still holds the token and the generation has not moved (a pattern deletion
/// or flush since the lease was granted moves it). KEYS: key, lease key, generation key, tag sets…; ARGV: token,
/// value, TTL ms, the key without prefix.
static SET_LEASED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local g = redis.call('GET', KEYS[3]) or '0'
if redis.call('GET', KEYS[2]) ~= ARGV[1] .. ':' .. g then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[4])
  local t = redis.call('PTTL', KEYS[i])
  if t == -1 or t < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 1
",
    )
});

/// Ends a lease if it is still the caller's (`token:…`). KEYS: lease key; ARGV: token.
static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local l = redis.call('GET', KEYS[1])
if l and string.sub(l, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Deletes a tag's entries and their leases. KEYS: tag set; ARGV: namespace prefix, lease suffix.
static INVALIDATE_TAG: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('DEL', ARGV[1] .. k)
  redis.call('DEL', ARGV[1] .. k .. ARGV[2])
end
redis.call('DEL', KEYS[1])
return n
",
    )
});

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL (may carry a password; it is never logged).
    pub url: String,
    /// Prefix put before every key, e.g. `cr:`.
    pub key_prefix: String,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Deadline for each command's response.
    pub response_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` with a private CA; `None` trusts
    /// the system's roots (and Mozilla's, built in).
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "cr:".into(),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(100),
            tls_ca_file: None,
        }
    }
}

/// A byte cache in Redis. Cheap to clone: clones share one multiplexed connection.
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    opts: RedisOptions,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &crate::config::redact_url(&self.opts.url))
            .field("key_prefix", &self.opts.key_prefix)
            .finish()
    }
}

impl RedisCache {
    /// Connects now, and fails if Redis cannot be reached within `connect_timeout`.
    ///
    /// # Errors
    /// [`Error::Redis`] for a bad URL or an unreachable server; [`Error::Io`] for an unreadable `tls_ca_file`;
    /// [`Error::Config`] for an empty `key_prefix`.
    pub async fn connect(opts: RedisOptions) -> Result<Self> {
        let client = client(&opts)?;
        let conn = ConnectionManager::new_with_config(client, manager_config(&opts)).await?;
        Ok(RedisCache { conn, opts })
    }

    /// Connects on first use and keeps retrying in the background; calls fail (and fall back) until it succeeds.
    ///
    /// # Errors
    /// [`Error::Redis`] for a URL that cannot be parsed.
    pub fn connect_lazy(opts: RedisOptions) -> Result<Self> {
        let client = client(&opts)?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(&opts))?;
        Ok(RedisCache { conn, opts })
    }

    /// The options this cache was built with.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// The Redis key under which `key` is stored (`key_prefix` + `key`).
    pub fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.opts.key_prefix.len() + key.len());
        k.push_str(&self.opts.key_prefix);
        k.push_str(key);
        k
    }

    /// The Redis key of `key`'s lease.
    pub fn lease_key(&self, key: &str) -> String {
        let mut k = self.redis_key(key);
        k.push_str(LEASE_SUFFIX);
        k
    }

    /// The Redis key of the lease generation: every pattern deletion and flush increments it first, and a fill is
    /// refused when it moved since its lease was granted. `SCAN` cannot delete a key and its lease at one instant
    /// (a fill may land on a key the scan has passed, under a lease the scan has not reached yet); the generation
    /// closes that window.
    pub fn generation_key(&self) -> String {
        format!("{} ~gen", self.opts.key_prefix)
    }

    /// The Redis key of the set of keys recorded under `tag`.
    pub fn tag_key(&self, tag: &str) -> String {
        format!("{}{TAG_PREFIX}{tag}", self.opts.key_prefix)
    }

    /// The script invocation with a key, its lease, and its tag sets as KEYS.
    fn invocation<'s>(
        &self,
        script: &'s redis::Script,
        key: &str,
        tags: &[String],
    ) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(self.redis_key(key))
            .key(self.lease_key(key))
            .key(self.generation_key());
        for t in tags {
            inv.key(self.tag_key(t));
        }
        inv
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A client for `opts.url`; with `tls_ca_file`, one that trusts that CA (rustls, ring provider).
pub(crate) fn client(opts: &RedisOptions) -> Result<redis::Client> {
    if opts.key_prefix.is_empty() {
        // Pattern deletion and the flush of a newly active backend are confined to the prefix; an empty prefix
        // would let them delete every key in the database.
        return Err(Error::config(
            "cache.redis.key_prefix",
            "",
            "must not be empty",
        ));
    }
    match &opts.tls_ca_file {
        None => Ok(redis::Client::open(opts.url.as_str())?),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| Error::Io {
                context: format!("reading cache.redis.tls_ca_file {}", path.display()),
                source,
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Ok(redis::Client::build_with_tls(opts.url.as_str(), certs)?)
        }
    }
}

fn manager_config(opts: &RedisOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.response_timeout))
        // Reconnection is on demand (the next command after a failure starts it). Keep its own retries short:
        // callers are bounded by `bounded` below anyway, and during an outage each command should fail fast and
        // fall back to the loader rather than queue behind a long back-off.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(100))
}

/// Runs one Redis command with `response_timeout` as an overall deadline, which also covers waiting for a
/// reconnection in progress.
async fn bounded<T>(
    opts: &RedisOptions,
    operation: &'static str,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    super::within(opts.response_timeout, operation, async { Ok(f.await?) }).await
}

/// Escapes Redis glob metacharacters so a literal prefix can be used with `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Cache for RedisCache {
    fn kind(&self) -> CacheImpl {
        CacheImpl::Redis
    }

    fn remote(&self) -> bool {
        true
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move {
            let mut c = self.conn.clone();
            let v: Option<Vec<u8>> = bounded(&self.opts, "get", c.get(self.redis_key(key))).await?;
            Ok(v.map(Bytes::from))
        }
        .traced("get", CacheImpl::Redis, key)
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<()>> {
        self.set_tagged(key, value, ttl, &[])
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Option<Duration>,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        async move {
            // MULTI/EXEC rather than a script: an application write is a hot path, and Lua costs Redis about 8×
            // a plain SET (and pauses for its garbage collector). Atomic all the same: a fill under a lease can
            // never land between the SET and the lease's deletion.
            let mut c = self.conn.clone();
            let mut pipe = redis::pipe();
            pipe.atomic();
            let k = self.redis_key(key);
            match ttl {
                Some(ttl) => pipe.pset_ex(&k, value.as_ref(), millis(ttl)).ignore(),
                None => pipe.set(&k, value.as_ref()).ignore(),
            };
            pipe.del(self.lease_key(key)).ignore();
            for t in tags {
                let tk = self.tag_key(t);
                pipe.sadd(&tk, key).ignore();
                match ttl {
                    // The tag's set lives as long as its longest-lived entry: set an expiry when it has none,
                    // extend it when this entry outlives it.
                    Some(ttl) => {
                        let ms = millis(ttl);
                        pipe.cmd("PEXPIRE").arg(&tk).arg(ms).arg("NX").ignore();
                        pipe.cmd("PEXPIRE").arg(&tk).arg(ms).arg("GT").ignore();
                    }
                    None => {
                        pipe.persist(&tk).ignore();
                    }
                }
            }
            let () = bounded(&self.opts, "set", pipe.query_async(&mut c)).await?;
            Ok(())
        }
        .traced("set_tagged", CacheImpl::Redis, key)
    }

    fn lease<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        async move {
            let mut c = self.conn.clone();
            let mut inv = self.invocation(&LEASE, key, tags);
            inv.arg(token).arg(millis(lease_ttl)).arg(key);
            let (kind, v): (i64, Vec<u8>) =
                bounded(&self.opts, "lease", inv.invoke_async(&mut c)).await?;
            Ok(match kind {
                1 => Lookup::Hit(Bytes::from(v)),
                2 => Lookup::Lease(token),
                _ => Lookup::Held,
            })
        }
        .traced("lease", CacheImpl::Redis, key)
    }

    fn set_leased<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        token: u64,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            let mut c = self.conn.clone();
            let mut inv = self.invocation(&SET_LEASED, key, tags);
            inv.arg(token).arg(value.as_ref()).arg(millis(ttl)).arg(key);
            let n: i64 = bounded(&self.opts, "set", inv.invoke_async(&mut c)).await?;
            Ok(n == 1)
        }
        .traced("set_leased", CacheImpl::Redis, key)
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: u64) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut c = self.conn.clone();
            let mut inv = RELEASE.prepare_invoke();
            inv.key(self.lease_key(key)).arg(token);
            let _: i64 = bounded(&self.opts, "release", inv.invoke_async(&mut c)).await?;
            Ok(())
        }
        .traced("release_lease", CacheImpl::Redis, key)
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<u64>> {
        async move {
            let mut c = self.conn.clone();
            let mut inv = INVALIDATE_TAG.prepare_invoke();
            inv.key(self.tag_key(tag))
                .arg(&self.opts.key_prefix)
                .arg(LEASE_SUFFIX);
            bounded(&self.opts, "invalidate_tag", inv.invoke_async(&mut c)).await
        }
        .traced("invalidate_tag", CacheImpl::Redis, tag)
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        async move {
            let mut c = self.conn.clone();
            let mut pipe = redis::pipe();
            pipe.atomic()
                .del(self.redis_key(key))
                .del(self.lease_key(key));
            let (n, _): (u64, u64) =
                bounded(&self.opts, "delete", pipe.query_async(&mut c)).await?;
            Ok(n > 0)
        }
        .traced("delete", CacheImpl::Redis, key)
    }

    fn delete_matching<'a>(
        &'a self,
        prefix: &'a str,
        belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>> {
        async move {
            let mut c = self.conn.clone();
            // First revoke every lease granted so far, whichever bucket the scan finds it in (or has passed).
            let generation = self.generation_key();
            let _: i64 = bounded(
                &self.opts,
                "scan",
                redis::cmd("INCR").arg(&generation).query_async(&mut c),
            )
            .await?;
            let glob = format!("{}*", glob_escape(&self.redis_key(prefix)));
            let strip = self.opts.key_prefix.len();
            let mut cursor: u64 = 0;
            let mut deleted = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&glob)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) =
                    bounded(&self.opts, "scan", scan.query_async(&mut c)).await?;
                // A lease goes with its key; a tag set only with a flush (`belongs` never accepts a name with a
                // space otherwise, since patterns cannot contain one).
                let doomed: Vec<&String> = keys
                    .iter()
                    .filter(|k| {
                        if **k == generation {
                            return false; // never reset: a lease of generation 0 would be valid again
                        }
                        let k = &k[strip..];
                        belongs(k.strip_suffix(LEASE_SUFFIX).unwrap_or(k))
                    })
                    .collect();
                if !doomed.is_empty() {
                    let n: u64 = redis::cmd("UNLINK")
                        .arg(&doomed)
                        .query_async(&mut c)
                        .await?;
                    deleted += n;
                }
                if next == 0 {
                    return Ok(deleted);
                }
                cursor = next;
            }
        }
        .traced("delete_matching", CacheImpl::Redis, prefix)
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        async move {
            let mut c = self.conn.clone();
            let start = Instant::now();
            let r: std::result::Result<String, redis::RedisError> =
                redis::cmd("PING").query_async(&mut c).await;
            match r {
                Ok(_) => Health {
                    up: true,
                    latency_ms: Some(start.elapsed().as_secs_f64() * 1e3),
                    error: None,
                },
                Err(e) => Health {
                    up: false,
                    latency_ms: None,
                    error: Some(e.to_string()),
                },
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::glob_escape;

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("cr:user:*:profile"), "cr:user:\\*:profile");
        assert_eq!(glob_escape("a?[b]\\"), "a\\?\\[b\\]\\\\");
    }
}
