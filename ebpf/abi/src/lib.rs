//! The eBPF ABI: every map key and value shared by the kernel programs (`ebpf/programs`) and
//! the agent (`clustermesh-agent`), plus map names, sizes and the counter indices.
//!
//! Every type is `#[repr(C)]`, `Copy`, has no implicit padding (explicit `pad` fields, `u32`
//! flags instead of `bool`) and a compile-time size assertion, because the kernel sees raw
//! bytes: a layout change here is a map format change (pinned maps of the old layout must be
//! recreated, see `clustermesh-agent`'s datapath module). Byte order is stated per field:
//! addresses and ports are network order (as on the wire), everything else host order.
//!
//! This crate must not depend on anything but `core` (it is compiled for
//! `bpfel-unknown-none`); `aya::Pod` impls exist only with the `user` feature.
#![no_std]
// `unsafe` here: only the `aya::Pod` impls (feature `user`) and layout tests.
#![allow(unsafe_code)]

use core::mem::{offset_of, size_of};

/// Names of the maps in the object file (the ELF symbol names, also the pin file names).
pub mod map {
    /// [`IpcacheKey`](crate::IpcacheKey) → [`IpcacheValue`](crate::IpcacheValue), LPM trie.
    pub const IPCACHE: &str = "CM_IPCACHE";
    /// [`EndpointKey`](crate::EndpointKey) → [`EndpointInfo`](crate::EndpointInfo), hash.
    pub const LOCAL_ENDPOINTS: &str = "CM_LOCAL_EPS";
    /// `0u32` → [`TunnelConfig`](crate::TunnelConfig), array of one.
    pub const TUNNEL: &str = "CM_TUNNEL";
    /// [`Counter`](crate::Counter) → `u64`, per-CPU array, counters of `from_pod`.
    pub const FROM_POD_COUNTERS: &str = "CM_FROM_POD_CNT";
    /// [`Counter`](crate::Counter) → `u64`, per-CPU array, counters of `from_overlay`.
    pub const FROM_OVERLAY_COUNTERS: &str = "CM_FROM_OVL_CNT";
    /// [`Counter`](crate::Counter) → `u64`, per-CPU array, counters of `from_underlay`.
    pub const FROM_UNDERLAY_COUNTERS: &str = "CM_FROM_UL_CNT";
    /// [`TraceSlot`](crate::TraceSlot) → [`TunnelTrace`](crate::TunnelTrace), per-CPU array.
    pub const TUNNEL_TRACE: &str = "CM_TUNNEL_TRACE";
    /// [`Lb4Key`](crate::Lb4Key) → [`Lb4Service`](crate::Lb4Service), hash (Cilium's
    /// `cilium_lb4_services_v2`).
    pub const LB4_SERVICES: &str = "CM_LB4_SERVICES";
    /// `u32` backend ID → [`Lb4Backend`](crate::Lb4Backend), hash (`cilium_lb4_backends_v3`).
    pub const LB4_BACKENDS: &str = "CM_LB4_BACKENDS";
    /// `u16` rev-NAT index → [`Lb4RevNat`](crate::Lb4RevNat), hash (`cilium_lb4_reverse_nat`).
    pub const LB4_REVERSE_NAT: &str = "CM_LB4_REVNAT";
    /// [`Ct4Key`](crate::Ct4Key) → [`Ct4Entry`](crate::Ct4Entry), LRU hash: service
    /// connections (forward and reply tuple).
    pub const LB4_CT: &str = "CM_LB4_CT";
    /// [`LbCounter`](crate::LbCounter) → `u64`, per-CPU array, counters of the LB step.
    pub const LB_COUNTERS: &str = "CM_LB_CNT";
    /// [`PolicyCtKey`](crate::PolicyCtKey) → [`PolicyCtValue`](crate::PolicyCtValue), LRU
    /// hash: connections of policy-enforced endpoints, so their replies pass policy.
    /// Pinned (unlike the other policy maps, which the agent rebuilds from its engine):
    /// connections survive an agent restart.
    pub const POLICY_CT: &str = "CM_POLICY_CT";
    /// Every map, for pinning and compatibility checks.
    pub const ALL: [&str; 13] = [
        IPCACHE,
        LOCAL_ENDPOINTS,
        TUNNEL,
        FROM_POD_COUNTERS,
        FROM_OVERLAY_COUNTERS,
        FROM_UNDERLAY_COUNTERS,
        TUNNEL_TRACE,
        LB4_SERVICES,
        LB4_BACKENDS,
        LB4_REVERSE_NAT,
        LB4_CT,
        LB_COUNTERS,
        POLICY_CT,
    ];
}

/// Names of the programs in the object file.
pub mod program {
    /// TCX ingress of each pod's host-side veth (traffic leaving the pod).
    pub const FROM_POD: &str = "from_pod";
    /// TCX ingress of the node's VXLAN device (external / collect_md mode).
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// TCX ingress of the node's underlay device: decapsulates VXLAN for local pods itself,
    /// so those packets skip the VXLAN device.
    pub const FROM_UNDERLAY: &str = "from_underlay";
}

