//! `bench-policy`: per-packet cost of the policy step (BPF_PROG_TEST_RUN, kernel mean) with
//! 10 and 10k identities in the policy map, and the flow-event rate the agent sustains
//! (ring buffer → decode → enrich → store) beside the raw ring-buffer read rate, measured
//! in the same run. Needs root.

use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clustermesh_agent::datapath::{Config, Datapath, Program};
use clustermesh_agent::flows::{self, Directory, FlowMaps, Store};
use clustermesh_agent::policy::maps::PolicyMaps;
use clustermesh_agent::policy::{Changes, Direction, Entry};
use clustermesh_ebpf_abi::{flow_flags, EndpointInfo, IpcacheValue};

const SRC: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
const DST: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 10);
const ID_SRC: u32 = 70_000;
const ID_DST: u32 = 70_001;
const ID_REMOTE: u32 = 80_000;
const REPEAT: u32 = 200_000;

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[2, 0, 0, 0, 1, 41, 2, 0, 0, 0, 0, 41, 8, 0, 0x45, 0, 0, 40]);
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

fn ep(ifindex: u32, identity: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        identity,
        flags: 0,
        pod_mac: [2, 0, 0, 0, 0, ifindex as u8],
        host_mac: [2, 0, 0, 0, 1, ifindex as u8],
    }
}

fn load() -> anyhow::Result<(Datapath, PolicyMaps, FlowMaps)> {
    let mut dp = Datapath::load(&Config {
        ipcache_max_entries: 1 << 16,
        local_endpoints_max_entries: 64,
        ..Config::default()
    })
    .context("load the datapath (root?)")?;
    dp.maps.local_endpoints.upsert_v4(SRC, ep(41, ID_SRC))?;
    dp.maps.local_endpoints.upsert_v4(DST, ep(42, ID_DST))?;
    dp.maps.ipcache.upsert_v4(
        REMOTE,
        32,
        IpcacheValue::tunnel_v4(ID_REMOTE, [198, 18, 2, 11]),
    )?;
    dp.maps
        .tunnel
        .set(77, Ipv4Addr::new(198, 18, 1, 11), 4789)?;
    let p = PolicyMaps::take(&mut dp)?;
    let f = FlowMaps::take(&mut dp)?;
    Ok((dp, p, f))
}

/// Policy with `n` allowed peer identities for both endpoints in both directions, the
/// measured peers among them.
fn policy(n: u32) -> Changes {
    let mut c = Changes::default();
    for subject in [ID_SRC, ID_DST] {
        for i in 0..n {
            let peer = match i {
                0 => ID_SRC,
                1 => ID_DST,
                2 => ID_REMOTE,
                _ => 100_000 + i,
            };
            for direction in [Direction::Ingress, Direction::Egress] {
                c.upsert.push(Entry {
                    subject,
                    peer,
                    direction,
                    proto: 6,
                    port: 8080,
                });
            }
        }
        c.enforce.push((subject, 3));
    }
    c
}

fn cost(dp: &mut Datapath, program: Program, packet: &[u8]) -> anyhow::Result<(u32, Duration)> {
    let r = dp.test_run(program, packet, None, REPEAT)?;
    Ok((r.verdict, r.duration))
}

