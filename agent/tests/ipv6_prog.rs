//! BPF_PROG_TEST_RUN tests of the IPv6 halves of the programs (`from_pod_v6`,
//! `from_overlay_v6`, `from_underlay_v6`, tail-called through `CM_V6_PROGS`) on crafted
//! packets: local delivery, ipcache lookup with Cilium's IPv6 key and VXLAN encapsulation
//! with the source identity in the VNI over an IPv4 or an IPv6 underlay, VXLAN
//! decapsulation of every inner/outer family combination, extension headers, malformed and
//! truncated headers. Maps are written directly (the control plane does not program IPv6
//! yet). Needs root (CI runs as root).

use std::net::{Ipv4Addr, Ipv6Addr};

use clustermesh_agent::datapath::{Datapath, Program};
use clustermesh_ebpf_abi::{Counter, EndpointInfo, IpcacheValue, TraceSlot};

mod prog_common;
use prog_common::*;

const POD_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x10);
const POD_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x11);
const REMOTE_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 2, 1, 0, 0, 0, 0x10);
/// A pod of a cluster whose nodes have only IPv6 underlay addresses.
const REMOTE_POD_V6_NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 3, 1, 0, 0, 0, 0x10);
const LOCAL_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const REMOTE_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_DEST: u8 = 60;
const IPPROTO_ICMPV6: u8 = 58;

/// A dual-stack node: pods A and B local, a remote pod behind REMOTE_NODE (IPv4
/// underlay) and one behind REMOTE_NODE6 (IPv6 underlay).
fn node() -> Datapath {
    let mut dp = load(1024, 64);
    let m = &mut dp.maps;
    m.local_endpoints
        .upsert_v6(POD_A, pod_a())
        .expect("upsert A");
    m.local_endpoints
        .upsert_v6(
            POD_B,
            EndpointInfo {
                ifindex: 42,
                identity: 65_538,
                flags: 0,
                pod_mac: POD_B_MAC,
                host_mac: HOST_B_MAC,
            },
        )
        .expect("upsert B");
    m.ipcache
        .upsert_v6(
            REMOTE_POD,
            128,
            IpcacheValue::tunnel_v4(REMOTE_POD_IDENTITY, REMOTE_NODE.octets()),
        )
        .expect("upsert remote");
    m.ipcache
        .upsert_v6(
            REMOTE_POD_V6_NODE,
            128,
            IpcacheValue::tunnel_v6(REMOTE_POD_IDENTITY, REMOTE_NODE6.octets()),
        )
        .expect("upsert remote over v6");
    m.tunnel
        .set_dual(
            VXLAN_IFINDEX,
            Some(LOCAL_NODE),
            Some(LOCAL_NODE6),
            VXLAN_PORT,
        )
        .expect("tunnel settings");
    dp
}

/// Ethernet + IPv6 + `ext` (extension headers, already chained: the fixed header's next
/// header is `first`) + an ICMPv6 echo request.
fn ipv6_packet_ext(src: Ipv6Addr, dst: Ipv6Addr, first: u8, ext: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(62 + ext.len());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0xa0, 0x02]); // dst: host-side veth of A
    p.extend_from_slice(&[0x02, 0, 0, 0, 0xa0, 0x01]); // src: pod A
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    let payload = (ext.len() + 8) as u16;
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&payload.to_be_bytes());
    p.extend_from_slice(&[first, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(ext);
    p.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]); // ICMPv6 echo request, csum 0
    p
}

fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    ipv6_packet_ext(src, dst, IPPROTO_ICMPV6, &[])
}

/// An 8-byte extension header (hop-by-hop or destination options with one PadN option).
fn ext8(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

/// Outer Ethernet + IPv4 or IPv6 (`v6`) + UDP + VXLAN (VNI `vni`) around `inner`, from the
/// remote node to this node's tunnel port.
fn vxlan(v6: bool, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0x0d, 0x01, 0x02, 0, 0, 0, 0x0d, 0xfe]);
    let udp_len = (16 + inner.len()) as u16;
    if v6 {
        p.extend_from_slice(&0x86ddu16.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&udp_len.to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&REMOTE_NODE6.octets());
        p.extend_from_slice(&LOCAL_NODE6.octets());
    } else {
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&(20 + udp_len).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&REMOTE_NODE.octets());
        p.extend_from_slice(&LOCAL_NODE.octets());
    }
    p.extend_from_slice(&51_234u16.to_be_bytes());
    p.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    let vni = vni.to_be_bytes();
    p.extend_from_slice(&[0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
    p.extend_from_slice(inner);
    p
}

#[test]
fn from_pod_delivers_ipv6_to_a_local_pod_with_its_macs() {
    let mut dp = node();
    let packet = ipv6_packet(POD_A, POD_B);
    let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[0..6], POD_B_MAC, "destination MAC = pod B");
    assert_eq!(out[6..12], HOST_B_MAC, "source MAC = pod B's gateway");
    assert_eq!(out[12..], packet[12..], "L3 untouched");
    assert_counters(
        &dp,
        Program::FromPod,
        &[(Counter::Packets, 1), (Counter::DeliveredLocal, 1)],
    );
}

