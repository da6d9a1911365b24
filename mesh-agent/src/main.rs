//! `mesh-agent`: the node agent and its inspection commands.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use tracing::{info, warn};

mod admin;
mod capture;
mod cluster;
mod config;
#[cfg(test)]
mod deploy_tests;
mod drain;
#[cfg(test)]
mod fuzz;
mod identity;
mod inpod;
mod limit;
mod log_out;
mod malloc;
mod metrics;
mod proxy;
mod shards;
mod state;
mod sync;
mod waypoint;

use config::{Cli, Command, LogFormat, NodeArgs, PodsCommand, RuntimeKind, UninstallArgs};

fn main() -> anyhow::Result<()> {
    malloc::tune();
    let cli = Cli::parse();
    // kube's HTTPS client takes the process's provider; ring is the only one
    // built in. An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let log_filter = init_logging(cli.log_format);
    // Before any listener: every held connection costs descriptors.
    limit::raise_nofile_logged();
    // Before any thread exists, so that every thread starts in it.
    inpod::netns::init_home();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    match &cli.command {
        Command::Waypoint(args) | Command::Gateway(args) => {
            rt.worker_threads(args.worker_threads.max(1));
        }
        Command::Node(args) => match args.runtime {
            RuntimeKind::Sharded => {
                let n = args.worker_threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
                });
                shards::install(shards::Shards::start(n).context("starting the shard threads")?);
                // Listeners, the control plane and the admin servers.
                rt.worker_threads(1);
            }
            RuntimeKind::Shared => {
                if let Some(n) = args.worker_threads {
                    rt.worker_threads(n.max(1));
                }
            }
        },
        _ => {}
    }
    let rt = rt.enable_all().on_thread_park(log_out::parked).build()?;
    let done = match cli.command {
        Command::Node(args) => rt.block_on(node(*args, log_filter)),
        Command::Ca(args) => rt.block_on(identity::ca_server::run(*args)),
        Command::Waypoint(args) => rt.block_on(waypoint::run(*args, waypoint::Mode::Waypoint)),
        Command::Gateway(args) => rt.block_on(waypoint::run(*args, waypoint::Mode::Ingress)),
        Command::Uninstall(args) => uninstall(&args),
        Command::Pods { state_dir, command } => rt.block_on(pods(&state_dir, command)),
    };
    log_out::flush_all();
    done
}

/// Sets up logging; the returned handle changes the filter at run time
/// (the admin server's `/logging`).
fn init_logging(format: LogFormat) -> admin::LogFilter {
    use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt as _, reload};
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    log_out::flush_on_panic();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(log_out::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Plain => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let subscriber = tracing_subscriber::registry().with(filter).with(fmt);
    tracing::subscriber::set_global_default(subscriber).expect("logging is set up once");
    handle
}

