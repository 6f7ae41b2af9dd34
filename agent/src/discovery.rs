//! Pod discovery: which host-side interface reaches each local endpoint, read from the
//! kernel's own tables, whatever CNI plugin made it (DESIGN.md decision 10). No naming rule:
//!
//! * **route** (ptp-style plugins, `clustermesh-cni`): the most specific main-table route to
//!   the pod's IP leaves through a veth → that veth; the pod's MAC is the veth peer's,
//!   read by netns id (`IFLA_TARGET_NETNSID`), else the neighbour table's entry;
//! * **bridge** (bridge-style plugins): the route leaves through a bridge → the bridge port
//!   whose pod holds the IP: the neighbour table's MAC for the IP looked up in the bridge's
//!   FDB (`bridge-fdb`), else each veth port's peer addresses read by netns id
//!   (`bridge-port`). The gateway MAC the pod knows is the bridge's.
//!
//! A veth that no local endpoint resolves to is **skipped** (counted in `/status`): the
//! agent never attaches to an interface it cannot tie to a local endpoint.
//!
//! [`Watcher`] follows `RTM_NEWLINK`/`RTM_DELLINK`, `RTM_NEWROUTE`/`RTM_DELROUTE` and
//! neighbour notifications and wakes the reconcile loop (coalesced), instead of a poll.
//!
//! It must not create, change or delete interfaces, routes or neighbours.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use clustermesh_rtnl::{Link, Neighbour, Route, Route6, Socket};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How a pod's interface was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// A route to the pod's IP through a veth.
    Route,
    /// The pod's MAC (neighbour table) on a bridge port (FDB).
    BridgeFdb,
    /// A bridge port whose peer holds the pod's IP.
    BridgePort,
}

/// Where the pod's MAC came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MacFrom {
    /// The veth's peer in the pod's namespace.
    VethPeer,
    /// The node's neighbour table.
    Neighbour,
}

/// A local endpoint's interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The host-side interface `from_pod` attaches to and delivery redirects to.
    pub interface: String,
    /// Its index.
    pub ifindex: u32,
    /// The source MAC of delivered frames: the gateway the pod knows (the veth itself, or
    /// the bridge).
    pub host_mac: [u8; 6],
    /// The pod's MAC.
    pub pod_mac: [u8; 6],
    /// How it was found.
    pub how: How,
    /// Where the pod MAC came from.
    pub mac_from: MacFrom,
}

/// What the kernel holds now, read once per pod sync (a few dumps; ~1 ms with 200 pods).
#[derive(Debug)]
pub struct Snapshot {
    links: HashMap<u32, Link>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
    fdb: Vec<Neighbour>,
    /// Bridge ports' peer addresses, read on demand.
    port_addrs: HashMap<u32, Vec<Ipv4Addr>>,
    /// IPv6 routes, read on the first IPv6-only pod ([`Snapshot::find6`]).
    routes6: Option<Vec<Route6>>,
}

impl Snapshot {
    /// Reads links, IPv4 routes, neighbours and the bridge FDB.
    pub fn read(sock: &mut Socket) -> clustermesh_rtnl::Result<Self> {
        let links = sock
            .links()?
            .into_iter()
            .map(|l| (l.ifindex, l))
            .collect::<HashMap<_, _>>();
        let has_bridge = links.values().any(|l| l.kind == "bridge");
        Ok(Self {
            routes: sock.routes_v4()?,
            neighbours: sock.neighbours(false)?,
            fdb: if has_bridge {
                sock.neighbours(true)?
            } else {
                Vec::new()
            },
            links,
            port_addrs: HashMap::new(),
            routes6: None,
        })
    }

