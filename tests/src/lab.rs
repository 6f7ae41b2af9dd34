//! A `clustermesh lab` in a temporary directory for the lab acceptance suites
//! (`tests/tests/lab*.rs`, `ui.rs`, `faults.rs`) and `bench-ui`: runs the CLI against it,
//! takes the machine's one lab turn ([`LabTurn`]) for the lab's lifetime and always tears
//! it down. Also the helpers those suites share (a pod's `curl`, the agents' HTTP from the
//! router namespace, stopping and starting a lab process again). It must not assert
//! anything a suite checks: the suites keep their assertions.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use crate::process::find_binary;

/// Runs `cmd` and returns its stdout; fails with both outputs when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The CNI plugin a lab suite uses: `CLUSTERMESH_LAB_CNI` if set, else the suite's own
/// (CI spreads ptp, bridge and clustermesh over the suites, so each runs once).
pub fn lab_cni(default: &str) -> String {
    std::env::var("CLUSTERMESH_LAB_CNI").unwrap_or_else(|_| default.to_owned())
}

/// The file whose exclusive `flock` is the machine's one lab turn ([`LabTurn`]).
pub const LAB_LOCK: &str = "/run/clustermesh/lab-tests.lock";

/// How long [`LabTurn::take`] waits for the lab of another test or bench to go down (the
/// fault suite's lab lives ~5 min; several suites may queue).
const LAB_TURN_WAIT: Duration = Duration::from_secs(30 * 60);

/// One lab at a time on this machine, across the threads of one test binary, the test
/// binaries and `bench-ui`: an exclusive `flock` on [`LAB_LOCK`], held until dropped (the
/// kernel releases it when the process dies, so a killed test leaves no stale turn).
///
/// Two labs can be up at once (the second finds the underlay route taken and works from
/// its router namespace), but the suites assert on what the host has (the root veth, what
/// `lab down` leaves) and on latencies (reachable within 1–2 s) that a second lab on the
/// 2 cores would stretch. A `Mutex` in one test file covered only that file: cargo runs test
/// binaries one after another, but two engineers or `cargo test -p clustermesh-tests`
/// beside a bench do not. `flock` locks belong to the open file, so two threads of one
/// process that each open the file exclude each other as two processes do.
pub struct LabTurn {
    _file: File,
}

impl LabTurn {
    /// Waits for the turn (printing who holds it, once), then records `who` and this
    /// process in the file for whoever waits next. Fails after 30 min, naming the holder.
    pub fn take(who: &str) -> Result<Self> {
        let path = Path::new(LAB_LOCK);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {} (lab tests run as root)", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening the lab lock {LAB_LOCK}"))?;
        let t = Instant::now();
        let mut waited = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(path).unwrap_or_default();
                    ensure!(
                        t.elapsed() < LAB_TURN_WAIT,
                        "{who}: the lab lock {LAB_LOCK} is still held after {LAB_TURN_WAIT:?} by {holder:?}: is that lab stuck? (`clustermesh lab status --dir <its dir>`)"
                    );
                    if !waited {
                        println!("{who}: waiting for the lab lock {LAB_LOCK} (held by {holder})");
                        waited = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {LAB_LOCK}"));
                }
            }
        }
        if waited {
            println!(
                "{who}: lab lock taken after {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        file.set_len(0)?;
        write!(
            file,
            "{who} (pid {}, {})",
            std::process::id(),
            std::env::args().next().unwrap_or_default()
        )?;
        Ok(Self { _file: file })
    }
}

/// A lab in a temporary directory, removed on drop (also when an assertion fails) unless the
/// test already ran `lab down` itself (`down = true`). It holds the machine's lab turn from
/// [`Lab::new`] until after that `lab down`.
pub struct Lab {
    /// The `clustermesh` binary.
    pub bin: PathBuf,
    /// The lab directory (`--dir`).
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    /// Set once the test has taken the lab down itself.
    pub down: bool,
    /// Declared last: fields drop after `Drop::drop` ran `lab down`, the turn last of all.
    _turn: LabTurn,
}

impl Lab {
    /// A lab directory under a new temporary directory named `prefix…` (not yet up), once
    /// this test has the machine's lab turn ([`LabTurn`]).
    pub fn new(prefix: &str) -> Result<Self> {
        let turn = LabTurn::take(prefix)?;
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
        Ok(Self {
            bin: find_binary("clustermesh")?,
            dir: tmp.path().join("lab"),
            _tmp: tmp,
            down: false,
            _turn: turn,
        })
    }

