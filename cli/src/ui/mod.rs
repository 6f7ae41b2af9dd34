//! `clustermesh ui`: a web view of the mesh, like Hubble UI's service map: clusters with
//! their nodes and remote connections, a live service map (workloads and services, edges
//! coloured by verdict with counts and rates) and a filterable live flow table, fed by
//! every agent's gRPC observer.
//!
//! ```text
//!  agents' observers ──gRPC GetFlows(follow)──► observers::follow ─┐
//!  apiservers' /status, agents' /readyz ──► mesh::poll_health ─────┤      (threads inside the
//!  each cluster's etcd (remote user) ──► mesh::poll_inventory ──────┤       lab's router netns)
//!                                                                   ▼
//!                     hub::Hub (ring, graph::Graph, per-client bounded queues)
//!                                                                   │ every 100 ms / 1 s
//!  browser ◄── server (axum on the listener bound in the root netns): /, /api/*, SSE
//! ```
//!
//! The listener is bound first, in the caller's network namespace (where the browser is);
//! then the process enters the lab's router namespace, which has a leg into every cluster's
//! underlay, so every connection to the lab starts there, even when another lab owns the
//! root namespace's route into 198.18.0.0/15. Sockets keep the namespace they were made in.
//!
//! The page is hand-written HTML, JS and CSS in `assets/`, embedded with `include_str!`:
//! nothing is built or downloaded at run time.
//!
//! It must not change the mesh: it reads health endpoints, observers and etcd (read-only
//! user), nothing else.

mod filter;
mod flow;
mod graph;
mod hub;
mod mesh;
mod observers;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::lab::{netns, state};
use crate::observe::OBSERVER_PORT;

/// The address `clustermesh ui` listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:12000";

/// Flags of `clustermesh ui`.
#[derive(Debug, clap::Args)]
pub struct UiArgs {
    /// Lab directory (the mesh to show).
    #[arg(long, default_value = ".lab")]
    pub dir: PathBuf,
    /// Address to serve the page on. The page has no login: keep it on loopback.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Observer addresses (`host:port`, repeatable) to follow instead of the lab's agents;
    /// the page then shows flows and the map only.
    #[arg(long)]
    pub server: Vec<String>,
}

/// Runs `clustermesh ui` until SIGINT/SIGTERM.
pub fn run(a: UiArgs) -> anyhow::Result<()> {
    let lab = if a.server.is_empty() {
        Some(Arc::new(state::load(&a.dir)?))
    } else {
        None
    };
    // Bound here, in the namespace of the caller (and of the browser).
    let listener = std::net::TcpListener::bind(a.listen).with_context(|| {
        format!(
            "cannot listen on {}: is another `clustermesh ui` running there? Pick another address with --listen",
            a.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if let Some(lab) = &lab {
        // This thread, and every thread it starts (the runtime's), now opens sockets in
        // the router namespace. The listener stays where it was bound.
        netns::enter(&lab.router_ns)?;
    }
    if !addr.ip().is_loopback() {
        eprintln!(
            "⚠️  {addr} is not a loopback address: anyone who reaches it sees the mesh's flows (the page has no login)"
        );
    }
    clustermesh_runtime::init_tracing(
        &std::env::var("CLUSTERMESH_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The one shutdown pattern of every long-running binary: SIGINT/SIGTERM cancel the
    // token, `serve` drains its tasks (aborting what lingers past DRAIN), and the runtime
    // aborts it if even that takes longer than its grace.
    rt.block_on(clustermesh_runtime::run(DRAIN * 2, |token| {
        serve(lab, a.server, listener, addr, token)
    }))?
}

/// How long the UI's tasks get to finish after a signal (live event streams end when
/// their queues close).
const DRAIN: Duration = Duration::from_secs(3);

fn hosts(addr: SocketAddr) -> Vec<String> {
    let mut h = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        h.push(format!("localhost:{}", addr.port()));
    }
    h
}

async fn serve(
    lab: Option<Arc<state::LabState>>,
    servers: Vec<String>,
    listener: std::net::TcpListener,
    addr: SocketAddr,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let hub = Arc::new(hub::Hub::new());
    let health = Arc::new(Mutex::new(mesh::Health::default()));
    let mut tasks = tokio::task::JoinSet::new();

    let mut targets = Vec::new();
    match &lab {
        Some(lab) => {
            for c in &lab.clusters {
                for n in c.nodes.iter().filter(|n| n.agent.is_some()) {
                    let address = SocketAddr::new(n.ip, OBSERVER_PORT).to_string();
                    targets.push(observers::Target {
                        feed: hub.add_feed(&c.name, &n.name, &address),
                        label: format!("{}/{}", c.name, n.name),
                        address,
                    });
                }
            }
        }
        None => {
            for s in &servers {
                targets.push(observers::Target {
                    feed: hub.add_feed("", s, s),
                    label: s.clone(),
                    address: s.clone(),
                });
            }
        }
    }
    if targets.is_empty() {
        bail!("no agent to follow: this lab runs no agents (`lab up --datapath ebpf` starts them), or give observers with --server");
    }
    let agents = targets.len();
    for t in targets {
        let span = tracing::info_span!("observer", address = %t.address);
        tasks.spawn(observers::follow(t, hub.clone(), token.child_token()).instrument(span));
    }
    if let Some(lab) = &lab {
        tasks.spawn(
            mesh::poll_health(lab.clone(), health.clone(), token.child_token())
                .instrument(tracing::info_span!("health")),
        );
        tasks.spawn(
            mesh::poll_inventory(
                lab.clone(),
                hub.clone(),
                health.clone(),
                token.child_token(),
            )
            .instrument(tracing::info_span!("inventory")),
        );
    }
    tasks.spawn(
        mesh::publish(lab.clone(), hub.clone(), health, token.child_token())
            .instrument(tracing::info_span!("mesh")),
    );
    {
        let (hub, token) = (hub.clone(), token.child_token());
        tasks.spawn(
            async move {
                let mut flush = tokio::time::interval(hub::FLUSH);
                let mut map = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = flush.tick() => hub.flush(),
                        _ = map.tick() => hub.broadcast(hub::Msg::Map(hub.map())),
                    }
                }
            }
            .instrument(tracing::info_span!("fanout")),
        );
    }

    // The first page must not see an empty document before the first tick.
    hub.set_mesh(mesh::compose(
        lab.as_deref(),
        &mesh::Health::default(),
        &hub.feeds(),
    ));
    let app = server::App {
        hub,
        hosts: Arc::new(hosts(addr)),
    };
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let what = match &lab {
        Some(l) => format!("lab {} in {}", l.id, l.dir.display()),
        None => format!("{agents} observers"),
    };
    println!(
        "🖥️  clustermesh ui: http://{addr}/ ({what}, following {agents} agents; Ctrl-C stops it)"
    );
    let server_token = token.clone();
    tasks.spawn(async move {
        let serve = axum::serve(
            listener,
            server::router(app).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(server_token.cancelled_owned());
        if let Err(error) = serve.await {
            tracing::error!(%error, "the UI's HTTP server stopped");
        }
    });

    token.cancelled().await;
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    Ok(())
}
