//! `bench-maps`: the agent's map reconcile rate for 250k ipcache entries, beside raw
//! batched `bpf()` updates of the same entries into a fresh map in the same run (and raw
//! single-element updates for scale); then a resync of unchanged input, 1% churn, restart
//! adoption of the pinned map; then the per-packet cost of each program with
//! BPF_PROG_TEST_RUN on the filled maps, IPv4 and IPv6 paths side by side; then 250k IPv6
//! entries reconciled beside raw batched updates of the same entries. Needs root.
//!
//! `--profile 1m` (issue 18): 1M entries; the resync of unchanged input is printed beside one
//! full dump of the map, and the tunnel path's per-packet cost with 1M entries beside the
//! same with 250k, both in this run, interleaved in pairs (median of the per-pair ratios, their
//! spread printed); then the same with destinations spread over each map (cache misses), printed
//! beside it. `BENCH_ENTRIES` overrides the entry count.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use clustermesh_agent::datapath::{self, batch, Config, Datapath, Program};
use clustermesh_agent::input::Input;
use clustermesh_agent::kernel;
use clustermesh_agent::reconcile::{claim, claim6, Reconciler, Underlay};
use clustermesh_ebpf_abi::{defaults, EndpointInfo, IpcacheLpmKey, IpcacheValue};
use clustermesh_types::model::{IpIdentityPair, IpcacheEntry};

const LOCAL: &str = "c1";
const REMOTE: &str = "c2";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 11);
const REMOTE_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 11);
const TARGET: f64 = 500_000.0;
/// Reconcile ÷ raw batched updates of the same entries (issue 12, issue 18 item 2).
const RATIO: f64 = 0.8;
/// The same for IPv6 entries (issue 16).
const RATIO6: f64 = 0.7;

/// A fixed target's line: printed beside the verdict, never instead of it.
fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// IPv6 entry `i`: a pod of c2 in `fd00:16::/64`, tunnelled to an IPv4 node.
fn pair6(i: u32) -> IpcacheEntry {
    let ip =
        Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x16, 0, 0, 0, 0, 0, 0)) + u128::from(i));
    let pair = IpIdentityPair {
        ip: ip.to_string().into(),
        host_ip: format!("198.18.2.{}", 10 + i % 200).into(),
        id: (2 << 16) + 1 + i % 60_000,
        k8s_namespace: "default".into(),
        k8s_pod_name: format!("pod6-{i}").into(),
        ..IpIdentityPair::default()
    };
    IpcacheEntry::new(pair).expect("a valid entry")
}

/// Entry `i` as validation hands it on (addresses parsed).
fn pair(i: u32, id_shift: u32) -> IpcacheEntry {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i);
    let pair = IpIdentityPair {
        ip: ip.to_string().into(),
        host_ip: format!("198.18.2.{}", 10 + i % 200).into(),
        id: (2 << 16) + 1 + (i + id_shift) % 60_000,
        k8s_namespace: "default".into(),
        k8s_pod_name: format!("pod-{i}").into(),
        ..IpIdentityPair::default()
    };
    IpcacheEntry::new(pair).expect("a valid entry")
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The agent's reconciler on `dp`, for this node (it adopts what the maps hold).
fn reconciler(dp: Datapath) -> anyhow::Result<Reconciler> {
    Ok(Reconciler::new(
        dp,
        Arc::from(LOCAL),
        NODE_IP,
        defaults::IPCACHE_MAX_ENTRIES,
        1024,
    )?)
}

/// A reconciler on `dp` (this node at [`NODE_IP`], and `node_ip6`) fed every one of `first`
/// and flushed; with the time that took (wall, CPU).
fn reconcile_from_empty(
    dp: Datapath,
    first: Vec<Input>,
    node_ip6: Option<Ipv6Addr>,
) -> anyhow::Result<(Reconciler, (Duration, Duration))> {
    let mut rec = reconciler(dp)?;
    if node_ip6.is_some() {
        rec.set_node_ip6(node_ip6);
    }
    let t = Timer::start();
    for i in first {
        rec.handle(i);
    }
    rec.flush();
    Ok((rec, t.stop()))
}

