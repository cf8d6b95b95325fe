//! A bounded loopback load generator for the reference service: `concurrency` workers request
//! `GET /users/{id}` with skewed ids (id = 1 + ⌊u³·keys⌋, u uniform: the low ids are hot) until `duration_secs`
//! or `requests` is reached, whichever comes first, then print throughput and latency per second and overall.
//!
//! ```sh
//! cargo run --release --example load -- --url http://127.0.0.1:8900 --duration-secs 10 --concurrency 32
//! ```
//!
//! Only loopback targets are accepted, and every bound is capped (120 s, 2,000,000 requests, 256 workers), so a
//! typo cannot turn it into a load test of someone else's server. `scripts/load.sh` runs the comparisons of
//! `docs/performance.md` with it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Base URL of the service (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8900")]
    url: String,
    /// Stop after this many seconds (at most 120).
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Stop after this many requests (at most 2,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Concurrent workers (at most 256).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Ids are drawn from 1..=keys.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Label printed with the results.
    #[arg(long, default_value = "run")]
    label: String,
}

fn loopback(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => match u.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        },
        Err(_) => false,
    }
}

/// Latency quantile (0–1) of sorted microsecond samples.
fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1e3
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !loopback(&args.url) {
        return Err(format!(
            "{} is not a loopback address; refusing to send load",
            args.url
        )
        .into());
    }
    let duration = Duration::from_secs(args.duration_secs.clamp(1, 120));
    let limit = args.requests.clamp(1, 2_000_000);
    let workers = args.concurrency.clamp(1, 256);
    let keys = args.keys.max(1);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(workers)
        .build()?;
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // (second since start, latency in µs) of every request: at most `limit` entries.
    let samples: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, issued, errors, stop, samples) = (
            client.clone(),
            issued.clone(),
            errors.clone(),
            stop.clone(),
            samples.clone(),
        );
        let base = args.url.trim_end_matches('/').to_string();
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
            let mut mine = Vec::new();
            while !stop.load(Ordering::Relaxed) && issued.fetch_add(1, Ordering::Relaxed) < limit {
                if start.elapsed() >= duration {
                    break;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                let id = 1 + ((u * u * u) * keys as f64) as u64 % keys;
                let t0 = Instant::now();
                let ok = match client.get(format!("{base}/users/{id}")).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                mine.push((
                    t0.duration_since(start).as_secs() as u32,
                    t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
                ));
            }
            samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(mine);
        }));
    }
    for t in tasks {
        t.await?;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let samples = std::mem::take(
        &mut *samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    println!("{}: per second", args.label);
    println!("  second  requests   p50_ms   p99_ms   max_ms");
    let last = samples.iter().map(|s| s.0).max().unwrap_or(0);
    for sec in 0..=last {
        let mut lat: Vec<u32> = samples.iter().filter(|s| s.0 == sec).map(|s| s.1).collect();
        lat.sort_unstable();
        println!(
            "  {sec:>6} {:>9} {:>8.2} {:>8.2} {:>8.2}",
            lat.len(),
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            quantile(&lat, 1.0)
        );
    }
    let mut all: Vec<u32> = samples.iter().map(|s| s.1).collect();
    all.sort_unstable();
    println!(
        "{}: {} requests in {elapsed:.1} s = {:.0} req/s, {} errors; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.label,
        all.len(),
        all.len() as f64 / elapsed,
        errors.load(Ordering::Relaxed),
        quantile(&all, 0.5),
        quantile(&all, 0.9),
        quantile(&all, 0.99),
        quantile(&all, 1.0)
    );
    Ok(())
}
