//! `clustermesh connect|disconnect --context A --destination-context B`: Cilium's access
//! information of both sides (name, ID, max-connected-clusters, CA, the etcd Service's
//! address), Cilium's checks, then in each cluster: the peer's entry in `cilium-kvstoremesh`
//! (how KVStoreMesh reads it: `https://<peer>.mesh.cilium.io:<port>` with a host alias to
//! the address) and in `cilium-clustermesh` (the agents read it from the KVStoreMesh cache),
//! and `remote-<peer>` in `clustermesh-remote-users`, which the apiserver turns into an etcd
//! user (Cilium's mechanism). `disconnect` removes exactly those entries, and deletes an
//! object that is left empty.
//!
//! With `--allow-mismatching-ca` (clusters of different CAs) it does what Cilium's does with
//! `tls.caBundle`: each KVStoreMesh verifies the peer with both CAs (`<peer>.etcd-client-ca.crt`
//! in `cilium-kvstoremesh`), and each etcd trusts the peer's CA for client certificates: the
//! CAs of every such peer, with the cluster's own, go into the `cilium-root-ca.crt` ConfigMap
//! that the apiserver Deployment then mounts as etcd's `ca.crt`; the Deployment is re-applied
//! (its other settings read from the cluster) with the bundle's checksum in its pod template,
//! which restarts the pod, as etcd reads its CAs at start. `disconnect` recomputes the bundle
//! from the peers left, and removes it (and restores the Deployment) when none needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{bail, Context as _};
use clustermesh_k8s::apply::{self, Ref};
use clustermesh_k8s::client::Target;
use clustermesh_k8s::k8s_openapi::api::apps::v1::Deployment;
use clustermesh_k8s::k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use clustermesh_k8s::kube::api::{Api, ListParams};
use clustermesh_k8s::objects::{self, Object, PeerAddress, Values};
use serde::Deserialize;

use super::{execute, read_identity, secret_data, Identity, KubeArgs, Plan};
use crate::remotes::{check_pair, pem_blocks, PairSide};

/// What `connect`/`disconnect --context` needs.
#[derive(Debug, Clone)]
pub struct Request {
    /// The local cluster (`--context`, `--kubeconfig`, `-n`).
    pub kube: KubeArgs,
    /// `--destination-context`.
    pub destination_context: String,
    /// `--source-endpoint`: the local etcd's address as the peer should use it.
    pub source_endpoint: Option<SocketAddr>,
    /// `--destination-endpoint`: the peer etcd's address.
    pub destination_endpoint: Option<SocketAddr>,
    /// `--allow-mismatching-ca`.
    pub allow_mismatching_ca: bool,
    /// Print instead of writing.
    pub dry_run: bool,
    /// `-o yaml`.
    pub yaml: bool,
}

/// One cluster as `connect` sees it.
#[derive(Debug)]
struct Side {
    t: Target,
    ns: String,
    id: Identity,
    ca_pem: String,
    kvstoremesh: BTreeMap<String, String>,
    agents: BTreeMap<String, String>,
    users: BTreeSet<String>,
    kvstoremesh_exists: bool,
    agents_exists: bool,
    users_exists: bool,
    /// The `cilium-root-ca.crt` bundle's `ca.crt`, if the cluster has one.
    ca_bundle: Option<String>,
    /// The live apiserver Deployment (its image and settings, kept when it is re-applied).
    deployment: Option<Deployment>,
}

#[derive(Debug, Deserialize)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
struct UserEntry {
    name: String,
}

