//! `clustermesh lab up|down|status`: a whole mesh on this machine.
//!
//! Today the lab runs each cluster's control plane — an embedded etcd (mTLS, RBAC) plus a
//! clustermesh-apiserver exporting a generated set of nodes, pods and a global service, with
//! KVStoreMesh mirroring the other clusters, all connected pairwise (`clustermesh connect`) —
//! on loopback addresses only (network hygiene: nothing leaves 127.0.0.0/8). Node and pod
//! network namespaces arrive with the datapath.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::clustermesh::{connect_pair, status_json, Access};
use crate::enable::{self, EnableArgs};
use crate::http;

/// Flags of `lab up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of clusters.
    #[arg(long, default_value_t = 2)]
    pub clusters: u32,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 2)]
    pub nodes: u32,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pub pods: u32,
    /// Lab directory.
    #[arg(long, default_value = ".lab")]
    pub dir: PathBuf,
    /// First loopback port used (each cluster takes 10).
    #[arg(long, default_value_t = 32379)]
    pub base_port: u16,
}

/// Flags of `lab down` / `lab status`.
#[derive(Debug, clap::Args)]
pub struct DirArgs {
    /// Lab directory.
    #[arg(long, default_value = ".lab")]
    pub dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, default_value = "summary")]
    pub output: String,
}

/// What `lab up` records so `status`/`down` can find everything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Clusters.
    pub clusters: Vec<LabCluster>,
}

/// One lab cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabCluster {
    /// Name.
    pub name: String,
    /// ID.
    pub id: u32,
    /// State dir.
    pub state_dir: PathBuf,
    /// etcd endpoint.
    pub etcd_endpoint: String,
    /// Health address.
    pub health_addr: SocketAddr,
    /// apiserver PID.
    pub pid: u32,
    /// Certificates.
    pub certs_dir: PathBuf,
}

/// Kubernetes-shaped manifests for one lab cluster: nodes, pods with an echo label, and a
/// global service selecting them.
pub fn sample_manifests(cluster_id: u32, nodes: u32, pods: u32) -> String {
    let mut out = String::new();
    out.push_str("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n");
    for n in 1..=nodes {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\n  labels:\n    kubernetes.io/hostname: node{n}\nspec:\n  podCIDR: 10.{cluster_id}.{n}.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 198.18.{cluster_id}.{n}\n"
        ));
        for p in 1..=pods {
            let app = if p % 2 == 1 { "echo" } else { "client" };
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{n}-{p}\n  namespace: default\n  labels:\n    app: {app}\nspec:\n  nodeName: node{n}\n  containers:\n  - name: echo\n    ports:\n    - name: http\n      containerPort: 8080\nstatus:\n  phase: Running\n  hostIP: 198.18.{cluster_id}.{n}\n  podIP: 10.{cluster_id}.{n}.{ip}\n",
                ip = 10 + p
            ));
        }
    }
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\nspec:\n  clusterIP: 172.20.0.10\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  selector:\n    app: echo\n# cluster {cluster_id}\n"
    ));
    out
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

