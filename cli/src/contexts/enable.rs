//! `clustermesh enable --context C`: the cluster's name and ID (from `cilium-config`, our
//! `clustermesh-config`, or the flags), the mesh CA (the cluster's `cilium-ca`, else
//! `--ca-dir`, else a new one), certificates issued into Cilium's Secrets (kept while valid),
//! and the objects of `clustermesh_k8s::objects::cluster_install`, all applied server-side
//! (the lab runs its clusters from the same function).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clustermesh_certs::{describe, Ca, ServerSpec, DEFAULT_CA_COMMON_NAME, DEFAULT_VALIDITY_DAYS};
use clustermesh_k8s::apply;
use clustermesh_k8s::client::Target;
use clustermesh_k8s::k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use clustermesh_k8s::objects::{self, CertPems, Values};
use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};

use super::{execute, read_identity, secret_data, KubeArgs, Plan};
use crate::manifests::{InstallArgs, ServiceTypeArg};

/// What `enable --context` needs.
#[derive(Debug, Clone)]
pub struct Request {
    /// The cluster.
    pub kube: KubeArgs,
    /// Install settings.
    pub install: InstallArgs,
    /// `--cluster-name`.
    pub cluster_name: Option<String>,
    /// `--cluster-id`.
    pub cluster_id: Option<u32>,
    /// `--max-connected-clusters`.
    pub max_connected_clusters: Option<u32>,
    /// The mesh CA on this machine (`ca.crt`, `ca.key`), created if empty.
    pub ca_dir: Option<PathBuf>,
    /// Print instead of writing.
    pub dry_run: bool,
    /// `-o yaml`.
    pub yaml: bool,
}

/// The name, ID and mesh size: what the cluster already says wins; flags may only repeat it.
fn identity(
    t: &Target,
    r: &Request,
    existing: Option<super::Identity>,
) -> anyhow::Result<ClusterInfo> {
    let (name, id, max) = match existing {
        Some(e) => {
            for (flag, given, has) in [
                ("--cluster-name", r.cluster_name.clone(), e.name.clone()),
                (
                    "--cluster-id",
                    r.cluster_id.map(|i| i.to_string()),
                    e.id.to_string(),
                ),
                (
                    "--max-connected-clusters",
                    r.max_connected_clusters.map(|i| i.to_string()),
                    e.max_connected_clusters.to_string(),
                ),
            ] {
                if let Some(given) = given.filter(|g| *g != has) {
                    bail!(
                        "context {}: {} says {flag} {has}, not {given}: renaming or renumbering a cluster breaks its peers; drop the flag (or change {} yourself)",
                        t.context, e.source, e.source
                    );
                }
            }
            (e.name, e.id, e.max_connected_clusters)
        }
        None => match (&r.cluster_name, r.cluster_id) {
            (Some(n), Some(i)) => (n.clone(), i, r.max_connected_clusters.unwrap_or(255)),
            _ => bail!(
                "context {}: no cluster name and ID in ConfigMap {ns}/{} or {ns}/{}: give --cluster-name and --cluster-id",
                t.context,
                objects::CILIUM_CONFIG,
                objects::CLUSTER_CONFIG,
                ns = r.kube.namespace
            ),
        },
    };
    let info = ClusterInfo {
        name: ClusterName::new(name).context("cluster name")?,
        id,
        max_connected_clusters: MaxConnectedClusters::from_u32(max)
            .context("max-connected-clusters")?,
    };
    info.validate().context("cluster ID")?;
    Ok(info)
}

/// The mesh CA: the cluster's own `cilium-ca` (Cilium's or an earlier enable's), else the one
/// in `--ca-dir`, else a new one (saved into `--ca-dir` when given, to share with peers).
async fn ca(t: &Target, r: &Request) -> anyhow::Result<Ca> {
    let ns = &r.kube.namespace;
    let in_cluster = apply::get::<Secret>(t, Some(ns), objects::CA_SECRET)
        .await?
        .map(|s| secret_data(&s));
    let local = match &r.ca_dir {
        Some(d) if d.join("ca.key").exists() => {
            Some(Ca::load(d).with_context(|| format!("loading the CA from {}", d.display()))?)
        }
        _ => None,
    };
    if let Some(data) = in_cluster {
        if let (Some(c), Some(k)) = (data.get("ca.crt"), data.get("ca.key")) {
            let ca = Ca::from_pem(c, k).with_context(|| {
                format!(
                    "context {}: Secret {ns}/{} does not hold a usable CA",
                    t.context,
                    objects::CA_SECRET
                )
            })?;
            if let Some(l) = &local {
                if l.subject_key_id() != ca.subject_key_id() {
                    bail!(
                        "context {}: Secret {ns}/{} holds another CA than {}: peers must share one CA (use the cluster's: `clustermesh certs import-ca`), or connect with --allow-mismatching-ca",
                        t.context,
                        objects::CA_SECRET,
                        r.ca_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default()
                    );
                }
            }
            return Ok(ca);
        }
    }
    if let Some(l) = local {
        return Ok(l);
    }
    let ca = Ca::generate(DEFAULT_CA_COMMON_NAME)?;
    match &r.ca_dir {
        Some(d) if !r.dry_run => {
            ca.write(d)?;
            eprintln!(
                "🔑 Created a new CA in {} — enable the other clusters with the same --ca-dir",
                d.display()
            );
        }
        _ => eprintln!(
            "🔑 A new CA for this cluster only: give --ca-dir DIR to share it with the other clusters"
        ),
    }
    Ok(ca)
}

