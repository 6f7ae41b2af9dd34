//! The test API server's HTTP side: TLS accept loop (with outages), request routing, lists,
//! watches, discovery and `Status` errors as kube-apiserver writes them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Change, Kind, Outage, Shared, KINDS, USER};

pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let tcp = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let outage = *shared.outage.borrow();
        match outage {
            Some(Outage::Refuse) => drop(tcp),
            Some(Outage::Hang) => {
                let mut rx = shared.outage.subscribe();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = rx.wait_for(|o| *o != Some(Outage::Hang)) => {}
                    }
                    drop(tcp);
                });
            }
            None => {
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let mut outage = shared.outage.subscribe();
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let s = shared.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(req, &s).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    // An outage cuts every open connection, watches included.
                    tokio::select! {
                        _ = conn => {}
                        _ = cancel.cancelled() => {}
                        _ = outage.wait_for(|o| o.is_some()) => {}
                    }
                });
            }
        }
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_default()
}

/// A `Status` error body, as kube-apiserver writes it.
fn status(code: u16, reason: &str, message: String, details: Value) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": details,
            "code": code,
        }),
    )
}

fn gone(message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Expired",
        "code": 410,
    })
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in req.uri().query().unwrap_or("").split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Target {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
}

async fn handle(req: Request<hyper::body::Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let ["api", "v1", "namespaces", ns, "pods", pod, "proxy", rest @ ..] = segs.as_slice() {
        if req.method() != hyper::Method::GET {
            return status(
                405,
                "MethodNotAllowed",
                "the test API server proxies only GET".into(),
                json!({}),
            );
        }
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        return pod_proxy(shared, ns, pod, &format!("/{}{query}", rest.join("/"))).await;
    }
    match segs.as_slice() {
        ["version"] => {
            return json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-clustermesh-test", "platform": "linux/amd64"}),
            )
        }
        ["api"] => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            )
        }
        ["apis"] => return json_response(StatusCode::OK, &group_list(shared)),
        ["api", v] => return json_response(StatusCode::OK, &resource_list(shared, "", v)),
        ["apis", g, v] => return json_response(StatusCode::OK, &resource_list(shared, g, v)),
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return not_found(&path),
    };
    let find = |plural: &str| {
        KINDS
            .iter()
            .position(|k| k.group == group && k.version == version && k.plural == plural)
    };
    let target = match rest {
        [plural] => find(plural).map(|kind| Target {
            kind,
            namespace: None,
            name: None,
        }),
        [plural, name] => find(plural)
            .filter(|&i| !KINDS[i].namespaced)
            .map(|kind| Target {
                kind,
                namespace: None,
                name: Some(name.to_string()),
            }),
        ["namespaces", ns, plural] => {
            find(plural)
                .filter(|&i| KINDS[i].namespaced)
                .map(|kind| Target {
                    kind,
                    namespace: Some(ns.to_string()),
                    name: None,
                })
        }
        ["namespaces", ns, plural, name] => {
            find(plural)
                .filter(|&i| KINDS[i].namespaced)
                .map(|kind| Target {
                    kind,
                    namespace: Some(ns.to_string()),
                    name: Some(name.to_string()),
                })
        }
        _ => None,
    };
    let Some(target) = target else {
        return not_found(&path);
    };
    let kd = KINDS[target.kind];
    let q = query(&req);
    let watch = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
    let method = req.method().clone();
    let verb = match method {
        hyper::Method::GET if watch => "watch",
        hyper::Method::GET if target.name.is_some() => "get",
        hyper::Method::GET => "list",
        hyper::Method::PATCH if target.name.is_some() => "patch",
        hyper::Method::DELETE if target.name.is_some() => "delete",
        _ => {
            return status(
                405,
                "MethodNotAllowed",
                format!(
                    "the test API server does not accept {method} requests on {path} (only GET, server-side apply PATCH and DELETE of one object)"
                ),
                json!({}),
            )
        }
    };
    let metadata_only = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if kd.crd && !super::crd_exists(&st, &kd) {
            drop(st);
            return not_found(&path);
        }
        // Creating through an apply also needs `create`, as on a real server.
        let creates = verb == "patch" && {
            let key = (
                target.namespace.clone().unwrap_or_default(),
                target.name.clone().unwrap_or_default(),
            );
            !st.objects[target.kind].contains_key(&key)
        };
        let denied = creates
            .then_some("create")
            .into_iter()
            .chain([verb])
            .find(|v| super::write::forbidden(&st, kd.group, kd.plural, v));
        if let Some(denied) = denied {
            st.stats.forbidden += 1;
            return forbidden_response(&kd, denied, &target.namespace);
        }
    }
    if verb == "patch" || verb == "delete" {
        return write_response(req, shared, target, &q, verb).await;
    }
    if q.get("sendInitialEvents").is_some_and(|v| v == "true") {
        // What a server without the WatchList feature says; kube-rs then falls back to
        // list + watch only if configured to — the apiserver uses list + watch anyway.
        return status(
            422,
            "Invalid",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled".into(),
            json!({}),
        );
    }
    if let Some(name) = &target.name {
        let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = (target.namespace.clone().unwrap_or_default(), name.clone());
        return match st.objects[target.kind].get(&key) {
            Some(o) => json_response(StatusCode::OK, &render(o, &kd, metadata_only, true)),
            None => status(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kd.plural),
                json!({"name": name, "group": kd.group, "kind": kd.plural}),
            ),
        };
    }
    if watch {
        watch_response(shared, target, &q, metadata_only)
    } else {
        list_response(shared, target, &q, metadata_only)
    }
}

