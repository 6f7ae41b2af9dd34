//! BPF_PROG_TEST_RUN tests of every program on crafted packets: hit, miss, malformed and
//! truncated, asserting the verdict, the rewritten packet and the counters. Needs root
//! (CI runs as root). A redirect's verdict under test run is TC_ACT_REDIRECT (7): the
//! kernel does not perform the redirect, so the tunnel key the program set is checked
//! through the tunnel trace map instead.

use std::net::Ipv4Addr;

use clustermesh_agent::datapath::{Datapath, Program};
use clustermesh_ebpf_abi::{Counter, EndpointInfo, IpcacheValue, TraceSlot};

mod prog_common;
mod vxlan_common;
use prog_common::*;
use vxlan_common::Vxlan;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 11);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 10);

fn datapath() -> Datapath {
    load(1024, 64)
}

/// A node with pod A and pod B local, a remote pod behind REMOTE_NODE, tunnel configured.
fn node() -> Datapath {
    let mut dp = datapath();
    let m = &mut dp.maps;
    m.local_endpoints
        .upsert_v4(POD_A, pod_a())
        .expect("upsert A");
    m.local_endpoints
        .upsert_v4(
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
        .upsert_v4(
            REMOTE_POD,
            32,
            IpcacheValue::tunnel_v4(REMOTE_POD_IDENTITY, REMOTE_NODE.octets()),
        )
        .expect("upsert remote");
    m.tunnel
        .set(VXLAN_IFINDEX, LOCAL_NODE, VXLAN_PORT)
        .expect("tunnel settings");
    dp
}

/// Ethernet + IPv4 (20-byte header) + 8 bytes of ICMP echo.
#[test]
fn from_pod_delivers_to_a_local_pod_with_its_macs() {
    let mut dp = node();
    let (verdict, out) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, POD_B));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[0..6], POD_B_MAC, "destination MAC = pod B");
    assert_eq!(
        out[6..12],
        HOST_B_MAC,
        "source MAC = pod B's gateway (host veth)"
    );
    assert_eq!(out[12..], ipv4_packet(POD_A, POD_B)[12..], "L3 untouched");
    assert_counters(
        &dp,
        Program::FromPod,
        &[(Counter::Packets, 1), (Counter::DeliveredLocal, 1)],
    );
}

#[test]
fn from_pod_tunnels_to_the_remote_node_with_the_source_identity_as_vni() {
    let mut dp = node();
    let packet = ipv4_packet(POD_A, REMOTE_POD);
    let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet, "the inner frame is sent as is");
    assert_counters(
        &dp,
        Program::FromPod,
        &[(Counter::Packets, 1), (Counter::Tunnelled, 1)],
    );
    let traces = dp.maps.traces.read(TraceSlot::Egress).expect("traces");
    assert_eq!(traces.len(), 1, "{traces:?}");
    assert_eq!(traces[0].remote_ipv4, REMOTE_NODE.octets());
    assert_eq!(traces[0].vni, POD_A_IDENTITY);
    assert_eq!(traces[0].ifindex, VXLAN_IFINDEX);
}

#[test]
fn from_pod_matches_ipcache_prefixes_longest_first() {
    let mut dp = node();
    let other = Ipv4Addr::new(198, 18, 1, 9);
    dp.maps
        .ipcache
        .upsert_v4(
            Ipv4Addr::new(10, 3, 0, 0),
            16,
            IpcacheValue::tunnel_v4(2, REMOTE_NODE.octets()),
        )
        .expect("upsert /16");
    dp.maps
        .ipcache
        .upsert_v4(
            Ipv4Addr::new(10, 3, 7, 0),
            24,
            IpcacheValue::tunnel_v4(2, other.octets()),
        )
        .expect("upsert /24");
    for (dst, node) in [
        (Ipv4Addr::new(10, 3, 5, 5), REMOTE_NODE),
        (Ipv4Addr::new(10, 3, 7, 5), other),
    ] {
        let (verdict, _) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, dst));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{dst}");
        let traces = dp.maps.traces.read(TraceSlot::Egress).expect("traces");
        assert!(
            traces.iter().any(|t| t.remote_ipv4 == node.octets()),
            "{dst}: {traces:?}"
        );
    }
}

