//! `clustermesh cni install`: the agent DaemonSet's init step. It reads the node's pod CIDR
//! (the Node's `spec.podCIDR`, which the downward API does not offer) from the Kubernetes
//! API, copies `clustermesh-cni` into the host's CNI plugin directory and has `clustermesh-cni
//! write-config` write the network configuration the container runtime reads.
//!
//! The pods' MTU is the underlay's less VXLAN's overhead (`clustermesh_types::tunnel`, the
//! rule the agent sizes its VXLAN device by): the MTU of the host interface holding the
//! Node's InternalIP, or `--mtu`.
//!
//! It must not do more: it reads one Node and one interface's MTU and writes two files
//! (each replaced whole, so a runtime never reads half of one). The plugin's own checks of the configuration are
//! `write-config`'s, not repeated here.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use clustermesh_k8s::apply;
use clustermesh_k8s::client::ClientConfig;
use clustermesh_k8s::k8s_openapi::api::core::v1::Node;
use clustermesh_k8s::objects::{CNI_BIN_DIR, CNI_CONF_DIR, CNI_CONF_FILE, CNI_STATE_DIR};
use clustermesh_types::tunnel::{vxlan_mtu, DEFAULT_UNDERLAY_MTU};

/// `clustermesh cni …`.
#[derive(Debug, clap::Subcommand)]
pub enum CniCommand {
    /// Install clustermesh-cni on this node (the agent DaemonSet's init step).
    Install(InstallArgs),
}

/// `clustermesh cni install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The node whose `spec.podCIDR` the plugin allocates from (the pod's `spec.nodeName`).
    #[arg(long)]
    pub node: String,
    /// Use the pod's service account (token, CA and namespace under
    /// /var/run/secrets/kubernetes.io/serviceaccount) instead of a kubeconfig.
    #[arg(long, conflicts_with_all = ["kubeconfig", "context"])]
    pub in_cluster: bool,
    /// kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// The plugin's state directory on the node (its address allocations).
    #[arg(long, default_value = CNI_STATE_DIR)]
    pub state_dir: String,
    /// The network configuration file to write.
    #[arg(long, default_value_t = format!("{CNI_CONF_DIR}/{CNI_CONF_FILE}"))]
    pub out: String,
    /// The directory the container runtime runs CNI plugins from.
    #[arg(long, default_value = CNI_BIN_DIR)]
    pub bin_dir: PathBuf,
    /// The clustermesh-cni binary to install (default: next to this one, else on PATH).
    #[arg(long)]
    pub cni_binary: Option<PathBuf>,
    /// The pods' MTU (default: the MTU of the interface holding the Node's InternalIP, less
    /// VXLAN's 50 bytes over IPv4 or 70 over IPv6; 1500 assumed when no interface holds it).
    #[arg(long, value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub mtu: Option<u32>,
}

/// Runs `clustermesh cni …`.
pub fn run(c: CniCommand) -> anyhow::Result<()> {
    match c {
        CniCommand::Install(a) => install(a),
    }
}

fn cni_binary(a: &InstallArgs) -> PathBuf {
    if let Some(p) = &a.cni_binary {
        return p.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("clustermesh-cni")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("clustermesh-cni"))
}

