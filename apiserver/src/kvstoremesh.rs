//! KVStoreMesh: reads every remote cluster named in the clustermesh config directory (the
//! syncer's [`remote::Manager`] in [`Mode::Direct`]) and mirrors what it validated into the
//! **local** etcd, so the cluster's agents read the whole mesh from one etcd with their
//! `local-<c>` certificate (reference §1.4):
//!
//! | remote state (watched by the reader) | local copy |
//! |---|---|
//! | `cilium/state/nodes/v1/R/<node>` | `cilium/cache/nodes/v1/R/<node>` |
//! | `cilium/state/services/v1/R/<ns>/<name>` | `cilium/cache/services/v1/R/<ns>/<name>` |
//! | `cilium/state/serviceexports/v1/R/<ns>/<name>` | `cilium/cache/serviceexports/v1/R/<ns>/<name>` |
//! | `cilium/state/ip/v1/default/<ip>` | `cilium/cache/ip/v1/R/<ip>` |
//! | `cilium/state/identities/v1/id/<id>` | `cilium/cache/identities/v1/R/id/<id>` |
//!
//! plus `cilium/cluster-config/R` (R's config with `cached: true`, re-enforced every 5 min)
//! and the cache's synced canaries `cilium/synced/R/cilium/cache/<type>/v1`, each written once
//! that resource's initial list has been mirrored. Values are the remote's exact bytes.
//!
//! **Writes** go through a [`Writer`] with its own leases. The mirror keeps, per remote and
//! resource, the desired contents of the local prefix; events are coalesced for a few
//! milliseconds and the dirty prefixes are synced in one pipeline of transactions. A prefix
//! is first synced when the reader reports its initial list complete, so a restart diffs
//! against what a previous run left (adopted) instead of wiping and rewriting it, and keys
//! that disappeared meanwhile are deleted then. A lost lease or a new local etcd session
//! re-syncs every prefix from memory.
//!
//! **Disconnects.** A remote that is merely unreachable keeps its last-known state (the
//! reader keeps its cache). Removing its config file drains it: the cluster config is
//! deleted at once (agents then disconnect from it), the cache prefixes and canaries after
//! [`Options::drain_grace`] (Cilium: 3 min). Cache left by remotes whose file disappeared
//! while the apiserver was down is drained the same way after start.
//!
//! **Readiness** (our choice, modelled on Cilium's kvstoremesh): each configured remote holds
//! `/readyz` back until it has been ready once — connected, config retrieved, every resource
//! mirrored. A remote that never connected stops counting after
//! [`Options::per_cluster_ready_timeout`] (15 s); after [`Options::global_ready_timeout`]
//! (10 min) remotes never hold readiness back. A remote that was ready once and then fails
//! does not make the apiserver unready: its last-known state is still served.
//!
//! It must not write anything outside `cilium/cache/`, `cilium/synced/<remote>/` and
//! `cilium/cluster-config/<remote>`, and never touches the local cluster's own keys.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clustermesh_syncer::remote::{self, Backoff, Change, Event, Mode, Resource, Snapshot};
use clustermesh_syncer::{writer, EtcdConfig, Metrics as KvMetrics, Writer};
use clustermesh_types::cluster::ClusterInfo;
use clustermesh_types::kvstore::cluster_config_key;
use clustermesh_types::model::{format_rfc3339, Capabilities, ClusterConfig};

use crate::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument as _};

use crate::health::Status;

/// How long events are gathered before the dirty prefixes are written.
pub const COALESCE: Duration = Duration::from_millis(5);
/// Events gathered at most into one flush.
const MAX_BATCH: usize = 16 * 1024;
/// How often the cached cluster configs are re-enforced (Cilium: 5 min).
pub const ENFORCE_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// KVStoreMesh settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The local cluster.
    pub local: ClusterInfo,
    /// Directory of remote cluster config files.
    pub config_dir: std::path::PathBuf,
    /// Admin client config of the local etcd.
    pub local_etcd: EtcdConfig,
    /// TTL of the mirror's leases.
    pub lease_ttl: Duration,
    /// Delay between deleting a removed remote's cluster config and its cache.
    pub drain_grace: Duration,
    /// A remote that never connected stops holding back readiness after this.
    pub per_cluster_ready_timeout: Duration,
    /// Remotes stop holding back readiness after this.
    pub global_ready_timeout: Duration,
    /// Withdraw a disconnected remote's entries after this; `None` keeps them.
    pub cache_ttl: Option<Duration>,
    /// Connect timeout and keepalives, to the remotes and to the local etcd.
    pub connect: clustermesh_syncer::ConnectConfig,
}

