//! The fast way to read a Pod out of YAML: straight into the fields the
//! agent reads (see [`super::k8s`]), every other field skipped without
//! being built, where the general way builds the whole document as a YAML
//! value tree and then the whole typed Kubernetes Pod (managed fields,
//! container specs, env, probes, volumes, conditions) only to drop most of
//! it. A cluster's pods are most of a large configuration, and this is
//! what its start-up time goes to.
//!
//! Only for a document that reads whole this way: any error (a field of the
//! wrong type, a duplicate key, a syntax error) sends the document down the
//! general way, which names the field and the line as before.
//!
//! What it reads goes into the fields a workload is built from
//! ([`PodFields`]), borrowed from the text where the parser can lend them
//! (a JSON string without escapes; YAML's are copied): only what the
//! workload keeps is copied (its name and uid, a label set or a string no
//! pod before had). What [`super::k8s`] does not read is checked the same
//! (a string where the Pod has one) but not kept: the annotations besides
//! those it reads ([`super::k8s::ANNOTATIONS_READ`]), a container's name,
//! an owner's `apiVersion` and `uid`, a port's `protocol` and `hostIP`.
//! With 30,000 pods each string copied and freed costs start-up time twice
//! over: the parse threads share glibc's one arena ([`crate::malloc`]),
//! and each takes its lock.

use std::{
    borrow::Cow,
    fmt,
    hash::{Hash as _, Hasher as _},
    marker::PhantomData,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use serde_yaml::{Mapping, Value};

use super::k8s::{ANNOTATIONS_READ, PodFields};

/// One document, as the first look at it found it.
#[allow(
    clippy::large_enum_variant,
    reason = "moved a few times on the way out of the parser, where a box was one more allocation a pod"
)]
pub(super) enum Probe<'de> {
    /// An empty document.
    Null,
    /// A `v1` `Pod`: the fields the agent reads.
    Pod(PodFields<'de>),
    /// Any other mapping, whole, for the general way.
    Other(Value),
}

/// A string, as the general way reads one: YAML's `1`, `true` or `1.5`
/// are not strings (serde_yaml would hand them to a typed `String` as
/// text; the value tree keeps them as numbers and booleans, which a
/// Kubernetes string field refuses). Borrowed when the parser lends it.
#[derive(Default)]
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Str<'a>, D::Error> {
        struct V<'a>(PhantomData<&'a str>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

fn text(s: Option<Str<'_>>) -> Option<Cow<'_, str>> {
    s.map(|s| s.0)
}

/// A string checked as [`Str`] checks one, and not kept.
struct SkippedStr;

impl<'de> Deserialize<'de> for SkippedStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SkippedStr, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SkippedStr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<SkippedStr, E> {
                Ok(SkippedStr)
            }
        }
        d.deserialize_any(V)
    }
}

/// A map's key, read as [`Str`] reads one.
enum MapKey<'a> {
    /// Kept: `keep` accepts it.
    Kept(Cow<'a, str>),
    /// Not kept: only its hash, to notice it given twice.
    Skipped(u64),
}

/// Reads a [`MapKey`], kept if `keep` says so.
struct KeySeed(fn(&str) -> bool);

