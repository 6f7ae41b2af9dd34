//! From cluster state to map entries, by diff.
//!
//! [`Desired`] is the pure part: every ipcache entry read from any cluster, keyed by the
//! cluster and etcd key, resolved per prefix to one map value (the local cluster wins an IP
//! claimed by several clusters, then the lowest cluster name) and to the pods that live on
//! this node. [`Reconciler`] owns the [`Datapath`] and keeps what the maps hold
//! (`applied`); a flush writes only the difference between the two, in batches.
//!
//! Rules (docs/lab-datapath-contract.md):
//! * a pod of the local cluster whose `HostIP` is this node → ipcache entry without tunnel,
//!   plus a local endpoints entry (host veth by the name rule, pod MAC by the MAC rule, host
//!   veth MAC and ifindex from the interface) and `from_pod` attached to the veth;
//! * any other pod → ipcache entry tunnelled to `HostIP` (`HAS_TUNNEL`, plus
//!   `REMOTE_CLUSTER` for other clusters); no `HostIP` → entry without tunnel;
//! * IPv6 entries are not programmed yet (counted as unsupported).
//!
//! Start-up adopts the maps' contents as `applied`, so an unchanged entry is never written
//! again and nothing is cleared: entries that no cluster claims any more are removed only
//! by [`Reconciler::sweep`], which the caller runs once the clusters they may belong to have
//! synced. A veth that does not exist yet leaves its pod waiting; [`Reconciler::sync_pods`]
//! is called again when the interface list changes.
//!
//! It must not read etcd or change interfaces beyond attaching programs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use clustermesh_ebpf_abi::{
    family, ipcache_flags, EndpointInfo, IpcacheKey, IpcacheLpmKey, IpcacheValue,
};
use clustermesh_syncer::remote::{self, Change, Resource, Value};
use clustermesh_types::identity::LabelArray;
use clustermesh_types::model::IpIdentityPair;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::datapath::{self, Attached, Datapath, Program};
use crate::ifaces;

/// One unit of work for the reconciler.
#[derive(Debug, Clone)]
pub enum Input {
    /// An ipcache entry of `cluster` changed (`pair: None` = deleted).
    Endpoint {
        /// The cluster that published it.
        cluster: Arc<str>,
        /// Its etcd key (unique per cluster).
        key: String,
        /// The validated entry.
        pair: Option<Arc<IpIdentityPair>>,
    },
    /// `cluster`'s ipcache has been listed completely (every entry before this input).
    Synced {
        /// The cluster.
        cluster: Arc<str>,
    },
    /// A removed remote's entries have all been deleted.
    Drained {
        /// The cluster.
        cluster: Arc<str>,
    },
    /// An identity of `cluster` changed (`labels: None` = deleted): for policy and flow
    /// enrichment ([`crate::policy::hook`]); the reconciler ignores it.
    Identity {
        /// The cluster that published it.
        cluster: Arc<str>,
        /// Numeric identity.
        id: u32,
        /// Its labels.
        labels: Option<Arc<LabelArray>>,
    },
    /// A local policy changed (`raw: None` = deleted); the reconciler ignores it.
    Policy {
        /// Key below `clustermesh/local/v1/policies/`: `<kind>/<namespace>/<name>`.
        key: String,
        /// The exported policy (JSON).
        raw: Option<Vec<u8>>,
    },
}

impl Input {
    /// The reconciler's view of a remote reader event (only ipcache entries matter).
    pub fn from_remote(ev: remote::Event) -> Option<Input> {
        match ev {
            remote::Event::Change {
                cluster,
                resource: Resource::Endpoints,
                key,
                change,
            } => Some(Input::Endpoint {
                cluster,
                key,
                pair: match change {
                    Change::Upsert {
                        value: Value::Endpoint(p),
                        ..
                    } => Some(p),
                    Change::Upsert { .. } => return None,
                    Change::Delete { .. } => None,
                },
            }),
            remote::Event::Synced {
                cluster,
                resource: Resource::Endpoints,
            } => Some(Input::Synced { cluster }),
            remote::Event::Drained { cluster } => Some(Input::Drained { cluster }),
            remote::Event::Change {
                cluster,
                resource: Resource::Identities,
                key,
                change,
            } => Some(Input::Identity {
                cluster,
                id: key.rsplit('/').next()?.parse().ok()?,
                labels: match change {
                    Change::Upsert {
                        value: Value::Identity(l),
                        ..
                    } => Some(l),
                    Change::Upsert { .. } => return None,
                    Change::Delete { .. } => None,
                },
            }),
            _ => None,
        }
    }
}

