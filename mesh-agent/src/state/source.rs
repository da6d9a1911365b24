//! Where the store's objects come from, and how a change becomes a new
//! snapshot. A `Source` keeps parsed `Document`s and re-parses only what
//! changed (a file, an API object); the `Publisher` merges them into a new
//! snapshot. Two sources: `LocalFiles` here, the Kubernetes API in
//! `crate::cluster`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{ConfigWarning, Document, ObjectKey, Store, StoreOptions};

/// A source of Kubernetes objects.
pub trait Source: Send + 'static {
    /// For logs and warnings.
    fn name(&self) -> String;
    /// Reads everything, publishes it, then publishes again after every
    /// change, until no one listens to the publisher any more.
    fn run(self: Box<Self>, out: Publisher) -> BoxFuture<'static, ()>;
}

/// Turns a source's documents into snapshots for the data path.
pub struct Publisher {
    tx: watch::Sender<Arc<Store>>,
    opts: StoreOptions,
    source: String,
    generation: u64,
    /// The last snapshot's warnings: only new ones are logged.
    warned: super::NewWarnings,
}

impl Publisher {
    /// Merges `docs` (in order) into a new snapshot, logs it and hands it to
    /// the data path. False when no one listens any more.
    pub fn publish<'a>(&mut self, docs: impl IntoIterator<Item = &'a Document>) -> bool {
        let mut store = Store::from_documents(docs, &self.opts);
        self.generation += 1;
        store.generation = self.generation;
        self.log(&store);
        self.tx.send(Arc::new(store)).is_ok()
    }

    fn log(&mut self, store: &Store) {
        info!(
            source = %self.source,
            generation = store.generation,
            workloads = store.workloads.len(),
            services = store.services.len(),
            authorization_policies = store.policies.len(),
            peer_authentications = store.peer_auths.len(),
            warnings = store.warnings.len(),
            "configuration loaded"
        );
        for w in self.warned.of(store) {
            warn!(object = %w.object, kind = w.kind, "{}", w.message);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Runs `source` on the tokio runtime. The receiver holds an empty snapshot
/// (generation 0) until the source has read everything once.
pub fn spawn_source(
    source: Box<dyn Source>,
    opts: StoreOptions,
) -> (watch::Receiver<Arc<Store>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Store::empty(&opts)));
    let out = Publisher {
        tx,
        opts,
        source: source.name(),
        generation: 0,
        warned: Default::default(),
    };
    (rx, tokio::spawn(source.run(out)))
}

/// A YAML file, or every `*.yaml`/`*.yml` file of a directory (not its
/// subdirectories, nor hidden files), merged in file name order; checked for
/// changes every `interval`. Only files whose size, modification time or
/// inode changed are read and parsed again.
#[derive(Debug)]
pub struct LocalFiles {
    path: PathBuf,
    interval: Duration,
    files: BTreeMap<PathBuf, File>,
}

#[derive(Debug)]
struct File {
    stamp: Stamp,
    doc: Document,
}

/// What tells that a file changed: an editor's rewrite, a ConfigMap's
/// symlink swap (a new inode), an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// What one scan found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<ObjectKey>,
    pub changed: Vec<ObjectKey>,
    pub removed: Vec<ObjectKey>,
    /// Files read again (new or changed) and files gone.
    pub files: usize,
}

impl LocalFiles {
    pub fn new(path: PathBuf, interval: Duration) -> Self {
        LocalFiles {
            path,
            // tokio's interval refuses zero.
            interval: interval.max(Duration::from_millis(1)),
            files: BTreeMap::new(),
        }
    }

