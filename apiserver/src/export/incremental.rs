//! Incremental export: from the objects that changed between two snapshots to exactly the
//! etcd keys they affect, instead of recomputing every store (a watch event on a 10k-pod
//! cluster then costs microseconds, not a full pass).
//!
//! How: [`Delta::between`] compares the snapshot of the last pass with the new one (by
//! pointer, then by value: unchanged objects keep their `Arc`) and lists the changed
//! objects. [`Exporter::compute_incremental`] turns them into key changes (`Some(value)` to
//! put, `None` to delete), using the same per-object functions as the full pass and an
//! [`Index`] of what the full pass knew implicitly:
//! - a Pod's identity label set and the refcount of each set (a set's identity key exists
//!   while one endpoint pod uses it);
//! - which endpoints (Pod, CiliumEndpoint) claim which IP: a changed endpoint affects the
//!   ipcache keys of its old and new IPs, and each of those IPs is decided again by the full
//!   pass's rule (the current owner keeps it while it claims it, else the first seen);
//! - the pods per label (a Pod change affects the services that select it, old or new
//!   labels), and which service produced which `endpointslices/v1` key.
//!
//! Node/CiliumNode changes affect their node key and the pods on that node (host IP). A
//! Service, EndpointSlice or ServiceExport change affects its service's keys.
//!
//! What must stay true: **the incremental path and a full pass produce identical etcd
//! contents.** The writer's mirror of etcd is shared, so a later full pass (first list,
//! relist after 410 or an outage, a CRD appearing, a restart) must diff to zero writes for
//! objects that did not change; the test `incremental_equals_full` applies random events
//! incrementally, then asserts that a full pass computes exactly the mirror. Hence:
//! - the state the full pass keeps (`first_seen`, `ip_owner`, allocations) is updated here
//!   by the same rules, never by a shortcut;
//! - a key is put only by the object that wins it; when two scopes touch one key in a batch,
//!   the put wins over the delete (see [`Changes`]);
//! - what the index cannot decide locally falls back to a full pass ([`FullPass`]): a
//!   Namespace change (global filter and identity labels of everything in it), a
//!   CustomResourceDefinition appearing or going, a CiliumIdentity (it can move allocated
//!   numbers), a CiliumEndpointSlice, two services generating an EndpointSlice of one name,
//!   and deltas larger than [`MAX_INCREMENTAL`] (a relist: one full pass is cheaper).
//!
//! This module must not write to etcd or decide export semantics of its own: every value
//! comes from the functions the full pass uses.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use clustermesh_types::kvstore;
use clustermesh_types::model::endpoint_slice::SERVICE_NAME_LABEL;

use crate::source::{objects, Snapshot};

use super::endpoints::{cep_claims, node_internal_ip, pod_ips, pod_is_endpoint, Ep, EpSrc};
use super::identities::LabelCacheKey;
use super::services::{label_index, LabelIndex};
use super::{cidrs, Exporter, Problem, ProblemKind};

/// Namespace and name.
type Nn = (String, String);

/// Above this many changed objects, a full pass is cheaper than the incremental one.
pub const MAX_INCREMENTAL: usize = 2000;

/// Why a change needs a full pass instead.
pub type FullPass = &'static str;

/// Key changes of one incremental pass: `Some(value)` puts, `None` deletes. A key that is
/// both deleted (by the scope that lost it) and put (by the one that won it) is put.
#[derive(Debug, Default)]
pub struct Changes(BTreeMap<String, Option<Vec<u8>>>);

impl Changes {
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.0.insert(key, Some(value));
    }
    fn delete(&mut self, key: String) {
        self.0.entry(key).or_insert(None);
    }
    fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => self.put(key, v),
            None => self.delete(key),
        }
    }
    /// The changes, in key order.
    pub fn into_vec(self) -> Vec<(String, Option<Vec<u8>>)> {
        self.0.into_iter().collect()
    }
    /// Number of keys touched.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether nothing is touched.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The objects that changed (added, modified or removed) between two snapshots.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pods: BTreeSet<Nn>,
    cilium_endpoints: BTreeSet<Nn>,
    services: BTreeSet<Nn>,
    endpoint_slices: BTreeSet<Nn>,
    service_exports: BTreeSet<Nn>,
    policies: BTreeSet<(String, String, String)>,
    nodes: BTreeSet<String>,
}

