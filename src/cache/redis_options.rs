//! [`RedisOptions`]: where Redis is and how the registry talks to it. Plain data, so that the configuration is
//! read and checked whether or not the crate is built with the `redis` feature.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// How to reach Redis. Built from [`RedisOptions::default`] with the `with_*` setters, each of which states its
/// default.
///
/// ```
/// use cache_rollout::cache::RedisOptions;
/// use std::time::Duration;
///
/// let redis = RedisOptions::default()
///     .with_url("redis://127.0.0.1:6390")
///     .with_key_prefix("cr:bookshop:")
///     .with_response_timeout(Duration::from_millis(50));
/// assert_eq!(redis.connect_timeout, Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Replicas that must acknowledge each write and invalidation (Redis `WAIT`, within `response_timeout`)
    /// before it returns; fewer is an [`Error::Timeout`] of operation `wait`, and the caller knows the
    /// invalidation may not survive a failover. 0 does not wait.
    pub wait_replicas: u32,
}

impl RedisOptions {
    /// `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL. Default: `redis://127.0.0.1:6379`.
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Prefix of every key, not empty. Default: `cr:` (from a service name: `cr:<service>:`).
    #[must_use]
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Deadline for establishing a connection. Default: 500 ms.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline of each command's response. Default: 100 ms.
    #[must_use]
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// PEM file of a private CA for `rediss://`; `None` trusts the system's roots. Default: `None`.
    #[must_use]
    pub fn with_tls_ca_file(mut self, path: Option<PathBuf>) -> Self {
        self.tls_ca_file = path;
        self
    }

    /// Replicas (a count) that must acknowledge each write and invalidation. Default: 0 (no wait).
    #[must_use]
    pub fn with_wait_replicas(mut self, replicas: u32) -> Self {
        self.wait_replicas = replicas;
        self
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "cr:".into(),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(100),
            tls_ca_file: None,
            wait_replicas: 0,
        }
    }
}

/// The nodes of a `redis+cluster://` or `rediss+cluster://` URL as one `redis://` (`rediss://`) URL each, with
/// the URL's credentials and path; `None` for any other URL.
///
/// # Errors
/// [`Error::Config`] for a cluster URL without a node.
pub(crate) fn cluster_nodes(url: &str) -> Result<Option<Vec<String>>> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("redis+cluster", rest)) => ("redis", rest),
        Some(("rediss+cluster", rest)) => ("rediss", rest),
        _ => return Ok(None),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{userinfo}{h}{path}"))
        .collect();
    if nodes.is_empty() {
        return Err(Error::config(
            "cache.redis.url (REDIS_URL)",
            redact_url(url),
            "a cluster URL lists its nodes: redis+cluster://host1:port1,host2:port2",
        ));
    }
    Ok(Some(nodes))
}

/// `url` with its password (and a username used as a password, as in `redis://:secret@host`) replaced by `***`.
/// In an unparsable URL everything before the last `@` is replaced, since it may hold a password.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Without a parse we cannot find the password; everything before the last '@' may be credentials.
        Err(_) => match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        },
    }
}
