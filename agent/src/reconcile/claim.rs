//! What one cluster's ipcache entry asks of this node's maps: a [`Claim`] on a [`Prefix`]
//! (the map value, and the pod if it lives on this node), by the rules in
//! [`crate::reconcile`]'s module docs.
//!
//! It must not choose between clusters (that is [`super::Desired`]) or touch a map.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use clustermesh_ebpf_abi::{ipcache_flags, IpcacheValue};
use clustermesh_types::model::IpcacheEntry;
use serde::Serialize;

use super::Prefix;

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalPod {
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Security identity.
    pub identity: u32,
}

/// What one cluster's entry asks for (`P`: the family's pod, [`LocalPod`] for IPv4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim<P = LocalPod> {
    /// The map value.
    pub value: IpcacheValue,
    /// Set when the entry is a pod on this node.
    pub pod: Option<Arc<P>>,
}

/// The prefix and claim for `entry` published by `cluster`; `None` for entries this
/// datapath cannot program (IPv6, for now).
pub fn claim(
    local: &str,
    node_ip: Ipv4Addr,
    cluster: &str,
    entry: &IpcacheEntry,
) -> Option<(Prefix, Claim)> {
    claim_of(cluster == local, node_ip, entry)
}

/// [`claim`] with the cluster comparison already made.
pub(super) fn claim_of(
    is_local_cluster: bool,
    node_ip: Ipv4Addr,
    entry: &IpcacheEntry,
) -> Option<(Prefix, Claim)> {
    let prefix = Prefix::from_cidr(&entry.prefix)?;
    let (addr, bits) = (prefix.addr, prefix.bits);
    let pair = &entry.pair;
    // An IPv6 tunnel endpoint is not usable by the IPv4 underlay: the entry is programmed
    // without a tunnel, as if it named none.
    let host = match entry.host {
        Some(IpAddr::V4(h)) => Some(h),
        _ => None,
    };
    let claim = match host {
        // 0.0.0.0 is "no IPv4 underlay" (an IPv6-only node): no HostIP names it.
        Some(h) if h == node_ip && !node_ip.is_unspecified() && is_local_cluster => Claim {
            value: IpcacheValue {
                key: pair.key,
                ..IpcacheValue::local(pair.id)
            },
            pod: (bits == 32 && !pair.k8s_pod_name.is_empty()).then(|| {
                Arc::new(LocalPod {
                    ip: addr,
                    namespace: pair.k8s_namespace.to_string(),
                    name: pair.k8s_pod_name.to_string(),
                    identity: pair.id,
                })
            }),
        },
        Some(h) => {
            let mut value = IpcacheValue::tunnel_v4(pair.id, h.octets());
            value.key = pair.key;
            if !is_local_cluster {
                value.flags |= ipcache_flags::REMOTE_CLUSTER;
            }
            Claim { value, pod: None }
        }
        None => Claim {
            value: IpcacheValue {
                key: pair.key,
                flags: if is_local_cluster {
                    0
                } else {
                    ipcache_flags::REMOTE_CLUSTER
                },
                ..IpcacheValue::local(pair.id)
            },
            pod: None,
        },
    };
    Some((prefix, claim))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use clustermesh_types::model::IpIdentityPair;

    /// A validated entry (the reconcile tests' one constructor).
    pub(crate) fn pair(ip: &str, host: &str, id: u32, pod: &str) -> IpcacheEntry {
        IpcacheEntry::new(
            IpIdentityPair::decode(
                format!(
                    r#"{{"IP":"{ip}","HostIP":"{host}","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"{pod}"}}"#
                )
                .as_bytes(),
            )
            .expect("valid entry"),
        )
        .expect("valid entry")
    }

    /// This node's underlay address in the reconcile tests.
    pub(crate) const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
    #[test]
    fn local_pod_on_this_node_has_no_tunnel_and_an_endpoint() {
        let (p, c) = claim(
            "c1",
            NODE,
            "c1",
            &pair("10.1.1.11", "198.18.1.11", 70000, "p1"),
        )
        .unwrap();
        assert_eq!(
            p,
            Prefix {
                addr: Ipv4Addr::new(10, 1, 1, 11),
                bits: 32
            }
        );
        assert_eq!(c.value.flags, 0);
        assert_eq!(c.value.sec_identity, 70000);
        let pod = c.pod.expect("local pod");
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("default", "p1")
        );
    }

    #[test]
    fn pods_elsewhere_are_tunnelled_and_remote_clusters_flagged() {
        let (_, c) = claim(
            "c1",
            NODE,
            "c1",
            &pair("10.1.2.11", "198.18.1.12", 70000, "p1"),
        )
        .unwrap();
        assert_eq!(c.value.flags, ipcache_flags::HAS_TUNNEL);
        assert_eq!(&c.value.tunnel_endpoint[..4], &[198, 18, 1, 12]);
        assert!(c.pod.is_none());
        let (_, c) = claim(
            "c1",
            NODE,
            "c2",
            &pair("10.2.1.11", "198.18.2.11", 131073, "p1"),
        )
        .unwrap();
        assert_eq!(
            c.value.flags,
            ipcache_flags::HAS_TUNNEL | ipcache_flags::REMOTE_CLUSTER
        );
        // A remote claiming our node IP is still not a local pod.
        let (_, c) = claim(
            "c1",
            NODE,
            "c2",
            &pair("10.2.1.12", "198.18.1.11", 131073, "p1"),
        )
        .unwrap();
        assert!(c.pod.is_none());
        assert!(claim(
            "c1",
            NODE,
            "c1",
            &pair("fd00::1", "198.18.1.11", 70000, "p1")
        )
        .is_none());
    }

    #[test]
    fn an_ipv6_only_node_has_no_ipv4_pod_of_its_own() {
        // 0.0.0.0 stands for "no IPv4 underlay": an entry naming it is tunnelled (and so
        // dropped by the datapath, which has no IPv4 source), never a local pod.
        let (_, c) = claim(
            "c1",
            Ipv4Addr::UNSPECIFIED,
            "c1",
            &pair("10.1.1.11", "0.0.0.0", 70000, "p1"),
        )
        .unwrap();
        assert!(c.pod.is_none());
        assert_ne!(c.value.flags, 0);
    }
}
