//! What the agent's `/readyz`, `/status` (JSON) and Prometheus `/metrics` report; served by
//! clustermesh-health like the apiserver's.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use clustermesh_syncer::remote;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{local, reconcile};

/// What `/status` reports.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// Local cluster name.
    pub cluster: String,
    /// Local cluster ID.
    pub cluster_id: u32,
    /// This node.
    pub node: String,
    /// This node's underlay IPv4 (empty on an IPv6-only node).
    pub node_ip: String,
    /// This node's underlay IPv6, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ip6: Option<String>,
    /// `/readyz`.
    pub ready: bool,
    /// Why (not) ready.
    pub ready_reason: String,
    /// The kernel check's summary.
    pub kernel: String,
    /// TCX or clsact.
    pub attach_mode: String,
    /// Where tunnelled packets for this node's pods are received: `from_underlay on <dev>`,
    /// or the VXLAN device and why.
    pub receive_path: String,
    /// How tunnelled packets leave: `BPF encapsulation to <dev> …`, or the VXLAN device and
    /// why.
    pub transmit_path: String,
    /// The local cluster reader.
    pub local: local::Status,
    /// Every remote cluster (Cilium's `RemoteCluster` JSON).
    pub remote_clusters: Vec<remote::Status>,
    /// Maps, pods, reconcile counters.
    pub datapath: reconcile::Report,
    /// Program counters: program → counter → packets (summed over CPUs).
    pub programs: BTreeMap<String, BTreeMap<String, u64>>,
    /// Services and LB maps.
    pub services: crate::services::Status,
    /// The DNS server: where it listens, or why it does not.
    pub dns: String,
    /// Policy: known identities, ipcache entries held for their identity, errors.
    pub policy: crate::policy::hook::Stats,
    /// The certificates in use and a warning for each that expires within 30 days; read at
    /// each request.
    pub certificates: clustermesh_health::certificates::Report,
    /// Every node of every cluster read (the node table), by cluster then name.
    pub nodes: Vec<crate::nodes::NodeReport>,
}

/// Shared between the agent's loop and the HTTP server.
#[derive(Debug, Default)]
pub struct Shared {
    ready: AtomicBool,
    report: Mutex<Report>,
}

impl Shared {
    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Readiness.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Replaces the report.
    pub fn publish(&self, report: Report) {
        *self.report.lock().unwrap_or_else(PoisonError::into_inner) = report;
    }

