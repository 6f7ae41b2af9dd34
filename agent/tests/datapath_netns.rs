//! Real packets through the datapath: two "nodes" (network namespaces) joined by an
//! underlay veth, each with a VXLAN device in external mode, pods in their own namespaces
//! behind veth pairs, the programs attached with the agent's loader and the maps programmed
//! by hand. Pod → pod on the same node and across the tunnel must work (ICMP and TCP), and
//! the underlay must carry VXLAN whose VNI is the sending pod's identity.
//!
//! Choices:
//! * Node 1 attaches with TCX links, node 2 through a clsact qdisc (the older-kernel path).
//! * Attaching runs in a thread that `setns`-ed into the node's namespace (interface names
//!   resolve per namespace; the TCX link keeps working after the thread ends), so the test
//!   needs no helper binary.
//! * Pods reach their gateway through a static neighbour entry (169.254.1.1 → the MAC of the
//!   host-side veth) and a route for 10.0.0.0/8 only: no ARP responder, no proxy_arp, and no
//!   default route anywhere.
//! * Addresses: underlay 198.18.0.0/24, pods 10.1.<node>.0/24; everything lives in
//!   namespaces named `cmtest-<pid>-*`, and the root namespace is untouched except for a
//!   private bpffs mount under a temporary directory. All of it is removed in `Drop`, also
//!   when an assertion fails.
//!
//! Needs root, iproute2 and ping; tcpdump is used when installed (otherwise the tunnel
//! trace map is the only VNI check).
// setns, if_nametoindex and umount2 have no safe std wrappers; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod netns_common;
use netns_common::{in_netns, run};

use anyhow::{bail, ensure, Context as _, Result};
use clustermesh_agent::datapath::{AttachMode, Config, Datapath, Error, Program};
use clustermesh_agent::kernel;
use clustermesh_ebpf_abi::{
    map, Counter, EndpointInfo, IpcacheValue, PolicyCtKey, PolicyCtValue, TraceSlot,
};

const NODE1_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE2_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const GATEWAY: &str = "169.254.1.1";

struct Pod {
    /// Suffix of the namespace name.
    ns: &'static str,
    /// Node index (1 or 2).
    node: u8,
    ip: Ipv4Addr,
    identity: u32,
    /// Host-side veth name (in the node namespace).
    host_if: &'static str,
    pod_mac: [u8; 6],
    host_mac: [u8; 6],
}

const POD_A: Pod = Pod {
    ns: "a",
    node: 1,
    ip: Ipv4Addr::new(10, 1, 1, 10),
    identity: 65_537,
    host_if: "lxc-a",
    pod_mac: [0x02, 0xcb, 0, 0, 0x0a, 0x01],
    host_mac: [0x02, 0xcb, 0, 0, 0x0a, 0x02],
};
const POD_C: Pod = Pod {
    ns: "c",
    node: 1,
    ip: Ipv4Addr::new(10, 1, 1, 11),
    identity: 65_538,
    host_if: "lxc-c",
    pod_mac: [0x02, 0xcb, 0, 0, 0x0c, 0x01],
    host_mac: [0x02, 0xcb, 0, 0, 0x0c, 0x02],
};
const POD_B: Pod = Pod {
    ns: "b",
    node: 2,
    ip: Ipv4Addr::new(10, 1, 2, 10),
    identity: 65_539,
    host_if: "lxc-b",
    pod_mac: [0x02, 0xcb, 0, 0, 0x0b, 0x01],
    host_mac: [0x02, 0xcb, 0, 0, 0x0b, 0x02],
};
const PODS: [&Pod; 3] = [&POD_A, &POD_C, &POD_B];

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(idx != 0, "no interface {name}");
    Ok(idx)
}

