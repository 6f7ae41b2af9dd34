//! `clustermesh lab up|status|down`: a whole mesh on this machine, in network namespaces.
//!
//! The topology is the one of `docs/lab-datapath-contract.md`:
//!
//! ```text
//!  root ns ── cm-<id> (198.18.0.2, route 198.18.0.0/15 only) ─┐
//!                                                              │
//!  cm-<id>-router: br1 198.18.1.1/24   br2 198.18.2.1/24   …   (ip_forward; one bridge per
//!                   │  │   │              │                    cluster = a VPC/datacenter)
//!      c1-cp ───────┘  │   └── c1-n2     …
//!   198.18.1.2     c1-n1 198.18.1.11
//!   etcd+apiserver  eth0, cmvx0 (VXLAN), agent, lxc… ── c1-n1-p1 (eth0 10.1.1.11, echo :8080)
//! ```
//!
//! Network hygiene (hard rule): every address lives on an interface inside a namespace this
//! module created, except the single root veth; no default route anywhere; nothing is sent
//! to an address the lab did not create. The CLI reaches the lab's services from a thread
//! inside the router namespace, so it works even when the root veth is absent (another lab
//! already routes 198.18.0.0/15). `down` removes namespaces, links, pins, mounts and
//! processes, also after a partial `up`.

pub mod load;
pub mod netns;
pub mod plan;
pub mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::clustermesh::{connect_pair, status_json, Access};
use crate::enable::{self, EnableArgs};
use crate::http;
use state::{Agent, Cluster, Datapath, LabState, Node, Pod};

/// Flags of `lab up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of clusters.
    #[arg(long, default_value_t = 2)]
    pub clusters: u32,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 2)]
    pub nodes: u32,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pub pods: u32,
    /// Lab directory (all state: certificates, etcd data, logs, pins).
    #[arg(long, default_value = ".lab")]
    pub dir: PathBuf,
    /// `ebpf`: agents program our datapath; `kernel`: plain kernel VXLAN with static
    /// forwarding entries, no agents (the benchmark baseline).
    #[arg(long, value_enum, default_value_t = Datapath::Ebpf)]
    pub datapath: Datapath,
    /// With `--datapath ebpf`: whether agents decapsulate VXLAN for their pods at the
    /// underlay (`from_underlay`); `false` receives everything through the VXLAN device
    /// (the agent's `--underlay-dev off`; for comparing the two receive paths).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub underlay_decap: bool,
    /// How long to wait for control planes, mesh and agents.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Flags of `lab down` / `lab status`.
#[derive(Debug, clap::Args)]
pub struct DirArgs {
    /// Lab directory.
    #[arg(long, default_value = ".lab")]
    pub dir: PathBuf,
    /// Output format: `summary` or `json`.
    #[arg(short = 'o', long, default_value = "summary")]
    pub output: String,
}

/// GET on a lab address, from inside the router namespace.
pub fn http_get(st: &LabState, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    netns::run_in(&st.router_ns, || {
        Ok(http::get(addr, path, Duration::from_secs(2))?)
    })
    .ok()
}

/// The agent binary: `$CLUSTERMESH_AGENT_BIN`, next to this one, or on PATH.
fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CLUSTERMESH_AGENT_BIN") {
        return p.into();
    }
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let p = dir.join("clustermesh-agent");
            if p.exists() {
                return p;
            }
        }
    }
    "clustermesh-agent".into()
}

/// Whether the agent binary takes the flags of the lab contract.
fn agent_supports_contract(bin: &Path) -> bool {
    std::process::Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
            text.contains("--vxlan-dev") && text.contains("--node-ip")
        })
        .unwrap_or(false)
}

/// Kubernetes-shaped manifests of one lab cluster, one file per object kind and one per pod
/// (so a test can delete a single pod): Nodes, Pods with the echo container, and a global
/// service selecting `app=echo`.
pub fn manifests(cluster: &Cluster) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut nodes = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n");
    for node in &cluster.nodes {
        nodes.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs:\n  - {cidr}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n  - type: Hostname\n    address: {name}\n",
            name = node.name,
            cidr = node.pod_cidr,
            ip = node.ip,
        ));
        for pod in &node.pods {
            files.push((
                format!("pod-{}.yaml", pod.name),
                pod_manifest(cluster, node, pod),
            ));
        }
    }
    files.push(("nodes.yaml".into(), nodes));
    files.push((
        "service.yaml".into(),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\nspec:\n  clusterIP: 172.20.0.10\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  selector:\n    app: echo\n".into(),
    ));
    files.push((
        "service-echo-local.yaml".into(),
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {ECHO_LOCAL}\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: local\nspec:\n  clusterIP: {ECHO_LOCAL_VIP}\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  selector:\n    {ECHO_LOCAL_LABEL}\n"),
    ));
    files
}