fn not_found(path: &str) -> Response<Body> {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource".into(),
        json!({"causes": [{"reason": "UnexpectedServerResponse", "message": format!("404 page not found: {path}")}]}),
    )
}

/// How an object goes on the wire: in a list, built-in kinds carry no kind/apiVersion (as a
/// kube-apiserver writes them); metadata-only requests get `PartialObjectMetadata`.
fn render(obj: &Value, kd: &Kind, metadata_only: bool, with_type: bool) -> Value {
    if metadata_only {
        return json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        });
    }
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        if with_type || kd.crd {
            m.insert("kind".into(), json!(kd.kind));
            m.insert("apiVersion".into(), json!(kd.api_version()));
        } else {
            m.remove("kind");
            m.remove("apiVersion");
        }
    }
    o
}

fn in_namespace(obj: &Value, ns: &Option<String>) -> bool {
    match ns {
        None => true,
        Some(ns) => obj["metadata"]["namespace"].as_str() == Some(ns.as_str()),
    }
}

fn list_response(
    shared: &Arc<Shared>,
    target: Target,
    q: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<Body> {
    let kd = KINDS[target.kind];
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let mut selector = Vec::new();
    for term in q
        .get("labelSelector")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
    {
        let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) else {
            return status(
                400,
                "BadRequest",
                format!(
                    "the test API server takes only equality label selectors (k=v), not {term:?}"
                ),
                json!({}),
            );
        };
        if k.ends_with('!') {
            return status(
                400,
                "BadRequest",
                format!(
                    "the test API server takes only equality label selectors (k=v), not {term:?}"
                ),
                json!({}),
            );
        }
        selector.push((k.to_string(), v.to_string()));
    }
    let matches = |o: &Value| {
        selector
            .iter()
            .all(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v.as_str()))
    };
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let (id, offset, rv, items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)));
            let Some((id, offset)) = parsed else {
                return status(
                    400,
                    "BadRequest",
                    format!("invalid continue token {token:?}"),
                    json!({}),
                );
            };
            match st.pages.get(&id) {
                Some((rv, items)) if *rv >= st.compacted => (id, offset, *rv, items.clone()),
                _ => {
                    st.stats.gone += 1;
                    return status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                        json!({}),
                    );
                }
            }
        }
        None => {
            *st.stats.lists.entry(kd.plural.to_string()).or_default() += 1;
            let items: Vec<Arc<Value>> = st.objects[target.kind]
                .values()
                .filter(|o| in_namespace(o, &target.namespace) && matches(o))
                .cloned()
                .collect();
            let id = st.next_page;
            st.next_page += 1;
            (id, 0, st.rv, Arc::new(items))
        }
    };
    let end = offset.saturating_add(limit).min(items.len());
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        st.pages.insert(id, (rv, items.clone()));
        meta["continue"] = json!(format!("{id}:{end}"));
        meta["remainingItemCount"] = json!(items.len() - end);
    } else {
        st.pages.remove(&id);
    }
    drop(st);
    let page: Vec<Value> = items
        .get(offset..end)
        .unwrap_or(&[])
        .iter()
        .map(|o| render(o, &kd, metadata_only, false))
        .collect();
    let (kind, api_version) = if metadata_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (format!("{}List", kd.kind), kd.api_version())
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": page}),
    )
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch_response(
    shared: &Arc<Shared>,
    target: Target,
    q: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<Body> {
    let kd = KINDS[target.kind];
    let from: Option<u64> = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && v.as_str() != "0")
        .and_then(|v| v.parse().ok());
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let expire = shared
        .expire
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (rx, replay, start_rv) = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(from) = from {
            if from < st.compacted {
                st.stats.gone += 1;
                return status(
                    410,
                    "Expired",
                    format!("too old resource version: {from} ({})", st.compacted),
                    json!({}),
                );
            }
        }
        *st.stats.watches.entry(kd.plural.to_string()).or_default() += 1;
        let rx = shared.changes.subscribe();
        let replay: Vec<(&'static str, Arc<Value>)> = match from {
            Some(from) => {
                let start = st.history.partition_point(|c| c.rv <= from);
                st.history
                    .range(start..)
                    .filter(|c| c.kind == target.kind && in_namespace(&c.object, &target.namespace))
                    .map(|c| (c.ty, c.object.clone()))
                    .collect()
            }
            None => st.objects[target.kind]
                .values()
                .filter(|o| in_namespace(o, &target.namespace))
                .map(|o| ("ADDED", o.clone()))
                .collect(),
        };
        (rx, replay, st.rv)
    };
    let (tx, body_rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let interval = shared.bookmark_interval;
    let shared = shared.clone();
    tokio::spawn(async move {
        for (ty, o) in replay {
            if tx
                .send(Ok(event_line(ty, &render(&o, &kd, metadata_only, true))))
                .await
                .is_err()
            {
                return;
            }
        }
        let gone = stream_changes(
            rx,
            tx,
            kd,
            target,
            start_rv,
            metadata_only,
            bookmarks,
            interval,
            timeout,
            expire,
        )
        .await;
        if gone {
            shared
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stats
                .gone += 1;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(body_rx),
        ))
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn stream_changes(
    mut rx: broadcast::Receiver<Change>,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    kd: Kind,
    target: Target,
    start_rv: u64,
    metadata_only: bool,
    bookmarks: bool,
    interval: Duration,
    timeout: Duration,
    expire: CancellationToken,
) -> bool {
    let mut seen = start_rv;
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let line = tokio::select! {
            _ = &mut deadline => return false,
            _ = tx.closed() => return false,
            _ = expire.cancelled() => {
                let _ = tx.send(Ok(event_line("ERROR", &gone(format!("too old resource version: {seen} (compacted)"))))).await;
                return true;
            }
            _ = tick.tick(), if bookmarks => event_line("BOOKMARK", &json!({
                "kind": kd.kind,
                "apiVersion": kd.api_version(),
                "metadata": {"resourceVersion": seen.to_string()},
            })),
            c = rx.recv() => match c {
                Ok(c) => {
                    if c.rv <= seen {
                        continue;
                    }
                    seen = c.rv;
                    if KINDS[c.kind].kind == "CustomResourceDefinition" && c.ty == "DELETED"
                        && kd.crd && c.object["metadata"]["name"].as_str() == Some(kd.crd_name().as_str())
                    {
                        // Its resource is gone: the server ends the watch.
                        return false;
                    }
                    if c.kind != target.kind || !in_namespace(&c.object, &target.namespace) {
                        continue;
                    }
                    event_line(c.ty, &render(&c.object, &kd, metadata_only, true))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(Ok(event_line("ERROR", &gone("watch fell behind; relist".into())))).await;
                    return true;
                }
                Err(broadcast::error::RecvError::Closed) => return false,
            },
        };
        if tx.send(Ok(line)).await.is_err() {
            return false;
        }
    }
}

fn group_list(shared: &Arc<Shared>) -> Value {
    let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for kd in KINDS.iter().filter(|k| !k.group.is_empty()) {
        if kd.crd && !super::crd_exists(&st, kd) {
            continue;
        }
        let vs = groups.entry(kd.group).or_default();
        if !vs.contains(&kd.version) {
            vs.push(kd.version);
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(shared: &Arc<Shared>, group: &str, version: &str) -> Value {
    let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let resources: Vec<Value> = KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .filter(|k| !k.crd || super::crd_exists(&st, k))
        .map(|k| {
            json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced,
                   "kind": k.kind, "verbs": ["get", "list", "watch"]})
        })
        .collect();
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn forbidden_response(kd: &Kind, verb: &str, namespace: &Option<String>) -> Response<Body> {
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let resource = if kd.group.is_empty() {
        kd.plural.to_string()
    } else {
        format!("{}.{}", kd.plural, kd.group)
    };
    status(
        403,
        "Forbidden",
        format!(
            "{resource} is forbidden: User \"{USER}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
            kd.plural, kd.group
        ),
        json!({"group": kd.group, "kind": kd.plural}),
    )
}

/// Server-side apply (`PATCH`, `application/apply-patch+yaml`) and `DELETE` of one object.
async fn write_response(
    req: Request<hyper::body::Incoming>,
    shared: &Arc<Shared>,
    target: Target,
    q: &BTreeMap<String, String>,
    verb: &str,
) -> Response<Body> {
    let kd = KINDS[target.kind];
    let ns = target.namespace.clone().unwrap_or_default();
    let name = target.name.clone().unwrap_or_default();
    let mut dry_run = q.get("dryRun").is_some_and(|v| v == "All");
    if verb == "delete" {
        // DeleteOptions may come as the body too (kube-rs sends them so).
        if let Ok(body) = axum::body::to_bytes(Body::new(req.into_body()), 1 << 20).await {
            if let Ok(opts) = serde_json::from_slice::<Value>(&body) {
                dry_run |= opts["dryRun"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == "All"));
            }
        }
        return match shared.delete_over_http(target.kind, &ns, &name, dry_run) {
            Some(o) => json_response(StatusCode::OK, &render(&o, &kd, false, true)),
            None => status(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kd.plural),
                json!({"name": name, "group": kd.group, "kind": kd.plural}),
            ),
        };
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !content_type.starts_with("application/apply-patch+yaml") {
        return status(
            415,
            "UnsupportedMediaType",
            format!("the test API server accepts only server-side apply patches (application/apply-patch+yaml), not {content_type:?}"),
            json!({}),
        );
    }
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
        return status(
            400,
            "BadRequest",
            "PATCH /apply requires a non-empty fieldManager".into(),
            json!({}),
        );
    };
    let body = match axum::body::to_bytes(Body::new(req.into_body()), 16 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return status(
                400,
                "BadRequest",
                format!("reading the body: {e}"),
                json!({}),
            )
        }
    };
    let applied: Value = match serde_yaml::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                400,
                "BadRequest",
                format!("error decoding YAML: {e}"),
                json!({}),
            )
        }
    };
    match shared.server_side_apply(target.kind, &ns, &name, applied, manager, dry_run) {
        Ok(o) => json_response(StatusCode::OK, &render(&o, &kd, false, true)),
        Err((code, reason, message)) => status(code, reason, message, json!({})),
    }
}

