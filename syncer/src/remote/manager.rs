//! The remote-cluster manager: watches the config directory and runs one [`Remote`] task per
//! remote cluster file, publishes status and metrics.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument as _};

use super::cache::Caches;
use super::configured::{configured_remotes, RemoteFile};
use super::metrics::{ClusterLabels, SourceLabels};
use super::session::{Env, Remote};
use super::status::{Shared, Snapshot};
use super::{Config, Error, Event, Metrics, Resource, Result};

/// Lets writes of a config file settle (write + rename) before it is read.
const SETTLE: Duration = Duration::from_millis(100);
/// Status is republished at most this often during bursts of changes.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

struct Handle {
    remote: Arc<Remote>,
    hash: [u8; 32],
    token: CancellationToken,
    done: oneshot::Receiver<()>,
}

/// Reads every remote cluster named in the config directory; see the [module docs](super).
///
/// ```no_run
/// # async fn f(config: clustermesh_syncer::remote::Config) -> clustermesh_syncer::remote::Result<()> {
/// use clustermesh_syncer::remote::{Manager, Metrics, Event};
/// let (manager, mut events) = Manager::new(config, Metrics::default())?;
/// let status = manager.status();      // watch::Receiver<Snapshot>
/// let caches = manager.caches();      // typed per-remote caches
/// let token = tokio_util::sync::CancellationToken::new();
/// let run = tokio::spawn(manager.run(token.child_token()));
/// while let Some(ev) = events.recv().await {
///     if let Event::Change { cluster, key, change, .. } = ev { /* program maps */ }
/// }
/// # Ok(()) }
/// ```
pub struct Manager {
    env: Arc<Env>,
    caches: Caches,
    status_tx: watch::Sender<Snapshot>,
    changed: Arc<Notify>,
    remotes: Arc<Mutex<BTreeMap<Arc<str>, Arc<Remote>>>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("config_dir", &self.env.config.config_dir)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Validates `config` and returns the manager with the receiving end of its events.
    ///
    /// Events go through a **bounded `mpsc`**: they are work (program a map entry, mirror a
    /// key) that must not be lost, so a slow consumer slows the readers down instead of
    /// missing a delete, which a lagging `broadcast` receiver would. The caches and the
    /// status `watch` are there for readers that want state, not changes. Dropping the
    /// receiver is allowed: caches and status keep being maintained.
    pub fn new(config: Config, metrics: Metrics) -> Result<(Self, mpsc::Receiver<Event>)> {
        config.validate()?;
        let (tx, rx) = mpsc::channel(config.event_capacity);
        let (status_tx, _) = watch::channel(Snapshot::default());
        Ok((
            Self {
                env: Arc::new(Env::new(config, metrics, tx)),
                caches: Caches::default(),
                status_tx,
                changed: Arc::new(Notify::new()),
                remotes: Arc::default(),
            },
            rx,
        ))
    }

    /// Latest status of every remote.
    pub fn status(&self) -> watch::Receiver<Snapshot> {
        self.status_tx.subscribe()
    }

    /// The typed caches.
    pub fn caches(&self) -> Caches {
        self.caches.clone()
    }