/// Default map sizes; the agent may override them at load time.
pub mod defaults {
    /// Cilium's default for `cilium_ipcache_v2`.
    pub const IPCACHE_MAX_ENTRIES: u32 = 512_000;
    /// Pods on one node (Cilium's endpoint map default).
    pub const LOCAL_ENDPOINTS_MAX_ENTRIES: u32 = 65_535;
    /// Service entries (frontends + backend slots): 30k services with 4 backends each
    /// need 150k. No prealloc, so unused capacity costs no memory.
    pub const LB4_SERVICES_MAX_ENTRIES: u32 = 262_144;
    /// Backends.
    pub const LB4_BACKENDS_MAX_ENTRIES: u32 = 131_072;
    /// Reverse-NAT entries (one per frontend).
    pub const LB4_REVERSE_NAT_MAX_ENTRIES: u32 = 65_536;
    /// Service connection tracking entries (two per connection).
    pub const LB4_CT_MAX_ENTRIES: u32 = 262_144;
}

/// Address family as stored in [`IpcacheKey::family`] and [`EndpointKey::family`]
/// (Cilium's `ENDPOINT_KEY_IPV4` / `ENDPOINT_KEY_IPV6`).
pub mod family {
    /// IPv4: the address is in the first 4 bytes of the 16-byte field, the rest is zero.
    pub const IPV4: u8 = 1;
    /// IPv6: all 16 bytes.
    pub const IPV6: u8 = 2;
}

/// Bits of the ipcache key that precede the address and are always matched
/// (`cluster_id` + `pad1` + `family`): Cilium's `IPCACHE_STATIC_PREFIX`.
pub const IPCACHE_STATIC_PREFIX: u32 = 32;

/// The ipcache key after the LPM `prefixlen` word: Cilium's `struct ipcache_key` minus its
/// `lpm_key.prefixlen`. With the prefix length in front (aya's `lpm_trie::Key<IpcacheKey>`,
/// or [`IpcacheLpmKey`]) it is exactly Cilium's 24-byte key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKey {
    /// Cluster ID, host order. Always 0 in lookups today (as in Cilium OSS).
    pub cluster_id: u16,
    /// Zero.
    pub pad1: u8,
    /// [`family::IPV4`] or [`family::IPV6`].
    pub family: u8,
    /// Address, network order; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<IpcacheKey>() == 20);

impl IpcacheKey {
    /// Key for an IPv4 address (`octets` in network order), cluster 0.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self {
            cluster_id: 0,
            pad1: 0,
            family: family::IPV4,
            addr,
        }
    }

    /// Key for an IPv6 address (network order), cluster 0.
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self {
            cluster_id: 0,
            pad1: 0,
            family: family::IPV6,
            addr: octets,
        }
    }

    /// The LPM prefix length for `ip_prefix_bits` bits of address (64 for an IPv4 /32,
    /// 160 for an IPv6 /128).
    pub const fn prefixlen(ip_prefix_bits: u32) -> u32 {
        IPCACHE_STATIC_PREFIX + ip_prefix_bits
    }
}

/// Cilium's complete 24-byte `struct ipcache_key`, byte for byte what the LPM trie stores
/// (and what raw batched `bpf()` updates take). Same bytes as aya's
/// `lpm_trie::Key<IpcacheKey>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheLpmKey {
    /// `lpm_key.prefixlen`, host order: [`IPCACHE_STATIC_PREFIX`] + address prefix bits.
    pub prefixlen: u32,
    /// Cluster, family and address.
    pub key: IpcacheKey,
}
const _: () = assert!(size_of::<IpcacheLpmKey>() == 24);
const _: () = assert!(offset_of!(IpcacheLpmKey, key) == 4);
const _: () = assert!(offset_of!(IpcacheLpmKey, key) + offset_of!(IpcacheKey, family) == 7);
const _: () = assert!(offset_of!(IpcacheLpmKey, key) + offset_of!(IpcacheKey, addr) == 8);

/// Bits of [`IpcacheValue::flags`] (Cilium's `remote_endpoint_info` v2 flags).
pub mod ipcache_flags {
    /// Do not tunnel to this destination even if a tunnel endpoint is set.
    pub const SKIP_TUNNEL: u8 = 1 << 0;
    /// `tunnel_endpoint` is set.
    pub const HAS_TUNNEL: u8 = 1 << 1;
    /// `tunnel_endpoint` is IPv6 (not supported by the programs yet: such entries go to the
    /// kernel stack).
    pub const IPV6_TUNNEL: u8 = 1 << 2;
    /// Cilium's `flag_remote_cluster` bit; carried for compatibility, not read by the
    /// programs.
    pub const REMOTE_CLUSTER: u8 = 1 << 3;
}

