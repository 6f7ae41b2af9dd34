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
//!   plus a local endpoints entry (interface, pod MAC and gateway MAC found by
//!   [`crate::discovery`] from the kernel's routes, bridge FDB and veth peers) and `from_pod`
//!   attached to that interface;
//! * any other pod → ipcache entry tunnelled to `HostIP` (`HAS_TUNNEL`, plus
//!   `REMOTE_CLUSTER` for other clusters); no `HostIP` → entry without tunnel;
//! * IPv6 entries are not programmed yet (counted as unsupported).
//!
//! Start-up adopts the maps' contents as `applied`, so an unchanged entry is never written
//! again and nothing is cleared: entries that no cluster claims any more are removed only
//! by [`Reconciler::sweep`], which the caller runs once the clusters they may belong to have
//! synced. A pod whose interface is not found yet waits; [`Reconciler::sync_pods`] is called
//! again on every link, route or neighbour notification ([`crate::discovery::Watcher`]).
//!
//! **Why it is fast** (250k entries must reconcile at ≥ 500k/s including the kernel's
//! share, see `bench-maps`): desired and applied state live together in one slab of
//! slots (`Vec`, in order of arrival) behind a small `prefix → index` table, so an
//! entry costs one hash lookup when it arrives and none when it is flushed: the dirty list
//! holds slab indices (each once, by a flag in the slot, so no sort or dedup) and the plan
//! walks the slab in the order it was filled, writing keys and values straight into the
//! arrays the batch syscall takes. The table's hash (`PrefixHasher`) keeps the 16
//! addresses of an aligned block in one bucket group, so consecutive pod IPs reuse cache
//! lines, and spreads the blocks with a folded 128-bit product (plain FxHash had put 250k
//! consecutive pod IPs into 128 buckets). Clusters are interned to small
//! IDs (no `Arc` clone or string compare per claim), addresses arrive parsed (validation
//! parsed them once, [`crate::input`]), and only prefixes that have or had a local pod are passed on to the pod bookkeeping.
//! Start-up reads the pinned map with `BPF_MAP_LOOKUP_BATCH` instead of two syscalls per
//! element.
//!
//! It must not read etcd or change interfaces beyond attaching programs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use clustermesh_ebpf_abi::{
    family, ipcache_flags, EndpointInfo, IpcacheKey, IpcacheLpmKey, IpcacheValue,
};
use clustermesh_types::model::{Cidr, IpcacheEntry};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::datapath::{self, Attached, Datapath, Program};
use crate::discovery::{self, How, MacFrom};
use crate::input::Input;
use crate::ifaces::Mac;

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

    /// The prefix `cidr` names; `None` for IPv6 (not programmed yet).
    pub fn from_cidr(cidr: &Cidr) -> Option<Self> {
        match cidr.addr {
            IpAddr::V4(addr) => Some(Self {
                addr,
                bits: cidr.prefix_len,
            }),
            IpAddr::V6(_) => None,
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
    /// One word (address and length packed): see `PrefixHasher`.
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
}

/// What one cluster's entry asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The map value.
    pub value: IpcacheValue,
    /// Set when the entry is a pod on this node.
    pub pod: Option<Arc<LocalPod>>,
}

/// The prefix and claim for `entry` published by `cluster`; `None` for entries this
/// datapath cannot program (IPv6, for now).
pub fn claim(
    local: &str,
    node_ip: Ipv4Addr,
    cluster: &str,
    entry: &IpcacheEntry,
) -> Option<(Prefix, Claim)> {
    claim_of(cluster == local, node_ip, entry)
}

