//! Issue 5 acceptance over the real lab (2 clusters × 2 nodes × 2 pods, eBPF datapath), with
//! c2 exporting its global services as EndpointSlices only (`lab up --service-v2
//! c2=only-endpointslice`, issue 20): c1's agents take c2's backends from its slices.
//!
//! * `curl` by name from a c1 pod: `echo.default.svc.clusterset.local` resolves through the
//!   pod's own resolver (`/etc/netns/<pod>/resolv.conf` → the agent's DNS on the node) and
//!   repeated connections to the global VIP land in both clusters;
//! * `clustermesh connectivity test --filter service`: distribution over the global VIP,
//!   DNS, affinity-local failover (the last local backend of `echo-local` relabelled away;
//!   time to the first remote-only answer, target < 1 s) and the propagation of remote
//!   backend changes to the c1 agent's LB table (p99 over 20 updates);
//! * `lab down` removes the pods' resolver files.
//!
//! Needs root, iproute2, curl and the workspace binaries (`cargo build --workspace --bins`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use clustermesh_tests::lab::{connectivity_passes, curl_json, lab_cni, run, Lab};
use serde_json::Value;

/// `curl` of `url` from inside `ns`: the echo answer, if any.
fn curl(ns: &str, url: &str) -> Option<Value> {
    curl_json(ns, url, "1")
}

#[test]
fn lab_global_services_dns_affinity_failover_and_propagation() -> Result<()> {
    let mut lab = Lab::new("cm-lab-svc")?;
    let (_, state) = lab.up_mesh(
        2,
        &[
            "--cni",
            &lab_cni("clustermesh"),
            "--service-v2",
            "c2=only-endpointslice",
        ],
    )?;
    connectivity_passes(&lab)?;
    let id = state["id"].as_str().context("id")?.to_owned();
    let c1 = &state["clusters"][0];
    ensure!(
        state["clusters"][1]["service_v2"] == "only-endpointslice",
        "lab.json does not record c2's mode: {}",
        state["clusters"][1]
    );

    // c1's agent reads c2 in endpointslices-only mode: its services from slices, none from
    // services/v1 (so everything below runs on backends folded from EndpointSlices).
    let health = c1["nodes"][0]["agent"]["health_addr"]
        .as_str()
        .context("agent health")?;
    let router = state["router_ns"].as_str().context("router")?;
    let out = run(Command::new("ip")
        .args(["netns", "exec", router, "curl", "-sf", "--max-time", "1"])
        .arg(format!("http://{health}/status")))?;
    let status: Value = serde_json::from_str(&out)?;
    let c2 = status["remote-clusters"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "c2"))
        .with_context(|| format!("c2 not in c1's agent status: {out}"))?;
    ensure!(
        c2["config"]["endpoint-slices-export-mode"] == "endpointslices-only"
            && c2["num-shared-services"] == 0
            && c2["num-endpoint-slices"].as_u64().unwrap_or(0) > 0,
        "c1's agent does not read c2 from EndpointSlices only: {c2}"
    );
    // A c1 pod that is not the echo-local backend (the last pod of the last node).
    let src_ns = c1["nodes"][0]["pods"][0]["ns"]
        .as_str()
        .context("pod ns")?
        .to_owned();

    // A user's view: curl by the clusterset name, through the pod's resolver.
    let resolv = Path::new("/etc/netns").join(&src_ns).join("resolv.conf");
    ensure!(
        std::fs::read_to_string(&resolv)?.contains("nameserver 169.254.1.1"),
        "{} does not point at the agent's DNS",
        resolv.display()
    );
    let mut per_cluster: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..40 {
        match curl(&src_ns, "http://echo.default.svc.clusterset.local/") {
            Some(a) => {
                *per_cluster
                    .entry(a["cluster"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1
            }
            None => failed += 1,
        }
    }
    println!("curl echo.default.svc.clusterset.local ×40 from {src_ns}: {per_cluster:?}, {failed} failed");
    ensure!(
        per_cluster.contains_key("c1") && per_cluster.contains_key("c2"),
        "the global service did not answer from both clusters: {per_cluster:?}"
    );

    // The connectivity test's service checks, with 20 timed remote updates.
    let out = Command::new(&lab.bin)
        .args([
            "connectivity",
            "test",
            "-o",
            "json",
            "--filter",
            "service",
            "--propagation-rounds",
            "10",
            "--dir",
        ])
        .arg(&lab.dir)
        .output()?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "connectivity test output: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let services = report["services"].as_array().context("services")?;
    for c in services {
        println!("{}: ok={} {}", c["name"], c["ok"], c["detail"]);
    }
    let check = |prefix: &str| -> Result<&Value> {
        let c = services
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .with_context(|| format!("no check {prefix:?}"))?;
        ensure!(c["ok"] == true, "{prefix} failed: {}", c["error"]);
        Ok(&c["detail"])
    };
    let global = check("service global")?;
    println!("global VIP distribution: {}", global["per_cluster"]);
    let dns = check("service dns")?;
    ensure!(dns["addresses"][0] == "172.20.0.10", "dns: {dns}");
    let affinity = check("service affinity-local")?;
    let failover = affinity["failover_ms"].as_f64().context("failover_ms")?;
    println!("affinity-local failover: {failover:.1} ms (target < 1000 ms)");
    ensure!(
        Duration::from_secs_f64(failover / 1000.0) < Duration::from_secs(1),
        "failover took {failover:.1} ms"
    );
    let prop = check("service propagation")?;
    println!(
        "remote service update → c1 LB table: p50 {} ms, p99 {} ms over {} updates",
        prop["p50_ms"], prop["p99_ms"], prop["updates"]
    );
    ensure!(prop["updates"] == 20, "propagation: {prop}");

    // lab down removes the resolver files of its pods.
    run(&mut lab.cli(&["lab", "down"]))?;
    lab.down = true;
    let prefix = format!("cm-{id}-");
    let left: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    ensure!(left.is_empty(), "/etc/netns entries left: {left:?}");
    Ok(())
}
