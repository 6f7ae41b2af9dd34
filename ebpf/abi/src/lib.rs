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
    /// [`Lb6Key`](crate::Lb6Key) → [`Lb6Service`](crate::Lb6Service), hash
    /// (`cilium_lb6_services_v2`).
    pub const LB6_SERVICES: &str = "CM_LB6_SERVICES";
    /// `u32` backend ID → [`Lb6Backend`](crate::Lb6Backend), hash (`cilium_lb6_backends_v3`).
    pub const LB6_BACKENDS: &str = "CM_LB6_BACKENDS";
    /// `u16` rev-NAT index → [`Lb6RevNat`](crate::Lb6RevNat), hash (`cilium_lb6_reverse_nat`).
    pub const LB6_REVERSE_NAT: &str = "CM_LB6_REVNAT";
    /// [`Ct6Key`](crate::Ct6Key) → [`Ct6Entry`](crate::Ct6Entry), LRU hash: IPv6 service
    /// connections.
    pub const LB6_CT: &str = "CM_LB6_CT";
    /// [`LbCounter`](crate::LbCounter) → `u64`, per-CPU array, counters of the LB step.
    pub const LB_COUNTERS: &str = "CM_LB_CNT";
    /// [`PolicyCtKey`](crate::PolicyCtKey) → [`PolicyCtValue`](crate::PolicyCtValue), LRU
    /// hash: connections of policy-enforced endpoints, so their replies pass policy.
    /// Pinned (unlike the other policy maps, which the agent rebuilds from its engine):
    /// connections survive an agent restart.
    pub const POLICY_CT: &str = "CM_POLICY_CT";
    /// [`PolicyCt6Key`](crate::PolicyCt6Key) → [`PolicyCtValue`](crate::PolicyCtValue), LRU
    /// hash: [`POLICY_CT`] for IPv6 connections.
    pub const POLICY_CT6: &str = "CM_POLICY_CT6";
    /// [`program::V6_SLOTS`](crate::program::V6_SLOTS) → program, prog array: the IPv6
    /// halves the three programs tail-call. Pinned: the kernel empties a prog array when
    /// its last user reference goes, and the pinned links outlive the agent.
    pub const V6_PROGS: &str = "CM_V6_PROGS";
    /// Every map, for pinning and compatibility checks.
    pub const ALL: [&str; 19] = [
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
        LB6_SERVICES,
        LB6_BACKENDS,
        LB6_REVERSE_NAT,
        LB6_CT,
        POLICY_CT6,
        V6_PROGS,
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
    /// The IPv6 half of `from_pod`, tail-called from it (slot [`V6_FROM_POD`]).
    pub const FROM_POD_V6: &str = "from_pod_v6";
    /// The IPv6 half of `from_overlay` (slot [`V6_FROM_OVERLAY`]).
    pub const FROM_OVERLAY_V6: &str = "from_overlay_v6";
    /// The inner-IPv6 half of `from_underlay` (slot [`V6_FROM_UNDERLAY`]).
    pub const FROM_UNDERLAY_V6: &str = "from_underlay_v6";
    /// Slot of [`FROM_POD_V6`] in [`map::V6_PROGS`](crate::map::V6_PROGS).
    pub const V6_FROM_POD: u32 = 0;
    /// Slot of [`FROM_OVERLAY_V6`].
    pub const V6_FROM_OVERLAY: u32 = 1;
    /// Slot of [`FROM_UNDERLAY_V6`].
    pub const V6_FROM_UNDERLAY: u32 = 2;
    /// Capacity of [`map::V6_PROGS`](crate::map::V6_PROGS).
    pub const V6_SLOTS: u32 = 3;
    /// `(slot, program)` of every IPv6 half, for filling the prog array.
    pub const V6: [(u32, &str); 3] = [
        (V6_FROM_POD, FROM_POD_V6),
        (V6_FROM_OVERLAY, FROM_OVERLAY_V6),
        (V6_FROM_UNDERLAY, FROM_UNDERLAY_V6),
    ];
}

/// Default map sizes; the agent may override them at load time.
pub mod defaults {
    /// 1M remote endpoints (511 clusters × 2k pods) plus the local cluster's pods, nodes and
    /// CIDR entries, with room to spare: 1.25 × 2^20. Cilium's default is 512k; the trie is
    /// not preallocated, so capacity that is not used costs no memory, and the 90% warning
    /// (1.18M) still comes after a full 1M-endpoint mesh. See ebpf/README.md.
    pub const IPCACHE_MAX_ENTRIES: u32 = 1_310_720;
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
    /// IPv6 service entries (no prealloc, like the IPv4 table).
    pub const LB6_SERVICES_MAX_ENTRIES: u32 = 262_144;
    /// IPv6 backends.
    pub const LB6_BACKENDS_MAX_ENTRIES: u32 = 131_072;
    /// IPv6 reverse-NAT entries.
    pub const LB6_REVERSE_NAT_MAX_ENTRIES: u32 = 65_536;
    /// IPv6 service connection tracking entries. LRU maps are preallocated: at 40-byte keys a
    /// quarter of the IPv4 table (~6 MiB per node instead of ~27 MiB) until IPv6 service
    /// traffic is the bulk of a node's.
    pub const LB6_CT_MAX_ENTRIES: u32 = 65_536;
}

/// Address family as stored in [`IpcacheKey::family`] and [`EndpointKey::family`]
/// (Cilium's `ENDPOINT_KEY_IPV4` / `ENDPOINT_KEY_IPV6`).
pub mod family {
    /// IPv4: the address is in the first 4 bytes of the 16-byte field, the rest is zero.
    pub const IPV4: u8 = 1;
    /// IPv6: all 16 bytes.
    pub const IPV6: u8 = 2;
}

mod counter;
mod endpoint;
mod flow;
mod ipcache;
mod lb;
mod policy;
mod tunnel;

pub use counter::*;
pub use endpoint::*;
pub use flow::*;
pub use ipcache::*;
pub use lb::*;
pub use policy::*;
pub use tunnel::*;