/// [`claim`] with the cluster comparison already made.
fn claim_of(
    is_local_cluster: bool,
    node_ip: Ipv4Addr,
    entry: &IpcacheEntry,
) -> Option<(Prefix, Claim)> {
    let prefix = Prefix::from_cidr(&entry.prefix)?;
    let (addr, bits) = (prefix.addr, prefix.bits);
    let pair = &entry.pair;
    // An IPv6 tunnel endpoint is not usable by the IPv4 underlay: the entry is programmed
    // without a tunnel, as if it named none.
    let host = match entry.host {
        Some(IpAddr::V4(h)) => Some(h),
        _ => None,
    };
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

/// FxHash (rustc's hasher) with a folding finish: the maps here are keyed by prefixes and
/// cluster names that the readers already validated, so HashDoS resistance buys nothing and
/// SipHash would cost a third of a 250k-entry resync.
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

/// The prefix index's hasher. [`Prefix`] hashes as one word, `address << 8 | length`; the
/// address's low 4 bits go into the bucket bits and into hashbrown's 7-bit tag unmixed, the
/// rest through FxHash, folded. So the 16 addresses of an aligned block share one 16-bucket
/// group: consecutive pod IPs (IPAM hands them out in order, etcd lists them /24 by /24)
/// reuse the same few cache lines instead of missing twice per entry at random, which made
/// a relist of 250k unchanged entries 2.5× faster. Blocks still spread like any good hash,
/// and two prefixes of one block never collide (their bucket bits and tags differ).
#[derive(Default, Clone, Copy)]
struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Prefix`; correct (if not local) for anything else.
        let mut fx = FxHasher(self.0);
        fx.write(bytes);
        self.0 = fx.0;
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    fn finish(&self) -> u64 {
        let low = (self.0 >> 8) & 0xf;
        let mut rest = FxHasher::default();
        rest.add(self.0 & !0xf00);
        rest.finish() ^ low ^ (low << 57)
    }
}

type PrefixMap<V> = HashMap<Prefix, V, std::hash::BuildHasherDefault<PrefixHasher>>;

/// A cluster name, interned by [`Desired`] (index into its `clusters`).
type ClusterId = u32;

/// The claims on one prefix: almost always exactly one cluster's.
#[derive(Debug)]
enum Claims {
    One(ClusterId, Claim),
    /// Two or more, sorted by cluster name.
    Many(Vec<(ClusterId, Claim)>),
}

impl Claims {
    /// Sets `cluster`'s claim; `false` if it was already exactly that.
    fn insert(&mut self, cluster: ClusterId, c: Claim, names: &[Arc<str>]) -> bool {
        match self {
            Claims::One(k, v) if *k == cluster => {
                if *v == c {
                    return false;
                }
                *v = c;
            }
            Claims::One(k, v) => {
                let mut m = vec![(*k, v.clone())];
                Self::insert_sorted(&mut m, cluster, c, names);
                *self = Claims::Many(m);
            }
            Claims::Many(m) => match m.iter_mut().find(|(k, _)| *k == cluster) {
                Some((_, v)) if *v == c => return false,
                Some((_, v)) => *v = c,
                None => Self::insert_sorted(m, cluster, c, names),
            },
        }
        true
    }

    fn insert_sorted(
        m: &mut Vec<(ClusterId, Claim)>,
        cluster: ClusterId,
        c: Claim,
        names: &[Arc<str>],
    ) {
        let name = &names[cluster as usize];
        let at = m.partition_point(|(k, _)| names[*k as usize] < *name);
        m.insert(at, (cluster, c));
    }

    /// Removes `cluster`'s claim; `true` if none is left.
    fn remove(&mut self, cluster: ClusterId) -> bool {
        match self {
            Claims::One(k, _) => *k == cluster,
            Claims::Many(m) => {
                m.retain(|(k, _)| *k != cluster);
                if m.len() == 1 {
                    if let Some((k, v)) = m.pop() {
                        *self = Claims::One(k, v);
                    }
                    return false;
                }
                m.is_empty()
            }
        }
    }

    fn winner(&self, local: ClusterId) -> Option<&Claim> {
        match self {
            Claims::One(_, v) => Some(v),
            Claims::Many(m) => m
                .iter()
                .find(|(k, _)| *k == local)
                .or_else(|| m.first())
                .map(|(_, v)| v),
        }
    }
}

/// One prefix: what the clusters claim and what the map holds.
#[derive(Debug)]
struct Slot {
    prefix: Prefix,
    claims: Option<Claims>,
    applied: Option<IpcacheValue>,
    /// Listed in [`Desired::dirty`] (at most once).
    dirty: bool,
    /// The last plan passed this prefix's local pod on (so a change must be passed on too).
    pod: bool,
}

impl Slot {
    fn new(prefix: Prefix) -> Self {
        Self {
            prefix,
            claims: None,
            applied: None,
            dirty: false,
            pod: false,
        }
    }

    /// Holds nothing and is not waiting for a plan: its index can be reused.
    fn vacant(&self) -> bool {
        self.claims.is_none() && self.applied.is_none() && !self.dirty
    }
}

/// The part of an etcd ipcache key after `cilium/{state,cache}/ip/v1/<default|cluster>/`:
/// the entry's prefix string (the readers reject entries whose key does not match it).
/// The map writes one flush needs, built by [`Desired::plan`]: keys and values side by side,
/// ready for `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` without another copy.
#[derive(Debug, Default)]
pub struct Plan {
    /// Keys to insert or replace.
    pub upsert_keys: Vec<IpcacheLpmKey>,
    /// Their values (`upsert_values[i]` for `upsert_keys[i]`).
    pub upsert_values: Vec<IpcacheValue>,
    /// Keys to delete.
    pub delete_keys: Vec<IpcacheLpmKey>,
    /// What each deleted key held (`deleted[i]` for `delete_keys[i]`), to restore on failure.
    pub deleted: Vec<IpcacheValue>,
    /// /32 prefixes whose local pod may have changed: address and the winner's pod now.
    pub pods: Vec<(Ipv4Addr, Option<Arc<LocalPod>>)>,
}

impl Plan {
    /// No map write.
    pub fn is_empty(&self) -> bool {
        self.upsert_keys.is_empty() && self.delete_keys.is_empty()
    }
}

/// Desired and applied state per prefix (see the module docs for why it is shaped so).
/// Pure (no maps): the [`Reconciler`] writes and then records what it wrote.
#[derive(Debug)]
pub struct Desired {
    local: ClusterId,
    node_ip: Ipv4Addr,
    /// Interned cluster names (`local` first); never shrinks (a handful of clusters).
    clusters: Vec<Arc<str>>,
    cluster_ids: FxMap<Arc<str>, ClusterId>,
    /// The last cluster looked up: inputs come in runs of one cluster sharing one `Arc`.
    last_cluster: Option<(Arc<str>, ClusterId)>,
    /// Prefix → index in `slots`.
    index: PrefixMap<u32>,
    slots: Vec<Slot>,
    /// Indices of vacant slots.
    free: Vec<u32>,
    /// Slots changed since the last plan, in the order they first changed.
    dirty: Vec<u32>,
    claimed: usize,
    applied: usize,
    unsupported: u64,
}

impl Desired {
    /// Empty state for the agent of `local` on `node_ip`.
    pub fn new(local: Arc<str>, node_ip: Ipv4Addr) -> Self {
        let mut cluster_ids = FxMap::default();
        cluster_ids.insert(local.clone(), 0);
        Self {
            local: 0,
            node_ip,
            clusters: vec![local],
            cluster_ids,
            last_cluster: None,
            index: PrefixMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            claimed: 0,
            applied: 0,
            unsupported: 0,
        }
    }

    /// The local cluster's name.
    pub fn local(&self) -> &Arc<str> {
        &self.clusters[self.local as usize]
    }

    /// Makes room for `additional` more prefixes (before adopting a map or a large list).
    pub fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional);
        self.slots.reserve(additional);
    }

    fn cluster_id(&mut self, cluster: &Arc<str>) -> ClusterId {
        if let Some((c, id)) = &self.last_cluster {
            if Arc::ptr_eq(c, cluster) {
                return *id;
            }
        }
        let id = match self.cluster_ids.get(cluster) {
            Some(id) => *id,
            None => {
                let id = self.clusters.len() as ClusterId;
                self.clusters.push(cluster.clone());
                self.cluster_ids.insert(cluster.clone(), id);
                id
            }
        };
        self.last_cluster = Some((cluster.clone(), id));
        id
    }

    /// The slot of `prefix`, created if missing.
    fn slot_of(&mut self, prefix: Prefix) -> u32 {
        match self.index.entry(prefix) {
            std::collections::hash_map::Entry::Occupied(e) => *e.get(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slots[i as usize] = Slot::new(prefix);
                        i
                    }
                    None => {
                        self.slots.push(Slot::new(prefix));
                        (self.slots.len() - 1) as u32
                    }
                };
                *e.insert(i)
            }
        }
    }

    /// Frees slot `i` if it holds nothing any more.
    fn release_if_vacant(&mut self, i: u32) {
        let slot = &self.slots[i as usize];
        if slot.vacant() {
            self.index.remove(&slot.prefix);
            self.free.push(i);
        }
    }

    fn mark_dirty(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(i);
        }
    }

    /// Applies a change of `cluster`'s entry for `prefix` (`None`: deleted); the prefixes
    /// it touches become dirty.
    pub fn apply(&mut self, cluster: &Arc<str>, prefix: &Cidr, entry: Option<&IpcacheEntry>) {
        let id = self.cluster_id(cluster);
        match entry.and_then(|e| claim_of(id == self.local, self.node_ip, e)) {
            Some((prefix, c)) => {
                let i = self.slot_of(prefix);
                let slot = &mut self.slots[i as usize];
                match &mut slot.claims {
                    Some(claims) => {
                        if !claims.insert(id, c, &self.clusters) {
                            return; // unchanged (a relist of the same data)
                        }
                    }
                    none @ None => {
                        *none = Some(Claims::One(id, c));
                        self.claimed += 1;
                    }
                }
                self.mark_dirty(i);
            }
            // Deleted, or now unprogrammable: drop whatever this cluster claimed there.
            None => {
                let Some(prefix) = Prefix::from_cidr(prefix) else {
                    if entry.is_some() {
                        self.unsupported += 1;
                    }
                    return;
                };
                let Some(&i) = self.index.get(&prefix) else {
                    return;
                };
                let slot = &mut self.slots[i as usize];
                let Some(claims) = &mut slot.claims else {
                    return;
                };
                if claims.remove(id) {
                    slot.claims = None;
                    self.claimed -= 1;
                }
                self.mark_dirty(i);
            }
        }
    }

    /// The winning claim for `prefix`: the local cluster's, else the lowest cluster name's.
    pub fn winner(&self, prefix: &Prefix) -> Option<&Claim> {
        let i = *self.index.get(prefix)?;
        self.slots[i as usize].claims.as_ref()?.winner(self.local)
    }

    /// `true` if some cluster claims `prefix`.
    pub fn contains(&self, prefix: &Prefix) -> bool {
        self.index
            .get(prefix)
            .is_some_and(|i| self.slots[*i as usize].claims.is_some())
    }

    /// Decides the map writes for every prefix changed since the last plan (each once, in
    /// the order they first changed) into `out`, and records them as applied right away: a
    /// failed write is undone with [`Self::set_applied`] and [`Self::redirty`].
    pub fn plan(&mut self, out: &mut Plan) {
        let dirty = std::mem::take(&mut self.dirty);
        out.upsert_keys.reserve(dirty.len());
        out.upsert_values.reserve(dirty.len());
        for &i in &dirty {
            let slot = &mut self.slots[i as usize];
            slot.dirty = false;
            let winner = slot.claims.as_ref().and_then(|c| c.winner(self.local));
            if let Some(pod) = winner.and_then(|c| c.pod.as_ref()) {
                slot.pod = true;
                out.pods.push((slot.prefix.addr, Some(pod.clone())));
            } else if std::mem::take(&mut slot.pod) {
                out.pods.push((slot.prefix.addr, None));
            }
            match (winner.map(|c| c.value), slot.applied) {
                (Some(v), Some(a)) if v == a => {}
                (Some(v), old) => {
                    slot.applied = Some(v);
                    if old.is_none() {
                        self.applied += 1;
                    }
                    out.upsert_keys.push(slot.prefix.lpm_key());
                    out.upsert_values.push(v);
                }
                (None, Some(old)) => {
                    slot.applied = None;
                    self.applied -= 1;
                    out.delete_keys.push(slot.prefix.lpm_key());
                    out.deleted.push(old);
                    self.release_if_vacant(i);
                }
                (None, None) => self.release_if_vacant(i),
            }
        }
        // Keep the buffer for the next changes.
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Records what the map holds for `prefix` (after a write, or found at start).
    pub fn set_applied(&mut self, prefix: Prefix, value: Option<IpcacheValue>) {
        let i = match value {
            Some(_) => self.slot_of(prefix),
            None => match self.index.get(&prefix) {
                Some(i) => *i,
                None => return,
            },
        };
        let slot = &mut self.slots[i as usize];
        match (slot.applied.is_some(), value.is_some()) {
            (false, true) => self.applied += 1,
            (true, false) => self.applied -= 1,
            _ => {}
        }
        slot.applied = value;
        self.release_if_vacant(i);
    }

    /// Prefixes in the map that no cluster claims; with `remote: false` only those without
    /// the `REMOTE_CLUSTER` flag.
    pub fn stale(&self, remote: bool) -> Vec<Prefix> {
        self.slots
            .iter()
            .filter(|s| {
                s.claims.is_none()
                    && s.applied
                        .is_some_and(|v| remote || v.flags & ipcache_flags::REMOTE_CLUSTER == 0)
            })
            .map(|s| s.prefix)
            .collect()
    }

    /// Marks prefixes dirty again (after a failed flush).
    pub fn redirty(&mut self, prefixes: impl IntoIterator<Item = Prefix>) {
        for p in prefixes {
            if let Some(&i) = self.index.get(&p) {
                self.mark_dirty(i);
            }
        }
    }

    /// Prefixes changed since the last plan.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
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
    /// The host-side interface that reaches it, once found.
    pub interface: Option<String>,
    /// Its ifindex.
    pub ifindex: Option<u32>,
    /// How the interface was found: `route` (a route through a veth), `bridge-fdb` (the
    /// pod's MAC on a bridge port), `bridge-port` (a bridge port whose peer holds the IP).
    pub found_by: Option<How>,
    /// The pod's MAC (`aa:bb:…`), what delivery writes as the destination.
    pub pod_mac: Option<String>,
    /// Where the pod's MAC came from (`veth-peer`, `neighbour`).
    pub mac_from: Option<MacFrom>,
    /// `from_pod` attached to the interface.
    pub attached: bool,
    /// `attached`, `waiting-for-interface: <why>` or the last error.
    pub state: String,
}

/// Interfaces that could be a pod's but that no local endpoint resolves to (`/status`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Skipped {
    /// How many.
    pub count: usize,
    /// Their names (the first 32).
    pub interfaces: Vec<String>,
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
    /// Veths not attached to because no local endpoint is behind them.
    pub skipped_interfaces: Skipped,
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
    found: Option<discovery::Found>,
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
    /// Reads interface facts for discovery (`None` if the socket could not be opened:
    /// every pod then waits, and `/status` says why).
    rtnl: Option<clustermesh_rtnl::Socket>,
    skipped: Skipped,
    /// The agent's own devices (underlay, VXLAN): never pods, never counted as skipped.
    own_devices: BTreeSet<String>,
    /// A pod's interface or attach state changed since [`Reconciler::take_pods_changed`].
    pods_changed: bool,
    applied_eps: HashMap<Ipv4Addr, EndpointInfo>,
    synced: BTreeSet<Arc<str>>,
    pending_synced: Vec<Arc<str>>,
    swept_local: bool,
    swept_remote: bool,
    /// Set while the policy gate holds entries back (see [`Reconciler::hold_removals`]).
    removals_held: bool,
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
        let adopted = dp.maps.ipcache.entries()?;
        desired.reserve(adopted.len());
        for (k, v) in adopted {
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
            rtnl: match clustermesh_rtnl::Socket::new() {
                Ok(s) => Some(s),
                Err(error) => {
                    warn!(%error, "no netlink socket: local pods cannot be discovered");
                    None
                }
            },
            skipped: Skipped::default(),
            own_devices: BTreeSet::new(),
            pods_changed: false,
            applied_eps,
            synced: BTreeSet::new(),
            pending_synced: Vec::new(),
            swept_local: false,
            removals_held: false,
            swept_remote: false,
            stats,
        })
    }

    /// Names the agent's own devices (the underlay and VXLAN devices), which are never a
    /// pod's and are not counted as skipped.
    pub fn set_own_devices(&mut self, names: impl IntoIterator<Item = String>) {
        self.own_devices = names.into_iter().collect();
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
            Input::Endpoint {
                cluster,
                prefix,
                entry,
            } => {
                self.desired.apply(&cluster, &prefix, entry.as_deref());
            }
            Input::Synced { cluster } => self.pending_synced.push(cluster),
            Input::Drained { cluster } => {
                self.synced.remove(&cluster);
            }
            Input::Identity { .. } | Input::Policy { .. } | Input::Node { .. } => {}
        }
    }

    /// Clusters whose initial ipcache sync has reached the maps.
    pub fn synced(&self) -> &BTreeSet<Arc<str>> {
        &self.synced
    }

    /// Writes the difference between desired and applied state to the ipcache; then
    /// updates local pods if any changed. Failed elements stay dirty for the next flush.
    pub fn flush(&mut self) {
        if self.desired.dirty_len() > 0 {
            let started = Instant::now();
            let mut plan = Plan::default();
            self.desired.plan(&mut plan);
            for (addr, pod) in plan.pods.drain(..) {
                if self.pods.get(&addr) != pod.as_ref() {
                    match pod {
                        Some(pod) => self.pods.insert(addr, pod),
                        None => self.pods.remove(&addr),
                    };
                    self.pods_dirty = true;
                }
            }
            let ipcache = &mut self.dp.maps.ipcache;
            match ipcache.update_batch(&plan.upsert_keys, &plan.upsert_values) {
                Ok(()) => self.stats.ipcache_upserts += plan.upsert_keys.len() as u64,
                Err(error) => {
                    warn!(%error, entries = plan.upsert_keys.len(), "ipcache update failed; retrying on the next flush");
                    self.stats.errors += 1;
                    // Unknown what the kernel holds now: rewrite them all next time.
                    let failed: Vec<Prefix> = plan
                        .upsert_keys
                        .iter()
                        .filter_map(Prefix::from_lpm_key)
                        .collect();
                    for p in &failed {
                        self.desired.set_applied(*p, None);
                    }
                    self.desired.redirty(failed);
                }
            }
            match ipcache.delete_batch(&plan.delete_keys) {
                Ok(_) => self.stats.ipcache_deletes += plan.delete_keys.len() as u64,
                Err(error) => {
                    warn!(%error, entries = plan.delete_keys.len(), "ipcache delete failed; retrying on the next flush");
                    self.stats.errors += 1;
                    let mut failed = Vec::with_capacity(plan.delete_keys.len());
                    for (k, old) in plan.delete_keys.iter().zip(&plan.deleted) {
                        if let Some(p) = Prefix::from_lpm_key(k) {
                            self.desired.set_applied(p, Some(*old));
                            failed.push(p);
                        }
                    }
                    self.desired.redirty(failed);
                }
            }
            if !plan.is_empty() {
                self.stats.flushes += 1;
                self.stats.last_flush_micros = started.elapsed().as_micros() as u64;
                debug!(
                    upserts = plan.upsert_keys.len(),
                    deletes = plan.delete_keys.len(),
                    micros = self.stats.last_flush_micros,
                    "ipcache flushed"
                );
            }
        }
        self.stats.unsupported = self.desired.unsupported();
        for cluster in std::mem::take(&mut self.pending_synced) {
            // The local list is complete: endpoints and links of vanished pods can go.
            self.pods_dirty |= cluster == *self.desired.local();
            self.synced.insert(cluster);
        }
        if self.pods_dirty {
            self.pods_dirty = false;
            self.sync_pods();
        }
    }

    /// Brings local endpoints and `from_pod` attachments in line with the local pods and
    /// what the kernel holds now (see [`crate::discovery`]). Call when interfaces, routes
    /// or neighbours change.
    pub fn sync_pods(&mut self) {
        let mut want: HashMap<Ipv4Addr, EndpointInfo> = HashMap::new();
        let mut states = BTreeMap::new();
        let mut wanted_ifs: BTreeSet<String> = BTreeSet::new();
        let snapshot = match self.rtnl.as_mut().map(discovery::Snapshot::read) {
            Some(Ok(s)) => Ok(s),
            Some(Err(error)) => Err(format!("reading the kernel's interfaces failed: {error}")),
            None => Err("no netlink socket".to_owned()),
        };
        let mut snapshot = match snapshot {
            Ok(s) => s,
            Err(why) => {
                // Keep what is attached and programmed; try again on the next change.
                warn!(%why, "pod discovery skipped");
                self.stats.errors += 1;
                return;
            }
        };
        for (ip, pod) in &self.pods {
            let found = match self.rtnl.as_mut() {
                Some(sock) => snapshot.find(sock, *ip),
                None => Err("no netlink socket".to_owned()),
            };
            let found = match found {
                Ok(f) => f,
                Err(why) => {
                    states.insert(
                        *ip,
                        PodState {
                            found: None,
                            attached: false,
                            state: format!("waiting-for-interface: {why}"),
                        },
                    );
                    continue;
                }
            };
            wanted_ifs.insert(found.interface.clone());
            want.insert(
                *ip,
                EndpointInfo {
                    ifindex: found.ifindex,
                    identity: pod.identity,
                    flags: 0,
                    pod_mac: found.pod_mac,
                    host_mac: found.host_mac,
                },
            );
            let (attached, state) = match self.dp.attach(Program::FromPod, &found.interface) {
                Ok(how) => {
                    match how {
                        Attached::Created => self.stats.attach_created += 1,
                        Attached::Replaced => self.stats.attach_replaced += 1,
                        Attached::Unchanged => {}
                    }
                    if how != Attached::Unchanged {
                        info!(pod = %format!("{}/{}", pod.namespace, pod.name), interface = %found.interface, found_by = ?found.how, ?how, "from_pod attached");
                    }
                    (true, "attached".to_owned())
                }
                Err(error) => {
                    warn!(interface = %found.interface, %error, "attach from_pod failed; retrying when interfaces change");
                    (false, format!("attach failed: {error}"))
                }
            };
            states.insert(
                *ip,
                PodState {
                    found: Some(found),
                    attached,
                    state,
                },
            );
        }
        // Veths nobody is behind: never attached to, counted.
        let mut skipped: Vec<String> = snapshot
            .veths()
            .filter(|l| !wanted_ifs.contains(&l.name) && !self.own_devices.contains(&l.name))
            .map(|l| l.name.clone())
            .collect();
        skipped.sort();
        self.skipped = Skipped {
            count: skipped.len(),
            interfaces: skipped.into_iter().take(32).collect(),
        };
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
        let local_synced = self.synced.contains(self.desired.local()) && !self.removals_held;
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
        let summary = |m: &BTreeMap<Ipv4Addr, PodState>| -> Vec<(Ipv4Addr, Option<u32>, bool)> {
            m.iter()
                .map(|(ip, s)| (*ip, s.found.as_ref().map(|f| f.ifindex), s.attached))
                .collect()
        };
        self.pods_changed |= summary(&self.pod_state) != summary(&states);
        self.pod_state = states;
    }

    /// While `hold` is set, local endpoints and pod links are not removed: the policy gate
    /// holds ipcache entries back until their identity is known, so a pod may be missing
    /// from the desired state only for the moment (after a restart its adopted endpoint and
    /// pinned link would be deleted and created again). Cleared, the next pod sync removes
    /// what is really gone.
    pub fn hold_removals(&mut self, hold: bool) {
        if self.removals_held && !hold {
            self.pods_dirty = true;
        }
        self.removals_held = hold;
    }

    /// Whether a pod was found, lost, attached or detached since the last call (the loop
    /// republishes `/status` at once then, so a pod's state shows without waiting a tick).
    pub fn take_pods_changed(&mut self) -> bool {
        std::mem::take(&mut self.pods_changed)
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
                    let found = s.and_then(|s| s.found.as_ref());
                    PodReport {
                        pod: (**pod).clone(),
                        interface: found.map(|f| f.interface.clone()),
                        ifindex: found.map(|f| f.ifindex),
                        found_by: found.map(|f| f.how),
                        pod_mac: found.map(|f| Mac(f.pod_mac).to_string()),
                        mac_from: found.map(|f| f.mac_from),
                        attached: s.is_some_and(|s| s.attached),
                        state: s.map_or_else(|| "pending".into(), |s| s.state.clone()),
                    }
                })
                .collect(),
            skipped_interfaces: self.skipped.clone(),
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

    use clustermesh_types::model::IpIdentityPair;

    fn pair(ip: &str, host: &str, id: u32, pod: &str) -> IpcacheEntry {
        IpcacheEntry::new(
            IpIdentityPair::decode(
                format!(
                    r#"{{"IP":"{ip}","HostIP":"{host}","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"{pod}"}}"#
                )
                .as_bytes(),
            )
            .expect("valid entry"),
        )
        .expect("valid entry")
    }

    /// The prefix of a host entry's key.
    fn host(ip: &str) -> Cidr {
        format!("{ip}/32").parse().expect("ip")
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
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("default", "p1")
        );
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
        let k1 = &host("10.9.9.9");
        let k2 = &host("10.9.9.9");
        d.apply(&c2, k2, Some(&pair("10.9.9.9", "198.18.2.11", 131073, "x")));
        d.apply(&c1, k1, Some(&pair("10.9.9.9", "198.18.1.12", 70000, "y")));
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 70000);
        let mut plan = Plan::default();
        d.plan(&mut plan);
        assert_eq!(plan.upsert_keys, vec![p.lpm_key()], "one write per prefix");
        assert_eq!(plan.upsert_values[0].sec_identity, 70000);
        d.apply(&c1, k1, None);
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 131073);
        d.apply(&c2, k2, None);
        assert!(d.winner(&p).is_none());
        assert!(d.is_empty());
        // IPv6 is carried but not programmed: counted, nothing to write.
        let v6: Cidr = "fd00::1/128".parse().expect("ip");
        let dirty = d.dirty_len();
        d.apply(&c2, &v6, Some(&pair("fd00::1", "198.18.2.11", 131073, "x")));
        d.apply(&c2, &v6, None);
        assert_eq!(d.unsupported(), 1);
        assert!(d.is_empty());
        assert_eq!(d.dirty_len(), dirty);
    }

    fn planned(d: &mut Desired) -> Plan {
        let mut plan = Plan::default();
        d.plan(&mut plan);
        plan
    }

    #[test]
    fn lowest_cluster_name_wins_whatever_the_arrival_order() {
        let c1: Arc<str> = Arc::from("c1");
        let mut d = Desired::new(c1.clone(), NODE);
        let p = Prefix {
            addr: Ipv4Addr::new(10, 9, 9, 9),
            bits: 32,
        };
                for (c, id) in [("c4", 4), ("c3", 3), ("c2", 2)] {
            let c: Arc<str> = Arc::from(c);
            d.apply(&c, &host("10.9.9.9"), Some(&pair("10.9.9.9", "198.18.2.11", id, "x")));
        }
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 2);
        // Another Arc of the same name is the same cluster.
        d.apply(&Arc::from("c2"), &host("10.9.9.9"), None);
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 3);
        d.apply(
            &c1,
            &host("10.9.9.9"),
            Some(&pair("10.9.9.9", "198.18.1.12", 1, "y")),
        );
        assert_eq!(d.winner(&p).unwrap().value.sec_identity, 1);
        let plan = planned(&mut d);
        assert_eq!(plan.upsert_values.len(), 1);
        assert_eq!(plan.upsert_values[0].sec_identity, 1);
    }

    #[test]
    fn plans_write_only_differences_and_reuse_freed_slots() {
        let c1: Arc<str> = Arc::from("c1");
        let c2: Arc<str> = Arc::from("c2");
        let mut d = Desired::new(c1.clone(), NODE);
        let ips = ["10.2.0.1", "10.2.0.2", "10.2.0.3"];
                for ip in ips {
            d.apply(&c2, &host(ip), Some(&pair(ip, "198.18.2.11", 5, "x")));
        }
        let plan = planned(&mut d);
        assert_eq!(plan.upsert_keys.len(), 3);
        assert!(plan.delete_keys.is_empty() && plan.pods.is_empty());
        assert_eq!(d.applied_len(), 3);
        // A relist of the same data changes nothing.
        for ip in ips {
            d.apply(&c2, &host(ip), Some(&pair(ip, "198.18.2.11", 5, "x")));
        }
        assert_eq!(d.dirty_len(), 0);
        // A change and back again before the flush: nothing to write.
        d.apply(&c2, &host(ips[0]), Some(&pair(ips[0], "198.18.2.11", 6, "x")));
        d.apply(&c2, &host(ips[0]), Some(&pair(ips[0], "198.18.2.11", 5, "x")));
        assert!(planned(&mut d).is_empty());
        // A delete removes the element and frees the slot for the next prefix.
        d.apply(&c2, &host(ips[1]), None);
        let plan = planned(&mut d);
        assert_eq!(plan.delete_keys.len(), 1);
        assert_eq!(plan.deleted[0].sec_identity, 5);
        assert_eq!((d.len(), d.applied_len()), (2, 2));
        let slots = d.slots.len();
        d.apply(
            &c2,
            &host("10.2.0.9"),
            Some(&pair("10.2.0.9", "198.18.2.11", 5, "x")),
        );
        assert_eq!(d.slots.len(), slots, "freed slot reused");
        assert_eq!(planned(&mut d).upsert_keys.len(), 1);
        // A failed write: forget it and plan it again.
        let p = Prefix {
            addr: Ipv4Addr::new(10, 2, 0, 9),
            bits: 32,
        };
        d.set_applied(p, None);
        d.redirty([p]);
        assert_eq!(planned(&mut d).upsert_keys, vec![p.lpm_key()]);
    }

    #[test]
    fn local_pods_are_passed_on_when_they_change() {
        let c1: Arc<str> = Arc::from("c1");
        let mut d = Desired::new(c1.clone(), NODE);
        let key = &host("10.1.1.11");
        d.apply(
            &c1,
            key,
            Some(&pair("10.1.1.11", "198.18.1.11", 70000, "p1")),
        );
        let plan = planned(&mut d);
        assert_eq!(plan.pods.len(), 1);
        assert_eq!(plan.pods[0].1.as_ref().unwrap().name, "p1");
        d.apply(&c1, key, None);
        let plan = planned(&mut d);
        assert_eq!(plan.pods, vec![(Ipv4Addr::new(10, 1, 1, 11), None)]);
        assert_eq!(plan.delete_keys.len(), 1);
        // Nothing else about it later.
        d.apply(
            &c1,
            &host("10.1.1.12"),
            Some(&pair("10.1.1.12", "198.18.1.12", 70000, "p2")),
        );
        assert!(planned(&mut d).pods.is_empty());
    }

    #[test]
    fn stale_prefixes_are_unclaimed_applied_ones() {
        let c1: Arc<str> = Arc::from("c1");
        let mut d = Desired::new(c1.clone(), NODE);
        let local = Prefix {
            addr: Ipv4Addr::new(10, 1, 0, 1),
            bits: 32,
        };
        let remote = Prefix {
            addr: Ipv4Addr::new(10, 2, 0, 0),
            bits: 16,
        };
        d.set_applied(local, Some(IpcacheValue::local(7)));
        d.set_applied(
            remote,
            Some(IpcacheValue {
                flags: ipcache_flags::REMOTE_CLUSTER,
                ..IpcacheValue::local(8)
            }),
        );
        assert_eq!(d.stale(false), vec![local]);
        let mut all = d.stale(true);
        all.sort();
        assert_eq!(all, vec![local, remote]);
        // Claimed again with the same value: no longer stale, and nothing to write.
        d.apply(
            &c1,
            &host("10.1.0.1"),
            Some(&pair("10.1.0.1", "", 7, "")),
        );
        assert_eq!(d.stale(false), vec![]);
        assert!(planned(&mut d).is_empty());
        d.set_applied(remote, None);
        assert_eq!(d.stale(true), vec![]);
        assert_eq!(d.applied_len(), 1);
    }

    #[test]
    fn prefix_hash_spreads_blocks_and_keeps_a_block_together() {
        use std::hash::BuildHasher as _;
        let h = std::hash::BuildHasherDefault::<PrefixHasher>::default();
        let base = u32::from(Ipv4Addr::new(10, 16, 0, 0));
        let prefix = |i: u32, bits| Prefix {
            addr: Ipv4Addr::from(base + i),
            bits,
        };
        // 250k consecutive pod IPs in a table of 2^19 buckets: the 15625 blocks of 16 land
        // in groups as if at random (~12.4k distinct of 32768; FxHash alone: 8).
        let mask = (1u64 << 19) - 1;
        let groups: std::collections::HashSet<u64> = (0..250_000)
            .map(|i| (h.hash_one(prefix(i, 32)) & mask) >> 4)
            .collect();
        assert!(
            groups.len() > 12_000,
            "{} groups for 15625 blocks",
            groups.len()
        );
        // Within a block: one group, 16 distinct buckets, distinct tags.
        let block: Vec<u64> = (32..48).map(|i| h.hash_one(prefix(i, 32))).collect();
        let buckets: std::collections::HashSet<u64> = block.iter().map(|x| x & mask).collect();
        let tags: std::collections::HashSet<u64> = block.iter().map(|x| x >> 57).collect();
        assert_eq!(buckets.len(), 16);
        assert_eq!(tags.len(), 16);
        assert!(buckets.iter().all(|b| b >> 4 == (block[0] & mask) >> 4));
        // Prefixes of one address with other lengths are elsewhere.
        assert_ne!(
            h.hash_one(prefix(0, 32)) & mask,
            h.hash_one(prefix(0, 16)) & mask
        );
    }
}
