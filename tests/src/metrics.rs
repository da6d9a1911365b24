//! Reading a Prometheus page as a user would: one series by its exact name
//! and labels, or the sum of the series that carry some labels. A series
//! that is not on the page is an error, unless the caller says it may be
//! absent (a counter with labels appears only once it first counts). Even
//! then, a metric or a label the code does not define (renamed, misspelt)
//! is an error, never a zero: prometheus-client leaves a family with no
//! series off the page, so such names are checked against the agent's own
//! source, where it registers its metrics and defines their label sets.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::Agent;

/// Suffixes a family's samples carry after its name (OpenMetrics).
const SAMPLE_SUFFIXES: [&str; 6] = ["", "_total", "_count", "_sum", "_bucket", "_info"];

/// The agent's source files that register metric families or define
/// their label sets (`#[derive(EncodeLabelSet)]`).
const PRODUCT_SOURCES: [&str; 7] = [
    include_str!("../../mesh-agent/src/metrics.rs"),
    include_str!("../../mesh-agent/src/waypoint/mod.rs"),
    include_str!("../../mesh-agent/src/waypoint/telemetry.rs"),
    include_str!("../../mesh-agent/src/waypoint/ratelimit.rs"),
    include_str!("../../mesh-agent/src/waypoint/resilience.rs"),
    include_str!("../../mesh-agent/src/waypoint/trace.rs"),
    include_str!("../../mesh-agent/src/identity/ca_server/mod.rs"),
];

/// The families the code registers: the string literal that opens each
/// `register(` or `encode_descriptor(` call.
fn registered_families() -> Vec<&'static str> {
    let mut out = Vec::new();
    for src in PRODUCT_SOURCES {
        for call in ["register(", "encode_descriptor("] {
            for (at, _) in src.match_indices(call) {
                let rest = src[at + call.len()..].trim_start();
                if let Some(lit) = rest.strip_prefix('"')
                    && let Some(end) = lit.find('"')
                {
                    out.push(&lit[..end]);
                }
            }
        }
    }
    out
}

/// The label keys the code defines: the fields of every label set struct.
fn defined_label_keys() -> Vec<&'static str> {
    let mut out = Vec::new();
    for src in PRODUCT_SOURCES {
        for (at, _) in src.match_indices("EncodeLabelSet)]") {
            let body = &src[at..];
            let Some(open) = body.find('{') else { continue };
            let Some(close) = body[open..].find('}') else {
                continue;
            };
            for line in body[open + 1..open + close].lines() {
                let line = line.trim().trim_start_matches("pub ");
                if line.starts_with("//") || line.starts_with('#') {
                    continue;
                }
                if let Some((key, _)) = line.split_once(':') {
                    out.push(key.trim());
                }
            }
        }
    }
    out
}

/// The family a sample name belongs to, among `families`.
fn family_of<'f>(families: impl IntoIterator<Item = &'f str>, name: &str) -> Option<&'f str> {
    families.into_iter().find(|family| {
        SAMPLE_SUFFIXES
            .iter()
            .any(|s| name.strip_prefix(family) == Some(s))
    })
}

/// The families the page declares (`# TYPE` lines).
fn declared_families(page: &str) -> impl Iterator<Item = &str> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
}

