//! The runtime policy: what `PUT /internal/cache/config`, SIGHUP and [`CacheRegistry::switch`] change.
//!
//! [`CacheRegistry::switch`]: crate::CacheRegistry::switch

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::cache::CacheImpl;
use crate::error::{Error, Result};
use crate::pattern::validate_pattern;

/// Longest accepted TTL: one year, in seconds (Redis and moka accept more, but such a TTL is a unit mistake).
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

fn check_ttl(key: &str, ttl: u64) -> Result<()> {
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(Error::config(
            key,
            ttl.to_string(),
            "must be between 1 and 31536000 seconds (one year)",
        ));
    }
    Ok(())
}

/// The part of the configuration that can change at runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Master switch; `false` sends every call straight to its loader, unmeasured.
    pub enabled: bool,
    /// The backend that serves whitelisted patterns.
    #[serde(rename = "impl")]
    pub imp: CacheImpl,
    /// Key patterns served by `imp`; `["*"]` means all. Every other pattern is observed through the NullCache.
    pub whitelist: Vec<String>,
    /// TTL of patterns without their own, in seconds (at least 1).
    pub default_ttl_secs: u64,
    /// Per-pattern settings.
    pub patterns: BTreeMap<String, PatternPolicy>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            imp: CacheImpl::Null,
            whitelist: Vec::new(),
            default_ttl_secs: 300,
            patterns: BTreeMap::new(),
        }
    }
}

/// Settings of one key pattern (`[cache.patterns.<pattern>]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternPolicy {
    /// TTL in seconds (at least 1); `None`: the default TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A change to the [`Policy`]: the body of `PUT /internal/cache/config`. Absent fields keep their value.
///
/// ```json
/// {"impl": "redis", "whitelist": ["user"], "patterns": {"user": {"ttl_secs": 60}}}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    /// New master switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// New impl.
    #[serde(default, rename = "impl", skip_serializing_if = "Option::is_none")]
    pub imp: Option<CacheImpl>,
    /// New whitelist (replaces the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist: Option<Vec<String>>,
    /// New default TTL in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ttl_secs: Option<u64>,
    /// Per-pattern settings, merged into the current ones pattern by pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patterns: Option<BTreeMap<String, PatternPolicy>>,
}

impl Policy {
    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (`cache.default_ttl_secs`, `cache.patterns.<p>.ttl_secs`) and value, or
    /// [`Error::InvalidPattern`] for a bad whitelist entry or pattern name.
    pub fn validate(&self) -> Result<()> {
        check_ttl("cache.default_ttl_secs", self.default_ttl_secs)?;
        for p in &self.whitelist {
            if p != "*" {
                validate_pattern(p)?;
            }
        }
        for (p, s) in &self.patterns {
            validate_pattern(p)?;
            if let Some(ttl) = s.ttl_secs {
                check_ttl(&format!("cache.patterns.{p}.ttl_secs"), ttl)?;
            }
        }
        Ok(())
    }

    /// This policy with `update` applied.
    ///
    /// # Errors
    /// As [`Policy::validate`] on the result.
    pub fn merged(&self, update: &PolicyUpdate) -> Result<Policy> {
        let mut p = self.clone();
        if let Some(e) = update.enabled {
            p.enabled = e;
        }
        if let Some(i) = update.imp {
            p.imp = i;
        }
        if let Some(w) = &update.whitelist {
            p.whitelist = normalize_whitelist(w);
        }
        if let Some(t) = update.default_ttl_secs {
            p.default_ttl_secs = t;
        }
        if let Some(pats) = &update.patterns {
            for (k, v) in pats {
                p.patterns.insert(k.clone(), v.clone());
            }
        }
        p.validate()?;
        Ok(p)
    }

    pub(crate) fn serves_all(&self) -> bool {
        self.whitelist.iter().any(|p| p == "*")
    }
}

/// Trims, drops empties and duplicates, keeps order.
pub(crate) fn normalize_whitelist<S: AsRef<str>>(items: &[S]) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .iter()
        .map(|s| s.as_ref().trim().to_string())
        .filter(|s| !s.is_empty() && seen.insert(s.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_merges_and_validates() {
        let p = Policy::default();
        let u: PolicyUpdate =
            serde_json::from_str(r#"{"impl":"redis","whitelist":["user"," user ",""]}"#)
                .expect("parses");
        let m = p.merged(&u).expect("valid");
        assert_eq!(m.imp, CacheImpl::Redis);
        assert_eq!(m.whitelist, ["user"]);
        assert!(m.enabled);
        let bad = PolicyUpdate {
            patterns: Some(BTreeMap::from([(
                "user".into(),
                PatternPolicy { ttl_secs: Some(0) },
            )])),
            ..Default::default()
        };
        let e = p.merged(&bad).expect_err("ttl 0");
        assert!(
            e.to_string().contains("cache.patterns.user.ttl_secs"),
            "{e}"
        );
    }

    #[test]
    fn unknown_update_fields_are_rejected() {
        assert!(
            serde_json::from_str::<PolicyUpdate>(r#"{"impl":"redis","whitelits":["user"]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<PolicyUpdate>(r#"{"impl":"redsi"}"#).is_err());
    }

    #[test]
    fn ttl_bounds_are_enforced() {
        let p = Policy {
            default_ttl_secs: MAX_TTL_SECS + 1,
            ..Policy::default()
        };
        assert!(p
            .validate()
            .expect_err("too long")
            .to_string()
            .contains("cache.default_ttl_secs"));
        let p = Policy {
            default_ttl_secs: MAX_TTL_SECS,
            ..Policy::default()
        };
        assert!(p.validate().is_ok());
    }
}
