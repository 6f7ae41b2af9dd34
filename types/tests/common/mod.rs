//! Literal etcd values from Cilium's clustermesh-apiserver testdata
//! (`clustermesh-apiserver/clustermesh/testdata/*.txtar`), compacted.
#![allow(dead_code)]

pub const NODE_1: &str = r#"{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},{"Type":"InternalIP","IP":"fc00:c111::2"},{"Type":"CiliumInternalIP","IP":"10.244.0.10"},{"Type":"CiliumInternalIP","IP":"fd00:10:244::e2d6"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.0.134","IPv6HealthIP":"fd00:10:244::d812","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":{"kubernetes.io/hostname":"test-node-1"},"Annotations":{"network.cilium.io/wg-pub-key":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI="},"WireguardPubKey":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI=","BootID":"570d3fd1-93db-4862-ba99-6a3c2c10c38f"}"#;

pub const NODE_2: &str = r#"{"Name":"test-node-2","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.3"},{"Type":"InternalIP","IP":"fc00:c111::3"},{"Type":"CiliumInternalIP","IP":"10.244.1.130"},{"Type":"CiliumInternalIP","IP":"fd00:10:244:1::9089"}],"IPv4AllocCIDR":{"IP":"10.244.1.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244:1::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.1.153","IPv6HealthIP":"fd00:10:244:1::835d","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":7,"Labels":{"kubernetes.io/hostname":"test-node-2"},"Annotations":null,"WireguardPubKey":"","BootID":"c1d2cda2-aca0-4033-abca-3843298860b9"}"#;

pub const CLUSTER_CONFIG_3: &str = r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;
pub const CLUSTER_CONFIG_5_MCS: &str = r#"{"id":5,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":true}}"#;
pub const CLUSTER_CONFIG_KVSTOREMESH: &str = r#"{"id":3,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;
pub const CLUSTER_CONFIG_ES_ONLY: &str = r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false,"endpointSlicesExportMode":"endpointslices-only"}}"#;

pub const SERVICE_ALPHA: &str = r#"{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;
pub const SERVICE_BETA: &str = r#"{"cluster":"cluster3","namespace":"ns-beta","name":"echo-service","frontends":{"10.96.0.20":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.2.10":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;

pub const EXPORT_BASIC: &str = r#"{"cluster":"cluster1","name":"basic","namespace":"default","annotations":{"my-annotation":"foo"},"labels":{"my-label":"test"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"my-port-1","protocol":"TCP","port":80}],"type":"ClusterSetIP","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":42}}}"#;
pub const EXPORT_HEADLESS: &str = r#"{"cluster":"cluster1","name":"headless","namespace":"default","exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"http","protocol":"TCP","port":80}],"type":"Headless","sessionAffinity":""}"#;

/// endpointslices.txtar (`endpointslices-1.expected`), compact.
pub const ENDPOINT_SLICE: &str = r#"{"cluster":"cluster3","clusterID":3,"namespace":"test","name":"echo-kvlm2","labels":{"kubernetes.io/service-name":"echo"},"addressType":"IPv4","endpoints":[{"addresses":["10.244.1.1"],"conditions":{"ready":true,"serving":true,"terminating":false},"nodeName":"nodeport-worker","zone":"zone1","hints":{"forZones":[{"name":"zone1"}]}},{"addresses":["10.244.1.2"],"conditions":{"ready":false,"serving":false,"terminating":false},"nodeName":"nodeport-worker"}],"ports":[{"name":"http","protocol":"TCP","port":8080}]}"#;

/// ciliumendpoints.txtar: newest format, no `Mask`, with `K8sPodUID` and named ports.
pub const IP_NEW_V4: &str = r#"{"IP":"10.244.2.74","HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-002","K8sPodUID":"cep-pod-uid","K8sServiceAccount":"default","NamedPorts":[{"Name":"http","Port":8080,"Protocol":"TCP"},{"Name":"dns","Port":53,"Protocol":"UDP"}]}"#;
pub const IP_NEW_V6: &str = r#"{"IP":"fd00:10:244:2::e024","HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-002","K8sPodUID":"cep-pod-uid","K8sServiceAccount":"default","NamedPorts":[{"Name":"http","Port":8080,"Protocol":"TCP"},{"Name":"dns","Port":53,"Protocol":"UDP"}]}"#;
pub const IP_NEW_PLAIN: &str = r#"{"IP":"10.244.1.79","HostIP":"172.18.0.3","ID":199472,"Key":0,"Metadata":"","K8sNamespace":"foo","K8sPodName":"cep-001","K8sServiceAccount":"default"}"#;
/// globalnamespace.txtar: older format with `"Mask":null`.
pub const IP_OLD_NULL_MASK: &str = r#"{"IP":"10.244.2.74","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"quixote","K8sPodName":"cep-002","K8sServiceAccount":"default"}"#;
pub const IP_OLD_NULL_MASK_V6: &str = r#"{"IP":"fd00:10:244:1::d643","Mask":null,"HostIP":"172.18.0.3","ID":199472,"Key":0,"Metadata":"","K8sNamespace":"don","K8sPodName":"cep-001","K8sServiceAccount":"default"}"#;

pub const IDENTITY_1: &str =
    "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;";
pub const IDENTITY_2: &str =
    "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=foo;";
pub const IDENTITY_1_V2: &str =
    "k8s:app=fred;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;";

pub const KEYS: &[&str] = &[
    "cilium/state/nodes/v1/cluster3/test-node-1",
    "cilium/state/identities/v1/id/196915",
    "cilium/state/ip/v1/default/10.244.1.79",
    "cilium/state/ip/v1/default/fd00:10:244:1::d643",
    "cilium/state/ip/v1/default/10.0.0.0/8",
    "cilium/state/services/v1/cluster3/ns-alpha/echo-service",
    "cilium/state/serviceexports/v1/cluster1/default/basic",
    "cilium/state/endpointslices/v1/cluster3/test/echo-kvlm2",
    "cilium/cluster-config/cluster3",
    "cilium/synced/cluster3/cilium/state/ip/v1",
];

/// Every JSON literal above, for the mutation test.
pub const JSON_VALUES: &[&str] = &[
    NODE_1,
    NODE_2,
    CLUSTER_CONFIG_3,
    CLUSTER_CONFIG_KVSTOREMESH,
    CLUSTER_CONFIG_ES_ONLY,
    SERVICE_ALPHA,
    EXPORT_BASIC,
    EXPORT_HEADLESS,
    ENDPOINT_SLICE,
    IP_NEW_V4,
    IP_NEW_V6,
    IP_OLD_NULL_MASK,
];
