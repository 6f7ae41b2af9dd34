//! Issue 19's fault table over one real lab (2 clusters × 2 nodes × 1 pod, default settings):
//! each fault is made the way it happens between datacenters (a certificate rotated or
//! expired, an etcd or apiserver or agent killed, a remote etcd wiped, a cut link), its
//! figures are measured, printed and asserted, and the table is printed at the end.
//!
//! The cases share the lab (bringing one up takes most of a minute); each first waits for the
//! mesh to be whole again, so one failing case does not hide the others. The order keeps
//! the longest (the 30 s partition) last.
//!
//! Entries are counted in every agent's `/status`: the ipcache map's fill and each remote's
//! cached endpoints, sampled every ~150 ms while a fault lasts; "kept" means no sample in any
//! agent was below the count before the fault.
//!
//! Each cluster's control plane is the apiserver Deployment's pod as `lab up` runs it: the
//! etcd sidecar and the apiserver under the lab's kubelet (`<state>/pods/clustermesh-apiserver/`,
//! `clustermesh lab kubelet`), which restarts a container that dies; the certificates every
//! process reads are its pod's Secret files, which `clustermesh certs rotate` writes again.
//!
//! The wipe case relies on the users file `clustermesh connect` writes
//! (`<state>/cluster-users.yaml`, the apiserver's `cluster-users-config-path`): an etcd that
//! lost its data gets the peers' `remote-<c>` users back from its apiserver. It also asserts
//! that c2's own agents keep c2's own entries while their etcd is empty (the agent's local
//! reader waits for its synced canaries again before it relists).
//!
//! Needs root, iproute2, curl, etcdctl, openssl, setpriv (`scripts/install-deps.sh`) and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use clustermesh_tests::lab::{
    alive, argv_of, respawn, router_get, router_status, run, signal, wait_gone, Lab,
};
use serde_json::Value;

/// One row of the table.
struct Row {
    fault: &'static str,
    expected: &'static str,
    measured: String,
    ok: bool,
}

/// The lab and what the cases need from its `lab.json`.
struct Mesh {
    lab: Lab,
    state: Value,
    router: String,
}

/// An agent: where it listens and what it runs as.
#[derive(Clone)]
struct AgentRef {
    label: String,
    health: String,
    ns: String,
    pid: u32,
    log: PathBuf,
}

impl Mesh {
    fn cluster(&self, i: usize) -> &Value {
        &self.state["clusters"][i]
    }