/// A private bpffs under a temporary directory, unmounted on drop.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mounted = kernel::ensure_bpffs(dir.path()).map_err(anyhow::Error::msg)?;
        ensure!(mounted, "fresh temp dir was already bpffs?");
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.dir.path().as_os_str().as_encoded_bytes()) {
            // SAFETY: unmounting the bpffs this value mounted; pins go with it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Namespaces and links of the two-node topology; deleted on drop.
struct Topology {
    prefix: String,
    created: Vec<String>,
}

impl Topology {
    fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn node_ns(&self, node: u8) -> String {
        self.ns(&format!("n{node}"))
    }

    fn add_ns(&mut self, suffix: &str) -> Result<String> {
        let name = self.ns(suffix);
        run(&["ip", "netns", "add", &name])?;
        self.created.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn build() -> Result<Self> {
        let mut t = Topology {
            prefix: format!("cmtest-{}-", std::process::id()),
            created: vec![],
        };
        let n1 = t.add_ns("n1")?;
        let n2 = t.add_ns("n2")?;
        // Underlay between the nodes.
        run(&[
            "ip", "-n", &n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns",
            &n2,
        ])?;
        for (ns, addr) in [(&n1, NODE1_UNDERLAY), (&n2, NODE2_UNDERLAY)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "ul0",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "ul0", "up"])?;
            run(&[
                "ip", "-n", ns, "link", "add", "vx0", "type", "vxlan", "dstport", "4789",
                "external",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "vx0", "up"])?;
        }
        for pod in PODS {
            let pns = t.add_ns(pod.ns)?;
            let node = t.node_ns(pod.node);
            run(&[
                "ip",
                "-n",
                &node,
                "link",
                "add",
                pod.host_if,
                "address",
                &mac(&pod.host_mac),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac(&pod.pod_mac),
                "netns",
                &pns,
            ])?;
            run(&["ip", "-n", &node, "link", "set", pod.host_if, "up"])?;
            // Room for the 50 bytes of VXLAN on a 1500-byte underlay.
            run(&["ip", "-n", &pns, "link", "set", "eth0", "mtu", "1450", "up"])?;
            run(&[
                "ip",
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{}/32", pod.ip),
                "dev",
                "eth0",
            ])?;
            run(&[
                "ip", "-n", &pns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
            ])?;
            run(&[
                "ip",
                "-n",
                &pns,
                "route",
                "add",
                "10.0.0.0/8",
                "via",
                GATEWAY,
                "dev",
                "eth0",
            ])?;
            run(&[
                "ip",
                "-n",
                &pns,
                "neigh",
                "add",
                GATEWAY,
                "lladdr",
                &mac(&pod.host_mac),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (and with them the TCX links).
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Loads a node's datapath (maps pinned under `pins/<node>`), attaches it in the node's
/// namespace and programs every pod.
fn node_datapath(t: &Topology, pins: &Path, node: u8) -> Result<Datapath> {
    let config = Config {
        pin_dir: Some(pins.join(format!("n{node}"))),
        ipcache_max_entries: 4096,
        local_endpoints_max_entries: 256,
        // Node 2 exercises the pre-6.6 path (clsact qdisc + netlink filter).
        attach: if node == 2 {
            AttachMode::Clsact
        } else {
            AttachMode::Tcx
        },
    };
    let mut dp = Datapath::load(&config)?;
    let local: Vec<&Pod> = PODS.iter().copied().filter(|p| p.node == node).collect();
    let (vx, host_ifs) = in_netns(&t.node_ns(node), || {
        for pod in &local {
            dp.attach(Program::FromPod, pod.host_if)?;
        }
        dp.attach(Program::FromOverlay, "vx0")?;
        let host_ifs: Vec<u32> = local
            .iter()
            .map(|p| ifindex(p.host_if))
            .collect::<Result<_>>()?;
        Ok((ifindex("vx0")?, host_ifs))
    })?;
    let (here, other) = if node == 1 {
        (NODE1_UNDERLAY, NODE2_UNDERLAY)
    } else {
        (NODE2_UNDERLAY, NODE1_UNDERLAY)
    };
    dp.maps.tunnel.set(vx, here, 4789)?;
    for (pod, ifindex) in local.iter().zip(host_ifs) {
        let info = EndpointInfo {
            ifindex,
            identity: pod.identity,
            flags: 0,
            pod_mac: pod.pod_mac,
            host_mac: pod.host_mac,
        };
        dp.maps.local_endpoints.upsert_v4(pod.ip, info)?;
    }
    for pod in PODS.iter().filter(|p| p.node != node) {
        dp.maps.ipcache.upsert_v4(
            pod.ip,
            32,
            IpcacheValue::tunnel_v4(pod.identity, other.octets()),
        )?;
    }
    Ok(dp)
}

fn ping(t: &Topology, from: &Pod, to: &Pod) -> Result<()> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns(from.ns),
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
        ])
        .arg(to.ip.to_string())
        .output()?;
    ensure!(
        out.status.success(),
        "ping {} → {} failed:\n{}",
        from.ip,
        to.ip,
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// A TCP connection from `from` to an echo listener in `to`.
fn tcp_echo(t: &Topology, from: &Pod, to: &Pod) -> Result<()> {
    let addr = SocketAddr::from((to.ip, 7777));
    let listener = in_netns(&t.ns(to.ns), || Ok(TcpListener::bind(addr)?))?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf)?;
        conn.write_all(&buf[..n])?;
        Ok(())
    });
    let mut conn = in_netns(&t.ns(from.ns), || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(3))?)
    })
    .with_context(|| format!("tcp connect {} → {addr}", from.ip))?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    conn.write_all(b"hello across the mesh")?;
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf)?;
    ensure!(
        &buf[..n] == b"hello across the mesh",
        "echo mismatch: {:?}",
        &buf[..n]
    );
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    Ok(())
}

