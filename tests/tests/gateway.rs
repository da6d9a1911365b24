//! The ingress gateway end to end: `mesh-agent gateway` in a pod of its own
//! (not captured), a client outside the mesh calling it with curl over
//! HTTPS, two meshed backends with real eBPF capture behind it. The
//! certificate served per SNI (each verified against its Secret's
//! certificate), routing by host and path into the mesh over HBONE with
//! the gateway's identity, a denied path, rotation of a Secret without a
//! restart, and bad input (an unknown SNI, no SNI, bytes that are not TLS,
//! malformed HTTP) refused clearly, counted, with the gateway serving on.
//! A Service labelled `istio.io/ingress-use-waypoint` is reached through
//! its waypoint, which sees the gateway's identity.

use std::path::Path;

#[path = "gateway/egress.rs"]
mod egress;

use mesh_tests::{
    Testbed, Value,
    mesh::{namespace_yaml, pod_yaml},
    metrics::{series_sum, series_sum_or_absent},
    waypoint::{gateway_yaml, http_service_yaml, tls_secret_yaml},
};

const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
  - name: shop
    port: 8443
    protocol: HTTPS
    hostname: shop.example.com
    tls: {mode: Terminate, certificateRefs: [{name: shop-cert}]}
  - name: api
    port: 8443
    protocol: HTTPS
    hostname: api.example.com
    tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: api-cert}]}
";

const ROUTES: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: edge}
spec:
  parentRefs: [{name: public}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /cart}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-entry, value: ingress}]}
    backendRefs: [{name: shop, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /reviews}}]
    backendRefs: [{name: reviews, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: edge}
spec:
  parentRefs: [{name: public, sectionName: api}]
  hostnames: [api.example.com]
  rules:
  - backendRefs: [{name: api, port: 80}]
";

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: edge}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: public}]
  action: DENY
  rules: [{to: [{operation: {paths: [/cart/admin*]}}]}]
";

