//! Benchmark results: every repetition kept, summarised as min/median/max,
//! mesh paths also as ratios (of medians) to `direct` and `tls-tunnel` from
//! the same run; printed as Markdown and written as JSON.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Placement, paths::Path};

/// Metrics in report order, with how to read them.
const METRICS: &[(&str, &str)] = &[
    ("throughput_1_gbps", "throughput, 1 stream (Gbit/s)"),
    ("throughput_8_gbps", "throughput, 8 streams (Gbit/s)"),
    ("latency_1k_p50_ms", "1,000 req/s: p50 (ms)"),
    ("latency_1k_p90_ms", "1,000 req/s: p90 (ms)"),
    ("latency_1k_p99_ms", "1,000 req/s: p99 (ms)"),
    ("latency_1k_max_ms", "1,000 req/s: max (ms)"),
    ("latency_5k_p50_ms", "5,000 req/s: p50 (ms)"),
    ("latency_5k_p90_ms", "5,000 req/s: p90 (ms)"),
    ("latency_5k_p99_ms", "5,000 req/s: p99 (ms)"),
    ("latency_5k_max_ms", "5,000 req/s: max (ms)"),
    ("saturation_rps", "saturation, 4 connections (req/s)"),
    ("connections_per_s", "new connections (conn/s)"),
    ("connection_p99_ms", "new connection + request: p99 (ms)"),
    (
        "agent_cpu_s_per_1000_req",
        "agents' CPU per 1,000 requests (s)",
    ),
    ("agent_vcpu_at_1k", "agents' CPU at 1,000 req/s (vCPU)"),
    ("agent_peak_rss_mib", "agent peak RSS (MiB)"),
    ("errors_1k", "failed requests at 1,000 req/s"),
    ("errors_5k", "failed requests at 5,000 req/s"),
];

pub struct Results {
    reps: usize,
    seconds: f64,
    values: BTreeMap<(&'static str, &'static str, String), Vec<f64>>,
    paths: Vec<Path>,
}

struct Summary {
    min: f64,
    median: f64,
    max: f64,
}

fn summary(v: &[f64]) -> Option<Summary> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    };
    Some(Summary {
        min: s[0],
        median,
        max: s[s.len() - 1],
    })
}

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 0.1 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

impl Results {
    pub fn new(reps: usize, seconds: f64) -> Self {
        Results {
            reps,
            seconds,
            values: BTreeMap::new(),
            paths: Vec::new(),
        }
    }

    pub fn add(&mut self, placement: Placement, path: Path, metric: &str, value: f64) {
        if !self.paths.contains(&path) {
            self.paths.push(path);
        }
        self.values
            .entry((placement.name(), path.name(), metric.to_owned()))
            .or_default()
            .push(value);
    }

    fn summary(&self, placement: &str, path: &str, metric: &str) -> Option<Summary> {
        summary(self.values.get(&(placement, path, metric.to_owned()))?)
    }

    /// Median of a mesh path over the median of `base`, same placement.
    fn ratio(&self, placement: &str, path: &str, base: &str, metric: &str) -> Option<f64> {
        let a = self.summary(placement, path, metric)?.median;
        let b = self.summary(placement, base, metric)?.median;
        (b != 0.0).then(|| a / b)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let machine = super::machine();
        out.push_str(&format!(
            "Machine: {} ({} cores, {} GiB), kernel {}. Each cell: median (min-max) of {} runs of {} s; ratios are of medians.\n",
            machine["cpu"], machine["cores"], machine["memory_gib"], machine["kernel"], self.reps, self.seconds
        ));
        let mesh: Vec<&Path> = self.paths.iter().filter(|p| p.is_mesh()).collect();
        for placement in ["cross-node", "same-node"] {
            out.push_str(&format!("\n### {placement}\n\n| metric |"));
            for p in &self.paths {
                out.push_str(&format!(" {} |", p.name()));
            }
            for m in &mesh {
                out.push_str(&format!(" {0} / direct | {0} / tls-tunnel |", m.name()));
            }
            out.push_str("\n|---|");
            for _ in 0..self.paths.len() + 2 * mesh.len() {
                out.push_str("---|");
            }
            out.push('\n');
            for (metric, label) in METRICS {
                let row: Vec<Option<Summary>> = self
                    .paths
                    .iter()
                    .map(|p| self.summary(placement, p.name(), metric))
                    .collect();
                if row.iter().all(Option::is_none) {
                    continue;
                }
                out.push_str(&format!("| {label} |"));
                for s in &row {
                    match s {
                        Some(s) if self.reps > 1 => out.push_str(&format!(
                            " {} ({}-{}) |",
                            fmt(s.median),
                            fmt(s.min),
                            fmt(s.max)
                        )),
                        Some(s) => out.push_str(&format!(" {} |", fmt(s.median))),
                        None => out.push_str(" |"),
                    }
                }
                for m in &mesh {
                    for base in ["direct", "tls-tunnel"] {
                        match self.ratio(placement, m.name(), base, metric) {
                            Some(r) => out.push_str(&format!(" {}x |", fmt(r))),
                            None => out.push_str(" |"),
                        }
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .values
            .iter()
            .map(|((placement, path, metric), values)| {
                let s = summary(values).expect("a recorded metric has values");
                let mesh = self.paths.iter().any(|p| p.name() == *path && p.is_mesh());
                let ratio = |base| {
                    mesh.then(|| self.ratio(placement, path, base, metric))
                        .flatten()
                };
                json!({
                    "placement": placement,
                    "path": path,
                    "metric": metric,
                    "values": values,
                    "min": s.min,
                    "median": s.median,
                    "max": s.max,
                    "ratio_to_direct": ratio("direct"),
                    "ratio_to_tls_tunnel": ratio("tls-tunnel"),
                })
            })
            .collect();
        json!({
            "machine": super::machine(),
            "reps": self.reps,
            "seconds_per_measurement": self.seconds,
            "results": rows,
        })
    }
}
