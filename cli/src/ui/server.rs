//! The HTTP side of `clustermesh ui` (axum): the page and its script and style, embedded in
//! the binary, and the JSON endpoints the page uses (documented in `docs/ui.md`):
//!
//! | path | what |
//! |---|---|
//! | `/` `/app.js` `/app.css` | the page |
//! | `/api/mesh` | clusters, remotes (with hints), nodes, agents, observers |
//! | `/api/map` | the service map: nodes and edges with counts, rates, drops |
//! | `/api/flows?<filter>&last=N` | the last N held flows matching the filter |
//! | `/api/events?<filter>&last=N` | server-sent events: `mesh`, `map`, `flows` |
//! | `/api/stats` | counters, observers, clients (queue, sent, dropped), memory |
//!
//! The page never receives HTML from the server: data goes out as JSON and the page puts it
//! in the DOM as text. A content security policy forbids inline script as a second line, and
//! requests whose `Host` is not the address the UI listens on are refused (a web page on
//! another site cannot read the mesh through a DNS rebinding).
//!
//! It must not reach the lab: it serves what the hub holds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_stream::StreamExt as _;

use super::filter::Filter;
use super::hub::{Hub, Msg, RING};

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// Flows a new page gets before live ones, unless it asks (`last=`).
const DEFAULT_LAST: usize = 200;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App {
    /// The hub.
    pub hub: Arc<Hub>,
    /// `Host` values accepted (`<listen>`, and `localhost:<port>` on loopback).
    pub hosts: Arc<Vec<String>>,
}

/// The router over `app`.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/api/mesh", get(mesh))
        .route("/api/map", get(map))
        .route("/api/flows", get(flows))
        .route("/api/events", get(events))
        .route("/api/stats", get(stats))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such page: the UI serves /, /api/mesh, /api/map, /api/flows, /api/events and /api/stats (docs/ui.md)".into(),
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Refuses foreign `Host`s and adds the headers every answer carries.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !app.hosts.contains(&host) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this UI's address ({}): open the page by the address `clustermesh ui` printed",
                app.hosts.join(", ")
            ),
        );
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn json(body: impl Into<axum::body::Body>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

fn error(code: StatusCode, message: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// The filter and `last` of a query string; anything else is an error.
fn query(q: Option<String>) -> Result<(Filter, usize), Response> {
    let (filter, rest) = Filter::parse(q.as_deref().unwrap_or_default())
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.0))?;
    let mut last = DEFAULT_LAST;
    for (k, v) in rest {
        match k.as_str() {
            "last" => {
                last = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n <= RING)
                    .ok_or_else(|| {
                        error(
                            StatusCode::BAD_REQUEST,
                            format!("last={v:?}: give a number of flows from 0 to {RING}"),
                        )
                    })?;
            }
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown parameter {k:?}: use {}, or last",
                        super::filter::KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok((filter, last))
}

async fn mesh(State(app): State<App>) -> Response {
    json(app.hub.mesh().to_string())
}

async fn map(State(app): State<App>) -> Response {
    json(app.hub.map().to_string())
}

async fn stats(State(app): State<App>) -> Response {
    json(app.hub.stats().to_string())
}

async fn flows(State(app): State<App>, RawQuery(q): RawQuery) -> Response {
    match query(q) {
        Ok((filter, last)) => json(app.hub.flows_json(&filter, last)),
        Err(r) => r,
    }
}

async fn events(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> Response {
    let (filter, last) = match query(q) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (client, rx) = match app.hub.subscribe(filter, last, peer.to_string()) {
        Ok(x) => x,
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} pages already follow this UI: close one",
                    super::hub::MAX_CLIENTS
                ),
            )
        }
    };
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |m| {
        let ev = match m {
            Msg::Flows(batch) => Event::default().event("flows").data(format!(
                "{{\"dropped\":{},\"flows\":{batch}}}",
                client.dropped.load(std::sync::atomic::Ordering::Relaxed)
            )),
            Msg::Map(j) => Event::default().event("map").data(&*j),
            Msg::Mesh(j) => Event::default().event("mesh").data(&*j),
        };
        Ok::<_, Infallible>(ev)
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
