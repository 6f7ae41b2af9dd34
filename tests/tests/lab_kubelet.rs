//! The lab's kubelet (`clustermesh lab kubelet`, `cli/src/lab/kubelet.rs`) on its own, without
//! a lab: a pod of two containers (`sleep`), one killed and restarted while the other keeps
//! running, then the kubelet killed and both containers gone with it (no orphan). The lab's
//! control planes run under it; the fault suite checks the same on etcd and the apiserver.
//!
//! Needs util-linux's `setpriv` and the workspace binaries (`cargo build --workspace --bins`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use clustermesh_tests::process::find_binary;

/// The children of `parent`: (pid, command line).
fn children(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the `(comm)`: state, ppid.
        let mut rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace())
            .into_iter()
            .flatten();
        let state = rest.next().unwrap_or("X");
        let ppid: u32 = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent && state != "Z" {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            out.push((pid, cmd.trim().to_owned()));
        }
    }
    out.sort();
    out
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        ensure!(t.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(pid: u32) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("SIGKILL {pid}"))
}

fn pid_of(kids: &[(u32, String)], cmd: &str) -> Option<u32> {
    kids.iter().find(|(_, c)| c == cmd).map(|(p, _)| *p)
}

#[test]
fn a_dead_container_is_restarted_and_the_pod_ends_as_a_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pod = dir.path();
    let log = |n: &str| pod.join(format!("{n}.log")).display().to_string();
    let spec = serde_json::json!([
        {"name": "etcd", "argv": ["sleep", "300"], "env": {"POD_IP": "198.18.1.2"}, "log": log("etcd")},
        {"name": "apiserver", "argv": ["sleep", "301"], "env": {}, "log": log("apiserver")},
    ]);
    std::fs::write(pod.join("containers.json"), serde_json::to_vec(&spec)?)?;
    let kubelet_log = pod.join("kubelet.log");
    let mut kubelet = Command::new(find_binary("clustermesh")?)
        .args(["lab", "kubelet", "--pod"])
        .arg(pod)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&kubelet_log)?)
        .spawn()?;
    let k = kubelet.id();
    let result = (|| -> Result<()> {
        // setpriv execs the container, so each container is the kubelet's child.
        let kids = wait_for("both containers started", Duration::from_secs(10), || {
            let kids = children(k);
            (kids.len() == 2).then_some(kids)
        })?;
        let etcd = pid_of(&kids, "sleep 300").context("no etcd container")?;
        let api = pid_of(&kids, "sleep 301").context("no apiserver container")?;
        let env = std::fs::read(format!("/proc/{etcd}/environ"))?;
        ensure!(
            env.split(|b| *b == 0).any(|v| v == b"POD_IP=198.18.1.2"),
            "the container did not get its env"
        );
        // One container dies: it alone is started again.
        kill(etcd)?;
        let t = Instant::now();
        let again = wait_for("etcd restarted", Duration::from_secs(5), || {
            pid_of(&children(k), "sleep 300").filter(|p| *p != etcd)
        })?;
        let restarted = t.elapsed();
        ensure!(
            pid_of(&children(k), "sleep 301") == Some(api),
            "the other container was touched"
        );
        let text = std::fs::read_to_string(&kubelet_log)?;
        ensure!(
            text.contains("container etcd exited (signal: 9 (SIGKILL))"),
            "{text}"
        );
        // The pod ends: both containers go with their kubelet, even on SIGKILL.
        kill(k)?;
        for pid in [again, api] {
            wait_for(
                "a container gone with its kubelet",
                Duration::from_secs(5),
                || {
                    (!Path::new(&format!("/proc/{pid}")).exists()
                        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .is_ok_and(|s| s.contains(") Z")))
                    .then_some(())
                },
            )?;
        }
        println!(
            "container restarted in {} ms; both containers ended with the kubelet",
            restarted.as_millis()
        );
        Ok(())
    })();
    let _ = kubelet.kill();
    let _ = kubelet.wait();
    result
}
