//! The CA's side of the Kubernetes API: who a ServiceAccount token belongs to
//! (TokenReview), which node its caller runs on, whether a pod with the
//! identity asked for runs on that node, which waypoint pod a waypoint's
//! token is bound to, and the root's ConfigMap.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use hyper::StatusCode;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    core::v1::{ConfigMap, Pod},
};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use tracing::{info, warn};

use super::{CaServer, ROOT_KEY, Refusal};
use crate::identity::Identity;

/// Publishing the root: the first retry, doubling up to the last.
const PUBLISH_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Bound ServiceAccount tokens (Kubernetes >= 1.30) name their node here...
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// ... and always their pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A claim of a bound token (`extra` of its TokenReview), if set.
fn claim(user: &UserInfo, key: &str) -> Option<String> {
    user.extra
        .as_ref()?
        .get(key)?
        .first()
        .filter(|v| !v.is_empty())
        .cloned()
}

impl CaServer {
    /// Who the token belongs to, by the API server's TokenReview.
    pub(super) async fn review(&self, token: &str) -> Result<UserInfo, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.kube.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("TokenReview failed: {e}"),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("the token was not accepted: {why}"),
            ));
        }
        // The API server answers with the audiences the token is valid for
        // among those asked; a token for anyone else is no proof to us.
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("the token is not for the audience {:?}", self.audience),
            ));
        }
        status.user.ok_or_else(|| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "TokenReview authenticated the token but named no user",
            )
        })
    }

    /// The node the caller runs on: from the token itself when it carries
    /// it, else from the pod it is bound to.
    pub(super) async fn node_of(&self, user: &UserInfo) -> Result<String, Refusal> {
        let first = |key: &str| claim(user, key);
        if let Some(node) = first(NODE_NAME) {
            return Ok(node);
        }
        let Some(pod_name) = first(POD_NAME) else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "token is not bound to a pod: use a projected ServiceAccount token",
            ));
        };
        let (pod, pod_ref) = self
            .bound_pod(&self.agent.namespace, &pod_name, first(POD_UID).as_deref())
            .await?;
        pod.spec
            .and_then(|spec| spec.node_name)
            .filter(|node| !node.is_empty())
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!("the caller's pod {pod_ref} is not scheduled on a node"),
                )
            })
    }

    /// The pod `namespace/name` a token is bound to, as `(pod, "ns/name")`;
    /// with `uid`, only that very pod (one of the same name made since the
    /// token was issued is not the caller).
    async fn bound_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<(Pod, String), Refusal> {
        let pod_ref = format!("{namespace}/{name}");
        let pod = Api::<Pod>::namespaced(self.kube.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("looking up the caller's pod {pod_ref}: {e}"),
                )
            })?
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!("the token is bound to pod {pod_ref}, which does not exist"),
                )
            })?;
        if let Some(uid) = uid
            && pod.metadata.uid.as_deref() != Some(uid)
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!("the token is bound to an earlier pod {pod_ref} (uid {uid})"),
            ));
        }
        Ok((pod, pod_ref))
    }

    /// The one identity a waypoint may have: that of the live waypoint pod
    /// (labelled `gateway.networking.k8s.io/gateway-name`) its token is
    /// bound to, whose ServiceAccount is the token's. `namespace` and
    /// `account` come from the token's user name.
    pub(super) async fn waypoint_identity(
        &self,
        user: &UserInfo,
        namespace: &str,
        account: &str,
        trust_domain: &str,
    ) -> Result<Identity, Refusal> {
        let first = |key: &str| claim(user, key);
        let forbidden = |why: String| Refusal::new(StatusCode::FORBIDDEN, why);
        let (Some(pod_name), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(forbidden(format!(
                "system:serviceaccount:{namespace}:{account} may not request certificates: only \
                 the node agents' ServiceAccount {} may, or a waypoint pod with a token bound to \
                 it",
                self.agent
            )));
        };
        let (pod, pod_ref) = self.bound_pod(namespace, &pod_name, Some(&uid)).await?;
        let gateway = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::state::GATEWAY_NAME))
            .cloned();
        let Some(gateway) = gateway else {
            return Err(forbidden(format!(
                "pod {pod_ref} is not a waypoint (no label {}); only node agents and waypoints \
                 may request certificates",
                crate::state::GATEWAY_NAME
            )));
        };
        // The label alone proves nothing: the Gateway it names must be a
        // waypoint in the pod's namespace.
        self.check_waypoint_gateway(namespace, &gateway).await?;
        let pod_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default");
        if pod_account != account {
            return Err(forbidden(format!(
                "pod {pod_ref} runs as {pod_account}, not as the token's {account}"
            )));
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Err(forbidden(format!("pod {pod_ref} has ended")));
        }
        Ok(Identity::new(trust_domain, namespace, account))
    }

    /// `namespace/name` is a Gateway of class `istio-waypoint`, or of an
    /// ingress class (an ingress gateway's pods need their identity too).
    async fn check_waypoint_gateway(&self, namespace: &str, name: &str) -> Result<(), Refusal> {
        use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.kube.clone(), namespace, &ApiResource::from_gvk(&gvk));
        let gw = api.get_opt(name).await.map_err(|e| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("looking up Gateway {namespace}/{name}: {e}"),
            )
        })?;
        let class = gw.as_ref().and_then(|g| {
            g.data["spec"]["gatewayClassName"]
                .as_str()
                .map(str::to_owned)
        });
        let ingress = |c: &str| crate::state::INGRESS_CLASSES.contains(&c);
        if class
            .as_deref()
            .is_some_and(|c| c == "istio-waypoint" || ingress(c))
        {
            return Ok(());
        }
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "the pod's Gateway {namespace}/{name} is not a waypoint (class istio-waypoint) \
                 or an ingress gateway (class {}): {}",
                crate::state::INGRESS_CLASSES.join(" or "),
                if gw.is_some() {
                    "another class"
                } else {
                    "no such Gateway"
                }
            ),
        ))
    }

    /// Some live pod on `node` runs as `id`.
    pub(super) async fn check_runs_on(&self, id: &Identity, node: &str) -> Result<(), Refusal> {
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = Api::<Pod>::namespaced(self.kube.clone(), &id.namespace)
            .list(&on_node)
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "listing the pods of namespace {} on node {node}: {e}",
                        id.namespace
                    ),
                )
            })?;
        let runs = pods.items.iter().any(|pod| {
            let Some(spec) = &pod.spec else {
                return false;
            };
            let account = spec
                .service_account_name
                .as_deref()
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default");
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            spec.node_name.as_deref() == Some(node)
                && pod
                    .metadata
                    .namespace
                    .as_deref()
                    .is_none_or(|ns| ns == id.namespace)
                && account == id.service_account
                && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if runs {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!("no pod with identity {id} runs on node {node}"),
            ))
        }
    }

    /// Writes the root into the ConfigMap, retrying with back-off until the
    /// API server takes it.
    pub async fn publish_root(self: Arc<Self>) {
        let mut delay = PUBLISH_RETRY.0;
        loop {
            match self.try_publish_root().await {
                Ok(action) => {
                    info!(configmap = %self.root_configmap, key = ROOT_KEY, action, "root certificate published");
                    return;
                }
                Err(e) => {
                    warn!(configmap = %self.root_configmap, error = %e, retry_in = ?delay, "publishing the root certificate failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(PUBLISH_RETRY.1);
                }
            }
        }
    }

    async fn try_publish_root(&self) -> Result<&'static str, kube::Error> {
        let target = &self.root_configmap;
        let api = Api::<ConfigMap>::namespaced(self.kube.clone(), &target.namespace);
        let pem = self.root_pem().to_owned();
        match api.get_opt(&target.name).await? {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(target.name.clone()),
                        namespace: Some(target.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "mesh-agent-ca".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(ROOT_KEY.to_owned(), pem)])),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &cm).await?;
                Ok("created")
            }
            Some(mut cm) => {
                let data = cm.data.get_or_insert_with(BTreeMap::new);
                if data.get(ROOT_KEY) == Some(&pem) {
                    return Ok("unchanged");
                }
                data.insert(ROOT_KEY.to_owned(), pem);
                // Carries the resourceVersion read: a concurrent change makes
                // this fail and the next attempt start over.
                api.replace(&target.name, &PostParams::default(), &cm)
                    .await?;
                Ok("updated")
            }
        }
    }
}
