//! Connection records: the metric series and the access log line.

use super::*;
use crate::metrics::{encode, proxy_registry};

fn pod(namespace: &str, name: &str) -> Peer {
    Peer {
        workload: Some(Arc::new(Workload {
            node: "node".into(),
            uid: name.to_owned(),
            ..Workload::for_tests(namespace, name)
        })),
        ..Peer::default()
    }
}

/// The `*_workload` labels name the owner workload, as Kiali reads
/// them, with the canonical service and revision labels first.
#[test]
fn workload_labels_name_the_owner_and_canonical_labels_come_first() {
    let mut p = pod("shop", "reviews-v1-5f7d9c6b8-abcde");
    let mut wl = (**p.workload.as_ref().unwrap()).clone();
    wl.owner = Some("reviews-v1".into());
    wl.labels = [
        ("app", "reviews"),
        ("version", "v1"),
        ("service.istio.io/canonical-name", "reviews-canonical"),
        ("service.istio.io/canonical-revision", "1.2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect::<std::collections::BTreeMap<_, _>>()
    .into();
    p.workload = Some(Arc::new(wl));
    let l = labels(
        "Kubernetes",
        "source",
        &p,
        &pod("shop", "db"),
        None,
        Security::MutualTls,
    );
    assert_eq!(l.source_workload, "reviews-v1");
    assert_eq!(l.source_canonical_service, "reviews-canonical");
    assert_eq!(l.source_canonical_revision, "1.2");
    assert_eq!(
        l.destination_workload, "db",
        "a bare pod is its own workload"
    );
}

fn connection(metrics: &Arc<Metrics>, src: Peer, dst: Peer, flags: &'static str) {
    let mut c = ConnRecord::new(
        metrics.clone(),
        "outbound",
        "source",
        src,
        dst,
        None,
        Security::MutualTls,
    );
    c.open();
    c.close(flags, Outcome::default());
}

/// The `istio_tcp_connections_opened` lines naming a workload.
fn lines_with(page: &str, workload: &str) -> usize {
    page.lines()
        .filter(|l| l.starts_with("istio_tcp_"))
        .filter(|l| l.contains(&format!("_workload=\"{workload}\"")))
        .count()
}

#[test]
fn a_released_pods_series_leave_the_metrics_page() {
    let metrics = Arc::new(Metrics::default());
    let registry = proxy_registry(&metrics);
    connection(&metrics, pod("shop", "web-1"), pod("shop", "db-1"), "-");
    connection(
        &metrics,
        pod("shop", "web-1"),
        pod("shop", "db-1"),
        "CONNECT",
    );
    connection(&metrics, pod("shop", "api-1"), pod("shop", "web-1"), "-");
    connection(&metrics, pod("shop", "api-1"), pod("shop", "db-1"), "-");
    let page = encode(&registry);
    // As source: opened, sent and received once (both opened unflagged,
    // as ztunnel), closed twice (`-` and `CONNECT`), failed once; as
    // destination: four lines.
    assert_eq!(lines_with(&page, "web-1"), 10, "{page}");

    metrics.forget_workload("shop", "web-1");

    let page = encode(&registry);
    assert_eq!(lines_with(&page, "web-1"), 0, "{page}");
    assert_eq!(
        lines_with(&page, "api-1"),
        4,
        "what web-1 had no part in stays"
    );
    assert!(
        page.contains(
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"api-1\""
        ),
        "{page}"
    );
    // A pod of the same name in another namespace is not touched.
    connection(&metrics, pod("other", "web-1"), pod("shop", "db-1"), "-");
    metrics.forget_workload("shop", "web-1");
    assert_eq!(lines_with(&encode(&registry), "web-1"), 4);
}

/// Connections of one label set count on one series each family; one
/// still open when its pod is released counts its close afterwards, which
/// brings back that one line, and the next release takes it away again.
#[test]
fn connections_share_a_series_and_a_released_pods_late_close_is_forgotten_again() {
    let metrics = Arc::new(Metrics::default());
    let registry = proxy_registry(&metrics);
    let web = "source_workload=\"web-1\"";
    for _ in 0..3 {
        connection(&metrics, pod("shop", "web-1"), pod("shop", "db-1"), "-");
    }
    connection(&metrics, pod("shop", "web-1"), pod("shop", "db-1"), "DENY");
    let page = encode(&registry);
    let opened = "istio_tcp_connections_opened_total{";
    let closed = "istio_tcp_connections_closed_total{";
    let failed = "istio_tcp_connections_failed_total{";
    assert_eq!(value(&page, opened, &[web]), Some(4.0), "{page}");
    assert_eq!(
        value(&page, closed, &[web, "response_flags=\"-\""]),
        Some(3.0)
    );
    assert_eq!(
        value(&page, closed, &[web, "response_flags=\"DENY\""]),
        Some(1.0)
    );
    assert_eq!(value(&page, failed, &[web]), Some(1.0));

    let mut late = ConnRecord::new(
        metrics.clone(),
        "outbound",
        "source",
        pod("shop", "web-1"),
        pod("shop", "db-1"),
        None,
        Security::MutualTls,
    );
    late.open();
    metrics.forget_workload("shop", "web-1");
    assert_eq!(lines_with(&encode(&registry), "web-1"), 0);
    late.close("-", Outcome::default());
    let page = encode(&registry);
    assert_eq!(lines_with(&page, "web-1"), 1, "{page}");
    assert_eq!(value(&page, closed, &[web]), Some(1.0), "{page}");
    metrics.forget_workload("shop", "web-1");
    assert_eq!(lines_with(&encode(&registry), "web-1"), 0);
    // A new connection starts the series afresh.
    connection(&metrics, pod("shop", "web-1"), pod("shop", "db-1"), "-");
    let page = encode(&registry);
    assert_eq!(value(&page, opened, &[web]), Some(1.0), "{page}");
}

fn metered_pod(namespace: &str, name: &str, ip: &str) -> Peer {
    let mut p = pod(namespace, name);
    let mut wl = (**p.workload.as_ref().unwrap()).clone();
    wl.service_account = name.into();
    wl.owner = Some(format!("{name}-deploy").into());
    p.workload = Some(Arc::new(wl));
    p.addr = Some(ip.parse().unwrap());
    p.identity = Some(Identity::new("cluster.local", namespace, name));
    p
}

/// The value of the one line of `page` that starts with `series` (a name
/// and the start of its labels) and contains every `needle`.
fn value(page: &str, series: &str, needles: &[&str]) -> Option<f64> {
    let mut found = page
        .lines()
        .filter(|l| l.starts_with(series) && needles.iter().all(|n| l.contains(n)));
    let line = found.next()?;
    assert!(found.next().is_none(), "more than one {series} {needles:?}");
    line.rsplit(' ').next()?.parse().ok()
}

/// The byte counters move while the connection lives (each copied chunk
/// is added at once), not when it closes.
#[tokio::test]
async fn bytes_are_counted_as_they_are_copied() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let metrics = Arc::new(Metrics::new("east"));
    let registry = proxy_registry(&metrics);
    let mut rec = ConnRecord::new(
        metrics.clone(),
        "outbound",
        "source",
        metered_pod("shop", "web", "10.0.0.1:40000"),
        metered_pod("shop", "db", "10.0.0.2:5432"),
        None,
        Security::MutualTls,
    );
    let (app, agent) = tokio::io::duplex(1024);
    let mut client = rec.counted(agent);
    let mut app = app;
    app.write_all(&[0; 300]).await.unwrap();
    let mut buf = [0; 300];
    client.read_exact(&mut buf).await.unwrap();
    client.write_all(&[1; 120]).await.unwrap();
    app.read_exact(&mut buf[..120]).await.unwrap();

    let page = encode(&registry);
    let web = "source_workload=\"web-deploy\"";
    assert_eq!(
        value(&page, "istio_tcp_received_bytes_total{", &[web]),
        Some(300.0),
        "{page}"
    );
    assert_eq!(
        value(&page, "istio_tcp_sent_bytes_total{", &[web]),
        Some(120.0),
        "{page}"
    );
    assert_eq!(
        value(&page, "istio_tcp_connections_closed_total{", &[web]),
        None
    );
    // The cluster labels name --cluster-id.
    assert!(
        page.contains("source_cluster=\"east\"") && page.contains("destination_cluster=\"east\""),
        "{page}"
    );

    rec.close(
        "-",
        Outcome {
            request_bytes: client.read,
            response_bytes: client.written,
            error: None,
        },
    );
    let page = encode(&registry);
    // Closing adds nothing more: the bytes were counted once.
    assert_eq!(
        value(&page, "istio_tcp_received_bytes_total{", &[web]),
        Some(300.0)
    );
    assert_eq!(
        value(&page, "istio_tcp_connections_closed_total{", &[web]),
        Some(1.0)
    );
}

/// `istio_tcp_connections_failed` counts what ztunnel counts: refusals
/// and connections that never reached their destination, not a
/// connection that ended normally; the opened series stays unflagged.
#[test]
fn failures_are_counted_by_their_flags() {
    let metrics = Arc::new(Metrics::default());
    let registry = proxy_registry(&metrics);
    for flags in ["-", "DENY", "CONNECT", "IDENTITY_ERROR", "TLS_FAILURE", "-"] {
        connection(&metrics, pod("shop", "web"), pod("shop", "db"), flags);
    }
    let page = encode(&registry);
    let failed = |flags: &str| {
        value(
            &page,
            "istio_tcp_connections_failed_total{",
            &[&format!("response_flags=\"{flags}\"")],
        )
    };
    assert_eq!(failed("-"), None, "{page}");
    for flags in ["DENY", "CONNECT", "IDENTITY_ERROR", "TLS_FAILURE"] {
        assert_eq!(failed(flags), Some(1.0), "{flags}: {page}");
    }
    assert_eq!(
        value(
            &page,
            "istio_tcp_connections_opened_total{",
            &["response_flags=\"-\""]
        ),
        Some(6.0),
        "{page}"
    );
    assert_eq!(
        value(
            &page,
            "istio_tcp_connections_closed_total{",
            &["response_flags=\"-\""]
        ),
        Some(2.0)
    );
    // The default cluster is Istio's.
    assert!(page.contains("source_cluster=\"Kubernetes\""), "{page}");
}

/// Principals as ztunnel sets them: the source's only over mutual TLS,
/// the destination's from its workload either way.
#[test]
fn the_source_principal_is_known_only_over_mutual_tls() {
    let (src, dst) = (
        metered_pod("shop", "web", "10.0.0.1:1"),
        metered_pod("shop", "db", "10.0.0.2:2"),
    );
    let mtls = labels(
        "Kubernetes",
        "source",
        &src,
        &dst,
        None,
        Security::MutualTls,
    );
    assert_eq!(
        mtls.source_principal,
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        mtls.destination_principal,
        "spiffe://cluster.local/ns/shop/sa/db"
    );
    let plain = labels("Kubernetes", "source", &src, &dst, None, Security::Unknown);
    assert_eq!(plain.source_principal, "unknown");
    assert_eq!(
        plain.destination_principal,
        "spiffe://cluster.local/ns/shop/sa/db"
    );
    assert_eq!(plain.connection_security_policy, "unknown");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines `f` logs, in the agent's plain or JSON format (without the
/// time), the duration (which the clock decides) replaced by `Nms`.
fn logged(json: bool, f: impl FnOnce()) -> Vec<String> {
    let buf = Buf::default();
    let out = buf.clone();
    let fmt = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_ansi(false)
        .without_time();
    if json {
        tracing::subscriber::with_default(fmt.json().finish(), f);
    } else {
        tracing::subscriber::with_default(fmt.finish(), f);
    }
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let duration = regex_lite::Regex::new(r"\b\d+ms\b").unwrap();
    text.lines()
        .map(|l| duration.replace_all(l, "Nms").into_owned())
        .collect()
}

/// An HBONE connection as the source's agent records it, and one refused
/// in plaintext at the destination.
fn two_connections() {
    let metrics = Arc::new(Metrics::default());
    let mut rec = ConnRecord::new(
        metrics.clone(),
        "outbound",
        "source",
        metered_pod("shop", "web", "10.0.0.1:40000"),
        Peer::default(),
        None,
        Security::Unknown,
    );
    rec.set_destination(
        metered_pod("shop", "db", "10.0.0.2:5432"),
        Some(&Service {
            name: "db".into(),
            namespace: "shop".into(),
            vips: Vec::new(),
            ports: Vec::new(),
            selector: Default::default(),
            entry: None,
            subject_alt_names: Vec::new(),
        }),
        Security::MutualTls,
    );
    rec.set_hbone(
        "10.0.0.2:15008".parse().unwrap(),
        "10.0.0.2:5432".parse().unwrap(),
    );
    rec.close(
        "-",
        Outcome {
            request_bytes: 300,
            response_bytes: 120,
            error: None,
        },
    );
    let mut src = metered_pod("other", "plain", "10.0.9.2:33000");
    src.identity = None;
    let rec = ConnRecord::new(
        metrics,
        "inbound",
        "destination",
        src,
        metered_pod("shop", "db", "10.0.0.2:5432"),
        None,
        Security::Unknown,
    );
    rec.close(
        "DENY",
        Outcome::error("PeerAuthentication STRICT: plaintext is refused"),
    );
}

#[test]
fn access_log_lines_carry_ztunnels_fields() {
    assert_eq!(
        logged(false, two_connections),
        [
            " INFO access: connection complete src.addr=10.0.0.1:40000 src.workload=web \
             src.namespace=shop src.identity=spiffe://cluster.local/ns/shop/sa/web \
             src.cluster=Kubernetes dst.addr=10.0.0.2:15008 dst.hbone_addr=10.0.0.2:5432 \
             dst.service=db.shop.svc.cluster.local dst.workload=db dst.namespace=shop \
             dst.identity=spiffe://cluster.local/ns/shop/sa/db dst.cluster=Kubernetes \
             direction=\"outbound\" bytes_sent=300 bytes_recv=120 duration=Nms flags=\"-\"",
            "ERROR access: connection complete src.addr=10.0.9.2:33000 src.workload=plain \
             src.namespace=other src.cluster=Kubernetes dst.addr=10.0.0.2:5432 \
             dst.workload=db dst.namespace=shop dst.cluster=Kubernetes \
             direction=\"inbound\" bytes_sent=0 bytes_recv=0 duration=Nms flags=\"DENY\" \
             error=\"PeerAuthentication STRICT: plaintext is refused\"",
        ]
    );
}

#[test]
fn access_log_lines_in_json() {
    assert_eq!(
        logged(true, two_connections),
        [
            r#"{"level":"INFO","fields":{"message":"connection complete","src.addr":"10.0.0.1:40000","src.workload":"web","src.namespace":"shop","src.identity":"spiffe://cluster.local/ns/shop/sa/web","src.cluster":"Kubernetes","dst.addr":"10.0.0.2:15008","dst.hbone_addr":"10.0.0.2:5432","dst.service":"db.shop.svc.cluster.local","dst.workload":"db","dst.namespace":"shop","dst.identity":"spiffe://cluster.local/ns/shop/sa/db","dst.cluster":"Kubernetes","direction":"outbound","bytes_sent":300,"bytes_recv":120,"duration":"Nms","flags":"-"},"target":"access"}"#,
            r#"{"level":"ERROR","fields":{"message":"connection complete","src.addr":"10.0.9.2:33000","src.workload":"plain","src.namespace":"other","src.cluster":"Kubernetes","dst.addr":"10.0.0.2:5432","dst.workload":"db","dst.namespace":"shop","dst.cluster":"Kubernetes","direction":"inbound","bytes_sent":0,"bytes_recv":0,"duration":"Nms","flags":"DENY","error":"PeerAuthentication STRICT: plaintext is refused"},"target":"access"}"#,
        ]
    );
}

/// A connection refused before it could be recorded: one WARN line, no
/// series.
#[test]
fn an_early_refusal_is_a_warning_and_no_series() {
    let metrics = Arc::new(Metrics::default());
    let registry = proxy_registry(&metrics);
    let lines = logged(false, || {
        early_deny(
            "outbound",
            "10.0.0.1:40000".parse().unwrap(),
            "10.96.0.10:80".parse().unwrap(),
            "service 10.96.0.10:80 has no endpoints",
        );
    });
    assert_eq!(
        lines,
        [
            " WARN access: connection failed src.addr=10.0.0.1:40000 dst.addr=10.96.0.10:80 \
          direction=\"outbound\" error=\"service 10.96.0.10:80 has no endpoints\""
        ]
    );
    assert!(!encode(&registry).contains("istio_tcp_connections_opened_total{"));
}

/// What counting bytes as they are copied costs: the same 1 GiB read
/// through a metered and an unmetered [`Counted`], alternated 11 times,
/// the best of each kept (the least disturbed by whatever else runs). A
/// measurement, run by hand on the release build:
/// `cargo test --release -p mesh-agent --bin mesh-agent copy_cost -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn copy_cost_of_live_byte_counters() {
    use tokio::io::AsyncWriteExt as _;
    const TOTAL: usize = 1 << 30;
    let metrics = Arc::new(Metrics::default());
    let mut rec = ConnRecord::new(
        metrics,
        "outbound",
        "source",
        pod("shop", "web"),
        pod("shop", "db"),
        None,
        Security::MutualTls,
    );
    rec.open();
    let meters = rec.meters.clone();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..11 {
        for (i, m) in [None, meters.clone()].into_iter().enumerate() {
            let (mut tx, rx) = tokio::io::duplex(COPY_CHUNK);
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; COPY_CHUNK];
                for _ in 0..TOTAL / COPY_CHUNK {
                    tx.write_all(&chunk).await.unwrap();
                }
            });
            let mut counted = Counted::metered(rx, m);
            let start = Instant::now();
            tokio::io::copy(&mut counted, &mut tokio::io::sink())
                .await
                .unwrap();
            rates[i].push(TOTAL as f64 / start.elapsed().as_secs_f64() / 1e9);
            writer.await.unwrap();
            assert_eq!(counted.read, TOTAL as u64);
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (plain, metered) = (best(&rates[0]), best(&rates[1]));
    println!(
        "GB/s, best of 11: unmetered {plain:.2}, metered {metered:.2} ({:+.1}%)",
        (metered / plain - 1.0) * 100.0
    );
}

