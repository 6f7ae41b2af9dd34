//! Churn, end to end (issue 18 item 3): endpoint updates from a remote cluster's etcd put to
//! the entry in a real agent's ipcache BPF map, through the real KVStoreMesh, beside a plain
//! etcd put → watch of the same puts.
//!
//! **What runs** (all real processes, mTLS everywhere, nothing but loopback and the bench's
//! own network namespace):
//! * `--remotes` (250) remote clusters `c2..`, served by `--remote-etcds` (5) etcd processes:
//!   250 etcds are too heavy for 2 cores, so each etcd holds 50 clusters. **Shared** per etcd:
//!   the process, its CA and server certificate, `cilium/.heartbeat`. **Per cluster**: its
//!   cluster config `cilium/cluster-config/cN` (ID N, `cached: true`), its keys (under its own
//!   name: each remote announces the `cilium/cache/<store>/cN/` layout a clustermesh-apiserver
//!   with KVStoreMesh serves, so 50 clusters can share a keyspace), its synced canaries, its
//!   own client certificate `remote-cN` and etcd user `remote-cN` whose role reads only cN's
//!   prefixes (auth is on: cN's reader gets `permission denied` on c(N+1)'s keys), and its own
//!   remote config file.
//! * Each remote starts with `--endpoints` (100) endpoints, `--nodes` (4) nodes and 10
//!   identities (25k endpoints in the agent's maps before the churn starts).
//! * One `clustermesh-apiserver` with KVStoreMesh on (`--etcd-config`, `--etcd-init`: the
//!   local etcd gets Cilium's users and auth) mirroring every remote into a local etcd.
//! * One `clustermesh-agent` in a network namespace `cmchurn<pid>` (veth underlay, VXLAN
//!   device, a private bpffs) reading the remotes through the KVStoreMesh cache with its
//!   least-privilege `local-test` certificate; its etcd connection goes through a TCP relay
//!   (127.0.0.1 inside the namespace → the local etcd on the root namespace's loopback).
//!
//! **Churn**: Cilium's scale-test rate, 325 endpoint updates/s, spread round-robin over the
//! remotes, for `--duration` (20 s), then 10× that (3250/s). The mix: 30% new endpoints,
//! 30% changed identity, 20% changed tunnel endpoint (the pod's node), 20% deletions. A key
//! is never changed again while its previous update is outstanding. At most `--in-flight`
//! (1024) writes are in flight, spread over `--writer-conns` (4) connections per remote etcd:
//! when the remote etcds cannot take the rate, the churn goes as fast as they acknowledge.
//! Each phase prints the rate asked, issued and taken (writes acknowledged per second, first
//! put to last ack), the writer's put → ack latency, and each process's CPU share during the
//! phase beside the whole machine's (and the same for 2 idle seconds before the churn): a
//! phase that did not reach 95% of its rate says so in its verdict line and FAILs, and the CPU
//! line says what took the machine. The remote etcds' data dirs are on tmpfs (`/dev/shm`, see
//! `TestEtcd`): no disk fsync; the setup line prints the filesystem.
//!
//! **Measured per update**: from just before the remote etcd put (or delete) to the agent's
//! pinned ipcache entry read back with the expected identity and tunnel endpoint (deletions:
//! until the entry is gone). A reader thread looks up every outstanding key in the pinned map
//! in a loop (one `BPF_MAP_LOOKUP_ELEM` each, then a pause of 3× the round, at least 1 ms, so
//! it takes at most about a quarter of a core); the printed resolution is its round time plus
//! the pause. An update not seen within 10 s is **lost**.
//!
//! **Baseline, same run**: a plain etcd watch (root, no KVStoreMesh, no agent) on each remote
//! etcd's `cilium/cache/ip/v1/` sees the same puts; its latency is put → watch event with the
//! same value. Both are measured on the same puts, under the same load.
//!
//! Verdicts: PASS if p99 < 1 s at 325/s (the issue's target; p99 / baseline p99 is printed
//! beside it), no update lost at either rate, and each phase took ≥ 95% of its rate. The issue
//! sets no p99 target at 3250/s: its figures and ratio are printed, lost = 0 is still required.
//!
//! Teardown (also on error, Ctrl-C and SIGTERM): agent, apiserver, etcds, relay, namespace,
//! bpffs mount. Needs root, iproute2 and /usr/bin/etcd; runs the release
//! `clustermesh-apiserver` and `clustermesh-agent` next to this binary.
//!
//! `cargo build --release -p clustermesh-agent -p clustermesh-apiserver --bins &&
//!  cargo build --release -p clustermesh-tests --bin bench-churn &&
//!  target/release/bench-churn [--duration 20] [--remotes 250] [--remote-etcds 5]
//!  [--endpoints 100] [--nodes 4] [--rate 325] [--in-flight 1024] [--writer-conns 4]`

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData, MapError};
use clustermesh_ebpf_abi::{IpcacheKey, IpcacheValue};
use clustermesh_syncer::remote::Resource;
use clustermesh_tests::etcd::TestEtcd;
use clustermesh_tests::fixtures::{self, Shape};
use clustermesh_tests::process::{find_binary, proc_cpu, ticks_to_duration, TestApiserver};
use etcd_client::{Client, EventType, Permission, Txn, TxnOp, WatchOptions};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// An update not in the map (or not watched) this long after its put is lost.
const LOST_AFTER: Duration = Duration::from_secs(10);
/// Identities per remote.
const IDENTITIES: u32 = 10;
/// The agent's underlay address inside the bench's namespace.
const NODE_IP: &str = "198.18.250.11";
/// Writes in flight at most: past this the remote etcds are saturated and the churn is
/// issued only as fast as they acknowledge (the printed rate is the one achieved).
const MAX_IN_FLIGHT: usize = 1024;
/// Connections of the churn writer per remote etcd (writes spread over them).
const WRITER_CONNS: usize = 4;
/// Pause of the map reader between rounds over the outstanding keys.
const READER_PAUSE: Duration = Duration::from_millis(1);
/// The reader's pause is at least this many times its last round.
const READER_BACKOFF: u32 = 3;

