//! What the page shows about the mesh besides flows: each cluster with its apiserver, its
//! connection to every remote (ready / syncing / failing, with the hint `clustermesh status`
//! gives: the same code), its nodes with their agent's health and observer stream, and the
//! workloads and services read from each cluster's etcd (over mTLS, as the read-only
//! `remote` user) for the service map.
//!
//! Everything here polls: the apiservers' and agents' health endpoints every
//! [`HEALTH_EVERY`], etcd every [`INVENTORY_EVERY`]. A part that does not answer is shown as
//! such, with the error; the last good inventory of a cluster is kept while its etcd is
//! unreachable.
//!
//! It must not write anywhere: the UI only looks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clustermesh_syncer::{list::list_prefix, EtcdConfig};
use clustermesh_types::identity::LabelArray;
use clustermesh_types::kvstore;
use clustermesh_types::model::{ClusterService, IpIdentityPair};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::graph::Inventory;
use super::hub::{Feed, Hub, Msg};
use crate::http;
use crate::lab::state::LabState;
use crate::remotes::{status_json, Access};

/// How often health endpoints are read.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// How often each etcd is listed for workloads and services.
pub const INVENTORY_EVERY: Duration = Duration::from_secs(5);
/// How long one health request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// A remote cluster as one cluster sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Remote {
    /// Remote cluster name.
    pub name: String,
    /// `ready`, `syncing` (connected, not yet synced) or `failing`.
    pub state: &'static str,
    /// What to do about it (`clustermesh status`'s hint); empty when ready.
    pub hint: String,
    /// Counts the apiserver reports (null when unknown).
    pub nodes: Value,
    /// See `nodes`.
    pub endpoints: Value,
    /// See `nodes`.
    pub identities: Value,
    /// See `nodes`.
    pub services: Value,
    /// See `nodes`.
    pub failures: Value,
}

/// A node agent's health.
#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    /// `ready`, `not-ready`, `not-answering` or `none` (no agent in this lab).
    pub state: &'static str,
    /// Its `/readyz` answer or the error.
    pub detail: String,
    /// Health address.
    pub health: String,
}

/// One cluster's health, from its apiserver's `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterHealth {
    /// apiserver answered `/status`.
    pub reachable: bool,
    /// apiserver ready.
    pub ready: bool,
    /// Health address.
    pub health: String,
    /// Each configured remote.
    pub remotes: Vec<Remote>,
    /// Why the state dir could not be read, if so.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// What the last polls found, keyed by cluster (and `cluster/node` for agents).
#[derive(Debug, Default)]
pub struct Health {
    clusters: BTreeMap<String, ClusterHealth>,
    agents: BTreeMap<String, Agent>,
    /// etcd read errors per cluster (the inventory keeps the last good read).
    etcd: BTreeMap<String, String>,
}

/// Shared between the poll tasks and the composer.
pub type SharedHealth = Arc<Mutex<Health>>;

/// Classifies one entry of `status -o json`'s `clusters`, with its hint.
pub fn remote(name: &str, entry: &Value, hint: Option<&str>) -> Remote {
    let state = if entry["ready"].as_bool() == Some(true) {
        "ready"
    } else if entry["connected"].as_bool() == Some(true) {
        "syncing"
    } else {
        "failing"
    };
    Remote {
        name: name.to_owned(),
        state,
        hint: hint.unwrap_or_default().to_owned(),
        nodes: entry["num-nodes"].clone(),
        endpoints: entry["num-endpoints"].clone(),
        identities: entry["num-identities"].clone(),
        services: entry["num-shared-services"].clone(),
        failures: entry["num-failures"].clone(),
    }
}

/// Reads one cluster's status the way `clustermesh status -o json` does (blocking).
fn cluster_health(state_dir: &Path) -> ClusterHealth {
    let access = match Access::load(state_dir) {
        Ok(a) => a,
        Err(e) => {
            return ClusterHealth {
                error: format!("{e:#}"),
                ..Default::default()
            }
        }
    };
    let v = status_json(&access);
    let remotes = v["clusters"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, entry)| remote(name, entry, v["errors"][name].as_str()))
                .collect()
        })
        .unwrap_or_default();
    ClusterHealth {
        reachable: v["apiserver"]["reachable"].as_bool() == Some(true),
        ready: v["apiserver"]["ready"].as_bool() == Some(true),
        health: access.health_addr.to_string(),
        remotes,
        error: String::new(),
    }
}

/// Reads an agent's `/readyz` (blocking); `log` is where to look when it fails.
fn agent_health(addr: std::net::SocketAddr, log: &Path) -> Agent {
    let (state, detail) = match http::get(addr, "/readyz", HTTP_TIMEOUT) {
        Ok((200, body)) => ("ready", body.trim().to_owned()),
        Ok((code, body)) => (
            "not-ready",
            format!("HTTP {code}: {} (its log: {})", body.trim(), log.display()),
        ),
        Err(e) => (
            "not-answering",
            format!(
                "http://{addr}/readyz: {e}; is the agent running? Its log: {}",
                log.display()
            ),
        ),
    };
    Agent {
        state,
        detail,
        health: addr.to_string(),
    }
}

