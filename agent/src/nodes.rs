//! The node table: every node of every cluster the agent reads (its own cluster's from the
//! local etcd, each remote's through the remote reader), with the per-node state the agent
//! keeps: addresses, pod CIDRs and the tunnel endpoint (where VXLAN traffic for the node's
//! pods goes). Nodes arrive as [`Input::Node`](crate::input::Input::Node); a remote's nodes
//! leave with its drain.
//!
//! Today `/status` (`nodes`) is its only reader; per-node datapath state (tunnel health, an
//! encryption key) lands here next. It must not program maps or read etcd.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use clustermesh_types::model::Node;
use serde::Serialize;

/// One node as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeReport {
    /// The node's cluster.
    pub cluster: String,
    /// The node's name.
    pub name: String,
    /// Its addresses as `<type> <ip>` (`InternalIP 172.18.0.2`).
    pub addresses: Vec<String>,
    /// Where tunnelled traffic for its pods goes: its first `InternalIP`, else its first
    /// `ExternalIP` (Cilium's `GetNodeIP`); `None` if it announces neither.
    pub tunnel_endpoint: Option<IpAddr>,
    /// Its IPv6 tunnel endpoint, by the same rule among its IPv6 addresses (where VXLAN over
    /// IPv6 for its pods goes; pods of an IPv6-only node announce it as their `HostIP`).
    pub tunnel_endpoint_v6: Option<Ipv6Addr>,
    /// Its pod CIDRs (IPv4 and IPv6, primary first).
    pub pod_cidrs: Vec<String>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct NodeTable {
    /// (cluster, node name) → the validated node.
    nodes: BTreeMap<(Arc<str>, Arc<str>), Arc<Node>>,
}

impl NodeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records node `name` of `cluster` (`None`: it was deleted).
    pub fn apply(&mut self, cluster: &Arc<str>, name: &Arc<str>, node: Option<Arc<Node>>) {
        let key = (cluster.clone(), name.clone());
        match node {
            Some(n) => {
                self.nodes.insert(key, n);
            }
            None => {
                self.nodes.remove(&key);
            }
        }
    }

    /// `cluster` left the mesh: its nodes go.
    pub fn remove_cluster(&mut self, cluster: &str) {
        self.nodes.retain(|(c, _), _| &**c != cluster);
    }

    /// Nodes known.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `true` if no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node `name` of `cluster`.
    pub fn get(&self, cluster: &str, name: &str) -> Option<&Arc<Node>> {
        self.nodes
            .iter()
            .find(|((c, n), _)| &**c == cluster && &**n == name)
            .map(|(_, node)| node)
    }

    /// Every node, by cluster then name.
    pub fn report(&self) -> Vec<NodeReport> {
        self.nodes
            .iter()
            .map(|((cluster, name), n)| NodeReport {
                cluster: cluster.to_string(),
                name: name.to_string(),
                addresses: n
                    .ip_addresses
                    .iter()
                    .map(|a| format!("{} {}", a.type_, a.ip))
                    .collect(),
                tunnel_endpoint: tunnel_endpoint(n),
                tunnel_endpoint_v6: tunnel_endpoint_v6(n),
                pod_cidrs: n
                    .ipv4_alloc_cidr
                    .iter()
                    .chain(&n.ipv4_secondary_alloc_cidrs)
                    .chain(n.ipv6_alloc_cidr.iter())
                    .chain(&n.ipv6_secondary_alloc_cidrs)
                    .map(ToString::to_string)
                    .collect(),
            })
            .collect()
    }
}

/// The node's first `InternalIP`, else its first `ExternalIP` (validation has checked the
/// addresses are IPs or empty).
fn tunnel_endpoint(n: &Node) -> Option<IpAddr> {
    ["InternalIP", "ExternalIP"].iter().find_map(|t| {
        n.ip_addresses
            .iter()
            .filter(|a| a.type_ == *t)
            .find_map(|a| a.ip.parse().ok())
    })
}

