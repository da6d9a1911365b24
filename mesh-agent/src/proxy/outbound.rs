//! Outbound (15001): connections the kernel redirected away from their
//! destination. The capture gives the original destination (a map entry
//! the kernel wrote, or the socket's pre-NAT address); without one, the
//! connection is refused, never guessed. Then: a destination bound to a
//! waypoint goes to a waypoint pod over HBONE with the original address as
//! the authority (or is refused when its waypoint cannot serve it: never
//! around it); a Service VIP picks an endpoint; a destination an ambient
//! data plane captures is reached over HBONE; anything else passes through
//! as plain TCP.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use mesh_common::AGENT_PORTS;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    PodCtx, WhenBulk,
    conn::{ConnRecord, Outcome, Peer, Security, early_deny},
    connect_in_pod,
    deliver::Refused,
    finish,
    hbone::{Caller, FIRST_BYTES, HboneError, Tunnel},
    same_node, splice,
};
use crate::{
    identity::Identity,
    inpod::sockets::Source,
    state::{
        Binding, Endpoint, Location, OutboundTrafficPolicy, Service, Store, Waypoint, Workload,
    },
};

/// The identities an endpoint of `service` may show besides its own: those
/// of its captured workloads reached directly (a waypoint proves its own
/// identity), and a ServiceEntry's `subjectAltNames`, as ztunnel accepts a
/// Service's SANs. Never anything outside the mesh's trust roots: the
/// handshake still checks the chain.
fn service_identities(
    service: &Service,
    candidates: &[Candidate],
    trust_domain: &str,
) -> Vec<Identity> {
    // Endpoints mostly share one ServiceAccount: deduplicated first.
    let accounts: std::collections::BTreeSet<(&str, &str)> = candidates
        .iter()
        .filter(|c| c.waypoint.is_none())
        .filter_map(|c| c.workload.as_deref())
        .filter(|w| w.captured)
        .map(|w| (&*w.namespace, &*w.service_account))
        .collect();
    let mut ids: Vec<Identity> = accounts
        .into_iter()
        .map(|(ns, sa)| Identity::new(trust_domain, ns, sa))
        .collect();
    for san in &service.subject_alt_names {
        if let Ok(id) = san.parse::<Identity>()
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

/// At most this many endpoints of a Service are tried for one connection.
const MAX_ATTEMPTS: usize = 3;

/// Where a connection may go, in the order to try.
struct Route {
    service: Option<Arc<Service>>,
    candidates: Vec<Candidate>,
    /// Bound to a waypoint that cannot serve it: why it is refused.
    refused: Option<String>,
    /// Outside the registry under REGISTRY_ONLY: refused.
    unregistered: bool,
    /// Names to resolve for more candidates (a ServiceEntry with
    /// resolution DNS), with the port to reach on what they resolve to.
    resolve: Vec<(String, u16)>,
}

struct Candidate {
    /// The CONNECT authority (or the plain TCP destination).
    addr: SocketAddr,
    workload: Option<Arc<Workload>>,
    /// A waypoint pod to send it through, instead of `workload` itself.
    waypoint: Option<Arc<Workload>>,
}

impl Candidate {
    /// Sent over HBONE: through a waypoint, or to a pod whose capture is
    /// installed ([`Workload::hbone`]: in a cluster, the redirection
    /// annotation). A pod labelled for the mesh but not captured yet gets
    /// plain TCP: nothing there would answer on 15008.
    fn over_hbone(&self) -> bool {
        self.waypoint.is_some() || self.workload.as_ref().is_some_and(|w| w.hbone)
    }
}

/// A waypoint's pods in balancer order, each carrying the original
/// destination as the authority.
fn through_waypoint(
    pod: &PodCtx,
    wp: &Waypoint,
    dst: SocketAddr,
    service: Option<Arc<Service>>,
    workload: Option<Arc<Workload>>,
) -> Route {
    let endpoints: Vec<Endpoint> = wp
        .pods
        .iter()
        .filter_map(|w| {
            let ip = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .or(w.ips.first())?;
            Some(Endpoint {
                workload: Some(w.clone()),
                addr: SocketAddr::new(*ip, mesh_common::PORT_HBONE),
            })
        })
        .collect();
    let key = format!("waypoint {}", wp.key());
    let candidates = pod
        .shared
        .balancer
        .order(&key, &endpoints)
        .into_iter()
        .take(MAX_ATTEMPTS)
        .map(|e| Candidate {
            addr: dst,
            workload: workload.clone(),
            waypoint: e.workload,
        })
        .collect();
    Route {
        service,
        candidates,
        refused: None,
        unregistered: false,
        resolve: Vec::new(),
    }
}

fn refused(service: Option<Arc<Service>>, reason: &str) -> Route {
    Route {
        service,
        candidates: Vec::new(),
        refused: Some(reason.to_owned()),
        unregistered: false,
        resolve: Vec::new(),
    }
}

fn route(store: &Store, pod: &PodCtx, dst: SocketAddr, src: Option<&Workload>) -> Route {
    // A waypoint's own traffic is never sent back to it.
    let from_waypoint = |wp: &Waypoint| src.is_some_and(|s| wp.has_pod(s));
    if let Some((svc, port)) = store.service_by_vip(dst) {
        match store.service_binding(svc) {
            Some(Binding::Bound(wp)) if !from_waypoint(wp) => {
                return through_waypoint(pod, wp, dst, Some(svc.clone()), None);
            }
            Some(Binding::Refused { reason, .. }) => return refused(Some(svc.clone()), reason),
            _ => {}
        }
        // A Service whose endpoints the store does not know (no selector,
        // no EndpointSlices, a local configuration): pass it on to the VIP
        // unchanged.
        if store.has_endpoints_source(svc) {
            let endpoints: Vec<Endpoint> = store.endpoints(svc, port);
            let key = format!("{}:{}", svc.hostname(), port.port);
            let candidates = pod
                .shared
                .balancer
                .order(&key, &endpoints)
                .into_iter()
                .take(MAX_ATTEMPTS)
                .map(|e| Candidate {
                    addr: e.addr,
                    workload: e.workload,
                    waypoint: None,
                })
                .collect();
            return Route {
                service: Some(svc.clone()),
                candidates,
                refused: None,
                unregistered: false,
                resolve: store.dns_targets(svc, port),
            };
        }
    }
    let workload = store.workload_by_ip(dst.ip()).cloned();
    if let Some(wl) = &workload {
        match store.workload_binding(wl) {
            Some(Binding::Bound(wp)) if !from_waypoint(wp) => {
                return through_waypoint(pod, wp, dst, None, Some(wl.clone()));
            }
            Some(Binding::Refused { reason, .. }) => return refused(None, reason),
            _ => {}
        }
    }
    // What names the destination: a Service passed on to its VIP, or a
    // ServiceEntry listing this address.
    let service = store
        .service_by_vip(dst)
        .map(|(svc, _)| svc)
        .or_else(|| store.entry_by_endpoint(dst))
        .cloned();
    if service.is_none()
        && workload.is_none()
        && store.outbound_policy(src.map(|w| &*w.namespace)) == OutboundTrafficPolicy::RegistryOnly
    {
        return Route {
            service: None,
            candidates: Vec::new(),
            refused: None,
            unregistered: true,
            resolve: Vec::new(),
        };
    }
    Route {
        service,
        candidates: vec![Candidate {
            addr: dst,
            workload,
            waypoint: None,
        }],
        refused: None,
        unregistered: false,
        resolve: Vec::new(),
    }
}

/// How long a name of a DNS ServiceEntry may take to resolve.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The addresses `names` resolve to now (the system resolver, from the
/// agent's network namespace), of the destination's address family; a
/// loopback or unspecified answer is dropped: it would mean the pod itself.
/// The waypoint resolves a DNS entry's names the same way.
pub(crate) async fn resolve(names: &[(String, u16)], ipv4: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (host, port) in names {
        match tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), *port)),
        )
        .await
        {
            Ok(Ok(addrs)) => out.extend(addrs.filter(|a| {
                a.is_ipv4() == ipv4 && !a.ip().is_loopback() && !a.ip().is_unspecified()
            })),
            Ok(Err(e)) => debug!(%host, error = %e, "ServiceEntry name did not resolve"),
            Err(_) => debug!(%host, "ServiceEntry name took too long to resolve"),
        }
    }
    out
}

