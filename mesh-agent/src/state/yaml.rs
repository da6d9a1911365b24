//! Reading Kubernetes objects out of YAML text: `---` documents and
//! `kind: List`, dispatch on apiVersion/kind, and a warning for every object
//! that cannot be used (the others still are).

use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as K8sService};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value;

use super::{ConfigWarning, peer_auth::PeerAuthentication, policy::AuthorizationPolicy};

/// `(namespace, name)` of a namespaced object.
pub(super) type Key = (String, String);

/// An object and the file it came from.
#[derive(Debug)]
pub(super) struct Parsed<T> {
    pub origin: String,
    pub object: T,
}

/// Every usable object, the later definition of a duplicate winning.
#[derive(Debug, Default)]
pub(super) struct Objects {
    pub namespaces: BTreeMap<String, Parsed<Namespace>>,
    pub pods: BTreeMap<Key, Parsed<Pod>>,
    pub services: BTreeMap<Key, Parsed<K8sService>>,
    pub authorization_policies: BTreeMap<Key, Parsed<AuthorizationPolicy>>,
    pub peer_authentications: BTreeMap<Key, Parsed<PeerAuthentication>>,
}

#[derive(Debug, thiserror::Error)]
enum ObjectError {
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0} is missing")]
    Missing(&'static str),
}

impl ObjectError {
    fn kind(&self) -> &'static str {
        match self {
            // serde's own wording for `deny_unknown_fields`.
            ObjectError::Yaml(e) if e.to_string().contains("unknown field") => "unknown_field",
            _ => "parse_error",
        }
    }
}

/// Where a value came from: the text is parsed again on an error, because
/// serde_yaml names the field path and line only when reading text.
#[derive(Clone, Copy)]
struct Doc<'a> {
    origin: &'a str,
    text: &'a str,
    /// Index of the `---` document; None inside a `kind: List`.
    index: Option<usize>,
}

/// apiVersion, kind, namespace and name, read before the typed parse so that
/// a failing object can still be named.
struct Header {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Header {
    fn of(value: &Value) -> Header {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let meta = value.get("metadata");
        Header {
            api_version: text(value.get("apiVersion")).unwrap_or_default(),
            kind: text(value.get("kind")).unwrap_or_default(),
            namespace: text(meta.and_then(|m| m.get("namespace"))),
            name: text(meta.and_then(|m| m.get("name"))),
        }
    }

    fn namespace(&self) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    }
}

/// `Pod ns/name`, `Namespace name`, `ConfigMap name` (no namespace given).
impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            &self.kind
        };
        let name = self.name.as_deref().unwrap_or("<unnamed>");
        match (kind, &self.namespace) {
            ("Namespace", _) => write!(f, "Namespace {name}"),
            ("Pod" | "Service" | "AuthorizationPolicy" | "PeerAuthentication", _) => {
                write!(f, "{kind} {}/{name}", self.namespace())
            }
            (_, Some(ns)) => write!(f, "{kind} {ns}/{name}"),
            (_, None) => write!(f, "{kind} {name}"),
        }
    }
}

