//! The Kubernetes-shaped objects the apiserver understands, as much of each as it needs.
//! Unknown fields are ignored; unknown kinds are kept as [`Object::Other`] so a manifest
//! directory may hold anything a cluster has.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

/// Object metadata.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Meta {
    /// Name.
    pub name: String,
    /// Namespace ("" for cluster-scoped objects).
    pub namespace: Option<String>,
    /// Labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations.
    pub annotations: Option<BTreeMap<String, String>>,
    /// UID.
    pub uid: Option<String>,
    /// RFC3339 creation time.
    pub creation_timestamp: Option<String>,
    /// Owners.
    pub owner_references: Option<Vec<OwnerReference>>,
}

impl Meta {
    /// Namespace; a namespaced object without one lives in `default`, as in Kubernetes.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
    /// An annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
    /// Labels, empty if none.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.labels.clone().unwrap_or_default()
    }
}

/// An owner reference.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct OwnerReference {
    /// Kind of the owner.
    pub kind: String,
    /// Name of the owner.
    pub name: String,
    /// UID of the owner.
    pub uid: String,
}

/// `v1/Namespace`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Namespace {
    /// Metadata.
    pub metadata: Meta,
}

/// `v1/Node`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Node {
    /// Metadata.
    pub metadata: Meta,
    /// Spec.
    pub spec: NodeSpec,
    /// Status.
    pub status: NodeStatus,
}

/// Node spec.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeSpec {
    /// Primary pod CIDR.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    /// All pod CIDRs.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

/// Node status.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStatus {
    /// Addresses.
    pub addresses: Vec<NodeAddress>,
    /// Node info.
    pub node_info: Option<NodeInfo>,
}

/// A node address, parsed here once: the export uses the typed address and never parses
/// the text again.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeAddress {
    /// InternalIP, ExternalIP, Hostname, …
    #[serde(rename = "type")]
    pub type_: String,
    /// The address when it is an IP address; `None` for a hostname (type `Hostname`) or
    /// text that is not an address (such entries are not exported).
    #[serde(deserialize_with = "ip_or_none")]
    pub address: Option<std::net::IpAddr>,
}

/// An IP address, or `None` for any other text (a node's `Hostname` entry).
fn ip_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::IpAddr>, D::Error> {
    let text: Option<std::borrow::Cow<'de, str>> = Deserialize::deserialize(d)?;
    Ok(text.and_then(|t| t.parse().ok()))
}

/// Node info.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeInfo {
    /// Boot ID.
    #[serde(rename = "bootID")]
    pub boot_id: String,
}

/// `v1/Pod`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Pod {
    /// Metadata.
    pub metadata: Meta,
    /// Spec.
    pub spec: PodSpec,
    /// Status.
    pub status: PodStatus,
}

/// Pod spec.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    /// Node it runs on.
    pub node_name: String,
    /// Service account.
    pub service_account_name: Option<String>,
    /// Host network pods get no identity of their own.
    pub host_network: bool,
    /// Containers (for named ports).
    pub containers: Vec<Container>,
}

/// A container.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Container {
    /// Name.
    pub name: String,
    /// Ports.
    pub ports: Vec<ContainerPort>,
}

/// A container port.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerPort {
    /// Optional name.
    pub name: Option<String>,
    /// Port number.
    pub container_port: u16,
    /// TCP (default), UDP, SCTP.
    pub protocol: Option<String>,
}

/// Pod status.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    /// Phase.
    pub phase: Option<String>,
    /// Node address.
    #[serde(rename = "hostIP")]
    pub host_ip: Option<String>,
    /// Primary pod IP.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// All pod IPs.
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
    /// Conditions (Ready).
    pub conditions: Option<Vec<Condition>>,
}

/// A pod IP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// A status condition.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Condition {
    /// Type.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True" / "False".
    pub status: String,
}

/// `v1/Service`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Service {
    /// Metadata.
    pub metadata: Meta,
    /// Spec.
    pub spec: ServiceSpec,
}

/// Service spec.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceSpec {
    /// ClusterIP, NodePort, LoadBalancer, ExternalName.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// "None" for headless.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All cluster IPs.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Pod selector.
    pub selector: Option<BTreeMap<String, String>>,
    /// ClientIP or None.
    pub session_affinity: Option<String>,
    /// Session affinity config.
    pub session_affinity_config: Option<serde_json::Value>,
    /// IP families.
    pub ip_families: Option<Vec<String>>,
    /// Internal traffic policy.
    pub internal_traffic_policy: Option<String>,
    /// Traffic distribution.
    pub traffic_distribution: Option<String>,
    /// External name.
    pub external_name: Option<String>,
}