/// Captures VXLAN on node 1's underlay while `f` runs; returns tcpdump's lines, or `None`
/// without tcpdump.
fn capture_vxlan(t: &Topology, f: impl FnOnce() -> Result<()>) -> Result<Option<Vec<String>>> {
    if Command::new("tcpdump").arg("--version").output().is_err() {
        f()?;
        return Ok(None);
    }
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.node_ns(1),
            "tcpdump",
            "-i",
            "ul0",
            "-nn",
            "-l",
            "-c",
            "4",
        ])
        .args(["udp", "port", "4789"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Wait until tcpdump is listening.
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?);
    let mut seen = String::new();
    while !seen.contains("listening on") {
        ensure!(stderr.read_line(&mut seen)? != 0, "tcpdump exited: {seen}");
    }
    let result = f();
    std::thread::sleep(Duration::from_millis(200));
    let _ = child.kill();
    let out = child.wait_with_output()?;
    result?;
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
    ))
}

#[test]
fn pods_talk_locally_and_across_the_vxlan_tunnel() -> Result<()> {
    let bpffs = Bpffs::new()?;
    kernel::check(bpffs.path()).context("kernel check")?;
    let topo = Topology::build()?;
    let mut node1 = node_datapath(&topo, bpffs.path(), 1)?;
    let node2 = node_datapath(&topo, bpffs.path(), 2)?;

    // Same node: from_pod redirects into pod C.
    ping(&topo, &POD_A, &POD_C)?;
    let c1 = node1.maps.from_pod_counters.read()?;
    ensure!(
        c1.get(Counter::DeliveredLocal) >= 6,
        "node1 from_pod: {:?}",
        c1.non_zero()
    );

    // Across the tunnel, with a capture on the underlay.
    let lines = capture_vxlan(&topo, || ping(&topo, &POD_A, &POD_B))?;
    if let Some(lines) = lines {
        let want = format!("vni {}", POD_A.identity);
        ensure!(
            // tcpdump prints the outer header, then the inner one on the next line.
            lines
                .windows(2)
                .any(|w| w[0].contains(&want) && w[1].contains("10.1.1.10 > 10.1.2.10")),
            "no VXLAN packet with {want} from pod A on the underlay:\n{}",
            lines.join("\n")
        );
        let back = format!("vni {}", POD_B.identity);
        ensure!(
            lines.iter().any(|l| l.contains(&back)),
            "no reply with {back}:\n{}",
            lines.join("\n")
        );
    }
    tcp_echo(&topo, &POD_A, &POD_B)?;
    tcp_echo(&topo, &POD_B, &POD_C)?;

    let c1 = node1.maps.from_pod_counters.read()?;
    ensure!(
        c1.get(Counter::Tunnelled) >= 3,
        "node1 from_pod: {:?}",
        c1.non_zero()
    );
    let o2 = node2.maps.from_overlay_counters.read()?;
    ensure!(
        o2.get(Counter::DeliveredLocal) >= 3,
        "node2 from_overlay: {:?}",
        o2.non_zero()
    );
    ensure!(
        o2.get(Counter::NoTunnelKey) == 0,
        "collect_md metadata missing: {:?}",
        o2.non_zero()
    );
    // The receiving side read pod A's identity out of the VNI.
    let traces = node2.maps.traces.read(TraceSlot::Ingress)?;
    ensure!(
        traces
            .iter()
            .any(|t| t.remote_ipv4 == NODE1_UNDERLAY.octets()
                && (t.vni == POD_A.identity || t.vni == POD_C.identity)),
        "node2 ingress traces: {traces:?}"
    );
    for c in [
        Counter::DropMalformed,
        Counter::DropTruncated,
        Counter::DropHelper,
    ] {
        ensure!(
            c1.get(c) == 0 && o2.get(c) == 0,
            "drops: {:?} / {:?}",
            c1.non_zero(),
            o2.non_zero()
        );
    }

    // An agent restart: the new loader reuses the pinned maps (entries intact, nothing
    // re-programmed) and attaches again.
    drop(node1);
    let config = Config {
        pin_dir: Some(bpffs.path().join("n1")),
        ipcache_max_entries: 4096,
        local_endpoints_max_entries: 256,
        ..Config::default()
    };
    node1 = Datapath::load(&config)?;
    ensure!(
        node1.maps.ipcache.get_v4(POD_B.ip, 32)?.is_some(),
        "ipcache lost across reload"
    );
    ensure!(
        node1.maps.local_endpoints.get_v4(POD_A.ip)?.is_some(),
        "endpoints lost"
    );
    in_netns(&topo.node_ns(1), || {
        for pod in [&POD_A, &POD_C] {
            node1.attach(Program::FromPod, pod.host_if)?;
        }
        node1.attach(Program::FromOverlay, "vx0")?;
        Ok(())
    })?;
    ping(&topo, &POD_A, &POD_B)?;
    drop(topo);
    Ok(())
}

