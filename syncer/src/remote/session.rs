//! One remote cluster: the reconnect loop and, inside it, one session per connection
//! (heartbeat, cluster config, then per resource a task running the list → watch machine,
//! [`crate::watcher`], into the remote's cache).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clustermesh_types::kvstore::{cluster_config_key, HEARTBEAT_KEY};
use clustermesh_types::model::{ClusterConfig, EndpointSlicesExportMode, SmolStr};
use etcd_client::{EventType, WatchOptions};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

use super::cache::RemoteCache;
use super::status::Shared;
use super::validate::{validate, Context, Reason, Rejection};
use super::{
    Backoff, Change, Config, Error, Event, Metrics, Mode, Resource, Result, ServiceBackends,
};
use crate::watcher::mux::Mux;
use crate::watcher::{self, Conn, Reflector, Step, Watcher};
use crate::{Client, EtcdConfig};

/// How often an unreachable remote's endpoints are probed with a TCP connect.
const REACHABLE_PROBE: Duration = Duration::from_millis(250);

/// State shared by the manager and every remote.
pub(crate) struct Env {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) events: mpsc::Sender<Event>,
    /// Cluster ID → the remote holding it.
    pub(crate) ids: Mutex<HashMap<u32, Arc<str>>>,
    /// KVStoreMesh mode: one connection to the local etcd shared by every remote, with the
    /// watch stream all their watches share, and a generation so that only the first
    /// failing session replaces it.
    local: tokio::sync::Mutex<Option<(u64, Client, Arc<Mux>)>>,
    local_generation: AtomicU64,
    /// KVStoreMesh mode: bounds concurrent reads (see [`LOCAL_READS`]).
    read_permits: Option<Arc<Semaphore>>,
}

/// Concurrent reads (lists, and the gets of session set-up and canaries) against the local
/// etcd in KVStoreMesh mode. All remotes start at once, and each read holds its response
/// (tonic allocates 8 KiB per response before decoding); letting 250 remotes × 5 reads go
/// at the same time gains no time against one etcd and leaves the process with the
/// high-water mark of all those buffers.
const LOCAL_READS: usize = 8;

impl Env {
    pub(crate) fn new(config: Config, metrics: Metrics, events: mpsc::Sender<Event>) -> Self {
        Self {
            read_permits: matches!(config.mode, Mode::KvstoreMesh { .. })
                .then(|| Arc::new(Semaphore::new(LOCAL_READS))),
            config,
            metrics,
            events,
            ids: Mutex::new(HashMap::new()),
            local: tokio::sync::Mutex::new(None),
            local_generation: AtomicU64::new(0),
        }
    }

    /// A permit for one read of the local etcd in KVStoreMesh mode (`None` otherwise).
    async fn read_permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.read_permits {
            Some(p) => p.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    fn release_id(&self, id: u32, name: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.get(&id).is_some_and(|n| &**n == name) {
            ids.remove(&id);
        }
    }

    fn reserve_id(&self, id: u32, name: &Arc<str>) -> Result<()> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        match ids.get(&id) {
            Some(other) if other != name => Err(Error::ConfigRefused(format!(
                "cluster ID {id} is already used by remote cluster {other:?}: every cluster of a mesh needs a unique ID"
            ))),
            _ => {
                ids.insert(id, name.clone());
                Ok(())
            }
        }
    }
}

/// One configured remote cluster.
pub(crate) struct Remote {
    pub(crate) name: Arc<str>,
    pub(crate) file: std::path::PathBuf,
    pub(crate) shared: Arc<Shared>,
    pub(crate) cache: Arc<RemoteCache>,
    pub(crate) env: Arc<Env>,
    pub(crate) ever_connected: AtomicBool,
    /// Rejection kinds already logged at warn level.
    logged: Mutex<HashSet<Reason>>,
    /// The cluster ID reserved for this remote.
    reserved: Mutex<Option<u32>>,
    /// The last etcd cluster ID seen, to log a change across sessions.
    last_etcd_id: AtomicU64,
    /// The current session reached ready (resets the backoff).
    healthy: AtomicBool,
}

impl Remote {
    pub(crate) fn new(
        name: Arc<str>,
        file: std::path::PathBuf,
        shared: Arc<Shared>,
        cache: Arc<RemoteCache>,
        env: Arc<Env>,
    ) -> Self {
        Self {
            name,
            file,
            shared,
            cache,
            env,
            ever_connected: AtomicBool::new(false),
            logged: Mutex::new(HashSet::new()),
            reserved: Mutex::new(None),
            last_etcd_id: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
        }
    }

