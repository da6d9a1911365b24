//! `cargo xtask bench-ab`: two agent builds measured in alternated pairs
//! of one-repetition bench runs (base, new; then new, base; ...), so that
//! the machine's drift over the run falls on both alike, and compared per
//! figure: each run's value, the medians, and in how many pairs the new
//! build was lower.

use std::{
    collections::BTreeMap,
    path::{Path as FsPath, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{Figures, Placement, paths::Path};

#[derive(clap::Args)]
pub struct Options {
    /// The agent binary to compare against (a release build of the base
    /// commit: build it, copy it away).
    #[arg(long)]
    pub base: PathBuf,
    /// The agent binary under test; default: a release build of the
    /// working tree, made by this command.
    #[arg(long)]
    pub new: Option<PathBuf>,
    /// Pairs of runs per placement (4 or more: one pair tells nothing on
    /// a noisy machine).
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// Placements (repeat the option; default cross-node and same-node).
    #[arg(long = "placement", value_enum)]
    pub placements: Vec<Placement>,
    /// The path measured (default mesh-ebpf).
    #[arg(long, value_enum, default_value_t = Path::MeshEbpf)]
    pub path: Path,
    /// Only these figures in each run (repeat the option; default all):
    /// more pairs in the same time for a change that can only move some.
    #[arg(long = "figures", value_enum)]
    pub figures: Vec<Figures>,
    /// Each run is `bench --quick` (the debug build of the tools; 1 s per
    /// figure): checks the harness, not the numbers.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure!(opts.pairs >= 1, "--pairs must be at least 1");
    let placements = if opts.placements.is_empty() {
        vec![Placement::CrossNode, Placement::SameNode]
    } else {
        opts.placements.clone()
    };
    ensure!(
        placements
            .iter()
            .all(|p| matches!(p, Placement::CrossNode | Placement::SameNode)),
        "bench-ab compares the traffic placements (cross-node, same-node)"
    );
    let root = crate::workspace_root();
    let dir = super::target_dir(&root).join("bench/ab");
    mesh_tests::remove_dir_if_any(&dir).with_context(|| dir.display().to_string())?;
    std::fs::create_dir_all(&dir)?;
    let base = absolute(&opts.base)?;
    let new = match &opts.new {
        Some(new) => absolute(new)?,
        None => {
            // Copied: a build during the comparison must not change it.
            let profile = if opts.quick { "debug" } else { "release" };
            let mut build = Command::new("cargo");
            build.args(["build", "-p", "mesh-agent"]);
            if !opts.quick {
                build.arg("--release");
            }
            crate::exec::run(build.current_dir(&root))?;
            let built = super::target_dir(&root).join(profile).join("mesh-agent");
            let copy = dir.join("new-mesh-agent");
            std::fs::copy(&built, &copy).with_context(|| built.display().to_string())?;
            copy
        }
    };
    for bin in [&base, &new] {
        ensure!(bin.is_file(), "no agent binary at {}", bin.display());
    }
    let xtask = std::env::current_exe().context("the xtask binary")?;
    let mut pairs = Pairs::default();
    for &placement in &placements {
        for pair in 1..=opts.pairs {
            // Base first in odd pairs, new first in even ones.
            let order = if pair % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            for new_build in order {
                let side = if new_build { "new" } else { "base" };
                let json = dir.join(format!("{side}-{}-{pair}.json", placement.name()));
                println!(
                    "==> bench-ab: {} pair {pair}/{}: {side}",
                    placement.name(),
                    opts.pairs
                );
                let mut bench = Command::new(&xtask);
                bench
                    .args(["bench", "--path", opts.path.name()])
                    .args(["--placement", placement.name()])
                    .arg("--out")
                    .arg(&json)
                    .env("MESH_AGENT_BIN", if new_build { &new } else { &base })
                    .current_dir(&root);
                for figures in &opts.figures {
                    bench.args(["--figures", figures.name()]);
                }
                if opts.quick {
                    bench.arg("--quick");
                } else {
                    bench.args(["--reps", "1"]);
                }
                crate::exec::run(&mut bench)?;
                let text =
                    std::fs::read_to_string(&json).with_context(|| json.display().to_string())?;
                let results: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not JSON", json.display()))?;
                only_figures(&results, &opts.figures)
                    .with_context(|| json.display().to_string())?;
                pairs.add(placement.name(), new_build, &results, opts.path.name());
            }
        }
    }
    ensure!(
        !pairs.values.is_empty(),
        "the runs' results hold no figures of {} (has the results' layout changed?)",
        opts.path.name()
    );
    let md = pairs.markdown(&base, &new);
    println!("\n{md}");
    let out = dir.join("ab.md");
    std::fs::write(&out, &md)?;
    println!("each run: {}; this table: {}", dir.display(), out.display());
    Ok(())
}

/// A run asked for some figures holds none of the others.
fn only_figures(results: &Value, figures: &[Figures]) -> anyhow::Result<()> {
    if figures.is_empty() {
        return Ok(());
    }
    for row in results["results"].as_array().into_iter().flatten() {
        let metric = row["metric"].as_str().unwrap_or_default();
        if let Some(of) = Figures::of(metric) {
            ensure!(
                figures.contains(&of),
                "the run took {metric} ({} figures), which was not asked for",
                of.name()
            );
        }
    }
    Ok(())
}

fn absolute(path: &FsPath) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| path.display().to_string())
}

