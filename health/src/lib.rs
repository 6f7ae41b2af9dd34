//! The HTTP endpoints every clustermesh process serves (the apiserver and the agent), after
//! Cilium's: `/readyz` (200 `Ready` or 503 `NotReady`), `/healthz` (200 while the process
//! runs), `/status` (the process's JSON report) and `/metrics` (OpenMetrics text of a
//! prometheus-client registry).
//!
//! What is ready and what the report holds is the caller's ([`Probe`]); this crate only
//! serves them, keeps the registry of named health reporters ([`reporter`]) a process puts
//! into its report, and the certificate expiry metrics every process shares
//! ([`certificates`]).

pub mod certificates;
pub mod reporter;

pub use reporter::{Reporter, Reporters};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// What the endpoints ask the process.
pub trait Probe: Send + Sync + 'static {
    /// `/readyz`.
    fn ready(&self) -> bool;
    /// `/status`: the report as JSON.
    fn status_json(&self) -> String;
}

struct AppState<P> {
    probe: Arc<P>,
    registry: Arc<Registry>,
}

impl<P> Clone for AppState<P> {
    fn clone(&self) -> Self {
        Self {
            probe: self.probe.clone(),
            registry: self.registry.clone(),
        }
    }
}

async fn readyz<P: Probe>(State(s): State<AppState<P>>) -> impl IntoResponse {
    if s.probe.ready() {
        (StatusCode::OK, "Ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NotReady")
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok")
}

async fn status<P: Probe>(State(s): State<AppState<P>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.probe.status_json(),
    )
}

async fn metrics<P: Probe>(State(s): State<AppState<P>>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

/// Binds `addr` before returning (so a port clash fails start-up, with the address in the
/// error) and returns the server future, which runs until `cancel`.
pub async fn serve<P: Probe>(
    addr: SocketAddr,
    probe: Arc<P>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let app = Router::new()
        .route("/readyz", get(readyz::<P>))
        .route("/healthz", get(healthz))
        .route("/status", get(status::<P>))
        .route("/metrics", get(metrics::<P>))
        .with_state(AppState { probe, registry });
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for health and metrics: {e}"),
        )
    })?;
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake(AtomicBool);

    impl Probe for Fake {
        fn ready(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
        fn status_json(&self) -> String {
            r#"{"cluster":"c1"}"#.into()
        }
    }

    /// `GET path` over a plain socket: (status code, body).
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let code = out[9..12].parse().expect("status code");
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        (code, body.unwrap_or_default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn serves_readiness_status_and_metrics_and_refuses_a_taken_port() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let probe = Arc::new(Fake(AtomicBool::new(false)));
        let mut registry = Registry::default();
        registry.register(
            "clustermesh_test",
            "a counter",
            prometheus_client::metrics::counter::Counter::<u64>::default(),
        );
        let registry = Arc::new(registry);
        let cancel = CancellationToken::new();
        let server = serve(addr, probe.clone(), registry.clone(), cancel.clone())
            .await
            .expect("serve");
        let task = tokio::spawn(server);

        let checks = tokio::task::spawn_blocking(move || {
            assert_eq!(get(addr, "/readyz"), (503, "NotReady".into()));
            probe.0.store(true, Ordering::SeqCst);
            assert_eq!(get(addr, "/readyz"), (200, "Ready".into()));
            assert_eq!(get(addr, "/healthz"), (200, "ok".into()));
            assert_eq!(get(addr, "/status"), (200, r#"{"cluster":"c1"}"#.into()));
            let (code, body) = get(addr, "/metrics");
            assert_eq!(code, 200);
            assert!(body.contains("clustermesh_test_total 0"), "{body}");
        });
        checks.await.expect("checks");

        let clash = serve(
            addr,
            Arc::new(Fake(AtomicBool::new(true))),
            registry,
            cancel.clone(),
        )
        .await
        .err()
        .expect("a second server on the same port must fail");
        assert!(clash.to_string().contains(&addr.to_string()), "{clash}");

        cancel.cancel();
        task.await.expect("join").expect("clean shutdown");
    }
}
