//! Round trips on the literal values Cilium writes (reference §2.2–2.7 and the
//! clustermesh-apiserver testdata).

mod common;

use std::collections::BTreeMap;

use clustermesh_types::identity::{Label, LabelArray, CLUSTER_LABEL, NAMESPACE_LABEL};
use clustermesh_types::kvstore;
use clustermesh_types::model::{
    BackendZone, Cidr, ClusterConfig, ClusterService, EndpointSlice, ForZone, IpIdentityPair,
    L4Addr, Node, ServiceExport, ServiceExportPort, Value,
};
use common::*;

fn assert_byte_exact<T: Value + std::fmt::Debug>(literal: &str) -> T {
    let v = T::decode(literal.as_bytes()).unwrap_or_else(|e| panic!("{}: {e:?}", T::KIND));
    assert_eq!(
        String::from_utf8(v.encode()).unwrap(),
        literal,
        "{} re-encoding differs",
        T::KIND
    );
    v
}

#[test]
fn cluster_config_byte_exact() {
    let c: ClusterConfig = assert_byte_exact(CLUSTER_CONFIG_3);
    assert_eq!(c.id, 3);
    assert_eq!(c.capabilities.service_exports_enabled, Some(false));
    let c: ClusterConfig = assert_byte_exact(CLUSTER_CONFIG_5_MCS);
    assert_eq!(c.capabilities.service_exports_enabled, Some(true));
    let c: ClusterConfig = assert_byte_exact(CLUSTER_CONFIG_KVSTOREMESH);
    assert!(c.capabilities.cached);
    let c: ClusterConfig = assert_byte_exact(CLUSTER_CONFIG_ES_ONLY);
    assert_eq!(
        c.capabilities.endpoint_slices_export_mode,
        "endpointslices-only"
    );
    // Pre-1.17 writers have no serviceExportsEnabled: None, and it stays absent.
    let old: ClusterConfig =
        assert_byte_exact(r#"{"id":7,"capabilities":{"syncedCanaries":true}}"#);
    assert_eq!(old.capabilities.service_exports_enabled, None);
    assert_eq!(old.capabilities.max_connected_clusters, 0);
}

#[test]
fn node_byte_exact() {
    let n: Node = assert_byte_exact(NODE_1);
    assert_eq!(n.name, "test-node-1");
    assert_eq!(n.ip_addresses.len(), 4);
    assert_eq!(n.ip_addresses[2].type_, "CiliumInternalIP");
    assert_eq!(n.ipv4_alloc_cidr.unwrap().to_string(), "10.244.0.0/24");
    assert_eq!(n.ipv6_alloc_cidr.unwrap().to_string(), "fd00:10:244::/64");
    assert!(n.ipv4_secondary_alloc_cidrs.is_empty());
    assert_eq!(n.key_name(), "cluster3/test-node-1");
    n.validate().unwrap();
    let n: Node = assert_byte_exact(NODE_2);
    assert_eq!(n.annotations, None);
    assert_eq!(n.encryption_key, 7);
}

#[test]
fn node_decoding_is_lenient() {
    // Unknown fields, missing fields, CIDRs as strings, secondary CIDRs.
    let n = Node::decode(
        br#"{"Name":"n","Cluster":"c","Future":{"x":[1]},"IPv4AllocCIDR":"10.1.0.0/16",
             "IPv4SecondaryAllocCIDRs":["10.2.0.0/16",{"IP":"10.3.0.0","Mask":"//8AAA=="}],
             "Labels":{}}"#,
    )
    .unwrap();
    assert_eq!(
        n.ipv4_alloc_cidr,
        Some("10.1.0.0/16".parse::<Cidr>().unwrap())
    );
    assert_eq!(n.ipv4_secondary_alloc_cidrs.len(), 2);
    assert_eq!(n.ipv6_alloc_cidr, None);
    assert_eq!(n.labels, Some(BTreeMap::new()));
    let again = Node::decode(&n.encode()).unwrap();
    assert_eq!(again, n);
    let text = String::from_utf8(n.encode()).unwrap();
    assert!(
        text.contains(r#""IPv4AllocCIDR":{"IP":"10.1.0.0","Mask":"//8AAA=="}"#),
        "{text}"
    );
    assert!(text.contains(r#""IPAddresses":null"#), "{text}");
    assert!(text.contains(r#""Labels":{}"#), "{text}");
    assert!(text.contains(r#""Annotations":null"#), "{text}");

    assert!(Node::decode(br#"{"Name":"n","IPv4HealthIP":"not-an-ip"}"#).is_err());
    assert!(Node::decode(br#"{"IPv4AllocCIDR":{"IP":"10.0.0.0","Mask":"/wD/AA=="}}"#).is_err());
    assert!(Node::decode(br#"{}"#).unwrap().validate().is_err());
    let err = Node::decode(b"[").unwrap_err().to_string();
    assert!(err.contains("Node"), "{err}");
}

#[test]
fn service_byte_exact() {
    let s: ClusterService = assert_byte_exact(SERVICE_ALPHA);
    s.validate().unwrap();
    assert_eq!(
        s.frontends["10.96.0.10"]["http"],
        L4Addr {
            protocol: "TCP".into(),
            port: 80
        }
    );
    assert!(s.labels.is_empty());
    assert_eq!(s.key_name(), "cluster3/ns-alpha/echo-service");
    let _: ClusterService = assert_byte_exact(SERVICE_BETA);
}

#[test]
fn service_optional_maps_and_validation() {
    let mut s = ClusterService::decode(SERVICE_ALPHA.as_bytes()).unwrap();
    s.hostnames.insert("10.244.1.10".into(), "pod-a".into());
    s.zones.insert(
        "10.244.1.10".into(),
        BackendZone {
            zone: "zone-a".into(),
            for_zones: vec![ForZone {
                name: "zone-a".into(),
            }],
        },
    );
    let text = String::from_utf8(s.encode()).unwrap();
    assert!(
        text.contains(r#""backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}}},"hostnames":{"10.244.1.10":"pod-a"},"zones":{"10.244.1.10":{"zone":"zone-a","forZones":[{"name":"zone-a"}]}},"labels":{}"#),
        "{text}"
    );
    assert_eq!(ClusterService::decode(text.as_bytes()).unwrap(), s);

    let mut bad = s.clone();
    bad.backends.insert("not-an-ip", Default::default());
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("not-an-ip"));
    let mut bad = s;
    bad.namespace.clear();
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("namespace"));
    // null maps decode as empty and are written back as {}.
    let s = ClusterService::decode(br#"{"cluster":"c","labels":null}"#).unwrap();
    assert!(String::from_utf8(s.encode())
        .unwrap()
        .contains(r#""labels":{},"selector":{}"#));
}

#[test]
fn service_export_byte_exact() {
    let e: ServiceExport = assert_byte_exact(EXPORT_BASIC);
    e.validate().unwrap();
    assert_eq!(
        e.session_affinity_config
            .unwrap()
            .client_ip
            .unwrap()
            .timeout_seconds,
        Some(42)
    );
    let e: ServiceExport = assert_byte_exact(EXPORT_HEADLESS);
    e.validate().unwrap();
    assert_eq!(e.type_, "Headless");
    assert_eq!(e.session_affinity, "");
}

#[test]
fn endpoint_slice_byte_exact() {
    let s: EndpointSlice = assert_byte_exact(ENDPOINT_SLICE);
    s.validate().unwrap();
    assert_eq!(s.key_name(), "cluster3/test/echo-kvlm2");
    assert_eq!(s.service_name(), Some("echo"));
    assert_eq!(s.endpoints.len(), 2);
    assert_eq!(s.endpoints[1].zone, None);
    assert_eq!(
        s.endpoints[0].hints.as_ref().unwrap().for_zones,
        [ForZone {
            name: "zone1".into()
        }]
    );
}

#[test]
fn service_export_optional_fields() {
    let mut e = ServiceExport::decode(EXPORT_HEADLESS.as_bytes()).unwrap();
    e.ports.push(ServiceExportPort {
        name: "grpc".into(),
        protocol: "TCP".into(),
        app_protocol: Some("grpc".into()),
        port: 9090,
    });
    e.ip_families = vec!["IPv4".into()];
    e.internal_traffic_policy = Some("Local".into());
    e.traffic_distribution = Some("PreferClose".into());
    let text = String::from_utf8(e.encode()).unwrap();
    assert!(text.ends_with(r#"{"name":"grpc","protocol":"TCP","appProtocol":"grpc","port":9090}],"type":"Headless","sessionAffinity":"","ipFamilies":["IPv4"],"internalTrafficPolicy":"Local","trafficDistribution":"PreferClose"}"#), "{text}");
    assert_eq!(ServiceExport::decode(text.as_bytes()).unwrap(), e);
    e.validate().unwrap();

    e.traffic_distribution = Some("Nearby".into());
    assert!(e.validate().is_err());

    // Legacy Go-cased Labels/Annotations are read when the new ones are absent.
    let legacy = ServiceExport::decode(
        br#"{"cluster":"c","name":"n","namespace":"ns","Labels":{"a":"b"},"Annotations":{"c":"d"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[],"type":"ClusterSetIP","sessionAffinity":"None"}"#,
    )
    .unwrap();
    assert_eq!(legacy.labels["a"], "b");
    assert_eq!(legacy.annotations["c"], "d");
    // Bad timestamps are rejected like metav1.Time would.
    assert!(ServiceExport::decode(br#"{"exportCreationTimestamp":"yesterday"}"#).is_err());
    // A zero timestamp is null on the wire.
    let zero = ServiceExport::decode(br#"{"exportCreationTimestamp":null}"#).unwrap();
    assert!(String::from_utf8(zero.encode())
        .unwrap()
        .contains(r#""exportCreationTimestamp":null"#));
    assert!(zero.validate().is_err());
}

#[test]
fn ipcache_newest_format_byte_exact() {
    let v: IpIdentityPair = assert_byte_exact(IP_NEW_V4);
    assert_eq!(v.mask, None);
    assert_eq!(v.k8s_pod_uid, "cep-pod-uid");
    assert_eq!(v.named_ports.len(), 2);
    assert_eq!(v.named_ports[1].port, 53);
    let _: IpIdentityPair = assert_byte_exact(IP_NEW_V6);
    let _: IpIdentityPair = assert_byte_exact(IP_NEW_PLAIN);
}

#[test]
fn ipcache_variants_are_semantically_equal() {
    let null_mask = IpIdentityPair::decode(IP_OLD_NULL_MASK.as_bytes()).unwrap();
    let absent =
        IpIdentityPair::decode(IP_OLD_NULL_MASK.replace(r#""Mask":null,"#, "").as_bytes()).unwrap();
    assert_eq!(null_mask, absent);
    assert_eq!(null_mask.mask, None);
    assert_eq!(null_mask.prefix_string(), "10.244.2.74");
    // Re-encoding drops the null Mask (newest format).
    assert_eq!(
        String::from_utf8(null_mask.encode()).unwrap(),
        IP_OLD_NULL_MASK.replace(r#""Mask":null,"#, "")
    );
    // Same entry with K8sPodUID and an unknown field.
    let with_uid = IpIdentityPair::decode(
        IP_OLD_NULL_MASK
            .replace(
                r#""K8sServiceAccount""#,
                r#""K8sPodUID":"u","Future":1,"K8sServiceAccount""#,
            )
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(with_uid.k8s_pod_uid, "u");
    assert_eq!(
        IpIdentityPair {
            k8s_pod_uid: Default::default(),
            ..with_uid
        },
        null_mask
    );

    let v6 = IpIdentityPair::decode(IP_OLD_NULL_MASK_V6.as_bytes()).unwrap();
    assert_eq!(v6.prefix_string(), "fd00:10:244:1::d643");
}

#[test]
fn ipcache_key_check_and_prefixes() {
    let key = "cilium/state/ip/v1/default/10.244.2.74";
    let suffix = kvstore::parse_ip_key(key).unwrap();
    IpIdentityPair::decode_with_key(&suffix, IP_NEW_V4.as_bytes()).unwrap();
    let err = IpIdentityPair::decode_with_key("10.244.2.75", IP_NEW_V4.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("10.244.2.75"), "{err}");

    let prefix = br#"{"IP":"10.0.0.0","Mask":"/wAAAA==","HostIP":"","ID":2,"Key":0,"Metadata":""}"#;
    let v = IpIdentityPair::decode_with_key("10.0.0.0/8", prefix).unwrap();
    assert_eq!(v.prefix_len(), Some(8));
    assert_eq!(v.encode(), prefix.to_vec());
    assert_eq!(
        kvstore::ip_key(&v.prefix_string()),
        "cilium/state/ip/v1/default/10.0.0.0/8"
    );

    let mut built = IpIdentityPair::default();
    built.set_prefix(&"fd00::/48".parse().unwrap());
    assert_eq!(built.prefix_string(), "fd00::/48");

    for bad in [
        r#"{"IP":"10.0.0.0","Mask":"/wD/AA=="}"#,
        r#"{"IP":"10.0.0.0","Mask":"not base64"}"#,
        r#"{"IP":"fd00::","Mask":"/wAAAA=="}"#,
        r#"{"IP":"","HostIP":""}"#,
        r#"{"HostIP":"1.2.3.4"}"#,
        r#"{"IP":"1.2.3.4","HostIP":"x"}"#,
        r#"{"IP":"1.2.3.4","ID":-1}"#,
        r#"{"IP":"1.2.3.4","Key":256}"#,
    ] {
        assert!(IpIdentityPair::decode(bad.as_bytes()).is_err(), "{bad}");
    }
}

#[test]
fn ipcache_entries_are_parsed_once_with_their_key() {
    use clustermesh_types::model::IpcacheEntry;
    let entry = |json: &str| IpcacheEntry::new(IpIdentityPair::decode(json.as_bytes()).unwrap());
    let host = entry(IP_NEW_V4).unwrap();
    assert_eq!(host.prefix, "10.244.2.74/32".parse::<Cidr>().unwrap());
    assert_eq!(host.host, Some("172.18.0.2".parse().unwrap()));
    assert_eq!(host.k8s_pod_name, "cep-002");
    assert!(host.is_keyed_by("10.244.2.74"));
    for other in ["10.244.2.74/32", "10.244.2.7", "10.244.2.744", ""] {
        assert!(!host.is_keyed_by(other), "{other}");
    }

    let world =
        entry(r#"{"IP":"10.0.0.0","Mask":"/wAAAA==","HostIP":"","ID":2,"Key":0,"Metadata":""}"#)
            .unwrap();
    assert_eq!(world.prefix, "10.0.0.0/8".parse::<Cidr>().unwrap());
    assert_eq!(world.host, None);
    assert!(world.is_keyed_by("10.0.0.0/8"));
    for other in [
        "10.0.0.0",
        "10.0.0.0/08",
        "10.0.0.0/+8",
        "10.0.0.0/80",
        "10.0.0.0/",
    ] {
        assert!(!world.is_keyed_by(other), "{other}");
    }

    let v6 = entry(r#"{"IP":"fd00:10:244:1::d643","HostIP":"fd00::2","ID":7}"#).unwrap();
    assert_eq!(
        v6.prefix,
        "fd00:10:244:1::d643/128".parse::<Cidr>().unwrap()
    );
    assert_eq!(v6.host, Some("fd00::2".parse().unwrap()));
    assert!(v6.is_keyed_by("fd00:10:244:1::d643"));

    // A 16-byte mask on an IPv4 address (Go keys it `/120`) names no programmable prefix.
    let err = entry(r#"{"IP":"10.0.0.0","Mask":"////////////////////AA==","ID":2}"#).unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/120"), "{err}");
}

#[test]
fn identity_label_strings() {
    for literal in [IDENTITY_1, IDENTITY_2, IDENTITY_1_V2] {
        let arr = LabelArray::parse_kvstore(literal).unwrap();
        assert_eq!(arr.to_kvstore_string(), literal);
    }
    // Built from CiliumIdentity security-labels (map order differs from key order).
    let map: BTreeMap<String, String> = [
        ("k8s:io.kubernetes.pod.namespace", "bar"),
        ("k8s:io.cilium.k8s.policy.cluster", "cluster3"),
        ("k8s:app", "fred"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    let arr = LabelArray::from_map(&map);
    assert_eq!(arr.to_kvstore_string(), IDENTITY_1_V2);
    assert_eq!(
        arr.get(NAMESPACE_LABEL),
        Some(&Label::new("k8s", NAMESPACE_LABEL, "bar"))
    );
    assert_eq!(arr.get(CLUSTER_LABEL).unwrap().value, "cluster3");
    assert_eq!(
        kvstore::parse_identity_key(&kvstore::identity_key(196915)).unwrap(),
        196915
    );
}
