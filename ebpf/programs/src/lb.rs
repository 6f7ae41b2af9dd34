//! Service load balancing (IPv4 TCP/UDP) at the source pod's egress, before netfilter.
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
//! Not handled yet: later IPv4 fragments (counted, passed untranslated), ClientIP
//! session affinity, IPv6.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR};
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{
    ct_dir, defaults, Ct4Entry, Ct4Key, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, LbCounter,
    IPPROTO_TCP, IPPROTO_UDP, LB_LOOPBACK_IPV4,
};

use crate::packet::{ensure, read, Error, Ipv4, ETH_HLEN};

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

#[map]
static CM_LB_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(LbCounter::COUNT, 0);

/// Offset of the IPv4 header checksum.
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
/// Offset of the IPv4 source address.
const IP_SRC_OFF: usize = ETH_HLEN + 12;
/// Offset of the IPv4 destination address.
const IP_DST_OFF: usize = ETH_HLEN + 16;
/// Fragment offset bits of the IPv4 `frag_off` field (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
fn count(counter: LbCounter) {
    if let Some(slot) = CM_LB_CNT.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU array slot from a successful lookup; only this CPU writes it.
        unsafe { *slot += 1 };
    }
}

/// The L4 part of a TCP/UDP packet.
#[derive(Default)]
struct L4 {
    proto: u8,
    /// Offset of the L4 header (Ethernet + IPv4 header with options).
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
/// parsed Ethernet + IPv4 (the first 34 bytes are linear and the header is valid).
#[inline(always)]
fn parse_l4(ctx: &TcContext, out: &mut L4) -> Result<bool, Error> {
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(false);
    }
    let frag = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?);
    if frag & IP_OFFSET_MASK != 0 {
        count(LbCounter::Fragment);
        return Ok(false);
    }
    let version_ihl: u8 = read(ctx, ETH_HLEN)?;
    let off = ETH_HLEN + ((version_ihl & 0x0f) as usize) * 4;
    // Ports, and the checksum field the rewrite touches.
    let need = if proto == IPPROTO_TCP { 18 } else { 8 };
    ensure(ctx, off + need)?;
    out.proto = proto;
    out.off = off;
    out.sport = read(ctx, off)?;
    out.dport = read(ctx, off + 2)?;
    Ok(true)
}

