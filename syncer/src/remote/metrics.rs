//! Remote-reader metrics with Cilium's names. The caller registers them under its own prefix
//! (`cilium` for an agent gives `cilium_clustermesh_remote_cluster_nodes`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-remote gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The local cluster.
    pub source_cluster: String,
    /// The remote cluster.
    pub target_cluster: String,
}

/// Labels of `clustermesh_remote_clusters`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// The local cluster.
    pub source_cluster: String,
}

/// Labels of `kvstore_remote_rejected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// The remote cluster that served the entry.
    pub cluster: String,
    /// [`super::validate::Reason::as_str`].
    pub reason: String,
}

/// Metrics of the remote reader.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Entries refused by validation.
    pub rejected: Family<RejectLabels, Counter>,
    /// 1 when the remote is ready.
    pub readiness: Family<ClusterLabels, Gauge>,
    /// Failed sessions.
    pub failures: Family<ClusterLabels, Gauge>,
    /// Nodes cached.
    pub nodes: Family<ClusterLabels, Gauge>,
    /// Unix time of the last failure.
    pub last_failure_ts: Family<ClusterLabels, Gauge>,
    /// Configured remotes.
    pub remote_clusters: Family<SourceLabels, Gauge>,
}

impl Metrics {
    /// Registers every metric in `registry` (which carries the caller's prefix) under the
    /// agent's names: `<prefix>_clustermesh_remote_cluster_nodes`, ...
    pub fn register(&self, registry: &mut Registry) {
        self.register_as(registry, "clustermesh_");
    }

    /// Registers every metric under KVStoreMesh's names, which have no `clustermesh_`
    /// subsystem: with prefix `cilium_kvstoremesh`, `cilium_kvstoremesh_remote_clusters`,
    /// `cilium_kvstoremesh_remote_cluster_readiness_status`, ...
    pub fn register_kvstoremesh(&self, registry: &mut Registry) {
        self.register_as(registry, "");
    }

    fn register_as(&self, registry: &mut Registry, subsystem: &str) {
        registry.register(
            "kvstore_remote_rejected",
            "Entries from remote clusters rejected by validation",
            self.rejected.clone(),
        );
        registry.register(
            format!("{subsystem}remote_cluster_readiness_status"),
            "The readiness status of the remote cluster",
            self.readiness.clone(),
        );
        registry.register(
            format!("{subsystem}remote_cluster_failures"),
            "The total number of failures related to the remote cluster",
            self.failures.clone(),
        );
        registry.register(
            format!("{subsystem}remote_cluster_nodes"),
            "The total number of nodes in the remote cluster",
            self.nodes.clone(),
        );
        registry.register(
            format!("{subsystem}remote_cluster_last_failure_ts"),
            "The timestamp of the last failure of the remote cluster",
            self.last_failure_ts.clone(),
        );
        registry.register(
            format!("{subsystem}remote_clusters"),
            "The total number of remote clusters meshed with the local cluster",
            self.remote_clusters.clone(),
        );
    }

    /// The metrics in Prometheus text format, registered under `prefix` (for debug tools and
    /// tests; servers register them in their own registry with [`Self::register`]).
    pub fn render(&self, prefix: &str) -> String {
        let mut registry = Registry::with_prefix(prefix);
        self.register(&mut registry);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    pub(crate) fn reject(&self, cluster: &str, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabels {
                cluster: cluster.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Rejections counted for `cluster` and `reason` (for tests and status tools).
    pub fn rejected_count(&self, cluster: &str, reason: &str) -> u64 {
        self.rejected
            .get_or_create(&RejectLabels {
                cluster: cluster.to_owned(),
                reason: reason.to_owned(),
            })
            .get()
    }
}
