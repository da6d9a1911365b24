//! The paths a benchmark measures between the same client and server pods.
//! Each is one `Path` value: how to set it up on a testbed, and where the
//! client then sends its HTTP and iperf3 traffic. Adding a path is one more
//! variant here.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Pod, Testbed,
    mesh::{namespace_yaml, pod_yaml, with_netns},
    metrics::series_sum,
    waypoint::gateway_yaml,
};

/// The server pod's ports: the HTTP server and the iperf3 server.
pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// The tunnel's ports: on the server pod (TLS) and on the client pod's
/// loopback (plaintext in).
const TUNNEL_HTTP: u16 = 9443;
const TUNNEL_IPERF: u16 = 9444;
const LOCAL_HTTP: u16 = 9080;
const LOCAL_IPERF: u16 = 9081;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Path {
    /// No mesh: the machine's own limit.
    Direct,
    /// eBPF capture and HBONE mTLS between the agents.
    MeshEbpf,
    /// mesh-ebpf with `--same-node-plaintext`: between two pods of one
    /// node, the agent's in-process shortcut (identity, policy and
    /// metrics, no TLS). Measured in the same-node placement only.
    MeshEbpfLocal,
    /// The same agents with iptables REDIRECT capture inside the pods.
    MeshIptables,
    /// stunnel4 at both ends, mutual TLS 1.3: what a user would otherwise
    /// reach for.
    TlsTunnel,
    /// eBPF capture, and the server's Service bound to a waypoint in a pod
    /// of its own: client -> agent -> waypoint -> agent -> server.
    MeshWaypoint,
    /// nginx as a reverse proxy (keep-alive upstream) in a pod between
    /// client and server, plain TCP: the floor of any L7 hop here. Only
    /// HTTP is measured through it.
    L7Proxy,
}

pub const ALL: &[Path] = &[
    Path::Direct,
    Path::MeshEbpf,
    Path::MeshEbpfLocal,
    Path::MeshIptables,
    Path::TlsTunnel,
    Path::MeshWaypoint,
    Path::L7Proxy,
];

/// The waypoint path's Service address.
const WAYPOINT_VIP: [u8; 4] = [10, 96, 0, 80];
/// The L7 proxy's port.
const PROXY_PORT: u16 = 8088;

