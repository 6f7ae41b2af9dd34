//! EndpointSlices of exported services ("ClusterMesh service v2", Cilium 1.20):
//! `cilium/state/endpointslices/v1/<cluster>/<namespace>/<slice>`.
//!
//! A slice is exported when its service (label `kubernetes.io/service-name`) would be
//! exported as a global service: it exists, is global, not `service.cilium.io/shared:
//! "false"`, not ExternalName, and lives in a global namespace. FQDN slices are not
//! exported (Cilium's reader accepts only IPv4 and IPv6); an address that is not of the
//! slice's family is left out and reported, so a remote never rejects the whole slice.
//!
//! A manifest directory has no EndpointSlice controller: a service with a selector and no
//! slice of its own gets the slices that controller would create, one per address family
//! and port set, from the pods it selects (named `<service>`, `<service>-ipv6`, then
//! `-2`, `-3`, … for further port sets), so endpointslices-only clusters serve the same
//! backends as the legacy store. This module must not decide anything else about services
//! (see `services.rs`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_types::kvstore;
use clustermesh_types::model::endpoint_slice::{
    Conditions, Endpoint, Hints, Port, SERVICE_NAME_LABEL,
};
use clustermesh_types::model::{EndpointSlice, ForZone};

use crate::source::objects::{self, IntOrString};
use crate::source::Snapshot;

use super::endpoints::{pod_ips, pod_is_endpoint};
use super::services::{pod_ready, LabelIndex};
use super::{Exporter, Problem, ProblemKind};

/// `endpointslice.kubernetes.io/managed-by` of the slices made up for selector services.
pub const MANAGED_BY: &str = "clustermesh-apiserver.clustermesh.io";

impl Exporter {
    /// Whether `svc` (in `ns`) is exported as a global service: global, shared, not
    /// ExternalName, in a global namespace. The rule of both `services/v1` and
    /// `endpointslices/v1`.
    pub(super) fn service_exported(
        &self,
        snap: &Snapshot,
        ns: &str,
        svc: &objects::Service,
    ) -> bool {
        if svc.spec.type_.as_deref() == Some("ExternalName") {
            return false;
        }
        let ann = |a: &str, b: &str| {
            svc.metadata
                .annotation(a)
                .or_else(|| svc.metadata.annotation(b))
                .map(|v| v.trim().eq_ignore_ascii_case("true"))
        };
        let global = ann("service.cilium.io/global", "io.cilium/global-service").unwrap_or(false);
        let shared = ann("service.cilium.io/shared", "io.cilium/shared-service").unwrap_or(true);
        global && shared && self.namespace_global(snap, ns)
    }

