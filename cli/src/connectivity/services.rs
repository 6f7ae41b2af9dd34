//! Service checks of `clustermesh connectivity test` (issue 5), run after the pod → pod
//! checks from the first pod of the first cluster:
//!
//! * `service global`: repeated new connections to the global service `echo`'s VIP land on
//!   backends in every cluster (the distribution per cluster is printed);
//! * `service dns`: `echo.default.svc.clusterset.local` resolves to that VIP, asked from
//!   inside the pod's namespace to the resolver of its `resolv.conf` (the agent's DNS);
//! * `service affinity-local`: `echo-local` (affinity `local`) stays in the source's
//!   cluster; with its local backend relabelled out of the service (the pod stays), traffic
//!   fails over to the other clusters (time from the manifest change to the first answer
//!   from another cluster, then only remote answers), and comes back when it is restored;
//! * `service propagation`: a backend pod removed from / restored to another cluster's
//!   manifests, `rounds` times, until the source node's agent has the new LB table
//!   (`/status` → `services.backends`); p50/p99 printed.
//!
//! The manifests it edits are restored before it returns, also on failure.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde::Serialize;

use crate::lab::echo::Answer;
use crate::lab::state::{Cluster, LabState, Node, Pod, PodRef};
use crate::lab::{self, netns};

/// Result of one service check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Name.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// What was measured (distribution, times).
    pub detail: serde_json::Value,
    /// Why it failed.
    pub error: Option<String>,
}

/// Settings of the service checks.
#[derive(Debug, Clone)]
pub struct Config {
    /// New connections to the global VIP.
    pub connects: usize,
    /// Remote backend changes timed for propagation (0 = skip).
    pub propagation_rounds: usize,
    /// Timeout of one connection or query.
    pub timeout: Duration,
}

/// One new TCP connection to `addr` from inside `ns`: which pod answered.
fn ask(ns: &str, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    let answer = netns::run_in(ns, || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .with_context(|| format!("reading the answer of {addr}"))?;
        Ok(buf)
    })?;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split_once("\r\n\r\n").map_or(&*text, |(_, b)| b);
    serde_json::from_str(body.trim())
        .with_context(|| format!("{addr} answered something else than an echo: {body:?}"))
}

/// Connects `n` times; answers per cluster, and failures.
fn distribution(
    ns: &str,
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut per = BTreeMap::new();
    let mut errors = Vec::new();
    for _ in 0..n {
        match ask(ns, addr, timeout) {
            Ok(a) => *per.entry(a.cluster).or_insert(0) += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (per, errors)
}

/// DNS record types the checks ask for.
pub const TYPE_A: u16 = 1;
/// See [`TYPE_A`].
pub const TYPE_AAAA: u16 = 28;

/// A DNS query for `name` of type `qtype` ([`TYPE_A`] or [`TYPE_AAAA`]; RFC 1035 wire
/// format, recursion desired).
pub fn dns_query_type(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// The rcode and the A and AAAA records of an answer to [`dns_query_type`] `id`.
pub fn dns_answer(id: u16, msg: &[u8]) -> anyhow::Result<(u8, Vec<IpAddr>)> {
    ensure!(msg.len() >= 12, "short DNS message ({} bytes)", msg.len());
    ensure!(msg[..2] == id.to_be_bytes(), "answer to another query");
    let rcode = msg[3] & 0x0f;
    let qd = u16::from_be_bytes([msg[4], msg[5]]) as usize;
    let an = u16::from_be_bytes([msg[6], msg[7]]) as usize;
    let mut i = 12;
    let skip_name = |mut i: usize| -> anyhow::Result<usize> {
        loop {
            let len = *msg.get(i).context("truncated name")? as usize;
            if len & 0xc0 == 0xc0 {
                return Ok(i + 2);
            }
            i += 1 + len;
            if len == 0 {
                return Ok(i);
            }
        }
    };
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let h = msg.get(i..i + 10).context("truncated record")?;
        let (ty, len) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[8], h[9]]) as usize,
        );
        let data = msg.get(i + 10..i + 10 + len).context("truncated rdata")?;
        if ty == TYPE_A && len == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]).into());
        }
        if ty == TYPE_AAAA && len == 16 {
            let mut a = [0u8; 16];
            a.copy_from_slice(data);
            addrs.push(Ipv6Addr::from(a).into());
        }
        i += 10 + len;
    }
    Ok((rcode, addrs))
}

