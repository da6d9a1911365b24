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
        "connection_1k_p50_ms",
        "1,000 new connections/s, connection + request: p50 (ms)",
    ),
    (
        "connection_1k_p99_ms",
        "1,000 new connections/s, connection + request: p99 (ms)",
    ),
    (
        "agent_cpu_s_per_1000_req",
        "agents' CPU per 1,000 requests (s)",
    ),
    ("agent_vcpu_at_1k", "agents' CPU at 1,000 req/s (vCPU)"),
    (
        "agent_cpu_s_per_1000_conn",
        "agents' CPU per 1,000 new connections (s)",
    ),
    (
        "agent_cpu_s_per_1000_conn_at_1k",
        "agents' CPU per 1,000 new connections, at 1,000/s (s)",
    ),
    ("agent_rss_at_1k_mib", "agent RSS after 1,000 req/s (MiB)"),
    (
        "agent_anon_at_1k_mib",
        "of it anonymous (heap, stacks) (MiB)",
    ),
    ("agent_peak_rss_mib", "agent peak RSS, whole run (MiB)"),
    (
        "middle_cpu_s_per_1000_req",
        "waypoint's / proxy's CPU per 1,000 requests (s)",
    ),
    (
        "middle_vcpu_at_1k",
        "waypoint's / proxy's CPU at 1,000 req/s (vCPU)",
    ),
    (
        "middle_cpu_s_per_1000_conn",
        "waypoint's / proxy's CPU per 1,000 new connections (s)",
    ),
    (
        "middle_rss_at_1k_mib",
        "waypoint / proxy RSS after 1,000 req/s (MiB)",
    ),
    (
        "middle_peak_rss_mib",
        "waypoint / proxy peak RSS, whole run (MiB)",
    ),
    ("errors_1k", "failed requests at 1,000 req/s"),
    ("errors_5k", "failed requests at 5,000 req/s"),
];

/// How a traffic metric reads in the tables, if it is one.
pub fn label(metric: &str) -> Option<&'static str> {
    METRICS.iter().find(|(m, _)| *m == metric).map(|(_, l)| *l)
}

/// A traffic metric's place in report order (others after them all).
pub fn order(metric: &str) -> usize {
    METRICS
        .iter()
        .position(|(m, _)| *m == metric)
        .unwrap_or(METRICS.len())
}

/// The idle table's metrics (agent RSS, mesh-ebpf); `{pods}` and
/// `{workloads}` are filled in from the run.
const IDLE_METRICS: &[(&str, &str)] = &[
    ("idle_rss_mib", "RSS, nothing enrolled, empty store (MiB)"),
    ("idle_rss_pods_mib", "RSS, {pods} enrolled pods (MiB)"),
    (
        "idle_rss_pods_workloads_mib",
        "RSS, {pods} enrolled pods + {workloads} workloads (MiB)",
    ),
    ("rss_per_pod_kib", "per enrolled pod (KiB)"),
    ("rss_per_workload_kib", "per stored workload (KiB)"),
    (
        "idle_rss_connections_mib",
        "RSS, and {connections} open keep-alive connections (MiB)",
    ),
    ("rss_per_connection_kib", "per open connection (KiB)"),
];

/// The scale table's metrics, in report order, with their labels.
fn scale_metrics() -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for &n in super::scale::POLICIES {
        rows.push((
            format!("policies_{n}_conn_per_s"),
            format!("new connections/s, {n} policies"),
        ));
    }
    for &n in super::scale::POLICIES {
        rows.push((
            format!("policies_{n}_ratio"),
            format!("new connections/s, {n} policies / none"),
        ));
    }
    for &n in &[0, 1000, 10_000, 30_000] {
        rows.push((
            format!("workloads_{n}_ready_ms"),
            format!("ready after start, {n} stored workloads (ms) (YAML)"),
        ));
        rows.push((
            format!("workloads_{n}_json_ready_ms"),
            format!("ready after start, {n} stored workloads (ms) (JSON)"),
        ));
    }
    for &n in &[0, 1000, 10_000, 30_000] {
        rows.push((
            format!("workloads_{n}_rss_mib"),
            format!("RSS when ready, {n} stored workloads (MiB)"),
        ));
    }
    for &n in &[0, 1000, 10_000, 30_000] {
        rows.push((
            format!("workloads_{n}_per_workload_kib"),
            format!("per stored workload, with {n} (KiB)"),
        ));
    }
    rows
}