impl Objects {
    pub fn parse(docs: &[(String, String)], warnings: &mut Vec<ConfigWarning>) -> Objects {
        let mut objects = Objects::default();
        for (origin, text) in docs {
            for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
                match Value::deserialize(de) {
                    Ok(Value::Null) => {}
                    Ok(value) => {
                        let doc = Doc {
                            origin,
                            text,
                            index: Some(index),
                        };
                        objects.add(doc, value, warnings);
                    }
                    Err(e) => {
                        warnings.push(ConfigWarning {
                            object: origin.clone(),
                            kind: "parse_error",
                            message: e.to_string(),
                        });
                        // The YAML parser cannot find the next document after
                        // a syntax error: the rest of this text is lost.
                        break;
                    }
                }
            }
        }
        objects
    }

    fn add(&mut self, doc: Doc<'_>, value: Value, warnings: &mut Vec<ConfigWarning>) {
        let header = Header::of(&value);
        let warn = |warnings: &mut Vec<ConfigWarning>, kind, message| {
            warnings.push(ConfigWarning {
                object: format!("{}: {header}", doc.origin),
                kind,
                message,
            });
        };
        if header.api_version.is_empty() || header.kind.is_empty() {
            let message = "not a Kubernetes object: apiVersion and kind are required".to_owned();
            return warn(warnings, "parse_error", message);
        }
        if header.api_version == "v1" && header.kind == "List" {
            return match value.get("items") {
                Some(Value::Sequence(items)) => {
                    let inner = Doc { index: None, ..doc };
                    for item in items.iter().filter(|v| !v.is_null()) {
                        self.add(inner, item.clone(), warnings);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => warn(warnings, "parse_error", "items is not a list".to_owned()),
            };
        }
        let istio = matches!(
            header.api_version.as_str(),
            "security.istio.io/v1" | "security.istio.io/v1beta1"
        );
        let core = header.api_version == "v1";
        let supported = match header.kind.as_str() {
            "Namespace" | "Pod" | "Service" => core,
            "AuthorizationPolicy" | "PeerAuthentication" => istio,
            _ => false,
        };
        if !supported {
            let message = format!(
                "{} {} is not used by the node agent; ignored",
                header.api_version, header.kind
            );
            return warn(warnings, "unsupported", message);
        }
        let Some(name) = header.name.clone() else {
            let e = ObjectError::Missing("metadata.name");
            return warn(warnings, e.kind(), e.to_string());
        };
        let key = (header.namespace(), name.clone());
        let origin = doc.origin;
        // Read before the object is: a policy whose spec does not parse is
        // replaced by a fail-closed one scoped by this selector.
        let selector = value
            .get("spec")
            .and_then(|spec| spec.get("selector"))
            .and_then(|v| serde_yaml::from_value::<WorkloadSelector>(v.clone()).ok());
        let result = match header.kind.as_str() {
            "Namespace" => typed(doc, value)
                .map(|o| insert(&mut self.namespaces, name, &header, origin, o, warnings)),
            "Pod" => typed(doc, value)
                .map(|o| insert(&mut self.pods, key.clone(), &header, origin, o, warnings)),
            "Service" => typed(doc, value).map(|o| {
                insert(
                    &mut self.services,
                    key.clone(),
                    &header,
                    origin,
                    o,
                    warnings,
                )
            }),
            "AuthorizationPolicy" => typed(doc, value).map(|o| {
                let map = &mut self.authorization_policies;
                insert(map, key.clone(), &header, origin, o, warnings)
            }),
            _ => typed(doc, value).map(|o| {
                let map = &mut self.peer_authentications;
                insert(map, key.clone(), &header, origin, o, warnings)
            }),
        };
        let Err(e) = result else { return };
        let scope = if selector.is_some() {
            "the workloads it selects"
        } else {
            "every workload of its namespace"
        };
        match header.kind.as_str() {
            "AuthorizationPolicy" => {
                let message =
                    format!("{e}; until it parses, the agent denies every connection to {scope}");
                warn(warnings, e.kind(), message);
                let stand_in = AuthorizationPolicy::deny_all(selector);
                let map = &mut self.authorization_policies;
                insert(map, key, &header, origin, stand_in, warnings);
            }
            "PeerAuthentication" => {
                let message =
                    format!("{e}; until it parses, {scope} get STRICT (plaintext refused)");
                warn(warnings, e.kind(), message);
                let stand_in = PeerAuthentication::strict(selector);
                let map = &mut self.peer_authentications;
                insert(map, key, &header, origin, stand_in, warnings);
            }
            _ => warn(warnings, e.kind(), e.to_string()),
        }
    }
}

/// The typed object; on failure, serde's message with the field path and the
/// line when the document can be read again from its text.
fn typed<T: DeserializeOwned>(doc: Doc<'_>, value: Value) -> Result<T, ObjectError> {
    serde_yaml::from_value(value).map_err(|e| {
        let located = doc
            .index
            .and_then(|i| serde_yaml::Deserializer::from_str(doc.text).nth(i))
            .and_then(|de| T::deserialize(de).err());
        ObjectError::Yaml(located.unwrap_or(e))
    })
}

fn insert<K: Ord, T>(
    map: &mut BTreeMap<K, Parsed<T>>,
    key: K,
    header: &Header,
    origin: &str,
    object: T,
    warnings: &mut Vec<ConfigWarning>,
) {
    let parsed = Parsed {
        origin: origin.to_owned(),
        object,
    };
    if let Some(first) = map.insert(key, parsed) {
        warnings.push(ConfigWarning {
            object: header.to_string(),
            kind: "duplicate",
            message: format!(
                "defined again in {origin} (first in {}); the later definition is used",
                first.origin
            ),
        });
    }
}

/// A label selector as Istio writes it (`selector: {matchLabels: ...}`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WorkloadSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
}

impl WorkloadSelector {
    /// The labels to match; None when there are none, which selects every
    /// workload of the namespace, as no selector at all does.
    pub fn labels(selector: Option<&WorkloadSelector>) -> Option<BTreeMap<String, String>> {
        selector
            .and_then(|s| s.match_labels.clone())
            .filter(|labels| !labels.is_empty())
    }
}

/// A string that YAML may also have written as a number: Istio's ports are
/// strings (`"8080"`), and `8080` is the natural way to write one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}
