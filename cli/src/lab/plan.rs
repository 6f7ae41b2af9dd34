//! Names and addresses of the lab, as `docs/lab-datapath-contract.md` states them. Pure
//! functions. Pods' addresses, MACs and host interfaces are not planned here: the CNI plugin
//! chooses them (`cni.rs`), and the agent finds them in the kernel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use clustermesh_types::tunnel::{vxlan_mtu, DEFAULT_UNDERLAY_MTU};

use super::state::IpFamily;

/// Kubernetes namespace of every lab pod.
pub const POD_NAMESPACE: &str = "default";
/// The pods' gateway (a static neighbour entry pointing at the host-side veth).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The whole underlay; the only prefix the root namespace may route into the lab.
pub const UNDERLAY: &str = "198.18.0.0/15";
/// The router's leg towards the root namespace (subnet `198.18.0.0/24`, unused by clusters).
pub const ROUTER_ROOT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The root namespace's single address (on its one veth into the lab).
pub const ROOT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The whole IPv6 underlay (dual-stack labs; the documentation prefix, RFC 3849): cluster
/// `i`'s subnet is `2001:db8:0:<i>::/64`, written with `i`'s decimal digits as in
/// `198.18.<i>.0/24`.
pub const UNDERLAY6: &str = "2001:db8::/32";
/// Every IPv6 pod CIDR (`fd00:10:<i>:<j>::/64`) and VIP (`fd00:20::/108`) is in this ULA
/// prefix: the pods' one IPv6 route via their gateway.
pub const POD_ROUTE6: &str = "fd00::/8";
/// The agent's DNS server in an IPv6-only lab (`--dns-addr`), held on each node's `lo`:
/// inside [`POD_ROUTE6`], so the pods' one route reaches it (their IPv4 resolver,
/// [`GATEWAY`], is out of reach without IPv4).
pub const DNS_SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x53, 0, 0, 0, 0, 0, 0x53);
/// Name of every node's VXLAN device.
pub const VXLAN_DEV: &str = "cmvx0";
/// MTU of the VXLAN device and of the pods (1500 minus 50 bytes of VXLAN; the rule of
/// `clustermesh_types::tunnel`, by which the agent sizes the device it creates).
pub const OVERLAY_MTU: u32 = vxlan_mtu(DEFAULT_UNDERLAY_MTU, true);
/// The kernel datapath's VXLAN device over the IPv6 underlay (IPv6 pods' traffic; the
/// IPv4 one stays on [`VXLAN_DEV`]): a device's tunnel family is fixed by its `local`.
pub const VXLAN_DEV6: &str = "cmvx6";
/// MTU of [`VXLAN_DEV6`]: 1500 minus 70 bytes of VXLAN over IPv6. The pods' interface
/// keeps [`OVERLAY_MTU`]; a larger IPv6 packet gets a Packet Too Big from the node and the
/// pod's path MTU settles at this.
pub const OVERLAY_MTU6: u32 = vxlan_mtu(DEFAULT_UNDERLAY_MTU, false);
/// The echo answer: `{"pod":..,"node":..,"cluster":..}`.
pub const ECHO_PORT: u16 = 8080;
/// Echoes every byte back (request/response latency).
pub const STREAM_PORT: u16 = 8081;
/// Discards what it reads, then answers with the byte count (throughput).
pub const SINK_PORT: u16 = 8082;
/// etcd client port on the control-plane address (the Deployment's etcd sidecar's).
pub const ETCD_PORT: u16 = 2379;
/// apiserver `/readyz`, `/status` (the Deployment's health port).
pub const APISERVER_HEALTH_PORT: u16 = 9880;
/// Agent `/readyz`, `/status`, `/metrics`.
pub const AGENT_HEALTH_PORT: u16 = 9890;

/// Largest sizes the address plan allows (`198.18.<i>`, `.<10+j>`, `.<10+k>`).
pub const MAX_CLUSTERS: u32 = 100;
/// See [`MAX_CLUSTERS`].
pub const MAX_NODES: u32 = 200;
/// See [`MAX_CLUSTERS`].
pub const MAX_PODS: u32 = 200;

/// Cluster `i`'s name.
pub fn cluster_name(i: u32) -> String {
    format!("c{i}")
}

/// Node `j`'s name (unique within its cluster).
pub fn node_name(j: u32) -> String {
    format!("n{j}")
}

/// Pod `k` of node `j` (unique within its cluster).
pub fn pod_name(j: u32, k: u32) -> String {
    format!("echo-{j}-{k}")
}

/// Namespace names: `cm-<labid>-router`, `-c<i>-cp`, `-c<i>-n<j>`, `-c<i>-n<j>-p<k>`.
pub fn router_ns(lab: &str) -> String {
    format!("cm-{lab}-router")
}

