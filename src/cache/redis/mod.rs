//! [`RedisCache`]: Redis through the `redis` crate's [`ConnectionManager`], a multiplexed connection that
//! reconnects by itself (with exponential back-off) after a failure.
//!
//! Every key is stored under a namespace prefix (`cache.redis.key_prefix`: `cr:<service>:` from the service name,
//! `cr:` in [`RedisOptions::default`]) so that pattern deletion (`SCAN MATCH`, never `KEYS`) can never touch keys
//! that belong to something else in the same database.
//!
//! # Redis Cluster
//!
//! A URL of the form `redis+cluster://host1:port1,host2:port2,...` (`rediss+cluster://` for TLS; a
//! `user:password@` before the first host applies to every node) connects to a Redis Cluster through the `redis`
//! crate's [`ClusterConnection`], which follows the cluster's slot map, its `MOVED`/`ASK` redirections and its
//! failovers. The nodes listed are only where the slot map is first read; one reachable node is enough.
//!
//! A cluster only runs a script or a `MULTI` on keys of one hash slot, so the key layout differs
//! (<https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags>):
//!
//! | what | single Redis | cluster |
//! |---|---|---|
//! | entry of `key` | `cr:key` | `cr:{T}key`, `T` a short tag that hashes to `key`'s own slot |
//! | its lease | `cr:key ~lease` | `cr:{T}key ~lease` (same slot) |
//! | lease generation | `cr: ~gen`, one | `cr: ~gen{T}`, one per slot (16,384 keys once a deletion ran) |
//! | set of a tag's keys | `cr: ~tag:t` | `cr: ~tag:{T}t` in the slot of `t`, with its pending hash `… ~pending` |
//!
//! `T` is chosen so that `cr:{T}key` lands in the slot `key` itself hashes to (a `{...}` hash tag in the
//! application's key is honoured), so keys spread over the cluster as they would without the prefix.
//!
//! Tags live in other slots than their keys, so on a cluster a lease with tags first records the key in the tags'
//! sets, a fill records it again before it stores, and an application write records it after it stores. A tag
//! invalidation moves the members into the tag's pending hash, marked with its token, deletes each entry and its
//! lease, then removes the members still marked with its token; what it could not delete (or an interrupted one
//! left) stays pending for the next invalidation of the tag. A fill whose lease was granted before the invalidation
//! is refused either way. Pattern deletion increments every slot's generation, then scans every primary.
//!
//! # Layout
//!
//! | file | what lives there |
//! |---|---|
//! | `mod.rs` | [`RedisCache`]: key layout, tags, pattern deletion, the [`Cache`] implementation |
//! | `conn.rs` | the connection (single or cluster), clients per node for pub/sub, TLS and prefix checks |
//! | `scripts.rs` | the Lua scripts of the atomic multi-key steps |
//! | `slots.rs` | the cluster's slot map and the hash tags of the key layout |

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{StreamExt, TryStreamExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::AsyncCommands;

use super::redis_options::cluster_nodes;
use super::{Cache, CacheImpl, Health, Lookup, RedisOptions, Traced, LEASE_SUFFIX, TAG_PREFIX};
use crate::error::{Error, Result};

mod conn;
mod memory_info;
mod scripts;
mod slots;

pub(crate) use self::conn::{node_clients, subscribe, Conn, Ready};
pub use self::memory_info::RedisMemory;
use self::scripts::*;
use self::slots::{slot_ranges, slot_tag, SLOT_TAGS};

/// A byte cache in Redis or in a Redis Cluster. Cheap to clone: clones share one multiplexed connection (per node,
/// on a cluster).
#[derive(Clone)]
pub struct RedisCache {
    conn: Conn,
    opts: RedisOptions,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &super::redact_url(&self.opts.url))
            .field("key_prefix", &self.opts.key_prefix)
            .field("cluster", &self.is_cluster())
            .finish()
    }
}

impl RedisCache {
    /// `PUBLISH`es `message` on `channel`, within `response_timeout`.
    ///
    /// # Errors
    /// Redis failures and the deadline ([`Error::Redis`], [`Error::Timeout`]).
    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<()> {
        let _: i64 = with_response_timeout(&self.opts, "publish", async {
            self.ready().await?.publish(channel, message).await
        })
        .await?;
        Ok(())
    }