/// The sample lines of `name` (exact name, any labels).
fn samples<'p>(page: &'p str, name: &'p str) -> impl Iterator<Item = &'p str> {
    page.lines().filter(move |l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

/// Fails unless `name` is a sample of a family the page declares or the
/// code registers, and unless each of `keys` is a label it carries: on the
/// page when it has samples of `name`, else in the code's label sets.
fn check_defined(page: &str, name: &str, keys: &[&str]) -> anyhow::Result<()> {
    if family_of(declared_families(page), name).is_none()
        && family_of(registered_families(), name).is_none()
    {
        let mut families = registered_families();
        families.extend(declared_families(page));
        families.sort_unstable();
        families.dedup();
        bail!(
            "no metric family has samples named {name} (renamed?); known: {}",
            families.join(", ")
        );
    }
    match samples(page, name).next() {
        Some(first) => {
            for key in keys {
                ensure!(
                    first.contains(&format!("{{{key}=\"")) || first.contains(&format!(",{key}=\"")),
                    "{name} has no label {key} (renamed?): {first}"
                );
            }
        }
        None => {
            let defined = defined_label_keys();
            for key in keys {
                ensure!(
                    defined.contains(key),
                    "{key} is no label the code defines (renamed?), so {name} never has it"
                );
            }
        }
    }
    Ok(())
}

/// The name and label keys of a series spelled `name{a="b",c="d"}`.
fn name_and_keys(series: &str) -> (&str, Vec<&str>) {
    let Some((name, labels)) = series.split_once('{') else {
        return (series, Vec::new());
    };
    let keys = labels
        .trim_end_matches('}')
        .split("\",")
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
        .filter(|k| !k.is_empty())
        .collect();
    (name, keys)
}

/// The value of one series, by its exact name and labels as the page
/// spells them (`name{a="b"}`); None when the page has no such line (the
/// name and label keys being ones the code defines).
pub fn series_value(page: &str, series: &str) -> anyhow::Result<Option<f64>> {
    let (name, keys) = name_and_keys(series);
    check_defined(page, name, &keys)?;
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse()
                .with_context(|| format!("{series} has value {v:?}"))
        })
        .transpose()
}

/// The sum of every series of metric `name` that carries all of `labels`;
/// an error when none does.
pub fn series_sum(page: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let (sum, matched) = sum_matching(page, name, labels)?;
    if matched == 0 {
        let lines: Vec<&str> = samples(page, name).collect();
        bail!(
            "no series of {name} with {labels:?}; its series:\n{}",
            lines.join("\n")
        );
    }
    Ok(sum)
}

/// [`series_sum`], 0 when no series carries the labels (yet): for a check
/// that nothing was counted. The family and the label keys must exist.
pub fn series_sum_or_absent(
    page: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<f64> {
    Ok(sum_matching(page, name, labels)?.0)
}

fn sum_matching(page: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<(f64, usize)> {
    let keys: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
    check_defined(page, name, &keys)?;
    let mut sum = 0.0;
    let mut matched = 0;
    for l in samples(page, name).filter(|l| {
        labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    }) {
        let v = l.rsplit(' ').next().unwrap_or_default();
        sum += v
            .parse::<f64>()
            .with_context(|| format!("value of {l:?}"))?;
        matched += 1;
    }
    Ok((sum, matched))
}

impl Agent {
    /// The Prometheus page, from the metrics port.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.request(15020, "GET", "/metrics", None)?;
        ensure!(status == 200, "metrics answered {status}");
        Ok(body)
    }

    /// The value of one series, by its exact name and labels
    /// (`name{a="b"}`); an error when the page does not have it.
    pub fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let page = self.metrics()?;
        series_value(&page, series)?.with_context(|| {
            let (name, _) = name_and_keys(series);
            let lines: Vec<&str> = samples(&page, name).collect();
            format!("no series {series}; the page has:\n{}", lines.join("\n"))
        })
    }

    /// [`Agent::metric`], 0 when the series is not on the page (a labelled
    /// counter appears once it first counts); its family must be declared.
    pub fn metric_or_absent(&self, series: &str) -> anyhow::Result<f64> {
        Ok(series_value(&self.metrics()?, series)?.unwrap_or(0.0))
    }

    /// Waits, up to 10 s, until the series reads `want` (absent reading
    /// 0): for a count the agent makes just after the event a test caused.
    pub fn wait_metric(&self, series: &str, want: f64) -> anyhow::Result<()> {
        let mut last = 0.0;
        let waited = crate::converge(series, Duration::from_secs(10), || {
            last = self.metric_or_absent(series)?;
            Ok(last == want)
        });
        waited
            .map(drop)
            .with_context(|| format!("{series} is {last}, not {want}"))
    }

    /// A kernel capture counter (`mesh_capture_events_total{event}`), which
    /// the eBPF capture always exports.
    pub fn capture_counter(&self, event: &str) -> anyhow::Result<f64> {
        self.metric(&format!("mesh_capture_events_total{{event=\"{event}\"}}"))
    }
}

