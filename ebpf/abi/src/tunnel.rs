//! Node-wide VXLAN tunnel settings (`CM_TUNNEL`) and the last tunnel key per direction
//! (`CM_TUNNEL_TRACE`).

use core::mem::{offset_of, size_of};

/// Node-wide tunnel settings: index 0 of the one-entry array map [`map::TUNNEL`](crate::map::TUNNEL).
/// All zero (the array's initial state) means "not configured": `from_pod` then hands
/// traffic for other nodes to the kernel stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TunnelConfig {
    /// Interface index of the node's VXLAN device (external mode), host order.
    pub vxlan_ifindex: u32,
    /// This node's underlay IPv4, network order (zero: the node has no IPv4 underlay
    /// address). Ipcache entries whose tunnel endpoint is this address are local and are
    /// never tunnelled.
    pub local_ipv4: [u8; 4],
    /// [`tunnel_flags`], host order.
    pub flags: u32,
    /// UDP port of the VXLAN device, network order (`from_underlay` decapsulates datagrams
    /// to `local_ipv4` or `local_ipv6` and this port). Zero: `from_underlay` decapsulates
    /// nothing.
    pub vxlan_port: [u8; 2],
    /// Zero.
    pub pad: u16,
    /// This node's underlay IPv6, network order (all zero: none). The same role as
    /// `local_ipv4` for tunnel endpoints of the IPv6 family.
    pub local_ipv6: [u8; 16],
    /// With [`tunnel_flags::BPF_TX`]: the underlay interface `from_pod` hands the packets it
    /// encapsulated itself to (`bpf_redirect_neigh`), host order. Its MTU decides which
    /// packets are too big for BPF transmit (those go through the VXLAN device).
    pub underlay_ifindex: u32,
    /// With [`tunnel_flags::BPF_TX`]: the UDP destination port `from_pod` writes, network
    /// order. Its own field: `vxlan_port` is also the switch of `from_underlay`'s
    /// decapsulation, which may be off while transmit is in BPF.
    pub tx_port: [u8; 2],
    /// Zero.
    pub pad2: u16,
}
const _: () = assert!(size_of::<TunnelConfig>() == 40);
const _: () = assert!(offset_of!(TunnelConfig, local_ipv6) == 16);
const _: () = assert!(offset_of!(TunnelConfig, underlay_ifindex) == 32);
const _: () = assert!(offset_of!(TunnelConfig, tx_port) == 36);

/// Bits of [`TunnelConfig::flags`].
pub mod tunnel_flags {
    /// The settings are valid (set by the agent together with the ifindex).
    pub const ENABLED: u32 = 1 << 0;
    /// `from_pod` encapsulates VXLAN over IPv4 itself (`bpf_skb_adjust_room`, outer headers
    /// written by the program) and hands the datagram to `underlay_ifindex` with
    /// `bpf_redirect_neigh`, instead of setting a tunnel key and redirecting into the VXLAN
    /// device. Tunnels over IPv6 and packets too big for the underlay MTU still take the
    /// device.
    pub const BPF_TX: u32 = 1 << 1;
}

/// The largest identity that fits a VXLAN VNI (24 bits).
pub const MAX_VNI_IDENTITY: u32 = (1 << 24) - 1;

/// Slots of the [`map::TUNNEL_TRACE`](crate::map::TUNNEL_TRACE) per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceSlot {
    /// Last packet `from_pod` sent into the tunnel.
    Egress = 0,
    /// Last packet `from_overlay` received from the tunnel.
    Ingress = 1,
}

impl TraceSlot {
    /// Number of slots (the map's `max_entries`).
    pub const COUNT: u32 = 2;
}

/// The tunnel key of the last packet per direction and CPU: lets tests and `status`
/// check the VNI and remote node without a packet capture.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TunnelTrace {
    /// Remote node (egress: destination, ingress: source) when the tunnel runs over IPv4,
    /// network order; zero over IPv6.
    pub remote_ipv4: [u8; 4],
    /// VNI = source security identity, host order.
    pub vni: u32,
    /// Egress: the ifindex redirected to (the VXLAN device, or the underlay interface when
    /// the program encapsulated itself); ingress: the pod's host-side veth.
    pub ifindex: u32,
    /// Number of packets this slot has recorded on this CPU.
    pub packets: u32,
    /// Remote node when the tunnel runs over IPv6, network order; zero over IPv4.
    pub remote_ipv6: [u8; 16],
}
const _: () = assert!(size_of::<TunnelTrace>() == 32);
const _: () = assert!(offset_of!(TunnelTrace, remote_ipv6) == 16);

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers
    // and byte arrays (every bit pattern is valid), and has no implicit padding (sizes and
    // offsets are asserted above), so it can be copied to and from the kernel as raw bytes.
    unsafe impl aya::Pod for TunnelConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for TunnelTrace {}
}
