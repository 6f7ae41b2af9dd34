//! What the reconciler reports in `/status` (`datapath`): map fill levels, local pods and
//! how far each got, interfaces skipped, counters.
//!
//! Plain data: it must not read maps or the kernel.

use serde::Serialize;

use super::LocalPod;
use crate::discovery::{How, MacFrom};

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
    /// ipcache elements the map refused for lack of room (`E2BIG`/`ENOSPC`/`ENOMEM`),
    /// counted at every attempt: they stay wanted and are retried on every flush.
    pub ipcache_refused_capacity: u64,
    /// Duration of the last flush that wrote something, microseconds.
    pub last_flush_micros: u64,
    /// Entries that cannot be programmed.
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

/// Fill level from which a map's `/status` entry carries a warning (and the
/// `cilium_clustermesh_agent_map_capacity_warning` gauge is 1): early enough to act before
/// the first update is refused.
pub const PRESSURE_WARNING: f64 = 0.9;

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
    /// Set from [`PRESSURE_WARNING`] on, or while entries wait for room: what is wrong and
    /// what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl MapFill {
    /// The fill of a map with `entries` of `max_entries`; `flag` names the agent flag that
    /// sets its size.
    pub(super) fn new(entries: usize, max_entries: u32, flag: &str) -> Self {
        let pressure = if max_entries == 0 {
            0.0
        } else {
            entries as f64 / f64::from(max_entries)
        };
        Self {
            entries,
            max_entries,
            pressure,
            warning: (pressure >= PRESSURE_WARNING).then(|| {
                format!(
                    "{entries} of {max_entries} entries ({:.0}%): updates will be refused when \
                     it is full; raise {flag}",
                    pressure * 100.0
                )
            }),
        }
    }
}

/// Reconciler state for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The ipcache.
    pub ipcache: MapFill,
    /// ipcache entries (IPv4 and IPv6) wanted but not in the map because it is full; they
    /// are retried on every flush and written as soon as there is room.
    pub ipcache_waiting_for_room: usize,
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
    /// IPv6 prefixes, pods and conflicts.
    pub ipv6: super::Report6,
}
