//! The Kubernetes API source: one kube-rs `watcher` + `reflector` per resource of
//! [`resources::RESOURCES`], publishing the same [`Published`] snapshots the manifest source
//! does, so the exporter cannot tell them apart.
//!
//! What it promises, and why:
//! - **Never a half-listed cluster.** The first snapshot is published only after every
//!   watched resource's first `InitDone` (a forbidden resource does not hold it back: it
//!   contributes nothing, and `/status` names the rule to add). A remote cluster deletes what
//!   it does not see, so exporting before that would withdraw live endpoints.
//! - **Keep serving on outage.** When the Kubernetes API is unreachable, the reflector stores
//!   keep their objects, nothing is republished, the exported keys and their leases stay;
//!   `/readyz` turns false and `/status` / `cilium_clustermesh_apiserver_kubernetes_connected`
//!   say so. After reconnecting, kube-rs relists and the reflector swaps the new list in
//!   atomically; the export's diff writes only what changed.
//! - **410 Gone → relist**, done by kube-rs' watcher; unchanged objects produce no etcd
//!   write because the exporter diffs against what etcd holds.
//! - **Bad objects are skipped, not fatal.** kube-rs reads each object as a [`RawObject`]
//!   (kind, metadata and its JSON text), which is then decoded straight into the exporter's
//!   own types; one that does not fit (a wrong type in a field, a foreign kind in a list) is
//!   kept out of the snapshot and counted per resource. (Decoding into k8s-openapi types
//!   would fail the whole list instead.)
//! - **CRDs are detected**, as Cilium does, from a metadata-only list/watch of
//!   CustomResourceDefinitions: a CRD that appears later gets its watch without a restart; a
//!   CRD that goes away stops its watch and its objects leave the snapshot.
//!
//! - **One event, one object.** A watch event replaces (or removes) its object in the last
//!   published snapshot instead of rebuilding it from every store; only a completed list
//!   (first list, relist after 410 or an outage) or a CRD change rebuilds it, and the
//!   exporter then diffs it (`export::incremental`).
//!
//! It must not write to the Kubernetes API, and it does not export: it only fills snapshots.

/// Where the client comes from (kubeconfig + context, or in-cluster).
pub use clustermesh_k8s::client::ClientConfig;
/// The watched resources and the RBAC rules, shared with the deploy objects.
pub use clustermesh_k8s::resources;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::{ApiResource, PartialObjectMeta};
use kube::runtime::reflector::{self, store::Writer, Lookup, Store};
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::manifests::Published;
use super::{Object, Snapshot};
use crate::health::Status;
use resources::{Resource, CRDS, RESOURCES};

/// Settings of the source.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch ServiceExports.
    pub enable_mcs_api: bool,
    /// How long to let a burst of changes gather before publishing a snapshot.
    pub coalesce: Duration,
    /// Longest pause between retries of a failing watch (jittered exponential from 200 ms).
    pub max_backoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            enable_mcs_api: false,
            coalesce: Duration::from_millis(5),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What `/status` says about the source (`kubernetes` in the report).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    /// Every watched resource has listed once (the first export may happen).
    pub synced: bool,
    /// The API server answers (false during an outage; the last export is kept).
    pub connected: bool,
    /// The last connection error, while not connected.
    pub last_error: Option<String>,
    /// Resources being watched (`plural.group`).
    pub watching: Vec<String>,
    /// Resources still waiting for their first list.
    pub waiting_for: Vec<String>,
    /// Forbidden resources, each with the ClusterRole rule to add.
    pub forbidden: Vec<String>,
    /// Objects skipped because they could not be decoded, per resource.
    pub undecodable: BTreeMap<String, usize>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: String,
}

/// The source's metrics (registered under `cilium_clustermesh_apiserver_kubernetes_`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    connected: Gauge,
    undecodable: Family<ResourceLabel, Gauge>,
    errors: Family<ResourceLabel, Counter>,
    relists: Family<ResourceLabel, Counter>,
    forbidden: Family<ResourceLabel, Gauge>,
}

