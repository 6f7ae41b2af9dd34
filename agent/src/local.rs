//! Reader of the agent's own cluster from its local etcd (user `local-<c>`): each prefix runs
//! the syncer's list → watch machine ([`clustermesh_syncer::watcher`], the one the remote
//! sessions run) into a store of its own, over one connection whose watches share one watch
//! stream. The machine relists a prefix after compaction or when its watch falls behind; any
//! other failure reconnects with jittered exponential backoff and relists everything. A
//! relist emits upserts only for keys whose bytes changed and deletes for keys that
//! disappeared meanwhile (the stale sweep), so a reconnect to unchanged data changes nothing
//! downstream.
//!
//! Entries are validated like a remote's ([`validate`]) against the local cluster's name,
//! ID and identity range: the local etcd is written by our apiserver, but a bad entry must
//! still never reach a map. As for a remote, a bad value is counted (`num-rejected`) and
//! the last good one stays. ipcache entries feed the reconciler; the local services and
//! the local cluster's service exports go to the services loop ([`Reader::with_services`]);
//! identities and the local policies (`clustermesh/local/v1/policies/`, not validated here:
//! the policy engine parses them) go as inputs to the policy hook
//! ([`crate::policy::hook`]); nodes go as inputs to the node table ([`crate::nodes`]).
//!
//! **Synced canaries.** Each prefix has the canary its apiserver writes after a full pass
//! ([`Prefix::canary`]). Once a reader has seen a prefix's canary, a later session lists
//! that prefix only when the canary is there again: an etcd that comes back without it
//! (wiped, restored from an old snapshot, a new member with no data) has lost what the
//! apiserver wrote, and listing it would withdraw the cluster's own endpoints from the maps
//! until the apiserver's refill. The remote sessions wait for their canaries the same way.
//! A writer that never writes canaries (tests that fill etcd by hand) is read as before.
//!
//! It never writes to etcd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use clustermesh_syncer::remote::validate::{validate, Context};
use clustermesh_syncer::remote::{Backoff, Resource, Value};
use clustermesh_syncer::watcher::{self, Change, Conn, Reflector, Step, Store, Watcher};
use clustermesh_syncer::{ConnectConfig, EtcdConfig};
use clustermesh_types::cluster::ClusterInfo;
use clustermesh_types::kvstore;
use clustermesh_types::model::SmolStr;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

use crate::input::Input;
use crate::services;

/// The prefixes read from the local etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prefix {
    /// `cilium/state/ip/v1/default/`.
    Endpoints,
    /// `cilium/state/nodes/v1/<c>/`.
    Nodes,
    /// `cilium/state/identities/v1/id/`.
    Identities,
    /// `clustermesh/local/v1/services/`.
    Services,
    /// `cilium/state/serviceexports/v1/<c>/`.
    ServiceExports,
    /// `clustermesh/local/v1/policies/` (`<kind>/<ns>/<name>` → the policy as JSON; parsed
    /// by the policy engine, not validated here).
    Policies,
}

impl Prefix {
    /// Every prefix.
    pub const ALL: [Prefix; 6] = [
        Prefix::Identities,
        Prefix::Nodes,
        Prefix::Endpoints,
        Prefix::Services,
        Prefix::ServiceExports,
        Prefix::Policies,
    ];

    /// The etcd prefix for cluster `cluster`.
    pub fn key(self, cluster: &str) -> String {
        match self {
            Prefix::Endpoints => "cilium/state/ip/v1/default/".into(),
            Prefix::Nodes => format!("cilium/state/nodes/v1/{cluster}/"),
            Prefix::Identities => "cilium/state/identities/v1/id/".into(),
            Prefix::Services => "clustermesh/local/v1/services/".into(),
            Prefix::ServiceExports => format!("cilium/state/serviceexports/v1/{cluster}/"),
            Prefix::Policies => "clustermesh/local/v1/policies/".into(),
        }
    }

    /// The synced canary the apiserver writes once its full pass of this prefix is written.
    pub fn canary(self, cluster: &str) -> String {
        match self {
            Prefix::Endpoints => kvstore::synced_key(cluster, kvstore::IP_PREFIX),
            Prefix::Nodes => kvstore::synced_key(cluster, kvstore::NODES_PREFIX),
            Prefix::Identities => kvstore::synced_key(cluster, kvstore::IDENTITIES_PREFIX),
            Prefix::Services => kvstore::LOCAL_SERVICES_SYNCED.into(),
            Prefix::ServiceExports => kvstore::synced_key(cluster, kvstore::SERVICE_EXPORTS_PREFIX),
            Prefix::Policies => kvstore::LOCAL_POLICIES_SYNCED.into(),
        }
    }