/// See [`router_ns`].
pub fn cp_ns(lab: &str, i: u32) -> String {
    format!("cm-{lab}-c{i}-cp")
}

/// See [`router_ns`].
pub fn node_ns(lab: &str, i: u32, j: u32) -> String {
    format!("cm-{lab}-c{i}-n{j}")
}

/// See [`router_ns`].
pub fn pod_ns(lab: &str, i: u32, j: u32, k: u32) -> String {
    format!("cm-{lab}-c{i}-n{j}-p{k}")
}

/// Every namespace of lab `lab` starts with this.
pub fn ns_prefix(lab: &str) -> String {
    format!("cm-{lab}-")
}

/// The root namespace's veth into the router.
pub fn root_link(lab: &str) -> String {
    format!("cm-{lab}")
}

/// The router's bridge for cluster `i` (its leg into the cluster's subnet).
pub fn router_bridge(i: u32) -> String {
    format!("br{i}")
}

/// Router-side port of node `j` of cluster `i` (`j == 0`: the control plane).
pub fn router_port(i: u32, j: u32) -> String {
    if j == 0 {
        format!("c{i}cp")
    } else {
        format!("c{i}n{j}")
    }
}

/// Router address in cluster `i`'s subnet.
pub fn router_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, i as u8, 1)
}

/// Control plane (etcd + apiserver) of cluster `i`.
pub fn cp_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, i as u8, 2)
}

/// Underlay address of node `j` of cluster `i`.
pub fn node_ip(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, i as u8, (10 + j) as u8)
}

/// IPv6 address of the router in cluster `i`'s subnet (`2001:db8:0:<i>::1`).
pub fn router_ip6(i: u32) -> Ipv6Addr {
    v6(&format!("2001:db8:0:{i}::1"))
}

/// MTU of the pods' interfaces and of the eBPF datapath's VXLAN device in a lab of
/// `family`: [`OVERLAY_MTU`], or [`OVERLAY_MTU6`] when tunnels ride the IPv6 underlay (an
/// IPv6-only lab). Why not rely on path MTU discovery: a packet the agent redirects to
/// the VXLAN device (`bpf_redirect`) that is too big once encapsulated is dropped there
/// (the device counts a TX error) and no Packet Too Big reaches the pod, so bulk TCP
/// stalls while small packets pass (seen as a stream stuck at cwnd 1 in
/// bench-datapath-throughput --ip-family ipv6).
pub fn pod_mtu(family: IpFamily) -> u32 {
    if family.has_v4() {
        OVERLAY_MTU
    } else {
        OVERLAY_MTU6
    }
}

/// IPv6 address of the control plane of cluster `i` (`2001:db8:0:<i>::2`; IPv6-only labs).
pub fn cp_ip6(i: u32) -> Ipv6Addr {
    v6(&format!("2001:db8:0:{i}::2"))
}

/// The control plane's address in a lab of `family` (IPv6 only in an IPv6-only lab).
pub fn cp_addr(i: u32, family: IpFamily) -> IpAddr {
    if family.has_v4() {
        cp_ip(i).into()
    } else {
        cp_ip6(i).into()
    }
}

/// Node `j`'s underlay address in a lab of `family` (see [`cp_addr`]).
pub fn node_addr(i: u32, j: u32, family: IpFamily) -> IpAddr {
    if family.has_v4() {
        node_ip(i, j).into()
    } else {
        node_ip6(i, j).into()
    }
}

/// Node `j`'s pod CIDR in a lab of `family` (see [`cp_addr`]).
pub fn node_pod_cidr(i: u32, j: u32, family: IpFamily) -> String {
    if family.has_v4() {
        pod_cidr(i, j)
    } else {
        pod_cidr6(i, j)
    }
}

/// IPv6 underlay address of node `j` of cluster `i` (`2001:db8:0:<i>::<10+j>`, the digits
/// of the IPv4 plan).
pub fn node_ip6(i: u32, j: u32) -> Ipv6Addr {
    v6(&format!("2001:db8:0:{i}::{}", 10 + j))
}

/// IPv6 pod CIDR of node `j` of cluster `i` (`fd00:10:<i>:<j>::/64`; pods from `::11`).
pub fn pod_cidr6(i: u32, j: u32) -> String {
    format!("fd00:10:{i}:{j}::/64")
}

/// The plan writes decimal numbers ≤ 210 into hexadecimal groups: always an address.
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
}

/// Pod CIDR of node `j` of cluster `i`.
pub fn pod_cidr(i: u32, j: u32) -> String {
    format!("10.{i}.{j}.0/24")
}