#[test]
fn from_pod_passes_misses_and_untunnelled_destinations_to_the_stack() {
    let mut dp = node();
    // Not in the ipcache at all.
    let (verdict, _) = run(
        &mut dp,
        Program::FromPod,
        &ipv4_packet(POD_A, Ipv4Addr::new(192, 0, 2, 1)),
    );
    assert_eq!(verdict, TC_ACT_OK);
    // In the ipcache as world (no tunnel endpoint).
    let world = Ipv4Addr::new(192, 0, 2, 2);
    dp.maps
        .ipcache
        .upsert_v4(world, 32, IpcacheValue::local(2))
        .expect("upsert world");
    let (verdict, _) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, world));
    assert_eq!(verdict, TC_ACT_OK);
    // Tunnel endpoint = this node: a local pod the agent has not programmed yet.
    let not_yet = Ipv4Addr::new(10, 1, 1, 99);
    dp.maps
        .ipcache
        .upsert_v4(
            not_yet,
            32,
            IpcacheValue::tunnel_v4(65_539, LOCAL_NODE.octets()),
        )
        .expect("upsert");
    let (verdict, _) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, not_yet));
    assert_eq!(verdict, TC_ACT_OK);
    // Source is not a local endpoint: no identity for the VNI.
    let (verdict, _) = run(
        &mut dp,
        Program::FromPod,
        &ipv4_packet(Ipv4Addr::new(10, 1, 1, 200), REMOTE_POD),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_counters(
        &dp,
        Program::FromPod,
        &[
            (Counter::Packets, 4),
            (Counter::ToStack, 4),
            (Counter::IpcacheMiss, 1),
            (Counter::NoTunnel, 2),
            (Counter::SourceUnknown, 1),
        ],
    );
    // Removing the remote pod's entry turns it into a miss.
    assert!(dp.maps.ipcache.remove_v4(REMOTE_POD, 32).expect("remove"));
    assert!(!dp
        .maps
        .ipcache
        .remove_v4(REMOTE_POD, 32)
        .expect("remove again"));
    let (verdict, _) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, REMOTE_POD));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(counters(&dp, Program::FromPod).get(Counter::IpcacheMiss), 2);
}

#[test]
fn from_pod_without_tunnel_settings_uses_the_stack() {
    let mut dp = node();
    dp.maps.tunnel.clear().expect("clear");
    let (verdict, _) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, REMOTE_POD));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        counters(&dp, Program::FromPod).get(Counter::TunnelUnconfigured),
        1
    );
}

#[test]
fn from_pod_refuses_identities_wider_than_a_vni() {
    let mut dp = node();
    let mut info = dp
        .maps
        .local_endpoints
        .get_v4(POD_A)
        .expect("get")
        .expect("present");
    info.identity = 1 << 24; // a local-scope (CIDR) identity never crosses nodes
    dp.maps
        .local_endpoints
        .upsert_v4(POD_A, info)
        .expect("upsert");
    let (verdict, _) = run(&mut dp, Program::FromPod, &ipv4_packet(POD_A, REMOTE_POD));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        counters(&dp, Program::FromPod).get(Counter::IdentityTooLarge),
        1
    );
}