    fn resource(self) -> Option<Resource> {
        Some(match self {
            Prefix::Endpoints => Resource::Endpoints,
            Prefix::Nodes => Resource::Nodes,
            Prefix::Identities => Resource::Identities,
            Prefix::Services => Resource::Services,
            Prefix::ServiceExports => Resource::ServiceExports,
            Prefix::Policies => return None,
        })
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Settings of the local reader.
#[derive(Debug, Clone)]
pub struct Config {
    /// The local cluster.
    pub cluster: ClusterInfo,
    /// Client config of the local etcd.
    pub etcd: EtcdConfig,
    /// Connect timeout and keepalives.
    pub connect: ConnectConfig,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
}

/// Status of the local reader (`/status` → `local`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// The cluster.
    pub name: String,
    /// A session is up.
    pub connected: bool,
    /// Every prefix listed in the current session.
    pub ready: bool,
    /// What is happening, or the last failure.
    pub status: String,
    /// Failed sessions.
    pub num_failures: u64,
    /// When the last session failed (RFC 3339).
    pub last_failure: Option<String>,
    /// ipcache entries cached.
    pub num_endpoints: usize,
    /// Nodes cached.
    pub num_nodes: usize,
    /// Identities cached.
    pub num_identities: usize,
    /// Local services cached.
    pub num_services: usize,
    /// Entries refused by validation.
    pub num_rejected: u64,
    /// Listed in the current session: endpoints, nodes, identities, services.
    pub synced: Synced,
}

/// Per-prefix initial sync flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Synced {
    /// ipcache.
    pub endpoints: bool,
    /// Nodes.
    pub nodes: bool,
    /// Identities.
    pub identities: bool,
    /// Local services.
    pub services: bool,
    /// The local cluster's service exports.
    pub service_exports: bool,
    /// Local policies.
    pub policies: bool,
}

impl Synced {
    fn set(&mut self, p: Prefix, v: bool) {
        match p {
            Prefix::Endpoints => self.endpoints = v,
            Prefix::Nodes => self.nodes = v,
            Prefix::Identities => self.identities = v,
            Prefix::Services => self.services = v,
            Prefix::ServiceExports => self.service_exports = v,
            Prefix::Policies => self.policies = v,
        }
    }

    fn all(&self) -> bool {
        self.endpoints
            && self.nodes
            && self.identities
            && self.services
            && self.service_exports
            && self.policies
    }
}

