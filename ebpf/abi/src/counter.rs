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
    /// Sent into the tunnel: redirected into the VXLAN device with a tunnel key, or (also
    /// counted as `tunnelled_bpf`) encapsulated by the program and redirected to the underlay.
    Tunnelled = 2,
    /// Handed to the kernel stack (`TC_ACT_OK`); the more specific reason is counted too.
    ToStack = 3,
    /// Neither IPv4 nor IPv6 (ARP, ...), or (`from_underlay`) an inner frame that is
    /// neither: to the stack.
    NotIp = 4,
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
    /// Dropped: IP header invalid (IPv4: version, IHL < 5, total length < IHL; IPv6: version,
    /// or a frame too short for the 40-byte fixed header).
    DropMalformed = 12,
    /// Dropped: frame shorter than the headers it announces (IPv4 options, an IPv6
    /// extension header, the transport header a service or policy reads).
    DropTruncated = 13,
    /// Dropped: a helper failed (set tunnel key, redirect).
    DropHelper = 14,
    /// `from_underlay`: not a VXLAN datagram to this node's tunnel port (the node's own
    /// traffic, fragments, IPv4 options, IPv6 extension headers): to the stack unchanged.
    NotTunnelled = 15,
    /// An IPv6 packet whose transport header follows extension headers (hop-by-hop,
    /// routing, fragment, destination options, AH): walked to the transport header and
    /// forwarded like any other packet.
    Ipv6ExtHeaders = 16,
    /// An IPv6 packet with more extension headers than the programs walk
    /// ([`IPV6_MAX_EXT_HEADERS`]): `from_pod` and `from_overlay` hand it to the stack
    /// unchanged (`to_stack` too); `from_underlay`, which finds out only after
    /// decapsulating, delivers it with its transport unknown (no ports: policy matches it
    /// only by L3-only or allow-all rules).
    Ipv6ExtUnparsed = 17,
    /// An IPv6 packet whose program half could not be tail-called (`CM_V6_PROGS` slot
    /// empty: an agent that did not fill it): to the stack.
    Ipv6Unavailable = 18,
    /// `from_pod`: of the `tunnelled` packets, those the program encapsulated itself
    /// (`tunnel_flags::BPF_TX`) and redirected to the underlay interface.
    TunnelledBpf = 19,
    /// `from_pod`: BPF transmit is on but this packet went through the VXLAN device: too big
    /// for the underlay MTU once encapsulated (the device then does what it does with such
    /// packets), or a tunnel over IPv6.
    BpfTxFallback = 20,
}

/// Extension headers the programs walk before they give up on finding the transport header
/// (Cilium walks 4 and drops beyond; 8 covers every chain a host stack sends).
pub const IPV6_MAX_EXT_HEADERS: usize = 8;

impl Counter {
    /// Number of counters (the counters maps' `max_entries`).
    pub const COUNT: u32 = 21;

    /// Every counter in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Packets,
        Counter::DeliveredLocal,
        Counter::Tunnelled,
        Counter::ToStack,
        Counter::NotIp,
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
        Counter::Ipv6ExtHeaders,
        Counter::Ipv6ExtUnparsed,
        Counter::Ipv6Unavailable,
        Counter::TunnelledBpf,
        Counter::BpfTxFallback,
    ];

    /// Stable snake_case name (metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::DeliveredLocal => "delivered_local",
            Counter::Tunnelled => "tunnelled",
            Counter::ToStack => "to_stack",
            Counter::NotIp => "not_ip",
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
            Counter::Ipv6ExtHeaders => "ipv6_ext_headers",
            Counter::Ipv6ExtUnparsed => "ipv6_ext_unparsed",
            Counter::Ipv6Unavailable => "ipv6_unavailable",
            Counter::TunnelledBpf => "tunnelled_bpf",
            Counter::BpfTxFallback => "bpf_tx_fallback",
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