#[derive(Debug, Clone, Copy)]
struct Opts {
    remotes: u32,
    remote_etcds: u32,
    endpoints: u32,
    nodes: u32,
    rate: u32,
    duration: Duration,
    /// Writes in flight at most.
    in_flight: usize,
    /// Writer connections per remote etcd.
    writer_conns: usize,
}

impl Opts {
    fn from_args() -> Result<Self> {
        let o = Opts {
            remotes: arg("--remotes", 250)?,
            remote_etcds: arg("--remote-etcds", 5)?,
            endpoints: arg("--endpoints", 100)?,
            nodes: arg("--nodes", 4)?,
            rate: arg("--rate", 325)?,
            duration: Duration::from_secs(arg("--duration", 20)?.into()),
            in_flight: arg("--in-flight", MAX_IN_FLIGHT as u32)? as usize,
            writer_conns: arg("--writer-conns", WRITER_CONNS as u32)? as usize,
        };
        ensure!(
            o.in_flight >= 1 && (1..=64).contains(&o.writer_conns),
            "--in-flight must be ≥ 1 and --writer-conns 1..=64"
        );
        // Remote IDs 2..=remotes+1 beside the local cluster 1, under max-connected-clusters
        // 255; addresses 10.<id>.x.y.
        ensure!(
            (1..=253).contains(&o.remotes),
            "--remotes {}: 1..=253 (cluster IDs 2..=254 beside the local 1)",
            o.remotes
        );
        ensure!(
            (1..=o.remotes).contains(&o.remote_etcds),
            "--remote-etcds {}: 1..=--remotes",
            o.remote_etcds
        );
        ensure!(
            (1..=30_000).contains(&o.endpoints) && (2..=200).contains(&o.nodes),
            "--endpoints 1..=30000, --nodes 2..=200 (a tunnel endpoint change needs a second node)"
        );
        ensure!(
            o.rate >= 1 && !o.duration.is_zero(),
            "--rate and --duration must be > 0"
        );
        Ok(o)
    }
}

fn arg(name: &str, default: u32) -> Result<u32> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a number")),
    }
}

// ---------------------------------------------------------------------------------------
// Cilium-format values

fn node_ip(cluster: u32, node: u32) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, cluster as u8, node as u8 + 1)
}

fn endpoint_ip(cluster: u32, n: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, cluster as u8, (n / 250) as u8, (n % 250) as u8 + 1)
}

fn identity(cluster: u32, i: u32) -> u32 {
    (cluster << 16) | (256 + i)
}

fn ip_entry(ip: Ipv4Addr, host: Ipv4Addr, id: u32) -> String {
    format!(
        r#"{{"IP":"{ip}","Mask":null,"HostIP":"{host}","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"pod-{ip}","K8sServiceAccount":"default"}}"#
    )
}

fn node_entry(cluster: u32, n: u32) -> String {
    let ip = node_ip(cluster, n);
    format!(
        r#"{{"Name":"node-{n}","Cluster":"c{cluster}","IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}],"IPv4AllocCIDR":{{"IP":"10.{cluster}.{n}.0","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":{cluster},"Source":"custom-resource","EncryptionKey":0,"Labels":{{"kubernetes.io/hostname":"node-{n}"}},"Annotations":{{}},"WireguardPubKey":"","BootID":""}}"#
    )
}

fn ip_key(cluster: u32, ip: Ipv4Addr) -> String {
    format!("cilium/cache/ip/v1/c{cluster}/{ip}")
}

// ---------------------------------------------------------------------------------------
// The remote etcds

struct Remotes {
    etcds: Vec<TestEtcd>,
    /// The churn writer's root clients: [`WRITER_CONNS`] connections per etcd.
    clients: Vec<Vec<Client>>,
}

impl Remotes {
    fn etcd_of(&self, cluster: u32, o: &Opts) -> usize {
        let per = o.remotes.div_ceil(o.remote_etcds);
        ((cluster - 2) / per) as usize
    }
}

/// The filesystem type holding `path` (the longest mount point above it in /proc/mounts).
fn fs_type(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((Path::new(*f.get(1)?), *f.get(2)?))
        })
        .filter(|(m, _)| path.starts_with(m))
        .max_by_key(|(m, _)| m.as_os_str().len())
        .map_or_else(|| "unknown".into(), |(_, t)| t.to_string())
}

/// A random password nobody needs: etcd 3.4 users authenticate by certificate CN once auth
/// is on, but `user add` wants one.
fn password() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn already(e: &etcd_client::Error) -> bool {
    let t = e.to_string();
    t.contains("already exists") || t.contains("already granted")
}

