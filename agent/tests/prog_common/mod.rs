//! What the BPF_PROG_TEST_RUN suites of the programs (`programs`, `ipv6_prog`, `bpf_tx_prog`)
//! share: the verdicts, the test node's addresses and MACs, loading the datapath, pod A's
//! endpoint, an IPv4 ICMP frame from pod A, and one run of a program with its counters.
// Each suite is its own crate and uses part of this module.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use clustermesh_agent::datapath::{Config, CounterValues, Datapath, Program};
use clustermesh_ebpf_abi::{Counter, EndpointInfo};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const LOCAL_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const VXLAN_IFINDEX: u32 = 77;
pub const VXLAN_PORT: u16 = 4789;
pub const REMOTE_POD_IDENTITY: u32 = 131_073;
pub const POD_A_IDENTITY: u32 = 65_537;
pub const POD_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x01];
pub const HOST_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x02];

/// Ethernet (to pod A's host-side veth, from pod A) + IPv4 + ICMP echo request.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(42);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0xa0, 0x02]); // dst: host-side veth of A
    p.extend_from_slice(&[0x02, 0, 0, 0, 0xa0, 0x01]); // src: pod A
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total_len: u16 = 20 + 8;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total_len.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]); // id, DF, ttl, ICMP, csum 0
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]); // ICMP echo request
    p
}

pub fn counters(dp: &Datapath, program: Program) -> CounterValues {
    dp.maps.counters(program).read().expect("read counters")
}

/// Runs once and returns (verdict, packet after the program).
pub fn run(dp: &mut Datapath, program: Program, packet: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 64];
    let r = dp
        .test_run(program, packet, Some(&mut out), 1)
        .unwrap_or_else(|e| panic!("test run of {program:?} on {packet:02x?}: {e:?}"));
    out.truncate(r.data_out_len);
    (r.verdict, out)
}

/// Asserts exactly these non-zero counters.
pub fn assert_counters(dp: &Datapath, program: Program, want: &[(Counter, u64)]) {
    let got = counters(dp, program);
    let want_named: Vec<_> = want.iter().map(|(c, v)| (c.name(), *v)).collect();
    assert_eq!(got.non_zero(), want_named, "{program:?} counters");
}

/// The datapath loaded with small maps (`ipcache` and `local` entries).
pub fn load(ipcache: u32, local: u32) -> Datapath {
    Datapath::load(&Config {
        ipcache_max_entries: ipcache,
        local_endpoints_max_entries: local,
        ..Config::default()
    })
    .expect("load datapath (needs root)")
}

/// Pod A's local endpoint (interface 41).
pub fn pod_a() -> EndpointInfo {
    EndpointInfo {
        ifindex: 41,
        identity: POD_A_IDENTITY,
        flags: 0,
        pod_mac: [0x02, 0, 0, 0, 0xa0, 0x01],
        host_mac: [0x02, 0, 0, 0, 0xa0, 0x02],
    }
}