impl Metrics {
    /// Registers the metrics.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("kubernetes");
        sub.register(
            "connected",
            "1 while the Kubernetes API server answers, 0 during an outage (the last export is kept)",
            self.connected.clone(),
        );
        sub.register(
            "undecodable_objects",
            "Objects skipped because they could not be decoded",
            self.undecodable.clone(),
        );
        sub.register(
            "watch_errors",
            "Errors of list/watch requests",
            self.errors.clone(),
        );
        sub.register(
            "relists",
            "Full lists (the first one, and after 410 Gone or reconnect)",
            self.relists.clone(),
        );
        sub.register(
            "forbidden",
            "1 while a resource is forbidden to the apiserver (RBAC)",
            self.forbidden.clone(),
        );
    }
}

/// A watched object as the reflector stores it: its identity, and the exporter's object
/// decoded once (or why it could not be).
#[derive(Debug, Clone)]
pub struct Decoded {
    name: String,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
    object: Result<Object, String>,
}

impl Lookup for Decoded {
    type DynamicType = ApiResource;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.kind)
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.group)
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.version)
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.plural)
    }
    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }
    fn namespace(&self) -> Option<Cow<'_, str>> {
        self.namespace.as_deref().map(Cow::Borrowed)
    }
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        self.resource_version.as_deref().map(Cow::Borrowed)
    }
    fn uid(&self) -> Option<Cow<'_, str>> {
        self.uid.as_deref().map(Cow::Borrowed)
    }
}

/// A watched object as kube-rs receives it: its kind and metadata (what the watcher needs),
/// and its JSON text, decoded once into the exporter's type by [`decode`].
///
/// Why not `DynamicObject`: that builds a `serde_json::Value` tree of every object, which
/// then had to be converted into the exporter's type: most of the first list's CPU time on
/// a 10k-pod cluster (the manifest source decodes straight from text, and so does this now).
#[derive(Debug, Clone)]
pub struct RawObject {
    kind: Option<String>,
    metadata: kube::core::ObjectMeta,
    /// The object's JSON text (valid JSON: serde_json produced or checked it).
    raw: String,
}

impl<'de> serde::Deserialize<'de> for RawObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(default)]
            kind: Option<String>,
            #[serde(default)]
            metadata: kube::core::ObjectMeta,
        }
        let text = d.deserialize_newtype_struct(RAW_VALUE_TOKEN, TextVisitor)?;
        let head: Head = serde_json::from_str(&text).map_err(serde::de::Error::custom)?;
        Ok(RawObject {
            kind: head.kind,
            metadata: head.metadata,
            raw: text,
        })
    }
}

/// The newtype name by which serde_json hands out a value's text unparsed (what
/// `Box<RawValue>` asks for; serde_json's `raw::TOKEN`, stable since 1.0.42).
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// An object's JSON text, from whatever deserializer kube-rs uses: serde_json itself hands
/// it out as text (a list, a watch line with `type` first); a value serde buffered first (a
/// watch line with `object` before `type`, as a sorted map writes it) is written back out.
/// `Box<RawValue>` alone works only in the first case.
struct TextVisitor;

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        match map.next_key::<String>()? {
            Some(k) if k == RAW_VALUE_TOKEN => map.next_value::<String>(),
            _ => Err(serde::de::Error::custom(
                "expected serde_json's raw value (a JSON object)",
            )),
        }
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
        serde_json::to_string(&value).map_err(serde::de::Error::custom)
    }
}

impl kube::Resource for RawObject {
    type DynamicType = ApiResource;
    type Scope = kube::core::DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.kind)
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.group)
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.version)
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.api_version)
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        Cow::Borrowed(&dt.plural)
    }
    fn meta(&self) -> &kube::core::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        &mut self.metadata
    }
}

/// Decodes one object of `res` into the exporter's type.
pub fn decode(obj: RawObject, res: &Resource) -> Decoded {
    let object = (|| {
        if let Some(kind) = &obj.kind {
            if !kind.is_empty() && kind != res.kind {
                return Err(format!("a {kind} in the list of {}: skipped", res.name()));
            }
        }
        match res.kind {
            // Policies keep their whole JSON, which needs the kind (list items have none).
            "CiliumNetworkPolicy" | "NetworkPolicy" => {
                let mut data: serde_json::Value =
                    serde_json::from_str(&obj.raw).map_err(|e| e.to_string())?;
                let map = data
                    .as_object_mut()
                    .ok_or_else(|| "object is not a JSON object".to_string())?;
                map.insert("kind".into(), res.kind.into());
                map.insert("apiVersion".into(), res.api_version().into());
                Object::from_value(data)
            }
            kind => Object::from_json_str(Some(kind), &obj.raw),
        }
    })();
    Decoded {
        name: obj.metadata.name.unwrap_or_default(),
        namespace: obj.metadata.namespace,
        resource_version: obj.metadata.resource_version,
        uid: obj.metadata.uid,
        object,
    }
}

