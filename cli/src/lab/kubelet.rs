//! The lab's kubelet for a cluster's control-plane pod (`clustermesh lab kubelet`, hidden):
//! it runs the containers of the `clustermesh-apiserver` Deployment, as
//! [`super::install::control_plane`] materialised them (`<pod>/containers.json`: each
//! container's command line and environment, already expanded), and restarts a container
//! that exits, as a kubelet does with `restartPolicy: Always`.
//!
//! What it does as a kubelet does:
//! - every container of the pod starts at once (etcd and the apiserver; the apiserver's
//!   `--etcd-init` waits for its sidecar) and lives in the pod's network namespace (the
//!   cluster's control-plane namespace: `127.0.0.1` is the pod's loopback);
//! - a container that exits is started again on the same emptyDirs, after a back-off that
//!   doubles from 200 ms to 10 s and is reset once it ran for 10 s (a kubelet's
//!   CrashLoopBackOff starts at 10 s and caps at 5 min; the lab is faster);
//! - the pod ends as a whole: each container is started through util-linux's `setpriv
//!   --pdeathsig TERM` from a thread that waits for it, so when this process ends (SIGTERM
//!   from `lab down`, or SIGKILL) every container gets SIGTERM. Killing one container leaves
//!   the others running, as in a pod.
//!
//! What it does not do (no kubelet runs in the lab): pull images (the containers run this
//! machine's `etcd` and `clustermesh-apiserver`), probe (`lab up` and the tests GET the
//! probes' URLs themselves), or re-read the pod's spec (a changed Deployment needs `lab up`).
//! Updated Secrets reach the pod's files through [`super::install::refresh`].
//!
//! It must not materialise objects or decide what runs (that is `install`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The pod's containers, in the Deployment's order.
pub const SPEC_FILE: &str = "containers.json";

/// One container as it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerRun {
    /// The container's name in the Deployment.
    pub name: String,
    /// Program and arguments (command + args, expanded, paths under the pod dir).
    pub argv: Vec<String>,
    /// Its environment (the spec's `env`, resolved).
    pub env: BTreeMap<String, String>,
    /// Where its output goes (appended).
    pub log: PathBuf,
}

/// Flags of `lab kubelet`.
#[derive(Debug, clap::Args)]
pub struct KubeletArgs {
    /// The pod directory (holding `containers.json`).
    #[arg(long)]
    pub pod: PathBuf,
}

/// Writes the pod's containers for the kubelet to run.
pub fn write_spec(pod: &Path, containers: &[ContainerRun]) -> anyhow::Result<()> {
    let path = pod.join(SPEC_FILE);
    clustermesh_syncer::config::write_private(&path, &serde_json::to_vec_pretty(containers)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// util-linux's `setpriv` (essential on Debian).
fn setpriv() -> anyhow::Result<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("setpriv not found: install util-linux (the lab's kubelet starts containers with a parent-death signal through it)")
}

/// Runs the pod until this process is ended.
pub fn run(a: KubeletArgs) -> anyhow::Result<()> {
    let path = a.pod.join(SPEC_FILE);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let containers: Vec<ContainerRun> =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(!containers.is_empty(), "{}: no containers", path.display());
    let setpriv = setpriv()?;
    let threads: Vec<_> = containers
        .into_iter()
        .map(|c| {
            let setpriv = setpriv.clone();
            std::thread::Builder::new()
                .name(format!("container-{}", c.name))
                .spawn(move || supervise(&c, &setpriv))
        })
        .collect::<Result<_, _>>()
        .context("starting the container threads")?;
    // A container thread returns only when its container cannot be started at all; the pod
    // is then broken, and ending this process ends the other containers too.
    for t in threads {
        match t.join() {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
            Err(_) => anyhow::bail!("a container thread panicked"),
        }
    }
    Ok(())
}

/// Starts `c` and starts it again whenever it exits; returns only if it cannot be started.
fn supervise(c: &ContainerRun, setpriv: &Path) -> anyhow::Result<()> {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(10);
    let mut delay = FIRST;
    let (program, args) = c
        .argv
        .split_first()
        .with_context(|| format!("container {} has no command", c.name))?;
    loop {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .with_context(|| format!("opening {}", c.log.display()))?;
        let started = Instant::now();
        let mut child = Command::new(setpriv)
            .args(["--pdeathsig", "TERM", "--"])
            .arg(program)
            .args(args)
            .envs(&c.env)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting container {} ({program})", c.name))?;
        eprintln!("container {} started (pid {})", c.name, child.id());
        let status = child
            .wait()
            .with_context(|| format!("waiting for container {}", c.name))?;
        if started.elapsed() >= MAX {
            delay = FIRST;
        }
        eprintln!(
            "container {} exited ({status}) after {:.1}s; restarting in {delay:?}",
            c.name,
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(MAX);
    }
}
