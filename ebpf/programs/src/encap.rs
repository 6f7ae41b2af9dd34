//! VXLAN transmit in BPF (`tunnel_flags::BPF_TX`): `from_pod` grows the packet with
//! `bpf_skb_adjust_room`, writes the outer IPv4, UDP and VXLAN headers itself and hands the
//! datagram to the underlay interface with `bpf_redirect_neigh` (the kernel's FIB and
//! neighbour lookup fill in the outer Ethernet header). The VXLAN device's transmit path —
//! a metadata dst per packet, its route lookup through the tunnel's dst cache, the UDP
//! tunnel's header pushes — is skipped.
//!
//! The packet on the wire is what the kernel's VXLAN device sends for the same tunnel key
//! (RFC 7348; receivers, ours or the kernel's, do not tell them apart): outer IPv4 from this
//! node's underlay address, TTL 64, ECN copied from the inner header, DF set (ID 0, RFC
//! 6864), UDP from a port derived from the flow hash as `udp_flow_src_port` does so that
//! receivers spread flows over queues, to the node's VXLAN port, checksum 0 (allowed over
//! IPv4, what the device sends by default); VXLAN with the I flag and the source identity
//! as VNI; the pod's Ethernet header unchanged as the inner one.
//!
//! What it must not do: change a packet it then does not send. Everything that can make it
//! give up (a packet too big for the underlay MTU once encapsulated) is decided before
//! `bpf_skb_adjust_room`; the caller then takes the VXLAN device path, which treats such a
//! packet as it always did.

use aya_ebpf::bindings::{
    __sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
};
use aya_ebpf::helpers::{bpf_check_mtu, bpf_get_hash_recalc, bpf_redirect_neigh};
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{TunnelConfig, IPPROTO_UDP};

use crate::packet::{self, Error, ETH_HLEN};

/// Outer IPv4 (no options) + UDP + VXLAN + inner Ethernet: what the program inserts behind
/// the (outer) Ethernet header.
pub const VXLAN4_ENCAP_LEN: usize = 20 + 8 + 8 + ETH_HLEN;
/// Outer TTL (the device path's `TUNNEL_TTL`).
const TTL: u8 = 64;
/// The kernel's default local port range (`net.ipv4.ip_local_port_range` 32768–60999), which
/// the VXLAN device picks its source ports from.
const SPORT_MIN: u32 = 32_768;
const SPORT_MAX: u32 = 61_000;
/// IPv4 "don't fragment".
const IP_DF: u8 = 0x40;

