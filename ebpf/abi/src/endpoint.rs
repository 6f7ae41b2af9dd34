//! The local endpoints map (`CM_LOCAL_EPS`): pods on this node and how to deliver to them.

use core::mem::{offset_of, size_of};

use crate::family;

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

    /// Key for an IPv6 pod address (network order).
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self {
            addr: octets,
            family: family::IPV6,
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

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, built only from integers
    // and byte arrays (every bit pattern is valid), and has no implicit padding (sizes and
    // offsets are asserted above), so it can be copied to and from the kernel as raw bytes.
    unsafe impl aya::Pod for EndpointKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EndpointInfo {}
}
