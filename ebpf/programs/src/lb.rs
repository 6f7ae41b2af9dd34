//! Service load balancing (TCP/UDP over IPv4 and IPv6) at the source pod's egress, before
//! netfilter. Written once over [`Lb`], implemented per family: `CM_LB4_*` for IPv4,
//! `CM_LB6_*` (Cilium's lb6 layouts) for IPv6, with the same semantics.
//!
//! * [`egress`] runs first in `from_pod`: a packet to a frontend (`VIP:port/proto` in
//!   `CM_LB4_SERVICES`, slot 0) is bound to a backend — the one its connection already uses
//!   (`CM_LB4_CT`, forward tuple) while that backend exists, else one picked uniformly at
//!   random among the service's slots (`bpf_get_prandom_u32`) — and its destination
//!   address and port are rewritten (DNAT, checksums fixed incrementally). The caller then
//!   forwards the translated packet like any other (local delivery or tunnel by the
//!   backend's ipcache entry). A new connection stores two CT entries: the forward tuple
//!   (→ backend) and the reply tuple as the backend will send it (→ rev-NAT index).
//! * [`reverse`] runs where a packet is delivered to a pod on this node (`from_pod` local
//!   delivery for a backend on the same node, `from_overlay` for a backend behind the
//!   tunnel): a packet matching a reply tuple gets its source rewritten back to the
//!   frontend (`CM_LB4_REVNAT`), so the client only ever sees the VIP. The client's node is
//!   the only one holding the connection's CT entries, which is why the reverse step is on
//!   the delivery side, not on the backend's egress. Replies the kernel stack delivers
//!   (tunnel unconfigured, a destination not in the maps) bypass both programs and are not
//!   translated: the connection then fails, as it would without the datapath.
//!
//! * Self-selection: when the random pick is the client itself and the service has other
//!   backends, another slot is taken (a uniform offset among the others; `self_avoided`).
//!   When the client is the only usable backend (hairpin), the connection is looped back
//!   the way Cilium does it: forward packets get the backend as destination and
//!   [`LB_LOOPBACK_IPV4`] (169.254.1.1, the pod's gateway) as source, so the pod does not see
//!   its own address on both sides; the reply tuple is stored as `pod → 169.254.1.1`, and
//!   such a reply, which enters `from_pod` on the same veth, is rewritten to
//!   `VIP:port → pod` ([`egress`]) and delivered back into the pod (`hairpin`). Policy sees
//!   the translated packets (source 169.254.1.1, resp. the VIP).
//!
//! Failover needs no restart: when the agent deletes a backend, the next packet of a
//! connection bound to it misses in `CM_LB4_BACKENDS` and is bound to a new backend.
//! IPv6 differences: no header checksum (only the L4 pseudo-header sum is fixed, by a
//! `bpf_csum_diff` of the 16-byte addresses); the transport header may follow extension
//! headers (the parser found it); hairpin connections use [`LB_LOOPBACK_IPV6`].
//! Not handled yet: later fragments (counted, passed untranslated), ClientIP session
//! affinity.

use aya_ebpf::bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR};
use aya_ebpf::helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_ktime_get_ns};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{
    ct_dir, defaults, family, Ct4Entry, Ct4Key, Ct6Key, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service,
    Lb6Backend, Lb6Key, Lb6RevNat, LbCounter, IPPROTO_TCP, IPPROTO_UDP, LB_LOOPBACK_IPV4,
    LB_LOOPBACK_IPV6,
};

use crate::packet::{ensure, read_l4, Error, Ip, Ipv4, Ipv6, Transport, ETH_HLEN};