/// The first `nameserver` of the pod's resolver file.
fn pod_nameserver(ns: &str) -> anyhow::Result<IpAddr> {
    let path = lab::netns_resolv_conf(ns);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse().ok())
        .with_context(|| format!("no nameserver in {}", path.display()))
}

/// Resolves `name` (record type `qtype`) from inside `ns` through its resolver.
pub fn resolve_in(
    ns: &str,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let server = SocketAddr::from((pod_nameserver(ns)?, 53));
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let answer = netns::run_in(ns, || {
        let any: IpAddr = if server.is_ipv6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let s = UdpSocket::bind((any, 0))?;
        s.set_read_timeout(Some(timeout))?;
        s.connect(server)?;
        s.send(&dns_query_type(id, name, qtype))?;
        let mut buf = vec![0u8; 1500];
        let n = s
            .recv(&mut buf)
            .with_context(|| format!("no DNS answer from {server}"))?;
        buf.truncate(n);
        Ok(buf)
    })?;
    let (rcode, addrs) = dns_answer(id, &answer)?;
    ensure!(rcode == 0, "{server} answered rcode {rcode} for {name}");
    Ok(addrs)
}

/// The manifest file of `pod` and its text with the echo-local label removed.
fn echo_local_pod(st: &LabState, cluster: &str) -> anyhow::Result<(PathBuf, String, String)> {
    let c = st
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .with_context(|| format!("no cluster {cluster}"))?;
    for node in &c.nodes {
        for pod in &node.pods {
            if lab::in_echo_local(c, node, pod) {
                let path = c
                    .state_dir
                    .join("manifests")
                    .join(format!("pod-{}.yaml", pod.name));
                return Ok((
                    path,
                    lab::pod_manifest(c, node, pod),
                    lab::pod_manifest_without_echo_local(c, node, pod),
                ));
            }
        }
    }
    bail!("{cluster} has no {} pod", lab::ECHO_LOCAL)
}

