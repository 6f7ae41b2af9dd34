//! From a [`Snapshot`] of the cluster's objects to the exact etcd contents to publish.
//!
//! This is a pure computation (plus the small state that must persist between runs: identity
//! allocations, which endpoint owns a shared IP, first-seen export times). The writer then
//! makes etcd match it by diff.
//!
//! Semantics follow Cilium's clustermesh-apiserver:
//! - nodes from CiliumNode (Cilium's CRD mode) or Node objects;
//! - identities from CiliumIdentity objects, plus one allocated per distinct Pod label set;
//! - ipcache entries from CiliumEndpoints and Pods; when two endpoints claim one IP, the
//!   first keeps it until it stops claiming it;
//! - only services that are global *and* shared go to `cilium/state/services/v1`, and their
//!   EndpointSlices to `cilium/state/endpointslices/v1` (service v2; which of the two is
//!   written follows `--clustermesh-service-v2`); every service goes to
//!   `clustermesh/local/v1/services` for the cluster's own agents;
//! - with the namespace filter (annotation `clustermesh.cilium.io/global`, default from
//!   `--clustermesh-default-global-namespace`), only endpoints, identities, global services,
//!   their EndpointSlices and ServiceExports of global namespaces are exported;
//! - MCS-API ServiceExports (when enabled) for services that exist and are not ExternalName;
//! - with `--cluster-cidr`, no endpoint IP and no node pod CIDR outside those CIDRs
//!   ([`cidrs`]).

use std::collections::{BTreeMap, HashMap};

use clustermesh_types::cluster::ClusterInfo;
use clustermesh_types::cluster_cidrs::ClusterCidrs;
use clustermesh_types::kvstore;
use clustermesh_types::model::{Capabilities, ClusterConfig, EndpointSlicesExportMode};

use crate::identity::Allocator;
use crate::source::Snapshot;

mod cidrs;
mod endpoints;
mod endpointslices;
mod identities;
mod incremental;
mod nodes;
mod services;

pub use incremental::{Changes, Delta, FullPass, Incremental, MAX_INCREMENTAL};
pub use services::LocalService;

/// Annotation marking a namespace global or not.
pub const NAMESPACE_GLOBAL_ANNOTATION: &str = "clustermesh.cilium.io/global";
/// The CustomResourceDefinition without which no ServiceExport can exist.
pub const SERVICE_EXPORT_CRD: &str = "serviceexports.multicluster.x-k8s.io";

/// Export options (from the command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// The local cluster.
    pub cluster: ClusterInfo,
    /// Whether MCS-API ServiceExports are exported.
    pub enable_mcs_api: bool,
    /// Whether a namespace without the annotation is global.
    pub default_global_namespace: bool,
    /// What is exported for global services (`--clustermesh-service-v2`).
    pub service_v2: ServiceV2Mode,
    /// Endpoints come from CiliumEndpointSlices instead of CiliumEndpoints
    /// (`--enable-cilium-endpoint-slice`).
    pub enable_cilium_endpoint_slice: bool,
    /// The cluster's pod CIDRs (`--cluster-cidr`): endpoint IPs and node pod CIDRs outside
    /// them are not exported ([`cidrs`]); empty: no rule.
    pub cluster_cidrs: ClusterCidrs,
}

/// `--clustermesh-service-v2`: which stores carry global services' backends (Cilium's
/// modes, plus `disabled`, ours: no EndpointSlice export at all, as before Cilium 1.20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceV2Mode {
    /// `prefer-legacy` (default): both stores; readers are told nothing (capability
    /// absent), so they use `services/v1`.
    #[default]
    PreferLegacy,
    /// `prefer-endpointslice`: both stores; readers are told to prefer the slices.
    PreferEndpointSlice,
    /// `only-endpointslice`: EndpointSlices only, `services/v1` stays empty.
    OnlyEndpointSlice,
    /// `disabled`: `services/v1` only.
    Disabled,
}

impl ServiceV2Mode {
    /// Every mode's flag value.
    pub const VALUES: [&'static str; 4] = [
        "prefer-legacy",
        "prefer-endpointslice",
        "only-endpointslice",
        "disabled",
    ];

