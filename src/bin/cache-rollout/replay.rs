//! `cache-rollout replay TRACE`: a trace through a fresh registry, with a progress bar on a terminal, the table or
//! the JSON, an optional SVG of the curves, and, with `--impl redis`, the keys it wrote removed at the end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cache_rollout::analysis::{redis_entry_bytes, AnalysisOptions, EvictionPolicy, RedisEviction};
use cache_rollout::cache::{redact_url, CacheImpl, RedisMemory, RedisOptions};
use cache_rollout::replay::{
    self, CsvSpec, ReadOptions, ReplayEvent, ReplayOptions, SkipLimit, TraceFormat, TraceReader,
};
use cache_rollout::{CacheRegistry, Error, Policy, RegistryOptions, Result, RollbackRules};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::plot;

/// Skipped lines printed one by one; past these, only their count.
const SHOWN_SKIPPED: u64 = 10;

/// Seconds the removal of a replay's keys from Redis may take.
const CLEANUP_SECS: u64 = 60;

#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// Trace file: Twitter CSV, ARC .lis, CloudPhysics CSV, oracleGeneral binary or a CSV with --csv-spec; plain or
    /// zstd.
    trace: PathBuf,
    /// Trace format [default: recognised from the content].
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Columns of a generic CSV, in libCacheSim's terms (implies --format csv), e.g.
    /// 'time-col=1,obj-id-col=2,obj-size-col=3,op-col=4,has-header=true'.
    #[arg(long, value_name = "SPEC")]
    csv_spec: Option<CsvSpec>,
    /// Key pattern of the object ids of a trace without key patterns (keys PATTERN:<id>; an id that is not a number
    /// is hashed) [default: arc, cloudphysics, oracle or csv, after the format].
    #[arg(long)]
    pattern: Option<String>,
    /// Backend every pattern is served from (null stores nothing and measures; the prediction needs no backend).
    #[arg(long = "impl", value_enum, default_value = "null")]
    cache_impl: ImplArg,
    /// Print JSON instead of a table (and no progress bar).
    #[arg(long)]
    json: bool,
    /// Stop at the first malformed line instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Fail when more lines than this are malformed: a count (1000) or a share of the lines read (5%).
    #[arg(long, value_name = "N|P%", default_value = "1%")]
    max_skipped: SkipLimit,
    /// Redis of --impl redis (required with it: use a Redis of your own, e.g. redis://127.0.0.1:6390).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Key prefix in Redis for --impl redis: its keys are deleted at the start and, unless --keep, at the end.
    #[arg(long, default_value = "cr-replay:")]
    redis_prefix: String,
    /// Leave the keys written under --redis-prefix in Redis at the end.
    #[arg(long)]
    keep: bool,
    /// Capacity of --impl memory in entries.
    #[arg(long, default_value_t = 100_000)]
    memory_entries: u64,
    /// Capacity of --impl memory in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    memory_bytes: u64,
    /// Cache capacities in objects at which to predict the LRU hit ratio (1 to 8, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,100000")]
    capacities: Vec<u64>,
    /// Points of the whole predicted curve per pattern, in objects and in bytes (the JSON's `curve`, the plot).
    #[arg(long, default_value_t = AnalysisOptions::default().curve_points)]
    curve_points: usize,
    /// Draw the predicted hit ratio against cache size (objects and bytes) per key pattern and for the shared
    /// cache into this SVG file, with the measured hit ratio as a point (--impl memory, or redis with maxmemory).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Model this TTL in seconds (against the trace's timestamps); without it entries never expire. Needs
    /// timestamps: not arc, and a CSV only with time-col.
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
    /// Serve an entry this many seconds past its --ttl while a background task refreshes it
    /// (stale-while-revalidate, for every pattern), to measure the reads that no longer wait for the origin.
    #[arg(long, value_name = "SECS", requires = "ttl")]
    stale_while_revalidate: Option<u64>,
    /// Keys sampled per pattern by the estimator (SHARDS s_max).
    #[arg(long, default_value_t = AnalysisOptions::default().sample_keys)]
    sample_keys: usize,
    /// Largest share of keys the estimators sample after their warm-up (0–1]: 1 samples every key of a key space
    /// smaller than --sample-keys, so that small caches are simulated too (the service's default keeps hot small
    /// key spaces off the estimator's lock).
    #[arg(long, value_name = "SHARE", default_value_t = AnalysisOptions::default().max_sampling_rate)]
    max_sampling_rate: f64,
    /// Redis eviction to predict besides exact LRU [default: with --impl redis, the server's maxmemory-policy;
    /// otherwise allkeys-lru]. With --impl redis the server's samples and LFU parameters apply to either.
    #[arg(long, value_enum)]
    eviction: Option<EvictionArg>,
    /// After the replay, split this much Redis memory across the patterns (e.g. 2GiB), as `report --memory` does:
    /// the JSON's `budget`, and a table.
    #[arg(long, value_name = "SIZE", value_parser = crate::memory_arg)]
    memory: Option<u64>,
    /// Serve only these key patterns (comma-separated; the others are observed), e.g. the whitelist a --memory
    /// plan chose, to check it against a Redis of that size [default: every pattern].
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    whitelist: Option<Vec<String>>,
    /// Keys Redis samples per eviction (maxmemory-samples) [default: with --impl redis, the server's; otherwise 5].
    #[arg(long, value_name = "N")]
    maxmemory_samples: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum EvictionArg {
    /// Redis's sampled LRU.
    AllkeysLru,
    /// Redis's sampled LFU.
    AllkeysLfu,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// Twitter's cache-trace CSV.
    Twitter,
    /// ARC `.lis`.
    Arc,
    /// CloudPhysics block I/O CSV (`version,time,op,size,lbn`).
    Cloudphysics,
    /// libCacheSim's oracleGeneral binary.
    #[value(alias = "oracleGeneral")]
    OracleGeneral,
    /// Any CSV, with --csv-spec.
    Csv,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum ImplArg {
    /// Store nothing: measure, and predict.
    Null,
    /// An in-process cache (moka) of --memory-entries and --memory-bytes.
    Memory,
    /// A real Redis, at --redis-url (single server).
    Redis,
}

pub(crate) async fn run(args: ReplayArgs) -> Result<()> {
    // Listening from the start: a Ctrl-C before the replay's first step is not lost (nor fatal).
    let mut interrupt = Interrupt::new();
    let format = args.format.map(|f| match f {
        FormatArg::Twitter => TraceFormat::Twitter,
        FormatArg::Arc => TraceFormat::Arc,
        FormatArg::Cloudphysics => TraceFormat::CloudPhysics,
        FormatArg::OracleGeneral => TraceFormat::OracleGeneral,
        FormatArg::Csv => TraceFormat::Csv,
    });
    let mut reader = TraceReader::open(
        &args.trace,
        &ReadOptions::default()
            .with_format(format)
            .with_csv(args.csv_spec.clone())
            .with_pattern(args.pattern.clone()),
    )?;
    if let Some(ttl) = args.ttl {
        if !reader.has_timestamps() {
            return Err(Error::config(
                "--ttl",
                ttl.to_string(),
                format!(
                    "this {} trace has no timestamps (a CSV needs time-col), so no entry would ever expire",
                    reader.format()
                ),
            ));
        }
    }
    let cache_impl = match args.cache_impl {
        ImplArg::Null => CacheImpl::Null,
        ImplArg::Memory => CacheImpl::Memory,
        ImplArg::Redis => CacheImpl::Redis,
    };
    let redis_url = match (args.cache_impl, &args.redis_url) {
        (ImplArg::Redis, None) => {
            return Err(Error::config(
                "--redis-url",
                "",
                "--impl redis writes into Redis (and removes what it wrote at the end): name a Redis of your own, \
                 e.g. start one with `redis-server --port 6390 --save '' --appendonly no --daemonize yes` and pass \
                 --redis-url redis://127.0.0.1:6390 (or set REDIS_URL)",
            ))
        }
        (ImplArg::Redis, Some(url)) => {
            probe_redis(url).await?;
            url.clone()
        }
        // Not used: the registry needs a URL that parses.
        (_, _) => RedisOptions::default().url,
    };
    for (flag, value) in [
        ("--memory-entries", args.memory_entries),
        ("--memory-bytes", args.memory_bytes),
    ] {
        if value == 0 {
            return Err(Error::config(flag, "0", "must be at least 1"));
        }
    }
    if cache_impl == CacheImpl::Redis && args.redis_prefix.is_empty() {
        return Err(Error::config(
            "--redis-prefix",
            "",
            "must not be empty: the replay deletes every key under it",
        ));
    }
    // A real Redis evicts and expires by its own clock, the wall clock: so does the registry then, and the
    // prediction is made on that clock. Otherwise the trace's timestamps drive the registry's clock.
    let facts = if cache_impl == CacheImpl::Redis {
        Some(RedisMemory::read(&redis_url, Duration::from_secs(5)).await?)
    } else {
        None
    };
    // The server's samples and LFU parameters stay whatever policy is asked for (they are its settings, not the
    // policy's); --maxmemory-samples overrides the samples.
    let server = facts.as_ref().map(|f| f.settings).unwrap_or_default();
    let mut eviction = match (args.eviction, &facts) {
        (Some(EvictionArg::AllkeysLru), _) => RedisEviction {
            policy: EvictionPolicy::AllkeysLru,
            ..server
        },
        (Some(EvictionArg::AllkeysLfu), _) => RedisEviction {
            policy: EvictionPolicy::AllkeysLfu,
            ..server
        },
        (None, Some(f)) => f.eviction.unwrap_or(server),
        (None, None) => RedisEviction::default(),
    };
    if let Some(n) = args.maxmemory_samples {
        eviction.samples = n;
    }
    if let Some(f) = &facts {
        if f.maxmemory_bytes > 0 && f.eviction.is_none() && args.eviction.is_none() {
            eprintln!(
                "note: Redis's maxmemory-policy {} is not one the estimator simulates; predicting {}",
                f.maxmemory_policy, eviction
            );
        }
    }
    let (clock, mock) = quanta::Clock::mock();
    let opts = RegistryOptions::default()
        .with_policy(Policy {
            cache_impl,
            whitelist: args.whitelist.clone().unwrap_or_else(|| vec!["*".into()]),
            default_ttl_secs: args.ttl.unwrap_or(86_400),
            patterns: args
                .stale_while_revalidate
                .map(|s| {
                    std::collections::BTreeMap::from([(
                        "*".to_string(),
                        cache_rollout::PatternPolicy {
                            stale_while_revalidate_secs: Some(s),
                            ..Default::default()
                        },
                    )])
                })
                .unwrap_or_default(),
            // A replay measures the backend as it is: a slow Redis must not send patterns back to observing
            // partway, which would make the measured hit ratio a mix of two runs.
            rollback: RollbackRules {
                enabled: false,
                ..RollbackRules::default()
            },
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
            curve_points: args.curve_points,
            eviction: Some(eviction),
            max_sampling_rate: args.max_sampling_rate,
            ..AnalysisOptions::default()
        })
        .with_max_patterns(10_000)
        .with_redis(
            RedisOptions::default()
                .with_url(redis_url.clone())
                .with_key_prefix(args.redis_prefix.clone())
                .with_connect_timeout(Duration::from_secs(2))
                .with_response_timeout(Duration::from_secs(2)),
        )
        .with_memory_max_entries(args.memory_entries)
        .with_memory_max_bytes(args.memory_bytes)
        .with_max_value_bytes(usize::MAX);
    let opts = if facts.is_some() {
        opts
    } else {
        opts.with_clock(clock)
    };
    // The analysis settings come from flags here: name the flag, not the configuration key.
    let registry = CacheRegistry::new(opts).await.map_err(|e| match e {
        Error::Config { key, value, reason } => {
            let flag = match key.as_str() {
                "cache.analysis.capacities" => "--capacities",
                "cache.analysis.curve_points" => "--curve-points",
                "cache.analysis.sample_keys" => "--sample-keys",
                "cache.analysis.max_sampling_rate" => "--max-sampling-rate",
                "cache.analysis.eviction.samples" => "--maxmemory-samples",
                "cache.default_ttl_secs" => "--ttl",
                "cache.whitelist" => "--whitelist",
                "cache.patterns.*.stale_while_revalidate_secs" => "--stale-while-revalidate",
                _ => key.as_str(),
            };
            Error::config(flag, value, reason)
        }
        e => e,
    })?;
    if registry.policy().cache_impl != cache_impl {
        return Err(Error::config(
            "--impl",
            cache_impl.as_str(),
            format!(
                "Redis at {} answered the probe but the registry could not use it; run with RUST_LOG=warn for its \
                 log",
                redact_url(&redis_url)
            ),
        ));
    }
    // What Redis holds besides this replay's keys (its own structures, other prefixes): not room for the cache.
    let baseline = facts
        .as_ref()
        .map(|f| (f.maxmemory_bytes, f.used_memory_bytes));
    let ropts = ReplayOptions::default()
        .with_strict(args.strict)
        .with_max_skipped(Some(args.max_skipped))
        .with_clock(facts.is_none().then_some(mock));
    let bar = progress_bar(&reader, args.json);
    let started = Instant::now();
    let mut skipped = 0u64;
    let run = replay::replay(&registry, &mut reader, &ropts, |event| match event {
        ReplayEvent::Malformed(e) => {
            skipped += 1;
            if skipped <= SHOWN_SKIPPED {
                bar.suspend(|| eprintln!("skipped: {e}"));
            }
        }
        ReplayEvent::Progress {
            requests,
            bytes_read,
        } => {
            bar.set_position(bytes_read);
            let rate = requests as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} requests, {}/s",
                thousands(requests),
                thousands(rate as u64)
            ));
        }
        _ => {}
    });
    // Ctrl-C ends the replay early, and still removes what it wrote to Redis.
    let result = tokio::select! {
        biased;
        () = interrupt.recv() => Err(Error::trace_file(
            &args.trace.display().to_string(),
            "interrupted (Ctrl-C)",
        )),
        r = run => r,
    };
    bar.finish_and_clear();
    if skipped > SHOWN_SKIPPED {
        eprintln!(
            "skipped: {} more malformed {} not shown",
            skipped - SHOWN_SKIPPED,
            plural(skipped - SHOWN_SKIPPED, "line", "lines")
        );
    }
    // Whatever the outcome, the keys this replay wrote go (unless --keep), within a bound: a Redis that stopped
    // answering does not hang the command.
    let overhead = AnalysisOptions::default().per_key_overhead_bytes;
    let cleanup = if cache_impl == CacheImpl::Redis {
        let bound = Duration::from_secs(CLEANUP_SECS);
        let cleaning = tokio::time::timeout(
            bound,
            clean_up(&redis_url, &args.redis_prefix, args.keep, overhead),
        );
        Some(tokio::select! {
            biased;
            // A second Ctrl-C leaves the keys, and says where.
            () = interrupt.recv() => Err(Error::config(
                "--redis-prefix",
                args.redis_prefix.as_str(),
                format!("removal interrupted (Ctrl-C): keys under it are left in {}", redact_url(&redis_url)),
            )),
            r = cleaning => match r {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout {
                    operation: "removing the replay's keys from Redis",
                    after: bound,
                }),
            },
        })
    } else {
        None
    };
    // A malformed line under --strict: name the file too.
    let result = result.map_err(|e| match e {
        Error::Trace { .. } => Error::trace_file(&args.trace.display().to_string(), e.to_string()),
        e => e,
    });
    let mut report = match (result, &cleanup) {
        (Ok(mut r), _) => {
            r.eviction = Some(eviction);
            r.budget = args
                .memory
                .and_then(|bytes| registry.report_for_memory(bytes).budget);
            r
        }
        (Err(e), Some(Err(c))) => {
            eprintln!("error: {c}");
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    // What Redis held besides the replay's entries at the end (scripts, connections: measured, not guessed), or
    // before it when the end could not be read.
    let baseline = baseline.map(|(maxmemory, before)| {
        let end = match &cleanup {
            Some(Ok(Some(not_entries))) => *not_entries,
            _ => before,
        };
        (maxmemory, end)
    });
    if let Some((maxmemory, used)) = baseline {
        report.redis_maxmemory_bytes = Some(maxmemory);
        report.redis_baseline_bytes = Some(used);
        if maxmemory > used {
            if let Some(p) = registry.predict_at_bytes(maxmemory - used) {
                report.predicted_hit_ratio_at_maxmemory = Some(p.hit_ratio);
                report.predicted_lru_hit_ratio_at_maxmemory = Some(p.lru_hit_ratio);
                report.prediction_uncertainty = Some(p.uncertainty);
            }
        }
    }
    if let Some(path) = &args.plot {
        let measured = match cache_impl {
            CacheImpl::Memory => Some(plot::Measured::Objects(
                args.memory_entries,
                report.overall.hit_ratio,
            )),
            CacheImpl::Redis => match (report.redis_maxmemory_bytes, report.redis_baseline_bytes) {
                (Some(max), Some(used)) if max > used => {
                    Some(plot::Measured::Bytes(max - used, report.overall.hit_ratio))
                }
                _ => None,
            },
            _ => None,
        };
        let series: Vec<plot::Series<'_>> = report
            .patterns
            .iter()
            .filter_map(|(name, c)| c.curve.as_ref().map(|curve| (name.as_str(), curve)))
            .filter(|(_, curve)| !curve.objects.is_empty())
            .chain(report.overall.curve.as_ref().map(|c| (plot::SHARED, c)))
            .collect();
        let title = format!(
            "{} ({})",
            args.trace
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            report.format
        );
        plot::draw(path, &title, &series, measured)?;
    }
    if args.json {
        let mut json = serde_json::to_string_pretty(&report).unwrap_or_default();
        json.push('\n');
        crate::print_out(&json)?;
    } else {
        let mut out = report.to_table();
        let secs = report.elapsed_secs;
        let (one, many) = if report.format == TraceFormat::OracleGeneral.as_str() {
            ("record", "records")
        } else {
            ("line", "lines")
        };
        out.push_str(&format!(
            "{} {} ({}) in {:.1} s, {}/s; {} malformed {} skipped\n",
            thousands(report.overall.requests),
            plural(report.overall.requests, "request", "requests"),
            report.format,
            secs,
            thousands((report.overall.requests as f64 / secs.max(1e-9)) as u64),
            thousands(report.malformed_lines),
            plural(report.malformed_lines, one, many),
        ));
        if let Some(path) = &args.plot {
            out.push_str(&format!("plot: {}\n", path.display()));
        }
        crate::print_out(&out)?;
    }
    if let Some(Err(e)) = cleanup {
        return Err(e);
    }
    Ok(())
}

/// SIGINT (Ctrl-C), listened to from when it is made.
struct Interrupt {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Interrupt {
    fn new() -> Self {
        Interrupt {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok(),
        }
    }

    /// Returns at the next Ctrl-C (never, if no handler could be installed).
    async fn recv(&mut self) {
        #[cfg(unix)]
        match &mut self.signal {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

fn progress_bar(reader: &TraceReader, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(reader.total_bytes(), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} read, {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Connects once, so that a bad URL or an unreachable server is said with its cause before anything starts.
async fn probe_redis(url: &str) -> Result<()> {
    let shown = redact_url(url);
    if url.contains("+cluster://") {
        return Err(Error::config(
            "--redis-url",
            shown,
            "replay --impl redis takes a single Redis (redis:// or rediss://), not a cluster",
        ));
    }
    let client = redis::Client::open(url).map_err(|e| {
        Error::config(
            "--redis-url",
            shown.clone(),
            format!("not a Redis URL ({e}); it looks like redis://host:port or rediss://host:port"),
        )
    })?;
    let connect = client.get_multiplexed_async_connection();
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::config(
            "--redis-url",
            shown,
            format!("cannot reach Redis: {e}; is a redis-server running there?"),
        )),
        Err(_) => Err(Error::config(
            "--redis-url",
            shown,
            "no answer from Redis within 3 s",
        )),
    }
}

/// Counts the keys under `prefix` and, unless `keep`, deletes them (SCAN + UNLINK); says which on stderr. Answers
/// what of the server's `used_memory` was not the replay's entries just before: `used_memory` less the entries'
/// bytes as the estimators count them (key, value and `overhead` per key, [`redis_entry_bytes`]). That is Redis's
/// own memory at the end of the replay (its structures, the scripts and their caches, the replay's connections,
/// other keys; not this connection's): no room for entries. A little lower during the replay
/// (`docs/analysis.md`, "What is not entries"). `None` when Redis did not say; the keys are removed all the same.
async fn clean_up(url: &str, prefix: &str, keep: bool, overhead: u32) -> Result<Option<u64>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // This connection was not there while the replay ran: its own memory (`CLIENT INFO`'s `tot-mem`, Redis 6.2 and
    // later) is left out. A Redis that refuses INFO (an ACL user, a managed service) is cleaned all the same.
    let own = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async::<String>(&mut conn)
        .await
        .ok()
        .and_then(|info| {
            info.split_whitespace()
                .find_map(|f| f.strip_prefix("tot-mem="))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let used = redis::cmd("INFO")
        .arg("memory")
        .query_async::<String>(&mut conn)
        .await
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
    let pattern = format!("{}*", glob_escape(prefix));
    let mut cursor = 0u64;
    let mut keys = 0u64;
    let mut entry_bytes = Some(0u64);
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        keys += batch.len() as u64;
        if let (Some(_), Some(sum), false) = (used, entry_bytes, batch.is_empty()) {
            // Each entry's value length; leases, the generation and anything not a string answer an error or
            // nothing, and count as Redis's own memory. Best effort: a failure leaves the figure unknown, not
            // the keys behind.
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for k in &batch {
                pipe.cmd("STRLEN").arg(k);
            }
            entry_bytes = match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
                Ok(lens) => Some(
                    sum + batch
                        .iter()
                        .zip(lens)
                        .filter_map(|(k, v)| match v {
                            redis::Value::Int(n) if n > 0 && !k.contains(" ~") => {
                                Some(redis_entry_bytes(k.len() as u64, n as u64, overhead))
                            }
                            _ => None,
                        })
                        .sum::<u64>(),
                ),
                Err(_) => None,
            };
        }
        if !keep && !batch.is_empty() {
            redis::cmd("UNLINK")
                .arg(&batch)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let used_text = match used {
        Some(u) => format!("used_memory {}", bytes(u)),
        None => "used_memory unknown".to_string(),
    };
    if keep {
        eprintln!(
            "redis: kept {} {} under {prefix:?} at {} ({used_text})",
            thousands(keys),
            plural(keys, "key", "keys"),
            redact_url(url),
        );
    } else {
        eprintln!(
            "redis: removed the {} {} under {prefix:?} at {} ({used_text} before; --keep keeps them)",
            thousands(keys),
            plural(keys, "key", "keys"),
            redact_url(url),
        );
    }
    Ok(used
        .zip(entry_bytes)
        .map(|(u, e)| u.saturating_sub(own).saturating_sub(e)))
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(crate) fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// `1266595` → `1,266,595` (indicatif's `HumanCount`).
fn thousands(n: u64) -> String {
    indicatif::HumanCount(n).to_string()
}

/// Bytes in binary units, as indicatif's `{bytes}` shows them: `541.2 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