#[test]
fn from_pod_tunnels_ipv6_over_an_ipv4_underlay_with_the_source_identity_as_vni() {
    let mut dp = node();
    let packet = ipv6_packet(POD_A, REMOTE_POD);
    let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet, "the inner frame is sent as is");
    assert_counters(
        &dp,
        Program::FromPod,
        &[(Counter::Packets, 1), (Counter::Tunnelled, 1)],
    );
    let t = dp.maps.traces.read(TraceSlot::Egress).expect("traces");
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].remote_ipv4, REMOTE_NODE.octets());
    assert_eq!(t[0].remote_ipv6, [0; 16]);
    assert_eq!((t[0].vni, t[0].ifindex), (POD_A_IDENTITY, VXLAN_IFINDEX));
}

#[test]
fn from_pod_tunnels_over_an_ipv6_underlay_with_tuninfo_ipv6() {
    // IPv6 pod traffic, and IPv4 pod traffic, to nodes known only by IPv6 addresses: the
    // tunnel key is set with BPF_F_TUNINFO_IPV6 (the helper refuses an IPv6 remote
    // without it, which would show as drop_helper).
    let mut dp = node();
    dp.maps
        .local_endpoints
        .upsert_v4(Ipv4Addr::new(10, 1, 1, 10), pod_a())
        .expect("A's IPv4");
    dp.maps
        .ipcache
        .upsert_v4(
            Ipv4Addr::new(10, 3, 1, 10),
            32,
            IpcacheValue::tunnel_v6(REMOTE_POD_IDENTITY, REMOTE_NODE6.octets()),
        )
        .expect("IPv4 pod behind an IPv6 node");
    for packet in [
        ipv6_packet(POD_A, REMOTE_POD_V6_NODE),
        ipv4_packet(Ipv4Addr::new(10, 1, 1, 10), Ipv4Addr::new(10, 3, 1, 10)),
    ] {
        let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{packet:02x?}");
        assert_eq!(out, packet);
        // Both packets go to the same node with the same VNI: every CPU's slot agrees.
        let t = dp.maps.traces.read(TraceSlot::Egress).expect("traces");
        assert!(!t.is_empty());
        assert!(
            t.iter()
                .all(|t| Ipv6Addr::from(t.remote_ipv6) == REMOTE_NODE6
                    && t.remote_ipv4 == [0; 4]
                    && t.vni == POD_A_IDENTITY),
            "{t:?}"
        );
    }
    assert_counters(
        &dp,
        Program::FromPod,
        &[(Counter::Packets, 2), (Counter::Tunnelled, 2)],
    );
}

#[test]
fn from_pod_matches_ipv6_ipcache_prefixes_longest_first_and_passes_misses() {
    let mut dp = node();
    let other = Ipv4Addr::new(198, 18, 1, 9);
    let net = |last: u16| Ipv6Addr::new(0xfd00, 0x10, 7, 0, 0, 0, 0, last);
    dp.maps
        .ipcache
        .upsert_v6(net(0), 48, IpcacheValue::tunnel_v4(2, REMOTE_NODE.octets()))
        .expect("/48");
    dp.maps
        .ipcache
        .upsert_v6(
            Ipv6Addr::new(0xfd00, 0x10, 7, 5, 0, 0, 0, 0),
            64,
            IpcacheValue::tunnel_v4(2, other.octets()),
        )
        .expect("/64");
    for (dst, node) in [
        (net(9), REMOTE_NODE),
        (Ipv6Addr::new(0xfd00, 0x10, 7, 5, 0, 0, 0, 9), other),
    ] {
        let (verdict, _) = run(&mut dp, Program::FromPod, &ipv6_packet(POD_A, dst));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{dst}");
        let t = dp.maps.traces.read(TraceSlot::Egress).expect("traces");
        assert!(
            t.iter().any(|t| t.remote_ipv4 == node.octets()),
            "{dst}: {t:?}"
        );
    }
    // An IPv4-mapped look-alike must not match an IPv4 entry, nor a miss anything.
    let (verdict, out) = run(
        &mut dp,
        Program::FromPod,
        &ipv6_packet(POD_A, "2001:db8::1".parse().expect("addr")),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        ipv6_packet(POD_A, "2001:db8::1".parse().expect("addr"))
    );
    assert_eq!(counters(&dp, Program::FromPod).get(Counter::IpcacheMiss), 1);
}

