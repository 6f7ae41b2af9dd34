//! Bounds-checked header access, the IPv4 and IPv6 parsers, and [`Ip`]: what the delivery,
//! service and policy steps need from a parsed header of either family, so that each of
//! them is written once and compiled once per family (the IPv4 code is what it was before
//! IPv6 existed; IPv6 adds no work to it).

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{family, Counter, EndpointKey, IpcacheKey, IPV6_MAX_EXT_HEADERS};

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Minimum IPv4 header length.
const IPV4_HLEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_HLEN: usize = 40;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// IPv6 extension headers the parser walks (RFC 8200 §4; the ones Linux's
/// `ipv6_skip_exthdr` walks). ESP (50) and "no next header" (59) end the chain: they are
/// the packet's transport as far as the programs are concerned.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// A transport header further into the packet than this is not looked for (the verifier
/// needs a bound; eight extension headers of realistic size end far below it).
const IPV6_MAX_L4_OFF: usize = 2048;

/// Why a packet is dropped: the [`Counter`] it is accounted under.
///
/// A `u32` newtype, not a fieldless enum: `Result<i32, Error>` is then a tag plus one
/// 32-bit payload that every path writes. With a 1-byte enum LLVM kept the error byte in a
/// register of its own, undefined on the `Ok` paths, and still read it where the paths
/// merged, after a helper call had clobbered that register: `R1 !read_ok` in the IPv6
/// halves.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Error(u32);

#[allow(non_upper_case_globals)]
impl Error {
    /// A header that cannot be valid.
    pub const Malformed: Error = Error(Counter::DropMalformed as u32);
    /// Fewer bytes than the headers announce.
    pub const Truncated: Error = Error(Counter::DropTruncated as u32);
    /// A helper call failed.
    pub const Helper: Error = Error(Counter::DropHelper as u32);

    /// The counter this drop is accounted under.
    #[inline(always)]
    pub fn counter(self) -> Counter {
        if self.0 == Counter::DropMalformed as u32 {
            Counter::DropMalformed
        } else if self.0 == Counter::DropTruncated as u32 {
            Counter::DropTruncated
        } else {
            Counter::DropHelper
        }
    }
}

/// The IPv4 addresses of a packet (network order).
#[derive(Default)]
pub struct Ipv4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// Bits of [`Ipv6::flags`].
pub mod v6 {
    /// The transport header follows extension headers.
    pub const EXT: u8 = 1 << 0;
    /// A fragment header with a non-zero offset: no transport header in this packet.
    pub const LATER_FRAGMENT: u8 = 1 << 1;
    /// More extension headers than the parser walks: `proto` is the first one not walked.
    pub const UNPARSED: u8 = 1 << 2;
}

/// An IPv6 packet: addresses (network order) and where its transport header is, found once
/// by [`parse_ipv6`] (extension headers walked).
#[derive(Default)]
pub struct Ipv6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The transport protocol (next header after the extension headers).
    pub proto: u8,
    /// [`v6`] bits.
    pub flags: u8,
    /// Offset of the transport header from the start of the frame.
    pub l4_off: usize,
}

/// Where a packet's transport header is.
#[derive(Default)]
pub struct Transport {
    /// IP protocol.
    pub proto: u8,
    /// Offset of its header from the start of the frame.
    pub off: usize,
    /// `true` when this packet has no transport header (a later fragment, or an IPv6
    /// chain too long to walk): no ports.
    pub no_ports: bool,
}

/// What the delivery, service and policy steps need from a parsed IP header.
pub trait Ip: Default {
    /// An address, network order.
    type Addr: Copy + PartialEq + Default;
    /// [`family::IPV4`] or [`family::IPV6`].
    const FAMILY: u8;
    /// Offset of the source address from the start of the frame.
    const SRC_OFF: usize;
    /// Offset of the destination address.
    const DST_OFF: usize;
    fn saddr(&self) -> Self::Addr;
    fn daddr(&self) -> Self::Addr;
    fn set_saddr(&mut self, a: Self::Addr);
    fn set_daddr(&mut self, a: Self::Addr);
    /// The local endpoints map's key for `a`.
    fn endpoint_key(a: Self::Addr) -> EndpointKey;
    /// The ipcache key for the host prefix of `a` (/32, /128).
    fn ipcache_key(a: Self::Addr) -> Key<IpcacheKey>;
    /// `a` in the 16-byte form of flow events.
    fn wide(a: Self::Addr) -> [u8; 16];
    /// Fills `out`; `false` if the header cannot be read (the caller parsed it already, so
    /// only after a helper changed the packet).
    fn transport(&self, ctx: &TcContext, out: &mut Transport) -> bool;
}

