//! Policy enforcement and flow events, called from `from_pod` and `from_overlay` /
//! `from_underlay`, for IPv4 and IPv6 alike (generic over [`Ip`]; each family has its own
//! connection tracking map, `CM_POLICY_CT` / `CM_POLICY_CT6`).
//!
//! Policy is per subject identity (the local endpoint's): `CM_POLICY_MODE` says in which
//! directions an identity is default-deny; `CM_POLICY` holds the allowed
//! (subject, peer, direction, proto, port) tuples with 0 as wildcard, tried from the most
//! to the least specific (six hash lookups at worst; Cilium's order). An endpoint without a
//! mode entry costs one lookup per direction.
//!
//! Policy is stateful like Cilium's: replies of an allowed connection pass. `CM_POLICY_CT`
//! holds the forward tuple of connections whose replies will be checked against a
//! default-deny direction (a local source with ingress enforcement, a local destination
//! with egress enforcement); a packet that policy denies passes if its reverse tuple is
//! there and not expired (`CtReply`). The map is read only on the deny path and written only
//! for enforced endpoints, at most once a second per connection: endpoints without policy
//! never touch it.
//!
//! ICMPv6 neighbour discovery (types 133..=137) is never subject to policy, as in Cilium:
//! a pod with egress policy must still resolve its gateway and answer its neighbours.
//!
//! Every drop, and forwarded packets per `CM_FLOW_CFG`, become a [`FlowEvent`] in the
//! `CM_FLOWS` ring buffer; a full ring counts `FlowsLost` instead of blocking.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{
    direction, drop_reason, family, flow_flags, observation, policy_ct, policy_flags, policy_map,
    verdict, EndpointInfo, FlowConfig, FlowEvent, IpcacheValue, PolicyCounter, PolicyCt6Key,
    PolicyCtKey, PolicyCtValue, PolicyKey, PolicyMatch, PolicyValue, ICMPV6_ND_TYPES,
    IDENTITY_WORLD, IPPROTO_ICMPV6,
};

use crate::packet::{read_l4, Ip, Ipv4, Ipv6, Transport};

#[map]
static CM_POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(policy_map::POLICY_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static CM_POLICY_MODE: HashMap<u32, u32> =
    HashMap::with_max_entries(policy_map::POLICY_MODE_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static CM_POLICY_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(PolicyCounter::SLOTS, 0);

#[map]
static CM_POLICY_CT: LruHashMap<PolicyCtKey, PolicyCtValue> =
    LruHashMap::with_max_entries(policy_map::CT_MAX_ENTRIES, 0);

#[map]
static CM_POLICY_CT6: LruHashMap<PolicyCt6Key, PolicyCtValue> =
    LruHashMap::with_max_entries(policy_map::CT6_MAX_ENTRIES, 0);

#[map]
static CM_FLOWS: RingBuf = RingBuf::with_byte_size(policy_map::FLOWS_BYTES, 0);

#[map]
static CM_FLOW_CFG: Array<FlowConfig> = Array::with_max_entries(1, 0);

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const TCP_SYN_FIN_RST: u8 = 0x07;

/// The transport header fields policy and flows need. Ports in network order.
#[derive(Default)]
struct L4 {
    proto: u8,
    tcp_flags: u8,
    /// An ICMPv6 neighbour discovery message: not subject to policy.
    nd: bool,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the range lies inside the packet (checked above); packet data is unaligned.
    Some(unsafe { core::ptr::read_unaligned(start as *const T) })
}

/// The per-family half of policy: the connection tracking map and its key.
pub trait PolicyIp: Ip {
    /// Key of the family's connection tracking map.
    type CtKey: Copy + 'static;
    fn ct_map() -> &'static LruHashMap<Self::CtKey, PolicyCtValue>;
    fn ct_key(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> Self::CtKey;
}

impl PolicyIp for Ipv4 {
    type CtKey = PolicyCtKey;
    #[inline(always)]
    fn ct_map() -> &'static LruHashMap<PolicyCtKey, PolicyCtValue> {
        &CM_POLICY_CT
    }
    #[inline(always)]
    fn ct_key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> PolicyCtKey {
        PolicyCtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: [0; 3],
        }
    }
}

impl PolicyIp for Ipv6 {
    type CtKey = PolicyCt6Key;
    #[inline(always)]
    fn ct_map() -> &'static LruHashMap<PolicyCt6Key, PolicyCtValue> {
        &CM_POLICY_CT6
    }
    #[inline(always)]
    fn ct_key(saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16, proto: u8) -> PolicyCt6Key {
        PolicyCt6Key {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: [0; 3],
        }
    }
}

