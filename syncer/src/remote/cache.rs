//! Typed per-remote caches: one [`Store`] per resource, each keyed by the key relative to its
//! watched prefix (`<node>`, `<ip>`, `<id>`, `<ns>/<name>`), holding the validated value and
//! the digest of its raw bytes (see [`crate::watcher`] for how a store is kept and why it is
//! shaped so). Decoded values are `Arc`s shared with the events.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use clustermesh_types::identity::Identity;
use clustermesh_types::model::{ClusterService, IpcacheEntry, Node, ServiceExport};

use super::{Resource, Stored, Value};
use crate::watcher::Store;

/// Everything currently known about one remote cluster.
#[derive(Debug, Default)]
pub struct RemoteCache {
    stores: [Store<Value>; Resource::ALL.len()],
}

impl RemoteCache {
    /// The store of `resource`.
    pub fn store(&self, resource: Resource) -> &Store<Value> {
        &self.stores[resource.index()]
    }

    /// Entries of `resource`.
    pub fn len(&self, resource: Resource) -> usize {
        self.store(resource).len()
    }

    /// Whether no resource holds an entry.
    pub fn is_empty(&self) -> bool {
        self.stores.iter().all(Store::is_empty)
    }

    /// The entry of `resource` under relative key `rel`.
    pub fn get(&self, resource: Resource, rel: &str) -> Option<Stored> {
        self.store(resource).get(rel)
    }

    /// The relative keys of `resource`, in order.
    pub fn keys(&self, resource: Resource) -> Vec<String> {
        self.store(resource)
            .read(|m| m.keys().map(ToString::to_string).collect())
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        match self.store(Resource::Nodes).value(name) {
            Some(Value::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// An ipcache entry by key suffix (`10.0.0.1`, `10.0.0.0/8`).
    pub fn endpoint(&self, ip: &str) -> Option<Arc<IpcacheEntry>> {
        match self.store(Resource::Endpoints).value(ip) {
            Some(Value::Endpoint(e)) => Some(e),
            _ => None,
        }
    }

    /// An identity (derefs to its labels).
    pub fn identity(&self, id: u32) -> Option<Arc<Identity>> {
        match self.store(Resource::Identities).value(&id.to_string()) {
            Some(Value::Identity(l)) => Some(l),
            _ => None,
        }
    }

    /// A service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<ClusterService>> {
        match self
            .store(Resource::Services)
            .value(&format!("{namespace}/{name}"))
        {
            Some(Value::Service(s)) => Some(s),
            _ => None,
        }
    }

    /// A service export by namespace and name.
    pub fn service_export(&self, namespace: &str, name: &str) -> Option<Arc<ServiceExport>> {
        match self
            .store(Resource::ServiceExports)
            .value(&format!("{namespace}/{name}"))
        {
            Some(Value::ServiceExport(s)) => Some(s),
            _ => None,
        }
    }
}

/// Shared handle to every remote's cache (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Caches(Arc<RwLock<CacheMap>>);

/// Cluster name → that remote's cache.
type CacheMap = BTreeMap<Arc<str>, Arc<RemoteCache>>;

impl Caches {
    /// The cache of `cluster`, if it is configured (or still draining).
    pub fn get(&self, cluster: &str) -> Option<Arc<RemoteCache>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .cloned()
    }

    /// Runs `f` on `cluster`'s cache.
    pub fn with<R>(&self, cluster: &str, f: impl FnOnce(&RemoteCache) -> R) -> Option<R> {
        let cache = self.get(cluster)?;
        Some(f(&cache))
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

    pub(crate) fn get_or_create(&self, cluster: &Arc<str>) -> Arc<RemoteCache> {
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
