//! `/readyz`, `/healthz`, `/status` and Prometheus `/metrics` over HTTP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
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
}

/// Shared state between the exporter and the HTTP server.
#[derive(Debug, Default)]
pub struct Status {
    ready: AtomicBool,
    /// Set while KVStoreMesh still waits for remotes to sync (see `kvstoremesh`).
    remotes_pending: AtomicBool,
    report: Mutex<StatusReport>,
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
    /// Readiness: the local export is ready and no remote holds it back.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.remotes_pending.load(Ordering::SeqCst)
    }
    /// Updates the report.
    pub fn update(&self, f: impl FnOnce(&mut StatusReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }
    /// A copy of the report.
    pub fn report(&self) -> StatusReport {
        let mut r = self.report.lock().map(|r| r.clone()).unwrap_or_default();
        r.ready = self.ready();
        r
    }
}

#[derive(Clone)]
struct AppState {
    status: Arc<Status>,
    registry: Arc<Registry>,
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.status.ready() {
        (StatusCode::OK, "Ready")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "NotReady")
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok")
}

async fn status_json(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&s.status.report()).unwrap_or_default(),
    )
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

/// Serves until cancelled. Binds before returning so callers learn about port clashes.
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .with_state(AppState { status, registry });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for health/metrics: {e}"))?;
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
            .map_err(anyhow::Error::from)
    })
}