impl Ip for Ipv4 {
    type Addr = [u8; 4];
    const FAMILY: u8 = family::IPV4;
    const SRC_OFF: usize = ETH_HLEN + 12;
    const DST_OFF: usize = ETH_HLEN + 16;
    #[inline(always)]
    fn saddr(&self) -> [u8; 4] {
        self.saddr
    }
    #[inline(always)]
    fn daddr(&self) -> [u8; 4] {
        self.daddr
    }
    #[inline(always)]
    fn set_saddr(&mut self, a: [u8; 4]) {
        self.saddr = a;
    }
    #[inline(always)]
    fn set_daddr(&mut self, a: [u8; 4]) {
        self.daddr = a;
    }
    #[inline(always)]
    fn endpoint_key(a: [u8; 4]) -> EndpointKey {
        EndpointKey::v4(a)
    }
    #[inline(always)]
    fn ipcache_key(a: [u8; 4]) -> Key<IpcacheKey> {
        Key::new(IpcacheKey::prefixlen(32), IpcacheKey::v4(a))
    }
    #[inline(always)]
    fn wide(a: [u8; 4]) -> [u8; 16] {
        [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }
    #[inline(always)]
    fn transport(&self, ctx: &TcContext, out: &mut Transport) -> bool {
        let (Ok(vihl), Ok(proto), Ok(frag)) = (
            read::<u8>(ctx, ETH_HLEN),
            read::<u8>(ctx, ETH_HLEN + 9),
            read::<u16>(ctx, ETH_HLEN + 6),
        ) else {
            return false;
        };
        out.proto = proto;
        out.off = ETH_HLEN + ((vihl & 0x0f) as usize) * 4;
        out.no_ports = u16::from_be(frag) & 0x1fff != 0;
        true
    }
}

impl Ip for Ipv6 {
    type Addr = [u8; 16];
    const FAMILY: u8 = family::IPV6;
    const SRC_OFF: usize = ETH_HLEN + 8;
    const DST_OFF: usize = ETH_HLEN + 24;
    #[inline(always)]
    fn saddr(&self) -> [u8; 16] {
        self.saddr
    }
    #[inline(always)]
    fn daddr(&self) -> [u8; 16] {
        self.daddr
    }
    #[inline(always)]
    fn set_saddr(&mut self, a: [u8; 16]) {
        self.saddr = a;
    }
    #[inline(always)]
    fn set_daddr(&mut self, a: [u8; 16]) {
        self.daddr = a;
    }
    #[inline(always)]
    fn endpoint_key(a: [u8; 16]) -> EndpointKey {
        EndpointKey::v6(a)
    }
    #[inline(always)]
    fn ipcache_key(a: [u8; 16]) -> Key<IpcacheKey> {
        Key::new(IpcacheKey::prefixlen(128), IpcacheKey::v6(a))
    }
    #[inline(always)]
    fn wide(a: [u8; 16]) -> [u8; 16] {
        a
    }
    #[inline(always)]
    fn transport(&self, _ctx: &TcContext, out: &mut Transport) -> bool {
        out.proto = self.proto;
        out.off = self.l4_off;
        out.no_ports = self.flags & (v6::LATER_FRAGMENT | v6::UNPARSED) != 0;
        true
    }
}

/// Makes `len` bytes from the start of the packet directly accessible: when the linear part
/// is shorter but the packet is not, pull the headers in (non-linear skbs, e.g. GRO'd
/// traffic). Pointers taken before a pull are invalid afterwards.
#[inline(always)]
pub(crate) fn ensure(ctx: &TcContext, len: usize) -> Result<(), Error> {
    if ctx.data() + len <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < len {
        return Err(Error::Truncated);
    }
    ctx.pull_data(len as u32).map_err(|_| Error::Truncated)?;
    if ctx.data() + len <= ctx.data_end() {
        Ok(())
    } else {
        Err(Error::Truncated)
    }
}

/// Reads a `T` at `offset` in the transport header, whose offset the parser computed:
/// IPv4 through a packet pointer (bounds-checked against `data_end`, so the caller makes
/// the header linear first), IPv6 with `bpf_skb_load_bytes` (linear or not).
///
/// Why IPv6 never adds its L4 offset to a packet pointer: the extension-header walk in
/// [`parse_ipv6`] leaves a different offset range for each chain length, and the verifier
/// must track a scalar precisely once it is added to a pointer, so every step after the
/// parse (LB, policy, flow events, delivery) was verified once per chain length: 665k
/// verified instructions and ~2.2 s of verifier time for `from_pod_v6` alone (kernel 6.18),
/// a third of the 1M limit away from not loading at all. A helper's offset argument is not
/// precise, so the states after the walk prune: 190k instructions (`from_overlay_v6` 52k →
/// 14k, `from_underlay_v6` 80k → 19k). The count is fragile: small changes in what the
/// IPv6 halves branch on moved it between 190k and past the limit; measure a change with
/// `verified_insns` (agent/tests/programs.rs prints and bounds them).
#[inline(always)]
pub(crate) fn read_l4<P: Ip, T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Error> {
    if P::FAMILY == family::IPV6 {
        ctx.load::<T>(offset).map_err(|_| Error::Truncated)
    } else {
        read::<T>(ctx, offset)
    }
}

/// Reads a `T` at `offset`, bounds-checked against `data_end`.
#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Error> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(Error::Truncated);
    }
    // SAFETY: the range [start, start + size_of::<T>()) lies inside the packet (checked
    // above); `read_unaligned` because packet data has no alignment guarantee.
    Ok(unsafe { core::ptr::read_unaligned(start as *const T) })
}