/// Each figure's values per build, in run order.
#[derive(Default)]
struct Pairs {
    values: BTreeMap<(String, String), [Vec<f64>; 2]>,
}

impl Pairs {
    /// The rows of one run's results for `path` (one repetition each).
    fn add(&mut self, placement: &str, new: bool, results: &Value, path: &str) {
        let rows = results["results"].as_array().map_or(&[][..], Vec::as_slice);
        for row in rows {
            if row["path"] != path || row["placement"] != placement {
                continue;
            }
            let (Some(metric), Some(value)) = (row["metric"].as_str(), row["median"].as_f64())
            else {
                continue;
            };
            let entry = self
                .values
                .entry((placement.to_owned(), metric.to_owned()))
                .or_default();
            entry[usize::from(new)].push(value);
        }
    }

    fn markdown(&self, base: &FsPath, new: &FsPath) -> String {
        let mut out = format!(
            "base: {}\nnew: {}\n\n| placement | figure | base (each run) | new (each run) | base median | new median | change | new lower in | p |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
            base.display(),
            new.display()
        );
        let mut rows: Vec<_> = self.values.iter().collect();
        // Report order within each placement.
        rows.sort_by_key(|((placement, metric), _)| {
            (placement.clone(), super::report::order(metric))
        });
        for ((placement, metric), [b, n]) in rows {
            let (Some(bm), Some(nm)) = (super::report::median(b), super::report::median(n)) else {
                continue;
            };
            let change = if bm == 0.0 {
                "-".to_owned()
            } else {
                format!("{:+.1}%", (nm - bm) / bm * 100.0)
            };
            let lower = b.iter().zip(n).filter(|(b, n)| n < b).count();
            let higher = b.iter().zip(n).filter(|(b, n)| n > b).count();
            out.push_str(&format!(
                "| {placement} | {} | {} | {} | {} | {} | {change} | {lower} of {} | {:.3} |\n",
                super::report::label(metric).unwrap_or(metric),
                list(b),
                list(n),
                fmt(bm),
                fmt(nm),
                b.len().min(n.len()),
                sign_test(lower, higher),
            ));
        }
        out.push_str(
            "\np: how likely the pairs would split at least this unevenly if the builds \
             were alike (two-sided sign test, tied pairs left out). It cannot fall below \
             0.125 with 4 pairs, 0.031 with 6, 0.008 with 8; and of 40 figures of alike \
             builds, about one splits 6 of 6 (p 0.031) by chance.\n",
        );
        out
    }
}

