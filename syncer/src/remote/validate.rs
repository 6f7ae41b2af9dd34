//! Validation of every entry read from a remote (Cilium `pkg/clustermesh` validators plus the
//! checks its unmarshal functions make). A remote is untrusted input: an entry is applied
//! only if it decodes, passes its type's `validate()`, and belongs to the remote that
//! served it (name, cluster ID, identity range, cluster label, key matching the value).
//!
//! It is also where keys and addresses are parsed, once: an accepted ipcache entry carries
//! its prefix and host address typed ([`IpcacheEntry`], IPv4 and IPv6), an identity its
//! number ([`Identity`]); nothing downstream parses a key or an address string again.

use std::sync::Arc;

use clustermesh_types::cluster::IdentityRange;
use clustermesh_types::cluster_cidrs::ClusterCidrs;
use clustermesh_types::identity::{
    reserved, Identity, LabelArray, CLUSTER_LABEL, MIN_USER_IDENTITY, SOURCE_K8S,
};
use clustermesh_types::model::{
    ClusterService, EndpointSlice, IpIdentityPair, IpcacheEntry, Node, ServiceExport,
};

use super::{Resource, Value, MAX_VALUE_BYTES};

/// What an entry is checked against: the remote that served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The remote's cluster name (= its config file name).
    pub cluster: String,
    /// The remote's cluster ID from its validated cluster config.
    pub cluster_id: u32,
    /// The identities the remote may allocate.
    pub range: IdentityRange,
    /// The remote's pod CIDRs (its config file's `cluster-cidr`, written by `connect`): an
    /// ipcache entry or node pod CIDR outside them is refused. Empty: no such rule.
    pub cidrs: ClusterCidrs,
}

/// Why an entry was rejected; the label value of `kvstore_remote_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Value above [`MAX_VALUE_BYTES`].
    TooLarge,
    /// Not valid JSON / label string of the expected shape.
    Malformed,
    /// Decodes but breaks the type's own rules.
    Invalid,
    /// The key does not match the value (name, namespace, IP prefix) or does not parse.
    KeyMismatch,
    /// The value claims another cluster's name.
    ClusterMismatch,
    /// The value claims another cluster's ID.
    ClusterIdMismatch,
    /// An identity outside the remote's range.
    IdentityOutOfRange,
    /// Identity labels without `k8s:io.cilium.k8s.policy.cluster=<remote>`.
    MissingClusterLabel,
    /// An ipcache prefix or node pod CIDR outside the remote's `cluster-cidr`.
    OutsideClusterCidrs,
}

impl Reason {
    /// Metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too-large",
            Reason::Malformed => "malformed",
            Reason::Invalid => "invalid",
            Reason::KeyMismatch => "key-mismatch",
            Reason::ClusterMismatch => "cluster-mismatch",
            Reason::ClusterIdMismatch => "cluster-id-mismatch",
            Reason::IdentityOutOfRange => "identity-out-of-range",
            Reason::MissingClusterLabel => "missing-cluster-label",
            Reason::OutsideClusterCidrs => "outside-cluster-cidrs",
        }
    }
}

/// A rejected entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The kind of problem.
    pub reason: Reason,
    /// What exactly was wrong.
    pub detail: String,
}

fn reject<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection {
        reason,
        detail: detail.into(),
    })
}

fn decoded<T>(r: clustermesh_types::Result<T>) -> Result<T, Rejection> {
    r.map_err(|e| Rejection {
        reason: Reason::Malformed,
        detail: e.to_string(),
    })
}

fn valid(r: clustermesh_types::Result<()>) -> Result<(), Rejection> {
    r.map_err(|e| Rejection {
        reason: Reason::Invalid,
        detail: e.to_string(),
    })
}

/// Validates the value `raw` stored under `rel`, the key relative to the watched prefix
/// (`<node>`, `<ip>`, `<id>`, `<ns>/<name>`).
pub fn validate(
    ctx: &Context,
    resource: Resource,
    rel: &str,
    raw: &[u8],
) -> Result<Value, Rejection> {
    if raw.len() > MAX_VALUE_BYTES {
        return reject(
            Reason::TooLarge,
            format!("value of {} bytes exceeds {MAX_VALUE_BYTES}", raw.len()),
        );
    }
    match resource {
        Resource::Nodes => node(ctx, rel, raw).map(|v| Value::Node(Arc::new(v))),
        Resource::Endpoints => endpoint(ctx, rel, raw).map(|v| Value::Endpoint(Arc::new(v))),
        Resource::Identities => identity(ctx, rel, raw).map(|v| Value::Identity(Arc::new(v))),
        Resource::Services => service(ctx, rel, raw).map(|v| Value::Service(Arc::new(v))),
        Resource::ServiceExports => {
            service_export(ctx, rel, raw).map(|v| Value::ServiceExport(Arc::new(v)))
        }
        Resource::EndpointSlices => {
            endpoint_slice(ctx, rel, raw).map(|v| Value::EndpointSlice(Arc::new(v)))
        }
    }
}