/// Runs KVStoreMesh until `cancel`: the remote reader, the mirror into the local etcd, and
/// the status/readiness publisher.
pub async fn run(
    opts: Options,
    metrics: remote::Metrics,
    kv: Arc<KvMetrics>,
    status: Arc<Status>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let mut config = remote::Config::new(opts.local.clone(), opts.config_dir.clone(), Mode::Direct);
    config.per_remote_ready_timeout = opts.per_cluster_ready_timeout;
    config.cache_ttl = opts.cache_ttl;
    config.connect = opts.connect.clone();
    config.drain_deletes = false;
    // Mirror every store a remote writes (both of service v2's); the agents reading the
    // cache choose by the export mode mirrored in the cluster config.
    config.service_backends = remote::ServiceBackends::AsExported;
    config.event_capacity = 64 * 1024;
    let (manager, events) =
        remote::Manager::new(config, metrics).map_err(|source| Error::Remote {
            what: "starting the kvstoremesh reader of remote clusters",
            source,
        })?;
    let snapshots = manager.status();
    status.update(|r| r.kvstoremesh = true);
    status.set_remotes_pending(true);
    info!(dir = %opts.config_dir.display(), "kvstoremesh started");

    let mut tasks: JoinSet<crate::Result<()>> = JoinSet::new();
    let token = cancel.child_token();
    tasks.spawn({
        let token = token.child_token();
        async move {
            manager.run(token).await.map_err(|source| Error::Remote {
                what: "reading the remote clusters",
                source,
            })
        }
        .instrument(info_span!("remote_clusters"))
    });
    tasks.spawn(
        publish(opts.clone(), snapshots.clone(), status, token.child_token())
            .instrument(info_span!("kvstoremesh_status")),
    );
    tasks.spawn(
        mirror_loop(opts, events, snapshots, kv, token.child_token())
            .instrument(info_span!("kvstoremesh_mirror")),
    );
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = match joined {
            Ok(r) => r,
            Err(source) => Err(Error::Task {
                task: "kvstoremesh",
                source,
            }),
        };
        if let Err(e) = r {
            if !token.is_cancelled() && result.is_ok() {
                result = Err(e);
            }
            token.cancel();
        }
    }
    result
}

/// Copies the reader's status into `/status` and decides whether remotes hold back `/readyz`.
async fn publish(
    opts: Options,
    mut snapshots: watch::Receiver<Snapshot>,
    status: Arc<Status>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let started = Instant::now();
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut ever_connected: HashSet<String> = HashSet::new();
    let mut ever_ready: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut components = crate::components::RemoteComponents::default();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        components.update(status.reporters(), &snap.clusters);
        let mut pending = Vec::new();
        for s in &snap.clusters {
            let seen = *first_seen
                .entry(s.name.clone())
                .or_insert_with(Instant::now);
            if s.connected {
                ever_connected.insert(s.name.clone());
            }
            if s.ready {
                ever_ready.insert(s.name.clone());
            }
            let timed_out = !ever_connected.contains(&s.name)
                && seen.elapsed() > opts.per_cluster_ready_timeout;
            if !ever_ready.contains(&s.name) && !timed_out {
                pending.push(s.name.as_str());
            }
        }
        // Forget removed remotes so a re-added one counts again.
        let names: HashSet<&str> = snap.clusters.iter().map(|s| s.name.as_str()).collect();
        first_seen.retain(|n, _| names.contains(n.as_str()));
        ever_connected.retain(|n| names.contains(n.as_str()));
        ever_ready.retain(|n| names.contains(n.as_str()));
        let hold = !pending.is_empty() && started.elapsed() < opts.global_ready_timeout;
        status.set_remotes_pending(hold);
        status.update(|r| r.remote_clusters = snap.clusters.clone());
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = snapshots.changed() => if r.is_err() { return Ok(()) },
            _ = tick.tick() => {}
        }
    }
}