/// An IPv4 prefix (the ipcache key without cluster ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    /// Address (host bits as published).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub bits: u8,
}

impl Prefix {
    /// The map key.
    pub fn lpm_key(self) -> IpcacheLpmKey {
        IpcacheLpmKey {
            prefixlen: IpcacheKey::prefixlen(u32::from(self.bits)),
            key: IpcacheKey::v4(self.addr.octets()),
        }
    }

    /// The prefix of a map key this agent writes (IPv4, cluster 0), else `None`.
    pub fn from_lpm_key(k: &IpcacheLpmKey) -> Option<Self> {
        let bits = k
            .prefixlen
            .checked_sub(clustermesh_ebpf_abi::IPCACHE_STATIC_PREFIX)?;
        if k.key.family != family::IPV4 || k.key.cluster_id != 0 || bits > 32 {
            return None;
        }
        let a = k.key.addr;
        Some(Self {
            addr: Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            bits: bits as u8,
        })
    }
}

impl std::hash::Hash for Prefix {
    /// One word (address and length packed), so the table hashes one `u64`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(u32::from(self.addr)) << 8 | u64::from(self.bits));
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalPod {
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Security identity.
    pub identity: u32,
    /// Host-side veth (name rule).
    pub interface: String,
}

/// What one cluster's entry asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The map value.
    pub value: IpcacheValue,
    /// Set when the entry is a pod on this node.
    pub pod: Option<Arc<LocalPod>>,
}

/// The prefix and claim for `pair` published by `cluster`; `None` for entries this datapath
/// cannot program (IPv6, unparsable).
pub fn claim(
    local: &str,
    node_ip: Ipv4Addr,
    cluster: &str,
    pair: &IpIdentityPair,
) -> Option<(Prefix, Claim)> {
    let addr: Ipv4Addr = pair.ip.parse().ok()?;
    let bits = pair.prefix_len().unwrap_or(32);
    if bits > 32 {
        return None;
    }
    let prefix = Prefix { addr, bits };
    let host: Option<Ipv4Addr> = pair.host_ip.parse().ok();
    let is_local_cluster = cluster == local;
    let claim = match host {
        Some(h) if h == node_ip && is_local_cluster => Claim {
            value: IpcacheValue {
                key: pair.key,
                ..IpcacheValue::local(pair.id)
            },
            pod: (bits == 32 && !pair.k8s_pod_name.is_empty()).then(|| {
                Arc::new(LocalPod {
                    ip: addr,
                    namespace: pair.k8s_namespace.clone(),
                    name: pair.k8s_pod_name.clone(),
                    identity: pair.id,
                    interface: ifaces::host_veth_name(&pair.k8s_namespace, &pair.k8s_pod_name),
                })
            }),
        },
        Some(h) => {
            let mut value = IpcacheValue::tunnel_v4(pair.id, h.octets());
            value.key = pair.key;
            if !is_local_cluster {
                value.flags |= ipcache_flags::REMOTE_CLUSTER;
            }
            Claim { value, pod: None }
        }
        None => Claim {
            value: IpcacheValue {
                key: pair.key,
                flags: if is_local_cluster {
                    0
                } else {
                    ipcache_flags::REMOTE_CLUSTER
                },
                ..IpcacheValue::local(pair.id)
            },
            pod: None,
        },
    };
    Some((prefix, claim))
}

