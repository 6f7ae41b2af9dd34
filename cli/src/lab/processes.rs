//! The lab's processes: echo servers in the pods, control planes (the apiserver Deployment's
//! pod, etcd sidecar included, under the lab's kubelet) in their namespaces, the mesh connections between them, and one agent per node; each started, then
//! waited for until it answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::manifests::manifests;
use super::network::dns_server;
use super::state::{Agent, LabState};
use super::{http_get, install, kubelet, netns, plan};
use crate::enable::{self, EnableArgs};
use crate::remotes::{connect_pair, status_json, Access};

/// The agent binary: `$CLUSTERMESH_AGENT_BIN`, next to this one, or on PATH.
pub(super) fn agent_binary() -> PathBuf {
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
pub(super) fn agent_supports_contract(bin: &Path) -> bool {
    std::process::Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
            text.contains("--vxlan-dev") && text.contains("--node-ip")
        })
        .unwrap_or(false)
}

fn self_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating the clustermesh binary")
}

pub(super) fn start_echo_servers(st: &mut LabState) -> anyhow::Result<()> {
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

pub(super) fn wait_echo_servers(st: &LabState) -> anyhow::Result<()> {
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

pub(super) fn start_control_planes(st: &mut LabState) -> anyhow::Result<()> {
    let ca_dir = st.dir.join("ca");
    for c in &mut st.clusters {
        let ea = EnableArgs {
            cluster_name: c.name.clone(),
            cluster_id: c.id,
            max_connected_clusters: c.max_connected_clusters,
            state_dir: c.state_dir.clone(),
            ca_dir: ca_dir.clone(),
            etcd_listen: plan::etcd_listen(c.ip),
            etcd_peer_port: 2380,
            health_addr: c.health_addr,
            manifests: None,
            extra_dns: Vec::new(),
            extra_ips: vec![c.ip],
            enable_mcs_api: true,
            cluster_cidrs: install::cluster_cidrs(c),
            force: false,
            start: false,
        };
        let prepared = enable::prepare(&ea)?;
        for (file, text) in manifests(c) {
            std::fs::write(prepared.manifests.join(&file), text)
                .with_context(|| format!("writing {file} into {}", prepared.manifests.display()))?;
        }
        // The control plane is the Deployment's pod: its containers materialised from the
        // cluster's install objects, run by the lab's kubelet in the control-plane namespace.
        let objs = install::render(c, &ca_dir)?;
        let containers = install::control_plane(&objs, c, c.service_v2.as_deref())?;
        let pod = install::control_plane_root(c);
        kubelet::write_spec(&pod, &containers)?;
        let args = vec![
            "lab".into(),
            "kubelet".into(),
            "--pod".into(),
            pod.display().to_string(),
        ];
        c.apiserver_pid = Some(netns::spawn(
            &c.ns,
            &self_binary()?,
            &args,
            &c.state_dir.join("kubelet.log"),
        )?);
    }
    Ok(())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

pub(super) fn wait_control_planes(st: &LabState, timeout: Duration) -> anyhow::Result<()> {
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
pub(super) fn connect_mesh(st: &LabState, timeout: Duration) -> anyhow::Result<()> {
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

pub(super) fn start_agents(
    st: &mut LabState,
    bin: &Path,
    underlay_decap: bool,
    bpf_transmit: bool,
) -> anyhow::Result<()> {
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
    let ca_dir = st.dir.join("ca");
    let dns = dns_server(st);
    for c in &mut st.clusters {
        // The cluster's install objects: each agent runs from the DaemonSet's container.
        let objs = install::render(c, &ca_dir)?;
        let state_dir = c.state_dir.clone();
        for j in 1..=c.nodes.len() as u32 {
            let m = install::agent(&objs, c, &c.nodes[j as usize - 1])?;
            let node = &mut c.nodes[j as usize - 1];
            let pins = bpffs.join(format!("{}-{}", c.name, node.name));
            let health = plan::agent_health(node.ip);
            let log = state_dir.join(format!("agent-{}.log", node.name));
            let mut flags = vec![
                (
                    "clustermesh-config",
                    state_dir.join("clustermesh").display().to_string(),
                ),
                ("bpffs-dir", pins.display().to_string()),
                ("health-addr", health.to_string()),
                ("vxlan-dev", plan::VXLAN_DEV.to_string()),
                (
                    "observer-addr",
                    SocketAddr::new(node.ip, crate::observe::OBSERVER_PORT).to_string(),
                ),
                ("dns-addr", SocketAddr::new(dns, 53).to_string()),
                (
                    "underlay-dev",
                    if underlay_decap { "auto" } else { "off" }.to_string(),
                ),
                (
                    "transmit",
                    if bpf_transmit { "bpf" } else { "device" }.to_string(),
                ),
            ];
            // Dual-stack: the node's IPv6 underlay address (HostIP of nothing yet: tunnels
            // stay on IPv4, the pods' hostIP). IPv6-only: it alone (the DaemonSet's
            // `--node-ip=$(NODE_IP)` is dropped: `status.hostIP` is IPv6 there, and the
            // agent then tunnels over the IPv6 underlay).
            if let Some(ip6) = node.ip6 {
                flags.push(("node-ip6", ip6.to_string()));
            }
            let mut args = install::with_flags(m.args, &flags);
            if node.ip.is_ipv6() {
                args.retain(|a| !a.starts_with("--node-ip="));
            }
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

pub(super) fn wait_agents(st: &LabState, timeout: Duration) -> anyhow::Result<()> {
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