impl<'de> de::DeserializeSeed<'de> for KeySeed {
    type Value = MapKey<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<MapKey<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = MapKey<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<MapKey<'de>, E> {
        Ok(self.key(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<MapKey<'de>, E> {
        // Copied only when kept.
        Ok(match self.key(Cow::Borrowed(v)) {
            MapKey::Kept(key) => MapKey::Kept(Cow::Owned(key.into_owned())),
            MapKey::Skipped(hash) => MapKey::Skipped(hash),
        })
    }
}

impl KeySeed {
    fn key(self, v: Cow<'_, str>) -> MapKey<'_> {
        if (self.0)(&v) {
            MapKey::Kept(v)
        } else {
            let mut hasher = std::hash::DefaultHasher::new();
            v.hash(&mut hasher);
            MapKey::Skipped(hasher.finish())
        }
    }
}

/// A map's entries kept by [`string_map`]: sorted by key, each key once.
type Entries<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// A map of strings to strings, every key and value checked as
/// `BTreeMap<Str, Str>` checks them, with only the entries whose key
/// `keep` accepts. A key given twice is an error, as the general way
/// (a YAML value tree) has it; one not kept is known by its hash, so two
/// keys of one hash read as the same (an error, and the general way
/// decides).
fn string_map<'de, A: MapAccess<'de>>(
    mut access: A,
    keep: fn(&str) -> bool,
) -> Result<Entries<'de>, A::Error> {
    let mut map = Vec::new();
    let mut skipped = Hashes::default();
    let duplicate = || de::Error::custom("duplicate key");
    while let Some(key) = access.next_key_seed(KeySeed(keep))? {
        match key {
            MapKey::Kept(key) => map.push((key, access.next_value::<Str<'de>>()?.0)),
            MapKey::Skipped(hash) => {
                if !skipped.insert(hash) {
                    return Err(duplicate());
                }
                access.next_value::<SkippedStr>()?;
            }
        }
    }
    map.sort_by(|a, b| a.0.cmp(&b.0));
    if map.windows(2).any(|pair| pair[0].0 == pair[1].0) {
        return Err(duplicate());
    }
    Ok(map)
}

/// The hashes of a map's keys skipped so far: the first few (all of most
/// pods' annotations) without an allocation.
#[derive(Default)]
struct Hashes {
    few: [u64; 8],
    len: usize,
    more: Vec<u64>,
}

impl Hashes {
    /// False when `hash` is in already.
    fn insert(&mut self, hash: u64) -> bool {
        let held = self.len.min(self.few.len());
        if self.few[..held].contains(&hash) || self.more.contains(&hash) {
            return false;
        }
        match self.few.get_mut(self.len) {
            Some(slot) => *slot = hash,
            None => self.more.push(hash),
        }
        self.len += 1;
        true
    }
}

/// A Visitor of a [`string_map`].
struct StringMap(fn(&str) -> bool);

impl<'de> Visitor<'de> for StringMap {
    type Value = Entries<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
        string_map(access, self.0)
    }
}

/// A pod's labels, every one.
struct Labels<'a>(Entries<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Labels<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Labels<'a>, D::Error> {
        d.deserialize_map(StringMap(|_| true)).map(Labels)
    }
}

/// A pod's annotations: only those the agent reads
/// ([`super::k8s::ANNOTATIONS_READ`]) are kept. A pod carries many that
/// it does not (tools' notes, scrape settings), each a string to copy and
/// free.
struct Annotations<'a>(Entries<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Annotations<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Annotations<'a>, D::Error> {
        d.deserialize_map(StringMap(|key| ANNOTATIONS_READ.contains(&key)))
            .map(Annotations)
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta<'a> {
    #[serde(default, borrow)]
    name: Option<Str<'a>>,
    #[serde(default, borrow)]
    namespace: Option<Str<'a>>,
    #[serde(default, borrow)]
    uid: Option<Str<'a>>,
    #[serde(default, borrow)]
    labels: Option<Labels<'a>>,
    #[serde(default, borrow)]
    annotations: Option<Annotations<'a>>,
    #[serde(default, borrow)]
    owner_references: Option<Gathered<Controller<'a>>>,
}

/// An owner reference: its kind and name are read, and whether it is the
/// controller; the rest is checked, not kept.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code, reason = "read to be checked, not kept")]
struct Owner<'a> {
    #[serde(default)]
    api_version: Option<SkippedStr>,
    #[serde(default, borrow)]
    kind: Option<Str<'a>>,
    #[serde(default, borrow)]
    name: Option<Str<'a>>,
    #[serde(default)]
    uid: Option<SkippedStr>,
    #[serde(default)]
    controller: Option<bool>,
    #[serde(default)]
    block_owner_deletion: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec<'a> {
    #[serde(default, borrow)]
    node_name: Option<Str<'a>>,
    #[serde(default, borrow)]
    service_account_name: Option<Str<'a>>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default, borrow)]
    containers: Option<Gathered<ContainerPorts<'a>>>,
}

