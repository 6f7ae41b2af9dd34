//! [`Table`], the pure part of the reconciler, once per address family ([`Desired`] for
//! IPv4, [`super::Desired6`] for IPv6): every cluster's claims per prefix, the winner of
//! each (the local cluster, then the lowest cluster name), and what the map holds
//! (`applied`), side by side in one slab; [`Plan`], the writes one flush needs.
//!
//! What differs between the families (the key and its hasher, the pod, how an entry becomes
//! a claim) is the [`Family`] trait; the claim rules, the slab and the diff are written
//! once, so IPv6 gets the IPv4 table's speed (interned clusters, a fast hasher, no
//! allocation per prefix, chunked plans) and the same rules by construction.
//!
//! It must not write maps: the [`Reconciler`](super::Reconciler) writes and then records
//! what it wrote.

use std::collections::BTreeSet;
use std::fmt::{Debug, Display};
use std::hash::{BuildHasher, Hash};
use std::net::Ipv4Addr;
use std::sync::Arc;

use clustermesh_ebpf_abi::{ipcache_flags, IpcacheLpmKey, IpcacheValue};
use clustermesh_types::model::{Cidr, IpcacheEntry};
use serde::Serialize;

use super::claim::{claim_of, Claim, LocalPod};
use super::prefix::{FxMap, Prefix, PrefixHasher};

/// What one address family brings to a [`Table`]: its key, its pod, its claim rule.
pub trait Family: Debug + Sized {
    /// The map key without cluster ID.
    type Prefix: Copy + Eq + Ord + Hash + Debug + Display;
    /// A pod's address (a host prefix's address).
    type Addr: Copy + Ord + Debug;
    /// A pod on this node.
    type Pod: Clone + Debug + PartialEq + Eq;
    /// This node's underlay address(es): which `HostIP` is this node.
    type Node: Copy + Debug;
    /// The prefix index's hasher (see [`super::prefix`]).
    type Hasher: BuildHasher + Default + Debug;
    /// The family's name in logs.
    const NAME: &'static str;
    /// The prefix and claim of `entry` (`None`: not this family's, or not programmable).
    fn claim(
        is_local_cluster: bool,
        node: Self::Node,
        entry: &IpcacheEntry,
    ) -> Option<(Self::Prefix, Claim<Self::Pod>)>;
    /// The prefix `cidr` names, if it is this family's.
    fn from_cidr(cidr: &Cidr) -> Option<Self::Prefix>;
    /// The map key.
    fn lpm_key(prefix: Self::Prefix) -> IpcacheLpmKey;
    /// The prefix of a map key this agent writes, if it is this family's.
    fn from_lpm_key(key: &IpcacheLpmKey) -> Option<Self::Prefix>;
    /// The prefix's address.
    fn addr(prefix: Self::Prefix) -> Self::Addr;
}

/// IPv4 ([`Prefix`], [`LocalPod`], the node's IPv4 underlay address).
#[derive(Debug)]
pub struct V4;

impl Family for V4 {
    type Prefix = Prefix;
    type Addr = Ipv4Addr;
    type Pod = LocalPod;
    type Node = Ipv4Addr;
    type Hasher = std::hash::BuildHasherDefault<PrefixHasher>;
    const NAME: &'static str = "IPv4";
    fn claim(
        is_local_cluster: bool,
        node: Ipv4Addr,
        entry: &IpcacheEntry,
    ) -> Option<(Prefix, Claim)> {
        claim_of(is_local_cluster, node, entry)
    }
    fn from_cidr(cidr: &Cidr) -> Option<Prefix> {
        Prefix::from_cidr(cidr)
    }
    fn lpm_key(prefix: Prefix) -> IpcacheLpmKey {
        prefix.lpm_key()
    }
    fn from_lpm_key(key: &IpcacheLpmKey) -> Option<Prefix> {
        Prefix::from_lpm_key(key)
    }
    fn addr(prefix: Prefix) -> Ipv4Addr {
        prefix.addr
    }
}