/// Rewrites one address (at `addr_off`) and the matching port (at `port_off`), fixing the
/// IPv4 header checksum and the L4 checksum (pseudo-header for the address).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Error> {
    let csum_off = l4.csum_off();
    let flags = l4.csum_flags();
    if old_addr != new_addr {
        // The helpers take the values as they sit in memory (network order).
        let from = u64::from(u32::from_ne_bytes(old_addr));
        let to = u64::from(u32::from_ne_bytes(new_addr));
        ctx.l4_csum_replace(csum_off, from, to, flags | u64::from(BPF_F_PSEUDO_HDR) | 4)
            .map_err(|_| Error::Helper)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
            .map_err(|_| Error::Helper)?;
        ctx.store(addr_off, &new_addr, 0)
            .map_err(|_| Error::Helper)?;
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

/// Reads backend slot `slot` (1-based) of the service `key` names, and its backend.
#[inline(always)]
fn slot_backend(key: &Lb4Key, slot: u32, id: &mut u32, be: &mut Lb4Backend) -> bool {
    let mut slot_key = *key;
    slot_key.backend_slot = slot as u16;
    let Some(s) = CM_LB4_SERVICES.get_ptr(slot_key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let backend_id = unsafe { (*s).backend_id };
    let Some(b) = CM_LB4_BACKENDS.get_ptr(backend_id) else {
        return false;
    };
    // SAFETY: as above.
    *be = unsafe { *b };
    *id = backend_id;
    true
}

/// Picks a backend for a new connection from `client`: a uniformly random slot of `svc`,
/// then the backend it names. If that is the client itself and there are other slots, one
/// of the others instead (uniform offset from the first pick, never back to it). Writes the
/// backend and its ID; `false` if a slot or backend is missing.
#[inline(always)]
fn select(
    key: &Lb4Key,
    svc: &Lb4Service,
    client: [u8; 4],
    id: &mut u32,
    be: &mut Lb4Backend,
) -> bool {
    // SAFETY: plain helper call.
    let rnd = unsafe { bpf_get_prandom_u32() };
    let slots = u32::from(svc.count);
    let first = rnd % slots;
    if !slot_backend(key, first + 1, id, be) {
        return false;
    }
    if be.address != client || slots < 2 {
        return true;
    }
    // Offset 1..count-1 from the first pick (high bits: the low ones chose `first`).
    let offset = 1 + (rnd >> 16) % (slots - 1);
    let slot = (first + offset) % slots;
    let mut other_id = 0u32;
    let mut other = Lb4Backend::default();
    if slot_backend(key, slot + 1, &mut other_id, &mut other) {
        if other.address != client {
            count(LbCounter::SelfAvoided);
        }
        *id = other_id;
        *be = other;
    }
    // A missing slot (agent mid-update) keeps the first pick: hairpin below.
    true
}

/// Translates a packet to a frontend (see the module docs); `ip.daddr` becomes the
/// backend's. `Ok(false)`: the packet must be dropped (a frontend without a usable backend).
#[inline(always)]
pub fn egress(ctx: &TcContext, ip: &mut Ipv4) -> Result<bool, Error> {
    let mut l4 = L4::default();
    if !parse_l4(ctx, &mut l4)? {
        return Ok(true);
    }
    if ip.daddr == LB_LOOPBACK_IPV4 {
        hairpin_reply(ctx, ip, &l4)?;
        return Ok(true);
    }
    let key = Lb4Key {
        address: ip.daddr,
        dport: l4.dport,
        backend_slot: 0,
        proto: l4.proto,
        scope: 0,
        pad: [0; 2],
    };
    let Some(svc) = CM_LB4_SERVICES.get_ptr(key) else {
        return Ok(true);
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let svc = unsafe { *svc };

    let fwd = Ct4Key {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: l4.sport,
        dport: l4.dport,
        proto: l4.proto,
        flags: ct_dir::FORWARD,
        pad: 0,
    };
    let mut be = Lb4Backend::default();
    let mut backend_id = 0u32;
    if let Some(ct) = CM_LB4_CT.get_ptr(fwd) {
        // SAFETY: pointer from a successful lookup; entries are only ever replaced whole.
        let id = unsafe { (*ct).backend_id };
        if let Some(b) = CM_LB4_BACKENDS.get_ptr(id) {
            // SAFETY: as above.
            be = unsafe { *b };
            backend_id = id;
            count(LbCounter::CtHit);
        } else {
            count(LbCounter::Reselected);
        }
    }
    if backend_id == 0 {
        if svc.count == 0 {
            count(LbCounter::DropNoBackend);
            return Ok(false);
        }
        if !select(&key, &svc, ip.saddr, &mut backend_id, &mut be) {
            count(LbCounter::DropBackendMissing);
            return Ok(false);
        }
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        let entry = Ct4Entry {
            backend_id,
            rev_nat_index: svc.rev_nat_index,
            pad: 0,
            created_ns: now,
        };
        // LRU maps evict rather than fail; an error here only loses stickiness.
        let _ = CM_LB4_CT.insert(fwd, entry, 0);
        // A hairpin connection's replies are addressed to the loopback source.
        let reply = Ct4Key {
            saddr: be.address,
            daddr: if be.address == ip.saddr {
                LB_LOOPBACK_IPV4
            } else {
                ip.saddr
            },
            sport: be.port,
            dport: l4.sport,
            proto: l4.proto,
            flags: ct_dir::REPLY,
            pad: 0,
        };
        let reply_entry = Ct4Entry {
            backend_id: 0,
            ..entry
        };
        let _ = CM_LB4_CT.insert(reply, reply_entry, 0);
        count(LbCounter::CtNew);
    }

    rewrite(
        ctx,
        &l4,
        IP_DST_OFF,
        ip.daddr,
        be.address,
        l4.off + 2,
        l4.dport,
        be.port,
    )?;
    ip.daddr = be.address;
    if be.address == ip.saddr {
        // Hairpin: the client is its own backend; source → loopback (port unchanged).
        rewrite(
            ctx,
            &l4,
            IP_SRC_OFF,
            ip.saddr,
            LB_LOOPBACK_IPV4,
            l4.off,
            l4.sport,
            l4.sport,
        )?;
        ip.saddr = LB_LOOPBACK_IPV4;
        count(LbCounter::Hairpin);
    }
    count(LbCounter::Translated);
    Ok(true)
}

/// A packet from a pod to [`LB_LOOPBACK_IPV4`]: if it is the reply of a hairpin connection
/// (`pod:backend-port → loopback:client-port`), rewrites it to `VIP:port → pod:client-port`
/// so that `from_pod` delivers it back into the pod. Anything else is left untouched.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, ip: &mut Ipv4, l4: &L4) -> Result<(), Error> {
    let key = Ct4Key {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: l4.sport,
        dport: l4.dport,
        proto: l4.proto,
        flags: ct_dir::REPLY,
        pad: 0,
    };
    let Some(ct) = CM_LB4_CT.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; entries are only ever replaced whole.
    let index = unsafe { (*ct).rev_nat_index };
    let Some(rev) = CM_LB4_REVNAT.get_ptr(index) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let rev = unsafe { *rev };
    let pod = ip.saddr;
    rewrite(
        ctx,
        l4,
        IP_SRC_OFF,
        pod,
        rev.address,
        l4.off,
        l4.sport,
        rev.port,
    )?;
    rewrite(
        ctx,
        l4,
        IP_DST_OFF,
        LB_LOOPBACK_IPV4,
        pod,
        l4.off + 2,
        l4.dport,
        l4.dport,
    )?;
    ip.saddr = rev.address;
    ip.daddr = pod;
    count(LbCounter::Hairpin);
    count(LbCounter::RevNat);
    Ok(())
}

/// Reverse translation of a reply about to be delivered to a local pod (see the module
/// docs): source back to the frontend when the packet matches a reply tuple.
#[inline(always)]
pub fn reverse(ctx: &TcContext, ip: &mut Ipv4) -> Result<(), Error> {
    let mut l4 = L4::default();
    if !parse_l4(ctx, &mut l4)? {
        return Ok(());
    }
    let key = Ct4Key {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: l4.sport,
        dport: l4.dport,
        proto: l4.proto,
        flags: ct_dir::REPLY,
        pad: 0,
    };
    let Some(ct) = CM_LB4_CT.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; entries are only ever replaced whole.
    let index = unsafe { (*ct).rev_nat_index };
    let Some(rev) = CM_LB4_REVNAT.get_ptr(index) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup in a NO_PREALLOC hash (RCU-protected).
    let rev = unsafe { *rev };
    rewrite(
        ctx,
        &l4,
        IP_SRC_OFF,
        ip.saddr,
        rev.address,
        l4.off,
        l4.sport,
        rev.port,
    )?;
    ip.saddr = rev.address;
    count(LbCounter::RevNat);
    Ok(())
}
