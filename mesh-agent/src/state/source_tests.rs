//! The local file source: which files are read, change detection, and the
//! watch task that publishes snapshots.

use std::{net::IpAddr, time::Duration};

use super::{tests::opts, *};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-state-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn local_files_reads_yaml_in_order_and_sees_edits() {
    let dir = temp_dir("local");
    std::fs::write(dir.join("b.yml"), "kind: B\n").unwrap();
    std::fs::write(dir.join("a.yaml"), "kind: A\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
    std::fs::write(dir.join(".hidden.yaml"), "kind: H\n").unwrap();
    let mut src = LocalFiles::new(dir.clone());
    assert!(src.changed(), "never loaded");
    let docs = src.load().unwrap();
    let texts: Vec<&str> = docs.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["kind: A\n", "kind: B\n"]);
    assert_eq!(docs[0].0, dir.join("a.yaml").display().to_string());
    assert!(!src.changed());

    std::fs::write(dir.join("a.yaml"), "kind: A2\n").unwrap();
    assert!(src.changed(), "an edit");
    src.load().unwrap();
    assert!(!src.changed());
    std::fs::write(dir.join("c.yaml"), "").unwrap();
    assert!(src.changed(), "a new file");

    std::fs::remove_dir_all(&dir).unwrap();
    assert!(src.changed(), "unreadable counts as changed");
    let err = src.load().unwrap_err();
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn spawn_watch_publishes_changes_and_keeps_the_last_good_snapshot() {
    let dir = temp_dir("watch");
    let file = dir.join("pods.yaml");
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nstatus: {{podIP: 10.4.0.1}}\n"
        )
    };
    std::fs::write(&file, pod("first")).unwrap();
    let source = Box::new(LocalFiles::new(file.clone()));
    let (mut rx, task) = spawn_watch(source, opts(), Duration::from_millis(10));
    assert_eq!(
        rx.borrow_and_update()
            .workload_by_ip(ip("10.4.0.1"))
            .unwrap()
            .name,
        "first"
    );

    std::fs::write(&file, pod("second-longer")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .unwrap()
        .unwrap();
    let name = rx
        .borrow_and_update()
        .workload_by_ip(ip("10.4.0.1"))
        .unwrap()
        .name
        .clone();
    assert_eq!(name, "second-longer");

    std::fs::remove_file(&file).unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    assert!(waited.is_err(), "a failed load publishes nothing");
    assert!(rx.borrow().workload("default", "second-longer").is_some());

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn spawn_watch_starts_empty_when_the_source_is_missing() {
    let path = std::env::temp_dir().join(format!("mesh-state-{}-missing.yaml", std::process::id()));
    let (rx, task) = spawn_watch(
        Box::new(LocalFiles::new(path.clone())),
        opts(),
        Duration::from_secs(60),
    );
    let store = rx.borrow().clone();
    assert_eq!(store.warnings().len(), 1);
    assert_eq!(store.warnings()[0].kind, "load_error");
    assert_eq!(store.warnings()[0].object, path.display().to_string());
    task.abort();
}
