//! Remote EndpointSlices ("ClusterMesh service v2") folded into one [`ClusterService`] per
//! remote cluster and service, so the [`super::merger::Merger`] treats a remote that exports
//! only EndpointSlices (`endpointslices-only`) exactly like one that exports ClusterServices.
//!
//! A service's backends are the addresses of its slices' **ready** endpoints (a missing
//! `ready` is ready, as in Kubernetes) with the slice's ports by name; hostnames and zones
//! come along. A slice is exported only for a global, shared service, so the folded service
//! is global and shared. The syncer hands the agent one store per remote (the one the remote
//! prefers), so a service never arrives both ways. This module must not decide anything
//! about merging (affinity, conflicts): that is the merger's.

use std::collections::BTreeMap;
use std::sync::Arc;

use clustermesh_types::model::{
    AddrMap, BackendZone, ClusterService, EndpointSlice, ForZone, L4Addr, PortConfiguration,
};

use super::merger::Name;

/// Every remote cluster's EndpointSlices, by the service they belong to.
#[derive(Debug, Default)]
pub struct RemoteSlices {
    /// (cluster, service) → slice name → slice.
    by_service: BTreeMap<(String, Name), BTreeMap<String, Arc<EndpointSlice>>>,
    /// (cluster, namespace, slice name) → the service it was filed under, so a slice that
    /// moves to another service leaves the old one.
    owner: BTreeMap<(String, String, String), Name>,
}

impl RemoteSlices {
    /// A slice of `cluster` was written (`present`) or deleted. Returns every service whose
    /// folded view changed, with that view (`None`: no slice of it is left).
    pub fn set(
        &mut self,
        cluster: &str,
        slice: &Arc<EndpointSlice>,
        present: bool,
    ) -> Vec<(Name, Option<Arc<ClusterService>>)> {
        let slot = (
            cluster.to_owned(),
            slice.namespace.clone(),
            slice.name.clone(),
        );
        let mut touched = Vec::new();
        if let Some(old) = self.owner.remove(&slot) {
            if let Some(m) = self.by_service.get_mut(&(cluster.to_owned(), old.clone())) {
                m.remove(&slice.name);
            }
            touched.push(old);
        }
        let service = slice
            .service_name()
            .filter(|s| !s.is_empty())
            .map(|s| Name::new(&slice.namespace, s));
        if let (true, Some(name)) = (present, service) {
            self.by_service
                .entry((cluster.to_owned(), name.clone()))
                .or_default()
                .insert(slice.name.clone(), slice.clone());
            self.owner.insert(slot, name.clone());
            if !touched.contains(&name) {
                touched.push(name);
            }
        }
        touched
            .into_iter()
            .map(|name| {
                let key = (cluster.to_owned(), name.clone());
                let view = match self.by_service.get(&key) {
                    Some(slices) if !slices.is_empty() => {
                        Some(Arc::new(fold(cluster, &name, slices)))
                    }
                    _ => {
                        self.by_service.remove(&key);
                        None
                    }
                };
                (name, view)
            })
            .collect()
    }

    /// A remote cluster left: forget its slices (the merger drops its services).
    pub fn drop_cluster(&mut self, cluster: &str) {
        self.by_service.retain(|(c, _), _| c != cluster);
        self.owner.retain(|(c, _, _), _| c != cluster);
    }
}

