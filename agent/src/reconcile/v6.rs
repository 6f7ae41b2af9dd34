//! IPv6 ipcache entries: the desired and applied state of every IPv6 prefix, by the same
//! rules and with the same diff and batching as IPv4 ([`super::Desired`]), and the local
//! endpoints of this node's IPv6 pods.
//!
//! Rules (as for IPv4, see [`crate::reconcile`]): the local cluster wins a prefix claimed
//! by several clusters, then the lowest cluster name; the losers are not programmed, and
//! every prefix with more than one claim is counted and named in `/status`
//! (`ipv6.conflicts`). The tunnel endpoint is the entry's `HostIP` of either family: an
//! IPv4 `HostIP` gives an IPv4 tunnel (IPv6 pods over an IPv4 underlay, Cilium's default),
//! an IPv6 one an IPv6 tunnel (`IPV6_TUNNEL`) when this node has an IPv6 underlay address
//! (`--node-ip6`), else the entry is programmed without a tunnel, as IPv4 does with an
//! endpoint it cannot reach.
//!
//! A local IPv6 pod (a `/128` of the local cluster whose `HostIP` is this node) gets a local
//! endpoints entry on the interface [`crate::discovery`] found for the same pod's IPv4
//! address (a dual-stack pod); an IPv6-only pod is found by its own IPv6 route, which must
//! lead to a veth ([`crate::discovery::Snapshot::find6`]), and gets `from_pod` attached
//! there.
//!
//! Why a separate table and not [`super::Desired`] generic over the family: the IPv4 slab is
//! tuned for 250k entries (see the module docs of [`crate::reconcile`]) and its hash packs
//! an IPv4 address into one word; keeping IPv6 beside it leaves the IPv4 paths exactly as
//! they were. The IPv6 table is a plain hash map of prefixes, diffed and flushed in the
//! same batches.
//!
//! It must not read etcd or discover interfaces.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use clustermesh_ebpf_abi::{
    family, ipcache_flags, EndpointInfo, IpcacheKey, IpcacheLpmKey, IpcacheValue,
};
use clustermesh_types::model::{Cidr, IpcacheEntry};
use serde::Serialize;
use tracing::warn;

use super::Reconciler;
use crate::datapath::{Attached, Program};

/// An IPv6 prefix (the ipcache key without cluster ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix6 {
    /// Address (host bits as published).
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub bits: u8,
}

impl Prefix6 {
    /// The map key (Cilium's IPv6 key: family 2, prefixlen 32 + `bits`).
    pub fn lpm_key(self) -> IpcacheLpmKey {
        IpcacheLpmKey {
            prefixlen: IpcacheKey::prefixlen(u32::from(self.bits)),
            key: IpcacheKey::v6(self.addr.octets()),
        }
    }

    /// The prefix `cidr` names; `None` for IPv4.
    pub fn from_cidr(cidr: &Cidr) -> Option<Self> {
        match cidr.addr {
            IpAddr::V6(addr) => Some(Self {
                addr,
                bits: cidr.prefix_len,
            }),
            IpAddr::V4(_) => None,
        }
    }

    /// The prefix of a map key this agent writes (IPv6, cluster 0), else `None`.
    pub fn from_lpm_key(k: &IpcacheLpmKey) -> Option<Self> {
        let bits = k
            .prefixlen
            .checked_sub(clustermesh_ebpf_abi::IPCACHE_STATIC_PREFIX)?;
        if k.key.family != family::IPV6 || k.key.cluster_id != 0 || bits > 128 {
            return None;
        }
        Some(Self {
            addr: Ipv6Addr::from(k.key.addr),
            bits: bits as u8,
        })
    }
}

impl std::fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

/// An IPv6 pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalPod6 {
    /// Pod IPv6 address.
    pub ip: Ipv6Addr,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Security identity.
    pub identity: u32,
}

