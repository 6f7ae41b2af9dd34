//! `clustermesh-agent`: the node agent. Parses and validates flags, sets up tracing, runs
//! the agent from the library until SIGINT/SIGTERM, then drains within a grace period.
//! Shutdown leaves programs attached and maps filled (hitless restarts); `--cleanup`
//! removes them. `--check` only runs the kernel check.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use clustermesh_agent::{kernel, Config, RemoteMode, Transmit, UnderlayDev};
use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Remotes {
    /// Read remotes through the KVStoreMesh cache in the local etcd.
    Kvstoremesh,
    /// Read each remote's etcd directly.
    Direct,
}

/// The clustermesh node agent (one per node, inside the node's network namespace).
#[derive(Parser, Debug)]
#[command(name = "clustermesh-agent", version)]
struct Args {
    /// Local cluster name.
    #[arg(long)]
    cluster_name: Option<String>,
    /// Local cluster ID.
    #[arg(long)]
    cluster_id: Option<u32>,
    /// Mesh size (255 or 511), as for the apiserver.
    #[arg(long, default_value_t = 255)]
    max_connected_clusters: u32,
    /// This node's name.
    #[arg(long)]
    node_name: Option<String>,
    /// This node's underlay IPv4 (pods whose HostIP is this address are local). Required
    /// unless --node-ip6 is given (an IPv6-only node).
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// This node's underlay IPv6, if it has one: IPv6 tunnel endpoints (VXLAN over IPv6)
    /// and pods whose HostIP is this address are local. Alone (without --node-ip) the node
    /// is IPv6-only: its underlay device, tunnel source and observer address are IPv6.
    #[arg(long)]
    node_ip6: Option<Ipv6Addr>,
    /// Client config of the local etcd (user local-<cluster>).
    #[arg(long)]
    etcd_config: Option<PathBuf>,
    /// Directory with one file per remote cluster (may be empty).
    #[arg(long)]
    clustermesh_config: Option<PathBuf>,
    /// Where remote clusters are read from.
    #[arg(long, value_enum, default_value = "kvstoremesh")]
    remotes: Remotes,
    /// Pin directory on bpffs (mounted if it is not bpffs yet).
    #[arg(long, default_value = "/sys/fs/bpf/clustermesh")]
    bpffs_dir: PathBuf,
    /// The VXLAN device (external mode).
    #[arg(long, default_value = "cmvx0")]
    vxlan_dev: String,
    /// The VXLAN device's UDP port.
    #[arg(long, default_value_t = 4789)]
    vxlan_port: u16,
    /// Where VXLAN for this node's pods is decapsulated by BPF before the VXLAN device:
    /// `auto` (the interface holding --node-ip, else --node-ip6, if GRO is on there), an
    /// interface name, or
    /// `off` (everything is received through the VXLAN device).
    #[arg(long, default_value = "auto")]
    underlay_dev: String,
    /// How packets for pods on other nodes leave: `bpf` (the program writes the VXLAN
    /// headers and hands the datagram to the underlay interface: --underlay-dev, or the one
    /// holding --node-ip; falls back to the VXLAN device when there is none, and per packet
    /// for tunnels over IPv6 and packets above the underlay MTU) or `device` (tunnel key and
    /// redirect into the VXLAN device). /status says which one is used.
    #[arg(long, value_enum, default_value = "bpf")]
    transmit: TransmitArg,
    /// Address of /readyz, /healthz, /status and /metrics.
    #[arg(long, default_value = "127.0.0.1:9890")]
    health_addr: SocketAddr,
    /// The flow observer's gRPC address (`clustermesh observe`); default `<node-ip>:4245`
    /// (`[<node-ip6>]:4245` on an IPv6-only node).
    #[arg(long)]
    observer_addr: Option<SocketAddr>,
    /// /readyz turns true at the latest after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    sync_timeout: Duration,
    /// ipcache capacity.
    #[arg(long, default_value_t = clustermesh_ebpf_abi::defaults::IPCACHE_MAX_ENTRIES)]
    ipcache_max_entries: u32,
    /// Local endpoints capacity.
    #[arg(long, default_value_t = clustermesh_ebpf_abi::defaults::LOCAL_ENDPOINTS_MAX_ENTRIES)]
    local_endpoints_max_entries: u32,
    /// The clusterset.local DNS server (UDP); `off` disables it. If the address cannot be
    /// bound, the agent runs without DNS and /status says why.
    #[arg(long, default_value = "169.254.1.1:53", value_parser = parse_dns_addr)]
    dns_addr: DnsAddr,
    /// Cilium's policy-default-local-cluster: a policy selector without the
    /// `io.cilium.k8s.policy.cluster` label matches only endpoints of this cluster.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    policy_default_local_cluster: bool,
    /// Withdraw a disconnected remote's routes after this long (Cilium's
    /// clustermesh-cache-ttl); 0 keeps them until it comes back.
    #[arg(long, visible_alias = "cache-ttl", default_value = "0s", value_parser = humantime::parse_duration)]
    clustermesh_cache_ttl: Duration,
    /// HTTP/2 keepalive interval of every etcd connection while it streams; a dead etcd is
    /// noticed after interval + timeout. The etcd must accept pings that often
    /// (`--grpc-keepalive-min-time`; the embedded one does).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    etcd_keepalive_interval: Duration,
    /// HTTP/2 keepalive timeout of every etcd connection.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    etcd_keepalive_timeout: Duration,
    /// Grace period for draining on SIGINT/SIGTERM.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Only run the kernel check and print what it found.
    #[arg(long)]
    check: bool,
    /// Remove every pin under --bpffs-dir (programs detach, maps go) and exit: for lab down.
    #[arg(long)]
    cleanup: bool,
}

