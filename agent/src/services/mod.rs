//! Services: local services merged with the global services of remote clusters
//! ([`merger`]; a remote that exports EndpointSlices instead is folded into the same shape
//! by [`slices`]), turned into LB map entries by diff ([`table`], written by [`maps`]), and
//! MCS-API imports ([`mcs`]) for `clusterset.local` DNS (`crate::dns`).
//!
//! [`ServiceMerger`] is the entry point the reconcile loop drives: every change returns the
//! [`Diff`] to apply to the LB maps, so a backend that disappears is out of the datapath
//! as soon as the diff is written (no restart), and affinity failover is a diff like any
//! other.
//!
//! It must not read etcd or touch maps itself (except through [`maps::LbMaps`]).

pub mod maps;
pub mod mcs;
pub mod merger;
pub mod slices;
pub mod table;

use std::collections::BTreeMap;
use std::sync::Arc;

use clustermesh_syncer::remote::{self, Change, Resource, Value};
use clustermesh_types::model::{ClusterService, ServiceExport};
use serde::Serialize;

pub use maps::LbMaps;
pub use mcs::{Conflict, Import, Imports};
pub use merger::{
    Affinity, Backend, BackendConflict, Frontend, LocalService, Merged, Merger, Name,
};
pub use table::{Diff, Table};

/// Errors of the services module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks an LB map (a build mismatch).
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    /// A map operation failed.
    #[error("map {map}: {op}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A change of the local cluster's services, from the local reader (`crate::local`).
#[derive(Debug, Clone)]
pub enum LocalInput {
    /// `clustermesh/local/v1/services/<rel>` changed (`raw: None` = deleted).
    Service {
        /// The key after the prefix (`<ns>/<name>`).
        rel: String,
        /// The value.
        raw: Option<Vec<u8>>,
    },
    /// The local cluster's export of `name` changed (`None` = withdrawn).
    Export {
        /// The exported service.
        name: Name,
        /// The validated export.
        export: Option<Arc<ServiceExport>>,
    },
    /// Every local service has been listed (sent after each list of a session).
    Listed,
}

/// Status of the services (`/status` → `services`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// Frontends programmed.
    pub frontends: usize,
    /// Backend entries programmed.
    pub backends: usize,
    /// Frontends or backends skipped (IPv6, SCTP).
    pub unsupported: u64,
    /// Remote backend IPs ignored because another backend has them.
    pub backend_conflicts: Vec<BackendConflict>,
    /// MCS-API export conflicts (the oldest export wins).
    pub mcs_conflicts: Vec<Conflict>,
}

/// Local services, remote services and service exports → LB map diffs and imports.
#[derive(Debug)]
pub struct ServiceMerger {
    local_cluster: String,
    merger: Merger,
    table: Table,
    imports: Imports,
    slices: slices::RemoteSlices,
    conflicts: BTreeMap<Name, Vec<BackendConflict>>,
}

impl ServiceMerger {
    /// For the agent of `local_cluster`.
    pub fn new(local_cluster: impl Into<String>) -> Self {
        let local_cluster = local_cluster.into();
        Self {
            merger: Merger::new(local_cluster.clone()),
            local_cluster,
            table: Table::new(),
            imports: Imports::new(),
            slices: slices::RemoteSlices::default(),
            conflicts: BTreeMap::new(),
        }
    }

    fn resync(&mut self, name: &Name) -> Diff {
        let mut conflicts = Vec::new();
        let merged = self.merger.merged(name, &mut conflicts);
        if conflicts.is_empty() {
            self.conflicts.remove(name);
        } else {
            self.conflicts.insert(name.clone(), conflicts);
        }
        self.table.set(name, merged.as_ref())
    }

    /// A local service changed (`None` = deleted).
    pub fn on_local(&mut self, name: Name, svc: Option<LocalService>) -> Diff {
        let name = self.merger.set_local(name, svc);
        self.resync(&name)
    }

    /// A local service key under `clustermesh/local/v1/services/` changed: `rel` is the
    /// key after the prefix (`<ns>/<name>`), `raw` the value (`None` = deleted). An
    /// undecodable value removes the service (it must never reach a map).
    pub fn on_local_raw(&mut self, rel: &str, raw: Option<&[u8]>) -> Diff {
        let Some(name) = Name::from_key_suffix(rel) else {
            return Diff::default();
        };
        let svc = match raw.map(LocalService::decode) {
            Some(Ok(s)) => Some(s),
            Some(Err(error)) => {
                tracing::warn!(service = %name, %error, "invalid local service ignored");
                None
            }
            None => None,
        };
        self.on_local(name, svc)
    }

