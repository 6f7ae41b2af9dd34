//! Kernel-side datapath: three tc classifiers attached with TCX links.
//!
//! * [`from_pod`]: ingress of each pod's host-side veth (packets leaving a pod). Local
//!   destination → `bpf_redirect_peer` into that pod; destination behind another node (this
//!   cluster or another) → tunnel key (remote node, VNI = source identity) and redirect into
//!   the node's VXLAN device; anything else → kernel stack.
//! * [`from_overlay`]: ingress of the node's VXLAN device (external / collect_md mode).
//!   Takes the source identity from the VNI and delivers to the local pod.
//! * [`from_underlay`]: ingress of the node's underlay device. Decapsulates VXLAN for local
//!   pods itself (the same delivery as `from_overlay`, without the VXLAN device's receive
//!   path) and passes everything else on unchanged.
//!
//! Pod traffic may be IPv4 or IPv6, and so may the underlay, in any combination: the
//! forwarding steps are generic over [`packet::Ip`] (compiled once per family; the IPv4 path
//! is the code it was before IPv6), the tunnel family is the ipcache entry's
//! (`IPV6_TUNNEL` → `BPF_F_TUNINFO_IPV6`). Non-IP frames (ARP) go to the kernel stack.
//!
//! Every program has the same shape: `fn prog(ctx) -> i32 { match try_prog(..) { Ok(v) => v,
//! Err(e) => count + TC_ACT_SHOT } }`; errors are only raised for packets that are broken
//! (malformed, truncated) or when a helper fails, so dropping is the safe action. Every
//! packet access is preceded by a bounds check against `data_end`.
//!
//! This crate must not do anything the ABI crate does not describe: every map and value
//! layout lives in `clustermesh-ebpf-abi`.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value, aya's `impl Borrow<K>` arguments
// are copied into a stack temporary first, and the IPv6 keys (24 to 40 bytes) are what the
// 512-byte stack limit is about.
#![allow(clippy::needless_borrows_for_generic_args)]

mod encap;
mod lb;
mod packet;
mod policy;

use aya_ebpf::bindings::{__sk_buff, bpf_tunnel_key, BPF_F_TUNINFO_IPV6};
use aya_ebpf::helpers::{
    bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray};
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{
    defaults, family, ipcache_flags, program, tunnel_flags, Counter, EndpointInfo, EndpointKey,
    IpcacheKey, IpcacheValue, TraceSlot, TunnelConfig, TunnelTrace, IPPROTO_UDP, MAX_VNI_IDENTITY,
};

use crate::lb::Lb;
use crate::packet::{v6, Error, Ipv4, Ipv6};
use crate::policy::PolicyIp;

/// Ipcache: destination prefix → identity, tunnel endpoint (Cilium's `cilium_ipcache_v2`).
#[map]
static CM_IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> =
    LpmTrie::with_max_entries(defaults::IPCACHE_MAX_ENTRIES, 0);

/// Pods on this node. `BPF_F_NO_PREALLOC` so that an update replaces the element (RCU)
/// instead of rewriting it in place under a concurrent reader.
#[map]
static CM_LOCAL_EPS: HashMap<EndpointKey, EndpointInfo> = HashMap::with_max_entries(
    defaults::LOCAL_ENDPOINTS_MAX_ENTRIES,
    aya_ebpf::bindings::BPF_F_NO_PREALLOC,
);

/// Node-wide tunnel settings (one entry).
#[map]
static CM_TUNNEL: Array<TunnelConfig> = Array::with_max_entries(1, 0);

#[map]
static CM_FROM_POD_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
static CM_FROM_OVL_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
static CM_FROM_UL_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// The IPv6 halves (`program::V6`), tail-called by the three programs.
#[map]
static CM_V6_PROGS: ProgramArray = ProgramArray::with_max_entries(program::V6_SLOTS, 0);

#[map]
static CM_TUNNEL_TRACE: PerCpuArray<TunnelTrace> =
    PerCpuArray::with_max_entries(TraceSlot::COUNT, 0);

// tc verdicts as the program's return type (the bindings' integer type varies by arch).
#[allow(clippy::unnecessary_cast)]
const TC_ACT_OK: i32 = aya_ebpf::bindings::TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const TC_ACT_SHOT: i32 = aya_ebpf::bindings::TC_ACT_SHOT as i32;
#[allow(clippy::unnecessary_cast)]
const TC_ACT_REDIRECT: i32 = aya_ebpf::bindings::TC_ACT_REDIRECT as i32;

/// VXLAN outer TTL.
const TUNNEL_TTL: u8 = 64;
/// What `bpf_skb_get_tunnel_key` returns when the metadata is of the other family.
const EPROTO: i64 = 71;

