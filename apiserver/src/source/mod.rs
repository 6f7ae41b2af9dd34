//! Where a cluster's state comes from: the Kubernetes API (`kubernetes`, kube-rs watchers and
//! reflectors) or a directory of Kubernetes-shaped manifests (`manifests`, for the lab and
//! tests). Both publish the same [`Snapshot`]s; the exporter cannot tell them apart.

pub mod kubernetes;
pub mod manifests;
pub mod objects;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use objects::{Object, ObjectKey};

/// Every object the source currently holds, by kind, keyed by (namespace, name).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Arc<objects::Namespace>>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Arc<objects::Node>>,
    /// CiliumNodes by name.
    pub cilium_nodes: BTreeMap<String, Arc<objects::CiliumNode>>,
    /// CiliumIdentities by name.
    pub cilium_identities: BTreeMap<String, Arc<objects::CiliumIdentity>>,
    /// Pods.
    pub pods: BTreeMap<(String, String), Arc<objects::Pod>>,
    /// Services.
    pub services: BTreeMap<(String, String), Arc<objects::Service>>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<(String, String), Arc<objects::EndpointSlice>>,
    /// ServiceExports.
    pub service_exports: BTreeMap<(String, String), Arc<objects::ServiceExport>>,
    /// CiliumEndpoints.
    pub cilium_endpoints: BTreeMap<(String, String), Arc<objects::CiliumEndpoint>>,
    /// CiliumEndpointSlices by name (cluster-scoped).
    pub cilium_endpoint_slices: BTreeMap<String, Arc<objects::CiliumEndpointSlice>>,
    /// CustomResourceDefinitions by name (`<plural>.<group>`).
    pub crds: BTreeMap<String, Arc<objects::CustomResourceDefinition>>,
    /// Policies: (kind, namespace, name).
    pub policies: BTreeMap<(String, String, String), Arc<objects::Policy>>,
    /// Objects of kinds we do not export.
    pub others: usize,
}

impl Snapshot {
    /// Adds (or replaces) an object.
    pub fn insert(&mut self, obj: Object) {
        let k = obj.key();
        let nn = (k.namespace.clone(), k.name.clone());
        match obj {
            Object::Namespace(o) => {
                self.namespaces.insert(k.name, o);
            }
            Object::Node(o) => {
                self.nodes.insert(k.name, o);
            }
            Object::CiliumNode(o) => {
                self.cilium_nodes.insert(k.name, o);
            }
            Object::CiliumIdentity(o) => {
                self.cilium_identities.insert(k.name, o);
            }
            Object::Pod(o) => {
                self.pods.insert(nn, o);
            }
            Object::Service(o) => {
                self.services.insert(nn, o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(nn, o);
            }
            Object::ServiceExport(o) => {
                self.service_exports.insert(nn, o);
            }
            Object::CiliumEndpoint(o) => {
                self.cilium_endpoints.insert(nn, o);
            }
            Object::CiliumEndpointSlice(o) => {
                self.cilium_endpoint_slices.insert(k.name, o);
            }
            Object::CustomResourceDefinition(o) => {
                self.crds.insert(k.name, o);
            }
            Object::CiliumNetworkPolicy(o) | Object::NetworkPolicy(o) => {
                self.policies.insert((k.kind, k.namespace, k.name), o);
            }
            Object::Other { .. } => self.others += 1,
        }
    }

    /// Removes the object `kind` `namespace`/`name` (`namespace` empty when cluster-scoped),
    /// if present.
    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) {
        let nn = (namespace.to_string(), name.to_string());
        match kind {
            "Namespace" => {
                self.namespaces.remove(name);
            }
            "Node" => {
                self.nodes.remove(name);
            }
            "CiliumNode" => {
                self.cilium_nodes.remove(name);
            }
            "CiliumIdentity" => {
                self.cilium_identities.remove(name);
            }
            "Pod" => {
                self.pods.remove(&nn);
            }
            "Service" => {
                self.services.remove(&nn);
            }
            "EndpointSlice" => {
                self.endpoint_slices.remove(&nn);
            }
            "ServiceExport" => {
                self.service_exports.remove(&nn);
            }
            "CiliumEndpoint" => {
                self.cilium_endpoints.remove(&nn);
            }
            "CiliumEndpointSlice" => {
                self.cilium_endpoint_slices.remove(name);
            }
            "CustomResourceDefinition" => {
                self.crds.remove(name);
            }
            "CiliumNetworkPolicy" | "NetworkPolicy" => {
                self.policies.remove(&(kind.to_string(), nn.0, nn.1));
            }
            _ => {}
        }
    }

    /// Total number of objects.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.nodes.len()
            + self.cilium_nodes.len()
            + self.cilium_identities.len()
            + self.pods.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.service_exports.len()
            + self.cilium_endpoints.len()
            + self.cilium_endpoint_slices.len()
            + self.crds.len()
            + self.policies.len()
            + self.others
    }

    /// Whether the snapshot holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