/// [`tunnel_endpoint`] among the node's IPv6 addresses.
fn tunnel_endpoint_v6(n: &Node) -> Option<Ipv6Addr> {
    ["InternalIP", "ExternalIP"].iter().find_map(|t| {
        n.ip_addresses
            .iter()
            .filter(|a| a.type_ == *t)
            .find_map(|a| a.ip.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_types::model::NodeAddress;

    fn node(cluster: &str, name: &str, addrs: &[(&str, &str)]) -> Arc<Node> {
        Arc::new(Node {
            name: name.into(),
            cluster: cluster.into(),
            ip_addresses: addrs
                .iter()
                .map(|(t, ip)| NodeAddress {
                    type_: (*t).into(),
                    ip: (*ip).into(),
                })
                .collect(),
            ipv4_alloc_cidr: Some("10.244.1.0/24".parse().expect("cidr")),
            ..Node::default()
        })
    }

    #[test]
    fn nodes_land_change_and_leave_with_their_cluster() {
        let (c2, c3): (Arc<str>, Arc<str>) = (Arc::from("c2"), Arc::from("c3"));
        let (n1, n2): (Arc<str>, Arc<str>) = (Arc::from("n1"), Arc::from("n2"));
        let mut t = NodeTable::new();
        t.apply(
            &c3,
            &n1,
            Some(node("c3", "n1", &[("ExternalIP", "192.0.2.1")])),
        );
        t.apply(
            &c2,
            &n1,
            Some(node("c2", "n1", &[("InternalIP", "198.18.2.11")])),
        );
        t.apply(&c3, &n2, Some(node("c3", "n2", &[])));
        let r = t.report();
        // Sorted by cluster, then name; the same name in two clusters is two nodes.
        let names: Vec<_> = r.iter().map(|n| (&*n.cluster, &*n.name)).collect();
        assert_eq!(names, [("c2", "n1"), ("c3", "n1"), ("c3", "n2")]);
        assert_eq!(
            r[0].tunnel_endpoint,
            Some("198.18.2.11".parse().expect("ip"))
        );
        assert_eq!(r[0].addresses, ["InternalIP 198.18.2.11"]);
        assert_eq!(r[0].pod_cidrs, ["10.244.1.0/24"]);
        // No InternalIP: the ExternalIP; no address at all: none.
        assert_eq!(r[1].tunnel_endpoint, Some("192.0.2.1".parse().expect("ip")));
        assert_eq!(r[2].tunnel_endpoint, None);
        assert_eq!(r[0].tunnel_endpoint_v6, None);

        // A dual-stack node: the first address of each family (InternalIP first).
        let c4: Arc<str> = Arc::from("c4");
        t.apply(
            &c4,
            &n1,
            Some(node(
                "c4",
                "n1",
                &[
                    ("ExternalIP", "2001:db8::9"),
                    ("InternalIP", "198.18.4.11"),
                    ("InternalIP", "2001:2:0:4::11"),
                ],
            )),
        );
        let r = t.report();
        assert_eq!(
            r[3].tunnel_endpoint,
            Some("198.18.4.11".parse().expect("ip"))
        );
        assert_eq!(
            r[3].tunnel_endpoint_v6,
            Some("2001:2:0:4::11".parse().expect("ip"))
        );
        t.remove_cluster("c4");

        // An update replaces, a delete removes only that node.
        t.apply(
            &c3,
            &n1,
            Some(node(
                "c3",
                "n1",
                &[("ExternalIP", "192.0.2.1"), ("InternalIP", "10.0.0.9")],
            )),
        );
        assert_eq!(
            t.report()[1].tunnel_endpoint,
            Some("10.0.0.9".parse().expect("ip"))
        );
        t.apply(&c3, &n2, None);
        assert_eq!(t.len(), 2);
        assert!(t.get("c3", "n2").is_none());

        t.remove_cluster("c3");
        assert_eq!(t.len(), 1);
        assert!(t.get("c2", "n1").is_some());
    }
}
