//! The lab's network: router namespace and bridges, the single root veth, control-plane and
//! node namespaces with their underlay legs and VXLAN devices, pods' veths, and the static
//! forwarding of the kernel datapath.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::state::{Cluster, Datapath, LabState, Node, Pod};
use super::{cni, netns, plan, route_lock};

/// Where pods send DNS queries: the agent's DNS server on the node (`--dns-addr`), on the
/// pods' gateway address, which the node holds on `lo`.
pub const DNS_SERVER: Ipv4Addr = plan::GATEWAY;

fn add_ns(st: &mut LabState, ns: &str) -> anyhow::Result<()> {
    netns::add(ns)?;
    st.namespaces.push(ns.to_owned());
    Ok(())
}

/// Router, bridges, control-plane and node namespaces, VXLAN, pods.
pub(super) fn build_network(st: &mut LabState) -> anyhow::Result<()> {
    let router = st.router_ns.clone();
    add_ns(st, &router)?;
    let families: Vec<Family> = Family::of(st).collect();
    for f in &families {
        netns::sysctl(&router, f.forwarding(), "1")?;
    }
    let v6 = st.ip_family.has_v6();
    // The single root veth, unless another lab already routes the underlay from here (or
    // the lab has no IPv4 underlay: an IPv6-only lab is reached from the router namespace
    // only, so it adds no route at all to the root namespace). Check and add are one step
    // under the route lock: two `lab up` at once would both see the route free.
    let route_lock = if st.ip_family.has_v4() {
        Some(route_lock::take(&st.id)?)
    } else {
        None
    };
    let owner = if route_lock.is_some() {
        route_lock::underlay_route()?
    } else {
        None
    };
    if !st.ip_family.has_v4() {
        println!("ℹ️  IPv6-only lab: no root veth; the CLI enters the router namespace");
    } else if let Some(owner) = owner {
        println!(
            "ℹ️  The root namespace already routes {} through {owner}: no root veth; the CLI enters the router namespace instead",
            plan::UNDERLAY
        );
    } else {
        let link = plan::root_link(&st.id);
        netns::ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "root0", "netns", &router,
        ])?;
        st.root_link = Some(link.clone());
        netns::ip_in(
            &router,
            &[
                "addr",
                "add",
                &format!("{}/24", plan::ROUTER_ROOT_IP),
                "dev",
                "root0",
            ],
        )?;
        netns::ip_in(&router, &["link", "set", "root0", "up"])?;
        netns::ip(&[
            "addr",
            "add",
            &format!("{}/24", plan::ROOT_IP),
            "dev",
            &link,
            "noprefixroute",
        ])?;
        netns::ip(&["link", "set", &link, "up"])?;
        netns::ip(&[
            "route",
            "add",
            plan::UNDERLAY,
            "via",
            &plan::ROUTER_ROOT_IP.to_string(),
            "dev",
            &link,
            "onlink",
        ])
        .map_err(|e| match route_lock::underlay_route() {
            // Added meanwhile by something that does not take the lock (an older `lab up`).
            Ok(Some(owner)) => anyhow::anyhow!(
                "lab {}: the root namespace's route to {} was added by {owner} while this lab checked it: `clustermesh lab down` that lab or retry ({e:#})",
                st.id,
                plan::UNDERLAY
            ),
            _ => e,
        })?;
    }
    drop(route_lock);
    let clusters = st.clusters.clone();
    for c in &clusters {
        let br = plan::router_bridge(c.id);
        netns::ip_in(&router, &["link", "add", &br, "type", "bridge"])?;
        for f in &families {
            f.add_addr(&router, f.gateway(c.id), &br)?;
        }
        netns::ip_in(&router, &["link", "set", &br, "up"])?;
        // Control plane (IPv6 only in an IPv6-only lab).
        add_ns(st, &c.ns)?;
        underlay_link(&router, c.id, 0, &c.ns)?;
        for f in &families {
            if let Some(ip) = f.cp_addr(c) {
                f.leg(&c.ns, ip, c.id)?;
            }
        }
        // Nodes: a leg per family, and forwarding for their pods in it.
        for (j, node) in (1u32..).zip(&c.nodes) {
            add_ns(st, &node.ns)?;
            underlay_link(&router, c.id, j, &node.ns)?;
            for f in &families {
                if let Some(ip) = f.node_addr(node) {
                    for (key, value) in f.node_sysctls() {
                        netns::sysctl(&node.ns, key, value)?;
                    }
                    f.leg(&node.ns, ip, c.id)?;
                }
            }
            // The pods' resolver address answers locally (the agent's DNS server binds it):
            // the gateway address, or in an IPv6-only lab an address in the pods' route.
            netns::ip_in(&node.ns, &["link", "set", "lo", "up"])?;
            let dns = match dns_server(st) {
                IpAddr::V4(a) => format!("{a}/32"),
                IpAddr::V6(a) => format!("{a}/128"),
            };
            let mut add_dns = vec!["addr", "add", dns.as_str(), "dev", "lo"];
            if !st.ip_family.has_v4() {
                add_dns.push("nodad");
            }
            netns::ip_in(&node.ns, &add_dns)?;
            let mtu = plan::pod_mtu(st.ip_family).to_string();
            match st.datapath {
                // The agent creates its VXLAN device (external mode, eth0's MTU less VXLAN:
                // plan::pod_mtu), as on a Kubernetes node where nothing else does.
                Datapath::Ebpf => String::new(),
                // An IPv6-only node has only `cmvx6` (below): its `ip` is the IPv6 one.
                Datapath::Kernel if !node.ip.is_ipv4() => String::new(),
                Datapath::Kernel => netns::ip_in(
                    &node.ns,
                    &[
                        "link",
                        "add",
                        plan::VXLAN_DEV,
                        "address",
                        &plan::kernel_vxlan_mac(node.ip),
                        "type",
                        "vxlan",
                        "id",
                        "1",
                        "dstport",
                        "4789",
                        "local",
                        &node.ip.to_string(),
                        "nolearning",
                    ],
                )?,
            };
            if st.datapath == Datapath::Kernel && node.ip.is_ipv4() {
                netns::ip_in(
                    &node.ns,
                    &["link", "set", plan::VXLAN_DEV, "mtu", &mtu, "up"],
                )?;
            }
            if let (Datapath::Kernel, Some(ip6)) = (st.datapath, node.ip6) {
                kernel_vxlan6(&node.ns, ip6)?;
            }
            for k in 0..node.pods.len() {
                let pod_ns = node.pods[k].ns.clone();
                add_ns(st, &pod_ns)?;
                if v6 {
                    // The pod's eth0 is created in this namespace's defaults: no DAD (the
                    // plugin would wait a second per pod for its address to settle).
                    netns::sysctl(&pod_ns, "net/ipv6/conf/default/accept_dad", "0")?;
                    netns::sysctl(&pod_ns, "net/ipv6/conf/all/accept_dad", "0")?;
                }
                let mut pod = node.pods[k].clone();
                let res = build_pod(st, node, &mut pod);
                if let Some(p) = st
                    .clusters
                    .iter_mut()
                    .flat_map(|c| c.nodes.iter_mut())
                    .flat_map(|n| n.pods.iter_mut())
                    .find(|p| p.ns == pod_ns)
                {
                    *p = pod;
                }
                res?;
            }
        }
    }
    if st.datapath == Datapath::Kernel {
        kernel_forwarding(st)?;
    }
    Ok(())
}

