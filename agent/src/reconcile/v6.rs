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
//! The IPv6 table is the IPv4 one's code ([`super::desired::Table`]) with IPv6 types
//! ([`V6`]): a separate table, the same rules, slab, hasher shape and chunked flushes
//! (it was a `HashMap` with SipHash and a `Vec` per prefix, 0.46× raw batched updates at
//! 250k entries; issue 16 asks ≥ 0.7×).
//!
//! It must not read etcd or discover interfaces.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use clustermesh_ebpf_abi::{ipcache_flags, EndpointInfo, IpcacheLpmKey, IpcacheValue};
use clustermesh_types::model::{Cidr, IpcacheEntry};
use serde::Serialize;
use tracing::warn;

use super::claim::Claim;
use super::desired::{Conflict, Family, Plan, Table};
pub use super::prefix::Prefix6;
use super::prefix::Prefix6Hasher;
use super::Reconciler;
use crate::datapath::{Attached, Program};

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
pub type Claim6 = Claim<LocalPod6>;

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
                    namespace: pair.k8s_namespace.to_string(),
                    name: pair.k8s_pod_name.to_string(),
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

/// IPv6 ([`Prefix6`], [`LocalPod6`], the node's underlay addresses of both families).
#[derive(Debug)]
pub struct V6;

impl Family for V6 {
    type Prefix = Prefix6;
    type Addr = Ipv6Addr;
    type Pod = LocalPod6;
    type Node = Underlay;
    type Hasher = std::hash::BuildHasherDefault<Prefix6Hasher>;
    const NAME: &'static str = "IPv6";
    fn claim(
        is_local_cluster: bool,
        node: Underlay,
        entry: &IpcacheEntry,
    ) -> Option<(Prefix6, Claim6)> {
        claim6(is_local_cluster, node, entry)
    }
    fn from_cidr(cidr: &Cidr) -> Option<Prefix6> {
        Prefix6::from_cidr(cidr)
    }
    fn lpm_key(prefix: Prefix6) -> IpcacheLpmKey {
        prefix.lpm_key()
    }
    fn from_lpm_key(key: &IpcacheLpmKey) -> Option<Prefix6> {
        Prefix6::from_lpm_key(key)
    }
    fn addr(prefix: Prefix6) -> Ipv6Addr {
        prefix.addr
    }
}

/// Desired and applied state of every IPv6 prefix; pure (no maps).
pub type Desired6 = Table<V6>;

/// The map writes one IPv6 flush needs.
pub type Plan6 = Plan<V6>;

/// A prefix claimed by more than one cluster (`/status` → `ipv6.conflicts`).
pub type Conflict6 = Conflict;

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
    /// The flush's buffers, kept between flushes.
    pub(super) plan: Plan6,
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
            plan: Plan6::default(),
        }
    }

    pub(super) fn report(&self) -> Report6 {
        let (conflicting_prefixes, conflicts) = self.desired.conflicts();
        Report6 {
            underlay: self.desired.node().v6,
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
            ..self.v6.desired.node()
        };
        self.v6.desired.set_node(node);
    }

    /// Writes the IPv6 difference between desired and applied state (see [`Self::flush`]).
    pub(super) fn flush6(&mut self) {
        if self.v6.desired.dirty_len() == 0 {
            return;
        }
        let done = super::write_changes(
            &mut self.v6.desired,
            &mut self.v6.plan,
            &mut self.v6.pods,
            &mut self.dp.maps.ipcache,
            &mut self.stats,
        );
        super::capacity_log::<V6>(self.v6.capacity_waiting, done.waiting, self.max_ipcache);
        self.v6.capacity_waiting = done.waiting;
        // A full pod sync: an IPv6-only pod needs discovery and an attachment.
        self.pods_dirty |= done.pods_changed;
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
    use clustermesh_ebpf_abi::family;

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
        assert_eq!(d.slots_in_use(), 0, "no slot left behind");
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