fn load(dir: &Path) -> anyhow::Result<LabState> {
    let p = state_file(dir);
    let bytes = std::fs::read(&p).with_context(|| {
        format!(
            "no lab in {} (run `clustermesh lab up` first)",
            dir.display()
        )
    })?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// `lab up`.
pub fn up(a: UpArgs) -> anyhow::Result<()> {
    if state_file(&a.dir).exists() {
        anyhow::bail!(
            "a lab already runs in {} — `clustermesh lab status` shows it, `clustermesh lab down` removes it",
            a.dir.display()
        );
    }
    if a.clusters == 0 || a.clusters > 50 {
        anyhow::bail!("--clusters must be 1..=50");
    }
    std::fs::create_dir_all(&a.dir)?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let ca_dir = dir.join("ca");
    let mut state = LabState {
        clusters: Vec::new(),
    };
    let started = Instant::now();
    for i in 1..=a.clusters {
        let name = format!("c{i}");
        let port = a.base_port + (i as u16 - 1) * 10;
        let ea = EnableArgs {
            cluster_name: name.clone(),
            cluster_id: i,
            max_connected_clusters: 255,
            state_dir: dir.join(&name),
            ca_dir: ca_dir.clone(),
            etcd_listen: SocketAddr::from(([127, 0, 0, 1], port)),
            etcd_peer_port: port + 1,
            health_addr: SocketAddr::from(([127, 0, 0, 1], port + 2)),
            manifests: None,
            extra_dns: Vec::new(),
            extra_ips: Vec::new(),
            enable_mcs_api: true,
            force: false,
            start: false,
        };
        let prepared = enable::prepare(&ea)?;
        std::fs::write(
            prepared.manifests.join("lab.yaml"),
            sample_manifests(i, a.nodes, a.pods),
        )?;
        let log = std::fs::File::create(prepared.state_dir.join("apiserver.log"))?;
        let child = std::process::Command::new(enable::apiserver_binary())
            .arg("--config")
            .arg(&prepared.config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", enable::apiserver_binary().display()))?;
        state.clusters.push(LabCluster {
            name,
            id: i,
            state_dir: prepared.state_dir.clone(),
            etcd_endpoint: prepared.endpoint,
            health_addr: ea.health_addr,
            pid: child.id(),
            certs_dir: prepared.state_dir.join("certs"),
        });
        std::fs::write(state_file(&dir), serde_json::to_vec_pretty(&state)?)?;
    }
    println!("⏳ Waiting for {} control planes to be ready…", a.clusters);
    for c in &state.clusters {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http::get(c.health_addr, "/readyz", Duration::from_secs(1)) {
                break;
            }
            if !alive(c.pid) || Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(c.state_dir.join("apiserver.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                anyhow::bail!(
                    "cluster {} did not become ready; last log lines:\n{}\n(run `clustermesh lab down --dir {}` to clean up)",
                    c.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Mesh: connect every pair, then wait until each cluster sees all the others.
    let access: Vec<Access> = state
        .clusters
        .iter()
        .map(|c| Access::load(&c.state_dir))
        .collect::<anyhow::Result<_>>()?;
    for (i, a) in access.iter().enumerate() {
        for b in &access[i + 1..] {
            connect_pair(a, b, false)?;
            println!("🔗 Connected cluster {} <=> {}", a.name, b.name);
        }
    }
    if access.len() > 1 {
        let deadline = Instant::now() + Duration::from_secs(60);
        for a in &access {
            while Instant::now() < deadline {
                let v = status_json(a);
                if v["connectivity"]["not_ready"].as_u64() == Some(0) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    println!("✅ Lab is up in {:.1}s", started.elapsed().as_secs_f64());
    print_status(&state, "summary")
}

/// `lab status`.
pub fn status(a: DirArgs) -> anyhow::Result<()> {
    let state = load(&a.dir)?;
    print_status(&state, &a.output)
}

fn print_status(state: &LabState, output: &str) -> anyhow::Result<()> {
    let mut json = Vec::new();
    for c in &state.clusters {
        let (ready, report) = match http::get(c.health_addr, "/status", Duration::from_secs(2)) {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                (v["ready"].as_bool().unwrap_or(false), v)
            }
            _ => (false, serde_json::Value::Null),
        };
        json.push(serde_json::json!({
            "name": c.name, "id": c.id, "etcd": c.etcd_endpoint, "health": c.health_addr.to_string(),
            "pid": c.pid, "running": alive(c.pid), "ready": ready, "certs": c.certs_dir,
            "remote-etcd-config": c.state_dir.join("remote-etcd-config.yaml"),
            "status": report,
        }));
        if output != "json" {
            let icon = if ready { "✅" } else { "❌" };
            println!(
                "{icon} cluster {} (ID {}): apiserver pid {} {}",
                c.name,
                c.id,
                c.pid,
                if alive(c.pid) {
                    "running"
                } else {
                    "NOT running"
                }
            );
            println!(
                "   etcd:   {} (mTLS; certs in {})",
                c.etcd_endpoint,
                c.certs_dir.display()
            );
            println!(
                "   health: http://{}/readyz → {}",
                c.health_addr,
                if ready { "Ready" } else { "NotReady" }
            );
            if let Some(stores) = report.get("stores").and_then(|s| s.as_object()) {
                let parts: Vec<String> = stores.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("   keys:   {}", parts.join(" "));
            }
            if let Some(remotes) = report.get("remote-clusters").and_then(|e| e.as_array()) {
                for r in remotes {
                    let name = r["name"].as_str().unwrap_or_default();
                    if r["ready"].as_bool() == Some(true) {
                        println!(
                            "   remote: ✅ {name}: ready, {} nodes, {} endpoints, {} identities, {} services",
                            r["num-nodes"], r["num-endpoints"], r["num-identities"], r["num-shared-services"]
                        );
                    } else {
                        let hint = crate::clustermesh::hint(&c.name, r).unwrap_or_default();
                        println!("   remote: ❌ {name}: {hint}");
                    }
                }
            }
            if let Some(errs) = report.get("manifest-errors").and_then(|e| e.as_array()) {
                for e in errs {
                    println!("   ⚠️  {}", e.as_str().unwrap_or_default());
                }
            }
            println!(
                "   read:   ETCDCTL_API=3 etcdctl --endpoints {} --cacert {} --cert {} --key {} get --prefix cilium/state/ --keys-only",
                c.etcd_endpoint,
                c.certs_dir.join("ca.crt").display(),
                c.certs_dir.join("remote.crt").display(),
                c.certs_dir.join("remote.key").display()
            );
        }
    }
    if output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "clusters": json }))?
        );
    }
    Ok(())
}

/// `lab down`: stops every process and removes the lab directory.
pub fn down(a: DirArgs) -> anyhow::Result<()> {
    let state = match load(&a.dir) {
        Ok(s) => s,
        Err(_) if !a.dir.exists() => {
            println!("no lab in {}", a.dir.display());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for c in &state.clusters {
        if alive(c.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in &state.clusters {
        while alive(c.pid) && Instant::now() < deadline {
            // reap if it is our child (it is not after `up` exited; init reaps it)
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(c.pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(c.pid) {
            // Kill the whole process group (apiserver and its etcd).
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    std::fs::remove_dir_all(&a.dir).with_context(|| format!("removing {}", a.dir.display()))?;
    println!("🧹 Lab removed ({} clusters stopped)", state.clusters.len());
    Ok(())
}
