//! [`Settings`]: the library's configuration, loaded with figment. The library reads only its own namespace, so an
//! application keeps its own keys in the same files: the `[cache]` table (and `app_env`) of the files, the
//! `CACHE_ROLLOUT_CACHE__*` variables and the product's variables. Every other key is left to the application.
//! Later sources override earlier ones:
//!
//! 1. built-in defaults ([`Settings::default`]);
//! 2. `config/default.toml`;
//! 3. `config/<APP_ENV>.toml`;
//! 4. `CACHE_ROLLOUT_<KEY>` environment variables for any key, nested with `__`
//!    (`CACHE_ROLLOUT_CACHE__DEFAULT_TTL_SECS=60`);
//! 5. the product's environment variables:
//!
//! | variable | key |
//! |---|---|
//! | `APP_ENV` | `app_env` (also picks the file of step 3) |
//! | `FEATURE_CACHE` | `cache.enabled` |
//! | `CACHE_IMPL` | `cache.impl` |
//! | `CACHE_PATTERNS` | `cache.whitelist` (comma-separated, `*` for all) |
//! | `REDIS_URL` | `cache.redis.url` |
//! | `CACHE_ADMIN_TOKEN` | `cache.admin_token` |
//!
//! The names a service owns in Redis default from its service name (see [`Settings::load`]): the key prefix
//! `cr:<service>:` and the fleet key `cache-rollout:<service>:fleet` (whose pub/sub channel has the same name).
//!
//! Every key is documented in `docs/configuration.md` and `.env.example`. A bad value is an error that names the
//! key and the value; start-up stops on it. A missing directory or `default.toml` is logged as a warning.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use crate::analysis::AnalysisOptions;
use crate::cache::redact_url;
use crate::cache::{CacheImpl, RedisOptions};
use crate::error::{Error, Result};
use crate::pattern::{KeyPatterns, MAX_PATTERNS_LIMIT};
use crate::policy::{normalize_whitelist, PatternPolicy, Policy};
use crate::registry::RegistryOptions;

/// The deployment environment (`APP_ENV`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppEnv {
    /// Local development (the default): `/internal/` is open.
    #[default]
    Development,
    /// Automated tests.
    Test,
    /// Pre-production.
    Staging,
    /// Production: every path under `/internal/` answers 404.
    Production,
}

impl AppEnv {
    /// The lowercase name, also the name of its configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            AppEnv::Development => "development",
            AppEnv::Test => "test",
            AppEnv::Staging => "staging",
            AppEnv::Production => "production",
        }
    }

    /// `APP_ENV` as read by `std::env::var`: unset is [`AppEnv::Development`].
    ///
    /// # Errors
    /// [`Error::Config`] for a value that is not one of the four names, or not UTF-8.
    pub fn from_var(var: std::result::Result<String, std::env::VarError>) -> Result<Self> {
        match var {
            Err(std::env::VarError::NotPresent) => Ok(AppEnv::Development),
            Err(std::env::VarError::NotUnicode(v)) => Err(Error::config(
                "APP_ENV",
                v.to_string_lossy(),
                "not UTF-8; expected one of development, test, staging, production",
            )),
            Ok(v) => AppEnv::parse(&v),
        }
    }

    /// Parses `APP_ENV`.
    ///
    /// # Errors
    /// [`Error::Config`] naming `APP_ENV` and the value for anything but the four names.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "development" => Ok(AppEnv::Development),
            "test" => Ok(AppEnv::Test),
            "staging" => Ok(AppEnv::Staging),
            "production" => Ok(AppEnv::Production),
            _ => Err(Error::config(
                "APP_ENV",
                value,
                "expected one of development, test, staging, production",
            )),
        }
    }
}

/// The library's settings: `app_env` and the `[cache]` table. Other top-level keys of the files belong to the
/// application and are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// `APP_ENV`.
    pub app_env: AppEnv,
    /// The service these settings are for (not read from the files): the key prefix and the fleet key default
    /// from it. Set by [`Settings::load`]; `""` in [`Settings::default`] (then the defaults are `cr:` and
    /// `cache-rollout:fleet`).
    #[serde(skip)]
    pub service: String,
    /// The `[cache]` table.
    pub cache: CacheSettings,
}

