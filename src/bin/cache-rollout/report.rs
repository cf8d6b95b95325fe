//! `cache-rollout report`: a running service's analysis as a table, its JSON, or an SVG of its curves.

use std::error::Error as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use cache_rollout::analysis::Report;
use cache_rollout::{Error, Result};

use crate::{plot, ReportArgs, ServiceSettings};

/// Seconds `report` waits for the service.
const TIMEOUT_SECS: u64 = 10;

pub(crate) async fn run(args: ReportArgs) -> Result<()> {
    let base = match &args.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        // Where `serve` listens from this directory: BIND_ADDR, else config/*.toml's bind_addr, else the default.
        None => format!(
            "http://{}",
            reachable(ServiceSettings::load(Path::new("config"))?.bind_addr)
        ),
    };
    let url = match args.memory {
        Some(bytes) => format!("{base}/internal/cache/report?memory={bytes}"),
        None => format!("{base}/internal/cache/report"),
    };
    let fail = |reason: String| Error::Report {
        url: url.clone(),
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(TIMEOUT_SECS))
        .build()
        .map_err(|e| fail(cause(&e)))?;
    // Reading needs the admin token in staging: send it when it is set (never shown).
    let mut req = client.get(&url);
    if let Ok(token) = std::env::var("CACHE_ADMIN_TOKEN") {
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
    }
    let resp = req.send().await.map_err(|e| fail(cause(&e)))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| fail(cause(&e)))?;
    if !status.is_success() {
        return Err(fail(match status {
            reqwest::StatusCode::NOT_FOUND => "HTTP 404 Not Found: every /internal/ path answers 404 when APP_ENV is \
                 production or unknown (start the service with APP_ENV=development, or staging with \
                 CACHE_ADMIN_TOKEN), or this is not a cache-rollout service"
                .to_string(),
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => format!(
                "HTTP {status}: in staging, reading /internal/cache needs the admin token: set CACHE_ADMIN_TOKEN \
                 (sent as a bearer token) to the service's"
            ),
            s => format!("HTTP {s}: {}", body.chars().take(200).collect::<String>()),
        }));
    }
    let report: Option<Report> = if args.json && args.plot.is_none() {
        None
    } else {
        Some(serde_json::from_str(&body).map_err(|e| {
            fail(format!(
                "the answer is not a cache-rollout report ({e}); is --url the service's base URL?"
            ))
        })?)
    };
    if let (Some(path), Some(report)) = (&args.plot, &report) {
        let series: Vec<plot::Series<'_>> = report
            .patterns
            .iter()
            .filter(|(_, p)| !p.curve.objects.is_empty())
            .map(|(name, p)| (name.as_str(), &p.curve))
            .chain(report.shared.as_ref().map(|s| (plot::SHARED, &s.curve)))
            .collect();
        plot::draw(
            path,
            &format!("{base} ({})", report.generated_at),
            &series,
            None,
        )?;
    }
    let mut out = match (args.json, &report) {
        (true, _) => format!("{body}\n"),
        (false, Some(report)) => report.to_table().replace("<url>", &base),
        (false, None) => String::new(),
    };
    if let (false, Some(path)) = (args.json, &args.plot) {
        out.push_str(&format!("plot: {}\n", path.display()));
    }
    crate::print_out(&out)
}

/// The address to ask for a service bound to `addr`: the loopback one for an unspecified address (0.0.0.0, ::).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// What went wrong, with its root cause and what to try.
fn cause(e: &reqwest::Error) -> String {
    let mut root = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        root = s.to_string();
        source = s.source();
    }
    if e.is_builder() {
        format!("not a valid URL ({root}); pass --url http://host:port")
    } else if e.is_timeout() {
        format!(
            "no answer within {TIMEOUT_SECS} s: is the address right, and the service not stuck?"
        )
    } else if e.is_connect() {
        format!(
            "cannot connect ({root}): is the service running there? Start it with `cargo run --release`, or pass \
             --url (BIND_ADDR sets the default)"
        )
    } else {
        format!("{e} ({root})")
    }
}
