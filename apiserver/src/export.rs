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
//! - only services that are global *and* shared go to `cilium/state/services/v1`; every
//!   service goes to `clustermesh/local/v1/services` for the cluster's own agents;
//! - with the namespace filter (annotation `clustermesh.cilium.io/global`, default from
//!   `--clustermesh-default-global-namespace`), only endpoints, identities and global services
//!   of global namespaces are exported;
//! - MCS-API ServiceExports (when enabled) for services that exist and are not ExternalName.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use clustermesh_types::cluster::ClusterInfo;
use clustermesh_types::identity::{
    Label, LabelArray, CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL, SOURCE_K8S,
};
use clustermesh_types::kvstore;
use clustermesh_types::model::{
    BackendZone, Capabilities, Cidr, ClusterConfig, ClusterService, IpIdentityPair, L4Addr,
    NamedPort, Node as NodeValue, NodeAddress, PortConfiguration, ServiceExport, ServiceExportPort,
    SessionAffinityConfig,
};
use serde::Serialize;
use tracing::warn;

use crate::identity::Allocator;
use crate::source::objects::{self, IntOrString};
use crate::source::Snapshot;

/// Annotation marking a namespace global or not.
pub const NAMESPACE_GLOBAL_ANNOTATION: &str = "clustermesh.cilium.io/global";
/// Pod labels that never become identity labels (they differ per pod of one workload).
const IGNORED_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "apps.kubernetes.io/pod-index",
];

/// Export options (from the command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// The local cluster.
    pub cluster: ClusterInfo,
    /// Whether MCS-API ServiceExports are exported.
    pub enable_mcs_api: bool,
    /// Whether a namespace without the annotation is global.
    pub default_global_namespace: bool,
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
    /// `clustermesh/local/v1/services/`.
    LocalServices,
    /// `clustermesh/local/v1/policies/`.
    LocalPolicies,
}

