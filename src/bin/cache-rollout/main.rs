//! The `cache-rollout` binary: `serve` (the reference service; the default), `replay TRACE`, `report --url URL`,
//! `fleet show|set`. Built on the library's public API only.

mod catalog;
mod plot;
mod replay;
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cache_rollout::config::Settings;
use cache_rollout::CacheRollout;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::catalog::Origin;
use crate::replay::ReplayArgs;

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
#[command(
    name = "cache-rollout",
    version,
    about,
    after_help = "Examples:\n  cache-rollout serve\n  cache-rollout replay ../shared/traces/mixed.twitter.csv.zst --plot curves.svg\n  \
                  cache-rollout report\n  cache-rollout fleet show\n\nA .env file in the working directory is read first \
                  (variables already set win). README.md has the tour."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reference service (the default): a catalog API over SQLite, cached through the registry.
    #[command(
        after_help = "Example:\n  APP_ENV=development REDIS_URL=redis://127.0.0.1:6390 cache-rollout serve --origin-delay-ms 5\n\n\
Environment (over config/default.toml and config/<APP_ENV>.toml):\n  \
APP_ENV            development | test | staging | production (default development); /internal/ is 404 in production\n  \
BIND_ADDR          listen address (default 127.0.0.1:8900)\n  \
REDIS_URL          redis://, rediss:// or redis+cluster:// URL (default redis://127.0.0.1:6379: use a Redis of your own)\n  \
FEATURE_CACHE      cache.enabled: false serves everything from the origin\n  \
CACHE_IMPL         null | memory | redis at start-up\n  \
CACHE_PATTERNS     comma-separated key patterns served from the cache (* for all)\n  \
CACHE_ADMIN_TOKEN  token for PUT /internal/cache/config (16 characters or more)\n  \
CACHE_ROLLOUT_<KEY> any other key, nested with __ (CACHE_ROLLOUT_CACHE__DEFAULT_TTL_SECS=60, CACHE_ROLLOUT_LOG_FORMAT=json)\n  \
RUST_LOG           log filter (default info)"
    )]
    Serve(ServeArgs),
    /// Run an access trace through a registry and print per-pattern requests, hits, misses, hit ratio, and the
    /// predicted LRU hit ratio at each capacity.
    #[command(
        after_help = "Examples:\n  cache-rollout replay ../shared/traces/mixed.twitter.csv.zst\n  \
cache-rollout replay ../shared/traces/arc-p3.lis.zst --impl memory --memory-entries 50000\n  \
cache-rollout replay ../shared/traces/mixed.twitter.csv.zst --plot mixed.svg --json > mixed.json\n  \
cache-rollout replay trace.csv --csv-spec 'time-col=1,obj-id-col=2,obj-size-col=3,has-header=true'\n  \
redis-server --port 6390 --save '' --appendonly no --daemonize yes\n  \
cache-rollout replay ../shared/traces/arc-p3.lis.zst --impl redis --redis-url redis://127.0.0.1:6390\n\n\
Environment:\n  REDIS_URL  the Redis of --impl redis (no default: it writes there, then removes what it wrote)"
    )]
    Replay(Box<ReplayArgs>),
    /// Fetch a running service's analysis (`GET /internal/cache/report`) and print it as a table.
    #[command(
        after_help = "Examples:\n  cache-rollout report\n  cache-rollout report --url http://127.0.0.1:8901 --plot curves.svg\n\n\
Environment:\n  BIND_ADDR  the service's address when --url is not given (default 127.0.0.1:8900)"
    )]
    Report(ReportArgs),
    /// Read or change the fleet state every instance follows (`[cache.fleet]`, docs/scaling.md), straight in Redis:
    /// production can be steered without `/internal/`. Uses the configuration (REDIS_URL, cache.fleet.key) and
    /// CACHE_ADMIN_TOKEN, which signs the state.
    #[command(after_help = "Examples:\n  cache-rollout fleet show\n  \
cache-rollout fleet set '{\"patterns\":{\"user\":{\"mode\":\"serve\",\"ramp_percent\":10}}}'\n\n\
Environment:\n  REDIS_URL          the Redis holding the fleet state\n  \
CACHE_ADMIN_TOKEN  signs the state (every instance checks the signature)\n  \
APP_ENV            which config/<APP_ENV>.toml is read")]
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
    /// Base URL of the service [default: http://<BIND_ADDR>, else http://127.0.0.1:8900].
    #[arg(long)]
    url: Option<String>,
    /// Print the JSON as served instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw the predicted hit ratio against cache size (objects and bytes) per key pattern into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Split this much Redis memory across the patterns (e.g. 2GiB): which to serve, each one's share, hit ratio
    /// and saving; the recommendation then applies that split.
    #[arg(long, value_name = "SIZE", value_parser = memory_arg)]
    memory: Option<u64>,
}

/// `--memory`: a size such as 2GiB.
pub(crate) fn memory_arg(s: &str) -> std::result::Result<u64, String> {
    cache_rollout::analysis::parse_memory(s).map_err(|e| match e {
        cache_rollout::Error::Config { reason, .. } => reason,
        e => e.to_string(),
    })
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
    /// Keep the origin in this SQLite file (created and seeded if missing) instead of in memory, so that several
    /// instances share it: a write through one is what the others read.
    #[arg(long, value_name = "FILE")]
    database: Option<PathBuf>,
}

fn main() -> ExitCode {
    // `.env` in the working directory only (not a parent's, as `dotenvy::dotenv` would look for): variables
    // already set win.
    let dotenv = dotenvy::from_path(".env");
    let cli = Cli::parse();
    if let Err(e) = &dotenv {
        if !e.not_found() {
            eprintln!("error: .env: {e}");
            return ExitCode::FAILURE;
        }
    }
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
            database: None,
        })) {
            Command::Serve(args) => serve(args).await,
            Command::Replay(args) => replay::run(*args).await,
            Command::Report(args) => report::run(args).await,
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

/// Writes a command's output to stdout. A reader that went away (`| head`) is not a failure, and no panic either.
///
/// # Errors
/// [`cache_rollout::Error::Io`] for any other write error.
fn print_out(text: &str) -> cache_rollout::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(cache_rollout::Error::Io {
            context: "writing the output".into(),
            source: e,
        }),
        _ => Ok(()),
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
    let delay = Duration::from_millis(args.origin_delay_ms);
    let origin = match &args.database {
        Some(path) => Origin::shared(path, args.users, delay),
        None => Origin::seeded(args.users, delay),
    }
    .map_err(|e| cache_rollout::Error::Io {
        context: "opening the SQLite origin".into(),
        source: std::io::Error::other(e.to_string()),
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
            let update = cache_rollout::PolicyUpdate::from_json(update.as_bytes())?;
            Some(fleet.write(&settings.policy(), &update, "cli").await?)
        }
    };
    let out = match state {
        Some(s) => serde_json::to_string_pretty(&s).unwrap_or_default(),
        None => "null".to_string(),
    };
    print_out(&format!("{out}\n"))
}
