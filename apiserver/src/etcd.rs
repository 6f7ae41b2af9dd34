//! The embedded etcd: Debian's `etcd` binary run as a supervised child with its own data
//! dir, mTLS with client-certificate auth, and Cilium's users and roles.
//!
//! etcd 3.4 enables RBAC only after a root user exists; we create the users with the root
//! certificate (CN `root`) while auth is still off, then `auth enable`. The set-up is
//! idempotent, so restarting etcd on a kept data dir goes through it again harmlessly.
//! If etcd dies it is restarted (with backoff) on the same data dir and ports; clients see
//! a short outage and resume, and leases survive because etcd persists them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clustermesh_syncer::EtcdConfig;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How to run the embedded etcd.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The etcd binary.
    pub binary: PathBuf,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Client address (`127.0.0.1:2379`).
    pub listen: String,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Directory with `ca.crt`, `server.crt/key`, `root.crt/key`.
    pub certs_dir: PathBuf,
    /// Local cluster name (for users and roles).
    pub cluster: String,
    /// Where etcd's own log goes.
    pub log_file: PathBuf,
}

impl Embedded {
    fn command(&self) -> Command {
        let url = format!("https://{}", self.listen);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let c = |f: &str| self.certs_dir.join(f);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name")
            .arg("clustermesh-apiserver")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&url)
            .arg("--advertise-client-urls")
            .arg(&url)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("clustermesh-apiserver={peer}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(c("ca.crt"))
            .arg("--cert-file")
            .arg(c("server.crt"))
            .arg("--key-file")
            .arg(c("server.key"))
            .arg("--auto-compaction-retention=1")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--listen-metrics-urls")
            .arg("http://127.0.0.1:0")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// A client config using `cert` (a file stem in the certs dir, e.g. `root`).
    pub fn client_config(&self, stem: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![format!("https://{}", self.listen)],
            trusted_ca_file: Some(self.certs_dir.join("ca.crt")),
            cert_file: Some(self.certs_dir.join(format!("{stem}.crt"))),
            key_file: Some(self.certs_dir.join(format!("{stem}.key"))),
            host_aliases: Vec::new(),
        }
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        std::fs::create_dir_all(&self.data_dir)?;
        set_mode(&self.data_dir, 0o700);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(|e| {
                anyhow::anyhow!("cannot open etcd log {}: {e}", self.log_file.display())
            })?;
        let mut cmd = self.command();
        cmd.stdout(log.try_clone()?).stderr(log);
        cmd.spawn().map_err(|e| {
            anyhow::anyhow!(
                "cannot start {}: {e}; install it with `apt-get install etcd-server` (the README's commands do this)",
                self.binary.display()
            )
        })
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

async fn wait_healthy_and_init(e: &Embedded, cancel: &CancellationToken) -> anyhow::Result<()> {
    let cfg = e.client_config("root");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let res = clustermesh_syncer::connect(
            &cfg,
            &clustermesh_syncer::ConnectConfig {
                connect_timeout: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await;
        match res {
            Ok(mut client) => {
                clustermesh_syncer::auth::init_cluster_auth(&mut client, &e.cluster).await?;
                return Ok(());
            }
            Err(err) if tokio::time::Instant::now() > deadline => {
                anyhow::bail!(
                    "embedded etcd did not become healthy in 30s: {err}; see {}",
                    e.log_file.display()
                )
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => anyhow::bail!("cancelled"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Runs etcd until `cancel`, restarting it when it exits. `up` is true while it serves.
pub async fn supervise(
    e: Embedded,
    up: watch::Sender<bool>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        let mut child = e.spawn()?;
        info!(pid = child.id(), listen = %e.listen, "embedded etcd started");
        match wait_healthy_and_init(&e, &cancel).await {
            Ok(()) => {
                up.send_replace(true);
                delay = Duration::from_millis(200);
            }
            Err(err) => warn!(error = %err, "embedded etcd not ready"),
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let _ = child.kill().await;
                up.send_replace(false);
                return Ok(());
            }
            status = child.wait() => {
                up.send_replace(false);
                warn!(?status, restart_in = ?delay, log = %e.log_file.display(), "embedded etcd exited; restarting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