impl Store {
    /// Every store, in the order they are first written.
    pub const ALL: [Store; 7] = [
        Store::Nodes,
        Store::Identities,
        Store::Ip,
        Store::Services,
        Store::ServiceExports,
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
            Store::LocalServices => "clustermesh/local/synced/v1/services".into(),
            Store::LocalPolicies => "clustermesh/local/synced/v1/policies".into(),
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
    /// The object concerned.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

/// The service as the cluster's own agents need it (`clustermesh/local/v1/services/…`):
/// Cilium's ClusterService plus what load balancing needs beyond it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalService {
    /// Cilium's fields.
    #[serde(flatten)]
    pub service: ClusterService,
    /// `local`, `remote` or `none`.
    pub affinity: String,
    /// Whether the service is headless (no frontend).
    pub headless: bool,
    /// Service type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Session affinity (ClientIP or None).
    pub session_affinity: String,
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
                endpoint_slices_export_mode: String::new(),
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

    /// Computes everything to publish. Problems are returned, not fatal.
    pub fn compute(&mut self, snap: &Snapshot) -> (Desired, Vec<Problem>) {
        let (mut desired, mut problems) = self.compute_endpoints(snap);
        let (services, more) = self.compute_services(snap);
        desired.extend(services);
        problems.extend(more);
        (desired, problems)
    }

    /// The stores that depend on endpoints: nodes, identities and ipcache entries.
    pub fn compute_endpoints(&mut self, snap: &Snapshot) -> (Desired, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut desired: Desired = [Store::Nodes, Store::Identities, Store::Ip]
            .iter()
            .map(|s| (*s, BTreeMap::new()))
            .collect();
        let cluster = self.opts.cluster.name.as_str().to_string();

        // Nodes.
        let nodes = self.nodes(snap, &mut problems);
        let node_ips: HashMap<String, String> = nodes
            .iter()
            .filter_map(|n| {
                n.ip_addresses
                    .iter()
                    .find(|a| a.type_ == "InternalIP" && a.ip.parse::<std::net::Ipv4Addr>().is_ok())
                    .or_else(|| n.ip_addresses.iter().find(|a| a.type_ == "InternalIP"))
                    .map(|a| (n.name.clone(), a.ip.clone()))
            })
            .collect();
        let out = desired.entry(Store::Nodes).or_default();
        for n in &nodes {
            out.insert(kvstore::node_key(&cluster, &n.name), n.encode());
        }

        // Identities.
        let range = self.opts.cluster.identity_range();
        let mut taken = HashSet::new();
        let mut identities: BTreeMap<u32, String> = BTreeMap::new();
        let mut identity_ns: HashMap<u32, String> = HashMap::new();
        for (name, ci) in &snap.cilium_identities {
            let Ok(id) = name.parse::<u32>() else {
                problems.push(Problem {
                    object: format!("CiliumIdentity/{name}"),
                    message: "name is not a numeric identity".into(),
                });
                continue;
            };
            if !range.contains(id) {
                problems.push(Problem {
                    object: format!("CiliumIdentity/{name}"),
                    message: format!(
                        "identity {id} is outside cluster {}'s range {}..={}; remote clusters would reject it",
                        cluster, range.min, range.max
                    ),
                });
                continue;
            }
            let labels = LabelArray::from_map(&ci.security_labels);
            let ns = labels
                .get(NAMESPACE_LABEL)
                .map(|l| l.value.clone())
                .or_else(|| {
                    ci.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(NAMESPACE_LABEL).cloned())
                });
            if let Some(ns) = ns {
                identity_ns.insert(id, ns);
            }
            taken.insert(id);
            identities.insert(id, labels.to_kvstore_string());
        }

        // Pods: identities and endpoints. Pods of one workload share a label set: each
        // distinct set is built and allocated once, not once per pod (with 10k pods the
        // per-pod version spent most of its time cloning and hashing label strings).
        let mut set_of: HashMap<LabelCacheKey, usize> = HashMap::new();
        // (identity labels, namespace) per distinct set.
        let mut sets: Vec<(String, &str)> = Vec::new();
        let mut pods: Vec<(&str, &str, &objects::Pod, usize)> = Vec::with_capacity(snap.pods.len());
        for ((ns, name), p) in &snap.pods {
            if !pod_is_endpoint(p) {
                continue;
            }
            let ck = (
                p.metadata.ns(),
                p.metadata.labels.as_ref(),
                p.spec.service_account_name.as_deref(),
            );
            let set = *set_of.entry(ck).or_insert_with(|| {
                sets.push((self.pod_identity_labels(snap, p), ns.as_str()));
                sets.len() - 1
            });
            pods.push((ns.as_str(), name.as_str(), p.as_ref(), set));
        }
        let in_use: HashSet<&str> = sets.iter().map(|(l, _)| l.as_str()).collect();
        let set_ids: Vec<Result<u32, String>> = sets
            .iter()
            .map(|(labels, ns)| {
                let id = self
                    .allocator
                    .allocate(labels, &taken, &in_use)
                    .map_err(|e| e.to_string())?;
                identities.insert(id, labels.clone());
                identity_ns.insert(id, ns.to_string());
                Ok(id)
            })
            .collect();

        let mut endpoints: Vec<Ep> = Vec::with_capacity(pods.len());
        for &(ns, name, pod, set) in &pods {
            let id = match &set_ids[set] {
                Ok(id) => *id,
                Err(e) => {
                    problems.push(Problem {
                        object: format!("Pod/{ns}/{name}"),
                        message: e.clone(),
                    });
                    continue;
                }
            };
            let host_ip = pod
                .status
                .host_ip
                .as_deref()
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    node_ips
                        .get(pod.spec.node_name.as_str())
                        .map(String::as_str)
                })
                .unwrap_or_default();
            for ip in pod_ips(pod) {
                endpoints.push(Ep {
                    kind: "Pod",
                    ns,
                    name,
                    ip,
                    src: EpSrc::Pod { pod, id, host_ip },
                });
            }
        }
        // CiliumEndpoints.
        for ((ns, name), cep) in &snap.cilium_endpoints {
            let st = &cep.status;
            let Some(net) = &st.networking else { continue };
            let Some(identity) = &st.identity else {
                continue;
            };
            let pod_uid = cep
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Pod")
                .map(|o| o.uid.clone())
                .unwrap_or_default();
            let named_ports: Vec<NamedPort> = st
                .named_ports
                .iter()
                .flatten()
                .map(|p| NamedPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                })
                .collect();
            for pair in &net.addressing {
                for ip in [&pair.ipv4, &pair.ipv6].into_iter().flatten() {
                    if ip.parse::<IpAddr>().is_err() {
                        problems.push(Problem {
                            object: format!("CiliumEndpoint/{ns}/{name}"),
                            message: format!("address {ip:?} is not an IP"),
                        });
                        continue;
                    }
                    endpoints.push(Ep {
                        kind: "CiliumEndpoint",
                        ns,
                        name,
                        ip,
                        src: EpSrc::Pair(Box::new(IpIdentityPair {
                            ip: ip.clone(),
                            mask: None,
                            host_ip: net.node.clone(),
                            id: identity.id,
                            key: st.encryption.as_ref().map(|e| e.key).unwrap_or(0),
                            metadata: String::new(),
                            k8s_namespace: ns.clone(),
                            k8s_pod_name: name.clone(),
                            k8s_pod_uid: pod_uid.clone(),
                            k8s_service_account: st.service_account.clone().unwrap_or_default(),
                            named_ports: named_ports.clone(),
                        })),
                    });
                }
            }
        }

        // Shared IPs: the current owner keeps an IP while it still claims it; otherwise the
        // endpoint seen first wins. Owners are remembered by the sequence number they got when
        // first seen; entries not touched in this pass (this `generation`) are forgotten.
        self.generation += 1;
        let generation = self.generation;
        let mut owner = String::new();
        let seqs: Vec<u64> = endpoints
            .iter()
            .map(|e| {
                owner.clear();
                owner.push_str(e.kind);
                owner.push('/');
                owner.push_str(e.ns);
                owner.push('/');
                owner.push_str(e.name);
                match self.first_seen.get_mut(owner.as_str()) {
                    Some(seen) => {
                        seen.1 = generation;
                        seen.0
                    }
                    None => {
                        self.seq += 1;
                        self.first_seen
                            .insert(owner.clone(), (self.seq, generation));
                        self.seq
                    }
                }
            })
            .collect();
        self.first_seen.retain(|_, seen| seen.1 == generation);
        // Claims grouped by IP; the stable sort keeps each group in input order.
        let mut order: Vec<usize> = (0..endpoints.len()).collect();
        order.sort_by(|a, b| endpoints[*a].ip.cmp(endpoints[*b].ip));
        let ip_out = desired.entry(Store::Ip).or_default();
        for group in order.chunk_by(|a, b| endpoints[*a].ip == endpoints[*b].ip) {
            let ip = endpoints[group[0]].ip;
            let current = self.ip_owner.get(ip).map(|o| o.0);
            let chosen = group
                .iter()
                .copied()
                .find(|i| Some(seqs[*i]) == current)
                .or_else(|| group.iter().copied().min_by_key(|i| seqs[*i]))
                .unwrap_or(group[0]);
            match self.ip_owner.get_mut(ip) {
                Some(o) => *o = (seqs[chosen], generation),
                None => {
                    self.ip_owner
                        .insert(ip.to_string(), (seqs[chosen], generation));
                }
            }
            let e = &endpoints[chosen];
            if !self.namespace_global(snap, e.ns) {
                continue;
            }
            let pair = e.pair();
            ip_out.insert(kvstore::ip_key(&pair.prefix_string()), pair.encode());
        }
        self.ip_owner.retain(|_, o| o.1 == generation);

        let id_out = desired.entry(Store::Identities).or_default();
        for (id, labels) in &identities {
            if let Some(ns) = identity_ns.get(id) {
                if !self.namespace_global(snap, ns) {
                    continue;
                }
            }
            id_out.insert(kvstore::identity_key(*id), labels.clone().into_bytes());
        }
        for p in &problems {
            warn!(object = %p.object, problem = %p.message, "not exported");
        }
        (desired, problems)
    }

    /// The stores that depend on services and policies: global services, MCS exports, and
    /// the local agents' services and policies. Independent of [`Exporter::compute_endpoints`],
    /// so the two can overlap with writing.
    pub fn compute_services(&mut self, snap: &Snapshot) -> (Desired, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut desired: Desired = [
            Store::Services,
            Store::ServiceExports,
            Store::LocalServices,
            Store::LocalPolicies,
        ]
        .iter()
        .map(|s| (*s, BTreeMap::new()))
        .collect();
        let cluster = self.opts.cluster.name.as_str().to_string();

        // Services.
        let index = label_index(snap);
        for ((ns, name), svc) in &snap.services {
            let Some(cs) = self.cluster_service(snap, &index, ns, name, svc) else {
                continue;
            };
            let ann = |a: &str, b: &str| {
                svc.metadata
                    .annotation(a)
                    .or_else(|| svc.metadata.annotation(b))
                    .map(|v| v.trim().to_ascii_lowercase())
            };
            let affinity =
                match ann("service.cilium.io/affinity", "io.cilium/service-affinity").as_deref() {
                    Some("local") => "local",
                    Some("remote") => "remote",
                    Some("none") | None => "none",
                    Some(other) => {
                        problems.push(Problem {
                            object: format!("Service/{ns}/{name}"),
                            message: format!("unknown affinity {other:?}, treated as none"),
                        });
                        "none"
                    }
                };
            if cs.include_external && cs.shared && self.namespace_global(snap, ns) {
                desired
                    .entry(Store::Services)
                    .or_default()
                    .insert(kvstore::service_key(&cluster, ns, name), cs.encode());
            }
            let local = LocalService {
                headless: is_headless(svc),
                type_: svc.spec.type_.clone().unwrap_or_else(|| "ClusterIP".into()),
                session_affinity: svc.spec.session_affinity.clone().unwrap_or_default(),
                affinity: affinity.into(),
                service: cs,
            };
            if let Ok(bytes) = serde_json::to_vec(&local) {
                desired
                    .entry(Store::LocalServices)
                    .or_default()
                    .insert(kvstore::local_service_key(ns, name), bytes);
            }
        }

        // MCS-API service exports.
        if self.opts.enable_mcs_api {
            for ((ns, name), se) in &snap.service_exports {
                let Some(svc) = snap.services.get(&(ns.clone(), name.clone())) else {
                    continue;
                };
                if svc.spec.type_.as_deref() == Some("ExternalName") {
                    continue;
                }
                let ts = match &se.metadata.creation_timestamp {
                    Some(t) => t.clone(),
                    None => self.allocator.export_time(&format!("{ns}/{name}"), || {
                        clustermesh_types::model::format_rfc3339(std::time::SystemTime::now())
                    }),
                };
                let value = ServiceExport {
                    cluster: cluster.clone(),
                    name: name.clone(),
                    namespace: ns.clone(),
                    annotations: se.spec.exported_annotations.clone().unwrap_or_default(),
                    labels: se.spec.exported_labels.clone().unwrap_or_default(),
                    export_creation_timestamp: ts,
                    ports: svc
                        .spec
                        .ports
                        .iter()
                        .map(|p| ServiceExportPort {
                            name: p.name.clone().unwrap_or_default(),
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            app_protocol: p.app_protocol.clone(),
                            port: i32::from(p.port),
                        })
                        .collect(),
                    type_: if is_headless(svc) {
                        "Headless"
                    } else {
                        "ClusterSetIP"
                    }
                    .into(),
                    session_affinity: svc.spec.session_affinity.clone().unwrap_or_default(),
                    session_affinity_config: svc
                        .spec
                        .session_affinity_config
                        .clone()
                        .and_then(|v| serde_json::from_value::<SessionAffinityConfig>(v).ok()),
                    ip_families: svc.spec.ip_families.clone().unwrap_or_default(),
                    internal_traffic_policy: svc.spec.internal_traffic_policy.clone(),
                    traffic_distribution: svc.spec.traffic_distribution.clone(),
                };
                desired.entry(Store::ServiceExports).or_default().insert(
                    kvstore::service_export_key(&cluster, ns, name),
                    value.encode(),
                );
            }
        }

        // Policies, whole, for the local agents.
        for ((kind, ns, name), p) in &snap.policies {
            if let Ok(bytes) = serde_json::to_vec(&p.raw) {
                desired
                    .entry(Store::LocalPolicies)
                    .or_default()
                    .insert(kvstore::local_policy_key(kind, ns, name), bytes);
            }
        }

        for p in &problems {
            warn!(object = %p.object, problem = %p.message, "not exported");
        }
        (desired, problems)
    }

    fn pod_identity_labels(&self, snap: &Snapshot, pod: &objects::Pod) -> String {
        let ns = pod.metadata.ns();
        let mut labels: Vec<Label> = pod
            .metadata
            .labels()
            .into_iter()
            .filter(|(k, _)| !IGNORED_POD_LABELS.contains(&k.as_str()))
            .map(|(k, v)| Label::new(SOURCE_K8S, k, v))
            .collect();
        if let Some(n) = snap.namespaces.get(ns) {
            for (k, v) in n.metadata.labels() {
                labels.push(Label::new(
                    SOURCE_K8S,
                    format!("{NAMESPACE_LABELS_PREFIX}{k}"),
                    v,
                ));
            }
        }
        labels.push(Label::new(
            SOURCE_K8S,
            CLUSTER_LABEL,
            self.opts.cluster.name.as_str(),
        ));
        labels.push(Label::new(
            SOURCE_K8S,
            SERVICE_ACCOUNT_LABEL,
            pod.spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
        ));
        labels.push(Label::new(SOURCE_K8S, NAMESPACE_LABEL, ns));
        LabelArray::new(labels).to_kvstore_string()
    }

    fn nodes(&self, snap: &Snapshot, problems: &mut Vec<Problem>) -> Vec<NodeValue> {
        let cluster = self.opts.cluster.name.as_str();
        let id = self.opts.cluster.id;
        let mut out: BTreeMap<String, NodeValue> = BTreeMap::new();
        for (name, n) in &snap.nodes {
            let (v4, v6) = split_cidrs(
                n.spec
                    .pod_cidrs
                    .clone()
                    .or_else(|| n.spec.pod_cidr.clone().map(|c| vec![c]))
                    .unwrap_or_default()
                    .iter(),
                &format!("Node/{name}"),
                problems,
            );
            out.insert(
                name.clone(),
                NodeValue {
                    name: name.clone(),
                    cluster: cluster.into(),
                    ip_addresses: n
                        .status
                        .addresses
                        .iter()
                        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                        .filter(|a| a.address.parse::<IpAddr>().is_ok())
                        .map(|a| NodeAddress {
                            type_: a.type_.clone(),
                            ip: a.address.clone(),
                        })
                        .collect(),
                    ipv4_alloc_cidr: v4.first().copied(),
                    ipv4_secondary_alloc_cidrs: v4.iter().skip(1).copied().collect(),
                    ipv6_alloc_cidr: v6.first().copied(),
                    ipv6_secondary_alloc_cidrs: v6.iter().skip(1).copied().collect(),
                    cluster_id: id,
                    source: "kubernetes".into(),
                    labels: n.metadata.labels.clone(),
                    annotations: n.metadata.annotations.clone(),
                    wireguard_pub_key: n
                        .metadata
                        .annotation("network.cilium.io/wg-pub-key")
                        .unwrap_or_default()
                        .into(),
                    boot_id: n
                        .status
                        .node_info
                        .as_ref()
                        .map(|i| i.boot_id.clone())
                        .unwrap_or_default(),
                    ..Default::default()
                },
            );
        }
        // CiliumNode wins over Node of the same name (Cilium's CRD mode).
        for (name, cn) in &snap.cilium_nodes {
            let spec = &cn.spec;
            let (v4, v6) = split_cidrs(
                spec.ipam
                    .as_ref()
                    .map(|i| i.pod_cidrs.clone())
                    .unwrap_or_default()
                    .iter(),
                &format!("CiliumNode/{name}"),
                problems,
            );
            let health = spec.health.clone().unwrap_or_default();
            let ingress = spec.ingress.clone().unwrap_or_default();
            out.insert(
                name.clone(),
                NodeValue {
                    name: name.clone(),
                    cluster: cluster.into(),
                    ip_addresses: spec
                        .addresses
                        .iter()
                        .map(|a| NodeAddress {
                            type_: a.type_.clone(),
                            ip: a.ip.clone(),
                        })
                        .collect(),
                    ipv4_alloc_cidr: v4.first().copied(),
                    ipv4_secondary_alloc_cidrs: v4.iter().skip(1).copied().collect(),
                    ipv6_alloc_cidr: v6.first().copied(),
                    ipv6_secondary_alloc_cidrs: v6.iter().skip(1).copied().collect(),
                    ipv4_health_ip: health.ipv4.unwrap_or_default(),
                    ipv6_health_ip: health.ipv6.unwrap_or_default(),
                    ipv4_ingress_ip: ingress.ipv4.unwrap_or_default(),
                    ipv6_ingress_ip: ingress.ipv6.unwrap_or_default(),
                    cluster_id: id,
                    source: "custom-resource".into(),
                    encryption_key: spec.encryption.as_ref().map(|e| e.key).unwrap_or(0),
                    labels: cn.metadata.labels.clone(),
                    annotations: cn.metadata.annotations.clone(),
                    wireguard_pub_key: cn
                        .metadata
                        .annotation("network.cilium.io/wg-pub-key")
                        .unwrap_or_default()
                        .into(),
                    boot_id: spec.bootid.clone().unwrap_or_default(),
                },
            );
        }
        out.into_values().collect()
    }

    fn cluster_service(
        &self,
        snap: &Snapshot,
        index: &LabelIndex,
        ns: &str,
        name: &str,
        svc: &objects::Service,
    ) -> Option<ClusterService> {
        if svc.spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let ann = |a: &str, b: &str| {
            svc.metadata
                .annotation(a)
                .or_else(|| svc.metadata.annotation(b))
                .map(|v| v.trim().eq_ignore_ascii_case("true"))
        };
        let global = ann("service.cilium.io/global", "io.cilium/global-service").unwrap_or(false);
        let shared =
            global && ann("service.cilium.io/shared", "io.cilium/shared-service").unwrap_or(true);

        let mut frontend_ports = PortConfiguration::new();
        for p in &svc.spec.ports {
            frontend_ports.insert(
                p.name.clone().unwrap_or_default(),
                L4Addr {
                    protocol: p.protocol.as_deref().unwrap_or("TCP").into(),
                    port: p.port,
                },
            );
        }
        let mut frontends = BTreeMap::new();
        let ips: Vec<String> = svc
            .spec
            .cluster_ips
            .clone()
            .or_else(|| svc.spec.cluster_ip.clone().map(|c| vec![c]))
            .unwrap_or_default();
        for ip in ips {
            if ip.parse::<IpAddr>().is_ok() {
                frontends.insert(ip, frontend_ports.clone());
            }
        }

        let mut backends: BTreeMap<String, PortConfiguration> = BTreeMap::new();
        let mut hostnames = BTreeMap::new();
        let mut zones = BTreeMap::new();
        let slices: Vec<&objects::EndpointSlice> = snap
            .endpoint_slices
            .range((ns.to_string(), String::new())..)
            .take_while(|((sns, _), _)| sns == ns)
            .map(|(_, s)| s.as_ref())
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .map(|n| n == name)
                    .unwrap_or(false)
            })
            .collect();
        if !slices.is_empty() {
            for s in slices {
                if s.address_type != "IPv4" && s.address_type != "IPv6" {
                    continue;
                }
                let mut ports = PortConfiguration::new();
                for p in s.ports.iter().flatten() {
                    if let Some(port) = p.port {
                        ports.insert(
                            p.name.clone().unwrap_or_default(),
                            L4Addr {
                                protocol: p.protocol.as_deref().unwrap_or("TCP").into(),
                                port,
                            },
                        );
                    }
                }
                for ep in &s.endpoints {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if !ready {
                        continue;
                    }
                    for addr in &ep.addresses {
                        if addr.parse::<IpAddr>().is_err() {
                            continue;
                        }
                        backends
                            .entry(addr.clone())
                            .or_default()
                            .extend(ports.clone());
                        if let Some(h) = &ep.hostname {
                            hostnames.insert(addr.clone(), h.clone());
                        }
                        if let Some(z) = &ep.zone {
                            zones.insert(
                                addr.clone(),
                                BackendZone {
                                    zone: z.clone(),
                                    for_zones: Vec::new(),
                                },
                            );
                        }
                    }
                }
            }
        } else if let Some(sel) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) {
            // No EndpointSlice controller in a manifest directory: select pods ourselves,
            // starting from the pods that carry the selector's first label (index).
            let (k0, v0) = sel.iter().next()?;
            let candidates = index
                .get(&(ns.to_string(), k0.clone(), v0.clone()))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for pod_key in candidates {
                let Some(pod) = snap.pods.get(pod_key) else {
                    continue;
                };
                if !pod_is_endpoint(pod) || !pod_ready(pod) {
                    continue;
                }
                let labels = pod.metadata.labels.as_ref();
                if !sel
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                {
                    continue;
                }
                let mut ports = PortConfiguration::new();
                for p in &svc.spec.ports {
                    let target = match &p.target_port {
                        None => Some(p.port),
                        Some(IntOrString::Int(n)) => Some(*n),
                        Some(IntOrString::String(n)) => pod
                            .spec
                            .containers
                            .iter()
                            .flat_map(|c| c.ports.iter())
                            .find(|cp| cp.name.as_deref() == Some(n.as_str()))
                            .map(|cp| cp.container_port),
                    };
                    if let Some(port) = target {
                        ports.insert(
                            p.name.clone().unwrap_or_default(),
                            L4Addr {
                                protocol: p.protocol.as_deref().unwrap_or("TCP").into(),
                                port,
                            },
                        );
                    }
                }
                for ip in pod_ips(pod) {
                    backends.insert(ip.into(), ports.clone());
                }
            }
        }

        Some(ClusterService {
            cluster: self.opts.cluster.name.as_str().into(),
            namespace: ns.into(),
            name: name.into(),
            frontends: frontends.into_iter().collect(),
            backends: backends.into_iter().collect(),
            hostnames,
            zones,
            labels: svc.metadata.labels(),
            selector: svc.spec.selector.clone().unwrap_or_default(),
            include_external: global,
            shared,
            cluster_id: self.opts.cluster.id,
        })
    }
}