/// Parses Ethernet + IPv4 into `out`. `Ok(false)` for anything that is not IPv4 (to be
/// passed on).
///
/// An out-parameter the caller zeroes, not `Result<Option<Ipv4>, _>`: LLVM moves the
/// undefined payload of `Ok(None)` through a register when the paths merge, and the verifier
/// rejects reading a register that was never written ("R5 !read_ok").
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext, out: &mut Ipv4) -> Result<bool, Error> {
    ensure(ctx, ETH_HLEN)?;
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if ethertype != ETH_P_IP {
        return Ok(false);
    }
    ensure(ctx, ETH_HLEN + IPV4_HLEN)?;
    let version_ihl: u8 = read(ctx, ETH_HLEN)?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(Error::Malformed);
    }
    let total_len = u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?) as usize;
    // 0 is BIG TCP's "longer than 64 KiB" (the real length is the skb's).
    if total_len != 0 && total_len < ihl {
        return Err(Error::Malformed);
    }
    // Options are not read, but a header longer than the packet is not forwarded.
    if (ctx.len() as usize) < ETH_HLEN + ihl {
        return Err(Error::Truncated);
    }
    out.saddr = read(ctx, ETH_HLEN + 12)?;
    out.daddr = read(ctx, ETH_HLEN + 16)?;
    Ok(true)
}

