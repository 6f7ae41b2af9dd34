//! A small, honest Kubernetes API server for tests: the real kube-rs client (in the
//! apiserver's Kubernetes source and in these tests) talks to it over HTTPS with a client
//! certificate, as it would to a kube-apiserver. No kube-apiserver can run on these machines,
//! so this is the one stand-in the project allows; it must therefore keep the protocol's
//! promises, because the client's behaviour (relist, resume, readiness) depends on them:
//!
//! - one global, monotonically increasing `resourceVersion`; every object and every list
//!   carries it; an update that changes nothing is a no-op (no new version, no event);
//! - lists page with `limit`/`continue` over a snapshot taken at the first page (a continue
//!   token older than the compaction point is `410 Expired`);
//! - `watch=1&resourceVersion=N` replays every change after N from the history, then streams
//!   live changes as chunked `{"type":…,"object":…}` lines; `allowWatchBookmarks=true` adds
//!   periodic `BOOKMARK`s; `timeoutSeconds` ends the stream;
//! - a watch from a version older than the compaction point gets `410 Gone` with a `Status`;
//!   [`KubeApi::expire_watches`] compacts and ends every open watch with an `ERROR` 410 event;
//! - a resource the test forbids gets `403` with the `Status` a real server sends (user,
//!   verb, resource, group);
//! - custom resources are served only while their CustomResourceDefinition exists;
//! - `Accept: …;as=PartialObjectMetadataList` gets metadata-only lists and watch events;
//! - `sendInitialEvents` is refused as a server without the WatchList feature does.
//!
//! - writes over HTTP are server-side apply (`PATCH` with `application/apply-patch+yaml`,
//!   `fieldManager`, `force`, `dryRun=All`) and `DELETE`, as `clustermesh enable/connect
//!   --context` send them: apply creates or merges (maps merge, lists and scalars replace) and
//!   drops the fields the same manager applied before and no longer applies, recorded in
//!   `managedFields` (FieldsV1); an apply that changes nothing is a no-op; every write is
//!   logged ([`KubeApi::writes`]); RBAC may forbid single verbs ([`KubeApi::forbid_verbs`]);
//! - lists take equality label selectors (`labelSelector=k=v,k2=v2`);
//! - `GET …/pods/<name>:<port>/proxy/<path>` forwards to the pod's `status.podIP` over plain
//!   HTTP (the API server's pod proxy), `503` when nothing answers there.
//!
//! It must not grow into a general fake: no POST/PUT, no conflict detection between field
//! managers, no set-based selectors, no field selectors, no protobuf.

mod serve;
mod write;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// The user the test server's client certificate names (what a 403 message says).
pub const USER: &str = "system:serviceaccount:kube-system:clustermesh-apiserver";

/// One kind of object the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Plural resource name.
    pub plural: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Served only while its CRD exists.
    pub crd: bool,
}

impl Kind {
    /// `apiVersion` as objects carry it.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// The CRD name (`<plural>.<group>`).
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }
}

const fn k(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    crd: bool,
) -> Kind {
    Kind {
        group,
        version,
        kind,
        plural,
        namespaced,
        crd,
    }
}

/// Every kind the server serves.
pub const KINDS: &[Kind] = &[
    k("", "v1", "Namespace", "namespaces", false, false),
    k("", "v1", "Node", "nodes", false, false),
    k("", "v1", "Pod", "pods", true, false),
    k("", "v1", "Service", "services", true, false),
    k(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        false,
    ),
    k(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        false,
    ),
    k(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        false,
    ),
    k(
        "multicluster.x-k8s.io",
        "v1beta1",
        "ServiceExport",
        "serviceexports",
        true,
        true,
    ),
    k("cilium.io", "v2", "CiliumNode", "ciliumnodes", false, true),
    k(
        "cilium.io",
        "v2",
        "CiliumIdentity",
        "ciliumidentities",
        false,
        true,
    ),
    k(
        "cilium.io",
        "v2",
        "CiliumEndpoint",
        "ciliumendpoints",
        true,
        true,
    ),
    k(
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
        "ciliumnetworkpolicies",
        true,
        true,
    ),
    k(
        "cilium.io",
        "v2alpha1",
        "CiliumEndpointSlice",
        "ciliumendpointslices",
        false,
        true,
    ),
    // What `clustermesh enable/connect --context` writes.
    k("", "v1", "ConfigMap", "configmaps", true, false),
    k("", "v1", "Secret", "secrets", true, false),
    k("", "v1", "ServiceAccount", "serviceaccounts", true, false),
    k(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        false,
    ),
    k(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        false,
    ),
    k("apps", "v1", "Deployment", "deployments", true, false),
    k("apps", "v1", "DaemonSet", "daemonsets", true, false),
];

