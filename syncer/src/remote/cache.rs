//! Typed per-remote caches.
//!
//! Each resource is one ordered map from the key relative to its watched prefix (`<node>`,
//! `<ip>`, `<id>`, `<ns>/<name>`) to the decoded value and a 128-bit digest of the raw bytes.
//! The digest tells a real change from a rewrite of the same value (a relist after a
//! reconnect must not produce events for unchanged keys) without keeping the bytes: the
//! raw value travels only in the emitted [`Change::Upsert`], for consumers that mirror it.
//! Decoded values are `Arc`s shared with the events. The digest is SHA-256 truncated to 128
//! bits, so a hostile remote cannot craft a different value that looks unchanged. A B-tree
//! instead of a hash map saves about 60 bytes per entry (250k remote endpoints are the
//! scale target) and lists keys in order. Keys are inline [`SmolStr`]s (an IP, a node name
//! or an identity fit in 23 bytes: no allocation per key), and a store filled from empty
//! (the first list of a session) is bulk-built: inserting keys in ascending order one by one
//! leaves B-tree nodes about half full, a bulk build packs them.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use bytes::Bytes;
use clustermesh_types::identity::LabelArray;
use clustermesh_types::model::{ClusterService, IpIdentityPair, Node, ServiceExport, SmolStr};

use super::{Change, Resource, Value};

/// One cached entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// [`digest`] of the remote's bytes.
    pub digest: Digest,
    /// The validated value.
    pub value: Value,
}

/// SHA-256 of a raw value, truncated to 128 bits.
pub type Digest = [u8; 16];

/// The digest the cache keeps of a raw value.
pub fn digest(raw: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, raw);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// Everything currently known about one remote cluster.
#[derive(Debug, Default)]
pub struct RemoteCache {
    stores: [BTreeMap<SmolStr, Stored>; 5],
}

impl RemoteCache {
    /// Entries of `resource`.
    pub fn len(&self, resource: Resource) -> usize {
        self.stores[resource.index()].len()
    }

    /// Whether no resource holds an entry.
    pub fn is_empty(&self) -> bool {
        self.stores.iter().all(BTreeMap::is_empty)
    }

    /// The entry of `resource` under relative key `rel`.
    pub fn get(&self, resource: Resource, rel: &str) -> Option<&Stored> {
        self.stores[resource.index()].get(rel)
    }