/// What a pod's identity labels depend on (besides the namespace's labels).
type LabelCacheKey<'a> = (
    &'a str,
    Option<&'a BTreeMap<String, String>>,
    Option<&'a str>,
);

/// (namespace, label key, label value) → pods carrying it.
type LabelIndex = HashMap<(String, String, String), Vec<(String, String)>>;

fn label_index(snap: &Snapshot) -> LabelIndex {
    let mut index: LabelIndex = HashMap::new();
    for (key, pod) in &snap.pods {
        for (k, v) in pod.metadata.labels.iter().flatten() {
            index
                .entry((key.0.clone(), k.clone(), v.clone()))
                .or_default()
                .push(key.clone());
        }
    }
    index
}

fn is_headless(svc: &objects::Service) -> bool {
    svc.spec.cluster_ip.as_deref() == Some("None")
}

fn pod_is_endpoint(pod: &objects::Pod) -> bool {
    !pod.spec.host_network
        && !matches!(
            pod.status.phase.as_deref(),
            Some("Succeeded") | Some("Failed")
        )
        && pod_ips(pod).next().is_some()
}

fn pod_ready(pod: &objects::Pod) -> bool {
    pod.status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
        .unwrap_or(true)
}

/// The pod's IPs (`podIPs`, or `podIP` when that list is empty), valid addresses only.
fn pod_ips(pod: &objects::Pod) -> impl Iterator<Item = &str> {
    let listed = pod.status.pod_ips.as_deref().unwrap_or_default();
    let fallback = pod.status.pod_ip.as_deref().filter(|_| listed.is_empty());
    listed
        .iter()
        .map(|p| p.ip.as_str())
        .chain(fallback)
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
}