/// The `[cache]` table.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// `FEATURE_CACHE`: master switch; `false` sends every call straight to its loader, unmeasured.
    pub enabled: bool,
    /// `CACHE_ADMIN_TOKEN`: bearer token (16 or more characters) for state-changing `/internal/cache` requests, and
    /// the key that signs the fleet state; unset refuses changes.
    #[serde(
        default,
        deserialize_with = "opt_string_like",
        skip_serializing_if = "Option::is_none"
    )]
    pub admin_token: Option<String>,
    /// `CACHE_IMPL`: `null`, `memory` or `redis`.
    #[serde(rename = "impl")]
    pub cache_impl: CacheImpl,
    /// `CACHE_PATTERNS`: whitelisted key patterns; `*` means all.
    #[serde(deserialize_with = "comma_list")]
    pub whitelist: Vec<String>,
    /// TTL of patterns without their own, in seconds.
    pub default_ttl_secs: u64,
    /// Bound on distinct key patterns (metric series); the rest fold into `other`.
    pub max_patterns: usize,
    /// Key-pattern templates tried before the default rule (`tenant:*:user`).
    pub templates: Vec<String>,
    /// Largest encoded value stored, in bytes.
    pub max_value_bytes: usize,
    /// On the observe path, measure one value size in this many loads.
    pub size_sample_every: u64,
    /// Version of the application's cached value formats; bumping it turns every older entry into a miss.
    pub value_version: u32,
    /// `[cache.memory]`.
    pub memory: MemorySettings,
    /// `[cache.redis]`.
    pub redis: RedisSettings,
    /// `[cache.patterns.<pattern>]`.
    pub patterns: BTreeMap<String, PatternPolicy>,
    /// `[cache.analysis]`: the phase-2 estimators.
    pub analysis: AnalysisOptions,
    /// Deadline of a cache read in milliseconds (per pattern: `[cache.patterns.<p>] read_timeout_ms`).
    pub read_timeout_ms: u64,
    /// Lifetime of a fill lease in milliseconds.
    pub lease_ttl_ms: u64,
    /// Longest wait for another process's fill before loading, in milliseconds.
    pub lease_wait_ms: u64,
    /// `[cache.rollback]`: automatic rollback rules.
    pub rollback: crate::policy::RollbackRules,
    /// `[cache.fleet]`: one rollout state for every instance, in Redis (`docs/scaling.md`).
    #[serde(default)]
    pub fleet: FleetOptions,
    /// Let anyone read `GET /internal/cache` and its report in `staging` (default `false`: reading needs the admin
    /// token there, as changing does). In `development` and `test` reading is always open; in `production` every
    /// path under `/internal/` answers 404.
    #[serde(default)]
    pub internal_reads_open: bool,
    /// Add an RFC 9211 `Cache-Status` header to the responses of candidate routes that made cache calls
    /// ([`CandidateLayer`](crate::http::CandidateLayer)). `None` (the default): on outside `production`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_status_header: Option<bool>,
}

/// The `[cache.memory]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Most entries held.
    pub max_entries: u64,
    /// Most bytes (keys + values) held.
    pub max_bytes: u64,
}

/// The `[cache.redis]` table.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `REDIS_URL`.
    #[serde(deserialize_with = "string_like")]
    pub url: String,
    /// Prefix of every key written to Redis; unset: `cr:<service>:` (see [`Settings::redis_options`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Connection deadline in milliseconds.
    pub connect_timeout_ms: u64,
    /// Per-command response deadline in milliseconds.
    pub response_timeout_ms: u64,
    /// PEM file of a private CA for `rediss://`; unset trusts the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Replicas (a count) that must acknowledge every write and invalidation before it returns (Redis `WAIT`), so
    /// that a failover cannot bring back a value an invalidation removed; 0 (the default) does not wait.
    #[serde(default)]
    pub wait_replicas: u32,
}

