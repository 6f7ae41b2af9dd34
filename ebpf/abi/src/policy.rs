//! Policy enforcement maps (`CM_POLICY`, `CM_POLICY_MODE`, `CM_POLICY_CNT`, `CM_POLICY_CT`)
//! and the names of the policy and flow maps. Not pinned (the agent rebuilds them from its
//! policy engine on start), so they are not in `map::ALL` — except the policy connection
//! tracking map (`map::POLICY_CT`), whose state the engine cannot rebuild.

use core::mem::{offset_of, size_of};

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
    /// Capacity of [`map::POLICY_CT6`](crate::map::POLICY_CT6): preallocated like every LRU
    /// map, a quarter of the IPv4 table (~6 MiB per node).
    pub const CT6_MAX_ENTRIES: u32 = 65_536;
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

/// [`PolicyKey::direction`] and [`FlowEvent::direction`](crate::FlowEvent::direction) values.
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

/// Key of [`map::POLICY_CT6`](crate::map::POLICY_CT6): [`PolicyCtKey`] with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyCt6Key {
    /// Source IPv6, network order.
    pub saddr: [u8; 16],
    /// Destination IPv6, network order.
    pub daddr: [u8; 16],
    /// Source port, network order (0 for protocols without ports).
    pub sport: u16,
    /// Destination port, network order (0 for protocols without ports).
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<PolicyCt6Key>() == 40);
const _: () = assert!(offset_of!(PolicyCt6Key, proto) == 36);

/// ICMPv6 types that policy never drops (Cilium lets neighbour discovery through before
/// policy): router solicitation/advertisement, neighbour solicitation/advertisement,
/// redirect (133..=137). Without them a pod with egress policy could not resolve its
/// gateway.
pub const ICMPV6_ND_TYPES: core::ops::RangeInclusive<u8> = 133..=137;

/// Value of [`map::POLICY_CT`](crate::map::POLICY_CT) and
/// [`map::POLICY_CT6`](crate::map::POLICY_CT6).
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

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers
    // and byte arrays (every bit pattern is valid), and has no implicit padding (sizes and
    // offsets are asserted above), so it can be copied to and from the kernel as raw bytes.
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyCtKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyCtValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyCt6Key {}
}