/// The capture modes compared in their own column.
const CAPTURE_COMPARISON: (&str, &str) = ("mesh-ebpf", "mesh-iptables");

pub struct Results {
    reps: usize,
    seconds: f64,
    idle_pods: usize,
    idle_workloads: usize,
    values: BTreeMap<(&'static str, &'static str, String), Vec<f64>>,
    paths: Vec<Path>,
}

struct Summary {
    min: f64,
    median: f64,
    max: f64,
}

fn summary(v: &[f64]) -> Option<Summary> {
    Some(Summary {
        min: v.iter().copied().reduce(f64::min)?,
        median: median(v)?,
        max: v.iter().copied().reduce(f64::max)?,
    })
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
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
    pub fn new(reps: usize, seconds: f64, idle_pods: usize, idle_workloads: usize) -> Self {
        Results {
            reps,
            seconds,
            idle_pods,
            idle_workloads,
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

    /// One cell: median (min-max), or the median alone for one run.
    fn cell(&self, s: &Summary) -> String {
        if self.reps > 1 {
            format!("{} ({}-{})", fmt(s.median), fmt(s.min), fmt(s.max))
        } else {
            fmt(s.median)
        }
    }

    /// The baselines that were measured in this run.
    fn present<'b>(&self, bases: &[&'b str]) -> Vec<&'b str> {
        bases
            .iter()
            .copied()
            .filter(|b| self.paths.iter().any(|p| p.name() == *b))
            .collect()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let machine = super::machine();
        out.push_str(&format!(
            "Machine: {} ({} cores, {} GiB), kernel {}. Each cell: median (min-max) of {} runs of {} s; ratios are of medians.\n",
            machine["cpu"], machine["cores"], machine["memory_gib"], machine["kernel"], self.reps, self.seconds
        ));
        let mesh: Vec<&Path> = self.paths.iter().filter(|p| p.is_mesh()).collect();
        let (ebpf, iptables) = CAPTURE_COMPARISON;
        let compare = [ebpf, iptables]
            .iter()
            .all(|name| self.paths.iter().any(|p| p.name() == *name));
        for placement in ["cross-node", "same-node"] {
            if !self.values.keys().any(|(p, _, _)| *p == placement) {
                continue;
            }
            let mut header = vec!["metric".to_owned()];
            header.extend(self.paths.iter().map(|p| p.name().to_owned()));
            for m in &mesh {
                for base in self.present(m.baselines()) {
                    header.push(format!("{} / {base}", m.name()));
                }
            }
            if compare {
                header.push(format!("{ebpf} / {iptables}"));
            }
            out.push_str(&format!("\n### {placement}\n\n"));
            table_head(&mut out, &header);
            for (metric, label) in METRICS {
                let row: Vec<Option<Summary>> = self
                    .paths
                    .iter()
                    .map(|p| self.summary(placement, p.name(), metric))
                    .collect();
                if row.iter().all(Option::is_none) {
                    continue;
                }
                let mut cells = vec![(*label).to_owned()];
                cells.extend(
                    row.iter()
                        .map(|s| s.as_ref().map(|s| self.cell(s)).unwrap_or_default()),
                );
                let ratio = |path: &str, base: &str| {
                    self.ratio(placement, path, base, metric)
                        .map(|r| format!("{}x", fmt(r)))
                        .unwrap_or_default()
                };
                for m in &mesh {
                    for base in self.present(m.baselines()) {
                        cells.push(ratio(m.name(), base));
                    }
                }
                if compare {
                    cells.push(ratio(ebpf, iptables));
                }
                table_row(&mut out, &cells);
            }
        }
        let idle: Vec<(String, Summary)> = IDLE_METRICS
            .iter()
            .filter_map(|(metric, label)| {
                let label = label
                    .replace("{pods}", &self.idle_pods.to_string())
                    .replace("{workloads}", &self.idle_workloads.to_string())
                    .replace("{connections}", &super::idle::CONNECTIONS.to_string());
                Some((label, self.summary("idle", "mesh-ebpf", metric)?))
            })
            .collect();
        if !idle.is_empty() {
            out.push_str("\n### idle memory (one agent, mesh-ebpf)\n\n");
            table_head(&mut out, &["metric".to_owned(), "agent".to_owned()]);
            for (label, s) in &idle {
                table_row(&mut out, &[label.clone(), self.cell(s)]);
            }
        }
        let scale: Vec<(String, Summary)> = scale_metrics()
            .into_iter()
            .filter_map(|(metric, label)| {
                Some((label, self.summary("scale", "mesh-ebpf", &metric)?))
            })
            .collect();
        if !scale.is_empty() {
            out.push_str(
                "\n### scale (mesh-ebpf; policies: cross-node, DENY policies in the server's \
                 namespace that never match the client; workloads: one agent)\n\n",
            );
            table_head(&mut out, &["metric".to_owned(), "agent".to_owned()]);
            for (label, s) in &scale {
                table_row(&mut out, &[label.clone(), self.cell(s)]);
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
                let bases = self
                    .paths
                    .iter()
                    .find(|p| p.name() == *path)
                    .map_or(&[][..], |p| p.baselines());
                let ratio = |base: &str| {
                    bases
                        .contains(&base)
                        .then(|| self.ratio(placement, path, base, metric))
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
                    "ratio_to_mesh_ebpf": ratio("mesh-ebpf"),
                    "ratio_to_l7_proxy": ratio("l7-proxy"),
                    "ratio_to_mesh_iptables": (*path == CAPTURE_COMPARISON.0)
                        .then(|| self.ratio(placement, path, CAPTURE_COMPARISON.1, metric))
                        .flatten(),
                })
            })
            .collect();
        json!({
            "machine": super::machine(),
            "reps": self.reps,
            "seconds_per_measurement": self.seconds,
            "idle_enrolled_pods": self.idle_pods,
            "idle_stored_workloads": self.idle_workloads,
            "results": rows,
        })
    }
}

