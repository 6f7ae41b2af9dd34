//! The ipcache (`CM_IPCACHE`): Cilium's v2 `ipcache_key` / `remote_endpoint_info` layout,
//! which maps every known address (prefix) to its identity and tunnel endpoint.

use core::mem::{offset_of, size_of};

use crate::family;

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
    /// `tunnel_endpoint` is IPv6: `from_pod` encapsulates in VXLAN over IPv6
    /// (`bpf_skb_set_tunnel_key` with `BPF_F_TUNINFO_IPV6`).
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

    /// An entry tunnelled to the IPv6 node `node` (network order).
    pub const fn tunnel_v6(sec_identity: u32, node: [u8; 16]) -> Self {
        Self {
            sec_identity,
            tunnel_endpoint: node,
            pad: 0,
            key: 0,
            flags: ipcache_flags::HAS_TUNNEL | ipcache_flags::IPV6_TUNNEL,
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

    #[test]
    fn ipv6_ipcache_key_bytes_match_cilium() {
        let addr = [0xfd, 0, 0, 0x10, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x11];
        let k = IpcacheLpmKey {
            prefixlen: IpcacheKey::prefixlen(128),
            key: IpcacheKey::v6(addr),
        };
        // SAFETY: IpcacheLpmKey is repr(C) without padding (asserted above).
        let bytes: [u8; 24] = unsafe { core::mem::transmute(k) };
        let mut want = [0u8; 24];
        want[..4].copy_from_slice(&160u32.to_ne_bytes());
        want[7] = 2;
        want[8..].copy_from_slice(&addr);
        assert_eq!(bytes, want);
        let v = IpcacheValue::tunnel_v6(7, addr);
        assert_eq!(
            v.flags, 0b110,
            "hastunnel + ipv6tunnel, as Cilium sets them"
        );
    }
}
