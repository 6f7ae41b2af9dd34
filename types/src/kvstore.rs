//! etcd key layout (Cilium kvstore v1), byte-exact with Cilium.
//!
//! Builders never fail; parsers reject keys with the wrong prefix or the wrong
//! number of `/`-separated segments.

use std::net::IpAddr;

use crate::{Error, Result};

/// Root of every Cilium key.
pub const BASE_PREFIX: &str = "cilium";
/// State written by a cluster about itself.
pub const STATE_PREFIX: &str = "cilium/state";
/// State cached by KVStoreMesh about remote clusters.
pub const CACHE_PREFIX: &str = "cilium/cache";
/// Liveness key rewritten every minute.
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// Per-cluster `CiliumClusterConfig`.
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config";
/// Synced canaries: `cilium/synced/<cluster>/<prefix>`.
pub const SYNCED_PREFIX: &str = "cilium/synced";
/// Nodes: `<prefix>/<cluster>/<node>`.
pub const NODES_PREFIX: &str = "cilium/state/nodes/v1";
/// Identities: `<prefix>/id/<numeric id>`.
pub const IDENTITIES_PREFIX: &str = "cilium/state/identities/v1";
/// ipcache entries: `<prefix>/default/<ip or prefix>`.
pub const IP_PREFIX: &str = "cilium/state/ip/v1";
/// The only ipcache address space (not the cluster name).
pub const IP_ADDRESS_SPACE: &str = "default";
/// Global services: `<prefix>/<cluster>/<ns>/<name>`.
pub const SERVICES_PREFIX: &str = "cilium/state/services/v1";
/// MCS-API service exports: `<prefix>/<cluster>/<ns>/<name>`.
pub const SERVICE_EXPORTS_PREFIX: &str = "cilium/state/serviceexports/v1";
/// EndpointSlices of global services (service v2, Cilium 1.20):
/// `<prefix>/<cluster>/<ns>/<slice name>`.
pub const ENDPOINT_SLICES_PREFIX: &str = "cilium/state/endpointslices/v1";

/// Root of keys private to this implementation (never read by Cilium).
pub const LOCAL_PREFIX: &str = "clustermesh/local/v1";
/// Local service records: `<prefix>/<ns>/<name>`.
pub const LOCAL_SERVICES_PREFIX: &str = "clustermesh/local/v1/services";
/// Local policy records: `<prefix>/<kind>/<ns>/<name>`.
pub const LOCAL_POLICIES_PREFIX: &str = "clustermesh/local/v1/policies";
/// Synced canary of [`LOCAL_SERVICES_PREFIX`], written after the apiserver's full pass.
pub const LOCAL_SERVICES_SYNCED: &str = "clustermesh/local/synced/v1/services";
/// Synced canary of [`LOCAL_POLICIES_PREFIX`], written after the apiserver's full pass.
pub const LOCAL_POLICIES_SYNCED: &str = "clustermesh/local/synced/v1/policies";

/// Sub-path of identity keys holding the label string.
const IDENTITY_ID_SEGMENT: &str = "id";

/// `cilium/cluster-config/<cluster>`.
pub fn cluster_config_key(cluster: &str) -> String {
    format!("{CLUSTER_CONFIG_PREFIX}/{cluster}")
}

/// `cilium/state/nodes/v1/<cluster>/<node>`.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{NODES_PREFIX}/{cluster}/{node}")
}

/// `cilium/state/identities/v1/id/<id>`.
pub fn identity_key(id: u32) -> String {
    format!("{IDENTITIES_PREFIX}/{IDENTITY_ID_SEGMENT}/{id}")
}

/// `cilium/state/ip/v1/default/<ip>`; `ip_or_prefix` is an address for a host
/// entry or `ip/len` for a prefix (see `IpIdentityPair::prefix_string`).
pub fn ip_key(ip_or_prefix: &str) -> String {
    format!("{IP_PREFIX}/{IP_ADDRESS_SPACE}/{ip_or_prefix}")
}

