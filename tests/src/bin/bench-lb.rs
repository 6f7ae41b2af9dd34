//! bench-lb: service load balancing with 1k, 10k and 30k services installed, our eBPF path
//! beside kube-proxy-style iptables DNAT rules, same run, same topology.
//!
//! (a) BPF_PROG_TEST_RUN of `from_pod` on a SYN to a random VIP: first packet (new
//!     connection: service lookup, random slot, CT insert, DNAT) and a packet of an
//!     established flow (CT hit), kernel-measured per run.
//! (b) Real TCP connects in network namespaces this benchmark creates
//!     (`cmb<pid>-{cli,node,srv}`: client pod — node — server pod, veth pairs, addresses in
//!     10.254.0.0/16 and VIPs in 172.20.0.0/16, nothing outside them): connect latency
//!     (SYN → SYN-ACK, p50/p99) and new connections per second to random VIPs, with
//!     * ebpf: `from_pod` on both host veths, the LB maps holding N services;
//!     * iptables: no programs, `iptables-legacy-restore` of N services in kube-proxy's
//!       shape (nat PREROUTING → KUBE-SERVICES → KUBE-SVC-* with `-m statistic --mode
//!       random` → KUBE-SEP-* DNAT, KUBE-MARK-MASQ rules included).
//!
//! Every service has 4 backends (the 4 addresses of the server pod, port 8080). Needs root.
//! The machine is shared: absolute figures are noisy, the curves' shapes are the point.
#![allow(unsafe_code)]

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use clustermesh_agent::datapath::{Config, Datapath, Program};
use clustermesh_agent::services::{LbMaps, LocalService, Name, ServiceMerger};
use clustermesh_ebpf_abi::EndpointInfo;
use clustermesh_types::model::{ClusterService, L4Addr, PortConfiguration};

#[derive(Parser)]
struct Args {
    /// Service counts.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000")]
    services: Vec<usize>,
    /// Connections measured for latency per point.
    #[arg(long, default_value_t = 1000)]
    connects: usize,
    /// Seconds of the connection-rate loop per point.
    #[arg(long, default_value_t = 1.5)]
    rate_secs: f64,
    /// Only the BPF_PROG_TEST_RUN part.
    #[arg(long)]
    no_netns: bool,
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 254, 1, 10);
const SERVERS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 254, 2, 10),
    Ipv4Addr::new(10, 254, 2, 11),
    Ipv4Addr::new(10, 254, 2, 12),
    Ipv4Addr::new(10, 254, 2, 13),
];
const CLIENT_MAC: [u8; 6] = [0x0a, 0x58, 10, 254, 1, 10];
const SERVER_MAC: [u8; 6] = [0x0a, 0x58, 10, 254, 2, 10];
const HOST_CLIENT_MAC: [u8; 6] = [0x02, 0xcb, 0, 0, 1, 1];
const HOST_SERVER_MAC: [u8; 6] = [0x02, 0xcb, 0, 0, 2, 1];

