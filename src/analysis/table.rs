//! The report as a plain-text table (`cache-rollout report`, `Report::to_table`).

use std::fmt::Write as _;

use super::report::{human_bytes, Report};

/// A share (0–1) in percent, never `-0.0` (a share is never negative; a rounding error below 0 shows as 0).
fn percent(share: f64) -> f64 {
    (share * 100.0).max(0.0)
}

impl Report {
    /// A plain-text rendering: one row per pattern, the shared cache, the recommendation, the routes. `write%` is
    /// writes and invalidations over all requests (`write_ratio`); predictions of a pattern without an estimator
    /// show `-`.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let caps: Vec<String> = self.capacities.iter().map(|c| format!("hr@{c}")).collect();
        let _ = write!(
            out,
            "{:<24} {:>10} {:>7} {:>10} {:>8}",
            "key_pattern", "gets", "write%", "unique", "max_hr"
        );
        for c in &caps {
            let _ = write!(out, " {c:>10}");
        }
        let _ = writeln!(out, " {:>10} {:>6}  recommended", "loader_ms", "ttl_s");
        for (name, p) in &self.patterns {
            if !p.estimated {
                let _ = write!(
                    out,
                    "{:<24} {:>10} {:>6.1}% {:>10} {:>8}",
                    name,
                    p.gets,
                    percent(p.write_ratio),
                    "-",
                    "-"
                );
                for _ in &self.capacities {
                    let _ = write!(out, " {:>10}", "-");
                }
            } else {
                let _ = write!(
                    out,
                    "{:<24} {:>10} {:>6.1}% {:>10} {:>8.4}",
                    name,
                    p.gets,
                    percent(p.write_ratio),
                    p.unique_keys,
                    p.max_hit_ratio
                );
                for c in &self.capacities {
                    match p.predicted_hit_ratio.get(&c.to_string()) {
                        Some(v) => {
                            let _ = write!(out, " {v:>10.4}");
                        }
                        None => {
                            let _ = write!(out, " {:>10}", "-");
                        }
                    }
                }
            }
            let _ = writeln!(
                out,
                " {:>10.3} {:>6}  {}",
                p.loader.mean_seconds * 1e3,
                p.recommended_ttl_secs.map_or("-".into(), |t| t.to_string()),
                if p.recommended { "yes" } else { "no" }
            );
        }
        for (label, shared) in [
            ("(all, one cache)", &self.shared),
            ("(whitelist, one cache)", &self.whitelist),
        ] {
            let Some(s) = shared else { continue };
            let _ = write!(
                out,
                "{:<24} {:>10} {:>7} {:>10} {:>8.4}",
                label, s.gets, "", s.unique_keys, s.max_hit_ratio
            );
            for c in &self.capacities {
                let v = s
                    .predicted_hit_ratio
                    .get(&c.to_string())
                    .copied()
                    .unwrap_or(0.0);
                let _ = write!(out, " {v:>10.4}");
            }
            out.push('\n');
        }
        let _ = writeln!(out, "\nreasons:");
        for (name, p) in &self.patterns {
            for r in &p.reasons {
                let _ = writeln!(out, "  {name}: {r}");
            }
        }
        if self.patterns.values().any(|p| !p.advice.is_empty()) {
            let _ = writeln!(out, "\nworth turning on:");
            for (name, p) in &self.patterns {
                for a in &p.advice {
                    let _ = writeln!(out, "  {name}: {a}");
                }
            }
        }
        if !self.routes.is_empty() {
            let _ = writeln!(out, "\nroutes (share of route time in loaders):");
            for r in &self.routes {
                let _ = writeln!(
                    out,
                    "  {} {}: {} {}, {:.1}% loader time",
                    r.method,
                    r.route,
                    r.requests,
                    if r.requests == 1 {
                        "request"
                    } else {
                        "requests"
                    },
                    percent(r.loader_share)
                );
                for p in &r.patterns {
                    let _ = writeln!(
                        out,
                        "    {:<22} {:>6.2} calls/request {:>6.1}% of route time",
                        p.key_pattern,
                        p.calls_per_request,
                        percent(p.share_of_route_time)
                    );
                }
            }
        }
        if let Some(plan) = &self.budget {
            out.push('\n');
            out.push_str(&plan.to_table());
        }
        let rec = &self.recommendation;
        let _ = writeln!(
            out,
            "\nrecommended whitelist: [{}], about {} of Redis memory, saving {:.3} s of origin time per second",
            rec.whitelist.join(", "),
            human_bytes(rec.memory_bytes),
            rec.origin_seconds_saved_per_second
        );
        let body = serde_json::to_string(&rec.apply).unwrap_or_default();
        let _ = writeln!(out, "apply at runtime:\n  curl -X PUT -H \"Authorization: Bearer $CACHE_ADMIN_TOKEN\" -H 'content-type: application/json' -d '{body}' <url>/internal/cache/config");
        let _ = writeln!(out, "or in config/<APP_ENV>.toml:\n{}", rec.toml);
        out
    }
}