const COPY_CHUNK: usize = 64 * 1024;

/// The label a connection's security gives: the source principal over
/// mutual TLS and over the same-node shortcut (the agent knows its own
/// pod), never in plaintext; the shortcut is told apart from both.
#[test]
fn the_source_principal_is_reported_when_the_source_is_authenticated() {
    let client = Identity::new("cluster.local", "shop", "client");
    let src = Peer {
        identity: Some(client.clone()),
        ..pod("shop", "client")
    };
    let dst = pod("shop", "db");
    let l = |security| labels("Kubernetes", "destination", &src, &dst, None, security);
    let mtls = l(Security::MutualTls);
    assert_eq!(
        (
            mtls.source_principal.as_str(),
            mtls.connection_security_policy
        ),
        (client.to_string().as_str(), "mutual_tls")
    );
    let local = l(Security::SameNode);
    assert_eq!(
        (
            local.source_principal.as_str(),
            local.connection_security_policy
        ),
        (client.to_string().as_str(), "same_node")
    );
    let plain = l(Security::Unknown);
    assert_eq!(
        (
            plain.source_principal.as_str(),
            plain.connection_security_policy
        ),
        ("unknown", "unknown")
    );
}

/// What a connection's record costs from open to close: its label set,
/// its series and its counts (no log subscriber here, so the access log
/// line is not written). One label set, as a busy pair of pods; the best
/// of 5 rounds. A measurement, run by hand on the release build:
/// `cargo test --release -p mesh-agent --bin mesh-agent record_cost -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn record_cost_per_connection() {
    const N: u32 = 200_000;
    let metrics = Arc::new(Metrics::new("east"));
    let src = metered_pod("shop", "web", "10.0.0.1:40000");
    let dst = metered_pod("shop", "db", "10.0.0.2:5432");
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..N {
            let mut rec = ConnRecord::new(
                metrics.clone(),
                "outbound",
                "source",
                src.clone(),
                dst.clone(),
                None,
                Security::MutualTls,
            );
            rec.open();
            rec.close("-", Outcome::default());
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e9 / f64::from(N));
    }
    println!("ns per connection record, best of 5 rounds of {N}: {best:.0}");
}