/// Cilium's `struct remote_endpoint_info`, v2 layout (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    /// Security identity of the address, host order.
    pub sec_identity: u32,
    /// Node to tunnel to, network order; IPv4 in the first 4 bytes. Meaningful only with
    /// [`ipcache_flags::HAS_TUNNEL`].
    pub tunnel_endpoint: [u8; 16],
    /// Zero.
    pub pad: u16,
    /// Encryption key index (0 = none).
    pub key: u8,
    /// [`ipcache_flags`].
    pub flags: u8,
}
const _: () = assert!(size_of::<IpcacheValue>() == 24);
const _: () = assert!(offset_of!(IpcacheValue, tunnel_endpoint) == 4);
const _: () = assert!(offset_of!(IpcacheValue, flags) == 23);

impl IpcacheValue {
    /// An entry tunnelled to the IPv4 node `node` (network order).
    pub const fn tunnel_v4(sec_identity: u32, node: [u8; 4]) -> Self {
        let mut tunnel_endpoint = [0u8; 16];
        tunnel_endpoint[0] = node[0];
        tunnel_endpoint[1] = node[1];
        tunnel_endpoint[2] = node[2];
        tunnel_endpoint[3] = node[3];
        Self {
            sec_identity,
            tunnel_endpoint,
            pad: 0,
            key: 0,
            flags: ipcache_flags::HAS_TUNNEL,
        }
    }

    /// An entry without tunnel (delivered by the kernel stack).
    pub const fn local(sec_identity: u32) -> Self {
        Self {
            sec_identity,
            tunnel_endpoint: [0; 16],
            pad: 0,
            key: 0,
            flags: 0,
        }
    }
}

/// Key of the local endpoints map: a pod IP on this node (Cilium's `struct endpoint_key`
/// with the cluster ID dropped, since local pods are always in the local cluster).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointKey {
    /// Address, network order; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
    /// [`family::IPV4`] or [`family::IPV6`].
    pub family: u8,
    /// Zero.
    pub pad1: u8,
    /// Zero.
    pub pad2: u16,
}
const _: () = assert!(size_of::<EndpointKey>() == 20);

impl EndpointKey {
    /// Key for an IPv4 pod address (network order).
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self {
            addr,
            family: family::IPV4,
            pad1: 0,
            pad2: 0,
        }
    }
}

/// Value of the local endpoints map: how to deliver to a pod on this node.
///
/// Delivery is `bpf_redirect_peer` to `ifindex` (the host-side veth): the packet appears on
/// the pod's `eth0` ingress without a second pass through the node's stack. Because it skips
/// the veth's L2 processing, the programs write the Ethernet header themselves:
/// destination = `pod_mac`, source = `host_mac` (the gateway MAC the pod expects).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    /// Interface index of the pod's host-side veth (in the node's namespace), host order.
    pub ifindex: u32,
    /// Security identity of the pod, host order; carried in the VNI when it sends across
    /// the overlay (must fit in 24 bits).
    pub identity: u32,
    /// [`endpoint_flags`], host order.
    pub flags: u32,
    /// MAC address of the pod's `eth0` (wire order).
    pub pod_mac: [u8; 6],
    /// MAC address of the host-side veth (wire order).
    pub host_mac: [u8; 6],
}
const _: () = assert!(size_of::<EndpointInfo>() == 24);
const _: () = assert!(offset_of!(EndpointInfo, host_mac) == 18);

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// Reserved for the policy step (enforce ingress policy on this endpoint).
    pub const POLICY_INGRESS: u32 = 1 << 0;
    /// Reserved for the policy step (enforce egress policy on this endpoint).
    pub const POLICY_EGRESS: u32 = 1 << 1;
}

/// Node-wide tunnel settings: index 0 of the one-entry array map [`map::TUNNEL`].
/// All zero (the array's initial state) means "not configured": `from_pod` then hands
/// traffic for other nodes to the kernel stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TunnelConfig {
    /// Interface index of the node's VXLAN device (external mode), host order.
    pub vxlan_ifindex: u32,
    /// This node's underlay IPv4, network order. Ipcache entries whose tunnel endpoint is
    /// this address are local and are never tunnelled.
    pub local_ipv4: [u8; 4],
    /// [`tunnel_flags`], host order.
    pub flags: u32,
    /// UDP port of the VXLAN device, network order (`from_underlay` decapsulates datagrams
    /// to `local_ipv4` and this port). Zero: `from_underlay` decapsulates nothing.
    pub vxlan_port: [u8; 2],
    /// Zero.
    pub pad: u16,
}
const _: () = assert!(size_of::<TunnelConfig>() == 16);

/// Bits of [`TunnelConfig::flags`].
pub mod tunnel_flags {
    /// The settings are valid (set by the agent together with the ifindex).
    pub const ENABLED: u32 = 1 << 0;
}

/// The largest identity that fits a VXLAN VNI (24 bits).
pub const MAX_VNI_IDENTITY: u32 = (1 << 24) - 1;