fn load(pin_dir: Option<std::path::PathBuf>) -> anyhow::Result<Datapath> {
    Ok(Datapath::load(&Config {
        pin_dir,
        ipcache_max_entries: defaults::IPCACHE_MAX_ENTRIES,
        local_endpoints_max_entries: 1024,
        ..Config::default()
    })?)
}

/// CPU time of this thread (user + system, so syscalls count): the machine this runs on
/// is shared, and wall time includes waiting for a core.
fn cpu_now() -> Duration {
    // SAFETY: an all-zero timespec is a valid out-buffer.
    #[allow(unsafe_code)]
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is writable; the clock ID is valid.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts)
    };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time of `f`.
struct Timer(Instant, Duration);

impl Timer {
    fn start() -> Self {
        Self(Instant::now(), cpu_now())
    }

    fn stop(&self) -> (Duration, Duration) {
        (self.0.elapsed(), cpu_now() - self.1)
    }
}

fn line(what: &str, n: usize, (wall, cpu): (Duration, Duration)) {
    println!(
        "  {what:<44} {:>8.1} ms {:>7.0}k/s wall | {:>8.1} ms {:>7.0}k/s cpu",
        wall.as_secs_f64() * 1e3,
        rate(n, wall) / 1e3,
        cpu.as_secs_f64() * 1e3,
        rate(n, cpu) / 1e3
    );
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let one_m = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => false,
        ["--profile", "250k"] => false,
        ["--profile", "1m"] => true,
        other => {
            anyhow::bail!("unknown arguments {other:?}; usage: bench-maps [--profile 250k|1m]")
        }
    };
    let n: u32 = std::env::var("BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if one_m { 1_000_000 } else { 250_000 });
    let bpffs = tempfile::tempdir()?;
    kernel::check(bpffs.path()).context("kernel check (run as root)")?;
    let result = run(n, one_m, bpffs.path());
    if let Ok(c) = std::ffi::CString::new(bpffs.path().as_os_str().as_encoded_bytes()) {
        // SAFETY: unmounting the private bpffs `kernel::check` mounted above.
        #[allow(unsafe_code)]
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH)
        };
    }
    result
}