/// A fresh self-signed certificate for `host`: the Secret's YAML and the
/// certificate's PEM (what the client trusts).
fn secret(name: &str, host: &str) -> anyhow::Result<(String, String)> {
    tls_secret_yaml(name, "edge", host)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// Polls `pending` (None once done, else what it still sees) every 50 ms
/// for at most `secs` seconds; fails with `what` and the last sight.
fn wait_until(
    secs: u64,
    what: &str,
    mut pending: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let Some(seen) = pending()? else {
            return Ok(());
        };
        anyhow::ensure!(std::time::Instant::now() < deadline, "{what}: {seen}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn ingress_gateway_terminates_tls_by_sni_routes_into_the_mesh_and_refuses_bad_input()
-> anyhow::Result<()> {
    let mut tb = Testbed::new(1)?;
    let shop = tb.add_pod(0, "shop")?;
    let api = tb.add_pod(0, "api")?;
    let gw = tb.add_pod(0, "public-gw")?;
    // Outside the mesh: in no configuration, never enrolled.
    let client = tb.add_pod(0, "outside")?;
    let wp = tb.add_pod(0, "edge-wp")?;
    let (shop_secret, shop_pem) = secret("shop-cert", "shop.example.com")?;
    let (api_secret, api_pem) = secret("api-cert", "api.example.com")?;
    let mut docs = vec![
        namespace_yaml("edge", true),
        pod_yaml(&shop, 0, "edge", "shop", &[("app", "shop")]),
        pod_yaml(&api, 0, "edge", "api", &[("app", "api")]),
        pod_yaml(
            &gw,
            0,
            "edge",
            "public-gw",
            &[
                ("gateway.networking.k8s.io/gateway-name", "public"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
        http_service_yaml("shop", "edge", "10.96.0.50", "app: shop", ""),
        http_service_yaml("api", "edge", "10.96.0.51", "app: api", ""),
        // Through its waypoint, from the gateway too.
        http_service_yaml(
            "reviews",
            "edge",
            "10.96.0.52",
            "app: shop",
            "istio.io/use-waypoint: wp, istio.io/ingress-use-waypoint: \"true\"",
        ),
        gateway_yaml("wp", "edge", None),
        pod_yaml(
            &wp,
            0,
            "edge",
            "wp",
            &[
                ("gateway.networking.k8s.io/gateway-name", "wp"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
        GATEWAY.into(),
        ROUTES.into(),
        POLICY.into(),
        shop_secret,
        api_secret,
    ];
    docs.iter_mut().for_each(|d| d.push('\n'));
    tb.write_config(&docs)?;
    tb.serve_http(&shop, "[::]:8080".parse()?, "shop")?;
    tb.serve_http(&api, "[::]:8080".parse()?, "api")?;
    let args = tb.mesh_args()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(0, &argv)?;
    tb.agent(0).enroll(&shop)?;
    tb.agent(0).enroll(&api)?;
    let gateway = tb.start_gateway(&gw, "edge", &args)?;
    let waypoint = tb.start_waypoint(&wp, "edge", &args)?;
    let gw_ip = gw.ip4;
    let pems = tb.workdir().to_path_buf();
    let write_pem = |name: &str, pem: &str| -> anyhow::Result<String> {
        let p = pems.join(name);
        std::fs::write(&p, pem)?;
        Ok(p.display().to_string())
    };
    let shop_ca = write_pem("shop.pem", &shop_pem)?;
    let api_ca = write_pem("api.pem", &api_pem)?;
    let resolve = |host: &str| format!("{host}:8443:{gw_ip}");
    let https = |ca: &str, host: &str, path: &str, extra: &[&str]| {
        let mut a = vec![
            "--cacert".to_owned(),
            ca.to_owned(),
            "--resolve".to_owned(),
            resolve(host),
        ];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a.push(format!("https://{host}:8443{path}"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        tb.curl(&client, &a)
    };
    // The listeners open once the gateway has read its Gateway.
    wait_until(10, "the HTTPS listener did not answer", || {
        let (code, a) = https(&shop_ca, "shop.example.com", "/cart/1", &[])?;
        Ok((code != 0).then(|| format!("curl {code}: {a:?}")))
    })?;

    // SNI picks the certificate: each verifies against its own Secret's
    // certificate only.
    let (code, a) = https(&shop_ca, "shop.example.com", "/cart/1", &[])?;
    assert_eq!(code, 0, "{a:?}");
    assert_eq!(a[0].0, 200, "{a:?}");
    let seen = json(&a[0].1);
    assert_eq!(seen["server"], "shop", "{seen}");
    assert_eq!(seen["path"], "/cart/1", "{seen}");
    assert_eq!(seen["headers"]["x-entry"], "ingress", "{seen}");
    let (code, a) = https(&api_ca, "api.example.com", "/v1/items", &[])?;
    assert_eq!(code, 0, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "api", "{a:?}");
    // 60: the peer's certificate is not the one trusted.
    let (code, _) = https(&shop_ca, "api.example.com", "/", &[])?;
    assert_eq!(code, 60, "api.example.com served the shop certificate");
    // Host and path select the route: no route is 404, at the gateway.
    let (_, a) = https(&shop_ca, "shop.example.com", "/elsewhere", &[])?;
    assert_eq!(a[0].0, 404, "{a:?}");
    // A request on the shop certificate's connection for the api host is
    // not routed to the api (its certificate was never shown): 421.
    let (_, a) = https(
        &shop_ca,
        "shop.example.com",
        "/v1/items",
        &["--http1.1", "-H", "Host: api.example.com:8443"],
    )?;
    assert_eq!(a[0].0, 421, "{a:?}");
    // The plain HTTP listener routes by Host too.
    let (_, a) = tb.curl(
        &client,
        &[
            "-H",
            "Host: shop.example.com",
            &format!("http://{gw_ip}:8080/cart/2"),
        ],
    )?;
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "shop", "{a:?}");

    // A Service that asks for it goes through its waypoint: the waypoint
    // saw the gateway's identity, the backend the waypoint's.
    let (code, a) = https(&shop_ca, "shop.example.com", "/reviews/1", &[])?;
    assert_eq!(code, 0, "{a:?}");
    assert_eq!(a[0].0, 200, "{a:?}");
    assert_eq!(json(&a[0].1)["server"], "shop", "{a:?}");
    let page = waypoint.metrics()?;
    let through = series_sum(
        &page,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/edge/sa/public-gw",
            ),
            ("destination_service_name", "reviews"),
            ("response_code", "200"),
        ],
    )?;
    assert!(through >= 1.0, "{page}");
    let page = tb.agent(0).metrics()?;
    let from_waypoint = series_sum(
        &page,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "spiffe://cluster.local/ns/edge/sa/wp"),
            ("destination_workload", "shop"),
        ],
    )?;
    assert!(from_waypoint >= 1.0, "{page}");

    // A path denied at the gateway.
    let (_, a) = https(&shop_ca, "shop.example.com", "/cart/admin/x", &[])?;
    assert_eq!(a[0].0, 403, "{a:?}");
    assert_eq!(a[0].1, "RBAC: access denied", "{a:?}");

    // The backends were reached over HBONE with the gateway's identity.
    let gw_id = "spiffe://cluster.local/ns/edge/sa/public-gw";
    let page = tb.agent(0).metrics()?;
    for backend in ["shop", "api"] {
        let n = series_sum(
            &page,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", gw_id),
                ("destination_workload", backend),
                ("connection_security_policy", "mutual_tls"),
            ],
        )?;
        assert!(n >= 1.0, "{backend} saw no connection from {gw_id}: {page}");
    }
    let page = gateway.metrics()?;
    let requests = |service: &str, code: &str| {
        series_sum_or_absent(
            &page,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service_name", service),
                ("response_code", code),
            ],
        )
    };
    assert!(requests("shop", "200")? >= 2.0, "{page}");
    assert!(requests("api", "200")? >= 1.0, "{page}");
    let counted = |page: &str, result: &str| {
        series_sum_or_absent(
            page,
            "mesh_proxy_connections_total",
            &[("direction", "ingress"), ("result", result)],
        )
    };
    assert!(counted(&page, "request_denied")? >= 1.0, "{page}");
    assert!(counted(&page, "misdirected")? >= 1.0, "{page}");

    // Rotation: a new certificate in the Secret is served from the next
    // handshake on, by the same process.
    let (rotated, rotated_pem) = secret("shop-cert", "shop.example.com")?;
    let rotated_ca = write_pem("shop-rotated.pem", &rotated_pem)?;
    let i = docs
        .iter()
        .position(|d| d.contains("metadata: {name: shop-cert"))
        .expect("the shop Secret");
    docs[i] = rotated + "\n";
    tb.write_config(&docs)?;
    wait_until(10, "the rotated certificate is not served", || {
        let (code, a) = https(&rotated_ca, "shop.example.com", "/cart/3", &[])?;
        Ok((code != 0 || a[0].0 != 200).then(|| {
            let log = gateway.log_text();
            let tail = &log[log.len().saturating_sub(4000)..];
            format!("curl {code}: {a:?}; gateway log:\n{tail}")
        }))
    })?;
    let (code, _) = https(&shop_ca, "shop.example.com", "/cart/3", &[])?;
    assert_eq!(code, 60, "the old certificate is still served");
    assert!(
        Path::new(&format!("/proc/{}", gateway.pid())).exists(),
        "the gateway restarted"
    );

    // Bad input. An unknown name and no name (an IP address sends no SNI)
    // end in a TLS alert (curl 35).
    let (code, _) = https(&rotated_ca, "other.example.com", "/", &["-k"])?;
    assert_eq!(code, 35);
    let (code, _) = tb.curl(&client, &["-k", &format!("https://{gw_ip}:8443/")])?;
    assert_eq!(code, 35);
    // Bytes that are not TLS: a decode_error alert.
    let f = tb.workdir().join("not-tls");
    std::fs::write(&f, b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")?;
    let r = tb.run_app(
        &client,
        &[
            "raw",
            &format!("{gw_ip}:8443"),
            f.to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(r["hex"], "15030300020232", "{r}");
    // Malformed HTTP inside TLS: 400 from the gateway.
    let (_, a) = https(
        &rotated_ca,
        "shop.example.com",
        "/cart",
        &["--http1.1", "-X", "G T"],
    )?;
    assert_eq!(a[0].0, 400, "{a:?}");
    wait_until(5, "the refusals are not all counted", || {
        let page = gateway.metrics()?;
        for result in [
            "tls_unknown_sni",
            "tls_no_sni",
            "tls_malformed",
            "http_error",
        ] {
            if counted(&page, result)? < 1.0 {
                return Ok(Some(format!("no {result}: {page}")));
            }
        }
        Ok(None)
    })?;
    // And the gateway serves on.
    let (code, a) = https(&rotated_ca, "shop.example.com", "/cart/4", &[])?;
    assert_eq!(code, 0, "{a:?}");
    assert_eq!(a[0].0, 200, "{a:?}");
    Ok(())
}
