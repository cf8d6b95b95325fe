//! What a Redis says about its memory and its eviction (`CONFIG GET`, `INFO memory`, `DBSIZE`).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::analysis::{EvictionPolicy, RedisEviction};
use crate::error::{Error, Result};

/// A Redis's memory limit, use and eviction settings, as read by [`RedisMemory::read`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedisMemory {
    /// `maxmemory`, bytes (0: no limit).
    pub maxmemory_bytes: u64,
    /// `used_memory`, bytes: everything the allocator holds.
    pub used_memory_bytes: u64,
    /// `used_memory_dataset`, bytes: the keys and values (Redis's own estimate).
    pub dataset_bytes: u64,
    /// `used_memory_startup`, bytes: what the server held at start, before any key.
    pub startup_bytes: u64,
    /// Keys in the selected database (`DBSIZE`).
    pub keys: u64,
    /// `maxmemory-policy` as Redis names it.
    pub maxmemory_policy: String,
    /// The eviction the estimators simulate for it (`None` for a policy they do not simulate: `noeviction`,
    /// `allkeys-random`, `volatile-random`, `volatile-ttl`).
    pub eviction: Option<RedisEviction>,
    /// The server's eviction settings whatever its policy: `maxmemory-samples`, `lfu-log-factor` and
    /// `lfu-decay-time` (Redis's defaults where `CONFIG` was refused), with the policy of
    /// [`eviction`](Self::eviction), or `allkeys-lru` when that is `None`.
    pub settings: RedisEviction,
}

impl RedisMemory {
    /// Memory for entries, bytes: `maxmemory` less what the server held at start; `None` without a `maxmemory`.
    pub fn entry_bytes(&self) -> Option<u64> {
        (self.maxmemory_bytes > 0).then(|| self.maxmemory_bytes.saturating_sub(self.startup_bytes))
    }

    /// Reads them from the Redis at `url` (a single server: a `redis+cluster://` URL is refused), on a connection
    /// of its own, within `timeout` in all. A Redis that refuses `CONFIG` (an ACL user without it, a managed Redis)
    /// is read from `INFO memory` alone, which has `maxmemory` and `maxmemory_policy`; its `maxmemory-samples` and
    /// LFU settings are then taken as Redis's defaults.
    ///
    /// # Errors
    /// A URL that does not parse, a Redis that does not answer within `timeout` ([`Error::Timeout`]), or one that
    /// refuses `INFO`.
    pub async fn read(url: &str, timeout: Duration) -> Result<Self> {
        let work = async {
            let client = redis::Client::open(url)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let config: HashMap<String, String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory")
                .arg("maxmemory-policy")
                .arg("maxmemory-samples")
                .arg("lfu-log-factor")
                .arg("lfu-decay-time")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await?;
            let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
            Ok::<_, Error>(Self::parse(&config, &info, keys))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                operation: "reading Redis's memory settings",
                after: timeout,
            }),
        }
    }

    fn parse(config: &HashMap<String, String>, info: &str, keys: u64) -> Self {
        let num = |k: &str| config.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let info_text = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let policy = config
            .get("maxmemory-policy")
            .cloned()
            .or_else(|| info_text("maxmemory_policy"))
            .unwrap_or_default();
        let defaults = RedisEviction::default();
        let settings = RedisEviction {
            policy: defaults.policy,
            samples: num("maxmemory-samples").map_or(defaults.samples, |n| n.clamp(1, 64) as u32),
            lfu_log_factor: num("lfu-log-factor").map_or(defaults.lfu_log_factor, |n| {
                n.min(u64::from(u32::MAX)) as u32
            }),
            lfu_decay_minutes: num("lfu-decay-time").map_or(defaults.lfu_decay_minutes, |n| {
                n.min(u64::from(u32::MAX)) as u32
            }),
        };
        let eviction = EvictionPolicy::from_redis(&policy).map(|p| RedisEviction {
            policy: p,
            ..settings
        });
        RedisMemory {
            maxmemory_bytes: num("maxmemory")
                .or_else(|| info_text("maxmemory").and_then(|v| v.parse().ok()))
                .unwrap_or(0),
            used_memory_bytes: field("used_memory"),
            dataset_bytes: field("used_memory_dataset"),
            startup_bytes: field("used_memory_startup"),
            keys,
            maxmemory_policy: policy,
            eviction,
            settings: eviction.unwrap_or(settings),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_redis_answers() {
        let config = HashMap::from([
            ("maxmemory".to_string(), "8388608".to_string()),
            ("maxmemory-policy".to_string(), "allkeys-lfu".to_string()),
            ("maxmemory-samples".to_string(), "10".to_string()),
            ("lfu-log-factor".to_string(), "10".to_string()),
            ("lfu-decay-time".to_string(), "1".to_string()),
        ]);
        let info = "# Memory\r\nused_memory:1234567\r\nused_memory_human:1.18M\r\nused_memory_dataset:456\r\n";
        let m = RedisMemory::parse(&config, info, 42);
        assert_eq!(m.maxmemory_bytes, 8_388_608);
        assert_eq!(
            (m.used_memory_bytes, m.dataset_bytes, m.keys),
            (1_234_567, 456, 42)
        );
        let e = m.eviction.expect("simulated");
        assert_eq!((e.policy, e.samples), (EvictionPolicy::AllkeysLfu, 10));
        let none = RedisMemory::parse(
            &HashMap::from([("maxmemory-policy".to_string(), "noeviction".to_string())]),
            "",
            0,
        );
        assert_eq!(none.eviction, None);
        assert_eq!(none.maxmemory_bytes, 0);
        // CONFIG refused: INFO alone.
        let info = "used_memory:2000000\r\nused_memory_startup:900000\r\nmaxmemory:67108864\r\n\
                    maxmemory_policy:allkeys-lru\r\n";
        let m = RedisMemory::parse(&HashMap::new(), info, 0);
        assert_eq!(m.maxmemory_bytes, 64 << 20);
        assert_eq!(m.eviction, Some(RedisEviction::default()));
        assert_eq!(m.entry_bytes(), Some((64 << 20) - 900_000));
    }
}