/// Address of pod `k` on node `j` of cluster `i`.
pub fn pod_ip(i: u32, j: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, i as u8, j as u8, (10 + k) as u8)
}

/// etcd client endpoint of the control plane at `cp` (`https://` + this; an IPv6 one is
/// written `[addr]:port`).
pub fn etcd_listen(cp: IpAddr) -> SocketAddr {
    SocketAddr::new(cp, ETCD_PORT)
}

/// apiserver health address of the control plane at `cp`.
pub fn apiserver_health(cp: IpAddr) -> SocketAddr {
    SocketAddr::new(cp, APISERVER_HEALTH_PORT)
}

/// Agent health address of the node at `node` (its underlay address).
pub fn agent_health(node: IpAddr) -> SocketAddr {
    SocketAddr::new(node, AGENT_HEALTH_PORT)
}

/// MAC of a node's VXLAN device in the kernel (no-eBPF) datapath: `0a:59:` + underlay IP
/// (its last four bytes for an IPv6 one), so that every node knows its peers' overlay MACs
/// without learning.
pub fn kernel_vxlan_mac(node_ip: impl Into<IpAddr>) -> String {
    let o = match node_ip.into() {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let b = a.octets();
            [b[12], b[13], b[14], b[15]]
        }
    };
    format!("0a:59:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// MAC of a node's IPv6 VXLAN device ([`VXLAN_DEV6`]) in the kernel datapath: `0a:66:`
/// followed by the cluster and node groups of its IPv6 underlay address
/// (`2001:db8:0:<i>::<10+j>`), unique within the lab's plan.
pub fn kernel_vxlan_mac6(node_ip6: Ipv6Addr) -> String {
    let o = node_ip6.octets();
    format!(
        "0a:66:{:02x}:{:02x}:{:02x}:{:02x}",
        o[6], o[7], o[14], o[15]
    )
}

/// The link-local address a node's [`VXLAN_DEV6`] forms from [`kernel_vxlan_mac6`]
/// (EUI-64): its peers' next hop for its IPv6 pod CIDR. A global next hop cannot be used:
/// the peer's underlay address is on-link on `eth0`, and the kernel refuses an `onlink`
/// IPv6 gateway that its routes put on another device.
pub fn kernel_vxlan_ll6(node_ip6: Ipv6Addr) -> Ipv6Addr {
    let o = node_ip6.octets();
    let m = [0x0a ^ 0x02, 0x66, o[6], o[7], o[14], o[15]];
    Ipv6Addr::from([
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, m[0], m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5],
    ])
}

/// A short random lab ID (4 hex chars) so interface and namespace names stay short.
pub fn new_lab_id() -> String {
    let mut b = [0u8; 2];
    // Uniqueness only has to hold among the labs on this machine.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
            ^ std::process::id();
        b = [(t >> 8) as u8, t as u8];
    }
    format!("{:02x}{:02x}", b[0], b[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_follow_the_contract() {
        assert_eq!(node_ip(2, 1).to_string(), "198.18.2.11");
        assert_eq!(cp_ip(3).to_string(), "198.18.3.2");
        assert_eq!(pod_ip(1, 2, 3).to_string(), "10.1.2.13");
        assert_eq!(pod_ns("ab12", 1, 2, 3), "cm-ab12-c1-n2-p3");
        assert!(router_port(MAX_CLUSTERS, MAX_NODES).len() <= 15);
        assert_eq!(node_ip6(2, 1).to_string(), "2001:db8:0:2::11");
        assert_eq!(router_ip6(MAX_CLUSTERS).to_string(), "2001:db8:0:100::1");
        assert_eq!(
            node_ip6(MAX_CLUSTERS, MAX_NODES).to_string(),
            "2001:db8:0:100::210"
        );
        assert_eq!(pod_cidr6(1, 2), "fd00:10:1:2::/64");
        assert_eq!(kernel_vxlan_mac6(node_ip6(2, 1)), "0a:66:00:02:00:11");
        assert_eq!(
            kernel_vxlan_ll6(node_ip6(2, 1)).to_string(),
            "fe80::866:ff:fe02:11"
        );
        assert_eq!(cp_addr(3, IpFamily::Ipv6).to_string(), "2001:db8:0:3::2");
        assert_eq!(cp_addr(3, IpFamily::Dual).to_string(), "198.18.3.2");
        assert_eq!(
            etcd_listen(cp_addr(1, IpFamily::Ipv6)).to_string(),
            "[2001:db8:0:1::2]:2379"
        );
        assert_eq!(node_pod_cidr(1, 2, IpFamily::Ipv6), "fd00:10:1:2::/64");
        assert!(POD_ROUTE6.starts_with("fd00::") && DNS_SERVER6.segments()[0] == 0xfd00);
    }
}
