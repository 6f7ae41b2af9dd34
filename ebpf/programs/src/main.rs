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
//! IPv4 only for now: IPv6 and every non-IP frame (ARP) go to the kernel stack.
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

mod lb;
mod packet;
mod policy;

use aya_ebpf::bindings::bpf_tunnel_key;
use aya_ebpf::helpers::{
    bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray};
use aya_ebpf::programs::TcContext;
use clustermesh_ebpf_abi::{
    defaults, ipcache_flags, tunnel_flags, Counter, EndpointInfo, EndpointKey, IpcacheKey,
    IpcacheValue, TraceSlot, TunnelConfig, TunnelTrace, IPPROTO_UDP, MAX_VNI_IDENTITY,
};

use crate::packet::{Error, Ipv4};

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
fn trace(slot: TraceSlot, remote_ipv4: [u8; 4], vni: u32, ifindex: u32) {
    if let Some(t) = CM_TUNNEL_TRACE.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU array slot from a successful lookup (see `count`).
        unsafe {
            (*t).remote_ipv4 = remote_ipv4;
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
    if !packet::parse_ipv4(ctx, &mut ip)? {
        return Ok(to_stack(counters, Counter::NotIpv4));
    }
    // Service VIP → backend (DNAT); everything below forwards the translated packet.
    if !lb::egress(ctx, &mut ip)? {
        return Ok(TC_ACT_SHOT);
    }

    // Policy and flow events (policy.rs): egress of the source pod, ingress of a local
    // destination.
    if policy::denied_from_pod(ctx, &ip) {
        return Ok(TC_ACT_SHOT);
    }

    // A pod on this node: deliver directly (hash lookup, cheaper than the trie).
    if let Some(ep) = CM_LOCAL_EPS.get_ptr(EndpointKey::v4(ip.daddr)) {
        // SAFETY: pointer from a successful lookup; the map is NO_PREALLOC, so an element
        // stays valid (RCU) for the duration of the program even if it is replaced.
        let ep = unsafe { *ep };
        // A reply from a service backend on this node: source back to the VIP.
        lb::reverse(ctx, &mut ip)?;
        let verdict = deliver_local(ctx, &ep)?;
        count(counters, Counter::DeliveredLocal);
        return Ok(verdict);
    }

    let key = Key::new(IpcacheKey::prefixlen(32), IpcacheKey::v4(ip.daddr));
    let Some(entry) = CM_IPCACHE.get(&key) else {
        return Ok(to_stack(counters, Counter::IpcacheMiss));
    };
    let entry = *entry;
    tunnel(ctx, &ip, &entry)
}

/// Sends the packet to the node named by the ipcache entry, with the source pod's identity
/// in the VNI, or hands it to the stack when there is no usable tunnel.
#[inline(always)]
fn tunnel(ctx: &TcContext, ip: &Ipv4, entry: &IpcacheValue) -> Result<i32, Error> {
    let counters = &CM_FROM_POD_CNT;
    let flags = entry.flags;
    if flags & ipcache_flags::HAS_TUNNEL == 0
        || flags & (ipcache_flags::SKIP_TUNNEL | ipcache_flags::IPV6_TUNNEL) != 0
    {
        return Ok(to_stack(counters, Counter::NoTunnel));
    }
    let remote = [
        entry.tunnel_endpoint[0],
        entry.tunnel_endpoint[1],
        entry.tunnel_endpoint[2],
        entry.tunnel_endpoint[3],
    ];
    if remote == [0; 4] {
        return Ok(to_stack(counters, Counter::NoTunnel));
    }
    let Some(cfg) = CM_TUNNEL.get(0) else {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    };
    let cfg = *cfg;
    if cfg.flags & tunnel_flags::ENABLED == 0 || cfg.vxlan_ifindex == 0 {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    }
    if remote == cfg.local_ipv4 {
        // A pod of this node that is not (yet) a local endpoint.
        return Ok(to_stack(counters, Counter::NoTunnel));
    }
    let Some(src) = CM_LOCAL_EPS.get_ptr(EndpointKey::v4(ip.saddr)) else {
        return Ok(to_stack(counters, Counter::SourceUnknown));
    };
    // SAFETY: see `try_from_pod`.
    let identity = unsafe { (*src).identity };
    if identity > MAX_VNI_IDENTITY {
        return Ok(to_stack(counters, Counter::IdentityTooLarge));
    }

    // SAFETY: bpf_tunnel_key is plain integers and unions of integers; all zero is valid.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = identity;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: `key` is a live, initialised bpf_tunnel_key and the size passed is its size.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
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
    trace(TraceSlot::Egress, remote, identity, cfg.vxlan_ifindex);
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

    // SAFETY: bpf_tunnel_key is plain integers and unions of integers; all zero is valid.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` is writable and the size passed is its size.
    let ret = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    let (identity, remote) = if ret == 0 {
        // SAFETY: the helper filled the IPv4 member (flags 0 = IPv4 tunnel).
        let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 };
        (key.tunnel_id, remote.to_be_bytes())
    } else {
        // Only happens without collect_md metadata (BPF_PROG_TEST_RUN, a device not in
        // external mode): identity 0 = unknown, which policy will treat as untrusted.
        count(counters, Counter::NoTunnelKey);
        (0, [0; 4])
    };
    // The source identity for the policy step, which runs here (or in a tail call) before
    // the redirect: skb->cb is ours until then; the mark would leak into the node's stack on
    // the pass path and is cleared anyway when the packet crosses into the pod's namespace.
    ctx.cb_mut()[0] = identity;

    let mut ip = Ipv4::default();
    if !packet::parse_ipv4(ctx, &mut ip)? {
        return Ok(to_stack(counters, Counter::NotIpv4));
    }
    let Some(ep) = CM_LOCAL_EPS.get_ptr(EndpointKey::v4(ip.daddr)) else {
        return Ok(to_stack(counters, Counter::EndpointMiss));
    };
    // SAFETY: see `try_from_pod`.
    let ep = unsafe { *ep };
    deliver_tunnelled(ctx, counters, &mut ip, identity, remote, &ep)
}

