//! The crate's one error type.
//!
//! Cache failures never reach the caller of [`CacheRegistry::get_or_load`](crate::CacheRegistry::get_or_load):
//! they are counted under `cache_errors_total{impl,error_type}` (the label is [`Error::error_type`]) and the
//! loader runs instead (fail-open). They do reach callers of explicit operations such as
//! [`invalidate`](crate::CacheRegistry::invalidate) and [`switch`](crate::CacheRegistry::switch), because a lost
//! invalidation or a refused switch is something the caller must know about.

use std::time::Duration;

/// Everything that can go wrong in cache-rollout.
///
/// Each variant carries the value that was wrong. Use the predicates ([`is_timeout`](Error::is_timeout),
/// [`is_connection`](Error::is_connection)) rather than matching on variants: the enum is `#[non_exhaustive]`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid. `key` is the dotted configuration key (or the environment variable).
    #[error("invalid configuration: {key} = {value:?}: {reason}")]
    Config {
        /// The configuration key, e.g. `cache.impl` or `CACHE_IMPL`.
        key: String,
        /// The offending value as given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The configuration sources could not be read or parsed (figment's message names key and source).
    #[error("configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    /// A cache key that cannot be used (empty, too long, or with whitespace or control characters).
    #[error("invalid cache key {key:?}: {reason}")]
    InvalidKey {
        /// The key (truncated to 200 bytes).
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A key pattern name that cannot be used in a whitelist or a pattern setting.
    #[error("invalid key pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An encoded value is larger than `cache.max_value_bytes`; it was not stored.
    #[error("value of {size} bytes for key {key:?} exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// Encoded size in bytes.
        size: usize,
        /// Configured maximum in bytes.
        max: usize,
    },
    /// A value could not be encoded for the cache.
    #[error("cannot encode value for key {key:?}: {reason}")]
    Encode {
        /// The key.
        key: String,
        /// The serializer's error.
        reason: String,
    },
    /// A cached entry failed its integrity check or could not be decoded. It is treated as a miss and deleted.
    #[error("corrupted cache entry: {0}")]
    Corrupt(String),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    #[cfg(feature = "redis")]
    Redis(#[from] redis::RedisError),
    /// An operation did not finish within its deadline.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation, e.g. `get`.
        operation: &'static str,
        /// The deadline that expired.
        after: Duration,
    },
    /// An I/O error, with the path or address involved.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `reading trace /tmp/x.csv`.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed line in a trace file.
    #[error("line {line}: {reason}")]
    Trace {
        /// 1-based line number.
        line: u64,
        /// What was wrong.
        reason: String,
    },
    /// A trace file that cannot be replayed as a whole: a directory, an empty file, a `.zst` that is not zstd, an
    /// unrecognised format, no request read, or more malformed lines than allowed.
    #[error("trace {path}: {reason}")]
    TraceFile {
        /// The path as given.
        path: String,
        /// What is wrong, and what to try.
        reason: String,
    },
    /// The fleet state could not be written or followed (`docs/scaling.md`).
    #[error("fleet state: {0}")]
    Fleet(String),
    /// `cache-rollout report` could not fetch or read a service's report.
    #[error("report from {url}: {reason}")]
    Report {
        /// The URL asked.
        url: String,
        /// What went wrong (connection, HTTP status, body).
        reason: String,
    },
}

impl Error {
    /// The `error_type` label under which this error is counted in `cache_errors_total`.
    ///
    /// One of `timeout`, `connection`, `redis`, `corrupt`, `too_large`, `encode`, `invalid_key`, `other`.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Timeout { .. } => "timeout",
            #[cfg(feature = "redis")]
            Error::Redis(e) if e.is_timeout() => "timeout",
            #[cfg(feature = "redis")]
            Error::Redis(e) if is_connection_error(e) => "connection",
            #[cfg(feature = "redis")]
            Error::Redis(_) => "redis",
            Error::Corrupt(_) => "corrupt",
            Error::ValueTooLarge { .. } => "too_large",
            Error::Encode { .. } => "encode",
            Error::InvalidKey { .. } => "invalid_key",
            _ => "other",
        }
    }

    /// True when the operation ran out of time (a registry deadline or the Redis response timeout).
    pub fn is_timeout(&self) -> bool {
        self.error_type() == "timeout"
    }

    /// True when the connection to the backend failed (refused, dropped, or being re-established).
    pub fn is_connection(&self) -> bool {
        self.error_type() == "connection"
    }

    /// An [`Error::TraceFile`] for `path`.
    pub fn trace_file(path: &str, reason: impl Into<String>) -> Self {
        Error::TraceFile {
            path: path.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Config`] naming `key`, the bad `value`, and the `reason`.
    pub fn config(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(feature = "redis")]
fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_io_error()
        || e.is_unrecoverable_error()
}

impl From<figment::Error> for Error {
    fn from(e: figment::Error) -> Self {
        Error::Figment(Box::new(e))
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
