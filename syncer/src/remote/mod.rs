//! Reader of remote clusters: one list-then-watch session per remote cluster config file,
//! validated entries in typed caches, an event stream for consumers, and a status per remote.
//!
//! # What the etcd semantics force on this module
//!
//! Each resource of a session runs the crate's one list → watch machine,
//! [`crate::watcher`] (shared with the agent's reader of its own cluster), into the remote's
//! [`RemoteCache`]; this module adds what is particular to remotes: heartbeat, cluster
//! config, canaries, validation, reconnects and status.
//!
//! * **List, then watch from `revision + 1`.** A consistent list (paged, all pages pinned to
//!   the first page's revision) gives the state at revision `R`; a watch started at `R + 1`
//!   delivers every change after it exactly once, so nothing is missed between the two.
//! * **Compaction.** If the list revision has been compacted by the time the watch starts (or
//!   the watcher falls behind), etcd cancels the watch with `compact_revision` set. The only
//!   correct answer is to relist; the stale sweep below repairs whatever changed in between.
//! * **Stale sweep.** On every (re)list all keys known for that resource are marked stale;
//!   keys seen in the list are unmarked; the remainder get synthetic deletes once the list is
//!   applied. This is how deletions missed while disconnected are reconciled (Cilium's
//!   watch-store does the same). Upserts are emitted only for keys whose raw bytes changed,
//!   so a reconnect to unchanged data produces no events at all.
//! * **etcd cluster ID lock.** Every response header carries the etcd cluster ID. The first
//!   one seen in a session is locked in; a different one later (a load balancer switching to
//!   another apiserver replica with its own etcd, or a wiped etcd behind the same address)
//!   means revisions no longer compare, so the session fails and the next one relists from
//!   scratch. A response without a header is treated the same way.
//! * **Heartbeat.** "Connected" means a read of `cilium/.heartbeat` succeeded. Its value is
//!   not trusted (clocks differ); the local receive time of the last heartbeat write is
//!   compared with [`Config::heartbeat_timeout`] (Cilium: 2 minutes).
//! * **One watch stream per connection.** All watches of a connection (every remote's, in
//!   KVStoreMesh mode) share one etcd watch stream (`watcher::mux`); a watch whose consumer falls
//!   behind is dropped and its resource relisted, like after compaction, so no watch waits
//!   for another.
//! * **Large values.** etcd accepts values up to `--max-request-bytes`; tonic refuses
//!   messages above 4 MiB by default, which would turn one hostile value into an endless
//!   reconnect loop. Watches and lists therefore accept big messages and each value above
//!   [`MAX_VALUE_BYTES`] is rejected on its own, without breaking the stream.
//! * **A bad value keeps the last good one.** An entry that fails validation is counted
//!   (per reason, [`Metrics`]) and logged; it never replaces the value already applied.
//!
//! # What it must not do
//!
//! It never writes to any etcd, never trusts a remote's entries without validation (see
//! [`validate`]), and never drops last-known state on a disconnect unless
//! [`Config::cache_ttl`] says so. Removing a config file is the only way to drain a remote.

mod backoff;
mod cache;
mod configured;
mod manager;
mod metrics;
mod session;
mod status;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_types::cluster::ClusterInfo;
use clustermesh_types::identity::Identity;
use clustermesh_types::model::{ClusterService, EndpointSlice, IpcacheEntry, Node, ServiceExport};

pub use crate::watcher::{digest, Digest};
pub use backoff::Backoff;
pub use cache::{Caches, RemoteCache};
pub use configured::{configured_remotes, Configured, Refused, RemoteFile};
pub use manager::Manager;
pub use metrics::Metrics;
pub use status::{Snapshot, Status, StatusConfig, StatusSynced};

use crate::EtcdConfig;

/// Values larger than this are rejected before decoding (Cilium's objects are far smaller;
/// a 1k-backend service is about 60 KiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Where remote state is read from.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Connect to each remote's own etcd with the endpoints and certificates of its file.
    Direct,
    /// Read every remote from the local etcd, where KVStoreMesh mirrors it under
    /// `cilium/cache/...`; the files only say which remotes exist.
    KvstoreMesh {
        /// Client config of the local etcd.
        local_etcd: EtcdConfig,
    },
}