/// The global service of every lab cluster (selects every pod, VIP [`ECHO_VIP`], port 80).
pub const ECHO: &str = "echo";
/// VIP of [`ECHO`].
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 10);
/// A global service with `service.cilium.io/affinity: local`, selecting the pods with
/// [`ECHO_LOCAL_LABEL`] (the last pod of each cluster, [`in_echo_local`]).
pub const ECHO_LOCAL: &str = "echo-local";
/// VIP of [`ECHO_LOCAL`].
pub const ECHO_LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 11);
/// The label line (YAML, as in a pod's `labels:`) that [`ECHO_LOCAL`] selects.
pub const ECHO_LOCAL_LABEL: &str = "svc: echo-local";
/// Port of the lab's services.
pub const SERVICE_PORT: u16 = 80;
/// Where pods send DNS queries: the agent's DNS server on the node (`--dns-addr`), on the
/// pods' gateway address, which the node holds on `lo`.
pub const DNS_SERVER: Ipv4Addr = plan::GATEWAY;

/// Whether `pod` backs [`ECHO_LOCAL`]: the last pod of the cluster's last node.
pub fn in_echo_local(cluster: &Cluster, node: &Node, pod: &Pod) -> bool {
    cluster.nodes.last().is_some_and(|n| n.name == node.name)
        && node.pods.last().is_some_and(|p| p.name == pod.name)
}

/// `pod_manifest` without the [`ECHO_LOCAL_LABEL`]: the pod stays, the service loses it.
pub fn pod_manifest_without_echo_local(cluster: &Cluster, node: &Node, pod: &Pod) -> String {
    pod_manifest(cluster, node, pod).replace(&format!("    {ECHO_LOCAL_LABEL}\n"), "")
}

/// The resolver file `ip netns exec <ns>` bind-mounts over `/etc/resolv.conf`.
pub fn netns_resolv_conf(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns).join("resolv.conf")
}

/// One pod's manifest.
pub fn pod_manifest(cluster: &Cluster, node: &Node, pod: &Pod) -> String {
    let extra = if in_echo_local(cluster, node, pod) {
        format!("    {ECHO_LOCAL_LABEL}\n")
    } else {
        String::new()
    };
    format!(
        "# lab pod {c}/{n}/{p}: network namespace {ns}\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {p}\n  namespace: {pns}\n  labels:\n    app: echo\n    instance: {p}\n{extra}spec:\n  nodeName: {n}\n  containers:\n  - name: echo\n    ports:\n    - name: http\n      containerPort: {port}\nstatus:\n  phase: Running\n  hostIP: {host}\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
        c = cluster.name,
        n = node.name,
        p = pod.name,
        ns = pod.ns,
        pns = pod.namespace,
        port = plan::ECHO_PORT,
        host = node.ip,
        ip = pod.ip,
    )
}

