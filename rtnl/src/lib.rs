//! Route netlink for the plugin and the agent: a blocking `NETLINK_ROUTE` socket with
//! request/acknowledge and dump helpers over `netlink-packet-route`'s message types, the
//! few typed facts callers need (links, IPv4 routes, neighbours and bridge FDB entries),
//! notification sockets, and network namespaces (a socket opened inside one stays bound to
//! it, so callers never switch their own thread's namespace).
//!
//! Why not `rtnetlink`: it is async-only, pulls in its own futures plumbing and a second
//! `nix`; a CNI plugin runs for a few milliseconds and wants none of that, and the agent
//! needs only dumps and a notification socket that it polls with tokio itself.
//!
//! It must not decide anything: it says what the kernel holds and does what it is told.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

pub use netlink_packet_route;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened, sent to or read from.
    #[error("netlink socket: {op}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a request.
    #[error("{op}: {source}")]
    Kernel {
        /// The request, in words (`add veth lxc1 ↔ eth0`).
        op: String,
        /// The kernel's errno.
        #[source]
        source: std::io::Error,
    },
    /// A reply could not be decoded.
    #[error("netlink reply to {op} could not be decoded: {detail}")]
    Decode {
        /// The request.
        op: String,
        /// The decoder's message.
        detail: String,
    },
    /// A network namespace could not be opened or entered.
    #[error("network namespace {}: {source}", path.display())]
    Netns {
        /// Its path (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kernel's errno when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub ifindex: u32,
    /// Name.
    pub name: String,
    /// Hardware address (empty for devices without one).
    pub mac: Vec<u8>,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `vxlan`, …), empty for physical devices.
    pub kind: String,
    /// The bridge (or bond) this interface is a port of.
    pub master: Option<u32>,
    /// `IFF_UP`.
    pub up: bool,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the namespace of `link`, as an id in this namespace.
    pub link_netnsid: Option<i32>,
    /// MTU.
    pub mtu: u32,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            ifindex: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            kind: String::new(),
            master: None,
            up: m.header.flags.contains(LinkFlags::Up),
            link: None,
            link_netnsid: None,
            mtu: 0,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(a) => link.mac.clone_from(a),
                LinkAttribute::Controller(c) => link.master = Some(*c),
                LinkAttribute::Link(l) => link.link = Some(*l),
                LinkAttribute::LinkNetNsId(n) => link.link_netnsid = Some(*n),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = k.to_string();
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The hardware address as six bytes, if it is an Ethernet one.
    pub fn mac6(&self) -> Option<[u8; 6]> {
        self.mac.as_slice().try_into().ok()
    }
}

/// An IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Output interface.
    pub oif: Option<u32>,
    /// Gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl Route {
    fn from_message(m: &RouteMessage) -> Option<Self> {
        if m.header.address_family != AddressFamily::Inet
            || m.header.table != RouteHeader::RT_TABLE_MAIN
        {
            return None;
        }
        let mut r = Route {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix_len: m.header.destination_prefix_length,
            oif: None,
            gateway: None,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = *d,
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                RouteAttribute::Table(t) if *t != u32::from(RouteHeader::RT_TABLE_MAIN) => {
                    return None
                }
                _ => {}
            }
        }
        Some(r)
    }
}

/// An IPv6 route of the main table (what pod discovery needs: destination and device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    /// Destination.
    pub dst: Ipv6Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Output interface.
    pub oif: Option<u32>,
}

impl Route6 {
    fn from_message(m: &RouteMessage) -> Option<Self> {
        if m.header.address_family != AddressFamily::Inet6
            || m.header.table != RouteHeader::RT_TABLE_MAIN
        {
            return None;
        }
        let mut r = Route6 {
            dst: Ipv6Addr::UNSPECIFIED,
            prefix_len: m.header.destination_prefix_length,
            oif: None,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => r.dst = *d,
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::Table(t) if *t != u32::from(RouteHeader::RT_TABLE_MAIN) => {
                    return None
                }
                _ => {}
            }
        }
        Some(r)
    }
}

/// A neighbour (`AF_INET`) or bridge FDB (`AF_BRIDGE`) entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// The interface (for FDB entries: the bridge port).
    pub ifindex: u32,
    /// IPv4 address (neighbour table only).
    pub ip: Option<Ipv4Addr>,
    /// Link-layer address.
    pub mac: Option<[u8; 6]>,
    /// For FDB entries: the bridge.
    pub master: Option<u32>,
    /// `NUD_*` state.
    pub state: NeighbourState,
    /// A bridge's own address on the port (`bridge fdb` shows `permanent`), not a learnt one.
    pub local: bool,
}