#[derive(Deserialize)]
struct ContainerLite<'a> {
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "checked to be a string, not kept: nothing reads it"
    )]
    name: Option<SkippedStr>,
    #[serde(default, borrow)]
    ports: Option<Gathered<NamedPorts<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code, reason = "read to be checked, not kept")]
struct Port<'a> {
    #[serde(default, borrow)]
    name: Option<Str<'a>>,
    #[serde(default)]
    container_port: Option<i32>,
    #[serde(default, rename = "hostIP")]
    host_ip: Option<SkippedStr>,
    #[serde(default)]
    host_port: Option<i32>,
    #[serde(default)]
    protocol: Option<SkippedStr>,
}

#[derive(Deserialize)]
struct Ip<'a> {
    #[serde(default, borrow)]
    ip: Option<Str<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    #[serde(default, borrow)]
    phase: Option<Str<'a>>,
    #[serde(default, rename = "podIP", borrow)]
    pod_ip: Option<Str<'a>>,
    #[serde(default, rename = "podIPs", borrow)]
    pod_ips: Option<Gathered<Ips<'a>>>,
}

/// A sequence read one element at a time into `Self`, without a list of
/// its elements built (each would be an allocation a pod).
trait Gather: Default {
    type Item;
    fn add(&mut self, item: Self::Item);
}

/// A sequence gathered into `G`.
struct Gathered<G>(G);

impl<'de, G: Gather> Deserialize<'de> for Gathered<G>
where
    G::Item: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Gathered<G>, D::Error> {
        struct V<G>(PhantomData<G>);
        impl<'de, G: Gather> Visitor<'de> for V<G>
        where
            G::Item: Deserialize<'de>,
        {
            type Value = Gathered<G>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Gathered<G>, A::Error> {
                let mut gathered = G::default();
                while let Some(item) = seq.next_element()? {
                    gathered.add(item);
                }
                Ok(Gathered(gathered))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// The kind and name of the first owner reference that is the
/// controller; every one is checked.
#[derive(Default)]
struct Controller<'a>(Option<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Gather for Controller<'a> {
    type Item = Owner<'a>;

    fn add(&mut self, owner: Owner<'a>) {
        if self.0.is_none() && owner.controller == Some(true) {
            let part = |s| text(s).unwrap_or_default();
            self.0 = Some((part(owner.kind), part(owner.name)));
        }
    }
}

/// The named ports of a container's `ports`.
#[derive(Default)]
struct NamedPorts<'a>(Vec<(Cow<'a, str>, i32)>);

impl<'a> Gather for NamedPorts<'a> {
    type Item = Port<'a>;

    fn add(&mut self, port: Port<'a>) {
        if let Some(name) = text(port.name) {
            self.0.push((name, port.container_port.unwrap_or_default()));
        }
    }
}

/// The named ports of every container, in order.
#[derive(Default)]
struct ContainerPorts<'a>(Vec<(Cow<'a, str>, i32)>);

impl<'a> Gather for ContainerPorts<'a> {
    type Item = ContainerLite<'a>;

    fn add(&mut self, container: ContainerLite<'a>) {
        let Some(Gathered(NamedPorts(ports))) = container.ports else {
            return;
        };
        if self.0.is_empty() {
            // The first container's list is taken, not copied.
            self.0 = ports;
        } else {
            self.0.extend(ports);
        }
    }
}

/// `podIPs`' addresses.
#[derive(Default)]
struct Ips<'a>(Vec<Cow<'a, str>>);

impl<'a> Gather for Ips<'a> {
    type Item = Ip<'a>;

    fn add(&mut self, ip: Ip<'a>) {
        self.0.push(text(ip.ip).unwrap_or_default());
    }
}