/// Where the client sends its traffic once a path is up.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub http: SocketAddr,
    /// None where the path carries only HTTP.
    pub iperf: Option<SocketAddr>,
    /// The process in the middle that is not an agent (the waypoint, or
    /// nginx), whose CPU and memory are reported.
    pub middle: Option<u32>,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::MeshEbpf => "mesh-ebpf",
            Path::MeshEbpfLocal => "mesh-ebpf-local",
            Path::MeshIptables => "mesh-iptables",
            Path::TlsTunnel => "tls-tunnel",
            Path::MeshWaypoint => "mesh-waypoint",
            Path::L7Proxy => "l7-proxy",
        }
    }

    /// Node agents run on this path.
    pub fn is_mesh(self) -> bool {
        matches!(
            self,
            Path::MeshEbpf | Path::MeshEbpfLocal | Path::MeshIptables | Path::MeshWaypoint
        )
    }

    /// Whether the path means anything in `placement`: the same-node
    /// shortcut is never taken between nodes (it would measure mesh-ebpf
    /// again).
    pub fn measured_in(self, placement: super::Placement) -> bool {
        self != Path::MeshEbpfLocal || placement == super::Placement::SameNode
    }

    /// The `connection_security_policy` of the client's connections on a
    /// mesh path.
    pub fn security(self) -> &'static str {
        if self == Path::MeshEbpfLocal {
            "same_node"
        } else {
            "mutual_tls"
        }
    }

    /// The paths this one is compared with, as ratios in the report.
    pub fn baselines(self) -> &'static [&'static str] {
        match self {
            Path::MeshEbpf | Path::MeshIptables => &["direct", "tls-tunnel"],
            Path::MeshEbpfLocal => &["direct", "tls-tunnel", "mesh-ebpf"],
            Path::MeshWaypoint => &["mesh-ebpf", "l7-proxy"],
            _ => &[],
        }
    }

    /// Sets the path up between `client` (node of index `client_node`) and
    /// `server`; returns where the client sends its traffic.
    pub fn start(
        self,
        tb: &mut Testbed,
        client: &Pod,
        client_node: usize,
        server: &Pod,
        server_node: usize,
    ) -> anyhow::Result<Targets> {
        let direct = Targets {
            http: SocketAddr::new(server.ip4, HTTP_PORT),
            iperf: Some(SocketAddr::new(server.ip4, IPERF_PORT)),
            middle: None,
        };
        match self {
            Path::Direct => Ok(direct),
            Path::MeshEbpf => {
                start_mesh(tb, client, client_node, server, server_node, &[])?;
                Ok(direct)
            }
            Path::MeshEbpfLocal => {
                let option = ["--same-node-plaintext"];
                start_mesh(tb, client, client_node, server, server_node, &option)?;
                Ok(direct)
            }
            Path::MeshIptables => {
                let capture = ["--capture", "iptables"];
                start_mesh(tb, client, client_node, server, server_node, &capture)?;
                Ok(direct)
            }
            Path::TlsTunnel => {
                let dir = tb.workdir().join("tunnel");
                make_certs(&dir)?;
                let server_conf = tunnel_conf(&dir, "server", None)?;
                tb.spawn_in(
                    &server.netns,
                    &server.cgroup,
                    FsPath::new(STUNNEL),
                    &[&server_conf],
                )?;
                let client_conf = tunnel_conf(&dir, "client", Some(server.ip4))?;
                tb.spawn_in(
                    &client.netns,
                    &client.cgroup,
                    FsPath::new(STUNNEL),
                    &[&client_conf],
                )?;
                let targets = Targets {
                    http: SocketAddr::from(([127, 0, 0, 1], LOCAL_HTTP)),
                    iperf: Some(SocketAddr::from(([127, 0, 0, 1], LOCAL_IPERF))),
                    middle: None,
                };
                wait_listening(tb, client, targets.http)?;
                wait_listening(tb, server, SocketAddr::new(server.ip4, TUNNEL_HTTP))?;
                Ok(targets)
            }
            Path::MeshWaypoint => start_waypoint(tb, client, client_node, server, server_node),
            Path::L7Proxy => {
                let proxy = tb.add_pod(server_node, "proxy")?;
                let pid = start_nginx(tb, &proxy, server)?;
                Ok(Targets {
                    http: SocketAddr::new(proxy.ip4, PROXY_PORT),
                    iperf: None,
                    middle: Some(pid),
                })
            }
        }
    }
}

/// The mesh with the server's Service bound to a waypoint whose pod is on
/// the server's node; HTTP and iperf3 go to the Service.
fn start_waypoint(
    tb: &mut Testbed,
    client: &Pod,
    client_node: usize,
    server: &Pod,
    server_node: usize,
) -> anyhow::Result<Targets> {
    let wp = tb.add_pod(server_node, "waypoint")?;
    let vip = IpAddr::from(WAYPOINT_VIP);
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: server\n  namespace: bench\n  labels: {{istio.io/use-waypoint: waypoint}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: server}}\n  ports:\n  - {{name: http, port: 80, targetPort: {HTTP_PORT}}}\n  - {{name: tcp-iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}}}\n"
    );
    let extra = [
        pod_yaml(
            &wp,
            server_node,
            "bench",
            "waypoint",
            &[
                ("gateway.networking.k8s.io/gateway-name", "waypoint"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
        gateway_yaml("waypoint", "bench", None),
        service,
    ];
    start_mesh_with(tb, client, client_node, server, server_node, &[], &extra)?;
    let args = tb.mesh_args()?;
    let waypoint = tb.start_waypoint(&wp, "bench", &args)?;
    // Measured only once a request is seen going through it.
    let http = SocketAddr::new(vip, 80);
    let probe = tb.run_in_pod(
        client,
        FsPath::new("/usr/bin/curl"),
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{http}/"),
        ],
    )?;
    ensure!(
        probe == "200",
        "a request through the waypoint answered {probe}"
    );
    // It went through the waypoint, which saw the client's identity.
    let served = series_sum(
        &waypoint.metrics()?,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("response_code", "200"),
            ("source_principal", super::verify::CLIENT_ID),
            ("destination_principal", super::verify::SERVER_ID),
        ],
    )?;
    ensure!(served >= 1.0, "the waypoint did not see the probe request");
    let pid = tb.keep(waypoint);
    Ok(Targets {
        http,
        iperf: Some(SocketAddr::new(vip, IPERF_PORT)),
        middle: Some(pid),
    })
}