    /// Takes over what a previous task for the same remote (before a config change) knew.
    pub(crate) fn inherit(&self, old: &Remote) {
        let id = *old.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        *self.reserved.lock().unwrap_or_else(PoisonError::into_inner) = id;
        self.ever_connected
            .store(old.ever_connected.load(Ordering::SeqCst), Ordering::SeqCst);
        self.last_etcd_id
            .store(old.last_etcd_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Reconnects with backoff until cancelled; never drains (only [`Self::drain`] does).
    pub(crate) async fn run(self: Arc<Self>, token: CancellationToken) {
        let cfg = &self.env.config;
        let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
        let mut disconnected_since: Option<Instant> = Some(Instant::now());
        let mut revoked = false;
        loop {
            let connected = AtomicBool::new(false);
            let result = tokio::select! {
                _ = token.cancelled() => return,
                r = self.session(&token, &connected) => r,
            };
            if connected.load(Ordering::SeqCst) {
                disconnected_since = Some(Instant::now());
                revoked = false;
            }
            if self.healthy.swap(false, Ordering::SeqCst) {
                backoff.reset();
            }
            let error = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            let etcd = self.etcd_config();
            let failure = crate::failure::classify_remote(&error, etcd.as_ref());
            warn!(cluster = %self.name, %error, class = failure.class.as_str(), hint = %failure.hint,
                "remote cluster session failed");
            self.shared.update(|s| {
                s.connected = false;
                s.ready = false;
                s.status = error.to_string();
                s.failure_class = Some(failure.class);
                s.hint = Some(failure.hint.clone());
                s.num_failures += 1;
                s.last_failure = Some(SystemTime::now());
                s.synced = Default::default();
            });
            if is_transport(&error) {
                self.env.invalidate_local().await;
            }
            let delay = backoff.next_delay();
            // Unreachable: also watch for the network to come back, so the backoff that grew
            // during an outage does not delay the resync after it.
            let endpoints = match (failure.class, &etcd) {
                (crate::failure::Class::Unreachable, Some(c)) => {
                    crate::client::dial_endpoints(c).await.ok().map(|(eps, _)| {
                        eps.into_iter()
                            .map(|e| e.trim_start_matches("https://").to_owned())
                            .collect::<Vec<_>>()
                    })
                }
                _ => None,
            };
            let mut back = std::pin::pin!(async {
                match &endpoints {
                    Some(eps) => {
                        tokio::time::sleep(cfg.backoff_min.min(delay)).await;
                        crate::transport::wait_reachable(eps, REACHABLE_PROBE).await;
                    }
                    None => std::future::pending().await,
                }
            });
            // While the probe says unreachable, a session could only hang in its TCP connect:
            // retry by the timer only at the backoff's cap then.
            let mut wait = if endpoints.is_some() {
                cfg.backoff_max.max(delay)
            } else {
                delay
            };
            if let (Some(ttl), Some(since), false) = (cfg.cache_ttl, disconnected_since, revoked) {
                let left = (since + ttl).saturating_duration_since(Instant::now());
                if left <= wait {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(left) => {}
                        _ = &mut back => {
                            info!(cluster = %self.name, "remote etcd reachable again: reconnecting now");
                            continue;
                        }
                    }
                    info!(cluster = %self.name, ttl = ?ttl, "remote disconnected longer than the cache TTL: revoking its state");
                    self.clear_cache(&token).await;
                    revoked = true;
                    wait -= left;
                }
            }
            debug!(cluster = %self.name, ?wait, "reconnecting after backoff");
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = &mut back => info!(cluster = %self.name, "remote etcd reachable again: reconnecting now"),
            }
        }
    }

    /// The etcd config this remote connects with (for classifying its failures).
    fn etcd_config(&self) -> Option<EtcdConfig> {
        match &self.env.config.mode {
            Mode::Direct => EtcdConfig::load(&self.file).ok(),
            Mode::KvstoreMesh { local_etcd } => Some(local_etcd.clone()),
        }
    }

