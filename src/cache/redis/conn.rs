//! The connection: one Redis through a `ConnectionManager` or a cluster through a `ClusterConnection`, the
//! clients per node for pub/sub, and the checks and TLS set-up they share.

use super::*;

/// A connection to one Redis ([`ConnectionManager`]) or to a cluster ([`ClusterConnection`], opened on first use
/// and kept). Cheap to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

pub(crate) struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

/// An open connection, as [`Conn::ready`] returns it.
#[derive(Clone)]
pub(crate) enum Ready {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Ready {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Ready::Single(c) => c.req_packed_command(cmd),
            Ready::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Ready::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Ready::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Ready::Single(c) => c.get_db(),
            Ready::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// A connection for `opts.url` that connects on first use (a single Redis: and reconnects after a failure;
    /// a cluster: and follows its slot map), each command bounded by `response_timeout`.
    ///
    /// # Errors
    /// [`Error::Redis`] for a URL that cannot be parsed; [`Error::Io`] for an unreadable `tls_ca_file`;
    /// [`Error::Config`] for an empty `key_prefix` or an empty cluster node list.
    pub(crate) fn lazy(
        opts: &RedisOptions,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Conn> {
        check_prefix(opts)?;
        let ca = read_ca(opts)?;
        if let Some(nodes) = cluster_nodes(&opts.url)? {
            let mut b = ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_timeout)
                // Every call is bounded by its own deadline (`with_response_timeout`); this backstop must let the bulk steps of
                // a pattern deletion (pipelines of 1,024 INCRs, SCAN pages) have their longer one.
                .response_timeout(response_timeout.max(BULK_DEADLINE))
                // As for a single Redis: callers are bounded by their own deadline, and during an outage each
                // command should fail fast and fall back rather than queue behind a long back-off.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(100);
            if let Some(pem) = ca {
                b = b.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                });
            }
            return Ok(Conn::Cluster(Arc::new(LazyCluster {
                client: b.build()?,
                conn: tokio::sync::OnceCell::new(),
            })));
        }
        let client = single_client(opts, ca)?;
        Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
            client,
            manager_config(connect_timeout, response_timeout),
        )?))
    }

    /// As [`lazy`](Self::lazy), but connected now: a single Redis within `connect_timeout` (the manager's own
    /// connection deadline), a cluster's slot map and nodes within `connect_timeout` overall.
    ///
    /// # Errors
    /// As [`lazy`](Self::lazy), and [`Error::Redis`] or [`Error::Timeout`] when Redis cannot be reached.
    pub(crate) async fn eager(
        opts: &RedisOptions,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Conn> {
        if cluster_nodes(&opts.url)?.is_some() {
            let conn = Self::lazy(opts, connect_timeout, response_timeout)?;
            crate::cache::within(connect_timeout, "connect", async {
                Ok(conn.ready().await?)
            })
            .await?;
            return Ok(conn);
        }
        check_prefix(opts)?;
        let client = single_client(opts, read_ca(opts)?)?;
        Ok(Conn::Single(
            ConnectionManager::new_with_config(
                client,
                manager_config(connect_timeout, response_timeout),
            )
            .await?,
        ))
    }

    /// The open connection, connecting a cluster first if it is not yet (concurrent callers wait for one attempt;
    /// a failed attempt is tried again by the next call).
    pub(crate) async fn ready(&self) -> redis::RedisResult<Ready> {
        match self {
            Conn::Single(c) => Ok(Ready::Single(c.clone())),
            Conn::Cluster(l) => {
                let c = l
                    .conn
                    .get_or_try_init(|| l.client.get_async_connection())
                    .await?;
                Ok(Ready::Cluster(c.clone()))
            }
        }
    }
}

pub(super) fn manager_config(
    connect_timeout: Duration,
    response_timeout: Duration,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        // Reconnection is on demand (the next command after a failure starts it). Keep its own retries short:
        // callers are bounded by `with_response_timeout` below anyway, and during an outage each command should fail fast and
        // fall back to the loader rather than queue behind a long back-off.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(100))
}

/// One plain client per node of `opts.url` (one for a single Redis): for pub/sub, which a cluster delivers on
/// every node.
///
/// # Errors
/// As [`Conn::lazy`].
pub(crate) fn node_clients(opts: &RedisOptions) -> Result<Vec<redis::Client>> {
    check_prefix(opts)?;
    let ca = read_ca(opts)?;
    match cluster_nodes(&opts.url)? {
        None => Ok(vec![single_client(opts, ca)?]),
        Some(nodes) => nodes
            .into_iter()
            .map(|url| {
                single_client(
                    &RedisOptions {
                        url,
                        ..opts.clone()
                    },
                    ca.clone(),
                )
            })
            .collect(),
    }
}

/// Subscribes to `channel` through one of `nodes` (a cluster delivers every `PUBLISH` on every node), starting
/// with node `next` and moving `next` on after a failure, so the next attempt tries another node.
///
/// # Errors
/// [`Error::Redis`] when that node cannot be reached or refuses.
pub(crate) async fn subscribe(
    nodes: &[redis::Client],
    next: &std::sync::atomic::AtomicUsize,
    channel: &str,
) -> Result<redis::aio::PubSub> {
    use std::sync::atomic::Ordering;
    let i = next.load(Ordering::Relaxed) % nodes.len().max(1);
    let Some(node) = nodes.get(i) else {
        return Err(Error::config(
            "REDIS_URL",
            "",
            "no node to subscribe through",
        ));
    };
    let subscribed = async {
        let mut pubsub = node.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    }
    .await;
    subscribed.map_err(|e| {
        next.fetch_add(1, Ordering::Relaxed);
        e.into()
    })
}

pub(super) fn check_prefix(opts: &RedisOptions) -> Result<()> {
    if opts.key_prefix.is_empty() {
        // Pattern deletion and the flush of a newly active backend are confined to the prefix; an empty prefix
        // would let them delete every key in the database.
        return Err(Error::config(
            "cache.redis.key_prefix",
            "",
            "must not be empty",
        ));
    }
    if opts.key_prefix.contains(['{', '}']) && cluster_nodes(&opts.url)?.is_some() {
        return Err(Error::config(
            "cache.redis.key_prefix",
            &opts.key_prefix,
            "must not contain { or } on a cluster (it would become every key's hash tag: one slot for all)",
        ));
    }
    Ok(())
}

pub(super) fn read_ca(opts: &RedisOptions) -> Result<Option<Vec<u8>>> {
    opts.tls_ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| Error::Io {
                context: format!("reading cache.redis.tls_ca_file {}", path.display()),
                source,
            })
        })
        .transpose()
}

/// A client for a single Redis at `opts.url`; with a CA's PEM, one that trusts that CA (rustls, ring provider).
pub(super) fn single_client(opts: &RedisOptions, ca: Option<Vec<u8>>) -> Result<redis::Client> {
    match ca {
        None => Ok(redis::Client::open(opts.url.as_str())?),
        Some(pem) => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Ok(redis::Client::build_with_tls(opts.url.as_str(), certs)?)
        }
    }
}