/// Two-sided exact sign test: the chance that `lower` and `higher` pairs
/// (the others tied) split at least this unevenly if either order were
/// as likely in each pair.
fn sign_test(lower: usize, higher: usize) -> f64 {
    let n = lower + higher;
    if n == 0 {
        return 1.0;
    }
    let fewer = lower.min(higher);
    // C(n, i) / 2^n for i = 0..=fewer, by the ratio of successive terms.
    let mut term = 0.5f64.powi(n as i32);
    let mut tail = 0.0;
    for i in 0..=fewer {
        tail += term;
        term *= (n - i) as f64 / (i + 1) as f64;
    }
    (2.0 * tail).min(1.0)
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn list(v: &[f64]) -> String {
    v.iter().map(|&x| fmt(x)).collect::<Vec<_>>().join(" / ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(placement: &str, rows: &[(&str, f64)]) -> Value {
        let rows: Vec<Value> = rows
            .iter()
            .map(|(metric, v)| {
                json!({"placement": placement, "path": "mesh-ebpf", "metric": metric, "median": v})
            })
            .chain([json!({"placement": placement, "path": "direct", "metric": "connections_per_s", "median": 1.0})])
            .collect();
        json!({ "results": rows })
    }

    /// Each build's runs are kept in order, the medians compared, and a
    /// pair counts as lower only when the new build's value is.
    #[test]
    fn pairs_are_compared_per_figure_with_medians_and_the_pairs_lower() {
        let mut pairs = Pairs::default();
        for (base, new) in [(5000.0, 5200.0), (4800.0, 4700.0), (4900.0, 5100.0)] {
            pairs.add(
                "cross-node",
                false,
                &run(
                    "cross-node",
                    &[("connections_per_s", base), ("connection_1k_p50_ms", 0.40)],
                ),
                "mesh-ebpf",
            );
            pairs.add(
                "cross-node",
                true,
                &run(
                    "cross-node",
                    &[("connections_per_s", new), ("connection_1k_p50_ms", 0.38)],
                ),
                "mesh-ebpf",
            );
        }
        let md = pairs.markdown(FsPath::new("/b"), FsPath::new("/n"));
        assert!(
            md.contains("| cross-node | new connections (conn/s) | 5000 / 4800 / 4900 | 5200 / 4700 / 5100 | 4900 | 5100 | +4.1% | 1 of 3 | 1.000 |"),
            "{md}"
        );
        assert!(
            md.contains("connection + request: p50 (ms) | 0.400 / 0.400 / 0.400 | 0.380 / 0.380 / 0.380 | 0.400 | 0.380 | -5.0% | 3 of 3 | 0.250 |"),
            "{md}"
        );
        // Another path's rows are not mixed in.
        assert_eq!(md.matches("new connections (conn/s)").count(), 1, "{md}");
        // Report order: the connection rate before the fixed-rate p50.
        assert!(md.find("conn/s").unwrap() < md.find("p50").unwrap(), "{md}");
    }

    /// The sign test's p: exact for small counts, ties left out.
    #[test]
    fn the_sign_test_gives_the_two_sided_binomial_tail() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(sign_test(6, 0), 2.0 / 64.0));
        assert!(close(sign_test(0, 6), 2.0 / 64.0));
        assert!(close(sign_test(4, 0), 0.125));
        // 5 of 6: 2 * (1 + 6) / 64.
        assert!(close(sign_test(5, 1), 14.0 / 64.0));
        assert!(close(sign_test(3, 3), 1.0));
        assert!(close(sign_test(0, 0), 1.0));
        // 8 of 8, 7 of 8.
        assert!(close(sign_test(8, 0), 2.0 / 256.0));
        assert!(close(sign_test(1, 7), 18.0 / 256.0));
    }

    /// A run asked for the throughput figures may hold them and the peak
    /// RSS; a figure of the connection runs in it is an error.
    #[test]
    fn a_run_asked_for_some_figures_holds_no_others() {
        let throughput = [Figures::Throughput];
        let row = |metric: &str| json!({"placement": "cross-node", "path": "mesh-ebpf", "metric": metric, "median": 1.0});
        let ok = json!({"results": [row("throughput_1_gbps"), row("agent_peak_rss_mib")]});
        only_figures(&ok, &throughput).unwrap();
        let not = json!({"results": [row("throughput_8_gbps"), row("connections_per_s")]});
        let err = only_figures(&not, &throughput).unwrap_err().to_string();
        assert!(
            err.contains("connections_per_s (connections figures)"),
            "{err}"
        );
        // Asked for nothing in particular: anything goes.
        only_figures(&not, &[]).unwrap();
    }
}