/// What one cluster's IPv6 entry asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim6 {
    /// The map value.
    pub value: IpcacheValue,
    /// Set when the entry is a pod on this node.
    pub pod: Option<Arc<LocalPod6>>,
}

/// This node's underlay addresses: which `HostIP` is this node, and which tunnels it can
/// send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Underlay {
    /// The IPv4 underlay address (`--node-ip`); `0.0.0.0` on an IPv6-only node.
    pub v4: Ipv4Addr,
    /// The IPv6 underlay address (`--node-ip6`), if the node has one.
    pub v6: Option<Ipv6Addr>,
}

/// The prefix and claim of an IPv6 `entry` (`None` for an IPv4 one).
pub fn claim6(
    is_local_cluster: bool,
    node: Underlay,
    entry: &IpcacheEntry,
) -> Option<(Prefix6, Claim6)> {
    let prefix = Prefix6::from_cidr(&entry.prefix)?;
    let pair = &entry.pair;
    let remote_flag = if is_local_cluster {
        0
    } else {
        ipcache_flags::REMOTE_CLUSTER
    };
    let is_this_node = match entry.host {
        // 0.0.0.0 is "no IPv4 underlay" (an IPv6-only node).
        Some(IpAddr::V4(h)) => h == node.v4 && !node.v4.is_unspecified(),
        Some(IpAddr::V6(h)) => Some(h) == node.v6,
        None => false,
    };
    let claim = if is_this_node && is_local_cluster {
        Claim6 {
            value: IpcacheValue {
                key: pair.key,
                ..IpcacheValue::local(pair.id)
            },
            pod: (prefix.bits == 128 && !pair.k8s_pod_name.is_empty()).then(|| {
                Arc::new(LocalPod6 {
                    ip: prefix.addr,
                    namespace: pair.k8s_namespace.clone(),
                    name: pair.k8s_pod_name.clone(),
                    identity: pair.id,
                })
            }),
        }
    } else {
        let mut value = match entry.host {
            Some(IpAddr::V4(h)) => IpcacheValue::tunnel_v4(pair.id, h.octets()),
            Some(IpAddr::V6(h)) if node.v6.is_some() => {
                IpcacheValue::tunnel_v6(pair.id, h.octets())
            }
            // No HostIP, or an IPv6 one this node has no underlay for: no tunnel.
            _ => IpcacheValue::local(pair.id),
        };
        value.key = pair.key;
        value.flags |= remote_flag;
        Claim6 { value, pod: None }
    };
    Some((prefix, claim))
}

#[derive(Debug, Default)]
struct Slot6 {
    /// Claims sorted by cluster name.
    claims: Vec<(Arc<str>, Claim6)>,
    applied: Option<IpcacheValue>,
    dirty: bool,
    /// The last plan passed this prefix's local pod on.
    pod: bool,
}

/// The map writes one IPv6 flush needs (as [`super::Plan`]).
#[derive(Debug, Default)]
pub struct Plan6 {
    /// Keys to insert or replace.
    pub upsert_keys: Vec<IpcacheLpmKey>,
    /// Their values.
    pub upsert_values: Vec<IpcacheValue>,
    /// `true` where the key is not in the map yet (an insert, not a replacement).
    pub upsert_new: Vec<bool>,
    /// Keys to delete.
    pub delete_keys: Vec<IpcacheLpmKey>,
    /// What each deleted key held.
    pub deleted: Vec<IpcacheValue>,
    /// /128 prefixes whose local pod may have changed.
    pub pods: Vec<(Ipv6Addr, Option<Arc<LocalPod6>>)>,
}

/// A prefix claimed by more than one cluster (`/status` → `ipv6.conflicts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Conflict6 {
    /// The prefix.
    pub prefix: String,
    /// The clusters claiming it, by name.
    pub clusters: Vec<String>,
    /// The cluster whose entry is programmed.
    pub programmed: String,
}

