//! JSON configuration: the same objects and warnings as the same YAML, a
//! long List read in parts as in one piece, and malformed JSON refused
//! with its line and column.

use std::time::Duration;

use super::*;
use crate::state::{LocalFiles, Store, tests::opts};

/// A YAML text with a Namespace, Pods, a Service, a policy, and objects
/// the agent warns about: a Pod whose port is not a number, a Deployment,
/// a Pod without a name. A label's key and value hold quotes, which JSON
/// escapes (such a string is copied, not borrowed from the text).
const YAML: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: u1
  labels: {app: web, "we\"ird": "say \"hi\""}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9, uid: r1, controller: true}]
  managedFields: [{manager: kubelet, fieldsV1: {"f:status": {}}}]
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: app, image: "web:1", ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.1.0.7, podIPs: [{ip: 10.1.0.7}, {ip: "fd00::7"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: shop}
spec:
  containers: [{name: app, ports: [{containerPort: http}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [other]}}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop}
"#;

/// The YAML's documents as a `kubectl get -o json` List.
fn as_json_list(yaml: &str) -> String {
    let items: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(yaml)
        .map(|de| serde_json::to_value(serde_yaml::Value::deserialize(de).unwrap()).unwrap())
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items});
    serde_json::to_string_pretty(&list).unwrap()
}

fn warnings_of(store: &Store) -> Vec<(String, &'static str)> {
    store
        .warnings
        .iter()
        .map(|w| (w.object.clone(), w.kind))
        .collect()
}

fn warnings(doc: &Document) -> Vec<(String, &'static str)> {
    doc.warnings
        .iter()
        .map(|w| (w.object.clone(), w.kind))
        .collect()
}

#[test]
fn a_json_list_gives_the_same_store_as_the_same_yaml() {
    let yaml = Document::parse_text("c", YAML);
    let json = Document::parse_json("c", &as_json_list(YAML));
    assert!(json.syntax_error.is_none(), "{:?}", json.syntax_error);
    assert_eq!(json.entries_debug(), yaml.entries_debug());
    assert_eq!(warnings(&json), warnings(&yaml));
    assert_eq!(
        warnings(&json),
        [
            ("c: Pod shop/bad".to_owned(), "parse_error"),
            ("c: Deployment shop/web".to_owned(), "unsupported"),
            ("c: Pod shop/<unnamed>".to_owned(), "parse_error"),
        ]
    );
    let keys: Vec<String> = json.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "Namespace shop",
            "Pod shop/web-1",
            "Service shop/web",
            "AuthorizationPolicy shop/deny-other"
        ]
    );
    let opts = opts();
    let (a, b) = (
        Store::from_documents([&yaml], &opts),
        Store::from_documents([&json], &opts),
    );
    // The same, but for the messages' lines (in the YAML text, in the JSON
    // text).
    let unlined = |s: &Store| {
        let mut dump = s.dump();
        dump["warnings"] = serde_json::json!(warnings_of(s));
        dump
    };
    assert_eq!(unlined(&a), unlined(&b));
    assert_eq!(b.workloads.len(), 1);
    assert_eq!(b.policies.len(), 1);
    let web = b.workload("shop", "web-1").unwrap();
    assert_eq!(
        web.labels.get("we\"ird").map(String::as_str),
        Some("say \"hi\"")
    );

    // One object, not in a List: the same.
    let pod: serde_yaml::Value = serde_yaml::Deserializer::from_str(YAML)
        .nth(1)
        .map(|de| serde_yaml::Value::deserialize(de).unwrap())
        .unwrap();
    let one = Document::parse_json("c", &serde_json::to_string(&pod).unwrap());
    let keys: Vec<String> = one.keys().map(ToString::to_string).collect();
    assert_eq!(keys, ["Pod shop/web-1"]);
    assert!(one.warnings.is_empty() && one.syntax_error.is_none());
}

/// A bad object names itself and the line and column of what is wrong in
/// the file; the other objects load.
#[test]
fn a_bad_object_is_named_with_its_line_and_the_rest_loads() {
    let text = as_json_list(YAML);
    let doc = Document::parse_json("c.json", &text);
    let w = &doc.warnings[0];
    assert_eq!(
        (w.object.as_str(), w.kind),
        ("c.json: Pod shop/bad", "parse_error")
    );
    let line = 1 + text
        .lines()
        .position(|l| l.contains("\"containerPort\": \"http\""))
        .unwrap();
    assert!(
        w.message.contains(&format!("at line {line} column")),
        "line {line}: {}",
        w.message
    );
    assert!(w.message.contains("expected i32"), "{}", w.message);
    assert_eq!(doc.keys().count(), 4);
    assert!(doc.syntax_error.is_none());
}