/// A service port.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePort {
    /// Name ("" allowed for a single port).
    pub name: Option<String>,
    /// TCP (default), UDP, SCTP.
    pub protocol: Option<String>,
    /// Port.
    pub port: u16,
    /// Target port: number or container port name.
    pub target_port: Option<IntOrString>,
    /// App protocol.
    pub app_protocol: Option<String>,
}

/// An int-or-string field.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(u16),
    /// A name.
    String(String),
}

/// `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSlice {
    /// Metadata (label `kubernetes.io/service-name`).
    pub metadata: Meta,
    /// IPv4, IPv6, FQDN.
    pub address_type: String,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
    /// Ports.
    pub ports: Option<Vec<SlicePort>>,
}

/// An EndpointSlice endpoint.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct SliceEndpoint {
    /// Addresses.
    pub addresses: Vec<String>,
    /// Conditions.
    pub conditions: Option<SliceConditions>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Node.
    pub node_name: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Topology hints.
    pub hints: Option<SliceHints>,
}

/// EndpointSlice topology hints.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct SliceHints {
    /// Zones that should consume the endpoint.
    pub for_zones: Vec<SliceZone>,
}

/// A zone of [`SliceHints`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SliceZone {
    /// Zone name.
    pub name: String,
}

/// EndpointSlice conditions; a missing `ready` counts as ready.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SliceConditions {
    /// Ready.
    pub ready: Option<bool>,
    /// Serving.
    pub serving: Option<bool>,
    /// Terminating.
    pub terminating: Option<bool>,
}

/// An EndpointSlice port.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SlicePort {
    /// Name.
    pub name: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// Protocol.
    pub protocol: Option<String>,
    /// Application protocol.
    #[serde(rename = "appProtocol")]
    pub app_protocol: Option<String>,
}

/// `multicluster.x-k8s.io/ServiceExport`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServiceExport {
    /// Metadata.
    pub metadata: Meta,
    /// Spec.
    pub spec: ServiceExportSpec,
}

/// ServiceExport spec.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceExportSpec {
    /// Annotations to export.
    pub exported_annotations: Option<BTreeMap<String, String>>,
    /// Labels to export.
    pub exported_labels: Option<BTreeMap<String, String>>,
}

/// `cilium.io/v2/CiliumNode`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumNode {
    /// Metadata.
    pub metadata: Meta,
    /// Spec.
    pub spec: CiliumNodeSpec,
}

/// CiliumNode spec.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumNodeSpec {
    /// Addresses.
    pub addresses: Vec<CiliumNodeAddress>,
    /// Boot ID.
    pub bootid: Option<String>,
    /// Encryption.
    pub encryption: Option<EncryptionSpec>,
    /// Health IPs.
    pub health: Option<DualStack>,
    /// Ingress IPs.
    pub ingress: Option<DualStack>,
    /// IPAM.
    pub ipam: Option<CiliumNodeIpam>,
}

/// A CiliumNode address.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumNodeAddress {
    /// Address.
    pub ip: String,
    /// Type.
    #[serde(rename = "type")]
    pub type_: String,
}

/// Encryption settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct EncryptionSpec {
    /// Key index.
    pub key: u8,
}

/// An IPv4/IPv6 pair.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct DualStack {
    /// IPv4.
    pub ipv4: Option<String>,
    /// IPv6.
    pub ipv6: Option<String>,
}

/// CiliumNode IPAM.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CiliumNodeIpam {
    /// Pod CIDRs.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

/// `cilium.io/v2/CiliumEndpoint`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumEndpoint {
    /// Metadata.
    pub metadata: Meta,
    /// Status.
    pub status: CiliumEndpointStatus,
}

/// CiliumEndpoint status.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumEndpointStatus {
    /// Encryption.
    pub encryption: Option<EncryptionSpec>,
    /// Identity.
    pub identity: Option<CepIdentity>,
    /// Named ports.
    #[serde(rename = "named-ports")]
    pub named_ports: Option<Vec<CepNamedPort>>,
    /// Networking.
    pub networking: Option<CepNetworking>,
    /// Service account.
    #[serde(rename = "service-account")]
    pub service_account: Option<String>,
}