    /// Connects now, and fails if Redis cannot be reached: a single server with `connect_timeout` as the deadline of
    /// each connection attempt (the connection manager tries twice), a cluster's slot map and nodes within
    /// `connect_timeout` overall.
    ///
    /// # Errors
    /// [`Error::Redis`] for a bad URL or an unreachable server; [`Error::Timeout`] when a cluster takes longer than
    /// `connect_timeout`; [`Error::Io`] for an unreadable `tls_ca_file`; [`Error::Config`] for an empty
    /// `key_prefix`, a cluster URL without nodes, or a `key_prefix` with `{` or `}` on a cluster.
    pub async fn connect(opts: RedisOptions) -> Result<Self> {
        let conn = Conn::eager(&opts, opts.connect_timeout, opts.response_timeout).await?;
        Ok(RedisCache { conn, opts })
    }

    /// Connects on first use and keeps retrying in the background; calls fail (and fall back) until it succeeds.
    ///
    /// # Errors
    /// As [`connect`](Self::connect), except for the unreachable server.
    pub fn connect_lazy(opts: RedisOptions) -> Result<Self> {
        let conn = Conn::lazy(&opts, opts.connect_timeout, opts.response_timeout)?;
        Ok(RedisCache { conn, opts })
    }

    /// The options this cache was built with.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// `true` when connected to a Redis Cluster (a `redis+cluster://` URL).
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The Redis key under which `key` is stored: `key_prefix` + `key`; on a cluster `key_prefix` + `{T}` + `key`,
    /// where the hash tag `T` puts it in the slot of `key` itself.
    pub fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.opts.key_prefix.len() + key.len() + 8);
        k.push_str(&self.opts.key_prefix);
        if self.is_cluster() {
            k.push('{');
            k.push_str(slot_tag(key));
            k.push('}');
        }
        k.push_str(key);
        k
    }

    /// The Redis key of `key`'s lease (in `key`'s slot).
    pub fn lease_key(&self, key: &str) -> String {
        let mut k = self.redis_key(key);
        k.push_str(LEASE_SUFFIX);
        k
    }

    /// The Redis key of the lease generation that covers `key`: one for the database on a single Redis, one per
    /// hash slot on a cluster (in the slot of `key`). Every pattern deletion and flush increments it first, and a
    /// fill is refused when it moved since its lease was granted. `SCAN` cannot delete a key and its lease at one
    /// instant (a fill may land on a key the scan has passed, under a lease the scan has not reached yet); the
    /// generation closes that window.
    pub fn generation_key(&self, key: &str) -> String {
        if self.is_cluster() {
            format!("{} ~gen{{{}}}", self.opts.key_prefix, slot_tag(key))
        } else {
            format!("{} ~gen", self.opts.key_prefix)
        }
    }

    /// The Redis key of the set of keys recorded under `tag`: `key_prefix ~tag:tag`; on a cluster
    /// `key_prefix ~tag:{T}tag`, in the slot `tag` hashes to (so that the set and its pending set share one).
    pub fn tag_key(&self, tag: &str) -> String {
        if self.is_cluster() {
            format!(
                "{}{TAG_PREFIX}{{{}}}{tag}",
                self.opts.key_prefix,
                slot_tag(tag)
            )
        } else {
            format!("{}{TAG_PREFIX}{tag}", self.opts.key_prefix)
        }
    }

    /// The value or a lease, atomically (`over`: a lease even though the key holds a value, for a refresh).
    async fn lease_with(
        &self,
        key: &str,
        token: u64,
        lease_ttl: Duration,
        tags: &[String],
        over: bool,
    ) -> Result<Lookup> {
        if self.is_cluster() && !tags.is_empty() {
            // The tag sets live in other slots: record the key in them before the lease is granted, so a tag
            // invalidation from then on revokes it. A hit needs no record, and is answered first.
            if !over {
                if let Some(v) = with_response_timeout(&self.opts, "lease", async {
                    self.ready()
                        .await?
                        .get::<_, Option<Vec<u8>>>(self.redis_key(key))
                        .await
                })
                .await?
                {
                    return Ok(Lookup::Hit(Bytes::from(v)));
                }
            }
            self.tags_add(key, tags, Some(lease_ttl)).await?;
        }
        let mut inv = self.invocation(&LEASE, key, tags);
        inv.arg(token)
            .arg(millis(lease_ttl))
            .arg(key)
            .arg(if over { "1" } else { "0" });
        let (kind, v): (i64, Vec<u8>) = with_response_timeout(&self.opts, "lease", async {
            inv.invoke_async(&mut self.ready().await?).await
        })
        .await?;
        Ok(match kind {
            1 => Lookup::Hit(Bytes::from(v)),
            2 => Lookup::Lease(token),
            _ => Lookup::Held,
        })
    }

    /// The application's key of a Redis key found by a scan (the prefix and a cluster hash tag taken off), or the
    /// name of a tag set after the prefix.
    fn app_key<'k>(&self, redis_key: &'k str) -> &'k str {
        let k = &redis_key[self.opts.key_prefix.len()..];
        if self.is_cluster() && k.starts_with('{') {
            return k.find('}').map_or(k, |i| &k[i + 1..]);
        }
        k
    }

    /// The keys of a scan page that a pattern deletion removes: those whose application key `belongs` (a lease goes
    /// with its key; a tag set only with a flush, since `belongs` never accepts a name with a space otherwise:
    /// patterns cannot contain one), never a lease generation (a lease of generation 0 would be valid again).
    fn doomed<'k>(
        &self,
        keys: &'k [String],
        belongs: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Vec<&'k String> {
        // `… ~gen` on a single Redis, `… ~gen{T}` per slot on a cluster.
        let generation = format!("{} ~gen", self.opts.key_prefix);
        keys.iter()
            .filter(|k| {
                let rest = k.strip_prefix(&generation);
                if rest.is_some_and(|r| r.is_empty() || (self.is_cluster() && r.starts_with('{'))) {
                    return false;
                }
                let k = self.app_key(k);
                belongs(k.strip_suffix(LEASE_SUFFIX).unwrap_or(k))
            })
            .collect()
    }

    /// The `SCAN MATCH` glob for the keys (and leases) whose application key starts with `prefix`.
    fn scan_glob(&self, prefix: &str) -> String {
        let mut g = glob_escape(&self.opts.key_prefix);
        if self.is_cluster() && !prefix.is_empty() {
            g.push_str("\\{*\\}");
        }
        g.push_str(&glob_escape(prefix));
        g.push('*');
        g
    }

    async fn ready(&self) -> redis::RedisResult<Ready> {
        self.conn.ready().await
    }

    /// The script invocation with a key, its lease, its generation and (on a single Redis) its tag sets as KEYS.
    fn invocation<'s>(
        &self,
        script: &'s redis::Script,
        key: &str,
        tags: &[String],
    ) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(self.redis_key(key))
            .key(self.lease_key(key))
            .key(self.generation_key(key));
        if !self.is_cluster() {
            for t in tags {
                inv.key(self.tag_key(t));
            }
        }
        inv
    }

    /// Cluster: records `key` in each tag's set, which then lives at least `ttl` (`None`: without expiry).
    async fn tags_add(&self, key: &str, tags: &[String], ttl: Option<Duration>) -> Result<()> {
        let ms = ttl.map(|t| millis(t).to_string()).unwrap_or_default();
        futures_util::future::try_join_all(tags.iter().map(|t| {
            let ms = &ms;
            async move {
                let mut inv = TAG_ADD.prepare_invoke();
                let tk = self.tag_key(t);
                inv.key(&tk).arg(key).arg(ms);
                let _: i64 = with_response_timeout(&self.opts, "tag", async {
                    inv.invoke_async(&mut self.ready().await?).await
                })
                .await?;
                // The membership must survive a failover as much as the entry does.
                self.replicated(WaitOn::RedisKey(&tk)).await
            }
        }))
        .await?;
        Ok(())
    }

    /// With `wait_replicas`, waits until that many replicas of the server (a single Redis), or on a cluster of the
    /// primary `on` names, have every write made so far.
    async fn replicated(&self, on: WaitOn<'_>) -> Result<()> {
        let want = self.opts.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        // Half the deadline, so the server answers with the count before the client gives up.
        wait.arg(want).arg(millis(self.opts.response_timeout / 2));
        let acked: i64 = with_response_timeout(&self.opts, "wait", async {
            match self.ready().await? {
                Ready::Single(mut c) => wait.query_async(&mut c).await,
                Ready::Cluster(mut c) => {
                    let by_key = |k: &str| {
                        SingleNodeRoutingInfo::SpecificNode(Route::with_key(k, SlotAddr::Master))
                    };
                    let route = match on {
                        WaitOn::Node(host, port) => SingleNodeRoutingInfo::ByAddress { host, port },
                        WaitOn::RedisKey(k) => by_key(k),
                        WaitOn::Key(k) => by_key(&self.redis_key(k)),
                        WaitOn::Server => SingleNodeRoutingInfo::RandomPrimary,
                    };
                    let v = c
                        .route_command(wait, RoutingInfo::SingleNode(route))
                        .await?;
                    redis::from_redis_value(v).map_err(redis::RedisError::from)
                }
            }
        })
        .await?;
        if acked < i64::from(want) {
            return Err(Error::Timeout {
                operation: "wait",
                after: self.opts.response_timeout,
            });
        }
        Ok(())
    }

    /// Deletes `key` and its lease (one slot, one `MULTI`); `true` when the key was present.
    async fn delete_pair(&self, key: &str) -> Result<bool> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.redis_key(key))
            .del(self.lease_key(key));
        let (n, _): (u64, u64) = with_response_timeout(&self.opts, "delete", async {
            pipe.query_async(&mut self.ready().await?).await
        })
        .await?;
        self.replicated(WaitOn::Key(key)).await?;
        Ok(n > 0)
    }

    /// Cluster: [`Cache::invalidate_tag`]. Moves the members into the tag's pending set (one slot, one script), then
    /// deletes each entry and its lease, then takes the deleted ones out of the pending set. Members whose deletion
    /// failed (or that an interrupted invalidation left) stay pending, and the next invalidation of the tag deletes
    /// them.
    async fn invalidate_tag_cluster(&self, tag: &str) -> Result<u64> {
        let tk = self.tag_key(tag);
        let pending = format!("{tk}{PENDING_SUFFIX}");
        let token = format!("{:016x}", crate::random::random_u64());
        let mut inv = TAG_TAKE.prepare_invoke();
        inv.key(&tk).key(&pending).arg(&token).arg(60_000);
        let members: Vec<String> = with_response_timeout(&self.opts, "invalidate_tag", async {
            inv.invoke_async(&mut self.ready().await?).await
        })
        .await?;
        let results: Vec<(String, Result<bool>)> = futures_util::stream::iter(members)
            .map(|m| async move {
                let r = self.delete_pair(&m).await;
                (m, r)
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut deleted = 0;
        let mut done = Vec::new();
        let mut error = None;
        for (m, r) in results {
            match r {
                Ok(present) => {
                    deleted += u64::from(present);
                    done.push(m);
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if !done.is_empty() {
            let mut inv = TAG_DONE.prepare_invoke();
            inv.key(&pending).arg(&token).arg(&done);
            let _: i64 = with_response_timeout(&self.opts, "invalidate_tag", async {
                inv.invoke_async(&mut self.ready().await?).await
            })
            .await?;
        }
        match error {
            None => Ok(deleted),
            Some(e) => Err(e),
        }
    }

    /// Cluster: [`Cache::delete_matching`]. Moves every slot's generation, then scans every primary.
    async fn delete_matching_cluster(
        &self,
        prefix: &str,
        belongs: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<u64> {
        let Ready::Cluster(mut cluster) = self.ready().await? else {
            unreachable!("called on a cluster only");
        };
        let slots: redis::Value = with_bulk_timeout(&self.opts, async {
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut cluster)
                .await
        })
        .await?;
        let ranges = slot_ranges(slots)?;
        // Every slot's generation, in pipelines of 1,024 INCRs sent to the primary that holds the slots.
        let mut batches = Vec::new();
        for (first, last, ..) in &ranges {
            let slots: Vec<u16> = (*first..=*last).collect();
            for chunk in slots.chunks(1024) {
                let mut pipe = redis::pipe();
                for slot in chunk {
                    let tag = Slot::new(*slot).map_or("", |s| &*SLOT_TAGS[&s]);
                    pipe.incr(format!("{} ~gen{{{tag}}}", self.opts.key_prefix), 1);
                }
                batches.push((pipe, chunk.len(), chunk[0]));
            }
        }
        futures_util::stream::iter(batches)
            .map(|(pipe, n, slot)| {
                let mut cluster = cluster.clone();
                async move {
                    // By slot: the connection's own slot map picks the primary. A slot that moved meanwhile answers
                    // `MOVED` inside the replies, which fails the deletion below (nothing is left half-revoked
                    // silently; the caller retries).
                    let route =
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                    let replies =
                        with_bulk_timeout(&self.opts, cluster.route_pipeline(pipe, 0, n, route))
                            .await?;
                    for r in replies {
                        let _: i64 = redis::from_redis_value(r).map_err(redis::RedisError::from)?;
                    }
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        let mut primaries: Vec<(String, u16)> = Vec::new();
        for (_, _, host, port) in ranges {
            if !primaries.iter().any(|(h, p)| *h == host && *p == port) {
                primaries.push((host, port));
            }
        }
        let glob = self.scan_glob(prefix);
        let mut deleted = 0u64;
        for (host, port) in primaries {
            let mut cursor: u64 = 0;
            loop {
                let scan = scan_page(cursor, &glob);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                let page =
                    with_bulk_timeout(&self.opts, cluster.route_command(scan, route)).await?;
                let (next, keys): (u64, Vec<String>) =
                    redis::from_redis_value(page).map_err(redis::RedisError::from)?;
                let doomed = self.doomed(&keys, belongs);
                if !doomed.is_empty() {
                    // Keys of many slots: the cluster connection splits the command by slot.
                    let n: u64 = with_bulk_timeout(&self.opts, async {
                        redis::cmd("UNLINK")
                            .arg(&doomed)
                            .query_async(&mut cluster)
                            .await
                    })
                    .await?;
                    deleted += n;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            self.replicated(WaitOn::Node(host, port)).await?;
        }
        Ok(deleted)
    }
}

/// Whose replicas [`RedisCache::replicated`] waits for. A single Redis has one server, whatever this says.
enum WaitOn<'a> {
    /// The primary holding the application's key.
    Key(&'a str),
    /// The primary holding this Redis key (a tag set).
    RedisKey(&'a str),
    /// The node at this address.
    Node(String, u16),
    /// The single server.
    Server,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The floor of the deadline of each bulk step of a pattern deletion on a cluster (a pipeline of 1,024 `INCR`s, a
/// `SCAN` page of up to 1,000 keys, their `UNLINK`): an administrative operation, which on a busy machine must not
/// fail for want of the 100 ms an application read gets.
const BULK_DEADLINE: Duration = Duration::from_secs(2);

/// [`with_response_timeout`] with a deadline of at least [`BULK_DEADLINE`].
async fn with_bulk_timeout<T>(
    opts: &RedisOptions,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    super::within(opts.response_timeout.max(BULK_DEADLINE), "scan", async {
        Ok(f.await?)
    })
    .await
}

/// Runs one Redis command with `response_timeout` as an overall deadline, which also covers waiting for a
/// reconnection in progress.
async fn with_response_timeout<T>(
    opts: &RedisOptions,
    operation: &'static str,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    super::within(opts.response_timeout, operation, async { Ok(f.await?) }).await
}

/// `SCAN cursor MATCH glob COUNT 1000`: one page of a pattern deletion.
fn scan_page(cursor: u64, glob: &str) -> redis::Cmd {
    let mut scan = redis::cmd("SCAN");
    scan.arg(cursor)
        .arg("MATCH")
        .arg(glob)
        .arg("COUNT")
        .arg(1000);
    scan
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
            let v: Option<Vec<u8>> = with_response_timeout(&self.opts, "get", async {
                self.ready().await?.get(self.redis_key(key)).await
            })
            .await?;
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
            let cluster = self.is_cluster();
            let mut pipe = redis::pipe();
            pipe.atomic();
            let k = self.redis_key(key);
            match ttl {
                Some(ttl) => pipe.pset_ex(&k, value.as_ref(), millis(ttl)).ignore(),
                None => pipe.set(&k, value.as_ref()).ignore(),
            };
            pipe.del(self.lease_key(key)).ignore();
            for t in tags.iter().filter(|_| !cluster) {
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
            let () = with_response_timeout(&self.opts, "set", async {
                pipe.query_async(&mut self.ready().await?).await
            })
            .await?;
            if cluster && !tags.is_empty() {
                // Recorded after the write: a tag invalidation that took the set meanwhile has deleted the entry
                // or will find it. An entry that could not be recorded is taken out again.
                if let Err(e) = self.tags_add(key, tags, ttl).await {
                    let _ = self.delete_pair(key).await;
                    return Err(e);
                }
            }
            self.replicated(WaitOn::Key(key)).await
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
        self.lease_with(key, token, lease_ttl, tags, false)
            .traced("lease", CacheImpl::Redis, key)
    }

    fn lease_refresh<'a>(
        &'a self,
        key: &'a str,
        token: u64,
        lease_ttl: Duration,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Lookup>> {
        self.lease_with(key, token, lease_ttl, tags, true)
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
            if self.is_cluster() && !tags.is_empty() {
                // Again before the fill, for the entry's TTL (and in case a tag invalidation took the set since
                // the lease: then it also revoked the lease, and the fill below is refused).
                // Recorded before the entry is stored: one deadline longer, so the set outlives the entry.
                self.tags_add(key, tags, Some(ttl + self.opts.response_timeout))
                    .await?;
            }
            let mut inv = self.invocation(&SET_LEASED, key, tags);
            inv.arg(token).arg(value.as_ref()).arg(millis(ttl)).arg(key);
            let n: i64 = with_response_timeout(&self.opts, "set", async {
                inv.invoke_async(&mut self.ready().await?).await
            })
            .await?;
            Ok(n == 1)
        }
        .traced("set_leased", CacheImpl::Redis, key)
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: u64) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut inv = RELEASE.prepare_invoke();
            inv.key(self.lease_key(key)).arg(token);
            let _: i64 = with_response_timeout(&self.opts, "release", async {
                inv.invoke_async(&mut self.ready().await?).await
            })
            .await?;
            Ok(())
        }
        .traced("release_lease", CacheImpl::Redis, key)
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<u64>> {
        async move {
            if self.is_cluster() {
                return self.invalidate_tag_cluster(tag).await;
            }
            let mut inv = INVALIDATE_TAG.prepare_invoke();
            inv.key(self.tag_key(tag))
                .arg(&self.opts.key_prefix)
                .arg(LEASE_SUFFIX);
            let n = with_response_timeout(&self.opts, "invalidate_tag", async {
                inv.invoke_async(&mut self.ready().await?).await
            })
            .await?;
            self.replicated(WaitOn::Server).await?;
            Ok(n)
        }
        .traced("invalidate_tag", CacheImpl::Redis, tag)
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        self.delete_pair(key)
            .traced("delete", CacheImpl::Redis, key)
    }

    fn delete_matching<'a>(
        &'a self,
        prefix: &'a str,
        belongs: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<u64>> {
        async move {
            if self.is_cluster() {
                return self.delete_matching_cluster(prefix, belongs).await;
            }
            let mut c = self.ready().await?;
            // First revoke every lease granted so far, whichever bucket the scan finds it in (or has passed).
            let generation = self.generation_key("");
            let _: i64 = with_response_timeout(
                &self.opts,
                "scan",
                redis::cmd("INCR").arg(&generation).query_async(&mut c),
            )
            .await?;
            let glob = self.scan_glob(prefix);
            let mut cursor: u64 = 0;
            let mut deleted = 0u64;
            loop {
                let scan = scan_page(cursor, &glob);
                let (next, keys): (u64, Vec<String>) =
                    with_response_timeout(&self.opts, "scan", scan.query_async(&mut c)).await?;
                let doomed = self.doomed(&keys, belongs);
                if !doomed.is_empty() {
                    let n: u64 = with_response_timeout(&self.opts, "scan", async {
                        redis::cmd("UNLINK").arg(&doomed).query_async(&mut c).await
                    })
                    .await?;
                    deleted += n;
                }
                if next == 0 {
                    self.replicated(WaitOn::Server).await?;
                    return Ok(deleted);
                }
                cursor = next;
            }
        }
        .traced("delete_matching", CacheImpl::Redis, prefix)
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        async move {
            let start = Instant::now();
            // On a cluster the connection sends PING to every node and fails if one does not answer.
            let r: std::result::Result<String, redis::RedisError> = async {
                redis::cmd("PING")
                    .query_async(&mut self.ready().await?)
                    .await
            }
            .await;
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
