//! From cluster state to map entries, by diff.
//!
//! [`Desired`] is the pure part: every ipcache entry read from any cluster, keyed by the
//! cluster and prefix, resolved per prefix to one map value (the local cluster wins an IP
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
//! * IPv6 entries follow the same rules in their own table ([`v6`]): tunnelled to an IPv4
//!   or IPv6 `HostIP`, local endpoints for dual-stack pods of this node.
//!
//! Start-up adopts the maps' contents as `applied`, so an unchanged entry is never written
//! again and nothing is cleared: entries that no cluster claims any more are removed only
//! by [`Reconciler::sweep`], which the caller runs once the clusters they may belong to have
//! synced. A pod whose interface is not found yet waits; [`Reconciler::sync_pods`] is called
//! again on every link, route or neighbour notification ([`crate::discovery::Watcher`]).
//!
//! **Why it is fast** (250k entries must reconcile at ≥ 500k/s including the kernel's
//! share, see `bench-maps`): desired and applied state live together in one slab of
//! slots (`Vec`, in order of arrival) behind a small `prefix → index` table (indices
//! only, 4 bytes a bucket; the prefix is read from the slot), so an
//! entry costs one hash lookup when it arrives and none when it is flushed: the dirty list
//! holds slab indices (each once, by a flag in the slot, so no sort or dedup) and the plan
//! walks the slab in the order it was filled, writing keys and values straight into the
//! arrays the batch syscall takes. The table's hash (`PrefixHasher`) keeps the 16
//! addresses of an aligned block in one bucket group, so consecutive pod IPs reuse cache
//! lines, and spreads the blocks with a folded 128-bit product (plain FxHash had put 250k
//! consecutive pod IPs into 128 buckets). Clusters are interned to small
//! IDs (no `Arc` clone or string compare per claim), addresses arrive parsed (validation
//! parsed them once, [`crate::input`]), and only prefixes that have or had a local pod are
//! passed on to the pod bookkeeping.
//! Start-up reads the pinned map with `BPF_MAP_LOOKUP_BATCH` instead of two syscalls per
//! element.
//!
//! The IPv6 table is the same code over IPv6 types ([`Table`] over a [`Family`]: [`V4`],
//! [`V6`]), so both families share the claim rules and the speed; `write_changes` flushes
//! either in the same chunks.
//!
//! By concept: [`prefix`] (the keys and their hashers), [`claim`] (one entry's claim),
//! [`desired`] (the table: claims per prefix, winners, plans), [`pods`] (local pods:
//! discovery, endpoints, `from_pod`), [`report`] (`/status`), [`v6`] (the IPv6 family and
//! endpoints), and the [`Reconciler`] here, which owns the datapath and writes.
//!
//! It must not read etcd or change interfaces beyond attaching programs.

mod claim;
mod desired;
mod pods;
mod prefix;
mod report;
mod v6;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use clustermesh_ebpf_abi::{family, EndpointInfo, IpcacheLpmKey};
use tracing::{debug, info, warn};

pub use claim::{claim, Claim, LocalPod};
pub use desired::{Conflict, Desired, Family, Plan, Table, V4};
pub use prefix::{FxHasher, Prefix};
pub use report::{MapFill, PodReport, Report, Skipped, Stats};
pub use v6::{
    claim6, Claim6, Conflict6, Desired6, LocalPod6, Plan6, Prefix6, Report6, Underlay, V6,
};

use crate::datapath::{self, Datapath};
use crate::ifaces::Mac;
use crate::input::Input;
use pods::PodState;

/// Prefixes planned and written per step of a flush: one `BPF_MAP_UPDATE_BATCH` (the
/// datapath's batch size), with key and value arrays reused from step to step.
const FLUSH_CHUNK: usize = 16 * 1024;

