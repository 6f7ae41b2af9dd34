//! Node entries (`cilium/state/nodes/v1`) from Node and CiliumNode objects.

use std::collections::BTreeMap;

use clustermesh_types::cluster_cidrs::ClusterCidrs;
use clustermesh_types::model::{Cidr, Node as NodeValue, NodeAddress};

use crate::source::Snapshot;

use super::{cidrs, Exporter, Problem, ProblemKind};

impl Exporter {
    pub(super) fn nodes(&self, snap: &Snapshot, problems: &mut Vec<Problem>) -> Vec<NodeValue> {
        let cluster = self.opts.cluster.name.as_str();
        let id = self.opts.cluster.id;
        let cidrs = &self.opts.cluster_cidrs;
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
                cidrs,
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
                        .filter_map(|a| {
                            Some(NodeAddress {
                                type_: a.type_.clone(),
                                ip: a.address?.to_string(),
                            })
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
                cidrs,
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
}

/// A node's pod CIDRs by family, without those that do not parse or lie outside the
/// cluster's CIDRs (`allowed`; each a problem).
pub(super) fn split_cidrs<'a>(
    pod_cidrs: impl Iterator<Item = &'a String>,
    object: &str,
    allowed: &ClusterCidrs,
    problems: &mut Vec<Problem>,
) -> (Vec<Cidr>, Vec<Cidr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for c in pod_cidrs {
        match c.parse::<Cidr>() {
            Ok(cidr) if cidr.addr.is_ipv4() => v4.push(cidr),
            Ok(cidr) => v6.push(cidr),
            Err(e) => problems.push(Problem {
                kind: ProblemKind::Invalid,
                object: object.into(),
                message: format!("pod CIDR {c:?}: {e}"),
            }),
        }
    }
    (
        cidrs::node_cidrs(allowed, object, v4, problems),
        cidrs::node_cidrs(allowed, object, v6, problems),
    )
}
