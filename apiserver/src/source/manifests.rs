//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file below a
//! directory (dotfiles ignored, so writers can rename a temp file into place), each holding
//! one or more `---`-separated Kubernetes objects or a `kind: List`.
//!
//! A file that stops parsing keeps contributing its last good objects — bad input loses
//! nothing — and its error (file, line, column, cause) is reported until it is fixed.
//! Changes are picked up through inotify (notify), debounced, with a periodic rescan as a
//! safety net for missed events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Object, Snapshot};

/// Why the source cannot run at all (a bad file is not one: it is reported in
/// [`Published::errors`] and the source keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No file watcher can be created (inotify).
    #[error("cannot create a file watcher (inotify): {0}; check fs.inotify.max_user_instances")]
    Watcher(notify::Error),
    /// The first scan of the directory failed.
    #[error("cannot read manifest directory {}: {error}", dir.display())]
    Scan {
        /// The directory.
        dir: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The directory cannot be watched.
    #[error("cannot watch manifest directory {}: {error}", dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// Why.
        error: notify::Error,
    },
}

/// A parse problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, if known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.path.display(), l, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Signature {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
}

#[derive(Debug)]
struct FileState {
    sig: Signature,
    objects: Vec<Object>,
    error: Option<FileError>,
}

/// The directory and what was last read from each file.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Whether any file's objects changed.
    pub changed: bool,
    /// Current errors, one per broken file.
    pub errors: Vec<FileError>,
}

impl ManifestDir {
    /// A source over `dir` (which must exist).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads files that changed since the last scan (in parallel, one thread per core).
    pub fn scan(&mut self) -> std::io::Result<Scan> {
        use std::os::unix::fs::MetadataExt;
        let mut seen = Vec::new();
        collect_files(&self.dir, &mut seen)?;
        let mut scan = Scan::default();
        let mut present = std::collections::BTreeSet::new();
        let mut todo: Vec<(PathBuf, Signature)> = Vec::new();
        for path in seen {
            let Ok(md) = std::fs::metadata(&path) else {
                continue;
            };
            let sig = Signature {
                len: md.len(),
                modified: md.modified().ok(),
                ino: md.ino(),
            };
            present.insert(path.clone());
            if self.files.get(&path).map(|f| f.sig == sig).unwrap_or(false) {
                continue;
            }
            todo.push((path, sig));
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(todo.len().max(1));
        let chunk = todo.len().div_ceil(threads).max(1);
        let results: Vec<ParsedFile> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(path, sig)| (path.clone(), sig.clone(), read_and_parse(path)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for (path, sig, result) in results {
            match result {
                Ok(None) => {
                    present.remove(&path);
                }
                Ok(Some(objects)) => {
                    let entry = self.files.get(&path);
                    if !entry.map(|f| f.objects == objects).unwrap_or(false) {
                        scan.changed = true;
                    }
                    if entry.and_then(|f| f.error.as_ref()).is_some() {
                        info!(file = %path.display(), "manifest parses again");
                    }
                    self.files.insert(
                        path,
                        FileState {
                            sig,
                            objects,
                            error: None,
                        },
                    );
                }
                Err(err) => {
                    warn!(error = %err, "manifest does not parse; keeping its last good objects");
                    self.set_error(path, sig, err);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        if self.files.len() != before {
            scan.changed = true;
        }
        scan.errors = self
            .files
            .values()
            .filter_map(|f| f.error.clone())
            .collect();
        Ok(scan)
    }

    fn set_error(&mut self, path: PathBuf, sig: Signature, err: FileError) {
        match self.files.get_mut(&path) {
            Some(f) => {
                f.sig = sig;
                f.error = Some(err);
            }
            None => {
                self.files.insert(
                    path,
                    FileState {
                        sig,
                        objects: Vec::new(),
                        error: Some(err),
                    },
                );
            }
        }
    }

    /// Every object from every file (later files win on duplicate keys).
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for f in self.files.values() {
            for o in &f.objects {
                snap.insert(o.clone());
            }
        }
        snap
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let ft = entry.file_type()?;
        if ft.is_dir() {
            collect_files(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
    Ok(())
}

/// A file read in a scan: path, signature, and its objects (`None`: it vanished).
type ParsedFile = (PathBuf, Signature, Result<Option<Vec<Object>>, FileError>);

/// Reads and parses one file; `Ok(None)` if it vanished meanwhile.
fn read_and_parse(path: &Path) -> Result<Option<Vec<Object>>, FileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileError {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot read: {e}"),
        }),
    }
}

/// Parses one file's text into objects, or the first error with its line. `.json` files
/// (one object, a `List`, or several objects one after another, as `kubectl get -o json`
/// writes them) take serde_json's fast path; everything else is YAML.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        return parse_json(path, text);
    }
    parse_yaml(path, text)
}

fn parse_json(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    let mut out = Vec::new();
    let stream =
        serde_json::Deserializer::from_str(text).into_iter::<&serde_json::value::RawValue>();
    for raw in stream {
        let raw = raw.map_err(|e| FileError {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        parse_json_object(path, raw.get(), &mut out)?;
    }
    Ok(out)
}

/// One JSON object (or `List`): the kind is read first without building a tree, then the
/// object is decoded straight into its type — about twice as fast as going through
/// `serde_json::Value`.
fn parse_json_object(path: &Path, raw: &str, out: &mut Vec<Object>) -> Result<(), FileError> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct List<'a> {
        #[serde(borrow, default)]
        items: Vec<&'a serde_json::value::RawValue>,
    }
    let err = |message: String| FileError {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    let head: Head = serde_json::from_str(raw).map_err(|e| err(e.to_string()))?;
    if head.kind.as_deref() == Some("List") {
        let list: List = serde_json::from_str(raw).map_err(|e| err(e.to_string()))?;
        for item in list.items {
            parse_json_object(path, item.get(), out)?;
        }
        return Ok(());
    }
    out.push(Object::from_json_str(head.kind.as_deref(), raw).map_err(err)?);
    Ok(())
}

fn parse_yaml(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                return Err(FileError {
                    path: path.to_path_buf(),
                    line: e.location().map(|l| l.line()),
                    message: e.to_string(),
                })
            }
        };
        if value.is_null() {
            continue;
        }
        let is_list = value.get("kind").and_then(|k| k.as_str()) == Some("List");
        let items = if is_list {
            match value.get("items") {
                Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            }
        } else {
            vec![value]
        };
        for item in items {
            let obj = Object::from_yaml(item).map_err(|message| FileError {
                path: path.to_path_buf(),
                line: None,
                message,
            })?;
            out.push(obj);
        }
    }
    Ok(out)
}