async fn read_side(t: Target, ns: &str) -> anyhow::Result<Side> {
    let ctx = t.context.clone();
    let id = read_identity(&t, ns).await?.with_context(|| {
        format!("context {ctx}: the cluster is not enabled (no ConfigMap {ns}/{}): run `clustermesh enable --context {ctx}` first", objects::CLUSTER_CONFIG)
    })?;
    let ca = apply::get::<Secret>(&t, Some(ns), objects::CA_SECRET)
        .await?
        .map(|s| secret_data(&s))
        .and_then(|d| d.get("ca.crt").cloned())
        .with_context(|| {
            format!("context {ctx}: no CA in Secret {ns}/{}: run `clustermesh enable --context {ctx}` first", objects::CA_SECRET)
        })?;
    let kvs = apply::get::<Secret>(&t, Some(ns), objects::KVSTOREMESH_SECRET).await?;
    let agents = apply::get::<Secret>(&t, Some(ns), objects::AGENT_REMOTES_SECRET).await?;
    let users_cm = apply::get::<ConfigMap>(&t, Some(ns), objects::REMOTE_USERS).await?;
    let mut users = BTreeSet::new();
    if let Some(text) = users_cm
        .as_ref()
        .and_then(|c| c.data.as_ref()?.get("users.yaml").cloned())
    {
        let f: UsersFile = serde_yaml::from_str(&text).with_context(|| {
            format!(
                "context {ctx}: ConfigMap {ns}/{} has no valid users.yaml",
                objects::REMOTE_USERS
            )
        })?;
        users.extend(
            f.users
                .into_iter()
                .filter_map(|u| u.name.strip_prefix("remote-").map(String::from)),
        );
    }
    let ca_bundle = apply::get::<ConfigMap>(&t, Some(ns), objects::CA_BUNDLE)
        .await?
        .and_then(|c| c.data?.get("ca.crt").cloned());
    let deployment = apply::get::<Deployment>(&t, Some(ns), objects::APISERVER).await?;
    Ok(Side {
        ca_bundle,
        deployment,
        ns: ns.to_string(),
        id,
        ca_pem: ca,
        kvstoremesh_exists: kvs.is_some(),
        kvstoremesh: kvs.map(|s| secret_data(&s)).unwrap_or_default(),
        agents_exists: agents.is_some(),
        agents: agents.map(|s| secret_data(&s)).unwrap_or_default(),
        users_exists: users_cm.is_some(),
        users,
        t,
    })
}

/// Where peers reach this cluster's etcd (Cilium's rules): the override, a LoadBalancer's
/// ingress IPs, or a node's ExternalIP (else InternalIP) with the nodePort.
/// With the cluster's CIDRs (its ConfigMap's `cluster-cidr`), which the peer's config files
/// carry.
async fn address(s: &Side, endpoint: Option<SocketAddr>) -> anyhow::Result<PeerAddress> {
    let mut a = access_address(&s.t, &s.ns, &s.id.name, endpoint, true).await?;
    a.cluster_cidrs = s.id.cluster_cidrs.clone();
    Ok(a)
}

/// Where peers reach the etcd of cluster `name` (Cilium's rules): `endpoint` if given, a
/// LoadBalancer's ingress IPs, or the first node's ExternalIP (else InternalIP) with the
/// nodePort (with a warning when `warn`).
pub async fn access_address(
    t: &Target,
    ns: &str,
    name: &str,
    endpoint: Option<SocketAddr>,
    warn: bool,
) -> anyhow::Result<PeerAddress> {
    let name = name.to_string();
    if let Some(e) = endpoint {
        return Ok(PeerAddress {
            name,
            ips: vec![e.ip().to_string()],
            port: i32::from(e.port()),
            cluster_cidrs: Vec::new(),
        });
    }
    let ctx = &t.context;
    let svc = apply::get::<Service>(t, Some(ns), objects::APISERVER)
        .await?
        .with_context(|| {
            format!(
                "context {ctx}: no Service {}/{}: run `clustermesh enable --context {ctx}` first",
                ns,
                objects::APISERVER
            )
        })?;
    let spec = svc.spec.unwrap_or_default();
    let port = spec.ports.unwrap_or_default().into_iter().next();
    match spec.type_.as_deref() {
        Some("LoadBalancer") => {
            let ingress = svc
                .status
                .and_then(|st| st.load_balancer)
                .and_then(|lb| lb.ingress)
                .unwrap_or_default();
            let ips: Vec<String> = ingress.iter().filter_map(|i| i.ip.clone()).collect();
            if ips.is_empty() {
                bail!(
                    "context {ctx}: Service {}/{} (LoadBalancer) has no ingress IP yet: wait for the load balancer, or give its address with --destination-endpoint/--source-endpoint IP:PORT",
                    ns,
                    objects::APISERVER
                );
            }
            Ok(PeerAddress {
                name,
                ips,
                port: port.map(|p| p.port).unwrap_or(objects::ETCD_PORT),
                cluster_cidrs: Vec::new(),
            })
        }
        Some("NodePort") => {
            let node_port = port.and_then(|p| p.node_port).with_context(|| {
                format!("context {ctx}: Service {}/{} has no nodePort yet", ns, objects::APISERVER)
            })?;
            let nodes = Api::<Node>::all(t.client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| apply::explain(t, "list", &Ref::of::<Node>(None, "*"), e))?;
            let mut nodes = nodes.items;
            nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            let addr = |n: &Node, ty: &str| {
                n.status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .find(|a| a.type_ == ty)
                    .map(|a| a.address.clone())
            };
            let ip = nodes
                .iter()
                .find_map(|n| addr(n, "ExternalIP"))
                .or_else(|| nodes.iter().find_map(|n| addr(n, "InternalIP")))
                .with_context(|| {
                    format!("context {ctx}: no node has an ExternalIP or InternalIP to reach the NodePort on: give the address with --destination-endpoint/--source-endpoint IP:PORT")
                })?;
            if warn {
                eprintln!(
                "⚠️  Cluster {name} is reached on node address {ip}:{node_port} (NodePort): if that node goes away, so does the connection; a LoadBalancer is more robust"
            );
            }
            Ok(PeerAddress {
                name,
                ips: vec![ip],
                port: node_port,
                cluster_cidrs: Vec::new(),
            })
        }
        other => bail!(
            "context {ctx}: Service {}/{} is of type {}, which other clusters cannot reach: enable with --service-type NodePort or LoadBalancer, or give --destination-endpoint/--source-endpoint IP:PORT",
            ns,
            objects::APISERVER,
            other.unwrap_or("ClusterIP")
        ),
    }
}