impl Neighbour {
    fn from_message(m: &NeighbourMessage) -> Self {
        let mut n = Neighbour {
            ifindex: m.header.ifindex,
            ip: None,
            mac: None,
            master: None,
            state: m.header.state,
            local: m.header.state == NeighbourState::Permanent
                && m.header.family == AddressFamily::Bridge,
        };
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => n.ip = Some(*ip),
                NeighbourAttribute::LinkLayerAddress(mac) => n.mac = mac.as_slice().try_into().ok(),
                NeighbourAttribute::Controller(m) => n.master = Some(*m),
                _ => {}
            }
        }
        n
    }

    /// The entry holds a usable address (not failed or incomplete).
    pub fn usable(&self) -> bool {
        self.mac.is_some_and(|m| m != [0; 6])
            && !matches!(
                self.state,
                NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
            )
    }
}

/// What a notification socket reports.
#[derive(Clone, Debug)]
pub enum Event {
    /// `RTM_NEWLINK`.
    NewLink(Link),
    /// `RTM_DELLINK`.
    DelLink(Link),
    /// `RTM_NEWROUTE` (main table, IPv4).
    NewRoute(Route),
    /// `RTM_DELROUTE` (main table, IPv4).
    DelRoute(Route),
    /// `RTM_NEWNEIGH` (IPv4 neighbours and bridge FDB).
    NewNeighbour(Neighbour),
    /// `RTM_DELNEIGH`.
    DelNeighbour(Neighbour),
}

/// `RTNLGRP_LINK`, `RTNLGRP_NEIGH`, `RTNLGRP_IPV4_ROUTE`.
pub mod groups {
    /// Link changes.
    pub const LINK: u32 = 1;
    /// Neighbour and FDB changes.
    pub const NEIGH: u32 = 3;
    /// IPv4 route changes.
    pub const IPV4_ROUTE: u32 = 7;
}

/// A network namespace, opened (the file keeps it alive while held).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace file `path` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let file = File::open(&path).map_err(|source| Error::Netns {
            path: path.clone(),
            source,
        })?;
        Ok(Self { file, path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file's descriptor (for `IFLA_NET_NS_FD`).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a short-lived thread that has entered this namespace, so the caller's
    /// own thread never changes namespace (a thread that failed to switch back would
    /// otherwise keep working in the wrong one).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::Netns {
                        path: self.path.clone(),
                        source: e.into(),
                    })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl AsRawFd for Socket {
    /// The socket's descriptor (to poll a notification socket).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

/// A blocking `NETLINK_ROUTE` socket bound to the namespace it was opened in.
pub struct Socket {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("seq", &self.seq).finish()
    }
}

fn sock_err(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Socket { op, source }
}

impl Socket {
    /// A socket in the calling thread's namespace.
    pub fn new() -> Result<Self> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(sock_err("open"))?;
        sock.bind_auto().map_err(sock_err("bind"))?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(sock_err("connect"))?;
        // Extended acks give the kernel's reason in words; not needed, errno is enough.
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// A socket in `ns`.
    pub fn new_in(ns: &Netns) -> Result<Self> {
        ns.run(Socket::new)?
    }

