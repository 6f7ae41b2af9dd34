//! The real backend: the `clustermesh-apiserver` binary as a child process, and an etcd
//! client (mTLS) for `kvstore/list`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use serde::Deserialize;
use tokio::process::{Child, Command};

use super::health;
use super::runner::Backend;

/// Env var naming the apiserver binary explicitly.
pub const BIN_ENV: &str = "CLUSTERMESH_APISERVER_BIN";
const BIN_NAME: &str = "clustermesh-apiserver";
/// Variables of the test's own environment the apiserver may see. Everything else is
/// cleared: the apiserver reads its flags from the environment too (Cilium's
/// `CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE` ≡ `--clustermesh-default-global-namespace`), so
/// only the script's `env` may set those.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "RUST_BACKTRACE", "RUST_LOG"];
/// How long `hive/stop` waits after SIGTERM before killing.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Finds the apiserver binary: `$CLUSTERMESH_APISERVER_BIN`, else next to the running test
/// executable (`target/<profile>/deps/..` → `target/<profile>/clustermesh-apiserver`).
pub fn find_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(BIN_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{BIN_ENV}={} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(BIN_NAME))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "{BIN_NAME} binary not found (looked at {candidates:?}); run `cargo build -p clustermesh-apiserver` \
             first or set {BIN_ENV}"
        )
    })
}

/// An etcd client config file, as given to the apiserver with `--etcd-config`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct EtcdConfig {
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Connects to etcd with the endpoints and certificates of an etcd client config file.
pub async fn connect(config_path: &Path) -> anyhow::Result<Client> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config: EtcdConfig = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let mut tls = TlsOptions::new();
    if let Some(ca) = &config.trusted_ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5));
    if config.endpoints.iter().any(|e| e.starts_with("https://")) {
        options = options.with_tls(tls);
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .with_context(|| format!("connecting to etcd at {:?}", config.endpoints))
}

/// `clustermesh-apiserver` under test plus an etcd client.
pub struct Apiserver {
    bin: PathBuf,
    etcd_config: PathBuf,
    log_path: PathBuf,
    etcd: Client,
    child: Option<Child>,
    health_addr: Option<String>,
}

impl Apiserver {
    /// Prepares (does not start) an apiserver that will use the etcd client config at
    /// `etcd_config` and log to `log_path`.
    pub async fn new(
        bin: PathBuf,
        etcd_config: PathBuf,
        log_path: PathBuf,
    ) -> anyhow::Result<Self> {
        let etcd = connect(&etcd_config).await?;
        Ok(Self {
            bin,
            etcd_config,
            log_path,
            etcd,
            child: None,
            health_addr: None,
        })
    }

    /// The `/readyz` address of the running instance.
    pub fn health_addr(&self) -> Option<&str> {
        self.health_addr.as_deref()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

fn free_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

impl Backend for Apiserver {
    async fn start(
        &mut self,
        flags: &[String],
        env: &BTreeMap<String, String>,
        source: &[String],
    ) -> anyhow::Result<()> {
        let health = free_addr()?;
        let metrics = free_addr()?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--etcd-config")
            .arg(&self.etcd_config)
            .args(source)
            .arg("--health-addr")
            .arg(&health)
            .arg("--metrics-addr")
            .arg(&metrics)
            .args(flags)
            .env_clear()
            .envs(
                PASSED_ENV
                    .iter()
                    .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
            )
            .envs(env)
            // Plain log lines in the failure report.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        self.health_addr = Some(health);
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("apiserver not running");
        };
        self.health_addr = None;
        if let Some(pid) = child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            // It may have exited already; `wait` below reports how.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                child.kill().await?;
                bail!(
                    "apiserver did not exit within {STOP_GRACE:?} of SIGTERM and was killed; log tail:\n{}",
                    self.log_tail(30)
                );
            }
        };
        // Exiting because of our SIGTERM (with or without a handler) is a clean stop.
        let by_sigterm = std::os::unix::process::ExitStatusExt::signal(&status)
            == Some(nix::sys::signal::Signal::SIGTERM as i32);
        if !status.success() && !by_sigterm {
            bail!(
                "apiserver exited with {status} on SIGTERM; log tail:\n{}",
                self.log_tail(30)
            );
        }
        Ok(())
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    async fn list(&mut self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let resp = self
            .etcd
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| Ok((kv.key_str()?.to_owned(), kv.value().to_vec())))
            .collect()
    }

    async fn health(&mut self) -> anyhow::Result<Vec<health::Report>> {
        let addr: std::net::SocketAddr = self
            .health_addr
            .as_deref()
            .context("apiserver not running")?
            .parse()?;
        let (code, body) =
            tokio::task::spawn_blocking(move || crate::process::http_get(addr, "/status"))
                .await?
                .with_context(|| format!("GET http://{addr}/status"))?;
        if code != 200 {
            bail!("GET http://{addr}/status answered {code}: {body}");
        }
        #[derive(Deserialize)]
        struct Status {
            health: Option<Vec<health::Report>>,
        }
        let status: Status = serde_json::from_str(&body)
            .with_context(|| format!("parsing /status of the apiserver: {body}"))?;
        status
            .health
            .context("the apiserver's /status has no `health` list of reporters")
    }

    fn diagnostics(&mut self) -> Option<String> {
        let state = match self.child.as_mut().map(Child::try_wait) {
            None => "apiserver: not running (stopped by the script)".to_owned(),
            Some(Ok(None)) => "apiserver: still running".to_owned(),
            Some(Ok(Some(status))) => format!("apiserver: EXITED with {status}"),
            Some(Err(e)) => format!("apiserver: state unknown ({e})"),
        };
        Some(format!(
            "{state}; log {}; last lines:\n{}",
            self.log_path.display(),
            self.log_tail(40)
        ))
    }
}