fn check_cluster(ctx: &Context, cluster: &str, cluster_id: Option<u32>) -> Result<(), Rejection> {
    if cluster != ctx.cluster {
        return reject(
            Reason::ClusterMismatch,
            format!("claims cluster {cluster:?}, served by {:?}", ctx.cluster),
        );
    }
    if let Some(id) = cluster_id {
        if id != ctx.cluster_id {
            return reject(
                Reason::ClusterIdMismatch,
                format!(
                    "claims cluster ID {id}, {} has ID {}",
                    ctx.cluster, ctx.cluster_id
                ),
            );
        }
    }
    Ok(())
}

fn node(ctx: &Context, rel: &str, raw: &[u8]) -> Result<Node, Rejection> {
    let n = decoded(Node::decode(raw))?;
    valid(n.validate())?;
    check_cluster(ctx, &n.cluster, Some(n.cluster_id))?;
    if n.name != rel {
        return reject(
            Reason::KeyMismatch,
            format!("key {rel:?} holds node {:?}", n.name),
        );
    }
    let pod_cidrs = (n.ipv4_alloc_cidr.iter())
        .chain(&n.ipv4_secondary_alloc_cidrs)
        .chain(&n.ipv6_alloc_cidr)
        .chain(&n.ipv6_secondary_alloc_cidrs);
    for c in pod_cidrs {
        if !ctx.cidrs.contains_prefix(c) {
            return reject(
                Reason::OutsideClusterCidrs,
                format!(
                    "node {:?} has pod CIDR {c}, outside {}'s cluster CIDRs {}",
                    n.name, ctx.cluster, ctx.cidrs
                ),
            );
        }
    }
    Ok(n)
}

fn service(ctx: &Context, rel: &str, raw: &[u8]) -> Result<ClusterService, Rejection> {
    let s = decoded(ClusterService::decode(raw))?;
    valid(s.validate())?;
    check_cluster(ctx, &s.cluster, Some(s.cluster_id))?;
    let want = format!("{}/{}", s.namespace, s.name);
    if want != rel {
        return reject(
            Reason::KeyMismatch,
            format!("key {rel:?} holds service {want:?}"),
        );
    }
    Ok(s)
}

fn service_export(ctx: &Context, rel: &str, raw: &[u8]) -> Result<ServiceExport, Rejection> {
    let s = decoded(ServiceExport::decode(raw))?;
    valid(s.validate())?;
    check_cluster(ctx, &s.cluster, None)?;
    let want = format!("{}/{}", s.namespace, s.name);
    if want != rel {
        return reject(
            Reason::KeyMismatch,
            format!("key {rel:?} holds export {want:?}"),
        );
    }
    Ok(s)
}

/// Cilium's EndpointSlice rules (cluster, namespace, name set; IPv4 or IPv6; every address of
/// that family), and like a service it must claim the serving remote's name and ID and sit
/// under `<ns>/<name>`.
fn endpoint_slice(ctx: &Context, rel: &str, raw: &[u8]) -> Result<EndpointSlice, Rejection> {
    let s = decoded(EndpointSlice::decode(raw))?;
    valid(s.validate())?;
    check_cluster(ctx, &s.cluster, Some(s.cluster_id))?;
    let want = format!("{}/{}", s.namespace, s.name);
    if want != rel {
        return reject(
            Reason::KeyMismatch,
            format!("key {rel:?} holds endpoint slice {want:?}"),
        );
    }
    if s.service_name().is_none_or(str::is_empty) {
        return reject(
            Reason::Invalid,
            format!("endpoint slice {want:?} names no service (label kubernetes.io/service-name)"),
        );
    }
    Ok(s)
}