/// FxHash (rustc's hasher): the maps here are keyed by prefixes and etcd keys that the
/// readers already validated, so HashDoS resistance buys nothing and SipHash would cost a
/// third of a 250k-entry resync.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    /// Folds the high half of a 128-bit product into the low half: FxHash's last multiply
    /// leaves the low bits depending only on the input's low bits, and hashbrown picks the
    /// bucket from the low bits. Without this, 250k consecutive pod IPs fell into 128
    /// buckets and every lookup probed a long chain.
    fn finish(&self) -> u64 {
        let m = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (m as u64) ^ (m >> 64) as u64
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type Fx = std::hash::BuildHasherDefault<FxHasher>;
type FxMap<K, V> = HashMap<K, V, Fx>;

/// The claims on one prefix: almost always exactly one cluster's.
#[derive(Debug)]
enum Claims {
    One(Arc<str>, Claim),
    Many(BTreeMap<Arc<str>, Claim>),
}

impl Claims {
    fn insert(&mut self, cluster: &Arc<str>, c: Claim) {
        match self {
            Claims::One(k, v) if k == cluster => *v = c,
            Claims::One(k, v) => {
                let mut m = BTreeMap::new();
                m.insert(k.clone(), v.clone());
                m.insert(cluster.clone(), c);
                *self = Claims::Many(m);
            }
            Claims::Many(m) => {
                m.insert(cluster.clone(), c);
            }
        }
    }

    /// Removes `cluster`'s claim; `true` if none is left.
    fn remove(&mut self, cluster: &Arc<str>) -> bool {
        match self {
            Claims::One(k, _) => k == cluster,
            Claims::Many(m) => {
                m.remove(cluster);
                if m.len() == 1 {
                    if let Some((k, v)) = m.pop_first() {
                        *self = Claims::One(k, v);
                    }
                    return false;
                }
                m.is_empty()
            }
        }
    }

    fn winner(&self, local: &Arc<str>) -> Option<&Claim> {
        match self {
            Claims::One(_, v) => Some(v),
            Claims::Many(m) => m.get(local).or_else(|| m.values().next()),
        }
    }
}

/// The map write one prefix needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The map is up to date.
    None,
    /// Write this value.
    Upsert(IpcacheValue),
    /// Delete the element (it held this value).
    Delete(IpcacheValue),
}

/// One prefix: what the clusters claim and what the map holds.
#[derive(Debug, Default)]
struct Slot {
    claims: Option<Claims>,
    applied: Option<IpcacheValue>,
}

/// The part of an etcd ipcache key after `cilium/{state,cache}/ip/v1/<default|cluster>/`:
/// the entry's prefix string (the readers reject entries whose key does not match it).
fn key_prefix(key: &str) -> Option<Prefix> {
    let rel = key.splitn(6, '/').nth(5)?;
    let (ip, bits) = match rel.split_once('/') {
        Some((ip, bits)) => (ip, bits.parse().ok()?),
        None => (rel, 32),
    };
    (bits <= 32).then_some(())?;
    Some(Prefix {
        addr: ip.parse().ok()?,
        bits,
    })
}

/// Desired and applied state per prefix, in one table so that a change costs one hash
/// lookup to record and one to flush (250k entries must reconcile at ≥ 500k/s). Pure (no
/// maps): the [`Reconciler`] writes and then records what it wrote.
#[derive(Debug)]
pub struct Desired {
    local: Arc<str>,
    node_ip: Ipv4Addr,
    table: FxMap<Prefix, Slot>,
    dirty: Vec<Prefix>,
    claimed: usize,
    applied: usize,
    unsupported: u64,
}

impl Desired {
    /// Empty state for the agent of `local` on `node_ip`.
    pub fn new(local: Arc<str>, node_ip: Ipv4Addr) -> Self {
        Self {
            local,
            node_ip,
            table: FxMap::default(),
            dirty: Vec::new(),
            claimed: 0,
            applied: 0,
            unsupported: 0,
        }
    }

    /// Applies an entry change (`key` is its etcd key); the prefixes it touches become
    /// dirty.
    pub fn apply(
        &mut self,
        cluster: &Arc<str>,
        key: impl AsRef<str>,
        pair: Option<&IpIdentityPair>,
    ) {
        let key = key.as_ref();
        let new = pair.and_then(|p| claim(&self.local, self.node_ip, cluster, p));
        let prefix = match (&new, key_prefix(key)) {
            (Some((p, _)), _) => *p,
            (None, Some(p)) => p,
            (None, None) => {
                if pair.is_some() {
                    self.unsupported += 1;
                }
                return;
            }
        };
        let slot = self.table.entry(prefix).or_default();
        match (new, &mut slot.claims) {
            (Some((_, c)), Some(claims)) => {
                if matches!(claims, Claims::One(k, v) if k == cluster && *v == c) {
                    return; // unchanged (a relist of the same data)
                }
                claims.insert(cluster, c);
            }
            (Some((_, c)), none @ None) => {
                *none = Some(Claims::One(cluster.clone(), c));
                self.claimed += 1;
            }
            (None, Some(claims)) => {
                if claims.remove(cluster) {
                    slot.claims = None;
                    self.claimed -= 1;
                }
            }
            (None, None) => return,
        }
        self.dirty.push(prefix);
    }