fn vip(i: usize) -> Ipv4Addr {
    let i = i + 1;
    Ipv4Addr::new(172, 20, (i >> 8) as u8, (i & 0xff) as u8)
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn service(i: usize) -> LocalService {
    let ports = |p: u16| -> PortConfiguration {
        [(
            "http".to_string(),
            L4Addr {
                protocol: "TCP".into(),
                port: p,
            },
        )]
        .into_iter()
        .collect()
    };
    LocalService {
        service: ClusterService {
            cluster: "c1".into(),
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            frontends: [(vip(i).to_string(), ports(80))].into_iter().collect(),
            backends: SERVERS
                .iter()
                .map(|s| (s.to_string(), ports(8080)))
                .collect(),
            cluster_id: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Installs services `0..n` (beyond what `merger` already has); returns the time taken.
fn install(merger: &mut ServiceMerger, lb: &mut LbMaps, from: usize, n: usize) -> Result<Duration> {
    let t = Instant::now();
    for i in from..n {
        let diff = merger.on_local(Name::new("bench", format!("svc-{i}")), Some(service(i)));
        lb.apply(&diff)?;
    }
    Ok(t.elapsed())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn syn(src_port: u16, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12] = 0x08;
    p[14] = 0x45;
    p[16..18].copy_from_slice(&40u16.to_be_bytes());
    p[22] = 64;
    p[23] = 6;
    p[26..30].copy_from_slice(&CLIENT.octets());
    p[30..34].copy_from_slice(&dst.octets());
    p[34..36].copy_from_slice(&src_port.to_be_bytes());
    p[36..38].copy_from_slice(&80u16.to_be_bytes());
    p[46] = 0x50;
    p[47] = 0x02;
    p
}

fn rng(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state as usize
}

/// (a) kernel-measured cost of the LB path.
fn prog_test_run(counts: &[usize]) -> Result<()> {
    println!("(a) BPF_PROG_TEST_RUN of from_pod, SYN to a random VIP (kernel ns per packet)");
    println!(
        "{:>9} {:>12} {:>14} {:>14} {:>14}",
        "services", "install", "first p50", "first p99", "ct-hit mean"
    );
    let mut dp = Datapath::load(&Config::default()).context("load datapath (needs root)")?;
    let mut lb = LbMaps::take(&mut dp)?;
    let mut merger = ServiceMerger::new("c1");
    let mut installed = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for &n in counts {
        let took = install(&mut merger, &mut lb, installed, n)?;
        installed = n;
        lb.clear_ct()?;
        let mut first = Vec::new();
        for k in 0..3000u16 {
            let p = syn(10_000 + k, vip(rng(&mut seed) % n));
            let r = dp.test_run(Program::FromPod, &p, None, 1)?;
            first.push(r.duration.as_nanos() as f64);
        }
        let p = syn(9_999, vip(rng(&mut seed) % n));
        dp.test_run(Program::FromPod, &p, None, 1)?;
        let hit = dp.test_run(Program::FromPod, &p, None, 200_000)?;
        println!(
            "{n:>9} {:>10.0}ms {:>12.0}ns {:>12.0}ns {:>12}ns",
            took.as_secs_f64() * 1e3,
            pct(&mut first, 0.5),
            pct(&mut first, 0.99),
            hit.duration.as_nanos()
        );
    }
    Ok(())
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| args.join(" "))?;
    ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
            // SAFETY: a valid namespace fd; setns only affects this (scoped) thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// Connect p50 µs, p99 µs, connections/s.
/// Connect p50 and p99 (µs), connects/s, connects lost (timed out).
type Figures = (f64, f64, f64, u64);

/// Services, (eBPF, iptables) figures, (install, restore) times.
type Point = (usize, [Figures; 2], [Duration; 2]);

struct Topo {
    prefix: String,
}

impl Topo {
    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn up() -> Result<Self> {
        let t = Topo {
            prefix: format!("cmb{}", std::process::id()),
        };
        let (cli, node, srv) = (t.ns("cli"), t.ns("node"), t.ns("srv"));
        for n in [&cli, &node, &srv] {
            run(&["ip", "netns", "add", n])?;
            run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        }
        for (pod, host, pod_mac, host_mac, ips) in [
            (&cli, "hcli", CLIENT_MAC, HOST_CLIENT_MAC, vec![CLIENT]),
            (&srv, "hsrv", SERVER_MAC, HOST_SERVER_MAC, SERVERS.to_vec()),
        ] {
            run(&[
                "ip", "-n", &node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ])?;
            run(&[
                "ip",
                "-n",
                &node,
                "link",
                "set",
                host,
                "address",
                &mac(&host_mac),
                "up",
            ])?;
            run(&[
                "ip",
                "-n",
                pod,
                "link",
                "set",
                "eth0",
                "address",
                &mac(&pod_mac),
                "up",
            ])?;
            for ip in &ips {
                run(&[
                    "ip",
                    "-n",
                    pod,
                    "addr",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    "eth0",
                ])?;
                run(&[
                    "ip",
                    "-n",
                    &node,
                    "route",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    host,
                ])?;
            }
            run(&[
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            for net in ["10.0.0.0/8", "172.20.0.0/16"] {
                run(&[
                    "ip",
                    "-n",
                    pod,
                    "route",
                    "add",
                    net,
                    "via",
                    "169.254.1.1",
                    "src",
                    &ips[0].to_string(),
                ])?;
            }
            run(&[
                "ip",
                "-n",
                pod,
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                &mac(&host_mac),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        for (ns, k, v) in [
            (&node, "net.ipv4.ip_forward", "1"),
            (&node, "net.ipv4.conf.all.rp_filter", "0"),
            (&cli, "net.ipv4.ip_local_port_range", "1024 65000"),
            (&cli, "net.ipv4.tcp_tw_reuse", "1"),
        ] {
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("{k}={v}"),
            ])?;
        }
        Ok(t)
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for n in ["cli", "node", "srv"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
        }
    }
}

/// kube-proxy's iptables shape for services `0..n`.
fn kube_proxy_rules(n: usize) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..n {
        let svc = format!("KUBE-SVC-{i:016X}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {svc}\n",
            vip(i)
        ));
        for (k, be) in SERVERS.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:012X}{k:04X}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = SERVERS.len() - k;
            if left > 1 {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {be}:8080\" -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / left as f64
                ));
            } else {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {be}:8080\" -j {sep}\n"
                ));
            }
            rules.push_str(&format!("-A {sep} -s {be}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ\n"));
            rules.push_str(&format!("-A {sep} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {be}:8080\n"));
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

fn iptables_restore(ns: &str, rules: &str) -> Result<Duration> {
    let bin = if Command::new("iptables-legacy-restore")
        .arg("--version")
        .output()
        .is_ok()
    {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    };
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, bin])
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("{bin} (install iptables: scripts/install-deps.sh)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    ensure!(child.wait()?.success(), "{bin} failed");
    Ok(t.elapsed())
}

/// Connect latency (µs, p50/p99) and connections per second to random VIPs among `n`.
/// Measures `path` (`ebpf` or `iptables`, for messages) with `n` services installed.
///
/// A connect that times out (its SYN and the retransmit a second later both unanswered) is
/// counted as lost, not fatal: on this shared machine one in tens of thousands has been
/// seen (session 8, once in five runs, path not recorded then). More than one in a
/// thousand fails the benchmark: that is a datapath fault, not noise.
fn measure(topo: &Topo, path: &str, n: usize, connects: usize, rate_secs: f64) -> Result<Figures> {
    in_netns(&topo.ns("cli"), || {
        let mut seed = 0x2545_f491_4f6c_dd1du64 ^ n as u64;
        let (mut attempts, mut lost) = (0u64, 0u64);
        // Ok(false): timed out.
        let mut connect = |seed: &mut u64| -> Result<bool> {
            let addr = SocketAddr::from((vip(rng(seed) % n), 80));
            attempts += 1;
            let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    lost += 1;
                    return Ok(false);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("{path}, {n} services: connect {addr}"))
                }
            };
            // RST on close: no TIME_WAIT pile-up over thousands of connections.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket fd and a correctly sized linger struct.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
            Ok(true)
        };
        for _ in 0..50 {
            connect(&mut seed)?;
        }
        let mut lat = Vec::with_capacity(connects);
        while lat.len() < connects {
            let t = Instant::now();
            if connect(&mut seed)? {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let t = Instant::now();
        let mut done = 0u64;
        while t.elapsed().as_secs_f64() < rate_secs {
            if connect(&mut seed)? {
                done += 1;
            }
        }
        let rate = done as f64 / t.elapsed().as_secs_f64();
        ensure!(
            lost * 1000 <= attempts,
            "{path}, {n} services: {lost} of {attempts} connects timed out (more than 1 in 1000)"
        );
        Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99), rate, lost))
    })
}