/// Desired and applied state of every IPv6 prefix; pure (no maps).
#[derive(Debug)]
pub struct Desired6 {
    local: Arc<str>,
    node: Underlay,
    slots: HashMap<Prefix6, Slot6>,
    dirty: Vec<Prefix6>,
    applied: usize,
    /// Prefixes with more than one claim.
    conflicted: BTreeSet<Prefix6>,
    /// Claims that lost to another cluster's, counted when they arrived.
    conflicts_total: u64,
}

impl Desired6 {
    /// Empty state for the agent of `local` on `node`.
    pub fn new(local: Arc<str>, node: Underlay) -> Self {
        Self {
            local,
            node,
            slots: HashMap::new(),
            dirty: Vec::new(),
            applied: 0,
            conflicted: BTreeSet::new(),
            conflicts_total: 0,
        }
    }

    /// This node's underlay addresses.
    pub fn underlay(&self) -> Underlay {
        self.node
    }

    fn mark_dirty(&mut self, p: Prefix6) {
        let slot = self.slots.entry(p).or_default();
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(p);
        }
    }

    /// Applies a change of `cluster`'s IPv6 entry for `prefix` (`None`: deleted).
    pub fn apply(&mut self, cluster: &Arc<str>, prefix: &Cidr, entry: Option<&IpcacheEntry>) {
        let is_local = **cluster == *self.local;
        match entry.and_then(|e| claim6(is_local, self.node, e)) {
            Some((p, c)) => {
                let slot = self.slots.entry(p).or_default();
                match slot.claims.iter_mut().find(|(k, _)| k == cluster) {
                    Some((_, old)) if *old == c => return,
                    Some((_, old)) => *old = c,
                    None => {
                        let at = slot.claims.partition_point(|(k, _)| k < cluster);
                        slot.claims.insert(at, (cluster.clone(), c));
                        if slot.claims.len() > 1 {
                            self.conflicts_total += 1;
                            self.conflicted.insert(p);
                        }
                    }
                }
                self.mark_dirty(p);
            }
            None => {
                let Some(p) = Prefix6::from_cidr(prefix) else {
                    return;
                };
                let Some(slot) = self.slots.get_mut(&p) else {
                    return;
                };
                let before = slot.claims.len();
                slot.claims.retain(|(k, _)| k != cluster);
                if slot.claims.len() == before {
                    return;
                }
                if slot.claims.len() <= 1 {
                    self.conflicted.remove(&p);
                }
                self.mark_dirty(p);
            }
        }
    }

    fn winner<'a>(local: &str, claims: &'a [(Arc<str>, Claim6)]) -> Option<&'a Claim6> {
        claims
            .iter()
            .find(|(k, _)| **k == *local)
            .or_else(|| claims.first())
            .map(|(_, c)| c)
    }

    /// The winning claim for `prefix`.
    pub fn winner_of(&self, prefix: &Prefix6) -> Option<&Claim6> {
        Self::winner(&self.local, &self.slots.get(prefix)?.claims)
    }

    /// Decides the map writes for every prefix changed since the last plan and records
    /// them as applied (a failed write is undone with [`Self::set_applied`] and
    /// [`Self::redirty`]).
    pub fn plan(&mut self, out: &mut Plan6) {
        for p in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.slots.get_mut(&p) else {
                continue;
            };
            slot.dirty = false;
            let winner = Self::winner(&self.local, &slot.claims);
            if let Some(pod) = winner.and_then(|c| c.pod.as_ref()) {
                slot.pod = true;
                out.pods.push((p.addr, Some(pod.clone())));
            } else if std::mem::take(&mut slot.pod) {
                out.pods.push((p.addr, None));
            }
            match (winner.map(|c| c.value), slot.applied) {
                (Some(v), Some(a)) if v == a => {}
                (Some(v), old) => {
                    slot.applied = Some(v);
                    if old.is_none() {
                        self.applied += 1;
                    }
                    out.upsert_keys.push(p.lpm_key());
                    out.upsert_values.push(v);
                    out.upsert_new.push(old.is_none());
                }
                (None, Some(old)) => {
                    slot.applied = None;
                    self.applied -= 1;
                    out.delete_keys.push(p.lpm_key());
                    out.deleted.push(old);
                }
                (None, None) => {}
            }
            if slot.claims.is_empty() && slot.applied.is_none() && !slot.pod {
                self.slots.remove(&p);
            }
        }
    }

    /// Records what the map holds for `prefix`.
    pub fn set_applied(&mut self, prefix: Prefix6, value: Option<IpcacheValue>) {
        let slot = match value {
            Some(_) => self.slots.entry(prefix).or_default(),
            None => match self.slots.get_mut(&prefix) {
                Some(s) => s,
                None => return,
            },
        };
        match (slot.applied.is_some(), value.is_some()) {
            (false, true) => self.applied += 1,
            (true, false) => self.applied -= 1,
            _ => {}
        }
        slot.applied = value;
        if slot.claims.is_empty() && slot.applied.is_none() && !slot.dirty && !slot.pod {
            self.slots.remove(&prefix);
        }
    }

    /// Marks prefixes dirty again (after a failed flush).
    pub fn redirty(&mut self, prefixes: impl IntoIterator<Item = Prefix6>) {
        for p in prefixes {
            self.mark_dirty(p);
        }
    }

    /// Prefixes in the map no cluster claims; with `remote: false` only those without the
    /// `REMOTE_CLUSTER` flag.
    pub fn stale(&self, remote: bool) -> Vec<Prefix6> {
        self.slots
            .iter()
            .filter(|(_, s)| {
                s.claims.is_empty()
                    && s.applied
                        .is_some_and(|v| remote || v.flags & ipcache_flags::REMOTE_CLUSTER == 0)
            })
            .map(|(p, _)| *p)
            .collect()
    }

    /// Prefixes changed since the last plan.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Prefixes the map holds.
    pub fn applied_len(&self) -> usize {
        self.applied
    }

    /// Claims that lost to another cluster's since start.
    pub fn conflicts_total(&self) -> u64 {
        self.conflicts_total
    }

    /// The prefixes claimed by several clusters now (the first 32) and how many there are.
    pub fn conflicts(&self) -> (usize, Vec<Conflict6>) {
        let list = self
            .conflicted
            .iter()
            .take(32)
            .filter_map(|p| {
                let claims = &self.slots.get(p)?.claims;
                let programmed = claims
                    .iter()
                    .find(|(k, _)| **k == *self.local)
                    .or_else(|| claims.first())?;
                Some(Conflict6 {
                    prefix: p.to_string(),
                    clusters: claims.iter().map(|(k, _)| k.to_string()).collect(),
                    programmed: programmed.0.to_string(),
                })
            })
            .collect();
        (self.conflicted.len(), list)
    }
}

