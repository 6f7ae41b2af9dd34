//! `lab up`: checks the request, plans the lab (names and addresses from [`plan`]), then
//! brings it up step by step, recording every step in `lab.json` so `down` finds it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::cni::Cni;
use super::network::build_network;
use super::processes::{
    agent_binary, agent_supports_contract, connect_mesh, start_agents, start_control_planes,
    start_echo_servers, wait_agents, wait_control_planes, wait_echo_servers,
};
use super::state::{self, Cluster, Datapath, IpFamily, LabState, Node, Pod};
use super::{netns, plan};

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
    #[arg(long, default_value = super::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// `ebpf`: agents program our datapath; `kernel`: plain kernel VXLAN with static
    /// forwarding entries, no agents (the benchmark baseline); with IPv6 pods, their
    /// traffic crosses nodes over a second VXLAN device on the IPv6 underlay (`cmvx6`).
    #[arg(long, value_enum, default_value_t = Datapath::Ebpf)]
    pub datapath: Datapath,
    /// With `--datapath ebpf`: whether agents decapsulate VXLAN for their pods at the
    /// underlay (`from_underlay`); `false` receives everything through the VXLAN device
    /// (the agent's `--underlay-dev off`; for comparing the two receive paths).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub underlay_decap: bool,
    /// With `--datapath ebpf`: whether agents encapsulate VXLAN in BPF and send it to the
    /// underlay themselves (the agent's `--transmit bpf`, its default); `false` sends
    /// through the VXLAN device (`--transmit device`; for comparing the two transmit paths).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bpf_transmit: bool,
    /// The CNI plugin that wires the pods, run per pod as a container runtime does:
    /// `ptp` and `bridge` are Debian's reference plugins (host-local IPAM), `clustermesh`
    /// is `clustermesh-cni`.
    #[arg(long, value_enum, default_value_t = Cni::Ptp)]
    pub cni: Cni,
    /// Address families: `ipv4` (default); `dual`: pods and service VIPs also get IPv6
    /// addresses (`fd00:10:<c>:<n>::/64`, VIPs in `fd00:20::/108`), nodes an IPv6 underlay
    /// address (`2001:db8:0:<c>::<10+n>`), and the connectivity test runs every check per
    /// family; `ipv6`: IPv6 only (pods, VIPs, nodes, control plane at `2001:db8:0:<c>::2`,
    /// tunnels over the IPv6 underlay, DNS on `fd00:53::53`), every check over IPv6.
    #[arg(long, value_enum, default_value_t = IpFamily::Ipv4)]
    pub ip_family: IpFamily,
    /// The `--clustermesh-service-v2` mode of one cluster's apiserver, as `CLUSTER=MODE`
    /// (repeatable), e.g. `c2=only-endpointslice`: c2 exports its global services as
    /// EndpointSlices only, and the other clusters' agents read them from there.
    #[arg(long = "service-v2", value_name = "CLUSTER=MODE", value_parser = parse_service_v2)]
    pub service_v2: Vec<(String, String)>,
    /// Mesh size of every cluster: 255 (Cilium's default; cluster IDs 1..=255, 16-bit
    /// identity ranges) or 511 (IDs 1..=511, 15-bit ranges). Passed to every component of
    /// the lab: apiservers and their KVStoreMesh, agents, and `connect`.
    #[arg(long, default_value_t = 255, value_parser = parse_max_connected_clusters)]
    pub max_connected_clusters: u32,
    /// How long to wait for control planes, mesh and agents.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `CLUSTER=MODE` of `--service-v2` (the mode itself is checked by the apiserver, whose
/// refusal `lab up` shows with its log).
fn parse_service_v2(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((c, m)) if !c.is_empty() && !m.is_empty() => Ok((c.to_owned(), m.to_owned())),
        _ => Err(format!(
            "{s:?} is not CLUSTER=MODE (e.g. c2=only-endpointslice)"
        )),
    }
}

