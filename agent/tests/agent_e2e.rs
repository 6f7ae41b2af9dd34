//! End to end: the real `clustermesh-agent` binary in two node namespaces of two clusters,
//! each against its own real etcd (TestEtcd) holding hand-written Cilium-format entries for
//! its own cluster and a KVStoreMesh cache of the other cluster.
//!
//! * Pods ping and TCP-connect on the same node and across clusters (through the tunnel).
//! * Deleting the remote pod's entry from the cache takes it out of the ipcache within 1 s
//!   (measured on the pinned map) and traffic to it fails (no kernel route); putting it back
//!   restores it.
//! * Hostile remote entries (identity out of range, key mismatch) never reach the map.
//! * Node n1 (GRO on its underlay) decapsulates in `from_underlay`, n2 (GRO off) receives
//!   through the VXLAN device and `from_overlay`: both receive paths carry traffic.
//! * `kill -TERM` + restart of an agent while a TCP stream crosses its node: the stream keeps
//!   flowing with no reset, the restarted agent adopts the maps (no rewrite) and swaps its
//!   programs into the pinned links (pods, VXLAN device, underlay).
//! * `--cleanup` removes the pins.
//! * IPv6 (dual-stack pods over the IPv4 underlay): every pod also has an IPv6 address and
//!   entry; remote IPv6 entries land in the pinned ipcache tunnelled to the IPv4 `HostIP`
//!   (or to an IPv6 `HostIP` on c1, which has `--node-ip6`), local pods get IPv6 local
//!   endpoints on their IPv4 sibling's interface, hostile IPv6 entries never land, a /128
//!   claimed by both clusters is programmed for the local cluster and named in `/status`,
//!   ping over IPv6 crosses the clusters, and a deleted IPv6 entry leaves the map within 1 s.
//!
//! Layout: namespaces `cmae<pid>-{n1,n2,a1,a2,b1}`; node n1 is cluster c1 (ID 1), node n2
//! cluster c2 (ID 2); underlay `eth0` 198.18.1.11/16 and 198.18.2.11/16 on one veth (the
//! lab puts a router between the subnets; the datapath does not care); pods per the lab
//! contract (names, MACs, routes). Each agent reaches its etcd, which listens on the root
//! namespace's loopback, through a small TCP relay listening on 127.0.0.1 inside the node
//! namespace. Everything (agents, relays, namespaces, the bpffs mount) goes in `Drop`.
//!
//! Needs root, iproute2, ethtool, ping and /usr/bin/etcd.
#![allow(unsafe_code)] // setns, umount2 and kill have no safe std wrappers; SAFETY notes below.

use std::ffi::CString;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod netns_common;
use netns_common::{in_netns, run};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};
use clustermesh_agent::kernel;
use clustermesh_ebpf_abi::{ipcache_flags, EndpointInfo, EndpointKey, IpcacheKey, IpcacheValue};
use clustermesh_tests::etcd::TestEtcd;
use clustermesh_tests::etcd_client::Client;

const GATEWAY: &str = "169.254.1.1";
const AGENT: &str = env!("CARGO_BIN_EXE_clustermesh-agent");

struct Pod {
    ns: &'static str,
    name: &'static str,
    node: usize,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    identity: u32,
}

struct NodeSpec {
    ns: &'static str,
    cluster: &'static str,
    cluster_id: u32,
    ip: Ipv4Addr,
}

const NODES: [NodeSpec; 2] = [
    NodeSpec {
        ns: "n1",
        cluster: "c1",
        cluster_id: 1,
        ip: Ipv4Addr::new(198, 18, 1, 11),
    },
    NodeSpec {
        ns: "n2",
        cluster: "c2",
        cluster_id: 2,
        ip: Ipv4Addr::new(198, 18, 2, 11),
    },
];

// Identities inside each cluster's range (cluster ID << 16).
const A1: Pod = Pod {
    ns: "a1",
    name: "a1",
    node: 0,
    ip: Ipv4Addr::new(10, 1, 1, 11),
    ip6: Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x11),
    identity: 65_537,
};
const A2: Pod = Pod {
    ns: "a2",
    name: "a2",
    node: 0,
    ip: Ipv4Addr::new(10, 1, 1, 12),
    ip6: Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x12),
    identity: 65_538,
};
const B1: Pod = Pod {
    ns: "b1",
    name: "b1",
    node: 1,
    ip: Ipv4Addr::new(10, 2, 1, 11),
    ip6: Ipv6Addr::new(0xfd00, 0x10, 2, 1, 0, 0, 0, 0x11),
    identity: 131_073,
};
const PODS: [&Pod; 3] = [&A1, &A2, &B1];

