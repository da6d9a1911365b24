//! An in-process stand-in for the Kubernetes API server, so tests can drive the
//! real kube-rs client (`Api`, `watcher`, `Recorder`) over plain HTTP/1: list
//! and watch with history, 410 after compaction, bookmarks and dropped
//! connections; create, replace, merge patch, server-side apply and delete;
//! TokenReview; and injected failures. It serves the kinds it is given.
//!
//! Shared by the agent's unit tests and the namespaced harness (which serves
//! it where the nodes' agents reach it); a crate of its own so that none of
//! it is built into the agent.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Frame, header, http::request::Parts,
    server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// A kind the stand-in serves: where its objects live in the API's paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Kind {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

impl Kind {
    pub const fn new(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
    ) -> Self {
        Kind {
            group,
            version,
            kind,
            plural,
            namespaced,
        }
    }
}

/// What `mesh-agent` reads and writes (node agent, waypoint and CA): the
/// kinds it watches, the Events it records, the ConfigMap the CA publishes
/// and the core Events kube's recorder may fall back to. The agent's unit
/// tests serve the agent's own list and check this copy against it; the
/// namespaced harness, which cannot see the agent's code, serves this one.
pub const MESH_AGENT_KINDS: &[Kind] = &[
    Kind::new("", "v1", "Namespace", "namespaces", false),
    Kind::new("", "v1", "Pod", "pods", true),
    Kind::new("", "v1", "Service", "services", true),
    Kind::new("", "v1", "ServiceAccount", "serviceaccounts", true),
    Kind::new(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    Kind::new(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
    ),
    Kind::new(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
    ),
    Kind::new(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
        true,
    ),
    Kind::new(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
        "gateways",
        true,
    ),
    Kind::new(
        "gateway.networking.k8s.io",
        "v1",
        "GatewayClass",
        "gatewayclasses",
        false,
    ),
    Kind::new(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
        true,
    ),
    Kind::new(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
        true,
    ),
    Kind::new(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
        true,
    ),
    Kind::new(
        "policy.mesh-agent.dev",
        "v1alpha1",
        "LocalRateLimitPolicy",
        "localratelimitpolicies",
        true,
    ),
    Kind::new("events.k8s.io", "v1", "Event", "events", true),
    Kind::new("", "v1", "Secret", "secrets", true),
    Kind::new("", "v1", "ConfigMap", "configmaps", true),
    Kind::new("", "v1", "Event", "events", true),
];

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// A running fake API server; dropping it stops the server and its connections.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

/// Who a token authenticates as, for TokenReview.
#[derive(Clone, Debug, Default)]
pub struct TokenUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    pub audiences: Vec<String>,
}