/// The fields a workload is built from, moved out of the parts read (a
/// part missing or `null` reads as one with no fields).
fn pod_fields<'a>(meta: Meta<'a>, spec: Spec<'a>, status: Status<'a>) -> PodFields<'a> {
    let mut annotations = <[Option<Cow<'a, str>>; 3]>::default();
    for (key, value) in meta.annotations.map(|a| a.0).unwrap_or_default() {
        if let Some(at) = ANNOTATIONS_READ.iter().position(|k| *k == key) {
            annotations[at] = Some(value);
        }
    }
    PodFields {
        name: text(meta.name),
        namespace: text(meta.namespace),
        uid: text(meta.uid),
        labels: meta.labels.map(|l| l.0).unwrap_or_default(),
        annotations,
        controller: meta.owner_references.and_then(|o| o.0.0),
        ports: spec.containers.map(|c| c.0.0).unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
        service_account: text(spec.service_account_name),
        node: text(spec.node_name),
        phase: text(status.phase),
        pod_ips: status.pod_ips.map(|ips| ips.0.0).unwrap_or_default(),
        pod_ip: text(status.pod_ip),
    }
}

/// A string read as [`Str`] reads one; one of `known` is not copied. For
/// the object's top-level keys (those a Pod is read by) and the values of
/// `apiVersion` and `kind` (a Pod's). Anything but a string is an error
/// here (YAML allows a key that is not one): such a document is read the
/// general way, which says what is wrong.
struct Known(&'static [&'static str]);

/// The keys a Pod is read by.
const TOP_KEYS: Known = Known(&["apiVersion", "kind", "metadata", "spec", "status"]);
/// A Pod's `apiVersion` and `kind`.
const POD_TAGS: Known = Known(&["v1", "Pod"]);

