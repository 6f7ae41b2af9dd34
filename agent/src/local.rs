//! Reader of the agent's own cluster from its local etcd (user `local-<c>`): list each
//! prefix, then watch it from the list's revision + 1, into a small cache of raw values; on
//! compaction relist that prefix, on any other failure reconnect with jittered exponential
//! backoff and relist everything. A relist emits upserts only for keys whose bytes changed
//! and deletes for keys that disappeared meanwhile (the stale sweep), so a reconnect to
//! unchanged data changes nothing downstream.
//!
//! Entries are validated like a remote's ([`validate`]) against the local cluster's name,
//! ID and identity range: the local etcd is written by our apiserver, but a bad entry must
//! still never reach a map. ipcache entries feed the reconciler; the local services and
//! the local cluster's service exports go to the services loop ([`Reader::with_services`]);
//! identities and the local policies (`clustermesh/local/v1/policies/`, not validated here:
//! the policy engine parses them) go as inputs to the policy hook
//! ([`crate::policy::hook`]); nodes are counted for status.
//!
//! It never writes to etcd.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use clustermesh_syncer::etcd_client::{Client, EventType, WatchOptions};
use clustermesh_syncer::remote::validate::{validate, Context};
use clustermesh_syncer::remote::{Backoff, Resource, Value};
use clustermesh_syncer::{ConnectConfig, EtcdConfig};
use clustermesh_types::cluster::ClusterInfo;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

use crate::reconcile::Input;
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
    /// etcd failed.
    #[error(transparent)]
    Syncer(#[from] clustermesh_syncer::Error),
    /// A watch ended or was cancelled by the server.
    #[error("watch of {prefix} ended: {reason}")]
    WatchEnded {
        /// The prefix.
        prefix: String,
        /// Why.
        reason: String,
    },
    /// The consumer is gone.
    #[error("the reconciler stopped")]
    Closed,
}

/// Raw values per prefix, keyed by the key relative to the prefix.
type Cache = HashMap<String, Vec<u8>>;

/// Service inputs of one batch (see [`Reader::with_services`]).
type ServiceOut = Vec<services::LocalInput>;

/// The local cluster reader; see the module docs.
pub struct Reader {
    config: Config,
    ctx: Context,
    tx: mpsc::Sender<Input>,
    status: watch::Sender<Status>,
    caches: Mutex<[Cache; Prefix::ALL.len()]>,
    services: Option<mpsc::Sender<services::LocalInput>>,
}

enum WatchEnd {
    Cancelled,
    Compacted,
}