fn run(n: u32, one_m: bool, bpffs: &std::path::Path) -> anyhow::Result<()> {
    let cluster: Arc<str> = Arc::from(REMOTE);
    let pairs: Vec<Arc<IpcacheEntry>> = (0..n).map(|i| Arc::new(pair(i, 0))).collect();
    let inputs = |pairs: &[Arc<IpcacheEntry>]| -> Vec<Input> {
        pairs
            .iter()
            .map(|p| Input::Endpoint {
                cluster: cluster.clone(),
                prefix: p.prefix,
                entry: Some(p.clone()),
            })
            .collect()
    };
    let (keys, values): (Vec<IpcacheLpmKey>, Vec<IpcacheValue>) = pairs
        .iter()
        .map(|p| {
            let (prefix, c) = claim(LOCAL, NODE_IP, REMOTE, p).expect("ipv4");
            (prefix.lpm_key(), c.value)
        })
        .unzip();
    println!(
        "map reconcile: {n} ipcache entries into a fresh LPM trie (max {}), same entries each row",
        defaults::IPCACHE_MAX_ENTRIES
    );

    // Baseline 1: raw BPF_MAP_UPDATE_BATCH, all entries in one syscall.
    let dp = load(None)?;
    let t = Timer::start();
    batch::update(dp.maps.ipcache.fd(), &keys, &values)
        .map_err(|e| anyhow::anyhow!("batch update after {}: {}", e.done, e.error))?;
    let raw_batch = t.stop();
    line(
        "raw bpf(BPF_MAP_UPDATE_BATCH), 1 syscall",
        n as usize,
        raw_batch,
    );
    drop(dp);

    // Baseline 2: raw single-element bpf() updates.
    let mut dp = load(None)?;
    let t = Timer::start();
    for (p, v) in pairs.iter().zip(&values) {
        let ip: Ipv4Addr = p.ip.parse()?;
        dp.maps.ipcache.upsert_v4(ip, 32, *v)?; // BPF_MAP_UPDATE_ELEM
    }
    let raw_single = t.stop();
    line(
        "raw bpf(BPF_MAP_UPDATE_ELEM) per element",
        n as usize,
        raw_single,
    );
    ensure!(
        dp.maps.ipcache.entries()?.len() == n as usize,
        "baseline incomplete"
    );
    let _ = dp.maps.ipcache.delete_batch(&keys)?;
    drop(dp);

    // The agent's path: inputs → desired state → diff → batched writes, into pinned maps.
    let pin_dir = bpffs.join("bench");
    let (mut rec, reconcile) =
        reconcile_from_empty(load(Some(pin_dir.clone()))?, inputs(&pairs), None)?;
    let report = rec.report();
    ensure!(report.ipcache.entries == n as usize, "reconcile incomplete");
    ensure!(report.stats.errors == 0, "map errors: {:?}", report.stats);
    line(
        "agent reconcile (diff + batched), from empty",
        n as usize,
        reconcile,
    );
    for (what, pick) in [
        (
            "wall",
            (|t: (Duration, Duration)| t.0) as fn((Duration, Duration)) -> Duration,
        ),
        ("cpu", |t: (Duration, Duration)| t.1),
    ] {
        let r = rate(n as usize, pick(reconcile));
        let ratio = r / rate(n as usize, pick(raw_batch));
        println!(
            "  → {what}: {:.0}k entries/s = {ratio:.2} × raw batched (target ≥ {RATIO}: {}), {:.1} × raw per element; fixed target ≥ 500k/s (printed, not the verdict): {}",
            r / 1e3,
            verdict(ratio >= RATIO),
            r / rate(n as usize, pick(raw_single)),
            met(r >= TARGET)
        );
    }

    // Resync with unchanged input (a relist after a reconnect): nothing is written.
    let again = inputs(&pairs);
    let before = rec.report().stats.ipcache_upserts;
    let t = Timer::start();
    for i in again {
        rec.handle(i);
    }
    rec.flush();
    let resync = t.stop();
    let written = rec.report().stats.ipcache_upserts - before;
    line(
        &format!("resync of unchanged input ({written} writes)"),
        n as usize,
        resync,
    );
    let t = Timer::start();
    let dumped = rec.datapath_ref().maps.ipcache.entries()?.len();
    let dump = t.stop();
    ensure!(dumped == n as usize, "dump read {dumped} of {n}");
    line(
        "baseline: one full dump of the map (batched)",
        n as usize,
        dump,
    );
    // A resync of unchanged input writes nothing: it must cost well under reading the map
    // once (the verdict); the fixed 100 ms is printed beside it.
    let resync_ratio = resync.0.as_secs_f64() / dump.0.as_secs_f64().max(1e-9);
    println!(
        "  → resync {:.1} ms wall beside a dump's {:.1} ms = {resync_ratio:.2} × (target ≤ 0.25: {}); fixed target < 100 ms (printed, not the verdict): {}",
        resync.0.as_secs_f64() * 1e3,
        dump.0.as_secs_f64() * 1e3,
        verdict(resync_ratio <= 0.25),
        met(resync.0 < Duration::from_millis(100))
    );

    // 1% churn: identities change.
    let churn: Vec<Arc<IpcacheEntry>> = (0..n).step_by(100).map(|i| Arc::new(pair(i, 7))).collect();
    let changes = churn.len();
    let t = Timer::start();
    for i in inputs(&churn) {
        rec.handle(i);
    }
    rec.flush();
    line(
        &format!("churn: {changes} changed entries"),
        changes,
        t.stop(),
    );

    // Restart: a new agent adopts the pinned map (walks it) and writes nothing.
    drop(rec);
    let t = Timer::start();
    let dp = load(Some(pin_dir.clone()))?;
    let mut rec = reconciler(dp)?;
    let adopt = t.stop();
    line("restart: load + adopt the pinned map", n as usize, adopt);

    // Per-packet cost on the filled maps.
    let dp = rec.datapath();
    let remote = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + n / 2);
    let remote_node = Ipv4Addr::new(198, 18, 2, 11);
    let src = Ipv4Addr::new(10, 1, 1, 11);
    let dst_local = Ipv4Addr::new(10, 1, 1, 12);
    node_setup(dp)?;
    println!(
        "per-packet cost (BPF_PROG_TEST_RUN, kernel mean over 200k runs, ipcache holding {n} entries):"
    );
    for (what, program, s, d) in [
        ("from_pod → local pod", Program::FromPod, src, dst_local),
        (
            "from_pod → tunnel (remote cluster)",
            Program::FromPod,
            src,
            remote,
        ),
        (
            "from_pod → ipcache miss (stack)",
            Program::FromPod,
            src,
            Ipv4Addr::new(192, 0, 2, 1),
        ),
        (
            "from_overlay → local pod",
            Program::FromOverlay,
            remote,
            dst_local,
        ),
    ] {
        let r = dp.test_run(program, &packet(s, d), None, 200_000)?;
        println!(
            "  {what:<44} {:>6} ns/packet (verdict {})",
            r.duration.as_nanos(),
            r.verdict
        );
    }
    // Decapsulation changes the packet, so every run needs a fresh one (single runs: the
    // kernel's per-run clock reads are in these figures, ~20-40 ns).
    let from_remote_node = vxlan(remote_node, NODE_IP, 65_539, &packet(remote, dst_local));
    for (what, frame) in [
        ("from_underlay → decap → local pod", &from_remote_node),
        (
            "from_underlay → not tunnelled (stack)",
            &packet(remote_node, NODE_IP),
        ),
    ] {
        let r = dp.test_run_fresh(Program::FromUnderlay, frame, 20_000)?;
        println!(
            "  {what:<44} {:>6} ns/packet (verdict {}, mean of 20k single runs)",
            r.duration.as_nanos(),
            r.verdict
        );
    }

    // The IPv6 paths on the same maps (issue 16): two remote IPv6 pods, one behind an IPv4
    // node, one behind an IPv6 node, beside the n IPv4 entries.
    let remote6 = Ipv6Addr::new(0xfd00, 0x17, 0, 0, 0, 0, 0, 0x10);
    let remote6_v6_node = Ipv6Addr::new(0xfd00, 0x17, 0, 0, 0, 0, 0, 0x11);
    dp.maps.ipcache.upsert_v6(
        remote6,
        128,
        IpcacheValue::tunnel_v4(131_073, remote_node.octets()),
    )?;
    dp.maps.ipcache.upsert_v6(
        remote6_v6_node,
        128,
        IpcacheValue::tunnel_v6(131_073, REMOTE_NODE6.octets()),
    )?;
    println!("per-packet cost of the IPv6 paths (same maps, same method):");
    for (what, s6, d6) in [
        ("from_pod v6 → local pod", POD6_A, POD6_B),
        ("from_pod v6 → tunnel, IPv4 underlay", POD6_A, remote6),
        (
            "from_pod v6 → tunnel, IPv6 underlay",
            POD6_A,
            remote6_v6_node,
        ),
    ] {
        let r = dp.test_run(Program::FromPod, &packet6(s6, d6), None, 200_000)?;
        println!(
            "  {what:<44} {:>6} ns/packet (verdict {})",
            r.duration.as_nanos(),
            r.verdict
        );
    }
    for (what, frame) in [
        (
            "from_underlay → decap v6 in IPv4 → local pod",
            vxlan(remote_node, NODE_IP, 65_539, &packet6(remote6, POD6_B)),
        ),
        (
            "from_underlay → decap v6 in IPv6 → local pod",
            vxlan6(
                REMOTE_NODE6,
                NODE_IP6,
                65_539,
                &packet6(remote6_v6_node, POD6_B),
            ),
        ),
    ] {
        let r = dp.test_run_fresh(Program::FromUnderlay, &frame, 20_000)?;
        println!(
            "  {what:<44} {:>6} ns/packet (verdict {}, mean of 20k single runs)",
            r.duration.as_nanos(),
            r.verdict
        );
    }

    if one_m {
        // The tunnel path with 250k entries, in this run, beside the same with n: a map
        // with the first 250k of the same entries, the same node settings, the same lookup
        // (an address in the middle of what it holds). Interleaved (below).
        let small = 250_000.min(n);
        let mut dp250 = load(None)?;
        batch::update(
            dp250.maps.ipcache.fd(),
            &keys[..small as usize],
            &values[..small as usize],
        )
        .map_err(|e| anyhow::anyhow!("batch update after {}: {}", e.done, e.error))?;
        node_setup(&mut dp250)?;
        let remote250 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + small / 2);
        // Interleaved: pair i runs the n-entry map and the 250k map back to back (the order
        // alternating, so a drift of the machine's speed favours neither), and the verdict is
        // the median of the per-pair ratios. Two separate blocks of runs moved by ±10% from
        // one run of the bench to the next on a shared machine.
        let mut hot = Pairs::default();
        for i in 0..PAIRS {
            let mut big = || -> anyhow::Result<u128> {
                let r = rec.datapath().test_run(
                    Program::FromPod,
                    &packet(src, remote),
                    None,
                    PAIR_REPEAT,
                )?;
                Ok(r.duration.as_nanos())
            };
            let (a, b) = if i % 2 == 0 {
                let a = big()?;
                let b = dp250
                    .test_run(Program::FromPod, &packet(src, remote250), None, PAIR_REPEAT)?
                    .duration
                    .as_nanos();
                (a, b)
            } else {
                let b = dp250
                    .test_run(Program::FromPod, &packet(src, remote250), None, PAIR_REPEAT)?
                    .duration
                    .as_nanos();
                (big()?, b)
            };
            hot.push(a, b);
        }
        let ratio = hot.median_ratio();
        println!(
            "  from_pod → tunnel, one destination repeated ({PAIRS} interleaved pairs of {PAIR_REPEAT} runs): {n} entries {} ns beside {small} entries {} ns (medians); per-pair ratio median {ratio:.3} × (spread {}); target ≤ 1.10: {}",
            hot.median_a(),
            hot.median_b(),
            hot.spread(),
            verdict(ratio <= 1.10)
        );
        // Many destinations: each single run looks up another address spread over the whole
        // map, so the trie walk leaves the cache as real traffic to many pods does (the
        // repeated one above keeps its path hot). Printed beside the verdict, not instead.
        let mut cold = Pairs::default();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u32| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % u64::from(m)) as u32
        };
        for i in 0..PAIRS {
            let dsts_big: Vec<Ipv4Addr> = (0..SPREAD_RUNS)
                .map(|_| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + next(n)))
                .collect();
            let dsts_small: Vec<Ipv4Addr> = (0..SPREAD_RUNS)
                .map(|_| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + next(small)))
                .collect();
            let spread = |dp: &mut Datapath, dsts: &[Ipv4Addr]| -> anyhow::Result<u128> {
                let mut total = 0u128;
                for d in dsts {
                    total += dp
                        .test_run(Program::FromPod, &packet(src, *d), None, 1)?
                        .duration
                        .as_nanos();
                }
                Ok(total / dsts.len() as u128)
            };
            let (a, b) = if i % 2 == 0 {
                let a = spread(rec.datapath(), &dsts_big)?;
                (a, spread(&mut dp250, &dsts_small)?)
            } else {
                let b = spread(&mut dp250, &dsts_small)?;
                (spread(rec.datapath(), &dsts_big)?, b)
            };
            cold.push(a, b);
        }
        println!(
            "  from_pod → tunnel, {SPREAD_RUNS} destinations spread over the map per sample (single runs, each with the kernel's clock reads; {PAIRS} interleaved pairs): {n} entries {} ns beside {small} entries {} ns (medians); per-pair ratio median {:.3} × (spread {}) (printed, not the verdict)",
            cold.median_a(),
            cold.median_b(),
            cold.median_ratio(),
            cold.spread()
        );
        drop(dp250);
    }
    drop(rec);
    datapath::cleanup(&pin_dir)?;

    // 250k IPv6 entries (issue 16): the agent's path beside raw batched updates of the same.
    let n6 = 250_000u32.min(n);
    let pairs6: Vec<Arc<IpcacheEntry>> = (0..n6).map(|i| Arc::new(pair6(i))).collect();
    let underlay = Underlay {
        v4: NODE_IP,
        v6: Some(NODE_IP6),
    };
    let (keys6, values6): (Vec<IpcacheLpmKey>, Vec<IpcacheValue>) = pairs6
        .iter()
        .map(|p| {
            let (prefix, c) = claim6(false, underlay, p).expect("ipv6");
            (prefix.lpm_key(), c.value)
        })
        .unzip();
    println!(
        "map reconcile: {n6} IPv6 ipcache entries into a fresh LPM trie ({ROUNDS6} rounds, the two in alternating order, medians)"
    );
    let raw_once = || -> anyhow::Result<(Duration, Duration)> {
        let dp = load(None)?;
        let t = Timer::start();
        batch::update(dp.maps.ipcache.fd(), &keys6, &values6)
            .map_err(|e| anyhow::anyhow!("batch update after {}: {}", e.done, e.error))?;
        Ok(t.stop())
    };
    let agent_once = || -> anyhow::Result<(Duration, Duration)> {
        let (rec, took) = reconcile_from_empty(load(None)?, inputs(&pairs6), Some(NODE_IP6))?;
        let report = rec.report();
        ensure!(
            report.ipv6.ipcache_entries == n6 as usize,
            "IPv6 reconcile incomplete: {}",
            report.ipv6.ipcache_entries
        );
        ensure!(report.stats.errors == 0, "map errors: {:?}", report.stats);
        Ok(took)
    };
    // One pair of single runs swung from 0.63× to 1.12× between two runs of the 1M profile
    // (session 8): a fresh trie's inserts cost more or less depending on what the kernel
    // is still freeing from the maps before it. Alternating rounds and medians keep that
    // out of the verdict.
    let (mut raws, mut recs) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS6 {
        if round % 2 == 0 {
            raws.push(raw_once()?);
            recs.push(agent_once()?);
        } else {
            recs.push(agent_once()?);
            raws.push(raw_once()?);
        }
    }
    let median = |v: &mut Vec<(Duration, Duration)>| {
        let mut wall: Vec<Duration> = v.iter().map(|x| x.0).collect();
        let mut cpu: Vec<Duration> = v.iter().map(|x| x.1).collect();
        wall.sort();
        cpu.sort();
        (wall[wall.len() / 2], cpu[cpu.len() / 2])
    };
    let raw6 = median(&mut raws);
    let reconcile6 = median(&mut recs);
    line("raw bpf(BPF_MAP_UPDATE_BATCH), IPv6", n6 as usize, raw6);
    line("agent reconcile, IPv6, from empty", n6 as usize, reconcile6);
    for (what, a, b) in [
        ("wall", reconcile6.0, raw6.0),
        ("cpu", reconcile6.1, raw6.1),
    ] {
        let ratio = b.as_secs_f64() / a.as_secs_f64();
        println!(
            "  → {what}: {:.0}k entries/s = {ratio:.2} × raw batched; target ≥ {RATIO6}: {}",
            rate(n6 as usize, a) / 1e3,
            verdict(ratio >= RATIO6)
        );
    }
    Ok(())
}