/// The cluster's Values as its live objects say (image, MCS-API, etcd storage of the
/// Deployment; its CA bundle), so a re-applied Deployment changes nothing else.
fn values(s: &Side) -> Values {
    let mut v = Values {
        namespace: s.ns.clone(),
        cluster_name: s.id.name.clone(),
        cluster_id: s.id.id,
        max_connected_clusters: s.id.max_connected_clusters,
        ca_bundle: s.ca_bundle.clone(),
        cluster_cidrs: s.id.cluster_cidrs.clone(),
        ..Values::default()
    };
    let pod = s
        .deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|d| d.template.spec.as_ref());
    if let Some(pod) = pod {
        if let Some(c) = pod.containers.iter().find(|c| c.name == "apiserver") {
            if let Some(image) = &c.image {
                v.image = image.clone();
            }
            v.enable_mcs_api = c
                .args
                .iter()
                .flatten()
                .any(|a| a == "--clustermesh-enable-mcs-api");
        }
        if let Some(vol) = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "etcd-data-dir")
        {
            let memory = vol.empty_dir.as_ref().and_then(|e| e.medium.as_deref()) == Some("Memory");
            v.etcd_storage = if memory {
                objects::StorageMedium::Memory
            } else {
                objects::StorageMedium::Disk
            };
        }
    }
    v
}

/// The CAs `s`'s etcd must trust when its KVStoreMesh reads peers of other CAs: its own and
/// those of the `<peer>.etcd-client-ca.crt` bundles in `kvs`; `None` if that is only its own.
fn server_bundle(s: &Side, kvs: &BTreeMap<String, String>) -> Option<String> {
    let own = pem_blocks(&s.ca_pem);
    let mut all = own.clone();
    for (k, v) in kvs {
        if k.ends_with(".etcd-client-ca.crt") {
            for b in pem_blocks(v) {
                if !all.contains(&b) {
                    all.push(b);
                }
            }
        }
    }
    (all.len() > own.len()).then(|| all.concat())
}

/// The writes that make `s`'s remote-config objects say `kvs`, `agents`, `users`; an object
/// left empty is deleted (if it exists).
fn plan_for(
    s: &Side,
    kvs: BTreeMap<String, String>,
    agents: BTreeMap<String, String>,
    users: BTreeSet<String>,
) -> Plan {
    let mut v = values(s);
    let mut applies = Vec::new();
    let mut deletes = Vec::new();
    let bundle = server_bundle(s, &kvs);
    for (name, data, exists) in [
        (objects::KVSTOREMESH_SECRET, kvs, s.kvstoremesh_exists),
        (objects::AGENT_REMOTES_SECRET, agents, s.agents_exists),
    ] {
        if !data.is_empty() {
            applies.push(Object::new(&objects::remote_config_secret(&v, name, &data)));
        } else if exists {
            deletes.push(Ref::of::<Secret>(Some(&s.ns), name));
        }
    }
    if !users.is_empty() {
        let peers: Vec<String> = users.into_iter().collect();
        applies.push(Object::new(&objects::remote_users(&v, &peers)));
    } else if s.users_exists {
        deletes.push(Ref::of::<ConfigMap>(Some(&s.ns), objects::REMOTE_USERS));
    }
    // The etcd's trusted CAs: the bundle before the Deployment that mounts it; without one,
    // the Deployment back on the server Secret's CA first, then the bundle deleted.
    if bundle.is_some() || s.ca_bundle.is_some() {
        v.ca_bundle = bundle;
        if let Some(cm) = objects::ca_bundle(&v) {
            applies.push(Object::new(&cm));
        } else {
            deletes.push(Ref::of::<ConfigMap>(Some(&s.ns), objects::CA_BUNDLE));
        }
        applies.push(objects::apiserver_deployment(&v));
    }
    Plan {
        target: s.t.clone(),
        applies,
        deletes,
    }
}

