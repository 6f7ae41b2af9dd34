//! Per-remote status in the JSON shape of Cilium's `RemoteCluster` model
//! (`cilium-dbg status -o json`, `kvstoremesh-dbg status -o json`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use serde::{Serialize, Serializer};
use tokio::sync::Notify;

use super::Resource;

/// The state of every configured remote, published on a `watch` channel.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Every remote ready, or past its ready timeout without ever connecting.
    pub ready: bool,
    /// One entry per configured remote, sorted by name.
    pub clusters: Vec<Status>,
}

impl Snapshot {
    /// The status of `name`.
    pub fn get(&self, name: &str) -> Option<&Status> {
        self.clusters.iter().find(|s| s.name == name)
    }
}

/// One remote cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// Cluster name (= config file name).
    pub name: String,
    /// The last read of `cilium/.heartbeat` succeeded and the session is up.
    pub connected: bool,
    /// Connected, config retrieved and every resource synced.
    pub ready: bool,
    /// What is happening or, after a failure, what went wrong and how to fix it.
    pub status: String,
    /// The kind of the last failure (`unreachable`, `tls`, `auth`, `etcd`, `config`,
    /// `other`; see [`crate::failure`]), until the next connection succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<crate::failure::Class>,
    /// What to do about the last failure, naming the file or endpoint at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Failed sessions so far.
    pub num_failures: u64,
    /// When the last session failed.
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_failure: Option<SystemTime>,
    /// Nodes cached.
    pub num_nodes: usize,
    /// ipcache entries cached.
    pub num_endpoints: usize,
    /// Identities cached.
    pub num_identities: usize,
    /// Services cached.
    pub num_shared_services: usize,
    /// MCS-API service exports cached.
    pub num_service_exports: usize,
    /// EndpointSlices cached.
    pub num_endpoint_slices: usize,
    /// The remote's cluster config.
    pub config: StatusConfig,
    /// Initial sync state per resource in the current session.
    pub synced: StatusSynced,
}

/// `config` of [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusConfig {
    /// The remote's cluster ID (0 until retrieved).
    pub cluster_id: u32,
    /// Read through a KVStoreMesh cache (`cached: true`).
    pub kvstoremesh: bool,
    /// The config is mandatory (always true).
    pub required: bool,
    /// The config was read and accepted.
    pub retrieved: bool,
    /// `serviceExportsEnabled` as announced (`null` = not supported by the remote).
    pub service_exports_enabled: Option<bool>,
    /// The remote writes synced canaries.
    pub sync_canaries: bool,
    /// `endpointSlicesExportMode` as announced (`""` = not announced).
    pub endpoint_slices_export_mode: String,
}

/// `synced` of [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusSynced {
    /// Nodes listed.
    pub nodes: bool,
    /// ipcache listed.
    pub endpoints: bool,
    /// Identities listed.
    pub identities: bool,
    /// Services listed.
    pub services: bool,
    /// Service exports listed (true when the remote does not export them).
    pub service_exports: bool,
    /// EndpointSlices listed (true when they are not read from this remote).
    pub endpoint_slices: bool,
}

impl StatusSynced {
    pub(crate) fn set(&mut self, r: Resource, v: bool) {
        match r {
            Resource::Nodes => self.nodes = v,
            Resource::Endpoints => self.endpoints = v,
            Resource::Identities => self.identities = v,
            Resource::Services => self.services = v,
            Resource::ServiceExports => self.service_exports = v,
            Resource::EndpointSlices => self.endpoint_slices = v,
        }
    }

    /// Every resource synced.
    pub fn all(&self) -> bool {
        self.nodes
            && self.endpoints
            && self.identities
            && self.services
            && self.service_exports
            && self.endpoint_slices
    }
}

fn rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&clustermesh_types::model::format_rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// Mutable status of one remote, shared by its session and the publisher.
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Status>,
    pub(crate) added: Instant,
    changed: Arc<Notify>,
}

impl Shared {
    pub(crate) fn new(name: &str, changed: Arc<Notify>) -> Self {
        Self {
            inner: Mutex::new(Status {
                name: name.to_owned(),
                status: "waiting for initial connection".into(),
                config: StatusConfig {
                    required: true,
                    ..Default::default()
                },
                ..Default::default()
            }),
            added: Instant::now(),
            changed,
        }
    }

    /// Changes the status and wakes the publisher.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_one();
    }

    /// Wakes the publisher (counts changed).
    pub(crate) fn touch(&self) {
        self.changed.notify_one();
    }

    pub(crate) fn get(&self) -> Status {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_match_cilium() {
        let s = Status {
            name: "cluster3".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        for k in [
            "name",
            "connected",
            "ready",
            "status",
            "num-failures",
            "last-failure",
            "num-nodes",
            "num-endpoints",
            "num-identities",
            "num-shared-services",
            "num-service-exports",
            "num-endpoint-slices",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert!(v["last-failure"].is_null());
        assert!(v["config"].get("service-exports-enabled").is_some());
        assert!(v["config"].get("sync-canaries").is_some());
        assert!(v["synced"].get("service-exports").is_some());
        assert!(v["synced"].get("endpoint-slices").is_some());
        assert!(v["config"].get("endpoint-slices-export-mode").is_some());
    }
}