fn endpoint(ctx: &Context, rel: &str, raw: &[u8]) -> Result<IpcacheEntry, Rejection> {
    // Decode first so malformed JSON is counted as such, then match the key (Cilium checks
    // the key against `PrefixString()` in its unmarshal).
    let mut p = decoded(IpIdentityPair::decode(raw))?;
    if !p.is_keyed_by(rel) {
        return reject(
            Reason::KeyMismatch,
            format!("key {rel:?} holds entry for {:?}", p.prefix_string()),
        );
    }
    if p.id >= MIN_USER_IDENTITY && !ctx.range.contains(p.id) {
        return reject(
            Reason::IdentityOutOfRange,
            format!(
                "identity {} outside {}'s range {}",
                p.id, ctx.cluster, ctx.range
            ),
        );
    }
    if p.id == reserved::HOST {
        // The remote's host is a remote node here (Cilium `pkg/ipcache/kvstore.go`).
        p.id = reserved::REMOTE_NODE;
    }
    let entry = IpcacheEntry::new(p).map_err(|e| Rejection {
        reason: Reason::Invalid,
        detail: e.to_string(),
    })?;
    if let std::net::IpAddr::V6(addr) = entry.prefix.addr {
        ipv6_form(addr, &entry.pair.ip)?;
    }
    if !ctx.cidrs.contains_prefix(&entry.prefix) {
        // A remote may only route what it owns: an entry for another range (a public
        // address, a peer's pods) would pull that traffic into the remote's tunnel.
        return reject(
            Reason::OutsideClusterCidrs,
            format!(
                "prefix {} is outside {}'s cluster CIDRs {}",
                entry.prefix, ctx.cluster, ctx.cidrs
            ),
        );
    }
    Ok(entry)
}

/// An IPv6 entry's address as Cilium writes it (Go's `net.IP.String`, RFC 5952): the key
/// is compared as a string, so `FD00::1` and `fd00:0::1` would be two keys of one prefix,
/// and deleting one would withdraw what the other still claims. An IPv4-mapped address is
/// never written by Cilium (Go prints it as IPv4) and no IPv6 lookup could match it.
fn ipv6_form(addr: std::net::Ipv6Addr, written: &str) -> Result<(), Rejection> {
    if let Some(v4) = addr.to_ipv4_mapped() {
        return reject(
            Reason::Invalid,
            format!("IPv4-mapped address {written:?}: publish the IPv4 address {v4} instead"),
        );
    }
    let canonical = addr.to_string();
    if written != canonical {
        return reject(
            Reason::Malformed,
            format!(
                "IPv6 address {written:?} is not in canonical form (RFC 5952: {canonical:?}); \
                 another key could name the same prefix"
            ),
        );
    }
    Ok(())
}

