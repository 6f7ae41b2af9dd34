//! BPF_PROG_TEST_RUN tests of the service load balancer (`ebpf/programs/src/lb.rs`) on
//! crafted TCP/UDP packets, with the LB maps programmed through the real control path
//! (`ServiceMerger` → `Diff` → `LbMaps`): VIP hit → DNAT to a backend with valid checksums;
//! a flow stays on its backend; misses untouched; replies reverse-translated on both
//! delivery paths; spread over backends; failover when a backend disappears; a client that
//! is one of the backends never picks itself, and one that is the only backend is looped
//! back through 169.254.1.1 (hairpin). Needs root.

use std::net::Ipv4Addr;
use std::sync::Arc;

use clustermesh_agent::datapath::{Config, Datapath, Program};
use clustermesh_agent::services::{Affinity, LbMaps, LocalService, Name, ServiceMerger};
use clustermesh_ebpf_abi::{EndpointInfo, IpcacheValue, LbCounter, IPPROTO_TCP, IPPROTO_UDP};
use clustermesh_types::model::{ClusterService, L4Addr, PortConfiguration};

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
const LOCAL_BE: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 11);
const REMOTE_BE: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 10);
const LOCAL_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

fn endpoint(ifindex: u32, last: u8) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        identity: 65_537 + ifindex,
        flags: 0,
        pod_mac: [0x0a, 0x58, 10, 1, 1, last],
        host_mac: [0x02, 0, 0, 0, 0, last],
    }
}

/// A node of cluster 1 with the client and a local backend; a remote backend in cluster 2.
fn node() -> (Datapath, LbMaps) {
    let config = Config {
        ipcache_max_entries: 1024,
        local_endpoints_max_entries: 64,
        ..Config::default()
    };
    let mut dp = Datapath::load(&config).expect("load datapath (needs root)");
    let lb = LbMaps::take(&mut dp).expect("lb maps");
    let m = &mut dp.maps;
    m.local_endpoints
        .upsert_v4(CLIENT, endpoint(41, 10))
        .expect("client");
    m.local_endpoints
        .upsert_v4(LOCAL_BE, endpoint(42, 11))
        .expect("local backend");
    m.ipcache
        .upsert_v4(
            REMOTE_BE,
            32,
            IpcacheValue::tunnel_v4(131_073, REMOTE_NODE.octets()),
        )
        .expect("remote backend");
    m.tunnel.set(77, LOCAL_NODE, 4789).expect("tunnel");
    (dp, lb)
}

fn ports(proto: &str, port: u16) -> PortConfiguration {
    [(
        "http".to_string(),
        L4Addr {
            protocol: proto.into(),
            port,
        },
    )]
    .into_iter()
    .collect()
}

fn cluster_service(cluster: &str, id: u32, backends: &[Ipv4Addr], proto: &str) -> ClusterService {
    ClusterService {
        cluster: cluster.into(),
        namespace: "default".into(),
        name: "echo".into(),
        frontends: [(VIP.to_string(), ports(proto, 80))].into_iter().collect(),
        backends: backends
            .iter()
            .map(|b| (b.to_string(), ports(proto, 8080)))
            .collect(),
        include_external: true,
        shared: true,
        cluster_id: id,
        ..Default::default()
    }
}

fn name() -> Name {
    Name::new("default", "echo")
}

/// Programs the local service (cluster 1) with `local` backends and the remote one.
fn program(
    lb: &mut LbMaps,
    merger: &mut ServiceMerger,
    local: &[Ipv4Addr],
    remote: &[Ipv4Addr],
    affinity: Affinity,
    proto: &str,
) {
    let diff = merger.on_remote(
        "c2",
        name(),
        Some(Arc::new(cluster_service("c2", 2, remote, proto))),
    );
    lb.apply(&diff).expect("apply remote");
    let diff = merger.on_local(
        name(),
        Some(LocalService {
            service: cluster_service("c1", 1, local, proto),
            affinity,
            ..Default::default()
        }),
    );
    lb.apply(&diff).expect("apply local");
}

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn l4_csum(ip: &[u8], l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let mut sum = 0u32;
    for c in pseudo.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    csum(l4, sum)
}

