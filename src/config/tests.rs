//! The configuration's tests: loading, precedence, validation, redaction, and a property over any value.

use super::*;
use figment::Jail;

fn load(jail: &Jail) -> Result<Settings> {
    Settings::load("test-svc", jail.directory().join("config"))
}

fn err_text(r: Result<Settings>) -> String {
    r.expect_err("should be rejected").to_string()
}

#[test]
fn defaults_without_files_or_env() {
    Jail::expect_with(|jail| {
        let s = load(jail).expect("defaults load");
        assert_eq!(s.app_env, AppEnv::Development);
        assert!(s.cache.enabled);
        assert_eq!(s.cache.cache_impl, CacheImpl::Null);
        assert!(s.cache.whitelist.is_empty());
        assert_eq!(s.cache.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(s.cache.admin_token, None);
        assert_eq!(s.redis_options().key_prefix, "cr:test-svc:");
        assert_eq!(
            s.fleet_options().key.as_deref(),
            Some("cache-rollout:test-svc:fleet")
        );
        Ok(())
    });
}

#[test]
fn env_file_overrides_default_file_and_env_overrides_both() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            "[cache]\nimpl = \"memory\"\ndefault_ttl_secs = 10\nwhitelist = [\"a\"]\n",
        )?;
        jail.create_file(
            "config/staging.toml",
            "[cache]\ndefault_ttl_secs = 20\nwhitelist = [\"b\"]\n",
        )?;
        jail.set_env("APP_ENV", "staging");
        let s = load(jail).expect("loads");
        assert_eq!(s.cache.cache_impl, CacheImpl::Memory, "from default.toml");
        assert_eq!(
            s.cache.default_ttl_secs, 20,
            "staging.toml beats default.toml"
        );
        assert_eq!(s.cache.whitelist, ["b"]);
        jail.set_env("CACHE_PATTERNS", "user, project");
        jail.set_env("CACHE_IMPL", "null");
        jail.set_env("CACHE_ROLLOUT_CACHE__DEFAULT_TTL_SECS", "30");
        let s = load(jail).expect("loads");
        assert_eq!(s.cache.whitelist, ["user", "project"], "env beats files");
        assert_eq!(s.cache.cache_impl, CacheImpl::Null);
        assert_eq!(s.cache.default_ttl_secs, 30);
        Ok(())
    });
}

#[test]
fn product_env_vars_map_to_their_keys() {
    Jail::expect_with(|jail| {
        jail.set_env("FEATURE_CACHE", "false");
        jail.set_env("REDIS_URL", "redis://:s3cret@127.0.0.1:7000/2");
        jail.set_env("CACHE_ADMIN_TOKEN", "1234567890123456");
        jail.set_env("CACHE_PATTERNS", "*");
        let s = load(jail).expect("loads");
        assert!(!s.cache.enabled);
        assert_eq!(s.cache.redis.url, "redis://:s3cret@127.0.0.1:7000/2");
        assert_eq!(
            s.cache.admin_token.as_deref(),
            Some("1234567890123456"),
            "a numeric token stays text"
        );
        assert_eq!(s.cache.whitelist, ["*"]);
        let shown = s.redacted().to_string();
        assert!(
            !shown.contains("s3cret") && !shown.contains("1234567890123456"),
            "{shown}"
        );
        Ok(())
    });
}