/// The IPv4 table.
pub type Desired = Table<V4>;

/// A cluster name, interned by [`Table`] (index into its `clusters`).
type ClusterId = u32;

/// The claims on one prefix: almost always exactly one cluster's.
#[derive(Debug)]
enum Claims<P> {
    One(ClusterId, Claim<P>),
    /// Two or more, sorted by cluster name.
    Many(Vec<(ClusterId, Claim<P>)>),
}

/// What [`Claims::insert`] changed.
#[derive(PartialEq)]
enum Inserted {
    /// The cluster's claim was already exactly that.
    Unchanged,
    /// The cluster's claim changed.
    Changed,
    /// A claim of another cluster joined: the prefix is claimed by several now.
    Joined,
}

impl<P: Clone + PartialEq> Claims<P> {
    /// Sets `cluster`'s claim.
    fn insert(&mut self, cluster: ClusterId, c: Claim<P>, names: &[Arc<str>]) -> Inserted {
        match self {
            Claims::One(k, v) if *k == cluster => {
                if *v == c {
                    return Inserted::Unchanged;
                }
                *v = c;
            }
            Claims::One(k, v) => {
                let mut m = vec![(*k, v.clone())];
                Self::insert_sorted(&mut m, cluster, c, names);
                *self = Claims::Many(m);
                return Inserted::Joined;
            }
            Claims::Many(m) => match m.iter_mut().find(|(k, _)| *k == cluster) {
                Some((_, v)) if *v == c => return Inserted::Unchanged,
                Some((_, v)) => *v = c,
                None => {
                    Self::insert_sorted(m, cluster, c, names);
                    return Inserted::Joined;
                }
            },
        }
        Inserted::Changed
    }

    fn insert_sorted(
        m: &mut Vec<(ClusterId, Claim<P>)>,
        cluster: ClusterId,
        c: Claim<P>,
        names: &[Arc<str>],
    ) {
        let name = &names[cluster as usize];
        let at = m.partition_point(|(k, _)| names[*k as usize] < *name);
        m.insert(at, (cluster, c));
    }

    /// Removes `cluster`'s claim; the claims left, `None` if `cluster` had none.
    fn remove(&mut self, cluster: ClusterId) -> Option<usize> {
        match self {
            Claims::One(k, _) => (*k == cluster).then_some(0),
            Claims::Many(m) => {
                let before = m.len();
                m.retain(|(k, _)| *k != cluster);
                let left = m.len();
                if left == before {
                    return None;
                }
                if left == 1 {
                    if let Some((k, v)) = m.pop() {
                        *self = Claims::One(k, v);
                    }
                }
                Some(left)
            }
        }
    }

    fn winner(&self, local: ClusterId) -> Option<&Claim<P>> {
        match self {
            Claims::One(_, v) => Some(v),
            Claims::Many(m) => m
                .iter()
                .find(|(k, _)| *k == local)
                .or_else(|| m.first())
                .map(|(_, v)| v),
        }
    }

    fn clusters(&self) -> impl Iterator<Item = ClusterId> + '_ {
        let (one, many) = match self {
            Claims::One(k, _) => (Some(*k), &[][..]),
            Claims::Many(m) => (None, &m[..]),
        };
        one.into_iter().chain(many.iter().map(|(k, _)| *k))
    }
}

/// One prefix: what the clusters claim and what the map holds.
#[derive(Debug)]
struct Slot<F: Family> {
    prefix: F::Prefix,
    claims: Option<Claims<F::Pod>>,
    applied: Option<IpcacheValue>,
    /// Listed in [`Table::dirty`] (at most once).
    dirty: bool,
    /// The last plan passed this prefix's local pod on (so a change must be passed on too).
    pod: bool,
}