/// Settings of the [`Manager`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The local cluster: its own file is ignored, its ID cannot be claimed by a remote.
    pub local: ClusterInfo,
    /// Directory of remote cluster config files (file name = cluster name).
    pub config_dir: PathBuf,
    /// Where to read remote state.
    pub mode: Mode,
    /// First reconnect delay. Default 200 ms.
    pub backoff_min: Duration,
    /// Largest reconnect delay. Default 10 s: a returning remote is resynced within
    /// 2 × 10 s, while 250 failing remotes cost at most 25 attempts per second.
    pub backoff_max: Duration,
    /// A session fails when no heartbeat write was seen for this long. Default 2 min.
    pub heartbeat_timeout: Duration,
    /// Revoke (delete) a disconnected remote's state after this long. Default `None`: keep
    /// last-known state forever, so a control-plane outage never breaks the datapath.
    pub cache_ttl: Option<Duration>,
    /// A remote that never connected stops holding back [`Snapshot::ready`] after this long.
    /// Default 15 s (Cilium's `--per-cluster-ready-timeout`).
    pub per_remote_ready_timeout: Duration,
    /// Full rescan period of `config_dir`, on top of inotify. Default 5 s.
    pub rescan_interval: Duration,
    /// Capacity of the event channel. Default 4096.
    pub event_capacity: usize,
    /// TCP + TLS connect timeout and keepalives.
    pub connect: crate::ConnectConfig,
    /// Which stores carry a remote's service backends: [`ServiceBackends::Preferred`]
    /// (default; agents) or [`ServiceBackends::AsExported`] (KVStoreMesh mirrors both).
    pub service_backends: ServiceBackends,
    /// Whether draining a removed remote emits a [`Change::Delete`] per cached key before
    /// [`Event::Drained`]. Default true (an agent must unprogram every entry). KVStoreMesh
    /// turns it off: it removes the mirrored copy itself, cluster config first and the
    /// cache after a grace period, so agents disconnect before their state disappears.
    pub drain_deletes: bool,
}

impl Config {
    /// Defaults for everything but the local cluster, directory and mode.
    pub fn new(local: ClusterInfo, config_dir: PathBuf, mode: Mode) -> Self {
        Self {
            local,
            config_dir,
            mode,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(120),
            cache_ttl: None,
            per_remote_ready_timeout: Duration::from_secs(15),
            rescan_interval: Duration::from_secs(5),
            event_capacity: 4096,
            connect: crate::ConnectConfig::default(),
            service_backends: ServiceBackends::Preferred,
            drain_deletes: true,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(Error::InvalidConfig(s.to_owned()));
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return bad("backoff_min must be > 0 and <= backoff_max");
        }
        if self.heartbeat_timeout.is_zero() || self.rescan_interval.is_zero() {
            return bad("heartbeat_timeout and rescan_interval must be > 0");
        }
        if self.event_capacity == 0 {
            return bad("event_capacity must be > 0");
        }
        self.local
            .validate()
            .map_err(|e| Error::InvalidConfig(format!("local cluster: {e}")))
    }
}

/// Which of a remote's two stores of service backends ("service v2", announced in its
/// cluster config as `endpointSlicesExportMode`) are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceBackends {
    /// One store per remote, the one it wants read: `services/v1` when it announces no mode
    /// (older clusters, or `prefer-legacy`), `endpointslices/v1` when it announces
    /// `services-and-endpointslices` or `endpointslices-only`. A consumer then never sees one
    /// service twice.
    Preferred,
    /// Every store the remote writes (a mirror such as KVStoreMesh, whose own readers
    /// choose).
    AsExported,
}

/// The kinds of remote state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// `nodes/v1`.
    Nodes,
    /// `ip/v1` (ipcache entries; "endpoints" in Cilium's status).
    Endpoints,
    /// `identities/v1`.
    Identities,
    /// `services/v1`.
    Services,
    /// `serviceexports/v1`.
    ServiceExports,
    /// `endpointslices/v1` (service v2).
    EndpointSlices,
}

impl Resource {
    /// Every resource, in the order they are started.
    pub const ALL: [Resource; 6] = [
        Resource::Identities,
        Resource::Nodes,
        Resource::Endpoints,
        Resource::Services,
        Resource::ServiceExports,
        Resource::EndpointSlices,
    ];

    /// Name used in status, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Nodes => "nodes",
            Resource::Endpoints => "endpoints",
            Resource::Identities => "identities",
            Resource::Services => "services",
            Resource::ServiceExports => "service-exports",
            Resource::EndpointSlices => "endpoint-slices",
        }
    }

    fn index(self) -> usize {
        match self {
            Resource::Nodes => 0,
            Resource::Endpoints => 1,
            Resource::Identities => 2,
            Resource::Services => 3,
            Resource::ServiceExports => 4,
            Resource::EndpointSlices => 5,
        }
    }

    /// The store's type path (`nodes/v1`), used in prefixes and synced canaries.
    fn store(self) -> &'static str {
        match self {
            Resource::Nodes => "nodes/v1",
            Resource::Endpoints => "ip/v1",
            Resource::Identities => "identities/v1",
            Resource::Services => "services/v1",
            Resource::ServiceExports => "serviceexports/v1",
            Resource::EndpointSlices => "endpointslices/v1",
        }
    }

    /// The prefix watched for remote `cluster` (always `/`-terminated, so a cluster name that
    /// is a prefix of another is harmless). `cached` selects KVStoreMesh's re-keyed copy.
    pub fn watch_prefix(self, cluster: &str, cached: bool) -> String {
        let store = self.store();
        match (self, cached) {
            (Resource::Endpoints, false) => format!("cilium/state/{store}/default/"),
            (Resource::Identities, false) => format!("cilium/state/{store}/id/"),
            (Resource::Identities, true) => format!("cilium/cache/{store}/{cluster}/id/"),
            (_, false) => format!("cilium/state/{store}/{cluster}/"),
            (_, true) => format!("cilium/cache/{store}/{cluster}/"),
        }
    }

    /// The synced canary written by `cluster` once this resource is fully written.
    pub fn synced_key(self, cluster: &str, cached: bool) -> String {
        let root = if cached {
            "cilium/cache"
        } else {
            "cilium/state"
        };
        format!("cilium/synced/{cluster}/{root}/{}", self.store())
    }
}

