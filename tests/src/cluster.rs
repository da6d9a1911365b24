//! The testbed as a Kubernetes cluster: the API stand-in (crate
//! `fake-kube-api`) and a `mesh-agent ca` process, both on the fabric where
//! every node's agent reaches them, and node agents run with
//! `--kubernetes` (a KUBECONFIG naming the stand-in), `--ca-address` and a
//! token the stand-in's TokenReview knows as the agents' ServiceAccount on
//! that node. Objects are Kubernetes YAML, as the local configuration
//! takes them, stored through the stand-in.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, ensure};
use fake_kube_api::{FakeApi, MESH_AGENT_KINDS, TokenUser};
use serde_json::Value;

use crate::{Testbed, agent_bin, converge};

/// The fabric's own address on its bridge (nodes are 10.250.0.1..): the
/// API stand-in and the CA listen there.
pub const CLUSTER_ADDR: &str = "10.250.0.250";
/// The CA's port, as `mesh-agent ca` serves it by default.
const CA_PORT: u16 = 15012;
/// The node agents' ServiceAccount, the only caller the CA accepts.
const AGENT_SA: &str = "system:serviceaccount:mesh-system:mesh-agent";
/// The extra field of a bound token naming the node it was issued on.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

pub struct Cluster {
    /// The stand-in; declared before the runtime that serves it, so it is
    /// dropped first.
    pub api: FakeApi,
    runtime: tokio::runtime::Runtime,
    ca: Child,
    kubeconfig: PathBuf,
    root: PathBuf,
    dir: PathBuf,
    pub ca_log: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.ca.kill();
        let _ = self.ca.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- log of {} ---\n{}",
                self.ca_log.display(),
                fs::read_to_string(&self.ca_log).unwrap_or_default()
            );
        }
    }
}

impl Cluster {
    /// Creates or replaces the objects of Kubernetes YAML documents (one
    /// or more, `---` between them) in the API.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<Vec<Value>> {
        let _in_runtime = self.runtime.enter();
        let mut stored = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let obj: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("a YAML document in\n{yaml}"))?;
            if !obj.is_null() {
                stored.push(self.api.apply(obj));
            }
        }
        Ok(stored)
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let _in_runtime = self.runtime.enter();
        self.api.delete(api_version, kind, Some(namespace), name)
    }

    /// The object of a kind named `namespace/name`, as the API has it now.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.api
            .objects(api_version, kind)
            .into_iter()
            .find(|o| o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == name)
    }

    /// The cluster CA's root certificate, which every agent trusts.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Flags and environment for node `node`'s agent: the API through
    /// KUBECONFIG, certificates from the CA with a token for that node.
    fn agent_args(&self, node: usize) -> anyhow::Result<Vec<String>> {
        let token = format!("token-node{node}");
        self.api.add_token(
            &token,
            TokenUser {
                username: AGENT_SA.into(),
                uid: format!("uid-{token}"),
                groups: vec!["system:serviceaccounts".into()],
                extra: [(NODE_NAME_EXTRA.to_owned(), vec![format!("node{node}")])].into(),
                audiences: vec!["mesh-ca".into()],
            },
        );
        let token_file = self.dir.join(format!("{token}.txt"));
        fs::write(&token_file, format!("{token}\n"))?;
        Ok(vec![
            "--kubernetes".into(),
            "--ca-address".into(),
            format!("https://{CLUSTER_ADDR}:{CA_PORT}"),
            "--ca-root".into(),
            self.root.display().to_string(),
            "--ca-token".into(),
            token_file.display().to_string(),
        ])
    }
}

impl Testbed {
    /// Serves the API stand-in and starts `mesh-agent ca` on the fabric;
    /// returns once the CA published its root (through the stand-in) and
    /// accepts connections.
    pub fn start_cluster(&mut self) -> anyhow::Result<()> {
        ensure!(self.cluster.is_none(), "the testbed's cluster runs already");
        crate::ip(&[
            "-n",
            &self.fabric,
            "addr",
            "add",
            &format!("{CLUSTER_ADDR}/24"),
            "dev",
            "fab0",
        ])?;
        let api_listener = self.in_fabric(|| {
            let l = std::net::TcpListener::bind((CLUSTER_ADDR, 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let api = {
            let _in_runtime = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(api_listener)?;
            FakeApi::serve(listener, MESH_AGENT_KINDS)
        };
        let dir = self.workdir.join("cluster");
        fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
                 users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: agent\n\
                 current-context: stand-in\n",
                api.url()
            ),
        )?;
        let ca_dir = dir.join("ca");
        let ca_log = dir.join("ca.log");
        let out = fs::File::create(&ca_log)?;
        let ca = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.fabric))
            .arg("--")
            .arg(agent_bin())
            .args(["ca", "--listen", &format!("{CLUSTER_ADDR}:{CA_PORT}")])
            .args(["--ready-addr", &format!("{CLUSTER_ADDR}:15021")])
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--server-names", CLUSTER_ADDR])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting mesh-agent ca")?;
        let cluster = Cluster {
            api,
            runtime,
            ca,
            kubeconfig,
            root: ca_dir.join("root-cert.pem"),
            dir,
            ca_log,
        };
        let published = || {
            let cm = cluster.get("v1", "ConfigMap", "mesh-system", "mesh-ca-root");
            cm.and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_owned))
        };
        let ca_at: SocketAddr = format!("{CLUSTER_ADDR}:{CA_PORT}").parse()?;
        let up = converge(
            "mesh-agent ca published its root and listens",
            Duration::from_secs(20),
            || {
                Ok(published().is_some()
                    && self
                        .in_fabric(|| {
                            Ok(TcpStream::connect_timeout(&ca_at, Duration::from_secs(1))?)
                        })
                        .is_ok())
            },
        );
        let ca_log = fs::read_to_string(&cluster.ca_log).unwrap_or_default();
        up.with_context(|| format!("log of mesh-agent ca:\n{ca_log}"))?;
        let on_disk = fs::read_to_string(&cluster.root)?;
        ensure!(
            published().as_deref() == Some(on_disk.as_str()),
            "the published root is not the CA's own"
        );
        self.cluster = Some(cluster);
        Ok(())
    }

    /// The cluster [`Testbed::start_cluster`] started.
    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("start_cluster first")
    }

    /// Starts node `node`'s agent against the cluster (`--kubernetes`,
    /// `--ca-address`) with `extra` flags, and waits until it is ready.
    pub fn start_cluster_agent(&mut self, node: usize, extra: &[&str]) -> anyhow::Result<()> {
        let cluster = self.cluster();
        let mut args = cluster.agent_args(node)?;
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let env = [(
            "KUBECONFIG".to_owned(),
            cluster.kubeconfig.display().to_string(),
        )];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.launch_agent_with_env(node, &args, &env, true)
    }

    /// Runs `f` on a thread inside the fabric namespace.
    fn in_fabric<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let ns = fs::File::open(format!("/run/netns/{}", self.fabric))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                f()
            })
            .join()
            .expect("fabric thread")
        })
    }
}