    /// All entries of `resource` (relative key, entry), ordered by key.
    pub fn iter(&self, resource: Resource) -> impl Iterator<Item = (&str, &Stored)> {
        self.stores[resource.index()]
            .iter()
            .map(|(k, v)| (k.as_ref(), v))
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        match self.get(Resource::Nodes, name).map(|s| &s.value) {
            Some(Value::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// An ipcache entry by key suffix (`10.0.0.1`, `10.0.0.0/8`).
    pub fn endpoint(&self, ip: &str) -> Option<&Arc<IpIdentityPair>> {
        match self.get(Resource::Endpoints, ip).map(|s| &s.value) {
            Some(Value::Endpoint(e)) => Some(e),
            _ => None,
        }
    }

    /// An identity's labels.
    pub fn identity(&self, id: u32) -> Option<&Arc<LabelArray>> {
        match self
            .get(Resource::Identities, &id.to_string())
            .map(|s| &s.value)
        {
            Some(Value::Identity(l)) => Some(l),
            _ => None,
        }
    }

    /// A service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<ClusterService>> {
        match self
            .get(Resource::Services, &format!("{namespace}/{name}"))
            .map(|s| &s.value)
        {
            Some(Value::Service(s)) => Some(s),
            _ => None,
        }
    }

    /// A service export by namespace and name.
    pub fn service_export(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceExport>> {
        match self
            .get(Resource::ServiceExports, &format!("{namespace}/{name}"))
            .map(|s| &s.value)
        {
            Some(Value::ServiceExport(s)) => Some(s),
            _ => None,
        }
    }

    /// Stores a validated value; `None` if the bytes are unchanged (no event needed).
    pub(crate) fn upsert(
        &mut self,
        resource: Resource,
        rel: &str,
        raw: Bytes,
        value: Value,
    ) -> Option<Change> {
        let store = &mut self.stores[resource.index()];
        let d = digest(&raw);
        if let Some(old) = store.get_mut(rel) {
            if old.digest == d {
                return None;
            }
            old.digest = d;
            old.value = value.clone();
        } else {
            store.insert(
                SmolStr::new(rel),
                Stored {
                    digest: d,
                    value: value.clone(),
                },
            );
        }
        Some(Change::Upsert { raw, value })
    }

    /// Stores the validated values of a list (full keys, `prefix` + relative key) and
    /// returns (full key, change) for those whose bytes changed.
    pub(crate) fn upsert_listed(
        &mut self,
        resource: Resource,
        prefix: &str,
        valid: Vec<(String, Bytes, Value)>,
    ) -> Vec<(String, Change)> {
        let store = &mut self.stores[resource.index()];
        if !store.is_empty() {
            return valid
                .into_iter()
                .filter_map(|(key, raw, value)| {
                    let change = self.upsert(resource, &key[prefix.len()..], raw, value)?;
                    Some((key, change))
                })
                .collect();
        }
        let mut changes = Vec::with_capacity(valid.len());
        *store = valid
            .into_iter()
            .map(|(key, raw, value)| {
                let entry = (
                    SmolStr::new(&key[prefix.len()..]),
                    Stored {
                        digest: digest(&raw),
                        value: value.clone(),
                    },
                );
                changes.push((key, Change::Upsert { raw, value }));
                entry
            })
            .collect();
        changes
    }

    /// Whether `rel` is cached with exactly these bytes.
    pub(crate) fn unchanged(&self, resource: Resource, rel: &str, raw: &[u8]) -> bool {
        self.get(resource, rel)
            .is_some_and(|s| s.digest == digest(raw))
    }

    /// Removes an entry; the delete change if it existed.
    pub(crate) fn delete(&mut self, resource: Resource, rel: &str) -> Option<Change> {
        self.stores[resource.index()]
            .remove(rel)
            .map(|s| Change::Delete { last: s.value })
    }

    /// Relative keys of `resource` that are not `listed` (the stale ones after a relist).
    pub(crate) fn keys_not_in<'a>(
        &self,
        resource: Resource,
        listed: impl Iterator<Item = &'a str>,
    ) -> Vec<SmolStr> {
        let store = &self.stores[resource.index()];
        if store.is_empty() {
            return Vec::new();
        }
        let seen: std::collections::HashSet<&str> = listed.collect();
        store
            .keys()
            .filter(|k| !seen.contains(k.as_str()))
            .cloned()
            .collect()
    }

    /// Removes everything of `resource`, returning (relative key, delete change).
    pub(crate) fn take_all(&mut self, resource: Resource) -> Vec<(SmolStr, Change)> {
        std::mem::take(&mut self.stores[resource.index()])
            .into_iter()
            .map(|(k, s)| (k, Change::Delete { last: s.value }))
            .collect()
    }
}

/// Shared handle to every remote's cache (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Caches(Arc<RwLock<CacheMap>>);

/// Cluster name → that remote's cache.
type CacheMap = BTreeMap<Arc<str>, Arc<RwLock<RemoteCache>>>;

impl Caches {
    /// The cache of `cluster`, if it is configured (or still draining).
    pub fn get(&self, cluster: &str) -> Option<Arc<RwLock<RemoteCache>>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .cloned()
    }

    /// Runs `f` on a read lock of `cluster`'s cache.
    pub fn with<R>(&self, cluster: &str, f: impl FnOnce(&RemoteCache) -> R) -> Option<R> {
        let cache = self.get(cluster)?;
        let guard: RwLockReadGuard<'_, RemoteCache> =
            cache.read().unwrap_or_else(PoisonError::into_inner);
        Some(f(&guard))
    }

    /// Names of the clusters with a cache.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn get_or_create(&self, cluster: &Arc<str>) -> Arc<RwLock<RemoteCache>> {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(cluster.clone())
            .or_default()
            .clone()
    }

    pub(crate) fn remove(&self, cluster: &str) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_bytes_produce_no_change() {
        let mut c = RemoteCache::default();
        let v = Value::Identity(Arc::new(LabelArray::default()));
        let raw = Bytes::from_static(b"k8s:a=b;");
        assert!(c
            .upsert(Resource::Identities, "1", raw.clone(), v.clone())
            .is_some());
        assert!(c
            .upsert(Resource::Identities, "1", raw, v.clone())
            .is_none());
        assert!(c
            .upsert(Resource::Identities, "1", Bytes::from_static(b"x"), v)
            .is_some());
        assert_eq!(c.keys_not_in(Resource::Identities, [].into_iter()).len(), 1);
        assert!(c
            .keys_not_in(Resource::Identities, ["1"].into_iter())
            .is_empty());
        assert!(c.delete(Resource::Identities, "1").is_some());
        assert!(c.delete(Resource::Identities, "1").is_none());
        assert!(c.is_empty());
    }
}