/// `tunnel`'s source identity when the source is not a local endpoint. No identity is
/// u32::MAX (Cilium's are 24 bits plus a scope byte, 0x01 for local ones). A plain value,
/// not an `Option`: see `policy::Seen`.
const NO_SOURCE: u32 = u32::MAX;

/// A remote node (a tunnel's other end): IPv4 or IPv6, the other all zero.
#[derive(Default)]
struct Remote {
    v4: [u8; 4],
    v6: [u8; 16],
}

/// The steps every forwarded packet goes through, per family. IPv4 inlines them (the code
/// it had before IPv6); IPv6 calls the policy steps (and the LB step's parts, `lb.rs`) as
/// BPF-to-BPF subprograms with their own frames, because all of them inlined need more
/// than BPF's 512-byte stack (40-byte keys).
trait Forward: Lb + PolicyIp {
    /// `seen` is filled where the family's policy step is inlined (IPv4), left zeroed
    /// where it is a subprogram (IPv6: a pointer into the caller's frame would cost the
    /// subprogram's stack budget for three lookups).
    fn denied_from_pod(ctx: &TcContext, ip: &Self, seen: &mut policy::Seen<'static>) -> bool;
    fn denied_from_overlay(ctx: &TcContext, ip: &Self, identity: u32, ep: &EndpointInfo) -> bool;
}

impl Forward for Ipv4 {
    #[inline(always)]
    fn denied_from_pod(ctx: &TcContext, ip: &Self, seen: &mut policy::Seen<'static>) -> bool {
        policy::denied_from_pod(ctx, ip, Some(seen))
    }
    #[inline(always)]
    fn denied_from_overlay(ctx: &TcContext, ip: &Self, identity: u32, ep: &EndpointInfo) -> bool {
        policy::denied_from_overlay(ctx, ip, identity, ep)
    }
}

impl Forward for Ipv6 {
    #[inline(always)]
    fn denied_from_pod(ctx: &TcContext, ip: &Self, _seen: &mut policy::Seen<'static>) -> bool {
        v6_calls::denied_from_pod(ctx.skb.skb, ip)
    }
    #[inline(always)]
    fn denied_from_overlay(ctx: &TcContext, ip: &Self, identity: u32, ep: &EndpointInfo) -> bool {
        v6_calls::denied_from_overlay(ctx.skb.skb, ip, identity, ep)
    }
}

/// The IPv6 steps as subprograms (`#[inline(never)]`: each its own stack frame). They take
/// the raw skb: a `TcContext` is rebuilt around it, which is free.
mod v6_calls {
    use aya_ebpf::bindings::__sk_buff;
    use aya_ebpf::programs::TcContext;
    use clustermesh_ebpf_abi::EndpointInfo;

    use crate::packet::Ipv6;
    use crate::policy;

    #[inline(never)]
    pub fn denied_from_pod(skb: *mut __sk_buff, ip: &Ipv6) -> bool {
        policy::denied_from_pod(&TcContext::new(skb), ip, None)
    }

    #[inline(never)]
    pub fn denied_from_overlay(
        skb: *mut __sk_buff,
        ip: &Ipv6,
        identity: u32,
        ep: &EndpointInfo,
    ) -> bool {
        policy::denied_from_overlay(&TcContext::new(skb), ip, identity, ep)
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<u64>, counter: Counter) {
    if let Some(slot) = map.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is
        // valid and only this CPU writes it (BPF programs do not migrate while running).
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn to_stack(map: &PerCpuArray<u64>, reason: Counter) -> i32 {
    count(map, reason);
    count(map, Counter::ToStack);
    TC_ACT_OK
}

#[inline(always)]
fn trace(slot: TraceSlot, remote: &Remote, vni: u32, ifindex: u32) {
    if let Some(t) = CM_TUNNEL_TRACE.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU array slot from a successful lookup (see `count`).
        unsafe {
            (*t).remote_ipv4 = remote.v4;
            (*t).remote_ipv6 = remote.v6;
            (*t).vni = vni;
            (*t).ifindex = ifindex;
            (*t).packets = (*t).packets.wrapping_add(1);
        }
    }
}

/// Writes the Ethernet header a pod expects (dst = its MAC, src = its gateway's, i.e. the
/// host-side veth) and redirects into the pod with `bpf_redirect_peer`: the packet lands on
/// the pod's `eth0` ingress directly, skipping the veth's xmit path and a second softirq
/// pass (what Cilium does for veth/netkit).
#[inline(always)]
fn deliver_local(ctx: &TcContext, ep: &EndpointInfo) -> Result<i32, Error> {
    packet::set_macs(ctx, &ep.pod_mac, &ep.host_mac)?;
    // SAFETY: plain helper call, no pointers.
    let ret = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(Error::Helper);
    }
    Ok(TC_ACT_REDIRECT)
}

/// TCX ingress of a pod's host-side veth.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    count(&CM_FROM_POD_CNT, Counter::Packets);
    match try_from_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(error) => {
            count(&CM_FROM_POD_CNT, error.counter());
            TC_ACT_SHOT
        }
    }
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, Error> {
    let counters = &CM_FROM_POD_CNT;
    let mut ip = Ipv4::default();
    if packet::parse_ipv4(ctx, &mut ip)? {
        return forward_from_pod(ctx, &mut ip);
    }
    if packet::is_ipv6(ctx) {
        return Ok(to_v6(ctx, counters, program::V6_FROM_POD));
    }
    Ok(to_stack(counters, Counter::NotIp))
}