#[test]
fn extension_headers_are_walked_and_counted_and_the_packet_is_delivered_unchanged() {
    let mut dp = node();
    // hop-by-hop → destination options → ICMPv6.
    let mut ext = ext8(NEXTHDR_DEST).to_vec();
    ext.extend_from_slice(&ext8(IPPROTO_ICMPV6));
    let packet = ipv6_packet_ext(POD_A, POD_B, NEXTHDR_HOP, &ext);
    let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[12..], packet[12..], "headers and payload unchanged");
    assert_counters(
        &dp,
        Program::FromPod,
        &[
            (Counter::Packets, 1),
            (Counter::DeliveredLocal, 1),
            (Counter::Ipv6ExtHeaders, 1),
        ],
    );
}

#[test]
fn a_chain_longer_than_the_walk_goes_to_the_stack_unchanged() {
    let mut dp = node();
    let n = clustermesh_ebpf_abi::IPV6_MAX_EXT_HEADERS + 1;
    let mut ext = Vec::new();
    for i in 0..n {
        ext.extend_from_slice(&ext8(if i + 1 == n {
            IPPROTO_ICMPV6
        } else {
            NEXTHDR_DEST
        }));
    }
    let packet = ipv6_packet_ext(POD_A, POD_B, NEXTHDR_DEST, &ext);
    let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, packet, "passed to the stack unmodified");
    assert_counters(
        &dp,
        Program::FromPod,
        &[
            (Counter::Packets, 1),
            (Counter::ToStack, 1),
            (Counter::Ipv6ExtHeaders, 1),
            (Counter::Ipv6ExtUnparsed, 1),
        ],
    );
}

#[test]
fn malformed_and_truncated_ipv6_is_dropped_and_counted_never_read_past_the_end() {
    let good = ipv6_packet(POD_A, POD_B);
    let mut version4 = good.clone();
    version4[14] = 0x40;
    // A hop-by-hop header that announces 8 × (1 + 4) bytes in a frame that ends after 8.
    let mut long_ext = ipv6_packet_ext(POD_A, POD_B, NEXTHDR_HOP, &ext8(IPPROTO_ICMPV6));
    long_ext[54 + 1] = 4;
    // An extension header cut after 4 of its 8 bytes.
    let mut cut = ipv6_packet_ext(POD_A, POD_B, NEXTHDR_HOP, &[]);
    cut.truncate(54);
    cut.extend_from_slice(&[IPPROTO_ICMPV6, 0, 1, 4]);
    let cases = [
        (
            "version 4 behind an IPv6 ethertype",
            version4,
            Counter::DropMalformed,
        ),
        (
            "extension header longer than the frame",
            long_ext,
            Counter::DropTruncated,
        ),
        ("extension header cut short", cut, Counter::DropTruncated),
    ];
    // One load for all cases (a load is the slow part): counters as deltas.
    let mut dp = node();
    for program in [Program::FromPod, Program::FromOverlay] {
        for (what, packet, reason) in &cases {
            let before = counters(&dp, program);
            let (verdict, out) = run(&mut dp, program, packet);
            assert_eq!(verdict, TC_ACT_SHOT, "{program:?}: {what}");
            assert_eq!(&out, packet, "{program:?}: {what}: not modified");
            let c = counters(&dp, program).since(&before);
            assert_eq!(c.get(*reason), 1, "{program:?}: {what}: {:?}", c.non_zero());
            assert_eq!(
                c.get(Counter::DeliveredLocal) + c.get(Counter::Tunnelled),
                0
            );
        }
    }
}

#[test]
fn a_frame_shorter_than_the_ipv6_header_never_reaches_the_programs() {
    // The kernel's harness, like a real device's receive path, refuses an IPv6 frame that
    // cannot hold the 40-byte fixed header (EINVAL): truncation inside the fixed header
    // cannot be fed to a program, so the suite shows the bounds checks with extension
    // headers instead (above). The programs still check the length (`parse_ipv6`).
    let good = ipv6_packet(POD_A, POD_B);
    let mut dp = node();
    for len in [14 + 1, 14 + 20, 14 + 39] {
        for program in [
            Program::FromPod,
            Program::FromOverlay,
            Program::FromUnderlay,
        ] {
            let r = dp.test_run(program, &good[..len], None, 1);
            assert!(r.is_err(), "{program:?} with {len} bytes: {r:?}");
        }
    }
    let r = dp.test_run(Program::FromPod, &good[..54], None, 1);
    assert!(r.is_ok(), "a whole fixed header is accepted: {r:?}");
}

