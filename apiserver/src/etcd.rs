//! The embedded etcd: Debian's `etcd` binary run as a supervised child with its own data
//! dir, mTLS with client-certificate auth, and Cilium's users and roles.
//!
//! etcd 3.4 enables RBAC only after a root user exists; we create the users with the root
//! certificate (CN `root`) while auth is still off, then `auth enable`. The set-up is
//! idempotent, so restarting etcd on a kept data dir goes through it again harmlessly.
//! If etcd dies it is restarted (with backoff) on the same data dir and ports; clients see
//! a short outage and resume, and leases survive because etcd persists them.
//!
//! # Never an orphan, never a loop
//!
//! * etcd dies with its apiserver: it is started through util-linux's `setpriv
//!   --pdeathsig TERM`, so the kernel sends it SIGTERM when the thread that started it ends.
//!   That thread is a dedicated one that lives exactly as long as the child (it waits for
//!   it), so the signal comes when the apiserver exits by any means, SIGKILL and OOM kills
//!   included, and never earlier. (`prctl` in a `pre_exec` hook would need `unsafe`, which
//!   this crate does not allow.)
//! * An etcd that still serves our data dir when we start (left by an apiserver from before
//!   this rule, or started by hand) is stopped cleanly (SIGTERM, then SIGKILL after 10 s)
//!   before ours starts, with a log line saying so. Adopting it would leave a process we
//!   cannot wait for and that would outlive us again.
//! * The restart backoff (200 ms doubling to 10 s) is only reset after an etcd that we
//!   started served for [`STABLE`]; "healthy" means our child is alive and answers, so an
//!   etcd that exits at once (a port taken by something else) backs off instead of looping,
//!   and the log says why it exited (the last lines of its log).
//!
//! It must not touch an etcd that serves another data dir.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use clustermesh_syncer::EtcdConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why the embedded etcd cannot run (one that exits is restarted, not an error).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data dir or the log file cannot be prepared.
    #[error("cannot {what} {}: {source}; check the --state-dir permissions and free space", path.display())]
    Files {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The etcd binary cannot be started.
    #[error("cannot start {}: {source}; install it with `apt-get install etcd-server` (the README's commands do this) or point CLUSTERMESH_ETCD_BIN at it", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The thread that starts and waits for etcd could not be created or ended early.
    #[error("the thread starting etcd {0}")]
    Thread(String),
    /// etcd started but never answered (or its users and roles could not be created).
    #[error("embedded etcd did not become healthy in 30s: {source}; see {}", log.display())]
    NotHealthy {
        /// etcd's log.
        log: PathBuf,
        /// Cause.
        #[source]
        source: clustermesh_syncer::Error,
    },
    /// etcd answered but its users, roles or auth could not be set up.
    #[error("cannot create etcd's users and roles: {0}")]
    Auth(#[source] clustermesh_syncer::Error),
    /// Stopped while waiting for etcd.
    #[error("cancelled while waiting for the embedded etcd")]
    Cancelled,
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// util-linux's `setpriv`, which starts etcd with a parent-death signal; `None` starts
    /// etcd directly (it then outlives a killed apiserver until the next one stops it).
    pub pdeathsig_wrapper: Option<PathBuf>,
}

/// The smallest ping interval the embedded etcd accepts from clients.
pub const KEEPALIVE_MIN_TIME: Duration = Duration::from_millis(500);

/// An etcd that served this long resets the restart backoff.
const STABLE: Duration = Duration::from_secs(10);

/// `setpriv` on the usual paths (util-linux is essential on Debian).
pub fn find_setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

impl Embedded {
    fn command(&self) -> Command {
        let url = format!("https://{}", self.listen);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let c = |f: &str| self.certs_dir.join(f);
        let mut cmd = match &self.pdeathsig_wrapper {
            Some(setpriv) => {
                let mut cmd = Command::new(setpriv);
                cmd.args(["--pdeathsig", "TERM", "--"]).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
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
            // Clients ping every second while they watch, to notice a dead peer within
            // seconds (`clustermesh_syncer::client::KEEPALIVE_INTERVAL`); etcd's default
            // (5 s) would answer those pings with GOAWAY "too_many_pings".
            .arg(format!(
                "--grpc-keepalive-min-time={}ms",
                KEEPALIVE_MIN_TIME.as_millis()
            ))
            .stdin(Stdio::null());
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
            cluster_cidrs: Default::default(),
        }
    }

    /// Starts etcd from a dedicated thread that waits for it (see the module docs): the
    /// child's PID, and a receiver for its exit status.
    fn spawn(&self) -> Result<(u32, oneshot::Receiver<std::io::Result<ExitStatus>>)> {
        let files = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Files { what, path, source }
        };
        std::fs::create_dir_all(&self.data_dir)
            .map_err(files("create the data dir", &self.data_dir))?;
        set_mode(&self.data_dir, 0o700);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(files("open the etcd log", &self.log_file))?;
        let mut cmd = self.command();
        let log2 = log
            .try_clone()
            .map_err(files("open the etcd log", &self.log_file))?;
        cmd.stdout(log2).stderr(log);
        let binary = self.binary.clone();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("etcd-parent".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = started_tx.send(Ok(child.id()));
                    let _ = exit_tx.send(child.wait());
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Thread(format!("cannot be created: {e}")))?;
        let pid = started_rx
            .recv()
            .map_err(|_| Error::Thread("ended before etcd started".into()))?
            .map_err(|source| Error::Spawn { binary, source })?;
        Ok((pid, exit_rx))
    }

    /// Stops an etcd that still serves our data dir (see the module docs).
    async fn stop_leftover(&self) {
        for pid in serving(&self.data_dir) {
            warn!(pid, data_dir = %self.data_dir.display(),
                "an etcd left by an earlier apiserver still serves our data dir: stopping it (SIGTERM) before starting ours");
            let p = Pid::from_raw(pid as i32);
            let _ = kill(p, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while alive(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if alive(pid) {
                warn!(
                    pid,
                    "the leftover etcd ignored SIGTERM for 10 s: killing it"
                );
                let _ = kill(p, Signal::SIGKILL);
                while alive(pid) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            info!(pid, "leftover etcd stopped");
        }
    }
}

/// PIDs of etcd processes whose `--data-dir` is `data_dir` (from `/proc/*/cmdline`).
pub fn serving(data_dir: &Path) -> Vec<u32> {
    let want = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_etcd = argv
            .first()
            .and_then(|a| Path::new(std::str::from_utf8(a).ok()?).file_name())
            .is_some_and(|n| n.to_string_lossy().contains("etcd"));
        if !is_etcd || !alive(pid) {
            continue;
        }
        let dir = argv.iter().enumerate().find_map(|(i, a)| {
            let a = std::str::from_utf8(a).ok()?;
            match a.strip_prefix("--data-dir=") {
                Some(v) => Some(v.to_owned()),
                None if a == "--data-dir" => argv
                    .get(i + 1)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned),
                None => None,
            }
        });
        let Some(dir) = dir else { continue };
        let dir = Path::new(&dir);
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if dir == want {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

async fn wait_healthy_and_init(e: &Embedded, cancel: &CancellationToken) -> Result<()> {
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
                clustermesh_syncer::auth::init_cluster_auth(&mut client, &e.cluster)
                    .await
                    .map_err(Error::Auth)?;
                return Ok(());
            }
            Err(source) if tokio::time::Instant::now() > deadline => {
                return Err(Error::NotHealthy {
                    log: e.log_file.clone(),
                    source,
                })
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The last `n` lines of etcd's log, for a message about why it exited.
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Runs etcd until `cancel`, restarting it when it exits. `up` is true while it serves.
pub async fn supervise(
    e: Embedded,
    up: watch::Sender<bool>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    if e.pdeathsig_wrapper.is_none() {
        warn!("setpriv (util-linux) not found: the embedded etcd will outlive this apiserver if it is killed; the next apiserver stops it");
    }
    e.stop_leftover().await;
    let mut delay = Duration::from_millis(200);
    loop {
        let (pid, mut exited) = e.spawn()?;
        let started = tokio::time::Instant::now();
        info!(pid, listen = %e.listen, "embedded etcd started");
        // Healthy only while our own child runs: an etcd that exits at once must not be
        // mistaken for one that serves.
        let mut healthy = Box::pin(wait_healthy_and_init(&e, &cancel));
        let mut checked = false;
        let status = loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    stop(pid, &mut exited).await;
                    up.send_replace(false);
                    return Ok(());
                }
                r = &mut healthy, if !checked => {
                    checked = true;
                    match r {
                        Ok(()) => {
                            up.send_replace(true);
                            info!(pid, ready_in = ?started.elapsed(), "embedded etcd serves");
                        }
                        Err(err) => warn!(error = %err, "embedded etcd not ready"),
                    }
                }
                status = &mut exited => break status,
            }
        };
        up.send_replace(false);
        let ran = started.elapsed();
        if ran >= STABLE {
            delay = Duration::from_millis(200);
        }
        let status = match status {
            Ok(Ok(s)) => s.to_string(),
            Ok(Err(err)) => format!("wait failed: {err}"),
            Err(_) => "unknown (the waiting thread ended)".into(),
        };
        warn!(pid, %status, ran = ?ran, restart_in = ?delay, log = %e.log_file.display(),
            last_lines = %log_tail(&e.log_file, 3), "embedded etcd exited; restarting");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// SIGTERM, up to 5 s for a clean exit, then SIGKILL.
async fn stop(pid: u32, exited: &mut oneshot::Receiver<std::io::Result<ExitStatus>>) {
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(5), exited)
        .await
        .is_err()
    {
        warn!(pid, "embedded etcd ignored SIGTERM for 5 s: killing it");
        let _ = kill(p, Signal::SIGKILL);
    }
}