/// CEP identity.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CepIdentity {
    /// Numeric identity.
    pub id: u32,
    /// Labels.
    pub labels: Option<Vec<String>>,
}

/// CEP named port.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CepNamedPort {
    /// Name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: String,
}

/// CEP networking.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CepNetworking {
    /// Address pairs.
    pub addressing: Vec<DualStack>,
    /// Node IP.
    pub node: String,
}

/// `cilium.io/v2alpha1/CiliumEndpointSlice`: the endpoints of one identity in one namespace,
/// batched (cluster-scoped; the namespace is a top-level field, not metadata).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumEndpointSlice {
    /// Metadata (name only).
    pub metadata: Meta,
    /// Namespace of every endpoint in the slice.
    pub namespace: String,
    /// The endpoints (Cilium's `CoreCiliumEndpoint`).
    pub endpoints: Vec<CoreCiliumEndpoint>,
}

/// One endpoint of a [`CiliumEndpointSlice`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CoreCiliumEndpoint {
    /// Endpoint (= pod) name.
    pub name: String,
    /// Security identity.
    pub id: u32,
    /// Owning pod's UID.
    #[serde(rename = "pod-uid")]
    pub pod_uid: Option<String>,
    /// Service account.
    #[serde(rename = "service-account")]
    pub service_account: Option<String>,
    /// Encryption.
    pub encryption: Option<EncryptionSpec>,
    /// Named ports.
    #[serde(rename = "named-ports")]
    pub named_ports: Option<Vec<CepNamedPort>>,
    /// Networking.
    pub networking: Option<CepNetworking>,
}

/// What the ipcache export needs of one Cilium endpoint, read from a CiliumEndpoint or
/// from one entry of a CiliumEndpointSlice (every source decodes into these objects, so
/// this is the one place that knows both shapes).
#[derive(Debug, Clone, Copy)]
pub struct CoreEndpoint<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Endpoint (= pod) name.
    pub name: &'a str,
    /// Security identity.
    pub identity: u32,
    /// Encryption key index (0 = none).
    pub encryption_key: u8,
    /// Owning pod's UID.
    pub pod_uid: Option<&'a str>,
    /// Service account.
    pub service_account: Option<&'a str>,
    /// Named ports.
    pub named_ports: &'a [CepNamedPort],
    /// Addresses and node.
    pub networking: &'a CepNetworking,
}

impl<'a> CoreEndpoint<'a> {
    /// The endpoints of CiliumEndpoints; one without networking or identity is not yet
    /// an endpoint (Cilium skips it too).
    pub fn from_endpoints(ceps: &'a BTreeMap<(String, String), Arc<CiliumEndpoint>>) -> Vec<Self> {
        ceps.iter()
            .filter_map(|((ns, name), cep)| Self::from_endpoint(ns, name, cep))
            .collect()
    }

    /// The endpoint of one CiliumEndpoint (see [`CoreEndpoint::from_endpoints`]).
    pub fn from_endpoint(ns: &'a str, name: &'a str, cep: &'a CiliumEndpoint) -> Option<Self> {
        let st = &cep.status;
        Some(CoreEndpoint {
            namespace: ns,
            name,
            identity: st.identity.as_ref()?.id,
            encryption_key: st.encryption.as_ref().map_or(0, |e| e.key),
            pod_uid: cep
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Pod")
                .map(|o| o.uid.as_str()),
            service_account: st.service_account.as_deref(),
            named_ports: st.named_ports.as_deref().unwrap_or_default(),
            networking: st.networking.as_ref()?,
        })
    }

    /// The endpoints of CiliumEndpointSlices, in slice-name order then slice order.
    pub fn from_slices(slices: &'a BTreeMap<String, Arc<CiliumEndpointSlice>>) -> Vec<Self> {
        slices
            .values()
            .flat_map(|ces| {
                ces.endpoints.iter().filter_map(|ep| {
                    Some(CoreEndpoint {
                        namespace: &ces.namespace,
                        name: &ep.name,
                        identity: ep.id,
                        encryption_key: ep.encryption.as_ref().map_or(0, |e| e.key),
                        pod_uid: ep.pod_uid.as_deref(),
                        service_account: ep.service_account.as_deref(),
                        named_ports: ep.named_ports.as_deref().unwrap_or_default(),
                        networking: ep.networking.as_ref()?,
                    })
                })
            })
            .collect()
    }
}