fn table_head(out: &mut String, header: &[String]) {
    table_row(out, header);
    table_row(out, &vec!["---".to_owned(); header.len()]);
}

fn table_row(out: &mut String, cells: &[String]) {
    out.push('|');
    for c in cells {
        out.push_str(&format!(" {c} |"));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::super::Figures;
    use super::*;

    /// Every traffic metric belongs to the runs that take it (`bench
    /// --figures`), the peak RSS to none; a new metric must be placed here.
    #[test]
    fn every_traffic_metric_is_one_of_the_figures() {
        let requests = [
            "latency_1k_p50_ms",
            "latency_1k_p90_ms",
            "latency_1k_p99_ms",
            "latency_1k_max_ms",
            "latency_5k_p50_ms",
            "latency_5k_p90_ms",
            "latency_5k_p99_ms",
            "latency_5k_max_ms",
            "saturation_rps",
            "agent_cpu_s_per_1000_req",
            "agent_vcpu_at_1k",
            "agent_rss_at_1k_mib",
            "agent_anon_at_1k_mib",
            "middle_cpu_s_per_1000_req",
            "middle_vcpu_at_1k",
            "middle_rss_at_1k_mib",
            "errors_1k",
            "errors_5k",
        ];
        let connections = [
            "connections_per_s",
            "connection_p99_ms",
            "connection_1k_p50_ms",
            "connection_1k_p99_ms",
            "agent_cpu_s_per_1000_conn",
            "agent_cpu_s_per_1000_conn_at_1k",
            "middle_cpu_s_per_1000_conn",
        ];
        let throughput = ["throughput_1_gbps", "throughput_8_gbps"];
        let none = ["agent_peak_rss_mib", "middle_peak_rss_mib"];
        for (metric, _) in METRICS {
            let want = if requests.contains(metric) {
                Some(Figures::Requests)
            } else if connections.contains(metric) {
                Some(Figures::Connections)
            } else if throughput.contains(metric) {
                Some(Figures::Throughput)
            } else {
                assert!(none.contains(metric), "{metric} is in no list of this test");
                None
            };
            assert_eq!(Figures::of(metric), want, "{metric}");
        }
    }
}
