//! [`CacheRollout`]: the one entry point for an application. It reads the configuration, builds the
//! [`CacheRegistry`], follows the fleet state when `[cache.fleet]` is on, re-reads the files on SIGHUP when asked,
//! and hands out the axum pieces: the candidate-route layer and one router for `/metrics` and `/internal/cache`
//! that is closed (404) in production.
//!
//! # Example
//!
//! The whole integration of an existing axum service (`docs/integration.md` walks through it; the complete
//! program is `examples/existing_service.rs`):
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn demo() -> Result<(), cache_rollout::Error> {
//! use axum::{extract::{Path, State}, routing::get, Router};
//! use cache_rollout::{CacheRegistry, CacheRollout};
//!
//! async fn user(State(cache): State<CacheRegistry>, Path(id): Path<u64>) -> String {
//!     let name: Result<String, std::io::Error> = cache
//!         .get_or_load(&format!("user:{id}"), || async move { Ok(format!("user {id}")) })
//!         .await;
//!     name.unwrap_or_default()
//! }
//!
//! let cache = CacheRollout::builder("my-service").reload_on_sighup(true).build().await?;
//! let app: Router = Router::new()
//!     .route("/users/{id}", get(user))
//!     .with_state(cache.registry().clone())
//!     .layer(cache.layer())      // per-route counts and times (candidate routes)
//!     .merge(cache.router());    // /metrics, /internal/cache (404 in production)
//! # let _ = app; Ok(()) }
//! ```
//!
//! # Names per service
//!
//! The service name (1 to 64 characters of `A-Z a-z 0-9 _ . -`) is the default of every name the service owns in
//! a shared Redis: the key prefix `cr:<service>:` (flushes and pattern deletions never leave it), the fleet key and
//! channel `cache-rollout:<service>:fleet`, and the L1 invalidation channel (`<prefix> ~l1`). Two services on one
//! Redis never flush, invalidate or steer each other unless their configuration names the same (or an enclosing)
//! prefix, or the same fleet key: a service configured with `key_prefix = "cr:"` flushes every `cr:<service>:`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{AppEnv, Settings};
use crate::error::{Error, Result};
use crate::registry::CacheRegistry;

/// The cache of one service: its registry and everything started around it. Cheap to clone (clones share it).
///
/// Built by [`CacheRollout::builder`] or [`CacheRollout::from_env`]; see the [module doc](self) for an example.
/// Background tasks (fleet following, SIGHUP reload, the start-up retry) end when the last clone of the registry
/// is dropped.
#[derive(Clone, Debug)]
pub struct CacheRollout {
    registry: CacheRegistry,
    /// The settings it was built with (shown, redacted, under `config` in `GET /internal/cache`).
    settings: Arc<Settings>,
    #[cfg(feature = "axum")]
    admin_token: crate::http::AdminToken,
    #[cfg(feature = "fleet")]
    fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// Builds a [`CacheRollout`]; every default is stated on its setter.
#[derive(Debug)]
#[must_use]
pub struct Builder {
    service: String,
    config_dir: PathBuf,
    settings: Option<Settings>,
    sighup: bool,
}

impl CacheRollout {
    /// A builder for the service named `service` (see [Names per service](self#names-per-service)).
    pub fn builder(service: impl Into<String>) -> Builder {
        Builder {
            service: service.into(),
            config_dir: PathBuf::from("config"),
            settings: None,
            sighup: false,
        }
    }

    /// `CacheRollout::builder(service).build()`: the configuration from `config/` and the environment, no SIGHUP
    /// reload.
    ///
    /// # Errors
    /// As [`Builder::build`].
    pub async fn from_env(service: impl Into<String>) -> Result<Self> {
        Self::builder(service).build().await
    }

    /// The registry: `get_or_load`, `invalidate`, `switch` and the rest. Clone it into handlers' state.
    pub fn registry(&self) -> &CacheRegistry {
        &self.registry
    }

    /// The settings it was built with (the running policy may have changed since: [`CacheRegistry::policy`]).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The environment (`APP_ENV`) it was built for.
    pub fn env(&self) -> AppEnv {
        self.settings.app_env
    }

    /// The fleet state followed, when `[cache.fleet] enabled` is on.
    #[cfg(feature = "fleet")]
    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.fleet.as_ref()
    }

    /// The candidate-route layer: counts and times every request per matched route, and adds an RFC 9211
    /// `Cache-Status` header outside production (`[cache] cache_status_header`). Put it after the routes it should
    /// see (axum applies a layer to the routes added before it).
    #[cfg(feature = "axum")]
    pub fn layer(&self) -> crate::http::CandidateLayer {
        let status = self
            .settings
            .cache
            .cache_status_header
            .unwrap_or(self.settings.app_env != crate::config::AppEnv::Production);
        crate::http::CandidateLayer::new(self.registry.metrics()).with_cache_status(status)
    }

    /// `GET /metrics` and the `/internal/cache` routes, in one router to merge into the application's. Under
    /// `/internal/` every path answers 404 in production (closed by construction); elsewhere runtime changes need
    /// the admin token and go through the fleet state when it is on.
    #[cfg(feature = "axum")]
    pub fn router(&self) -> axum::Router {
        let state =
            crate::http::InternalState::new(self.registry.clone(), self.admin_token.clone())
                .with_env(self.settings.app_env)
                .with_open_reads(self.settings.cache.internal_reads_open)
                .with_config(self.settings.redacted());
        #[cfg(feature = "fleet")]
        let state = state.with_fleet(self.fleet.clone());
        crate::http::metrics_router(self.registry.clone())
            .merge(crate::http::internal_router(state))
    }
}

impl Builder {
    /// The directory holding `default.toml` and `<APP_ENV>.toml`, of which the library reads `[cache]` (and
    /// `app_env`). Default: `config`, relative to the working directory. A missing directory or file is a
    /// warning, not an error.
    pub fn config_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config_dir = dir.into();
        self
    }

    /// Uses these settings instead of reading the files and the environment (tests, or an application that loads
    /// its configuration itself). Default: read them ([`Settings::load`]).
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// On SIGHUP, re-read the files and the environment and apply their runtime part (policy, Redis options, admin
    /// token); a bad file keeps the running state, and keys that need a restart are named in a warning. Under a
    /// fleet state the running (fleet) policy stays. Unix only. Default: `false`.
    pub fn reload_on_sighup(mut self, on: bool) -> Self {
        self.sighup = on;
        self
    }

    /// Reads the settings, builds the registry (which starts observing and keeps retrying when the configured
    /// backend is unreachable), and starts the fleet following and the SIGHUP reload when asked for. With the fleet
    /// on, it first reads and applies the fleet state, waiting up to 2 s (then it starts on the configuration's
    /// policy and follows as soon as it can). Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad service name, a bad configuration value (naming the key and the value), an admin
    /// token under 16 characters, a fleet without a token, a feature the configuration needs but the crate was
    /// built without, or [`Builder::reload_on_sighup`] together with [`Builder::settings`] (there are no files
    /// to re-read).
    pub async fn build(self) -> Result<CacheRollout> {
        crate::config::validate_service(&self.service)?;
        if self.sighup && self.settings.is_some() {
            return Err(Error::config(
                "reload_on_sighup",
                "true",
                "needs settings read from files, not given with Builder::settings",
            ));
        }
        let settings = match self.settings {
            Some(mut s) => {
                if s.service.is_empty() {
                    s.service.clone_from(&self.service);
                }
                s.validate()?;
                s
            }
            None => Settings::load(&self.service, &self.config_dir)?,
        };
        #[cfg(feature = "axum")]
        let admin_token = crate::http::AdminToken::new(settings.cache.admin_token.clone())?;
        let registry = CacheRegistry::new(settings.registry_options()?).await?;
        #[cfg(feature = "fleet")]
        let fleet = if settings.cache.fleet.enabled {
            let fleet = Arc::new(crate::fleet::Fleet::new(
                &settings.fleet_options(),
                &settings.redis_options(),
                settings.cache.admin_token.as_deref().unwrap_or_default(),
            )?);
            // Run the fleet's state before serving anything, so that a new instance never serves, nor fails to
            // invalidate, by its files' policy while the others run another (bounded: past it, or if Redis
            // refuses, the files' policy runs until the follower's first good read).
            let init = settings.policy();
            let first = fleet.sync(&registry, Some(&init));
            match tokio::time::timeout(std::time::Duration::from_secs(2), first).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => fleet.failed(&e),
                Err(_) => fleet.failed(&Error::Fleet(
                    "the first read took over 2 s; started on the configuration's policy".into(),
                )),
            }
            Arc::clone(&fleet).spawn(registry.clone(), init);
            Some(fleet)
        } else {
            None
        };
        let rollout = CacheRollout {
            registry,
            settings: Arc::new(settings),
            #[cfg(feature = "axum")]
            admin_token,
            #[cfg(feature = "fleet")]
            fleet,
        };
        if self.sighup {
            sighup::spawn(rollout.clone(), self.config_dir);
        }
        Ok(rollout)
    }
}