/// Where the fleet state lives and how often it is re-read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetOptions {
    /// Follow and publish the fleet state (`cache.fleet.enabled`). Needs an admin token, which signs it.
    pub enabled: bool,
    /// The Redis key holding the state, and the name of its pub/sub channel (`cache.fleet.key`). Instances of one
    /// service share it; each service has its own. Unset: `cache-rollout:<service>:fleet`, filled in by
    /// [`Settings::fleet_options`]; `Fleet::new` refuses `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Re-read period in milliseconds (`cache.fleet.poll_ms`, default 1000, at least 100): a change whose
    /// notification was lost is applied within this long.
    pub poll_ms: u64,
    /// Most names a stored policy's whitelist and per-pattern settings may hold: `cache.max_patterns` (default
    /// 100), filled in by [`Settings::fleet_options`]. Not a key of `[cache.fleet]`.
    #[serde(skip)]
    pub max_patterns: usize,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            enabled: false,
            key: None,
            poll_ms: 1000,
            max_patterns: 100,
        }
    }
}

/// The admin token is shown as `***`.
impl fmt::Debug for CacheSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheSettings")
            .field("enabled", &self.enabled)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("cache_impl", &self.cache_impl)
            .field("whitelist", &self.whitelist)
            .field("default_ttl_secs", &self.default_ttl_secs)
            .field("max_patterns", &self.max_patterns)
            .field("templates", &self.templates)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("size_sample_every", &self.size_sample_every)
            .field("value_version", &self.value_version)
            .field("memory", &self.memory)
            .field("redis", &self.redis)
            .field("patterns", &self.patterns)
            .field("analysis", &self.analysis)
            .field("read_timeout_ms", &self.read_timeout_ms)
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .field("lease_wait_ms", &self.lease_wait_ms)
            .field("rollback", &self.rollback)
            .field("fleet", &self.fleet)
            .finish()
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            app_env: AppEnv::Development,
            service: String::new(),
            cache: CacheSettings {
                enabled: true,
                admin_token: None,
                cache_impl: CacheImpl::Null,
                whitelist: Vec::new(),
                default_ttl_secs: 300,
                max_patterns: 100,
                templates: Vec::new(),
                max_value_bytes: 1024 * 1024,
                size_sample_every: 16,
                value_version: 0,
                memory: MemorySettings {
                    max_entries: 100_000,
                    max_bytes: 256 * 1024 * 1024,
                },
                analysis: AnalysisOptions::default(),
                fleet: FleetOptions::default(),
                internal_reads_open: false,
                cache_status_header: None,
                redis: RedisSettings {
                    url: "redis://127.0.0.1:6379".into(),
                    key_prefix: None,
                    connect_timeout_ms: 500,
                    response_timeout_ms: 100,
                    tls_ca_file: None,
                    wait_replicas: 0,
                },
                patterns: BTreeMap::new(),
                read_timeout_ms: Policy::default().read_timeout_ms,
                lease_ttl_ms: Policy::default().lease_ttl_ms,
                lease_wait_ms: Policy::default().lease_wait_ms,
                rollback: crate::policy::RollbackRules::default(),
            },
        }
    }
}

/// The product's environment variables and the keys they set.
pub(crate) const ENV_VARS: [(&str, &str); 6] = [
    ("APP_ENV", "app_env"),
    ("FEATURE_CACHE", "cache.enabled"),
    ("CACHE_IMPL", "cache.impl"),
    ("CACHE_PATTERNS", "cache.whitelist"),
    ("REDIS_URL", "cache.redis.url"),
    ("CACHE_ADMIN_TOKEN", "cache.admin_token"),
];

/// Shortest admin token accepted, in characters.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The admin token's rule, wherever a token is accepted (configuration, [`AdminToken`](crate::http::AdminToken)):
/// unset, or at least [`MIN_ADMIN_TOKEN_LEN`] characters. The error never holds the token.
pub(crate) fn check_admin_token(token: Option<&str>) -> Result<()> {
    if token.is_some_and(|t| t.chars().count() < MIN_ADMIN_TOKEN_LEN) {
        return Err(Error::config(
            "cache.admin_token (CACHE_ADMIN_TOKEN)",
            "***",
            "must be at least 16 characters",
        ));
    }
    Ok(())
}