/// Writes `text` to `path` atomically (the apiserver never sees half a manifest).
fn write_manifest(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn global(
    st: &LabState,
    src: &PodRef<'_>,
    cfg: &Config,
    vip: IpAddr,
) -> anyhow::Result<serde_json::Value> {
    let vip = SocketAddr::from((vip, lab::SERVICE_PORT));
    // Every connect must succeed, including those the LB would have bound to the source
    // pod itself (lb.rs picks another backend, or loops a lone self-backend back).
    let (per, errors) = {
        let mut per = BTreeMap::new();
        let mut errors = Vec::new();
        for _ in 0..cfg.connects {
            match ask(&src.pod.ns, vip, cfg.timeout) {
                Ok(a) => *per.entry(a.cluster).or_insert(0) += 1,
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        (per, errors)
    };
    let detail = serde_json::json!({"vip": vip.to_string(), "connects": cfg.connects,
        "per_cluster": per, "failed": errors.len()});
    ensure!(
        errors.is_empty(),
        "{} of {} connects to {vip} failed: {}",
        errors.len(),
        cfg.connects,
        errors[0]
    );
    // Every cluster with a backend besides the source pod must answer (a new connection is
    // never bound to its own client while the service has another backend).
    let missing: Vec<&str> = st
        .clusters
        .iter()
        .filter(|c| {
            c.nodes
                .iter()
                .flat_map(|n| &n.pods)
                .any(|p| p.ns != src.pod.ns)
        })
        .filter(|c| !per.contains_key(&c.name))
        .map(|c| c.name.as_str())
        .collect();
    ensure!(
        missing.is_empty(),
        "no answer from {} in {} connects ({per:?})",
        missing.join(", "),
        cfg.connects
    );
    Ok(detail)
}

fn dns(src: &PodRef<'_>, cfg: &Config, want: IpAddr) -> anyhow::Result<serde_json::Value> {
    let name = format!("{}.default.svc.clusterset.local", lab::ECHO);
    let qtype = if want.is_ipv6() { TYPE_AAAA } else { TYPE_A };
    let t = Instant::now();
    let addrs = resolve_in(&src.pod.ns, &name, qtype, cfg.timeout)?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        addrs.contains(&want),
        "{name} resolved to {addrs:?}, expected {want}"
    );
    Ok(serde_json::json!({"name": name, "addresses": addrs, "latency_ms": ms}))
}

fn affinity_local(
    src: &PodRef<'_>,
    st: &LabState,
    cfg: &Config,
    vip: IpAddr,
) -> anyhow::Result<serde_json::Value> {
    let vip = SocketAddr::from((vip, lab::SERVICE_PORT));
    let local = src.cluster.name.as_str();
    let probe = Duration::from_millis(200).min(cfg.timeout);
    let (before, errors) = distribution(&src.pod.ns, vip, 10, cfg.timeout);
    ensure!(
        errors.is_empty(),
        "connects to {vip} failed: {}",
        errors.join("; ")
    );
    ensure!(
        before.keys().all(|c| c == local),
        "affinity local left {local} while it had a local backend: {before:?}"
    );
    let (path, original, relabelled) = echo_local_pod(st, local)?;
    write_manifest(&path, &relabelled)?;
    let removed = Instant::now();
    let result = (|| {
        let failover = loop {
            if let Ok(a) = ask(&src.pod.ns, vip, probe) {
                if a.cluster != local {
                    break removed.elapsed();
                }
            }
            ensure!(
                removed.elapsed() < Duration::from_secs(10),
                "{vip} still answers only from {local} 10 s after its local backend left"
            );
        };
        let (after, errors) = distribution(&src.pod.ns, vip, 10, cfg.timeout);
        ensure!(
            errors.is_empty() && !after.contains_key(local),
            "after failover {vip} answered {after:?} (failures: {errors:?})"
        );
        Ok((failover, after))
    })();
    // Restore, then wait for traffic to come back.
    write_manifest(&path, &original)?;
    let restored = Instant::now();
    let (failover, after) = result?;
    let failback = loop {
        if ask(&src.pod.ns, vip, probe).is_ok_and(|a| a.cluster == local) {
            break restored.elapsed();
        }
        ensure!(
            restored.elapsed() < Duration::from_secs(10),
            "{vip} did not come back to {local} within 10 s of the restore"
        );
    };
    Ok(
        serde_json::json!({"vip": vip.to_string(), "before": before, "after": after,
        "failover_ms": failover.as_secs_f64() * 1000.0,
        "failback_ms": failback.as_secs_f64() * 1000.0}),
    )
}

fn backends(st: &LabState, src: &PodRef<'_>) -> Option<u64> {
    let addr = src.node.agent.as_ref()?.health_addr;
    let (code, body) = lab::http_get(st, addr, "/status")?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["services"]["backends"].as_u64()
}

/// A pod of another cluster that backs only `echo` (not `echo-local`, which the affinity
/// check relies on): what the propagation check removes and restores. `None` when every
/// other cluster has a single pod.
fn propagation_target<'a>(
    src: &PodRef<'_>,
    st: &'a LabState,
) -> Option<(&'a Cluster, &'a Node, &'a Pod)> {
    st.clusters
        .iter()
        .filter(|c| c.name != src.cluster.name)
        .flat_map(|c| {
            c.nodes
                .iter()
                .flat_map(move |n| n.pods.iter().map(move |p| (c, n, p)))
        })
        .find(|(c, n, p)| !lab::in_echo_local(c, n, p))
}

fn propagation(src: &PodRef<'_>, st: &LabState, cfg: &Config) -> anyhow::Result<serde_json::Value> {
    let (c, node, pod) = propagation_target(src, st)
        .context("no pod in another cluster that backs only the echo service")?;
    let path = c
        .state_dir
        .join("manifests")
        .join(format!("pod-{}.yaml", pod.name));
    let original = lab::pod_manifest(c, node, pod);
    let mut times = Vec::new();
    let result = (|| {
        for round in 0..cfg.propagation_rounds * 2 {
            let start = backends(st, src).context("the source node's agent /status")?;
            if round % 2 == 0 {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            } else {
                write_manifest(&path, &original)?;
            }
            let t = Instant::now();
            loop {
                if backends(st, src).is_some_and(|b| b != start) {
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(10),
                    "{}/{} {} not reflected in {}'s LB table within 10 s",
                    c.name,
                    pod.name,
                    if round % 2 == 0 { "removal" } else { "restore" },
                    src.node.name
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    })();
    if !path.exists() {
        write_manifest(&path, &original)?;
    }
    result?;
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(
        serde_json::json!({"changed": format!("{}/{}", c.name, pod.name), "updates": times.len(),
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": times[times.len() - 1]}),
    )
}

/// Runs the service checks from the first pod of the first cluster.
pub fn run(st: &LabState, cfg: &Config, filter: Option<&str>) -> anyhow::Result<Vec<Check>> {
    let pods = st.pods();
    let src = pods.first().context("the lab has no pods")?;
    type F<'a> = Box<dyn Fn() -> anyhow::Result<serde_json::Value> + 'a>;
    let mut plan: Vec<(String, F<'_>)> = Vec::new();
    let v4: Vec<(String, F<'_>)> = vec![
        (
            format!("service global {} → {}", src.label(), lab::ECHO),
            Box::new(|| global(st, src, cfg, lab::ECHO_VIP.into())),
        ),
        (
            format!(
                "service dns {} → {}.default.svc.clusterset.local",
                src.label(),
                lab::ECHO
            ),
            Box::new(|| dns(src, cfg, lab::ECHO_VIP.into())),
        ),
        (
            format!(
                "service affinity-local {} → {}",
                src.label(),
                lab::ECHO_LOCAL
            ),
            Box::new(|| affinity_local(src, st, cfg, lab::ECHO_LOCAL_VIP.into())),
        ),
    ];
    // IPv6-only labs have no IPv4 VIP (their DNS answers AAAA only).
    if st.ip_family.has_v4() {
        plan.extend(v4);
    }
    // Dual-stack and IPv6-only labs: the same over the IPv6 VIPs and DNS AAAA (names say
    // `ipv6`).
    if st.ip_family.has_v6() {
        plan.push((
            format!("service ipv6 global {} → {}", src.label(), lab::ECHO),
            Box::new(|| global(st, src, cfg, lab::ECHO_VIP6.into())),
        ));
        plan.push((
            format!(
                "service ipv6 dns {} → {}.default.svc.clusterset.local AAAA",
                src.label(),
                lab::ECHO
            ),
            Box::new(|| dns(src, cfg, lab::ECHO_VIP6.into())),
        ));
        plan.push((
            format!(
                "service ipv6 affinity-local {} → {}",
                src.label(),
                lab::ECHO_LOCAL
            ),
            Box::new(|| affinity_local(src, st, cfg, lab::ECHO_LOCAL_VIP6.into())),
        ));
    }
    // Needs a second pod in another cluster (labs with one pod per cluster have none).
    if cfg.propagation_rounds > 0 && propagation_target(src, st).is_some() {
        plan.push((
            format!("service propagation → {}'s agent", src.label()),
            Box::new(|| propagation(src, st, cfg)),
        ));
    }
    Ok(plan
        .into_iter()
        .filter(|(name, _)| filter.is_none_or(|f| name.contains(f)))
        .map(|(name, f)| {
            let r = f();
            Check {
                name,
                ok: r.is_ok(),
                error: r.as_ref().err().map(|e| format!("{e:#}")),
                detail: r.unwrap_or_default(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_round_trip_of_a_crafted_answer() {
        let q = dns_query_type(7, "echo.default.svc.clusterset.local", TYPE_A);
        // Answer = query with QR set, one A record pointing back at the question name.
        let mut a = q.clone();
        a[2] |= 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 172, 20, 0, 10]);
        assert_eq!(
            dns_answer(7, &a).unwrap(),
            (0, vec![Ipv4Addr::new(172, 20, 0, 10).into()])
        );
        // AAAA: the question says type 28, the answer carries 16 bytes.
        let q6 = dns_query_type(9, "echo.default.svc.clusterset.local", TYPE_AAAA);
        assert_eq!(&q6[q6.len() - 4..], &[0, 28, 0, 1]);
        let mut a6 = q6.clone();
        a6[2] |= 0x80;
        a6[7] = 1;
        a6.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1, 0, 0, 0, 5, 0, 16]);
        a6.extend_from_slice(&lab::ECHO_VIP6.octets());
        assert_eq!(
            dns_answer(9, &a6).unwrap(),
            (0, vec![IpAddr::from(lab::ECHO_VIP6)])
        );
        assert!(dns_answer(8, &a).is_err());
        assert!(dns_answer(7, &a[..a.len() - 3]).is_err());
    }
}
