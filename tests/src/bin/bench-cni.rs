//! Pod ADD → attached and routable, for `clustermesh-cni` beside Debian's `ptp` in the same
//! run, and the agent's idle CPU with 200 local pods against its idle CPU with one.
//!
//! Brings up a lab (`--clusters 2 --nodes 1 --pods 1`), measures c1/n1's agent CPU over an
//! idle window (baseline), then adds 100 pods per plugin by hand, alternating the plugins
//! (each with its own address range): plugin ADD in the node's namespace, a Pod manifest
//! with the returned IP into c1's source, then the time until c1/n1's agent reports the pod
//! attached (`/status`, republished on every pod change) and until the c2 pod's ping gets
//! an answer. Prints p50/p99 per plugin and the ratio to ptp (PASS ≤ 1.25× at p50). Then,
//! with 201 local pods and no churn, the agent's CPU over the same idle window: PASS when
//! it stays within 1.5× the one-pod baseline plus 2 ms/s (no cost that grows with pods, as
//! a poll would). DEL for every pod and `lab down` at the end, also on failure.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/bench-cni [--pods 100] [--idle 10s]
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clustermesh_tests::process::{find_binary, proc_cpu};
use serde_json::{json, Value};

struct Args {
    pods: usize,
    idle: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        pods: 100,
        idle: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--pods" => a.pods = v.parse()?,
            "--idle" => a.idle = humantime::parse_duration(&v)?,
            _ => bail!("unknown flag {k} (--pods N, --idle DURATION)"),
        }
    }
    // Each plugin's range in the node's /24 holds 100 addresses (see `conf`).
    ensure!((1..=100).contains(&a.pods), "--pods must be 1..=100");
    Ok(a)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plugin {
    Ptp,
    Clustermesh,
}

struct Lab {
    bin: PathBuf,
    dir: PathBuf,
    state: Value,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["lab", "down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

impl Lab {
    fn s(&self, path: &[&str]) -> anyhow::Result<String> {
        let mut v = &self.state;
        for p in path {
            v = match p.parse::<usize>() {
                Ok(i) => &v[i],
                Err(_) => &v[*p],
            };
        }
        v.as_str()
            .map(str::to_owned)
            .with_context(|| format!("lab.json has no {}", path.join(".")))
    }

    fn status(&self) -> anyhow::Result<Value> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.s(&["router_ns"])?])
            .args(["curl", "-sf", "--max-time", "1"])
            .arg(format!(
                "http://{}/status",
                self.s(&["clusters", "0", "nodes", "0", "agent", "health_addr"])?
            )))?;
        Ok(serde_json::from_str(&out)?)
    }

    fn agent_cpu(&self) -> anyhow::Result<Duration> {
        let pid = self.state["clusters"][0]["nodes"][0]["agent"]["pid"]
            .as_u64()
            .context("agent pid")?;
        u32::try_from(pid)
            .ok()
            .and_then(proc_cpu)
            .with_context(|| format!("agent process {pid} is gone"))
    }
}

struct Sample {
    plugin_exec: Duration,
    attached: Duration,
    routable: Duration,
}

fn cni_dir(bin: &Path) -> PathBuf {
    bin.parent().map(Path::to_owned).unwrap_or_default()
}

/// Each plugin's network: addresses from the node's pod CIDR (the apiserver exports no
/// endpoint outside its cluster's CIDRs, so the agent would never see the pod), in two
/// disjoint ranges above the lab's own pods (`.11` up): `ptp` from `.20` to `.119`,
/// clustermesh-cni from `.120`.
fn conf(p: Plugin, lab: &Lab) -> anyhow::Result<Value> {
    let cidr = lab.s(&["clusters", "0", "nodes", "0", "pod_cidr"])?;
    let (net, len) = cidr.split_once('/').context("node pod CIDR")?;
    ensure!(
        len == "24",
        "bench-cni expects a /24 node pod CIDR, the lab has {cidr}"
    );
    let o = net.parse::<std::net::Ipv4Addr>()?.octets();
    let at = |last: u8| std::net::Ipv4Addr::new(o[0], o[1], o[2], last).to_string();
    Ok(match p {
        Plugin::Ptp => json!({
            "cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp", "mtu": 1450,
            "ipam": {"type": "host-local",
                     "ranges": [[{"subnet": cidr, "rangeStart": at(20), "rangeEnd": at(119), "gateway": at(1)}]],
                     "routes": [{"dst": "10.0.0.0/8"}],
                     "dataDir": lab.dir.join("bench-ptp")},
        }),
        Plugin::Clustermesh => json!({
            "cniVersion": "1.1.0", "name": "bench-cm", "type": "clustermesh-cni",
            "podCIDR": cidr, "rangeStart": at(120), "stateDir": lab.dir.join("bench-cm"), "mtu": 1450,
            "routes": ["10.0.0.0/8"],
        }),
    })
}

fn invoke(lab: &Lab, p: Plugin, command: &str, pod_ns: &str) -> anyhow::Result<Value> {
    let plugin = match p {
        Plugin::Ptp => PathBuf::from("/usr/lib/cni/ptp"),
        Plugin::Clustermesh => cni_dir(&lab.bin).join("clustermesh-cni"),
    };
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.s(&["clusters", "0", "nodes", "0", "ns"])?,
        ])
        .arg(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod_ns)
        .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_PATH",
            format!("/usr/lib/cni:{}", cni_dir(&lab.bin).display()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf(p, lab)?.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{p:?} {command}: {text}");
    Ok(serde_json::from_str(text.trim()).unwrap_or(Value::Null))
}