impl FakeApi {
    /// Binds 127.0.0.1 on a free port and serves `kinds` over plain HTTP/1.
    pub async fn start(kinds: &[Kind]) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        FakeApi::serve(listener, kinds)
    }

    /// Serves `kinds` on a listener the caller bound (in another network
    /// namespace, say: a socket keeps the namespace it was made in). Call
    /// it inside a tokio runtime.
    pub fn serve(listener: TcpListener, kinds: &[Kind]) -> FakeApi {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        // Leaked: a few hundred bytes per server, for `&'static` kinds that
        // key the store; only tests run it.
        let kinds: &'static [Kind] = Box::leak(kinds.to_vec().into_boxed_slice());
        let state = Arc::new(Mutex::new(State {
            kinds,
            ..State::default()
        }));
        let server = tokio::spawn(accept(listener, state.clone()));
        FakeApi {
            addr,
            state,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client without auth whose default namespace is "default". Call it
    /// inside a tokio runtime: the client spawns its buffer task.
    pub fn client(&self) -> kube::Client {
        // kube builds rustls without picking a provider; the agent's is ring.
        // Already installed (by the agent's code under test) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = self.url().parse().expect("the fake API URL is a URI");
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client for the fake API")
    }

    /// Creates or replaces an object (with apiVersion, kind, metadata.name
    /// and, for namespaced kinds, metadata.namespace, default "default"),
    /// notifies watches and returns what was stored.
    pub fn apply(&self, obj: Value) -> Value {
        let api_version = obj["apiVersion"].as_str().expect("apply: no apiVersion");
        let kind = obj["kind"].as_str().expect("apply: no kind");
        let resource = served_kind(self.lock().kinds, api_version, kind);
        let name = meta_str(&obj, "name").expect("apply: no metadata.name");
        let namespace = meta_str(&obj, "namespace").unwrap_or("default");
        let key = ObjectKey::new(
            resource,
            resource.get().namespaced.then_some(namespace),
            name,
        );
        self.lock().store(key, obj)
    }

    /// Deletes an object, notifying watches. Returns whether it existed.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let resource = served_kind(self.lock().kinds, api_version, kind);
        let namespace = resource
            .get()
            .namespaced
            .then(|| namespace.unwrap_or("default"));
        self.lock()
            .remove(&ObjectKey::new(resource, namespace, name))
            .is_some()
    }

    /// Current objects of a kind, ordered by namespace and name.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let state = self.lock();
        let resource = served_kind(state.kinds, api_version, kind);
        let objects = state
            .objects
            .iter()
            .filter(|(key, _)| key.resource == resource);
        objects.map(|(_, obj)| obj.clone()).collect()
    }

    /// Forgets the event history up to now, like etcd compaction: a watch
    /// from an older resourceVersion then gets 410 Gone.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted = state.resource_version;
        state.history.clear();
    }

    /// Ends every open watch response, as a dropped connection would.
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch
    /// that asked for bookmarks.
    pub fn bookmark(&self) {
        let mut state = self.lock();
        let resource_version = state.resource_version;
        state.watches.retain(|watch| {
            let bookmark = watch.filter.bookmark(resource_version, json!({}));
            !watch.bookmarks || watch.tx.send(event_line("BOOKMARK", &bookmark)).is_ok()
        });
    }

    /// Makes the next `n` requests, whatever their path, fail with `status`.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.lock().failures = (n, status);
    }

    /// Answers every request for the kind with this plural 403 Forbidden, as
    /// an RBAC rule that does not grant it would (`permit` lifts it).
    pub fn forbid(&self, plural: &str) {
        self.lock().forbidden.insert(plural.to_owned());
    }

    pub fn permit(&self, plural: &str) {
        self.lock().forbidden.remove(plural);
    }

    /// Lets TokenReview authenticate `token` as `user`.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.lock().tokens.insert(token.to_owned(), user);
    }

    /// Every request seen, as "METHOD /path?query" with the query as sent
    /// (still percent-encoded), in order.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A test that panicked while holding the lock must not fail the others.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct State {
    /// What is served, in the order given.
    kinds: &'static [Kind],
    resource_version: u64,
    uids: u64,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    /// How many requests are still to fail, and with which HTTP status.
    failures: (usize, u16),
    tokens: HashMap<String, TokenUser>,
    requests: Vec<String>,
    /// Plurals answered 403 Forbidden.
    forbidden: std::collections::BTreeSet<String>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    resource: ServedKind,
    namespace: Option<String>,
    name: String,
}

/// A served kind; it orders the store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ServedKind(&'static Kind);

impl ObjectKey {
    fn new(resource: ServedKind, namespace: Option<&str>, name: &str) -> Self {
        let namespace = namespace.map(str::to_owned);
        ObjectKey {
            resource,
            namespace,
            name: name.to_owned(),
        }
    }
}

/// One write, kept so watches can replay it. Whether a watch sees it as
/// ADDED, MODIFIED or DELETED depends on whether its selector matched
/// before and after, as with the real API server.
struct Change {
    resource_version: u64,
    object: Value,
    previous: Option<Value>,
    exists: bool,
}

struct Watch {
    filter: Filter,
    bookmarks: bool,
    tx: UnboundedSender<Bytes>,
}