#[test]
fn from_overlay_delivers_ipv6_to_the_local_pod() {
    let mut dp = node();
    let packet = ipv6_packet(REMOTE_POD, POD_B);
    let (verdict, out) = run(&mut dp, Program::FromOverlay, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[0..6], POD_B_MAC);
    assert_eq!(out[6..12], HOST_B_MAC);
    assert_eq!(out[12..], packet[12..]);
    assert_counters(
        &dp,
        Program::FromOverlay,
        &[
            (Counter::Packets, 1),
            (Counter::DeliveredLocal, 1),
            (Counter::NoTunnelKey, 1),
        ],
    );
    // A pod that is not here: to the stack.
    let (verdict, _) = run(
        &mut dp,
        Program::FromOverlay,
        &ipv6_packet(REMOTE_POD, REMOTE_POD_V6_NODE),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        counters(&dp, Program::FromOverlay).get(Counter::EndpointMiss),
        1
    );
}

#[test]
fn from_underlay_decapsulates_every_family_combination_with_the_vni_as_identity() {
    let v4_pod = Ipv4Addr::new(10, 1, 1, 11);
    let cases = [
        ("IPv6 in IPv6", true, ipv6_packet(REMOTE_POD, POD_B)),
        ("IPv6 in IPv4", false, ipv6_packet(REMOTE_POD, POD_B)),
        (
            "IPv4 in IPv6",
            true,
            ipv4_packet(Ipv4Addr::new(10, 2, 1, 10), v4_pod),
        ),
    ];
    let mut dp = node();
    for (what, outer_v6, inner) in cases {
        dp.maps
            .local_endpoints
            .upsert_v4(
                v4_pod,
                EndpointInfo {
                    ifindex: 42,
                    identity: 65_538,
                    flags: 0,
                    pod_mac: POD_B_MAC,
                    host_mac: HOST_B_MAC,
                },
            )
            .expect("B's IPv4");
        let frame = vxlan(outer_v6, REMOTE_POD_IDENTITY, &inner);
        let before = counters(&dp, Program::FromUnderlay);
        let (verdict, out) = run(&mut dp, Program::FromUnderlay, &frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{what}");
        assert_eq!(
            out.len(),
            inner.len(),
            "{what}: outer headers removed: {out:02x?}"
        );
        assert_eq!(out[0..6], POD_B_MAC, "{what}");
        assert_eq!(out[6..12], HOST_B_MAC, "{what}");
        assert_eq!(
            out[12..],
            inner[12..],
            "{what}: ethertype of the inner packet, packet untouched"
        );
        assert_eq!(
            counters(&dp, Program::FromUnderlay)
                .since(&before)
                .non_zero(),
            vec![("packets", 1), ("delivered_local", 1)],
            "{what}"
        );
        // The slot of the CPU that ran this case holds it (earlier cases may have run on
        // another CPU): identity from the VNI, the outer source as the remote node.
        let t = dp.maps.traces.read(TraceSlot::Ingress).expect("traces");
        assert!(
            t.iter()
                .any(|t| (t.vni, t.ifindex) == (REMOTE_POD_IDENTITY, 42)
                    && if outer_v6 {
                        Ipv6Addr::from(t.remote_ipv6) == REMOTE_NODE6 && t.remote_ipv4 == [0; 4]
                    } else {
                        Ipv4Addr::from(t.remote_ipv4) == REMOTE_NODE && t.remote_ipv6 == [0; 16]
                    }),
            "{what}: {t:?}"
        );
    }
}

#[test]
fn from_underlay_passes_other_ipv6_traffic_on_unchanged() {
    let good = vxlan(true, REMOTE_POD_IDENTITY, &ipv6_packet(REMOTE_POD, POD_B));
    let mut other_node = good.clone();
    other_node[38..54].copy_from_slice(&REMOTE_NODE6.octets());
    let mut ext_outer = good.clone();
    ext_outer[20] = NEXTHDR_HOP; // an extension header where UDP should be
    let mut tcp_outer = good.clone();
    tcp_outer[20] = 6;
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "the node's own IPv6 traffic",
            ipv6_packet(REMOTE_POD, REMOTE_POD_V6_NODE),
            Counter::NotTunnelled,
        ),
        (
            "VXLAN over IPv6 for another node",
            other_node,
            Counter::NotTunnelled,
        ),
        (
            "an outer extension header",
            ext_outer,
            Counter::NotTunnelled,
        ),
        ("outer TCP", tcp_outer, Counter::NotTunnelled),
        (
            "cut inside the inner IPv6 header",
            good[..good.len() - 30].to_vec(),
            Counter::NotTunnelled,
        ),
        (
            "an inner IPv6 frame for a pod not on this node",
            vxlan(true, 5, &ipv6_packet(REMOTE_POD, REMOTE_POD_V6_NODE)),
            Counter::EndpointMiss,
        ),
    ];
    let mut dp = node();
    for (what, packet, reason) in cases {
        let before = counters(&dp, Program::FromUnderlay);
        let (verdict, out) = run(&mut dp, Program::FromUnderlay, &packet);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(out, packet, "{what}: must reach the stack unmodified");
        let want: Vec<_> = [(Counter::Packets, 1), (Counter::ToStack, 1), (reason, 1)]
            .iter()
            .map(|(c, v)| (c.name(), *v))
            .collect();
        let got = counters(&dp, Program::FromUnderlay).since(&before);
        assert_eq!(got.non_zero(), want, "{what}");
    }
}