/// Writes `keys[i] → values[i]` into the ipcache; returns the indices not written (to retry)
/// and how many of them the map refused for lack of room (counted in `stats`).
///
/// The kernel stops a batch at the first element it refuses. In a full map that is the
/// first new element; the replacements after it still fit (a replacement needs no room,
/// kernel ≥ 6.13), so they are written in a second call instead of waiting behind it: a
/// full map delays new entries, never changes to existing ones.
fn upsert(
    ipcache: &mut datapath::Ipcache,
    keys: &[IpcacheLpmKey],
    values: &[clustermesh_ebpf_abi::IpcacheValue],
    new: &[bool],
    stats: &mut Stats,
) -> (Vec<usize>, usize) {
    let (done, error) = ipcache.update_some(keys, values);
    stats.ipcache_upserts += done as u64;
    let Some(error) = error else {
        return (Vec::new(), 0);
    };
    if !error.is_capacity() {
        warn!(%error, entries = keys.len() - done, "ipcache update failed; retrying on the next flush");
        stats.errors += 1;
        return ((done..keys.len()).collect(), 0);
    }
    let (mut not_written, replace): (Vec<usize>, Vec<usize>) =
        (done..keys.len()).partition(|&i| new.get(i).copied().unwrap_or(true));
    let refused = not_written.len();
    let rk: Vec<IpcacheLpmKey> = replace.iter().map(|&i| keys[i]).collect();
    let rv: Vec<_> = replace.iter().map(|&i| values[i]).collect();
    let (done2, error2) = ipcache.update_some(&rk, &rv);
    stats.ipcache_upserts += done2 as u64;
    let mut refused_total = refused;
    if let Some(error) = error2 {
        if error.is_capacity() {
            refused_total += replace.len() - done2;
        } else {
            warn!(%error, entries = replace.len() - done2, "ipcache update failed; retrying on the next flush");
            stats.errors += 1;
        }
        not_written.extend_from_slice(&replace[done2..]);
    }
    stats.ipcache_refused_capacity += refused_total as u64;
    (not_written, refused_total)
}

/// What [`write_changes`] did.
struct Written {
    /// Entries the map refused for lack of room (they wait, dirty).
    waiting: usize,
    /// Some map write was attempted.
    wrote: bool,
    /// A local pod appeared, changed or went.
    pods_changed: bool,
}

/// Writes `desired`'s changes to the ipcache in chunks of one batch syscall each (the
/// same for both families): the plan's pods into `pods`, deletes before upserts, and what
/// failed dirty again for the next flush.
fn write_changes<F: Family>(
    desired: &mut Table<F>,
    plan: &mut Plan<F>,
    pods: &mut BTreeMap<F::Addr, Arc<F::Pod>>,
    ipcache: &mut datapath::Ipcache,
    stats: &mut Stats,
) -> Written {
    let mut failed: Vec<F::Prefix> = Vec::new();
    let mut done = Written {
        waiting: 0,
        wrote: false,
        pods_changed: false,
    };
    loop {
        plan.clear();
        let more = desired.plan_upto(plan, FLUSH_CHUNK);
        done.wrote |= !plan.is_empty();
        for (addr, pod) in plan.pods.drain(..) {
            if pods.get(&addr) != pod.as_ref() {
                match pod {
                    Some(pod) => pods.insert(addr, pod),
                    None => pods.remove(&addr),
                };
                done.pods_changed = true;
            }
        }
        // Deletes first: they make the room that new entries of the same flush may need in
        // a full map.
        match ipcache.delete_batch(&plan.delete_keys) {
            Ok(_) => stats.ipcache_deletes += plan.delete_keys.len() as u64,
            Err(error) => {
                warn!(family = F::NAME, %error, entries = plan.delete_keys.len(), "ipcache delete failed; retrying on the next flush");
                stats.errors += 1;
                for (k, old) in plan.delete_keys.iter().zip(&plan.deleted) {
                    if let Some(p) = F::from_lpm_key(k) {
                        desired.set_applied(p, Some(*old));
                        failed.push(p);
                    }
                }
            }
        }
        let (not_written, refused) = upsert(
            ipcache,
            &plan.upsert_keys,
            &plan.upsert_values,
            &plan.upsert_new,
            stats,
        );
        done.waiting += refused;
        // Not written: forget them and write them again next time.
        for &i in &not_written {
            if let Some(p) = F::from_lpm_key(&plan.upsert_keys[i]) {
                desired.set_applied(p, None);
                failed.push(p);
            }
        }
        if !more {
            break;
        }
    }
    // After the loop: a failure marked dirty inside it would be retried at once.
    desired.redirty(failed);
    done
}

/// Logs when a family's entries start or stop waiting for room in a full ipcache.
fn capacity_log<F: Family>(before: usize, now: usize, max_entries: u32) {
    if now > 0 && before == 0 {
        warn!(
            family = F::NAME,
            waiting = now,
            max_entries,
            "ipcache full: entries wait for room and are retried on every flush; raise --ipcache-max-entries"
        );
    } else if now == 0 && before > 0 {
        info!(
            family = F::NAME,
            "ipcache has room again: every waiting entry is written"
        );
    }
}