/// The API server's pod proxy: `GET` on the pod's `status.podIP` and port, plain HTTP.
async fn pod_proxy(
    shared: &Arc<Shared>,
    ns: &str,
    pod: &str,
    path_and_query: &str,
) -> Response<Body> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (name, port) = match pod.split_once(':') {
        Some((n, p)) => (n, p.parse::<u16>().unwrap_or(0)),
        None => (pod, 80),
    };
    let pod_ip = {
        let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ki) = KINDS.iter().position(|k| k.kind == "Pod") else {
            return not_found(pod);
        };
        if super::write::forbidden(&st, "", "pods/proxy", "get") {
            drop(st);
            return forbidden_response(&KINDS[ki], "get", &Some(ns.to_string()));
        }
        match st.objects[ki].get(&(ns.to_string(), name.to_string())) {
            None => {
                return status(
                    404,
                    "NotFound",
                    format!("pods \"{name}\" not found"),
                    json!({"name": name, "kind": "pods"}),
                )
            }
            Some(o) => o["status"]["podIP"].as_str().map(String::from),
        }
    };
    let Some(ip) = pod_ip else {
        return status(
            503,
            "ServiceUnavailable",
            format!("pod {name} has no IP address yet"),
            json!({}),
        );
    };
    let addr = format!("{ip}:{port}");
    let unavailable = |e: String| {
        status(
            503,
            "ServiceUnavailable",
            format!("error trying to reach service: dial tcp {addr}: {e}"),
            json!({}),
        )
    };
    let mut tcp = match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return unavailable(e.to_string()),
        Err(_) => return unavailable("i/o timeout".into()),
    };
    let req = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if let Err(e) = tcp.write_all(req.as_bytes()).await {
        return unavailable(e.to_string());
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return unavailable(e.to_string()),
        Err(_) => return unavailable("i/o timeout".into()),
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(502);
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "text/plain".into());
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY))
        .header("content-type", content_type)
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}