/// Protocol, ports and TCP flags; ports stay 0 for later fragments, IPv6 chains too long
/// to walk and headers that are not in the linear area after a pull (a policy with ports
/// then does not match).
#[inline(always)]
fn parse_l4<P: Ip>(ctx: &TcContext, ip: &P, out: &mut L4) {
    let mut t = Transport::default();
    if !ip.transport(ctx, &mut t) {
        return;
    }
    out.proto = t.proto;
    if t.no_ports {
        return;
    }
    let l4 = t.off;
    if P::FAMILY == family::IPV6 {
        // A helper, not a packet pointer, at IPv6's L4 offset (see `packet::read_l4`).
        if t.proto == IPPROTO_ICMPV6 {
            if let Ok(ty) = read_l4::<P, u8>(ctx, l4) {
                out.nd = ICMPV6_ND_TYPES.contains(&ty);
            }
            return;
        }
        if t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP && t.proto != IPPROTO_SCTP {
            return;
        }
        if let Ok(ports) = read_l4::<P, [u16; 2]>(ctx, l4) {
            out.sport = ports[0];
            out.dport = ports[1];
        }
        if t.proto == IPPROTO_TCP {
            if let Ok(flags) = read_l4::<P, u8>(ctx, l4 + 13) {
                out.tcp_flags = flags;
            }
        }
        return;
    }
    if t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP && t.proto != IPPROTO_SCTP {
        return;
    }
    if ctx.data() + l4 + 14 > ctx.data_end() && (ctx.len() as usize) >= l4 + 14 {
        // Headers outside the linear area (GRO): pull them in; pointers are re-derived.
        let _ = ctx.pull_data((l4 + 14) as u32);
    }
    if let Some(ports) = read::<[u16; 2]>(ctx, l4) {
        out.sport = ports[0];
        out.dport = ports[1];
    }
    if t.proto == IPPROTO_TCP {
        if let Some(flags) = read::<u8>(ctx, l4 + 13) {
            out.tcp_flags = flags;
        }
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = CM_POLICY_CNT.get_ptr_mut(slot) {
        // SAFETY: per-CPU array slot from a successful lookup; only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn allowed(key: &PolicyKey) -> bool {
    CM_POLICY.get_ptr(key).is_some()
}

/// The [`policy_flags`] of `subject` (0 without a `CM_POLICY_MODE` entry: not enforced).
#[inline(always)]
fn mode_of(subject: u32) -> u32 {
    match CM_POLICY_MODE.get_ptr(subject) {
        // SAFETY: pointer from a successful lookup (NO_PREALLOC: RCU-protected element).
        Some(mode) => unsafe { *mode },
        None => 0,
    }
}

/// The policy verdict for `subject` (whose [`policy_flags`] are `mode`) talking to `peer`
/// in direction `dir`, as a [`PolicyMatch`] (`Denied` = drop). A packet policy denies that
/// is a reply of a tracked connection is `None` and counted as `CtReply`; everything else
/// is counted as its verdict. Neighbour discovery is `None` (not subject to policy).
#[inline(always)]
fn check<P: PolicyIp>(subject: u32, mode: u32, peer: u32, dir: u8, ip: &P, l4: &L4) -> PolicyMatch {
    let m = if l4.nd {
        PolicyMatch::None
    } else {
        check_inner(subject, mode, peer, dir, l4)
    };
    if m == PolicyMatch::Denied && ct_reply(ip, l4) {
        count(PolicyCounter::CtReply as u32);
        return PolicyMatch::None;
    }
    count(u32::from(dir) * PolicyMatch::COUNT + m as u32);
    m
}

#[inline(always)]
fn check_inner(subject: u32, mode: u32, peer: u32, dir: u8, l4: &L4) -> PolicyMatch {
    let want = if dir == direction::INGRESS {
        policy_flags::INGRESS
    } else {
        policy_flags::EGRESS
    };
    if mode & want == 0 {
        return PolicyMatch::None;
    }
    let mut k = PolicyKey {
        subject,
        peer,
        dport: l4.dport,
        proto: l4.proto,
        direction: dir,
    };
    // Peer 0 (unknown) can only be allowed by any-peer entries.
    if peer != 0 {
        if allowed(&k) {
            return PolicyMatch::L3L4;
        }
        k.dport = 0;
        if allowed(&k) {
            return PolicyMatch::L3Only;
        }
        k.proto = 0;
        if allowed(&k) {
            return PolicyMatch::L3Only;
        }
        k.peer = 0;
    }
    k.proto = l4.proto;
    k.dport = l4.dport;
    if allowed(&k) {
        return PolicyMatch::L4Only;
    }
    k.dport = 0;
    if allowed(&k) {
        return PolicyMatch::L4Only;
    }
    k.proto = 0;
    if allowed(&k) {
        return PolicyMatch::All;
    }
    PolicyMatch::Denied
}

/// TCP flags that start closing a connection.
const TCP_FIN_RST: u8 = 0x05;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The lifetime a packet gives its connection's entry: a TCP FIN or RST starts the close.
#[inline(always)]
fn lifetime_for(l4: &L4) -> u64 {
    if l4.proto != IPPROTO_TCP {
        policy_ct::ANY_LIFETIME_NS
    } else if l4.tcp_flags & TCP_FIN_RST != 0 {
        policy_ct::CLOSE_LIFETIME_NS
    } else {
        policy_ct::TCP_LIFETIME_NS
    }
}

/// Updates the entry of the packet's connection at `now`: an expired entry starts over, a
/// FIN or RST shortens it to the close lifetime, a new SYN (no ACK) reopens a closing one
/// (a reused tuple); otherwise `last_seen` is refreshed at most once a second, so a stream
/// does not write the map per packet.
///
/// # Safety
/// `entry` comes from a successful lookup in `CM_POLICY_CT` in this program run. Concurrent
/// writers only store whole fields; a torn or stale value costs at most an early refresh.
#[inline(always)]
unsafe fn ct_touch(entry: *mut PolicyCtValue, l4: &L4, now: u64) {
    let want = lifetime_for(l4);
    let have = (*entry).lifetime_ns;
    let expired = now.wrapping_sub((*entry).last_seen_ns) >= have;
    let closing = have == policy_ct::CLOSE_LIFETIME_NS;
    let reopen = l4.proto == IPPROTO_TCP && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if expired || (want == policy_ct::CLOSE_LIFETIME_NS && !closing) || (closing && reopen) {
        (*entry).lifetime_ns = want;
        (*entry).last_seen_ns = now;
    } else if now.wrapping_sub((*entry).last_seen_ns) > policy_ct::REFRESH_NS {
        (*entry).last_seen_ns = now;
    }
}

/// `true` if the packet is a reply of a tracked connection: its reverse tuple is in
/// `CM_POLICY_CT` and not expired. Updates the entry (`ct_touch`), so a connection in which
/// only the replying side keeps sending does not expire, and a reply's FIN or RST closes it.
#[inline(always)]
fn ct_reply<P: PolicyIp>(ip: &P, l4: &L4) -> bool {
    let key = P::ct_key(ip.daddr(), ip.saddr(), l4.dport, l4.sport, l4.proto);
    let Some(entry) = P::ct_map().get_ptr_mut(&key) else {
        return false;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: pointer from a successful lookup (see `ct_touch`).
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) >= (*entry).lifetime_ns {
            return false;
        }
        ct_touch(entry, l4, now);
    }
    true
}

/// Tracks the packet's connection (its forward tuple) so that replies pass a default-deny
/// direction: a write only for a new entry or when `ct_touch` has something to change.
#[inline(always)]
fn ct_track<P: PolicyIp>(ip: &P, l4: &L4) {
    let key = P::ct_key(ip.saddr(), ip.daddr(), l4.sport, l4.dport, l4.proto);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(entry) = P::ct_map().get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup (see `ct_touch`).
        unsafe { ct_touch(entry, l4, now) };
        return;
    }
    let value = PolicyCtValue {
        last_seen_ns: now,
        lifetime_ns: lifetime_for(l4),
    };
    // A full map evicts its least recently used entry; an error leaves the connection
    // untracked (its replies are then policed like any packet).
    let _ = P::ct_map().insert(&key, &value, 0);
}