/// The kind named `kind` (e.g. `Pod`).
pub fn kind(kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// How the server is unreachable during an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// New connections are closed at once (as a crashed server behind a live address).
    Refuse,
    /// New connections are accepted and then never answered (as a hung server).
    Hang,
}

/// A recorded change.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    rv: u64,
    kind: usize,
    ty: &'static str,
    object: Arc<Value>,
}

/// Counters a test may assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// List requests (first pages only), per plural.
    pub lists: BTreeMap<String, u64>,
    /// Watch requests, per plural.
    pub watches: BTreeMap<String, u64>,
    /// 410 answers (HTTP or ERROR events).
    pub gone: u64,
    /// 403 answers.
    pub forbidden: u64,
}

/// One write request over HTTP and its effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// `created`, `configured`, `unchanged` (server-side apply) or `deleted`, `absent`.
    pub op: &'static str,
    /// Kind.
    pub kind: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `dryRun=All`: checked and computed, not stored.
    pub dry_run: bool,
}

impl Write {
    /// `op Kind ns/name` (or `op Kind name`), for assertions.
    pub fn line(&self) -> String {
        let dry = if self.dry_run { " (dry run)" } else { "" };
        if self.namespace.is_empty() {
            format!("{} {} {}{dry}", self.op, self.kind, self.name)
        } else {
            format!(
                "{} {} {}/{}{dry}",
                self.op, self.kind, self.namespace, self.name
            )
        }
    }
}

/// A paged list's snapshot: its resourceVersion and items.
type Page = (u64, Arc<Vec<Arc<Value>>>);

pub(crate) struct State {
    rv: u64,
    /// Objects per kind index, by (namespace, name).
    objects: Vec<BTreeMap<(String, String), Arc<Value>>>,
    history: VecDeque<Change>,
    /// Watches and continue tokens older than this are gone.
    compacted: u64,
    /// Forbidden (group, resource) → verbs (`None`: every verb).
    pub(crate) forbidden: BTreeMap<(String, String), Option<BTreeSet<String>>>,
    /// Every write request over HTTP and what it did.
    pub(crate) writes: Vec<Write>,
    /// Paged list snapshots by token id.
    pages: BTreeMap<u64, Page>,
    next_page: u64,
    stats: Stats,
    uid: u64,
    /// Whether objects without a uid get one (a real server always assigns one).
    assign_uids: bool,
}

/// History kept for watch resumption; older changes are compacted away.
const HISTORY: usize = 200_000;

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) changes: broadcast::Sender<Change>,
    /// `Some` while the server is unreachable.
    pub(crate) outage: watch::Sender<Option<Outage>>,
    /// Cancelled (and replaced) to end every open watch with a 410.
    pub(crate) expire: Mutex<CancellationToken>,
    pub(crate) bookmark_interval: Duration,
}