impl State {
    /// Writes `obj` under `key`, keeping the uid of what it replaces unless
    /// `obj` gives its own.
    fn store(&mut self, key: ObjectKey, mut obj: Value) -> Value {
        let previous = self.objects.get(&key).cloned();
        let old_uid = previous.as_ref().and_then(|old| meta_str(old, "uid"));
        let uid = match meta_str(&obj, "uid").or(old_uid) {
            Some(uid) => uid.to_owned(),
            None => {
                self.uids += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.uids)
            }
        };
        self.resource_version += 1;
        let resource = key.resource.get();
        obj["apiVersion"] = api_version(resource).into();
        obj["kind"] = resource.kind.into();
        obj["metadata"]["name"] = key.name.clone().into();
        obj["metadata"]["namespace"] = key.namespace.clone().into();
        obj["metadata"]["uid"] = uid.into();
        obj["metadata"]["resourceVersion"] = self.resource_version.to_string().into();
        if let Some(meta) = obj["metadata"].as_object_mut() {
            meta.retain(|_, value| !value.is_null());
        }
        self.objects.insert(key, obj.clone());
        self.record(obj.clone(), previous, true);
        obj
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<Value> {
        let previous = self.objects.remove(key)?;
        self.resource_version += 1;
        let mut object = previous.clone();
        object["metadata"]["resourceVersion"] = self.resource_version.to_string().into();
        self.record(object.clone(), Some(previous), false);
        Some(object)
    }

    fn record(&mut self, object: Value, previous: Option<Value>, exists: bool) {
        let resource_version = self.resource_version;
        let change = Change {
            resource_version,
            object,
            previous,
            exists,
        };
        // A watch whose client went away is dropped on the next failed send.
        self.watches
            .retain(|watch| match watch.filter.event_line(&change) {
                Some(line) => watch.tx.send(line).is_ok(),
                None => !watch.tx.is_closed(),
            });
        self.history.push(change);
    }

    fn list(&self, filter: &Filter) -> Value {
        let items: Vec<&Value> = self
            .objects
            .values()
            .filter(|o| filter.matches(o))
            .collect();
        json!({
            "apiVersion": api_version(filter.resource.get()),
            "kind": format!("{}List", filter.resource.get().kind),
            "metadata": { "resourceVersion": self.resource_version.to_string() },
            "items": items,
        })
    }

    /// Starts a watch: queues what it asked to replay, then registers it for
    /// live changes, under one lock so that nothing slips in between.
    fn open_watch(
        &mut self,
        filter: Filter,
        query: &Query,
    ) -> Result<UnboundedReceiver<Bytes>, Status> {
        let (tx, rx) = unbounded_channel();
        let send = |line| tx.send(line).expect("the receiver is still here");
        let bookmarks = query.flag("allowWatchBookmarks");
        let send_initial = query.flag("sendInitialEvents");
        let from = query
            .get("resourceVersion")
            .filter(|rv| !matches!(*rv, "" | "0"));
        match from {
            Some(from) if !send_initial => {
                let bad = |_| Status::new(400, format!("invalid resourceVersion {from:?}"));
                let from: u64 = from.parse().map_err(bad)?;
                if from < self.compacted {
                    let message = format!("too old resource version: {from} ({})", self.compacted);
                    send(event_line("ERROR", &Status::new(410, message).to_json()));
                    return Ok(rx);
                }
                let replay = self
                    .history
                    .iter()
                    .filter(|change| change.resource_version > from);
                replay
                    .filter_map(|change| filter.event_line(change))
                    .for_each(send);
            }
            // No resourceVersion, "0", or a streaming list: the current state
            // as ADDED events first.
            _ => {
                let current = self.objects.values().filter(|obj| filter.matches(obj));
                current.for_each(|obj| send(event_line("ADDED", obj)));
                if send_initial && bookmarks {
                    let end = json!({ "k8s.io/initial-events-end": "true" });
                    send(event_line(
                        "BOOKMARK",
                        &filter.bookmark(self.resource_version, end),
                    ));
                }
            }
        }
        self.watches.push(Watch {
            filter,
            bookmarks,
            tx,
        });
        Ok(rx)
    }