/// Malformed and truncated packets, the same for both programs.
fn bad_packets() -> Vec<(&'static str, Vec<u8>, u32, Counter)> {
    let good = ipv4_packet(POD_A, POD_B);
    let mut ihl4 = good.clone();
    ihl4[14] = 0x44; // IHL 4 words < 20 bytes
    let mut v6_in_v4 = good.clone();
    v6_in_v4[14] = 0x65; // version 6 under ethertype IPv4
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&12u16.to_be_bytes()); // total length < header
    let mut ihl15 = good[..34].to_vec();
    ihl15[14] = 0x4f; // header claims 60 bytes, frame holds 20
    ihl15[16..18].copy_from_slice(&60u16.to_be_bytes());
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // The kernel's harness wants a whole IPv6 header behind an IPv6 ethertype.
    let mut ipv6 = good[..12].to_vec();
    ipv6.extend_from_slice(&0x86ddu16.to_be_bytes());
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 58, 64]); // version, len 8, ICMPv6, hops
    ipv6.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ipv6.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    ipv6.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
    let mut v4_in_v6 = ipv6;
    v4_in_v6[14] = 0x40; // version 4 under ethertype IPv6
    let eth_only = {
        let mut p = good[..14].to_vec();
        p[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
        p
    };
    vec![
        ("IHL below 5", ihl4, TC_ACT_SHOT, Counter::DropMalformed),
        (
            "version 6 in an IPv4 frame",
            v6_in_v4,
            TC_ACT_SHOT,
            Counter::DropMalformed,
        ),
        (
            "total length below IHL",
            short_total,
            TC_ACT_SHOT,
            Counter::DropMalformed,
        ),
        (
            "IHL beyond the frame",
            ihl15,
            TC_ACT_SHOT,
            Counter::DropTruncated,
        ),
        ("ARP", arp, TC_ACT_OK, Counter::NotIp),
        (
            "version 4 in an IPv6 frame",
            v4_in_v6,
            TC_ACT_SHOT,
            Counter::DropMalformed,
        ),
        ("Ethernet header only", eth_only, TC_ACT_OK, Counter::NotIp),
    ]
}

fn check_bad_packets(program: Program) {
    for (what, packet, want_verdict, want_counter) in bad_packets() {
        let mut dp = node();
        let (verdict, out) = run(&mut dp, program, &packet);
        assert_eq!(verdict, want_verdict, "{program:?}: {what}");
        assert_eq!(
            out, packet,
            "{program:?}: {what}: packet must not be modified"
        );
        let c = counters(&dp, program);
        assert_eq!(
            c.get(want_counter),
            1,
            "{program:?}: {what}: {:?}",
            c.non_zero()
        );
        assert_eq!(
            c.get(Counter::DeliveredLocal) + c.get(Counter::Tunnelled),
            0,
            "{what}"
        );
    }
}

#[test]
fn from_pod_drops_malformed_and_truncated_and_passes_non_ip() {
    check_bad_packets(Program::FromPod);
}

#[test]
fn from_overlay_drops_malformed_and_truncated_and_passes_non_ip() {
    check_bad_packets(Program::FromOverlay);
}

#[test]
fn frames_shorter_than_an_ipv4_header_never_reach_the_programs() {
    // The kernel's test harness (like a real device) refuses an IPv4 frame that cannot hold
    // an IPv4 header, and any frame shorter than Ethernet: EINVAL, not a program verdict.
    let mut dp = node();
    let good = ipv4_packet(POD_A, POD_B);
    for len in [10, 14 + 19] {
        for program in Program::ALL {
            let r = dp.test_run(program, &good[..len], None, 1);
            assert!(r.is_err(), "{program:?} with {len} bytes: {r:?}");
        }
    }
}

#[test]
fn from_overlay_delivers_to_the_local_pod_with_its_macs() {
    let mut dp = node();
    let packet = ipv4_packet(REMOTE_POD, POD_B);
    let (verdict, out) = run(&mut dp, Program::FromOverlay, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[0..6], POD_B_MAC);
    assert_eq!(out[6..12], HOST_B_MAC);
    assert_eq!(out[12..], packet[12..]);
    // Under test run there is no collect_md metadata: identity 0 is recorded as such.
    assert_counters(
        &dp,
        Program::FromOverlay,
        &[
            (Counter::Packets, 1),
            (Counter::DeliveredLocal, 1),
            (Counter::NoTunnelKey, 1),
        ],
    );
    let traces = dp.maps.traces.read(TraceSlot::Ingress).expect("traces");
    assert_eq!(traces.len(), 1);
    assert_eq!((traces[0].vni, traces[0].ifindex), (0, 42));
}

