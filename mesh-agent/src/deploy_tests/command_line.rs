//! The command line each mesh-agent container runs with: its `args` and
//! `MESH_*` variables, parsed by the binary's own clap command.

use std::{collections::BTreeSet, ffi::OsStr};

use clap::{CommandFactory as _, FromArgMatches as _};
use k8s_openapi::api::core::v1::Container;

use super::{Manifests, Problems, Workload};
use crate::config::{CaArgs, Cli, Command, NodeArgs};

/// `MESH_*` variables the binary reads outside clap (the log filter, main.rs).
const NON_FLAG_ENV: &[&str] = &["MESH_LOG"];

struct MeshContainer<'a> {
    workload: Workload<'a>,
    container: &'a Container,
    cli: Result<Cli, String>,
}

impl Manifests {
    /// Every container that runs mesh-agent, with the command line its
    /// args and environment make.
    fn mesh_containers(&self) -> Vec<MeshContainer<'_>> {
        let mut out = Vec::new();
        for w in self.workloads() {
            for c in w.containers() {
                if let Some(argv) = mesh_argv(c) {
                    let cli = env_flags(c, &w.namespace).and_then(|env| parse_cli(argv, env));
                    out.push(MeshContainer {
                        workload: w.clone(),
                        container: c,
                        cli,
                    });
                }
            }
        }
        out
    }

    /// The one container running `mesh-agent SUBCOMMAND`, and how clap
    /// reads its command line.
    fn running(&self, subcommand: &str) -> (Workload<'_>, &Container, Cli) {
        let mut found = (self.mesh_containers().into_iter()).filter(|m| {
            mesh_argv(m.container)
                .unwrap_or_default()
                .first()
                .map(String::as_str)
                == Some(subcommand)
        });
        let m = found
            .next()
            .unwrap_or_else(|| panic!("no container in deploy/ runs `mesh-agent {subcommand}`"));
        assert!(
            found.next().is_none(),
            "more than one container runs `mesh-agent {subcommand}`"
        );
        let cli = m.cli.unwrap_or_else(|e| {
            panic!(
                "{} container {} runs `mesh-agent {subcommand}`, but: {e}",
                m.workload.name, m.container.name
            )
        });
        (m.workload, m.container, cli)
    }

    pub(super) fn agent(&self) -> (Workload<'_>, &Container, NodeArgs) {
        let (w, c, cli) = self.running("node");
        let Command::Node(args) = cli.command else {
            unreachable!("`node` is Command::Node")
        };
        (w, c, *args)
    }

    pub(super) fn ca(&self) -> (Workload<'_>, &Container, CaArgs) {
        let (w, c, cli) = self.running("ca");
        let Command::Ca(args) = cli.command else {
            unreachable!("`ca` is Command::Ca")
        };
        (w, c, *args)
    }
}

/// The arguments after the program name, if `c` runs mesh-agent: an image
/// named mesh-agent with its entrypoint, or a command naming the binary.
pub(super) fn mesh_argv(c: &Container) -> Option<Vec<String>> {
    let is_mesh_agent = |s: &str| s.rsplit('/').next() == Some("mesh-agent");
    let mut argv = match c.command.as_deref() {
        None => {
            let image = c.image.as_deref()?;
            let repo = image.split(['@', ':']).next().unwrap_or(image);
            if !is_mesh_agent(repo) {
                return None;
            }
            Vec::new()
        }
        Some([bin, rest @ ..]) if is_mesh_agent(bin) => rest.to_vec(),
        Some(_) => return None,
    };
    argv.extend(c.args.iter().flatten().cloned());
    Some(argv)
}