/// A veth from the router's bridge of cluster `i` to `eth0` in `ns`, up; its addresses
/// and routes come per family ([`Family::leg`]).
fn underlay_link(router: &str, i: u32, j: u32, ns: &str) -> anyhow::Result<()> {
    let port = plan::router_port(i, j);
    netns::ip_in(
        router,
        &[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
    )?;
    netns::ip_in(
        router,
        &[
            "link",
            "set",
            &port,
            "master",
            &plan::router_bridge(i),
            "up",
        ],
    )?;
    // The underlay behaves like a physical network for both datapaths: the router's ports
    // send wire-sized frames (no TSO: a routed 64 KiB tunnel packet is cut into MTU-sized
    // ones, as it would be on a cable), and each namespace's `eth0` aggregates what it
    // receives (GRO, as NICs do by default; a veth aggregates only with GRO on and a peer
    // without TSO).
    netns::ethtool_in(router, &["-K", &port, "tso", "off"])?;
    netns::ethtool_in(ns, &["-K", "eth0", "gro", "on"])?;
    netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
    Ok(())
}

/// One address family of the underlay: the router's address on each cluster's bridge
/// (the gateway of that cluster's legs), the legs' addresses and their one route (the
/// family's underlay prefix only, never a default route), and what a node needs to
/// forward its pods' traffic in it. `build_network` iterates the lab's families
/// ([`Family::of`]) instead of asking at each step which ones the lab has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The lab's underlay families, IPv4 first (`--ip-family ipv4|dual|ipv6`).
    fn of(st: &LabState) -> impl Iterator<Item = Family> {
        [
            (Family::V4, st.ip_family.has_v4()),
            (Family::V6, st.ip_family.has_v6()),
        ]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
    }

    /// The sysctl that lets a namespace forward this family.
    fn forwarding(self) -> &'static str {
        match self {
            Family::V4 => "net/ipv4/ip_forward",
            Family::V6 => "net/ipv6/conf/all/forwarding",
        }
    }

    /// A node's sysctls in this family: forwarding for its pods; for IPv6 also no DAD on
    /// the host ends of the pods' veths (the CNI plugin puts the gateway there).
    fn node_sysctls(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::V4 => &[("net/ipv4/ip_forward", "1")],
            Family::V6 => &[
                ("net/ipv6/conf/all/forwarding", "1"),
                ("net/ipv6/conf/default/accept_dad", "0"),
            ],
        }
    }

    /// The router's address on cluster `i`'s bridge: the gateway of its legs.
    fn gateway(self, i: u32) -> IpAddr {
        match self {
            Family::V4 => plan::router_ip(i).into(),
            Family::V6 => plan::router_ip6(i).into(),
        }
    }

    /// The control plane's underlay address in this family (an IPv6-only lab's control
    /// plane has only an IPv6 one, a dual-stack lab's only an IPv4 one).
    fn cp_addr(self, c: &Cluster) -> Option<IpAddr> {
        (self.is(c.ip)).then_some(c.ip)
    }

    /// A node's underlay address in this family (`ip6`, or `ip` of the family).
    fn node_addr(self, n: &Node) -> Option<IpAddr> {
        match self {
            Family::V4 => self.is(n.ip).then_some(n.ip),
            Family::V6 => n.ip6.map(IpAddr::V6),
        }
    }

    fn is(self, ip: IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }

    /// `ip addr add <ip>/<prefix> dev <dev>` in `ns`; IPv6 with `nodad`: the lab made
    /// every address, none can be a duplicate, and DAD would hold each one back
    /// (tentative) for a second.
    fn add_addr(self, ns: &str, ip: IpAddr, dev: &str) -> anyhow::Result<()> {
        let addr = match self {
            Family::V4 => format!("{ip}/24"),
            Family::V6 => format!("{ip}/64"),
        };
        let mut args = vec!["addr", "add", addr.as_str(), "dev", dev];
        if self == Family::V6 {
            args.push("nodad");
        }
        netns::ip_in(ns, &args).map(drop)
    }

    /// `ns`'s underlay leg in this family: `ip` on `eth0` and a route for the family's
    /// underlay prefix via the router's bridge of cluster `i`.
    fn leg(self, ns: &str, ip: IpAddr, i: u32) -> anyhow::Result<()> {
        self.add_addr(ns, ip, "eth0")?;
        let gw = self.gateway(i).to_string();
        let route = ["route", "add", self.underlay(), "via", &gw, "dev", "eth0"];
        match self {
            Family::V4 => netns::ip_in(ns, &route),
            Family::V6 => netns::ip_in(ns, &[&["-6"][..], &route[..]].concat()),
        }
        .map(drop)
    }

    /// The family's underlay prefix.
    fn underlay(self) -> &'static str {
        match self {
            Family::V4 => plan::UNDERLAY,
            Family::V6 => plan::UNDERLAY6,
        }
    }
}