#[test]
fn per_packet_cost_ipv6() {
    // Not an assertion on speed: prints the kernel's mean per run beside the IPv4 case,
    // so the tail call's cost is visible in every test log. Benchmarks: bench-maps.
    let mut dp = node();
    let v4a = Ipv4Addr::new(10, 1, 1, 10);
    let v4b = Ipv4Addr::new(10, 1, 1, 11);
    for (a, ifindex) in [(v4a, 41), (v4b, 42)] {
        dp.maps
            .local_endpoints
            .upsert_v4(
                a,
                EndpointInfo {
                    ifindex,
                    identity: 65_537,
                    flags: 0,
                    pod_mac: POD_B_MAC,
                    host_mac: HOST_B_MAC,
                },
            )
            .expect("v4 endpoint");
    }
    let cases = [
        ("from_pod local IPv4", ipv4_packet(v4a, v4b)),
        ("from_pod local IPv6", ipv6_packet(POD_A, POD_B)),
        ("from_pod tunnel IPv6/IPv4", ipv6_packet(POD_A, REMOTE_POD)),
        (
            "from_pod tunnel IPv6/IPv6",
            ipv6_packet(POD_A, REMOTE_POD_V6_NODE),
        ),
    ];
    for (what, packet) in cases {
        let r = dp
            .test_run(Program::FromPod, &packet, None, 100_000)
            .expect("test run");
        println!(
            "{what}: {} ns/packet (verdict {})",
            r.duration.as_nanos(),
            r.verdict
        );
    }
}

// ---- Policy and flow events on IPv6 ----

mod policy {
    use super::*;
    use clustermesh_agent::flows::FlowMaps;
    use clustermesh_agent::policy::maps::PolicyMaps;
    use clustermesh_agent::policy::{Config as PolicyConfig, Direction, Engine};
    use clustermesh_ebpf_abi::{drop_reason, family, verdict, FlowEvent, PolicyMatch};
    use clustermesh_types::identity::LabelArray;

    const ID_A: u32 = 2001;
    const ID_B: u32 = 2002;

    fn labels(app: &str) -> LabelArray {
        LabelArray::parse_kvstore(&format!(
            "k8s:app={app};k8s:io.cilium.k8s.policy.cluster=c2;k8s:io.kubernetes.pod.namespace=default;"
        ))
        .expect("labels")
    }

    pub(super) struct Node {
        pub dp: Datapath,
        policy: PolicyMaps,
        flows: FlowMaps,
        engine: Engine,
    }

    pub(super) fn node() -> Node {
        let mut dp = super::node();
        for (ip, ifindex, id) in [(POD_A, 41, ID_A), (POD_B, 42, ID_B)] {
            dp.maps
                .local_endpoints
                .upsert_v6(
                    ip,
                    EndpointInfo {
                        ifindex,
                        identity: id,
                        flags: 0,
                        pod_mac: POD_B_MAC,
                        host_mac: HOST_B_MAC,
                    },
                )
                .expect("endpoint");
        }
        let policy = PolicyMaps::take(&mut dp).expect("policy maps");
        let flows = FlowMaps::take(&mut dp).expect("flow maps");
        let mut engine = Engine::new(PolicyConfig {
            local_cluster: "c2".into(),
            default_local_cluster: true,
        });
        engine.on_identity("c2", ID_A, Some(&labels("frontend")));
        engine.on_identity("c2", ID_B, Some(&labels("backend")));
        Node {
            dp,
            policy,
            flows,
            engine,
        }
    }

    impl Node {
        pub fn policy(&mut self, json: &str) {
            self.engine
                .on_policy_json("p", "CiliumNetworkPolicy", Some(json.as_bytes()))
                .expect("policy");
            let c = self.engine.take_changes();
            self.policy.apply(&c).expect("apply");
        }

        pub fn run(&mut self, program: Program, packet: &[u8]) -> u32 {
            run(&mut self.dp, program, packet).0
        }