/// `cilium/state/services/v1/<cluster>/<ns>/<name>`.
pub fn service_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{SERVICES_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/serviceexports/v1/<cluster>/<ns>/<name>`.
pub fn service_export_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{SERVICE_EXPORTS_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/endpointslices/v1/<cluster>/<ns>/<slice name>`.
pub fn endpoint_slice_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{ENDPOINT_SLICES_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/synced/<cluster>/<synced_prefix>`, e.g.
/// `cilium/synced/cluster3/cilium/state/nodes/v1`.
pub fn synced_key(cluster: &str, synced_prefix: &str) -> String {
    format!("{SYNCED_PREFIX}/{cluster}/{synced_prefix}")
}

/// Replaces a leading `cilium/state` with `cilium/cache` (Cilium
/// `StateToCachePrefix`); other prefixes are returned unchanged.
pub fn state_to_cache(prefix: &str) -> String {
    match prefix.strip_prefix(STATE_PREFIX) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{CACHE_PREFIX}{rest}"),
        _ => prefix.to_owned(),
    }
}

/// Joins key parts with `/`, collapses repeated `/` and trims a trailing `/`
/// (Cilium `JoinKey`). Unlike path cleaning it leaves `.` and `..` alone.
pub fn join_key<I, S>(parts: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(part.as_ref());
    }
    let mut collapsed = String::with_capacity(out.len());
    let mut prev_slash = false;
    for c in out.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        collapsed.push(c);
    }
    while collapsed.ends_with('/') {
        collapsed.pop();
    }
    collapsed
}

/// `clustermesh/local/v1/services/<ns>/<name>`.
pub fn local_service_key(namespace: &str, name: &str) -> String {
    format!("{LOCAL_SERVICES_PREFIX}/{namespace}/{name}")
}

/// `clustermesh/local/v1/policies/<kind>/<ns>/<name>`.
pub fn local_policy_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{LOCAL_POLICIES_PREFIX}/{kind}/{namespace}/{name}")
}

fn invalid(key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidKey {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// Strips `prefix/` from `key` and splits the rest into exactly `N` non-empty
/// `/`-separated segments.
///
/// Useful for parsing keys under any prefix, e.g. the `cilium/cache/...`
/// re-keyed copies written by KVStoreMesh.
pub fn split_key<'a, const N: usize>(key: &'a str, prefix: &str) -> Result<[&'a str; N]> {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| invalid(key, format!("does not start with {prefix}/")))?;
    let mut out = [""; N];
    let mut parts = rest.split('/');
    for slot in &mut out {
        match parts.next() {
            Some(p) if !p.is_empty() => *slot = p,
            _ => {
                return Err(invalid(
                    key,
                    format!("expected {N} non-empty segments after {prefix}/"),
                ))
            }
        }
    }
    if parts.next().is_some() {
        return Err(invalid(
            key,
            format!("expected {N} segments after {prefix}/, found more"),
        ));
    }
    Ok(out)
}

/// Parses `cilium/state/nodes/v1/<cluster>/<node>` into `(cluster, node)`.
pub fn parse_node_key(key: &str) -> Result<(String, String)> {
    let [cluster, node] = split_key::<2>(key, NODES_PREFIX)?;
    Ok((cluster.to_owned(), node.to_owned()))
}

/// Parses `cilium/state/identities/v1/id/<id>` into the numeric identity.
pub fn parse_identity_key(key: &str) -> Result<u32> {
    let [id] = split_key::<1>(key, &format!("{IDENTITIES_PREFIX}/{IDENTITY_ID_SEGMENT}"))?;
    parse_identity_id(key, id)
}

/// Parses a decimal identity (digits only, fits in `u32`).
fn parse_identity_id(key: &str, id: &str) -> Result<u32> {
    if !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(key, "identity is not a decimal number"));
    }
    id.parse::<u32>()
        .map_err(|_| invalid(key, "identity does not fit in 32 bits"))
}

/// Parses `cilium/state/ip/v1/default/<ip>` (or `<ip>/<len>`) into the suffix,
/// checking it is an IP address or a prefix with a valid length.
pub fn parse_ip_key(key: &str) -> Result<String> {
    let prefix = format!("{IP_PREFIX}/{IP_ADDRESS_SPACE}/");
    let suffix = key
        .strip_prefix(prefix.as_str())
        .ok_or_else(|| invalid(key, format!("does not start with {prefix}")))?;
    let (ip, len) = match suffix.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (suffix, None),
    };
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| invalid(key, "suffix is not an ip address"))?;
    if let Some(len) = len {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let ok = !len.is_empty()
            && len.bytes().all(|b| b.is_ascii_digit())
            && len.parse::<u8>().is_ok_and(|l| l <= max);
        if !ok {
            return Err(invalid(key, "invalid prefix length"));
        }
    }
    Ok(suffix.to_owned())
}

/// Parses `cilium/state/services/v1/<cluster>/<ns>/<name>`.
pub fn parse_service_key(key: &str) -> Result<(String, String, String)> {
    let [c, ns, n] = split_key::<3>(key, SERVICES_PREFIX)?;
    Ok((c.to_owned(), ns.to_owned(), n.to_owned()))
}

/// Parses `cilium/state/serviceexports/v1/<cluster>/<ns>/<name>`.
pub fn parse_service_export_key(key: &str) -> Result<(String, String, String)> {
    let [c, ns, n] = split_key::<3>(key, SERVICE_EXPORTS_PREFIX)?;
    Ok((c.to_owned(), ns.to_owned(), n.to_owned()))
}

/// Parses `cilium/state/endpointslices/v1/<cluster>/<ns>/<slice name>`.
pub fn parse_endpoint_slice_key(key: &str) -> Result<(String, String, String)> {
    let [c, ns, n] = split_key::<3>(key, ENDPOINT_SLICES_PREFIX)?;
    Ok((c.to_owned(), ns.to_owned(), n.to_owned()))
}

/// Parses `cilium/cluster-config/<cluster>` into the cluster name.
pub fn parse_cluster_config_key(key: &str) -> Result<String> {
    let [c] = split_key::<1>(key, CLUSTER_CONFIG_PREFIX)?;
    Ok(c.to_owned())
}

/// Parses `clustermesh/local/v1/services/<ns>/<name>`.
pub fn parse_local_service_key(key: &str) -> Result<(String, String)> {
    let [ns, n] = split_key::<2>(key, LOCAL_SERVICES_PREFIX)?;
    Ok((ns.to_owned(), n.to_owned()))
}

/// Parses `clustermesh/local/v1/policies/<kind>/<ns>/<name>`.
pub fn parse_local_policy_key(key: &str) -> Result<(String, String, String)> {
    let [k, ns, n] = split_key::<3>(key, LOCAL_POLICIES_PREFIX)?;
    Ok((k.to_owned(), ns.to_owned(), n.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_match_reference() {
        assert_eq!(
            cluster_config_key("cluster3"),
            "cilium/cluster-config/cluster3"
        );
        assert_eq!(
            node_key("cluster3", "test-node-1"),
            "cilium/state/nodes/v1/cluster3/test-node-1"
        );
        assert_eq!(identity_key(196915), "cilium/state/identities/v1/id/196915");
        assert_eq!(
            ip_key("fd00:10:244:1::d643"),
            "cilium/state/ip/v1/default/fd00:10:244:1::d643"
        );
        assert_eq!(
            service_key("cluster3", "ns-alpha", "echo-service"),
            "cilium/state/services/v1/cluster3/ns-alpha/echo-service"
        );
        assert_eq!(
            service_export_key("cluster1", "default", "basic"),
            "cilium/state/serviceexports/v1/cluster1/default/basic"
        );
        assert_eq!(
            synced_key("cluster3", IP_PREFIX),
            "cilium/synced/cluster3/cilium/state/ip/v1"
        );
        assert_eq!(state_to_cache(NODES_PREFIX), "cilium/cache/nodes/v1");
        assert_eq!(state_to_cache("cilium/stateful"), "cilium/stateful");
        assert_eq!(state_to_cache("other/x"), "other/x");
        assert_eq!(
            synced_key("cluster2", &state_to_cache(IP_PREFIX)),
            "cilium/synced/cluster2/cilium/cache/ip/v1"
        );
        assert_eq!(
            local_service_key("ns", "svc"),
            "clustermesh/local/v1/services/ns/svc"
        );
        assert_eq!(
            local_policy_key("CiliumNetworkPolicy", "ns", "p"),
            "clustermesh/local/v1/policies/CiliumNetworkPolicy/ns/p"
        );
    }

    #[test]
    fn join_key_like_cilium() {
        assert_eq!(
            join_key(["cilium/state/", "/nodes/v1/"]),
            "cilium/state/nodes/v1"
        );
        assert_eq!(join_key(["a", "", "b"]), "a/b");
        assert_eq!(join_key(["a", "..", "./b/"]), "a/.././b");
        assert_eq!(join_key(Vec::<String>::new()), "");
    }

    #[test]
    fn parsers_round_trip() {
        assert_eq!(
            parse_node_key(&node_key("c1", "n1")).unwrap(),
            ("c1".to_owned(), "n1".to_owned())
        );
        assert_eq!(parse_identity_key(&identity_key(196915)).unwrap(), 196915);
        assert_eq!(parse_ip_key(&ip_key("10.0.0.0/8")).unwrap(), "10.0.0.0/8");
        assert_eq!(parse_ip_key(&ip_key("fd00::1")).unwrap(), "fd00::1");
        assert_eq!(
            parse_service_key(&service_key("c", "ns", "n")).unwrap(),
            ("c".to_owned(), "ns".to_owned(), "n".to_owned())
        );
        assert_eq!(
            parse_service_export_key(&service_export_key("c", "ns", "n"))
                .unwrap()
                .2,
            "n"
        );
        assert_eq!(
            parse_endpoint_slice_key(&endpoint_slice_key("c", "ns", "echo-kvlm2")).unwrap(),
            ("c".to_owned(), "ns".to_owned(), "echo-kvlm2".to_owned())
        );
        assert_eq!(
            endpoint_slice_key("cluster3", "test", "echo-kvlm2"),
            "cilium/state/endpointslices/v1/cluster3/test/echo-kvlm2"
        );
        assert_eq!(
            parse_cluster_config_key("cilium/cluster-config/c5").unwrap(),
            "c5"
        );
        assert_eq!(
            parse_local_service_key(&local_service_key("a", "b"))
                .unwrap()
                .1,
            "b"
        );
        assert_eq!(
            parse_local_policy_key(&local_policy_key("k", "a", "b"))
                .unwrap()
                .0,
            "k"
        );
        let [c, n] = split_key::<2>("cilium/cache/nodes/v1/c2/n", "cilium/cache/nodes/v1").unwrap();
        assert_eq!((c, n), ("c2", "n"));
    }

    #[test]
    fn parsers_reject_garbage() {
        for bad in [
            "cilium/state/nodes/v1/c1",
            "cilium/state/nodes/v1/c1/n1/x",
            "cilium/state/nodes/v1//n1",
            "cilium/state/nodes/v1c1/n1",
            "cilium/cache/nodes/v1/c1/n1",
        ] {
            assert!(parse_node_key(bad).is_err(), "{bad}");
        }
        for bad in [
            "cilium/state/identities/v1/id/",
            "cilium/state/identities/v1/id/-1",
            "cilium/state/identities/v1/id/+1",
            "cilium/state/identities/v1/id/4294967296",
            "cilium/state/identities/v1/value/k8s:a=b;/node",
            "cilium/state/identities/v1/id/1/2",
        ] {
            assert!(parse_identity_key(bad).is_err(), "{bad}");
        }
        for bad in [
            "cilium/state/ip/v1/cluster1/10.0.0.1",
            "cilium/state/ip/v1/default/",
            "cilium/state/ip/v1/default/10.0.0.1/33",
            "cilium/state/ip/v1/default/10.0.0.1/",
            "cilium/state/ip/v1/default/10.0.0.1/8/1",
            "cilium/state/ip/v1/default/not-an-ip",
        ] {
            assert!(parse_ip_key(bad).is_err(), "{bad}");
        }
        assert!(parse_service_key("cilium/state/services/v1/c/ns").is_err());
        assert!(parse_service_export_key("cilium/state/services/v1/c/ns/n").is_err());
        assert!(parse_endpoint_slice_key("cilium/state/services/v1/c/ns/n").is_err());
        assert!(parse_endpoint_slice_key("cilium/state/endpointslices/v1/c/ns").is_err());
        let err = parse_node_key("x").unwrap_err().to_string();
        assert!(err.contains("cilium/state/nodes/v1/"), "{err}");
    }
}
