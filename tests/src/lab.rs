//! A `clustermesh lab` in a temporary directory for the lab acceptance suites
//! (`tests/tests/lab*.rs`): runs the CLI against it and always tears it down.

use std::path::PathBuf;
use std::process::Command;

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

/// A lab in a temporary directory, removed on drop (also when an assertion fails) unless the
/// test already ran `lab down` itself (`down = true`).
pub struct Lab {
    /// The `clustermesh` binary.
    pub bin: PathBuf,
    /// The lab directory (`--dir`).
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    /// Set once the test has taken the lab down itself.
    pub down: bool,
}

impl Lab {
    /// A lab directory under a new temporary directory named `prefix…` (not yet up).
    pub fn new(prefix: &str) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
        Ok(Self {
            bin: find_binary("clustermesh")?,
            dir: tmp.path().join("lab"),
            _tmp: tmp,
            down: false,
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
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time", timeout])
        .arg(format!("http://{ip}:8080/"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
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