#[test]
fn a_pin_with_another_layout_is_refused_not_reused() -> Result<()> {
    let bpffs = Bpffs::new()?;
    let dir: PathBuf = bpffs.path().join("node");
    let config = Config {
        pin_dir: Some(dir.clone()),
        ..Config::default()
    };
    drop(Datapath::load(&config)?);
    // A differently sized ipcache (a config change) must not silently reuse the old map.
    let resized = Config {
        ipcache_max_entries: 1024,
        ..config
    };
    match Datapath::load(&resized) {
        Err(Error::IncompatiblePin { path, what }) => {
            ensure!(path == dir.join(map::IPCACHE), "{path:?}");
            ensure!(what.contains("1024"), "{what}");
        }
        Err(other) => bail!("unexpected error: {other}"),
        Ok(_) => bail!("an incompatible pin was reused"),
    }
    // Not on bpffs at all.
    let plain = tempfile::tempdir()?;
    let err = Datapath::load(&Config {
        pin_dir: Some(plain.path().into()),
        ..Config::default()
    })
    .err()
    .context("a pin dir outside bpffs was accepted")?;
    ensure!(err.to_string().contains("mount -t bpf bpf"), "{err}");
    Ok(())
}

/// Policy connection tracking is pinned like the other datapath maps: a restarted agent
/// keeps the connections, so replies of connections opened before the restart still pass.
#[test]
fn policy_connections_survive_a_reload() -> Result<()> {
    let bpffs = Bpffs::new()?;
    let config = Config {
        pin_dir: Some(bpffs.path().join("node")),
        ipcache_max_entries: 1024,
        local_endpoints_max_entries: 64,
        ..Config::default()
    };
    let key = PolicyCtKey {
        saddr: [10, 2, 1, 11],
        daddr: [10, 1, 1, 11],
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        pad: [0; 3],
    };
    let ct = |dp: &mut Datapath| -> Result<aya::maps::HashMap<_, PolicyCtKey, PolicyCtValue>> {
        Ok(aya::maps::HashMap::try_from(
            dp.take_map(map::POLICY_CT).context("no CT map")?,
        )?)
    };
    {
        let mut dp = Datapath::load(&config)?;
        ct(&mut dp)?.insert(
            key,
            PolicyCtValue {
                last_seen_ns: 42,
                lifetime_ns: 7,
            },
            0,
        )?;
    }
    ensure!(
        bpffs.path().join("node").join(map::POLICY_CT).exists(),
        "not pinned"
    );
    let mut dp = Datapath::load(&config)?;
    let seen = ct(&mut dp)?
        .get(&key, 0)
        .context("connection lost across reload")?;
    ensure!((seen.last_seen_ns, seen.lifetime_ns) == (42, 7), "{seen:?}");
    Ok(())
}