/// Slots of the [`map::TUNNEL_TRACE`] per-CPU array.
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
    /// Remote node (egress: destination, ingress: source), network order.
    pub remote_ipv4: [u8; 4],
    /// VNI = source security identity, host order.
    pub vni: u32,
    /// Egress: the VXLAN ifindex redirected to; ingress: the pod's host-side veth.
    pub ifindex: u32,
    /// Number of packets this slot has recorded on this CPU.
    pub packets: u32,
}
const _: () = assert!(size_of::<TunnelTrace>() == 16);

/// Index into a per-program counters map (values are `u64` packet counts per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Every packet the program saw.
    Packets = 0,
    /// Redirected to a pod on this node.
    DeliveredLocal = 1,
    /// Redirected into the VXLAN device with a tunnel key.
    Tunnelled = 2,
    /// Handed to the kernel stack (`TC_ACT_OK`); the more specific reason is counted too.
    ToStack = 3,
    /// Not IPv4 (ARP, IPv6, ...): to the stack.
    NotIpv4 = 4,
    /// `from_pod`: the destination is not in the ipcache: to the stack.
    IpcacheMiss = 5,
    /// `from_pod`: the ipcache entry has no usable tunnel endpoint (world, this node, an
    /// IPv6 tunnel endpoint, skip-tunnel): to the stack.
    NoTunnel = 6,
    /// `from_pod`: the source address is not a local endpoint, so there is no identity for
    /// the VNI: to the stack.
    SourceUnknown = 7,
    /// `from_pod`: tunnel settings not configured yet: to the stack.
    TunnelUnconfigured = 8,
    /// `from_pod`: the source identity does not fit a 24-bit VNI: to the stack.
    IdentityTooLarge = 9,
    /// `from_overlay`, `from_underlay`: the inner destination is not a local endpoint: to the
    /// stack (for `from_underlay`: unchanged, on to the VXLAN device).
    EndpointMiss = 10,
    /// `from_overlay`: no tunnel metadata on the packet (source identity taken as 0).
    NoTunnelKey = 11,
    /// Dropped: IPv4 header invalid (version, IHL < 5, total length < IHL).
    DropMalformed = 12,
    /// Dropped: frame shorter than the headers it announces.
    DropTruncated = 13,
    /// Dropped: a helper failed (set tunnel key, redirect).
    DropHelper = 14,
    /// `from_underlay`: not a VXLAN datagram to this node's tunnel port (the node's own
    /// traffic, fragments, IPv4 options): to the stack unchanged.
    NotTunnelled = 15,
}

impl Counter {
    /// Number of counters (the counters maps' `max_entries`).
    pub const COUNT: u32 = 16;

    /// Every counter in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Packets,
        Counter::DeliveredLocal,
        Counter::Tunnelled,
        Counter::ToStack,
        Counter::NotIpv4,
        Counter::IpcacheMiss,
        Counter::NoTunnel,
        Counter::SourceUnknown,
        Counter::TunnelUnconfigured,
        Counter::IdentityTooLarge,
        Counter::EndpointMiss,
        Counter::NoTunnelKey,
        Counter::DropMalformed,
        Counter::DropTruncated,
        Counter::DropHelper,
        Counter::NotTunnelled,
    ];

    /// Stable snake_case name (metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::DeliveredLocal => "delivered_local",
            Counter::Tunnelled => "tunnelled",
            Counter::ToStack => "to_stack",
            Counter::NotIpv4 => "not_ipv4",
            Counter::IpcacheMiss => "ipcache_miss",
            Counter::NoTunnel => "no_tunnel",
            Counter::SourceUnknown => "source_unknown",
            Counter::TunnelUnconfigured => "tunnel_unconfigured",
            Counter::IdentityTooLarge => "identity_too_large",
            Counter::EndpointMiss => "endpoint_miss",
            Counter::NoTunnelKey => "no_tunnel_key",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropHelper => "drop_helper",
            Counter::NotTunnelled => "not_tunnelled",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers
    // and byte arrays (every bit pattern is valid), and has no implicit padding (sizes and
    // offsets are asserted above), so it can be copied to and from the kernel as raw bytes.
    unsafe impl aya::Pod for IpcacheKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for IpcacheLpmKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for IpcacheValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EndpointKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: see above.
    unsafe impl aya::Pod for TunnelConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for TunnelTrace {}
}

// ---------------------------------------------------------------------------------------
// Service load balancing (IPv4), after Cilium's LB maps (`bpf/lib/common.h`).

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;

/// Key of [`map::LB4_SERVICES`]: Cilium's 12-byte `lb4_key`. Slot 0 is the service
/// (frontend) entry; slots `1..=count` point at the backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Key {
    /// Frontend (VIP), network order.
    pub address: [u8; 4],
    /// Frontend port, network order (`u16::to_be`).
    pub dport: u16,
    /// 0 = the service entry, `1..=count` = backend slots; host order.
    pub backend_slot: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Cilium's `LB_LOOKUP_SCOPE_EXT` (0); the only scope used.
    pub scope: u8,
    /// Zero.
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<Lb4Key>() == 12);
const _: () = assert!(offset_of!(Lb4Key, proto) == 8);