    /// Interface `ifindex`.
    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.get(&ifindex)
    }

    /// Veths in this namespace: the interfaces a pod could be behind.
    pub fn veths(&self) -> impl Iterator<Item = &Link> {
        self.links.values().filter(|l| l.kind == "veth")
    }

    /// The most specific route to `ip`.
    fn route_to(&self, ip: Ipv4Addr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.oif.is_some() && contains(r.dst, r.prefix_len, ip))
            .max_by_key(|r| r.prefix_len)
    }

    fn neighbour_mac(&self, ifindex: u32, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.neighbours
            .iter()
            .find(|n| n.ifindex == ifindex && n.ip == Some(ip) && n.usable())
            .and_then(|n| n.mac)
    }

    fn peer_mac(&self, sock: &mut Socket, veth: &Link) -> Option<[u8; 6]> {
        let (nsid, peer) = (veth.link_netnsid?, veth.link?);
        match sock.link_in_netnsid(nsid, peer) {
            Ok(l) => l.and_then(|l| l.mac6()),
            Err(error) => {
                debug!(interface = %veth.name, %error, "reading the veth peer failed");
                None
            }
        }
    }

    fn peer_addrs(&mut self, sock: &mut Socket, port: &Link) -> Vec<Ipv4Addr> {
        if let Some(a) = self.port_addrs.get(&port.ifindex) {
            return a.clone();
        }
        let addrs = match (port.link_netnsid, port.link) {
            (Some(nsid), Some(peer)) => sock
                .addresses_v4_in_netnsid(nsid, peer)
                .unwrap_or_else(|error| {
                    debug!(interface = %port.name, %error, "reading the port peer's addresses failed");
                    Vec::new()
                }),
            _ => Vec::new(),
        };
        self.port_addrs.insert(port.ifindex, addrs.clone());
        addrs
    }

    /// The interface that reaches `ip`, or why none does (for `/status`).
    pub fn find(&mut self, sock: &mut Socket, ip: Ipv4Addr) -> Result<Found, String> {
        let route = self
            .route_to(ip)
            .ok_or_else(|| format!("no route to {ip}"))?
            .clone();
        let oif = route.oif.unwrap_or_default();
        let dev = self
            .links
            .get(&oif)
            .cloned()
            .ok_or_else(|| format!("the route to {ip} leaves through unknown link #{oif}"))?;
        match dev.kind.as_str() {
            "veth" => {
                let host_mac = dev
                    .mac6()
                    .ok_or_else(|| format!("{} has no Ethernet address", dev.name))?;
                let (pod_mac, mac_from) = match self.peer_mac(sock, &dev) {
                    Some(m) => (m, MacFrom::VethPeer),
                    None => (
                        self.neighbour_mac(dev.ifindex, ip).ok_or_else(|| {
                            format!(
                                "{}: neither its peer nor the neighbour table gives the pod's MAC",
                                dev.name
                            )
                        })?,
                        MacFrom::Neighbour,
                    ),
                };
                Ok(Found {
                    interface: dev.name.clone(),
                    ifindex: dev.ifindex,
                    host_mac,
                    pod_mac,
                    how: How::Route,
                    mac_from,
                })
            }
            "bridge" => self.find_on_bridge(sock, &dev, ip),
            kind => Err(format!(
                "the route to {ip} leaves through {} ({}), not a veth or a bridge",
                dev.name,
                if kind.is_empty() { "device" } else { kind }
            )),
        }
    }

    /// The interface that reaches an IPv6-only pod: the most specific IPv6 route to `ip`
    /// must lead to a veth, and the pod's MAC is its peer's (no bridge, no neighbour table:
    /// a dual-stack pod is found through its IPv4 address instead).
    pub fn find6(&mut self, sock: &mut Socket, ip: Ipv6Addr) -> Result<Found, String> {
        if self.routes6.is_none() {
            let routes = sock
                .routes_v6()
                .map_err(|e| format!("reading the IPv6 routes failed: {e}"))?;
            self.routes6 = Some(routes);
        }
        let bits = u128::from(ip);
        let oif = self
            .routes6
            .iter()
            .flatten()
            .filter(|r| {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(r.prefix_len.min(128)))
                    .unwrap_or(0);
                r.oif.is_some() && u128::from(r.dst) & mask == bits & mask
            })
            .max_by_key(|r| r.prefix_len)
            .and_then(|r| r.oif)
            .ok_or_else(|| format!("no IPv6 route to {ip}"))?;
        let dev = self
            .links
            .get(&oif)
            .cloned()
            .ok_or_else(|| format!("the route to {ip} leaves through unknown link #{oif}"))?;
        if dev.kind != "veth" {
            return Err(format!(
                "the route to {ip} leaves through {}, not a veth (an IPv6-only pod must be behind a routed veth)",
                dev.name
            ));
        }
        let host_mac = dev
            .mac6()
            .ok_or_else(|| format!("{} has no Ethernet address", dev.name))?;
        let pod_mac = self
            .peer_mac(sock, &dev)
            .ok_or_else(|| format!("{}: the pod side's MAC cannot be read", dev.name))?;
        Ok(Found {
            interface: dev.name.clone(),
            ifindex: dev.ifindex,
            host_mac,
            pod_mac,
            how: How::Route,
            mac_from: MacFrom::VethPeer,
        })
    }

    fn find_on_bridge(
        &mut self,
        sock: &mut Socket,
        bridge: &Link,
        ip: Ipv4Addr,
    ) -> Result<Found, String> {
        let host_mac = bridge
            .mac6()
            .ok_or_else(|| format!("bridge {} has no Ethernet address", bridge.name))?;
        // The neighbour table's MAC, on the port the FDB learnt it on.
        if let Some(mac) = self.neighbour_mac(bridge.ifindex, ip) {
            let port = self
                .fdb
                .iter()
                .find(|f| f.mac == Some(mac) && f.master == Some(bridge.ifindex) && !f.local)
                .and_then(|f| self.links.get(&f.ifindex))
                .filter(|l| l.kind == "veth" && l.master == Some(bridge.ifindex));
            if let Some(port) = port {
                return Ok(Found {
                    interface: port.name.clone(),
                    ifindex: port.ifindex,
                    host_mac,
                    pod_mac: mac,
                    how: How::BridgeFdb,
                    mac_from: MacFrom::Neighbour,
                });
            }
        }
        // Else the port whose pod side holds the address.
        let ports: Vec<Link> = self
            .links
            .values()
            .filter(|l| l.kind == "veth" && l.master == Some(bridge.ifindex))
            .cloned()
            .collect();
        for port in &ports {
            if self.peer_addrs(sock, port).contains(&ip) {
                let pod_mac = self
                    .peer_mac(sock, port)
                    .ok_or_else(|| format!("{}: the pod side's MAC cannot be read", port.name))?;
                return Ok(Found {
                    interface: port.name.clone(),
                    ifindex: port.ifindex,
                    host_mac,
                    pod_mac,
                    how: How::BridgePort,
                    mac_from: MacFrom::VethPeer,
                });
            }
        }
        Err(format!(
            "no port of bridge {} leads to {ip} ({} veth ports)",
            bridge.name,
            ports.len()
        ))
    }
}