/// The receive side shared by `from_overlay` and `from_underlay`, for an inner IPv4 packet
/// (behind an Ethernet header) to the local pod `ep` from `identity` at node `remote`:
/// ingress policy and flow event, reverse NAT of a service reply, delivery into the pod.
#[inline(always)]
fn deliver_tunnelled(
    ctx: &TcContext,
    counters: &PerCpuArray<u64>,
    ip: &mut Ipv4,
    identity: u32,
    remote: [u8; 4],
    ep: &EndpointInfo,
) -> Result<i32, Error> {
    // Ingress policy with the source identity from the VNI, and the flow event (policy.rs).
    if policy::denied_from_overlay(ctx, ip, identity, ep) {
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
/// removes, leaving the outer Ethernet header in front of the inner IPv4 packet.
const VXLAN_ENCAP_LEN: usize = 20 + 8 + 8 + packet::ETH_HLEN;
/// From the start of the frame to the end of the inner IPv4 header (without options).
const VXLAN_HEADERS_LEN: usize = packet::ETH_HLEN + VXLAN_ENCAP_LEN + 20;
/// VXLAN flags byte with only the "valid VNI" bit (RFC 7348).
const VXLAN_FLAG_VNI: u8 = 0x08;

/// TCX ingress of the node's underlay device: a VXLAN datagram to this node's tunnel port
/// whose inner destination is a pod on this node is decapsulated here and delivered like
/// `from_overlay` does, with the source identity from the VNI. The VXLAN device never sees
/// it, so the kernel allocates no metadata dst for it (`udp_tun_rx_dst`, freed through RCU:
/// the biggest cost the collect_md receive path adds; docs/datapath-throughput.md).
///
/// Everything else — the node's own traffic, VXLAN for addresses that are not local pods,
/// anything odd (IPv4 options, fragments, a short datagram) — goes on unchanged: this
/// program never drops what it does not decapsulate, and the VXLAN device with
/// `from_overlay` stays the path for whatever is left.
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

fn try_from_underlay(ctx: &mut TcContext) -> Result<i32, Error> {
    let counters = &CM_FROM_UL_CNT;
    let Some(cfg) = CM_TUNNEL.get(0) else {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    };
    let cfg = *cfg;
    if cfg.flags & tunnel_flags::ENABLED == 0 || cfg.vxlan_port == [0; 2] {
        return Ok(to_stack(counters, Counter::TunnelUnconfigured));
    }
    // Outer headers, read only where present: nothing here may turn the node's own traffic
    // into a drop.
    let eth = packet::ETH_HLEN;
    if ctx.len() < VXLAN_HEADERS_LEN as u32
        || packet::read::<[u8; 2]>(ctx, 12).ok() != Some(packet::ETH_P_IP.to_be_bytes())
    {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    if packet::ensure(ctx, VXLAN_HEADERS_LEN).is_err() {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    let outer: [u8; 20] = packet::read(ctx, eth)?;
    let udp: [u8; 8] = packet::read(ctx, eth + 20)?;
    let vxlan: [u8; 8] = packet::read(ctx, eth + 28)?;
    // Version 4 without options, UDP, not a fragment (MF clear, offset 0; DF may be set),
    // to this node, to the tunnel port, a VNI present.
    if outer[0] != 0x45
        || outer[9] != IPPROTO_UDP
        || outer[6] & 0x3f != 0
        || outer[7] != 0
        || [outer[16], outer[17], outer[18], outer[19]] != cfg.local_ipv4
        || [udp[2], udp[3]] != cfg.vxlan_port
        || vxlan[0] & VXLAN_FLAG_VNI == 0
    {
        return Ok(to_stack(counters, Counter::NotTunnelled));
    }
    let remote = [outer[12], outer[13], outer[14], outer[15]];
    let identity = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    // The inner frame: IPv4 to a pod on this node, or the VXLAN device's business.
    let inner_eth = eth + VXLAN_ENCAP_LEN - packet::ETH_HLEN;
    let inner_type: [u8; 2] = packet::read(ctx, inner_eth + 12)?;
    let inner_vihl: u8 = packet::read(ctx, inner_eth + packet::ETH_HLEN)?;
    if inner_type != packet::ETH_P_IP.to_be_bytes() || inner_vihl >> 4 != 4 || inner_vihl & 0x0f < 5
    {
        return Ok(to_stack(counters, Counter::NotIpv4));
    }
    let daddr: [u8; 4] = packet::read(ctx, inner_eth + packet::ETH_HLEN + 16)?;
    let Some(ep) = CM_LOCAL_EPS.get_ptr(EndpointKey::v4(daddr)) else {
        return Ok(to_stack(counters, Counter::EndpointMiss));
    };
    // SAFETY: see `try_from_pod`.
    let ep = unsafe { *ep };

    // Remove outer IPv4, UDP, VXLAN and the inner Ethernet header behind the outer MAC
    // header. FIXED_GSO: a GSO packet's gso_size is the inner TCP MSS, which decapsulation
    // does not change (without the flag the kernel would grow it by the bytes removed).
    // The tunnel GSO type bits stay set; harmless for a packet delivered to a local socket,
    // which is the only place this one goes.
    ctx.adjust_room(
        -(VXLAN_ENCAP_LEN as i32),
        aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        u64::from(aya_ebpf::bindings::BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Error::Helper)?;
    ctx.cb_mut()[0] = identity;
    let mut ip = Ipv4::default();
    if !packet::parse_ipv4(ctx, &mut ip)? {
        return Err(Error::Malformed);
    }
    deliver_tunnelled(ctx, counters, &mut ip, identity, remote, &ep)
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
