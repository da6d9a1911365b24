//! An in-process stand-in for the Kubernetes API server, so tests can drive the
//! real kube-rs client (`Api`, `watcher`, `Recorder`) over plain HTTP/1: list
//! and watch with history, 410 after compaction, bookmarks and dropped
//! connections; create, replace, merge patch, server-side apply and delete;
//! TokenReview; and injected failures.

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
use k8s_openapi::chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tokio::{
    net::TcpListener,
    sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use super::{EVENTS, Resource, WATCHED};

/// Server-side apply's content type.
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// Kinds served besides the watched ones: what the agent and the CA write.
const WRITTEN: &[Resource] = &[
    Resource::new("", "v1", "ConfigMap", "configmaps", true),
    Resource::new("", "v1", "Event", "events", true),
];

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
    /// Binds 127.0.0.1 on a free port and serves plain HTTP/1.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API on 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let state = Arc::new(Mutex::new(State::default()));
        let server = tokio::spawn(accept(listener, state.clone()));
        FakeApi {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client without auth whose default namespace is "default". Must be
    /// called inside a tokio runtime (the client spawns its buffer task).
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("the fake API URL is a valid URI");
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client for the fake API")
    }

    /// Creates or replaces an object (given with apiVersion, kind,
    /// metadata.name and, for namespaced kinds, metadata.namespace defaulting
    /// to "default"), notifies watches and returns what was stored.
    pub fn apply(&self, obj: Value) -> Value {
        let resource = resource_of(&obj);
        let name = meta_str(&obj, "name").expect("apply: the object needs metadata.name");
        let namespace = resource
            .namespaced
            .then(|| meta_str(&obj, "namespace").unwrap_or("default").to_owned());
        let key = ObjectKey::new(resource, namespace.as_deref(), name);
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
        let resource = by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("delete: {api_version} {kind} is not served"));
        let namespace = resource.namespaced.then(|| namespace.unwrap_or("default"));
        self.lock()
            .remove(&ObjectKey::new(resource, namespace, name))
            .is_some()
    }

    /// Current objects of a kind, ordered by namespace and name.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let resource = by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("objects: {api_version} {kind} is not served"));
        let state = self.lock();
        let objects = state.objects.iter();
        objects
            .filter(|(key, _)| key.is(resource))
            .map(|(_, obj)| obj.clone())
            .collect()
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
            let line = event_line("BOOKMARK", &watch.filter.bookmark(resource_version, None));
            !watch.bookmarks || watch.tx.send(line).is_ok()
        });
    }

    /// Makes the next `n` requests, whatever their path, fail with `status`.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.lock().failures = (n, status);
    }

    /// Lets TokenReview authenticate `token` as `user`.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.lock().tokens.insert(token.to_owned(), user);
    }

    /// Every request seen, as "METHOD /path?query" (query as sent, still
    /// percent-encoded), in order.
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

/// A test that panicked while holding the lock must not take the others down.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct State {
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
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    group: &'static str,
    kind: &'static str,
    namespace: Option<String>,
    name: String,
}

