//! The ipcache key as the reconciler handles it: an IPv4 [`Prefix`] and an IPv6
//! [`Prefix6`] (the map key without cluster ID), and the hashers of the tables keyed by prefixes and cluster names (why they
//! are shaped so: the "why it is fast" notes of [`crate::reconcile`]).
//!
//! It must not know clusters, claims or map contents, only the key.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clustermesh_ebpf_abi::{family, IpcacheKey, IpcacheLpmKey};
use clustermesh_types::model::Cidr;

/// An IPv4 prefix (the ipcache key without cluster ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    /// Address (host bits as published).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub bits: u8,
}

impl Prefix {
    /// The map key.
    pub fn lpm_key(self) -> IpcacheLpmKey {
        IpcacheLpmKey {
            prefixlen: IpcacheKey::prefixlen(u32::from(self.bits)),
            key: IpcacheKey::v4(self.addr.octets()),
        }
    }

    /// The prefix `cidr` names; `None` for IPv6 (not programmed yet).
    pub fn from_cidr(cidr: &Cidr) -> Option<Self> {
        match cidr.addr {
            IpAddr::V4(addr) => Some(Self {
                addr,
                bits: cidr.prefix_len,
            }),
            IpAddr::V6(_) => None,
        }
    }

    /// The prefix of a map key this agent writes (IPv4, cluster 0), else `None`.
    pub fn from_lpm_key(k: &IpcacheLpmKey) -> Option<Self> {
        let bits = k
            .prefixlen
            .checked_sub(clustermesh_ebpf_abi::IPCACHE_STATIC_PREFIX)?;
        if k.key.family != family::IPV4 || k.key.cluster_id != 0 || bits > 32 {
            return None;
        }
        let a = k.key.addr;
        Some(Self {
            addr: Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            bits: bits as u8,
        })
    }
}

/// An IPv6 prefix (the ipcache key without cluster ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix6 {
    /// Address (host bits as published).
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub bits: u8,
}

impl Prefix6 {
    /// The map key (Cilium's IPv6 key: family 2, prefixlen 32 + `bits`).
    pub fn lpm_key(self) -> IpcacheLpmKey {
        IpcacheLpmKey {
            prefixlen: IpcacheKey::prefixlen(u32::from(self.bits)),
            key: IpcacheKey::v6(self.addr.octets()),
        }
    }

    /// The prefix `cidr` names; `None` for IPv4.
    pub fn from_cidr(cidr: &Cidr) -> Option<Self> {
        match cidr.addr {
            IpAddr::V6(addr) => Some(Self {
                addr,
                bits: cidr.prefix_len,
            }),
            IpAddr::V4(_) => None,
        }
    }

    /// The prefix of a map key this agent writes (IPv6, cluster 0), else `None`.
    pub fn from_lpm_key(k: &IpcacheLpmKey) -> Option<Self> {
        let bits = k
            .prefixlen
            .checked_sub(clustermesh_ebpf_abi::IPCACHE_STATIC_PREFIX)?;
        if k.key.family != family::IPV6 || k.key.cluster_id != 0 || bits > 128 {
            return None;
        }
        Some(Self {
            addr: Ipv6Addr::from(k.key.addr),
            bits: bits as u8,
        })
    }
}

impl std::hash::Hash for Prefix6 {
    /// The address as one `u128`, then the length: see `Prefix6Hasher`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from(self.addr));
        state.write_u8(self.bits);
    }
}

