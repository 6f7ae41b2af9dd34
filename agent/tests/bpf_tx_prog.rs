//! BPF_PROG_TEST_RUN tests of VXLAN transmit in BPF (`tunnel_flags::BPF_TX`, encap.rs):
//! `from_pod` writes the outer headers itself. Checks the exact datagram (outer IPv4, UDP,
//! VXLAN, the inner frame), that `from_underlay` of the receiving node takes it as it takes
//! the VXLAN device's, and the fallback to the device for a packet too big for the underlay
//! MTU. Needs root. Each test runs on a thread in a network namespace of its own, whose
//! loopback (ifindex 1) plays the underlay interface: `bpf_check_mtu` reads its MTU, and the
//! test run's skb belongs to that namespace.
#![allow(unsafe_code)] // unshare has no safe std wrapper; SAFETY note below.

use std::net::Ipv4Addr;

use anyhow::{ensure, Result};
use clustermesh_agent::datapath::{Datapath, Program};
use clustermesh_ebpf_abi::{Counter, EndpointInfo, IpcacheValue, TraceSlot};

mod prog_common;
use prog_common::*;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 10);
/// The underlay interface in the test's namespace: its loopback.
const UNDERLAY_IFINDEX: u32 = 1;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet.
const ENCAP: usize = 50;

/// Runs `f` on a thread in a new network namespace whose loopback has MTU `mtu`.
fn in_new_netns<T: Send>(mtu: u32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: CLONE_NEWNET with unshare moves only this thread (the namespace goes
            // away with it).
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            ensure!(rc == 0, "unshare: {}", std::io::Error::last_os_error());
            // `ip` forks from this thread, so it runs in the new namespace.
            let out = std::process::Command::new("ip")
                .args(["link", "set", "lo", "mtu", &mtu.to_string(), "up"])
                .output()?;
            ensure!(
                out.status.success(),
                "ip link set lo mtu {mtu}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("test thread panicked"))?
    })
}

/// A node with pod A local, a remote pod behind REMOTE_NODE, BPF transmit on.
fn node(local: Ipv4Addr) -> Datapath {
    let mut dp = load(64, 16);
    let m = &mut dp.maps;
    m.local_endpoints
        .upsert_v4(POD_A, pod_a())
        .expect("upsert A");
    m.ipcache
        .upsert_v4(
            REMOTE_POD,
            32,
            IpcacheValue::tunnel_v4(REMOTE_POD_IDENTITY, REMOTE_NODE.octets()),
        )
        .expect("upsert remote");
    m.tunnel
        .set(VXLAN_IFINDEX, local, VXLAN_PORT)
        .expect("tunnel settings");
    m.tunnel
        .set_bpf_tx(Some((UNDERLAY_IFINDEX, VXLAN_PORT)))
        .expect("bpf transmit");
    dp
}