    /// Looks at the files and applies what changed. `Ok(None)` when nothing
    /// did. An unreadable directory is an error and changes nothing.
    pub fn scan(&mut self) -> io::Result<Option<Diff>> {
        let mut seen = BTreeSet::new();
        let mut diff = Diff::default();
        for path in yaml_files(&self.path)? {
            seen.insert(path.clone());
            let stamp = match fs::metadata(&path) {
                Ok(meta) => Stamp {
                    modified: meta.modified().ok(),
                    len: meta.len(),
                    inode: meta.ino(),
                },
                // Gone between the listing and now: the next scan sees it.
                Err(_) => continue,
            };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let origin = path.display().to_string();
            let doc = match fs::read_to_string(&path) {
                Ok(text) => Document::parse_text(&origin, &text),
                Err(e) => {
                    // Dropping the file's objects could drop a DENY policy:
                    // its last good version stays until it reads again.
                    warn!(file = %origin, error = %e, "cannot read; keeping its last version");
                    if self.files.contains_key(&path) {
                        continue;
                    }
                    Document::unreadable(&origin, &e)
                }
            };
            diff.files += 1;
            let before: BTreeSet<&ObjectKey> = self
                .files
                .get(&path)
                .map(|f| f.doc.keys().collect())
                .unwrap_or_default();
            for key in doc.keys() {
                if before.contains(key) {
                    diff.changed.push(key.clone());
                } else {
                    diff.added.push(key.clone());
                }
            }
            let now: BTreeSet<&ObjectKey> = doc.keys().collect();
            diff.removed
                .extend(before.difference(&now).map(|k| (*k).clone()));
            self.files.insert(path, File { stamp, doc });
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            diff.files += 1;
            if let Some(f) = self.files.remove(&path) {
                diff.removed.extend(f.doc.keys().cloned());
            }
        }
        // An object moved from one file to another is changed, not gone.
        let added: BTreeSet<&ObjectKey> = diff.added.iter().collect();
        let (moved, removed): (Vec<ObjectKey>, Vec<ObjectKey>) = std::mem::take(&mut diff.removed)
            .into_iter()
            .partition(|k| added.contains(k));
        diff.removed = removed;
        diff.changed.extend(moved);
        let changed: BTreeSet<ObjectKey> = diff.changed.iter().cloned().collect();
        diff.added.retain(|k| !changed.contains(k));
        Ok((diff.files > 0).then_some(diff))
    }

    pub fn documents(&self) -> impl Iterator<Item = &Document> {
        self.files.values().map(|f| &f.doc)
    }
}

impl Source for LocalFiles {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn run(mut self: Box<Self>, mut out: Publisher) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let name = self.name();
            let mut ticks = tokio::time::interval(self.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut first = true;
            let mut last_error: Option<String> = None;
            loop {
                ticks.tick().await;
                if out.is_closed() {
                    return;
                }
                let open = match self.scan() {
                    // The first scan publishes even an empty directory.
                    Ok(None) if !first => true,
                    Ok(diff) => {
                        last_error = None;
                        if let Some(diff) = diff.filter(|_| !first) {
                            log_diff(&name, &diff);
                        }
                        first = false;
                        out.publish(self.documents())
                    }
                    Err(e) => {
                        let error = e.to_string();
                        if last_error.as_ref() != Some(&error) && first {
                            warn!(source = %name, %error, "cannot read the configuration: not loaded yet, so not ready; enrolled pods stay captured and fail closed; retrying");
                        } else if last_error.as_ref() != Some(&error) {
                            warn!(source = %name, %error, "cannot read the configuration; keeping the previous one");
                        }
                        last_error = Some(error);
                        // Nothing is published. Before the first read the
                        // store stays at generation 0: the agent is not
                        // ready, releases no pod and serves no connection
                        // (an empty snapshot would release every managed
                        // pod and make every meshed destination look
                        // plain). Afterwards the last snapshot stays.
                        !out.is_closed()
                    }
                };
                if !open {
                    return;
                }
            }
        })
    }
}

impl Document {
    /// A file that could not be read: no objects, one `load_error`.
    fn unreadable(origin: &str, e: &io::Error) -> Document {
        Document::with_warning(ConfigWarning {
            object: origin.to_owned(),
            kind: "load_error",
            message: format!("cannot read: {e}"),
        })
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

fn in_file(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// At most this many object names per line of the change log.
const NAMES_LOGGED: usize = 20;

fn log_diff(source: &str, diff: &Diff) {
    let names = |keys: &[ObjectKey]| {
        let mut s: Vec<String> = keys
            .iter()
            .take(NAMES_LOGGED)
            .map(|k| k.to_string())
            .collect();
        if keys.len() > NAMES_LOGGED {
            s.push(format!("and {} more", keys.len() - NAMES_LOGGED));
        }
        s.join(", ")
    };
    info!(
        source,
        added = %names(&diff.added),
        changed = %names(&diff.changed),
        removed = %names(&diff.removed),
        "configuration changed"
    );
}