    /// Runs until `token` is cancelled. Stopping never drains: last-known state belongs to
    /// whoever consumed it (an agent restart must not wipe the datapath).
    pub async fn run(self, token: CancellationToken) -> Result<()> {
        let dir = self.env.config.config_dir.clone();
        let dirty = Arc::new(Notify::new());
        let _watcher = {
            let dirty = dirty.clone();
            let mut w = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
                dirty.notify_one();
            })
            .map_err(|source| Error::Watch {
                path: dir.clone(),
                source,
            })?;
            // A missing directory is not fatal: the periodic rescan picks it up later.
            if let Err(error) = w.watch(&dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), %error, "cannot watch the remote cluster config directory; rescanning periodically");
            }
            w
        };
        let mut tasks: JoinSet<()> = JoinSet::new();
        {
            let publisher = Publisher {
                env: self.env.clone(),
                caches: self.caches.clone(),
                status_tx: self.status_tx.clone(),
                changed: self.changed.clone(),
                remotes: self.remotes.clone(),
            };
            let token = token.child_token();
            tasks.spawn(
                publisher
                    .run(token)
                    .instrument(tracing::info_span!("remote_status")),
            );
        }
        let mut handles: BTreeMap<Arc<str>, Handle> = BTreeMap::new();
        let mut tick = tokio::time::interval(self.env.config.rescan_interval);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = dirty.notified() => {
                    tokio::time::sleep(SETTLE).await;
                }
                _ = tick.tick() => {}
                Some(done) = tasks.join_next() => {
                    if let Err(e) = done {
                        error!(error = %e, "remote cluster task failed");
                    }
                    continue;
                }
            }
            self.reconcile(&mut handles, &mut tasks, &token).await;
        }
        for h in handles.values() {
            h.token.cancel();
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    async fn reconcile(
        &self,
        handles: &mut BTreeMap<Arc<str>, Handle>,
        tasks: &mut JoinSet<()>,
        token: &CancellationToken,
    ) {
        let found = configured_remotes(
            &self.env.config.config_dir,
            self.env.config.local.name.as_str(),
        );
        for r in &found.refused {
            warn!(file = %r.path.display(), reason = %r.reason, "ignoring remote cluster config");
        }
        let desired = found.remotes;
        let gone: Vec<Arc<str>> = handles
            .keys()
            .filter(|n| !desired.contains_key(&***n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(h) = handles.remove(&name) {
                info!(cluster = %name, "remote cluster config removed: draining its state");
                stop(h.token, h.done).await;
                h.remote.drain(token).await;
                let _ = self
                    .env
                    .events
                    .send(Event::Drained {
                        cluster: name.clone(),
                    })
                    .await;
                self.remotes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&name);
                self.caches.remove(&name);
                let labels = ClusterLabels {
                    source_cluster: self.env.config.local.name.to_string(),
                    target_cluster: name.to_string(),
                };
                let m = &self.env.metrics;
                for f in [&m.readiness, &m.failures, &m.nodes, &m.last_failure_ts] {
                    f.remove(&labels);
                }
                self.changed.notify_one();
            }
        }
        for (name, RemoteFile { path, digest: hash }) in desired {
            let shared = match handles.get(name.as_str()) {
                Some(h) if h.hash == hash => continue,
                Some(_) => {
                    let Some(h) = handles.remove(name.as_str()) else {
                        continue;
                    };
                    info!(cluster = %name, "remote cluster config changed: reconnecting");
                    stop(h.token, h.done).await;
                    h.remote.shared.clone()
                }
                None => {
                    info!(cluster = %name, "remote cluster config added");
                    Arc::new(Shared::new(&name, self.changed.clone()))
                }
            };
            let name: Arc<str> = name.into();
            let cache = self.caches.get_or_create(&name);
            let remote = Arc::new(Remote::new(
                name.clone(),
                path,
                shared,
                cache,
                self.env.clone(),
            ));
            // A restarted remote keeps its reserved ID and its "connected once" history.
            if let Some(old) = self
                .remotes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.clone(), remote.clone())
            {
                remote.inherit(&old);
            }
            let child = token.child_token();
            let (done_tx, done) = oneshot::channel();
            let span = tracing::info_span!("remote_cluster", cluster = %name);
            let (r, t) = (remote.clone(), child.clone());
            tasks.spawn(
                async move {
                    r.run(t).await;
                    drop(done_tx);
                }
                .instrument(span),
            );
            handles.insert(
                name,
                Handle {
                    remote,
                    hash,
                    token: child,
                    done,
                },
            );
            self.changed.notify_one();
        }
    }
}

async fn stop(token: CancellationToken, done: oneshot::Receiver<()>) {
    token.cancel();
    // The sender is dropped when the task ends.
    let _ = done.await;
}

struct Publisher {
    env: Arc<Env>,
    caches: Caches,
    status_tx: watch::Sender<Snapshot>,
    changed: Arc<Notify>,
    remotes: Arc<Mutex<BTreeMap<Arc<str>, Arc<Remote>>>>,
}

impl Publisher {
    async fn run(self, token: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tick.tick() => {}
            }
            self.publish();
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            }
        }
    }

    fn publish(&self) {
        let remotes: Vec<Arc<Remote>> = self
            .remotes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let cfg = &self.env.config;
        let source = cfg.local.name.to_string();
        let mut snap = Snapshot {
            ready: true,
            clusters: Vec::with_capacity(remotes.len()),
        };
        for r in &remotes {
            let mut s = r.shared.get();
            if let Some(counts) = self.caches.with(&r.name, |c| {
                [
                    c.len(Resource::Nodes),
                    c.len(Resource::Endpoints),
                    c.len(Resource::Identities),
                    c.len(Resource::Services),
                    c.len(Resource::ServiceExports),
                    c.len(Resource::EndpointSlices),
                ]
            }) {
                [
                    s.num_nodes,
                    s.num_endpoints,
                    s.num_identities,
                    s.num_shared_services,
                    s.num_service_exports,
                    s.num_endpoint_slices,
                ] = counts;
            }
            s.ready = s.connected && s.config.retrieved && s.synced.all();
            let timed_out = !r.ever_connected.load(Ordering::SeqCst)
                && r.shared.added.elapsed() > cfg.per_remote_ready_timeout;
            snap.ready &= s.ready || timed_out;
            let labels = ClusterLabels {
                source_cluster: source.clone(),
                target_cluster: s.name.clone(),
            };
            let m = &self.env.metrics;
            m.readiness.get_or_create(&labels).set(i64::from(s.ready));
            m.failures
                .get_or_create(&labels)
                .set(i64::try_from(s.num_failures).unwrap_or(i64::MAX));
            m.nodes
                .get_or_create(&labels)
                .set(i64::try_from(s.num_nodes).unwrap_or(i64::MAX));
            if let Some(t) = s.last_failure {
                let secs = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                m.last_failure_ts
                    .get_or_create(&labels)
                    .set(i64::try_from(secs).unwrap_or(i64::MAX));
            }
            snap.clusters.push(s);
        }
        self.env
            .metrics
            .remote_clusters
            .get_or_create(&SourceLabels {
                source_cluster: source,
            })
            .set(i64::try_from(remotes.len()).unwrap_or(i64::MAX));
        self.status_tx.send_if_modified(|old| {
            if *old == snap {
                false
            } else {
                *old = snap;
                true
            }
        });
    }
}