/// Checks the page with an independent OpenMetrics parser (python3's
/// prometheus_client); returns the number of metric families it read.
pub fn parse_openmetrics(page: &str) -> anyhow::Result<usize> {
    let script = "import sys\n\
                  from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
                  print(len(list(text_string_to_metric_families(sys.stdin.read()))))\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running /usr/bin/python3 (Debian python3-prometheus-client)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(page.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the OpenMetrics parser rejected the page: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP mesh_proxy_connections Connections.\n\
        # TYPE mesh_proxy_connections counter\n\
        mesh_proxy_connections_total{direction=\"hbone\",result=\"denied\"} 2\n\
        mesh_proxy_connections_total{direction=\"outbound\",result=\"denied\"} 1\n\
        # HELP mesh_enrolled_pods Pods.\n\
        # TYPE mesh_enrolled_pods gauge\n\
        mesh_enrolled_pods 3\n\
        # HELP mesh_config_warnings Warnings.\n\
        # TYPE mesh_config_warnings counter\n\
        # EOF\n";

    #[test]
    fn a_series_is_read_by_its_exact_name_and_labels() {
        let v = |s| series_value(PAGE, s).unwrap();
        assert_eq!(v("mesh_enrolled_pods"), Some(3.0));
        assert_eq!(
            v("mesh_proxy_connections_total{direction=\"hbone\",result=\"denied\"}"),
            Some(2.0)
        );
        assert_eq!(
            v("mesh_proxy_connections_total{direction=\"hbone\",result=\"limit\"}"),
            None
        );
        assert_eq!(v("mesh_config_warnings_total{kind=\"conflict\"}"), None);
    }

    #[test]
    fn a_metric_the_code_does_not_define_is_an_error_not_a_zero() {
        for series in [
            "mesh_enroled_pods",
            "mesh_proxy_connection_total{direction=\"hbone\",result=\"denied\"}",
            "mesh_proxy_connections_total{listener=\"hbone\",result=\"denied\"}",
            "istio_tcp_connections_opened_total{source_principle=\"x\"}",
            "istio_tcp_connection_opened_total{source_principal=\"x\"}",
        ] {
            assert!(series_value(PAGE, series).is_err(), "{series}");
        }
        assert!(
            series_sum_or_absent(PAGE, "mesh_proxy_connections_total", &[("listener", "x")])
                .is_err()
        );
    }

    #[test]
    fn a_family_with_no_series_yet_is_known_from_the_code() {
        // Not on the page: prometheus-client leaves empty families out.
        for (series, labels) in [
            (
                "istio_tcp_connections_opened_total",
                [("source_principal", "x")],
            ),
            ("istio_requests_total", [("response_code", "200")]),
            ("mesh_waypoint_rate_limited_total", [("scope", "total")]),
            (
                "mesh_waypoint_spans_dropped_total",
                [("reason", "export_failed")],
            ),
            (
                "istio_request_duration_milliseconds_count",
                [("grpc_response_status", "0")],
            ),
        ] {
            assert_eq!(
                series_sum_or_absent(PAGE, series, &labels).unwrap(),
                0.0,
                "{series}"
            );
        }
        assert_eq!(
            series_value(
                PAGE,
                "mesh_capture_events_total{event=\"inbound_assigned\"}"
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn sums_need_a_match_unless_absence_is_allowed() {
        let total = "mesh_proxy_connections_total";
        assert_eq!(
            series_sum(PAGE, total, &[("result", "denied")]).unwrap(),
            3.0
        );
        assert!(series_sum(PAGE, total, &[("result", "forwarded")]).is_err());
        assert_eq!(
            series_sum_or_absent(PAGE, total, &[("result", "forwarded")]).unwrap(),
            0.0
        );
        // A declared family with no series yet: absent, not an error.
        assert_eq!(
            series_sum_or_absent(PAGE, "mesh_config_warnings_total", &[("kind", "x")]).unwrap(),
            0.0
        );
    }
}
