//! Pods wired the way a container runtime wires them: the lab runs a CNI plugin binary per
//! pod with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_PATH` and the
//! network configuration on stdin, inside the node's namespace (the plugin's "host"), and
//! reads the result JSON back: the pod's address and MAC and the host-side interface are
//! whatever the plugin chose. `lab down` calls DEL for every pod.
//!
//! Plugins: Debian's `ptp` and `bridge` (with `host-local` IPAM, one data dir per node) or
//! our `clustermesh-cni`; IPAM comes from the node's pod CIDR (`Node.spec.podCIDR`).
//!
//! It must not create interfaces itself: that is the plugin's job.

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::plan;
use super::state::{LabState, Node, Pod};

/// Which plugin wires the pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Cni {
    /// Debian's `ptp`: a veth per pod and a /32 route to it.
    #[default]
    Ptp,
    /// Debian's `bridge`: every pod's veth on the node's bridge `cni0` (the gateway).
    Bridge,
    /// Our `clustermesh-cni`.
    Clustermesh,
}

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// The network name in every config.
pub const NETWORK: &str = "cm-lab";
/// The bridge of `--cni bridge`.
pub const BRIDGE: &str = "cni0";

impl Cni {
    /// The plugin's `type` (its binary's name).
    pub fn plugin_type(self) -> &'static str {
        match self {
            Cni::Ptp => "ptp",
            Cni::Bridge => "bridge",
            Cni::Clustermesh => "clustermesh-cni",
        }
    }
}

/// The directory holding `clustermesh-cni`: beside this binary (a cargo build puts both in
/// `target/<profile>/`), else `CLUSTERMESH_CNI_DIR`.
fn clustermesh_cni_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CLUSTERMESH_CNI_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `CNI_PATH`: where the runtime (and a plugin calling its IPAM plugin) looks for binaries.
pub fn cni_path() -> String {
    format!("{DEBIAN_CNI_DIR}:{}", clustermesh_cni_dir().display())
}

/// The plugin binary of `cni`.
pub fn plugin_binary(cni: Cni) -> PathBuf {
    match cni {
        Cni::Clustermesh => clustermesh_cni_dir().join("clustermesh-cni"),
        other => Path::new(DEBIAN_CNI_DIR).join(other.plugin_type()),
    }
}

/// Per-node plugin state (host-local's leases, clustermesh-cni's allocations).
pub fn node_state_dir(st: &LabState, node: &Node) -> PathBuf {
    st.dir.join("cni").join(&node.ns)
}