/// One endpoint's claim on an IP (borrowing from the snapshot; the ipcache value is built
/// only for the claim that wins).
struct Ep<'a> {
    /// `Pod` or `CiliumEndpoint`.
    kind: &'static str,
    ns: &'a str,
    name: &'a str,
    ip: &'a str,
    src: EpSrc<'a>,
}

enum EpSrc<'a> {
    Pod {
        pod: &'a objects::Pod,
        id: u32,
        host_ip: &'a str,
    },
    Pair(Box<IpIdentityPair>),
}

impl Ep<'_> {
    fn pair(&self) -> IpIdentityPair {
        match &self.src {
            EpSrc::Pair(p) => (**p).clone(),
            EpSrc::Pod { pod, id, host_ip } => IpIdentityPair {
                ip: self.ip.to_string(),
                mask: None,
                host_ip: host_ip.to_string(),
                id: *id,
                key: 0,
                metadata: String::new(),
                k8s_namespace: self.ns.to_string(),
                k8s_pod_name: self.name.to_string(),
                k8s_pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                k8s_service_account: pod
                    .spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                named_ports: pod
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter())
                    .filter_map(|p| {
                        p.name.as_ref().map(|n| NamedPort {
                            name: n.clone(),
                            port: p.container_port,
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        })
                    })
                    .collect(),
            },
        }
    }
}

fn split_cidrs<'a>(
    cidrs: impl Iterator<Item = &'a String>,
    object: &str,
    problems: &mut Vec<Problem>,
) -> (Vec<Cidr>, Vec<Cidr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for c in cidrs {
        match c.parse::<Cidr>() {
            Ok(cidr) if cidr.addr.is_ipv4() => v4.push(cidr),
            Ok(cidr) => v6.push(cidr),
            Err(e) => problems.push(Problem {
                object: object.into(),
                message: format!("pod CIDR {c:?}: {e}"),
            }),
        }
    }
    (v4, v6)
}
