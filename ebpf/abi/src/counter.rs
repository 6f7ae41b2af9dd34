//! Indices of the per-program packet counters (`CM_FROM_POD_CNT`, `CM_FROM_OVL_CNT`,
//! `CM_FROM_UL_CNT`).

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