/// `--transmit`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TransmitArg {
    Bpf,
    Device,
}

/// `--dns-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
struct DnsAddr(Option<SocketAddr>);

fn parse_dns_addr(s: &str) -> Result<DnsAddr, String> {
    if s == "off" {
        return Ok(DnsAddr(None));
    }
    s.parse()
        .map(|a| DnsAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an ip:port, or off)"))
}

/// Hubble's observer port, where `clustermesh observe` looks.
const OBSERVER_PORT: u16 = 4245;

fn config(a: &Args) -> anyhow::Result<Config> {
    fn need<T: Clone>(v: &Option<T>, flag: &str) -> anyhow::Result<T> {
        match v {
            Some(v) => Ok(v.clone()),
            None => bail!("{flag} is required"),
        }
    }
    let name =
        ClusterName::new(need(&a.cluster_name, "--cluster-name")?).context("--cluster-name")?;
    let cluster = ClusterInfo {
        name,
        id: need(&a.cluster_id, "--cluster-id")?,
        max_connected_clusters: MaxConnectedClusters::from_u32(a.max_connected_clusters)
            .context("--max-connected-clusters")?,
    };
    // Cilium refuses to start with an ID outside 1..=max: an identity of cluster 300 under
    // 255 would overflow into the scope bits (24-bit VNI), so it is refused here too.
    cluster.validate().context("--cluster-id")?;
    let config = Config {
        cluster,
        node_name: need(&a.node_name, "--node-name")?,
        node_ip: a.node_ip,
        node_ip6: a.node_ip6,
        etcd_config: need(&a.etcd_config, "--etcd-config")?,
        clustermesh_config: need(&a.clustermesh_config, "--clustermesh-config")?,
        remote_mode: match a.remotes {
            Remotes::Kvstoremesh => RemoteMode::KvstoreMesh,
            Remotes::Direct => RemoteMode::Direct,
        },
        bpffs_dir: a.bpffs_dir.clone(),
        vxlan_dev: a.vxlan_dev.clone(),
        vxlan_port: a.vxlan_port,
        underlay_dev: match a.underlay_dev.as_str() {
            "auto" => UnderlayDev::Auto,
            "off" => UnderlayDev::Off,
            dev => UnderlayDev::Named(dev.to_owned()),
        },
        transmit: match a.transmit {
            TransmitArg::Bpf => Transmit::Bpf,
            TransmitArg::Device => Transmit::Device,
        },
        health_addr: a.health_addr,
        observer_addr: match a.observer_addr {
            Some(addr) => addr,
            None => match (a.node_ip, a.node_ip6) {
                (Some(ip), _) => SocketAddr::new(ip.into(), OBSERVER_PORT),
                (None, Some(ip6)) => SocketAddr::new(ip6.into(), OBSERVER_PORT),
                (None, None) => bail!("--node-ip or --node-ip6 is required"),
            },
        },
        sync_timeout: a.sync_timeout,
        ipcache_max_entries: a.ipcache_max_entries,
        local_endpoints_max_entries: a.local_endpoints_max_entries,
        dns_addr: a.dns_addr.0,
        policy_default_local_cluster: a.policy_default_local_cluster,
        cache_ttl: Some(a.clustermesh_cache_ttl).filter(|d| !d.is_zero()),
        connect: clustermesh_syncer::ConnectConfig {
            keepalive: (a.etcd_keepalive_interval, a.etcd_keepalive_timeout),
            ..Default::default()
        },
    };
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    clustermesh_runtime::init_tracing(&std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    if args.cleanup {
        let n = clustermesh_agent::cleanup(&args.bpffs_dir)?;
        println!("removed {n} pins under {}", args.bpffs_dir.display());
        return Ok(());
    }
    if args.check {
        println!("{}", kernel::check(&args.bpffs_dir)?);
        return Ok(());
    }
    let config = config(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    // Shutdown leaves programs attached and maps filled (hitless restarts).
    runtime.block_on(clustermesh_runtime::run(args.shutdown_grace, |token| {
        clustermesh_agent::run(config, token)
    }))??;
    Ok(())
}
