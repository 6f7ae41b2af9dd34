//! The flow observer's gRPC server (`clustermesh.observer.v1.Observer`, tonic): the last
//! flows of this agent's [`Store`] matching a filter, then, in follow mode, every new one.
//!
//! It must not read maps: flows come from the store only.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use api::observer_server::{Observer, ObserverServer};
use clustermesh_observer_api as api;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::flows::Store;

/// Whether `f` passes `filter` (every non-empty field must match).
pub fn matches(filter: &api::FlowFilter, f: &api::Flow) -> bool {
    fn pod(sel: &[String], e: Option<&api::Endpoint>) -> bool {
        sel.is_empty()
            || e.is_some_and(|e| {
                sel.iter().any(|s| match s.split_once('/') {
                    Some((ns, name)) => e.namespace == ns && e.pod_name.starts_with(name),
                    None => !e.pod_name.is_empty() && e.pod_name.starts_with(s.as_str()),
                })
            })
    }
    fn cluster(sel: &[String], e: Option<&api::Endpoint>) -> bool {
        sel.is_empty() || e.is_some_and(|e| sel.contains(&e.cluster))
    }
    fn ident(sel: &[u32], e: Option<&api::Endpoint>) -> bool {
        sel.is_empty() || e.is_some_and(|e| sel.contains(&e.identity))
    }
    let (src, dst) = (f.source.as_ref(), f.destination.as_ref());
    cluster(&filter.from_cluster, src)
        && cluster(&filter.to_cluster, dst)
        && pod(&filter.from_pod, src)
        && pod(&filter.to_pod, dst)
        && ident(&filter.from_identity, src)
        && ident(&filter.to_identity, dst)
        && (filter.verdict.is_empty() || filter.verdict.contains(&f.verdict))
}

/// The gRPC service over a flow store.
pub struct Service {
    store: Arc<Store>,
    lost: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Service {
    /// A service over `store`; `lost` reads the kernel's lost-event counter.
    pub fn new(store: Arc<Store>, lost: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        Self { store, lost }
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<api::Flow, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for Service {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<api::GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = request.into_inner();
        let filter = req.filter.unwrap_or_default();
        // Subscribe before the snapshot so nothing falls between; skip what the snapshot
        // already had by sequence number.
        let live = req.follow.then(|| self.store.subscribe());
        let mut past: Vec<_> = self
            .store
            .snapshot()
            .into_iter()
            .filter(|(_, f)| matches(&filter, f))
            .collect();
        if req.number > 0 && past.len() as u64 > req.number {
            past.drain(..past.len() - req.number as usize);
        }
        let last = past.last().map_or(0, |(s, _)| *s);
        let past = tokio_stream::iter(past.into_iter().map(|(_, f)| Ok((*f).clone())));
        let Some(live) = live else {
            return Ok(Response::new(Box::pin(past)));
        };
        let live = BroadcastStream::new(live).filter_map(move |r| match r {
            Ok((seq, f)) if seq > last && matches(&filter, &f) => Some(Ok((*f).clone())),
            Ok(_) => None,
            // A slow follower skipped some flows: keep going (Hubble does the same).
            Err(_) => None,
        });
        Ok(Response::new(Box::pin(past.chain(live))))
    }

    async fn server_status(
        &self,
        _request: Request<api::ServerStatusRequest>,
    ) -> Result<Response<api::ServerStatusResponse>, Status> {
        Ok(Response::new(api::ServerStatusResponse {
            num_flows: self.store.len() as u64,
            max_flows: self.store.capacity() as u64,
            seen_flows: self.store.seen(),
            lost_events: (self.lost)(),
            node_name: self.store.node().to_owned(),
        }))
    }
}

/// Serves `service` on `addr` until `token` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    service: Service,
    token: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(ObserverServer::new(service))
        .serve_with_shutdown(addr, token.cancelled_owned())
        .await
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    service: Service,
    token: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(ObserverServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            token.cancelled_owned(),
        )
        .await
}