/// `--max-connected-clusters`: 255 or 511, refused otherwise with the reason.
fn parse_max_connected_clusters(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number: use 255 or 511"))?;
    clustermesh_types::cluster::MaxConnectedClusters::from_u32(n)
        .map(|m| m.as_u32())
        .map_err(|e| e.to_string())
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
    if let Some((c, _)) = a
        .service_v2
        .iter()
        .find(|(c, _)| !(1..=a.clusters).any(|i| plan::cluster_name(i) == *c))
    {
        bail!(
            "--service-v2 names cluster {c:?}, which this lab does not have (c1..=c{})",
            a.clusters
        );
    }
    if a.ip_family.has_v6() && a.cni == Cni::Clustermesh {
        bail!(
            "--ip-family {} needs --cni {}: clustermesh-cni hands out IPv4 addresses only",
            if a.ip_family.has_v4() { "dual" } else { "ipv6" },
            if a.ip_family.has_v4() {
                "ptp or bridge"
            } else {
                "ptp"
            }
        );
    }
    if a.ip_family == IpFamily::Ipv6 && a.cni == Cni::Bridge {
        bail!(
            "--ip-family ipv6 needs --cni ptp: the agent finds an IPv6-only pod behind a routed veth, not behind a bridge (its local endpoint would wait; `/status` datapath.ipv6.pods says why)"
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
        cni: a.cni,
        ip_family: a.ip_family,
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
                ip: plan::node_addr(i, j, a.ip_family),
                pod_cidr: plan::node_pod_cidr(i, j, a.ip_family),
                ip6: a.ip_family.has_v6().then(|| plan::node_ip6(i, j)),
                pod_cidr6: a.ip_family.has_v6().then(|| plan::pod_cidr6(i, j)),
                agent: None,
                pods: (1..=a.pods)
                    .map(|k| {
                        let pod = plan::pod_name(j, k);
                        // Address, MAC and host interface: filled in from the CNI result.
                        Pod {
                            host_veth: String::new(),
                            name: pod,
                            namespace: plan::POD_NAMESPACE.into(),
                            ns: plan::pod_ns(&id, i, j, k),
                            ip: plan::pod_ip(i, j, k).into(),
                            ip6: None,
                            mac: String::new(),
                            echo_pid: None,
                        }
                    })
                    .collect(),
            })
            .collect();
        let cp = plan::cp_addr(i, a.ip_family);
        st.clusters.push(Cluster {
            id: i,
            ns: plan::cp_ns(&id, i),
            ip: cp,
            certs_dir: state_dir.join("certs"),
            state_dir,
            etcd_endpoint: format!("https://{}", plan::etcd_listen(cp)),
            health_addr: plan::apiserver_health(cp),
            apiserver_pid: None,
            // The last one given for a cluster wins, as with any repeated flag.
            service_v2: (a.service_v2.iter().rev())
                .find(|(c, _)| *c == name)
                .map(|(_, m)| m.clone()),
            max_connected_clusters: a.max_connected_clusters,
            nodes,
            name,
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
        "🌐 Building lab {} in {}: {} clusters × {} nodes × {} pods, datapath {:?}, CNI {}, IP family {:?}",
        st.id,
        st.dir.display(),
        a.clusters,
        a.nodes,
        a.pods,
        st.datapath,
        st.cni.plugin_type(),
        st.ip_family
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
            start_agents(st, &bin, a.underlay_decap, a.bpf_transmit)?;
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
            "  {:<7} {:<24} etcd {}  health http://{}{}",
            c.name,
            c.ns,
            c.etcd_endpoint,
            c.health_addr,
            c.service_v2
                .as_ref()
                .map(|m| format!("  service-v2 {m}"))
                .unwrap_or_default()
        );
        for node in &c.nodes {
            println!(
                "    {:<5} {:<24} {}{}",
                node.name,
                node.ns,
                node.ip,
                node.ip6
                    .filter(|a| node.ip != std::net::IpAddr::from(*a))
                    .map(|a| format!(" {a}"))
                    .unwrap_or_default()
            );
            for pod in &node.pods {
                println!(
                    "      {:<9} {:<24} {:<10} {}({})",
                    pod.name,
                    pod.ns,
                    pod.ip,
                    pod.ip6
                        .filter(|a| pod.ip != std::net::IpAddr::from(*a))
                        .map(|a| format!("{a} "))
                        .unwrap_or_default(),
                    pod.host_veth
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
        "  ip netns exec {} curl -s http://{}/    # {} asks {} who it is",
        src.pod.ns,
        std::net::SocketAddr::new(dst.pod.ip, plan::ECHO_PORT),
        src.label(),
        dst.label()
    );
    println!("  ip netns exec {} ping -c 3 {}", src.pod.ns, dst.pod.ip);
    println!(
        "  ip netns exec {} tcpdump -nni eth0 -vv udp port 4789    # VXLAN on the underlay (VNI = source identity)",
        src.node.ns
    );
    println!("  {me} connectivity test --dir {d}");
    println!(
        "  {me} ui --dir {d}    # the web view on http://{}/",
        crate::ui::DEFAULT_LISTEN
    );
    println!("  {me} lab status --dir {d}");
    println!("Tear it down: {me} lab down --dir {d}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connected_clusters_is_255_or_511() {
        assert_eq!(parse_max_connected_clusters("255"), Ok(255));
        assert_eq!(parse_max_connected_clusters("511"), Ok(511));
        for bad in ["256", "0", "x"] {
            let e = parse_max_connected_clusters(bad).expect_err(bad);
            assert!(e.contains("255") && e.contains("511"), "{bad}: {e}");
        }
    }
}