/// Desired contents of one local cache prefix.
#[derive(Debug, Default)]
struct Store {
    desired: BTreeMap<String, Vec<u8>>,
    /// The reader finished its initial list since this process started: the prefix may be
    /// synced (before that, a sync would delete what is not listed yet).
    listed: bool,
    dirty: bool,
    /// Write the canary once the prefix is synced and the cluster config written.
    canary_pending: bool,
}

#[derive(Debug, Default)]
struct Mirrored {
    stores: [Store; Resource::ALL.len()],
}

fn slot(r: Resource) -> usize {
    Resource::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

/// The mirror's memory: what the local etcd must hold, independent of any etcd session.
#[derive(Debug)]
struct Mirror {
    local: String,
    max_connected_clusters: u32,
    remotes: BTreeMap<Arc<str>, Mirrored>,
    /// Removed remotes: when their cache is deleted.
    draining: BTreeMap<String, Instant>,
    grace: Duration,
}

impl Mirror {
    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Change {
                cluster,
                resource,
                key,
                change,
            } => {
                let Some(rel) = key
                    .strip_prefix(&resource.watch_prefix(&cluster, false))
                    .or_else(|| key.strip_prefix(&resource.watch_prefix(&cluster, true)))
                else {
                    debug!(%key, "event outside the watched prefixes; ignored");
                    return;
                };
                let dest = format!("{}{rel}", resource.watch_prefix(&cluster, true));
                self.draining.remove(&*cluster);
                let store = &mut self.remotes.entry(cluster).or_default().stores[slot(resource)];
                match change {
                    Change::Upsert { raw, .. } => {
                        store.desired.insert(dest, raw.to_vec());
                    }
                    Change::Delete { .. } => {
                        store.desired.remove(&dest);
                    }
                }
                store.dirty = true;
            }
            Event::Synced { cluster, resource } => {
                self.draining.remove(&*cluster);
                let store = &mut self.remotes.entry(cluster).or_default().stores[slot(resource)];
                store.listed = true;
                store.dirty = true;
                store.canary_pending = true;
            }
            Event::Drained { cluster } => {
                info!(%cluster, grace = ?self.grace, "remote cluster removed: its cluster config goes now, its cache after the grace period");
                self.remotes.remove(&cluster);
                self.draining
                    .insert(cluster.to_string(), Instant::now() + self.grace);
            }
        }
    }

    /// The cached cluster config of `name` as the reader accepted it, if it did.
    fn cluster_config(&self, snap: &Snapshot, name: &str) -> Option<Vec<u8>> {
        let s = snap.get(name)?;
        if !s.config.retrieved || s.config.cluster_id == 0 {
            return None;
        }
        Some(
            ClusterConfig {
                id: s.config.cluster_id,
                capabilities: Capabilities {
                    synced_canaries: true,
                    cached: true,
                    max_connected_clusters: self.max_connected_clusters,
                    service_exports_enabled: s.config.service_exports_enabled,
                    endpoint_slices_export_mode: s.config.endpoint_slices_export_mode.clone(),
                },
            }
            .encode(),
        )
    }

    /// Writes every dirty, listed prefix in one pipeline, then the cluster configs and the
    /// canaries that became due.
    async fn flush(&mut self, w: &mut Writer, snap: &Snapshot) -> clustermesh_syncer::Result<()> {
        let mut prefixes: Vec<(String, &BTreeMap<String, Vec<u8>>)> = Vec::new();
        for (name, m) in &self.remotes {
            for r in Resource::ALL {
                let store = &m.stores[slot(r)];
                if store.listed && store.dirty {
                    prefixes.push((r.watch_prefix(name, true), &store.desired));
                }
            }
        }
        if !prefixes.is_empty() {
            let batch: Vec<(&str, &BTreeMap<String, Vec<u8>>)> =
                prefixes.iter().map(|(p, d)| (p.as_str(), *d)).collect();
            let t = Instant::now();
            let stats = w.sync_prefixes(&batch).await?;
            let (put, deleted) = stats
                .iter()
                .fold((0, 0), |(p, d), s| (p + s.put, d + s.deleted));
            debug!(prefixes = batch.len(), put, deleted, took = ?t.elapsed(), "mirrored");
            for m in self.remotes.values_mut() {
                for s in &mut m.stores {
                    if s.listed {
                        s.dirty = false;
                    }
                }
            }
        }
        // Cluster configs first, then canaries (agents wait for both).
        let names: Vec<Arc<str>> = self.remotes.keys().cloned().collect();
        for name in names {
            let Some(config) = self.cluster_config(snap, &name) else {
                continue;
            };
            w.put_key(&cluster_config_key(&name), config).await?;
            let Some(m) = self.remotes.get_mut(&name) else {
                continue;
            };
            for r in Resource::ALL {
                let store = &mut m.stores[slot(r)];
                if store.canary_pending && store.listed && !store.dirty {
                    let key = r.synced_key(&name, true);
                    if !w.knows(&key) {
                        w.put_key(&key, format_rfc3339(SystemTime::now()).into_bytes())
                            .await?;
                        debug!(%key, "cache synced canary written");
                    }
                    store.canary_pending = false;
                }
            }
        }
        Ok(())
    }

    /// Re-syncs every listed prefix (new etcd session, lost lease).
    fn mark_all_dirty(&mut self) {
        for m in self.remotes.values_mut() {
            for s in &mut m.stores {
                s.dirty = true;
                s.canary_pending = s.listed;
            }
        }
    }

    /// Deletes the cluster configs of removed remotes, and their caches once due.
    async fn drain(&mut self, w: &mut Writer) -> clustermesh_syncer::Result<()> {
        let now = Instant::now();
        let empty = BTreeMap::new();
        let mut done = Vec::new();
        for (name, due) in &self.draining {
            w.delete_key(&cluster_config_key(name)).await?;
            if *due > now {
                continue;
            }
            let mut prefixes: Vec<String> = Resource::ALL
                .iter()
                .map(|r| r.watch_prefix(name, true))
                .collect();
            prefixes.push(format!("cilium/synced/{name}/"));
            let batch: Vec<(&str, &BTreeMap<String, Vec<u8>>)> =
                prefixes.iter().map(|p| (p.as_str(), &empty)).collect();
            let stats = w.sync_prefixes(&batch).await?;
            let deleted: usize = stats.iter().map(|s| s.deleted).sum();
            info!(cluster = %name, deleted, "remote cluster cache drained");
            done.push(name.clone());
        }
        for n in done {
            self.draining.remove(&n);
        }
        Ok(())
    }
}