fn main() -> anyhow::Result<()> {
    println!("# per-packet cost (BPF_PROG_TEST_RUN, kernel mean of {REPEAT} runs); flow events: drops only");
    println!(
        "{:<12} {:<34} {:>8} {:>10}",
        "identities", "case", "verdict", "ns/packet"
    );
    let cases: [(&str, Program, Vec<u8>); 4] = [
        (
            "from_pod local, allowed (L3L4)",
            Program::FromPod,
            tcp(SRC, DST, 8080, 0x10),
        ),
        (
            "from_pod local, denied",
            Program::FromPod,
            tcp(SRC, DST, 9090, 0x10),
        ),
        (
            "from_pod tunnel, allowed",
            Program::FromPod,
            tcp(SRC, REMOTE, 8080, 0x10),
        ),
        (
            "from_overlay, denied (id 0)",
            Program::FromOverlay,
            tcp(REMOTE, DST, 8080, 0x10),
        ),
    ];
    for n in [0u32, 10, 10_000] {
        let (mut dp, mut pm, mut fm) = load()?;
        fm.set_flags(flow_flags::DROPS_ONLY)?;
        if n > 0 {
            pm.apply(&policy(n))?;
        }
        for (name, program, packet) in &cases {
            let (v, d) = cost(&mut dp, *program, packet)?;
            // Drop events must not accumulate across cases.
            fm.drain(|_| {});
            let label = if n == 0 {
                "no policy".to_owned()
            } else {
                n.to_string()
            };
            println!("{label:<12} {name:<34} {v:>8} {:>10}", d.as_nanos());
        }
    }

    // Flow events: the raw ring read rate and the agent's full path, same run, same ring.
    println!(
        "\n# flow events (ring buffer {} MiB, 48-byte events)",
        clustermesh_ebpf_abi::policy_map::FLOWS_BYTES >> 20
    );
    let (mut dp, pm, mut fm) = load()?;
    fm.set_flags(flow_flags::ALL_FORWARDED)?;
    let pkt = tcp(SRC, DST, 8080, 0x10);
    let batch = 50_000;
    // Raw: fill, then time the drain alone.
    dp.test_run(Program::FromPod, &pkt, None, batch)?;
    let t = Instant::now();
    let raw = fm.drain(|_| {});
    let raw_rate = raw as f64 / t.elapsed().as_secs_f64();
    // Agent path: fill, then decode + enrich + store.
    let store = Store::new(flows::DEFAULT_CAPACITY, "bench");
    let mut dir = Directory::default();
    for (id, app) in [(ID_SRC, "frontend"), (ID_DST, "backend")] {
        dir.set_identity(&Arc::from("c1"), id, Some(vec![format!("k8s:app={app}")]));
    }
    let offset = flows::monotonic_offset_ns();
    dp.test_run(Program::FromPod, &pkt, None, batch)?;
    let t = Instant::now();
    let mut n = 0;
    fm.drain(|ev| {
        store.push(flows::enrich(ev, &dir, offset, "bench"));
        n += 1;
    });
    let agent_rate = n as f64 / t.elapsed().as_secs_f64();

    println!(
        "{:<44} {:>14}",
        "raw ring-buffer read (drain only)",
        format!("{raw_rate:.0} ev/s")
    );
    println!(
        "{:<44} {:>14}",
        "agent path (decode+enrich+store), batch",
        format!("{agent_rate:.0} ev/s")
    );

    // Sustained: the real async reader running while this thread emits at a paced rate
    // through BPF_PROG_TEST_RUN; lost = the kernel's counter. Highest lossless rate wins.
    let directory = Arc::new(RwLock::new(dir));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut fm = Some(fm);
    let mut best = 0.0f64;
    for rate in [100_000u64, 200_000, 300_000, 400_000, 500_000, 0] {
        let before = pm.verdicts()?;
        let store = Store::new(flows::DEFAULT_CAPACITY, "bench");
        let token = tokio_util::sync::CancellationToken::new();
        let maps = fm.take().context("flow maps")?;
        let reader = rt.spawn(maps.run(store.clone(), directory.clone(), token.clone()));
        let duration = Duration::from_secs(1);
        let chunk = 1_000u32;
        let started = Instant::now();
        let mut produced = 0u64;
        while started.elapsed() < duration {
            dp.test_run(Program::FromPod, &pkt, None, chunk)?;
            produced += u64::from(chunk);
            if rate > 0 {
                let due = Duration::from_secs_f64(produced as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        token.cancel();
        fm = Some(rt.block_on(reader)??);
        let after = pm.verdicts()?;
        let emitted = after.flows_emitted - before.flows_emitted;
        let lost = after.flows_lost - before.flows_lost;
        let offered = (emitted + lost) as f64 / secs;
        if lost == 0 {
            best = best.max(offered);
        }
        println!(
            "{:<44} {:>14}   received {} lost {lost}",
            format!(
                "async reader, offered {}",
                if rate == 0 {
                    "unpaced".to_owned()
                } else {
                    format!("{rate} ev/s")
                }
            ),
            format!("{:.0} ev/s", store.seen() as f64 / secs),
            store.seen(),
        );
    }
    println!(
        "agent sustains {best:.0} ev/s without loss (raw ring read {raw_rate:.0} ev/s, same run)"
    );
    Ok(())
}
