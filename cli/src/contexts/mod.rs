//! `enable`, `connect`, `disconnect` and `status` on Kubernetes clusters named by kubeconfig
//! contexts (kube-rs, server-side apply with field manager `clustermesh`), as cilium-cli does
//! them — the state-directory forms stay for the lab.
//!
//! Every write goes twice: first as the API server's dry run of everything (so a user whose
//! RBAC cannot write Secrets learns it before anything changed), then for real; each object
//! is reported as created, configured or deleted, and a command that changes nothing says
//! "0 changes". `--dry-run -o yaml` prints every object the command would send (and names
//! the objects it would delete) without writing.
//!
//! It must not talk to etcd: everything goes through the Kubernetes API (the apiserver creates
//! the etcd users listed in `clustermesh-remote-users` itself).

pub mod connect;
pub mod enable;
pub mod status;

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clustermesh_k8s::apply::{self, Change, Ref};
use clustermesh_k8s::client::{ClientConfig, Target};
use clustermesh_k8s::k8s_openapi::api::core::v1::{ConfigMap, Secret};
use clustermesh_k8s::objects::{self, Object};

/// Which cluster: a kubeconfig context.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// kubeconfig context of the cluster (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the mesh's objects.
    #[arg(short = 'n', long, default_value = objects::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

