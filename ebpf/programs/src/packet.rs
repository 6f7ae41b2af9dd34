//! Bounds-checked header access.

use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::Counter;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Minimum IPv4 header length.
const IPV4_HLEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;

/// Why a packet is dropped.
#[derive(Clone, Copy)]
pub enum Error {
    /// An IPv4 header that cannot be valid.
    Malformed,
    /// Fewer bytes than the headers announce.
    Truncated,
    /// A helper call failed.
    Helper,
}

impl Error {
    /// The counter this drop is accounted under.
    pub fn counter(self) -> Counter {
        match self {
            Error::Malformed => Counter::DropMalformed,
            Error::Truncated => Counter::DropTruncated,
            Error::Helper => Counter::DropHelper,
        }
    }
}

/// The IPv4 addresses of a packet (network order).
#[derive(Default)]
pub struct Ipv4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
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
