//! The `cache-rollout` binary: `serve` (the reference service; the default), `replay TRACE`, `report --url URL`,
//! `fleet show|set`. Built on the library's public API only.

mod catalog;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cache_rollout::analysis::{AnalysisOptions, Report};
use cache_rollout::cache::{CacheImpl, RedisOptions};
use cache_rollout::config::Settings;
use cache_rollout::replay::{self, ReplayOptions, TraceFormat};
use cache_rollout::{CacheRegistry, CacheRollout, Policy, RegistryOptions};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::catalog::Origin;

/// The reference service's name: its Redis key prefix is `cr:catalog:` and its fleet key
/// `cache-rollout:catalog:fleet`, unless the configuration names others.
const SERVICE: &str = "catalog";

/// The reference service's own settings, beside the library's `[cache]` table in the same files: the top-level
/// `bind_addr` (`BIND_ADDR`) and `log_format` (`CACHE_ROLLOUT_LOG_FORMAT`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServiceSettings {
    bind_addr: SocketAddr,
    log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    /// Human-readable lines (default).
    Text,
    /// One JSON object per line.
    Json,
}

impl ServiceSettings {
    /// The top-level keys of `dir/default.toml` and `dir/<APP_ENV>.toml`, then `BIND_ADDR`.
    fn load(dir: &Path) -> cache_rollout::Result<Self> {
        use figment::providers::{Env, Format, Serialized, Toml};
        let env = cache_rollout::config::AppEnv::from_var(std::env::var("APP_ENV"))?;
        figment::Figment::from(Serialized::defaults(ServiceSettings {
            bind_addr: SocketAddr::from(([127, 0, 0, 1], 8900)),
            log_format: LogFormat::Text,
        }))
        .merge(Toml::file(dir.join("default.toml")))
        .merge(Toml::file(dir.join(format!("{}.toml", env.as_str()))))
        .merge(Env::prefixed("CACHE_ROLLOUT_").filter(|k| {
            k.as_str().eq_ignore_ascii_case("bind_addr")
                || k.as_str().eq_ignore_ascii_case("log_format")
        }))
        .merge(Env::raw().only(&["BIND_ADDR"]).map(|_| "bind_addr".into()))
        .extract()
        .map_err(|e| {
            let value = std::env::var("BIND_ADDR").unwrap_or_default();
            if e.path.first().is_some_and(|k| k == "bind_addr") && !value.is_empty() {
                cache_rollout::Error::config("BIND_ADDR", value, e.kind.to_string())
            } else {
                cache_rollout::Error::from(e)
            }
        })
    }
}

/// Observe-first caching: measure through a NullCache, then serve key patterns from Redis at runtime.
#[derive(Parser)]
#[command(name = "cache-rollout", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reference service (the default): a catalog API over SQLite, cached through the registry.
    Serve(ServeArgs),
    /// Run an access trace through a registry and print per-pattern hits, misses, hit ratio, and the predicted
    /// LRU hit ratio at each capacity.
    Replay(ReplayArgs),
    /// Fetch a running service's analysis (`GET /internal/cache/report`) and print it as a table.
    Report(ReportArgs),
    /// Read or change the fleet state every instance follows (`[cache.fleet]`, docs/scaling.md), straight in Redis:
    /// production can be steered without `/internal/`. Uses the configuration (REDIS_URL, cache.fleet.key) and
    /// CACHE_ADMIN_TOKEN, which signs the state.
    Fleet(FleetArgs),
}

#[derive(clap::Args)]
struct FleetArgs {
    /// Directory holding default.toml and <APP_ENV>.toml.
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    #[command(subcommand)]
    action: FleetAction,
}