impl Lb4Key {
    /// The key of `slot` of the frontend `vip:port` (port in host order).
    pub const fn new(vip: [u8; 4], port: u16, proto: u8, slot: u16) -> Self {
        Self {
            address: vip,
            dport: port.to_be(),
            backend_slot: slot,
            proto,
            scope: 0,
            pad: [0; 2],
        }
    }
}

/// Value of [`map::LB4_SERVICES`]: Cilium's 12-byte `lb4_service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Service {
    /// Slot 0: unused (0). Slot ≥ 1: the backend ID ([`map::LB4_BACKENDS`] key). Host order.
    pub backend_id: u32,
    /// Slot 0: number of backend slots (0 = no backend: new connections are dropped).
    pub count: u16,
    /// Index into [`map::LB4_REVERSE_NAT`] for replies; host order.
    pub rev_nat_index: u16,
    /// [`svc_flags`] (Cilium's `SVC_FLAG_*`).
    pub flags: u8,
    /// Cilium's `flags2`; zero.
    pub flags2: u8,
    /// Cilium's quarantined-backend count; zero.
    pub qcount: u16,
}
const _: () = assert!(size_of::<Lb4Service>() == 12);

/// Bits of [`Lb4Service::flags`] (Cilium's values).
pub mod svc_flags {
    /// `SVC_FLAG_AFFINITY`: ClientIP session affinity (not implemented by the programs yet;
    /// carried for status).
    pub const AFFINITY: u8 = 1 << 4;
    /// `SVC_FLAG_ROUTABLE`.
    pub const ROUTABLE: u8 = 1 << 6;
}

/// Value of [`map::LB4_BACKENDS`] (key: `u32` backend ID, never reused while a connection
/// may still reference it): Cilium's 12-byte `lb4_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Backend {
    /// Backend address, network order.
    pub address: [u8; 4],
    /// Backend port, network order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// [`backend_state`].
    pub flags: u8,
    /// Cluster of the backend, host order.
    pub cluster_id: u16,
    /// Zone index (0 = unknown).
    pub zone: u8,
    /// Zero.
    pub pad: u8,
}
const _: () = assert!(size_of::<Lb4Backend>() == 12);
const _: () = assert!(offset_of!(Lb4Backend, cluster_id) == 8);

/// Backend states in [`Lb4Backend::flags`] (Cilium's `BE_STATE_*`).
pub mod backend_state {
    /// Takes new connections.
    pub const ACTIVE: u8 = 0;
    /// Keeps its connections, takes no new ones.
    pub const TERMINATING: u8 = 1;
    /// Failed health checks.
    pub const QUARANTINED: u8 = 2;
    /// Administratively drained.
    pub const MAINTENANCE: u8 = 3;
}

/// Value of [`map::LB4_REVERSE_NAT`] (key: `u16` rev-NAT index): the frontend a reply is
/// rewritten to. Cilium's `lb4_reverse_nat` with its tail padding made explicit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4RevNat {
    /// Frontend (VIP), network order.
    pub address: [u8; 4],
    /// Frontend port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}
const _: () = assert!(size_of::<Lb4RevNat>() == 8);

/// Directions in [`Ct4Key::flags`].
pub mod ct_dir {
    /// Client → frontend, as the client sent it (before translation).
    pub const FORWARD: u8 = 0;
    /// Backend → client, as the backend sent it (before reverse translation).
    pub const REPLY: u8 = 1;
}

/// Key of [`map::LB4_CT`]: a 5-tuple as seen on the wire, plus the direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Key {
    /// Source address, network order.
    pub saddr: [u8; 4],
    /// Destination address, network order.
    pub daddr: [u8; 4],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`ct_dir`].
    pub flags: u8,
    /// Zero.
    pub pad: u16,
}
const _: () = assert!(size_of::<Ct4Key>() == 16);

/// Value of [`map::LB4_CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Entry {
    /// Forward entries: the backend the connection is bound to; reply entries: 0.
    pub backend_id: u32,
    /// The frontend to restore in replies ([`map::LB4_REVERSE_NAT`] key), host order.
    pub rev_nat_index: u16,
    /// Zero.
    pub pad: u16,
    /// `bpf_ktime_get_ns` of the entry's creation (for status and garbage collection).
    pub created_ns: u64,
}
const _: () = assert!(size_of::<Ct4Entry>() == 16);

/// Source address of hairpin service connections (a pod reaching itself through a VIP):
/// the pod's gateway, 169.254.1.1 (Cilium's `IPV4_LOOPBACK` plays the same role). The lab
/// routes pods via this address; replies to it are translated back to the frontend by
/// `from_pod` on the same veth.
pub const LB_LOOPBACK_IPV4: [u8; 4] = [169, 254, 1, 1];

