//! The local source never applies what it could not read whole: a file that
//! stops parsing keeps its last good version, a file that never parsed
//! holds back the first snapshot (its policies cannot be known), and a file
//! being written in place is read only once it has settled, whatever its
//! modification time says.

use std::{
    io::Write as _,
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use super::{tests::opts, *};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-unparsed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const POD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
                   apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nstatus: {podIP: 10.4.0.1}\n";
const DENY_ALL: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                        metadata: {name: deny-all, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n";
/// Valid YAML up to its last document, which is cut off mid-flow.
const BROKEN: &str = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n---\n\
                      apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                      metadata: {name: deny-all, namespace: shop}\nspec: {action: DENY, rules: [{}\n";

fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// Plaintext from 10.4.0.50 to the pod, as authorization sees it.
fn allowed(s: &Store) -> bool {
    let Some(web) = s.workload_by_ip(ip("10.4.0.1")) else {
        return false;
    };
    s.authorize(&Conn {
        src_ip: ip("10.4.0.50"),
        src_identity: None,
        dst: web,
        dst_ip: ip("10.4.0.1"),
        dst_port: 8080,
    }) == Decision::Allow
}

async fn until(rx: &mut watch::Receiver<Arc<Store>>, what: &str, ok: impl Fn(&Store) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| ok(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        waited,
        "store did not converge: {what}; last snapshot: {:#}",
        rx.borrow().dump()
    );
}

fn warned(s: &Store, kind: &str, object: &Path) -> bool {
    s.warnings()
        .iter()
        .any(|w| w.kind == kind && w.object == object.display().to_string())
}

#[tokio::test]
async fn a_file_that_stops_parsing_keeps_its_last_good_version() {
    let dir = temp_dir("stops");
    write(&dir, "pod.yaml", POD);
    write(&dir, "policy.yaml", DENY_ALL);
    let source = Box::new(LocalFiles::new(dir.clone(), Duration::from_millis(10)));
    let (mut rx, task) = spawn_source(source, opts());
    until(&mut rx, "deny-all applied", |s| {
        s.generation > 0 && s.workload_by_ip(ip("10.4.0.1")).is_some() && !allowed(s)
    })
    .await;

    write(&dir, "policy.yaml", BROKEN);
    let file = dir.join("policy.yaml");
    until(&mut rx, "syntax error reported", |s| {
        warned(s, "parse_error", &file)
    })
    .await;
    let store = rx.borrow().clone();
    assert!(
        !allowed(&store),
        "the last good version still denies: {:#}",
        store.dump()
    );
    assert_eq!(
        store.dump()["service_accounts"],
        0,
        "nothing of the broken version applies"
    );

    // Fixed: the new version applies.
    write(&dir, "policy.yaml", "");
    until(&mut rx, "fixed", |s| allowed(s) && s.warnings().is_empty()).await;
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_file_that_never_parsed_holds_back_the_first_snapshot() {
    let dir = temp_dir("never");
    write(&dir, "pod.yaml", POD);
    write(&dir, "policy.yaml", BROKEN);
    let source = Box::new(LocalFiles::new(dir.clone(), Duration::from_millis(10)));
    let (mut rx, task) = spawn_source(source, opts());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        rx.borrow().generation,
        0,
        "a snapshot without the policies of a file that does not parse was published: {:#}",
        rx.borrow().dump()
    );
    write(&dir, "policy.yaml", DENY_ALL);
    until(&mut rx, "first snapshot, with the policy", |s| {
        s.generation > 0 && s.workload_by_ip(ip("10.4.0.1")).is_some() && !allowed(s)
    })
    .await;
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_file_being_written_in_place_is_read_once_it_has_settled() {
    let dir = temp_dir("inplace");
    let source = Box::new(LocalFiles::new(dir.clone(), Duration::from_millis(10)));
    let (mut rx, task) = spawn_source(source, opts());
    until(&mut rx, "first snapshot", |s| s.generation > 0).await;

    // The pod and its namespace are written, the policy that follows them
    // in the same file not yet: what is there parses, but is not the file.
    let mut file = std::fs::File::create(dir.join("shop.yaml")).unwrap();
    file.write_all(format!("{POD}---\n").as_bytes()).unwrap();
    file.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        rx.borrow().workload_by_ip(ip("10.4.0.1")).is_none(),
        "half a file was applied: {:#}",
        rx.borrow().dump()
    );
    file.write_all(DENY_ALL.as_bytes()).unwrap();
    drop(file);
    until(&mut rx, "the whole file", |s| {
        s.workload_by_ip(ip("10.4.0.1")).is_some() && !allowed(s)
    })
    .await;
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// While the kernel truncates a file, it shows the file's new size with its
/// old modification time (ext4 does for the whole truncation, a
/// millisecond or more): a source that took an old time for "settled" read
/// a file being rewritten in place as empty, and the agent released every
/// pod it named until the next scan. Seen by `cargo xtask soak`.
#[test]
fn a_file_being_truncated_is_not_read_for_its_old_modification_time() {
    let dir = temp_dir("truncating");
    let path = dir.join("shop.yaml");
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let write_as_of = |text: &str, modified: Option<SystemTime>| {
        std::fs::write(&path, text).unwrap();
        if let Some(t) = modified {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(t))
                .unwrap();
        }
    };
    let names = |keys: &[ObjectKey]| keys.iter().map(ToString::to_string).collect::<Vec<_>>();
    let settle = Duration::from_millis(100);
    let mut src = LocalFiles::new(dir.clone(), Duration::from_millis(10)).with_settle(settle);

    // Scans until a file is read (it is once it has stayed unchanged).
    let read = |src: &mut LocalFiles| {
        for _ in 0..50 {
            if let Some(diff) = src.scan().unwrap() {
                return diff;
            }
            std::thread::sleep(settle / 4);
        }
        panic!("not read in 50 scans");
    };

    write_as_of(POD, Some(an_hour_ago));
    let diff = read(&mut src);
    assert_eq!(names(&diff.added), ["Namespace shop", "Pod shop/web"]);

    // Truncated by a writer: empty, with the time it had before.
    write_as_of("", Some(an_hour_ago));
    assert_eq!(
        src.scan().unwrap(),
        None,
        "an empty file with an hour-old time was read at once"
    );
    // The writer is done: the file whole again, with one change.
    write_as_of(&POD.replace("10.4.0.1", "10.4.0.2"), None);
    let diff = read(&mut src);
    assert_eq!(
        (names(&diff.changed), names(&diff.removed)),
        (
            vec!["Namespace shop".to_owned(), "Pod shop/web".to_owned()],
            vec![]
        ),
        "changed, never removed: {diff:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes `text` to `path`, last modified an hour ago (as a file the agent
/// finds at its start).
fn write_an_hour_old(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(3600)))
        .unwrap();
}

/// A file last modified long ago (every file when the agent starts) is
/// read at first sight, so that a long file's parse and the settle time
/// overlap; it is still taken only once its stamp has held for the settle
/// time, and not read again then. A file modified a moment ago is not read
/// before it has settled.
#[test]
fn an_old_file_is_read_while_it_settles_and_taken_once_settled() {
    let dir = temp_dir("early");
    let path = dir.join("shop.yaml");
    write_an_hour_old(&path, POD);
    let settle = Duration::from_millis(200);
    let mut src = LocalFiles::new(dir.clone(), Duration::from_millis(10)).with_settle(settle);

    let started = std::time::Instant::now();
    let first = src.scan().unwrap();
    assert_eq!(src.reads, 1, "an hour-old file was not read at first sight");
    let diff = match first {
        Some(diff) => {
            assert!(
                started.elapsed() >= settle,
                "taken before the settle time was over"
            );
            diff
        }
        None => {
            std::thread::sleep(settle);
            src.scan().unwrap().expect("not taken once settled")
        }
    };
    assert_eq!(diff.added.len(), 2, "{diff:?}");
    assert_eq!(src.reads, 1, "read again once settled");

    // Modified now: not read until its stamp has held for the settle time.
    std::fs::write(&path, POD.replace("10.4.0.1", "10.4.0.2")).unwrap();
    assert_eq!(src.scan().unwrap(), None);
    assert_eq!(
        src.reads, 1,
        "a file modified a moment ago was read at once"
    );
    std::thread::sleep(settle);
    let diff = src.scan().unwrap().expect("not taken once settled");
    assert_eq!(diff.changed.len(), 2, "{diff:?}");
    assert_eq!(src.reads, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The first snapshot is built while the files read at first sight
/// settle; a file that changes before it is taken is published as it is
/// then, never as it was read at first sight.
#[tokio::test]
async fn a_file_changed_while_it_settles_is_published_as_changed() {
    let dir = temp_dir("early-changed");
    let path = dir.join("shop.yaml");
    write_an_hour_old(&path, POD);
    let source = LocalFiles::new(dir.clone(), Duration::from_millis(10))
        .with_settle(Duration::from_millis(400));
    let (mut rx, task) = spawn_source(Box::new(source), opts());
    // The first scan reads the old file at once (and builds a snapshot
    // from it); nothing outside the source shows that moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rx.borrow().generation, 0, "taken before it settled");
    write(&dir, "shop.yaml", &POD.replace("10.4.0.1", "10.4.0.2"));
    until(&mut rx, "the first snapshot", |s| s.generation > 0).await;
    let store = rx.borrow().clone();
    assert!(
        store.workload_by_ip(ip("10.4.0.2")).is_some(),
        "{:#}",
        store.dump()
    );
    assert!(
        store.workload_by_ip(ip("10.4.0.1")).is_none(),
        "{:#}",
        store.dump()
    );
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A long file is read in parts, one per core: the parts join up to the
/// file exactly, wherever a cut falls (here inside characters of two,
/// three and four bytes), and bytes that are not UTF-8 in any part, or
/// across where parts are cut, refuse the whole file, as a file read in
/// one piece is refused.
#[test]
fn a_file_read_in_parts_is_the_file_exactly() {
    let dir = temp_dir("parts");
    let path = dir.join("long.yaml");
    let text: String = (0..5_000).map(|i| format!("# {i} é € 😀\n")).collect();
    std::fs::write(&path, &text).unwrap();
    for parts in [1, 2, 3, 7, 64] {
        let read = source::read_text_in_parts(&path, |_| parts).unwrap();
        assert!(read == text, "{parts} parts");
    }
    let bytes = text.into_bytes();
    let len = bytes.len();
    // Not UTF-8: a byte no character has near the end; a character's
    // inner byte first; a character cut short at the end; a run of inner
    // bytes across where three parts are cut (each part is checked from
    // a character's first byte on, so the run is checked in the part
    // before it).
    let bad: [(&str, Vec<u8>); 4] = [
        (
            "0xff",
            [&bytes[..len - 3], &[0xff], &bytes[len - 2..]].concat(),
        ),
        ("inner byte first", [&[0x80][..], &bytes].concat()),
        ("cut short", [&bytes[..], &[0xf0, 0x9f]].concat()),
        (
            "inner bytes at a cut",
            [&bytes[..len / 3 - 2], &[0x80; 5], &bytes[len / 3 + 3..]].concat(),
        ),
    ];
    for (what, bytes) in bad {
        std::fs::write(&path, &bytes).unwrap();
        for parts in [1, 2, 3, 7, 64] {
            let e = source::read_text_in_parts(&path, |_| parts).unwrap_err();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::InvalidData,
                "{what}, {parts} parts"
            );
        }
    }
    std::fs::write(&path, "").unwrap();
    assert_eq!(source::read_text_in_parts(&path, |_| 3).unwrap(), "");
    let _ = std::fs::remove_dir_all(dir);
}

/// A configuration long enough to be read and parsed in parts (more than
/// 1 MiB for each core) loads every object, from YAML and from JSON.
#[test]
fn a_long_configuration_loads_whole() {
    let dir = temp_dir("long");
    let n = 2_000 * yaml::parallel_parts(usize::MAX).max(2);
    let mut text = String::from(POD);
    for i in 0..n {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: shop\n  annotations:\n    note: {}\nstatus:\n  podIP: 10.5.{}.{}\n",
            "x".repeat(600),
            i / 250,
            i % 250 + 1
        ));
    }
    assert!(text.len() > (1 << 20) * yaml::parallel_parts(usize::MAX));
    std::fs::write(dir.join("pods.yaml"), &text).unwrap();
    let mut src = LocalFiles::new(dir.clone(), Duration::from_secs(1)).with_settle(Duration::ZERO);
    let diff = src.scan().unwrap().expect("first scan reads everything");
    assert_eq!(diff.added.len(), n + 2, "the namespace, web and every pod");
    let store = Store::from_documents(src.documents(), &opts());
    assert_eq!(store.workloads.len(), n + 1);
    assert!(store.warnings.is_empty(), "{:?}", store.warnings);
    let _ = std::fs::remove_dir_all(dir);
}