/// `apiextensions.k8s.io/v1/CustomResourceDefinition`, only its name: which CRDs exist
/// decides whether e.g. ServiceExports can be read at all.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CustomResourceDefinition {
    /// Metadata (`<plural>.<group>`).
    pub metadata: Meta,
}

/// `cilium.io/v2/CiliumIdentity`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CiliumIdentity {
    /// Metadata (name = numeric identity).
    pub metadata: Meta,
    /// `source:key` → value.
    #[serde(rename = "security-labels")]
    pub security_labels: BTreeMap<String, String>,
}

/// A policy (CiliumNetworkPolicy or NetworkPolicy), kept whole for the local agents.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Policy {
    /// Metadata.
    pub metadata: Meta,
    /// The object as parsed.
    #[serde(skip)]
    pub raw: serde_json::Value,
}

/// Any object the source may hold. Objects are shared (`Arc`) so that building a snapshot
/// of 10k pods clones pointers, not pods.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// Namespace.
    Namespace(Arc<Namespace>),
    /// Node.
    Node(Arc<Node>),
    /// Pod.
    Pod(Arc<Pod>),
    /// Service.
    Service(Arc<Service>),
    /// EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// ServiceExport.
    ServiceExport(Arc<ServiceExport>),
    /// CiliumNode.
    CiliumNode(Arc<CiliumNode>),
    /// CiliumEndpoint.
    CiliumEndpoint(Arc<CiliumEndpoint>),
    /// CiliumIdentity.
    CiliumIdentity(Arc<CiliumIdentity>),
    /// CiliumEndpointSlice.
    CiliumEndpointSlice(Arc<CiliumEndpointSlice>),
    /// CustomResourceDefinition.
    CustomResourceDefinition(Arc<CustomResourceDefinition>),
    /// CiliumNetworkPolicy.
    CiliumNetworkPolicy(Arc<Policy>),
    /// NetworkPolicy.
    NetworkPolicy(Arc<Policy>),
    /// Anything else (kept, not exported).
    Other {
        /// Kind.
        kind: String,
        /// Metadata.
        metadata: Meta,
    },
}

