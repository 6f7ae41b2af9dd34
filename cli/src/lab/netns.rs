//! Network namespaces and links through iproute2, and running code or processes inside a
//! namespace. The lab shells out to `ip` (what a reader would type to reproduce a step)
//! and enters namespaces with `setns` on a dedicated thread (sockets opened there live in
//! the namespace; the rest of the process is untouched).

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Runs `ip <args>`; the error names the command and quotes iproute2's message.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    output(cmd, &format!("ip {}", args.join(" ")), "iproute2")
}

/// Runs `cmd` (described as `what`, shipped in Debian package `package`): its stdout, or an
/// error that names it and quotes its stderr.
fn output(mut cmd: Command, what: &str, package: &str) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("running `{what}` (install {package}: `apt-get install {package}`)")
    })?;
    if !out.status.success() {
        bail!(
            "`{what}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <ns> <args>`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Runs `ethtool <args>` inside namespace `ns` (`ip netns exec`).
pub fn ethtool_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "ethtool"]).args(args);
    output(
        cmd,
        &format!("ip netns exec {ns} ethtool {}", args.join(" ")),
        "ethtool",
    )
    .map(drop)
}

/// Names of every network namespace on the machine (`ip netns list`).
pub fn list() -> anyhow::Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Creates namespace `ns` with its loopback up.
pub fn add(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// PIDs of the processes whose network namespace is `ns`.
pub fn pids(ns: &str) -> Vec<u32> {
    ip(&["netns", "pids", ns])
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Runs `f` on a thread that entered namespace `ns`; sockets it opens live there.
pub fn run_in<T: Send>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread inside namespace {ns} panicked"))?
    })
}

/// Moves the calling thread into namespace `ns` (threads it spawns later inherit it).
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).with_context(|| {
        format!(
            "opening {} (is the lab up? `clustermesh lab status`)",
            path.display()
        )
    })?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns} (needs root)"))?;
    Ok(())
}

/// Writes a sysctl of namespace `ns` (e.g. `net/ipv4/ip_forward`): `/proc/sys/net` shows the
/// namespace of the thread that opens it.
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run_in(ns, || {
        let path = Path::new("/proc/sys").join(key);
        std::fs::write(&path, value)
            .with_context(|| format!("writing {} in namespace {ns}", path.display()))
    })
}

/// Starts `program args…` inside namespace `ns` (`ip netns exec`, which execs, so the PID
/// is the program's), in its own process group, output appended to `log`.
pub fn spawn(ns: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<u32> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        // Plain log files, no colour codes.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} in namespace {ns}", program.display()))?;
    Ok(child.id())
}

/// Whether a process with this PID exists and is not a zombie (a child of an exited `lab up`
/// stays a zombie until init reaps it).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether `path` is a mount point (per `/proc/self/mountinfo`).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| m == want)
}
