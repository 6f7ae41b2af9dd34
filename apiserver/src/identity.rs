//! Security identity allocation for plain Pods: one numeric identity per distinct label set,
//! inside the cluster's range, stable across apiserver and etcd restarts.
//!
//! Stability comes from two places: the state file (`identities.json` in the state dir) and
//! the identities already stored in etcd, which are read back on start. Freed numbers are not
//! handed out again while unused ones remain (a cursor walks the range), so a remote cluster
//! that still caches an old identity is not confused by a new meaning for it. When the range
//! is full, an allocation no current pod uses is recycled; when every number is in use,
//! allocation fails with an error — never an overlap with another cluster's range.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use clustermesh_types::cluster::IdentityRange;
use clustermesh_types::identity::MIN_USER_IDENTITY;
use serde::{Deserialize, Serialize};

/// Allocation and state file errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state file exists but cannot be read.
    #[error("cannot read state file {}: {error}", path.display())]
    ReadState {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The state file is not what this allocator wrote.
    #[error("state file {} is corrupt ({error}); move it away to start over (identities will be re-read from etcd)", path.display())]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// Why.
        error: serde_json::Error,
    },
    /// The state file cannot be written (the message names the file and the cause).
    #[error(transparent)]
    WriteState(clustermesh_syncer::Error),
    /// Every identity of the range is in use.
    #[error("identity range {min}..={max} is exhausted ({used} identities in use): cannot allocate an identity for labels {labels}; reduce the number of distinct label sets or use --max-connected-clusters=255 for larger per-cluster ranges")]
    Exhausted {
        /// Range start.
        min: u32,
        /// Range end.
        max: u32,
        /// In use.
        used: usize,
        /// Labels that got none.
        labels: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    #[serde(default)]
    identities: BTreeMap<String, u32>,
    #[serde(default)]
    cursor: u32,
    #[serde(default, rename = "exportTimes")]
    export_times: BTreeMap<String, String>,
}

/// The allocator (plus other small state that must survive restarts).
#[derive(Debug)]
pub struct Allocator {
    min: u32,
    max: u32,
    by_labels: HashMap<String, u32>,
    by_id: BTreeMap<u32, String>,
    cursor: u32,
    export_times: BTreeMap<String, String>,
    path: Option<PathBuf>,
    dirty: bool,
}

