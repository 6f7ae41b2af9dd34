//! The apiserver's configuration: the validated [`Config`] the library runs with, the
//! settings file ([`File`], written by `clustermesh enable`) and the checks every setting
//! goes through ([`source`], [`duration`], [`Config::validate`]).
//!
//! It does not parse the command line: the flags (clap) belong to the binary
//! (`src/cli.rs`), which merges them over the file with the helpers here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clustermesh_types::cluster::ClusterInfo;
use clustermesh_types::cluster_cidrs::ClusterCidrs;
use serde::{Deserialize, Serialize};

use crate::export::ServiceV2Mode;

/// What is wrong with the settings (flags, environment, `--config` file); each message names
/// the flag or file to fix. The cause is part of the message (`main` prints it as is).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--config` file cannot be read.
    #[error("cannot read config {}: {error}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The `--config` file is not valid YAML for [`File`].
    #[error("config {}{line}: {error}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// `:<line>` where the parser knows it, else empty.
        line: String,
        /// Why.
        error: serde_yaml::Error,
    },
    /// A required setting is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A setting has a value that cannot be used.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The flag (or file key) and, where it helps, the value given.
        setting: String,
        /// Why, and what is accepted.
        reason: String,
    },
    /// Settings that do not go together, or a combination that leaves something undecided.
    #[error("{0}")]
    Conflict(&'static str),
    /// The manifest directory of the manifests source does not exist.
    #[error("manifest directory {} does not exist: create it (mkdir -p) or point --manifests elsewhere", .0.display())]
    NoManifestDir(PathBuf),
    /// The Kubernetes source's kubeconfig or context is unusable.
    #[error(transparent)]
    Kubernetes(#[from] clustermesh_k8s::client::Error),
}

/// Result with the configuration's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::Invalid`] for `setting` (the flag, and the value where it helps).
pub fn invalid(setting: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::Invalid {
        setting: setting.into(),
        reason: reason.to_string(),
    }
}

/// The settings as a file (`--config`): every flag of the binary, kebab-case; a flag wins
/// over the environment, the environment over the file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct File {
    /// The flag of the same name.
    pub cluster_name: Option<String>,
    /// The flag of the same name.
    pub cluster_id: Option<u32>,
    /// The flag of the same name.
    pub max_connected_clusters: Option<u32>,
    /// The flag of the same name.
    pub manifests: Option<PathBuf>,
    /// The flag of the same name.
    pub source: Option<String>,
    /// The flag of the same name.
    pub kubeconfig: Option<PathBuf>,
    /// The flag of the same name.
    pub context: Option<String>,
    /// The flag of the same name.
    pub etcd_config: Option<PathBuf>,
    /// The flag of the same name.
    pub state_dir: Option<PathBuf>,
    /// The flag of the same name.
    pub embedded_etcd_listen: Option<String>,
    /// The flag of the same name.
    pub embedded_etcd_peer_port: Option<u16>,
    /// The flag of the same name.
    pub clustermesh_enable_mcs_api: Option<bool>,
    /// The flag of the same name.
    pub clustermesh_default_global_namespace: Option<bool>,
    /// The flag of the same name.
    pub clustermesh_service_v2: Option<String>,
    /// The flag of the same name.
    pub enable_cilium_endpoint_slice: Option<bool>,
    /// The flag of the same name (humantime, e.g. `15m`).
    pub kvstore_lease_ttl: Option<String>,
    /// The flag of the same name.
    pub health_addr: Option<SocketAddr>,
    /// The flag of the same name.
    pub metrics_addr: Option<SocketAddr>,
    /// The flag of the same name.
    pub log_level: Option<String>,
    /// The flag of the same name.
    pub enable_kvstoremesh: Option<bool>,
    /// The flag of the same name.
    pub clustermesh_config: Option<PathBuf>,
    /// The flag of the same name (humantime).
    pub kvstoremesh_drain_grace: Option<String>,
    /// The flag of the same name (humantime).
    pub per_cluster_ready_timeout: Option<String>,
    /// The flag of the same name (humantime).
    pub global_ready_timeout: Option<String>,
    /// The flag of the same name.
    pub etcd_init: Option<bool>,
    /// The flag of the same name.
    pub cluster_users_config_path: Option<PathBuf>,
    /// The flag of the same name (humantime).
    pub clustermesh_cache_ttl: Option<String>,
    /// The flag of the same name (humantime).
    pub etcd_keepalive_interval: Option<String>,
    /// The flag of the same name (humantime).
    pub etcd_keepalive_timeout: Option<String>,
    /// The flag of the same name: a list, or one comma-separated string.
    pub cluster_cidr: Option<ClusterCidrs>,
}

/// KVStoreMesh settings (see [`crate::kvstoremesh`]).
#[derive(Debug, Clone)]
pub struct KvstoreMesh {
    /// Directory of remote cluster config files.
    pub config_dir: PathBuf,
    /// Grace period between deleting a removed remote's cluster config and its cache.
    pub drain_grace: Duration,
    /// Per-remote readiness timeout for remotes that never connected.
    pub per_cluster_ready_timeout: Duration,
    /// Readiness stops waiting for remotes after this.
    pub global_ready_timeout: Duration,
    /// Withdraw a disconnected remote's entries after this; `None` keeps them.
    pub cache_ttl: Option<Duration>,
}

