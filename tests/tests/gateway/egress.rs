//! Egress through a waypoint, end to end: an enrolled pod calls
//! `http://api.example.com` (a ServiceEntry's address, the entry bound to
//! a waypoint by its own label); its agent carries the connection over
//! HBONE to the waypoint, which applies the entry's HTTPRoute and L7
//! AuthorizationPolicy and originates TLS (DestinationRule `SIMPLE`) to an
//! HTTPS server outside the mesh, verified against a test CA. A wrong CA
//! or a certificate for another name is refused (503 `UF`, counted). A DNS
//! entry is resolved at the waypoint (its CA from a Secret, by
//! `credentialName`); a TCP port's bytes are originated as TLS too. The
//! wire from the pod is HBONE only; from the waypoint, TLS with the SNI.

use std::path::Path;

use mesh_tests::{
    Testbed, Value,
    mesh::{namespace_yaml, pod_yaml, tshark},
    metrics::{series_sum, series_sum_or_absent},
    waypoint::gateway_yaml,
};

/// An HTTPS server that answers every request with what it saw as JSON:
/// the method, path, Host, `x-egress` header and the TLS SNI (and appends
/// it to the file named by its fourth argument, when there is one).
const HTTPS_ECHO: &str = r#"
import sys, ssl, json, http.server
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen_log = open(sys.argv[4], "a") if len(sys.argv) > 4 else None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
def remember(sock, name, _ctx):
    sock.mesh_sni = name
ctx.sni_callback = remember
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        body = json.dumps({
            "server": "external", "method": self.command, "path": self.path,
            "host": self.headers.get("host"), "x_egress": self.headers.get("x-egress"),
            "sni": getattr(self.connection, "mesh_sni", None),
        }).encode()
        if seen_log:
            seen_log.write(body.decode() + "\n")
            seen_log.flush()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = answer
    do_POST = answer
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def get_request(self):
        sock, addr = self.socket.accept()
        # The handshake runs in the request's thread, on its first read.
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr
    def handle_error(self, request, client_address):
        pass
server = Server(("0.0.0.0", port), Echo)
print("listening", flush=True)
server.serve_forever()
"#;

/// A ServiceEntry bound to the waypoint `egress`: `host` at `vip` port 80,
/// sent to the external server's port 443.
fn entry(name: &str, host: &str, vip: &str, external: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  \
         namespace: shop\n  labels: {{istio.io/use-waypoint: egress}}\nspec:\n  hosts: [{host}]\n  \
         addresses: [{vip}]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports:\n  - \
         {{number: 80, name: http, protocol: HTTP, targetPort: 443}}\n  endpoints:\n  - address: \
         \"{external}\"\n"
    )
}

fn destination_rule(name: &str, host: &str, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, \
         namespace: shop}}\nspec:\n  host: {host}\n  trafficPolicy:\n{tls}"
    )
}

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
    backendRefs: [{group: networking.istio.io, kind: Hostname, name: api.example.com, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirrored}}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {group: networking.istio.io, kind: Hostname, name: api.example.com, port: 80}
    backendRefs: [{group: networking.istio.io, kind: Hostname, name: api.example.com, port: 80}]
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-egress, value: waypoint}]}
";

/// Only GET, only from the frontend's ServiceAccount.
const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-get-from-frontend, namespace: shop}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {methods: [GET]}}]
";

