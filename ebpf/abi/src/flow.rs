//! Flow events (`CM_FLOWS` ring buffer) and their settings (`CM_FLOW_CFG`).

use core::mem::{offset_of, size_of};

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

/// One flow event in [`policy_map::FLOWS`](crate::policy_map::FLOWS): a forwarded (sampled) or dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC), host order.
    pub ktime_ns: u64,
    /// Source address, network order; IPv4 in the first 4 bytes (per `family`).
    pub saddr: [u8; 16],
    /// Destination address, network order; IPv4 in the first 4 bytes.
    pub daddr: [u8; 16],
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
    /// [`direction`](crate::direction), relative to the local endpoint.
    pub direction: u8,
    /// [`drop_reason`].
    pub drop_reason: u8,
    /// [`observation`].
    pub observation: u8,
    /// [`PolicyMatch`](crate::PolicyMatch) of the decisive lookup.
    pub policy_match: u8,
    /// [`family::IPV4`](crate::family::IPV4) or [`family::IPV6`](crate::family::IPV6).
    pub family: u8,
    /// Packet length in bytes, host order.
    pub len: u32,
    /// Zero.
    pub pad2: u32,
}
const _: () = assert!(size_of::<FlowEvent>() == 72);
const _: () = assert!(offset_of!(FlowEvent, sport) == 40);
const _: () = assert!(offset_of!(FlowEvent, proto) == 56);
const _: () = assert!(offset_of!(FlowEvent, family) == 63);
const _: () = assert!(offset_of!(FlowEvent, len) == 64);

/// Flow settings: index 0 of [`policy_map::FLOW_CONFIG`](crate::policy_map::FLOW_CONFIG). All zero (the initial state):
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
mod pod {
    use super::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers
    // and byte arrays (every bit pattern is valid), and has no implicit padding (sizes and
    // offsets are asserted above), so it can be copied to and from the kernel as raw bytes.
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowConfig {}
}