/// Malformed JSON: the file is refused with the line and column of the
/// error, whether it is in an item or around the items.
#[test]
fn malformed_json_is_a_syntax_error_with_its_line_and_column() {
    let text = as_json_list(YAML).replacen("\"name\": \"web-1\",", "\"name\": \"web-1\"", 1);
    let line = 1 + text.lines().position(|l| l.contains("\"web-1\"")).unwrap() + 1;
    for parts in [1, 3] {
        let doc = Document::parse_json_in_parts("c.json", &text, parts);
        let e = doc.syntax_error.as_ref().expect("a syntax error");
        assert_eq!((e.object.as_str(), e.kind), ("c.json", "parse_error"));
        assert!(
            e.message.contains(&format!("line {line} column")),
            "line {line}: {}",
            e.message
        );
    }
    for text in [
        "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [{}, ]}",
        "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": []",
        "{\"apiVersion\": \"v1\", \"kind\": \"List\",\n \"items\": [], oops}",
        "{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {\"name\": \"a\"}, \"metadata\": {}}",
        "[1, 2",
        "",
    ] {
        let doc = Document::parse_json("c.json", text);
        assert!(doc.syntax_error.is_some(), "{text}: {doc:?}");
        assert_eq!(doc.keys().count(), 0, "{text}");
    }
    let e = Document::parse_json(
        "c.json",
        "{\"apiVersion\": \"v1\", \"kind\": \"List\",\n \"items\": [], oops}",
    )
    .syntax_error
    .unwrap();
    assert!(e.message.contains("line 2 column 15"), "{}", e.message);
    // Not an object: a warning, as for YAML.
    let doc = Document::parse_json("c.json", "[1, 2]");
    assert!(doc.syntax_error.is_none());
    assert_eq!(
        warnings(&doc),
        [("c.json: object <unnamed>".to_owned(), "parse_error")]
    );
}

fn pods(n: usize, bad: Option<usize>) -> String {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let port = if Some(i) == bad {
                serde_json::json!("http")
            } else {
                serde_json::json!(8080)
            };
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": "ns", "labels": {"a": "x]\"[{", "é": "ü€😀"}},
                "spec": {"containers": [{"name": "c", "ports": [{"containerPort": port}]}]},
                "status": {"podIP": format!("10.0.{}.{}", i / 200, i % 200 + 1)},
            })
        })
        .collect();
    let list = serde_json::json!({"kind": "List", "items": items, "apiVersion": "v1"});
    serde_json::to_string_pretty(&list).unwrap()
}

/// A long List read in parts: the same objects in the same order and the
/// same warnings (with the same lines) as in one piece.
#[test]
fn parts_read_as_the_whole() {
    let text = pods(100, Some(70));
    let whole = Document::parse_json_in_parts("t.json", &text, 1);
    assert_eq!(whole.keys().count(), 99);
    assert_eq!(whole.warnings.len(), 1);
    assert!(
        whole.warnings[0].message.contains("line "),
        "{:?}",
        whole.warnings
    );
    for parts in [2, 3, 7] {
        let parted = Document::parse_json_in_parts("t.json", &text, parts);
        assert_eq!(parted.entries_debug(), whole.entries_debug(), "{parts}");
        assert_eq!(parted.warnings, whole.warnings, "{parts}");
    }
}

