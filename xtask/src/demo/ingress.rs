//! The demo's ingress part: an ingress gateway (`mesh-agent gateway`) in a
//! pod of its own takes HTTPS from a client outside the mesh, with the
//! certificate of a TLS Secret picked by SNI, and sends the requests into
//! the mesh over HBONE with its own identity. Every claim it prints is
//! checked.

use anyhow::{Context as _, ensure};
use mesh_tests::{
    Testbed,
    mesh::{pod_yaml, with_netns},
    metrics::{series_sum, series_sum_or_absent},
    waypoint::tls_secret_yaml,
};

const HOST: &str = "bookinfo.example.com";

const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: bookinfo}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - name: https
    port: 8443
    protocol: HTTPS
    hostname: bookinfo.example.com
    tls: {mode: Terminate, certificateRefs: [{name: bookinfo-cert}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: public, namespace: bookinfo}
spec:
  parentRefs: [{name: public}]
  hostnames: [bookinfo.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /reviews}}]
    backendRefs: [{name: reviews-v1, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: public}]
  action: DENY
  rules: [{to: [{operation: {paths: [/reviews/admin*]}}]}]
";

/// Adds the gateway, its Secret and route to `docs` (the configuration so
/// far, with bookinfo in it), starts the gateway, and calls it from
/// outside the mesh.
pub fn run(tb: &mut Testbed, mut docs: Vec<String>) -> anyhow::Result<()> {
    println!("\n--- Ingress: a gateway into the mesh ---");
    let gw = tb.add_pod(0, "ingress")?;
    // Outside the mesh: in no configuration, never enrolled.
    let client = tb.add_pod(0, "outside")?;
    let (secret, pem) = tls_secret_yaml("bookinfo-cert", "bookinfo", HOST)?;
    docs.extend([
        with_netns(
            &pod_yaml(
                &gw,
                0,
                "bookinfo",
                "ingress",
                &[
                    ("gateway.networking.k8s.io/gateway-name", "public"),
                    ("istio.io/dataplane-mode", "none"),
                ],
            ),
            &gw,
        ),
        GATEWAY.to_owned(),
        secret,
    ]);
    tb.write_config(&docs)?;
    let config = tb.config_path().display().to_string();
    let ca_dir = tb.nodes[0].state_dir.join("ca").display().to_string();
    let args: Vec<String> = ["--config", &config, "--ca-dir", &ca_dir]
        .map(str::to_owned)
        .to_vec();
    let gateway = tb
        .start_gateway(&gw, "bookinfo", &args)
        .context("starting the ingress gateway")?;
    let ca = tb.workdir().join("bookinfo-cert.pem");
    std::fs::write(&ca, &pem)?;
    let ca = ca.display().to_string();
    let resolve = format!("{HOST}:8443:{}", gw.ip4);
    let https = |path: &str, extra: &[&str]| {
        let url = format!("https://{HOST}:8443{path}");
        let mut a = vec!["--cacert", &ca, "--resolve", &resolve];
        a.extend_from_slice(extra);
        a.push(&url);
        tb.curl(&client, &a)
    };
    println!(
        "Gateway bookinfo/public (class mesh-ingress): `mesh-agent gateway` in pod {}, HTTPS on 8443 for {HOST}",
        gw.ip4
    );
    println!(
        "  certificate from Secret bookinfo/bookinfo-cert; HTTPRoute /reviews -> reviews-v1; /reviews/admin denied at the gateway"
    );
    println!("Client outside the mesh: pod {} (not enrolled)", client.ip4);
    // The listener opens once the gateway has read its Gateway.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (code, a) = loop {
        let (code, a) = https("/reviews/1", &[])?;
        if code == 0 || std::time::Instant::now() > deadline {
            break (code, a);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (status, body) = a.first().cloned().unwrap_or_default();
    let server = serde_json::from_str::<serde_json::Value>(&body)
        .map(|v| v["server"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    println!(
        "\n 10. curl https://{HOST}:8443/reviews/1 (trusting only the Secret's certificate): {status}, served by {server}"
    );
    ensure!(
        code == 0 && status == 200 && server == "reviews-v1",
        "the HTTPS call through the gateway failed: curl {code}, {a:?}"
    );
    let page = tb.agent(0).metrics()?;
    let gw_id = "spiffe://cluster.local/ns/bookinfo/sa/ingress";
    let seen = series_sum(
        &page,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", gw_id),
            ("destination_workload", "reviews-v1"),
            ("connection_security_policy", "mutual_tls"),
        ],
    )?;
    println!("     reviews-v1's agent saw {gw_id} over mutual TLS ({seen} connection(s))");
    ensure!(
        seen >= 1.0,
        "the backend did not see the gateway's identity"
    );

    let (_, a) = https("/reviews/admin", &[])?;
    let (status, body) = a.first().cloned().unwrap_or_default();
    println!(
        " 11. curl https://{HOST}:8443/reviews/admin: {status} {body:?} (a DENY policy on the Gateway)"
    );
    ensure!(status == 403, "the admin path was not denied");

    let (code, _) = tb.curl(
        &client,
        &[
            "-k",
            "--resolve",
            &format!("other.example.com:8443:{}", gw.ip4),
            "https://other.example.com:8443/",
        ],
    )?;
    let unknown = series_sum_or_absent(
        &gateway.metrics()?,
        "mesh_proxy_connections_total",
        &[("direction", "ingress"), ("result", "tls_unknown_sni")],
    )?;
    println!(
        " 12. a name the gateway does not serve (SNI other.example.com): curl exit {code} (TLS alert unrecognized_name), counted {unknown} time(s)"
    );
    ensure!(
        code == 35 && unknown >= 1.0,
        "the unknown name was not refused"
    );
    Ok(())
}