mod sighup {
    use std::path::PathBuf;

    use super::CacheRollout;
    use crate::config::Settings;
    use crate::registry::CacheRegistry;

    /// Re-reads `dir` and the environment on every SIGHUP and applies the runtime part. Holds the registry weakly:
    /// the task ends with it.
    pub(super) fn spawn(rollout: CacheRollout, dir: PathBuf) {
        #[cfg(unix)]
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP; configuration reload disabled");
                return;
            };
            let weak = rollout.registry.downgrade();
            let mut current = (*rollout.settings).clone();
            #[cfg(feature = "axum")]
            let admin_token = rollout.admin_token.clone();
            #[cfg(feature = "fleet")]
            let following_fleet = rollout.fleet.is_some();
            #[cfg(not(feature = "fleet"))]
            let following_fleet = false;
            drop(rollout);
            while hup.recv().await.is_some() {
                let Some(registry) = CacheRegistry::upgrade(&weak) else {
                    return;
                };
                let next = match Settings::load(&current.service, &dir) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: configuration invalid, previous state kept");
                        continue;
                    }
                };
                for key in current.restart_only_changes(&next) {
                    tracing::warn!(
                        key,
                        "SIGHUP: this setting changed but only takes effect after a restart"
                    );
                }
                // Under a fleet state the files' policy does not win: the running (fleet) policy stays, and only
                // the Redis options and the token are re-read.
                let policy = if following_fleet {
                    registry.policy()
                } else {
                    next.policy()
                };
                if let Err(e) = registry.reload(policy, next.redis_options()).await {
                    tracing::error!(error = %e, "SIGHUP: reload refused, previous state kept");
                    continue;
                }
                #[cfg(feature = "axum")]
                if next.cache.admin_token != current.cache.admin_token {
                    match admin_token.set(next.cache.admin_token.clone()) {
                        Ok(()) => tracing::info!("SIGHUP: admin token replaced"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: admin token kept"),
                    }
                }
                current = next;
            }
        });
        #[cfg(not(unix))]
        let _ = (rollout, dir);
    }
}