impl<'de> de::DeserializeSeed<'de> for Known {
    type Value = Cow<'static, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'static, str>, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Known {
    type Value = Cow<'static, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cow<'static, str>, E> {
        Ok(match self.0.iter().find(|k| **k == v) {
            Some(known) => Cow::Borrowed(known),
            None => Cow::Owned(v.to_owned()),
        })
    }
}

/// `apiVersion` or `kind` as read: how many of the object's keys were
/// read before it, and its value.
type Seen = Option<(usize, Cow<'static, str>)>;

/// The object's other entries (every key but the two, in the order read)
/// with `apiVersion` and `kind` put back where they came.
fn with_tags(map: Mapping, mut tags: [(&'static str, Seen); 2]) -> Mapping {
    let keys = map.len() + tags.iter().filter(|(_, seen)| seen.is_some()).count();
    let mut rest = map.into_iter();
    let mut out = Mapping::with_capacity(keys);
    for read in 0..keys {
        let tag = tags.iter_mut().find_map(|(key, seen)| {
            let (_, value) = seen.take_if(|(at, _)| *at == read)?;
            Some((*key, value))
        });
        match tag {
            Some((key, value)) => {
                out.insert(
                    Value::String(key.to_owned()),
                    Value::String(value.into_owned()),
                );
            }
            None => out.extend(rest.next()),
        }
    }
    out
}

/// A part read before `apiVersion` and `kind` said what the object is: kept
/// as a value, read into its type at the end.
fn part<'de, T: Deserialize<'de>, E: de::Error>(
    typed: Option<Option<T>>,
    map: &mut Mapping,
    key: &str,
) -> Result<Option<T>, E> {
    match (typed, map.remove(key)) {
        (Some(part), None) => Ok(part),
        (None, Some(value)) => Option::<T>::deserialize(value).map_err(E::custom),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(E::custom(format!("duplicate field `{key}`"))),
    }
}

impl<'de> Deserialize<'de> for Probe<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Probe<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Probe<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Kubernetes object")
            }

            fn visit_unit<E: de::Error>(self) -> Result<Probe<'de>, E> {
                Ok(Probe::Null)
            }

            fn visit_none<E: de::Error>(self) -> Result<Probe<'de>, E> {
                Ok(Probe::Null)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Probe<'de>, A::Error> {
                let mut map = Mapping::new();
                let (mut meta, mut spec, mut status) = (None, None, None);
                let (mut api_version, mut kind): (Seen, Seen) = (None, None);
                // Whether `apiVersion` and `kind`, as read so far, say Pod.
                let mut pod = false;
                for read in 0.. {
                    let Some(key) = access.next_key_seed(TOP_KEYS)? else {
                        break;
                    };
                    let duplicate = || de::Error::custom("duplicate key");
                    match &*key {
                        "metadata" if pod && meta.is_none() => {
                            meta = Some(access.next_value::<Option<Meta<'de>>>()?);
                        }
                        "spec" if pod && spec.is_none() => {
                            spec = Some(access.next_value::<Option<Spec<'de>>>()?);
                        }
                        "status" if pod && status.is_none() => {
                            status = Some(access.next_value::<Option<Status<'de>>>()?);
                        }
                        "metadata" | "spec" | "status" if pod => return Err(duplicate()),
                        "apiVersion" | "kind" => {
                            let seen = if key == "kind" {
                                &mut kind
                            } else {
                                &mut api_version
                            };
                            if seen.is_some() {
                                return Err(duplicate());
                            }
                            *seen = Some((read, access.next_value_seed(POD_TAGS)?));
                            let is =
                                |seen: &Seen, want| seen.as_ref().is_some_and(|(.., v)| v == want);
                            pod = is(&api_version, "v1") && is(&kind, "Pod");
                        }
                        _ => {
                            let value: Value = access.next_value()?;
                            if map.insert(Value::String(key.into_owned()), value).is_some() {
                                return Err(duplicate());
                            }
                        }
                    }
                }
                if !pod {
                    if meta.is_some() || spec.is_some() || status.is_some() {
                        // apiVersion or kind changed after: the general way
                        // says what is wrong.
                        return Err(de::Error::custom("not a Pod after all"));
                    }
                    let map = with_tags(map, [("apiVersion", api_version), ("kind", kind)]);
                    return Ok(Probe::Other(Value::Mapping(map)));
                }
                let meta = part::<Meta, A::Error>(meta, &mut map, "metadata")?;
                let spec = part::<Spec, A::Error>(spec, &mut map, "spec")?;
                let status = part::<Status, A::Error>(status, &mut map, "status")?;
                Ok(Probe::Pod(pod_fields(
                    meta.unwrap_or_default(),
                    spec.unwrap_or_default(),
                    status.unwrap_or_default(),
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use crate::state::Document;

    /// A Pod the way the API server sends one, with what the agent reads
    /// and much it does not.
    const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web-7d9c5b6f4-x2k9p
  namespace: shop
  uid: 3f6c1a52-0001
  labels: {app: web, version: v1, pod-template-hash: 7d9c5b6f4}
  annotations: {mesh-agent/netns: /run/netns/web, ambient.istio.io/redirection: enabled}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9c5b6f4, uid: u1, controller: true}
  managedFields:
  - manager: kubelet
    fieldsV1: {f:status: {f:podIP: {}}}
spec:
  nodeName: node-a
  serviceAccountName: web-sa
  containers:
  - name: app
    image: web:1
    env: [{name: A, value: b}]
    ports: [{name: http, containerPort: 8080}, {containerPort: 9000}]
  - name: side
    ports: [{name: metrics, containerPort: 9090, protocol: TCP}]
  volumes: [{name: v, projected: {sources: []}}]
status:
  phase: Running
  conditions: [{type: Ready, status: "True"}]
  podIP: 10.1.0.7
  podIPs: [{ip: 10.1.0.7}, {ip: "fd00::7"}]
"#;

    /// The same text read the fast way (a document of its own) and the
    /// general way (an item of a `kind: List`, which takes the YAML value
    /// tree and the whole Kubernetes Pod): the same objects, and the same
    /// warnings (the fast way's falls back to the general way, which then
    /// also names the field's path and line).
    fn both_ways(pod: &str) -> (String, String) {
        let fast = Document::parse_text("p.yaml", pod);
        let indented: String = pod.lines().map(|l| format!("  {l}\n")).collect();
        let list = format!("apiVersion: v1\nkind: List\nitems:\n-\n{indented}");
        let general = Document::parse_text("p.yaml", &list);
        assert_eq!(fast.warnings().len(), general.warnings().len(), "{pod}");
        for (f, g) in fast.warnings().iter().zip(general.warnings()) {
            assert_eq!((&f.object, f.kind), (&g.object, g.kind), "{pod}");
            assert!(f.message.contains(&g.message), "{f:?} {g:?}");
        }
        (fast.entries_debug(), general.entries_debug())
    }

    #[test]
    fn a_pod_reads_the_same_both_ways() {
        let (fast, general) = both_ways(POD);
        assert_eq!(fast, general);
        for read in [
            "web-sa",
            "node-a",
            "10.1.0.7",
            "fd00::7",
            "\"metrics\": 9090",
            "\"http\": 8080",
            "/run/netns/web",
            "redirected: true",
            "owner: Some(\"web\")",
            "owner_kind: Some(\"deployment\")",
        ] {
            assert!(fast.contains(read), "{read} not in {fast}");
        }
    }

    #[test]
    fn kind_after_the_fields_and_missing_parts_read_the_same() {
        let late = "metadata: {name: late, namespace: shop, labels: {app: a}}\n\
                    status: {podIP: 10.1.0.8}\napiVersion: v1\nkind: Pod\n";
        let (fast, general) = both_ways(late);
        assert_eq!(fast, general);
        assert!(fast.contains("10.1.0.8"), "{fast}");
        for pod in [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: nulls}\nspec: null\nstatus: ~\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: done}\nstatus: {phase: Succeeded}\n",
            "apiVersion: v1\nkind: Pod\nspec: {nodeName: n}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: badip}\nstatus: {podIP: nope}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: n, labels: {version: 1}}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: 7}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: h}\nspec: {hostNetwork: true}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: h, labels: {1: a, b: true}}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: o, ownerReferences: [{name: 5}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: s}\nspec: {hostNetwork: \"true\"}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\n\
             spec: {containers: [{name: 1, ports: [{name: 2, containerPort: 80}]}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\n\
             spec: {containers: [{name: c, ports: [{name: p, containerPort: \"80\"}]}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: i}\nstatus: {podIPs: [{ip: 1}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: q, labels: {a: \"1\", b: \"\"}}\n",
            // Fields it does not keep are checked all the same.
            "apiVersion: v1\nkind: Pod\nmetadata: {name: n, annotations: {note: 1}}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: n, annotations: {1: note}}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: n, annotations: {a: b, \
             sidecar.istio.io/status: x, ambient.istio.io/redirection: enabled}}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: o, ownerReferences: \
             [{apiVersion: 1, kind: ReplicaSet, name: r, uid: u, controller: true}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: o, ownerReferences: \
             [{apiVersion: v1, kind: Job, name: j, uid: [u], controller: true}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\n\
             spec: {containers: [{name: c, ports: [{name: p, containerPort: 80, protocol: 6}]}]}\n",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\n\
             spec: {containers: [{name: c, ports: [{name: p, containerPort: 80, hostIP: {}}]}]}\n",
            // A key that is not a string, at the top.
            "apiVersion: v1\nkind: Pod\nmetadata: {name: t}\n1: x\n",
        ] {
            let (fast, general) = both_ways(pod);
            assert_eq!(fast, general, "{pod}");
        }
    }

    /// An object that is not a Pod is handed on whole, its keys in the
    /// order written (`apiVersion` and `kind`, read apart, put back), as
    /// the general way reads it.
    #[test]
    fn an_object_not_a_pod_keeps_its_keys_in_order() {
        use serde::Deserialize as _;
        for text in [
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
            "kind: Service\napiVersion: v1\nmetadata: {name: s}\n",
            "metadata: {name: s}\napiVersion: v1\nspec: {}\nkind: Service\n",
            "metadata: {name: s}\nspec: {}\nkind: Service\n",
            "a: 1\nkind: Service\napiVersion: v1\nb: 2\n",
            "apiVersion: apps/v1\nkind: Pod\nmetadata: {name: p}\n",
        ] {
            let de = serde_yaml::Deserializer::from_str(text);
            let Ok(super::Probe::Other(read)) = super::Probe::deserialize(de) else {
                panic!("{text}: not handed on");
            };
            let general: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
            assert_eq!(read, general, "{text}");
            let keys = |v: &serde_yaml::Value| -> Vec<serde_yaml::Value> {
                v.as_mapping().unwrap().keys().cloned().collect()
            };
            assert_eq!(keys(&read), keys(&general), "{text}");
        }
    }

    /// A key given twice in a pod's labels or annotations (kept or not) is
    /// refused, as the general way refuses it, naming the key and the line.
    #[test]
    fn a_key_given_twice_in_labels_or_annotations_is_refused() {
        for (field, key) in [("labels", "app"), ("annotations", "note")] {
            let text = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: n, namespace: x, \
                 {field}: {{{key}: a, {key}: b}}}}\n"
            );
            let doc = Document::parse_text("t.yaml", &text);
            assert_eq!(doc.keys().count(), 0, "{text}");
            let warnings = doc.warnings();
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            let message = &warnings[0].message;
            assert!(
                message.contains(&format!("duplicate entry with key \"{key}\"")),
                "{message}"
            );
            assert!(message.contains("line 3"), "{message}");
        }
    }

    /// The fast read refuses a key given twice wherever it comes (an
    /// annotation's among the first few skipped keys, held without an
    /// allocation, or after them; a label's anywhere), and reads a map of
    /// many distinct keys.
    #[test]
    fn the_fast_read_finds_a_key_given_twice_among_many() {
        use super::Probe;
        let read = |field: &str, keys: &[String]| {
            let entries: Vec<String> = keys.iter().map(|k| format!("\"{k}\": \"v\"")).collect();
            let json = format!(
                r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "n", "{field}": {{{}}}}}}}"#,
                entries.join(", ")
            );
            serde_json::from_str::<Probe>(&json).map(|p| matches!(p, Probe::Pod(_)))
        };
        let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
        for field in ["labels", "annotations"] {
            assert!(read(field, &keys).unwrap(), "{field}");
            for (first, again) in [(0, 1), (3, 7), (2, 9), (8, 11), (10, 11)] {
                let mut twice = keys.clone();
                twice[again] = keys[first].clone();
                assert!(read(field, &twice).is_err(), "{field}: {first} at {again}");
            }
        }
    }

    /// A JSON string with an escape is copied, one without is borrowed
    /// from the text; both are read the fast way.
    #[test]
    fn an_escaped_json_string_is_copied_by_the_fast_read() {
        use super::Probe;
        use std::borrow::Cow;
        let json = r#"{"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "n\u0031", "labels": {"k\"": "v\\", "plain": "p"}}}"#;
        let Ok(Probe::Pod(pod)) = serde_json::from_str::<Probe>(json) else {
            panic!("not read the fast way: {json}");
        };
        assert!(
            matches!(&pod.name, Some(Cow::Owned(n)) if n == "n1"),
            "{pod:?}"
        );
        assert!(
            matches!(&pod.labels[..],
                [(Cow::Owned(k), Cow::Owned(v)), (Cow::Borrowed("plain"), Cow::Borrowed("p"))]
                if k == "k\"" && v == "v\\"),
            "{pod:?}"
        );
    }

    /// Anything the fast way cannot read goes the general way, which names
    /// the field and the line, and the documents after it still load.
    #[test]
    fn a_bad_pod_is_named_with_its_line_and_the_rest_loads() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: x}\n\
                    spec:\n  containers:\n  - name: c\n    ports: [{containerPort: http}]\n\
                    ---\napiVersion: v1\nkind: Pod\nmetadata: {name: good, namespace: x}\n";
        let doc = Document::parse_text("t.yaml", text);
        let keys: Vec<String> = doc.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["Pod x/good"]);
        let text = format!("{doc:?}");
        assert!(text.contains("t.yaml: Pod x/bad"), "{text}");
        assert!(text.contains("containerPort"), "{text}");
        assert!(text.contains("line 7"), "{text}");
        assert!(doc.syntax_error().is_none());
    }

    /// A key given twice is a syntax error of the file, as it always was.
    #[test]
    fn a_duplicate_key_is_a_syntax_error() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nmetadata: {name: b}\n";
        let doc = Document::parse_text("t.yaml", text);
        let e = doc.syntax_error().expect("a syntax error");
        assert!(e.message.contains("duplicate"), "{}", e.message);
        assert_eq!(doc.keys().count(), 0);
    }

    fn pods(n: usize, bad: Option<usize>) -> String {
        (0..n)
            .map(|i| {
                let port = if Some(i) == bad { "http" } else { "8080" };
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: ns{}\n  \
                     labels: {{app: a{}}}\nspec:\n  containers:\n  - name: c\n    \
                     ports: [{{name: http, containerPort: {port}}}]\n\
                     status: {{podIP: 10.0.{}.{}}}\n",
                    i % 3,
                    i % 4,
                    i / 200,
                    i % 200 + 1
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// A long text is parsed in parts at once: the same objects in the
    /// same order, and the same warnings, as in one piece.
    #[test]
    fn parts_read_as_the_whole() {
        let text = format!(
            "{}---\napiVersion: apps/v1\nkind: Deployment\n\
                            metadata: {{name: d}}\n---\n{}",
            pods(50, None),
            pods(60, None)
        );
        let whole = Document::parse_in_parts("t.yaml", &text, 1);
        assert_eq!(whole.keys().count(), 110);
        assert_eq!(whole.warnings().len(), 1, "the Deployment: unsupported");
        for parts in [2, 3, 7] {
            let parted = Document::parse_in_parts("t.yaml", &text, parts);
            assert_eq!(parted.entries_debug(), whole.entries_debug(), "{parts}");
            assert_eq!(parted.warnings(), whole.warnings(), "{parts}");
        }
    }

    /// An object that does not parse, in a later part: its message names
    /// its line in the whole text, as in one piece.
    #[test]
    fn a_bad_object_in_a_later_part_is_named_with_its_line_in_the_text() {
        let text = pods(100, Some(90));
        let whole = Document::parse_in_parts("t.yaml", &text, 1);
        let parted = Document::parse_in_parts("t.yaml", &text, 3);
        assert_eq!(parted.warnings(), whole.warnings());
        assert_eq!(parted.warnings().len(), 1);
        let w = &parted.warnings()[0];
        assert_eq!(w.object, "t.yaml: Pod ns0/p90");
        assert!(w.message.contains("line 1090"), "{}", w.message);
        assert_eq!(parted.keys().count(), 99);

        // A syntax error in a later part: the file is not applied, its
        // message names the line in the whole text.
        let text = format!("{}---\nkind: [oops\n", pods(100, None));
        let whole = Document::parse_in_parts("t.yaml", &text, 1);
        let parted = Document::parse_in_parts("t.yaml", &text, 3);
        let e = parted.syntax_error().expect("a syntax error");
        assert_eq!(Some(e), whole.syntax_error());
        assert!(e.message.contains("line 120"), "{}", e.message);
    }

    /// An object from the Kubernetes API (JSON) reads the same the fast way
    /// as the general way, and a bad one is still named.
    #[test]
    fn a_pod_from_the_api_reads_as_from_a_text() {
        let value: serde_yaml::Value = serde_yaml::from_str(POD).unwrap();
        let json = serde_json::to_value(&value).unwrap();
        let api = Document::from_json("api", json.clone());
        let (_, general) = both_ways(POD);
        assert_eq!(api.entries_debug(), general);
        assert!(api.warnings().is_empty(), "{:?}", api.warnings());

        let mut bad = json;
        bad["metadata"]["labels"]["version"] = serde_json::json!(2);
        let api = Document::from_json("api", bad);
        assert_eq!(api.keys().count(), 0);
        let w = &api.warnings()[0];
        assert_eq!(
            (w.object.as_str(), w.kind),
            ("api: Pod shop/web-7d9c5b6f4-x2k9p", "parse_error")
        );
        assert!(w.message.contains("integer `2`"), "{}", w.message);
    }
}