/// Errors of one session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to etcd failed.
    #[error(transparent)]
    Syncer(#[from] clustermesh_syncer::Error),
    /// Reading etcd failed (the connection, the etcd behind it, a watch).
    #[error(transparent)]
    Read(#[from] watcher::Error),
    /// A prefix's task stopped unexpectedly.
    #[error("reader task failed: {0}")]
    Task(String),
    /// The consumer is gone.
    #[error("the reconciler stopped")]
    Closed,
}

/// What one step of a prefix hands on: inputs for the reconcile loop and for the services.
#[derive(Default)]
struct Out {
    inputs: Vec<Input>,
    services: Vec<services::LocalInput>,
}

/// The local cluster reader; see the module docs.
pub struct Reader {
    config: Config,
    ctx: Context,
    name: Arc<str>,
    tx: mpsc::Sender<Input>,
    status: watch::Sender<Status>,
    /// Validated values of every prefix but the policies, indexed by [`Prefix::index`].
    stores: [Store<Value>; 5],
    /// The policies, as stored (the policy engine parses them).
    policies: Store<Bytes>,
    services: Option<mpsc::Sender<services::LocalInput>>,
    /// Per prefix ([`Prefix::index`]): its canary was seen by some session.
    canary_seen: [AtomicBool; 6],
}

impl Reader {
    /// The reader and its status channel. Inputs (ipcache changes and the endpoints'
    /// initial sync) go to `tx`.
    pub fn new(config: Config, tx: mpsc::Sender<Input>) -> (Self, watch::Receiver<Status>) {
        let ctx = Context {
            cluster: config.cluster.name.as_str().to_owned(),
            cluster_id: config.cluster.id,
            range: config.cluster.identity_range(),
            // Our own apiserver already left out what is outside our CIDRs.
            cidrs: Default::default(),
        };
        let (status, rx) = watch::channel(Status {
            name: ctx.cluster.clone(),
            status: "connecting".into(),
            ..Status::default()
        });
        (
            Self {
                name: Arc::from(ctx.cluster.as_str()),
                config,
                ctx,
                tx,
                status,
                stores: Default::default(),
                policies: Store::default(),
                services: None,
                canary_seen: Default::default(),
            },
            rx,
        )
    }

    /// Also sends the local services and service exports (and [`services::LocalInput::Listed`]
    /// after each list of the services) to `tx`.
    pub fn with_services(mut self, tx: mpsc::Sender<services::LocalInput>) -> Self {
        self.services = Some(tx);
        self
    }

    /// Runs sessions until `token` is cancelled.
    pub async fn run(self, token: CancellationToken) {
        let me = Arc::new(self);
        let mut backoff = Backoff::new(me.config.backoff_min, me.config.backoff_max);
        loop {
            let session = token.child_token();
            let result = tokio::select! {
                r = me.clone().session(session.clone()) => r,
                _ = token.cancelled() => return,
            };
            session.cancel();
            if token.is_cancelled() {
                return;
            }
            let error = match result {
                Ok(()) => return,
                Err(Error::Closed) => return,
                Err(e) => e,
            };
            // A session that got as far as a full sync was healthy: start over at the
            // shortest delay.
            if me.status.borrow().ready {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(%error, retry_in = ?delay, "local etcd session failed");
            me.status.send_modify(|s| {
                s.connected = false;
                s.ready = false;
                s.synced = Synced::default();
                s.num_failures += 1;
                s.last_failure = Some(clustermesh_types::model::format_rfc3339(SystemTime::now()));
                s.status = format!("{error}");
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = token.cancelled() => return,
            }
        }
    }

    async fn session(self: Arc<Self>, token: CancellationToken) -> Result<(), Error> {
        let client = clustermesh_syncer::connect(&self.config.etcd, &self.config.connect).await?;
        info!("connected to the local etcd");
        self.status.send_modify(|s| {
            s.connected = true;
            s.status = "connected, listing".into();
        });
        // One watch stream for every prefix of the session.
        let conn = Conn::new(client);
        let mut tasks = JoinSet::new();
        for p in Prefix::ALL {
            let me = self.clone();
            let (c, t) = (conn.clone(), token.clone());
            let span = tracing::info_span!("local_prefix", prefix = ?p);
            tasks.spawn(async move { me.prefix(c, p, t).await }.instrument(span));
            if !self.canary_seen[p.index()].load(Ordering::Relaxed) {
                // Learns that this etcd's writer writes the canary (see the module docs).
                let me = self.clone();
                let (conn, token) = (conn.clone(), token.clone());
                tasks.spawn(async move {
                    let canary = p.canary(&me.ctx.cluster);
                    tokio::select! {
                        r = conn.wait_for_key(&canary, None) => r?,
                        _ = token.cancelled() => return Ok(()),
                    }
                    me.canary_seen[p.index()].store(true, Ordering::Relaxed);
                    Ok(())
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(Error::Task(e.to_string())),
            }
        }
        Ok(())
    }

    /// Runs the list → watch machine of prefix `p` until `token` is cancelled.
    async fn prefix(
        &self,
        conn: Arc<Conn>,
        p: Prefix,
        token: CancellationToken,
    ) -> Result<(), Error> {
        let canary = p.canary(&self.ctx.cluster);
        if self.canary_seen[p.index()].load(Ordering::Relaxed) && !conn.exists(&canary).await? {
            warn!(%canary, "the local etcd lost its synced canary (wiped or restored?): keeping the entries until its apiserver has written them again");
            self.status.send_modify(|s| {
                s.status = format!(
                    "waiting for {canary}: the local etcd has lost what its apiserver wrote (wiped or restored?); entries are kept until the apiserver writes them again"
                );
            });
            tokio::select! {
                r = conn.wait_for_key(&canary, None) => r?,
                _ = token.cancelled() => return Ok(()),
            }
            info!(%canary, "synced canary back; relisting");
        }
        let watcher = Watcher::new(conn, p.key(&self.ctx.cluster), None);
        match p.resource() {
            Some(resource) => {
                let decode = |rel: &str, raw: &Bytes| self.validated(resource, rel, raw);
                let store = &self.stores[p.index()];
                self.reflect(p, watcher, store, decode, Self::value_input, &token)
                    .await
            }
            // Policies are not validated here: the engine parses them and keeps a policy
            // that fails out of the maps.
            None => {
                let decode = |_: &str, raw: &Bytes| Some(raw.clone());
                self.reflect(
                    p,
                    watcher,
                    &self.policies,
                    decode,
                    Self::policy_input,
                    &token,
                )
                .await
            }
        }
    }

    /// Applies the machine's events to `store` and hands what changed on as inputs.
    async fn reflect<V: Clone>(
        &self,
        p: Prefix,
        mut watcher: Watcher,
        store: &Store<V>,
        decode: impl Fn(&str, &Bytes) -> Option<V>,
        input: fn(&Self, Prefix, SmolStr, Change<V>, &mut Out),
        token: &CancellationToken,
    ) -> Result<(), Error> {
        let mut reflector = Reflector::default();
        loop {
            let event = tokio::select! {
                e = watcher.next() => e?,
                _ = token.cancelled() => return Ok(()),
            };
            let mut out = Out::default();
            match reflector.apply(store, event, &decode) {
                Step::Nothing => continue,
                Step::Changed(rel, change) => input(self, p, rel, change, &mut out),
                Step::Listed(changes) => {
                    for (rel, change) in changes {
                        input(self, p, rel, change, &mut out);
                    }
                    match p {
                        Prefix::Endpoints => out.inputs.push(Input::Synced {
                            cluster: self.name.clone(),
                        }),
                        Prefix::Services => out.services.push(services::LocalInput::Listed),
                        _ => {}
                    }
                    self.status.send_modify(|s| {
                        s.synced.set(p, true);
                        s.ready = s.synced.all();
                        if s.ready {
                            s.status = "synced".into();
                        }
                    });
                }
            }
            self.count();
            self.send(out, token).await?;
        }
    }

    fn validated(&self, resource: Resource, rel: &str, raw: &[u8]) -> Option<Value> {
        match validate(&self.ctx, resource, rel, raw) {
            Ok(v) => Some(v),
            Err(rej) => {
                warn!(key = %rel, reason = rej.reason.as_str(), detail = %rej.detail, "local entry rejected; the last good value stays");
                self.status.send_modify(|s| s.num_rejected += 1);
                None
            }
        }
    }

    /// The inputs for a validated value's change under prefix `p`.
    fn value_input(&self, p: Prefix, rel: SmolStr, change: Change<Value>, out: &mut Out) {
        let cluster = self.name.clone();
        let (value, raw) = match change {
            Change::Upsert { raw, value } => (value, Some(raw)),
            Change::Delete { last } => (last, None),
        };
        let present = raw.is_some();
        match (p, value) {
            (Prefix::Endpoints, Value::Endpoint(entry)) => out.inputs.push(Input::Endpoint {
                cluster,
                prefix: entry.prefix,
                entry: present.then_some(entry),
            }),
            (Prefix::Nodes, Value::Node(node)) => out.inputs.push(Input::Node {
                cluster,
                name: Arc::from(rel.as_str()),
                node: present.then_some(node),
            }),
            (Prefix::Identities, Value::Identity(identity)) => out.inputs.push(Input::Identity {
                cluster,
                id: identity.id,
                labels: present.then_some(identity),
            }),
            (Prefix::Services, _) => out.services.push(services::LocalInput::Service {
                rel: rel.to_string(),
                raw: raw.map(|r| r.to_vec()),
            }),
            (Prefix::ServiceExports, Value::ServiceExport(e)) => {
                out.services.push(services::LocalInput::Export {
                    name: services::Name::new(&e.namespace, &e.name),
                    export: present.then_some(e),
                })
            }
            _ => {}
        }
    }

    /// The input for a policy's change.
    fn policy_input(&self, _: Prefix, rel: SmolStr, change: Change<Bytes>, out: &mut Out) {
        out.inputs.push(Input::Policy {
            key: rel.to_string(),
            raw: match change {
                Change::Upsert { raw, .. } => Some(raw.to_vec()),
                Change::Delete { .. } => None,
            },
        });
    }

    fn count(&self) {
        let n = |p: Prefix| self.stores[p.index()].len();
        let (e, no, i, se) = (
            n(Prefix::Endpoints),
            n(Prefix::Nodes),
            n(Prefix::Identities),
            n(Prefix::Services),
        );
        self.status.send_if_modified(|s| {
            let new = (e, no, i, se);
            let old = (
                s.num_endpoints,
                s.num_nodes,
                s.num_identities,
                s.num_services,
            );
            (
                s.num_endpoints,
                s.num_nodes,
                s.num_identities,
                s.num_services,
            ) = new;
            old != new
        });
    }

    /// Sends the reconcile loop's inputs, then the services'. Cancellation ends it quietly.
    async fn send(&self, out: Out, token: &CancellationToken) -> Result<(), Error> {
        for input in out.inputs {
            tokio::select! {
                r = self.tx.send(input) => r.map_err(|_| Error::Closed)?,
                _ = token.cancelled() => return Ok(()),
            }
        }
        let Some(tx) = &self.services else {
            return Ok(());
        };
        for input in out.services {
            tokio::select! {
                r = tx.send(input) => r.map_err(|_| Error::Closed)?,
                _ = token.cancelled() => return Ok(()),
            }
        }
        Ok(())
    }
}
