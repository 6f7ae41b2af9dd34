//! kvstore metrics with Cilium's names (`kvstore_operations_duration_seconds`, …). The
//! caller registers them under its own prefix (`cilium_clustermesh_apiserver`, `cilium`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `kvstore_operations_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `put`, `delete`, `txn`, `get`, `lease_grant`, `list`.
    pub action: String,
    /// The store kind, e.g. `nodes/v1`.
    pub kind: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// Same as kind (Cilium repeats it).
    pub scope: String,
}

/// Labels with only a scope.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    /// The store kind, e.g. `ip/v1`.
    pub scope: String,
}

fn op_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0002, 2.0, 16))
}

/// kvstore operation metrics shared by writers and readers.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Duration of each kvstore operation.
    pub operations: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// Keys waiting to be written, per store.
    pub sync_queue_size: Family<ScopeLabels, Gauge>,
    /// Failed synchronisations, per store.
    pub sync_errors: Family<ScopeLabels, Counter>,
    /// Leases found expired or revoked.
    pub leases_lost: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            operations: Family::new_with_constructor(op_histogram),
            sync_queue_size: Family::default(),
            sync_errors: Family::default(),
            leases_lost: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric in `registry` (which carries the caller's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kvstore_operations_duration_seconds",
            "Duration of kvstore operations",
            self.operations.clone(),
        );
        registry.register(
            "kvstore_sync_queue_size",
            "Number of keys waiting to be synchronised to the kvstore",
            self.sync_queue_size.clone(),
        );
        registry.register(
            "kvstore_sync_errors",
            "Number of synchronisation errors",
            self.sync_errors.clone(),
        );
        registry.register(
            "kvstore_leases_lost",
            "Leases found expired or revoked, whose keys were re-written",
            self.leases_lost.clone(),
        );
    }

    /// Records one operation.
    pub fn observe(&self, action: &str, scope: &str, ok: bool, took: Duration) {
        self.operations
            .get_or_create(&OpLabels {
                action: action.into(),
                kind: scope.into(),
                outcome: if ok { "success" } else { "failure" }.into(),
                scope: scope.into(),
            })
            .observe(took.as_secs_f64());
    }
}

/// The store scope of a key or prefix: `cilium/state/nodes/v1/c1/n1` → `nodes/v1`.
pub fn scope_of(key: &str) -> String {
    let rest = key
        .strip_prefix("cilium/state/")
        .or_else(|| key.strip_prefix("cilium/cache/"))
        .or_else(|| key.strip_prefix("clustermesh/local/v1/"))
        .or_else(|| key.strip_prefix("cilium/"))
        .unwrap_or(key);
    let mut parts = rest.split('/');
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) if b.starts_with('v') && b[1..].chars().all(|c| c.is_ascii_digit()) => {
            format!("{a}/{b}")
        }
        (Some(a), _) => a.to_string(),
        _ => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scopes() {
        assert_eq!(super::scope_of("cilium/state/nodes/v1/c1/n1"), "nodes/v1");
        assert_eq!(
            super::scope_of("cilium/state/ip/v1/default/1.2.3.4"),
            "ip/v1"
        );
        assert_eq!(super::scope_of("cilium/.heartbeat"), ".heartbeat");
        assert_eq!(
            super::scope_of("cilium/cluster-config/c1"),
            "cluster-config"
        );
        assert_eq!(
            super::scope_of("clustermesh/local/v1/services/ns/n"),
            "services"
        );
    }
}