/// Adds to `out` the keys whose object differs between `old` and `new` (one merge pass).
fn diff_keys<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
    out: &mut BTreeSet<K>,
) {
    use std::cmp::Ordering;
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((k, _)), None) => {
                out.insert((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                out.insert((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    out.insert((*ka).clone());
                    a.next();
                }
                Ordering::Greater => {
                    out.insert((*kb).clone());
                    b.next();
                }
                Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) && va != vb {
                        out.insert((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

fn same<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
) -> bool {
    old.len() == new.len()
        && old
            .iter()
            .zip(new)
            .all(|((ka, va), (kb, vb))| ka == kb && (Arc::ptr_eq(va, vb) || va == vb))
}

impl Delta {
    /// What changed from `old` to `new`, or why a full pass is needed.
    pub fn between(
        old: &Snapshot,
        new: &Snapshot,
        opts: &super::Options,
    ) -> Result<Delta, FullPass> {
        if !same(&old.namespaces, &new.namespaces) {
            return Err("a namespace changed");
        }
        if !same(&old.crds, &new.crds) {
            return Err("the set of CustomResourceDefinitions changed");
        }
        if !same(&old.cilium_identities, &new.cilium_identities) {
            return Err("a CiliumIdentity changed");
        }
        if opts.enable_cilium_endpoint_slice
            && !same(&old.cilium_endpoint_slices, &new.cilium_endpoint_slices)
        {
            return Err("a CiliumEndpointSlice changed");
        }
        let mut d = Delta::default();
        diff_keys(&old.pods, &new.pods, &mut d.pods);
        if !opts.enable_cilium_endpoint_slice {
            diff_keys(
                &old.cilium_endpoints,
                &new.cilium_endpoints,
                &mut d.cilium_endpoints,
            );
        }
        diff_keys(&old.services, &new.services, &mut d.services);
        diff_keys(
            &old.endpoint_slices,
            &new.endpoint_slices,
            &mut d.endpoint_slices,
        );
        diff_keys(
            &old.service_exports,
            &new.service_exports,
            &mut d.service_exports,
        );
        diff_keys(&old.policies, &new.policies, &mut d.policies);
        diff_keys(&old.nodes, &new.nodes, &mut d.nodes);
        diff_keys(&old.cilium_nodes, &new.cilium_nodes, &mut d.nodes);
        if d.len() > MAX_INCREMENTAL {
            return Err("too many changes at once");
        }
        Ok(d)
    }

    /// Number of changed objects.
    pub fn len(&self) -> usize {
        self.pods.len()
            + self.cilium_endpoints.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.service_exports.len()
            + self.policies.len()
            + self.nodes.len()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An endpoint that claims IPs: a Pod or a CiliumEndpoint (the `first_seen` key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Owner {
    kind: &'static str,
    ns: String,
    name: String,
}

impl Owner {
    fn seen_key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.ns, self.name)
    }
}

/// What the full pass knows implicitly, kept for the incremental one (built after a full
/// pass by [`Exporter::build_index`], updated by every incremental pass).
#[derive(Debug, Default)]
pub struct Index {
    /// Identity numbers of CiliumIdentity objects (not ours to allocate).
    taken: HashSet<u32>,
    /// Endpoint pods → their identity label set.
    pod_sets: HashMap<Nn, String>,
    /// Label set → endpoint pods using it.
    set_refs: HashMap<String, usize>,
    /// Endpoint → the IPs it claims.
    owner_ips: HashMap<Owner, Vec<String>>,
    /// IP → endpoints claiming it.
    claims: HashMap<String, Vec<Owner>>,
    /// (namespace, label, value) → pods, sorted as the full pass builds it.
    labels: LabelIndex,
    /// Service → its `endpointslices/v1` keys.
    slice_keys: HashMap<Nn, BTreeSet<String>>,
    /// `endpointslices/v1` key → the service that produced it.
    slice_owner: HashMap<String, Nn>,
}

impl Index {
    fn add_claims(&mut self, owner: Owner, ips: Vec<String>) {
        if ips.is_empty() {
            return;
        }
        for ip in &ips {
            self.claims
                .entry(ip.clone())
                .or_default()
                .push(owner.clone());
        }
        self.owner_ips.insert(owner, ips);
    }

    fn remove_claims(&mut self, owner: &Owner) -> Vec<String> {
        let ips = self.owner_ips.remove(owner).unwrap_or_default();
        for ip in &ips {
            if let Some(c) = self.claims.get_mut(ip) {
                c.retain(|o| o != owner);
                if c.is_empty() {
                    self.claims.remove(ip);
                }
            }
        }
        ips
    }

    fn unindex_pod(&mut self, key: &Nn, pod: &objects::Pod) {
        for (k, v) in pod.metadata.labels.iter().flatten() {
            let lk = (key.0.clone(), k.clone(), v.clone());
            if let Some(list) = self.labels.get_mut(&lk) {
                if let Ok(i) = list.binary_search(key) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.labels.remove(&lk);
                }
            }
        }
    }

    fn index_pod(&mut self, key: &Nn, pod: &objects::Pod) {
        for (k, v) in pod.metadata.labels.iter().flatten() {
            let list = self
                .labels
                .entry((key.0.clone(), k.clone(), v.clone()))
                .or_default();
            if let Err(i) = list.binary_search(key) {
                list.insert(i, key.clone());
            }
        }
    }
}

/// The result of an incremental pass.
#[derive(Debug, Default)]
pub struct Incremental {
    /// The keys to write or delete.
    pub changes: Changes,
    /// Problems of the objects recomputed.
    pub problems: Vec<Problem>,
    /// The objects recomputed (`Kind/ns/name`): their earlier problems are replaced.
    pub recomputed: HashSet<String>,
}

fn service_of(slice: &objects::EndpointSlice) -> Option<&String> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
}

/// Whether service `svc` could generate a slice named `slice` (`<svc>`, `<svc>-ipv6`,
/// `<svc>-2`, ...).
fn could_generate(svc: &str, slice: &str) -> bool {
    slice == svc
        || slice
            .strip_prefix(svc)
            .is_some_and(|rest| rest.starts_with('-'))
}

fn selects(svc: &objects::Service, pod: &objects::Pod) -> bool {
    let Some(sel) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    sel.iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The services of `snap` that select the old or the new version of one of `pods`. Found
/// through each selector's first label, one lookup per pod label: checking every service of
/// the namespace against every changed pod costs pods × services (up to 2000 × 1000 in one
/// pass at [`MAX_INCREMENTAL`]).
fn services_selecting(old: &Snapshot, snap: &Snapshot, pods: &BTreeSet<Nn>) -> BTreeSet<Nn> {
    let mut out = BTreeSet::new();
    if pods.is_empty() || snap.services.is_empty() {
        return out;
    }
    type ByFirstLabel<'a> =
        HashMap<(&'a str, &'a str, &'a str), Vec<(&'a Nn, &'a objects::Service)>>;
    let mut by_first: ByFirstLabel = HashMap::new();
    for (k, svc) in &snap.services {
        if let Some((lk, lv)) = svc.spec.selector.as_ref().and_then(|s| s.iter().next()) {
            by_first
                .entry((k.0.as_str(), lk.as_str(), lv.as_str()))
                .or_default()
                .push((k, svc.as_ref()));
        }
    }
    for key in pods {
        for p in [old.pods.get(key), snap.pods.get(key)]
            .into_iter()
            .flatten()
        {
            for (lk, lv) in p.metadata.labels.iter().flatten() {
                let Some(candidates) = by_first.get(&(key.0.as_str(), lk.as_str(), lv.as_str()))
                else {
                    continue;
                };
                for (k, svc) in candidates {
                    if selects(svc, p) {
                        out.insert((*k).clone());
                    }
                }
            }
        }
    }
    out
}

fn in_namespace<'a, V>(
    map: &'a BTreeMap<Nn, V>,
    ns: &'a str,
) -> impl Iterator<Item = (&'a Nn, &'a V)> + 'a {
    map.range((ns.to_string(), String::new())..)
        .take_while(move |((n, _), _)| n == ns)
}

impl Exporter {
    /// Whether an index for incremental passes exists (built after the last full pass).
    pub fn has_index(&self) -> bool {
        self.index.is_some()
    }

    /// Builds the index of what the full pass computed from `snap` (call right after it).
    pub fn build_index(&mut self, snap: &Snapshot) {
        let mut idx = Index::default();
        let range = self.opts.cluster.identity_range();
        for name in snap.cilium_identities.keys() {
            if let Ok(id) = name.parse::<u32>() {
                if range.contains(id) {
                    idx.taken.insert(id);
                }
            }
        }
        let mut cache: HashMap<LabelCacheKey, String> = HashMap::new();
        for ((ns, name), p) in &snap.pods {
            if !pod_is_endpoint(p) {
                continue;
            }
            let ck = (
                p.metadata.ns(),
                p.metadata.labels.as_ref(),
                p.spec.service_account_name.as_deref(),
            );
            let set = cache
                .entry(ck)
                .or_insert_with(|| self.pod_identity_labels(snap, p))
                .clone();
            *idx.set_refs.entry(set.clone()).or_default() += 1;
            let has_id = self.allocator.id_of(&set).is_some();
            idx.pod_sets.insert((ns.clone(), name.clone()), set);
            if has_id {
                let owner = Owner {
                    kind: "Pod",
                    ns: ns.clone(),
                    name: name.clone(),
                };
                let inside = |ip: &&str| cidrs::allowed(&self.opts.cluster_cidrs, ip);
                idx.add_claims(owner, pod_ips(p).filter(inside).map(String::from).collect());
            }
        }
        let ceps = if self.opts.enable_cilium_endpoint_slice {
            objects::CoreEndpoint::from_slices(&snap.cilium_endpoint_slices)
        } else {
            objects::CoreEndpoint::from_endpoints(&snap.cilium_endpoints)
        };
        for cep in &ceps {
            let ips = cep_claims(cep, &mut Vec::new())
                .iter()
                .filter(|e| cidrs::allowed(&self.opts.cluster_cidrs, e.ip))
                .map(|e| e.ip.to_string())
                .collect();
            let owner = Owner {
                kind: "CiliumEndpoint",
                ns: cep.namespace.to_string(),
                name: cep.name.to_string(),
            };
            // One name may appear in two slices; the claims add up as in the full pass.
            let mut all: Vec<String> = idx.owner_ips.get(&owner).cloned().unwrap_or_default();
            idx.remove_claims(&owner);
            all.extend::<Vec<String>>(ips);
            idx.add_claims(owner, all);
        }
        idx.labels = label_index(snap);
        if self.opts.service_v2.exports_endpoint_slices() {
            let cluster = self.opts.cluster.name.as_str().to_string();
            let mut with_slices = HashSet::new();
            for ((ns, name), slice) in &snap.endpoint_slices {
                let Some(service) = service_of(slice) else {
                    continue;
                };
                with_slices.insert((ns.clone(), service.clone()));
                if self
                    .real_slice_value(snap, ns, name, slice, &mut Vec::new())
                    .is_some()
                {
                    let key = kvstore::endpoint_slice_key(&cluster, ns, name);
                    let svc = (ns.clone(), service.clone());
                    idx.slice_keys
                        .entry(svc.clone())
                        .or_default()
                        .insert(key.clone());
                    idx.slice_owner.insert(key, svc);
                }
            }
            for ((ns, name), svc) in &snap.services {
                let k = (ns.clone(), name.clone());
                if with_slices.contains(&k) || !self.service_exported(snap, ns, svc) {
                    continue;
                }
                for slice in self.pod_slices(snap, &idx.labels, ns, name, svc) {
                    let key = kvstore::endpoint_slice_key(&cluster, ns, &slice.name);
                    if idx.slice_owner.contains_key(&key) {
                        continue;
                    }
                    idx.slice_keys
                        .entry(k.clone())
                        .or_default()
                        .insert(key.clone());
                    idx.slice_owner.insert(key, k.clone());
                }
            }
        }
        self.index = Some(idx);
    }

    /// The key changes that bring etcd from what `old` exported to what `new` exports, given
    /// `delta` between them. Needs the index of `old` ([`Exporter::build_index`]); on `Err`
    /// the index is dropped and the caller must run a full pass.
    pub fn compute_incremental(
        &mut self,
        old: &Snapshot,
        new: &Snapshot,
        delta: &Delta,
    ) -> Result<Incremental, FullPass> {
        let Some(mut idx) = self.index.take() else {
            return Err("no index yet");
        };
        let mut out = Incremental::default();
        self.incremental_endpoints(&mut idx, old, new, delta, &mut out);
        self.incremental_services(&mut idx, old, new, delta, &mut out)?;
        self.index = Some(idx);
        Ok(out)
    }

    /// The IP of node `name` (CiliumNode first, as in the full pass) and its node value.
    fn node_value(
        &self,
        snap: &Snapshot,
        name: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<clustermesh_types::model::Node> {
        let mut mini = Snapshot::default();
        if let Some(n) = snap.nodes.get(name) {
            mini.nodes.insert(name.to_string(), n.clone());
        }
        if let Some(n) = snap.cilium_nodes.get(name) {
            mini.cilium_nodes.insert(name.to_string(), n.clone());
        }
        if mini.nodes.is_empty() && mini.cilium_nodes.is_empty() {
            return None;
        }
        self.nodes(&mini, problems).into_iter().next()
    }

    fn incremental_endpoints(
        &mut self,
        idx: &mut Index,
        old: &Snapshot,
        snap: &Snapshot,
        delta: &Delta,
        out: &mut Incremental,
    ) {
        let cluster = self.opts.cluster.name.as_str().to_string();
        let cidrs = &self.opts.cluster_cidrs.clone();
        let mut pods: BTreeSet<Nn> = delta.pods.clone();

        // Nodes: their key, and the pods on them (which take the node's IP as host IP).
        for name in &delta.nodes {
            out.recomputed.insert(format!("Node/{name}"));
            out.recomputed.insert(format!("CiliumNode/{name}"));
            let value = self
                .node_value(snap, name, &mut out.problems)
                .map(|n| n.encode());
            out.changes.set(kvstore::node_key(&cluster, name), value);
        }
        if !delta.nodes.is_empty() {
            // One pass over the pods, not one per changed node.
            for (key, p) in &snap.pods {
                if delta.nodes.contains(&p.spec.node_name) {
                    pods.insert(key.clone());
                }
            }
        }

        // Identities: refcounts of label sets.
        let mut before: BTreeMap<String, usize> = BTreeMap::new();
        // Sets that gained a pod, with their namespace (the identity's), in the order of
        // their first pod: the order in which the full pass allocates.
        let mut gained: HashMap<String, String> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for key in &pods {
            if let Some(p) = old.pods.get(key) {
                if delta.pods.contains(key) {
                    idx.unindex_pod(key, p);
                }
            }
            let pod = snap.pods.get(key);
            if let Some(p) = pod {
                if delta.pods.contains(key) {
                    idx.index_pod(key, p);
                }
            }
            let new_set = pod
                .filter(|p| pod_is_endpoint(p))
                .map(|p| self.pod_identity_labels(snap, p));
            let old_set = idx.pod_sets.get(key).cloned();
            if old_set == new_set {
                continue;
            }
            if let Some(s) = old_set {
                let n = idx.set_refs.get(&s).copied().unwrap_or(0);
                before.entry(s.clone()).or_insert(n);
                if n <= 1 {
                    idx.set_refs.remove(&s);
                } else {
                    idx.set_refs.insert(s, n - 1);
                }
                idx.pod_sets.remove(key);
            }
            if let Some(s) = new_set {
                let n = idx.set_refs.get(&s).copied().unwrap_or(0);
                before.entry(s.clone()).or_insert(n);
                idx.set_refs.insert(s.clone(), n + 1);
                if gained.insert(s.clone(), key.0.clone()).is_none() {
                    order.push(s.clone());
                }
                idx.pod_sets.insert(key.clone(), s);
            }
        }
        // Sets no pod uses any more lose their key (the allocation is kept, as in the full
        // pass); then sets that appeared get one.
        for (set, was) in &before {
            if *was > 0 && !idx.set_refs.contains_key(set) {
                if let Some(id) = self.allocator.id_of(set) {
                    out.changes.delete(kvstore::identity_key(id));
                }
            }
        }
        let mut failed: HashMap<String, String> = HashMap::new();
        // The sets pods use: fixed while the new ones are allocated below (built once, not
        // once per new set).
        let in_use: HashSet<&str> = idx.set_refs.keys().map(String::as_str).collect();
        for set in &order {
            let Some(ns) = gained.get(set).filter(|_| idx.set_refs.contains_key(set)) else {
                continue;
            };
            match self.allocator.allocate(set, &idx.taken, &in_use) {
                Ok(id) => {
                    let key = kvstore::identity_key(id);
                    if self.namespace_global(snap, ns) {
                        out.changes.put(key, set.clone().into_bytes());
                    } else {
                        out.changes.delete(key);
                    }
                }
                Err(e) => {
                    failed.insert(set.clone(), e.to_string());
                }
            }
        }

        // Claims of the changed endpoints.
        let mut affected: BTreeSet<String> = BTreeSet::new();
        let mut owners: Vec<Owner> = pods
            .iter()
            .map(|(ns, name)| Owner {
                kind: "Pod",
                ns: ns.clone(),
                name: name.clone(),
            })
            .collect();
        owners.extend(delta.cilium_endpoints.iter().map(|(ns, name)| Owner {
            kind: "CiliumEndpoint",
            ns: ns.clone(),
            name: name.clone(),
        }));
        for owner in owners {
            out.recomputed
                .insert(format!("{}/{}/{}", owner.kind, owner.ns, owner.name));
            affected.extend(idx.remove_claims(&owner));
            let key = (owner.ns.clone(), owner.name.clone());
            let ips: Vec<String> = if owner.kind == "Pod" {
                match (snap.pods.get(&key), idx.pod_sets.get(&key)) {
                    (Some(p), Some(set)) => match self.allocator.id_of(set) {
                        Some(_) if !failed.contains_key(set) => {
                            let object = || format!("Pod/{}/{}", owner.ns, owner.name);
                            pod_ips(p)
                                .filter(|ip| cidrs::inside(cidrs, object, ip, &mut out.problems))
                                .map(String::from)
                                .collect()
                        }
                        _ => {
                            out.problems.push(Problem {
                                kind: ProblemKind::Invalid,
                                object: format!("Pod/{}/{}", owner.ns, owner.name),
                                message: failed
                                    .get(set)
                                    .cloned()
                                    .unwrap_or_else(|| "no identity could be allocated".into()),
                            });
                            Vec::new()
                        }
                    },
                    _ => Vec::new(),
                }
            } else {
                match snap
                    .cilium_endpoints
                    .get(&key)
                    .and_then(|c| objects::CoreEndpoint::from_endpoint(&owner.ns, &owner.name, c))
                {
                    Some(core) => {
                        let object = || format!("CiliumEndpoint/{}/{}", owner.ns, owner.name);
                        cep_claims(&core, &mut out.problems)
                            .iter()
                            .filter(|e| cidrs::inside(cidrs, object, e.ip, &mut out.problems))
                            .map(|e| e.ip.to_string())
                            .collect()
                    }
                    None => Vec::new(),
                }
            };
            let seen = owner.seen_key();
            if ips.is_empty() {
                self.first_seen.remove(&seen);
            } else if !self.first_seen.contains_key(&seen) {
                self.seq += 1;
                self.first_seen.insert(seen, (self.seq, self.generation));
            }
            affected.extend(ips.iter().cloned());
            idx.add_claims(owner, ips);
        }

        // Each affected IP, decided again by the full pass's rule.
        for ip in affected {
            let key = kvstore::ip_key(&ip);
            let Some(claims) = idx.claims.get(&ip).filter(|c| !c.is_empty()) else {
                self.ip_owner.remove(&ip);
                out.changes.delete(key);
                continue;
            };
            let seq = |o: &Owner| self.first_seen.get(&o.seen_key()).map(|s| s.0);
            let current = self.ip_owner.get(&ip).map(|o| o.0);
            let chosen = claims
                .iter()
                .find(|o| current.is_some() && seq(o) == current)
                .or_else(|| claims.iter().min_by_key(|o| seq(o).unwrap_or(u64::MAX)))
                .cloned();
            let Some(chosen) = chosen else { continue };
            let chosen_seq = seq(&chosen).unwrap_or(u64::MAX);
            self.ip_owner
                .insert(ip.clone(), (chosen_seq, self.generation));
            if !self.namespace_global(snap, &chosen.ns) {
                out.changes.delete(key);
                continue;
            }
            match self.claim_pair(idx, snap, &chosen, &ip) {
                Some(pair) => out
                    .changes
                    .put(kvstore::ip_key(&pair.prefix_string()), pair.encode()),
                None => out.changes.delete(key),
            }
        }
    }

    /// The ipcache value of `owner`'s claim on `ip`.
    fn claim_pair(
        &self,
        idx: &Index,
        snap: &Snapshot,
        owner: &Owner,
        ip: &str,
    ) -> Option<clustermesh_types::model::IpIdentityPair> {
        let key = (owner.ns.clone(), owner.name.clone());
        if owner.kind == "Pod" {
            let pod = snap.pods.get(&key)?;
            let id = self.allocator.id_of(idx.pod_sets.get(&key)?)?;
            let host_ip = match pod.status.host_ip.as_deref().filter(|s| !s.is_empty()) {
                Some(h) => Cow::Borrowed(h),
                None => Cow::Owned(
                    self.node_value(snap, &pod.spec.node_name, &mut Vec::new())
                        .and_then(|n| node_internal_ip(&n))
                        .unwrap_or_default(),
                ),
            };
            let ep = Ep {
                kind: "Pod",
                ns: &owner.ns,
                name: &owner.name,
                ip,
                src: EpSrc::Pod {
                    pod: pod.as_ref(),
                    id,
                    host_ip,
                },
            };
            return Some(ep.pair());
        }
        let find = |core: &objects::CoreEndpoint| {
            cep_claims(core, &mut Vec::new())
                .into_iter()
                .find(|e| e.ip == ip)
                .map(|e| e.pair())
        };
        if self.opts.enable_cilium_endpoint_slice {
            objects::CoreEndpoint::from_slices(&snap.cilium_endpoint_slices)
                .iter()
                .filter(|c| c.namespace == owner.ns && c.name == owner.name)
                .find_map(find)
        } else {
            let cep = snap.cilium_endpoints.get(&key)?;
            find(&objects::CoreEndpoint::from_endpoint(
                &owner.ns,
                &owner.name,
                cep,
            )?)
        }
    }

    fn incremental_services(
        &mut self,
        idx: &mut Index,
        old: &Snapshot,
        snap: &Snapshot,
        delta: &Delta,
        out: &mut Incremental,
    ) -> Result<(), FullPass> {
        let cluster = self.opts.cluster.name.as_str().to_string();
        let mut svcs: BTreeSet<Nn> = delta.services.clone();
        svcs.extend(delta.service_exports.iter().cloned());
        for key in &delta.endpoint_slices {
            for s in [old.endpoint_slices.get(key), snap.endpoint_slices.get(key)]
                .into_iter()
                .flatten()
            {
                if let Some(svc) = service_of(s) {
                    svcs.insert((key.0.clone(), svc.clone()));
                }
            }
            // Services that generate (or could generate) a slice of this name: a real slice
            // of that name wins over theirs.
            let (ns, name) = key;
            for (k, _) in in_namespace(&snap.services, ns) {
                if could_generate(&k.1, name) {
                    svcs.insert(k.clone());
                }
            }
        }
        svcs.extend(services_selecting(old, snap, &delta.pods));

        // A service whose real slices start or stop being exported (it became global or
        // not, appeared, went) unblocks or blocks generated slices of the same names.
        let mut unblocked = BTreeSet::new();
        for (ns, name) in &svcs {
            for s in [old, snap] {
                for ((_, sname), slice) in in_namespace(&s.endpoint_slices, ns) {
                    if service_of(slice) != Some(name) {
                        continue;
                    }
                    for (k, _) in in_namespace(&snap.services, ns) {
                        if could_generate(&k.1, sname) {
                            unblocked.insert(k.clone());
                        }
                    }
                }
            }
        }
        svcs.extend(unblocked);

        let slices_on = self.opts.service_v2.exports_endpoint_slices();
        let mut dropped: Vec<(Nn, BTreeSet<String>)> = Vec::new();
        for k in &svcs {
            let (ns, name) = k;
            out.recomputed.insert(format!("Service/{ns}/{name}"));
            let svc = snap.services.get(k);
            let (global, local) = match svc {
                Some(s) => self.service_values(snap, &idx.labels, ns, name, s, &mut out.problems),
                None => (None, None),
            };
            out.changes
                .set(kvstore::service_key(&cluster, ns, name), global);
            out.changes.set(kvstore::local_service_key(ns, name), local);
            let export = snap
                .service_exports
                .get(k)
                .and_then(|se| self.service_export_value(snap, ns, name, se));
            out.changes
                .set(kvstore::service_export_key(&cluster, ns, name), export);
            if !slices_on {
                continue;
            }
            let mut keys = BTreeSet::new();
            let mut real = false;
            for ((_, sname), slice) in in_namespace(&snap.endpoint_slices, ns) {
                if service_of(slice) != Some(name) {
                    continue;
                }
                real = true;
                out.recomputed.insert(format!("EndpointSlice/{ns}/{sname}"));
                if let Some(v) = self.real_slice_value(snap, ns, sname, slice, &mut out.problems) {
                    let key = kvstore::endpoint_slice_key(&cluster, ns, sname);
                    out.changes.put(key.clone(), v);
                    keys.insert(key);
                }
            }
            if let Some(s) = svc.filter(|s| !real && self.service_exported(snap, ns, s)) {
                for gs in self.pod_slices(snap, &idx.labels, ns, name, s) {
                    let key = kvstore::endpoint_slice_key(&cluster, ns, &gs.name);
                    let real_wins = snap
                        .endpoint_slices
                        .get(&(ns.clone(), gs.name.clone()))
                        .is_some_and(|r| {
                            self.real_slice_value(snap, ns, &gs.name, r, &mut Vec::new())
                                .is_some()
                        });
                    if real_wins {
                        continue;
                    }
                    if idx.slice_owner.get(&key).is_some_and(|o| o != k) {
                        // Which service keeps it depends on the order of all services.
                        return Err("two services generate an EndpointSlice of one name");
                    }
                    out.changes.put(key.clone(), gs.encode());
                    keys.insert(key);
                }
            }
            for key in &keys {
                idx.slice_owner.insert(key.clone(), k.clone());
            }
            let before = idx.slice_keys.remove(k).unwrap_or_default();
            dropped.push((k.clone(), before.difference(&keys).cloned().collect()));
            if !keys.is_empty() {
                idx.slice_keys.insert(k.clone(), keys);
            }
        }
        // Keys a service no longer produces go, unless another service took them over.
        for (k, keys) in dropped {
            for key in keys {
                if idx.slice_owner.get(&key) == Some(&k) {
                    idx.slice_owner.remove(&key);
                    out.changes.delete(key);
                }
            }
        }

        for key in &delta.policies {
            let (kind, ns, name) = key;
            let value = snap
                .policies
                .get(key)
                .and_then(|p| serde_json::to_vec(&p.raw).ok());
            out.changes
                .set(kvstore::local_policy_key(kind, ns, name), value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Options, ServiceV2Mode, Store};
    use crate::identity::Allocator;
    use crate::source::Object;
    use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};
    use clustermesh_types::cluster_cidrs::ClusterCidrs;
    use serde_json::json;

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len() as u64) as usize]
        }
    }

    fn exporter(service_v2: ServiceV2Mode, cidrs: &[&str]) -> Exporter {
        let cluster = ClusterInfo {
            name: ClusterName::new("c1").unwrap(),
            id: 1,
            max_connected_clusters: MaxConnectedClusters::Max255,
        };
        Exporter::new(
            Options {
                cluster: cluster.clone(),
                enable_mcs_api: true,
                default_global_namespace: true,
                service_v2,
                enable_cilium_endpoint_slice: false,
                cluster_cidrs: ClusterCidrs::parse(cidrs).unwrap(),
            },
            Allocator::new(cluster.identity_range(), None).unwrap(),
        )
    }

    fn insert(snap: &mut Snapshot, v: serde_json::Value) {
        snap.insert(Object::from_value(v).unwrap());
    }

    const NS: &[&str] = &["default", "shop", "private"];
    const APPS: &[&str] = &["a", "b", "c", "d"];

    fn ip(rng: &mut Rng) -> String {
        // A small pool, so endpoints often claim one IP.
        format!("10.0.0.{}", rng.below(40) + 1)
    }

    fn pod(rng: &mut Rng, ns: &str, name: &str) -> serde_json::Value {
        let mut status = json!({"phase": if rng.below(10) == 0 { "Succeeded" } else { "Running" }, "podIP": ip(rng)});
        if rng.below(3) > 0 {
            status["hostIP"] = json!(format!("198.18.0.{}", rng.below(4)));
        }
        if rng.below(4) == 0 {
            status["conditions"] = json!([{"type": "Ready", "status": "False"}]);
        }
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{}", rng.below(1000)),
                "labels": {"app": rng.pick(APPS), "tier": rng.pick(&["x", "y"])}},
            "spec": {"nodeName": format!("n{}", rng.below(4)),
                "serviceAccountName": rng.pick(&["default", "sa1"]),
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8000 + rng.below(2)}]}]},
            "status": status})
    }

    fn cep(rng: &mut Rng, ns: &str, name: &str) -> serde_json::Value {
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": name, "namespace": ns},
            "status": {"identity": {"id": 70000 + rng.below(5)},
                "networking": {"addressing": [{"ipv4": ip(rng)}], "node": "198.18.0.9"}}})
    }

    fn service(rng: &mut Rng, ns: &str, name: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": {
                "service.cilium.io/global": rng.pick(&["true", "true", "false"]),
                "service.cilium.io/shared": rng.pick(&["true", "true", "false"])}},
            "spec": {"clusterIP": format!("172.20.0.{}", rng.below(200) + 1),
                "ports": [{"name": "http", "port": 80, "targetPort": rng.pick(&["http", "8000"]).parse::<u16>().map(|p| json!(p)).unwrap_or(json!("http"))}],
                "selector": {"app": rng.pick(APPS)}}})
    }

    fn slice(rng: &mut Rng, ns: &str, name: &str) -> serde_json::Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                "labels": {"kubernetes.io/service-name": format!("svc{}", rng.below(4))}},
            "addressType": rng.pick(&["IPv4", "IPv4", "FQDN"]),
            "endpoints": [{"addresses": [ip(rng)], "conditions": {"ready": rng.below(4) > 0}}],
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]})
    }

    fn node(rng: &mut Rng, name: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": format!("10.{}.0.0/24", rng.below(200))},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("198.19.0.{}", rng.below(250))}]}})
    }

    /// Every key of every store, as etcd would hold it after a full pass.
    fn full(ex: &mut Exporter, snap: &Snapshot) -> BTreeMap<String, Vec<u8>> {
        let (desired, _) = ex.compute(snap);
        ex.build_index(snap);
        desired
            .into_iter()
            .filter(|(s, _)| Store::ALL.contains(s))
            .flat_map(|(_, m)| m)
            .collect()
    }

    fn random_event(rng: &mut Rng, snap: &mut Snapshot) {
        let ns = rng.pick(NS).to_string();
        match rng.below(20) {
            0..=7 => {
                let name = format!("p{}", rng.below(30));
                if rng.below(5) == 0 {
                    snap.pods.remove(&(ns, name));
                } else {
                    let v = pod(rng, &ns, &name);
                    insert(snap, v);
                }
            }
            8..=10 => {
                let name = format!("p{}", rng.below(30));
                if rng.below(4) == 0 {
                    snap.cilium_endpoints.remove(&(ns, name));
                } else {
                    let v = cep(rng, &ns, &name);
                    insert(snap, v);
                }
            }
            11..=13 => {
                let name = format!("svc{}", rng.below(4));
                if rng.below(5) == 0 {
                    snap.services.remove(&(ns, name));
                } else {
                    let v = service(rng, &ns, &name);
                    insert(snap, v);
                }
            }
            14..=15 => {
                // Slice names that collide with generated ones (`svc1`) as well.
                let name = rng.pick(&["s1", "s2", "svc1", "svc2-ipv6"]).to_string();
                if rng.below(3) == 0 {
                    snap.endpoint_slices.remove(&(ns, name));
                } else {
                    let v = slice(rng, &ns, &name);
                    insert(snap, v);
                }
            }
            16 => {
                let name = format!("n{}", rng.below(4));
                if rng.below(5) == 0 {
                    snap.nodes.remove(&name);
                } else {
                    let v = node(rng, &name);
                    insert(snap, v);
                }
            }
            17 => {
                let name = format!("svc{}", rng.below(4));
                if rng.below(2) == 0 {
                    snap.service_exports.remove(&(ns, name));
                } else {
                    insert(
                        snap,
                        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                            "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T00:00:00Z"}}),
                    );
                }
            }
            18 => {
                let name = format!("pol{}", rng.below(3));
                if rng.below(2) == 0 {
                    snap.policies
                        .remove(&("CiliumNetworkPolicy".into(), ns, name));
                } else {
                    insert(
                        snap,
                        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"endpointSelector": {"matchLabels": {"app": rng.pick(APPS)}}}}),
                    );
                }
            }
            _ => {
                // A namespace change: not local, a full pass.
                let global = rng.pick(&["true", "false"]);
                insert(
                    snap,
                    json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "private", "annotations": {"clustermesh.cilium.io/global": global}}}),
                );
            }
        }
    }

    fn equivalence(seed: u64, service_v2: ServiceV2Mode, cidrs: &[&str]) {
        let mut rng = Rng(seed);
        let mut ex = exporter(service_v2, cidrs);
        let mut snap = Snapshot::default();
        for ns in NS {
            insert(
                &mut snap,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            );
        }
        insert(
            &mut snap,
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": crate::export::SERVICE_EXPORT_CRD}}),
        );
        for _ in 0..150 {
            random_event(&mut rng, &mut snap);
        }
        // The mirror of etcd: a full pass, then only incremental changes.
        let mut mirror = full(&mut ex, &snap);
        // A twin that sees the same snapshots but only ever runs full passes: the contents
        // must be the same, not only consistent with the state the incremental path kept.
        let mut twin = exporter(service_v2, cidrs);
        full(&mut twin, &snap);
        let (mut incremental, mut fallbacks, mut keys) = (0, 0, 0);
        for round in 0..200 {
            let prev = snap.clone();
            for _ in 0..=rng.below(3) {
                random_event(&mut rng, &mut snap);
            }
            let result = Delta::between(&prev, &snap, ex.options())
                .and_then(|d| ex.compute_incremental(&prev, &snap, &d));
            match result {
                Ok(inc) => {
                    incremental += 1;
                    keys += inc.changes.len();
                    for (k, v) in inc.changes.into_vec() {
                        match v {
                            Some(v) => mirror.insert(k, v),
                            None => mirror.remove(&k),
                        };
                    }
                }
                Err(_) => {
                    fallbacks += 1;
                    mirror = full(&mut ex, &snap);
                }
            }
            let want = full(&mut twin, &snap);
            let differ: BTreeSet<&String> = want
                .keys()
                .chain(mirror.keys())
                .filter(|k| want.get(*k) != mirror.get(*k))
                .collect();
            assert!(
                differ.is_empty(),
                "seed {seed}, round {round}: full passes alone export otherwise: {differ:?}"
            );
            if round % 50 == 49 || round == 199 {
                // A full pass (a relist) over the same objects must write nothing.
                let want = full(&mut ex, &snap);
                let differ: BTreeSet<&String> = want
                    .keys()
                    .chain(mirror.keys())
                    .filter(|k| want.get(*k) != mirror.get(*k))
                    .collect();
                assert!(
                    differ.is_empty(),
                    "seed {seed}, round {round}: a full pass would write {} keys: {differ:?}",
                    differ.len()
                );
            }
        }
        // The test is about the incremental path: most rounds must have taken it.
        assert!(
            incremental > 3 * fallbacks && keys > 0,
            "seed {seed}: {incremental} incremental passes, {fallbacks} full"
        );
    }

    #[test]
    fn incremental_equals_full() {
        for seed in [1, 99991] {
            equivalence(seed, ServiceV2Mode::PreferLegacy, &[]);
        }
    }

    /// With `--cluster-cidr` the passes leave out the same addresses and node pod CIDRs:
    /// the pool's IPs 10.0.0.32..=40 are outside, and most nodes' `10.<n>.0.0/24`.
    #[test]
    fn incremental_equals_full_with_cluster_cidrs() {
        let cidrs = ["10.0.0.0/27", "10.100.0.0/14"];
        for seed in [7, 4242] {
            equivalence(seed, ServiceV2Mode::PreferLegacy, &cidrs);
        }
        let mut rng = Rng(7);
        let mut snap = Snapshot::default();
        for _ in 0..150 {
            random_event(&mut rng, &mut snap);
        }
        let (desired, problems) = exporter(ServiceV2Mode::PreferLegacy, &cidrs).compute(&snap);
        let outside = problems
            .iter()
            .filter(|p| p.kind == ProblemKind::OutsideClusterCidrs)
            .count();
        assert!(outside > 0, "the random snapshot has addresses outside");
        let allowed = ClusterCidrs::parse(cidrs).unwrap();
        for key in desired[&Store::Ip].keys() {
            let ip = key.rsplit('/').next().unwrap();
            assert!(allowed.contains_ip(&ip.parse().unwrap()), "{key} exported");
        }
    }

    #[test]
    fn incremental_equals_full_with_endpointslices_only() {
        for seed in [11, 2026] {
            equivalence(seed, ServiceV2Mode::OnlyEndpointSlice, &[]);
        }
    }

    #[test]
    fn unchanged_snapshot_changes_nothing() {
        let mut rng = Rng(5);
        let mut ex = exporter(ServiceV2Mode::PreferLegacy, &[]);
        let mut snap = Snapshot::default();
        for _ in 0..100 {
            random_event(&mut rng, &mut snap);
        }
        full(&mut ex, &snap);
        let copy = snap.clone();
        let d = Delta::between(&snap, &copy, ex.options()).unwrap();
        assert!(d.is_empty());
        let inc = ex.compute_incremental(&snap, &copy, &d).unwrap();
        assert!(inc.changes.is_empty());
    }
}