enum Upstream {
    Plain(TcpStream),
    Hbone(Tunnel),
    /// A pod of this agent, admitted in the process (`--same-node-plaintext`);
    /// boxed: it carries the destination's record.
    SameNode(Box<same_node::Delivery>),
}

pub async fn serve(pod: Arc<PodCtx>, mut client: TcpStream, peer: SocketAddr) {
    let metrics = pod.shared.metrics.clone();
    // Neither capture mode redirects loopback or the agent's ports: such a
    // destination means the connection was made to the listener itself.
    let Some(dst) = pod
        .shared
        .capture
        .outbound_dst(pod.netns.cookie(), &client, peer)
        .filter(|d| !d.ip().is_loopback() && !AGENT_PORTS.contains(&d.port()))
    else {
        metrics.connection("outbound", "no_original_destination");
        warn!(pod = %pod.name, client = %peer, "no original destination recorded for this connection; refusing it");
        return;
    };
    let client_addr = peer;
    let store = pod.shared.store();
    let src_workload = pod.workload(&store);
    let trust_domain = pod.shared.certs.trust_domain();
    let src_identity = src_workload.as_ref().map(|w| w.identity(trust_domain));
    // The app's own address rather than the loopback address it was
    // redirected through.
    let src_ip = pod
        .addresses
        .iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .copied()
        .unwrap_or(peer.ip());
    let src = Peer {
        addr: Some(SocketAddr::new(src_ip, peer.port())),
        workload: src_workload.clone(),
        identity: src_identity.clone(),
    };
    let mut route = route(&store, &pod, dst, src_workload.as_deref());
    // What the connection needs is taken; the snapshot is not held for its
    // whole life (configuration changes would pile up behind it).
    drop(store);
    let service = route.service.as_deref();
    let mut rec = ConnRecord::new(
        metrics.clone(),
        "outbound",
        "source",
        src,
        Peer {
            addr: Some(dst),
            ..Peer::default()
        },
        service,
        Security::Unknown,
    );
    // Refused before any endpoint is tried: as ztunnel, no `istio_tcp_*`
    // record, a WARN access log line and the agent's own counter.
    if let Some(reason) = &route.refused {
        // Fail closed: a destination bound to a waypoint is never reached
        // around it.
        metrics.connection("outbound", "no_waypoint");
        early_deny(
            "outbound",
            client_addr,
            dst,
            &format!("its waypoint cannot serve it: {reason}"),
        );
        return;
    }
    if route.unregistered {
        // Istio's BlackHoleCluster: recorded (Envoy's `NR`, no route, and
        // `destination_service="BlackHoleCluster"`), counted, logged.
        metrics.connection("outbound", "registry_only");
        let blackhole = Service {
            name: "BlackHoleCluster".into(),
            namespace: String::new(),
            vips: Vec::new(),
            ports: Vec::new(),
            selector: Default::default(),
            entry: Some(Location::MeshExternal),
            subject_alt_names: Vec::new(),
        };
        rec.set_destination(
            Peer {
                addr: Some(dst),
                ..Peer::default()
            },
            Some(&blackhole),
            Security::Unknown,
        );
        rec.close(
            "NR",
            Outcome::error(format!(
                "{dst} is not in the registry (no known workload, Service or ServiceEntry) \
                 and the outbound traffic policy is REGISTRY_ONLY"
            )),
        );
        return;
    }
    if !route.resolve.is_empty() && route.candidates.len() < MAX_ATTEMPTS {
        let found = resolve(&route.resolve, dst.is_ipv4()).await;
        let store = pod.shared.store();
        for addr in found {
            if route.candidates.len() >= MAX_ATTEMPTS {
                break;
            }
            if route.candidates.iter().any(|c| c.addr == addr) {
                continue;
            }
            route.candidates.push(Candidate {
                addr,
                workload: store.workload_by_ip(addr.ip()).cloned(),
                waypoint: None,
            });
        }
    }
    if route.candidates.is_empty() {
        metrics.connection("outbound", "no_endpoint");
        early_deny(
            "outbound",
            client_addr,
            dst,
            &format!("service {dst} has no endpoints"),
        );
        return;
    }
    // A Service's endpoints may show any of its workloads' identities, as
    // ztunnel accepts a Service's SANs (no waypoint: a waypoint proves its
    // own identity).
    let service_identities = service
        .map(|s| service_identities(s, &route.candidates, trust_domain))
        .unwrap_or_default();
    // When every endpoint is reached over HBONE, what the app has already
    // sent goes with the CONNECT ([`Caller::first_bytes`]); read without
    // waiting, so a protocol whose server speaks first is not held up.
    // While a CONNECT awaits its answer, what the app sends then follows it
    // (`Caller::app`).
    let early =
        !pod.shared.same_node_plaintext && route.candidates.iter().all(Candidate::over_hbone);
    let mut first_bytes = if early {
        read_ahead(&mut client)
    } else {
        Bytes::new()
    };
    let mut last_error = String::new();
    let mut flags = "CONNECT";
    let mut upstream = None;
    for c in &route.candidates {
        // Through a waypoint: mTLS with the waypoint's identity, to its pod.
        let via = c.waypoint.as_ref().or(c.workload.as_ref());
        let meshed = c.over_hbone();
        let dst_identity = via.filter(|_| meshed).map(|w| w.identity(trust_domain));
        rec.set_destination(
            Peer {
                addr: Some(c.addr),
                workload: c.workload.clone(),
                // As ztunnel: a known destination's principal is reported
                // in plaintext too (the access log shows it only over mTLS).
                identity: dst_identity
                    .clone()
                    .or_else(|| c.workload.as_ref().map(|w| w.identity(trust_domain))),
            },
            service,
            Security::from(meshed),
        );
        let via_ip = match &c.waypoint {
            Some(w) => w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == c.addr.is_ipv4())
                .or(w.ips.first())
                .copied()
                .unwrap_or(c.addr.ip()),
            None => c.addr.ip(),
        };
        // A pod of this agent, with the option on: handed over in the
        // process, never over HBONE to the agent itself.
        let local = match (&c.waypoint, &c.workload, &dst_identity, &src_identity) {
            (None, Some(wl), Some(_), Some(_)) if pod.shared.same_node_plaintext => {
                same_node::target(&pod, &pod.shared.store(), c.addr, wl)
            }
            _ => None,
        };
        let attempt = match (&dst_identity, &src_identity, &src_workload) {
            (Some(dst_id), Some(src_id), Some(_)) if let Some((dst_pod, dst_wl)) = local => {
                rec.set_destination(
                    Peer {
                        addr: Some(c.addr),
                        workload: c.workload.clone(),
                        identity: Some(dst_id.clone()),
                    },
                    service,
                    Security::SameNode,
                );
                let peer = SocketAddr::new(src_ip, peer.port());
                same_node::admit(
                    dst_pod,
                    dst_wl,
                    dst_id.clone(),
                    peer,
                    src_id.clone(),
                    c.addr,
                    service,
                )
                .await
                .map(|d| Upstream::SameNode(Box::new(d)))
                .map_err(|e| match e {
                    Refused::Denied(e) => Attempt::Denied(e),
                    Refused::ConnectFailed(error) => Attempt::Failed {
                        error,
                        endpoint_fault: true,
                        flags: "CONNECT",
                    },
                })
            }
            (Some(dst_id), Some(src_id), Some(src_wl)) => {
                rec.set_hbone(SocketAddr::new(via_ip, mesh_common::PORT_HBONE), c.addr);
                let mut caller = Caller {
                    addr: SocketAddr::new(src_ip, peer.port()),
                    workload: src_wl,
                    service: service.map(Service::hostname),
                    cluster: &pod.shared.cluster_id,
                    service_identities: if c.waypoint.is_some() {
                        &[]
                    } else {
                        &service_identities
                    },
                    first_bytes: std::mem::take(&mut first_bytes),
                    app: early.then_some(&client),
                };
                let attempt = hbone(&pod, src_id, dst_id, via_ip, c.addr, &mut caller).await;
                // With what the app sent meanwhile: the next attempt sends
                // it all again, and the splice counts it.
                first_bytes = caller.first_bytes;
                attempt
            }
            (Some(_), _, _) => Err(Attempt::NoSource(
                "this pod is not in the configuration, so it has no identity for mTLS".into(),
            )),
            (None, _, _) => connect_in_pod(&pod, c.addr, Source::Pod)
                .await
                .map(Upstream::Plain)
                .map_err(|e| Attempt::Failed {
                    error: format!("connect to {}: {e}", c.addr),
                    endpoint_fault: true,
                    flags: "CONNECT",
                }),
        };
        match attempt {
            Ok(u) => {
                if service.is_some() && c.waypoint.is_none() {
                    pod.shared.balancer.mark_up(c.addr);
                }
                upstream = Some(u);
                break;
            }
            Err(Attempt::Denied(e)) => {
                flags = "DENY";
                last_error = e;
                break;
            }
            Err(Attempt::NoSource(e)) => {
                // A meshed destination is never reached in plaintext, and no
                // other endpoint would fare better. As ztunnel refuses a
                // connection from a workload it does not know: no record.
                metrics.connection("outbound", "no_identity");
                early_deny("outbound", client_addr, dst, &e);
                reset_if_read(&client, &first_bytes);
                return;
            }
            Err(Attempt::Identity(e)) => {
                // No certificate to connect with: no endpoint fares better.
                flags = "IDENTITY_ERROR";
                last_error = e;
                break;
            }
            Err(Attempt::Failed {
                error,
                endpoint_fault,
                flags: f,
            }) => {
                flags = f;
                debug!(endpoint = %c.addr, %error, "upstream failed");
                if service.is_some() && endpoint_fault && c.waypoint.is_none() {
                    pod.shared.balancer.mark_down(c.addr);
                }
                last_error = error;
            }
        }
    }
    let Some(upstream) = upstream else {
        let result = match flags {
            "DENY" => "denied",
            "IDENTITY_ERROR" => "no_identity",
            _ => "connect_failed",
        };
        metrics.connection("outbound", result);
        rec.close(flags, Outcome::error(last_error));
        reset_if_read(&client, &first_bytes);
        return;
    };
    metrics.connection("outbound", "forwarded");
    match upstream {
        Upstream::Plain(mut s) => {
            let mut client = rec.counted(client);
            let end = splice(&mut client, &mut s, std::future::pending(), WhenBulk::Stay).await;
            finish(rec, &client, end, &pod);
        }
        Upstream::Hbone(tunnel) => {
            let mut client = rec.counted(client);
            // Sent with the CONNECT.
            client.count_read(first_bytes.len());
            let (mut io, _active) = tunnel.into_parts();
            let end = splice(&mut client, &mut io, std::future::pending(), WhenBulk::Stay).await;
            finish(rec, &client, end, &pod);
        }
        // Both records count the bytes; the destination's policy may
        // revoke it, as it would the tunnel.
        Upstream::SameNode(local) => local.splice(rec, client).await,
    }
}