/// `lab up`.
pub fn up(a: UpArgs) -> anyhow::Result<()> {
    if !(1..=plan::MAX_CLUSTERS).contains(&a.clusters)
        || !(1..=plan::MAX_NODES).contains(&a.nodes)
        || !(1..=plan::MAX_PODS).contains(&a.pods)
    {
        bail!(
            "--clusters must be 1..={}, --nodes 1..={}, --pods 1..={} (the address plan of the lab)",
            plan::MAX_CLUSTERS,
            plan::MAX_NODES,
            plan::MAX_PODS
        );
    }
    if state::state_file(&a.dir).exists() {
        bail!(
            "a lab already runs in {} — `clustermesh lab status --dir {0}` shows it, `clustermesh lab down --dir {0}` removes it",
            a.dir.display()
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and needs root: run it with sudo");
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let existing = netns::list()?;
    let id = (0..16)
        .map(|_| plan::new_lab_id())
        .find(|id| {
            let prefix = plan::ns_prefix(id);
            !existing.iter().any(|n| n.starts_with(&prefix))
        })
        .context("no free lab ID: remove old labs with `clustermesh lab down`")?;
    let mut st = LabState {
        id: id.clone(),
        dir: dir.clone(),
        datapath: a.datapath,
        router_ns: plan::router_ns(&id),
        root_link: None,
        bpffs: None,
        namespaces: Vec::new(),
        clusters: Vec::new(),
    };
    for i in 1..=a.clusters {
        let name = plan::cluster_name(i);
        let state_dir = dir.join(&name);
        let nodes = (1..=a.nodes)
            .map(|j| Node {
                name: plan::node_name(j),
                ns: plan::node_ns(&id, i, j),
                ip: plan::node_ip(i, j),
                pod_cidr: plan::pod_cidr(i, j),
                agent: None,
                pods: (1..=a.pods)
                    .map(|k| {
                        let pod = plan::pod_name(j, k);
                        let ip = plan::pod_ip(i, j, k);
                        Pod {
                            host_veth: plan::host_veth(plan::POD_NAMESPACE, &pod),
                            name: pod,
                            namespace: plan::POD_NAMESPACE.into(),
                            ns: plan::pod_ns(&id, i, j, k),
                            ip,
                            mac: plan::pod_mac(ip),
                            echo_pid: None,
                        }
                    })
                    .collect(),
            })
            .collect();
        st.clusters.push(Cluster {
            name,
            id: i,
            ns: plan::cp_ns(&id, i),
            ip: plan::cp_ip(i),
            certs_dir: state_dir.join("certs"),
            state_dir,
            etcd_endpoint: format!("https://{}", plan::etcd_listen(i)),
            health_addr: plan::apiserver_health(i),
            apiserver_pid: None,
            nodes,
        });
    }
    st.save()?;
    let res = bring_up(&mut st, &a);
    // Whatever happened, record what exists so `down` finds it.
    st.save()?;
    if let Err(e) = res {
        return Err(e.context(format!(
            "lab up failed; logs are in {d}; `clustermesh lab down --dir {d}` removes what was built",
            d = dir.display()
        )));
    }
    Ok(())
}

fn bring_up(st: &mut LabState, a: &UpArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    println!(
        "🌐 Building lab {} in {}: {} clusters × {} nodes × {} pods, datapath {:?}",
        st.id,
        st.dir.display(),
        a.clusters,
        a.nodes,
        a.pods,
        st.datapath
    );
    build_network(st)?;
    st.save()?;
    start_echo_servers(st)?;
    st.save()?;
    let t_net = t0.elapsed();
    println!(
        "✅ Network: {} namespaces, {} pods with echo servers ({:.1}s)",
        st.namespaces.len(),
        st.pods().len(),
        t_net.as_secs_f64()
    );

    start_control_planes(st)?;
    st.save()?;
    wait_control_planes(st, a.timeout)?;
    let t_cp = t0.elapsed();
    println!(
        "✅ Control planes ready ({:.1}s)",
        (t_cp - t_net).as_secs_f64()
    );

    connect_mesh(st, a.timeout)?;
    let t_mesh = t0.elapsed();
    if st.clusters.len() > 1 {
        println!(
            "✅ Mesh connected and synced ({:.1}s)",
            (t_mesh - t_cp).as_secs_f64()
        );
    }

    if st.datapath == Datapath::Ebpf {
        let bin = agent_binary();
        if agent_supports_contract(&bin) {
            start_agents(st, &bin, a.underlay_decap)?;
            st.save()?;
            wait_agents(st, a.timeout)?;
            println!(
                "✅ {} agents ready ({:.1}s)",
                st.clusters.iter().map(|c| c.nodes.len()).sum::<usize>(),
                (t0.elapsed() - t_mesh).as_secs_f64()
            );
        } else {
            println!(
                "⚠️  {} does not take the lab's agent flags (--node-ip, --vxlan-dev): no agents started, only same-node traffic will flow. Build it with `cargo build -p clustermesh-agent`.",
                bin.display()
            );
        }
    }
    wait_echo_servers(st)?;
    println!(
        "✅ Lab {} is up in {:.1}s",
        st.id,
        t0.elapsed().as_secs_f64()
    );
    print_summary(st);
    print_inspect(st);
    Ok(())
}

fn add_ns(st: &mut LabState, ns: &str) -> anyhow::Result<()> {
    netns::add(ns)?;
    st.namespaces.push(ns.to_owned());
    Ok(())
}

/// Router, bridges, control-plane and node namespaces, VXLAN, pods.
fn build_network(st: &mut LabState) -> anyhow::Result<()> {
    let router = st.router_ns.clone();
    add_ns(st, &router)?;
    netns::sysctl(&router, "net/ipv4/ip_forward", "1")?;
    // The single root veth, unless another lab already routes the underlay from here.
    // `root`: routes inside the underlay prefix (`match` would also return the default route).
    let taken = !netns::ip(&["-j", "route", "show", "root", plan::UNDERLAY])?
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim()
        .is_empty();
    if taken {
        println!(
            "ℹ️  The root namespace already routes {} (another lab?): no root veth; the CLI enters the router namespace instead",
            plan::UNDERLAY
        );
    } else {
        let link = plan::root_link(&st.id);
        netns::ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "root0", "netns", &router,
        ])?;
        st.root_link = Some(link.clone());
        netns::ip_in(
            &router,
            &[
                "addr",
                "add",
                &format!("{}/24", plan::ROUTER_ROOT_IP),
                "dev",
                "root0",
            ],
        )?;
        netns::ip_in(&router, &["link", "set", "root0", "up"])?;
        netns::ip(&[
            "addr",
            "add",
            &format!("{}/24", plan::ROOT_IP),
            "dev",
            &link,
            "noprefixroute",
        ])?;
        netns::ip(&["link", "set", &link, "up"])?;
        netns::ip(&[
            "route",
            "add",
            plan::UNDERLAY,
            "via",
            &plan::ROUTER_ROOT_IP.to_string(),
            "dev",
            &link,
            "onlink",
        ])?;
    }
    let clusters = st.clusters.clone();
    for c in &clusters {
        let br = plan::router_bridge(c.id);
        netns::ip_in(&router, &["link", "add", &br, "type", "bridge"])?;
        netns::ip_in(
            &router,
            &[
                "addr",
                "add",
                &format!("{}/24", plan::router_ip(c.id)),
                "dev",
                &br,
            ],
        )?;
        netns::ip_in(&router, &["link", "set", &br, "up"])?;
        let gw = plan::router_ip(c.id).to_string();
        // Control plane.
        add_ns(st, &c.ns)?;
        underlay_leg(&router, c.id, 0, &c.ns, c.ip, &gw)?;
        // Nodes.
        for (j, node) in (1u32..).zip(&c.nodes) {
            add_ns(st, &node.ns)?;
            underlay_leg(&router, c.id, j, &node.ns, node.ip, &gw)?;
            netns::sysctl(&node.ns, "net/ipv4/ip_forward", "1")?;
            // The pods' gateway address answers locally (the agent's DNS server binds it).
            netns::ip_in(&node.ns, &["link", "set", "lo", "up"])?;
            netns::ip_in(
                &node.ns,
                &["addr", "add", &format!("{DNS_SERVER}/32"), "dev", "lo"],
            )?;
            let mtu = plan::OVERLAY_MTU.to_string();
            match st.datapath {
                Datapath::Ebpf => netns::ip_in(
                    &node.ns,
                    &[
                        "link",
                        "add",
                        plan::VXLAN_DEV,
                        "type",
                        "vxlan",
                        "dstport",
                        "4789",
                        "external",
                    ],
                )?,
                Datapath::Kernel => netns::ip_in(
                    &node.ns,
                    &[
                        "link",
                        "add",
                        plan::VXLAN_DEV,
                        "address",
                        &plan::kernel_vxlan_mac(node.ip),
                        "type",
                        "vxlan",
                        "id",
                        "1",
                        "dstport",
                        "4789",
                        "local",
                        &node.ip.to_string(),
                        "nolearning",
                    ],
                )?,
            };
            netns::ip_in(
                &node.ns,
                &["link", "set", plan::VXLAN_DEV, "mtu", &mtu, "up"],
            )?;
            for pod in &node.pods {
                add_ns(st, &pod.ns)?;
                build_pod(node, pod)?;
            }
        }
    }
    if st.datapath == Datapath::Kernel {
        kernel_forwarding(st)?;
    }
    Ok(())
}