/// A running test API server. Dropping it stops it.
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    ca_pem: String,
    client: clustermesh_certs::Leaf,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi").field("addr", &self.addr).finish()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl KubeApi {
    /// Starts a server on 127.0.0.1 (random port) with bookmarks every second.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Duration::from_secs(1)).await
    }

    /// Starts a server sending a BOOKMARK on every watch each `bookmark_interval`.
    pub async fn start_with(bookmark_interval: Duration) -> anyhow::Result<Self> {
        let ca = clustermesh_certs::Ca::generate("kubernetes")?;
        let server = ca.issue_server(&clustermesh_certs::ServerSpec::default())?;
        let client = ca.issue_client(USER, 30)?;
        let tls =
            clustermesh_certs::server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changes, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: vec![BTreeMap::new(); KINDS.len()],
                history: VecDeque::new(),
                compacted: 0,
                forbidden: BTreeMap::new(),
                writes: Vec::new(),
                pages: BTreeMap::new(),
                next_page: 1,
                stats: Stats::default(),
                uid: 0,
                assign_uids: true,
            }),
            changes,
            outage: watch::channel(None).0,
            expire: Mutex::new(CancellationToken::new()),
            bookmark_interval,
        });
        let cancel = CancellationToken::new();
        tokio::spawn(serve::accept_loop(
            listener,
            Arc::new(tls),
            shared.clone(),
            cancel.clone(),
        ));
        Ok(Self {
            shared,
            addr,
            ca_pem: ca.cert_pem().to_string(),
            client,
            cancel,
            _dir: tempfile::tempdir()?,
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kube-rs client for this server (real client, real TLS, client certificate).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let path = self._dir.path().join("kubeconfig");
        self.write_kubeconfig(&path, "test")?;
        let kc = kube::config::Kubeconfig::read_from(&path)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Writes a kubeconfig whose context `context` points here (0600: it holds a key).
    pub fn write_kubeconfig(&self, path: &Path, context: &str) -> anyhow::Result<()> {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {context}\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: clustermesh-apiserver\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: {context}\n  context:\n    cluster: test\n    user: clustermesh-apiserver\n",
            url = self.url(),
            ca = b64(&self.ca_pem),
            cert = b64(&self.client.cert_pem),
            key = b64(&self.client.key_pem),
        );
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Writes one kubeconfig with a context per server (`(server, context name)`), each with its
    /// own cluster and user entry, as a user with two clusters has (0600: it holds keys).
    pub fn write_kubeconfig_multi(path: &Path, servers: &[(&KubeApi, &str)]) -> anyhow::Result<()> {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let current = servers.first().map(|(_, c)| *c).unwrap_or("default");
        let (mut clusters, mut users, mut contexts) = (String::new(), String::new(), String::new());
        for (api, ctx) in servers {
            clusters.push_str(&format!(
                "- name: {ctx}\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n",
                api.url(),
                b64(&api.ca_pem)
            ));
            users.push_str(&format!(
                "- name: {ctx}-admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&api.client.cert_pem),
                b64(&api.client.key_pem)
            ));
            contexts.push_str(&format!(
                "- name: {ctx}\n  context:\n    cluster: {ctx}\n    user: {ctx}-admin\n"
            ));
        }
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {current}\nclusters:\n{clusters}users:\n{users}contexts:\n{contexts}"
        );
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Creates or replaces an object (its `kind` must be one of [`KINDS`]); returns its new
    /// resourceVersion. Replacing with identical content is a no-op, as on a real server.
    pub fn apply(&self, obj: Value) -> anyhow::Result<u64> {
        Ok(self.apply_all(vec![obj])?.first().copied().unwrap_or(0))
    }

    /// [`apply`](Self::apply) for many objects under one lock.
    pub fn apply_all(&self, objs: Vec<Value>) -> anyhow::Result<Vec<u64>> {
        let mut st = self.lock();
        let mut out = Vec::with_capacity(objs.len());
        for obj in objs {
            out.push(self.shared.apply_locked(&mut st, obj)?);
        }
        Ok(out)
    }

    /// Applies every object of a multi-document YAML text (objects of unknown kinds are an
    /// error: the test meant something).
    pub fn apply_yaml(&self, text: &str) -> anyhow::Result<usize> {
        use serde::Deserialize;
        let mut objs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = Value::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            if v.get("kind").and_then(Value::as_str) == Some("List") {
                objs.extend(v["items"].as_array().cloned().unwrap_or_default());
            } else {
                objs.push(v);
            }
        }
        let n = objs.len();
        self.apply_all(objs)?;
        Ok(n)
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&self, kind_name: &str, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let ki = KINDS
            .iter()
            .position(|k| k.kind == kind_name)
            .with_context(|| format!("unknown kind {kind_name}"))?;
        let mut st = self.lock();
        Ok(self.shared.delete_locked(&mut st, ki, namespace, name))
    }

    /// Adds the CRD of `kind` (e.g. `CiliumNode`).
    pub fn add_crd(&self, kind_name: &str) -> anyhow::Result<()> {
        let kd = kind(kind_name)
            .filter(|k| k.crd)
            .with_context(|| format!("{kind_name} is not a custom resource"))?;
        self.apply(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": kd.crd_name()},
            "spec": {
                "group": kd.group,
                "names": {"kind": kd.kind, "plural": kd.plural},
                "scope": if kd.namespaced { "Namespaced" } else { "Cluster" },
                "versions": [{"name": kd.version, "served": true, "storage": true}],
            }
        }))?;
        Ok(())
    }

    /// Removes the CRD of `kind` and every object of it.
    pub fn remove_crd(&self, kind_name: &str) -> anyhow::Result<bool> {
        let kd = kind(kind_name)
            .filter(|k| k.crd)
            .with_context(|| format!("{kind_name} is not a custom resource"))?;
        self.delete("CustomResourceDefinition", "", &kd.crd_name())
    }

    /// Adds every CRD a Cilium cluster with the MCS API has.
    pub fn add_all_crds(&self) -> anyhow::Result<()> {
        for kd in KINDS.iter().filter(|k| k.crd) {
            self.add_crd(kd.kind)?;
        }
        Ok(())
    }

    /// Whether objects created without a uid get one (default true, as on a real server).
    /// The scenario runner turns it off so that both sources export exactly the objects a
    /// scenario wrote (the exporter publishes a pod's uid).
    pub fn set_assign_uids(&self, assign: bool) {
        self.lock().assign_uids = assign;
    }

    /// Forbids (or allows again) every verb on `resource` of `group` for the test user.
    pub fn set_forbidden(&self, group: &str, resource: &str, forbidden: bool) {
        let key = (group.to_string(), resource.to_string());
        let mut st = self.lock();
        if forbidden {
            st.forbidden.insert(key, None);
        } else {
            st.forbidden.remove(&key);
        }
    }

    /// Forbids only `verbs` (e.g. `create`, `patch`) on `resource` of `group`, as an RBAC
    /// role that may read but not write would.
    pub fn forbid_verbs(&self, group: &str, resource: &str, verbs: &[&str]) {
        let key = (group.to_string(), resource.to_string());
        self.lock()
            .forbidden
            .insert(key, Some(verbs.iter().map(|v| v.to_string()).collect()));
    }

    /// Every write request received over HTTP (server-side apply, delete), in order, with
    /// what it did; dry runs included and marked.
    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// [`writes`](Self::writes), then forgets them.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut self.lock().writes)
    }

    /// The stored object (`kind` e.g. `Secret`), as the server holds it.
    pub fn get(&self, kind_name: &str, namespace: &str, name: &str) -> Option<Value> {
        let ki = KINDS.iter().position(|k| k.kind == kind_name)?;
        let ns = if KINDS[ki].namespaced { namespace } else { "" };
        self.lock().objects[ki]
            .get(&(ns.to_string(), name.to_string()))
            .map(|o| (**o).clone())
    }

    /// Compacts the history: every version up to now is gone, every open watch ends with an
    /// `ERROR` 410 event, and a watch or continue token from before now gets `410 Gone`.
    pub fn expire_watches(&self) {
        {
            let mut st = self.lock();
            st.compacted = st.rv;
            st.history.clear();
            st.pages.clear();
        }
        let mut t = self.shared.expire.lock().unwrap_or_else(|e| e.into_inner());
        t.cancel();
        *t = CancellationToken::new();
    }

    /// Starts (`Some`) or ends (`None`) an outage. Starting one also drops every open
    /// connection, watches included.
    pub fn set_outage(&self, outage: Option<Outage>) {
        self.shared.outage.send_replace(outage);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Request counters.
    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// How many objects of `kind` exist.
    pub fn count(&self, kind_name: &str) -> usize {
        let st = self.lock();
        KINDS
            .iter()
            .position(|k| k.kind == kind_name)
            .map(|i| st.objects[i].len())
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    pub(crate) fn apply_locked(&self, st: &mut State, mut obj: Value) -> anyhow::Result<u64> {
        let kname = obj
            .get("kind")
            .and_then(Value::as_str)
            .context("object has no kind")?
            .to_string();
        let ki = KINDS
            .iter()
            .position(|k| k.kind == kname)
            .with_context(|| format!("the test API server does not serve kind {kname}"))?;
        let kd = KINDS[ki];
        if kd.crd && !crd_exists(st, &kd) {
            anyhow::bail!(
                "no CRD {} on the test API server: add it first",
                kd.crd_name()
            );
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .with_context(|| format!("{kname} has no metadata.name"))?
            .to_string();
        let ns = if kd.namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        obj["apiVersion"] = json!(kd.api_version());
        let meta = obj["metadata"].as_object_mut().context("metadata")?;
        meta.remove("resourceVersion");
        if kd.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        let key = (ns, name);
        let old = st.objects[ki].get(&key).cloned();
        if let Some(old) = &old {
            // Same content (server-managed fields aside) → nothing happens.
            let mut o = (**old).clone();
            let m = o["metadata"].as_object_mut().context("metadata")?;
            m.remove("resourceVersion");
            for f in ["uid", "creationTimestamp"] {
                if obj["metadata"].get(f).is_none_or(|v| v.is_null()) {
                    m.remove(f);
                }
            }
            if o == obj {
                return Ok(rv_of(old));
            }
            let meta = obj["metadata"].as_object_mut().context("metadata")?;
            for f in ["uid", "creationTimestamp"] {
                if !meta.contains_key(f) {
                    if let Some(v) = old["metadata"].get(f) {
                        meta.insert(f.into(), v.clone());
                    }
                }
            }
        } else {
            st.uid += 1;
            let uid = format!("00000000-0000-4000-8000-{:012x}", st.uid);
            let assign = st.assign_uids;
            let meta = obj["metadata"].as_object_mut().context("metadata")?;
            if assign {
                meta.entry("uid").or_insert(json!(uid));
            }
            meta.entry("creationTimestamp")
                .or_insert(json!("2026-01-01T00:00:00Z"));
        }
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = Arc::new(obj);
        st.objects[ki].insert(key, obj.clone());
        let ty = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(st, ki, ty, obj);
        Ok(rv)
    }

    pub(crate) fn delete_locked(
        &self,
        st: &mut State,
        ki: usize,
        namespace: &str,
        name: &str,
    ) -> bool {
        let ns = if KINDS[ki].namespaced {
            if namespace.is_empty() {
                "default"
            } else {
                namespace
            }
        } else {
            ""
        };
        let Some(old) = st.objects[ki].remove(&(ns.to_string(), name.to_string())) else {
            return false;
        };
        st.rv += 1;
        let mut obj = (*old).clone();
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(st, ki, "DELETED", Arc::new(obj));
        if KINDS[ki].kind == "CustomResourceDefinition" {
            // Its custom resources go with it, as on a real server.
            if let Some(ci) = KINDS.iter().position(|k| k.crd && k.crd_name() == name) {
                let keys: Vec<_> = st.objects[ci].keys().cloned().collect();
                for (ns, n) in keys {
                    self.delete_locked(st, ci, &ns, &n);
                }
            }
        }
        true
    }

    fn record(&self, st: &mut State, ki: usize, ty: &'static str, object: Arc<Value>) {
        let change = Change {
            rv: st.rv,
            kind: ki,
            ty,
            object,
        };
        st.history.push_back(change.clone());
        while st.history.len() > HISTORY {
            if let Some(c) = st.history.pop_front() {
                st.compacted = c.rv;
            }
        }
        let _ = self.changes.send(change);
    }
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn crd_exists(st: &State, kd: &Kind) -> bool {
    let ci = KINDS
        .iter()
        .position(|k| k.kind == "CustomResourceDefinition")
        .unwrap_or(0);
    st.objects[ci].contains_key(&(String::new(), kd.crd_name()))
}
