//! `clustermesh enable`: prepare one cluster for the mesh — certificates from a shared CA,
//! the apiserver's config, client configs for its users, and the state directory layout.
//!
//! Layout of a state dir:
//! ```text
//! <state>/certs/            ca.crt, server.*, admin-<c>.*, local-<c>.*, remote.*, remote-<c>.*, root.*
//! <state>/apiserver.yaml    clustermesh-apiserver --config
//! <state>/manifests/        the cluster's source (Kubernetes-shaped YAML)
//! <state>/clustermesh/      remote cluster config files, one per peer (`clustermesh connect`)
//! <state>/cluster-users.yaml  the peers' etcd users (`remote-<peer>`, written by `connect`),
//!                           which the apiserver keeps in its etcd, also after a data loss
//! <state>/etcd/             embedded etcd data (0700)
//! <state>/etcd-config.yaml  admin-<c> client config (the apiserver's)
//! <state>/local-etcd-config.yaml   local-<c> client config (the cluster's agents)
//! <state>/remote-etcd-config.yaml  remote client config template (what peers use)
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clustermesh_certs::{issue_cluster_set, Ca, ServerSpec};
use clustermesh_syncer::EtcdConfig;
use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};

/// Flags of `clustermesh enable`: a Kubernetes cluster by kubeconfig context (the default),
/// or a state directory (`--state-dir`, the lab's form).
#[derive(Debug, clap::Args)]
pub struct EnableCmd {
    /// Cluster name (default: what the cluster's cilium-config or clustermesh-config says).
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Cluster ID (1..=max-connected-clusters), unique in the mesh.
    #[arg(long)]
    pub cluster_id: Option<u32>,
    /// 255 or 511; must be the same in every cluster of the mesh.
    #[arg(long)]
    pub max_connected_clusters: Option<u32>,
    /// The mesh's shared CA (`ca.crt`, `ca.key`) on this machine; created if empty. With
    /// --context, the cluster's own `cilium-ca` Secret wins when it exists.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kube: crate::contexts::KubeArgs,
    #[command(flatten)]
    pub install: crate::manifests::InstallArgs,
    /// Write nothing; say (or with -o yaml print) what would be sent.
    #[arg(long)]
    pub dry_run: bool,
    /// `yaml`: print every object that would be applied (with --dry-run).
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    /// State directory for this cluster (instead of a Kubernetes cluster).
    #[arg(long, conflicts_with_all = ["context", "kubeconfig", "dry_run", "service_type"])]
    pub state_dir: Option<PathBuf>,
    /// (--state-dir) Address the embedded etcd serves clients on.
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub etcd_listen: SocketAddr,
    /// (--state-dir) Peer port of the embedded etcd (127.0.0.1).
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
    /// (--state-dir) Address for /readyz, /healthz, /status and /metrics.
    #[arg(long, default_value = "127.0.0.1:9880")]
    pub health_addr: SocketAddr,
    /// (--state-dir) Manifest directory (default: <state-dir>/manifests).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// (--state-dir) Extra DNS names for the server certificate.
    #[arg(long = "extra-dns")]
    pub extra_dns: Vec<String>,
    /// (--state-dir) Extra IPs for the server certificate (the etcd listen IP is added).
    #[arg(long = "extra-ip")]
    pub extra_ips: Vec<IpAddr>,
    /// (--state-dir) Re-issue certificates even if they exist.
    #[arg(long)]
    pub force: bool,
    /// (--state-dir) Run the apiserver in the foreground once prepared.
    #[arg(long)]
    pub start: bool,
}