/// Index into [`map::LB_COUNTERS`] (per-CPU `u64` packet counts of the LB step, shared
/// by `from_pod` and `from_overlay`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LbCounter {
    /// A packet to a frontend was translated to a backend.
    Translated = 0,
    /// ... and it belonged to a known connection.
    CtHit = 1,
    /// ... and it opened a new connection (backend selected).
    CtNew = 2,
    /// The connection's backend is gone: a new one was selected (failover).
    Reselected = 3,
    /// A frontend without backends: dropped.
    DropNoBackend = 4,
    /// A reply was translated back to its frontend.
    RevNat = 5,
    /// A later fragment of a TCP/UDP datagram (no ports): not translated.
    Fragment = 6,
    /// A frontend hit whose backend slot or backend entry is missing (agent mid-update):
    /// dropped.
    DropBackendMissing = 7,
    /// A new connection's random pick was the client itself while the service has other
    /// backends: another slot was taken instead.
    SelfAvoided = 8,
    /// A connection whose only usable backend is the client itself (hairpin): source
    /// SNATed to [`LB_LOOPBACK_IPV4`] (forward packets), or a reply to that address
    /// translated back to the frontend.
    Hairpin = 9,
}

impl LbCounter {
    /// Number of counters (the map's `max_entries`).
    pub const COUNT: u32 = 10;

    /// Every counter in index order.
    pub const ALL: [LbCounter; Self::COUNT as usize] = [
        LbCounter::Translated,
        LbCounter::CtHit,
        LbCounter::CtNew,
        LbCounter::Reselected,
        LbCounter::DropNoBackend,
        LbCounter::RevNat,
        LbCounter::Fragment,
        LbCounter::DropBackendMissing,
        LbCounter::SelfAvoided,
        LbCounter::Hairpin,
    ];

    /// Stable snake_case name (metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            LbCounter::Translated => "translated",
            LbCounter::CtHit => "ct_hit",
            LbCounter::CtNew => "ct_new",
            LbCounter::Reselected => "reselected",
            LbCounter::DropNoBackend => "drop_no_backend",
            LbCounter::RevNat => "rev_nat",
            LbCounter::Fragment => "fragment",
            LbCounter::DropBackendMissing => "drop_backend_missing",
            LbCounter::SelfAvoided => "self_avoided",
            LbCounter::Hairpin => "hairpin",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < LbCounter::ALL.len() {
        assert!(LbCounter::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(feature = "user")]
mod pod_lb {
    use super::*;

    // SAFETY (all impls below): `#[repr(C)]`, `Copy`, integers and byte arrays only (every
    // bit pattern is valid), no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for Lb4Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Lb4Service {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Lb4Backend {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Lb4RevNat {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Ct4Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Ct4Entry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipcache_key_bytes_match_cilium() {
        let k = IpcacheLpmKey {
            prefixlen: IpcacheKey::prefixlen(32),
            key: IpcacheKey::v4([10, 1, 2, 3]),
        };
        // SAFETY: IpcacheLpmKey is repr(C) without padding (asserted above).
        let bytes: [u8; 24] = unsafe { core::mem::transmute(k) };
        let mut want = [0u8; 24];
        want[..4].copy_from_slice(&64u32.to_ne_bytes());
        want[7] = 1;
        want[8..12].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(bytes, want);
    }
}

// ---------------------------------------------------------------------------------------
// Policy enforcement and flow events (issue 6). Appended; not pinned (the agent rebuilds
// them from its policy engine on start), so they are not in `map::ALL` — except the policy
// connection tracking map (`map::POLICY_CT`), whose state the engine cannot rebuild.

/// Names of the policy and flow maps.
pub mod policy_map {
    /// [`PolicyKey`](crate::PolicyKey) → [`PolicyValue`](crate::PolicyValue), hash, no
    /// prealloc: every allowed (subject identity, peer identity, direction, proto, port).
    pub const POLICY: &str = "CM_POLICY";
    /// Subject identity (`u32`) → [`policy_flags`](crate::policy_flags) (`u32`), hash:
    /// directions in which the identity is default-deny.
    pub const POLICY_MODE: &str = "CM_POLICY_MODE";
    /// [`PolicyCounter`](crate::PolicyCounter) → `u64`, per-CPU array.
    pub const POLICY_COUNTERS: &str = "CM_POLICY_CNT";
    /// Ring buffer of [`FlowEvent`](crate::FlowEvent)s.
    pub const FLOWS: &str = "CM_FLOWS";
    /// `0u32` → [`FlowConfig`](crate::FlowConfig), array of one.
    pub const FLOW_CONFIG: &str = "CM_FLOW_CFG";
    /// Default capacity of [`POLICY`].
    pub const POLICY_MAX_ENTRIES: u32 = 262_144;
    /// Default capacity of [`POLICY_MODE`].
    pub const POLICY_MODE_MAX_ENTRIES: u32 = 65_536;
    /// Capacity of [`map::POLICY_CT`](crate::map::POLICY_CT) (LRU: the least recently used
    /// connection is evicted when full).
    pub const CT_MAX_ENTRIES: u32 = 262_144;
    /// Size of the flow ring buffer in bytes (power of two, multiple of the page size).
    pub const FLOWS_BYTES: u32 = 4 << 20;
}

/// Reserved identity `world` (Cilium): peers outside the cluster mesh (ipcache miss).
pub const IDENTITY_WORLD: u32 = 2;

/// Bits of a [`policy_map::POLICY_MODE`] value.
pub mod policy_flags {
    /// Ingress is default-deny for this identity.
    pub const INGRESS: u32 = 1 << 0;
    /// Egress is default-deny for this identity.
    pub const EGRESS: u32 = 1 << 1;
}

/// [`PolicyKey::direction`] and [`FlowEvent::direction`] values.
pub mod direction {
    /// Peer → subject (the packet enters the subject endpoint).
    pub const INGRESS: u8 = 0;
    /// Subject → peer (the packet leaves the subject endpoint).
    pub const EGRESS: u8 = 1;
}

/// Key of [`policy_map::POLICY`]. Peer 0, proto 0 and dport 0 are wildcards; the programs
/// look up (peer, proto, port), (peer, proto, *), (peer, *, *), (*, proto, port),
/// (*, proto, *), (*, *, *) in that order (Cilium's L3+L4, L3, L4, allow-all).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    /// Identity of the local endpoint the policy belongs to, host order.
    pub subject: u32,
    /// Identity of the other end, host order; 0 = any.
    pub peer: u32,
    /// Destination port, network order; 0 = any.
    pub dport: u16,
    /// IP protocol; 0 = any.
    pub proto: u8,
    /// [`direction`].
    pub direction: u8,
}
const _: () = assert!(size_of::<PolicyKey>() == 12);
const _: () = assert!(offset_of!(PolicyKey, dport) == 8);

