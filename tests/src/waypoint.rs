//! Waypoint harness: the YAML of a waypoint Gateway and its pod, the
//! waypoint process in its own pod (not captured), the HTTP test app, and
//! curl inside a pod.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

use crate::{Agent, Pod, Testbed, agent_bin, in_cgroup_netns, testapp_bin};

/// A waypoint Gateway (`istio-waypoint`, the HBONE listener), serving what
/// `waypoint_for` says (None: the default, Services).
pub fn gateway_yaml(name: &str, namespace: &str, waypoint_for: Option<&str>) -> String {
    let labels = waypoint_for
        .map(|f| format!("\n  labels:\n    istio.io/waypoint-for: {f}"))
        .unwrap_or_default();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {namespace}{labels}\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
    )
}

/// A `kubernetes.io/tls` Secret `name` in `namespace` holding a fresh
/// self-signed certificate for `host`: the Secret's YAML, and the
/// certificate's PEM for a client to trust.
pub fn tls_secret_yaml(
    name: &str,
    namespace: &str,
    host: &str,
) -> anyhow::Result<(String, String)> {
    let c = rcgen::generate_simple_self_signed(vec![host.to_owned()])?;
    let (crt, key) = (c.cert.pem(), c.signing_key.serialize_pem());
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&crt),
        indent(&key)
    );
    Ok((yaml, crt))
}

/// A gRPC server with one service `test.Echo` (methods `Say` and `Secret`
/// echo their bytes), no generated code: Debian's python3-grpcio.
pub const GRPC_SERVER: &str = r#"
import sys, grpc
from concurrent import futures
def echo(request, context):
    return b"echo:" + request
handlers = {
    "Say": grpc.unary_unary_rpc_method_handler(echo),
    "Secret": grpc.unary_unary_rpc_method_handler(echo),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
server.add_insecure_port(sys.argv[1])
server.start()
print("listening", flush=True)
server.wait_for_termination()
"#;

/// One unary call: `client.py ADDR METHOD`; prints the outcome as JSON.
pub const GRPC_CLIENT: &str = r#"
import sys, json, grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    call = ch.unary_unary("/test.Echo/" + sys.argv[2])
    try:
        reply = call(b"hello", timeout=10)
        print(json.dumps({"ok": True, "code": 0, "reply": reply.decode()}))
    except grpc.RpcError as e:
        print(json.dumps({"ok": False, "code": e.code().value[0], "details": e.details()}))
"#;

/// A ClusterIP Service with one `http` port (80 to 8080), selecting
/// `selector` and carrying `labels` (both as YAML flow maps' insides, e.g.
/// `app: reviews` and `istio.io/use-waypoint: waypoint`).
pub fn http_service_yaml(
    name: &str,
    namespace: &str,
    vip: &str,
    selector: &str,
    labels: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{{labels}}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{{selector}}}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n"
    )
}

impl Testbed {
    /// Starts `program args` in `pod` and waits for its `listening` line.
    pub fn serve_program(
        &mut self,
        pod: &Pod,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<usize> {
        let idx = self.spawn_in(&pod.netns, &pod.cgroup, program, args)?;
        let out = self.children[idx].stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        ensure!(
            line.starts_with("listening"),
            "{} in {} did not start: {line:?}",
            program.display(),
            pod.name
        );
        Ok(idx)
    }

    /// Starts `mesh-agent waypoint` inside `pod` (its own netns and cgroup,
    /// not enrolled) with `args`, and waits until it is ready. Its admin,
    /// metrics and readiness ports are the pod's own.
    pub fn start_waypoint(
        &mut self,
        pod: &Pod,
        namespace: &str,
        args: &[String],
    ) -> anyhow::Result<Agent> {
        self.start_proxy("waypoint", pod, namespace, args)
    }

    /// Starts `mesh-agent gateway` (an ingress gateway) inside `pod`, as
    /// [`Testbed::start_waypoint`] starts a waypoint; its listeners are
    /// its Gateway's.
    pub fn start_gateway(
        &mut self,
        pod: &Pod,
        namespace: &str,
        args: &[String],
    ) -> anyhow::Result<Agent> {
        self.start_proxy("gateway", pod, namespace, args)
    }

    fn start_proxy(
        &mut self,
        command: &str,
        pod: &Pod,
        namespace: &str,
        args: &[String],
    ) -> anyhow::Result<Agent> {
        let log = self.workdir.join(format!("{command}-{}.log", pod.name));
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let state = self.workdir.join(format!("{command}-{}", pod.name));
        let mut c = in_cgroup_netns(&pod.cgroup, &pod.netns, &agent_bin());
        c.arg(command)
            .arg("--pod-name")
            .arg(&pod.name)
            .arg("--pod-namespace")
            .arg(namespace)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .env("MESH_LOG", &self.agent_log)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = c
            .spawn()
            .with_context(|| format!("spawning the {command}"))?;
        let mut wp = Agent {
            child,
            netns: pod.netns.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = wp.request(15021, "GET", "/healthz/ready", None) {
                return Ok(wp);
            }
            if let Some(status) = wp.child.try_wait()? {
                bail!(
                    "{command} in {} exited ({status}) before it was ready; log:\n{}",
                    pod.name,
                    wp.log_text()
                );
            }
            if Instant::now() > deadline {
                let ready = wp.request(15021, "GET", "/healthz/ready", None);
                bail!(
                    "{command} in {} not ready after 20s ({ready:?}); log:\n{}",
                    pod.name,
                    wp.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Keeps `agent` (a waypoint) running until the testbed is dropped;
    /// returns its process ID.
    pub fn keep(&mut self, agent: Agent) -> u32 {
        let pid = agent.pid();
        self.kept.push(agent);
        pid
    }

    /// Starts the HTTP test app in `pod` on `addr`, answering as `name`.
    pub fn serve_http(&mut self, pod: &Pod, addr: SocketAddr, name: &str) -> anyhow::Result<usize> {
        let idx = self.spawn_in(
            &pod.netns,
            &pod.cgroup,
            &testapp_bin(),
            &["http-serve", &addr.to_string(), name],
        )?;
        let out = self.children[idx].stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        ensure!(
            line.starts_with("listening"),
            "HTTP server in {} did not start: {line:?}",
            pod.name
        );
        Ok(idx)
    }

    /// Runs curl in `pod`: one line per URL, `STATUS BODY` (the body's
    /// newlines removed), and curl's exit code.
    pub fn curl(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<(i32, Vec<(u16, String)>)> {
        let mut full = vec!["-s", "--max-time", "10", "-w", "\\n%{http_code}\\n"];
        full.extend_from_slice(args);
        let out = in_cgroup_netns(&pod.cgroup, &pod.netns, Path::new("/usr/bin/curl"))
            .args(&full)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Each transfer prints its body, a newline, its code and a newline.
        let mut lines: Vec<&str> = text.lines().collect();
        let mut answers = Vec::new();
        let mut body = String::new();
        for l in lines.drain(..) {
            match l.parse::<u16>() {
                Ok(code) if l.len() == 3 => {
                    answers.push((code, std::mem::take(&mut body)));
                }
                _ => body.push_str(l),
            }
        }
        Ok((out.status.code().unwrap_or(-1), answers))
    }
}