/// nginx in `proxy`, forwarding to the server's HTTP port over keep-alive
/// upstream connections; returns its master's process ID.
fn start_nginx(tb: &mut Testbed, proxy: &Pod, server: &Pod) -> anyhow::Result<u32> {
    let dir = tb.workdir().join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    // One process (no master): its CPU and memory are read like the
    // waypoint's, and it serves with one core. Keep-alive connections are
    // not closed after nginx's default 1,000 requests (the load tool's
    // next request on one would fail, counted against the path).
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream server {{ server {}:{HTTP_PORT}; keepalive 64; keepalive_requests 1000000; }}\n\
           server {{\n    listen {PROXY_PORT};\n    location / {{\n      proxy_pass http://server;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        server.ip4
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let conf_path = file.display().to_string();
    let idx = tb.spawn_in(
        &proxy.netns,
        &proxy.cgroup,
        FsPath::new("/usr/sbin/nginx"),
        &["-c", &conf_path, "-p", &dir.display().to_string()],
    )?;
    wait_listening(tb, proxy, SocketAddr::new(proxy.ip4, PROXY_PORT))?;
    Ok(tb.child_pid(idx))
}

/// Agents on the client's and the server's nodes (with `extra` arguments),
/// both pods in a namespace labelled for the mesh; returns once both pods
/// are enrolled.
fn start_mesh(
    tb: &mut Testbed,
    client: &Pod,
    client_node: usize,
    server: &Pod,
    server_node: usize,
    extra: &[&str],
) -> anyhow::Result<()> {
    start_mesh_with(tb, client, client_node, server, server_node, extra, &[])
}

/// [`start_mesh`] with more objects in the configuration.
fn start_mesh_with(
    tb: &mut Testbed,
    client: &Pod,
    client_node: usize,
    server: &Pod,
    server_node: usize,
    extra: &[&str],
    objects: &[String],
) -> anyhow::Result<()> {
    let mut docs = mesh_docs(client, client_node, server, server_node);
    docs.extend(objects.iter().cloned());
    tb.write_config(&docs)?;
    let mut args = tb.mesh_args()?;
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut nodes = vec![client_node, server_node];
    nodes.dedup();
    for &n in &nodes {
        tb.start_agent(n, &args)?;
    }
    for (n, pod) in [(client_node, client), (server_node, server)] {
        let want = format!("bench/{}", pod.name);
        wait_for(Duration::from_secs(10), || {
            Ok(tb.agent(n).pod_names()?.contains(&want))
        })
        .with_context(|| {
            format!(
                "{} not enrolled; agent log:\n{}",
                pod.name,
                tb.agent(n).log_text()
            )
        })?;
    }
    Ok(())
}

/// The mesh's configuration: the namespace `bench`, labelled for the
/// mesh, and the client and server pods in it.
pub fn mesh_docs(
    client: &Pod,
    client_node: usize,
    server: &Pod,
    server_node: usize,
) -> Vec<String> {
    vec![
        namespace_yaml("bench", true),
        with_netns(
            &pod_yaml(client, client_node, "bench", "client", &[]),
            client,
        ),
        with_netns(
            &pod_yaml(server, server_node, "bench", "server", &[("app", "server")]),
            server,
        ),
    ]
}

/// Polls `done` every 20 ms until it holds, for at most `limit`.
pub fn wait_for(
    limit: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done()? {
        ensure!(Instant::now() < deadline, "not done after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

const STUNNEL: &str = "/usr/bin/stunnel4";

/// A root and one leaf each for the tunnel's ends: ECDSA P-256, as the
/// mesh's own certificates.
fn make_certs(dir: &FsPath) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "root.key",
                "-out",
                "root.pem",
                "-days",
                "2",
                "-subj",
                "/CN=bench root",
            ],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
        ]
        .concat(),
    )?;
    for end in ["server", "client"] {
        let (key, csr, pem) = (
            format!("{end}.key"),
            format!("{end}.csr"),
            format!("{end}.pem"),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={end}"),
                ],
            ]
            .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
        ])?;
    }
    Ok(())
}