    /// The capability announced in the cluster config.
    pub fn export_mode(self) -> EndpointSlicesExportMode {
        match self {
            ServiceV2Mode::PreferLegacy | ServiceV2Mode::Disabled => {
                EndpointSlicesExportMode::Unset
            }
            ServiceV2Mode::PreferEndpointSlice => {
                EndpointSlicesExportMode::ServicesAndEndpointSlices
            }
            ServiceV2Mode::OnlyEndpointSlice => EndpointSlicesExportMode::EndpointSlicesOnly,
        }
    }

    /// Whether `cilium/state/services/v1` is written.
    pub fn exports_services(self) -> bool {
        self != ServiceV2Mode::OnlyEndpointSlice
    }

    /// Whether `cilium/state/endpointslices/v1` is written.
    pub fn exports_endpoint_slices(self) -> bool {
        self != ServiceV2Mode::Disabled
    }
}

impl std::str::FromStr for ServiceV2Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefer-legacy" => Ok(ServiceV2Mode::PreferLegacy),
            "prefer-endpointslice" => Ok(ServiceV2Mode::PreferEndpointSlice),
            "only-endpointslice" => Ok(ServiceV2Mode::OnlyEndpointSlice),
            "disabled" => Ok(ServiceV2Mode::Disabled),
            other => Err(format!(
                "unknown mode {other:?}: use one of {}",
                ServiceV2Mode::VALUES.join(", ")
            )),
        }
    }
}

/// One store: a prefix that is synced as a whole, and its synced canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Store {
    /// `cilium/state/nodes/v1/<c>/`.
    Nodes,
    /// `cilium/state/identities/v1/id/`.
    Identities,
    /// `cilium/state/ip/v1/default/`.
    Ip,
    /// `cilium/state/services/v1/<c>/`.
    Services,
    /// `cilium/state/serviceexports/v1/<c>/`.
    ServiceExports,
    /// `cilium/state/endpointslices/v1/<c>/`.
    EndpointSlices,
    /// `clustermesh/local/v1/services/`.
    LocalServices,
    /// `clustermesh/local/v1/policies/`.
    LocalPolicies,
}

impl Store {
    /// Every store, in the order they are first written.
    pub const ALL: [Store; 8] = [
        Store::Nodes,
        Store::Identities,
        Store::Ip,
        Store::Services,
        Store::ServiceExports,
        Store::EndpointSlices,
        Store::LocalServices,
        Store::LocalPolicies,
    ];

    /// The prefix (with trailing `/`) whose contents the store owns.
    pub fn prefix(self, cluster: &str) -> String {
        match self {
            Store::Nodes => format!("{}/{cluster}/", kvstore::NODES_PREFIX),
            Store::Identities => format!("{}/id/", kvstore::IDENTITIES_PREFIX),
            Store::Ip => format!("{}/{}/", kvstore::IP_PREFIX, kvstore::IP_ADDRESS_SPACE),
            Store::Services => format!("{}/{cluster}/", kvstore::SERVICES_PREFIX),
            Store::ServiceExports => format!("{}/{cluster}/", kvstore::SERVICE_EXPORTS_PREFIX),
            Store::EndpointSlices => format!("{}/{cluster}/", kvstore::ENDPOINT_SLICES_PREFIX),
            Store::LocalServices => format!("{}/", kvstore::LOCAL_SERVICES_PREFIX),
            Store::LocalPolicies => format!("{}/", kvstore::LOCAL_POLICIES_PREFIX),
        }
    }

    /// The key whose presence says the store's initial write is complete.
    pub fn synced_key(self, cluster: &str) -> String {
        match self {
            Store::Nodes => kvstore::synced_key(cluster, kvstore::NODES_PREFIX),
            Store::Identities => kvstore::synced_key(cluster, kvstore::IDENTITIES_PREFIX),
            Store::Ip => kvstore::synced_key(cluster, kvstore::IP_PREFIX),
            Store::Services => kvstore::synced_key(cluster, kvstore::SERVICES_PREFIX),
            Store::ServiceExports => kvstore::synced_key(cluster, kvstore::SERVICE_EXPORTS_PREFIX),
            Store::EndpointSlices => kvstore::synced_key(cluster, kvstore::ENDPOINT_SLICES_PREFIX),
            Store::LocalServices => kvstore::LOCAL_SERVICES_SYNCED.into(),
            Store::LocalPolicies => kvstore::LOCAL_POLICIES_SYNCED.into(),
        }
    }