    /// The `endpointslices/v1` store: key → value.
    pub(super) fn endpoint_slices(
        &self,
        snap: &Snapshot,
        index: &LabelIndex,
        problems: &mut Vec<Problem>,
    ) -> BTreeMap<String, Vec<u8>> {
        let cluster = self.opts.cluster.name.as_str();
        let mut out = BTreeMap::new();
        let mut with_slices = std::collections::HashSet::new();
        for ((ns, name), slice) in &snap.endpoint_slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            with_slices.insert((ns.as_str(), service.as_str()));
            if let Some(v) = self.real_slice_value(snap, ns, name, slice, problems) {
                out.insert(kvstore::endpoint_slice_key(cluster, ns, name), v);
            }
        }
        // Selector services without a slice: the slices an EndpointSlice controller would
        // create. A real slice of the same name wins.
        for ((ns, name), svc) in &snap.services {
            if with_slices.contains(&(ns.as_str(), name.as_str()))
                || !self.service_exported(snap, ns, svc)
            {
                continue;
            }
            for slice in self.pod_slices(snap, index, ns, name, svc) {
                out.entry(kvstore::endpoint_slice_key(cluster, ns, &slice.name))
                    .or_insert_with(|| slice.encode());
            }
        }
        out
    }

    /// The value of a real EndpointSlice: `None` unless its service (label
    /// `kubernetes.io/service-name`) exists and is exported and the slice is IPv4 or IPv6.
    pub(super) fn real_slice_value(
        &self,
        snap: &Snapshot,
        ns: &str,
        name: &str,
        slice: &objects::EndpointSlice,
        problems: &mut Vec<Problem>,
    ) -> Option<Vec<u8>> {
        let cluster = self.opts.cluster.name.as_str();
        {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))?;
            let svc = snap.services.get(&(ns.to_string(), service.clone()))?;
            if !self.service_exported(snap, ns, svc) {
                return None;
            }
            let v4 = match slice.address_type.as_str() {
                "IPv4" => true,
                "IPv6" => false,
                _ => return None,
            };
            let value = EndpointSlice {
                cluster: cluster.into(),
                cluster_id: self.opts.cluster.id,
                namespace: ns.to_string(),
                name: name.to_string(),
                labels: slice.metadata.labels(),
                address_type: slice.address_type.clone(),
                endpoints: slice
                    .endpoints
                    .iter()
                    .map(|ep| Endpoint {
                        addresses: ep
                            .addresses
                            .iter()
                            .filter(|a| {
                                let ok = a.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv4() == v4);
                                if !ok {
                                    problems.push(Problem {
                                        kind: ProblemKind::Invalid,
                                        object: format!("EndpointSlice/{ns}/{name}"),
                                        message: format!(
                                            "address {a:?} is not {}: left out of the export",
                                            slice.address_type
                                        ),
                                    });
                                }
                                ok
                            })
                            .cloned()
                            .collect(),
                        conditions: ep
                            .conditions
                            .as_ref()
                            .map(|c| Conditions {
                                ready: c.ready,
                                serving: c.serving,
                                terminating: c.terminating,
                            })
                            .unwrap_or_default(),
                        hostname: ep.hostname.clone(),
                        node_name: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                        hints: ep.hints.as_ref().map(|h| Hints {
                            for_zones: h
                                .for_zones
                                .iter()
                                .map(|z| ForZone {
                                    name: z.name.clone(),
                                })
                                .collect(),
                        }),
                    })
                    .collect(),
                ports: slice
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| Port {
                        name: p.name.clone().unwrap_or_default(),
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        port: p.port.unwrap_or(0),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
            };
            Some(value.encode())
        }
    }

    /// The slices of a selector service, built from the pods it selects.
    pub(super) fn pod_slices(
        &self,
        snap: &Snapshot,
        index: &LabelIndex,
        ns: &str,
        name: &str,
        svc: &objects::Service,
    ) -> Vec<EndpointSlice> {
        let Some(sel) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            return Vec::new();
        };
        let Some((k0, v0)) = sel.iter().next() else {
            return Vec::new();
        };
        let candidates = index
            .get(&(ns.to_string(), k0.clone(), v0.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // (IPv4?, ports) → endpoints, so each slice has one family and one port set.
        let mut groups: BTreeMap<(bool, Vec<Port>), Vec<Endpoint>> = BTreeMap::new();
        for pod_key in candidates {
            let Some(pod) = snap.pods.get(pod_key) else {
                continue;
            };
            let labels = pod.metadata.labels.as_ref();
            if !pod_is_endpoint(pod)
                || !sel
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            {
                continue;
            }
            let ports: Vec<Port> = svc
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    let port = match &p.target_port {
                        None => Some(p.port),
                        Some(IntOrString::Int(n)) => Some(*n),
                        Some(IntOrString::String(n)) => pod
                            .spec
                            .containers
                            .iter()
                            .flat_map(|c| c.ports.iter())
                            .find(|cp| cp.name.as_deref() == Some(n.as_str()))
                            .map(|cp| cp.container_port),
                    }?;
                    Some(Port {
                        name: p.name.clone().unwrap_or_default(),
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        port,
                        app_protocol: p.app_protocol.clone(),
                    })
                })
                .collect();
            let ready = pod_ready(pod);
            for ip in pod_ips(pod) {
                let v4 = ip.parse::<IpAddr>().is_ok_and(|a| a.is_ipv4());
                groups
                    .entry((v4, ports.clone()))
                    .or_default()
                    .push(Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Conditions {
                            ready: Some(ready),
                            serving: Some(ready),
                            terminating: Some(false),
                        },
                        hostname: None,
                        node_name: Some(pod.spec.node_name.clone()).filter(|n| !n.is_empty()),
                        zone: None,
                        hints: None,
                    });
            }
        }
        let mut seen = [0usize; 2];
        // IPv4 first, as `true` sorts after `false`.
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|((v4, _), _)| !v4);
        groups
            .into_iter()
            .map(|((v4, ports), mut endpoints)| {
                let family = usize::from(!v4);
                seen[family] += 1;
                let base = if v4 {
                    name.to_string()
                } else {
                    format!("{name}-ipv6")
                };
                let slice_name = match seen[family] {
                    1 => base,
                    n => format!("{base}-{n}"),
                };
                endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
                EndpointSlice {
                    cluster: self.opts.cluster.name.as_str().into(),
                    cluster_id: self.opts.cluster.id,
                    namespace: ns.into(),
                    name: slice_name,
                    labels: BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_string(), name.to_string()),
                        (
                            "endpointslice.kubernetes.io/managed-by".to_string(),
                            MANAGED_BY.to_string(),
                        ),
                    ]),
                    address_type: if v4 { "IPv4" } else { "IPv6" }.into(),
                    endpoints,
                    ports,
                }
            })
            .collect()
    }
}