/// Seeds every remote of `etcd` (clusters `clusters`), creates its per-cluster users and
/// roles, enables auth and writes each cluster's remote config into `mesh_dir`.
async fn seed_remote_etcd(
    etcd: &TestEtcd,
    clusters: &[u32],
    o: &Opts,
    mesh_dir: &Path,
) -> Result<Client> {
    let mut c = etcd.client("root").await?;
    let mut ops = vec![("cilium/.heartbeat".to_string(), "x".to_string())];
    for &id in clusters {
        let name = format!("c{id}");
        ops.push((
            format!("cilium/cluster-config/{name}"),
            format!(
                r#"{{"id":{id},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}"#
            ),
        ));
        for n in 0..o.nodes {
            ops.push((
                format!("cilium/cache/nodes/v1/{name}/node-{n}"),
                node_entry(id, n),
            ));
        }
        for i in 0..IDENTITIES {
            ops.push((
                format!("cilium/cache/identities/v1/{name}/id/{}", identity(id, i)),
                format!("k8s:app=app{i};k8s:io.cilium.k8s.policy.cluster={name};k8s:io.kubernetes.pod.namespace=default;"),
            ));
        }
        for e in 0..o.endpoints {
            let ip = endpoint_ip(id, e);
            ops.push((
                ip_key(id, ip),
                ip_entry(ip, node_ip(id, e % o.nodes), identity(id, e % IDENTITIES)),
            ));
        }
        for r in Resource::ALL {
            ops.push((r.synced_key(&name, true), "2026-01-01T00:00:00Z".into()));
        }
    }
    for chunk in ops.chunks(128) {
        let txn: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        c.txn(Txn::new().and_then(txn)).await?;
    }

    // Least privilege: user remote-cN reads cN's prefixes and nothing else.
    let range =
        |p: &str| Permission::read(p).with_range_end(clustermesh_syncer::list::prefix_range_end(p));
    for r in ["root"] {
        if let Err(e) = c.role_add(r).await {
            ensure!(already(&e), "role add {r}: {e}");
        }
        if let Err(e) = c.user_add(r, password()?, None).await {
            ensure!(already(&e), "user add {r}: {e}");
        }
        c.user_grant_role(r, r).await?;
    }
    for &id in clusters {
        let name = format!("c{id}");
        let user = format!("remote-{name}");
        c.role_add(user.as_str()).await?;
        let mut perms = vec![
            Permission::read("cilium/.heartbeat"),
            Permission::read(format!("cilium/cluster-config/{name}")),
            range(&format!("cilium/synced/{name}/")),
        ];
        for r in Resource::ALL {
            perms.push(range(&r.watch_prefix(&name, true)));
        }
        for p in perms {
            c.role_grant_permission(user.as_str(), p).await?;
        }
        c.user_add(user.as_str(), password()?, None).await?;
        c.user_grant_role(user.as_str(), user.as_str()).await?;
        etcd.write_client_config(&user, &mesh_dir.join(&name))?;
    }
    c.auth_enable().await?;
    // A fresh client: the old one's connection predates auth.
    root_client(etcd).await
}

/// A root client without a per-request timeout (TestEtcd's clients give up after 10 s): a
/// write the etcd acknowledges late is measured late, not dropped.
async fn root_client(etcd: &TestEtcd) -> Result<Client> {
    let path = etcd.dir().join("bench-root.yaml");
    etcd.write_client_config("root", &path)?;
    let cfg = clustermesh_syncer::EtcdConfig::load(&path)?;
    clustermesh_tests::etcd::raw_client(&cfg).await
}

// ---------------------------------------------------------------------------------------
// The agent's namespace, bpffs, relay and process

/// The bench's network namespace; deleted on drop (its interfaces and attached programs go
/// with it).
struct Netns(String);

impl Netns {
    fn create() -> Result<Self> {
        let ns = Netns(format!("cmchurn{}", std::process::id()));
        run(&["ip", "netns", "add", &ns.0])?;
        let n = ns.0.as_str();
        run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        // The underlay: a veth pair inside the namespace (no traffic leaves it).
        run(&[
            "ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ])?;
        run(&["ip", "-n", n, "link", "set", "eth1", "up"])?;
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{NODE_IP}/16"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", n, "link", "set", "eth0", "up"])?;
        run(&[
            "ip", "-n", n, "link", "add", "cmvx0", "type", "vxlan", "dstport", "4789", "external",
        ])?;
        run(&["ip", "-n", n, "link", "set", "cmvx0", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A private bpffs under a temporary directory, unmounted on drop (the pins go with it).
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mount() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cmchurn-bpf-").tempdir()?;
        let mounted =
            clustermesh_agent::kernel::ensure_bpffs(dir.path()).map_err(anyhow::Error::msg)?;
        ensure!(mounted, "{} was bpffs already", dir.path().display());
        Ok(Self { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Relays TCP from 127.0.0.1:<port> inside `ns` to `target` on the root namespace's
/// loopback: the listener is created by a thread that entered the namespace, the outgoing
/// sockets by the runtime's threads, which never leave the root namespace.
async fn relay(ns: &str, target: SocketAddr, token: CancellationToken) -> Result<u16> {
    let listener = std::thread::scope(|s| {
        s.spawn(|| -> Result<std::net::TcpListener> {
            let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {ns}"))?;
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))?
    })?;
    let port = listener.local_addr()?.port();
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut inner, _)) = accepted else {
                continue;
            };
            let token = token.clone();
            tokio::spawn(async move {
                let Ok(mut outer) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = inner.set_nodelay(true);
                let _ = outer.set_nodelay(true);
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inner, &mut outer) => {}
                }
            });
        }
    });
    Ok(port)
}

/// The agent process (`ip netns exec` execs it, so the child is the agent); killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

type Ipcache = LpmTrie<MapData, IpcacheKey, IpcacheValue>;

fn open_ipcache(pin_dir: &Path) -> Result<Ipcache> {
    let path = pin_dir.join(clustermesh_ebpf_abi::map::IPCACHE);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(LpmTrie::try_from(Map::LpmTrie(data))?)
}

fn lookup(map: &Ipcache, ip: Ipv4Addr) -> Result<Option<IpcacheValue>> {
    match map.get(&Key::new(64, IpcacheKey::v4(ip.octets())), 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(e).context("ipcache lookup"),
    }
}

// ---------------------------------------------------------------------------------------
// Where the CPU goes during a phase (the diagnosis of a rate not reached)

