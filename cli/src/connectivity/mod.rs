//! `clustermesh connectivity test`: pod → pod checks over the lab, in the style of
//! `cilium connectivity test`.
//!
//! For every ordered pair of lab pods (so both directions), classified as same-node,
//! cross-node (same cluster) or cross-cluster: a TCP check (connect to the echo server on
//! :8080 from inside the source pod's namespace, read its answer, and require that it
//! names the expected pod, node and cluster) and an ICMP check (`ping -c 1 -W 1` inside the
//! source pod). Checks run with bounded parallelism; each prints ✅/❌ with its latency,
//! then a summary; any failure makes the command fail. `-o json` prints one report.
//! Then the service checks of [`services`] (eBPF lab only).
//!
//! A dual-stack lab (`lab up --ip-family dual`) runs every pod check once per family: the
//! IPv6 ones are named `tcp6`/`icmp6` (`ping -6`) and carry `"family": "ipv6"`; an IPv4
//! lab runs exactly the checks it always did; an IPv6-only lab (`--ip-family ipv6`) runs
//! the IPv6 ones alone.

mod services;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::lab::echo::Answer;
use crate::lab::state::{self, PodRef};
use crate::lab::{netns, plan};

/// Flags of `connectivity test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Lab directory.
    #[arg(long, default_value = crate::lab::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Output format: `summary` or `json`.
    #[arg(short = 'o', long, default_value = "summary")]
    pub output: String,
    /// Checks run at the same time (more than the machine's cores inflates the latencies).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Per-check timeout.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Only run checks whose name contains this text (e.g. `cross-cluster`, `tcp`, `c2/`).
    #[arg(long)]
    pub filter: Option<String>,
    /// New connections to the global service VIP (service checks).
    #[arg(long, default_value_t = 40)]
    pub connects: usize,
    /// Remote backend changes timed for the propagation check (0 skips it).
    #[arg(long, default_value_t = 4)]
    pub propagation_rounds: usize,
}

/// Where the destination is, seen from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Same node.
    SameNode,
    /// Another node of the same cluster.
    CrossNode,
    /// Another cluster.
    CrossCluster,
}

/// The protocol of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Connect to :8080 and check the echo answer.
    Tcp,
    /// One ping.
    Icmp,
}

/// The address family of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Pod IPv4 addresses.
    Ipv4,
    /// Pod IPv6 addresses.
    Ipv6,
}

/// One end of a check.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    /// Cluster.
    pub cluster: String,
    /// Node.
    pub node: String,
    /// Pod.
    pub pod: String,
    /// Pod IP.
    pub ip: String,
    /// Network namespace.
    pub netns: String,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `tcp c1/n1/echo-1-1 → c2/n1/echo-1-1 (cross-cluster)`.
    pub name: String,
    /// Protocol.
    pub kind: Kind,
    /// Address family.
    pub family: Family,
    /// Relation of the two pods.
    pub scope: Scope,
    /// Source.
    pub from: Endpoint,
    /// Destination.
    pub to: Endpoint,
    /// Passed.
    pub ok: bool,
    /// Round trip (TCP: connect + answer; ICMP: ping's rtt), milliseconds.
    pub latency_ms: Option<f64>,
    /// What went wrong.
    pub error: Option<String>,
}

/// The pod's address of `family` (`None`: the pod has none).
fn pod_ip(p: &PodRef<'_>, family: Family) -> Option<IpAddr> {
    match family {
        Family::Ipv4 => p.pod.ip4().map(IpAddr::from),
        Family::Ipv6 => p.pod.ip6.map(IpAddr::from),
    }
}

fn endpoint(p: &PodRef<'_>, family: Family) -> Endpoint {
    Endpoint {
        cluster: p.cluster.name.clone(),
        node: p.node.name.clone(),
        pod: p.pod.name.clone(),
        ip: pod_ip(p, family).map(|a| a.to_string()).unwrap_or_default(),
        netns: p.pod.ns.clone(),
    }
}

fn scope(a: &PodRef<'_>, b: &PodRef<'_>) -> Scope {
    if a.cluster.name != b.cluster.name {
        Scope::CrossCluster
    } else if a.node.name != b.node.name {
        Scope::CrossNode
    } else {
        Scope::SameNode
    }
}