/// `-o`: what to print.
pub fn yaml_output(output: &Option<String>, dry_run: bool) -> anyhow::Result<bool> {
    match output.as_deref() {
        None => Ok(false),
        Some("yaml") if dry_run => Ok(true),
        Some("yaml") => bail!("-o yaml prints what would be sent: use it with --dry-run"),
        Some(o) => bail!("unknown output {o:?}: use -o yaml (with --dry-run)"),
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A client for `context` of `kubeconfig`.
pub async fn target(kubeconfig: &Option<PathBuf>, context: Option<&str>) -> anyhow::Result<Target> {
    Ok(
        ClientConfig::kubeconfig(kubeconfig.clone(), context.map(String::from))
            .target()
            .await?,
    )
}

/// A cluster's name, ID and max-connected-clusters, and where they were read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// The cluster's pod CIDRs: `cluster-cidr` of `clustermesh-config`, else Cilium's
    /// `cluster-pool-ipv4-cidr`/`cluster-pool-ipv6-cidr` of `cilium-config`; empty: unknown
    /// (peers then apply no CIDR rule to it).
    pub cluster_cidrs: Vec<String>,
    /// `ConfigMap ns/name`.
    pub source: String,
}

fn data_key(cm: &ConfigMap, k: &str) -> Option<String> {
    cm.data.as_ref()?.get(k).cloned()
}

/// The cluster's identity: Cilium's `cilium-config` wins when it names one (as cilium-cli
/// reads it), else our `clustermesh-config`; `None` if neither has a name.
pub async fn read_identity(t: &Target, ns: &str) -> anyhow::Result<Option<Identity>> {
    for name in [objects::CILIUM_CONFIG, objects::CLUSTER_CONFIG] {
        let Some(cm) = apply::get::<ConfigMap>(t, Some(ns), name).await? else {
            continue;
        };
        let Some(cluster) = data_key(&cm, "cluster-name") else {
            continue;
        };
        let source = format!("ConfigMap {ns}/{name}");
        let num = |k: &str, default: u32| -> anyhow::Result<u32> {
            match data_key(&cm, k) {
                None => Ok(default),
                Some(v) => v.trim().parse().with_context(|| {
                    format!(
                        "context {}: {source} has {k} {v:?}, not a number",
                        t.context
                    )
                }),
            }
        };
        return Ok(Some(Identity {
            name: cluster,
            id: num("cluster-id", 0)?,
            max_connected_clusters: num("max-connected-clusters", 255)?,
            cluster_cidrs: read_cluster_cidrs(t, ns).await?,
            source,
        }));
    }
    Ok(None)
}

/// The cluster's pod CIDRs (see [`Identity::cluster_cidrs`]), checked: a CIDR that does not
/// parse is an error naming the ConfigMap and key, not a silently missing rule.
async fn read_cluster_cidrs(t: &Target, ns: &str) -> anyhow::Result<Vec<String>> {
    use clustermesh_types::cluster_cidrs::ClusterCidrs;
    let keys: [(&str, &[&str]); 2] = [
        (objects::CLUSTER_CONFIG, &["cluster-cidr"]),
        // Cilium's cluster-pool IPAM lists (space-separated).
        (
            objects::CILIUM_CONFIG,
            &["cluster-pool-ipv4-cidr", "cluster-pool-ipv6-cidr"],
        ),
    ];
    for (name, keys) in keys {
        let Some(cm) = apply::get::<ConfigMap>(t, Some(ns), name).await? else {
            continue;
        };
        let mut items = Vec::new();
        for k in keys {
            if let Some(v) = data_key(&cm, k) {
                let list = v.replace(' ', ",");
                ClusterCidrs::parse([list.as_str()]).with_context(|| {
                    format!(
                        "context {}: ConfigMap {ns}/{name} has {k} {v:?}, not a list of CIDRs",
                        t.context
                    )
                })?;
                items.push(list);
            }
        }
        let cidrs = ClusterCidrs::parse(&items)?;
        if !cidrs.is_empty() {
            return Ok(cidrs.to_strings());
        }
    }
    Ok(Vec::new())
}

/// The string data of a Secret (keys whose values are not UTF-8 are skipped).
pub fn secret_data(s: &Secret) -> std::collections::BTreeMap<String, String> {
    s.data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect()
}

/// The writes of one command in one cluster.
#[derive(Debug)]
pub struct Plan {
    /// The cluster.
    pub target: Target,
    /// Objects to apply, in order.
    pub applies: Vec<Object>,
    /// Objects to delete.
    pub deletes: Vec<Ref>,
}

/// Runs the plans: a server-side dry run of every write first (RBAC and validation of
/// everything before anything changes), then the writes; prints each change and returns how
/// many there were. With `dry_run` nothing is written: `yaml` prints every object instead.
pub async fn execute(plans: &[Plan], dry_run: bool, yaml: bool) -> anyhow::Result<usize> {
    if dry_run {
        for p in plans {
            if yaml {
                println!("# context {}", p.target.context);
                print!("{}", objects::to_yaml(&p.applies));
                for d in &p.deletes {
                    println!("# delete {} (context {})", d.describe(), p.target.context);
                }
            } else {
                for o in &p.applies {
                    eprintln!(
                        "ℹ️  would apply {} in context {}",
                        o.describe(),
                        p.target.context
                    );
                }
                for d in &p.deletes {
                    eprintln!(
                        "ℹ️  would delete {} in context {}",
                        d.describe(),
                        p.target.context
                    );
                }
            }
        }
        return Ok(0);
    }
    for p in plans {
        for o in &p.applies {
            apply::apply_with(&p.target, o, true).await?;
        }
        for d in &p.deletes {
            apply::delete_with(&p.target, d, true).await?;
        }
    }
    let mut done: Vec<String> = Vec::new();
    let half = |done: &Vec<String>, e: anyhow::Error| -> anyhow::Error {
        if done.is_empty() {
            e
        } else {
            e.context(format!(
                "{} change(s) were made before this failure and were not rolled back ({}); fix the cause and run the command again",
                done.len(),
                done.join(", ")
            ))
        }
    };
    for p in plans {
        for o in &p.applies {
            match apply::apply(&p.target, o).await {
                Ok(c) => note(&p.target, &o.describe(), c, &mut done),
                Err(e) => return Err(half(&done, e.into())),
            }
        }
        for d in &p.deletes {
            match apply::delete(&p.target, d).await {
                Ok(c) => note(&p.target, &d.describe(), c, &mut done),
                Err(e) => return Err(half(&done, e.into())),
            }
        }
    }
    Ok(done.len())
}

fn note(t: &Target, what: &str, c: Change, done: &mut Vec<String>) {
    if c.changed() {
        println!("  ✏️  {what} {} (context {})", c.as_str(), t.context);
        done.push(format!("{what} {}", c.as_str()));
    }
}