    fn state_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(self.cluster(i)["state_dir"].as_str().unwrap_or_default())
    }

    fn certs_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(self.cluster(i)["certs_dir"].as_str().unwrap_or_default())
    }

    fn agents(&self) -> Vec<AgentRef> {
        let mut out = Vec::new();
        for c in self.state["clusters"].as_array().into_iter().flatten() {
            for n in c["nodes"].as_array().into_iter().flatten() {
                let a = &n["agent"];
                out.push(AgentRef {
                    label: format!(
                        "{}/{}",
                        c["name"].as_str().unwrap_or(""),
                        n["name"].as_str().unwrap_or("")
                    ),
                    health: a["health_addr"].as_str().unwrap_or_default().to_owned(),
                    ns: n["ns"].as_str().unwrap_or_default().to_owned(),
                    pid: a["pid"].as_u64().unwrap_or(0) as u32,
                    log: PathBuf::from(a["log"].as_str().unwrap_or_default()),
                });
            }
        }
        out
    }

    fn get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        router_get(&self.router, addr, path)
    }

    fn status_of(&self, addr: &str) -> Option<Value> {
        router_status(&self.router, addr)
    }

    /// `clustermesh <args>` (without the lab's `--dir`).
    fn cm(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.lab.bin);
        c.args(args);
        c
    }

    /// `clustermesh status -o json` of cluster `i`, as a user runs it.
    fn cm_status(&self, i: usize) -> Result<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.router])
            .arg(&self.lab.bin)
            .args(["status", "-o", "json", "--state-dir"])
            .arg(self.state_dir(i))
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "clustermesh status: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Every agent: (ipcache entries, endpoints cached per remote cluster).
    fn entries(&self) -> Entries {
        entries(&self.router, &self.agents())
    }

    /// [`Self::entries`] once two reads 500 ms apart agree (a fault's "before").
    fn stable_entries(&self) -> Result<Entries> {
        let t = Instant::now();
        let mut last = self.entries();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.entries();
            if now == last && now.len() == self.agents().len() {
                return Ok(now);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "entries do not settle: {last:?} → {now:?}"
            );
            last = now;
        }
    }

    /// Waits until both apiservers are ready with every remote ready, and every agent too.
    fn wait_whole(&self, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            let clusters_ok = (0..2).all(|i| {
                self.cm_status(i).is_ok_and(|v| {
                    v["apiserver"]["ready"] == true && v["connectivity"]["not_ready"] == 0
                })
            });
            let agents_ok = clusters_ok
                && self.agents().iter().all(|a| {
                    self.get(&a.health, "/readyz")
                        .is_some_and(|(c, _)| c == 200)
                });
            if agents_ok {
                return Ok(t.elapsed());
            }
            ensure!(
                t.elapsed() < timeout,
                "the mesh is not whole after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `etcdctl` against cluster `i`'s etcd as root, from the router namespace.
    fn etcdctl(&self, i: usize, args: &[&str]) -> Result<String> {
        let certs = self.certs_dir(i);
        run(Command::new("ip")
            .args(["netns", "exec", &self.router, "etcdctl", "--endpoints"])
            .arg(
                self.cluster(i)["etcd_endpoint"]
                    .as_str()
                    .context("endpoint")?,
            )
            .arg("--cacert")
            .arg(certs.join("ca.crt"))
            .arg("--cert")
            .arg(certs.join("root.crt"))
            .arg("--key")
            .arg(certs.join("root.key"))
            .args(args)
            .env("ETCDCTL_API", "3"))
    }

    /// The serial of the certificate cluster `i`'s etcd presents to a new handshake.
    fn etcd_serial(&self, i: usize) -> Result<String> {
        let certs = self.certs_dir(i);
        let endpoint = self.cluster(i)["etcd_endpoint"]
            .as_str()
            .context("endpoint")?;
        let connect = endpoint.trim_start_matches("https://");
        let pem = run(Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router,
                "openssl",
                "s_client",
                "-connect",
                connect,
            ])
            .arg("-CAfile")
            .arg(certs.join("ca.crt"))
            .arg("-cert")
            .arg(certs.join("root.crt"))
            .arg("-key")
            .arg(certs.join("root.key"))
            .stdin(Stdio::null()))?;
        let mut x509 = Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write as _;
        x509.stdin
            .take()
            .context("stdin")?
            .write_all(pem.as_bytes())?;
        let out = x509.wait_with_output()?;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(line.trim_start_matches("serial=").to_lowercase())
    }

    /// Cluster `i`'s control-plane pod, as `lab up` materialised the apiserver Deployment.
    fn pod_dir(&self, i: usize) -> PathBuf {
        self.state_dir(i).join("pods/clustermesh-apiserver")
    }

    /// PIDs of the etcd serving cluster `i`'s data dir (the pod's emptyDir).
    fn etcd_pids(&self, i: usize) -> Vec<u32> {
        clustermesh_apiserver::etcd::serving(&self.pod_dir(i).join("var/run/etcd"))
    }

    /// PIDs of cluster `i`'s apiserver container (its `--etcd-config` is in the pod dir).
    fn apiserver_pids(&self, i: usize) -> Vec<u32> {
        let flag = format!(
            "--etcd-config={}/etc/clustermesh/etcd-config.yaml",
            self.pod_dir(i).display()
        );
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if argv_of(pid).is_ok_and(|a| {
                a.first()
                    .is_some_and(|p| p.ends_with("clustermesh-apiserver"))
                    && a.contains(&flag)
            }) && alive(pid)
            {
                out.push(pid);
            }
        }
        out
    }

    /// PID of cluster `i`'s control-plane pod (the lab's kubelet running its containers).
    fn pod_pid(&self, i: usize) -> u32 {
        self.cluster(i)["apiserver_pid"].as_u64().unwrap_or(0) as u32
    }
}

/// Per agent: (ipcache entries, endpoints cached per remote cluster).
type Entries = BTreeMap<String, (u64, BTreeMap<String, u64>)>;

