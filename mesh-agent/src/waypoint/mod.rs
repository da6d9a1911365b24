//! `mesh-agent waypoint`: the L7 proxy of the mesh. It runs as a pod of
//! its own (not captured), with its own SPIFFE identity. Node agents send
//! it the traffic of the Services and pods bound to it over HBONE, with
//! the original destination as the CONNECT authority; it authorizes each
//! request (AuthorizationPolicy with `targetRefs`, full L7 semantics),
//! routes it (HTTPRoute), and sends it on over HBONE to the chosen
//! endpoint with its own identity.
//!
//! `mesh-agent gateway` is the same proxy in the ingress role
//! (`ingress.rs`): it serves its ingress Gateway's HTTP and HTTPS
//! listeners to clients outside the mesh and sends their requests into the
//! mesh by the HTTPRoutes attached to that Gateway.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tracing::{Instrument as _, info, info_span, warn};

use crate::{
    config::WaypointArgs,
    identity::{CertManager, Identity},
    metrics::Metrics,
    proxy::{Balancer, Pool},
    state::{IngressGateway, Service, Store, Waypoint, Workload},
};

mod balance;
mod http;
mod ingress;
mod origination;
#[cfg(test)]
mod origination_tests;
mod path;
mod ratelimit;
mod resilience;
mod serve;
mod status;
#[cfg(test)]
mod status_tests;
mod telemetry;
pub(crate) mod trace;
mod upstream;

/// The role the proxy runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A waypoint: HBONE from the mesh.
    Waypoint,
    /// An ingress gateway: its Gateway's listeners, from outside the mesh.
    Ingress,
}

/// What every connection of the waypoint shares.
pub struct Ctx {
    pub mode: Mode,
    pub store: watch::Receiver<Arc<Store>>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub requests: telemetry::RequestMetrics,
    pub pool: Pool,
    pub balancer: Balancer,
    /// Requests in flight per endpoint (`LEAST_REQUEST`).
    pub in_flight: balance::InFlight,
    /// DestinationRule `connectionPool` caps and `outlierDetection`.
    pub limits: resilience::Limits,
    pub outliers: resilience::Outliers,
    /// LocalRateLimitPolicy buckets.
    pub rate_limiter: ratelimit::RateLimiter,
    pub tracer: trace::Tracer,
    pub clients: upstream::Clients,
    /// The waypoint's own pod (namespace, name).
    pub pod: (String, String),
    /// Picks among weighted backends.
    pub picks: std::sync::atomic::AtomicU64,
    /// `--cluster-id`: the cluster HBONE's `baggage` names.
    pub cluster_id: String,
    /// Originated TLS handshakes that failed, by host and reason.
    pub tls_failures: origination::Failures,
}

impl Ctx {
    pub fn store(&self) -> Arc<Store> {
        self.store.borrow().clone()
    }

    /// The waypoint's own pod, as the store knows it.
    pub fn me(&self, store: &Store) -> Option<Arc<Workload>> {
        store.workload(&self.pod.0, &self.pod.1).cloned()
    }

    /// The waypoint Gateway this pod belongs to.
    pub fn waypoint(&self, store: &Store) -> Option<Arc<Waypoint>> {
        store.waypoint_of_pod(&self.pod.0, &self.pod.1).cloned()
    }

    /// The ingress Gateway this pod belongs to.
    pub fn ingress(&self, store: &Store) -> Option<Arc<IngressGateway>> {
        store.ingress_of_pod(&self.pod.0, &self.pod.1).cloned()
    }

    /// Counts (and logs) an originated TLS connection that failed.
    pub fn count_tls_failure(&self, service: Option<&Service>, f: &origination::TlsFailure) {
        let service = service.map(Service::hostname).unwrap_or_default();
        warn!(%service, reason = f.reason, error = %f.detail, "TLS origination failed");
        self.tls_failures
            .get_or_create(&origination::FailureLabels {
                service,
                reason: f.reason.to_owned(),
            })
            .inc();
    }

    pub fn identity(&self, store: &Store) -> Option<Identity> {
        self.me(store)
            .map(|w| w.identity(self.certs.trust_domain()))
    }
}