/// The pod's packet padded to `len` bytes of IPv4 (total length and frame agree).
fn padded(len: usize) -> Vec<u8> {
    let mut p = ipv4_packet(POD_A, REMOTE_POD);
    p.resize(14 + len, 0xab);
    p[16..18].copy_from_slice(&(len as u16).to_be_bytes());
    p
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// The one's-complement sum of a header with its checksum is 0xffff.
fn checksum_ok(h: &[u8]) -> bool {
    let mut sum: u32 = h.chunks(2).map(|w| u32::from(be16(w, 0))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn from_pod_encapsulates_vxlan_itself_with_exact_outer_headers() -> Result<()> {
    in_new_netns(1500, || {
        let mut dp = node(LOCAL_NODE);
        let packet = padded(200);
        let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
        assert_eq!(verdict, TC_ACT_REDIRECT, "redirected (to the underlay)");
        assert_eq!(
            out.len(),
            packet.len() + ENCAP,
            "50 bytes of VXLAN in front"
        );
        // Outer Ethernet: IPv4 (the addresses are bpf_redirect_neigh's to fill in).
        assert_eq!(be16(&out, 12), 0x0800);
        let ip = &out[14..34];
        assert_eq!(ip[0], 0x45, "IPv4 without options");
        assert_eq!(ip[1], 0, "no ECN inside, none outside");
        assert_eq!(
            usize::from(be16(ip, 2)),
            packet.len() - 14 + ENCAP,
            "outer total length"
        );
        assert_eq!(be16(ip, 4), 0, "ID 0");
        assert_eq!(be16(ip, 6), 0x4000, "DF, not a fragment");
        assert_eq!(ip[8], 64, "TTL");
        assert_eq!(ip[9], 17, "UDP");
        assert_eq!(ip[12..16], LOCAL_NODE.octets(), "from this node");
        assert_eq!(ip[16..20], REMOTE_NODE.octets(), "to the remote node");
        assert!(checksum_ok(ip), "outer IPv4 checksum: {ip:02x?}");
        let udp = &out[34..42];
        let sport = be16(udp, 0);
        assert!(
            (32_768..61_000).contains(&sport),
            "source port {sport} from the flow hash, in the kernel's local port range"
        );
        assert_eq!(be16(udp, 2), VXLAN_PORT, "the VXLAN port");
        assert_eq!(
            usize::from(be16(udp, 4)),
            packet.len() - 14 + ENCAP - 20,
            "UDP length"
        );
        assert_eq!(be16(udp, 6), 0, "no UDP checksum over IPv4");
        let vxlan = &out[42..50];
        let vni = POD_A_IDENTITY.to_be_bytes();
        assert_eq!(
            vxlan,
            [0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0],
            "I flag, VNI = the source pod's identity"
        );
        assert_eq!(out[50..], packet[..], "the pod's frame as the inner frame");
        assert_counters(
            &dp,
            Program::FromPod,
            &[
                (Counter::Packets, 1),
                (Counter::Tunnelled, 1),
                (Counter::TunnelledBpf, 1),
            ],
        );
        let traces = dp.maps.traces.read(TraceSlot::Egress)?;
        assert_eq!(traces.len(), 1, "{traces:?}");
        assert_eq!(traces[0].remote_ipv4, REMOTE_NODE.octets());
        assert_eq!(traces[0].vni, POD_A_IDENTITY);
        assert_eq!(traces[0].ifindex, UNDERLAY_IFINDEX, "to the underlay");

        // The same flow gets the same source port (receivers keep it on one queue); the
        // ECN bits of the inner header are copied, CE as ECT(0).
        let mut ce = packet.clone();
        ce[15] = 0x03;
        let (_, out_ce) = run(&mut dp, Program::FromPod, &ce);
        assert_eq!(out_ce[15], 0x02, "CE inside → ECT(0) outside");
        assert!(checksum_ok(&out_ce[14..34]));
        let (_, again) = run(&mut dp, Program::FromPod, &packet);
        assert_eq!(be16(&again, 34), sport, "stable source port per flow");

        // The receiving node's from_underlay decapsulates it like the device's datagrams:
        // REMOTE_NODE's view, with the remote pod local there.
        let mut rx = node(REMOTE_NODE);
        rx.maps.local_endpoints.upsert_v4(
            REMOTE_POD,
            EndpointInfo {
                ifindex: 51,
                identity: REMOTE_POD_IDENTITY,
                flags: 0,
                pod_mac: POD_B_MAC,
                host_mac: HOST_B_MAC,
            },
        )?;
        let (verdict, inner) = run(&mut rx, Program::FromUnderlay, &out);
        assert_eq!(verdict, TC_ACT_REDIRECT, "delivered by from_underlay");
        assert_eq!(inner[0..6], POD_B_MAC);
        assert_eq!(
            inner[14..],
            packet[14..],
            "the pod's IPv4 packet, unchanged"
        );
        let ingress = rx.maps.traces.read(TraceSlot::Ingress)?;
        assert_eq!(ingress.len(), 1, "{ingress:?}");
        assert_eq!(ingress[0].vni, POD_A_IDENTITY, "identity from the VNI");
        assert_eq!(ingress[0].remote_ipv4, LOCAL_NODE.octets());
        Ok(())
    })
}

/// A packet that would not fit the underlay once encapsulated goes through the VXLAN
/// device unchanged, which then does with it what it does today (fragment the outer
/// datagram, or report the path MTU to the pod when the inner packet says DF).
#[test]
fn a_packet_too_big_for_the_underlay_goes_through_the_vxlan_device() -> Result<()> {
    in_new_netns(1000, || {
        let mut dp = node(LOCAL_NODE);
        // 950 bytes of IPv4 + 50 = 1000: fits exactly.
        let fits = padded(950);
        let (verdict, out) = run(&mut dp, Program::FromPod, &fits);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out.len(), fits.len() + ENCAP, "encapsulated in BPF");
        // One byte more: the device's path, the packet untouched.
        let big = padded(951);
        let (verdict, out) = run(&mut dp, Program::FromPod, &big);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, big, "unchanged, for the VXLAN device");
        assert_counters(
            &dp,
            Program::FromPod,
            &[
                (Counter::Packets, 2),
                (Counter::Tunnelled, 2),
                (Counter::TunnelledBpf, 1),
                (Counter::BpfTxFallback, 1),
            ],
        );
        let traces = dp.maps.traces.read(TraceSlot::Egress)?;
        assert_eq!(traces[0].ifindex, VXLAN_IFINDEX, "last one: the device");
        assert_eq!(traces[0].vni, POD_A_IDENTITY);
        Ok(())
    })
}

/// Turning BPF transmit off brings back the device path for every packet.
#[test]
fn without_bpf_transmit_the_device_sends() -> Result<()> {
    in_new_netns(1500, || {
        let mut dp = node(LOCAL_NODE);
        dp.maps.tunnel.set_bpf_tx(None)?;
        let packet = padded(200);
        let (verdict, out) = run(&mut dp, Program::FromPod, &packet);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, packet);
        assert_counters(
            &dp,
            Program::FromPod,
            &[(Counter::Packets, 1), (Counter::Tunnelled, 1)],
        );
        Ok(())
    })
}