    /// The winning claim for `prefix`: the local cluster's, else the lowest cluster name's.
    pub fn winner(&self, prefix: &Prefix) -> Option<&Claim> {
        self.table.get(prefix)?.claims.as_ref()?.winner(&self.local)
    }

    /// `true` if some cluster claims `prefix`.
    pub fn contains(&self, prefix: &Prefix) -> bool {
        self.table.get(prefix).is_some_and(|s| s.claims.is_some())
    }

    /// Decides the map write for `prefix` and records its outcome as applied right away
    /// (one hash lookup per entry; a failed write is undone with [`Self::set_applied`]).
    /// Also returns the winner's local pod.
    pub fn plan(&mut self, prefix: &Prefix) -> (Action, Option<Arc<LocalPod>>) {
        let Some(slot) = self.table.get_mut(prefix) else {
            return (Action::None, None);
        };
        let winner = slot.claims.as_ref().and_then(|c| c.winner(&self.local));
        let pod = winner.and_then(|c| c.pod.clone());
        let want = winner.map(|c| c.value);
        let action = match (want, slot.applied) {
            (Some(v), Some(a)) if v == a => Action::None,
            (Some(v), old) => {
                slot.applied = Some(v);
                if old.is_none() {
                    self.applied += 1;
                }
                Action::Upsert(v)
            }
            (None, Some(old)) => {
                slot.applied = None;
                self.applied -= 1;
                Action::Delete(old)
            }
            (None, None) => Action::None,
        };
        if slot.claims.is_none() && slot.applied.is_none() {
            self.table.remove(prefix);
        }
        (action, pod)
    }

    /// Records what the map holds for `prefix` (after a write, or found at start).
    pub fn set_applied(&mut self, prefix: Prefix, value: Option<IpcacheValue>) {
        let slot = self.table.entry(prefix).or_default();
        match (slot.applied.is_some(), value.is_some()) {
            (false, true) => self.applied += 1,
            (true, false) => self.applied -= 1,
            _ => {}
        }
        slot.applied = value;
        if slot.applied.is_none() && slot.claims.is_none() {
            self.table.remove(&prefix);
        }
    }

    /// Prefixes in the map that no cluster claims; with `remote: false` only those without
    /// the `REMOTE_CLUSTER` flag.
    pub fn stale(&self, remote: bool) -> Vec<Prefix> {
        self.table
            .iter()
            .filter(|(_, s)| {
                s.claims.is_none()
                    && s.applied
                        .is_some_and(|v| remote || v.flags & ipcache_flags::REMOTE_CLUSTER == 0)
            })
            .map(|(p, _)| *p)
            .collect()
    }

    /// Takes the prefixes changed since the last call (each once).
    pub fn take_dirty(&mut self) -> Vec<Prefix> {
        let mut d = std::mem::take(&mut self.dirty);
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Marks prefixes dirty again (after a failed flush).
    pub fn redirty(&mut self, prefixes: impl IntoIterator<Item = Prefix>) {
        self.dirty.extend(prefixes);
    }

    /// Prefixes claimed.
    pub fn len(&self) -> usize {
        self.claimed
    }

    /// No prefix claimed.
    pub fn is_empty(&self) -> bool {
        self.claimed == 0
    }

    /// Prefixes the map holds (as far as this agent wrote or adopted them).
    pub fn applied_len(&self) -> usize {
        self.applied
    }

    /// Entries that could not be programmed so far.
    pub fn unsupported(&self) -> u64 {
        self.unsupported
    }
}

/// Counters of the reconciler (`/status` → `reconcile`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stats {
    /// ipcache entries found in the pinned map at start.
    pub adopted_ipcache: usize,
    /// Local endpoints found in the pinned map at start.
    pub adopted_endpoints: usize,
    /// ipcache elements written.
    pub ipcache_upserts: u64,
    /// ipcache elements deleted.
    pub ipcache_deletes: u64,
    /// Local endpoint elements written.
    pub endpoint_upserts: u64,
    /// Local endpoint elements deleted.
    pub endpoint_deletes: u64,
    /// Stale elements removed by sweeps.
    pub swept: u64,
    /// Flushes that wrote something.
    pub flushes: u64,
    /// Failed map operations (retried on the next flush).
    pub errors: u64,
    /// Duration of the last flush that wrote something, microseconds.
    pub last_flush_micros: u64,
    /// Entries that cannot be programmed (IPv6).
    pub unsupported: u64,
    /// Attachments that swapped the program into a link left by an earlier agent.
    pub attach_replaced: u64,
    /// New attachments.
    pub attach_created: u64,
}