fn netns_bench(args: &Args) -> Result<()> {
    let topo = Topo::up()?;
    // Server: accept and drop, in the server pod.
    let listener = in_netns(&topo.ns("srv"), || Ok(TcpListener::bind("0.0.0.0:8080")?))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let mut results: Vec<Point> = Vec::new();

    // eBPF: the datapath loaded and attached in the node namespace.
    let node = topo.ns("node");
    let mut dp = Datapath::load(&Config::default()).context("load datapath (needs root)")?;
    let mut lb = LbMaps::take(&mut dp)?;
    for (ip, ifname, pod_mac, host_mac) in
        std::iter::once((CLIENT, "hcli", CLIENT_MAC, HOST_CLIENT_MAC)).chain(
            SERVERS
                .iter()
                .map(|s| (*s, "hsrv", SERVER_MAC, HOST_SERVER_MAC)),
        )
    {
        let ifindex = in_netns(&node, || {
            clustermesh_agent::datapath::ifindex_of(ifname).context("ifindex")
        })?;
        dp.maps.local_endpoints.upsert_v4(
            ip,
            EndpointInfo {
                ifindex,
                identity: 0,
                flags: 0,
                pod_mac,
                host_mac,
            },
        )?;
    }
    let dp = std::sync::Mutex::new(dp);
    in_netns(&node, || {
        let mut dp = dp.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        dp.attach(Program::FromPod, "hcli")?;
        dp.attach(Program::FromPod, "hsrv")?;
        Ok(())
    })?;
    let mut merger = ServiceMerger::new("c1");
    let mut installed = 0;
    let mut ebpf = Vec::new();
    for &n in &args.services {
        let took = install(&mut merger, &mut lb, installed, n)?;
        installed = n;
        ebpf.push((
            measure(&topo, "ebpf", n, args.connects, args.rate_secs)?,
            took,
        ));
    }
    let mut dp = dp.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    in_netns(&node, || Ok(dp.detach_all()?))?;
    drop(dp);

    for (k, &n) in args.services.iter().enumerate() {
        let took = iptables_restore(&node, &kube_proxy_rules(n))?;
        let ipt = measure(&topo, "iptables", n, args.connects, args.rate_secs)?;
        results.push((n, [ebpf[k].0, ipt], [ebpf[k].1, took]));
    }

    println!("\n(b) real TCP connects, client pod → VIP → server pod (4 backends per service)");
    println!(
        "{:>9} | {:>10} {:>10} {:>10} {:>10} | {:>10} {:>10} {:>10} {:>10}",
        "services",
        "ebpf p50",
        "ebpf p99",
        "ebpf c/s",
        "install",
        "ipt p50",
        "ipt p99",
        "ipt c/s",
        "restore"
    );
    for (n, [(e50, e99, er, el), (i50, i99, ir, il)], [et, it]) in &results {
        println!(
            "{n:>9} | {e50:>8.1}µs {e99:>8.1}µs {er:>10.0} {:>8.0}ms | {i50:>8.1}µs {i99:>8.1}µs {ir:>10.0} {:>8.0}ms",
            et.as_secs_f64() * 1e3,
            it.as_secs_f64() * 1e3
        );
        if el + il > 0 {
            println!("{:>9}   connects timed out: ebpf {el}, iptables {il}", "");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.services.iter().any(|n| *n == 0 || *n > 60_000) {
        bail!("service counts must be 1..=60000 (VIPs come from 172.20.0.0/16)");
    }
    prog_test_run(&args.services)?;
    if !args.no_netns {
        netns_bench(&args)?;
    }
    Ok(())
}