/// Owns the datapath and keeps its maps equal to [`Desired`]; see the module docs.
pub struct Reconciler {
    dp: Datapath,
    desired: Desired,
    /// The flush's buffers, kept between flushes.
    plan: Plan,
    /// IPv4 entries the last flush could not write for lack of room in the ipcache.
    capacity_waiting: usize,
    max_ipcache: u32,
    max_endpoints: u32,
    /// Elements in the ipcache this agent never writes (cluster ID ≠ 0): swept.
    foreign: Vec<IpcacheLpmKey>,
    /// IPv6 prefixes and endpoints ([`v6`]).
    v6: v6::State6,
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
    /// `node_ip` is the node's IPv4 underlay address, `0.0.0.0` on an IPv6-only node (no
    /// IPv4 `HostIP` is then this node's; see [`Reconciler::set_node_ip6`]).
    pub fn new(
        dp: Datapath,
        local: Arc<str>,
        node_ip: Ipv4Addr,
        max_ipcache: u32,
        max_endpoints: u32,
    ) -> datapath::Result<Self> {
        let mut desired = Desired::new(local.clone(), node_ip);
        let mut v6 = v6::State6::new(
            local,
            Underlay {
                v4: node_ip,
                v6: None,
            },
        );
        let mut foreign = Vec::new();
        let adopted = dp.maps.ipcache.entries()?;
        desired.reserve(adopted.len());
        // Both families: either may fill the map (the slabs' reservations are address space).
        desired.reserve_capacity(max_ipcache as usize);
        v6.desired.reserve_capacity(max_ipcache as usize);
        for (k, v) in adopted {
            match Prefix::from_lpm_key(&k) {
                Some(p) => desired.set_applied(p, Some(v)),
                None => match Prefix6::from_lpm_key(&k) {
                    Some(p) => v6.desired.set_applied(p, Some(v)),
                    None => foreign.push(k),
                },
            }
        }
        let mut applied_eps = HashMap::new();
        for (k, v) in dp.maps.local_endpoints.entries()? {
            if k.family == family::IPV4 {
                applied_eps.insert(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]), v);
            } else if k.family == family::IPV6 {
                v6.applied_eps.insert(k.addr.into(), v);
            }
        }
        let stats = Stats {
            adopted_ipcache: desired.applied_len() + v6.desired.applied_len() + foreign.len(),
            adopted_endpoints: applied_eps.len() + v6.applied_eps.len(),
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
            plan: Plan::default(),
            capacity_waiting: 0,
            max_ipcache,
            max_endpoints,
            foreign,
            v6,
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
                if prefix.addr.is_ipv6() {
                    self.v6.desired.apply(&cluster, &prefix, entry.as_deref());
                } else {
                    self.desired.apply(&cluster, &prefix, entry.as_deref());
                }
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
    /// updates local pods if any changed. Failed elements stay dirty for the next flush
    /// (the loop flushes at least once a second): an element the map refuses for lack of
    /// room is counted (`stats.ipcache-refused-capacity`), named in `/status`
    /// (`ipcache-waiting-for-room`) and written as soon as there is room.
    pub fn flush(&mut self) {
        if self.desired.dirty_len() > 0 {
            let started = Instant::now();
            let done = write_changes(
                &mut self.desired,
                &mut self.plan,
                &mut self.pods,
                &mut self.dp.maps.ipcache,
                &mut self.stats,
            );
            self.pods_dirty |= done.pods_changed;
            capacity_log::<V4>(self.capacity_waiting, done.waiting, self.max_ipcache);
            self.capacity_waiting = done.waiting;
            if done.wrote {
                self.stats.flushes += 1;
                self.stats.last_flush_micros = started.elapsed().as_micros() as u64;
                debug!(micros = self.stats.last_flush_micros, "ipcache flushed");
            }
        }
        self.flush6();
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
        let stale6 = self.v6.desired.stale(remote);
        let mut keys: Vec<IpcacheLpmKey> = stale.iter().map(|p| p.lpm_key()).collect();
        keys.extend(stale6.iter().map(|p| p.lpm_key()));
        if remote {
            keys.append(&mut self.foreign);
        }
        let n = match self.dp.maps.ipcache.delete_batch(&keys) {
            Ok(n) => {
                for p in &stale {
                    self.desired.set_applied(*p, None);
                }
                for p in &stale6 {
                    self.v6.desired.set_applied(*p, None);
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
            ipcache: {
                let mut fill = MapFill::new(
                    self.desired.applied_len() + self.v6.desired.applied_len() + self.foreign.len(),
                    self.max_ipcache,
                    "--ipcache-max-entries",
                );
                let waiting = self.capacity_waiting + self.v6.capacity_waiting;
                if waiting > 0 {
                    fill.warning = Some(format!(
                        "full: {waiting} entries wait for room (retried on every flush, \
                         {} refusals so far); raise --ipcache-max-entries",
                        self.stats.ipcache_refused_capacity
                    ));
                }
                fill
            },
            ipcache_waiting_for_room: self.capacity_waiting + self.v6.capacity_waiting,
            local_endpoints: MapFill::new(
                self.applied_eps.len() + self.v6.applied_eps.len(),
                self.max_endpoints,
                "--local-endpoints-max-entries",
            ),
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
            ipv6: self.v6.report(),
        }
    }
}