    fn take_failure(&mut self) -> Option<u16> {
        let (left, status) = &mut self.failures;
        (*left > 0).then(|| {
            *left -= 1;
            *status
        })
    }
}

/// Which objects a list or watch returns: a kind, maybe one namespace, and
/// equality selectors on fields and labels.
struct Filter {
    resource: ServedKind,
    namespace: Option<String>,
    fields: Vec<Requirement>,
    labels: Vec<Requirement>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let resource = self.resource.get();
        let field = |path: &str| path.split('.').try_fold(obj, |v, part| v.get(part));
        obj["apiVersion"] == api_version(resource).as_str()
            && obj["kind"] == resource.kind
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| meta_str(obj, "namespace") == Some(ns))
            && self
                .fields
                .iter()
                .all(|r| r.holds(field(&r.key).and_then(Value::as_str)))
            && self
                .labels
                .iter()
                .all(|r| r.holds(obj["metadata"]["labels"][&r.key].as_str()))
    }

    /// How this watch sees `change`, if at all.
    fn event_line(&self, change: &Change) -> Option<Bytes> {
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        let after = change.exists && self.matches(&change.object);
        let kind = match (before, after) {
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
            (false, false) => return None,
        };
        Some(event_line(kind, &change.object))
    }

    /// An object of the watched kind carrying only a resourceVersion (and
    /// maybe annotations): what kube's `Bookmark` expects.
    fn bookmark(&self, resource_version: u64, annotations: Value) -> Value {
        let resource = self.resource.get();
        let metadata =
            json!({ "resourceVersion": resource_version.to_string(), "annotations": annotations });
        json!({ "apiVersion": api_version(resource), "kind": resource.kind, "metadata": metadata })
    }
}

/// `key=value`, `key==value` or `key!=value`.
struct Requirement {
    key: String,
    value: String,
    equal: bool,
}

impl Requirement {
    fn parse_all(selector: Option<&str>) -> Result<Vec<Self>, Status> {
        let terms = selector
            .unwrap_or("")
            .split(',')
            .filter(|term| !term.trim().is_empty());
        terms.map(Self::parse).collect()
    }

    fn parse(term: &str) -> Result<Self, Status> {
        let (split, equal) = match term.split_once("!=") {
            Some(split) => (Some(split), false),
            None => (term.split_once("==").or_else(|| term.split_once('=')), true),
        };
        let unsupported =
            || Status::new(400, format!("unsupported selector {term:?}: only = and !="));
        let (key, value) = split.ok_or_else(unsupported)?;
        Ok(Requirement {
            key: key.trim().to_owned(),
            value: value.trim().to_owned(),
            equal,
        })
    }

    /// A missing field or label compares as "", as the API server does.
    fn holds(&self, actual: Option<&str>) -> bool {
        (actual.unwrap_or("") == self.value) == self.equal
    }
}

/// A v1 Status error, the body of every failed request.
#[derive(Debug)]
struct Status {
    code: u16,
    message: String,
}

impl Status {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 if self.message.contains("already exists") => "AlreadyExists",
            409 => "Conflict",
            410 => "Expired",
            415 => "UnsupportedMediaType",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason(), "code": self.code,
        })
    }

    fn into_response(self) -> Response<Body> {
        json_response(self.code, &self.to_json())
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

async fn accept(listener: TcpListener, state: Arc<Mutex<State>>) {
    // Owning the connections here means aborting this task closes them too.
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        let service = service_fn(move |req| serve(state.clone(), req));
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        // A client hanging up mid-response is normal for a test.
        connections.spawn(async move { connection.await.ok() });
        while connections.try_join_next().is_some() {}
    }
}