    /// `clustermesh <args> --dir <lab>`.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).arg("--dir").arg(&self.dir);
        c
    }

    /// `lab up <flags>`: prints its output and how long it took; returns the output and the
    /// lab's `lab.json`.
    pub fn up(&mut self, flags: &[&str]) -> Result<(String, Value)> {
        let t = std::time::Instant::now();
        let up = run(self.cli(&["lab", "up"]).args(flags))?;
        println!(
            "{up}\nlab up {}: {:.1}s",
            flags.join(" "),
            t.elapsed().as_secs_f64()
        );
        Ok((up, self.state()?))
    }

    /// `lab up` of the suites' mesh, 2 clusters × 2 nodes × `pods` pods, plus `flags`
    /// (as [`Lab::up`]).
    pub fn up_mesh(&mut self, pods: u32, flags: &[&str]) -> Result<(String, Value)> {
        let pods = pods.to_string();
        let mut all = vec!["--clusters", "2", "--nodes", "2", "--pods", &pods];
        all.extend_from_slice(flags);
        self.up(&all)
    }

    /// The lab's `lab.json`.
    pub fn state(&self) -> Result<Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            self.dir.join("lab.json"),
        )?)?)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.cli(&["lab", "down"]).output();
        }
    }
}

/// `curl http://<ip>:8080/` (a lab echo server) from inside `ns`; `None` when the
/// connection fails.
pub fn curl_echo(ns: &str, ip: &str, timeout: &str) -> Option<Value> {
    curl_json(ns, &format!("http://{ip}:8080/"), timeout)
}

/// `curl <url>` from inside `ns` (a pod's namespace: its resolver too), parsed as JSON;
/// `None` when the connection fails or the answer is not JSON.
pub fn curl_json(ns: &str, url: &str, timeout: &str) -> Option<Value> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "--max-time",
            timeout,
            url,
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `GET http://<addr><path>` from the router namespace (the lab's health addresses live in
/// the underlay; the root namespace may not route it when another lab runs): the status
/// code and body, `None` when nothing answered within 2 s.
pub fn router_get(router: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            router,
            "curl",
            "-s",
            "--max-time",
            "2",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{addr}{path}"))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

/// An agent's or apiserver's `/status` at `addr` through [`router_get`]; `None` unless it
/// answered 200 with JSON.
pub fn router_status(router: &str, addr: &str) -> Option<Value> {
    let (code, body) = router_get(router, addr, "/status")?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// The command line of process `pid`.
pub fn argv_of(pid: u32) -> Result<Vec<String>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("process {pid} is gone"))?;
    Ok(cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Whether `pid` runs (exists and is neither a zombie nor dead).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .with_context(|| format!("signal {sig} to {pid}"))
}

/// Waits until `pid` no longer runs ([`alive`]); how long that took, or an error after
/// `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    while alive(pid) {
        ensure!(
            t.elapsed() < timeout,
            "process {pid} still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t.elapsed())
}

/// Starts `argv` again inside `ns`, output appended to `log` (as `lab up` started it), in
/// its own process group; its PID (`lab down` finds it by its namespace).
pub fn respawn(ns: &str, argv: &[String], log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt as _;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    Ok(child.id())
}

/// `clustermesh connectivity test -o json` on `lab`, parsed; fails unless the command
/// succeeded and every check in each of `sections` (`checks`, `services`) passed.
pub fn connectivity_report(lab: &Lab, sections: &[&str]) -> Result<Value> {
    let out = lab.cli(&["connectivity", "test", "-o", "json"]).output()?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "connectivity report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let mut failures = Vec::new();
    for section in sections {
        let checks = report[*section]
            .as_array()
            .with_context(|| section.to_string())?;
        failures.extend(
            checks
                .iter()
                .filter(|c| c["ok"] != Value::Bool(true))
                .map(|c| format!("{}: {}", c["name"], c["error"])),
        );
    }
    ensure!(
        failures.is_empty() && out.status.success(),
        "{} failed checks:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(report)
}

/// `clustermesh connectivity test -o json` on `lab`: every check passes (at least the 112
/// pod-to-pod checks of a 2×2×2 lab).
pub fn connectivity_passes(lab: &Lab) -> Result<()> {
    let report = connectivity_report(lab, &["checks"])?;
    let summary = &report["summary"];
    ensure!(summary["passed"].as_u64().unwrap_or(0) >= 112, "{summary}");
    println!("connectivity: {summary}");
    Ok(())
}