/// The `MESH_*` variables of `c` as the flags they stand for, each checked
/// to be one the container's subcommand reads.
pub(super) fn env_flags(c: &Container, namespace: &str) -> Result<Vec<(String, String)>, String> {
    let cli = Cli::command();
    let argv = mesh_argv(c).unwrap_or_default();
    let sub_name = argv.first().ok_or("no subcommand in args")?;
    let sub = cli
        .find_subcommand(sub_name)
        .ok_or_else(|| format!("`{sub_name}` is not a mesh-agent subcommand"))?;
    let global = cli.get_arguments().filter(|a| a.is_global_set());
    let args: Vec<_> = sub.get_arguments().chain(global).collect();
    let mut seen = BTreeSet::new();
    let mut flags = Vec::new();
    for e in c.env.iter().flatten() {
        if !seen.insert(&e.name) {
            return Err(format!("{} is set twice", e.name));
        }
        if !e.name.starts_with("MESH_") || NON_FLAG_ENV.contains(&e.name.as_str()) {
            continue;
        }
        let arg = (args.iter())
            .find(|a| a.get_env() == Some(OsStr::new(&e.name)))
            .ok_or_else(|| {
                format!(
                    "sets {}, which no flag of `mesh-agent {sub_name}` reads",
                    e.name
                )
            })?;
        let long = arg
            .get_long()
            .ok_or_else(|| format!("{} belongs to a flag without a long name", e.name))?;
        let value = match (
            &e.value,
            e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()),
        ) {
            (Some(v), None) => v.clone(),
            (None, Some(field)) => match field.field_path.as_str() {
                "spec.nodeName" => "node-a".to_owned(),
                "metadata.name" => "pod-a".to_owned(),
                "metadata.namespace" => namespace.to_owned(),
                "status.podIP" | "status.hostIP" => "10.0.0.1".to_owned(),
                other => return Err(format!("{}: no sample value for fieldRef {other}", e.name)),
            },
            _ => {
                return Err(format!(
                    "{}: only a value or a fieldRef is understood here",
                    e.name
                ));
            }
        };
        if arg.get_action().takes_values() {
            flags.push((e.name.clone(), format!("--{long}={value}")));
        } else {
            match value.as_str() {
                "true" => flags.push((e.name.clone(), format!("--{long}"))),
                "false" => {}
                other => {
                    return Err(format!(
                        "{} is a switch: write \"true\" or \"false\", not {other:?}",
                        e.name
                    ));
                }
            }
        }
    }
    Ok(flags)
}

/// Parses like the binary, but without reading this process's environment.
pub(super) fn parse_cli(
    argv: Vec<String>,
    env_flags: Vec<(String, String)>,
) -> Result<Cli, String> {
    let no_env = |a: clap::Arg| a.env(None);
    let cmd = Cli::command()
        .mut_args(no_env)
        .mut_subcommands(|s| s.mut_args(no_env));
    let flags = env_flags.iter().map(|(_, flag)| flag.clone());
    let line = std::iter::once("mesh-agent".to_owned())
        .chain(argv)
        .chain(flags);
    let matches = cmd.try_get_matches_from(line).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or_default().to_owned();
        let env: Vec<String> = env_flags
            .iter()
            .map(|(var, flag)| format!("{var} as {flag}"))
            .collect();
        format!("{first} (environment read as: {})", env.join(", "))
    })?;
    Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
}

#[test]
fn mesh_containers_set_only_what_their_subcommand_reads() {
    let m = Manifests::load();
    let mut p = Problems::default();
    let mesh = m.mesh_containers();
    p.check(!mesh.is_empty(), || {
        "no container runs mesh-agent".to_owned()
    });
    for mc in &mesh {
        if let Err(e) = &mc.cli {
            p.fail(format!(
                "{} container {}: {e}",
                mc.workload.name, mc.container.name
            ));
        }
    }
    // Other containers (init steps) get no MESH_* variable by mistake.
    for w in m.workloads() {
        for c in w.containers().filter(|c| mesh_argv(c).is_none()) {
            let stray = (c.env.iter().flatten()).any(|e| e.name.starts_with("MESH_"));
            p.check(!stray, || {
                format!(
                    "{} container {} does not run mesh-agent but sets MESH_* variables",
                    w.name, c.name
                )
            });
        }
    }
    p.assert_none("mesh-agent would not start with these arguments and variables");
}