#[derive(Subcommand)]
enum FleetAction {
    /// Print the stored state (version, policy, who wrote it) as JSON.
    Show,
    /// Merge a change into the state, as `PUT /internal/cache/config` takes it, e.g.
    /// '{"patterns":{"user":{"mode":"serve","ramp_percent":10}}}'; prints the new state.
    Set {
        /// The change, as JSON.
        update: String,
    },
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Base URL of the service.
    #[arg(long, default_value = "http://127.0.0.1:8900")]
    url: String,
    /// Print the JSON as served instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Directory holding default.toml and <APP_ENV>.toml.
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    /// Number of seeded users (projects: a tenth of that).
    #[arg(long, default_value_t = 1000)]
    users: i64,
    /// Milliseconds added to every origin query, to stand in for a slow origin.
    #[arg(long, default_value_t = 0)]
    origin_delay_ms: u64,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Trace file (.csv, .lis, optionally .zst).
    trace: PathBuf,
    /// Trace format; guessed from the file name when absent.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Backend every pattern is served from.
    #[arg(long = "impl", value_enum, default_value = "null")]
    cache_impl: ImplArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Stop at the first malformed line instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Redis URL for --impl redis.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Key prefix in Redis for --impl redis (its keys are flushed at the start of the run).
    #[arg(long, default_value = "cr-replay:")]
    redis_prefix: String,
    /// Capacity of --impl memory in entries.
    #[arg(long, default_value_t = 100_000)]
    memory_entries: u64,
    /// Capacity of --impl memory in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    memory_bytes: u64,
    /// Cache capacities in objects at which to predict the LRU hit ratio (1 to 8, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,100000")]
    capacities: Vec<u64>,
    /// Model this TTL in seconds (against the trace's timestamps); without it entries never expire.
    #[arg(long)]
    ttl: Option<u64>,
    /// Keys sampled per pattern by the estimator (SHARDS s_max).
    #[arg(long, default_value_t = AnalysisOptions::default().sample_keys)]
    sample_keys: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// Twitter's cache-trace CSV.
    Twitter,
    /// ARC `.lis`.
    Arc,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImplArg {
    Null,
    Memory,
    Redis,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve(ServeArgs {
            config_dir: "config".into(),
            users: 1000,
            origin_delay_ms: 0,
        })) {
            Command::Serve(args) => serve(args).await,
            Command::Replay(args) => run_replay(args).await,
            Command::Report(args) => run_report(args).await,
            Command::Fleet(args) => run_fleet(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A span's close is logged with its time: at the default INFO level no span is enabled, so this prints nothing;
    // with RUST_LOG=cache_rollout=debug, one line per cache operation (`cache_op`, see docs/behaviour.md).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        // Colours only on a terminal: a log file, journald or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: ServeArgs) -> cache_rollout::Result<()> {
    let service = ServiceSettings::load(&args.config_dir)?;
    init_logs(service.log_format);
    // Logs the cache state in one line (`cache: enabled impl=null whitelist=[]`) once it is installed; follows the
    // fleet state when [cache.fleet] is on; re-reads the files on SIGHUP.
    let cache = CacheRollout::builder(SERVICE)
        .config_dir(&args.config_dir)
        .reload_on_sighup(true)
        .build()
        .await?;
    let origin =
        Origin::seeded(args.users, Duration::from_millis(args.origin_delay_ms)).map_err(|e| {
            cache_rollout::Error::Io {
                context: "seeding the SQLite origin".into(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    let listener = tokio::net::TcpListener::bind(service.bind_addr)
        .await
        .map_err(|source| cache_rollout::Error::Io {
            context: format!("binding {}", service.bind_addr),
            source,
        })?;
    tracing::info!(addr = %service.bind_addr, env = cache.env().as_str(), "listening");
    let app = catalog::app(&cache, origin);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|source| cache_rollout::Error::Io {
            context: "serving".into(),
            source,
        })?;
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining requests");
}

/// The server's `maxmemory` (0: unlimited) and `used_memory`, in bytes.
async fn redis_memory(url: &str) -> cache_rollout::Result<(u64, u64)> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let (_, maxmemory): (String, u64) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut conn)
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((maxmemory, used))
}

async fn run_fleet(args: FleetArgs) -> cache_rollout::Result<()> {
    let settings = Settings::load(SERVICE, &args.config_dir)?;
    let fleet = cache_rollout::fleet::Fleet::new(
        &settings.fleet_options(),
        &settings.redis_options(),
        settings.cache.admin_token.as_deref().unwrap_or_default(),
    )?;
    let state = match args.action {
        FleetAction::Show => fleet.read().await?,
        FleetAction::Set { update } => {
            let update: cache_rollout::PolicyUpdate =
                serde_json::from_str(&update).map_err(|e| {
                    cache_rollout::Error::config("update", update.clone(), e.to_string())
                })?;
            Some(fleet.write(&settings.policy(), &update, "cli").await?)
        }
    };
    match state {
        Some(s) => println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default()),
        None => println!("null"),
    }
    Ok(())
}

async fn run_report(args: ReportArgs) -> cache_rollout::Result<()> {
    let url = format!("{}/internal/cache/report", args.url.trim_end_matches('/'));
    let fail = |reason: String| cache_rollout::Error::Report {
        url: url.clone(),
        reason,
    };
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| fail(e.to_string()))?
        .get(&url)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| fail(e.to_string()))?;
    if !status.is_success() {
        return Err(fail(format!(
            "HTTP {status}{}",
            if status == reqwest::StatusCode::NOT_FOUND {
                " (in production every /internal/ path answers 404)"
            } else {
                ""
            }
        )));
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let report: Report =
        serde_json::from_str(&body).map_err(|e| fail(format!("not a report: {e}")))?;
    print!(
        "{}",
        report
            .to_table()
            .replace("<url>", args.url.trim_end_matches('/'))
    );
    Ok(())
}

async fn run_replay(args: ReplayArgs) -> cache_rollout::Result<()> {
    let format = args.format.map(|f| match f {
        FormatArg::Twitter => TraceFormat::Twitter,
        FormatArg::Arc => TraceFormat::Arc,
    });
    let format = match format.or_else(|| TraceFormat::guess(&args.trace)) {
        Some(f) => f,
        None => {
            return Err(cache_rollout::Error::Trace {
                line: 0,
                reason: format!(
                    "cannot guess the format of {}; pass --format twitter or --format arc",
                    args.trace.display()
                ),
            })
        }
    };
    let cache_impl = match args.cache_impl {
        ImplArg::Null => CacheImpl::Null,
        ImplArg::Memory => CacheImpl::Memory,
        ImplArg::Redis => CacheImpl::Redis,
    };
    let (clock, mock) = quanta::Clock::mock();
    let opts = RegistryOptions::default()
        .with_policy(Policy {
            cache_impl,
            whitelist: vec!["*".into()],
            default_ttl_secs: args.ttl.unwrap_or(86_400),
            ..Policy::default()
        })
        .with_analysis(AnalysisOptions {
            capacities: args.capacities.clone(),
            ignore_ttl: args.ttl.is_none(),
            sample_keys: args.sample_keys,
            shared_sample_keys: args
                .sample_keys
                .max(AnalysisOptions::default().shared_sample_keys),
            max_patterns: 10_000,
            ..AnalysisOptions::default()
        })
        .with_clock(clock)
        .with_max_patterns(10_000)
        .with_redis(
            RedisOptions::default()
                .with_url(args.redis_url.clone())
                .with_key_prefix(args.redis_prefix.clone())
                .with_connect_timeout(Duration::from_secs(2))
                .with_response_timeout(Duration::from_secs(2)),
        )
        .with_memory_max_entries(args.memory_entries)
        .with_memory_max_bytes(args.memory_bytes)
        .with_max_value_bytes(usize::MAX);
    let registry = CacheRegistry::new(opts).await?;
    if registry.policy().cache_impl != cache_impl {
        return Err(cache_rollout::Error::config(
            "--impl",
            cache_impl.as_str(),
            "the backend could not be reached (see the log above)",
        ));
    }
    let reader = replay::open(&args.trace)?;
    let ropts = ReplayOptions {
        strict: args.strict,
        clock: Some(mock),
    };
    // What Redis holds besides this replay's keys (its own structures, other prefixes): not room for the cache.
    let baseline = if cache_impl == CacheImpl::Redis {
        Some(redis_memory(&args.redis_url).await?)
    } else {
        None
    };
    let mut report = replay::replay(&registry, reader, format, &ropts, |e| {
        eprintln!("skipped: {e}")
    })
    .await?;
    if let Some((maxmemory, used)) = baseline {
        report.redis_maxmemory_bytes = Some(maxmemory);
        report.redis_baseline_bytes = Some(used);
        if maxmemory > used {
            report.predicted_hit_ratio_at_maxmemory =
                registry.predicted_hit_ratio_at_bytes(maxmemory - used);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