    /// Deletes everything cached (emitting deletes) and releases the cluster ID. Called by
    /// the manager after the task ended, when the config file was removed.
    pub(crate) async fn drain(&self, token: &CancellationToken) {
        if self.env.config.drain_deletes {
            self.clear_cache(token).await;
        } else {
            for r in Resource::ALL {
                self.cache.store(r).take_all();
            }
        }
        if let Some(id) = self
            .reserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            self.env.release_id(id, &self.name);
        }
    }

    async fn clear_cache(&self, token: &CancellationToken) {
        let cached = self.shared.get().config.kvstoremesh;
        let mut events = Vec::new();
        for r in Resource::ALL {
            let prefix = r.watch_prefix(&self.name, cached);
            for (rel, change) in self.cache.store(r).take_all() {
                events.push(self.event(r, &prefix, &rel, change));
            }
        }
        self.shared.update(|s| s.synced = Default::default());
        self.emit(events, token).await;
    }

    /// Deletes (and emits the deletes of) everything cached of `r`: a store the remote no
    /// longer writes, so nothing read from it in an earlier session outlives the switch.
    async fn forget(&self, r: Resource, cached: bool, token: &CancellationToken) {
        let prefix = r.watch_prefix(&self.name, cached);
        let events = (self.cache.store(r).take_all().into_iter())
            .map(|(rel, change)| self.event(r, &prefix, &rel, change))
            .collect();
        self.emit(events, token).await;
    }

    async fn emit(&self, events: Vec<Event>, token: &CancellationToken) {
        if events.is_empty() {
            return;
        }
        self.shared.touch();
        for ev in events {
            tokio::select! {
                // Shutdown: the consumer is going away too.
                _ = token.cancelled() => return,
                r = self.env.events.send(ev) => if r.is_err() { return },
            }
        }
    }

    /// A connection for a session and the [`Mux`] its watches share: the remote's own in
    /// `Direct` mode, the one local etcd connection of every remote in `KvstoreMesh` mode.
    async fn client(&self) -> Result<(Arc<Conn>, String)> {
        let cfg = &self.env.config;
        let conn = Conn::shared;
        match &cfg.mode {
            Mode::Direct => {
                let file = EtcdConfig::load(&self.file)?;
                check_resolvable(&file).await?;
                let client = crate::connect(&file, &cfg.connect).await?;
                Ok((Conn::new(client), file.endpoints.join(",")))
            }
            Mode::KvstoreMesh { local_etcd } => {
                let mut local = self.env.local.lock().await;
                if let Some((_, c, mux)) = local.as_ref() {
                    return Ok((conn(c.clone(), mux.clone()), local_etcd.endpoints.join(",")));
                }
                check_resolvable(local_etcd).await?;
                let client = crate::connect(local_etcd, &cfg.connect).await?;
                let mux = Mux::new(client.0.clone());
                let generation = self.env.local_generation.fetch_add(1, Ordering::SeqCst) + 1;
                *local = Some((generation, client.clone(), mux.clone()));
                Ok((conn(client, mux), local_etcd.endpoints.join(",")))
            }
        }
    }

    async fn session(
        self: &Arc<Self>,
        token: &CancellationToken,
        connected: &AtomicBool,
    ) -> Result<()> {
        let (conn, endpoints) = Box::pin(self.client()).await?;

        // "Connected" = a read of the heartbeat key succeeded (Cilium).
        let permit = self.env.read_permit().await;
        let hb = Box::pin(conn.get(HEARTBEAT_KEY)).await?;
        drop(permit);
        let hb_rev = hb.1;
        let etcd_id = conn.guard.id();
        let previous = self.last_etcd_id.swap(etcd_id, Ordering::SeqCst);
        if previous != 0 && previous != etcd_id {
            warn!(cluster = %self.name, old = %format!("{previous:x}"), new = %format!("{etcd_id:x}"),
                "remote etcd cluster ID changed: full resync");
        }
        connected.store(true, Ordering::SeqCst);
        self.ever_connected.store(true, Ordering::SeqCst);
        self.shared.update(|s| {
            s.connected = true;
            s.failure_class = None;
            s.hint = None;
            s.status = format!("connected to {endpoints}, ID: {etcd_id:x}");
        });

        // The cluster config is mandatory.
        let key = cluster_config_key(&self.name);
        let permit = self.env.read_permit().await;
        let (value, config_rev) = Box::pin(conn.get(&key)).await?;
        drop(permit);
        let raw = value.ok_or(Error::ConfigNotFound { key: key.clone() })?;
        let remote =
            ClusterConfig::decode(&raw).map_err(|e| Error::ConfigRefused(format!("{key}: {e}")))?;
        self.accept_config(&remote, token).await?;
        let cached = remote.capabilities.cached;
        let canaries = remote.capabilities.synced_canaries;
        // `accept_config` refused unknown modes.
        let mode = remote.capabilities.export_mode().unwrap_or_default();
        // Read with every session: a changed file (new digest) reconnects the remote.
        let cidrs = crate::config::remote_cluster_cidrs(&self.file)?;
        let ctx = Arc::new(Context {
            cidrs,
            cluster: self.name.to_string(),
            cluster_id: remote.id,
            range: clustermesh_types::cluster::IdentityRange::for_cluster(
                remote.id,
                self.env.config.local.max_connected_clusters,
            ),
        });
        self.shared.update(|s| {
            s.config.cluster_id = remote.id;
            s.config.kvstoremesh = cached;
            s.config.retrieved = true;
            s.config.service_exports_enabled = remote.capabilities.service_exports_enabled;
            s.config.endpoint_slices_export_mode =
                remote.capabilities.endpoint_slices_export_mode.clone();
            s.config.sync_canaries = canaries;
            s.synced = Default::default();
        });

        let mut tasks = JoinSet::new();
        for r in Resource::ALL {
            // MCS-API exports are read only from remotes that export them (Cilium reads the
            // prefix when the capability is present at all; a remote announcing `false` has
            // nothing there, and may never write its canary).
            let exports_off = r == Resource::ServiceExports
                && remote.capabilities.service_exports_enabled != Some(true);
            // Service backends come from the store(s) the remote's export mode says (service
            // v2): a store it does not write has no canary to wait for.
            if exports_off || !reads(self.env.config.service_backends, mode, r) {
                // What an earlier session read there (the remote switched modes) is gone.
                self.forget(r, cached, token).await;
                self.mark_synced(r, token).await;
                continue;
            }
            let me = self.clone();
            let (conn, ctx, token) = (conn.clone(), ctx.clone(), token.clone());
            let span =
                tracing::info_span!("remote_resource", cluster = %self.name, resource = r.as_str());
            tasks.spawn(
                async move { me.resource(conn, ctx, r, cached, canaries, token).await }
                    .instrument(span),
            );
        }
        let me = self.clone();
        let watched = conn.clone();
        tasks.spawn(async move { me.watch_config(watched, key, remote, config_rev).await });
        let me = self.clone();
        tasks.spawn(async move { me.heartbeat(conn, hb_rev).await });

        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(Error::Syncer(crate::Error::Internal(format!(
                        "remote task failed: {e}"
                    ))))
                }
            }
        }
        Ok(())
    }

    /// Validates the remote's cluster config against the local cluster and the other remotes.
    async fn accept_config(&self, remote: &ClusterConfig, token: &CancellationToken) -> Result<()> {
        let local = &self.env.config.local;
        let id = remote.id;
        let max = local.max_connected_clusters.as_u32();
        if id == 0 {
            return Err(Error::ConfigRefused("cluster ID 0 is reserved: set a cluster ID between 1 and max-connected-clusters on the remote".into()));
        }
        if id > max {
            return Err(Error::ConfigRefused(format!(
                "cluster ID {id} is larger than the local max-connected-clusters {max}: \
                 a mesh with cluster IDs above 255 needs --max-connected-clusters 511 on every cluster"
            )));
        }
        if id == local.id {
            return Err(Error::ConfigRefused(format!(
                "cluster ID {id} is assigned to the local cluster {:?}: every cluster of a mesh needs a unique ID",
                local.name.as_str()
            )));
        }
        check_mesh_size(max, remote)?;
        remote
            .capabilities
            .export_mode()
            .map_err(|e| Error::ConfigRefused(e.to_string()))?;
        let previous = *self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = previous.filter(|old| *old != id) {
            warn!(cluster = %self.name, old, new = id,
                "remote cluster ID changed: draining its state first, expect connectivity disruption");
            self.clear_cache(token).await;
            self.env.release_id(old, &self.name);
            *self.reserved.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        self.env.reserve_id(id, &self.name)?;
        *self.reserved.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
        Ok(())
    }

    /// Follows the remote's cluster config for as long as the session lives: read once at
    /// connect, a remote reinstalled under another mesh size while connected would keep being
    /// read with identity ranges that no longer hold. A different max-connected-clusters is
    /// refused with the connect-time error (status, hint, failure metric); any other change
    /// ends the session so the next one applies it (a new cluster ID drains first there).
    /// Either way only the session fails: the cache is untouched, so the last good state
    /// stays served, and every reconnect refuses again until the remote is fixed. A deleted
    /// config is left to the next connect (KVStoreMesh deletes a drained remote's config
    /// before its cache, and agents keep serving it until its file is removed).
    ///
    /// The watch is created once every resource is synced: watches are created one at a time
    /// on the shared stream, and 510 remotes' config watches queued before their resources'
    /// would delay readiness. Starting at the get's revision + 1 it misses nothing meanwhile.
    async fn watch_config(
        &self,
        conn: Arc<Conn>,
        key: String,
        accepted: ClusterConfig,
        revision: i64,
    ) -> Result<()> {
        while !self.shared.get().synced.all() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let opts = WatchOptions::new().with_start_revision(revision + 1);
        let mut watch = conn.watch(&key, opts).await?;
        let max = self.env.config.local.max_connected_clusters.as_u32();
        loop {
            let resp = conn.message(&mut watch, &key).await?;
            if resp.canceled() {
                return Err(canceled(&key, resp.cancel_reason()));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv().filter(|_| ev.event_type() == EventType::Put) else {
                    continue;
                };
                let remote = ClusterConfig::decode(kv.value())
                    .map_err(|e| Error::ConfigRefused(format!("{key}: {e}")))?;
                if remote == accepted {
                    continue;
                }
                check_mesh_size(max, &remote)?;
                info!(cluster = %self.name, "remote cluster config changed: reconnecting to apply it");
                return Err(Error::ConfigChanged { key });
            }
        }
    }

    async fn mark_synced(&self, r: Resource, token: &CancellationToken) {
        let mut all = false;
        self.shared.update(|s| {
            s.synced.set(r, true);
            all = s.synced.all();
        });
        if all {
            self.healthy.store(true, Ordering::SeqCst);
            info!(cluster = %self.name, "remote cluster synced");
        }
        self.emit(
            vec![Event::Synced {
                cluster: self.name.clone(),
                resource: r,
            }],
            token,
        )
        .await;
    }

    /// Canary wait, then the list → watch machine into the cache, emitting what changed;
    /// the machine relists by itself whenever the watch cannot go on from where it is
    /// (compacted start revision, or its consumer fell behind the shared stream).
    ///
    /// The etcd calls are boxed: their futures are several KiB each, and a task's size is
    /// that of its largest state, kept for as long as the task (the whole session) lives.
    async fn resource(
        self: Arc<Self>,
        conn: Arc<Conn>,
        ctx: Arc<Context>,
        r: Resource,
        cached: bool,
        canaries: bool,
        token: CancellationToken,
    ) -> Result<()> {
        if canaries {
            let key = r.synced_key(&self.name, cached);
            Box::pin(conn.wait_for_key(&key, self.env.read_permits.as_ref())).await?;
            debug!(%key, "synced canary present");
        }
        let prefix = r.watch_prefix(&self.name, cached);
        // KVStoreMesh mode: every list hits the one local etcd; listing all remotes at once
        // gains nothing and holds every remote's listed bytes at the same time.
        let mut watcher = Watcher::new(conn, prefix.as_str(), self.env.read_permits.clone());
        let mut reflector = Reflector::default();
        let store = self.cache.store(r);
        let mut first = true;
        loop {
            let event = Box::pin(watcher.next()).await?;
            let decode = |rel: &str, raw: &Bytes| match validate(&ctx, r, rel, raw) {
                Ok(v) => Some(v),
                Err(rej) => {
                    self.rejected(r, &prefix, rel, &rej);
                    None
                }
            };
            match reflector.apply(store, event, decode) {
                Step::Nothing => {}
                Step::Changed(rel, change) => {
                    let event = self.event(r, &prefix, &rel, change);
                    self.emit(vec![event], &token).await;
                }
                Step::Listed(changes) => {
                    let events = changes
                        .into_iter()
                        .map(|(rel, change)| self.event(r, &prefix, &rel, change))
                        .collect();
                    self.emit(events, &token).await;
                    if first {
                        first = false;
                        self.mark_synced(r, &token).await;
                    }
                }
            }
        }
    }

    fn rejected(&self, r: Resource, prefix: &str, rel: &str, rej: &Rejection) {
        let key = format!("{prefix}{rel}");
        self.env.metrics.reject(&self.name, rej.reason.as_str());
        let first = self
            .logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(rej.reason);
        if first {
            warn!(cluster = %self.name, resource = r.as_str(), %key, reason = rej.reason.as_str(),
                detail = %rej.detail, "rejected entry from remote cluster (further ones of this kind logged at debug)");
        } else {
            debug!(cluster = %self.name, resource = r.as_str(), %key, reason = rej.reason.as_str(),
                detail = %rej.detail, "rejected entry from remote cluster");
        }
    }

    fn event(&self, resource: Resource, prefix: &str, rel: &SmolStr, change: Change) -> Event {
        Event::Change {
            cluster: self.name.clone(),
            resource,
            key: format!("{prefix}{rel}"),
            change,
        }
    }

    async fn heartbeat(&self, conn: Arc<Conn>, revision: i64) -> Result<()> {
        let timeout = self.env.config.heartbeat_timeout;
        let opts = WatchOptions::new().with_start_revision(revision + 1);
        let mut watch = conn.watch(HEARTBEAT_KEY, opts).await?;
        let mut last = Instant::now();
        let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(50)));
        loop {
            tokio::select! {
                msg = conn.message(&mut watch, HEARTBEAT_KEY) => {
                    let resp = msg?;
                    if resp.canceled() {
                        return Err(canceled(HEARTBEAT_KEY, resp.cancel_reason()));
                    }
                    if resp.events().iter().any(|e| e.event_type() == EventType::Put) {
                        last = Instant::now();
                    }
                }
                _ = tick.tick() => {
                    if last.elapsed() > timeout {
                        return Err(Error::HeartbeatStale(last.elapsed()));
                    }
                }
            }
        }
    }
}