    /// A copy of the report.
    pub fn report(&self) -> Report {
        let mut r = self
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        r.ready = self.ready();
        r.certificates = clustermesh_health::certificates::Extra::default().report();
        r
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    program: String,
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// Cilium's `cilium_policy_verdict_total` labels: `direction`, `match`, `action` (a list,
/// because `match` is a keyword).
type VerdictLabels = Vec<(&'static str, String)>;

/// Cilium's `cilium_drop_count_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

/// The policy and flow counters with Cilium's and Hubble's names, fed from the kernel's
/// counters ([`crate::policy::maps::Verdicts`]) as deltas.
#[derive(Debug, Default)]
struct PolicyMetrics {
    verdicts: Family<VerdictLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    forwards: Family<DirectionLabels, Counter>,
    ct_replies: Counter,
    lost: Counter,
    last: Mutex<crate::policy::maps::Verdicts>,
}

/// The agent's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The remote reader's (`cilium_clustermesh_remote_cluster_*`).
    pub remote: remote::Metrics,
    map_pressure: Family<MapLabels, Gauge<f64, AtomicU64>>,
    map_capacity_warning: Family<MapLabels, Gauge>,
    ipcache_waiting: Gauge,
    packets: Family<PacketLabels, Counter>,
    pods: Family<StateLabels, Gauge>,
    ready: Gauge,
    map_ops: Family<StateLabels, Counter>,
    last: Mutex<HashMap<(String, String), u64>>,
    policy: PolicyMetrics,
}

impl Metrics {
    /// A registry with every metric under the `cilium` prefix (and Hubble's
    /// `hubble_lost_events_total`).
    pub fn registry(&self) -> Registry {
        let mut root = Registry::default();
        self.policy.register_hubble(&mut root);
        clustermesh_health::certificates::register(&mut root, Default::default());
        let r = root.sub_registry_with_prefix("cilium");
        self.remote.register(r);
        r.register(
            "bpf_map_pressure",
            "Fill level of a BPF map (entries / max entries)",
            self.map_pressure.clone(),
        );
        r.register(
            "clustermesh_agent_map_capacity_warning",
            "1 while a BPF map is at 90% of its max entries or more, or refuses entries for lack of room",
            self.map_capacity_warning.clone(),
        );
        r.register(
            "clustermesh_agent_ipcache_waiting_for_room",
            "ipcache entries wanted but refused by the full map (retried on every flush)",
            self.ipcache_waiting.clone(),
        );
        r.register(
            "clustermesh_datapath_packets",
            "Packets seen by the datapath programs, by program and counter",
            self.packets.clone(),
        );
        r.register(
            "clustermesh_agent_local_pods",
            "Pods on this node by attach state",
            self.pods.clone(),
        );
        r.register(
            "clustermesh_agent_ready",
            "1 once every configured cluster's initial sync is in the maps",
            self.ready.clone(),
        );
        r.register(
            "clustermesh_agent_map_operations",
            "Map elements written, deleted or swept by the reconciler",
            self.map_ops.clone(),
        );
        self.policy.register(r);
        root
    }

    /// Adds the kernel's policy verdict and flow counters since the last call.
    pub fn observe_policy(&self, v: &crate::policy::maps::Verdicts) {
        self.policy.observe(v);
    }

    /// Updates the gauges and counters from a report.
    pub fn observe(&self, report: &Report) {
        let d = &report.datapath;
        for (name, fill) in [
            (clustermesh_ebpf_abi::map::IPCACHE, &d.ipcache),
            (
                clustermesh_ebpf_abi::map::LOCAL_ENDPOINTS,
                &d.local_endpoints,
            ),
        ] {
            self.map_pressure
                .get_or_create(&MapLabels {
                    map_name: name.to_owned(),
                })
                .set(fill.pressure);
            self.map_capacity_warning
                .get_or_create(&MapLabels {
                    map_name: name.to_owned(),
                })
                .set(i64::from(fill.warning.is_some()));
        }
        self.ipcache_waiting
            .set(i64::try_from(d.ipcache_waiting_for_room).unwrap_or(i64::MAX));
        self.ready.set(i64::from(report.ready));
        let mut states: BTreeMap<&str, i64> = BTreeMap::new();
        for p in &d.pods {
            *states
                .entry(if p.attached { "attached" } else { "pending" })
                .or_default() += 1;
        }
        for s in ["attached", "pending"] {
            self.pods
                .get_or_create(&StateLabels { state: s.into() })
                .set(states.get(s).copied().unwrap_or(0));
        }
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        for (program, counters) in &report.programs {
            for (counter, v) in counters {
                let before = last
                    .insert((program.clone(), counter.clone()), *v)
                    .unwrap_or(0);
                if *v > before {
                    self.packets
                        .get_or_create(&PacketLabels {
                            program: program.clone(),
                            counter: counter.clone(),
                        })
                        .inc_by(*v - before);
                }
            }
        }
        let s = &d.stats;
        for (op, v) in [
            ("ipcache_upsert", s.ipcache_upserts),
            ("ipcache_delete", s.ipcache_deletes),
            ("endpoint_upsert", s.endpoint_upserts),
            ("endpoint_delete", s.endpoint_deletes),
            ("swept", s.swept),
            ("error", s.errors),
            ("ipcache_refused_capacity", s.ipcache_refused_capacity),
        ] {
            let before = last.insert(("ops".into(), op.into()), v).unwrap_or(0);
            if v > before {
                self.map_ops
                    .get_or_create(&StateLabels { state: op.into() })
                    .inc_by(v - before);
            }
        }
    }
}

impl PolicyMetrics {
    fn register_hubble(&self, root: &mut Registry) {
        root.register(
            "hubble_lost_events",
            "Flow events lost because the ring buffer was full",
            self.lost.clone(),
        );
    }

    fn register(&self, cilium: &mut Registry) {
        cilium.register(
            "policy_verdict",
            "Packets by policy verdict (direction INGRESS/EGRESS, match, action)",
            self.verdicts.clone(),
        );
        cilium.register(
            "drop_count",
            "Packets dropped by the datapath, by reason and direction",
            self.drops.clone(),
        );
        cilium.register(
            "forward_count",
            "Packets allowed by policy, by direction",
            self.forwards.clone(),
        );
        cilium.register(
            "policy_ct_reply",
            "Packets a default-deny direction let through as replies of tracked connections",
            self.ct_replies.clone(),
        );
    }

    fn observe(&self, v: &crate::policy::maps::Verdicts) {
        use clustermesh_ebpf_abi::PolicyMatch;
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let delta = |now: u64, before: u64| now.saturating_sub(before);
        for (d, dir) in ["INGRESS", "EGRESS"].into_iter().enumerate() {
            for m in PolicyMatch::ALL {
                let n = delta(v.by_match[d][m as usize], last.by_match[d][m as usize]);
                if n == 0 {
                    continue;
                }
                let denied = m == PolicyMatch::Denied;
                self.verdicts
                    .get_or_create(&vec![
                        ("direction", dir.into()),
                        ("match", m.name().into()),
                        ("action", if denied { "denied" } else { "allowed" }.into()),
                    ])
                    .inc_by(n);
                if denied {
                    self.drops
                        .get_or_create(&DropLabels {
                            reason: "Policy denied".into(),
                            direction: dir.into(),
                        })
                        .inc_by(n);
                } else {
                    self.forwards
                        .get_or_create(&DirectionLabels {
                            direction: dir.into(),
                        })
                        .inc_by(n);
                }
            }
        }
        self.ct_replies.inc_by(delta(v.ct_replies, last.ct_replies));
        self.lost.inc_by(delta(v.flows_lost, last.flows_lost));
        *last = *v;
    }
}

impl clustermesh_health::Probe for Shared {
    fn ready(&self) -> bool {
        Shared::ready(self)
    }
    fn status_json(&self) -> String {
        serde_json::to_string_pretty(&self.report()).unwrap_or_default()
    }
}

/// Binds `addr` (so a port clash fails start-up) and returns the server of `/readyz`,
/// `/healthz`, `/status` and `/metrics` (clustermesh-health), which runs until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    registry: Registry,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    clustermesh_health::serve(addr, shared, Arc::new(registry), cancel).await
}
