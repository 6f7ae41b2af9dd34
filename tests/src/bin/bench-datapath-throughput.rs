//! Cross-cluster pod-to-pod TCP throughput and 1-byte request/response latency through our
//! eBPF datapath, beside the same topology over plain kernel VXLAN with static forwarding
//! entries and no eBPF, measured in the same run.
//!
//! Brings up four labs side by side (`clustermesh lab up --clusters 2 --nodes 1 --pods 1`):
//! `--datapath ebpf` (the agents' defaults: VXLAN encapsulated in BPF by `from_pod` and
//! decapsulated by `from_underlay`), `--datapath kernel`, `--datapath ebpf --bpf-transmit
//! false` (transmit through the VXLAN device, as before BPF transmit), and `--datapath ebpf
//! --underlay-decap false` (receive through the VXLAN device); separate namespaces, so they
//! coexist. Then alternates the measurements between them (`clustermesh lab load` inside
//! the c1 pod against the c2 pod: one TCP stream into a sink for `--duration`, then
//! ping-pong), after an uncounted warm-up, in rounds whose lab order rotates (A B C D,
//! B C D A, …). Each ratio is computed per round (both sides measured seconds apart) and
//! reported as the median of the rounds' ratios with its interquartile range and extremes;
//! the verdicts use that median: ours ≥ 1.1× kernel VXLAN throughput and RR p50 ≤ 0.9×
//! kernel's (issue 18). The other two labs show what BPF transmit and `from_underlay` each
//! add. Needs root; the labs are removed at the end, also on failure.
//!
//! Why per-round ratios: on the shared 2-vCPU machine a single stream's throughput drifts
//! by ±10% within minutes, with everything else that runs; a ratio of medians compares
//! rounds measured minutes apart, and two runs of it disagreed by more than the effect
//! measured (docs/datapath-throughput.md). Hence the defaults: many short rounds (9 × 2 s)
//! rather than a few long ones, so that each ratio pairs measurements close in time.
//!
//! `--ip-family ipv6` (issue 16; IPv6-only labs, both tunnels over the IPv6 underlay) or
//! `dual` (IPv6 pods, ours tunnelled over IPv4: the pods' `hostIP`): the labs are built
//! with that family and the c1 pod streams to the c2 pod's **IPv6** address; the
//! baseline is plain kernel VXLAN over the IPv6 underlay (`cmvx6`), the target ours ≥ 0.9×
//! its throughput (RR p50 printed beside). Only the eBPF and kernel labs run (BPF transmit
//! is IPv4-only, so the transmit-path lab would repeat the eBPF one). Before measuring, a
//! capture on the c1 node's underlay shows which family each lab's tunnel really uses, and
//! the c1 agent's `/status` its transmit path; the baseline must be VXLAN over IPv6.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/bench-datapath-throughput [--duration 2s] [--rounds 9] [--streams 1] [--ip-family ipv4|dual|ipv6]
//! ```

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clustermesh_tests::process::find_binary;
use serde_json::Value;

struct Lab {
    bin: PathBuf,
    dir: PathBuf,
    /// Short name (also the lab directory's).
    name: &'static str,
    src_ns: String,
    dst_ip: String,
    /// The c1 node's namespace (where the tunnel leaves).
    src_node_ns: String,
    router_ns: String,
    /// The c1 node's agent `/status` address, if it runs one.
    agent_health: Option<String>,
}