#[test]
fn from_overlay_passes_packets_for_unknown_pods_to_the_stack() {
    let mut dp = node();
    let (verdict, _) = run(
        &mut dp,
        Program::FromOverlay,
        &ipv4_packet(REMOTE_POD, Ipv4Addr::new(10, 1, 1, 77)),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_counters(
        &dp,
        Program::FromOverlay,
        &[
            (Counter::Packets, 1),
            (Counter::ToStack, 1),
            (Counter::EndpointMiss, 1),
            (Counter::NoTunnelKey, 1),
        ],
    );
}

#[test]
fn per_packet_cost() {
    // Not an assertion on speed (machines are noisy); prints the kernel's mean per run so
    // the numbers are visible in every test log. Benchmarks live in the tests crate.
    let mut dp = node();
    let cases = [
        (
            "from_pod local",
            Program::FromPod,
            ipv4_packet(POD_A, POD_B),
        ),
        (
            "from_pod tunnel",
            Program::FromPod,
            ipv4_packet(POD_A, REMOTE_POD),
        ),
        (
            "from_pod miss",
            Program::FromPod,
            ipv4_packet(POD_A, Ipv4Addr::new(192, 0, 2, 1)),
        ),
        (
            "from_overlay local",
            Program::FromOverlay,
            ipv4_packet(REMOTE_POD, POD_B),
        ),
        (
            "from_underlay decap + local",
            Program::FromUnderlay,
            vxlan_to_local_node(&ipv4_packet(REMOTE_POD, POD_B)).frame(),
        ),
        (
            "from_underlay not tunnelled",
            Program::FromUnderlay,
            ipv4_packet(REMOTE_NODE, LOCAL_NODE),
        ),
    ];
    for (what, program, packet) in cases {
        let r = if program == Program::FromUnderlay {
            dp.test_run_fresh(program, &packet, 20_000)
        } else {
            dp.test_run(program, &packet, None, 200_000)
        }
        .expect("test run");
        println!(
            "{what}: {} ns/packet (verdict {})",
            r.duration.as_nanos(),
            r.verdict
        );
    }
}

/// A VXLAN datagram from REMOTE_NODE to LOCAL_NODE:4789, VNI = the remote pod's identity.
fn vxlan_to_local_node(inner: &[u8]) -> Vxlan {
    Vxlan::new(
        REMOTE_NODE,
        LOCAL_NODE,
        VXLAN_PORT,
        REMOTE_POD_IDENTITY,
        inner,
    )
}

#[test]
fn from_underlay_decapsulates_vxlan_for_a_local_pod_with_the_vni_as_source_identity() {
    let mut dp = node();
    let inner = ipv4_packet(REMOTE_POD, POD_B);
    let (verdict, out) = run(
        &mut dp,
        Program::FromUnderlay,
        &vxlan_to_local_node(&inner).frame(),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), inner.len(), "outer headers removed: {out:02x?}");
    assert_eq!(out[0..6], POD_B_MAC, "destination MAC = pod B");
    assert_eq!(out[6..12], HOST_B_MAC, "source MAC = pod B's gateway");
    assert_eq!(out[12..], inner[12..], "the inner IPv4 packet, untouched");
    assert_counters(
        &dp,
        Program::FromUnderlay,
        &[(Counter::Packets, 1), (Counter::DeliveredLocal, 1)],
    );
    assert_counters(&dp, Program::FromOverlay, &[]);
    let traces = dp.maps.traces.read(TraceSlot::Ingress).expect("traces");
    assert_eq!(traces.len(), 1);
    let t = traces[0];
    assert_eq!(
        (t.vni, t.ifindex, Ipv4Addr::from(t.remote_ipv4)),
        (REMOTE_POD_IDENTITY, 42, REMOTE_NODE),
        "identity from the VNI, the outer source as the remote node"
    );
}