/// Value of [`policy_map::POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    /// Reserved (0 = allow), host order.
    pub flags: u32,
    /// Zero.
    pub pad: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

/// How a policy lookup ended; index `direction * MATCHES + match` into
/// [`policy_map::POLICY_COUNTERS`] (Cilium's `cilium_policy_verdict_total` `match` label).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyMatch {
    /// The endpoint is not default-deny in this direction: allowed.
    None = 0,
    /// Allowed by an L3+L4 entry.
    L3L4 = 1,
    /// Allowed by an L3-only entry (peer, any port).
    L3Only = 2,
    /// Allowed by an L4-only entry (any peer).
    L4Only = 3,
    /// Allowed by an allow-all entry.
    All = 4,
    /// No entry: denied.
    Denied = 5,
}

impl PolicyMatch {
    /// Values per direction.
    pub const COUNT: u32 = 6;
    /// Every value in index order.
    pub const ALL: [PolicyMatch; 6] = [
        PolicyMatch::None,
        PolicyMatch::L3L4,
        PolicyMatch::L3Only,
        PolicyMatch::L4Only,
        PolicyMatch::All,
        PolicyMatch::Denied,
    ];
    /// Cilium's `match` label value.
    pub const fn name(self) -> &'static str {
        match self {
            PolicyMatch::None => "none",
            PolicyMatch::L3L4 => "l3-l4",
            PolicyMatch::L3Only => "l3-only",
            PolicyMatch::L4Only => "l4-only",
            PolicyMatch::All => "all",
            PolicyMatch::Denied => "denied",
        }
    }
}

/// Index into [`policy_map::POLICY_COUNTERS`] beyond the verdict slots.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyCounter {
    /// Flow events written to the ring buffer.
    FlowsEmitted = 2 * PolicyMatch::COUNT,
    /// Flow events lost because the ring buffer was full.
    FlowsLost = 2 * PolicyMatch::COUNT + 1,
    /// Packets policy would have denied that passed as replies of a connection in
    /// [`map::POLICY_CT`](crate::map::POLICY_CT) (not counted as a verdict).
    CtReply = 2 * PolicyMatch::COUNT + 2,
}

impl PolicyCounter {
    /// Slots of the counters map: 2 directions × matches, then these.
    pub const SLOTS: u32 = 2 * PolicyMatch::COUNT + 3;
}

/// Key of [`map::POLICY_CT`](crate::map::POLICY_CT): a connection's forward tuple, as
/// the packet that was allowed carried it. A packet that policy denies passes if its
/// reverse tuple (addresses and ports swapped) is present and not expired.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyCtKey {
    /// Source IPv4, network order.
    pub saddr: [u8; 4],
    /// Destination IPv4, network order.
    pub daddr: [u8; 4],
    /// Source port, network order (0 for protocols without ports).
    pub sport: u16,
    /// Destination port, network order (0 for protocols without ports).
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<PolicyCtKey>() == 16);
const _: () = assert!(offset_of!(PolicyCtKey, proto) == 12);