/// The latest snapshot and the current parse errors, published on a `watch` channel.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Objects.
    pub snapshot: Arc<Snapshot>,
    /// Broken files.
    pub errors: Arc<Vec<FileError>>,
    /// Increments with each change.
    pub generation: u64,
}

/// Watches `dir` until `cancel`, publishing a new [`Published`] after every change.
/// The first value is published after the initial scan (generation 1).
pub async fn run(
    dir: PathBuf,
    debounce: Duration,
    tx: watch::Sender<Published>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = ev_tx.send(());
        }
    })
    .map_err(Error::Watcher)?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|error| Error::Watch {
            dir: dir.clone(),
            error,
        })?;
    let mut source = ManifestDir::new(dir.clone());
    let mut generation = 0u64;
    // Returns the number of objects published (the snapshot is built once: with 10k pods
    // building it costs milliseconds of the first export's critical path).
    let publish = |source: &ManifestDir, errors: Vec<FileError>, generation: u64| {
        let snapshot = Arc::new(source.snapshot());
        let objects = snapshot.len();
        tx.send_replace(Published {
            snapshot,
            errors: Arc::new(errors),
            generation,
        });
        objects
    };
    let scan = source.scan().map_err(|error| Error::Scan {
        dir: dir.clone(),
        error,
    })?;
    generation += 1;
    let errors = scan.errors.len();
    let objects = publish(&source, scan.errors, generation);
    info!(dir = %dir.display(), objects, errors, "manifest directory read");
    let mut last_errors = Vec::new();
    let mut safety = tokio::time::interval(Duration::from_secs(30));
    safety.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            ev = ev_rx.recv() => {
                if ev.is_none() { return Ok(()); }
                // Debounce: let a burst of writes settle.
                tokio::time::sleep(debounce).await;
                while ev_rx.try_recv().is_ok() {}
            }
            _ = safety.tick() => {}
        }
        match source.scan() {
            Ok(scan) => {
                if scan.changed || scan.errors != last_errors {
                    generation += 1;
                    debug!(generation, "manifests changed");
                    last_errors = scan.errors.clone();
                    publish(&source, scan.errors, generation);
                }
            }
            Err(e) => warn!(error = %e, dir = %dir.display(), "cannot scan manifest directory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_doc_and_list() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\nkind: List\nitems:\n- kind: Namespace\n  metadata: {name: b}\n";
        let objs = parse_file(Path::new("x.yaml"), text).unwrap();
        assert_eq!(objs.len(), 2);
    }

    #[test]
    fn error_names_file_and_line() {
        let text =
            "kind: Namespace\nmetadata:\n  name: a\n---\nkind: Pod\nmetadata:\n  name: [unclosed\n";
        let e = parse_file(Path::new("bad.yaml"), text).unwrap_err();
        assert!(e.to_string().starts_with("bad.yaml:"), "{e}");
        assert!(e.line.is_some(), "{e:?}");
    }

    #[test]
    fn broken_file_keeps_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns.yaml");
        std::fs::write(&f, "kind: Namespace\nmetadata:\n  name: a\n").unwrap();
        let mut src = ManifestDir::new(dir.path());
        assert!(src.scan().unwrap().changed);
        assert_eq!(src.snapshot().namespaces.len(), 1);
        std::fs::write(&f, "kind: Namespace\nmetadata:\n  name: [\n").unwrap();
        let scan = src.scan().unwrap();
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(src.snapshot().namespaces.len(), 1, "last good objects kept");
        std::fs::remove_file(&f).unwrap();
        assert!(src.scan().unwrap().changed);
        assert!(src.snapshot().namespaces.is_empty());
    }
}