impl<F: Family> Slot<F> {
    fn new(prefix: F::Prefix) -> Self {
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

/// The map writes one flush needs, built by [`Table::plan`]: keys and values side by side,
/// ready for `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` without another copy.
#[derive(Debug)]
pub struct Plan<F: Family = V4> {
    /// Keys to insert or replace.
    pub upsert_keys: Vec<IpcacheLpmKey>,
    /// Their values (`upsert_values[i]` for `upsert_keys[i]`).
    pub upsert_values: Vec<IpcacheValue>,
    /// `true` where `upsert_keys[i]` is not in the map yet (an insert that needs room, not
    /// a replacement).
    pub upsert_new: Vec<bool>,
    /// Keys to delete.
    pub delete_keys: Vec<IpcacheLpmKey>,
    /// What each deleted key held (`deleted[i]` for `delete_keys[i]`), to restore on failure.
    pub deleted: Vec<IpcacheValue>,
    /// Host prefixes whose local pod may have changed: address and the winner's pod now.
    pub pods: Vec<PodChange<F>>,
}

/// A host prefix's address and the winner's pod there now (`None`: no local pod any more).
pub type PodChange<F> = (<F as Family>::Addr, Option<Arc<<F as Family>::Pod>>);

impl<F: Family> Default for Plan<F> {
    fn default() -> Self {
        Self {
            upsert_keys: Vec::new(),
            upsert_values: Vec::new(),
            upsert_new: Vec::new(),
            delete_keys: Vec::new(),
            deleted: Vec::new(),
            pods: Vec::new(),
        }
    }
}

impl<F: Family> Plan<F> {
    /// Empties every list, keeping the memory.
    pub fn clear(&mut self) {
        self.upsert_keys.clear();
        self.upsert_values.clear();
        self.upsert_new.clear();
        self.delete_keys.clear();
        self.deleted.clear();
        self.pods.clear();
    }

    /// No map write.
    pub fn is_empty(&self) -> bool {
        self.upsert_keys.is_empty() && self.delete_keys.is_empty()
    }
}

/// A prefix claimed by more than one cluster (`/status` → `ipv6.conflicts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Conflict {
    /// The prefix.
    pub prefix: String,
    /// The clusters claiming it, by name.
    pub clusters: Vec<String>,
    /// The cluster whose entry is programmed.
    pub programmed: String,
}

/// Desired and applied state per prefix of one family (see the module docs of
/// [`crate::reconcile`] for why it is shaped so). Pure (no maps): the [`Reconciler`]
/// writes and then records what it wrote.
///
/// [`Reconciler`]: super::Reconciler
#[derive(Debug)]
pub struct Table<F: Family> {
    local: ClusterId,
    node: F::Node,
    /// Interned cluster names (`local` first); never shrinks (a handful of clusters).
    clusters: Vec<Arc<str>>,
    cluster_ids: FxMap<Arc<str>, ClusterId>,
    /// The last cluster looked up: inputs come in runs of one cluster sharing one `Arc`.
    last_cluster: Option<(Arc<str>, ClusterId)>,
    /// Prefix → index in `slots`: the table holds only the index (4 bytes a bucket), the
    /// prefix is read from the slot (see [`Table::reserve_capacity`] for why).
    index: hashbrown::HashTable<u32>,
    hasher: F::Hasher,
    slots: Vec<Slot<F>>,
    /// Indices of vacant slots.
    free: Vec<u32>,
    /// Slots changed since the last plan, in the order they first changed; those before
    /// `planned` were taken by a partial plan ([`Table::plan_upto`]).
    dirty: Vec<u32>,
    planned: usize,
    claimed: usize,
    applied: usize,
    unsupported: u64,
    /// Prefixes with more than one claim.
    conflicted: BTreeSet<F::Prefix>,
    /// Claims that joined another cluster's on a prefix, counted when they arrived.
    conflicts_total: u64,
}

impl<F: Family> Table<F> {
    /// Empty state for the agent of `local` on `node`.
    pub fn new(local: Arc<str>, node: F::Node) -> Self {
        let mut cluster_ids = FxMap::default();
        cluster_ids.insert(local.clone(), 0);
        Self {
            local: 0,
            node,
            clusters: vec![local],
            cluster_ids,
            last_cluster: None,
            index: hashbrown::HashTable::new(),
            hasher: F::Hasher::default(),
            slots: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            planned: 0,
            claimed: 0,
            applied: 0,
            unsupported: 0,
            conflicted: BTreeSet::new(),
            conflicts_total: 0,
        }
    }