/// Jittered exponential backoff for failing watches (kube-rs' default caps at 30 s; an
/// apiserver that was briefly unreachable should not wait that long to catch up).
///
/// kube-rs' `StreamBackoff` calls `reset` on every `Ok` item, and its watcher yields
/// `Event::Init` before every list attempt, so a list that keeps failing (403, refused
/// connection) would be retried at the minimum delay forever. This backoff therefore ignores
/// `reset` and starts over only after a real success (`succeeded`, set by the caller).
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    succeeded: Arc<std::sync::atomic::AtomicBool>,
}

impl Backoff {
    fn new(max: Duration) -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let succeeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let min = Duration::from_millis(200);
        (
            Self {
                min,
                max,
                next: min,
                succeeded: succeeded.clone(),
            },
            succeeded,
        )
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        use rand::Rng;
        if self
            .succeeded
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.next = self.min;
        }
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(base.mul_f64(rand::rng().random_range(0.5..1.0)))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {}
}

/// Whether a watcher event shows the API server answering (an `Init` does not: the watcher
/// yields it before each list attempt, failing or not).
fn is_success<K>(ev: &watcher::Event<K>) -> bool {
    !matches!(ev, watcher::Event::Init)
}

/// The state of one watched resource.
struct Watched {
    store: Store<Decoded>,
    /// First InitDone seen.
    ready: bool,
    /// The last request failed for a reason other than 403/410 (connection, 5xx, ...).
    failing: Option<String>,
    /// The last request was forbidden; the message.
    forbidden: Option<String>,
    cancel: CancellationToken,
}

/// Objects changed since the last published snapshot, per resource: `None` = all of them
/// (a completed list), else (namespace, name) of each object a watch event touched.
type Dirty = BTreeMap<Resource, Option<BTreeSet<(Option<String>, String)>>>;

/// Shared between the resource tasks and the publishing loop.
struct Shared {
    watched: Mutex<BTreeMap<Resource, Watched>>,
    changed: Notify,
    metrics: Metrics,
    dirty: Mutex<Dirty>,
}

impl Shared {
    fn with<R>(&self, res: &Resource, f: impl FnOnce(&mut Watched) -> R) -> Option<R> {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        w.get_mut(res).map(f)
    }

    /// Records what an event changed in the reflector store: one object, or (a list
    /// completed) all of the resource's.
    fn mark_dirty(&self, res: &Resource, ev: &watcher::Event<Decoded>) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                if let Some(keys) = dirty.entry(*res).or_insert_with(|| Some(BTreeSet::new())) {
                    keys.insert((o.namespace.clone(), o.name.clone()));
                }
            }
            watcher::Event::InitDone => {
                dirty.insert(*res, None);
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    fn on_event(&self, res: &Resource, ev: &watcher::Event<Decoded>) {
        self.mark_dirty(res, ev);
        let label = ResourceLabel {
            resource: res.name(),
        };
        if matches!(ev, watcher::Event::Init) {
            self.metrics.relists.get_or_create(&label).inc();
        }
        if !is_success(ev) {
            return;
        }
        let recovered = self
            .with(res, |w| {
                let was = w.failing.take().is_some() || w.forbidden.take().is_some();
                if matches!(ev, watcher::Event::InitDone) {
                    w.ready = true;
                }
                was
            })
            .unwrap_or(false);
        if recovered {
            info!(resource = %res.name(), "watch works again");
            self.metrics.forbidden.get_or_create(&label).set(0);
        }
        self.changed.notify_one();
    }

    fn on_error(&self, res: &Resource, err: &watcher::Error) {
        let label = ResourceLabel {
            resource: res.name(),
        };
        self.metrics.errors.get_or_create(&label).inc();
        let status = match err {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some((s.code, s.message.clone())),
            watcher::Error::WatchError(s) => Some((s.code, s.message.clone())),
            _ => None,
        };
        match status {
            Some((410, _)) => {
                debug!(resource = %res.name(), "resourceVersion expired (410 Gone); relisting");
            }
            Some((403, message)) => {
                let first = self
                    .with(res, |w| w.forbidden.replace(message.clone()).is_none())
                    .unwrap_or(false);
                if first {
                    warn!(
                        resource = %res.name(),
                        %message,
                        rule = %res.rule(),
                        "forbidden: add this rule to the clustermesh-apiserver's ClusterRole; the rest is exported without it"
                    );
                }
                self.metrics.forbidden.get_or_create(&label).set(1);
            }
            Some((404, _)) if res.crd => {
                // The CRD went away; the CRD watch stops this one.
                debug!(resource = %res.name(), "resource not found (CRD removed?)");
            }
            _ => {
                let text = err.to_string();
                let first = self
                    .with(res, |w| w.failing.replace(text.clone()).is_none())
                    .unwrap_or(false);
                if first {
                    warn!(resource = %res.name(), error = %text, "kubernetes API unreachable or failing; keeping the last export");
                }
            }
        }
        self.changed.notify_one();
    }
}