/// An IPv6 local pod as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pod6Report {
    /// The pod.
    #[serde(flatten)]
    pub pod: LocalPod6,
    /// The interface its local endpoint points to, once known.
    pub interface: Option<String>,
    /// `programmed` or `waiting-for-interface: <why>`.
    pub state: String,
}

/// The IPv6 half of the reconciler's `/status` (`datapath.ipv6`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report6 {
    /// This node's IPv6 underlay address (`--node-ip6`), if any.
    pub underlay: Option<Ipv6Addr>,
    /// IPv6 ipcache entries programmed.
    pub ipcache_entries: usize,
    /// IPv6 local endpoints programmed.
    pub local_endpoints: usize,
    /// IPv6 pods on this node.
    pub pods: Vec<Pod6Report>,
    /// Prefixes claimed by more than one cluster now.
    pub conflicting_prefixes: usize,
    /// Claims that lost to another cluster's since start.
    pub conflicts_total: u64,
    /// The first 32 conflicting prefixes.
    pub conflicts: Vec<Conflict6>,
}

/// The reconciler's IPv6 state (one field of [`Reconciler`]).
#[derive(Debug)]
pub(super) struct State6 {
    pub(super) desired: Desired6,
    pods: BTreeMap<Ipv6Addr, Arc<LocalPod6>>,
    /// pod address → (interface, state) after the last endpoint sync.
    pod_state: BTreeMap<Ipv6Addr, (Option<String>, String)>,
    pub(super) applied_eps: HashMap<Ipv6Addr, EndpointInfo>,
    /// IPv6-only pods: what discovery found (or why not) at the last pod sync.
    only: BTreeMap<Ipv6Addr, Result<crate::discovery::Found, String>>,
    /// IPv6 entries the last flush could not write for lack of room in the ipcache.
    pub(super) capacity_waiting: usize,
}