fn identity(ctx: &Context, rel: &str, raw: &[u8]) -> Result<Identity, Rejection> {
    let id = match rel.parse::<u32>() {
        Ok(id) if rel.bytes().all(|b| b.is_ascii_digit()) && id.to_string() == rel => id,
        _ => {
            return reject(
                Reason::KeyMismatch,
                format!("identity key {rel:?} is not a canonical decimal"),
            )
        }
    };
    if !ctx.range.contains(id) {
        return reject(
            Reason::IdentityOutOfRange,
            format!(
                "identity {id} outside {}'s range {}",
                ctx.cluster, ctx.range
            ),
        );
    }
    let text = std::str::from_utf8(raw).map_err(|_| Rejection {
        reason: Reason::Malformed,
        detail: "label string is not UTF-8".into(),
    })?;
    let labels = decoded(LabelArray::parse_kvstore(text))?;
    let mut found = false;
    for l in labels.iter().filter(|l| l.key == CLUSTER_LABEL) {
        if l.value != ctx.cluster {
            return reject(
                Reason::ClusterMismatch,
                format!("identity {id} labelled with cluster {:?}", l.value),
            );
        }
        found |= l.source == SOURCE_K8S;
    }
    if !found {
        return reject(
            Reason::MissingClusterLabel,
            format!("identity {id} lacks k8s:{CLUSTER_LABEL}={}", ctx.cluster),
        );
    }
    Ok(Identity { id, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_types::cluster::MaxConnectedClusters;

    fn ctx() -> Context {
        Context {
            cluster: "cluster3".into(),
            cluster_id: 3,
            range: IdentityRange::for_cluster(3, MaxConnectedClusters::Max255),
            cidrs: ClusterCidrs::default(),
        }
    }

    const NODE: &str = r#"{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}"#;

    fn reason(r: Result<Value, Rejection>) -> Reason {
        match r {
            Ok(v) => panic!("accepted {v:?}"),
            Err(e) => e.reason,
        }
    }

    /// `endpointslices-1.expected` of Cilium's `endpointslices.txtar`, compact.
    const SLICE: &str = r#"{"cluster":"cluster3","clusterID":3,"namespace":"test","name":"echo-kvlm2","labels":{"kubernetes.io/service-name":"echo"},"addressType":"IPv4","endpoints":[{"addresses":["10.244.1.1"],"conditions":{"ready":true,"serving":true,"terminating":false},"nodeName":"nodeport-worker","zone":"zone1","hints":{"forZones":[{"name":"zone1"}]}},{"addresses":["10.244.1.2"],"conditions":{"ready":false,"serving":false,"terminating":false},"nodeName":"nodeport-worker"}],"ports":[{"name":"http","protocol":"TCP","port":8080}]}"#;

    #[test]
    fn endpoint_slices_are_as_strict_as_services() {
        let check =
            |rel: &str, raw: &str| validate(&ctx(), Resource::EndpointSlices, rel, raw.as_bytes());
        match check("test/echo-kvlm2", SLICE) {
            Ok(Value::EndpointSlice(s)) => assert_eq!(s.service_name(), Some("echo")),
            other => panic!("{other:?}"),
        }
        for (rel, raw, want) in [
            ("test/other", SLICE.to_string(), Reason::KeyMismatch),
            (
                "test/echo-kvlm2",
                SLICE.replace(r#""cluster":"cluster3""#, r#""cluster":"cluster4""#),
                Reason::ClusterMismatch,
            ),
            (
                "test/echo-kvlm2",
                SLICE.replace(r#""clusterID":3"#, r#""clusterID":4"#),
                Reason::ClusterIdMismatch,
            ),
            (
                "test/echo-kvlm2",
                SLICE.replace("10.244.1.2", "10.244.1.300"),
                Reason::Invalid,
            ),
            (
                "test/echo-kvlm2",
                SLICE.replace("10.244.1.2", "fd00::2"),
                Reason::Invalid,
            ),
            (
                "test/echo-kvlm2",
                SLICE.replace(r#""IPv4""#, r#""FQDN""#),
                Reason::Invalid,
            ),
            (
                "test/echo-kvlm2",
                SLICE.replace("kubernetes.io/service-name", "app"),
                Reason::Invalid,
            ),
            (
                "test/echo-kvlm2",
                SLICE[..40].to_string(),
                Reason::Malformed,
            ),
        ] {
            assert_eq!(reason(check(rel, &raw)), want, "{rel} {raw}");
        }
    }

    #[test]
    fn nodes() {
        assert!(validate(&ctx(), Resource::Nodes, "test-node-1", NODE.as_bytes()).is_ok());
        assert_eq!(
            reason(validate(&ctx(), Resource::Nodes, "other", NODE.as_bytes())),
            Reason::KeyMismatch
        );
        let c = Context {
            cluster: "cluster4".into(),
            ..ctx()
        };
        assert_eq!(
            reason(validate(
                &c,
                Resource::Nodes,
                "test-node-1",
                NODE.as_bytes()
            )),
            Reason::ClusterMismatch
        );
        let c = Context {
            cluster_id: 4,
            ..ctx()
        };
        assert_eq!(
            reason(validate(
                &c,
                Resource::Nodes,
                "test-node-1",
                NODE.as_bytes()
            )),
            Reason::ClusterIdMismatch
        );
        assert_eq!(
            reason(validate(&ctx(), Resource::Nodes, "n", b"{")),
            Reason::Malformed
        );
        assert_eq!(
            reason(validate(
                &ctx(),
                Resource::Nodes,
                "n",
                br#"{"Cluster":"cluster3"}"#
            )),
            Reason::Invalid
        );
    }

    #[test]
    fn too_large_is_rejected_before_decoding() {
        let big = vec![b' '; 10 * 1024 * 1024];
        assert_eq!(
            reason(validate(&ctx(), Resource::Nodes, "n", &big)),
            Reason::TooLarge
        );
    }

    #[test]
    fn endpoints() {
        let v = br#"{"IP":"10.244.2.74","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"quixote","K8sPodName":"cep-002","K8sServiceAccount":"default"}"#;
        assert!(validate(&ctx(), Resource::Endpoints, "10.244.2.74", v).is_ok());
        assert_eq!(
            reason(validate(&ctx(), Resource::Endpoints, "10.244.2.75", v)),
            Reason::KeyMismatch
        );
        let other = br#"{"IP":"10.0.0.1","HostIP":"","ID":70000,"Key":0,"Metadata":""}"#;
        assert_eq!(
            reason(validate(&ctx(), Resource::Endpoints, "10.0.0.1", other)),
            Reason::IdentityOutOfRange
        );
        let host = br#"{"IP":"172.18.0.2","HostIP":"","ID":1,"Key":0,"Metadata":""}"#;
        match validate(&ctx(), Resource::Endpoints, "172.18.0.2", host) {
            Ok(Value::Endpoint(p)) => {
                assert_eq!(p.id, 6);
                assert_eq!(p.prefix.to_string(), "172.18.0.2/32");
                assert_eq!(p.host, None);
            }
            other => panic!("{other:?}"),
        }
        match validate(&ctx(), Resource::Endpoints, "10.244.2.74", v) {
            Ok(Value::Endpoint(p)) => {
                assert_eq!(p.prefix.to_string(), "10.244.2.74/32");
                assert_eq!(p.host, Some("172.18.0.2".parse().expect("ip")));
            }
            other => panic!("{other:?}"),
        }
        // IPv6, typed like IPv4.
        let v6 = br#"{"IP":"fd00:10:244:1::d643","HostIP":"fd00::2","ID":199475}"#;
        match validate(&ctx(), Resource::Endpoints, "fd00:10:244:1::d643", v6) {
            Ok(Value::Endpoint(p)) => {
                assert_eq!(p.prefix.to_string(), "fd00:10:244:1::d643/128");
                assert_eq!(p.host, Some("fd00::2".parse().expect("ip")));
            }
            other => panic!("{other:?}"),
        }
        let v6net =
            br#"{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA==","HostIP":"","ID":2}"#;
        match validate(&ctx(), Resource::Endpoints, "fd00:10:244::/64", v6net) {
            Ok(Value::Endpoint(p)) => assert_eq!(p.prefix.to_string(), "fd00:10:244::/64"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            reason(validate(
                &ctx(),
                Resource::Endpoints,
                "fd00:10:244::/65",
                v6net
            )),
            Reason::KeyMismatch
        );
    }

    /// The IPv4 hostile-input checks, for IPv6 keys, and the IPv6-only ones.
    #[test]
    fn hostile_ipv6_endpoints() {
        let v6 = br#"{"IP":"fd00:10:244:1::d643","HostIP":"fd00::2","ID":199475}"#;
        // Key and value disagree (another address; the same address written otherwise).
        for key in [
            "fd00:10:244:1::d644",
            "fd00:10:244:1:0::d643",
            "fd00:10:244:1::d643/128",
        ] {
            assert_eq!(
                reason(validate(&ctx(), Resource::Endpoints, key, v6)),
                Reason::KeyMismatch,
                "{key}"
            );
        }
        // Malformed addresses: not an address, not canonical (two keys for one prefix).
        let rejected = |ip: &str| {
            let raw = format!(r#"{{"IP":"{ip}","HostIP":"","ID":199475}}"#);
            validate(&ctx(), Resource::Endpoints, ip, raw.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{ip} accepted"))
        };
        // Named like the IPv4 one.
        assert_eq!(rejected("10.0.0.zz").reason, Reason::Malformed);
        assert_eq!(rejected("fd00::zz").reason, Reason::Malformed);
        assert_eq!(rejected("fd00:::1").reason, Reason::Malformed);
        let r = rejected("FD00::1");
        assert_eq!(r.reason, Reason::Malformed);
        assert!(r.detail.contains(r#""fd00::1""#), "{}", r.detail);
        assert_eq!(rejected("fd00:0:0::1").reason, Reason::Malformed);
        assert_eq!(rejected("fd00::0001").reason, Reason::Malformed);
        let r = rejected("::ffff:10.0.0.1");
        assert_eq!(r.reason, Reason::Invalid);
        assert!(r.detail.contains("10.0.0.1"), "{}", r.detail);
        // A malformed HostIP, as for IPv4.
        for (ip, host) in [("fd00::1", "fd00::2::3"), ("10.0.0.1", "10.0.0.300")] {
            let raw = format!(r#"{{"IP":"{ip}","HostIP":"{host}","ID":199475}}"#);
            assert_eq!(
                reason(validate(&ctx(), Resource::Endpoints, ip, raw.as_bytes())),
                Reason::Malformed,
                "{host}"
            );
        }
        // An identity of another cluster's range.
        let other = br#"{"IP":"fd00::1","HostIP":"","ID":70000}"#;
        assert_eq!(
            reason(validate(&ctx(), Resource::Endpoints, "fd00::1", other)),
            Reason::IdentityOutOfRange
        );
        // A 4-byte mask on an IPv6 address: no programmable prefix.
        let v6in4 = br#"{"IP":"fd00::","Mask":"/wAAAA==","HostIP":"","ID":2}"#;
        assert!(validate(&ctx(), Resource::Endpoints, "fd00::/8", v6in4).is_err());
        // A 16-byte mask on an IPv4 address has no programmable prefix.
        let v4in6 = br#"{"IP":"10.0.0.0","Mask":"////////////////////AA==","HostIP":"","ID":2}"#;
        assert_eq!(
            reason(validate(&ctx(), Resource::Endpoints, "10.0.0.0/120", v4in6)),
            Reason::Invalid
        );
        let world =
            br#"{"IP":"10.0.0.0","Mask":"/wAAAA==","HostIP":"","ID":2,"Key":0,"Metadata":""}"#;
        assert!(validate(&ctx(), Resource::Endpoints, "10.0.0.0/8", world).is_ok());
    }

    #[test]
    fn identities() {
        let l = b"k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;";
        match validate(&ctx(), Resource::Identities, "196915", l) {
            Ok(Value::Identity(i)) => {
                assert_eq!(i.id, 196915);
                assert_eq!(i.get("app").map(|l| l.value.as_str()), Some("baz"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            reason(validate(&ctx(), Resource::Identities, "65536", l)),
            Reason::IdentityOutOfRange
        );
        assert_eq!(
            reason(validate(&ctx(), Resource::Identities, "0196915", l)),
            Reason::KeyMismatch
        );
        assert_eq!(
            reason(validate(&ctx(), Resource::Identities, "x", l)),
            Reason::KeyMismatch
        );
        assert_eq!(
            reason(validate(
                &ctx(),
                Resource::Identities,
                "196915",
                b"k8s:app=baz;"
            )),
            Reason::MissingClusterLabel
        );
        assert_eq!(
            reason(validate(
                &ctx(),
                Resource::Identities,
                "196915",
                b"k8s:io.cilium.k8s.policy.cluster=cluster1;"
            )),
            Reason::ClusterMismatch
        );
    }

    #[test]
    fn services() {
        let s = br#"{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;
        assert!(validate(&ctx(), Resource::Services, "ns-alpha/echo-service", s).is_ok());
        assert_eq!(
            reason(validate(&ctx(), Resource::Services, "ns-alpha/other", s)),
            Reason::KeyMismatch
        );
        let c = Context {
            cluster_id: 9,
            ..ctx()
        };
        assert_eq!(
            reason(validate(&c, Resource::Services, "ns-alpha/echo-service", s)),
            Reason::ClusterIdMismatch
        );
    }

    #[test]
    fn prefixes_outside_the_cluster_cidrs_are_refused_both_families() {
        let c = Context {
            cidrs: ClusterCidrs::parse(["10.244.0.0/16", "fd00:3::/64"]).unwrap(),
            ..ctx()
        };
        let entry = |ip: &str| {
            format!(r#"{{"IP":"{ip}","HostIP":"172.18.0.2","ID":199475,"Key":0,"Metadata":""}}"#)
        };
        for inside in ["10.244.2.74", "fd00:3::4a"] {
            let v = entry(inside);
            assert!(validate(&c, Resource::Endpoints, inside, v.as_bytes()).is_ok());
        }
        for outside in ["10.9.2.74", "8.8.8.8", "fd00:9::4a", "2001:4860::8888"] {
            let v = entry(outside);
            let r = validate(&c, Resource::Endpoints, outside, v.as_bytes()).unwrap_err();
            assert_eq!(r.reason, Reason::OutsideClusterCidrs);
            assert!(
                r.detail.contains(outside) && r.detail.contains("10.244.0.0/16,fd00:3::/64"),
                "{}",
                r.detail
            );
        }
        // A node whose pod CIDR lies outside (or spans more than) the cluster's.
        assert!(validate(&c, Resource::Nodes, "test-node-1", NODE.as_bytes()).is_ok());
        let wide = NODE.replace(r#""Mask":"////AA==""#, r#""Mask":"/wAAAA==""#);
        assert_eq!(
            reason(validate(
                &c,
                Resource::Nodes,
                "test-node-1",
                wide.as_bytes()
            )),
            Reason::OutsideClusterCidrs
        );
        // No CIDRs: no rule.
        let v = entry("8.8.8.8");
        assert!(validate(&ctx(), Resource::Endpoints, "8.8.8.8", v.as_bytes()).is_ok());
    }
}