/// Polls every apiserver and agent every [`HEALTH_EVERY`] until cancelled.
pub async fn poll_health(lab: Arc<LabState>, health: SharedHealth, token: CancellationToken) {
    loop {
        let mut jobs = tokio::task::JoinSet::new();
        for c in &lab.clusters {
            let (name, dir) = (c.name.clone(), c.state_dir.clone());
            let h = health.clone();
            jobs.spawn_blocking(move || {
                let ch = cluster_health(&dir);
                h.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clusters
                    .insert(name, ch);
            });
            for n in &c.nodes {
                let Some(agent) = &n.agent else { continue };
                let (key, addr) = (format!("{}/{}", c.name, n.name), agent.health_addr);
                let (h, log) = (health.clone(), agent.log.clone());
                jobs.spawn_blocking(move || {
                    let a = agent_health(addr, &log);
                    h.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .agents
                        .insert(key, a);
                });
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = async { while jobs.join_next().await.is_some() {} } => {}
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
}

/// One cluster's identities, pod addresses and services, read from its etcd.
#[allow(clippy::type_complexity)]
async fn read_cluster(
    client: &clustermesh_syncer::Client,
    cluster: &str,
) -> anyhow::Result<(
    BTreeMap<u32, Vec<String>>,
    Vec<(String, u32, String, String)>,
    Vec<(String, Vec<String>, Vec<String>)>,
)> {
    use anyhow::Context as _;
    let mut identities = BTreeMap::new();
    let prefix = format!("{}/id/", kvstore::IDENTITIES_PREFIX);
    for kv in list_prefix(client, &prefix).await?.0 {
        // A value we cannot read is skipped: one bad key must not hide the others.
        let (Ok(id), Ok(labels)) = (
            kvstore::parse_identity_key(&kv.key),
            std::str::from_utf8(&kv.value)
                .map_err(|e| e.to_string())
                .and_then(|s| LabelArray::parse_kvstore(s).map_err(|e| e.to_string())),
        ) else {
            continue;
        };
        identities.insert(id, labels.iter().map(ToString::to_string).collect());
    }
    let mut ipcache = Vec::new();
    let prefix = format!("{}/{}/", kvstore::IP_PREFIX, kvstore::IP_ADDRESS_SPACE);
    for kv in list_prefix(client, &prefix).await?.0 {
        let Ok(p) = serde_json::from_slice::<IpIdentityPair>(&kv.value) else {
            continue;
        };
        ipcache.push((
            p.ip.into(),
            p.id,
            p.k8s_namespace.into(),
            p.k8s_pod_name.into(),
        ));
    }
    let mut services = Vec::new();
    let prefix = format!("{}/{cluster}/", kvstore::SERVICES_PREFIX);
    for kv in list_prefix(client, &prefix)
        .await
        .context("listing services")?
        .0
    {
        let Ok(s) = serde_json::from_slice::<ClusterService>(&kv.value) else {
            continue;
        };
        let mut frontends = Vec::new();
        for (ip, ports) in s.frontends.iter() {
            for (_, l4) in ports.iter() {
                frontends.push(format!("{ip}:{}/{}", l4.port, l4.protocol));
            }
        }
        let backends = s.backends.keys().map(ToString::to_string).collect();
        services.push((format!("{}/{}", s.namespace, s.name), frontends, backends));
    }
    Ok((identities, ipcache, services))
}

/// Lists every cluster's etcd every [`INVENTORY_EVERY`] into the hub's map, until
/// cancelled. A cluster whose etcd fails keeps its last good read; the error is shown.
pub async fn poll_inventory(
    lab: Arc<LabState>,
    hub: Arc<Hub>,
    health: SharedHealth,
    token: CancellationToken,
) {
    let mut clients: BTreeMap<String, clustermesh_syncer::Client> = BTreeMap::new();
    let mut last: BTreeMap<String, _> = BTreeMap::new();
    let opts = clustermesh_syncer::ConnectConfig {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    loop {
        for c in &lab.clusters {
            let cfg_path = c.state_dir.join("remote-etcd-config.yaml");
            let res = async {
                if !clients.contains_key(&c.name) {
                    let cfg = EtcdConfig::load(&cfg_path)?;
                    let client = clustermesh_syncer::connect(&cfg, &opts).await?;
                    clients.insert(c.name.clone(), client);
                }
                let client = clients
                    .get(&c.name)
                    .ok_or_else(|| anyhow::anyhow!("no etcd client"))?;
                read_cluster(client, &c.name).await
            };
            let res = tokio::select! {
                _ = token.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(5), res) => r,
            };
            let err = match res {
                Ok(Ok(read)) => {
                    last.insert(c.name.clone(), read);
                    None
                }
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("no answer within 5 s".to_owned()),
            };
            let mut h = health.lock().unwrap_or_else(PoisonError::into_inner);
            match err {
                Some(e) => {
                    // Reconnect next time: the client may be bound to a dead connection.
                    clients.remove(&c.name);
                    h.etcd.insert(
                        c.name.clone(),
                        format!(
                            "reading the etcd of {} ({}) for the map: {e}",
                            c.name, c.etcd_endpoint
                        ),
                    );
                }
                None => {
                    h.etcd.remove(&c.name);
                }
            }
        }
        let mut inv = Inventory::default();
        for (cluster, (ids, ipcache, services)) in &last {
            inv.add_cluster(cluster, ids, ipcache, services.clone());
        }
        hub.set_inventory(inv);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(INVENTORY_EVERY) => {}
        }
    }
}

#[derive(Serialize)]
struct PodView<'a> {
    name: &'a str,
    namespace: &'a str,
    ip: String,
}

#[derive(Serialize)]
struct NodeView<'a> {
    name: &'a str,
    ip: String,
    agent: Agent,
    observer: Option<&'a Feed>,
    pods: Vec<PodView<'a>>,
}

