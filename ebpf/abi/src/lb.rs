//! Service load balancing (IPv4 and IPv6), after Cilium's LB maps (`bpf/lib/common.h`):
//! services, backends, reverse NAT, connection tracking and the LB step's counters. The
//! IPv6 maps (`CM_LB6_*`) have Cilium's lb6 layouts and the same semantics as the IPv4 ones.

use core::mem::{offset_of, size_of};

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;
/// `IPPROTO_ICMPV6`.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Key of [`map::LB4_SERVICES`](crate::map::LB4_SERVICES): Cilium's 12-byte `lb4_key`. Slot 0 is the service
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

/// Value of [`map::LB4_SERVICES`](crate::map::LB4_SERVICES): Cilium's 12-byte `lb4_service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4Service {
    /// Slot 0: unused (0). Slot ≥ 1: the backend ID ([`map::LB4_BACKENDS`](crate::map::LB4_BACKENDS) key). Host order.
    pub backend_id: u32,
    /// Slot 0: number of backend slots (0 = no backend: new connections are dropped).
    pub count: u16,
    /// Index into [`map::LB4_REVERSE_NAT`](crate::map::LB4_REVERSE_NAT) for replies; host order.
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

/// Value of [`map::LB4_BACKENDS`](crate::map::LB4_BACKENDS) (key: `u32` backend ID, never reused while a connection
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

/// Value of [`map::LB4_REVERSE_NAT`](crate::map::LB4_REVERSE_NAT) (key: `u16` rev-NAT index): the frontend a reply is
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

/// Key of [`map::LB4_CT`](crate::map::LB4_CT): a 5-tuple as seen on the wire, plus the direction.
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

/// Value of [`map::LB4_CT`](crate::map::LB4_CT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Entry {
    /// Forward entries: the backend the connection is bound to; reply entries: 0.
    pub backend_id: u32,
    /// The frontend to restore in replies ([`map::LB4_REVERSE_NAT`](crate::map::LB4_REVERSE_NAT) key), host order.
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

/// Key of [`map::LB6_SERVICES`](crate::map::LB6_SERVICES): Cilium's 24-byte `lb6_key`, the
/// same fields as [`Lb4Key`] with a 16-byte address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb6Key {
    /// Frontend (VIP), network order.
    pub address: [u8; 16],
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
const _: () = assert!(size_of::<Lb6Key>() == 24);
const _: () = assert!(offset_of!(Lb6Key, proto) == 20);

impl Lb6Key {
    /// The key of `slot` of the frontend `vip:port` (port in host order).
    pub const fn new(vip: [u8; 16], port: u16, proto: u8, slot: u16) -> Self {
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

/// Value of [`map::LB6_SERVICES`](crate::map::LB6_SERVICES): Cilium's `lb6_service` has the
/// layout of `lb4_service`.
pub type Lb6Service = Lb4Service;

/// Value of [`map::LB6_BACKENDS`](crate::map::LB6_BACKENDS) (key: `u32` backend ID, from the
/// same ID space as the IPv4 backends): Cilium's 24-byte `lb6_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb6Backend {
    /// Backend address, network order.
    pub address: [u8; 16],
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
const _: () = assert!(size_of::<Lb6Backend>() == 24);
const _: () = assert!(offset_of!(Lb6Backend, cluster_id) == 20);

/// Value of [`map::LB6_REVERSE_NAT`](crate::map::LB6_REVERSE_NAT) (key: `u16` rev-NAT
/// index): Cilium's `lb6_reverse_nat` with its tail padding made explicit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb6RevNat {
    /// Frontend (VIP), network order.
    pub address: [u8; 16],
    /// Frontend port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}
const _: () = assert!(size_of::<Lb6RevNat>() == 20);

/// Key of [`map::LB6_CT`](crate::map::LB6_CT): [`Ct4Key`] with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Key {
    /// Source address, network order.
    pub saddr: [u8; 16],
    /// Destination address, network order.
    pub daddr: [u8; 16],
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
const _: () = assert!(size_of::<Ct6Key>() == 40);

/// Value of [`map::LB6_CT`](crate::map::LB6_CT): the same as the IPv4 table's.
pub type Ct6Entry = Ct4Entry;

/// Source address of IPv6 hairpin service connections, the counterpart of
/// [`LB_LOOPBACK_IPV4`]: `fd00:169:254::1`, a ULA address every node holds on `lo` and every
/// pod routes through its gateway (the lab's contract, `docs/lab-datapath-contract.md`), so
/// replies to it enter `from_pod` on the pod's own veth.
pub const LB_LOOPBACK_IPV6: [u8; 16] = [
    0xfd, 0x00, 0x01, 0x69, 0x02, 0x54, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

/// Index into [`map::LB_COUNTERS`](crate::map::LB_COUNTERS) (per-CPU `u64` packet counts of the LB step, shared
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
mod pod {
    use super::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers
    // and byte arrays (every bit pattern is valid), and has no implicit padding (sizes and
    // offsets are asserted above), so it can be copied to and from the kernel as raw bytes.
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
    // SAFETY: see above.
    unsafe impl aya::Pod for Lb6Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Lb6Backend {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Lb6RevNat {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Ct6Key {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_loopback_is_fd00_169_254_then_1() {
        assert_eq!(
            core::net::Ipv6Addr::from(LB_LOOPBACK_IPV6),
            core::net::Ipv6Addr::new(0xfd00, 0x169, 0x254, 0, 0, 0, 0, 1)
        );
    }
}