/// Parses Ethernet + IPv6 into `out`, walking extension headers to the transport header.
/// `Ok(false)` for anything that is not IPv6. Errors: a frame too short for the fixed
/// header or a version other than 6 (`Malformed`); an extension header that runs past the
/// end of the frame (`Truncated`). A chain longer than [`IPV6_MAX_EXT_HEADERS`] is not an
/// error: `out.flags` says [`v6::UNPARSED`] and the packet is forwarded without ports.
///
/// Extension headers are read with `bpf_skb_load_bytes` (any offset, linear or not), not
/// through packet pointers: the walk's offsets are data-dependent, and the helper keeps
/// the verifier's view of the packet simple.
#[inline(always)]
pub fn parse_ipv6(ctx: &TcContext, out: &mut Ipv6) -> Result<bool, Error> {
    ensure(ctx, ETH_HLEN)?;
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if ethertype != ETH_P_IPV6 {
        return Ok(false);
    }
    // A real device (and BPF_PROG_TEST_RUN) can hand us fewer bytes than the fixed header.
    if (ctx.len() as usize) < ETH_HLEN + IPV6_HLEN {
        return Err(Error::Malformed);
    }
    ensure(ctx, ETH_HLEN + IPV6_HLEN)?;
    let vtc: u8 = read(ctx, ETH_HLEN)?;
    if vtc >> 4 != 6 {
        return Err(Error::Malformed);
    }
    out.saddr = read(ctx, ETH_HLEN + 8)?;
    out.daddr = read(ctx, ETH_HLEN + 24)?;
    let mut next: u8 = read(ctx, ETH_HLEN + 6)?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut walked = 0;
    while walked < IPV6_MAX_EXT_HEADERS {
        if next != NEXTHDR_HOP
            && next != NEXTHDR_ROUTING
            && next != NEXTHDR_FRAGMENT
            && next != NEXTHDR_AUTH
            && next != NEXTHDR_DEST
        {
            break;
        }
        // Every extension header is at least 8 bytes; the first four say what follows,
        // how long this one is (or, for a fragment, where the fragment starts).
        if off + 8 > ctx.len() as usize {
            return Err(Error::Truncated);
        }
        let h: [u8; 4] = ctx.load(off).map_err(|_| Error::Truncated)?;
        let len = if next == NEXTHDR_FRAGMENT {
            if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                out.flags |= v6::LATER_FRAGMENT;
            }
            8
        } else if next == NEXTHDR_AUTH {
            (h[1] as usize + 2) * 4
        } else {
            (h[1] as usize + 1) * 8
        };
        next = h[0];
        off += len;
        walked += 1;
        out.flags |= v6::EXT;
        if off > IPV6_MAX_L4_OFF {
            // Decided here and not after the loop: there, for a packet without extension
            // headers, the verifier would decide `54 > IPV6_MAX_L4_OFF` on a constant and
            // mark the offset precise (see `read_l4`).
            out.flags |= v6::UNPARSED;
            break;
        }
    }
    if off > ctx.len() as usize {
        // The last extension header announces more bytes than the frame has.
        return Err(Error::Truncated);
    }
    if next == NEXTHDR_HOP
        || next == NEXTHDR_ROUTING
        || next == NEXTHDR_FRAGMENT
        || next == NEXTHDR_AUTH
        || next == NEXTHDR_DEST
    {
        out.flags |= v6::UNPARSED;
    }
    out.proto = next;
    out.l4_off = off;
    Ok(true)
}

/// `true` if the frame's Ethernet type is IPv6 (the caller made the Ethernet header
/// readable).
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    read::<[u8; 2]>(ctx, 12).ok() == Some(ETH_P_IPV6.to_be_bytes())
}

/// Writes the Ethernet type (`from_underlay` after removing an outer header of the other
/// family).
#[inline(always)]
pub fn set_ethertype(ctx: &TcContext, ethertype: u16) -> Result<(), Error> {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return Err(Error::Truncated);
    }
    // SAFETY: the first ETH_HLEN bytes are inside the packet (checked above); tc programs
    // may write packet data directly.
    unsafe { core::ptr::write_unaligned((start + 12) as *mut [u8; 2], ethertype.to_be_bytes()) };
    Ok(())
}

/// Rewrites the Ethernet destination and source addresses.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Error> {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return Err(Error::Truncated);
    }
    // SAFETY: the first ETH_HLEN bytes are inside the packet (checked above) and tc
    // programs may write packet data directly (the verifier unclones the skb first).
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; 6], *dst);
        core::ptr::write_unaligned((start + 6) as *mut [u8; 6], *src);
    }
    Ok(())
}