/// An stunnel configuration for one end; `server_ip` for the client end.
fn tunnel_conf(dir: &FsPath, end: &str, server_ip: Option<IpAddr>) -> anyhow::Result<String> {
    let d = dir.display();
    let common = format!(
        "cert = {d}/{end}.pem\nkey = {d}/{end}.key\nCAfile = {d}/root.pem\nverifyChain = yes\n\
         sslVersionMin = TLSv1.3\n"
    );
    let services = match server_ip {
        None => format!(
            "[http]\naccept = {TUNNEL_HTTP}\nconnect = 127.0.0.1:{HTTP_PORT}\n{common}\n\
             [iperf]\naccept = {TUNNEL_IPERF}\nconnect = 127.0.0.1:{IPERF_PORT}\n{common}"
        ),
        Some(ip) => format!(
            "client = yes\n\n[http]\naccept = 127.0.0.1:{LOCAL_HTTP}\nconnect = {ip}:{TUNNEL_HTTP}\n{common}\n\
             [iperf]\naccept = 127.0.0.1:{LOCAL_IPERF}\nconnect = {ip}:{TUNNEL_IPERF}\n{common}"
        ),
    };
    // debug = 0: the readiness probe's bare connect would log an error.
    let conf = format!("foreground = yes\npid =\nsyslog = no\ndebug = 0\n{services}");
    let path: PathBuf = dir.join(format!("{end}.conf"));
    std::fs::write(&path, conf)?;
    Ok(path.display().to_string())
}

/// Waits until something accepts connections at `addr` inside `pod`.
fn wait_listening(tb: &Testbed, pod: &Pod, addr: SocketAddr) -> anyhow::Result<()> {
    let probe = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
    wait_for(Duration::from_secs(10), || {
        Ok(tb
            .run_in_pod(pod, FsPath::new("/bin/bash"), &["-c", &probe])
            .is_ok())
    })
    .with_context(|| format!("nothing listens at {addr} in {}", pod.name))
}

/// Starts the benchmark's servers in `pod`.
pub fn start_servers(tb: &mut Testbed, pod: &Pod) -> anyhow::Result<()> {
    let load = mesh_tests::sibling_bin("mesh-load");
    tb.spawn_in(
        &pod.netns,
        &pod.cgroup,
        &load,
        &["http-serve", &format!("0.0.0.0:{HTTP_PORT}")],
    )
    .context("starting the HTTP server")?;
    tb.spawn_in(
        &pod.netns,
        &pod.cgroup,
        FsPath::new("/usr/bin/iperf3"),
        &[
            "-s",
            "-p",
            &IPERF_PORT.to_string(),
            "--logfile",
            "/dev/null",
        ],
    )
    .context("starting iperf3 -s")?;
    wait_listening(tb, pod, SocketAddr::new(pod.ip4, HTTP_PORT))?;
    // Not by connecting: iperf3 prints an error for a bare connect.
    let sport = format!("sport = :{IPERF_PORT}");
    wait_for(Duration::from_secs(10), || {
        let out = tb.run_in_pod(pod, FsPath::new("/usr/bin/ss"), &["-Hltn", &sport])?;
        Ok(!out.trim().is_empty())
    })
    .context("iperf3 -s not listening")
}