fn tcp_check(
    src: &PodRef<'_>,
    dst: &PodRef<'_>,
    ip: IpAddr,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let addr = SocketAddr::from((ip, plan::ECHO_PORT));
    let (answer, ms) = netns::run_in(&src.pod.ns, || {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .with_context(|| format!("reading the answer of {addr}"))?;
        Ok((buf, t.elapsed().as_secs_f64() * 1000.0))
    })?;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split_once("\r\n\r\n").map_or(&*text, |(_, b)| b);
    let got: Answer = serde_json::from_str(body.trim())
        .with_context(|| format!("{addr} answered something else than an echo: {body:?}"))?;
    if (got.pod.as_str(), got.node.as_str(), got.cluster.as_str())
        != (
            dst.pod.name.as_str(),
            dst.node.name.as_str(),
            dst.cluster.name.as_str(),
        )
    {
        bail!(
            "{addr} answered as {}/{}/{}, expected {}",
            got.cluster,
            got.node,
            got.pod,
            dst.label()
        );
    }
    Ok(ms)
}

fn icmp_check(src: &PodRef<'_>, ip: IpAddr, timeout: Duration) -> anyhow::Result<f64> {
    let wait = timeout.as_secs().max(1).to_string();
    let family = if ip.is_ipv6() { "-6" } else { "-4" };
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &src.pod.ns,
            "ping",
            family,
            "-n",
            "-c",
            "1",
            "-W",
        ])
        .arg(&wait)
        .arg(ip.to_string())
        .output()
        .context("running ping (apt-get install iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "no reply from {}: {}",
            ip,
            text.lines()
                .find(|l| l.contains("packet loss"))
                .unwrap_or("ping failed")
                .trim()
        );
    }
    text.split("time=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("no rtt in ping's output: {text}"))
}