/// The network configuration of `node` for `cni`: IPAM from the node's pod CIDR, pods
/// numbered from `.11` (as the lab always did), routes for the pod and service ranges and
/// the agent's DNS address only (never a default route).
pub fn config(cni: Cni, st: &LabState, node: &Node) -> anyhow::Result<Value> {
    let (net, _) = node
        .pod_cidr
        .split_once('/')
        .with_context(|| format!("pod CIDR {} of {}", node.pod_cidr, node.name))?;
    let state = node_state_dir(st, node);
    let mut ranges = Vec::new();
    let mut routes = Vec::new();
    // IPv4 (absent in an IPv6-only lab, whose `pod_cidr` is the IPv6 one).
    let mut start = String::new();
    if st.ip_family.has_v4() {
        let net: Ipv4Addr = net.parse().context("pod CIDR address")?;
        let o = net.octets();
        start = Ipv4Addr::new(o[0], o[1], o[2], 11).to_string();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1).to_string();
        ranges.push(json!([{"subnet": node.pod_cidr, "rangeStart": start, "gateway": gateway}]));
        routes.extend([
            json!({"dst": "10.0.0.0/8"}),
            json!({"dst": "172.20.0.0/16"}),
            json!({"dst": format!("{}/32", plan::GATEWAY)}),
        ]);
    }
    // Dual-stack: one address of each family (host-local takes one per range set); the
    // IPv6 route's gateway is the IPv6 range's (the plugins pick it by family). IPv6-only:
    // this range alone, and the one IPv6 route (pods, VIPs and the DNS address are in it).
    if let Some(cidr6) = &node.pod_cidr6 {
        let net = cidr6.split_once('/').map_or(cidr6.as_str(), |(n, _)| n);
        let net: Ipv6Addr = net
            .parse()
            .with_context(|| format!("IPv6 pod CIDR {cidr6} of {}", node.name))?;
        let seg = net.segments();
        let at = |last: u16| Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3], 0, 0, 0, last);
        ranges.push(json!([{"subnet": cidr6, "rangeStart": at(0x11).to_string(), "gateway": at(1).to_string()}]));
        routes.push(json!({"dst": plan::POD_ROUTE6}));
    }
    let ipam = || {
        json!({
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
            "dataDir": state.join("ipam"),
        })
    };
    Ok(match cni {
        Cni::Ptp => json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "ptp",
            "mtu": plan::pod_mtu(st.ip_family), "ipam": ipam(),
        }),
        Cni::Bridge => json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge",
            "bridge": BRIDGE, "isGateway": true, "mtu": plan::pod_mtu(st.ip_family), "ipam": ipam(),
        }),
        Cni::Clustermesh => json!({
            "cniVersion": "1.1.0", "name": NETWORK, "type": "clustermesh-cni",
            "podCIDR": node.pod_cidr, "rangeStart": start,
            "stateDir": state, "mtu": plan::pod_mtu(st.ip_family),
            "routes": ["10.0.0.0/8", "172.20.0.0/16"],
        }),
    })
}

/// The container ID the lab gives a pod (stable, so DEL finds what ADD made).
pub fn container_id(st: &LabState, pod: &Pod) -> String {
    format!("{}-{}", st.id, pod.ns)
}

/// What a plugin run gave back.
#[derive(Debug)]
pub struct Added {
    /// The pod's IPv4 address, if the plugin gave one.
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address, if the plugin gave one.
    pub ip6: Option<Ipv6Addr>,
    /// The pod's `eth0` MAC.
    pub mac: String,
    /// The host-side interface of the pod (a veth; for bridge plugins the bridge port).
    pub host_if: String,
}

/// Runs `plugin` for `command` in the node's namespace.
pub fn invoke(
    plugin: &Path,
    command: &str,
    node_ns: &str,
    container_id: &str,
    pod_ns: &str,
    conf: &Value,
) -> anyhow::Result<Value> {
    let netns = format!("/var/run/netns/{pod_ns}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running CNI plugin {}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that fails before reading its config closes stdin: its answer says why.
        let _ = stdin.write_all(conf.to_string().as_bytes());
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply: Value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim()).unwrap_or(Value::String(stdout.trim().to_owned()))
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !plugin.exists() {
            bail!(
                "CNI {command} with {}: the plugin binary does not exist ({}). Install Debian's plugins (`apt-get install containernetworking-plugins`) or build clustermesh-cni (`cargo build -p clustermesh-cni`)",
                plugin.display(),
                stderr.trim()
            );
        }
        bail!(
            "CNI {command} of {pod_ns} with {} failed: code {}: {}{}{}",
            plugin.display(),
            reply["code"],
            reply["msg"].as_str().unwrap_or(stdout.trim()),
            reply["details"]
                .as_str()
                .filter(|d| !d.is_empty())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", stderr.trim())
            }
        );
    }
    Ok(reply)
}

