//! `mesh-agent`: the node agent and its inspection commands.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use tracing::info;

mod admin;
mod capture;
mod config;
mod identity;
mod inpod;
mod metrics;
mod proxy;
mod state;

use config::{Cli, Command, LogFormat, NodeArgs, PodsCommand, UninstallArgs};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Before any thread exists, so that every thread starts in it.
    inpod::netns::init_home();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Node(args) => rt.block_on(node(args)),
        Command::Uninstall(args) => uninstall(&args),
        Command::Pods { admin, command } => rt.block_on(pods(admin, command)),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let cgroup = args
        .cgroup
        .clone()
        .unwrap_or_else(capture::fs::default_cgroup_root);
    info!(
        bpf_dir = %args.bpf_dir.display(),
        cgroup = %cgroup.display(),
        state_dir = %args.state_dir.display(),
        admin = %args.admin_addr,
        metrics = %args.metrics_addr,
        ready = %args.ready_addr,
        exclude_outbound_ports = ?args.exclude_outbound_ports,
        exclude_inbound_ports = ?args.exclude_inbound_ports,
        "starting node agent"
    );
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    // Bind first: a port clash is reported before the kernel is touched.
    let admin_l = admin::bind(args.admin_addr).await.context("--admin-addr")?;
    let metrics_l = admin::bind(args.metrics_addr)
        .await
        .context("--metrics-addr")?;
    let ready_l = admin::bind(args.ready_addr).await.context("--ready-addr")?;

    let excluded =
        capture::ExcludedPorts::new(&args.exclude_outbound_ports, &args.exclude_inbound_ports);
    let capture = Arc::new(capture::Capture::load(&args.bpf_dir, &cgroup, &excluded)?);
    let metrics = Arc::new(metrics::Metrics::default());
    let registry = metrics::registry(&metrics, capture.clone());
    let pods = Arc::new(inpod::pods::Pods::new(
        capture.clone(),
        metrics,
        &args.state_dir,
    ));
    {
        let pods = pods.clone();
        tokio::task::spawn_blocking(move || pods.restore()).await?;
    }
    let admin = Arc::new(admin::Admin {
        pods,
        capture,
        registry,
    });
    tokio::spawn(admin::serve(admin_l, admin.clone(), admin::Surface::Admin));
    tokio::spawn(admin::serve(
        metrics_l,
        admin.clone(),
        admin::Surface::Metrics,
    ));
    tokio::spawn(admin::serve(ready_l, admin.clone(), admin::Surface::Ready));
    info!("node agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Pins stay: enrolled pods fail closed until the next agent takes over.
    info!("stopping; capture stays attached (use `mesh-agent uninstall` to remove it)");
    Ok(())
}

fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    capture::unpin_all(&args.bpf_dir)?;
    let state = args.state_dir.join("pods.json");
    match std::fs::remove_file(&state) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| state.display().to_string()),
    }
    info!(bpf_dir = %args.bpf_dir.display(), "capture removed");
    Ok(())
}

async fn pods(admin: SocketAddr, command: PodsCommand) -> anyhow::Result<()> {
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
    let (status, text) = admin_request(admin, method, path, body).await?;
    if status.is_success() {
        print!("{text}");
        return Ok(());
    }
    eprint!("{text}");
    eprintln!("error: the agent answered {status}");
    std::process::exit(1);
}

async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(hyper::StatusCode, String)> {
    use http_body_util::{BodyExt as _, Full};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's admin server at {addr} (is `mesh-agent node` running?)"
            )
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(hyper::body::Bytes::from(bytes)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    Ok((status, text))
}