/// Wires the pod through the lab's CNI plugin (ADD, as a runtime does) and records what
/// the plugin chose; writes the pod's resolver file.
fn build_pod(st: &LabState, node: &Node, pod: &mut Pod) -> anyhow::Result<()> {
    let added = cni::add(st, node, pod)?;
    pod.ip6 = added.ip6;
    let ip = if st.ip_family.has_v4() {
        added.ip.map(IpAddr::from)
    } else {
        added.ip6.map(IpAddr::from)
    };
    let missing = match (added.ip, added.ip6) {
        (None, _) if st.ip_family.has_v4() => Some("IPv4"),
        (_, None) if st.ip_family.has_v6() => Some("IPv6"),
        _ => None,
    };
    if let Some(family) = missing {
        bail!(
            "the CNI plugin gave {} no {family} address (--ip-family {:?})",
            pod.ns,
            st.ip_family
        );
    }
    pod.ip = ip.context("the CNI result has no address")?;
    if added.ip.is_some() && !st.ip_family.has_v4() {
        bail!(
            "the CNI plugin gave {} an IPv4 address in an IPv6-only lab",
            pod.ns
        );
    }
    pod.mac = added.mac;
    pod.host_veth = added.host_if;
    // The pod's resolver: `ip netns exec` bind-mounts this over /etc/resolv.conf.
    let resolv = netns_resolv_conf(&pod.ns);
    if let Some(dir) = resolv.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(
        &resolv,
        format!(
            "# clustermesh lab: the agent's DNS on the node\nnameserver {}\noptions timeout:1 attempts:2\n",
            dns_server(st)
        ),
    )
    .with_context(|| format!("writing {}", resolv.display()))?;
    Ok(())
}