fn add_pod(lab: &Lab, p: Plugin, k: usize) -> anyhow::Result<Sample> {
    let id = lab.s(&["id"])?;
    let pod_ns = format!("cm-{id}-c1-n1-b{k}");
    run(Command::new("ip").args(["netns", "add", &pod_ns]))?;
    let t0 = Instant::now();
    let r = invoke(lab, p, "ADD", &pod_ns)?;
    let plugin_exec = t0.elapsed();
    let ip = r["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("no address in the result")?
        .to_owned();
    let name = format!("bench-{k}");
    let manifests = Path::new(&lab.s(&["clusters", "0", "state_dir"])?).join("manifests");
    std::fs::write(
        manifests.join(format!("pod-{name}.yaml")),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: bench\nspec:\n  nodeName: n1\nstatus:\n  phase: Running\n  hostIP: {}\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
            lab.s(&["clusters", "0", "nodes", "0", "ip"])?
        ),
    )?;
    let attached = loop {
        let s = lab.status()?;
        let done = s["datapath"]["pods"].as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p["ip"] == ip.as_str() && p["attached"] == true)
        });
        if done {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "{ip} not attached after 20 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let src = lab.s(&["clusters", "1", "nodes", "0", "pods", "0", "ns"])?;
    let routable = loop {
        let ok = Command::new("ip")
            .args(["netns", "exec", &src, "ping", "-c1", "-W", "0.1", &ip])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "{ip} not routable after 20 s"
        );
    };
    Ok(Sample {
        plugin_exec,
        attached,
        routable,
    })
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn idle_cpu(lab: &Lab, window: Duration) -> anyhow::Result<f64> {
    let c0 = lab.agent_cpu()?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let c1 = lab.agent_cpu()?;
    Ok((c1 - c0).as_secs_f64() * 1e3 / t0.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let bin = find_binary("clustermesh")?;
    ensure!(
        cni_dir(&bin).join("clustermesh-cni").exists(),
        "clustermesh-cni is not built beside {}",
        bin.display()
    );
    // The machine's one lab turn, as every lab suite takes it: a lab test beside this
    // bench would share its 2 cores and the host's underlay route.
    let _turn = clustermesh_tests::lab::LabTurn::take("bench-cni")?;
    let root = tempfile::Builder::new().prefix("cm-bench-cni").tempdir()?;
    let dir = root.path().join("lab");
    run(Command::new(&bin)
        .args([
            "lab",
            "up",
            "--clusters",
            "2",
            "--nodes",
            "1",
            "--pods",
            "1",
            "--dir",
        ])
        .arg(&dir))?;
    let state: Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json"))?)?;
    let lab = Lab { bin, dir, state };

    println!("idle agent, 1 local pod: measuring {:?}", a.idle);
    let base_cpu = idle_cpu(&lab, a.idle)?;

    let mut samples: Vec<(Plugin, Sample)> = Vec::new();
    for k in 0..2 * a.pods {
        let p = if k % 2 == 0 {
            Plugin::Ptp
        } else {
            Plugin::Clustermesh
        };
        samples.push((p, add_pod(&lab, p, k)?));
    }
    let row = |p: Plugin| -> (Duration, String) {
        let mut exec: Vec<Duration> = samples
            .iter()
            .filter(|s| s.0 == p)
            .map(|s| s.1.plugin_exec)
            .collect();
        let mut att: Vec<Duration> = samples
            .iter()
            .filter(|s| s.0 == p)
            .map(|s| s.1.attached)
            .collect();
        let mut rt: Vec<Duration> = samples
            .iter()
            .filter(|s| s.0 == p)
            .map(|s| s.1.routable)
            .collect();
        let p50 = pct(&mut rt, 0.5);
        (
            p50,
            format!(
                "{:<16} plugin ADD p50 {:>9} p99 {:>9} | attached p50 {:>9} p99 {:>9} | routable from c2 p50 {:>9} p99 {:>9}",
                format!("{p:?}"),
                ms(pct(&mut exec, 0.5)),
                ms(pct(&mut exec, 0.99)),
                ms(pct(&mut att, 0.5)),
                ms(pct(&mut att, 0.99)),
                ms(p50),
                ms(pct(&mut rt, 0.99)),
            ),
        )
    };
    let (ptp50, ptp_row) = row(Plugin::Ptp);
    let (cm50, cm_row) = row(Plugin::Clustermesh);
    println!(
        "pod ADD → attached and routable, {} pods per plugin:",
        a.pods
    );
    println!("  {ptp_row}");
    println!("  {cm_row}");
    let ratio = cm50.as_secs_f64() / ptp50.as_secs_f64().max(1e-9);
    println!(
        "  clustermesh-cni / ptp (routable p50): {ratio:.2}× → {}",
        if ratio <= 1.25 { "PASS" } else { "FAIL" }
    );

    let pods = lab.status()?["datapath"]["pods"]
        .as_array()
        .map_or(0, Vec::len);
    println!("idle agent, {pods} local pods: measuring {:?}", a.idle);
    let busy_cpu = idle_cpu(&lab, a.idle)?;
    let ok = busy_cpu <= base_cpu * 1.5 + 2.0;
    println!(
        "agent CPU idle: {base_cpu:.2} ms/s with 1 pod, {busy_cpu:.2} ms/s with {pods} pods → {}",
        if ok {
            "PASS (no periodic cost per pod)"
        } else {
            "FAIL"
        }
    );

    let id = lab.s(&["id"])?;
    for (k, (p, _)) in samples.iter().enumerate() {
        let _ = invoke(&lab, *p, "DEL", &format!("cm-{id}-c1-n1-b{k}"));
    }
    drop(lab);
    Ok(())
}