/// Reads a result: the pod's first IPv4 address and first IPv6 one (at least one of them),
/// the interface in the sandbox, and the host-side veth (an interface outside the sandbox
/// that is not the bridge).
pub fn parse_result(r: &Value) -> anyhow::Result<Added> {
    let ifaces = r["interfaces"]
        .as_array()
        .context("result has no interfaces")?;
    let ip = r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok());
    let ip6 = r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find_map(|a| a.split('/').next()?.parse::<Ipv6Addr>().ok());
    if ip.is_none() && ip6.is_none() {
        bail!("result has no IP address: {r}");
    }
    let pod = ifaces
        .iter()
        .find(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .with_context(|| format!("result names no interface in the pod: {r}"))?;
    let host = ifaces
        .iter()
        .find(|i| {
            i["sandbox"].as_str().is_none_or(str::is_empty) && i["name"].as_str() != Some(BRIDGE)
        })
        .with_context(|| format!("result names no host-side interface: {r}"))?;
    Ok(Added {
        ip,
        ip6,
        mac: pod["mac"].as_str().unwrap_or_default().to_owned(),
        host_if: host["name"].as_str().unwrap_or_default().to_owned(),
    })
}

/// ADD for one pod of `node`: its address, MAC and host interface are the plugin's.
pub fn add(st: &LabState, node: &Node, pod: &Pod) -> anyhow::Result<Added> {
    let conf = config(st.cni, st, node)?;
    let r = invoke(
        &plugin_binary(st.cni),
        "ADD",
        &node.ns,
        &container_id(st, pod),
        &pod.ns,
        &conf,
    )?;
    parse_result(&r).with_context(|| format!("CNI ADD of {}", pod.ns))
}

/// DEL for one pod (errors are returned; `down` reports and goes on).
pub fn del(st: &LabState, node: &Node, pod: &Pod) -> anyhow::Result<()> {
    let conf = config(st.cni, st, node)?;
    invoke(
        &plugin_binary(st.cni),
        "DEL",
        &node.ns,
        &container_id(st, pod),
        &pod.ns,
        &conf,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_of_each_plugin_shape_are_read() {
        // ptp (1.0.0): host veth first, then the pod's eth0.
        let ptp = json!({"cniVersion":"1.0.0","interfaces":[{"name":"veth1a2b3c4d","mac":"aa:aa:aa:aa:aa:aa"},{"name":"eth0","mac":"0e:00:00:00:00:01","sandbox":"/var/run/netns/p"}],"ips":[{"interface":1,"address":"10.1.1.11/24","gateway":"10.1.1.1"}]});
        let a = parse_result(&ptp).expect("ptp result");
        assert_eq!(
            (a.ip, a.host_if.as_str(), a.mac.as_str()),
            (
                Some(Ipv4Addr::new(10, 1, 1, 11)),
                "veth1a2b3c4d",
                "0e:00:00:00:00:01"
            )
        );
        // bridge: the bridge is listed too and is not the pod's interface.
        let br = json!({"interfaces":[{"name":"cni0","mac":"bb"},{"name":"vethx","mac":"cc"},{"name":"eth0","mac":"dd","sandbox":"/var/run/netns/p"}],"ips":[{"interface":2,"address":"10.1.1.12/24"}]});
        assert_eq!(parse_result(&br).expect("bridge result").host_if, "vethx");
        assert_eq!(a.ip6, None);
        // Dual-stack: one address of each family.
        let dual = json!({"interfaces":[{"name":"vethy"},{"name":"eth0","mac":"ee","sandbox":"/var/run/netns/p"}],"ips":[{"interface":1,"address":"10.1.1.11/24"},{"interface":1,"address":"fd00:10:1:1::11/64"}]});
        assert_eq!(
            parse_result(&dual).expect("dual result").ip6,
            Some("fd00:10:1:1::11".parse().expect("ip"))
        );
        // IPv6-only: no IPv4 address, and that is no error.
        let v6 = json!({"interfaces":[{"name":"vethz"},{"name":"eth0","mac":"ff","sandbox":"/var/run/netns/p"}],"ips":[{"interface":1,"address":"fd00:10:1:1::11/64"}]});
        let a6 = parse_result(&v6).expect("IPv6-only result");
        assert_eq!((a6.ip, a6.ip6.is_some()), (None, true));
        assert!(parse_result(&json!({"interfaces":[],"ips":[]})).is_err());
        assert!(
            parse_result(&json!({"interfaces":[{"name":"eth0","sandbox":"/p"}],"ips":[]})).is_err()
        );
    }
}