/// Tail-calls the IPv6 half in `slot` of `CM_V6_PROGS`; returns only if that failed (an
/// empty slot), and then hands the packet to the stack.
///
/// Why a tail call and not a BPF-to-BPF call: BPF's 512-byte stack limit is for the whole
/// call chain, and the IPv4 code inlined in the caller already holds about half of it; a
/// tail-called program starts with a fresh stack, and the IPv4 path pays nothing for it.
#[inline(always)]
fn to_v6(ctx: &TcContext, counters: &PerCpuArray<u64>, slot: u32) -> i32 {
    // SAFETY: control leaves this program on success; nothing here holds resources that
    // need dropping (the caller returns the verdict right away on failure).
    unsafe { CM_V6_PROGS.tail_call(ctx, slot) };
    to_stack(counters, Counter::Ipv6Unavailable)
}

/// The IPv6 half of `from_pod`, tail-called by it (`Packets` was counted there).
#[classifier]
pub fn from_pod_v6(ctx: TcContext) -> i32 {
    let counters = &CM_FROM_POD_CNT;
    match try_from_pod_v6(ctx.skb.skb) {
        Ok(verdict) => verdict,
        Err(error) => {
            count(counters, error.counter());
            TC_ACT_SHOT
        }
    }
}

/// `#[inline(never)]` in all three IPv6 halves: inlined, LLVM merged the `Result`s of the
/// many return paths and then read the error byte on the `Ok` paths too, a register
/// nothing wrote there, which the verifier refuses (`R1 !read_ok`); returned from a
/// subprogram, the value is one written register.
#[inline(never)]
fn try_from_pod_v6(skb: *mut __sk_buff) -> Result<i32, Error> {
    let ctx = &TcContext::new(skb);
    let counters = &CM_FROM_POD_CNT;
    let mut ip = Ipv6::default();
    if !packet::parse_ipv6(ctx, &mut ip)? {
        return Ok(to_stack(counters, Counter::NotIp));
    }
    if count_ext(counters, &ip) {
        count(counters, Counter::ToStack);
        return Ok(TC_ACT_OK);
    }
    forward_from_pod(ctx, &mut ip)
}

/// Counts what the IPv6 parser found in the extension headers; `true` if the chain was
/// too long to walk (the caller hands such a packet to the stack unchanged, or, once it
/// is decapsulated, delivers it without ports).
#[inline(always)]
fn count_ext(counters: &PerCpuArray<u64>, ip: &Ipv6) -> bool {
    if ip.flags & v6::EXT != 0 {
        count(counters, Counter::Ipv6ExtHeaders);
    }
    if ip.flags & v6::UNPARSED != 0 {
        count(counters, Counter::Ipv6ExtUnparsed);
        return true;
    }
    false
}

