//! VXLAN's cost on the wire, and the MTU it leaves the pods and the VXLAN device.
//!
//! One rule for the agent (the VXLAN device it creates) and `clustermesh cni install` (the
//! pods' interfaces): an inner frame that fits must fit the underlay once encapsulated.
//! The datapath sends no Packet Too Big for a packet the VXLAN device drops as too big, so
//! a pod MTU above this stalls bulk TCP while small packets pass.

/// VXLAN over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// VXLAN over IPv6: outer IPv6 (40) + UDP + VXLAN + inner Ethernet.
pub const VXLAN_OVERHEAD_V6: u32 = 70;
/// The underlay MTU assumed when the node's underlay interface is unknown.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// The MTU of the VXLAN device and of the pods on an underlay of `underlay_mtu`, tunnelled
/// over IPv4 (`ipv4_underlay`) or IPv6; never below IPv4's minimum, 68.
pub const fn vxlan_mtu(underlay_mtu: u32, ipv4_underlay: bool) -> u32 {
    let overhead = if ipv4_underlay {
        VXLAN_OVERHEAD_V4
    } else {
        VXLAN_OVERHEAD_V6
    };
    let mtu = underlay_mtu.saturating_sub(overhead);
    if mtu < 68 {
        68
    } else {
        mtu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_room_for_the_encapsulation_of_the_underlay_family() {
        assert_eq!(vxlan_mtu(1500, true), 1450);
        assert_eq!(vxlan_mtu(1500, false), 1430);
        assert_eq!(vxlan_mtu(9001, true), 8951);
        assert_eq!(vxlan_mtu(100, false), 68);
    }
}