/// Refuses a remote whose max-connected-clusters differs from the local `max`.
fn check_mesh_size(max: u32, remote: &ClusterConfig) -> Result<()> {
    let theirs = remote.capabilities.max_connected_clusters;
    // An old remote omits the field (0 = 255); a 511 mesh needs it stated.
    if theirs != max && (max != 255 || theirs != 0) {
        let theirs = if theirs == 0 { 255 } else { theirs };
        return Err(Error::ConfigRefused(format!(
            "remote max-connected-clusters is {theirs}, local is {max}: every cluster of a mesh must use the same value \
             (it splits the 24 identity bits into cluster ID and cluster-local identity, so identities of one side \
             would be misread by the other); nothing of this remote is imported. Install the remote with \
             --max-connected-clusters {max}, or disconnect it; the value cannot change on a running cluster"
        )));
    }
    Ok(())
}

/// Whether resource `r` is read from a remote announcing `mode` (service v2). Both stores
/// hold the same backends: with [`ServiceBackends::Preferred`] a remote that writes both is
/// read from its EndpointSlices only, so a consumer never sees one service twice.
fn reads(policy: ServiceBackends, mode: EndpointSlicesExportMode, r: Resource) -> bool {
    match r {
        Resource::Services => {
            mode.exports_services()
                && !(policy == ServiceBackends::Preferred && mode.exports_endpoint_slices())
        }
        Resource::EndpointSlices => mode.exports_endpoint_slices(),
        _ => true,
    }
}