/// A veth from the router's bridge of cluster `i` to `eth0` in `ns`, with `ip`/24 and a
/// route for the underlay only.
fn underlay_leg(
    router: &str,
    i: u32,
    j: u32,
    ns: &str,
    ip: std::net::Ipv4Addr,
    gw: &str,
) -> anyhow::Result<()> {
    let port = plan::router_port(i, j);
    netns::ip_in(
        router,
        &[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
    )?;
    netns::ip_in(
        router,
        &[
            "link",
            "set",
            &port,
            "master",
            &plan::router_bridge(i),
            "up",
        ],
    )?;
    // The underlay behaves like a physical network for both datapaths: the router's ports
    // send wire-sized frames (no TSO: a routed 64 KiB tunnel packet is cut into MTU-sized
    // ones, as it would be on a cable), and each namespace's `eth0` aggregates what it
    // receives (GRO, as NICs do by default; a veth aggregates only with GRO on and a peer
    // without TSO).
    netns::ethtool_in(router, &["-K", &port, "tso", "off"])?;
    netns::ethtool_in(ns, &["-K", "eth0", "gro", "on"])?;
    netns::ip_in(ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
    netns::ip_in(
        ns,
        &["route", "add", plan::UNDERLAY, "via", gw, "dev", "eth0"],
    )?;
    Ok(())
}

/// The pod's veth pair, addresses, routes and gateway neighbour (contract: "Names").
fn build_pod(node: &Node, pod: &Pod) -> anyhow::Result<()> {
    let mtu = plan::OVERLAY_MTU.to_string();
    let gw = plan::GATEWAY.to_string();
    netns::ip_in(
        &node.ns,
        &[
            "link",
            "add",
            &pod.host_veth,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &pod.mac,
            "mtu",
            &mtu,
            "netns",
            &pod.ns,
        ],
    )?;
    netns::ip_in(&node.ns, &["link", "set", &pod.host_veth, "up"])?;
    let host_mac = netns::mac_of(&node.ns, &pod.host_veth)?;
    netns::ip_in(&pod.ns, &["link", "set", "eth0", "up"])?;
    netns::ip_in(
        &pod.ns,
        &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
    )?;
    netns::ip_in(
        &pod.ns,
        &["route", "add", &gw, "dev", "eth0", "scope", "link"],
    )?;
    for prefix in ["10.0.0.0/8", "172.20.0.0/16"] {
        netns::ip_in(
            &pod.ns,
            &["route", "add", prefix, "via", &gw, "dev", "eth0"],
        )?;
    }
    netns::ip_in(
        &pod.ns,
        &[
            "neigh",
            "add",
            &gw,
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    // The pod's resolver: `ip netns exec` bind-mounts this over /etc/resolv.conf.
    let resolv = netns_resolv_conf(&pod.ns);
    if let Some(dir) = resolv.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(
        &resolv,
        format!("# clustermesh lab: the agent's DNS on the node\nnameserver {DNS_SERVER}\noptions timeout:1 attempts:2\n"),
    )
    .with_context(|| format!("writing {}", resolv.display()))?;
    // Kernel fallback path: the node routes its own pods.
    netns::ip_in(
        &node.ns,
        &[
            "route",
            "add",
            &format!("{}/32", pod.ip),
            "dev",
            &pod.host_veth,
        ],
    )?;
    Ok(())
}

/// Kernel datapath: every node reaches every other node's pod CIDR over `cmvx0` (VNI 1)
/// through a route, a permanent neighbour (the peer's VXLAN MAC) and an FDB entry (the
/// peer's underlay IP). No learning, no flooding, no eBPF.
fn kernel_forwarding(st: &LabState) -> anyhow::Result<()> {
    let all: Vec<&Node> = st.clusters.iter().flat_map(|c| &c.nodes).collect();
    for node in &all {
        for peer in all.iter().filter(|p| p.ns != node.ns) {
            let peer_ip = peer.ip.to_string();
            let peer_mac = plan::kernel_vxlan_mac(peer.ip);
            netns::ip_in(
                &node.ns,
                &[
                    "neigh",
                    "add",
                    &peer_ip,
                    "lladdr",
                    &peer_mac,
                    "dev",
                    plan::VXLAN_DEV,
                    "nud",
                    "permanent",
                ],
            )?;
            let out = std::process::Command::new("bridge")
                .args(["-n", &node.ns, "fdb", "append", &peer_mac])
                .args(["dev", plan::VXLAN_DEV, "dst", &peer_ip])
                .output()
                .context("running `bridge` (iproute2)")?;
            if !out.status.success() {
                bail!(
                    "`bridge fdb append {peer_mac} dst {peer_ip}` in {} failed: {}",
                    node.ns,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            netns::ip_in(
                &node.ns,
                &[
                    "route",
                    "add",
                    &peer.pod_cidr,
                    "via",
                    &peer_ip,
                    "dev",
                    plan::VXLAN_DEV,
                    "onlink",
                ],
            )?;
        }
    }
    Ok(())
}

fn self_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating the clustermesh binary")
}

fn start_echo_servers(st: &mut LabState) -> anyhow::Result<()> {
    let me = self_binary()?;
    let logs = st.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    for c in &mut st.clusters {
        for node in &mut c.nodes {
            for pod in &mut node.pods {
                let args = vec![
                    "lab".into(),
                    "echo".into(),
                    "--pod".into(),
                    pod.name.clone(),
                    "--node".into(),
                    node.name.clone(),
                    "--cluster".into(),
                    c.name.clone(),
                ];
                let log = logs.join(format!("echo-{}-{}.log", c.name, pod.name));
                pod.echo_pid = Some(netns::spawn(&pod.ns, &me, &args, &log)?);
            }
        }
    }
    Ok(())
}

fn wait_echo_servers(st: &LabState) -> anyhow::Result<()> {
    for p in st.pods() {
        let addr = SocketAddr::from((p.pod.ip, plan::ECHO_PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        netns::run_in(&p.pod.ns, || loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the echo server of {} does not listen on {addr}; see {}",
                    p.label(),
                    st.dir.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        })?;
    }
    Ok(())
}

fn start_control_planes(st: &mut LabState) -> anyhow::Result<()> {
    let ca_dir = st.dir.join("ca");
    for c in &mut st.clusters {
        let ea = EnableArgs {
            cluster_name: c.name.clone(),
            cluster_id: c.id,
            max_connected_clusters: 255,
            state_dir: c.state_dir.clone(),
            ca_dir: ca_dir.clone(),
            etcd_listen: plan::etcd_listen(c.id),
            etcd_peer_port: 2380,
            health_addr: c.health_addr,
            manifests: None,
            extra_dns: Vec::new(),
            extra_ips: vec![c.ip.into()],
            enable_mcs_api: true,
            force: false,
            start: false,
        };
        let prepared = enable::prepare(&ea)?;
        for (file, text) in manifests(c) {
            std::fs::write(prepared.manifests.join(&file), text)
                .with_context(|| format!("writing {file} into {}", prepared.manifests.display()))?;
        }
        let args = vec!["--config".into(), prepared.config.display().to_string()];
        c.apiserver_pid = Some(netns::spawn(
            &c.ns,
            &enable::apiserver_binary(),
            &args,
            &c.state_dir.join("apiserver.log"),
        )?);
    }
    Ok(())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn wait_control_planes(st: &LabState, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for c in &st.clusters {
        let pid = c.apiserver_pid.context("apiserver not started")?;
        loop {
            if let Some((200, _)) = http_get(st, c.health_addr, "/readyz") {
                break;
            }
            if !netns::alive(pid) || Instant::now() > deadline {
                let log = c.state_dir.join("apiserver.log");
                bail!(
                    "the control plane of {} did not become ready on {}; {}:\n{}",
                    c.name,
                    c.health_addr,
                    log.display(),
                    log_tail(&log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// `clustermesh connect` between every pair, then wait until each cluster has synced all
/// the others. Runs in the router namespace (etcd and health live on the underlay).
fn connect_mesh(st: &LabState, timeout: Duration) -> anyhow::Result<()> {
    if st.clusters.len() < 2 {
        return Ok(());
    }
    let access: Vec<Access> = st
        .clusters
        .iter()
        .map(|c| Access::load(&c.state_dir))
        .collect::<anyhow::Result<_>>()?;
    netns::run_in(&st.router_ns, || {
        for (i, a) in access.iter().enumerate() {
            for b in &access[i + 1..] {
                connect_pair(a, b, false)
                    .with_context(|| format!("connecting {} and {}", a.name, b.name))?;
                println!("🔗 Connected cluster {} <=> {}", a.name, b.name);
            }
        }
        let deadline = Instant::now() + timeout;
        for a in &access {
            loop {
                let v = status_json(a);
                if v["connectivity"]["not_ready"].as_u64() == Some(0) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "cluster {} has not synced every remote within {timeout:?}: {}",
                        a.name,
                        v["errors"]
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    })
}

fn start_agents(st: &mut LabState, bin: &Path, underlay_decap: bool) -> anyhow::Result<()> {
    let bpffs = st.dir.join("bpf");
    std::fs::create_dir_all(&bpffs)?;
    if !netns::is_mount_point(&bpffs) {
        let out = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mounting bpffs on {} failed: {} (the kernel needs CONFIG_BPF_SYSCALL)",
                bpffs.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    st.bpffs = Some(bpffs.clone());
    st.save()?;
    for c in &mut st.clusters {
        for (j, node) in (1u32..).zip(&mut c.nodes) {
            let pins = bpffs.join(format!("{}-{}", c.name, node.name));
            let health = plan::agent_health(c.id, j);
            let log = c.state_dir.join(format!("agent-{}.log", node.name));
            let args: Vec<String> = [
                "--cluster-name",
                &c.name,
                "--cluster-id",
                &c.id.to_string(),
                "--node-name",
                &node.name,
                "--node-ip",
                &node.ip.to_string(),
                "--etcd-config",
                &c.state_dir
                    .join("local-etcd-config.yaml")
                    .display()
                    .to_string(),
                "--clustermesh-config",
                &c.state_dir.join("clustermesh").display().to_string(),
                "--bpffs-dir",
                &pins.display().to_string(),
                "--vxlan-dev",
                plan::VXLAN_DEV,
                "--observer-addr",
                &SocketAddr::new(node.ip.into(), crate::observe::OBSERVER_PORT).to_string(),
                "--health-addr",
                &health.to_string(),
                "--dns-addr",
                &SocketAddr::new(DNS_SERVER.into(), 53).to_string(),
                "--underlay-dev",
                if underlay_decap { "auto" } else { "off" },
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let pid = netns::spawn(&node.ns, bin, &args, &log)?;
            node.agent = Some(Agent {
                pid,
                health_addr: health,
                log,
                bpffs_dir: pins,
            });
        }
    }
    Ok(())
}

fn wait_agents(st: &LabState, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for c in &st.clusters {
        for node in &c.nodes {
            let Some(agent) = &node.agent else { continue };
            loop {
                if let Some((200, _)) = http_get(st, agent.health_addr, "/readyz") {
                    break;
                }
                if !netns::alive(agent.pid) || Instant::now() > deadline {
                    bail!(
                        "the agent of {}/{} did not become ready on {}; {}:\n{}",
                        c.name,
                        node.name,
                        agent.health_addr,
                        agent.log.display(),
                        log_tail(&agent.log, 15)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

fn print_summary(st: &LabState) {
    println!("  router  {}", st.router_ns);
    if let Some(link) = &st.root_link {
        println!(
            "  root    {link} {} → route {} via {}",
            plan::ROOT_IP,
            plan::UNDERLAY,
            plan::ROUTER_ROOT_IP
        );
    }
    for c in &st.clusters {
        println!(
            "  {:<7} {:<24} etcd {}  health http://{}",
            c.name, c.ns, c.etcd_endpoint, c.health_addr
        );
        for node in &c.nodes {
            println!("    {:<5} {:<24} {}", node.name, node.ns, node.ip);
            for pod in &node.pods {
                println!(
                    "      {:<9} {:<24} {:<10} ({})",
                    pod.name, pod.ns, pod.ip, pod.host_veth
                );
            }
        }
    }
}

/// How to look at the lab by hand.
fn print_inspect(st: &LabState) {
    let pods = st.pods();
    let (Some(src), Some(dst)) = (pods.first(), pods.last()) else {
        return;
    };
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "clustermesh".into());
    let d = st.dir.display();
    println!("\nInspect it:");
    println!(
        "  ip netns exec {} curl -s {}:{}    # {} asks {} who it is",
        src.pod.ns,
        dst.pod.ip,
        plan::ECHO_PORT,
        src.label(),
        dst.label()
    );
    println!("  ip netns exec {} ping -c 3 {}", src.pod.ns, dst.pod.ip);
    println!(
        "  ip netns exec {} tcpdump -nni eth0 -vv udp port 4789    # VXLAN on the underlay (VNI = source identity)",
        src.node.ns
    );
    println!("  {me} connectivity test --dir {d}");
    println!("  {me} lab status --dir {d}");
    println!("Tear it down: {me} lab down --dir {d}");
}

/// `lab status`.
pub fn status(a: DirArgs) -> anyhow::Result<()> {
    let st = state::load(&a.dir)?;
    let mut clusters = Vec::new();
    for c in &st.clusters {
        let api = c.apiserver_pid.is_some_and(netns::alive);
        let report = http_get(&st, c.health_addr, "/status")
            .filter(|(code, _)| *code == 200)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .unwrap_or_default();
        let ready = report["ready"].as_bool().unwrap_or(false);
        let mut nodes = Vec::new();
        if a.output != "json" {
            println!(
                "{} cluster {} (ID {}) in {}: apiserver {}, {}",
                if ready { "✅" } else { "❌" },
                c.name,
                c.id,
                c.ns,
                if api { "running" } else { "NOT running" },
                if ready { "ready" } else { "not ready" }
            );
            println!(
                "   etcd {} (mTLS, certs in {}), health http://{}/status",
                c.etcd_endpoint,
                c.certs_dir.display(),
                c.health_addr
            );
            if let Some(remotes) = report["remote-clusters"].as_array() {
                for r in remotes {
                    println!(
                        "   remote {}: {} ({} nodes, {} endpoints)",
                        r["name"].as_str().unwrap_or_default(),
                        if r["ready"].as_bool() == Some(true) {
                            "ready"
                        } else {
                            "NOT ready"
                        },
                        r["num-nodes"],
                        r["num-endpoints"]
                    );
                }
            }
        }
        for node in &c.nodes {
            let (agent_running, agent_ready, agent_status) = match &node.agent {
                Some(ag) => {
                    let ready = matches!(http_get(&st, ag.health_addr, "/readyz"), Some((200, _)));
                    let status = http_get(&st, ag.health_addr, "/status")
                        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                        .unwrap_or_default();
                    (netns::alive(ag.pid), ready, status)
                }
                None => (false, false, serde_json::Value::Null),
            };
            let pods: Vec<serde_json::Value> = node
                .pods
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name, "namespace": p.namespace, "netns": p.ns, "ip": p.ip,
                        "mac": p.mac, "host-veth": p.host_veth,
                        "echo-running": p.echo_pid.is_some_and(netns::alive),
                    })
                })
                .collect();
            if a.output != "json" {
                let agent = match &node.agent {
                    Some(ag) => format!(
                        "agent {} {} (http://{}, log {}){}",
                        if agent_running {
                            "running"
                        } else {
                            "NOT running"
                        },
                        if agent_ready { "ready" } else { "not ready" },
                        ag.health_addr,
                        ag.log.display(),
                        match agent_status["receive-path"].as_str() {
                            Some(path) => format!(", receives VXLAN through {path}"),
                            None => String::new(),
                        }
                    ),
                    None => "no agent".into(),
                };
                println!(
                    "   node {} in {} ({}): {agent}",
                    node.name, node.ns, node.ip
                );
                for p in &node.pods {
                    println!(
                        "     pod {} {} in {} via {}, echo {}",
                        p.name,
                        p.ip,
                        p.ns,
                        p.host_veth,
                        if p.echo_pid.is_some_and(netns::alive) {
                            "running"
                        } else {
                            "NOT running"
                        }
                    );
                }
            }
            nodes.push(serde_json::json!({
                "name": node.name, "netns": node.ns, "ip": node.ip, "pod-cidr": node.pod_cidr,
                "agent": node.agent.as_ref().map(|ag| serde_json::json!({
                    "pid": ag.pid, "running": agent_running, "ready": agent_ready,
                    "health": ag.health_addr, "log": ag.log, "bpffs-dir": ag.bpffs_dir,
                    "status": agent_status,
                })),
                "pods": pods,
            }));
        }
        clusters.push(serde_json::json!({
            "name": c.name, "id": c.id, "netns": c.ns, "ip": c.ip,
            "etcd": c.etcd_endpoint, "health": c.health_addr,
            "certs": c.certs_dir, "state-dir": c.state_dir,
            "etcd-configs": {
                "admin": c.state_dir.join("etcd-config.yaml"),
                "local": c.state_dir.join("local-etcd-config.yaml"),
                "remote": c.state_dir.join("remote-etcd-config.yaml"),
            },
            "apiserver": {"pid": c.apiserver_pid, "running": api, "ready": ready, "status": report},
            "nodes": nodes,
        }));
    }
    if a.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "id": st.id, "dir": st.dir, "datapath": st.datapath, "router": st.router_ns,
                "root-link": st.root_link, "bpffs": st.bpffs, "namespaces": st.namespaces,
                "clusters": clusters,
            }))?
        );
    } else {
        println!(
            "router {}{}",
            st.router_ns,
            st.root_link
                .as_ref()
                .map(|l| format!(", root veth {l} ({} → {})", plan::ROOT_IP, plan::UNDERLAY))
                .unwrap_or_default()
        );
        println!(
            "inspect: ip netns exec {} curl -s {}:{}",
            st.pods()
                .first()
                .map(|p| p.pod.ns.clone())
                .unwrap_or_default(),
            st.pods()
                .last()
                .map(|p| p.pod.ip.to_string())
                .unwrap_or_default(),
            plan::ECHO_PORT
        );
    }
    Ok(())
}

/// Every PID number in a JSON document under a key named like a PID (old state formats).
fn pids_in(v: &serde_json::Value, out: &mut Vec<u32>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "pid" || k.ends_with("_pid") {
                    if let Some(p) = v.as_u64() {
                        out.push(p as u32);
                    }
                }
                pids_in(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| pids_in(v, out)),
        _ => {}
    }
}

fn signal_all(pids: &[u32], sig: nix::sys::signal::Signal) {
    for &pid in pids {
        // Our children lead their own process group (etcd lives in the apiserver's).
        let p = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::killpg(p, sig).is_err() {
            let _ = nix::sys::signal::kill(p, sig);
        }
    }
}

/// `lab down`: stops every process, removes namespaces, the root veth, pins and the
/// directory. Works from whatever `lab.json` recorded, and sweeps `cm-<id>-*` namespaces
/// and their processes in case `up` died between a step and its record.
pub fn down(a: DirArgs) -> anyhow::Result<()> {
    let path = state::state_file(&a.dir);
    let Ok(bytes) = std::fs::read(&path) else {
        if a.dir.exists() {
            std::fs::remove_dir_all(&a.dir)
                .with_context(|| format!("removing {}", a.dir.display()))?;
        }
        println!("no lab in {}", a.dir.display());
        return Ok(());
    };
    let raw: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let id = raw["id"].as_str().map(str::to_owned);
    let mut pids = Vec::new();
    if id.is_none() {
        // A lab of an older version (loopback control planes, no namespaces).
        pids_in(&raw, &mut pids);
    }
    let namespaces: Vec<String> = match &id {
        Some(id) => {
            let prefix = plan::ns_prefix(id);
            netns::list()?
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect()
        }
        None => Vec::new(),
    };
    // Everything `up` started runs inside one of its namespaces (`ip netns exec`), etcd too,
    // so the namespaces name the processes; a recorded PID could have been reused since.
    for ns in &namespaces {
        pids.extend(netns::pids(ns));
    }
    pids.sort_unstable();
    pids.dedup();
    let pids: Vec<u32> = pids.into_iter().filter(|p| netns::alive(*p)).collect();
    signal_all(&pids, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| netns::alive(*p)) && Instant::now() < deadline {
        for &p in &pids {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(p as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stubborn: Vec<u32> = pids.iter().copied().filter(|p| netns::alive(*p)).collect();
    signal_all(&stubborn, nix::sys::signal::Signal::SIGKILL);
    // Anything that entered a namespace meanwhile (e.g. `ip netns exec` by hand).
    for ns in &namespaces {
        for p in netns::pids(ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Pins go with the bpffs mount.
    let dir = std::fs::canonicalize(&a.dir).unwrap_or_else(|_| a.dir.clone());
    let bpffs = dir.join("bpf");
    if netns::is_mount_point(&bpffs) {
        let out = std::process::Command::new("umount")
            .arg(&bpffs)
            .output()
            .context("running umount")?;
        if !out.status.success() {
            bail!(
                "unmounting {} failed: {}",
                bpffs.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if let Some(id) = &id {
        let link = plan::root_link(id);
        if netns::ip(&["link", "show", "dev", &link]).is_ok() {
            netns::ip(&["link", "del", &link])?;
        }
    }
    // Deleting a namespace deletes its interfaces; pods first, the router last.
    let mut namespaces = namespaces;
    namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in &namespaces {
        netns::ip(&["netns", "del", ns])?;
    }
    // The pods' resolver files (only the lab's own namespaces' directories).
    if let Some(id) = &id {
        let prefix = plan::ns_prefix(id);
        if let Ok(rd) = std::fs::read_dir("/etc/netns") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path().join("resolv.conf"));
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        // `up` created it if nobody had; gone again only if empty (no other lab's files).
        let _ = std::fs::remove_dir("/etc/netns");
    }
    std::fs::remove_dir_all(&a.dir).with_context(|| format!("removing {}", a.dir.display()))?;
    println!(
        "🧹 Lab {} removed: {} processes stopped, {} namespaces deleted",
        id.as_deref().unwrap_or("(old format)"),
        pids.len(),
        namespaces.len()
    );
    Ok(())
}