/// `from_pod` after parsing: service translation, policy, then local delivery or tunnel.
#[inline(always)]
fn forward_from_pod<P: Forward>(ctx: &TcContext, ip: &mut P) -> Result<i32, Error> {
    let counters = &CM_FROM_POD_CNT;
    // Service VIP → backend (DNAT); everything below forwards the translated packet.
    if !lb::egress(ctx, ip)? {
        return Ok(TC_ACT_SHOT);
    }

    // Policy and flow events (policy.rs): egress of the source pod, ingress of a local
    // destination.
    let mut seen = policy::Seen::default();
    if P::denied_from_pod(ctx, ip, &mut seen) {
        return Ok(TC_ACT_SHOT);
    }
    // With `REMOTE`, the policy step found the destination not local and looked up what
    // the tunnel needs (policy::Seen): no second lookup of the same keys. Otherwise the
    // lookups happen here, into the same struct: one `tunnel` call site, because each
    // inlined copy of it takes its own stack slots (two made from_pod + encap_v4 608
    // bytes of stack, over BPF's 512).
    if seen.flags & policy::seen::REMOTE == 0 {
        // A pod on this node: deliver directly (hash lookup, cheaper than the trie).
        if let Some(ep) = CM_LOCAL_EPS.get_ptr(P::endpoint_key(ip.daddr())) {
            // SAFETY: pointer from a successful lookup; the map is NO_PREALLOC, so an element
            // stays valid (RCU) for the duration of the program even if it is replaced.
            let ep = unsafe { *ep };
            // A reply from a service backend on this node: source back to the VIP.
            lb::reverse(ctx, ip)?;
            let verdict = deliver_local(ctx, &ep)?;
            count(counters, Counter::DeliveredLocal);
            return Ok(verdict);
        }
        seen.entry = CM_IPCACHE.get(&P::ipcache_key(ip.daddr()));
        if let Some(src) = CM_LOCAL_EPS.get_ptr(P::endpoint_key(ip.saddr())) {
            // SAFETY: see above.
            seen.src_identity = unsafe { (*src).identity };
            seen.flags |= policy::seen::SRC;
        }
    }
    let Some(entry) = seen.entry else {
        return Ok(to_stack(counters, Counter::IpcacheMiss));
    };
    let src_identity = if seen.flags & policy::seen::SRC != 0 {
        seen.src_identity
    } else {
        NO_SOURCE
    };
    tunnel::<P>(ctx, src_identity, entry)
}

/// Sends the packet to the node named by the ipcache entry, with the identity of the
/// source pod (`src_identity`, [`NO_SOURCE`]: not a local endpoint) in the VNI, or
/// hands it to the stack when there is no usable tunnel.
/// The outer family is the entry's (`IPV6_TUNNEL`), independent of the packet's.
#[inline(always)]
fn tunnel<P: Forward>(
    ctx: &TcContext,
    src_identity: u32,
    entry: &IpcacheValue,
) -> Result<i32, Error> {
    let counters = &CM_FROM_POD_CNT;
    let flags = entry.flags;
    if flags & ipcache_flags::HAS_TUNNEL == 0 || flags & ipcache_flags::SKIP_TUNNEL != 0 {
        return Ok(to_stack(counters, Counter::NoTunnel));
    }
    let over_v6 = flags & ipcache_flags::IPV6_TUNNEL != 0;
    let mut remote = Remote::default();
    if over_v6 {
        remote.v6 = entry.tunnel_endpoint;
        if remote.v6 == [0; 16] {
            return Ok(to_stack(counters, Counter::NoTunnel));
        }
    } else {
        remote.v4 = [
            entry.tunnel_endpoint[0],
            entry.tunnel_endpoint[1],
            entry.tunnel_endpoint[2],
            entry.tunnel_endpoint[3],
        ];
        if remote.v4 == [0; 4] {
            return Ok(to_stack(counters, Counter::NoTunnel));
        }
    }
    let Some(cfg) = CM_TUNNEL.get(0) else {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    };
    let cfg = *cfg;
    if cfg.flags & tunnel_flags::ENABLED == 0 || cfg.vxlan_ifindex == 0 {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    }
    if (over_v6 && remote.v6 == cfg.local_ipv6) || (!over_v6 && remote.v4 == cfg.local_ipv4) {
        // A pod of this node that is not (yet) a local endpoint.
        return Ok(to_stack(counters, Counter::NoTunnel));
    }
    if src_identity == NO_SOURCE {
        return Ok(to_stack(counters, Counter::SourceUnknown));
    }
    let identity = src_identity;
    if identity > MAX_VNI_IDENTITY {
        return Ok(to_stack(counters, Counter::IdentityTooLarge));
    }

    // Transmit in BPF (encap.rs): IPv4 pods over an IPv4 underlay, when the packet fits.
    // A tunnel over IPv6 would need the outer UDP checksum (zero is not allowed there),
    // which a program cannot compute over a GSO packet: the device does it. IPv6 pods take
    // the device too: compiled into `from_pod_v6`, this block made LLVM leave a pointer to
    // the subprogram's own stack in R0 on an early return, which the verifier refuses
    // ("cannot return stack pointer to the caller"; ebpf/README.md).
    if P::FAMILY == family::IPV4 && cfg.flags & tunnel_flags::BPF_TX != 0 {
        if !over_v6 {
            let tx = encap::Tx {
                remote: remote.v4,
                vni: identity,
                inner_v6: false,
            };
            let sent = encap::encap_v4(ctx.skb.skb, &cfg, &tx)?;
            if sent == encap::SENT {
                trace(TraceSlot::Egress, &remote, identity, cfg.underlay_ifindex);
                count(counters, Counter::Tunnelled);
                count(counters, Counter::TunnelledBpf);
                return Ok(TC_ACT_REDIRECT);
            }
        }
        count(counters, Counter::BpfTxFallback);
    }

    // SAFETY: bpf_tunnel_key is plain integers and unions of integers; all zero is valid.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = identity;
    key.tunnel_ttl = TUNNEL_TTL;
    let key_flags = if over_v6 {
        // The helper copies the 16 bytes as they are (network order).
        let a = remote.v6;
        key.__bindgen_anon_1.remote_ipv6 = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
        u64::from(BPF_F_TUNINFO_IPV6)
    } else {
        // IPv4 in host order.
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote.v4);
        0
    };
    // SAFETY: `key` is a live, initialised bpf_tunnel_key and the size passed is its size.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            key_flags,
        )
    };
    if ret != 0 {
        return Err(Error::Helper);
    }
    // SAFETY: plain helper call, no pointers.
    let ret = unsafe { bpf_redirect(cfg.vxlan_ifindex, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        return Err(Error::Helper);
    }
    trace(TraceSlot::Egress, &remote, identity, cfg.vxlan_ifindex);
    count(counters, Counter::Tunnelled);
    Ok(TC_ACT_REDIRECT)
}