async fn serve(
    state: Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let failure = {
        let mut state = lock(&state);
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        state.requests.push(format!("{} {target}", parts.method));
        state.take_failure()
    };
    let response = match (failure, body.collect().await) {
        (Some(code), _) => Err(Status::new(code, "injected failure")),
        (None, Ok(body)) => handle(&state, &parts, &body.to_bytes()),
        (None, Err(err)) => Err(Status::new(400, format!("reading the request body: {err}"))),
    };
    Ok(response.unwrap_or_else(Status::into_response))
}

fn handle(state: &Mutex<State>, parts: &Parts, body: &[u8]) -> Result<Response<Body>, Status> {
    let path = parts.uri.path();
    if path == TOKEN_REVIEWS && parts.method == Method::POST {
        return token_review(&lock(state), body);
    }
    let not_found = || {
        Status::new(
            404,
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let kinds = lock(state).kinds;
    let call = ApiCall::route(kinds, parts, body).ok_or_else(not_found)?;
    let mut state = lock(state);
    let plural = call.resource.get().plural;
    if state.forbidden.contains(plural) {
        return Err(Status::new(
            403,
            format!(
                "{plural} is forbidden: User \"system:serviceaccount:istio-system:mesh-agent\" cannot {} resource \"{plural}\"",
                parts.method
            ),
        ));
    }
    match call.name {
        None => call.on_collection(&mut state),
        Some(name) => call.on_object(&mut state, name),
    }
}

/// A request for a served kind, routed by its path.
struct ApiCall<'a> {
    resource: ServedKind,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    /// The status subresource: a write changes `status` only.
    status_only: bool,
    parts: &'a Parts,
    query: Query,
    body: &'a [u8],
}

impl<'a> ApiCall<'a> {
    /// `/api/v1/...` or `/apis/{group}/{version}/...`, then `{plural}[/{name}]`
    /// or `namespaces/{ns}/{plural}[/{name}]`.
    fn route(kinds: &'static [Kind], parts: &'a Parts, body: &'a [u8]) -> Option<Self> {
        let segments: Vec<&str> = parts.uri.path().trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        // `.../{name}/status`: the status subresource.
        let (rest, status_only) = match *rest {
            [ref head @ .., "status"] if head.len() == 2 || head.len() == 4 => (head, true),
            _ => (rest, false),
        };
        let (namespace, plural, name) = match *rest {
            [plural] => (None, plural, None),
            [plural, name] => (None, plural, Some(name)),
            ["namespaces", namespace, plural] => (Some(namespace), plural, None),
            ["namespaces", namespace, plural, name] => (Some(namespace), plural, Some(name)),
            _ => return None,
        };
        let resource = ServedKind::find(kinds, |r| {
            (r.group, r.version, r.plural) == (group, version, plural)
        })?;
        let namespaced = resource.get().namespaced;
        if namespace.is_some() && !namespaced || name.is_some() && namespaced && namespace.is_none()
        {
            return None;
        }
        let query = Query::parse(parts.uri.query().unwrap_or(""));
        Some(ApiCall {
            resource,
            namespace,
            name,
            status_only,
            parts,
            query,
            body,
        })
    }

    fn on_collection(&self, state: &mut State) -> Result<Response<Body>, Status> {
        match self.parts.method {
            Method::GET if self.query.flag("watch") => {
                let timeout = self.query.get("timeoutSeconds").map(str::parse).transpose();
                let timeout =
                    timeout.map_err(|_| Status::new(400, "timeoutSeconds is not a number"))?;
                let events = state.open_watch(self.filter()?, &self.query)?;
                Ok(watch_response(events, timeout.map(Duration::from_secs)))
            }
            Method::GET => Ok(json_response(200, &state.list(&self.filter()?))),
            Method::POST if self.namespace.is_some() || !self.resource.get().namespaced => {
                let obj = parse_object(self.body, false)?;
                let name = meta_str(&obj, "name")
                    .ok_or_else(|| Status::new(400, "metadata.name: Required value"))?;
                self.check_namespace(&obj)?;
                let key = ObjectKey::new(self.resource, self.namespace, name);
                if state.objects.contains_key(&key) {
                    let plural = self.resource.get().plural;
                    return Err(Status::new(
                        409,
                        format!("{plural} {name:?} already exists"),
                    ));
                }
                Ok(json_response(201, &state.store(key, obj)))
            }
            _ => Err(Status::new(
                405,
                format!("{} is not allowed here", self.parts.method),
            )),
        }
    }

    fn on_object(&self, state: &mut State, name: &str) -> Result<Response<Body>, Status> {
        let key = ObjectKey::new(self.resource, self.namespace, name);
        let current = state.objects.get(&key).cloned();
        let missing = || {
            Status::new(
                404,
                format!("{} {name:?} not found", self.resource.get().plural),
            )
        };
        match self.parts.method {
            Method::GET => Ok(json_response(200, &current.ok_or_else(missing)?)),
            Method::DELETE => Ok(json_response(200, &state.remove(&key).ok_or_else(missing)?)),
            Method::PUT => {
                let current = current.ok_or_else(missing)?;
                let obj = parse_object(self.body, false)?;
                if meta_str(&obj, "name") != Some(name) {
                    return Err(Status::new(400, "metadata.name does not match the path"));
                }
                self.check_namespace(&obj)?;
                check_resource_version(&obj, &current)?;
                Ok(json_response(200, &state.store(key, obj)))
            }
            Method::PATCH => {
                let mut patch = self.patch()?;
                if self.status_only {
                    patch = json!({ "status": patch["status"].clone() });
                }
                let mut merged = match (current, self.content_type()) {
                    (Some(current), _) => current,
                    // Server-side apply creates what is missing.
                    (None, APPLY_PATCH) => json!({}),
                    (None, _) => return Err(missing()),
                };
                check_resource_version(&patch, &merged)?;
                merge_patch(&mut merged, &patch);
                Ok(json_response(200, &state.store(key, merged)))
            }
            _ => Err(Status::new(
                405,
                format!("{} is not allowed here", self.parts.method),
            )),
        }
    }

    fn filter(&self) -> Result<Filter, Status> {
        Ok(Filter {
            resource: self.resource,
            namespace: self.namespace.map(str::to_owned),
            fields: Requirement::parse_all(self.query.get("fieldSelector"))?,
            labels: Requirement::parse_all(self.query.get("labelSelector"))?,
        })
    }

    fn content_type(&self) -> &str {
        let content_type = self
            .parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
    }

    /// Merge and strategic merge patches are both taken as JSON merge
    /// patches; server-side apply as a merge of the applied object.
    fn patch(&self) -> Result<Value, Status> {
        match self.content_type() {
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                parse_object(self.body, false)
            }
            APPLY_PATCH if self.query.get("fieldManager").is_none_or(str::is_empty) => Err(
                Status::new(400, "fieldManager: Required value for apply patches"),
            ),
            APPLY_PATCH => parse_object(self.body, true),
            other => Err(Status::new(
                415,
                format!("unsupported patch type {other:?}"),
            )),
        }
    }

    /// The body's namespace, if any, must be the path's, as the API server checks.
    fn check_namespace(&self, obj: &Value) -> Result<(), Status> {
        match meta_str(obj, "namespace") {
            Some(given) if self.resource.get().namespaced && self.namespace != Some(given) => {
                Err(Status::new(
                    400,
                    format!("the object's namespace {given:?} is not the request's"),
                ))
            }
            _ => Ok(()),
        }
    }
}