/// `clustermesh enable`, either form.
pub fn run_cmd(c: EnableCmd) -> anyhow::Result<()> {
    let Some(state_dir) = c.state_dir else {
        let yaml = crate::contexts::yaml_output(&c.output, c.dry_run)?;
        let r = crate::contexts::enable::Request {
            kube: c.kube,
            install: c.install,
            cluster_name: c.cluster_name,
            cluster_id: c.cluster_id,
            max_connected_clusters: c.max_connected_clusters,
            ca_dir: c.ca_dir,
            dry_run: c.dry_run,
            yaml,
        };
        return crate::contexts::runtime()?.block_on(crate::contexts::enable::run(r));
    };
    run(EnableArgs {
        cluster_name: c
            .cluster_name
            .context("--cluster-name is required with --state-dir")?,
        cluster_id: c
            .cluster_id
            .context("--cluster-id is required with --state-dir")?,
        max_connected_clusters: c.max_connected_clusters.unwrap_or(255),
        state_dir,
        ca_dir: c.ca_dir.context("--ca-dir is required with --state-dir")?,
        etcd_listen: c.etcd_listen,
        etcd_peer_port: c.etcd_peer_port,
        health_addr: c.health_addr,
        manifests: c.manifests,
        extra_dns: c.extra_dns,
        extra_ips: c.extra_ips,
        enable_mcs_api: c.install.enable_mcs_api,
        cluster_cidrs: c.install.cluster_cidr,
        force: c.force,
        start: c.start,
    })
}

/// What `enable --state-dir` prepares.
#[derive(Debug, Clone)]
pub struct EnableArgs {
    /// Cluster name.
    pub cluster_name: String,
    /// Cluster ID (1..=max-connected-clusters), unique in the mesh.
    pub cluster_id: u32,
    /// 255 or 511; must be the same in every cluster of the mesh.
    pub max_connected_clusters: u32,
    /// State directory for this cluster.
    pub state_dir: PathBuf,
    /// Directory holding the mesh's shared CA (`ca.crt`, `ca.key`); created if empty.
    pub ca_dir: PathBuf,
    /// Address the embedded etcd serves clients on.
    pub etcd_listen: SocketAddr,
    /// Peer port of the embedded etcd (127.0.0.1).
    pub etcd_peer_port: u16,
    /// Address for /readyz, /healthz, /status and /metrics.
    pub health_addr: SocketAddr,
    /// Manifest directory (default: <state-dir>/manifests).
    pub manifests: Option<PathBuf>,
    /// Extra DNS names for the server certificate.
    pub extra_dns: Vec<String>,
    /// Extra IPs for the server certificate (the etcd listen IP is added automatically).
    pub extra_ips: Vec<IpAddr>,
    /// Export MCS-API ServiceExports.
    pub enable_mcs_api: bool,
    /// The cluster's pod CIDRs (`cluster-cidr` of `apiserver.yaml`; `connect` hands them to
    /// the peers); empty: no rule.
    pub cluster_cidrs: Vec<String>,
    /// Re-issue certificates even if they exist.
    pub force: bool,
    /// Run the apiserver in the foreground once prepared.
    pub start: bool,
}

/// Paths of a prepared cluster.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// State dir.
    pub state_dir: PathBuf,
    /// apiserver config file.
    pub config: PathBuf,
    /// Manifest dir.
    pub manifests: PathBuf,
    /// etcd endpoint URL.
    pub endpoint: String,
}

