//! The demo's egress part: namespace `shop` set to REGISTRY_ONLY, a pod's
//! HTTPS call to a server outside the mesh refused, then allowed once a
//! ServiceEntry registers it, the TLS verified end to end by the client.
//! Every claim it prints is checked.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mesh_tests::{Pod, Testbed, metrics::series_sum_or_absent};

const HOST: &str = "api.external.example";
const VIP: &str = "10.97.0.10";
const PORT: u16 = 8443;

fn service_entry(external: &Pod) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api, namespace: shop}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: https, protocol: TLS, targetPort: {PORT}}}]
  endpoints: [{{address: \"{}\"}}]
",
        external.ip4
    )
}

/// curl in `pod`: Ok(body) when the HTTPS call succeeded.
fn curl(
    tb: &Testbed,
    pod: &Pod,
    cacert: &Path,
    url: &str,
    resolve: &str,
) -> anyhow::Result<String> {
    let cacert = cacert.display().to_string();
    tb.run_in_pod(
        pod,
        Path::new("/usr/bin/curl"),
        &[
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            &cacert,
            "--resolve",
            resolve,
            url,
        ],
    )
}

pub fn run(tb: &mut Testbed, docs: Vec<String>, frontend: &Pod) -> anyhow::Result<()> {
    println!("\nEgress: namespace shop annotated mesh-agent/outbound-traffic-policy=REGISTRY_ONLY");
    let external = tb.add_pod(0, "external")?;
    // A certificate for the external host, and an HTTPS server (openssl
    // s_server) in a network namespace no configuration lists.
    let dir = tb.workdir().join("egress");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    mesh_tests::sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={HOST}"),
            "-addext",
            &format!("subjectAltName=DNS:{HOST}"),
            "-keyout",
            &key.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ],
    )
    .context("making the external server's certificate")?;
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    tb.spawn_in(
        &external.netns,
        &external.cgroup,
        Path::new("/usr/bin/openssl"),
        &[
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &PORT.to_string(),
            "-cert",
            &cert_s,
            "-key",
            &key_s,
        ],
    )?;
    println!(
        "  external {} (a network namespace outside the mesh): HTTPS on :{PORT} for {HOST}",
        external.ip4
    );

    let mut restricted = docs.clone();
    restricted[0] = restricted[0].replacen(
        "metadata:\n  name: shop",
        "metadata:\n  name: shop\n  annotations:\n    mesh-agent/outbound-traffic-policy: REGISTRY_ONLY",
        1,
    );
    tb.apply_config(&restricted, |dump| dump.contains("REGISTRY_ONLY"))?;

    // The server is up once it answers in its own network namespace.
    let direct = format!("{HOST}:{PORT}:{}", external.ip4);
    let url_direct = format!("https://{HOST}:{PORT}/");
    let up = Instant::now();
    let local = format!("https://127.0.0.1:{PORT}/");
    while tb
        .run_in_pod(
            &external,
            Path::new("/usr/bin/curl"),
            &["-sk", "-o", "/dev/null", "--max-time", "1", &local],
        )
        .is_err()
    {
        ensure!(
            up.elapsed() < Duration::from_secs(10),
            "the external server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let page = tb.agent(0).metrics()?;
    let blackholed = |page: &str| {
        series_sum_or_absent(
            page,
            "istio_tcp_connections_failed_total",
            &[
                ("destination_service", "BlackHoleCluster"),
                ("response_flags", "NR"),
            ],
        )
    };
    let before = blackholed(&page)?;
    let mark = super::log_mark(tb);
    let r = curl(tb, frontend, &cert, &url_direct, &direct);
    println!(
        "  6. shop/frontend -> https://{HOST}:{PORT} at {}: no ServiceEntry",
        external.ip4
    );
    ensure!(r.is_err(), "6: the call was not refused: {r:?}");
    let why = super::access_since(tb, mark, "error=", "flags=\"NR\"").unwrap_or_default();
    println!("     REFUSED by frontend's agent: {why}");
    let after = blackholed(&tb.agent(0).metrics()?)?;
    println!(
        "     istio_tcp_connections_failed_total{{destination_service=\"BlackHoleCluster\",response_flags=\"NR\"}} {before} -> {after}"
    );
    ensure!(
        why.contains("REGISTRY_ONLY") && after == before + 1.0,
        "6: the refusal was not recorded as BlackHoleCluster/NR"
    );

    let mut registered = restricted.clone();
    registered.push(service_entry(&external));
    tb.apply_config(&registered, |dump| dump.contains(HOST))?;
    println!(
        "  ServiceEntry external-api added: {HOST} at {VIP}:443 -> {}:{PORT}",
        external.ip4
    );
    let mark = super::log_mark(tb);
    let body = curl(
        tb,
        frontend,
        &cert,
        &format!("https://{HOST}/"),
        &format!("{HOST}:443:{VIP}"),
    )
    .context("7: the HTTPS call through the ServiceEntry failed")?;
    println!(
        "  7. shop/frontend -> https://{HOST}/ ({VIP}:443): allowed, the server's certificate verified by curl"
    );
    ensure!(body.contains("s_server"), "7: unexpected answer: {body}");
    let service = super::access_since(tb, mark, "dst.service=", HOST).unwrap_or_default();
    let dst = super::access_since(tb, mark, "dst.addr=", HOST).unwrap_or_default();
    println!(
        "     frontend's agent logged dst.service={service} dst.addr={dst} (plain TCP: no HBONE outside the mesh)"
    );
    ensure!(
        service == HOST && dst == SocketAddr::new(external.ip4, PORT).to_string(),
        "7: the access log named {service:?} at {dst:?}"
    );
    // The rest of the demo runs as before.
    tb.apply_config(&docs, |dump| {
        !dump.contains(HOST) && !dump.contains("REGISTRY_ONLY")
    })?;
    Ok(())
}