async fn node(args: NodeArgs, log_filter: admin::LogFilter) -> anyhow::Result<()> {
    let cgroup = args
        .cgroup
        .clone()
        .unwrap_or_else(capture::fs::default_cgroup_root);
    info!(
        capture = ?args.capture,
        bpf_dir = %args.bpf_dir.display(),
        cgroup = %cgroup.display(),
        state_dir = %args.state_dir.display(),
        admin = %args.admin_addr,
        metrics = %args.metrics_addr,
        ready = %args.ready_addr,
        exclude_outbound_ports = ?args.exclude_outbound_ports,
        exclude_inbound_ports = ?args.exclude_inbound_ports,
        config = ?args.mesh.config,
        trust_domain = %args.mesh.trust_domain,
        cluster_id = %args.mesh.cluster_id,
        root_namespace = %args.mesh.root_namespace,
        cert_ttl = ?args.mesh.cert_ttl,
        same_node_plaintext = args.same_node_plaintext,
        runtime = ?args.runtime,
        "starting node agent"
    );
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    // Bind first: a port clash is reported before the kernel is touched.
    let admin_l = admin::bind(args.admin_addr).await.context("--admin-addr")?;
    let control_l =
        admin::bind_control(&admin::control_socket(&args.state_dir)).context("--state-dir")?;
    let metrics_l = admin::bind(args.metrics_addr)
        .await
        .context("--metrics-addr")?;
    let ready_l = admin::bind(args.ready_addr).await.context("--ready-addr")?;

    check_capture_mode(&args.state_dir, args.capture)?;
    // An agent still draining beside this one (an upgrade) keeps setting up
    // connections: what it listed for them must stay.
    let previous_alive = previous_agent_alive(&args.state_dir);
    if previous_alive {
        info!("an earlier agent is still running (draining): taking over beside it");
    }
    write_pid_file(&args.state_dir)?;
    // The configuration is read (and waits to settle) while the kernel side
    // loads: the agent is ready that much sooner after a restart.
    let metrics = Arc::new(metrics::Metrics::new(&args.mesh.cluster_id));
    let client = if args.mesh.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("--kubernetes: no Kubernetes API configuration (in-cluster or KUBECONFIG)")?;
        Some(client)
    } else {
        None
    };
    let (store, references) = start_store(&args.mesh, metrics.clone(), client.clone(), None);
    let excluded =
        capture::ExcludedPorts::new(&args.exclude_outbound_ports, &args.exclude_inbound_ports);
    let object = match &args.ebpf_object {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("--ebpf-object {}", path.display()))?)
        }
        None => None,
    };
    let capture = match args.capture {
        // In a cluster the agent runs in a container: bpffs must be the
        // node's (the DaemonSet's init container mounts it), never its own.
        capture::Mode::Ebpf => capture::Capture::Ebpf(Box::new(
            capture::Programs::load(
                &args.bpf_dir,
                &cgroup,
                &excluded,
                !args.mesh.kubernetes,
                object.as_deref(),
                !previous_alive,
            )
                .with_context(|| {
                    if args.mesh.kubernetes {
                        "loading capture (in a cluster, the node must have bpffs mounted at /sys/fs/bpf)"
                    } else {
                        "loading capture"
                    }
                })?,
        )),
        capture::Mode::Iptables => capture::Capture::Iptables(
            capture::Iptables::new(&excluded).context("--capture iptables")?,
        ),
    };
    let mode = capture.mode();
    let capture = Arc::new(capture);
    let registry = metrics::registry(&metrics, capture.clone());
    let certs = identity::CertManager::new(ca_config(&args.mesh, &args.state_dir))?;
    certs.spawn_rotation();
    let node_name = match &args.node_name {
        Some(name) => name.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (or give --node-name)")?
            .trim()
            .to_owned(),
    };
    info!(node = %node_name, "this node");
    let configured = args.mesh.config.is_some() || args.mesh.kubernetes;
    let shared = Arc::new(proxy::Shared {
        capture: capture.clone(),
        metrics,
        certs,
        store: store.clone(),
        configured,
        balancer: proxy::Balancer::default(),
        cluster_id: args.mesh.cluster_id.clone(),
        same_node_plaintext: args.same_node_plaintext,
        local_pods: proxy::LocalPods::default(),
    });
    if args.same_node_plaintext {
        warn!(
            "--same-node-plaintext is on: connections between two pods of this node skip mutual TLS \
             (identity, policy and metrics stay; the bytes never leave the node but are not \
             encrypted between the pods; not under PeerAuthentication STRICT)"
        );
    }
    let probes = if args.no_probe_snat {
        // What an earlier agent left would still rewrite probes.
        if let Err(e) = capture::probes::remove() {
            warn!(error = %e, "removing the node's probe SNAT");
        }
        None
    } else {
        Some(capture::probes::ProbeSnat::start().context("starting the probe SNAT thread")?)
    };
    let pods = Arc::new(inpod::pods::Pods::new(
        shared.clone(),
        &args.state_dir,
        probes,
    ));
    {
        let pods = pods.clone();
        tokio::task::spawn_blocking(move || pods.restore())
            .await?
            .context("restoring the enrolled pods")?;
    }
    let mut enroller_task = None;
    if configured {
        let finder = match client {
            Some(_) => inpod::enrol::NetnsFinder::Proc(args.proc_root.clone()),
            None => inpod::enrol::NetnsFinder::Annotation,
        };
        let enroller = inpod::enrol::Enroller {
            pods: pods.clone(),
            node: node_name.clone(),
            finder,
            certs: shared.certs.clone(),
            redirection: client.clone().map(|client| {
                cluster::redirection::Redirection::new(client, shared.metrics.clone())
            }),
        };
        enroller_task = Some(inpod::enrol::spawn(enroller, store.clone()));
    }
    if let Some(client) = client {
        cluster::events::spawn(client, node_name.clone(), references, store.clone());
    }
    let admin = Arc::new(admin::Admin {
        pods,
        capture,
        registry,
        shared,
        log_filter,
    });
    tokio::spawn(admin::serve(admin_l, admin.clone(), admin::Surface::Admin));
    tokio::spawn(admin::serve_control(control_l, admin.clone()));
    tokio::spawn(admin::serve(
        metrics_l,
        admin.clone(),
        admin::Surface::Metrics,
    ));
    tokio::spawn(admin::serve(ready_l, admin.clone(), admin::Surface::Ready));
    tokio::spawn(malloc::give_back());
    info!("node agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Pins and rules stay: enrolled pods fail closed until the next agent
    // takes over, or go to the one already running beside this one.
    info!(capture = ?mode, drain_period = ?args.drain_period, "draining: new connections go to the next agent (refused if there is none), live ones may finish; capture stays in place (use `mesh-agent uninstall` to remove it)");
    drain::start();
    if let Some(task) = enroller_task {
        task.abort();
    }
    admin.pods.stop_listening();
    let deadline = tokio::time::Instant::now() + args.drain_period;
    loop {
        let live = admin.shared.metrics.open_sockets();
        if live == 0 {
            info!("drained: no connection left");
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            () = tokio::time::sleep_until(deadline) => {
                warn!(live, "drain period over: closing what is left");
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    Ok(())
}

/// Whether the agent named in the state directory's `agent.pid` still runs
/// (another process of this binary): an upgrade started this one beside it.
fn previous_agent_alive(state_dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(state_dir.join("agent.pid")) else {
        return false;
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    let ours = std::fs::read_link("/proc/self/exe").ok();
    let theirs = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    // The same binary path (an upgrade replaces the file, so the old one
    // reads `... (deleted)`): compare names, not inodes.
    let name = |p: &Option<std::path::PathBuf>| {
        p.as_ref().and_then(|p| p.file_name()).map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned()
        })
    };
    theirs.is_some() && name(&ours) == name(&theirs)
}

fn write_pid_file(state_dir: &Path) -> anyhow::Result<()> {
    let file = state_dir.join("agent.pid");
    std::fs::write(&file, format!("{}\n", std::process::id()))
        .with_context(|| file.display().to_string())
}

/// Pods captured one way cannot be taken back the other way (the old
/// rules or programs would still steer their traffic): the mode is kept in
/// the state directory and a change needs `mesh-agent uninstall` first.
fn check_capture_mode(state_dir: &Path, mode: capture::Mode) -> anyhow::Result<()> {
    let file = state_dir.join("capture-mode");
    let name = mode.name();
    let prev = match std::fs::read_to_string(&file) {
        Ok(prev) => prev.trim().to_owned(),
        // Agents before the file existed had only eBPF capture.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => capture::Mode::Ebpf.name().into(),
        Err(e) => return Err(e).with_context(|| file.display().to_string()),
    };
    if prev != name && !inpod::pods::saved_netns(state_dir).is_empty() {
        anyhow::bail!(
            "--capture {name}: the enrolled pods in {} were captured with `{prev}`; \
             run `mesh-agent uninstall` (same --state-dir) before changing the capture mode",
            state_dir.display(),
        );
    }
    std::fs::write(&file, name).with_context(|| file.display().to_string())
}

fn ca_config(m: &config::MeshArgs, state_dir: &Path) -> identity::CaConfig {
    let source = match (&m.ca_address, &m.ca_root, &m.ca_cert, &m.ca_key) {
        // clap makes --ca-address need --ca-root.
        (Some(address), Some(root), _, _) => identity::CaSource::Remote {
            address: address.clone(),
            root: root.clone(),
            token: m.ca_token.clone(),
        },
        (_, _, Some(cert), Some(key)) => identity::CaSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => identity::CaSource::Generate {
            dir: m.ca_dir.clone().unwrap_or_else(|| state_dir.join("ca")),
        },
    };
    identity::CaConfig {
        trust_domain: m.trust_domain.clone(),
        cert_ttl: m.cert_ttl,
        source,
        trust_bundle: m.trust_bundle.clone(),
    }
}

/// Starts the configuration source (local files or the Kubernetes API) and
/// counts each configuration warning when it appears.
/// The configuration source and its snapshots; `secrets` names the one
/// namespace whose Secrets are read from the API (an ingress gateway's).
fn start_store(
    m: &config::MeshArgs,
    metrics: Arc<metrics::Metrics>,
    client: Option<kube::Client>,
    secrets: Option<String>,
) -> (
    tokio::sync::watch::Receiver<Arc<state::Store>>,
    cluster::source::References,
) {
    let opts = state::StoreOptions {
        trust_domain: m.trust_domain.clone(),
        root_namespace: m.root_namespace.clone(),
        redirection_annotation: client.is_some(),
        // From the API only the gateway reads Secrets (its namespace's).
        skip_ingress_secrets: client.is_some() && secrets.is_none(),
        endpoint_slices_only: client.is_some(),
        outbound_traffic_policy: m.outbound_traffic_policy,
    };
    let mut references = cluster::source::References::default();
    let rx = match (&m.config, client) {
        (_, Some(client)) => {
            let mut source = cluster::KubeSource::new(client);
            if let Some(ns) = secrets {
                source = source.with_secrets(ns);
            }
            references = source.references();
            state::spawn_source(Box::new(source), opts).0
        }
        (Some(path), None) => {
            let source = Box::new(state::LocalFiles::new(path.clone(), m.config_poll));
            state::spawn_source(source, opts).0
        }
        (None, None) => tokio::sync::watch::channel(Arc::new(state::Store::empty(&opts))).1,
    };
    let mut watch = rx.clone();
    tokio::spawn(async move {
        // Counts each warning once, when it appears, and the objects held.
        let mut new = state::NewWarnings::default();
        loop {
            let snapshot = watch.borrow_and_update().clone();
            for w in new.of(&snapshot) {
                metrics
                    .config_warnings
                    .get_or_create(&metrics::KindLabels { kind: w.kind })
                    .inc();
            }
            for (kind, n) in snapshot.counts() {
                metrics
                    .config_objects
                    .get_or_create(&metrics::KindLabels { kind })
                    .set(n as i64);
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    });
    (rx, references)
}

fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    capture::unpin_all(&args.bpf_dir)?;
    // iptables capture lives in the pods' namespaces: remove it from every
    // pod the agent had enrolled whose namespace is still there.
    for (path, cookie) in inpod::pods::saved_netns(&args.state_dir) {
        // Only the namespace that was enrolled: the path may name another
        // one now (a reused PID).
        let Ok(netns) = inpod::netns::Netns::open(&path) else {
            continue;
        };
        if netns.cookie() != cookie {
            continue;
        }
        capture::remove_rules(&netns)
            .with_context(|| format!("removing iptables capture from {}", path.display()))?;
    }
    capture::probes::remove().context("removing the node's probe SNAT")?;
    for state in ["pods.json", "capture-mode"].map(|f| args.state_dir.join(f)) {
        match std::fs::remove_file(&state) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| state.display().to_string()),
        }
    }
    info!(bpf_dir = %args.bpf_dir.display(), "capture removed");
    Ok(())
}

async fn pods(state_dir: &Path, command: PodsCommand) -> anyhow::Result<()> {
    let (method, path, body) = match command {
        PodsCommand::List => ("GET", "/pods", None),
        PodsCommand::Capture => ("GET", "/capture", None),
        PodsCommand::Enroll { name, netns } => (
            "POST",
            "/pods/enroll",
            Some(serde_json::json!({ "name": name, "netns": netns })),
        ),
        PodsCommand::Unenroll { name } => (
            "POST",
            "/pods/unenroll",
            Some(serde_json::json!({ "name": name })),
        ),
    };
    let socket = admin::control_socket(state_dir);
    let (status, text) = admin_request(&socket, method, path, body).await?;
    if status.is_success() {
        print!("{text}");
        return Ok(());
    }
    log_out::flush_all();
    eprint!("{text}");
    eprintln!("error: the agent answered {status}");
    std::process::exit(1);
}

/// One request on the agent's control socket.
async fn admin_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(hyper::StatusCode, String)> {
    use http_body_util::{BodyExt as _, Full};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's control socket {} (is `mesh-agent node` running with this --state-dir, and are you root?)",
                socket.display()
            )
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(hyper::body::Bytes::from(bytes)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    Ok((status, text))
}