pub async fn run(args: WaypointArgs, mode: Mode) -> anyhow::Result<()> {
    info!(
        ?mode,
        pod = %format!("{}/{}", args.pod_namespace, args.pod_name),
        listen = %args.listen,
        metrics = %args.metrics_addr,
        ready = %args.ready_addr,
        admin = %args.admin_addr,
        config = ?args.mesh.config,
        trust_domain = %args.mesh.trust_domain,
        cluster_id = %args.mesh.cluster_id,
        "starting waypoint"
    );
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    let hbone = match mode {
        Mode::Waypoint => Some(
            TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("--listen {}", args.listen))?,
        ),
        Mode::Ingress => None,
    };
    let admin_l = crate::admin::bind(args.admin_addr)
        .await
        .context("--admin-addr")?;
    let metrics_l = crate::admin::bind(args.metrics_addr)
        .await
        .context("--metrics-addr")?;
    let ready_l = crate::admin::bind(args.ready_addr)
        .await
        .context("--ready-addr")?;
    anyhow::ensure!(
        args.mesh.config.is_some() || args.mesh.kubernetes,
        "a waypoint needs its configuration: --config DIR or --kubernetes"
    );
    let metrics = Arc::new(Metrics::new(&args.mesh.cluster_id));
    let certs = CertManager::new(crate::ca_config(&args.mesh, &args.state_dir))?;
    certs.spawn_rotation();
    let client = if args.mesh.kubernetes {
        Some(
            kube::Client::try_default()
                .await
                .context("--kubernetes: no Kubernetes API configuration")?,
        )
    } else {
        None
    };
    // Both read the Secrets of their own namespace only: an ingress
    // gateway its listeners' certificates, a waypoint the CA certificates
    // a DestinationRule's `credentialName` names (without RBAC for them,
    // the kind is reported unavailable and such a rule refuses).
    let secrets = Some(args.pod_namespace.clone());
    let (store, _) = crate::start_store(&args.mesh, metrics.clone(), client.clone(), secrets);
    status::spawn(
        client,
        store.clone(),
        (args.pod_namespace.clone(), args.pod_name.clone()),
    );
    let ctx = Arc::new_cyclic(|weak| Ctx {
        mode,
        store,
        certs,
        metrics: metrics.clone(),
        requests: telemetry::RequestMetrics::default(),
        pool: Pool::default(),
        balancer: Balancer::default(),
        in_flight: balance::InFlight::default(),
        limits: resilience::Limits::default(),
        outliers: resilience::Outliers::default(),
        rate_limiter: ratelimit::RateLimiter::default(),
        tracer: trace::Tracer::start(&trace::TracingConfig {
            otlp: args.tracing_otlp.clone(),
            zipkin: args.tracing_zipkin.clone(),
            sampling: args.tracing_sampling.clamp(0.0, 100.0),
            service_name: match mode {
                Mode::Waypoint => format!("waypoint.{}", args.pod_namespace),
                Mode::Ingress => format!("gateway.{}", args.pod_namespace),
            },
        }),
        clients: upstream::Clients::new(weak.clone()),
        pod: (args.pod_namespace.clone(), args.pod_name.clone()),
        picks: std::sync::atomic::AtomicU64::new(0),
        cluster_id: args.mesh.cluster_id.clone(),
        tls_failures: origination::Failures::default(),
    });
    let mut registry = crate::metrics::proxy_registry(&metrics);
    ctx.requests.register(&mut registry);
    registry.register(
        "mesh_waypoint_spans_dropped",
        "Trace spans not exported, by reason (queue_full, export_failed)",
        ctx.tracer.dropped.clone(),
    );
    registry.register(
        "mesh_waypoint_rate_limited",
        "Requests refused by a LocalRateLimitPolicy, by policy and bucket",
        ctx.rate_limiter.limited.clone(),
    );
    registry.register(
        "mesh_waypoint_tls_origination_failures",
        "Connections to a destination with DestinationRule TLS origination refused because \
         the handshake failed, by host and reason (certificate, ca, config, handshake)",
        ctx.tls_failures.clone(),
    );
    registry.register(
        "mesh_waypoint_outlier_ejections",
        "Endpoints ejected by a DestinationRule's outlierDetection, by Service",
        ctx.outliers.ejections.clone(),
    );
    let admin = Arc::new(serve::Admin {
        ctx: ctx.clone(),
        registry,
    });
    tokio::spawn(serve::admin(admin_l, admin.clone(), true));
    tokio::spawn(serve::admin(metrics_l, admin.clone(), false));
    tokio::spawn(serve::admin(ready_l, admin, false));
    match hbone {
        Some(hbone) => {
            tokio::spawn(accept(hbone, ctx.clone()));
        }
        // Listener ports come from the Gateway, on --listen's address.
        None => {
            tokio::spawn(ingress::supervise(ctx.clone(), args.listen.ip()));
        }
    }
    tokio::spawn(prepare_certificate(ctx.clone()));
    tokio::spawn(crate::malloc::give_back());
    info!("waypoint serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("waypoint stopping");
    Ok(())
}

/// Gets the waypoint's own certificate as soon as the configuration names
/// its pod: from a cluster CA a connection cannot wait for one, and would
/// otherwise only be the first to ask.
async fn prepare_certificate(ctx: Arc<Ctx>) {
    let mut store = ctx.store.clone();
    loop {
        let snapshot = store.borrow_and_update().clone();
        if let Some(id) = ctx.identity(&snapshot)
            && let Err(e) = ctx.certs.prepare(&id).await
        {
            warn!(identity = %id, error = %e, "no certificate yet; retried in the background");
        }
        if store.changed().await.is_err() {
            return;
        }
    }
}

async fn accept(l: TcpListener, ctx: Arc<Ctx>) {
    // Bounded as a pod's 15008 is; back-pressure and back-off in the gate.
    let gate = crate::limit::Gate::new(crate::limit::HBONE, ctx.metrics.clone(), "waypoint");
    loop {
        let (stream, peer, admitted) = gate.accept(&l).await;
        let _ = stream.set_nodelay(true);
        let span = info_span!("waypoint", client = %peer);
        let serve = serve::connection(ctx.clone(), stream, peer);
        tokio::spawn(
            async move {
                serve.await;
                drop(admitted);
            }
            .instrument(span),
        );
    }
}

/// The SNI of a complete ClientHello (Some(None): none sent), as the
/// ingress gateway reads it; None for too few bytes or not a ClientHello.
#[cfg(test)]
pub(crate) fn read_hello(bytes: &[u8]) -> Option<Option<String>> {
    match ingress::sni_of(bytes) {
        ingress::Hello::Sni(name) => Some(name),
        ingress::Hello::Partial | ingress::Hello::Malformed => None,
    }
}

/// The TLS a DestinationRule originates to the endpoints of `target`.
fn origination_for(
    store: &Store,
    target: &crate::state::WaypointTarget,
) -> Option<origination::Origination> {
    let crate::state::WaypointTarget::Service(svc, port) = target else {
        return None;
    };
    let tls = store.destination_policy(svc)?.tls_for(port.port)?;
    Some(origination::Origination::new(tls.clone(), &svc.hostname()))
}

/// The client a request came from: the HBONE peer's address and identity
/// (none for a client outside the mesh, at an ingress gateway).
#[derive(Clone, Debug)]
pub struct Client {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
}