impl State6 {
    pub(super) fn new(local: Arc<str>, node: Underlay) -> Self {
        Self {
            desired: Desired6::new(local, node),
            pods: BTreeMap::new(),
            pod_state: BTreeMap::new(),
            applied_eps: HashMap::new(),
            only: BTreeMap::new(),
            capacity_waiting: 0,
        }
    }

    pub(super) fn report(&self) -> Report6 {
        let (conflicting_prefixes, conflicts) = self.desired.conflicts();
        Report6 {
            underlay: self.desired.node.v6,
            ipcache_entries: self.desired.applied_len(),
            local_endpoints: self.applied_eps.len(),
            pods: self
                .pods
                .values()
                .map(|p| {
                    let (interface, state) = self
                        .pod_state
                        .get(&p.ip)
                        .cloned()
                        .unwrap_or((None, "pending".into()));
                    Pod6Report {
                        pod: (**p).clone(),
                        interface,
                        state,
                    }
                })
                .collect(),
            conflicting_prefixes,
            conflicts_total: self.desired.conflicts_total(),
            conflicts,
        }
    }
}

impl Reconciler {
    /// Sets this node's IPv6 underlay address (`--node-ip6`): IPv6 `HostIP`s become IPv6
    /// tunnels, and entries whose `HostIP` is this address are this node's. Call before the
    /// first input.
    pub fn set_node_ip6(&mut self, v6: Option<Ipv6Addr>) {
        let node = Underlay {
            v6,
            ..self.v6.desired.node
        };
        self.v6.desired.node = node;
    }

    /// Writes the IPv6 difference between desired and applied state (see [`Self::flush`]).
    pub(super) fn flush6(&mut self) {
        if self.v6.desired.dirty_len() == 0 {
            return;
        }
        let mut plan = Plan6::default();
        self.v6.desired.plan(&mut plan);
        let mut pods_changed = false;
        for (addr, pod) in plan.pods.drain(..) {
            if self.v6.pods.get(&addr) != pod.as_ref() {
                match pod {
                    Some(pod) => self.v6.pods.insert(addr, pod),
                    None => self.v6.pods.remove(&addr),
                };
                pods_changed = true;
            }
        }
        let ipcache = &mut self.dp.maps.ipcache;
        // Deletes first, as for IPv4: they make room in a full map.
        match ipcache.delete_batch(&plan.delete_keys) {
            Ok(_) => self.stats.ipcache_deletes += plan.delete_keys.len() as u64,
            Err(error) => {
                warn!(%error, entries = plan.delete_keys.len(), "IPv6 ipcache delete failed; retrying on the next flush");
                self.stats.errors += 1;
                let mut failed = Vec::with_capacity(plan.delete_keys.len());
                for (k, old) in plan.delete_keys.iter().zip(&plan.deleted) {
                    if let Some(p) = Prefix6::from_lpm_key(k) {
                        self.v6.desired.set_applied(p, Some(*old));
                        failed.push(p);
                    }
                }
                self.v6.desired.redirty(failed);
            }
        }
        let (not_written, waiting) = super::upsert(
            ipcache,
            &plan.upsert_keys,
            &plan.upsert_values,
            &plan.upsert_new,
            &mut self.stats,
        );
        let failed: Vec<Prefix6> = not_written
            .iter()
            .filter_map(|&i| Prefix6::from_lpm_key(&plan.upsert_keys[i]))
            .collect();
        for p in &failed {
            self.v6.desired.set_applied(*p, None);
        }
        self.v6.desired.redirty(failed);
        if waiting > 0 && self.v6.capacity_waiting == 0 {
            warn!(
                waiting,
                max_entries = self.max_ipcache,
                "ipcache full: IPv6 entries wait for room and are retried on every flush; raise --ipcache-max-entries"
            );
        }
        self.v6.capacity_waiting = waiting;
        if pods_changed {
            // A full pod sync: an IPv6-only pod needs discovery and an attachment.
            self.pods_dirty = true;
        }
    }