/// Prepares the cluster; idempotent (existing certificates are kept unless `force`).
pub fn prepare(a: &EnableArgs) -> anyhow::Result<Prepared> {
    let name = ClusterName::new(a.cluster_name.clone()).context("--cluster-name")?;
    let max = MaxConnectedClusters::from_u32(a.max_connected_clusters)
        .context("--max-connected-clusters")?;
    let info = ClusterInfo {
        name: name.clone(),
        id: a.cluster_id,
        max_connected_clusters: max,
    };
    info.validate().context("--cluster-id")?;
    let state = &a.state_dir;
    mkdir_private(state)?;
    let ca = if a.ca_dir.join("ca.key").exists() {
        Ca::load(&a.ca_dir)
            .with_context(|| format!("loading the CA from {}", a.ca_dir.display()))?
    } else {
        let ca = Ca::generate("Cilium CA")?;
        ca.write(&a.ca_dir)?;
        eprintln!(
            "🔑 Created a new CA in {} — share it with every cluster of the mesh",
            a.ca_dir.display()
        );
        ca
    };
    let certs = state.join("certs");
    if a.force || !certs.join("server.crt").exists() {
        let mut extra_ips = a.extra_ips.clone();
        if !a.etcd_listen.ip().is_loopback() && !extra_ips.contains(&a.etcd_listen.ip()) {
            extra_ips.push(a.etcd_listen.ip());
        }
        let spec = ServerSpec {
            extra_dns_names: a.extra_dns.clone(),
            extra_ips,
            ..Default::default()
        };
        issue_cluster_set(&ca, name.as_str(), &certs, &spec)?;
    }
    let manifests = a
        .manifests
        .clone()
        .unwrap_or_else(|| state.join("manifests"));
    std::fs::create_dir_all(&manifests)
        .with_context(|| format!("creating {}", manifests.display()))?;
    // Remote cluster config files (`clustermesh connect` writes them; KVStoreMesh reads).
    mkdir_private(&state.join("clustermesh"))?;
    let endpoint = format!("https://{}", a.etcd_listen);
    let client = |stem: &str| EtcdConfig {
        endpoints: vec![endpoint.clone()],
        trusted_ca_file: Some(certs.join("ca.crt")),
        cert_file: Some(certs.join(format!("{stem}.crt"))),
        key_file: Some(certs.join(format!("{stem}.key"))),
        host_aliases: Vec::new(),
        cluster_cidrs: Default::default(),
    };
    client(&format!("admin-{name}")).save(&state.join("etcd-config.yaml"))?;
    client(&format!("local-{name}")).save(&state.join("local-etcd-config.yaml"))?;
    client("remote").save(&state.join("remote-etcd-config.yaml"))?;
    let config = state.join("apiserver.yaml");
    let text = format!(
        "# written by `clustermesh enable`\ncluster-name: {name}\ncluster-id: {id}\nmax-connected-clusters: {max}\nstate-dir: {state}\nmanifests: {manifests}\nembedded-etcd-listen: \"{listen}\"\nembedded-etcd-peer-port: {peer}\nhealth-addr: \"{health}\"\nclustermesh-enable-mcs-api: {mcs}\ncluster-users-config-path: {users}\n",
        id = a.cluster_id,
        max = max.as_u32(),
        state = state.display(),
        manifests = manifests.display(),
        listen = a.etcd_listen,
        peer = a.etcd_peer_port,
        health = a.health_addr,
        mcs = a.enable_mcs_api,
        users = state.join("cluster-users.yaml").display(),
    );
    let cidrs = clustermesh_types::cluster_cidrs::ClusterCidrs::parse(&a.cluster_cidrs)
        .context("--cluster-cidr")?;
    let text = if cidrs.is_empty() {
        text
    } else {
        let quoted: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
        format!("{text}cluster-cidr: [{}]\n", quoted.join(", "))
    };
    clustermesh_syncer::config::write_private(&config, text.as_bytes())?;
    Ok(Prepared {
        state_dir: state.clone(),
        config,
        manifests,
        endpoint,
    })
}

fn mkdir_private(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// The apiserver binary: next to this one, or on PATH.
pub fn apiserver_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CLUSTERMESH_APISERVER_BIN") {
        return p.into();
    }
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let p = dir.join("clustermesh-apiserver");
            if p.exists() {
                return p;
            }
        }
    }
    "clustermesh-apiserver".into()
}

/// `clustermesh enable`.
pub fn run(a: EnableArgs) -> anyhow::Result<()> {
    let p = prepare(&a)?;
    println!(
        "✅ Cluster {} (ID {}) is prepared in {}",
        a.cluster_name,
        a.cluster_id,
        p.state_dir.display()
    );
    println!("  - etcd endpoint:   {}", p.endpoint);
    println!("  - manifests:       {}", p.manifests.display());
    println!(
        "  - apiserver:       {} --config {}",
        apiserver_binary().display(),
        p.config.display()
    );
    println!(
        "  - agents read with {}",
        p.state_dir.join("local-etcd-config.yaml").display()
    );
    if a.start {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(apiserver_binary())
            .arg("--config")
            .arg(&p.config)
            .exec();
        anyhow::bail!("cannot run {}: {err}", apiserver_binary().display());
    }
    Ok(())
}