    /// The local cluster's name.
    pub fn local(&self) -> &Arc<str> {
        &self.clusters[self.local as usize]
    }

    /// This node's underlay address(es).
    pub fn node(&self) -> F::Node {
        self.node
    }

    /// Sets this node's underlay address(es); call before the first input (claims made
    /// earlier keep the node they were made with).
    pub fn set_node(&mut self, node: F::Node) {
        self.node = node;
    }

    /// Makes room for `additional` more prefixes (before adopting a map or a large list).
    pub fn reserve(&mut self, additional: usize) {
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .reserve(additional, |&i| hasher.hash_one(slots[i as usize].prefix));
        self.slots.reserve(additional);
    }

    /// The slot of `prefix`, if it has one.
    fn find(&self, prefix: &F::Prefix) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(self.hasher.hash_one(prefix), |&i| {
                slots[i as usize].prefix == *prefix
            })
            .copied()
    }
    /// Sizes the slab and the index for a map of `max_entries` up front, so that a big
    /// first list never pays for growing them: growing the index rehashes every prefix
    /// several times and growing the slab copies it, ~40% more user time for a 250k fill
    /// than a table sized right (measured on the table alone, 250k entries: ~23 ms sized
    /// for the count, ~43 ms grown). The count of the first lists is not known here, the
    /// map's size is. The slab is filled in order, so its reservation is address space until
    /// prefixes arrive. The index holds only slab indices (4 bytes a bucket, the prefix is
    /// in the slot): sized for 1.3M entries its buckets are 8 MiB instead of the 24 MiB a
    /// `HashMap<Prefix, u32>` took, which a 250k fill touched almost page by page (the
    /// hash spreads blocks): a fresh fill took 41 ms instead of 50 ms, and IPv6 keys
    /// (20 bytes) cost no more index memory than IPv4 ones.
    pub fn reserve_capacity(&mut self, max_entries: usize) {
        self.slots
            .reserve(max_entries.saturating_sub(self.slots.len()));
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .reserve(max_entries.saturating_sub(self.index.len()), |&i| {
                hasher.hash_one(slots[i as usize].prefix)
            });
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
    fn slot_of(&mut self, prefix: F::Prefix) -> u32 {
        let (slots, hasher) = (&self.slots, &self.hasher);
        match self.index.entry(
            hasher.hash_one(prefix),
            |&i| slots[i as usize].prefix == prefix,
            |&i| hasher.hash_one(slots[i as usize].prefix),
        ) {
            hashbrown::hash_table::Entry::Occupied(e) => *e.get(),
            hashbrown::hash_table::Entry::Vacant(e) => {
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
                e.insert(i);
                i
            }
        }
    }

    /// Frees slot `i` if it holds nothing any more.
    fn release_if_vacant(&mut self, i: u32) {
        let slot = &self.slots[i as usize];
        if slot.vacant() {
            if let Ok(e) = self
                .index
                .find_entry(self.hasher.hash_one(slot.prefix), |&j| j == i)
            {
                e.remove();
            }
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
        match entry.and_then(|e| F::claim(id == self.local, self.node, e)) {
            Some((prefix, c)) => {
                let i = self.slot_of(prefix);
                let slot = &mut self.slots[i as usize];
                match &mut slot.claims {
                    Some(claims) => match claims.insert(id, c, &self.clusters) {
                        Inserted::Unchanged => return, // a relist of the same data
                        Inserted::Changed => {}
                        Inserted::Joined => {
                            self.conflicts_total += 1;
                            self.conflicted.insert(prefix);
                        }
                    },
                    none @ None => {
                        *none = Some(Claims::One(id, c));
                        self.claimed += 1;
                    }
                }
                self.mark_dirty(i);
            }
            // Deleted, or now unprogrammable: drop whatever this cluster claimed there.
            None => {
                let Some(prefix) = F::from_cidr(prefix) else {
                    if entry.is_some() {
                        self.unsupported += 1;
                    }
                    return;
                };
                let Some(i) = self.find(&prefix) else {
                    return;
                };
                let slot = &mut self.slots[i as usize];
                let Some(claims) = &mut slot.claims else {
                    return;
                };
                let many = matches!(claims, Claims::Many(_));
                let Some(left) = claims.remove(id) else {
                    return; // this cluster claimed nothing here
                };
                if left == 0 {
                    slot.claims = None;
                    self.claimed -= 1;
                }
                if many && left <= 1 {
                    self.conflicted.remove(&prefix);
                }
                self.mark_dirty(i);
            }
        }
    }

    /// The winning claim for `prefix`: the local cluster's, else the lowest cluster name's.
    pub fn winner(&self, prefix: &F::Prefix) -> Option<&Claim<F::Pod>> {
        let i = self.find(prefix)?;
        self.slots[i as usize].claims.as_ref()?.winner(self.local)
    }

    /// `true` if some cluster claims `prefix`.
    pub fn contains(&self, prefix: &F::Prefix) -> bool {
        self.find(prefix)
            .is_some_and(|i| self.slots[i as usize].claims.is_some())
    }

    /// Decides the map writes for every prefix changed since the last plan (each once, in
    /// the order they first changed) into `out`, and records them as applied right away: a
    /// failed write is undone with [`Self::set_applied`] and [`Self::redirty`].
    pub fn plan(&mut self, out: &mut Plan<F>) {
        while self.plan_upto(out, usize::MAX) {}
    }

    /// [`Self::plan`] for at most `max` changed prefixes, appended to `out`; `true` if more
    /// are left. The reconciler writes a big change in chunks of one syscall each, so the
    /// key and value arrays stay small and hot in the cache instead of being a fresh 12 MB
    /// for 250k entries.
    pub fn plan_upto(&mut self, out: &mut Plan<F>, max: usize) -> bool {
        let end = self.dirty.len().min(self.planned.saturating_add(max));
        let n = end - self.planned;
        out.upsert_keys.reserve(n);
        out.upsert_values.reserve(n);
        out.upsert_new.reserve(n);
        for k in self.planned..end {
            let i = self.dirty[k];
            let slot = &mut self.slots[i as usize];
            slot.dirty = false;
            let winner = slot.claims.as_ref().and_then(|c| c.winner(self.local));
            if let Some(pod) = winner.and_then(|c| c.pod.as_ref()) {
                slot.pod = true;
                out.pods.push((F::addr(slot.prefix), Some(pod.clone())));
            } else if std::mem::take(&mut slot.pod) {
                out.pods.push((F::addr(slot.prefix), None));
            }
            match (winner.map(|c| c.value), slot.applied) {
                (Some(v), Some(a)) if v == a => {}
                (Some(v), old) => {
                    slot.applied = Some(v);
                    if old.is_none() {
                        self.applied += 1;
                    }
                    out.upsert_keys.push(F::lpm_key(slot.prefix));
                    out.upsert_values.push(v);
                    out.upsert_new.push(old.is_none());
                }
                (None, Some(old)) => {
                    slot.applied = None;
                    self.applied -= 1;
                    out.delete_keys.push(F::lpm_key(slot.prefix));
                    out.deleted.push(old);
                    self.release_if_vacant(i);
                }
                (None, None) => self.release_if_vacant(i),
            }
        }
        self.planned = end;
        if end < self.dirty.len() {
            return true;
        }
        // Keep the buffer for the next changes.
        self.dirty.clear();
        self.planned = 0;
        false
    }

    /// Records what the map holds for `prefix` (after a write, or found at start).
    pub fn set_applied(&mut self, prefix: F::Prefix, value: Option<IpcacheValue>) {
        let i = match value {
            Some(_) => self.slot_of(prefix),
            None => match self.find(&prefix) {
                Some(i) => i,
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
    pub fn stale(&self, remote: bool) -> Vec<F::Prefix> {
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
    pub fn redirty(&mut self, prefixes: impl IntoIterator<Item = F::Prefix>) {
        for p in prefixes {
            if let Some(i) = self.find(&p) {
                self.mark_dirty(i);
            }
        }
    }

    /// Prefixes changed since the last plan.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len() - self.planned
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

    /// Claims that joined another cluster's on a prefix since start.
    pub fn conflicts_total(&self) -> u64 {
        self.conflicts_total
    }

    /// The prefixes claimed by several clusters now (the first 32) and how many there are.
    pub fn conflicts(&self) -> (usize, Vec<Conflict>) {
        let list = self
            .conflicted
            .iter()
            .take(32)
            .filter_map(|p| {
                let claims = self.slots[self.find(p)? as usize].claims.as_ref()?;
                let name = |k: ClusterId| self.clusters[k as usize].to_string();
                let programmed = match claims {
                    Claims::One(k, _) => *k,
                    Claims::Many(m) => {
                        m.iter()
                            .find(|(k, _)| *k == self.local)
                            .or_else(|| m.first())?
                            .0
                    }
                };
                Some(Conflict {
                    prefix: p.to_string(),
                    clusters: claims.clusters().map(name).collect(),
                    programmed: name(programmed),
                })
            })
            .collect();
        (self.conflicted.len(), list)
    }

    /// Prefixes with a slot (claimed, applied or waiting for a plan).
    #[cfg(test)]
    pub(super) fn slots_in_use(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::claim::tests::{pair, NODE};

    /// The prefix of a host entry's key.
    fn host(ip: &str) -> Cidr {
        format!("{ip}/32").parse().expect("ip")
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
            d.apply(
                &c,
                &host("10.9.9.9"),
                Some(&pair("10.9.9.9", "198.18.2.11", id, "x")),
            );
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
        d.apply(
            &c2,
            &host(ips[0]),
            Some(&pair(ips[0], "198.18.2.11", 6, "x")),
        );
        d.apply(
            &c2,
            &host(ips[0]),
            Some(&pair(ips[0], "198.18.2.11", 5, "x")),
        );
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
    fn a_plan_in_chunks_writes_each_change_once_in_order() {
        let c2: Arc<str> = Arc::from("c2");
        let mut d = Desired::new(Arc::from("c1"), NODE);
        let ips: Vec<String> = (1..=10).map(|i| format!("10.3.0.{i}")).collect();
        for ip in &ips {
            d.apply(&c2, &host(ip), Some(&pair(ip, "198.18.2.11", 5, "x")));
        }
        let mut keys = Vec::new();
        let mut plan = Plan::default();
        while {
            plan.clear();
            let more = d.plan_upto(&mut plan, 4);
            assert!(plan.upsert_keys.len() <= 4);
            assert!(plan.upsert_new.iter().all(|n| *n), "all new");
            keys.extend_from_slice(&plan.upsert_keys);
            more
        } {}
        let want: Vec<_> = ips
            .iter()
            .map(|ip| Prefix::from_cidr(&host(ip)).unwrap().lpm_key())
            .collect();
        assert_eq!(keys, want);
        assert_eq!((d.dirty_len(), d.applied_len()), (0, 10));
        // A change of a written entry is a replacement.
        d.apply(
            &c2,
            &host(&ips[0]),
            Some(&pair(&ips[0], "198.18.2.11", 6, "x")),
        );
        let plan = planned(&mut d);
        assert_eq!(plan.upsert_new, vec![false]);
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
        d.apply(&c1, &host("10.1.0.1"), Some(&pair("10.1.0.1", "", 7, "")));
        assert_eq!(d.stale(false), vec![]);
        assert!(planned(&mut d).is_empty());
        d.set_applied(remote, None);
        assert_eq!(d.stale(true), vec![]);
        assert_eq!(d.applied_len(), 1);
    }
}