/// Whether `e` says the connection (rather than the remote's content) failed: in KVStoreMesh
/// mode the shared local connection is then replaced.
fn is_transport(e: &Error) -> bool {
    matches!(
        e,
        Error::Syncer(_)
            | Error::Read(
                watcher::Error::Syncer(_)
                    | watcher::Error::ClusterIdChanged { .. }
                    | watcher::Error::InvalidResponse { .. }
                    | watcher::Error::WatchEnded { .. }
            )
            | Error::HeartbeatStale(_)
    )
}

fn canceled(key: &str, reason: &str) -> Error {
    Error::Read(watcher::Error::WatchEnded {
        prefix: key.to_owned(),
        reason: format!("canceled: {reason}"),
    })
}

impl Env {
    async fn invalidate_local(&self) {
        // Every session of a KVStoreMesh reader fails together when the local etcd goes;
        // the first one drops the connection, the others find a fresh one (or none yet).
        let mut local = self.local.lock().await;
        *local = None;
    }
}

/// Resolves endpoint host names that `cilium-host-aliases` does not cover, so a typo shows
/// up as "cannot resolve" in status instead of a generic transport error.
async fn check_resolvable(cfg: &EtcdConfig) -> Result<()> {
    for e in &cfg.endpoints {
        let Ok((_, hp)) = crate::config::split_endpoint(e) else {
            continue;
        };
        let Some((host, _)) = crate::config::split_host_port(hp) else {
            continue;
        };
        if host.parse::<std::net::IpAddr>().is_ok()
            || cfg.host_aliases.iter().any(|a| a.hostname == host)
        {
            continue;
        }
        crate::resolve::lookup(host)
            .await
            .map_err(|source| Error::Resolve {
                host: host.to_owned(),
                source,
            })?;
    }
    Ok(())
}
