//! `clustermesh observe`: flows from every agent's observer (gRPC), merged by time and
//! printed like `hubble observe`, or as JSON lines.
//!
//! Servers come from `--server` (repeatable) or, by default, from the lab in `--dir` (the
//! same default as `lab up`): every agent's node address on port [`OBSERVER_PORT`]
//! (Hubble's 4245), dialled from the lab's router namespace. With `--follow` it streams
//! until SIGINT/SIGTERM, then stops its streams.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use api::observer_client::ObserverClient;
use clustermesh_observer_api as api;
use tokio_util::sync::CancellationToken;

/// The agents' observer port (Hubble's).
pub const OBSERVER_PORT: u16 = 4245;

/// Arguments of `observe`.
#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// Only flows from pods of this cluster (repeatable).
    #[arg(long = "from-cluster")]
    from_cluster: Vec<String>,
    /// Only flows to pods of this cluster (repeatable).
    #[arg(long = "to-cluster")]
    to_cluster: Vec<String>,
    /// Only flows from this pod (`[namespace/]name-prefix`, repeatable).
    #[arg(long = "from-pod")]
    from_pod: Vec<String>,
    /// Only flows to this pod (`[namespace/]name-prefix`, repeatable).
    #[arg(long = "to-pod")]
    to_pod: Vec<String>,
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    verdict: Vec<Verdict>,
    /// Keep printing new flows.
    #[arg(short, long)]
    follow: bool,
    /// Flows per server before following (0 = all in the ring).
    #[arg(long, default_value_t = 20)]
    last: u64,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    output: Output,
    /// Observer addresses (`host:port`, repeatable); default: every agent of the lab.
    #[arg(long)]
    server: Vec<String>,
    /// Lab directory (to find the agents).
    #[arg(long, alias = "lab-dir", default_value = crate::lab::DEFAULT_DIR)]
    dir: PathBuf,
}

/// A verdict filter.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
#[clap(rename_all = "UPPER")]
enum Verdict {
    Forwarded,
    Dropped,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// One line per flow, like `hubble observe`.
    Compact,
    /// One JSON object per line.
    Json,
}

/// The observers to ask, and the lab's router namespace when they are the lab's agents
/// (`--server` addresses are dialled from where the command runs).
fn servers(args: &ObserveArgs) -> anyhow::Result<(Vec<String>, Option<String>)> {
    if !args.server.is_empty() {
        return Ok((args.server.clone(), None));
    }
    let lab = crate::lab::state::load(&args.dir)?;
    let out: Vec<String> = lab
        .clusters
        .iter()
        .flat_map(|c| &c.nodes)
        .map(|n| std::net::SocketAddr::new(n.ip, OBSERVER_PORT).to_string())
        .collect();
    if out.is_empty() {
        bail!("the lab at {} has no nodes", args.dir.display());
    }
    Ok((out, Some(lab.router_ns)))
}

fn request(args: &ObserveArgs) -> api::GetFlowsRequest {
    api::GetFlowsRequest {
        number: args.last,
        follow: args.follow,
        filter: Some(api::FlowFilter {
            from_cluster: args.from_cluster.clone(),
            to_cluster: args.to_cluster.clone(),
            from_pod: args.from_pod.clone(),
            to_pod: args.to_pod.clone(),
            verdict: args
                .verdict
                .iter()
                .map(|v| match v {
                    Verdict::Forwarded => api::Verdict::Forwarded as i32,
                    Verdict::Dropped => api::Verdict::Dropped as i32,
                })
                .collect(),
            ..Default::default()
        }),
    }
}

/// Runs `observe`.
pub fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let (servers, router_ns) = servers(&args)?;
    if let Some(ns) = router_ns {
        // The agents' addresses are reached from the router namespace, which has a leg in
        // every cluster's underlay: the root namespace's one route into 198.18.0.0/15 may
        // lead to another lab (or be absent). The runtime below is single-threaded, so
        // every connection is opened from this thread.
        crate::lab::netns::enter(&ns)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Following ends with Ctrl-C (or SIGTERM): the streams are cancelled, what arrived is
    // printed, and the command succeeds.
    rt.block_on(clustermesh_runtime::run(Duration::from_secs(2), |token| {
        observe(args, servers, token)
    }))?
}