async fn mirror_loop(
    opts: Options,
    mut events: mpsc::Receiver<Event>,
    snapshots: watch::Receiver<Snapshot>,
    kv: Arc<KvMetrics>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let mut mirror = Mirror {
        local: opts.local.name.to_string(),
        max_connected_clusters: opts.local.max_connected_clusters.as_u32(),
        remotes: BTreeMap::new(),
        draining: BTreeMap::new(),
        grace: opts.drain_grace,
    };
    let mut first = true;
    // Between local etcd sessions: 100 ms doubling to 10 s, jittered.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let session = cancel.child_token();
        let res = session_loop(
            &opts,
            &mut mirror,
            &mut events,
            snapshots.clone(),
            &kv,
            &session,
            &mut first,
            &mut backoff,
        )
        .await;
        session.cancel();
        match res {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(error = %e, retry_in = ?wait, "kvstoremesh lost the local etcd; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One session with the local etcd. `Ok(true)` = stop (cancelled or the reader ended).
#[allow(clippy::too_many_arguments)]
async fn session_loop(
    opts: &Options,
    mirror: &mut Mirror,
    events: &mut mpsc::Receiver<Event>,
    mut snapshots: watch::Receiver<Snapshot>,
    kv: &Arc<KvMetrics>,
    session: &CancellationToken,
    first: &mut bool,
    backoff: &mut Backoff,
) -> clustermesh_syncer::Result<bool> {
    let client = clustermesh_syncer::connect(&opts.local_etcd, &opts.connect).await?;
    let wcfg = writer::Config {
        lease_ttl: opts.lease_ttl,
        ..Default::default()
    };
    let (mut w, keepalive) = Writer::new(client, wcfg, kv.clone(), session.clone())?;
    let mut tasks = JoinSet::new();
    tasks.spawn(keepalive.instrument(info_span!("kvstoremesh_leases")));

    // Take over what an earlier run left, so unchanged entries are not rewritten.
    let local = mirror.local.clone();
    let mut stored: BTreeSet<String> = BTreeSet::new();
    w.adopt("cilium/cache/").await?;
    let (configs, _) =
        clustermesh_syncer::list::list_prefix(w.client(), "cilium/cluster-config/").await?;
    for kv in configs {
        if let Some(name) = kv.key.strip_prefix("cilium/cluster-config/") {
            let cached = ClusterConfig::decode(&kv.value)
                .map(|c| c.capabilities.cached)
                .unwrap_or(false);
            if name != local && cached {
                w.adopt_key(&kv.key).await?;
                stored.insert(name.to_owned());
            }
        }
    }
    let (synced, _) = clustermesh_syncer::list::list_prefix(w.client(), "cilium/synced/").await?;
    let mut synced_names = BTreeSet::new();
    for kv in synced {
        if let Some((name, rest)) = kv
            .key
            .strip_prefix("cilium/synced/")
            .and_then(|k| k.split_once('/'))
        {
            if name != local && rest.starts_with("cilium/cache/") {
                synced_names.insert(name.to_owned());
            }
        }
    }
    for name in &synced_names {
        w.adopt(&format!("cilium/synced/{name}/")).await?;
    }
    stored.extend(synced_names);
    if *first {
        // Cache of remotes whose file went away while we were down: drain it too.
        let configured = remote::configured_remotes(&opts.config_dir, &local).remotes;
        for name in stored.iter().filter(|n| !configured.contains_key(*n)) {
            if !mirror.remotes.contains_key(name.as_str()) {
                info!(cluster = %name, "cached remote cluster is no longer configured: draining");
                mirror
                    .draining
                    .insert(name.clone(), Instant::now() + mirror.grace);
            }
        }
        *first = false;
    }
    mirror.mark_all_dirty();
    let snap = snapshots.borrow_and_update().clone();
    mirror.flush(&mut w, &snap).await?;
    mirror.drain(&mut w).await?;
    backoff.reset();
    info!(
        remotes = mirror.remotes.len(),
        keys = w.known_keys(),
        "kvstoremesh mirror connected to the local etcd"
    );

    let lease_lost = w.lease_lost();
    let mut enforce = tokio::time::interval(ENFORCE_INTERVAL);
    enforce.tick().await;
    let mut drain_tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = session.cancelled() => return Ok(true),
            ev = events.recv() => {
                let Some(ev) = ev else { return Ok(true) };
                let drained = matches!(ev, Event::Drained { .. });
                mirror.apply(ev);
                // Coalesce: whatever else arrives within a few ms goes into the same flush.
                let deadline = tokio::time::Instant::now() + COALESCE;
                let mut n = 1;
                while n < MAX_BATCH {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(Some(ev)) => { mirror.apply(ev); n += 1; }
                        Ok(None) | Err(_) => break,
                    }
                }
                let snap = snapshots.borrow_and_update().clone();
                mirror.flush(&mut w, &snap).await?;
                if drained {
                    mirror.drain(&mut w).await?;
                }
            }
            r = snapshots.changed() => {
                if r.is_err() { return Ok(true) }
                // Configs retrieved or changed: write them (and canaries waiting for them).
                let snap = snapshots.borrow_and_update().clone();
                mirror.flush(&mut w, &snap).await?;
            }
            _ = lease_lost.notified() => {
                info!("kvstoremesh: re-writing keys of lost leases");
                mirror.mark_all_dirty();
                let snap = snapshots.borrow().clone();
                mirror.flush(&mut w, &snap).await?;
            }
            _ = enforce.tick() => {
                let snap = snapshots.borrow().clone();
                let names: Vec<Arc<str>> = mirror.remotes.keys().cloned().collect();
                for name in names {
                    if let Some(config) = mirror.cluster_config(&snap, &name) {
                        if w.enforce_key(&cluster_config_key(&name), config).await? {
                            warn!(cluster = %name, "cached cluster config was missing or changed; re-written");
                        }
                    }
                }
            }
            _ = drain_tick.tick(), if !mirror.draining.is_empty() => {
                mirror.drain(&mut w).await?;
            }
            Some(j) = tasks.join_next() => {
                return Err(clustermesh_syncer::Error::Internal(match j {
                    Err(e) => format!("kvstoremesh lease keep-alive task failed: {e}"),
                    Ok(()) => "kvstoremesh lease keep-alive ended".into(),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_syncer::remote::Value;

    fn mirror() -> Mirror {
        Mirror {
            local: "c1".into(),
            max_connected_clusters: 255,
            remotes: BTreeMap::new(),
            draining: BTreeMap::new(),
            grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn cached_cluster_config_keeps_the_export_mode() {
        let status = clustermesh_syncer::remote::Status {
            name: "c2".into(),
            config: clustermesh_syncer::remote::StatusConfig {
                cluster_id: 2,
                retrieved: true,
                service_exports_enabled: Some(false),
                endpoint_slices_export_mode: "endpointslices-only".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let snap = Snapshot {
            ready: true,
            clusters: vec![status],
        };
        let config = mirror().cluster_config(&snap, "c2").unwrap();
        assert_eq!(
            String::from_utf8(config).unwrap(),
            r#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false,"endpointSlicesExportMode":"endpointslices-only"}}"#
        );
    }

    #[test]
    fn keys_are_rekeyed_into_the_cache() {
        let mut m = mirror();
        let upsert = |key: &str, r: Resource| Event::Change {
            cluster: "c2".into(),
            resource: r,
            key: key.into(),
            change: Change::Upsert {
                raw: b"v".to_vec().into(),
                value: Value::Identity(Arc::default()),
            },
        };
        m.apply(upsert(
            "cilium/state/ip/v1/default/10.0.0.1",
            Resource::Endpoints,
        ));
        m.apply(upsert(
            "cilium/state/identities/v1/id/131072",
            Resource::Identities,
        ));
        m.apply(upsert("cilium/state/nodes/v1/c2/n1", Resource::Nodes));
        m.apply(upsert(
            "cilium/cache/services/v1/c2/ns/s",
            Resource::Services,
        ));
        m.apply(upsert(
            "cilium/state/endpointslices/v1/c2/ns/s-abcde",
            Resource::EndpointSlices,
        ));
        let r = &m.remotes["c2"];
        let keys: Vec<&String> = r.stores.iter().flat_map(|s| s.desired.keys()).collect();
        assert_eq!(
            keys,
            vec![
                "cilium/cache/identities/v1/c2/id/131072",
                "cilium/cache/nodes/v1/c2/n1",
                "cilium/cache/ip/v1/c2/10.0.0.1",
                "cilium/cache/services/v1/c2/ns/s",
                "cilium/cache/endpointslices/v1/c2/ns/s-abcde",
            ]
        );
        assert!(r.stores.iter().all(|s| !s.listed));
        m.apply(Event::Drained {
            cluster: "c2".into(),
        });
        assert!(m.remotes.is_empty());
        assert!(m.draining.contains_key("c2"));
    }
}