/// TCX ingress of the node's VXLAN device.
#[classifier]
pub fn from_overlay(mut ctx: TcContext) -> i32 {
    count(&CM_FROM_OVL_CNT, Counter::Packets);
    match try_from_overlay(&mut ctx) {
        Ok(verdict) => verdict,
        Err(error) => {
            count(&CM_FROM_OVL_CNT, error.counter());
            TC_ACT_SHOT
        }
    }
}

fn try_from_overlay(ctx: &mut TcContext) -> Result<i32, Error> {
    let counters = &CM_FROM_OVL_CNT;
    let mut remote = Remote::default();
    let identity = match tunnel_source(ctx, &mut remote) {
        Some(identity) => identity,
        None => {
            // Only happens without collect_md metadata (BPF_PROG_TEST_RUN, a device not in
            // external mode): identity 0 = unknown, which policy will treat as untrusted.
            count(counters, Counter::NoTunnelKey);
            0
        }
    };
    // The source identity for the policy step, which runs here (or in a tail call) before
    // the redirect: skb->cb is ours until then; the mark would leak into the node's stack on
    // the pass path and is cleared anyway when the packet crosses into the pod's namespace.
    ctx.cb_mut()[0] = identity;

    let mut ip = Ipv4::default();
    if packet::parse_ipv4(ctx, &mut ip)? {
        return overlay_deliver(ctx, &mut ip, identity, &remote);
    }
    if packet::is_ipv6(ctx) {
        return Ok(to_v6(ctx, counters, program::V6_FROM_OVERLAY));
    }
    Ok(to_stack(counters, Counter::NotIp))
}