/// Checks a service name: 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
///
/// # Errors
/// [`Error::Config`] naming `service` and the value.
pub fn validate_service(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            "service",
            name,
            "must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

impl Settings {
    /// Loads the settings of `service` from `dir` (`default.toml`, `<APP_ENV>.toml`; both optional, a missing
    /// directory or `default.toml` is logged as a warning) and the environment, then validates. Only `app_env` and
    /// the `[cache]` table are read from the files.
    ///
    /// # Errors
    /// [`Error::Config`] or [`Error::Figment`] naming the key, the bad value and where it came from; a bad
    /// `service` name ([`validate_service`]).
    pub fn load(service: &str, dir: impl AsRef<Path>) -> Result<Self> {
        validate_service(service)?;
        let dir = dir.as_ref();
        let app_env = AppEnv::from_var(std::env::var("APP_ENV"))?;
        if !dir.is_dir() {
            tracing::warn!(
                dir = %dir.display(),
                "configuration directory not found: running on built-in defaults and the environment"
            );
        } else if !dir.join("default.toml").is_file() {
            tracing::warn!(
                file = %dir.join("default.toml").display(),
                "configuration file not found"
            );
        }
        let figment = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(dir.join("default.toml")))
            .merge(Toml::file(dir.join(format!("{}.toml", app_env.as_str()))))
            .merge(Env::prefixed("CACHE_ROLLOUT_").split("__"))
            .merge(Env::raw().only(&ENV_VARS.map(|(v, _)| v)).map(|k| {
                let key = ENV_VARS
                    .iter()
                    .find(|(v, _)| k.as_str().eq_ignore_ascii_case(v))
                    .map_or(k.as_str(), |(_, key)| key);
                key.to_string().into()
            }));
        // The master switch moved into [cache]: a `feature_cache = false` left at the top would silently turn
        // caching back on, so it stops start-up. A top-level `admin_token` may be the application's own.
        if figment.find_value("feature_cache").is_ok() {
            return Err(Error::config(
                "feature_cache",
                "(a top-level key)",
                "moved: set cache.enabled in the [cache] table (or FEATURE_CACHE)",
            ));
        }
        if figment.find_value("admin_token").is_ok() {
            tracing::warn!(
                "top-level admin_token is not read by cache-rollout: the admin token is cache.admin_token \
                 (or CACHE_ADMIN_TOKEN)"
            );
        }
        let mut settings: Settings = figment.extract().map_err(name_env_var)?;
        settings.service = service.to_string();
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values serde cannot: URL scheme, TTLs, bounds, pattern names, templates.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the value.
    pub fn validate(&self) -> Result<()> {
        let c = &self.cache;
        let urls = crate::cache::redis_cluster_nodes(&c.redis.url)?
            .unwrap_or_else(|| vec![c.redis.url.clone()]);
        for url in urls {
            match url::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss" | "redis+unix" | "unix") => {
                    if u.fragment() == Some("insecure") {
                        return Err(Error::config(
                            "cache.redis.url (REDIS_URL)",
                            redact_url(&c.redis.url),
                            "#insecure (no certificate check) is not supported; set cache.redis.tls_ca_file instead",
                        ));
                    }
                }
                Ok(u) => {
                    return Err(Error::config(
                        "cache.redis.url (REDIS_URL)",
                        redact_url(&c.redis.url),
                        format!(
                            "scheme {:?} is not redis://, rediss://, redis+cluster:// or rediss+cluster://",
                            u.scheme()
                        ),
                    ))
                }
                Err(e) => {
                    return Err(Error::config(
                        "cache.redis.url (REDIS_URL)",
                        redact_url(&c.redis.url),
                        format!("{e} (in {})", redact_url(&url)),
                    ))
                }
            }
        }
        let positive = [
            ("cache.max_patterns", c.max_patterns as u64),
            ("cache.max_value_bytes", c.max_value_bytes as u64),
            ("cache.size_sample_every", c.size_sample_every),
            ("cache.memory.max_entries", c.memory.max_entries),
            ("cache.memory.max_bytes", c.memory.max_bytes),
            ("cache.redis.connect_timeout_ms", c.redis.connect_timeout_ms),
            (
                "cache.redis.response_timeout_ms",
                c.redis.response_timeout_ms,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(Error::config(key, "0", "must be at least 1"));
            }
        }
        if c.redis.key_prefix.as_deref() == Some("") {
            return Err(Error::config(
                "cache.redis.key_prefix",
                "",
                "must not be empty: pattern deletion and flushes are confined to it",
            ));
        }
        if c.max_patterns > MAX_PATTERNS_LIMIT {
            return Err(Error::config(
                "cache.max_patterns",
                c.max_patterns.to_string(),
                "must be at most 10000",
            ));
        }
        check_admin_token(c.admin_token.as_deref())?;
        // After the URL checks, so that a bad URL is named as such.
        #[cfg(feature = "fleet")]
        if c.fleet.enabled {
            // Checks the key, the poll period and the admin token that signs the state.
            crate::fleet::Fleet::check(
                &self.fleet_options(),
                &self.redis_options(),
                c.admin_token.as_deref().unwrap_or_default(),
            )?;
        }
        #[cfg(not(feature = "fleet"))]
        if c.fleet.enabled {
            return Err(Error::config(
                "cache.fleet.enabled",
                "true",
                "this build of cache-rollout has no `fleet` feature",
            ));
        }
        // A bad pattern name is reported with the key that holds it.
        let named = |key: &'static str| {
            move |e: Error| match e {
                Error::InvalidPattern { pattern, reason } => Error::config(key, pattern, reason),
                e => e,
            }
        };
        KeyPatterns::new(&c.templates).map_err(named("cache.templates"))?;
        c.analysis.validate()?;
        self.policy().validate().map_err(|e| match e {
            Error::InvalidPattern { pattern, reason } => {
                let key = if c.whitelist.contains(&pattern) {
                    "cache.whitelist"
                } else {
                    "cache.patterns"
                };
                Error::config(key, pattern, reason)
            }
            e => e,
        })
    }

    /// The runtime policy these settings describe.
    pub fn policy(&self) -> Policy {
        Policy {
            enabled: self.cache.enabled,
            cache_impl: self.cache.cache_impl,
            whitelist: normalize_whitelist(&self.cache.whitelist),
            default_ttl_secs: self.cache.default_ttl_secs,
            patterns: self.cache.patterns.clone(),
            read_timeout_ms: self.cache.read_timeout_ms,
            lease_ttl_ms: self.cache.lease_ttl_ms,
            lease_wait_ms: self.cache.lease_wait_ms,
            rollback: self.cache.rollback.clone(),
        }
    }

    /// Redis connection options. The key prefix is `cache.redis.key_prefix`, or `cr:<service>:` when unset (`cr:`
    /// without a service name).
    pub fn redis_options(&self) -> RedisOptions {
        let r = &self.cache.redis;
        RedisOptions {
            url: r.url.clone(),
            key_prefix: r.key_prefix.clone().unwrap_or_else(|| {
                if self.service.is_empty() {
                    "cr:".into()
                } else {
                    format!("cr:{}:", self.service)
                }
            }),
            connect_timeout: Duration::from_millis(r.connect_timeout_ms),
            response_timeout: Duration::from_millis(r.response_timeout_ms),
            tls_ca_file: r.tls_ca_file.clone(),
            wait_replicas: r.wait_replicas,
        }
    }

    /// The fleet options. The key (and channel) is `cache.fleet.key`, or `cache-rollout:<service>:fleet` when
    /// unset (`cache-rollout:fleet` without a service name).
    pub fn fleet_options(&self) -> FleetOptions {
        let mut f = self.cache.fleet.clone();
        if f.key.is_none() {
            f.key = Some(if self.service.is_empty() {
                "cache-rollout:fleet".into()
            } else {
                format!("cache-rollout:{}:fleet", self.service)
            });
        }
        f.max_patterns = self.cache.max_patterns;
        f
    }

    /// Options for [`CacheRegistry::new`](crate::CacheRegistry::new).
    ///
    /// # Errors
    /// An invalid template ([`Error::InvalidPattern`]).
    pub fn registry_options(&self) -> Result<RegistryOptions> {
        let c = &self.cache;
        Ok(RegistryOptions {
            policy: self.policy(),
            key_patterns: KeyPatterns::new(&c.templates)?,
            max_patterns: c.max_patterns,
            redis: self.redis_options(),
            memory_max_entries: c.memory.max_entries,
            memory_max_bytes: c.memory.max_bytes,
            max_value_bytes: c.max_value_bytes,
            size_sample_every: c.size_sample_every,
            value_version: c.value_version,
            analysis: c.analysis.clone(),
            clock: None,
        })
    }

    /// The keys that differ between `self` and `next` but only take effect at start-up (a SIGHUP cannot apply
    /// them): environment, key-pattern templates and bound, value limits and version, in-process cache bounds,
    /// the fleet.
    pub(crate) fn restart_only_changes(&self, next: &Settings) -> Vec<&'static str> {
        let (a, b) = (&self.cache, &next.cache);
        [
            ("app_env", self.app_env != next.app_env),
            ("cache.fleet", a.fleet != b.fleet),
            ("cache.templates", a.templates != b.templates),
            ("cache.max_patterns", a.max_patterns != b.max_patterns),
            (
                "cache.internal_reads_open",
                a.internal_reads_open != b.internal_reads_open,
            ),
            (
                "cache.cache_status_header",
                a.cache_status_header != b.cache_status_header,
            ),
            (
                "cache.max_value_bytes",
                a.max_value_bytes != b.max_value_bytes,
            ),
            (
                "cache.size_sample_every",
                a.size_sample_every != b.size_sample_every,
            ),
            ("cache.value_version", a.value_version != b.value_version),
            ("cache.analysis", a.analysis != b.analysis),
            (
                "cache.memory.max_entries",
                a.memory.max_entries != b.memory.max_entries,
            ),
            (
                "cache.memory.max_bytes",
                a.memory.max_bytes != b.memory.max_bytes,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    /// These settings as JSON with secrets redacted: the Redis password and the admin token become `***`.
    pub fn redacted(&self) -> serde_json::Value {
        let mut s = self.clone();
        s.cache.redis.url = redact_url(&s.cache.redis.url);
        if s.cache.admin_token.is_some() {
            s.cache.admin_token = Some("***".into());
        }
        serde_json::to_value(&s).unwrap_or(serde_json::Value::Null)
    }
}

/// Figment names environment keys in upper-case dotted form (`CACHE.IMPL`); say `CACHE_IMPL = "redsi"` instead.
fn name_env_var(e: figment::Error) -> Error {
    let path = e.path.join(".");
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    if from_env {
        if let Some((var, _)) = ENV_VARS.iter().find(|(_, key)| *key == path) {
            if let Ok(value) = std::env::var(var) {
                let value = if *var == "CACHE_ADMIN_TOKEN" {
                    "***".to_string()
                } else if *var == "REDIS_URL" {
                    redact_url(&value)
                } else {
                    value
                };
                return Error::config(*var, value, e.kind.to_string());
            }
        }
    }
    Error::from(e)
}

struct StringLike;

impl serde::de::Visitor<'_> for StringLike {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
}

/// Environment values that look like numbers arrive as numbers; a string setting takes them as text.
fn string_like<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_any(StringLike)
}

fn opt_string_like<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Text(#[serde(deserialize_with = "string_like")] String);
    Ok(Option::<Text>::deserialize(d)?
        .map(|t| t.0)
        .filter(|s| !s.is_empty()))
}

/// A list given as a TOML array or as one comma-separated string (`CACHE_PATTERNS=user,project`).
fn comma_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(#[serde(deserialize_with = "string_like")] String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => normalize_whitelist(&v),
        Either::One(s) => normalize_whitelist(&s.split(',').collect::<Vec<_>>()),
    })
}

#[cfg(test)]
// figment's `Jail` closures return `figment::Error`, which is large; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests;