/// A decoded, validated value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A node.
    Node(Arc<Node>),
    /// An ipcache entry, its prefix and host address parsed; identity 1 (host) already
    /// rewritten to 6 (remote-node).
    Endpoint(Arc<IpcacheEntry>),
    /// An identity: its number (from the key) and labels.
    Identity(Arc<Identity>),
    /// A global/shared service.
    Service(Arc<ClusterService>),
    /// An MCS-API service export.
    ServiceExport(Arc<ServiceExport>),
    /// An EndpointSlice of a global, shared service.
    EndpointSlice(Arc<EndpointSlice>),
}

/// What happened to a key: [`Change::Upsert`] carries the remote's exact bytes (for
/// mirroring) beside the validated decode, [`Change::Delete`] the last value applied.
pub type Change = crate::watcher::Change<Value>;

/// One cached entry: the validated value and the digest of the remote's bytes.
pub type Stored = crate::watcher::Stored<Value>;

/// One event for consumers (datapath programming, KVStoreMesh mirroring).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A key changed.
    Change {
        /// The remote cluster.
        cluster: Arc<str>,
        /// The resource.
        resource: Resource,
        /// The full key as stored remotely (e.g. `cilium/state/nodes/v1/c3/n1`).
        key: String,
        /// What changed.
        change: Change,
    },
    /// The initial list of a resource in this session has been applied (repeated after
    /// every reconnect).
    Synced {
        /// The remote cluster.
        cluster: Arc<str>,
        /// The resource.
        resource: Resource,
    },
    /// A removed remote's state has been deleted; no more events will come for it.
    Drained {
        /// The remote cluster.
        cluster: Arc<str>,
    },
}

/// Errors of the remote reader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range.
    #[error("invalid remote reader configuration: {0}")]
    InvalidConfig(String),
    /// The config directory cannot be watched.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: notify::Error,
    },
    /// An etcd or config-file failure below this layer.
    #[error(transparent)]
    Syncer(#[from] crate::Error),
    /// The remote's cluster config is missing.
    #[error("remote cluster configuration required but not found: check that the cluster name in the file name matches the remote's --cluster-name, or that KVStoreMesh is connected ({key} is missing)")]
    ConfigNotFound {
        /// The key read.
        key: String,
    },
    /// The remote's cluster config is unusable.
    #[error("remote cluster configuration refused: {0}")]
    ConfigRefused(String),
    /// The remote's cluster config changed while connected (the session ends; the next one
    /// applies it).
    #[error(
        "remote cluster configuration {key} changed while connected: reconnecting to apply it"
    )]
    ConfigChanged {
        /// The key watched.
        key: String,
    },
    /// Reading the remote's etcd failed (the connection, the etcd behind it, a watch).
    #[error(transparent)]
    Read(#[from] crate::watcher::Error),
    /// The heartbeat stopped.
    #[error("remote heartbeat not seen for {0:?}: reconnecting")]
    HeartbeatStale(Duration),
    /// A host name in the file does not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result with the remote reader's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_cilium() {
        let p = |r: Resource, c| r.watch_prefix("cluster3", c);
        assert_eq!(p(Resource::Nodes, false), "cilium/state/nodes/v1/cluster3/");
        assert_eq!(p(Resource::Endpoints, false), "cilium/state/ip/v1/default/");
        assert_eq!(
            p(Resource::Identities, false),
            "cilium/state/identities/v1/id/"
        );
        assert_eq!(
            p(Resource::Services, false),
            "cilium/state/services/v1/cluster3/"
        );
        assert_eq!(
            p(Resource::ServiceExports, false),
            "cilium/state/serviceexports/v1/cluster3/"
        );
        assert_eq!(
            p(Resource::EndpointSlices, false),
            "cilium/state/endpointslices/v1/cluster3/"
        );
        assert_eq!(
            p(Resource::EndpointSlices, true),
            "cilium/cache/endpointslices/v1/cluster3/"
        );
        assert_eq!(
            Resource::EndpointSlices.synced_key("cluster3", false),
            "cilium/synced/cluster3/cilium/state/endpointslices/v1"
        );
        assert_eq!(p(Resource::Nodes, true), "cilium/cache/nodes/v1/cluster3/");
        assert_eq!(p(Resource::Endpoints, true), "cilium/cache/ip/v1/cluster3/");
        assert_eq!(
            p(Resource::Identities, true),
            "cilium/cache/identities/v1/cluster3/id/"
        );
        assert_eq!(
            Resource::Identities.synced_key("cluster3", false),
            "cilium/synced/cluster3/cilium/state/identities/v1"
        );
        assert_eq!(
            Resource::Endpoints.synced_key("cluster2", true),
            "cilium/synced/cluster2/cilium/cache/ip/v1"
        );
    }
}