/// A local pod and how far it got.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PodReport {
    /// The pod.
    #[serde(flatten)]
    pub pod: LocalPod,
    /// Its veth's ifindex, when it exists.
    pub ifindex: Option<u32>,
    /// `from_pod` attached to the veth.
    pub attached: bool,
    /// `attached`, `waiting-for-interface` or the last error.
    pub state: String,
}

/// Fill level of a map.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MapFill {
    /// Elements.
    pub entries: usize,
    /// Capacity.
    pub max_entries: u32,
    /// `entries / max_entries` (Cilium's map pressure).
    pub pressure: f64,
}

impl MapFill {
    fn new(entries: usize, max_entries: u32) -> Self {
        Self {
            entries,
            max_entries,
            pressure: if max_entries == 0 {
                0.0
            } else {
                entries as f64 / f64::from(max_entries)
            },
        }
    }
}

/// Reconciler state for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The ipcache.
    pub ipcache: MapFill,
    /// The local endpoints map.
    pub local_endpoints: MapFill,
    /// Batched syscalls in use for the ipcache.
    pub batched_updates: bool,
    /// Pods on this node.
    pub pods: Vec<PodReport>,
    /// Clusters whose ipcache initial sync has been applied to the maps.
    pub synced_clusters: Vec<String>,
    /// Stale entries of the local cluster have been swept.
    pub swept_local: bool,
    /// Stale entries of remote clusters have been swept.
    pub swept_remote: bool,
    /// Counters.
    pub stats: Stats,
}

#[derive(Debug, Clone)]
struct PodState {
    ifindex: Option<u32>,
    attached: bool,
    state: String,
}

/// Owns the datapath and keeps its maps equal to [`Desired`]; see the module docs.
pub struct Reconciler {
    dp: Datapath,
    desired: Desired,
    max_ipcache: u32,
    max_endpoints: u32,
    /// Elements in the ipcache this agent never writes (IPv6, cluster ID ≠ 0): swept.
    foreign: Vec<IpcacheLpmKey>,
    pods: BTreeMap<Ipv4Addr, Arc<LocalPod>>,
    pods_dirty: bool,
    pod_state: BTreeMap<Ipv4Addr, PodState>,
    applied_eps: HashMap<Ipv4Addr, EndpointInfo>,
    synced: BTreeSet<Arc<str>>,
    pending_synced: Vec<Arc<str>>,
    swept_local: bool,
    swept_remote: bool,
    stats: Stats,
}