/// Everything a flow event needs besides the packet.
struct Flow {
    src_identity: u32,
    dst_identity: u32,
    verdict: u8,
    drop_reason: u8,
    direction: u8,
    observation: u8,
    policy_match: u8,
}

#[inline(always)]
fn emit<P: Ip>(ctx: &TcContext, ip: &P, l4: &L4, f: &Flow) {
    if f.verdict == verdict::FORWARDED {
        let flags = match CM_FLOW_CFG.get(0) {
            Some(c) => c.flags,
            None => 0,
        };
        if flags & flow_flags::DROPS_ONLY != 0 {
            return;
        }
        if flags & flow_flags::ALL_FORWARDED == 0
            && l4.proto == IPPROTO_TCP
            && l4.tcp_flags & TCP_SYN_FIN_RST == 0
        {
            return;
        }
    }
    let Some(mut entry) = CM_FLOWS.reserve::<FlowEvent>(0) else {
        count(PolicyCounter::FlowsLost as u32);
        return;
    };
    // SAFETY: plain helper calls / reads of the skb the program was given.
    let (now, ifindex) = unsafe { (bpf_ktime_get_ns(), (*ctx.skb.skb).ifindex) };
    entry.write(FlowEvent {
        ktime_ns: now,
        saddr: P::wide(ip.saddr()),
        daddr: P::wide(ip.daddr()),
        sport: l4.sport,
        dport: l4.dport,
        src_identity: f.src_identity,
        dst_identity: f.dst_identity,
        ifindex,
        proto: l4.proto,
        tcp_flags: l4.tcp_flags,
        verdict: f.verdict,
        direction: f.direction,
        drop_reason: f.drop_reason,
        observation: f.observation,
        policy_match: f.policy_match,
        family: P::FAMILY,
        len: ctx.len(),
        pad2: 0,
    });
    entry.submit(0);
    count(PolicyCounter::FlowsEmitted as u32);
}