/// Identifies an object: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Kind.
    pub kind: String,
    /// Namespace or "".
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    /// Decodes one YAML document straight into the typed object (no JSON detour, except for
    /// policies, which are kept whole as JSON).
    pub fn from_yaml(v: serde_yaml::Value) -> Result<Object, String> {
        fn de<T: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Result<T, String> {
            serde_yaml::from_value(v).map_err(|e| e.to_string())
        }
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| "object has no `kind`".to_string())?
            .to_string();
        let name_ok = v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(|n| !n.is_empty())
            .unwrap_or(false);
        if !name_ok {
            return Err(format!("{kind} has no metadata.name"));
        }
        Ok(match kind.as_str() {
            "Namespace" => Object::Namespace(Arc::new(de(v)?)),
            "Node" => Object::Node(Arc::new(de(v)?)),
            "Pod" => Object::Pod(Arc::new(de(v)?)),
            "Service" => Object::Service(Arc::new(de(v)?)),
            "EndpointSlice" => Object::EndpointSlice(Arc::new(de(v)?)),
            "ServiceExport" => Object::ServiceExport(Arc::new(de(v)?)),
            "CiliumNode" => Object::CiliumNode(Arc::new(de(v)?)),
            "CiliumEndpoint" => Object::CiliumEndpoint(Arc::new(de(v)?)),
            "CiliumIdentity" => Object::CiliumIdentity(Arc::new(de(v)?)),
            "CiliumEndpointSlice" => Object::CiliumEndpointSlice(Arc::new(de(v)?)),
            "CustomResourceDefinition" => Object::CustomResourceDefinition(Arc::new(de(v)?)),
            _ => {
                let json = serde_json::to_value(&v)
                    .map_err(|e| format!("not representable as JSON: {e}"))?;
                Object::from_value(json)?
            }
        })
    }

    /// Decodes one JSON document whose `kind` was already read, straight into its type.
    pub fn from_json_str(kind: Option<&str>, raw: &str) -> Result<Object, String> {
        fn de<T: serde::de::DeserializeOwned>(raw: &str) -> Result<Arc<T>, String> {
            serde_json::from_str(raw)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        }
        let obj = match kind {
            Some("Namespace") => Object::Namespace(de(raw)?),
            Some("Node") => Object::Node(de(raw)?),
            Some("Pod") => Object::Pod(de(raw)?),
            Some("Service") => Object::Service(de(raw)?),
            Some("EndpointSlice") => Object::EndpointSlice(de(raw)?),
            Some("ServiceExport") => Object::ServiceExport(de(raw)?),
            Some("CiliumNode") => Object::CiliumNode(de(raw)?),
            Some("CiliumEndpoint") => Object::CiliumEndpoint(de(raw)?),
            Some("CiliumIdentity") => Object::CiliumIdentity(de(raw)?),
            Some("CiliumEndpointSlice") => Object::CiliumEndpointSlice(de(raw)?),
            Some("CustomResourceDefinition") => Object::CustomResourceDefinition(de(raw)?),
            _ => {
                let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
                return Object::from_value(v);
            }
        };
        if obj.key().name.is_empty() {
            return Err(format!("{} has no metadata.name", obj.key().kind));
        }
        Ok(obj)
    }

    /// Decodes one document (already parsed as JSON-compatible value).
    pub fn from_value(v: serde_json::Value) -> Result<Object, String> {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| "object has no `kind`".to_string())?
            .to_string();
        let name_ok = v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(|n| !n.is_empty())
            .unwrap_or(false);
        if !name_ok {
            return Err(format!("{kind} has no metadata.name"));
        }
        fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
            serde_json::from_value(v).map_err(|e| e.to_string())
        }
        Ok(match kind.as_str() {
            "Namespace" => Object::Namespace(Arc::new(de(v)?)),
            "Node" => Object::Node(Arc::new(de(v)?)),
            "Pod" => Object::Pod(Arc::new(de(v)?)),
            "Service" => Object::Service(Arc::new(de(v)?)),
            "EndpointSlice" => Object::EndpointSlice(Arc::new(de(v)?)),
            "ServiceExport" => Object::ServiceExport(Arc::new(de(v)?)),
            "CiliumNode" => Object::CiliumNode(Arc::new(de(v)?)),
            "CiliumEndpoint" => Object::CiliumEndpoint(Arc::new(de(v)?)),
            "CiliumIdentity" => Object::CiliumIdentity(Arc::new(de(v)?)),
            "CiliumEndpointSlice" => Object::CiliumEndpointSlice(Arc::new(de(v)?)),
            "CustomResourceDefinition" => Object::CustomResourceDefinition(Arc::new(de(v)?)),
            "CiliumNetworkPolicy" | "NetworkPolicy" => {
                let mut p: Policy = de(v.clone())?;
                p.raw = v;
                if kind == "NetworkPolicy" {
                    Object::NetworkPolicy(Arc::new(p))
                } else {
                    Object::CiliumNetworkPolicy(Arc::new(p))
                }
            }
            _ => Object::Other {
                metadata: serde_json::from_value(v.get("metadata").cloned().unwrap_or_default())
                    .map_err(|e| e.to_string())?,
                kind,
            },
        })
    }

    /// Kind, namespace and name.
    pub fn key(&self) -> ObjectKey {
        let (kind, meta): (&str, &Meta) = match self {
            Object::Namespace(o) => ("Namespace", &o.metadata),
            Object::Node(o) => ("Node", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::ServiceExport(o) => ("ServiceExport", &o.metadata),
            Object::CiliumNode(o) => ("CiliumNode", &o.metadata),
            Object::CiliumEndpoint(o) => ("CiliumEndpoint", &o.metadata),
            Object::CiliumIdentity(o) => ("CiliumIdentity", &o.metadata),
            Object::CiliumEndpointSlice(o) => ("CiliumEndpointSlice", &o.metadata),
            Object::CustomResourceDefinition(o) => ("CustomResourceDefinition", &o.metadata),
            Object::CiliumNetworkPolicy(o) => ("CiliumNetworkPolicy", &o.metadata),
            Object::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata),
            Object::Other { kind, metadata } => (kind.as_str(), metadata),
        };
        let cluster_scoped = matches!(
            kind,
            "Namespace"
                | "Node"
                | "CiliumNode"
                | "CiliumIdentity"
                | "CiliumEndpointSlice"
                | "CustomResourceDefinition"
        );
        ObjectKey {
            kind: kind.to_string(),
            namespace: if cluster_scoped {
                String::new()
            } else {
                meta.ns().to_string()
            },
            name: meta.name.clone(),
        }
    }
}