impl std::fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl std::hash::Hash for Prefix {
    /// One word (address and length packed): see `PrefixHasher`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(u32::from(self.addr)) << 8 | u64::from(self.bits));
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

/// FxHash (rustc's hasher) with a folding finish: the maps here are keyed by prefixes and
/// cluster names that the readers already validated, so HashDoS resistance buys nothing and
/// SipHash would cost a third of a 250k-entry resync.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    /// Folds the high half of a 128-bit product into the low half: FxHash's last multiply
    /// leaves the low bits depending only on the input's low bits, and hashbrown picks the
    /// bucket from the low bits. Without this, 250k consecutive pod IPs fell into 128
    /// buckets and every lookup probed a long chain.
    fn finish(&self) -> u64 {
        let m = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (m as u64) ^ (m >> 64) as u64
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(super) type Fx = std::hash::BuildHasherDefault<FxHasher>;
pub(super) type FxMap<K, V> = HashMap<K, V, Fx>;

/// The prefix index's hasher. [`Prefix`] hashes as one word, `address << 8 | length`; the
/// address's low 4 bits go into the bucket bits and into hashbrown's 7-bit tag unmixed, the
/// rest through FxHash, folded. So the 16 addresses of an aligned block share one 16-bucket
/// group: consecutive pod IPs (IPAM hands them out in order, etcd lists them /24 by /24)
/// reuse the same few cache lines instead of missing twice per entry at random, which made
/// a relist of 250k unchanged entries 2.5× faster. Blocks still spread like any good hash,
/// and two prefixes of one block never collide (their bucket bits and tags differ).
#[derive(Default, Clone, Copy)]
pub struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Prefix`; correct (if not local) for anything else.
        let mut fx = FxHasher(self.0);
        fx.write(bytes);
        self.0 = fx.0;
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    fn finish(&self) -> u64 {
        let low = (self.0 >> 8) & 0xf;
        let mut rest = FxHasher::default();
        rest.add(self.0 & !0xf00);
        rest.finish() ^ low ^ (low << 57)
    }
}

/// The IPv6 prefix index's hasher: [`PrefixHasher`]'s shape for a 128-bit address. The
/// address's low 4 bits go into the bucket bits and the tag unmixed, the rest (both halves
/// and the length) through FxHash, folded: the 16 addresses of an aligned block share one
/// bucket group, as for IPv4. SipHash (the std default this table had) and an allocation
/// per prefix made an IPv6 fill cost twice the kernel's share.
#[derive(Default, Clone, Copy)]
pub struct Prefix6Hasher {
    fx: FxHasher,
    low: u64,
}

impl std::hash::Hasher for Prefix6Hasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Prefix6`; correct (if not local) for anything else.
        self.fx.write(bytes);
    }
    fn write_u8(&mut self, i: u8) {
        self.fx.add(u64::from(i));
    }
    fn write_u128(&mut self, i: u128) {
        self.low = i as u64 & 0xf;
        self.fx.add((i >> 64) as u64);
        self.fx.add(i as u64 & !0xf);
    }
    fn finish(&self) -> u64 {
        self.fx.finish() ^ self.low ^ (self.low << 57)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_hash_spreads_blocks_and_keeps_a_block_together() {
        use std::hash::BuildHasher as _;
        let h = std::hash::BuildHasherDefault::<PrefixHasher>::default();
        let base = u32::from(Ipv4Addr::new(10, 16, 0, 0));
        let prefix = |i: u32, bits| Prefix {
            addr: Ipv4Addr::from(base + i),
            bits,
        };
        // 250k consecutive pod IPs in a table of 2^19 buckets: the 15625 blocks of 16 land
        // in groups as if at random (~12.4k distinct of 32768; FxHash alone: 8).
        let mask = (1u64 << 19) - 1;
        let groups: std::collections::HashSet<u64> = (0..250_000)
            .map(|i| (h.hash_one(prefix(i, 32)) & mask) >> 4)
            .collect();
        assert!(
            groups.len() > 12_000,
            "{} groups for 15625 blocks",
            groups.len()
        );
        // Within a block: one group, 16 distinct buckets, distinct tags.
        let block: Vec<u64> = (32..48).map(|i| h.hash_one(prefix(i, 32))).collect();
        let buckets: std::collections::HashSet<u64> = block.iter().map(|x| x & mask).collect();
        let tags: std::collections::HashSet<u64> = block.iter().map(|x| x >> 57).collect();
        assert_eq!(buckets.len(), 16);
        assert_eq!(tags.len(), 16);
        assert!(buckets.iter().all(|b| b >> 4 == (block[0] & mask) >> 4));
        // Prefixes of one address with other lengths are elsewhere.
        assert_ne!(
            h.hash_one(prefix(0, 32)) & mask,
            h.hash_one(prefix(0, 16)) & mask
        );
    }

    #[test]
    fn prefix6_hash_keeps_a_block_together_and_spreads_blocks() {
        use std::hash::BuildHasher as _;
        let h = std::hash::BuildHasherDefault::<Prefix6Hasher>::default();
        let base = u128::from("fd00:16::".parse::<Ipv6Addr>().expect("ip"));
        let prefix = |i: u128, bits| Prefix6 {
            addr: Ipv6Addr::from(base + i),
            bits,
        };
        let mask = (1u64 << 19) - 1;
        let groups: std::collections::HashSet<u64> = (0..250_000)
            .map(|i| (h.hash_one(prefix(i, 128)) & mask) >> 4)
            .collect();
        assert!(
            groups.len() > 12_000,
            "{} groups for 15625 blocks",
            groups.len()
        );
        let block: Vec<u64> = (32..48).map(|i| h.hash_one(prefix(i, 128))).collect();
        let buckets: std::collections::HashSet<u64> = block.iter().map(|x| x & mask).collect();
        let tags: std::collections::HashSet<u64> = block.iter().map(|x| x >> 57).collect();
        assert_eq!((buckets.len(), tags.len()), (16, 16));
        assert!(buckets.iter().all(|b| b >> 4 == (block[0] & mask) >> 4));
        assert_ne!(
            h.hash_one(prefix(0, 128)) & mask,
            h.hash_one(prefix(0, 64)) & mask
        );
    }
}