    /// A socket that receives the notifications of `groups` (see [`groups`]), non-blocking
    /// when `non_blocking` (the agent polls it with tokio).
    pub fn subscribe(groups: &[u32], non_blocking: bool) -> Result<Self> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(sock_err("open"))?;
        sock.bind_auto().map_err(sock_err("bind"))?;
        for g in groups {
            sock.add_membership(*g).map_err(sock_err("join group"))?;
        }
        // A burst of changes must not be lost silently: ENOBUFS tells the reader to relist.
        let _ = sock.set_rx_buf_sz(4 << 20);
        sock.set_non_blocking(non_blocking)
            .map_err(sock_err("set non-blocking"))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// Reads one datagram of notifications. `Ok(None)` when none is waiting (non-blocking).
    /// An `ENOBUFS` error means notifications were lost: relist.
    pub fn recv_events(&mut self) -> Result<Option<Vec<Event>>> {
        let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(source) => {
                return Err(Error::Socket {
                    op: "receive notifications",
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for msg in parse(&self.buf[..n], "notification")? {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                let ev = match m {
                    RouteNetlinkMessage::NewLink(l) => Some(Event::NewLink(Link::from_message(&l))),
                    RouteNetlinkMessage::DelLink(l) => Some(Event::DelLink(Link::from_message(&l))),
                    RouteNetlinkMessage::NewRoute(r) => {
                        Route::from_message(&r).map(Event::NewRoute)
                    }
                    RouteNetlinkMessage::DelRoute(r) => {
                        Route::from_message(&r).map(Event::DelRoute)
                    }
                    RouteNetlinkMessage::NewNeighbour(n) => {
                        Some(Event::NewNeighbour(Neighbour::from_message(&n)))
                    }
                    RouteNetlinkMessage::DelNeighbour(n) => {
                        Some(Event::DelNeighbour(Neighbour::from_message(&n)))
                    }
                    _ => None,
                };
                out.extend(ev);
            }
        }
        Ok(Some(out))
    }

    /// Sends `msg` and collects the replies up to the acknowledgement (or `NLMSG_DONE` for a
    /// dump). `op` names the request in errors.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut out = vec![0; m.buffer_len()];
        m.serialize(&mut out);
        self.sock.send(&out, 0).map_err(sock_err("send"))?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], 0)
                .map_err(sock_err("receive"))?;
            for msg in parse(&self.buf[..n], &op())? {
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(replies),
                        Some(code) => {
                            return Err(Error::Kernel {
                                op: op(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            })
                        }
                    },
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16, op: impl Fn() -> String) -> Result<()> {
        self.request(msg, NLM_F_ACK | flags, op).map(|_| ())
    }

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            || "dump links".into(),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })
            .collect())
    }

    /// The interface called `name`, `None` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.get_link(m, || format!("get link {name}"))
    }

    /// The interface with index `ifindex`, `None` if there is none.
    pub fn link_by_index(&mut self, ifindex: u32) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        self.get_link(m, || format!("get link #{ifindex}"))
    }

    /// Interface `ifindex` of the namespace that has id `nsid` here (`IFLA_TARGET_NETNSID`):
    /// how a veth's peer is read without entering the pod's namespace.
    pub fn link_in_netnsid(&mut self, nsid: i32, ifindex: u32) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.attributes.push(LinkAttribute::IfNetnsId(nsid));
        self.get_link(m, || format!("get link #{ifindex} in netns id {nsid}"))
    }

    fn get_link(&mut self, m: LinkMessage, op: impl Fn() -> String) -> Result<Option<Link>> {
        match self.request(RouteNetlinkMessage::GetLink(m), NLM_F_ACK, op) {
            Ok(r) => Ok(r.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc_enodev()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// IPv4 routes of the main table.
    pub fn routes_v4(&mut self) -> Result<Vec<Route>> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP, || {
            "dump IPv4 routes".into()
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Route::from_message(r),
                _ => None,
            })
            .collect())
    }

    /// IPv6 routes of the main table.
    pub fn routes_v6(&mut self) -> Result<Vec<Route6>> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet6;
        let replies = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP, || {
            "dump IPv6 routes".into()
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Route6::from_message(r),
                _ => None,
            })
            .collect())
    }

    /// IPv4 neighbours (`family_bridge: false`) or the bridge FDB (`true`).
    pub fn neighbours(&mut self, family_bridge: bool) -> Result<Vec<Neighbour>> {
        let mut m = NeighbourMessage::default();
        m.header.family = if family_bridge {
            AddressFamily::Bridge
        } else {
            AddressFamily::Inet
        };
        let replies = self.request(RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP, || {
            if family_bridge {
                "dump bridge FDB".into()
            } else {
                "dump IPv4 neighbours".into()
            }
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(Neighbour::from_message(n)),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair: `name` here, `peer` in `peer_ns` (here when `None`), both with
    /// `mtu`.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_ns: Option<&Netns>,
        mtu: u32,
    ) -> Result<()> {
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.to_owned()));
        p.attributes.push(LinkAttribute::Mtu(mtu));
        if let Some(ns) = peer_ns {
            p.attributes.push(LinkAttribute::NetNsFd(ns.raw_fd()));
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        m.attributes.push(LinkAttribute::Mtu(mtu));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        self.ack(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("add veth {name} ↔ {peer}"),
        )
    }

    /// Creates a VXLAN device `name` in external (metadata) mode — what `ip link add NAME
    /// type vxlan dstport PORT external` creates: no VNI, no remote, no learning; a program
    /// sets the tunnel key per packet — with `mtu`. It is left down.
    pub fn add_vxlan_external(&mut self, name: &str, port: u16, mtu: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        m.attributes.push(LinkAttribute::Mtu(mtu));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Learning(false),
                InfoVxlan::Port(port),
            ])),
        ]));
        self.ack(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("add vxlan {name} (external, dstport {port}, mtu {mtu})"),
        )
    }

    /// Sets interface `ifindex` up.
    pub fn set_up(&mut self, ifindex: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::SetLink(m), 0, || {
            format!("set link #{ifindex} up")
        })
    }

    /// Deletes interface `ifindex` (a veth takes its peer with it).
    pub fn del_link(&mut self, ifindex: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        self.ack(RouteNetlinkMessage::DelLink(m), 0, || {
            format!("delete link #{ifindex}")
        })
    }

    /// Adds `ip/prefix_len` to interface `ifindex`.
    pub fn add_address(&mut self, ifindex: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix_len;
        m.header.index = ifindex;
        m.attributes.push(AddressAttribute::Local(ip.into()));
        m.attributes.push(AddressAttribute::Address(ip.into()));
        self.ack(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("add address {ip}/{prefix_len} to link #{ifindex}"),
        )
    }

    /// IPv4 addresses of interface `ifindex`, with prefix lengths.
    pub fn addresses_v4(&mut self, ifindex: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP, || {
            "dump IPv4 addresses".into()
        })?;
        let mut out = Vec::new();
        for r in &replies {
            let RouteNetlinkMessage::NewAddress(a) = r else {
                continue;
            };
            if a.header.index != ifindex {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attr {
                    out.push((*ip, a.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// IPv4 addresses of interface `ifindex` in the namespace that has id `nsid` here
    /// (`IFA_TARGET_NETNSID`, honoured by the kernel only with strict dump checking, which
    /// is switched on for this request alone): a bridge port's pod address, read without
    /// entering the pod's namespace.
    pub fn addresses_v4_in_netnsid(&mut self, nsid: i32, ifindex: u32) -> Result<Vec<Ipv4Addr>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = ifindex;
        m.attributes.push(AddressAttribute::TargetNetNsId(nsid));
        self.sock
            .set_netlink_get_strict_chk(true)
            .map_err(sock_err("enable strict checking"))?;
        let replies = self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP, || {
            format!("dump IPv4 addresses of link #{ifindex} in netns id {nsid}")
        });
        self.sock
            .set_netlink_get_strict_chk(false)
            .map_err(sock_err("disable strict checking"))?;
        let mut out = Vec::new();
        for r in &replies? {
            let RouteNetlinkMessage::NewAddress(a) = r else {
                continue;
            };
            if a.header.index != ifindex {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attr {
                    out.push(*ip);
                }
            }
        }
        Ok(out)
    }

    /// Adds a main-table route to `dst/prefix_len` out of `oif`, through `gateway` or, when
    /// `None`, on link.
    pub fn add_route(
        &mut self,
        dst: Ipv4Addr,
        prefix_len: u8,
        oif: u32,
        gateway: Option<Ipv4Addr>,
    ) -> Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix_len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if prefix_len > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        if let Some(g) = gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(g)));
        }
        self.ack(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
            || match gateway {
                Some(g) => format!("add route {dst}/{prefix_len} via {g} dev #{oif}"),
                None => format!("add route {dst}/{prefix_len} dev #{oif}"),
            },
        )
    }

    /// Adds a permanent neighbour entry `ip` → `mac` on `ifindex`.
    pub fn add_permanent_neighbour(
        &mut self,
        ifindex: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::empty();
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("add neighbour {ip} on link #{ifindex}"),
        )
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