    /// A remote cluster's global service changed (`None` = deleted).
    pub fn on_remote(
        &mut self,
        cluster: &str,
        name: Name,
        svc: Option<Arc<ClusterService>>,
    ) -> Diff {
        match self.merger.set_remote(cluster, name, svc) {
            Some(name) => self.resync(&name),
            None => Diff::default(),
        }
    }

    /// A service export (any cluster, the local one included) changed.
    pub fn on_export(&mut self, cluster: &str, name: Name, export: Option<Arc<ServiceExport>>) {
        self.imports.set(cluster, name, export);
    }

    /// A remote cluster left the mesh: its services are gone.
    pub fn on_cluster_removed(&mut self, cluster: &str) -> Diff {
        self.slices.drop_cluster(cluster);
        let mut diff = Diff::default();
        for name in self.merger.drop_cluster(cluster) {
            diff.extend(self.resync(&name));
        }
        let names: Vec<Name> = self.imports.names().cloned().collect();
        for name in names {
            self.imports.set(cluster, name, None);
        }
        diff
    }

    /// Handles a remote reader event (services, EndpointSlices and service exports; anything
    /// else is ignored). Returns the diff to apply, if any.
    pub fn on_remote_event(&mut self, ev: &remote::Event) -> Option<Diff> {
        match ev {
            remote::Event::Change {
                cluster,
                resource:
                    resource
                    @ (Resource::Services | Resource::ServiceExports | Resource::EndpointSlices),
                change,
                ..
            } => {
                let (value, present) = match change {
                    Change::Upsert { value, .. } => (value, true),
                    Change::Delete { last } => (last, false),
                };
                match (resource, value) {
                    (Resource::Services, Value::Service(s)) => {
                        let name = Name::new(&s.namespace, &s.name);
                        Some(self.on_remote(cluster, name, present.then(|| s.clone())))
                    }
                    (Resource::ServiceExports, Value::ServiceExport(e)) => {
                        let name = Name::new(&e.namespace, &e.name);
                        self.on_export(cluster, name, present.then(|| e.clone()));
                        None
                    }
                    (Resource::EndpointSlices, Value::EndpointSlice(s)) => {
                        let mut diff = Diff::default();
                        for (name, svc) in self.slices.set(cluster, s, present) {
                            diff.extend(self.on_remote(cluster, name, svc));
                        }
                        Some(diff)
                    }
                    _ => None,
                }
            }
            remote::Event::Drained { cluster } => Some(self.on_cluster_removed(cluster)),
            _ => None,
        }
    }

    /// The merged view of `name` (datapath + DNS).
    pub fn merged(&self, name: &Name) -> Option<Merged> {
        self.merger.merged(name, &mut Vec::new())
    }

    /// The MCS import of `name`.
    pub fn import(&self, name: &Name) -> Option<Import> {
        self.imports.import(name, &mut Vec::new())
    }

    /// Every name with a local service, a remote service or an export.
    pub fn names(&self) -> std::collections::BTreeSet<Name> {
        let mut n = self.merger.names();
        n.extend(self.imports.names().cloned());
        n
    }

    /// The merger (read-only).
    pub fn merger(&self) -> &Merger {
        &self.merger
    }

    /// The local cluster's name.
    pub fn local_cluster(&self) -> &str {
        &self.local_cluster
    }

    /// The programmed table (read-only).
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Handles a [`LocalInput`] (`Listed` is the caller's business); returns the diff.
    pub fn on_local_input(&mut self, input: LocalInput) -> Diff {
        match input {
            LocalInput::Service { rel, raw } => self.on_local_raw(&rel, raw.as_deref()),
            LocalInput::Export { name, export } => {
                let local = self.local_cluster.clone();
                self.on_export(&local, name, export);
                Diff::default()
            }
            LocalInput::Listed => Diff::default(),
        }
    }

    /// Forgets the programmed state and programs every service again from scratch: the
    /// returned diff writes the complete table (start-up over pinned maps whose IDs this
    /// agent does not know; see [`LbMaps::sweep`]).
    pub fn reprogram(&mut self) -> Diff {
        self.table = Table::new();
        self.conflicts.clear();
        let mut diff = Diff::default();
        for name in self.merger.names() {
            diff.extend(self.resync(&name));
        }
        diff
    }

    /// Status: sizes and conflicts.
    pub fn status(&self) -> Status {
        let mut mcs_conflicts = Vec::new();
        for name in self.imports.names() {
            self.imports.import(name, &mut mcs_conflicts);
        }
        Status {
            frontends: self.table.frontends(),
            backends: self.table.backends(),
            unsupported: self.table.unsupported,
            backend_conflicts: self.conflicts.values().flatten().cloned().collect(),
            mcs_conflicts,
        }
    }
}