async fn observe(
    args: ObserveArgs,
    servers: Vec<String>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<api::Flow>(1024);
    let mut tasks = tokio::task::JoinSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(String, anyhow::Result<()>)>(16);
    for s in servers.clone() {
        let req = request(&args);
        let tx = tx.clone();
        let done = done_tx.clone();
        tasks.spawn(async move {
            let r = async {
                let mut c = ObserverClient::connect(format!("http://{s}"))
                    .await
                    .with_context(|| format!("connect to observer {s}"))?;
                let mut stream = c.get_flows(req).await?.into_inner();
                while let Some(f) = stream.message().await? {
                    if tx.send(f).await.is_err() {
                        break;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            let _ = done.send((s, r)).await;
        });
    }
    drop(tx);
    drop(done_tx);
    let mut failed = 0;
    let mut report = |(s, r): (String, anyhow::Result<()>)| {
        if let Err(e) = r {
            failed += 1;
            eprintln!("warning: {s}: {e:#}");
        }
    };
    // Following: past flows arrive per server, then print as they come. Otherwise: collect
    // everything, then print it merged by time.
    let mut all = Vec::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                tasks.abort_all();
                break;
            }
            f = rx.recv() => match f {
                Some(f) if args.follow => {
                    if !print(&f, args.output)? {
                        tasks.abort_all();
                        return Ok(());
                    }
                }
                Some(f) => all.push(f),
                None => break,
            },
            Some(d) = done_rx.recv() => report(d),
        }
    }
    while let Ok(d) = done_rx.try_recv() {
        report(d);
    }
    all.sort_by_key(|f| f.time_unix_nanos);
    for f in &all {
        if !print(f, args.output)? {
            break;
        }
    }
    while tasks.join_next().await.is_some() {}
    if failed == servers.len() {
        bail!("no observer answered ({} tried)", servers.len());
    }
    Ok(())
}

/// Writes one flow to stdout; `false` once the reader has gone (`observe | head`): the
/// command then stops quietly, as Unix tools do, where `println!` would panic on the
/// broken pipe.
fn print(f: &api::Flow, output: Output) -> anyhow::Result<bool> {
    use std::io::Write as _;
    let line = match output {
        Output::Json => json(f).to_string(),
        Output::Compact => compact(f),
    };
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing a flow to stdout"),
    }
}

fn endpoint_json(e: Option<&api::Endpoint>) -> serde_json::Value {
    let Some(e) = e else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "IP": e.ip, "port": e.port, "identity": e.identity, "labels": e.labels,
        "cluster_name": e.cluster, "namespace": e.namespace, "pod_name": e.pod_name,
    })
}

/// One flow as JSON (field names after Hubble's `flow` object).
pub fn json(f: &api::Flow) -> serde_json::Value {
    serde_json::json!({
        "time": time(f.time_unix_nanos, true),
        "verdict": verdict(f),
        "drop_reason_desc": f.drop_reason_desc,
        "source": endpoint_json(f.source.as_ref()),
        "destination": endpoint_json(f.destination.as_ref()),
        "l4": {"protocol": f.protocol, "tcp_flags": tcp_flags(f.tcp_flags)},
        "traffic_direction": f.traffic_direction.to_uppercase(),
        "node_name": f.node_name,
        "policy_match": f.policy_match,
        "observation_point": f.observation_point,
    })
}

pub(crate) fn verdict(f: &api::Flow) -> &'static str {
    match api::Verdict::try_from(f.verdict) {
        Ok(api::Verdict::Forwarded) => "FORWARDED",
        Ok(api::Verdict::Dropped) => "DROPPED",
        _ => "UNKNOWN",
    }
}

pub(crate) fn time(nanos: i64, rfc3339: bool) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos.max(0) as u64);
    let s = humantime::format_rfc3339_millis(t).to_string();
    if rfc3339 {
        s
    } else {
        // "2026-11-26T20:14:01.123Z" → "Nov 26 20:14:01.123" (hubble's short form).
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = s
            .get(5..7)
            .and_then(|m| m.parse::<usize>().ok())
            .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
            .copied()
            .unwrap_or("???");
        format!(
            "{month} {} {}",
            s.get(8..10).unwrap_or("??"),
            s.get(11..23).unwrap_or("")
        )
    }
}

pub(crate) fn tcp_flags(bits: u32) -> Vec<&'static str> {
    [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ]
    .into_iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| n)
    .collect()
}

/// Labels worth showing: not the namespace/cluster ones (shown separately).
pub(crate) fn short_labels(labels: &[String]) -> Vec<&str> {
    labels
        .iter()
        .map(String::as_str)
        .filter(|l| {
            !l.contains("io.kubernetes.pod.namespace=")
                && !l.contains("io.cilium.k8s.policy.cluster=")
                && !l.contains("io.cilium.k8s.namespace.labels.")
                && !l.contains("io.cilium.k8s.policy.serviceaccount=")
        })
        .collect()
}

fn endpoint(e: Option<&api::Endpoint>) -> String {
    let Some(e) = e else { return "?".into() };
    let addr = if e.pod_name.is_empty() {
        e.ip.clone()
    } else {
        format!("{}/{}", e.namespace, e.pod_name)
    };
    let addr = if e.port != 0 {
        format!("{addr}:{}", e.port)
    } else {
        addr
    };
    let mut info = vec![format!("ID:{}", e.identity)];
    info.extend(short_labels(&e.labels).into_iter().map(str::to_owned));
    if !e.cluster.is_empty() {
        info.push(format!("cluster:{}", e.cluster));
    }
    format!("{addr} ({})", info.join(" "))
}

