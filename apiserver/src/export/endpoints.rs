//! Nodes, identities and ipcache entries of the cluster's endpoints (Pods, and
//! CiliumEndpoints or, with `--enable-cilium-endpoint-slice`, the endpoints of
//! CiliumEndpointSlices), including who owns an IP that two endpoints claim.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use clustermesh_types::identity::{LabelArray, NAMESPACE_LABEL};
use clustermesh_types::kvstore;
use clustermesh_types::model::{IpIdentityPair, NamedPort};
use tracing::warn;

use crate::source::objects;
use crate::source::Snapshot;

use super::identities::LabelCacheKey;
use super::{cidrs, Desired, Exporter, Problem, ProblemKind, Store};

impl Exporter {
    /// The stores that depend on endpoints: nodes, identities and ipcache entries.
    pub fn compute_endpoints(&mut self, snap: &Snapshot) -> (Desired, Vec<Problem>) {
        // A full pass: the incremental index must be rebuilt from its snapshot.
        self.index = None;
        let mut problems = Vec::new();
        let mut desired: Desired = [Store::Nodes, Store::Identities, Store::Ip]
            .iter()
            .map(|s| (*s, BTreeMap::new()))
            .collect();
        let cluster = self.opts.cluster.name.as_str().to_string();
        let cidrs = &self.opts.cluster_cidrs.clone();

        // Nodes.
        let nodes = self.nodes(snap, &mut problems);
        let node_ips: HashMap<String, String> = nodes
            .iter()
            .filter_map(|n| node_internal_ip(n).map(|ip| (n.name.clone(), ip)))
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
                    kind: ProblemKind::Invalid,
                    object: format!("CiliumIdentity/{name}"),
                    message: "name is not a numeric identity".into(),
                });
                continue;
            };
            if !range.contains(id) {
                problems.push(Problem {
                    kind: ProblemKind::Invalid,
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
                        kind: ProblemKind::Invalid,
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
            let host_ip = std::borrow::Cow::Borrowed(host_ip);
            let object = || format!("Pod/{ns}/{name}");
            for ip in pod_ips(pod).filter(|ip| cidrs::inside(cidrs, object, ip, &mut problems)) {
                endpoints.push(Ep {
                    kind: "Pod",
                    ns,
                    name,
                    ip,
                    src: EpSrc::Pod {
                        pod,
                        id,
                        host_ip: host_ip.clone(),
                    },
                });
            }
        }
        // CiliumEndpoints, or the CiliumEndpointSlices that batch them (never both, as in
        // Cilium: the CES mode ignores CEP objects).
        let ceps = if self.opts.enable_cilium_endpoint_slice {
            objects::CoreEndpoint::from_slices(&snap.cilium_endpoint_slices)
        } else {
            objects::CoreEndpoint::from_endpoints(&snap.cilium_endpoints)
        };
        for cep in &ceps {
            let claims = cep_claims(cep, &mut problems);
            endpoints.extend(claims.into_iter().filter(|e| {
                let object = || format!("CiliumEndpoint/{}/{}", e.ns, e.name);
                cidrs::inside(cidrs, object, e.ip, &mut problems)
            }));
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
}

pub(super) fn pod_is_endpoint(pod: &objects::Pod) -> bool {
    !pod.spec.host_network
        && !matches!(
            pod.status.phase.as_deref(),
            Some("Succeeded") | Some("Failed")
        )
        && pod_ips(pod).next().is_some()
}

/// The pod's IPs (`podIPs`, or `podIP` when that list is empty), valid addresses only.
pub(super) fn pod_ips(pod: &objects::Pod) -> impl Iterator<Item = &str> {
    let listed = pod.status.pod_ips.as_deref().unwrap_or_default();
    let fallback = pod.status.pod_ip.as_deref().filter(|_| listed.is_empty());
    listed
        .iter()
        .map(|p| p.ip.as_str())
        .chain(fallback)
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
}

/// A node's InternalIP (IPv4 first): the host IP of its pods that do not report one.
pub(super) fn node_internal_ip(n: &clustermesh_types::model::Node) -> Option<String> {
    n.ip_addresses
        .iter()
        .find(|a| a.type_ == "InternalIP" && a.ip.parse::<std::net::Ipv4Addr>().is_ok())
        .or_else(|| n.ip_addresses.iter().find(|a| a.type_ == "InternalIP"))
        .map(|a| a.ip.clone())
}

/// A CiliumEndpoint's claims, one per valid address (an invalid one is a problem).
pub(super) fn cep_claims<'a>(
    cep: &objects::CoreEndpoint<'a>,
    problems: &mut Vec<Problem>,
) -> Vec<Ep<'a>> {
    let (ns, name, net) = (cep.namespace, cep.name, cep.networking);
    let pod_uid = cep.pod_uid.unwrap_or_default().to_string();
    let named_ports: Vec<NamedPort> = cep
        .named_ports
        .iter()
        .map(|p| NamedPort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
        })
        .collect();
    let mut out = Vec::new();
    for pair in &net.addressing {
        for ip in [&pair.ipv4, &pair.ipv6].into_iter().flatten() {
            if ip.parse::<IpAddr>().is_err() {
                problems.push(Problem {
                    kind: ProblemKind::Invalid,
                    object: format!("CiliumEndpoint/{ns}/{name}"),
                    message: format!("address {ip:?} is not an IP"),
                });
                continue;
            }
            out.push(Ep {
                kind: "CiliumEndpoint",
                ns,
                name,
                ip,
                src: EpSrc::Pair(Box::new(IpIdentityPair {
                    ip: ip.as_str().into(),
                    mask: None,
                    host_ip: net.node.as_str().into(),
                    id: cep.identity,
                    key: cep.encryption_key,
                    metadata: Default::default(),
                    k8s_namespace: ns.into(),
                    k8s_pod_name: name.into(),
                    k8s_pod_uid: pod_uid.as_str().into(),
                    k8s_service_account: cep.service_account.unwrap_or_default().into(),
                    named_ports: named_ports.clone(),
                })),
            });
        }
    }
    out
}

/// One endpoint's claim on an IP (borrowing from the snapshot; the ipcache value is built
/// only for the claim that wins).
pub(super) struct Ep<'a> {
    /// `Pod` or `CiliumEndpoint`.
    pub(super) kind: &'static str,
    pub(super) ns: &'a str,
    pub(super) name: &'a str,
    pub(super) ip: &'a str,
    pub(super) src: EpSrc<'a>,
}

pub(super) enum EpSrc<'a> {
    Pod {
        pod: &'a objects::Pod,
        id: u32,
        host_ip: std::borrow::Cow<'a, str>,
    },
    Pair(Box<IpIdentityPair>),
}

impl Ep<'_> {
    pub(super) fn pair(&self) -> IpIdentityPair {
        match &self.src {
            EpSrc::Pair(p) => (**p).clone(),
            EpSrc::Pod { pod, id, host_ip } => IpIdentityPair {
                ip: self.ip.into(),
                mask: None,
                host_ip: host_ip.as_ref().into(),
                id: *id,
                key: 0,
                metadata: Default::default(),
                k8s_namespace: self.ns.into(),
                k8s_pod_name: self.name.into(),
                k8s_pod_uid: pod.metadata.uid.as_deref().unwrap_or_default().into(),
                k8s_service_account: pod
                    .spec
                    .service_account_name
                    .as_deref()
                    .unwrap_or("default")
                    .into(),
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