#[test]
fn bad_values_name_key_and_value() {
    Jail::expect_with(|jail| {
        jail.set_env("CACHE_IMPL", "redsi");
        let e = err_text(load(jail));
        assert!(e.contains("redsi") && e.contains("CACHE_IMPL"), "{e}");
        jail.set_env("CACHE_IMPL", "null");

        jail.set_env("APP_ENV", "prod");
        let e = err_text(load(jail));
        assert!(e.contains("APP_ENV") && e.contains("prod"), "{e}");
        jail.set_env("APP_ENV", "development");

        jail.set_env("REDIS_URL", "http//nope");
        let e = err_text(load(jail));
        assert!(e.contains("REDIS_URL") && e.contains("http//nope"), "{e}");
        jail.set_env("REDIS_URL", "http://127.0.0.1:6379");
        let e = err_text(load(jail));
        assert!(e.contains("cache.redis.url") && e.contains("http"), "{e}");
        jail.set_env("REDIS_URL", "redis://127.0.0.1:6379");

        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            "[cache.patterns.user]\nttl_secs = -5\n",
        )?;
        let e = err_text(load(jail));
        assert!(e.contains("ttl_secs") && e.contains("-5"), "{e}");

        jail.create_file("config/default.toml", "[cache]\ndefault_ttl_secs = 0\n")?;
        let e = err_text(load(jail));
        assert!(e.contains("cache.default_ttl_secs"), "{e}");

        jail.create_file("config/default.toml", "[cache.redis]\nkey_prefix = \"\"\n")?;
        let e = err_text(load(jail));
        assert!(e.contains("cache.redis.key_prefix"), "{e}");

        jail.create_file("config/default.toml", "[cache]\nimpl = \"null\"\nttl = 5\n")?;
        let e = err_text(load(jail));
        assert!(e.contains("ttl"), "unknown keys are errors: {e}");

        for (toml, key, value) in [
            ("sample_keys = 10", "cache.analysis.sample_keys", "10"),
            (
                "shared_sample_keys = 0",
                "cache.analysis.shared_sample_keys",
                "0",
            ),
            (
                "max_sampling_rate = 0.0",
                "cache.analysis.max_sampling_rate",
                "0",
            ),
            ("capacities = []", "cache.analysis.capacities", "[]"),
            ("capacities = [1, 0]", "cache.analysis.capacities", "0"),
            (
                "max_patterns = 20000",
                "cache.analysis.max_patterns",
                "20000",
            ),
        ] {
            jail.create_file(
                "config/default.toml",
                &format!("[cache.analysis]\n{toml}\n"),
            )?;
            let e = err_text(load(jail));
            assert!(e.contains(key) && e.contains(value), "{toml}: {e}");
        }
        for (toml, key, value) in [
            ("[cache]\nread_timeout_ms = 0", "cache.read_timeout_ms", "0"),
            ("[cache]\nlease_ttl_ms = 0", "cache.lease_ttl_ms", "0"),
            (
                "[cache.rollback]\nmax_error_rate = 2.0",
                "cache.rollback.max_error_rate",
                "2",
            ),
            (
                "[cache.rollback]\ncooldown_secs = 0",
                "cache.rollback.cooldown_secs",
                "0",
            ),
            (
                "[cache.patterns.user]\nramp_percent = 150.0",
                "cache.patterns.user.ramp_percent",
                "150",
            ),
            (
                "[cache.patterns.user]\nmode = \"serving\"",
                "serving",
                "serving",
            ),
        ] {
            jail.create_file("config/default.toml", toml)?;
            let e = err_text(load(jail));
            assert!(e.contains(key) && e.contains(value), "{toml}: {e}");
        }
        jail.create_file(
            "config/default.toml",
            "[cache]\nread_timeout_ms = 20\n[cache.rollback]\nscope = \"impl\"\nmin_calls = 5\n\
             [cache.patterns.user]\nmode = \"shadow\"\nramp_percent = 12.5\nread_timeout_ms = 10\n",
        )?;
        let policy = load(jail).expect("valid").policy();
        assert_eq!(policy.read_timeout_ms, 20);
        assert_eq!(policy.rollback.scope, crate::policy::RollbackScope::Impl);
        assert_eq!(policy.rollback.min_calls, 5);
        assert_eq!(
            policy.rollback.cooldown_secs, 60,
            "unset keys keep their default"
        );
        assert_eq!(
            policy.patterns["user"].mode,
            Some(crate::policy::Mode::Shadow)
        );
        assert_eq!(policy.patterns["user"].ramp_percent, Some(12.5));
        jail.create_file("config/default.toml", "[cache.analysis]\nsample = 5\n")?;
        let e = err_text(load(jail));
        assert!(
            e.contains("sample"),
            "unknown analysis keys are errors: {e}"
        );
        jail.set_env("CACHE_ROLLOUT_CACHE__ANALYSIS__SAMPLE_KEYS", "32");
        jail.create_file("config/default.toml", "")?;
        let e = err_text(load(jail));
        assert!(
            e.contains("cache.analysis.sample_keys") && e.contains("32"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn the_applications_own_keys_are_left_alone() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            "database_url = \"postgres://app\"\nbind_addr = \"0.0.0.0:80\"\n[server]\nworkers = 4\n\
             [cache]\nimpl = \"memory\"\n[cache.redis]\nkey_prefix = \"mine:\"\n",
        )?;
        let s = load(jail).expect("the application's keys are not the library's business");
        assert_eq!(s.cache.cache_impl, CacheImpl::Memory);
        assert_eq!(
            s.redis_options().key_prefix,
            "mine:",
            "an explicit prefix wins"
        );
        jail.create_file("config/default.toml", "[cache]\nimpl = \"null\"\nttl = 5\n")?;
        let e = err_text(load(jail));
        assert!(
            e.contains("ttl"),
            "unknown keys inside [cache] are still errors: {e}"
        );
        let e = err_text(Settings::load("two words", jail.directory().join("config")));
        assert!(e.contains("service") && e.contains("two words"), "{e}");
        Ok(())
    });
}

#[test]
fn a_top_level_feature_cache_stops_start_up_and_debug_hides_the_token() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file("config/default.toml", "feature_cache = false\n")?;
        let e = err_text(load(jail));
        assert!(
            e.contains("feature_cache") && e.contains("cache.enabled"),
            "{e}"
        );
        jail.create_file("config/default.toml", "[cache]\nenabled = false\n")?;
        jail.set_env("CACHE_ADMIN_TOKEN", "debug-secret-0123456789");
        let s = load(jail).expect("loads");
        assert!(!s.cache.enabled);
        let shown = format!("{s:?}");
        assert!(!shown.contains("debug-secret"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
        Ok(())
    });
}