/// Splits a datagram into its messages.
fn parse(mut buf: &[u8], op: &str) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            return Err(Error::Decode {
                op: op.to_owned(),
                detail: format!("message length {len} with {} bytes left", buf.len()),
            });
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            Ok(m) => out.push(m),
            // A message type this crate's decoder does not know: skip it, keep the rest.
            Err(e) if is_unknown_type(&buf[..len]) => {
                let _ = e;
            }
            Err(e) => {
                return Err(Error::Decode {
                    op: op.to_owned(),
                    detail: e.to_string(),
                })
            }
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(out)
}

/// Route netlink message types the callers never ask for (nsid, tc, rules, …): their
/// decoding failures do not matter.
fn is_unknown_type(msg: &[u8]) -> bool {
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    // RTM_NEWLINK..RTM_GETNEIGH (16..=30) hold everything this crate reads.
    !(16..=30).contains(&ty) && ty > 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_with_its_index_and_state() {
        let mut s = Socket::new().expect("netlink socket");
        let links = s.links().expect("dump links");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo is listed");
        assert_eq!(lo.ifindex, 1);
        let by_name = s.link_by_name("lo").expect("get lo").expect("lo exists");
        assert_eq!(by_name.ifindex, lo.ifindex);
        assert!(s.link_by_name("cm-no-such-if").expect("get").is_none());
        assert!(s.link_by_index(0x7fff_fff0).expect("get").is_none());
    }

    #[test]
    fn a_refused_request_names_the_operation_and_the_errno() {
        let mut s = Socket::new().expect("netlink socket");
        let err = s.del_link(0x7fff_fff0).expect_err("no such link");
        assert!(err.to_string().contains("delete link #2147483632"), "{err}");
        assert_eq!(err.errno(), Some(nix::errno::Errno::ENODEV as i32));
    }
}