/// Ethernet + IPv4 + TCP SYN (20-byte header, 4 bytes payload) or UDP (4 bytes payload),
/// checksums valid (`udp_zero_csum`: UDP without checksum).
fn packet(
    proto: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    udp_zero_csum: bool,
) -> Vec<u8> {
    let payload = b"ping";
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let off = if proto == IPPROTO_TCP { 16 } else { 6 };
    if !(proto == IPPROTO_UDP && udp_zero_csum) {
        let c = l4_csum(&ip, &l4);
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut p = vec![0x02, 0, 0, 0, 0, 10, 0x0a, 0x58, 10, 1, 1, 10, 0x08, 0x00];
    p.extend_from_slice(&ip);
    p.extend_from_slice(&l4);
    p
}

struct Parsed {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
}

/// Parses the output and asserts both checksums are valid.
fn parse_checked(p: &[u8]) -> Parsed {
    let ip = &p[14..34];
    assert_eq!(csum(ip, 0), 0, "IPv4 header checksum");
    let l4 = &p[34..];
    let is_udp = ip[9] == IPPROTO_UDP;
    if !(is_udp && l4[6..8] == [0, 0]) {
        assert_eq!(l4_csum(ip, l4), 0, "L4 checksum of {p:02x?}");
    }
    Parsed {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

fn run(dp: &mut Datapath, program: Program, packet: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 64];
    let r = dp
        .test_run(program, packet, Some(&mut out), 1)
        .expect("test run");
    out.truncate(r.data_out_len);
    (r.verdict, out)
}

#[test]
fn vip_hit_is_translated_with_valid_checksums_and_replies_are_reversed() {
    let (mut dp, mut lb) = node();
    let mut merger = ServiceMerger::new("c1");
    program(
        &mut lb,
        &mut merger,
        &[LOCAL_BE],
        &[],
        Affinity::None,
        "TCP",
    );

    let syn = packet(IPPROTO_TCP, CLIENT, 40_000, VIP, 80, false);
    let (verdict, out) = run(&mut dp, Program::FromPod, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to the local backend");
    let p = parse_checked(&out);
    assert_eq!((p.src, p.sport), (CLIENT, 40_000));
    assert_eq!((p.dst, p.dport), (LOCAL_BE, 8080));
    assert_eq!(
        out[0..6],
        endpoint(42, 11).pod_mac,
        "MACs of the backend pod"
    );
    assert_eq!(lb.counter(LbCounter::CtNew).unwrap(), 1);
    assert_eq!(lb.ct_entries().unwrap().len(), 2, "forward + reply tuple");

    // Same flow: same backend, from the CT.
    let (_, out) = run(&mut dp, Program::FromPod, &syn);
    assert_eq!(parse_checked(&out).dst, LOCAL_BE);
    assert_eq!(lb.counter(LbCounter::CtHit).unwrap(), 1);

    // Reply from the backend on this node (from_pod local delivery).
    let reply = packet(IPPROTO_TCP, LOCAL_BE, 8080, CLIENT, 40_000, false);
    let (verdict, out) = run(&mut dp, Program::FromPod, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = parse_checked(&out);
    assert_eq!((p.src, p.sport), (VIP, 80), "source back to the VIP");
    assert_eq!((p.dst, p.dport), (CLIENT, 40_000));

    // The same reply arriving through the tunnel (from_overlay).
    let (verdict, out) = run(&mut dp, Program::FromOverlay, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).src, VIP);
    assert_eq!(lb.counter(LbCounter::RevNat).unwrap(), 2);
}

#[test]
fn misses_are_untouched() {
    let (mut dp, mut lb) = node();
    let mut merger = ServiceMerger::new("c1");
    program(
        &mut lb,
        &mut merger,
        &[LOCAL_BE],
        &[],
        Affinity::None,
        "TCP",
    );
    for p in [
        packet(
            IPPROTO_TCP,
            CLIENT,
            40_001,
            Ipv4Addr::new(172, 20, 0, 99),
            80,
            false,
        ),
        packet(IPPROTO_TCP, CLIENT, 40_001, VIP, 81, false),
        packet(IPPROTO_UDP, CLIENT, 40_001, VIP, 80, false),
    ] {
        let (verdict, out) = run(&mut dp, Program::FromPod, &p);
        assert_eq!(verdict, TC_ACT_OK, "not a frontend: to the stack");
        assert_eq!(out, p, "untouched");
    }
    // A packet from a non-client to a pod is not a reply: untouched.
    let p = packet(IPPROTO_TCP, LOCAL_BE, 8080, CLIENT, 1234, false);
    let (_, out) = run(&mut dp, Program::FromPod, &p);
    assert_eq!(out[14..], p[14..]);
    assert_eq!(lb.counter(LbCounter::Translated).unwrap(), 0);
}

#[test]
fn udp_without_checksum_stays_without() {
    let (mut dp, mut lb) = node();
    let mut merger = ServiceMerger::new("c1");
    program(
        &mut lb,
        &mut merger,
        &[LOCAL_BE],
        &[],
        Affinity::None,
        "UDP",
    );
    let (verdict, out) = run(
        &mut dp,
        Program::FromPod,
        &packet(IPPROTO_UDP, CLIENT, 5353, VIP, 80, true),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[34 + 6..34 + 8], [0, 0], "UDP checksum left at 0");
    assert_eq!(parse_checked(&out).dst, LOCAL_BE);
    let (_, out) = run(
        &mut dp,
        Program::FromPod,
        &packet(IPPROTO_UDP, CLIENT, 5354, VIP, 80, false),
    );
    assert_eq!(parse_checked(&out).dport, 8080);
}

#[test]
fn new_connections_spread_over_clusters_and_fail_over() {
    let (mut dp, mut lb) = node();
    let mut merger = ServiceMerger::new("c1");
    program(
        &mut lb,
        &mut merger,
        &[LOCAL_BE],
        &[REMOTE_BE],
        Affinity::None,
        "TCP",
    );
    let (mut local, mut remote) = (0, 0);
    for sport in 0..400u16 {
        let (verdict, out) = run(
            &mut dp,
            Program::FromPod,
            &packet(IPPROTO_TCP, CLIENT, 20_000 + sport, VIP, 80, false),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        match parse_checked(&out).dst {
            LOCAL_BE => local += 1,
            REMOTE_BE => remote += 1,
            other => panic!("unexpected backend {other}"),
        }
    }
    println!("400 new connections: local {local}, remote {remote}");
    assert!(
        (120..=280).contains(&local),
        "local {local} remote {remote}"
    );

    // Affinity local: only the local backend; the remote one stands by.
    program(
        &mut lb,
        &mut merger,
        &[LOCAL_BE],
        &[REMOTE_BE],
        Affinity::Local,
        "TCP",
    );
    let flow = packet(IPPROTO_TCP, CLIENT, 50_000, VIP, 80, false);
    for _ in 0..20 {
        let (_, out) = run(&mut dp, Program::FromPod, &flow);
        assert_eq!(parse_checked(&out).dst, LOCAL_BE);
    }
    // The last local backend goes: the established flow and new ones move to the remote
    // cluster (tunnelled), without restarting anything.
    program(
        &mut lb,
        &mut merger,
        &[],
        &[REMOTE_BE],
        Affinity::Local,
        "TCP",
    );
    let (verdict, out) = run(&mut dp, Program::FromPod, &flow);
    assert_eq!(verdict, TC_ACT_REDIRECT, "tunnelled");
    assert_eq!(parse_checked(&out).dst, REMOTE_BE);
    assert!(lb.counter(LbCounter::Reselected).unwrap() >= 1);

    // No backend anywhere: dropped.
    program(&mut lb, &mut merger, &[], &[], Affinity::Local, "TCP");
    let (verdict, _) = run(
        &mut dp,
        Program::FromPod,
        &packet(IPPROTO_TCP, CLIENT, 50_001, VIP, 80, false),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(lb.counter(LbCounter::DropNoBackend).unwrap(), 1);
}

#[test]
fn client_among_backends_never_picks_itself() {
    let (mut dp, mut lb) = node();
    let mut merger = ServiceMerger::new("c1");
    program(
        &mut lb,
        &mut merger,
        &[CLIENT, LOCAL_BE],
        &[],
        Affinity::None,
        "TCP",
    );
    for sport in 0..100u16 {
        let (verdict, out) = run(
            &mut dp,
            Program::FromPod,
            &packet(IPPROTO_TCP, CLIENT, 30_000 + sport, VIP, 80, false),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let p = parse_checked(&out);
        assert_eq!((p.src, p.sport), (CLIENT, 30_000 + sport), "no SNAT");
        assert_eq!((p.dst, p.dport), (LOCAL_BE, 8080), "connection {sport}");
    }
    let avoided = lb.counter(LbCounter::SelfAvoided).unwrap();
    println!("100 new connections: self avoided {avoided}");
    assert!((1..100).contains(&avoided), "avoided {avoided}");
    assert_eq!(lb.counter(LbCounter::Hairpin).unwrap(), 0);
}

#[test]
fn client_as_only_backend_is_looped_back() {
    let (mut dp, mut lb) = node();
    let mut merger = ServiceMerger::new("c1");
    program(&mut lb, &mut merger, &[CLIENT], &[], Affinity::None, "TCP");

    // Forward: VIP → the client itself, source → 169.254.1.1, delivered into the client.
    let syn = packet(IPPROTO_TCP, CLIENT, 40_000, VIP, 80, false);
    for _ in 0..2 {
        let (verdict, out) = run(&mut dp, Program::FromPod, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let p = parse_checked(&out);
        assert_eq!((p.src, p.sport), (LOOPBACK, 40_000));
        assert_eq!((p.dst, p.dport), (CLIENT, 8080));
        assert_eq!(out[0..6], endpoint(41, 10).pod_mac, "back into the client");
    }
    assert_eq!(lb.counter(LbCounter::CtNew).unwrap(), 1);
    assert_eq!(lb.counter(LbCounter::CtHit).unwrap(), 1);

    // Reply: pod:8080 → 169.254.1.1:40000 becomes VIP:80 → pod:40000, into the pod.
    let reply = packet(IPPROTO_TCP, CLIENT, 8080, LOOPBACK, 40_000, false);
    let (verdict, out) = run(&mut dp, Program::FromPod, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = parse_checked(&out);
    assert_eq!((p.src, p.sport), (VIP, 80));
    assert_eq!((p.dst, p.dport), (CLIENT, 40_000));
    assert_eq!(out[0..6], endpoint(41, 10).pod_mac);
    assert_eq!(lb.counter(LbCounter::Hairpin).unwrap(), 3);
    assert_eq!(lb.counter(LbCounter::RevNat).unwrap(), 1);

    // Other traffic to the gateway address (not a hairpin reply) is untouched.
    let other = packet(IPPROTO_UDP, CLIENT, 5353, LOOPBACK, 53, false);
    let (_, out) = run(&mut dp, Program::FromPod, &other);
    assert_eq!(out[14..], other[14..]);
    assert_eq!(lb.counter(LbCounter::RevNat).unwrap(), 1);
}
