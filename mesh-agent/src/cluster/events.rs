//! Kubernetes Events about objects the agent could not apply as written: a
//! user who runs `kubectl describe authorizationpolicy x` sees why. One
//! Event per warning when it first appears (kube's recorder folds repeats
//! into a series); the log, `/config_dump` and `mesh_config_warnings_total`
//! say the same.

use std::sync::Arc;

use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use super::{
    WATCHED,
    source::{ORIGIN, References},
};
use crate::state::{ConfigWarning, NewWarnings, ObjectKey, Store};

/// The `reportingController` of the agent's Events.
pub const CONTROLLER: &str = "mesh-agent";

/// Events' notes are limited to 1 kB by the API.
const MAX_NOTE: usize = 1000;

pub fn spawn(
    client: Client,
    instance: String,
    references: References,
    mut store: watch::Receiver<Arc<Store>>,
) -> JoinHandle<()> {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.to_owned(),
            instance: Some(instance),
        },
    );
    tokio::spawn(async move {
        let mut new = NewWarnings::default();
        let mut failing = false;
        loop {
            let snapshot = store.borrow_and_update().clone();
            for w in new.of(&snapshot) {
                let Some(key) = object_of(w) else { continue };
                let reference = references
                    .lock()
                    .expect("references lock")
                    .get(&key)
                    .cloned();
                let Some(reference) = reference else { continue };
                let event = Event {
                    type_: EventType::Warning,
                    reason: reason(w.kind),
                    note: Some(truncate(&w.message)),
                    action: "Apply".to_owned(),
                    secondary: None,
                };
                match recorder.publish(&event, &reference).await {
                    Ok(()) => {
                        failing = false;
                        debug!(object = %key, kind = w.kind, "event written");
                    }
                    Err(e) if !failing => {
                        failing = true;
                        warn!(object = %key, error = %e, "cannot write a Kubernetes Event");
                    }
                    Err(_) => {}
                }
            }
            if store.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The API object a warning is about: `kubernetes: Kind ns/name` (parsing)
/// or `Kind ns/name` (applying); None for warnings about files or the
/// source itself.
pub fn object_of(w: &ConfigWarning) -> Option<ObjectKey> {
    let text = w
        .object
        .strip_prefix(ORIGIN)
        .map_or(w.object.as_str(), |rest| {
            rest.strip_prefix(": ").unwrap_or(rest)
        });
    let (kind, rest) = text.split_once(' ')?;
    let resource = WATCHED.iter().find(|r| r.kind == kind)?;
    let (namespace, name) = match rest.split_once('/') {
        Some((ns, name)) if resource.namespaced => (ns.to_owned(), name.to_owned()),
        None if !resource.namespaced => (String::new(), rest.to_owned()),
        _ => return None,
    };
    Some(ObjectKey {
        kind: resource.kind,
        namespace,
        name,
    })
}

/// `l7_rule_at_l4` → `L7RuleAtL4`: Events' reasons are PascalCase.
fn reason(kind: &str) -> String {
    kind.split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_NOTE {
        return message.to_owned();
    }
    let mut end = MAX_NOTE - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warning(object: &str) -> ConfigWarning {
        ConfigWarning {
            object: object.to_owned(),
            kind: "parse_error",
            message: String::new(),
        }
    }

    #[test]
    fn names_the_object_of_a_warning() {
        let key = |o| object_of(&warning(o)).map(|k| k.to_string());
        assert_eq!(
            key("kubernetes: AuthorizationPolicy shop/p").as_deref(),
            Some("AuthorizationPolicy shop/p")
        );
        assert_eq!(key("HTTPRoute shop/r").as_deref(), Some("HTTPRoute shop/r"));
        assert_eq!(key("Namespace shop").as_deref(), Some("Namespace shop"));
        assert_eq!(key("/etc/mesh/a.yaml"), None, "a file");
        assert_eq!(key("kubernetes: httproutes"), None, "the source");
        assert_eq!(key("Widget shop/w"), None, "not a watched kind");
        assert_eq!(key("Pod nonamespace"), None);
        assert_eq!(reason("l7_rule_at_l4"), "L7RuleAtL4");
        assert_eq!(reason("missing_waypoint"), "MissingWaypoint");
        assert!(truncate(&"é".repeat(600)).len() <= MAX_NOTE);
    }
}
