//! `clustermesh manifests`: the objects of a cluster's mesh install as YAML, from the same
//! typed code `clustermesh enable --context` applies (`clustermesh_k8s::objects`).
//!
//! `--out deploy/kubernetes` rewrites the checked-in kustomize tree; a test fails when the
//! checked-in files differ from what this writes.

use std::path::PathBuf;

use anyhow::Context;
use clustermesh_k8s::objects::{self, ServiceType, StorageMedium, Values};

/// `--service-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceTypeArg {
    /// Every node's port 32379 (Cilium's default).
    #[value(name = "NodePort")]
    NodePort,
    /// A cloud load balancer.
    #[value(name = "LoadBalancer")]
    LoadBalancer,
}

impl From<ServiceTypeArg> for ServiceType {
    fn from(s: ServiceTypeArg) -> Self {
        match s {
            ServiceTypeArg::NodePort => ServiceType::NodePort,
            ServiceTypeArg::LoadBalancer => ServiceType::LoadBalancer,
        }
    }
}

/// Settings shared by `manifests` and `enable --context`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Image of every container.
    #[arg(long, default_value_t = objects::default_image())]
    pub image: String,
    /// How peers reach this cluster's etcd.
    #[arg(long, value_enum)]
    pub service_type: Option<ServiceTypeArg>,
    /// nodePort of the etcd Service (NodePort only; default 32379).
    #[arg(long)]
    pub node_port: Option<i32>,
    /// etcd's data on the node's disk instead of memory.
    #[arg(long)]
    pub etcd_on_disk: bool,
    /// Export MCS-API ServiceExports (and grant reading them).
    #[arg(long)]
    pub enable_mcs_api: bool,
    /// The cluster's pod CIDRs, IPv4 and IPv6 (repeat, or a comma list): the apiserver
    /// exports nothing outside them and `connect` has peers refuse anything outside them
    /// (ConfigMap key `cluster-cidr`). Default: none (no rule); `enable --context` keeps
    /// what the cluster has.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,
}

impl InstallArgs {
    /// The objects' values for a cluster.
    pub fn values(&self, namespace: &str, name: &str, id: u32, max: u32) -> Values {
        Values {
            namespace: namespace.to_string(),
            image: self.image.clone(),
            cluster_name: name.into(),
            cluster_id: id,
            max_connected_clusters: max,
            service_type: self
                .service_type
                .map(Into::into)
                .unwrap_or(ServiceType::NodePort),
            node_port: self.node_port.unwrap_or(objects::DEFAULT_NODE_PORT),
            etcd_storage: if self.etcd_on_disk {
                StorageMedium::Disk
            } else {
                StorageMedium::Memory
            },
            enable_mcs_api: self.enable_mcs_api,
            // A CA bundle exists only once `connect --allow-mismatching-ca` wrote one.
            ca_bundle: None,
            cluster_cidrs: self.cluster_cidr.clone(),
        }
    }

    /// `--cluster-cidr`, checked (each CIDR parses, no host bits), as strings.
    pub fn cluster_cidrs(&self) -> anyhow::Result<Vec<String>> {
        let c = clustermesh_types::cluster_cidrs::ClusterCidrs::parse(&self.cluster_cidr)
            .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
        Ok(c.to_strings())
    }
}

/// Flags of `clustermesh manifests`.
#[derive(Debug, clap::Args)]
pub struct ManifestsArgs {
    /// Write the kustomize tree (base + example overlays) into DIR instead of printing one
    /// cluster's objects.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cluster_name", "cluster_id"])]
    pub out: Option<PathBuf>,
    /// Cluster name of the printed objects.
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// Cluster ID of the printed objects.
    #[arg(long, default_value_t = 0)]
    pub cluster_id: u32,
    /// 255 or 511.
    #[arg(long, default_value_t = 255)]
    pub max_connected_clusters: u32,
    /// Namespace of the install.
    #[arg(short = 'n', long, default_value = objects::DEFAULT_NAMESPACE)]
    pub namespace: String,
    #[command(flatten)]
    pub install: InstallArgs,
}

/// `clustermesh manifests`.
pub fn run(a: ManifestsArgs) -> anyhow::Result<()> {
    let Some(out) = a.out else {
        a.install.cluster_cidrs()?;
        let v = a.install.values(
            &a.namespace,
            &a.cluster_name,
            a.cluster_id,
            a.max_connected_clusters,
        );
        print!("{}", objects::to_yaml(&objects::install(&v)));
        return Ok(());
    };
    let tree = objects::deploy_tree();
    for (rel, text) in &tree {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("✅ Wrote {} files into {}", tree.len(), out.display());
    Ok(())
}