/// What [`encap_v4`] did.
pub const SENT: i32 = 0;
/// The packet is too big for the underlay once encapsulated: unchanged, for the device.
pub const TOO_BIG: i32 = 1;

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)` of the kernel's UAPI (a macro, so not in the bindings):
/// the inner L2 header's length in the top byte of the flags.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// One packet's tunnel: where it goes and with which VNI.
pub struct Tx {
    /// The remote node, network order.
    pub remote: [u8; 4],
    /// The source identity.
    pub vni: u32,
    /// The inner packet is IPv6 (else IPv4).
    pub inner_v6: bool,
}

/// Encapsulates the packet (Ethernet + IPv4 or IPv6) for `tx` and redirects it to
/// `cfg.underlay_ifindex`. `Ok(SENT)`: the verdict is `TC_ACT_REDIRECT`; `Ok(TOO_BIG)`:
/// nothing was changed.
///
/// A subprogram (`#[inline(never)]`) with its own frame: it is called from `from_pod` and
/// `from_pod_v6`, and inlined it would be verified once per path into it. Three arguments
/// plus the hidden one of the `Result`: BPF passes at most five, in registers.
#[inline(never)]
pub fn encap_v4(skb: *mut __sk_buff, cfg: &TunnelConfig, tx: &Tx) -> Result<i32, Error> {
    let ctx = TcContext::new(skb);
    let inner_v6 = tx.inner_v6;
    // Too big once encapsulated? GSO packets pass: their segments are sized by the pod's
    // MTU, which leaves room for the encapsulation (as the device path assumes too).
    let mut mtu_len: u32 = 0;
    // SAFETY: `mtu_len` is a live u32 on the stack; the context is the program's skb.
    let ret = unsafe {
        bpf_check_mtu(
            skb.cast(),
            cfg.underlay_ifindex,
            &mut mtu_len,
            VXLAN4_ENCAP_LEN as i32,
            0,
        )
    };
    if ret != 0 {
        return Ok(TOO_BIG);
    }

    // What the outer headers take from the inner packet, read before it moves.
    packet::ensure(&ctx, ETH_HLEN + 2)?;
    let inner_eth: [u8; ETH_HLEN] = packet::read(&ctx, 0)?;
    let ecn = if inner_v6 {
        // Traffic class: low nibble of byte 0, high nibble of byte 1; ECN = its low 2 bits.
        (packet::read::<u8>(&ctx, ETH_HLEN + 1)? >> 4) & 0x3
    } else {
        packet::read::<u8>(&ctx, ETH_HLEN + 1)? & 0x3
    };
    // INET_ECN_encapsulate: CE inside is sent as ECT(0) outside.
    let ecn = if ecn == 0x3 { 0x2 } else { ecn };
    // The flow hash of the inner packet (the socket's, or the flow dissector's), as the
    // VXLAN device uses it: `udp_flow_src_port`, including its folding of the hash.
    // SAFETY: plain helper call on the program's skb.
    let mut hash = unsafe { bpf_get_hash_recalc(skb) };
    hash ^= hash << 16;
    let sport = ((u64::from(hash) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN;
    let inner_len = ctx.len() as usize - ETH_HLEN;

    // FIXED_GSO: a GSO packet's gso_size is the pod's MSS, which already fits the underlay
    // with the encapsulation (without the flag the kernel would shrink it by 50 bytes).
    // The ENCAP flags make the kernel set the inner header offsets, `encapsulation` and
    // SKB_GSO_UDP_TUNNEL, so a GSO packet is segmented (or offloaded) as VXLAN, and set
    // `skb->protocol` to IPv4 for an IPv6 inner packet.
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | encap_l2(ETH_HLEN as u64);
    ctx.adjust_room(VXLAN4_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Error::Helper)?;

    // Lengths of a GSO packet are those of the whole; segmentation rewrites them per
    // segment. Above 64 KiB (BIG TCP) they saturate, as the kernel's do.
    let ip_len = (inner_len + VXLAN4_ENCAP_LEN).min(0xffff) as u16;
    let udp_len = (inner_len + VXLAN4_ENCAP_LEN - 20).min(0xffff) as u16;
    let mut h = [0u8; VXLAN4_ENCAP_LEN];
    h[0] = 0x45;
    h[1] = ecn;
    h[2..4].copy_from_slice(&ip_len.to_be_bytes());
    // ID 0, DF, fragment offset 0.
    h[6] = IP_DF;
    h[8] = TTL;
    h[9] = IPPROTO_UDP;
    h[12..16].copy_from_slice(&cfg.local_ipv4);
    h[16..20].copy_from_slice(&tx.remote);
    let csum = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h[20..22].copy_from_slice(&(sport as u16).to_be_bytes());
    h[22..24].copy_from_slice(&cfg.tx_port);
    h[24..26].copy_from_slice(&udp_len.to_be_bytes());
    // UDP checksum 0; VXLAN: I flag, VNI in bytes 4..7.
    h[28] = 0x08;
    h[32..35].copy_from_slice(&tx.vni.to_be_bytes()[1..4]);
    h[36..50].copy_from_slice(&inner_eth);
    write_outer(&ctx, &h)?;

    // SAFETY: no parameters (NULL, 0): the kernel looks up route and neighbour itself.
    let ret = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    if ret != 7 {
        return Err(Error::Helper);
    }
    Ok(SENT)
}

/// The IPv4 header checksum over the first 20 bytes of `h` (checksum field zero).
#[inline(always)]
fn ipv4_checksum(h: &[u8; VXLAN4_ENCAP_LEN]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Writes the outer Ethernet type (IPv4) and `h` behind the Ethernet header. The room
/// `bpf_skb_adjust_room` inserted is in the linear part, so this only pulls if the
/// original frame's linear part was shorter than its Ethernet header (never, in practice).
#[inline(always)]
fn write_outer(ctx: &TcContext, h: &[u8; VXLAN4_ENCAP_LEN]) -> Result<(), Error> {
    packet::ensure(ctx, ETH_HLEN + VXLAN4_ENCAP_LEN)?;
    let start = ctx.data();
    if start + ETH_HLEN + VXLAN4_ENCAP_LEN > ctx.data_end() {
        return Err(Error::Truncated);
    }
    // SAFETY: the range is inside the packet (checked above) and tc programs may write
    // packet data directly.
    unsafe {
        core::ptr::write_unaligned((start + 12) as *mut [u8; 2], packet::ETH_P_IP.to_be_bytes());
        core::ptr::write_unaligned((start + ETH_HLEN) as *mut [u8; VXLAN4_ENCAP_LEN], *h);
    }
    Ok(())
}