/// Sets the `source/kubernetes` health component from `health`: ok while every resource
/// is listed and watched and every object decodes; degraded, with the reason, otherwise.
fn report(reporter: &clustermesh_health::Reporter, health: &Health) {
    let mut why = Vec::new();
    if !health.connected {
        why.push(format!(
            "kubernetes API unreachable, keeping the last export: {}",
            health.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    if !health.waiting_for.is_empty() {
        why.push(format!(
            "waiting for the first list of {}",
            health.waiting_for.join(", ")
        ));
    }
    if !health.forbidden.is_empty() {
        why.push(format!("forbidden: {}", health.forbidden.join("; ")));
    }
    if !health.undecodable.is_empty() {
        let n: Vec<String> = health
            .undecodable
            .iter()
            .map(|(res, n)| format!("{n} {res}"))
            .collect();
        why.push(format!(
            "objects that cannot be decoded are skipped: {}",
            n.join(", ")
        ));
    }
    if why.is_empty() {
        reporter.ok();
    } else {
        reporter.degraded(why.join("; "));
    }
}

/// A hash of an object's identity and version.
fn object_hash(obj: &Decoded) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.namespace.hash(&mut h);
    obj.name.hash(&mut h);
    obj.resource_version.hash(&mut h);
    h.finish()
}

/// Watches one resource until `cancel`, feeding its reflector store.
async fn watch_resource(
    client: kube::Client,
    res: Resource,
    writer: Writer<Decoded>,
    shared: Arc<Shared>,
    max_backoff: Duration,
    cancel: CancellationToken,
) {
    let ar = res.api_resource();
    let api: Api<RawObject> = Api::all_with(client, &ar);
    let (backoff, succeeded) = Backoff::new(max_backoff);
    let stream = watcher(api, watcher::Config::default())
        .backoff(backoff)
        .map_ok(move |ev| match ev {
            watcher::Event::Apply(o) => watcher::Event::Apply(decode(o, &res)),
            watcher::Event::Delete(o) => watcher::Event::Delete(decode(o, &res)),
            watcher::Event::InitApply(o) => watcher::Event::InitApply(decode(o, &res)),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
        });
    let stream = reflector::reflector(writer, stream);
    futures::pin_mut!(stream);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            item = stream.next() => match item {
                None => return,
                Some(Ok(ev)) => {
                    if is_success(&ev) {
                        succeeded.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    shared.on_event(&res, &ev);
                }
                Some(Err(e)) => shared.on_error(&res, &e),
            },
        }
    }
}

/// Runs the source until `cancel`, publishing snapshots on `tx` (generation 1 = the first
/// complete list of every resource).
pub async fn run(
    client: kube::Client,
    opts: Options,
    tx: watch::Sender<Published>,
    status: Arc<Status>,
    metrics: Metrics,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let shared = Arc::new(Shared {
        watched: Mutex::new(BTreeMap::new()),
        changed: Notify::new(),
        metrics,
        dirty: Mutex::new(BTreeMap::new()),
    });
    let mut tasks = JoinSet::new();
    let start = |res: Resource, tasks: &mut JoinSet<()>| {
        let writer = Writer::new(res.api_resource());
        let token = cancel.child_token();
        shared
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                res,
                Watched {
                    store: writer.as_reader(),
                    ready: false,
                    failing: None,
                    forbidden: None,
                    cancel: token.clone(),
                },
            );
        tasks.spawn(
            watch_resource(
                client.clone(),
                res,
                writer,
                shared.clone(),
                opts.max_backoff,
                token,
            )
            .instrument(info_span!("watch", resource = %res.name())),
        );
    };
    // CRDs, metadata only (as Cilium lists them).
    let crd_api: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(client.clone());
    let crd_writer = Writer::new(());
    let crd_store = crd_writer.as_reader();
    {
        let shared = shared.clone();
        let token = cancel.child_token();
        let (backoff, succeeded) = Backoff::new(opts.max_backoff);
        let stream = reflector::reflector(
            crd_writer,
            watcher(crd_api, watcher::Config::default()).backoff(backoff),
        );
        // The CRD watch reports through the same bookkeeping as a resource.
        shared
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                CRDS,
                Watched {
                    store: Writer::new(CRDS.api_resource()).as_reader(),
                    ready: false,
                    failing: None,
                    forbidden: None,
                    cancel: token.clone(),
                },
            );
        tasks.spawn(
            async move {
                futures::pin_mut!(stream);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        item = stream.next() => match item {
                            None => return,
                            Some(Ok(ev)) => {
                                if !is_success(&ev) {
                                    continue;
                                }
                                succeeded.store(true, std::sync::atomic::Ordering::SeqCst);
                                let done = matches!(ev, watcher::Event::InitDone);
                                shared
                                    .dirty
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(CRDS, None);
                                shared.with(&CRDS, |w| {
                                    w.failing = None;
                                    w.forbidden = None;
                                    w.ready |= done;
                                });
                                shared.changed.notify_one();
                            }
                            Some(Err(e)) => shared.on_error(&CRDS, &e),
                        },
                    }
                }
            }
            .instrument(info_span!("watch", resource = "customresourcedefinitions")),
        );
    }
    for res in RESOURCES
        .iter()
        .filter(|r| !r.crd && r.enabled(opts.enable_mcs_api))
    {
        start(*res, &mut tasks);
    }

    let mut generation = 0u64;
    let mut last_health = Health::default();
    let reporter = status.reporters().reporter("source/kubernetes");
    let mut last_fingerprint: BTreeMap<Resource, u64> = BTreeMap::new();
    // The last published snapshot: a watch event on one object changes only that object
    // in it, instead of rebuilding it from every store.
    let mut current: Option<Arc<Snapshot>> = None;
    let mut undecodable: BTreeMap<Resource, usize> = BTreeMap::new();
    // While a watch fails, the API server is probed: a watch that resumes from its
    // resourceVersion yields no event until something changes, so its recovery would go
    // unnoticed (kube-rs does not pass bookmarks on).
    let mut probe = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = shared.changed.notified() => {}
            _ = probe.tick() => {
                let failing = {
                    let w = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
                    w.values().any(|w| w.failing.is_some())
                };
                if !failing {
                    continue;
                }
                match tokio::time::timeout(Duration::from_secs(2), client.apiserver_version()).await {
                    Ok(Ok(_)) => {
                        let mut w = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
                        for w in w.values_mut() {
                            w.failing = None;
                        }
                    }
                    _ => continue,
                }
            }
            Some(joined) = tasks.join_next() => {
                if let Err(source) = joined {
                    return Err(crate::Error::Task { task: "kubernetes watch", source });
                }
                continue;
            }
        }
        // Let a burst of events settle into one snapshot.
        tokio::time::sleep(opts.coalesce).await;

        // CRDs: start watches for new ones, stop those whose CRD is gone.
        let crds_known = shared.with(&CRDS, |w| w.ready).unwrap_or(false);
        let crds_forbidden = shared
            .with(&CRDS, |w| w.forbidden.is_some())
            .unwrap_or(false);
        if crds_known {
            let present: BTreeSet<String> = crd_store
                .state()
                .iter()
                .filter_map(|m| m.metadata.name.clone())
                .collect();
            for res in RESOURCES
                .iter()
                .filter(|r| r.crd && r.enabled(opts.enable_mcs_api))
            {
                let watching = shared.with(res, |_| ()).is_some();
                let exists = present.contains(&res.crd_name());
                if exists && !watching {
                    info!(resource = %res.name(), "CRD present; watching it");
                    start(*res, &mut tasks);
                } else if !exists && watching {
                    info!(resource = %res.name(), "CRD removed; stopping its watch and withdrawing its objects");
                    shared
                        .dirty
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(*res, None);
                    if let Some(w) = shared
                        .watched
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(res)
                    {
                        w.cancel.cancel();
                    }
                }
            }
        }

        let (health, snapshot) = {
            let watched = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
            let mut health = Health {
                connected: watched.values().all(|w| w.failing.is_none()),
                last_error: watched.values().find_map(|w| w.failing.clone()),
                ..Default::default()
            };
            for (res, w) in watched.iter() {
                health.watching.push(res.name());
                if let Some(message) = &w.forbidden {
                    health.forbidden.push(format!(
                        "{} ({message}): add {}",
                        res.name(),
                        res.rule()
                    ));
                }
                // A forbidden resource never lists; it must not hold the export back.
                if !w.ready && w.forbidden.is_none() {
                    health.waiting_for.push(res.name());
                }
            }
            if !crds_known && !crds_forbidden {
                health.waiting_for.push(CRDS.name());
            }
            health.synced = health.waiting_for.is_empty();
            let mut snap = None;
            // During an outage the last snapshot stays (nothing is built or published).
            let dirty = if health.synced && (health.connected || generation == 0) {
                std::mem::take(&mut *shared.dirty.lock().unwrap_or_else(|e| e.into_inner()))
            } else {
                Dirty::new()
            };
            let local = current.is_some() && generation > 0 && dirty.values().all(Option::is_some);
            if health.synced && (health.connected || generation == 0) && local {
                if !dirty.is_empty() {
                    let mut s = current.as_deref().cloned().unwrap_or_default();
                    for (res, keys) in dirty.iter() {
                        let Some(w) = watched.get(res) else { continue };
                        // A relist of the same objects may follow; it must be compared anew.
                        last_fingerprint.remove(res);
                        for (ns, name) in keys.iter().flatten() {
                            s.remove(res.kind, ns.as_deref().unwrap_or_default(), name);
                            let mut at =
                                reflector::ObjectRef::<Decoded>::new_with(name, res.api_resource());
                            if let Some(ns) = ns {
                                at = at.within(ns);
                            }
                            if let Some(obj) = w.store.get(&at) {
                                if let Ok(o) = &obj.object {
                                    s.insert(o.clone());
                                }
                            }
                        }
                        let bad = w.store.state().iter().filter(|o| o.object.is_err()).count();
                        undecodable.insert(*res, bad);
                        shared
                            .metrics
                            .undecodable
                            .get_or_create(&ResourceLabel {
                                resource: res.name(),
                            })
                            .set(bad as i64);
                    }
                    snap = Some(s);
                }
            } else if health.synced && (health.connected || generation == 0) {
                // What each resource holds now, as a fingerprint of (namespace, name,
                // resourceVersion): a relist after 410 or an outage that brings back the
                // same objects changes nothing, and costs no export pass.
                let mut states = Vec::new();
                let mut fingerprint = BTreeMap::new();
                for (res, w) in watched.iter().filter(|(r, w)| **r != CRDS && w.ready) {
                    let items = w.store.state();
                    let mut fp = 0u64;
                    let mut bad = 0;
                    for obj in &items {
                        fp = fp.wrapping_add(object_hash(obj));
                        bad += usize::from(obj.object.is_err());
                    }
                    fingerprint.insert(*res, fp);
                    undecodable.insert(*res, bad);
                    shared
                        .metrics
                        .undecodable
                        .get_or_create(&ResourceLabel {
                            resource: res.name(),
                        })
                        .set(bad as i64);
                    states.push(items);
                }
                // Which CRDs exist is part of the snapshot, as with the manifest source.
                let crds: Vec<Object> = crd_store
                    .state()
                    .iter()
                    .filter_map(|m| {
                        let meta = serde_json::to_value(&m.metadata).ok()?;
                        Object::from_value(serde_json::json!({
                            "kind": CRDS.kind,
                            "apiVersion": CRDS.api_version(),
                            "metadata": meta,
                        }))
                        .ok()
                    })
                    .collect();
                let mut crd_fp = 0u64;
                for m in crd_store.state() {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    m.metadata.name.hash(&mut h);
                    m.metadata.resource_version.hash(&mut h);
                    crd_fp = crd_fp.wrapping_add(h.finish());
                }
                fingerprint.insert(CRDS, crd_fp);
                if generation == 0 || fingerprint != last_fingerprint {
                    let mut s = Snapshot::default();
                    for o in crds {
                        s.insert(o);
                    }
                    for obj in states.iter().flatten() {
                        if let Ok(o) = &obj.object {
                            s.insert(o.clone());
                        }
                    }
                    snap = Some(s);
                    last_fingerprint = fingerprint;
                }
            }
            undecodable.retain(|res, _| watched.contains_key(res));
            for (res, n) in &undecodable {
                if *n > 0 {
                    health.undecodable.insert(res.name(), *n);
                }
            }
            (health, snap)
        };
        shared.metrics.connected.set(i64::from(health.connected));
        // Readiness: held while the API server is unreachable (the export stays as it was).
        status.set_source_available(health.connected);
        if health != last_health {
            for (res, n) in &health.undecodable {
                if last_health.undecodable.get(res) != Some(n) {
                    warn!(resource = %res, skipped = n, "objects that cannot be decoded are skipped (see /status)");
                }
            }
            if health.connected && !last_health.connected && generation > 0 {
                info!("kubernetes API reachable again");
            }
            report(&reporter, &health);
            let h = health.clone();
            status.update(|r| r.kubernetes = Some(h));
            last_health = health.clone();
        }
        let Some(snapshot) = snapshot else {
            // Not everything listed yet, an outage, or nothing changed.
            continue;
        };
        generation += 1;
        if generation == 1 {
            info!(
                objects = snapshot.len(),
                resources = health.watching.len(),
                "every resource listed; first export"
            );
        }
        let snapshot = Arc::new(snapshot);
        current = Some(snapshot.clone());
        tx.send_replace(Published {
            snapshot,
            errors: Arc::new(Vec::new()),
            generation,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_objects_decode_from_lists_and_from_watch_lines_in_either_order() {
        let pods = RESOURCES.iter().find(|r| r.kind == "Pod").unwrap();
        let obj = r#"{"metadata":{"name":"p","namespace":"n","resourceVersion":"7"},"spec":{"nodeName":"x"},"status":{"podIP":"10.0.0.1"}}"#;
        let check = |o: RawObject| {
            let d = decode(o, pods);
            assert_eq!(d.resource_version.as_deref(), Some("7"));
            match d.object {
                Ok(Object::Pod(p)) => assert_eq!(p.status.pod_ip.as_deref(), Some("10.0.0.1")),
                other => panic!("not a pod: {other:?}"),
            }
        };
        // The API server writes `type` first; a sorted map writes `object` first (serde
        // then buffers the object before it reaches RawObject).
        for line in [
            format!(r#"{{"type":"ADDED","object":{obj}}}"#),
            format!(r#"{{"object":{obj},"type":"MODIFIED"}}"#),
        ] {
            match serde_json::from_str::<kube::core::WatchEvent<RawObject>>(&line).unwrap() {
                kube::core::WatchEvent::Added(o) | kube::core::WatchEvent::Modified(o) => check(o),
                other => panic!("{other:?}"),
            }
        }
        let list = format!(
            r#"{{"apiVersion":"v1","kind":"PodList","metadata":{{"resourceVersion":"9"}},"items":[{obj}]}}"#
        );
        let list: kube::core::ObjectList<RawObject> = serde_json::from_str(&list).unwrap();
        assert_eq!(list.items.len(), 1);
        check(list.items.into_iter().next().unwrap());
        // A foreign kind in the list is skipped with a reason, not decoded as a pod.
        let foreign: RawObject =
            serde_json::from_str(r#"{"kind":"Service","metadata":{"name":"s"}}"#).unwrap();
        assert!(decode(foreign, pods)
            .object
            .unwrap_err()
            .contains("Service"));
    }
}