/// Cost of the tunnel path per packet, device vs BPF transmit (printed; benchmarks are
/// in the tests crate). Single runs on fresh copies: BPF_PROG_TEST_RUN repeats on one skb,
/// which would grow by 50 bytes per repeat.
#[test]
fn per_packet_cost_of_both_transmit_paths() -> Result<()> {
    in_new_netns(1500, || {
        let mut dp = node(LOCAL_NODE);
        let packet = padded(200);
        let bpf = dp.test_run_fresh(Program::FromPod, &packet, 5_000)?;
        dp.maps.tunnel.set_bpf_tx(None)?;
        let device = dp.test_run_fresh(Program::FromPod, &packet, 5_000)?;
        println!(
            "from_pod tunnel, BPF encapsulation: {} ns/packet; device path: {} ns/packet \
             (the device's own transmit work is not in the latter)",
            bpf.duration.as_nanos(),
            device.duration.as_nanos()
        );
        assert_eq!(bpf.verdict, TC_ACT_REDIRECT);
        assert_eq!(device.verdict, TC_ACT_REDIRECT);
        Ok(())
    })
}

/// The agent turns `from_underlay`'s decapsulation off with port 0 in the tunnel settings
/// (`--underlay-dev off`); BPF transmit still sends to the VXLAN port (a kernel VXLAN
/// receiver answered datagrams to port 0 with "port unreachable" before it had its own).
#[test]
fn transmit_uses_its_own_port_when_decapsulation_is_off() -> Result<()> {
    in_new_netns(1500, || {
        let mut dp = node(LOCAL_NODE);
        dp.maps.tunnel.set(VXLAN_IFINDEX, LOCAL_NODE, 0)?;
        dp.maps
            .tunnel
            .set_bpf_tx(Some((UNDERLAY_IFINDEX, VXLAN_PORT)))?;
        let (verdict, out) = run(&mut dp, Program::FromPod, &padded(100));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(be16(&out, 36), VXLAN_PORT, "UDP destination port");
        Ok(())
    })
}