fn token_review(state: &State, body: &[u8]) -> Result<Response<Body>, Status> {
    let mut review = parse_object(body, false)?;
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let asked: Vec<&str> = match review["spec"]["audiences"].as_array() {
        Some(audiences) => audiences.iter().filter_map(Value::as_str).collect(),
        None => Vec::new(),
    };
    let status = match state.tokens.get(token) {
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
        Some(user) => {
            let granted = user
                .audiences
                .iter()
                .filter(|a| asked.is_empty() || asked.contains(&a.as_str()));
            let granted: Vec<&String> = granted.collect();
            if granted.is_empty() && !asked.is_empty() {
                let error = format!(
                    "token audiences {:?} are not among {asked:?}",
                    user.audiences
                );
                json!({ "authenticated": false, "error": error })
            } else {
                let TokenUser {
                    username,
                    uid,
                    groups,
                    extra,
                    ..
                } = user;
                let user =
                    json!({ "username": username, "uid": uid, "groups": groups, "extra": extra });
                json!({ "authenticated": true, "user": user, "audiences": granted })
            }
        }
    };
    review["apiVersion"] = "authentication.k8s.io/v1".into();
    review["kind"] = "TokenReview".into();
    review["status"] = status;
    Ok(json_response(201, &review))
}

impl ServedKind {
    fn find(kinds: &'static [Kind], wanted: impl Fn(&Kind) -> bool) -> Option<Self> {
        kinds.iter().find(|k| wanted(k)).map(ServedKind)
    }