impl Lab {
    /// `v6`: measure to the c2 pod's IPv6 address.
    fn up(
        bin: &Path,
        root: &Path,
        name: &'static str,
        flags: &[&str],
        v6: bool,
    ) -> anyhow::Result<Self> {
        let dir = root.join(name);
        let out = Command::new(bin)
            .args([
                "lab",
                "up",
                "--clusters",
                "2",
                "--nodes",
                "1",
                "--pods",
                "1",
            ])
            .args(flags)
            .arg("--dir")
            .arg(&dir)
            .output()?;
        let mut lab = Self {
            bin: bin.to_owned(),
            dir,
            name,
            src_ns: String::new(),
            dst_ip: String::new(),
            src_node_ns: String::new(),
            router_ns: String::new(),
            agent_health: None,
        };
        if !out.status.success() {
            bail!(
                "lab up {} failed:\n{}{}",
                flags.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let state: Value = serde_json::from_slice(&std::fs::read(lab.dir.join("lab.json"))?)?;
        let pod = |c: usize| &state["clusters"][c]["nodes"][0]["pods"][0];
        lab.src_ns = pod(0)["ns"].as_str().context("lab.json: pod ns")?.into();
        let ip_key = if v6 { "ip6" } else { "ip" };
        lab.dst_ip = pod(1)[ip_key]
            .as_str()
            .with_context(|| format!("lab.json: the c2 pod has no {ip_key}"))?
            .into();
        let node = &state["clusters"][0]["nodes"][0];
        lab.src_node_ns = node["ns"].as_str().context("lab.json: node ns")?.into();
        lab.router_ns = state["router_ns"]
            .as_str()
            .context("lab.json: router")?
            .into();
        lab.agent_health = node["agent"]["health_addr"].as_str().map(str::to_owned);
        if flags.contains(&"ebpf") && state["clusters"][0]["nodes"][0]["agent"].is_null() {
            bail!("lab up {name} started no agents (the agent binary lacks the lab flags): nothing to measure");
        }
        Ok(lab)
    }

    fn load(&self, mode: &str, duration: Duration, streams: u32) -> anyhow::Result<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.src_ns])
            .arg(&self.bin)
            .args(["lab", "load", "--mode", mode, "--target", &self.dst_ip])
            .args(["--duration", &format!("{}ms", duration.as_millis())])
            .args(["--streams", &streams.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "{} load {mode} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Lab {
    /// The family of the tunnel the c1 pod → c2 pod traffic really rides: the first VXLAN
    /// datagram leaving the c1 node's `eth0` during a short RR run, as tcpdump prints it.
    fn underlay_capture(&self) -> anyhow::Result<(&'static str, String)> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.src_node_ns])
            .args([
                "tcpdump", "-c", "1", "-nn", "-i", "eth0", "udp", "port", "4789",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("tcpdump (apt-get install tcpdump)")?;
        let mut stderr = BufReader::new(child.stderr.take().context("tcpdump stderr")?);
        let mut seen = String::new();
        while !seen.contains("listening on") {
            if stderr.read_line(&mut seen)? == 0 {
                bail!("tcpdump in {} exited: {seen}", self.src_node_ns);
            }
        }
        let load = self.load("rr", Duration::from_millis(300), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{}: no VXLAN datagram on the c1 node's underlay during a c1 → c2 RR run ({:?})",
                    self.name,
                    load.err()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        child
            .stdout
            .take()
            .context("tcpdump stdout")?
            .read_to_string(&mut out)?;
        let line = out.lines().next().unwrap_or_default().trim().to_owned();
        let family = if line.contains(" IP6 ") {
            "IPv6"
        } else if line.contains(" IP ") {
            "IPv4"
        } else {
            bail!("{}: not an IP datagram: {line:?}", self.name)
        };
        Ok((family, line))
    }

    /// The c1 agent's `/status` `transmit-path`, read through the router namespace.
    fn transmit_path(&self) -> Option<String> {
        let addr = self.agent_health.as_ref()?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router_ns,
                "curl",
                "-s",
                "--max-time",
                "3",
            ])
            .arg(format!("http://{addr}/status"))
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["transmit-path"].as_str().map(str::to_owned)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["lab", "down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

/// Per-round results of one datapath.
#[derive(Default)]
struct Samples {
    gbps: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    rps: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The distribution of per-round ratios `a[i] / b[i]`.
struct Ratios {
    median: f64,
    /// Lower and upper quartile.
    q1: f64,
    q3: f64,
    min: f64,
    max: f64,
}

/// Ratios of the same round: the two labs were measured seconds apart, so a slow phase
/// of the machine (another engineer's build, a noisy neighbour VM) hits both sides of
/// one ratio, where a ratio of medians mixes rounds measured minutes apart.
fn ratios(a: &[f64], b: &[f64]) -> Ratios {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    r.sort_by(f64::total_cmp);
    let at = |q: f64| {
        r.get(((r.len() - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ratios {
        median: median(&r),
        q1: at(0.25),
        q3: at(0.75),
        min: r.first().copied().unwrap_or(f64::NAN),
        max: r.last().copied().unwrap_or(f64::NAN),
    }
}

/// One result line: the medians of both sides, and the median of the per-round ratios
/// with its spread (interquartile range and extremes), which is the figure the verdicts use.
fn row(name: &str, a: &[f64], b: &[f64], unit: &str) -> f64 {
    let r = ratios(a, b);
    println!(
        "{name:<24} {:>8.2} {unit:<3} {:>10.2} {unit:<3} {:>7.3}× (IQR {:.3}–{:.3}, range {:.3}–{:.3}, n={})",
        median(a),
        median(b),
        r.median,
        r.q1,
        r.q3,
        r.min,
        r.max,
        a.len().min(b.len())
    );
    r.median
}

/// Measures every lab `rounds` times, interleaved: one stream and one RR run per lab per
/// round, the order of the labs rotating by one each round (A B C D, B C D A, …) so that
/// no lab always runs first or right after the same neighbour. A warm-up round (1 s each,
/// not counted) first: the first connection through a lab resolves neighbours and warms
/// caches.
fn measure(
    labs: &[&Lab],
    rounds: u32,
    duration: Duration,
    streams: u32,
) -> anyhow::Result<Vec<Samples>> {
    for lab in labs {
        lab.load("stream", Duration::from_secs(1), streams)?;
        lab.load("rr", Duration::from_secs(1), 1)?;
    }
    let mut results: Vec<Samples> = labs.iter().map(|_| Samples::default()).collect();
    for round in 1..=rounds {
        for i in 0..labs.len() {
            let at = (i + round as usize - 1) % labs.len();
            let lab = labs[at];
            let s = lab.load("stream", duration, streams)?;
            let r = lab.load("rr", duration, 1)?;
            let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let (gbps, p50, p99, rps) = (
                f(&s, "gbit_per_s"),
                f(&r, "p50_us"),
                f(&r, "p99_us"),
                f(&r, "per_s"),
            );
            println!(
                "  round {round} {:<8}: {gbps:6.2} Gbit/s, rr p50 {p50:6.1} µs, p99 {p99:6.1} µs, {rps:8.0} req/s",
                lab.name
            );
            let samples = &mut results[at];
            samples.gbps.push(gbps);
            samples.p50_us.push(p50);
            samples.p99_us.push(p99);
            samples.rps.push(rps);
        }
    }
    Ok(results)
}

fn main() -> anyhow::Result<()> {
    let mut duration = Duration::from_secs(2);
    let mut rounds = 9u32;
    let mut streams = 1u32;
    let mut family = String::from("ipv4");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => {
                duration = humantime_secs(&val()?)?;
            }
            "--rounds" => rounds = val()?.parse()?,
            "--streams" => streams = val()?.parse()?,
            "--ip-family" => family = val()?,
            other => bail!(
                "unknown flag {other} (--duration 2s, --rounds 9, --streams 1, --ip-family ipv4|dual|ipv6)"
            ),
        }
    }
    if !["ipv4", "dual", "ipv6"].contains(&family.as_str()) {
        bail!("--ip-family {family:?}: ipv4, dual or ipv6");
    }
    if family != "ipv4" {
        return run_v6(&family, duration, rounds, streams);
    }
    let bin = find_binary("clustermesh")?;
    let root = tempfile::Builder::new().prefix("cm-bench-dp").tempdir()?;
    println!("bench-datapath-throughput: 2 clusters × 1 node × 1 pod, c1 pod → c2 pod across the router; {rounds} rounds × {duration:?} per measurement, {streams} stream(s)");
    // The machine's one lab turn, held while the four labs below are up: a lab test beside
    // this bench would share its 2 cores and the host's underlay route.
    let _turn = clustermesh_tests::lab::LabTurn::take("bench-datapath-throughput")?;
    let ebpf = Lab::up(&bin, root.path(), "ebpf", &["--datapath", "ebpf"], false)?;
    let kernel = Lab::up(
        &bin,
        root.path(),
        "kernel",
        &["--datapath", "kernel"],
        false,
    )?;
    let device_tx = Lab::up(
        &bin,
        root.path(),
        "ebpf-dtx",
        &["--datapath", "ebpf", "--bpf-transmit", "false"],
        false,
    )?;
    let device_rx = Lab::up(
        &bin,
        root.path(),
        "ebpf-drx",
        &["--datapath", "ebpf", "--underlay-decap", "false"],
        false,
    )?;
    let labs = [&ebpf, &kernel, &device_tx, &device_rx];
    let results = measure(&labs, rounds, duration, streams)?;
    let [e, k, t, d] = &results[..] else {
        unreachable!("measure returns one Samples per lab")
    };
    println!();
    println!(
        "{:<24} {:>12} {:>14} {:>44}",
        "medians", "eBPF (ours)", "kernel VXLAN", "eBPF/kernel: median of per-round ratios"
    );
    let ratio = row("TCP throughput", &e.gbps, &k.gbps, "Gb");
    let p50 = row("RR latency p50", &e.p50_us, &k.p50_us, "µs");
    row("RR latency p99", &e.p99_us, &k.p99_us, "µs");
    row("RR rate", &e.rps, &k.rps, "/s");
    let verdict = |ok: bool| if ok { "✅ PASS" } else { "❌ FAIL" };
    println!(
        "{} throughput ratio {ratio:.2}× (target ≥ 1.10×)",
        verdict(ratio >= 1.1)
    );
    println!(
        "{} RR p50 ratio {p50:.2}× (target ≤ 0.90×)",
        verdict(p50 <= 0.9)
    );
    println!();
    println!(
        "{:<24} {:>12} {:>14} {:>44}",
        "medians, transmit path", "BPF encap", "VXLAN device", "ratio"
    );
    row("TCP throughput", &e.gbps, &t.gbps, "Gb");
    row("RR latency p50", &e.p50_us, &t.p50_us, "µs");
    let dtx = ratios(&t.gbps, &k.gbps).median;
    println!("  (VXLAN-device transmit vs kernel VXLAN: {dtx:.2}× throughput)");
    println!();
    println!(
        "{:<24} {:>12} {:>14} {:>44}",
        "medians, receive path", "from_underlay", "VXLAN device", "ratio"
    );
    row("TCP throughput", &e.gbps, &d.gbps, "Gb");
    row("RR latency p50", &e.p50_us, &d.p50_us, "µs");
    drop(device_rx);
    drop(device_tx);
    drop(kernel);
    drop(ebpf);
    Ok(())
}

/// Issue 16: the c1 pod → c2 pod stream and RR over IPv6 pod addresses, ours beside plain
/// kernel VXLAN over the IPv6 underlay, same run; verdict throughput ≥ 0.9×.
fn run_v6(family: &str, duration: Duration, rounds: u32, streams: u32) -> anyhow::Result<()> {
    let bin = find_binary("clustermesh")?;
    let root = tempfile::Builder::new().prefix("cm-bench-dp6").tempdir()?;
    println!("bench-datapath-throughput --ip-family {family}: 2 clusters × 1 node × 1 pod, c1 pod → c2 pod's IPv6 address across the router; {rounds} rounds × {duration:?} per measurement, {streams} stream(s)");
    let fam = ["--ip-family", family];
    let ebpf = Lab::up(
        &bin,
        root.path(),
        "ebpf",
        &[&["--datapath", "ebpf"][..], &fam].concat(),
        true,
    )?;
    let kernel = Lab::up(
        &bin,
        root.path(),
        "kernel",
        &[&["--datapath", "kernel"][..], &fam].concat(),
        true,
    )?;
    println!(
        "  c1 pod → {} (eBPF lab), {} (kernel lab)",
        ebpf.dst_ip, kernel.dst_ip
    );
    let mut tunnels = Vec::new();
    for lab in [&ebpf, &kernel] {
        let (fam, line) = lab.underlay_capture()?;
        println!(
            "  underlay of {:<6}: VXLAN over {fam}  (tcpdump on c1/n1 eth0: {line})",
            lab.name
        );
        tunnels.push(fam);
    }
    if tunnels[1] != "IPv6" {
        bail!(
            "the kernel lab's IPv6 pod traffic rides {} VXLAN, not the IPv6 underlay: no baseline",
            tunnels[1]
        );
    }
    if let Some(path) = ebpf.transmit_path() {
        println!("  eBPF lab c1/n1 /status transmit-path: {path}");
    }
    let results = measure(&[&ebpf, &kernel], rounds, duration, streams)?;
    let [e, k] = &results[..] else {
        unreachable!("measure returns one Samples per lab")
    };
    println!();
    println!(
        "{:<24} {:>12} {:>14} {:>44}",
        "medians, IPv6 pods",
        format!("eBPF ({})", tunnels[0]),
        "kernel (IPv6)",
        "eBPF/kernel: median of per-round ratios"
    );
    let ratio = row("TCP throughput", &e.gbps, &k.gbps, "Gb");
    let p50 = row("RR latency p50", &e.p50_us, &k.p50_us, "µs");
    row("RR latency p99", &e.p99_us, &k.p99_us, "µs");
    row("RR rate", &e.rps, &k.rps, "/s");
    let verdict = if ratio >= 0.9 { "✅ PASS" } else { "❌ FAIL" };
    println!(
        "{verdict} IPv6 throughput ratio {ratio:.2}× plain kernel VXLAN over IPv6 (target ≥ 0.90×; RR p50 {p50:.2}×)"
    );
    if tunnels[0] != "IPv6" {
        println!(
            "ℹ️  our tunnel rides the {} underlay in this lab (--ip-family {family}: the pods' hostIP is the node's IPv4 address); the issue's comparison is IPv6 over an IPv6 underlay on both sides (--ip-family ipv6)",
            tunnels[0]
        );
    }
    drop(kernel);
    drop(ebpf);
    Ok(())
}

/// `5s`, `500ms`, or plain seconds.
fn humantime_secs(s: &str) -> anyhow::Result<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return Ok(Duration::from_millis(ms.parse()?));
    }
    Ok(Duration::from_secs_f64(s.trim_end_matches('s').parse()?))
}