/// Frontends (slot 0) and their backend slots. No prealloc: an update replaces the element
/// (RCU) instead of rewriting it under a reader.
#[map]
static CM_LB4_SERVICES: HashMap<Lb4Key, Lb4Service> =
    HashMap::with_max_entries(defaults::LB4_SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Backend ID → address, port, state, cluster.
#[map]
static CM_LB4_BACKENDS: HashMap<u32, Lb4Backend> =
    HashMap::with_max_entries(defaults::LB4_BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Rev-NAT index → frontend.
#[map]
static CM_LB4_REVNAT: HashMap<u16, Lb4RevNat> =
    HashMap::with_max_entries(defaults::LB4_REVERSE_NAT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Service connections: forward tuple → backend, reply tuple → frontend.
#[map]
static CM_LB4_CT: LruHashMap<Ct4Key, Ct4Entry> =
    LruHashMap::with_max_entries(defaults::LB4_CT_MAX_ENTRIES, 0);

/// The IPv6 frontends and backend slots.
#[map]
static CM_LB6_SERVICES: HashMap<Lb6Key, Lb4Service> =
    HashMap::with_max_entries(defaults::LB6_SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// IPv6 backends (IDs from the same space as the IPv4 ones).
#[map]
static CM_LB6_BACKENDS: HashMap<u32, Lb6Backend> =
    HashMap::with_max_entries(defaults::LB6_BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// IPv6 rev-NAT index → frontend.
#[map]
static CM_LB6_REVNAT: HashMap<u16, Lb6RevNat> =
    HashMap::with_max_entries(defaults::LB6_REVERSE_NAT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// IPv6 service connections.
#[map]
static CM_LB6_CT: LruHashMap<Ct6Key, Ct4Entry> =
    LruHashMap::with_max_entries(defaults::LB6_CT_MAX_ENTRIES, 0);

#[map]
static CM_LB_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(LbCounter::COUNT, 0);

/// Offset of the IPv4 header checksum.
const IP_CSUM_OFF: usize = ETH_HLEN + 10;

#[inline(always)]
fn count(counter: LbCounter) {
    if let Some(slot) = CM_LB_CNT.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU array slot from a successful lookup; only this CPU writes it.
        unsafe { *slot += 1 };
    }
}

/// The per-family half of the LB step: its maps, keys and the address rewrite.
pub trait Lb: Ip {
    /// Service map key.
    type Key: Copy + 'static;
    /// Backend map value.
    type Backend: Copy + Default + 'static;
    /// Reverse-NAT map value.
    type RevNat: Copy + 'static;
    /// Connection tracking key.
    type CtKey: Copy + 'static;
    /// Source of hairpin connections.
    const LOOPBACK: Self::Addr;
    fn services() -> &'static HashMap<Self::Key, Lb4Service>;
    fn backends() -> &'static HashMap<u32, Self::Backend>;
    fn rev_nats() -> &'static HashMap<u16, Self::RevNat>;
    fn ct() -> &'static LruHashMap<Self::CtKey, Ct4Entry>;
    fn key(address: Self::Addr, dport: u16, proto: u8, slot: u16) -> Self::Key;
    fn set_slot(key: &mut Self::Key, slot: u16);
    #[allow(clippy::too_many_arguments)]
    fn ct_key(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Self::CtKey;
    /// Address and port (network order) of a backend.
    fn backend(b: &Self::Backend) -> (Self::Addr, u16);
    /// Address and port of a frontend.
    fn rev_nat(r: &Self::RevNat) -> (Self::Addr, u16);
    /// The parts of [`egress`] and [`reverse`], inlined (IPv4) or as subprograms (IPv6).
    #[inline(always)]
    fn lb_lookup(
        ctx: &TcContext,
        ip: &mut Self,
        st: &mut LbState<Self::Backend>,
    ) -> Result<Step, Error> {
        lookup(ctx, ip, st)
    }
    #[inline(always)]
    fn lb_select(ip: &Self, l4: &L4, svc: &Lb4Service, out: &mut Bound<Self::Backend>) -> bool {
        select(ip, l4, svc, out)
    }
    #[inline(always)]
    fn lb_track(ip: &Self, l4: &L4, svc: &Lb4Service, b: &Bound<Self::Backend>) {
        track(ip, l4, svc, b)
    }
    #[inline(always)]
    fn lb_translate(
        ctx: &TcContext,
        ip: &mut Self,
        st: &LbState<Self::Backend>,
    ) -> Result<(), Error> {
        translate(ctx, ip, st)
    }
    #[inline(always)]
    fn lb_reverse(ctx: &TcContext, ip: &mut Self) -> Result<(), Error> {
        reverse_inline(ctx, ip)
    }
    /// Rewrites the address at `addr_off` from `old` to `new`, fixing the checksums it is
    /// part of (`csum_off` is the L4 checksum, `flags` its helper flags).
    fn rewrite_addr(
        ctx: &TcContext,
        csum_off: usize,
        flags: u64,
        addr_off: usize,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result<(), Error>;
}

impl Lb for Ipv4 {
    type Key = Lb4Key;
    type Backend = Lb4Backend;
    type RevNat = Lb4RevNat;
    type CtKey = Ct4Key;
    const LOOPBACK: [u8; 4] = LB_LOOPBACK_IPV4;
    #[inline(always)]
    fn services() -> &'static HashMap<Lb4Key, Lb4Service> {
        &CM_LB4_SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Lb4Backend> {
        &CM_LB4_BACKENDS
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u16, Lb4RevNat> {
        &CM_LB4_REVNAT
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<Ct4Key, Ct4Entry> {
        &CM_LB4_CT
    }
    #[inline(always)]
    fn key(address: [u8; 4], dport: u16, proto: u8, slot: u16) -> Lb4Key {
        Lb4Key {
            address,
            dport,
            backend_slot: slot,
            proto,
            scope: 0,
            pad: [0; 2],
        }
    }
    #[inline(always)]
    fn set_slot(key: &mut Lb4Key, slot: u16) {
        key.backend_slot = slot;
    }
    #[inline(always)]
    fn ct_key(
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Ct4Key {
        Ct4Key {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            flags: dir,
            pad: 0,
        }
    }
    #[inline(always)]
    fn backend(b: &Lb4Backend) -> ([u8; 4], u16) {
        (b.address, b.port)
    }
    #[inline(always)]
    fn rev_nat(r: &Lb4RevNat) -> ([u8; 4], u16) {
        (r.address, r.port)
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        csum_off: usize,
        flags: u64,
        addr_off: usize,
        old: [u8; 4],
        new: [u8; 4],
    ) -> Result<(), Error> {
        // The helpers take the values as they sit in memory (network order).
        let from = u64::from(u32::from_ne_bytes(old));
        let to = u64::from(u32::from_ne_bytes(new));
        ctx.l4_csum_replace(csum_off, from, to, flags | u64::from(BPF_F_PSEUDO_HDR) | 4)
            .map_err(|_| Error::Helper)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
            .map_err(|_| Error::Helper)?;
        ctx.store(addr_off, &new, 0).map_err(|_| Error::Helper)
    }
}

/// 16 bytes as the four big-endian words `bpf_csum_diff` sums.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

impl Lb for Ipv6 {
    type Key = Lb6Key;
    type Backend = Lb6Backend;
    type RevNat = Lb6RevNat;
    type CtKey = Ct6Key;
    const LOOPBACK: [u8; 16] = LB_LOOPBACK_IPV6;
    #[inline(always)]
    fn services() -> &'static HashMap<Lb6Key, Lb4Service> {
        &CM_LB6_SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Lb6Backend> {
        &CM_LB6_BACKENDS
    }
    #[inline(always)]
    fn rev_nats() -> &'static HashMap<u16, Lb6RevNat> {
        &CM_LB6_REVNAT
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<Ct6Key, Ct4Entry> {
        &CM_LB6_CT
    }
    #[inline(always)]
    fn key(address: [u8; 16], dport: u16, proto: u8, slot: u16) -> Lb6Key {
        Lb6Key {
            address,
            dport,
            backend_slot: slot,
            proto,
            scope: 0,
            pad: [0; 2],
        }
    }
    #[inline(always)]
    fn set_slot(key: &mut Lb6Key, slot: u16) {
        key.backend_slot = slot;
    }
    #[inline(always)]
    fn ct_key(
        saddr: [u8; 16],
        daddr: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Ct6Key {
        Ct6Key {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            flags: dir,
            pad: 0,
        }
    }
    #[inline(always)]
    fn backend(b: &Lb6Backend) -> ([u8; 16], u16) {
        (b.address, b.port)
    }
    #[inline(always)]
    fn rev_nat(r: &Lb6RevNat) -> ([u8; 16], u16) {
        (r.address, r.port)
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        csum_off: usize,
        flags: u64,
        addr_off: usize,
        old: [u8; 16],
        new: [u8; 16],
    ) -> Result<(), Error> {
        // A bool, not a Result: a subprogram returns one register (no stack arguments).
        if rewrite_addr_v6(ctx.skb.skb, csum_off, flags, addr_off, &[old, new]) {
            Ok(())
        } else {
            Err(Error::Helper)
        }
    }
    #[inline(always)]
    fn lb_lookup(
        ctx: &TcContext,
        ip: &mut Self,
        st: &mut LbState<Lb6Backend>,
    ) -> Result<Step, Error> {
        v6::lookup(ctx.skb.skb, ip, st)
    }
    #[inline(always)]
    fn lb_select(ip: &Self, l4: &L4, svc: &Lb4Service, out: &mut Bound<Lb6Backend>) -> bool {
        v6::select(ip, l4, svc, out)
    }
    #[inline(always)]
    fn lb_track(ip: &Self, l4: &L4, svc: &Lb4Service, b: &Bound<Lb6Backend>) {
        v6::track(ip, l4, svc, b)
    }
    #[inline(always)]
    fn lb_translate(ctx: &TcContext, ip: &mut Self, st: &LbState<Lb6Backend>) -> Result<(), Error> {
        v6::translate(ctx.skb.skb, ip, st)
    }
    #[inline(always)]
    fn lb_reverse(ctx: &TcContext, ip: &mut Self) -> Result<(), Error> {
        v6::reverse(ctx.skb.skb, ip)
    }
}

/// The L4 part of a TCP/UDP packet.
#[derive(Default)]
pub struct L4 {
    proto: u8,
    /// Offset of the L4 header (Ethernet + IP header with options / extension headers).
    off: usize,
    /// Ports as on the wire (network order).
    sport: u16,
    dport: u16,
}

impl L4 {
    fn csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.off + 16
        } else {
            self.off + 6
        }
    }

    /// UDP may carry no checksum (0): the helper must leave it at 0.
    fn csum_flags(&self) -> u64 {
        if self.proto == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }
}

/// Fills `out` for a TCP or UDP packet whose ports are present (first fragment or not a
/// fragment). `Ok(false)` for other protocols and for later fragments. The caller has
/// parsed the IP header (it is linear and valid).
#[inline(always)]
fn parse_l4<P: Ip>(ctx: &TcContext, ip: &P, out: &mut L4) -> Result<bool, Error> {
    let mut t = Transport::default();
    if !ip.transport(ctx, &mut t) {
        return Ok(false);
    }
    if t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP {
        return Ok(false);
    }
    if t.no_ports {
        count(LbCounter::Fragment);
        return Ok(false);
    }
    // Ports, and the checksum field the rewrite touches.
    let need = if t.proto == IPPROTO_TCP { 18 } else { 8 };
    if P::FAMILY == family::IPV6 {
        // No pull: IPv6 reads with a helper (see `read_l4`), and the rewrite is helpers too.
        if t.off + need > ctx.len() as usize {
            return Err(Error::Truncated);
        }
    } else {
        ensure(ctx, t.off + need)?;
    }
    out.proto = t.proto;
    out.off = t.off;
    out.sport = read_l4::<P, _>(ctx, t.off)?;
    out.dport = read_l4::<P, _>(ctx, t.off + 2)?;
    Ok(true)
}

/// Rewrites one address (at `addr_off`) and the matching port (at `port_off`), fixing the
/// checksums (IPv4 header, L4 with its pseudo-header).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite<P: Lb>(
    ctx: &TcContext,
    l4: &L4,
    addr_off: usize,
    old_addr: P::Addr,
    new_addr: P::Addr,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Error> {
    let csum_off = l4.csum_off();
    let flags = l4.csum_flags();
    if old_addr != new_addr {
        P::rewrite_addr(ctx, csum_off, flags, addr_off, old_addr, new_addr)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            flags | 2,
        )
        .map_err(|_| Error::Helper)?;
        ctx.store(port_off, &new_port, 0)
            .map_err(|_| Error::Helper)?;
    }
    Ok(())
}

/// Reads backend slot `slot` (1-based) of the service whose key is `key` (its slot field is
/// overwritten), and its backend.
#[inline(always)]
fn slot_backend<P: Lb>(key: &mut P::Key, slot: u32, id: &mut u32, be: &mut P::Backend) -> bool {
    P::set_slot(key, slot as u16);
    let Some(s) = P::services().get_ptr(&*key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let backend_id = unsafe { (*s).backend_id };
    let Some(b) = P::backends().get_ptr(backend_id) else {
        return false;
    };
    // SAFETY: as above.
    *be = unsafe { *b };
    *id = backend_id;
    true
}

/// Picks a backend for a new connection (`ip`, `l4`): a uniformly random slot of `svc`,
/// then the backend it names. If that is the client itself and there are other slots, one
/// of the others instead (uniform offset from the first pick, never back to it). Writes the
/// backend and its ID; `false` if a slot or backend is missing. Addresses are read from
/// `ip` where they are used, not held across helper calls (IPv6: 16-byte values spilled
/// around every call cost stack the subprogram does not have).
#[inline(always)]
fn select<P: Lb>(ip: &P, l4: &L4, svc: &Lb4Service, out: &mut Bound<P::Backend>) -> bool {
    let mut key = P::key(ip.daddr(), l4.dport, l4.proto, 0);
    // SAFETY: plain helper call.
    let rnd = unsafe { bpf_get_prandom_u32() };
    let slots = u32::from(svc.count);
    if slots == 0 {
        // The caller checked; repeated for the IPv6 subprogram, which cannot know.
        return false;
    }
    let first = rnd % slots;
    if !slot_backend::<P>(&mut key, first + 1, &mut out.id, &mut out.backend) {
        return false;
    }
    if P::backend(&out.backend).0 != ip.saddr() || slots < 2 {
        return true;
    }
    // Offset 1..count-1 from the first pick (high bits: the low ones chose `first`).
    let offset = 1 + (rnd >> 16) % (slots - 1);
    let slot = (first + offset) % slots;
    let mut other = Bound {
        id: 0,
        backend: P::Backend::default(),
    };
    if slot_backend::<P>(&mut key, slot + 1, &mut other.id, &mut other.backend) {
        if P::backend(&other.backend).0 != ip.saddr() {
            count(LbCounter::SelfAvoided);
        }
        *out = other;
    }
    // A missing slot (agent mid-update) keeps the first pick: hairpin below.
    true
}

/// The backend a new connection was bound to.
#[derive(Clone, Copy, Default)]
pub struct Bound<B> {
    id: u32,
    backend: B,
}

/// Stores both CT entries of a connection just bound to `b` (see the module docs).
#[inline(always)]
fn track<P: Lb>(ip: &P, l4: &L4, svc: &Lb4Service, b: &Bound<P::Backend>) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut entry = Ct4Entry {
        backend_id: b.id,
        rev_nat_index: svc.rev_nat_index,
        pad: 0,
        created_ns: now,
    };
    let fwd = P::ct_key(
        ip.saddr(),
        ip.daddr(),
        l4.sport,
        l4.dport,
        l4.proto,
        ct_dir::FORWARD,
    );
    // LRU maps evict rather than fail; an error here only loses stickiness.
    let _ = P::ct().insert(&fwd, &entry, 0);
    let (be_addr, be_port) = P::backend(&b.backend);
    // A hairpin connection's replies are addressed to the loopback source.
    let reply = P::ct_key(
        be_addr,
        if be_addr == ip.saddr() {
            P::LOOPBACK
        } else {
            ip.saddr()
        },
        be_port,
        l4.sport,
        l4.proto,
        ct_dir::REPLY,
    );
    entry.backend_id = 0;
    let _ = P::ct().insert(&reply, &entry, 0);
    count(LbCounter::CtNew);
}

/// [`Lb::rewrite_addr`] for IPv6 as a subprogram.
#[inline(never)]
fn rewrite_addr_v6(
    skb: *mut __sk_buff,
    csum_off: usize,
    flags: u64,
    addr_off: usize,
    addrs: &[[u8; 16]; 2],
) -> bool {
    let ctx = TcContext::new(skb);
    let [old, new] = addrs;
    // No IPv6 header checksum; the L4 checksum covers the addresses through the
    // pseudo-header: apply the difference of the old and new 16 bytes (size 0 in the
    // flags = `to` is a checksum difference, as Cilium's `csum_l4_replace` does).
    let mut from = words(old);
    let mut to = words(new);
    // SAFETY: both pointers are to 16-byte stack arrays and the sizes say so.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return false;
    }
    ctx.l4_csum_replace(
        csum_off,
        0,
        diff as u64 & 0xffff_ffff,
        flags | u64::from(BPF_F_PSEUDO_HDR),
    )
    .is_ok()
        && ctx.store(addr_off, new, 0).is_ok()
}

/// What [`lookup`] decided for a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// Not service traffic (or a hairpin reply, already rewritten): forward as it is.
    Pass = 0,
    /// A frontend without backends: drop.
    Drop = 1,
    /// A connection bound to a backend that still exists: translate.
    Bound = 2,
    /// A new connection (or its backend is gone): bind it, then translate.
    New = 3,
}

/// The LB step's state between its parts.
pub struct LbState<B> {
    l4: L4,
    svc: Lb4Service,
    bound: Bound<B>,
}

/// Translates a packet to a frontend (see the module docs); `ip`'s destination becomes the
/// backend's. `Ok(false)`: the packet must be dropped (a frontend without a usable backend).
///
/// Four parts, each an [`Lb`] method: IPv4 inlines them (one function, as before IPv6);
/// IPv6 calls them as sibling subprograms from here, so no two of their frames are on the
/// stack at once (BPF's 512 bytes are for the whole call chain).
#[inline(always)]
pub fn egress<P: Lb>(ctx: &TcContext, ip: &mut P) -> Result<bool, Error> {
    let mut st = LbState {
        l4: L4::default(),
        svc: Lb4Service::default(),
        bound: Bound {
            id: 0,
            backend: P::Backend::default(),
        },
    };
    match P::lb_lookup(ctx, ip, &mut st)? {
        Step::Pass => return Ok(true),
        Step::Drop => return Ok(false),
        Step::Bound => {}
        Step::New => {
            if !P::lb_select(ip, &st.l4, &st.svc, &mut st.bound) {
                count(LbCounter::DropBackendMissing);
                return Ok(false);
            }
            P::lb_track(ip, &st.l4, &st.svc, &st.bound);
        }
    }
    P::lb_translate(ctx, ip, &st)?;
    Ok(true)
}

/// First part of [`egress`]: transport header, hairpin reply, frontend and CT lookups.
#[inline(always)]
fn lookup<P: Lb>(ctx: &TcContext, ip: &mut P, st: &mut LbState<P::Backend>) -> Result<Step, Error> {
    if !parse_l4(ctx, ip, &mut st.l4)? {
        return Ok(Step::Pass);
    }
    if ip.daddr() == P::LOOPBACK {
        hairpin_reply(ctx, ip, &st.l4)?;
        return Ok(Step::Pass);
    }
    let l4 = &st.l4;
    let key = P::key(ip.daddr(), l4.dport, l4.proto, 0);
    let Some(svc) = P::services().get_ptr(&key) else {
        return Ok(Step::Pass);
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    st.svc = unsafe { *svc };
    let fwd = P::ct_key(
        ip.saddr(),
        ip.daddr(),
        l4.sport,
        l4.dport,
        l4.proto,
        ct_dir::FORWARD,
    );
    if let Some(ct) = P::ct().get_ptr(&fwd) {
        // SAFETY: pointer from a successful lookup; entries are only ever replaced whole.
        let id = unsafe { (*ct).backend_id };
        if let Some(b) = P::backends().get_ptr(id) {
            // SAFETY: as above.
            st.bound.backend = unsafe { *b };
            st.bound.id = id;
            count(LbCounter::CtHit);
            return Ok(Step::Bound);
        }
        count(LbCounter::Reselected);
    }
    if st.svc.count == 0 {
        count(LbCounter::DropNoBackend);
        return Ok(Step::Drop);
    }
    Ok(Step::New)
}

/// Last part of [`egress`]: destination → backend, and for a hairpin source → loopback.
#[inline(always)]
fn translate<P: Lb>(ctx: &TcContext, ip: &mut P, st: &LbState<P::Backend>) -> Result<(), Error> {
    let l4 = &st.l4;
    let (be_addr, be_port) = P::backend(&st.bound.backend);
    rewrite::<P>(
        ctx,
        l4,
        P::DST_OFF,
        ip.daddr(),
        be_addr,
        l4.off + 2,
        l4.dport,
        be_port,
    )?;
    ip.set_daddr(be_addr);
    if be_addr == ip.saddr() {
        // Hairpin: the client is its own backend; source → loopback (port unchanged).
        rewrite::<P>(
            ctx,
            l4,
            P::SRC_OFF,
            ip.saddr(),
            P::LOOPBACK,
            l4.off,
            l4.sport,
            l4.sport,
        )?;
        ip.set_saddr(P::LOOPBACK);
        count(LbCounter::Hairpin);
    }
    count(LbCounter::Translated);
    Ok(())
}

/// The IPv6 parts of [`egress`] as subprograms (`#[inline(never)]`: each its own frame).
mod v6 {
    use aya_ebpf::bindings::__sk_buff;
    use aya_ebpf::programs::TcContext;
    use clustermesh_ebpf_abi::{Lb4Service, Lb6Backend};

    use super::{Bound, LbState, Step, L4};
    use crate::packet::{Error, Ipv6};

    #[inline(never)]
    pub fn lookup(
        skb: *mut __sk_buff,
        ip: &mut Ipv6,
        st: &mut LbState<Lb6Backend>,
    ) -> Result<Step, Error> {
        super::lookup(&TcContext::new(skb), ip, st)
    }

    #[inline(never)]
    pub fn select(ip: &Ipv6, l4: &L4, svc: &Lb4Service, out: &mut Bound<Lb6Backend>) -> bool {
        super::select(ip, l4, svc, out)
    }

    #[inline(never)]
    pub fn track(ip: &Ipv6, l4: &L4, svc: &Lb4Service, b: &Bound<Lb6Backend>) {
        super::track(ip, l4, svc, b)
    }

    #[inline(never)]
    pub fn translate(
        skb: *mut __sk_buff,
        ip: &mut Ipv6,
        st: &LbState<Lb6Backend>,
    ) -> Result<(), Error> {
        super::translate(&TcContext::new(skb), ip, st)
    }

    #[inline(never)]
    pub fn reverse(skb: *mut __sk_buff, ip: &mut Ipv6) -> Result<(), Error> {
        super::reverse_inline(&TcContext::new(skb), ip)
    }
}

/// A packet from a pod to the loopback address: if it is the reply of a hairpin connection
/// (`pod:backend-port → loopback:client-port`), rewrites it to `VIP:port → pod:client-port`
/// so that `from_pod` delivers it back into the pod. Anything else is left untouched.
#[inline(always)]
fn hairpin_reply<P: Lb>(ctx: &TcContext, ip: &mut P, l4: &L4) -> Result<(), Error> {
    let pod = ip.saddr();
    let key = P::ct_key(pod, ip.daddr(), l4.sport, l4.dport, l4.proto, ct_dir::REPLY);
    let Some(ct) = P::ct().get_ptr(&key) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; entries are only ever replaced whole.
    let index = unsafe { (*ct).rev_nat_index };
    let Some(rev) = P::rev_nats().get_ptr(index) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let (vip, vport) = P::rev_nat(unsafe { &*rev });
    rewrite::<P>(ctx, l4, P::SRC_OFF, pod, vip, l4.off, l4.sport, vport)?;
    rewrite::<P>(
        ctx,
        l4,
        P::DST_OFF,
        P::LOOPBACK,
        pod,
        l4.off + 2,
        l4.dport,
        l4.dport,
    )?;
    ip.set_saddr(vip);
    ip.set_daddr(pod);
    count(LbCounter::Hairpin);
    count(LbCounter::RevNat);
    Ok(())
}

/// Reverse translation of a reply about to be delivered to a local pod (see the module
/// docs): source back to the frontend when the packet matches a reply tuple.
#[inline(always)]
pub fn reverse<P: Lb>(ctx: &TcContext, ip: &mut P) -> Result<(), Error> {
    P::lb_reverse(ctx, ip)
}

#[inline(always)]
fn reverse_inline<P: Lb>(ctx: &TcContext, ip: &mut P) -> Result<(), Error> {
    let mut l4 = L4::default();
    if !parse_l4(ctx, ip, &mut l4)? {
        return Ok(());
    }
    let saddr = ip.saddr();
    let key = P::ct_key(
        saddr,
        ip.daddr(),
        l4.sport,
        l4.dport,
        l4.proto,
        ct_dir::REPLY,
    );
    let Some(ct) = P::ct().get_ptr(&key) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; entries are only ever replaced whole.
    let index = unsafe { (*ct).rev_nat_index };
    let Some(rev) = P::rev_nats().get_ptr(index) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let (vip, vport) = P::rev_nat(unsafe { &*rev });
    rewrite::<P>(ctx, &l4, P::SRC_OFF, saddr, vip, l4.off, l4.sport, vport)?;
    ip.set_saddr(vip);
    count(LbCounter::RevNat);
    Ok(())
}
