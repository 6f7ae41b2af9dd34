//! A real etcd 3.4 with mTLS for tests: one process per [`TestEtcd`], certificates generated
//! per instance, data on tmpfs, killed and cleaned up on drop.
//!
//! The command line matches TOOLCHAIN.md ("etcd with mTLS") so tests see what production sees:
//! a request without a client certificate chained to the CA is refused.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clustermesh_certs::rustls::{self, pki_types::ServerName};
use clustermesh_certs::{
    issue_cluster_set, load_client_config, Ca, CertFiles, ClusterCertSet, ServerSpec, SERVER_NAME,
};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tempfile::TempDir;

/// Path of the etcd binary (Debian's `etcd-server` package).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// Cluster name used for the generated certificate set (`admin-test`, `remote-test`, ...).
pub const CLUSTER: &str = "test";
/// How long [`TestEtcd::start`] and [`TestEtcd::restart`] wait for etcd to serve.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

const START_ATTEMPTS: usize = 5;
const LOG_FILE: &str = "etcd.log";
const LOG_TAIL_BYTES: u64 = 4096;

/// A running etcd with mTLS on 127.0.0.1.
pub struct TestEtcd {
    // Field order matters for Drop: the process is killed in `drop`, then the dirs go.
    child: Option<Child>,
    ca: Ca,
    certs: ClusterCertSet,
    clients: Mutex<HashMap<String, CertFiles>>,
    client_port: u16,
    peer_port: u16,
    data_dir: TempDir,
    dir: TempDir,
}

impl std::fmt::Debug for TestEtcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEtcd")
            .field("endpoint", &self.endpoint())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TestEtcd {
    /// Generates certificates, starts etcd on free loopback ports and waits until it serves
    /// `status` over mTLS. Synchronous; callable from sync and async tests alike.
    pub fn start() -> anyhow::Result<TestEtcd> {
        let dir = tempfile::Builder::new()
            .prefix("clustermesh-etcd-")
            .tempdir()
            .context("create etcd temp dir")?;
        let data_dir = data_tempdir()?;
        let ca = Ca::generate(clustermesh_certs::DEFAULT_CA_COMMON_NAME)?;
        let certs = issue_cluster_set(
            &ca,
            CLUSTER,
            &dir.path().join("certs"),
            &ServerSpec::default(),
        )?;
        let mut etcd = TestEtcd {
            child: None,
            ca,
            certs,
            clients: Mutex::new(HashMap::new()),
            client_port: 0,
            peer_port: 0,
            data_dir,
            dir,
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            (etcd.client_port, etcd.peer_port) = free_ports()?;
            match etcd.spawn_and_wait() {
                Ok(()) => return Ok(etcd),
                // Another process took a port between our probe and etcd's bind: try again.
                Err(error) if etcd.log_tail().contains("address already in use") => {
                    etcd.kill_child();
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "etcd did not start after {START_ATTEMPTS} attempts"
            )))
    }

    /// Client URL, e.g. `https://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// Client socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The certificate set of cluster [`CLUSTER`] (`root`, `admin-test`, `remote`, ...).
    pub fn certs(&self) -> &ClusterCertSet {
        &self.certs
    }

    /// The CA that signed the server and all client certificates.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Directory holding certificates, client configs and the etcd log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// etcd's data directory (kept across [`restart`](Self::restart)).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Path of etcd's log (stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Files for a client certificate with common name `cn`, issued on first use.
    ///
    /// # Panics
    /// If issuing or writing the certificate fails (see [`try_client_files`](Self::try_client_files)).
    pub fn client_files(&self, cn: &str) -> CertFiles {
        match self.try_client_files(cn) {
            Ok(files) => files,
            Err(error) => panic!("issue client certificate {cn:?}: {error:#}"),
        }
    }

    /// Like [`client_files`](Self::client_files), returning errors instead of panicking.
    pub fn try_client_files(&self, cn: &str) -> anyhow::Result<CertFiles> {
        let set = &self.certs;
        let known = [
            ("root", &set.root),
            ("remote", &set.remote),
            (&format!("admin-{CLUSTER}"), &set.admin),
            (&format!("local-{CLUSTER}"), &set.local),
            (&format!("remote-{CLUSTER}"), &set.remote_cluster),
        ];
        if let Some((_, files)) = known.iter().find(|(name, _)| *name == cn) {
            return Ok((*files).clone());
        }
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(files) = clients.get(cn) {
            return Ok(files.clone());
        }
        anyhow::ensure!(
            !cn.is_empty() && !cn.contains(['/', '\0']) && cn != "." && cn != "..",
            "client common name {cn:?} cannot be used as a file name"
        );
        let files = self
            .ca
            .issue_client(cn, clustermesh_certs::DEFAULT_VALIDITY_DAYS)?
            .write(&self.certs.dir, cn)?;
        clients.insert(cn.to_owned(), files.clone());
        Ok(files)
    }

    /// Writes an etcd client config (the `clientv3/yaml` format Cilium reads) for `cn`.
    pub fn write_client_config(&self, cn: &str, path: &Path) -> anyhow::Result<()> {
        let files = self.try_client_files(cn)?;
        let yaml = format!(
            "endpoints:\n- {}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
            self.endpoint(),
            yaml_str(&files.ca),
            yaml_str(&files.cert),
            yaml_str(&files.key),
        );
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(path, yaml).with_context(|| format!("write {}", path.display()))
    }

    /// An etcd client authenticating with the certificate of `cn`.
    pub async fn client(&self, cn: &str) -> anyhow::Result<Client> {
        let files = self.try_client_files(cn)?;
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&files.ca)?))
            .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
            .domain_name(SERVER_NAME);
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        Client::connect([self.endpoint()], Some(options))
            .await
            .with_context(|| format!("connect to etcd {} as {cn:?}", self.endpoint()))
    }

    /// SIGKILLs etcd (no-op if not running). The data dir and ports are kept.
    pub fn kill(&mut self) {
        self.kill_child();
    }

    /// Kills etcd if it runs, then starts it again on the same ports and data dir and waits
    /// until it serves.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_child();
        self.spawn_and_wait()
    }

    /// Freezes etcd with SIGSTOP: connections stay open but nothing is answered, like a hung
    /// or partitioned server. Undo with [`continue_process`](Self::continue_process).
    pub fn stop_process(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)?;
        // kill() returns once the signal is queued; a thread busy on another core can still
        // answer a request before it stops. Wait until every thread is in state T.
        let pid = self.pid().context("etcd is not running")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .with_context(|| format!("list the threads of etcd {pid}"))?;
            let all_stopped = tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                    .unwrap_or(true)
            });
            if all_stopped {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "etcd {pid} did not stop within 2 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Resumes a process frozen by [`stop_process`](Self::stop_process) (SIGCONT).
    pub fn continue_process(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    /// PID of the running etcd, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last few KiB of etcd's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("etcd is not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("send {signal} to etcd {pid}"))
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a SIGSTOPped process. Errors mean it is already gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("open {}", self.log_path().display()))?;
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let server = &self.certs.server;
        let child = Command::new(ETCD_BIN)
            .arg("--name=n1")
            .arg(format!("--data-dir={}", self.data_dir.path().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=n1={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--client-cert-auth")
            .arg(format!("--trusted-ca-file={}", server.ca.display()))
            .arg(format!("--cert-file={}", server.cert.display()))
            .arg(format!("--key-file={}", server.key.display()))
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=100")
            .arg("--auto-compaction-retention=1")
            // The clients' keepalive pings (1 s) must not count as abuse (see the apiserver's
            // embedded etcd).
            .arg("--grpc-keepalive-min-time=500ms")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {ETCD_BIN} (is the etcd-server package installed?)"))?;
        self.child = Some(child);
        self.wait_ready().with_context(|| {
            format!(
                "etcd at {} not ready; tail of {}:\n{}",
                self.endpoint(),
                self.log_path().display(),
                self.log_tail()
            )
        })
    }

    /// Polls until a TLS handshake succeeds and `status` answers, or the child exits.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let tls = Arc::new(load_client_config(&self.certs.root)?);
        let mut last_error = anyhow!("no attempt made");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("etcd exited with {status}");
                }
            }
            match tls_probe(self.addr(), tls.clone()) {
                Ok(()) => match self.status_blocking() {
                    Ok(()) => return Ok(()),
                    Err(error) => last_error = error.context("etcd status"),
                },
                Err(error) => last_error = error.context("TLS connect"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last_error.context(format!("timed out after {START_TIMEOUT:?}")))
    }

    /// Runs `status` as `root` on a private runtime in its own thread, so it works whether or
    /// not the caller is inside a tokio runtime.
    fn status_blocking(&self) -> anyhow::Result<()> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async {
                        let mut client = self.client("root").await?;
                        tokio::time::timeout(Duration::from_secs(2), client.status())
                            .await
                            .context("timed out")??;
                        anyhow::Ok(())
                    })
                })
                .join()
                .map_err(|_| anyhow!("status thread panicked"))?
        })
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.kill_child();
    }
}