#[inline(always)]
fn identity_of<P: Ip>(addr: P::Addr) -> u32 {
    match crate::CM_IPCACHE.get(&P::ipcache_key(addr)) {
        Some(v) => v.sec_identity,
        None => IDENTITY_WORLD,
    }
}

#[inline(always)]
fn local_endpoint<P: Ip>(addr: P::Addr) -> Option<EndpointInfo> {
    let ep = crate::CM_LOCAL_EPS.get_ptr(P::endpoint_key(addr))?;
    // SAFETY: pointer from a successful lookup (NO_PREALLOC: RCU-protected element).
    Some(unsafe { *ep })
}

/// What [`denied_from_pod`] looked up for a destination that is not on this node, for
/// `from_pod`'s tunnel step, which needs the same entries for the same (already translated)
/// addresses: that the destination is not a local endpoint, its ipcache entry, and the
/// source endpoint's identity. Handing them on saves three map lookups per tunnelled packet
/// (two hash lookups and the LPM trie; docs/datapath-throughput.md).
///
/// The entry stays in the map (a pointer, not a copy: from_pod's frame plus encap_v4's
/// must stay within BPF's 512 bytes of stack; the trie replaces elements through RCU, so
/// the pointer is valid for the program's run). Empty = nothing known: the caller looks up
/// itself (a local destination; the IPv6 half, whose policy step is a subprogram).
#[derive(Default)]
pub struct Seen<'a> {
    /// [`seen`] bits.
    pub flags: u8,
    /// The source endpoint's identity, with [`seen::SRC`].
    pub src_identity: u32,
    /// The destination's ipcache entry (a nullable pointer).
    pub entry: Option<&'a IpcacheValue>,
}

/// Bits of [`Seen::flags`].
pub mod seen {
    /// The destination is not a local endpoint, and the bits below say what was found.
    pub const REMOTE: u8 = 1;
    /// The source is a local endpoint ([`super::Seen::src_identity`]).
    pub const SRC: u8 = 2;
}