/// `connectivity test`.
pub fn test(a: TestArgs) -> anyhow::Result<()> {
    let st = state::load(&a.dir)?;
    let pods = st.pods();
    let families: &[Family] = match st.ip_family {
        state::IpFamily::Ipv4 => &[Family::Ipv4],
        state::IpFamily::Dual => &[Family::Ipv4, Family::Ipv6],
        state::IpFamily::Ipv6 => &[Family::Ipv6],
    };
    let mut plan_list = Vec::new();
    for src in &pods {
        for dst in &pods {
            if src.pod.ns == dst.pod.ns {
                continue;
            }
            for &family in families {
                let Some(ip) = pod_ip(dst, family) else {
                    continue;
                };
                for kind in [Kind::Tcp, Kind::Icmp] {
                    let sc = scope(src, dst);
                    let name = format!(
                        "{} {} → {} ({})",
                        match (kind, family) {
                            (Kind::Tcp, Family::Ipv4) => "tcp ",
                            (Kind::Icmp, Family::Ipv4) => "icmp",
                            (Kind::Tcp, Family::Ipv6) => "tcp6",
                            (Kind::Icmp, Family::Ipv6) => "icmp6",
                        },
                        src.label(),
                        dst.label(),
                        match sc {
                            Scope::SameNode => "same-node",
                            Scope::CrossNode => "cross-node",
                            Scope::CrossCluster => "cross-cluster",
                        }
                    );
                    if a.filter
                        .as_ref()
                        .is_some_and(|f| !name.contains(f.as_str()))
                    {
                        continue;
                    }
                    plan_list.push((name, kind, family, ip, sc, *src, *dst));
                }
            }
        }
    }
    let json = a.output == "json";
    if !json {
        println!(
            "🏃 Running {} connectivity checks over {} pods in {} clusters ({} in parallel)…",
            plan_list.len(),
            pods.len(),
            st.clusters.len(),
            a.parallel.max(1)
        );
    }
    let started = Instant::now();
    let results: Mutex<Vec<Option<Check>>> = Mutex::new(vec![None; plan_list.len()]);
    let next = Arc::new(Mutex::new(0usize));
    std::thread::scope(|s| {
        for _ in 0..a.parallel.max(1) {
            let next = Arc::clone(&next);
            let (plan_list, results) = (&plan_list, &results);
            s.spawn(move || loop {
                let i = {
                    let Ok(mut n) = next.lock() else { return };
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some((name, kind, family, ip, sc, src, dst)) = plan_list.get(i) else {
                    return;
                };
                let res = match kind {
                    Kind::Tcp => tcp_check(src, dst, *ip, a.timeout),
                    Kind::Icmp => icmp_check(src, *ip, a.timeout),
                };
                let check = Check {
                    name: name.clone(),
                    kind: *kind,
                    family: *family,
                    scope: *sc,
                    from: endpoint(src, *family),
                    to: endpoint(dst, *family),
                    ok: res.is_ok(),
                    latency_ms: res.as_ref().ok().copied(),
                    error: res.err().map(|e| format!("{e:#}")),
                };
                if !json {
                    match (&check.latency_ms, &check.error) {
                        (Some(ms), _) => println!("✅ {name}: {ms:.2} ms"),
                        (None, e) => println!("❌ {name}: {}", e.as_deref().unwrap_or("failed")),
                    }
                }
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(check);
                }
            });
        }
    });
    let checks: Vec<Check> = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a check thread panicked"))?
        .into_iter()
        .flatten()
        .collect();
    // Service checks (issue 5): the eBPF lab only (the kernel lab has no load balancer).
    let services = if st.datapath == state::Datapath::Ebpf {
        let cfg = services::Config {
            connects: a.connects,
            propagation_rounds: a.propagation_rounds,
            timeout: a.timeout,
        };
        services::run(&st, &cfg, a.filter.as_deref())?
    } else {
        Vec::new()
    };
    if !json {
        for c in &services {
            match &c.error {
                None => println!("✅ {}: {}", c.name, c.detail),
                Some(e) => println!("❌ {}: {e}", c.name),
            }
        }
    }
    let passed = checks.iter().filter(|c| c.ok).count() + services.iter().filter(|c| c.ok).count();
    let failed = checks.len() + services.len() - passed;
    let elapsed = started.elapsed();
    let mut per_scope = serde_json::Map::new();
    for sc in [Scope::SameNode, Scope::CrossNode, Scope::CrossCluster] {
        for &family in families {
            for kind in [Kind::Tcp, Kind::Icmp] {
                let mut l: Vec<f64> = checks
                    .iter()
                    .filter(|c| c.scope == sc && c.kind == kind && c.family == family)
                    .filter_map(|c| c.latency_ms)
                    .collect();
                if l.is_empty() {
                    continue;
                }
                l.sort_by(f64::total_cmp);
                // IPv4 keys as they always were; IPv6 ones say so (`same-node/tcp6`).
                let key = format!(
                    "{}/{}{}",
                    serde_json::to_value(sc)?.as_str().unwrap_or_default(),
                    serde_json::to_value(kind)?.as_str().unwrap_or_default(),
                    if family == Family::Ipv6 { "6" } else { "" }
                );
                per_scope.insert(
                    key,
                    serde_json::json!({"count": l.len(), "p50_ms": l[l.len() / 2], "max_ms": l[l.len() - 1]}),
                );
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "lab": st.id, "datapath": st.datapath, "ip_family": st.ip_family,
                "summary": {"total": checks.len() + services.len(), "passed": passed, "failed": failed,
                    "duration_ms": elapsed.as_secs_f64() * 1000.0, "latency": per_scope},
                "checks": checks,
                "services": services,
            }))?
        );
    } else {
        println!();
        for (k, v) in &per_scope {
            println!(
                "   {k:<20} {} checks, p50 {:.2} ms, max {:.2} ms",
                v["count"],
                v["p50_ms"].as_f64().unwrap_or_default(),
                v["max_ms"].as_f64().unwrap_or_default()
            );
        }
        println!(
            "{} {passed} passed, {failed} failed ({:.1}s)",
            if failed == 0 { "✅" } else { "❌" },
            elapsed.as_secs_f64()
        );
    }
    if failed > 0 {
        bail!(
            "{failed} of {} connectivity checks failed (`clustermesh lab status --dir {}` shows the agents)",
            checks.len() + services.len(),
            a.dir.display()
        );
    }
    Ok(())
}