#[test]
fn from_underlay_passes_everything_else_on_unchanged() {
    let pod = vxlan_to_local_node(&ipv4_packet(REMOTE_POD, POD_B));
    let with = |f: &dyn Fn(&mut Vxlan)| {
        let mut v = pod.clone();
        f(&mut v);
        v.frame()
    };
    let mut arp = ipv4_packet(REMOTE_POD, POD_B);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let vxlan_frame = pod.frame();
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "the node's own traffic (ICMP to the node)",
            ipv4_packet(REMOTE_NODE, LOCAL_NODE),
            Counter::NotTunnelled,
        ),
        (
            "another UDP port",
            with(&|v| v.dport = 53),
            Counter::NotTunnelled,
        ),
        (
            "VXLAN for another node",
            with(&|v| v.outer[16..20].copy_from_slice(&REMOTE_NODE.octets())),
            Counter::NotTunnelled,
        ),
        (
            "no valid-VNI flag",
            with(&|v| v.flags = 0),
            Counter::NotTunnelled,
        ),
        (
            "a fragment (more fragments)",
            with(&|v| v.outer[6] = 0x20),
            Counter::NotTunnelled,
        ),
        (
            "a fragment (offset)",
            with(&|v| v.outer[7] = 0x08),
            Counter::NotTunnelled,
        ),
        (
            "outer IPv4 options",
            with(&|v| {
                v.outer[0] = 0x46;
                v.outer.extend_from_slice(&[1, 1, 1, 1]);
            }),
            Counter::NotTunnelled,
        ),
        (
            "cut inside the inner IPv4 header",
            vxlan_frame[..vxlan_frame.len() - 20].to_vec(),
            Counter::NotTunnelled,
        ),
        (
            "an inner ARP frame",
            with(&|v| v.inner = arp.clone()),
            Counter::NotIp,
        ),
        (
            "an inner frame for a pod not on this node",
            with(&|v| v.inner = ipv4_packet(REMOTE_POD, Ipv4Addr::new(10, 1, 1, 77))),
            Counter::EndpointMiss,
        ),
    ];
    for (what, packet, reason) in cases {
        let mut dp = node();
        let (verdict, out) = run(&mut dp, Program::FromUnderlay, &packet);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(out, packet, "{what}: must reach the stack unmodified");
        assert_counters(
            &dp,
            Program::FromUnderlay,
            &[(Counter::Packets, 1), (Counter::ToStack, 1), (reason, 1)],
        );
    }

    // Before the agent configures the tunnel port, nothing is decapsulated.
    let mut dp = node();
    dp.maps
        .tunnel
        .set(VXLAN_IFINDEX, LOCAL_NODE, 0)
        .expect("tunnel settings");
    let (verdict, out) = run(&mut dp, Program::FromUnderlay, &vxlan_frame);
    assert_eq!((verdict, out), (TC_ACT_OK, vxlan_frame));
    assert_counters(
        &dp,
        Program::FromUnderlay,
        &[
            (Counter::Packets, 1),
            (Counter::ToStack, 1),
            (Counter::TunnelUnconfigured, 1),
        ],
    );
}

/// Every program stays well inside the verifier's budget (1M instructions processed per
/// program). A program over it does not load and the agent cannot start; one near it costs
/// seconds of verifier time at every start. `from_pod_v6` was at 665k (~2.2 s) before IPv6's
/// transport header was read with a helper (see `read_l4` in ebpf/programs/src/packet.rs).
#[test]
fn every_program_verifies_within_a_third_of_the_instruction_limit() {
    const BUDGET: u32 = 330_000;
    let mut ebpf = aya::EbpfLoader::new()
        .load(clustermesh_agent::datapath::OBJECT)
        .expect("load the object (needs root)");
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    assert!(names.len() >= 6, "programs in the object: {names:?}");
    let mut report = Vec::new();
    for name in names {
        let prog: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(&name)
            .expect("listed above")
            .try_into()
            .expect("every program is a classifier");
        prog.load()
            .unwrap_or_else(|e| panic!("{name} does not load: {e:?}"));
        let insns = prog
            .info()
            .expect("program info")
            .verified_instruction_count()
            .expect("kernel reports verified_insns (≥ 5.16)");
        eprintln!("{name}: {insns} instructions verified");
        report.push((name, insns));
    }
    let over: Vec<_> = report.iter().filter(|(_, n)| *n > BUDGET).collect();
    assert!(
        over.is_empty(),
        "over the budget of {BUDGET} verified instructions: {over:?} (all: {report:?})"
    );
}
