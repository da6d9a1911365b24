//! Where the store's objects come from, and how a change becomes a new
//! snapshot. A `Source` keeps parsed `Document`s and re-parses only what
//! changed (a file, an API object); the `Publisher` merges them into a new
//! snapshot. Two sources: `LocalFiles` here, the Kubernetes API in
//! `crate::cluster`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    ConfigWarning, Document, ObjectKey, Store, StoreOptions,
    yaml::{on_threads, parallel_parts},
};

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
    /// `endpoint_slices_only` as the options asked for it.
    slices_only: bool,
}

impl Publisher {
    /// Merges `docs` (in order) into a new snapshot, logs it and hands it to
    /// the data path. False when no one listens any more.
    pub fn publish<'a>(&mut self, docs: impl IntoIterator<Item = &'a Document>) -> bool {
        let store = self.build(docs);
        self.publish_built(store)
    }

    /// The snapshot [`Publisher::publish`] would hand out for `docs`, not
    /// handed out yet.
    pub fn build<'a>(&self, docs: impl IntoIterator<Item = &'a Document>) -> Store {
        Store::from_documents(docs, &self.opts)
    }

    /// Hands out a snapshot built by [`Publisher::build`] (from the
    /// documents a source holds now).
    pub fn publish_built(&mut self, mut store: Store) -> bool {
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

    /// A source that cannot read EndpointSlices says so: while it cannot,
    /// Services' endpoints come from their selectors even where
    /// [`StoreOptions::endpoint_slices_only`] was asked for (without slices
    /// every Service would have none).
    pub fn set_endpoint_slices_unreadable(&mut self, unreadable: bool) {
        self.opts.endpoint_slices_only = self.slices_only && !unreadable;
    }

    /// Where mesh-wide policies live, for a source's fail-closed stand-ins.
    pub fn root_namespace(&self) -> &str {
        &self.opts.root_namespace
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
        slices_only: opts.endpoint_slices_only,
        opts,
        source: source.name(),
        generation: 0,
        warned: Default::default(),
    };
    (rx, tokio::spawn(source.run(out)))
}

/// A YAML or JSON file, or every `*.yaml`/`*.yml`/`*.json` file of a
/// directory (not its subdirectories, nor hidden files), merged in file
/// name order; checked for
/// changes every `interval`. Only files whose size, modification time or
/// inode changed are read and parsed again.
///
/// A file is applied whole or not at all: it is taken once this source has
/// seen it unchanged for [`SETTLE`] (a file written in place is not read
/// half; one already that old when first seen is read during the wait),
/// and a version that cannot be read or does not parse (as JSON for a
/// `*.json` file, as YAML for any other) is not applied:
/// the file's last good version stays, with a warning. A file that never
/// read whole holds back the first snapshot (the agent stays not ready):
/// its AuthorizationPolicies cannot be known, and a store without them
/// could allow what they deny. Once a snapshot is out, such a new file
/// stays out of the store, as before it was written.
#[derive(Debug)]
pub struct LocalFiles {
    path: PathBuf,
    interval: Duration,
    files: BTreeMap<PathBuf, File>,
    /// Files the last scan saw but could not take yet (still changing).
    unsettled: usize,
    /// Changed files not taken yet: the stamp each shows, since when this
    /// source has seen it, and what it read while waiting.
    changing: BTreeMap<PathBuf, Changing>,
    settle: Duration,
    /// Files read so far.
    #[cfg(test)]
    pub(super) reads: usize,
}

/// A changed file is read once this source has seen it unchanged for this
/// long, so that one being written in place (which can parse when cut at a
/// line or a document boundary, with fewer rules than written) is read
/// whole. Seen by this source, on its own clock: the file's modification
/// time cannot tell. While a file is truncated, the kernel shows its new
/// size with its old modification time (on ext4 for the whole truncation,
/// a millisecond or more), so a file emptied a moment ago by a writer
/// looked unchanged for hours, and was read empty.
const SETTLE: Duration = Duration::from_millis(300);
/// The shortest wait between two scans while a file settles.
const MIN_RECHECK: Duration = Duration::from_millis(10);

/// A changed file while it settles.
#[derive(Debug)]
struct Changing {
    stamp: Stamp,
    since: Instant,
    /// Read (and parsed) under `stamp` before the settle time was over,
    /// for a file last modified longer than that ago (every file when the
    /// agent starts): taken once the stamp has held for the settle time,
    /// so that the wait and the parse of a long file overlap. Read under
    /// the same stamp as it would have been read at the end of the wait.
    read: Option<Result<Document, ConfigWarning>>,
}