/// Rounds of the IPv6 reconcile comparison.
const ROUNDS6: usize = 3;

/// Interleaved pairs of the 1M profile's per-packet comparison.
const PAIRS: usize = 21;
/// Runs per sample of the repeated-destination comparison (kernel mean over them).
const PAIR_REPEAT: u32 = 50_000;
/// Single runs per sample of the spread-destinations comparison.
const SPREAD_RUNS: usize = 2_000;

/// Samples of two configurations taken in pairs: (a, b) ns per packet.
#[derive(Default)]
struct Pairs(Vec<(u128, u128)>);

impl Pairs {
    fn push(&mut self, a: u128, b: u128) {
        self.0.push((a, b));
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn ratios(&self) -> Vec<f64> {
        self.0
            .iter()
            .map(|&(a, b)| a as f64 / (b as f64).max(1.0))
            .collect()
    }

    fn median_ratio(&self) -> f64 {
        Self::median(self.ratios())
    }

    fn median_a(&self) -> f64 {
        Self::median(self.0.iter().map(|p| p.0 as f64).collect())
    }

    fn median_b(&self) -> f64 {
        Self::median(self.0.iter().map(|p| p.1 as f64).collect())
    }

    /// Min, quartiles and max of the per-pair ratios.
    fn spread(&self) -> String {
        let mut r = self.ratios();
        r.sort_by(f64::total_cmp);
        let q = |p: f64| r[((r.len() - 1) as f64 * p).round() as usize];
        format!(
            "min {:.3}, quartiles {:.3}–{:.3}, max {:.3}",
            q(0.0),
            q(0.25),
            q(0.75),
            q(1.0)
        )
    }
}

const POD6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x11);
const POD6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x12);