/// The node's IPv4 pod CIDR (`spec.podCIDR`, else the first IPv4 of `spec.podCIDRs`) and
/// its InternalIP (IPv4 first), if it has one.
async fn pod_cidr(a: &InstallArgs) -> anyhow::Result<(String, Option<IpAddr>)> {
    let config = if a.in_cluster {
        ClientConfig::InCluster
    } else {
        ClientConfig::kubeconfig(a.kubeconfig.clone(), a.context.clone())
    };
    let t = config.target().await?;
    let node: Node = apply::get(&t, None, &a.node).await?.with_context(|| {
        format!(
            "context {}: node {:?} does not exist: --node must be the pod's spec.nodeName",
            t.context, a.node
        )
    })?;
    let internal: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|st| st.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let node_ip = internal
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(internal.first())
        .copied();
    let spec = node.spec.unwrap_or_default();
    let cidrs = spec
        .pod_cidr
        .into_iter()
        .chain(spec.pod_cidrs.unwrap_or_default());
    for c in cidrs {
        if !c.contains(':') {
            return Ok((c, node_ip));
        }
    }
    bail!(
        "context {}: node {:?} has no IPv4 spec.podCIDR, so clustermesh-cni has no addresses to give: have the cluster allocate node CIDRs (kube-controller-manager --allocate-node-cidrs=true --cluster-cidr=…)",
        t.context,
        a.node
    )
}

/// The pods' MTU on this node and where it came from: the MTU of the interface holding
/// `node_ip` (this pod runs in the host's network namespace) less VXLAN's overhead for
/// that family — what the agent gives the VXLAN device it creates.
fn pod_mtu(node_ip: Option<IpAddr>) -> (u32, String) {
    let Some(ip) = node_ip else {
        return (
            vxlan_mtu(DEFAULT_UNDERLAY_MTU, true),
            format!("the node has no InternalIP: {DEFAULT_UNDERLAY_MTU} assumed, less VXLAN"),
        );
    };
    let dev = nix::ifaddrs::getifaddrs().ok().and_then(|mut addrs| {
        addrs.find_map(|a| {
            let held: Option<IpAddr> = a.address.and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            (held == Some(ip)).then_some(a.interface_name)
        })
    });
    let underlay = dev.as_ref().and_then(|d| {
        std::fs::read_to_string(format!("/sys/class/net/{d}/mtu"))
            .ok()
            .and_then(|m| m.trim().parse::<u32>().ok())
    });
    match (dev, underlay) {
        (Some(d), Some(m)) => (
            vxlan_mtu(m, ip.is_ipv4()),
            format!("{d} holds {ip}, MTU {m}, less VXLAN"),
        ),
        _ => (
            vxlan_mtu(DEFAULT_UNDERLAY_MTU, ip.is_ipv4()),
            format!("no interface holds {ip}: {DEFAULT_UNDERLAY_MTU} assumed, less VXLAN"),
        ),
    }
}

/// Copies `src` into `dir` under its file name, executable, replacing any old one whole.
fn install_binary(src: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = src
        .file_name()
        .context("the clustermesh-cni path has no file name")?;
    let dest = dir.join(name);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::copy(src, &tmp).with_context(|| {
        format!(
            "copying {} to {} (is --cni-binary right, and {} writable?)",
            src.display(),
            tmp.display(),
            dir.display()
        )
    })?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", tmp.display()))?;
    // The runtime may run the old plugin right now: a rename swaps it without a torn file.
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(dest)
}

fn install(a: InstallArgs) -> anyhow::Result<()> {
    let (cidr, node_ip) = crate::contexts::runtime()?.block_on(pod_cidr(&a))?;
    let (mtu, mtu_from) = match a.mtu {
        Some(m) => (m, "--mtu".to_owned()),
        None => pod_mtu(node_ip),
    };
    if let Some(parent) = Path::new(&a.out).parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let src = cni_binary(&a);
    let installed = install_binary(&src, &a.bin_dir)?;
    // The copy we just installed writes the config, so the file matches the plugin that reads it.
    let out = Command::new(&installed)
        .args([
            "write-config",
            "--pod-cidr",
            &cidr,
            "--state-dir",
            &a.state_dir,
            "--mtu",
            &mtu.to_string(),
            "--out",
            &a.out,
        ])
        .output()
        .with_context(|| format!("running {} write-config", installed.display()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
    }
    println!(
        "✅ node {}: pod CIDR {cidr}, MTU {mtu} ({mtu_from}); installed {} and wrote {}",
        a.node,
        installed.display(),
        a.out
    );
    Ok(())
}