/// The pods' resolver (the agent's `--dns-addr`): [`DNS_SERVER`], or in an IPv6-only lab
/// [`plan::DNS_SERVER6`].
pub(super) fn dns_server(st: &LabState) -> IpAddr {
    if st.ip_family.has_v4() {
        DNS_SERVER.into()
    } else {
        plan::DNS_SERVER6.into()
    }
}

/// Kernel datapath: every node reaches every other node's pod CIDR over `cmvx0` (VNI 1)
/// through a route, a permanent neighbour (the peer's VXLAN MAC) and an FDB entry (the
/// peer's underlay IP); with IPv6, every other node's IPv6 pod CIDR the same way over
/// `cmvx6` and the IPv6 underlay (an IPv6-only lab has only that). No learning, no
/// flooding, no eBPF.
fn kernel_forwarding(st: &LabState) -> anyhow::Result<()> {
    let all: Vec<&Node> = st.clusters.iter().flat_map(|c| &c.nodes).collect();
    for node in &all {
        for peer in all.iter().filter(|p| p.ns != node.ns) {
            // IPv4 (not in an IPv6-only lab, whose `ip`s are the IPv6 ones).
            if node.ip.is_ipv4() && peer.ip.is_ipv4() {
                let peer_ip = peer.ip.to_string();
                kernel_peer(
                    &node.ns,
                    plan::VXLAN_DEV,
                    &peer_ip,
                    &peer_ip,
                    &plan::kernel_vxlan_mac(peer.ip),
                    &peer.pod_cidr,
                )?;
            }
            if let (Some(_), Some(ip6), Some(cidr6)) = (node.ip6, peer.ip6, &peer.pod_cidr6) {
                kernel_peer(
                    &node.ns,
                    plan::VXLAN_DEV6,
                    &plan::kernel_vxlan_ll6(ip6).to_string(),
                    &ip6.to_string(),
                    &plan::kernel_vxlan_mac6(ip6),
                    cidr6,
                )?;
            }
        }
    }
    Ok(())
}

/// Kernel datapath, IPv6: a second VXLAN device, [`plan::VXLAN_DEV6`], with the node's IPv6
/// underlay address as `local` (a VXLAN device tunnels over one family, the one of its
/// `local`), so the pods' IPv6 traffic crosses nodes as plain kernel VXLAN over IPv6: the
/// baseline the eBPF datapath's IPv6 tunnels are measured against. VNI 1 as on
/// [`plan::VXLAN_DEV`]: the two devices bind UDP 4789 in different families.
fn kernel_vxlan6(ns: &str, ip6: Ipv6Addr) -> anyhow::Result<()> {
    netns::ip_in(
        ns,
        &[
            "link",
            "add",
            plan::VXLAN_DEV6,
            "address",
            &plan::kernel_vxlan_mac6(ip6),
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "4789",
            "local",
            &ip6.to_string(),
            "nolearning",
        ],
    )?;
    netns::ip_in(
        ns,
        &[
            "link",
            "set",
            plan::VXLAN_DEV6,
            "mtu",
            &plan::OVERLAY_MTU6.to_string(),
            "up",
        ],
    )
    .map(drop)
}

/// One static path of the kernel datapath from a node to a peer over `dev`: a permanent
/// neighbour (`next_hop` → the peer's VXLAN MAC), an FDB entry (that MAC → the peer's
/// underlay address `peer_ip`) and a route for the peer's pod CIDR via `next_hop`. IPv4
/// uses the peer's underlay address as the next hop (`onlink`), IPv6 the peer device's
/// link-local address ([`plan::kernel_vxlan_ll6`]). `ip` picks the family from the
/// addresses.
fn kernel_peer(
    ns: &str,
    dev: &str,
    next_hop: &str,
    peer_ip: &str,
    peer_mac: &str,
    peer_cidr: &str,
) -> anyhow::Result<()> {
    netns::ip_in(
        ns,
        &[
            "neigh",
            "add",
            next_hop,
            "lladdr",
            peer_mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )?;
    let out = std::process::Command::new("bridge")
        .args(["-n", ns, "fdb", "append", peer_mac])
        .args(["dev", dev, "dst", peer_ip])
        .output()
        .context("running `bridge` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`bridge fdb append {peer_mac} dev {dev} dst {peer_ip}` in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut route = vec!["route", "add", peer_cidr, "via", next_hop, "dev", dev];
    if next_hop == peer_ip {
        route.push("onlink");
    }
    netns::ip_in(ns, &route).map(drop)
}

/// The resolver file `ip netns exec <ns>` bind-mounts over `/etc/resolv.conf`.
pub fn netns_resolv_conf(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns).join("resolv.conf")
}