        pub fn events(&mut self) -> Vec<FlowEvent> {
            let mut v = Vec::new();
            self.flows.drain(|e| v.push(*e));
            v
        }
    }

    /// Ethernet + IPv6 + TCP SYN.
    pub(super) fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = ipv6_packet_ext(src, dst, 6, &[]);
        p.truncate(54);
        p[18..20].copy_from_slice(&20u16.to_be_bytes());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        p
    }

    fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8) -> Vec<u8> {
        let mut p = ipv6_packet(src, dst);
        p[54] = ty;
        p
    }

    const BACKEND_FROM_FRONTEND_8080: &str = r#"{"kind":"CiliumNetworkPolicy",
     "metadata":{"name":"p","namespace":"default"},
     "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
      "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend"}}],
                  "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

    #[test]
    fn l3_l4_policy_on_ipv6_with_neighbour_discovery_always_allowed_and_ipv6_flows() {
        let mut n = node();
        n.policy(BACKEND_FROM_FRONTEND_8080);
        let allowed = tcp6(POD_A, POD_B, 40000, 8080);
        assert_eq!(n.run(Program::FromPod, &allowed), TC_ACT_REDIRECT);
        assert_eq!(
            n.run(Program::FromPod, &tcp6(POD_A, POD_B, 40000, 9090)),
            TC_ACT_SHOT,
            "port not allowed"
        );
        assert_eq!(
            n.run(Program::FromPod, &icmp6(POD_A, POD_B, 128)),
            TC_ACT_SHOT,
            "echo request is subject to policy"
        );
        // Neighbour discovery (RS, RA, NS, NA, redirect) is never subject to policy.
        for ty in 133..=137u8 {
            assert_eq!(
                n.run(Program::FromPod, &icmp6(POD_A, POD_B, ty)),
                TC_ACT_REDIRECT,
                "ICMPv6 type {ty}"
            );
        }
        // The same L4 rule applies to traffic arriving over the tunnel (identity 0 under
        // test run: not the frontend, so denied).
        assert_eq!(
            n.run(Program::FromOverlay, &tcp6(REMOTE_POD, POD_B, 1, 8080)),
            TC_ACT_SHOT
        );

        let ev = n.events();
        let first = ev.first().expect("events");
        assert_eq!(first.family, family::IPV6);
        assert_eq!(Ipv6Addr::from(first.saddr), POD_A);
        assert_eq!(Ipv6Addr::from(first.daddr), POD_B);
        assert_eq!(
            (u16::from_be(first.sport), u16::from_be(first.dport)),
            (40000, 8080)
        );
        assert_eq!(first.verdict, verdict::FORWARDED);
        let drops: Vec<_> = ev
            .iter()
            .filter(|e| e.verdict == verdict::DROPPED)
            .collect();
        assert_eq!(drops.len(), 3, "{drops:?}");
        assert!(drops
            .iter()
            .all(|e| e.drop_reason == drop_reason::POLICY_DENIED));
        assert!(drops.iter().all(|e| e.family == family::IPV6));
        assert_eq!(Ipv6Addr::from(drops[2].saddr), REMOTE_POD);
        let v = n.policy.verdicts().expect("verdicts");
        assert_eq!(v.denied(Direction::Ingress), 3);
        assert_eq!(v.by_match[0][PolicyMatch::L3L4 as usize], 1);
    }

    #[test]
    fn replies_of_allowed_ipv6_connections_pass_a_default_deny_direction() {
        let mut n = node();
        // The frontend may only talk out to the backend; its ingress is default-deny too.
        n.policy(
            r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"p","namespace":"default"},
             "spec":{"endpointSelector":{"matchLabels":{"app":"frontend"}},
              "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"nobody"}}]}],
              "egress":[{"toEndpoints":[{"matchLabels":{"app":"backend"}}]}]}}"#,
        );
        let reply = tcp6(POD_B, POD_A, 8080, 40000);
        assert_eq!(n.run(Program::FromPod, &reply), TC_ACT_SHOT, "unsolicited");
        assert_eq!(
            n.run(Program::FromPod, &tcp6(POD_A, POD_B, 40000, 8080)),
            TC_ACT_REDIRECT
        );
        assert_eq!(
            n.run(Program::FromPod, &reply),
            TC_ACT_REDIRECT,
            "tracked reply"
        );
    }
}

// ---- Service load balancing on IPv6 ----

mod lb {
    use super::policy::tcp6;
    use super::*;
    use aya::maps::{HashMap, MapData, PerCpuArray};
    use clustermesh_ebpf_abi::{
        map, Ct4Entry, Ct6Key, Lb4Service, Lb6Backend, Lb6Key, Lb6RevNat, LbCounter, IPPROTO_TCP,
    };