impl Reader {
    /// The reader and its status channel. Inputs (ipcache changes and the endpoints'
    /// initial sync) go to `tx`.
    pub fn new(config: Config, tx: mpsc::Sender<Input>) -> (Self, watch::Receiver<Status>) {
        let ctx = Context {
            cluster: config.cluster.name.as_str().to_owned(),
            cluster_id: config.cluster.id,
            range: config.cluster.identity_range(),
        };
        let (status, rx) = watch::channel(Status {
            name: ctx.cluster.clone(),
            status: "connecting".into(),
            ..Status::default()
        });
        (
            Self {
                config,
                ctx,
                tx,
                status,
                caches: Mutex::new(Default::default()),
                services: None,
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
        let mut tasks = JoinSet::new();
        for p in Prefix::ALL {
            let me = self.clone();
            let (client, token) = (client.clone(), token.clone());
            let span = tracing::info_span!("local_prefix", prefix = ?p);
            tasks.spawn(async move { me.prefix(client, p, token).await }.instrument(span));
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(Error::WatchEnded {
                        prefix: "(task)".into(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    async fn prefix(
        &self,
        client: Client,
        p: Prefix,
        token: CancellationToken,
    ) -> Result<(), Error> {
        let prefix = p.key(&self.ctx.cluster);
        loop {
            let (kvs, revision) = clustermesh_syncer::list::list_prefix(&client, &prefix).await?;
            let listed: Vec<(String, Vec<u8>)> = kvs
                .into_iter()
                .filter_map(|kv| {
                    let rel = kv.key.strip_prefix(&prefix)?.to_owned();
                    (!rel.is_empty()).then_some((rel, kv.value))
                })
                .collect();
            self.apply_list(p, &prefix, listed, &token).await?;
            self.status.send_modify(|s| {
                s.synced.set(p, true);
                s.ready = s.synced.all();
                if s.ready {
                    s.status = "synced".into();
                }
            });
            debug!(%prefix, revision, "listed");
            match self
                .watch(&client, p, &prefix, revision + 1, &token)
                .await?
            {
                WatchEnd::Cancelled => return Ok(()),
                WatchEnd::Compacted => {
                    info!(%prefix, "watch start revision compacted: relisting");
                }
            }
        }
    }

    fn validated(&self, p: Prefix, rel: &str, raw: &[u8]) -> Option<Value> {
        // Policies never get here: the policy engine parses them (see `policy_change`).
        let resource = p.resource()?;
        match validate(&self.ctx, resource, rel, raw) {
            Ok(v) => Some(v),
            Err(rej) => {
                warn!(key = %rel, reason = rej.reason.as_str(), detail = %rej.detail, "local entry rejected");
                self.status.send_modify(|s| s.num_rejected += 1);
                None
            }
        }
    }

    /// Applies a full list: changed keys are upserted, missing ones deleted.
    async fn apply_list(
        &self,
        p: Prefix,
        prefix: &str,
        listed: Vec<(String, Vec<u8>)>,
        token: &CancellationToken,
    ) -> Result<(), Error> {
        if p == Prefix::Policies {
            return self.apply_policies(listed, token).await;
        }
        let mut out = Vec::new();
        let mut svc: ServiceOut = Vec::new();
        {
            let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
            let cache = &mut caches[p.index()];
            let mut seen = std::collections::HashSet::with_capacity(listed.len());
            for (rel, raw) in listed {
                seen.insert(rel.clone());
                if cache.get(&rel) == Some(&raw) {
                    continue;
                }
                match self.validated(p, &rel, &raw) {
                    Some(v) => {
                        svc.extend(service_input(p, &rel, Some((&v, &raw))));
                        out.push(self.upsert(p, prefix, &rel, v));
                        cache.insert(rel, raw);
                    }
                    None => {
                        if cache.remove(&rel).is_some() {
                            svc.extend(service_input(p, &rel, None));
                            out.push(self.delete(p, prefix, &rel));
                        }
                    }
                }
            }
            let stale: Vec<String> = cache
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for rel in stale {
                cache.remove(&rel);
                svc.extend(service_input(p, &rel, None));
                out.push(self.delete(p, prefix, &rel));
            }
        }
        self.count();
        if p == Prefix::Endpoints {
            out.push(Some(Input::Synced {
                cluster: self.name(),
            }));
        }
        if p == Prefix::Services {
            svc.push(services::LocalInput::Listed);
        }
        self.send(out, token).await?;
        self.send_services(svc, token).await
    }

    fn name(&self) -> Arc<str> {
        Arc::from(self.ctx.cluster.as_str())
    }

    /// Applies a full list of the policies prefix (see [`policy_change`]).
    async fn apply_policies(
        &self,
        listed: Vec<(String, Vec<u8>)>,
        token: &CancellationToken,
    ) -> Result<(), Error> {
        let mut out = Vec::new();
        {
            let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
            let cache = &mut caches[Prefix::Policies.index()];
            let seen: std::collections::HashSet<String> =
                listed.iter().map(|(k, _)| k.clone()).collect();
            for (rel, raw) in &listed {
                out.push(policy_change(cache, rel, Some(raw)));
            }
            let stale: Vec<String> = cache
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for rel in stale {
                out.push(policy_change(cache, &rel, None));
            }
        }
        self.send(out, token).await
    }

    fn upsert(&self, p: Prefix, prefix: &str, rel: &str, v: Value) -> Option<Input> {
        match (p, v) {
            (Prefix::Identities, Value::Identity(labels)) => Some(Input::Identity {
                cluster: self.name(),
                id: rel.parse().ok()?,
                labels: Some(labels),
            }),
            (Prefix::Endpoints, Value::Endpoint(pair)) => Some(Input::Endpoint {
                cluster: self.name(),
                key: format!("{prefix}{rel}"),
                pair: Some(pair),
            }),
            _ => None,
        }
    }

    fn delete(&self, p: Prefix, prefix: &str, rel: &str) -> Option<Input> {
        if p == Prefix::Identities {
            return Some(Input::Identity {
                cluster: self.name(),
                id: rel.parse().ok()?,
                labels: None,
            });
        }
        (p == Prefix::Endpoints).then(|| Input::Endpoint {
            cluster: self.name(),
            key: format!("{prefix}{rel}"),
            pair: None,
        })
    }

    fn count(&self) {
        let caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        let n = |p: Prefix| caches[p.index()].len();
        let (e, no, i, se) = (
            n(Prefix::Endpoints),
            n(Prefix::Nodes),
            n(Prefix::Identities),
            n(Prefix::Services),
        );
        drop(caches);
        self.status.send_modify(|s| {
            s.num_endpoints = e;
            s.num_nodes = no;
            s.num_identities = i;
            s.num_services = se;
        });
    }

    async fn send(
        &self,
        inputs: Vec<Option<Input>>,
        token: &CancellationToken,
    ) -> Result<(), Error> {
        for input in inputs.into_iter().flatten() {
            tokio::select! {
                r = self.tx.send(input) => r.map_err(|_| Error::Closed)?,
                _ = token.cancelled() => return Ok(()),
            }
        }
        Ok(())
    }

    async fn send_services(
        &self,
        inputs: ServiceOut,
        token: &CancellationToken,
    ) -> Result<(), Error> {
        let Some(tx) = &self.services else {
            return Ok(());
        };
        for input in inputs {
            tokio::select! {
                r = tx.send(input) => r.map_err(|_| Error::Closed)?,
                _ = token.cancelled() => return Ok(()),
            }
        }
        Ok(())
    }

    async fn watch(
        &self,
        client: &Client,
        p: Prefix,
        prefix: &str,
        start: i64,
        token: &CancellationToken,
    ) -> Result<WatchEnd, Error> {
        let etcd = |source| {
            Error::Syncer(clustermesh_syncer::Error::Etcd {
                op: "watch",
                key: prefix.to_owned(),
                source,
            })
        };
        let mut wc = client
            .watch_client()
            .max_decoding_message_size(clustermesh_syncer::client::MAX_MESSAGE_BYTES);
        let opts = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut stream = wc.watch(prefix, Some(opts)).await.map_err(etcd)?;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m.map_err(etcd)?,
                _ = token.cancelled() => return Ok(WatchEnd::Cancelled),
            };
            let resp = msg.ok_or_else(|| Error::WatchEnded {
                prefix: prefix.to_owned(),
                reason: "stream closed by the server".into(),
            })?;
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Ok(WatchEnd::Compacted);
                }
                return Err(Error::WatchEnded {
                    prefix: prefix.to_owned(),
                    reason: format!("canceled: {}", resp.cancel_reason()),
                });
            }
            let mut out = Vec::new();
            let mut svc: ServiceOut = Vec::new();
            {
                let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
                let cache = &mut caches[p.index()];
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(rel) = std::str::from_utf8(kv.key())
                        .ok()
                        .and_then(|k| k.strip_prefix(prefix))
                        .filter(|r| !r.is_empty())
                    else {
                        continue;
                    };
                    if p == Prefix::Policies {
                        let put = (ev.event_type() == EventType::Put).then(|| kv.value());
                        out.push(policy_change(cache, rel, put));
                        continue;
                    }
                    match ev.event_type() {
                        EventType::Put => {
                            if cache.get(rel).map(Vec::as_slice) == Some(kv.value()) {
                                continue;
                            }
                            match self.validated(p, rel, kv.value()) {
                                Some(v) => {
                                    svc.extend(service_input(p, rel, Some((&v, kv.value()))));
                                    out.push(self.upsert(p, prefix, rel, v));
                                    cache.insert(rel.to_owned(), kv.value().to_vec());
                                }
                                // A bad new value replaces a good one: unprogram it.
                                None => {
                                    if cache.remove(rel).is_some() {
                                        svc.extend(service_input(p, rel, None));
                                        out.push(self.delete(p, prefix, rel));
                                    }
                                }
                            }
                        }
                        EventType::Delete => {
                            if cache.remove(rel).is_some() {
                                svc.extend(service_input(p, rel, None));
                                out.push(self.delete(p, prefix, rel));
                            }
                        }
                    }
                }
            }
            self.count();
            self.send(out, token).await?;
            self.send_services(svc, token).await?;
        }
    }
}

/// The services module's view of a local change under the services or exports prefix
/// (`value: None` = deleted); other prefixes have none.
fn service_input(
    p: Prefix,
    rel: &str,
    value: Option<(&Value, &[u8])>,
) -> Option<services::LocalInput> {
    match (p, value) {
        (Prefix::Services, v) => Some(services::LocalInput::Service {
            rel: rel.to_owned(),
            raw: v.map(|(_, raw)| raw.to_vec()),
        }),
        (Prefix::ServiceExports, Some((Value::ServiceExport(e), _))) => {
            Some(services::LocalInput::Export {
                name: services::Name::new(&e.namespace, &e.name),
                export: Some(e.clone()),
            })
        }
        (Prefix::ServiceExports, None) => services::Name::from_key_suffix(rel)
            .map(|name| services::LocalInput::Export { name, export: None }),
        _ => None,
    }
}

/// A policy key's change (`put: None` = deleted) against the cache: the input for the policy
/// engine, or `None` if nothing changed. Values are not validated here: the engine parses
/// them and keeps a policy that fails out of the maps.
fn policy_change(cache: &mut Cache, rel: &str, put: Option<&[u8]>) -> Option<Input> {
    match put {
        Some(raw) => {
            if cache.get(rel).map(Vec::as_slice) == Some(raw) {
                return None;
            }
            cache.insert(rel.to_owned(), raw.to_vec());
            Some(Input::Policy {
                key: rel.to_owned(),
                raw: Some(raw.to_vec()),
            })
        }
        None => cache.remove(rel).map(|_| Input::Policy {
            key: rel.to_owned(),
            raw: None,
        }),
    }
}
