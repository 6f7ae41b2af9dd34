//! `lab.json`: everything `lab up` made, written after every step so that `status`,
//! `connectivity test` and `down` find it, also after a partial `up`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// How packets cross nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Datapath {
    /// Our agents program eBPF on each node (VXLAN external mode, identity in the VNI).
    Ebpf,
    /// No agents: plain kernel VXLAN (VNI 1) with static forwarding entries and routes,
    /// the baseline of the throughput benchmark.
    Kernel,
}

/// The address families of pods, services and nodes (`lab up --ip-family`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IpFamily {
    /// IPv4 only (pods, VIPs, underlay): the lab as it always was.
    #[default]
    Ipv4,
    /// Dual-stack: pods and VIPs get an IPv6 address beside the IPv4 one (ULA, `fd00::/8`),
    /// nodes an IPv6 underlay address beside the IPv4 one (`2001:db8::/32`); tunnels stay
    /// on the IPv4 underlay (the pods' `hostIP`).
    Dual,
    /// IPv6 only: pods, VIPs, nodes' underlay and the control plane have IPv6 addresses and
    /// no IPv4 ones; tunnels run over the IPv6 underlay (the pods' `hostIP` is IPv6).
    Ipv6,
}

impl IpFamily {
    /// Whether pods have IPv6 addresses.
    pub fn has_v6(self) -> bool {
        self != IpFamily::Ipv4
    }

    /// Whether pods (and nodes, and the control plane) have IPv4 addresses.
    pub fn has_v4(self) -> bool {
        self != IpFamily::Ipv6
    }
}

/// The lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Short ID in every namespace and link name (`cm-<id>-…`).
    pub id: String,
    /// The lab directory (absolute).
    pub dir: PathBuf,
    /// How packets cross nodes.
    pub datapath: Datapath,
    /// The CNI plugin that wired the pods (DEL at `down` uses the same).
    #[serde(default)]
    pub cni: super::cni::Cni,
    /// The address families (`--ip-family`).
    #[serde(default)]
    pub ip_family: IpFamily,
    /// The router namespace (every underlay subnet is reachable from it).
    pub router_ns: String,
    /// The root namespace's veth into the router, when `up` created one.
    pub root_link: Option<String>,
    /// bpffs mounted for the agents' pins.
    pub bpffs: Option<PathBuf>,
    /// Namespaces created, in order.
    pub namespaces: Vec<String>,
    /// Clusters.
    pub clusters: Vec<Cluster>,
}

/// One cluster: a control-plane namespace and its nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    /// Name (`c<i>`).
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// Control-plane namespace (etcd + apiserver).
    pub ns: String,
    /// Control-plane address (IPv4; IPv6 in an IPv6-only lab).
    pub ip: IpAddr,
    /// State dir (`clustermesh enable`).
    pub state_dir: PathBuf,
    /// Certificates.
    pub certs_dir: PathBuf,
    /// etcd client endpoint.
    pub etcd_endpoint: String,
    /// apiserver health address.
    pub health_addr: SocketAddr,
    /// PID of the control-plane pod's kubelet (`lab kubelet`), which runs the apiserver
    /// Deployment's containers (etcd, apiserver) and ends them when it ends. The name is
    /// kept from when the apiserver ran alone, so older readers of `lab.json` still find it.
    pub apiserver_pid: Option<u32>,
    /// The apiserver's `--clustermesh-service-v2` mode, when `lab up --service-v2` set one
    /// (absent: the apiserver's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_v2: Option<String>,
    /// Mesh size (`lab up --max-connected-clusters`): 255 or 511, given to the cluster's
    /// `clustermesh enable` (apiserver, KVStoreMesh, `connect`) and its agents' DaemonSet.
    /// Labs recorded before the flag existed ran 255.
    #[serde(default = "default_max_connected_clusters")]
    pub max_connected_clusters: u32,
    /// Nodes.
    pub nodes: Vec<Node>,
}

fn default_max_connected_clusters() -> u32 {
    255
}

/// One node: a namespace with an underlay `eth0`, `cmvx0` and the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// Name (`n<j>`).
    pub name: String,
    /// Namespace.
    pub ns: String,
    /// Underlay address: IPv4, or IPv6 in an IPv6-only lab (then the same as `ip6`).
    pub ip: IpAddr,
    /// Pod CIDR, of the same family as `ip`.
    pub pod_cidr: String,
    /// IPv6 underlay address (dual-stack and IPv6-only labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// IPv6 pod CIDR (dual-stack and IPv6-only labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<String>,
    /// The agent, if one was started.
    pub agent: Option<Agent>,
    /// Pods.
    pub pods: Vec<Pod>,
}

/// A node's agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    /// PID.
    pub pid: u32,
    /// `/readyz`, `/status`, `/metrics`.
    pub health_addr: SocketAddr,
    /// Log file.
    pub log: PathBuf,
    /// Pin directory.
    pub bpffs_dir: PathBuf,
}

/// One pod: a namespace with `eth0`, a veth to its node, and an echo server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Network namespace.
    pub ns: String,
    /// Address (what the CNI plugin returned): IPv4, or IPv6 in an IPv6-only lab (then
    /// the same as `ip6`).
    pub ip: IpAddr,
    /// IPv6 address (what the CNI plugin returned; dual-stack and IPv6-only labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// `eth0` MAC (the plugin's result).
    pub mac: String,
    /// Host-side interface in the node namespace (the plugin's result; for `bridge` the
    /// bridge port).
    pub host_veth: String,
    /// Echo server PID.
    pub echo_pid: Option<u32>,
}

impl Pod {
    /// The pod's IPv4 address (`None` in an IPv6-only lab).
    pub fn ip4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

/// A pod with where it runs.
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    /// Its cluster.
    pub cluster: &'a Cluster,
    /// Its node.
    pub node: &'a Node,
    /// The pod.
    pub pod: &'a Pod,
}

impl PodRef<'_> {
    /// `c1/n1/echo-1-1`.
    pub fn label(&self) -> String {
        format!("{}/{}/{}", self.cluster.name, self.node.name, self.pod.name)
    }
}

impl LabState {
    /// Every pod, cluster by cluster, node by node.
    pub fn pods(&self) -> Vec<PodRef<'_>> {
        let mut out = Vec::new();
        for cluster in &self.clusters {
            for node in &cluster.nodes {
                for pod in &node.pods {
                    out.push(PodRef { cluster, node, pod });
                }
            }
        }
        out
    }

    /// Writes `lab.json` (atomically: a crash never leaves half a file for `down`).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = state_file(&self.dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// `<dir>/lab.json`.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

/// Reads the lab in `dir`.
pub fn load(dir: &Path) -> anyhow::Result<LabState> {
    let p = state_file(dir);
    let bytes = std::fs::read(&p).with_context(|| {
        format!(
            "no lab in {} (run `clustermesh lab up` first, or pass --dir)",
            dir.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} was written by another version: `clustermesh lab down --dir {}` removes it",
            p.display(),
            dir.display()
        )
    })
}