/// A data dir on tmpfs when available: stable write latency, no disk wear.
fn data_tempdir() -> anyhow::Result<TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("clustermesh-etcd-data-");
        b
    };
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return Ok(dir);
        }
    }
    builder.tempdir().context("create etcd data dir")
}

/// Two distinct free loopback ports. They are released before etcd binds them, so a race is
/// possible; [`TestEtcd::start`] retries on "address already in use".
fn free_ports() -> anyhow::Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0").context("bind probe port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("bind probe port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn tls_probe(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut conn = rustls::ClientConnection::new(config, ServerName::try_from(SERVER_NAME)?)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn log_tail(path: &Path) -> String {
    let tail = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    tail().unwrap_or_else(|error| format!("<cannot read {}: {error}>", path.display()))
}

/// Quotes a path for YAML (JSON strings are valid YAML scalars).
fn yaml_str(path: &Path) -> String {
    serde_json::to_string(&path.display().to_string()).unwrap_or_default()
}

/// A raw etcd client for the etcd a client config file describes, with the syncer's
/// endpoint resolution and mTLS settings: for tests that read or write keys the products
/// never would (the products speak etcd only through `clustermesh_syncer`).
pub async fn raw_client(cfg: &clustermesh_syncer::EtcdConfig) -> anyhow::Result<Client> {
    let (endpoints, server_name) = clustermesh_syncer::client::dial_endpoints(cfg).await?;
    let options = ConnectOptions::new()
        .with_tls(clustermesh_syncer::client::tls_options(cfg, &server_name)?)
        .with_connect_timeout(Duration::from_secs(5));
    Client::connect(&endpoints, Some(options))
        .await
        .with_context(|| format!("connect to etcd {}", endpoints.join(",")))
}