/// This node's two local pods (IPv4 and IPv6 addresses) and tunnel settings of both
/// families.
fn node_setup(dp: &mut Datapath) -> anyhow::Result<()> {
    let src = Ipv4Addr::new(10, 1, 1, 11);
    let dst_local = Ipv4Addr::new(10, 1, 1, 12);
    for ((ip, ip6), identity, ifindex) in [
        ((src, POD6_A), 65_537, 41),
        ((dst_local, POD6_B), 65_538, 42),
    ] {
        let info = EndpointInfo {
            ifindex,
            identity,
            flags: 0,
            pod_mac: pod_mac(ip),
            host_mac: [0x02, 0, 0, 0, 0, ifindex as u8],
        };
        dp.maps.local_endpoints.upsert_v4(ip, info)?;
        dp.maps.local_endpoints.upsert_v6(ip6, info)?;
    }
    dp.maps
        .tunnel
        .set_dual(77, Some(NODE_IP), Some(NODE_IP6), 4789)?;
    Ok(())
}

/// `inner` in VXLAN over IPv6 from `src` to `dst`:4789 with VNI `vni`.
fn vxlan6(src: Ipv6Addr, dst: Ipv6Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(70 + inner.len());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    let udp_len = (16 + inner.len()) as u16;
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0xc8, 0x22, 0x12, 0xb5]); // 51234 → 4789
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    p.extend_from_slice(&vni.to_be_bytes()[1..]);
    p.push(0);
    p.extend_from_slice(inner);
    p
}

/// Ethernet + IPv6 + an ICMPv6 echo request.
fn packet6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(62);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 41]);
    p.extend_from_slice(&[0x0a, 0x58, 0, 0, 0, 0x11]);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&8u16.to_be_bytes());
    p.extend_from_slice(&[58, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
    p
}

/// `inner` in VXLAN from `src` to `dst`:4789 with VNI `vni`, as the underlay delivers it.
fn vxlan(src: Ipv4Addr, dst: Ipv4Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(50 + inner.len());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let udp_len = (16 + inner.len()) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(20 + udp_len).to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0xc8, 0x22, 0x12, 0xb5]); // 51234 → 4789
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    p.extend_from_slice(&vni.to_be_bytes()[1..]);
    p.push(0);
    p.extend_from_slice(inner);
    p
}

/// Ethernet + IPv4 + 8 bytes of ICMP echo.
fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(42);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 41]);
    p.extend_from_slice(&pod_mac(src));
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&28u16.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    p
}

/// A made-up pod MAC for `ip` (`0a:58:` + the address, as Kubernetes' bridge CNI does).
fn pod_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}