    /// Finds the interfaces of IPv6-only local pods (no IPv4 address of the same pod) in
    /// `snapshot` and attaches `from_pod` there; returns those interfaces (the caller keeps
    /// them attached). Called by [`Self::sync_pods`].
    pub(super) fn discover_v6_only(
        &mut self,
        snapshot: &mut crate::discovery::Snapshot,
    ) -> Vec<String> {
        let dual: std::collections::HashSet<(&str, &str)> = self
            .pods
            .values()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        let only: Vec<Ipv6Addr> = self
            .v6
            .pods
            .values()
            .filter(|p| !dual.contains(&(p.namespace.as_str(), p.name.as_str())))
            .map(|p| p.ip)
            .collect();
        let mut found = BTreeMap::new();
        let mut interfaces = Vec::new();
        for ip in only {
            let f = match self.rtnl.as_mut() {
                Some(sock) => snapshot.find6(sock, ip),
                None => Err("no netlink socket".to_owned()),
            };
            let f = f.and_then(|f| match self.dp.attach(Program::FromPod, &f.interface) {
                Ok(how) => {
                    match how {
                        Attached::Created => self.stats.attach_created += 1,
                        Attached::Replaced => self.stats.attach_replaced += 1,
                        Attached::Unchanged => {}
                    }
                    Ok(f)
                }
                Err(error) => {
                    warn!(interface = %f.interface, %error, "attach from_pod failed; retrying when interfaces change");
                    Err(format!("attach failed on {}: {error}", f.interface))
                }
            });
            if let Ok(f) = &f {
                interfaces.push(f.interface.clone());
            }
            found.insert(ip, f);
        }
        self.v6.only = found;
        interfaces
    }