#[derive(Serialize)]
struct ClusterView<'a> {
    name: &'a str,
    id: u32,
    apiserver: ClusterHealth,
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_error: Option<&'a String>,
    nodes: Vec<NodeView<'a>>,
}

/// The `/api/mesh` document: the lab's clusters with their health, nodes and observers,
/// plus observers given with `--server`.
pub fn compose(lab: Option<&LabState>, health: &Health, feeds: &[Feed]) -> String {
    let clusters: Vec<ClusterView<'_>> = lab
        .map(|lab| {
            lab.clusters
                .iter()
                .map(|c| ClusterView {
                    name: &c.name,
                    id: c.id,
                    apiserver: health.clusters.get(&c.name).cloned().unwrap_or_else(|| {
                        ClusterHealth {
                            health: c.health_addr.to_string(),
                            ..Default::default()
                        }
                    }),
                    etcd_error: health.etcd.get(&c.name),
                    nodes: c
                        .nodes
                        .iter()
                        .map(|n| NodeView {
                            name: &n.name,
                            ip: n.ip.to_string(),
                            agent: match &n.agent {
                                None => Agent {
                                    state: "none",
                                    detail: "this lab runs no agent here".into(),
                                    health: String::new(),
                                },
                                Some(a) => health
                                    .agents
                                    .get(&format!("{}/{}", c.name, n.name))
                                    .cloned()
                                    .unwrap_or_else(|| Agent {
                                        state: "not-ready",
                                        detail: "not polled yet".into(),
                                        health: a.health_addr.to_string(),
                                    }),
                            },
                            observer: feeds
                                .iter()
                                .find(|f| f.cluster == c.name && f.node == n.name),
                            pods: n
                                .pods
                                .iter()
                                .map(|p| PodView {
                                    name: &p.name,
                                    namespace: &p.namespace,
                                    ip: p.ip.to_string(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    let others: Vec<&Feed> = feeds.iter().filter(|f| f.cluster.is_empty()).collect();
    let doc = serde_json::json!({
        "lab": lab.map(|l| serde_json::json!({"id": l.id, "dir": l.dir, "datapath": l.datapath})),
        "clusters": clusters,
        "observers": others,
    });
    doc.to_string()
}

/// Recomposes the mesh document every second and sends it to the pages when it changed.
pub async fn publish(
    lab: Option<Arc<LabState>>,
    hub: Arc<Hub>,
    health: SharedHealth,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let doc = {
            let h = health.lock().unwrap_or_else(PoisonError::into_inner);
            compose(lab.as_deref(), &h, &hub.feeds())
        };
        if doc != last {
            last.clone_from(&doc);
            let json = hub.set_mesh(doc);
            hub.broadcast(Msg::Mesh(json));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn remotes_are_ready_syncing_or_failing_with_the_status_hint() {
        let r = remote("c2", &json!({"ready": true, "connected": true}), None);
        assert_eq!((r.state, r.hint.as_str()), ("ready", ""));
        let r = remote(
            "c2",
            &json!({"ready": false, "connected": true, "num-nodes": 2}),
            Some("synchronization in progress for endpoints"),
        );
        assert_eq!(r.state, "syncing");
        assert_eq!(r.nodes, 2);
        assert!(r.hint.contains("synchronization"));
        // The same hint `clustermesh status` prints, from the same function.
        let entry = json!({"name": "c2", "connected": false, "status": "x509: certificate signed by unknown authority"});
        let hint = crate::remotes::hint("c1", &entry);
        let r = remote("c2", &entry, hint.as_deref());
        assert_eq!(r.state, "failing");
        assert!(r.hint.contains("--allow-mismatching-ca"), "{}", r.hint);
    }
}