/// An existing leaf Secret that is still good: signed by `ca`, the expected CN, not expired.
fn reusable(s: Option<Secret>, ca: &Ca, cn: &str) -> Option<(String, String)> {
    let d = secret_data(&s?);
    let (crt, key, ca_crt) = (d.get("tls.crt")?, d.get("tls.key")?, d.get("ca.crt")?);
    if ca_crt.trim() != ca.cert_pem().trim() {
        return None;
    }
    let info = describe(crt).ok()?;
    let fresh =
        info.is_valid_at(std::time::SystemTime::now() + std::time::Duration::from_secs(30 * 86400));
    (info.common_name == cn && info.issuer == ca.subject() && fresh)
        .then(|| (crt.clone(), key.clone()))
}

async fn certificates(t: &Target, ns: &str, ca: &Ca, name: &str) -> anyhow::Result<CertPems> {
    let leaf = |secret: &'static str, cn: String| async move {
        let existing = apply::get::<Secret>(t, Some(ns), secret).await?;
        if let Some(p) = reusable(existing, ca, &cn) {
            return Ok::<_, anyhow::Error>(p);
        }
        let l = if secret == objects::SERVER_CERT {
            ca.issue_server(&ServerSpec {
                namespace: ns.to_string(),
                ..Default::default()
            })?
        } else {
            ca.issue_client(&cn, DEFAULT_VALIDITY_DAYS)?
        };
        Ok((l.cert_pem, l.key_pem))
    };
    Ok(CertPems {
        ca_cert: ca.cert_pem().to_string(),
        ca_key: ca.key_pem().to_string(),
        server: leaf(
            objects::SERVER_CERT,
            clustermesh_certs::SERVER_NAME.to_string(),
        )
        .await?,
        admin: leaf(objects::ADMIN_CERT, format!("admin-{name}")).await?,
        local: leaf(objects::LOCAL_CERT, format!("local-{name}")).await?,
        remote: leaf(objects::REMOTE_CERT, format!("remote-{name}")).await?,
    })
}

/// `clustermesh enable --context C`.
pub async fn run(r: Request) -> anyhow::Result<()> {
    let t = super::target(&r.kube.kubeconfig, r.kube.context.as_deref()).await?;
    let ns = r.kube.namespace.clone();
    let existing = read_identity(&t, &ns).await?;
    let mut cluster_cidrs = r.install.cluster_cidrs()?;
    if cluster_cidrs.is_empty() {
        // Kept unless the flag is given (a re-run must not drop the rule).
        cluster_cidrs = existing
            .as_ref()
            .map(|e| e.cluster_cidrs.clone())
            .unwrap_or_default();
    }
    let info = identity(&t, &r, existing)?;
    let name = info.name.to_string();
    let ca = ca(&t, &r).await?;
    let pems = certificates(&t, &ns, &ca, &name).await?;
    // What the cluster runs stays unless a flag changes it (as Helm's reuse-values).
    let mut install = r.install.clone();
    if let Some(svc) = apply::get::<Service>(&t, Some(&ns), objects::APISERVER).await? {
        let spec = svc.spec.unwrap_or_default();
        if install.service_type.is_none() {
            install.service_type = match spec.type_.as_deref() {
                Some("LoadBalancer") => Some(ServiceTypeArg::LoadBalancer),
                _ => Some(ServiceTypeArg::NodePort),
            };
        }
        if install.node_port.is_none() {
            install.node_port = spec
                .ports
                .unwrap_or_default()
                .first()
                .and_then(|p| p.node_port);
        }
    }
    let mut values: Values =
        install.values(&ns, &name, info.id, info.max_connected_clusters.as_u32());
    // The CA bundle `connect --allow-mismatching-ca` wrote stays, and with it the Deployment
    // that mounts it.
    values.cluster_cidrs = cluster_cidrs;
    values.ca_bundle = apply::get::<ConfigMap>(&t, Some(&ns), objects::CA_BUNDLE)
        .await?
        .and_then(|c| c.data?.get("ca.crt").cloned());
    let applies = objects::cluster_install(&values, &pems);
    let plan = Plan {
        target: t.clone(),
        applies,
        deletes: Vec::new(),
    };
    if !r.dry_run {
        println!(
            "✨ Enabling cluster {name} (ID {}) in context {} ({})…",
            info.id, t.context, t.server
        );
    }
    let n = execute(std::slice::from_ref(&plan), r.dry_run, r.yaml).await?;
    if r.dry_run {
        return Ok(());
    }
    if n == 0 {
        println!(
            "✅ Cluster {name} is already enabled in context {}: 0 changes",
            t.context
        );
    } else {
        println!(
            "✅ Cluster {name} (ID {}) is enabled in context {}: {n} changes",
            info.id, t.context
        );
    }
    if values.service_type == objects::ServiceType::NodePort {
        println!(
            "⚠️  Service {} is a NodePort ({}): peers reach it on a node's address; a LoadBalancer (--service-type LoadBalancer) is more robust",
            objects::APISERVER,
            values.node_port
        );
    }
    Ok(())
}