/// The machine's (busy, total) CPU time over all cores, from `/proc/stat`.
fn machine_cpu() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((ticks_to_duration(total - idle), ticks_to_duration(total)))
}

/// CPU time of the calling thread (user + system).
fn thread_cpu() -> Duration {
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

/// The processes of the bench, by role, for a CPU snapshot.
struct Roles {
    remote_etcds: Vec<u32>,
    local_etcd: u32,
    kvstoremesh: u32,
    agent: u32,
}

/// A snapshot of CPU times: per role, the bench itself, its reader thread, the machine.
#[derive(Clone)]
struct CpuSnap {
    at: Instant,
    roles: [Duration; 4],
    bench: Duration,
    reader: Duration,
    machine: (Duration, Duration),
}

impl CpuSnap {
    fn take(r: &Roles, state: &State) -> Self {
        let sum = |pids: &[u32]| pids.iter().filter_map(|&p| proc_cpu(p)).sum::<Duration>();
        CpuSnap {
            at: Instant::now(),
            roles: [
                sum(&r.remote_etcds),
                sum(&[r.local_etcd]),
                sum(&[r.kvstoremesh]),
                sum(&[r.agent]),
            ],
            bench: proc_cpu(std::process::id()).unwrap_or_default(),
            reader: lock(state).tally.reader_cpu,
            machine: machine_cpu().unwrap_or_default(),
        }
    }

    /// One line: each role's share of one core between `self` and `later`, and how busy
    /// the whole machine was.
    fn line(&self, later: &CpuSnap) -> String {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let pct = |a: Duration, b: Duration| {
            format!("{:.0}%", b.saturating_sub(a).as_secs_f64() / wall * 100.0)
        };
        let names = ["remote etcds", "local etcd", "KVStoreMesh", "agent"];
        let mut parts: Vec<String> = names
            .iter()
            .zip(self.roles.iter().zip(&later.roles))
            .map(|(n, (a, b))| format!("{n} {}", pct(*a, *b)))
            .collect();
        parts.push(format!(
            "bench {} (of it the map reader {})",
            pct(self.bench, later.bench),
            pct(self.reader, later.reader)
        ));
        let busy = later.machine.0.saturating_sub(self.machine.0).as_secs_f64();
        let total = later.machine.1.saturating_sub(self.machine.1).as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "CPU (% of one core): {}; the machine was {:.0}% busy ({cores} cores, everything on it counted)",
            parts.join(", "),
            busy / total.max(1e-9) * 100.0
        )
    }
}

// ---------------------------------------------------------------------------------------
// Outstanding updates and their observers

/// What an update must leave behind: `Some((identity, tunnel endpoint))`, or `None` (gone).
type Expect = Option<(u32, Ipv4Addr)>;

#[derive(Debug, Clone)]
struct Pending {
    sent: Instant,
    expect: Expect,
    /// The value the put wrote (`None` for a delete), for the baseline watch.
    value: Option<String>,
}

#[derive(Default)]
struct Tally {
    /// Latencies per phase: (map, watch).
    done: Vec<(Vec<Duration>, Vec<Duration>)>,
    lost: Vec<(usize, usize)>,
    /// Reader round times (resolution of the map read-back).
    rounds: Vec<Duration>,
    /// CPU time of the reader thread so far.
    reader_cpu: Duration,
    /// Per phase: put (or delete) issued → acknowledged by the remote etcd.
    acks: Vec<Vec<Duration>>,
}

#[derive(Default)]
struct Shared {
    /// Outstanding in the map / in the baseline watch, by address.
    map: HashMap<Ipv4Addr, Pending>,
    watch: HashMap<Ipv4Addr, Pending>,
    phase: usize,
    tally: Tally,
}

type State = Arc<Mutex<Shared>>;

fn lock(s: &State) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_expected(v: Option<IpcacheValue>, expect: Expect) -> bool {
    match (v, expect) {
        (None, None) => true,
        (Some(v), Some((id, tunnel))) => {
            v.sec_identity == id && v.tunnel_endpoint[..4] == tunnel.octets()
        }
        _ => false,
    }
}

/// The map reader: looks up every outstanding key in a loop until `stop`.
fn map_reader(state: State, map: Ipcache, stop: Arc<AtomicBool>) -> Result<()> {
    let mut keys: Vec<(Ipv4Addr, Instant, Expect)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        keys.clear();
        keys.extend(
            lock(&state)
                .map
                .iter()
                .map(|(ip, p)| (*ip, p.sent, p.expect)),
        );
        let mut seen = Vec::new();
        for &(ip, sent, expect) in &keys {
            let v = lookup(&map, ip)?;
            let now = Instant::now();
            if is_expected(v, expect) {
                seen.push((ip, sent, now.saturating_duration_since(sent), true));
            } else if now.saturating_duration_since(sent) > LOST_AFTER {
                seen.push((ip, sent, Duration::ZERO, false));
            }
        }
        {
            let mut s = lock(&state);
            let phase = s.phase;
            for (ip, sent, took, ok) in seen {
                // Only if it is still the same update (the writer never reuses a pending key).
                if s.map.get(&ip).is_some_and(|p| p.sent == sent) {
                    s.map.remove(&ip);
                    if ok {
                        s.tally.done[phase].0.push(took);
                    } else {
                        s.tally.lost[phase].0 += 1;
                    }
                }
            }
            let took = round.elapsed();
            if !keys.is_empty() {
                s.tally.rounds.push(took);
            }
            s.tally.reader_cpu = thread_cpu();
        }
        // Three times as long as the round took (at least READER_PAUSE): the reader takes at
        // most about a quarter of a core. With thousands of keys outstanding a round is
        // milliseconds of lookups, and a reader spinning on one of two cores starves the
        // processes it measures; the resolution (round + pause) stays far below the latencies.
        std::thread::sleep(READER_PAUSE.max(round.elapsed() * READER_BACKOFF));
    }
    Ok(())
}