#[cfg(not(feature = "fleet"))]
#[test]
fn a_fleet_needs_the_fleet_feature() {
    let mut s = Settings::default();
    s.cache.fleet.enabled = true;
    let e = s.validate().expect_err("no fleet feature").to_string();
    assert!(
        e.contains("cache.fleet.enabled") && e.contains("fleet"),
        "{e}"
    );
}

#[test]
fn app_env_unset_is_development_and_bad_values_are_errors() {
    use std::env::VarError;
    assert_eq!(
        AppEnv::from_var(Err(VarError::NotPresent)).expect("unset"),
        AppEnv::Development
    );
    assert_eq!(
        AppEnv::from_var(Ok("production".into())).expect("known"),
        AppEnv::Production
    );
    assert!(AppEnv::from_var(Ok("prod".into())).is_err());
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(vec![0xff, 0xfe]);
        assert!(AppEnv::from_var(Err(VarError::NotUnicode(bad))).is_err());
    }
}

#[test]
fn restart_only_changes_are_named() {
    let a = Settings::default();
    let mut b = a.clone();
    b.cache.cache_impl = CacheImpl::Redis; // runtime: not listed
    b.cache.value_version = 2;
    b.app_env = AppEnv::Staging;
    assert_eq!(
        a.restart_only_changes(&b),
        ["app_env", "cache.value_version"]
    );
    assert!(a.restart_only_changes(&a).is_empty());
}

#[test]
fn redaction_hides_passwords() {
    assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
    assert_eq!(redact_url("redis://u:pw@h:1"), "redis://u:***@h:1");
    assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    assert!(!redact_url("redis://u:pw@[bad").contains("pw"));
    assert_eq!(redact_url("not a url"), "not a url");
}

/// Keys of `[cache]` a property case may set, as dotted paths under `cache.`.
const KEYS: &[&str] = &[
    "enabled",
    "impl",
    "whitelist",
    "default_ttl_secs",
    "max_patterns",
    "templates",
    "max_value_bytes",
    "size_sample_every",
    "value_version",
    "read_timeout_ms",
    "lease_ttl_ms",
    "lease_wait_ms",
    "admin_token",
    "internal_reads_open",
    "cache_status_header",
    "memory.max_entries",
    "memory.max_bytes",
    "redis.url",
    "redis.key_prefix",
    "redis.wait_replicas",
    "rollback.cooldown_secs",
    "rollback.probe_percent",
    "patterns.user.ttl_secs",
    "patterns.user.mode",
    "patterns.user.ramp_percent",
    "patterns.user.l1_ttl_secs",
    "fleet.enabled",
    "fleet.poll_ms",
    "analysis.curve_points",
];

/// A TOML value: an integer, a float, a boolean, a string of any characters, or an array of strings.
fn any_toml_value() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    // A TOML basic string: every control character (and DEL, which TOML forbids raw) escaped as \uXXXX.
    let string = any::<String>().prop_map(|s| {
        let mut out = String::from('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    });
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        // Around the bounds: 0, 1, the limits of percentages, poll periods and pattern counts.
        (-2i64..=20_000).prop_map(|i| i.to_string()),
        "(redis|rediss|redis\\+cluster|rediss\\+cluster|http|unix)://[a-z0-9:,@/.#]{0,24}"
            .prop_map(|u| format!("{u:?}")),
        (-1e6f64..1e6).prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        string.clone(),
        "[a-z:*_]{0,12}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec(string, 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

    /// Any value under any key of the file loads, or is refused with an error that names the key; never a
    /// panic. (128 cases: each runs in a figment `Jail`, a directory and the process environment.)
    #[test]
    fn any_value_loads_or_is_refused_naming_its_key(
        key in proptest::sample::select(KEYS),
        value in any_toml_value(),
    ) {
        let (table, leaf) = match key.rsplit_once('.') {
            Some((t, l)) => (format!("cache.{t}"), l),
            None => ("cache".to_string(), key),
        };
        // An admin token, so that settings that need one (the fleet) are valid alone.
        let base = if key == "admin_token" { "" } else { "admin_token = \"0123456789abcdef-token\"\n" };
        let file = if table == "cache" {
            format!("[cache]\n{base}{leaf} = {value}\n")
        } else {
            format!("[cache]\n{base}[{table}]\n{leaf} = {value}\n")
        };
        let mut outcome = Ok(());
        Jail::expect_with(|jail| {
            // Only the file: no variable of the shell or of CI.
            jail.clear_env();
            jail.create_dir("config")?;
            jail.create_file("config/default.toml", &file)?;
            outcome = match load(jail) {
                Ok(_) => Ok(()),
                Err(e) => {
                    let text = e.to_string();
                    let full = format!("cache.{key}");
                    if text.contains(&full) {
                        Ok(())
                    } else {
                        Err(format!("{file:?}: the error does not name {full}: {text}"))
                    }
                }
            };
            Ok(())
        });
        if let Err(e) = outcome {
            return Err(proptest::test_runner::TestCaseError::fail(e));
        }
    }
}