/// One service's slices as the ClusterService the cluster would have exported.
fn fold(
    cluster: &str,
    name: &Name,
    slices: &BTreeMap<String, Arc<EndpointSlice>>,
) -> ClusterService {
    let mut backends: BTreeMap<String, PortConfiguration> = BTreeMap::new();
    let mut hostnames = BTreeMap::new();
    let mut zones = BTreeMap::new();
    let mut cluster_id = 0;
    for slice in slices.values() {
        cluster_id = slice.cluster_id;
        let ports: PortConfiguration = slice
            .ports
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    L4Addr {
                        protocol: p.protocol.as_str().into(),
                        port: p.port,
                    },
                )
            })
            .collect();
        for ep in slice.endpoints.iter().filter(|e| e.conditions.is_ready()) {
            for addr in &ep.addresses {
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
                            for_zones: ep
                                .hints
                                .iter()
                                .flat_map(|h| &h.for_zones)
                                .map(|f| ForZone {
                                    name: f.name.clone(),
                                })
                                .collect(),
                        },
                    );
                }
            }
        }
    }
    ClusterService {
        cluster: cluster.to_owned(),
        namespace: name.namespace.clone(),
        name: name.name.clone(),
        frontends: AddrMap::new(),
        backends: backends.into_iter().collect(),
        hostnames,
        zones,
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        include_external: true,
        shared: true,
        cluster_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_types::model::endpoint_slice::{Conditions, Endpoint, Port};

    fn slice(name: &str, service: &str, endpoints: &[(&str, Option<bool>)]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            cluster: "c2".into(),
            cluster_id: 2,
            namespace: "default".into(),
            name: name.into(),
            labels: BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )]),
            address_type: "IPv4".into(),
            endpoints: endpoints
                .iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![a.to_string()],
                    conditions: Conditions {
                        ready: *ready,
                        ..Default::default()
                    },
                    zone: Some("z1".into()),
                    ..Default::default()
                })
                .collect(),
            ports: vec![Port {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 8080,
                app_protocol: None,
            }],
        })
    }

    fn backends(cs: &ClusterService) -> Vec<String> {
        cs.backends.iter().map(|(a, _)| a.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_of_every_slice_become_backends() {
        let mut s = RemoteSlices::default();
        let a = slice(
            "echo-a",
            "echo",
            &[("10.2.1.10", Some(true)), ("10.2.1.11", Some(false))],
        );
        let changed = s.set("c2", &a, true);
        assert_eq!(changed.len(), 1);
        let (name, cs) = &changed[0];
        assert_eq!(name, &Name::new("default", "echo"));
        let cs = cs.as_ref().unwrap();
        assert_eq!(backends(cs), ["10.2.1.10"]);
        assert!(cs.include_external && cs.shared);
        assert_eq!((cs.cluster.as_str(), cs.cluster_id), ("c2", 2));
        let ports = cs.backends.iter().next().unwrap().1;
        assert_eq!(
            ports.iter().next().map(|(n, a)| (n.to_string(), a.port)),
            Some(("http".to_string(), 8080))
        );
        assert_eq!(cs.zones["10.2.1.10"].zone, "z1");

        // A second slice adds its backends (missing `ready` = ready).
        let b = slice("echo-b", "echo", &[("10.2.2.10", None)]);
        let cs = s.set("c2", &b, true).remove(0).1.unwrap();
        assert_eq!(backends(&cs), ["10.2.1.10", "10.2.2.10"]);

        // Deleting both leaves nothing.
        s.set("c2", &a, false);
        let (_, cs) = s.set("c2", &b, false).remove(0);
        assert!(cs.is_none());
        assert!(s.by_service.is_empty() && s.owner.is_empty());
    }

    #[test]
    fn a_slice_moving_to_another_service_leaves_the_old_one() {
        let mut s = RemoteSlices::default();
        s.set("c2", &slice("x", "old", &[("10.2.0.1", None)]), true);
        let changed = s.set("c2", &slice("x", "new", &[("10.2.0.1", None)]), true);
        let names: Vec<String> = changed.iter().map(|(n, _)| n.name.clone()).collect();
        assert_eq!(names, ["old", "new"]);
        assert!(changed[0].1.is_none());
        assert_eq!(backends(changed[1].1.as_ref().unwrap()), ["10.2.0.1"]);
        s.drop_cluster("c2");
        assert!(s.by_service.is_empty() && s.owner.is_empty());
    }
}
