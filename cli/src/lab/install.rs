//! A lab cluster as a cluster install receives it: its objects rendered by
//! `clustermesh_k8s::objects::cluster_install` (the `clustermesh-config` ConfigMap with its
//! name, ID and mesh size, the agent DaemonSet, the certificate Secrets), and its agents run
//! from the DaemonSet's `agent` container, materialised by `clustermesh_k8s::kubelet` into
//! `<state>/pods/agent-<node>/` the way the kubelet mounts the ConfigMap and Secrets. An
//! agent flag, a ConfigMap key or a Secret file that drifts from what the agent needs fails
//! `lab up`, and with it the lab tests.
//!
//! The certificate Secrets hold the files of the cluster's `certs/` (issued by `enable
//! --state-dir`), as the overlays' `secretGenerator` reads the files of `certs issue`.
//!
//! What the lab sets itself, and why:
//! - the Service name in the ConfigMap's `local-etcd-config.yaml` resolves to the control
//!   plane's address through a `cilium-host-aliases` entry (a cluster's DNS and kube-proxy
//!   do that; the server certificate is checked against the Service name all the same);
//! - the agent's bpffs pins (one directory per node on one bpffs), health address (the
//!   node's underlay address, so the lab reaches it) and remote cluster configs (the
//!   directory of the state-dir `connect`, which KVStoreMesh reads too) replace the
//!   DaemonSet's hostPath-based values, and the lab's datapath flags (VXLAN device,
//!   observer, DNS, underlay decapsulation) are added;
//! - the control plane is the `clustermesh-apiserver` Deployment's pod, materialised into
//!   `<state>/pods/clustermesh-apiserver/` ([`control_plane`]): the etcd sidecar with the
//!   server Secret's files and its emptyDir data dir (`var/run/etcd`), the apiserver with the
//!   ConfigMap's name, ID and mesh size, its admin Secret and `--etcd-init`; the lab's
//!   [`super::kubelet`] runs and restarts them in the control-plane namespace. The lab sets
//!   the apiserver's source (`--source=manifests`, the lab's manifests: no Kubernetes API
//!   runs here), and its remote configs and users file to the state dir's `clustermesh/`
//!   and `cluster-users.yaml` (where `connect --state-dir` writes them; in a cluster the
//!   `cilium-kvstoremesh` Secret and `clustermesh-remote-users` ConfigMap);
//! - the cluster's CIDRs (`cluster-cidr`) are its nodes' pod CIDRs ([`cluster_cidrs`]);
//! - the state dir's `certs/` are what the Secrets hold (as the overlays' `secretGenerator`
//!   reads files); [`refresh`] is the kubelet's update of mounted Secrets: after `certs
//!   rotate` it writes the new Secrets' files into every pod of the cluster.
//!
//! It must not start processes (that is [`super::processes`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clustermesh_k8s::kubelet::{self, Materialised};
use clustermesh_k8s::objects::{self, CertPems, Object, Values};

use super::kubelet::ContainerRun;
use super::state::{Cluster, LabState, Node};

/// The Values of a lab cluster (Cilium's defaults but for its name, ID and mesh size;
/// MCS-API on, as the lab's apiservers run it).
pub fn values(c: &Cluster) -> Values {
    Values {
        cluster_name: c.name.clone(),
        cluster_id: c.id,
        max_connected_clusters: c.max_connected_clusters,
        enable_mcs_api: true,
        cluster_cidrs: cluster_cidrs(c),
        ..Values::default()
    }
}