/// The baseline: a plain watch on one remote etcd's endpoints.
async fn baseline_watch(client: Client, state: State, token: CancellationToken) -> Result<()> {
    let mut wc = client.watch_client();
    let mut stream = wc
        .watch(
            "cilium/cache/ip/v1/",
            Some(WatchOptions::new().with_prefix()),
        )
        .await?;
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            m = stream.message() => m?,
        };
        let Some(resp) = msg else {
            bail!("baseline watch ended");
        };
        let now = Instant::now();
        let mut s = lock(&state);
        let phase = s.phase;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let Some(ip) = key
                .rsplit('/')
                .next()
                .and_then(|i| i.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let hit = s.watch.get(&ip).is_some_and(|p| match ev.event_type() {
                EventType::Put => p.value.as_deref().map(str::as_bytes) == Some(kv.value()),
                EventType::Delete => p.value.is_none(),
            });
            if hit {
                if let Some(p) = s.watch.remove(&ip) {
                    s.tally.done[phase]
                        .1
                        .push(now.saturating_duration_since(p.sent));
                }
            }
        }
    }
}

/// Marks baseline updates older than [`LOST_AFTER`] lost.
fn expire_watch(state: &State) {
    let mut s = lock(state);
    let phase = s.phase;
    let before = s.watch.len();
    s.watch.retain(|_, p| p.sent.elapsed() <= LOST_AFTER);
    let lost = before - s.watch.len();
    s.tally.lost[phase].1 += lost;
}

// ---------------------------------------------------------------------------------------
// The churn

#[derive(Debug, Clone, Copy)]
struct Ep {
    ip: Ipv4Addr,
    id: u32,
    node: u32,
}

struct Population {
    /// Per remote (index cluster - 2): its live endpoints.
    clusters: Vec<Vec<Ep>>,
    /// Next endpoint number per remote (new endpoints).
    next: Vec<u32>,
    rng: u64,
}