/// A pretty-printed List is cut where a line closes an item at the items'
/// indentation; where an object nested in an item is laid out the same
/// way, a cut there does not read as a run of items, and the text is read
/// the general way: the same objects and warnings either way.
#[test]
fn a_cut_inside_an_item_is_noticed() {
    let nested = "{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"c\"},\n\
                  \"data\": [\n{\"x\": 1\n},\n{\"y\": \"},\\n{\"\n},\n{\"z\": 2\n}]\n}";
    let pod = |i: usize| {
        format!(
            "{{\"apiVersion\": \"v1\", \"kind\": \"Pod\",\n\"metadata\": {{\"name\": \"p{i}\", \"namespace\": \"ns\"}}\n}}"
        )
    };
    let items: Vec<String> = (0..40)
        .map(|i| {
            if i % 2 == 0 {
                nested.to_owned()
            } else {
                pod(i)
            }
        })
        .collect();
    let text = format!(
        "{{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n{}\n], \"metadata\": {{}}}}\n",
        items.join(",\n")
    );
    let whole = Document::parse_json_in_parts("t.json", &text, 1);
    assert_eq!(whole.keys().count(), 20);
    assert_eq!(whole.warnings.len(), 20, "the ConfigMaps: unsupported");
    assert!(whole.syntax_error.is_none());
    for parts in 2..12 {
        let parted = Document::parse_json_in_parts("t.json", &text, parts);
        assert_eq!(parted.entries_debug(), whole.entries_debug(), "{parts}");
        assert_eq!(parted.warnings, whole.warnings, "{parts}");
    }
    // Cut in the pods' runs, not in the nested objects: read in parts.
    let pods: Vec<String> = (0..40).map(pod).collect();
    let text = format!(
        "{{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n{}\n]}}",
        pods.join(",\n")
    );
    let cut = Document::json_list_cut("t.json", &text, 3).expect("read in parts");
    assert_eq!(cut.keys().count(), 40);
    // Not a List around the items: not read so.
    let other = text.replace("\"List\"", "\"PodList\"");
    assert!(Document::json_list_cut("t.json", &other, 3).is_none());
}

/// The items are found past strings holding brackets, commas and escaped
/// quotes, and only in the top-level object's `items`.
#[test]
fn the_layout_follows_strings_and_nesting() {
    let text = r#"{"a": {"items": [9]}, "s": "\"items\": [", "items": [ {"x": "],\\"}, [1, {}] , 2 ], "z": 1}"#;
    let l = layout(text).expect("a layout");
    let items: Vec<&str> = l.items.iter().map(|&(f, t)| text[f..t].trim()).collect();
    assert_eq!(items, [r#"{"x": "],\\"}"#, "[1, {}]", "2"]);
    assert_eq!(
        &text[l.array.0..l.array.1],
        r#"[ {"x": "],\\"}, [1, {}] , 2 ]"#
    );
    assert_eq!(layout(r#"{"items": []}"#).unwrap().items, []);
    assert_eq!(layout(r#"{"items": [1] "#), None, "not closed");
    assert_eq!(layout(r#"{"items": ["1]}"#), None, "a string not closed");
    assert_eq!(layout(r#"[{"items": [1]}]"#), None, "not an object");
}

/// A directory of YAML and JSON files: both read, other files not.
#[test]
fn a_directory_mixes_yaml_and_json() {
    let dir = std::env::temp_dir().join(format!("mesh-state-{}-json-mixed", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    std::fs::write(dir.join("a.yaml"), pod("a", "10.4.0.1")).unwrap();
    std::fs::write(dir.join("b.json"), as_json_list(&pod("b", "10.4.0.2"))).unwrap();
    std::fs::write(dir.join("c.json.txt"), as_json_list(&pod("c", "10.4.0.3"))).unwrap();
    std::fs::write(dir.join("d.json"), "{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {\"name\": \"d\", \"namespace\": \"shop\"}, \"status\": {\"podIP\": \"10.4.0.4\"}}").unwrap();
    let mut src = LocalFiles::new(dir.clone(), Duration::from_secs(1)).with_settle(Duration::ZERO);
    let diff = src.scan().unwrap().expect("first scan reads everything");
    let keys: Vec<String> = diff.added.iter().map(ToString::to_string).collect();
    assert_eq!(keys, ["Pod shop/a", "Pod shop/b", "Pod shop/d"]);
    let store = Store::from_documents(src.documents(), &opts());
    assert_eq!(store.workloads.len(), 3);

    // A malformed version of a JSON file is not applied: its last good
    // version stays, with a warning naming the file, line and column.
    std::fs::write(dir.join("b.json"), "{\"apiVersion\": \"v1\",\n \"kind\": }").unwrap();
    src.scan().unwrap().expect("the file was read");
    let store = Store::from_documents(src.documents(), &opts());
    assert_eq!(store.workloads.len(), 3, "b's last good version stays");
    let w = store
        .warnings
        .iter()
        .find(|w| w.object.ends_with("b.json"))
        .expect("a warning about b.json");
    assert!(w.message.contains("line 2 column 10"), "{}", w.message);
    assert!(w.message.contains("not applied"), "{}", w.message);
    std::fs::remove_dir_all(&dir).unwrap();
}