fn entries(router: &str, agents: &[AgentRef]) -> Entries {
    let mut out = BTreeMap::new();
    for a in agents {
        let Some(s) = router_status(router, &a.health) else {
            continue;
        };
        let ipcache = s["datapath"]["ipcache"]["entries"].as_u64().unwrap_or(0);
        let remotes = s["remote-clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_owned(),
                    r["num-endpoints"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        out.insert(a.label.clone(), (ipcache, remotes));
    }
    out
}

/// `aa:bb:cc` → `aabbcc`, to compare with openssl's serial.
fn bare(serial: &str) -> String {
    serial
        .replace(':', "")
        .to_lowercase()
        .trim_start_matches('0')
        .to_owned()
}

/// Samples every agent's entries every ~150 ms until finished.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Entries>>,
}

impl Sampler {
    fn start(m: &Mesh) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let router = m.router.clone();
        let agents = m.agents();
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(Ordering::SeqCst) {
                samples.push(entries(&router, &agents));
                std::thread::sleep(Duration::from_millis(150));
            }
            samples
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<Entries> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// Compares samples with the entries before: the number of samples and the deficits found
/// (an agent with fewer ipcache entries or fewer cached endpoints of a remote than before).
fn deficits(before: &Entries, samples: &[Entries], allow: u64) -> Vec<String> {
    let mut out = Vec::new();
    for s in samples {
        for (agent, (ipcache, remotes)) in s {
            let Some((b_ip, b_rem)) = before.get(agent) else {
                continue;
            };
            if ipcache + allow < *b_ip {
                out.push(format!("{agent}: ipcache {ipcache} < {b_ip}"));
            }
            for (r, n) in remotes {
                if let Some(b) = b_rem.get(r) {
                    if n + allow < *b {
                        out.push(format!("{agent}: {r} endpoints {n} < {b}"));
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// Certificate rotation on both sides while connected.
fn rotation(m: &Mesh) -> Result<String> {
    let before = m.stable_entries()?;
    let ca_dir = m.lab.dir.join("ca");
    let old: Vec<String> = (0..2).map(|i| m.etcd_serial(i)).collect::<Result<_>>()?;
    // The client certificates in use and their serials before the rotation.
    let mut old_client = BTreeMap::new();
    for (file, _) in client_certs(m) {
        let serial = clustermesh_certs::describe_file(Path::new(&file))?.serial;
        old_client.insert(file, serial);
    }
    let sampler = Sampler::start(m);
    // Every process reads its certificates from its pod's Secret files; `certs rotate` on a
    // lab cluster writes them again, as a kubelet updates a mounted Secret.
    let mut pods = 0;
    for i in 0..2 {
        let out = run(m
            .cm(&["certs", "rotate", "--ca-dir"])
            .arg(&ca_dir)
            .arg("--dir")
            .arg(m.certs_dir(i)))?;
        let n = out
            .split("updated the Secret files of ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("certs rotate did not update the lab's pods: {out}"))?;
        pods += n;
    }
    ensure!(
        pods == 2 + m.agents().len(),
        "certs rotate updated {pods} pods, the lab has {} (2 control planes and the agents)",
        2 + m.agents().len()
    );
    // etcd reads its certificate at each handshake: a new one shows the new serial.
    let mut figures = Vec::new();
    for i in 0..2 {
        let now = m.etcd_serial(i)?;
        let want =
            bare(&clustermesh_certs::describe_file(&m.certs_dir(i).join("server.crt"))?.serial);
        ensure!(
            now != old[i] && bare(&now) == want,
            "c{}: etcd presents {now}, server.crt is {want}",
            i + 1
        );
        figures.push(format!(
            "c{} etcd serial {}→{}",
            i + 1,
            &old[i][..8.min(old[i].len())],
            &now[..8.min(now.len())]
        ));
    }
    // Make every client handshake again: both etcds restart (their pods' kubelet restarts
    // them).
    for i in 0..2 {
        for pid in m.etcd_pids(i) {
            signal(pid, nix::sys::signal::Signal::SIGKILL)?;
        }
    }
    let back = m.wait_whole(Duration::from_secs(60))?;
    let samples = sampler.finish();
    // Every client certificate is now the rotated one, and the one presented. A client
    // reports its serial at its next handshake, which may come after the mesh is whole
    // again (an apiserver's own etcd client reconnects on its next request): wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (rotated, unchanged, wrong) = loop {
        let mut rotated = 0;
        let mut unchanged = Vec::new();
        let mut wrong = Vec::new();
        for (file, presented) in client_certs(m) {
            let on_disk = clustermesh_certs::describe_file(Path::new(&file))?.serial;
            if old_client.get(&file) == Some(&on_disk) {
                unchanged.push(file);
                continue;
            }
            match presented {
                Some(p) if p == on_disk => rotated += 1,
                p => wrong.push(format!("{file}: presented {p:?}, file has {on_disk}")),
            }
        }
        if wrong.is_empty() || Instant::now() > deadline {
            break (rotated, unchanged, wrong);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        wrong.is_empty(),
        "old certificates still presented: {wrong:?}"
    );
    ensure!(unchanged.is_empty(), "not rotated: {unchanged:?}");
    // Both apiservers: admin-<c> (their etcd) and remote-<c> (KVStoreMesh reading the peer),
    // and each agent's local-<c>.
    ensure!(
        rotated >= 4 + m.agents().len(),
        "only {rotated} rotated client certificates reported a handshake with the new serial"
    );
    let lost = deficits(&before, &samples, 0);
    ensure!(
        lost.is_empty(),
        "routes dropped during the rotation: {lost:?}"
    );
    Ok(format!(
        "{}; Secret files of {pods} pods updated by `certs rotate`; {rotated} client certificates (apiservers, KVStoreMesh, agents) presented with their new serial; 0 dropped routes in {} samples; whole again {:.1}s after the etcd restarts",
        figures.join(", "),
        samples.len(),
        back.as_secs_f64()
    ))
}

/// Every client certificate the apiservers and agents report (`/status` certificates of
/// role client): its file and the serial its last handshake presented.
fn client_certs(m: &Mesh) -> Vec<(String, Option<String>)> {
    let reports: Vec<Value> = (0..2)
        .filter_map(|i| m.status_of(m.cluster(i)["health_addr"].as_str()?))
        .chain(m.agents().iter().filter_map(|a| m.status_of(&a.health)))
        .collect();
    let mut out = Vec::new();
    for r in &reports {
        for c in r["certificates"]["certificates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if c["role"] == "client" {
                out.push((
                    c["file"].as_str().unwrap_or_default().to_owned(),
                    c["presented-serial"].as_str().map(str::to_owned),
                ));
            }
        }
    }
    out
}

/// An expired remote certificate: c1's certificate for reading c2 expired yesterday.
fn expired(m: &Mesh) -> Result<String> {
    let before = m.stable_entries()?;
    let certs = m.certs_dir(0);
    let file = certs.join("remote-c1.crt");
    let ca = clustermesh_certs::Ca::load(&m.lab.dir.join("ca"))?;
    let yesterday = SystemTime::now() - Duration::from_secs(86_400);
    let leaf = ca.issue_client_until("remote-c1", yesterday)?;
    let not_after =
        clustermesh_certs::rfc3339(clustermesh_certs::describe(&leaf.cert_pem)?.not_after);
    let sampler = Sampler::start(m);
    leaf.write(&certs, "remote-c1")?;
    // c1 reads c2 again when c2's etcd restarts; the new handshake presents the expired one.
    for pid in m.etcd_pids(1) {
        signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    }
    let t = Instant::now();
    let hint = loop {
        let v = m.cm_status(0)?;
        let h = v["errors"]["c2"].as_str().unwrap_or_default().to_owned();
        if h.contains(&file.display().to_string()) && h.contains("expired at") {
            break h;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "status does not name the expired file: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let shown = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let samples = sampler.finish();
    ensure!(
        hint.contains(&not_after),
        "the expiry {not_after} is not named: {hint}"
    );
    let lost = deficits(&before, &samples, 0);
    ensure!(
        lost.is_empty(),
        "entries dropped while the certificate was expired: {lost:?}"
    );
    // Repair: rotate c1's certificates (a full validity), c1 reconnects on its own.
    run(m
        .cm(&["certs", "rotate", "--validity-days", "1095", "--ca-dir"])
        .arg(m.lab.dir.join("ca"))
        .arg("--dir")
        .arg(&certs))?;
    let back = m.wait_whole(Duration::from_secs(60))?;
    Ok(format!(
        "named in {:.1}s: \"{}\"; entries kept ({} samples); ready {:.1}s after rotating",
        shown.as_secs_f64(),
        hint.chars().take(140).collect::<String>(),
        samples.len(),
        back.as_secs_f64()
    ))
}

/// etcd SIGKILL (c2's etcd container): restarted by its pod's kubelet; no agent loses an
/// entry.
fn etcd_kill(m: &Mesh) -> Result<String> {
    let before = m.stable_entries()?;
    let pids = m.etcd_pids(1);
    ensure!(
        pids.len() == 1,
        "c2 has {} etcds serving its data dir",
        pids.len()
    );
    let sampler = Sampler::start(m);
    signal(pids[0], nix::sys::signal::Signal::SIGKILL)?;
    let t = Instant::now();
    let restarted = loop {
        let now = m.etcd_pids(1);
        if now.len() == 1 && now[0] != pids[0] && m.etcdctl(1, &["endpoint", "health"]).is_ok() {
            break t.elapsed();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "c2's etcd was not restarted"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let whole = m.wait_whole(Duration::from_secs(30))?;
    let samples = sampler.finish();
    let lost = deficits(&before, &samples, 0);
    ensure!(lost.is_empty(), "entries lost: {lost:?}");
    Ok(format!(
        "restarted and serving in {} ms; mesh whole after {:.1}s; 0 entries lost in {} agents × {} samples",
        restarted.as_millis(),
        whole.as_secs_f64(),
        before.len(),
        samples.len()
    ))
}

/// Agent SIGKILL mid-stream (c1/n1, with a request/response stream to c2 running).
fn agent_kill(m: &Mesh, agent_pid: &mut u32) -> Result<String> {
    let agents = m.agents();
    let a = agents.first().context("no agent")?;
    let pid = *agent_pid;
    let argv = argv_of(pid)?;
    let src = &m.state["clusters"][0]["nodes"][0]["pods"][0];
    let dst = &m.state["clusters"][1]["nodes"][0]["pods"][0];
    let load = Command::new("ip")
        .args(["netns", "exec", src["ns"].as_str().context("ns")?])
        .arg(&m.lab.bin)
        .args([
            "lab",
            "load",
            "--mode",
            "rr",
            "--duration",
            "6s",
            "--target",
        ])
        .arg(dst["ip"].as_str().context("ip")?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    wait_gone(pid, Duration::from_secs(5))?;
    let t = Instant::now();
    *agent_pid = respawn(&a.ns, &argv, &a.log)?;
    let ready = loop {
        if m.get(&a.health, "/readyz").is_some_and(|(c, _)| c == 200) {
            break t.elapsed();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "restarted agent not ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = load.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the stream broke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let gap_ms = report["max_us"].as_f64().unwrap_or(f64::MAX) / 1000.0;
    ensure!(gap_ms < 1000.0, "stream gap {gap_ms:.0} ms");
    Ok(format!(
        "agent ready {} ms after restart; stream gap {gap_ms:.1} ms over {} requests",
        ready.as_millis(),
        report["requests"]
    ))
}

/// apiserver SIGKILL (c2's apiserver container): restarted by its pod's kubelet, ready in
/// ≤ 5 s; its etcd sidecar keeps serving (a container's death is not the pod's), and nothing
/// under cilium/state/ is rewritten.
fn apiserver_kill(m: &Mesh) -> Result<String> {
    let old = m.apiserver_pids(1);
    ensure!(old.len() == 1, "c2 has {} apiservers", old.len());
    let etcd = m.etcd_pids(1);
    ensure!(etcd.len() == 1, "c2 has {} etcds", etcd.len());
    let rev: Value =
        serde_json::from_str(&m.etcdctl(1, &["get", "cilium/.heartbeat", "-w", "json"])?)?;
    let rev = rev["header"]["revision"].as_i64().context("revision")?;
    let keys = m.etcdctl(1, &["get", "cilium/state/", "--prefix", "--keys-only"])?;
    let count = keys.lines().filter(|l| !l.is_empty()).count();
    let state = &m.cluster(1);
    let health = state["health_addr"].as_str().context("health")?;
    signal(old[0], nix::sys::signal::Signal::SIGKILL)?;
    wait_gone(old[0], Duration::from_secs(5))?;
    let t = Instant::now();
    // /readyz from the old process may still answer until it is gone; it is gone now, so a
    // 200 comes from the new one.
    let ready = loop {
        if m.get(health, "/readyz").is_some_and(|(c, _)| c == 200) {
            break t.elapsed();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "restarted apiserver not ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let new = m.apiserver_pids(1);
    ensure!(
        new.len() == 1 && new[0] != old[0],
        "the kubelet did not restart the apiserver: {old:?} → {new:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    // Nothing under cilium/state/ changed since before the kill.
    let now: Value =
        serde_json::from_str(&m.etcdctl(1, &["get", "cilium/state/", "--prefix", "-w", "json"])?)?;
    let kvs = now["kvs"].as_array().cloned().unwrap_or_default();
    let rewritten = kvs
        .iter()
        .filter(|kv| kv["mod_revision"].as_i64().unwrap_or(0) > rev)
        .count();
    ensure!(
        ready <= Duration::from_secs(5),
        "ready after {ready:?} (> 5 s)"
    );
    ensure!(
        rewritten == 0 && kvs.len() == count,
        "{rewritten} keys under cilium/state/ rewritten, {} → {} keys",
        count,
        kvs.len()
    );
    ensure!(
        m.etcd_pids(1) == etcd,
        "the etcd sidecar did not keep serving: {etcd:?} → {:?}",
        m.etcd_pids(1)
    );
    m.wait_whole(Duration::from_secs(60))?;
    Ok(format!(
        "restarted by the pod's kubelet, ready {} ms after; etcd sidecar kept serving (same process); 0 of {count} keys under cilium/state/ rewritten",
        ready.as_millis()
    ))
}

/// c2's etcd wiped and restarted empty, then refilled (one pod removed meanwhile): c1's
/// agents withdraw that pod only after the refill's relist, and nothing else.
fn wipe(m: &Mesh, pid: &mut u32) -> Result<String> {
    let before = m.stable_entries()?;
    let c2_before = before
        .iter()
        .filter(|(k, _)| k.starts_with("c1/"))
        .filter_map(|(_, (_, r))| r.get("c2").copied())
        .max()
        .context("c1 agents cache nothing of c2")?;
    let argv = argv_of(*pid)?;
    let pod = &m.state["clusters"][1]["nodes"][1]["pods"][0];
    let manifest = m
        .state_dir(1)
        .join("manifests")
        .join(format!("pod-{}.yaml", pod["name"].as_str().context("pod")?));
    let saved = std::fs::read(&manifest).with_context(|| manifest.display().to_string())?;
    let sampler = Sampler::start(m);
    let result = wipe_and_refill(m, pid, &argv, &manifest, c2_before);
    let samples = sampler.finish();
    // Whatever happened, c2 gets its pod back for the next cases.
    std::fs::write(&manifest, saved)?;
    let (converged, published) = result?;
    // c1's view of c2 (the remote entries): only the removed pod may be missing in any
    // sample, never a wholesale withdrawal between the wipe and the refill.
    let remote_view: Vec<Entries> = samples
        .iter()
        .map(|s| {
            s.iter()
                .filter(|(k, _)| k.starts_with("c1/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .collect();
    let lost = deficits(&before, &remote_view, 1);
    ensure!(
        lost.is_empty(),
        "remote entries withdrawn between the wipe and the refill: {lost:?}"
    );
    // Once withdrawn from an agent's ipcache map, it stays withdrawn (withdrawn by the
    // relist, not a blip): what a pod's traffic sees, sample by sample.
    let mut low = std::collections::BTreeSet::new();
    for s in &remote_view {
        for (agent, (ip, _)) in s {
            let Some((ip_before, _)) = before.get(agent) else {
                continue;
            };
            if ip < ip_before {
                low.insert(agent.clone());
            } else if low.contains(agent) {
                let series: Vec<String> = remote_view
                    .iter()
                    .map(|s| match s.get(agent) {
                        Some((ip, r)) => format!("{ip}/{}", r.get("c2").copied().unwrap_or(0)),
                        None => "-".into(),
                    })
                    .collect();
                bail!(
                    "{agent}: c2's removed pod came back into the ipcache after its withdrawal (ipcache/c2 endpoints per sample: {})",
                    series.join(" ")
                )
            }
        }
    }
    // c2's own agents read c1 through the wiped etcd too (KVStoreMesh's cache in it, with
    // its own synced canaries): c1's entries are remote entries for them, kept the same way.
    let c2_view: Vec<Entries> = samples
        .iter()
        .map(|s| {
            s.iter()
                .filter(|(k, _)| k.starts_with("c2/"))
                .map(|(k, (_, r))| (k.clone(), (0, r.clone())))
                .collect()
        })
        .collect();
    let c2_agents_before: Entries = before
        .iter()
        .filter(|(k, _)| k.starts_with("c2/"))
        .map(|(k, (_, r))| (k.clone(), (0, r.clone())))
        .collect();
    let lost = deficits(&c2_agents_before, &c2_view, 0);
    ensure!(
        lost.is_empty(),
        "c2's agents withdrew c1's entries while their etcd was refilled: {lost:?}"
    );
    // Their own cluster's entries too: the agent's local reader, having seen its etcd's
    // synced canaries, waits for them again before it relists, so the own entries are kept
    // while the etcd is empty; only the removed pod (one of c2's own) may go.
    let mut local_low = u64::MAX;
    let mut local_before = u64::MAX;
    for s in &samples {
        for (agent, (ipcache, _)) in s.iter().filter(|(k, _)| k.starts_with("c2/")) {
            let Some((before_ip, _)) = before.get(agent) else {
                continue;
            };
            local_low = local_low.min(*ipcache);
            local_before = local_before.min(*before_ip);
            ensure!(
                *ipcache + 1 >= *before_ip,
                "{agent}: its own cluster's entries were withdrawn while its etcd was empty (ipcache {before_ip} → {ipcache})"
            );
        }
    }
    m.wait_whole(Duration::from_secs(60))?;
    let t2 = Instant::now();
    loop {
        let back = m
            .entries()
            .iter()
            .filter(|(k, _)| k.starts_with("c1/"))
            .all(|(_, (_, r))| r.get("c2") == Some(&c2_before));
        if back {
            break;
        }
        ensure!(
            t2.elapsed() < Duration::from_secs(30),
            "the restored pod did not come back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(format!(
        "c1 converged {:.1}s after the restart to c2's {published} endpoints (0 stale); no remote withdrawal before the relist in {} samples, in c1's agents nor of c1's entries in c2's and c2's agents kept their own cluster's entries while their etcd was empty (ipcache {local_before} → min {local_low})",
        converged.as_secs_f64(),
        samples.len()
    ))
}

/// The wipe itself: stop c2's control-plane pod (its kubelet, and with it both containers:
/// no orphan), wipe the etcd emptyDir, drop a pod, start the pod again, wait for c1 to
/// converge. Returns (time to converge, c2's endpoints now).
fn wipe_and_refill(
    m: &Mesh,
    pid: &mut u32,
    argv: &[String],
    manifest: &Path,
    c2_before: u64,
) -> Result<(Duration, u64)> {
    let containers: Vec<u32> = m
        .etcd_pids(1)
        .into_iter()
        .chain(m.apiserver_pids(1))
        .collect();
    ensure!(containers.len() == 2, "c2's pod runs {containers:?}");
    signal(*pid, nix::sys::signal::Signal::SIGTERM)?;
    wait_gone(*pid, Duration::from_secs(20))?;
    // The pod's containers end with it (the apiserver drains first).
    for c in containers {
        wait_gone(c, Duration::from_secs(20)).context("a container outlived its pod (orphan)")?;
    }
    std::fs::remove_dir_all(m.pod_dir(1).join("var/run/etcd"))?;
    std::fs::remove_file(manifest)?;
    let state = m.cluster(1);
    let t = Instant::now();
    *pid = respawn(
        state["ns"].as_str().context("ns")?,
        argv,
        &m.state_dir(1).join("kubelet.log"),
    )?;
    let converged = loop {
        let now = m.entries();
        let c1: Vec<u64> = now
            .iter()
            .filter(|(k, _)| k.starts_with("c1/"))
            .filter_map(|(_, (_, r))| r.get("c2").copied())
            .collect();
        if c1.len() == 2 && c1.iter().all(|n| *n == c2_before - 1) {
            break t.elapsed();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "c1 did not converge after the refill: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // 0 stale entries: c1 caches exactly what c2 now publishes.
    let published = m
        .etcdctl(
            1,
            &[
                "get",
                "cilium/state/ip/v1/default/",
                "--prefix",
                "--keys-only",
            ],
        )?
        .lines()
        .filter(|l| !l.is_empty())
        .count() as u64;
    ensure!(
        published == c2_before - 1,
        "c2 publishes {published} endpoints, expected {}",
        c2_before - 1
    );
    Ok((converged, published))
}

/// c2 cut off for 30 s: entries kept, a stream survives, status says unreachable with the
/// network hint within 5 s, ready again within 2 s of the link's return.
fn partition(m: &Mesh) -> Result<String> {
    let before = m.stable_entries()?;
    let src = &m.state["clusters"][0]["nodes"][0]["pods"][0];
    let dst = &m.state["clusters"][1]["nodes"][0]["pods"][0];
    let src_ns = src["ns"].as_str().context("ns")?;
    // The stream's TCP backs off to at most 2 s between retransmits (instead of doubling to
    // 51 s after a 30 s cut), so it resumes soon after the link does. With that cap the
    // default 15 retransmits give up after ~27 s (ETIMEDOUT, seen in a run), so the pod also
    // allows 30 (~57 s). Both are per-namespace sysctls of the sending pod; with the
    // kernel's defaults the stream survives too, only resuming up to ~21 s after the link.
    let sysctl = |kv: &str| {
        run(Command::new("ip").args(["netns", "exec", src_ns, "sysctl", "-w", kv])).is_ok()
    };
    let rto = sysctl("net.ipv4.tcp_rto_max_ms=2000") && sysctl("net.ipv4.tcp_retries2=30");
    let stream = Command::new("ip")
        .args(["netns", "exec", src_ns])
        .arg(&m.lab.bin)
        .args([
            "lab",
            "load",
            "--mode",
            "stream",
            "--duration",
            "36s",
            "--target",
        ])
        .arg(dst["ip"].as_str().context("ip")?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let sampler = Sampler::start(m);
    run(Command::new("ip").args(["-n", &m.router, "link", "set", "br2", "down"]))?;
    let cut = Instant::now();
    let result = (|| -> Result<(Duration, String, Entries, usize)> {
        let (detected, hint) = loop {
            let v = m.cm_status(0)?;
            let c2 = &v["clusters"]["c2"];
            let h = v["errors"]["c2"].as_str().unwrap_or_default().to_owned();
            if c2["ready"] == false && !h.is_empty() {
                break (cut.elapsed(), h);
            }
            ensure!(
                cut.elapsed() < Duration::from_secs(30),
                "status still says ready: {c2}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // What status says for the rest of the cut: every read says unreachable (the
        // reconnect attempts in between, a timed-out TCP connect, must not turn the hint
        // into a vague or a TLS one, nor the remote ready).
        let mut reads = 0;
        let mut during = None;
        while cut.elapsed() < Duration::from_secs(30) {
            let v = m.cm_status(0)?;
            let h = v["errors"]["c2"].as_str().unwrap_or_default();
            ensure!(
                v["clusters"]["c2"]["ready"] == false && h.starts_with("unreachable"),
                "{:.1}s into the cut status says: ready {}, {h}",
                cut.elapsed().as_secs_f64(),
                v["clusters"]["c2"]["ready"]
            );
            reads += 1;
            if during.is_none() && cut.elapsed() >= Duration::from_secs(25) {
                during = Some(m.entries());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok((detected, hint, during.unwrap_or_else(|| m.entries()), reads))
    })();
    run(Command::new("ip").args(["-n", &m.router, "link", "set", "br2", "up"]))?;
    let healed = Instant::now();
    let (detected, hint, during, reads) = result?;
    let ready = loop {
        let v = m.cm_status(0)?;
        if v["clusters"]["c2"]["ready"] == true {
            break healed.elapsed();
        }
        ensure!(
            healed.elapsed() < Duration::from_secs(60),
            "c2 not ready again: {}",
            v["errors"]
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = stream.wait_with_output()?;
    m.wait_whole(Duration::from_secs(60))?;
    let after = m.entries();
    let samples = sampler.finish();
    println!("partition: status hint {detected:?} after the cut: {hint}");
    ensure!(
        detected <= Duration::from_secs(5),
        "unreachable shown after {detected:?} (> 5 s)"
    );
    ensure!(
        hint.starts_with("unreachable") && hint.contains("not reachable"),
        "wrong hint: {hint}"
    );
    ensure!(
        !hint.contains("CA") && !hint.contains("certificate"),
        "a TLS hint for a cut link: {hint}"
    );
    ensure!(
        ready <= Duration::from_secs(2),
        "ready again {ready:?} after the link returned (> 2 s)"
    );
    let lost = deficits(&before, &samples, 0);
    ensure!(
        lost.is_empty(),
        "entries dropped during the partition: {lost:?}"
    );
    // During the cut only c1's agents answer (c2's sit behind the cut link).
    let c1_before: Entries = before
        .iter()
        .filter(|(k, _)| k.starts_with("c1/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ensure!(
        c1_before == during && before == after,
        "entries before/during/after differ:\n{before:?}\n{during:?}\n{after:?}"
    );
    ensure!(
        out.status.success(),
        "the stream did not survive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    Ok(format!(
        "unreachable + network hint after {:.1}s, and in all {reads} reads until the link returned; ready {:.2}s after the link returned; entries of c1's agents before = during = after, all 4 before = after ({} samples, none lower); stream of {} MB survived{}",
        detected.as_secs_f64(),
        ready.as_secs_f64(),
        samples.len(),
        report["bytes"].as_u64().unwrap_or(0) / 1_000_000,
        if rto { " (tcp_rto_max_ms=2000, tcp_retries2=30 in the sending pod)" } else { "" }
    ))
}

#[test]
fn fault_table() -> Result<()> {
    let mut lab = Lab::new("cm-faults")?;
    let t = Instant::now();
    let (_, state) = lab.up_mesh(1, &[])?;
    let router = state["router_ns"].as_str().context("router")?.to_owned();
    let m = Mesh { lab, state, router };
    let up = m.wait_whole(Duration::from_secs(60))?;
    println!(
        "lab up and whole in {:.1}s",
        (t.elapsed() + up).as_secs_f64()
    );
    let mut agent_pid = m.agents()[0].pid;
    let mut c2_pod = m.pod_pid(1);

    let mut rows = Vec::new();
    let mut case =
        |fault: &'static str, expected: &'static str, f: &mut dyn FnMut() -> Result<String>| {
            let t = Instant::now();
            let r = m.wait_whole(Duration::from_secs(90)).and_then(|_| f());
            let (measured, ok) = match r {
                Ok(s) => (s, true),
                Err(e) => {
                    // What the apiservers saw, for whoever reads the failure.
                    for i in 0..2 {
                        let log = std::fs::read_to_string(m.state_dir(i).join("apiserver.log"))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(25).collect();
                        println!("--- c{} apiserver.log (last 25 lines)", i + 1);
                        for l in tail.iter().rev() {
                            println!("{l}");
                        }
                    }
                    (format!("FAILED: {e:#}"), false)
                }
            };
            println!(
                "[{}] {fault} ({:.1}s): {measured}",
                if ok { "ok" } else { "FAIL" },
                t.elapsed().as_secs_f64()
            );
            rows.push(Row {
                fault,
                expected,
                measured,
                ok,
            });
        };
    case(
        "certificate rotation on both sides while connected",
        "0 dropped routes; new handshakes use the new certificate (serial)",
        &mut || rotation(&m),
    );
    case(
        "expired remote certificate",
        "status names the file and its expiry; entries kept",
        &mut || expired(&m),
    );
    case(
        "etcd SIGKILL",
        "restarted; 0 entries lost in any agent",
        &mut || etcd_kill(&m),
    );
    case("agent SIGKILL mid-stream", "stream gap < 1 s", &mut || {
        agent_kill(&m, &mut agent_pid)
    });
    case(
        "apiserver SIGKILL, then restart",
        "ready in ≤ 5 s; 0 events under cilium/state/",
        &mut || apiserver_kill(&m),
    );
    case(
        "remote etcd wiped and restarted empty, then refilled",
        "withdrawn only after the refill's relist; 0 stale entries",
        &mut || wipe(&m, &mut c2_pod),
    );
    case(
        "partition one cluster for 30 s",
        "entries kept; stream survives; unreachable + right hint ≤ 5 s; ready ≤ 2 s after",
        &mut || partition(&m),
    );

    println!("\n| fault | expected | measured |\n|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {}{} |",
            r.fault,
            r.expected,
            if r.ok { "" } else { "**" },
            r.measured
        );
    }
    println!("\nfault suite: {:.0}s in total", t.elapsed().as_secs_f64());
    let failed: Vec<&str> = rows.iter().filter(|r| !r.ok).map(|r| r.fault).collect();
    ensure!(failed.is_empty(), "failed: {failed:?}");
    Ok(())
}