/// One flow in `hubble observe`'s compact form.
pub fn compact(f: &api::Flow) -> String {
    let point = match verdict(f) {
        "DROPPED" => format!("{} {}", f.traffic_direction, human_reason(f)),
        _ => point(f).to_owned(),
    };
    let mut line = format!(
        "{} [{}]: {} -> {} {} {}",
        time(f.time_unix_nanos, false),
        f.node_name,
        endpoint(f.source.as_ref()),
        endpoint(f.destination.as_ref()),
        point,
        verdict(f),
    );
    if f.protocol == "TCP" {
        line.push_str(&format!(
            " (TCP Flags: {})",
            tcp_flags(f.tcp_flags).join(", ")
        ));
    } else {
        line.push_str(&format!(" ({})", f.protocol));
    }
    line
}

/// Where a forwarded flow was seen, in Cilium's trace-point words, from the program that saw
/// it (`observation_point`), never from its direction alone: `from_pod` sees a pod's packet
/// before anything decides where it goes (another pod on the node, the overlay, or the
/// node's own stack, as IPv6 neighbour discovery does), so it says `from-endpoint`, not
/// `to-overlay`; `from_overlay` hands what it passes to the local pod (`to-endpoint`). A
/// flow without an observation point says only its direction.
fn point(f: &api::Flow) -> &str {
    match (f.observation_point.as_str(), f.traffic_direction.as_str()) {
        ("from-pod", _) => "from-endpoint",
        ("from-overlay", _) => "to-endpoint",
        (_, "") => "?",
        (_, direction) => direction,
    }
}

fn human_reason(f: &api::Flow) -> &str {
    match f.drop_reason_desc.as_str() {
        "POLICY_DENIED" => "Policy denied",
        "INVALID_PACKET_DROPPED" => "Invalid packet",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_line_has_both_clusters_labels_verdict_and_flags() {
        let ep = |ip: &str, port, id, app: &str, c: &str, pod: &str| api::Endpoint {
            ip: ip.into(),
            port,
            identity: id,
            labels: vec![
                format!("k8s:app={app}"),
                format!("k8s:io.cilium.k8s.policy.cluster={c}"),
                "k8s:io.kubernetes.pod.namespace=default".into(),
            ],
            cluster: c.into(),
            namespace: "default".into(),
            pod_name: pod.into(),
        };
        let f = api::Flow {
            time_unix_nanos: 1_795_000_000_123_000_000,
            source: Some(ep("10.1.1.11", 40000, 1002, "other", "c1", "other-1")),
            destination: Some(ep("10.2.1.11", 8080, 2002, "backend", "c2", "backend-1")),
            protocol: "TCP".into(),
            tcp_flags: 0x02,
            verdict: api::Verdict::Dropped as i32,
            drop_reason: 133,
            drop_reason_desc: "POLICY_DENIED".into(),
            traffic_direction: "ingress".into(),
            node_name: "c2/n1".into(),
            ..Default::default()
        };
        let line = compact(&f);
        assert!(
            line.ends_with(
                "[c2/n1]: default/other-1:40000 (ID:1002 k8s:app=other cluster:c1) -> \
                 default/backend-1:8080 (ID:2002 k8s:app=backend cluster:c2) ingress Policy denied \
                 DROPPED (TCP Flags: SYN)"
            ),
            "{line}"
        );
        let j = json(&f);
        assert_eq!(j["verdict"], "DROPPED");
        assert_eq!(j["source"]["cluster_name"], "c1");
    }

    /// A forwarded flow is labelled by where the agent saw it: a pod's IPv6 neighbour
    /// solicitation (multicast, handed to the node's stack, never on the wire) is seen by
    /// `from_pod` and must not say `to-overlay`; a packet `from_overlay` passed to its pod
    /// says `to-endpoint`; compact and JSON agree.
    #[test]
    fn compact_point_follows_the_observation_point_not_the_direction() {
        let ep = |ip: &str| api::Endpoint {
            ip: ip.into(),
            ..Default::default()
        };
        let flow = |src: &str, dst: &str, direction: &str, point: &str| api::Flow {
            source: Some(ep(src)),
            destination: Some(ep(dst)),
            protocol: "ICMPv6".into(),
            verdict: api::Verdict::Forwarded as i32,
            traffic_direction: direction.into(),
            observation_point: point.into(),
            node_name: "c1/n1".into(),
            ..Default::default()
        };
        let nd = flow("fd00:10:1:1::11", "ff02::1:ff00:1", "egress", "from-pod");
        let line = compact(&nd);
        assert!(
            line.contains("-> ff02::1:ff00:1 (ID:0) from-endpoint FORWARDED (ICMPv6)"),
            "{line}"
        );
        assert!(!line.contains("to-overlay"), "{line}");
        assert_eq!(json(&nd)["observation_point"], "from-pod");
        let delivered = flow("10.2.1.11", "10.1.1.11", "ingress", "from-overlay");
        let line = compact(&delivered);
        assert!(line.contains(" to-endpoint FORWARDED (ICMPv6)"), "{line}");
        assert_eq!(json(&delivered)["observation_point"], "from-overlay");
        // An agent that sends no observation point: only the direction, no claimed place.
        let bare = flow("10.1.1.11", "10.2.1.11", "egress", "");
        let line = compact(&bare);
        assert!(line.contains(" egress FORWARDED (ICMPv6)"), "{line}");
    }
}