/// What the app has sent and the socket holds now, up to [`FIRST_BYTES`];
/// nothing (and nothing taken) if it has sent nothing yet, has closed its
/// side, or the read fails: the splice reads on from where this stopped.
fn read_ahead(client: &mut TcpStream) -> Bytes {
    use std::io::Read as _;
    use tokio::io::{AsyncRead as _, ReadBuf};
    let mut buf = [0u8; FIRST_BYTES];
    // Through the runtime when it has seen the socket readable: a read that
    // leaves the socket empty then clears that, and the next read waits for
    // new bytes instead of finding none.
    let mut read = ReadBuf::new(&mut buf);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(&mut *client).poll_read(&mut cx, &mut read) {
        std::task::Poll::Ready(Ok(())) => return Bytes::copy_from_slice(read.filled()),
        std::task::Poll::Ready(Err(_)) => return Bytes::new(),
        std::task::Poll::Pending => {}
    }
    // Else straight from the (non-blocking) socket: a connection just
    // handed to its shard is registered there, and the shard's reactor has
    // not polled it yet, so the runtime would answer "not ready" without
    // looking.
    match (&*socket2::SockRef::from(&*client)).read(&mut buf) {
        Ok(n) => Bytes::copy_from_slice(&buf[..n]),
        Err(_) => Bytes::new(),
    }
}