    const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x10);
    const CLIENT_PORT: u16 = 40000;

    struct Lb6 {
        services: HashMap<MapData, Lb6Key, Lb4Service>,
        backends: HashMap<MapData, u32, Lb6Backend>,
        rev_nat: HashMap<MapData, u16, Lb6RevNat>,
        ct: HashMap<MapData, Ct6Key, Ct4Entry>,
        counters: PerCpuArray<MapData, u64>,
    }

    fn open<K: aya::Pod, V: aya::Pod>(dp: &mut Datapath, name: &str) -> HashMap<MapData, K, V> {
        HashMap::try_from(dp.take_map(name).expect(name)).expect(name)
    }

    fn backend(addr: Ipv6Addr, port: u16) -> Lb6Backend {
        Lb6Backend {
            address: addr.octets(),
            port: port.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        }
    }

    impl Lb6 {
        fn take(dp: &mut Datapath) -> Self {
            // The agent's `LbMaps` owns every LB map (both families) once taken, so this
            // test opens the IPv6 ones and the shared counters itself.
            Self {
                services: open(dp, map::LB6_SERVICES),
                backends: open(dp, map::LB6_BACKENDS),
                rev_nat: open(dp, map::LB6_REVERSE_NAT),
                ct: open(dp, map::LB6_CT),
                counters: PerCpuArray::try_from(dp.take_map(map::LB_COUNTERS).expect("counters"))
                    .expect("counters"),
            }
        }

        /// VIP:80/TCP with `backends` (ID, address) at port 8080 in slots 1..=n.
        fn service(&mut self, backends: &[(u32, Ipv6Addr)]) {
            for (id, addr) in backends {
                self.backends
                    .insert(id, backend(*addr, 8080), 0)
                    .expect("backend");
            }
            self.rev_nat
                .insert(
                    7,
                    Lb6RevNat {
                        address: VIP.octets(),
                        port: 80u16.to_be(),
                        pad: 0,
                    },
                    0,
                )
                .expect("rev nat");
            for (slot, (id, _)) in backends.iter().enumerate() {
                self.services
                    .insert(
                        Lb6Key::new(VIP.octets(), 80, IPPROTO_TCP, slot as u16 + 1),
                        Lb4Service {
                            backend_id: *id,
                            ..Default::default()
                        },
                        0,
                    )
                    .expect("slot");
            }
            self.services
                .insert(
                    Lb6Key::new(VIP.octets(), 80, IPPROTO_TCP, 0),
                    Lb4Service {
                        count: backends.len() as u16,
                        rev_nat_index: 7,
                        ..Default::default()
                    },
                    0,
                )
                .expect("frontend");
        }

        fn counter(&self, c: LbCounter) -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .expect("counter")
                .iter()
                .sum()
        }
    }

    /// A valid TCP checksum for `p` (Ethernet + IPv6 without extension headers + TCP).
    fn with_csum(mut p: Vec<u8>) -> Vec<u8> {
        p[54 + 16..54 + 18].copy_from_slice(&[0, 0]);
        let c = tcp_csum(&p);
        p[54 + 16..54 + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The ones' complement sum over the IPv6 pseudo-header and the TCP segment, folded
    /// and complemented (0 stored as is): what a valid checksum field holds.
    fn tcp_csum(p: &[u8]) -> u16 {
        let seg = &p[54..];
        let mut sum: u32 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                let w = if c.len() == 2 {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], 0])
                };
                sum += u32::from(w);
            }
        };
        add(&p[22..54]); // source and destination addresses
        add(&(seg.len() as u32).to_be_bytes());
        add(&[0, 0, 0, 6]);
        add(seg);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn assert_csum_valid(p: &[u8], what: &str) {
        let mut copy = p.to_vec();
        let stored = u16::from_be_bytes([p[70], p[71]]);
        copy[70..72].copy_from_slice(&[0, 0]);
        assert_eq!(
            stored,
            tcp_csum(&copy),
            "{what}: TCP checksum after translation"
        );
    }

    fn dst(p: &[u8]) -> (Ipv6Addr, u16) {
        let a: [u8; 16] = p[38..54].try_into().expect("16");
        (a.into(), u16::from_be_bytes([p[56], p[57]]))
    }

    fn src(p: &[u8]) -> (Ipv6Addr, u16) {
        let a: [u8; 16] = p[22..38].try_into().expect("16");
        (a.into(), u16::from_be_bytes([p[54], p[55]]))
    }

    #[test]
    fn ipv6_vip_is_translated_to_a_backend_sticky_and_reverse_translated() {
        let mut dp = node();
        let mut lb = Lb6::take(&mut dp);
        lb.service(&[(1, POD_B)]);
        let syn = with_csum(tcp6(POD_A, VIP, CLIENT_PORT, 80));
        let (verdict, out) = run(&mut dp, Program::FromPod, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to the local backend");
        assert_eq!(dst(&out), (POD_B, 8080), "DNAT to the backend");
        assert_eq!(src(&out), (POD_A, CLIENT_PORT), "source untouched");
        assert_csum_valid(&out, "DNAT");
        assert_eq!(lb.counter(LbCounter::CtNew), 1);
        assert_eq!(lb.ct.keys().count(), 2, "forward and reply tuple");

        // The next packet of the connection uses the CT entry.
        let (_, out) = run(&mut dp, Program::FromPod, &syn);
        assert_eq!(dst(&out), (POD_B, 8080));
        assert_eq!(lb.counter(LbCounter::CtHit), 1);

        // The backend's reply, delivered to the client: source back to VIP:80.
        let reply = with_csum(tcp6(POD_B, POD_A, 8080, CLIENT_PORT));
        let (verdict, out) = run(&mut dp, Program::FromPod, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(src(&out), (VIP, 80), "reverse NAT");
        assert_eq!(dst(&out), (POD_A, CLIENT_PORT));
        assert_csum_valid(&out, "reverse NAT");
        assert_eq!(lb.counter(LbCounter::RevNat), 1);

        // A reply from a remote backend arriving over the tunnel is translated too.
        lb.service(&[(2, REMOTE_POD)]);
        lb.ct
            .keys()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
            .iter()
            .for_each(|k| {
                let _ = lb.ct.remove(k);
            });
        let (verdict, out) = run(
            &mut dp,
            Program::FromPod,
            &with_csum(tcp6(POD_A, VIP, 40001, 80)),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT, "tunnelled to the remote backend");
        assert_eq!(dst(&out), (REMOTE_POD, 8080));
        let (verdict, out) = run(
            &mut dp,
            Program::FromOverlay,
            &with_csum(tcp6(REMOTE_POD, POD_A, 8080, 40001)),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(src(&out), (VIP, 80), "reverse NAT on the overlay path");
        assert_csum_valid(&out, "reverse NAT over the tunnel");
    }

    #[test]
    fn ipv6_failover_rebinds_and_a_service_without_backends_drops() {
        let mut dp = node();
        let mut lb = Lb6::take(&mut dp);
        lb.service(&[(1, POD_B)]);
        let syn = with_csum(tcp6(POD_A, VIP, CLIENT_PORT, 80));
        let (_, out) = run(&mut dp, Program::FromPod, &syn);
        assert_eq!(dst(&out).0, POD_B);
        // The backend goes; another takes its slot: the connection is rebound.
        lb.backends.remove(&1).expect("remove backend");
        lb.service(&[(2, REMOTE_POD)]);
        let (verdict, out) = run(&mut dp, Program::FromPod, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(dst(&out), (REMOTE_POD, 8080), "failover");
        assert_eq!(lb.counter(LbCounter::Reselected), 1);
        // No backend at all: new connections are dropped and counted.
        lb.services
            .insert(
                Lb6Key::new(VIP.octets(), 80, IPPROTO_TCP, 0),
                Lb4Service {
                    count: 0,
                    rev_nat_index: 7,
                    ..Default::default()
                },
                0,
            )
            .expect("frontend without backends");
        let (verdict, _) = run(
            &mut dp,
            Program::FromPod,
            &with_csum(tcp6(POD_A, VIP, 40009, 80)),
        );
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(lb.counter(LbCounter::DropNoBackend), 1);
    }

    #[test]
    fn an_ipv6_client_that_is_the_only_backend_is_looped_back() {
        let mut dp = node();
        let mut lb = Lb6::take(&mut dp);
        lb.service(&[(1, POD_A)]);
        let loopback = Ipv6Addr::from(clustermesh_ebpf_abi::LB_LOOPBACK_IPV6);
        let (verdict, out) = run(
            &mut dp,
            Program::FromPod,
            &with_csum(tcp6(POD_A, VIP, CLIENT_PORT, 80)),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(src(&out), (loopback, CLIENT_PORT));
        assert_eq!(dst(&out), (POD_A, 8080));
        assert_csum_valid(&out, "hairpin");
        // The pod's reply to the loopback address comes back as VIP:80 → pod.
        let (verdict, out) = run(
            &mut dp,
            Program::FromPod,
            &with_csum(tcp6(POD_A, loopback, 8080, CLIENT_PORT)),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(src(&out), (VIP, 80));
        assert_eq!(dst(&out), (POD_A, CLIENT_PORT));
        assert_csum_valid(&out, "hairpin reply");
        assert_eq!(lb.counter(LbCounter::Hairpin), 2);
    }
}