    /// Brings the IPv6 local endpoints in line with the IPv6 local pods: each takes the
    /// interface and MACs discovery found for the same pod's IPv4 address. Called after
    /// every IPv4 pod sync and when the IPv6 pods change.
    pub(super) fn sync_pods6(&mut self) {
        // (namespace, name) → what the IPv4 sibling's discovery found.
        let mut found_by_pod: HashMap<(&str, &str), &crate::discovery::Found> = HashMap::new();
        for (ip, pod) in &self.pods {
            if let Some(f) = self.pod_state.get(ip).and_then(|s| s.found.as_ref()) {
                found_by_pod.insert((pod.namespace.as_str(), pod.name.as_str()), f);
            }
        }
        let mut want: HashMap<Ipv6Addr, EndpointInfo> = HashMap::new();
        let mut states = BTreeMap::new();
        for (ip, pod) in &self.v6.pods {
            let found = found_by_pod
                .get(&(pod.namespace.as_str(), pod.name.as_str()))
                .copied()
                .ok_or_else(|| match self.v6.only.get(ip) {
                    Some(Err(why)) => format!("waiting-for-interface: {why}"),
                    _ => "waiting-for-interface".to_owned(),
                })
                .or_else(|why| match self.v6.only.get(ip) {
                    Some(Ok(f)) => Ok(f),
                    _ => Err(why),
                });
            match found {
                Ok(f) => {
                    want.insert(
                        *ip,
                        EndpointInfo {
                            ifindex: f.ifindex,
                            identity: pod.identity,
                            flags: 0,
                            pod_mac: f.pod_mac,
                            host_mac: f.host_mac,
                        },
                    );
                    states.insert(*ip, (Some(f.interface.clone()), "programmed".to_owned()));
                }
                Err(why) => {
                    states.insert(*ip, (None, why));
                }
            }
        }
        let eps = &mut self.dp.maps.local_endpoints;
        for (ip, info) in &want {
            if self.v6.applied_eps.get(ip) == Some(info) {
                continue;
            }
            match eps.upsert_v6(*ip, *info) {
                Ok(()) => {
                    self.stats.endpoint_upserts += 1;
                    self.v6.applied_eps.insert(*ip, *info);
                }
                Err(error) => {
                    warn!(%ip, %error, "IPv6 local endpoint update failed");
                    self.stats.errors += 1;
                }
            }
        }
        let local_synced = self.synced.contains(self.desired.local()) && !self.removals_held;
        let gone: Vec<Ipv6Addr> = self
            .v6
            .applied_eps
            .keys()
            .filter(|ip| !want.contains_key(ip) && (local_synced || self.v6.pods.contains_key(ip)))
            .copied()
            .collect();
        for ip in gone {
            match eps.remove_v6(ip) {
                Ok(_) => {
                    self.stats.endpoint_deletes += 1;
                    self.v6.applied_eps.remove(&ip);
                }
                Err(error) => {
                    warn!(%ip, %error, "IPv6 local endpoint delete failed");
                    self.stats.errors += 1;
                }
            }
        }
        if self.v6.pod_state != states {
            self.pods_changed = true;
            self.v6.pod_state = states;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::claim::tests::{pair, NODE};

    const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x11);

    fn underlay(v6: Option<Ipv6Addr>) -> Underlay {
        Underlay { v4: NODE, v6 }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    #[test]
    fn claims_follow_the_host_family() {
        // A local pod (HostIP = this node's IPv4): no tunnel, an endpoint.
        let (p, c) = claim6(
            true,
            underlay(None),
            &pair("fd00:10:1::11", "198.18.1.11", 70000, "p1"),
        )
        .unwrap();
        assert_eq!(p.to_string(), "fd00:10:1::11/128");
        assert_eq!(c.value.flags, 0);
        assert_eq!(c.pod.expect("local pod").name, "p1");
        // Over an IPv4 underlay: an IPv4 tunnel.
        let (_, c) = claim6(
            false,
            underlay(None),
            &pair("fd00:10:2::11", "198.18.2.11", 131073, "p1"),
        )
        .unwrap();
        assert_eq!(
            c.value.flags,
            ipcache_flags::HAS_TUNNEL | ipcache_flags::REMOTE_CLUSTER
        );
        assert_eq!(&c.value.tunnel_endpoint[..4], &[198, 18, 2, 11]);
        // An IPv6 HostIP: an IPv6 tunnel with an IPv6 underlay, none without.
        let e = pair("fd00:10:2::12", "2001:2:0:2::11", 131073, "p2");
        let (_, c) = claim6(false, underlay(Some(NODE6)), &e).unwrap();
        assert_eq!(
            c.value.flags,
            ipcache_flags::HAS_TUNNEL | ipcache_flags::IPV6_TUNNEL | ipcache_flags::REMOTE_CLUSTER
        );
        assert_eq!(
            Ipv6Addr::from(c.value.tunnel_endpoint),
            "2001:2:0:2::11".parse::<Ipv6Addr>().unwrap()
        );
        let (_, c) = claim6(false, underlay(None), &e).unwrap();
        assert_eq!(c.value.flags, ipcache_flags::REMOTE_CLUSTER);
        // A local pod announced with this node's IPv6 underlay address.
        let (_, c) = claim6(
            true,
            underlay(Some(NODE6)),
            &pair("fd00:10:1::12", "2001:2:0:1::11", 70000, "p3"),
        )
        .unwrap();
        assert!(c.pod.is_some());
        // IPv4 entries are not this module's.
        assert!(claim6(true, underlay(None), &pair("10.1.1.1", "", 2, "")).is_none());
    }

    #[test]
    fn diff_winner_conflicts_and_deletes() {
        let c1: Arc<str> = "c1".into();
        let c2: Arc<str> = "c2".into();
        let c3: Arc<str> = "c3".into();
        let mut d = Desired6::new(c1.clone(), underlay(None));
        let e2 = pair("fd00:10:9::9", "198.18.2.11", 131073, "a");
        let e3 = pair("fd00:10:9::9", "198.18.3.11", 196609, "b");
        let p = cidr("fd00:10:9::9/128");
        d.apply(&c3, &p, Some(&e3));
        d.apply(&c2, &p, Some(&e2));
        let mut plan = Plan6::default();
        d.plan(&mut plan);
        // One write, the lowest cluster name's value.
        assert_eq!(plan.upsert_keys.len(), 1);
        assert_eq!(plan.upsert_keys[0].key.family, family::IPV6);
        assert_eq!(plan.upsert_keys[0].prefixlen, 32 + 128);
        assert_eq!(plan.upsert_values[0].sec_identity, 131073);
        // Counted and named.
        let (n, list) = d.conflicts();
        assert_eq!((n, d.conflicts_total()), (1, 1));
        assert_eq!(list[0].prefix, "fd00:10:9::9/128");
        assert_eq!(list[0].clusters, ["c2", "c3"]);
        assert_eq!(list[0].programmed, "c2");
        // The same again: nothing to write.
        d.apply(&c2, &p, Some(&e2));
        let mut plan = Plan6::default();
        d.plan(&mut plan);
        assert!(plan.upsert_keys.is_empty() && plan.delete_keys.is_empty());
        // The winner leaves: the other takes over, the conflict is gone.
        d.apply(&c2, &p, None);
        let mut plan = Plan6::default();
        d.plan(&mut plan);
        assert_eq!(plan.upsert_values[0].sec_identity, 196609);
        assert_eq!(d.conflicts().0, 0);
        // The last one leaves: deleted.
        d.apply(&c3, &p, None);
        let mut plan = Plan6::default();
        d.plan(&mut plan);
        assert_eq!(plan.delete_keys.len(), 1);
        assert_eq!(d.applied_len(), 0);
        assert!(d.slots.is_empty(), "no slot left behind");
    }

    #[test]
    fn adopted_entries_are_stale_until_claimed() {
        let c1: Arc<str> = "c1".into();
        let mut d = Desired6::new(c1.clone(), underlay(None));
        let kept = Prefix6::from_cidr(&cidr("fd00:10:1::1/128")).unwrap();
        let gone = Prefix6::from_cidr(&cidr("fd00:10:2::1/128")).unwrap();
        let key = gone.lpm_key();
        assert_eq!(Prefix6::from_lpm_key(&key), Some(gone));
        d.set_applied(kept, Some(IpcacheValue::local(70000)));
        let mut remote = IpcacheValue::tunnel_v4(131073, [198, 18, 2, 11]);
        remote.flags |= ipcache_flags::REMOTE_CLUSTER;
        d.set_applied(gone, Some(remote));
        d.apply(
            &c1,
            &cidr("fd00:10:1::1/128"),
            Some(&pair("fd00:10:1::1", "", 70000, "")),
        );
        let mut plan = Plan6::default();
        d.plan(&mut plan);
        assert!(
            plan.upsert_keys.is_empty(),
            "unchanged adopted entry rewritten"
        );
        assert!(d.stale(false).is_empty());
        assert_eq!(d.stale(true), vec![gone]);
    }
}
