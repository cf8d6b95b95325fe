//! One contract, three backends: what every `Cache` promises, checked against the NullCache, the MemoryCache and a
//! real `redis-server`.

mod support;

use std::time::Duration;

use bytes::Bytes;
use cache_rollout::cache::{
    Cache, CacheImpl, Lookup, MemoryCache, NullCache, RedisCache, RedisOptions,
};
use support::{RedisCluster, RedisServer};

async fn redis_cache(server: &RedisServer) -> RedisCache {
    // The contract is about what the backend stores, not about deadlines: this VM stalls a process for 100 ms now
    // and then (measured with plain SETs too), which would fail a 100 ms deadline at random.
    RedisCache::connect(
        RedisOptions::default()
            .with_url(server.url())
            .with_response_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect to the test redis")
}

async fn cluster_cache(cluster: &RedisCluster) -> RedisCache {
    let c = RedisCache::connect(
        RedisOptions::default()
            .with_url(cluster.url())
            .with_response_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect to the test cluster");
    assert!(c.is_cluster());
    c
}

fn keyslot(raw: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(raw)
        .expect("CLUSTER KEYSLOT")
}

/// What a storing backend must do.
async fn storing_contract(c: &dyn Cache) {
    assert_eq!(c.get("user:1").await.expect("get"), None, "empty at first");
    c.set("user:1", Bytes::from_static(b"ada"), None)
        .await
        .expect("set");
    assert_eq!(
        c.get("user:1").await.expect("get").as_deref(),
        Some(&b"ada"[..])
    );

    c.set("user:1", Bytes::from_static(b"grace"), None)
        .await
        .expect("overwrite");
    assert_eq!(
        c.get("user:1").await.expect("get").as_deref(),
        Some(&b"grace"[..])
    );

    assert!(
        c.delete("user:1").await.expect("delete"),
        "delete reports a present key"
    );
    assert!(
        !c.delete("user:1").await.expect("delete"),
        "and an absent one"
    );
    assert_eq!(c.get("user:1").await.expect("get"), None);

    // Empty and binary values survive.
    c.set("bin:1", Bytes::new(), None).await.expect("set empty");
    assert_eq!(
        c.get("bin:1").await.expect("get").as_deref(),
        Some(&b""[..])
    );
    let bin: Vec<u8> = (0..=255).collect();
    c.set("bin:2", Bytes::from(bin.clone()), None)
        .await
        .expect("set binary");
    assert_eq!(
        c.get("bin:2").await.expect("get").as_deref(),
        Some(&bin[..])
    );

    // TTL: gone after it expires.
    c.set(
        "ttl:1",
        Bytes::from_static(b"x"),
        Some(Duration::from_millis(200)),
    )
    .await
    .expect("set ttl");
    assert!(c.get("ttl:1").await.expect("get").is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.get("ttl:1").await.expect("get"), None, "expired");

    // Pattern deletion removes exactly the keys the predicate accepts under the prefix.
    for k in [
        "user:1",
        "user:2",
        "user:3:profile",
        "username:1",
        "project:1",
    ] {
        c.set(k, Bytes::from_static(b"v"), None).await.expect("set");
    }
    let only_user = |k: &str| k.split(':').count() == 2 && k.starts_with("user:");
    let n = c
        .delete_matching("user", &only_user)
        .await
        .expect("delete_matching");
    assert_eq!(n, 2);
    assert_eq!(c.get("user:1").await.expect("get"), None);
    assert_eq!(c.get("user:2").await.expect("get"), None);
    for k in ["user:3:profile", "username:1", "project:1"] {
        assert!(c.get(k).await.expect("get").is_some(), "{k} must survive");
    }

    leases_and_tags(c).await;

    let h = c.health().await;
    assert!(h.up, "healthy: {h:?}");
}

/// Leases (no stale sets, one filler) and tags, the same on every storing backend.
async fn leases_and_tags(c: &dyn Cache) {
    let ttl = Duration::from_secs(60);
    let lease = Duration::from_secs(5);
    // One caller gets the lease; the next one is told it is held.
    assert_eq!(
        c.lease("l:1", 11, lease, &[]).await.expect("lease"),
        Lookup::Lease(11)
    );
    assert_eq!(
        c.lease("l:1", 12, lease, &[]).await.expect("lease"),
        Lookup::Held
    );
    // The cache-aside race: an invalidation between the lease and the fill revokes the lease.
    assert!(c.delete("l:1").await.is_ok());
    assert!(
        !c.set_leased("l:1", Bytes::from_static(b"old"), ttl, 11, &[])
            .await
            .expect("set_leased"),
        "a revoked lease cannot fill"
    );
    assert_eq!(
        c.get("l:1").await.expect("get"),
        None,
        "nothing stale stored"
    );
    // A fresh lease fills, once.
    assert_eq!(
        c.lease("l:1", 13, lease, &[]).await.expect("lease"),
        Lookup::Lease(13)
    );
    assert!(c
        .set_leased("l:1", Bytes::from_static(b"new"), ttl, 13, &[])
        .await
        .expect("fill"));
    assert_eq!(
        c.get("l:1").await.expect("get").as_deref(),
        Some(&b"new"[..])
    );
    assert!(
        !c.set_leased("l:1", Bytes::from_static(b"again"), ttl, 13, &[])
            .await
            .expect("fill"),
        "a lease fills once"
    );
    assert_eq!(
        c.lease("l:1", 14, lease, &[]).await.expect("lease"),
        Lookup::Hit(Bytes::from_static(b"new"))
    );
    // A released lease frees the key for the next caller; releasing someone else's lease does nothing.
    assert_eq!(
        c.lease("l:3", 41, lease, &[]).await.expect("lease"),
        Lookup::Lease(41)
    );
    c.release_lease("l:3", 99).await.expect("release");
    assert_eq!(
        c.lease("l:3", 42, lease, &[]).await.expect("lease"),
        Lookup::Held
    );
    c.release_lease("l:3", 41).await.expect("release");
    assert_eq!(
        c.lease("l:3", 43, lease, &[]).await.expect("lease"),
        Lookup::Lease(43)
    );
    // A pattern deletion revokes the leases of its keys, even of keys that hold nothing yet.
    assert_eq!(
        c.lease("p:1", 51, lease, &[]).await.expect("lease"),
        Lookup::Lease(51)
    );
    c.delete_matching("p:", &|k: &str| k.starts_with("p:"))
        .await
        .expect("delete_matching");
    assert!(
        !c.set_leased("p:1", Bytes::from_static(b"old"), ttl, 51, &[])
            .await
            .expect("set_leased"),
        "a pattern deletion revokes the leases of its keys"
    );
    // An application write revokes a lease too.
    assert_eq!(
        c.lease("l:2", 21, lease, &[]).await.expect("lease"),
        Lookup::Lease(21)
    );
    c.set("l:2", Bytes::from_static(b"written"), Some(ttl))
        .await
        .expect("set");
    assert!(!c
        .set_leased("l:2", Bytes::from_static(b"loaded"), ttl, 21, &[])
        .await
        .expect("set_leased"));
    assert_eq!(
        c.get("l:2").await.expect("get").as_deref(),
        Some(&b"written"[..])
    );
    // Tags: entries stored with a tag go with it; a lease taken with a tag is revoked with it.
    let team = ["team:1".to_string()];
    c.set_tagged("t:1", Bytes::from_static(b"a"), Some(ttl), &team)
        .await
        .expect("set_tagged");
    assert_eq!(
        c.lease("t:2", 31, lease, &team).await.expect("lease"),
        Lookup::Lease(31)
    );
    assert!(c
        .set_leased("t:2", Bytes::from_static(b"b"), ttl, 31, &team)
        .await
        .expect("fill"));
    assert_eq!(
        c.lease("t:3", 32, lease, &team).await.expect("lease"),
        Lookup::Lease(32)
    );
    c.set("t:4", Bytes::from_static(b"untagged"), Some(ttl))
        .await
        .expect("set");
    assert_eq!(c.invalidate_tag("team:1").await.expect("invalidate_tag"), 2);
    assert_eq!(c.get("t:1").await.expect("get"), None);
    assert_eq!(c.get("t:2").await.expect("get"), None);
    assert!(
        !c.set_leased("t:3", Bytes::from_static(b"c"), ttl, 32, &team)
            .await
            .expect("set_leased"),
        "the tag's invalidation revoked the lease in flight"
    );
    assert!(
        c.get("t:4").await.expect("get").is_some(),
        "other keys stay"
    );
    assert_eq!(c.invalidate_tag("team:1").await.expect("again"), 0);
}

#[tokio::test]
async fn null_cache_stores_nothing_and_never_fails() {
    let c = NullCache;
    assert_eq!(c.kind(), CacheImpl::Null);
    assert!(c.always_misses());
    c.set("user:1", Bytes::from_static(b"ada"), None)
        .await
        .expect("set never fails");
    assert_eq!(c.get("user:1").await.expect("get never fails"), None);
    assert!(!c.delete("user:1").await.expect("delete never fails"));
    assert_eq!(
        c.delete_matching("", &|_| true).await.expect("never fails"),
        0
    );
    assert!(c.health().await.up);
}

#[tokio::test]
async fn memory_cache_meets_the_contract() {
    let c = MemoryCache::new(1000, 1 << 20);
    assert_eq!(c.kind(), CacheImpl::Memory);
    storing_contract(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_meets_the_contract() {
    let server = RedisServer::start();
    let c = redis_cache(&server).await;
    assert_eq!(c.kind(), CacheImpl::Redis);
    storing_contract(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_meets_the_contract() {
    let cluster = RedisCluster::start();
    let c = cluster_cache(&cluster).await;
    storing_contract(&c).await; // leases and tags included
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_keys_spread_over_every_primary_and_pattern_deletion_scans_them_all() {
    let cluster = RedisCluster::start();
    let c = cluster_cache(&cluster).await;
    let mut raw = cluster.nodes[0].conn();
    // A key, its lease and its generation share the key's own slot (so the lease scripts may run); an
    // application's hash tag is honoured.
    for key in ["user:1", "order:77", "{u7}:profile", "}odd{", "a{}b"] {
        let slot = keyslot(&mut raw, key);
        assert_eq!(keyslot(&mut raw, &c.redis_key(key)), slot, "{key}");
        assert_eq!(keyslot(&mut raw, &c.lease_key(key)), slot, "{key}");
        assert_eq!(keyslot(&mut raw, &c.generation_key(key)), slot, "{key}");
    }
    assert_eq!(
        keyslot(&mut raw, &c.redis_key("{u7}:profile")),
        keyslot(&mut raw, &c.redis_key("{u7}:orders"))
    );
    for i in 0..1500 {
        c.set(&format!("user:{i}"), Bytes::from_static(b"v"), None)
            .await
            .expect("set");
        c.set(&format!("order:{i}"), Bytes::from_static(b"o"), None)
            .await
            .expect("set");
    }
    let spread = cluster.keys_per_primary();
    assert_eq!(spread.len(), 3);
    for (port, n) in &spread {
        assert!(
            *n > 600,
            "primary {port} holds {n} of 3000 keys: {spread:?}"
        );
    }
    // A lease granted before the deletion cannot fill afterwards, whichever slot its key is in.
    let ttl = Duration::from_secs(60);
    for (i, key) in ["user:lease", "order:lease"].iter().enumerate() {
        assert_eq!(
            c.lease(key, 7 + i as u64, ttl, &[]).await.expect("lease"),
            Lookup::Lease(7 + i as u64)
        );
    }
    let n = c
        .delete_matching("user", &|k| k.starts_with("user:"))
        .await
        .expect("delete_matching");
    assert_eq!(
        n, 1501,
        "every user key on every primary, and the lease of user:lease"
    );
    assert_eq!(c.get("user:42").await.expect("get"), None);
    assert!(
        c.get("order:42").await.expect("get").is_some(),
        "other patterns stay"
    );
    for (i, key) in ["user:lease", "order:lease"].iter().enumerate() {
        assert!(
            !c.set_leased(key, Bytes::from_static(b"old"), ttl, 7 + i as u64, &[])
                .await
                .expect("set_leased"),
            "{key}: a pattern deletion revokes every lease granted before it"
        );
    }
    // A tag invalidation interrupted after it took the members (a crash, a cancelled call) leaves them in the tag's
    // pending set; the next invalidation of the tag deletes them.
    let team = ["team:9".to_string()];
    c.set_tagged("t:9", Bytes::from_static(b"v"), Some(ttl), &team)
        .await
        .expect("set_tagged");
    let tk = c.tag_key("team:9");
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let mut cc = redis::cluster::ClusterClient::new(nodes)
        .and_then(|c| c.get_connection())
        .expect("a cluster connection");
    // What an interrupted invalidation leaves: the set gone, its members marked in the pending hash.
    let _: i64 = redis::cmd("DEL").arg(&tk).query(&mut cc).expect("DEL");
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{tk} ~pending"))
        .arg("t:9")
        .arg("an-interrupted-invalidation")
        .query(&mut cc)
        .expect("the members made pending, as an interrupted invalidation leaves them");
    assert!(c.get("t:9").await.expect("get").is_some());
    assert_eq!(c.invalidate_tag("team:9").await.expect("invalidate_tag"), 1);
    assert_eq!(c.get("t:9").await.expect("get"), None);
    let pending: i64 = redis::cmd("EXISTS")
        .arg(format!("{tk} ~pending"))
        .query(&mut cc)
        .expect("exists");
    assert_eq!(pending, 0, "nothing left pending");

    // A flush removes the rest but never a generation (a lease of generation 0 would be valid again).
    let t = std::time::Instant::now();
    c.delete_matching("", &|_| true).await.expect("flush");
    eprintln!("cluster flush: {:?}", t.elapsed());
    let left: u64 = cluster.keys_per_primary().iter().map(|(_, n)| n).sum();
    assert_eq!(left, 16_384, "only the 16,384 slot generations remain");
    let generations: Vec<String> = cluster
        .primaries()
        .into_iter()
        .filter_map(|i| {
            redis::Cmd::get(c.generation_key("order:42"))
                .query::<Option<String>>(&mut cluster.nodes[i].conn())
                .ok()
                .flatten()
        })
        .collect();
    assert_eq!(
        generations,
        ["2"],
        "held by one primary, moved by both deletions"
    );
}

#[tokio::test]
async fn memory_cache_is_bounded_in_entries_and_bytes() {
    let c = MemoryCache::new(100, 1 << 20);
    for i in 0..1000 {
        c.set(&format!("k:{i}"), Bytes::from_static(b"v"), None)
            .await
            .expect("set");
    }
    c.run_pending_tasks().await;
    assert!(c.entry_count() <= 100, "entries {}", c.entry_count());

    let c = MemoryCache::new(1_000_000, 10_000);
    for i in 0..100 {
        c.set(&format!("k:{i}"), Bytes::from(vec![0u8; 1000]), None)
            .await
            .expect("set");
    }
    c.run_pending_tasks().await;
    assert!(
        c.entry_count() <= 10,
        "10 kB holds at most ten 1 kB values, found {}",
        c.entry_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_live_under_the_prefix_and_pattern_deletion_uses_scan() {
    // KEYS is disabled on this server: a pattern deletion that used it would fail.
    let server = RedisServer::start_with(&["--rename-command", "KEYS", ""]);
    let c = redis_cache(&server).await;
    let mut raw = server.conn();
    // A foreign key in the same database is never touched.
    let () = redis::cmd("SET")
        .arg("user:9")
        .arg("foreign")
        .query(&mut raw)
        .expect("set foreign");
    for i in 0..2500 {
        c.set(&format!("user:{i}"), Bytes::from_static(b"v"), None)
            .await
            .expect("set");
    }
    let v: Option<Vec<u8>> = redis::cmd("GET")
        .arg("cr:user:1")
        .query(&mut raw)
        .expect("get raw");
    assert_eq!(v.as_deref(), Some(&b"v"[..]), "stored under the cr: prefix");
    let n = c
        .delete_matching("user", &|_| true)
        .await
        .expect("delete_matching");
    assert_eq!(n, 2500, "SCAN visits every key across cursor pages");
    let foreign: Option<String> = redis::cmd("GET")
        .arg("user:9")
        .query(&mut raw)
        .expect("get");
    assert_eq!(foreign.as_deref(), Some("foreign"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pattern_deletion_revokes_every_lease_granted_before_it() {
    // SCAN cannot remove a key and its lease at one instant, so a deletion first moves the lease generation: a
    // lease granted before any pattern deletion (of any pattern) can no longer fill.
    let server = RedisServer::start();
    let c = redis_cache(&server).await;
    let ttl = Duration::from_secs(60);
    assert_eq!(
        c.lease("a:1", 7, ttl, &[]).await.expect("lease"),
        Lookup::Lease(7)
    );
    c.delete_matching("zzz", &|_| false)
        .await
        .expect("delete_matching");
    assert!(!c
        .set_leased("a:1", Bytes::from_static(b"v"), ttl, 7, &[])
        .await
        .expect("set_leased"));
    let mut raw = server.conn();
    let generation: Option<String> = redis::cmd("GET")
        .arg(c.generation_key("a:1"))
        .query(&mut raw)
        .expect("get");
    assert_eq!(generation.as_deref(), Some("1"));
    c.delete_matching("", &|_| true).await.expect("flush");
    let generation: Option<String> = redis::cmd("GET")
        .arg(c.generation_key("a:1"))
        .query(&mut raw)
        .expect("get");
    assert_eq!(
        generation.as_deref(),
        Some("2"),
        "a flush never resets the generation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connect_fails_fast_when_nothing_listens() {
    let port = support::free_port();
    let r = RedisCache::connect(
        RedisOptions::default()
            .with_url(format!("redis://127.0.0.1:{port}"))
            .with_connect_timeout(Duration::from_millis(300)),
    )
    .await;
    let e = r.expect_err("nothing listens");
    assert!(
        e.is_connection() || e.is_timeout(),
        "{e} ({})",
        e.error_type()
    );
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let st = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(st.success(), "openssl {args:?}");
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=cache-rollout test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = support::free_port();
    let _server = Killed(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
            ])
            .args(["--tls-auth-clients", "no"])
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server with TLS"),
    );
    let opts = RedisOptions::default()
        .with_url(format!("rediss://127.0.0.1:{port}"))
        .with_tls_ca_file(Some(d.join("ca.pem")));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let c = loop {
        match RedisCache::connect(opts.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "TLS redis never answered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    storing_contract(&c).await;

    // Without the private CA the server's certificate is not trusted.
    let untrusted = RedisCache::connect(opts.with_tls_ca_file(None)).await;
    assert!(
        untrusted.is_err(),
        "a certificate from an unknown CA must be refused"
    );
}