/// Value of [`map::POLICY_CT`](crate::map::POLICY_CT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyCtValue {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC at tick resolution: cheaper than
    /// `bpf_ktime_get_ns`, and a few ms do not matter against lifetimes of seconds) of the
    /// last packet of the connection (refreshed at most every [`policy_ct::REFRESH_NS`]),
    /// host order.
    pub last_seen_ns: u64,
    /// How long after `last_seen_ns` the entry stays valid: one of [`policy_ct`]'s lifetimes
    /// (`CLOSE_LIFETIME_NS` once a TCP FIN or RST was seen, until a new SYN reopens it).
    pub lifetime_ns: u64,
}
const _: () = assert!(size_of::<PolicyCtValue>() == 16);

/// Lifetimes of [`map::POLICY_CT`](crate::map::POLICY_CT) entries (Cilium's defaults for
/// established TCP, closing TCP and non-TCP connections).
pub mod policy_ct {
    /// A TCP connection's entry is valid this long after its last allowed packet (6 h).
    pub const TCP_LIFETIME_NS: u64 = 6 * 3600 * 1_000_000_000;
    /// A TCP connection after a FIN or RST in either direction (10 s: the rest of the close
    /// handshake passes, a reused tuple does not inherit the old connection's 6 h).
    pub const CLOSE_LIFETIME_NS: u64 = 10 * 1_000_000_000;
    /// Any other protocol's entry (60 s).
    pub const ANY_LIFETIME_NS: u64 = 60 * 1_000_000_000;
    /// An entry is rewritten at most this often (1 s), so a stream does not write the map
    /// per packet.
    pub const REFRESH_NS: u64 = 1_000_000_000;
}

/// [`FlowEvent::verdict`] values (Hubble's).
pub mod verdict {
    /// Forwarded.
    pub const FORWARDED: u8 = 1;
    /// Dropped.
    pub const DROPPED: u8 = 2;
}

/// [`FlowEvent::drop_reason`] values: Cilium's drop codes (negated), 0 = none.
pub mod drop_reason {
    /// Cilium `DROP_POLICY` (133): `POLICY_DENIED`.
    pub const POLICY_DENIED: u8 = 133;
    /// Cilium `DROP_INVALID` (134): `INVALID_PACKET_DROPPED`.
    pub const INVALID_PACKET: u8 = 134;
}

/// [`FlowEvent::observation`]: the program that saw the packet.
pub mod observation {
    /// `from_pod`.
    pub const FROM_POD: u8 = 1;
    /// `from_overlay`.
    pub const FROM_OVERLAY: u8 = 2;
}

/// One flow event in [`policy_map::FLOWS`]: a forwarded (sampled) or dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC), host order.
    pub ktime_ns: u64,
    /// Source IPv4, network order.
    pub saddr: [u8; 4],
    /// Destination IPv4, network order.
    pub daddr: [u8; 4],
    /// Source port, network order (0 without one).
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// Source identity, host order (0 = unknown).
    pub src_identity: u32,
    /// Destination identity, host order.
    pub dst_identity: u32,
    /// Interface the program runs on, host order.
    pub ifindex: u32,
    /// IP protocol.
    pub proto: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20).
    pub tcp_flags: u8,
    /// [`verdict`].
    pub verdict: u8,
    /// [`direction`], relative to the local endpoint.
    pub direction: u8,
    /// [`drop_reason`].
    pub drop_reason: u8,
    /// [`observation`].
    pub observation: u8,
    /// [`PolicyMatch`] of the decisive lookup.
    pub policy_match: u8,
    /// Zero.
    pub pad: u8,
    /// Packet length in bytes, host order.
    pub len: u32,
    /// Zero.
    pub pad2: u32,
}
const _: () = assert!(size_of::<FlowEvent>() == 48);
const _: () = assert!(offset_of!(FlowEvent, proto) == 32);
const _: () = assert!(offset_of!(FlowEvent, len) == 40);

/// Flow settings: index 0 of [`policy_map::FLOW_CONFIG`]. All zero (the initial state):
/// drops always, forwarded TCP packets only with SYN, FIN or RST (Hubble's "medium"
/// monitor aggregation without conntrack), forwarded non-TCP packets always.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowConfig {
    /// [`flow_flags`], host order.
    pub flags: u32,
    /// Zero.
    pub pad: u32,
}
const _: () = assert!(size_of::<FlowConfig>() == 8);

/// Bits of [`FlowConfig::flags`].
pub mod flow_flags {
    /// Emit an event for every forwarded packet (benchmarks, debugging).
    pub const ALL_FORWARDED: u32 = 1 << 0;
    /// Emit no forwarded events (drops only).
    pub const DROPS_ONLY: u32 = 1 << 1;
}

#[cfg(feature = "user")]
mod policy_pod {
    use super::*;

    // SAFETY (all impls below): `#[repr(C)]`, `Copy`, integers and byte arrays only, no
    // implicit padding (sizes and offsets asserted above).
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyCtKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyCtValue {}
}
