//! Where the store's objects come from (local YAML files for now, polled for
//! changes), and the task that turns every change into a new snapshot.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Store, StoreOptions};

/// Where the store's objects come from. Implemented by a local file or
/// directory of YAML now; by the Kubernetes API later.
pub trait Source: Send + 'static {
    /// Reads the whole configuration. Called at start and on every change.
    fn load(&mut self) -> Result<Vec<(String, String)>, std::io::Error>;
    /// Whether the source may have changed since the last `load`.
    fn changed(&mut self) -> bool;
    /// For logs and warnings.
    fn name(&self) -> String {
        "configuration source".to_owned()
    }
}

/// A YAML file, or every `*.yaml`/`*.yml` file of a directory (not its
/// subdirectories, nor hidden files), read in file name order.
#[derive(Debug)]
pub struct LocalFiles {
    path: PathBuf,
    /// The fingerprint at the last successful load.
    loaded: Option<Fingerprint>,
}

impl LocalFiles {
    pub fn new(path: PathBuf) -> Self {
        LocalFiles { path, loaded: None }
    }
}

/// Name, modification time and size of every file read.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, Option<SystemTime>, u64)>);

impl Source for LocalFiles {
    fn load(&mut self) -> Result<Vec<(String, String)>, std::io::Error> {
        // Taken before reading: a change made while reading shows up as a
        // change at the next poll.
        let before = fingerprint(&self.path);
        let mut docs = Vec::new();
        for file in yaml_files(&self.path)? {
            let text = fs::read_to_string(&file).map_err(|e| in_file(&file, e))?;
            docs.push((file.display().to_string(), text));
        }
        self.loaded = before.ok();
        Ok(docs)
    }

    /// A file that cannot be looked at counts as changed: the load that
    /// follows reports why.
    fn changed(&mut self) -> bool {
        match (fingerprint(&self.path), &self.loaded) {
            (Ok(now), Some(then)) => now != *then,
            _ => true,
        }
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

fn yaml_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    // Follows symlinks, as a mounted ConfigMap's files are.
    if !fs::metadata(path).map_err(|e| in_file(path, e))?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| in_file(path, e))? {
        let file = entry.map_err(|e| in_file(path, e))?.path();
        let hidden = file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        let yaml = file
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if yaml && !hidden && fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn fingerprint(path: &Path) -> io::Result<Fingerprint> {
    yaml_files(path)?
        .into_iter()
        .map(|file| {
            let meta = fs::metadata(&file)?;
            Ok((file, meta.modified().ok(), meta.len()))
        })
        .collect::<io::Result<_>>()
        .map(Fingerprint)
}

fn in_file(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Loads the source now, synchronously (so call it inside a tokio runtime,
/// which the returned task runs on), and publishes the snapshot. Then checks
/// `changed()` every `interval` and publishes a new snapshot after each
/// successful reload. A failed load keeps the previous snapshot and is
/// logged once per distinct error; if the very first load fails, the first
/// snapshot is empty with a `load_error` warning. Each new snapshot's
/// warnings are logged once. The task ends when every receiver is gone.
pub fn spawn_watch(
    mut source: Box<dyn Source>,
    opts: StoreOptions,
    interval: Duration,
) -> (watch::Receiver<Arc<Store>>, tokio::task::JoinHandle<()>) {
    let first = match source.load() {
        Ok(docs) => Store::from_yaml(&docs, &opts),
        Err(e) => Store::unreadable(&opts, source.name(), &e),
    };
    log_snapshot(&source.name(), &first);
    let (tx, rx) = watch::channel(Arc::new(first));
    // tokio's interval refuses zero.
    let interval = interval.max(Duration::from_millis(1));
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the first load has just been done.
        ticks.tick().await;
        let mut last_error: Option<String> = None;
        loop {
            ticks.tick().await;
            if tx.is_closed() {
                return;
            }
            if !source.changed() {
                continue;
            }
            match source.load() {
                Ok(docs) => {
                    last_error = None;
                    let store = Store::from_yaml(&docs, &opts);
                    log_snapshot(&source.name(), &store);
                    if tx.send(Arc::new(store)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let error = e.to_string();
                    if last_error.as_ref() != Some(&error) {
                        warn!(
                            source = %source.name(),
                            %error,
                            "cannot reload the configuration; keeping the previous one"
                        );
                    }
                    last_error = Some(error);
                }
            }
        }
    });
    (rx, task)
}

fn log_snapshot(source: &str, store: &Store) {
    info!(
        source,
        workloads = store.workloads.len(),
        services = store.services.len(),
        authorization_policies = store.policies.len(),
        peer_authentications = store.peer_auths.len(),
        warnings = store.warnings.len(),
        "configuration loaded"
    );
    for w in store.warnings() {
        warn!(object = %w.object, kind = w.kind, "{}", w.message);
    }
}