/// A connection refused after [`read_ahead`] took bytes from it is reset,
/// as closing it with those bytes still unread would have reset it: the
/// app sees the same refusal either way, never a clean end.
fn reset_if_read(client: &TcpStream, first_bytes: &Bytes) {
    if !first_bytes.is_empty() {
        let _ = client.set_zero_linger();
    }
}

enum Attempt {
    /// The destination's policy said no: do not try another endpoint.
    Denied(String),
    /// The calling pod is not in the configuration: it has no identity.
    NoSource(String),
    /// No certificate for the pod's identity.
    Identity(String),
    /// This endpoint failed; `endpoint_fault` when the endpoint itself is at
    /// fault (unreachable, TLS failed, its app refused), which sets it aside.
    Failed {
        error: String,
        endpoint_fault: bool,
        /// ztunnel's `response_flags` for it.
        flags: &'static str,
    },
}

async fn hbone(
    pod: &PodCtx,
    src: &Identity,
    dst: &Identity,
    via: std::net::IpAddr,
    target: SocketAddr,
    caller: &mut Caller<'_>,
) -> Result<Upstream, Attempt> {
    match pod
        .pool
        .connect(pod.dialer(), src, dst, via, target, caller)
        .await
    {
        Ok(u) => Ok(Upstream::Hbone(u)),
        Err(e @ HboneError::Status { .. }) if e.is_denied() => Err(Attempt::Denied(e.to_string())),
        Err(e @ HboneError::Identity { .. }) => Err(Attempt::Identity(e.to_string())),
        Err(e) => Err(Attempt::Failed {
            endpoint_fault: e.is_endpoint_fault(),
            flags: e.response_flags(),
            error: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StoreOptions;

    /// A ServiceEntry's SPIFFE `subjectAltNames` join the identities its
    /// endpoints may show; a name that is not a SPIFFE ID is warned about
    /// and left out (which only narrows what is accepted).
    #[test]
    fn a_service_entrys_subject_alt_names_are_accepted_identities() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 443, name: tls, protocol: TLS}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.9.0.1}]
  subjectAltNames:
  - spiffe://cluster.local/ns/payments/sa/gateway
  - payments.example.com
";
        let opts = StoreOptions::for_tests();
        let store = Store::from_yaml(&[("t.yaml".into(), yaml.into())], &opts);
        let (svc, _) = store
            .service_by_vip("240.0.0.9:443".parse().unwrap())
            .expect("the entry's address");
        let ids = service_identities(svc, &[], "cluster.local");
        assert_eq!(
            ids,
            vec![Identity::new("cluster.local", "payments", "gateway")]
        );
        assert!(
            store.warnings().iter().any(|w| w
                .message
                .contains("\"payments.example.com\" is not a SPIFFE ID")),
            "{:?}",
            store.warnings()
        );
    }

    /// A DNS ServiceEntry's names resolve with the system resolver when a
    /// connection needs them: an address written as a name-like literal
    /// resolves to itself, a loopback answer (the pod itself) and a name
    /// that does not resolve give nothing, and the other family is left out.
    #[tokio::test]
    async fn dns_names_resolve_per_connection_without_loopback() {
        let names = [
            ("192.0.2.7".to_owned(), 443),
            ("2001:db8::7".to_owned(), 443),
            ("localhost".to_owned(), 443),
            ("no-such-host.invalid".to_owned(), 443),
        ];
        assert_eq!(
            resolve(&names, true).await,
            vec!["192.0.2.7:443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve(&names, false).await,
            vec!["[2001:db8::7]:443".parse::<SocketAddr>().unwrap()]
        );
    }

    /// The first bytes are taken without waiting (none yet: none taken),
    /// and leave the socket waiting for more; a connection refused after
    /// they were taken is reset, as it would have been with them unread,
    /// never ended cleanly.
    #[tokio::test]
    async fn a_refusal_after_reading_ahead_resets_the_app() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut agent, _) = listener.accept().await.unwrap();
        assert!(read_ahead(&mut agent).is_empty(), "nothing sent yet");
        app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let first = loop {
            agent.readable().await.unwrap();
            let first = read_ahead(&mut agent);
            if !first.is_empty() {
                break first;
            }
        };
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\n\r\n");
        // The socket no longer shows readable for bytes already taken: the
        // next read waits for new ones.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), agent.readable()).await;
        assert!(waited.is_err(), "readable with nothing left to read");
        reset_if_read(&agent, &first);
        drop(agent);
        let mut buf = [0u8; 16];
        let e = app.read(&mut buf).await.expect_err("a reset, not an end");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    }

    /// From the API: a labelled pod is sent plain TCP until its capture is
    /// installed (the redirection annotation), then HBONE; a waypoint
    /// always HBONE.
    #[test]
    fn hbone_only_to_a_destination_whose_capture_is_installed() {
        let pod = |annotations: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, annotations: {{{annotations}}}}}\n\
                 status: {{podIP: 10.1.0.5}}\n"
            )
        };
        let opts = StoreOptions {
            redirection_annotation: true,
            ..StoreOptions::for_tests()
        };
        let candidate = |yaml: String| {
            let store = Store::from_yaml(&[("api".into(), yaml)], &opts);
            let web = store.workload("shop", "web").cloned();
            assert!(web.as_ref().is_some_and(|w| w.captured), "labelled");
            Candidate {
                addr: "10.1.0.5:8080".parse().unwrap(),
                workload: web,
                waypoint: None,
            }
        };
        let pending = candidate(pod(""));
        assert!(!pending.over_hbone(), "not captured yet: plain TCP");
        let installed = candidate(pod("ambient.istio.io/redirection: enabled"));
        assert!(installed.over_hbone(), "captured: HBONE");
        let via_waypoint = Candidate {
            waypoint: installed.workload.clone(),
            ..pending
        };
        assert!(via_waypoint.over_hbone(), "through a waypoint: HBONE");
        let unknown = Candidate {
            addr: "192.0.2.1:80".parse().unwrap(),
            workload: None,
            waypoint: None,
        };
        assert!(!unknown.over_hbone(), "outside the mesh: plain TCP");
    }
}