impl ObjectKey {
    fn new(resource: &'static Resource, namespace: Option<&str>, name: &str) -> Self {
        ObjectKey {
            group: resource.group,
            kind: resource.kind,
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }

    fn is(&self, resource: &Resource) -> bool {
        self.group == resource.group && self.kind == resource.kind
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
    fn next_resource_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Writes `obj` under `key`, keeping the uid and creation time of what it
    /// replaces unless `obj` gives its own.
    fn store(&mut self, key: ObjectKey, mut obj: Value) -> Value {
        let previous = self.objects.get(&key).cloned();
        let old_meta = |field| {
            previous
                .as_ref()
                .and_then(|p| meta_str(p, field))
                .map(str::to_owned)
        };
        let uid = meta_str(&obj, "uid")
            .map(str::to_owned)
            .or_else(|| old_meta("uid"));
        let uid = uid.unwrap_or_else(|| {
            self.uids += 1;
            format!("00000000-0000-4000-8000-{:012x}", self.uids)
        });
        let created = old_meta("creationTimestamp")
            .or_else(|| meta_str(&obj, "creationTimestamp").map(str::to_owned));
        let created =
            created.unwrap_or_else(|| Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true));
        let resource_version = self.next_resource_version();

        let resource = by_kind_key(&key);
        obj["apiVersion"] = api_version(resource).into();
        obj["kind"] = resource.kind.into();
        let meta = metadata_mut(&mut obj);
        meta.insert("name".into(), key.name.clone().into());
        match &key.namespace {
            Some(namespace) => meta.insert("namespace".into(), namespace.clone().into()),
            None => meta.remove("namespace"),
        };
        meta.insert("uid".into(), uid.into());
        meta.insert("creationTimestamp".into(), created.into());
        meta.insert(
            "resourceVersion".into(),
            resource_version.to_string().into(),
        );

        self.objects.insert(key, obj.clone());
        self.record(Change {
            resource_version,
            object: obj.clone(),
            previous,
            exists: true,
        });
        obj
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<Value> {
        let previous = self.objects.remove(key)?;
        let resource_version = self.next_resource_version();
        let mut object = previous.clone();
        metadata_mut(&mut object).insert(
            "resourceVersion".into(),
            resource_version.to_string().into(),
        );
        self.record(Change {
            resource_version,
            object: object.clone(),
            previous: Some(previous),
            exists: false,
        });
        Some(object)
    }

    fn record(&mut self, change: Change) {
        // A watch whose client went away is dropped on the first failed send.
        self.watches
            .retain(|watch| match watch.filter.event_line(&change) {
                Some(line) => watch.tx.send(line).is_ok(),
                None => !watch.tx.is_closed(),
            });
        self.history.push(change);
    }

    /// Starts a watch: replays what it asked for into the channel, then
    /// registers it for live changes (under one lock, so nothing slips between).
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
            .filter(|rv| !rv.is_empty() && *rv != "0");
        match from {
            Some(from) if !send_initial => {
                let from: u64 = from
                    .parse()
                    .map_err(|_| Status::new(400, format!("invalid resourceVersion {from:?}")))?;
                if from < self.compacted {
                    let gone = Status::new(
                        410,
                        format!("too old resource version: {from} ({})", self.compacted),
                    );
                    send(event_line("ERROR", &gone.to_json()));
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
            // as synthetic ADDED events first.
            _ => {
                let current = self.objects.values().filter(|obj| filter.matches(obj));
                current.for_each(|obj| send(event_line("ADDED", obj)));
                if send_initial && bookmarks {
                    let end = json!({ "k8s.io/initial-events-end": "true" });
                    send(event_line(
                        "BOOKMARK",
                        &filter.bookmark(self.resource_version, Some(end)),
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

    fn list(&self, filter: &Filter) -> Value {
        let items: Vec<&Value> = self
            .objects
            .values()
            .filter(|obj| filter.matches(obj))
            .collect();
        json!({
            "apiVersion": api_version(filter.resource),
            "kind": format!("{}List", filter.resource.kind),
            "metadata": { "resourceVersion": self.resource_version.to_string() },
            "items": items,
        })
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
    resource: &'static Resource,
    namespace: Option<String>,
    fields: Vec<Requirement>,
    labels: Vec<Requirement>,
}

/// `key=value`, `key==value` or `key!=value`.
struct Requirement {
    key: String,
    value: String,
    equal: bool,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        obj["apiVersion"] == api_version(self.resource).as_str()
            && obj["kind"] == self.resource.kind
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| meta_str(obj, "namespace") == Some(ns))
            && self.fields.iter().all(|r| {
                let field = r.key.split('.').try_fold(obj, |v, part| v.get(part));
                r.holds(field.and_then(Value::as_str))
            })
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

    fn bookmark(&self, resource_version: u64, annotations: Option<Value>) -> Value {
        let mut metadata = json!({ "resourceVersion": resource_version.to_string() });
        if let Some(annotations) = annotations {
            metadata["annotations"] = annotations;
        }
        json!({ "apiVersion": api_version(self.resource), "kind": self.resource.kind, "metadata": metadata })
    }
}

impl Requirement {
    fn parse_all(selector: &str) -> Result<Vec<Self>, Status> {
        let terms = selector.split(',').filter(|term| !term.trim().is_empty());
        terms.map(Self::parse).collect()
    }

    fn parse(term: &str) -> Result<Self, Status> {
        let (key, value, equal) = if let Some((key, value)) = term.split_once("!=") {
            (key, value, false)
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (key, value, true)
        } else {
            return Err(Status::new(
                400,
                format!("unsupported selector {term:?}: only = and != are served"),
            ));
        };
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
    // Owning the connections here means aborting this task also closes them.
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        let service = service_fn(move |req| serve(state.clone(), req));
        connections.spawn(async move {
            // A client hanging up mid-response is normal for a test.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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
    if let Some(code) = failure {
        return Ok(Status::new(code, "injected failure").into_response());
    }
    let response = match body.collect().await {
        Ok(body) => handle(&state, &parts, &body.to_bytes()),
        Err(err) => Err(Status::new(400, format!("reading the request body: {err}"))),
    };
    Ok(response.unwrap_or_else(Status::into_response))
}

fn handle(state: &Mutex<State>, parts: &Parts, body: &[u8]) -> Result<Response<Body>, Status> {
    let path = parts.uri.path();
    let not_found = || {
        Status::new(
            404,
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let target = match route(path).ok_or_else(not_found)? {
        Route::TokenReviews if parts.method == Method::POST => {
            return token_review(&lock(state), body);
        }
        Route::TokenReviews => return Err(Status::new(405, "tokenreviews only accept POST")),
        Route::Resource(target) => target,
    };
    let Target {
        resource,
        namespace,
        name,
    } = &target;
    if namespace.is_some() && !resource.namespaced
        || name.is_some() && resource.namespaced && namespace.is_none()
    {
        return Err(not_found());
    }
    let call = ApiCall {
        resource,
        namespace: namespace.as_deref(),
        parts,
        query: Query::parse(parts.uri.query().unwrap_or("")),
        body,
    };
    let mut state = lock(state);
    match name {
        None => call.on_collection(&mut state),
        Some(name) => call.on_object(&mut state, name),
    }
}

/// A request for a served kind, once routed.
struct ApiCall<'a> {
    resource: &'static Resource,
    namespace: Option<&'a str>,
    parts: &'a Parts,
    query: Query,
    body: &'a [u8],
}

impl ApiCall<'_> {
    fn on_collection(&self, state: &mut State) -> Result<Response<Body>, Status> {
        let resource = self.resource;
        match self.parts.method {
            Method::GET if self.query.flag("watch") => {
                let timeout = self.query.get("timeoutSeconds").map(str::parse).transpose();
                let timeout =
                    timeout.map_err(|_| Status::new(400, "timeoutSeconds must be a number"))?;
                let events = state.open_watch(self.filter()?, &self.query)?;
                Ok(watch_response(events, timeout.map(Duration::from_secs)))
            }
            Method::GET => Ok(json_response(200, &state.list(&self.filter()?))),
            Method::POST if resource.namespaced && self.namespace.is_none() => Err(Status::new(
                405,
                format!("POST {} needs a namespace in the path", resource.plural),
            )),
            Method::POST => {
                let obj = parse_json(self.body)?;
                let name = meta_str(&obj, "name").map(str::to_owned).or_else(|| {
                    let prefix = meta_str(&obj, "generateName")?;
                    Some(format!("{prefix}{:05x}", state.resource_version + 1))
                });
                let name = name.ok_or_else(|| Status::new(400, "metadata.name: Required value"))?;
                self.check_namespace(&obj)?;
                let key = ObjectKey::new(resource, self.namespace, &name);
                if state.objects.contains_key(&key) {
                    return Err(Status::new(
                        409,
                        format!("{} {name:?} already exists", resource.plural),
                    ));
                }
                Ok(json_response(201, &state.store(key, obj)))
            }
            _ => Err(Status::new(
                405,
                format!("{} is not allowed on a collection", self.parts.method),
            )),
        }
    }

    fn on_object(&self, state: &mut State, name: &str) -> Result<Response<Body>, Status> {
        let key = ObjectKey::new(self.resource, self.namespace, name);
        let current = state.objects.get(&key).cloned();
        let missing = || Status::new(404, format!("{} {name:?} not found", self.resource.plural));
        match self.parts.method {
            Method::GET => Ok(json_response(200, &current.ok_or_else(missing)?)),
            Method::DELETE => Ok(json_response(200, &state.remove(&key).ok_or_else(missing)?)),
            Method::PUT => {
                let current = current.ok_or_else(missing)?;
                let obj = parse_json(self.body)?;
                if meta_str(&obj, "name") != Some(name) {
                    return Err(Status::new(400, "metadata.name does not match the path"));
                }
                self.check_namespace(&obj)?;
                check_resource_version(&obj, &current)?;
                Ok(json_response(200, &state.store(key, obj)))
            }
            Method::PATCH => {
                let patch = self.patch()?;
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
                format!("{} is not allowed on an object", self.parts.method),
            )),
        }
    }

    fn filter(&self) -> Result<Filter, Status> {
        Ok(Filter {
            resource: self.resource,
            namespace: self.namespace.map(str::to_owned),
            fields: Requirement::parse_all(self.query.get("fieldSelector").unwrap_or(""))?,
            labels: Requirement::parse_all(self.query.get("labelSelector").unwrap_or(""))?,
        })
    }

    fn content_type(&self) -> &str {
        let content_type = self.parts.headers.get(header::CONTENT_TYPE);
        let content_type = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
        content_type.split(';').next().unwrap_or("").trim()
    }

    /// Merge and strategic merge patches are both applied as JSON merge
    /// patches, server-side apply as a merge of the whole applied object.
    fn patch(&self) -> Result<Value, Status> {
        match self.content_type() {
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                parse_json(self.body)
            }
            APPLY_PATCH => {
                if self.query.get("fieldManager").is_none_or(str::is_empty) {
                    return Err(Status::new(
                        400,
                        "fieldManager: Required value for apply patches",
                    ));
                }
                serde_yaml::from_slice(self.body)
                    .map_err(|err| Status::new(400, format!("the apply patch is not YAML: {err}")))
            }
            other => Err(Status::new(
                415,
                format!("unsupported patch type {other:?}"),
            )),
        }
    }

    /// The body's namespace, if any, must be the path's (as the API server checks).
    fn check_namespace(&self, obj: &Value) -> Result<(), Status> {
        match meta_str(obj, "namespace") {
            Some(given) if self.resource.namespaced && self.namespace != Some(given) => {
                Err(Status::new(
                    400,
                    format!(
                        "the namespace of the object ({given}) does not match the namespace on the request"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

fn token_review(state: &State, body: &[u8]) -> Result<Response<Body>, Status> {
    let mut review = parse_json(body)?;
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
                    "token audiences {:?} is invalid for the target audiences {asked:?}",
                    user.audiences
                );
                json!({ "authenticated": false, "error": error })
            } else {
                json!({
                    "authenticated": true,
                    "user": { "username": user.username, "uid": user.uid, "groups": user.groups, "extra": user.extra },
                    "audiences": granted,
                })
            }
        }
    };
    review["apiVersion"] = "authentication.k8s.io/v1".into();
    review["kind"] = "TokenReview".into();
    review["status"] = status;
    Ok(json_response(201, &review))
}

enum Route<'a> {
    TokenReviews,
    Resource(Target<'a>),
}

/// A served kind, and the namespace and name when the path gives them.
struct Target<'a> {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<&'a str>,
}

/// `/api/v1/...` or `/apis/{group}/{version}/...`, then `{plural}[/{name}]`
/// or `namespaces/{ns}/{plural}[/{name}]`.
fn route(path: &str) -> Option<Route<'_>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name)),
        _ => return None,
    };
    if (group, version, plural, namespace, name)
        == ("authentication.k8s.io", "v1", "tokenreviews", None, None)
    {
        return Some(Route::TokenReviews);
    }
    let resource = served().find(|r| (r.group, r.version, r.plural) == (group, version, plural))?;
    Some(Route::Resource(Target {
        resource,
        namespace: namespace.map(str::to_owned),
        name,
    }))
}

fn served() -> impl Iterator<Item = &'static Resource> {
    WATCHED
        .iter()
        .chain(std::iter::once(&EVENTS))
        .chain(WRITTEN)
}

fn by_kind(wanted: &str, kind: &str) -> Option<&'static Resource> {
    served().find(|r| api_version(r) == wanted && r.kind == kind)
}

fn by_kind_key(key: &ObjectKey) -> &'static Resource {
    served()
        .find(|r| key.is(r))
        .expect("keys are only made for served kinds")
}

fn resource_of(obj: &Value) -> &'static Resource {
    let api_version = obj["apiVersion"]
        .as_str()
        .expect("the object needs apiVersion");
    let kind = obj["kind"].as_str().expect("the object needs kind");
    by_kind(api_version, kind).unwrap_or_else(|| panic!("{api_version} {kind} is not served"))
}

fn api_version(resource: &Resource) -> String {
    match resource.group {
        "" => resource.version.to_owned(),
        group => format!("{group}/{}", resource.version),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj["metadata"][field].as_str().filter(|s| !s.is_empty())
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

/// Optimistic concurrency: a write that names a resourceVersion must name the current one.
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
    let target = target
        .as_object_mut()
        .expect("target was just made an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body)
        .map_err(|err| Status::new(400, format!("the request body is not JSON: {err}")))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({ "type": kind, "object": object })))
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string())).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("a valid header"),
    );
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
        }?;
        Some((Ok(Frame::data(line)), events))
    });
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("a valid header"),
    );
    response
}

/// Query parameters, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        let pairs = query.split('&').filter(|pair| !pair.is_empty());
        Query(
            pairs
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
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

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit));
        let escaped =
            hex.and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[path = "fake_api_tests.rs"]
mod tests;