/// c1's IPv6 underlay address (`--node-ip6`; on eth0 too) and c2's.
const NODE6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x11),
    Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 0x11),
];
/// The pods' IPv6 gateway (a permanent neighbour, the host veth's MAC).
const GATEWAY6: &str = "fe80::1";

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
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.dir.path().as_os_str().as_encoded_bytes()) {
            // SAFETY: unmounting the bpffs this value mounted; pins go with it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Relays TCP from 127.0.0.1:`port` inside a namespace to `target` in the root namespace.
struct Relay {
    stop: Arc<AtomicBool>,
    port: u16,
}

impl Relay {
    fn start(ns: &str, target: SocketAddr) -> Result<Self> {
        let listener = in_netns(ns, || Ok(TcpListener::bind("127.0.0.1:0")?))?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok((inner, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                // This thread is in the root namespace: the outgoing socket is too.
                let Ok(outer) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = inner.set_nonblocking(false);
                for (mut from, mut to) in [
                    (inner.try_clone(), outer.try_clone()),
                    (outer.try_clone(), inner.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while !flag.load(Ordering::Relaxed) {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(Self { stop, port })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Lab {
    prefix: String,
    created: Vec<String>,
}

impl Lab {
    fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn add_ns(&mut self, suffix: &str) -> Result<String> {
        let name = self.ns(suffix);
        run(&["ip", "netns", "add", &name])?;
        self.created.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn build() -> Result<Self> {
        let mut lab = Lab {
            prefix: format!("cmae{}-", std::process::id()),
            created: vec![],
        };
        let n1 = lab.add_ns("n1")?;
        let n2 = lab.add_ns("n2")?;
        run(&[
            "ip", "-n", &n1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &n2,
        ])?;
        // GRO on n1's underlay only: its agent (`--underlay-dev auto`) decapsulates in
        // from_underlay, n2's receives through the VXLAN device, so the cross-cluster traffic
        // and the restart of agent c1 cover both receive paths.
        run(&[
            "ip", "netns", "exec", &n1, "ethtool", "-K", "eth0", "gro", "on",
        ])?;
        run(&[
            "ip", "netns", "exec", &n2, "ethtool", "-K", "eth0", "gro", "off",
        ])?;
        for (ns, node) in [(&n1, &NODES[0]), (&n2, &NODES[1])] {
            let addr = format!("{}/16", node.ip);
            run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            let i = usize::from(node.cluster_id as u8 - 1);
            let addr6 = format!("{}/48", NODE6[i]);
            run(&[
                "ip", "-n", ns, "addr", "add", &addr6, "dev", "eth0", "nodad",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
            run(&[
                "ip", "-n", ns, "link", "add", "cmvx0", "type", "vxlan", "dstport", "4789",
                "external",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "cmvx0", "mtu", "1450", "up"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
        }
        for pod in PODS {
            let pns = lab.add_ns(pod.ns)?;
            let node = lab.ns(NODES[pod.node].ns);
            // Any names and MACs: the agent finds the pod from its /32 route and the peer.
            let host_if = format!("hv{}x{}", pod.ip.octets()[1], pod.ip.octets()[3]);
            run(&[
                "ip", "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &pns,
            ])?;
            run(&["ip", "-n", &node, "link", "set", &host_if, "up"])?;
            let mac = run(&[
                "ip",
                "netns",
                "exec",
                &node,
                "cat",
                &format!("/sys/class/net/{host_if}/address"),
            ])?;
            let mac = mac.trim().to_owned();
            parse_mac(&mac)?;
            run(&[
                "ip",
                "-n",
                &node,
                "route",
                "add",
                &format!("{}/32", pod.ip),
                "dev",
                &host_if,
            ])?;
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
                "ip",
                "-n",
                &pns,
                "addr",
                "add",
                &format!("{}/128", pod.ip6),
                "dev",
                "eth0",
                "nodad",
            ])?;
            run(&[
                "ip",
                "-n",
                &node,
                "route",
                "add",
                &format!("{}/128", pod.ip6),
                "dev",
                &host_if,
            ])?;
            run(&[
                "ip", "-n", &pns, "route", "add", "fd00::/8", "via", GATEWAY6, "dev", "eth0",
            ])?;
            run(&[
                "ip",
                "-n",
                &pns,
                "neigh",
                "add",
                GATEWAY6,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
            run(&[
                "ip", "-n", &pns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
            ])?;
            for cidr in ["10.0.0.0/8", "172.20.0.0/16"] {
                run(&[
                    "ip", "-n", &pns, "route", "add", cidr, "via", GATEWAY, "dev", "eth0",
                ])?;
            }
            run(&[
                "ip",
                "-n",
                &pns,
                "neigh",
                "add",
                GATEWAY,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        // a3: an IPv6-only pod on n1 (a routed veth, no IPv4 address).
        let a3 = lab.add_ns("a3")?;
        run(&[
            "ip", "-n", &n1, "link", "add", A3_IF, "type", "veth", "peer", "name", "eth0", "netns",
            &a3,
        ])?;
        run(&["ip", "-n", &n1, "link", "set", A3_IF, "up"])?;
        let mac = run(&[
            "ip",
            "netns",
            "exec",
            &n1,
            "cat",
            &format!("/sys/class/net/{A3_IF}/address"),
        ])?;
        let a3_ip = format!("{A3_IP6}/128");
        run(&["ip", "-n", &n1, "route", "add", &a3_ip, "dev", A3_IF])?;
        run(&["ip", "-n", &a3, "link", "set", "eth0", "mtu", "1450", "up"])?;
        run(&[
            "ip", "-n", &a3, "addr", "add", &a3_ip, "dev", "eth0", "nodad",
        ])?;
        run(&[
            "ip", "-n", &a3, "route", "add", "fd00::/8", "via", GATEWAY6, "dev", "eth0",
        ])?;
        run(&[
            "ip",
            "-n",
            &a3,
            "neigh",
            "add",
            GATEWAY6,
            "lladdr",
            mac.trim(),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(lab)
    }
}

/// The IPv6-only pod a3 on n1 and its host-side veth.
const A3_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 1, 0, 0, 0, 0x13);
const A3_IF: &str = "hv6a3";

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("mac {s:?}"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("mac {s:?} is not 6 bytes"))
}

// ---------------------------------------------------------------------------------------
// etcd contents (Cilium formats, as in the remote reader suites)

fn node_json(cluster: &str, id: u32, name: &str, ip: Ipv4Addr) -> String {
    format!(
        r#"{{"Name":"{name}","Cluster":"{cluster}","IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}],"IPv4AllocCIDR":{{"IP":"10.{id}.1.0","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":{id},"Source":"custom-resource","EncryptionKey":0,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}}"#
    )
}

fn ip_json(ip: &str, host: impl std::fmt::Display, id: u32, pod: &str) -> String {
    format!(
        r#"{{"IP":"{ip}","HostIP":"{host}","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"{pod}","K8sServiceAccount":"default"}}"#
    )
}

fn labels(cluster: &str, app: &str) -> String {
    format!("k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=default;")
}

const STORES: [&str; 5] = [
    "nodes/v1",
    "services/v1",
    "serviceexports/v1",
    "identities/v1",
    "ip/v1",
];

/// Writes cluster `me`'s own state and a KVStoreMesh cache of `other` into `c`.
async fn seed(c: &mut Client, me: &NodeSpec, other: &NodeSpec) -> Result<()> {
    c.put("cilium/.heartbeat", "2026-01-01T00:00:00Z", None)
        .await?;
    for (spec, cached) in [(me, false), (other, true)] {
        let n = spec.cluster;
        let (ip_key, node_key, id_key) = if cached {
            (
                format!("cilium/cache/ip/v1/{n}/"),
                format!("cilium/cache/nodes/v1/{n}/"),
                format!("cilium/cache/identities/v1/{n}/id/"),
            )
        } else {
            (
                "cilium/state/ip/v1/default/".into(),
                format!("cilium/state/nodes/v1/{n}/"),
                "cilium/state/identities/v1/id/".into(),
            )
        };
        c.put(
            format!("{node_key}n1"),
            node_json(n, spec.cluster_id, "n1", spec.ip),
            None,
        )
        .await?;
        for pod in PODS
            .iter()
            .filter(|p| NODES[p.node].cluster == spec.cluster)
        {
            c.put(
                format!("{ip_key}{}", pod.ip),
                ip_json(&pod.ip.to_string(), spec.ip, pod.identity, pod.name),
                None,
            )
            .await?;
            c.put(
                format!("{ip_key}{}", pod.ip6),
                ip_json(&pod.ip6.to_string(), spec.ip, pod.identity, pod.name),
                None,
            )
            .await?;
            c.put(
                format!("{id_key}{}", pod.identity),
                labels(n, pod.name),
                None,
            )
            .await?;
        }
        if cached {
            c.put(
                format!("cilium/cluster-config/{n}"),
                format!(
                    r#"{{"id":{},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}"#,
                    spec.cluster_id
                ),
                None,
            )
            .await?;
            // Hostile entries: an identity of another cluster's range, and a key that does
            // not match its value.
            c.put(
                format!("{ip_key}10.9.9.9"),
                ip_json("10.9.9.9", spec.ip, 65_539, "evil"),
                None,
            )
            .await?;
            c.put(
                format!("{ip_key}10.9.9.8"),
                ip_json("10.9.9.7", spec.ip, spec.cluster_id << 16 | 5, "evil"),
                None,
            )
            .await?;
            // The same for IPv6, and an address that does not parse.
            c.put(
                format!("{ip_key}fd00:9::9"),
                ip_json("fd00:9::9", spec.ip, 65_539, "evil"),
                None,
            )
            .await?;
            c.put(
                format!("{ip_key}fd00:9::8"),
                ip_json("fd00:9::7", spec.ip, spec.cluster_id << 16 | 5, "evil"),
                None,
            )
            .await?;
            c.put(
                format!("{ip_key}fd00:9::zz"),
                ip_json("fd00:9::zz", spec.ip, spec.cluster_id << 16 | 5, "evil"),
                None,
            )
            .await?;
            for s in STORES {
                c.put(
                    format!("cilium/synced/{n}/cilium/cache/{s}"),
                    "2026-01-01T00:00:00Z",
                    None,
                )
                .await?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// agents

struct Agent {
    ns: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    pin_dir: PathBuf,
}

impl Agent {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, AGENT])
            .args(&self.args)
            .env("RUST_LOG", "info,clustermesh_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM and wait (graceful stop).
    fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(st) = c.try_wait()? {
                    ensure!(st.success(), "agent exited with {st}");
                    return Ok(());
                }
                ensure!(Instant::now() < deadline, "agent did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn http(&self, path: &str) -> Result<(u16, String)> {
        let addr: SocketAddr = "127.0.0.1:9890".parse()?;
        let mut s = in_netns(&self.ns, || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1))?)
        })?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code: u16 = out
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((code, body.to_owned()))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("agent exited with {st}:\n{}", self.log_tail());
                }
            }
            if let Ok((200, _)) = self.http("/readyz") {
                return Ok(start.elapsed());
            }
            ensure!(
                start.elapsed() < timeout,
                "agent not ready after {timeout:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = self.http("/status")?;
        ensure!(code == 200, "/status: {code}");
        Ok(serde_json::from_str(&body)?)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The agent's pinned local endpoints map.
    fn endpoints(&self) -> Result<aya::maps::HashMap<MapData, EndpointKey, EndpointInfo>> {
        let data = MapData::from_pin(
            self.pin_dir
                .join(clustermesh_ebpf_abi::map::LOCAL_ENDPOINTS),
        )?;
        Ok(aya::maps::HashMap::try_from(Map::HashMap(data))?)
    }

    /// The agent's pinned ipcache, opened from the root namespace.
    fn ipcache(&self) -> Result<LpmTrie<MapData, IpcacheKey, IpcacheValue>> {
        let data = MapData::from_pin(self.pin_dir.join(clustermesh_ebpf_abi::map::IPCACHE))?;
        Ok(LpmTrie::try_from(Map::LpmTrie(data))?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn lookup(map: &LpmTrie<MapData, IpcacheKey, IpcacheValue>, ip: Ipv4Addr) -> Option<IpcacheValue> {
    map.get(&Key::new(64, IpcacheKey::v4(ip.octets())), 0).ok()
}

/// The exact /128 entry of `ip` (Cilium's IPv6 key: prefixlen 32 + 128).
fn lookup6(map: &LpmTrie<MapData, IpcacheKey, IpcacheValue>, ip: Ipv6Addr) -> Option<IpcacheValue> {
    map.get(&Key::new(160, IpcacheKey::v6(ip.octets())), 0).ok()
}

/// How long a check of an agent's report waits for what it asserts: `/status` is
/// republished every second, so one read can be a period behind what already happened (the
/// c2 receive check once read every counter as 0, 1.7 s after the traffic).
const REPORT_WAIT: Duration = Duration::from_secs(5);

/// Reads until `holds` or `timeout`; then fails with `fail` of the last value read, so the
/// message shows what the agent said, not only that it was wrong.
fn wait_for<T>(
    timeout: Duration,
    mut read: impl FnMut() -> Result<T>,
    holds: impl Fn(&T) -> bool,
    fail: impl FnOnce(&T) -> String,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let value = read()?;
        if holds(&value) {
            return Ok(value);
        }
        if start.elapsed() > timeout {
            bail!("{} (still so after {timeout:?})", fail(&value));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Packets `program` delivered to a local pod, from an agent's `/status`.
fn delivered(st: &serde_json::Value, program: &str) -> u64 {
    st["programs"][program]["delivered_local"]
        .as_u64()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// traffic

fn ping(lab: &Lab, from: &Pod, to: &Pod, count: u32) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns(from.ns), "ping", "-c"])
        .arg(count.to_string())
        .args(["-i", "0.2", "-W", "1", "-q"])
        .arg(to.ip.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ping6(lab: &Lab, from: &Pod, to: &Pod, count: u32) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns(from.ns), "ping", "-6", "-c"])
        .arg(count.to_string())
        .args(["-i", "0.2", "-W", "1", "-q"])
        .arg(to.ip6.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The dual-stack service of [`ipv6_checks`].
const VIP4: &str = "172.20.0.10";
const VIP6: &str = "fd00:172:20::10";

/// TCP from `from` to `vip:80`, which the LB must send to `backend:port` in pod `to`: the
/// echo proves the connection went there and the replies came back from the VIP.
fn tcp_via(lab: &Lab, from: &Pod, vip: IpAddr, to: &Pod, backend: IpAddr, port: u16) -> Result<()> {
    let listener = in_netns(&lab.ns(to.ns), || {
        Ok(TcpListener::bind(SocketAddr::new(backend, port))?)
    })?;
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(
                        Instant::now() < deadline,
                        "no connection reached the backend"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        conn.set_nonblocking(false)?;
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf)?;
        conn.write_all(&buf[..n])?;
        Ok(())
    });
    let addr = SocketAddr::new(vip, 80);
    let result = (|| -> Result<()> {
        let mut conn = in_netns(&lab.ns(from.ns), || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
        })
        .with_context(|| format!("tcp connect {} → {addr}", from.name))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(b"hello through the VIP")?;
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf)?;
        ensure!(&buf[..n] == b"hello through the VIP", "echo mismatch");
        Ok(())
    })();
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))?;
    result.and(served)
}

fn tcp_echo(lab: &Lab, from: &Pod, to: &Pod, port: u16) -> Result<()> {
    let addr = SocketAddr::from((to.ip, port));
    let listener = in_netns(&lab.ns(to.ns), || Ok(TcpListener::bind(addr)?))?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf)?;
        conn.write_all(&buf[..n])?;
        Ok(())
    });
    let mut conn = in_netns(&lab.ns(from.ns), || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(3))?)
    })
    .with_context(|| format!("tcp connect {} → {addr}", from.ip))?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    conn.write_all(b"hello across the mesh")?;
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf)?;
    ensure!(&buf[..n] == b"hello across the mesh", "echo mismatch");
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    Ok(())
}

/// A TCP stream from `from` to `to` that keeps sending until stopped; the receiver counts
/// bytes.
struct Stream {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sender: Option<std::thread::JoinHandle<Result<u64>>>,
    receiver: Option<std::thread::JoinHandle<Result<u64>>>,
}

impl Stream {
    fn start(lab: &Lab, from: &Pod, to: &Pod, port: u16) -> Result<Self> {
        let addr = SocketAddr::from((to.ip, port));
        let listener = in_netns(&lab.ns(to.ns), || Ok(TcpListener::bind(addr)?))?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let rx = received.clone();
        let receiver = std::thread::spawn(move || -> Result<u64> {
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = conn.read(&mut buf).context("receive (reset?)")?;
                if n == 0 {
                    return Ok(rx.load(Ordering::Relaxed));
                }
                rx.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        let mut conn = in_netns(&lab.ns(from.ns), || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(3))?)
        })?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        let flag = stop.clone();
        let sender = std::thread::spawn(move || -> Result<u64> {
            let chunk = vec![0x5au8; 16 * 1024];
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) {
                conn.write_all(&chunk).context("send (reset or stalled?)")?;
                sent += chunk.len() as u64;
                // ~20 MB/s: enough to see a stall, light on two shared cores.
                std::thread::sleep(Duration::from_micros(800));
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        Ok(Self {
            received,
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes received during `d`.
    fn progress(&self, d: Duration) -> u64 {
        let before = self.received();
        std::thread::sleep(d);
        self.received() - before
    }

    fn finish(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .context("sender")?
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let got = self
            .receiver
            .take()
            .context("receiver")?
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        Ok((sent, got))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The IPv6 half of the control plane on c1 (see the module docs).
fn ipv6_checks(
    rt: &tokio::runtime::Runtime,
    clients: &mut [Client],
    agents: &[Agent],
    lab: &Lab,
) -> Result<()> {
    // A remote entry tunnelled to an IPv6 HostIP, and c2 claiming c1's pod a2's /128.
    let via6 = Ipv6Addr::new(0xfd00, 0x10, 2, 1, 0, 0, 0, 0x99);
    // a3, IPv6-only, on c1's node.
    rt.block_on(clients[0].put(
        format!("cilium/state/ip/v1/default/{A3_IP6}"),
        ip_json(&A3_IP6.to_string(), NODES[0].ip, A1.identity, "a3"),
        None,
    ))?;
    rt.block_on(clients[0].put(
        format!("cilium/cache/ip/v1/c2/{via6}"),
        ip_json(&via6.to_string(), NODE6[1], B1.identity, "b9"),
        None,
    ))?;
    rt.block_on(clients[0].put(
        format!("cilium/cache/ip/v1/c2/{}", A2.ip6),
        ip_json(&A2.ip6.to_string(), NODES[1].ip, B1.identity, "thief"),
        None,
    ))?;
    let ipc1 = agents[0].ipcache()?;
    let b1 = wait_for(
        REPORT_WAIT,
        || Ok(lookup6(&ipc1, B1.ip6)),
        Option::is_some,
        |_| "remote pod b1's IPv6 entry missing from c1's ipcache".into(),
    )?
    .context("b1 v6")?;
    ensure!(b1.sec_identity == B1.identity, "{b1:?}");
    ensure!(
        b1.flags == ipcache_flags::HAS_TUNNEL | ipcache_flags::REMOTE_CLUSTER
            && b1.tunnel_endpoint[..4] == NODES[1].ip.octets(),
        "b1's IPv6 entry should be tunnelled to c2's IPv4 underlay: {b1:?}"
    );
    let v = wait_for(
        REPORT_WAIT,
        || Ok(lookup6(&ipc1, via6)),
        Option::is_some,
        |_| format!("{via6} (IPv6 HostIP) missing from c1's ipcache"),
    )?
    .context("via6")?;
    ensure!(
        v.flags
            == ipcache_flags::HAS_TUNNEL
                | ipcache_flags::IPV6_TUNNEL
                | ipcache_flags::REMOTE_CLUSTER
            && Ipv6Addr::from(v.tunnel_endpoint) == NODE6[1],
        "an IPv6 HostIP should give an IPv6 tunnel: {v:?}"
    );
    for pod in [&A1, &A2] {
        let e = lookup6(&ipc1, pod.ip6).with_context(|| format!("local {} v6", pod.name))?;
        ensure!(
            e.flags == 0 && e.sec_identity == pod.identity,
            "local pod {}'s IPv6 entry (c2's claim on a2 must lose): {e:?}",
            pod.name
        );
    }
    for hostile in ["fd00:9::9", "fd00:9::8", "fd00:9::7"] {
        ensure!(
            lookup6(&ipc1, hostile.parse()?).is_none(),
            "hostile IPv6 entry {hostile} reached the map"
        );
    }
    // The conflict is named; local endpoints follow the IPv4 sibling's interface.
    let st = wait_for(
        REPORT_WAIT,
        || agents[0].status(),
        |st| {
            let v6 = &st["datapath"]["ipv6"];
            v6["conflicting-prefixes"] == 1
                && v6["pods"]
                    .as_array()
                    .is_some_and(|p| p.len() == 3 && p.iter().all(|p| p["state"] == "programmed"))
        },
        |st| format!("c1's IPv6 status: {}", st["datapath"]["ipv6"]),
    )?;
    let c = &st["datapath"]["ipv6"]["conflicts"][0];
    ensure!(
        c["prefix"] == format!("{}/128", A2.ip6).as_str()
            && c["clusters"] == serde_json::json!(["c1", "c2"])
            && c["programmed"] == "c1",
        "conflict not named: {c}"
    );
    let eps = agents[0].endpoints()?;
    for pod in [&A1, &A2] {
        let v4 = eps.get(&EndpointKey::v4(pod.ip.octets()), 0)?;
        let v6 = eps.get(&EndpointKey::v6(pod.ip6.octets()), 0)?;
        ensure!(
            v6.ifindex == v4.ifindex && v6.pod_mac == v4.pod_mac && v6.identity == pod.identity,
            "{}'s IPv6 endpoint {v6:?} vs IPv4 {v4:?}",
            pod.name
        );
    }
    // The IPv6-only pod: found by its own route, from_pod attached, reachable both ways.
    let ifindex: u32 = run(&[
        "ip",
        "netns",
        "exec",
        &lab.ns("n1"),
        "cat",
        &format!("/sys/class/net/{A3_IF}/ifindex"),
    ])?
    .trim()
    .parse()?;
    let a3 = eps.get(&EndpointKey::v6(A3_IP6.octets()), 0)?;
    ensure!(
        a3.ifindex == ifindex,
        "a3's endpoint {a3:?}, {A3_IF} is #{ifindex}"
    );
    let a3_pod = Pod {
        ns: "a3",
        name: "a3",
        node: 0,
        ip: Ipv4Addr::UNSPECIFIED,
        ip6: A3_IP6,
        identity: A1.identity,
    };
    ensure!(
        ping6(lab, &A1, &a3_pod, 2),
        "ping -6 a1 → a3 (IPv6-only pod)"
    );
    ensure!(
        ping6(lab, &a3_pod, &A1, 2),
        "ping -6 a3 → a1 (from_pod on a3's veth)"
    );
    // Traffic over IPv6, same node and across clusters (IPv4 underlay).
    ensure!(ping6(lab, &A1, &A2, 2), "ping -6 a1 → a2 (same node)");
    ensure!(ping6(lab, &A1, &B1, 2), "ping -6 a1 → b1 (c1 → c2)");
    // A dual-stack global service of c1 whose only backend is c2's pod b1: TCP to the IPv6
    // VIP is balanced to b1's IPv6 address (lb6 maps), and to the IPv4 VIP as before.
    let frontends = format!(
        r#"{{"{VIP4}":{{"http":{{"Protocol":"TCP","Port":80}}}},"{VIP6}":{{"http":{{"Protocol":"TCP","Port":80}}}}}}"#
    );
    rt.block_on(clients[0].put(
        "clustermesh/local/v1/services/default/echo",
        format!(
            r#"{{"cluster":"c1","namespace":"default","name":"echo","frontends":{frontends},"backends":{{}},"labels":{{}},"selector":{{"app":"echo"}},"includeExternal":true,"shared":true,"clusterID":1}}"#
        ),
        None,
    ))?;
    rt.block_on(clients[0].put(
        "cilium/cache/services/v1/c2/default/echo",
        format!(
            r#"{{"cluster":"c2","namespace":"default","name":"echo","frontends":{frontends},"backends":{{"{}":{{"http":{{"Protocol":"TCP","Port":8080}}}},"{}":{{"http":{{"Protocol":"TCP","Port":8080}}}}}},"labels":{{}},"selector":{{"app":"echo"}},"includeExternal":true,"shared":true,"clusterID":2}}"#,
            B1.ip, B1.ip6
        ),
        None,
    ))?;
    let vip6: IpAddr = VIP6.parse()?;
    let vip4: IpAddr = VIP4.parse()?;
    wait_for(
        REPORT_WAIT,
        || Ok(tcp_via(lab, &A1, vip6, &B1, B1.ip6.into(), 8080).is_ok()),
        |ok| *ok,
        |_| {
            format!(
                "a1 → [{VIP6}]:80 never reached b1 [{}]:8080: {:?}",
                B1.ip6,
                tcp_via(lab, &A1, vip6, &B1, B1.ip6.into(), 8080).err()
            )
        },
    )?;
    tcp_via(lab, &A1, vip4, &B1, B1.ip.into(), 8080).context("IPv4 VIP of the same service")?;
    // Delete b1's IPv6 entry: out of the map within 1 s; back when put back.
    let key = format!("cilium/cache/ip/v1/c2/{}", B1.ip6);
    let t0 = Instant::now();
    rt.block_on(clients[0].delete(key.clone(), None))?;
    while lookup6(&ipc1, B1.ip6).is_some() {
        ensure!(
            t0.elapsed() < Duration::from_secs(1),
            "b1's IPv6 entry still in the ipcache 1 s after its delete"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("IPv6 delete → unrouted: {:?}", t0.elapsed());
    ensure!(
        lookup(&ipc1, B1.ip).is_some(),
        "deleting b1's IPv6 entry took its IPv4 one too"
    );
    rt.block_on(clients[0].put(
        key,
        ip_json(&B1.ip6.to_string(), NODES[1].ip, B1.identity, B1.name),
        None,
    ))?;
    wait_for(
        Duration::from_secs(1),
        || Ok(lookup6(&ipc1, B1.ip6)),
        Option::is_some,
        |_| "b1's IPv6 entry not back within 1 s".into(),
    )?;
    // The thief's claim withdrawn: the conflict is gone.
    rt.block_on(clients[0].delete(format!("cilium/cache/ip/v1/c2/{}", A2.ip6), None))?;
    wait_for(
        REPORT_WAIT,
        || agents[0].status(),
        |st| st["datapath"]["ipv6"]["conflicting-prefixes"] == 0,
        |st| format!("conflict still reported: {}", st["datapath"]["ipv6"]),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------

#[test]
fn agents_program_the_mesh_follow_deletes_and_restart_hitlessly() -> Result<()> {
    let bpffs = Bpffs::new()?;
    kernel::check(bpffs.dir.path()).context("kernel check")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let etcds = [TestEtcd::start()?, TestEtcd::start()?];
    let mut clients = Vec::new();
    for (i, etcd) in etcds.iter().enumerate() {
        let mut c = rt.block_on(etcd.client("root"))?;
        rt.block_on(seed(&mut c, &NODES[i], &NODES[1 - i]))?;
        clients.push(c);
    }
    let lab = Lab::build()?;
    let work = tempfile::tempdir()?;

    let mut relays = Vec::new();
    let mut agents = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let ns = lab.ns(node.ns);
        let relay = Relay::start(&ns, etcds[i].addr())?;
        let files = etcds[i].try_client_files("local-test")?;
        let cfg = work.path().join(format!("{}-etcd.yaml", node.cluster));
        std::fs::write(
            &cfg,
            format!(
                "endpoints:\n- https://127.0.0.1:{}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
                relay.port,
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            ),
        )?;
        let mesh = work.path().join(format!("{}-mesh", node.cluster));
        std::fs::create_dir_all(&mesh)?;
        let other = NODES[1 - i].cluster;
        std::fs::write(
            mesh.join(other),
            "endpoints:\n- https://unused.invalid:2379\n",
        )?;
        let pin_dir = bpffs.dir.path().join(format!("{}n1", node.cluster));
        let args: Vec<String> = [
            "--cluster-name",
            node.cluster,
            "--cluster-id",
            &node.cluster_id.to_string(),
            "--node-name",
            "n1",
            "--node-ip",
            &node.ip.to_string(),
            "--node-ip6",
            &NODE6[i].to_string(),
            "--etcd-config",
            cfg.to_str().context("utf-8")?,
            "--clustermesh-config",
            mesh.to_str().context("utf-8")?,
            "--bpffs-dir",
            pin_dir.to_str().context("utf-8")?,
            "--vxlan-dev",
            "cmvx0",
            "--health-addr",
            "127.0.0.1:9890",
            "--sync-timeout",
            "30s",
            "--ipcache-max-entries",
            "4096",
            "--local-endpoints-max-entries",
            "256",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut agent = Agent {
            ns,
            args,
            log: work.path().join(format!("agent-{}.log", node.cluster)),
            child: None,
            pin_dir,
        };
        agent.spawn()?;
        agents.push(agent);
        relays.push(relay);
    }
    for a in agents.iter_mut() {
        let took = a.wait_ready(Duration::from_secs(30))?;
        eprintln!("agent {} ready after {took:?}", a.ns);
    }

    // Maps as the rules say; hostile entries absent.
    let ipc1 = agents[0].ipcache()?;
    let b1 = wait_for(
        REPORT_WAIT,
        || Ok(lookup(&ipc1, B1.ip)),
        Option::is_some,
        |_| "remote pod b1 missing from c1's ipcache".into(),
    )?
    .context("b1")?;
    ensure!(b1.sec_identity == B1.identity, "{b1:?}");
    ensure!(
        b1.flags == ipcache_flags::HAS_TUNNEL | ipcache_flags::REMOTE_CLUSTER,
        "{b1:?}"
    );
    ensure!(b1.tunnel_endpoint[..4] == NODES[1].ip.octets(), "{b1:?}");
    let a1 = wait_for(
        REPORT_WAIT,
        || Ok(lookup(&ipc1, A1.ip)),
        Option::is_some,
        |_| "local pod a1 missing from c1's ipcache".into(),
    )?
    .context("a1")?;
    ensure!(a1.flags == 0 && a1.sec_identity == A1.identity, "{a1:?}");
    for hostile in ["10.9.9.9", "10.9.9.8", "10.9.9.7"] {
        let ip: Ipv4Addr = hostile.parse()?;
        ensure!(
            lookup(&ipc1, ip).is_none(),
            "hostile entry {hostile} reached the map"
        );
    }
    wait_for(
        REPORT_WAIT,
        || Ok(agents[0].status()?["datapath"]["pods"].clone()),
        |pods| {
            pods.as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["attached"] == true))
        },
        |pods| format!("c1's two local pods should be attached: {pods}"),
    )?;

    ipv6_checks(&rt, &mut clients, &agents, &lab)?;

    // Traffic: same node, and across clusters both ways.
    ensure!(ping(&lab, &A1, &A2, 2), "ping a1 → a2 (same node)");
    ensure!(ping(&lab, &A1, &B1, 2), "ping a1 → b1 (c1 → c2)");
    ensure!(ping(&lab, &B1, &A2, 2), "ping b1 → a2 (c2 → c1)");
    tcp_echo(&lab, &A1, &B1, 7001)?;
    tcp_echo(&lab, &B1, &A1, 7002)?;
    // The counters of that traffic, once each agent has republished its /status. c1
    // receives b1's packets through from_underlay (GRO on), c2 a1's through the VXLAN
    // device (GRO off).
    let st = wait_for(
        REPORT_WAIT,
        || agents[0].status(),
        |st| {
            st["programs"]["from_pod"]["tunnelled"]
                .as_u64()
                .unwrap_or(0)
                > 0
                && delivered(st, "from_underlay") > 0
        },
        |st| {
            format!(
                "c1 (GRO on) should tunnel from_pod and decapsulate at the underlay: {}",
                st["programs"]
            )
        },
    )?;
    ensure!(
        st["receive-path"] == "from_underlay on eth0",
        "c1 receive path: {}",
        st["receive-path"]
    );
    ensure!(
        delivered(&st, "from_overlay") == 0,
        "c1 (GRO on) received through the VXLAN device: {}",
        st["programs"]
    );
    let st2 = wait_for(
        REPORT_WAIT,
        || agents[1].status(),
        |st| delivered(st, "from_overlay") > 0,
        |st| {
            format!(
                "c2 (GRO off) should receive through the VXLAN device: {}",
                st["programs"]
            )
        },
    )?;
    ensure!(
        st2["receive-path"]
            .as_str()
            .is_some_and(|p| p.contains("GRO is off on eth0")),
        "c2 receive path should say why it does not decapsulate: {}",
        st2["receive-path"]
    );
    ensure!(
        delivered(&st2, "from_underlay") == 0,
        "c2 (GRO off) decapsulated at the underlay: {}",
        st2["programs"]
    );

    // Delete the remote pod from the KVStoreMesh cache of c1: out of the map within 1 s.
    let key = format!("cilium/cache/ip/v1/c2/{}", B1.ip);
    let t0 = Instant::now();
    rt.block_on(clients[0].delete(key.clone(), None))?;
    let unrouted = loop {
        if lookup(&ipc1, B1.ip).is_none() {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(1),
            "b1 still in the ipcache 1 s after its delete"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    eprintln!("delete → unrouted: {unrouted:?}");
    ensure!(
        !ping(&lab, &A1, &B1, 1),
        "a1 still reaches b1 after its entry was deleted"
    );
    let t0 = Instant::now();
    rt.block_on(clients[0].put(
        key,
        ip_json(&B1.ip.to_string(), NODES[1].ip, B1.identity, B1.name),
        None,
    ))?;
    let rerouted = loop {
        if lookup(&ipc1, B1.ip).is_some() {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(1),
            "b1 not back within 1 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    eprintln!("put back → routed: {rerouted:?}");
    ensure!(ping(&lab, &A1, &B1, 2), "a1 → b1 after the entry came back");

    // Restart agent c1 while a stream crosses its node.
    let stream = Stream::start(&lab, &A1, &B1, 7003)?;
    ensure!(
        stream.progress(Duration::from_millis(500)) > 0,
        "stream not flowing"
    );
    let st = wait_for(
        REPORT_WAIT,
        || agents[0].status(),
        |st| {
            st["datapath"]["stats"]["ipcache-upserts"]
                .as_u64()
                .unwrap_or(0)
                > 0
        },
        |st| format!("first agent wrote nothing? {}", st["datapath"]["stats"]),
    )?;
    let decapped_before = delivered(&st, "from_underlay");
    agents[0].stop()?;
    let down = stream.progress(Duration::from_millis(1000));
    ensure!(down > 0, "stream stalled while the agent was down");
    agents[0].spawn()?;
    let took = agents[0].wait_ready(Duration::from_secs(30))?;
    let after = stream.progress(Duration::from_millis(1000));
    ensure!(after > 0, "stream stalled after the restart");
    let (sent, got) = stream.finish()?;
    ensure!(sent == got, "sent {sent} bytes, received {got}");
    eprintln!(
        "restart: stream survived ({got} bytes, {down} while the agent was down, {after} in the \
         second after ready); restarted agent ready after {took:?}"
    );
    // Ready means every cluster synced; pod links are found on the next kernel notification
    // or cluster change and /status is republished every second, so the swapped links may
    // show a moment later.
    let st = wait_for(
        REPORT_WAIT,
        || agents[0].status(),
        |st| {
            st["datapath"]["stats"]["attach-replaced"]
                .as_u64()
                .unwrap_or(0)
                >= 2
        },
        |st| {
            format!(
                "programs not swapped into the pinned links: {}",
                st["datapath"]["stats"]
            )
        },
    )?;
    let stats = &st["datapath"]["stats"];
    ensure!(
        stats["ipcache-upserts"] == 0,
        "the restarted agent rewrote unchanged entries: {stats}"
    );
    ensure!(
        stats["adopted-ipcache"].as_u64().unwrap_or(0) >= 3,
        "{stats}"
    );
    ensure!(ping(&lab, &A1, &B1, 1), "a1 → b1 after the restart");
    wait_for(
        REPORT_WAIT,
        || agents[0].status(),
        |st| delivered(st, "from_underlay") > decapped_before,
        |st| {
            format!(
                "from_underlay (swapped into its pinned link) stopped decapsulating: {} (before the restart: {decapped_before})",
                st["programs"]
            )
        },
    )?;

    // /metrics carries the Cilium names (the datapath's are filled on the status tick).
    for name in [
        "cilium_clustermesh_remote_cluster_readiness_status",
        "cilium_bpf_map_pressure{map_name=\"CM_IPCACHE\"}",
        "cilium_clustermesh_datapath_packets_total",
    ] {
        wait_for(
            REPORT_WAIT,
            || Ok(agents[0].http("/metrics")?.1),
            |metrics| metrics.contains(name),
            |metrics| format!("{name} missing from /metrics:\n{metrics}"),
        )?;
    }

    // Cleanup for `lab down`: stop, then remove the pins.
    for a in agents.iter_mut() {
        a.stop()?;
        let out = run(&[
            AGENT,
            "--cleanup",
            "--bpffs-dir",
            a.pin_dir.to_str().context("utf-8")?,
        ])?;
        ensure!(out.contains("removed"), "{out}");
        ensure!(!a.pin_dir.exists(), "pins left in {}", a.pin_dir.display());
    }
    ensure!(
        !ping(&lab, &A1, &B1, 1),
        "cross-cluster traffic still tunnelled after cleanup"
    );
    drop(relays);
    drop(lab);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 511 clusters

/// Cluster `c`'s `n`-th identity under `--max-connected-clusters 511` (Cilium's
/// `c << 15 | n`: 9 cluster-ID bits, 15 cluster-local bits).
const fn id511(c: u32, n: u32) -> u32 {
    c << 15 | n
}

fn node_json_cidr(cluster: &str, id: u32, ip: Ipv4Addr, cidr: &str) -> String {
    node_json(cluster, id, "n1", ip).replace(&format!("10.{id}.1.0"), cidr)
}

/// `--max-connected-clusters 511` end to end in one agent: the local cluster has ID 300
/// (above 255), the remote c511 has the highest ID. c511's endpoints, with identities of
/// its 15-bit range, land in the pinned ipcache; an entry whose identity lies in c511's
/// range under 255 but not under 511 does not; the remote c7, whose cluster config
/// announces 255, is refused, named in `/status` with a hint, and nothing of it reaches the
/// map. Cluster IDs 0 and 512 (and 300 under 255) make the agent exit with a clear error.
#[test]
fn agent_with_511_clusters_imports_high_cluster_ids_and_refuses_a_255_remote() -> Result<()> {
    // Refused at start, before anything is loaded.
    for (id, max, want) in [
        ("0", "511", "reserved"),
        ("512", "511", "between 1 and 511"),
        ("300", "255", "between 1 and 255"),
        ("300", "256", "255"),
    ] {
        let out = Command::new(AGENT)
            .args(["--cluster-name", "c300", "--cluster-id", id])
            .args(["--max-connected-clusters", max, "--node-name", "n1"])
            .args(["--node-ip", "198.18.3.11", "--etcd-config", "/nonexistent"])
            .args(["--clustermesh-config", "/nonexistent"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains(want),
            "agent --cluster-id {id} --max-connected-clusters {max} should fail naming {want:?}: {err}"
        );
    }

    let bpffs = Bpffs::new()?;
    kernel::check(bpffs.dir.path()).context("kernel check")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let etcd = TestEtcd::start()?;
    let node_ip = Ipv4Addr::new(198, 18, 3, 11);
    let remote_ip = Ipv4Addr::new(198, 18, 4, 11);
    let local_pod = (Ipv4Addr::new(10, 30, 1, 11), id511(300, 1));
    let remote_pods = [
        (Ipv4Addr::new(10, 51, 1, 11), id511(511, 1)),
        (Ipv4Addr::new(10, 51, 1, 12), id511(511, 32_767)),
    ];
    // c511's range under 255 would be 511 << 16: past 24 bits; 255 << 16 | 5 is cluster 510
    // under 511, outside c511's range.
    let misread = (Ipv4Addr::new(10, 51, 9, 9), 255 << 16 | 5);
    let c7_pod = (Ipv4Addr::new(10, 7, 1, 11), id511(7, 1));
    rt.block_on(async {
        let mut c = etcd.client("root").await?;
        c.put("cilium/.heartbeat", "2026-01-01T00:00:00Z", None)
            .await?;
        // Local cluster c300.
        c.put(
            "cilium/state/nodes/v1/c300/n1",
            node_json_cidr("c300", 300, node_ip, "10.30.1.0"),
            None,
        )
        .await?;
        let (ip, id) = local_pod;
        c.put(
            format!("cilium/state/ip/v1/default/{ip}"),
            ip_json(&ip.to_string(), node_ip, id, "l1"),
            None,
        )
        .await?;
        c.put(
            format!("cilium/state/identities/v1/id/{id}"),
            labels("c300", "l1"),
            None,
        )
        .await?;
        // Cached remotes: c511 (511, as we are) and c7 (announces 255).
        for (name, cid, max, pods) in [
            ("c511", 511, 511, &remote_pods[..]),
            ("c7", 7, 255, std::slice::from_ref(&c7_pod)),
        ] {
            c.put(
                format!("cilium/cluster-config/{name}"),
                format!(
                    r#"{{"id":{cid},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":{max},"serviceExportsEnabled":false}}}}"#
                ),
                None,
            )
            .await?;
            c.put(
                format!("cilium/cache/nodes/v1/{name}/n1"),
                node_json_cidr(name, cid, remote_ip, &format!("10.{}.1.0", cid % 256)),
                None,
            )
            .await?;
            let mut all = pods.to_vec();
            if name == "c511" {
                all.push(misread);
            }
            for (ip, id) in all {
                c.put(
                    format!("cilium/cache/ip/v1/{name}/{ip}"),
                    ip_json(&ip.to_string(), remote_ip, id, "r"),
                    None,
                )
                .await?;
                c.put(
                    format!("cilium/cache/identities/v1/{name}/id/{id}"),
                    labels(name, "r"),
                    None,
                )
                .await?;
            }
            for s in STORES {
                c.put(
                    format!("cilium/synced/{name}/cilium/cache/{s}"),
                    "2026-01-01T00:00:00Z",
                    None,
                )
                .await?;
            }
        }
        anyhow::Ok(())
    })?;

    let mut lab = Lab {
        prefix: format!("cm511{}-", std::process::id()),
        created: vec![],
    };
    let ns = lab.add_ns("n1")?;
    // The underlay: a veth pair inside the namespace (no dummy module on every kernel).
    run(&[
        "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    run(&["ip", "-n", &ns, "link", "set", "eth1", "up"])?;
    run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "198.18.3.11/16",
        "dev",
        "eth0",
    ])?;
    run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
    run(&[
        "ip", "-n", &ns, "link", "add", "cmvx0", "type", "vxlan", "dstport", "4789", "external",
    ])?;
    run(&["ip", "-n", &ns, "link", "set", "cmvx0", "up"])?;
    let relay = Relay::start(&ns, etcd.addr())?;
    let work = tempfile::tempdir()?;
    let files = etcd.try_client_files("local-test")?;
    let cfg = work.path().join("etcd.yaml");
    std::fs::write(
        &cfg,
        format!(
            "endpoints:\n- https://127.0.0.1:{}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
            relay.port,
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        ),
    )?;
    let mesh = work.path().join("mesh");
    std::fs::create_dir_all(&mesh)?;
    for name in ["c511", "c7"] {
        std::fs::write(
            mesh.join(name),
            "endpoints:\n- https://unused.invalid:2379\n",
        )?;
    }
    let pin_dir = bpffs.dir.path().join("c300n1");
    let args: Vec<String> = [
        "--cluster-name",
        "c300",
        "--cluster-id",
        "300",
        "--max-connected-clusters",
        "511",
        "--node-name",
        "n1",
        "--node-ip",
        "198.18.3.11",
        "--etcd-config",
        cfg.to_str().context("utf-8")?,
        "--clustermesh-config",
        mesh.to_str().context("utf-8")?,
        "--bpffs-dir",
        pin_dir.to_str().context("utf-8")?,
        "--underlay-dev",
        "off",
        "--dns-addr",
        "off",
        "--sync-timeout",
        "5s",
        "--ipcache-max-entries",
        "1024",
        "--local-endpoints-max-entries",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = Agent {
        ns,
        args,
        log: work.path().join("agent.log"),
        child: None,
        pin_dir,
    };
    agent.spawn()?;
    agent.wait_ready(Duration::from_secs(30))?;

    let ipc = agent.ipcache()?;
    for (ip, id) in remote_pods {
        let v = wait_for(
            REPORT_WAIT,
            || Ok(lookup(&ipc, ip)),
            Option::is_some,
            |_| {
                format!(
                    "c511's pod {ip} missing from the ipcache:\n{}",
                    agent.log_tail()
                )
            },
        )?
        .context("remote pod")?;
        ensure!(v.sec_identity == id, "{ip}: {v:?}, want identity {id}");
        ensure!(v.tunnel_endpoint[..4] == remote_ip.octets(), "{v:?}");
        ensure!(
            v.flags == ipcache_flags::HAS_TUNNEL | ipcache_flags::REMOTE_CLUSTER,
            "{v:?}"
        );
    }
    let (ip, id) = local_pod;
    let v = wait_for(
        REPORT_WAIT,
        || Ok(lookup(&ipc, ip)),
        Option::is_some,
        |_| "the local pod of cluster 300 is missing from the ipcache".into(),
    )?
    .context("local pod")?;
    ensure!(v.sec_identity == id && v.flags == 0, "{v:?}");
    ensure!(
        lookup(&ipc, misread.0).is_none(),
        "identity {} (c511's range only under 255) reached the map",
        misread.1
    );
    ensure!(
        lookup(&ipc, c7_pod.0).is_none(),
        "an entry of c7, which announces 255, reached the map"
    );
    let st = wait_for(
        REPORT_WAIT,
        || agent.status(),
        |st| {
            st["remote-clusters"].as_array().is_some_and(|r| {
                // c7 retries its refused session: wait for a snapshot between attempts,
                // when its status holds the refusal (during an attempt it says "connected").
                r.iter().any(|c| c["name"] == "c511" && c["ready"] == true)
                    && r.iter()
                        .any(|c| c["name"] == "c7" && c["failure-class"] == "config")
            })
        },
        |st| format!("c511 ready and c7 refused: {}", st["remote-clusters"]),
    )?;
    let remotes = st["remote-clusters"]
        .as_array()
        .context("remote-clusters")?;
    let c511 = remotes
        .iter()
        .find(|c| c["name"] == "c511")
        .context("c511")?;
    ensure!(
        c511["num-identities"] == 2 && c511["num-endpoints"] == 2,
        "{c511}"
    );
    ensure!(c511["config"]["cluster-id"] == 511, "{c511}");
    let c7 = remotes.iter().find(|c| c["name"] == "c7").context("c7")?;
    let said = format!("{} {}", c7["status"], c7["hint"]);
    ensure!(
        c7["ready"] == false
            && c7["failure-class"] == "config"
            && said.contains("max-connected-clusters is 255, local is 511")
            && said.contains("--max-connected-clusters 511"),
        "{c7}"
    );
    ensure!(c7["num-endpoints"] == 0, "{c7}");
    agent.stop()?;
    drop(relay);
    Ok(())
}