impl Population {
    fn new(o: &Opts) -> Self {
        let clusters = (0..o.remotes)
            .map(|r| {
                let c = r + 2;
                (0..o.endpoints)
                    .map(|e| Ep {
                        ip: endpoint_ip(c, e),
                        id: identity(c, e % IDENTITIES),
                        node: e % o.nodes,
                    })
                    .collect()
            })
            .collect();
        Population {
            clusters,
            next: vec![o.endpoints; o.remotes as usize],
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn rand(&mut self, n: u32) -> u32 {
        // xorshift64*: deterministic, so every run churns the same way.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        ((self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(n.max(1))) as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OpKind {
    New,
    Identity,
    Tunnel,
    Delete,
}

/// The next update for remote `r`: (kind, key, value or None for a delete, expectation).
fn next_op(
    pop: &mut Population,
    busy: &Shared,
    r: usize,
    o: &Opts,
) -> (OpKind, Ipv4Addr, Option<String>, Expect) {
    let c = r as u32 + 2;
    let roll = pop.rand(100);
    let kind = match roll {
        0..=29 => OpKind::New,
        30..=59 => OpKind::Identity,
        60..=79 => OpKind::Tunnel,
        _ => OpKind::Delete,
    };
    // A key with an update outstanding is not touched again: pick another (a few tries),
    // else create a new endpoint instead.
    let mut pick = None;
    if kind != OpKind::New && !pop.clusters[r].is_empty() {
        for _ in 0..8 {
            let i = pop.rand(pop.clusters[r].len() as u32) as usize;
            let ip = pop.clusters[r][i].ip;
            if !busy.map.contains_key(&ip) && !busy.watch.contains_key(&ip) {
                pick = Some(i);
                break;
            }
        }
    }
    let Some(i) = pick else {
        let n = pop.next[r];
        pop.next[r] += 1;
        let ep = Ep {
            ip: endpoint_ip(c, n),
            id: identity(c, pop.rand(IDENTITIES)),
            node: pop.rand(o.nodes),
        };
        pop.clusters[r].push(ep);
        let host = node_ip(c, ep.node);
        return (
            OpKind::New,
            ep.ip,
            Some(ip_entry(ep.ip, host, ep.id)),
            Some((ep.id, host)),
        );
    };
    match kind {
        OpKind::Delete => {
            let ep = pop.clusters[r].swap_remove(i);
            (OpKind::Delete, ep.ip, None, None)
        }
        _ => {
            let step = 1 + pop.rand(if kind == OpKind::Identity {
                IDENTITIES - 1
            } else {
                o.nodes.max(2) - 1
            });
            let ep = &mut pop.clusters[r][i];
            if kind == OpKind::Identity {
                let idx = ((ep.id & 0xffff) - 256 + step) % IDENTITIES;
                ep.id = identity(c, idx);
            } else {
                ep.node = (ep.node + step) % o.nodes;
            }
            let ep = *ep;
            let host = node_ip(c, ep.node);
            (
                kind,
                ep.ip,
                Some(ip_entry(ep.ip, host, ep.id)),
                Some((ep.id, host)),
            )
        }
    }
}

/// Applies `rate` updates/s for `duration`, spread round-robin over the remotes. Returns the
/// number of updates sent, the mix, and when the remote etcds had acknowledged every write.
async fn churn(
    remotes: &Remotes,
    o: &Opts,
    pop: &mut Population,
    state: &State,
    rate: u32,
    duration: Duration,
) -> Result<(usize, HashMap<OpKind, usize>, Duration)> {
    let start = Instant::now();
    let mut sent = 0usize;
    let mut mix: HashMap<OpKind, usize> = HashMap::new();
    let mut puts: JoinSet<Result<Duration>> = JoinSet::new();
    let mut acks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_remote = 0usize;
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as usize;
        while sent < due && puts.len() < o.in_flight {
            let r = next_remote;
            next_remote = (next_remote + 1) % o.remotes as usize;
            let (kind, ip, value, expect) = next_op(pop, &lock(state), r, o);
            *mix.entry(kind).or_default() += 1;
            let c = r as u32 + 2;
            let conns = &remotes.clients[remotes.etcd_of(c, o)];
            let mut client = conns[sent % conns.len()].clone();
            let key = ip_key(c, ip);
            // The clock starts just before the put is issued; the key is pending from then
            // on, so no later update picks it while this one is outstanding.
            let sent_at = Instant::now();
            {
                let mut s = lock(state);
                let p = Pending {
                    sent: sent_at,
                    expect,
                    value: value.clone(),
                };
                s.map.insert(ip, p.clone());
                s.watch.insert(ip, p);
            }
            puts.spawn(async move {
                match value {
                    Some(v) => client.put(key.as_str(), v, None).await.map(|_| ()),
                    None => client.delete(key.as_str(), None).await.map(|_| ()),
                }
                .with_context(|| format!("remote etcd write {key}"))?;
                Ok(sent_at.elapsed())
            });
            sent += 1;
        }
        while let Some(done) = puts.try_join_next() {
            acks.push(done??);
        }
    }
    while let Some(done) = puts.join_next().await {
        acks.push(done??);
    }
    let mut s = lock(state);
    let phase = s.phase;
    s.tally.acks[phase] = acks;
    drop(s);
    Ok((sent, mix, start.elapsed()))
}

// ---------------------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:>9.1} ms", d.as_secs_f64() * 1000.0)
}

async fn bench(o: Opts, token: CancellationToken) -> Result<bool> {
    let t0 = Instant::now();
    let work = tempfile::Builder::new().prefix("cmchurn-").tempdir()?;
    let mesh_dir = work.path().join("mesh");
    std::fs::create_dir_all(&mesh_dir)?;

    // Remote etcds, seeded, least-privilege users, auth on.
    let mut etcds = Vec::new();
    for _ in 0..o.remote_etcds {
        etcds.push(TestEtcd::start()?);
    }
    let per = o.remotes.div_ceil(o.remote_etcds);
    // One etcd after the other would take ~30 s here: `user add` hashes a password (bcrypt)
    // per user, so the five are seeded side by side.
    let clients = futures::future::try_join_all(etcds.iter().enumerate().map(|(i, etcd)| {
        let first = 2 + i as u32 * per;
        let last = (first + per).min(o.remotes + 2);
        let clusters: Vec<u32> = (first..last).collect();
        let mesh_dir = &mesh_dir;
        async move {
            seed_remote_etcd(etcd, &clusters, &o, mesh_dir)
                .await
                .with_context(|| format!("seeding remote etcd {i}"))
        }
    }))
    .await?;
    let mut writers = Vec::new();
    for (etcd, first) in etcds.iter().zip(clients) {
        let mut conns = vec![first];
        for _ in 1..o.writer_conns {
            conns.push(root_client(etcd).await?);
        }
        writers.push(conns);
    }
    let remotes = Remotes {
        etcds,
        clients: writers,
    };
    // The per-cluster users really are confined to their own cluster: remote-c2 reads c2's
    // endpoints and is refused c3's (same etcd).
    if o.remotes >= 2 && remotes.etcd_of(3, &o) == 0 {
        let mut c2 = remotes.etcds[0].client("remote-c2").await?;
        let prefix = Some(etcd_client::GetOptions::new().with_prefix());
        let own = c2.get("cilium/cache/ip/v1/c2/", prefix.clone()).await?;
        ensure!(
            own.kvs().len() == o.endpoints as usize,
            "remote-c2 read {} of its {} endpoints",
            own.kvs().len(),
            o.endpoints
        );
        ensure!(
            c2.get("cilium/cache/ip/v1/c3/", prefix).await.is_err(),
            "remote-c2 could read c3's endpoints: the per-cluster roles do not confine"
        );
    }
    let data = remotes.etcds[0].data_dir();
    println!(
        "setup: {} remotes (c2..c{}) in {} etcds ({per} clusters each; data dirs on {} like {}, so no disk fsync), {} endpoints, {} nodes, {IDENTITIES} identities per remote ({:.1} s)",
        o.remotes,
        o.remotes + 1,
        o.remote_etcds,
        fs_type(data),
        data.parent().unwrap_or(data).display(),
        o.endpoints,
        o.nodes,
        t0.elapsed().as_secs_f64()
    );

    // Local etcd + clustermesh-apiserver (KVStoreMesh).
    let local = TestEtcd::start()?;
    let admin_cfg = work.path().join("local-admin.yaml");
    local.write_client_config("admin-test", &admin_cfg)?;
    let manifests = work.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(
        manifests.join("cluster.yaml"),
        fixtures::cluster(Shape {
            cluster_id: 1,
            nodes: 2,
            pods: 20,
            services: 2,
        }),
    )?;
    let state_dir = work.path().join("state");
    std::fs::create_dir_all(&state_dir)?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut api = TestApiserver::start(
        &[
            "--cluster-name",
            "test",
            "--cluster-id",
            "1",
            "--etcd-config",
            &s(&admin_cfg),
            "--etcd-init",
            "--manifests",
            &s(&manifests),
            "--state-dir",
            &s(&state_dir),
            "--enable-kvstoremesh",
            "--clustermesh-config",
            &s(&mesh_dir),
            "--log-level",
            "warn",
        ],
        &work.path().join("apiserver.log"),
    )?;
    let took = api
        .wait_ready(Duration::from_secs(120))
        .context("KVStoreMesh (clustermesh-apiserver) not ready")?;
    println!(
        "KVStoreMesh ready after {:.1} s (all {} remotes mirrored into the local etcd)",
        took.as_secs_f64(),
        o.remotes
    );

    // The agent in its namespace with a private bpffs.
    let bpffs = Bpffs::mount()?;
    let netns = Netns::create()?;
    let relay_token = token.child_token();
    let _stop_relay = relay_token.clone().drop_guard();
    let port = relay(&netns.0, local.addr(), relay_token).await?;
    let files = local.try_client_files("local-test")?;
    let agent_cfg = work.path().join("agent-etcd.yaml");
    std::fs::write(
        &agent_cfg,
        format!(
            "endpoints:\n- https://127.0.0.1:{port}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        ),
    )?;
    let agent_mesh = work.path().join("agent-mesh");
    std::fs::create_dir_all(&agent_mesh)?;
    for r in 0..o.remotes {
        // Through KVStoreMesh the agent only needs the names.
        std::fs::write(
            agent_mesh.join(format!("c{}", r + 2)),
            "endpoints:\n- https://unused.invalid:2379\n",
        )?;
    }
    let pin_dir = bpffs.dir.path().join("agent");
    let log = work.path().join("agent.log");
    let agent_bin = find_binary("clustermesh-agent")?;
    let child = Command::new("ip")
        .args(["netns", "exec", &netns.0])
        .arg(&agent_bin)
        .args(["--cluster-name", "test", "--cluster-id", "1"])
        .args(["--node-name", "bench-node", "--node-ip", NODE_IP])
        .arg("--etcd-config")
        .arg(&agent_cfg)
        .arg("--clustermesh-config")
        .arg(&agent_mesh)
        .arg("--bpffs-dir")
        .arg(&pin_dir)
        .args(["--vxlan-dev", "cmvx0", "--health-addr", "127.0.0.1:9890"])
        .args(["--dns-addr", "off", "--sync-timeout", "120s"])
        .args(["--ipcache-max-entries", "262144"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("spawn {}", agent_bin.display()))?;
    let mut agent = Agent { child, log };

    // Ready: every seeded remote endpoint is in the pinned ipcache with its value.
    let t = Instant::now();
    let map = loop {
        if let Some(st) = agent.child.try_wait()? {
            bail!("agent exited with {st}:\n{}", agent.log_tail());
        }
        if let Ok(m) = open_ipcache(&pin_dir) {
            break m;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "agent never pinned its ipcache:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut pop = Population::new(&o);
    loop {
        if let Some(st) = agent.child.try_wait()? {
            bail!("agent exited with {st}:\n{}", agent.log_tail());
        }
        let mut last = None;
        let mut missing = 0;
        for (r, eps) in pop.clusters.iter().enumerate() {
            let c = r as u32 + 2;
            for ep in eps {
                let v = lookup(&map, ep.ip)?;
                if !is_expected(v, Some((ep.id, node_ip(c, ep.node)))) {
                    missing += 1;
                    last = Some((ep.ip, v));
                }
            }
        }
        if missing == 0 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "{missing} seeded endpoints not in the agent's ipcache after 120 s (e.g. {last:?}):\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "agent ready: all {} seeded remote endpoints in its pinned ipcache after {:.1} s ({:.1} s since start)",
        o.remotes * o.endpoints,
        t.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // Observers.
    let state: State = Arc::default();
    let rates = [o.rate, o.rate * 10];
    {
        let mut s = lock(&state);
        s.tally.done = vec![Default::default(); rates.len()];
        s.tally.lost = vec![(0, 0); rates.len()];
        s.tally.acks = vec![Vec::new(); rates.len()];
    }
    let roles = Roles {
        remote_etcds: remotes.etcds.iter().filter_map(TestEtcd::pid).collect(),
        local_etcd: local.pid().context("local etcd not running")?,
        kvstoremesh: api.pid().context("clustermesh-apiserver not running")?,
        agent: agent.child.id(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (state, stop) = (state.clone(), stop.clone());
        move || map_reader(state, map, stop)
    });
    struct StopReader(Arc<AtomicBool>);
    impl Drop for StopReader {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_reader = StopReader(stop.clone());
    let watch_token = token.child_token();
    let _stop_watch = watch_token.clone().drop_guard();
    let mut watchers = JoinSet::new();
    for etcd in &remotes.etcds {
        // Its own connection: on the writer's, the watch events would queue behind the put
        // responses (one HTTP/2 connection) and the baseline would measure our client.
        watchers.spawn(baseline_watch(
            root_client(etcd).await?,
            state.clone(),
            watch_token.clone(),
        ));
    }
    // Let the watches register before the first put, then 2 s with no churn: what every
    // process costs when idle (raft ticks, keepalives, the agent's loops) is the floor under
    // each phase's CPU line.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = CpuSnap::take(&roles, &state);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = idle.line(&CpuSnap::take(&roles, &state));

    let mut phases = Vec::new();
    for (phase, &rate) in rates.iter().enumerate() {
        lock(&state).phase = phase;
        eprintln!("churn at {rate}/s for {} s ...", o.duration.as_secs());
        let before = CpuSnap::take(&roles, &state);
        let (sent, mix, acked) = churn(&remotes, &o, &mut pop, &state, rate, o.duration).await?;
        let cpu = before.line(&CpuSnap::take(&roles, &state));
        // Drain: until nothing is outstanding (lost ones expire after LOST_AFTER).
        loop {
            expire_watch(&state);
            let (m, w) = {
                let s = lock(&state);
                (s.map.len(), s.watch.len())
            };
            if m == 0 && w == 0 {
                break;
            }
            if reader.is_finished() {
                bail!("the map reader stopped: {:?}", reader.join());
            }
            if let Some(r) = watchers.try_join_next() {
                bail!("a baseline watch stopped: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        phases.push((rate, sent, acked, mix, cpu));
    }
    stop.store(true, Ordering::Relaxed);
    match reader.join() {
        Ok(r) => r?,
        Err(_) => bail!("map reader panicked"),
    }
    if let Some(st) = agent.child.try_wait()? {
        bail!(
            "agent exited during the churn with {st}:\n{}",
            agent.log_tail()
        );
    }

    // Report.
    let mut s = lock(&state);
    let mut rounds = std::mem::take(&mut s.tally.rounds);
    rounds.sort();
    println!(
        "read-back: a reader thread looks up every outstanding key in the pinned ipcache, then pauses {READER_BACKOFF}× as long as the round took (at least {} µs); round time p50 {} p99 {} (the resolution of the map figures is round + pause)",
        READER_PAUSE.as_micros(),
        ms(percentile(&rounds, 0.5)).trim(),
        ms(percentile(&rounds, 0.99)).trim()
    );
    println!("idle, 2 s before the churn: {idle}");
    let mut pass = true;
    let mut first_p99 = None;
    for (phase, (rate, sent, acked, mix, cpu)) in phases.iter().enumerate() {
        let (mut m, mut w) = std::mem::take(&mut s.tally.done[phase]);
        m.sort();
        w.sort();
        let (lost_m, lost_w) = s.tally.lost[phase];
        let get = |k| mix.get(&k).copied().unwrap_or(0);
        // Reached: what the remote etcds took, from the first put to the last ack.
        let reached = *sent as f64 / acked.as_secs_f64().max(1e-9);
        let issued = *sent as f64 / o.duration.as_secs_f64();
        let rate_ok = reached >= 0.95 * f64::from(*rate);
        println!(
            "churn {rate}/s for {} s: asked {rate}/s, issued {issued:.0}/s, the remote etcds took {reached:.0}/s ({:.0}% of asked; last ack {:.1} s after the first put); {sent} updates ({} new, {} identity changes, {} tunnel endpoint changes, {} deletions) over {} remotes",
            o.duration.as_secs(),
            reached / f64::from(*rate) * 100.0,
            acked.as_secs_f64(),
            get(OpKind::New),
            get(OpKind::Identity),
            get(OpKind::Tunnel),
            get(OpKind::Delete),
            o.remotes,
        );
        let line = |what: &str, v: &[Duration], lost: Option<usize>| {
            println!(
                "    {what:<44} p50 {} p99 {} max {}  seen {:>6}{}",
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.99)),
                ms(v.last().copied().unwrap_or_default()),
                v.len(),
                lost.map(|l| format!("  lost {l}")).unwrap_or_default()
            );
        };
        let mut a = std::mem::take(&mut s.tally.acks[phase]);
        a.sort();
        line("remote etcd write acknowledged (the writer)", &a, None);
        line(
            "put -> KVStoreMesh -> agent -> BPF map entry",
            &m,
            Some(lost_m),
        );
        line("baseline: plain etcd put -> watch", &w, Some(lost_w));
        println!("    {cpu}");
        let p99 = percentile(&m, 0.99);
        let ratio = p99.as_secs_f64() / percentile(&w, 0.99).as_secs_f64().max(1e-9);
        let lost_ok = lost_m == 0 && lost_w == 0 && m.len() == *sent;
        // A phase that did not apply its rate did not measure what it is named after.
        let rate_word = if rate_ok {
            format!("rate reached ({reached:.0}/s ≥ 95% of {rate}/s)")
        } else {
            format!(
                "rate NOT reached: {reached:.0}/s of {rate}/s asked ({} writes in flight at most, {} connections per remote etcd; see the CPU line)",
                o.in_flight, o.writer_conns
            )
        };
        if phase == 0 {
            first_p99 = Some(p99);
            let ok = p99 < Duration::from_secs(1) && lost_ok && rate_ok;
            pass &= ok;
            println!(
                "    target (issue 18): p99 < 1 s with no update lost at {rate}/s: {}  (p99 = {ratio:.1}× the baseline's p99; {rate_word})",
                if ok { "PASS" } else { "FAIL" }
            );
        } else {
            let ok = lost_ok && rate_ok;
            pass &= ok;
            println!(
                "    10× rate: the issue sets no p99 target here (figures and ratio only); applied, no update lost: {}  (p99 = {ratio:.1}× the baseline's p99{}; {rate_word})",
                if ok { "PASS" } else { "FAIL" },
                first_p99
                    .map(|f| format!(", {:.1}× the p99 at {}/s", p99.as_secs_f64() / f.as_secs_f64().max(1e-9), rates[0]))
                    .unwrap_or_default()
            );
        }
    }
    drop(s);
    println!(
        "verdict: {} ({:.0} s in all; load {})",
        if pass { "PASS" } else { "FAIL" },
        t0.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Teardown in order: agent (programs, pins), namespace, bpffs, apiserver, etcds.
    drop(agent);
    drop(netns);
    drop(bpffs);
    api.stop()?;
    drop(remotes);
    Ok(pass)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let o = Opts::from_args()?;
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // On Ctrl-C or SIGTERM the bench future is dropped: every guard in it (agent, namespace,
    // bpffs, apiserver, etcds) tears down what it set up.
    let pass = tokio::select! {
        r = bench(o, token.clone()) => r?,
        _ = tokio::signal::ctrl_c() => { token.cancel(); bail!("interrupted; torn down") }
        _ = term.recv() => { token.cancel(); bail!("terminated; torn down") }
    };
    // Like the other benches, a FAIL is printed, not an exit status (scripts/bench.sh runs
    // them all in a row).
    let _ = pass;
    Ok(())
}