    /// Short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Store::Nodes => "nodes/v1",
            Store::Identities => "identities/v1",
            Store::Ip => "ip/v1",
            Store::Services => "services/v1",
            Store::ServiceExports => "serviceexports/v1",
            Store::EndpointSlices => "endpointslices/v1",
            Store::LocalServices => "local/services",
            Store::LocalPolicies => "local/policies",
        }
    }
}

/// The complete desired contents, per store.
pub type Desired = BTreeMap<Store, BTreeMap<String, Vec<u8>>>;

/// A non-fatal problem found while exporting (logged and counted; the rest is exported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind of problem (the CIDR rule's refusals are counted on their own).
    pub kind: ProblemKind,
    /// The object concerned.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

/// The kinds of [`Problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The object (or part of it) is invalid or cannot be allocated an identity.
    Invalid,
    /// An address or pod CIDR outside `--cluster-cidr` ([`cidrs`]): left out, so no remote
    /// ever reads a prefix the cluster does not own.
    OutsideClusterCidrs,
}

/// The exporter: computes [`Desired`] from snapshots, keeping the state that must persist.
#[derive(Debug)]
pub struct Exporter {
    opts: Options,
    allocator: Allocator,
    /// IP → (first-seen sequence number of the endpoint that currently owns it, pass).
    ip_owner: HashMap<String, (u64, u64)>,
    /// endpoint (`Pod/<ns>/<name>`) → (sequence number when first seen, last pass it was
    /// seen in); an earlier sequence number wins a shared IP.
    first_seen: HashMap<String, (u64, u64)>,
    seq: u64,
    /// Export passes so far (marks the entries of the two maps above seen in a pass).
    generation: u64,
    /// What incremental passes need to know of the last full pass (see `incremental`);
    /// `None` until [`Exporter::build_index`] after a full pass.
    index: Option<incremental::Index>,
}

impl Exporter {
    /// A new exporter.
    pub fn new(opts: Options, allocator: Allocator) -> Self {
        Self {
            opts,
            allocator,
            ip_owner: HashMap::new(),
            first_seen: HashMap::new(),
            seq: 0,
            generation: 0,
            index: None,
        }
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The allocator (to seed it from etcd, or save it).
    pub fn allocator_mut(&mut self) -> &mut Allocator {
        &mut self.allocator
    }

    /// The cluster config value.
    pub fn cluster_config(&self) -> Vec<u8> {
        ClusterConfig {
            id: self.opts.cluster.id,
            capabilities: Capabilities {
                synced_canaries: true,
                cached: false,
                max_connected_clusters: self.opts.cluster.max_connected_clusters.as_u32(),
                service_exports_enabled: Some(self.opts.enable_mcs_api),
                endpoint_slices_export_mode: self.opts.service_v2.export_mode().as_str().into(),
            },
        }
        .encode()
    }

    fn namespace_global(&self, snap: &Snapshot, ns: &str) -> bool {
        match snap
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.annotation(NAMESPACE_GLOBAL_ANNOTATION))
        {
            Some(v) => v.trim().eq_ignore_ascii_case("true"),
            None => self.opts.default_global_namespace,
        }
    }

    /// Whether the ServiceExport CRD is installed; ServiceExports are exported only then.
    pub fn service_export_crd(&self, snap: &Snapshot) -> bool {
        snap.crds.contains_key(SERVICE_EXPORT_CRD)
    }

    /// Computes everything to publish. Problems are returned, not fatal.
    pub fn compute(&mut self, snap: &Snapshot) -> (Desired, Vec<Problem>) {
        let (mut desired, mut problems) = self.compute_endpoints(snap);
        let (services, more) = self.compute_services(snap);
        desired.extend(services);
        problems.extend(more);
        (desired, problems)
    }
}
