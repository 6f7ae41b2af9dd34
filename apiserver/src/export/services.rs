//! Global services, MCS-API service exports, and the local agents' services and policies.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use clustermesh_types::kvstore;
use clustermesh_types::model::{
    BackendZone, ClusterService, L4Addr, PortConfiguration, ServiceExport, ServiceExportPort,
    SessionAffinityConfig,
};
use serde::Serialize;
use tracing::warn;

use crate::source::objects::{self, IntOrString};
use crate::source::Snapshot;

use super::endpoints::{pod_ips, pod_is_endpoint};
use super::{Desired, Exporter, Problem, ProblemKind, Store};

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

impl Exporter {
    /// The stores that depend on services and policies: global services, MCS exports, and
    /// the local agents' services and policies. Independent of [`Exporter::compute_endpoints`],
    /// so the two can overlap with writing.
    pub fn compute_services(&mut self, snap: &Snapshot) -> (Desired, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut desired: Desired = [
            Store::Services,
            Store::ServiceExports,
            Store::EndpointSlices,
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
            let (global, local) = self.service_values(snap, &index, ns, name, svc, &mut problems);
            if let Some(v) = global {
                desired
                    .entry(Store::Services)
                    .or_default()
                    .insert(kvstore::service_key(&cluster, ns, name), v);
            }
            if let Some(v) = local {
                desired
                    .entry(Store::LocalServices)
                    .or_default()
                    .insert(kvstore::local_service_key(ns, name), v);
            }
        }

        // EndpointSlices of the exported services (service v2).
        if self.opts.service_v2.exports_endpoint_slices() {
            let slices = self.endpoint_slices(snap, &index, &mut problems);
            desired.insert(Store::EndpointSlices, slices);
        }

        // MCS-API service exports: only while the ServiceExport CRD exists (as in a cluster,
        // where none can exist without it), and only of global namespaces.
        for ((ns, name), se) in &snap.service_exports {
            if let Some(v) = self.service_export_value(snap, ns, name, se) {
                desired
                    .entry(Store::ServiceExports)
                    .or_default()
                    .insert(kvstore::service_export_key(&cluster, ns, name), v);
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

    /// One service's values: `services/v1` (when exported) and `clustermesh/local`.
    pub(super) fn service_values(
        &self,
        snap: &Snapshot,
        index: &LabelIndex,
        ns: &str,
        name: &str,
        svc: &objects::Service,
        problems: &mut Vec<Problem>,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        {
            let Some(cs) = self.cluster_service(snap, index, ns, name, svc) else {
                return (None, None);
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
                            kind: ProblemKind::Invalid,
                            object: format!("Service/{ns}/{name}"),
                            message: format!("unknown affinity {other:?}, treated as none"),
                        });
                        "none"
                    }
                };
            let global = (self.opts.service_v2.exports_services()
                && self.service_exported(snap, ns, svc))
            .then(|| cs.encode());
            let local = LocalService {
                headless: is_headless(svc),
                type_: svc.spec.type_.clone().unwrap_or_else(|| "ClusterIP".into()),
                session_affinity: svc.spec.session_affinity.clone().unwrap_or_default(),
                affinity: affinity.into(),
                service: cs,
            };
            (global, serde_json::to_vec(&local).ok())
        }
    }

    /// One MCS-API ServiceExport's value: only while the ServiceExport CRD exists (as in a
    /// cluster, where none can exist without it), of a service that exists and is not
    /// ExternalName, in a global namespace.
    pub(super) fn service_export_value(
        &mut self,
        snap: &Snapshot,
        ns: &str,
        name: &str,
        se: &objects::ServiceExport,
    ) -> Option<Vec<u8>> {
        let cluster = self.opts.cluster.name.as_str().to_string();
        if !(self.opts.enable_mcs_api && self.service_export_crd(snap)) {
            return None;
        }
        {
            {
                let svc = snap.services.get(&(ns.to_string(), name.to_string()))?;
                if svc.spec.type_.as_deref() == Some("ExternalName")
                    || !self.namespace_global(snap, ns)
                {
                    return None;
                }
                let ts = match &se.metadata.creation_timestamp {
                    Some(t) => t.clone(),
                    None => self.allocator.export_time(&format!("{ns}/{name}"), || {
                        clustermesh_types::model::format_rfc3339(std::time::SystemTime::now())
                    }),
                };
                let value = ServiceExport {
                    cluster: cluster.clone(),
                    name: name.to_string(),
                    namespace: ns.to_string(),
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
                Some(value.encode())
            }
        }
    }

    pub(super) fn cluster_service(
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

/// (namespace, label key, label value) → pods carrying it.
pub(super) type LabelIndex = HashMap<(String, String, String), Vec<(String, String)>>;

pub(super) fn label_index(snap: &Snapshot) -> LabelIndex {
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

pub(super) fn is_headless(svc: &objects::Service) -> bool {
    svc.spec.cluster_ip.as_deref() == Some("None")
}

pub(super) fn pod_ready(pod: &objects::Pod) -> bool {
    pod.status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
        .unwrap_or(true)
}