impl Changing {
    /// The entry of `path` in `changing`: a new stamp starts the clock.
    fn entry<'a>(
        changing: &'a mut BTreeMap<PathBuf, Changing>,
        path: &Path,
        stamp: Stamp,
    ) -> &'a mut Changing {
        let fresh = || Changing {
            stamp,
            since: Instant::now(),
            read: None,
        };
        let entry = changing.entry(path.to_owned()).or_insert_with(fresh);
        if entry.stamp != stamp {
            *entry = fresh();
        }
        entry
    }
}

#[derive(Debug)]
struct File {
    /// The version last read, good or not.
    stamp: Stamp,
    /// The last version that read and parsed whole.
    good: Option<Document>,
    /// Why the version last read is not applied: its warning alone.
    broken: Option<Document>,
}

/// Files and the version of each.
type Versions = Vec<(PathBuf, Stamp)>;

/// What tells that a file changed: an editor's rewrite, a ConfigMap's
/// symlink swap (a new inode), an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let meta = fs::metadata(path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
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
            unsettled: 0,
            changing: BTreeMap::new(),
            settle: SETTLE,
            #[cfg(test)]
            reads: 0,
        }
    }

    /// Another settle time (zero: a changed file is read at once).
    #[cfg(test)]
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Whether a file showing `stamp` was last modified at least the
    /// settle time ago, by its own clock: then it is read at once and
    /// taken when the settle time is over (the modification time alone
    /// cannot say it is whole: see [`SETTLE`]).
    fn looks_settled(&self, stamp: Stamp) -> bool {
        stamp
            .modified
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= self.settle)
    }

    /// Whether every file has been read whole: the first snapshot waits
    /// for it.
    pub fn complete(&self) -> bool {
        self.unsettled == 0 && self.files.values().all(|f| f.good.is_some())
    }

    /// Files whose version last read is not applied.
    fn broken(&self) -> Vec<String> {
        self.files
            .iter()
            .filter(|(_, f)| f.broken.is_some())
            .map(|(p, _)| p.display().to_string())
            .collect()
    }

    /// Reads and parses `path` if it did not change while read; `None`
    /// when a later scan should read it.
    fn read(path: &Path, stamp: Stamp) -> Option<Result<Document, ConfigWarning>> {
        let text = read_text(path);
        if Stamp::of(path) != Some(stamp) {
            return None;
        }
        let origin = path.display().to_string();
        Some(match text {
            Ok(text) => {
                let doc = if is_json(path) {
                    Document::parse_json(&origin, &text)
                } else {
                    Document::parse_text(&origin, &text)
                };
                free_aside(text);
                match doc.syntax_error() {
                    Some(w) => Err(w.clone()),
                    None => Ok(doc),
                }
            }
            Err(e) => Err(ConfigWarning {
                object: origin,
                kind: "load_error",
                message: format!("cannot read: {e}"),
            }),
        })
    }

    /// Looks at the files and applies what changed. `Ok(None)` when nothing
    /// did. An unreadable directory is an error and changes nothing.
    pub fn scan(&mut self) -> io::Result<Option<Diff>> {
        let mut seen = BTreeSet::new();
        let mut diff = Diff::default();
        self.unsettled = 0;
        for path in config_files(&self.path)? {
            seen.insert(path.clone());
            // Gone between the listing and now: the next scan sees it.
            let Some(stamp) = Stamp::of(&path) else {
                continue;
            };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                // Back as last read (a change seen in passing).
                self.changing.remove(&path);
                continue;
            }
            let early = self.looks_settled(stamp);
            let settle = self.settle;
            let entry = Changing::entry(&mut self.changing, &path, stamp);
            let due = entry.since.elapsed() >= settle;
            if entry.read.is_none() && (due || early) {
                let Some(read) = Self::read(&path, stamp) else {
                    // Changed while read: a later scan starts again.
                    self.unsettled += 1;
                    continue;
                };
                entry.read = Some(read);
                #[cfg(test)]
                {
                    self.reads += 1;
                }
            }
            // Taken once the stamp has held for the settle time: a read
            // done early counts only if the file still shows it now.
            let take = entry.read.is_some()
                && entry.since.elapsed() >= settle
                && (due || Stamp::of(&path) == Some(stamp));
            let doc = if take {
                self.changing.remove(&path).and_then(|c| c.read)
            } else {
                None
            };
            let Some(doc) = doc else {
                self.unsettled += 1;
                continue;
            };
            let origin = path.display().to_string();
            diff.files += 1;
            let file = self.files.entry(path).or_insert(File {
                stamp,
                good: None,
                broken: None,
            });
            file.stamp = stamp;
            let doc = match doc {
                Ok(doc) => doc,
                Err(why) => {
                    // Dropping the file's objects could drop a DENY policy,
                    // and what parsed before a syntax error is not the file.
                    warn!(file = %origin, error = %why.message, "not applied; keeping its last good version");
                    file.broken = Some(Document::with_warning(ConfigWarning {
                        message: format!(
                            "{}; not applied (its last good version, if any, stays)",
                            why.message
                        ),
                        ..why
                    }));
                    continue;
                }
            };
            file.broken = None;
            let before: BTreeSet<&ObjectKey> = file
                .good
                .as_ref()
                .map(|d| d.keys().collect())
                .unwrap_or_default();
            for key in doc.keys() {
                if before.contains(key) {
                    diff.changed.push(key.clone());
                } else {
                    diff.added.push(key.clone());
                }
            }
            if !before.is_empty() {
                let now: BTreeSet<&ObjectKey> = doc.keys().collect();
                diff.removed
                    .extend(before.difference(&now).map(|k| (*k).clone()));
            }
            file.good = Some(doc);
        }
        self.changing.retain(|p, _| seen.contains(p));
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            diff.files += 1;
            if let Some(doc) = self.files.remove(&path).and_then(|f| f.good) {
                diff.removed.extend(doc.keys().cloned());
            }
        }
        // An object moved from one file to another is changed, not gone.
        // (Nothing to look up in a first read: then all is added.)
        if !diff.removed.is_empty() {
            let added: BTreeSet<&ObjectKey> = diff.added.iter().collect();
            let (moved, removed): (Vec<ObjectKey>, Vec<ObjectKey>) =
                std::mem::take(&mut diff.removed)
                    .into_iter()
                    .partition(|k| added.contains(k));
            diff.removed = removed;
            diff.changed.extend(moved);
        }
        if !diff.changed.is_empty() {
            let changed: BTreeSet<ObjectKey> = diff.changed.iter().cloned().collect();
            diff.added.retain(|k| !changed.contains(k));
        }
        Ok((diff.files > 0).then_some(diff))
    }

    /// Before the first snapshot, once every file seen has been read and
    /// parsed at first sight (while it settles): those documents, and the
    /// version of each, so that the first snapshot can be built during
    /// the wait.
    fn early(&self) -> Option<(Versions, Vec<&Document>)> {
        if !self.files.is_empty() || self.changing.len() != self.unsettled {
            return None;
        }
        let mut versions = Vec::new();
        let mut docs = Vec::new();
        for (path, c) in &self.changing {
            let Some(Ok(doc)) = &c.read else {
                return None;
            };
            versions.push((path.clone(), c.stamp));
            docs.push(doc);
        }
        Some((versions, docs))
    }

    /// Whether the files taken are those versions, all read whole.
    fn holds(&self, versions: &Versions) -> bool {
        self.unsettled == 0
            && self.files.len() == versions.len()
            && self
                .files
                .iter()
                .zip(versions)
                .all(|((path, f), (p, stamp))| {
                    path == p && f.stamp == *stamp && f.good.is_some() && f.broken.is_none()
                })
    }

    /// The last good version of every file, and the warning of each file
    /// whose current version is not applied.
    pub fn documents(&self) -> impl Iterator<Item = &Document> {
        self.files
            .values()
            .flat_map(|f| f.good.iter().chain(f.broken.iter()))
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
            // The first snapshot, built from the files read at first sight
            // while they settle: handed out if they are taken as read.
            let mut early: Option<(Versions, Store)> = None;
            // The first snapshot was just built, after the files were due:
            // they are taken at once.
            let mut built_late = false;
            loop {
                if self.changing.is_empty() {
                    ticks.tick().await;
                } else if !std::mem::take(&mut built_late) {
                    // A file is settling: look again when it may have,
                    // rather than a whole interval later, and no later
                    // than the moment the first one is due (a file read
                    // at first sight is taken then, not up to a recheck
                    // later).
                    let due = self
                        .changing
                        .values()
                        .map(|c| self.settle.saturating_sub(c.since.elapsed()))
                        .min()
                        .unwrap_or(self.settle);
                    let wait = self.interval.min(self.settle / 3).min(due);
                    tokio::time::sleep(wait.max(MIN_RECHECK)).await;
                    ticks.reset();
                }
                if out.is_closed() {
                    return;
                }
                let open = match self.scan() {
                    // The first scan publishes even an empty directory.
                    Ok(None) if !first => true,
                    Ok(_) if first && !self.complete() => {
                        if early.is_none()
                            && let Some((versions, docs)) = self.early()
                        {
                            early = Some((versions, out.build(docs)));
                            built_late = self
                                .changing
                                .values()
                                .all(|c| c.since.elapsed() >= self.settle);
                        }
                        // A file still being written is read by a later
                        // scan; one that cannot be read or parsed is worth
                        // a warning.
                        let broken = self.broken();
                        if !broken.is_empty() {
                            let error = format!("not read whole: {}", broken.join(", "));
                            if last_error.as_ref() != Some(&error) {
                                warn!(source = %name, %error, "configuration not loaded yet, so not ready; enrolled pods stay captured and fail closed");
                            }
                            last_error = Some(error);
                        }
                        !out.is_closed()
                    }
                    Ok(diff) => {
                        last_error = None;
                        if let Some(diff) = diff.filter(|_| !first) {
                            log_diff(&name, &diff);
                        }
                        let built = early
                            .take()
                            .filter(|(versions, _)| first && self.holds(versions));
                        first = false;
                        match built {
                            Some((_, store)) => out.publish_built(store),
                            None => out.publish(self.documents()),
                        }
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

/// The whole of a file as UTF-8 text. A long file is read in parts, each
/// on a thread of its own, so that its copy into fresh memory (page faults
/// and zeroing are most of a long file's read) is spread over the cores,
/// as its parse is; so is the check that it is UTF-8. A file that changes
/// meanwhile reads as anything; the caller compares its stamp before and
/// after.
fn read_text(path: &Path) -> io::Result<String> {
    read_text_in_parts(path, parallel_parts)
}

/// [`read_text`] in as many parts as `parts` says for the file's length.
pub(super) fn read_text_in_parts(
    path: &Path,
    parts: impl FnOnce(usize) -> usize,
) -> io::Result<String> {
    let file = fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::new(io::ErrorKind::FileTooLarge, "larger than memory"))?;
    let parts = parts(len);
    if parts <= 1 || len == 0 {
        return io::read_to_string(file);
    }
    let mut bytes = vec![0u8; len];
    let chunk = len.div_ceil(parts);
    std::thread::scope(|scope| {
        let reads: Vec<_> = bytes
            .chunks_mut(chunk)
            .zip((0..).step_by(chunk))
            .map(|(part, at)| {
                let file = &file;
                scope.spawn(move || file.read_exact_at(part, at as u64))
            })
            .collect();
        reads.into_iter().try_for_each(|read| {
            read.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })?;
    // The parts are checked from the first byte of a character on (a cut
    // inside one moves to the next): every character is then whole in one
    // part, so the text is UTF-8 exactly when each part is.
    let mut starts = vec![0];
    for at in (chunk..len).step_by(chunk) {
        let inside = bytes[at..]
            .iter()
            .take_while(|&&b| is_continuation(b))
            .count();
        starts.push((at + inside).max(starts[starts.len() - 1]));
    }
    starts.push(len);
    let spans: Vec<&[u8]> = starts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
    let utf8 = on_threads(&spans, |span| std::str::from_utf8(span).is_ok());
    if utf8.contains(&false) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ));
    }
    // SAFETY: checked above, part by part, to be UTF-8.
    Ok(unsafe { String::from_utf8_unchecked(bytes) })
}

/// Frees a long text on a thread of its own: giving a copy of 180 MB back
/// to the system takes some 20 ms, which the snapshot built from it need
/// not wait for. A short one (or one no thread could be started for) is
/// freed here.
fn free_aside(text: String) {
    if parallel_parts(text.len()) > 1 {
        let _ = std::thread::Builder::new()
            .name("config-free".into())
            .spawn(move || drop(text));
    }
}

/// A byte inside a UTF-8 character, not its first.
fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// A `*.json` file is JSON; any other file is YAML (as a single file given
/// by name is, whatever its name).
fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "json")
}

fn config_files(path: &Path) -> io::Result<Vec<PathBuf>> {
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
        let known = file
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json");
        if known && !hidden && fs::metadata(&file).is_ok_and(|m| m.is_file()) {
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