async fn both(r: &Request) -> anyhow::Result<(Side, Side)> {
    let a = super::target(&r.kube.kubeconfig, r.kube.context.as_deref()).await?;
    let b = super::target(&r.kube.kubeconfig, Some(&r.destination_context)).await?;
    if a.context == b.context {
        bail!(
            "--context and --destination-context are both {}: name two different clusters",
            a.context
        );
    }
    let sa = read_side(a, &r.kube.namespace).await?;
    let sb = read_side(b, &r.kube.namespace).await?;
    Ok((sa, sb))
}

/// `clustermesh connect --context A --destination-context B`.
pub async fn connect(r: Request) -> anyhow::Result<()> {
    let (a, b) = both(&r).await?;
    for s in [&a, &b] {
        eprintln!(
            "✨ Extracting access information of cluster {} (context {})...",
            s.id.name, s.t.context
        );
    }
    fn side(s: &Side) -> PairSide<'_> {
        PairSide {
            name: &s.id.name,
            id: s.id.id,
            max_connected_clusters: s.id.max_connected_clusters,
            ca_pem: &s.ca_pem,
            origin: format!("context {}", s.t.context),
        }
    }
    let mismatched = check_pair(&side(&a), &side(&b), r.allow_mismatching_ca)?;
    let addr_a = address(&a, r.source_endpoint).await?;
    let addr_b = address(&b, r.destination_endpoint).await?;
    for (s, peer) in [(&a, &addr_a), (&b, &addr_b)] {
        eprintln!(
            "🔑 Cluster {} (ID {}): {}:{}",
            s.id.name,
            s.id.id,
            peer.ips.join(","),
            peer.port
        );
    }
    let mut plans = Vec::new();
    for (reader, other, peer) in [(&a, &b, &addr_b), (&b, &a, &addr_a)] {
        // Another CA: the reader verifies the peer with both (as the state-dir form does).
        let client_bundle = mismatched.then(|| {
            let mut blocks = pem_blocks(&reader.ca_pem);
            blocks.extend(pem_blocks(&other.ca_pem));
            blocks.concat()
        });
        let entries = objects::kvstoremesh_entries(peer, client_bundle.as_deref());
        if let Some(old) = reader.kvstoremesh.get(&peer.name) {
            if Some(old) != entries.get(&peer.name) {
                bail!(
                    "context {}: cluster {} is already connected to a cluster named {} with another address or CA; disconnect it first (`clustermesh disconnect`)",
                    reader.t.context,
                    reader.id.name,
                    peer.name
                );
            }
        }
        let mut kvs = reader.kvstoremesh.clone();
        kvs.extend(entries);
        let mut agents = reader.agents.clone();
        agents.insert(
            peer.name.clone(),
            objects::agent_remote_config(&values(reader), &peer.cluster_cidrs),
        );
        let mut users = reader.users.clone();
        users.insert(peer.name.clone());
        plans.push(plan_for(reader, kvs, agents, users));
    }
    let n = execute(&plans, r.dry_run, r.yaml).await?;
    if r.dry_run {
        return Ok(());
    }
    if mismatched && n > 0 {
        println!(
            "⚠️  Clusters {} and {} use different CAs: each etcd now trusts both (ConfigMap {}; its clustermesh-apiserver pod restarts for it)",
            a.id.name,
            b.id.name,
            objects::CA_BUNDLE
        );
    }
    if n == 0 {
        println!(
            "✅ Clusters {} and {} are already connected: 0 changes",
            a.id.name, b.id.name
        );
    } else {
        println!(
            "✅ Connected cluster {} <=> {}! ({n} changes)",
            a.id.name, b.id.name
        );
    }
    Ok(())
}

/// `clustermesh disconnect --context A --destination-context B`.
pub async fn disconnect(r: Request) -> anyhow::Result<()> {
    let (a, b) = both(&r).await?;
    let mut plans = Vec::new();
    for (reader, peer) in [(&a, &b), (&b, &a)] {
        let p = &peer.id.name;
        let mut kvs = reader.kvstoremesh.clone();
        kvs.remove(p);
        kvs.remove(&format!("{p}.etcd-client-ca.crt"));
        let mut agents = reader.agents.clone();
        agents.remove(p);
        let mut users = reader.users.clone();
        users.remove(p);
        plans.push(plan_for(reader, kvs, agents, users));
    }
    let n = execute(&plans, r.dry_run, r.yaml).await?;
    if r.dry_run {
        return Ok(());
    }
    if n == 0 {
        println!(
            "✅ Clusters {} and {} are not connected: 0 changes",
            a.id.name, b.id.name
        );
    } else {
        println!(
            "✅ Disconnected clusters {} <x> {}! ({n} changes)",
            a.id.name, b.id.name
        );
    }
    Ok(())
}