/// A CA named `ca_name` (its PEM) and a certificate it signed for `host`
/// (PEM, key PEM).
fn ca_and_leaf(ca_name: &str, host: &str) -> anyhow::Result<(String, String, String)> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate()?)?;
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec![host.to_owned()])?.signed_by(&key, &ca)?;
    Ok((ca.pem(), leaf.pem(), key.serialize_pem()))
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[test]
fn egress_waypoint_applies_l7_policy_and_originates_verified_tls() -> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let frontend = tb.add_pod(0, "frontend")?;
    let intruder = tb.add_pod(0, "intruder")?;
    let wp = tb.add_pod(0, "egress-wp")?;
    // Outside the mesh: in no configuration, never enrolled.
    let external = tb.add_pod(0, "external")?;
    let dir = tb.workdir().to_path_buf();
    let write = |name: &str, text: &str| -> anyhow::Result<String> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let (ca, cert, key) = ca_and_leaf("egress test CA", "api.example.com")?;
    let (other_ca, _, _) = ca_and_leaf("another CA", "api.example.com")?;
    let ca_pem = ca.clone();
    let ca = write("egress-ca.pem", &ca)?;
    let other_ca = write("other-ca.pem", &other_ca)?;
    let (cert, key) = (write("server.pem", &cert)?, write("server-key.pem", &key)?);
    let server = write("https_echo.py", HTTPS_ECHO)?;
    let seen_log = dir.join("external-seen.jsonl");
    tb.serve_program(
        &external,
        Path::new("/usr/bin/python3"),
        &[&server, &cert, &key, "443", &seen_log.display().to_string()],
    )?;

    let ext = external.ip4.to_string();
    // `tls` at `indent` spaces.
    let simple = |indent: usize, extra: &str, ca: &str| {
        format!(
            "{:indent$}tls: {{mode: SIMPLE, caCertificates: {ca}{extra}}}\n",
            ""
        )
    };
    let mut docs = vec![
        namespace_yaml("shop", true),
        pod_yaml(&frontend, 0, "shop", "frontend", &[("app", "frontend")]),
        pod_yaml(&intruder, 0, "shop", "intruder", &[("app", "intruder")]),
        pod_yaml(
            &wp,
            0,
            "shop",
            "egress",
            &[
                ("gateway.networking.k8s.io/gateway-name", "egress"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
        gateway_yaml("egress", "shop", None),
        entry("api", "api.example.com", "10.97.1.10", &ext),
        entry("wrong-ca", "wrong-ca.example.com", "10.97.1.11", &ext),
        entry("wrong-name", "wrong-name.example.com", "10.97.1.12", &ext),
        // Resolution DNS without endpoints: the waypoint resolves the host
        // per request (an address literal: the one name a test machine
        // resolves without a DNS server).
        entry("dns-api", &ext, "10.97.1.13", &ext)
            .replace("resolution: STATIC", "resolution: DNS")
            .replace(&format!("  endpoints:\n  - address: \"{ext}\"\n"), ""),
        // The CA from a Secret (`credentialName`), as Istio allows.
        destination_rule(
            "dns-api",
            &ext,
            "    tls: {mode: SIMPLE, sni: api.example.com, credentialName: egress-ca}\n",
        ),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: egress-ca, namespace: shop}}\n\
             stringData:\n  ca.crt: |\n{}",
            ca_pem
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        ),
        // Per port, with the SNI named; the CA that signed the server's
        // certificate.
        destination_rule(
            "api",
            "api.example.com",
            &format!(
                "    portLevelSettings:\n    - port: {{number: 80}}\n{}",
                simple(6, ", sni: api.example.com", &ca)
            ),
        ),
        // Another CA: the server's certificate does not chain to it.
        destination_rule(
            "wrong-ca",
            "wrong-ca.example.com",
            &simple(4, ", sni: api.example.com", &other_ca),
        ),
        // The right CA, but the SNI is the host (the default), which the
        // certificate does not name.
        destination_rule("wrong-name", "wrong-name.example.com", &simple(4, "", &ca)),
        // A TCP port: the waypoint streams bytes, and originates TLS for
        // them too.
        entry("tcp-api", "tcp.example.com", "10.97.1.14", &ext).replace(
            "{number: 80, name: http, protocol: HTTP, targetPort: 443}",
            "{number: 8080, name: tcp, protocol: TCP, targetPort: 443}",
        ),
        destination_rule(
            "tcp-api",
            "tcp.example.com",
            &simple(4, ", sni: api.example.com", &ca),
        ),
        ROUTE.into(),
        POLICY.into(),
    ];
    docs.iter_mut().for_each(|d| d.push('\n'));
    tb.write_config(&docs)?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(0, &argv)?;
    tb.agent(0).enroll(&frontend)?;
    tb.agent(0).enroll(&intruder)?;
    let waypoint = tb.start_waypoint(&wp, "shop", &args)?;

    let call = |pod: &mesh_tests::Pod, host: &str, vip: &str, extra: &[&str], path: &str| {
        let resolve = format!("{host}:80:{vip}");
        let url = format!("http://{host}{path}");
        let mut a = vec!["--resolve", &resolve];
        a.extend_from_slice(extra);
        a.push(&url);
        tb.curl(pod, &a)
    };

    // The wire from the client pod while it calls.
    let client_wire = tb.capture_packets(&frontend, "egress-client")?;
    let waypoint_wire = tb.capture_packets(&wp, "egress-waypoint")?;
    let (code, a) = call(
        &frontend,
        "api.example.com",
        "10.97.1.10",
        &[],
        "/v1/orders-7f3a",
    )?;
    assert_eq!(code, 0, "{a:?}");
    assert_eq!(a[0].0, 200, "{a:?}");
    let seen = json(&a[0].1);
    assert_eq!(seen["server"], "external", "{seen}");
    assert_eq!(seen["method"], "GET", "{seen}");
    assert_eq!(seen["path"], "/v1/orders-7f3a", "{seen}");
    assert_eq!(seen["host"], "api.example.com", "{seen}");
    // The route's filter ran at the waypoint, and the server saw TLS with
    // the configured SNI.
    assert_eq!(seen["x_egress"], "waypoint", "{seen}");
    assert_eq!(seen["sni"], "api.example.com", "{seen}");
    let client_pcap = client_wire.stop()?;
    let waypoint_pcap = waypoint_wire.stop()?;

    // A DNS entry: resolved at the waypoint, TLS to what it resolved to,
    // verified against the Secret's CA.
    let (_, a) = call(&frontend, "dns.example.com", "10.97.1.13", &[], "/v1/dns")?;
    assert_eq!(a[0].0, 200, "{a:?}");
    let seen = json(&a[0].1);
    assert_eq!(
        (&seen["path"], &seen["sni"]),
        (&"/v1/dns".into(), &"api.example.com".into()),
        "{seen}"
    );

    // Bytes of a TCP port: TLS from the waypoint all the same.
    let (_, a) = tb.curl(
        &frontend,
        &[
            "--resolve",
            "tcp.example.com:8080:10.97.1.14",
            "http://tcp.example.com:8080/v1/tcp",
        ],
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    let seen = json(&a[0].1);
    assert_eq!(
        (&seen["path"], &seen["sni"]),
        (&"/v1/tcp".into(), &"api.example.com".into()),
        "{seen}"
    );

    // A rewrite to the entry's host (backendRef kind Hostname).
    let (_, a) = call(
        &frontend,
        "api.example.com",
        "10.97.1.10",
        &[],
        "/old/items",
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["path"], "/v1/items", "{a:?}");

    // A mirror to a host the waypoint originates TLS to gets TLS too: the
    // copy (Host `...-shadow`) reaches the HTTPS server with the SNI.
    let (_, a) = call(
        &frontend,
        "api.example.com",
        "10.97.1.10",
        &[],
        "/mirrored/5c1e",
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    mesh_tests::converge(
        "the mirrored copy reached the HTTPS server over TLS",
        std::time::Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&seen_log).unwrap_or_default();
            Ok(text.lines().map(json).any(|seen| {
                seen["path"] == "/mirrored/5c1e"
                    && seen["host"] == "api.example.com-shadow"
                    && seen["sni"] == "api.example.com"
            }))
        },
    )?;

    // From the pod: TCP to the waypoint's 15008 only, a TLS handshake there,
    // and not a byte of the request in the clear.
    let other = tshark(
        &client_pcap,
        "tcp && tcp.len > 0 && !(tcp.port == 15008)",
        &["ip.dst", "tcp.dstport"],
    )?;
    assert!(other.is_empty(), "payload outside HBONE: {other:?}");
    let hbone = tshark(
        &client_pcap,
        &format!("tls.handshake.type == 1 && ip.dst == {}", wp.ip4),
        &["tcp.dstport"],
    )?;
    assert!(hbone.iter().any(|p| p == "15008"), "{hbone:?}");
    let raw = std::fs::read(&client_pcap)?;
    assert!(
        !raw.windows(11).any(|w| w == b"orders-7f3a"),
        "the request's path is visible on the client pod's wire"
    );
    // From the waypoint to the external server: TLS with the SNI, the
    // request not in the clear.
    let hello = tshark(
        &waypoint_pcap,
        &format!("tls.handshake.type == 1 && ip.dst == {ext} && tcp.dstport == 443"),
        &["tls.handshake.extensions_server_name"],
    )?;
    assert!(hello.iter().any(|s| s == "api.example.com"), "{hello:?}");
    let raw = std::fs::read(&waypoint_pcap)?;
    assert!(
        !raw.windows(11).any(|w| w == b"orders-7f3a"),
        "the request's path is visible on the waypoint's wire"
    );

    // L7 policy on the external host: POST and another ServiceAccount are
    // refused with the RBAC reason.
    let (_, a) = call(
        &frontend,
        "api.example.com",
        "10.97.1.10",
        &["-X", "POST", "-d", "x"],
        "/v1/orders",
    )?;
    assert_eq!(a[0].0, 403, "{a:?}");
    assert!(a[0].1.contains("RBAC: access denied"), "{a:?}");
    let (_, a) = call(
        &intruder,
        "api.example.com",
        "10.97.1.10",
        &[],
        "/v1/orders",
    )?;
    assert_eq!(a[0].0, 403, "{a:?}");
    assert!(a[0].1.contains("RBAC: access denied"), "{a:?}");

    // A CA that did not sign the server's certificate, and a name the
    // certificate does not carry: refused, said, counted.
    for (host, vip, why) in [
        ("wrong-ca.example.com", "10.97.1.11", "UnknownIssuer"),
        ("wrong-name.example.com", "10.97.1.12", "NotValidForName"),
    ] {
        let (_, a) = call(&frontend, host, vip, &[], "/v1/orders")?;
        assert_eq!(a[0].0, 503, "{host}: {a:?}");
        assert!(
            a[0].1.contains("TLS error") && a[0].1.contains(why),
            "{host}: {a:?}"
        );
    }
    let page = waypoint.metrics()?;
    for host in ["wrong-ca.example.com", "wrong-name.example.com"] {
        assert_eq!(
            series_sum(
                &page,
                "mesh_waypoint_tls_origination_failures_total",
                &[("service", host), ("reason", "certificate")],
            )?,
            1.0,
            "{host}"
        );
        assert_eq!(
            series_sum(
                &page,
                "istio_requests_total",
                &[
                    ("destination_service", host),
                    ("response_code", "503"),
                    ("response_flags", "UF"),
                ],
            )?,
            1.0,
            "{host}"
        );
    }
    assert_eq!(
        series_sum_or_absent(
            &page,
            "mesh_waypoint_tls_origination_failures_total",
            &[("service", "api.example.com")],
        )?,
        0.0
    );
    let log = waypoint.log_text();
    assert!(
        log.contains("TLS origination failed") && log.contains("UnknownIssuer"),
        "the refusal is logged: {log}"
    );
    // The allowed calls were counted as the external host's, from the
    // frontend's identity.
    assert_eq!(
        series_sum(
            &page,
            "istio_requests_total",
            &[
                ("destination_service", "api.example.com"),
                ("response_code", "200"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/frontend"
                ),
            ],
        )?,
        3.0
    );
    Ok(())
}