/// Where etcd comes from.
#[derive(Debug, Clone)]
pub enum EtcdMode {
    /// An existing etcd.
    External(PathBuf),
    /// Our own child etcd.
    Embedded {
        /// Client listen address.
        listen: String,
        /// Peer port.
        peer_port: u16,
    },
}

/// Where the cluster's state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A manifest directory.
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kubernetes(crate::source::kubernetes::ClientConfig),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The local cluster.
    pub cluster: ClusterInfo,
    /// The source.
    pub source: Source,
    /// etcd.
    pub etcd: EtcdMode,
    /// State dir.
    pub state_dir: Option<PathBuf>,
    /// MCS-API.
    pub enable_mcs_api: bool,
    /// Default for unannotated namespaces.
    pub default_global_namespace: bool,
    /// Service v2 mode.
    pub service_v2: ServiceV2Mode,
    /// CiliumEndpointSlices as the endpoint source.
    pub enable_cilium_endpoint_slice: bool,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Health listener.
    pub health_addr: SocketAddr,
    /// Metrics listener (may equal the health listener).
    pub metrics_addr: Option<SocketAddr>,
    /// Log filter.
    pub log_level: String,
    /// KVStoreMesh; `None` when disabled (or when there is neither `--clustermesh-config`
    /// nor a state dir to default it from).
    pub kvstoremesh: Option<KvstoreMesh>,
    /// Initialise users, roles and auth on the external etcd if it has none.
    pub etcd_init: bool,
    /// Cilium's users file, enforced in etcd.
    pub cluster_users: Option<PathBuf>,
    /// Connect timeout and keepalives of every etcd connection.
    pub connect: clustermesh_syncer::ConnectConfig,
    /// The cluster's pod CIDRs (`--cluster-cidr`): nothing outside them is exported; empty:
    /// no rule.
    pub cluster_cidrs: ClusterCidrs,
}

/// A duration setting: the flag if given, else the file's humantime text, else `default`.
pub fn duration(
    flag: Option<Duration>,
    file: Option<String>,
    name: &str,
    default: Duration,
) -> Result<Duration> {
    match (flag, file) {
        (Some(d), _) => Ok(d),
        (None, Some(s)) => {
            humantime::parse_duration(&s).map_err(|e| invalid(format!("{name} {s:?}"), e))
        }
        (None, None) => Ok(default),
    }
}

/// Picks the source (`--source`; without it: manifests with `--manifests`, Kubernetes with
/// `--kubeconfig`/`--context` or inside a pod) and checks it can be used: the manifest directory
/// exists, or the kubeconfig parses and has the context.
pub fn source(
    explicit: Option<String>,
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    state_dir: Option<&std::path::Path>,
) -> Result<Source> {
    use crate::source::kubernetes::ClientConfig;
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kube_asked = kubeconfig.is_some() || context.is_some();
    let kind = match explicit.as_deref() {
        Some(k) => k,
        None if manifests.is_some() && kube_asked => return Err(Error::Conflict(
            "both --manifests and --kubeconfig/--context are given: choose the source with --source kubernetes|manifests",
        )),
        None if manifests.is_some() => "manifests",
        None if kube_asked || in_pod => "kubernetes",
        None => "manifests",
    };
    match kind {
        "kubernetes" => {
            let client = if kubeconfig.is_none() && context.is_none() && in_pod {
                ClientConfig::InCluster
            } else {
                ClientConfig::Kubeconfig {
                    path: kubeconfig,
                    context,
                }
            };
            client.validate()?;
            Ok(Source::Kubernetes(client))
        }
        _ => {
            let dir = manifests
                .or_else(|| state_dir.map(|s| s.join("manifests")))
                .ok_or(Error::Missing(
                    "--manifests (or --state-dir), or --source kubernetes,",
                ))?;
            if !dir.is_dir() {
                return Err(Error::NoManifestDir(dir));
            }
            Ok(Source::Manifests(dir))
        }
    }
}

impl File {
    /// Reads and parses a settings file; errors name the file (and the line, where known).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::ReadFile {
            path: path.to_path_buf(),
            error,
        })?;
        serde_yaml::from_str(&text).map_err(|error| Error::ParseFile {
            path: path.to_path_buf(),
            line: error
                .location()
                .map(|l| format!(":{}", l.line()))
                .unwrap_or_default(),
            error,
        })
    }
}

impl Config {
    /// The checks that do not depend on where a setting came from (flag, environment or
    /// file): the cluster's ID within its range, the lease TTL within Cilium's bounds, the
    /// etcd keepalives positive.
    pub fn validate(&self) -> Result<()> {
        self.cluster
            .validate()
            .map_err(|e| invalid("--cluster-id", e))?;
        if !(25..=86400).contains(&self.lease_ttl.as_secs()) {
            return Err(invalid(
                "--kvstore-lease-ttl",
                "must be between 25s and 24h",
            ));
        }
        if self.connect.keepalive.0.is_zero() || self.connect.keepalive.1.is_zero() {
            return Err(invalid(
                "--etcd-keepalive-interval/--etcd-keepalive-timeout",
                "must be > 0",
            ));
        }
        Ok(())
    }
}