impl Reconciler {
    /// Takes over `dp`, adopting what its (possibly pinned, pre-filled) maps hold.
    pub fn new(
        dp: Datapath,
        local: Arc<str>,
        node_ip: Ipv4Addr,
        max_ipcache: u32,
        max_endpoints: u32,
    ) -> datapath::Result<Self> {
        let mut desired = Desired::new(local, node_ip);
        let mut foreign = Vec::new();
        for (k, v) in dp.maps.ipcache.entries()? {
            match Prefix::from_lpm_key(&k) {
                Some(p) => desired.set_applied(p, Some(v)),
                None => foreign.push(k),
            }
        }
        let mut applied_eps = HashMap::new();
        for (k, v) in dp.maps.local_endpoints.entries()? {
            if k.family == family::IPV4 {
                applied_eps.insert(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]), v);
            }
        }
        let stats = Stats {
            adopted_ipcache: desired.applied_len() + foreign.len(),
            adopted_endpoints: applied_eps.len(),
            ..Stats::default()
        };
        info!(
            ipcache = stats.adopted_ipcache,
            endpoints = stats.adopted_endpoints,
            "adopted the pinned maps' contents"
        );
        Ok(Self {
            dp,
            desired,
            max_ipcache,
            max_endpoints,
            foreign,
            pods: BTreeMap::new(),
            pods_dirty: false,
            pod_state: BTreeMap::new(),
            applied_eps,
            synced: BTreeSet::new(),
            pending_synced: Vec::new(),
            swept_local: false,
            swept_remote: false,
            stats,
        })
    }

    /// The datapath (for counters and attaching the overlay program).
    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// The datapath, read-only.
    pub fn datapath_ref(&self) -> &Datapath {
        &self.dp
    }

    /// Records one input (maps change on the next [`Self::flush`]).
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Endpoint { cluster, key, pair } => {
                self.desired.apply(&cluster, &key, pair.as_deref());
            }
            Input::Synced { cluster } => self.pending_synced.push(cluster),
            Input::Drained { cluster } => {
                self.synced.remove(&cluster);
            }
            Input::Identity { .. } | Input::Policy { .. } => {}
        }
    }

    /// Clusters whose initial ipcache sync has reached the maps.
    pub fn synced(&self) -> &BTreeSet<Arc<str>> {
        &self.synced
    }

    /// Writes the difference between desired and applied state to the ipcache; then
    /// updates local pods if any changed. Failed elements stay dirty for the next flush.
    pub fn flush(&mut self) {
        let dirty = self.desired.take_dirty();
        if !dirty.is_empty() {
            let started = Instant::now();
            let (mut up_k, mut up_v, mut up_p, mut del_k, mut del_p) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for p in &dirty {
                let (action, pod) = self.desired.plan(p);
                if p.bits == 32 && self.pods.get(&p.addr) != pod.as_ref() {
                    match pod {
                        Some(pod) => self.pods.insert(p.addr, pod),
                        None => self.pods.remove(&p.addr),
                    };
                    self.pods_dirty = true;
                }
                match action {
                    Action::None => {}
                    Action::Upsert(v) => {
                        up_k.push(p.lpm_key());
                        up_v.push(v);
                        up_p.push(*p);
                    }
                    Action::Delete(old) => {
                        del_k.push(p.lpm_key());
                        del_p.push((*p, old));
                    }
                }
            }
            let ipcache = &mut self.dp.maps.ipcache;
            match ipcache.update_batch(&up_k, &up_v) {
                Ok(()) => self.stats.ipcache_upserts += up_k.len() as u64,
                Err(error) => {
                    warn!(%error, entries = up_k.len(), "ipcache update failed; retrying on the next flush");
                    self.stats.errors += 1;
                    // Unknown what the kernel holds now: rewrite them all next time.
                    for p in &up_p {
                        self.desired.set_applied(*p, None);
                    }
                    self.desired.redirty(up_p.iter().copied());
                }
            }
            match ipcache.delete_batch(&del_k) {
                Ok(_) => self.stats.ipcache_deletes += del_k.len() as u64,
                Err(error) => {
                    warn!(%error, entries = del_k.len(), "ipcache delete failed; retrying on the next flush");
                    self.stats.errors += 1;
                    for (p, old) in &del_p {
                        self.desired.set_applied(*p, Some(*old));
                    }
                    self.desired.redirty(del_p.iter().map(|(p, _)| *p));
                }
            }
            if !up_k.is_empty() || !del_k.is_empty() {
                self.stats.flushes += 1;
                self.stats.last_flush_micros = started.elapsed().as_micros() as u64;
                debug!(
                    upserts = up_k.len(),
                    deletes = del_k.len(),
                    micros = self.stats.last_flush_micros,
                    "ipcache flushed"
                );
            }
        }
        self.stats.unsupported = self.desired.unsupported();
        for cluster in std::mem::take(&mut self.pending_synced) {
            // The local list is complete: endpoints and links of vanished pods can go.
            self.pods_dirty |= cluster == self.desired.local;
            self.synced.insert(cluster);
        }
        if self.pods_dirty {
            self.pods_dirty = false;
            self.sync_pods();
        }
    }

    /// Brings local endpoints and `from_pod` attachments in line with the local pods and
    /// the interfaces that exist now. Call when interfaces change.
    pub fn sync_pods(&mut self) {
        let mut want: HashMap<Ipv4Addr, EndpointInfo> = HashMap::new();
        let mut states = BTreeMap::new();
        let mut wanted_ifs: BTreeSet<String> = BTreeSet::new();
        for (ip, pod) in &self.pods {
            wanted_ifs.insert(pod.interface.clone());
            let Some(iface) = ifaces::lookup(&pod.interface) else {
                states.insert(
                    *ip,
                    PodState {
                        ifindex: None,
                        attached: false,
                        state: "waiting-for-interface".into(),
                    },
                );
                continue;
            };
            want.insert(
                *ip,
                EndpointInfo {
                    ifindex: iface.ifindex,
                    identity: pod.identity,
                    flags: 0,
                    pod_mac: ifaces::pod_mac(*ip),
                    host_mac: iface.mac,
                },
            );
            let (attached, state) = match self.dp.attach(Program::FromPod, &pod.interface) {
                Ok(how) => {
                    match how {
                        Attached::Created => self.stats.attach_created += 1,
                        Attached::Replaced => self.stats.attach_replaced += 1,
                        Attached::Unchanged => {}
                    }
                    if how != Attached::Unchanged {
                        info!(pod = %format!("{}/{}", pod.namespace, pod.name), interface = %pod.interface, ?how, "from_pod attached");
                    }
                    (true, "attached".to_owned())
                }
                Err(error) => {
                    warn!(interface = %pod.interface, %error, "attach from_pod failed; retrying when interfaces change");
                    (false, format!("attach failed: {error}"))
                }
            };
            states.insert(
                *ip,
                PodState {
                    ifindex: Some(iface.ifindex),
                    attached,
                    state,
                },
            );
        }
        // Endpoints: write what changed, remove what no pod (or no veth) backs. Before the
        // local cluster's initial sync the pod list is incomplete: remove nothing then.
        let eps = &mut self.dp.maps.local_endpoints;
        for (ip, info) in &want {
            if self.applied_eps.get(ip) == Some(info) {
                continue;
            }
            match eps.upsert_v4(*ip, *info) {
                Ok(()) => {
                    self.stats.endpoint_upserts += 1;
                    self.applied_eps.insert(*ip, *info);
                }
                Err(error) => {
                    warn!(%ip, %error, "local endpoint update failed");
                    self.stats.errors += 1;
                }
            }
        }
        let local_synced = self.synced.contains(&self.desired.local);
        let gone: Vec<Ipv4Addr> = self
            .applied_eps
            .keys()
            .filter(|ip| !want.contains_key(ip) && (local_synced || self.pods.contains_key(ip)))
            .copied()
            .collect();
        for ip in gone {
            match eps.remove_v4(ip) {
                Ok(_) => {
                    self.stats.endpoint_deletes += 1;
                    self.applied_eps.remove(&ip);
                }
                Err(error) => {
                    warn!(%ip, %error, "local endpoint delete failed");
                    self.stats.errors += 1;
                }
            }
        }
        // Attachments of pods that went away (ours, and pins an earlier agent left).
        if local_synced {
            let ours: Vec<String> = self
                .dp
                .attachments()
                .into_iter()
                .filter(|(n, p, _)| *p == Program::FromPod && !wanted_ifs.contains(n))
                .map(|(n, _, _)| n)
                .collect();
            for n in ours {
                info!(interface = %n, "pod gone: detaching from_pod");
                if let Err(error) = self.dp.detach(&n) {
                    warn!(interface = %n, %error, "detach failed");
                }
            }
            for (p, n) in self.dp.pinned_links() {
                if p == Program::FromPod && !wanted_ifs.contains(&n) {
                    info!(interface = %n, "removing a stale link pin");
                    if let Err(error) = self.dp.forget_pin(p, &n) {
                        warn!(interface = %n, %error, "remove stale link pin failed");
                    }
                }
            }
        }
        self.pod_state = states;
    }

    /// `true` while some local pod waits for its veth or a failed attach.
    pub fn pods_pending(&self) -> bool {
        self.pod_state.values().any(|s| !s.attached)
    }

    /// Removes map elements no cluster claims: always those of the local cluster (no
    /// `REMOTE_CLUSTER` flag) and, with `remote`, those of remote clusters and elements this
    /// agent never writes. Call only after the clusters concerned have synced.
    pub fn sweep(&mut self, remote: bool) -> usize {
        let stale = self.desired.stale(remote);
        let mut keys: Vec<IpcacheLpmKey> = stale.iter().map(|p| p.lpm_key()).collect();
        if remote {
            keys.append(&mut self.foreign);
        }
        let n = match self.dp.maps.ipcache.delete_batch(&keys) {
            Ok(n) => {
                for p in &stale {
                    self.desired.set_applied(*p, None);
                }
                n
            }
            Err(error) => {
                warn!(%error, "sweep failed");
                self.stats.errors += 1;
                return 0;
            }
        };
        self.stats.swept += n as u64;
        self.swept_local = true;
        self.swept_remote |= remote;
        if n > 0 {
            info!(removed = n, remote, "swept stale ipcache entries");
        }
        // Endpoints and links of pods that are gone.
        self.sync_pods();
        n
    }

    /// Whether the local / remote sweeps have run.
    pub fn swept(&self) -> (bool, bool) {
        (self.swept_local, self.swept_remote)
    }

    /// State for `/status`.
    pub fn report(&self) -> Report {
        Report {
            ipcache: MapFill::new(
                self.desired.applied_len() + self.foreign.len(),
                self.max_ipcache,
            ),
            local_endpoints: MapFill::new(self.applied_eps.len(), self.max_endpoints),
            batched_updates: self.dp.maps.ipcache.batched(),
            pods: self
                .pods
                .iter()
                .map(|(ip, pod)| {
                    let s = self.pod_state.get(ip);
                    PodReport {
                        pod: (**pod).clone(),
                        ifindex: s.and_then(|s| s.ifindex),
                        attached: s.is_some_and(|s| s.attached),
                        state: s.map_or_else(|| "pending".into(), |s| s.state.clone()),
                    }
                })
                .collect(),
            synced_clusters: self.synced.iter().map(|c| c.to_string()).collect(),
            swept_local: self.swept_local,
            swept_remote: self.swept_remote,
            stats: self.stats.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ip: &str, host: &str, id: u32, pod: &str) -> IpIdentityPair {
        IpIdentityPair::decode(
            format!(
                r#"{{"IP":"{ip}","HostIP":"{host}","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"{pod}"}}"#
            )
            .as_bytes(),
        )
        .expect("valid entry")
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);

    #[test]
    fn local_pod_on_this_node_has_no_tunnel_and_an_endpoint() {
        let (p, c) = claim(
            "c1",
            NODE,
            "c1",
            &pair("10.1.1.11", "198.18.1.11", 70000, "p1"),
        )
        .unwrap();
        assert_eq!(
            p,
            Prefix {
                addr: Ipv4Addr::new(10, 1, 1, 11),
                bits: 32
            }
        );
        assert_eq!(c.value.flags, 0);
        assert_eq!(c.value.sec_identity, 70000);
        let pod = c.pod.expect("local pod");
        assert_eq!(pod.interface, ifaces::host_veth_name("default", "p1"));
    }

    #[test]
    fn pods_elsewhere_are_tunnelled_and_remote_clusters_flagged() {
        let (_, c) = claim(
            "c1",
            NODE,
            "c1",
            &pair("10.1.2.11", "198.18.1.12", 70000, "p1"),
        )
        .unwrap();
        assert_eq!(c.value.flags, ipcache_flags::HAS_TUNNEL);
        assert_eq!(&c.value.tunnel_endpoint[..4], &[198, 18, 1, 12]);
        assert!(c.pod.is_none());
        let (_, c) = claim(
            "c1",
            NODE,
            "c2",
            &pair("10.2.1.11", "198.18.2.11", 131073, "p1"),
        )
        .unwrap();
        assert_eq!(
            c.value.flags,
            ipcache_flags::HAS_TUNNEL | ipcache_flags::REMOTE_CLUSTER
        );
        // A remote claiming our node IP is still not a local pod.
        let (_, c) = claim(
            "c1",
            NODE,
            "c2",
            &pair("10.2.1.12", "198.18.1.11", 131073, "p1"),
        )
        .unwrap();
        assert!(c.pod.is_none());
        assert!(claim(
            "c1",
            NODE,
            "c1",
            &pair("fd00::1", "198.18.1.11", 70000, "p1")
        )
        .is_none());
    }

    #[test]
    fn local_cluster_wins_a_shared_ip_and_deletes_fall_back() {
        let c1: Arc<str> = Arc::from("c1");
        let c2: Arc<str> = Arc::from("c2");
        let mut d = Desired::new(c1.clone(), NODE);
        let p = Prefix {
            addr: Ipv4Addr::new(10, 9, 9, 9),
            bits: 32,
        };
        let k1 = "cilium/state/ip/v1/default/10.9.9.9";
        let k2 = "cilium/cache/ip/v1/c2/10.9.9.9";
        d.apply(&c2, k2, Some(&pair("10.9.9.9", "198.18.2.11", 131073, "x")));
        d.apply(&c1, k1, Some(&pair("10.9.9.9", "198.18.1.12", 70000, "y")));
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 70000);
        assert_eq!(d.take_dirty(), vec![p]);
        d.apply(&c1, k1, None);
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 131073);
        d.apply(&c2, k2, None);
        assert!(d.winner(&p).is_none());
        assert!(d.is_empty());
        assert_eq!(
            key_prefix("cilium/state/ip/v1/default/10.0.0.0/8"),
            Some(Prefix {
                addr: Ipv4Addr::new(10, 0, 0, 0),
                bits: 8
            })
        );
        assert_eq!(key_prefix("cilium/cache/ip/v1/c2/fd00::1"), None);
    }
}