impl Allocator {
    /// An allocator for `range`, loading `path` if it exists.
    pub fn new(range: IdentityRange, path: Option<PathBuf>) -> Result<Self, Error> {
        let mut a = Self {
            min: range.min.max(MIN_USER_IDENTITY),
            max: range.max,
            by_labels: HashMap::new(),
            by_id: BTreeMap::new(),
            cursor: range.min.max(MIN_USER_IDENTITY),
            export_times: BTreeMap::new(),
            path,
            dirty: false,
        };
        if let Some(p) = &a.path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let st: Persisted =
                        serde_json::from_slice(&bytes).map_err(|error| Error::CorruptState {
                            path: p.clone(),
                            error,
                        })?;
                    for (labels, id) in st.identities {
                        a.seed(&labels, id);
                    }
                    if (a.min..=a.max).contains(&st.cursor) {
                        a.cursor = st.cursor;
                    }
                    a.export_times = st.export_times;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(Error::ReadState {
                        path: p.clone(),
                        error,
                    })
                }
            }
        }
        a.dirty = false;
        Ok(a)
    }

    /// Records an existing allocation (from the state file or etcd). Ignored if outside the
    /// range or if either side is already taken.
    pub fn seed(&mut self, labels: &str, id: u32) {
        if !(self.min..=self.max).contains(&id)
            || self.by_id.contains_key(&id)
            || self.by_labels.contains_key(labels)
        {
            return;
        }
        self.by_labels.insert(labels.to_string(), id);
        self.by_id.insert(id, labels.to_string());
        self.dirty = true;
    }

    /// The identity allocated to `labels`, if any (allocates nothing).
    pub fn id_of(&self, labels: &str) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// The identity for `labels`, allocating one if needed. `taken` holds numbers that are
    /// in use by someone else (CiliumIdentity objects); `in_use` the label sets current pods
    /// use (their allocations are never recycled).
    pub fn allocate(
        &mut self,
        labels: &str,
        taken: &HashSet<u32>,
        in_use: &HashSet<&str>,
    ) -> Result<u32, Error> {
        if let Some(id) = self.by_labels.get(labels) {
            if !taken.contains(id) {
                return Ok(*id);
            }
            // Someone else claimed our number: move to a fresh one.
            let id = *id;
            self.by_labels.remove(labels);
            self.by_id.remove(&id);
        }
        let span = self.max - self.min + 1;
        for i in 0..span {
            let id = self.min + (self.cursor - self.min + i) % span;
            if !self.by_id.contains_key(&id) && !taken.contains(&id) {
                return Ok(self.assign(labels, id));
            }
        }
        // Range full: recycle an allocation no current pod uses.
        let victim = self
            .by_id
            .iter()
            .find(|(id, l)| !in_use.contains(l.as_str()) && !taken.contains(id))
            .map(|(id, l)| (*id, l.clone()));
        match victim {
            Some((id, old)) => {
                self.by_labels.remove(&old);
                self.by_id.remove(&id);
                Ok(self.assign(labels, id))
            }
            None => Err(Error::Exhausted {
                min: self.min,
                max: self.max,
                used: self.by_id.len(),
                labels: labels.to_string(),
            }),
        }
    }

    fn assign(&mut self, labels: &str, id: u32) -> u32 {
        self.by_labels.insert(labels.to_string(), id);
        self.by_id.insert(id, labels.to_string());
        self.cursor = if id == self.max { self.min } else { id + 1 };
        self.dirty = true;
        id
    }

    /// The first time an export was seen (RFC3339), remembered across restarts.
    pub fn export_time(&mut self, key: &str, now: impl FnOnce() -> String) -> String {
        if let Some(t) = self.export_times.get(key) {
            return t.clone();
        }
        let t = now();
        self.export_times.insert(key.to_string(), t.clone());
        self.dirty = true;
        t
    }

    /// Number of allocations held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Writes the state file if anything changed.
    pub fn save(&mut self) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let st = Persisted {
            identities: self
                .by_labels
                .iter()
                .map(|(l, id)| (l.clone(), *id))
                .collect(),
            cursor: self.cursor,
            export_times: self.export_times.clone(),
        };
        // A map of strings and numbers always serialises.
        let bytes = serde_json::to_vec_pretty(&st).unwrap_or_default();
        clustermesh_syncer::config::write_private(path, &bytes).map_err(Error::WriteState)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_types::cluster::MaxConnectedClusters;

    fn range() -> IdentityRange {
        IdentityRange::for_cluster(1, MaxConnectedClusters::Max255)
    }

    #[test]
    fn stable_and_in_range() {
        let mut a = Allocator::new(range(), None).unwrap();
        let (taken, in_use) = (HashSet::new(), HashSet::new());
        let x = a.allocate("k8s:app=a;", &taken, &in_use).unwrap();
        let y = a.allocate("k8s:app=b;", &taken, &in_use).unwrap();
        assert_ne!(x, y);
        assert_eq!(a.allocate("k8s:app=a;", &taken, &in_use).unwrap(), x);
        assert!(range().contains(x) && range().contains(y));
    }

    #[test]
    fn persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("identities.json");
        let (taken, in_use) = (HashSet::new(), HashSet::new());
        let mut a = Allocator::new(range(), Some(p.clone())).unwrap();
        a.allocate("k8s:app=z;", &taken, &in_use).unwrap();
        let x = a.allocate("k8s:app=a;", &taken, &in_use).unwrap();
        a.save().unwrap();
        let mut b = Allocator::new(range(), Some(p)).unwrap();
        assert_eq!(b.allocate("k8s:app=a;", &taken, &in_use).unwrap(), x);
    }

    #[test]
    fn exhaustion_is_an_error_not_an_overlap() {
        // A tiny range: cluster 0 in 511 mode has 256..=32767; fake a small one instead.
        let r = IdentityRange {
            min: 1000,
            max: 1002,
        };
        let mut a = Allocator::new(r, None).unwrap();
        let mut in_use = HashSet::new();
        for l in ["a", "b", "c"] {
            in_use.insert(l);
        }
        for l in ["a", "b", "c"] {
            let id = a.allocate(l, &HashSet::new(), &in_use).unwrap();
            assert!((1000..=1002).contains(&id));
        }
        let err = a.allocate("d", &HashSet::new(), &in_use).unwrap_err();
        assert!(err.to_string().contains("exhausted"), "{err}");
        // Once "a" is no longer used its number can be recycled.
        in_use.remove("a");
        let id = a.allocate("d", &HashSet::new(), &in_use).unwrap();
        assert!((1000..=1002).contains(&id));
    }

    #[test]
    fn skips_numbers_taken_by_cilium_identities() {
        let r = IdentityRange {
            min: 1000,
            max: 1001,
        };
        let mut a = Allocator::new(r, None).unwrap();
        let taken: HashSet<u32> = [1000].into();
        assert_eq!(a.allocate("x", &taken, &HashSet::new()).unwrap(), 1001);
    }
}