/// The packet's tunnel metadata: the source identity (VNI) and the remote node, of
/// either family; `None` without metadata.
#[inline(always)]
fn tunnel_source(ctx: &TcContext, remote: &mut Remote) -> Option<u32> {
    // SAFETY: bpf_tunnel_key is plain integers and unions of integers; all zero is valid.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let size = core::mem::size_of::<bpf_tunnel_key>() as u32;
    // SAFETY: `key` is writable and the size passed is its size.
    let mut ret = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, 0) };
    let mut over_v6 = false;
    if ret == -EPROTO {
        // The packet came over IPv6: ask for that family (IPv4 stays the one-call path).
        // SAFETY: as above.
        ret = unsafe {
            bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, u64::from(BPF_F_TUNINFO_IPV6))
        };
        over_v6 = true;
    }
    if ret != 0 {
        return None;
    }
    if over_v6 {
        // SAFETY: the helper filled the IPv6 member (flag BPF_F_TUNINFO_IPV6); it holds the
        // 16 bytes as they were on the wire.
        let w = unsafe { key.__bindgen_anon_1.remote_ipv6 };
        for (i, word) in w.iter().enumerate() {
            remote.v6[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    } else {
        // SAFETY: the helper filled the IPv4 member (flags 0 = IPv4 tunnel).
        remote.v4 = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    }
    Some(key.tunnel_id)
}

/// The IPv6 half of `from_overlay`, tail-called by it (`Packets`, `NoTunnelKey` counted
/// there; the tunnel metadata is read again: a tail call carries only `cb`).
#[classifier]
pub fn from_overlay_v6(ctx: TcContext) -> i32 {
    let counters = &CM_FROM_OVL_CNT;
    match try_from_overlay_v6(ctx.skb.skb) {
        Ok(verdict) => verdict,
        Err(error) => {
            count(counters, error.counter());
            TC_ACT_SHOT
        }
    }
}

#[inline(never)]
fn try_from_overlay_v6(skb: *mut __sk_buff) -> Result<i32, Error> {
    let ctx = &TcContext::new(skb);
    let counters = &CM_FROM_OVL_CNT;
    let mut remote = Remote::default();
    let identity = tunnel_source(ctx, &mut remote).unwrap_or(0);
    let mut ip = Ipv6::default();
    if !packet::parse_ipv6(ctx, &mut ip)? {
        return Ok(to_stack(counters, Counter::NotIp));
    }
    if count_ext(counters, &ip) {
        count(counters, Counter::ToStack);
        return Ok(TC_ACT_OK);
    }
    overlay_deliver(ctx, &mut ip, identity, &remote)
}

/// `from_overlay` after parsing: a local destination gets the packet, anything else the
/// stack.
#[inline(always)]
fn overlay_deliver<P: Forward>(
    ctx: &TcContext,
    ip: &mut P,
    identity: u32,
    remote: &Remote,
) -> Result<i32, Error> {
    let counters = &CM_FROM_OVL_CNT;
    let Some(ep) = CM_LOCAL_EPS.get_ptr(P::endpoint_key(ip.daddr())) else {
        return Ok(to_stack(counters, Counter::EndpointMiss));
    };
    // SAFETY: see `forward_from_pod`.
    let ep = unsafe { *ep };
    deliver_tunnelled(ctx, counters, ip, identity, remote, &ep)
}

/// The receive side shared by `from_overlay` and `from_underlay`, for an inner packet
/// (behind an Ethernet header) to the local pod `ep` from `identity` at node `remote`:
/// ingress policy and flow event, reverse NAT of a service reply, delivery into the pod.
#[inline(always)]
fn deliver_tunnelled<P: Forward>(
    ctx: &TcContext,
    counters: &PerCpuArray<u64>,
    ip: &mut P,
    identity: u32,
    remote: &Remote,
    ep: &EndpointInfo,
) -> Result<i32, Error> {
    // Ingress policy with the source identity from the VNI, and the flow event (policy.rs).
    if P::denied_from_overlay(ctx, ip, identity, ep) {
        return Ok(TC_ACT_SHOT);
    }
    // A reply from a service backend behind the tunnel: source back to the VIP.
    lb::reverse(ctx, ip)?;
    let verdict = deliver_local(ctx, ep)?;
    trace(TraceSlot::Ingress, remote, identity, ep.ifindex);
    count(counters, Counter::DeliveredLocal);
    Ok(verdict)
}

/// Outer IPv4 header without options + UDP + VXLAN + inner Ethernet: what `from_underlay`
/// removes from an IPv4 underlay's datagram, leaving the outer Ethernet header in front of
/// the inner IP packet.
const VXLAN4_ENCAP_LEN: usize = 20 + 8 + 8 + packet::ETH_HLEN;
/// Outer IPv6 header without extension headers + UDP + VXLAN + inner Ethernet.
const VXLAN6_ENCAP_LEN: usize = packet::IPV6_HLEN + 8 + 8 + packet::ETH_HLEN;
/// VXLAN flags byte with only the "valid VNI" bit (RFC 7348).
const VXLAN_FLAG_VNI: u8 = 0x08;

/// TCX ingress of the node's underlay device: a VXLAN datagram (over IPv4 or IPv6) to this
/// node's tunnel port whose inner destination (IPv4 or IPv6) is a pod on this node is
/// decapsulated here and delivered like `from_overlay` does, with the source identity from
/// the VNI. The VXLAN device never sees it, so the kernel allocates no metadata dst for it
/// (`udp_tun_rx_dst`, freed through RCU: the biggest cost the collect_md receive path adds;
/// docs/datapath-throughput.md).
///
/// Everything else — the node's own traffic, VXLAN for addresses that are not local pods,
/// anything odd (IPv4 options, fragments, IPv6 extension headers in the outer header, a
/// short datagram) — goes on unchanged: this program never drops what it does not
/// decapsulate, and the VXLAN device with `from_overlay` stays the path for whatever is left.
#[classifier]
pub fn from_underlay(mut ctx: TcContext) -> i32 {
    count(&CM_FROM_UL_CNT, Counter::Packets);
    match try_from_underlay(&mut ctx) {
        Ok(verdict) => verdict,
        Err(error) => {
            count(&CM_FROM_UL_CNT, error.counter());
            TC_ACT_SHOT
        }
    }
}

/// `true` if the frame holds at least `len` bytes and they are (made) directly readable.
#[inline(always)]
fn readable(ctx: &TcContext, len: usize) -> bool {
    ctx.len() as usize >= len && packet::ensure(ctx, len).is_ok()
}

/// What `from_underlay` learned from a datagram's outer headers.
#[derive(Default)]
struct Outer {
    /// The outer header is IPv6.
    v6: bool,
    /// Bytes to remove behind the outer Ethernet header ([`VXLAN4_ENCAP_LEN`] or
    /// [`VXLAN6_ENCAP_LEN`]).
    encap: usize,
    /// The VNI: the source identity.
    identity: u32,
    /// The sending node.
    remote: Remote,
}

/// Checks the outer headers: IPv4 without options and not a fragment, or IPv6 with UDP
/// right behind the fixed header; to this node's address of that family and its VXLAN
/// port; VNI present. `Ok(false)`: not a datagram this program decapsulates. Reads only
/// what is there: nothing here may turn the node's own traffic into a drop.
#[inline(always)]
fn parse_outer(ctx: &TcContext, cfg: &TunnelConfig, o: &mut Outer) -> Result<bool, Error> {
    let eth = packet::ETH_HLEN;
    let outer_type = packet::read::<[u8; 2]>(ctx, 12).ok();
    if outer_type == Some(packet::ETH_P_IP.to_be_bytes()) {
        o.v6 = false;
        o.encap = VXLAN4_ENCAP_LEN;
    } else if outer_type == Some(packet::ETH_P_IPV6.to_be_bytes()) {
        o.v6 = true;
        o.encap = VXLAN6_ENCAP_LEN;
    } else {
        return Ok(false);
    }
    // Outer headers, inner Ethernet and the smallest inner IP header (IPv4's 20 bytes).
    if !readable(ctx, eth + o.encap + 20) {
        return Ok(false);
    }
    let udp_off;
    if o.v6 {
        // Version 6, UDP right behind the fixed header (no extension headers), to this node.
        let vtc: u8 = packet::read(ctx, eth)?;
        let next: u8 = packet::read(ctx, eth + 6)?;
        let dst: [u8; 16] = packet::read(ctx, eth + 24)?;
        if vtc >> 4 != 6
            || next != IPPROTO_UDP
            || cfg.local_ipv6 == [0; 16]
            || dst != cfg.local_ipv6
        {
            return Ok(false);
        }
        o.remote.v6 = packet::read(ctx, eth + 8)?;
        udp_off = eth + packet::IPV6_HLEN;
    } else {
        let outer: [u8; 20] = packet::read(ctx, eth)?;
        // Version 4 without options, UDP, not a fragment (MF clear, offset 0; DF may be
        // set), to this node.
        if outer[0] != 0x45
            || outer[9] != IPPROTO_UDP
            || outer[6] & 0x3f != 0
            || outer[7] != 0
            || cfg.local_ipv4 == [0; 4]
            || [outer[16], outer[17], outer[18], outer[19]] != cfg.local_ipv4
        {
            return Ok(false);
        }
        o.remote.v4 = [outer[12], outer[13], outer[14], outer[15]];
        udp_off = eth + 20;
    }
    let udp: [u8; 8] = packet::read(ctx, udp_off)?;
    let vxlan: [u8; 8] = packet::read(ctx, udp_off + 8)?;
    // To the tunnel port, a VNI present.
    if [udp[2], udp[3]] != cfg.vxlan_port || vxlan[0] & VXLAN_FLAG_VNI == 0 {
        return Ok(false);
    }
    o.identity = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    Ok(true)
}

/// The tunnel settings if `from_underlay` decapsulates at all.
#[inline(always)]
fn underlay_config() -> Option<TunnelConfig> {
    let cfg = *CM_TUNNEL.get(0)?;
    if cfg.flags & tunnel_flags::ENABLED == 0 || cfg.vxlan_port == [0; 2] {
        return None;
    }
    Some(cfg)
}

fn try_from_underlay(ctx: &mut TcContext) -> Result<i32, Error> {
    let counters = &CM_FROM_UL_CNT;
    let Some(cfg) = underlay_config() else {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    };
    let mut o = Outer::default();
    if !parse_outer(ctx, &cfg, &mut o)? {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    // The inner frame: IP to a pod on this node, or the VXLAN device's business.
    let inner_eth = packet::ETH_HLEN + o.encap - packet::ETH_HLEN;
    let inner_ip = inner_eth + packet::ETH_HLEN;
    let inner_type: [u8; 2] = packet::read(ctx, inner_eth + 12)?;
    if inner_type == packet::ETH_P_IPV6.to_be_bytes() {
        return Ok(to_v6(ctx, counters, program::V6_FROM_UNDERLAY));
    }
    if inner_type != packet::ETH_P_IP.to_be_bytes() {
        return Ok(to_stack(counters, Counter::NotIp));
    }
    let inner_vihl: u8 = packet::read(ctx, inner_ip)?;
    if inner_vihl >> 4 != 4 || inner_vihl & 0x0f < 5 {
        return Ok(to_stack(counters, Counter::NotIp));
    }
    let daddr: [u8; 4] = packet::read(ctx, inner_ip + 16)?;
    let Some(ep) = CM_LOCAL_EPS.get_ptr(EndpointKey::v4(daddr)) else {
        return Ok(to_stack(counters, Counter::EndpointMiss));
    };
    // SAFETY: see `forward_from_pod`.
    let ep = unsafe { *ep };
    if !decapsulate(ctx, o.encap, o.v6, packet::ETH_P_IP)? {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    ctx.cb_mut()[0] = o.identity;
    let mut ip = Ipv4::default();
    if !packet::parse_ipv4(ctx, &mut ip)? {
        return Err(Error::Malformed);
    }
    deliver_tunnelled(ctx, counters, &mut ip, o.identity, &o.remote, &ep)
}

/// The inner-IPv6 half of `from_underlay`, tail-called by it once the outer headers passed
/// (`Packets` counted there). The outer headers are checked again: a tail call carries
/// nothing but `cb`, and they are still in front of the packet.
#[classifier]
pub fn from_underlay_v6(ctx: TcContext) -> i32 {
    match try_from_underlay_v6(ctx.skb.skb) {
        Ok(verdict) => verdict,
        Err(error) => {
            count(&CM_FROM_UL_CNT, error.counter());
            TC_ACT_SHOT
        }
    }
}

#[inline(never)]
fn try_from_underlay_v6(skb: *mut __sk_buff) -> Result<i32, Error> {
    let ctx = &mut TcContext::new(skb);
    let counters = &CM_FROM_UL_CNT;
    let Some(cfg) = underlay_config() else {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    };
    let mut o = Outer::default();
    if !parse_outer(ctx, &cfg, &mut o)? {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    let inner_ip = packet::ETH_HLEN + o.encap;
    if !readable(ctx, inner_ip + packet::IPV6_HLEN) {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    let inner_vtc: u8 = packet::read(ctx, inner_ip)?;
    if inner_vtc >> 4 != 6 {
        return Ok(to_stack(counters, Counter::NotIp));
    }
    let daddr: [u8; 16] = packet::read(ctx, inner_ip + 24)?;
    let Some(ep) = CM_LOCAL_EPS.get_ptr(EndpointKey::v6(daddr)) else {
        return Ok(to_stack(counters, Counter::EndpointMiss));
    };
    // SAFETY: see `forward_from_pod`.
    let ep = unsafe { *ep };
    if !decapsulate(ctx, o.encap, !o.v6, packet::ETH_P_IPV6)? {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    ctx.cb_mut()[0] = o.identity;
    let mut ip = Ipv6::default();
    if !packet::parse_ipv6(ctx, &mut ip)? {
        return Err(Error::Malformed);
    }
    // Decapsulated already: a chain too long to walk is delivered without ports.
    let _ = count_ext(counters, &ip);
    deliver_tunnelled(ctx, counters, &mut ip, o.identity, &o.remote, &ep)
}

/// Removes the outer IP header, UDP, VXLAN and the inner Ethernet header (`encap` bytes)
/// behind the outer MAC header. `cross`: the inner packet (`inner`, an ethertype) is of the
/// other family than the outer header, so `skb->protocol` (`BPF_F_ADJ_ROOM_DECAP_L3_*`,
/// kernel ≥ 6.3) and the Ethernet type must change with it. `Ok(false)`: the kernel refused
/// a cross-family decapsulation before touching the packet (an older kernel): the VXLAN
/// device takes it.
///
/// FIXED_GSO: a GSO packet's gso_size is the inner TCP MSS, which decapsulation does not
/// change (without the flag the kernel would grow it by the bytes removed). The tunnel GSO
/// type bits stay set; harmless for a packet delivered to a local socket, which is the only
/// place this one goes.
#[inline(always)]
fn decapsulate(ctx: &TcContext, encap: usize, cross: bool, inner: u16) -> Result<bool, Error> {
    use aya_ebpf::bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
    };
    let mut flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    if cross {
        flags |= u64::from(if inner == packet::ETH_P_IP {
            BPF_F_ADJ_ROOM_DECAP_L3_IPV4
        } else {
            BPF_F_ADJ_ROOM_DECAP_L3_IPV6
        });
    }
    if ctx
        .adjust_room(-(encap as i32), BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return if cross { Ok(false) } else { Err(Error::Helper) };
    }
    if cross {
        packet::set_ethertype(ctx, inner)?;
    }
    Ok(true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: nothing in these programs can panic (the verifier would reject the
    // loop otherwise); required by no_std.
    loop {}
}

/// GPL-compatible, as the kernel requires for some helpers (aya-template's choice).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