fn contains(net: Ipv4Addr, len: u8, ip: Ipv4Addr) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(net) & mask == u32::from(ip) & mask
}

/// Follows link, route and neighbour notifications; sends one wake-up per burst on a
/// channel of capacity 1 (a pending wake-up already covers later changes).
///
/// Neighbour entries change state all the time (reachable → stale → delay → probe, every
/// few seconds per entry): only an entry that appears, disappears or changes its MAC wakes
/// the loop, or an idle node with many pods would re-read the kernel over and over.
#[derive(Debug)]
pub struct Watcher {
    sock: AsyncFd<Socket>,
    /// Usable neighbour and FDB entries seen: (family is bridge, ifindex, IP) → MAC.
    neighbours: NeighbourSeen,
}

type NeighbourSeen = HashMap<(bool, u32, Option<Ipv4Addr>, Option<[u8; 6]>), Option<[u8; 6]>>;

impl Watcher {
    /// Whether `ev` can change what [`Snapshot::find`] answers (`seen`: the watcher's
    /// neighbour entries).
    fn relevant(seen: &mut NeighbourSeen, ev: &clustermesh_rtnl::Event) -> bool {
        use clustermesh_rtnl::Event;
        let key = |n: &Neighbour| {
            // FDB entries have no IP: their MAC is their identity.
            let fdb = n.ip.is_none();
            (fdb, n.ifindex, n.ip, if fdb { n.mac } else { None })
        };
        match ev {
            Event::NewNeighbour(n) if n.usable() => seen.insert(key(n), n.mac) != Some(n.mac),
            Event::NewNeighbour(n) | Event::DelNeighbour(n) => seen.remove(&key(n)).is_some(),
            _ => true,
        }
    }
}

