//! What `/readyz`, `/status` and `/metrics` report; served by clustermesh-health.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clustermesh_health::certificates::Extra;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// What `/status` reports.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusReport {
    /// Cluster name.
    pub cluster: String,
    /// Whether the initial sync finished and etcd is reachable.
    pub ready: bool,
    /// Whether etcd is reachable.
    pub etcd_connected: bool,
    /// Last etcd error, if any.
    pub last_etcd_error: Option<String>,
    /// Keys per store.
    pub stores: std::collections::BTreeMap<String, usize>,
    /// Broken manifest files.
    pub manifest_errors: Vec<String>,
    /// Objects that could not be exported, and why.
    pub export_problems: Vec<String>,
    /// Objects in the source.
    pub source_objects: usize,
    /// KVStoreMesh: whether it runs.
    pub kvstoremesh: bool,
    /// KVStoreMesh: every remote has synced once (or timed out); part of `ready`.
    pub remotes_ready: bool,
    /// KVStoreMesh: each remote's status (Cilium's `RemoteCluster` JSON).
    pub remote_clusters: Vec<clustermesh_syncer::remote::Status>,
    /// Every named component (source, etcd, each export job, each KVStoreMesh remote):
    /// ok, degraded or stopped, and why.
    pub health: Vec<clustermesh_health::reporter::Report>,
    /// The Kubernetes source (absent with the manifest source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::source::kubernetes::Health>,
    /// The certificates in use (the etcd clients', the embedded etcd's) and a warning for
    /// each that expires within 30 days; read at each request.
    pub certificates: clustermesh_certs::expiry::Report,
}

/// Shared state between the exporter and the HTTP server.
#[derive(Debug, Default)]
pub struct Status {
    ready: AtomicBool,
    /// Set while KVStoreMesh still waits for remotes to sync (see `kvstoremesh`).
    remotes_pending: AtomicBool,
    /// Set while the source cannot be read (Kubernetes API unreachable); the last export stays.
    source_unavailable: AtomicBool,
    report: Mutex<StatusReport>,
    reporters: clustermesh_health::Reporters,
    /// Certificate files reported on top of the process's own TLS sets.
    certificate_files: Mutex<Extra>,
}

impl Status {
    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        if let Ok(mut r) = self.report.lock() {
            r.ready = ready;
        }
    }
    /// Holds readiness back while remotes are still syncing.
    pub fn set_remotes_pending(&self, pending: bool) {
        self.remotes_pending.store(pending, Ordering::SeqCst);
        if let Ok(mut r) = self.report.lock() {
            r.remotes_ready = !pending;
        }
    }
    /// Whether the source can be read; while it cannot, readiness is held false (the
    /// exported keys stay, with their leases).
    pub fn set_source_available(&self, available: bool) {
        self.source_unavailable.store(!available, Ordering::SeqCst);
    }
    /// Readiness: the local export is ready, the source readable, and no remote holds it back.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && !self.remotes_pending.load(Ordering::SeqCst)
            && !self.source_unavailable.load(Ordering::SeqCst)
    }
    /// Updates the report.
    pub fn update(&self, f: impl FnOnce(&mut StatusReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }
    /// Certificate files to report besides the etcd clients' (the embedded etcd's).
    pub fn set_certificate_files(&self, files: Extra) {
        if let Ok(mut f) = self.certificate_files.lock() {
            *f = files;
        }
    }
    /// A copy of the report.
    pub fn report(&self) -> StatusReport {
        let mut r = self.report.lock().map(|r| r.clone()).unwrap_or_default();
        r.ready = self.ready();
        r.health = self.reporters.reports();
        r.certificates = self
            .certificate_files
            .lock()
            .map(|f| f.report())
            .unwrap_or_default();
        r
    }
    /// The health reporters of the process's components.
    pub fn reporters(&self) -> &clustermesh_health::Reporters {
        &self.reporters
    }
}

impl clustermesh_health::Probe for Status {
    fn ready(&self) -> bool {
        Status::ready(self)
    }
    fn status_json(&self) -> String {
        serde_json::to_string_pretty(&self.report()).unwrap_or_default()
    }
}

/// Serves `/readyz`, `/healthz`, `/status` and `/metrics` (clustermesh-health) until
/// cancelled. Binds before returning so callers learn about port clashes.
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    clustermesh_health::serve(addr, status, registry, cancel).await
}