/// `from_pod`: egress policy of the source pod and, for a destination on this node, its
/// ingress policy. Emits the flow event. `true` = drop the packet. With `seen`, records the
/// endpoint and ipcache lookups it made for the caller (see [`Seen`]).
#[inline(always)]
pub fn denied_from_pod<P: PolicyIp>(
    ctx: &TcContext,
    ip: &P,
    seen: Option<&mut Seen<'static>>,
) -> bool {
    let mut l4 = L4::default();
    parse_l4(ctx, ip, &mut l4);
    let src = local_endpoint::<P>(ip.saddr());
    let dst = local_endpoint::<P>(ip.daddr());
    let src_identity = match &src {
        Some(ep) => ep.identity,
        None => identity_of::<P>(ip.saddr()),
    };
    let dst_identity = match &dst {
        Some(ep) => ep.identity,
        None => {
            let entry = crate::CM_IPCACHE.get(&P::ipcache_key(ip.daddr()));
            if let Some(seen) = seen {
                seen.flags = seen::REMOTE;
                seen.entry = entry;
                if src.is_some() {
                    seen.flags |= seen::SRC;
                    seen.src_identity = src_identity;
                }
            }
            match entry {
                Some(v) => v.sec_identity,
                None => IDENTITY_WORLD,
            }
        }
    };
    let mut flow = Flow {
        src_identity,
        dst_identity,
        verdict: verdict::FORWARDED,
        drop_reason: 0,
        direction: direction::EGRESS,
        observation: observation::FROM_POD,
        policy_match: PolicyMatch::None as u8,
    };
    // One mode lookup per local endpoint, the destination's only once the source's egress
    // passed (as before tracking existed); 0 (no entry) = nothing enforced, nothing tracked.
    let src_mode = if src.is_some() {
        mode_of(src_identity)
    } else {
        0
    };
    if src.is_some() {
        let m = check(
            src_identity,
            src_mode,
            dst_identity,
            direction::EGRESS,
            ip,
            &l4,
        );
        flow.policy_match = m as u8;
        if m == PolicyMatch::Denied {
            flow.verdict = verdict::DROPPED;
            flow.drop_reason = drop_reason::POLICY_DENIED;
            emit(ctx, ip, &l4, &flow);
            return true;
        }
    }
    let dst_mode = if dst.is_some() {
        mode_of(dst_identity)
    } else {
        0
    };
    if dst.is_some() {
        let m = check(
            dst_identity,
            dst_mode,
            src_identity,
            direction::INGRESS,
            ip,
            &l4,
        );
        if m == PolicyMatch::Denied {
            flow.verdict = verdict::DROPPED;
            flow.drop_reason = drop_reason::POLICY_DENIED;
            flow.direction = direction::INGRESS;
            flow.policy_match = m as u8;
            emit(ctx, ip, &l4, &flow);
            return true;
        }
    }
    // Replies of this connection come back through the source's ingress check (from
    // from_overlay, or here from the destination's veth) and leave the destination through
    // its egress check.
    if src_mode & policy_flags::INGRESS != 0 || dst_mode & policy_flags::EGRESS != 0 {
        ct_track(ip, &l4);
    }
    emit(ctx, ip, &l4, &flow);
    false
}

/// `from_overlay`: ingress policy of the local destination `ep` for a packet from
/// `src_identity` (the VNI). Emits the flow event. `true` = drop the packet.
#[inline(always)]
pub fn denied_from_overlay<P: PolicyIp>(
    ctx: &TcContext,
    ip: &P,
    src_identity: u32,
    ep: &EndpointInfo,
) -> bool {
    let mut l4 = L4::default();
    parse_l4(ctx, ip, &mut l4);
    let mode = mode_of(ep.identity);
    let m = check(ep.identity, mode, src_identity, direction::INGRESS, ip, &l4);
    let denied = m == PolicyMatch::Denied;
    // The destination's replies leave through its egress check in from_pod.
    if !denied && mode & policy_flags::EGRESS != 0 {
        ct_track(ip, &l4);
    }
    let flow = Flow {
        src_identity,
        dst_identity: ep.identity,
        verdict: if denied {
            verdict::DROPPED
        } else {
            verdict::FORWARDED
        },
        drop_reason: if denied {
            drop_reason::POLICY_DENIED
        } else {
            0
        },
        direction: direction::INGRESS,
        observation: observation::FROM_OVERLAY,
        policy_match: m as u8,
    };
    emit(ctx, ip, &l4, &flow);
    denied
}