impl Watcher {
    /// Subscribes (in the agent's namespace).
    pub fn new() -> std::io::Result<Self> {
        use clustermesh_rtnl::groups;
        let sock = Socket::subscribe(&[groups::LINK, groups::IPV4_ROUTE, groups::NEIGH], true)
            .map_err(std::io::Error::other)?;
        // SAFETY: the fd is the netlink socket's, owned by `sock`, which the AsyncFd owns
        // for as long as it is registered: it stays open and is never replaced.
        let sock = unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self {
            sock,
            neighbours: HashMap::new(),
        })
    }

    /// Runs until cancelled, waking `tx` after every burst of changes (and after lost
    /// notifications, which a full re-read covers).
    pub async fn run(mut self, tx: mpsc::Sender<()>, token: CancellationToken) {
        loop {
            let mut guard = tokio::select! {
                _ = token.cancelled() => return,
                g = self.sock.readable_mut() => match g {
                    Ok(g) => g,
                    Err(error) => {
                        warn!(%error, "netlink notifications cannot be read; pods are synced on cluster changes only");
                        return;
                    }
                },
            };
            let mut any = false;
            loop {
                match guard.get_inner_mut().recv_events() {
                    Ok(Some(events)) => {
                        for ev in &events {
                            any |= Self::relevant(&mut self.neighbours, ev);
                        }
                    }
                    Ok(None) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(error) => {
                        // ENOBUFS: notifications were dropped; re-reading everything covers them.
                        debug!(%error, "netlink notification lost; re-reading the kernel's tables");
                        any = true;
                    }
                }
            }
            if any {
                let _ = tx.try_send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_state_churn_does_not_wake_the_loop() {
        use clustermesh_rtnl::netlink_packet_route::neighbour::NeighbourState;
        use clustermesh_rtnl::Event;
        let n = |state, mac: [u8; 6]| Neighbour {
            ifindex: 7,
            ip: Some(Ipv4Addr::new(10, 1, 1, 11)),
            mac: Some(mac),
            master: None,
            state,
            local: false,
        };
        let mut seen = NeighbourSeen::new();
        let a = [2, 0, 0, 0, 0, 1];
        assert!(Watcher::relevant(
            &mut seen,
            &Event::NewNeighbour(n(NeighbourState::Reachable, a))
        ));
        assert!(!Watcher::relevant(
            &mut seen,
            &Event::NewNeighbour(n(NeighbourState::Stale, a))
        ));
        assert!(!Watcher::relevant(
            &mut seen,
            &Event::NewNeighbour(n(NeighbourState::Delay, a))
        ));
        assert!(Watcher::relevant(
            &mut seen,
            &Event::NewNeighbour(n(NeighbourState::Reachable, [2, 0, 0, 0, 0, 2]))
        ));
        assert!(Watcher::relevant(
            &mut seen,
            &Event::DelNeighbour(n(NeighbourState::Stale, a))
        ));
        assert!(!Watcher::relevant(
            &mut seen,
            &Event::DelNeighbour(n(NeighbourState::Stale, a))
        ));
    }

    #[test]
    fn prefix_containment() {
        let n = Ipv4Addr::new(10, 1, 1, 0);
        assert!(contains(n, 24, Ipv4Addr::new(10, 1, 1, 9)));
        assert!(!contains(n, 24, Ipv4Addr::new(10, 1, 2, 9)));
        assert!(contains(
            Ipv4Addr::UNSPECIFIED,
            0,
            Ipv4Addr::new(1, 2, 3, 4)
        ));
        assert!(contains(
            Ipv4Addr::new(10, 1, 1, 9),
            32,
            Ipv4Addr::new(10, 1, 1, 9)
        ));
    }
}