/// A lab cluster's CIDRs (`--cluster-cidr` of its apiserver, `cluster-cidr` of its
/// `apiserver.yaml` for `connect`): every node's pod CIDR of each family the lab runs,
/// so a pod outside its node's range is neither exported nor accepted by peers.
pub fn cluster_cidrs(c: &Cluster) -> Vec<String> {
    let v4 = c.nodes.iter().map(|n| n.pod_cidr.clone());
    // An IPv6-only lab's `pod_cidr` is its `pod_cidr6`: each once.
    let v6 = (c.nodes.iter()).filter_map(|n| n.pod_cidr6.clone().filter(|c6| *c6 != n.pod_cidr));
    v4.chain(v6).filter(|s| !s.is_empty()).collect()
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn pair(certs: &Path, stem: &str) -> anyhow::Result<(String, String)> {
    Ok((
        read(&certs.join(format!("{stem}.crt")))?,
        read(&certs.join(format!("{stem}.key")))?,
    ))
}

/// Cluster `c`'s install objects, certificates from its `certs/` and the CA key from
/// `ca_dir`.
pub fn render(c: &Cluster, ca_dir: &Path) -> anyhow::Result<Vec<Object>> {
    let certs = &c.certs_dir;
    let pems = CertPems {
        ca_cert: read(&certs.join("ca.crt"))?,
        ca_key: read(&ca_dir.join("ca.key"))?,
        server: pair(certs, "server")?,
        admin: pair(certs, &format!("admin-{}", c.name))?,
        local: pair(certs, &format!("local-{}", c.name))?,
        remote: pair(certs, &format!("remote-{}", c.name))?,
    };
    Ok(objects::cluster_install(&values(c), &pems))
}

/// Where node `node`'s agent pod is materialised.
pub fn agent_root(c: &Cluster, node: &Node) -> PathBuf {
    c.state_dir
        .join("pods")
        .join(format!("agent-{}", node.name))
}

/// The etcd Service's DNS name, as the ConfigMap's client configs name it.
fn service_host(v: &Values) -> String {
    format!("{}.{}.svc", objects::APISERVER, v.namespace)
}

/// Node `node`'s agent container materialised from `objs` (its files written under
/// [`agent_root`]) with the Service name resolving to the control plane; the command line
/// is the DaemonSet's, expanded (the caller applies the lab's flags).
pub fn agent(objs: &[Object], c: &Cluster, node: &Node) -> anyhow::Result<Materialised> {
    let ip = node.ip.to_string();
    let fields = BTreeMap::from([
        ("spec.nodeName".to_string(), node.name.clone()),
        ("status.hostIP".to_string(), ip.clone()),
        // hostNetwork: the pod's address is the node's.
        ("status.podIP".to_string(), ip),
    ]);
    let root = agent_root(c, node);
    let objs = with_service_alias(objs, c);
    let m = kubelet::materialise(&objs, "DaemonSet", objects::AGENT, "agent", &fields, &root)
        .with_context(|| format!("materialising the agent of {}/{}", c.name, node.name))?;
    m.flag("etcd-config")
        .context("the agent DaemonSet has no --etcd-config")?;
    Ok(m)
}

/// `objs` with the lab's cluster DNS in the ConfigMap's agent etcd config: a
/// `cilium-host-aliases` entry resolving the etcd Service's name to the control plane's
/// address. It is added to the object, not to the written file, so the kubelet writes the
/// file once and atomically (also when `certs rotate` writes it again under a running agent).
fn with_service_alias(objs: &[Object], c: &Cluster) -> Vec<Object> {
    let host = service_host(&values(c));
    let mut out = objs.to_vec();
    for o in &mut out {
        if o.kind != "ConfigMap" || o.name != objects::CLUSTER_CONFIG {
            continue;
        }
        if let Some(serde_json::Value::String(text)) =
            o.value.pointer_mut("/data/local-etcd-config.yaml")
        {
            if text.contains(&host) && !text.contains("cilium-host-aliases") {
                text.push_str(&format!(
                    "# The lab's cluster DNS: the Service name is the control plane's address.\ncilium-host-aliases:\n- hostname: {host}\n  ips:\n  - {}\n",
                    c.ip
                ));
            }
        }
    }
    out
}

/// Where the cluster's control-plane pod is materialised.
pub fn control_plane_root(c: &Cluster) -> PathBuf {
    c.state_dir.join("pods").join(objects::APISERVER)
}

/// The control-plane pod's containers materialised from `objs` (files under
/// [`control_plane_root`]), as the lab's kubelet runs them: the Deployment's command lines,
/// expanded, with the lab's settings (see the module docs). `service_v2`: the apiserver's
/// `--clustermesh-service-v2`, when the lab sets one.
pub fn control_plane(
    objs: &[Object],
    c: &Cluster,
    service_v2: Option<&str>,
) -> anyhow::Result<Vec<ContainerRun>> {
    let ip = c.ip.to_string();
    let fields = BTreeMap::from([
        ("spec.nodeName".to_string(), format!("{}-cp", c.name)),
        ("status.hostIP".to_string(), ip.clone()),
        ("status.podIP".to_string(), ip),
    ]);
    let root = control_plane_root(c);
    let mut out = Vec::new();
    for container in ["etcd", "apiserver"] {
        let mut m = kubelet::materialise(
            objs,
            "Deployment",
            objects::APISERVER,
            container,
            &fields,
            &root,
        )
        .with_context(|| {
            format!(
                "materialising the {container} of {}'s control plane",
                c.name
            )
        })?;
        // An IPv6 pod IP in a URL needs brackets, which `https://$(POD_IP):2379` cannot
        // give (Kubernetes expands the variable as is): the lab writes them in.
        if let std::net::IpAddr::V6(v6) = c.ip {
            let (bare, bracketed) = (format!("//{v6}:"), format!("//[{v6}]:"));
            for a in m.command.iter_mut().chain(m.args.iter_mut()) {
                *a = a.replace(&bare, &bracketed);
            }
        }
        // Where the lab (status, connect, the tests) looks for this control plane must be
        // where the Deployment puts it: a drift fails `lab up` here, naming both.
        let (flag, want) = if container == "apiserver" {
            ("health-addr", format!(":{}", c.health_addr.port()))
        } else {
            ("listen-client-urls", c.etcd_endpoint.clone())
        };
        let have = m.flag(flag).unwrap_or_default();
        anyhow::ensure!(
            have.contains(&want),
            "the Deployment's {container} has --{flag}={have}, but the lab reaches it at {want} (cli/src/lab/plan.rs): make them agree"
        );
        let (argv, log) = if container == "apiserver" {
            let state = &c.state_dir;
            let mut set = vec![
                ("source", "manifests".to_string()),
                ("manifests", state.join("manifests").display().to_string()),
                (
                    "clustermesh-config",
                    state.join("clustermesh").display().to_string(),
                ),
                (
                    "cluster-users-config-path",
                    state.join("cluster-users.yaml").display().to_string(),
                ),
            ];
            if let Some(mode) = service_v2 {
                set.push(("clustermesh-service-v2", mode.to_string()));
            }
            // The Deployment's `0.0.0.0:<port>` takes IPv4 only: an IPv6-only control
            // plane's health and metrics listen on `[::]`.
            if c.ip.is_ipv6() {
                let any = std::net::Ipv6Addr::UNSPECIFIED;
                set.push((
                    "health-addr",
                    std::net::SocketAddr::from((any, c.health_addr.port())).to_string(),
                ));
                let metrics = m.flag("metrics-addr").and_then(|a| {
                    a.parse::<std::net::SocketAddr>()
                        .ok()
                        .map(|a| std::net::SocketAddr::from((any, a.port())).to_string())
                });
                set.extend(metrics.map(|a| ("metrics-addr", a)));
            }
            // The image's entrypoint is this machine's binary.
            let program = crate::enable::apiserver_binary().display().to_string();
            let argv = std::iter::once(program)
                .chain(with_flags(m.args, &set))
                .collect();
            (argv, state.join("apiserver.log"))
        } else {
            let argv = m.command.into_iter().chain(m.args).collect();
            (argv, c.state_dir.join("etcd.log"))
        };
        out.push(ContainerRun {
            name: container.to_string(),
            argv,
            env: m.env,
            log,
        });
    }
    Ok(out)
}

/// The kubelet's update of mounted Secrets, for the lab cluster whose certificates are in
/// `certs_dir` (if it is one): the cluster's objects are rendered again from its `certs/`
/// and every pod's files (control plane and agents) written again, so the running processes
/// read the new certificates at their next handshake. `None` when `certs_dir` is no lab
/// cluster's; else the number of pods updated and the cluster's name.
pub fn refresh(certs_dir: &Path) -> anyhow::Result<Option<(usize, String)>> {
    let Ok(certs) = std::fs::canonicalize(certs_dir) else {
        return Ok(None);
    };
    // `<lab>/<cluster>/certs`: the lab is two levels up.
    let Some(lab) = certs.parent().and_then(Path::parent) else {
        return Ok(None);
    };
    if !super::state::state_file(lab).is_file() {
        return Ok(None);
    }
    let st: LabState = super::state::load(lab)?;
    let Some(c) = st
        .clusters
        .iter()
        .find(|c| std::fs::canonicalize(&c.certs_dir).is_ok_and(|p| p == certs))
    else {
        return Ok(None);
    };
    let objs = render(c, &st.dir.join("ca"))?;
    let mut pods = 0;
    if control_plane_root(c).is_dir() {
        control_plane(&objs, c, c.service_v2.as_deref())?;
        pods += 1;
    }
    for node in &c.nodes {
        if agent_root(c, node).is_dir() {
            agent(&objs, c, node)?;
            pods += 1;
        }
    }
    Ok(Some((pods, c.name.clone())))
}

/// `args` with each `--flag=value` of `set` replacing the same flag (or appended).
pub fn with_flags(mut args: Vec<String>, set: &[(&str, String)]) -> Vec<String> {
    for (flag, value) in set {
        let prefix = format!("--{flag}=");
        let new = format!("{prefix}{value}");
        match args.iter_mut().find(|a| a.starts_with(&prefix)) {
            Some(a) => *a = new,
            None => args.push(new),
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_flags_replace_the_daemonsets_or_are_added() {
        let args = vec!["--a=1".to_string(), "--b=2".to_string()];
        assert_eq!(
            with_flags(args, &[("b", "3".into()), ("c", "4".into())]),
            vec!["--a=1", "--b=3", "--c=4"]
        );
    }

    /// `lab up --max-connected-clusters 511` reaches the cluster's ConfigMap, whose
    /// `max-connected-clusters` the apiserver Deployment and the agent DaemonSet read
    /// (`MAX_CONNECTED_CLUSTERS`); a lab recorded before the flag existed reads as 255.
    #[test]
    fn the_mesh_size_of_a_lab_cluster_reaches_its_cluster_config() {
        let recorded = serde_json::json!({
            "name": "c1", "id": 1, "ns": "cm-x-c1", "ip": "198.18.1.2",
            "state_dir": "/tmp/lab/c1", "certs_dir": "/tmp/lab/c1/certs",
            "etcd_endpoint": "https://198.18.1.2:2379", "health_addr": "198.18.1.2:9880",
            "apiserver_pid": null, "nodes": []
        });
        let old: Cluster = serde_json::from_value(recorded.clone()).expect("older lab.json");
        assert_eq!(old.max_connected_clusters, 255);
        let mut with = recorded;
        with["max_connected_clusters"] = 511.into();
        let c: Cluster = serde_json::from_value(with).expect("lab.json");
        let cm = objects::cluster_config(&values(&c));
        let data = cm.data.expect("ConfigMap data");
        assert_eq!(data["max-connected-clusters"], "511");
        assert_eq!(data["cluster-id"], "1");
    }
}
