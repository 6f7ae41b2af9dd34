//! `lab down`: stops every process of a lab and removes its namespaces, links, pins, mounts
//! and directory, also after a partial `up`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::state;
use super::{cni, netns, plan, route_lock, DirArgs};

/// Every PID number in a JSON document under a key named like a PID (old state formats).
fn pids_in(v: &serde_json::Value, out: &mut Vec<u32>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "pid" || k.ends_with("_pid") {
                    if let Some(p) = v.as_u64() {
                        out.push(p as u32);
                    }
                }
                pids_in(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| pids_in(v, out)),
        _ => {}
    }
}

fn signal_all(pids: &[u32], sig: nix::sys::signal::Signal) {
    for &pid in pids {
        // Our children lead their own process group (etcd lives in the apiserver's).
        let p = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::killpg(p, sig).is_err() {
            let _ = nix::sys::signal::kill(p, sig);
        }
    }
}

/// `lab down`: stops every process, removes namespaces, the root veth, pins and the
/// directory. Works from whatever `lab.json` recorded, and sweeps `cm-<id>-*` namespaces
/// and their processes in case `up` died between a step and its record.
pub fn down(a: DirArgs) -> anyhow::Result<()> {
    let path = state::state_file(&a.dir);
    let Ok(bytes) = std::fs::read(&path) else {
        if a.dir.exists() {
            std::fs::remove_dir_all(&a.dir)
                .with_context(|| format!("removing {}", a.dir.display()))?;
        }
        println!("no lab in {}", a.dir.display());
        return Ok(());
    };
    let raw: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let id = raw["id"].as_str().map(str::to_owned);
    let mut pids = Vec::new();
    if id.is_none() {
        // A lab of an older version (loopback control planes, no namespaces).
        pids_in(&raw, &mut pids);
    }
    let namespaces: Vec<String> = match &id {
        Some(id) => {
            let prefix = plan::ns_prefix(id);
            netns::list()?
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect()
        }
        None => Vec::new(),
    };
    // Everything `up` started runs inside one of its namespaces (`ip netns exec`), etcd too,
    // so the namespaces name the processes; a recorded PID could have been reused since.
    for ns in &namespaces {
        pids.extend(netns::pids(ns));
    }
    pids.sort_unstable();
    pids.dedup();
    let pids: Vec<u32> = pids.into_iter().filter(|p| netns::alive(*p)).collect();
    // CNI DEL for every pod, as a runtime does when it removes a sandbox (the plugin frees
    // its addresses and removes its interfaces); failures are reported, the rest goes on.
    if let Ok(st) = serde_json::from_value::<state::LabState>(raw.clone()) {
        // Only where both namespaces exist (after a partial `up`, some were never made).
        for p in st
            .pods()
            .into_iter()
            .filter(|p| namespaces.contains(&p.node.ns) && namespaces.contains(&p.pod.ns))
        {
            if let Err(e) = cni::del(&st, p.node, p.pod) {
                eprintln!("⚠️  {e:#}");
            }
        }
    }
    signal_all(&pids, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| netns::alive(*p)) && Instant::now() < deadline {
        for &p in &pids {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(p as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stubborn: Vec<u32> = pids.iter().copied().filter(|p| netns::alive(*p)).collect();
    signal_all(&stubborn, nix::sys::signal::Signal::SIGKILL);
    // Anything that entered a namespace meanwhile (e.g. `ip netns exec` by hand).
    for ns in &namespaces {
        for p in netns::pids(ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Pins go with the bpffs mount.
    let dir = std::fs::canonicalize(&a.dir).unwrap_or_else(|_| a.dir.clone());
    let bpffs = dir.join("bpf");
    if netns::is_mount_point(&bpffs) {
        let out = std::process::Command::new("umount")
            .arg(&bpffs)
            .output()
            .context("running umount")?;
        if !out.status.success() {
            bail!(
                "unmounting {} failed: {}",
                bpffs.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if let Some(id) = &id {
        // Under the route lock: a `lab up` checking the route meanwhile sees it either
        // still there or gone, never half removed.
        let link = plan::root_link(id);
        if netns::ip(&["link", "show", "dev", &link]).is_ok() {
            let _route = route_lock::take(id)?;
            netns::ip(&["link", "del", &link])?;
        }
    }
    // Deleting a namespace deletes its interfaces; pods first, the router last.
    let mut namespaces = namespaces;
    namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in &namespaces {
        netns::ip(&["netns", "del", ns])?;
    }
    // The pods' resolver files (only the lab's own namespaces' directories).
    if let Some(id) = &id {
        let prefix = plan::ns_prefix(id);
        if let Ok(rd) = std::fs::read_dir("/etc/netns") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path().join("resolv.conf"));
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        // `up` created it if nobody had; gone again only if empty (no other lab's files).
        let _ = std::fs::remove_dir("/etc/netns");
    }
    std::fs::remove_dir_all(&a.dir).with_context(|| format!("removing {}", a.dir.display()))?;
    println!(
        "🧹 Lab {} removed: {} processes stopped, {} namespaces deleted",
        id.as_deref().unwrap_or("(old format)"),
        pids.len(),
        namespaces.len()
    );
    Ok(())
}