    fn get(self) -> &'static Kind {
        self.0
    }
}

fn served_kind(kinds: &'static [Kind], wanted: &str, kind: &str) -> ServedKind {
    let found = ServedKind::find(kinds, |r| api_version(r) == wanted && r.kind == kind);
    found.unwrap_or_else(|| panic!("{wanted} {kind} is not served by the fake API"))
}

fn api_version(resource: &Kind) -> String {
    match resource.group {
        "" => resource.version.to_owned(),
        group => format!("{group}/{}", resource.version),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj["metadata"][field].as_str().filter(|s| !s.is_empty())
}

/// Optimistic concurrency: a write naming a resourceVersion must name the current one.
fn check_resource_version(obj: &Value, current: &Value) -> Result<(), Status> {
    match meta_str(obj, "resourceVersion") {
        Some(given) if Some(given) != meta_str(current, "resourceVersion") => Err(Status::new(
            409,
            "the object has been modified; please apply your changes to the latest version and try again",
        )),
        _ => Ok(()),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A request body: a JSON object (or, for apply patches, YAML).
fn parse_object(body: &[u8], yaml: bool) -> Result<Value, Status> {
    let parsed = match yaml {
        true => serde_yaml::from_slice(body).map_err(|err| err.to_string()),
        false => serde_json::from_slice(body).map_err(|err| err.to_string()),
    };
    match parsed {
        Ok(obj @ Value::Object(_)) => Ok(obj),
        Ok(other) => Err(Status::new(
            400,
            format!("the body is not an object: {other}"),
        )),
        Err(err) => Err(Status::new(400, format!("the body does not parse: {err}"))),
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({ "type": kind, "object": object })))
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let json = header::HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, json);
    response
}

/// A chunked body of watch events that ends when the watch is dropped or
/// `timeoutSeconds` passes.
fn watch_response(events: UnboundedReceiver<Bytes>, timeout: Option<Duration>) -> Response<Body> {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let lines = futures::stream::unfold(events, move |mut events| async move {
        let line = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, events.recv())
                .await
                .ok()
                .flatten(),
            None => events.recv().await,
        };
        Some((Ok(Frame::data(line?)), events))
    });
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    let json = header::HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, json);
    response
}

/// Query parameters, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        let pairs = query.split('&').filter(|pair| !pair.is_empty());
        let pairs = pairs.map(|pair| pair.split_once('=').unwrap_or((pair, "")));
        Query(
            pairs
                .map(|(key, value)| (percent_decode(key), percent_decode(value)))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Form decoding: `%XX` escapes, and `+` for a space.
fn percent_decode(s: &str) -> String {
    let (bytes, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
    while let Some(&byte) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok());
        match hex.filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit())) {
            Some(hex) if byte == b'%' => {
                out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
                i += 3;
            }
            _ => {
                out.push(if byte == b'+' { b' ' } else { byte });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
